//! `--hugepages`: guest RAM in 2 MiB hugetlb pages, served 2 MiB at a time, from the
//! same binary as 4 KiB pages.
//!
//! The tests need a pool of huge pages. As root they raise `/proc/sys/vm/nr_hugepages`
//! to what they need (never lower it) and put the old value back at the end; the
//! file's tests take one lock for that. Without root, or when the pool cannot grow,
//! they skip and say so, except under `CI=true` with `/dev/kvm` there and root, where
//! that is a failure.

mod common;
use common::migration::{assert_guest_stayed_saying, proxy, source, Dest};
use common::*;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);
const HUGE: u64 = 2 << 20;
const NR: &str = "/proc/sys/vm/nr_hugepages";
const SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Serializes the tests of this file around the pool.
static POOL: Mutex<()> = Mutex::new(());

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Huge pages a new mapping can still reserve.
fn usable() -> u64 {
    let free = read_u64(&format!("{SYSFS}/free_hugepages")).unwrap_or(0);
    let rsvd = read_u64(&format!("{SYSFS}/resv_hugepages")).unwrap_or(0);
    free.saturating_sub(rsvd)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// The pool, held for one test; puts `nr_hugepages` back when dropped, if this test
/// raised it and nobody changed it since (another process on the machine may have
/// raised it further: that is never undone).
struct Pool {
    old: u64,
    raised_to: Option<u64>,
    _lock: MutexGuard<'static, ()>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.raised_to.is_some() && read_u64(NR) == self.raised_to {
            let _ = std::fs::write(NR, self.old.to_string());
        }
    }
}

/// Skips (or fails under CI with KVM and root) with `why`.
fn cannot(test: &str, why: &str) -> Option<Pool> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if ci && is_root() && std::path::Path::new("/dev/kvm").exists() {
        panic!("{test}: {why}, and CI=true with /dev/kvm and root");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// Locks the pool and makes sure `need` huge pages are usable, raising the pool if
/// it must; `None` if the test is skipped.
fn pool_with(test: &str, need: u64) -> Option<Pool> {
    if !kvm_or_skip(test) {
        return None;
    }
    let lock = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(old) = read_u64(NR) else {
        return cannot(test, "no /proc/sys/vm/nr_hugepages");
    };
    let mut pool = Pool {
        old,
        raised_to: None,
        _lock: lock,
    };
    let have = usable();
    if have < need {
        if !is_root() {
            return cannot(test, "not root: cannot raise /proc/sys/vm/nr_hugepages");
        }
        let want = old + (need - have);
        if std::fs::write(NR, want.to_string()).is_err() {
            return cannot(test, "cannot write /proc/sys/vm/nr_hugepages");
        }
        // What the kernel made of it (it may grow the pool less than asked).
        pool.raised_to = read_u64(NR);
        if usable() < need {
            // The kernel found fewer free 2 MiB blocks than asked (fragmented RAM).
            return cannot(test, &format!("the pool did not grow to {need} free pages"));
        }
    }
    Some(pool)
}

/// A report's memory and pages objects for a `--hugepages` run of `mem` bytes.
fn assert_huge_report(rep: &serde_json::Value, mem: u64) {
    assert_eq!(rep["config"]["hugepages"], true, "{rep}");
    assert_eq!(rep["memory"]["page_size_bytes"], HUGE, "{rep}");
    assert_eq!(rep["pages"]["total"], mem / HUGE, "{rep}");
}

#[test]
fn a_zero_source_guest_verifies_its_pages_served_2_mib_at_a_time_in_both_modes() {
    let test = "a_zero_source_guest_verifies_its_pages_served_2_mib_at_a_time";
    let mem = 64u64 << 20;
    let Some(_pool) = pool_with(test, mem / HUGE) else {
        return;
    };
    for mode in ["user", "kernel"] {
        let dir = scratch();
        let report = path_in(&dir, "r.json");
        let r = run(
            &[
                "--mem",
                "64M",
                "--hugepages",
                "--mode",
                mode,
                "--workload",
                "verify:seed=3",
                "--report",
                s(&report),
            ],
            LIMIT,
        );
        assert_eq!(r.code(), Some(0), "{mode}: {}", r.explain());
        let rep = read_report(&report);
        assert_huge_report(&rep, mem);
        let pages = &rep["pages"];
        let served = pages["served"].as_u64().unwrap();
        let critical = pages["critical"].as_u64().unwrap();
        // 32 pages of 2 MiB: the guest touches its test area (all but the image's
        // first 2 MiB, and a page or two it may not reach), each page once.
        assert!(
            (28..=32).contains(&(served + critical)),
            "{mode}: {served} served + {critical} critical of 32: {rep}"
        );
        assert_eq!(pages["lost"], 0, "{rep}");
        for res in rep["guest"]["results"].as_array().unwrap() {
            assert_eq!(res["mismatches"], 0, "{mode}: {rep}");
            assert_eq!(
                res["pages"], 7680,
                "{mode}: the guest counts 4 KiB pages: {rep}"
            );
        }
        // One fault per 2 MiB page, not per 4 KiB: far fewer than the 7680 touched.
        for v in rep["vcpus"].as_array().unwrap() {
            assert!(v["faults"].as_u64().unwrap() <= 40, "{mode}: {rep}");
        }
    }
    // The same binary in 4 KiB pages.
    let rep = report_of(&["--mem", "64M", "--workload", "verify:seed=3"], LIMIT);
    assert_eq!(rep["config"]["hugepages"], false, "{rep}");
    assert_eq!(rep["memory"]["page_size_bytes"], 4096, "{rep}");
    assert!(rep["pages"]["served"].as_u64().unwrap() > 15_000, "{rep}");
}

#[test]
fn an_image_written_in_huge_pages_is_read_back_in_huge_and_in_small_pages() {
    let test = "an_image_written_in_huge_pages_is_read_back";
    let Some(_pool) = pool_with(test, 32) else {
        return;
    };
    let dir = scratch();
    let img = path_in(&dir, "mem.img");
    let report = path_in(&dir, "r.json");
    let w = run(
        &[
            "--mem",
            "64M",
            "--hugepages",
            "--workload",
            "verify:seed=11,phase=write",
            "--dump-memory",
            s(&img),
        ],
        LIMIT,
    );
    assert_eq!(w.code(), Some(0), "{}", w.explain());
    let source = format!("image:{}", s(&img));
    for huge in [true, false] {
        let mut args = vec![
            "--mem",
            "64M",
            "--workload",
            "verify:seed=11,phase=check",
            "--source",
            &source,
            "--report",
            s(&report),
        ];
        if huge {
            args.push("--hugepages");
        }
        let r = run(&args, LIMIT);
        assert_eq!(r.code(), Some(0), "huge {huge}: {}", r.explain());
        let rep = read_report(&report);
        for res in rep["guest"]["results"].as_array().unwrap() {
            assert_eq!(res["mismatches"], 0, "huge {huge}: {rep}");
        }
        if huge {
            assert_huge_report(&rep, 64 << 20);
            // Image pages carry the pattern: served as bytes, not zeros.
            let p = &rep["pages"];
            assert!(p["served"].as_u64().unwrap() >= 28, "{rep}");
            assert!(p["zero"].as_u64().unwrap() <= 2, "{rep}");
        }
    }
    // The check can fail: another seed finds every word wrong.
    let r = run(
        &[
            "--mem",
            "64M",
            "--hugepages",
            "--workload",
            "verify:seed=12,phase=check",
            "--source",
            &source,
        ],
        LIMIT,
    );
    assert_ne!(r.code(), Some(0), "a wrong seed passed: {}", r.explain());
}

#[test]
fn a_pool_too_small_is_one_line_that_says_how_to_reserve_pages() {
    let test = "a_pool_too_small_is_one_line";
    let Some(_pool) = pool_with(test, 0) else {
        return;
    };
    // More than is free (the pool is only ever raised, never lowered, here).
    let need = usable() + 8;
    let mem = format!("{}M", need * 2);
    let t = Instant::now();
    let r = run_raw(&["run", "--mem", &mem, "--hugepages"], LIMIT);
    assert_eq!(r.code(), Some(1), "{}", r.explain());
    assert!(t.elapsed() < Duration::from_secs(10), "{}", r.explain());
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.explain());
    assert!(
        r.stderr
            .contains(&format!("needs {need} huge pages of 2 MiB"))
            && r.stderr.contains("/proc/sys/vm/nr_hugepages")
            && r.stderr.contains("hugepages="),
        "{}",
        r.explain()
    );
}

#[test]
fn ram_that_is_no_multiple_of_2_mib_is_refused() {
    if !kvm_or_skip("ram_that_is_no_multiple_of_2_mib") {
        return;
    }
    let args = ["run", "--mem", "65M", "--hugepages"];
    let r = run_raw(&args, LIMIT);
    assert_eq!(r.code(), Some(2), "{args:?}: {}", r.explain());
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.explain());
    assert!(
        r.stderr.contains("multiple of 2 MiB"),
        "{args:?}: {}",
        r.explain()
    );
}

/// A stall in `mode`: the link lets 4 MiB through (two huge pages), then nothing for
/// 2 s. Every vCPU waits on a 2 MiB page; kick and pause answer at once (the wait was
/// escalated by a 2 MiB `UFFDIO_POISON` into user space), and after the stall the
/// guest finishes with every word right.
fn a_stall_stays_controllable(mode: &str) {
    let mut vm = LiveVm::start(&[
        "--mem",
        "64M",
        "--hugepages",
        "--mode",
        mode,
        "--workload",
        "verify:seed=5",
        "--link",
        "stall=2s@1024",
    ]);
    let st = vm.api.wait_status(Duration::from_secs(10), all_stalled);
    for v in vcpus(&st) {
        let gpa = v["stalled_gpa"].as_str().expect("a stalled gpa");
        let gpa = u64::from_str_radix(gpa.trim_start_matches("0x"), 16).unwrap();
        assert_eq!(gpa % HUGE, 0, "{mode}: the wait is on a 2 MiB page: {st}");
    }
    std::thread::sleep(Duration::from_millis(20));
    let k = vm.api.cmd("kick");
    assert_eq!(k["ok"], true, "{k}");
    let t = Instant::now();
    let p = vm.api.cmd("pause");
    let took = t.elapsed();
    assert_eq!(p["ok"], true, "{mode}: {p}");
    assert!(
        took < Duration::from_millis(200),
        "{mode}: pause took {took:?}: {p}"
    );
    for v in vcpus(&p) {
        assert_eq!(v["state"], "paused", "{mode}: {p}");
    }
    assert_eq!(vm.api.cmd("resume")["ok"], true);
    let (r, rep) = vm.finish(LIMIT);
    assert_eq!(r.code(), Some(0), "{mode}: {}", r.explain());
    assert_huge_report(&rep, 64 << 20);
    assert!(rep["pages"]["escalated"].as_u64().unwrap() >= 1, "{rep}");
    for res in rep["guest"]["results"].as_array().unwrap() {
        assert_eq!(res["mismatches"], 0, "{mode}: {rep}");
        assert_eq!(res["pages"], 7680, "{rep}");
    }
    for v in rep["vcpus"].as_array().unwrap() {
        assert!(v["escalations"].as_u64().unwrap() >= 1, "{mode}: {rep}");
    }
}

#[test]
fn a_cpl3_stall_on_a_huge_page_answers_kick_and_pause() {
    let test = "a_cpl3_stall_on_a_huge_page_answers_kick_and_pause";
    if let Some(_pool) = pool_with(test, 32) {
        a_stall_stays_controllable("user");
    }
}

#[test]
fn a_cpl0_stall_on_a_huge_page_answers_kick_and_pause() {
    let test = "a_cpl0_stall_on_a_huge_page_answers_kick_and_pause";
    if let Some(_pool) = pool_with(test, 32) {
        a_stall_stays_controllable("kernel");
    }
}

#[test]
fn read_ahead_and_background_fill_work_in_2_mib_pages() {
    let test = "read_ahead_and_background_fill_work_in_2_mib_pages";
    let Some(_pool) = pool_with(test, 32) else {
        return;
    };
    let rep = report_of(
        &[
            "--mem",
            "64M",
            "--hugepages",
            "--workload",
            "verify:seed=9",
            "--prefetch",
            "4",
            "--background",
            "64MiB/s",
        ],
        LIMIT,
    );
    assert_huge_report(&rep, 64 << 20);
    // A byte rate stays a byte rate: 64 MiB/s is 32 pages of 2 MiB a second.
    assert_eq!(rep["policy"]["background_pages_per_s"], 32.0, "{rep}");
    let p = &rep["pages"];
    let ahead = p["prefetched"].as_u64().unwrap() + p["background"].as_u64().unwrap();
    assert!(ahead >= 1, "nothing was fetched ahead: {rep}");
    assert!(p["served"].as_u64().unwrap() <= 32, "{rep}");
    for res in rep["guest"]["results"].as_array().unwrap() {
        assert_eq!(res["mismatches"], 0, "{rep}");
    }
}

/// 64 MiB of guest RAM in 2 MiB pages: 32 pages a side.
const MIG_PAGES: u64 = 32;

/// A `--hugepages` source's migration came through to a destination in 2 MiB pages:
/// exit 0 on both sides, every vCPU verified every 4 KiB it wrote (0 mismatches), and
/// both reports count 2 MiB pages. Returns the destination's and the source's
/// migration sections.
fn assert_migrated_huge(src: Run, src_report: &std::path::Path, dest: Dest) -> (Value, Value) {
    let (d, rep) = dest.finish();
    assert_eq!(src.code(), Some(0), "source: {}", src.explain());
    assert!(
        src.stderr.contains("migrated to 127.0.0.1:"),
        "{}",
        src.explain()
    );
    assert_eq!(d.code(), Some(0), "destination: {}", d.explain());
    assert!(d.stderr.contains("in 2 MiB pages"), "{}", d.explain());
    assert_eq!(rep["memory"]["page_size_bytes"], HUGE, "{rep}");
    assert_eq!(rep["config"]["hugepages"], true, "{rep}");
    let results = rep["guest"]["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{rep}");
    for r in results {
        assert_eq!(r["mismatches"], 0, "{rep}");
        assert_eq!(r["pages"], 7680, "the guest counts 4 KiB pages: {rep}");
    }
    let m = rep["migration"].clone();
    assert_eq!(m["state"], "completed", "{m}");
    let p = &m["pages"];
    assert_eq!(p["total"], MIG_PAGES, "{m}");
    assert_eq!(p["never_received"], 0, "{m}");
    let received = ["precopy", "urgent", "background"]
        .iter()
        .map(|k| p[k].as_u64().unwrap())
        .sum::<u64>();
    assert!(
        received >= MIG_PAGES,
        "{received} pages received of {MIG_PAGES}: {m}"
    );
    let srep = read_report(src_report);
    assert_eq!(srep["memory"]["page_size_bytes"], HUGE, "{srep}");
    let sm = srep["migration"].clone();
    // Every 2 MiB page went at least once, and nothing counts 4 KiB pages.
    assert_eq!(sm["sent"]["pages"], MIG_PAGES, "{sm}");
    (m, sm)
}

/// Postcopy (and precopy rounds, whose dirty log KVM keeps per 4 KiB and the source
/// folds to 2 MiB pages) of a 64 MiB `--hugepages` guest through real TCP to
/// `ufvmm incoming`, which builds its RAM in 2 MiB hugetlb pages from the hello.
#[test]
fn a_huge_page_guest_migrates_over_tcp_and_verifies_on_the_destination() {
    let test = "a_huge_page_guest_migrates_over_tcp";
    // The source's RAM and the destination's at once.
    let Some(_pool) = pool_with(test, 2 * MIG_PAGES) else {
        return;
    };
    for rounds in ["0", "2"] {
        let dir = scratch();
        let src_report = path_in(&dir, "source.json");
        let dest = Dest::start();
        let src = source(
            dest.l.port,
            "64M",
            6,
            "1s",
            &[
                "--hugepages",
                "--precopy-rounds",
                rounds,
                "--report",
                s(&src_report),
            ],
        );
        let src = wait_with_timeout(src, LIMIT);
        let (m, sm) = assert_migrated_huge(src, &src_report, dest);
        let p = &m["pages"];
        if rounds == "0" {
            // Postcopy: each page once, after the switch-over or with it.
            assert_eq!(sm["sent"]["resent_dirtied"], 0, "{sm}");
            assert_eq!(p["duplicates"], 0, "{m}");
        } else {
            // Round 1 sends all 32 pages; the guest kept writing, so the folded dirty
            // log sent pages again or dropped them at the switch-over to come again.
            let precopy = p["precopy"].as_u64().unwrap();
            assert!(precopy >= MIG_PAGES, "{m}");
            let again = sm["sent"]["resent_dirtied"].as_u64().unwrap();
            let discarded = p["discarded"].as_u64().unwrap();
            assert!(
                again > 0 || discarded > 0,
                "the dirty log saw nothing: {m} {sm}"
            );
            assert!(discarded <= MIG_PAGES, "a bit per 2 MiB page: {m}");
        }
    }
}

/// The same through the link proxy, which breaks the connection mid-postcopy (or
/// damages one byte of a 2 MiB page frame): postcopy pauses, the source reconnects,
/// the destination says which 2 MiB pages it lacks, and nothing is lost.
#[test]
fn a_huge_page_migration_survives_a_break_and_a_damaged_page() {
    let test = "a_huge_page_migration_survives_a_break";
    let Some(_pool) = pool_with(test, 2 * MIG_PAGES) else {
        return;
    };
    for event in ["disconnect@2500ms", "corrupt@2500ms"] {
        let dir = scratch();
        let src_report = path_in(&dir, "source.json");
        let dest = Dest::start();
        // Switch-over at about 1 s, the event well inside postcopy (64 MiB at 16 MiB/s
        // is about 4 s).
        let p = proxy(dest.l.port, &format!("bandwidth=16MiB/s,{event}"));
        let src = source(
            p.port,
            "64M",
            6,
            "1s",
            &["--hugepages", "--report", s(&src_report)],
        );
        let src = wait_with_timeout(src, LIMIT);
        let (m, sm) = assert_migrated_huge(src, &src_report, dest);
        assert!(
            m["connection_breaks"].as_u64().unwrap() >= 1,
            "{event}: {m}"
        );
        assert!(m["recoveries"].as_u64().unwrap() >= 1, "{event}: {m}");
        assert!(sm["recoveries"].as_u64().unwrap() >= 1, "{event}: {sm}");
        if event.starts_with("corrupt") {
            assert!(m["bad_frames"].as_u64().unwrap() >= 1, "{event}: {m}");
        }
    }
}

/// Reserves `pages` huge pages of the pool for as long as it lives (a private hugetlb
/// mapping reserves its pages when it is made), so that a destination finds the pool
/// short.
struct Hold(*mut libc::c_void, usize);

impl Hold {
    fn pages(pages: u64) -> Option<Hold> {
        if pages == 0 {
            return Some(Hold(std::ptr::null_mut(), 0));
        }
        let len = (pages * HUGE) as usize;
        // SAFETY: a new anonymous mapping, never touched, unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(Hold(p, len))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.1 > 0 {
            // SAFETY: the mapping made in `pages`, unmapped once.
            unsafe { libc::munmap(self.0, self.1) };
        }
    }
}

/// A destination whose pool cannot hold the guest's RAM in 2 MiB pages refuses the
/// hello (`no-memory`) and exits 1 with one line saying how many pages it needs; the
/// source says so in one line and runs its guest on to the end, here.
#[test]
fn a_destination_with_a_short_pool_refuses_and_the_guest_goes_on_at_the_source() {
    let test = "a_destination_with_a_short_pool_refuses";
    let Some(_pool) = pool_with(test, MIG_PAGES) else {
        return;
    };
    let mut vm = LiveVm::start(&[
        "--mem",
        "64M",
        "--hugepages",
        "--workload",
        "verify:seconds=4",
    ]);
    // The source holds its 32 pages now; whatever is left is taken here, so the
    // destination finds none.
    vm.api.wait_status(Duration::from_secs(10), |st| {
        vcpus(st).iter().all(|v| v["state"] != "created")
    });
    let Some(_held) = Hold::pages(usable()) else {
        cannot(test, "cannot reserve the rest of the pool");
        return;
    };
    assert_eq!(usable(), 0);
    let dest = Dest::start();
    let to = format!("127.0.0.1:{}", dest.l.port);
    let go: Value =
        serde_json::from_str(&vm.api.raw(&format!(r#"{{"cmd":"migrate","to":"{to}"}}"#)))
            .expect("reply");
    assert_eq!(go["ok"], true, "a --hugepages VM may migrate: {go}");
    let st = vm.api.wait_status(Duration::from_secs(10), |st| {
        st["migration"]["state"] == "failed"
    });
    // The guest was never stopped for it: it runs on here.
    for v in vcpus(&st) {
        assert_ne!(v["state"], "paused", "{st}");
    }
    let Dest { l, .. } = dest;
    let d = wait_with_timeout(l.proc, LIMIT);
    assert_eq!(d.code(), Some(1), "{}", d.explain());
    assert_eq!(d.stderr.lines().count(), 1, "{}", d.explain());
    assert!(
        d.stderr.contains("(no-memory)")
            && d.stderr
                .contains(&format!("needs {MIG_PAGES} huge pages of 2 MiB"))
            && d.stderr.contains("/proc/sys/vm/nr_hugepages"),
        "{}",
        d.explain()
    );
    let (src, rep) = vm.finish(LIMIT);
    assert_guest_stayed_saying(&src, &rep, "(no-memory)");
    let failed: Vec<&str> = src
        .stderr
        .lines()
        .filter(|l| l.contains("failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{}", src.explain());
    assert!(
        failed[0].contains("the destination refused")
            && failed[0].contains("(no-memory)")
            && failed[0].contains("the guest goes on here"),
        "{}",
        src.explain()
    );
    for res in rep["guest"]["results"].as_array().unwrap() {
        assert_eq!(res["mismatches"], 0, "{rep}");
    }
}
