//! Fault latency (a fault or a VMM request seen, to its page installed) as the report
//! gives it: percentiles over every page, and power-of-two buckets per vCPU and for the
//! VMM's own requests (`fault_latency_us_pow2`), the shape QEMU's
//! `postcopy-latency-dist` has and `ufvmm plot` draws.
//!
//! Buckets are plain counters, 64 per row: a row per vCPU costs 512 bytes, where another
//! hdrhistogram of the same range would cost hundreds of KiB.

use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Counts of latencies by power of two: bucket `k` holds `[2^k, 2^(k+1))` µs.
#[derive(Clone)]
pub struct Pow2 {
    counts: [u64; 64],
}

impl Default for Pow2 {
    fn default() -> Self {
        Pow2 { counts: [0; 64] }
    }
}

impl Pow2 {
    /// Counts one latency of `us` microseconds (0 counts as 1).
    pub fn record(&mut self, us: u64) {
        let k = 63 - us.max(1).leading_zeros() as usize;
        self.counts[k] = self.counts[k].saturating_add(1);
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
            .map(|(k, &c)| json!({"from_us": 1u64 << k, "to_us": 1u128 << (k + 1), "count": c}))
            .collect()
    }
}

/// The fault loop's latency records: written by the loop alone, read by the report.
pub struct Latency {
    /// Every page, 1 µs to an hour at 3 significant digits (percentiles).
    pub all: Histogram<u64>,
    /// Per vCPU: pages its own faults asked for.
    pub vcpus: Vec<Pow2>,
    /// Pages VMM threads asked for (device emulation, gdb, the switch-over).
    pub vmm: Pow2,
}

impl Latency {
    /// Records for a VM of `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Latency {
            all: super::new_histogram(),
            vcpus: vec![Pow2::default(); vcpus],
            vmm: Pow2::default(),
        }
    }

    /// A page asked for at `asked`, by vCPU `vcpu` (`None`: a VMM thread), is installed.
    pub fn record(&mut self, asked: Instant, vcpu: Option<usize>) {
        let us = (asked.elapsed().as_micros() as u64).max(1);
        let _ = self.all.record(us);
        match vcpu.and_then(|v| self.vcpus.get_mut(v)) {
            Some(row) => row.record(us),
            None => self.vmm.record(us),
        }
    }

    /// The report's `fault_latency_us_pow2`: `all`, one row per vCPU, and `vmm`.
    pub fn pow2_json(&self) -> Value {
        let mut all = self.vmm.clone();
        for v in &self.vcpus {
            all.add(v);
        }
        json!({
            "all": all.to_json(),
            "vcpus": self.vcpus.iter().map(Pow2::to_json).collect::<Vec<_>>(),
            "vmm": self.vmm.to_json(),
        })
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

        let mut l = Latency::new(2);
        let t = Instant::now();
        l.record(t, Some(0));
        l.record(t, Some(1));
        l.record(t, Some(1));
        l.record(t, None);
        l.record(t, Some(9)); // No such vCPU: counted as the VMM's.
        let j = l.pow2_json();
        let total = |v: &Value| -> u64 {
            v.as_array()
                .expect("array")
                .iter()
                .map(|b| b["count"].as_u64().expect("count"))
                .sum()
        };
        assert_eq!(total(&j["all"]), 5);
        assert_eq!(total(&j["vcpus"][0]), 1);
        assert_eq!(total(&j["vcpus"][1]), 2);
        assert_eq!(total(&j["vmm"]), 2);
        assert_eq!(l.all.len(), 5);
    }
}
