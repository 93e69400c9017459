//! Kick latency: time from a kick to the vCPU thread's acknowledgement, with the vCPU
//! running guest code, halted in the in-kernel HLT, and stalled on a missing page at
//! CPL3 (the GUP path) and at CPL0 (the instruction emulator, where the kernel's page
//! wait takes no signal: the wait is escalated to user space, rule 7). Each case sits
//! next to the floor: the same kick protocol between two plain threads
//! (`ufvmm::vcpu::kick::floor_latency`), measured just before the case; p50, p99 and
//! max are also given as ratios to that floor.
//!
//! A second table gives pause-all latency (`pause` on the control socket: until every
//! vCPU is parked) with 1, 8 and 32 vCPUs on this machine's cores, running guest code
//! and stalled at CPL3, the 1-vCPU row being the baseline for the others.
//!
//! Run with `cargo bench --bench kick_latency`; `UFVMM_BENCH_KICKS` sets kicks per case
//! (default 2000), `UFVMM_BENCH_PAUSES` pauses per pause case (default 200),
//! `UFVMM_BENCH_PAUSE_VCPUS` the vCPU counts (default 1,8,32), `UFVMM_BENCH_REPS` the
//! pause table's runs per case (default 1; with more, each figure is the median over
//! runs with the smallest and largest, and the ratios are each run's own over the
//! 1-vCPU case of the same repetition), `UFVMM_BENCH_TABLES=kick` or `=pause` one of the
//! two tables (default both). `UFVMM_BENCH_PLOT=DIR` or `--plot DIR` (`cargo bench
//! --bench kick_latency -- --plot DIR`) also draws each table's picture into DIR, as
//! `ufvmm plot` draws them, after the table: `kick-latency.svg`, every case's kick CDF
//! (the VM's kick reply) with its floor dashed, and `pause-latency.svg`, one CDF per
//! state and vCPU count (all runs of the case merged into one histogram). Needs
//! /dev/kvm. Every wait is bounded and the VM is killed on any error, so the bench
//! cannot hang.

mod common;

use common::plot::{cdf_from, cdf_of, Plots};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::Value;
use ufvmm::plot::CdfSeries;

/// Default kicks per case.
const DEFAULT_KICKS: u64 = 2000;
/// How long the VM gets to create its control socket.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// How long a case may take to reach the state it measures.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// How long the VM gets to exit after `quit`.
const EXIT_LIMIT: Duration = Duration::from_secs(10);
type Result<T> = std::result::Result<T, String>;

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("kick_latency: /dev/kvm is missing; this bench needs real KVM");
        std::process::exit(1);
    }
    let tables = common::choice_env("UFVMM_BENCH_TABLES", &["kick", "pause"]);
    let kicks = kicks_per_case();
    let bin = common::binary();
    let mut plots = Plots::asked();
    if tables.contains(&"kick") {
        kick_table(&bin, kicks, plots.as_mut());
    }
    if tables.contains(&"pause") {
        pause_table(&bin, plots.as_mut());
    }
    if let Some(p) = plots {
        p.finish();
    }
}

/// The kick table: every case next to the floor measured just before it.
fn kick_table(bin: &Path, kicks: u64, plots: Option<&mut Plots>) {
    println!(
        "kick_latency: {kicks} kicks per case, 1 vCPU, binary {}",
        bin.display()
    );

    let cases: [(&str, &[&str], Ready); 4] = [
        (
            "running (spin)",
            &["--workload", "spin:ms=0"],
            Ready::Spinning,
        ),
        ("halted (hlt)", &["--workload", "halt:ms=0"], Ready::Halted),
        (
            "stalled cpl3",
            &["--mode", "user", "--link", "stall=forever@200"],
            Ready::Stalled,
        ),
        (
            "stalled cpl0",
            &["--mode", "kernel", "--link", "stall=forever@200"],
            Ready::Stalled,
        ),
    ];
    let mut rows = Vec::new();
    // Each case's name, kick CDF (as the reply gives it) and floor, for the picture.
    let mut cdfs: Vec<(&str, Value, Histogram<u64>)> = Vec::new();
    for (name, args, ready) in cases {
        // Floor first, with no VM up, so it is the bare cost of the protocol a few
        // hundred milliseconds before the case it is compared with.
        let floor_h = ufvmm::vcpu::kick::floor_latency(kicks as usize)
            .expect("kick floor: installing the SIGUSR1 handler failed");
        let floor = Lat::of(&floor_h);
        println!("  {name}: floor p50 {} us; starting the VM", floor.p50);
        let case = match run_case(bin, 1, args, ready, |vm, api| kick(vm, api, kicks)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("kick_latency: case '{name}' failed: {e}");
                std::process::exit(1);
            }
        };
        rows.push(Row {
            case: "floor (threads)".into(),
            state: "-".into(),
            lat: floor,
            ratio: None,
            unanswered: None,
        });
        rows.push(Row {
            case: name.into(),
            state: case.state,
            lat: case.lat,
            ratio: Some(case.lat.ratio_to(&floor)),
            unanswered: Some(case.unanswered),
        });
        cdfs.push((name, case.cdf, floor_h));
    }
    print_table(&rows);
    // Issue 8's target: a vCPU stalled at CPL0 answers within 2 ms (p99); CPL3 is held
    // to the same.
    for r in rows.iter().filter(|r| r.case.starts_with("stalled")) {
        let ok = r.lat.p99 <= 2000 && r.unanswered == Some(0);
        println!(
            "{}: p99 {} us ({:.1}x the floor), {} unanswered; target p99 <= 2000 us: {}",
            r.case,
            r.lat.p99,
            r.ratio.map_or(0.0, |x| x[1]),
            r.unanswered.unwrap_or(0),
            if ok { "met" } else { "NOT met" }
        );
    }
    if let Some(plots) = plots {
        plot_kicks(plots, &cdfs);
    }
}

/// `kick-latency.svg`: each case's kick CDF, and its floor dashed.
fn plot_kicks(plots: &mut Plots, cases: &[(&str, Value, Histogram<u64>)]) {
    let mut series = Vec::new();
    for (name, cdf, floor) in cases {
        let (points, floor) = match (cdf_from(cdf), cdf_of(floor)) {
            (Ok(p), Ok(f)) => (p, f),
            (Err(e), _) | (_, Err(e)) => return plots.error(format!("{name}: {e}")),
        };
        // A floor is drawn in the colour of the series before it: none without its case.
        if points.is_empty() {
            continue;
        }
        series.push(CdfSeries {
            label: name.to_string(),
            points,
            floor: false,
        });
        series.push(CdfSeries {
            label: format!("{name}: floor"),
            points: floor,
            floor: true,
        });
    }
    plots.cdfs(ufvmm::plot::KICK_FILE, "Kick latency by vCPU state", series);
}

/// `pause-latency.svg`: one CDF per state and vCPU count, its runs merged. The 1-vCPU
/// case is the baseline here, so there is no floor.
fn plot_pauses(plots: &mut Plots, rows: &[(&str, u64, Vec<CaseResult>)]) {
    let mut series = Vec::new();
    for (name, n, runs) in rows {
        let mut all = ufvmm::fault::new_histogram();
        for h in runs.iter().filter_map(|c| c.hist.as_ref()) {
            if let Err(e) = all.add(h) {
                return plots.error(format!("{name}, {n} vCPUs: merging runs: {e}"));
            }
        }
        match cdf_of(&all) {
            Ok(points) => series.push(CdfSeries {
                label: format!("{name}, {n} vCPU{}", if *n == 1 { "" } else { "s" }),
                points,
                floor: false,
            }),
            Err(e) => return plots.error(format!("{name}, {n} vCPUs: {e}")),
        }
    }
    plots.cdfs("pause-latency.svg", "Pause-all latency", series);
}

/// Default pauses per pause case, and vCPU counts.
const DEFAULT_PAUSES: u64 = 200;
const PAUSE_VCPUS: [u64; 3] = [1, 8, 32];

/// `var` as a whole number in `1..=max`, or `default`.
fn number_env(var: &str, default: u64, max: u64) -> u64 {
    let Ok(v) = std::env::var(var) else {
        return default;
    };
    let n: u64 = v
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{var} must be a whole number"));
    assert!((1..=max).contains(&n), "{var} must be between 1 and {max}");
    n
}

/// Pause-all latency with more vCPUs than cores: `pause` until every vCPU is parked,
/// then `resume`, `UFVMM_BENCH_PAUSES` times per case, `UFVMM_BENCH_REPS` runs of every
/// case (repetitions outermost, so the machine's drift spreads over all cases).
fn pause_table(bin: &Path, plots: Option<&mut Plots>) {
    let pauses = number_env("UFVMM_BENCH_PAUSES", DEFAULT_PAUSES, 100_000);
    let reps = common::reps(1);
    let counts = common::list_env("UFVMM_BENCH_PAUSE_VCPUS", &PAUSE_VCPUS);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("pause-all: {pauses} pause/resume per case, {reps} run(s) per case, {cpus} CPUs");
    let states: [(&str, &[&str], Ready); 2] = [
        (
            "running (spin)",
            &["--workload", "spin:ms=0"],
            Ready::Spinning,
        ),
        (
            "stalled cpl3",
            &["--mode", "user", "--link", "stall=forever@200"],
            Ready::Stalled,
        ),
    ];
    // (state, vCPUs) -> one result per repetition.
    let mut rows: Vec<(&str, u64, Vec<CaseResult>)> = states
        .iter()
        .flat_map(|(name, _, _)| counts.iter().map(move |&n| (*name, n, Vec::new())))
        .collect();
    for rep in 1..=reps {
        for (name, args, ready) in states {
            for &n in &counts {
                let r = run_case(bin, n, args, ready, |vm, api| pause_all(vm, api, pauses));
                match r {
                    Ok(c) => {
                        println!(
                            "  rep {rep}/{reps} {name:<16} {n:>3} vCPUs  p50 {:>6} us  p99 {:>6} us  max {:>6} us  unanswered {}",
                            c.lat.p50, c.lat.p99, c.lat.max, c.unanswered
                        );
                        let row = rows
                            .iter_mut()
                            .find(|(b, m, _)| *b == name && *m == n)
                            .expect("every case has a row");
                        row.2.push(c);
                    }
                    Err(e) => {
                        eprintln!("kick_latency: pause case '{name}' with {n} vCPUs failed: {e}");
                        std::process::exit(1);
                    }
                }
            }
        }
    }
    println!(
        "{:<16} {:>6} {:>18} {:>18} {:>18} {:>6} {:>18} {:>18} {:>10}",
        "case",
        "vCPUs",
        "p50 us",
        "p99 us",
        "max us",
        "count",
        "p50/1 vCPU",
        "p99/1 vCPU",
        "unanswered"
    );
    for (name, n, runs) in &rows {
        let base = rows
            .iter()
            .find(|(b, m, _)| b == name && *m == 1)
            .map(|(_, _, b)| b);
        let figure =
            |f: fn(&Lat) -> u64| -> Vec<f64> { runs.iter().map(|c| f(&c.lat) as f64).collect() };
        // Each run over the 1-vCPU run of the same repetition.
        let ratio = |f: fn(&Lat) -> u64| {
            base.map_or("-".into(), |b| {
                let rs: Vec<f64> = runs
                    .iter()
                    .zip(b)
                    .map(|(c, b)| f(&c.lat) as f64 / f(&b.lat).max(1) as f64)
                    .collect();
                common::spread(&rs, 2)
            })
        };
        let count: u64 = runs.iter().map(|c| c.lat.count).sum();
        let unanswered: u64 = runs.iter().map(|c| c.unanswered).sum();
        println!(
            "{:<16} {:>6} {:>18} {:>18} {:>18} {:>6} {:>18} {:>18} {:>10}",
            name,
            n,
            common::spread(&figure(|l| l.p50), 0),
            common::spread(&figure(|l| l.p99), 0),
            common::spread(&figure(|l| l.max), 0),
            count,
            ratio(|l| l.p50),
            ratio(|l| l.p99),
            unanswered
        );
    }
    println!("(count and unanswered: summed over runs)");
    if let Some(plots) = plots {
        plot_pauses(plots, &rows);
    }
}

/// `pause` then `resume`, `pauses` times; the latencies the VM measured.
fn pause_all(_vm: &mut Vm, api: &mut Api, pauses: u64) -> Result<CaseResult> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    let mut unanswered = 0;
    for _ in 0..pauses {
        let p = api.call(r#"{"cmd":"pause"}"#, Duration::from_secs(5))?;
        if p["ok"] != true {
            return Err(format!("pause refused: {p}"));
        }
        let all = p["vcpus"]
            .as_array()
            .is_some_and(|v| v.iter().all(|v| v["answered"] == true));
        match p["latency_us"].as_u64() {
            Some(us) if all => {
                let _ = h.record(us.max(1));
            }
            _ => unanswered += 1,
        }
        let r = api.call(r#"{"cmd":"resume"}"#, Duration::from_secs(5))?;
        if r["ok"] != true {
            return Err(format!("resume refused: {r}"));
        }
    }
    Ok(CaseResult {
        state: "-".into(),
        lat: Lat::of(&h),
        unanswered,
        cdf: Value::Null,
        hist: Some(h),
    })
}

/// `UFVMM_BENCH_KICKS`, or the default.
fn kicks_per_case() -> u64 {
    match std::env::var("UFVMM_BENCH_KICKS") {
        Ok(v) => {
            let n: u64 = v
                .trim()
                .parse()
                .expect("UFVMM_BENCH_KICKS must be a whole number");
            // The control socket accepts 1..=100000 kicks per command.
            assert!(
                (1..=100_000).contains(&n),
                "UFVMM_BENCH_KICKS must be between 1 and 100000, got {n}"
            );
            n
        }
        Err(_) => DEFAULT_KICKS,
    }
}

/// What the VM must show before the kicks start.
#[derive(Clone, Copy)]
enum Ready {
    /// The guest's spin loop has sent a heartbeat, so it is in guest code.
    Spinning,
    /// The vCPU sleeps in the in-kernel HLT.
    Halted,
    /// The vCPU has been stalled on a missing page (`stalled_gpa` set) for at least
    /// 100 ms.
    Stalled,
}

#[derive(Clone, Copy)]
struct Lat {
    p50: u64,
    p99: u64,
    max: u64,
    count: u64,
}

impl Lat {
    /// A microsecond histogram's figures; zeros when it is empty.
    fn of(h: &Histogram<u64>) -> Lat {
        if h.is_empty() {
            return Lat {
                p50: 0,
                p99: 0,
                max: 0,
                count: 0,
            };
        }
        Lat {
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
            count: h.len(),
        }
    }

    /// p50, p99 and max, each over the floor's.
    fn ratio_to(&self, floor: &Lat) -> [f64; 3] {
        let r = |x: u64, f: u64| x as f64 / f.max(1) as f64;
        [
            r(self.p50, floor.p50),
            r(self.p99, floor.p99),
            r(self.max, floor.max),
        ]
    }
}

struct CaseResult {
    state: String,
    lat: Lat,
    unanswered: u64,
    /// The kick reply's `latency_us.cdf`, for the picture (null for a pause case).
    cdf: Value,
    /// A pause case's latencies, for the picture.
    hist: Option<Histogram<u64>>,
}

struct Row {
    case: String,
    state: String,
    lat: Lat,
    /// p50, p99 and max over the floor measured just before; `None` for the floor.
    ratio: Option<[f64; 3]>,
    unanswered: Option<u64>,
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<16} {:<9} {:>8} {:>8} {:>8} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "case",
        "state",
        "p50 us",
        "p99 us",
        "max us",
        "count",
        "p50/floor",
        "p99/floor",
        "max/floor",
        "unanswered"
    );
    for r in rows {
        let ratio = |i: usize| r.ratio.map_or("-".into(), |x| format!("{:.2}x", x[i]));
        let unanswered = r.unanswered.map_or("-".into(), |u| u.to_string());
        println!(
            "{:<16} {:<9} {:>8} {:>8} {:>8} {:>6} {:>10} {:>10} {:>10} {:>10}",
            r.case,
            r.state,
            r.lat.p50,
            r.lat.p99,
            r.lat.max,
            r.lat.count,
            ratio(0),
            ratio(1),
            ratio(2),
            unanswered
        );
    }
    println!();
}

/// Boots one VM with `vcpus` vCPUs, waits for the state, measures it with `measure`,
/// quits it.
fn run_case(
    bin: &Path,
    vcpus: u64,
    args: &[&str],
    ready: Ready,
    measure: impl FnOnce(&mut Vm, &mut Api) -> Result<CaseResult>,
) -> Result<CaseResult> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let sock = dir.path().join("api.sock");
    let mut vm = Vm::spawn(bin, vcpus, args, &sock, dir.path())?;
    let result = drive(&mut vm, &sock, ready, measure);
    // On error the VM's own words are the best clue.
    result.map_err(|e| format!("{e}\n--- ufvmm stderr (tail)\n{}", vm.stderr_tail()))
}

fn drive(
    vm: &mut Vm,
    sock: &Path,
    ready: Ready,
    measure: impl FnOnce(&mut Vm, &mut Api) -> Result<CaseResult>,
) -> Result<CaseResult> {
    let mut api = Api::connect(sock, vm)?;
    wait_ready(&mut api, vm, ready)?;
    let result = measure(vm, &mut api)?;
    let quit = api.call(r#"{"cmd":"quit"}"#, Duration::from_secs(5))?;
    if quit["ok"] != true {
        return Err(format!("quit refused: {quit}"));
    }
    vm.wait_exit(EXIT_LIMIT)?;
    Ok(result)
}

/// `kicks` kicks at vCPU 0.
fn kick(_vm: &mut Vm, api: &mut Api, kicks: u64) -> Result<CaseResult> {
    // The server waits up to 100 ms per unanswered kick; allow for all of them.
    let limit = Duration::from_secs(10) + Duration::from_millis(100) * kicks as u32;
    let reply = api.call(&format!(r#"{{"cmd":"kick","count":{kicks}}}"#), limit)?;
    if reply["ok"] != true {
        return Err(format!("kick failed: {reply}"));
    }
    let v = reply["vcpus"]
        .get(0)
        .ok_or_else(|| format!("kick reply without vcpus: {reply}"))?;
    let field = |k: &str| v["latency_us"][k].as_u64();
    let state = v["state"].as_str().unwrap_or("?").to_string();
    let unanswered = v["unanswered"].as_u64().unwrap_or(0);
    // An all-unanswered series has null percentiles; show zeros with the count.
    let lat = Lat {
        p50: field("p50").unwrap_or(0),
        p99: field("p99").unwrap_or(0),
        max: field("max").unwrap_or(0),
        count: field("count").unwrap_or(0),
    };
    Ok(CaseResult {
        state,
        lat,
        unanswered,
        cdf: v["latency_us"]["cdf"].clone(),
        hist: None,
    })
}

/// Polls `status` (and `stats` for heartbeats) until the case's state holds.
fn wait_ready(api: &mut Api, vm: &mut Vm, ready: Ready) -> Result<()> {
    let start = Instant::now();
    loop {
        vm.check_alive()?;
        let st = api.call(r#"{"cmd":"status"}"#, Duration::from_secs(5))?;
        let vs = st["vcpus"].as_array().cloned().unwrap_or_default();
        let every = |f: &dyn Fn(&Value) -> bool| !vs.is_empty() && vs.iter().all(f);
        let ok = match ready {
            Ready::Spinning => {
                every(&|v| v["state"] == "running") && {
                    let stats = api.call(r#"{"cmd":"stats"}"#, Duration::from_secs(5))?;
                    stats["vcpus"].as_array().is_some_and(|vs| {
                        vs.iter()
                            .all(|v| v["heartbeats"].as_u64().unwrap_or(0) >= 1)
                    })
                }
            }
            Ready::Halted => every(&|v| v["state"] == "halted"),
            // Shorter stalls are ordinary demand paging.
            Ready::Stalled => every(&|v| {
                v["state"] == "stalled"
                    && !v["stalled_gpa"].is_null()
                    && v["stalled_ms"].as_u64().is_some_and(|ms| ms >= 100)
            }),
        };
        if ok {
            return Ok(());
        }
        if start.elapsed() > READY_LIMIT {
            return Err(format!(
                "the vCPUs did not reach the expected state in {READY_LIMIT:?}: {st}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM process; killed on drop unless it already exited.
struct Vm {
    child: Child,
    stderr: PathBuf,
}

impl Vm {
    fn spawn(bin: &Path, vcpus: u64, args: &[&str], sock: &Path, dir: &Path) -> Result<Vm> {
        // Output goes to files: pipes nobody drains could fill and block the VM.
        let stdout = dir.join("stdout.txt");
        let stderr = dir.join("stderr.txt");
        let out = std::fs::File::create(&stdout).map_err(|e| format!("{stdout:?}: {e}"))?;
        let err = std::fs::File::create(&stderr).map_err(|e| format!("{stderr:?}: {e}"))?;
        let child = Command::new(bin)
            .args(["run", "--vcpus", &vcpus.to_string(), "--mem", "64M"])
            .args(args)
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        Ok(Vm { child, stderr })
    }

    /// Fails if the VM has already exited.
    fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(format!("ufvmm exited early ({st})")),
            Err(e) => Err(format!("waitpid: {e}")),
        }
    }

    /// Waits up to `limit` for the VM to exit; kills it if it does not.
    fn wait_exit(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if start.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    self.kill();
                    return Err(format!("ufvmm did not exit within {limit:?} of quit"));
                }
                Err(e) => return Err(format!("waitpid: {e}")),
            }
        }
    }

    fn kill(&mut self) {
        // Errors mean it is already gone, which is what we want.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// A control-socket client: one JSON line out, one JSON line back, each bounded.
struct Api {
    stream: UnixStream,
    /// Bytes read past the last reply line.
    buf: Vec<u8>,
}

impl Api {
    /// Connects, retrying while the VM starts (up to [`CONNECT_LIMIT`]).
    fn connect(path: &Path, vm: &mut Vm) -> Result<Api> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    return Ok(Api {
                        stream,
                        buf: Vec::new(),
                    })
                }
                Err(e) if start.elapsed() > CONNECT_LIMIT => {
                    return Err(format!("no control socket at {path:?}: {e}"))
                }
                Err(_) => {
                    vm.check_alive()?;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Sends `line` and returns the parsed reply, failing after `limit`.
    fn call(&mut self, line: &str, limit: Duration) -> Result<Value> {
        let deadline = Instant::now() + limit;
        self.stream
            .set_write_timeout(Some(limit))
            .map_err(|e| format!("set_write_timeout: {e}"))?;
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("sending {line}: {e}"))?;
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let reply: Vec<u8> = self.buf.drain(..=nl).collect();
                return serde_json::from_slice(&reply).map_err(|e| {
                    format!(
                        "bad reply to {line}: {e}: {}",
                        String::from_utf8_lossy(&reply)
                    )
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no reply to {line} within {limit:?}"));
            }
            // The timeout is per read, so re-arm it with what is left of the deadline.
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| format!("set_read_timeout: {e}"))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(format!("control socket closed while waiting for {line}")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading the reply to {line}: {e}")),
            }
        }
    }
}
