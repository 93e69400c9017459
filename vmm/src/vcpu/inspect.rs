//! Work a parked vCPU does on its own fd for another thread (the debugger): read its
//! state, write its registers. Only the vCPU thread touches its fd ([`super::control`]),
//! so the asker posts an [`Op`] here, wakes the park, and waits for the [`Reply`].
//!
//! Each op has a number. An asker that gives up withdraws its op if the vCPU has not
//! taken it yet, and a late reply to a withdrawn op is dropped: no op runs long after
//! its asker stopped waiting, and no asker reads another's reply.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use kvm_bindings::{kvm_fpu, kvm_guest_debug, kvm_mp_state, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::kick::Kick;

/// What the debugger reads of a vCPU.
#[derive(Clone, Copy, Debug, Default)]
pub struct DebugState {
    /// General registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, control registers, descriptor tables.
    pub sregs: kvm_sregs,
    /// x87 and SSE registers.
    pub fpu: kvm_fpu,
    /// Runnable, halted, ...
    pub mp_state: kvm_mp_state,
}

/// Work for a parked vCPU.
#[derive(Clone, Debug)]
pub enum Op {
    /// Read its [`DebugState`].
    Read,
    /// Write its general registers, RIP and RFLAGS.
    WriteRegs(Box<kvm_regs>),
    /// Set what KVM intercepts for the debugger (`KVM_SET_GUEST_DEBUG`).
    SetGuestDebug(Box<kvm_guest_debug>),
}

/// What came of an [`Op`].
#[derive(Clone, Debug)]
pub enum Reply {
    /// The state read.
    State(Box<DebugState>),
    /// Done.
    Done,
    /// A KVM ioctl failed.
    Failed(String),
}

#[derive(Default)]
struct Slot {
    /// The op waiting for the vCPU, with its number.
    op: Option<(u64, Op)>,
    /// The reply to op `.0`.
    reply: Option<(u64, Reply)>,
    next: u64,
}

/// One vCPU's op mailbox.
#[derive(Default)]
pub struct Inspect {
    slot: Mutex<Slot>,
    cv: Condvar,
}

impl Inspect {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Posts `op`, wakes the vCPU's park through `kick`, and waits for the reply until
    /// `deadline`; `None` if none came (the vCPU is not parked, or busy), and then the
    /// op is withdrawn if the vCPU has not taken it.
    pub fn call(&self, kick: &Kick, op: Op, deadline: Instant) -> Option<Reply> {
        let n = {
            let mut s = self.lock();
            s.next += 1;
            let n = s.next;
            s.op = Some((n, op));
            s.reply = None;
            n
        };
        // After the op is in place: the park checks for it under the kick's lock.
        kick.wake();
        let mut s = self.lock();
        loop {
            if let Some((m, _)) = &s.reply {
                if *m == n {
                    return s.reply.take().map(|(_, r)| r);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                if s.op.as_ref().is_some_and(|(m, _)| *m == n) {
                    s.op = None;
                }
                return None;
            }
            s = match self.cv.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// True while an op waits for the vCPU.
    pub(super) fn pending(&self) -> bool {
        self.lock().op.is_some()
    }

    /// The vCPU thread takes the waiting op, if any.
    pub(super) fn take(&self) -> Option<(u64, Op)> {
        self.lock().op.take()
    }

    /// The vCPU thread hands back the reply to op `n`.
    pub(super) fn reply(&self, n: u64, r: Reply) {
        let mut s = self.lock();
        s.reply = Some((n, r));
        self.cv.notify_all();
    }
}

/// Runs `op` on the vCPU's fd (on the vCPU thread, parked). `busy`: parked in the
/// middle of an instruction (a port or emulated access KVM finishes on re-entry, from
/// its own saved context): registers read are mid-instruction, and a write would be
/// lost, so it is refused.
pub(super) fn serve(op: Op, fd: &VcpuFd, busy: bool) -> Reply {
    let failed = |what: &str, e: vmm_sys_util::errno::Error| Reply::Failed(format!("{what}: {e}"));
    match op {
        Op::Read => {
            let regs = match fd.get_regs() {
                Ok(r) => r,
                Err(e) => return failed("KVM_GET_REGS", e),
            };
            let sregs = match fd.get_sregs() {
                Ok(r) => r,
                Err(e) => return failed("KVM_GET_SREGS", e),
            };
            let fpu = match fd.get_fpu() {
                Ok(r) => r,
                Err(e) => return failed("KVM_GET_FPU", e),
            };
            let mp_state = match fd.get_mp_state() {
                Ok(r) => r,
                Err(e) => return failed("KVM_GET_MP_STATE", e),
            };
            Reply::State(Box::new(DebugState {
                regs,
                sregs,
                fpu,
                mp_state,
            }))
        }
        Op::WriteRegs(_) if busy => {
            Reply::Failed("the vcpu is in the middle of an instruction".into())
        }
        Op::WriteRegs(regs) => match fd.set_regs(&regs) {
            Ok(()) => Reply::Done,
            Err(e) => failed("KVM_SET_REGS", e),
        },
        Op::SetGuestDebug(dbg) => match fd.set_guest_debug(&dbg) {
            Ok(()) => Reply::Done,
            Err(e) => failed("KVM_SET_GUEST_DEBUG", e),
        },
    }
}
