//! Migration connections: opening them, and writing frames.

use std::io::Write;
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

/// Bytes a destination's main connection may hold unread in the kernel. The background
/// stream queued there is what a page asked for (and sent by the stream already) waits
/// behind, so it is kept to a few milliseconds of a fast link: enough for the
/// bandwidth-delay product of a LAN, not the several MiB autotuning grows to.
pub const STREAM_RCVBUF: usize = 512 << 10;
/// Bytes a source's main connection may hold not yet sent (`TCP_NOTSENT_LOWAT`): a page
/// the stream took counts as sent, so the stream must not run far ahead of the network.
pub const STREAM_NOTSENT: usize = 256 << 10;

/// Caps what `s` holds unread in the kernel at about `bytes` (autotuning then stays off
/// for it).
pub fn cap_receive_buffer(s: &TcpStream, bytes: usize) {
    set_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes);
}

/// Caps what `s` holds written but not yet sent at about `bytes`: writes block until the
/// network has taken the rest.
pub fn cap_unsent(s: &TcpStream, bytes: usize) {
    set_int(s, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, bytes);
}

fn set_int(s: &TcpStream, level: libc::c_int, opt: libc::c_int, v: usize) {
    use std::os::fd::AsRawFd;
    let v = v.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt on a socket we own, with a valid int and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Queued frames are written to the socket once this many bytes are waiting.
const PUSH_AT: usize = 256 * 1024;

/// Writes frames to one connection, buffered: frames are built in one buffer and go to
/// the socket in large writes.
pub struct FrameWriter {
    stream: TcpStream,
    out: Vec<u8>,
}

impl FrameWriter {
    /// A writer on (a clone of) `s`.
    pub fn new(s: &TcpStream) -> std::io::Result<Self> {
        Ok(FrameWriter {
            stream: s.try_clone()?,
            out: Vec::with_capacity(PUSH_AT + wire::HEADER + 8192),
        })
    }

    /// Queues one frame; returns its size in bytes.
    pub fn send(&mut self, m: &Message) -> Result<u64, WireError> {
        let before = self.out.len();
        wire::encode(m, &mut self.out)?;
        let n = (self.out.len() - before) as u64;
        self.push_if_full()?;
        Ok(n)
    }

    /// Queues one page frame for `gpa`, its `page_size` bytes written in place by `fill`
    /// (see [`wire::append_page`]); returns the frame's bytes and whether it went as
    /// zeros.
    pub fn send_page(
        &mut self,
        gpa: u64,
        flags: u32,
        page_size: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), String>,
    ) -> Result<(u64, bool), String> {
        let (n, zero) = wire::append_page(&mut self.out, gpa, flags, page_size, fill)?;
        self.push_if_full().map_err(|e| e.to_string())?;
        Ok((n as u64, zero))
    }

    fn push_if_full(&mut self) -> Result<(), WireError> {
        if self.out.len() >= PUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Pushes queued frames onto the wire (on an error the connection is done for,
    /// and what was queued is dropped).
    pub fn flush(&mut self) -> Result<(), WireError> {
        let r = (&self.stream).write_all(&self.out);
        self.out.clear();
        Ok(r?)
    }

    /// The connection.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Ends the connection both ways (wakes a reader blocked on it).
    pub fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
