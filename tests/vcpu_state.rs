//! A vCPU's state moves from one VM to another on real KVM.

mod common;
use common::kvm_or_skip;

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use ufvmm::vcpu::setup::configure;
use ufvmm::vcpu::state::VcpuState;

fn vm_with_vcpu(kvm: &Kvm) -> (VmFd, VcpuFd) {
    vm_with_vcpu_payload(kvm, false)
}

/// A VM with one configured vCPU; `payload`: with `KVM_CAP_EXCEPTION_PAYLOAD` on.
fn vm_with_vcpu_payload(kvm: &Kvm, payload: bool) -> (VmFd, VcpuFd) {
    let vm = kvm.create_vm().expect("create vm");
    vm.create_irq_chip().expect("irqchip");
    if payload {
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_EXCEPTION_PAYLOAD,
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).expect("KVM_CAP_EXCEPTION_PAYLOAD");
    }
    let fd = vm.create_vcpu(0).expect("vcpu");
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("cpuid");
    configure(&fd, 0, 0x10_0000, &cpuid).expect("configure");
    (vm, fd)
}

#[test]
fn state_saved_from_one_vm_restores_into_another() {
    if !kvm_or_skip("state_saved_from_one_vm_restores_into_another") {
        return;
    }
    let kvm = Kvm::new().expect("kvm");
    let supported = kvm.get_msr_index_list().expect("msr list");
    let supported = supported.as_slice();
    let (_vm1, a) = vm_with_vcpu(&kvm);
    let mut regs = a.get_regs().unwrap();
    regs.rax = 0x1122_3344_5566_7788;
    regs.r15 = 42;
    a.set_regs(&regs).unwrap();
    let lstar = kvm_msr_entry {
        index: 0xc000_0082,
        data: 0xffff_ffff_8100_0000,
        ..Default::default()
    };
    a.set_msrs(&Msrs::from_entries(&[lstar]).unwrap()).unwrap();
    // State a fresh vCPU does not have, so a restore that skipped it would be caught.
    let mut xsave = a.get_xsave().unwrap();
    xsave.region[40] = 0x5a5a_5a5a; // xmm0's first dword (legacy area offset 160)
    xsave.region[128] |= 0x3; // XSTATE_BV: x87 and SSE state present
                              // SAFETY: a 4096-byte kvm_xsave read from this vCPU; no dynamic XSTATE features.
    unsafe { a.set_xsave(&xsave).unwrap() };
    assert_eq!(
        a.get_xsave().unwrap().region[40],
        0x5a5a_5a5a,
        "KVM kept xmm0 on the source"
    );
    let mut lapic = a.get_lapic().unwrap();
    lapic.regs[0x80] = 0x20; // task priority
    a.set_lapic(&lapic).unwrap();
    a.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_HALTED,
    })
    .unwrap();

    let bytes = VcpuState::save(&a, supported).expect("save").to_bytes();
    let state = VcpuState::from_bytes(&bytes).expect("parse");
    let (_vm2, b) = vm_with_vcpu(&kvm);
    state.restore(&b, false).expect("restore");

    let back = VcpuState::save(&b, supported).expect("save again");
    assert_eq!(back.regs.rax, 0x1122_3344_5566_7788);
    assert_eq!(back.regs.r15, 42);
    assert_eq!(back.regs.rip, 0x10_0000);
    assert_eq!(back.sregs.cr3, state.sregs.cr3);
    assert_eq!(back.sregs.efer, state.sregs.efer);
    let msr = |s: &VcpuState, i: u32| s.msrs.iter().find(|m| m.0 == i).map(|m| m.1);
    assert_eq!(msr(&back, 0xc000_0082), Some(0xffff_ffff_8100_0000));
    assert_eq!(back.lapic.regs[0x80], 0x20);
    assert_eq!(back.xsave.region[40], 0x5a5a_5a5a);
    assert_eq!(back.mp_state.mp_state, kvm_bindings::KVM_MP_STATE_HALTED);
    // Bad bytes are refused before anything touches a vCPU.
    assert!(VcpuState::from_bytes(&bytes[..bytes.len() - 1]).is_err());
}

/// A #PF pending with its address as payload (a source with exception payloads on, as
/// ufvmm runs) reaches a VM without them as KVM reports it there: injected, with the
/// address in CR2. Written as saved, KVM refuses it (`KVM_VCPUEVENT_VALID_PAYLOAD`).
#[test]
fn a_pending_page_fault_moves_to_a_vm_without_exception_payloads() {
    if !kvm_or_skip("a_pending_page_fault_moves_to_a_vm_without_exception_payloads") {
        return;
    }
    let kvm = Kvm::new().expect("kvm");
    let supported = kvm.get_msr_index_list().expect("msr list");
    let supported = supported.as_slice();
    let (_vm1, a) = vm_with_vcpu_payload(&kvm, true);
    let mut ev = a.get_vcpu_events().expect("events");
    ev.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_PAYLOAD;
    ev.exception.nr = 14;
    ev.exception.pending = 1;
    ev.exception.has_error_code = 1;
    ev.exception.error_code = 2;
    ev.exception_has_payload = 1;
    ev.exception_payload = 0x3fe0_0000;
    a.set_vcpu_events(&ev)
        .expect("a pending #PF with its payload");
    let state = VcpuState::save(&a, supported).expect("save");
    assert_eq!(state.events.exception.pending, 1, "{:?}", state.events);
    assert_ne!(state.sregs.cr2, 0x3fe0_0000, "payload not yet in CR2");

    let (_vm2, b) = vm_with_vcpu_payload(&kvm, false);
    assert!(
        state.restore(&b, true).is_err(),
        "KVM took the payload flag on a VM without payloads: nothing to convert"
    );
    let (_vm3, c) = vm_with_vcpu_payload(&kvm, false);
    state.restore(&c, false).expect("restore");
    let back = c.get_vcpu_events().expect("events");
    assert_eq!((back.exception.nr, back.exception.injected), (14, 1));
    assert_eq!(back.exception.error_code, 2);
    assert_eq!(c.get_sregs().expect("sregs").cr2, 0x3fe0_0000);
    // Into a VM with payloads it goes as it is.
    let (_vm4, d) = vm_with_vcpu_payload(&kvm, true);
    state.restore(&d, true).expect("restore");
    let back = d.get_vcpu_events().expect("events");
    assert_eq!(
        (back.exception.pending, back.exception_payload),
        (1, 0x3fe0_0000)
    );
}
