//! Guest memory as gdb sees it: guest-virtual addresses, translated through the
//! stopped vCPU's page tables, read and written only through `get_guest_pages`
//! (rules 1-5). A page that has not arrived is asked for at once and waited for at
//! most [`PAGE_WAIT`] (less if gdb sends something, e.g. its interrupt): then gdb
//! gets an error, never a hang.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_sregs;

use crate::abi::PAGE_SIZE;
use crate::fault::{FaultOutcome, GupFlags, Signal};
use crate::vcpu::critical::translate;
use crate::vm::shared::VmShared;

/// Longest wait for one page that has not arrived.
pub const PAGE_WAIT: Duration = Duration::from_millis(500);

const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// Why an access failed.
#[derive(Debug, PartialEq, Eq)]
pub enum AccessError {
    /// The address is not mapped by the guest's page tables (or they are unreadable).
    Unmapped,
    /// The page did not arrive within the bound (or gdb cut the wait short).
    NotArrived,
    /// Outside guest RAM, or the page will never come.
    Bad,
}

/// Reads and writes guest memory for the debugger.
pub struct Memory<'a> {
    vm: &'a VmShared,
    /// The gdb connection's fd: bytes waiting on it cut a page wait short.
    conn: i32,
    /// One bound for the whole access, page-table reads included.
    deadline: Instant,
}

impl<'a> Memory<'a> {
    /// Access for `vm`, on behalf of the gdb connection `conn`.
    pub fn new(vm: &'a VmShared, conn: i32) -> Self {
        Memory {
            vm,
            conn,
            deadline: Instant::now() + PAGE_WAIT,
        }
    }

    /// True if gdb has sent bytes not read yet (an interrupt, most likely).
    fn gdb_waits(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.conn,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut p, 1, 0) > 0 }
    }

    /// Guest-physical bytes, with the bounded wait (`write`: the page is wanted for
    /// writing).
    fn phys(&self, gpa: u64, buf: &mut [u8], write: bool) -> Result<(), AccessError> {
        let deadline = self.deadline;
        let signal = || {
            if self.vm.is_shutting_down() {
                Signal::Fatal
            } else if Instant::now() >= deadline || self.gdb_waits() {
                Signal::Kick
            } else {
                Signal::None
            }
        };
        let flags = GupFlags {
            interruptible: true,
            write,
            ..GupFlags::default()
        };
        match self.vm.fault.read(gpa, buf, flags, &signal) {
            FaultOutcome::Done => Ok(()),
            FaultOutcome::Retry | FaultOutcome::Interrupted => Err(AccessError::NotArrived),
            _ => Err(AccessError::Bad),
        }
    }

    /// Reads guest-physical bytes (one page at most), with the bounded wait.
    pub fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        self.phys(gpa, buf, false)
    }

    /// Writes guest-physical bytes (one page at most), the page made present first.
    pub fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), AccessError> {
        let mut probe = [0u8; 1];
        self.phys(gpa, &mut probe, true)?;
        self.vm
            .fault
            .ram
            .write_present(gpa, data)
            .map_err(|_| AccessError::Bad)
    }

    /// The guest-physical address of `gva` for a vCPU in state `sregs`.
    pub fn translate(&self, sregs: &kvm_sregs, gva: u64) -> Result<u64, AccessError> {
        if sregs.cr0 & CR0_PG == 0 {
            return Ok(gva);
        }
        if sregs.efer & EFER_LMA == 0 {
            // 32-bit paging: no guest of ufvmm uses it.
            return Err(AccessError::Unmapped);
        }
        let levels = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let mut failed = None;
        let mut read = |gpa: u64| {
            let mut b = [0u8; 8];
            match self.phys(gpa, &mut b, false) {
                Ok(()) => Some(u64::from_le_bytes(b)),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            }
        };
        match translate(sregs.cr3, levels, gva, &mut read) {
            Some(gpa) => Ok(gpa),
            None => Err(failed.unwrap_or(AccessError::Unmapped)),
        }
    }

    /// Reads from `gva` into `data`, page by page; the bytes read before the first
    /// failure, or the failure if there are none.
    pub fn read(&self, sregs: &kvm_sregs, gva: u64, data: &mut [u8]) -> Result<usize, AccessError> {
        let mut done = 0;
        while done < data.len() {
            let at = gva.wrapping_add(done as u64);
            let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(data.len() - done);
            let step = self
                .translate(sregs, at)
                .and_then(|gpa| self.phys(gpa, &mut data[done..done + n], false));
            match step {
                Ok(()) => done += n,
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(done)
    }

    /// Writes `data` at `gva` (each page first made present through
    /// `get_guest_pages`, for writing).
    pub fn write(&self, sregs: &kvm_sregs, gva: u64, data: &[u8]) -> Result<(), AccessError> {
        let mut done = 0;
        while done < data.len() {
            let at = gva.wrapping_add(done as u64);
            let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(data.len() - done);
            let gpa = self.translate(sregs, at)?;
            self.write_phys(gpa, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}
