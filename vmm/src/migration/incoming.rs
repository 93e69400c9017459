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

use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kvm_ioctls::VcpuFd;
use serde_json::json;

use super::conn::{self, FrameWriter};
use super::listener::{refuse, spawn_acceptor};
use super::progress::{Phase, Progress, Role, Ticker};
use super::verdicts::{Start, Verdicts};
use super::waiting::{Waited, Waiting};
use super::wire::{
    self, ErrorCode, Limits, Message, WireError, CHANNEL_MAIN, MAX_REQUEST, PAGE_URGENT, PAGE_ZERO,
};
use crate::abi::PAGE_SIZE;
use crate::config::ConfigError;
use crate::fault::handler::Supply;
use crate::memory::PageState;
use crate::source::remote::{Arrival, ArrivalSender, Remote};
use crate::vcpu::state::VcpuState;
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
        crate::config::check_output_dirs(&[
            ("--report", &self.report),
            ("--api-sock", &self.api_sock),
        ])
    }
}

/// How long a destination whose migration failed before the start stays to tell a
/// reconnecting source.
const FAIL_GRACE: Duration = Duration::from_secs(10);
/// How long the fault loop may take to handle what came before the device state.
const BARRIER_BOUND: Duration = Duration::from_secs(30);

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
    eprintln!(
        "ufvmm: incoming: migration from {peer}: {} vcpus, {} MiB",
        hi.vcpus,
        hi.mem_size >> 20
    );
    let progress = Arc::new(Progress::new(
        Role::Destination,
        peer,
        hi.mem_size / PAGE_SIZE,
    ));
    let mut arrivals = None;
    let ask_tx = tx.clone();
    let Built {
        vm,
        fds,
        fault_loop,
    } = vm::build_incoming(
        hi.vcpus as usize,
        hi.mem_size,
        p.tx.clone(),
        p.interrupted.clone(),
        |fault| {
            let ask = Box::new(move |pages| {
                let _ = ask_tx.send(Ev::Ask(pages));
            });
            let (remote, sender) = Remote::new(ask, fault.wake_handle());
            arrivals = Some(sender);
            Supply::Remote(remote)
        },
    )?;
    let Some(arrivals) = arrivals else {
        return Err(VmError::Thread(std::io::Error::other("no remote source")));
    };
    // Until the device state: pages sent while the guest still runs on the source.
    progress.set_phase(Phase::Precopy);
    *vm.migration.lock().unwrap_or_else(|e| e.into_inner()) = Some(progress.clone());
    vm::start_helpers(fault_loop, &vm, None)?;
    target.set_vm(vm.clone());
    let mut session = Session {
        vm: vm.clone(),
        progress,
        arrivals,
        tx,
        hi,
        limits: Limits {
            mem_size: hi.mem_size,
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
    fn run(mut self, rx: &Receiver<Ev>) {
        let mut ticker = Ticker::new();
        loop {
            if self.vm.is_shutting_down() {
                if !self.started {
                    // Only this thread starts the guest, and it has decided not to.
                    return self.end_before_start(rx);
                }
                if !self.done_told {
                    // Tell the source to stop: nobody will ask for pages again.
                    self.send_main(&Message::Error {
                        code: ErrorCode::VmEnded,
                        text: "the destination VM has ended".into(),
                    });
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
            if !self.completed && ticker.due() {
                let stalled = self
                    .vm
                    .vcpus
                    .iter()
                    .filter(|v| v.stall.gpa().is_some())
                    .count();
                eprintln!(
                    "{}",
                    self.progress
                        .line(&format!(", {stalled} vcpus waiting for pages"))
                );
            }
        }
    }

    /// The VM ends before the guest started here: the source, which still has it, is
    /// told so on both channels, and so is any connection that arrives within
    /// [`EXIT_GRACE`], or while one is still saying hello (up to [`EXIT_GRACE_MAX`]): a
    /// source that reconnects to ask.
    fn end_before_start(mut self, rx: &Receiver<Ev>) {
        if self.verdicts.deny(self.hi.session) {
            let m = Message::Error {
                code: ErrorCode::NeverStarted,
                text: format!("{NEVER_STARTED}: the destination has ended"),
            };
            for (_, w) in [&mut self.main, &mut self.urgent].into_iter().flatten() {
                let _ = w.send(&m).and_then(|_| w.flush());
            }
        }
        self.close();
        let now = Instant::now();
        // After a failure the connections are closed already: the source hears the
        // answer only by reconnecting, which its backoff may put off for 2 s.
        let len = if self.failed.is_some() {
            FAILED_EXIT_GRACE
        } else {
            EXIT_GRACE
        };
        // A hello still being read when that time is up gets the same extra time as
        // without a failure.
        let (grace, most) = (now + len, now + len + (EXIT_GRACE_MAX - EXIT_GRACE));
        loop {
            // A handshake hands its connection over before it counts as done: look at
            // the count first, then answer everything already handed over.
            let idle = self.busy.load(Ordering::Acquire) == 0;
            let now = Instant::now();
            let last = now >= most || (now >= grace && idle);
            loop {
                match rx.try_recv() {
                    Ok(Ev::Conn(hi, s, peer)) => {
                        refuse_never_started(&self.verdicts, &hi, &s, &peer, "")
                    }
                    Ok(_) => {}
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if last {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A new connection: must belong to this migration. A resuming one while this side
    /// still thinks the old connections live means the source saw a break first.
    fn on_conn(&mut self, hi: Hi, s: TcpStream, peer: &str) {
        let ours = hi.session == self.hi.session
            && hi.mem_size == self.hi.mem_size
            && hi.vcpus == self.hi.vcpus;
        if !ours {
            return refuse(
                &s,
                peer,
                ErrorCode::OtherMigration,
                "not the migration in progress here",
            );
        }
        if self.failed.is_some() {
            // Failed before the start: whatever this connection is, the guest never
            // starts here now.
            return refuse_never_started(&self.verdicts, &hi, &s, peer, "");
        }
        if hi.resume {
            if !self.started {
                // The source lost the link in switch-over and asks. Never start now: drop
                // the old connections first, so a device state still on its way there
                // cannot start the guest after the source has taken it back.
                self.lost_before_start("the source reconnected before the start".into());
                return refuse_never_started(&self.verdicts, &hi, &s, peer, "");
            }
            if self.fresh == (true, true) {
                // A whole pair is still attached: the source saw a break we did not.
                self.break_link("the source reconnected".into());
            }
        } else if hi.channel == CHANNEL_MAIN || self.urgent_ever {
            return refuse(
                &s,
                peer,
                ErrorCode::ChannelOpen,
                "this channel is already open",
            );
        }
        self.attach(hi, s);
    }

    /// Takes connection `s` as the channel its hello names, with a reader thread.
    fn attach(&mut self, hi: Hi, s: TcpStream) {
        self.gen += 1;
        let gen = self.gen;
        let w = match FrameWriter::new(&s) {
            Ok(w) => w,
            Err(e) => return eprintln!("ufvmm: incoming: socket: {e}"),
        };
        let precopy = hi.channel == CHANNEL_MAIN && !hi.resume;
        let (limits, arrivals, progress, tx) = (
            self.limits,
            self.arrivals.clone(),
            self.progress.clone(),
            self.tx.clone(),
        );
        let channel = hi.channel;
        let spawned = std::thread::Builder::new()
            .name("ufvmm-mig-read".into())
            .spawn(move || read_conn(s, gen, channel, precopy, limits, &arrivals, &progress, &tx));
        if let Err(e) = spawned {
            return eprintln!("ufvmm: incoming: cannot start a thread: {e}");
        }
        let slot = if hi.channel == CHANNEL_MAIN {
            self.fresh.0 = true;
            &mut self.main
        } else {
            self.fresh.1 = true;
            self.urgent_ever = true;
            &mut self.urgent
        };
        if let Some((_, old)) = slot.replace((gen, w)) {
            old.close();
        }
        self.progress.set_links(
            [&self.main, &self.urgent]
                .into_iter()
                .flatten()
                .filter_map(|(_, w)| w.stream().try_clone().ok())
                .collect(),
        );
        if hi.resume && self.fresh == (true, true) {
            self.resume();
        } else if !hi.resume && hi.channel != CHANNEL_MAIN && self.started {
            // The first urgent connection came after the start: requests made before
            // it had nowhere to go.
            let requested = self.requested_pages();
            self.ask(&requested);
        }
    }

    /// One bit per page not yet here.
    fn missing_bits(&self) -> Vec<u64> {
        let pages = &self.vm.fault.ram.pages;
        let mut bits = vec![0u64; wire::bitmap_words(self.hi.mem_size)];
        for i in (0..pages.len()).filter(|&i| pages.get(i) != PageState::Present) {
            bits[i / 64] |= 1 << (i % 64);
        }
        bits
    }

    /// Pages asked for and not yet here.
    fn requested_pages(&self) -> Vec<usize> {
        let pages = &self.vm.fault.ram.pages;
        (0..pages.len())
            .filter(|&i| pages.get(i) == PageState::Requested)
            .collect()
    }

    /// Both channels are back: say what is missing, and ask again for what was in
    /// flight.
    fn resume(&mut self) {
        let bits = self.missing_bits();
        let requested = self.requested_pages();
        let missing: u32 = bits.iter().map(|w| w.count_ones()).sum();
        self.progress.recoveries.fetch_add(1, Ordering::Relaxed);
        if !self.completed {
            self.progress.set_phase(Phase::Postcopy);
        }
        eprintln!(
            "ufvmm: incoming: migration resumed: {missing} pages missing, asking again for {} in \
             flight",
            requested.len()
        );
        self.send_main(&Message::Missing { bits });
        self.done_told = false;
        self.ask(&requested);
    }

    fn send_main(&mut self, m: &Message) {
        let Some((gen, w)) = self.main.as_mut() else {
            return;
        };
        let gen = *gen;
        if let Err(e) = w.send(m).and_then(|_| w.flush()) {
            self.lost(gen, e.to_string(), false);
        }
    }

    fn on_msg(&mut self, gen: u64, m: Message) -> Result<(), String> {
        if self.main.as_ref().is_none_or(|(g, _)| *g != gen) {
            return Ok(()); // From a connection already replaced.
        }
        match m {
            Message::VcpuState { id, data } => {
                let fd = self
                    .fds
                    .get(id as usize)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| format!("state for vcpu {id}, which is not waiting for one"))?;
                if self.restored[id as usize] {
                    return Err(format!("a second state for vcpu {id}"));
                }
                let st = VcpuState::from_bytes(&data).map_err(|e| format!("vcpu {id}: {e}"))?;
                st.restore(fd).map_err(|e| format!("vcpu {id}: {e}"))?;
                self.restored[id as usize] = true;
                Ok(())
            }
            Message::DeviceState { data } => self.start(&data),
            Message::PagesDone { .. } => {
                self.source_done = Some(Instant::now());
                Ok(())
            }
            Message::Error { code, text } => {
                Err(format!("the source says ({}): {text}", code.name()))
            }
            other => Err(format!("unexpected {other:?}").chars().take(80).collect()),
        }
    }

    /// The device state ends the switch-over: start the guest here.
    fn start(&mut self, data: &[u8]) -> Result<(), String> {
        let states = self.restored.iter().filter(|&&r| r).count();
        if self.started || states != self.fds.len() {
            return Err(format!(
                "device state after {states} of {} vcpu states",
                self.fds.len()
            ));
        }
        let dev: serde_json::Value =
            serde_json::from_slice(data).map_err(|e| format!("device state: {e}"))?;
        if let Some(n) = dev.get("critical_pages").and_then(|v| v.as_u64()) {
            self.progress.critical.store(n, Ordering::Relaxed);
        }
        if let Some(us) = dev.get("source_stop_unix_us").and_then(|v| v.as_u64()) {
            self.progress
                .set_source_stop(SystemTime::UNIX_EPOCH + Duration::from_micros(us));
        }
        // Discards and precopy pages sent before must be in place first. A quit meanwhile
        // ends the wait: the loop's top then tells the source the guest never started.
        let (btx, brx) = sync_channel(1);
        if !self.arrivals.send(Arrival::Barrier(btx)) {
            return Err("the fault loop did not take the precopy pages".into());
        }
        let bound = Instant::now() + BARRIER_BOUND;
        loop {
            match brx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => break,
                Err(_) if self.vm.is_shutting_down() => return Ok(()),
                Err(RecvTimeoutError::Timeout) if Instant::now() < bound => {}
                Err(_) => return Err("the fault loop did not take the precopy pages".into()),
            }
        }
        match self.verdicts.start(self.hi.session) {
            Start::Go => {}
            // The VM is ending (its shutdown follows the stop at once): the loop's top
            // says so to the source on both connections, which stay open for that.
            Start::Stopping => return Ok(()),
            // Never after saying it would not (the paths that say so close the main
            // connection first, so this is a last guard).
            Start::Denied => {
                return Err("this migration was told its guest never started here".into())
            }
        }
        self.progress.set_phase(Phase::Switchover);
        let fds: Vec<VcpuFd> = self.fds.iter_mut().filter_map(Option::take).collect();
        // Started from the first thread on: should a later one fail to spawn, the VM
        // ends here, but it never claims the guest did not start.
        self.started = true;
        if let Err(e) = vm::spawn_vcpus(&self.vm, fds) {
            self.vm
                .send(VmEvent::MigrationFailed(format!("starting the vcpus: {e}")));
            return Ok(());
        }
        self.progress.set_phase(Phase::Postcopy);
        // The source may forget the guest only once it hears this.
        self.send_main(&Message::Started);
        eprintln!(
            "ufvmm: incoming: guest started here; pages follow on demand and in the background"
        );
        Ok(())
    }

    /// Connection `gen` ended.
    fn lost(&mut self, gen: u64, why: String, bad: bool) {
        let current = self.main.as_ref().is_some_and(|(g, _)| *g == gen)
            || self.urgent.as_ref().is_some_and(|(g, _)| *g == gen);
        if !current {
            return;
        }
        self.close();
        if self.completed {
            return; // The source hangs up once it hears every page is here.
        }
        if bad {
            self.progress.bad_frames.fetch_add(1, Ordering::Relaxed);
        }
        self.progress.note_error(&why);
        if !self.started {
            self.lost_before_start(why);
            return;
        }
        self.break_link(why);
    }

    /// The migration failed before the guest started here.
    fn lost_before_start(&mut self, why: String) {
        // The guest never starts here now. The source, unsure whether it did, will
        // reconnect and ask: stay a while to tell it so (then it runs the guest on).
        self.close();
        self.progress.set_phase(Phase::Failed);
        eprintln!(
            "ufvmm: incoming: migration failed before the guest started here: {why}; \
             telling a reconnecting source for {} s",
            FAIL_GRACE.as_secs()
        );
        self.failed = Some((Instant::now(), why));
    }

    /// The connections are gone: postcopy pauses until the source is back.
    fn break_link(&mut self, why: String) {
        self.close();
        if self.completed {
            return;
        }
        self.progress.breaks.fetch_add(1, Ordering::Relaxed);
        self.progress.set_phase(Phase::PostcopyPaused);
        eprintln!(
            "ufvmm: incoming: postcopy-paused: {why}; vcpus that touch missing pages wait; \
             waiting for the source to reconnect"
        );
    }

    fn close(&mut self) {
        for (_, w) in [self.main.take(), self.urgent.take()].into_iter().flatten() {
            w.close();
        }
        self.fresh = (false, false);
    }

    /// Sends page requests on the urgent channel (dropped while paused: a resume asks
    /// again for every page still requested).
    fn ask(&mut self, pages: &[usize]) {
        if pages.is_empty() {
            return;
        }
        self.progress
            .requested
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        if self.progress.phase() != Phase::Postcopy {
            return;
        }
        let Some((gen, w)) = self.urgent.as_mut() else {
            return;
        };
        let gen = *gen;
        let mut r = Ok(());
        for chunk in pages.chunks(MAX_REQUEST) {
            let gpas = chunk.iter().map(|&i| i as u64 * PAGE_SIZE).collect();
            r = w.send(&Message::PageRequest { gpas }).map(|_| ());
            if r.is_err() {
                break;
            }
        }
        if let Err(e) = r.and_then(|()| w.flush()) {
            self.lost(gen, e.to_string(), false);
        }
    }

    /// Every page here: tell the source, which then ends. If the source says it sent
    /// everything but pages are still missing a second later, say which.
    fn check_done(&mut self) {
        if !self.started || self.done_told {
            return;
        }
        let pages = &self.vm.fault.ram.pages;
        let present = pages.count(PageState::Present);
        if present == pages.len() {
            if !self.completed {
                self.completed = true;
                self.progress.set_phase(Phase::Completed);
                eprintln!("{}", self.progress.line(""));
                eprintln!("ufvmm: incoming: migration complete: every page is here");
            }
            if self.fresh == (true, true) {
                let n = pages.len() as u64;
                self.send_main(&Message::PagesDone { pages: n });
                self.done_told = true;
            }
        } else if self
            .source_done
            .is_some_and(|t| t.elapsed() > Duration::from_secs(1))
        {
            self.source_done = None;
            let bits = self.missing_bits();
            self.send_main(&Message::Missing { bits });
        }
    }
}

/// Reads one connection: pages and discards go straight to the fault loop (in stream
/// order), everything else to the session. `precopy` holds until the device state.
#[allow(clippy::too_many_arguments)]
fn read_conn(
    s: TcpStream,
    gen: u64,
    channel: u16,
    mut precopy: bool,
    limits: Limits,
    arrivals: &ArrivalSender,
    progress: &Progress,
    tx: &Sender<Ev>,
) {
    let mut r = BufReader::with_capacity(256 * 1024, s);
    loop {
        let m = match wire::read_message(&mut r, &limits) {
            Ok(m) => m,
            Err(e) => {
                let bad = !matches!(
                    e,
                    WireError::Io(_) | WireError::Closed | WireError::Truncated { .. }
                );
                let _ = tx.send(Ev::Lost(gen, e.to_string(), bad));
                return;
            }
        };
        match m {
            Message::Page { gpa, flags, data } => {
                let zero = flags & PAGE_ZERO != 0;
                let urgent = flags & PAGE_URGENT != 0;
                let bytes = (wire::HEADER + 12 + data.len()) as u64;
                progress.count_page(precopy, urgent, zero, bytes);
                let a = Arrival::Page {
                    idx: (gpa / PAGE_SIZE) as usize,
                    data: (!zero).then_some(data),
                    precopy,
                    urgent,
                };
                if !arrivals.send(a) {
                    return;
                }
            }
            Message::Discard { bits } if channel == CHANNEL_MAIN && precopy => {
                let n: u32 = bits.iter().map(|w| w.count_ones()).sum();
                progress.discarded.store(u64::from(n), Ordering::Relaxed);
                if !arrivals.send(Arrival::Discard(bits)) {
                    return;
                }
            }
            m if channel == CHANNEL_MAIN => {
                if matches!(m, Message::DeviceState { .. }) {
                    precopy = false;
                }
                if tx.send(Ev::Msg(gen, m)).is_err() {
                    return;
                }
            }
            _ => {
                let _ = tx.send(Ev::Lost(
                    gen,
                    "unexpected message on the urgent channel".into(),
                    true,
                ));
                return;
            }
        }
    }
}
