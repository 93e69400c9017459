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
            "cr2 0x200000000",
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

/// The guest's own time per page, from its rdtsc.
fn guest_us_per_page(rep: &serde_json::Value) -> f64 {
    let res = &results(rep)[0];
    let khz = rep["config"]["tsc_khz"].as_u64().expect("tsc_khz") as f64;
    res["tsc_cycles"].as_u64().expect("tsc_cycles") as f64 / khz * 1e3
        / res["pages"].as_u64().expect("pages") as f64
}

#[test]
fn the_fault_breakdown_adds_up_to_what_the_guest_measured() {
    if !kvm_or_skip("the_fault_breakdown_adds_up_to_what_the_guest_measured") {
        return;
    }
    for mode in ["user", "kernel"] {
        // One vCPU touching 8 MiB in order: its faults come back to back.
        let (_, rep) = boot(
            &[
                "--mem",
                "16M",
                "--vcpus",
                "1",
                "--mode",
                mode,
                "--workload",
                "touch:pages=2048",
            ],
            0,
        );
        let b = &rep["fault_breakdown_us"];
        let count = |k: &str| {
            b[k]["count"]
                .as_u64()
                .unwrap_or_else(|| panic!("{k}: {rep}"))
        };
        let p50 = |k: &str| b[k]["p50"].as_f64().unwrap_or_else(|| panic!("{k}: {rep}"));
        // Every page the vCPU faulted on was served and installed; nearly every fault
        // but the first followed the previous install at once.
        assert!(count("serve") >= 2048, "{mode}: {rep}");
        assert_eq!(count("serve"), count("install"), "{mode}: {rep}");
        assert!(count("resume") >= 2048 * 9 / 10, "{mode}: {rep}");
        assert!(
            b["found_spinning"].as_u64().unwrap() + b["found_sleeping"].as_u64().unwrap() > 0,
            "{rep}"
        );
        // The phases are the circle the guest's loop goes round: their sum is of the
        // size of the guest's own time per page (medians, so within a factor).
        let sum = p50("serve") + p50("install") + p50("resume");
        let guest = guest_us_per_page(&rep);
        assert!(
            sum > guest / 3.0 && sum < guest * 3.0,
            "{mode}: phases sum to {sum:.1} us, the guest took {guest:.1} us/page: {rep}"
        );
    }
}

#[test]
fn prefault_takes_the_hosts_page_allocation_out_of_the_baseline() {
    if !kvm_or_skip("prefault_takes_the_hosts_page_allocation_out_of_the_baseline") {
        return;
    }
    let args = [
        "--mem",
        "64M",
        "--vcpus",
        "1",
        "--no-uffd",
        "--workload",
        "touch",
    ];
    let (_, first) = boot(&args, 0);
    let (_, pre) = boot(&[&args[..], &["--prefault"]].concat(), 0);
    assert_eq!(pre["config"]["prefault"], true, "{pre}");
    assert_eq!(results(&pre)[0]["pages"], results(&first)[0]["pages"]);
    // Measured here: 12.5 us a page on first touch, 1.9 us prefilled.
    let (f, p) = (guest_us_per_page(&first), guest_us_per_page(&pre));
    assert!(
        p < f,
        "prefilled {p:.1} us/page, first touch {f:.1} us/page"
    );
}

#[test]
fn the_fault_loop_spins_only_with_a_cpu_to_spare() {
    if !kvm_or_skip("the_fault_loop_spins_only_with_a_cpu_to_spare") {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let found = |vcpus: usize| {
        let n = vcpus.to_string();
        let (_, rep) = boot(
            &[
                "--mem",
                "16M",
                "--vcpus",
                &n,
                "--workload",
                "touch:pages=1024",
            ],
            0,
        );
        let b = &rep["fault_breakdown_us"];
        (
            b["found_spinning"].as_u64().expect("found_spinning"),
            b["found_sleeping"].as_u64().expect("found_sleeping"),
        )
    };
    // As many vCPUs as CPUs: a spinning loop would take CPU time the vCPUs need.
    let (spun, slept) = found(cpus.min(16));
    assert_eq!(spun, 0, "{cpus} vCPUs on {cpus} CPUs: the loop spun");
    assert!(slept > 0, "no turn found faults");
    if cpus >= 2 {
        // One vCPU with a CPU to spare: back-to-back faults are caught spinning.
        let (spun, slept) = found(1);
        assert!(
            spun > slept,
            "1 vCPU on {cpus} CPUs: {spun} found spinning, {slept} sleeping"
        );
    }
}

/// Each thread of `pid` named `prefix*` and the CPUs it may run on
/// (`Cpus_allowed_list` in its status).
fn allowed_cpus(pid: u32, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(l) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
            out.push(l["Cpus_allowed_list:".len()..].trim().to_string());
        }
    }
    out
}

/// The CPUs of a list such as `0-2,5`.
fn cpu_list(l: &str) -> Vec<u64> {
    l.split(',')
        .flat_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (a, b) = (a.trim().parse().unwrap_or(0), b.trim().parse().unwrap_or(0));
            a..=b
        })
        .collect()
}

#[test]
fn a_spinning_fault_loop_has_a_cpu_to_itself() {
    if !kvm_or_skip("a_spinning_fault_loop_has_a_cpu_to_itself") {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mine = allowed_cpus(std::process::id(), "");
    if cpus < 2 || mine.is_empty() {
        eprintln!("SKIPPED a_spinning_fault_loop_has_a_cpu_to_itself: one CPU only");
        return;
    }
    for vcpus in [1, cpus] {
        let n = vcpus.to_string();
        let vm = LiveVm::start(&["--mem", "16M", "--vcpus", &n, "--workload", "spin:ms=0"]);
        let pid = vm.pid();
        // The threads pin themselves when they start: wait for the vCPUs to be up.
        let mut vm = vm;
        vm.api.wait_status(Duration::from_secs(10), |st| {
            common::vcpus(st).iter().all(|v| v["state"] == "running")
        });
        let fault = allowed_cpus(pid, "ufvmm-fault");
        let vcpu = allowed_cpus(pid, "ufvmm-vcpu");
        let (_, rep) = vm.quit(LIMIT);
        let p = &rep["placement"];
        assert_eq!(fault.len(), 1, "{fault:?}");
        assert_eq!(vcpu.len(), vcpus, "{vcpu:?}");
        if vcpus < cpus {
            // The loop alone on the last CPU, the vCPUs on the rest.
            let last = p["fault_loop_cpu"].as_u64().expect("a CPU for the loop");
            assert_eq!(fault[0], last.to_string(), "{rep}");
            for v in &vcpu {
                let cpus = cpu_list(v);
                assert!(!cpus.is_empty() && !cpus.contains(&last), "{v} {rep}");
            }
        } else {
            // No CPU to spare: nothing pinned, nothing spins.
            assert!(p["fault_loop_cpu"].is_null(), "{rep}");
            assert_eq!(fault[0], mine[0], "the loop was pinned: {rep}");
            assert!(vcpu.iter().all(|v| *v == mine[0]), "{vcpu:?}");
            assert_eq!(rep["fault_breakdown_us"]["found_spinning"], 0, "{rep}");
        }
    }
}
