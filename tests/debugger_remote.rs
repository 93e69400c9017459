//! The gdb stub reached the other ways: over TCP on loopback (and only there), and on a
//! postcopy destination whose link broke, while it is paused and before it recovers by
//! itself. The real gdb (Debian's), real KVM, real TCP.

mod common;
use common::gdb::Gdb;
use common::migration::{assert_migrated, proxy, source, spawn_listening, Dest, Listening, LIMIT};
use common::*;

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The address the test gives the host in its own network namespace: not loopback
/// (TEST-NET-2, a documentation range), and never on any real network.
const OTHER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// Moves the calling thread (and what it starts from now on) into a network namespace
/// of its own, with loopback up and [`OTHER_ADDR`] on it; returns that address. Where
/// that cannot be done (not root, no `ip`), says why and leaves the thread where it was.
fn own_network_namespace() -> Result<Ipv4Addr, String> {
    let back = File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?;
    // SAFETY: unshare(2) with CLONE_NEWNET moves only the calling thread into a new
    // network namespace; no memory is involved.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        ));
    }
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let addr = format!("{OTHER_ADDR}/32");
    let set_up =
        ip(&["link", "set", "lo", "up"]).and_then(|()| ip(&["addr", "add", &addr, "dev", "lo"]));
    if let Err(e) = set_up {
        // SAFETY: setns(2) on the namespace fd opened above, for this thread only.
        let r = unsafe { libc::setns(back.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            r, 0,
            "cannot return to the test's network namespace after: {e}"
        );
        return Err(e);
    }
    Ok(OTHER_ADDR)
}

/// The local addresses of the TCP sockets listening on `port` in `pid`'s network
/// namespace: IPv4 ones as addresses, IPv6 ones as /proc/net/tcp6 spells them.
fn listeners_on(pid: u32, port: u16) -> (Vec<Ipv4Addr>, Vec<String>) {
    let listening = |file: &str| -> Vec<String> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/net/{file}: {e}"));
        text.lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (local, state) = (f.get(1)?, f.get(3)?);
                let (addr, p) = local.split_once(':')?;
                // 0A: TCP_LISTEN.
                (*state == "0A" && u16::from_str_radix(p, 16).ok()? == port)
                    .then(|| addr.to_owned())
            })
            .collect()
    };
    let v4 = listening("tcp")
        .iter()
        .filter_map(|h| u32::from_str_radix(h, 16).ok())
        // The kernel prints the address's network-order bytes as a native integer.
        .map(|a| Ipv4Addr::from(a.to_ne_bytes()))
        .collect();
    (v4, listening("tcp6"))
}

/// Connects to `addr` (bounded); the error kind if it fails.
fn connect(addr: SocketAddr) -> Result<TcpStream, ErrorKind> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.kind())
}

/// Asserts that a connect to `to` on the stub's `port` is refused, and that it is the
/// stub's bind that refuses it: a listener on every address is reached there.
fn assert_refused_but_reachable(to: Ipv4Addr, port: u16) {
    let r = connect(SocketAddr::from((to, port)));
    assert_eq!(
        r.as_ref().err(),
        Some(&ErrorKind::ConnectionRefused),
        "the stub on 127.0.0.1:{port} took (or did not refuse) a connect to {to}:{port}: {r:?}"
    );
    let any = TcpListener::bind("0.0.0.0:0").expect("a listener on every address");
    let any_port = any.local_addr().expect("its address").port();
    assert!(
        connect(SocketAddr::from((to, any_port))).is_ok(),
        "{to} is not reachable at all here: the refusal above says nothing"
    );
}

/// `ufvmm run ARGS` with a control socket and a report, its stderr read up to the gdb
/// stub's "listening on" line and drained on a thread after it.
struct TcpVm {
    proc: Proc,
    api: Api,
    report: std::path::PathBuf,
    /// Where the stub listens, as it said.
    gdb_addr: String,
    err: JoinHandle<String>,
    _dir: tempfile::TempDir,
}

impl TcpVm {
    fn start(args: &[&str]) -> TcpVm {
        let dir = scratch();
        let sock = path_in(&dir, "api.sock");
        let report = path_in(&dir, "report.json");
        let mut child = ufvmm()
            .arg("run")
            .args(args)
            .args(["--api-sock", s(&sock), "--report", s(&report)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ufvmm");
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        let proc = Proc::new(child);
        // Each line to the test as it comes, all of them at the end.
        let (tx, lines) = std::sync::mpsc::channel();
        let err = std::thread::spawn(move || {
            let mut all = String::new();
            for line in err.lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = String::new();
        let gdb_addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines.recv_timeout(left).unwrap_or_else(|e| {
                panic!("the stub did not say where it listens ({e}); ufvmm said:\n{seen}")
            });
            if let Some(a) = line.split("gdb stub listening on ").nth(1) {
                break a.trim().to_owned();
            }
            seen.push_str(&line);
            seen.push('\n');
        };
        let api = Api::connect(&sock);
        TcpVm {
            proc,
            api,
            report,
            gdb_addr,
            err,
            _dir: dir,
        }
    }

    /// Waits for the end (at most `limit`); the run (stderr included) and the report.
    fn finish(self, limit: Duration) -> (Run, Value) {
        let mut r = wait_with_timeout(self.proc, limit);
        r.stderr = self.err.join().unwrap_or_default();
        let rep = if self.report.exists() {
            read_report(&self.report)
        } else {
            Value::Null
        };
        (r, rep)
    }
}

/// Runs `f` on a thread of its own, named `name` (one whose network namespace may be
/// changed), and passes its panic on.
fn on_own_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    let t = std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("a thread for the test");
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p);
    }
}

/// `--gdb PORT`: gdb over TCP sees a thread per vCPU and its registers; the stub listens
/// on 127.0.0.1 only (in a network namespace of the test's own, where it can, a connect
/// to an address that is not loopback is refused).
#[test]
fn gdb_over_tcp_on_loopback() {
    if !kvm_or_skip("gdb_over_tcp_on_loopback") {
        return;
    }
    on_own_thread("gdb_over_tcp_on_loopback", gdb_over_tcp_on_loopback_here);
}

fn gdb_over_tcp_on_loopback_here() {
    let t0 = Instant::now();
    // A connect to an address that is not loopback goes only to one in a network
    // namespace of the test's own, never to the machine's network.
    let other = own_network_namespace();
    // A bare PORT (here 0, the kernel picks one) means 127.0.0.1.
    let mut vm = TcpVm::start(&[
        "--mem",
        "64M",
        "--gdb",
        "0",
        "--mode",
        "user",
        "--workload",
        "spin:ms=5000",
    ]);
    let port: u16 = vm
        .gdb_addr
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("--gdb 0 listens on {:?}, not 127.0.0.1:PORT", vm.gdb_addr));
    assert_ne!(port, 0, "{}", vm.gdb_addr);
    vm.api.wait_status(Duration::from_secs(10), |v| {
        vcpus(v).len() == 2 && vcpus(v).iter().all(|c| c["state"] == "running")
    });

    // Only loopback: the one socket listening on the port is bound to 127.0.0.1 ...
    let (v4, v6) = listeners_on(vm.proc.id(), port);
    assert_eq!(v4, vec![Ipv4Addr::LOCALHOST], "IPv4 listeners on {port}");
    assert_eq!(v6, Vec::<String>::new(), "IPv6 listeners on {port}");
    // ... so another loopback address is refused (a wildcard bind would take it) ...
    assert_refused_but_reachable(Ipv4Addr::new(127, 0, 0, 2), port);
    // ... and so is the host's address that is not loopback.
    match other {
        Ok(addr) => {
            assert_refused_but_reachable(addr, port);
            eprintln!("--gdb {port}: a connect to {addr}:{port}, not loopback, is refused");
        }
        Err(why) => println!(
            "SKIPPED the connect to a non-loopback address: no network namespace of the \
             test's own ({why}); the listener table above shows only 127.0.0.1:{port}"
        ),
    }

    // gdb over TCP: every vCPU a thread, with its registers.
    let limit = Duration::from_secs(10);
    let t = Instant::now();
    let mut gdb = Gdb::attach(&format!("127.0.0.1:{port}"));
    let threads = gdb.run("info threads", limit);
    eprintln!(
        "gdb over TCP: attached and listed threads in {:?}",
        t.elapsed()
    );
    let listed: Vec<&str> = threads
        .lines()
        .filter(|l| l.contains("Thread ") && l.contains("(vcpu "))
        .collect();
    assert_eq!(listed.len(), 2, "one thread per vcpu:\n{threads}");
    for id in 0..2 {
        assert!(
            listed.iter().any(|l| l.contains(&format!("(vcpu {id}: "))),
            "no thread says \"vcpu {id}: ...\":\n{threads}"
        );
    }
    let regs = gdb.run("info registers rip", limit);
    assert!(
        regs.lines()
            .map(|l| l.trim_start_matches("(gdb) "))
            .any(|l| l.starts_with("rip") && l.contains(" 0x")),
        "{regs}"
    );
    let st = vm.api.cmd("status");
    assert_eq!(st["debugger"]["attached"], true, "{st}");
    assert_eq!(st["debugger"]["stopped"], true, "{st}");
    gdb.detach();
    let st = vm.api.wait_status(Duration::from_secs(5), |v| {
        v["debugger"]["attached"] == false
    });
    assert_eq!(st["debugger"]["stopped"], false, "{st}");

    let (r, rep) = vm.finish(Duration::from_secs(60));
    assert_eq!(r.code(), Some(0), "{}", r.explain());
    assert_eq!(
        rep["guest"]["results"].as_array().map(Vec::len),
        Some(2),
        "{rep}"
    );
    assert!(r.stderr.contains("gdb: detached"), "{}", r.explain());
    eprintln!("gdb_over_tcp_on_loopback: {:?}", t0.elapsed());
}

/// A link proxy listening on `port` (that of an earlier one), in front of `to`.
fn proxy_on(port: u16, to: u16, link: &str) -> Listening {
    let p = spawn_listening(&[
        "link-proxy",
        "--listen",
        &port.to_string(),
        "--connect",
        &to.to_string(),
        "--link",
        link,
    ]);
    assert_eq!(p.port, port, "the proxy came back on another port");
    p
}

/// What a destination that ended printed.
fn ended(dest: Dest) -> String {
    let mut r = wait_with_timeout(dest.l.proc, Duration::from_secs(10));
    r.stdout = dest.l.out.join().unwrap_or_default();
    r.explain()
}

/// Polls the destination's `status` until `pred` holds (at most `limit`, else fails
/// saying `what`); fails with what the destination printed if it ends first.
fn wait_dest(
    api: &mut Api,
    dest: Dest,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> (Dest, Value) {
    let start = Instant::now();
    loop {
        match api.try_cmd("status") {
            Some(st) if pred(&st) => return (dest, st),
            Some(st) => assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}: {st}"
            ),
            None => panic!("{what}: the destination ended first:\n{}", ended(dest)),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mid-postcopy the network between source and destination dies (the link proxy is
/// killed): the destination is postcopy-paused, its vCPUs wait for pages. gdb looks at
/// it then and detaches; the network comes back on the same port, the source
/// reconnects by itself, and the guest's verify passes on the destination.
#[test]
fn gdb_on_a_paused_postcopy_destination_then_recovery_passes_verify() {
    if !kvm_or_skip("gdb_on_a_paused_postcopy_destination_then_recovery_passes_verify") {
        return;
    }
    let t0 = Instant::now();
    let dir = scratch();
    let gsock = path_in(&dir, "gdb.sock");
    let g = format!("unix:{}", s(&gsock));
    let dest = Dest::start_in(dir, &["--gdb", &g]);
    // The network between the two is a link proxy: at 16 MiB/s, postcopy takes about
    // 4 s. The guest's 12 s of verify rounds outlast the pause below and the last page.
    let link = "bandwidth=16MiB/s";
    let p = proxy(dest.l.port, link);
    let src = source(p.port, "64M", 12, "1s", &[]);
    let mut api = Api::connect(&dest.sock);
    let (dest, _) = wait_dest(
        &mut api,
        dest,
        Duration::from_secs(20),
        "mid-postcopy",
        |st| {
            st["migration"]["state"] == "postcopy"
                && st["migration"]["pages"]["background"].as_u64() > Some(100)
        },
    );
    // The network dies: both ends see their connections reset, and the source's
    // reconnections are refused until it comes back.
    let proxy_port = p.port;
    drop(p); // SIGKILL
    let cut = Instant::now();
    let (dest, _) = wait_dest(
        &mut api,
        dest,
        Duration::from_secs(10),
        "postcopy-paused",
        |st| st["migration"]["state"] == "postcopy-paused",
    );
    // Every vCPU waits for a page that cannot come while the link is down.
    let (dest, _) = wait_dest(
        &mut api,
        dest,
        Duration::from_secs(10),
        "every vcpu stalled",
        |st| st["migration"]["state"] == "postcopy-paused" && all_stalled(st),
    );

    let limit = Duration::from_secs(10);
    let mut gdb = Gdb::attach_unix(&gsock);
    let threads = gdb.run("info threads", limit);
    // gdb's connection stopped every vCPU; each keeps its page on record.
    let st = api.cmd("status");
    assert_eq!(st["debugger"]["attached"], true, "{st}");
    let mut pages = Vec::new();
    for (id, v) in vcpus(&st).iter().enumerate() {
        let page = v["stalled_gpa"]
            .as_str()
            .unwrap_or_else(|| panic!("vcpu {id} no longer stalled: {st}"))
            .to_owned();
        assert!(
            threads.contains(&format!("vcpu {id}: waiting for page {page}")),
            "vcpu {id} on {page}:\n{threads}"
        );
        pages.push(page);
    }
    let t = Instant::now();
    let missing = gdb.run(&format!("x/2gx {}", pages[0]), limit);
    let took = t.elapsed();
    assert!(missing.contains("Cannot access memory"), "{missing}");
    assert!(
        took < Duration::from_secs(2),
        "x on a missing page took {took:?}"
    );
    let regs = gdb.run("info registers rip", limit);
    assert!(regs.contains("rip"), "{regs}");
    // Run on and interrupt: every vCPU stops in bound, also here.
    gdb.send("continue");
    gdb.until("Continuing", limit);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    gdb.interrupt();
    gdb.until("SIGINT", limit);
    let reply = t.elapsed();
    let st = api.cmd("status");
    let stop_us = st["debugger"]["last_stop_us"].as_u64().unwrap_or(u64::MAX);
    assert!(stop_us < 100_000, "all-stop took {stop_us} us: {st}");
    assert!(
        reply < Duration::from_secs(1),
        "gdb showed the stop after {reply:?}"
    );
    eprintln!(
        "paused destination: interrupt: every vcpu parked in {stop_us} us, gdb showed the stop after {reply:?}"
    );
    // All of this was on a destination still paused.
    let st = api.cmd("status");
    assert_eq!(st["migration"]["state"], "postcopy-paused", "{st}");
    assert_eq!(st["debugger"]["attached"], true, "{st}");
    eprintln!(
        "paused destination: gdb attached, looked and is detaching {:?} after the cut; x \
         on {} answered in {took:?}",
        cut.elapsed(),
        pages[0]
    );
    gdb.detach();
    let (dest, _) = wait_dest(
        &mut api,
        dest,
        Duration::from_secs(5),
        "gdb detached",
        |v| v["debugger"]["attached"] == false,
    );

    // The network comes back where it was; the source finds it by itself (its
    // reconnections back off to at most 2 s), and the guest verifies every round here.
    let p = proxy_on(proxy_port, dest.l.port, link);
    let back = Instant::now();
    let (dest, _) = wait_dest(&mut api, dest, Duration::from_secs(15), "recovered", |st| {
        st["migration"]["recoveries"].as_u64() >= Some(1)
    });
    eprintln!(
        "the source reconnected {:?} after the network came back",
        back.elapsed()
    );
    let src = wait_with_timeout(src, LIMIT);
    let m = assert_migrated(src, dest.finish());
    assert!(m["connection_breaks"].as_u64() >= Some(1), "{m}");
    assert!(m["recoveries"].as_u64() >= Some(1), "{m}");
    drop(p);
    eprintln!(
        "gdb_on_a_paused_postcopy_destination_then_recovery_passes_verify: {:?}",
        t0.elapsed()
    );
}
