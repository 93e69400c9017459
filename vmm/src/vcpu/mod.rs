//! vCPUs: one thread each. [`run`] is the run loop, [`control`] the requests it
//! answers and its run state, [`stalls`] its page waits (and the tracker the fault loop
//! reports to), [`exits`] dispatches exits to devices, [`poison`] finishes an access
//! whose page wait moved to user space, [`kick`] gets a thread out of `KVM_RUN`,
//! [`setup`] puts a vCPU into 64-bit mode at the guest's entry point.

pub mod control;
pub mod critical;
pub mod exits;
pub mod inspect;
pub mod kick;
pub mod kvm_run;
pub mod poison;
pub mod run;
pub mod setup;
pub mod stalls;
pub mod state;

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use crate::abi;
use control::{Control, Phase};
pub use control::{Holder, Request, RunState};
use stalls::{Stall, StallRecord};

/// What the vCPU thread shares with the fault loop, the control socket and the report.
pub struct VcpuShared {
    /// vCPU index.
    pub id: usize,
    /// Requests to the vCPU, the doorbell, the life phase.
    pub control: Control,
    /// Its page wait and blocktime.
    pub stall: StallRecord,
    tid: AtomicI32,
    /// `KVM_RUN` exits handled (not counting `EINTR`).
    pub exits: AtomicU64,
    /// Heartbeats received.
    pub heartbeats: AtomicU64,
    /// The figures the guest reported.
    pub results: Mutex<Option<abi::Results>>,
    /// When the thread first entered `KVM_RUN` (wall clock: compared across processes).
    pub first_entry: OnceLock<SystemTime>,
}

impl VcpuShared {
    /// State for vCPU `id`.
    pub fn new(id: usize) -> Self {
        VcpuShared {
            id,
            control: Control::default(),
            stall: StallRecord::default(),
            tid: AtomicI32::new(0),
            exits: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            results: Mutex::new(None),
            first_entry: OnceLock::new(),
        }
    }

    /// Kernel thread id of the vCPU thread (0 before it starts).
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }

    pub(crate) fn set_tid(&self, tid: i32) {
        self.tid.store(tid, Ordering::Release);
    }

    /// Kicks this vCPU (see [`kick`]). Always signalled: a page wait that a signal
    /// cannot reach does not last, the fault loop escalates it at once (rule 7).
    pub fn request_kick(&self) -> Option<u64> {
        self.control.kick.request()
    }

    /// Where the vCPU is (see [`control`]).
    pub fn run_state(&self) -> RunState {
        self.run_state_with(self.stall.current().as_ref())
    }

    /// [`VcpuShared::run_state`] for a caller that has read the stall already, so
    /// that what it shows agrees (a wait can end between two reads).
    pub fn run_state_with(&self, stall: Option<&Stall>) -> RunState {
        match self.control.phase() {
            Phase::Created => RunState::Created,
            Phase::Paused => RunState::Paused,
            Phase::Exited => RunState::Exited,
            Phase::Running => match stall {
                Some(s) if s.in_kernel => RunState::WaitingKernel,
                Some(_) => RunState::WaitingUser,
                None if self.stall.in_run() && thread_state(self.tid()) == Some('S') => {
                    RunState::Halted
                }
                None => RunState::Running,
            },
        }
    }
}

/// The scheduler state letter of thread `tid` of this process (`R`, `S`, `D`, ...).
pub fn thread_state(tid: i32) -> Option<char> {
    if tid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // The state letter follows the ")" that closes the command name.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_without_a_thread_is_created() {
        let v = VcpuShared::new(3);
        assert_eq!(v.run_state(), RunState::Created);
        assert_eq!(v.request_kick(), None);
        v.control.set_phase(Phase::Exited);
        assert_eq!(v.run_state(), RunState::Exited);
    }

    #[test]
    fn a_running_vcpu_shows_where_it_waits() {
        let v = VcpuShared::new(0);
        v.control.set_phase(Phase::Running);
        assert_eq!(v.run_state(), RunState::Running);
        v.stall.enter_run();
        v.stall.fault_seen(0x5000, std::time::Instant::now());
        assert_eq!(v.run_state(), RunState::WaitingKernel);
        v.stall.leave_run(|_| true);
        assert_eq!(v.run_state(), RunState::WaitingUser);
        v.control.set_phase(Phase::Paused);
        assert_eq!(v.run_state(), RunState::Paused, "parked on a missing page");
        v.stall.end(0x5000);
        v.control.set_phase(Phase::Running);
        assert_eq!(v.run_state(), RunState::Running);
    }
}
