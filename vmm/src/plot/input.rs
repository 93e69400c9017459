//! Reading `--report` files into the series the figures draw.
//!
//! A report must be a JSON object with `reason` and `exit_code` (every report ufvmm
//! writes has them, also one from a run that never built a VM); the rest is optional,
//! so a report of an older ufvmm gives the figures it has data for. Fields that are
//! there must have their shape: a bucket's bounds in order, CDF fractions within 0..1,
//! finite times. Reports are read whole, so their size is bounded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::timeline::{Sample, Timeline, TimelineEvent};
use super::{Bucket, CdfPoint, CdfSeries, PlotError, Series};

/// The largest report read: ufvmm's are a few hundred KiB at most (its timeline is
/// bounded at 1024 samples).
pub const MAX_REPORT_BYTES: u64 = 16 << 20;

/// What a report may hold, a little above what ufvmm writes, so that drawing stays
/// bounded in time and size whatever a file says.
pub const MAX_BUCKETS: usize = 64;
/// vCPU rows of buckets.
pub const MAX_VCPU_ROWS: usize = 4096;
/// Points of one CDF (ufvmm writes 200).
pub const MAX_CDF_POINTS: usize = 10_000;
/// Timeline samples (ufvmm keeps 1024) and events (256).
pub const MAX_SAMPLES: usize = 4096;
/// See [`MAX_SAMPLES`].
pub const MAX_EVENTS: usize = 1024;
/// The largest latency or time taken: 10^12 µs is 11.6 days, 10^12 ms 31 years.
pub const MAX_VALUE: f64 = 1e12;
/// The most vCPUs waiting a sample may say.
pub const MAX_WAITING: u64 = 1 << 20;

/// A single report shows per-vCPU series up to this many vCPUs; above, their sum.
pub const MAX_VCPU_SERIES: usize = 8;

/// One report, as the figures see it.
#[derive(Debug, Default)]
pub struct Run {
    /// How the figures name it.
    pub label: String,
    /// Fault latency of every page.
    pub faults_all: Vec<Bucket>,
    /// Per vCPU.
    pub faults_vcpus: Vec<Vec<Bucket>>,
    /// The VMM's own requests.
    pub faults_vmm: Vec<Bucket>,
    /// Kick latency CDF.
    pub kick: Vec<CdfPoint>,
    /// Pause latency CDF.
    pub pause: Vec<CdfPoint>,
    /// The kick floor measured in the same run.
    pub floor: Vec<CdfPoint>,
    /// The migration's time series.
    pub timeline: Option<Timeline>,
}

#[derive(Deserialize)]
struct Doc {
    #[allow(dead_code)] // Required: it is what makes the file a report.
    reason: String,
    #[allow(dead_code)]
    exit_code: i64,
    #[serde(default)]
    fault_latency_us_pow2: Option<Pow2Doc>,
    #[serde(default)]
    kick_latency_us: Option<DistDoc>,
    #[serde(default)]
    kick_floor_us: Option<DistDoc>,
    #[serde(default)]
    pause_latency_us: Option<DistDoc>,
    #[serde(default)]
    migration: Option<MigrationDoc>,
}

#[derive(Deserialize)]
struct Pow2Doc {
    all: Vec<Bucket>,
    #[serde(default)]
    vcpus: Vec<Vec<Bucket>>,
    #[serde(default)]
    vmm: Vec<Bucket>,
}

#[derive(Deserialize)]
struct DistDoc {
    #[serde(default)]
    cdf: Vec<CdfPoint>,
}

#[derive(Deserialize)]
struct MigrationDoc {
    role: String,
    #[serde(default)]
    fault_latency_us_pow2: Option<Vec<Bucket>>,
    #[serde(default)]
    timeline: Option<TimelineDoc>,
}

#[derive(Deserialize)]
struct TimelineDoc {
    samples: Vec<Sample>,
    #[serde(default)]
    events: Vec<TimelineEvent>,
}

impl Run {
    /// Reads the report at `path`, to be called `label`.
    pub fn read(path: &Path, label: String) -> Result<Run, PlotError> {
        let read = |source| PlotError::Read {
            path: path.to_path_buf(),
            source,
        };
        let bytes = std::fs::metadata(path).map_err(read)?.len();
        if bytes > MAX_REPORT_BYTES {
            return Err(PlotError::TooLarge {
                path: path.to_path_buf(),
                bytes,
                max: MAX_REPORT_BYTES,
            });
        }
        let text = std::fs::read(path).map_err(read)?;
        Run::parse(&text, label).map_err(|e| match e {
            Parse::Json(source) => PlotError::Json {
                path: path.to_path_buf(),
                source,
            },
            Parse::Shape(why) => PlotError::NotReport {
                path: path.to_path_buf(),
                why,
            },
        })
    }

    /// A report's bytes.
    fn parse(text: &[u8], label: String) -> Result<Run, Parse> {
        let v: Value = serde_json::from_slice(text).map_err(Parse::Json)?;
        if !v.is_object() {
            return Err(Parse::Shape("it is not a JSON object".into()));
        }
        let doc = Doc::deserialize(&v).map_err(|e| Parse::Shape(e.to_string()))?;
        let mut run = Run {
            label,
            ..Run::default()
        };
        if let Some(p) = doc.fault_latency_us_pow2 {
            too_many("fault_latency_us_pow2.vcpus", p.vcpus.len(), MAX_VCPU_ROWS)?;
            run.faults_all = buckets("fault_latency_us_pow2.all", p.all)?;
            for (i, v) in p.vcpus.into_iter().enumerate() {
                let name = format!("fault_latency_us_pow2.vcpus[{i}]");
                run.faults_vcpus.push(buckets(&name, v)?);
            }
            run.faults_vmm = buckets("fault_latency_us_pow2.vmm", p.vmm)?;
        }
        let cdf = |name: &str, d: Option<DistDoc>| d.map_or(Ok(Vec::new()), |d| cdf(name, d.cdf));
        run.kick = cdf("kick_latency_us.cdf", doc.kick_latency_us)?;
        run.pause = cdf("pause_latency_us.cdf", doc.pause_latency_us)?;
        run.floor = cdf("kick_floor_us.cdf", doc.kick_floor_us)?;
        if let Some(m) = doc.migration {
            // A report of an older ufvmm has the destination's buckets here only.
            if run.faults_all.is_empty() {
                if let Some(b) = m.fault_latency_us_pow2 {
                    run.faults_all = buckets("migration.fault_latency_us_pow2", b)?;
                }
            }
            if let Some(t) = m.timeline {
                run.timeline = Some(timeline(&m.role, t)?);
            }
        }
        Ok(run)
    }

    /// The fault-latency series: per vCPU and the VMM's requests for a report shown
    /// alone (the sum above [`MAX_VCPU_SERIES`] vCPUs), the sum named by the report
    /// when `several`.
    pub fn fault_series(&self, several: bool) -> Vec<Series<Vec<Bucket>>> {
        let named = |what: &str, data: &Vec<Bucket>| Series {
            label: what.to_string(),
            data: data.clone(),
        };
        let per_vcpu = !several
            && self.faults_vcpus.len() <= MAX_VCPU_SERIES
            && self.faults_vcpus.iter().any(|v| !v.is_empty());
        let mut out = Vec::new();
        if per_vcpu {
            for (i, v) in self.faults_vcpus.iter().enumerate() {
                out.push(named(&format!("vcpu{i}"), v));
            }
            out.push(named("VMM requests", &self.faults_vmm));
        } else if several {
            out.push(named(&self.label, &self.faults_all));
        } else {
            out.push(named("all faults", &self.faults_all));
        }
        out.retain(|s| !s.data.is_empty());
        out
    }

    /// Kick, pause and floor CDFs that have points.
    pub fn cdf_series(&self, several: bool) -> Vec<CdfSeries> {
        let name = |what: &str| {
            if several {
                format!("{}: {what}", self.label)
            } else {
                what.to_string()
            }
        };
        // The floor right after the kicks it is the floor of (it takes their colour).
        [
            ("kick", &self.kick, false),
            ("floor: kick between two threads", &self.floor, true),
            ("pause (all vCPUs)", &self.pause, false),
        ]
        .into_iter()
        .filter(|(_, p, _)| !p.is_empty())
        .map(|(what, p, floor)| CdfSeries {
            label: name(what),
            points: p.clone(),
            floor,
        })
        .collect()
    }
}

enum Parse {
    Json(serde_json::Error),
    Shape(String),
}

/// A number for a message: huge ones as `1.7e308`.
fn num(v: f64) -> String {
    if v.abs() < 1e9 {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

fn too_many(name: &str, n: usize, max: usize) -> Result<(), Parse> {
    if n > max {
        return Err(Parse::Shape(format!(
            "{name}: {n} entries, more than the {max} a report can have"
        )));
    }
    Ok(())
}

fn buckets(name: &str, b: Vec<Bucket>) -> Result<Vec<Bucket>, Parse> {
    too_many(name, b.len(), MAX_BUCKETS)?;
    match b
        .iter()
        .find(|b| b.from_us == 0 || b.to_us <= b.from_us || b.count == 0)
    {
        Some(bad) => Err(Parse::Shape(format!(
            "{name}: a bucket from {} to {} µs with {} samples",
            bad.from_us, bad.to_us, bad.count
        ))),
        None => Ok(b),
    }
}

fn cdf(name: &str, mut p: Vec<CdfPoint>) -> Result<Vec<CdfPoint>, Parse> {
    too_many(name, p.len(), MAX_CDF_POINTS)?;
    if let Some(bad) = p
        .iter()
        .find(|c| !(0.0..=1.0).contains(&c.fraction) || !(0.0..=MAX_VALUE).contains(&c.us))
    {
        return Err(Parse::Shape(format!(
            "{name}: a point at {} µs with fraction {}",
            num(bad.us),
            num(bad.fraction)
        )));
    }
    p.sort_by(|a, b| a.us.total_cmp(&b.us));
    Ok(p)
}

fn timeline(role: &str, t: TimelineDoc) -> Result<Timeline, Parse> {
    too_many("migration.timeline.samples", t.samples.len(), MAX_SAMPLES)?;
    too_many("migration.timeline.events", t.events.len(), MAX_EVENTS)?;
    let bad_time = |t: f64| !(0.0..=MAX_VALUE).contains(&t);
    if let Some(s) = t.samples.iter().find(|s| s.waiting > Some(MAX_WAITING)) {
        return Err(Parse::Shape(format!(
            "migration.timeline: a sample with {} vCPUs waiting",
            s.waiting.unwrap_or(0)
        )));
    }
    if let Some(s) = t.samples.iter().find(|s| bad_time(s.t_ms)) {
        return Err(Parse::Shape(format!(
            "migration.timeline: a sample at {} ms",
            num(s.t_ms)
        )));
    }
    if let Some(e) = t.events.iter().find(|e| bad_time(e.t_ms)) {
        return Err(Parse::Shape(format!(
            "migration.timeline: an event at {} ms",
            num(e.t_ms)
        )));
    }
    let mut samples = t.samples;
    samples.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    Ok(Timeline {
        sent: role == "source",
        samples,
        events: t.events,
    })
}

/// Labels for reports by file name (`plain` for `plain.json`); where two share a name,
/// with their folder's too, and a number if that is not enough.
pub fn labels_for(paths: &[PathBuf]) -> Vec<String> {
    let stem = |p: &PathBuf| {
        p.file_stem()
            .map_or_else(|| p.display().to_string(), |s| s.to_string_lossy().into())
    };
    let with_dir = |p: &PathBuf| match p.parent().and_then(Path::file_name) {
        Some(d) => format!("{}/{}", d.to_string_lossy(), stem(p)),
        None => stem(p),
    };
    let count = |names: &[String]| {
        let mut m: HashMap<&str, usize> = HashMap::new();
        for n in names {
            *m.entry(n.as_str()).or_default() += 1;
        }
        names.iter().map(|n| m[n.as_str()]).collect::<Vec<_>>()
    };
    let mut names: Vec<String> = paths.iter().map(stem).collect();
    let dup = count(&names);
    for (i, p) in paths.iter().enumerate() {
        if dup[i] > 1 {
            names[i] = with_dir(p);
        }
    }
    let dup = count(&names);
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if dup[i] > 1 {
                format!("{n} #{}", i + 1)
            } else {
                n.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(text: &str) -> String {
        match Run::parse(text.as_bytes(), "x".into()) {
            Err(Parse::Shape(s)) => s,
            Err(Parse::Json(e)) => format!("json: {e}"),
            Ok(_) => "ok".into(),
        }
    }

    #[test]
    fn a_report_needs_its_fields_in_their_shape() {
        assert!(shape("{\"reason\": \"x\"").starts_with("json: EOF"));
        assert_eq!(shape("[1]"), "it is not a JSON object");
        assert!(shape("{}").contains("missing field `reason`"));
        let base = r#""reason": "done", "exit_code": 0"#;
        assert_eq!(shape(&format!("{{{base}}}")), "ok");
        let bad = format!(
            "{{{base}, \"fault_latency_us_pow2\": {{\"all\": [{{\"from_us\": 4, \"to_us\": 2, \"count\": 1}}]}}}}"
        );
        assert_eq!(
            shape(&bad),
            "fault_latency_us_pow2.all: a bucket from 4 to 2 µs with 1 samples"
        );
        let bad = format!(
            "{{{base}, \"kick_latency_us\": {{\"cdf\": [{{\"us\": 3, \"fraction\": 1.5}}]}}}}"
        );
        assert_eq!(
            shape(&bad),
            "kick_latency_us.cdf: a point at 3 µs with fraction 1.5"
        );
        let bad = format!("{{{base}, \"kick_latency_us\": {{\"cdf\": [{{\"us\": -3}}]}}}}");
        assert!(shape(&bad).contains("missing field `fraction`"));
        let bad = format!(
            "{{{base}, \"migration\": {{\"role\": \"destination\", \"timeline\": {{\"samples\": [{{\"t_ms\": -1, \"precopy\": 0, \"urgent\": 0, \"background\": 0}}]}}}}}}"
        );
        assert_eq!(shape(&bad), "migration.timeline: a sample at -1 ms");
    }

    #[test]
    fn labels_come_from_file_names_and_tell_twins_apart() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            labels_for(&[p("a/plain.json"), p("b/stalled.json")]),
            ["plain", "stalled"]
        );
        assert_eq!(
            labels_for(&[p("a/r.json"), p("b/r.json"), p("b/x.json")]),
            ["a/r", "b/r", "x"]
        );
        assert_eq!(labels_for(&[p("r.json"), p("r.json")]), ["r #1", "r #2"]);
    }
}
