//! The destination before its migration: it waits for the first main-channel hello of
//! a session it may take, tells every source whose guest never started here so (and
//! keeps its word: a session once told so is never taken), and ends on `quit` or a
//! signal, answering the connections still arriving as it goes.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::json;

use super::incoming::{refuse_never_started, Ev, Hi, Options, EXIT_GRACE, EXIT_GRACE_MAX};
use super::listener::{refuse, refuse_quietly};
use super::verdicts::Verdicts;
use super::wire::{ErrorCode, CHANNEL_MAIN};
use crate::vm::shared::VmEvent;
use crate::vm::{Plumbing, VmError};

/// Most connections kept while waiting for their session's main hello.
const MAX_EARLY: usize = 16;

/// A connection that said hello: the hello, the stream and the peer's address.
pub(super) type Conn = (Hi, TcpStream, String);

/// How waiting ended.
pub(super) enum Waited {
    /// The first main-channel hello of a session taken here, and the connections of
    /// any session that came before it.
    Hello(Conn, Vec<Conn>),
    /// The destination ended with no migration: its exit code.
    Ended(i32),
}

/// What the waiting destination answers with and ends by.
pub(super) struct Waiting<'a> {
    /// Its options.
    pub opts: &'a Options,
    /// Its listen address.
    pub local: SocketAddr,
    /// When it started.
    pub started: Instant,
    /// The listener's connections.
    pub rx: &'a Receiver<Ev>,
    /// Its word to every session.
    pub verdicts: &'a Verdicts,
    /// Handshakes in progress.
    pub busy: &'a AtomicUsize,
}

impl Waiting<'_> {
    /// Waits for the first main-channel hello of a session it may take.
    pub(super) fn wait(&self, p: &Plumbing) -> Result<Waited, VmError> {
        let mut early: Vec<Conn> = Vec::new();
        loop {
            let sig = match p.rx.try_recv() {
                Ok(VmEvent::Quit) => Some(None),
                Ok(VmEvent::Signal(sig)) => Some(Some(sig)),
                _ => match p.interrupted.load(Ordering::Acquire) {
                    0 => None,
                    sig => Some(Some(sig)),
                },
            };
            if let Some(sig) = sig {
                return Ok(Waited::Ended(self.end(sig, early)));
            }
            let (hi, s, peer) = match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ev::Conn(hi, s, peer)) => (hi, s, peer),
                Ok(_) | Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(VmError::Thread(std::io::Error::other("the listener ended")))
                }
            };
            if hi.resume {
                // A source that lost its link in switch-over asks whether the guest
                // started: it did not, and now never will.
                refuse_never_started(self.verdicts, &hi, &s, &peer, "");
                self.drop_early(&mut early, hi.session);
            } else if self.verdicts.denied(hi.session) {
                // Late (a slow network, say): this session was told its guest never
                // started here, and the source runs it on. It must never start here.
                refuse_never_started(
                    self.verdicts,
                    &hi,
                    &s,
                    &peer,
                    " (this destination said so to this migration already)",
                );
            } else if hi.channel != CHANNEL_MAIN {
                if early.len() >= MAX_EARLY {
                    refuse(
                        &s,
                        &peer,
                        ErrorCode::Busy,
                        "too many connections waiting for their migration",
                    );
                } else {
                    early.push((hi, s, peer));
                }
            } else if self.verdicts.take(hi.session) {
                return Ok(Waited::Hello((hi, s, peer), early));
            } else {
                refuse_never_started(self.verdicts, &hi, &s, &peer, "");
            }
        }
    }

    /// Refuses the migration of `first` (the main hello just taken) with `code`: it, the
    /// connections waiting, and every connection that comes for [`EXIT_GRACE`] more
    /// (the source's urgent one follows its main one, and must read the refusal too,
    /// not find nobody listening), and while handshakes are still in progress (up to
    /// [`EXIT_GRACE_MAX`]). Says nothing itself: the caller's error is the one line.
    pub(super) fn refuse_all(&self, first: Conn, early: Vec<Conn>, code: ErrorCode, why: &str) {
        let start = Instant::now();
        for (_, s, _) in std::iter::once(first).chain(early) {
            refuse_quietly(&s, code, why);
        }
        loop {
            let waited = start.elapsed();
            let busy = self.busy.load(Ordering::Acquire) > 0;
            let last = waited >= EXIT_GRACE_MAX || (waited >= EXIT_GRACE && !busy);
            while let Ok(ev) = self.rx.try_recv() {
                if let Ev::Conn(_, s, _) = ev {
                    refuse_quietly(&s, code, why);
                }
            }
            if last {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Refuses the early connections of `session`, now told its guest never started.
    fn drop_early(&self, early: &mut Vec<Conn>, session: u64) {
        let (gone, kept): (Vec<Conn>, Vec<Conn>) =
            early.drain(..).partition(|(hi, ..)| hi.session == session);
        *early = kept;
        for (hi, s, peer) in gone {
            refuse_never_started(self.verdicts, &hi, &s, &peer, "");
        }
    }

    /// Ends a destination that no migration reached (`quit`, or signal `sig`): tells
    /// every connection waiting, and those still saying hello (for up to
    /// [`EXIT_GRACE_MAX`]), that their guest never started here; then the summary, a
    /// report that says there was no VM, and the exit code.
    fn end(&self, sig: Option<i32>, early: Vec<Conn>) -> i32 {
        for (hi, s, peer) in early {
            refuse_never_started(self.verdicts, &hi, &s, &peer, "");
        }
        let deadline = Instant::now() + EXIT_GRACE_MAX;
        loop {
            // A handshake hands its connection over before it counts as done: look at
            // the count first, then answer everything already handed over.
            let last = self.busy.load(Ordering::Acquire) == 0 || Instant::now() >= deadline;
            while let Ok(ev) = self.rx.try_recv() {
                if let Ev::Conn(hi, s, peer) = ev {
                    refuse_never_started(self.verdicts, &hi, &s, &peer, "");
                }
            }
            if last {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        end_waiting(self.opts, &self.local, self.started, sig)
    }
}

/// The summary, a report that says there was no VM, and the exit code of a destination
/// that no migration reached (`quit`, or signal `sig`).
fn end_waiting(opts: &Options, listen: &SocketAddr, started: Instant, sig: Option<i32>) -> i32 {
    let end = crate::control::report::Ending::stopped(sig);
    let reason = format!("{} while waiting for a migration (no VM)", end.reason);
    eprintln!("ufvmm: {reason}");
    let mut code = end.exit_code;
    if let Some(path) = opts.report.as_deref() {
        let doc = crate::control::report::report_without_vm(
            &reason,
            code,
            started.elapsed().as_millis() as u64,
            json!({"incoming": listen.to_string(), "uffd": true}),
            json!({"role": "destination", "state": "waiting", "listen": listen.to_string()}),
        );
        if let Err(e) = crate::control::report::write(path, &doc) {
            eprintln!("ufvmm: error: --report {}: {e}", path.display());
            code = code.max(1);
        }
    }
    if let Some(path) = opts.api_sock.as_deref() {
        let _ = std::fs::remove_file(path);
    }
    code
}
