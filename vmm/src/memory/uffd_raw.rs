//! The userfaultfd ioctls the `userfaultfd` crate lacks, with the kernel ABI written
//! out (`include/uapi/linux/userfaultfd.h`, Linux 6.6 and later; this machine's
//! installed headers are 6.1 and lack them, see `../shared/platform/NOTES.md`).
//!
//! `UFFDIO_POISON` marks missing pages so that any access to them fails at once: a
//! user-mode access gets `SIGBUS`, and a vCPU waiting in the kernel for such a page comes
//! back to user space (the way out of a wait that signals cannot end). The marker stays
//! until `MADV_DONTNEED` removes it; `UFFDIO_COPY` onto a poisoned page fails with
//! `EEXIST`, as onto any populated page.

use std::os::fd::AsRawFd;

/// `UFFD_FEATURE_POISON`: asked for at `UFFDIO_API` time, or `UFFDIO_POISON` is refused.
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;

/// `_UFFDIO_POISON`: the ioctl number, also its bit in `uffdio_register.ioctls`.
pub const UFFDIO_POISON_NR: u64 = 0x08;

/// `UFFDIO_POISON_MODE_DONTWAKE`: do not wake the threads waiting on the range.
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioRange {
    /// Start address (page-aligned).
    pub start: u64,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
}

/// `struct uffdio_poison`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdioPoison {
    /// The pages to poison.
    pub range: UffdioRange,
    /// `UFFDIO_POISON_MODE_*` flags.
    pub mode: u64,
    /// Out: bytes poisoned, or a negative errno.
    pub updated: i64,
}

// UFFDIO_POISON = _IOWR(UFFDIO (0xAA), _UFFDIO_POISON, struct uffdio_poison).
mod nr {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_POISON, 0xAA, 0x08, super::UffdioPoison);
}

const _: () = assert!(std::mem::size_of::<UffdioPoison>() == 32);

/// Poisons `len` bytes at `start` in a range registered with `uffd`; wakes the threads
/// waiting there unless `wake` is false. Returns the bytes poisoned: fewer than `len`
/// when the call was cut short (`EAGAIN`, the rest to be retried).
///
/// Pages already populated are left alone: the call fails with `EEXIST`.
pub fn poison(uffd: &impl AsRawFd, start: u64, len: u64, wake: bool) -> std::io::Result<u64> {
    let mut arg = UffdioPoison {
        range: UffdioRange { start, len },
        mode: if wake { 0 } else { UFFDIO_POISON_MODE_DONTWAKE },
        updated: 0,
    };
    // SAFETY: UFFDIO_POISON reads and writes exactly the `uffdio_poison` we pass, which
    // lives across the call; it changes page tables only inside the registered range,
    // which the kernel checks, and touches no memory of ours otherwise.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(uffd, nr::UFFDIO_POISON(), &mut arg) };
    if r == 0 {
        return Ok(len);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EAGAIN) && arg.updated > 0 {
        return Ok(arg.updated as u64);
    }
    Err(err)
}
