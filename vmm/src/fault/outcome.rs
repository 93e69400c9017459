//! `get_guest_pages`: the VMM's only way to touch guest memory, and the rules it keeps.
//!
//! Shaped after the kernel's GUP retry loop:
//! - one attempt ([`fault_once`]) returns one outcome; if it slept, it reports only
//!   `Retry` (rule 1);
//! - the loop checks the signal predicate before every retry (rule 2);
//! - only interruptible callers are stopped by a kick; a no-wait caller never sleeps
//!   (rule 3); a shutdown (the "fatal signal") stops everyone who sleeps;
//! - a wake-up proves nothing: the next attempt re-reads the page states (rule 4).
//!
//! The logic works on a [`PageOps`], so the rules are unit-tested here; the real
//! implementation over userfaultfd is [`crate::fault::FaultLayer`].

use std::ops::Range;

use crate::memory::PageState;

/// What a call to `get_guest_pages` came to. One value, never a mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Every page of the range is present.
    Done,
    /// Not yet: ask again (only a no-wait caller sees this from `get_guest_pages`).
    Retry,
    /// A signal (kick or shutdown) ended the wait; redo the work later.
    Interrupted,
    /// The range is not (entirely) guest RAM.
    BadAddress,
    /// A page of the range can never arrive.
    SourceLost,
}

/// How the caller wants to wait.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GupFlags {
    /// The caller will write (pages are made writable on arrival).
    pub write: bool,
    /// The caller can redo its work later, so a kick may end its wait.
    pub interruptible: bool,
    /// Never sleep: ask for the pages and return `Retry` if any is not there.
    pub nowait: bool,
}

/// A pending "signal" as seen by a waiting VMM thread (the user-space analogue of the
/// kernel's `fault_signal_pending()` inputs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Nothing pending.
    None,
    /// A kick (pause, status, ...): ends interruptible waits only.
    Kick,
    /// The VM is going away: ends every wait.
    Fatal,
}

/// The one predicate that decides whether a signal ends a wait (rule 2).
pub fn fault_signal_pending(flags: GupFlags, sig: Signal) -> bool {
    match sig {
        Signal::None => false,
        Signal::Kick => flags.interruptible,
        Signal::Fatal => true,
    }
}

/// What `get_guest_pages` needs from the fault layer.
pub trait PageOps {
    /// Page-index range of `gpa..gpa+len`, or `None` if it is not all guest RAM.
    fn page_range(&self, gpa: u64, len: usize) -> Option<Range<usize>>;
    /// Current state of a page.
    fn state(&self, idx: usize) -> PageState;
    /// Ask the page source for whichever pages of `pages` nobody asked for yet.
    fn request(&self, pages: Range<usize>, write: bool);
    /// Sleep until a page of `pages` may have changed, or `stop()` holds; may return
    /// early for no reason.
    fn wait(&self, pages: &Range<usize>, stop: &dyn Fn() -> bool);
}

/// One attempt: `Done`, `SourceLost`, or (after asking and, unless no-wait, waiting
/// once) `Retry`.
pub fn fault_once(
    ops: &dyn PageOps,
    pages: &Range<usize>,
    flags: GupFlags,
    signal: &dyn Fn() -> Signal,
) -> FaultOutcome {
    let mut missing = false;
    for idx in pages.clone() {
        match ops.state(idx) {
            PageState::Present => {}
            PageState::Lost => return FaultOutcome::SourceLost,
            PageState::Missing | PageState::Requested => missing = true,
        }
    }
    if !missing {
        return FaultOutcome::Done;
    }
    ops.request(pages.clone(), flags.write);
    if !flags.nowait {
        let all_there = || pages.clone().all(|i| ops.state(i) == PageState::Present);
        ops.wait(pages, &|| {
            all_there() || fault_signal_pending(flags, signal())
        });
    }
    // Whatever the wait ended with, we only say "retry" (rule 1).
    FaultOutcome::Retry
}

/// Makes `gpa..gpa+len` present, the GUP way. See the module docs for the rules.
pub fn get_guest_pages(
    ops: &dyn PageOps,
    gpa: u64,
    len: usize,
    flags: GupFlags,
    signal: &dyn Fn() -> Signal,
) -> FaultOutcome {
    let Some(pages) = ops.page_range(gpa, len) else {
        return FaultOutcome::BadAddress;
    };
    loop {
        match fault_once(ops, &pages, flags, signal) {
            FaultOutcome::Retry if flags.nowait => return FaultOutcome::Retry,
            FaultOutcome::Retry => {
                if fault_signal_pending(flags, signal()) {
                    return FaultOutcome::Interrupted;
                }
            }
            done_or_error => return done_or_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A scripted page table: what each wait does is up to the test.
    struct Fake {
        states: RefCell<Vec<PageState>>,
        requests: Cell<usize>,
        waits: Cell<usize>,
        on_wait: Box<dyn Fn(&Fake)>,
    }

    impl Fake {
        fn new(states: Vec<PageState>, on_wait: impl Fn(&Fake) + 'static) -> Self {
            Fake {
                states: RefCell::new(states),
                requests: Cell::new(0),
                waits: Cell::new(0),
                on_wait: Box::new(on_wait),
            }
        }
    }

    impl PageOps for Fake {
        fn page_range(&self, gpa: u64, len: usize) -> Option<Range<usize>> {
            let n = self.states.borrow().len() as u64 * 4096;
            let end = gpa.checked_add(len as u64).filter(|&e| e <= n && len > 0)?;
            Some((gpa / 4096) as usize..end.div_ceil(4096) as usize)
        }
        fn state(&self, idx: usize) -> PageState {
            self.states.borrow()[idx]
        }
        fn request(&self, pages: Range<usize>, _write: bool) {
            self.requests.set(self.requests.get() + 1);
            for i in pages {
                let mut s = self.states.borrow_mut();
                if s[i] == PageState::Missing {
                    s[i] = PageState::Requested;
                }
            }
        }
        fn wait(&self, _pages: &Range<usize>, _stop: &dyn Fn() -> bool) {
            self.waits.set(self.waits.get() + 1);
            (self.on_wait)(self);
        }
    }

    const P: PageState = PageState::Present;
    const M: PageState = PageState::Missing;
    const ASYNC: GupFlags = GupFlags {
        write: false,
        interruptible: true,
        nowait: false,
    };
    const PLAIN: GupFlags = GupFlags {
        write: false,
        interruptible: false,
        nowait: false,
    };
    const NOWAIT: GupFlags = GupFlags {
        write: false,
        interruptible: true,
        nowait: true,
    };

    #[test]
    fn present_pages_are_done_without_asking() {
        let f = Fake::new(vec![P, P], |_| panic!("must not wait"));
        assert_eq!(
            get_guest_pages(&f, 0, 8192, PLAIN, &|| Signal::None),
            FaultOutcome::Done
        );
        assert_eq!(f.requests.get(), 0);
    }

    #[test]
    fn bad_ranges_are_bad_addresses() {
        let f = Fake::new(vec![P], |_| {});
        for (gpa, len) in [(4096, 1), (0, 0), (u64::MAX, 2), (4000, 200)] {
            assert_eq!(
                get_guest_pages(&f, gpa, len, PLAIN, &|| Signal::None),
                FaultOutcome::BadAddress
            );
        }
    }

    #[test]
    fn spurious_wakeups_are_harmless() {
        // Three empty wake-ups, then the page arrives on the fourth.
        let f = Fake::new(vec![M], |f| {
            if f.waits.get() == 4 {
                f.states.borrow_mut()[0] = P;
            }
        });
        assert_eq!(
            get_guest_pages(&f, 0, 1, PLAIN, &|| Signal::None),
            FaultOutcome::Done
        );
        assert_eq!(f.waits.get(), 4);
    }

    #[test]
    fn a_waited_attempt_reports_only_retry() {
        // Even when the page turns poisoned during the wait, the attempt that waited says
        // retry; the next attempt reports the loss.
        let f = Fake::new(vec![M], |f| f.states.borrow_mut()[0] = PageState::Lost);
        let pages = 0..1;
        assert_eq!(
            fault_once(&f, &pages, PLAIN, &|| Signal::None),
            FaultOutcome::Retry
        );
        assert_eq!(
            fault_once(&f, &pages, PLAIN, &|| Signal::None),
            FaultOutcome::SourceLost
        );
        let g = Fake::new(vec![M], |f| f.states.borrow_mut()[0] = PageState::Lost);
        assert_eq!(
            get_guest_pages(&g, 0, 1, PLAIN, &|| Signal::None),
            FaultOutcome::SourceLost
        );
    }

    #[test]
    fn signals_are_checked_before_every_retry() {
        // The page never comes; a kick arrives during the third wait.
        let kicked = std::rc::Rc::new(Cell::new(false));
        let k2 = kicked.clone();
        let f = Fake::new(vec![M], move |f| k2.set(f.waits.get() >= 3));
        let sig = || {
            if kicked.get() {
                Signal::Kick
            } else {
                Signal::None
            }
        };
        assert_eq!(
            get_guest_pages(&f, 0, 1, ASYNC, &sig),
            FaultOutcome::Interrupted
        );
        assert_eq!(
            f.waits.get(),
            3,
            "must stop at the first retry after the kick"
        );
    }

    #[test]
    fn kicks_do_not_stop_uninterruptible_callers_but_fatal_does() {
        let f = Fake::new(vec![M], |f| {
            if f.waits.get() == 5 {
                f.states.borrow_mut()[0] = P;
            }
        });
        assert_eq!(
            get_guest_pages(&f, 0, 1, PLAIN, &|| Signal::Kick),
            FaultOutcome::Done
        );
        let g = Fake::new(vec![M], |_| {});
        assert_eq!(
            get_guest_pages(&g, 0, 1, PLAIN, &|| Signal::Fatal),
            FaultOutcome::Interrupted
        );
        assert_eq!(g.waits.get(), 1);
    }

    #[test]
    fn nowait_callers_never_sleep() {
        let f = Fake::new(vec![P, M], |_| panic!("a no-wait caller slept"));
        assert_eq!(
            get_guest_pages(&f, 0, 8192, NOWAIT, &|| Signal::None),
            FaultOutcome::Retry
        );
        assert_eq!(f.requests.get(), 1);
        assert_eq!(
            f.state(1),
            PageState::Requested,
            "the page was still asked for"
        );
    }
}
