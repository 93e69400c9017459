//! vCPU control: requests to a vCPU, answered by the vCPU itself, and its run state.
//!
//! Whoever wants a vCPU to do something posts a [`Request`] through
//! [`crate::vm::shared::VmShared::ask`], which rings the doorbell (a kick,
//! [`super::kick`]) and hands back the kick's ticket. The vCPU answers from its own
//! loop ([`super::run`]), never from another thread:
//! - [`Request::Stop`]: the vCPU parks and stays parked while any [`Holder`] holds it;
//!   the ticket is answered once it shows [`RunState::Paused`] (rule 6). One exception:
//!   while a save waits for work in progress (below), the vCPU answers kicks so that the
//!   work can finish, and parks right after it, before it enters the guest; whoever
//!   needs it parked checks [`Control::parked`] too. Each holder has its own bit, so
//!   the operator's `resume` never undoes a migration's hold and the switch-over's end
//!   never undoes the operator's pause.
//! - [`Request::Release`]: the holder lets go; the vCPU runs again when none is left.
//! - [`Request::Save`]: at its next park the vCPU stores its state for migration
//!   ([`Control::take_saved`]); with a stop, that park comes at once. A save waits for
//!   work in progress (a device access or page wait a kick interrupted) to finish. Each
//!   save has a number: a state saved for an earlier one (cancelled while the vCPU was
//!   saving) is dropped, never handed to a later switch-over.
//! - [`Request::CancelSave`]: a save no longer wanted.
//!
//! Run states ([`RunState`]), one per vCPU:
//!
//! ```text
//!   Created --start--> Running <--park/unpark--> Paused
//!                        |  ^
//!          fault on a    |  |  page installed, or the wait moved to user space
//!          missing page  v  |  and the page came (or a kick ended the wait)
//!                    WaitingKernel --escalation, kick--> WaitingUser
//!   Running: also Halted (in KVM_RUN, asleep in HLT)
//!   any --thread ends--> Exited
//! ```
//!
//! The vCPU thread sets its life phase (created, running, paused, exited) here; the
//! stall record ([`super::stalls`]) adds whether a running vCPU waits for a page, and
//! where. [`super::VcpuShared::run_state`] puts both together.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use super::inspect::{Inspect, Op, Reply};
use super::kick::{Ack, Kick};

/// Who holds a vCPU stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Holder {
    /// The operator's `pause` (control socket).
    Operator = 1,
    /// A migration's switch-over (until the destination runs the guest, or it fails).
    Migration = 2,
    /// A debugger's all-stop (until it continues or detaches).
    Debugger = 4,
}

/// A request to a vCPU (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Park, and stay parked while held.
    Stop(Holder),
    /// Stop holding the vCPU.
    Release(Holder),
    /// Save the vCPU's state at its next park.
    Save,
    /// Drop a save asked for and not taken.
    CancelSave,
}

/// Where a vCPU is, as one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Created, thread not started yet.
    Created,
    /// Running the guest, or handling an exit.
    Running,
    /// In `KVM_RUN`, asleep in the guest's HLT.
    Halted,
    /// Waiting for a page inside `KVM_RUN`, in the kernel's page fault.
    WaitingKernel,
    /// Waiting for a page in user space (an escalated fault, or a device access).
    WaitingUser,
    /// Parked by a stop request.
    Paused,
    /// The thread ended.
    Exited,
}

impl RunState {
    /// The name status shows. Both page waits show `"stalled"` (status says where in
    /// `wait`).
    pub fn name(self) -> &'static str {
        match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Halted => "halted",
            RunState::WaitingKernel | RunState::WaitingUser => "stalled",
            RunState::Paused => "paused",
            RunState::Exited => "exited",
        }
    }
}

/// The vCPU thread's life phase, the part of [`RunState`] the thread sets itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Phase {
    Created = 0,
    Running = 1,
    Paused = 2,
    Exited = 3,
}

/// A save asked for (by number), and its result once there.
enum Save {
    None,
    Asked(u64),
    Done(Result<Vec<u8>, String>),
}

/// One vCPU's mailbox: the doorbell, the holders, the save slot, the debugger's ops
/// and the life phase.
pub struct Control {
    /// The doorbell (rule 6).
    pub kick: Kick,
    /// Work the debugger asks of the parked vCPU.
    pub inspect: Inspect,
    /// Bits of the [`Holder`]s holding the vCPU stopped (read on every exit, so an
    /// atomic).
    holds: AtomicU8,
    save: Mutex<Save>,
    /// The number of the last save asked for.
    saves: AtomicU64,
    phase: AtomicU8,
    /// Parked with an access half done (KVM finishes it on re-entry).
    mid_instruction: AtomicBool,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            kick: Kick::default(),
            inspect: Inspect::default(),
            holds: AtomicU8::new(0),
            save: Mutex::new(Save::None),
            saves: AtomicU64::new(0),
            mid_instruction: AtomicBool::new(false),
            phase: AtomicU8::new(Phase::Created as u8),
        }
    }
}

impl Control {
    fn save_lock(&self) -> std::sync::MutexGuard<'_, Save> {
        self.save.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `r`. True if the vCPU must be kicked to answer it (a stop or a save);
    /// a release wakes a parked vCPU itself. Call through
    /// [`crate::vm::shared::VmShared::ask`], which kicks.
    ///
    /// A stop is stored before the kick that follows it counts, which is what lets
    /// [`Kick::acknowledge_unless`] leave such a kick for the park (rule 6).
    pub(crate) fn post(&self, r: Request) -> bool {
        match r {
            Request::Stop(h) => {
                self.holds.fetch_or(h as u8, Ordering::SeqCst);
                true
            }
            Request::Release(h) => {
                self.holds.fetch_and(!(h as u8), Ordering::SeqCst);
                self.kick.wake();
                false
            }
            Request::Save => {
                let n = self.saves.fetch_add(1, Ordering::SeqCst) + 1;
                *self.save_lock() = Save::Asked(n);
                true
            }
            Request::CancelSave => {
                *self.save_lock() = Save::None;
                false
            }
        }
    }

    /// True while some holder holds the vCPU stopped.
    pub fn held(&self) -> bool {
        self.holds.load(Ordering::SeqCst) != 0
    }

    /// True if `h` holds the vCPU stopped.
    pub fn held_by(&self, h: Holder) -> bool {
        self.holds.load(Ordering::SeqCst) & h as u8 != 0
    }

    /// True while a save is asked for and not done.
    pub fn save_asked(&self) -> bool {
        self.save_number().is_some()
    }

    /// The number of the save asked for and not done, if any.
    pub(super) fn save_number(&self) -> Option<u64> {
        match *self.save_lock() {
            Save::Asked(n) => Some(n),
            _ => None,
        }
    }

    /// The saved state (or why saving failed), once there; taking it ends the save.
    pub fn take_saved(&self) -> Option<Result<Vec<u8>, String>> {
        let mut s = self.save_lock();
        match std::mem::replace(&mut *s, Save::None) {
            Save::Done(r) => Some(r),
            other => {
                *s = other;
                None
            }
        }
    }

    /// The vCPU thread stores the state it saved for save `n` (dropped if that save was
    /// cancelled, or another one asked for since).
    pub(super) fn put_saved(&self, n: u64, r: Result<Vec<u8>, String>) {
        let mut s = self.save_lock();
        if matches!(*s, Save::Asked(m) if m == n) {
            *s = Save::Done(r);
        }
    }

    /// Whether the vCPU must go to its park branch now. `busy`: work a kick
    /// interrupted is pending (a save waits for it: an emulated access waiting for its
    /// page is half an instruction, which KVM finishes on the next `KVM_RUN`).
    pub(super) fn must_park(&self, busy: bool) -> bool {
        self.held() && !(busy && self.save_asked())
    }

    /// Whether a wait of the vCPU thread (for a page, for a device) must end to let it
    /// answer a request: a kick is outstanding, or a holder holds it. Not a hold while
    /// a save is asked for: the save waits for the work in progress, so ending its wait
    /// would only have the loop redo it at once, round and round until the page comes.
    pub(super) fn interrupts(&self) -> bool {
        !self.kick.answered() || (self.held() && !self.save_asked())
    }

    /// The run loop's answer to kicks before it enters the guest (see
    /// [`Kick::acknowledge_unless`]): [`Ack::Park`] if it must park instead.
    pub(super) fn answer(&self, latency_us: &Mutex<Histogram<u64>>, busy: bool) -> Ack {
        self.kick
            .acknowledge_unless(latency_us, || self.must_park(busy))
    }

    /// Parks the vCPU thread: shows [`RunState::Paused`] (before answering any kick,
    /// so whoever waits for the answer sees it paused), answers kicks, runs the
    /// debugger's ops with `serve` (still parked), and returns when no holder is left
    /// or `leave()` holds.
    pub(super) fn park(
        &self,
        latency_us: &Mutex<Histogram<u64>>,
        leave: impl Fn() -> bool,
        busy: bool,
        mut serve: impl FnMut(Op) -> Reply,
    ) {
        self.mid_instruction.store(busy, Ordering::SeqCst);
        self.set_phase(Phase::Paused);
        loop {
            self.kick.park(latency_us, || {
                self.held() && !leave() && !self.inspect.pending()
            });
            match self.inspect.take() {
                Some((n, op)) => self.inspect.reply(n, serve(op)),
                None => break,
            }
        }
        self.set_phase(Phase::Running);
    }

    pub(super) fn phase(&self) -> Phase {
        // SeqCst, as the store: see `VmShared::wait_vcpus_exited`.
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Created,
            1 => Phase::Running,
            2 => Phase::Paused,
            _ => Phase::Exited,
        }
    }

    pub(super) fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::SeqCst);
    }

    /// True while the vCPU thread is parked.
    pub fn parked(&self) -> bool {
        self.phase() == Phase::Paused
    }

    /// True while it is parked in the middle of an instruction (a port or emulated
    /// access that KVM finishes when it runs on).
    pub fn parked_mid_instruction(&self) -> bool {
        self.parked() && self.mid_instruction.load(Ordering::SeqCst)
    }

    /// True once the vCPU thread has started (it may have ended since).
    pub fn started(&self) -> bool {
        self.phase() != Phase::Created
    }

    /// True once the vCPU thread has ended.
    pub fn ended(&self) -> bool {
        self.phase() == Phase::Exited
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::kick::{install_handler, Detach};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn hist() -> Mutex<Histogram<u64>> {
        Mutex::new(crate::fault::new_histogram())
    }

    /// Posts `r` and kicks as `VmShared::ask` does.
    fn ask(c: &Control, r: Request) -> Option<u64> {
        if c.post(r) {
            c.kick.request()
        } else {
            None
        }
    }

    #[test]
    fn a_kick_that_comes_with_a_stop_is_left_for_the_park() {
        install_handler().expect("SIGUSR1 handler");
        let f = AtomicU8::new(0);
        let c = Control::default();
        // SAFETY: `f` outlives the attachment (detached below) and is accessed only
        // atomically; this thread outlives it too.
        unsafe { c.kick.attach(0, f.as_ptr()) };
        let h = hist();
        assert_eq!(c.answer(&h, false), Ack::Nothing);
        // (The signal goes to this thread: the handler does nothing.)
        let seq = ask(&c, Request::Stop(Holder::Operator)).expect("attached");
        assert_eq!(f.load(Ordering::SeqCst), 1);
        assert_eq!(c.answer(&h, false), Ack::Park);
        // Unanswered, and KVM_RUN would still return at once.
        assert!(!c.kick.answered() && f.load(Ordering::SeqCst) == 1);
        assert!(!c.kick.wait_answered(seq, Instant::now()));
        // The park answers it, showing paused first.
        std::thread::scope(|s| {
            s.spawn(|| c.park(&h, || false, false, |_| Reply::Done));
            assert!(c
                .kick
                .wait_answered(seq, Instant::now() + Duration::from_secs(10)));
            assert_eq!(c.phase(), Phase::Paused);
            ask(&c, Request::Release(Holder::Operator));
        });
        assert_eq!(c.phase(), Phase::Running);
        assert_eq!(f.load(Ordering::SeqCst), 0);
        // Without a reason to park, a kick is answered as before.
        let seq = c.kick.request().expect("attached");
        assert_eq!(c.answer(&h, false), Ack::Answered);
        assert!(c.kick.wait_answered(seq, Instant::now()) && f.load(Ordering::SeqCst) == 0);
        c.kick.detach();
    }

    /// A model of the run loop's top against stops landing at any moment: the vCPU
    /// checks whether it must park, then answers kicks and "enters the guest" (which
    /// returns once `immediate_exit` is set, or by itself after a short while). A stop
    /// whose kick is answered must find the vCPU parked. The model dawdles between its
    /// check and its answer, as a preempted vCPU thread would, so that stops land there
    /// (with a plain `acknowledge` instead, 333-361 of the 20,000 rounds failed).
    #[test]
    fn a_stop_is_answered_only_by_a_parked_vcpu() {
        install_handler().expect("SIGUSR1 handler");
        let f = Arc::new(AtomicU8::new(0));
        let c = Arc::new(Control::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, f2, stop2) = (c.clone(), f.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let vcpu = std::thread::spawn(move || {
            let h = hist();
            // SAFETY: `f2` (an Arc this closure holds) outlives the attachment, which
            // `_detach` ends on any way out; accessed only atomically.
            unsafe { c2.kick.attach(0, f2.as_ptr()) };
            let _detach = Detach(&c2.kick);
            c2.set_phase(Phase::Running);
            let _ = tx.send(());
            let mut turn = 0u32;
            while !stop2.load(Ordering::SeqCst) {
                if c2.must_park(false) {
                    c2.park(&h, || stop2.load(Ordering::SeqCst), false, |_| Reply::Done);
                    continue;
                }
                turn = turn.wrapping_add(1);
                for _ in 0..turn % 64 * 20 {
                    std::hint::spin_loop();
                }
                if c2.answer(&h, false) == Ack::Park {
                    continue;
                }
                for _ in 0..200 {
                    if f2.load(Ordering::SeqCst) != 0 {
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
        });
        let _ = rx.recv();
        let mut bad = 0;
        let rounds = 20_000;
        for i in 0..rounds {
            let seq = ask(&c, Request::Stop(Holder::Operator)).expect("attached");
            if c.kick
                .wait_answered(seq, Instant::now() + Duration::from_secs(10))
                && c.phase() != Phase::Paused
            {
                bad += 1;
            }
            ask(&c, Request::Release(Holder::Operator));
            // Land the next stop at varying points of the loop.
            for _ in 0..(i % 97) * 10 {
                std::hint::spin_loop();
            }
        }
        stop.store(true, Ordering::SeqCst);
        c.kick.wake();
        let _ = vcpu.join();
        assert_eq!(
            bad, 0,
            "{bad} of {rounds} stops answered by a vCPU not parked"
        );
    }

    #[test]
    fn each_holder_lets_go_of_its_own_hold_only() {
        let c = Control::default();
        assert!(c.post(Request::Stop(Holder::Operator)));
        assert!(c.post(Request::Stop(Holder::Migration)));
        assert!(!c.post(Request::Release(Holder::Operator)));
        assert!(c.held() && c.held_by(Holder::Migration) && !c.held_by(Holder::Operator));
        c.post(Request::Release(Holder::Migration));
        assert!(!c.held());
    }

    #[test]
    fn a_save_is_taken_once_and_a_cancelled_one_is_dropped() {
        let c = Control::default();
        assert_eq!(c.take_saved(), None);
        c.post(Request::Save);
        assert!(c.save_asked() && c.take_saved().is_none());
        let n = c.save_number().expect("asked");
        c.put_saved(n, Ok(vec![1, 2]));
        assert!(!c.save_asked());
        assert_eq!(c.take_saved(), Some(Ok(vec![1, 2])));
        assert_eq!(c.take_saved(), None);
        // Cancelled before the vCPU got to it: what it stores later is dropped.
        c.post(Request::Save);
        let n = c.save_number().expect("asked");
        c.post(Request::CancelSave);
        c.put_saved(n, Ok(vec![3]));
        assert_eq!(c.take_saved(), None);
        // Cancelled while the vCPU was saving, and asked for again (a second
        // switch-over): the state saved for the first is not the second's.
        c.post(Request::Save);
        let first = c.save_number().expect("asked");
        c.post(Request::CancelSave);
        c.post(Request::Save);
        c.put_saved(first, Ok(vec![4]));
        assert!(c.save_asked() && c.take_saved().is_none());
        let second = c.save_number().expect("asked");
        c.put_saved(second, Ok(vec![5]));
        assert_eq!(c.take_saved(), Some(Ok(vec![5])));
    }

    #[test]
    fn a_parked_vcpu_serves_the_debugger_s_ops_without_leaving_its_park() {
        let c = Control::default();
        c.post(Request::Stop(Holder::Debugger));
        let h = hist();
        // Not parked: the op is withdrawn at the deadline, and never runs later.
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(c.inspect.call(&c.kick, Op::Read, soon).is_none());
        assert!(!c.inspect.pending());
        let served = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                c.park(
                    &h,
                    || false,
                    false,
                    |_| {
                        served.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(c.phase(), Phase::Paused, "served while parked");
                        Reply::Done
                    },
                )
            });
            for _ in 0..3 {
                let r = c
                    .inspect
                    .call(&c.kick, Op::Read, Instant::now() + Duration::from_secs(10));
                assert!(matches!(r, Some(Reply::Done)), "{r:?}");
            }
            c.post(Request::Release(Holder::Debugger));
        });
        assert_eq!(served.load(Ordering::SeqCst), 3);
        assert_eq!(c.phase(), Phase::Running);
    }

    #[test]
    fn a_save_holds_a_stop_back_only_while_work_is_pending() {
        let c = Control::default();
        c.post(Request::Stop(Holder::Migration));
        assert!(c.must_park(false) && c.must_park(true));
        c.post(Request::Save);
        assert!(c.must_park(false) && !c.must_park(true));
        assert!(
            !c.interrupts(),
            "a save's wait is not cut short by its own stop"
        );
    }
}
