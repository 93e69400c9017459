//! What the control commands do: pause, resume, status, stats, wake. The socket
//! ([`super::api`]) and the exit summary both use these.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::memory::PageState;
use crate::vcpu::{Holder, Request, VcpuShared};
use crate::vm::shared::VmShared;

/// How long `pause` waits for answers before it replies anyway.
pub const PAUSE_BOUND: Duration = Duration::from_millis(90);

/// p50/p99/max/count of a microsecond histogram.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"p50": null, "p99": null, "max": null, "count": 0});
    }
    json!({
        "p50": h.value_at_quantile(0.5),
        "p99": h.value_at_quantile(0.99),
        "max": h.max(),
        "count": h.len(),
    })
}

/// At most this many points of a latency CDF in a reply or the report.
pub const CDF_POINTS: usize = 200;

/// A microsecond histogram's percentiles and its CDF: `cdf` is `[{"us", "fraction"}]`,
/// the fraction of samples at or below `us`, in order, ending at 1; thinned evenly to
/// at most [`CDF_POINTS`] points (the last always kept), so a long run stays small.
pub fn distribution(h: &Histogram<u64>) -> Value {
    let mut v = percentiles(h);
    let total = h.len().max(1) as f64;
    let mut seen = 0u64;
    let points: Vec<(u64, f64)> = h
        .iter_recorded()
        .map(|it| {
            seen += it.count_at_value();
            (
                h.highest_equivalent(it.value_iterated_to()),
                seen as f64 / total,
            )
        })
        .collect();
    let step = points.len().div_ceil(CDF_POINTS).max(1);
    let last = points.len().saturating_sub(1);
    v["cdf"] = points
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == step - 1 || *i == last)
        .map(|(_, (us, f))| json!({"us": us, "fraction": (f * 1e6).round() / 1e6}))
        .collect();
    v
}

/// One vCPU as status and pause replies show it. The stall is read once, so its
/// fields and the state agree (a wait can end between two reads).
pub fn vcpu_status(v: &VcpuShared, answered: bool, now: Instant) -> Value {
    let stall = v.stall.current();
    json!({
        "id": v.id,
        "state": v.run_state_with(stall.as_ref()).name(),
        "stalled_gpa": stall.map(|s| format!("{:#x}", s.gpa)),
        "stalled_ms": stall.map(|s| now.saturating_duration_since(s.since).as_millis() as u64),
        "wait": stall.map(|s| s.wait_name()),
        "device_wait": stall.map(|s| s.in_vmm),
        "answered": answered,
    })
}

/// `pause`: asks every vCPU to stop (for the operator, [`Holder::Operator`]) and waits
/// up to [`PAUSE_BOUND`] for answers; a vCPU that has not answered by then shows
/// `answered: false` and parks when it gets to it.
pub fn pause(vm: &VmShared) -> Value {
    let start = Instant::now();
    let deadline = start + PAUSE_BOUND;
    let seqs: Vec<Option<u64>> = vm
        .vcpus
        .iter()
        .map(|v| vm.ask(v, Request::Stop(Holder::Operator)))
        .collect();
    let mut all = true;
    let mut last = start;
    let answered: Vec<bool> = vm
        .vcpus
        .iter()
        .zip(&seqs)
        .map(|(v, seq)| {
            // No kick without a thread: one that ended is stopped for good; one not
            // started yet has not answered (it parks before its first KVM_RUN).
            let ok = match seq {
                // Answered, and parked: a vCPU finishing work a save waits for answers
                // first and parks right after (see `vcpu::control`).
                Some(s) => v.control.kick.wait_answered(*s, deadline) && parked_by(v, deadline),
                None => v.control.started(),
            };
            if ok {
                last = last.max(Instant::now());
            }
            all &= ok;
            ok
        })
        .collect();
    let now = Instant::now();
    let latency = if all { last - start } else { now - start };
    let latency_us = latency.as_micros() as u64;
    if all {
        if let Ok(mut h) = vm.pause_latency_us.lock() {
            let _ = h.record(latency_us.max(1));
        }
    }
    let vcpus: Vec<Value> = vm
        .vcpus
        .iter()
        .zip(answered)
        .map(|(v, a)| vcpu_status(v, a, now))
        .collect();
    json!({"ok": true, "latency_us": latency_us, "vcpus": vcpus})
}

/// `resume`: lifts the pause (refused on a source whose guest has moved away).
pub fn resume(vm: &VmShared) -> Value {
    // Under the migration lock, which the switch-over takes to begin: a resume either
    // happens before the vCPUs are stopped for it, or is refused.
    let mig = vm.migration.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = mig.as_ref().filter(|p| p.vcpus_held()) {
        return json!({"ok": false, "error": format!("the guest is moving to {}; it cannot run here again", p.peer)});
    }
    for v in vm.vcpus.iter() {
        vm.ask(v, Request::Release(Holder::Operator));
    }
    drop(mig);
    json!({"ok": true})
}

/// Waits until `v` shows parked (or has ended), or `deadline` passes; true if it did.
fn parked_by(v: &VcpuShared, deadline: Instant) -> bool {
    loop {
        if v.control.parked() || v.control.ended() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// For `status`: no kick waits for an answer, and there is a thread to answer one (a
/// vCPU whose thread has not started answers nothing yet).
fn answers_kicks(v: &VcpuShared) -> bool {
    v.control.started() && v.control.kick.answered()
}

/// `status`: each vCPU's state, without disturbing any.
pub fn status(vm: &VmShared) -> Value {
    let now = Instant::now();
    let vcpus: Vec<Value> = vm
        .vcpus
        .iter()
        .map(|v| vcpu_status(v, answers_kicks(v), now))
        .collect();
    json!({
        "ok": true,
        "uptime_ms": vm.started.elapsed().as_millis() as u64,
        "vcpus": vcpus,
        "debugger": {
            "attached": vm.debugger.attached(),
            "stopped": vm.debugger.stopped(),
            "last_stop_us": vm.debugger.last_stop_us(),
        },
        "migration": migration(vm),
    })
}

/// The migration's figures (null without one): progress, and on the destination the
/// downtime (source stop to first guest instruction here), each vCPU's blocktime,
/// fault latency in power-of-two buckets and pages never received.
pub fn migration(vm: &VmShared) -> Value {
    let Some(p) = vm.migration() else {
        return Value::Null;
    };
    let dest = p.role == crate::migration::progress::Role::Destination;
    let first = vm
        .vcpus
        .iter()
        .filter_map(|v| v.first_entry.get().copied())
        .min();
    let downtime = match (p.source_stop(), first) {
        (Some(stop), Some(first)) if dest => Some(crate::migration::progress::wall_ms(stop, first)),
        _ => None,
    };
    if dest && vm.fault.ram.pages.present() == vm.fault.ram.pages.len() {
        // The fault loop completes it as the last page goes in, a moment after that
        // page's vCPU was woken: a guest that ended in that moment is still complete.
        p.complete_postcopy();
    }
    let mut v = p.to_json(downtime);
    if dest {
        let now = Instant::now();
        v["blocktime_ms"] = vm
            .vcpus
            .iter()
            .map(|c| json!(c.stall.blocktime_us_now(now) as f64 / 1000.0))
            .collect();
        // Each page the fault loop asked the source for: from the ask to the install
        // (QEMU's postcopy-latency, as percentiles).
        let lat = vm.fault.stats.latency.lock();
        v["request_latency_us"] = lat.as_ref().map_or(Value::Null, |l| percentiles(&l.all));
        let rows: Vec<_> = vm.vcpus.iter().map(|v| v.stall.waits.snapshot()).collect();
        v["fault_latency_us_pow2"] = lat.map_or(Value::Null, |l| l.pow2_json(&rows)["all"].take());
        let map = &vm.fault.ram.pages;
        v["pages"]["never_received"] = json!(map.len().saturating_sub(map.present()));
        v["pages"]["duplicates"] = json!(vm.fault.stats.duplicates.load(Ordering::Relaxed));
    }
    v
}

/// Page counters.
pub fn pages(vm: &VmShared) -> Value {
    let st = &vm.fault.stats;
    let map = &vm.fault.ram.pages;
    json!({
        "total": map.len(),
        "served": st.served.load(Ordering::Relaxed),
        "zero": st.zero.load(Ordering::Relaxed),
        "requested": map.count(PageState::Requested),
        "never_delivered": st.never.load(Ordering::Relaxed),
        "lost": st.lost.load(Ordering::Relaxed),
        "escalated": st.escalated.load(Ordering::Relaxed),
        "critical": st.critical.load(Ordering::Relaxed),
        "prefetched": st.policy.prefetched.load(Ordering::Relaxed),
        "background": st.policy.background.load(Ordering::Relaxed),
        "missing_at_exit": map.len().saturating_sub(map.present()),
    })
}

/// Per-vCPU counters.
pub fn vcpu_counters(vm: &VmShared) -> Vec<Value> {
    let now = Instant::now();
    vm.vcpus
        .iter()
        .map(|v| {
            let (kernel_us, user_us) = v.stall.blocktime_split_us(now);
            json!({
                "id": v.id,
                "state": v.run_state().name(),
                "exits": v.exits.load(Ordering::Relaxed),
                "faults": v.stall.faults.load(Ordering::Relaxed),
                "device_waits": v.stall.device_waits.load(Ordering::Relaxed),
                "escalations": v.stall.escalations.load(Ordering::Relaxed),
                "blocktime_us": kernel_us + user_us,
                "blocktime_kernel_us": kernel_us,
                "blocktime_user_us": user_us,
                "heartbeats": v.heartbeats.load(Ordering::Relaxed),
                "stalled_gpa": v.stall.gpa().map(|g| format!("{g:#x}")),
                "stalled_at_stop": v.stall.at_stop().map(|(g, ms)| json!({"gpa": format!("{g:#x}"), "ms": ms})),
            })
        })
        .collect()
}

/// `stats`: counters and latencies.
pub fn stats(vm: &VmShared) -> Value {
    let lat =
        |h: &std::sync::Mutex<Histogram<u64>>| h.lock().map_or(Value::Null, |h| percentiles(&h));
    json!({
        "ok": true,
        "uptime_ms": vm.started.elapsed().as_millis() as u64,
        "vcpus": vcpu_counters(vm),
        "pages": pages(vm),
        "vmm_faults": vm.fault.stats.vmm_faults.load(Ordering::Relaxed),
        "fault_latency_us": vm.fault.stats.latency.lock().map_or(Value::Null, |l| percentiles(&l.all)),
        "kick_latency_us": lat(&vm.kick_latency_us),
        "pause_latency_us": lat(&vm.pause_latency_us),
    })
}

/// `kick`: kicks each vCPU `count` times, one kick at a time, waiting up to 100 ms
/// for each answer, and reports the kick-to-answer latency per vCPU. The state each
/// vCPU was in when the series began is part of the reply. A vCPU whose thread has not
/// started counts one unanswered kick (as `pause` and `status` show it not answering).
pub fn kick(vm: &VmShared, count: u64) -> Value {
    let vcpus: Vec<Value> = vm
        .vcpus
        .iter()
        .map(|v| {
            let state = v.run_state().name();
            let mut h = crate::fault::new_histogram();
            let mut unanswered = 0u64;
            for _ in 0..count {
                let t = Instant::now();
                let Some(seq) = vm.kick(v) else {
                    // No thread: one that ended is stopped for good, one not started
                    // yet answers nothing.
                    if !v.control.started() {
                        unanswered += 1;
                    }
                    break;
                };
                if v.control.kick.wait_answered(seq, t + Duration::from_millis(100)) {
                    let _ = h.record((t.elapsed().as_micros() as u64).max(1));
                } else {
                    // It will not answer soon (a stall that ignores signals): stop here.
                    unanswered += 1;
                    break;
                }
            }
            json!({"id": v.id, "state": state, "latency_us": distribution(&h), "unanswered": unanswered})
        })
        .collect();
    json!({"ok": true, "vcpus": vcpus})
}

/// `wake`: sends the wake-up interrupt to every vCPU (a halted guest goes on).
pub fn wake(vm: &VmShared) -> Value {
    let mut errors = Vec::new();
    for v in vm.vcpus.iter() {
        if let Err(e) = vm.send_wake_interrupt(v.id) {
            errors.push(format!("vcpu {}: {e}", v.id));
        }
    }
    if errors.is_empty() {
        json!({"ok": true})
    } else {
        json!({"ok": false, "error": errors.join("; ")})
    }
}
