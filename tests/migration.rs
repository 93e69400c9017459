//! Postcopy migration between two ufvmm processes over loopback, through the link
//! proxy where the network misbehaves. Every test is judged by the guest's own
//! `verify`: the destination exits 0 only if every vCPU's rounds found every pattern
//! intact (0 mismatches), and the report must say no page was lost.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use ufvmm::migration::wire::{self, Message};

const LIMIT: Duration = Duration::from_secs(90);

/// A process that prints "listening on ADDR" first: the address's port, and its
/// stdout drained on a thread (so the guest console never fills the pipe).
struct Listening {
    proc: Proc,
    port: u16,
    out: JoinHandle<String>,
}

fn spawn_listening(args: &[&str]) -> Listening {
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
struct Dest {
    l: Listening,
    sock: std::path::PathBuf,
    report: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Dest {
    fn start() -> Dest {
        let dir = scratch();
        let sock = path_in(&dir, "dest.sock");
        let report = path_in(&dir, "dest.json");
        let l = spawn_listening(&[
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--api-sock",
            s(&sock),
            "--report",
            s(&report),
        ]);
        Dest {
            l,
            sock,
            report,
            _dir: dir,
        }
    }

    /// Waits for the end; returns the run (stdout included) and the report.
    fn finish(self) -> (Run, Value) {
        let Dest { l, report, .. } = self;
        let mut r = wait_with_timeout(l.proc, LIMIT);
        r.stdout = l.out.join().unwrap_or_default();
        let rep = read_report(&report);
        (r, rep)
    }
}

/// A link proxy in front of `port`; returns it and its own port.
fn proxy(port: u16, link: &str) -> Listening {
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
fn source(port: u16, mem: &str, secs: u32, at: &str, extra: &[&str]) -> Proc {
    source_in("user", port, mem, secs, at, extra)
}

/// As [`source`], with the workload at CPL3 (`user`) or CPL0 (`kernel`).
fn source_in(mode: &str, port: u16, mem: &str, secs: u32, at: &str, extra: &[&str]) -> Proc {
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
fn assert_migrated(src: Run, dest: (Run, Value)) -> Value {
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
    assert!(m["downtime_ms"].as_f64().is_some(), "{m}");
    assert_eq!(m["blocktime_ms"].as_array().map(Vec::len), Some(2), "{m}");
    m
}

#[test]
fn migrates_with_no_link_model() {
    if !kvm_or_skip("migrates_with_no_link_model") {
        return;
    }
    let dest = Dest::start();
    let src = wait_with_timeout(source(dest.l.port, "64M", 6, "1s", &[]), LIMIT);
    let m = assert_migrated(src, dest.finish());
    let pages = &m["pages"];
    let moved = pages["urgent"].as_u64().unwrap() + pages["background"].as_u64().unwrap();
    assert!(moved >= 16384, "every page moved after switch-over: {m}");
    assert_eq!(m["connection_breaks"], 0, "{m}");
}

#[test]
fn migrates_a_kernel_mode_guest() {
    if !kvm_or_skip("migrates_a_kernel_mode_guest") {
        return;
    }
    // CPL0 guest code runs in KVM's emulator on this host: state and faults take the
    // other path.
    let dest = Dest::start();
    let src = wait_with_timeout(source_in("kernel", dest.l.port, "64M", 6, "1s", &[]), LIMIT);
    assert_migrated(src, dest.finish());
}

#[test]
fn latency_and_a_bandwidth_cap_slow_the_stream_but_lose_nothing() {
    if !kvm_or_skip("latency_and_a_bandwidth_cap_slow_the_stream_but_lose_nothing") {
        return;
    }
    let dest = Dest::start();
    let p = proxy(dest.l.port, "latency=2ms,bandwidth=16MiB/s");
    let src = wait_with_timeout(source(p.port, "64M", 6, "1s", &[]), LIMIT);
    let m = assert_migrated(src, dest.finish());
    // The link really capped it: the bytes after switch-over took their time.
    let bytes = m["bytes"].as_f64().unwrap();
    let total_s = m["total_ms"].as_f64().unwrap() / 1000.0;
    let floor = bytes / (16.0 * 1048576.0) * 0.8;
    assert!(
        total_s >= floor,
        "{bytes} bytes in {total_s} s: faster than the cap ({m})"
    );
}

#[test]
fn a_two_second_stall_holds_pages_back_but_kicks_still_land() {
    if !kvm_or_skip("a_two_second_stall_holds_pages_back_but_kicks_still_land") {
        return;
    }
    let dest = Dest::start();
    // Switch-over at about 1 s after the source starts (the proxy starts just before);
    // the stall begins shortly after it, mid-postcopy.
    let p = proxy(dest.l.port, "bandwidth=32MiB/s,stall=2s@1300ms");
    let src = source(p.port, "64M", 8, "1s", &[]);
    let mut api = Api::connect(&dest.sock);
    // During the stall a vCPU waits for a page, and still answers kicks.
    let st = api.wait_status(Duration::from_secs(20), |st| {
        vcpus(st).iter().any(|v| v["state"] == "stalled")
    });
    let kick: Value =
        serde_json::from_str(&api.raw(r#"{"cmd":"kick","count":3}"#)).expect("kick reply");
    for v in vcpus(&kick) {
        assert_eq!(
            v["unanswered"], 0,
            "a stalled vcpu did not answer: {kick} ({st})"
        );
    }
    let src = wait_with_timeout(src, LIMIT);
    let m = assert_migrated(src, dest.finish());
    let worst = m["blocktime_ms"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .fold(0.0, f64::max);
    assert!(worst >= 300.0, "no vcpu waited through the stall: {m}");
    assert!(m["total_ms"].as_f64().unwrap() >= 1500.0, "{m}");
}

#[test]
fn a_dropped_connection_pauses_and_recovers_by_itself() {
    if !kvm_or_skip("a_dropped_connection_pauses_and_recovers_by_itself") {
        return;
    }
    let dest = Dest::start();
    let p = proxy(dest.l.port, "bandwidth=16MiB/s,disconnect@1500ms");
    let src = wait_with_timeout(source(p.port, "64M", 6, "1s", &[]), LIMIT);
    let m = assert_migrated(src, dest.finish());
    assert!(m["connection_breaks"].as_u64().unwrap() >= 1, "{m}");
    assert!(m["recoveries"].as_u64().unwrap() >= 1, "{m}");
}

#[test]
fn a_corrupted_byte_is_never_installed_and_its_page_comes_again() {
    if !kvm_or_skip("a_corrupted_byte_is_never_installed_and_its_page_comes_again") {
        return;
    }
    let dest = Dest::start();
    let p = proxy(dest.l.port, "bandwidth=16MiB/s,corrupt@1500ms");
    let src = wait_with_timeout(source(p.port, "64M", 6, "1s", &[]), LIMIT);
    let (d, rep) = dest.finish();
    assert!(
        d.stderr.contains("checksum mismatch") || d.stderr.contains("bad "),
        "the damage was not seen: {}",
        d.explain()
    );
    let m = assert_migrated(src, (d, rep));
    assert!(m["bad_frames"].as_u64().unwrap() >= 1, "{m}");
    assert!(m["recoveries"].as_u64().unwrap() >= 1, "{m}");
}

/// A destination in postcopy-paused because its source was killed (SIGKILL) after
/// some pages came, and a control connection to it.
fn source_killed_mid_postcopy() -> (Dest, Api) {
    let dest = Dest::start();
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

#[test]
fn source_killed_mid_postcopy_leaves_the_destination_paused_and_controllable() {
    if !kvm_or_skip("source_killed_mid_postcopy_leaves_the_destination_paused_and_controllable") {
        return;
    }
    let (dest, mut api) = source_killed_mid_postcopy();
    let st = api.cmd("status");
    // Still controllable: pause answers for every vCPU, even one on a missing page.
    let paused = api.cmd("pause");
    assert_eq!(paused["ok"], true, "{paused}");
    for v in vcpus(&paused) {
        assert_eq!(v["answered"], true, "{paused} ({st})");
    }
    assert_eq!(api.cmd("resume")["ok"], true);
    let rec = api.cmd("migrate-recover");
    assert_eq!(rec["state"], "postcopy-paused", "{rec}");
    assert_eq!(api.cmd("quit")["ok"], true);
    let (d, rep) = dest.finish();
    assert_eq!(d.code(), Some(0), "{}", d.explain());
    assert_eq!(rep["reason"], "stopped by quit", "{rep}");
    let m = &rep["migration"];
    assert_eq!(m["state"], "postcopy-paused", "{m}");
    assert!(m["pages"]["never_received"].as_u64().unwrap() > 0, "{m}");
    assert!(d.stderr.contains("missing at exit"), "{}", d.explain());
}

#[test]
fn ctrl_c_stops_a_paused_destination() {
    if !kvm_or_skip("ctrl_c_stops_a_paused_destination") {
        return;
    }
    let (dest, _api) = source_killed_mid_postcopy();
    signal(dest.l.proc.id(), libc::SIGINT);
    let (d, rep) = dest.finish();
    assert_eq!(d.code(), Some(130), "{}", d.explain());
    assert!(d.elapsed < Duration::from_secs(5), "{}", d.explain());
    assert!(
        rep["migration"]["pages"]["never_received"]
            .as_u64()
            .unwrap()
            > 0,
        "{rep}"
    );
}

#[test]
fn precopy_rounds_then_postcopy() {
    if !kvm_or_skip("precopy_rounds_then_postcopy") {
        return;
    }
    let dest = Dest::start();
    let src = wait_with_timeout(
        source(dest.l.port, "64M", 8, "500ms", &["--precopy-rounds", "2"]),
        LIMIT,
    );
    let m = assert_migrated(src, dest.finish());
    let pages = &m["pages"];
    assert!(
        pages["precopy"].as_u64().unwrap() >= 16384,
        "round 1 sends every page: {m}"
    );
    // The guest kept writing during precopy: those pages were dropped and came again.
    // Evidence that KVM's dirty log saw the guest write: later rounds resent pages, or
    // pages were dropped at switch-over to come again.
    let precopy = pages["precopy"].as_u64().unwrap();
    let discarded = pages["discarded"].as_u64().unwrap();
    assert!(precopy > 16384 || discarded > 0, "{m}");
}

/// Bytes that are not a migration: each must be refused, nothing installed, and the
/// destination must still take a real migration afterwards.
#[test]
fn garbage_sent_to_incoming_is_refused_and_a_real_migration_still_works() {
    if !kvm_or_skip("garbage_sent_to_incoming_is_refused_and_a_real_migration_still_works") {
        return;
    }
    let dest = Dest::start();
    let mut hello = Vec::new();
    hello.extend_from_slice(b"UFMG");
    hello.extend_from_slice(&wire::VERSION.to_le_bytes());
    hello.extend_from_slice(&1u16.to_le_bytes());
    hello.extend_from_slice(&28u32.to_le_bytes());
    hello.extend_from_slice(&0u32.to_le_bytes()); // wrong CRC
    let mut bad_crc = hello.clone();
    bad_crc.extend_from_slice(&[0; 28]);
    let mut outside = Vec::new();
    let page = Message::Page {
        gpa: 1 << 40,
        flags: 0,
        data: vec![7; 4096].into_boxed_slice(),
    };
    wire::encode(&page, &mut outside).expect("encode");
    let mut wrong_version = hello.clone();
    wrong_version[4] = 99;
    let mut absurd = hello.clone();
    absurd[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let cases: [(&str, Vec<u8>); 7] = [
        ("text", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        ("truncated header", b"UFM".to_vec()),
        ("truncated payload", hello.clone()),
        ("bad checksum", bad_crc),
        ("page outside RAM", outside),
        ("wrong version", wrong_version),
        ("absurd length", absurd),
    ];
    for (what, bytes) in &cases {
        let mut c = TcpStream::connect(("127.0.0.1", dest.l.port)).expect("connect");
        c.write_all(bytes).expect("send");
        let _ = c.shutdown(std::net::Shutdown::Write);
        // The destination answers with an error frame (or just closes) and hangs up.
        let _ = c.set_read_timeout(Some(Duration::from_secs(15)));
        let mut back = Vec::new();
        let r = c.read_to_end(&mut back);
        assert!(r.is_ok(), "{what}: the destination did not hang up: {r:?}");
    }
    let src = wait_with_timeout(source(dest.l.port, "64M", 6, "500ms", &[]), LIMIT);
    let (d, rep) = dest.finish();
    let refused = d.stderr.matches("refused a connection").count();
    assert_eq!(refused, cases.len(), "{}", d.explain());
    assert!(!d.stderr.contains("panicked"), "{}", d.explain());
    assert_migrated(src, (d, rep));
}

#[test]
fn bad_migration_flags_are_refused_up_front() {
    for (args, want) in [
        (vec!["incoming", "--listen", "nowhere"], "--listen"),
        (vec!["run", "--migrate-at", "1s"], "--migrate-to"),
        (vec!["run", "--migrate-to", "127.0.0.1:x"], "--migrate-to"),
        (
            vec!["run", "--migrate-to", "1", "--precopy-rounds", "1000"],
            "--precopy-rounds",
        ),
    ] {
        let r = run_raw(&args, Duration::from_secs(10));
        assert_eq!(r.code(), Some(2), "{args:?}: {}", r.explain());
        assert!(r.stderr.contains(want), "{args:?}: {}", r.explain());
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.explain());
    }
}

/// The `migrate` command starts a migration; once the guest has moved, `resume` on the
/// source is refused (never two copies running), and `migrate-recover` drops a live
/// link and reconnects at once, with nothing lost.
#[test]
fn control_socket_migrate_refused_resume_and_forced_recover() {
    if !kvm_or_skip("control_socket_migrate_refused_resume_and_forced_recover") {
        return;
    }
    let dest = Dest::start();
    let p = proxy(dest.l.port, "bandwidth=16MiB/s");
    let mut vm = LiveVm::start(&["--mem", "64M", "--workload", "verify:seconds=8"]);
    std::thread::sleep(Duration::from_millis(800));
    let to = format!("127.0.0.1:{}", p.port);
    let go: Value =
        serde_json::from_str(&vm.api.raw(&format!(r#"{{"cmd":"migrate","to":"{to}"}}"#)))
            .expect("reply");
    assert_eq!(go["ok"], true, "{go}");
    let again: Value =
        serde_json::from_str(&vm.api.raw(&format!(r#"{{"cmd":"migrate","to":"{to}"}}"#)))
            .expect("reply");
    assert_eq!(
        again["ok"], false,
        "a second migration was accepted: {again}"
    );
    vm.api.wait_status(Duration::from_secs(20), |st| {
        st["migration"]["state"] == "postcopy"
    });
    let resume = vm.api.cmd("resume");
    assert_eq!(resume["ok"], false, "{resume}");
    let st = vm.api.cmd("status");
    for v in vcpus(&st) {
        assert_eq!(v["state"], "paused", "{st}");
    }
    let rec = vm.api.cmd("migrate-recover");
    assert_eq!(rec["ok"], true, "{rec}");
    let (src, _) = vm.finish(LIMIT);
    let m = assert_migrated(src, dest.finish());
    assert!(m["recoveries"].as_u64().unwrap() >= 1, "{m}");
}

/// The link drops during switch-over, before the destination heard anything: the
/// source cannot know whether the guest started there, asks on reconnecting, hears it
/// never did, and runs the guest on itself (never zero copies, never two).
#[test]
fn a_link_lost_during_switchover_leaves_the_guest_on_the_source() {
    if !kvm_or_skip("a_link_lost_during_switchover_leaves_the_guest_on_the_source") {
        return;
    }
    let dest = Dest::start();
    let p = proxy(dest.l.port, "stall=3s@500ms,disconnect@2500ms");
    let dir = scratch();
    let report = path_in(&dir, "source.json");
    let src = wait_with_timeout(
        source(p.port, "64M", 6, "1s", &["--report", s(&report)]),
        LIMIT,
    );
    assert_eq!(src.code(), Some(0), "{}", src.explain());
    assert!(
        src.stderr.contains("did not start the guest"),
        "{}",
        src.explain()
    );
    let rep = read_report(&report);
    assert_eq!(
        rep["reason"], "guest finished: every vcpu reported success",
        "{rep}"
    );
    assert_eq!(rep["migration"]["state"], "failed", "{rep}");
    drop(dest);
}

/// A source that lost the link after the destination built the VM but before the
/// device state, and asks on reconnecting, hears that the guest never started there;
/// the destination never starts it afterwards and exits 1 once it has said so.
#[test]
fn a_destination_that_never_started_says_so_and_exits() {
    if !kvm_or_skip("a_destination_that_never_started_says_so_and_exits") {
        return;
    }
    let dest = Dest::start();
    let hello = |channel, resume| {
        let mut f = Vec::new();
        wire::encode(
            &Message::Hello {
                mem_size: 16 << 20,
                vcpus: 1,
                session: 0x5e55,
                channel,
                resume,
            },
            &mut f,
        )
        .expect("encode");
        let mut c = TcpStream::connect(("127.0.0.1", dest.l.port)).expect("connect");
        c.write_all(&f).expect("send");
        c
    };
    let main = hello(wire::CHANNEL_MAIN, false);
    let urgent = hello(wire::CHANNEL_URGENT, false);
    // The VM exists once the control socket answers.
    let mut api = Api::connect(&dest.sock);
    let st = api.cmd("status");
    assert_eq!(st["migration"]["state"], "precopy", "{st}");
    drop(main);
    drop(urgent);
    let mut again = hello(wire::CHANNEL_MAIN, true);
    let _ = again.set_read_timeout(Some(Duration::from_secs(15)));
    let limits = wire::Limits { mem_size: 16 << 20 };
    let reply = wire::read_message(&mut again, &limits).expect("a reply frame");
    let Message::Error { code, text } = reply else {
        panic!("expected a refusal, got {reply:?}");
    };
    assert_eq!(code, wire::ErrorCode::NeverStarted, "{text}");
    let (d, _) = dest.finish();
    assert_eq!(d.code(), Some(1), "{}", d.explain());
    assert!(
        d.stderr.contains("before the guest started"),
        "{}",
        d.explain()
    );
}

/// A hello frame of wire version `version` (this version's layout, which version 1
/// shares), with a correct CRC.
fn hello_of_version(version: u16, resume: bool) -> Vec<u8> {
    let mut f = Vec::new();
    wire::encode(
        &Message::Hello {
            mem_size: 16 << 20,
            vcpus: 1,
            session: 0x5e55,
            channel: wire::CHANNEL_MAIN,
            resume,
        },
        &mut f,
    )
    .expect("encode");
    f[4..6].copy_from_slice(&version.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&f[..12]);
    crc.update(&f[wire::HEADER..]);
    f[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    f
}

/// Sends `frame` as a new connection's first frame; returns the destination's answer.
fn first_answer(port: u16, frame: &[u8]) -> Message {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.write_all(frame).expect("send");
    let _ = c.set_read_timeout(Some(Duration::from_secs(15)));
    wire::read_message(&mut c, &wire::Limits::UNKNOWN).expect("an answer frame")
}

/// A hello of another wire version is refused with a code and a text naming both
/// versions; the destination goes on listening and answers the next hello.
#[test]
fn a_hello_of_another_wire_version_is_refused_naming_both_versions() {
    let dest = Dest::start();
    let other = wire::VERSION - 1;
    let answer = first_answer(dest.l.port, &hello_of_version(other, false));
    let Message::Error { code, text } = answer else {
        panic!("expected a refusal, got {answer:?}");
    };
    assert_eq!(code, wire::ErrorCode::BadVersion, "{text}");
    let both = format!(
        "the peer speaks migration wire version {other}, this ufvmm speaks version {}",
        wire::VERSION
    );
    assert!(text.contains(&both), "{text}");
    // Still listening: a resume of this version (before any migration) gets its answer.
    let answer = first_answer(dest.l.port, &hello_of_version(wire::VERSION, true));
    assert!(
        matches!(
            answer,
            Message::Error {
                code: wire::ErrorCode::NeverStarted,
                ..
            }
        ),
        "{answer:?}"
    );
    signal(dest.l.proc.id(), libc::SIGINT);
    let Dest { l, .. } = dest;
    let d = wait_with_timeout(l.proc, LIMIT);
    assert!(d.stderr.contains(&both), "{}", d.explain());
    assert!(!d.stderr.contains("panicked"), "{}", d.explain());
}

/// A destination of another wire version (a stand-in that answers every hello as a
/// version-1 ufvmm did: a version-1 error frame, then hang up): the source says so,
/// naming both versions, and the guest goes on at the source.
#[test]
fn a_source_told_off_by_another_wire_version_keeps_its_guest() {
    if !kvm_or_skip("a_source_told_off_by_another_wire_version_keeps_its_guest") {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let old = std::thread::spawn(move || {
        let text = b"unsupported migration protocol version 2 (this is 1)";
        let mut f = Vec::new();
        f.extend_from_slice(b"UFMG");
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&7u16.to_le_bytes()); // version 1's error frame
        f.extend_from_slice(&(text.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&f);
        crc.update(text);
        f.extend_from_slice(&crc.finalize().to_le_bytes());
        f.extend_from_slice(text);
        let mut answered = 0;
        while !stop2.load(std::sync::atomic::Ordering::Acquire) {
            match listener.accept() {
                Ok((mut c, _)) => {
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut header = [0u8; wire::HEADER];
                    let _ = c.read_exact(&mut header);
                    let _ = c.write_all(&f);
                    let _ = c.shutdown(std::net::Shutdown::Both);
                    answered += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        answered
    });
    let dir = scratch();
    let report = path_in(&dir, "source.json");
    let src = wait_with_timeout(
        source(port, "64M", 3, "500ms", &["--report", s(&report)]),
        LIMIT,
    );
    stop.store(true, std::sync::atomic::Ordering::Release);
    let answered = old.join().expect("stand-in");
    assert!(answered >= 1, "the source never connected");
    assert_eq!(src.code(), Some(0), "{}", src.explain());
    let both = format!(
        "the peer speaks migration wire version 1, this ufvmm speaks version {}",
        wire::VERSION
    );
    assert!(src.stderr.contains(&both), "{}", src.explain());
    assert!(
        src.stderr.contains("the guest goes on here"),
        "{}",
        src.explain()
    );
    let rep = read_report(&report);
    assert_eq!(
        rep["reason"], "guest finished: every vcpu reported success",
        "{rep}"
    );
    assert_eq!(rep["migration"]["state"], "failed", "{rep}");
    let results = rep["guest"]["results"].as_array().expect("results");
    assert!(results.iter().all(|r| r["mismatches"] == 0), "{rep}");
}

/// Heartbeats of every vCPU so far (the spin workload's progress).
fn heartbeats(api: &mut Api) -> u64 {
    let st = api.cmd("stats");
    vcpus(&st)
        .iter()
        .map(|v| v["heartbeats"].as_u64().expect("heartbeats"))
        .sum()
}

/// An operator's `pause` sent during a switch-over that then fails (the link drops
/// before the destination heard anything, so the guest goes on at the source) wins over
/// the switch-over's own hold: the guest stays paused, making no progress, until
/// `resume`.
#[test]
fn a_pause_sent_during_a_failed_switchover_stays_until_resume() {
    if !kvm_or_skip("a_pause_sent_during_a_failed_switchover_stays_until_resume") {
        return;
    }
    let dest = Dest::start();
    let p = proxy(dest.l.port, "stall=3s@500ms,disconnect@2500ms");
    let to = format!("127.0.0.1:{}", p.port);
    let mut vm = LiveVm::start(&[
        "--mem",
        "64M",
        "--workload",
        "spin:ms=9000,heartbeat=20",
        "--migrate-to",
        &to,
        "--migrate-at",
        "1s",
    ]);
    vm.api.wait_status(Duration::from_secs(20), |st| {
        st["migration"]["state"] == "switchover"
    });
    let paused = vm.api.cmd("pause");
    assert_eq!(paused["ok"], true, "{paused}");
    vm.api.wait_status(Duration::from_secs(30), |st| {
        st["migration"]["state"] == "failed"
    });
    // The guest is back here, and stays as the operator left it.
    std::thread::sleep(Duration::from_millis(200));
    let before = heartbeats(&mut vm.api);
    std::thread::sleep(Duration::from_millis(500));
    let st = vm.api.cmd("status");
    for v in vcpus(&st) {
        assert_eq!(v["state"], "paused", "{st}");
    }
    assert_eq!(
        heartbeats(&mut vm.api),
        before,
        "a paused guest made progress"
    );
    assert_eq!(vm.api.cmd("resume")["ok"], true);
    let start = std::time::Instant::now();
    while heartbeats(&mut vm.api) == before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no progress after resume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (src, rep) = vm.finish(LIMIT);
    assert_eq!(src.code(), Some(0), "{}", src.explain());
    assert!(
        src.stderr.contains("did not start the guest"),
        "{}",
        src.explain()
    );
    assert_eq!(
        rep["reason"], "guest finished: every vcpu reported success",
        "{rep}"
    );
    assert_eq!(rep["migration"]["state"], "failed", "{rep}");
    drop(dest);
}

/// Before the switch-over a destination's vCPUs exist but their threads do not: they
/// show as created and do not answer a pause; a pause asked for then holds them from
/// the start (they park before their first KVM_RUN, so the guest has not run there),
/// and a resume lets the guest finish.
#[test]
fn destination_vcpus_are_created_until_the_switchover_and_a_pause_holds_them() {
    if !kvm_or_skip("destination_vcpus_are_created_until_the_switchover") {
        return;
    }
    let dest = Dest::start();
    // A slow link keeps the destination in precopy for a few seconds.
    let p = proxy(dest.l.port, "bandwidth=24MiB/s");
    let src = source(p.port, "64M", 8, "500ms", &["--precopy-rounds", "1"]);
    let mut api = Api::connect(&dest.sock);
    let st = api.wait_status(Duration::from_secs(20), |st| {
        st["migration"]["state"] == "precopy"
    });
    for v in vcpus(&st) {
        assert_eq!(v["state"], "created", "{st}");
        assert_eq!(v["answered"], false, "{st}");
        assert!(v["stalled_gpa"].is_null(), "{st}");
    }
    let paused = api.cmd("pause");
    assert_eq!(paused["ok"], true, "{paused}");
    for v in vcpus(&paused) {
        assert_eq!(v["state"], "created", "{paused}");
        assert_eq!(v["answered"], false, "{paused}");
    }
    // The switch-over starts the threads; each parks at once.
    let st = api.wait_status(Duration::from_secs(40), |st| {
        st["migration"]["state"] != "precopy" && st["migration"]["state"] != "switchover"
    });
    assert_ne!(st["migration"]["state"], "failed", "{st}");
    std::thread::sleep(Duration::from_millis(300));
    let st = api.cmd("status");
    for v in vcpus(&st) {
        assert_eq!(v["state"], "paused", "{st}");
        assert_eq!(v["answered"], true, "{st}");
    }
    // No vCPU has entered the guest here yet, so there is no downtime to tell.
    assert!(st["migration"]["downtime_ms"].is_null(), "{st}");
    assert_eq!(api.cmd("resume")["ok"], true);
    let src = wait_with_timeout(src, LIMIT);
    assert_migrated(src, dest.finish());
}
