//! Migration switch-over at its edges: a link lost during it, a destination that never
//! started the guest, a peer of another wire version, an operator's pause during a
//! failed switch-over, and the destination's vCPUs before it.

mod common;
use common::migration::*;
use common::*;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ufvmm::migration::wire::{self, Message};

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
    assert_guest_stayed(&src, &read_report(&report));
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
        let mut c = TcpStream::connect(("127.0.0.1", dest.l.port)).expect("connect");
        c.write_all(&hello_frame(channel, resume)).expect("send");
        c
    };
    let main = hello(wire::CHANNEL_MAIN, false);
    let urgent = hello(wire::CHANNEL_URGENT, false);
    // The control socket answers from the start; the VM exists once it says precopy.
    let mut api = Api::connect(&dest.sock);
    api.wait_status(LIMIT, |st| st["migration"]["state"] == "precopy");
    drop(main);
    drop(urgent);
    let mut again = hello(wire::CHANNEL_MAIN, true);
    let _ = again.set_read_timeout(Some(Duration::from_secs(15)));
    let limits = wire::Limits {
        mem_size: 16 << 20,
        page_size: 4096,
    };
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

/// A hello of this wire version for a 16 MiB, 1-vCPU migration (session 0x5e55).
fn hello_frame(channel: u16, resume: bool) -> Vec<u8> {
    let mut f = Vec::new();
    wire::encode(
        &Message::Hello {
            mem_size: 16 << 20,
            vcpus: 1,
            page_size: 4096,
            session: 0x5e55,
            channel,
            resume,
        },
        &mut f,
    )
    .expect("encode");
    f
}

/// A hello frame of wire version `version` (this version's layout, which version 1
/// shares), with a correct CRC.
fn hello_of_version(version: u16, resume: bool) -> Vec<u8> {
    let mut f = hello_frame(wire::CHANNEL_MAIN, resume);
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

/// A hello of another wire version (not 1, which has its own answer) is refused with
/// a code and a text naming both versions, and so is a first frame of that version too
/// long to be a hello; the destination goes on listening and answers the next hello.
#[test]
fn a_hello_of_another_wire_version_is_refused_naming_both_versions() {
    let dest = Dest::start();
    let other = wire::VERSION + 1;
    let both = format!(
        "the peer speaks migration wire version {other}, this ufvmm speaks version {}",
        wire::VERSION
    );
    let mut long = hello_of_version(other, false);
    long[8..12].copy_from_slice(&4096u32.to_le_bytes());
    for frame in [hello_of_version(other, false), long] {
        let answer = first_answer(dest.l.port, &frame);
        let Message::Error { code, text } = answer else {
            panic!("expected a refusal, got {answer:?}");
        };
        assert_eq!(code, wire::ErrorCode::BadVersion, "{text}");
        assert!(text.contains(&both), "{text}");
    }
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

/// A version-1 frame's parts, checked as a version-1 peer checks them: the `UFMG`
/// magic, version 1, then type, payload length and CRC-32 of header bytes 0..12 and the
/// payload. Returns the type and the payload.
fn decode_v1(f: &[u8]) -> (u16, Vec<u8>) {
    assert!(f.len() >= wire::HEADER, "{} bytes: {f:?}", f.len());
    assert_eq!(&f[0..4], b"UFMG", "{f:?}");
    assert_eq!(
        u16::from_le_bytes([f[4], f[5]]),
        1,
        "not a version-1 frame: {f:?}"
    );
    let ty = u16::from_le_bytes([f[6], f[7]]);
    let len = u32::from_le_bytes([f[8], f[9], f[10], f[11]]) as usize;
    assert_eq!(
        f.len(),
        wire::HEADER + len,
        "one frame, then the end: {f:?}"
    );
    let mut crc = crc32fast::Hasher::new();
    crc.update(&f[..12]);
    crc.update(&f[wire::HEADER..]);
    let want = u32::from_le_bytes([f[12], f[13], f[14], f[15]]);
    assert_eq!(crc.finalize(), want, "{f:?}");
    (ty, f[wire::HEADER..].to_vec())
}

/// A version-1 source's hello (first or resume; version 1's hello is laid out as this
/// version's) is answered with a version-1 error frame, which such a source can read,
/// saying in version 1's words that the guest never started here, and naming both
/// versions: so that source runs its guest on instead of waiting for migrate-cancel.
#[test]
fn a_version_1_source_hears_in_version_1_that_its_guest_never_started_here() {
    let dest = Dest::start();
    for resume in [false, true] {
        let mut c = TcpStream::connect(("127.0.0.1", dest.l.port)).expect("connect");
        c.write_all(&hello_of_version(1, resume)).expect("send");
        let _ = c.set_read_timeout(Some(Duration::from_secs(15)));
        let mut back = Vec::new();
        c.read_to_end(&mut back).expect("the destination hangs up");
        let (ty, payload) = decode_v1(&back);
        assert_eq!(ty, 7, "version 1's error frame");
        let text = String::from_utf8(payload).expect("UTF-8 text");
        // What a version-1 source looks for (its `says_never_started`).
        assert!(text.contains("the guest never started here"), "{text}");
        assert!(
            text.contains(&format!(
                "the peer speaks migration wire version 1, this ufvmm speaks version {}",
                wire::VERSION
            )),
            "{text}"
        );
    }
    signal(dest.l.proc.id(), libc::SIGINT);
    let Dest { l, .. } = dest;
    let d = wait_with_timeout(l.proc, LIMIT);
    assert_eq!(d.code(), Some(130), "{}", d.explain());
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
    assert_guest_stayed(&src, &rep);
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
    // Nor does a kick get an answer.
    let k: serde_json::Value =
        serde_json::from_str(&api.raw(r#"{"cmd":"kick","count":3}"#)).expect("kick reply");
    for v in vcpus(&k) {
        assert_eq!(v["state"], "created", "{k}");
        assert_eq!(v["unanswered"], 1, "{k}");
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

/// A destination quit in precopy (its vCPU threads not started yet) does not wait for
/// those threads to end: it exits as soon as it has written its report.
#[test]
fn a_destination_quit_in_precopy_does_not_wait_for_vcpus_never_started() {
    if !kvm_or_skip("a_destination_quit_in_precopy_does_not_wait_for_vcpus_never_started") {
        return;
    }
    let dest = Dest::start();
    let p = proxy(dest.l.port, "bandwidth=24MiB/s");
    let _src = source(p.port, "64M", 8, "500ms", &["--precopy-rounds", "1"]);
    let mut api = Api::connect(&dest.sock);
    let st = api.wait_status(Duration::from_secs(20), |st| {
        st["migration"]["state"] == "precopy"
    });
    assert!(vcpus(&st).iter().all(|v| v["state"] == "created"), "{st}");
    let t = std::time::Instant::now();
    assert_eq!(api.cmd("quit")["ok"], true);
    // The report is written (renamed into place) right after the vCPUs are waited for;
    // the destination then stays a little longer to answer a reconnecting source, so
    // the time to the report, not to the exit, shows the wait.
    let report = dest.report.clone();
    while !report.exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = t.elapsed();
    eprintln!("destination wrote its report {took:?} after quit");
    let (d, rep) = dest.finish();
    assert_eq!(d.code(), Some(0), "{}", d.explain());
    assert!(
        rep["vcpus"].as_array().is_some_and(|v| v.len() == 2),
        "{rep}"
    );
    // Waiting for threads that never started cost the whole 300 ms bound (measured:
    // 304-314 ms from quit to exit; 94-112 ms without that wait), so anything under
    // 300 ms shows it gone; 290 leaves the most room for a loaded machine.
    assert!(
        took < Duration::from_millis(290),
        "report written {took:?} after quit: {}",
        d.explain()
    );
}

/// A switch-over that begins while the source's vCPUs wait in user space for pages
/// their own (stalled) link holds back, on both fault paths: the save waits for the
/// access in progress to be finished, then the guest moves and comes through whole.
/// The source's link stalls for 3 s after 300 pages; the migration is started once
/// every vCPU is seen waiting in user space (a fixed `--migrate-at` once came before
/// the slow CPL0 guest had reached the stall, and nothing waited).
#[test]
fn a_switchover_during_a_page_wait_on_the_source_waits_for_it_and_loses_nothing() {
    if !kvm_or_skip("a_switchover_during_a_page_wait_on_the_source_waits_for_it_and_loses_nothing")
    {
        return;
    }
    for mode in ["kernel", "user"] {
        let dest = Dest::start();
        let mut vm = LiveVm::start(&[
            "--mode",
            mode,
            "--mem",
            "64M",
            "--workload",
            "verify:seconds=3",
            "--link",
            "stall=3s@300",
        ]);
        vm.api.wait_status(Duration::from_secs(10), |st| {
            all_stalled(st) && vcpus(st).iter().all(|v| v["wait"] == "user")
        });
        let to = format!("127.0.0.1:{}", dest.l.port);
        let go: Value =
            serde_json::from_str(&vm.api.raw(&format!(r#"{{"cmd":"migrate","to":"{to}"}}"#)))
                .expect("migrate reply");
        assert_eq!(go["ok"], true, "{mode}: {go}");
        let (src, rep) = vm.finish(LIMIT);
        assert_migrated(src, dest.finish());
        // The race happened: each source vCPU was escalated and waited out the stall
        // in user space, and the switch-over could not finish before the stall ended.
        for v in rep["vcpus"].as_array().expect("vcpus") {
            assert!(v["escalations"].as_u64() >= Some(1), "{mode}: {v}");
            assert!(
                v["blocktime_user_us"].as_u64() >= Some(1_000_000),
                "{mode}: {v}"
            );
        }
        // The save itself waited: stopping the vCPUs took the rest of the stall (the
        // ask to stop is this many ms before the stop).
        let asked = rep["migration"]["switchover_steps_ms"]["source_stop_asked"]
            .as_f64()
            .unwrap_or(0.0);
        assert!(
            asked <= -1000.0,
            "{mode}: the vCPUs stopped {asked} ms after the ask: {}",
            rep["migration"]
        );
        let total = rep["migration"]["total_ms"].as_f64().unwrap_or(0.0);
        assert!(
            total >= 1_000.0,
            "{mode}: migration done in {total} ms, inside the stall"
        );
    }
}
