//! Where guest RAM lies: the one place that maps a guest-physical address to a page
//! index and back.
//!
//! RAM is one host mapping of `size` bytes. Its first `min(size, 3 GiB)` bytes are
//! the low region at GPA 0; the rest is the high region at 4 GiB (`abi::HIGH_RAM_GPA`),
//! so that no RAM lies in the 32-bit MMIO hole. A page's *index* is its offset in the
//! host mapping / the RAM page size ([`RamLayout::page_size`]: 4 KiB, or 2 MiB with
//! `--hugepages`): the page-state map, the dirty bitmaps, the fault loop, the sources
//! and the migration wire all count pages that way, linearly, whatever the GPA. An
//! image file and a memory dump stay byte-linear. Boot structures and guest page
//! tables are 4 KiB things whatever the RAM page size ([`crate::abi::PAGE_SIZE`]).

use crate::abi::{HIGH_RAM_GPA, LOW_RAM_MAX, PAGE_SIZE};

/// One guest-physical region of RAM, as KVM gets it as a memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Its first guest-physical address.
    pub gpa: u64,
    /// Its offset in the host mapping (its first page index × the page size).
    pub offset: u64,
    /// Bytes in it.
    pub len: u64,
}

/// The RAM layout of a VM of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamLayout {
    size: u64,
    low: u64,
    page_size: u64,
}

/// The page size of RAM backed by 2 MiB huge pages (`--hugepages`).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

impl RamLayout {
    /// The layout of `size` bytes of RAM in 4 KiB pages.
    pub fn new(size: u64) -> Self {
        Self::with_page_size(size, PAGE_SIZE)
    }

    /// The layout of `size` bytes of RAM in pages of `page_size` bytes (a power of two
    /// that divides `size` and 3 GiB, the size of the low region: 4 KiB or 2 MiB).
    pub fn with_page_size(size: u64, page_size: u64) -> Self {
        RamLayout {
            size,
            low: size.min(LOW_RAM_MAX),
            page_size,
        }
    }

    /// Bytes in one page of RAM: the unit of the page index.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Pages of RAM.
    pub fn pages(&self) -> usize {
        (self.size / self.page_size) as usize
    }

    /// The first address of the page holding `gpa` (both regions start on a page
    /// boundary, so this is the page's GPA whenever `gpa` is RAM).
    pub fn page_base(&self, gpa: u64) -> u64 {
        gpa & !(self.page_size - 1)
    }

    /// Bytes of RAM, both regions.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes at GPA 0.
    pub fn low_size(&self) -> u64 {
        self.low
    }

    /// Bytes at [`HIGH_RAM_GPA`] (0 for none).
    pub fn high_size(&self) -> u64 {
        self.size - self.low
    }

    /// The regions, low first; the high one only if it has bytes.
    pub fn regions(&self) -> impl Iterator<Item = Region> {
        let low = Region {
            gpa: 0,
            offset: 0,
            len: self.low,
        };
        let high = Region {
            gpa: HIGH_RAM_GPA,
            offset: self.low,
            len: self.high_size(),
        };
        [low, high].into_iter().filter(|r| r.len > 0)
    }

    /// One past the highest guest-physical address of RAM.
    pub fn top_gpa(&self) -> u64 {
        match self.high_size() {
            0 => self.low,
            h => HIGH_RAM_GPA + h,
        }
    }

    /// Offset in the host mapping of `gpa..gpa+len`, if that lies wholly in one
    /// region (and `len > 0`).
    pub fn offset_of(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len).filter(|_| len > 0)?;
        self.regions()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.len)
            .map(|r| r.offset + (gpa - r.gpa))
    }

    /// Guest-physical address of the byte at `offset` in the host mapping (`offset`
    /// below [`RamLayout::size`]).
    pub fn gpa_of(&self, offset: u64) -> u64 {
        if offset < self.low {
            offset
        } else {
            HIGH_RAM_GPA + (offset - self.low)
        }
    }

    /// Index of the page holding `gpa`, if it is RAM.
    pub fn page_of(&self, gpa: u64) -> Option<usize> {
        self.offset_of(gpa, 1)
            .map(|o| (o / self.page_size) as usize)
    }

    /// Guest-physical address of page `idx` (any index; past the end it is simply
    /// not RAM).
    pub fn page_gpa(&self, idx: usize) -> u64 {
        self.gpa_of(idx as u64 * self.page_size)
    }

    /// A bitmap of every page of RAM in the unit, all clear.
    pub fn page_bitmap(&self) -> Vec<u64> {
        vec![0; self.pages().div_ceil(64)]
    }

    /// ORs `log`, a KVM dirty log of `region` (one bit per 4 KiB, whatever the page
    /// size), into `bits` (one bit per page of the unit): a page is dirty if any 4 KiB
    /// of it is. Bits past the region or the bitmap are ignored.
    pub fn fold_dirty_log(&self, region: &Region, log: &[u64], bits: &mut [u64]) {
        let first = region.offset / PAGE_SIZE;
        let per = self.page_size / PAGE_SIZE;
        let small = (region.len / PAGE_SIZE).div_ceil(64) as usize;
        let log = &log[..log.len().min(small)];
        if per == 1 && first.is_multiple_of(64) {
            // 4 KiB pages: the log's words are the bitmap's (regions are 2 MiB multiples).
            let at = (first / 64) as usize;
            for (b, w) in bits.iter_mut().skip(at).zip(log) {
                *b |= w;
            }
            return;
        }
        for (w, &word) in log.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let i = w as u64 * 64 + u64::from(word.trailing_zeros());
                word &= word - 1;
                let idx = ((first + i) / per) as usize;
                if let Some(x) = bits.get_mut(idx / 64) {
                    *x |= 1 << (idx % 64);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_below_3_gib_is_one_region_at_0() {
        let l = RamLayout::new(256 << 20);
        assert_eq!(l.regions().count(), 1);
        assert_eq!(l.page_of(0x0234_5678), Some(0x2345));
        assert_eq!(l.page_gpa(0x2345), 0x0234_5000);
        assert_eq!(l.page_of(256 << 20), None);
        assert_eq!(l.top_gpa(), 256 << 20);
    }

    #[test]
    fn ram_above_3_gib_goes_to_4_gib_and_indexes_stay_linear() {
        let l = RamLayout::new(5 << 30);
        let r: Vec<Region> = l.regions().collect();
        assert_eq!(
            r,
            vec![
                Region {
                    gpa: 0,
                    offset: 0,
                    len: 3 << 30
                },
                Region {
                    gpa: 4 << 30,
                    offset: 3 << 30,
                    len: 2 << 30
                },
            ]
        );
        let last_low = ((3u64 << 30) / PAGE_SIZE - 1) as usize;
        assert_eq!(l.page_of((3 << 30) - 1), Some(last_low));
        assert_eq!(l.page_of(3 << 30), None, "the hole is no RAM");
        assert_eq!(l.page_of(abi_lapic()), None);
        assert_eq!(l.page_of(4 << 30), Some(last_low + 1));
        assert_eq!(l.page_gpa(last_low + 1), 4 << 30);
        assert_eq!(l.top_gpa(), 6 << 30);
        assert_eq!(l.page_of(6 << 30), None);
        // An access may not straddle the end of a region.
        assert_eq!(l.offset_of((3 << 30) - 8, 16), None);
        assert_eq!(l.offset_of((4 << 30) + 8, 8), Some((3 << 30) + 8));
        for idx in [0, 1, last_low, last_low + 1, last_low + 77, (5 << 18) - 1] {
            assert_eq!(l.page_of(l.page_gpa(idx)), Some(idx));
        }
    }

    #[test]
    fn huge_pages_index_by_2_mib_on_both_sides_of_the_hole() {
        let l = RamLayout::with_page_size(5 << 30, HUGE_PAGE_SIZE);
        assert_eq!(l.pages(), 2560);
        assert_eq!(l.page_of(0x0234_5678), Some(0x11));
        assert_eq!(l.page_base(0x0234_5678), 0x0220_0000);
        assert_eq!(l.page_of(4 << 30), Some(1536));
        assert_eq!(l.page_gpa(1537), (4 << 30) + HUGE_PAGE_SIZE);
        for idx in [0, 1535, 1536, 2559] {
            assert_eq!(l.page_of(l.page_gpa(idx)), Some(idx));
        }
    }

    #[test]
    fn a_dirty_4_kib_makes_its_huge_page_dirty_on_both_sides_of_the_hole() {
        let l = RamLayout::with_page_size(5 << 30, HUGE_PAGE_SIZE);
        let r: Vec<Region> = l.regions().collect();
        let mut bits = l.page_bitmap();
        assert_eq!(bits.len(), 40);
        // Low region: 4 KiB pages 0 and 511 (both in huge page 0), 512 (page 1) and the
        // last 4 KiB below 3 GiB (page 1535).
        let mut low = vec![0u64; ((3u64 << 30) / PAGE_SIZE / 64) as usize];
        low[0] = 1;
        low[7] = 1 << 63;
        low[8] = 1;
        *low.last_mut().unwrap() = 1 << 63;
        l.fold_dirty_log(&r[0], &low, &mut bits);
        // High region: its 4 KiB page 513 is in its second huge page (index 1537).
        let mut high = vec![0u64; ((2u64 << 30) / PAGE_SIZE / 64) as usize];
        high[8] = 2;
        l.fold_dirty_log(&r[1], &high, &mut bits);
        let dirty: Vec<usize> = (0..l.pages())
            .filter(|&i| bits[i / 64] >> (i % 64) & 1 == 1)
            .collect();
        assert_eq!(dirty, [0, 1, 1535, 1537]);
        // In 4 KiB pages the log is the bitmap, the high region's after the low one's.
        let s = RamLayout::new(5 << 30);
        let mut bits = s.page_bitmap();
        s.fold_dirty_log(&r[0], &low, &mut bits);
        s.fold_dirty_log(&r[1], &high, &mut bits);
        let last_low = ((3u64 << 30) / PAGE_SIZE) as usize - 1;
        let dirty: Vec<usize> = (0..s.pages())
            .filter(|&i| bits[i / 64] >> (i % 64) & 1 == 1)
            .collect();
        assert_eq!(dirty, [0, 511, 512, last_low, last_low + 1 + 513]);
    }

    fn abi_lapic() -> u64 {
        crate::abi::LAPIC_GPA
    }
}
