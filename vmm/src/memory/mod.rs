//! Guest RAM: one `vm-memory` mapping, registered `MISSING` with userfaultfd, and the
//! page-state map that says which of its pages are in. The mapping holds both RAM
//! regions back to back ([`layout`]); `mem` is addressed by offset in it, never by GPA.

pub mod layout;
pub mod page_state;
pub mod uffd_raw;
pub mod usage;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use userfaultfd::{FeatureFlags, IoctlFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub use layout::{RamLayout, Region, HUGE_PAGE_SIZE};
pub use page_state::{Marker, PageState, PageStateMap};

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
    /// `--hugepages` asks for more 2 MiB pages than the host's pool has free.
    #[error("--hugepages: guest RAM needs {need} huge pages of 2 MiB but only {usable} are free; reserve them as root with `echo {total} > /proc/sys/vm/nr_hugepages` (or hugepages={total} on the kernel command line)")]
    HugePool {
        /// Pages guest RAM needs.
        need: u64,
        /// Pages free and not reserved.
        usable: u64,
        /// The pool size that would do.
        total: u64,
    },
    /// This kernel has no 2 MiB huge pages.
    #[error("--hugepages: this kernel has no 2 MiB huge pages (no /sys/kernel/mm/hugepages/hugepages-2048kB)")]
    NoHugePages,
    /// The huge-page mapping failed (the pool shrank under us, or RAM is no multiple).
    #[error("cannot map {size} bytes of guest RAM in 2 MiB huge pages: {source}")]
    MapHuge {
        /// Requested size.
        size: u64,
        /// The underlying error.
        source: std::io::Error,
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
    /// The host mapping, addressed by offset (`GuestAddress(offset)`), not by GPA.
    mem: GuestMemoryMmap,
    host_base: usize,
    size: u64,
    layout: RamLayout,
    uffd: Option<Uffd>,
    /// The userfaultfd can poison pages (`UFFDIO_POISON`).
    can_poison: bool,
    /// One state per page; everything consults it.
    pub pages: PageStateMap,
    /// Pages ufvmm wrote for a vCPU (a retired write it completed, rule 7), one bit
    /// per page: KVM's dirty log does not see them, so a migration source merges them
    /// in ([`GuestRam::take_vmm_dirty`]).
    vmm_dirty: Box<[AtomicU64]>,
}

impl GuestRam {
    /// Maps `size` bytes. With `use_uffd`, registers them `MISSING` with a userfaultfd
    /// that also catches KVM's kernel-mode accesses (not user-mode-only) and reports
    /// the faulting thread; every page starts `Missing`. Without, every page starts
    /// `Present` (the kernel zero-fills on first touch). With `huge`, RAM is 2 MiB
    /// hugetlb pages and the page unit is 2 MiB ([`GuestRam::page_size`]).
    pub fn new(size: u64, use_uffd: bool, huge: bool) -> Result<Self, MemoryError> {
        let (mem, page_size) = if huge {
            (map_huge(size)?, HUGE_PAGE_SIZE)
        } else {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
                .map_err(|source| MemoryError::Map { size, source })?;
            (mem, PAGE_SIZE)
        };
        let host_base =
            mem.get_host_address(GuestAddress(0))
                .map_err(|_| MemoryError::OutOfRange { gpa: 0, len: 0 })? as usize;
        let layout = RamLayout::with_page_size(size, page_size);
        let npages = layout.pages();
        let (uffd, initial) = if use_uffd {
            // Poisoning is asked for where the kernel has it (6.6 and later), so that a
            // wait signals cannot end can be ended; without it, RAM works as before.
            let build = |features| {
                UffdBuilder::new()
                    .close_on_exec(true)
                    .non_blocking(true)
                    .user_mode_only(false)
                    .require_features(features)
                    .create()
            };
            let poisonable = FeatureFlags::THREAD_ID
                | FeatureFlags::from_bits_retain(uffd_raw::UFFD_FEATURE_POISON);
            let (uffd, can_poison) = match build(poisonable) {
                Ok(u) => (u, true),
                Err(_) => (
                    build(FeatureFlags::THREAD_ID).map_err(MemoryError::Uffd)?,
                    false,
                ),
            };
            let ioctls = uffd
                .register_with_mode(host_base as *mut _, size as usize, RegisterMode::MISSING)
                .map_err(MemoryError::Register)?;
            // hugetlb has no UFFDIO_ZEROPAGE (measured): zeros are copied there.
            let need = if huge {
                IoctlFlags::COPY | IoctlFlags::WAKE
            } else {
                IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE
            };
            if !ioctls.contains(need) {
                return Err(MemoryError::MissingIoctls(need - ioctls));
            }
            let poison_bit = IoctlFlags::from_bits_retain(1 << uffd_raw::UFFDIO_POISON_NR);
            (
                Some((uffd, can_poison && ioctls.contains(poison_bit))),
                PageState::Missing,
            )
        } else {
            (None, PageState::Present)
        };
        let (uffd, can_poison) = match uffd {
            Some((u, p)) => (Some(u), p),
            None => (None, false),
        };
        Ok(GuestRam {
            mem,
            host_base,
            size,
            layout,
            uffd,
            can_poison,
            pages: PageStateMap::new(npages, initial),
            vmm_dirty: (0..npages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of the mapping (page index 0, GPA 0).
    pub fn host_base(&self) -> u64 {
        self.host_base as u64
    }

    /// Bytes in one page of RAM (4 KiB, or 2 MiB with `--hugepages`): the unit of
    /// the page-state map, of installs and of poisons.
    pub fn page_size(&self) -> u64 {
        self.layout.page_size()
    }

    /// True if RAM is 2 MiB huge pages.
    pub fn is_huge(&self) -> bool {
        self.layout.page_size() == HUGE_PAGE_SIZE
    }

    /// The first address of the page holding `gpa`.
    pub fn page_base(&self, gpa: u64) -> u64 {
        self.layout.page_base(gpa)
    }

    /// Offset in the mapping of page `idx`, if the page lies in RAM.
    fn page_offset(&self, idx: usize) -> Result<u64, MemoryError> {
        let ps = self.page_size();
        let off = idx as u64 * ps;
        if off + ps > self.size {
            return Err(MemoryError::OutOfRange {
                gpa: self.page_gpa(idx),
                len: ps as usize,
            });
        }
        Ok(off)
    }

    /// Where RAM lies in guest-physical space.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// Guest-physical address of page `idx`.
    pub fn page_gpa(&self, idx: usize) -> u64 {
        self.layout.page_gpa(idx)
    }

    /// Index of the page holding `gpa`, if it is RAM.
    pub fn page_of(&self, gpa: u64) -> Option<usize> {
        self.layout.page_of(gpa)
    }

    /// Bytes the VMM holds per page of RAM for the lifetime of the VM (the page-state
    /// map, its markers, the VMM-written dirty bits), all of them allocated.
    pub fn per_page_bytes(&self) -> u64 {
        self.pages.allocated_bytes() + std::mem::size_of_val(&*self.vmm_dirty) as u64
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
        (off < self.size).then(|| self.layout.gpa_of(off))
    }

    /// Offset in the mapping of `gpa..gpa+len`, which must lie in one RAM region.
    fn offset(&self, gpa: u64, len: usize) -> Result<u64, MemoryError> {
        self.layout
            .offset_of(gpa, len as u64)
            .ok_or(MemoryError::OutOfRange { gpa, len })
    }

    /// Checks that `gpa..gpa+len` lies in RAM (in one region) and returns its
    /// page-index range.
    pub fn page_range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, MemoryError> {
        let off = self.offset(gpa, len)?;
        let ps = self.page_size();
        Ok((off / ps) as usize..(off + len as u64).div_ceil(ps) as usize)
    }

    /// Reads bytes whose pages are present (callers go through `get_guest_pages` first).
    pub fn read_present(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.offset(gpa, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(off))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    /// Writes bytes whose pages are present (a vCPU's retired write, completed), and
    /// marks their pages dirty for a migration (see [`GuestRam::take_vmm_dirty`]).
    pub fn write_present(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let off = self.offset(gpa, data.len().max(1))?;
        self.mem
            .write_slice(data, GuestAddress(off))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: data.len(),
            })?;
        let last = off + (data.len() as u64).max(1) - 1;
        let ps = self.page_size();
        for idx in off / ps..=last / ps {
            let idx = idx as usize;
            if let Some(w) = self.vmm_dirty.get(idx / 64) {
                w.fetch_or(1 << (idx % 64), Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// ORs the pages ufvmm wrote since the last call into `bits` (one bit per page, as
    /// `KVM_GET_DIRTY_LOG` gives them) and forgets them.
    pub fn take_vmm_dirty(&self, bits: &mut [u64]) {
        for (b, w) in bits.iter_mut().zip(self.vmm_dirty.iter()) {
            *b |= w.swap(0, Ordering::AcqRel);
        }
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
        let gpa = self.page_gpa(idx);
        let off = self.page_offset(idx)?;
        let dst = (self.host_base as u64 + off) as *mut libc::c_void;
        let Some(uffd) = &self.uffd else {
            // Plain memory: write directly.
            if let Some(d) = data {
                self.mem
                    .write_slice(d, GuestAddress(off))
                    .map_err(|e| MemoryError::Install {
                        gpa,
                        why: e.to_string(),
                    })?;
            }
            return Ok(());
        };
        let fail = |why: String| MemoryError::Install { gpa, why };
        let page = self.page_size() as usize;
        let src = data.unwrap_or(&ZEROS[..page]);
        if src.len() != page {
            return Err(fail(format!("page data is {} bytes", src.len())));
        }
        // hugetlb has no zero page to map: zeros are copied there.
        let zero = data.is_none() && zero_map && !self.is_huge();
        match fill(uffd, dst, page, (!zero).then_some(src), true).map_err(fail)? {
            Filled::All => Ok(()),
            // Already there (installed by a racing call): success for us, but a failed
            // ioctl wakes nobody, so wake the waiters ourselves (rule 5).
            Filled::Exists(_) => uffd.wake(dst, page).map_err(|e| fail(e.to_string())),
        }
    }

    /// Installs `n` contiguous missing pages from `first` in one ioctl: `data` holds
    /// their bytes (`n` pages), or `None` maps them all zero (`UFFDIO_ZEROPAGE`). With
    /// `wake` false (`DONTWAKE`) nobody waiting on them is woken: for pages fetched
    /// ahead, which no thread is known to wait for (a fault that raced the install is
    /// woken when its event is read, see the fault loop). On `EEXIST` (a page in the
    /// run was there already) nothing is assumed: the caller installs page by page.
    /// Returns how many pages went in, from `first`.
    ///
    /// `wake` false only on the fault loop's thread (`ufvmm-fault`, checked in debug
    /// builds): only it reads fault events, and it wakes a fault it reads on a present
    /// page. A `DONTWAKE` install from any other thread can land after the loop read a
    /// waiter's event and found the page missing; nobody would wake that waiter.
    pub fn install_run(
        &self,
        first: usize,
        n: usize,
        data: Option<&[u8]>,
        wake: bool,
    ) -> Result<usize, MemoryError> {
        debug_assert!(
            wake || std::thread::current().name() == Some("ufvmm-fault"),
            "a DONTWAKE install off the fault loop's thread"
        );
        let page = self.page_size() as usize;
        // The offset in the mapping places it; the GPA names it in errors.
        let off = first as u64 * page as u64;
        let len = n * page;
        if n == 0 {
            return Ok(0);
        }
        if off + len as u64 > self.size {
            return Err(MemoryError::OutOfRange { gpa: off, len });
        }
        let gpa = self.page_gpa(first);
        let fail = |why: String| MemoryError::Install { gpa, why };
        if data.is_some_and(|d| d.len() != len) {
            return Err(fail(format!("run data is not {n} pages")));
        }
        let Some(uffd) = &self.uffd else {
            return Err(fail("a run install needs userfaultfd".into()));
        };
        let dst = (self.host_base as u64 + off) as *mut libc::c_void;
        if data.is_none() && self.is_huge() {
            // No UFFDIO_ZEROPAGE on hugetlb: one copy of zeros per page.
            for i in 0..n {
                // SAFETY: page i of the run, inside the range checked above.
                let at = unsafe { dst.add(i * page) };
                if let Filled::Exists(_) =
                    fill(uffd, at, page, Some(&ZEROS[..page]), wake).map_err(fail)?
                {
                    return Ok(i);
                }
            }
            return Ok(n);
        }
        match fill(uffd, dst, len, data, wake).map_err(fail)? {
            Filled::All => Ok(n),
            Filled::Exists(done) => Ok(done / page),
        }
    }

    /// Wakes every thread waiting on page `idx` (its page is in; the install did not
    /// wake, or the waiter came too late for it).
    pub fn wake(&self, idx: usize) -> Result<(), MemoryError> {
        let off = self.page_offset(idx)?;
        let gpa = self.page_gpa(idx);
        let Some(uffd) = &self.uffd else {
            return Ok(());
        };
        let dst = (self.host_base as u64 + off) as *mut libc::c_void;
        uffd.wake(dst, self.page_size() as usize)
            .map_err(|e| MemoryError::Install {
                gpa,
                why: format!("UFFDIO_WAKE: {e}"),
            })
    }

    /// Allocates every page of plain RAM (`--no-uffd --prefault`) with
    /// `MADV_POPULATE_WRITE`, so no guest touch pays for the host's page allocation.
    pub fn populate(&self) -> Result<(), MemoryError> {
        // SAFETY: the whole range is our own anonymous mapping of guest RAM; populating
        // it writes nothing the guest could see (the pages read as zeros, as before).
        let r = unsafe {
            libc::madvise(
                self.host_base as *mut libc::c_void,
                self.size as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            return Err(MemoryError::Install {
                gpa: 0,
                why: format!(
                    "madvise(POPULATE_WRITE): {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
        Ok(())
    }

    /// True if missing pages can be poisoned ([`GuestRam::poison`]).
    pub fn can_poison(&self) -> bool {
        self.can_poison
    }

    /// Poisons missing page `idx` and wakes its waiters: every access to it fails at
    /// once until its marker goes. The page-state map is the caller's to set.
    ///
    /// Measured on this kernel: `UFFDIO_COPY` replaces the marker (so
    /// [`GuestRam::install`] with data, or with zeros copied, ends the poison), but
    /// `UFFDIO_ZEROPAGE` fails with `EEXIST` and leaves it, which `install` takes for a
    /// page already in: call [`GuestRam::clear_poison`] before a zero-mapped install.
    pub fn poison(&self, idx: usize) -> Result<(), MemoryError> {
        let gpa = self.page_gpa(idx);
        let fail = |why: String| MemoryError::Install { gpa, why };
        let Some(uffd) = self.uffd.as_ref().filter(|_| self.can_poison) else {
            return Err(fail("this userfaultfd cannot poison pages".into()));
        };
        let off = self.page_offset(idx)?;
        let ps = self.page_size();
        let start = self.host_base as u64 + off;
        // A cut-short call (EAGAIN) reports what it did: retry, a bounded number of times.
        for _ in 0..1000 {
            match uffd_raw::poison(uffd, start, ps, true) {
                Ok(n) if n >= ps => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return Err(fail(format!("UFFDIO_POISON: {e}"))),
            }
            std::thread::yield_now();
        }
        Err(fail("UFFDIO_POISON kept returning EAGAIN".into()))
    }

    /// Removes the poison marker of page `idx` (`MADV_DONTNEED`): it is missing again
    /// and can be installed. The page-state map is the caller's to set. Always the
    /// whole page of the unit: on hugetlb, `MADV_DONTNEED` on part of a 2 MiB page
    /// returns 0 and does nothing (measured).
    pub fn clear_poison(&self, idx: usize) -> Result<(), MemoryError> {
        let gpa = self.page_gpa(idx);
        let off = self.page_offset(idx)?;
        // SAFETY: one page inside our own anonymous mapping of guest RAM; it holds only
        // the poison marker (no data), so dropping it loses nothing.
        let r = unsafe {
            libc::madvise(
                (self.host_base as u64 + off) as *mut libc::c_void,
                self.page_size() as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(MemoryError::Install {
                gpa,
                why: format!("madvise(DONTNEED): {}", std::io::Error::last_os_error()),
            });
        }
        Ok(())
    }

    /// Overwrites a present page (a newer copy sent during precopy, while no vCPU runs).
    /// The page must be `Present`: writing a missing one would fault into our own
    /// userfaultfd.
    pub fn overwrite(&self, idx: usize, data: &[u8]) -> Result<(), MemoryError> {
        let gpa = self.page_gpa(idx);
        if self.pages.get(idx) != PageState::Present || data.len() as u64 != self.page_size() {
            return Err(MemoryError::Install {
                gpa,
                why: "overwrite of a page that is not present".into(),
            });
        }
        self.mem
            .write_slice(data, GuestAddress(idx as u64 * self.page_size()))
            .map_err(|e| MemoryError::Install {
                gpa,
                why: e.to_string(),
            })
    }

    /// Drops pages `range` so they are missing again: the next touch faults into the
    /// userfaultfd (`MADV_DONTNEED` on private anonymous memory). For precopy pages
    /// written again on the source after they were sent. Whole pages of the unit (a
    /// part of a huge page would be a silent no-op).
    pub fn discard(&self, range: std::ops::Range<usize>) -> Result<(), MemoryError> {
        if range.is_empty() {
            return Ok(());
        }
        let gpa = self.page_gpa(range.start);
        let ps = self.page_size();
        let off = range.start as u64 * ps;
        let len = range.len() * ps as usize;
        if off + len as u64 > self.size {
            return Err(MemoryError::OutOfRange { gpa, len });
        }
        // SAFETY: the range lies inside our own anonymous mapping of guest RAM; dropping
        // its pages is what we want (no vCPU runs while precopy pages are discarded).
        let r = unsafe {
            libc::madvise(
                (self.host_base as u64 + off) as *mut libc::c_void,
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

/// Zeros to copy: a whole page of the largest unit (hugetlb has no zero page to map).
static ZEROS: [u8; HUGE_PAGE_SIZE as usize] = [0; HUGE_PAGE_SIZE as usize];

/// `len` zero bytes (at most one 2 MiB page; longer asks get 2 MiB).
pub fn zeros(len: usize) -> &'static [u8] {
    &ZEROS[..len.min(ZEROS.len())]
}

/// Checks that the hugetlb pool can reserve `size` bytes of 2 MiB pages: what
/// `run --hugepages` checks before it maps RAM, and a migration destination before it
/// takes a guest in 2 MiB pages.
pub fn check_huge_pool(size: u64) -> Result<(), MemoryError> {
    let pool = usage::huge_pool().ok_or(MemoryError::NoHugePages)?;
    let need = size.div_ceil(HUGE_PAGE_SIZE);
    if pool.usable < need {
        return Err(MemoryError::HugePool {
            need,
            usable: pool.usable,
            total: pool.total + (need - pool.usable),
        });
    }
    Ok(())
}

/// Maps `size` bytes of private 2 MiB hugetlb pages, after checking the pool. Never
/// `MAP_NORESERVE`: an unreserved mapping whose pool runs dry makes `UFFDIO_COPY` fail
/// with `EEXIST` (measured), which reads as "already there" and would leave a vCPU
/// waiting for good; reserved at mmap time, a short pool fails here instead.
fn map_huge(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    check_huge_pool(size)?;
    let map_err = |source| MemoryError::MapHuge { size, source };
    let region = vm_memory::MmapRegion::<()>::build(
        None,
        size as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
    )
    .map_err(|e| map_err(std::io::Error::other(e.to_string())))?;
    let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| map_err(std::io::Error::other("region overflows")))?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| map_err(std::io::Error::other(e.to_string())))
}

/// How far a [`fill`] got.
enum Filled {
    /// Every byte.
    All,
    /// A page was there already (`EEXIST`) after this many bytes; nobody was woken.
    Exists(usize),
}

/// Fills `len` bytes of missing RAM at `dst` with `src` (`UFFDIO_COPY`), or maps them
/// zero when `src` is `None` (`UFFDIO_ZEROPAGE`); `wake` wakes the threads waiting on
/// them. EAGAIN means the mm changed under the ioctl, which reports what it did: the
/// rest is tried again, a bounded number of times.
fn fill(
    uffd: &Uffd,
    dst: *mut libc::c_void,
    len: usize,
    src: Option<&[u8]>,
    wake: bool,
) -> Result<Filled, String> {
    if src.is_some_and(|s| s.len() != len) {
        return Err(format!(
            "{} bytes of data for {len}",
            src.map_or(0, |s| s.len())
        ));
    }
    let mut done = 0usize;
    for _ in 0..1000 {
        let r = match src {
            // SAFETY: dst..dst+len lies inside the registered range the caller owns
            // (checked by it); zeropage writes no user buffer.
            None => unsafe { uffd.zeropage(dst.add(done), len - done, wake) },
            // SAFETY: src and dst are valid for len - done bytes; dst is inside the
            // registered range, src is an ordinary readable buffer of len bytes.
            Some(src) => unsafe {
                uffd.copy(
                    src.as_ptr().add(done) as *const libc::c_void,
                    dst.add(done),
                    len - done,
                    wake,
                )
            },
        };
        match r {
            Ok(k) => done += k,
            Err(userfaultfd::Error::PartiallyCopied(k)) if k > 0 => done += k,
            Err(userfaultfd::Error::PartiallyCopied(_)) => {}
            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EAGAIN => {}
            Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e))
                if e as i32 == libc::EEXIST =>
            {
                return Ok(Filled::Exists(done));
            }
            Err(e) => return Err(e.to_string()),
        }
        if done >= len {
            return Ok(Filled::All);
        }
        std::thread::yield_now();
    }
    Err("userfaultfd kept returning EAGAIN".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_ufvmm_completes_for_a_vcpu_are_dirty_for_a_migration() {
        let ram = GuestRam::new(1 << 20, false, false).expect("plain RAM");
        // Straddles pages 1 and 2; page 70 lies in the second word.
        ram.write_present(2 * PAGE_SIZE - 2, &[1, 2, 3, 4])
            .expect("in RAM");
        ram.write_present(70 * PAGE_SIZE, &[9]).expect("in RAM");
        let mut bits = vec![0u64; 4];
        bits[3] = 1;
        ram.take_vmm_dirty(&mut bits);
        assert_eq!(bits, vec![0b110, 1 << 6, 0, 1]);
        let mut again = vec![0u64; 4];
        ram.take_vmm_dirty(&mut again);
        assert_eq!(again, vec![0; 4], "taken once");
    }

    #[test]
    fn a_pool_short_of_huge_pages_is_refused_before_any_mapping() {
        let size = 1u64 << 40;
        match GuestRam::new(size, true, true) {
            Err(MemoryError::HugePool {
                need,
                usable,
                total,
            }) => {
                assert_eq!(need, size / HUGE_PAGE_SIZE);
                assert!(usable < need && total >= need, "{usable} {total}");
            }
            Err(MemoryError::NoHugePages) => {}
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("1 TiB of huge pages mapped"),
        }
    }

    /// Guest RAM behind a real userfaultfd that can poison, or `None` (the test is then
    /// skipped, and fails under `CI=true`).
    fn poisonable_ram(test: &str) -> Option<GuestRam> {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        match GuestRam::new(2 << 20, true, false) {
            Ok(ram) if ram.can_poison() => return Some(ram),
            Ok(_) if ci => panic!("{test}: this kernel's userfaultfd cannot poison"),
            Err(e) if ci => panic!("{test}: no userfaultfd: {e}"),
            Ok(_) => eprintln!("SKIPPED {test}: this kernel's userfaultfd cannot poison"),
            Err(e) => eprintln!("SKIPPED {test}: no userfaultfd ({e})"),
        }
        None
    }

    /// Reads one byte of page `idx` in a forked child, where the mapping is not
    /// registered (missing pages read as zeros) but a poison marker is copied: true if
    /// the child died of `SIGBUS`.
    fn child_read_bus_errors(ram: &GuestRam, idx: usize) -> bool {
        let addr = (ram.host_base() + idx as u64 * PAGE_SIZE) as *const u8;
        // SAFETY: the child only reads one byte and calls _exit, both async-signal-safe;
        // the parent waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let _ = std::ptr::read_volatile(addr);
                libc::_exit(0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS
        }
    }

    #[test]
    fn a_poisoned_page_bus_errors_until_a_copy_or_a_discard_replaces_its_marker() {
        let test = "a_poisoned_page_bus_errors_until_a_copy_or_a_discard_replaces_its_marker";
        let Some(ram) = poisonable_ram(test) else {
            return;
        };
        let page = PAGE_SIZE as usize;
        let data = vec![0x5au8; page];
        assert!(
            !child_read_bus_errors(&ram, 3),
            "a missing page bus-errored"
        );
        ram.poison(3).expect("poison a missing page");
        assert!(child_read_bus_errors(&ram, 3), "the poison did not take");
        // Measured here: UFFDIO_COPY replaces the marker (the kernel counts a marker as
        // an empty entry), so a page that arrives needs no MADV_DONTNEED first.
        ram.install(3, Some(&data), false)
            .expect("install over the poison");
        assert!(!child_read_bus_errors(&ram, 3), "the copy left the poison");
        let mut back = vec![0u8; page];
        ram.mem
            .read_slice(&mut back, GuestAddress(3 * PAGE_SIZE))
            .expect("read back");
        assert_eq!(
            back, data,
            "the page installed over the poison holds its data"
        );
        // UFFDIO_ZEROPAGE does not (measured): it fails with EEXIST and the marker
        // stays, so a poisoned page must be cleared first or installed by a copy.
        ram.poison(5).expect("poison");
        let Some(uffd) = ram.uffd() else {
            panic!("no userfaultfd");
        };
        let dst = (ram.host_base() + 5 * PAGE_SIZE) as *mut libc::c_void;
        // SAFETY: dst is page 5 of the registered range.
        let r = unsafe { uffd.zeropage(dst, page, true) };
        assert!(
            matches!(r, Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST),
            "UFFDIO_ZEROPAGE over a poisoned page gave {r:?}"
        );
        assert!(
            child_read_bus_errors(&ram, 5),
            "the zero page replaced the poison"
        );
        ram.clear_poison(5).expect("clear");
        ram.install(5, None, true)
            .expect("zero page after clearing");
        assert!(
            !child_read_bus_errors(&ram, 5),
            "the poison outlived its clearing"
        );
        // MADV_DONTNEED removes the marker: the page is missing again.
        ram.poison(6).expect("poison");
        ram.clear_poison(6).expect("clear");
        assert!(
            !child_read_bus_errors(&ram, 6),
            "MADV_DONTNEED left the poison"
        );
        // A page that is in already is never poisoned; nor one past the end.
        assert!(ram.poison(3).is_err(), "a present page was poisoned");
        assert!(ram.poison(512).is_err(), "a page past the end was poisoned");
    }

    #[test]
    fn a_dontwake_run_install_is_for_the_fault_loops_thread_only() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let ram = match GuestRam::new(2 << 20, true, false) {
            Ok(r) => std::sync::Arc::new(r),
            Err(e) if ci => panic!("no userfaultfd: {e}"),
            Err(e) => {
                eprintln!("SKIPPED: no userfaultfd ({e})");
                return;
            }
        };
        let r = ram.clone();
        let on_loop = std::thread::Builder::new()
            .name("ufvmm-fault".into())
            .spawn(move || r.install_run(0, 2, None, false))
            .expect("spawn")
            .join()
            .expect("no panic on the fault loop's thread");
        assert_eq!(on_loop.expect("run install"), 2);
        let r = ram.clone();
        let elsewhere = std::thread::spawn(move || r.install_run(2, 2, None, false)).join();
        // Debug builds refuse it; release builds keep the install (and its risk).
        assert_eq!(elsewhere.is_err(), cfg!(debug_assertions));
        // Waking installs are for anyone.
        let r = ram.clone();
        let woke = std::thread::spawn(move || r.install_run(4, 2, None, true)).join();
        assert_eq!(woke.expect("no panic").expect("run install"), 2);
    }
}
