//! A vCPU's page wait in user space: what a poisoned page (rule 7) does to `KVM_RUN`,
//! and how the vCPU thread waits for the page and completes the access.
//!
//! The fault loop poisons a page that a vCPU waits for and that cannot be installed at
//! once ([`crate::fault::handler`]). Every path out of the kernel ends here, measured in
//! NOTES.md (`repro/poison_paths/`):
//! - guest access through GUP (CPL3 here): `SIGBUS` (`BUS_MCEERR_AR`, the page's host
//!   address) and `EINTR`, nothing half done: wait, re-enter;
//! - emulated read (CPL0 here): `KVM_EXIT_MMIO` to a RAM address, not yet done: wait,
//!   put the bytes in `mmio.data`, re-enter (KVM finishes the instruction);
//! - emulated write: `KVM_EXIT_MMIO`, already retired (RIP moved on), not in memory:
//!   wait, write the bytes into the page, re-enter;
//! - emulated fetch: `KVM_EXIT_INTERNAL_ERROR` suberror 1, RIP unchanged: wait,
//!   re-enter;
//! - the signal that came first (the fault loop's nudge, or a kick): `EINTR` with the
//!   wait on record: wait, re-enter. If the page was one KVM's page-table walk reads,
//!   the #PF it queued for the guest is cancelled first;
//! - event delivery onto a poisoned stack page: `KVM_EXIT_SHUTDOWN`; with the wait on
//!   record it is not the guest's reset: wait, re-enter (the faulting instruction runs
//!   again; an external interrupt being delivered is lost, NOTES.md).
//!
//! A `SIGBUS` ufvmm did not cause (a page it never poisoned, or outside `KVM_RUN`) is a
//! real memory error: one message naming the address, exit 1.

use std::cell::Cell;

use kvm_ioctls::VcpuFd;

use super::kvm_run::Exit;
use super::VcpuShared;
use crate::fault::{FaultOutcome, GupFlags, Signal};
use crate::memory::{GuestRam, Marker, PageState};
use crate::vm::shared::VmShared;

/// `si_code` of a `SIGBUS` for a poisoned page: action required / optional.
const BUS_MCEERR_AR: i32 = 4;
const BUS_MCEERR_AO: i32 = 5;

thread_local! {
    /// This thread is inside `KVM_RUN` (a `SIGBUS` then comes from KVM's access).
    static IN_RUN: Cell<bool> = const { Cell::new(false) };
    /// Host address of the last `SIGBUS` inside `KVM_RUN` (0: none).
    static BUS_ADDR: Cell<u64> = const { Cell::new(0) };
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
    // Thread-locals with const initialisers and no destructor are plain TLS reads,
    // safe in a signal handler.
    if IN_RUN.with(Cell::get) && (code == BUS_MCEERR_AR || code == BUS_MCEERR_AO) {
        BUS_ADDR.with(|b| b.set(addr));
        return;
    }
    // Returning would fault again, forever.
    memory_error_exit(addr);
}

/// Writes the one-line report of a real memory error and exits 1. Only
/// async-signal-safe calls: it may run in the `SIGBUS` handler.
fn memory_error_exit(addr: u64) -> ! {
    let mut msg = *b"ufvmm: error: memory error (SIGBUS) at host address 0x0000000000000000 that ufvmm did not poison; exiting\n";
    let start = b"ufvmm: error: memory error (SIGBUS) at host address 0x".len();
    for i in 0..16 {
        let nibble = (addr >> (60 - 4 * i)) & 0xf;
        msg[start + i] = b"0123456789abcdef"[nibble as usize];
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; msg is a valid buffer.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(1);
    }
}

/// Installs the `SIGBUS` handler (process-wide; the first `SIGBUS` of a thread outside
/// `KVM_RUN` ends the process, as it would without a handler, but with a message).
pub fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid start; the handler only touches
    // thread-locals and async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs `f` (the `KVM_RUN` call) marked as inside `KVM_RUN` for the `SIGBUS` handler;
/// returns its result and the host address of a `SIGBUS` that came meanwhile.
pub fn in_kvm_run<T>(f: impl FnOnce() -> T) -> (T, Option<u64>) {
    BUS_ADDR.with(|b| b.set(0));
    IN_RUN.with(|c| c.set(true));
    let r = f();
    IN_RUN.with(|c| c.set(false));
    let addr = BUS_ADDR.with(|b| b.replace(0));
    (r, (addr != 0).then_some(addr))
}

/// A guest access that met a page not there yet, to finish once it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageAccess {
    /// Nothing to complete: enter the guest again once the page is there.
    Retry {
        /// The page (guest-physical).
        gpa: u64,
    },
    /// An emulated read: KVM finishes it on re-entry with the bytes in `mmio.data`.
    Read {
        /// Guest-physical address.
        gpa: u64,
        /// Bytes (at most 8).
        len: usize,
    },
    /// An emulated write that has retired: its bytes go into the page.
    Write {
        /// Guest-physical address.
        gpa: u64,
        /// The bytes, `len` of them.
        data: [u8; 8],
        /// Bytes (at most 8).
        len: usize,
    },
}

impl PageAccess {
    /// The page (of `ram`'s page size) the access waits for.
    pub fn page(&self, ram: &GuestRam) -> u64 {
        let gpa = match *self {
            PageAccess::Retry { gpa } | PageAccess::Read { gpa, .. } => gpa,
            PageAccess::Write { gpa, .. } => gpa,
        };
        ram.page_base(gpa)
    }
}

/// What an exit means here.
pub enum Seen<'a> {
    /// An access to guest RAM that waits for its page.
    Access(PageAccess),
    /// An emulation failure or a triple fault: a poisoned page's, if
    /// [`suspect_page`] finds one.
    Suspect(Suspect),
    /// Anything else, for the devices.
    Other(Exit<'a>),
}

/// An exit a poisoned page may have caused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suspect {
    /// `KVM_EXIT_INTERNAL_ERROR` suberror 1 (emulation failed; a fetch from a
    /// poisoned page ends so).
    Emulation,
    /// `KVM_EXIT_SHUTDOWN`.
    Shutdown,
}

/// Sorts an exit: MMIO to guest RAM is a poisoned page's (ufvmm has no MMIO device in
/// RAM, and KVM exits so only for a page it could not map).
pub fn classify<'a>(exit: Exit<'a>, vm: &VmShared) -> Seen<'a> {
    let in_ram = |gpa: u64, len: usize| vm.fault.ram.page_range(gpa, len.max(1)).is_ok();
    match exit {
        Exit::MmioRead(gpa, data) if in_ram(gpa, data.len()) => Seen::Access(PageAccess::Read {
            gpa,
            len: data.len().min(8),
        }),
        Exit::MmioWrite(gpa, bytes) if in_ram(gpa, bytes.len()) => {
            let len = bytes.len().min(8);
            let mut data = [0u8; 8];
            data[..len].copy_from_slice(&bytes[..len]);
            Seen::Access(PageAccess::Write { gpa, data, len })
        }
        Exit::InternalError(1) => Seen::Suspect(Suspect::Emulation),
        Exit::Shutdown => Seen::Suspect(Suspect::Shutdown),
        other => Seen::Other(other),
    }
}

/// True if page `gpa` was poisoned by ufvmm (its marker may be gone already: the
/// page can arrive between the exit and this look).
fn was_poisoned(vm: &VmShared, gpa: u64) -> bool {
    let idx = vm.fault.ram.page_of(gpa).unwrap_or(usize::MAX);
    vm.fault.ram.pages.marker(idx) != Marker::Never
}

/// The page a suspect exit waits for, if a missing page caused it: the page of the
/// wait on record when `KVM_RUN` returned (`stall_gpa`), if ufvmm poisoned it; or, for
/// an emulated fetch, a page under RIP or the last byte an instruction there may have
/// that ufvmm poisoned or that is not there yet. (Measured: a kick that lands while
/// the emulator fetches an instruction straddling into a missing page can end the
/// fetch with this error too, no poison involved.) The caller bounds retries: the same
/// exit at the same RIP, for the same page, after waiting for it, is a real one.
pub fn suspect_page(s: Suspect, fd: &VcpuFd, stall_gpa: Option<u64>, vm: &VmShared) -> Option<u64> {
    if let Some(gpa) = stall_gpa.filter(|&g| was_poisoned(vm, g)) {
        return Some(gpa);
    }
    if let Suspect::Emulation = s {
        let rip = fd.get_regs().ok()?.rip;
        let pages: Vec<u64> = [rip, rip.wrapping_add(14)]
            .into_iter()
            .filter_map(|gva| fd.translate_gva(gva).ok().filter(|t| t.valid != 0))
            .map(|t| vm.fault.ram.page_base(t.physical_address))
            .collect();
        // A page still missing first: with RIP on a page that was poisoned once and has
        // arrived, the fetch failed on the next one.
        let missing = |g: &&u64| {
            let idx = vm.fault.ram.page_of(**g).unwrap_or(usize::MAX);
            vm.fault.ram.pages.get(idx) != PageState::Present
        };
        if let Some(&g) = pages.iter().find(missing) {
            return Some(g);
        }
        if let Some(&g) = pages.iter().find(|&&g| was_poisoned(vm, g)) {
            return Some(g);
        }
    }
    None
}

/// The guest page of a `SIGBUS` inside `KVM_RUN`, if it is one ufvmm poisoned; any
/// other is a real memory error, and the process ends here.
pub fn sigbus_page(vm: &VmShared, hva: u64) -> u64 {
    match vm.fault.ram.hva_to_gpa(hva) {
        // KVM's SIGBUS on a poisoned huge page names a 4 KiB address in it (measured):
        // the page is the one of the unit holding it.
        Some(gpa) if was_poisoned(vm, gpa) => vm.fault.ram.page_base(gpa),
        _ => memory_error_exit(hva),
    }
}

/// After an exit with a poisoned page's wait on record: cancels a #PF that KVM queued
/// for the guest because its page-table walk read the poisoned page (the guest must
/// not see an escalation). NOTES.md: a signal pending before the poison makes KVM stop
/// with the #PF queued, not yet delivered. Only when the wait's page `gpa` is one ufvmm
/// poisoned: a #PF queued for any other reason is the guest's own. ufvmm enables
/// `KVM_CAP_EXCEPTION_PAYLOAD`, so on kernels that defer the payload to injection (this
/// host's) the queued #PF carries its address and CR2 is still the guest's; without it,
/// KVM writes CR2 when it queues the #PF, and a guest reading CR2 later would see the
/// walk's address (`tests/fixtures/pf_walk_on_a_missing_table.S`).
pub fn cancel_walk_fault(fd: &VcpuFd, vm: &VmShared, gpa: u64) {
    const PF: u8 = 14;
    if !was_poisoned(vm, gpa) {
        return;
    }
    let Ok(mut ev) = fd.get_vcpu_events() else {
        return;
    };
    if ev.exception.nr == PF && (ev.exception.pending != 0 || ev.exception.injected != 0) {
        ev.exception.pending = 0;
        ev.exception.injected = 0;
        ev.exception.has_error_code = 0;
        ev.exception.error_code = 0;
        ev.exception_has_payload = 0;
        ev.exception_payload = 0;
        // Only the exception is written back: without their flags, KVM leaves the
        // pending NMI, SIPI, interrupt shadow and SMM state as they are now.
        ev.flags &= kvm_bindings::KVM_VCPUEVENT_VALID_PAYLOAD;
        let _ = fd.set_vcpu_events(&ev);
    }
}

/// How a wait in user space ended.
pub enum Waited {
    /// The page is there and the access is complete: enter the guest.
    Done,
    /// A kick, pause or shutdown came first: the wait stays on record; try again when
    /// the vCPU runs on.
    Interrupted,
}

const WAIT: GupFlags = GupFlags {
    write: true,
    interruptible: true,
    nowait: false,
};

/// Waits in user space for the page of `access`, where every signal reaches the
/// thread, through the page-state map that `get_guest_pages` uses; then completes the
/// access (`mmio_data` takes a read's bytes for `kvm_run.mmio.data`).
pub fn wait_and_complete(
    access: PageAccess,
    me: &VcpuShared,
    vm: &VmShared,
    signal: &dyn Fn() -> Signal,
    mmio_data: &mut dyn FnMut(&[u8]),
) -> Waited {
    let page = access.page(&vm.fault.ram);
    me.stall
        .begin_user_wait(page, |g| super::exits::page_missing(vm, g));
    loop {
        match vm
            .fault
            .get_guest_pages(page, vm.fault.ram.page_size() as usize, WAIT, signal)
        {
            FaultOutcome::Done => break,
            FaultOutcome::Retry | FaultOutcome::Interrupted => return Waited::Interrupted,
            // The page will never come (a source that lost it, a link that never
            // delivers): the guest cannot go on, but the vCPU stays controllable.
            FaultOutcome::SourceLost | FaultOutcome::BadAddress => {
                if signal() != Signal::None {
                    return Waited::Interrupted;
                }
                let idx = vm.fault.ram.page_of(page).unwrap_or(usize::MAX);
                let pages = &vm.fault.ram.pages;
                pages.wait(
                    std::time::Duration::from_millis(100),
                    || pages.get(idx) == PageState::Present,
                    || signal() != Signal::None,
                );
            }
        }
    }
    let ram = &vm.fault.ram;
    match access {
        PageAccess::Retry { .. } => {}
        PageAccess::Read { gpa, len } => {
            let mut buf = [0u8; 8];
            // Present, checked above; a failure would mean outside RAM, excluded by
            // `classify`.
            let _ = ram.read_present(gpa, &mut buf[..len]);
            mmio_data(&buf[..len]);
        }
        PageAccess::Write { gpa, data, len } => {
            let _ = ram.write_present(gpa, &data[..len]);
        }
    }
    me.stall.end(page);
    Waited::Done
}

/// Why a suspect exit that no poison explains ends the vCPU.
pub fn describe_suspect(s: Suspect, rip: Option<u64>) -> String {
    let at = rip.map_or(String::new(), |r| format!(" at rip {r:#x}"));
    match s {
        Suspect::Emulation => {
            format!("KVM internal error, suberror 1 (instruction emulation failed){at}")
        }
        Suspect::Shutdown => {
            format!("triple fault: the guest reset itself (KVM_EXIT_SHUTDOWN){at}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real `SIGBUS` outside `KVM_RUN` (a read past the end of a file mapping, in a
    /// forked child) ends the process with exit 1 and one line naming the address.
    #[test]
    fn a_sigbus_ufvmm_did_not_cause_is_a_memory_error_with_its_address() {
        let mut fds = [0i32; 2];
        // SAFETY: a valid 2-int array for pipe(2).
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes async-signal-safe calls (syscalls, the handler)
        // before it exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: plain syscalls on fds and memory of this child; the read of the
            // mapping past the file's end raises SIGBUS, which the handler turns into
            // _exit(1) (returning 2 marks a handler that did not).
            unsafe {
                libc::dup2(fds[1], 2);
                if install_handler().is_err() {
                    libc::_exit(3);
                }
                let fd = libc::memfd_create(c"empty".as_ptr(), 0);
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                if p == libc::MAP_FAILED {
                    libc::_exit(4);
                }
                let _ = std::ptr::read_volatile(p.cast::<u8>());
                libc::_exit(2);
            }
        }
        // SAFETY: closing our copy of the write end, so the read below sees EOF.
        unsafe { libc::close(fds[1]) };
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: reading into a valid buffer from our pipe.
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let text = String::from_utf8_lossy(&out);
        assert!(libc::WIFEXITED(status), "child status {status:#x}: {text}");
        assert_eq!(libc::WEXITSTATUS(status), 1, "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.starts_with("ufvmm: error: memory error (SIGBUS) at host address 0x")
                && !text.contains("0x0000000000000000"),
            "{text}"
        );
    }
}
