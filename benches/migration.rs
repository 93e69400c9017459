//! Postcopy migration of a 256 MiB guest running `verify` (2 vCPUs), four cases: no
//! link, no link with a quiet guest (written, then halted: the stream alone, the VMM's
//! own cost), 100 MiB/s, and a 2 s stall shortly after switch-over. Baseline, measured in the same
//! run: the same number of bytes pushed through a loopback TCP connection by two plain
//! threads (what the network path alone costs here). Reports migration time (source
//! stop to the last page), the ratio to the baseline, downtime (median and spread),
//! pages sent against pages of RAM (and duplicates received), the destination's
//! per-request latency (ask to install, p50/p99), per-vCPU blocktime and pages never
//! received, from both sides' reports.
//!
//! Run with `cargo bench --bench migration`; `UFVMM_BENCH_REPS` sets runs per link
//! (default 3, the median is shown), `UFVMM_BENCH_LINKS` picks links by name
//! (comma-separated: `none`, `quiet`, `bandwidth`, `stall`; default all), `UFVMM_BENCH_UFVMM`
//! runs another ufvmm binary (to compare builds in one run). `UFVMM_BENCH_PLOT=DIR` or
//! `--plot DIR` (`cargo bench --bench migration -- --plot DIR`) also draws, after the
//! table, `ufvmm plot`'s pictures of the first run of each link, labelled by the link's
//! key: the destinations' reports go to `DIR/reports/<link>.json`, their fault latency
//! to `DIR/fault-latency.svg` and their migration timelines to
//! `DIR/migration-timeline.svg` (when the reports have them). Needs /dev/kvm.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};

use common::child::Kill;
use common::plot::Plots;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The busy guest: both vCPUs keep checking and rewriting all their pages.
const BUSY: (&str, &str) = ("verify:seconds=10", "3s");

/// Key, name, link spec, and (workload, switch-over time).
const LINKS: [(&str, &str, &str, (&str, &str)); 4] = [
    ("none", "no link model", "", BUSY),
    // A quiet guest: memory written (in ~2 s), then both vCPUs halt for 8 s, so the
    // postcopy stream has the machine to itself: the VMM's own cost against loopback.
    (
        "quiet",
        "none, quiet guest",
        "",
        ("verify:rounds=1,idle=8000", "5s"),
    ),
    ("bandwidth", "100 MiB/s", "bandwidth=100MiB/s", BUSY),
    // The source switches over 3 s after its start; the proxy starts just before it.
    ("stall", "2 s stall", "stall=2s@3400ms", BUSY),
];

/// One migration's figures.
struct Run {
    total_ms: f64,
    loopback_ms: f64,
    /// Writing the same bytes into freshly mapped memory: what the destination's kernel
    /// must do for every page it installs, whoever sends it.
    touch_ms: f64,
    dest: Value,
    source: Value,
}

impl Run {
    fn down(&self) -> f64 {
        self.dest["downtime_ms"].as_f64().unwrap_or(f64::NAN)
    }
    fn lat(&self, q: &str) -> f64 {
        self.dest["request_latency_us"][q]
            .as_f64()
            .unwrap_or(f64::NAN)
    }
    /// Pages on the wire (each send counts) against pages of RAM.
    fn sent_ratio(&self) -> f64 {
        let p = &self.source["pages"];
        let n = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
        (n("precopy") + n("urgent") + n("background")) / n("total")
    }
    fn dups(&self) -> u64 {
        self.dest["pages"]["duplicates"]
            .as_u64()
            .unwrap_or(u64::MAX)
    }
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("migration: /dev/kvm is missing; this bench needs real KVM");
        std::process::exit(1);
    }
    let reps = common::reps(3);
    let pick = std::env::var("UFVMM_BENCH_LINKS").unwrap_or_default();
    let links: Vec<_> = LINKS
        .iter()
        .filter(|(key, _, _, _)| pick.is_empty() || pick.split(',').any(|p| p.trim() == *key))
        .collect();
    if links.is_empty() {
        eprintln!(
            "migration: UFVMM_BENCH_LINKS={pick:?} names none of none, quiet, bandwidth, stall"
        );
        std::process::exit(1);
    }
    let plots = Plots::asked();
    println!("migration: 256 MiB, 2 vCPUs, verify:seconds=10 switched over at 3 s (quiet: verify:rounds=1,idle=8000 at 5 s), {reps} run(s) per link");
    let mut rows = Vec::new();
    // Interleaved: each rep runs every link once, so load changes hit all alike.
    let mut runs: Vec<Vec<Run>> = links.iter().map(|_| Vec::new()).collect();
    // The first run's destination report of each link, for the pictures.
    let mut reports: Vec<(String, Value)> = Vec::new();
    for rep in 1..=reps {
        for (i, (_, name, link, guest)) in links.iter().enumerate() {
            let loopback_ms = loopback_ms(256 << 20);
            let touch_ms = first_touch_ms(256 << 20);
            let (dest, source) = match migrate(link, *guest) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("migration: {name}: {e}");
                    std::process::exit(1);
                }
            };
            let m = &dest["migration"];
            let r = Run {
                total_ms: m["total_ms"].as_f64().unwrap_or(f64::NAN),
                loopback_ms,
                touch_ms,
                dest: m.clone(),
                source: source["migration"].clone(),
            };
            println!(
                "  rep {rep}/{reps} {name:<14} total {:>7.0} ms  {:>5.1} MiB  zero pages {:>5}  loopback {loopback_ms:>5.0} ms  first touch {touch_ms:>4.0} ms  downtime {:>5.1} ms  sent {:.3}x RAM  duplicates {}  latency p50/p99 {:.0}/{:.0} us  blocktime {} ms  never received {}",
                r.total_ms,
                m["bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                m["pages"]["zero"],
                r.down(),
                r.sent_ratio(),
                r.dups(),
                r.lat("p50"),
                r.lat("p99"),
                m["blocktime_ms"],
                m["pages"]["never_received"]
            );
            runs[i].push(r);
            if rep == 1 && plots.is_some() {
                reports.push((links[i].0.to_string(), dest));
            }
        }
    }
    for ((_, name, _, _), runs) in links.iter().zip(runs) {
        rows.push((name, runs));
    }
    println!();
    println!(
        "{:<14} {:>9} {:>12} {:>7} {:>9} {:>8} {:>20} {:>9} {:>5} {:>17} {:>14} {:>6}",
        "link",
        "total ms",
        "loopback ms",
        "ratio",
        "touch ms",
        "vs floor",
        "downtime ms (range)",
        "sent/RAM",
        "dups",
        "latency p50/p99",
        "blocktime max",
        "lost"
    );
    for (name, runs) in rows {
        let med = |f: &dyn Fn(&Run) -> f64| common::median(runs.iter().map(f).collect());
        let total = med(&|r| r.total_ms);
        let base = med(&|r| r.loopback_ms);
        let ratio = med(&|r| r.total_ms / r.loopback_ms);
        let touch = med(&|r| r.touch_ms);
        let floor = med(&|r| r.total_ms / (r.loopback_ms + r.touch_ms));
        let downs: Vec<f64> = runs.iter().map(Run::down).collect();
        let (dlo, dhi) = common::min_max(&downs);
        let down = common::median(downs);
        let sent = med(&|r| r.sent_ratio());
        let dups = runs.iter().map(Run::dups).max().unwrap_or(0);
        let (p50, p99) = (med(&|r| r.lat("p50")), med(&|r| r.lat("p99")));
        let block = med(&|r| {
            r.dest["blocktime_ms"].as_array().map_or(f64::NAN, |a| {
                a.iter().filter_map(Value::as_f64).fold(0.0, f64::max)
            })
        });
        let lost: u64 = runs
            .iter()
            .map(|r| {
                r.dest["pages"]["never_received"]
                    .as_u64()
                    .unwrap_or(u64::MAX)
            })
            .max()
            .unwrap_or(0);
        println!(
            "{name:<14} {total:>9.0} {base:>12.0} {ratio:>6.2}x {touch:>9.0} {floor:>7.2}x {:>20} {sent:>8.3}x {dups:>5} {:>17} {block:>11.0} ms {lost:>6}",
            format!("{down:.1} ({dlo:.1}-{dhi:.1})"),
            format!("{p50:.0}/{p99:.0} us"),
        );
    }
    println!("(ratio: median of each run's total / its loopback push; touch: writing 256 MiB into fresh memory, 4 KiB at a time; vs floor: total / (loopback + touch); sent/RAM: pages sent by the source, every send counted, over pages of RAM; dups: most duplicates a destination received)");
    if let Some(mut plots) = plots {
        plots.reports(None, &reports);
        plots.finish();
    }
}

/// The binary to run: this build's, or `UFVMM_BENCH_UFVMM` (to set builds side by side).
fn ufvmm() -> String {
    std::env::var("UFVMM_BENCH_UFVMM").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ufvmm").to_string())
}

/// Milliseconds to write `bytes` into freshly mapped anonymous memory, a 4 KiB page at
/// a time: the host's own page allocation, which a destination pays for every page it
/// installs (here a first touch costs several times a copy; see the note of issue 10).
fn first_touch_ms(bytes: usize) -> f64 {
    let page = [0x5au8; 4096];
    let start = Instant::now();
    // Vec's allocation of this size is a fresh mmap: every page is first touched here.
    let mut v: Vec<u8> = Vec::with_capacity(bytes);
    while v.len() < bytes {
        v.extend_from_slice(&page);
    }
    let ms = start.elapsed().as_secs_f64() * 1e3;
    std::hint::black_box(&v);
    ms
}

/// Milliseconds to push `bytes` through a loopback TCP connection, 64 KiB writes.
fn loopback_ms(bytes: usize) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0;
        while got < bytes {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    let chunk = vec![0x5au8; 1 << 16];
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).expect("write");
        sent += chunk.len();
    }
    let got = reader.join().expect("reader");
    assert_eq!(got, bytes);
    start.elapsed().as_secs_f64() * 1e3
}

/// Starts `ufvmm ARGS`, returns it and the port of its "listening on" line.
fn listening(args: &[&str], log: &Path) -> Result<(Kill, u16), String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut k = common::child::spawn(Path::new(&ufvmm()), &args, log, Stdio::piped())?;
    let port = common::child::listen_port(&mut k)?;
    Ok((k, port))
}

/// One migration; returns the destination's report and the source's.
fn migrate(link: &str, (workload, at): (&str, &str)) -> Result<(Value, Value), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let report = dir.path().join("dest.json");
    let rep = report.to_string_lossy().to_string();
    let (mut dest, mut port) = listening(
        &["incoming", "--listen", "127.0.0.1:0", "--report", &rep],
        &dir.path().join("dest.log"),
    )?;
    let _proxy = if link.is_empty() {
        None
    } else {
        let p = port.to_string();
        let (k, pp) = listening(
            &[
                "link-proxy",
                "--listen",
                "0",
                "--connect",
                &p,
                "--link",
                link,
            ],
            &dir.path().join("proxy.log"),
        )?;
        port = pp;
        Some(k)
    };
    let src_report = dir.path().join("source.json");
    let src_rep = src_report.to_string_lossy().to_string();
    let log = std::fs::File::create(dir.path().join("source.log")).map_err(|e| e.to_string())?;
    let st = Command::new(ufvmm())
        .args(["run", "--mem", "256M", "--workload", workload])
        .args([
            "--migrate-to",
            &format!("127.0.0.1:{port}"),
            "--migrate-at",
            at,
            "--report",
            &src_rep,
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("source exited {st}"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = dest.0.try_wait().map_err(|e| e.to_string())? {
            if !st.success() {
                return Err(format!("destination exited {st}"));
            }
            break;
        }
        if Instant::now() > deadline {
            return Err("destination did not finish".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let read = |p: &Path| -> Result<Value, String> {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        serde_json::from_str(&text).map_err(|e| e.to_string())
    };
    Ok((read(&report)?, read(&src_report)?))
}
