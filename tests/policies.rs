//! Read-ahead (`--prefetch`) and background fill (`--background`), on real KVM and
//! userfaultfd: they cut faults where access is sequential, leave random access alone,
//! keep the link's promises, install the right bytes, and fill an idle guest at about
//! the rate asked.

mod common;
use common::migration::*;
use common::*;

use serde_json::Value;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// `ufvmm run ARGS --report R`, which must exit 0; its report.
fn report_of(args: &[&str]) -> Value {
    common::report_of(args, LIMIT)
}

fn faults(rep: &Value) -> u64 {
    vcpus(rep)
        .iter()
        .map(|v| v["faults"].as_u64().unwrap())
        .sum()
}

fn page(rep: &Value, key: &str) -> u64 {
    rep["pages"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("pages.{key}: {rep}"))
}

fn mismatches(rep: &Value) -> Vec<u64> {
    rep["guest"]["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["mismatches"].as_u64().expect("mismatches"))
        .collect()
}

/// The guest's own time for its loop, in seconds (vCPU 0).
fn guest_s(rep: &Value) -> f64 {
    let cycles = rep["guest"]["results"][0]["tsc_cycles"].as_f64().unwrap();
    cycles / (rep["config"]["tsc_khz"].as_f64().unwrap() * 1e3)
}

#[test]
fn sequential_touch_with_prefetch_needs_far_fewer_faults() {
    if !kvm_or_skip("sequential_touch_with_prefetch_needs_far_fewer_faults") {
        return;
    }
    let rep = report_of(&[
        "--vcpus",
        "1",
        "--mem",
        "64M",
        "--workload",
        "touch:order=seq",
        "--prefetch",
        "64",
    ]);
    let served = page(&rep, "served");
    let touched = rep["guest"]["results"][0]["pages"].as_u64().unwrap();
    assert!(touched > 15_000, "{rep}");
    assert!(served >= touched, "{rep}");
    // One fault per 65 pages or so; generous.
    assert!(faults(&rep) * 20 < served, "{} faults: {rep}", faults(&rep));
    assert!(page(&rep, "prefetched") * 10 > served * 9, "{rep}");
    assert_eq!(rep["policy"]["prefetch"], 64, "{rep}");
    assert_eq!(rep["policy"]["background_pages_per_s"], Value::Null);
    // Off, the same touch faults on every page: the policy is what made the difference.
    let off = report_of(&[
        "--vcpus",
        "1",
        "--mem",
        "64M",
        "--workload",
        "touch:order=seq",
    ]);
    assert!(faults(&off) >= touched, "{off}");
    assert_eq!(page(&off, "prefetched"), 0);
    assert_eq!(off["policy"]["prefetch"], "off");
}

#[test]
fn prefetched_and_background_pages_hold_the_right_bytes() {
    if !kvm_or_skip("prefetched_and_background_pages_hold_the_right_bytes") {
        return;
    }
    let dir = scratch();
    let img = path_in(&dir, "mem.img");
    let w = run(
        &[
            "--mem",
            "32M",
            "--workload",
            "verify:seed=5,phase=write,words=16",
            "--dump-memory",
            s(&img),
        ],
        LIMIT,
    );
    assert_eq!(w.code(), Some(0), "{}", w.explain());
    let source = format!("image:{}", s(&img));
    for (mode, policy) in [
        ("user", &["--prefetch", "64"][..]),
        ("kernel", &["--prefetch", "auto"][..]),
        (
            "user",
            &["--prefetch", "auto", "--background", "64MiB/s"][..],
        ),
    ] {
        let mut args = vec![
            "--mem",
            "32M",
            "--mode",
            mode,
            "--workload",
            "verify:seed=5,phase=check,words=16",
            "--source",
            &source,
        ];
        args.extend_from_slice(policy);
        let rep = report_of(&args);
        assert_eq!(mismatches(&rep), vec![0, 0], "{policy:?}: {rep}");
        let ahead = page(&rep, "prefetched") + page(&rep, "background");
        assert!(ahead > 1000, "{policy:?}: little fetched ahead: {rep}");
    }
}

#[test]
fn random_touch_with_auto_prefetches_little() {
    if !kvm_or_skip("random_touch_with_auto_prefetches_little") {
        return;
    }
    let rep = report_of(&[
        "--vcpus",
        "1",
        "--mem",
        "64M",
        "--workload",
        "touch:order=random",
        "--prefetch",
        "auto",
    ]);
    let served = page(&rep, "served");
    assert!(page(&rep, "prefetched") * 100 < served, "{rep}");
    assert!(faults(&rep) * 10 > served * 9, "{rep}");
    assert_eq!(rep["policy"]["prefetch"], "auto");
}

#[test]
fn prefetch_keeps_the_links_promise() {
    if !kvm_or_skip("prefetch_keeps_the_links_promise") {
        return;
    }
    // 32 MiB/s: 8192 pages per second, 1 ms latency.
    let bw = 32.0 * 1024.0 * 1024.0;
    let rep = report_of(&[
        "--vcpus",
        "1",
        "--mem",
        "32M",
        "--workload",
        "touch:order=seq",
        "--prefetch",
        "auto",
        "--link",
        "latency=1ms,bandwidth=32MiB/s",
    ]);
    let touched = rep["guest"]["results"][0]["pages"].as_f64().unwrap();
    // Every page the loop touched came through the link after the loop began.
    let floor = touched * 4096.0 / bw;
    assert!(
        guest_s(&rep) >= floor * 0.98,
        "guest took {:.3} s for {touched} pages, the link needs {floor:.3} s: {rep}",
        guest_s(&rep)
    );
    let through_link = (page(&rep, "served") - page(&rep, "critical")) as f64;
    let runtime = rep["runtime_ms"].as_f64().unwrap() / 1e3;
    assert!(runtime >= through_link * 4096.0 / bw, "{rep}");
    // No fault's page came sooner than the latency.
    let lat = &rep["fault_latency_us"];
    assert!(lat["count"].as_u64().unwrap() > 0, "{rep}");
    assert!(lat["p50"].as_u64().unwrap() >= 1000, "{rep}");
    assert!(page(&rep, "prefetched") > 1000, "{rep}");
}

#[test]
fn a_fault_is_not_kept_behind_prefetched_pages() {
    if !kvm_or_skip("a_fault_is_not_kept_behind_prefetched_pages") {
        return;
    }
    // A slow link (2 MiB/s: 2 ms a page) and the largest window: 2 vCPUs each touch 64
    // pages in order, and each sequential fault fetches 1024 pages ahead (2 s of the
    // link). Were faults queued behind pages fetched ahead, most would wait seconds;
    // they take the first booking not yet on the wire instead, and wait about the page
    // on the wire, the latency and the loop's timer.
    let rep = report_of(&[
        "--vcpus",
        "2",
        "--mem",
        "16M",
        "--workload",
        "touch:pages=64,order=seq",
        "--prefetch",
        "1024",
        "--link",
        "latency=1ms,bandwidth=2MiB/s",
    ]);
    let lat = &rep["fault_latency_us"];
    assert!(lat["p50"].as_u64().unwrap() < 50_000, "{rep}");
}

#[test]
fn background_fills_an_idle_guest_at_about_the_rate_asked() {
    if !kvm_or_skip("background_fills_an_idle_guest_at_about_the_rate_asked") {
        return;
    }
    // 1024 pages/s for 1.5 s of halt: about 1500 pages, far fewer than the 4096.
    let vm = LiveVm::start(&[
        "--vcpus",
        "1",
        "--mem",
        "16M",
        "--workload",
        "halt:ms=1500",
        "--background",
        "4MiB/s",
    ]);
    // A low rate costs no CPU: the loop sleeps between pages.
    assert_nothing_spins(vm.pid(), "a background fill at 1024 pages/s");
    let (r, rep) = vm.finish(LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    let bg = page(&rep, "background") as f64;
    let secs = rep["runtime_ms"].as_f64().unwrap() / 1e3;
    let rate = bg / secs;
    assert!((500.0..1300.0).contains(&rate), "{rate:.0} pages/s: {rep}");
    assert!(page(&rep, "missing_at_exit") > 1000, "{rep}");
    assert_eq!(rep["policy"]["background_pages_per_s"], 1024.0);
    // Fast enough, every page is in before the guest ends.
    let rep = report_of(&[
        "--vcpus",
        "1",
        "--mem",
        "16M",
        "--workload",
        "halt:ms=1500",
        "--background",
        "64MiB/s",
    ]);
    assert_eq!(page(&rep, "missing_at_exit"), 0, "{rep}");
    // Served by the loop, or before the start (the boot's critical pages).
    assert_eq!(
        page(&rep, "served") + page(&rep, "critical"),
        page(&rep, "total"),
        "{rep}"
    );
    assert!(page(&rep, "background") > 3500, "{rep}");
}

#[test]
fn background_fill_keeps_to_the_link() {
    if !kvm_or_skip("background_fill_keeps_to_the_link") {
        return;
    }
    // Asked for more than the link carries: the link wins (4 MiB/s = 1024 pages/s).
    let rep = report_of(&[
        "--vcpus",
        "1",
        "--mem",
        "16M",
        "--workload",
        "halt:ms=1500",
        "--background",
        "64MiB/s",
        "--link",
        "latency=1ms,bandwidth=4MiB/s",
    ]);
    let secs = rep["runtime_ms"].as_f64().unwrap() / 1e3;
    let through_link = (page(&rep, "served") - page(&rep, "critical")) as f64;
    assert!(through_link <= secs * 1024.0 + 16.0, "{rep}");
    assert!(page(&rep, "background") > 500, "{rep}");
}

#[test]
fn a_migration_destination_with_a_request_window_verifies() {
    if !kvm_or_skip("a_migration_destination_with_a_request_window_verifies") {
        return;
    }
    let dest = Dest::start_in(scratch(), &["--prefetch", "auto"]);
    let p = proxy(dest.l.port, "latency=2ms,bandwidth=32MiB/s");
    let src = wait_with_timeout(source(p.port, "64M", 5, "1s", &[]), LIMIT);
    let (d, rep) = dest.finish();
    assert_eq!(rep["policy"]["prefetch"], "auto", "{rep}");
    let prefetched = page(&rep, "prefetched");
    assert_migrated(src, (d, rep));
    // The guest's verify rounds run through its pages in order: the window asked.
    assert!(prefetched > 0, "no page came from the request window");
}
