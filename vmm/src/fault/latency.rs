//! Fault latency as the report gives it: percentiles of every page asked for, from the
//! ask to its install (`fault_latency_us`), and power-of-two buckets
//! (`fault_latency_us_pow2`, the shape of QEMU's `postcopy-latency-dist`, which `ufvmm
//! plot` draws) of each vCPU's page waits ([`AtomicPow2`] in its stall record: from its
//! first fault on the page to the end of the wait, in the kernel or in user space after
//! an escalation, whoever asked for the page first) and of the pages VMM threads asked
//! for.
//!
//! Buckets are plain counters, 64 per row: a row per vCPU costs 512 bytes, where another
//! hdrhistogram of the same range would cost hundreds of KiB.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Counts of latencies by power of two: bucket `k` holds `[2^k, 2^(k+1))` µs (the last,
/// 62, also everything above).
#[derive(Clone)]
pub struct Pow2 {
    counts: [u64; 64],
}

impl Default for Pow2 {
    fn default() -> Self {
        Pow2 { counts: [0; 64] }
    }
}

/// The bucket of a latency of `us` microseconds (0 counts as 1): `k` holds
/// `2^k..2^(k+1)`. Bucket 63 would end at 2^64, which a report's JSON number cannot
/// hold: 62 takes everything above too.
fn bucket(us: u64) -> usize {
    (63 - us.max(1).leading_zeros() as usize).min(62)
}

impl Pow2 {
    /// Counts one latency of `us` microseconds (0 counts as 1).
    pub fn record(&mut self, us: u64) {
        let k = bucket(us);
        self.counts[k] = self.counts[k].saturating_add(1);
    }

    /// How many latencies were counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0, |a, &c| a.saturating_add(c))
    }

    /// Adds every bucket of `other`.
    pub fn add(&mut self, other: &Pow2) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// The non-empty buckets, in order: `[{"from_us", "to_us", "count"}]`, `to_us`
    /// exclusive.
    pub fn to_json(&self) -> Value {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(k, &c)| json!({"from_us": 1u64 << k, "to_us": 1u64 << (k + 1), "count": c}))
            .collect()
    }
}

/// The fault loop's latency records: written by the loop alone, read by the report.
pub struct Latency {
    /// Every page asked for, 1 µs to an hour at 3 significant digits (percentiles).
    pub all: Histogram<u64>,
    /// Pages VMM threads asked for (device emulation, gdb).
    pub vmm: Pow2,
}

impl Latency {
    /// Empty records.
    pub fn new() -> Self {
        Latency {
            all: super::new_histogram(),
            vmm: Pow2::default(),
        }
    }

    /// A page asked for at `asked`, by vCPU `vcpu` (`None`: a VMM thread), is installed.
    pub fn record(&mut self, asked: Instant, vcpu: Option<usize>) {
        let us = (asked.elapsed().as_micros() as u64).max(1);
        let _ = self.all.record(us);
        if vcpu.is_none() {
            self.vmm.record(us);
        }
    }

    /// The report's `fault_latency_us_pow2`: `all`, one row per vCPU (`vcpus`, the
    /// vCPUs' waits), and `vmm`.
    pub fn pow2_json(&self, vcpus: &[Pow2]) -> Value {
        let mut all = self.vmm.clone();
        for v in vcpus {
            all.add(v);
        }
        json!({
            "all": all.to_json(),
            "vcpus": vcpus.iter().map(Pow2::to_json).collect::<Vec<_>>(),
            "vmm": self.vmm.to_json(),
        })
    }
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

/// [`Pow2`] that threads fill without a lock (a vCPU's stall record).
pub struct AtomicPow2 {
    counts: [AtomicU64; 63],
}

impl Default for AtomicPow2 {
    fn default() -> Self {
        AtomicPow2 {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl AtomicPow2 {
    /// Counts one latency of `us` microseconds.
    pub fn record(&self, us: u64) {
        self.counts[bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> Pow2 {
        let mut p = Pow2::default();
        for (a, c) in p.counts.iter_mut().zip(self.counts.iter()) {
            *a = c.load(Ordering::Relaxed);
        }
        p
    }
}

/// Records one latency into `l` (a poisoned lock drops the sample, never the run).
pub fn record(l: &Mutex<Latency>, asked: Instant, vcpu: Option<usize>) {
    if let Ok(mut l) = l.lock() {
        l.record(asked, vcpu);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_and_rows_add_up() {
        let mut p = Pow2::default();
        for us in [0, 1, 2, 3, 4, 7, 8, 1000] {
            p.record(us);
        }
        let j = p.to_json();
        let rows: Vec<(u64, u64, u64)> = j
            .as_array()
            .expect("array")
            .iter()
            .map(|b| {
                (
                    b["from_us"].as_u64().expect("from"),
                    b["to_us"].as_u64().expect("to"),
                    b["count"].as_u64().expect("count"),
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![(1, 2, 2), (2, 4, 2), (4, 8, 2), (8, 16, 1), (512, 1024, 1)]
        );

        let mut l = Latency::new();
        let t = Instant::now();
        l.record(t, Some(0));
        l.record(t, None);
        l.record(t, None);
        let waits: Vec<AtomicPow2> = (0..2).map(|_| AtomicPow2::default()).collect();
        waits[0].record(100);
        waits[1].record(3000);
        waits[1].record(3500);
        let rows: Vec<Pow2> = waits.iter().map(AtomicPow2::snapshot).collect();
        let j = l.pow2_json(&rows);
        let total = |v: &Value| -> u64 {
            v.as_array()
                .expect("array")
                .iter()
                .map(|b| b["count"].as_u64().expect("count"))
                .sum()
        };
        assert_eq!(j["vcpus"][0][0]["from_us"], 64, "{j}");
        assert_eq!(total(&j["vcpus"][0]), 1);
        assert_eq!(j["vcpus"][1][0]["from_us"], 2048, "{j}");
        assert_eq!(total(&j["vcpus"][1]), 2);
        assert_eq!(total(&j["vmm"]), 2, "VMM requests only");
        assert_eq!(total(&j["all"]), 5);
        assert_eq!(l.all.len(), 3, "every page asked for");
        let mut p = Pow2::default();
        p.record(u64::MAX);
        assert_eq!(
            p.to_json()[0]["to_us"],
            1u64 << 63,
            "the last bucket ends in a u64"
        );
    }
}
