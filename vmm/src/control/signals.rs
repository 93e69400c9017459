//! The one signal thread: SIGINT and SIGTERM arrive here and nowhere else.
//!
//! Every thread starts with SIGINT, SIGTERM and SIGUSR1 blocked (see [`block_all`]);
//! this thread unblocks SIGINT and SIGTERM, vCPU threads unblock SIGUSR1, and the main
//! thread unblocks SIGUSR1 too so a stray process-wide `kill -USR1` lands there rather
//! than on a vCPU that might be in a stall that cannot take it.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::vm::shared::VmEvent;

/// Blocks or unblocks `sigs` in the calling thread.
pub fn mask(how: libc::c_int, sigs: &[libc::c_int]) {
    // SAFETY: plain signal-mask manipulation of the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Blocks SIGINT, SIGTERM and SIGUSR1 in the calling thread; threads it spawns inherit
/// the mask. Call first thing, before any thread exists.
pub fn block_all() {
    mask(libc::SIG_BLOCK, &[SIGINT, SIGTERM, libc::SIGUSR1]);
}

/// Lets the calling thread take stray SIGUSR1s.
pub fn unblock_usr1() {
    mask(libc::SIG_UNBLOCK, &[libc::SIGUSR1]);
}

/// What the signal thread shares with the VM: the first signal seen (0 = none).
pub type Interrupted = Arc<AtomicI32>;

/// Starts the signal thread. The first SIGINT/SIGTERM is recorded in `seen` and sent to
/// the main thread for an orderly stop (summary, report, exit 130/143); a second one
/// exits at once. Started before the VM is built, so Ctrl-C works during set-up too.
pub fn spawn(events: Sender<VmEvent>, seen: Interrupted) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("ufvmm-signals".into())
        .spawn(move || {
            mask(libc::SIG_UNBLOCK, &[SIGINT, SIGTERM]);
            for sig in signals.forever() {
                if seen.swap(sig, Ordering::AcqRel) == 0 {
                    let _ = events.send(VmEvent::Signal(sig));
                } else {
                    eprintln!("ufvmm: second signal, exiting now");
                    // SAFETY: _exit ends the process without running anything else, which
                    // is the point of the second Ctrl-C.
                    unsafe { libc::_exit(128 + sig) };
                }
            }
        })?;
    Ok(())
}
