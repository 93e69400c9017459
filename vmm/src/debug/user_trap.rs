//! Breakpoints and steps at CPL3, where this host's KVM intercepts neither `int3` nor
//! a single step: the built-in guest's #BP and #DB entry offers each trap it takes
//! at CPL3 to the VMM (`abi::PORT_DEBUG`), with the CPL3 registers in an
//! [`abi::DebugFrame`] on its kernel stack. A trap the debugger wants stops the vCPU
//! right there, inside the guest's handler: gdb then reads and writes the CPL3
//! registers in that frame, a step sets the frame's TF, and the handler's `iretq`
//! resumes CPL3 from the frame as gdb left it.
//!
//! The vCPU thread decides ([`offered`]); the stub's thread reads and edits the frames
//! of stopped vCPUs ([`overlay`], [`write_regs`], [`release`]).
//!
//! Also here, for both levels: a step over port I/O, which is a one-shot `int3` after
//! the instruction ([`step_over_io`]), since this host loses a step's trap across an
//! I/O exit.

use std::collections::BTreeMap;
use std::sync::Mutex;

use kvm_bindings::kvm_regs;
use vm_memory::ByteValued;

use super::memory::Memory;
use super::{lock, DebugStop, Int3};
use crate::abi::{self, DebugFrame};
use crate::vcpu::inspect::DebugState;
use crate::vcpu::VcpuShared;
use crate::vm::shared::VmShared;

/// RFLAGS.TF.
pub(super) const TF: u64 = 1 << 8;

// SAFETY: a `repr(C)` record of u64s; every bit pattern is valid.
unsafe impl ByteValued for DebugFrame {}

/// Which vCPUs are stopped in a CPL3 trap frame, and which the debugger stepped.
#[derive(Default)]
pub struct UserTraps {
    /// vCPU id -> guest-physical address of the frame it is stopped in.
    frames: Mutex<BTreeMap<usize, u64>>,
    /// vCPUs given a TF by the debugger: their next #DB is the debugger's even if it
    /// has gone meanwhile (then it just ends the step).
    stepping: Mutex<BTreeMap<usize, Step>>,
    /// A step over a port I/O instruction (see [`step_over_io`]): a one-shot `int3`
    /// after the instruction, as (vCPU, guest-virtual address, the byte).
    io_step: Mutex<Option<(usize, u64, Int3)>>,
}

/// A TF the debugger set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// gdb waits for this step.
    Wanted,
    /// gdb stopped waiting (its interrupt came first, the step's instruction waited
    /// for a page) and resumed the vCPU: the #DB only ends the step, silently.
    Abandoned,
}

impl UserTraps {
    /// The frame vCPU `id` is stopped in, if it stopped in one.
    pub(super) fn frame(&self, id: usize) -> Option<u64> {
        lock(&self.frames).get(&id).copied()
    }

    /// vCPU `id` runs with TF set by the debugger.
    pub(super) fn expect_step(&self, id: usize) {
        lock(&self.stepping).insert(id, Step::Wanted);
    }

    /// The step-over-I/O `int3` of vCPU `id`, if it is the one at `gva` (taken: the
    /// step is done).
    fn take_io_step(&self, id: usize, gva: u64) -> Option<Int3> {
        let mut s = lock(&self.io_step);
        match *s {
            Some((v, at, bp)) if v == id && at == gva => s.take().map(|_| bp),
            _ => None,
        }
    }

    /// True if vCPU `id` has a TF of the debugger's whose #DB has not come yet.
    pub(super) fn stepping(&self, id: usize) -> bool {
        lock(&self.stepping).contains_key(&id)
    }
}

/// On vCPU `me`'s thread: the guest offers the CPL3 trap in `f` (read from `gpa`).
/// `int3_there`: the byte before a #BP's RIP still is an `int3`. A trap the debugger
/// takes is written back with [`abi::DEBUG_RESUME`] (and the vCPU stops, for a stop);
/// one it does not take is left alone, so the guest reports it as an exception.
pub fn offered(me: &VcpuShared, vm: &VmShared, gpa: u64, mut f: DebugFrame, int3_there: bool) {
    // Only what the guest's entry builds (the caller checked where it is).
    if f.cs & 3 != 3 || !(f.vector == 1 || f.vector == 3) {
        return;
    }
    let dbg = &vm.debugger;
    let at = f.rip.wrapping_sub(1);
    let io_step = if f.vector == 3 {
        dbg.traps.take_io_step(me.id, at)
    } else {
        None
    };
    if let Some(bp) = io_step {
        // The step over port I/O is done: its `int3` goes, and the vCPU stops on the
        // next instruction.
        if vm.fault.ram.write_present(bp.gpa, &[bp.orig]).is_ok() {
            f.rip = at;
            f.verdict = abi::DEBUG_RESUME;
            if vm.fault.ram.write_present(gpa, f.as_slice()).is_ok() {
                lock(&dbg.traps.frames).insert(me.id, gpa);
                super::stop_vcpu(me, vm, DebugStop::Step);
            }
        }
        return;
    }
    let stepped = lock(&dbg.traps.stepping).remove(&me.id);
    let stop = match f.vector {
        3 if dbg.is_sw_breakpoint(at) => {
            // gdb wants the pc at the breakpoint (it reports `swbreak`).
            f.rip = at;
            Some(DebugStop::SwBreak)
        }
        // A debugger's breakpoint, removed while this vCPU was on its way here: run
        // the instruction that is back in its place.
        3 if !int3_there => {
            f.rip = at;
            None
        }
        // A step gdb gave up on.
        1 if stepped == Some(Step::Abandoned) => None,
        // The guest's own `int3`, or a #DB: gdb hears a SIGTRAP.
        3 | 1 if dbg.attached() => Some(DebugStop::Step),
        // The end of a step whose debugger has gone.
        1 if stepped.is_some() => None,
        _ => return,
    };
    f.rflags &= !TF;
    f.verdict = abi::DEBUG_RESUME;
    if vm.fault.ram.write_present(gpa, f.as_slice()).is_err() {
        return;
    }
    if let Some(stop) = stop {
        lock(&dbg.traps.frames).insert(me.id, gpa);
        super::stop_vcpu(me, vm, stop);
    }
}

fn read_frame(mem: &Memory<'_>, gpa: u64) -> Option<DebugFrame> {
    let mut f = DebugFrame::default();
    mem.read_phys(gpa, f.as_mut_slice()).ok().map(|()| f)
}

/// The registers a trap frame and `kvm_regs` both hold, paired (frame first).
fn pairs<'a>(f: &'a mut DebugFrame, r: &'a mut kvm_regs) -> [(&'a mut u64, &'a mut u64); 18] {
    [
        (&mut f.rax, &mut r.rax),
        (&mut f.rbx, &mut r.rbx),
        (&mut f.rcx, &mut r.rcx),
        (&mut f.rdx, &mut r.rdx),
        (&mut f.rsi, &mut r.rsi),
        (&mut f.rdi, &mut r.rdi),
        (&mut f.rbp, &mut r.rbp),
        (&mut f.rsp, &mut r.rsp),
        (&mut f.r8, &mut r.r8),
        (&mut f.r9, &mut r.r9),
        (&mut f.r10, &mut r.r10),
        (&mut f.r11, &mut r.r11),
        (&mut f.r12, &mut r.r12),
        (&mut f.r13, &mut r.r13),
        (&mut f.r14, &mut r.r14),
        (&mut f.r15, &mut r.r15),
        (&mut f.rip, &mut r.rip),
        (&mut f.rflags, &mut r.rflags),
    ]
}

/// vCPU `id`'s CPL3 registers in `s`, if it is stopped in a trap frame. The segment
/// registers other than CS and SS, and the rest, stay as KVM has them.
pub(super) fn overlay(vm: &VmShared, mem: &Memory<'_>, id: usize, s: &mut DebugState) {
    // A TF of the debugger's own, still waiting for its #DB, is not the guest's.
    if vm.debugger.traps.stepping(id) {
        s.regs.rflags &= !TF;
    }
    let Some(mut f) = vm.debugger.traps.frame(id).and_then(|g| read_frame(mem, g)) else {
        return;
    };
    for (from, to) in pairs(&mut f, &mut s.regs) {
        *to = *from;
    }
    s.sregs.cs.selector = f.cs as u16;
    s.sregs.cs.dpl = (f.cs & 3) as u8;
    s.sregs.ss.selector = f.ss as u16;
}

/// Writes `regs` (as gdb set them) into vCPU `id`'s trap frame: `None` if it is not
/// stopped in one, else whether the write worked.
pub(super) fn write_regs(
    vm: &VmShared,
    mem: &Memory<'_>,
    id: usize,
    regs: &kvm_regs,
) -> Option<bool> {
    let gpa = vm.debugger.traps.frame(id)?;
    let Some(mut f) = read_frame(mem, gpa) else {
        return Some(false);
    };
    let mut r = *regs;
    for (to, from) in pairs(&mut f, &mut r) {
        *to = *from;
    }
    Some(mem.write_phys(gpa, f.as_slice()).is_ok())
}

/// Before vCPUs run on: each released vCPU stopped in a trap frame leaves it with TF
/// set if it is `step`ped, clear otherwise. `released`: the vCPUs about to run.
pub(super) fn release(vm: &VmShared, mem: &Memory<'_>, released: &[usize], step: Option<usize>) {
    for &id in released {
        if step != Some(id) {
            if let Some(s) = lock(&vm.debugger.traps.stepping).get_mut(&id) {
                *s = Step::Abandoned;
            }
        }
        let Some(gpa) = lock(&vm.debugger.traps.frames).remove(&id) else {
            continue;
        };
        let Some(mut f) = read_frame(mem, gpa) else {
            continue;
        };
        if step == Some(id) && lock(&vm.debugger.traps.io_step).is_none() {
            f.rflags |= TF;
            vm.debugger.traps.expect_step(id);
        } else {
            f.rflags &= !TF;
        }
        if mem.write_phys(gpa, f.as_slice()).is_err() {
            eprintln!("ufvmm: gdb: vcpu {id}: cannot write its trap frame at {gpa:#x}");
        }
    }
}

/// On vCPU `me`'s thread, at CPL0: an `int3` KVM failed to emulate at `rip`. True if
/// it was the one-shot `int3` of a step over port I/O: then it is gone, and the vCPU
/// stops there.
pub fn io_step_done(me: &VcpuShared, vm: &VmShared, rip: u64) -> bool {
    let Some(bp) = vm.debugger.traps.take_io_step(me.id, rip) else {
        return false;
    };
    if vm.fault.ram.write_present(bp.gpa, &[bp.orig]).is_err() {
        return false;
    }
    super::stop_vcpu(me, vm, DebugStop::Step);
    true
}

/// Bytes of the port I/O instruction at the start of `code` (`in`, `out`, `ins`,
/// `outs`, with prefixes), if it is one. None of them branches.
fn io_len(code: &[u8]) -> Option<usize> {
    // Legacy prefixes (operand and address size, rep, segments), then at most one REX
    // (ignored by these instructions, but legal).
    let mut n = code
        .iter()
        .take_while(|b| {
            matches!(
                b,
                0x66 | 0x67 | 0xf2 | 0xf3 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65
            )
        })
        .count();
    if code.get(n).is_some_and(|b| (0x40..=0x4f).contains(b)) {
        n += 1;
    }
    match code.get(n)? {
        0xe4..=0xe7 => Some(n + 2),
        0xec..=0xef | 0x6c..=0x6f => Some(n + 1),
        _ => None,
    }
}

/// Before vCPU `id` (in state `s`) is stepped: if its instruction is port I/O,
/// plants the one-shot `int3` after it that ends the step, and returns true (the step
/// needs no TF, nor KVM's single step, then). On this host both lose their trap across
/// the I/O exit, and the step would run one instruction more.
pub(super) fn step_over_io(vm: &VmShared, mem: &Memory<'_>, id: usize, s: &DebugState) -> bool {
    let mut code = [0u8; 15];
    let Ok(n) = mem.read(&s.sregs, s.regs.rip, &mut code) else {
        return false;
    };
    let Some(len) = io_len(&code[..n]) else {
        return false;
    };
    let next = s.regs.rip.wrapping_add(len as u64);
    let Ok(gpa) = mem.translate(&s.sregs, next) else {
        return false;
    };
    let mut orig = [0u8];
    if mem.read_phys(gpa, &mut orig).is_err() || mem.write_phys(gpa, &[0xcc]).is_err() {
        return false;
    }
    *lock(&vm.debugger.traps.io_step) = Some((id, next, Int3 { gpa, orig: orig[0] }));
    true
}

/// Takes a step-over-I/O `int3` not hit (the VM stopped for another reason) out of
/// guest memory.
pub(super) fn drop_io_step(vm: &VmShared, mem: &Memory<'_>) {
    if let Some((_, _, bp)) = lock(&vm.debugger.traps.io_step).take() {
        if mem.write_phys(bp.gpa, &[bp.orig]).is_err() {
            eprintln!(
                "ufvmm: gdb: cannot take back a step's int3 at {:#x}",
                bp.gpa
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::io_len;

    #[test]
    fn port_io_instructions_are_told_with_their_length() {
        assert_eq!(io_len(&[0xef, 0x49]), Some(1)); // out dx, eax
        assert_eq!(io_len(&[0x66, 0xef]), Some(2)); // out dx, ax
        assert_eq!(io_len(&[0xe6, 0x80]), Some(2)); // out 0x80, al
        assert_eq!(io_len(&[0xec]), Some(1)); // in al, dx
        assert_eq!(io_len(&[0xf3, 0x6e]), Some(2)); // rep outsb
        assert_eq!(io_len(&[0x48, 0xef]), Some(2)); // REX.W out dx, eax
        assert_eq!(io_len(&[0x66, 0x41, 0xe7, 0x80]), Some(4));
        assert_eq!(io_len(&[0x2e, 0x6e]), Some(2)); // outsb from cs
        assert_eq!(io_len(&[0x48, 0x48, 0xef]), None); // one REX only
        assert_eq!(io_len(&[0x90]), None);
        assert_eq!(io_len(&[0x66]), None);
        assert_eq!(io_len(&[]), None);
    }
}
