//! A vCPU waiting for a page that has not arrived stays controllable: pause, resume,
//! Ctrl-C, SIGTERM and stray SIGUSR1, on both kernel fault paths (NOTES.md).

mod common;
use common::*;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// Boots a VM whose link delivers 200 pages and then nothing, in `mode`, and waits
/// until every vCPU has been stalled for a while.
fn stalled_vm(mode: &str) -> LiveVm {
    let mut vm = LiveVm::start(&[
        "--mem",
        "64M",
        "--mode",
        mode,
        "--link",
        "stall=forever@200",
    ]);
    vm.api.wait_status(Duration::from_secs(20), all_stalled);
    vm
}

/// Pause inside a 2 s stall on `mode`'s path, stay paused across its end, resume:
/// every vCPU answers at once and parks (its wait moved to user space, rule 7), and the
/// guest's `verify` finds every page right.
fn pause_during_a_stall_answers_and_resume_finishes(mode: &str) {
    let mut vm = LiveVm::start(&[
        "--mem",
        "64M",
        "--mode",
        mode,
        "--workload",
        "verify:seed=5",
        "--link",
        "stall=2s@150ms",
    ]);
    let st = vm.api.wait_status(Duration::from_secs(10), all_stalled);
    for v in vcpus(&st) {
        assert!(v["stalled_gpa"].is_string(), "{st}");
        assert_eq!(v["device_wait"], false, "{st}");
    }
    // Give the fault loop a moment to have escalated every wait (it does so in the
    // turn that reads the fault; a status can come between).
    std::thread::sleep(Duration::from_millis(20));
    let st = vm.api.cmd("status");
    for v in vcpus(&st) {
        assert_eq!(v["wait"], "user", "{st}");
    }
    let t = Instant::now();
    let p = vm.api.cmd("pause");
    let took = t.elapsed();
    assert_eq!(p["ok"], true, "{p}");
    assert!(took < Duration::from_millis(50), "pause took {took:?}: {p}");
    assert!(p["latency_us"].as_u64().unwrap() < 20_000, "{p}");
    for v in vcpus(&p) {
        assert_eq!(v["answered"], true, "{p}");
        assert_eq!(v["state"], "paused", "{p}");
    }
    assert_nothing_spins(vm.pid(), "paused in a stall");
    // Stay paused across the end of the stall, then resume.
    std::thread::sleep(Duration::from_millis(2300));
    assert!(vcpus(&vm.api.cmd("status"))
        .iter()
        .all(|v| v["state"] == "paused"));
    assert_eq!(vm.api.cmd("resume")["ok"], true);
    let (r, rep) = vm.finish(LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    for res in rep["guest"]["results"].as_array().unwrap() {
        assert_eq!(res["mismatches"], 0, "{rep}");
        assert_eq!(res["pages"], 7680, "{rep}");
    }
    for v in rep["vcpus"].as_array().unwrap() {
        assert!(v["escalations"].as_u64().unwrap() >= 1, "{rep}");
        assert!(
            v["blocktime_user_us"].as_u64().unwrap() >= 1_500_000,
            "{rep}"
        );
    }
}

#[test]
fn pause_during_a_cpl3_stall_answers_in_milliseconds_and_resume_finishes() {
    if kvm_or_skip("pause_during_a_cpl3_stall") {
        pause_during_a_stall_answers_and_resume_finishes("user");
    }
}

#[test]
fn pause_during_a_cpl0_stall_answers_in_milliseconds_and_resume_finishes() {
    if kvm_or_skip("pause_during_a_cpl0_stall") {
        pause_during_a_stall_answers_and_resume_finishes("kernel");
    }
}

/// Ctrl-C (SIGINT) or SIGTERM during a stall that never ends, on `mode`'s path.
fn signal_during_forever_stall(mode: &str, sig: i32, want: i32) {
    let vm = stalled_vm(mode);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    signal(vm.pid(), sig);
    let (r, rep) = vm.finish(LIMIT);
    let took = t.elapsed();
    assert_eq!(r.code(), Some(want), "{mode}: {}", r.explain());
    assert!(took < Duration::from_secs(1), "{mode}: exit took {took:?}");
    assert!(r.stderr.contains("stopped by"), "{}", r.explain());
    assert!(
        r.stderr.contains("stalled at 0x"),
        "summary names the address: {}",
        r.explain()
    );
    assert!(r.stderr.contains("served"), "{}", r.explain());
    assert_eq!(rep["exit_code"], want);
    assert_eq!(rep["pages"]["served"], 200, "{rep}");
    let blocked: u64 = rep["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["blocktime_us"].as_u64().unwrap())
        .sum();
    assert!(blocked > 100_000, "{rep}");
}

#[test]
fn ctrl_c_during_a_forever_stall_on_the_cpl3_path() {
    if kvm_or_skip("ctrl_c_cpl3") {
        signal_during_forever_stall("user", libc::SIGINT, 130);
    }
}

#[test]
fn ctrl_c_during_a_forever_stall_on_the_cpl0_path() {
    if kvm_or_skip("ctrl_c_cpl0") {
        signal_during_forever_stall("kernel", libc::SIGINT, 130);
    }
}

#[test]
fn sigterm_during_a_forever_stall_on_both_paths() {
    if kvm_or_skip("sigterm_both") {
        signal_during_forever_stall("user", libc::SIGTERM, 143);
        signal_during_forever_stall("kernel", libc::SIGTERM, 143);
    }
}

#[test]
fn stray_sigusr1_is_harmless() {
    if !kvm_or_skip("stray_sigusr1_is_harmless") {
        return;
    }
    let vm = LiveVm::start(&["--mem", "32M", "--workload", "spin:ms=800"]);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(25));
        signal(vm.pid(), libc::SIGUSR1);
    }
    let (r, rep) = vm.finish(LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    assert_eq!(
        rep["guest"]["results"].as_array().unwrap().len(),
        2,
        "{rep}"
    );

    // A process-wide SIGUSR1 must not land on a vCPU stalled where signals are ignored.
    let mut vm = stalled_vm("kernel");
    for _ in 0..20 {
        signal(vm.pid(), libc::SIGUSR1);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_nothing_spins(vm.pid(), "after stray SIGUSR1s");
    assert!(all_stalled(&vm.api.cmd("status")));
    vm.quit(LIMIT);
}

#[test]
fn mailbox_waits_for_a_missing_page_through_a_slow_link() {
    if !kvm_or_skip("mailbox_waits_for_a_missing_page") {
        return;
    }
    // An image whose last page of vCPU 0's slice holds a message the guest never wrote.
    let dir = scratch();
    let img = path_in(&dir, "mem.img");
    let mem: u64 = 16 << 20;
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(mem).unwrap();
    let slice_pages = (mem - (4 << 20)) / 4096 / 2;
    let last = (4 << 20) + (slice_pages - 1) * 4096;
    let text = b"from the page source";
    let mut msg = Vec::new();
    msg.extend_from_slice(&(text.len() as u32).to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    msg.extend_from_slice(text);
    use std::os::unix::fs::FileExt;
    f.write_all_at(&msg, last).unwrap();
    drop(f);
    let r = run(
        &[
            "--vcpus",
            "2",
            "--mem",
            "16M",
            "--workload",
            "mailbox:fresh=1",
            "--source",
            &format!("image:{}", s(&img)),
            "--link",
            "latency=100ms",
        ],
        LIMIT,
    );
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    assert!(
        r.stdout.contains("[vcpu0] mailbox: from the page source"),
        "{}",
        r.explain()
    );
    // Every page crossed a 100 ms link (boot pages and the mailbox page, one after
    // another on one vCPU's path; not those served before the start): well over 0.5 s.
    assert!(r.elapsed >= Duration::from_millis(500), "{}", r.explain());
}

#[test]
fn kicks_racing_with_cpl0_stalls_leave_no_thread_spinning() {
    if !kvm_or_skip("kicks_racing_with_cpl0_stalls") {
        return;
    }
    // Kick as fast as possible while the vCPUs run into a stall that never ends, on the
    // path that ignores signals. A kick that lands as a vCPU enters its wait leaves
    // SIGUSR1 pending and the thread spinning; ufvmm must end every such spin.
    for round in 0..3 {
        let mut vm = LiveVm::start(&[
            "--mem",
            "64M",
            "--mode",
            "kernel",
            "--link",
            "latency=1ms,stall=forever@1500",
        ]);
        // Keep kicking until both vCPUs sit in the stall.
        let start = Instant::now();
        loop {
            let k = vm.api.raw("{\"cmd\":\"kick\",\"count\":200}");
            assert!(k.contains("\"ok\":true"), "{k}");
            if all_stalled(&vm.api.cmd("status")) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "never stalled");
        }
        assert_nothing_spins(vm.pid(), &format!("round {round}"));
        let (_, rep) = vm.quit(LIMIT);
        eprintln!("round {round}: escalated {}", rep["pages"]["escalated"]);
    }
}

/// Pages the one vCPU of `mailbox:fresh=1` in 16 MiB touches before it rings the
/// doorbell on a page it never touched, which the VMM then reads for it: a link with
/// `stall=LEN@7` holds back exactly that page. (The pages its page walk and event
/// delivery need are installed before it starts, past the link: not counted.)
const MAILBOX_BOOT_PAGES: u64 = 7;

/// A 1-vCPU `mailbox:fresh=1` VM whose link holds the mailbox page back for `stall`,
/// once its vCPU waits for that page in get_guest_pages.
fn vm_waiting_for_the_mailbox_page(stall: &str) -> LiveVm {
    let link = format!("stall={stall}@{MAILBOX_BOOT_PAGES}");
    let mut vm = LiveVm::start(&[
        "--vcpus",
        "1",
        "--mem",
        "16M",
        "--workload",
        "mailbox:fresh=1",
        "--link",
        &link,
    ]);
    let st = wait_for_the_mailbox_page(&mut vm);
    assert_eq!(vcpus(&st)[0]["state"], "stalled", "{st}");
    vm
}

/// Waits until the vCPU of a `mailbox:fresh=1` VM whose link holds back everything
/// after [`MAILBOX_BOOT_PAGES`] waits for the mailbox page in get_guest_pages; fails
/// saying so if the guest's page count has changed.
fn wait_for_the_mailbox_page(vm: &mut LiveVm) -> serde_json::Value {
    let changed = format!(
        "the guest no longer boots in {MAILBOX_BOOT_PAGES} pages before it rings the doorbell \
         (the tests' links count on it): fix MAILBOX_BOOT_PAGES"
    );
    let start = Instant::now();
    loop {
        let Some(st) = vm.api.try_cmd("status") else {
            panic!("the VM ended before its vcpu waited for the mailbox page: {changed}");
        };
        let v = &vcpus(&st)[0];
        if v["stalled_ms"].as_u64().is_some_and(|ms| ms >= 100) {
            assert_eq!(v["device_wait"], true, "stalled elsewhere: {changed}: {st}");
            let stats = vm.api.cmd("stats");
            assert_eq!(
                stats["pages"]["served"], MAILBOX_BOOT_PAGES,
                "{changed}: {stats}"
            );
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never waited for the mailbox page: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pause_reaches_a_vcpu_waiting_inside_get_guest_pages() {
    if !kvm_or_skip("pause_reaches_a_vcpu_waiting_inside_get_guest_pages") {
        return;
    }
    // The link holds the mailbox page back for 5 s, so the vCPU thread waits in
    // get_guest_pages (not in KVM_RUN) when the pause comes.
    let mut vm = vm_waiting_for_the_mailbox_page("5s");
    let t = Instant::now();
    let p = vm.api.cmd("pause");
    assert!(t.elapsed() < Duration::from_millis(100), "{p}");
    // The kick wakes the page wait at once (not at its 50 ms re-check).
    assert!(p["latency_us"].as_u64().unwrap() < 20_000, "{p}");
    assert_eq!(vcpus(&p)[0]["answered"], true, "{p}");
    assert_eq!(vcpus(&p)[0]["state"], "paused", "{p}");
    assert_eq!(vm.api.cmd("resume")["ok"], true);
    let (r, _) = vm.finish(LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    assert!(r.stdout.contains("[vcpu0] mailbox: "), "{}", r.explain());
}

/// Thread id of vCPU `n` of process `pid` (threads are named ufvmm-vcpuN).
fn vcpu_tid(pid: u32, n: usize) -> i32 {
    let want = format!("ufvmm-vcpu{n}");
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == want {
            return t.file_name().to_string_lossy().parse().expect("tid");
        }
    }
    panic!("no thread {want} in {pid}");
}

#[test]
fn a_stray_sigusr1_in_a_cpl0_stall_then_a_pause_leaves_nothing_spinning() {
    if !kvm_or_skip("a_stray_sigusr1_in_a_cpl0_stall") {
        return;
    }
    let mut vm = stalled_vm("kernel");
    let pid = vm.pid();
    // A SIGUSR1 sent straight to a vCPU thread (as a kick racing the fault would be),
    // then a pause before the supervisor has looked.
    let tid = vcpu_tid(pid, 0);
    // SAFETY: tgkill to a thread of our own child.
    unsafe { libc::syscall(libc::SYS_tgkill, pid as i32, tid, libc::SIGUSR1) };
    std::thread::sleep(Duration::from_millis(2));
    let p = vm.api.cmd("pause");
    assert_eq!(p["ok"], true, "{p}");
    for v in vcpus(&p) {
        assert_eq!(v["answered"], true, "{p}");
        assert_eq!(v["state"], "paused", "{p}");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_nothing_spins(pid, "after a stray tgkill and a pause");
    let (_, rep) = vm.quit(LIMIT);
    assert!(rep["pages"]["escalated"].as_u64().unwrap() >= 1, "{rep}");
}

/// The `stalled_gpa` of each vCPU in a status or pause reply.
fn stalled_gpas(v: &serde_json::Value) -> Vec<Option<String>> {
    vcpus(v)
        .iter()
        .map(|c| c["stalled_gpa"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_vcpu_paused_in_a_cpl3_stall_keeps_its_page_in_view_until_it_arrives() {
    if !kvm_or_skip("a_vcpu_paused_in_a_cpl3_stall_keeps_its_page_in_view") {
        return;
    }
    // Nothing arrives from 200 ms to 3.2 s after start.
    let mut vm = LiveVm::start(&[
        "--mem",
        "64M",
        "--workload",
        "verify:seed=9",
        "--link",
        "stall=3s@200ms",
    ]);
    let st = vm.api.wait_status(Duration::from_secs(10), all_stalled);
    let gpas = stalled_gpas(&st);
    let p = vm.api.cmd("pause");
    for v in vcpus(&p) {
        assert_eq!(v["answered"], true, "{p}");
        assert_eq!(v["state"], "paused", "{p}");
        assert_eq!(v["wait"], "user", "{p}");
    }
    assert_eq!(
        stalled_gpas(&p),
        gpas,
        "the pause lost the pages: {p} ({st})"
    );
    let ms = |v: &serde_json::Value| -> Vec<u64> {
        vcpus(v)
            .iter()
            .map(|c| c["stalled_ms"].as_u64().expect("stalled_ms"))
            .collect()
    };
    let before = ms(&p);
    std::thread::sleep(Duration::from_millis(300));
    let st = vm.api.cmd("status");
    assert_eq!(stalled_gpas(&st), gpas, "{st}");
    for (v, (b, a)) in vcpus(&st).iter().zip(before.iter().zip(ms(&st))) {
        assert_eq!(v["state"], "paused", "{st}");
        assert_eq!(v["wait"], "user", "{st}");
        assert!(
            a >= b + 200,
            "stalled_ms does not count on: {b} then {a}: {st}"
        );
    }
    let faults = |vm: &mut LiveVm| -> Vec<u64> {
        let s = vm.api.cmd("stats");
        vcpus(&s)
            .iter()
            .map(|c| c["faults"].as_u64().unwrap())
            .collect()
    };
    let faults_paused = faults(&mut vm);
    // Resumed while the page is still missing, each vCPU faults on it again: the same
    // wait, still counted from the first fault, not a new fault.
    let last = ms(&st);
    assert_eq!(vm.api.cmd("resume")["ok"], true);
    std::thread::sleep(Duration::from_millis(100));
    let st = vm.api.cmd("status");
    assert_eq!(stalled_gpas(&st), gpas, "{st}");
    for (v, (b, a)) in vcpus(&st).iter().zip(last.iter().zip(ms(&st))) {
        assert_eq!(v["state"], "stalled", "{st}");
        assert!(a >= b + 50, "the wait started again: {b} then {a}: {st}");
    }
    assert_eq!(
        faults(&mut vm),
        faults_paused,
        "a fault on the same page counted twice"
    );
    // Paused again, the page arrives (3.2 s after start) while the vCPUs are parked.
    let p = vm.api.cmd("pause");
    assert_eq!(stalled_gpas(&p), gpas, "{p}");
    let st = vm.api.wait_status(Duration::from_secs(8), |st| {
        vcpus(st).iter().all(|v| v["stalled_gpa"].is_null())
    });
    for v in vcpus(&st) {
        assert_eq!(v["state"], "paused", "{st}");
        assert!(v["stalled_ms"].is_null() && v["wait"].is_null(), "{st}");
    }
    // The whole wait counts as blocktime, paused or not (the vCPU could not run on
    // without the page), and once: about 3 s each, nowhere near 3 s plus the pauses.
    let s = vm.api.cmd("stats");
    for v in vcpus(&s) {
        let bt = v["blocktime_us"].as_u64().unwrap();
        assert!(
            (2_000_000..4_000_000).contains(&bt),
            "blocktime {bt} us: {s}"
        );
    }
    assert_eq!(vm.api.cmd("resume")["ok"], true);
    let (r, rep) = vm.finish(LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    for res in rep["guest"]["results"].as_array().unwrap() {
        assert_eq!(res["mismatches"], 0, "{rep}");
    }
}

#[test]
fn a_vm_stopped_while_paused_on_a_missing_page_reports_that_page() {
    if !kvm_or_skip("a_vm_stopped_while_paused_on_a_missing_page") {
        return;
    }
    let mut vm = stalled_vm("user");
    let st = vm.api.cmd("status");
    let gpas = stalled_gpas(&st);
    let p = vm.api.cmd("pause");
    assert!(vcpus(&p).iter().all(|v| v["state"] == "paused"), "{p}");
    assert_eq!(stalled_gpas(&p), gpas, "{p}");
    std::thread::sleep(Duration::from_millis(200));
    signal(vm.pid(), libc::SIGINT);
    let (r, rep) = vm.finish(LIMIT);
    assert_eq!(r.code(), Some(130), "{}", r.explain());
    for (v, gpa) in rep["vcpus"].as_array().unwrap().iter().zip(&gpas) {
        let gpa = gpa.as_deref().expect("stalled before the pause");
        let at = &v["stalled_at_stop"];
        assert_eq!(at["gpa"], gpa, "{rep}");
        // Counted from the fault (stalled for >= 100 ms before the pause, then 200 ms).
        assert!(at["ms"].as_u64().unwrap() >= 250, "{rep}");
        assert!(
            r.stderr.contains(&format!("was stalled at {gpa} for")),
            "{}",
            r.explain()
        );
    }
}

/// CPU time (utime + stime, clock ticks) of thread `tid` of process `pid`.
fn thread_cpu_ticks(pid: u32, tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).expect("stat");
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    f[11] + f[12]
}

#[test]
fn a_vcpu_waiting_for_a_device_page_during_a_save_sleeps() {
    if !kvm_or_skip("a_vcpu_waiting_for_a_device_page_during_a_save_sleeps") {
        return;
    }
    // A "destination" that takes connections and never answers: the source stays in
    // switch-over, its save requested, for up to 10 s.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    // The link holds the mailbox page back for half a minute: the vCPU thread waits
    // for it in get_guest_pages all through the save.
    let mut vm = vm_waiting_for_the_mailbox_page("30s");
    let go = vm
        .api
        .raw(&format!(r#"{{"cmd":"migrate","to":"127.0.0.1:{port}"}}"#));
    assert!(go.contains("\"ok\":true"), "{go}");
    let st = vm.api.wait_status(Duration::from_secs(5), |st| {
        st["migration"]["state"] == "switchover"
    });
    assert_eq!(vcpus(&st)[0]["device_wait"], true, "{st}");
    let pid = vm.pid();
    let tid = vcpu_tid(pid, 0);
    let before = thread_cpu_ticks(pid, tid);
    std::thread::sleep(Duration::from_millis(1000));
    let used = thread_cpu_ticks(pid, tid) - before;
    eprintln!("vcpu thread waiting during the save: {used} ticks of CPU in 1 s");
    let st = vm.api.cmd("status");
    assert_eq!(st["migration"]["state"], "switchover", "{st}");
    assert_eq!(vcpus(&st)[0]["device_wait"], true, "{st}");
    // A busy retry takes a whole core (100 ticks a second); a sleeping wait, nothing.
    assert!(
        used <= 10,
        "the waiting vcpu thread used {used} ticks in 1 s"
    );
    // The wait still answers kicks, and shutdown ends it.
    let k = vm.api.raw(r#"{"cmd":"kick","count":3}"#);
    assert!(k.contains("\"unanswered\":0"), "{k}");
    let t = Instant::now();
    let (r, _) = vm.quit(LIMIT);
    assert!(t.elapsed() < Duration::from_secs(5), "{}", r.explain());
}

/// Rounds of `resume` then `pause` against a guest that exits every millisecond, and
/// how many of them check that the guest stopped making progress.
const PAUSE_ROUNDS: usize = 5000;
const PROGRESS_EVERY: usize = 100;

#[test]
fn a_pause_is_answered_only_by_vcpus_that_are_paused() {
    if !kvm_or_skip("a_pause_is_answered_only_by_vcpus_that_are_paused") {
        return;
    }
    // A pause landing between the run loop's pause check and its answer to kicks was
    // answered by a vCPU on its way back into the guest. The window is a few
    // instructions wide: the loop without the fix failed this at round 92,223 and at
    // round 15,426 (of 120,000, about 1 ms each), so these rounds catch it only now and
    // then; the kick module's unit test widens the window and catches it every time.
    let mut vm = LiveVm::start(&["--mem", "32M", "--workload", "spin:ms=0,heartbeat=1"]);
    vm.api.wait_status(Duration::from_secs(20), |st| {
        vcpus(st).iter().all(|v| v["state"] == "running")
    });
    let heartbeats = |api: &mut Api| -> u64 {
        let st = api.cmd("stats");
        vcpus(&st)
            .iter()
            .map(|v| v["heartbeats"].as_u64().expect("heartbeats"))
            .sum()
    };
    let start = Instant::now();
    let mut all_answered = 0;
    for round in 0..PAUSE_ROUNDS {
        assert_eq!(vm.api.cmd("resume")["ok"], true);
        // Land the pause at varying points of the vCPUs' way out of their park.
        std::thread::sleep(Duration::from_micros((round % 13 * 25) as u64));
        let p = vm.api.cmd("pause");
        assert_eq!(p["ok"], true, "{p}");
        for v in vcpus(&p) {
            assert!(
                v["answered"] == false || v["state"] == "paused",
                "round {round}: answered by a vcpu that is not paused: {p}"
            );
        }
        if !vcpus(&p).iter().all(|v| v["answered"] == true) {
            continue;
        }
        all_answered += 1;
        if round % PROGRESS_EVERY == 0 {
            let before = heartbeats(&mut vm.api);
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(
                heartbeats(&mut vm.api),
                before,
                "round {round}: the guest ran on after an answered pause: {p}"
            );
        }
    }
    eprintln!(
        "{PAUSE_ROUNDS} pause rounds in {:?}, {all_answered} answered by every vcpu",
        start.elapsed()
    );
    assert!(all_answered > PAUSE_ROUNDS / 2, "{all_answered} answered");
    vm.quit(LIMIT);
}
