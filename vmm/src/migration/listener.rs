//! The destination's listener: every connection gets a thread of its own to say
//! hello (a silent or garbage connection holds up nobody), bounded in number and time.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{self, FrameWriter};
use super::incoming::{Ev, Hi};
use super::wire::{self, ErrorCode, Limits, Message, WireError};
use crate::vm::VmError;

/// Most connections saying hello at once (each has a thread for up to HELLO_BOUND).
const MAX_HANDSHAKES: usize = 32;
/// How long a new connection may take to say hello, all of it.
const HELLO_BOUND: Duration = Duration::from_secs(10);

/// Accepts connections for ever; each gets [`HELLO_BOUND`] to say hello on a thread of
/// its own, so a silent or garbage connection holds up nobody. Returns the count of
/// handshakes in progress.
pub(super) fn spawn_acceptor(
    listener: TcpListener,
    tx: Sender<Ev>,
) -> Result<Arc<AtomicUsize>, VmError> {
    let busy = Arc::new(AtomicUsize::new(0));
    let handshakes = busy.clone();
    std::thread::Builder::new()
        .name("ufvmm-accept".into())
        .spawn(move || {
            for c in listener.incoming() {
                let s = match c {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("ufvmm: incoming: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                if busy.load(Ordering::Acquire) >= MAX_HANDSHAKES {
                    let peer = s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
                    refuse(
                        &s,
                        &peer,
                        ErrorCode::Busy,
                        "too many connections saying hello at once",
                    );
                    continue;
                }
                busy.fetch_add(1, Ordering::AcqRel);
                let (tx, busy2) = (tx.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("ufvmm-hello".into())
                    .spawn(move || {
                        handshake(s, &tx);
                        busy2.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })
        .map_err(VmError::Thread)?;
    Ok(handshakes)
}

fn handshake(mut s: TcpStream, tx: &Sender<Ev>) {
    let peer = s
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    conn::tune(&s);
    let hi = match read_hello(&mut s) {
        Ok(hi) => hi,
        Err((code, why)) => return refuse(&s, &peer, code, &why),
    };
    let _ = s.set_read_timeout(None);
    let _ = tx.send(Ev::Conn(hi, s, peer));
}

/// Reads the first frame, which must be a hello, all of it within [`HELLO_BOUND`].
/// Refused: the code and text to answer with.
fn read_hello(s: &mut TcpStream) -> Result<Hi, (ErrorCode, String)> {
    let deadline = Instant::now() + HELLO_BOUND;
    let mut buf = [0u8; wire::HELLO_FRAME];
    let mut have = 0;
    let bad = |why: String| (ErrorCode::BadHello, why);
    while have < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(bad(format!("no hello within {} s", HELLO_BOUND.as_secs())));
        }
        let _ = s.set_read_timeout(Some(left));
        match std::io::Read::read(s, &mut buf[have..]) {
            Ok(0) => {
                return Err(bad(WireError::Truncated {
                    have,
                    need: buf.len(),
                }
                .to_string()))
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(bad(e.to_string())),
        }
        // As soon as the header is in, anything but a hello's size is refused.
        if have >= wire::HEADER {
            match wire::decode(&buf[..have], &Limits::UNKNOWN) {
                Err(WireError::Incomplete { need }) if need == wire::HELLO_FRAME => {}
                Err(WireError::Incomplete { .. }) => return Err(not_a_hello(&buf)),
                Err(e @ WireError::BadVersion { .. }) => {
                    return Err((ErrorCode::BadVersion, e.to_string()))
                }
                Err(e) => return Err(bad(e.to_string())),
                Ok((
                    Message::Hello {
                        mem_size,
                        vcpus,
                        session,
                        channel,
                        resume,
                    },
                    _,
                )) => {
                    return Ok(Hi {
                        mem_size,
                        vcpus,
                        session,
                        channel,
                        resume,
                    })
                }
                Ok(_) => return Err(not_a_hello(&buf)),
            }
        }
    }
    Err(not_a_hello(&buf))
}

/// The refusal of a first frame that is no hello of this version: one of another
/// version (too long to read and check whole) is named as such.
fn not_a_hello(frame: &[u8]) -> (ErrorCode, String) {
    match wire::header_version(frame) {
        Some(peer) if peer != wire::VERSION => (
            ErrorCode::BadHello,
            format!(
                "the first frame is not a hello of this version: {}",
                WireError::BadVersion { peer }
            ),
        ),
        _ => (
            ErrorCode::BadHello,
            "the first message is not a hello".into(),
        ),
    }
}

/// Tells the peer why (if it listens) and closes.
pub(super) fn refuse(s: &TcpStream, peer: &str, code: ErrorCode, why: &str) {
    eprintln!(
        "ufvmm: incoming: refused a connection from {peer} ({}): {why}",
        code.name()
    );
    if let Ok(mut w) = FrameWriter::new(s) {
        let _ = w.send(&Message::Error {
            code,
            text: why.to_string(),
        });
        let _ = w.flush();
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}
