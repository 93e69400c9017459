//! The vCPU run loop.
//!
//! States: `Running` (around `KVM_RUN`), `Paused` (parked until resumed), `Exited`.
//! Each turn of the loop, outside `KVM_RUN`: answer kicks, park if paused, finish any
//! device work a kick interrupted, then enter `KVM_RUN` and dispatch the exit.

use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::VcpuFd;

use super::exits::{self, ExitAction, PendingIo};
use super::{RunState, VcpuShared};
use crate::fault::Signal;
use crate::vm::shared::{VcpuEnd, VmEvent, VmShared};

/// Why `KVM_RUN` returned with an error worth a message.
fn kvm_run_error(e: &vmm_sys_util::errno::Error) -> String {
    format!("KVM_RUN failed: {e}")
}

/// Unblocks the kick signal for this thread (every thread starts with it blocked).
fn unblock_kick_signal() {
    // SAFETY: plain signal-mask manipulation of the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, super::kick::KICK_SIGNAL);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// The body of a vCPU thread. Reports how it ended on the VM's event channel.
pub fn run(mut fd: VcpuFd, me: Arc<VcpuShared>, vm: Arc<VmShared>) {
    unblock_kick_signal();
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    me.set_tid(tid);
    let immediate_exit: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
    me.kick.attach(tid, immediate_exit);
    me.set_run_state(RunState::Running);

    let end = run_loop(&mut fd, &me, &vm);

    // Detach before the fd (and its kvm_run mapping) goes away.
    me.kick.detach();
    me.clear_stall(Instant::now());
    me.set_run_state(RunState::Exited);
    vm.send(VmEvent::VcpuEnded { id: me.id, end });
    drop(fd);
}

fn run_loop(fd: &mut VcpuFd, me: &Arc<VcpuShared>, vm: &Arc<VmShared>) -> VcpuEnd {
    let mut pending: Option<PendingIo> = None;
    // A vCPU's own "signal": shutdown is fatal, a kick or pause interrupts.
    let signal = || {
        if vm.is_shutting_down() {
            Signal::Fatal
        } else if !me.kick.answered() || me.kick.pause_requested() {
            Signal::Kick
        } else {
            Signal::None
        }
    };
    loop {
        if vm.is_shutting_down() {
            return VcpuEnd::Stopped;
        }
        // Paused before the answer, so whoever waits for it sees the vCPU paused.
        if me.kick.pause_requested() {
            me.set_run_state(RunState::Paused);
            me.kick.park(&vm.kick_latency_us, || vm.is_shutting_down());
            me.set_run_state(RunState::Running);
            continue;
        }
        me.kick.acknowledge(&vm.kick_latency_us);
        if let Some(io) = pending.take() {
            match exits::handle_io(io, me, vm, &signal) {
                ExitAction::Continue => {}
                ExitAction::Retry(io) => pending = Some(io),
                ExitAction::End(end) => return end,
            }
            continue;
        }
        let action = match fd.run() {
            Ok(exit) => {
                me.exits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                exits::handle_exit(exit, me, vm, &signal)
            }
            // A kick, or a stray signal: either way, back round the loop.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => ExitAction::Continue,
            Err(e) => ExitAction::End(VcpuEnd::Failed(kvm_run_error(&e))),
        };
        // Out of KVM_RUN: any page wait the fault loop saw is over for this thread.
        me.clear_stall(Instant::now());
        match action {
            ExitAction::Continue => {}
            ExitAction::Retry(io) => pending = Some(io),
            ExitAction::End(VcpuEnd::InternalError) => {
                let run = fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // union member the kernel filled in.
                let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
                return VcpuEnd::Failed(format!(
                    "KVM internal error, suberror {sub}{}",
                    if sub == 1 {
                        " (instruction emulation failed)"
                    } else {
                        ""
                    }
                ));
            }
            ExitAction::End(end) => return end,
        }
    }
}
