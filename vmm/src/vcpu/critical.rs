//! The guest pages a vCPU cannot run without: its page tables, GDT, IDT, TSS and the
//! stacks event delivery writes. A missing page may be poisoned to get a stalled vCPU
//! back to user space, but if it is one of these the guest sees a #PF or a triple fault
//! instead, so they must be installed before the vCPU runs (at boot, and with a
//! migration's switch-over).
//!
//! Long-mode paging is walked with 4 or 5 levels (CR4.LA57). Legacy 32-bit and PAE
//! paging are not walked: only the CR3 page is given (ufvmm guests run in long mode).
//! Stack addresses are taken as linear (segment bases ignored), as in 64-bit mode.

use std::collections::{BTreeSet, HashSet};

use kvm_bindings::kvm_sregs;

/// Reads 8 bytes of guest-physical memory at an 8-byte-aligned address; None if outside
/// RAM or unavailable. It must not wait for a missing page: read the page source, not
/// the guest mapping.
pub type ReadU64<'a> = dyn FnMut(u64) -> Option<u64> + 'a;

/// Most pages [`critical_pages`] returns, so that a hostile guest cannot make the VMM
/// hold unbounded memory. Descriptor tables and stacks are collected first, then the
/// page tables; at the cap the set is incomplete.
pub const MAX_PAGES: usize = 1 << 20;

const PAGE: u64 = 4096;
/// Bits 12..51 of an entry or CR3: the physical address of a table or page.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const PRESENT: u64 = 1;
const PS: u64 = 1 << 7;
const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
/// Bytes of a 64-bit IDT vectors 0..=255 can reach (16-byte gates).
const IDT_SPAN: u64 = 256 * 16;
/// Bytes of a TSS the CPU can read: the I/O bitmap starts at a 16-bit offset and holds
/// 64 Ki ports, then an end byte.
const TSS_SPAN: u64 = 0x1_0000 + 0x2000 + 1;
/// Bytes event delivery pushes below a stack top: SS, RSP, RFLAGS, CS, RIP and an error
/// code (48) after aligning RSP down to 16 bytes (up to 15 more).
const FRAME: u64 = 64;

/// How the vCPU translates addresses: paging off (identity), long mode with CR3 and
/// 4 or 5 levels, or legacy 32-bit/PAE paging (not translated).
#[derive(Clone, Copy)]
enum Paging {
    Off,
    Long(u64, u32),
    Legacy,
}

impl Paging {
    fn of(s: &kvm_sregs) -> Paging {
        match (s.cr0 & CR0_PG != 0, s.efer & EFER_LMA != 0) {
            (false, _) => Paging::Off,
            (true, true) => Paging::Long(s.cr3, if s.cr4 & CR4_LA57 != 0 { 5 } else { 4 }),
            (true, false) => Paging::Legacy,
        }
    }

    fn translate(self, gva: u64, read: &mut ReadU64<'_>) -> Option<u64> {
        match self {
            Paging::Off => Some(gva),
            Paging::Long(cr3, levels) => translate(cr3, levels, gva, read),
            Paging::Legacy => None,
        }
    }
}

/// Translates `gva` through long-mode tables of `levels` levels (4, or 5 with LA57) at
/// `cr3`, honouring 1 GiB and 2 MiB pages. None if an entry is not present or cannot be
/// read. Access rights and reserved bits are not checked.
pub fn translate(cr3: u64, levels: u32, gva: u64, read_u64: &mut ReadU64<'_>) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let entry = read_u64(table + ((gva >> shift) & 511) * 8)?;
        if entry & PRESENT == 0 {
            return None;
        }
        // PS only means a leaf at the PDPT (1 GiB) and PD (2 MiB) levels.
        if level == 1 || (level <= 3 && entry & PS != 0) {
            let offset = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !offset) | (gva & offset));
        }
        table = entry & ADDR_MASK;
    }
    None
}

/// The page-aligned guest-physical addresses of the pages the vCPU's page-table walk
/// and event delivery need: every page-table page reachable from CR3 (not the pages they
/// map), the pages the GDT, IDT and TSS span, the top of the RSP0 and IST1..7 stacks
/// (64-bit TSS) or of ESP0 (32-bit TSS, paging off), and at CPL0 the top of the current
/// stack `rsp`.
///
/// Only pages `read_u64` can read are returned, at most [`MAX_PAGES`]. The walk reads
/// 512 entries per table, each table at most once per level.
pub fn critical_pages(sregs: &kvm_sregs, rsp: u64, read_u64: &mut ReadU64<'_>) -> BTreeSet<u64> {
    collect(sregs, rsp, read_u64, MAX_PAGES)
}

/// The set being built, with its cap.
struct Pages<'a> {
    set: BTreeSet<u64>,
    max: usize,
    read: &'a mut ReadU64<'a>,
}

impl Pages<'_> {
    /// Adds the page holding `gpa`; true if it is in the set (now or already), false if
    /// it is unreadable or the set is full.
    fn add(&mut self, gpa: u64) -> bool {
        let page = gpa & !(PAGE - 1);
        self.set.contains(&page)
            || (self.set.len() < self.max && (self.read)(page).is_some() && self.set.insert(page))
    }

    /// Adds the page `gva` maps to, if any.
    fn add_virt(&mut self, paging: Paging, gva: u64) {
        if let Some(gpa) = paging.translate(gva, self.read) {
            self.add(gpa);
        }
    }

    /// Adds every page `len` bytes (at least 1) from `base` span.
    fn add_range(&mut self, paging: Paging, base: u64, len: u64) {
        let count = ((base & (PAGE - 1)) + len.max(1) - 1) / PAGE + 1;
        for i in 0..count {
            self.add_virt(paging, (base & !(PAGE - 1)).wrapping_add(i * PAGE));
        }
    }

    /// Adds the pages a frame pushed below stack top `top` lands in (0: no stack).
    fn add_stack(&mut self, paging: Paging, top: u64) {
        if top != 0 {
            self.add_virt(paging, top.wrapping_sub(1));
            self.add_virt(paging, top.wrapping_sub(FRAME));
        }
    }

    /// Reads `bytes` (at most 8) little-endian bytes at `gva`, byte by byte: the value may
    /// be unaligned and cross into a page mapped elsewhere.
    fn read_virt(&mut self, paging: Paging, gva: u64, bytes: u64) -> Option<u64> {
        let mut value = 0;
        for i in 0..bytes {
            let gpa = paging.translate(gva.wrapping_add(i), self.read)?;
            let word = (self.read)(gpa & !7)?;
            value |= ((word >> ((gpa & 7) * 8)) & 0xff) << (i * 8);
        }
        Some(value)
    }

    /// Adds every page-table page reachable from `cr3`. Tables are keyed by page and
    /// level (a page reached at another level is read as that level's table), and only
    /// tables added to the capped set are queued, so the walk is bounded.
    fn walk(&mut self, cr3: u64, levels: u32) {
        let top = (cr3 & ADDR_MASK, levels);
        let mut todo: Vec<_> = self.add(top.0).then_some(top).into_iter().collect();
        let mut seen: HashSet<_> = todo.iter().copied().collect();
        while let Some((table, level)) = todo.pop() {
            for i in 0..512 {
                let Some(entry) = (self.read)(table + i * 8) else {
                    break;
                };
                if entry & PRESENT == 0 || (level <= 3 && entry & PS != 0) {
                    continue; // unused, or a leaf mapping data
                }
                let next = (entry & ADDR_MASK, level - 1);
                if seen.contains(&next) || !self.add(next.0) {
                    continue;
                }
                // A page table's entries map data pages: nothing below to walk.
                if next.1 > 1 {
                    seen.insert(next);
                    todo.push(next);
                }
            }
        }
    }
}

/// [`critical_pages`] with a cap of `max` pages.
fn collect(sregs: &kvm_sregs, rsp: u64, read: &mut ReadU64<'_>, max: usize) -> BTreeSet<u64> {
    let set = BTreeSet::new();
    let mut pages = Pages { set, max, read };
    let paging = Paging::of(sregs);
    let (gdt, idt, tss) = (sregs.gdt, sregs.idt, sregs.tr.base);
    pages.add_range(paging, gdt.base, u64::from(gdt.limit) + 1);
    pages.add_range(paging, idt.base, (u64::from(idt.limit) + 1).min(IDT_SPAN));
    pages.add_range(paging, tss, (u64::from(sregs.tr.limit) + 1).min(TSS_SPAN));
    if let Paging::Long(..) = paging {
        // RSP0 at offset 4, IST1..7 at 36, 44, ..., 84.
        for off in [4, 36, 44, 52, 60, 68, 76, 84] {
            if let Some(top) = pages.read_virt(paging, tss.wrapping_add(off), 8) {
                pages.add_stack(paging, top);
            }
        }
    } else if let Some(top) = pages.read_virt(paging, tss.wrapping_add(4), 4) {
        pages.add_stack(paging, top); // 32-bit TSS: ESP0
    }
    // At CPL0 an event's frame goes on the current stack (unless an IST is used).
    if sregs.cs.selector & 3 == 0 {
        pages.add_stack(paging, rsp);
    }
    match paging {
        Paging::Long(cr3, levels) => pages.walk(cr3, levels),
        Paging::Legacy => _ = pages.add(sregs.cr3 & 0xFFFF_F000),
        Paging::Off => {}
    }
    pages.set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi;

    const P: u64 = 0x7; // present, writable, user
    const V: u64 = 0xffff_8000_0000_0000; // PML4 index 256

    /// 8 MiB of guest RAM.
    struct Guest(Vec<u8>);

    impl Guest {
        fn new() -> Guest {
            Guest(vec![0; 8 << 20])
        }
        fn poke(&mut self, gpa: u64, bytes: &[u8]) {
            self.0[gpa as usize..][..bytes.len()].copy_from_slice(bytes);
        }
        fn set(&mut self, table: u64, index: u64, entry: u64) {
            self.poke(table + index * 8, &entry.to_le_bytes());
        }
        fn read(&self, gpa: u64) -> Option<u64> {
            assert_eq!(gpa % 8, 0, "unaligned read");
            let b = self.0.get(usize::try_from(gpa).ok()?..)?.get(..8)?;
            Some(u64::from_le_bytes(b.try_into().unwrap()))
        }
        fn run(&self, sregs: &kvm_sregs, rsp: u64) -> BTreeSet<u64> {
            critical_pages(sregs, rsp, &mut |gpa| self.read(gpa))
        }
    }

    /// Long mode at CPL `cs & 3`, with GDT, IDT and TSS at `tables` (limits 0).
    fn long_mode(cr3: u64, cs: u16, tables: u64) -> kvm_sregs {
        let mut s = kvm_sregs {
            cr0: 0x8005_0033,
            cr3,
            cr4: 0x620,
            efer: 0x500,
            ..Default::default()
        };
        (s.cs.selector, s.gdt.base, s.idt.base, s.tr.base) = (cs, tables, tables, tables);
        s
    }

    fn pages(list: &[u64]) -> BTreeSet<u64> {
        list.iter().copied().collect()
    }

    #[test]
    fn builtin_boot_layout() {
        let cfg = crate::config::VmConfig::default();
        let img = crate::boot::build("built-in", crate::boot::BUILTIN_GUEST, &cfg, 1_000_000);
        let mut g = Guest::new();
        for (index, bytes) in img.unwrap().pages {
            g.poke(index as u64 * abi::PAGE_SIZE, &bytes);
        }
        // setup::configure's registers; GDT, IDT and TR keep KVM's reset values.
        let mut s = long_mode(abi::PML4_GPA, 0x08, 0);
        (s.gdt.limit, s.idt.limit, s.tr.limit) = (0xffff, 0xffff, 0xffff);
        let rsp = abi::kernel_stack_top(0) - 8;
        // PML4, PDPT, the PDs (2 MiB leaves), pages 0..16 for GDT and TSS, the stack.
        let mut want = pages(&[abi::PML4_GPA, abi::PDPT_GPA, (rsp - 1) & !0xfff]);
        want.extend((0..abi::PD_COUNT).map(|pd| abi::PD_GPA + pd * abi::PAGE_SIZE));
        want.extend((0..16).map(|p| p * abi::PAGE_SIZE));
        assert_eq!(g.run(&s, rsp), want);
    }

    #[test]
    fn four_k_pages_descriptor_tables_and_stacks() {
        // PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000 mapping V + i * 4 KiB.
        let mut g = Guest::new();
        g.set(0x1000, 256, 0x2000 | P);
        g.set(0x1000, 1, 0x5000); // not present
        g.set(0x2000, 0, 0x3000 | P);
        g.set(0x2000, 1, 0x4000_0000 | P | PS); // 1 GiB leaf
        g.set(0x3000, 0, 0x4000 | P);
        g.set(0x3000, 1, 0x60_0000 | P | PS); // 2 MiB leaf, not walked
        let tables = [0x1000, 0x2000, 0x3000, 0x4000];
        // GDT, IDT, TSS (two pages), RSP0, IST1 (two pages), then the CPL0 stack.
        let mapped = [0x10, 0x20, 0x30, 0x31, 0x50, 0x40, 0x41, 0x52, 0x53].map(|p| p << 16);
        for (i, gpa) in [0, 1, 2, 3, 8, 16, 17, 19, 20].into_iter().zip(mapped) {
            g.set(0x4000, i, gpa | P);
        }
        // TSS at V + 0x2ff8: RSP0 (offset 4) is unaligned and crosses into page 3.
        let rsp0 = (V + 9 * 4096).to_le_bytes();
        g.poke(0x30_0ffc, &rsp0[..4]);
        g.poke(0x31_0000, &rsp0[4..]);
        g.poke(0x31_0000 + 36 - 8, &(V + 17 * 4096 + 32).to_le_bytes()); // IST1
        let mut read = |gpa| g.read(gpa);
        assert_eq!(translate(0x1000, 4, V + 0x2ffc, &mut read), Some(0x30_0ffc));
        let big = translate(0x1000, 4, V + (3 << 20) + 5, &mut read);
        assert_eq!(big, Some(0x70_0005));

        let sregs = |cs| {
            let mut s = long_mode(0x1000, cs, V);
            (s.gdt.limit, s.idt.limit, s.tr.limit) = (0x7f, 0xfff, 0x67);
            (s.idt.base, s.tr.base) = (V + 0x1000, V + 0x2ff8);
            s
        };
        let rsp = V + 20 * 4096 + 0x20; // frame spans pages 19 and 20
        let cpl3 = pages(&[&tables[..], &mapped[..7]].concat());
        assert_eq!(g.run(&sregs(0x33), rsp), cpl3);
        assert_eq!(
            g.run(&sregs(0x08), rsp),
            pages(&[&tables[..], &mapped].concat())
        );
        let mut capped = |gpa| g.read(gpa);
        assert_eq!(collect(&sregs(0x33), 0, &mut capped, 3).len(), 3);
    }

    #[test]
    fn table_loop_terminates() {
        let mut g = Guest::new();
        g.set(0x1000, 0, 0x1000 | P); // PML4 -> itself
        g.set(0x1000, 1, 0x2000 | P);
        g.set(0x2000, 0, 0x1000 | P); // PDPT -> PML4
        let s = long_mode(0x1000, 0x33, 0x7000_0000_0000); // tables unmapped
        assert_eq!(g.run(&s, 0), pages(&[0x1000, 0x2000]));
    }

    #[test]
    fn entries_outside_ram_are_skipped() {
        let mut g = Guest::new();
        g.set(0x1000, 0, 0x1_0000_0000 | P);
        g.set(0x1000, 1, 0x2000 | P);
        g.set(0x2000, 0, 0x7f_f000 | P); // last page of RAM
        g.set(0x7f_f000, 0, 0x80_0000 | P); // first page past RAM
        g.set(0x7f_f000, 1, 0x5000 | P);
        g.set(0x5000, 0, 0x9000_0000 | P);
        let s = long_mode(0x1000, 0x33, (1 << 39) | (1 << 21)); // tables past RAM
        assert_eq!(g.run(&s, 0), pages(&[0x1000, 0x2000, 0x5000, 0x7f_f000]));
    }

    #[test]
    fn paging_off_is_identity() {
        let mut g = Guest::new();
        g.poke(0x5004, &0x9000u32.to_le_bytes()); // ESP0
        g.poke(0x5008, &0x10u32.to_le_bytes()); // SS0
        let mut s = kvm_sregs {
            cr0: 0x11,
            cr3: 0x4000,
            ..Default::default()
        };
        (s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit) = (0x1000, 0x17, 0x2ff0, 0x1f);
        (s.tr.base, s.tr.limit) = (0x5000, 0x67);
        let want = [0x1000, 0x2000, 0x3000, 0x5000, 0x8000, 0x6_f000, 0x7_0000];
        assert_eq!(g.run(&s, 0x7_0010), pages(&want));
    }
}
