//! Memory images: dump guest RAM when the guest exits, boot from the dump, and let the
//! guest check its own pattern.

mod common;
use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn mismatches(report: &std::path::Path) -> Vec<u64> {
    read_report(report)["guest"]["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["mismatches"].as_u64().expect("mismatches"))
        .collect()
}

#[test]
fn image_round_trip_keeps_every_word() {
    if !kvm_or_skip("image_round_trip_keeps_every_word") {
        return;
    }
    let dir = scratch();
    let img = path_in(&dir, "mem.img");
    let report = path_in(&dir, "r.json");
    let w = run(
        &[
            "--mem",
            "32M",
            "--workload",
            "verify:seed=77,phase=write,words=16",
            "--dump-memory",
            s(&img),
        ],
        LIMIT,
    );
    assert_eq!(w.code(), Some(0), "{}", w.explain());
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 << 20);
    let source = format!("image:{}", s(&img));
    // Served lazily through userfaultfd, then copied in up front (--no-uffd), both modes.
    for extra in [
        &["--mode", "user"][..],
        &["--mode", "kernel"][..],
        &["--no-uffd"][..],
    ] {
        let mut args = vec![
            "--mem",
            "32M",
            "--workload",
            "verify:seed=77,phase=check,words=16",
            "--source",
            &source,
            "--report",
            s(&report),
        ];
        args.extend_from_slice(extra);
        let r = run(&args, LIMIT);
        assert_eq!(r.code(), Some(0), "{extra:?}: {}", r.explain());
        assert_eq!(mismatches(&report), vec![0, 0], "{extra:?}");
    }
    // The check can fail: another seed finds every word wrong (7 MiB/4 KiB x 16 per vCPU).
    let r = run(
        &[
            "--mem",
            "32M",
            "--workload",
            "verify:seed=78,phase=check,words=16",
            "--source",
            &source,
            "--report",
            s(&report),
        ],
        LIMIT,
    );
    assert_eq!(r.code(), Some(1), "{}", r.explain());
    assert_eq!(mismatches(&report), vec![3584 * 16, 3584 * 16]);
    assert!(r.stderr.contains("mismatches"), "{}", r.explain());
}

#[test]
fn dump_fetches_pages_that_never_arrived() {
    if !kvm_or_skip("dump_fetches_pages_that_never_arrived") {
        return;
    }
    // The guest touches a few pages only; the dump must still hold the whole image
    // source, fetched through get_guest_pages (not read from unfilled memory).
    let dir = scratch();
    let src = path_in(&dir, "src.img");
    let out = path_in(&dir, "out.img");
    let mem = 16usize << 20;
    let mut data = vec![0u8; mem];
    for (i, b) in data.iter_mut().enumerate().skip(12 << 20).step_by(4096) {
        *b = (i >> 12) as u8 | 1;
    }
    std::fs::write(&src, &data).unwrap();
    let r = run(
        &[
            "--mem",
            "16M",
            "--workload",
            "mailbox",
            "--source",
            &format!("image:{}", s(&src)),
            "--dump-memory",
            s(&out),
        ],
        LIMIT,
    );
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    let dumped = std::fs::read(&out).unwrap();
    assert_eq!(dumped.len(), mem);
    for off in ((12 << 20)..mem).step_by(4096) {
        assert_eq!(dumped[off], data[off], "page at {off:#x} lost in the dump");
    }
}

#[test]
fn dump_of_pages_that_can_never_arrive_fails_instead_of_hanging() {
    if !kvm_or_skip("dump_of_pages_that_can_never_arrive") {
        return;
    }
    let dir = scratch();
    let out = path_in(&dir, "out.img");
    let r = run(
        &[
            "--mem",
            "16M",
            "--workload",
            "mailbox",
            "--link",
            "stall=forever@60",
            "--dump-memory",
            s(&out),
        ],
        LIMIT,
    );
    assert_eq!(r.code(), Some(1), "{}", r.explain());
    assert!(
        r.stderr.contains("--dump-memory") && r.stderr.contains("SourceLost"),
        "{}",
        r.explain()
    );
    assert!(r.elapsed < Duration::from_secs(10), "{}", r.explain());
}
