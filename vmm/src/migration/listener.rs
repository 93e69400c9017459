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
/// While accepting fails (out of file descriptors, say), how often it is said.
const ACCEPT_ERROR_EVERY: Duration = Duration::from_secs(5);

/// Accepts connections for ever; each gets [`HELLO_BOUND`] to say hello on a thread of
/// its own, so a silent or garbage connection holds up nobody. Returns the count of
/// handshakes in progress.
pub(super) fn spawn_acceptor(
    listener: TcpListener,
    tx: Sender<Ev>,
    verdicts: Arc<Verdicts>,
) -> Result<Arc<AtomicUsize>, VmError> {
    let busy = Arc::new(AtomicUsize::new(0));
    let busy2 = busy.clone();
    std::thread::Builder::new()
        .name("ufvmm-accept".into())
        .spawn(move || {
            let mut errors = Throttle::new(ACCEPT_ERROR_EVERY);
            for c in listener.incoming() {
                let s = match c {
                    Ok(s) => s,
                    Err(e) => {
                        if let Some(more) = errors.due() {
                            eprintln!("ufvmm: incoming: accept failed: {e}{more}");
                        }
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                let Some(slot) = Slot::claim(&busy2, MAX_HANDSHAKES) else {
                    let peer = s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
                    refuse(
                        &s,
                        &peer,
                        ErrorCode::Busy,
                        "too many connections saying hello at once",
                    );
                    continue;
                };
                let (tx, verdicts) = (tx.clone(), verdicts.clone());
                // The slot goes with the thread (or with the closure, if it cannot start):
                // it is given back however the handshake ends, a panic included.
                let _ = std::thread::Builder::new()
                    .name("ufvmm-hello".into())
                    .spawn(move || {
                        let _slot = slot;
                        handshake(s, &tx, &verdicts);
                    });
            }
        })
        .map_err(VmError::Thread)?;
    Ok(busy)
}

/// One handshake's place among the [`MAX_HANDSHAKES`]; given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A place, if fewer than `max` are taken.
    fn claim(busy: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        busy.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(busy.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Says a repeated message at most once per period; counts the ones it held back.
struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            held: 0,
        }
    }

    /// `Some(suffix)` if the message is to be said now (the suffix counts the ones
    /// held back since the last), `None` to hold this one back.
    fn due(&mut self) -> Option<String> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        let more = match std::mem::take(&mut self.held) {
            0 => String::new(),
            n => format!(" (and {n} more times since the last report)"),
        };
        Some(more)
    }
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
                        page_size,
                        session,
                        channel,
                        resume,
                    },
                    _,
                )) => {
                    return Ok(Hi {
                        mem_size,
                        vcpus,
                        page_size,
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

/// The refusal of a first frame that is no hello of this version. One whose header
/// names another version is refused as that version (bad-version) whatever its length,
/// though one too long to read and check whole cannot be vouched for.
fn not_a_hello(frame: &[u8]) -> Refusal {
    match wire::header_version(frame) {
        Some(peer) if peer != wire::VERSION => Refusal::Code(
            ErrorCode::BadVersion,
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
    refuse_quietly(s, code, why);
}

/// As [`refuse`], without a line of its own (the caller says it once).
pub(super) fn refuse_quietly(s: &TcpStream, code: ErrorCode, why: &str) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handshake_that_panics_gives_its_slot_back() {
        let busy = Arc::new(AtomicUsize::new(0));
        let slots: Vec<Slot> = (0..3).filter_map(|_| Slot::claim(&busy, 3)).collect();
        assert_eq!(slots.len(), 3);
        assert!(Slot::claim(&busy, 3).is_none(), "a fourth slot of three");
        let mut slots = slots.into_iter();
        let one = slots.next().expect("a slot");
        let r = std::thread::spawn(move || {
            let _slot = one;
            panic!("a handshake panics");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(busy.load(Ordering::Acquire), 2);
        assert!(
            Slot::claim(&busy, 3).is_some(),
            "the slot was not given back"
        );
        drop(slots);
        assert_eq!(busy.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_repeated_message_is_said_once_per_period_with_a_count() {
        let mut t = Throttle::new(Duration::from_millis(200));
        assert_eq!(t.due().as_deref(), Some(""));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        std::thread::sleep(Duration::from_millis(250));
        let said = t.due().expect("due again");
        assert!(said.contains("2 more times"), "{said}");
        assert_eq!(t.due(), None);
    }
}
