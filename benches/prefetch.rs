//! Read-ahead: pages per second of the guest's `touch` workload over 256 MiB, 1 vCPU,
//! with `--prefetch 0` (every first touch a fault), `8`, `64` and `auto`, against
//! two baselines in the same run: `--no-uffd` (plain anonymous memory, not prefilled:
//! the kernel allocates each page at first touch) and `--no-uffd --prefault` (every
//! page allocated before boot, so the guest's touch costs only the guest's own work);
//! sequential and random order, user and kernel mode. The target: sequential
//! with `auto` within 0.8x of `--no-uffd`; against `--prefault` it is what demand
//! paging costs over memory that is already there.
//!
//! Run with `cargo bench --bench prefetch`; `UFVMM_BENCH_REPS` sets runs per
//! configuration (default 3; the median is shown with the smallest and largest run).
//! `UFVMM_BENCH_MODES=user` (or `kernel`) runs one mode. Needs /dev/kvm.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

const DEFAULT_REPS: usize = 3;
const RUN_LIMIT: Duration = Duration::from_secs(60);
const ORDERS: [&str; 2] = ["seq", "random"];
/// Label and the flags of each column; the first two are the baselines, on plain
/// memory: first touch (the ratios' `/no-uffd`) and prefilled (`/prefault`).
const POLICIES: [(&str, &[&str]); 6] = [
    ("no-uffd", &["--no-uffd"]),
    ("prefault", &["--no-uffd", "--prefault"]),
    ("prefetch 0", &["--prefetch", "0"]),
    ("prefetch 8", &["--prefetch", "8"]),
    ("prefetch 64", &["--prefetch", "64"]),
    ("prefetch auto", &["--prefetch", "auto"]),
];
/// Index of the prefilled baseline in [`POLICIES`].
const PREFAULT: usize = 1;

struct Run {
    pages_per_s: f64,
    faults: u64,
    prefetched: u64,
    load: Option<common::Load>,
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("prefetch: /dev/kvm is missing; this bench needs real KVM");
        std::process::exit(1);
    }
    let reps = common::reps(DEFAULT_REPS);
    let modes = common::choice_env("UFVMM_BENCH_MODES", &["user", "kernel"]);
    let bin = common::binary();
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
                for (p, (label, flags)) in POLICIES.iter().enumerate() {
                    let r = match run_once(&bin, mode, order, flags) {
                        Ok(r) => r,
                        Err(e) => {
                            eprintln!("prefetch: {mode} {order} {label}: {e}");
                            std::process::exit(1);
                        }
                    };
                    println!(
                        "  rep {rep}/{reps} {mode:<6} {order:<6} {label:<13} {:>9.0} pages/s {:>6} faults {:>6} prefetched  other/steal CPUs {}",
                        r.pages_per_s,
                        r.faults,
                        r.prefetched,
                        common::Load::show(r.load)
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
            "{:<7} {:<13} {:>10} {:>15} {:>8} {:>10} {:>9} {:>10}",
            "order",
            "policy",
            "pages/s",
            "min-max",
            "faults",
            "prefetched",
            "/no-uffd",
            "/prefault"
        );
        for (o, order) in ORDERS.iter().enumerate() {
            let rate =
                |p: usize| common::median(runs[m][o][p].iter().map(|r| r.pages_per_s).collect());
            let (base, pref) = (rate(0), rate(PREFAULT));
            for (p, (label, _)) in POLICIES.iter().enumerate() {
                let rs = &runs[m][o][p];
                let rates: Vec<f64> = rs.iter().map(|r| r.pages_per_s).collect();
                let (lo, hi) = common::min_max(&rates);
                let med = |f: &dyn Fn(&Run) -> u64| {
                    common::median(rs.iter().map(|r| f(r) as f64).collect())
                };
                // Each baseline's own column is "-"; uffd rows get both ratios.
                let ratio = |to: usize, b: f64| {
                    if p == to {
                        "-".to_string()
                    } else {
                        format!("{:.2}x", rate(p) / b)
                    }
                };
                println!(
                    "{:<7} {:<13} {:>10.0} {:>15} {:>8.0} {:>10.0} {:>9} {:>10}",
                    order,
                    label,
                    rate(p),
                    format!("{lo:.0}-{hi:.0}"),
                    med(&|r| r.faults),
                    med(&|r| r.prefetched),
                    ratio(0, base),
                    ratio(PREFAULT, pref),
                );
            }
        }
    }
}

/// One `ufvmm run` to its end; the numbers come from its report.
fn run_once(bin: &Path, mode: &str, order: &str, flags: &[&str]) -> Result<Run, String> {
    let mut args: Vec<String> = ["--vcpus", "1", "--mem", "256M", "--mode", mode]
        .iter()
        .chain(flags)
        .map(|a| a.to_string())
        .collect();
    args.extend(["--workload".into(), format!("touch:order={order}")]);
    let out = common::run_vm(bin, &args, RUN_LIMIT)?;
    let doc = &out.report;
    let touch = common::GuestTouch::from_report(doc, 1)?;
    Ok(Run {
        pages_per_s: touch.pages_per_s(),
        faults: doc["vcpus"][0]["faults"].as_u64().unwrap_or(0),
        prefetched: doc["pages"]["prefetched"].as_u64().unwrap_or(0),
        load: out.load,
    })
}
