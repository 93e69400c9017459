//! The source side: `run --migrate-to` (or the `migrate` command) moves the running
//! guest to a destination.
//!
//! Two connections per attempt: the main one carries precopy rounds, the switch-over
//! (discards, vCPU states, device state) and the background stream; the urgent one
//! carries the destination's page requests and their answers, so an asked-for page
//! never waits behind the background stream. A break after switch-over pauses the
//! migration: the source keeps the guest's memory and reconnects with backoff (or at
//! once on `migrate-recover`), and the destination says which pages it still lacks.

use std::io::BufReader;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::conn::{self, FrameWriter};
use super::pages::{prefetch, read_page, send_page, ToSend};
use super::progress::{Phase, Progress, Role, Ticker};
use super::wire::{
    self, ErrorCode, Limits, Message, WireError, CHANNEL_MAIN, CHANNEL_URGENT, PAGE_URGENT,
};
use crate::abi::PAGE_SIZE;
use crate::vcpu::{Holder, Request};
use crate::vm::shared::{VmEvent, VmShared};

/// What to do.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Destination address, HOST:PORT.
    pub to: String,
    /// Precopy rounds before switch-over (0 = straight to postcopy).
    pub precopy_rounds: u32,
}

/// Pages sent at once by the background stream.
const BATCH: usize = 64;
/// Longest wait for the vCPUs to stop and save their state.
const STOP_BOUND: Duration = Duration::from_secs(10);
/// Reconnection backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a reconnected destination may take to say what it lacks.
const RESUME_BOUND: Duration = Duration::from_secs(10);

/// Starts migrating `vm` on a thread of its own.
pub fn start(vm: &Arc<VmShared>, plan: Plan) -> Result<Arc<Progress>, String> {
    let mut slot = vm.migration.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = slot.as_ref() {
        if p.phase() != Phase::Failed {
            return Err(format!(
                "a migration to {} is already {}",
                p.peer,
                p.phase().name()
            ));
        }
    }
    if vm.is_shutting_down() {
        return Err("the VM is stopping".into());
    }
    if let Some(v) = vm.vcpus.iter().find(|v| v.control.ended()) {
        return Err(format!("vcpu {} has ended; nothing to migrate", v.id));
    }
    let to = conn::normalize_addr(&plan.to);
    let pages = vm.fault.ram.pages.len() as u64;
    let progress = Arc::new(Progress::new(Role::Source, to.clone(), pages));
    *slot = Some(progress.clone());
    drop(slot);
    let (vm2, p2) = (vm.clone(), progress.clone());
    let plan = Plan { to, ..plan };
    std::thread::Builder::new()
        .name("ufvmm-migrate".into())
        .spawn(move || run(&vm2, &plan, &p2))
        .map_err(|e| format!("cannot start the migration thread: {e}"))?;
    Ok(progress)
}

fn run(vm: &Arc<VmShared>, plan: &Plan, progress: &Arc<Progress>) {
    eprintln!(
        "ufvmm: migrating to {} ({} precopy rounds)",
        plan.to, plan.precopy_rounds
    );
    match migrate(vm, plan, progress) {
        Ok(()) => {
            eprintln!("{}", progress.line(""));
            vm.send(VmEvent::Migrated(plan.to.clone()));
        }
        Err(e) => {
            progress.note_error(&e);
            if progress.guest_moved() {
                // Only a stopping VM ends a migration after switch-over.
                eprintln!("ufvmm: migration to {} ended: {e}", plan.to);
                return;
            }
            progress.set_phase(Phase::Failed);
            let _ = vm.set_dirty_logging(false);
            eprintln!(
                "ufvmm: migration to {} failed: {e}; the guest goes on here",
                plan.to
            );
        }
    }
}

/// What the connection threads tell the migration thread.
enum Ev {
    /// A message (never an error) from the destination on attempt `gen`'s main
    /// connection.
    Msg(u64, Message),
    /// The destination refused attempt `gen` (on either connection).
    Refused(u64, Refusal),
    /// Attempt `gen` broke.
    Lost(u64, String),
}

/// Why the destination refused an attempt: what is acted on is typed, never the text.
#[derive(Debug)]
enum Refusal {
    /// Its error frame: the code to act on, and the text for people.
    Said(ErrorCode, String),
    /// Its first frame was an intact frame of another wire version: it is not a
    /// destination of this version, so it cannot be running this guest (this version's
    /// destination answers in this version).
    Version(WireError),
}

impl Refusal {
    /// True if the refusal shows the destination never started the guest.
    fn guest_not_started(&self) -> bool {
        match self {
            Refusal::Said(code, _) => code.guest_not_started(),
            Refusal::Version(_) => true,
        }
    }

    /// True if the destination's VM has ended (it wants nothing more).
    fn vm_ended(&self) -> bool {
        matches!(self, Refusal::Said(ErrorCode::VmEnded, _))
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Said(code, text) => write!(f, "{text} ({})", code.name()),
            Refusal::Version(e) => write!(f, "{e}"),
        }
    }
}

/// What a connection's reader reports when reading fails: an intact frame of another
/// version first of all is that version's refusal; anything else is a break.
fn read_failed(gen: u64, e: WireError, first: bool) -> Ev {
    match e {
        WireError::BadVersion { .. } if first => Ev::Refused(gen, Refusal::Version(e)),
        e => Ev::Lost(gen, e.to_string()),
    }
}

/// One attempt's connections.
struct Link {
    gen: u64,
    main: FrameWriter,
    streams: Vec<TcpStream>,
}

impl Link {
    /// Opens both connections and starts their threads.
    fn open(s: &Sender<Ev>, ctx: &Ctx, gen: u64, resume: bool) -> Result<Link, String> {
        let hello = |channel| Message::Hello {
            mem_size: ctx.vm.fault.ram.size(),
            vcpus: ctx.vm.vcpus.len() as u32,
            session: ctx.session,
            channel,
            resume,
        };
        let err = |what: &str, e: &dyn std::fmt::Display| format!("{what} {}: {e}", ctx.to);
        let m = conn::connect(&ctx.to).map_err(|e| err("cannot connect to", &e))?;
        let mut main = FrameWriter::new(&m).map_err(|e| err("socket", &e))?;
        main.send(&hello(CHANNEL_MAIN))
            .and_then(|_| main.flush())
            .map_err(|e| err("cannot send to", &e))?;
        let u = conn::connect(&ctx.to).map_err(|e| err("cannot connect to", &e))?;
        let mut uw = FrameWriter::new(&u).map_err(|e| err("socket", &e))?;
        uw.send(&hello(CHANNEL_URGENT))
            .and_then(|_| uw.flush())
            .map_err(|e| err("cannot send to", &e))?;
        ctx.progress
            .set_links([&m, &u].iter().filter_map(|s| s.try_clone().ok()).collect());
        let link = Link {
            gen,
            main,
            streams: vec![
                m.try_clone().map_err(|e| err("socket", &e))?,
                u.try_clone().map_err(|e| err("socket", &e))?,
            ],
        };
        let (tx, limits) = (s.clone(), ctx.limits);
        spawn("ufvmm-mig-read", move || read_main(m, gen, limits, &tx))?;
        let (tx, c) = (s.clone(), ctx.clone());
        spawn("ufvmm-mig-urgent", move || {
            serve_urgent(u, uw, gen, &c, &tx)
        })?;
        Ok(link)
    }

    fn close(&self) {
        for s in &self.streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| format!("cannot start a thread: {e}"))
}

/// What every thread of the migration shares.
#[derive(Clone)]
struct Ctx {
    vm: Arc<VmShared>,
    progress: Arc<Progress>,
    to_send: Arc<ToSend>,
    to: String,
    session: u64,
    limits: Limits,
}

/// Reads the destination's messages on the main connection, until it refuses or the
/// connection ends (then it reports exactly once).
fn read_main(s: TcpStream, gen: u64, limits: Limits, tx: &Sender<Ev>) {
    let mut r = BufReader::new(s);
    let mut first = true;
    loop {
        let ev = match wire::read_message(&mut r, &limits) {
            Ok(Message::Error { code, text }) => Ev::Refused(gen, Refusal::Said(code, text)),
            Ok(m) => Ev::Msg(gen, m),
            Err(e) => read_failed(gen, e, first),
        };
        first = false;
        let last = !matches!(ev, Ev::Msg(..));
        if tx.send(ev).is_err() || last {
            return;
        }
    }
}

/// Answers page requests on the urgent connection.
fn serve_urgent(s: TcpStream, mut w: FrameWriter, gen: u64, ctx: &Ctx, tx: &Sender<Ev>) {
    let peer = s.try_clone().ok();
    let mut r = BufReader::new(s);
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    // Reports how the connection ended (exactly once) and ends it.
    let end = |ev: Ev| {
        let _ = tx.send(ev);
        if let Some(p) = &peer {
            let _ = p.shutdown(std::net::Shutdown::Both);
        }
    };
    let fail = |e: String| end(Ev::Lost(gen, e));
    let mut first = true;
    loop {
        let read = wire::read_message(&mut r, &ctx.limits);
        let gpas = match read {
            Ok(Message::PageRequest { gpas }) => gpas,
            // A refusal: the main connection's reader may not have its copy yet.
            Ok(Message::Error { code, text }) => {
                return end(Ev::Refused(gen, Refusal::Said(code, text)))
            }
            Ok(other) => return fail(format!("unexpected {} on the urgent channel", other.name())),
            Err(e) => return end(read_failed(gen, e, first)),
        };
        first = false;
        ctx.progress
            .requested
            .fetch_add(gpas.len() as u64, Ordering::Relaxed);
        for gpa in gpas {
            let idx = (gpa / PAGE_SIZE) as usize;
            ctx.to_send.claim_urgent(idx);
            let sent = read_page(&ctx.vm, idx, &mut buf).and_then(|()| {
                send_page(&mut w, idx, &buf, PAGE_URGENT).map_err(|e| e.to_string())
            });
            match sent {
                Ok((bytes, zero)) => ctx.progress.count_page(false, true, zero, bytes),
                Err(e) => return fail(e),
            }
        }
        if let Err(e) = w.flush() {
            return fail(e.to_string());
        }
    }
}

/// A random session id.
fn session_id() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ u64::from(std::process::id()) << 32
}

fn migrate(vm: &Arc<VmShared>, plan: &Plan, progress: &Arc<Progress>) -> Result<(), String> {
    let ctx = Ctx {
        vm: vm.clone(),
        progress: progress.clone(),
        to_send: Arc::new(ToSend::new(vm.fault.ram.pages.len())),
        to: plan.to.clone(),
        session: session_id(),
        limits: Limits {
            mem_size: vm.fault.ram.size(),
        },
    };
    let (tx, rx) = channel();
    let mut link = Link::open(&tx, &ctx, 1, false)?;
    let mut printer = Ticker::new();
    if plan.precopy_rounds > 0 {
        let r = precopy(&ctx, &mut link, &rx, plan.precopy_rounds, &mut printer);
        if let Err(e) = r {
            link.close();
            return Err(e);
        }
    }
    begin_switchover(&ctx);
    let sent = send_guest(&ctx, &mut link, plan.precopy_rounds > 0);
    let started = match sent {
        Ok(()) => await_start(&ctx, link, &tx, &rx),
        Err(e) => Err(refusal_or(&rx, &link, 0, e)),
    };
    match started {
        Ok(Some(link)) => postcopy(&ctx, link, &tx, &rx, &mut printer),
        Ok(None) => Ok(()),
        Err(e) => {
            if !progress.guest_moved() {
                // The destination never started the guest: it goes on here. Only the
                // switch-over's hold is lifted: a pause the operator asked for (before
                // or during the switch-over) stays.
                for v in vm.vcpus.iter() {
                    vm.ask(v, Request::CancelSave);
                    vm.ask(v, Request::Release(Holder::Migration));
                }
            }
            Err(e)
        }
    }
}

/// How long a failed attempt's readers may take to say whether the destination refused.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// Closes `link`, whose attempt failed with `e` before the guest moved (`ended` of its
/// readers have reported already); if the destination had refused it (a write error or
/// a reset is often just the echo of a refusal), adds the refusal, which says why.
fn refusal_or(rx: &Receiver<Ev>, link: &Link, mut ended: usize, e: String) -> String {
    link.close();
    let deadline = Instant::now() + REFUSAL_WAIT;
    // Each of the attempt's readers reports once as it ends.
    while ended < link.streams.len() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ev::Refused(g, r)) if g == link.gen => {
                return format!("the destination refused: {r} ({e})")
            }
            Ok(Ev::Lost(g, _)) if g == link.gen => ended += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    e
}

/// How long the destination may take to say it started the guest.
const START_BOUND: Duration = Duration::from_secs(30);

/// After the device state went out: waits for the destination's `Started`. If the link
/// breaks first, nobody here knows whether the guest runs there, so the source asks by
/// reconnecting: a destination that started answers as to any resume, one that did not
/// says it never started (then the guest goes on here). `None`: already complete.
fn await_start(
    ctx: &Ctx,
    link: Link,
    tx: &Sender<Ev>,
    rx: &Receiver<Ev>,
) -> Result<Option<Link>, String> {
    let deadline = Instant::now() + START_BOUND;
    let why = loop {
        // Events first: a `Started` already here wins over a later migrate-cancel.
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ev::Msg(g, Message::Started)) if g == link.gen => {
                ctx.progress.set_phase(Phase::Postcopy);
                eprintln!("ufvmm: migration: the guest runs on {} now", ctx.to);
                return Ok(Some(link));
            }
            Ok(Ev::Refused(g, r)) if g == link.gen => {
                if r.guest_not_started() {
                    link.close();
                    return Err(format!("the destination did not start the guest: {r}"));
                }
                break format!("the destination refused: {r}");
            }
            Ok(Ev::Lost(g, e)) if g == link.gen => break e,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) if ctx.progress.cancel_requested() => {
                link.close();
                return Err("cancelled by migrate-cancel before the destination started".into());
            }
            Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                break format!(
                    "no word from the destination in {} s",
                    START_BOUND.as_secs()
                );
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err("internal channel closed".into()),
        }
    };
    link.close();
    eprintln!(
        "ufvmm: migration: link lost during switch-over ({why}); asking the destination \
         whether it started the guest (migrate-cancel resumes it here instead)"
    );
    ctx.progress.note_error(&why);
    match recover(ctx, tx, rx, link.gen)? {
        Recovered::Link(l) => Ok(Some(l)),
        Recovered::Done => Ok(None),
    }
}

/// Sends `idxs` on the main connection.
fn send_pages(ctx: &Ctx, link: &mut Link, idxs: &[usize], precopy: bool) -> Result<(), String> {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    prefetch(&ctx.vm, idxs);
    for &idx in idxs {
        read_page(&ctx.vm, idx, &mut buf)?;
        let (bytes, zero) =
            send_page(&mut link.main, idx, &buf, 0).map_err(|e| format!("sending: {e}"))?;
        ctx.progress.count_page(precopy, false, zero, bytes);
    }
    link.main.flush().map_err(|e| format!("sending: {e}"))
}

/// Rounds of memory sent while the guest runs: everything, then what was written since.
fn precopy(
    ctx: &Ctx,
    link: &mut Link,
    rx: &Receiver<Ev>,
    rounds: u32,
    printer: &mut Ticker,
) -> Result<(), String> {
    let vm = &ctx.vm;
    vm.set_dirty_logging(true)
        .map_err(|e| format!("cannot turn on dirty logging: {e}"))?;
    let log = || {
        vm.dirty_log()
            .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))
    };
    log()?;
    ctx.progress.set_phase(Phase::Precopy);
    for round in 0..rounds {
        if round == 0 {
            ctx.to_send.fill();
        } else {
            ctx.to_send.replace(&log()?);
        }
        loop {
            if let Ok(ev) = rx.try_recv() {
                match ev {
                    Ev::Lost(_, e) => {
                        let e = format!("connection lost in precopy: {e}");
                        return Err(refusal_or(rx, link, 1, e));
                    }
                    Ev::Refused(_, r) => return Err(format!("the destination refused: {r}")),
                    Ev::Msg(_, m) => return Err(format!("unexpected {} in precopy", m.name())),
                }
            }
            if vm.is_shutting_down() {
                return Err("the VM is stopping".into());
            }
            let batch = ctx.to_send.next_batch(BATCH);
            if batch.is_empty() {
                break;
            }
            send_pages(ctx, link, &batch, true).map_err(|e| refusal_or(rx, link, 0, e))?;
            if printer.due() {
                eprintln!("{}", ctx.progress.line(""));
            }
        }
        ctx.progress.precopy_rounds.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Stops every vCPU and collects its saved state.
fn stop_vcpus(vm: &VmShared) -> Result<Vec<Vec<u8>>, String> {
    for v in vm.vcpus.iter() {
        vm.ask(v, Request::Save);
        // The migration's own hold, apart from an operator's pause.
        vm.ask(v, Request::Stop(Holder::Migration));
    }
    let start = Instant::now();
    let mut states: Vec<Option<Vec<u8>>> = vec![None; vm.vcpus.len()];
    let mut next_kick = start + Duration::from_millis(100);
    loop {
        for (v, slot) in vm.vcpus.iter().zip(states.iter_mut()) {
            if slot.is_none() {
                match v.control.take_saved() {
                    Some(Ok(b)) => *slot = Some(b),
                    Some(Err(e)) => return Err(format!("vcpu {}: cannot save state: {e}", v.id)),
                    None if v.control.ended() => {
                        return Err(format!("vcpu {} ended during switch-over", v.id))
                    }
                    None => {}
                }
            }
        }
        if states.iter().all(Option::is_some) {
            return Ok(states.into_iter().flatten().collect());
        }
        let now = Instant::now();
        if now >= start + STOP_BOUND {
            return Err(format!(
                "the vcpus did not stop within {} s",
                STOP_BOUND.as_secs()
            ));
        }
        if now >= next_kick {
            next_kick = now + Duration::from_millis(100);
            for v in vm.vcpus.iter() {
                vm.kick(v);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Enters switch-over (under the lock `resume` takes: from here on it is refused).
fn begin_switchover(ctx: &Ctx) {
    let _mig = ctx.vm.migration.lock().unwrap_or_else(|e| e.into_inner());
    ctx.progress.set_phase(Phase::Switchover);
}

/// Stops the guest here and sends everything the destination needs to start it.
fn send_guest(ctx: &Ctx, link: &mut Link, precopied: bool) -> Result<(), String> {
    let vm = &ctx.vm;
    let states = stop_vcpus(vm)?;
    let stop = SystemTime::now();
    ctx.progress.set_source_stop(stop);
    let send = |link: &mut Link, m: &Message| -> Result<(), String> {
        let n = link.main.send(m).map_err(|e| format!("switch-over: {e}"))?;
        ctx.progress.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    };
    if precopied {
        let bits = vm
            .dirty_log()
            .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))?;
        let _ = vm.set_dirty_logging(false);
        ctx.to_send.replace(&bits);
        let n: u32 = bits.iter().map(|w| w.count_ones()).sum();
        ctx.progress
            .discarded
            .store(u64::from(n), Ordering::Relaxed);
        send(link, &Message::Discard { bits })?;
    } else {
        ctx.to_send.fill();
    }
    // Before the vCPU states: the destination installs them before its vCPUs start.
    let critical = super::pages::critical_pages(vm, &states, &ctx.to_send)?;
    ctx.progress
        .critical
        .store(critical.len() as u64, Ordering::Relaxed);
    send_pages(ctx, link, &critical, true)?;
    for (id, data) in states.into_iter().enumerate() {
        send(
            link,
            &Message::VcpuState {
                id: id as u32,
                data,
            },
        )?;
    }
    let stop_us = stop
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let n = critical.len();
    let dev = serde_json::json!({ "source_stop_unix_us": stop_us, "tsc_khz": vm.tsc_khz, "critical_pages": n });
    send(
        link,
        &Message::DeviceState {
            data: dev.to_string().into_bytes(),
        },
    )?;
    link.main.flush().map_err(|e| format!("switch-over: {e}"))?;
    eprintln!(
        "ufvmm: migration switch-over: vcpus stopped, state sent to {}",
        ctx.to
    );
    Ok(())
}

/// After switch-over: stream the remaining pages, survive breaks, until the
/// destination has every page.
fn postcopy(
    ctx: &Ctx,
    mut link: Link,
    tx: &Sender<Ev>,
    rx: &Receiver<Ev>,
    printer: &mut Ticker,
) -> Result<(), String> {
    let mut done_sent = false;
    let mut pending: Option<Ev> = None;
    loop {
        if ctx.vm.is_shutting_down() {
            link.close();
            return Err("the VM is stopping".into());
        }
        let mut broken = None;
        let mut idle = false;
        let ev = pending.take().or_else(|| rx.try_recv().ok());
        let batch = if ev.is_none() {
            ctx.to_send.next_batch(BATCH)
        } else {
            Vec::new()
        };
        match ev {
            Some(Ev::Lost(g, e)) if g == link.gen => broken = Some(e),
            Some(Ev::Msg(g, m)) if g == link.gen => match m {
                Message::PagesDone { .. } => {
                    link.close();
                    ctx.progress.set_phase(Phase::Completed);
                    return Ok(());
                }
                Message::Missing { bits } => {
                    ctx.to_send.replace(&bits);
                    done_sent = false;
                }
                other => broken = Some(format!("unexpected {} from the destination", other.name())),
            },
            Some(Ev::Refused(g, r)) if g == link.gen => {
                if r.vm_ended() {
                    // The destination wants nothing more (its VM ended): done here too.
                    link.close();
                    let why = format!("the destination ended the migration: {r}");
                    eprintln!("ufvmm: {why}");
                    ctx.progress.note_error(&why);
                    ctx.progress.set_phase(Phase::Completed);
                    return Ok(());
                }
                broken = Some(format!("the destination refused: {r}"));
            }
            Some(_) => {} // From an attempt already given up.
            None if batch.is_empty() => idle = true,
            None => {
                if let Err(e) = send_pages(ctx, &mut link, &batch, false) {
                    broken = Some(e);
                }
            }
        }
        if idle && !done_sent {
            let pages = ctx.progress.pages_moved();
            match link
                .main
                .send(&Message::PagesDone { pages })
                .and_then(|_| link.main.flush())
            {
                Ok(()) => done_sent = true,
                Err(e) => broken = Some(e.to_string()),
            }
        }
        if let Some(why) = broken {
            link.close();
            ctx.progress.note_error(&why);
            ctx.progress.breaks.fetch_add(1, Ordering::Relaxed);
            ctx.progress.set_phase(Phase::PostcopyPaused);
            eprintln!(
                "ufvmm: migration postcopy-paused: {why}; the guest's memory stays here until the \
                 destination is back"
            );
            match recover(ctx, tx, rx, link.gen)? {
                Recovered::Link(l) => link = l,
                Recovered::Done => return Ok(()),
            }
            done_sent = false;
            continue;
        }
        if idle {
            // Nothing to send: wait for the destination (done, or what it lacks).
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(ev) => pending = Some(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err("internal channel closed".into()),
            }
        }
        if printer.due() {
            eprintln!("{}", ctx.progress.line(""));
        }
    }
}

/// How a reconnection ended.
enum Recovered {
    /// The destination is back and said what it lacks.
    Link(Link),
    /// It has every page already.
    Done,
}

/// Reconnects with backoff (or at once on `migrate-recover`) until the destination
/// answers with the pages it lacks. In switch-over (not knowing whether the destination
/// started the guest) a destination that says it never did, or `migrate-cancel`, ends
/// this with an error: the guest then goes on here.
fn recover(
    ctx: &Ctx,
    tx: &Sender<Ev>,
    rx: &Receiver<Ev>,
    mut gen: u64,
) -> Result<Recovered, String> {
    let mut backoff = BACKOFF_MIN;
    let unsure = || ctx.progress.phase() == Phase::Switchover;
    loop {
        if ctx.progress.wait_recover(backoff) {
            eprintln!("ufvmm: migrate-recover: reconnecting now");
        }
        if ctx.vm.is_shutting_down() {
            return Err("the VM is stopping".into());
        }
        if unsure() && ctx.progress.cancel_requested() {
            return Err("cancelled by migrate-cancel before the destination started".into());
        }
        gen += 1;
        let link = match Link::open(tx, ctx, gen, true) {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "ufvmm: migration reconnect failed: {e}; next try in {} ms",
                    backoff.as_millis()
                );
                ctx.progress.note_error(&e);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let deadline = Instant::now() + RESUME_BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ev::Msg(g, Message::Missing { bits })) if g == gen => {
                    ctx.to_send.replace(&bits);
                    ctx.progress.recoveries.fetch_add(1, Ordering::Relaxed);
                    ctx.progress.set_phase(Phase::Postcopy);
                    let n: u32 = bits.iter().map(|w| w.count_ones()).sum();
                    eprintln!("ufvmm: migration resumed: the destination lacks {n} pages");
                    return Ok(Recovered::Link(link));
                }
                Ok(Ev::Msg(g, Message::PagesDone { .. })) if g == gen => {
                    link.close();
                    ctx.progress.set_phase(Phase::Completed);
                    return Ok(Recovered::Done);
                }
                Ok(Ev::Refused(g, r)) if g == gen => {
                    if unsure() && r.guest_not_started() {
                        link.close();
                        return Err(format!("the destination did not start the guest: {r}"));
                    }
                    eprintln!("ufvmm: migration reconnect refused: {r}");
                    ctx.progress
                        .note_error(&format!("the destination refused: {r}"));
                    break;
                }
                Ok(Ev::Msg(g, Message::Started)) if g == gen => {} // Missing follows.
                Ok(Ev::Msg(g, m)) if g == gen => {
                    eprintln!("ufvmm: migration reconnect: unexpected {} first", m.name());
                    break;
                }
                Ok(Ev::Lost(g, e)) if g == gen => {
                    eprintln!("ufvmm: migration reconnect: {e}");
                    break;
                }
                Ok(_) => {} // An older attempt.
                Err(_) => {
                    eprintln!("ufvmm: migration reconnect: no answer from the destination");
                    break;
                }
            }
        }
        link.close();
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
