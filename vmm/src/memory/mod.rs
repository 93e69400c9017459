//! Guest RAM: one `vm-memory` region, registered `MISSING` with userfaultfd, and the
//! page-state map that says which of its pages are in.

pub mod page_state;

use std::os::fd::AsRawFd;

use userfaultfd::{FeatureFlags, IoctlFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub use page_state::{PageState, PageStateMap};

use crate::abi::PAGE_SIZE;

/// Errors setting up or filling guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of guest RAM failed.
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Map {
        /// Requested size.
        size: u64,
        /// The underlying error.
        source: vm_memory::mmap::FromRangesError,
    },
    /// userfaultfd could not be created.
    #[error("cannot create a userfaultfd ({0}); run as root, or set vm.unprivileged_userfaultfd=1, or use --no-uffd")]
    Uffd(userfaultfd::Error),
    /// Registering guest RAM with userfaultfd failed.
    #[error("cannot register guest RAM with userfaultfd: {0}")]
    Register(userfaultfd::Error),
    /// The kernel lacks an ioctl we need.
    #[error("userfaultfd lacks {0:?} on guest RAM")]
    MissingIoctls(IoctlFlags),
    /// Installing a page failed.
    #[error("cannot install guest page at {gpa:#x}: {why}")]
    Install {
        /// Guest-physical address of the page.
        gpa: u64,
        /// The error.
        why: String,
    },
    /// The mapping has no host address (cannot happen for a fresh mmap).
    #[error("guest RAM has no host address: {0}")]
    HostAddress(String),
    /// An access outside guest RAM.
    #[error("guest address {gpa:#x}+{len} is outside guest RAM")]
    OutOfRange {
        /// Start of the access.
        gpa: u64,
        /// Its length.
        len: usize,
    },
}

/// Guest RAM and its page states.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    host_base: usize,
    size: u64,
    uffd: Option<Uffd>,
    /// One state per page; everything consults it.
    pub pages: PageStateMap,
}

impl GuestRam {
    /// Maps `size` bytes. With `use_uffd`, registers them `MISSING` with a userfaultfd
    /// that also catches KVM's kernel-mode accesses (not user-mode-only) and reports
    /// the faulting thread; every page starts `Missing`. Without, every page starts
    /// `Present` (the kernel zero-fills on first touch).
    pub fn new(size: u64, use_uffd: bool) -> Result<Self, MemoryError> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|source| MemoryError::Map { size, source })?;
        let host_base =
            mem.get_host_address(GuestAddress(0))
                .map_err(|_| MemoryError::OutOfRange { gpa: 0, len: 0 })? as usize;
        let npages = (size / PAGE_SIZE) as usize;
        let (uffd, initial) = if use_uffd {
            let uffd = UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(false)
                .require_features(FeatureFlags::THREAD_ID)
                .create()
                .map_err(MemoryError::Uffd)?;
            let ioctls = uffd
                .register_with_mode(host_base as *mut _, size as usize, RegisterMode::MISSING)
                .map_err(MemoryError::Register)?;
            let need = IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE;
            if !ioctls.contains(need) {
                return Err(MemoryError::MissingIoctls(need - ioctls));
            }
            (Some(uffd), PageState::Missing)
        } else {
            (None, PageState::Present)
        };
        Ok(GuestRam {
            mem,
            host_base,
            size,
            uffd,
            pages: PageStateMap::new(npages, initial),
        })
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of GPA 0.
    pub fn host_base(&self) -> u64 {
        self.host_base as u64
    }

    /// The userfaultfd, unless running with `--no-uffd`.
    pub fn uffd(&self) -> Option<&Uffd> {
        self.uffd.as_ref()
    }

    /// Raw fd of the userfaultfd, for poll.
    pub fn uffd_fd(&self) -> Option<i32> {
        self.uffd.as_ref().map(|u| u.as_raw_fd())
    }

    /// GPA of a host address inside guest RAM.
    pub fn hva_to_gpa(&self, hva: u64) -> Option<u64> {
        let off = hva.checked_sub(self.host_base as u64)?;
        (off < self.size).then_some(off)
    }

    /// Checks that `gpa..gpa+len` lies in RAM and returns its page-index range.
    pub fn page_range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, MemoryError> {
        let end = gpa
            .checked_add(len as u64)
            .filter(|&e| e <= self.size && len > 0)
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        Ok((gpa / PAGE_SIZE) as usize..end.div_ceil(PAGE_SIZE) as usize)
    }

    /// Reads bytes whose pages are present (callers go through `get_guest_pages` first).
    pub fn read_present(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    /// Installs one page of data (or zeros, when `data` is `None`) into missing RAM
    /// and wakes every thread waiting on it, read from the userfaultfd yet or not.
    /// `zero_map` picks `UFFDIO_ZEROPAGE` for zeros (cheapest for reads); otherwise
    /// zeros are copied, which gives a writable page at once.
    pub fn install(
        &self,
        idx: usize,
        data: Option<&[u8]>,
        zero_map: bool,
    ) -> Result<(), MemoryError> {
        static ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
        let gpa = idx as u64 * PAGE_SIZE;
        let dst = (self.host_base as u64 + gpa) as *mut libc::c_void;
        let Some(uffd) = &self.uffd else {
            // Plain memory: write directly.
            if let Some(d) = data {
                self.mem
                    .write_slice(d, GuestAddress(gpa))
                    .map_err(|e| MemoryError::Install {
                        gpa,
                        why: e.to_string(),
                    })?;
            }
            return Ok(());
        };
        let fail = |why: String| MemoryError::Install { gpa, why };
        let src = data.unwrap_or(&ZEROS);
        if src.len() != PAGE_SIZE as usize {
            return Err(fail(format!("page data is {} bytes", src.len())));
        }
        let page = PAGE_SIZE as usize;
        let mut done = 0usize;
        // EAGAIN means the mm changed under the ioctl; it reports what it did: retry the
        // rest, a bounded number of times.
        for _ in 0..1000 {
            let r = if data.is_none() && zero_map {
                // SAFETY: dst is a page-aligned page inside the registered range we own.
                unsafe { uffd.zeropage(dst, page, true) }
            } else {
                // SAFETY: src and dst are valid for page - done bytes; dst is inside the
                // registered range, src is an ordinary readable buffer.
                unsafe {
                    uffd.copy(
                        src.as_ptr().add(done) as *const libc::c_void,
                        dst.add(done),
                        page - done,
                        true,
                    )
                }
            };
            match r {
                Ok(n) => done += n,
                Err(userfaultfd::Error::PartiallyCopied(n)) if n < page - done => done += n,
                Err(userfaultfd::Error::PartiallyCopied(_)) => {}
                Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EAGAIN => {}
                // Already there (installed by a racing call): success for us, but a
                // failed ioctl wakes nobody, so wake the waiters ourselves (rule 5).
                Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e))
                    if e as i32 == libc::EEXIST =>
                {
                    return uffd.wake(dst, page).map_err(|e| fail(e.to_string()));
                }
                Err(e) => return Err(fail(e.to_string())),
            }
            if done >= page {
                return Ok(());
            }
            std::thread::yield_now();
        }
        Err(fail("userfaultfd kept returning EAGAIN".into()))
    }

    /// Overwrites a present page (a newer copy sent during precopy, while no vCPU runs).
    /// The page must be `Present`: writing a missing one would fault into our own
    /// userfaultfd.
    pub fn overwrite(&self, idx: usize, data: &[u8]) -> Result<(), MemoryError> {
        let gpa = idx as u64 * PAGE_SIZE;
        if self.pages.get(idx) != PageState::Present || data.len() != PAGE_SIZE as usize {
            return Err(MemoryError::Install {
                gpa,
                why: "overwrite of a page that is not present".into(),
            });
        }
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| MemoryError::Install {
                gpa,
                why: e.to_string(),
            })
    }

    /// Drops pages `range` so they are missing again: the next touch faults into the
    /// userfaultfd (`MADV_DONTNEED` on private anonymous memory). For precopy pages
    /// written again on the source after they were sent.
    pub fn discard(&self, range: std::ops::Range<usize>) -> Result<(), MemoryError> {
        if range.is_empty() {
            return Ok(());
        }
        let gpa = range.start as u64 * PAGE_SIZE;
        let len = range.len() * PAGE_SIZE as usize;
        if gpa + len as u64 > self.size {
            return Err(MemoryError::OutOfRange { gpa, len });
        }
        // SAFETY: the range lies inside our own anonymous mapping of guest RAM; dropping
        // its pages is what we want (no vCPU runs while precopy pages are discarded).
        let r = unsafe {
            libc::madvise(
                (self.host_base as u64 + gpa) as *mut libc::c_void,
                len,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(MemoryError::Install {
                gpa,
                why: format!("madvise(DONTNEED): {}", std::io::Error::last_os_error()),
            });
        }
        for i in range {
            self.pages.set(i, PageState::Missing);
        }
        Ok(())
    }
}
