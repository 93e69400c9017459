//! The gdb stub, driven by the real gdb (Debian's) over a Unix socket: threads,
//! registers, memory, interrupt during forever stalls on both paths, pause against gdb
//! stops, bad bytes, a killed gdb and a second one.

mod common;
use common::gdb::Gdb;
use common::migration::{source_killed_mid_postcopy, Dest};
use common::*;

use std::io::Write;
use std::time::{Duration, Instant};

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
                "stall=5s@300",
                "--workload",
                "verify:seconds=1",
            ],
        ));
        vm.api.wait_status(Duration::from_secs(10), all_stalled);
        let mut gdb = Gdb::attach_unix(&gsock);
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
        let t = Instant::now();
        gdb.interrupt();
        let stop = gdb.until("SIGINT", Duration::from_secs(5));
        let reply = t.elapsed();
        // gdb's own Ctrl-C handling and its reads after the stop reply count too.
        assert!(
            reply < Duration::from_secs(1),
            "{mode}: gdb printed the stop {reply:?} after its interrupt"
        );
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
        eprintln!(
            "{mode}: gdb interrupt during the stall: every vcpu parked in {stop_us} us, gdb showed the stop after {reply:?}"
        );
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
    let gdb = Gdb::attach_unix(&gsock);
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
    // While gdb holds it, the guest cannot migrate away from under the debugger.
    let m: serde_json::Value =
        serde_json::from_str(&vm.api.raw(r#"{"cmd":"migrate","to":"127.0.0.1:9"}"#)).expect("json");
    assert_eq!(m["ok"], false, "{m}");
    assert!(
        m["error"].as_str().is_some_and(|e| e.contains("debugger")),
        "{m}"
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
    // A well-formed read that runs past the end of the address space (here the start
    // is unmapped, so it fails before it could wrap).
    let past_end = |body: &str| {
        let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        format!("${body}#{sum:02x}").into_bytes()
    };
    let junk: [Vec<u8>; 4] = [
        past_end("mfffffffffffff000,8000"),
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
    let mut gdb = Gdb::attach_unix(&gsock);
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
    let mut gdb = Gdb::attach_unix(&gsock);
    let threads = gdb.run("info threads", Duration::from_secs(10));
    assert!(threads.contains("vcpu 1: running"), "{threads}");
    gdb.detach();
    let (r, _) = vm.quit(Duration::from_secs(30));
    assert!(r.stderr.contains("connection closed"), "{}", r.explain());
    assert!(!gsock.exists(), "the gdb socket outlived the VM");
}

/// A 2-vCPU guest spinning for `ms` at `mode`, with a gdb attached once both vCPUs
/// run (the scratch directory holds the sockets).
fn spinning_with_gdb(mode: &str, ms: &str) -> (tempfile::TempDir, LiveVm, Gdb) {
    let dir = scratch();
    let gsock = path_in(&dir, "gdb.sock");
    let g = format!("unix:{}", s(&gsock));
    let workload = format!("spin:ms={ms}");
    let mut vm = LiveVm::start(&gdb_args(&g, &["--mode", mode, "--workload", &workload]));
    vm.api.wait_status(Duration::from_secs(10), |v| {
        vcpus(v).iter().all(|c| c["state"] == "running")
    });
    let gdb = Gdb::attach_unix(&gsock);
    (dir, vm, gdb)
}

/// The `0x…` value gdb's `p/x $pc` printed.
fn pc_of(text: &str) -> u64 {
    text.split(" = 0x")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("no value in {text:?}"))
}

/// The address of the second instruction `x/2i` printed.
fn second_insn(text: &str) -> u64 {
    text.lines()
        .map(|l| {
            l.trim_start_matches("(gdb) ")
                .trim_start_matches("=>")
                .trim_start()
        })
        .filter(|l| l.starts_with("0x"))
        .nth(1)
        .and_then(|l| l.split([' ', ':']).next())
        .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("no second instruction in {text:?}"))
}

/// The line gdb's `frame` shows: "at guest/src/FILE:LINE".
fn where_of(text: &str) -> String {
    text.split(" at ")
        .filter_map(|t| t.split_whitespace().next())
        .find(|t| t.starts_with("guest/src/"))
        .unwrap_or_else(|| panic!("no guest source line in {text:?}"))
        .to_owned()
}

#[test]
fn a_gdb_session_on_the_guest_symbols_breaks_steps_and_finishes_in_both_modes() {
    if !kvm_or_skip("a_gdb_session_on_the_guest_symbols_breaks_steps_and_finishes_in_both_modes") {
        return;
    }
    // At CPL3 nothing is intercepted by this host's KVM: the breakpoint, the steps and
    // `next` there go through the guest's own #BP/#DB entry (abi::PORT_DEBUG).
    for (mode, cs, outer) in [("user", "0x23", "user_main"), ("kernel", "0x8", "_start")] {
        let args = [
            "--mem",
            "64M",
            "--mode",
            mode,
            "--workload",
            "touch:pages=200",
            "--gdb-wait",
        ];
        let (_dir, vm, mut gdb) = gdb_on_symbols(&args, |_| {});
        let limit = Duration::from_secs(10);
        let threads = gdb.run("info threads", limit);
        for id in 0..2 {
            assert!(
                threads.contains(&format!("vcpu {id}: at its first instruction")),
                "{mode}:\n{threads}"
            );
        }
        assert!(
            threads.contains("ufvmm_guest::_start"),
            "{mode}:\n{threads}"
        );
        let regs = gdb.run("info registers", limit);
        for r in ["rax", "r15", "rip", "eflags", "cs", "ss", "fs", "rsp"] {
            assert!(regs.contains(r), "{mode}: no {r}:\n{regs}");
        }
        // What gdb's x86-64 description leaves out, the monitor shows.
        let cregs = gdb.run("monitor cregs", limit);
        assert!(
            cregs.contains("vcpu 1: cpl 0 cr0 0x8") && cregs.contains("efer 0x"),
            "{mode}:\n{cregs}"
        );
        let code = gdb.run("x/8i $pc", limit);
        assert!(code.contains("=> 0x"), "{mode}:\n{code}");
        assert_eq!(
            code.lines()
                .filter(|l| l.contains("<ufvmm_guest::_start"))
                .count(),
            8,
            "{mode}:\n{code}"
        );
        if mode == "user" {
            // No hardware breakpoint fires at CPL3 here: refused even while the vCPUs
            // are still at CPL0, rather than accepted and never hit.
            gdb.run("hbreak ufvmm_guest::workloads::finish", limit);
            gdb.send("continue");
            gdb.until("Cannot insert hardware breakpoint", limit);
            gdb.run("delete", limit);
        }
        let set = gdb.run("break ufvmm_guest::workloads::finish", limit);
        assert!(
            set.contains("Breakpoint ") && set.contains(" at 0x"),
            "{mode}:\n{set}"
        );
        gdb.send("continue");
        let hit = gdb.until("hit Breakpoint", Duration::from_secs(30));
        let at = gdb.run("frame", limit);
        assert!(
            at.contains("ufvmm_guest::workloads::finish"),
            "{mode}:\n{hit}\n{at}"
        );
        let bt = gdb.run("bt", limit);
        assert!(
            bt.contains("#0  ufvmm_guest::workloads::finish")
                && bt.contains("in ufvmm_guest::workloads::run")
                && bt.contains(&format!("in ufvmm_guest::{outer}")),
            "{mode}:\n{bt}"
        );
        // The stop is where the workload runs: CPL3 in user mode.
        let seg = gdb.run("p/x $cs", limit);
        assert!(seg.contains(&format!("= {cs}")), "{mode}:\n{seg}");
        let threads = gdb.run("info threads", limit);
        assert!(threads.contains(": at a breakpoint"), "{mode}:\n{threads}");
        // A register written is what is read back from the vCPU (at CPL3: from the
        // trap frame), and the old value put back leaves the guest as it was.
        let old = pc_of(&gdb.run("p/x $r12", limit));
        gdb.run("set $r12 = 0xdead1234", limit);
        gdb.run("maint flush register-cache", limit);
        assert_eq!(pc_of(&gdb.run("p/x $r12", limit)), 0xdead_1234, "{mode}");
        gdb.run(&format!("set $r12 = {old:#x}"), limit);
        gdb.run("maint flush register-cache", limit);
        assert_eq!(pc_of(&gdb.run("p/x $r12", limit)), old, "{mode}");
        // Straight-line code here: a step ends at the next instruction, exactly.
        let next = second_insn(&gdb.run("x/2i $pc", limit));
        gdb.run("stepi", limit);
        let pc1 = pc_of(&gdb.run("p/x $pc", limit));
        assert_eq!(pc1, next, "{mode}: stepi went to {pc1:#x}");
        let line0 = where_of(&gdb.run("frame", limit));
        gdb.run("next", limit);
        let after = gdb.run("frame", limit);
        assert!(
            after.contains("ufvmm_guest::workloads::finish"),
            "{mode}:\n{after}"
        );
        assert_ne!(where_of(&after), line0, "{mode}: next stayed on its line");
        let line1 = where_of(&after);
        gdb.run("step", limit);
        let stepped = gdb.run("frame", limit);
        assert_ne!(where_of(&stepped), line1, "{mode}: step stayed on its line");
        gdb.run("delete", limit);
        gdb.send("continue");
        // The other vCPU's stop at the breakpoint (dropped while this one stepped) is
        // not lost on gdb: it is hit again, or the guest ends.
        gdb.until("exited normally", Duration::from_secs(30));
        finished_whole(vm, mode);
        gdb.send("quit");
        let _ = gdb.child.wait();
    }
}

#[test]
fn steps_and_breakpoints_from_an_interrupt_in_both_modes() {
    if !kvm_or_skip("steps_and_breakpoints_from_an_interrupt_in_both_modes") {
        return;
    }
    for mode in ["user", "kernel"] {
        let (_dir, mut vm, mut gdb) = spinning_with_gdb(mode, "6000");
        let limit = Duration::from_secs(10);
        // Single steps move the stopped vCPU on, one instruction each.
        let pc0 = pc_of(&gdb.run("p/x $pc", limit));
        gdb.run("stepi", limit);
        let pc1 = pc_of(&gdb.run("p/x $pc", limit));
        gdb.run("stepi", limit);
        let pc2 = pc_of(&gdb.run("p/x $pc", limit));
        assert!(
            pc0 != pc1 && pc1 != pc2,
            "{mode}: steps: {pc0:#x} {pc1:#x} {pc2:#x}"
        );
        // The spin loop comes back to where it is: a software breakpoint there hits
        // (an `int3` written into the guest), and at CPL0 a hardware one too.
        let kinds: &[&str] = if mode == "kernel" {
            &["hbreak", "break"]
        } else {
            &["break"]
        };
        for kind in kinds {
            gdb.run(&format!("{kind} *{pc2:#x}"), limit);
            gdb.send("continue");
            let hit = gdb.until("hit Breakpoint", limit);
            let at = pc_of(&gdb.run("p/x $pc", limit));
            assert_eq!(at, pc2, "{mode} {kind}:\n{hit}");
            gdb.run("delete", limit);
        }
        let st = vm.api.cmd("status");
        assert_eq!(st["debugger"]["stopped"], true, "{st}");
        // No data breakpoints on this host, at either level: a clear refusal.
        gdb.run("set language c", limit);
        gdb.run("watch *(long *)0x500000", limit);
        gdb.send("continue");
        gdb.until("Could not insert hardware watchpoint", limit);
        gdb.run("delete", limit);
        if mode == "user" {
            // Nor hardware breakpoints at CPL3 (refused, not silently never hit).
            gdb.run(&format!("hbreak *{:#x}", pc2 + 0x10), limit);
            gdb.send("continue");
            gdb.until("Cannot insert hardware breakpoint", limit);
            gdb.run("delete", limit);
        }
        // Deleted breakpoints leave no int3 behind: the guest runs to its end whole.
        gdb.send("continue");
        gdb.until("Continuing", limit);
        finished_whole(vm, mode);
        // gdb heard the end of the program.
        gdb.until("exited", limit);
        gdb.send("quit");
        let _ = gdb.child.wait();
    }
}

#[test]
fn gdb_looks_at_a_postcopy_destination_while_it_is_paused() {
    if !kvm_or_skip("gdb_looks_at_a_postcopy_destination_while_it_is_paused") {
        return;
    }
    // The source is killed mid-postcopy: the destination is postcopy-paused, its vCPUs
    // wait for pages that will not come until a source returns.
    let dir = scratch();
    let gsock = path_in(&dir, "gdb.sock");
    let g = format!("unix:{}", s(&gsock));
    let (dest, mut api) = source_killed_mid_postcopy(Dest::start_in(dir, &["--gdb", &g]));
    let st = api.wait_status(Duration::from_secs(10), all_stalled);
    let page = vcpus(&st)[0]["stalled_gpa"]
        .as_str()
        .expect("stalled")
        .to_owned();
    let mut gdb = Gdb::attach_unix(&gsock);
    let limit = Duration::from_secs(10);
    let threads = gdb.run("info threads", limit);
    for id in 0..2 {
        assert!(
            threads.contains(&format!("vcpu {id}: waiting for page 0x")),
            "{threads}"
        );
    }
    let t = Instant::now();
    let missing = gdb.run(&format!("x/2gx {page}"), limit);
    assert!(missing.contains("Cannot access memory"), "{missing}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "x took {:?}",
        t.elapsed()
    );
    let regs = gdb.run("info registers rip", limit);
    assert!(regs.contains("rip"), "{regs}");
    gdb.detach();
    let st = api.wait_status(Duration::from_secs(5), |v| {
        v["debugger"]["attached"] == false
    });
    assert_eq!(st["migration"]["state"], "postcopy-paused", "{st}");
    assert_eq!(api.cmd("quit")["ok"], true);
    let (d, _) = dest.finish();
    assert_eq!(d.code(), Some(0), "{}", d.explain());
}

/// The built-in guest's ELF with its symbols, written by `ufvmm guest-elf` into `dir`.
fn guest_elf(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let elf = path_in(dir, "guest.elf");
    let out = ufvmm()
        .args(["guest-elf", s(&elf)])
        .output()
        .expect("ufvmm");
    assert!(out.status.success(), "guest-elf: {out:?}");
    elf
}

/// Waits for `vm`'s end: exit 0, with both vCPUs' results (`what` names the case).
fn finished_whole(vm: LiveVm, what: &str) {
    let (r, rep) = vm.finish(Duration::from_secs(60));
    assert_eq!(r.code(), Some(0), "{what}: {}", r.explain());
    assert_eq!(
        rep["guest"]["results"].as_array().map(Vec::len),
        Some(2),
        "{what}: {rep}"
    );
}

/// A VM started with `args` and `--gdb` on a socket of its own, held by `ready` until
/// gdb may attach, and a gdb on the guest's symbols attached to it.
fn gdb_on_symbols(
    args: &[&str],
    ready: impl FnOnce(&mut LiveVm),
) -> (tempfile::TempDir, LiveVm, Gdb) {
    let dir = scratch();
    let elf = guest_elf(&dir);
    let gsock = path_in(&dir, "gdb.sock");
    let g = format!("unix:{}", s(&gsock));
    let mut all = args.to_vec();
    all.extend_from_slice(&["--gdb", &g]);
    let mut vm = LiveVm::start(&all);
    ready(&mut vm);
    let gdb = Gdb::attach_with(s(&gsock), Some(&elf));
    (dir, vm, gdb)
}

#[test]
fn a_gdb_killed_while_the_guest_runs_takes_its_breakpoints_with_it() {
    if !kvm_or_skip("a_gdb_killed_while_the_guest_runs_takes_its_breakpoints_with_it") {
        return;
    }
    // The breakpoint is only reached at the guest's end, long after gdb is gone: its
    // `int3` must be gone too, or the guest dies of it (a #BP at CPL3, an emulation
    // failure at CPL0).
    for mode in ["user", "kernel"] {
        // 6 s: gdb must be attached with its breakpoint set long before the end, also
        // on a loaded machine.
        let args = ["--mem", "64M", "--mode", mode, "--workload", "spin:ms=6000"];
        let (_dir, vm, mut gdb) = gdb_on_symbols(&args, |_| {});
        let limit = Duration::from_secs(10);
        let set = gdb.run("break ufvmm_guest::workloads::finish", limit);
        assert!(set.contains("Breakpoint 1 at 0x"), "{mode}:\n{set}");
        gdb.send("continue");
        gdb.until("Continuing", limit);
        std::thread::sleep(Duration::from_millis(200));
        signal(gdb.child.id(), libc::SIGKILL);
        let _ = gdb.child.wait();
        finished_whole(vm, mode);
    }
}

#[test]
fn cpl3_code_cannot_aim_the_debug_port_at_guest_memory() {
    if !kvm_or_skip("cpl3_code_cannot_aim_the_debug_port_at_guest_memory") {
        return;
    }
    // The guest's #BP/#DB entry offers a CPL3 trap with an `out` to PORT_DEBUG; CPL3
    // code may write that port too. A "frame" it names elsewhere than where the entry
    // builds one must not be written (here it looks like a breakpoint gdb removed,
    // which the VMM would rewind and answer).
    let args = ["--mem", "64M", "--workload", "spin:ms=4000"];
    let (_dir, vm, mut gdb) = gdb_on_symbols(&args, |vm| {
        vm.api.wait_status(Duration::from_secs(10), |v| {
            vcpus(v).iter().all(|c| c["state"] == "running")
        });
    });
    let limit = Duration::from_secs(10);
    gdb.run("thread 1", limit);
    let cs = gdb.run("p/x $cs", limit);
    assert!(cs.contains("= 0x23"), "not at CPL3:\n{cs}");
    let code = gdb.run("x/16i ufvmm_guest::arch::debug_entry", limit);
    let out_at = code
        .lines()
        .find(|l| l.contains("out ") && l.contains("%eax,(%dx)"))
        .and_then(|l| {
            l.trim_start_matches("(gdb) ")
                .trim_start()
                .split(' ')
                .next()
        })
        .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("no out in debug_entry:\n{code}"));
    // (The instructions after that `out` read through RDI: keep it pointing at RAM.)
    let regs = ["$pc", "$rax", "$rdx", "$rdi"];
    let saved: Vec<u64> = regs
        .iter()
        .map(|r| pc_of(&gdb.run(&format!("p/x {r}"), limit)))
        .collect();
    gdb.run("set language c", limit);
    // A fake DebugFrame at 0x500000: vector 3, cs 0x23, rip 0x500101, and no int3 at
    // 0x500100.
    for cmd in [
        "set *(unsigned long *)0x500000 = 0",
        "set *(unsigned long *)0x500080 = 3",
        "set *(unsigned long *)0x500088 = 0x500101",
        "set *(unsigned long *)0x500090 = 0x23",
        "set *(unsigned char *)0x500100 = 0x90",
        "set $rax = 0x500000",
        "set $rdx = 0x506",
        "set $rdi = 0x500000",
    ] {
        gdb.run(cmd, limit);
    }
    gdb.run(&format!("set $pc = {out_at:#x}"), limit);
    gdb.run("stepi", limit);
    let verdict = pc_of(&gdb.run("p/x *(unsigned long *)0x500000", limit));
    let rip = pc_of(&gdb.run("p/x *(unsigned long *)0x500088", limit));
    assert_eq!(
        (verdict, rip),
        (0, 0x500101),
        "the VMM wrote into the fake frame"
    );
    for (r, v) in regs.iter().zip(&saved) {
        gdb.run(&format!("set {r} = {v:#x}"), limit);
    }
    gdb.detach();
    let (r, _) = vm.finish(Duration::from_secs(60));
    assert_eq!(r.code(), Some(0), "{}", r.explain());
}

#[test]
fn a_step_over_port_io_is_one_instruction_in_both_modes() {
    if !kvm_or_skip("a_step_over_port_io_is_one_instruction_in_both_modes") {
        return;
    }
    // This host loses a step's trap across an I/O exit, at both levels (the step ran
    // one instruction more): the stub steps port I/O with a one-shot int3 instead.
    for mode in ["user", "kernel"] {
        let args = [
            "--mem",
            "64M",
            "--mode",
            mode,
            "--vcpus",
            "1",
            "--workload",
            "spin:ms=4000",
            "--gdb-wait",
        ];
        let (_dir, vm, mut gdb) = gdb_on_symbols(&args, |_| {});
        let limit = Duration::from_secs(10);
        // The heartbeat's `out` (outl is inlined: gdb breaks at each of its places).
        gdb.run("break ufvmm_guest::arch::outl", limit);
        gdb.send("continue");
        gdb.until("Breakpoint 1", limit);
        gdb.run("delete", limit);
        let mut found = false;
        for _ in 0..8 {
            let here = gdb.run("x/2i $pc", limit);
            let next = second_insn(&here);
            let is_out = here
                .lines()
                .find(|l| l.contains("=>"))
                .is_some_and(|l| l.contains("\tout "));
            gdb.run("stepi", limit);
            let pc = pc_of(&gdb.run("p/x $pc", limit));
            assert_eq!(pc, next, "{mode}: stepi from:\n{here}");
            if is_out {
                found = true;
                break;
            }
        }
        assert!(found, "{mode}: no out within 8 instructions of outl");
        let byte = gdb.run("x/1xb $pc", limit);
        assert!(
            !byte.contains("0xcc"),
            "{mode}: the step's int3 stayed:\n{byte}"
        );
        gdb.send("continue");
        gdb.until("exited normally", Duration::from_secs(30));
        let (r, _) = vm.finish(Duration::from_secs(30));
        assert_eq!(r.code(), Some(0), "{mode}: {}", r.explain());
    }
}

#[test]
fn a_cpl3_step_interrupted_while_its_instruction_waits_for_a_page_ends_quietly() {
    if !kvm_or_skip("a_cpl3_step_interrupted_while_its_instruction_waits_for_a_page_ends_quietly") {
        return;
    }
    // Two stalls of the link. In the first (1-3 s), a breakpoint goes on the store that
    // waits; the guest runs on and hits it again at once when the stall ends (the
    // loop's next pass, a page not asked for yet). In the second (5-10 s), a step of
    // that store waits for its page; gdb's interrupt comes during that wait, so gdb
    // gives the step up: it must not see its TF, nor a SIGTRAP once the page comes.
    let t0 = Instant::now();
    // 512 MiB: the one vCPU is still touching pages at 10 s. The step comes 1.5 s into
    // the second stall: room for ufvmm's start after `t0` on a loaded machine.
    let args = [
        "--mem",
        "512M",
        "--vcpus",
        "1",
        "--link",
        "stall=2s@1s,stall=5s@5s",
        "--workload",
        "touch",
    ];
    let (_dir, vm, mut gdb) = gdb_on_symbols(&args, |vm| {
        vm.api.wait_status(Duration::from_secs(10), all_stalled);
    });
    let limit = Duration::from_secs(10);
    gdb.run("break *$pc", limit);
    gdb.send("continue");
    gdb.until("Breakpoint 1", limit);
    let hit = t0.elapsed();
    assert!(
        hit > Duration::from_millis(2900) && hit < Duration::from_millis(3900),
        "the breakpoint came at {hit:?}, not as the first stall ended"
    );
    gdb.run("delete", limit);
    std::thread::sleep(Duration::from_millis(6500).saturating_sub(t0.elapsed()));
    gdb.send("stepi");
    std::thread::sleep(Duration::from_millis(500));
    gdb.interrupt();
    gdb.until("SIGINT", limit);
    // The race happened: the step's store still waits for its page.
    let threads = gdb.run("info threads", limit);
    assert!(threads.contains("vcpu 0: waiting for page 0x"), "{threads}");
    let flags = pc_of(&gdb.run("p/x $eflags", limit));
    assert_eq!(flags & 0x100, 0, "gdb sees the step's TF: {flags:#x}");
    gdb.send("continue");
    let rest = gdb.until("exited", Duration::from_secs(60));
    assert!(!rest.contains("SIGTRAP"), "{rest}");
    let (r, _) = vm.finish(Duration::from_secs(60));
    assert_eq!(r.code(), Some(0), "{}", r.explain());
}
