//! The remote page source: a migration source process on the other end of a network.
//!
//! Unlike a local source it is asynchronous. The fault loop asks for pages through
//! [`Remote::ask`] (the migration session sends them as urgent requests) and takes what
//! arrives from [`Remote::arrivals`]: urgent answers and the background stream alike,
//! each already checksummed by the wire decoder. Whatever arrives, the fault loop alone
//! installs it, so a page arriving twice (asked for, and streamed) is installed once.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Something for the fault loop from the migration connection(s).
pub enum Arrival {
    /// Pages that follow each other in RAM, their bytes back to back in one buffer
    /// (the reader gathers them as the stream brings them), to go in with one copy.
    Run {
        /// Index of the first page.
        first: usize,
        /// The pages' bytes: a whole number of pages (give the buffer back with
        /// [`Remote::recycle`]).
        data: Vec<u8>,
        /// Sent before switch-over: a newer copy replaces an older one (no vCPU runs yet).
        precopy: bool,
        /// Sent because they were asked for.
        urgent: bool,
    },
    /// Pages of zeros that follow each other in RAM.
    Zeros {
        /// Index of the first page.
        first: usize,
        /// How many.
        n: usize,
        /// Sent before switch-over: a newer copy replaces an older one (no vCPU runs yet).
        precopy: bool,
        /// Sent because they were asked for.
        urgent: bool,
    },
    /// Pages to drop (written on the source after they were sent in precopy): one bit
    /// per page.
    Discard(Vec<u64>),
    /// Answered once everything before it has been handled.
    Barrier(SyncSender<()>),
}

/// The sending side, for the threads that read migration connections.
#[derive(Clone)]
pub struct ArrivalSender {
    tx: SyncSender<Arrival>,
    urgent: SyncSender<Arrival>,
    wake: Arc<EventFd>,
    spare: Spare,
}

/// Run buffers the fault loop is done with, for the readers to fill again: fresh heap
/// memory for every run made the kernel allocate and the reader first-touch pages it
/// had just freed (a third of the reader's time in page faults).
/// `None` once every page is in: nothing is kept from then on.
type Spare = Arc<Mutex<Option<Vec<Vec<u8>>>>>;

/// Most spare buffers kept (enough for the readers to keep going while the fault loop
/// installs; beyond them a run's buffer is freed).
const SPARE: usize = 8;

fn is_urgent(a: &Arrival) -> bool {
    matches!(
        a,
        Arrival::Zeros { urgent: true, .. } | Arrival::Run { urgent: true, .. }
    )
}

impl ArrivalSender {
    /// Hands `a` to the fault loop (blocking while it is behind: the network then backs
    /// up to the source). Pages sent because they were asked for go in a queue of their
    /// own, which the fault loop empties first. False once the fault loop has ended.
    pub fn send(&self, a: Arrival) -> bool {
        let q = if is_urgent(&a) {
            &self.urgent
        } else {
            &self.tx
        };
        let ok = q.send(a).is_ok();
        let _ = self.wake.write(1);
        ok
    }

    /// Frees the spare run buffers and keeps none from now on: every page is in.
    pub fn release_spare(&self) {
        *self.spare.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// An empty buffer for a run of at least `bytes`: one the fault loop gave back if
    /// there is one.
    pub fn buffer(&self, bytes: usize) -> Vec<u8> {
        let mut b = self
            .spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(Vec::pop)
            .unwrap_or_default();
        b.clear();
        b.reserve(bytes);
        b
    }
}

/// How many bytes of arrivals may wait for the fault loop. Few: a page asked for that
/// the stream already sent waits behind those queued before it. An arrival is a run of
/// pages with bytes, at most [`RUN_BYTES`] (32 of them at 4 KiB pages), or a run of zeros.
const QUEUE_BYTES: usize = 4 << 20;
/// Most bytes of pages a connection reader gathers into one [`Arrival::Run`] (at least
/// one page): 32 pages of 4 KiB.
pub const RUN_BYTES: usize = 128 * 1024;
/// Fewest arrivals that may wait, whatever their size (a few 2 MiB pages).
const QUEUE_MIN: usize = 4;

/// The fault loop's end of a migration.
pub struct Remote {
    /// Sends page requests (indexes the caller moved to `Requested`) to the session.
    pub ask: Box<dyn Fn(Vec<usize>) + Send>,
    /// Tells the session that an install just made every page present, so it ends the
    /// migration now, not at its next look (a guest ending meanwhile would report it
    /// unfinished).
    pub all_here: Box<dyn Fn() + Send>,
    /// What arrives in stream order (precopy, discards, background pages).
    pub arrivals: Receiver<Arrival>,
    /// Pages sent because they were asked for; taken before `arrivals`.
    pub urgent: Receiver<Arrival>,
    spare: Spare,
}

impl Remote {
    /// A remote source of pages of `page_size` bytes whose arrivals wake the fault loop
    /// through `wake` (the loop's request eventfd); returns the sender for the
    /// connection readers. The queues hold a bounded number of bytes, not of pages.
    pub fn new(
        ask: Box<dyn Fn(Vec<usize>) + Send>,
        all_here: Box<dyn Fn() + Send>,
        wake: Arc<EventFd>,
        page_size: u64,
    ) -> (Self, ArrivalSender) {
        let arrival = RUN_BYTES.max(page_size as usize);
        let queue = (QUEUE_BYTES / arrival).max(QUEUE_MIN);
        let (tx, arrivals) = sync_channel(queue);
        let (urgent_tx, urgent) = sync_channel(queue);
        let spare = Spare::new(Mutex::new(Some(Vec::new())));
        (
            Remote {
                ask,
                all_here,
                arrivals,
                urgent,
                spare: spare.clone(),
            },
            ArrivalSender {
                tx,
                urgent: urgent_tx,
                wake,
                spare,
            },
        )
    }

    /// Gives a run's buffer back to the readers (dropped when enough are spare).
    pub fn recycle(&self, buf: Vec<u8>) {
        let mut s = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = s.as_mut().filter(|s| s.len() < SPARE) {
            s.push(buf);
        }
    }
}
