//! The source side: `run --migrate-to` (or the `migrate` command) moves the running
//! guest to a destination.
//!
//! Two connections per attempt: the main one carries precopy rounds, the switch-over
//! (discards, vCPU states, device state) and the background stream; the urgent one
//! carries the destination's page requests and their answers, so an asked-for page
//! never waits behind the background stream on this side. No page goes twice: one the
//! stream has taken already answers a request for it (`pages::ToSend`), and the
//! stream's queues are kept short so that this wait is short too. A break after switch-over pauses the
//! migration: the source keeps the guest's memory and reconnects with backoff (or at
//! once on `migrate-recover`), and the destination says which pages it still lacks.
//!
//! This file holds the plan, the precopy rounds and the order of it all; `link` holds an
//! attempt's connections and their threads, `switchover` stopping the guest here and
//! starting it there, and `postcopy` the background stream and reconnection.

mod link;
mod postcopy;
mod switchover;

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::conn;
use super::pages::{prefetch, send_page, Again, ToSend};
use super::progress::{Phase, Progress, Role, Ticker};
use super::wire::{Limits, Message};
use crate::vcpu::{Holder, Request};
use crate::vm::shared::{VmEvent, VmShared};
use link::{refusal_or, Ev, Link};
use postcopy::postcopy;
use switchover::{await_start, begin_switchover, send_guest};

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
    // Under the migration lock, which the gdb stub takes to let a gdb in: a guest that
    // moves away must not leave a debugger holding (and writing) the copy it left.
    if vm.debugger.attached() {
        return Err("a debugger is attached: detach it before migrating".into());
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
            page_size: vm.fault.ram.page_size(),
        },
    };
    let (tx, rx) = channel();
    let mut link = Link::open(&tx, &ctx, 1, false)?;
    let mut printer = Ticker::new();
    let mut ready = false;
    if plan.precopy_rounds > 0 {
        let r = precopy(
            &ctx,
            &mut link,
            &rx,
            plan.precopy_rounds,
            &mut printer,
            &mut ready,
        );
        if let Err(e) = r {
            link.close();
            return Err(e);
        }
    }
    if !ready {
        if let Err(e) = await_ready(&ctx, &link, &rx) {
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

/// Longest wait for the destination's `Ready` before the switch-over (a destination
/// builds its VM in about 10 ms here); past it the switch-over goes ahead, as on a link
/// that holds the answer back, and the destination reads the states once it can.
const READY_BOUND: Duration = Duration::from_millis(500);

/// Waits until the destination says its VM is built, so that the vCPUs stop here only
/// once the destination can take their states at once.
fn await_ready(ctx: &Ctx, link: &Link, rx: &Receiver<Ev>) -> Result<(), String> {
    let deadline = Instant::now() + READY_BOUND;
    loop {
        if ctx.vm.is_shutting_down() {
            return Err("the VM is stopping".into());
        }
        ctx.progress.sample(None);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        match rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(Ev::Msg(_, Message::Ready)) => return Ok(()),
            Ok(Ev::Msg(_, m)) => return Err(format!("unexpected {} before switch-over", m.name())),
            Ok(Ev::Refused(_, r)) => return Err(format!("the destination refused: {r}")),
            Ok(Ev::Lost(_, e)) => {
                let e = format!("connection lost before switch-over: {e}");
                return Err(refusal_or(rx, link, 1, e));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Err("internal channel closed".into()),
        }
    }
}

/// Sends `idxs` on the main connection.
fn send_pages(ctx: &Ctx, link: &mut Link, idxs: &[usize], precopy: bool) -> Result<(), String> {
    prefetch(&ctx.vm, idxs);
    for &idx in idxs {
        let (bytes, zero) =
            send_page(&ctx.vm, &mut link.main, idx, 0).map_err(|e| format!("sending: {e}"))?;
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
    ready: &mut bool,
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
            ctx.to_send.replace(&log()?, Again::Dirtied);
        }
        loop {
            if let Ok(ev) = rx.try_recv() {
                match ev {
                    Ev::Lost(_, e) => {
                        let e = format!("connection lost in precopy: {e}");
                        return Err(refusal_or(rx, link, 1, e));
                    }
                    Ev::Refused(_, r) => return Err(format!("the destination refused: {r}")),
                    Ev::Msg(_, Message::Ready) => *ready = true,
                    Ev::Msg(_, m) => return Err(format!("unexpected {} in precopy", m.name())),
                }
            }
            if vm.is_shutting_down() {
                return Err("the VM is stopping".into());
            }
            let batch = ctx.to_send.next_batch(BATCH, &ctx.progress.resends);
            if batch.is_empty() {
                break;
            }
            send_pages(ctx, link, &batch, true).map_err(|e| refusal_or(rx, link, 0, e))?;
            ctx.progress.sample(None);
            if printer.due() {
                eprintln!("{}", ctx.progress.line(""));
            }
        }
        ctx.progress.precopy_rounds.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}
