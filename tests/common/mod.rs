//! Helpers for tests that boot real guests with the `ufvmm` binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod gdb;
pub mod hold_proxy;
pub mod migration;

/// True if the test may boot guests. Without /dev/kvm: fails under CI=true, else the
/// test is skipped and says so.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: /dev/kvm is missing and CI=true: this test needs real KVM");
    }
    eprintln!("SKIPPED {test}: /dev/kvm is missing (set CI=true to make this a failure)");
    false
}

/// The binary under test.
pub fn ufvmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ufvmm"));
    c.stdin(Stdio::null());
    c
}

/// A scratch directory for one test.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Output of a finished run.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Fails with both streams shown.
    pub fn explain(&self) -> String {
        format!(
            "exit {:?} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// A running `ufvmm`, killed if the test ends (or panics) before waiting for it.
pub struct Proc(Option<Child>);

impl Proc {
    /// Takes ownership of a spawned child.
    pub fn new(child: Child) -> Proc {
        Proc(Some(child))
    }

    /// Process id.
    pub fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for a child with a deadline; kills it (and fails) if it overruns.
pub fn wait_with_timeout(mut proc: Proc, limit: Duration) -> Run {
    let mut child = proc.0.take().expect("process already waited for");
    let start = Instant::now();
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let st = child.wait().expect("wait");
            let stdout = t_out.join().unwrap_or_default();
            let stderr = t_err.join().unwrap_or_default();
            panic!("ufvmm hung for {limit:?} ({st:?})\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    Run {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        elapsed,
    }
}

/// Starts `ufvmm run ARGS` with piped output.
pub fn spawn_run(args: &[&str]) -> Proc {
    Proc(Some(
        ufvmm()
            .arg("run")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ufvmm"),
    ))
}

/// Runs `ufvmm run ARGS` to its end (at most `limit`).
pub fn run(args: &[&str], limit: Duration) -> Run {
    wait_with_timeout(spawn_run(args), limit)
}

/// Runs `ufvmm ARGS` (no implicit `run`).
pub fn run_raw(args: &[&str], limit: Duration) -> Run {
    let child = ufvmm()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ufvmm");
    wait_with_timeout(Proc(Some(child)), limit)
}

/// `ufvmm run ARGS --report R` (at most `limit`), which must exit 0; its report.
#[allow(dead_code)]
pub fn report_of(args: &[&str], limit: Duration) -> Value {
    let dir = scratch();
    let report = path_in(&dir, "r.json");
    let mut all = args.to_vec();
    all.extend_from_slice(&["--report", s(&report)]);
    let r = run(&all, limit);
    assert_eq!(r.code(), Some(0), "{args:?}: {}", r.explain());
    read_report(&report)
}

/// Reads a JSON report.
pub fn read_report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("report {} missing: {e}", path.display()));
    serde_json::from_str(&text).expect("report is JSON")
}

/// Path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A control-socket client.
pub struct Api {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Api {
    /// Connects, retrying until the socket exists (up to 10 s).
    pub fn connect(path: &Path) -> Api {
        let start = Instant::now();
        loop {
            if let Ok(stream) = UnixStream::connect(path) {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let reader = BufReader::new(stream.try_clone().expect("clone"));
                return Api { stream, reader };
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no control socket at {path:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a raw line, returns the raw reply line.
    pub fn raw(&mut self, line: &str) -> String {
        self.stream.write_all(line.as_bytes()).expect("write");
        self.stream.write_all(b"\n").expect("write");
        let mut reply = String::new();
        self.reader.read_line(&mut reply).expect("read reply");
        reply
    }

    /// Sends `{"cmd": CMD}` and parses the reply; `None` if the VM is gone (the
    /// connection closed or broke).
    pub fn try_cmd(&mut self, cmd: &str) -> Option<Value> {
        let line = format!("{{\"cmd\":\"{cmd}\"}}\n");
        self.stream.write_all(line.as_bytes()).ok()?;
        let mut reply = String::new();
        match self.reader.read_line(&mut reply) {
            Ok(n) if n > 0 => serde_json::from_str(&reply).ok(),
            _ => None,
        }
    }

    /// Sends `{"cmd": CMD}` and parses the reply.
    pub fn cmd(&mut self, cmd: &str) -> Value {
        let reply = self.raw(&format!("{{\"cmd\":\"{cmd}\"}}"));
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"))
    }

    /// Polls `status` until `pred` holds (up to `limit`).
    pub fn wait_status(&mut self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let st = self.cmd("status");
            if pred(&st) {
                return st;
            }
            assert!(start.elapsed() < limit, "status never matched: {st}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The vCPU entries of a status/pause reply.
pub fn vcpus(v: &Value) -> &Vec<Value> {
    v["vcpus"].as_array().expect("vcpus array")
}

/// True if every vCPU in a status reply has been stalled for at least 100 ms (shorter
/// stalls are ordinary demand paging).
pub fn all_stalled(v: &Value) -> bool {
    vcpus(v)
        .iter()
        .all(|c| c["state"] == "stalled" && c["stalled_ms"].as_u64().is_some_and(|ms| ms >= 100))
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child we spawned.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// CPU time (user+system, in clock ticks) the process has used.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 0, utime is 11, stime is 12.
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Threads of `pid` that have SIGUSR1 pending.
pub fn threads_with_sigusr1_pending(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in status.lines().filter(|l| l.starts_with("SigPnd:")) {
            let mask = l
                .split_whitespace()
                .nth(1)
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .unwrap_or(0);
            if mask & (1 << (libc::SIGUSR1 - 1)) != 0 {
                out.push(t.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// A temp path inside `dir`.
pub fn path_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Runs and waits for output (no timeout needed for quick commands).
pub fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("run command")
}

/// A running VM with a control socket and a report file in its own scratch directory.
pub struct LiveVm {
    pub proc: Proc,
    pub api: Api,
    pub sock: PathBuf,
    pub report: PathBuf,
    _dir: tempfile::TempDir,
}

impl LiveVm {
    /// Starts `ufvmm run ARGS --api-sock .. --report ..` and connects to it.
    pub fn start(args: &[&str]) -> LiveVm {
        Self::start_under(&[], args)
    }

    /// As [`LiveVm::start`], with the command run by `wrapper` (e.g. `setpriv ... --`;
    /// empty for none).
    pub fn start_under(wrapper: &[&str], args: &[&str]) -> LiveVm {
        let dir = scratch();
        let sock = path_in(&dir, "api.sock");
        let report = path_in(&dir, "report.json");
        let mut all = args.to_vec();
        all.extend_from_slice(&["--api-sock", s(&sock), "--report", s(&report)]);
        let proc = match wrapper.split_first() {
            None => spawn_run(&all),
            Some((first, rest)) => Proc(Some(
                Command::new(first)
                    .args(rest)
                    .arg(env!("CARGO_BIN_EXE_ufvmm"))
                    .arg("run")
                    .args(&all)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn the wrapped ufvmm"),
            )),
        };
        let api = Api::connect(&sock);
        LiveVm {
            proc,
            api,
            sock,
            report,
            _dir: dir,
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Waits for the end (at most `limit`); returns the run and the report.
    pub fn finish(self, limit: Duration) -> (Run, Value) {
        let LiveVm {
            proc, report, _dir, ..
        } = self;
        let r = wait_with_timeout(proc, limit);
        let rep = if report.exists() {
            read_report(&report)
        } else {
            Value::Null
        };
        (r, rep)
    }

    /// Sends `quit` and expects a clean exit 0.
    pub fn quit(mut self, limit: Duration) -> (Run, Value) {
        assert_eq!(self.api.cmd("quit")["ok"], true);
        let (r, rep) = self.finish(limit);
        assert_eq!(r.code(), Some(0), "{}", r.explain());
        (r, rep)
    }
}

/// Asserts that no thread of `pid` has SIGUSR1 pending and none spins: at most 10
/// clock ticks of CPU in 500 ms.
pub fn assert_nothing_spins(pid: u32, what: &str) {
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        threads_with_sigusr1_pending(pid),
        Vec::<String>::new(),
        "{what}"
    );
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_ticks(pid) - before;
    assert!(used <= 10, "{what}: {used} ticks in 500 ms: a thread spins");
}
