//! `--kernel`: tiny hand-assembled guests, each a one-segment ELF loaded at 1 MiB and
//! entered in 64-bit mode at CPL0 (run by KVM's instruction emulator on PVM hosts).

mod common;
use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);
const LOAD: u64 = 0x10_0000;

/// A minimal ELF64 executable: headers and code in one PT_LOAD at `LOAD`, entry at the
/// code.
fn elf(code: &[u8]) -> Vec<u8> {
    let hdrs = 64 + 56;
    let entry = LOAD + hdrs as u64;
    let total = (hdrs + code.len()) as u64;
    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]); // 64-bit, LE, v1
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&7u32.to_le_bytes()); // RWX
    f.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    f.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr
    f.extend_from_slice(&total.to_le_bytes()); // p_filesz
    f.extend_from_slice(&total.to_le_bytes()); // p_memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    assert_eq!(f.len(), hdrs);
    f.extend_from_slice(code);
    f
}

fn boot(code: &[u8]) -> Run {
    let dir = scratch();
    let path = path_in(&dir, "guest.elf");
    std::fs::write(&path, elf(code)).unwrap();
    run(
        &["--vcpus", "1", "--mem", "16M", "--kernel", s(&path)],
        LIMIT,
    )
}

#[test]
fn another_elf_prints_and_exits_with_its_own_code() {
    if !kvm_or_skip("another_elf_prints_and_exits") {
        return;
    }
    let code = [
        0x66, 0xba, 0xf8, 0x03, //       mov dx, 0x3f8
        0xb0, b'h', 0xee, //             mov al, 'h' ; out dx, al
        0xb0, b'i', 0xee, //             mov al, 'i' ; out dx, al
        0xb0, b'\n', 0xee, //            mov al, '\n'; out dx, al
        0x66, 0xba, 0x01, 0x05, //       mov dx, 0x501 (exit port)
        0xb8, 0x07, 0x00, 0x00, 0x00, // mov eax, 7
        0xef, //                         out dx, eax
        0xf4, //                         hlt (not reached)
    ];
    let r = boot(&code);
    assert_eq!(r.code(), Some(7), "{}", r.explain());
    assert!(r.stdout.contains("[vcpu0] hi"), "{}", r.explain());
    assert!(
        r.stderr.contains("guest exited with code 7"),
        "{}",
        r.explain()
    );
}

#[test]
fn kvm_internal_error_ends_the_run_with_a_clear_line() {
    if !kvm_or_skip("kvm_internal_error") {
        return;
    }
    let code = [
        0x0f, 0x57, 0xc0, // xorps xmm0, xmm0: the x86 emulator has no SSE logic ops
        0xf4, //             hlt
    ];
    let r = boot(&code);
    assert_eq!(r.code(), Some(1), "{}", r.explain());
    let line = r.stderr.lines().next().unwrap_or("");
    assert!(line.contains("KVM internal error"), "{}", r.explain());
}
