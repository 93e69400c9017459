//! Helpers for the migration tests: destinations, sources and link proxies as real
//! `ufvmm` processes over loopback.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::*;

pub const LIMIT: Duration = Duration::from_secs(90);

/// A process that prints "listening on ADDR" first: the address's port, and its
/// stdout drained on a thread (so the guest console never fills the pipe).
pub struct Listening {
    pub proc: Proc,
    pub port: u16,
    pub out: JoinHandle<String>,
}

pub fn spawn_listening(args: &[&str]) -> Listening {
    let mut child = ufvmm()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("first line");
    let port = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split([',', '\n']).next())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let out = std::thread::spawn(move || {
        let mut s = line;
        let _ = out.read_to_string(&mut s);
        s
    });
    Listening {
        proc: Proc::new(child),
        port,
        out,
    }
}

/// `ufvmm incoming` on a free port, with a control socket and a report.
pub struct Dest {
    pub l: Listening,
    pub sock: std::path::PathBuf,
    pub report: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Dest {
    pub fn start() -> Dest {
        Self::start_in(scratch(), &[])
    }

    /// As [`Dest::start`], in `dir`, with `extra` arguments.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Dest {
        let sock = path_in(&dir, "dest.sock");
        let report = path_in(&dir, "dest.json");
        let mut args = vec![
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--api-sock",
            s(&sock),
            "--report",
            s(&report),
        ];
        args.extend_from_slice(extra);
        let l = spawn_listening(&args);
        Dest {
            l,
            sock,
            report,
            _dir: dir,
        }
    }

    /// Waits for the end; returns the run (stdout included) and the report.
    pub fn finish(self) -> (Run, Value) {
        let Dest { l, report, .. } = self;
        let mut r = wait_with_timeout(l.proc, LIMIT);
        r.stdout = l.out.join().unwrap_or_default();
        let rep = read_report(&report);
        (r, rep)
    }
}

/// A link proxy in front of `port`; returns it and its own port.
pub fn proxy(port: u16, link: &str) -> Listening {
    spawn_listening(&[
        "link-proxy",
        "--listen",
        "0",
        "--connect",
        &port.to_string(),
        "--link",
        link,
    ])
}

/// Starts the source: `secs` of verify rounds on 2 vCPUs, migrating to `port` after
/// `at`.
pub fn source(port: u16, mem: &str, secs: u32, at: &str, extra: &[&str]) -> Proc {
    source_in("user", port, mem, secs, at, extra)
}

/// As [`source`], with the workload at CPL3 (`user`) or CPL0 (`kernel`).
pub fn source_in(mode: &str, port: u16, mem: &str, secs: u32, at: &str, extra: &[&str]) -> Proc {
    let workload = format!("verify:seconds={secs}");
    let to = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--mode",
        mode,
        "--mem",
        mem,
        "--workload",
        &workload,
        "--migrate-to",
        &to,
        "--migrate-at",
        at,
    ];
    args.extend_from_slice(extra);
    spawn_run(&args)
}

/// The guest came through: exit 0 on both sides, every vCPU verified with no
/// mismatch, every page arrived. Returns the destination's migration section.
pub fn assert_migrated(src: Run, dest: (Run, Value)) -> Value {
    let (d, rep) = dest;
    assert_eq!(src.code(), Some(0), "source: {}", src.explain());
    assert!(
        src.stderr.contains("migrated to 127.0.0.1:"),
        "{}",
        src.explain()
    );
    assert_eq!(d.code(), Some(0), "destination: {}", d.explain());
    let results = rep["guest"]["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{rep}");
    for r in results {
        assert_eq!(r["mismatches"], 0, "{rep}");
        assert!(r["pages"].as_u64().unwrap_or(0) > 0, "{rep}");
    }
    let m = rep["migration"].clone();
    assert_eq!(m["state"], "completed", "{m}");
    assert_eq!(m["pages"]["never_received"], 0, "{m}");
    // The page tables (PML4, PDPT, 4 PDs) at least came with the switch-over, before
    // any vCPU ran here: a wait for one of those must never be escalated. After precopy
    // rounds only those written since their precopy copy come with it (the others are
    // here already, and a page is not sent twice).
    let (critical, precopy) = (
        m["pages"]["critical"].as_u64().unwrap_or(0),
        m["pages"]["precopy"].as_u64().unwrap_or(0),
    );
    if precopy == critical {
        assert!(critical >= 6, "{m}");
    } else {
        assert!(precopy >= 16384 + critical, "{m}");
    }
    assert!(m["downtime_ms"].as_f64().is_some(), "{m}");
    assert_eq!(m["blocktime_ms"].as_array().map(Vec::len), Some(2), "{m}");
    m
}

/// The source heard that the destination did not start the guest, ran it on itself to
/// the end (exit 0, every vCPU reported success), and its report says the migration
/// failed.
pub fn assert_guest_stayed(src: &Run, rep: &Value) {
    assert_guest_stayed_saying(src, rep, "did not start the guest");
}

/// As [`assert_guest_stayed`], with the source's stderr saying `said`.
pub fn assert_guest_stayed_saying(src: &Run, rep: &Value, said: &str) {
    assert_eq!(src.code(), Some(0), "{}", src.explain());
    assert!(src.stderr.contains(said), "{}", src.explain());
    assert_eq!(
        rep["reason"], "guest finished: every vcpu reported success",
        "{rep}"
    );
    assert_eq!(rep["migration"]["state"], "failed", "{rep}");
}

/// Migrates a 30 s guest into `dest` through an 8 MiB/s proxy and kills the source
/// (SIGKILL) once postcopy has brought some pages: the destination is then
/// postcopy-paused. Returns it with a control connection.
pub fn source_killed_mid_postcopy(dest: Dest) -> (Dest, Api) {
    let p = proxy(dest.l.port, "bandwidth=8MiB/s");
    let src = source(p.port, "64M", 30, "1s", &[]);
    let mut api = Api::connect(&dest.sock);
    api.wait_status(Duration::from_secs(20), |st| {
        st["migration"]["state"] == "postcopy"
            && st["migration"]["pages"]["background"].as_u64() > Some(100)
    });
    drop(src); // SIGKILL
    api.wait_status(Duration::from_secs(10), |st| {
        st["migration"]["state"] == "postcopy-paused"
    });
    (dest, api)
}
