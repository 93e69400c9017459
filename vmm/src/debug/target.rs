//! The VM as a gdbstub target: every vCPU a thread (tid = vCPU id + 1), all-stop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gdbstub::common::{Signal, Tid};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::BreakpointsOps;
use gdbstub::target::ext::monitor_cmd::MonitorCmdOps;
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;
use kvm_bindings::{
    kvm_guest_debug, kvm_sregs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
};
use vm_memory::ByteValued;

use super::breakpoints::lock_bps;
use super::memory::{AccessError, Memory};
use super::{user_trap, DebugStop};
use crate::vcpu::inspect::{DebugState, Op, Reply};
use crate::vcpu::stalls::Stall;
use crate::vcpu::{Holder, Request, RunState, VcpuShared};
use crate::vm::shared::VmShared;

/// Longest wait for every vCPU to stop, and for a parked vCPU's reply.
const STOP_BOUND: Duration = Duration::from_secs(1);

/// What a vCPU was doing when gdb stopped it.
#[derive(Clone, Copy)]
struct Before {
    state: RunState,
}

/// The VM, seen by gdb.
pub(super) struct GuestTarget {
    pub(super) vm: Arc<VmShared>,
    pub(super) conn: i32,
    /// Each vCPU's registers as read at this stop.
    cache: Vec<Option<DebugState>>,
    before: Vec<Before>,
    /// Hardware execution breakpoints (DR0-DR3).
    pub(super) hw: [Option<u64>; 4],
    /// The vCPU to single-step at the next resume, if any.
    step: Option<usize>,
    /// That step is not KVM's single step (TF at CPL3, or an int3 after port I/O).
    no_kvm_step: bool,
    /// The vCPU whose breakpoint or step made this stop, and which it was.
    stopped_by: Option<(usize, DebugStop)>,
    /// The vCPU a step runs, until the VM stops again.
    stepping: Option<usize>,
}

fn tid_of(id: usize) -> Option<Tid> {
    Tid::new(id + 1)
}

impl GuestTarget {
    /// The target for `vm`, served on the gdb connection `conn` (an fd).
    pub(super) fn new(vm: Arc<VmShared>, conn: i32) -> Self {
        let n = vm.vcpus.len();
        GuestTarget {
            vm,
            conn,
            cache: vec![None; n],
            before: vec![
                Before {
                    state: RunState::Created
                };
                n
            ],
            hw: [None; 4],
            step: None,
            no_kvm_step: false,
            stopped_by: None,
            stepping: None,
        }
    }

    fn vcpu(&self, tid: Tid) -> Option<&Arc<VcpuShared>> {
        self.vm.vcpus.get(tid.get().checked_sub(1)?)
    }

    /// Stops every vCPU (all-stop) and waits up to [`STOP_BOUND`] for each to park.
    pub(super) fn stop_all(&mut self) {
        let start = Instant::now();
        for (v, b) in self.vm.vcpus.iter().zip(self.before.iter_mut()) {
            let state = v.run_state();
            // One the debugger kept (a step ran another) or that stopped itself (a
            // breakpoint) keeps what it did when it last ran.
            if !(state == RunState::Paused && v.control.held_by(Holder::Debugger)) {
                b.state = state;
            }
        }
        let seqs: Vec<Option<u64>> = self
            .vm
            .vcpus
            .iter()
            .map(|v| self.vm.ask(v, Request::Stop(Holder::Debugger)))
            .collect();
        let deadline = start + STOP_BOUND;
        for (v, seq) in self.vm.vcpus.iter().zip(seqs) {
            if let Some(s) = seq {
                if !v.control.kick.wait_answered(s, deadline) {
                    eprintln!("ufvmm: gdb: vcpu {} did not stop within 1 s", v.id);
                }
            }
            while v.control.started() && !v.control.parked() && !v.control.ended() {
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        self.cache.iter_mut().for_each(|c| *c = None);
        self.stopped_by = None;
        self.stepping = None;
        // A step over I/O that did not end (its instruction waits for a page, say).
        user_trap::drop_io_step(&self.vm, &Memory::new(&self.vm, self.conn));
        self.vm
            .debugger
            .set_stop_us(start.elapsed().as_micros() as u64);
        self.vm.debugger.set(true, true);
    }

    /// Lets every vCPU run again (an operator's pause stays).
    fn release_all(&mut self) {
        self.vm.debugger.set_waiting(false);
        self.cache.iter_mut().for_each(|c| *c = None);
        let all: Vec<usize> = (0..self.vm.vcpus.len()).collect();
        self.vm.debugger.drop_events(&all);
        user_trap::release(&self.vm, &Memory::new(&self.vm, self.conn), &all, None);
        for v in self.vm.vcpus.iter() {
            self.vm.ask(v, Request::Release(Holder::Debugger));
        }
    }

    /// What KVM is to intercept on vCPU `id` when it runs next.
    fn guest_debug(&self, id: usize) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug::default();
        let mut dr7 = 0u64;
        for (i, a) in self.hw.iter().enumerate() {
            if let Some(a) = a {
                dbg.arch.debugreg[i] = *a;
                // Gn: enabled; R/W and LEN 00: execution, one byte.
                dr7 |= 2 << (2 * i);
            }
        }
        let has_sw = !lock_bps(&self.vm).is_empty();
        if dr7 != 0 {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[7] = dr7;
        }
        if has_sw {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        }
        if self.step == Some(id) && !self.no_kvm_step {
            dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        dbg
    }

    /// Sets every live vCPU's guest debug (they are parked); false if one failed.
    fn apply_guest_debug(&mut self) -> bool {
        let mut ok = true;
        for v in self.vm.vcpus.iter() {
            if !v.control.started() || v.control.ended() {
                continue;
            }
            let op = Op::SetGuestDebug(Box::new(self.guest_debug(v.id)));
            let r = v
                .control
                .inspect
                .call(&v.control.kick, op, Instant::now() + STOP_BOUND);
            if !matches!(r, Some(Reply::Done)) {
                eprintln!("ufvmm: gdb: vcpu {}: cannot set guest debug: {r:?}", v.id);
                ok = false;
            }
        }
        ok
    }

    /// Runs on as gdb asked: every vCPU, or only the one to single-step. A step at
    /// CPL3, where this host's KVM intercepts nothing, is a TF the guest's #DB entry
    /// offers back (see [`user_trap`]): in the trap frame the vCPU stopped in, or in
    /// its RFLAGS.
    fn resume_as_asked(&mut self) {
        let step = self.step;
        if let Some(id) = step {
            let state = self.tid(id).and_then(|t| self.state(t).ok());
            let mem = Memory::new(&self.vm, self.conn);
            if state
                .as_ref()
                .is_some_and(|s| user_trap::step_over_io(&self.vm, &mem, id, s))
            {
                // The one-shot int3 after the instruction ends the step: no TF, and
                // not KVM's single step either.
                self.no_kvm_step = true;
            } else if let Some(mut s) = state.filter(|s| s.sregs.cs.selector & 3 == 3) {
                if self.vm.debugger.traps.frame(id).is_none() && !self.set_tf(id, &mut s) {
                    eprintln!("ufvmm: gdb: vcpu {id}: cannot set TF to step it; not stepped");
                    self.step = None;
                    self.vm.debugger.report(id, DebugStop::Step);
                    return;
                }
                self.vm.debugger.traps.expect_step(id);
                // TF does it; KVM's own single step would stop in the guest's handler.
                self.no_kvm_step = true;
            }
        }
        self.apply_guest_debug();
        self.no_kvm_step = false;
        let released: Vec<usize> = match step {
            Some(id) => vec![id],
            None => (0..self.vm.vcpus.len()).collect(),
        };
        // Every vCPU is parked: a stop reported but not passed on is stale.
        self.vm.debugger.drop_events(&released);
        self.cache.iter_mut().for_each(|c| *c = None);
        self.vm.debugger.set_waiting(false);
        user_trap::release(&self.vm, &Memory::new(&self.vm, self.conn), &released, step);
        for id in released {
            if let Some(v) = self.vm.vcpus.get(id) {
                self.vm.ask(v, Request::Release(Holder::Debugger));
            }
        }
        self.stepping = step;
        self.step = None;
        self.vm.debugger.set(true, false);
    }

    /// A step whose vCPU ended instead (it stepped the write that ends it): the stop
    /// gdb waits for, in a vCPU still there (the others are stopped all along).
    pub(super) fn step_lost(&mut self) -> Option<MultiThreadStopReason<u64>> {
        let id = self.stepping?;
        if !self.vm.vcpus.get(id).is_some_and(|v| v.control.ended()) {
            return None;
        }
        let live = self.vm.vcpus.iter().find(|v| !v.control.ended())?.id;
        self.stop_all();
        Some(MultiThreadStopReason::SignalWithThread {
            tid: tid_of(live)?,
            signal: Signal::SIGTRAP,
        })
    }

    /// Sets TF in vCPU `id`'s own RFLAGS (state `s`, not in a trap frame).
    fn set_tf(&mut self, id: usize, s: &mut DebugState) -> bool {
        let Some(v) = self.vm.vcpus.get(id) else {
            return false;
        };
        s.regs.rflags |= user_trap::TF;
        let op = Op::WriteRegs(Box::new(s.regs));
        matches!(
            v.control
                .inspect
                .call(&v.control.kick, op, Instant::now() + STOP_BOUND),
            Some(Reply::Done)
        )
    }

    fn tid(&self, id: usize) -> Option<Tid> {
        tid_of(id)
    }

    /// The stop reply for vCPU `id`'s `stop`.
    pub(super) fn debug_reason(
        &mut self,
        id: usize,
        stop: DebugStop,
    ) -> MultiThreadStopReason<u64> {
        self.stopped_by = Some((id, stop));
        let Some(tid) = tid_of(id) else {
            return MultiThreadStopReason::Signal(Signal::SIGTRAP);
        };
        match stop {
            DebugStop::SwBreak => MultiThreadStopReason::SwBreak(tid),
            DebugStop::HwBreak => MultiThreadStopReason::HwBreak(tid),
            DebugStop::Step => MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGTRAP,
            },
        }
    }

    /// The state of every vCPU whose thread runs (read, or from this stop's cache).
    fn live_states(&mut self) -> Vec<DebugState> {
        self.live_states_by_id()
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }

    /// [`GuestTarget::live_states`], with each vCPU's id.
    pub(super) fn live_states_by_id(&mut self) -> Vec<(usize, DebugState)> {
        let tids: Vec<Tid> = self
            .vm
            .vcpus
            .iter()
            .filter(|v| v.control.started() && !v.control.ended())
            .filter_map(|v| tid_of(v.id))
            .collect();
        tids.into_iter()
            .filter_map(|t| self.state(t).ok().map(|s| (t.get() - 1, s)))
            .collect()
    }

    /// A stopped vCPU's special registers, for an access with no thread named.
    pub(super) fn any_sregs(&mut self) -> Option<kvm_sregs> {
        self.live_states().first().map(|s| s.sregs)
    }

    /// True if some stopped vCPU runs at CPL3.
    pub(super) fn any_cpl3(&mut self) -> bool {
        self.live_states()
            .iter()
            .any(|s| s.sregs.cs.selector & 3 == 3)
    }

    /// True if the built-in guest's boot info says its workload runs at CPL3.
    /// (A boot info that has not arrived yet, on a postcopy destination, counts as
    /// user mode: refusing is the safe answer.)
    pub(super) fn user_mode(&self) -> bool {
        let mut b = crate::abi::BootInfo::default();
        let mem = Memory::new(&self.vm, self.conn);
        match mem.read_phys(crate::abi::BOOT_INFO_GPA, b.as_mut_slice()) {
            Ok(()) => b.magic == crate::abi::BOOT_MAGIC && b.mode == crate::abi::mode::USER,
            Err(super::memory::AccessError::NotArrived) => true,
            Err(_) => false,
        }
    }

    /// Puts back every byte a software breakpoint replaced, and clears guest debug.
    fn clear_breakpoints(&mut self) {
        let bps = std::mem::take(&mut *lock_bps(&self.vm));
        let mem = Memory::new(&self.vm, self.conn);
        for (a, bp) in bps {
            if mem.write_phys(bp.gpa, &[bp.orig]).is_err() {
                eprintln!("ufvmm: gdb: cannot put back the byte under the breakpoint at {a:#x}");
            }
        }
        self.hw = [None; 4];
        self.step = None;
        self.apply_guest_debug();
    }

    /// Why the VM stopped, for gdb: an interrupt, in the thread that has waited longest
    /// for a page (or the first vCPU).
    pub(super) fn stop_reason(&self) -> MultiThreadStopReason<u64> {
        let now = Instant::now();
        let longest = self
            .stalls()
            .map(|(id, s)| (now.saturating_duration_since(s.since), id))
            .max()
            .map(|(_, id)| id);
        let id = longest
            .or_else(|| {
                self.vm
                    .vcpus
                    .iter()
                    .find(|v| !v.control.ended())
                    .map(|v| v.id)
            })
            .unwrap_or(0);
        match tid_of(id) {
            Some(tid) => MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGINT,
            },
            None => MultiThreadStopReason::Signal(Signal::SIGINT),
        }
    }

    /// How the VM ended, for gdb: exit 0 when every vCPU reported success.
    pub(super) fn exit_reason(&self) -> MultiThreadStopReason<u64> {
        let ok = self.vm.vcpus.iter().all(|v| {
            v.results
                .lock()
                .map(|r| r.is_some_and(|r| r.mismatches == 0))
                .unwrap_or(false)
        });
        MultiThreadStopReason::Exited(if ok { 0 } else { 1 })
    }

    /// What vCPU `id` did when gdb last stopped it.
    pub(super) fn before_state(&self, id: usize) -> RunState {
        self.before.get(id).map_or(RunState::Created, |b| b.state)
    }

    /// The VM.
    pub(super) fn vm(&self) -> &VmShared {
        &self.vm
    }

    /// Each vCPU waiting for a page, with its wait.
    pub(super) fn stalls(&self) -> impl Iterator<Item = (usize, Stall)> + '_ {
        self.vm
            .vcpus
            .iter()
            .filter_map(|v| v.stall.current().map(|s| (v.id, s)))
    }

    /// True once the VM is ending.
    pub(super) fn vm_ended(&self) -> bool {
        self.vm.is_shutting_down() || self.vm.vcpus.iter().all(|v| v.control.ended())
    }

    /// The registers of vCPU `tid`, read through its parked thread.
    fn state(&mut self, tid: Tid) -> Result<DebugState, TargetError<String>> {
        let id = tid.get() - 1;
        if let Some(Some(s)) = self.cache.get(id) {
            return Ok(*s);
        }
        let v = self.vcpu(tid).ok_or(TargetError::NonFatal)?;
        match v
            .control
            .inspect
            .call(&v.control.kick, Op::Read, Instant::now() + STOP_BOUND)
        {
            Some(Reply::State(mut s)) => {
                user_trap::overlay(&self.vm, &Memory::new(&self.vm, self.conn), id, &mut s);
                if let Some(c) = self.cache.get_mut(id) {
                    *c = Some(*s);
                }
                Ok(*s)
            }
            _ => Err(TargetError::NonFatal),
        }
    }

    /// How a vCPU was when stopped, in words.
    fn describe(&self, id: usize, now: Instant) -> String {
        let Some(v) = self.vm.vcpus.get(id) else {
            return String::new();
        };
        let before = self.before.get(id).map_or(RunState::Created, |b| b.state);
        if v.control.ended() {
            return format!("vcpu {id}: exited");
        }
        if !v.control.started() {
            return format!("vcpu {id}: not started");
        }
        let mid = if v.control.parked_mid_instruction() {
            " (mid-instruction)"
        } else {
            ""
        };
        if let Some(s) = v.stall.current() {
            return format!("vcpu {id}: {}{mid}", waiting(&s, before, now));
        }
        if v.first_entry.get().is_none() {
            return format!("vcpu {id}: at its first instruction");
        }
        // The vCPU whose stop gdb heard, or one that stopped as well meanwhile.
        let own = match self.stopped_by {
            Some((i, stop)) if i == id => Some(stop),
            _ => self.vm.debugger.pending_stop(id),
        };
        match own {
            Some(DebugStop::SwBreak) => return format!("vcpu {id}: at a breakpoint"),
            Some(DebugStop::HwBreak) => return format!("vcpu {id}: at a hardware breakpoint"),
            Some(DebugStop::Step) => return format!("vcpu {id}: stepped"),
            None => {}
        }
        let what = match before {
            RunState::Halted => "halted",
            RunState::Paused => "paused",
            _ if v.control.held_by(Holder::Operator) => "paused",
            _ => "running",
        };
        format!("vcpu {id}: {what}")
    }
}

/// "waiting for page 0x… for 1.2 s (kernel wait)".
pub(super) fn waiting(s: &Stall, before: RunState, now: Instant) -> String {
    let secs = now.saturating_duration_since(s.since).as_secs_f64();
    let kind = if s.in_vmm {
        "device wait"
    } else if before == RunState::WaitingKernel {
        "kernel wait"
    } else {
        "user wait"
    };
    format!("waiting for page {:#x} for {secs:.1} s ({kind})", s.gpa)
}

impl Drop for GuestTarget {
    /// The VM runs on, unless `--gdb-wait` still waits for a gdb that continues it.
    fn drop(&mut self) {
        // A gdb gone while the VM ran: stop it first, so that no vCPU meets an `int3`
        // while they are put back, and the parked vCPUs answer.
        if !self.vm.debugger.stopped() {
            self.stop_all();
        }
        self.clear_breakpoints();
        if self.vm.debugger.waiting() {
            self.vm.debugger.set(false, true);
        } else {
            // Not attached before the release: a trap from here on is no debugger's.
            self.vm.debugger.set(false, false);
            self.release_all();
        }
    }
}

impl Target for GuestTarget {
    type Arch = X86_64_SSE;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
}

fn regs_from(s: &DebugState) -> X86_64CoreRegs {
    let r = &s.regs;
    let mut out = X86_64CoreRegs {
        regs: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        eflags: r.rflags as u32,
        rip: r.rip,
        ..Default::default()
    };
    let sr = &s.sregs;
    out.segments.cs = u32::from(sr.cs.selector);
    out.segments.ss = u32::from(sr.ss.selector);
    out.segments.ds = u32::from(sr.ds.selector);
    out.segments.es = u32::from(sr.es.selector);
    out.segments.fs = u32::from(sr.fs.selector);
    out.segments.gs = u32::from(sr.gs.selector);
    let f = &s.fpu;
    for (st, fpr) in out.st.iter_mut().zip(f.fpr.iter()) {
        st.copy_from_slice(&fpr[..10]);
    }
    out.fpu.fctrl = u32::from(f.fcw);
    out.fpu.fstat = u32::from(f.fsw);
    // The abridged tag (one bit per register, set = in use) as the full tag word
    // (00 valid, 11 empty).
    out.fpu.ftag = (0..8).fold(0, |t, i| {
        if f.ftwx & (1 << i) != 0 {
            t
        } else {
            t | 3 << (2 * i)
        }
    });
    out.fpu.fioff = f.last_ip as u32;
    out.fpu.fooff = f.last_dp as u32;
    out.fpu.fop = u32::from(f.last_opcode);
    for (x, b) in out.xmm.iter_mut().zip(f.xmm.iter()) {
        *x = u128::from_le_bytes(*b);
    }
    out.mxcsr = f.mxcsr;
    out
}

impl MultiThreadBase for GuestTarget {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        *regs = regs_from(&self.state(tid)?);
        Ok(())
    }

    /// General registers, RIP and RFLAGS are written; segments and FPU are not.
    fn write_registers(&mut self, regs: &X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let id = tid.get() - 1;
        // The registers as they are (a trap frame's, for a vCPU stopped in one).
        let mut s = self.state(tid)?;
        let r = &mut s.regs;
        let g = &regs.regs;
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) =
            (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rip = regs.rip;
        // The CPU's own bits (above the low 32) stay, and a step's TF (hidden from gdb).
        r.rflags = (r.rflags & !0xffff_ffff) | u64::from(regs.eflags);
        if self.vm.debugger.traps.stepping(id) && self.vm.debugger.traps.frame(id).is_none() {
            r.rflags |= user_trap::TF;
        }
        let mem = Memory::new(&self.vm, self.conn);
        match user_trap::write_regs(&self.vm, &mem, id, &s.regs) {
            Some(true) => {
                // Read again when next asked: what gdb reads back is what is there.
                if let Some(c) = self.cache.get_mut(id) {
                    *c = None;
                }
                return Ok(());
            }
            Some(false) => return Err(TargetError::NonFatal),
            None => {}
        }
        let v = self.vcpu(tid).ok_or(TargetError::NonFatal)?;
        let op = Op::WriteRegs(Box::new(s.regs));
        match v
            .control
            .inspect
            .call(&v.control.kick, op, Instant::now() + STOP_BOUND)
        {
            Some(Reply::Done) => {
                if let Some(c) = self.cache.get_mut(id) {
                    *c = None;
                }
                Ok(())
            }
            _ => Err(TargetError::NonFatal),
        }
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        // Past the end of the address space: an error, before gdbstub adds to it.
        if start.checked_add(data.len() as u64).is_none() {
            return Err(TargetError::Errno(14));
        }
        let s = self.state(tid)?;
        match Memory::new(&self.vm, self.conn).read(&s.sregs, start, data) {
            Ok(n) => Ok(n),
            Err(AccessError::NotArrived) => Err(TargetError::Errno(11)),
            Err(_) => Err(TargetError::Errno(14)),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        if start.checked_add(data.len() as u64).is_none() {
            return Err(TargetError::Errno(14));
        }
        let s = self.state(tid)?;
        Memory::new(&self.vm, self.conn)
            .write(&s.sregs, start, data)
            .map_err(|_| TargetError::Errno(14))
    }

    fn list_active_threads(&mut self, active: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        let mut any = false;
        for v in self.vm.vcpus.iter().filter(|v| !v.control.ended()) {
            if let Some(t) = tid_of(v.id) {
                active(t);
                any = true;
            }
        }
        // gdb needs a thread to talk to, even when every vCPU has ended.
        if !any {
            if let Some(t) = tid_of(0) {
                active(t);
            }
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for GuestTarget {
    /// All-stop: any continue lets every vCPU go.
    fn resume(&mut self) -> Result<(), Self::Error> {
        self.resume_as_asked();
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.step = None;
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }

    fn set_resume_action_continue(
        &mut self,
        _tid: Tid,
        signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        match signal {
            None => Ok(()),
            Some(s) => Err(format!("continuing with signal {s} is not supported")),
        }
    }
}

impl MultiThreadSchedulerLocking for GuestTarget {
    /// gdb names only some threads to run; here every continue runs every vCPU (a step
    /// runs only the stepped one).
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl MultiThreadSingleStep for GuestTarget {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        if let Some(s) = signal {
            return Err(format!("stepping with signal {s} is not supported"));
        }
        self.step = tid.get().checked_sub(1);
        Ok(())
    }
}

impl ThreadExtraInfo for GuestTarget {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let text = self.describe(tid.get() - 1, Instant::now());
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}
