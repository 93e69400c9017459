//! x86-64 plumbing: per-vCPU GDT/TSS/IDT, interrupt and exception entry, LAPIC,
//! port I/O, the CPL3 switch and the kernel services.
//!
//! All per-vCPU state lives in one [`PerCpu`] per vCPU, GDT first: in a handler,
//! `sgdt` yields this vCPU's `PerCpu` without any shared state. (`sgdt` is only used
//! at CPL0, where it is emulated and returns the guest's own GDTR.)

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::ptr::{addr_of, addr_of_mut};

use crate::abi::{self, ExceptionRecord, Results};
use crate::console::{self, Dec, Hex};

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
pub const TSS_SEL: u16 = 0x28;

/// RFLAGS at CPL3: IOPL=3 (so `out` works), IF=0, bit 1 reserved-as-one.
const USER_RFLAGS: u64 = 0x3002;
/// Bytes of TSS I/O bitmap: ports 0..=0x537 (all ours) allowed, then the 0xff end byte.
/// Needed besides IOPL=3: on the PVM backend `iretq` to CPL3 drops IOPL to 0.
const IO_BITMAP: usize = 168;
const TSS_WORDS: usize = (104 + IO_BITMAP) / 4;
/// `#BP`: `int3` from CPL3 is a service call (see `user_halt`).
pub const SERVICE_TRAP_VECTOR: u8 = 3;
/// Size of the `#DF` stack (IST1).
const DF_STACK: usize = 4096;

// LAPIC register offsets.
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
/// Divide configuration 0b0011 = divide by 16: 1 GHz / 16 = 62.5 MHz, so 32 bits
/// hold about 68 s.
const TIMER_DIV_16: u32 = 0x3;
const TIMER_TICKS_PER_MS: u64 = 1_000_000 / 16;

/// Everything one vCPU owns. The GDT must stay first (see the module docs).
#[repr(C, align(4096))]
pub struct PerCpu {
    gdt: [u64; 8],
    /// Wake-up interrupts seen on `WAKE_VECTOR`.
    wakes: u64,
    idx: u64,
    /// The 104-byte 64-bit TSS as 32-bit words (its 64-bit fields are only 4-aligned),
    /// then the I/O permission bitmap.
    tss: [u32; TSS_WORDS],
    pub exception: ExceptionRecord,
    pub results: Results,
    idt: [u64; 512],
    df_stack: [u8; DF_STACK],
}

const _: () = assert!(core::mem::offset_of!(PerCpu, gdt) == 0);

/// Interior-mutable static storage; each vCPU only touches its own element.
#[repr(transparent)]
struct PerCpuArray(UnsafeCell<[PerCpu; abi::MAX_VCPUS]>);

// SAFETY: vCPU i only ever accesses element i (see `cpu`), so there is no sharing.
unsafe impl Sync for PerCpuArray {}

// In .bss, but nothing relies on it being zero: every field is written by its vCPU
// before it is read (a loader need not clear .bss; linux-loader does not).
static CPUS: PerCpuArray = PerCpuArray(UnsafeCell::new(
    // SAFETY: PerCpu is plain integers and arrays of them; all-zero is valid.
    unsafe { core::mem::zeroed() },
));

/// vCPU `idx`'s state; `idx` must be below `MAX_VCPUS` (checked at boot).
pub fn cpu(idx: u64) -> *mut PerCpu {
    let i = (idx as usize) % abi::MAX_VCPUS;
    // SAFETY: i < MAX_VCPUS, so the offset stays inside the array.
    unsafe { CPUS.0.get().cast::<PerCpu>().add(i) }
}

/// This vCPU's state, from GDTR (CPL0 only).
fn this_cpu() -> *mut PerCpu {
    let mut gdtr = [0u16; 5];
    // SAFETY: sgdt stores 10 bytes into the local buffer; nothing else is touched.
    unsafe { asm!("sgdt [{}]", in(reg) gdtr.as_mut_ptr(), options(nostack, preserves_flags)) };
    let base = u64::from(gdtr[1]) | u64::from(gdtr[2]) << 16 | u64::from(gdtr[3]) << 32
        | u64::from(gdtr[4]) << 48;
    base as *mut PerCpu
}

// ---- port I/O and small instructions ------------------------------------------

/// `out dx, al`.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port output has no memory effects; the TSS I/O bitmap permits it at CPL3.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) };
}

/// `out dx, eax` (all VMM ports are 32-bit).
pub fn outl(port: u16, v: u32) {
    // SAFETY: as outb. Not `nomem`: the VMM may read guest memory named by `v`, so
    // earlier stores must be done before the `out`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack, preserves_flags)) };
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the TSC (CR4.TSD is clear, so CPL3 may use it too).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    u64::from(hi) << 32 | u64::from(lo)
}

/// Ends the whole VM with `code` (PORT_EXIT), never returns.
pub fn exit(code: u32) -> ! {
    outl(abi::PORT_EXIT, code);
    park()
}

/// Spins forever; used after the VMM has been told we are done.
pub fn park() -> ! {
    loop {
        // SAFETY: pause has no effects besides a delay.
        unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) };
    }
}

/// `cli; hlt` forever (CPL0 only).
fn stop() -> ! {
    loop {
        // SAFETY: CPL0; stopping this vCPU for good is the intent.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: LAPIC_GPA is the xAPIC MMIO page (identity-mapped); `reg` is one of the
    // register offsets above, all 16-byte aligned. CPL0 only by convention.
    unsafe { ((abi::LAPIC_GPA + reg) as *mut u32).write_volatile(v) };
}

// ---- descriptor tables --------------------------------------------------------

// Flat descriptors with the accessed bit preset, so loading them writes nothing.
/// 64-bit code (L=1), DPL0.
const KERNEL_CODE_DESC: u64 = 0x00af_9b00_0000_ffff;
/// Writable data, DPL0, 4 GiB.
const KERNEL_DATA_DESC: u64 = 0x00cf_9300_0000_ffff;
/// Writable data, DPL3, 4 GiB.
const USER_DATA_DESC: u64 = 0x00cf_f300_0000_ffff;
/// 64-bit code (L=1), DPL3.
const USER_CODE_DESC: u64 = 0x00af_fb00_0000_ffff;

/// An interrupt gate (IF cleared on entry) to `handler` on kernel CS.
fn gate(handler: u64, dpl: u64, ist: u64) -> (u64, u64) {
    let lo = (handler & 0xffff)
        | u64::from(KERNEL_CS) << 16
        | ist << 32
        | (0x8e | dpl << 5) << 40
        | (handler >> 16 & 0xffff) << 48;
    (lo, handler >> 32)
}

fn set_gate(c: *mut PerCpu, vector: usize, handler: u64, dpl: u64, ist: u64) {
    let (lo, hi) = gate(handler, dpl, ist);
    // SAFETY: `c` is this vCPU's PerCpu; vector < 256 so 2*vector+1 < 512.
    unsafe {
        let idt = addr_of_mut!((*c).idt).cast::<u64>();
        idt.add(2 * (vector & 0xff)).write(lo);
        idt.add(2 * (vector & 0xff) + 1).write(hi);
    }
}

extern "C" {
    /// First of the 32 exception stubs, each `EXC_STUB_SIZE` bytes (see global_asm).
    static exc_stubs: u8;
    static wake_stub: u8;
    static service_stub: u8;
    static bp_stub: u8;
    static db_stub: u8;
    static user_entry: u8;
}
const EXC_STUB_SIZE: u64 = 16;

/// Sets up this vCPU's GDT, TSS, IDT and LAPIC, and loads them.
pub fn init(idx: u64) {
    let c = cpu(idx);
    // SAFETY: `c` is vCPU idx's own PerCpu; no other vCPU touches it. The tables are
    // fully written before lgdt/ltr/lidt make the CPU use them.
    unsafe {
        let tss = addr_of!((*c).tss) as u64;
        (*c).gdt = [
            0,
            KERNEL_CODE_DESC,
            KERNEL_DATA_DESC,
            USER_DATA_DESC,
            USER_CODE_DESC,
            // 64-bit available TSS (type 9), present, limit covering the I/O bitmap.
            (TSS_WORDS as u64 * 4 - 1)
                | (tss & 0xff_ffff) << 16
                | 0x89 << 40
                | (tss >> 24 & 0xff) << 56,
            tss >> 32,
            0,
        ];
        (*c).wakes = 0;
        (*c).idx = idx;

        let rsp0 = abi::kernel_stack_top(idx);
        let ist1 = addr_of!((*c).df_stack) as u64 + DF_STACK as u64;
        let mut t = [0u32; TSS_WORDS];
        t[1] = rsp0 as u32;
        t[2] = (rsp0 >> 32) as u32;
        t[9] = ist1 as u32;
        t[10] = (ist1 >> 32) as u32;
        t[25] = 104 << 16; // I/O bitmap right after the TSS
        t[TSS_WORDS - 1] = 0xff00_0000;
        (*c).tss = t;

        // One `rep stosq` instead of 512 emulated stores.
        let idt = addr_of_mut!((*c).idt).cast::<u64>();
        asm!("rep stosq", inout("rcx") 512u64 => _, inout("rdi") idt => _, in("rax") 0u64,
            options(nostack, preserves_flags));
        let stubs = addr_of!(exc_stubs) as u64;
        for v in 0..32u64 {
            let ist = if v == 8 { 1 } else { 0 };
            set_gate(c, v as usize, stubs + v * EXC_STUB_SIZE, 0, ist);
        }
        set_gate(c, usize::from(abi::WAKE_VECTOR), addr_of!(wake_stub) as u64, 0, 0);
        // Services: `int 0x80` (hardware KVM) and `int3` (works on PVM too, see
        // `user_halt`), both DPL3. `bp_stub` tells the service `int3` from a
        // debugger's; #DB from CPL3 is offered to the debugger too (see `debug_entry`).
        let service = addr_of!(service_stub) as u64;
        set_gate(c, usize::from(abi::SERVICE_VECTOR), service, 3, 0);
        set_gate(c, usize::from(SERVICE_TRAP_VECTOR), addr_of!(bp_stub) as u64, 3, 0);
        set_gate(c, 1, addr_of!(db_stub) as u64, 0, 0);

        let gdtr = DescPtr { limit: 8 * 8 - 1, base: addr_of!((*c).gdt) as u64 };
        let idtr = DescPtr { limit: 256 * 16 - 1, base: idt as u64 };
        asm!(
            "lgdt [{gdtr}]",
            // Far return to reload CS from the new GDT.
            "push {kcs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, {kds}",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "mov ss, {tmp:e}",
            "mov fs, {tmp:e}",
            "mov gs, {tmp:e}",
            "mov {tmp:e}, {tss}",
            "ltr {tmp:x}",
            "lidt [{idtr}]",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            kcs = const KERNEL_CS as u64,
            kds = const KERNEL_DS as u32,
            tss = const TSS_SEL as u32,
            tmp = out(reg) _,
        );
    }
    // Software-enable the LAPIC, spurious vector 0xff.
    lapic_write(LAPIC_SVR, 0x1ff);
}

#[repr(C, packed)]
struct DescPtr {
    limit: u16,
    base: u64,
}

/// Loads an empty IDT and raises an exception: #UD cannot be delivered, nor the #GP
/// nor #DF that follow, so the CPU shuts down (KVM_EXIT_SHUTDOWN). `ud2`, not `int3`:
/// KVM's emulator cannot run `int n`/`int3` in long mode (KVM_EXIT_INTERNAL_ERROR).
pub fn triple_fault() -> ! {
    let idtr = DescPtr { limit: 0, base: 0 };
    // SAFETY: CPL0; ending the VM with a triple fault is the intent.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &idtr, options(nostack)) };
    stop()
}

/// Drops to CPL3 at `user_entry` with RDI = idx, RSI = boot (see [`crate::user_main`]).
pub fn enter_user(idx: u64, boot: u64) -> ! {
    // SAFETY: the user selectors exist in this vCPU's GDT; the user stack belongs to
    // this vCPU; user_entry is code mapped user-accessible (all of RAM is U/S=1).
    unsafe {
        asm!(
            "mov ds, {uds:e}",
            "mov es, {uds:e}",
            "push {uds}",
            "push {ursp}",
            "push {rflags}",
            "push {ucs}",
            "push {entry}",
            "iretq",
            uds = in(reg) u64::from(USER_DS),
            ursp = in(reg) abi::user_stack_top(idx),
            rflags = in(reg) USER_RFLAGS,
            ucs = in(reg) u64::from(USER_CS),
            entry = in(reg) addr_of!(user_entry) as u64,
            in("rdi") idx,
            in("rsi") boot,
            options(noreturn),
        )
    }
}

// ---- interrupt and exception entry ---------------------------------------------

// Exception stubs: push a 0 error code where the CPU pushes none, push the vector,
// and go to the common path. Wake and service stubs save the caller-saved registers
// (no SSE state exists in this guest) and align the stack for the Rust handler.
global_asm!(
    ".pushsection .text.isr, \"ax\"",
    ".macro EXC v, err",
    ".balign 16",
    ".if \\err == 0",
    "push 0",
    ".endif",
    "push \\v",
    "jmp exc_common",
    ".endm",
    ".balign 16",
    ".global exc_stubs",
    "exc_stubs:",
    "EXC 0,0", "EXC 1,0", "EXC 2,0", "EXC 3,0", "EXC 4,0", "EXC 5,0", "EXC 6,0", "EXC 7,0",
    "EXC 8,1", "EXC 9,0", "EXC 10,1", "EXC 11,1", "EXC 12,1", "EXC 13,1", "EXC 14,1",
    "EXC 15,0", "EXC 16,0", "EXC 17,1", "EXC 18,0", "EXC 19,0", "EXC 20,0", "EXC 21,1",
    "EXC 22,0", "EXC 23,0", "EXC 24,0", "EXC 25,0", "EXC 26,0", "EXC 27,0", "EXC 28,0",
    "EXC 29,1", "EXC 30,1", "EXC 31,0",
    ".balign 16",
    "exc_common:",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {exception}",
    "ud2",

    ".macro SAVE",
    "push rax", "push rcx", "push rdx", "push rsi", "push rdi",
    "push r8", "push r9", "push r10", "push r11", "push rbp",
    "mov rbp, rsp",
    "and rsp, -16",
    ".endm",
    ".macro RESTORE",
    "mov rsp, rbp",
    "pop rbp", "pop r11", "pop r10", "pop r9", "pop r8",
    "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rax",
    ".endm",

    ".global wake_stub",
    "wake_stub:",
    "SAVE",
    "call {wake}",
    "RESTORE",
    "iretq",

    // Service: RAX = number, RDI = argument; the result replaces the saved RAX.
    ".global service_stub",
    "service_stub:",
    "SAVE",
    "mov rsi, rdi",
    "mov rdi, rax",
    "call {service}",
    "mov [rbp + 72], rax",
    "RESTORE",
    "iretq",

    // #BP: the service `int3` (its trap returns to `user_service_ret`) goes to the
    // service dispatcher; any other is a breakpoint, offered to the debugger.
    ".global bp_stub",
    "bp_stub:",
    "push rax",
    "lea rax, [rip + user_service_ret]",
    "cmp rax, [rsp + 8]",
    "pop rax",
    "je service_stub",
    "push 3",
    "jmp debug_common",
    ".global db_stub",
    "db_stub:",
    "push 1",
    "jmp debug_common",
    // An abi::DebugFrame: vector (pushed by the stub), every general register, and
    // the verdict slot at the lowest address. `debug_entry` returns only when the
    // debugger took the trap; then CPL3 resumes from the frame as it was left.
    "debug_common:",
    "push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14",
    "push r15",
    "push 0",
    "mov rdi, rsp",
    "mov rbp, rsp",
    "and rsp, -16",
    "call {debug}",
    "lea rsp, [rbp + 8]",
    "pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9",
    "pop r8", "pop rbp", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rbx",
    "pop rax",
    "add rsp, 8",
    "iretq",

    // The one service `int3` of CPL3 code (see `user_halt`).
    ".global user_service",
    "user_service:",
    "int3",
    "user_service_ret:",
    "ret",

    // CPL3 entry: a call gives user_main the stack alignment of a normal call.
    // The outermost frame: no return address above it (debuggers stop unwinding here
    // instead of reading past the stack's top).
    ".global user_entry",
    "user_entry:",
    ".cfi_sections .debug_frame",
    ".cfi_startproc",
    ".cfi_undefined rip",
    "call {user_main}",
    "ud2",
    ".cfi_endproc",
    ".popsection",
    exception = sym exception_entry,
    wake = sym wake_entry,
    service = sym service_entry,
    debug = sym debug_entry,
    user_main = sym crate::user_main,
);

/// Frame built by the exception stubs: vector, error code, then the CPU's frame.
#[repr(C)]
struct ExcFrame {
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Reports an exception to the VMM (PORT_EXCEPTION) and stops this vCPU.
extern "C" fn exception_entry(frame: *const ExcFrame) -> ! {
    // SAFETY: `frame` points at the stub-built frame on this stack.
    let f = unsafe { &*frame };
    report_exception(f.vector, f.error_code, f.rip, f.cs)
}

/// Tells the VMM about an exception (PORT_EXCEPTION) and stops this vCPU.
fn report_exception(vector: u64, error_code: u64, rip: u64, cs: u64) -> ! {
    let c = this_cpu();
    let cr2: u64;
    // SAFETY: CPL0 (we are in an exception handler); reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    // SAFETY: `c` is this vCPU's PerCpu (from GDTR), which nothing else writes now.
    let rec = unsafe {
        let rec = ExceptionRecord { vector, error_code, rip, cr2, cs, vcpu: (*c).idx };
        addr_of_mut!((*c).exception).write_volatile(rec);
        rec
    };
    console::vcpu_line(rec.vcpu, &[
        b"exception ", Dec::new(rec.vector).as_bytes(),
        b" rip ", Hex::new(rec.rip).as_bytes(),
        b" cr2 ", Hex::new(rec.cr2).as_bytes(),
    ]);
    // SAFETY: `c` is valid (see above); the record is below 4 GiB, so its GPA fits.
    let gpa = unsafe { addr_of!((*c).exception) } as u64;
    outl(abi::PORT_EXCEPTION, gpa as u32);
    stop()
}

/// A #BP (not the service's) or #DB: one taken at CPL3 is offered to the VMM's
/// debugger (PORT_DEBUG), which this host's KVM does not intercept there. Returns
/// only if the debugger took it; otherwise it is reported as an exception, as any.
extern "C" fn debug_entry(frame: *mut abi::DebugFrame) {
    // SAFETY: `frame` points at the frame `debug_common` built on this stack; the
    // VMM writes its verdict during the `out`, so it is read back volatile.
    unsafe {
        if (*frame).cs & 3 == 3 {
            // The kernel stack is below 4 GiB, so the frame's GPA fits.
            outl(abi::PORT_DEBUG, frame as u64 as u32);
            if addr_of!((*frame).verdict).read_volatile() == abi::DEBUG_RESUME {
                return;
            }
        }
        let f = &*frame;
        report_exception(f.vector, 0, f.rip, f.cs)
    }
}

/// WAKE_VECTOR: count the wake-up and acknowledge it.
extern "C" fn wake_entry() {
    let c = this_cpu();
    // SAFETY: `c` is this vCPU's PerCpu; only this vCPU writes `wakes`.
    unsafe {
        let w = addr_of_mut!((*c).wakes);
        w.write_volatile(w.read_volatile().wrapping_add(1));
    }
    lapic_write(LAPIC_EOI, 0);
}

/// SERVICE_VECTOR dispatcher. Returns the value for RAX (`u64::MAX` = unknown).
extern "C" fn service_entry(nr: u64, arg: u64) -> u64 {
    match nr {
        abi::service::HALT => halt(arg),
        _ => u64::MAX,
    }
}

/// Halts until a wake-up interrupt arrives, arming the LAPIC timer for `ms` first if
/// it is non-zero. Returns the number of wake-ups seen so far. CPL0, IF=0 on entry.
pub fn halt(ms: u64) -> u64 {
    let c = this_cpu();
    // SAFETY: `c` is this vCPU's PerCpu; the wake handler (same vCPU) writes `wakes`.
    let wakes = unsafe { addr_of!((*c).wakes) };
    // SAFETY: as above.
    let before = unsafe { wakes.read_volatile() };
    if ms != 0 {
        let ticks = ms.saturating_mul(TIMER_TICKS_PER_MS).min(u64::from(u32::MAX));
        lapic_write(LAPIC_TIMER_DIV, TIMER_DIV_16);
        lapic_write(LAPIC_LVT_TIMER, u32::from(abi::WAKE_VECTOR)); // one-shot, unmasked
        lapic_write(LAPIC_TIMER_INIT, ticks as u32);
    }
    // Check with IF=0, then `sti; hlt`: the STI shadow makes the pair atomic, so a
    // wake-up that arrived before the check is counted and one after it ends the hlt.
    // SAFETY: as above.
    while unsafe { wakes.read_volatile() } == before {
        // SAFETY: CPL0; the IDT has the wake gate; interrupts are off again afterwards.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
    // SAFETY: as above.
    unsafe { wakes.read_volatile() }
}

/// Asks the kernel to halt (see [`halt`]) from CPL3.
///
/// Uses `int3`, not `int SERVICE_VECTOR`: on the PVM backend `int n` at CPL3 raises
/// #UD, and `syscall` reaches LSTAR still at CPL3; exceptions such as #BP are the
/// transitions it delivers through the IDT. `int3` is a trap, so the service returns
/// to the next instruction, exactly like `int 0x80`.
pub fn user_halt(ms: u64) -> u64 {
    let ret: u64;
    // SAFETY: `user_service`'s int3 goes through the DPL3 interrupt gate of vector 3
    // to `service_stub`, which saves every register it clobbers except RAX (the
    // result); the call and its `ret` use only the stack.
    unsafe {
        asm!("call user_service", inlateout("rax") abi::service::HALT => ret, in("rdi") ms)
    };
    ret
}
