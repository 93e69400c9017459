//! The fault loop's side of read-ahead and background fill ([`super::prefetch`]): pages
//! fetched ahead of faults, their place on the link, and their cheap install.
//!
//! Priority on the link. The link model books transfers first come, first served; a
//! fault must not wait behind pages fetched ahead. Bookings of one page are
//! interchangeable (the model's promises, bandwidth, latency and stalls, hold for the
//! booking, whichever page uses it), so a fault takes the earliest booking of a page
//! fetched ahead that has not gone on the wire yet, and each such page moves one
//! booking later, the last one taking the fault's own fresh booking. A fault thus waits
//! at most for the one page on the wire. Read-ahead does not pre-empt the background
//! fill that way; the fill keeps only [`BACKGROUND_QUEUED`] pages on the link.
//!
//! Install. Contiguous pages due together go in with one `UFFDIO_COPY` (or one
//! `UFFDIO_ZEROPAGE`), without waking (`DONTWAKE`) unless a fault on one of them was
//! read; a fault that raced the install is read later, on a present page, and woken
//! then ([`FaultLoop::wake_stale`]).

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::handler::{FaultLoop, Supply};
use super::prefetch::{Background, Policies, Readahead, BACKGROUND_QUEUED};
use super::{bump, FaultError};
use crate::memory::{Marker, PageState};
use crate::source::link::Booking;
use crate::source::PageData;

/// Most bytes in one install ioctl (64 pages of 4 KiB). Capped by bytes, not pages:
/// the run's data is read into one buffer first, and 64 huge pages would be 128 MiB
/// of it; a 2 MiB page alone already amortises the ioctl 512 times over, so with
/// `--hugepages` a run is one page.
const RUN_MAX_BYTES: usize = 256 << 10;
/// Most bytes fetched ahead installed per turn (256 pages of 4 KiB), so faults are
/// read in between: with 2 MiB pages, two pages a turn (at least one).
const AHEAD_PER_TURN_BYTES: usize = 1 << 20;
/// Remote supply: most pages asked for by the request window and not arrived yet. The
/// wire has no request that is not urgent, so the source serves the window's pages
/// with the same priority as a fault's: without a cap, a fault's page waits behind
/// whole windows on the source's urgent queue (measured: fault latency p99 676 ms and
/// blocktime 3-20x with `auto` through a 32 MiB/s link).
const REMOTE_OUTSTANDING: usize = 32;
/// The background fill books no page while the link is busy further ahead than this.
const BACKGROUND_HORIZON: Duration = Duration::from_millis(2);

/// Why a page is fetched ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    Prefetch,
    Background,
}

/// A page fetched ahead, on its way through the link.
struct AheadPage {
    idx: usize,
    slot: Booking,
    class: Class,
    /// Install it writable (zeros copied, not mapped).
    write: bool,
    /// A fault on it was read: its install must wake.
    waiter: bool,
}

/// The loop's read-ahead and background state.
pub(super) struct Ahead {
    readahead: Readahead,
    background: Option<Background>,
    /// Local supply: pages fetched ahead, in booking order.
    queue: VecDeque<AheadPage>,
    /// Background pages in `queue`.
    background_queued: usize,
    /// Remote supply: pages to ask for after this turn's urgent ones.
    pub(super) to_ask: Vec<usize>,
    /// Remote supply: pages asked for ahead and not yet installed.
    asked: HashSet<usize>,
    /// A `DONTWAKE` install happened: faults read on present pages get a wake.
    dontwake_used: bool,
    buf: Vec<u8>,
}

impl Default for Ahead {
    fn default() -> Self {
        Self::new(Policies::default())
    }
}

impl Ahead {
    /// The state for `policies`.
    pub(super) fn new(policies: Policies) -> Self {
        Ahead {
            readahead: Readahead::new(policies.prefetch),
            background: policies
                .background
                .map(|r| Background::new(r, Instant::now())),
            queue: VecDeque::new(),
            background_queued: 0,
            to_ask: Vec::new(),
            asked: HashSet::new(),
            dontwake_used: false,
            buf: Vec::new(),
        }
    }
}

/// Gives the earliest booking of a page fetched ahead that is not on the wire yet at
/// `now` to a fault whose own fresh booking is `fresh`, moving each later page one
/// booking on (see the module doc). The last page fetched ahead then holds `fresh`; if
/// `fresh` is `None` (the link delivers nothing more) that page is returned, to be
/// given up.
fn take_booking(
    queue: &mut VecDeque<AheadPage>,
    now: Instant,
    fresh: Option<Booking>,
) -> (Option<Booking>, Option<AheadPage>) {
    let first = queue.partition_point(|p| p.slot.send < now);
    if first == queue.len() {
        return (fresh, None);
    }
    let Some(mut carry) = fresh else {
        // No booking at the end: the last page gives up its own instead.
        let dropped = queue.pop_back();
        let mut carry = dropped.as_ref().map(|p| p.slot);
        for k in (first..queue.len()).rev() {
            if let Some(c) = carry.as_mut() {
                std::mem::swap(&mut queue[k].slot, c);
            }
        }
        return (carry, dropped);
    };
    for k in (first..queue.len()).rev() {
        std::mem::swap(&mut queue[k].slot, &mut carry);
    }
    (Some(carry), None)
}

impl FaultLoop {
    /// Sets the read-ahead and background policies (before the loop runs).
    pub fn with_policies(mut self, mut policies: Policies) -> Self {
        let page = self.fault.ram.page_size();
        policies.background = policies.background.map(|b| b.in_pages_of(page));
        let _ = self.fault.stats.policy.policies.set(policies);
        let background = match self.supply {
            Supply::Local { .. } => policies.background,
            Supply::Remote(_) => None, // a migration source streams by itself
        };
        self.ahead = Ahead::new(Policies {
            background,
            ..policies
        });
        self
    }

    /// Books a fault's page on `link`, ahead of pages fetched ahead.
    pub(super) fn book_urgent(&mut self, asked: Instant) -> Option<Instant> {
        let Supply::Local { link, .. } = &mut self.supply else {
            return None;
        };
        let fresh = link.book(asked, self.fault.ram.page_size());
        if self.ahead.queue.is_empty() {
            return fresh.map(|b| b.due);
        }
        let (slot, dropped) = take_booking(&mut self.ahead.queue, Instant::now(), fresh);
        if let Some(d) = dropped {
            self.give_up(d);
        }
        slot.map(|b| b.due)
    }

    /// A page fetched ahead that the link will never deliver: lost, as a fault's would be.
    fn give_up(&mut self, p: AheadPage) {
        if p.class == Class::Background {
            self.ahead.background_queued -= 1;
            if let Some(b) = self.ahead.background.as_mut() {
                b.done = true;
            }
        }
        self.fault.ram.pages.set(p.idx, PageState::Lost);
        self.fault.ram.pages.notify();
        bump(&self.fault.stats.never, 1);
    }

    /// A vCPU thread `tid` faulted on missing page `idx` (just requested): fetch the
    /// pages read-ahead says follow it.
    pub(super) fn read_ahead(&mut self, tid: i32, idx: usize, write: bool, now: Instant) {
        if !self.ahead.readahead.enabled() {
            return;
        }
        let pages = &self.fault.ram.pages;
        let window = self.ahead.readahead.on_fault(tid, idx, pages.len());
        for i in window {
            if matches!(self.supply, Supply::Remote(_))
                && self.ahead.asked.len() >= REMOTE_OUTSTANDING
            {
                return;
            }
            if !pages.try_request(i) {
                continue;
            }
            match &mut self.supply {
                Supply::Remote(_) => {
                    self.ahead.to_ask.push(i);
                    self.ahead.asked.insert(i);
                }
                Supply::Local { link, .. } => {
                    let Some(slot) = link.book(now, self.fault.ram.page_size()) else {
                        self.give_up(AheadPage {
                            idx: i,
                            slot: Booking {
                                send: now,
                                due: now,
                            },
                            class: Class::Prefetch,
                            write,
                            waiter: false,
                        });
                        return;
                    };
                    self.ahead.queue.push_back(AheadPage {
                        idx: i,
                        slot,
                        class: Class::Prefetch,
                        write,
                        waiter: false,
                    });
                }
            }
        }
    }

    /// A vCPU faulted on page `idx`, already requested. If it was fetched ahead and is
    /// not on the wire yet, it becomes a fault's page (its booking is given up, it is
    /// booked ahead of the others); otherwise its install must wake.
    pub(super) fn fault_on_ahead(
        &mut self,
        idx: usize,
        write: bool,
        now: Instant,
        vcpu: Option<usize>,
    ) {
        let Some(k) = self.ahead.queue.iter().position(|p| p.idx == idx) else {
            return;
        };
        if self.ahead.queue[k].slot.send <= now {
            self.ahead.queue[k].waiter = true;
            return;
        }
        let Some(p) = self.ahead.queue.remove(k) else {
            return;
        };
        if p.class == Class::Background {
            self.ahead.background_queued -= 1;
        }
        self.schedule(idx, write || p.write, now, vcpu);
    }

    /// A fault read on page `idx`, already present: the install may not have woken it
    /// (`DONTWAKE`), so wake it. Costs nothing while no such install happened.
    pub(super) fn wake_stale(&self, idx: usize) -> Result<(), FaultError> {
        if self.ahead.dontwake_used {
            self.fault.ram.wake(idx)?;
        }
        Ok(())
    }

    /// Until the next page fetched ahead is due or the background fill may book one.
    pub(super) fn ahead_timeout(&self, now: Instant) -> Option<Duration> {
        let due = self
            .ahead
            .queue
            .front()
            .map(|p| p.slot.due.saturating_duration_since(now));
        let fill = match (&self.ahead.background, &self.supply) {
            (Some(b), Supply::Local { link, .. })
                if self.ahead.background_queued < BACKGROUND_QUEUED =>
            {
                let busy = link
                    .free_at()
                    .saturating_duration_since(now)
                    .saturating_sub(BACKGROUND_HORIZON);
                b.wait(now).map(|w| w.max(busy))
            }
            _ => None,
        };
        match (due, fill) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Installs the pages fetched ahead that are due, then lets the background fill
    /// book more.
    pub(super) fn deliver_ahead(&mut self) -> Result<(), FaultError> {
        let page = self.fault.ram.page_size() as usize;
        let run_max = (RUN_MAX_BYTES / page).max(1);
        let per_turn = (AHEAD_PER_TURN_BYTES / page).max(1);
        let mut delivered = 0;
        while delivered < per_turn {
            let now = Instant::now();
            let mut n = 0;
            while n < run_max
                && self.ahead.queue.get(n).is_some_and(|p| {
                    p.slot.due <= now
                        && (n == 0 || p.idx == self.ahead.queue[n - 1].idx + 1)
                        && p.class == self.ahead.queue[0].class
                })
            {
                n += 1;
            }
            if n == 0 {
                break;
            }
            let run: Vec<AheadPage> = self.ahead.queue.drain(..n).collect();
            self.install_ahead(&run)?;
            delivered += n;
        }
        if delivered > 0 {
            self.fault.ram.pages.notify();
        }
        if self
            .ahead
            .queue
            .front()
            .is_some_and(|p| p.slot.due <= Instant::now())
        {
            // More due than one turn installs: come back at once.
            let _ = self.fault.wake_fd().write(1);
        }
        self.feed_background();
        Ok(())
    }

    /// Books the background pages the rate allows, while the link is not busy ahead.
    fn feed_background(&mut self) {
        let Supply::Local { link, .. } = &mut self.supply else {
            return;
        };
        let Some(b) = self.ahead.background.as_mut() else {
            return;
        };
        let now = Instant::now();
        if link.free_at() > now + BACKGROUND_HORIZON {
            return;
        }
        let room = BACKGROUND_QUEUED - self.ahead.background_queued;
        let pages = b.take(now, &self.fault.ram.pages, room);
        let page = self.fault.ram.page_size();
        let mut lost = Vec::new();
        for idx in pages {
            match link.book(now, page) {
                Some(slot) => {
                    self.ahead.queue.push_back(AheadPage {
                        idx,
                        slot,
                        class: Class::Background,
                        write: false,
                        waiter: false,
                    });
                    self.ahead.background_queued += 1;
                }
                None => lost.push(idx),
            }
        }
        for idx in lost {
            self.ahead.background_queued += 1;
            self.give_up(AheadPage {
                idx,
                slot: Booking {
                    send: now,
                    due: now,
                },
                class: Class::Background,
                write: false,
                waiter: false,
            });
        }
    }

    /// Installs contiguous pages fetched ahead of one class: reads them from the
    /// source, then one ioctl; a page the source fails or that carries a poison marker
    /// goes alone.
    fn install_ahead(&mut self, run: &[AheadPage]) -> Result<(), FaultError> {
        let page = self.fault.ram.page_size() as usize;
        let Supply::Local { source, .. } = &mut self.supply else {
            return Ok(());
        };
        let buf = &mut self.ahead.buf;
        buf.resize(run.len() * page, 0);
        let mut all_zero = true;
        let mut zero = vec![false; run.len()];
        let mut alone = Vec::new();
        let mut lost = Vec::new();
        for (k, p) in run.iter().enumerate() {
            let slot = &mut buf[k * page..(k + 1) * page];
            match source.read_page(p.idx, slot) {
                Ok(PageData::Bytes) => all_zero = false,
                Ok(PageData::Zero) => {
                    slot.fill(0);
                    zero[k] = true;
                }
                Err(e) => {
                    eprintln!("ufvmm: page source lost a page: {e}");
                    lost.push(k);
                }
            }
            if self.fault.ram.pages.marker(p.idx) == Marker::Set {
                alone.push(k);
            }
        }
        let mut start = 0;
        // Split the run at pages that cannot go with the others.
        let breaks: Vec<usize> = {
            let mut b: Vec<usize> = alone.iter().chain(&lost).copied().collect();
            b.sort_unstable();
            b.dedup();
            b
        };
        for &k in breaks.iter().chain(std::iter::once(&run.len())) {
            if start < k {
                self.install_contiguous(&run[start..k], start, &zero, all_zero)?;
            }
            if k < run.len() {
                let p = &run[k];
                if lost.contains(&k) {
                    self.fault.ram.pages.set(p.idx, PageState::Lost);
                    bump(&self.fault.stats.lost, 1);
                } else {
                    let data =
                        (!zero[k]).then(|| self.ahead.buf[k * page..(k + 1) * page].to_vec());
                    self.install_page(p.idx, data.as_deref(), !p.write, None)?;
                    self.count_ahead(p.class);
                }
                if p.class == Class::Background {
                    self.ahead.background_queued -= 1;
                }
            }
            start = k + 1;
        }
        Ok(())
    }

    /// One install ioctl for `pages` (whose data is at `offset` pages into the buffer).
    fn install_contiguous(
        &mut self,
        pages: &[AheadPage],
        offset: usize,
        zero: &[bool],
        all_zero: bool,
    ) -> Result<(), FaultError> {
        let page = self.fault.ram.page_size() as usize;
        let n = pages.len();
        let first = pages[0].idx;
        let wake = pages.iter().any(|p| p.waiter);
        let map_zeros = all_zero && !pages.iter().any(|p| p.write);
        let data = (!map_zeros).then(|| &self.ahead.buf[offset * page..(offset + n) * page]);
        let ram = &self.fault.ram;
        let done = ram.install_run(first, n, data, wake)?;
        for (k, p) in pages.iter().enumerate() {
            if k >= done {
                // Not in the run's ioctl (a page was there already): alone, waking.
                let bytes = data.map(|d| &d[k * page..(k + 1) * page]);
                ram.install(p.idx, bytes, map_zeros)?;
            }
            ram.pages.set(p.idx, PageState::Present);
            bump(&self.fault.stats.served, 1);
            if zero[offset + k] {
                bump(&self.fault.stats.zero, 1);
            }
            let done = Instant::now();
            let gpa = self.fault.ram.page_gpa(p.idx);
            self.stalls.installed(gpa, |v| self.woke(v, done));
        }
        if !wake {
            self.ahead.dontwake_used = true;
        }
        for p in pages {
            self.count_ahead(p.class);
            if p.class == Class::Background {
                self.ahead.background_queued -= 1;
            }
        }
        Ok(())
    }

    fn count_ahead(&self, class: Class) {
        let s = &self.fault.stats.policy;
        match class {
            Class::Prefetch => bump(&s.prefetched, 1),
            Class::Background => bump(&s.background, 1),
        }
    }

    /// Remote supply: asks for the pages read-ahead picked, after the urgent ones (the
    /// wire has no request that is not urgent; a later request is served later).
    pub(super) fn flush_ahead_asks(&mut self) {
        if self.ahead.to_ask.is_empty() {
            return;
        }
        if let Supply::Remote(r) = &self.supply {
            (r.ask)(std::mem::take(&mut self.ahead.to_ask));
        }
    }

    /// Remote supply: page `idx` arrived and is installed; counts it if read-ahead
    /// asked for it and it came as an answer.
    pub(super) fn arrived_ahead(&mut self, idx: usize, urgent: bool) {
        if self.ahead.asked.remove(&idx) && urgent {
            bump(&self.fault.stats.policy.prefetched, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::PAGE_SIZE;
    use crate::source::link::LinkModel;
    use std::sync::Arc;

    fn page(idx: usize, slot: Booking) -> AheadPage {
        AheadPage {
            idx,
            slot,
            class: Class::Prefetch,
            write: false,
            waiter: false,
        }
    }

    #[test]
    fn a_fault_takes_the_first_booking_not_on_the_wire() {
        let t0 = Instant::now();
        let mut link = LinkModel::new("latency=1ms,bandwidth=4MB/s".parse().unwrap(), t0);
        // Four pages fetched ahead at t0: on the wire at 0, ~1, ~2, ~3 ms.
        let mut q: VecDeque<AheadPage> = (10..14)
            .map(|i| page(i, link.book(t0, PAGE_SIZE).unwrap()))
            .collect();
        let slots: Vec<Booking> = q.iter().map(|p| p.slot).collect();
        // A fault at 0.5 ms: page 10 is on the wire, page 11's booking is the first free.
        let now = t0 + Duration::from_micros(500);
        let fresh = link.book(now, PAGE_SIZE);
        let (got, dropped) = take_booking(&mut q, now, fresh);
        assert!(dropped.is_none());
        assert_eq!(got, Some(slots[1]));
        // The pages keep their order, each one booking later; the last takes the fresh one.
        let idx: Vec<usize> = q.iter().map(|p| p.idx).collect();
        assert_eq!(idx, vec![10, 11, 12, 13]);
        assert_eq!(q[0].slot, slots[0]);
        assert_eq!(q[1].slot, slots[2]);
        assert_eq!(q[2].slot, slots[3]);
        assert_eq!(Some(q[3].slot), fresh);
        // Every booking is still used once: the link's promises hold.
        let mut all: Vec<Instant> = q.iter().map(|p| p.slot.send).collect();
        all.push(got.unwrap().send);
        all.sort();
        let mut want: Vec<Instant> = slots.iter().map(|s| s.send).collect();
        want.push(fresh.unwrap().send);
        want.sort();
        assert_eq!(all, want);
    }

    #[test]
    fn without_a_fresh_booking_the_last_page_is_given_up() {
        let t0 = Instant::now();
        let mut link = LinkModel::new("bandwidth=4MB/s".parse().unwrap(), t0);
        let mut q: VecDeque<AheadPage> = (0..3)
            .map(|i| page(i, link.book(t0, PAGE_SIZE).unwrap()))
            .collect();
        let slots: Vec<Booking> = q.iter().map(|p| p.slot).collect();
        let now = t0 + Duration::from_micros(10);
        let (got, dropped) = take_booking(&mut q, now, None);
        assert_eq!(got, Some(slots[1]));
        assert_eq!(dropped.map(|d| d.idx), Some(2));
        assert_eq!(q.len(), 2);
        assert_eq!(q[1].slot, slots[2]);
        // Nothing unstarted: the fault keeps its own booking.
        let (got, _) = take_booking(&mut q, t0 + Duration::from_secs(1), None);
        assert_eq!(got, None);
    }

    /// A vCPU's wait for a page above 4 GiB ends when the page goes in with a run
    /// fetched ahead: the run must name the page by its GPA (1 GiB past its offset
    /// there), as the fault that recorded the wait did. Real userfaultfd, no KVM: the
    /// vCPU is its shared state, in `KVM_RUN` as the loop sees it.
    #[test]
    fn a_page_installed_ahead_above_4_gib_ends_the_wait_on_its_gpa() {
        use crate::fault::FaultLayer;
        use crate::memory::GuestRam;
        use crate::source::ZeroSource;
        use crate::vcpu::stalls::Stalls;
        use crate::vcpu::VcpuShared;

        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        // 3 GiB and 4 pages: the last 4 live at GPA 4 GiB (reserved, never touched).
        let ram = match GuestRam::new((3 << 30) + 4 * PAGE_SIZE, true, false) {
            Ok(r) => Arc::new(r),
            Err(e) if ci => panic!("no userfaultfd: {e}"),
            Err(e) => {
                eprintln!("SKIPPED: no userfaultfd ({e})");
                return;
            }
        };
        let (fault, rx) = FaultLayer::new(ram.clone(), 1).expect("fault layer");
        let v = Arc::new(VcpuShared::new(0));
        v.set_tid(4242);
        v.stall.enter_run();
        let vcpus: Arc<[Arc<VcpuShared>]> = vec![v.clone()].into();
        let t0 = Instant::now();
        let supply = Supply::Local {
            source: Box::new(ZeroSource),
            link: LinkModel::ideal(t0),
        };
        let mut fl = FaultLoop::new(fault, rx, supply, Stalls::new(vcpus));
        let idx = ((3u64 << 30) / PAGE_SIZE) as usize + 1;
        let gpa = ram.page_gpa(idx);
        assert_eq!(gpa, crate::abi::HIGH_RAM_GPA + PAGE_SIZE);
        assert!(ram.pages.try_request(idx));
        // The vCPU's fault on it was read while the page was on the wire.
        assert_eq!(fl.stalls.fault(4242, gpa, t0), Some(0));
        assert_eq!(v.stall.gpa(), Some(gpa));
        let slot = Booking { send: t0, due: t0 };
        fl.ahead.queue.push_back(AheadPage {
            waiter: true,
            ..page(idx, slot)
        });
        fl.deliver_ahead().expect("install ahead");
        assert_eq!(ram.pages.get(idx), PageState::Present);
        assert_eq!(v.stall.gpa(), None, "the wait stayed on record");
        assert_eq!(
            fl.fault
                .stats
                .policy
                .prefetched
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
