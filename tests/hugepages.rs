//! `--hugepages`: guest RAM in 2 MiB hugetlb pages, served 2 MiB at a time, from the
//! same binary as 4 KiB pages.
//!
//! The tests need a pool of huge pages. As root they raise `/proc/sys/vm/nr_hugepages`
//! to what they need (never lower it) and put the old value back at the end; the
//! file's tests take one lock for that. Without root, or when the pool cannot grow,
//! they skip and say so, except under `CI=true` with `/dev/kvm` there and root, where
//! that is a failure.

mod common;
use common::*;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
fn ram_that_is_no_multiple_of_2_mib_and_migration_are_refused() {
    if !kvm_or_skip("ram_that_is_no_multiple_of_2_mib") {
        return;
    }
    for (args, needle) in [
        (
            vec!["run", "--mem", "65M", "--hugepages"],
            "multiple of 2 MiB",
        ),
        (
            vec!["run", "--mem", "64M", "--hugepages", "--migrate-to", "7001"],
            "--hugepages cannot be combined with migration",
        ),
    ] {
        let r = run_raw(&args, LIMIT);
        assert_eq!(r.code(), Some(2), "{args:?}: {}", r.explain());
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.explain());
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.explain());
    }
}

/// A stall in `mode`: the link lets 4 MiB through (two huge pages), then nothing for
/// 2 s. Every vCPU waits on a 2 MiB page; kick and pause answer at once (the wait was
/// escalated by a 2 MiB `UFFDIO_POISON` into user space), the `migrate` command is
/// refused, and after the stall the guest finishes with every word right.
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
    let m = vm.api.raw("{\"cmd\":\"migrate\",\"to\":\"127.0.0.1:9\"}");
    assert!(
        m.contains("\"ok\":false") && m.contains("--hugepages"),
        "{mode}: {m}"
    );
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
