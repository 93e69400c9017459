//! The destination's listener: every connection gets a thread of its own to say
//! hello (a silent or garbage connection holds up nobody), bounded in number and time.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{self, FrameWriter};
use super::incoming::{Ev, Hi, NEVER_STARTED};
use super::verdicts::Verdicts;
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
    verdicts: Arc<Verdicts>,
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
                let (tx, busy2, verdicts) = (tx.clone(), busy.clone(), verdicts.clone());
                let spawned = std::thread::Builder::new()
                    .name("ufvmm-hello".into())
                    .spawn(move || {
                        handshake(s, &tx, &verdicts);
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

/// Why a first frame is refused.
enum Refusal {
    /// Answered with this code and text.
    Code(ErrorCode, String),
    /// A version-1 source's hello for `session`: answered in version 1.
    V1Hello { session: u64 },
}

fn handshake(mut s: TcpStream, tx: &Sender<Ev>, verdicts: &Verdicts) {
    let peer = s
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    conn::tune(&s);
    let hi = match read_hello(&mut s) {
        Ok(hi) => hi,
        Err(Refusal::Code(code, why)) => return refuse(&s, &peer, code, &why),
        Err(Refusal::V1Hello { session }) => {
            return refuse_v1(&s, &peer, verdicts.deny(session));
        }
    };
    let _ = s.set_read_timeout(None);
    let _ = tx.send(Ev::Conn(hi, s, peer));
}

/// Reads the first frame, which must be a hello, all of it within [`HELLO_BOUND`].
fn read_hello(s: &mut TcpStream) -> Result<Hi, Refusal> {
    let deadline = Instant::now() + HELLO_BOUND;
    let mut buf = [0u8; wire::HELLO_FRAME];
    let mut have = 0;
    let bad = |why: String| Refusal::Code(ErrorCode::BadHello, why);
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
                    return Err(match wire::v1::decode_hello(&buf[..have]) {
                        Some(Message::Hello { session, .. }) => Refusal::V1Hello { session },
                        _ => Refusal::Code(ErrorCode::BadVersion, e.to_string()),
                    })
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
fn not_a_hello(frame: &[u8]) -> Refusal {
    match wire::header_version(frame) {
        Some(peer) if peer != wire::VERSION => Refusal::Code(
            ErrorCode::BadHello,
            format!(
                "the first frame is not a hello of this version: {}",
                WireError::BadVersion { peer }
            ),
        ),
        _ => Refusal::Code(
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

/// Refuses a version-1 source's hello in version 1, which it can read. If its guest
/// never started here (`never_started`, true unless this destination runs that very
/// session), the text says so in version 1's words, so that the source runs it on.
fn refuse_v1(s: &TcpStream, peer: &str, never_started: bool) {
    let versions = WireError::BadVersion {
        peer: wire::v1::VERSION_1,
    };
    let why = if never_started {
        format!("{NEVER_STARTED}: {versions}")
    } else {
        versions.to_string()
    };
    eprintln!("ufvmm: incoming: refused a connection from {peer} (bad-version, answered in version 1): {why}");
    let mut f = Vec::new();
    wire::v1::encode_error(&why, &mut f);
    let _ = std::io::Write::write_all(&mut &*s, &f);
    let _ = s.shutdown(std::net::Shutdown::Both);
}
