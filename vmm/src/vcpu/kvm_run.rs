//! `KVM_RUN` and the vCPU's `kvm_run` page, touched only through raw pointers.
//!
//! Kickers on other threads write `kvm_run.immediate_exit` while the vCPU thread runs
//! (rule 6). A `&mut kvm_run` on the vCPU thread (which `VcpuFd::run` and
//! `VcpuFd::get_kvm_run` hand out) would claim that byte too, and a write through
//! another thread's pointer while it lives is undefined behaviour. So the vCPU thread
//! takes the page's address once, before any kicker can know it, and from then on
//! reads the exit data through raw pointers, hands out slices only of the exit data
//! (never covering `immediate_exit`), and leaves `immediate_exit` to atomic accesses
//! through [`super::kick::Kick`].

use std::marker::PhantomData;
use std::ptr::{addr_of, addr_of_mut, NonNull};

use kvm_bindings::{
    kvm_run, KVM_EXIT_DEBUG, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, KVM_EXIT_IRQ_WINDOW_OPEN,
    KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN,
};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::errno;

// `KVM_RUN`: _IO(KVMIO, 0x80).
mod nr {
    #![allow(missing_docs)]
    use kvm_bindings::KVMIO;
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
}
use nr::KVM_RUN;

/// One exit of `KVM_RUN`, with the exit data the devices need.
#[derive(Debug)]
pub enum Exit<'a> {
    /// A port write: port and the bytes written.
    IoOut(u16, &'a [u8]),
    /// A port read: port and the bytes to fill in.
    IoIn(u16, &'a mut [u8]),
    /// An MMIO read: address and the bytes to fill in.
    MmioRead(u64, &'a mut [u8]),
    /// An MMIO write: address and the bytes written.
    MmioWrite(u64, &'a [u8]),
    /// `HLT` with no in-kernel LAPIC to take it.
    Hlt,
    /// Interrupted (a signal) after the guest ran.
    Intr,
    /// The guest can take an interrupt.
    IrqWindowOpen,
    /// Triple fault.
    Shutdown,
    /// KVM internal error, with its suberror.
    InternalError(u32),
    /// A guest-debug stop (`KVM_SET_GUEST_DEBUG`): the exception (1 or 3), and DR6.
    Debug {
        /// The exception vector.
        exception: u32,
        /// DR6 at the stop (BS: a single step; B0-B3: a hardware breakpoint).
        dr6: u64,
    },
    /// KVM could not enter the guest: hardware reason and CPU.
    FailEntry(u64, u32),
    /// Exit data that does not fit the mapping (a kernel we do not understand).
    BadData(&'static str),
    /// Any other exit reason.
    Other(u32),
}

/// The vCPU thread's handle on `KVM_RUN` and its `kvm_run` mapping. Borrows the vCPU
/// fd (shared: the other vCPU ioctls stay usable), so it cannot outlive the mapping.
/// While it lives, nothing may call the fd's methods that make a `&mut kvm_run`
/// (`run` and `get_kvm_run` need `&mut` and cannot be; `set_kvm_immediate_exit` and
/// `sync_regs` are not used anywhere).
pub struct VcpuRun<'a> {
    fd: &'a VcpuFd,
    run: NonNull<kvm_run>,
    /// Bytes mapped at `run` (`KVM_GET_VCPU_MMAP_SIZE`).
    size: usize,
    _page: PhantomData<&'a mut kvm_run>,
}

impl<'a> VcpuRun<'a> {
    /// Takes the address of `fd`'s `kvm_run` mapping of `size` bytes. Call this before
    /// kickers are given [`VcpuRun::immediate_exit`]: the `&mut kvm_run` it briefly
    /// makes must not overlap their writes. Fails if `size` cannot hold a `kvm_run`.
    ///
    /// # Safety
    ///
    /// `size` must be the `KVM_GET_VCPU_MMAP_SIZE` of the KVM that made `fd` (what
    /// `VmFd::run_size` returns for its VM): the mapping behind `fd` is that long, and
    /// port I/O data is handed out as slices of it up to `size` bytes.
    pub unsafe fn new(fd: &'a mut VcpuFd, size: usize) -> Result<Self, String> {
        let need = std::mem::size_of::<kvm_run>();
        if size < need {
            return Err(format!(
                "the kvm_run mapping is {size} bytes, smaller than kvm_run ({need} bytes)"
            ));
        }
        let run = NonNull::from(fd.get_kvm_run());
        Ok(VcpuRun {
            fd,
            run,
            size,
            _page: PhantomData,
        })
    }

    /// The vCPU fd, for the other vCPU ioctls.
    pub fn fd(&self) -> &VcpuFd {
        self.fd
    }

    /// Address of `kvm_run.immediate_exit`, valid while the vCPU fd `self` borrows
    /// lives; it may be accessed only atomically (see [`super::kick::Kick::attach`]).
    pub fn immediate_exit(&self) -> *mut u8 {
        // SAFETY: `run` points to the live kvm_run mapping; addr_of_mut makes no
        // reference, so nothing claims the byte.
        unsafe { addr_of_mut!((*self.run.as_ptr()).immediate_exit) }
    }

    /// Enters the guest (`KVM_RUN`) and returns how it came back.
    pub fn run(&mut self) -> Result<Exit<'_>, errno::Error> {
        // SAFETY: KVM_RUN on our own vCPU fd takes no argument; the only memory of ours
        // it writes besides guest RAM (which KVM owns the use of) is the kvm_run
        // mapping, which the borrowed fd keeps mapped as long as `self` lives.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(self.fd, KVM_RUN()) };
        if ret != 0 {
            return Err(errno::Error::last());
        }
        let p = self.run.as_ptr();
        // SAFETY: the mapping is live and only this thread reads it; plain reads of
        // fields other threads never write (they write only immediate_exit).
        let reason = unsafe { addr_of!((*p).exit_reason).read() };
        Ok(match reason {
            KVM_EXIT_IO => self.io(),
            KVM_EXIT_MMIO => {
                // SAFETY: exit_reason says `mmio` is the union member the kernel filled
                // in; read through a raw pointer, no reference to kvm_run is made.
                let (addr, len, write) = unsafe {
                    let m = addr_of!((*p).__bindgen_anon_1.mmio);
                    (
                        addr_of!((*m).phys_addr).read(),
                        addr_of!((*m).len).read() as usize,
                        addr_of!((*m).is_write).read(),
                    )
                };
                if len > 8 {
                    Exit::BadData("MMIO length over 8 bytes")
                } else if write != 0 {
                    // SAFETY: as for a read below; a shared slice of the 8 data bytes.
                    let data = unsafe {
                        let d = addr_of!((*p).__bindgen_anon_1.mmio.data).cast::<u8>();
                        std::slice::from_raw_parts(d, len)
                    };
                    Exit::MmioWrite(addr, data)
                } else {
                    // SAFETY: `mmio.data` is 8 bytes inside kvm_run, disjoint from
                    // immediate_exit; the slice borrows `self` mutably, so it is the
                    // only view of those bytes while it lives.
                    let data = unsafe {
                        let d = addr_of_mut!((*p).__bindgen_anon_1.mmio.data).cast::<u8>();
                        std::slice::from_raw_parts_mut(d, len)
                    };
                    Exit::MmioRead(addr, data)
                }
            }
            KVM_EXIT_HLT => Exit::Hlt,
            KVM_EXIT_INTR => Exit::Intr,
            KVM_EXIT_IRQ_WINDOW_OPEN => Exit::IrqWindowOpen,
            KVM_EXIT_SHUTDOWN => Exit::Shutdown,
            KVM_EXIT_INTERNAL_ERROR => {
                // SAFETY: exit_reason says `internal` is the member the kernel filled
                // in; a raw read.
                let sub = unsafe { addr_of!((*p).__bindgen_anon_1.internal.suberror).read() };
                Exit::InternalError(sub)
            }
            KVM_EXIT_DEBUG => {
                // SAFETY: exit_reason says `debug` is the member the kernel filled in;
                // raw reads.
                let (exception, dr6) = unsafe {
                    let d = addr_of!((*p).__bindgen_anon_1.debug.arch);
                    (addr_of!((*d).exception).read(), addr_of!((*d).dr6).read())
                };
                Exit::Debug { exception, dr6 }
            }
            KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: exit_reason says `fail_entry` is the member filled in.
                let (reason, cpu) = unsafe {
                    let f = addr_of!((*p).__bindgen_anon_1.fail_entry);
                    (
                        addr_of!((*f).hardware_entry_failure_reason).read(),
                        addr_of!((*f).cpu).read(),
                    )
                };
                Exit::FailEntry(reason, cpu)
            }
            other => Exit::Other(other),
        })
    }

    /// Puts the bytes of an MMIO read the last exit asked for into `kvm_run.mmio.data`,
    /// where KVM takes them on the next `KVM_RUN` (at most 8 bytes; more are cut).
    pub fn set_mmio_data(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(8);
        // SAFETY: `mmio.data` is 8 bytes inside the live kvm_run mapping, disjoint from
        // immediate_exit; only this thread touches them, through a raw pointer.
        unsafe {
            let d = addr_of_mut!((*self.run.as_ptr()).__bindgen_anon_1.mmio.data).cast::<u8>();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), d, n);
        }
    }

    /// The data of a port I/O exit: `count * size` bytes at `data_offset` into the
    /// mapping.
    fn io(&mut self) -> Exit<'_> {
        let p = self.run.as_ptr();
        // SAFETY: exit_reason is KVM_EXIT_IO, so `io` is the member the kernel filled
        // in; a raw read, no reference to kvm_run is made.
        let io = unsafe { addr_of!((*p).__bindgen_anon_1.io).read() };
        let len = usize::from(io.size) * io.count as usize;
        let start = usize::try_from(io.data_offset).unwrap_or(usize::MAX);
        // The data must lie in the mapping, past the kvm_run fields (so it never
        // covers immediate_exit); KVM puts it on the page after them.
        if start < std::mem::size_of::<kvm_run>() || start.saturating_add(len) > self.size {
            return Exit::BadData("port I/O data outside the kvm_run mapping");
        }
        // SAFETY: the range was checked to be inside the live mapping and disjoint
        // from every kvm_run field; the slice borrows `self` mutably, so it is the only
        // view of those bytes while it lives.
        let data = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>().add(start), len) };
        match u32::from(io.direction) {
            KVM_EXIT_IO_OUT => Exit::IoOut(io.port, data),
            KVM_EXIT_IO_IN => Exit::IoIn(io.port, data),
            _ => Exit::BadData("port I/O with an unknown direction"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapping_too_small_for_kvm_run_is_refused() {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(k) => k,
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("/dev/kvm cannot be opened ({e}) and CI=true: this test needs real KVM")
            }
            Err(e) => {
                eprintln!("SKIPPED a_mapping_too_small_for_kvm_run_is_refused: /dev/kvm: {e}");
                return;
            }
        };
        let vm = kvm.create_vm().expect("create_vm");
        let mut fd = vm.create_vcpu(0).expect("create_vcpu");
        let small = std::mem::size_of::<kvm_run>() - 1;
        // SAFETY: too small a size is refused before anything is read through it.
        let r = unsafe { VcpuRun::new(&mut fd, small) };
        assert!(r.is_err_and(|e| e.contains("smaller than kvm_run")));
        // SAFETY: the size KVM gives for this VM's vCPUs.
        let r = unsafe { VcpuRun::new(&mut fd, vm.run_size()) };
        assert!(r.is_ok());
    }
}
