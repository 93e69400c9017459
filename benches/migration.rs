//! Postcopy migration of a 256 MiB guest running `verify` (2 vCPUs), three links: none,
//! 100 MiB/s, and a 2 s stall shortly after switch-over. Baseline, measured in the same
//! run: the same number of bytes pushed through a loopback TCP connection by two plain
//! threads (what the network path alone costs here). Reports migration time (source
//! stop to the last page), the ratio to the baseline, downtime, per-vCPU blocktime and
//! pages never received, from the destination's report.
//!
//! Run with `cargo bench --bench migration`; `UFVMM_BENCH_REPS` sets runs per link
//! (default 3, the median is shown). Needs /dev/kvm.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const LINKS: [(&str, &str); 3] = [
    ("no link model", ""),
    ("100 MiB/s", "bandwidth=100MiB/s"),
    // The source switches over 3 s after its start; the proxy starts just before it.
    ("2 s stall", "stall=2s@3400ms"),
];

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("migration: /dev/kvm is missing; this bench needs real KVM");
        std::process::exit(1);
    }
    let reps = common::reps(3);
    println!("migration: 256 MiB, 2 vCPUs, verify:seconds=10, switch-over at 3 s, {reps} run(s) per link");
    let mut rows = Vec::new();
    for (name, link) in LINKS {
        let mut runs = Vec::new();
        for rep in 1..=reps {
            let base_ms = loopback_ms(256 << 20);
            let r = match migrate(link) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("migration: {name}: {e}");
                    std::process::exit(1);
                }
            };
            let m = &r["migration"];
            let total = m["total_ms"].as_f64().unwrap_or(f64::NAN);
            println!(
                "  rep {rep}/{reps} {name:<14} total {total:>7.0} ms  {:>5.1} MiB  zero pages {:>5}  loopback {base_ms:>5.0} ms  downtime {:>5.1} ms  blocktime {} ms  never received {}",
                m["bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
                m["pages"]["zero"],
                m["downtime_ms"].as_f64().unwrap_or(f64::NAN),
                m["blocktime_ms"],
                m["pages"]["never_received"]
            );
            runs.push((total, base_ms, r));
        }
        rows.push((name, runs));
    }
    println!();
    println!(
        "{:<14} {:>9} {:>12} {:>9} {:>12} {:>22} {:>6}",
        "link", "total ms", "loopback ms", "ratio", "downtime ms", "blocktime ms (max)", "lost"
    );
    for (name, runs) in rows {
        let med =
            |f: &dyn Fn(&(f64, f64, Value)) -> f64| common::median(runs.iter().map(f).collect());
        let total = med(&|r| r.0);
        let base = med(&|r| r.1);
        let down = med(&|r| r.2["migration"]["downtime_ms"].as_f64().unwrap_or(f64::NAN));
        let block = med(&|r| {
            r.2["migration"]["blocktime_ms"]
                .as_array()
                .map_or(f64::NAN, |a| {
                    a.iter().filter_map(Value::as_f64).fold(0.0, f64::max)
                })
        });
        let lost: u64 = runs
            .iter()
            .map(|r| {
                r.2["migration"]["pages"]["never_received"]
                    .as_u64()
                    .unwrap_or(u64::MAX)
            })
            .max()
            .unwrap_or(0);
        println!(
            "{name:<14} {total:>9.0} {base:>12.0} {:>8.1}x {down:>12.1} {block:>22.0} {lost:>6}",
            total / base
        );
    }
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

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ufvmm ARGS`, returns it and the port of its "listening on" line.
fn listening(args: &[&str], log: &Path) -> Result<(Kill, u16), String> {
    let err = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ufvmm"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let k = Kill(child);
    let mut lines = BufReader::new(out);
    let mut line = String::new();
    lines.read_line(&mut line).map_err(|e| e.to_string())?;
    // Drain the rest (the guest console) so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
    let port = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split([',', '\n']).next())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("no port in {line:?}"))?;
    Ok((k, port))
}

/// One migration; returns the destination's report.
fn migrate(link: &str) -> Result<Value, String> {
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
    let log = std::fs::File::create(dir.path().join("source.log")).map_err(|e| e.to_string())?;
    let st = Command::new(env!("CARGO_BIN_EXE_ufvmm"))
        .args(["run", "--mem", "256M", "--workload", "verify:seconds=10"])
        .args([
            "--migrate-to",
            &format!("127.0.0.1:{port}"),
            "--migrate-at",
            "3s",
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
    let text = std::fs::read_to_string(&report).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}
