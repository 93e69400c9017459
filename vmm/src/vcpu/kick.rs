//! Kicks: getting a vCPU thread out of `KVM_RUN` and knowing when it is out.
//!
//! Protocol (rule 6): the kicker sets `kvm_run.immediate_exit`, then sends `SIGUSR1`.
//! A kick that lands just before `KVM_RUN` is therefore not lost: KVM sees the flag and
//! returns `EINTR` at once. The vCPU thread acknowledges at the top of its loop, outside
//! `KVM_RUN` (unless it is to park: then its park does, once it shows paused), and
//! clears the flag. The signal handler does nothing; a stray
//! `SIGUSR1` just costs one extra trip round the loop.
//!
//! A kick is always signalled. A page wait that no signal reaches does not last: the
//! fault loop escalates it to user space at once (rule 7, [`crate::fault::handler`]),
//! which it starts with [`Kick::nudge`], the same signal without a kick to answer.

use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// The kick signal.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

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

/// What [`Kick::acknowledge_unless`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    /// No kick was outstanding.
    Nothing,
    /// Outstanding kicks are answered and `immediate_exit` is clear.
    Answered,
    /// A kick is outstanding and the vCPU must park: left unanswered for the park.
    Park,
}

/// Kick state shared between a vCPU thread and those who kick it.
pub struct Kick {
    inner: Mutex<KickInner>,
    cv: Condvar,
    /// Mirrors `requested > acked`, readable without the lock.
    outstanding: AtomicBool,
}

/// The state behind [`Kick`]'s lock.
struct KickInner {
    alive: bool,
    thread: libc::pthread_t,
    tid: i32,
    /// `&kvm_run.immediate_exit` of the vCPU; null unless `alive`.
    immediate_exit: *mut u8,
    requested: u64,
    acked: u64,
    /// When the oldest unanswered kick was asked.
    asked_at: Option<Instant>,
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
            // mapped while `alive` (see the Send impl). The vCPU thread touches the byte
            // concurrently, so it is accessed as an atomic; KVM reads it at KVM_RUN entry.
            unsafe { AtomicU8::from_ptr(self.immediate_exit) }.store(v, Ordering::SeqCst);
        }
    }

    fn send_signal(&mut self) {
        if !self.alive {
            return;
        }
        // SAFETY: `thread` is the live vCPU thread (alive is only true between attach and
        // detach, both done by that thread under this lock).
        unsafe { libc::pthread_kill(self.thread, KICK_SIGNAL) };
    }

    fn outstanding(&self) -> bool {
        self.requested > self.acked
    }
}

impl Kick {
    fn lock(&self) -> MutexGuard<'_, KickInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the vCPU thread before its first `KVM_RUN`: from now on kicks set
    /// `immediate_exit` (the byte in its `kvm_run`) and signal this thread.
    ///
    /// # Safety
    ///
    /// `immediate_exit` must point to a byte that stays valid for reads and writes
    /// until [`Kick::detach`] returns (kickers write it from other threads until
    /// then), and that is meanwhile accessed only atomically, by this thread too
    /// (through [`Kick::set_immediate_exit`]). The calling thread must stay alive until
    /// it calls [`Kick::detach`] (kicks signal it by its pthread id).
    pub unsafe fn attach(&self, tid: i32, immediate_exit: *mut u8) {
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
    /// is gone.
    pub fn request(&self) -> Option<u64> {
        let mut k = self.lock();
        if !k.alive {
            return None;
        }
        k.requested += 1;
        k.asked_at.get_or_insert_with(Instant::now);
        self.outstanding.store(true, Ordering::Release);
        k.set_immediate_exit(1);
        k.send_signal();
        self.cv.notify_all();
        Some(k.requested)
    }

    /// Signals the thread without a kick to answer: the fault loop's first step in
    /// escalating a page wait (a signal pending before the poison lets `KVM_RUN` return
    /// before KVM hands a failed page-table walk to the guest, NOTES.md). No-op once the
    /// thread is gone.
    pub fn nudge(&self) {
        self.lock().send_signal();
    }

    /// Called by the vCPU thread whenever it is outside `KVM_RUN`: answers outstanding
    /// kicks and clears `immediate_exit`. Records the kick latency.
    pub fn acknowledge(&self, latency_us: &Mutex<Histogram<u64>>) -> bool {
        if !self.outstanding.load(Ordering::Acquire) {
            return false;
        }
        let mut k = self.lock();
        self.ack_locked(&mut k, latency_us)
    }

    /// The run loop's answer before it goes on towards `KVM_RUN`: as
    /// [`Kick::acknowledge`], unless a kick is outstanding and `must_park()` holds
    /// (checked under the lock). Then nothing is answered, `immediate_exit` stays set,
    /// and [`Ack::Park`] tells the caller to go round to its park branch, which answers
    /// once the vCPU shows paused.
    ///
    /// This closes the window between the loop's own stop check and its answer: a stop
    /// request is stored before the kick that follows it counts under this lock
    /// ([`super::control::Control::post`], [`Kick::request`]), so a kick seen
    /// outstanding here comes with its stop visible to `must_park`, and one counted
    /// after the lock is released sets `immediate_exit`, so the `KVM_RUN` that follows
    /// returns at once.
    pub fn acknowledge_unless(
        &self,
        latency_us: &Mutex<Histogram<u64>>,
        must_park: impl FnOnce() -> bool,
    ) -> Ack {
        if !self.outstanding.load(Ordering::Acquire) {
            return Ack::Nothing;
        }
        let mut k = self.lock();
        if k.outstanding() && must_park() {
            return Ack::Park;
        }
        if self.ack_locked(&mut k, latency_us) {
            Ack::Answered
        } else {
            Ack::Nothing
        }
    }

    fn ack_locked(&self, k: &mut KickInner, latency_us: &Mutex<Histogram<u64>>) -> bool {
        if !k.outstanding() {
            return false;
        }
        k.set_immediate_exit(0);
        k.acked = k.requested;
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

    /// Sets `immediate_exit` from the vCPU thread itself (to complete a pending I/O
    /// exit without running the guest, before its state is saved).
    pub fn set_immediate_exit(&self, v: u8) {
        self.lock().set_immediate_exit(v);
    }

    /// True when no kick waits for an answer.
    pub fn answered(&self) -> bool {
        !self.outstanding.load(Ordering::Acquire)
    }

    /// Wakes the vCPU thread if it is parked, to look at its requests again.
    pub fn wake(&self) {
        let _k = self.lock();
        self.cv.notify_all();
    }

    /// The vCPU thread parks here: answers kicks, returns when `stay()` no longer
    /// holds (checked under the lock that [`Kick::request`] and [`Kick::wake`] notify
    /// under, so no wake-up is lost).
    pub fn park(&self, latency_us: &Mutex<Histogram<u64>>, stay: impl Fn() -> bool) {
        loop {
            self.acknowledge(latency_us);
            let k = self.lock();
            if !stay() {
                return;
            }
            if k.outstanding() {
                continue;
            }
            let _ = self.cv.wait_timeout(k, Duration::from_millis(100));
        }
    }
}

/// Detaches a [`Kick`] when dropped, so no kicker keeps a pointer into a frame that
/// unwinds.
pub(super) struct Detach<'a>(pub(super) &'a Kick);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.0.detach();
    }
}

/// The floor for kick latency: the same kick protocol (flag, `SIGUSR1`, acknowledgement)
/// between two plain threads, the kicked one asleep in `ppoll` as a vCPU sleeps in
/// `KVM_RUN`. Returns microsecond latencies of `count` kicks.
pub fn floor_latency(count: usize) -> std::io::Result<Histogram<u64>> {
    floor_latency_within(count, Duration::MAX)
}

/// [`floor_latency`], ending early once `budget` has passed (the report's floor must not
/// hold up the end of a run on a machine too loaded to schedule the second thread).
pub fn floor_latency_within(count: usize, budget: Duration) -> std::io::Result<Histogram<u64>> {
    let began = Instant::now();
    use std::sync::Arc;
    install_handler()?;
    let kick = Arc::new(Kick::default());
    let hist = Mutex::new(crate::fault::new_histogram());
    let stop = Arc::new(AtomicBool::new(false));
    let (k2, s2) = (kick.clone(), stop.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    // A refused thread is an error, not a panic: the report's floor is then null.
    let t = std::thread::Builder::new()
        .name("ufvmm-floor".into())
        .spawn(move || {
            // Stands in for kvm_run.immediate_exit: written only atomically, by the kicker.
            let flag = AtomicU8::new(0);
            // SIGUSR1 stays blocked except inside ppoll, which unblocks it atomically (no
            // lost wake-up), as immediate_exit does for KVM_RUN.
            crate::control::signals::mask(libc::SIG_BLOCK, &[KICK_SIGNAL]);
            // SAFETY: an all-zero sigset_t is a valid (empty) set.
            let waitmask: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            // SAFETY: `flag` is accessed only atomically and outlives the attachment:
            // `_detach`, declared after it, detaches first, also if this thread panics.
            unsafe { k2.attach(tid, flag.as_ptr()) };
            let _detach = Detach(&k2);
            let _ = tx.send(());
            let local = Mutex::new(crate::fault::new_histogram());
            while !s2.load(Ordering::Acquire) {
                if !k2.acknowledge(&local) {
                    // SAFETY: no fds, no timeout; waitmask is a valid sigset.
                    unsafe { libc::ppoll(ptr::null_mut(), 0, ptr::null(), &waitmask) };
                }
            }
        })?;
    let _ = rx.recv();
    for _ in 0..count {
        if began.elapsed() >= budget {
            break;
        }
        let start = Instant::now();
        // A kick not answered within the second says nothing of the floor: not counted.
        let answered = kick
            .request()
            .is_some_and(|seq| kick.wait_answered(seq, start + Duration::from_secs(1)));
        if answered {
            if let Ok(mut h) = hist.lock() {
                let _ = h.record((start.elapsed().as_micros() as u64).max(1));
            }
        }
    }
    stop.store(true, Ordering::Release);
    kick.request();
    let _ = t.join();
    Ok(hist.into_inner().unwrap_or_else(|e| e.into_inner()))
}
