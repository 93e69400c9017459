//! The workloads. The same code runs at CPL0 and CPL3; only `halt` differs (a direct
//! call at CPL0, `int 0x80` at CPL3). Port output works at CPL3 because IOPL=3.
//!
//! Loops stay short in instructions: at CPL0 every instruction is emulated.

use core::ptr::addr_of_mut;

use crate::abi::{self, workload, BootInfo, Mailbox, Results};
use crate::arch;
use crate::console::{self, Dec};

/// PORT_DONE status: the workload ran and found nothing wrong.
const STATUS_OK: u32 = 0;
/// PORT_DONE status: verify found mismatching words.
const STATUS_MISMATCH: u32 = 1;
/// PORT_DONE status: the workload could not run (unknown number, empty slice, ...).
const STATUS_BAD_REQUEST: u32 = 2;

/// TSC frequency assumed when the VMM does not know it.
const DEFAULT_TSC_KHZ: u64 = 1_000_000;

/// The pages one vCPU works on: every `stride`-th page of its part of the test area,
/// which may run from the low RAM region into the high one.
#[derive(Clone, Copy)]
struct Slice {
    /// Test-area page number of the slice's first page.
    first: u64,
    /// Pages worked on (one in `stride` of the slice's pages).
    pages: u64,
    /// Test-area pages from one worked-on page to the next.
    stride: u64,
}

impl Slice {
    /// vCPU `idx`'s slice of the first `total` test-area pages.
    fn of(idx: u64, bi: &BootInfo, total: u64) -> Slice {
        let nr = u64::from(bi.nr_vcpus.max(1));
        let (first, end) = if bi.shared != 0 {
            (0, total)
        } else {
            (idx * total / nr, (idx + 1) * total / nr)
        };
        let stride = bi.stride.max(1);
        Slice { first, pages: end.saturating_sub(first).div_ceil(stride), stride }
    }

    fn new(idx: u64, bi: &BootInfo) -> Slice {
        Slice::of(idx, bi, bi.test_pages())
    }

    /// GPA of worked-on page `p` (< `pages`).
    #[inline(always)]
    fn page(&self, bi: &BootInfo, p: u64) -> u64 {
        bi.test_page_gpa(self.first + p * self.stride)
    }

    /// Pages to work on: `pages` (0 = all) but at most the slice.
    fn count(&self, pages: u64) -> u64 {
        if pages == 0 { self.pages } else { pages.min(self.pages) }
    }
}

/// Visits `0..n` once each: sequentially, or with a stride coprime to `n` (a full
/// permutation that jumps far between neighbours, at one add and compare a step).
struct Order {
    cur: u64,
    stride: u64,
    n: u64,
}

impl Order {
    fn new(n: u64, random: bool, idx: u64) -> Order {
        if !random || n < 3 {
            return Order { cur: 0, stride: 1, n };
        }
        // Start near 0.625 n (far jumps), then the next value coprime to n.
        let mut stride = n / 2 + n / 8;
        while gcd(stride, n) != 1 {
            stride = stride % (n - 1) + 1;
        }
        let cur = idx.wrapping_mul(0x9e37_79b9_7f4a_7c15) % n;
        Order { cur, stride, n }
    }

    #[inline(always)]
    fn next(&mut self) -> u64 {
        let p = self.cur;
        self.cur += self.stride;
        if self.cur >= self.n {
            self.cur -= self.n;
        }
        p
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

/// Runs the workload named in the boot info, reports, and never returns.
/// `kernel` says whether this runs at CPL0.
pub fn run(idx: u64, info: *const BootInfo, kernel: bool) -> ! {
    // SAFETY: `info` was validated at boot and is identity-mapped and user-accessible.
    let bi = unsafe { info.read_volatile() };
    let slice = Slice::new(idx, &bi);
    let mut r = Results {
        magic: abi::RESULTS_MAGIC,
        vcpu: idx as u32,
        workload: bi.workload,
        mode: bi.mode,
        ..Results::default()
    };
    let mode: &[u8] = if kernel { b" kernel" } else { b" user" };
    let status = match bi.workload {
        workload::TOUCH => {
            let n = slice.count(bi.pages);
            start_line(idx, b"touch", mode, n, b" pages");
            touch(idx, &bi, slice, n, &mut r);
            STATUS_OK
        }
        workload::VERIFY => {
            let n = slice.count(bi.pages);
            start_line(idx, b"verify", mode, n, b" pages");
            verify(idx, &bi, kernel, slice, n, &mut r);
            if r.mismatches != 0 { STATUS_MISMATCH } else { STATUS_OK }
        }
        workload::SPIN => {
            start_line(idx, b"spin", mode, bi.ms, b" ms");
            spin(&bi, &mut r);
            STATUS_OK
        }
        workload::HALT => {
            start_line(idx, b"halt", mode, bi.ms, b" ms");
            halt(&bi, kernel, &mut r);
            STATUS_OK
        }
        workload::MAILBOX => {
            start_line(idx, b"mailbox", mode, 1, b" page");
            // The doorbell carries a 32-bit address: the low part of the test area only.
            let low = Slice::of(idx, &bi, bi.test_size / abi::PAGE_SIZE);
            mailbox(idx, &bi, low, &mut r)
        }
        workload::CRASH => {
            start_line(idx, b"crash", mode, u64::from(bi.crash_kind), b"");
            crash(bi.crash_kind);
            STATUS_BAD_REQUEST
        }
        _ => {
            console::vcpu_line(idx, &[b"unknown workload"]);
            STATUS_BAD_REQUEST
        }
    };
    finish(idx, &r, status)
}

fn start_line(idx: u64, name: &[u8], mode: &[u8], n: u64, unit: &[u8]) {
    console::vcpu_line(idx, &[name, mode, b", ", Dec::new(n).as_bytes(), unit]);
}

/// Prints the summary, hands the Results to the VMM, reports the status, stops.
fn finish(idx: u64, r: &Results, status: u32) -> ! {
    console::vcpu_line(idx, &[
        b"done, ", Dec::new(r.pages).as_bytes(), b" pages, ",
        Dec::new(r.mismatches).as_bytes(), b" bad, ",
        Dec::new(r.events).as_bytes(), b" events, ",
        Dec::new(r.tsc_cycles).as_bytes(), b" cycles",
    ]);
    let c = arch::cpu(idx);
    // SAFETY: `c` is this vCPU's PerCpu (user-accessible like all RAM); only this
    // vCPU writes its `results`.
    let gpa = unsafe {
        let p = addr_of_mut!((*c).results);
        p.write_volatile(*r);
        p as u64
    };
    arch::outl(abi::PORT_RESULT, gpa as u32);
    arch::outl(abi::PORT_DONE, status);
    arch::park()
}

fn touch(idx: u64, bi: &BootInfo, s: Slice, n: u64, r: &mut Results) {
    let mut order = Order::new(n, bi.random != 0, idx);
    let tag = (idx + 1) << 56;
    let t0 = arch::rdtsc();
    if bi.write != 0 {
        for _ in 0..n {
            let p = order.next();
            // SAFETY: p < n <= slice pages, so the word is inside this vCPU's part of
            // the test area, which is RAM, identity-mapped and writable at any CPL.
            unsafe { (s.page(bi, p) as *mut u64).write_volatile(tag | p) };
        }
    } else {
        for _ in 0..n {
            let p = order.next();
            // SAFETY: as above (read-only access).
            unsafe { (s.page(bi, p) as *const u64).read_volatile() };
        }
    }
    r.tsc_cycles = arch::rdtsc().wrapping_sub(t0);
    r.pages = n;
}

/// One pass over the slice: for every word, check `check`'s pattern (if any) and write
/// `write`'s (if any). Returns the words that did not hold the checked pattern.
fn verify_pass(idx: u64, bi: &BootInfo, s: Slice, n: u64, check: Option<u64>, write: Option<u64>) -> u64 {
    let words = u64::from(bi.words.clamp(1, 512));
    let mut bad = 0u64;
    let mut order = Order::new(n, bi.random != 0, idx);
    for _ in 0..n {
        let page = s.page(bi, order.next());
        for k in 0..words {
            let a = page + abi::verify_word_offset(k, words);
            if let Some(seed) = check {
                // SAFETY: `a` is an aligned word inside a page of this vCPU's slice.
                let v = unsafe { (a as *const u64).read_volatile() };
                bad += u64::from(v != abi::verify_pattern(a, seed));
            }
            if let Some(seed) = write {
                // SAFETY: as above.
                unsafe { (a as *mut u64).write_volatile(abi::verify_pattern(a, seed)) };
            }
        }
    }
    bad
}

/// verify: write, check, or (phase both) `rounds` rounds, each checking the previous
/// round's pattern while writing its own, for at least `seconds`; then a last check.
/// With `ms` (idle), the vCPU halts that long after the first write: memory is then
/// written but nothing touches it, which is how a migration of a quiet guest looks.
fn verify(idx: u64, bi: &BootInfo, kernel: bool, s: Slice, n: u64, r: &mut Results) {
    let t0 = arch::rdtsc();
    let seed = bi.seed;
    r.mismatches = match bi.verify_phase {
        abi::phase::WRITE => verify_pass(idx, bi, s, n, None, Some(seed)),
        abi::phase::CHECK => verify_pass(idx, bi, s, n, Some(seed), None),
        _ => {
            let khz = if bi.tsc_khz == 0 { DEFAULT_TSC_KHZ } else { bi.tsc_khz };
            let until = t0.saturating_add(u64::from(bi.seconds).saturating_mul(khz).saturating_mul(1000));
            let rounds = u64::from(bi.rounds.max(1));
            let mut bad = verify_pass(idx, bi, s, n, None, Some(seed));
            if bi.ms > 0 {
                if kernel { arch::halt(bi.ms) } else { arch::user_halt(bi.ms) };
            }
            let mut round = 1u64;
            while round < rounds || arch::rdtsc() < until {
                let prev = seed.wrapping_add(round - 1);
                bad += verify_pass(idx, bi, s, n, Some(prev), Some(seed.wrapping_add(round)));
                round += 1;
            }
            r.events = round;
            bad + verify_pass(idx, bi, s, n, Some(seed.wrapping_add(round - 1)), None)
        }
    };
    r.tsc_cycles = arch::rdtsc().wrapping_sub(t0);
    r.pages = n;
}

fn spin(bi: &BootInfo, r: &mut Results) {
    let khz = if bi.tsc_khz == 0 { DEFAULT_TSC_KHZ } else { bi.tsc_khz };
    let hb_ms = if bi.heartbeat_ms == 0 { 100 } else { bi.heartbeat_ms };
    let period = hb_ms.saturating_mul(khz);
    let t0 = arch::rdtsc();
    let end = if bi.ms == 0 { u64::MAX } else { t0.saturating_add(bi.ms.saturating_mul(khz)) };
    let mut next = t0.saturating_add(period);
    let mut beats = 0u64;
    loop {
        let now = arch::rdtsc();
        if now >= end {
            break;
        }
        if now >= next {
            beats += 1;
            arch::outl(abi::PORT_HEARTBEAT, beats as u32);
            next = next.saturating_add(period);
        }
    }
    r.events = beats;
    r.tsc_cycles = arch::rdtsc().wrapping_sub(t0);
}

fn halt(bi: &BootInfo, kernel: bool, r: &mut Results) {
    let times = if bi.count == 0 { 1 } else { bi.count };
    let t0 = arch::rdtsc();
    let mut wakes = 0;
    for _ in 0..times {
        wakes = if kernel { arch::halt(bi.ms) } else { arch::user_halt(bi.ms) };
    }
    r.events = wakes;
    r.tsc_cycles = arch::rdtsc().wrapping_sub(t0);
}

fn mailbox(idx: u64, bi: &BootInfo, s: Slice, r: &mut Results) -> u32 {
    if s.pages == 0 {
        console::vcpu_line(idx, &[b"mailbox: empty slice"]);
        return STATUS_BAD_REQUEST;
    }
    let t0 = arch::rdtsc();
    let base = s.page(bi, 0);
    let gpa = if bi.mailbox_fresh != 0 {
        // The last page of the slice, never touched by this guest.
        s.page(bi, s.pages - 1)
    } else {
        let mb = base as *mut Mailbox;
        let num = Dec::new(idx);
        let mut len = 0usize;
        // SAFETY: the first page of the slice is RAM owned by this vCPU and a Mailbox
        // (256 bytes) fits in it; writes go through raw pointers, indices are checked.
        unsafe {
            let text = addr_of_mut!((*mb).text).cast::<u8>();
            for &b in b"hello from vcpu ".iter().chain(num.as_bytes()) {
                if len < abi::MAILBOX_TEXT {
                    text.add(len).write_volatile(b);
                    len += 1;
                }
            }
            addr_of_mut!((*mb).vcpu).write_volatile(idx as u32);
            addr_of_mut!((*mb).len).write_volatile(len as u32);
        }
        base
    };
    arch::outl(abi::PORT_DOORBELL, gpa as u32);
    r.pages = 1;
    r.tsc_cycles = arch::rdtsc().wrapping_sub(t0);
    STATUS_OK
}

/// Raises the requested exception; returns only for an unknown kind.
fn crash(kind: u32) {
    match kind {
        abi::crash::UD => {
            // SAFETY: raising #UD on purpose; the handler reports it and stops.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
        }
        abi::crash::PF => {
            // SAFETY: 64 TiB is outside the identity map (PML4 entry 128 is never
            // present, whatever the RAM size): a #PF on purpose.
            unsafe { (0x4000_0000_0000u64 as *const u64).read_volatile() };
        }
        abi::crash::DE => {
            // SAFETY: divide by zero on purpose (#DE); asm so it is not folded away.
            unsafe {
                core::arch::asm!("div {0:e}", in(reg) 0u32, inout("eax") 1u32 => _,
                    inout("edx") 0u32 => _, options(nomem, nostack));
            }
        }
        _ => console::line(&[b"crash: unknown kind"]),
    }
}
