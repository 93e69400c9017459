//! `ufvmm plot` on reports of real runs: a plain run, a stalled run that was kicked and
//! paused, and a migration through a proxy that stalls and drops the connection. The
//! SVG files are parsed as XML, and each expected series must be in the legend with a
//! line of the legend's colour drawn in the plot; bad reports give one line and exit 1.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::migration::{assert_migrated, proxy, source, Dest, LIMIT};
use common::*;
use serde_json::Value;

/// What a figure shows: its texts (content, x, y), its lines (stroke, points) and its
/// markers (fill).
struct Svg {
    texts: Vec<(String, f64, f64)>,
    lines: Vec<(String, Vec<(f64, f64)>)>,
    circles: Vec<String>,
}

fn read_svg(path: &Path) -> Svg {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{path:?} is not valid XML: {e}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg", "{path:?}");
    assert!(root.attribute("width").is_some() && root.attribute("viewBox").is_some());
    let num = |n: &roxmltree::Node, a: &str| {
        n.attribute(a)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let mut svg = Svg {
        texts: Vec::new(),
        lines: Vec::new(),
        circles: Vec::new(),
    };
    for n in root.descendants().filter(|n| n.is_element()) {
        match n.tag_name().name() {
            "text" => svg.texts.push((
                n.text().unwrap_or("").trim().to_string(),
                num(&n, "x"),
                num(&n, "y"),
            )),
            "polyline" => {
                let pts = n
                    .attribute("points")
                    .unwrap_or("")
                    .split_whitespace()
                    .filter_map(|p| {
                        let (x, y) = p.split_once(',')?;
                        Some((x.parse().ok()?, y.parse().ok()?))
                    })
                    .collect();
                svg.lines
                    .push((n.attribute("stroke").unwrap_or("").to_string(), pts));
            }
            "circle" => svg
                .circles
                .push(n.attribute("fill").unwrap_or("").to_string()),
            "line" => svg.lines.push((
                n.attribute("stroke").unwrap_or("").to_string(),
                vec![
                    (num(&n, "x1"), num(&n, "y1")),
                    (num(&n, "x2"), num(&n, "y2")),
                ],
            )),
            _ => {}
        }
    }
    svg
}

impl Svg {
    fn has_text(&self, s: &str) -> bool {
        self.texts.iter().any(|(t, _, _)| t == s)
    }

    /// The points drawn for the series whose legend says `label`: its swatch is the
    /// short line just left of the label; the series is every other line of that
    /// colour. Panics if the label, its swatch or its data is missing.
    fn series_points(&self, label: &str) -> usize {
        self.series(label).1
    }

    /// The markers of the series whose legend says `label`.
    fn series_markers(&self, label: &str) -> usize {
        let color = self.series(label).0;
        self.circles.iter().filter(|c| **c == color).count()
    }

    /// The colour of the series whose legend says `label` and its points drawn.
    fn series(&self, label: &str) -> (String, usize) {
        let Some((_, tx, ty)) = self.texts.iter().find(|(t, _, _)| t == label) else {
            let all: Vec<&str> = self.texts.iter().map(|t| t.0.as_str()).collect();
            panic!("no legend entry {label:?}; texts: {all:?}");
        };
        let is_swatch = |pts: &Vec<(f64, f64)>| {
            !pts.is_empty()
                && pts
                    .iter()
                    .all(|(x, y)| *x < *tx && *x > tx - 40.0 && (y - ty).abs() < 25.0)
        };
        // Legend rows are close: the swatch is the one nearest the text's middle.
        let off = |p: &Vec<(f64, f64)>| (p[0].1 - ty - 7.0).abs();
        let Some((color, _)) = self
            .lines
            .iter()
            .filter(|(_, p)| is_swatch(p))
            .min_by(|a, b| off(&a.1).total_cmp(&off(&b.1)))
        else {
            panic!("no swatch beside the legend entry {label:?}");
        };
        let n: usize = self
            .lines
            .iter()
            .filter(|(c, p)| c == color && !is_swatch(p))
            .map(|(_, p)| p.len())
            .sum();
        assert!(n >= 2, "series {label:?} ({color}) has no line in the plot");
        (color.clone(), n)
    }
}

/// `ufvmm plot ARGS` (at most 30 s: a figure must never take long, whatever a report
/// says).
fn plot(args: &[&str]) -> Run {
    let child = ufvmm()
        .arg("plot")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ufvmm plot");
    wait_with_timeout(Proc::new(child), Duration::from_secs(30))
}

/// `ufvmm plot REPORTS --out OUT`, which must exit 0 having written exactly the figures
/// `drawn` into `out`.
fn plot_ok(reports: &[&Path], out: &Path, drawn: &[&str]) -> Run {
    let mut args: Vec<&str> = reports.iter().map(|p| s(p)).collect();
    args.extend(["--out", s(out)]);
    let r = plot(&args);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    assert_eq!(svgs_in(out), drawn, "{}", r.explain());
    r
}

/// Writes a run's report where `ufvmm plot` reads it.
fn save(dir: &Path, name: &str, rep: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(rep).expect("json")).expect("write");
    p
}

/// Every vCPU wait that ended is in its row of `fault_latency_us_pow2`, escalated ones
/// included: one per fault, and one per wait of its device emulation. Up to two may be
/// missing: a wait cut short by the VM's end, and a fault whose event the fault loop
/// read only after the thread had gone on to a device wait (counted, never waited on).
fn assert_waits_counted(rep: &Value) {
    for (i, v) in rep["vcpus"].as_array().expect("vcpus").iter().enumerate() {
        let faults = v["faults"].as_u64().expect("faults");
        let waits = faults + v["device_waits"].as_u64().expect("device_waits");
        let row: u64 = rep["fault_latency_us_pow2"]["vcpus"][i]
            .as_array()
            .expect("row")
            .iter()
            .map(|b| b["count"].as_u64().unwrap_or(0))
            .sum();
        assert!(
            row <= waits && row + 2 >= waits && row > 0,
            "vcpu{i}: {row} waits in its buckets for {faults} faults and {} device waits ({} \
             escalated)",
            v["device_waits"],
            v["escalations"]
        );
    }
}

fn svgs_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".svg"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_plain_run_plots_fault_latency_per_vcpu() {
    if !kvm_or_skip("a_plain_run_plots_fault_latency_per_vcpu") {
        return;
    }
    let dir = scratch();
    let rep = report_of(&["--mem", "64M"], Duration::from_secs(60));
    assert_waits_counted(&rep);
    let path = save(dir.path(), "plain.json", &rep);
    let out = dir.path().join("out");
    let r = plot_ok(&[&path], &out, &["fault-latency.svg"]);
    assert!(r.stdout.contains("fault-latency.svg"), "{}", r.explain());
    // Nothing kicked this VM and it did not migrate: said, not drawn.
    assert!(r.stderr.contains("kick-latency.svg"), "{}", r.explain());
    assert!(
        r.stderr.contains("migration-timeline.svg"),
        "{}",
        r.explain()
    );

    let svg = read_svg(&out.join("fault-latency.svg"));
    assert!(svg
        .texts
        .iter()
        .any(|(t, _, _)| t.starts_with("Fault latency")));
    assert!(svg.has_text("latency (log scale; power-of-two buckets)"));
    assert!(svg.has_text("faults in the bucket (log scale)"));
    assert!(svg.has_text("10 µs"), "tick labels carry units");
    // Each vCPU's buckets are drawn: an outline, and a marker per bucket.
    for v in 0..2 {
        let buckets = rep["fault_latency_us_pow2"]["vcpus"][v]
            .as_array()
            .map_or(0, Vec::len);
        assert!(buckets >= 2, "{}", rep["fault_latency_us_pow2"]);
        let label = format!("vcpu{v}");
        let n = svg.series_points(&label);
        assert!(n >= buckets, "vcpu{v}: {n} points for {buckets} buckets");
        assert_eq!(
            svg.series_markers(&label),
            buckets,
            "vcpu{v}: {}\n{}",
            rep["fault_latency_us_pow2"],
            std::fs::read_to_string(out.join("fault-latency.svg")).unwrap_or_default()
        );
    }

    // The same report cut short: one line, exit 1, nothing drawn.
    let text = std::fs::read(&path).expect("read");
    let cut = dir.path().join("cut.json");
    std::fs::write(&cut, &text[..text.len() / 2]).expect("write");
    let out2 = dir.path().join("out2");
    let r = plot(&[s(&cut), "--out", s(&out2)]);
    assert_eq!(r.code(), Some(1), "{}", r.explain());
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.explain());
    assert!(
        r.stderr
            .contains("cut.json: not valid JSON: EOF while parsing"),
        "{}",
        r.explain()
    );
    assert!(svgs_in(&out2).is_empty());
}

#[test]
fn a_stalled_run_plots_kicks_against_the_floor_next_to_a_plain_run() {
    if !kvm_or_skip("a_stalled_run_plots_kicks_against_the_floor_next_to_a_plain_run") {
        return;
    }
    let dir = scratch();
    let plain = report_of(&["--mem", "64M"], Duration::from_secs(60));
    let mut vm = LiveVm::start(&["--mem", "64M", "--link", "stall=forever@200"]);
    vm.api.wait_status(Duration::from_secs(20), all_stalled);
    let kick: Value =
        serde_json::from_str(&vm.api.raw(r#"{"cmd":"kick","count":200}"#)).expect("kick");
    for v in vcpus(&kick) {
        assert_eq!(v["unanswered"], 0, "{kick}");
    }
    for _ in 0..5 {
        assert_eq!(vm.api.cmd("pause")["ok"], true);
        assert_eq!(vm.api.cmd("resume")["ok"], true);
    }
    let (_, stalled) = vm.quit(Duration::from_secs(30));
    assert!(
        stalled["kick_floor_us"]["count"].as_u64() > Some(0),
        "{stalled}"
    );
    let a = save(dir.path(), "plain.json", &plain);
    let b = save(dir.path(), "stalled.json", &stalled);

    let out = dir.path().join("one");
    plot_ok(&[&b], &out, &["fault-latency.svg", "kick-latency.svg"]);
    let svg = read_svg(&out.join("kick-latency.svg"));
    assert!(svg.has_text("Kick and pause latency (CDF)"));
    assert!(svg.has_text("latency, request to answer (log scale)"));
    assert!(svg.has_text("fraction answered within it"));
    // A CDF's steps: 2 points per value; the report has tens of values for 400 kicks.
    let cdf_len = |k: &str| stalled[k]["cdf"].as_array().map_or(0, Vec::len);
    assert!(
        cdf_len("kick_latency_us") >= 5,
        "{}",
        stalled["kick_latency_us"]
    );
    assert!(svg.series_points("kick") >= cdf_len("kick_latency_us"));
    assert!(svg.series_points("pause (all vCPUs)") >= 2);
    // The floor is dashed in the kicks' colour: one line of the kicks, many dashes.
    let kick = svg.series("kick").0;
    assert_eq!(svg.series("floor: kick between two threads").0, kick);
    let lines = svg.lines.iter().filter(|(c, _)| *c == kick).count();
    assert!(
        lines >= 10,
        "{lines} lines of the kicks' colour: no dashed floor"
    );

    // The plain run into the same folder: plot deletes nothing, but says the stalled
    // run's kick figure there is not from this report.
    let r = plot_ok(&[&a], &out, &["fault-latency.svg", "kick-latency.svg"]);
    let old = out.join("kick-latency.svg");
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains("not drawn: kick-latency.svg: no kick")
                && l.contains(&format!(
                    "{} is an older file, left as it is",
                    old.display()
                ))),
        "{}",
        r.explain()
    );
    assert!(
        read_svg(&old).series_points("kick") >= cdf_len("kick_latency_us"),
        "the old figure was changed"
    );

    // Both runs on one figure, each labelled; the plain run has no kicks.
    let out = dir.path().join("both");
    let r = plot(&[s(&a), s(&b), "--out", s(&out)]);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    let svg = read_svg(&out.join("fault-latency.svg"));
    assert!(svg.series_points("plain") > svg.series_points("stalled") / 2);
    let svg = read_svg(&out.join("kick-latency.svg"));
    svg.series_points("stalled: kick");
    assert!(!svg.texts.iter().any(|(t, _, _)| t.starts_with("plain:")));
    // Labels of one's own.
    let out = dir.path().join("named");
    let r = plot(&[
        s(&a),
        s(&b),
        "--label",
        "A",
        "--label",
        "B",
        "--out",
        s(&out),
    ]);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    let svg = read_svg(&out.join("fault-latency.svg"));
    svg.series_points("A");
    svg.series_points("B");
}

#[test]
fn a_migration_through_a_stalling_proxy_plots_its_timeline() {
    if !kvm_or_skip("a_migration_through_a_stalling_proxy_plots_its_timeline") {
        return;
    }
    let dir = scratch();
    let dest = Dest::start();
    // Switch-over at about 1 s; a 1 s stall mid-postcopy, then the connection drops
    // and comes back, before the last page at 16 MiB/s (about 5 s).
    let p = proxy(
        dest.l.port,
        "bandwidth=16MiB/s,stall=1s@1500ms,disconnect@3200ms",
    );
    let src_report = dir.path().join("source.json");
    let src = source(p.port, "64M", 8, "1s", &["--report", s(&src_report)]);
    let src = wait_with_timeout(src, LIMIT);
    let (d, rep) = dest.finish();
    let m = assert_migrated(src, (d, rep.clone()));
    assert!(m["connection_breaks"].as_u64() >= Some(1), "{m}");
    // The destination's waits are escalated to user space, and still counted.
    assert_waits_counted(&rep);
    let path = save(dir.path(), "dest.json", &rep);

    let out = dir.path().join("out");
    plot_ok(
        &[&path],
        &out,
        &["fault-latency.svg", "migration-timeline.svg"],
    );
    let svg = read_svg(&out.join("migration-timeline.svg"));
    assert!(svg.has_text("Migration over time: pages received"));
    assert!(svg.has_text("pages/s received (log scale)"));
    assert!(svg.has_text("time since the migration began (s)"));
    assert!(svg.has_text("vCPUs waiting"));
    for series in [
        "urgent (asked for)",
        "background",
        "vCPUs waiting for a page",
        "switch-over",
        "connection break",
        "recovery",
        "all pages here",
    ] {
        svg.series_points(series);
    }
    // The stall shows: some sample has a vCPU waiting.
    let samples = m["timeline"]["samples"].as_array().expect("samples");
    assert!(
        samples.iter().any(|s| s["waiting"].as_u64() > Some(0)),
        "{}",
        m["timeline"]
    );

    // Source and destination on one figure: pages moved, each side labelled.
    let out = dir.path().join("both");
    let r = plot(&[s(&path), s(&src_report), "--out", s(&out)]);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    let svg = read_svg(&out.join("migration-timeline.svg"));
    assert!(svg.has_text("Migration over time: pages moved"));
    svg.series_points("dest: urgent (asked for)");
    svg.series_points("source: background");
    svg.series_points("dest: vCPUs waiting for a page");
}

#[test]
fn bad_reports_get_one_line_and_exit_1() {
    let dir = scratch();
    let write = |name: &str, text: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let ok = write("ok.json", br#"{"reason": "x", "exit_code": 0}"#);
    let cases: Vec<(PathBuf, &str)> = vec![
        (write("empty.json", b""), "empty.json: not valid JSON: EOF while parsing"),
        (write("bin.json", &[0xff, 0xfe, 0, 1]), "bin.json: not valid JSON"),
        (write("list.json", b"[1, 2]"), "list.json: not a ufvmm report: it is not a JSON object"),
        (write("other.json", br#"{"a": 1}"#), "other.json: not a ufvmm report: missing field `reason`"),
        (
            write(
                "bucket.json",
                br#"{"reason": "x", "exit_code": 0, "fault_latency_us_pow2": {"all": [{"from_us": 0, "to_us": 1, "count": 5}]}}"#,
            ),
            "bucket.json: not a ufvmm report: fault_latency_us_pow2.all: a bucket from 0 to 1 µs",
        ),
        (
            write(
                "cdf.json",
                br#"{"reason": "x", "exit_code": 0, "kick_latency_us": {"cdf": [{"us": 5, "fraction": "all"}]}}"#,
            ),
            "cdf.json: not a ufvmm report: invalid type: string \"all\"",
        ),
        (
            write(
                "time.json",
                br#"{"reason": "x", "exit_code": 0, "migration": {"role": "destination", "timeline": {"samples": [{"t_ms": 1}]}}}"#,
            ),
            "time.json: not a ufvmm report: missing field `precopy`",
        ),
        (dir.path().join("missing.json"), "missing.json: cannot read it: No such file"),
        (dir.path().to_path_buf(), "cannot read it"),
        (ok.clone(), "nothing to plot"),
    ];
    for (path, said) in cases {
        let out = dir.path().join("out");
        let r = plot(&[s(&path), "--out", s(&out)]);
        assert_eq!(r.code(), Some(1), "{path:?}: {}", r.explain());
        assert_eq!(r.stderr.lines().count(), 1, "{path:?}: {}", r.explain());
        assert!(
            r.stderr.starts_with("ufvmm: error: plot: ") && r.stderr.contains(said),
            "{path:?}: wanted {said:?}: {}",
            r.explain()
        );
        assert!(svgs_in(&out).is_empty(), "{path:?}");
    }
    // One bad report among good ones spoils the lot; --label must match the reports.
    let r = plot(&[s(&ok), s(&dir.path().join("list.json"))]);
    assert_eq!(r.code(), Some(1), "{}", r.explain());
    let r = plot(&[s(&ok), "--label", "a", "--label", "b"]);
    assert_eq!(r.code(), Some(1), "{}", r.explain());
    assert!(
        r.stderr.contains("2 labels for 1 reports"),
        "{}",
        r.explain()
    );
    let r = plot(&[]);
    assert_eq!(
        r.code(),
        Some(2),
        "clap refuses no reports: {}",
        r.explain()
    );
}

#[test]
fn reports_at_the_limits_draw_quickly_or_are_refused() {
    let dir = scratch();
    let write = |name: &str, v: &Value| save(dir.path(), name, v);
    let bucket = |k: u32, count: u64| serde_json::json!({"from_us": 1u64 << k, "to_us": 1u64 << (k + 1), "count": count});
    // 8 vCPUs and the VMM's requests: nine series, nine colours.
    let rows: Vec<Value> = (0..8)
        .map(|v| serde_json::json!([bucket(v + 2, 10 + u64::from(v))]))
        .collect();
    let v8 = write(
        "v8.json",
        &serde_json::json!({"reason": "x", "exit_code": 0, "fault_latency_us_pow2": {
            "all": [bucket(2, 100)], "vcpus": rows, "vmm": [bucket(20, 3)]}}),
    );
    let out = dir.path().join("v8");
    let r = plot(&[s(&v8), "--out", s(&out)]);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    let svg = read_svg(&out.join("fault-latency.svg"));
    let mut colors: Vec<String> = (0..8)
        .map(|v| svg.series(&format!("vcpu{v}")).0)
        .chain([svg.series("VMM requests").0])
        .collect();
    for v in 0..8 {
        assert_eq!(svg.series_markers(&format!("vcpu{v}")), 1);
    }
    colors.sort();
    colors.dedup();
    assert_eq!(colors.len(), 9, "two series share a colour");

    // Extremes ufvmm never writes: drawn at once, or refused in one line.
    let huge_rate = write(
        "rate.json",
        &serde_json::json!({"reason": "x", "exit_code": 0, "migration": {"role": "destination",
            "timeline": {"samples": [
                {"t_ms": 0.0, "precopy": 0, "urgent": 0, "background": 0, "waiting": 0},
                {"t_ms": 1e-300, "precopy": u64::MAX, "urgent": 0, "background": 0, "waiting": 1},
                {"t_ms": 100.0, "precopy": u64::MAX, "urgent": 5, "background": 0, "waiting": 1}],
            "events": [{"t_ms": 50.0, "kind": "switchover"}]}}}),
    );
    let r = plot(&[s(&huge_rate), "--out", s(&dir.path().join("rate"))]);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    let refused = [
        (
            serde_json::json!({"reason": "x", "exit_code": 0, "kick_latency_us": {"cdf": [{"us": 1.7e308, "fraction": 1.0}]}}),
            "a point at 1.7e308 µs",
        ),
        (
            serde_json::json!({"reason": "x", "exit_code": 0, "fault_latency_us_pow2": {"all": [bucket(3, 0)]}}),
            "with 0 samples",
        ),
        (
            serde_json::json!({"reason": "x", "exit_code": 0, "migration": {"role": "source", "timeline": {
                "samples": [{"t_ms": 1.0, "precopy": 0, "urgent": 0, "background": 0, "waiting": u64::MAX}]}}}),
            "vCPUs waiting",
        ),
        (
            serde_json::json!({"reason": "x", "exit_code": 0, "migration": {"role": "source", "timeline": {
                "samples": [], "events": vec![serde_json::json!({"t_ms": 1.0, "kind": "break"}); 5000]}}}),
            "5000 entries, more than the 1024",
        ),
    ];
    for (i, (doc, said)) in refused.iter().enumerate() {
        let p = write(&format!("bad{i}.json"), doc);
        let r = plot(&[s(&p), "--out", s(&dir.path().join("bad"))]);
        assert_eq!(r.code(), Some(1), "{}", r.explain());
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.explain());
        assert!(r.stderr.contains(said), "wanted {said:?}: {}", r.explain());
    }
    // More reports than colours: refused.
    let eleven: Vec<&str> = std::iter::repeat_n(s(&v8), 11).collect();
    let r = plot(&eleven);
    assert_eq!(r.code(), Some(1), "{}", r.explain());
    assert!(
        r.stderr.contains("at most 10 go on one figure"),
        "{}",
        r.explain()
    );
}
