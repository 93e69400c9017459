//! The ufvmm built-in guest: a tiny x86-64 long-mode kernel.
//!
//! Every vCPU enters [`_start`] with its index and the boot info address, sets up its
//! own GDT/TSS/IDT, then runs one workload at CPL0 or CPL3 and reports through I/O
//! ports (see `abi.rs`).
//!
//! CPL0 code runs in KVM's instruction emulator on the target machines, which cannot
//! execute SSE: the build disables SSE, and this crate avoids floats, `core::fmt` and
//! panics (whose precompiled code may use SSE).

#![no_std]
#![no_main]

mod abi;
mod arch;
mod console;
mod workloads;

use abi::BootInfo;

/// Exit code for `PORT_EXIT` when the boot info is unusable.
const EXIT_BAD_BOOT: u32 = 3;
/// Exit code for `PORT_EXIT` when the guest panicked (a guest bug).
const EXIT_PANIC: u32 = 4;

/// Entry point of every vCPU (the VMM sets RDI = index, RSI = boot info GPA, and
/// RSP = kernel stack top - 8, as if called).
#[no_mangle]
pub extern "C" fn _start(idx: u64, boot: u64) -> ! {
    if idx >= abi::MAX_VCPUS as u64 {
        // No per-vCPU state to use: say so and stop the VM.
        console::line(&[b"vcpu ", b"?: index too large"]);
        arch::exit(EXIT_BAD_BOOT);
    }
    arch::init(idx);

    if boot != abi::BOOT_INFO_GPA {
        console::vcpu_line(idx, &[b"bad boot info address"]);
        arch::exit(EXIT_BAD_BOOT);
    }
    let info = boot as *const BootInfo;
    // SAFETY: BOOT_INFO_GPA is RAM the VMM filled with a BootInfo; the guest runs
    // identity-mapped, so this is a valid, aligned pointer. Read-only.
    let bi = unsafe { info.read_volatile() };
    if bi.magic != abi::BOOT_MAGIC
        || bi.version != abi::BOOT_VERSION
        || bi.nr_vcpus == 0
        || idx >= u64::from(bi.nr_vcpus)
    {
        console::vcpu_line(idx, &[b"bad boot info"]);
        arch::exit(EXIT_BAD_BOOT);
    }

    if bi.workload == abi::workload::CRASH && bi.crash_kind == abi::crash::TRIPLE {
        // Needs CPL0 in both modes (lidt), so it happens before dropping to CPL3.
        console::vcpu_line(idx, &[b"crash triple"]);
        arch::triple_fault();
    }

    if bi.mode == abi::mode::KERNEL {
        workloads::run(idx, info, true)
    } else {
        arch::enter_user(idx, boot)
    }
}

/// Where CPL3 starts (reached through `iretq` from [`arch::enter_user`]).
pub extern "C" fn user_main(idx: u64, boot: u64) -> ! {
    workloads::run(idx, boot as *const BootInfo, false)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No formatting here: core::fmt is off limits (see the crate docs).
    console::line(&[b"guest panic"]);
    arch::exit(EXIT_PANIC)
}

// The compiler lowers copies, fills and comparisons to these; there is no libc.
// `rep movsb`/`rep stosb` cannot be turned back into calls to themselves.

/// # Safety
/// The usual `memcpy` contract: `n` bytes valid at both, no overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes; DF is clear
    // (the ABI requires it on function entry).
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _,
            inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// The usual `memmove` contract: `n` bytes valid at both; overlap allowed.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst is below src or the ranges do not overlap: a forward copy is safe.
        // SAFETY: see memcpy; forward copy is correct for this overlap direction.
        unsafe { memcpy(dst, src, n) };
    } else {
        // dst overlaps the tail of src: copy backwards (DF=1), then restore DF=0.
        // SAFETY: n > 0 here (else the first branch ran); the last byte of each range is
        // valid per the caller's contract.
        unsafe {
            core::arch::asm!("std", "rep movsb", "cld",
                inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _, options(nostack));
        }
    }
    dst
}

/// # Safety
/// The usual `memset` contract: `n` bytes valid at `dst`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dst` is valid for `n` bytes; DF is clear.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// The usual `memcmp` contract: `n` bytes valid at both.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and both ranges are valid for n bytes. Volatile reads keep the
        // compiler from recognising this loop as a call to memcmp/bcmp.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Same contract as [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { memcmp(a, b, n) }
}
