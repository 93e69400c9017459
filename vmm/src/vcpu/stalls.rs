//! Page waits. [`StallRecord`] is one vCPU's: the page it waits for, where it waits
//! (inside `KVM_RUN`, in the kernel's page fault, or in user space), since when, and
//! the blocktime counters. [`Stalls`] is the one place the fault loop reports to: a
//! fault from thread T at page P, page P installed, page P about to be poisoned. The
//! vCPU thread itself records its own user-space waits and ends them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::VcpuShared;

/// A page wait the fault loop or the vCPU thread saw.
#[derive(Clone, Copy, Debug)]
pub struct Stall {
    /// Guest-physical page address.
    pub gpa: u64,
    /// When the wait began (its first fault).
    pub since: Instant,
    /// The wait is in the VMM (`get_guest_pages` for a device), not in a page fault.
    pub in_vmm: bool,
    /// The thread left the kernel's page fault while the page was still missing (an
    /// escalation, a kick or a pause got it out): it waits for the page in user space,
    /// or parked, and does not enter the guest again before the page is there.
    pub left: bool,
    /// The thread waits inside `KVM_RUN`, in the kernel's page fault (where, on some
    /// paths, no signal reaches it); false for a wait in user space.
    pub in_kernel: bool,
    /// When the current kind of wait (kernel or user space) began.
    pub phase_since: Instant,
    /// Microseconds of this wait spent in the kernel before `phase_since`.
    pub kernel_us: u64,
}

impl Stall {
    fn new(gpa: u64, now: Instant, in_kernel: bool) -> Self {
        Stall {
            gpa,
            since: now,
            in_vmm: false,
            left: false,
            in_kernel,
            phase_since: now,
            kernel_us: 0,
        }
    }

    /// Where the thread waits, as status shows it: `"kernel"` or `"user"`.
    pub fn wait_name(&self) -> &'static str {
        if self.in_kernel {
            "kernel"
        } else {
            "user"
        }
    }

    /// The wait moves from the kernel to user space at `now`.
    fn move_to_user(&mut self, now: Instant) {
        if self.in_kernel {
            self.kernel_us += now.saturating_duration_since(self.phase_since).as_micros() as u64;
            self.in_kernel = false;
            self.phase_since = now;
        }
    }

    /// The thread is back in the kernel's page fault on this page at `now`.
    fn move_to_kernel(&mut self, now: Instant) {
        if !self.in_kernel {
            self.in_kernel = true;
            self.phase_since = now;
        }
    }

    /// (kernel, user) microseconds of this wait up to `now`.
    fn split_us(&self, now: Instant) -> (u64, u64) {
        let total = now.saturating_duration_since(self.since).as_micros() as u64;
        let kernel = if self.in_kernel {
            self.kernel_us + now.saturating_duration_since(self.phase_since).as_micros() as u64
        } else {
            self.kernel_us
        };
        let kernel = kernel.min(total);
        (kernel, total - kernel)
    }
}

const NO_STALL: u64 = u64::MAX;

/// One vCPU's page wait and blocktime. Written by the vCPU thread and, through
/// [`Stalls`], by the fault loop; read by status and the report.
pub struct StallRecord {
    /// Inside `KVM_RUN` (only then can the thread be waiting in a page fault).
    in_run: AtomicBool,
    stall: Mutex<Option<Stall>>,
    /// Mirror of `stall.gpa` for lock-free checks.
    stall_gpa: AtomicU64,
    /// Page faults seen from this vCPU: by the fault loop, or as an exit on a page
    /// poisoned to move a wait to user space (no uffd event for that one).
    pub faults: AtomicU64,
    /// Waits of this vCPU's device emulation for a missing page (`get_guest_pages`
    /// on the vCPU thread): page waits that are not the guest's page faults.
    pub device_waits: AtomicU64,
    /// Microseconds spent waiting for pages.
    pub blocktime_us: AtomicU64,
    /// Of those, microseconds spent waiting inside the kernel's page fault.
    pub blocktime_kernel_us: AtomicU64,
    /// Page waits of this vCPU the fault loop moved to user space (rule 7).
    pub escalations: AtomicU64,
    /// Each ended wait's length, in power-of-two buckets (the report's
    /// `fault_latency_us_pow2.vcpus`): ended by its page's install, or by the next
    /// wait beginning (a wait left for a page the guest then did not touch again). A
    /// wait cut short by the vCPU's end is not one.
    pub waits: crate::fault::latency::AtomicPow2,
    /// The stall in progress when the VM began to stop (for the summary and report).
    at_stop: Mutex<Option<(Stall, Instant)>>,
}

impl Default for StallRecord {
    fn default() -> Self {
        StallRecord {
            in_run: AtomicBool::new(false),
            stall: Mutex::new(None),
            stall_gpa: AtomicU64::new(NO_STALL),
            faults: AtomicU64::new(0),
            device_waits: AtomicU64::new(0),
            blocktime_us: AtomicU64::new(0),
            blocktime_kernel_us: AtomicU64::new(0),
            escalations: AtomicU64::new(0),
            waits: Default::default(),
            at_stop: Mutex::new(None),
        }
    }
}

impl StallRecord {
    /// True while the thread is inside `KVM_RUN`.
    pub fn in_run(&self) -> bool {
        self.in_run.load(Ordering::Acquire)
    }

    fn stall_lock(&self) -> std::sync::MutexGuard<'_, Option<Stall>> {
        self.stall.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The vCPU thread enters `KVM_RUN`.
    pub(crate) fn enter_run(&self) {
        self.in_run.store(true, Ordering::SeqCst);
    }

    /// The vCPU thread left `KVM_RUN`. A page wait whose page `missing` says is still
    /// not there is kept, as left (see [`Stall::left`]); any other is over.
    pub(crate) fn leave_run(&self, missing: impl Fn(u64) -> bool) {
        let mut s = self.stall_lock();
        // Cleared under the stall lock, so a late event cannot record a stall after it.
        self.in_run.store(false, Ordering::SeqCst);
        self.leave_locked(&mut s, missing);
    }

    /// The vCPU thread stopped waiting in `get_guest_pages` (done or interrupted).
    pub(crate) fn leave_vmm_wait(&self, missing: impl Fn(u64) -> bool) {
        let mut s = self.stall_lock();
        self.leave_locked(&mut s, missing);
    }

    /// Keeps a stall whose page is still missing (checked under the stall lock, which
    /// [`StallRecord::end`] takes too: an arrival right after the check still
    /// ends it), ends any other.
    fn leave_locked(&self, s: &mut Option<Stall>, missing: impl Fn(u64) -> bool) {
        match s.as_mut() {
            Some(st) if missing(st.gpa) => {
                st.left = true;
                // Out of the kernel now: a signal reaches the thread again.
                st.move_to_user(Instant::now());
            }
            Some(_) => self.finish_locked(s, Instant::now()),
            None => {}
        }
    }

    /// Ends the stall in `s` at `now`; its whole length counts as blocktime.
    fn finish_locked(&self, s: &mut Option<Stall>, now: Instant) {
        if let Some(st) = s.take() {
            let (kernel, user) = st.split_us(now);
            self.waits.record(kernel + user);
            self.blocktime_us
                .fetch_add(kernel + user, Ordering::Relaxed);
            self.blocktime_kernel_us
                .fetch_add(kernel, Ordering::Relaxed);
        }
        self.stall_gpa.store(NO_STALL, Ordering::Release);
    }

    /// Records a wait for `gpa` beginning at `now`, or, if the stall on record is for
    /// the same page (a thread that left the wait came back to it, or a second event of
    /// one wait), goes on with that one: the wait counts from its first fault, once.
    /// Returns true for a new wait. `in_kernel`: the thread waits in a page fault.
    fn begin_locked(
        &self,
        s: &mut Option<Stall>,
        gpa: u64,
        now: Instant,
        in_vmm: bool,
        in_kernel: bool,
    ) -> bool {
        if let Some(st) = s.as_mut().filter(|st| st.gpa == gpa) {
            st.left = false;
            st.in_vmm = in_vmm;
            if in_kernel {
                st.move_to_kernel(now);
            } else {
                st.move_to_user(now);
            }
            return false;
        }
        // A wait on record for another page (left, or whose page the fault loop has not
        // yet marked arrived) ended when this one began.
        self.finish_locked(s, now);
        let mut st = Stall::new(gpa, now, in_kernel);
        st.in_vmm = in_vmm;
        *s = Some(st);
        self.stall_gpa.store(gpa, Ordering::Release);
        true
    }

    /// The fault loop saw this vCPU fault on page `gpa` (which the caller found not
    /// present). A fault on the page of the stall on record is the same wait, not a new
    /// fault.
    ///
    /// Read late, after the thread left `KVM_RUN` (a kick got it out before the event
    /// was read), the fault is still a wait for a page the thread will fault on again:
    /// with no stall on record it is recorded as left (see [`Stall::left`]), so a
    /// parked vCPU keeps the page in view and its wait counts once. It cannot go stale:
    /// the caller checks the page state on the thread that installs pages, which
    /// calls [`StallRecord::end`], so the page's arrival ends it. A device wait on
    /// record stays: it came after any fault of an earlier `KVM_RUN`.
    pub(super) fn fault_seen(&self, gpa: u64, now: Instant) {
        let mut s = self.stall_lock();
        if self.in_run.load(Ordering::SeqCst) {
            if self.begin_locked(&mut s, gpa, now, false, true) {
                self.faults.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        match s.as_ref() {
            Some(st) if st.gpa == gpa => return,
            Some(st) if st.in_vmm => {}
            _ => {
                self.begin_locked(&mut s, gpa, now, false, false);
                if let Some(st) = s.as_mut() {
                    st.left = true;
                }
            }
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    /// The vCPU thread waits in `get_guest_pages` for page `gpa` (outside `KVM_RUN`).
    pub(crate) fn begin_vmm_wait(&self, gpa: u64) {
        let mut s = self.stall_lock();
        if self.begin_locked(&mut s, gpa, Instant::now(), true, false) {
            self.device_waits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The vCPU thread, out of `KVM_RUN`, waits in user space for page `gpa` (its page
    /// fault was escalated, or a kick got it out): the same wait as the fault on record
    /// for that page, if any, now in user space and left (see [`Stall::left`]). With
    /// none on record it is a new fault: one on a poisoned page exits with no uffd
    /// event, and one whose event the fault loop reads later is the same wait then.
    ///
    /// No wait at all if the page is there (`missing` says not): it came while the
    /// thread was out (parked, or between leaving `KVM_RUN` and here), and its install
    /// ended the wait on record. Looked at under the stall lock, as [`StallRecord::end`]
    /// runs after the page state says present: either that end comes after this, or
    /// this sees the page present.
    pub(crate) fn begin_user_wait(&self, gpa: u64, missing: impl Fn(u64) -> bool) {
        let mut s = self.stall_lock();
        if !missing(gpa) {
            return;
        }
        if self.begin_locked(&mut s, gpa, Instant::now(), false, false) {
            self.faults.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(st) = s.as_mut() {
            st.left = true;
        }
    }

    /// Page `gpa` arrived: a page fault on it, or any wait the thread left for it, is
    /// over. (A wait inside `get_guest_pages` may span more pages; while the thread
    /// is in it, the thread ends it.)
    ///
    /// Time a vCPU spent paused on a page that had not arrived counts as blocktime:
    /// it could not have run on without the page either way.
    ///
    /// Always under the stall lock, with no lock-free look at `stall_gpa` first: the
    /// vCPU thread records a device wait (stores `stall_gpa`) and then reads the page
    /// state, while the caller stores the page state and then would read `stall_gpa`.
    /// Without a fence between on both sides each could miss the other's store, and a
    /// wait left on a page that just arrived would stay on record. Under the lock,
    /// either this sees the wait left, or the thread's look at the page state when it
    /// leaves the wait ([`StallRecord::leave_vmm_wait`], under the lock too) comes after
    /// this and finds the page present.
    /// True if it ended a wait inside a page fault (the install woke the thread).
    pub fn end(&self, gpa: u64) -> bool {
        let mut s = self.stall_lock();
        let Some(st) = (*s).filter(|st| st.gpa == gpa && (!st.in_vmm || st.left)) else {
            return false;
        };
        self.finish_locked(&mut s, Instant::now());
        st.in_kernel && !st.left
    }

    /// Whatever this vCPU waited for, it waits no more (it ends); the wait counts as
    /// blocktime, but not as a wait's length: its page never came.
    pub fn clear(&self) {
        if self.stall_gpa.load(Ordering::Acquire) == NO_STALL {
            return;
        }
        let mut s = self.stall_lock();
        if let Some(st) = s.take() {
            let (kernel, user) = st.split_us(Instant::now());
            self.blocktime_us
                .fetch_add(kernel + user, Ordering::Relaxed);
            self.blocktime_kernel_us
                .fetch_add(kernel, Ordering::Relaxed);
        }
        self.stall_gpa.store(NO_STALL, Ordering::Release);
    }

    /// The page this vCPU waits for, if any.
    pub fn gpa(&self) -> Option<u64> {
        let g = self.stall_gpa.load(Ordering::Acquire);
        (g != NO_STALL).then_some(g)
    }

    /// The current stall, if any.
    pub fn current(&self) -> Option<Stall> {
        self.gpa()?;
        *self.stall_lock()
    }

    /// Remembers the stall in progress as the VM begins to stop.
    pub fn note_at_stop(&self, now: Instant) {
        let st = self.current();
        *self.at_stop.lock().unwrap_or_else(|e| e.into_inner()) = st.map(|s| (s, now));
    }

    /// The page this vCPU waited for when the VM began to stop, and for how long (ms).
    pub fn at_stop(&self) -> Option<(u64, u64)> {
        let g = self.at_stop.lock().unwrap_or_else(|e| e.into_inner());
        g.map(|(s, at)| {
            (
                s.gpa,
                at.saturating_duration_since(s.since).as_millis() as u64,
            )
        })
    }

    /// Blocktime including the stall in progress.
    pub fn blocktime_us_now(&self, now: Instant) -> u64 {
        let done = self.blocktime_us.load(Ordering::Relaxed);
        let cur = self.current().map_or(0, |s| {
            now.saturating_duration_since(s.since).as_micros() as u64
        });
        done + cur
    }

    /// Blocktime split into (kernel, user space) microseconds, the stall in progress
    /// included.
    pub fn blocktime_split_us(&self, now: Instant) -> (u64, u64) {
        let total = self.blocktime_us.load(Ordering::Relaxed);
        let kernel = self.blocktime_kernel_us.load(Ordering::Relaxed).min(total);
        let (ck, cu) = self.current().map_or((0, 0), |s| s.split_us(now));
        (kernel + ck, total - kernel + cu)
    }
}

/// The one place that knows which vCPU waits for which page, as the fault loop sees
/// it. The fault loop reports to it and asks it; it never reaches into a vCPU itself.
pub struct Stalls {
    vcpus: Arc<[Arc<VcpuShared>]>,
}

impl Stalls {
    /// The tracker for these vCPUs.
    pub fn new(vcpus: Arc<[Arc<VcpuShared>]>) -> Self {
        Stalls { vcpus }
    }

    /// Thread `tid` faulted on page `gpa` (not present) at `now`: the vCPU's index, or
    /// `None` if `tid` is no vCPU thread (a VMM thread touched a missing page).
    pub fn fault(&self, tid: i32, gpa: u64, now: Instant) -> Option<usize> {
        let v = self.vcpus.iter().find(|v| v.tid() == tid)?;
        v.stall.fault_seen(gpa, now);
        Some(v.id)
    }

    /// Page `gpa` is installed: every wait on it is over. `ended` is told each vCPU
    /// whose wait in a page fault this ended.
    pub fn installed(&self, gpa: u64, mut ended: impl FnMut(usize)) {
        for v in self.vcpus.iter() {
            if v.stall.end(gpa) {
                ended(v.id);
            }
        }
    }

    /// The pages vCPUs wait for inside the kernel's page fault (each once).
    pub fn kernel_waits(&self) -> Vec<u64> {
        let mut pages: Vec<u64> = self
            .vcpus
            .iter()
            .filter_map(|v| v.stall.current())
            .filter(|s| s.in_kernel && !s.in_vmm)
            .map(|s| s.gpa)
            .collect();
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// Moves the kernel waits on page `gpa` to user space (rule 7): signals each vCPU
    /// waiting on it first, then runs `poison`. Counted as an escalation of each of
    /// them only when the poison took (a failed one is tried again). True if it
    /// poisoned; false, without poisoning, if no vCPU waits on `gpa` in the kernel any
    /// more (a poison no wait needs could only meet another vCPU's walk or event
    /// delivery without a signal pending).
    ///
    /// The signal comes first for a page that turns out to be read by KVM's page-table
    /// walk: with a signal already pending, `KVM_RUN` returns with the failed walk's
    /// #PF queued, which the vCPU cancels, instead of delivering it to the guest
    /// (NOTES.md).
    pub fn escalate<E>(&self, gpa: u64, poison: impl FnOnce() -> Result<(), E>) -> Result<bool, E> {
        let waiting: Vec<&Arc<VcpuShared>> = self
            .vcpus
            .iter()
            .filter(|v| {
                v.stall
                    .current()
                    .is_some_and(|s| s.gpa == gpa && s.in_kernel && !s.in_vmm)
            })
            .collect();
        if waiting.is_empty() {
            return Ok(false);
        }
        for v in &waiting {
            v.control.kick.nudge();
        }
        poison()?;
        for v in &waiting {
            v.stall.escalations.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const A: u64 = 0x5000;
    const B: u64 = 0x9000;

    /// A vCPU that faulted on page A `ago` ago, inside `KVM_RUN`.
    fn stalled(ago: Duration) -> (StallRecord, Instant) {
        let v = StallRecord::default();
        let t0 = Instant::now() - ago;
        v.enter_run();
        v.fault_seen(A, t0);
        (v, t0)
    }

    #[test]
    fn a_wait_left_on_a_missing_page_stays_until_the_page_arrives() {
        let (v, t0) = stalled(Duration::from_millis(40));
        v.leave_run(|_| true);
        let s = v.current().expect("kept");
        assert!(s.left && s.gpa == A && s.since == t0);
        assert_eq!(v.blocktime_us.load(Ordering::Relaxed), 0);
        // Back in KVM_RUN, it faults on the same page: the same wait, not a new fault.
        v.enter_run();
        v.fault_seen(A, Instant::now());
        let s = v.current().expect("still");
        assert!(!s.left && s.since == t0);
        assert_eq!(v.faults.load(Ordering::Relaxed), 1);
        // The page arrives: the wait counts once, from the first fault.
        v.end(A);
        assert!(v.current().is_none());
        let bt = v.blocktime_us.load(Ordering::Relaxed);
        assert!(bt >= 40_000, "{bt}");
        v.clear();
        assert_eq!(v.blocktime_us.load(Ordering::Relaxed), bt);
    }

    #[test]
    fn a_wait_whose_page_is_there_ends_when_the_thread_leaves() {
        let (v, _) = stalled(Duration::from_millis(5));
        v.leave_run(|_| false);
        assert!(v.current().is_none());
        assert!(v.blocktime_us.load(Ordering::Relaxed) >= 5_000);
    }

    #[test]
    fn a_fault_read_after_the_thread_left_kvm_run_is_kept_as_left() {
        // The vCPU faulted on A inside KVM_RUN, a pause got it out before the fault
        // loop read the event: nothing was on record to keep.
        let v = StallRecord::default();
        v.enter_run();
        v.leave_run(|_| true);
        let t0 = Instant::now() - Duration::from_millis(30);
        v.fault_seen(A, t0);
        let s = v.current().expect("the late fault is a wait");
        assert!(s.left && !s.in_vmm && s.gpa == A && s.since == t0, "{s:?}");
        assert_eq!(v.gpa(), Some(A));
        assert_eq!(v.faults.load(Ordering::Relaxed), 1);
        // Resumed, it faults on A again: the same wait, counted once, from t0.
        v.enter_run();
        v.fault_seen(A, Instant::now());
        let s = v.current().expect("still");
        assert!(!s.left && s.since == t0);
        assert_eq!(v.faults.load(Ordering::Relaxed), 1);
        v.leave_run(|_| true);
        // A arrives while it is parked: the whole wait is blocktime.
        v.end(A);
        assert!(v.current().is_none());
        assert!(v.blocktime_us.load(Ordering::Relaxed) >= 30_000);
    }

    #[test]
    fn a_late_fault_leaves_a_device_wait_on_record_alone() {
        let v = StallRecord::default();
        v.begin_vmm_wait(B);
        v.fault_seen(A, Instant::now());
        let s = v.current().expect("the device wait");
        assert!(s.in_vmm && s.gpa == B, "{s:?}");
        assert_eq!(v.faults.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_fault_on_another_page_ends_the_wait_left_before() {
        let (v, t0) = stalled(Duration::from_millis(20));
        v.leave_run(|_| true);
        v.enter_run();
        let t1 = t0 + Duration::from_millis(10);
        v.fault_seen(B, t1);
        assert_eq!(v.gpa(), Some(B));
        assert_eq!(v.blocktime_us.load(Ordering::Relaxed), 10_000);
        assert_eq!(v.faults.load(Ordering::Relaxed), 2);
        // Page A arriving now changes nothing.
        v.end(A);
        assert_eq!(v.gpa(), Some(B));
    }

    #[test]
    fn an_exit_on_a_poisoned_page_is_a_fault_and_its_late_event_is_not_another() {
        let v = StallRecord::default();
        v.begin_user_wait(A, |_| true);
        assert_eq!(v.faults.load(Ordering::Relaxed), 1);
        v.fault_seen(A, Instant::now());
        assert_eq!(v.faults.load(Ordering::Relaxed), 1);
        // A fault on record, escalated: the user wait goes on with it.
        let (w, _) = stalled(Duration::from_millis(1));
        w.leave_run(|_| true);
        w.begin_user_wait(A, |_| true);
        assert_eq!(w.faults.load(Ordering::Relaxed), 1);
        w.end(A);
        assert_eq!(w.waits.snapshot().total(), 1);
        // Parked, the page came meanwhile: back, the thread begins no wait.
        let (x, _) = stalled(Duration::from_millis(1));
        x.leave_run(|_| true);
        x.end(A);
        x.begin_user_wait(A, |_| false);
        assert!(x.current().is_none());
        assert_eq!(x.faults.load(Ordering::Relaxed), 1);
        assert_eq!(x.waits.snapshot().total(), 1);
    }

    #[test]
    fn a_device_wait_is_counted_once_and_not_as_a_fault() {
        let v = StallRecord::default();
        v.begin_vmm_wait(A);
        v.leave_vmm_wait(|_| true);
        v.begin_vmm_wait(A);
        assert_eq!(v.device_waits.load(Ordering::Relaxed), 1);
        assert_eq!(v.faults.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_device_wait_left_on_a_missing_page_is_ended_by_its_arrival() {
        let v = StallRecord::default();
        v.begin_vmm_wait(A);
        // While the thread is in it, the thread ends it (its range may span more pages).
        v.end(A);
        assert_eq!(v.gpa(), Some(A));
        let since = v.current().expect("wait").since;
        v.leave_vmm_wait(|_| true);
        // Tried again: the same wait goes on.
        v.begin_vmm_wait(A);
        assert_eq!(v.current().expect("wait").since, since);
        v.leave_vmm_wait(|_| true);
        v.end(A);
        assert!(v.current().is_none());
    }
}
