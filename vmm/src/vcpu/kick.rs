//! Kicks: getting a vCPU thread out of `KVM_RUN` and knowing when it is out.
//!
//! Protocol (rule 6): the kicker sets `kvm_run.immediate_exit`, then sends `SIGUSR1`.
//! A kick that lands just before `KVM_RUN` is therefore not lost: KVM sees the flag and
//! returns `EINTR` at once. The vCPU thread acknowledges after `KVM_RUN` returns (or at
//! the top of its loop) and clears the flag. The signal handler does nothing; a stray
//! `SIGUSR1` just costs one extra trip round the loop.
//!
//! Rule 7: on the instruction-emulator path (guest CPL0 on this machine) a thread waiting
//! for a missing page does not take signals, and once `SIGUSR1` is pending it spins in the
//! kernel until the page arrives. Measured here: neither `SIG_IGN` (which empties the
//! queue but leaves the thread's pending flag set) nor `immediate_exit` ends that spin.
//! So the signal must not be sent at all: before signalling a vCPU that the fault loop
//! knows is stalled, [`stall_path`] reads the thread's kernel stack and, on the emulator
//! path, the kick is *withheld* (`immediate_exit` is still set) and sent when the stall
//! ends. [`supervise`] re-sends withheld kicks and reports a thread that got a signal
//! anyway (a kick racing with the fault, or a stray `kill`).

use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::VcpuShared;

/// The kick signal.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

/// How long a signal may stay pending in a stalled thread before we call it stuck.
const STUCK_AFTER: Duration = Duration::from_millis(5);

extern "C" fn on_kick(_sig: libc::c_int) {
    // Nothing: the signal's only job is to make KVM_RUN return EINTR.
}

/// Installs the (empty) `SIGUSR1` handler, without `SA_RESTART`.
pub fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; we set a handler that does
    // nothing (trivially async-signal-safe) and an empty mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(KICK_SIGNAL, &sa, ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Which kernel path a thread waiting in `handle_userfault` came by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallPath {
    /// KVM's MMU fault path through GUP: a signal ends the wait (`KVM_RUN` -> `EINTR`).
    Gup,
    /// KVM's instruction emulator (`copy_to/from_user`): signals are not taken.
    Emulator,
    /// Not waiting in `handle_userfault`, or the stack cannot be read.
    Unknown,
}

impl StallPath {
    /// Name used in status replies and the report.
    pub fn name(self) -> &'static str {
        match self {
            StallPath::Gup => "gup",
            StallPath::Emulator => "emulator",
            StallPath::Unknown => "unknown",
        }
    }
}

/// Reads thread `tid`'s kernel stack (root only) to tell which path its page wait took.
pub fn stall_path(tid: i32) -> StallPath {
    let Ok(stack) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stack")) else {
        return StallPath::Unknown;
    };
    if !stack.contains("handle_userfault") {
        return StallPath::Unknown;
    }
    const EMULATOR: [&str; 5] = [
        "x86_emulate_insn",
        "emulator_read_write",
        "kvm_vcpu_write_guest",
        "kvm_vcpu_read_guest",
        "kvm_fetch_guest_virt",
    ];
    if EMULATOR.iter().any(|f| stack.contains(f)) {
        StallPath::Emulator
    } else if stack.contains("hva_to_pfn") || stack.contains("get_user_pages") {
        StallPath::Gup
    } else {
        StallPath::Unknown
    }
}

/// Whether `SIGUSR1` is pending for thread `tid` (thread or process queue).
fn sigusr1_pending(tid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
        return false;
    };
    let bit = 1u64 << (KICK_SIGNAL - 1);
    status
        .lines()
        .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .any(|mask| mask & bit != 0)
}

/// Kick state shared between a vCPU thread and those who kick it.
pub struct Kick {
    inner: Mutex<KickInner>,
    cv: Condvar,
    /// Mirrors `requested > acked`, readable without the lock.
    outstanding: AtomicBool,
}

/// The state behind [`Kick`]'s lock.
pub struct KickInner {
    alive: bool,
    thread: libc::pthread_t,
    tid: i32,
    /// `&kvm_run.immediate_exit` of the vCPU; null unless `alive`.
    immediate_exit: *mut u8,
    requested: u64,
    acked: u64,
    /// When the oldest unanswered kick was asked.
    asked_at: Option<Instant>,
    /// The signal for the outstanding kick was not sent because the thread sits in a
    /// stall that ignores signals; send it when the stall ends.
    withheld: bool,
    /// Since when `SIGUSR1` has been seen pending while the thread was stalled.
    pending_seen: Option<Instant>,
    /// The page of the last stall found with a signal stuck in it (handled once).
    reported: Option<u64>,
    /// The vCPU is asked to stay paused.
    pub pause: bool,
}

// SAFETY: the raw pointer is only dereferenced under the lock while `alive` is true, and
// the vCPU thread clears it (under the same lock) before it unmaps kvm_run.
unsafe impl Send for KickInner {}

impl Default for Kick {
    fn default() -> Self {
        Kick {
            inner: Mutex::new(KickInner {
                alive: false,
                thread: 0,
                tid: 0,
                immediate_exit: ptr::null_mut(),
                requested: 0,
                acked: 0,
                asked_at: None,
                withheld: false,
                pending_seen: None,
                reported: None,
                pause: false,
            }),
            cv: Condvar::new(),
            outstanding: AtomicBool::new(false),
        }
    }
}

impl KickInner {
    fn set_immediate_exit(&mut self, v: u8) {
        if self.alive && !self.immediate_exit.is_null() {
            // SAFETY: immediate_exit points into this vCPU's kvm_run mapping, which stays
            // mapped while `alive` (see the Send impl); a byte store is what KVM expects.
            unsafe { ptr::write_volatile(self.immediate_exit, v) };
        }
    }

    fn send_signal(&mut self) {
        if !self.alive {
            return;
        }
        // SAFETY: `thread` is the live vCPU thread (alive is only true between attach and
        // detach, both done by that thread under this lock).
        unsafe { libc::pthread_kill(self.thread, KICK_SIGNAL) };
        self.withheld = false;
    }

    /// True while a kick waits for its answer.
    pub fn outstanding(&self) -> bool {
        self.requested > self.acked
    }
}

impl Kick {
    fn lock(&self) -> MutexGuard<'_, KickInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the vCPU thread before its first `KVM_RUN`.
    pub fn attach(&self, tid: i32, immediate_exit: *mut u8) {
        let mut k = self.lock();
        // SAFETY: pthread_self has no preconditions.
        k.thread = unsafe { libc::pthread_self() };
        k.tid = tid;
        k.immediate_exit = immediate_exit;
        k.alive = true;
        if k.outstanding() {
            k.set_immediate_exit(1);
        }
    }

    /// Called by the vCPU thread before it drops its vCPU fd; kicks after this are no-ops.
    pub fn detach(&self) {
        let mut k = self.lock();
        k.alive = false;
        k.immediate_exit = ptr::null_mut();
        k.acked = k.requested;
        self.outstanding.store(false, Ordering::Release);
        self.cv.notify_all();
    }

    /// Kicks the vCPU; returns the sequence number to wait for, or `None` if the thread
    /// is gone. With `signal` false only `immediate_exit` is set and the signal is
    /// withheld until [`supervise`] finds the thread able to take it (rule 7).
    pub fn request(&self, signal: bool) -> Option<u64> {
        let mut k = self.lock();
        if !k.alive {
            return None;
        }
        k.requested += 1;
        k.asked_at.get_or_insert_with(Instant::now);
        self.outstanding.store(true, Ordering::Release);
        k.set_immediate_exit(1);
        if signal {
            k.send_signal();
        } else {
            k.withheld = true;
        }
        self.cv.notify_all();
        Some(k.requested)
    }

    /// Called by the vCPU thread whenever it is outside `KVM_RUN`: answers outstanding
    /// kicks and clears `immediate_exit`. Records the kick latency.
    pub fn acknowledge(&self, latency_us: &Mutex<Histogram<u64>>) -> bool {
        if !self.outstanding.load(Ordering::Acquire) {
            return false;
        }
        let mut k = self.lock();
        if !k.outstanding() {
            return false;
        }
        k.set_immediate_exit(0);
        k.acked = k.requested;
        k.withheld = false;
        k.pending_seen = None;
        if let Some(t) = k.asked_at.take() {
            if let Ok(mut h) = latency_us.lock() {
                let _ = h.record((t.elapsed().as_micros() as u64).max(1));
            }
        }
        self.outstanding.store(false, Ordering::Release);
        self.cv.notify_all();
        true
    }

    /// Waits until kick `seq` is answered or `deadline` passes; true if answered.
    pub fn wait_answered(&self, seq: u64, deadline: Instant) -> bool {
        let mut k = self.lock();
        loop {
            if k.acked >= seq || !k.alive {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            k = match self.cv.wait_timeout(k, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// True when no kick waits for an answer.
    pub fn answered(&self) -> bool {
        !self.outstanding.load(Ordering::Acquire)
    }

    /// Sets or clears the pause request and wakes the vCPU if it is parked.
    pub fn set_pause(&self, pause: bool) {
        self.lock().pause = pause;
        self.cv.notify_all();
    }

    /// True if the vCPU is asked to stay paused.
    pub fn pause_requested(&self) -> bool {
        self.lock().pause
    }

    /// The vCPU thread parks here while paused: answers kicks, returns when the pause is
    /// lifted or `stop()` holds.
    pub fn park(&self, latency_us: &Mutex<Histogram<u64>>, stop: impl Fn() -> bool) {
        loop {
            self.acknowledge(latency_us);
            let k = self.lock();
            if !k.pause || stop() {
                return;
            }
            let _ = self.cv.wait_timeout(k, Duration::from_millis(100));
        }
    }
}

/// True if the fault loop should look at the vCPUs soon: one is stalled or a kick is
/// unanswered.
pub fn needs_watch(vcpus: &[std::sync::Arc<VcpuShared>]) -> bool {
    vcpus
        .iter()
        .any(|v| v.stalled_gpa().is_some() || !v.kick.answered())
}

/// Rule 7 follow-up, run by the fault loop every few milliseconds while [`needs_watch`]
/// holds: sends withheld kicks once the stall is over, and finds threads that got a
/// signal anyway (a kick that raced with the fault, or a stray `kill`) in a stall that
/// ignores signals. Such a thread spins in the kernel until its page arrives, so the
/// pages they wait for are returned: the fault loop fetches them at once.
pub fn supervise(vcpus: &[std::sync::Arc<VcpuShared>], now: Instant) -> Vec<u64> {
    let mut stuck = Vec::new();
    for v in vcpus {
        let stall = v.stall_since();
        if stall.is_none() && v.kick.answered() {
            continue;
        }
        let mut k = v.kick.lock();
        if !k.alive {
            continue;
        }
        let Some(since) = stall else {
            k.pending_seen = None;
            if k.withheld && k.outstanding() {
                k.send_signal();
            }
            continue;
        };
        if k.withheld && k.outstanding() && !v.stall().is_some_and(|s| s.deaf) {
            // Withheld because the path was not known yet: look again.
            match stall_path(k.tid) {
                StallPath::Gup => k.send_signal(),
                StallPath::Emulator => v.mark_stall_deaf(),
                StallPath::Unknown => {}
            }
            continue;
        }
        let gpa = v.stalled_gpa();
        if k.reported == gpa || now.saturating_duration_since(since) < STUCK_AFTER {
            continue;
        }
        if !sigusr1_pending(k.tid) {
            k.pending_seen = None;
            continue;
        }
        let seen = *k.pending_seen.get_or_insert(now);
        if now.saturating_duration_since(seen) >= STUCK_AFTER {
            k.reported = gpa;
            k.pending_seen = None;
            v.mark_stall_deaf();
            stuck.extend(gpa);
        }
    }
    stuck
}

/// The floor for kick latency: the same kick protocol (flag, `SIGUSR1`, acknowledgement)
/// between two plain threads, the kicked one asleep in `ppoll` as a vCPU sleeps in
/// `KVM_RUN`. Returns microsecond latencies of `count` kicks.
pub fn floor_latency(count: usize) -> std::io::Result<Histogram<u64>> {
    use std::sync::Arc;
    install_handler()?;
    let kick = Arc::new(Kick::default());
    let hist = Mutex::new(crate::fault::new_histogram());
    let stop = Arc::new(AtomicBool::new(false));
    let (k2, s2) = (kick.clone(), stop.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let mut flag = 0u8;
        // SAFETY: plain signal-mask manipulation of this thread; SIGUSR1 stays blocked
        // except inside ppoll, which unblocks it atomically (no lost wake-up).
        let waitmask = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, KICK_SIGNAL);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut());
            let mut wait: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut wait);
            wait
        };
        // SAFETY: gettid has no preconditions.
        k2.attach(unsafe { libc::gettid() }, &mut flag);
        let _ = tx.send(());
        let local = Mutex::new(crate::fault::new_histogram());
        while !s2.load(Ordering::Acquire) {
            if !k2.acknowledge(&local) {
                // SAFETY: no fds, no timeout; waitmask is a valid sigset.
                unsafe { libc::ppoll(ptr::null_mut(), 0, ptr::null(), &waitmask) };
            }
        }
        k2.detach();
    });
    let _ = rx.recv();
    for _ in 0..count {
        let start = Instant::now();
        if let Some(seq) = kick.request(true) {
            kick.wait_answered(seq, start + Duration::from_secs(1));
        }
        if let Ok(mut h) = hist.lock() {
            let _ = h.record((start.elapsed().as_micros() as u64).max(1));
        }
    }
    stop.store(true, Ordering::Release);
    kick.request(true);
    let _ = t.join();
    Ok(hist.into_inner().unwrap_or_else(|e| e.into_inner()))
}
