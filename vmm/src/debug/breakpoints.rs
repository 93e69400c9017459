//! Breakpoints for the gdb target: software ones (`int3` in guest memory, kept by
//! guest-physical address) and hardware execution ones (DR0-DR3, CPL0 only here).

use gdbstub::target::ext::breakpoints::{
    Breakpoints, HwBreakpoint, HwBreakpointOps, HwWatchpointOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::TargetResult;

use super::memory::Memory;
use super::target::GuestTarget;
use super::Int3;
use crate::vm::shared::VmShared;

impl Breakpoints for GuestTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for GuestTarget {
    /// An `int3` written into guest memory. At CPL0 this host's KVM fails to
    /// emulate it (recognised as the hit); at CPL3 the guest's #BP entry offers it
    /// (see [`user_trap`]).
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if lock_bps(&self.vm).contains_key(&addr) {
            return Ok(true);
        }
        let Some(sregs) = self.any_sregs() else {
            return Ok(false);
        };
        let mem = Memory::new(&self.vm, self.conn);
        let Ok(gpa) = mem.translate(&sregs, addr) else {
            return Ok(false);
        };
        let mut orig = [0u8];
        if mem.read_phys(gpa, &mut orig).is_err() || mem.write_phys(gpa, &[0xcc]).is_err() {
            return Ok(false);
        }
        lock_bps(&self.vm).insert(addr, Int3 { gpa, orig: orig[0] });
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(bp) = lock_bps(&self.vm).remove(&addr) else {
            return Ok(false);
        };
        Ok(Memory::new(&self.vm, self.conn)
            .write_phys(bp.gpa, &[bp.orig])
            .is_ok())
    }
}

impl HwBreakpoint for GuestTarget {
    /// One of DR0-DR3, as an execution breakpoint. Intercepted at CPL0 on this
    /// host, not at CPL3: refused (gdb says it cannot insert it) while a vCPU runs
    /// at CPL3.
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.hw.contains(&Some(addr)) {
            return Ok(true);
        }
        if self.any_cpl3() || self.user_mode() {
            eprintln!("ufvmm: gdb: hardware breakpoint at {addr:#x} refused: the guest runs at CPL3, where this host's KVM does not intercept them (use break)");
            return Ok(false);
        }
        match self.hw.iter_mut().find(|h| h.is_none()) {
            Some(slot) => {
                *slot = Some(addr);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        match self.hw.iter_mut().find(|h| **h == Some(addr)) {
            Some(slot) => {
                *slot = None;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

pub(super) fn lock_bps(
    vm: &VmShared,
) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Int3>> {
    vm.debugger
        .sw_breakpoints
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}
