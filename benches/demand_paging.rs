//! Demand paging throughput: pages per second of the guest's `touch` workload over
//! 256 MiB, sequential and random order, 1, 2 and 8 vCPUs (each touches its own part),
//! with RAM behind userfaultfd (every first touch is served by the fault loop) and two
//! baselines on plain anonymous memory (`--no-uffd`): first touch, where the host
//! allocates each page when the guest first writes it, and prefilled (`--prefault`),
//! where it was allocated before the guest started. uffd against first touch is what
//! userfaultfd costs over a plain VM; against prefilled, over memory already there. The
//! guest times its own loop with rdtsc; the report carries the result. For the uffd
//! runs the table also gives the fault loop's breakdown of one fault (the report's
//! `fault_breakdown_us`, see `vmm/src/fault/timing.rs`).
//!
//! A second table gives what escalating a page wait to user space costs (rule 7): the
//! same touch over 8 MiB through `--link latency=2ms`, where every fault waits for the
//! link and is escalated, per page beyond the link's 2 ms.
//!
//! Run with `cargo bench --bench demand_paging`; `UFVMM_BENCH_REPS` sets runs per
//! configuration (default 3, the median is shown with the smallest and largest run).
//! `UFVMM_BENCH_TABLES=paging` or `=escalation` runs one of the two tables (default
//! both); `UFVMM_BENCH_VCPUS=1,2` picks the vCPU counts (default 1,2,8) and
//! `UFVMM_BENCH_MODES=user` the modes (default user,kernel). `UFVMM_BENCH_PLOT=DIR` or
//! `--plot DIR` (`cargo bench --bench demand_paging -- --plot DIR`) also draws, after
//! each table, `ufvmm plot`'s pictures of the first run of each userfaultfd case (the
//! `--no-uffd` baselines have no faults), one figure per mode: their reports go to
//! `DIR/<mode>/reports/<case>.json` and their fault latency to
//! `DIR/<mode>/fault-latency.svg`; the escalation table's to `DIR/escalation/`. Needs
//! /dev/kvm.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::plot::Plots;
use serde_json::Value;

/// Default runs per configuration.
const DEFAULT_REPS: usize = 3;
/// One run takes a few seconds; anything near this is a hang.
const RUN_LIMIT: Duration = Duration::from_secs(120);
const ORDERS: [&str; 2] = ["seq", "random"];
/// User mode is the main table; kernel mode (CPL0, run by KVM's emulator here) second.
const MODES: [&str; 2] = ["user", "kernel"];
/// vCPU counts of the main table.
const VCPUS: [usize; 3] = [1, 2, 8];

/// How RAM is backed in a run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backing {
    Uffd,
    FirstTouch,
    Prefilled,
}

const BACKINGS: [Backing; 3] = [Backing::Uffd, Backing::FirstTouch, Backing::Prefilled];

impl Backing {
    fn name(self) -> &'static str {
        match self {
            Backing::Uffd => "uffd",
            Backing::FirstTouch => "first-touch",
            Backing::Prefilled => "prefilled",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Backing::Uffd => &[],
            Backing::FirstTouch => &["--no-uffd"],
            Backing::Prefilled => &["--no-uffd", "--prefault"],
        }
    }
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("demand_paging: /dev/kvm is missing; this bench needs real KVM");
        std::process::exit(1);
    }
    let reps = common::reps(DEFAULT_REPS);
    let (paging, escalation) = tables();
    let vcpus = common::list_env("UFVMM_BENCH_VCPUS", &VCPUS);
    let modes = common::choice_env("UFVMM_BENCH_MODES", &MODES);
    let bin = common::binary();
    let mut plots = Plots::asked();
    if paging {
        paging_table(&bin, reps, &vcpus, &modes, plots.as_mut());
    }
    if escalation {
        escalation_table(&bin, reps, plots.as_mut());
    }
    if let Some(p) = plots {
        p.finish();
    }
}

/// The main table: uffd against the two baselines, per mode, vCPU count and order.
fn paging_table(
    bin: &Path,
    reps: usize,
    vcpus: &[usize],
    modes: &[&'static str],
    plots: Option<&mut Plots>,
) {
    println!(
        "demand_paging: touch over --mem 256M, vCPUs {vcpus:?}, {reps} run(s) per configuration, binary {}",
        bin.display()
    );

    let mut configs = Vec::new();
    for &mode in modes {
        for &n in vcpus {
            for order in ORDERS {
                for backing in BACKINGS {
                    configs.push(Config {
                        mode,
                        order,
                        vcpus: n,
                        backing,
                        runs: Vec::new(),
                        report: None,
                    });
                }
            }
        }
    }
    // Repetitions outermost, so slow drift of the machine spreads over all configurations.
    let start = Instant::now();
    for rep in 1..=reps {
        for c in configs.iter_mut() {
            let r = match run_once(bin, c, "256M", c.backing.args()) {
                Ok((r, report)) => {
                    if rep == 1 && plots.is_some() && c.backing == Backing::Uffd {
                        c.report = Some(report);
                    }
                    r
                }
                Err(e) => {
                    eprintln!("demand_paging: {} failed: {e}", c.label());
                    std::process::exit(1);
                }
            };
            println!(
                "  rep {rep}/{reps} {:<34} {:>9.0} pages/s  guest {:>6.0} ms  wall {:>6.0} ms",
                c.label(),
                r.pages_per_s(),
                r.guest_s * 1e3,
                r.wall_s * 1e3
            );
            c.runs.push(r);
        }
    }
    println!("all runs took {:.1} s", start.elapsed().as_secs_f64());

    for &mode in modes {
        print_table(mode, vcpus, &configs);
    }
    // One figure per mode: all twelve cases on one would be more than its colours.
    if let Some(plots) = plots {
        for &mode in modes {
            let runs: Vec<(String, Value)> = configs
                .iter_mut()
                .filter(|c| c.mode == mode)
                .filter_map(|c| Some((c.case(), c.report.take()?)))
                .collect();
            plots.reports(Some(mode), &runs);
        }
    }
}

/// `UFVMM_BENCH_TABLES`: which of the two tables to run (paging, escalation), as
/// `(paging, escalation)`; both by default. Anything else is refused, not ignored.
fn tables() -> (bool, bool) {
    let Ok(v) = std::env::var("UFVMM_BENCH_TABLES") else {
        return (true, true);
    };
    let (mut paging, mut escalation) = (false, false);
    for t in v.split(',').map(str::trim) {
        match t {
            "paging" => paging = true,
            "escalation" => escalation = true,
            _ => panic!("UFVMM_BENCH_TABLES: unknown table {t:?} (paging, escalation)"),
        }
    }
    assert!(
        paging || escalation,
        "UFVMM_BENCH_TABLES names no table (paging, escalation)"
    );
    (paging, escalation)
}

/// The link's one-way latency in the escalation table, in microseconds.
const LINK_US: f64 = 2000.0;
/// The two links of the escalation table: the ideal one (no `--link`, every fault
/// served at once, nothing escalated) and 2 ms (every fault escalated).
const LINKS: [(&str, &[&str]); 2] = [("ideal", &[]), ("2ms", &["--link", "latency=2ms"])];

/// Touch through `--link latency=2ms`: every fault is escalated (signal, poison, wait in
/// user space, complete); what it costs per page beyond the link's latency and beyond the
/// same touch on the ideal link.
fn escalation_table(bin: &Path, reps: usize, plots: Option<&mut Plots>) {
    println!();
    println!("escalation: touch seq over --mem 8M, ideal link vs --link latency=2ms (every fault escalated):");
    // [mode][link] -> runs; repetitions outermost as in the main table.
    let mut runs: Vec<Vec<Vec<RunResult>>> = MODES
        .iter()
        .map(|_| LINKS.iter().map(|_| Vec::new()).collect())
        .collect();
    // The first run of each mode and link, for the pictures.
    let mut reports: Vec<(String, Value)> = Vec::new();
    for rep in 1..=reps {
        for (m, mode) in MODES.into_iter().enumerate() {
            for (l, (link, extra)) in LINKS.into_iter().enumerate() {
                let c = Config {
                    mode,
                    order: "seq",
                    vcpus: 1,
                    backing: Backing::Uffd,
                    runs: Vec::new(),
                    report: None,
                };
                let r = match run_once(bin, &c, "8M", extra) {
                    Ok((r, report)) => {
                        if rep == 1 && plots.is_some() {
                            reports.push((format!("{mode} {link}"), report));
                        }
                        r
                    }
                    Err(e) => {
                        eprintln!("demand_paging: escalation {mode} {link} failed: {e}");
                        std::process::exit(1);
                    }
                };
                println!(
                    "  rep {rep}/{reps} {mode:<6} {link:<5} {:>7.0} us/page  {}/{} escalated",
                    r.us_per_page(),
                    r.escalations,
                    r.faults
                );
                runs[m][l].push(r);
            }
        }
    }
    println!(
        "{:<7} {:<6} {:>6} {:>9} {:>13} {:>11} {:>10} {:>13} {:>11}",
        "mode",
        "link",
        "pages",
        "us/page",
        "min-max",
        "fault p50",
        "escalated",
        "kernel us/flt",
        "user us/flt"
    );
    for (m, mode) in MODES.into_iter().enumerate() {
        let mut per_page = Vec::new();
        for (l, (link, _)) in LINKS.into_iter().enumerate() {
            let rs = &runs[m][l];
            let us: Vec<f64> = rs.iter().map(RunResult::us_per_page).collect();
            let (lo, hi) = common::min_max(&us);
            let med = |f: &dyn Fn(&RunResult) -> f64| common::median(rs.iter().map(f).collect());
            let last = &rs[rs.len() - 1];
            println!(
                "{:<7} {:<6} {:>6} {:>9.0} {:>13} {:>11.0} {:>10} {:>13.0} {:>11.0}",
                mode,
                link,
                last.pages,
                common::median(us.clone()),
                format!("{lo:.0}-{hi:.0}"),
                med(&|r| r.fault_us.map_or(0.0, |f| f.0 as f64)),
                format!("{}/{}", last.escalations, last.faults),
                med(&|r| r.kernel_us as f64 / r.faults.max(1) as f64),
                med(&|r| r.user_us as f64 / r.faults.max(1) as f64),
            );
            per_page.push(common::median(us));
        }
        println!(
            "  {mode}: escalated page costs {:.0} us beyond the link's {:.0} us and the ideal link's {:.0} us/page",
            per_page[1] - LINK_US - per_page[0],
            LINK_US,
            per_page[0]
        );
    }
    if let Some(plots) = plots {
        plots.reports(Some("escalation"), &reports);
    }
}

struct Config {
    mode: &'static str,
    order: &'static str,
    vcpus: usize,
    backing: Backing,
    runs: Vec<RunResult>,
    /// The first run's report, kept for the pictures.
    report: Option<Value>,
}

impl Config {
    fn label(&self) -> String {
        format!(
            "{} {} {} vCPU(s) {}",
            self.mode,
            self.order,
            self.vcpus,
            self.backing.name()
        )
    }

    /// The case's name on the pictures (which show uffd runs only).
    fn case(&self) -> String {
        let s = if self.vcpus == 1 { "" } else { "s" };
        format!("{} {}, {} vCPU{s}", self.mode, self.order, self.vcpus)
    }
}

/// The fault loop's breakdown of one fault, p50 in microseconds (`fault_breakdown_us`).
#[derive(Clone, Copy, Default)]
struct Breakdown {
    serve: f64,
    install: f64,
    resume: f64,
}

struct RunResult {
    /// Pages all vCPUs touched.
    pages: u64,
    /// The slowest vCPU's time for its part.
    guest_s: f64,
    wall_s: f64,
    /// p50/p99 of the fault loop's service time; `None` without userfaultfd.
    fault_us: Option<(u64, u64)>,
    breakdown: Option<Breakdown>,
    /// vCPU 0's faults, escalations and microseconds waiting in the kernel and in user
    /// space (an escalated wait).
    faults: u64,
    escalations: u64,
    kernel_us: u64,
    user_us: u64,
}

impl RunResult {
    /// All vCPUs' pages over the slowest one's time.
    fn pages_per_s(&self) -> f64 {
        self.pages as f64 / self.guest_s
    }

    fn us_per_page(&self) -> f64 {
        self.guest_s * 1e6 / self.pages as f64
    }
}

fn print_table(mode: &str, vcpus: &[usize], configs: &[Config]) {
    let find = |n: usize, order: &str, backing: Backing| {
        configs
            .iter()
            .find(|c| c.mode == mode && c.vcpus == n && c.order == order && c.backing == backing)
            .expect("every configuration was run")
    };
    let rate = |c: &Config| common::median(c.runs.iter().map(RunResult::pages_per_s).collect());
    println!();
    println!(
        "{mode} mode (CPL{}), pages/s of all vCPUs together (median, min-max):",
        if mode == "user" { 3 } else { 0 }
    );
    println!(
        "{:<6} {:<7} {:>22} {:>22} {:>22} {:>11} {:>11}",
        "vCPUs", "order", "uffd", "first-touch", "prefilled", "uffd/first", "uffd/pref"
    );
    for &n in vcpus {
        for order in ORDERS {
            let cell = |b: Backing| {
                let c = find(n, order, b);
                let rates: Vec<f64> = c.runs.iter().map(RunResult::pages_per_s).collect();
                let (lo, hi) = common::min_max(&rates);
                format!("{:.0} ({lo:.0}-{hi:.0})", rate(c))
            };
            let u = rate(find(n, order, Backing::Uffd));
            println!(
                "{:<6} {:<7} {:>22} {:>22} {:>22} {:>10.2}x {:>10.2}x",
                n,
                order,
                cell(Backing::Uffd),
                cell(Backing::FirstTouch),
                cell(Backing::Prefilled),
                u / rate(find(n, order, Backing::FirstTouch)),
                u / rate(find(n, order, Backing::Prefilled)),
            );
        }
    }
    println!("one fault, uffd runs (median over runs of each run's p50, us): serve | install | resume; loop service p50/p99");
    for &n in vcpus {
        for order in ORDERS {
            let c = find(n, order, Backing::Uffd);
            let b: Vec<Breakdown> = c.runs.iter().filter_map(|r| r.breakdown).collect();
            let lat: Vec<(u64, u64)> = c.runs.iter().filter_map(|r| r.fault_us).collect();
            if b.is_empty() || lat.is_empty() {
                println!("  {n} vCPU(s) {order:<7} no faults recorded");
                continue;
            }
            let med = |f: &dyn Fn(&Breakdown) -> f64| common::median(b.iter().map(f).collect());
            println!(
                "  {n} vCPU(s) {order:<7} {:>6.1} | {:>6.1} | {:>6.1}   {:>4.0}/{:<5.0}",
                med(&|x| x.serve),
                med(&|x| x.install),
                med(&|x| x.resume),
                common::median(lat.iter().map(|l| l.0 as f64).collect()),
                common::median(lat.iter().map(|l| l.1 as f64).collect())
            );
        }
    }
}

/// One `ufvmm run` to its end; the numbers come from its report, returned too.
fn run_once(
    bin: &Path,
    c: &Config,
    mem: &str,
    extra: &[&str],
) -> Result<(RunResult, Value), String> {
    let mut args: Vec<String> = [
        "--vcpus",
        &c.vcpus.to_string(),
        "--mem",
        mem,
        "--mode",
        c.mode,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(["--workload".into(), format!("touch:order={}", c.order)]);
    let out = common::run_vm(bin, &args, RUN_LIMIT)?;
    let doc = &out.report;
    let touch = common::GuestTouch::from_report(doc, c.vcpus)?;
    let lat = &doc["fault_latency_us"];
    let fault_us = lat["p50"].as_u64().zip(lat["p99"].as_u64());
    let bd = &doc["fault_breakdown_us"];
    let p50 = |k: &str| bd[k]["p50"].as_f64();
    let breakdown = match (p50("serve"), p50("install"), p50("resume")) {
        (Some(serve), Some(install), resume) => Some(Breakdown {
            serve,
            install,
            resume: resume.unwrap_or(0.0),
        }),
        _ => None,
    };
    let v = &doc["vcpus"][0];
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let r = RunResult {
        pages: touch.pages,
        guest_s: touch.guest_s,
        wall_s: out.wall_s,
        fault_us,
        breakdown,
        faults: n("faults"),
        escalations: n("escalations"),
        kernel_us: n("blocktime_kernel_us"),
        user_us: n("blocktime_user_us"),
    };
    Ok((r, out.report))
}
