//! The vCPU run loop: the one thread that answers this vCPU's requests
//! ([`super::control`]).
//!
//! Each turn of the loop, outside `KVM_RUN`: if held, save the state when asked and
//! park (the park answers kicks, once the vCPU shows paused); else answer kicks, finish
//! the work a kick interrupted (a port write, or a guest access waiting for its page in
//! user space, [`super::poison`]), then enter `KVM_RUN` and sort its return: an exit
//! for a device ([`super::exits`]), an access to a poisoned page, a signal.

use std::sync::Arc;

use kvm_ioctls::VcpuFd;

use super::control::Phase;
use super::exits::{self, ExitAction, PendingIo};
use super::kick::Ack;
use super::kvm_run::Exit;
use super::kvm_run::VcpuRun;
use super::poison::{self, PageAccess, Seen, Suspect};
use super::VcpuShared;
use crate::debug::DebugStop;
use crate::fault::Signal;
use crate::vm::shared::{VcpuEnd, VmEvent, VmShared};

/// The body of a vCPU thread. Reports how it ended on the VM's event channel.
pub fn run(mut fd: VcpuFd, me: Arc<VcpuShared>, vm: Arc<VmShared>) {
    crate::control::signals::mask(libc::SIG_UNBLOCK, &[super::kick::KICK_SIGNAL]);
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    me.set_tid(tid);
    // Before attach: from then on kickers write immediate_exit, and this thread
    // touches kvm_run only through `run` (see `super::kvm_run`).
    // SAFETY: the size is KVM_GET_VCPU_MMAP_SIZE of the VM that made `fd`.
    let mut made = unsafe { VcpuRun::new(&mut fd, vm.kvm_run_size()) };
    // Declared after `made` (and so dropped before it and the `fd` parameter, also if
    // anything below panics) and before attach: from attach on, kickers hold a pointer
    // into kvm_run, and only the guard's detach takes it back before fd unmaps it.
    let mut guard = EndGuard {
        me: &me,
        vm: &vm,
        end: None,
    };
    let run = match &mut made {
        Ok(run) => run,
        Err(e) => {
            guard.end = Some(VcpuEnd::Failed(e.clone()));
            return;
        }
    };
    // SAFETY: immediate_exit points into the kvm_run mapping of `fd`, which stays
    // mapped until `fd` is dropped, after the guard's detach; this thread touches it
    // only atomically from here on (Kick::set_immediate_exit) and outlives the detach.
    unsafe { me.control.kick.attach(tid, run.immediate_exit()) };
    // Before the loop's first look at shutdown (see `VmShared::wait_vcpus_exited`).
    me.control.set_phase(Phase::Running);
    guard.end = Some(run_loop(run, &me, &vm));
}

/// Ends a vCPU thread's life in order: kickers forget `kvm_run` before it is unmapped,
/// and the main thread hears how the vCPU ended (a panic counts as a failure).
struct EndGuard<'a> {
    me: &'a VcpuShared,
    vm: &'a VmShared,
    end: Option<VcpuEnd>,
}

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        self.me.control.kick.detach();
        self.me.stall.clear();
        self.me.control.set_phase(Phase::Exited);
        let end = self
            .end
            .take()
            .unwrap_or_else(|| VcpuEnd::Failed("the vcpu thread panicked".into()));
        self.vm.send(VmEvent::VcpuEnded {
            id: self.me.id,
            end,
        });
    }
}

/// What a save came to.
enum Saved {
    /// The state, or why it could not be saved.
    State(Result<Vec<u8>, String>),
    /// The instruction being finished needs a page that is not there: wait for it in
    /// user space, finish the access, then save.
    Wait(PageAccess),
}

/// Saves the vCPU's state for migration. KVM finishes an I/O or MMIO exit (moving past
/// the instruction) only on the next `KVM_RUN`, so one is made first with
/// `immediate_exit` set: it completes the instruction and returns without running the
/// guest.
///
/// Completing an instruction may touch guest memory (a string instruction going on
/// past a page's end), so this `KVM_RUN` may wait for a page like any other: it is
/// bracketed like the loop's, so the fault loop sees the wait and escalates it (rule
/// 7), and a poisoned page comes back as [`Saved::Wait`], not as a failed save.
fn save_state(run: &mut VcpuRun, me: &VcpuShared, vm: &VmShared) -> Saved {
    me.control.kick.set_immediate_exit(1);
    me.stall.enter_run();
    let (r, bus) = poison::in_kvm_run(|| {
        run.run().map(|exit| match poison::classify(exit, vm) {
            Seen::Access(a) => Ok(a),
            Seen::Suspect(s) => Err(Some(s)),
            Seen::Other(_) => Err(None),
        })
    });
    let stall_gpa = me.stall.current().filter(|s| !s.in_vmm).map(|s| s.gpa);
    let missing = |gpa| exits::page_missing(vm, gpa);
    me.stall.leave_run(missing);
    me.control.kick.set_immediate_exit(0);
    let wait = match r {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            let gpa = bus
                .map(|hva| poison::sigbus_page(vm, hva))
                .or_else(|| stall_gpa.filter(|&g| missing(g)));
            gpa.map(|gpa| {
                poison::cancel_walk_fault(run.fd(), vm, gpa);
                PageAccess::Retry { gpa }
            })
        }
        Err(e) => return Saved::State(Err(format!("KVM_RUN to complete I/O failed: {e}"))),
        Ok(Ok(access)) => Some(access),
        // Only a page still missing explains it; anything else would repeat.
        Ok(Err(Some(s))) => match poison::suspect_page(s, run.fd(), stall_gpa, vm) {
            Some(gpa) if missing(gpa) => Some(PageAccess::Retry { gpa }),
            _ => {
                let rip = run.fd().get_regs().map(|r| r.rip).ok();
                return Saved::State(Err(poison::describe_suspect(s, rip)));
            }
        },
        Ok(Err(None)) => {
            return Saved::State(Err("KVM_RUN with immediate_exit ran the guest".into()))
        }
    };
    if let Some(access) = wait {
        return Saved::Wait(access);
    }
    Saved::State(
        super::state::VcpuState::save(run.fd(), &vm.caps.msrs)
            .map(|s| s.to_bytes())
            .map_err(|e| e.to_string()),
    )
}

/// Work a vCPU must finish before it enters the guest again.
#[derive(Clone, Copy, Debug)]
enum Pending {
    /// A port write a kick interrupted.
    Io(PendingIo),
    /// A guest access waiting in user space for its page (rule 7).
    Page(PageAccess),
}

/// What a `KVM_RUN` return says the loop must do, once the exit data is let go.
enum After {
    Action(ExitAction),
    /// A debugger's breakpoint or step stopped the vCPU.
    Debug(DebugStop),
    Wait(PageAccess),
    Suspect(Suspect),
}

fn run_loop(run: &mut VcpuRun, me: &Arc<VcpuShared>, vm: &Arc<VmShared>) -> VcpuEnd {
    let mut pending: Option<Pending> = None;
    // A vCPU's own "signal" for the waits it makes: shutdown is fatal, a request
    // interrupts (see `Control::interrupts`).
    let signal = || {
        if vm.is_shutting_down() {
            Signal::Fatal
        } else if me.control.interrupts() {
            Signal::Kick
        } else {
            Signal::None
        }
    };
    let missing = |gpa| exits::page_missing(vm, gpa);
    // RIP and page of the last suspect exit taken for a poisoned page's: the same again,
    // after waiting for that page, is a real failure.
    let mut suspect_retry: Option<(Option<u64>, u64)> = None;
    // The page of a poisoned wait this vCPU just finished, until the next exit is
    // handled: event delivery onto that page left a triple fault pending behind the
    // EINTR (the nudge came first), which the next KVM_RUN reports as a SHUTDOWN with
    // no wait on record any more (found by review; NOTES.md: re-entering runs the
    // faulting instruction again, once).
    let mut after_poison: Option<u64> = None;
    loop {
        if vm.is_shutting_down() {
            return VcpuEnd::Stopped;
        }
        let control = &me.control;
        if control.must_park(pending.is_some()) {
            if let Some(n) = control.save_number() {
                match save_state(run, me, vm) {
                    Saved::State(r) => control.put_saved(n, r),
                    Saved::Wait(access) => {
                        // The save waits for it (`Control::must_park`).
                        pending = Some(Pending::Page(access));
                        continue;
                    }
                }
            }
            // Parked with an access half done (KVM finishes it on re-entry). A guest
            // access that waits to be retried is not: its instruction runs again from
            // the start, so its registers are whole (and may be written).
            let busy =
                pending.is_some_and(|p| !matches!(p, Pending::Page(PageAccess::Retry { .. })));
            control.park(
                &vm.kick_latency_us,
                || vm.is_shutting_down() || control.save_asked(),
                busy,
                |op| super::inspect::serve(op, run.fd(), busy),
            );
            continue;
        }
        // A stop that came after the check above is not answered here but parked for.
        if control.answer(&vm.kick_latency_us, pending.is_some()) == Ack::Park {
            continue;
        }
        match pending.take() {
            Some(Pending::Io(io)) => {
                match exits::handle_io(io, me, vm, &signal) {
                    ExitAction::Continue => {}
                    ExitAction::Retry(io) => pending = Some(Pending::Io(io)),
                    ExitAction::End(end) => return end,
                }
                continue;
            }
            Some(Pending::Page(access)) => {
                let mut fill = |b: &[u8]| run.set_mmio_data(b);
                match poison::wait_and_complete(access, me, vm, &signal, &mut fill) {
                    poison::Waited::Done if control.must_park(false) => {
                        // A stop came during the wait: park now (a save's KVM_RUN
                        // finishes the access) instead of running the guest first.
                        after_poison = Some(access.page(&vm.fault.ram));
                        continue;
                    }
                    poison::Waited::Done => after_poison = Some(access.page(&vm.fault.ram)),
                    poison::Waited::Interrupted => {
                        pending = Some(Pending::Page(access));
                        continue;
                    }
                }
            }
            None => {}
        }
        me.stall.enter_run();
        let _ = me.first_entry.get_or_init(std::time::SystemTime::now);
        let (result, bus) = poison::in_kvm_run(|| run.run());
        // The page fault on record as KVM_RUN returned (a suspect exit may be its).
        let stall_gpa = me.stall.current().filter(|s| !s.in_vmm).map(|s| s.gpa);
        // Out of KVM_RUN: a page wait the fault loop saw is over, unless its page is
        // still missing (then the thread waits for it in user space, below).
        me.stall.leave_run(missing);
        let after = match result {
            Ok(exit) => {
                me.exits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match poison::classify(exit, vm) {
                    Seen::Access(a) => After::Wait(a),
                    Seen::Suspect(s) => After::Suspect(s),
                    Seen::Other(Exit::Debug { exception, dr6 }) => {
                        After::Debug(DebugStop::from_exit(exception, dr6))
                    }
                    Seen::Other(exit) => After::Action(exits::handle_exit(exit, me, vm, &signal)),
                }
            }
            // A poisoned page (SIGBUS), a kick, the fault loop's nudge, or a stray
            // signal: with a page wait on record, wait for the page before going on.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                let gpa = bus.map(|hva| poison::sigbus_page(vm, hva)).or_else(|| {
                    me.stall
                        .current()
                        .filter(|s| !s.in_vmm && missing(s.gpa))
                        .map(|s| s.gpa)
                });
                match gpa {
                    Some(gpa) => {
                        poison::cancel_walk_fault(run.fd(), vm, gpa);
                        After::Wait(PageAccess::Retry { gpa })
                    }
                    None => After::Action(ExitAction::Continue),
                }
            }
            Err(e) => After::Action(ExitAction::End(VcpuEnd::Failed(format!(
                "KVM_RUN failed: {e}"
            )))),
        };
        let action = match after {
            After::Action(a) => a,
            After::Wait(access) => {
                pending = Some(Pending::Page(access));
                continue;
            }
            After::Debug(stop) => {
                crate::debug::stop_vcpu(me, vm, stop);
                continue;
            }
            After::Suspect(s) => {
                let rip = run.fd().get_regs().map(|r| r.rip).ok();
                // On this host an `int3` at CPL0 is an emulation failure at the int3:
                // the debugger's own breakpoint, when it has one there.
                if s == Suspect::Emulation && rip.is_some_and(|r| vm.debugger.is_sw_breakpoint(r)) {
                    crate::debug::stop_vcpu(me, vm, DebugStop::SwBreak);
                    continue;
                }
                // Or the one that ends a step over port I/O.
                if s == Suspect::Emulation
                    && rip.is_some_and(|r| crate::debug::user_trap::io_step_done(me, vm, r))
                {
                    continue;
                }
                let found = poison::suspect_page(s, run.fd(), stall_gpa, vm).or(match s {
                    Suspect::Shutdown => after_poison,
                    Suspect::Emulation => None,
                });
                after_poison = None;
                match found {
                    Some(gpa) if suspect_retry != Some((rip, gpa)) => {
                        suspect_retry = Some((rip, gpa));
                        pending = Some(Pending::Page(PageAccess::Retry { gpa }));
                        continue;
                    }
                    _ => ExitAction::End(VcpuEnd::Failed(poison::describe_suspect(s, rip))),
                }
            }
        };
        suspect_retry = None;
        after_poison = None;
        match action {
            ExitAction::Continue => {}
            ExitAction::Retry(io) => pending = Some(Pending::Io(io)),
            ExitAction::End(end) => return end,
        }
    }
}
