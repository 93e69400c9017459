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
                let _ = s.set_nodelay(true);
                let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
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

    /// Ends the connection both ways (wakes a reader blocked on it).
    pub fn close(&self) {
        let _ = self.out.get_ref().shutdown(Shutdown::Both);
    }
}
