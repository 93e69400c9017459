//! After the switch-over: the background stream of the pages the destination still
//! lacks, and reconnecting after a break.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::link::{ended_there, finished_there, Ev, Link};
use super::{send_pages, Ctx, BATCH};
use crate::migration::pages::{prefetch, Again};
use crate::migration::progress::{Phase, Ticker};
use crate::migration::wire::Message;

/// Reconnection backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a reconnected destination may take to say what it lacks.
const RESUME_BOUND: Duration = Duration::from_secs(10);

/// After switch-over: stream the remaining pages, survive breaks, until the
/// destination has every page.
pub(super) fn postcopy(
    ctx: &Ctx,
    mut link: Link,
    tx: &Sender<Ev>,
    rx: &Receiver<Ev>,
    printer: &mut Ticker,
) -> Result<(), String> {
    let mut done_sent = false;
    let mut pending: Option<Ev> = None;
    // The batch after this one, asked of the fault layer here already: pages this side
    // never had come from its own page source while this batch goes out.
    let mut ahead: Vec<usize> = Vec::new();
    loop {
        if ctx.vm.is_shutting_down() {
            link.close();
            return Err("the VM is stopping".into());
        }
        let mut broken = None;
        // Readers of the attempt that have reported its end; `None`: the break is ours
        // (a message out of place), nobody to wait for.
        let mut ended = Some(0);
        let mut idle = false;
        let ev = pending.take().or_else(|| rx.try_recv().ok());
        let batch = if ev.is_none() {
            let b = match std::mem::take(&mut ahead) {
                b if b.is_empty() => ctx.to_send.next_batch(BATCH, &ctx.progress.resends),
                b => b,
            };
            ahead = ctx.to_send.next_batch(BATCH, &ctx.progress.resends);
            prefetch(&ctx.vm, &ahead);
            b
        } else {
            Vec::new()
        };
        match ev {
            Some(Ev::Lost(g, e)) if g == link.gen => {
                ended = Some(1);
                broken = Some(e);
            }
            Some(Ev::Msg(g, m)) if g == link.gen => match m {
                Message::PagesDone { .. } => {
                    link.close();
                    ctx.progress.set_phase(Phase::Completed);
                    return Ok(());
                }
                Message::Missing { bits } => {
                    ahead.clear();
                    ctx.to_send.replace(&bits, Again::Lost);
                    done_sent = false;
                }
                // Late (past the wait for it before the switch-over): nothing to do.
                Message::Ready => {}
                other => {
                    ended = None;
                    broken = Some(format!("unexpected {} from the destination", other.name()));
                }
            },
            Some(Ev::Refused(g, r)) if g == link.gen => {
                if r.vm_ended() {
                    ended_there(ctx, &link, &r);
                    return Ok(());
                }
                ended = Some(1);
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
            if ended.is_some_and(|n| finished_there(ctx, rx, &link, n)) {
                return Ok(());
            }
            link.close();
            ctx.progress.note_error(&why);
            ctx.progress.broke();
            eprintln!(
                "ufvmm: migration postcopy-paused: {why}; the guest's memory stays here until the \
                 destination is back"
            );
            // What the destination lacks replaces the list, the batch ahead with it.
            ahead.clear();
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
        ctx.progress.sample(None);
        if printer.due() {
            eprintln!("{}", ctx.progress.line(""));
        }
    }
}

/// How a reconnection ended.
pub(super) enum Recovered {
    /// The destination is back and said what it lacks.
    Link(Link),
    /// It has every page already.
    Done,
}

/// Reconnects with backoff (or at once on `migrate-recover`) until the destination
/// answers with the pages it lacks. In switch-over (not knowing whether the destination
/// started the guest) a destination that says it never did, or `migrate-cancel`, ends
/// this with an error: the guest then goes on here.
pub(super) fn recover(
    ctx: &Ctx,
    tx: &Sender<Ev>,
    rx: &Receiver<Ev>,
    mut gen: u64,
) -> Result<Recovered, String> {
    let mut backoff = BACKOFF_MIN;
    let unsure = || ctx.progress.phase() == Phase::Switchover;
    loop {
        // Not every 100 ms here: the backoff and the wait for an answer are longer.
        ctx.progress.sample(None);
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
                    ctx.to_send.replace(&bits, Again::Lost);
                    link.listed();
                    ctx.progress.recovered();
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
                    // Sent only once the destination committed to the start: the guest is
                    // its, and over.
                    if r.vm_ended() {
                        ended_there(ctx, &link, &r);
                        return Ok(Recovered::Done);
                    }
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
                    if finished_there(ctx, rx, &link, 1) {
                        return Ok(Recovered::Done);
                    }
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
