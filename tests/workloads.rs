//! Every workload boots on real KVM, with RAM served through a real userfaultfd, in
//! both modes; results come from the guest's own report.

mod common;
use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// Runs a workload and returns the report; asserts exit code `want`.
fn boot(args: &[&str], want: i32) -> (Run, serde_json::Value) {
    let dir = scratch();
    let report = path_in(&dir, "report.json");
    let mut all = vec!["--report", s(&report)];
    all.extend_from_slice(args);
    let r = run(&all, LIMIT);
    assert_eq!(r.code(), Some(want), "{}", r.explain());
    assert!(!r.stderr.contains("panicked"), "{}", r.explain());
    let rep = read_report(&report);
    (r, rep)
}

/// Boots 16 MiB, 2 vCPUs, `workload` in `mode`; expects success.
fn boot_small(mode: &str, workload: &str) -> serde_json::Value {
    boot(&["--mem", "16M", "--mode", mode, "--workload", workload], 0).1
}

fn results(rep: &serde_json::Value) -> &Vec<serde_json::Value> {
    rep["guest"]["results"].as_array().expect("results")
}

/// How long a vCPU's workload ran, by the guest's own clock (boot time left out).
fn guest_ms(rep: &serde_json::Value, res: &serde_json::Value) -> u64 {
    let khz = rep["config"]["tsc_khz"].as_u64().expect("tsc_khz");
    assert!(khz > 0, "KVM gave no TSC frequency: {rep}");
    res["tsc_cycles"].as_u64().expect("tsc_cycles") / khz
}

#[test]
fn touch_every_page_in_both_modes() {
    if !kvm_or_skip("touch_every_page_in_both_modes") {
        return;
    }
    for mode in ["user", "kernel"] {
        // 24 MiB: a 20 MiB test area = 5120 pages, 2560 per vCPU.
        let (_, rep) = boot(&["--mem", "24M", "--mode", mode, "--workload", "touch"], 0);
        let res = results(&rep);
        assert_eq!(res.len(), 2, "{rep}");
        for r in res {
            assert_eq!(r["pages"], 2560, "{mode}: {rep}");
            assert_eq!(r["mode"], if mode == "user" { 0 } else { 1 });
        }
        // Every touched page came through the fault layer, none through a VMM fault.
        assert!(rep["pages"]["served"].as_u64().unwrap() >= 5120, "{rep}");
        assert_eq!(rep["vmm_faults"], 0, "{rep}");
        let faults: u64 = rep["vcpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["faults"].as_u64().unwrap())
            .sum();
        assert!(faults >= 5120, "{mode}: {faults} faults: {rep}");
    }
}

#[test]
fn touch_options_random_read_shared() {
    if !kvm_or_skip("touch_options_random_read_shared") {
        return;
    }
    let (_, rep) = boot(
        &[
            "--mem",
            "24M",
            "--workload",
            "touch:pages=1000,order=random,access=read,shared=1",
        ],
        0,
    );
    for r in results(&rep) {
        assert_eq!(r["pages"], 1000, "{rep}");
    }
    // Both vCPUs touched the same 1000 pages: about 1000 served, not 2000 (plus boot pages).
    let served = rep["pages"]["served"].as_u64().unwrap();
    assert!((1000..1100).contains(&served), "served {served}: {rep}");
    // Reads of zero pages are mapped with UFFDIO_ZEROPAGE and count as zero pages.
    assert!(rep["pages"]["zero"].as_u64().unwrap() >= 1000, "{rep}");
}

#[test]
fn verify_has_no_mismatches_with_and_without_uffd() {
    if !kvm_or_skip("verify_has_no_mismatches_with_and_without_uffd") {
        return;
    }
    for extra in [&[][..], &["--no-uffd"][..]] {
        for mode in ["user", "kernel"] {
            let mut args = vec![
                "--mem",
                "24M",
                "--mode",
                mode,
                "--workload",
                "verify:seed=9,order=random",
            ];
            args.extend_from_slice(extra);
            let (_, rep) = boot(&args, 0);
            let res = results(&rep);
            assert_eq!(res.len(), 2);
            for r in res {
                assert_eq!(r["mismatches"], 0, "{args:?}: {rep}");
                assert_eq!(r["pages"], 2560, "{args:?}: {rep}");
            }
            if extra.is_empty() {
                assert!(rep["pages"]["served"].as_u64().unwrap() >= 5120);
            } else {
                assert_eq!(rep["pages"]["served"], 0, "--no-uffd serves nothing: {rep}");
            }
        }
    }
}

#[test]
fn verify_rounds_check_the_previous_round_in_both_modes() {
    if !kvm_or_skip("verify_rounds_check_the_previous_round_in_both_modes") {
        return;
    }
    for mode in ["user", "kernel"] {
        let rep = boot_small(mode, "verify:rounds=3");
        for res in results(&rep) {
            assert_eq!(res["events"], 3, "{mode}: {rep}");
            assert_eq!(res["mismatches"], 0, "{mode}: {rep}");
        }
    }
    let rep = boot_small("user", "verify:seconds=1");
    for res in results(&rep) {
        assert!(guest_ms(&rep, res) >= 1000, "{rep}");
        assert!(res["events"].as_u64().unwrap() >= 2, "{rep}");
        assert_eq!(res["mismatches"], 0, "{rep}");
    }
}

#[test]
fn spin_sends_heartbeats_in_both_modes() {
    if !kvm_or_skip("spin_sends_heartbeats_in_both_modes") {
        return;
    }
    for mode in ["user", "kernel"] {
        let rep = boot_small(mode, "spin:ms=300,heartbeat=50");
        for res in results(&rep) {
            assert!(guest_ms(&rep, res) >= 300, "{mode}: {rep}");
        }
        for v in rep["vcpus"].as_array().unwrap() {
            let hb = v["heartbeats"].as_u64().unwrap();
            assert!(
                (3..=8).contains(&hb),
                "{mode}: {hb} heartbeats in 300 ms at 50 ms: {rep}"
            );
        }
    }
}

#[test]
fn halt_sleeps_in_the_kernel_until_woken_in_both_modes() {
    if !kvm_or_skip("halt_sleeps_in_the_kernel_until_woken_in_both_modes") {
        return;
    }
    for mode in ["user", "kernel"] {
        let rep = boot_small(mode, "halt:ms=100,count=3");
        for res in results(&rep) {
            assert!(guest_ms(&rep, res) >= 300, "{mode}: {rep}");
            assert_eq!(res["events"], 3, "{mode}: {rep}");
        }
        // HLT sleeps in the kernel (in-kernel irqchip): no HLT exits, few exits at all.
        for v in rep["vcpus"].as_array().unwrap() {
            assert!(v["exits"].as_u64().unwrap() < 200, "{rep}");
        }
    }
}

#[test]
fn mailbox_is_read_through_get_guest_pages() {
    if !kvm_or_skip("mailbox_is_read_through_get_guest_pages") {
        return;
    }
    for mode in ["user", "kernel"] {
        let (r, rep) = boot(
            &["--mem", "16M", "--mode", mode, "--workload", "mailbox"],
            0,
        );
        assert!(
            r.stdout.contains("[vcpu0] mailbox: hello from vcpu 0"),
            "{}",
            r.explain()
        );
        assert!(
            r.stdout.contains("[vcpu1] mailbox: hello from vcpu 1"),
            "{}",
            r.explain()
        );
        assert_eq!(rep["guest"]["mailbox_messages"], 2);
        assert_eq!(
            rep["vmm_faults"], 0,
            "the VMM must not fault on guest memory: {rep}"
        );
    }
}

#[test]
fn triple_fault_ends_the_run_with_a_clear_line() {
    if !kvm_or_skip("triple_fault_ends_the_run_with_a_clear_line") {
        return;
    }
    for mode in ["user", "kernel"] {
        let r = run(
            &[
                "--vcpus",
                "1",
                "--mem",
                "16M",
                "--mode",
                mode,
                "--workload",
                "crash:kind=triple",
            ],
            LIMIT,
        );
        assert_eq!(r.code(), Some(1), "{}", r.explain());
        assert!(r.stderr.contains("triple fault"), "{}", r.explain());
    }
}

#[test]
fn halted_guest_goes_on_when_woken_over_the_control_socket() {
    if !kvm_or_skip("halted_guest_goes_on_when_woken") {
        return;
    }
    let mut vm = LiveVm::start(&["--mem", "16M", "--workload", "halt:ms=0,count=2"]);
    let api = &mut vm.api;
    api.wait_status(Duration::from_secs(10), |st| {
        vcpus(st).iter().all(|v| v["state"] == "halted")
    });
    // Still halted a while later: nothing but a wake-up moves it on.
    std::thread::sleep(Duration::from_millis(300));
    assert!(vcpus(&api.cmd("status"))
        .iter()
        .all(|v| v["state"] == "halted"));
    assert_eq!(api.cmd("wake")["ok"], true);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(api.cmd("wake")["ok"], true);
    let (r, rep) = vm.finish(LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    for res in rep["guest"]["results"].as_array().unwrap() {
        assert_eq!(res["events"], 2, "{rep}");
    }
}

#[test]
fn guest_exceptions_end_the_run_with_a_clear_line() {
    if !kvm_or_skip("guest_exceptions_end_the_run_with_a_clear_line") {
        return;
    }
    let cases = [
        ("crash:kind=ud", "user", "#UD (vector 6)", "cpl 3"),
        (
            "crash:kind=pf",
            "user",
            "#PF (vector 14)",
            "cr2 0x400000000000",
        ),
        ("crash:kind=de", "kernel", "#DE (vector 0)", "cpl 0"),
        ("crash:kind=pf", "kernel", "#PF (vector 14)", "cpl 0"),
    ];
    for (w, mode, what, detail) in cases {
        let r = run(
            &[
                "--vcpus",
                "1",
                "--mem",
                "16M",
                "--mode",
                mode,
                "--workload",
                w,
            ],
            LIMIT,
        );
        assert_eq!(r.code(), Some(1), "{w} {mode}: {}", r.explain());
        let line = r
            .stderr
            .lines()
            .find(|l| l.contains("guest exception"))
            .unwrap_or("");
        assert!(
            line.contains(what) && line.contains(detail),
            "{w} {mode}: {}",
            r.explain()
        );
    }
}
