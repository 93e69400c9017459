//! Rule 7: never signal a thread the kernel cannot interrupt and walk away.
//!
//! On the instruction-emulator path (guest CPL0 on this machine) a vCPU thread waiting for
//! a missing page does not take signals, and once `SIGUSR1` is pending it spins in the
//! kernel until the page arrives. Measured here: neither `SIG_IGN` (which empties the
//! queue but leaves the thread's pending flag set) nor `immediate_exit` (read only when
//! `KVM_RUN` is entered) ends that spin. So:
//! - [`may_signal`] decides, from the thread's state and kernel stack, whether a kick may
//!   be signalled now; if not, the kick is *withheld* (only `immediate_exit` is set);
//! - the fault loop sends a withheld kick just before it installs the page that ends the
//!   stall (the spin then lasts one copy), and [`supervise`] sends the rest once it is
//!   safe;
//! - a thread that got a signal anyway (a kick racing with the fault) is found by
//!   [`supervise`]; the fault loop then fetches its page at once ("rescue").

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::kick::KICK_SIGNAL;
use super::VcpuShared;

/// How long a signal may stay pending in a stalled thread before we call it stuck.
const STUCK_AFTER: Duration = Duration::from_millis(5);

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

/// True if this process may read its threads' kernel stacks (it needs CAP_SYS_ADMIN).
/// Without, stall paths are unknown: kicks are then signalled, and a thread that cannot
/// take its signal is still found by [`supervise`] (its pending mask is readable).
pub fn stacks_readable() -> bool {
    static READABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READABLE.get_or_init(|| std::fs::read_to_string("/proc/self/stack").is_ok())
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

/// The scheduler state letter of thread `tid` (`R`, `S`, `D`, ...).
pub fn thread_state(tid: i32) -> Option<char> {
    if tid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // The state letter follows the ")" that closes the command name.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Whether `SIGUSR1` is pending for thread `tid` itself. Kicks are thread-directed; the
/// process-wide queue is left out, since process-wide signals go to the main thread.
fn sigusr1_pending(tid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
        return false;
    };
    let bit = 1u64 << (KICK_SIGNAL - 1);
    status
        .lines()
        .filter(|l| l.starts_with("SigPnd:"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .any(|mask| mask & bit != 0)
}

/// Whether a kick may be signalled to thread `tid` now. A running thread may be
/// signalled (a signal gets it out of guest mode); an asleep one only if it is not
/// waiting for a page on the emulator path. `stalled` says the fault loop saw this vCPU
/// wait for a page: then an unreadable stack counts as the emulator path (a withheld kick
/// costs an unanswered pause; a wrong signal costs a CPU spinning in the kernel).
/// `patient` allows a few short sleeps for a thread still on its way into the wait (for
/// kickers; the fault loop must not sleep).
pub fn may_signal(tid: i32, stalled: bool, patient: bool) -> (bool, StallPath) {
    if !stacks_readable() || (!stalled && thread_state(tid) == Some('R')) {
        return (true, StallPath::Unknown);
    }
    let mut path = stall_path(tid);
    // A thread just entering its wait may not show it yet: look again, briefly.
    for _ in 0..3 {
        if path != StallPath::Unknown || !stalled || !patient {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
        path = stall_path(tid);
    }
    let ok = match path {
        StallPath::Gup => true,
        StallPath::Emulator => false,
        StallPath::Unknown => !stalled,
    };
    (ok, path)
}

/// Run by the fault loop every few milliseconds while [`needs_watch`] holds: sends
/// withheld kicks once that is safe, and returns the pages of threads that got a signal
/// anyway in a stall that ignores signals (they spin until the page is there).
pub fn supervise(vcpus: &[Arc<VcpuShared>], now: Instant) -> Vec<u64> {
    let mut stuck = Vec::new();
    for v in vcpus {
        // Only a thread in a page fault can have a signal stuck in it.
        let stall = v.stall().filter(|s| !s.in_vmm && !s.left);
        if v.kick.is_withheld() {
            let (ok, path) = may_signal(v.tid(), stall.is_some(), false);
            if path == StallPath::Emulator {
                v.mark_stall_deaf();
            }
            if ok {
                v.kick.send_withheld();
            }
        }
        // Any signal, ours or a stray one, may be stuck: always look.
        let Some(st) = stall else {
            v.kick.pending_seen(None);
            continue;
        };
        if now.saturating_duration_since(st.since) < STUCK_AFTER
            || v.kick.reported() == Some(st.gpa)
        {
            continue;
        }
        if !sigusr1_pending(v.tid()) {
            v.kick.pending_seen(None);
            continue;
        }
        let seen = v.kick.pending_seen(Some(now));
        if now.saturating_duration_since(seen) >= STUCK_AFTER {
            v.kick.set_reported(st.gpa);
            v.mark_stall_deaf();
            stuck.push(st.gpa);
        }
    }
    stuck
}

/// True if the fault loop should look at the vCPUs soon: one is in a page wait or a
/// kick is unanswered. (A vCPU parked on a page it left waits for nothing to watch.)
pub fn needs_watch(vcpus: &[Arc<VcpuShared>]) -> bool {
    vcpus
        .iter()
        .any(|v| v.stall().is_some_and(|s| !s.left) || !v.kick.answered())
}
