//! The page-state map: one byte per guest page that every part of the VMM consults:
//! its [`PageState`] in bits 0..2 and its [`Marker`] in bits 2..4, so that a page costs
//! one byte however large RAM grows (1 TiB: 256 MiB).
//!
//! The fault layer is the only writer of `Requested -> Present`; anybody may move a page
//! `Missing -> Requested` (whoever wins the compare-and-swap sends the request).
//! Threads of the VMM that need a page wait here, never inside a page fault.

use std::sync::atomic::{fence, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The state of one guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Not in guest RAM yet and nobody asked for it.
    Missing = 0,
    /// Asked of the page source; not arrived yet.
    Requested = 1,
    /// Will never arrive (the source lost it, or the link never delivers it).
    Lost = 2,
    /// In guest RAM.
    Present = 3,
}

/// Bits of a page's byte that hold its [`PageState`].
const STATE_BITS: u8 = 0b11;
/// Where its [`Marker`] starts.
const MARKER_SHIFT: u32 = 2;

impl PageState {
    fn from_u8(v: u8) -> PageState {
        match v & STATE_BITS {
            0 => PageState::Missing,
            1 => PageState::Requested,
            2 => PageState::Lost,
            _ => PageState::Present,
        }
    }
}

/// Whether ufvmm poisoned a page (`UFFDIO_POISON`) to end a page wait no signal
/// reaches (rule 7): every access to a page that carries the marker fails at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Marker {
    /// Never poisoned.
    Never = 0,
    /// The marker is in place (the page is still on its way).
    Set = 1,
    /// It was poisoned, and the marker is gone (the page arrived). Kept so that a late
    /// `SIGBUS` for it is still known for ufvmm's own.
    Cleared = 2,
}

/// One state per guest page, plus a place for VMM threads to wait for changes.
pub struct PageStateMap {
    /// Per page: its state, and whether ufvmm put a `UFFDIO_POISON` marker there
    /// ([`Marker`], from bit [`MARKER_SHIFT`]).
    states: Box<[AtomicU8]>,
    /// Paired with `changed`; guards nothing but the wait itself.
    lock: Mutex<()>,
    changed: Condvar,
    /// VMM threads inside [`PageStateMap::wait`]; the fault loop skips the notify
    /// (a lock and a syscall) when this is zero, which is the common case.
    waiters: AtomicUsize,
    /// Pages in `Present` state, kept by [`PageStateMap::set`] (the only way into or out
    /// of it), so "is every page here?" costs no scan of the map.
    present: AtomicUsize,
}

impl PageStateMap {
    /// A map of `pages` pages, all in `initial` state.
    pub fn new(pages: usize, initial: PageState) -> Self {
        let states = (0..pages).map(|_| AtomicU8::new(initial as u8)).collect();
        PageStateMap {
            states,
            lock: Mutex::new(()),
            changed: Condvar::new(),
            waiters: AtomicUsize::new(0),
            present: AtomicUsize::new(if initial == PageState::Present {
                pages
            } else {
                0
            }),
        }
    }

    /// Bytes the map holds for its pages (one each, allocated in full).
    pub fn allocated_bytes(&self) -> u64 {
        std::mem::size_of_val(&*self.states) as u64
    }

    /// Changes page `idx`'s byte with `f` (None: leave it), atomically with respect to
    /// the other half of the byte; true if it changed.
    fn update(&self, idx: usize, f: impl FnMut(u8) -> Option<u8>) -> bool {
        self.states.get(idx).is_some_and(|s| {
            s.fetch_update(Ordering::AcqRel, Ordering::Acquire, f)
                .is_ok()
        })
    }

    /// The marker bits of `v`.
    fn marker_of(v: u8) -> u8 {
        v >> MARKER_SHIFT
    }

    /// `v` with marker `m`.
    fn with_marker(v: u8, m: Marker) -> u8 {
        (v & STATE_BITS) | ((m as u8) << MARKER_SHIFT)
    }

    /// Number of pages in the map.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// True for a map of no pages.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// State of page `idx` (out-of-range pages read as `Lost`: never available).
    pub fn get(&self, idx: usize) -> PageState {
        self.states.get(idx).map_or(PageState::Lost, |s| {
            PageState::from_u8(s.load(Ordering::Acquire))
        })
    }

    /// Moves page `idx` from `Missing` to `Requested`. True if this caller did it and
    /// so must send the request; false if someone else already did, or it is present.
    pub fn try_request(&self, idx: usize) -> bool {
        self.update(idx, |v| {
            (v & STATE_BITS == PageState::Missing as u8)
                .then_some((v & !STATE_BITS) | PageState::Requested as u8)
        })
    }

    /// Sets page `idx` to `state` (its marker stays). Call [`PageStateMap::notify`]
    /// after a batch.
    pub fn set(&self, idx: usize, state: PageState) {
        let Some(s) = self.states.get(idx) else {
            return;
        };
        let new = state as u8;
        let old = s.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some((v & !STATE_BITS) | new)
        });
        let was = old.map_or(0, |v| v & STATE_BITS);
        let here = PageState::Present as u8;
        if was != here && new == here {
            self.present.fetch_add(1, Ordering::AcqRel);
        } else if was == here && new != here {
            self.present.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Pages present: [`PageStateMap::count`] of `Present`, without the scan.
    pub fn present(&self) -> usize {
        self.present.load(Ordering::Acquire)
    }

    /// Whether page `idx` carries, or carried, ufvmm's poison marker.
    pub fn marker(&self, idx: usize) -> Marker {
        match self
            .states
            .get(idx)
            .map(|m| Self::marker_of(m.load(Ordering::Acquire)))
        {
            Some(1) => Marker::Set,
            Some(2) => Marker::Cleared,
            _ => Marker::Never,
        }
    }

    /// Records that page `idx` now carries ufvmm's poison marker.
    pub fn set_marker(&self, idx: usize) {
        self.update(idx, |v| Some(Self::with_marker(v, Marker::Set)));
    }

    /// Takes back [`PageStateMap::set_marker`] for a poison that failed.
    pub fn unset_marker(&self, idx: usize) {
        self.update(idx, |v| {
            (Self::marker_of(v) == Marker::Set as u8).then_some(Self::with_marker(v, Marker::Never))
        });
    }

    /// Records that the marker of page `idx` is gone; true if one was there.
    pub fn clear_marker(&self, idx: usize) -> bool {
        self.update(idx, |v| {
            (Self::marker_of(v) == Marker::Set as u8)
                .then_some(Self::with_marker(v, Marker::Cleared))
        })
    }

    /// Counts pages in `state`.
    pub fn count(&self, state: PageState) -> usize {
        self.states
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) & STATE_BITS == state as u8)
            .count()
    }

    /// Wakes every VMM thread waiting in [`PageStateMap::wait`] (a state changed, or a
    /// waiter must re-check its signal predicate). Cheap when nobody waits.
    pub fn notify(&self) {
        // Orders our state stores before the load of `waiters`, against the waiter's
        // increment before its check (store-load on both sides).
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.changed.notify_all();
        }
    }

    /// Sleeps until `done()` holds, `stop()` holds, or `timeout` passes. Wake-ups may be
    /// spurious: the caller re-checks whatever it waits for (rule 4).
    pub fn wait(&self, timeout: Duration, done: impl Fn() -> bool, stop: impl Fn() -> bool) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock: a notify after this point cannot be missed.
        if !done() && !stop() {
            let _ = self.changed.wait_timeout(g, timeout);
        }
        self.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn request_is_won_once() {
        let m = PageStateMap::new(4, PageState::Missing);
        assert!(m.try_request(1));
        assert!(!m.try_request(1));
        assert_eq!(m.get(1), PageState::Requested);
        m.set(1, PageState::Present);
        assert!(!m.try_request(1));
        assert_eq!(m.get(1), PageState::Present);
        assert_eq!(m.count(PageState::Missing), 3);
    }

    #[test]
    fn a_marker_and_a_state_share_a_byte_without_disturbing_each_other() {
        let m = PageStateMap::new(2, PageState::Missing);
        assert_eq!(m.allocated_bytes(), 2);
        m.set_marker(0);
        assert_eq!((m.get(0), m.marker(0)), (PageState::Missing, Marker::Set));
        assert!(m.try_request(0));
        assert_eq!(m.marker(0), Marker::Set, "a request kept the marker");
        assert!(m.clear_marker(0));
        assert!(!m.clear_marker(0), "cleared once");
        m.set(0, PageState::Present);
        assert_eq!(
            (m.get(0), m.marker(0)),
            (PageState::Present, Marker::Cleared)
        );
        m.unset_marker(0);
        assert_eq!(
            m.marker(0),
            Marker::Cleared,
            "only a set marker is taken back"
        );
        m.set_marker(1);
        m.unset_marker(1);
        assert_eq!((m.get(1), m.marker(1)), (PageState::Missing, Marker::Never));
        assert_eq!(m.count(PageState::Present), 1);
        assert_eq!(m.present(), 1);
        assert_eq!(m.count(PageState::Missing), 1);
    }

    #[test]
    fn the_present_count_follows_every_way_in_and_out() {
        let m = PageStateMap::new(3, PageState::Missing);
        m.set(0, PageState::Present);
        m.set(0, PageState::Present); // already there: not twice
        m.set(1, PageState::Requested);
        assert_eq!(m.present(), 1);
        m.set(1, PageState::Present);
        m.set(0, PageState::Missing); // discarded after a precopy send
        m.set(2, PageState::Lost);
        assert_eq!(m.present(), m.count(PageState::Present));
        assert_eq!(m.present(), 1);
        assert_eq!(PageStateMap::new(5, PageState::Present).present(), 5);
    }

    #[test]
    fn out_of_range_is_never_available() {
        let m = PageStateMap::new(2, PageState::Missing);
        assert_eq!(m.get(2), PageState::Lost);
        assert!(!m.try_request(7));
        m.set(9, PageState::Present); // ignored, no panic
        assert_eq!(m.count(PageState::Present), 0);
        assert_eq!(m.present(), 0);
    }

    #[test]
    fn waiter_wakes_on_notify_and_rechecks() {
        let m = Arc::new(PageStateMap::new(1, PageState::Requested));
        let m2 = m.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let mut waits = 0;
            while m2.get(0) != PageState::Present {
                waits += 1;
                m2.wait(
                    Duration::from_secs(10),
                    || m2.get(0) == PageState::Present,
                    || false,
                );
            }
            (start.elapsed(), waits)
        });
        std::thread::sleep(Duration::from_millis(50));
        // A spurious wake-up first: the waiter must go back to sleep.
        m.notify();
        std::thread::sleep(Duration::from_millis(20));
        m.set(0, PageState::Present);
        m.notify();
        let (waited, waits) = t.join().unwrap();
        // The spurious notify woke it; it looked, and waited again.
        assert!(
            waits >= 2,
            "the spurious wake-up was not seen: {waits} waits"
        );
        assert!(
            waited < Duration::from_secs(5),
            "missed the notify: {waited:?}"
        );
    }
}
