//! What the benchmarks share: how many runs, the median and spread of them, the lists
//! the environment picks, one `ufvmm run` to its end with the figures of its report,
//! and where the pictures go (`--plot DIR`, drawn by [`plot`]).

// Each bench compiles this module on its own, and not every one uses all of it.
#![allow(dead_code)]

pub mod child;
pub mod plot;

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `UFVMM_BENCH_REPS`, or `default`; a value that is not a whole number from 1 up is
/// refused rather than ignored.
pub fn reps(default: usize) -> usize {
    match std::env::var("UFVMM_BENCH_REPS") {
        Ok(v) => {
            let n: usize = v
                .trim()
                .parse()
                .expect("UFVMM_BENCH_REPS must be a whole number");
            assert!(n >= 1, "UFVMM_BENCH_REPS must be at least 1");
            n
        }
        Err(_) => default,
    }
}

/// Where the bench draws the pictures of its runs: `--plot DIR` or `--plot=DIR` on its
/// command line (`cargo bench --bench NAME -- --plot DIR`), else `UFVMM_BENCH_PLOT=DIR`;
/// `None` for neither. The folder is made here, so a bad one ends the bench before it
/// measures anything; so does `--plot` without a folder or an empty variable.
pub fn plot_dir() -> Option<PathBuf> {
    let dir = match plot_arg(std::env::args_os().skip(1)) {
        Ok(Some(d)) => d,
        Ok(None) => match std::env::var_os("UFVMM_BENCH_PLOT") {
            None => return None,
            Some(v) if v.is_empty() => refuse("UFVMM_BENCH_PLOT is empty; give a folder"),
            Some(v) => PathBuf::from(v),
        },
        Err(e) => refuse(&e),
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        refuse(&format!("plot: cannot create {}: {e}", dir.display()));
    }
    Some(dir)
}

/// Ends the bench over a bad option, before anything ran.
fn refuse(why: &str) -> ! {
    eprintln!("{why}");
    std::process::exit(2)
}

/// `--plot DIR` or `--plot=DIR` among `args` (the last one given); everything else is
/// left alone, since cargo passes its own (`--bench`) to a bench without a harness.
fn plot_arg(args: impl Iterator<Item = OsString>) -> Result<Option<PathBuf>, String> {
    let mut args = args.peekable();
    let mut dir = None;
    while let Some(a) = args.next() {
        let bytes = a.as_bytes();
        if bytes == b"--plot" {
            match args.next_if(|v| !v.as_bytes().starts_with(b"-") && !v.is_empty()) {
                Some(v) => dir = Some(PathBuf::from(v)),
                None => return Err("--plot needs a folder: --plot DIR".into()),
            }
        } else if let Some(v) = bytes.strip_prefix(b"--plot=") {
            if v.is_empty() {
                return Err("--plot= needs a folder: --plot=DIR".into());
            }
            dir = Some(PathBuf::from(std::ffi::OsStr::from_bytes(v)));
        }
    }
    Ok(dir)
}

/// Median of a non-empty list (mean of the middle two for even lengths).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Smallest and largest of a non-empty list: the spread shown next to a median.
pub fn min_max(xs: &[f64]) -> (f64, f64) {
    xs.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// `median (min-max)` with `prec` decimals: how the tables show a figure over runs.
pub fn spread(xs: &[f64], prec: usize) -> String {
    let (lo, hi) = min_max(xs);
    format!("{:.prec$} ({lo:.prec$}-{hi:.prec$})", median(xs.to_vec()))
}

/// The ufvmm binary to run: this build's (cargo builds it for `cargo bench`), or
/// `UFVMM_BENCH_UFVMM`, to measure another build (another branch's) in the same way.
pub fn binary() -> PathBuf {
    std::env::var_os("UFVMM_BENCH_UFVMM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ufvmm")))
}

/// A comma-separated list from `var`, each item one of `known`; `known` itself when
/// unset. Anything else is refused, not ignored.
pub fn choice_env(var: &str, known: &[&'static str]) -> Vec<&'static str> {
    let Ok(v) = std::env::var(var) else {
        return known.to_vec();
    };
    let items: Vec<&'static str> = v
        .split(',')
        .map(|t| {
            known
                .iter()
                .copied()
                .find(|k| *k == t.trim())
                .unwrap_or_else(|| panic!("{var}: unknown {t:?} (known: {})", known.join(", ")))
        })
        .collect();
    assert!(!items.is_empty(), "{var} is empty");
    items
}

/// A comma-separated list of numbers from `var`; `default` when unset. Anything that
/// does not parse is refused, not ignored.
pub fn list_env<T: Copy + std::str::FromStr>(var: &str, default: &[T]) -> Vec<T> {
    let Ok(v) = std::env::var(var) else {
        return default.to_vec();
    };
    let items: Vec<T> = v
        .split(',')
        .map(|t| {
            t.trim()
                .parse::<T>()
                .unwrap_or_else(|_| panic!("{var}: cannot use {t:?}"))
        })
        .collect();
    assert!(!items.is_empty(), "{var} is empty");
    items
}

/// What one `ufvmm run` left: its report, how long it took from spawn to exit, and
/// what else the machine did meanwhile.
pub struct Outcome {
    pub report: Value,
    pub wall_s: f64,
    pub load: Option<Load>,
}

/// What the machine did during a measurement besides it: CPUs busy with other
/// processes and CPUs taken by the host (steal), each averaged over the wall time. A
/// run next to someone's compile shows here rather than only as a slow figure.
#[derive(Clone, Copy)]
pub struct Load {
    pub others: f64,
    pub steal: f64,
}

/// A point to measure [`Load`] from: the machine's busy and stolen CPU time
/// (`/proc/stat`) and this process's own and its reaped children's.
pub struct CpuMark {
    at: Instant,
    busy_s: f64,
    steal_s: f64,
    ours_s: f64,
}

impl CpuMark {
    /// Now; `None` if `/proc/stat` cannot be read.
    pub fn now() -> Option<CpuMark> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let line = text.lines().next()?.strip_prefix("cpu ")?;
        let f: Vec<f64> = line
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is within user).
        if f.len() < 8 {
            return None;
        }
        // SAFETY: sysconf takes no pointers.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        if hz <= 0.0 {
            return None;
        }
        Some(CpuMark {
            at: Instant::now(),
            busy_s: (f[0] + f[1] + f[2] + f[5] + f[6]) / hz,
            steal_s: f[7] / hz,
            ours_s: rusage_s(libc::RUSAGE_SELF)? + rusage_s(libc::RUSAGE_CHILDREN)?,
        })
    }

    /// What the machine did since this mark, besides this process and the children
    /// it has reaped since (so call it after the measured child was waited for).
    pub fn load_since(&self) -> Option<Load> {
        let now = CpuMark::now()?;
        let wall = now.at.duration_since(self.at).as_secs_f64();
        if wall <= 0.0 {
            return None;
        }
        let others = (now.busy_s - self.busy_s) - (now.ours_s - self.ours_s);
        Some(Load {
            others: others.max(0.0) / wall,
            steal: (now.steal_s - self.steal_s) / wall,
        })
    }
}

/// User and system CPU seconds of `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`).
fn rusage_s(who: libc::c_int) -> Option<f64> {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the call's duration.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return None;
    }
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(s(ru.ru_utime) + s(ru.ru_stime))
}

impl Load {
    /// `others/steal` in CPUs, for a run's line.
    pub fn show(load: Option<Load>) -> String {
        load.map_or("?".into(), |l| format!("{:.2}/{:.2}", l.others, l.steal))
    }
}

/// Runs `bin run ARGS --report FILE` to its end (killed after `limit`) and returns its
/// report; a non-zero exit, a missing or unparsable report is an error carrying the
/// tail of the VM's output.
pub fn run_vm(bin: &Path, args: &[String], limit: Duration) -> Result<Outcome, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let report = dir.path().join("report.json");
    // Output goes to a file: the VM prints little, but a pipe nobody drains could block it.
    let log = dir.path().join("output.txt");
    let out = std::fs::File::create(&log).map_err(|e| format!("{log:?}: {e}"))?;
    let err = out.try_clone().map_err(|e| format!("{log:?}: {e}"))?;
    let mark = CpuMark::now();
    let start = Instant::now();
    let mut child = Command::new(bin)
        .arg("run")
        .args(args)
        .arg("--report")
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let tail = || log_tail(&log);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {limit:?}; killed\n{}", tail()));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waitpid: {e}"));
            }
        }
    };
    let wall_s = start.elapsed().as_secs_f64();
    let load = mark.and_then(|m| m.load_since());
    if !status.success() {
        return Err(format!("ufvmm exited with {status}\n{}", tail()));
    }
    let text = std::fs::read_to_string(&report).map_err(|e| format!("report {report:?}: {e}"))?;
    let report = serde_json::from_str(&text).map_err(|e| format!("report is not JSON: {e}"))?;
    Ok(Outcome {
        report,
        wall_s,
        load,
    })
}

/// The last 20 lines of a log file (empty if it cannot be read): the VM's own words on
/// an error.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// What the guest's `touch` (or `verify`) loop reported: pages all vCPUs worked on,
/// and the slowest vCPU's time for its part by its own clock (rdtsc).
pub struct GuestTouch {
    pub pages: u64,
    pub guest_s: f64,
}

impl GuestTouch {
    /// From a report, checking there is one result per vCPU, each with pages and
    /// cycles, and a TSC frequency to turn cycles into time.
    pub fn from_report(doc: &Value, vcpus: usize) -> Result<GuestTouch, String> {
        let Some(khz) = doc["config"]["tsc_khz"].as_u64().filter(|&k| k > 0) else {
            return Err(format!("report lacks config.tsc_khz: {doc}"));
        };
        let results = doc["guest"]["results"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if results.len() != vcpus {
            return Err(format!(
                "{} vCPU results for {vcpus} vCPUs: {doc}",
                results.len()
            ));
        }
        let (mut pages, mut cycles) = (0u64, 0u64);
        for res in results {
            match (res["pages"].as_u64(), res["tsc_cycles"].as_u64()) {
                (Some(p), Some(t)) if p > 0 && t > 0 => {
                    pages += p;
                    cycles = cycles.max(t);
                }
                _ => return Err(format!("a vCPU result has no pages or cycles: {doc}")),
            }
        }
        Ok(GuestTouch {
            pages,
            guest_s: cycles as f64 / (khz as f64 * 1000.0),
        })
    }

    /// All vCPUs' pages over the slowest one's time.
    pub fn pages_per_s(&self) -> f64 {
        self.pages as f64 / self.guest_s
    }

    /// The inverse, in microseconds: wall time of the guest per page touched.
    pub fn us_per_page(&self) -> f64 {
        self.guest_s * 1e6 / self.pages as f64
    }
}
