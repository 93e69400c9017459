//! Postcopy migration between two ufvmm processes over loopback, through the link
//! proxy where the network misbehaves. Every test is judged by the guest's own
//! `verify`: the destination exits 0 only if every vCPU's rounds found every pattern
//! intact (0 mismatches), and the report must say no page was lost.

mod common;
use common::migration::*;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;
use ufvmm::migration::wire::{self, Message};

#[test]
fn migrates_with_no_link_model() {
    if !kvm_or_skip("migrates_with_no_link_model") {
        return;
    }
    let dest = Dest::start();
    let src = wait_with_timeout(source(dest.l.port, "64M", 6, "1s", &[]), LIMIT);
    let m = assert_migrated(src, dest.finish());
    let pages = &m["pages"];
    // Every page moved after the switch-over, or with it (the vCPUs' page-walk and
    // event-delivery pages, counted as precopy and as critical).
    let moved = pages["urgent"].as_u64().unwrap()
        + pages["background"].as_u64().unwrap()
        + pages["critical"].as_u64().unwrap();
    assert!(
        moved >= 16384,
        "every page moved with or after switch-over: {m}"
    );
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
    let dir = scratch();
    let src_report = path_in(&dir, "source.json");
    let src = source(p.port, "64M", 6, "1s", &["--report", s(&src_report)]);
    let src = wait_with_timeout(src, LIMIT);
    let m = assert_migrated(src, dest.finish());
    // The vCPUs asked for pages while the stream was still on its way, and none came
    // twice: a page the stream had sent already was not sent again for the ask.
    let pages = &m["pages"];
    assert!(pages["requested"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(pages["duplicates"], 0, "a page arrived twice: {m}");
    let moved = pages["precopy"].as_u64().unwrap()
        + pages["urgent"].as_u64().unwrap()
        + pages["background"].as_u64().unwrap();
    assert_eq!(moved, 16384, "pages received against pages of RAM: {m}");
    let lat = &m["request_latency_us"];
    assert!(lat["count"].as_u64().unwrap() > 0, "{m}");
    assert!(
        lat["p50"].as_u64().unwrap() <= lat["p99"].as_u64().unwrap(),
        "{m}"
    );
    // The source's side of it: every page sent once, none again (no precopy, no break).
    let sm = read_report(&src_report)["migration"].clone();
    assert_eq!(sm["sent"]["pages"], 16384, "{sm}");
    assert_eq!(sm["sent"]["resent_dirtied"], 0, "{sm}");
    assert_eq!(sm["sent"]["resent_lost"], 0, "{sm}");
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
    // Well after the switch-over at about 1 s (the proxy starts just before the source),
    // also on a loaded machine, and before the last page at 16 MiB/s (about 5 s).
    let p = proxy(dest.l.port, "bandwidth=16MiB/s,disconnect@2500ms");
    let src = wait_with_timeout(source(p.port, "64M", 6, "1s", &[]), LIMIT);
    let m = assert_migrated(src, dest.finish());
    assert!(m["connection_breaks"].as_u64().unwrap() >= 1, "{m}");
    assert!(m["recoveries"].as_u64().unwrap() >= 1, "{m}");
    let kinds = assert_timeline(&m);
    let tl = &m["timeline"];
    let at = |k: &str| kinds.iter().position(|e| *e == k);
    let (p, b, r, c) = (at("postcopy"), at("break"), at("recovery"), at("completed"));
    assert!(
        p < b && b < r && r < c,
        "no break then recovery in postcopy: {tl}"
    );
    // Through the pause (and at 16 MiB/s before it) a vCPU waits for a page.
    let waits: Vec<u64> = tl["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["waiting"]
                .as_u64()
                .expect("a destination's samples say waiting")
        })
        .collect();
    assert!(waits.iter().any(|&w| w > 0), "no vcpu ever waiting: {tl}");
    // After the recovery the vCPUs' requests are answered as urgent pages again: the
    // pages they asked for again, and those they fault on next, do not wait for the
    // background stream to come round to them.
    let urgent_at = |t: f64| {
        tl["samples"]
            .as_array()
            .unwrap()
            .iter()
            .take_while(|s| s["t_ms"].as_f64().unwrap() <= t)
            .last()
            .map_or(0, |s| s["urgent"].as_u64().unwrap())
    };
    let recovered_at = tl["events"][r.unwrap()]["t_ms"].as_f64().unwrap();
    assert!(
        m["pages"]["urgent"].as_u64().unwrap() > urgent_at(recovered_at),
        "no urgent page after the recovery: {tl}"
    );
}

/// The destination's `migration.timeline` tells the same story as the rest of `m`:
/// samples in time order whose last one holds the pages counted, and the phases in
/// their order. Returns the events' kinds.
fn assert_timeline(m: &Value) -> Vec<&str> {
    let tl = &m["timeline"];
    let samples = tl["samples"].as_array().expect("samples");
    assert!(!samples.is_empty(), "{tl}");
    let t: Vec<f64> = samples
        .iter()
        .map(|s| s["t_ms"].as_f64().unwrap())
        .collect();
    assert!(
        t.windows(2).all(|w| w[0] < w[1]),
        "t_ms not increasing: {tl}"
    );
    // Sampled through the migration, every 100 ms (or a doubled interval).
    let iv = tl["interval_ms"].as_f64().expect("interval_ms");
    let total = m["total_ms"].as_f64().expect("total_ms");
    assert!(samples.len() as f64 >= total / iv / 2.0, "{tl}");
    let last = samples.last().unwrap();
    for k in ["precopy", "urgent", "background"] {
        assert_eq!(last[k], m["pages"][k], "{k}: {tl} against {m}");
    }
    let kinds: Vec<&str> = tl["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().expect("kind"))
        .collect();
    let at = |k: &str| kinds.iter().position(|e| *e == k);
    let (s, p, c) = (at("switchover"), at("postcopy"), at("completed"));
    assert!(s.is_some() && s < p && p < c, "events out of order: {tl}");
    assert_eq!(tl["events_dropped"], 0, "{tl}");
    kinds
}

#[test]
fn a_corrupted_byte_is_never_installed_and_its_page_comes_again() {
    if !kvm_or_skip("a_corrupted_byte_is_never_installed_and_its_page_comes_again") {
        return;
    }
    let dest = Dest::start();
    // Mid-postcopy, well after the switch-over, as for the dropped connection above.
    let p = proxy(dest.l.port, "bandwidth=16MiB/s,corrupt@2500ms");
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

#[test]
fn source_killed_mid_postcopy_leaves_the_destination_paused_and_controllable() {
    if !kvm_or_skip("source_killed_mid_postcopy_leaves_the_destination_paused_and_controllable") {
        return;
    }
    let (dest, mut api) = source_killed_mid_postcopy(Dest::start());
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

/// A destination quit mid-postcopy says so before its connections close, and the
/// source ends with it (the guest is gone there; nothing is left to send). Each
/// connection has its own reader on the source, so the urgent one's end can come
/// first: taken for a break, the source reconnected for ever to a destination that
/// was gone. Several rounds, as that order is a race.
#[test]
fn a_destination_quit_mid_postcopy_ends_the_source_too() {
    if !kvm_or_skip("a_destination_quit_mid_postcopy_ends_the_source_too") {
        return;
    }
    for round in 0..4 {
        let dest = Dest::start();
        // 64 MiB at 8 MiB/s: postcopy lasts seconds, so the quit lands in it.
        let p = proxy(dest.l.port, "bandwidth=8MiB/s");
        let src = source(p.port, "64M", 20, "300ms", &[]);
        let mut api = Api::connect(&dest.sock);
        api.wait_status(Duration::from_secs(20), |st| {
            st["migration"]["state"] == "postcopy"
        });
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(api.cmd("quit")["ok"], true);
        let (d, rep) = dest.finish();
        assert_eq!(d.code(), Some(0), "{round}: {}", d.explain());
        assert!(
            rep["migration"]["pages"]["never_received"].as_u64() > Some(0),
            "{round}: the quit came after the last page: {rep}"
        );
        let r = wait_with_timeout(src, Duration::from_secs(20));
        // The guest moved, and the destination let it go: the source's part is done.
        assert_eq!(r.code(), Some(0), "{round}: {}", r.explain());
        assert!(
            r.stderr.contains("the destination ended the migration")
                && !r.stderr.contains("postcopy-paused"),
            "{round}: {}",
            r.explain()
        );
    }
}

#[test]
fn ctrl_c_stops_a_paused_destination() {
    if !kvm_or_skip("ctrl_c_stops_a_paused_destination") {
        return;
    }
    let (dest, _api) = source_killed_mid_postcopy(Dest::start());
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
    // (The switch-over's page-walk pages count as precopy too: not evidence.)
    let precopy = pages["precopy"].as_u64().unwrap() - pages["critical"].as_u64().unwrap();
    let discarded = pages["discarded"].as_u64().unwrap();
    assert!(precopy > 16384 || discarded > 0, "{m}");
    // Pages written after their precopy copy came again, as they must, and nothing else
    // did.
    assert_eq!(pages["duplicates"], 0, "{m}");
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
