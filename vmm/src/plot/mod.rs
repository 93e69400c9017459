//! `ufvmm plot`: SVG pictures of `--report` files, and the same figures for the
//! benches.
//!
//! Three figures, each drawn only when some input has the data for it:
//! - `fault-latency.svg`: fault latency (ask to install) in power-of-two buckets, counts
//!   on a log axis, one series per vCPU and one for the VMM's own requests (one report),
//!   or one per report (several);
//! - `kick-latency.svg`: kick and pause latency as CDFs on a log axis, with the floor
//!   (the kick protocol between two plain threads, measured in the same run) dashed;
//! - `migration-timeline.svg`: pages/s moved by kind (precopy, urgent, background),
//!   vCPUs waiting for pages below, the switch-over, breaks, recoveries and completion
//!   as vertical lines.
//!
//! [`input`] reads reports into [`Run`]s; [`figures`] and [`timeline`] draw. The SVG
//! backend estimates text sizes itself, so no font library or system package is
//! needed; the viewer renders the text.

pub mod figures;
pub mod input;
pub mod timeline;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use input::Run;

/// Errors of `ufvmm plot`: each is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// A report could not be read.
    #[error("{path}: cannot read it: {source}")]
    Read {
        /// The report.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A report is larger than any report ufvmm writes.
    #[error("{path}: {bytes} bytes is too large for a report (at most {max})")]
    TooLarge {
        /// The report.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// A report is not JSON (or is cut short).
    #[error("{path}: not valid JSON: {source}")]
    Json {
        /// The report.
        path: PathBuf,
        /// Where and why.
        source: serde_json::Error,
    },
    /// A report is JSON but not a ufvmm report, or a field has the wrong shape.
    #[error("{path}: not a ufvmm report: {why}")]
    NotReport {
        /// The report.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `--label` was given, but not once per report.
    #[error("{labels} labels for {reports} reports: give one --label per report, or none")]
    Labels {
        /// Labels given.
        labels: usize,
        /// Reports given.
        reports: usize,
    },
    /// More reports than one figure tells apart.
    #[error("{reports} reports: at most {MAX_REPORTS} go on one figure (their colours run out)")]
    TooMany {
        /// Reports given.
        reports: usize,
    },
    /// The output folder could not be made.
    #[error("{path}: cannot create the output folder: {source}")]
    OutDir {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Drawing or writing a figure failed.
    #[error("{path}: cannot draw it: {why}")]
    Draw {
        /// The figure's file.
        path: PathBuf,
        /// plotters' error.
        why: String,
    },
    /// None of the reports has data for any figure.
    #[error("nothing to plot: the reports have no fault, kick, pause or migration data")]
    Nothing,
}

/// One power-of-two latency bucket: `count` samples in `[from_us, to_us)`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct Bucket {
    /// Lower bound, µs.
    pub from_us: u64,
    /// Upper bound (exclusive), µs.
    pub to_us: u64,
    /// Samples in it.
    pub count: u64,
}

/// One point of a CDF: `fraction` of the samples took at most `us` µs.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct CdfPoint {
    /// Latency, µs.
    pub us: f64,
    /// Fraction of samples at or below it, 0 to 1.
    pub fraction: f64,
}

/// A named series of a figure.
#[derive(Clone, Debug)]
pub struct Series<T> {
    /// The legend's text.
    pub label: String,
    /// The data.
    pub data: T,
}

/// A CDF series; a floor is drawn dashed, in the colour of the series before it (the
/// measurement it is the floor of).
#[derive(Clone, Debug)]
pub struct CdfSeries {
    /// The legend's text.
    pub label: String,
    /// The points, in order of latency.
    pub points: Vec<CdfPoint>,
    /// This is a floor to compare with, not a measurement of the VM.
    pub floor: bool,
}

/// The most reports on one figure: one colour each.
pub const MAX_REPORTS: usize = 10;

/// The figures' file names.
pub const FAULT_FILE: &str = "fault-latency.svg";
/// See [`FAULT_FILE`].
pub const KICK_FILE: &str = "kick-latency.svg";
/// See [`FAULT_FILE`].
pub const TIMELINE_FILE: &str = "migration-timeline.svg";

/// What [`plot_reports`] did: the files written, and a line for each figure it left
/// out and why.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Figures written.
    pub written: Vec<PathBuf>,
    /// Figures not drawn, and why.
    pub skipped: Vec<String>,
}

impl Outcome {
    /// Notes `file` as not drawn. A file of that name already in `out` (an earlier
    /// plot's, or anyone's) is left alone, since plot never deletes, but is named, so
    /// nobody takes it for a figure of these reports.
    fn skip(&mut self, out: &Path, file: &str, why: &str) {
        let path = out.join(file);
        if std::fs::symlink_metadata(&path).is_ok() {
            self.skipped.push(format!(
                "{file}: {why}; {} is an older file, left as it is",
                path.display()
            ));
        } else {
            self.skipped.push(format!("{file}: {why}"));
        }
    }
}

/// `ufvmm plot`: reads `reports` (labelled `labels`, or by file name), writes every
/// figure some report has data for into `out`.
pub fn plot_reports(
    reports: &[PathBuf],
    labels: &[String],
    out: &Path,
) -> Result<Outcome, PlotError> {
    if reports.len() > MAX_REPORTS {
        return Err(PlotError::TooMany {
            reports: reports.len(),
        });
    }
    if !labels.is_empty() && labels.len() != reports.len() {
        return Err(PlotError::Labels {
            labels: labels.len(),
            reports: reports.len(),
        });
    }
    let names = if labels.is_empty() {
        input::labels_for(reports)
    } else {
        labels.to_vec()
    };
    let runs = reports
        .iter()
        .zip(names)
        .map(|(p, l)| Run::read(p, l))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(out).map_err(|source| PlotError::OutDir {
        path: out.to_path_buf(),
        source,
    })?;
    let mut done = Outcome::default();
    let several = runs.len() > 1;

    let faults: Vec<Series<Vec<Bucket>>> =
        runs.iter().flat_map(|r| r.fault_series(several)).collect();
    if faults.is_empty() {
        done.skip(out, FAULT_FILE, "no fault latency in the reports");
    } else {
        let path = out.join(FAULT_FILE);
        figures::fault_latency(&path, &faults)?;
        done.written.push(path);
    }

    let cdfs: Vec<CdfSeries> = runs.iter().flat_map(|r| r.cdf_series(several)).collect();
    if cdfs.iter().all(|c| c.floor) {
        done.skip(
            out,
            KICK_FILE,
            "no kick or pause latency in the reports (nothing kicked or paused the vCPUs)",
        );
    } else {
        let path = out.join(KICK_FILE);
        figures::latency_cdf(&path, "Kick and pause latency", &cdfs)?;
        done.written.push(path);
    }

    let lines: Vec<Series<&timeline::Timeline>> = runs
        .iter()
        .filter_map(|r| {
            r.timeline.as_ref().map(|t| Series {
                label: r.label.clone(),
                data: t,
            })
        })
        .collect();
    if lines.is_empty() {
        done.skip(out, TIMELINE_FILE, "no migration timeline in the reports");
    } else {
        let path = out.join(TIMELINE_FILE);
        timeline::draw(&path, &lines)?;
        done.written.push(path);
    }
    if done.written.is_empty() {
        return Err(PlotError::Nothing);
    }
    Ok(done)
}
