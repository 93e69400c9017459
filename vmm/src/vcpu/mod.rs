//! vCPUs: one thread each. [`run`] is the run loop (a small state machine), [`exits`]
//! dispatches exits to devices, [`kick`] gets a thread out of `KVM_RUN`, [`setup`]
//! puts a vCPU into 64-bit mode at the guest's entry point.

pub mod exits;
pub mod kick;
pub mod run;
pub mod setup;

use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::abi;

/// Where a vCPU thread is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RunState {
    /// Created, thread not started yet.
    Created = 0,
    /// In or around `KVM_RUN`.
    Running = 1,
    /// Parked by a pause request.
    Paused = 2,
    /// The thread ended.
    Exited = 3,
}

/// A page wait the fault loop saw.
#[derive(Clone, Copy, Debug)]
pub struct Stall {
    /// Guest-physical page address.
    pub gpa: u64,
    /// When the fault was seen.
    pub since: Instant,
    /// A signal was seen stuck in this stall: the thread cannot be interrupted.
    pub deaf: bool,
}

const NO_STALL: u64 = u64::MAX;

/// What the vCPU thread shares with the fault loop, the control socket and the report.
pub struct VcpuShared {
    /// vCPU index.
    pub id: usize,
    /// The kick protocol.
    pub kick: kick::Kick,
    tid: AtomicI32,
    state: AtomicU8,
    stall: Mutex<Option<Stall>>,
    /// Mirror of `stall.gpa` for lock-free checks.
    stall_gpa: AtomicU64,
    /// `KVM_RUN` exits handled (not counting `EINTR`).
    pub exits: AtomicU64,
    /// Page faults seen from this vCPU.
    pub faults: AtomicU64,
    /// Microseconds spent waiting for pages.
    pub blocktime_us: AtomicU64,
    /// Heartbeats received.
    pub heartbeats: AtomicU64,
    /// The figures the guest reported.
    pub results: Mutex<Option<abi::Results>>,
    /// The stall in progress when the VM began to stop (for the summary and report).
    stall_at_stop: Mutex<Option<(Stall, Instant)>>,
}

impl VcpuShared {
    /// State for vCPU `id`.
    pub fn new(id: usize) -> Self {
        VcpuShared {
            id,
            kick: kick::Kick::default(),
            tid: AtomicI32::new(0),
            state: AtomicU8::new(RunState::Created as u8),
            stall: Mutex::new(None),
            stall_gpa: AtomicU64::new(NO_STALL),
            exits: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            blocktime_us: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            results: Mutex::new(None),
            stall_at_stop: Mutex::new(None),
        }
    }

    /// Kernel thread id of the vCPU thread (0 before it starts).
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }

    pub(crate) fn set_tid(&self, tid: i32) {
        self.tid.store(tid, Ordering::Release);
    }

    /// Where the thread is in its life.
    pub fn run_state(&self) -> RunState {
        match self.state.load(Ordering::Acquire) {
            0 => RunState::Created,
            1 => RunState::Running,
            2 => RunState::Paused,
            _ => RunState::Exited,
        }
    }

    pub(crate) fn set_run_state(&self, s: RunState) {
        self.state.store(s as u8, Ordering::Release);
    }

    fn stall_lock(&self) -> std::sync::MutexGuard<'_, Option<Stall>> {
        self.stall.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fault loop saw this vCPU fault on page `gpa`.
    pub fn begin_stall(&self, gpa: u64, now: Instant) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        let mut s = self.stall_lock();
        if s.is_some_and(|s| s.gpa == gpa) {
            return;
        }
        *s = Some(Stall {
            gpa,
            since: now,
            deaf: false,
        });
        self.stall_gpa.store(gpa, Ordering::Release);
    }

    /// Page `gpa` arrived: if this vCPU waited for it, its wait is over.
    pub fn end_stall(&self, gpa: u64, now: Instant) {
        if self.stall_gpa.load(Ordering::Acquire) != gpa {
            return;
        }
        self.clear_stall(now);
    }

    /// The vCPU left `KVM_RUN`: whatever it waited for, it waits no more.
    pub fn clear_stall(&self, now: Instant) {
        if self.stall_gpa.load(Ordering::Acquire) == NO_STALL {
            return;
        }
        let mut s = self.stall_lock();
        if let Some(st) = s.take() {
            let us = now.saturating_duration_since(st.since).as_micros() as u64;
            self.blocktime_us.fetch_add(us, Ordering::Relaxed);
        }
        self.stall_gpa.store(NO_STALL, Ordering::Release);
    }

    /// The page this vCPU waits for, if any.
    pub fn stalled_gpa(&self) -> Option<u64> {
        let g = self.stall_gpa.load(Ordering::Acquire);
        (g != NO_STALL).then_some(g)
    }

    /// When the current stall began.
    pub fn stall_since(&self) -> Option<Instant> {
        self.stalled_gpa()?;
        self.stall_lock().map(|s| s.since)
    }

    /// The current stall, if any.
    pub fn stall(&self) -> Option<Stall> {
        *self.stall_lock()
    }

    pub(crate) fn mark_stall_deaf(&self) {
        if let Some(s) = self.stall_lock().as_mut() {
            s.deaf = true;
        }
    }

    /// Remembers the stall in progress as the VM begins to stop.
    pub fn note_stall_at_stop(&self, now: Instant) {
        let st = self.stall();
        *self.stall_at_stop.lock().unwrap_or_else(|e| e.into_inner()) = st.map(|s| (s, now));
    }

    /// The page this vCPU waited for when the VM began to stop, and for how long (ms).
    pub fn stall_at_stop(&self) -> Option<(u64, u64)> {
        let g = self.stall_at_stop.lock().unwrap_or_else(|e| e.into_inner());
        g.map(|(s, at)| {
            (
                s.gpa,
                at.saturating_duration_since(s.since).as_millis() as u64,
            )
        })
    }

    /// Kicks this vCPU (see [`kick`]). A vCPU the fault loop saw stall is signalled only
    /// if its kernel stack shows a wait that signals can end (rule 7); an unreadable
    /// stack is looked at a few more times (a thread just entering its wait is not on
    /// the wait queue yet), then counts as deaf until [`kick::supervise`] knows better.
    pub fn request_kick(&self) -> Option<u64> {
        let signal = match self.stall() {
            None => true,
            Some(s) if s.deaf => false,
            Some(_) => {
                let mut path = kick::stall_path(self.tid());
                for _ in 0..5 {
                    if path != kick::StallPath::Unknown || self.stalled_gpa().is_none() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    path = kick::stall_path(self.tid());
                }
                if path == kick::StallPath::Emulator {
                    self.mark_stall_deaf();
                }
                path == kick::StallPath::Gup || self.stalled_gpa().is_none()
            }
        };
        self.kick.request(signal)
    }

    /// Blocktime including the stall in progress.
    pub fn blocktime_us_now(&self, now: Instant) -> u64 {
        let done = self.blocktime_us.load(Ordering::Relaxed);
        let cur = self.stall().map_or(0, |s| {
            now.saturating_duration_since(s.since).as_micros() as u64
        });
        done + cur
    }

    /// The state shown to users: running, paused, halted, stalled or exited.
    pub fn display_state(&self) -> &'static str {
        match self.run_state() {
            RunState::Exited => "exited",
            RunState::Paused => "paused",
            RunState::Created => "running",
            RunState::Running if self.stalled_gpa().is_some() => "stalled",
            RunState::Running if thread_sleeps(self.tid()) => "halted",
            RunState::Running => "running",
        }
    }
}

/// True if thread `tid` sleeps in the kernel. A vCPU thread that is in `KVM_RUN`, not
/// waiting for a page and asleep is in the in-kernel HLT.
fn thread_sleeps(tid: i32) -> bool {
    if tid == 0 {
        return false;
    }
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|s| {
            // The state letter follows the ")" that closes the command name.
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|st| st == "S")
        })
        .unwrap_or(false)
}
