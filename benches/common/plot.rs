//! The benches' pictures, the ones `ufvmm plot` draws: latency CDFs of what a bench
//! measured itself ([`Plots::cdfs`]), and the figures of the reports of its runs
//! ([`Plots::reports`]). A picture is drawn after the table it belongs to, so one that
//! fails never costs the table: its error is one line (`plot: error: ...`) and the
//! bench exits non-zero at its end ([`Plots::finish`]).

use std::fmt::Display;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use serde_json::Value;
use ufvmm::plot::{CdfPoint, CdfSeries};

/// Where the pictures go, and whether one of them failed.
pub struct Plots {
    dir: PathBuf,
    failed: bool,
}

impl Plots {
    /// The folder `--plot` or `UFVMM_BENCH_PLOT` names ([`super::plot_dir`], made
    /// there); `None` when no pictures were asked for.
    pub fn asked() -> Option<Plots> {
        super::plot_dir().map(|dir| Plots { dir, failed: false })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A picture that could not be drawn: one line, and a non-zero exit at the end.
    pub fn error(&mut self, why: impl Display) {
        eprintln!("plot: error: {why}");
        self.failed = true;
    }

    /// Draws `series` as CDFs into `DIR/file`, titled `title`. Series without points
    /// are left out (an older ufvmm's replies have no CDF); with no measured series
    /// left, nothing is drawn.
    pub fn cdfs(&mut self, file: &str, title: &str, mut series: Vec<CdfSeries>) {
        series.retain(|s| !s.points.is_empty());
        if series.iter().all(|s| s.floor) {
            println!("plot: not drawn: {file}: no latency CDF measured");
            return;
        }
        let path = self.dir.join(file);
        match ufvmm::plot::figures::latency_cdf(&path, title, &series) {
            Ok(()) => println!("plot: {}", path.display()),
            Err(e) => self.error(e),
        }
    }

    /// Saves each `(label, report)` as `DIR[/sub]/reports/<label>.json` (the label made
    /// file-safe) and draws them with `ufvmm plot`'s [`ufvmm::plot::plot_reports`],
    /// labelled so, into `DIR[/sub]`; prints what it wrote and what it left out.
    pub fn reports(&mut self, sub: Option<&str>, runs: &[(String, Value)]) {
        let out = sub.map_or_else(|| self.dir.clone(), |s| self.dir.join(s));
        if runs.is_empty() {
            println!("plot: not drawn: no runs with a report to draw");
            return;
        }
        let saved = match save_reports(&out.join("reports"), runs) {
            Ok(p) => p,
            Err(e) => return self.error(e),
        };
        let labels: Vec<String> = runs.iter().map(|(l, _)| l.clone()).collect();
        match ufvmm::plot::plot_reports(&saved, &labels, &out) {
            Ok(done) => {
                for p in &done.written {
                    println!("plot: {}", p.display());
                }
                for s in &done.skipped {
                    println!("plot: not drawn: {s}");
                }
            }
            Err(e) => self.error(e),
        }
    }

    /// Ends the bench with exit code 1 if a picture failed.
    pub fn finish(self) {
        if self.failed {
            std::process::exit(1);
        }
    }
}

/// Writes each report into `dir` as `<label>.json` (file-safe); their paths.
fn save_reports(dir: &Path, runs: &[(String, Value)]) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = Vec::with_capacity(runs.len());
    for (label, report) in runs {
        let path = dir.join(format!("{}.json", file_safe(label)));
        // Two labels that differ only in punctuation would overwrite one another.
        if paths.contains(&path) {
            return Err(format!("{}: two runs would share it", path.display()));
        }
        let text = serde_json::to_vec_pretty(report).map_err(|e| format!("{label}: {e}"))?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// `name` as a file name: lower-case letters, digits, `.` and `_` kept, every other
/// run of characters one `-` ("user seq, 2 vCPUs" is `user-seq-2-vcpus`).
pub fn file_safe(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-').trim_start_matches('.');
    if out.is_empty() {
        "run".into()
    } else {
        out.to_string()
    }
}

/// A microsecond histogram's CDF as the report and the control socket give it
/// (`ufvmm::control::ops::distribution`: the same points, thinned the same way).
pub fn cdf_of(h: &Histogram<u64>) -> Result<Vec<CdfPoint>, String> {
    cdf_from(&ufvmm::control::ops::distribution(h)["cdf"])
}

/// A reply's or report's `cdf` list (`[{"us", "fraction"}]`); `null` (a reply of an
/// older ufvmm, or nothing measured) is no points.
pub fn cdf_from(v: &Value) -> Result<Vec<CdfPoint>, String> {
    if v.is_null() {
        return Ok(Vec::new());
    }
    serde_json::from_value(v.clone()).map_err(|e| format!("a CDF of the wrong shape: {e}: {v}"))
}
