//! Read-ahead: pages per second of the guest's `touch` workload over 256 MiB, 1 vCPU,
//! with `--prefetch 0` (every first touch a fault), `8`, `64` and `auto`, against
//! `--no-uffd` (plain anonymous memory, not prefilled: the kernel allocates each page
//! at first touch) in the same run; sequential and random order, user and kernel mode.
//! The target: sequential with `auto` within 0.8x of `--no-uffd`.
//!
//! Run with `cargo bench --bench prefetch`; `UFVMM_BENCH_REPS` sets runs per
//! configuration (default 3; the median is shown with the smallest and largest run).
//! `UFVMM_BENCH_MODES=user` (or `kernel`) runs one mode. Needs /dev/kvm.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const DEFAULT_REPS: usize = 3;
const RUN_LIMIT: Duration = Duration::from_secs(60);
const ORDERS: [&str; 2] = ["seq", "random"];
/// `None` is `--no-uffd`, the baseline.
const POLICIES: [Option<&str>; 5] = [None, Some("0"), Some("8"), Some("64"), Some("auto")];

struct Run {
    pages_per_s: f64,
    faults: u64,
    prefetched: u64,
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("prefetch: /dev/kvm is missing; this bench needs real KVM");
        std::process::exit(1);
    }
    let reps = common::reps(DEFAULT_REPS);
    let modes: Vec<&str> = match std::env::var("UFVMM_BENCH_MODES").as_deref() {
        Ok("user") => vec!["user"],
        Ok("kernel") => vec!["kernel"],
        Ok(other) => panic!("UFVMM_BENCH_MODES: {other:?} (user, kernel)"),
        Err(_) => vec!["user", "kernel"],
    };
    let bin = Path::new(env!("CARGO_BIN_EXE_ufvmm"));
    println!("prefetch: touch over --mem 256M, 1 vCPU, {reps} run(s) per configuration");
    // [mode][order][policy] -> runs; repetitions outermost so drift spreads evenly.
    let mut runs: Vec<Vec<Vec<Vec<Run>>>> = modes
        .iter()
        .map(|_| {
            ORDERS
                .iter()
                .map(|_| POLICIES.iter().map(|_| Vec::new()).collect())
                .collect()
        })
        .collect();
    let start = Instant::now();
    for rep in 1..=reps {
        for (m, mode) in modes.iter().enumerate() {
            for (o, order) in ORDERS.iter().enumerate() {
                for (p, policy) in POLICIES.iter().enumerate() {
                    let r = match run_once(bin, mode, order, *policy) {
                        Ok(r) => r,
                        Err(e) => {
                            eprintln!("prefetch: {mode} {order} {}: {e}", label(*policy));
                            std::process::exit(1);
                        }
                    };
                    println!(
                        "  rep {rep}/{reps} {mode:<6} {order:<6} {:<12} {:>9.0} pages/s {:>6} faults {:>6} prefetched",
                        label(*policy),
                        r.pages_per_s,
                        r.faults,
                        r.prefetched
                    );
                    runs[m][o][p].push(r);
                }
            }
        }
    }
    println!("all runs took {:.1} s", start.elapsed().as_secs_f64());
    for (m, mode) in modes.iter().enumerate() {
        println!();
        println!("{mode} mode:");
        println!(
            "{:<7} {:<12} {:>10} {:>15} {:>8} {:>10} {:>9}",
            "order", "policy", "pages/s", "min-max", "faults", "prefetched", "/no-uffd"
        );
        for (o, order) in ORDERS.iter().enumerate() {
            let rate =
                |p: usize| common::median(runs[m][o][p].iter().map(|r| r.pages_per_s).collect());
            let base = rate(0);
            for (p, policy) in POLICIES.iter().enumerate() {
                let rs = &runs[m][o][p];
                let rates: Vec<f64> = rs.iter().map(|r| r.pages_per_s).collect();
                let (lo, hi) = common::min_max(&rates);
                let med = |f: &dyn Fn(&Run) -> u64| {
                    common::median(rs.iter().map(|r| f(r) as f64).collect())
                };
                println!(
                    "{:<7} {:<12} {:>10.0} {:>15} {:>8.0} {:>10.0} {:>9}",
                    order,
                    label(*policy),
                    rate(p),
                    format!("{lo:.0}-{hi:.0}"),
                    med(&|r| r.faults),
                    med(&|r| r.prefetched),
                    if policy.is_some() {
                        format!("{:.2}x", rate(p) / base)
                    } else {
                        "-".into()
                    }
                );
            }
        }
    }
}

fn label(policy: Option<&str>) -> String {
    match policy {
        None => "no-uffd".into(),
        Some(p) => format!("prefetch {p}"),
    }
}

/// One `ufvmm run` to its end; the numbers come from its report.
fn run_once(bin: &Path, mode: &str, order: &str, policy: Option<&str>) -> Result<Run, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let report = dir.path().join("report.json");
    let log = dir.path().join("output.txt");
    let out = std::fs::File::create(&log).map_err(|e| format!("{log:?}: {e}"))?;
    let err = out.try_clone().map_err(|e| format!("{log:?}: {e}"))?;
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--vcpus", "1", "--mem", "256M", "--mode", mode])
        .arg("--workload")
        .arg(format!("touch:order={order}"))
        .arg("--report")
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    match policy {
        None => cmd.arg("--no-uffd"),
        Some(p) => cmd.args(["--prefetch", p]),
    };
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() < RUN_LIMIT => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not end within {RUN_LIMIT:?}"));
            }
        }
    };
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        return Err(format!("ufvmm exited with {status}\n{text}"));
    }
    let text = std::fs::read_to_string(&report).map_err(|e| format!("report: {e}"))?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| format!("report: {e}"))?;
    let res = &doc["guest"]["results"][0];
    let (Some(pages), Some(cycles), Some(khz)) = (
        res["pages"].as_u64(),
        res["tsc_cycles"].as_u64(),
        doc["config"]["tsc_khz"].as_u64(),
    ) else {
        return Err(format!("report lacks pages, tsc_cycles or tsc_khz: {doc}"));
    };
    if pages == 0 || cycles == 0 || khz == 0 {
        return Err(format!("report has zero pages, cycles or tsc_khz: {doc}"));
    }
    Ok(Run {
        pages_per_s: pages as f64 / (cycles as f64 / (khz as f64 * 1e3)),
        faults: doc["vcpus"][0]["faults"].as_u64().unwrap_or(0),
        prefetched: doc["pages"]["prefetched"].as_u64().unwrap_or(0),
    })
}
