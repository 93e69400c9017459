//! Where a fault's time goes, as the fault loop can see it (`fault_breakdown_us` in
//! the report).
//!
//! A vCPU that pages in goes round a circle: its touch faults, the kernel queues an
//! event, the loop reads it (**seen**), asks the link model and the source, and
//! installs the page (**serve**: seen to the install ioctl's start), the ioctl copies
//! and wakes (**install**), and the vCPU thread wakes up, gets back into the guest,
//! runs to its next touch and faults again, which the loop sees (**resume**: install
//! done to that vCPU's next fault seen). The loop cannot see inside the kernel, so
//! `resume` holds the wake-up, the return into the guest, the guest's own work between
//! two touches, the next fault's way to the event queue and the loop's own way to
//! reading it (its spin or its sleep in `poll`). `resume` is only counted for a fault
//! that follows the vCPU's last install within [`RESUME_WITHIN`], so a vCPU that ran
//! for a while between faults does not count as a slow return.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A fault this soon after the vCPU's last install counts as its return (see the
/// module's note).
pub const RESUME_WITHIN: Duration = Duration::from_millis(1);

/// Phase histograms, in nanoseconds, kept by the fault loop alone.
pub struct FaultTiming {
    serve: Histogram<u64>,
    install: Histogram<u64>,
    resume: Histogram<u64>,
    /// Faults the loop found by spinning, and by sleeping in `poll`.
    found_spinning: u64,
    found_sleeping: u64,
    /// Per vCPU: when the page it last waited for was installed.
    last_install: Vec<Option<Instant>>,
}

/// 1 ns to 10 s at 2 significant digits: small enough to keep three (about 30 KiB
/// each), fine enough for phases of a microsecond.
fn ns_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 2).unwrap_or_else(|_| {
        let mut h = Histogram::new(2).unwrap_or_else(|_| unreachable!("2 sigfigs is valid"));
        h.auto(true);
        h
    })
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_nanos() as u64).clamp(1, 10_000_000_000));
}

impl FaultTiming {
    /// Timing for a VM with `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        FaultTiming {
            serve: ns_histogram(),
            install: ns_histogram(),
            resume: ns_histogram(),
            found_spinning: 0,
            found_sleeping: 0,
            last_install: vec![None; vcpus],
        }
    }

    /// A turn of the loop found fault events, by spinning or after sleeping.
    pub fn found(&mut self, spinning: bool) {
        if spinning {
            self.found_spinning += 1;
        } else {
            self.found_sleeping += 1;
        }
    }

    /// vCPU `vcpu` faulted on a missing page, seen at `seen`.
    pub fn fault_seen(&mut self, vcpu: usize, seen: Instant) {
        if let Some(done) = self.last_install.get_mut(vcpu).and_then(Option::take) {
            let d = seen.saturating_duration_since(done);
            if d <= RESUME_WITHIN {
                record(&mut self.resume, d);
            }
        }
    }

    /// A page a vCPU faulted on, seen at `seen`, went into the install ioctl at
    /// `start`, which returned at `done`.
    pub fn served(&mut self, seen: Instant, start: Instant, done: Instant) {
        record(&mut self.serve, start.saturating_duration_since(seen));
        record(&mut self.install, done.saturating_duration_since(start));
    }

    /// The wait of vCPU `vcpu` ended with an install that returned at `done`.
    pub fn woke(&mut self, vcpu: usize, done: Instant) {
        if let Some(slot) = self.last_install.get_mut(vcpu) {
            *slot = Some(done);
        }
    }

    /// The report's `fault_breakdown_us`: p50/p90/p99 of each phase in microseconds.
    pub fn to_json(&self) -> Value {
        let phase = |h: &Histogram<u64>| {
            if h.is_empty() {
                return json!({"count": 0, "p50": null, "p90": null, "p99": null});
            }
            let us = |q: f64| (h.value_at_quantile(q) as f64 / 100.0).round() / 10.0;
            json!({"count": h.len(), "p50": us(0.5), "p90": us(0.9), "p99": us(0.99)})
        };
        json!({
            "serve": phase(&self.serve),
            "install": phase(&self.install),
            "resume": phase(&self.resume),
            "found_spinning": self.found_spinning,
            "found_sleeping": self.found_sleeping,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_return_counts_only_soon_after_the_vcpus_own_install() {
        let mut t = FaultTiming::new(2);
        let t0 = Instant::now();
        t.fault_seen(0, t0); // No install before: nothing to count.
        t.served(
            t0,
            t0 + Duration::from_micros(1),
            t0 + Duration::from_micros(6),
        );
        t.woke(0, t0 + Duration::from_micros(6));
        t.fault_seen(1, t0 + Duration::from_micros(10)); // Another vCPU's fault.
        t.fault_seen(0, t0 + Duration::from_micros(40));
        t.fault_seen(0, t0 + Duration::from_micros(80)); // Counted once only.
        t.woke(0, t0);
        t.fault_seen(0, t0 + Duration::from_millis(5)); // It ran a while: no return.
        t.woke(7, t0); // No such vCPU: ignored.
        let j = t.to_json();
        assert_eq!(j["resume"]["count"], 1);
        assert_eq!(j["resume"]["p50"], 34.0);
        assert_eq!(j["serve"]["p50"], 1.0);
        assert_eq!(j["install"]["p50"], 5.0);
    }
}
