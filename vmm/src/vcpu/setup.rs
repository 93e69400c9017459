//! Puts a fresh vCPU into 64-bit long mode at the guest's entry point.

use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, kvm_segment, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;

use crate::abi;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up vcpu {id}: {what}: {source}")]
pub struct SetupError {
    /// vCPU index.
    pub id: usize,
    /// The step that failed.
    pub what: &'static str,
    /// The KVM error.
    pub source: vmm_sys_util::errno::Error,
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_AM: u64 = 1 << 18;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets CPUID, long-mode special registers, the FPU, the entry registers (RDI = vCPU
/// index, RSI = boot info) and makes every vCPU runnable (APs would otherwise wait for
/// INIT/SIPI under the in-kernel LAPIC).
pub fn configure(fd: &VcpuFd, id: usize, entry: u64, cpuid: &CpuId) -> Result<(), SetupError> {
    let err = |what| move |source| SetupError { id, what, source };
    fd.set_cpuid2(cpuid).map_err(err("KVM_SET_CPUID2"))?;

    let mut sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.cr3 = abi::PML4_GPA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs.cs = segment(0x08, true);
    let data = segment(0x10, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;

    let regs = kvm_regs {
        rip: entry,
        rdi: id as u64,
        rsi: abi::BOOT_INFO_GPA,
        rsp: abi::kernel_stack_top(id as u64) - 8,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(err("KVM_SET_MP_STATE"))?;
    Ok(())
}
