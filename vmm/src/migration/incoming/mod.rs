//! The destination side: `ufvmm incoming --listen HOST:PORT`.
//!
//! The first connection to say `Hello` on the main channel defines the migration (RAM
//! size, vCPUs, session). The VM is built at once with all RAM missing and a
//! [`Remote`] page source; the main connection's precopy pages and discards go straight
//! to the fault loop, vCPU states are restored as they come, and the device state
//! starts the vCPUs. From then on a fault asks for its page on the urgent connection.
//! If a connection breaks, the migration is `postcopy-paused`: vCPUs on missing pages
//! wait (and stay kickable, pausable, stoppable), and the listener takes the source's
//! reconnection, after which this side says which pages it still lacks and asks again
//! for those in flight.
//!
//! This file holds the options, the start of it all and the session's event loop; the
//! session's other work is split by phase: `link` takes its connections and reads them,
//! `switchover` restores the vCPU states and starts the guest (or tells the source it
//! never started here), and `postcopy` asks for pages, resumes after a break and sees
//! the migration complete.

mod link;
mod postcopy;
mod switchover;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use serde_json::json;

use super::conn::{self, FrameWriter};
use super::listener::{refuse, spawn_acceptor};
use super::progress::{Phase, Progress, Role, Ticker};
use super::verdicts::Verdicts;
use super::waiting::{Waited, Waiting};
use super::wire::{ErrorCode, Limits, Message};
use crate::config::ConfigError;
use crate::fault::handler::Supply;
use crate::memory::HUGE_PAGE_SIZE;
use crate::source::remote::{ArrivalSender, Remote};
use crate::vm::shared::{VmEvent, VmShared};
use crate::vm::{self, Built, VmError};

/// `ufvmm incoming` options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where to listen.
    pub listen: String,
    /// Control socket.
    pub api_sock: Option<PathBuf>,
    /// Report file.
    pub report: Option<PathBuf>,
    /// Serve gdb here once the VM is built.
    pub gdb: Option<crate::debug::GdbAddr>,
    /// Hold the vCPUs before their first instruction here until gdb continues them.
    pub gdb_wait: bool,
    /// Read-ahead as a request window: after a sequential fault, ask the source for the
    /// pages that follow too.
    pub prefetch: crate::fault::prefetch::Prefetch,
}

impl Options {
    /// Checks the options before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::config::check_addr("--listen", &self.listen).or_else(|e| {
            if self.listen.ends_with(":0") {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        if self.gdb_wait && self.gdb.is_none() {
            return Err(ConfigError::Conflict("--gdb-wait goes with --gdb"));
        }
        crate::config::check_output_dirs(&[
            ("--report", &self.report),
            ("--api-sock", &self.api_sock),
        ])
    }
}

/// How long a destination whose migration failed before the start stays to tell a
/// reconnecting source.
const FAIL_GRACE: Duration = Duration::from_secs(10);

/// How long a destination that ends before its guest started here stays to tell the
/// source so (on connections still saying hello, or reconnecting)...
pub(super) const EXIT_GRACE: Duration = Duration::from_millis(500);
/// ... and longer while a connection is still saying hello, up to this.
pub(super) const EXIT_GRACE_MAX: Duration = Duration::from_secs(2);
/// [`EXIT_GRACE`] for a destination whose migration failed before the start: longer
/// than the source's longest reconnect backoff (2 s).
const FAILED_EXIT_GRACE: Duration = Duration::from_secs(3);

/// What a destination says of a guest that never started here (a version-1 source
/// looks for these words).
pub(super) const NEVER_STARTED: &str = "the guest never started here";

/// Tells connection `s` of session `hi.session` that its guest never started here
/// (`extra` added to the text), recording it first, so that this destination never
/// starts that guest afterwards. Should it have started here, says that instead.
pub(super) fn refuse_never_started(
    verdicts: &Verdicts,
    hi: &Hi,
    s: &TcpStream,
    peer: &str,
    extra: &str,
) {
    if verdicts.deny(hi.session) {
        let why = format!("{NEVER_STARTED}{extra}");
        refuse(s, peer, ErrorCode::NeverStarted, &why);
    } else {
        refuse(s, peer, ErrorCode::Other, "the guest started here");
    }
}

/// A connection's hello.
#[derive(Clone, Copy, Debug)]
pub(super) struct Hi {
    pub(super) mem_size: u64,
    pub(super) vcpus: u32,
    /// Bytes in a page of the source's RAM: this side's RAM is built in it.
    pub(super) page_size: u64,
    pub(super) session: u64,
    pub(super) channel: u16,
    pub(super) resume: bool,
}

/// What the session thread hears.
pub(super) enum Ev {
    /// A new connection said hello.
    Conn(Hi, TcpStream, String),
    /// A message on the main connection of attempt `gen`.
    Msg(u64, Message),
    /// Connection `gen` ended; the flag says it sent bad bytes.
    Lost(u64, String, bool),
    /// The fault loop asks for pages.
    Ask(Vec<usize>),
    /// The fault loop installed the last page missing.
    AllHere,
}

/// Runs the destination until the guest ends; returns the exit code.
pub fn run(opts: &Options) -> Result<i32, VmError> {
    let started = Instant::now();
    let p = vm::plumbing()?;
    let listen = conn::normalize_addr(&opts.listen);
    let listen_err = |source| VmError::Listen {
        addr: listen.clone(),
        source,
    };
    let listener = TcpListener::bind(&listen).map_err(listen_err)?;
    // Bound now, so a bad address fails at once; served once the VM exists.
    let gdb = opts
        .gdb
        .as_ref()
        .map(crate::debug::Listener::bind)
        .transpose()?;
    let local = listener.local_addr().map_err(listen_err)?;
    println!("ufvmm: incoming: listening on {local}");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // The control socket comes up now, before any VM: a waiting destination can be
    // asked its state and told to quit.
    let target = crate::control::api::Target::waiting(local.to_string(), p.tx.clone());
    if let Some(path) = opts.api_sock.as_deref() {
        crate::control::api::spawn(path, target.clone())?;
    }
    let (tx, rx) = channel::<Ev>();
    let verdicts = Arc::new(Verdicts::default());
    let busy = spawn_acceptor(listener, tx.clone(), verdicts.clone())?;

    // The first main-channel hello of a session it may take defines the migration.
    let waiting = Waiting {
        opts,
        local,
        started,
        rx: &rx,
        verdicts: &verdicts,
        busy: &busy,
    };
    let ((hi, stream, peer), early) = match waiting.wait(&p)? {
        Waited::Hello(first, early) => (first, early),
        Waited::Ended(code) => return Ok(code),
    };
    // RAM in the source's page size; 2 MiB pages need the pool `run --hugepages` needs.
    let huge = hi.page_size == HUGE_PAGE_SIZE;
    if huge {
        if let Err(source) = crate::memory::check_huge_pool(hi.mem_size) {
            let why = format!("the destination cannot hold the guest's RAM: {source}");
            waiting.refuse_all((hi, stream, peer.clone()), early, ErrorCode::NoMemory, &why);
            return Err(VmError::NoRoom { peer, source });
        }
    }
    eprintln!(
        "ufvmm: incoming: migration from {peer}: {} vcpus, {} MiB in {} pages",
        hi.vcpus,
        hi.mem_size >> 20,
        if huge { "2 MiB" } else { "4 KiB" }
    );
    let progress = Arc::new(Progress::new(
        Role::Destination,
        peer.clone(),
        hi.mem_size / hi.page_size,
    ));
    let mut arrivals = None;
    let ask_tx = tx.clone();
    let built = vm::build_incoming(
        hi.vcpus as usize,
        hi.mem_size,
        p.tx.clone(),
        p.interrupted.clone(),
        huge,
        |fault| {
            let here_tx = ask_tx.clone();
            let ask = Box::new(move |pages| {
                let _ = ask_tx.send(Ev::Ask(pages));
            });
            let done = progress.clone();
            let all_here = Box::new(move || {
                // At once, not at the session's turn: the guest may end meanwhile.
                if done.complete_postcopy() {
                    let _ = here_tx.send(Ev::AllHere);
                }
            });
            let page = fault.ram.page_size();
            let (remote, sender) = Remote::new(ask, all_here, fault.wake_handle(), page);
            arrivals = Some(sender);
            Supply::Remote(remote)
        },
    );
    let Built {
        vm,
        fds,
        fault_loop,
    } = match built {
        Ok(b) => b,
        // The pool shrank since the check above (another process took huge pages), or
        // the reserving mmap failed: the source hears the same refusal, not a reset.
        Err(VmError::Memory(
            source @ (crate::memory::MemoryError::HugePool { .. }
            | crate::memory::MemoryError::NoHugePages
            | crate::memory::MemoryError::MapHuge { .. }),
        )) => {
            let why = format!("the destination cannot hold the guest's RAM: {source}");
            waiting.refuse_all((hi, stream, peer.clone()), early, ErrorCode::NoMemory, &why);
            return Err(VmError::NoRoom { peer, source });
        }
        Err(e) => return Err(e),
    };
    let fault_loop = fault_loop.map(|l| {
        l.with_policies(crate::fault::prefetch::Policies {
            prefetch: opts.prefetch,
            background: None,
        })
    });
    let Some(arrivals) = arrivals else {
        return Err(VmError::Thread(std::io::Error::other("no remote source")));
    };
    // Until the device state: pages sent while the guest still runs on the source.
    progress.set_phase(Phase::Precopy);
    *vm.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some(progress.clone());
    vm::start_helpers(fault_loop, &vm, None)?;
    if let Some(l) = gdb {
        if opts.gdb_wait {
            crate::debug::hold_for_gdb(&vm);
        }
        crate::debug::spawn(l, vm.clone()).map_err(VmError::Thread)?;
    }
    target.set_vm(vm.clone());
    let mut session = Session {
        vm: vm.clone(),
        progress,
        arrivals,
        tx,
        hi,
        limits: Limits {
            mem_size: hi.mem_size,
            page_size: hi.page_size,
        },
        gen: 0,
        main: None,
        urgent: None,
        fresh: (false, false),
        urgent_ever: false,
        restored: vec![false; fds.len()],
        fds: fds.into_iter().map(Some).collect(),
        started: false,
        completed: false,
        done_told: false,
        source_done: None,
        failed: None,
        verdicts: verdicts.clone(),
        busy: busy.clone(),
    };
    session.attach(hi, stream);
    for (h, s, peer) in early {
        session.on_conn(h, s, &peer);
    }
    // The VM is built: the source may stop its vCPUs now (until this, their states
    // would wait for the build, and so would the guest).
    session.send_main(&Message::Ready);
    let session = std::thread::Builder::new()
        .name("ufvmm-incoming".into())
        .spawn(move || session.run(&rx))
        .map_err(VmError::Thread)?;
    crate::control::signals::unblock_usr1();
    let config = json!({
        "vcpus": hi.vcpus,
        "mem": hi.mem_size,
        "incoming": local.to_string(),
        "uffd": true,
        "hugepages": huge,
        "tsc_khz": vm.tsc_khz,
    });
    let code = vm::finish(
        &vm,
        &p.rx,
        vm::Outputs {
            report: opts.report.as_deref(),
            api_sock: opts.api_sock.as_deref(),
            dump_memory: None,
            config,
            // Before the vCPUs are told to stop: a start not decided by then never
            // happens, and the source hears that the guest never started here.
            before_shutdown: Some(&|| verdicts.stop()),
        },
    );
    // Give the session its turn to tell the source that the VM has ended, or (before
    // the start) that the guest never started here.
    let deadline = Instant::now()
        + FAILED_EXIT_GRACE
        + (EXIT_GRACE_MAX - EXIT_GRACE)
        + Duration::from_millis(500);
    while !session.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(code)
}

/// The destination's migration state; one thread owns it.
struct Session {
    vm: Arc<VmShared>,
    progress: Arc<Progress>,
    arrivals: ArrivalSender,
    tx: Sender<Ev>,
    hi: Hi,
    limits: Limits,
    /// Attempt counter: every connection gets the next number.
    gen: u64,
    main: Option<(u64, FrameWriter)>,
    urgent: Option<(u64, FrameWriter)>,
    /// Main and urgent connections attached since the last break.
    fresh: (bool, bool),
    /// An urgent connection was ever attached (the first may come after the start).
    urgent_ever: bool,
    fds: Vec<Option<VcpuFd>>,
    /// Which vCPUs have their state.
    restored: Vec<bool>,
    started: bool,
    completed: bool,
    /// The source has been told every page is here.
    done_told: bool,
    /// When the source said it had sent everything.
    source_done: Option<Instant>,
    /// The migration failed before the guest started (when, and why).
    failed: Option<(Instant, String)>,
    /// This destination's word to every session.
    verdicts: Arc<Verdicts>,
    /// Connections saying hello.
    busy: Arc<AtomicUsize>,
}

impl Session {
    /// vCPUs waiting for a page now.
    fn stalled(&self) -> usize {
        self.vm
            .vcpus
            .iter()
            .filter(|v| v.stall.gpa().is_some())
            .count()
    }

    fn run(mut self, rx: &Receiver<Ev>) {
        let mut ticker = Ticker::new();
        loop {
            if self.vm.is_shutting_down() {
                if !self.started {
                    // Only this thread starts the guest, and it has decided not to.
                    return self.end_before_start(rx);
                }
                if !self.done_told {
                    self.last_word();
                }
                self.close();
                return;
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ev::Conn(hi, s, peer)) => self.on_conn(hi, s, &peer),
                Ok(Ev::Msg(gen, m)) => {
                    if let Err(e) = self.on_msg(gen, m) {
                        self.lost(gen, e, true);
                    }
                }
                Ok(Ev::Lost(gen, e, bad)) => self.lost(gen, e, bad),
                Ok(Ev::Ask(pages)) => self.ask(&pages),
                Ok(Ev::AllHere) => {} // check_done, below, ends it.
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if let Some((at, why)) = &self.failed {
                if at.elapsed() >= FAIL_GRACE {
                    self.vm.send(VmEvent::MigrationFailed(format!(
                        "before the guest started here: {why}"
                    )));
                    return;
                }
                continue;
            }
            self.check_done();
            // Every turn (at least every 100 ms): a sample when one is due.
            if self.progress.sample_due() {
                self.progress.sample(Some(self.stalled() as u64));
            }
            if !self.completed && ticker.due() {
                let stalled = self.stalled();
                eprintln!(
                    "{}",
                    self.progress
                        .line(&format!(", {stalled} vcpus waiting for pages"))
                );
            }
        }
    }
}
