//! RAM above 4 GiB and many vCPUs, on real KVM: an 8 GiB guest whose sparse touch and
//! verify cover its high region, its image file in page-index order, the report's
//! memory figures, and 64 vCPUs on this 2-core machine.

mod common;
use common::*;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use serde_json::Value;
use ufvmm::abi;

const LIMIT: Duration = Duration::from_secs(120);
const GIB: u64 = 1 << 30;

/// The pages vCPU `idx` of `nr` works on with `stride`, as the guest picks them (its
/// slice of the test area, every `stride`-th page), as GPAs.
fn checked_pages(mem: u64, nr: u64, idx: u64, stride: u64) -> Vec<u64> {
    let layout = ufvmm::memory::RamLayout::new(mem);
    let test_base = abi::TEST_AREA_GPA + ufvmm::boot::high_pds(mem) * abi::PAGE_SIZE;
    let low = (layout.low_size() - test_base) / abi::PAGE_SIZE;
    let total = low + layout.high_size() / abi::PAGE_SIZE;
    let (first, end) = (idx * total / nr, (idx + 1) * total / nr);
    (first..end)
        .step_by(stride as usize)
        .map(|p| {
            if p < low {
                test_base + p * abi::PAGE_SIZE
            } else {
                abi::HIGH_RAM_GPA + (p - low) * abi::PAGE_SIZE
            }
        })
        .collect()
}

/// Every vCPU reported `pages[i]` pages and no mismatch.
fn assert_pages(rep: &Value, pages: &[usize]) {
    let results = rep["guest"]["results"].as_array().expect("results");
    assert_eq!(results.len(), pages.len(), "{rep}");
    for r in results {
        let i = r["vcpu"].as_u64().expect("vcpu") as usize;
        assert_eq!(r["pages"], pages[i] as u64, "vcpu {i}: {rep}");
        assert_eq!(r["mismatches"], 0, "vcpu {i}: {rep}");
    }
}

#[test]
fn an_8_gib_guest_touches_and_verifies_pages_above_4_gib() {
    if !kvm_or_skip("an_8_gib_guest_touches_and_verifies_pages_above_4_gib") {
        return;
    }
    let mem = 8 * GIB;
    let dir = scratch();
    let report = path_in(&dir, "r.json");
    let r = run(
        &[
            "--mem",
            "8G",
            "--vcpus",
            "2",
            "--workload",
            "verify:stride=512",
            "--report",
            s(&report),
        ],
        LIMIT,
    );
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    let rep = read_report(&report);
    let want: Vec<Vec<u64>> = (0..2).map(|i| checked_pages(mem, 2, i, 512)).collect();
    assert!(
        want[1].iter().all(|&g| g >= abi::HIGH_RAM_GPA),
        "vcpu 1 works above 4 GiB"
    );
    assert_pages(&rep, &[want[0].len(), want[1].len()]);
    let m = &rep["memory"];
    assert_eq!(m["ram_bytes"], mem, "{m}");
    assert_eq!(m["regions"][1]["gpa"], abi::HIGH_RAM_GPA, "{m}");
    assert_eq!(m["regions"][1]["bytes"], 5 * GIB, "{m}");
    // 1 byte of state and poison marker per page, 1 dirty bit: 288 KiB per GiB.
    let per_gib = m["vmm_bytes_per_gib"].as_u64().expect("vmm_bytes_per_gib");
    assert!((256 << 10..=1 << 20).contains(&per_gib), "{m}");
    let beyond = m["rss_beyond_ram_bytes"]
        .as_u64()
        .expect("rss_beyond_ram_bytes");
    assert!(beyond <= 32 << 20, "RSS beyond guest RAM at 8 GiB: {m}");
    // Every page the guest verified is resident (and little else of its RAM).
    let guest = m["guest_resident_bytes"].as_u64().expect("guest resident");
    let touched = (want[0].len() + want[1].len()) as u64 * abi::PAGE_SIZE;
    assert!(
        (touched..=touched + (64 << 20)).contains(&guest),
        "{touched}: {m}"
    );
}

/// An image file is `--mem` bytes in page-index order: the byte at file offset
/// 3 GiB is GPA 4 GiB. The guest's check of a pattern written there by that rule
/// finds it, on every page it checks, in both regions.
#[test]
fn an_image_above_3_gib_is_read_in_page_index_order() {
    if !kvm_or_skip("an_image_above_3_gib_is_read_in_page_index_order") {
        return;
    }
    let mem = 8 * GIB;
    let seed = 77;
    let dir = scratch();
    let img = path_in(&dir, "ram.img");
    let f = std::fs::File::create(&img).expect("image");
    f.set_len(mem).expect("a sparse 8 GiB image");
    let layout = ufvmm::memory::RamLayout::new(mem);
    let mut pages = Vec::new();
    for i in 0..2 {
        let gpas = checked_pages(mem, 2, i, 512);
        for &gpa in &gpas {
            let idx = layout.page_of(gpa).expect("RAM");
            let word = abi::verify_pattern(gpa, seed).to_le_bytes();
            f.write_all_at(&word, idx as u64 * abi::PAGE_SIZE)
                .expect("write the pattern");
        }
        pages.push(gpas.len());
    }
    drop(f);
    let source = format!("image:{}", s(&img));
    let workload = format!("verify:phase=check,words=1,stride=512,seed={seed}");
    let report = path_in(&dir, "r.json");
    let r = run(
        &[
            "--mem",
            "8G",
            "--vcpus",
            "2",
            "--source",
            &source,
            "--workload",
            &workload,
            "--report",
            s(&report),
        ],
        LIMIT,
    );
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    assert_pages(&read_report(&report), &pages);
}

#[test]
fn sixty_four_vcpus_finish_a_workload_on_two_cores() {
    if !kvm_or_skip("sixty_four_vcpus_finish_a_workload_on_two_cores") {
        return;
    }
    let dir = scratch();
    let report = path_in(&dir, "r.json");
    let r = run(
        &[
            "--mem",
            "64M",
            "--vcpus",
            "64",
            "--workload",
            "touch",
            "--report",
            s(&report),
        ],
        LIMIT,
    );
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    let rep = read_report(&report);
    let total = (64 << 20) / abi::PAGE_SIZE - abi::TEST_AREA_GPA / abi::PAGE_SIZE;
    let pages: Vec<usize> = (0..64u64)
        .map(|i| ((i + 1) * total / 64 - i * total / 64) as usize)
        .collect();
    assert_pages(&rep, &pages);
    assert_eq!(rep["vcpus"].as_array().map(Vec::len), Some(64), "{rep}");
}

/// A 5 GiB guest migrates in postcopy: its verify rounds on the destination check, on
/// pages in both regions, the patterns the source wrote, so every page that came over
/// (asked for urgently, streamed or sent with the switch-over) landed at its GPA. The
/// background stream of 1.3 M pages takes longer than this test (about 20 s here), so
/// the destination's guest ends first; its verdict is what is judged.
#[test]
fn a_5_gib_guest_migrates_with_no_mismatch_above_4_gib() {
    if !kvm_or_skip("a_5_gib_guest_migrates_with_no_mismatch_above_4_gib") {
        return;
    }
    let mem = 5 * GIB;
    let dest = common::migration::Dest::start();
    let to = format!("127.0.0.1:{}", dest.l.port);
    let src = spawn_run(&[
        "--mem",
        "5G",
        "--workload",
        "verify:seconds=3,stride=512",
        "--migrate-to",
        &to,
        "--migrate-at",
        "1s",
    ]);
    let (d, rep) = dest.finish();
    // The source may still be streaming, or reconnecting to a destination that ended:
    // its verdict is not this test's.
    drop(src);
    assert_eq!(d.code(), Some(0), "destination: {}", d.explain());
    let want: Vec<Vec<u64>> = (0..2).map(|i| checked_pages(mem, 2, i, 512)).collect();
    assert!(want[1].iter().any(|&g| g >= abi::HIGH_RAM_GPA));
    assert_pages(&rep, &[want[0].len(), want[1].len()]);
    let m = &rep["migration"];
    assert_eq!(m["pages"]["total"], mem / abi::PAGE_SIZE, "{m}");
    assert!(m["pages"]["urgent"].as_u64().unwrap_or(0) > 0, "{m}");
    assert_eq!(m["bad_frames"], 0, "{m}");
    assert_eq!(
        rep["memory"]["regions"][1]["gpa"],
        abi::HIGH_RAM_GPA,
        "{rep}"
    );
}
