//! The fault layer: one path for every missing page.
//!
//! vCPU touches a missing page -> the kernel queues a userfaultfd event -> the
//! [`handler`] loop asks the page source (through the link model) -> copies the page in
//! -> the copy wakes every waiter. VMM threads that need guest memory take the same
//! path through [`get_guest_pages`], which asks the loop and waits on the page-state
//! map, never inside a page fault.

mod ahead;
pub mod handler;
pub mod latency;
pub mod outcome;
pub mod prefetch;
mod supply;
pub mod timing;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use vmm_sys_util::eventfd::EventFd;

pub use outcome::{FaultOutcome, GupFlags, PageOps, Signal};

use crate::memory::{GuestRam, PageState};

/// Errors of the fault layer.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The wake-up eventfd could not be made.
    #[error("cannot create the fault layer's eventfd: {0}")]
    EventFd(std::io::Error),
    /// poll(2) on the userfaultfd failed.
    #[error("polling the userfaultfd failed: {0}")]
    Poll(std::io::Error),
    /// Reading userfaultfd events failed.
    #[error("reading userfaultfd events failed: {0}")]
    Read(userfaultfd::Error),
    /// Installing a page failed.
    #[error(transparent)]
    Install(#[from] crate::memory::MemoryError),
}

/// A request to the fault loop.
pub enum Request {
    /// Pages a VMM thread needs.
    Fetch {
        /// Page indexes, each moved Missing -> Requested by the requester.
        pages: Vec<usize>,
        /// The caller will write them.
        write: bool,
        /// When they were asked for.
        at: Instant,
    },
    /// End the loop.
    Stop,
}

/// Counters of the fault layer (read by status, stats and the report).
pub struct FaultStats {
    /// Pages installed.
    pub served: AtomicU64,
    /// Of those, pages that were all zeros.
    pub zero: AtomicU64,
    /// Faults from threads that are not vCPUs (should stay 0: the VMM uses GUP).
    pub vmm_faults: AtomicU64,
    /// Pages the source failed to read.
    pub lost: AtomicU64,
    /// Pages asked for that the link will never deliver.
    pub never: AtomicU64,
    /// Pages installed before the vCPUs ran, past the link model, because the page
    /// walk or event delivery needs them (see `vcpu::critical`).
    pub critical: AtomicU64,
    /// Pages poisoned to move vCPU page waits to user space (rule 7).
    pub escalated: AtomicU64,
    /// Pages that arrived again after they were installed (migration), and were dropped.
    pub duplicates: AtomicU64,
    /// Precopy pages dropped at switch-over because the source wrote them again.
    pub discarded: AtomicU64,
    /// Microseconds from a fault (or request) being seen to its page being installed.
    pub latency: Mutex<latency::Latency>,
    /// Read-ahead and background fill: what is in force and what they installed.
    pub policy: prefetch::PolicyStats,
    /// Where a fault's time goes (see [`timing`]).
    pub timing: Mutex<timing::FaultTiming>,
}

impl FaultStats {
    fn new(vcpus: usize) -> Self {
        FaultStats {
            served: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            vmm_faults: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            never: AtomicU64::new(0),
            escalated: AtomicU64::new(0),
            critical: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            latency: Mutex::new(latency::Latency::new()),
            policy: Default::default(),
            timing: Mutex::new(timing::FaultTiming::new(vcpus)),
        }
    }
}

/// A latency histogram in microseconds, 1 µs to 1 hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts; fall back to auto-resizing.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| {
        let mut h = Histogram::new(3).unwrap_or_else(|_| unreachable!("3 sigfigs is valid"));
        h.auto(true);
        h
    })
}

/// The fault layer as other parts see it: page states, requests, waiting.
pub struct FaultLayer {
    /// Guest RAM and its page-state map.
    pub ram: Arc<GuestRam>,
    tx: Mutex<Sender<Request>>,
    wake: Arc<EventFd>,
    /// Counters.
    pub stats: FaultStats,
}

impl FaultLayer {
    /// A fault layer over `ram` for `vcpus` vCPUs, and the receiving end for its loop.
    pub fn new(
        ram: Arc<GuestRam>,
        vcpus: usize,
    ) -> Result<(Arc<Self>, Receiver<Request>), FaultError> {
        let (tx, rx) = channel();
        let wake =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(FaultError::EventFd)?;
        Ok((
            Arc::new(FaultLayer {
                ram,
                tx: Mutex::new(tx),
                wake: Arc::new(wake),
                stats: FaultStats::new(vcpus),
            }),
            rx,
        ))
    }

    fn send(&self, req: Request) {
        // A send fails only once the loop has ended; then nothing will arrive anyway and
        // waiters end through their signal predicate.
        let _ = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(req);
        let _ = self.wake.write(1);
    }

    /// Asks the loop to end.
    pub fn stop(&self) {
        self.send(Request::Stop);
    }

    /// The eventfd the loop polls for requests.
    pub(crate) fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// The loop's eventfd, for a remote source whose arrivals must wake the loop.
    pub fn wake_handle(&self) -> Arc<EventFd> {
        self.wake.clone()
    }

    /// Makes `gpa..gpa+len` present (see [`outcome::get_guest_pages`]).
    pub fn get_guest_pages(
        &self,
        gpa: u64,
        len: usize,
        flags: GupFlags,
        signal: &dyn Fn() -> Signal,
    ) -> FaultOutcome {
        outcome::get_guest_pages(self, gpa, len, flags, signal)
    }

    /// Reads guest memory through [`FaultLayer::get_guest_pages`].
    pub fn read(
        &self,
        gpa: u64,
        buf: &mut [u8],
        flags: GupFlags,
        signal: &dyn Fn() -> Signal,
    ) -> FaultOutcome {
        match self.get_guest_pages(gpa, buf.len(), flags, signal) {
            FaultOutcome::Done => match self.ram.read_present(gpa, buf) {
                Ok(()) => FaultOutcome::Done,
                Err(_) => FaultOutcome::BadAddress,
            },
            other => other,
        }
    }

    /// Wakes VMM threads waiting for pages so they re-check their signal predicate.
    pub fn poke_waiters(&self) {
        self.ram.pages.notify();
    }
}

impl PageOps for FaultLayer {
    fn page_range(&self, gpa: u64, len: usize) -> Option<Range<usize>> {
        self.ram.page_range(gpa, len).ok()
    }

    fn state(&self, idx: usize) -> PageState {
        self.ram.pages.get(idx)
    }

    fn request(&self, pages: Range<usize>, write: bool) {
        // Only pages this caller moved Missing -> Requested go to the loop; a page in
        // flight is already queued and its arrival wakes us too.
        let won: Vec<usize> = pages.filter(|&i| self.ram.pages.try_request(i)).collect();
        if !won.is_empty() {
            self.send(Request::Fetch {
                pages: won,
                write,
                at: Instant::now(),
            });
        }
    }

    fn wait(&self, pages: &Range<usize>, stop: &dyn Fn() -> bool) {
        // The timeout only bounds the cost of a lost notify; wake-ups are re-checked.
        let there = || pages.clone().all(|i| self.state(i) == PageState::Present);
        self.ram.pages.wait(Duration::from_millis(50), there, stop);
    }
}

/// Increments a counter.
pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
