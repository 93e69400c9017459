//! The userfaultfd event loop: the one thread that resolves missing pages.
//!
//! Each turn: read fault events (faulting thread -> vCPU, mark it stalled), take
//! requests from VMM threads, ask the [`Supply`] for the pages (a local source through
//! the link model, or a remote migration source), install the pages that have arrived
//! (the copy wakes every waiter on them, read from the userfaultfd yet or not: rule 5),
//! and escalate every vCPU page wait whose page cannot be installed at once (rule 7):
//! signal the vCPU, then poison the page (`UFFDIO_POISON`). Whatever path the wait
//! took in the kernel, the vCPU then comes back to user space and waits there, where
//! every signal reaches it ([`crate::vcpu::poison`]). It happens in the same turn that
//! read the fault, not later: `gdb -p` stops this thread too, and a vCPU left in a wait
//! only a later turn would end would keep the attach from ever completing.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use userfaultfd::{Event, EventBuffer, ReadWrite};

use super::ahead::Ahead;
use super::{bump, FaultError, FaultLayer, Request};
use crate::memory::{Marker, PageState};
use crate::source::link::LinkModel;
use crate::source::remote::Remote;
use crate::source::{PageData, PageSource};
use crate::vcpu::stalls::Stalls;

/// A page on its way.
struct InFlight {
    idx: usize,
    /// When the link delivers it.
    due: Instant,
    /// When it was first asked for (for the latency histogram).
    asked: Instant,
    write: bool,
    /// The vCPU whose fault asked for it (for [`super::timing`]).
    vcpu: Option<usize>,
}

/// Busy-polling after faults. A vCPU paging in faults again within about 100 µs, and
/// catching that fault without sleeping saves the wake-up of this thread, a large part
/// of a fault's cost on a machine where waking a thread on another CPU is slow. A spin
/// that finds nothing is a miss; after a few in a row spinning pauses, so an idle or
/// stalled VM costs no CPU.
struct Spin {
    /// Spinning is allowed at all: a CPU is left for this thread beside one for each
    /// vCPU, and it has that CPU to itself (`vm::placement`). Otherwise the spin takes CPU time a vCPU needs: each uffd fault costs the
    /// vCPU thread itself about 38 µs of CPU at CPL3 here (13 µs on plain memory).
    /// Measured with 2 vCPUs on 2 CPUs: 142 µs a page per vCPU spinning, 115 not (CPL3),
    /// 131 and 80 at CPL0; with 1 vCPU spinning still pays (49 against 58 µs).
    allowed: bool,
    /// The last turn read fault events.
    armed: bool,
    misses: u32,
    quiet_until: Instant,
}

const SPIN_FOR: Duration = Duration::from_micros(200);
const SPIN_MISSES: u32 = 4;
const SPIN_QUIET: Duration = Duration::from_millis(20);

impl Spin {
    /// Spinning policy: `allowed` when the loop has a CPU to itself.
    fn new(allowed: bool) -> Self {
        Spin {
            allowed,
            armed: false,
            misses: 0,
            quiet_until: Instant::now(),
        }
    }

    /// Polls `fds` without sleeping for up to [`SPIN_FOR`] (and no longer than `limit`,
    /// when the loop has a deadline) if spinning is worth it now; true if something
    /// became ready.
    fn poll(&mut self, fds: &mut [libc::pollfd], limit: Option<Duration>) -> bool {
        let now = Instant::now();
        if !self.allowed || !self.armed || now < self.quiet_until {
            return false;
        }
        let budget = limit.map_or(SPIN_FOR, |l| l.min(SPIN_FOR));
        while now.elapsed() < budget {
            // SAFETY: fds is a valid array of pollfd; zero timeout.
            if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) } > 0 {
                self.misses = 0;
                return true;
            }
            std::hint::spin_loop();
        }
        self.misses += 1;
        if self.misses >= SPIN_MISSES {
            self.misses = 0;
            self.quiet_until = Instant::now() + SPIN_QUIET;
        }
        false
    }
}

/// Where the loop gets pages.
pub enum Supply {
    /// A local page source behind the link model.
    Local {
        /// The source.
        source: Box<dyn PageSource>,
        /// The modelled network in front of it.
        link: LinkModel,
    },
    /// A migration source process (see [`crate::source::remote`]).
    Remote(Remote),
}

/// The loop's state.
pub struct FaultLoop {
    pub(super) fault: Arc<FaultLayer>,
    rx: Receiver<Request>,
    pub(super) supply: Supply,
    /// Where the loop reports what it sees of vCPU page waits.
    pub(super) stalls: Stalls,
    /// Local supply: pages on their way through the link model.
    queue: VecDeque<InFlight>,
    /// Remote supply: when each outstanding page was first asked for, and by which
    /// vCPU (`None`: a VMM thread).
    pub(super) asked: HashMap<usize, (Instant, Option<usize>)>,
    /// Remote supply: pages to ask for at the end of this turn.
    pub(super) to_ask: Vec<usize>,
    buf: Vec<u8>,
    /// A poison failed (logged once).
    poison_failed: bool,
    /// Read-ahead and background fill (`ahead`).
    pub(super) ahead: Ahead,
}

impl FaultLoop {
    /// A loop serving `fault`'s RAM from `supply`.
    pub fn new(
        fault: Arc<FaultLayer>,
        rx: Receiver<Request>,
        supply: Supply,
        stalls: Stalls,
    ) -> Self {
        let page = fault.ram.page_size() as usize;
        FaultLoop {
            fault,
            rx,
            supply,
            stalls,
            queue: VecDeque::new(),
            asked: HashMap::new(),
            to_ask: Vec::new(),
            buf: vec![0; page],
            poison_failed: false,
            ahead: Ahead::default(),
        }
    }

    /// Runs until asked to stop; busy-polls after faults if `spin` (see [`Spin`]).
    /// Errors are fatal to the VM.
    pub fn run(mut self, spin: bool) -> Result<(), FaultError> {
        let Some(uffd_fd) = self.fault.ram.uffd_fd() else {
            return Ok(()); // --no-uffd: nothing to serve.
        };
        let mut events = EventBuffer::new(64);
        let mut spin = Spin::new(spin);
        loop {
            let timeout = self.poll_timeout();
            let mut fds = [
                libc::pollfd {
                    fd: uffd_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.fault.wake_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let spun = spin.poll(&mut fds, timeout);
            let r = if spun {
                1
            } else {
                // The deadline again: the spin may have used part of it.
                let ms = self
                    .poll_timeout()
                    .map_or(-1, |d| d.as_millis().clamp(0, i32::MAX as u128) as i32);
                // SAFETY: fds is a valid array of two pollfd for the duration of the call.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) }
            };
            spin.armed = fds[0].revents & libc::POLLIN != 0;
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(FaultError::Poll(e));
                }
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.timing(|t| t.found(spun));
                self.read_faults(&mut events)?;
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let _ = self.fault.wake_fd().read();
            }
            if self.take_requests() {
                return Ok(());
            }
            if matches!(self.supply, Supply::Remote(_)) {
                self.take_arrivals()?;
            } else {
                self.deliver_due()?;
            }
            self.escalate();
            self.flush_asks();
            self.flush_ahead_asks();
        }
    }

    /// Until the next page is due; otherwise sleep until an event.
    fn poll_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let due = self
            .queue
            .front()
            .map(|p| p.due.saturating_duration_since(now));
        let ahead = self.ahead_timeout(now);
        let next = match (due, ahead) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(|d| d + Duration::from_micros(999))
    }

    /// Escalates every vCPU page wait in the kernel whose page is still not there after
    /// this turn's installs (rule 7): [`Stalls::escalate`] signals each vCPU waiting on
    /// the page, then the page is poisoned. A poison that fails leaves the wait in the
    /// kernel, as without `UFFDIO_POISON`; it is logged once.
    fn escalate(&mut self) {
        let ram = &self.fault.ram;
        if !ram.can_poison() {
            return;
        }
        for gpa in self.stalls.kernel_waits() {
            let Some(idx) = ram.page_of(gpa) else {
                continue;
            };
            if ram.pages.get(idx) == PageState::Present || ram.pages.marker(idx) == Marker::Set {
                continue;
            }
            let poisoned = self.stalls.escalate(gpa, || {
                // The marker first: the poison wakes every thread on the page, and
                // another vCPU's SIGBUS must find it ufvmm's own (else it is a memory
                // error).
                ram.pages.set_marker(idx);
                ram.poison(idx).inspect_err(|_| ram.pages.unset_marker(idx))
            });
            match poisoned {
                Ok(true) => bump(&self.fault.stats.escalated, 1),
                Ok(false) => {}
                Err(e) => {
                    if !std::mem::replace(&mut self.poison_failed, true) {
                        eprintln!("ufvmm: cannot move a page wait to user space: {e}");
                    }
                }
            }
        }
    }

    fn read_faults(&mut self, events: &mut EventBuffer) -> Result<(), FaultError> {
        let fault = self.fault.clone();
        let Some(uffd) = fault.ram.uffd() else {
            return Ok(());
        };
        loop {
            let now = Instant::now();
            let mut n = 0;
            for ev in uffd.read_events(events).map_err(FaultError::Read)? {
                n += 1;
                let Ok(Event::Pagefault {
                    addr,
                    rw,
                    thread_id,
                    ..
                }) = ev
                else {
                    continue;
                };
                let Some(gpa) = self.fault.ram.hva_to_gpa(addr as u64) else {
                    continue;
                };
                let Some(idx) = self.fault.ram.page_of(gpa) else {
                    continue;
                };
                let state = self.fault.ram.pages.get(idx);
                if state == PageState::Present {
                    // Stale: the copy that installed it already woke this thread
                    // (unless it was a read-ahead install without wake).
                    self.wake_stale(idx)?;
                    continue;
                }
                let vcpu =
                    self.stalls
                        .fault(thread_id.as_raw(), self.fault.ram.page_base(gpa), now);
                match vcpu {
                    Some(v) => self.timing(|t| t.fault_seen(v, now)),
                    None => bump(&self.fault.stats.vmm_faults, 1),
                }
                let write = rw == ReadWrite::Write;
                if self.fault.ram.pages.try_request(idx) {
                    self.schedule(idx, write, now, vcpu);
                    if vcpu.is_some() {
                        self.read_ahead(thread_id.as_raw(), idx, write, now);
                    }
                } else if vcpu.is_some() {
                    self.fault_on_ahead(idx, write, now, vcpu);
                }
            }
            if n < 64 {
                return Ok(());
            }
        }
    }

    /// Takes VMM requests; true when asked to stop.
    fn take_requests(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                // The requester moved exactly these pages Missing -> Requested.
                Ok(Request::Fetch { pages, write, at }) => {
                    for idx in pages {
                        self.schedule(idx, write, at, None);
                    }
                }
                Ok(Request::Stop) | Err(TryRecvError::Disconnected) => return true,
                Err(TryRecvError::Empty) => return false,
            }
        }
    }

    /// Asks for a fault's (or a VMM request's) page `idx`, ahead of pages fetched ahead.
    pub(super) fn schedule(
        &mut self,
        idx: usize,
        write: bool,
        asked: Instant,
        vcpu: Option<usize>,
    ) {
        if let Supply::Remote(_) = self.supply {
            self.asked.entry(idx).or_insert((asked, vcpu));
            self.to_ask.push(idx);
            return;
        }
        match self.book_urgent(asked) {
            Some(due) => {
                // In due order: a booking taken from a page fetched ahead can be
                // earlier than one booked at the end.
                let at = self.queue.partition_point(|p| p.due <= due);
                self.queue.insert(
                    at,
                    InFlight {
                        idx,
                        due,
                        asked,
                        write,
                        vcpu,
                    },
                )
            }
            None => {
                // The link will never deliver it: say so in the page-state map, so VMM
                // threads get "source lost" instead of waiting forever.
                self.fault.ram.pages.set(idx, PageState::Lost);
                self.fault.ram.pages.notify();
                bump(&self.fault.stats.never, 1);
            }
        }
    }

    fn deliver_due(&mut self) -> Result<(), FaultError> {
        let mut delivered = 0;
        while self.queue.front().is_some_and(|p| p.due <= Instant::now()) {
            let Some(p) = self.queue.pop_front() else {
                break;
            };
            self.deliver(p)?;
            delivered += 1;
        }
        if delivered > 0 {
            self.fault.ram.pages.notify();
        }
        self.deliver_ahead()
    }

    fn deliver(&mut self, p: InFlight) -> Result<(), FaultError> {
        let Supply::Local { source, .. } = &mut self.supply else {
            return Ok(());
        };
        let data = match source.read_page(p.idx, &mut self.buf) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("ufvmm: page source lost a page: {e}");
                self.fault.ram.pages.set(p.idx, PageState::Lost);
                bump(&self.fault.stats.lost, 1);
                return Ok(());
            }
        };
        let bytes = (data == PageData::Bytes).then_some(&self.buf[..]);
        let start = Instant::now();
        self.install_page(p.idx, bytes, !p.write, Some((p.asked, p.vcpu)))?;
        if p.vcpu.is_some() {
            let done = Instant::now();
            self.timing(|t| t.served(p.asked, start, done));
        }
        Ok(())
    }

    /// Updates the fault timing (only this thread writes it; the report reads it).
    pub(super) fn timing(&self, f: impl FnOnce(&mut super::timing::FaultTiming)) {
        if let Ok(mut t) = self.fault.stats.timing.lock() {
            f(&mut t);
        }
    }

    /// Installs page `idx` (zeros when `data` is `None`; `zero_map` as in
    /// [`crate::memory::GuestRam::install`]), marks it present, and ends the stalls on it.
    pub(super) fn install_page(
        &self,
        idx: usize,
        data: Option<&[u8]>,
        zero_map: bool,
        asked: Option<(Instant, Option<usize>)>,
    ) -> Result<(), FaultError> {
        let stats = &self.fault.stats;
        let ram = &self.fault.ram;
        let gpa = ram.page_gpa(idx);
        // An escalated page carries a poison marker: drop it, so the copy can fill the
        // page (a zero-page install would leave it, see `GuestRam::poison`).
        if ram.pages.clear_marker(idx) {
            ram.clear_poison(idx)?;
        }
        ram.install(idx, data, zero_map)?;
        if data.is_none() {
            bump(&stats.zero, 1);
        }
        ram.pages.set(idx, PageState::Present);
        bump(&stats.served, 1);
        if let Some((at, vcpu)) = asked {
            super::latency::record(&stats.latency, at, vcpu);
        }
        let done = Instant::now();
        self.stalls.installed(gpa, |v| self.woke(v, done));
        Ok(())
    }

    /// The wait of vCPU `v` in a page fault ended with an install done at `done`.
    pub(super) fn woke(&self, v: usize, done: Instant) {
        self.timing(|t| t.woke(v, done));
    }
}
