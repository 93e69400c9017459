//! The switch-over: the vCPUs stop here, their state and the device state go to the
//! destination, and the source waits for it to say it started the guest.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime};

use super::link::{ended_there, finished_there, Ev, Link};
use super::postcopy::{recover, Recovered};
use super::{send_pages, Ctx};
use crate::migration::pages;
use crate::migration::progress::Phase;
use crate::migration::wire::Message;
use crate::vcpu::{Holder, Request};
use crate::vm::shared::VmShared;

/// Longest wait for the vCPUs to stop and save their state.
const STOP_BOUND: Duration = Duration::from_secs(10);

/// Stops every vCPU and collects its saved state.
fn stop_vcpus(vm: &VmShared) -> Result<Vec<Vec<u8>>, String> {
    for v in vm.vcpus.iter() {
        // The migration's own hold (apart from an operator's pause) first: a state
        // saved for this save is then followed by a park under the hold.
        vm.ask(v, Request::Stop(Holder::Migration));
        vm.ask(v, Request::Save);
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
        // Short: every tick here is downtime.
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Enters switch-over (under the lock `resume` takes: from here on it is refused).
pub(super) fn begin_switchover(ctx: &Ctx) {
    let _mig = ctx.vm.migration.lock().unwrap_or_else(|e| e.into_inner());
    ctx.progress.set_phase(Phase::Switchover);
}

/// Stops the guest here and sends everything the destination needs to start it.
pub(super) fn send_guest(ctx: &Ctx, link: &mut Link, precopied: bool) -> Result<(), String> {
    let vm = &ctx.vm;
    ctx.progress.mark("source_stop_asked");
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
        ctx.to_send.replace(&bits, pages::Again::Dirtied);
        let n: u32 = bits.iter().map(|w| w.count_ones()).sum();
        ctx.progress
            .discarded
            .store(u64::from(n), Ordering::Relaxed);
        send(link, &Message::Discard { bits })?;
    } else {
        ctx.to_send.fill();
    }
    // Before the vCPU states: the destination installs them before its vCPUs start.
    let critical = pages::critical_pages(vm, &states, &ctx.to_send, &ctx.progress.resends)?;
    ctx.progress
        .critical
        .store(critical.len() as u64, Ordering::Relaxed);
    send_pages(ctx, link, &critical, true)?;
    ctx.progress.mark("source_critical_sent");
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
    ctx.progress.mark("source_state_sent");
    eprintln!(
        "ufvmm: migration switch-over: vcpus stopped, state sent to {}",
        ctx.to
    );
    Ok(())
}

/// How long the destination may take to say it started the guest.
const START_BOUND: Duration = Duration::from_secs(30);

/// After the device state went out: waits for the destination's `Started`. If the link
/// breaks first, nobody here knows whether the guest runs there, so the source asks by
/// reconnecting: a destination that started answers as to any resume, one that did not
/// says it never started (then the guest goes on here). `None`: already complete.
pub(super) fn await_start(
    ctx: &Ctx,
    link: Link,
    tx: &Sender<Ev>,
    rx: &Receiver<Ev>,
) -> Result<Option<Link>, String> {
    let deadline = Instant::now() + START_BOUND;
    let why = loop {
        ctx.progress.sample(None);
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
                // Said only once the destination committed to the start: the guest is
                // its, and has ended.
                if r.vm_ended() {
                    ended_there(ctx, &link, &r);
                    return Ok(None);
                }
                break format!("the destination refused: {r}");
            }
            // Every page there (its vCPUs may have failed to start): nothing is left here.
            Ok(Ev::Msg(g, Message::PagesDone { .. })) if g == link.gen => {
                link.close();
                ctx.progress.set_phase(Phase::Completed);
                return Ok(None);
            }
            Ok(Ev::Lost(g, e)) if g == link.gen => {
                if finished_there(ctx, rx, &link, 1) {
                    return Ok(None);
                }
                break e;
            }
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
