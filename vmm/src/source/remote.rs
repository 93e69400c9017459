//! The remote page source: a migration source process on the other end of a network.
//!
//! Unlike a local source it is asynchronous. The fault loop asks for pages through
//! [`Remote::ask`] (the migration session sends them as urgent requests) and takes what
//! arrives from [`Remote::arrivals`]: urgent answers and the background stream alike,
//! each already checksummed by the wire decoder. Whatever arrives, the fault loop alone
//! installs it, so a page arriving twice (asked for, and streamed) is installed once.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Something for the fault loop from the migration connection(s).
pub enum Arrival {
    /// A page.
    Page {
        /// Page index.
        idx: usize,
        /// The bytes; `None` for a page of zeros.
        data: Option<Box<[u8]>>,
        /// Sent before switch-over: a newer copy replaces an older one (no vCPU runs yet).
        precopy: bool,
        /// Sent because it was asked for.
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
}

impl ArrivalSender {
    /// Hands `a` to the fault loop (blocking while it is behind: the network then backs
    /// up to the source). Pages sent because they were asked for go in a queue of their
    /// own, which the fault loop empties first. False once the fault loop has ended.
    pub fn send(&self, a: Arrival) -> bool {
        let q = match a {
            Arrival::Page { urgent: true, .. } => &self.urgent,
            _ => &self.tx,
        };
        let ok = q.send(a).is_ok();
        let _ = self.wake.write(1);
        ok
    }

    /// Like [`ArrivalSender::send`], but leaves waking the fault loop to a later
    /// [`ArrivalSender::wake`] (one wake for a run of arrivals, not one a page); only a
    /// full queue wakes it at once, so that the loop can make room.
    pub fn send_quiet(&self, a: Arrival) -> bool {
        let q = match a {
            Arrival::Page { urgent: true, .. } => &self.urgent,
            _ => &self.tx,
        };
        match q.try_send(a) {
            Ok(()) => true,
            Err(TrySendError::Disconnected(_)) => false,
            Err(TrySendError::Full(a)) => {
                let _ = self.wake.write(1);
                q.send(a).is_ok()
            }
        }
    }

    /// Wakes the fault loop for what [`ArrivalSender::send_quiet`] queued.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

/// How many bytes of arrivals may wait for the fault loop (128 pages of 4 KiB). Few: a
/// page asked for that the stream already sent waits behind those queued before it.
const QUEUE_BYTES: u64 = 128 * crate::abi::PAGE_SIZE;
/// Fewest arrivals that may wait, whatever their size (a few 2 MiB pages).
const QUEUE_MIN: usize = 4;

/// The fault loop's end of a migration.
pub struct Remote {
    /// Sends page requests (indexes the caller moved to `Requested`) to the session.
    pub ask: Box<dyn Fn(Vec<usize>) + Send>,
    /// What arrives in stream order (precopy, discards, background pages).
    pub arrivals: Receiver<Arrival>,
    /// Pages sent because they were asked for; taken before `arrivals`.
    pub urgent: Receiver<Arrival>,
}

impl Remote {
    /// A remote source of pages of `page_size` bytes whose arrivals wake the fault loop
    /// through `wake` (the loop's request eventfd); returns the sender for the
    /// connection readers. The queues hold a bounded number of bytes, not of pages.
    pub fn new(
        ask: Box<dyn Fn(Vec<usize>) + Send>,
        wake: Arc<EventFd>,
        page_size: u64,
    ) -> (Self, ArrivalSender) {
        let queue = ((QUEUE_BYTES / page_size.max(1)) as usize).max(QUEUE_MIN);
        let (tx, arrivals) = sync_channel(queue);
        let (urgent_tx, urgent) = sync_channel(queue);
        (
            Remote {
                ask,
                arrivals,
                urgent,
            },
            ArrivalSender {
                tx,
                urgent: urgent_tx,
                wake,
            },
        )
    }
}
