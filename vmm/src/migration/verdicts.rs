//! What a destination has told sources about their guests, kept so that it never
//! contradicts itself: once it has told a session that its guest never started here, it
//! never starts that guest; once it has started one, it never says it did not.
//!
//! A destination takes at most one migration: the first main-channel hello it accepts
//! ([`Verdicts::take`]). Once one is taken, every other session is "not started here"
//! for good; before that, the sessions told so are remembered, up to [`MAX_DENIED`].
//! Past that it takes no migration at all, since it could no longer keep its word.
//! Every answer that says "never started" goes through [`Verdicts::deny`], and the
//! guest starts only through [`Verdicts::start`], under one lock.

use std::collections::HashSet;
use std::sync::Mutex;

/// Most sessions remembered as told "never started" before a migration is taken.
/// (8 bytes each: a peer that sends that many made-up sessions costs about 1 MiB.)
pub(super) const MAX_DENIED: usize = 65536;

/// The destination's word to every session (shared by the listener, the waiting loop
/// and the session thread).
#[derive(Debug, Default)]
pub(super) struct Verdicts(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    /// The session this destination took, once it has.
    taken: Option<u64>,
    /// The taken session's guest started here.
    started: bool,
    /// The taken session was told its guest never started here.
    taken_denied: bool,
    /// Sessions told "never started" before any was taken.
    denied: HashSet<u64>,
    /// More sessions were told so than `denied` holds: none may be taken now.
    overflowed: bool,
    /// The destination is ending: no guest starts here any more.
    stopping: bool,
}

/// Whether the taken session's guest may start here ([`Verdicts::start`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Start {
    /// Yes: it counts as started from now on.
    Go,
    /// No: it was told it never would (or is not the one taken).
    Denied,
    /// No: the destination is ending, and will say so.
    Stopping,
}

impl Verdicts {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `session` as this destination's migration. False if one was taken already,
    /// or this one was told its guest never started here (or too many were to tell).
    pub(super) fn take(&self, session: u64) -> bool {
        let mut st = self.state();
        if st.taken.is_some() || st.overflowed || st.denied.contains(&session) {
            return false;
        }
        st.taken = Some(session);
        true
    }

    /// Records that `session` is told its guest never started here, before it is told.
    /// False if that guest did start here: then it must not be told so.
    pub(super) fn deny(&self, session: u64) -> bool {
        let mut st = self.state();
        match st.taken {
            Some(s) if s == session => {
                if st.started {
                    return false;
                }
                st.taken_denied = true;
            }
            // Another migration was taken: this one can never start here.
            Some(_) => {}
            None => {
                if st.denied.len() < MAX_DENIED {
                    st.denied.insert(session);
                } else if !st.denied.contains(&session) && !st.overflowed {
                    st.overflowed = true;
                    eprintln!(
                        "ufvmm: incoming: {MAX_DENIED} sessions were told their guest never \
                         started here, more than it can remember: it takes no migration now"
                    );
                }
            }
        }
        true
    }

    /// True if `session` has been told (or, another being taken, counts as told) that
    /// its guest never started here.
    pub(super) fn denied(&self, session: u64) -> bool {
        let st = self.state();
        match st.taken {
            Some(s) if s == session => st.taken_denied,
            Some(_) => true,
            None => st.overflowed || st.denied.contains(&session),
        }
    }

    /// Marks the taken session's guest as started, before it starts, unless it was
    /// told it never would be here or the destination is ending.
    pub(super) fn start(&self, session: u64) -> Start {
        let mut st = self.state();
        if st.taken != Some(session) || st.taken_denied {
            return Start::Denied;
        }
        if st.stopping {
            return Start::Stopping;
        }
        st.started = true;
        Start::Go
    }

    /// The destination is ending: from now on no guest starts here. A start decided
    /// before this stands (the guest then ends with the VM, as any running guest does);
    /// one after it is refused, and the source is told its guest never started.
    pub(super) fn stop(&self) {
        self.state().stopping = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_guest_starts_once_the_destination_is_ending() {
        let v = Verdicts::default();
        assert!(v.take(3));
        v.stop();
        assert_eq!(v.start(3), Start::Stopping);
        assert!(v.deny(3), "a guest that never started may be told so");
        assert_eq!(v.start(3), Start::Denied);
    }

    #[test]
    fn a_session_told_never_started_is_never_taken_nor_started() {
        let v = Verdicts::default();
        assert!(v.deny(7));
        assert!(v.denied(7));
        assert!(!v.take(7), "a denied session was taken");
        assert_eq!(v.start(7), Start::Denied);
        assert!(v.take(8), "another session may still be taken");
        assert!(v.denied(7), "once 8 is taken, 7 stays denied");
    }

    #[test]
    fn the_taken_session_starts_once_and_is_then_never_denied() {
        let v = Verdicts::default();
        assert!(v.take(1));
        assert!(!v.take(1), "taken twice");
        assert!(!v.take(2), "a second migration was taken");
        assert!(v.denied(2));
        assert!(!v.denied(1));
        assert_eq!(v.start(1), Start::Go);
        assert!(!v.deny(1), "a started guest was told it never started");
        assert!(!v.denied(1));
        assert!(v.deny(2));
    }

    #[test]
    fn the_taken_session_once_denied_never_starts() {
        let v = Verdicts::default();
        assert!(v.take(1));
        assert!(v.deny(1));
        assert!(v.denied(1));
        assert_eq!(
            v.start(1),
            Start::Denied,
            "started after saying it never would"
        );
    }

    #[test]
    fn past_the_bound_nothing_is_taken() {
        let v = Verdicts::default();
        for s in 0..MAX_DENIED as u64 {
            assert!(v.deny(s));
        }
        assert!(v.deny(0), "one already recorded does not overflow");
        assert!(
            v.take(u64::MAX - 1),
            "at the bound, others may still be taken"
        );
        let v = Verdicts::default();
        for s in 0..=MAX_DENIED as u64 {
            assert!(v.deny(s));
        }
        // The last one could not be recorded: no session may be taken any more.
        assert!(v.denied(u64::MAX));
        assert!(!v.take(MAX_DENIED as u64));
        assert!(!v.take(u64::MAX));
    }
}
