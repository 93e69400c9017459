//! The gdb stub, driven by the real gdb (Debian's) over a Unix socket: threads,
//! registers, memory, interrupt during forever stalls on both paths, pause against gdb
//! stops, bad bytes, a killed gdb and a second one.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// A gdb attached to a stub, fed commands on stdin.
struct Gdb {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    marks: u32,
}

impl Gdb {
    /// Starts gdb and connects it to the stub at `sock`.
    fn attach(sock: &Path) -> Gdb {
        let mut child = Command::new("gdb")
            .args([
                "-q",
                "-nx",
                "-ex",
                "set pagination off",
                "-ex",
                "set confirm off",
            ])
            .args(["-ex", "set width 0", "-ex"])
            .arg(format!("target remote {}", sock.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gdb (installed by scripts/install-deps)");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = channel();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Gdb {
            child,
            stdin,
            lines,
            marks: 0,
        }
    }

    fn send(&mut self, cmd: &str) {
        let _ = writeln!(self.stdin, "{cmd}");
        let _ = self.stdin.flush();
    }

    /// Runs `cmd` and returns what gdb printed for it (up to a marker), within `limit`.
    fn run(&mut self, cmd: &str, limit: Duration) -> String {
        self.marks += 1;
        let mark = format!("@@done{}", self.marks);
        self.send(cmd);
        self.send(&format!("echo {mark}\\n"));
        self.until(&mark, limit)
    }

    /// Collects lines until one contains `pat`; panics after `limit`.
    fn until(&mut self, pat: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut text = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(pat);
                    text.push_str(&l);
                    text.push('\n');
                    if hit {
                        return text;
                    }
                }
                Err(_) => panic!("gdb printed no {pat:?} within {limit:?}:\n{text}"),
            }
        }
    }

    /// gdb's Ctrl-C.
    fn interrupt(&self) {
        signal(self.child.id(), libc::SIGINT);
    }

    fn detach(mut self) {
        self.run("detach", Duration::from_secs(10));
        self.send("quit");
        let _ = self.child.wait();
    }
}

/// The bytes at the built-in guest's entry point, from its ELF.
fn entry_bytes(n: usize) -> (u64, Vec<u8>) {
    let elf = ufvmm::boot::BUILTIN_GUEST;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8 bytes"));
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().expect("2 bytes"));
    let entry = u64_at(0x18);
    let (phoff, phsz, phnum) = (u64_at(0x20) as usize, u16_at(0x36) as usize, u16_at(0x38));
    for i in 0..phnum as usize {
        let ph = phoff + i * phsz;
        let (off, vaddr, filesz) = (u64_at(ph + 8), u64_at(ph + 16), u64_at(ph + 32));
        if (vaddr..vaddr + filesz).contains(&entry) {
            let at = (off + entry - vaddr) as usize;
            return (entry, elf[at..at + n].to_vec());
        }
    }
    panic!("no segment holds the entry point");
}

/// The bytes gdb's `x/Nxb` printed.
fn bytes_of(text: &str) -> Vec<u8> {
    text.lines()
        .map(|l| l.trim_start_matches("(gdb) ").trim_start())
        .filter(|l| l.starts_with("0x") && l.contains(':'))
        .flat_map(|l| {
            l.split(':')
                .nth(1)
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|w| u8::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        .collect()
}

fn gdb_args<'a>(sock: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--mem", "64M", "--gdb", sock];
    a.extend_from_slice(extra);
    a
}

#[test]
fn gdb_interrupts_a_forever_stall_on_both_paths_and_the_guest_finishes() {
    if !kvm_or_skip("gdb_interrupts_a_forever_stall_on_both_paths_and_the_guest_finishes") {
        return;
    }
    for mode in ["kernel", "user"] {
        let dir = scratch();
        let gsock = path_in(&dir, "gdb.sock");
        let g = format!("unix:{}", s(&gsock));
        let mut vm = LiveVm::start(&gdb_args(
            &g,
            &[
                "--mode",
                mode,
                "--link",
                "stall=3s@300",
                "--workload",
                "verify:seconds=1",
            ],
        ));
        vm.api.wait_status(Duration::from_secs(10), all_stalled);
        let mut gdb = Gdb::attach(&gsock);
        let threads = gdb.run("info threads", Duration::from_secs(10));
        for id in 0..2 {
            assert!(
                threads.contains(&format!("vcpu {id}: waiting for page 0x")),
                "{mode}:\n{threads}"
            );
        }
        // Let it run, and stop it: every vCPU parks in bound, also in the stall.
        gdb.send("continue");
        gdb.until("Continuing", Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(300));
        gdb.interrupt();
        let stop = gdb.until("SIGINT", Duration::from_secs(5));
        let st = vm.api.cmd("status");
        assert_eq!(st["debugger"]["attached"], true, "{mode}: {st}");
        assert_eq!(st["debugger"]["stopped"], true, "{mode}: {st}");
        let stop_us = st["debugger"]["last_stop_us"].as_u64().unwrap_or(u64::MAX);
        assert!(
            stop_us < 100_000,
            "{mode}: all-stop took {stop_us} us\n{stop}"
        );
        for v in vcpus(&st) {
            assert_eq!(v["state"], "paused", "{mode}: {st}");
        }
        eprintln!("{mode}: gdb interrupt during the stall: every vcpu parked in {stop_us} us");
        // A missing page answers in bound with an error; a present one with its bytes.
        let page = vcpus(&st)[0]["stalled_gpa"]
            .as_str()
            .expect("stalled")
            .to_owned();
        let t = Instant::now();
        let missing = gdb.run(&format!("x/2gx {page}"), Duration::from_secs(5));
        let took = t.elapsed();
        assert!(
            missing.contains("Cannot access memory"),
            "{mode}:\n{missing}"
        );
        assert!(
            took < Duration::from_secs(2),
            "{mode}: x on a missing page took {took:?}"
        );
        eprintln!("{mode}: x on a missing page answered in {took:?}");
        let (entry, want) = entry_bytes(16);
        let got = gdb.run(&format!("x/16xb {entry:#x}"), Duration::from_secs(5));
        assert_eq!(bytes_of(&got), want, "{mode}:\n{got}");
        let mon = gdb.run(&format!("monitor page {page}"), Duration::from_secs(5));
        assert!(
            mon.contains("requested for") && mon.contains("waits for it"),
            "{mode}:\n{mon}"
        );
        let regs = gdb.run("info registers rip rsp", Duration::from_secs(5));
        assert!(
            regs.contains("rip") && regs.contains("rsp"),
            "{mode}:\n{regs}"
        );
        gdb.detach();
        let st = vm.api.wait_status(Duration::from_secs(5), |v| {
            v["debugger"]["attached"] == false
        });
        assert_eq!(st["debugger"]["stopped"], false, "{st}");
        // The stall ends and the guest finishes whole.
        let (r, rep) = vm.finish(Duration::from_secs(60));
        assert_eq!(r.code(), Some(0), "{mode}: {}", r.explain());
        for res in rep["guest"]["results"].as_array().expect("results") {
            assert_eq!(res["mismatches"], 0, "{mode}: {rep}");
        }
    }
}

#[test]
fn pause_and_gdb_stops_never_undo_each_other() {
    if !kvm_or_skip("pause_and_gdb_stops_never_undo_each_other") {
        return;
    }
    let dir = scratch();
    let gsock = path_in(&dir, "gdb.sock");
    let g = format!("unix:{}", s(&gsock));
    let mut vm = LiveVm::start(&gdb_args(&g, &["--workload", "spin:ms=30000"]));
    vm.api.wait_status(Duration::from_secs(10), |v| {
        vcpus(v).iter().all(|c| c["state"] == "running")
    });
    // gdb stops it; the operator's resume does not let it run.
    let gdb = Gdb::attach(&gsock);
    vm.api.wait_status(Duration::from_secs(10), |v| {
        v["debugger"]["stopped"] == true
    });
    assert_eq!(vm.api.cmd("resume")["ok"], true);
    std::thread::sleep(Duration::from_millis(200));
    let st = vm.api.cmd("status");
    assert!(
        vcpus(&st).iter().all(|c| c["state"] == "paused"),
        "gdb's stop undone: {st}"
    );
    // The operator pauses too; gdb leaving does not undo that pause.
    assert!(vcpus(&vm.api.cmd("pause"))
        .iter()
        .all(|c| c["answered"] == true));
    gdb.detach();
    std::thread::sleep(Duration::from_millis(200));
    let st = vm.api.cmd("status");
    assert_eq!(st["debugger"]["attached"], false, "{st}");
    assert!(
        vcpus(&st).iter().all(|c| c["state"] == "paused"),
        "the pause undone: {st}"
    );
    assert_eq!(vm.api.cmd("resume")["ok"], true);
    vm.api.wait_status(Duration::from_secs(5), |v| {
        vcpus(v).iter().all(|c| c["state"] == "running")
    });
    vm.quit(Duration::from_secs(30));
}

#[test]
fn bad_bytes_and_a_killed_gdb_leave_the_vm_running_and_a_new_gdb_gets_in() {
    if !kvm_or_skip("bad_bytes_and_a_killed_gdb_leave_the_vm_running_and_a_new_gdb_gets_in") {
        return;
    }
    let dir = scratch();
    let gsock = path_in(&dir, "gdb.sock");
    let g = format!("unix:{}", s(&gsock));
    let mut vm = LiveVm::start(&gdb_args(
        &g,
        &["--workload", "spin:ms=30000", "--gdb-wait"],
    ));
    let st = vm.api.cmd("status");
    assert!(
        vcpus(&st).iter().all(|c| c["state"] == "paused"),
        "--gdb-wait: {st}"
    );
    let mode = std::fs::metadata(&gsock)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.ok(), Some(0o600));
    // Garbage, an endless packet, random bytes: each ends its connection; the
    // --gdb-wait hold stays for a real gdb.
    let junk: [Vec<u8>; 3] = [
        b"\xff\x00garbage$zz#00".repeat(40),
        [b"$".as_slice(), &[b'A'; 100_000]].concat(),
        (0..5000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    ];
    for bytes in junk {
        let mut c = std::os::unix::net::UnixStream::connect(&gsock).expect("connect");
        let _ = c.write_all(&bytes);
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = vm.api.cmd("status");
    assert!(
        vcpus(&st).iter().all(|c| c["state"] == "paused"),
        "garbage let it run: {st}"
    );
    // A gdb that sees the first instruction, continues, and is killed: the VM runs on.
    let mut gdb = Gdb::attach(&gsock);
    let threads = gdb.run("info threads", Duration::from_secs(10));
    assert!(
        threads.contains("vcpu 0: at its first instruction"),
        "{threads}"
    );
    gdb.send("continue");
    gdb.until("Continuing", Duration::from_secs(10));
    vm.api.wait_status(Duration::from_secs(5), |v| {
        vcpus(v).iter().all(|c| c["state"] == "running")
    });
    gdb.interrupt();
    gdb.until("SIGINT", Duration::from_secs(5));
    let _ = gdb.child.kill();
    let _ = gdb.child.wait();
    let st = vm.api.wait_status(Duration::from_secs(5), |v| {
        v["debugger"]["attached"] == false && vcpus(v).iter().all(|c| c["state"] == "running")
    });
    assert_eq!(st["debugger"]["stopped"], false, "{st}");
    // A second gdb gets in.
    let mut gdb = Gdb::attach(&gsock);
    let threads = gdb.run("info threads", Duration::from_secs(10));
    assert!(threads.contains("vcpu 1: running"), "{threads}");
    gdb.detach();
    let (r, _) = vm.quit(Duration::from_secs(30));
    assert!(r.stderr.contains("connection closed"), "{}", r.explain());
    assert!(!gsock.exists(), "the gdb socket outlived the VM");
}
