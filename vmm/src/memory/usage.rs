//! What the host has and what this process uses: `/proc/meminfo`, `/proc/self/statm`
//! and `/proc/self/smaps`, for the `--mem` bound and the report's memory figures.

/// The host's RAM (`MemTotal` in `/proc/meminfo`), or None if it cannot be read.
pub fn host_mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&text, "MemTotal:")
}

/// The first `NAME: N kB` line named `name` in `text`, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// This process's resident set in bytes (`/proc/self/statm`).
pub fn process_rss() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages.checked_mul(u64::try_from(page).ok()?)
}

/// Resident bytes of the mappings that overlap `start..start+len`
/// (`/proc/self/smaps`): the guest RAM mapping's own share of the RSS. Not `mincore`,
/// which counts the shared zero page that `UFFDIO_ZEROPAGE` maps, and the RSS does not.
/// Without userfaultfd the kernel may merge the mapping with an anonymous neighbour;
/// that neighbour's resident pages then count too (seen: 132 KiB of it).
pub fn resident_in(start: u64, len: u64) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let end = start.checked_add(len)?;
    let mut inside = false;
    let mut total = 0u64;
    for line in text.lines() {
        // A mapping's header: "lo-hi perms offset dev inode [path]".
        if let Some((lo, hi)) = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
            .and_then(|(lo, hi)| {
                Some((
                    u64::from_str_radix(lo, 16).ok()?,
                    u64::from_str_radix(hi, 16).ok()?,
                ))
            })
        {
            inside = lo < end && hi > start;
            continue;
        }
        // Huge pages are not in `Rss`: their own line counts them.
        for field in ["Rss:", "Private_Hugetlb:"] {
            if inside && line.starts_with(field) {
                total += kib_field(line, field)?;
            }
        }
    }
    Some(total)
}

/// The host's pool of 2 MiB huge pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugePool {
    /// Pages in the pool (`nr_hugepages`).
    pub total: u64,
    /// Pages a new mapping can still reserve: free minus those reserved already.
    pub usable: u64,
}

const HUGE_2M_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// The 2 MiB huge-page pool (sysfs, which counts that size alone), or None if this
/// kernel has none.
pub fn huge_pool() -> Option<HugePool> {
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{HUGE_2M_SYSFS}/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let free = read("free_hugepages")?;
    let rsvd = read("resv_hugepages")?;
    Some(HugePool {
        total: read("nr_hugepages")?,
        usable: free.saturating_sub(rsvd),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_has_ram_and_this_process_a_resident_set() {
        assert!(host_mem_total().is_some_and(|m| m >= 64 << 20));
        assert!(process_rss().is_some_and(|r| r > 0));
        assert_eq!(kib_field("Rss:      12 kB\n", "Rss:"), Some(12 * 1024));
    }

    #[test]
    fn a_touched_mapping_is_resident_and_counted_alone() {
        let len = 8usize << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the first 2 MiB of the mapping above, writable.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 1, 2 << 20) };
        let r = resident_in(p as u64, len as u64).expect("smaps");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, len) };
        // A merged neighbour may add a little.
        assert!((2 << 20..=3 << 20).contains(&r), "resident {r}");
    }
}
