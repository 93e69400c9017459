//! The end of a run: the summary on stderr and the `--report` JSON file.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::ops;
use crate::config::VmConfig;
use crate::vm::shared::VmShared;

/// How the run ended.
#[derive(Clone, Debug)]
pub struct Ending {
    /// One line: why the VM stopped.
    pub reason: String,
    /// The process exit code.
    pub exit_code: i32,
    /// The guest's own exit status, if it gave one.
    pub guest_exit_code: Option<u32>,
}

impl Ending {
    /// Stopped from outside: by signal `sig` (exit 128 + sig), or by `quit` (exit 0).
    pub fn stopped(sig: Option<i32>) -> Ending {
        let (reason, exit_code) = match sig {
            None => ("stopped by quit".to_string(), 0),
            Some(s) => {
                let name = if s == libc::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                (format!("stopped by {name}"), 128 + s)
            }
        };
        Ending {
            reason,
            exit_code,
            guest_exit_code: None,
        }
    }
}

/// The `--report` document of a process that ended before it had a VM: `vm` is null,
/// `vcpus` empty, and `migration` says what it was waiting for.
pub fn report_without_vm(
    reason: &str,
    exit_code: i32,
    runtime_ms: u64,
    config: Value,
    migration: Value,
) -> Value {
    json!({
        "reason": reason,
        "exit_code": exit_code,
        "runtime_ms": runtime_ms,
        "vm": null,
        "config": config,
        "migration": migration,
        "vcpus": [],
        "pages": null,
        "memory": null,
        "guest": {"exit_code": null, "results": []},
    })
}

/// The report's `config` object for a VM booted from `cfg`.
pub fn config_json(cfg: &VmConfig, tsc_khz: u64) -> Value {
    json!({
        "vcpus": cfg.vcpus,
        "mem": cfg.mem,
        "workload": cfg.workload.name,
        "mode": cfg.mode,
        "uffd": !cfg.no_uffd,
        "prefault": cfg.prefault,
        "hugepages": cfg.hugepages,
        "tsc_khz": tsc_khz,
    })
}

/// The `--report` document.
pub fn report(vm: &VmShared, config: Value, end: &Ending) -> Value {
    let dist = |h: &std::sync::Mutex<hdrhistogram::Histogram<u64>>| {
        h.lock().map_or(Value::Null, |h| ops::distribution(&h))
    };
    let results: Vec<Value> = vm
        .vcpus
        .iter()
        .filter_map(|v| {
            let r = (*v.results.lock().unwrap_or_else(|e| e.into_inner()))?;
            Some(json!({
                "vcpu": r.vcpu,
                "workload": r.workload,
                "mode": r.mode,
                "pages": r.pages,
                "mismatches": r.mismatches,
                "tsc_cycles": r.tsc_cycles,
                "events": r.events,
            }))
        })
        .collect();
    json!({
        "reason": end.reason,
        "exit_code": end.exit_code,
        "runtime_ms": vm.started.elapsed().as_millis() as u64,
        "config": config,
        "migration": migration(vm),
        "vcpus": ops::vcpu_counters(vm),
        "pages": ops::pages(vm),
        "memory": memory(vm),
        "policy": vm.fault.stats.policy.to_json(),
        "vmm_faults": vm.fault.stats.vmm_faults.load(Ordering::Relaxed),
        "fault_latency_us": vm.fault.stats.latency.lock().map_or(Value::Null, |l| ops::percentiles(&l.all)),
        "fault_latency_us_pow2": pow2(vm),
        "placement": vm.placement.to_json(),
        "fault_breakdown_us": vm.fault.stats.timing.lock().map_or(Value::Null, |t| t.to_json()),
        "kick_latency_us": dist(&vm.kick_latency_us),
        "kick_floor_us": kick_floor(vm),
        "pause_latency_us": dist(&vm.pause_latency_us),
        "guest": {
            "exit_code": end.guest_exit_code,
            "results": results,
            "mailbox_messages": vm.mailbox_count.load(Ordering::Relaxed),
        },
    })
}

/// The report's `fault_latency_us_pow2`: each vCPU's waits, the VMM's requests.
fn pow2(vm: &VmShared) -> Value {
    let rows: Vec<_> = vm.vcpus.iter().map(|v| v.stall.waits.snapshot()).collect();
    vm.fault
        .stats
        .latency
        .lock()
        .map_or(Value::Null, |l| l.pow2_json(&rows))
}

/// The report's `migration`: `status`'s, and its timeline (too large for `status`),
/// ending with the counts as the VM ends.
fn migration(vm: &VmShared) -> Value {
    let mut m = ops::migration(vm);
    if let Some(p) = vm.migration() {
        let waiting = (p.role == crate::migration::progress::Role::Destination)
            .then(|| vm.vcpus.iter().filter(|v| v.stall.gpa().is_some()).count() as u64);
        m["timeline"] = p.timeline_json(waiting);
    }
    m
}

/// At most this many kicks measure the report's floor (about 20 ms here).
const FLOOR_KICKS: u64 = 500;
/// And at most this long.
const FLOOR_BUDGET: Duration = Duration::from_secs(2);

/// The report's `kick_floor_us`, when the run kicked its vCPUs: the same kick protocol
/// between two plain threads (`vcpu::kick::floor_latency`), measured now, so the run's
/// kick latency can be set against what this machine allows at all. `null` when no
/// kick was answered.
fn kick_floor(vm: &VmShared) -> Value {
    let kicks = vm.kick_latency_us.lock().map_or(0, |h| h.len());
    if kicks == 0 {
        return Value::Null;
    }
    match crate::vcpu::kick::floor_latency_within(kicks.min(FLOOR_KICKS) as usize, FLOOR_BUDGET) {
        Ok(h) if !h.is_empty() => ops::distribution(&h),
        _ => Value::Null,
    }
}

/// The report's `memory` object, measured now (at the end of the run): what the VMM
/// holds per page of guest RAM, and its resident set beyond guest RAM's own pages.
pub fn memory(vm: &VmShared) -> Value {
    let ram = &vm.fault.ram;
    let per_page = ram.per_page_bytes();
    let per_gib = (u128::from(per_page) << 30) / u128::from(ram.size().max(1));
    // RSS first: reading smaps allocates, and that should not count against it.
    let rss = crate::memory::usage::process_rss();
    let guest = crate::memory::usage::resident_in(ram.host_base(), ram.size());
    json!({
        "ram_bytes": ram.size(),
        "page_size_bytes": ram.page_size(),
        "regions": ram.layout().regions().map(|r| json!({
            "gpa": r.gpa,
            "bytes": r.len,
        })).collect::<Vec<_>>(),
        "vmm_per_page_bytes": per_page,
        "vmm_bytes_per_gib": per_gib as u64,
        "rss_bytes": rss,
        "guest_resident_bytes": guest,
        // The RSS leaves hugetlb pages out (guest RAM's own line counts them).
        "rss_beyond_ram_bytes": if ram.is_huge() {
            rss
        } else {
            rss.zip(guest).map(|(r, g)| r.saturating_sub(g))
        },
    })
}

/// Writes the report atomically (temp file, then rename).
pub fn write(path: &Path, doc: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(doc).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, path)
}

/// Prints the summary: why, each vCPU, pages.
pub fn print_summary(vm: &VmShared, end: &Ending) {
    let now = Instant::now();
    eprintln!(
        "ufvmm: {} after {:.3} s",
        end.reason,
        vm.started.elapsed().as_secs_f64()
    );
    for v in vm.vcpus.iter() {
        let stall = match v.stall.at_stop() {
            Some((gpa, ms)) => format!(", was stalled at {gpa:#x} for {ms} ms"),
            None => String::new(),
        };
        let (kernel_us, user_us) = v.stall.blocktime_split_us(now);
        eprintln!(
            "ufvmm:   vcpu{}: {}{}, {} faults, blocktime {} ms ({} ms in user space, {} \
             escalations), {} exits",
            v.id,
            v.run_state().name(),
            stall,
            v.stall.faults.load(Ordering::Relaxed),
            (kernel_us + user_us) / 1000,
            user_us / 1000,
            v.stall.escalations.load(Ordering::Relaxed),
            v.exits.load(Ordering::Relaxed)
        );
    }
    let p = ops::pages(vm);
    let lat = vm
        .fault
        .stats
        .latency
        .lock()
        .map(|l| ops::percentiles(&l.all))
        .unwrap_or_default();
    let lat = if lat["count"] == 0 {
        String::new()
    } else {
        format!(
            "; fault latency p50 {} us, p99 {} us",
            lat["p50"], lat["p99"]
        )
    };
    eprintln!(
        "ufvmm:   pages: {} served ({} zero), {} requested and not arrived, {} missing at exit{}",
        p["served"], p["zero"], p["requested"], p["missing_at_exit"], lat
    );
    eprintln!("ufvmm:   {}", policy_line(vm));
}

/// The summary's policy line: what read-ahead and background fill were, and installed.
fn policy_line(vm: &VmShared) -> String {
    let st = &vm.fault.stats.policy;
    let p = st.policies.get().copied().unwrap_or_default();
    let prefetch = match p.prefetch {
        crate::fault::prefetch::Prefetch::Off => "prefetch off".to_string(),
        crate::fault::prefetch::Prefetch::Auto => format!(
            "prefetch auto ({} pages prefetched)",
            st.prefetched.load(Ordering::Relaxed)
        ),
        crate::fault::prefetch::Prefetch::Fixed(n) => format!(
            "prefetch {n} ({} pages prefetched)",
            st.prefetched.load(Ordering::Relaxed)
        ),
    };
    let background = match p.background {
        None => "background off".to_string(),
        Some(b) => format!(
            "background {:.0} pages/s ({} pages)",
            b.pages_per_s,
            st.background.load(Ordering::Relaxed)
        ),
    };
    format!("policy: {prefetch}, {background}")
}
