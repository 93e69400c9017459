//! Rule 7 end to end, on both kernel fault paths (CPL3: GUP, a wait signals reach;
//! CPL0: KVM's instruction emulator, a wait they do not): every vCPU page wait that
//! cannot be served at once moves to user space, so debuggers, job control, stray
//! signals, kicks and pauses reach a stalled vCPU, and the guest notices none of it.
//!
//! Each test checks that the wait really was escalated (status `wait: "user"`, the
//! report's per-vCPU `escalations` and `blocktime_user_us`) and that the guest's own
//! figures came out whole (exit 0, every page verified, no mismatch, no exception).

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);
const MODES: [&str; 2] = ["user", "kernel"];
/// Pages each vCPU verifies: few, because at CPL0 every instruction is emulated.
const PAGES: u64 = 256;
/// The link stops after this many pages: mid-verify for 2 vCPUs of [`PAGES`] each (a
/// page count, not a time, so the stall lands on every vCPU however loaded the host).
/// Below [`PAGES`], so no vCPU can finish before it: at 300 a vCPU that ran ~10 ms
/// ahead of the other took all its 256 pages first, finished, and was never stalled.
const STALL_AT: u64 = 200;

/// One test of this file at a time. They measure how fast stalled vCPUs answer against
/// the VMM's own bounds (kicks 100 ms, pauses 90 ms) on a 2-core host; a second VM with
/// up to 8 vCPUs (some spinning in KVM's emulator) beside it only adds load the test
/// does not control. Serially the file takes about 30 s.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    // A test that failed holding it poisons it; the next test is still valid.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `ufvmm run` arguments for `vcpus` vCPUs verifying `pages` pages each at `mode`.
fn verify_args(mode: &str, vcpus: u32, seed: u64, pages: u64, link: &str) -> Vec<String> {
    [
        "--vcpus".to_string(),
        vcpus.to_string(),
        "--mem".into(),
        "16M".into(),
        "--mode".into(),
        mode.into(),
        "--workload".into(),
        format!("verify:seed={seed},pages={pages}"),
        "--link".into(),
        link.into(),
    ]
    .into()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Every vCPU has waited at least 100 ms for a page, and in user space: escalated.
fn all_stalled_in_user_space(st: &Value) -> bool {
    all_stalled(st) && vcpus(st).iter().all(|v| v["wait"] == "user")
}

/// A 2-vCPU verify guest whose link delivers nothing for `len` once [`STALL_AT`]
/// pages have come; returned once every vCPU's wait has moved to user space.
fn stalled_verify(mode: &str, len: &str, under: &[&str]) -> LiveVm {
    let args = verify_args(mode, 2, 11, PAGES, &format!("stall={len}@{STALL_AT}"));
    let mut vm = LiveVm::start_under(under, &strs(&args));
    let start = Instant::now();
    let mut last = Value::Null;
    loop {
        let Some(st) = vm.api.try_cmd("status") else {
            // Gone before the stall was seen: a vCPU that never stalled (0 escalations
            // in the report), or a stall over before the polls saw it (last status).
            let took = start.elapsed();
            let (r, rep) = vm.finish(LIMIT);
            panic!(
                "the VM ended {took:?} after its start, before every vCPU was seen stalled; \
                 last status {last}\n{}\n{rep}",
                r.explain()
            );
        };
        if all_stalled_in_user_space(&st) {
            return vm;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never stalled: {st}"
        );
        last = st;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts the stall is still on: the action under test did not just wait it out.
fn assert_still_stalled(vm: &mut LiveVm, what: &str) {
    let st = vm.api.cmd("status");
    assert!(
        all_stalled_in_user_space(&st),
        "{what}: the stall was over before the check: {st}"
    );
}

/// The run ended well: exit 0, every vCPU verified `pages` pages with no mismatch, and
/// the guest raised no exception.
fn assert_verified(r: &Run, rep: &Value, vcpus: usize, pages: u64) {
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    assert_eq!(rep["exit_code"], 0, "{rep}");
    assert!(
        rep["reason"]
            .as_str()
            .is_some_and(|s| s.contains("every vcpu reported success")),
        "{rep}"
    );
    assert!(
        !r.stdout.contains("guest exception") && !r.stderr.contains("guest exception"),
        "{}",
        r.explain()
    );
    let results = rep["guest"]["results"].as_array().expect("guest results");
    assert_eq!(results.len(), vcpus, "{rep}");
    for res in results {
        assert_eq!(res["mismatches"], 0, "{rep}");
        assert_eq!(res["pages"], pages, "{rep}");
    }
}

/// Every vCPU waited at least `min_user_ms` in user space, the VM escalated at least
/// one page.
fn assert_waited_in_user_space(rep: &Value, min_user_ms: u64) {
    assert!(rep["pages"]["escalated"].as_u64().unwrap_or(0) > 0, "{rep}");
    for v in rep["vcpus"].as_array().expect("report vcpus") {
        let user = v["blocktime_user_us"].as_u64().unwrap_or(0);
        assert!(
            user >= min_user_ms * 1000,
            "vcpu {}: {user} us: {rep}",
            v["id"]
        );
    }
}

/// Waits for `vm` and checks it as [`assert_verified`] does.
fn finish_verified(vm: LiveVm, vcpus: usize, pages: u64) -> (Run, Value) {
    let (r, rep) = vm.finish(LIMIT);
    assert_verified(&r, &rep, vcpus, pages);
    (r, rep)
}

/// Scheduler states (the letter after the name in stat) of the process and every
/// thread of `pid`.
fn states(pid: u32) -> (Option<char>, Vec<char>) {
    let state = |path: std::path::PathBuf| {
        let st = std::fs::read_to_string(path).ok()?;
        st[st.rfind(')')? + 1..].trim_start().chars().next()
    };
    let process = state(format!("/proc/{pid}/stat").into());
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| state(t.path().join("stat")))
                .collect()
        })
        .unwrap_or_default();
    (process, threads)
}

/// Runs `gdb -p PID -batch -ex 'info threads'`, killed (SIGKILL) after `limit`.
/// `--readnever` skips reading the 30+ MB of DWARF (seconds on a loaded host, nothing
/// to do with the attach this is about). Returns the status (None: it hung), the time
/// it took and its output.
fn gdb_info_threads(pid: u32, limit: Duration) -> (Option<ExitStatus>, Duration, String) {
    let t = Instant::now();
    let mut gdb = Command::new("gdb")
        .args(["-nx", "--readnever", "-batch", "-p", &pid.to_string()])
        .args(["-ex", "info threads"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gdb (gdb 13 is installed on these machines)");
    let status = loop {
        if let Some(st) = gdb.try_wait().expect("wait for gdb") {
            break Some(st);
        }
        if t.elapsed() > limit {
            // Before escalation gdb hung here at CPL0 for as long as the stall lasted.
            let _ = gdb.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = t.elapsed();
    let out = gdb.wait_with_output().expect("gdb output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (status, took, text)
}

/// A second control connection that tolerates the VM going away (the `Api` helper
/// panics then): one request line, one parsed reply, None once the socket closed.
struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(sock: &std::path::Path) -> Client {
        let stream = UnixStream::connect(sock).expect("connect the control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone the socket"));
        Client { stream, reader }
    }

    fn request(&mut self, line: &str) -> Option<Value> {
        self.stream.write_all(format!("{line}\n").as_bytes()).ok()?;
        let mut reply = String::new();
        match self.reader.read_line(&mut reply) {
            Ok(n) if n > 0 => serde_json::from_str(&reply).ok(),
            _ => None,
        }
    }
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    sorted
        .get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

#[test]
fn gdb_attaches_during_a_stall_and_the_guest_carries_on() {
    if !kvm_or_skip("gdb_attaches_during_a_stall_and_the_guest_carries_on") {
        return;
    }
    let _serial = serial();
    for mode in MODES {
        let mut vm = stalled_verify(mode, "3s", &[]);
        let (status, took, text) = gdb_info_threads(vm.pid(), Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{mode}: gdb -p ended {status:?} after {took:?}:\n{text}"
        );
        for id in 0..2 {
            assert!(
                text.contains(&format!("\"ufvmm-vcpu{id}\"")),
                "{mode}: vcpu {id} missing from gdb's threads:\n{text}"
            );
        }
        // gdb was done while the link still delivered nothing: it did not get in only
        // because the stall ended.
        assert_still_stalled(&mut vm, mode);
        eprintln!("{mode}: gdb -p attached, listed the threads and detached in {took:?}");
        let (_, rep) = finish_verified(vm, 2, PAGES);
        assert_waited_in_user_space(&rep, 2000);
    }
}

#[test]
fn sigstop_stops_every_thread_during_a_stall_and_sigcont_carries_on() {
    if !kvm_or_skip("sigstop_stops_every_thread_during_a_stall_and_sigcont_carries_on") {
        return;
    }
    let _serial = serial();
    for mode in MODES {
        let mut vm = stalled_verify(mode, "1500ms", &[]);
        let pid = vm.pid();
        signal(pid, libc::SIGSTOP);
        let t = Instant::now();
        let stopped = |c: &char| *c == 'T' || *c == 't';
        loop {
            let (process, threads) = states(pid);
            if process.is_some_and(|c| stopped(&c)) && threads.iter().all(stopped) {
                assert!(threads.len() >= 3, "{mode}: threads {threads:?}");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "{mode}: not stopped 1 s after SIGSTOP: process {process:?}, threads {threads:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let took = t.elapsed();
        eprintln!("{mode}: process and every thread stopped {took:?} after SIGSTOP");
        std::thread::sleep(Duration::from_millis(200));
        signal(pid, libc::SIGCONT);
        // It answers again, still waiting for the page (1.5 s stall, ~0.5 s used).
        assert_still_stalled(&mut vm, mode);
        let (_, rep) = finish_verified(vm, 2, PAGES);
        assert_waited_in_user_space(&rep, 1000);
    }
}

#[test]
fn a_process_directed_sigusr1_during_a_stall_is_harmless() {
    if !kvm_or_skip("a_process_directed_sigusr1_during_a_stall_is_harmless") {
        return;
    }
    let _serial = serial();
    for mode in MODES {
        // 2 s: the 20 signals and the check fit in it on a loaded host too.
        let mut vm = stalled_verify(mode, "2s", &[]);
        // kill(pid) goes to any thread that does not block SIGUSR1, not a chosen vCPU.
        for _ in 0..20 {
            signal(vm.pid(), libc::SIGUSR1);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_still_stalled(&mut vm, mode);
        let (_, rep) = finish_verified(vm, 2, PAGES);
        assert_waited_in_user_space(&rep, 1500);
    }
}

/// Root with no capabilities at all: the VM still opens /dev/kvm and /dev/userfaultfd
/// (both `crw------- root`; uid 0 passes as their owner, no CAP_DAC_OVERRIDE needed).
/// The userfaultfd crate asks /dev/userfaultfd first; userfaultfd(2) for kernel-mode
/// faults would need CAP_SYS_PTRACE here (vm.unprivileged_userfaultfd = 0), but it is
/// never reached, so not even that capability is kept. Without CAP_SYS_ADMIN,
/// /proc/*/stack is unreadable: the old way of telling the fault paths apart is gone.
#[test]
fn without_any_capability_a_stalled_vm_pauses_at_once() {
    if !kvm_or_skip("without_any_capability_a_stalled_vm_pauses_at_once") {
        return;
    }
    const NO_CAPS: [&str; 4] = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"];
    let _serial = serial();
    let under = |cmd: &[&str]| {
        Command::new(NO_CAPS[0])
            .args(&NO_CAPS[1..])
            .args(cmd)
            .output()
            .expect("setpriv (util-linux)")
    };
    let stack = under(&["cat", "/proc/self/stack"]);
    assert!(
        !stack.status.success(),
        "/proc/self/stack is readable without capabilities"
    );
    let caps = under(&["grep", "^CapEff", "/proc/self/status"]);
    let caps = String::from_utf8_lossy(&caps.stdout).into_owned();
    assert!(caps.contains("0000000000000000"), "{caps}");
    for mode in MODES {
        // Long enough that the five pauses land inside it on a loaded machine too (a
        // 1.5 s stall once ended first, and the VM with it, in a full-suite run).
        let mut vm = stalled_verify(mode, "3s", &NO_CAPS);
        let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
        assert!(
            status.contains("CapEff:\t0000000000000000"),
            "{mode}: the VM has capabilities:\n{status}"
        );
        let mut lat = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let p = vm.api.cmd("pause");
            let took = t.elapsed();
            assert!(
                took < Duration::from_millis(100),
                "{mode}: pause took {took:?}: {p}"
            );
            for v in vcpus(&p) {
                assert_eq!(v["answered"], true, "{mode}: {p}");
                assert_eq!(v["state"], "paused", "{mode}: {p}");
            }
            lat.push(p["latency_us"].as_u64().expect("pause latency_us"));
            assert_eq!(vm.api.cmd("resume")["ok"], true);
        }
        eprintln!("{mode}: pause without capabilities, stalled: {lat:?} us");
        let (_, rep) = finish_verified(vm, 2, PAGES);
        assert_waited_in_user_space(&rep, 1000);
    }
}

#[test]
fn eight_vcpus_on_two_cores_answer_kick_storms_during_a_forever_stall() {
    if !kvm_or_skip("eight_vcpus_on_two_cores_answer_kick_storms_during_a_forever_stall") {
        return;
    }
    let _serial = serial();
    for mode in MODES {
        let mut vm = LiveVm::start(&[
            "--vcpus",
            "8",
            "--mem",
            "64M",
            "--mode",
            mode,
            "--link",
            "stall=forever@400",
        ]);
        vm.api
            .wait_status(Duration::from_secs(10), all_stalled_in_user_space);
        let (mut p99, mut max) = (0u64, 0u64);
        let t = Instant::now();
        for _ in 0..5 {
            let k: Value = serde_json::from_str(&vm.api.raw(r#"{"cmd":"kick","count":200}"#))
                .expect("kick reply");
            assert_eq!(k["ok"], true, "{k}");
            assert_eq!(vcpus(&k).len(), 8, "{k}");
            for v in vcpus(&k) {
                assert_eq!(v["state"], "stalled", "{mode}: {k}");
                assert_eq!(v["unanswered"], 0, "{mode}: {k}");
                assert_eq!(v["latency_us"]["count"], 200, "{mode}: {k}");
                p99 = p99.max(v["latency_us"]["p99"].as_u64().unwrap_or(u64::MAX));
                max = max.max(v["latency_us"]["max"].as_u64().unwrap_or(u64::MAX));
            }
        }
        eprintln!(
            "{mode}: 8000 kicks to 8 stalled vcpus in {:?}, worst vcpu p99 {p99} us, max {max} us",
            t.elapsed()
        );
        assert!(p99 < 20_000, "{mode}: kick p99 {p99} us");
        // Still stalled after the storms; then idle: no thread spins, none has a kick
        // left pending.
        assert!(all_stalled_in_user_space(&vm.api.cmd("status")));
        assert_nothing_spins(vm.pid(), mode);
        let t = Instant::now();
        let (_, rep) = vm.quit(LIMIT);
        let quit = t.elapsed();
        eprintln!("{mode}: quit took {quit:?}");
        assert!(quit < Duration::from_secs(3), "{mode}: quit took {quit:?}");
        for v in rep["vcpus"].as_array().expect("report vcpus") {
            assert!(v["escalations"].as_u64().unwrap_or(0) >= 1, "{rep}");
            assert!(!v["stalled_at_stop"].is_null(), "{rep}");
        }
    }
}

#[test]
fn the_guest_sees_nothing_of_pause_storms_during_stall_windows() {
    if !kvm_or_skip("the_guest_sees_nothing_of_pause_storms_during_stall_windows") {
        return;
    }
    let _serial = serial();
    for mode in MODES {
        // 4 vCPUs x 200 pages; three 300 ms windows in which nothing arrives.
        let args = verify_args(
            mode,
            4,
            21,
            200,
            "latency=200us,stall=300ms@150,stall=300ms@450,stall=300ms@750",
        );
        let mut vm = LiveVm::start(&strs(&args));
        vm.api
            .wait_status(Duration::from_secs(10), all_stalled_in_user_space);
        let mut lat = Vec::new();
        for _ in 0..50 {
            let p = vm.api.cmd("pause");
            assert_eq!(p["ok"], true, "{p}");
            for v in vcpus(&p) {
                assert_eq!(v["answered"], true, "{mode}: {p}");
                assert_eq!(v["state"], "paused", "{mode}: {p}");
            }
            lat.push(p["latency_us"].as_u64().expect("pause latency_us"));
            assert_eq!(vm.api.cmd("resume")["ok"], true);
        }
        // Then on through the later windows and the paging between them, to the end.
        let mut more = 0;
        while let Some(p) = vm.api.try_cmd("pause") {
            for v in vcpus(&p) {
                assert_eq!(v["answered"], true, "{mode}: {p}");
                assert!(
                    v["state"] == "paused" || v["state"] == "exited",
                    "{mode}: {p}"
                );
            }
            if let Some(us) = p["latency_us"].as_u64() {
                lat.push(us);
            }
            more += 1;
            std::thread::sleep(Duration::from_millis(2));
            if vm.api.try_cmd("resume").is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        lat.sort_unstable();
        eprintln!(
            "{mode}: 50 pauses of 4 stalled vcpus, then {more} to the end: p50 {} us, p99 {} us, max {} us",
            percentile(&lat, 50),
            percentile(&lat, 99),
            lat.last().unwrap()
        );
        let (_, rep) = finish_verified(vm, 4, 200);
        assert_waited_in_user_space(&rep, 100);
        for v in rep["vcpus"].as_array().expect("report vcpus") {
            assert!(v["escalations"].as_u64().unwrap_or(0) >= 1, "{rep}");
        }
    }
}

#[test]
fn the_lapic_timer_wakes_a_halted_guest_after_escalated_waits_and_pauses() {
    if !kvm_or_skip("the_lapic_timer_wakes_a_halted_guest_after_escalated_waits_and_pauses") {
        return;
    }
    const MS: u64 = 40;
    const COUNT: u64 = 10;
    let _serial = serial();
    for mode in MODES {
        // The boot stops at its 3rd page for 400 ms (waits escalated to user space),
        // then each vCPU halts 10 times, each time until its one-shot LAPIC timer.
        // The halt workload touches no page after boot, so the stall cannot overlap
        // the halts; pauses do (each takes the vCPU out of its hlt).
        let mut vm = LiveVm::start(&[
            "--vcpus",
            "2",
            "--mem",
            "16M",
            "--mode",
            mode,
            "--workload",
            &format!("halt:ms={MS},count={COUNT}"),
            "--link",
            "latency=2ms,stall=400ms@3",
        ]);
        vm.api
            .wait_status(Duration::from_secs(10), all_stalled_in_user_space);
        vm.api.wait_status(Duration::from_secs(5), |st| {
            vcpus(st).iter().all(|v| v["state"] == "halted")
        });
        for _ in 0..5 {
            let p = vm.api.cmd("pause");
            assert!(vcpus(&p).iter().all(|v| v["answered"] == true), "{p}");
            std::thread::sleep(Duration::from_millis(10));
            assert_eq!(vm.api.cmd("resume")["ok"], true);
            std::thread::sleep(Duration::from_millis(20));
        }
        let (r, rep) = vm.finish(LIMIT);
        assert_eq!(r.code(), Some(0), "{mode}: {}", r.explain());
        let khz = rep["config"]["tsc_khz"].as_u64().expect("tsc_khz");
        let results = rep["guest"]["results"].as_array().expect("results");
        assert_eq!(results.len(), 2, "{rep}");
        for res in results {
            // One wake per halt: none lost (it would hang), none extra.
            assert_eq!(res["events"], COUNT, "{mode}: {rep}");
            let ms = res["tsc_cycles"].as_u64().unwrap_or(0) / khz;
            eprintln!(
                "{mode}: vcpu {}: {COUNT} halts of {MS} ms took {ms} ms",
                res["vcpu"]
            );
            assert!(
                (COUNT * MS..COUNT * MS + 2000).contains(&ms),
                "{mode}: {COUNT} halts of {MS} ms took {ms} ms: {rep}"
            );
        }
        assert_waited_in_user_space(&rep, 300);
    }
}

#[test]
fn pages_arriving_just_after_their_poison_leave_the_guest_whole() {
    if !kvm_or_skip("pages_arriving_just_after_their_poison_leave_the_guest_whole") {
        return;
    }
    let _serial = serial();
    for mode in MODES {
        // Every fault is escalated; its page comes 1 ms or 100 us after the poison.
        for (vcpus, latency) in [(2u32, "1ms"), (4, "100us")] {
            let args = verify_args(mode, vcpus, 8, 300, &format!("latency={latency}"));
            let dir = scratch();
            let report = path_in(&dir, "report.json");
            let mut a = args.clone();
            a.extend(["--report".into(), s(&report).into()]);
            let r = run(&strs(&a), LIMIT);
            let rep = read_report(&report);
            assert_verified(&r, &rep, vcpus as usize, 300);
            let served = rep["pages"]["served"].as_u64().unwrap_or(0);
            let escalated = rep["pages"]["escalated"].as_u64().unwrap_or(0);
            eprintln!(
                "{mode}, {vcpus} vcpus, latency {latency}: {escalated} of {served} pages escalated"
            );
            assert!(escalated * 2 > served, "{mode}: {rep}");
            for v in rep["vcpus"].as_array().expect("report vcpus") {
                assert!(v["escalations"].as_u64().unwrap_or(0) > 0, "{rep}");
                assert!(v["blocktime_user_us"].as_u64().unwrap_or(0) > 0, "{rep}");
            }
        }
    }
}

#[test]
fn kick_storms_while_paging_in_leave_the_guest_whole() {
    if !kvm_or_skip("kick_storms_while_paging_in_leave_the_guest_whole") {
        return;
    }
    let _serial = serial();
    for mode in MODES {
        let args = verify_args(mode, 3, 9, 300, "latency=1ms");
        let mut vm = LiveVm::start(&strs(&args));
        vm.api.wait_status(Duration::from_secs(10), |st| {
            vcpus(st).iter().all(|v| v["state"] != "created")
        });
        // Kicks from a second connection until the VM is gone: they land before,
        // during and just after faults and poisons.
        let sock = vm.sock.clone();
        let storm = std::thread::spawn(move || {
            let mut c = Client::connect(&sock);
            let (mut answered, mut unanswered, mut worst) = (0u64, Vec::new(), 0u64);
            while let Some(k) = c.request(r#"{"cmd":"kick","count":20}"#) {
                for v in vcpus(&k) {
                    // A vCPU whose guest finished may not answer any more.
                    if v["state"] != "exited" && v["unanswered"] != 0 {
                        unanswered.push(v.clone());
                    }
                    answered += v["latency_us"]["count"].as_u64().unwrap_or(0);
                    worst = worst.max(v["latency_us"]["max"].as_u64().unwrap_or(0));
                }
            }
            (answered, unanswered, worst)
        });
        let (r, rep) = vm.finish(LIMIT);
        let (answered, unanswered, worst) = storm.join().expect("kick thread");
        eprintln!("{mode}: {answered} kicks answered while paging in, slowest {worst} us");
        assert_verified(&r, &rep, 3, 300);
        assert!(answered >= 100, "{mode}: only {answered} kicks landed");
        assert_eq!(unanswered, Vec::<Value>::new(), "{mode}");
        assert!(rep["pages"]["escalated"].as_u64().unwrap_or(0) > 0, "{rep}");
    }
}

#[test]
fn vcpus_sharing_pages_all_take_one_poison_as_ufvmm_s_own() {
    if !kvm_or_skip("vcpus_sharing_pages_all_take_one_poison") {
        return;
    }
    let _serial = serial();
    for mode in MODES {
        // Four vCPUs touch the same pages; one poison wakes every vCPU on a page, also
        // those whose fault the loop has not read yet. Each must know it for ufvmm's
        // (before the fix, a CPL3 vCPU's SIGBUS came before the marker was set: the
        // process exited as for a memory error, 15 runs in 15).
        let dir = scratch();
        let report = path_in(&dir, "report.json");
        let r = run(
            &[
                "--vcpus",
                "4",
                "--mem",
                "64M",
                "--mode",
                mode,
                "--workload",
                "touch:shared=1,pages=600",
                "--link",
                "latency=1ms",
                "--report",
                s(&report),
            ],
            LIMIT,
        );
        assert_eq!(r.code(), Some(0), "{mode}: {}", r.explain());
        let rep = read_report(&report);
        assert_eq!(
            rep["guest"]["results"].as_array().map(Vec::len),
            Some(4),
            "{rep}"
        );
        assert!(
            rep["pages"]["escalated"].as_u64().unwrap_or(0) > 100,
            "{rep}"
        );
    }
}

/// Boots the fixture guest `elf` on one vCPU, every page it touches 20 ms late (each
/// wait escalated).
fn run_fixture(elf: &str) -> Run {
    run(
        &[
            "--vcpus",
            "1",
            "--mem",
            "64M",
            "--kernel",
            elf,
            "--link",
            "latency=20ms",
        ],
        LIMIT,
    )
}

#[test]
fn an_exception_delivered_onto_a_missing_stack_page_reaches_the_guest_handler() {
    if !kvm_or_skip("an_exception_delivered_onto_a_missing_stack_page") {
        return;
    }
    let _serial = serial();
    // A CPL0 guest (tests/fixtures/ud2_on_a_missing_stack.S) moves RSP to a page it never
    // touched and runs `ud2`: KVM's event delivery writes the #UD frame onto a missing
    // page, whose wait is escalated. The signal that comes first leaves a triple fault
    // pending behind the EINTR; the retry must run the `ud2` again and reach the
    // handler, which reports 0x77 (before the fix: "triple fault", 3 runs in 3).
    let elf = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ud2_on_a_missing_stack.elf"
    );
    for _ in 0..3 {
        let r = run_fixture(elf);
        assert!(
            r.stderr.contains("vcpu 0 status 119") && !r.stderr.contains("triple fault"),
            "{}",
            r.explain()
        );
    }
}

#[test]
fn a_page_table_walk_through_a_missing_table_leaves_the_guest_no_trace() {
    if !kvm_or_skip("a_page_table_walk_through_a_missing_table_leaves_the_guest_no_trace") {
        return;
    }
    let _serial = serial();
    // A CPL0 guest (tests/fixtures/pf_walk_on_a_missing_table.S) links a page table
    // from its image, still missing, into its page tables and reads through it with a
    // mark in CR2. KVM's walk reads the table page; its wait is escalated, and the #PF
    // the poisoned walk queues is cancelled. The guest reports 0x77 (119) if no #PF
    // reached it and CR2 kept the mark, 0x66 (102) if CR2 changed (3 runs in 3 without
    // KVM_CAP_EXCEPTION_PAYLOAD: KVM wrote CR2 as it queued the #PF), 0x55 if a #PF
    // reached its handler.
    let elf = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pf_walk_on_a_missing_table.elf"
    );
    for _ in 0..3 {
        let r = run_fixture(elf);
        assert!(r.stderr.contains("vcpu 0 status 119"), "{}", r.explain());
        // Every page it touched came late and was escalated, the table's among them:
        // code, GDT, IDT, table, and the page read through it.
        let escalations = r
            .stderr
            .split(" escalations)")
            .next()
            .and_then(|head| head.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok());
        assert!(escalations >= Some(5), "{}", r.explain());
    }
}
