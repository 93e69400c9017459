//! The boot image: the guest ELF, boot info and boot page tables, as whole pages.
//!
//! On a postcopy destination nothing is in RAM at start, so the boot image is not
//! written into guest RAM: it becomes an overlay over the page source, and its pages
//! arrive through the fault layer like any other.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;

use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::abi::{self, BootInfo, PAGE_SIZE};
use crate::config::{Mode, VmConfig};

/// The built-in guest, compiled by `vmm/build.rs`.
pub static BUILTIN_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

// SAFETY: BootInfo is `repr(C)`, integers only, laid out with no padding; every bit
// pattern is valid.
unsafe impl ByteValued for BootInfo {}

/// Largest ELF file accepted (the guest region is 3 MiB anyway).
const MAX_ELF_FILE: u64 = 64 << 20;

/// Errors building the boot image.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The ELF file cannot be read.
    #[error("cannot read guest ELF {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The ELF is malformed or not for this machine.
    #[error("guest ELF {name}: {why}")]
    Elf {
        /// The file (or "built-in").
        name: String,
        /// What is wrong.
        why: String,
    },
    /// Building the staging memory failed.
    #[error("cannot stage the boot image: {0}")]
    Stage(String),
}

/// The boot image: pages by index, and where the vCPUs start.
pub struct BootImage {
    /// Guest entry point.
    pub entry: u64,
    /// Page index -> one page of bytes.
    pub pages: BTreeMap<usize, Box<[u8]>>,
}

/// Reads the guest ELF: `--kernel PATH`, or the built-in guest.
pub fn read_elf(path: Option<&Path>) -> Result<(String, Vec<u8>), BootError> {
    let Some(path) = path else {
        return Ok(("built-in".into(), BUILTIN_GUEST.to_vec()));
    };
    let name = path.display().to_string();
    let read_err = |source| BootError::Read {
        path: name.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(BootError::Elf {
            name,
            why: "not a regular file".into(),
        });
    }
    let len = meta.len();
    if len > MAX_ELF_FILE {
        return Err(BootError::Elf {
            name,
            why: format!("file is {len} bytes, more than the {MAX_ELF_FILE} accepted"),
        });
    }
    // Read at most what the size check allowed, in case the file grows meanwhile.
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(read_err)?,
            MAX_ELF_FILE + 1,
        ),
        &mut bytes,
    )
    .map_err(read_err)?;
    Ok((name, bytes))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// A loadable segment: guest address, bytes in the file, bytes in memory.
struct Segment {
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Checks what linux-loader does not: an x86-64 executable whose segments lie inside
/// the file and inside the guest image region, with the entry point in one of them.
fn validate(elf: &[u8], mem: u64) -> Result<(u64, Vec<Segment>), String> {
    let truncated = || "file is truncated".to_string();
    if elf.len() < 64 || elf[..4] != [0x7f, b'E', b'L', b'F'] {
        return Err(if elf.len() < 4 {
            truncated()
        } else {
            "not an ELF file (bad magic)".into()
        });
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let machine = u16_at(elf, 18).ok_or_else(truncated)?;
    if machine != 62 {
        return Err(format!("machine is {machine}, not x86-64 (62)"));
    }
    let entry = u64_at(elf, 24).ok_or_else(truncated)?;
    let phoff = u64_at(elf, 32).ok_or_else(truncated)?;
    let phentsize = u16_at(elf, 54).ok_or_else(truncated)? as u64;
    let phnum = u16_at(elf, 56).ok_or_else(truncated)? as u64;
    if phentsize != 56 {
        return Err(format!("program header size {phentsize}, expected 56"));
    }
    phoff
        .checked_add(phnum * 56)
        .filter(|&e| e <= elf.len() as u64)
        .ok_or_else(truncated)?;
    let limit = abi::TEST_AREA_GPA.min(mem);
    let mut segs = Vec::new();
    for i in 0..phnum {
        let ph = (phoff + i * 56) as usize;
        if u32_at(elf, ph).ok_or_else(truncated)? != 1 {
            continue; // not PT_LOAD
        }
        let offset = u64_at(elf, ph + 8).ok_or_else(truncated)?;
        let paddr = u64_at(elf, ph + 24).ok_or_else(truncated)?;
        let filesz = u64_at(elf, ph + 32).ok_or_else(truncated)?;
        let memsz = u64_at(elf, ph + 40).ok_or_else(truncated)?;
        if offset
            .checked_add(filesz)
            .is_none_or(|e| e > elf.len() as u64)
        {
            return Err(truncated());
        }
        let end = paddr.checked_add(memsz.max(filesz));
        if paddr < abi::KERNEL_LOAD_GPA || end.is_none_or(|e| e > limit) {
            return Err(format!(
                "segment at {paddr:#x} (+{memsz:#x} bytes) does not fit in guest RAM's image region \
                 {:#x}..{limit:#x}",
                abi::KERNEL_LOAD_GPA
            ));
        }
        segs.push(Segment {
            paddr,
            filesz,
            memsz,
        });
    }
    if segs.is_empty() {
        return Err("no loadable segment".into());
    }
    if !segs
        .iter()
        .any(|s| entry >= s.paddr && entry < s.paddr + s.memsz.max(s.filesz))
    {
        return Err(format!(
            "entry point {entry:#x} is not in a loadable segment"
        ));
    }
    Ok((entry, segs))
}

/// Page directories the high RAM region needs (one per GiB of guest-physical space
/// above 4 GiB). They sit at `TEST_AREA_GPA`, and the test area starts after them.
pub fn high_pds(mem: u64) -> u64 {
    let top = crate::memory::RamLayout::new(mem).top_gpa();
    top.div_ceil(1 << 30).saturating_sub(abi::PD_COUNT)
}

/// The boot info for `cfg`.
pub fn boot_info(cfg: &VmConfig, tsc_khz: u64) -> BootInfo {
    let w = &cfg.workload;
    let layout = crate::memory::RamLayout::new(cfg.mem);
    let test_base = abi::TEST_AREA_GPA + high_pds(cfg.mem) * PAGE_SIZE;
    BootInfo {
        magic: abi::BOOT_MAGIC,
        version: abi::BOOT_VERSION,
        nr_vcpus: cfg.vcpus as u32,
        mem_size: cfg.mem,
        test_base,
        test_size: layout.low_size() - test_base,
        high_base: abi::HIGH_RAM_GPA,
        high_size: layout.high_size(),
        tsc_khz,
        workload: w.id,
        mode: match cfg.mode {
            Mode::User => abi::mode::USER,
            Mode::Kernel => abi::mode::KERNEL,
        },
        pages: w.pages,
        random: u32::from(w.random),
        write: u32::from(w.write),
        shared: u32::from(w.shared),
        verify_phase: w.phase,
        seed: w.seed,
        words: w.words,
        mailbox_fresh: u32::from(w.fresh),
        ms: w.ms,
        heartbeat_ms: w.heartbeat_ms,
        count: w.count,
        crash_kind: w.crash_kind,
        rounds: w.rounds,
        seconds: w.seconds,
        reserved: 0,
        stride: w.stride,
    }
}

/// Builds the boot image for `cfg` from an ELF (named `name` in errors).
pub fn build(name: &str, elf: &[u8], cfg: &VmConfig, tsc_khz: u64) -> Result<BootImage, BootError> {
    let elf_err = |why: String| BootError::Elf {
        name: name.to_string(),
        why,
    };
    let (entry, segs) = validate(elf, cfg.mem).map_err(elf_err)?;

    // Stage the low region in scratch memory, let linux-loader place the segments.
    let stage =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), abi::TEST_AREA_GPA as usize)])
            .map_err(|e| BootError::Stage(e.to_string()))?;
    Elf::load(
        &stage,
        None,
        &mut Cursor::new(elf),
        Some(GuestAddress(abi::KERNEL_LOAD_GPA)),
    )
    .map_err(|e| elf_err(e.to_string()))?;

    let info = boot_info(cfg, tsc_khz);
    let info_bytes = info.as_slice();
    let stage_err = |e: vm_memory::GuestMemoryError| BootError::Stage(e.to_string());
    stage
        .write_slice(info_bytes, GuestAddress(abi::BOOT_INFO_GPA))
        .map_err(stage_err)?;
    // Identity map of 0..4 GiB and of the high RAM region, with 2 MiB pages,
    // user-accessible (1 GiB pages would be fewer tables, but this host's KVM does not
    // offer them). The high region's page directories are not staged: they lie in the
    // test area's place (see `high_pds`), and are built as pages below.
    const P_RW_US: u64 = 0x7;
    const PS: u64 = 0x80;
    let pdpt = |i: u64| match i {
        0 => abi::PDPT_GPA,
        i => abi::PDPT_HIGH_GPA + (i - 1) * PAGE_SIZE,
    };
    let gigs = abi::PD_COUNT + high_pds(cfg.mem);
    let pml4s = gigs.div_ceil(512);
    if pml4s > 1 + abi::PDPT_HIGH_COUNT {
        return Err(BootError::Stage(format!(
            "{gigs} GiB of guest-physical space is more than the boot page tables map"
        )));
    }
    for i in 0..pml4s {
        stage
            .write_obj(pdpt(i) | P_RW_US, GuestAddress(abi::PML4_GPA + i * 8))
            .map_err(stage_err)?;
    }
    let pd_gpa = |gig: u64| match gig {
        0..abi::PD_COUNT => abi::PD_GPA + gig * PAGE_SIZE,
        _ => abi::TEST_AREA_GPA + (gig - abi::PD_COUNT) * PAGE_SIZE,
    };
    for gig in abi::PD_COUNT..gigs {
        let at = pdpt(gig / 512) + (gig % 512) * 8;
        stage
            .write_obj(pd_gpa(gig) | P_RW_US, GuestAddress(at))
            .map_err(stage_err)?;
    }
    for pd in 0..abi::PD_COUNT {
        let pd_gpa = abi::PD_GPA + pd * PAGE_SIZE;
        stage
            .write_obj(pd_gpa | P_RW_US, GuestAddress(abi::PDPT_GPA + pd * 8))
            .map_err(stage_err)?;
        for i in 0..512u64 {
            let addr = (pd << 30) | (i << 21);
            stage
                .write_obj(addr | P_RW_US | PS, GuestAddress(pd_gpa + i * 8))
                .map_err(stage_err)?;
        }
    }

    let mut wanted: Vec<u64> = vec![abi::BOOT_INFO_GPA, abi::PML4_GPA];
    wanted.extend((0..pml4s).map(pdpt));
    let mut pages = BTreeMap::new();
    for gig in abi::PD_COUNT..gigs {
        let mut page = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
        for (i, e) in page.chunks_exact_mut(8).enumerate() {
            let addr = (gig << 30) | ((i as u64) << 21);
            e.copy_from_slice(&(addr | P_RW_US | PS).to_le_bytes());
        }
        // In the low region, where page index = GPA / 4096.
        pages.insert((pd_gpa(gig) / PAGE_SIZE) as usize, page);
    }
    wanted.extend((0..abi::PD_COUNT).map(|pd| abi::PD_GPA + pd * PAGE_SIZE));
    for s in &segs {
        let first = s.paddr / PAGE_SIZE;
        let last = (s.paddr + s.filesz).div_ceil(PAGE_SIZE);
        wanted.extend((first..last).map(|p| p * PAGE_SIZE));
    }
    for gpa in wanted {
        let mut page = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
        stage
            .read_slice(&mut page, GuestAddress(gpa))
            .map_err(stage_err)?;
        // Everything staged lies in the first 4 MiB, where page index = GPA / 4096.
        pages.insert((gpa / PAGE_SIZE) as usize, page);
    }
    Ok(BootImage { entry, pages })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig::default()
    }

    #[test]
    fn builtin_guest_builds_an_image() {
        let img = build("built-in", BUILTIN_GUEST, &cfg(), 1_000_000).unwrap();
        assert!(img.entry >= abi::KERNEL_LOAD_GPA && img.entry < abi::TEST_AREA_GPA);
        assert!(img
            .pages
            .contains_key(&((abi::BOOT_INFO_GPA / PAGE_SIZE) as usize)));
        let pd0 = &img.pages[&((abi::PD_GPA / PAGE_SIZE) as usize)];
        assert_eq!(
            u64::from_le_bytes(pd0[8..16].try_into().unwrap()),
            (2 << 20) | 0x87
        );
    }

    #[test]
    fn ram_above_4_gib_is_mapped_and_told_to_the_guest() {
        let entry = |img: &BootImage, gpa: u64, i: usize| {
            let p = &img.pages[&((gpa / PAGE_SIZE) as usize)];
            u64::from_le_bytes(p[i * 8..i * 8 + 8].try_into().unwrap())
        };
        let mut c = cfg();
        c.mem = 8 << 30;
        let img = build("built-in", BUILTIN_GUEST, &c, 0).unwrap();
        // 3 GiB at 0, 5 GiB at 4 GiB: top 9 GiB, so PDPT entries 4..=8 point to five
        // more page directories, at the start of the test area.
        for gig in 4..9u64 {
            let pd = abi::TEST_AREA_GPA + (gig - 4) * PAGE_SIZE;
            assert_eq!(entry(&img, abi::PDPT_GPA, gig as usize), pd | 7);
            assert_eq!(entry(&img, pd, 0), (gig << 30) | 0x87);
            assert_eq!(entry(&img, pd, 511), (gig << 30) | (511 << 21) | 0x87);
        }
        assert_eq!(entry(&img, abi::PDPT_GPA, 9), 0);
        assert_eq!(entry(&img, abi::PML4_GPA, 1), 0, "one PDPT is enough");
        let info = boot_info(&c, 0);
        assert_eq!(info.test_base, abi::TEST_AREA_GPA + 5 * PAGE_SIZE);
        assert_eq!(info.test_size, (3 << 30) - info.test_base);
        assert_eq!((info.high_base, info.high_size), (4 << 30, 5 << 30));
        assert_eq!(info.test_page_gpa(info.test_size / PAGE_SIZE), 4 << 30);
        // 1 TiB reaches past 512 GiB: the second PDPT is used.
        c.mem = 1 << 40;
        let img = build("built-in", BUILTIN_GUEST, &c, 0).unwrap();
        assert_eq!(entry(&img, abi::PML4_GPA, 1), abi::PDPT_HIGH_GPA | 7);
        let pd512 = abi::TEST_AREA_GPA + 508 * PAGE_SIZE;
        assert_eq!(entry(&img, abi::PDPT_HIGH_GPA, 0), pd512 | 7);
        assert_eq!(entry(&img, pd512, 0), (512 << 30) | 0x87);
        assert_eq!(
            entry(&img, abi::PML4_GPA, 2),
            (abi::PDPT_HIGH_GPA + PAGE_SIZE) | 7
        );
    }

    #[test]
    fn bad_elves_are_refused() {
        let good = BUILTIN_GUEST;
        let mut arm = good.to_vec();
        arm[18] = 183; // EM_AARCH64
        let mut class32 = good.to_vec();
        class32[4] = 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            (
                "text",
                b"hello world, not an elf at all, padded to sixty-four bytes.....".to_vec(),
            ),
            ("truncated", good[..100].to_vec()),
            ("arm", arm),
            ("32-bit", class32),
        ];
        for (what, bytes) in cases {
            assert!(build(what, &bytes, &cfg(), 0).is_err(), "{what} accepted");
        }
    }
}
