//! The guest runs exactly once, however the switch-over goes wrong: a destination that
//! has said a guest never started there never starts it (not even when that session's
//! own hello turns up late), and one that quits before the start tells the source, which
//! then runs the guest on by itself.

mod common;
use common::hold_proxy::{Hold, HoldProxy};
use common::migration::*;
use common::*;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use ufvmm::migration::wire::{self, ErrorCode, Message};

/// As [`assert_guest_stayed`], and every vCPU verified with no mismatch.
fn assert_guest_verified_at_source(src: &Run, rep: &serde_json::Value) {
    assert_guest_stayed(src, rep);
    let results = rep["guest"]["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{rep}");
    assert!(results.iter().all(|r| r["mismatches"] == 0), "{rep}");
}

/// The first attempt's main connection (hello, vCPU states, device state) is held back
/// by the network and its source side closed; the source asks again, hears the guest
/// never started at the destination and runs it on. Then the held bytes arrive: the
/// destination refuses that late hello (the guest must not run twice) and goes on
/// waiting, with no VM, until told to quit.
#[test]
fn a_late_hello_of_a_migration_told_never_started_is_refused() {
    if !kvm_or_skip("a_late_hello_of_a_migration_told_never_started_is_refused") {
        return;
    }
    let dest = Dest::start();
    let hp = HoldProxy::start(dest.l.port, Hold::Delay, 64 << 20);
    let to = format!("127.0.0.1:{}", hp.port);
    let mut vm = LiveVm::start(&[
        "--mem",
        "64M",
        "--workload",
        "verify:seconds=6",
        "--migrate-to",
        &to,
        "--migrate-at",
        "1s",
    ]);
    vm.api.wait_status(Duration::from_secs(40), |st| {
        st["migration"]["state"] == "failed"
    });
    // The source runs the guest again; now the first attempt's bytes arrive.
    let answer = hp.deliver(Duration::from_secs(30));
    let Ok(Message::Error { code, text }) = answer else {
        panic!("the late hello was not refused: {answer:?}");
    };
    assert_eq!(code, ErrorCode::NeverStarted, "{text}");
    let (src, rep) = vm.finish(LIMIT);
    assert_guest_verified_at_source(&src, &rep);
    // Still waiting, with no VM: the guest never ran here.
    let mut api = Api::connect(&dest.sock);
    let st = api.cmd("status");
    assert_eq!(st["migration"]["state"], "waiting", "{st}");
    assert_eq!(api.cmd("quit")["ok"], true);
    let (d, rep) = dest.finish();
    assert_eq!(d.code(), Some(0), "{}", d.explain());
    assert!(!d.stderr.contains("guest started here"), "{}", d.explain());
    assert!(!d.stderr.contains("migration from"), "{}", d.explain());
    assert!(rep["vm"].is_null(), "{rep}");
}

/// The destination is told to quit after the hello, while the vCPU and device state
/// are still on their way (held by the network for good): it tells the source that the
/// guest never started there, and the source runs it on by itself, with no
/// migrate-cancel, and finishes it.
#[test]
fn a_destination_that_quits_in_the_switchover_gives_the_guest_back() {
    if !kvm_or_skip("a_destination_that_quits_in_the_switchover_gives_the_guest_back") {
        return;
    }
    let dest = Dest::start();
    let hp = HoldProxy::start(dest.l.port, Hold::After(wire::HELLO_FRAME), 64 << 20);
    let to = format!("127.0.0.1:{}", hp.port);
    let mut vm = LiveVm::start(&[
        "--mem",
        "64M",
        "--workload",
        "verify:seconds=6",
        "--migrate-to",
        &to,
        "--migrate-at",
        "1s",
    ]);
    vm.api.wait_status(Duration::from_secs(30), |st| {
        st["migration"]["state"] == "switchover"
    });
    let mut api = Api::connect(&dest.sock);
    // The VM is built there; the states that would start it never come.
    api.wait_status(Duration::from_secs(30), |st| {
        st["migration"]["state"] == "precopy"
    });
    assert_eq!(api.cmd("quit")["ok"], true);
    let (d, _) = dest.finish();
    assert_eq!(d.code(), Some(0), "{}", d.explain());
    assert!(!d.stderr.contains("guest started here"), "{}", d.explain());
    // 6 s of guest and a second or two of switch-over; far less than this.
    let (src, rep) = vm.finish(Duration::from_secs(60));
    assert_guest_verified_at_source(&src, &rep);
    drop(hp);
}

/// A hello on a new connection to `port`.
fn hello(port: u16, channel: u16, resume: bool) -> TcpStream {
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
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.write_all(&f).expect("send");
    c
}

/// The first frame the destination sends on `c`.
fn answer(c: &mut TcpStream) -> Message {
    let _ = c.set_read_timeout(Some(Duration::from_secs(15)));
    let limits = wire::Limits {
        mem_size: 16 << 20,
        page_size: 4096,
    };
    wire::read_message(c, &limits).unwrap_or_else(|e| panic!("no answer: {e}"))
}

/// A destination told to quit before the start says the guest never started on both of
/// the migration's connections, and to a source that asks again while it exits (here a
/// connection that was still saying hello).
#[test]
fn a_destination_quitting_before_the_start_says_so_on_every_connection() {
    if !kvm_or_skip("a_destination_quitting_before_the_start_says_so_on_every_connection") {
        return;
    }
    let dest = Dest::start();
    let mut main = hello(dest.l.port, wire::CHANNEL_MAIN, false);
    let mut urgent = hello(dest.l.port, wire::CHANNEL_URGENT, false);
    let mut api = Api::connect(&dest.sock);
    api.wait_status(LIMIT, |st| st["migration"]["state"] == "precopy");
    // Connected, its hello not yet sent: the source reconnecting to ask.
    let mut late = TcpStream::connect(("127.0.0.1", dest.l.port)).expect("connect");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(api.cmd("quit")["ok"], true);
    for (what, c) in [("main", &mut main), ("urgent", &mut urgent)] {
        let mut m = answer(c);
        // The main connection first hears that the destination's VM is built.
        if what == "main" && matches!(m, Message::Ready) {
            m = answer(c);
        }
        assert!(
            matches!(
                &m,
                Message::Error {
                    code: ErrorCode::NeverStarted,
                    ..
                }
            ),
            "{what}: {m:?}"
        );
    }
    let mut f = Vec::new();
    wire::encode(
        &Message::Hello {
            mem_size: 16 << 20,
            vcpus: 1,
            page_size: 4096,
            session: 0x5e55,
            channel: wire::CHANNEL_MAIN,
            resume: true,
        },
        &mut f,
    )
    .expect("encode");
    late.write_all(&f).expect("send");
    let m = answer(&mut late);
    assert!(
        matches!(
            &m,
            Message::Error {
                code: ErrorCode::NeverStarted,
                ..
            }
        ),
        "the late resume: {m:?}"
    );
    let (d, rep) = dest.finish();
    assert_eq!(d.code(), Some(0), "{}", d.explain());
    assert_eq!(rep["reason"], "stopped by quit", "{rep}");
    assert!(!d.stderr.contains("guest started here"), "{}", d.explain());
}
