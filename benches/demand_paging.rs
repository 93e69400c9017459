//! Demand paging throughput: pages per second of the guest's `touch` workload over
//! 256 MiB, sequential and random order, with RAM behind userfaultfd (every first touch
//! is served by the fault loop) and with `--no-uffd` (plain anonymous memory, the
//! baseline). The guest times its own loop with rdtsc; the report carries the result.
//!
//! A second table gives what escalating a page wait to user space costs (rule 7): the
//! same touch over 8 MiB through `--link latency=2ms`, where every fault waits for the
//! link and is escalated, per page beyond the link's 2 ms.
//!
//! Run with `cargo bench --bench demand_paging`; `UFVMM_BENCH_REPS` sets runs per
//! configuration (default 3, the median is shown with the smallest and largest run).
//! `UFVMM_BENCH_TABLES=paging` or `=escalation` runs one of the two tables (default
//! both). Needs /dev/kvm.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Default runs per configuration.
const DEFAULT_REPS: usize = 3;
/// One run takes a few seconds; anything near this is a hang.
const RUN_LIMIT: Duration = Duration::from_secs(60);
const ORDERS: [&str; 2] = ["seq", "random"];
/// User mode is the main table; kernel mode (CPL0, run by KVM's emulator here) second.
const MODES: [&str; 2] = ["user", "kernel"];

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("demand_paging: /dev/kvm is missing; this bench needs real KVM");
        std::process::exit(1);
    }
    let reps = common::reps(DEFAULT_REPS);
    let (paging, escalation) = tables();
    let bin = ensure_binary();
    if !paging {
        escalation_table(&bin, reps);
        return;
    }
    println!(
        "demand_paging: touch over --mem 256M, 1 vCPU, {reps} run(s) per configuration, binary {}",
        bin.display()
    );

    let mut configs = Vec::new();
    for mode in MODES {
        for order in ORDERS {
            for uffd in [true, false] {
                configs.push(Config {
                    mode,
                    order,
                    uffd,
                    runs: Vec::new(),
                });
            }
        }
    }
    // Repetitions outermost, so slow drift of the machine spreads over all configurations.
    let start = Instant::now();
    for rep in 1..=reps {
        for c in configs.iter_mut() {
            let r = match run_once(&bin, c, "256M", &[]) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("demand_paging: {} failed: {e}", c.label());
                    std::process::exit(1);
                }
            };
            println!(
                "  rep {rep}/{reps} {:<22} {:>9.0} pages/s  guest {:>6.0} ms  wall {:>6.0} ms",
                c.label(),
                r.pages_per_s(),
                r.guest_s * 1e3,
                r.wall_s * 1e3
            );
            c.runs.push(r);
        }
    }
    println!("all runs took {:.1} s", start.elapsed().as_secs_f64());

    for mode in MODES {
        print_table(mode, &configs);
    }
    if escalation {
        escalation_table(&bin, reps);
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
fn escalation_table(bin: &Path, reps: usize) {
    println!();
    println!("escalation: touch seq over --mem 8M, ideal link vs --link latency=2ms (every fault escalated):");
    // [mode][link] -> runs; repetitions outermost as in the main table.
    let mut runs: Vec<Vec<Vec<RunResult>>> = MODES
        .iter()
        .map(|_| LINKS.iter().map(|_| Vec::new()).collect())
        .collect();
    for rep in 1..=reps {
        for (m, mode) in MODES.into_iter().enumerate() {
            for (l, (link, extra)) in LINKS.into_iter().enumerate() {
                let c = Config {
                    mode,
                    order: "seq",
                    uffd: true,
                    runs: Vec::new(),
                };
                let r = match run_once(bin, &c, "8M", extra) {
                    Ok(r) => r,
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
}

struct Config {
    mode: &'static str,
    order: &'static str,
    uffd: bool,
    runs: Vec<RunResult>,
}

impl Config {
    fn label(&self) -> String {
        format!("{} {} {}", self.mode, self.order, backing(self.uffd))
    }
}

fn backing(uffd: bool) -> &'static str {
    if uffd {
        "uffd"
    } else {
        "no-uffd"
    }
}

struct RunResult {
    pages: u64,
    guest_s: f64,
    wall_s: f64,
    /// p50/p99 of the fault loop's service time; `None` without userfaultfd.
    fault_us: Option<(u64, u64)>,
    /// vCPU 0's faults, escalations and microseconds waiting in the kernel and in user
    /// space (an escalated wait).
    faults: u64,
    escalations: u64,
    kernel_us: u64,
    user_us: u64,
}

impl RunResult {
    fn pages_per_s(&self) -> f64 {
        self.pages as f64 / self.guest_s
    }

    fn us_per_page(&self) -> f64 {
        self.guest_s * 1e6 / self.pages as f64
    }
}

fn print_table(mode: &str, configs: &[Config]) {
    let find = |order: &str, uffd: bool| {
        configs
            .iter()
            .find(|c| c.mode == mode && c.order == order && c.uffd == uffd)
            .expect("every configuration was run")
    };
    let rate = |c: &Config| common::median(c.runs.iter().map(RunResult::pages_per_s).collect());
    println!();
    println!("{mode} mode (CPL{}):", if mode == "user" { 3 } else { 0 });
    println!(
        "{:<7} {:<8} {:>7} {:>12} {:>15} {:>10} {:>10} {:>13}",
        "order", "backing", "pages", "pages/s", "min-max", "guest ms", "wall ms", "uffd/no-uffd"
    );
    for order in ORDERS {
        let base = rate(find(order, false));
        for uffd in [true, false] {
            let c = find(order, uffd);
            let ratio = if uffd {
                format!("{:.2}x", rate(c) / base)
            } else {
                "-".into()
            };
            let rates: Vec<f64> = c.runs.iter().map(RunResult::pages_per_s).collect();
            let (lo, hi) = common::min_max(&rates);
            println!(
                "{:<7} {:<8} {:>7} {:>12.0} {:>15} {:>10.0} {:>10.0} {:>13}",
                order,
                backing(uffd),
                c.runs[0].pages,
                rate(c),
                format!("{lo:.0}-{hi:.0}"),
                common::median(c.runs.iter().map(|r| r.guest_s * 1e3).collect()),
                common::median(c.runs.iter().map(|r| r.wall_s * 1e3).collect()),
                ratio
            );
        }
    }
    println!("fault latency (uffd runs, median over runs):");
    for order in ORDERS {
        let c = find(order, true);
        let lat: Vec<(u64, u64)> = c.runs.iter().filter_map(|r| r.fault_us).collect();
        if lat.is_empty() {
            println!("  {order:<7} no faults recorded");
            continue;
        }
        println!(
            "  {order:<7} p50 {:>4.0} us  p99 {:>5.0} us",
            common::median(lat.iter().map(|l| l.0 as f64).collect()),
            common::median(lat.iter().map(|l| l.1 as f64).collect())
        );
    }
}

/// One `ufvmm run` to its end; the numbers come from its report.
fn run_once(bin: &Path, c: &Config, mem: &str, extra: &[&str]) -> Result<RunResult, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let report = dir.path().join("report.json");
    // Output goes to a file: the VM prints little, but a pipe nobody drains could block it.
    let log = dir.path().join("output.txt");
    let out = std::fs::File::create(&log).map_err(|e| format!("{log:?}: {e}"))?;
    let err = out.try_clone().map_err(|e| format!("{log:?}: {e}"))?;
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--vcpus", "1", "--mem", mem, "--mode", c.mode])
        .args(extra)
        .arg("--workload")
        .arg(format!("touch:order={}", c.order))
        .arg("--report")
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if !c.uffd {
        cmd.arg("--no-uffd");
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let tail = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() < RUN_LIMIT => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "still running after {RUN_LIMIT:?}; killed\n{}",
                    tail()
                ));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waitpid: {e}"));
            }
        }
    };
    let wall_s = start.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("ufvmm exited with {status}\n{}", tail()));
    }
    let text = std::fs::read_to_string(&report).map_err(|e| format!("report {report:?}: {e}"))?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| format!("report is not JSON: {e}"))?;
    let res = &doc["guest"]["results"][0];
    let pages = res["pages"].as_u64();
    let cycles = res["tsc_cycles"].as_u64();
    let khz = doc["config"]["tsc_khz"].as_u64();
    let (Some(pages), Some(cycles), Some(khz)) = (pages, cycles, khz) else {
        return Err(format!(
            "report lacks guest.results[0].pages/tsc_cycles or config.tsc_khz: {doc}"
        ));
    };
    if pages == 0 || cycles == 0 || khz == 0 {
        return Err(format!("report has zero pages, cycles or tsc_khz: {doc}"));
    }
    let lat = &doc["fault_latency_us"];
    let fault_us = lat["p50"].as_u64().zip(lat["p99"].as_u64());
    let v = &doc["vcpus"][0];
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(RunResult {
        pages,
        guest_s: cycles as f64 / (khz as f64 * 1000.0),
        wall_s,
        fault_us,
        faults: n("faults"),
        escalations: n("escalations"),
        kernel_us: n("blocktime_kernel_us"),
        user_us: n("blocktime_user_us"),
    })
}

/// The `ufvmm` binary: cargo builds it (release profile) for `cargo bench` and says
/// where it is.
fn ensure_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ufvmm"))
}
