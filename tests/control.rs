//! The control socket at its edges: a migration destination controllable before any
//! migration arrives, and a cap on connections held open at once.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

/// `ufvmm incoming` on a free port with a socket and a report, before any migration;
/// returns it, its listen address as it printed it, and the scratch directory.
fn waiting_destination() -> (Proc, String, tempfile::TempDir) {
    let dir = scratch();
    let mut child = ufvmm()
        .args(["incoming", "--listen", "127.0.0.1:0", "--api-sock"])
        .arg(path_in(&dir, "dest.sock"))
        .arg("--report")
        .arg(path_in(&dir, "dest.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn incoming");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("first line");
    let listen = line
        .trim()
        .rsplit("listening on ")
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(listen.starts_with("127.0.0.1:"), "{line:?}");
    // Keep draining stdout so the guest console never fills the pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = out.read_to_string(&mut sink);
    });
    (Proc::new(child), listen, dir)
}

#[test]
fn a_waiting_destination_answers_status_refuses_vm_commands_and_quits() {
    if !kvm_or_skip("a_waiting_destination_answers_status_refuses_vm_commands_and_quits") {
        return;
    }
    let (proc, listen, dir) = waiting_destination();
    let sock = path_in(&dir, "dest.sock");
    let mut api = Api::connect(&sock);
    let t = Instant::now();
    let st = api.cmd("status");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "status took {:?}",
        t.elapsed()
    );
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["vcpus"], serde_json::json!([]), "{st}");
    assert_eq!(st["migration"]["state"], "waiting", "{st}");
    assert_eq!(st["migration"]["listen"], listen.as_str(), "{st}");
    for cmd in [
        "pause",
        "resume",
        "stats",
        "wake",
        "kick",
        "migrate-recover",
        "migrate-cancel",
    ] {
        let r = api.cmd(cmd);
        assert_eq!(r["ok"], false, "{cmd}: {r}");
        let e = r["error"].as_str().unwrap_or_default();
        assert!(e.contains("waiting for a migration"), "{cmd}: {r}");
    }
    assert_eq!(api.cmd("nonsense")["ok"], false);
    assert_eq!(api.cmd("quit")["ok"], true);
    let r = wait_with_timeout(proc, LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    assert!(r.stderr.contains("no VM"), "{}", r.explain());
    let rep = read_report(&path_in(&dir, "dest.json"));
    assert_eq!(rep["exit_code"], 0, "{rep}");
    assert_eq!(rep["vm"], Value::Null, "{rep}");
    assert!(
        rep["reason"].as_str().unwrap_or_default().contains("no VM"),
        "{rep}"
    );
    assert_eq!(rep["migration"]["state"], "waiting", "{rep}");
    assert_eq!(rep["vcpus"], serde_json::json!([]), "{rep}");
    assert!(!sock.exists(), "the socket is removed at the end");
}

#[test]
fn signals_stop_a_waiting_destination_with_a_report() {
    if !kvm_or_skip("signals_stop_a_waiting_destination_with_a_report") {
        return;
    }
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let (proc, _listen, dir) = waiting_destination();
        let mut api = Api::connect(&path_in(&dir, "dest.sock"));
        assert_eq!(api.cmd("status")["migration"]["state"], "waiting");
        signal(proc.id(), sig);
        let r = wait_with_timeout(proc, LIMIT);
        assert_eq!(r.code(), Some(code), "{}", r.explain());
        let rep = read_report(&path_in(&dir, "dest.json"));
        assert_eq!(rep["exit_code"], code, "{rep}");
        assert_eq!(rep["vm"], Value::Null, "{rep}");
    }
}

#[test]
fn a_connection_made_while_waiting_goes_on_controlling_the_migrated_vm() {
    if !kvm_or_skip("a_connection_made_while_waiting_goes_on_controlling_the_migrated_vm") {
        return;
    }
    let (dest, listen, dir) = waiting_destination();
    let mut api = Api::connect(&path_in(&dir, "dest.sock"));
    assert_eq!(api.cmd("status")["migration"]["state"], "waiting");
    let src = spawn_run(&[
        "--mem",
        "64M",
        "--workload",
        "verify:seconds=4",
        "--migrate-to",
        &listen,
        "--migrate-at",
        "500ms",
    ]);
    // The same connection sees the VM once it exists, still with the listen address.
    let st = api.wait_status(LIMIT, |st| vcpus(st).len() == 2);
    assert_eq!(st["migration"]["role"], "destination", "{st}");
    assert_eq!(st["migration"]["listen"], listen.as_str(), "{st}");
    assert_eq!(api.cmd("stats")["ok"], true);
    let s = wait_with_timeout(src, LIMIT);
    assert_eq!(s.code(), Some(0), "source: {}", s.explain());
    let d = wait_with_timeout(dest, LIMIT);
    assert_eq!(d.code(), Some(0), "destination: {}", d.explain());
    let rep = read_report(&path_in(&dir, "dest.json"));
    assert_eq!(rep["migration"]["state"], "completed", "{rep}");
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// Reads one line (with a deadline) and then expects the end of the stream.
fn one_line_then_eof(s: &UnixStream) -> (String, bool) {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut line = String::new();
    let _ = r.read_line(&mut line);
    let mut rest = Vec::new();
    let eof = r.read_to_end(&mut rest).is_ok() && rest.is_empty();
    (line, eof)
}

/// Reads one line (with a deadline); the connection may stay open.
fn read_line_within(s: &UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut line = String::new();
    let _ = BufReader::new(s.try_clone().expect("clone")).read_line(&mut line);
    line
}

#[test]
fn connections_over_the_cap_are_refused_and_status_answers_once_others_close() {
    if !kvm_or_skip("connections_over_the_cap_are_refused_and_status_answers_once_others_close") {
        return;
    }
    let mut vm = LiveVm::start(&["--vcpus", "1", "--mem", "16M", "--workload", "spin:ms=0"]);
    let pid = vm.pid();
    assert_eq!(vm.api.cmd("status")["ok"], true);
    let base = threads(pid);
    // The LiveVm's own connection is one of the cap.
    let cap = ufvmm::control::api::MAX_CONNECTIONS;
    let mut held: Vec<Api> = (1..cap).map(|_| Api::connect(&vm.sock)).collect();
    for a in held.iter_mut() {
        assert_eq!(
            a.cmd("status")["ok"],
            true,
            "connections under the cap are served"
        );
    }
    // Many more: each gets one error line and is closed; none gets a thread.
    let extra: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&vm.sock).expect("connect"))
        .collect();
    for s in &extra {
        let (line, eof) = one_line_then_eof(s);
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(v["ok"], false, "{v}");
        assert!(
            v["error"].as_str().unwrap_or_default().contains("too many"),
            "{v}"
        );
        assert!(eof, "a refused connection is closed after its error line");
    }
    let now = threads(pid);
    assert!(
        now <= base + cap,
        "{now} threads with {cap} connections held and 200 refused (base {base})"
    );
    // Once some close, a fresh connection is served at once.
    held.truncate(cap / 2);
    let t = Instant::now();
    let st = loop {
        let mut c = UnixStream::connect(&vm.sock).expect("connect");
        // A refused connection may be closed before this write: ignore its error.
        let _ = c.write_all(b"{\"cmd\":\"status\"}\n");
        let line = read_line_within(&c);
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v["ok"] == true {
                break v;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "no slot freed: {line}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(vcpus(&st).len(), 1, "{st}");
    drop(extra);
    drop(held);
    let (r, _) = vm.quit(LIMIT);
    assert_eq!(r.code(), Some(0));
}
