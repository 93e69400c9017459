//! Fault latency as the report gives it: percentiles of every page asked for, from the
//! ask to its install (`fault_latency_us`), and power-of-two buckets
//! (`fault_latency_us_pow2`, the shape of QEMU's `postcopy-latency-dist`, which `ufvmm
//! plot` draws) of each vCPU's waits, from its fault seen to the install that ends the
//! wait, whoever asked for the page first (the vCPU, read-ahead, a VMM thread, another
//! vCPU), and of the pages VMM threads asked for.
//!
//! Buckets are plain counters, 64 per row: a row per vCPU costs 512 bytes, where another
//! hdrhistogram of the same range would cost hundreds of KiB.

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

impl Pow2 {
    /// Counts one latency of `us` microseconds (0 counts as 1).
    pub fn record(&mut self, us: u64) {
        // Bucket 63 would end at 2^64, which a report's JSON number cannot hold.
        let k = (63 - us.max(1).leading_zeros() as usize).min(62);
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
            .map(|(k, &c)| json!({"from_us": 1u64 << k, "to_us": 1u64 << (k + 1), "count": c}))
            .collect()
    }
}

/// The fault loop's latency records: written by the loop alone, read by the report.
pub struct Latency {
    /// Every page asked for, 1 µs to an hour at 3 significant digits (percentiles).
    pub all: Histogram<u64>,
    /// Per vCPU: its waits for a page.
    pub vcpus: Vec<Pow2>,
    /// Pages VMM threads asked for (device emulation, gdb).
    pub vmm: Pow2,
    /// Per vCPU: the page it waits for and when its fault was first seen.
    waits: Vec<Option<(u64, Instant)>>,
}

impl Latency {
    /// Records for a VM of `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Latency {
            all: super::new_histogram(),
            vcpus: vec![Pow2::default(); vcpus],
            vmm: Pow2::default(),
            waits: vec![None; vcpus],
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

    /// vCPU `v` faulted on the missing page at `page` (its GPA), seen at `seen`; a
    /// fault again on the same page is the same wait.
    pub fn fault_seen(&mut self, v: usize, page: u64, seen: Instant) {
        if let Some(w) = self.waits.get_mut(v) {
            if !matches!(w, Some((p, _)) if *p == page) {
                *w = Some((page, seen));
            }
        }
    }

    /// The page at `page` was installed at `done`, ending vCPU `v`'s wait for it.
    pub fn woke(&mut self, v: usize, page: u64, done: Instant) {
        let Some(w) = self.waits.get_mut(v) else {
            return;
        };
        if let Some((p, seen)) = *w {
            if p == page {
                *w = None;
                let us = done.saturating_duration_since(seen).as_micros() as u64;
                self.vcpus[v].record(us);
            }
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

/// [`Latency::fault_seen`] on `l`.
pub fn fault_seen(l: &Mutex<Latency>, v: usize, page: u64, seen: Instant) {
    if let Ok(mut l) = l.lock() {
        l.fault_seen(v, page, seen);
    }
}

/// [`Latency::woke`] on `l`.
pub fn woke(l: &Mutex<Latency>, v: usize, page: u64, done: Instant) {
    if let Ok(mut l) = l.lock() {
        l.woke(v, page, done);
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
        let us = |n| t + std::time::Duration::from_micros(n);
        // vCPU 0 waits 100 µs for page 0x1000, faulting on it twice.
        l.fault_seen(0, 0x1000, t);
        l.fault_seen(0, 0x1000, us(50));
        l.woke(0, 0x1000, us(100));
        // vCPU 1's wait for 0x2000 ends; an install of another page does not end it.
        l.fault_seen(1, 0x2000, t);
        l.woke(1, 0x3000, us(5));
        l.woke(1, 0x2000, us(3000));
        l.woke(1, 0x2000, us(9000)); // Ended already.
        l.woke(9, 0x2000, us(9000)); // No such vCPU.
                                     // Page requests: the VMM's are its row, every one is in the percentiles.
        l.record(t, Some(0));
        l.record(t, None);
        l.record(t, None);
        let j = l.pow2_json();
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
        assert_eq!(total(&j["vcpus"][1]), 1);
        assert_eq!(total(&j["vmm"]), 2);
        assert_eq!(total(&j["all"]), 4);
        assert_eq!(l.all.len(), 3);
        let mut p = Pow2::default();
        p.record(u64::MAX);
        assert_eq!(
            p.to_json()[0]["to_us"],
            1u64 << 63,
            "the last bucket ends in a u64"
        );
    }
}
