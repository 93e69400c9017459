//! Migration connections: opening them, and writing frames.

use std::io::{BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::wire::{self, Message, WireError};

/// How long one write may block before the link counts as broken (a network that
/// takes nothing for this long is treated as gone; the migration then reconnects).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `PORT` means `127.0.0.1:PORT`; anything else is taken as `HOST:PORT`.
pub fn normalize_addr(s: &str) -> String {
    if s.parse::<u16>().is_ok() {
        format!("127.0.0.1:{s}")
    } else {
        s.to_string()
    }
}

/// Connects to `addr` with a bounded wait, without Nagle delays.
pub fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let to: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    let mut last = std::io::Error::other(format!("{addr}: no address"));
    for a in to {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                tune(&s);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Sets a migration socket up: no Nagle delay, writes that give up after
/// [`WRITE_TIMEOUT`], and keepalive probes with `TCP_USER_TIMEOUT`, so a peer that
/// silently vanished is noticed within about half a minute even when nothing is being
/// written.
pub fn tune(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    let fd = s.as_raw_fd();
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| {
        // SAFETY: setsockopt on a socket we own, with a valid int and its size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 4);
    set(
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        WRITE_TIMEOUT.as_millis() as libc::c_int,
    );
}

/// Writes frames to one connection, buffered.
pub struct FrameWriter {
    out: BufWriter<TcpStream>,
    buf: Vec<u8>,
}

impl FrameWriter {
    /// A writer on (a clone of) `s`.
    pub fn new(s: &TcpStream) -> std::io::Result<Self> {
        Ok(FrameWriter {
            out: BufWriter::with_capacity(256 * 1024, s.try_clone()?),
            buf: Vec::with_capacity(wire::HEADER + 8192),
        })
    }

    /// Queues one frame; returns its size in bytes.
    pub fn send(&mut self, m: &Message) -> Result<u64, WireError> {
        self.buf.clear();
        wire::encode(m, &mut self.buf)?;
        self.out.write_all(&self.buf)?;
        Ok(self.buf.len() as u64)
    }

    /// Pushes queued frames onto the wire.
    pub fn flush(&mut self) -> Result<(), WireError> {
        Ok(self.out.flush()?)
    }

    /// The connection.
    pub fn stream(&self) -> &TcpStream {
        self.out.get_ref()
    }

    /// Ends the connection both ways (wakes a reader blocked on it).
    pub fn close(&self) {
        let _ = self.out.get_ref().shutdown(Shutdown::Both);
    }
}
