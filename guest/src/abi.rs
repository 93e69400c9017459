//! The contract between the ufvmm VMM and its built-in guest.
//!
//! This file is compiled twice: into the `no_std` guest (by `vmm/build.rs`) and into
//! the VMM (as `ufvmm::abi`). It must stay dependency-free and `no_std`-clean.
//!
//! Guest-physical layout (the guest runs identity-mapped, so a guest virtual
//! address equals its guest-physical address). RAM is at most two regions, as QEMU and
//! Firecracker lay it out: `min(mem, LOW_RAM_MAX)` bytes at GPA 0, and the rest (RAM
//! above 3 GiB) at `HIGH_RAM_GPA`, so that no RAM lies in the 32-bit MMIO hole (LAPIC).
//!
//! | GPA                   | what                                                   |
//! |-----------------------|--------------------------------------------------------|
//! | `0x0000_0000`         | unused (null page)                                     |
//! | `BOOT_INFO_GPA`       | [`BootInfo`], written by the VMM                       |
//! | `PML4_GPA..`          | boot page tables: PML4, PDPT, 4 PDs (2 MiB pages for 0..4 GiB), then `PDPT_HIGH_GPA` (PDPTs above 512 GiB) |
//! | `STACKS_GPA..`        | per-vCPU kernel and user stacks                        |
//! | `KERNEL_LOAD_GPA..`   | the guest ELF (code, data, bss) must fit below `TEST_AREA_GPA` |
//! | `TEST_AREA_GPA..`     | with RAM above 3 GiB: its page directories, one per GiB above 4 GiB |
//! | `BootInfo::test_base..low end` | the test area the workloads touch, low part   |
//! | `HIGH_RAM_GPA..`      | RAM above 3 GiB: the rest of the test area             |

#![allow(dead_code)]

/// Guest page size used everywhere.
pub const PAGE_SIZE: u64 = 4096;
/// Where the VMM writes [`BootInfo`].
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// PML4 of the boot page tables (PDPT follows, then four page directories).
pub const PML4_GPA: u64 = 0x2000;
/// PDPT of the boot page tables.
pub const PDPT_GPA: u64 = 0x3000;
/// First of the four page directories (2 MiB pages, identity map of 0..4 GiB).
pub const PD_GPA: u64 = 0x4000;
/// Number of page directories at `PD_GPA`: 4 x 1 GiB. RAM above 4 GiB has its page
/// directories at `TEST_AREA_GPA`, one per GiB, and the test area starts after them.
pub const PD_COUNT: u64 = 4;
/// PDPTs for PML4 entries 1 and 2 (512 GiB..1.5 TiB), used only when RAM reaches there.
pub const PDPT_HIGH_GPA: u64 = 0x8000;
/// Number of PDPTs at [`PDPT_HIGH_GPA`].
pub const PDPT_HIGH_COUNT: u64 = 2;
/// Most bytes of RAM at GPA 0; RAM beyond it starts at [`HIGH_RAM_GPA`].
pub const LOW_RAM_MAX: u64 = 3 << 30;
/// Where RAM above [`LOW_RAM_MAX`] bytes lies: above the 32-bit MMIO hole.
pub const HIGH_RAM_GPA: u64 = 1 << 32;
/// Base of the per-vCPU stacks.
pub const STACKS_GPA: u64 = 0x1_0000;
/// Bytes of stack per vCPU: the kernel stack, then the user stack. `MAX_VCPUS` of them
/// must end below `KERNEL_LOAD_GPA`; the guest's deepest frame is well under 1 KiB.
pub const VCPU_STACKS_SIZE: u64 = 0x3800;
/// Bytes of each of the two stacks.
pub const STACK_SIZE: u64 = 0x1c00;
/// Lowest address an ELF segment may occupy.
pub const KERNEL_LOAD_GPA: u64 = 0x10_0000;
/// Start of the test area; ELF segments must end below it.
pub const TEST_AREA_GPA: u64 = 0x40_0000;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: usize = 64;

const _: () = assert!(STACKS_GPA + MAX_VCPUS as u64 * VCPU_STACKS_SIZE <= KERNEL_LOAD_GPA);
/// Interrupt vector the VMM (or the guest's LAPIC timer) uses to wake a halted vCPU.
pub const WAKE_VECTOR: u8 = 0x40;
/// Software interrupt a CPL3 workload uses to ask its kernel for a service.
pub const SERVICE_VECTOR: u8 = 0x80;
/// Guest-physical base of the local APIC (xAPIC MMIO).
pub const LAPIC_GPA: u64 = 0xfee0_0000;

/// Top of vCPU `idx`'s kernel stack (16-byte aligned).
pub const fn kernel_stack_top(idx: u64) -> u64 {
    STACKS_GPA + idx * VCPU_STACKS_SIZE + STACK_SIZE
}

/// Where vCPU `idx`'s #BP/#DB entry builds its [`DebugFrame`] for a trap from CPL3:
/// right below the CPU's frame at the top of its kernel stack (`TSS.RSP0`).
pub const fn debug_frame_gpa(idx: u64) -> u64 {
    kernel_stack_top(idx) - core::mem::size_of::<DebugFrame>() as u64
}

/// Top of vCPU `idx`'s user stack (16-byte aligned).
pub const fn user_stack_top(idx: u64) -> u64 {
    STACKS_GPA + idx * VCPU_STACKS_SIZE + VCPU_STACKS_SIZE
}

// ---- I/O ports ------------------------------------------------------------------

/// Serial console: one byte per `out`; the VMM prints whole lines.
pub const PORT_SERIAL: u16 = 0x3f8;
/// `out32`: this vCPU finished its workload with the given status (0 = success).
pub const PORT_DONE: u16 = 0x500;
/// `out32`: end the whole VM now with the given exit code (like QEMU's isa-debug-exit).
pub const PORT_EXIT: u16 = 0x501;
/// `out32`: GPA of a [`Results`] record the VMM should read.
pub const PORT_RESULT: u16 = 0x502;
/// `out32`: a heartbeat with a running counter.
pub const PORT_HEARTBEAT: u16 = 0x503;
/// `out32`: GPA of a [`Mailbox`] the VMM should read out of guest memory and print.
pub const PORT_DOORBELL: u16 = 0x504;
/// `out32`: GPA of an [`ExceptionRecord`]; the guest stops after this.
pub const PORT_EXCEPTION: u16 = 0x505;
/// `out32`: GPA of a [`DebugFrame`]: a #BP or #DB the guest took at CPL3, offered to
/// the VMM's debugger (this host's KVM intercepts neither at CPL3). The VMM sets
/// `verdict` to [`DEBUG_RESUME`] when its debugger takes the trap; the guest then
/// returns to CPL3 from the frame as the VMM left it. Otherwise the trap stays a guest
/// exception.
pub const PORT_DEBUG: u16 = 0x506;
/// [`DebugFrame::verdict`]: the debugger took the trap; resume from the frame.
pub const DEBUG_RESUME: u64 = 1;

// ---- boot info ------------------------------------------------------------------

/// `BootInfo::magic`.
pub const BOOT_MAGIC: u64 = 0x5546_564d_4d42_4f4f; // "UFVMMBOO"
/// `BootInfo::version`.
pub const BOOT_VERSION: u32 = 3;

/// Workload numbers (`BootInfo::workload`).
pub mod workload {
    /// Touch pages of the test area.
    pub const TOUCH: u32 = 1;
    /// Write a pattern, read it back, count mismatches.
    pub const VERIFY: u32 = 2;
    /// Busy loop with heartbeats.
    pub const SPIN: u32 = 3;
    /// Sleep in HLT until woken.
    pub const HALT: u32 = 4;
    /// Ring the doorbell so the VMM reads a message from guest memory.
    pub const MAILBOX: u32 = 5;
    /// Raise an exception on purpose (tests the exception path).
    pub const CRASH: u32 = 6;
}

/// Values of `BootInfo::mode`.
pub mod mode {
    /// Run the workload at CPL3.
    pub const USER: u32 = 0;
    /// Run the workload at CPL0.
    pub const KERNEL: u32 = 1;
}

/// Values of `BootInfo::verify_phase`.
pub mod phase {
    /// Write the pattern, then check it.
    pub const BOTH: u32 = 0;
    /// Only write the pattern.
    pub const WRITE: u32 = 1;
    /// Only check a pattern written earlier (e.g. by a run whose memory was dumped).
    pub const CHECK: u32 = 2;
}

/// Values of `BootInfo::crash_kind`.
pub mod crash {
    /// `ud2`: invalid opcode (#UD, vector 6).
    pub const UD: u32 = 0;
    /// Read an unmapped address (#PF, vector 14).
    pub const PF: u32 = 1;
    /// Divide by zero (#DE, vector 0).
    pub const DE: u32 = 2;
    /// Load an empty IDT and raise an exception: a triple fault.
    pub const TRIPLE: u32 = 3;
}

/// Everything the guest needs to know, written by the VMM at [`BOOT_INFO_GPA`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// Number of vCPUs.
    pub nr_vcpus: u32,
    /// Bytes of guest RAM, both regions.
    pub mem_size: u64,
    /// First byte of the test area.
    pub test_base: u64,
    /// Bytes in the test area's low part (`test_base..`, below 3 GiB).
    pub test_size: u64,
    /// First byte of the test area's high part ([`HIGH_RAM_GPA`]).
    pub high_base: u64,
    /// Bytes in the test area's high part (RAM above 3 GiB; 0 for none).
    pub high_size: u64,
    /// TSC frequency in kHz (0 if unknown).
    pub tsc_khz: u64,
    /// One of [`workload`].
    pub workload: u32,
    /// One of [`mode`].
    pub mode: u32,
    /// touch/verify: pages per vCPU (0 = the vCPU's whole slice).
    pub pages: u64,
    /// touch/verify: 1 = pseudo-random order, 0 = sequential.
    pub random: u32,
    /// touch: 1 = write, 0 = read.
    pub write: u32,
    /// touch/verify: 1 = every vCPU uses the same pages, 0 = each its own slice.
    pub shared: u32,
    /// verify: one of [`phase`].
    pub verify_phase: u32,
    /// verify: seed of the pattern.
    pub seed: u64,
    /// verify: 64-bit words checked per page (1..=512).
    pub words: u32,
    /// mailbox: 1 = point the doorbell at a page the guest never touched.
    pub mailbox_fresh: u32,
    /// spin: run time in ms (0 = forever); halt: LAPIC-timer wake-up after this many ms
    /// (0 = wait for the VMM's wake-up interrupt); verify (phase both): halt this long
    /// after the first write pass (0 = not at all).
    pub ms: u64,
    /// spin: ms between heartbeats.
    pub heartbeat_ms: u64,
    /// halt: how many times to halt and be woken.
    pub count: u32,
    /// crash: one of [`crash`].
    pub crash_kind: u32,
    /// verify (phase both): rounds to run; each round checks the previous round's
    /// pattern and writes its own (seed + round). At least 1.
    pub rounds: u32,
    /// verify (phase both): keep going for at least this many seconds (0 = just
    /// `rounds`).
    pub seconds: u32,
    /// Padding (0).
    pub reserved: u32,
    /// touch/verify: work on one page in this many of the slice (0 or 1 = every page;
    /// 512 = one page per 2 MiB), so a test can cover a large RAM in seconds.
    pub stride: u64,
}

impl BootInfo {
    /// Pages in the test area, both parts.
    pub const fn test_pages(&self) -> u64 {
        (self.test_size + self.high_size) / PAGE_SIZE
    }

    /// GPA of page `p` of the test area: the low part first, then the high part.
    #[inline(always)]
    pub const fn test_page_gpa(&self, p: u64) -> u64 {
        let low = self.test_size / PAGE_SIZE;
        if p < low {
            self.test_base + p * PAGE_SIZE
        } else {
            self.high_base + (p - low) * PAGE_SIZE
        }
    }
}

/// verify: the value the word at guest-physical `addr` holds for `seed`
/// (splitmix64 of `addr ^ seed`), so the VMM can prepare or check images too.
#[inline]
pub const fn verify_pattern(addr: u64, seed: u64) -> u64 {
    let mut z = (addr ^ seed).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// verify: byte offset in its page of checked word `k` (`k < words`, `words` already
/// clamped to 1..=512): word `k * 512 / words`, spread evenly and 8-byte aligned.
#[inline]
pub const fn verify_word_offset(k: u64, words: u64) -> u64 {
    k * 512 / words * 8
}

/// `Results::magic`.
pub const RESULTS_MAGIC: u32 = 0x5253_4c54; // "RSLT"

/// Figures a vCPU reports at the end of its workload (via [`PORT_RESULT`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Results {
    /// [`RESULTS_MAGIC`].
    pub magic: u32,
    /// The reporting vCPU.
    pub vcpu: u32,
    /// The workload that ran.
    pub workload: u32,
    /// The mode it ran in.
    pub mode: u32,
    /// Pages touched (touch, verify).
    pub pages: u64,
    /// Words that did not hold the expected pattern (verify).
    pub mismatches: u64,
    /// TSC cycles the workload took.
    pub tsc_cycles: u64,
    /// Heartbeats sent (spin) or wake-ups seen (halt).
    pub events: u64,
}

/// A message the guest asks the VMM to print (via [`PORT_DOORBELL`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Mailbox {
    /// Bytes of `text` that are used; more than `MAILBOX_TEXT` is refused by the VMM.
    pub len: u32,
    /// The sending vCPU.
    pub vcpu: u32,
    /// The message.
    pub text: [u8; MAILBOX_TEXT],
}

/// Capacity of [`Mailbox::text`].
pub const MAILBOX_TEXT: usize = 248;
/// Bytes in a [`Mailbox`] header (before `text`).
pub const MAILBOX_HEADER: usize = 8;

/// What the guest's exception handler reports (via [`PORT_EXCEPTION`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionRecord {
    /// Exception vector (0..=31).
    pub vector: u64,
    /// Error code (0 when the exception has none).
    pub error_code: u64,
    /// RIP of the faulting instruction.
    pub rip: u64,
    /// CR2 (the faulting address for #PF).
    pub cr2: u64,
    /// CS at the time of the exception (its low two bits are the CPL).
    pub cs: u64,
    /// The vCPU.
    pub vcpu: u64,
}

/// A CPL3 trap's registers, as the guest's #BP/#DB entry saves them on its kernel
/// stack (lowest address first), offered via [`PORT_DEBUG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugFrame {
    /// 0 from the guest; [`DEBUG_RESUME`] if the VMM's debugger took the trap.
    pub verdict: u64,
    /// General registers at the trap, r15 first (the last pushed).
    pub r15: u64,
    /// R14 at the trap.
    pub r14: u64,
    /// R13 at the trap.
    pub r13: u64,
    /// R12 at the trap.
    pub r12: u64,
    /// R11 at the trap.
    pub r11: u64,
    /// R10 at the trap.
    pub r10: u64,
    /// R9 at the trap.
    pub r9: u64,
    /// R8 at the trap.
    pub r8: u64,
    /// RBP at the trap.
    pub rbp: u64,
    /// RDI at the trap.
    pub rdi: u64,
    /// RSI at the trap.
    pub rsi: u64,
    /// RDX at the trap.
    pub rdx: u64,
    /// RCX at the trap.
    pub rcx: u64,
    /// RBX at the trap.
    pub rbx: u64,
    /// RAX at the trap.
    pub rax: u64,
    /// 1 (#DB) or 3 (#BP).
    pub vector: u64,
    /// The CPU's frame: where CPL3 resumes (after the `int3`, for #BP).
    pub rip: u64,
    /// CPL3 code segment.
    pub cs: u64,
    /// RFLAGS (TF set by a single step).
    pub rflags: u64,
    /// CPL3 stack pointer.
    pub rsp: u64,
    /// CPL3 stack segment.
    pub ss: u64,
}

/// Services a CPL3 workload asks of its kernel with `int SERVICE_VECTOR`, number in RAX.
/// (The built-in guest uses `int3` instead, through a DPL3 gate on vector 3 to the same
/// dispatcher: on the PVM backend `int n` at CPL3 raises #UD. Result in RAX.)
pub mod service {
    /// Halt until the next wake-up interrupt (RDI = ms for the LAPIC timer, 0 = none).
    pub const HALT: u64 = 1;
}
