//! Bad input never panics or hangs: a one-line error and a non-zero exit.

mod common;
use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

/// Asserts a refused run: exit `code`, a short error on stderr naming `needle`, no panic.
fn refused(args: &[&str], code: i32, needle: &str) {
    let r = run_raw(args, LIMIT);
    assert_eq!(r.code(), Some(code), "{args:?}: {}", r.explain());
    assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.explain());
    let err_lines: Vec<&str> = r.stderr.lines().filter(|l| l.contains("error")).collect();
    assert!(
        !err_lines.is_empty(),
        "{args:?}: no error line: {}",
        r.explain()
    );
    assert!(
        r.stderr.contains(needle),
        "{args:?}: stderr lacks {needle:?}: {}",
        r.explain()
    );
}

#[test]
fn bad_flags_are_refused() {
    refused(&["run", "--bogus"], 2, "--bogus");
    refused(&["run", "--vcpus", "0"], 2, "--vcpus 0");
    refused(&["run", "--vcpus", "65"], 2, "--vcpus 65");
    refused(&["run", "--vcpus", "x"], 2, "--vcpus");
    refused(&["run", "--mem", "0"], 2, "must not be zero");
    refused(&["run", "--mem", "100000"], 2, "multiple of 2 MiB");
    refused(&["run", "--mem", "2T"], 2, "at most 1 TiB");
    refused(&["run", "--mem", "lots"], 2, "invalid size");
    refused(&["run", "--mode", "supervisor"], 2, "supervisor");
    refused(&["run", "--workload", "dance"], 2, "unknown workload");
    refused(
        &["run", "--workload", "touch:pages=many"],
        2,
        "expected a number",
    );
    refused(&["run", "--source", "ftp://x"], 2, "--source");
    refused(&["run", "--link", "latency=fast"], 2, "--link");
    refused(&["run", "--link", "stall=5s"], 2, "--link");
    refused(&["run", "--link", "bandwidth=0MiB/s"], 2, "--link");
    refused(
        &["run", "--no-uffd", "--link", "latency=1ms"],
        2,
        "--no-uffd",
    );
    refused(&["run", "--prefetch", "-1"], 2, "--prefetch '-1'");
    refused(&["run", "--prefetch", "10000000"], 2, "at most 1024 pages");
    refused(&["run", "--prefetch", "sometimes"], 2, "--prefetch");
    refused(&["run", "--background", "fast"], 2, "--background 'fast'");
    refused(&["run", "--background", "100B/s"], 2, "at least one page");
    refused(&["run", "--background", "-5pages/s"], 2, "--background");
    refused(&["run", "--no-uffd", "--prefetch", "auto"], 2, "--no-uffd");
    refused(
        &["incoming", "--listen", "0", "--prefetch", "-1"],
        2,
        "--prefetch",
    );
    // With userfaultfd every page starts missing: there is nothing to prefault.
    refused(&["run", "--prefault"], 2, "--prefault goes with --no-uffd");
}

/// The host's MemTotal in bytes, from /proc/meminfo.
fn host_mem_total() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let line = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .expect("MemTotal");
    let kib: u64 = line["MemTotal:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("MemTotal in kB");
    kib * 1024
}

/// Too many vCPUs, or more RAM than the host has: exactly one line on stderr, exit 2,
/// before any VM is made.
#[test]
fn too_many_vcpus_or_more_ram_than_the_host_has_is_one_line() {
    let over = (host_mem_total() + (2 << 20)) & !((2 << 20) - 1);
    let over_s = over.to_string();
    for (args, needle) in [
        (
            vec!["run", "--vcpus", "65"],
            "--vcpus 65: must be between 1 and 64",
        ),
        (
            vec!["run", "--mem", over_s.as_str()],
            "more than this host's RAM",
        ),
        (vec!["run", "--mem", "1025G"], "at most 1 TiB"),
    ] {
        let r = run_raw(&args, LIMIT);
        assert_eq!(r.code(), Some(2), "{args:?}: {}", r.explain());
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.explain());
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.explain());
    }
}

#[test]
fn bad_files_are_refused() {
    if !kvm_or_skip("bad_files_are_refused") {
        return;
    }
    let dir = scratch();
    let missing = path_in(&dir, "nope.elf");
    refused(
        &["run", "--kernel", s(&missing)],
        1,
        "cannot read guest ELF",
    );
    let garbage = path_in(&dir, "garbage.elf");
    std::fs::write(&garbage, vec![0x42u8; 4096]).unwrap();
    refused(&["run", "--kernel", s(&garbage)], 1, "not an ELF");
    // A real x86-64 ELF (this test binary's own ufvmm), truncated.
    let real = std::fs::read(env!("CARGO_BIN_EXE_ufvmm")).unwrap();
    let trunc = path_in(&dir, "trunc.elf");
    std::fs::write(&trunc, &real[..200]).unwrap();
    refused(&["run", "--kernel", s(&trunc)], 1, "truncated");
    // The host binary is x86-64 but linked far above the guest image region.
    refused(
        &["run", "--kernel", env!("CARGO_BIN_EXE_ufvmm")],
        1,
        "does not fit",
    );
    let mut arm = real[..4096].to_vec();
    arm[18] = 183;
    let armf = path_in(&dir, "arm.elf");
    std::fs::write(&armf, &arm).unwrap();
    refused(&["run", "--kernel", s(&armf)], 1, "not x86-64");
    // An image whose size is not --mem.
    let img = path_in(&dir, "small.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    refused(
        &[
            "run",
            "--mem",
            "16M",
            "--source",
            &format!("image:{}", s(&img)),
        ],
        1,
        "must match",
    );
    refused(
        &["run", "--source", "image:/nonexistent/mem.img"],
        1,
        "cannot open image",
    );
}

#[test]
fn missing_kvm_says_what_to_do() {
    let r = ufvmm()
        .args(["run", "--mem", "16M"])
        .env("UFVMM_KVM_DEVICE", "/nonexistent/kvm")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/nonexistent/kvm") && err.contains("load the kvm module"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_control_lines_are_refused_and_the_vm_keeps_running() {
    if !kvm_or_skip("bad_control_lines") {
        return;
    }
    let mut vm = LiveVm::start(&["--mem", "16M", "--workload", "spin:ms=0"]);
    let api = &mut vm.api;
    let mode = std::fs::metadata(&vm.sock).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.ok(), Some(0o600));
    for bad in [
        "not json",
        "{}",
        "{\"cmd\":42}",
        "{\"cmd\":\"fly\"}",
        "[1,2]",
        "{\"cmd\":\"kick\",\"count\":0}",
    ] {
        let reply: serde_json::Value = serde_json::from_str(&api.raw(bad)).expect("reply is JSON");
        assert_eq!(reply["ok"], false, "{bad}: {reply}");
        assert!(
            reply["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad}: {reply}"
        );
    }
    // Still alive and answering.
    assert_eq!(api.cmd("status")["ok"], true);
    // An over-long line is refused; the connection and the VM go on.
    let long = "x".repeat(200_000);
    let reply = api.raw(&long);
    assert!(reply.contains("longer than"), "{reply}");
    assert_eq!(api.cmd("status")["ok"], true);
    let mut api2 = Api::connect(&vm.sock);
    assert_eq!(api2.cmd("stats")["ok"], true);
    vm.quit(LIMIT);
}

/// A destination out of file descriptors (a low limit, and more connections than it
/// leaves room for) says so now and then, not 20 times a second, and takes connections
/// again once some close: a resume is then answered as usual.
#[test]
fn a_destination_out_of_file_descriptors_says_so_rarely_and_recovers() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use ufvmm::migration::wire::{self, ErrorCode, Message};

    let mut cmd = ufvmm();
    cmd.args(["incoming", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec, only setrlimit (async-signal-safe) on a local.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 16,
                rlim_max: 16,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("first line");
    let port: u16 = line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let proc = Proc::new(child);
    // Silent connections: each accepted one holds a descriptor while it may say hello.
    let silent: Vec<std::net::TcpStream> = (0..24)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    drop(silent);
    // Room again: a resume before any migration gets its answer.
    let mut f = Vec::new();
    wire::encode(
        &Message::Hello {
            mem_size: 16 << 20,
            vcpus: 1,
            page_size: 4096,
            session: 7,
            channel: wire::CHANNEL_MAIN,
            resume: true,
        },
        &mut f,
    )
    .expect("encode");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.write_all(&f).expect("send");
    let _ = c.set_read_timeout(Some(Duration::from_secs(15)));
    let answer = wire::read_message(&mut c, &wire::Limits::UNKNOWN);
    assert!(
        matches!(
            answer,
            Ok(Message::Error {
                code: ErrorCode::NeverStarted,
                ..
            })
        ),
        "{answer:?}"
    );
    signal(proc.id(), libc::SIGINT);
    let mut r = wait_with_timeout(proc, LIMIT);
    let _ = out.read_to_string(&mut r.stdout);
    let said = r.stderr.matches("accept failed").count();
    assert!(said >= 1, "it never ran out: {}", r.explain());
    assert!(said <= 2, "said {said} times in about 2 s: {}", r.explain());
    assert!(!r.stderr.contains("panicked"), "{}", r.explain());
}
