//! A migration over time, bounded: the report's `migration.timeline`, for a plot.
//!
//! Samples are taken at most every `interval_ms` (100 ms to begin with). Each holds
//! the pages moved *so far* (cumulative, as the [`Progress`](super::Progress)
//! counters: received on a destination, sent on a source) and, on a destination, how
//! many vCPUs wait for a page at that moment.
//!
//! The samples never exceed [`MAX_SAMPLES`]: when full they are compacted. The first
//! stays; of each later pair of neighbours the later one stays, so its cumulative counts are still exact (a rate
//! between two kept samples is exact too, just over a longer stretch); it takes the
//! larger `waiting` of the two, so a short wait seen once does not vanish. The interval
//! then doubles, and the samples that follow are as far apart as the kept ones. A long
//! migration thus keeps between 512 and 1024 samples evenly spread over it.
//!
//! Events (phase changes, breaks, recoveries) are kept up to [`MAX_EVENTS`]; further
//! ones are only counted. Once [`Timeline::finish`] took the last sample (completed or
//! failed) no sample is added; events still are (a destination counts a recovery
//! after completion when the source comes back to hear so).

use serde_json::{json, Value};

/// The first sampling interval.
pub const INTERVAL_MS: u64 = 100;
/// Most samples kept.
pub const MAX_SAMPLES: usize = 1024;
/// Most events kept.
pub const MAX_EVENTS: usize = 256;
/// Of those, kept for the phases (precopy, switch-over, postcopy, the end): breaks
/// and recoveries fill the rest at most.
pub const END_ROOM: usize = 8;

/// The state of a migration at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Milliseconds since the migration began.
    pub t_ms: f64,
    /// Pages moved before switch-over, so far.
    pub precopy: u64,
    /// Pages moved because the destination asked, so far.
    pub urgent: u64,
    /// Pages moved by the background stream, so far.
    pub background: u64,
    /// vCPUs waiting for a page now (destination only).
    pub waiting: Option<u64>,
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Precopy began.
    Precopy,
    /// The vCPUs stopped on the source.
    Switchover,
    /// The guest runs on the destination.
    Postcopy,
    /// The connection broke.
    Break,
    /// The migration resumed after a break.
    Recovery,
    /// Every page arrived.
    Completed,
    /// Ended without moving the guest.
    Failed,
}

impl EventKind {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Precopy => "precopy",
            EventKind::Switchover => "switchover",
            EventKind::Postcopy => "postcopy",
            EventKind::Break => "break",
            EventKind::Recovery => "recovery",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
        }
    }
}

/// Samples and events of one migration (see the module note for the bounds).
#[derive(Debug)]
pub struct Timeline {
    interval_ms: u64,
    samples: Vec<Sample>,
    events: Vec<(f64, EventKind)>,
    events_dropped: u64,
    finished: bool,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    /// Empty, sampling every [`INTERVAL_MS`].
    pub fn new() -> Self {
        Timeline {
            interval_ms: INTERVAL_MS,
            samples: Vec::with_capacity(64),
            events: Vec::new(),
            events_dropped: 0,
            finished: false,
        }
    }

    /// When the next sample is due (ms since the start); `None` once finished.
    pub fn next_due_ms(&self) -> Option<f64> {
        if self.finished {
            return None;
        }
        Some(
            self.samples
                .last()
                .map_or(0.0, |s| s.t_ms + self.interval_ms as f64),
        )
    }

    /// True if a sample taken at `t_ms` would be kept.
    pub fn due(&self, t_ms: f64) -> bool {
        self.next_due_ms().is_some_and(|d| t_ms >= d)
    }

    /// Keeps `s` if it is due.
    pub fn sample(&mut self, s: Sample) {
        if self.due(s.t_ms) {
            self.push(s);
        }
    }

    /// The last sample, whenever it comes; none after it. One within 0.1 ms of the
    /// one before replaces it (so that times stay apart once rounded).
    pub fn finish(&mut self, s: Sample) {
        if self.finished {
            return;
        }
        match self.samples.last_mut() {
            Some(last) if s.t_ms < last.t_ms + 0.1 => {
                *last = Sample {
                    t_ms: last.t_ms.max(s.t_ms),
                    waiting: last.waiting.max(s.waiting),
                    ..s
                };
            }
            _ => self.push(s),
        }
        self.finished = true;
    }

    fn push(&mut self, s: Sample) {
        if self.samples.len() >= MAX_SAMPLES {
            self.compact();
        }
        self.samples.push(s);
    }

    /// Halves the samples: the first always stays (the start, often the precopy
    /// burst); of each later pair the later one stays, with the pair's larger wait.
    fn compact(&mut self) {
        let Some((&first, rest)) = self.samples.split_first() else {
            return;
        };
        let kept: Vec<Sample> = std::iter::once(first)
            .chain(rest.chunks(2).map(|pair| {
                let later = pair[pair.len() - 1];
                Sample {
                    waiting: pair.iter().map(|s| s.waiting).max().flatten(),
                    ..later
                }
            }))
            .collect();
        self.samples = kept;
        self.interval_ms = self.interval_ms.saturating_mul(2);
    }

    /// Records that `kind` happened at `t_ms`. Breaks and recoveries stop at
    /// [`MAX_EVENTS`] less [`END_ROOM`], so that a peer breaking the link over and
    /// over cannot crowd out the switch-over and the end.
    pub fn event(&mut self, t_ms: f64, kind: EventKind) {
        let cap = match kind {
            EventKind::Break | EventKind::Recovery => MAX_EVENTS - END_ROOM,
            _ => MAX_EVENTS,
        };
        if self.events.len() < cap {
            self.events.push((t_ms, kind));
        } else {
            self.events_dropped += 1;
        }
    }

    /// The samples kept so far.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The report's `timeline` object, ending with `now` if the timeline is not
    /// finished (so its last counts are the report's, also when the VM ended
    /// mid-migration).
    pub fn to_json(&self, now: Option<Sample>) -> Value {
        let last = now.filter(|n| {
            !self.finished && self.samples.last().is_none_or(|l| n.t_ms >= l.t_ms + 0.1)
        });
        let samples: Vec<Value> = self
            .samples
            .iter()
            .chain(last.as_ref())
            .map(|s| {
                json!({
                    "t_ms": tenth(s.t_ms),
                    "precopy": s.precopy,
                    "urgent": s.urgent,
                    "background": s.background,
                    "waiting": s.waiting,
                })
            })
            .collect();
        let events: Vec<Value> = self
            .events
            .iter()
            .map(|(t, k)| json!({"t_ms": tenth(*t), "kind": k.name()}))
            .collect();
        json!({
            "interval_ms": self.interval_ms,
            "samples": samples,
            "events": events,
            "events_dropped": self.events_dropped,
        })
    }
}

/// `ms` rounded to 0.1 ms.
fn tenth(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample at `t` after `n` pages of each kind, `w` vCPUs waiting.
    fn at(t: f64, n: u64, w: Option<u64>) -> Sample {
        Sample {
            t_ms: t,
            precopy: n,
            urgent: 2 * n,
            background: 3 * n,
            waiting: w,
        }
    }

    #[test]
    fn samples_only_when_due() {
        let mut tl = Timeline::new();
        assert!(tl.due(0.0));
        tl.sample(at(0.0, 0, None));
        assert!(!tl.due(99.9));
        tl.sample(at(50.0, 1, None));
        tl.sample(at(100.0, 2, None));
        tl.sample(at(150.0, 3, None));
        let t: Vec<f64> = tl.samples().iter().map(|s| s.t_ms).collect();
        assert_eq!(t, [0.0, 100.0]);
        assert_eq!(tl.next_due_ms(), Some(200.0));
    }

    #[test]
    fn compaction_keeps_counts_exact_doubles_the_interval_and_keeps_the_longest_wait() {
        let mut tl = Timeline::new();
        // One page of each kind per sample; one short wait, seen by sample 5 only.
        for i in 0..MAX_SAMPLES as u64 {
            let w = if i == 4 { 2 } else { 0 };
            tl.sample(at(i as f64 * 100.0, i, Some(w)));
        }
        assert_eq!(tl.samples().len(), MAX_SAMPLES);
        assert_eq!(tl.to_json(None)["interval_ms"], 100);
        // The next sample compacts first.
        let t = MAX_SAMPLES as f64 * 100.0;
        tl.sample(at(t, MAX_SAMPLES as u64, Some(0)));
        let s = tl.samples();
        assert_eq!(s.len(), MAX_SAMPLES / 2 + 2);
        assert_eq!(tl.to_json(None)["interval_ms"], 200);
        // The first stays; each later kept sample is the later of its pair, counts as
        // they were then; the new one follows.
        let n = s.len();
        for (k, s) in s.iter().enumerate() {
            let i = match k {
                0 => 0,
                k if k < n - 1 => (2 * k).min(MAX_SAMPLES - 1),
                _ => MAX_SAMPLES,
            } as u64;
            assert_eq!(*s, at(i as f64 * 100.0, i, s.waiting), "sample {k}");
        }
        // Sample 4's wait survives in the sample that replaced it and 5.
        assert_eq!(s[2].waiting, Some(2));
        assert!(s
            .iter()
            .enumerate()
            .all(|(k, s)| k == 2 || s.waiting == Some(0)));
        // The next is due a doubled interval after the last.
        assert!(!tl.due(t + 150.0));
        assert!(tl.due(t + 200.0));
    }

    #[test]
    fn a_long_migration_stays_bounded_and_exact_at_the_end() {
        let mut tl = Timeline::new();
        let mut t = 0.0;
        let mut n = 0;
        while t < 3_600_000.0 {
            tl.sample(at(t, n, None));
            t += 10.0;
            n += 7;
        }
        tl.finish(at(t, n, None));
        let s = tl.samples();
        assert!(
            s.len() <= MAX_SAMPLES && s.len() > MAX_SAMPLES / 2,
            "{}",
            s.len()
        );
        assert!(s.windows(2).all(|w| w[0].t_ms < w[1].t_ms));
        assert_eq!(*s.last().unwrap(), at(t, n, None));
        let iv = tl.to_json(None)["interval_ms"].as_u64().unwrap();
        assert_eq!(iv, 100 << 6, "an hour over 1024 samples of 100 ms doubled");
    }

    #[test]
    fn nothing_after_the_finish_and_a_close_finish_replaces_the_last() {
        let mut tl = Timeline::new();
        tl.sample(at(0.0, 0, Some(1)));
        tl.sample(at(100.0, 1, Some(3)));
        tl.finish(at(100.05, 2, Some(0)));
        assert_eq!(tl.samples().len(), 2);
        assert_eq!(tl.samples()[1], at(100.05, 2, Some(3)));
        tl.sample(at(500.0, 9, None));
        tl.finish(at(600.0, 9, None));
        assert_eq!(tl.samples().len(), 2);
        assert!(!tl.due(1e9));
        assert_eq!(tl.next_due_ms(), None);
    }

    #[test]
    fn events_are_capped_and_the_rest_counted() {
        let mut tl = Timeline::new();
        for i in 0..MAX_EVENTS + 5 {
            tl.event(i as f64, EventKind::Break);
        }
        // Breaks stop short of the cap: the end still has room.
        tl.event(1000.0, EventKind::Completed);
        let j = tl.to_json(None);
        let ev = j["events"].as_array().unwrap();
        assert_eq!(ev.len(), MAX_EVENTS - END_ROOM + 1);
        assert_eq!(j["events_dropped"], END_ROOM as u64 + 5);
        assert_eq!(ev[ev.len() - 1]["kind"], "completed");
        for i in 0..MAX_EVENTS {
            tl.event(2000.0 + i as f64, EventKind::Postcopy);
        }
        let j = tl.to_json(None);
        assert_eq!(j["events"].as_array().unwrap().len(), MAX_EVENTS);
    }

    #[test]
    fn an_unfinished_timeline_ends_with_now_and_a_long_one_keeps_its_start() {
        let mut tl = Timeline::new();
        tl.sample(at(0.0, 0, Some(0)));
        tl.sample(at(100.0, 1, Some(1)));
        let j = tl.to_json(Some(at(150.0, 5, Some(2))));
        let s = j["samples"].as_array().unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[2]["precopy"], 5);
        assert_eq!(tl.samples().len(), 2, "not stored");
        // Too close to the last, or finished: not added.
        assert_eq!(
            tl.to_json(Some(at(100.05, 5, None)))["samples"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        tl.finish(at(200.0, 6, Some(0)));
        assert_eq!(
            tl.to_json(Some(at(300.0, 7, None)))["samples"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        // However long, the first sample stays.
        let mut tl = Timeline::new();
        for i in 0..10 * MAX_SAMPLES as u64 {
            tl.sample(at(i as f64 * 100.0 * 16.0, i, None));
        }
        assert_eq!(tl.samples()[0].t_ms, 0.0);
    }

    #[test]
    fn json_shape() {
        let mut tl = Timeline::new();
        tl.event(0.04, EventKind::Precopy);
        tl.sample(at(12.345, 1, Some(2)));
        tl.event(20.0, EventKind::Switchover);
        tl.finish(at(130.0, 4, None));
        let j = tl.to_json(None);
        let want = json!({
            "interval_ms": 100,
            "samples": [
                {"t_ms": 12.3, "precopy": 1, "urgent": 2, "background": 3, "waiting": 2},
                {"t_ms": 130.0, "precopy": 4, "urgent": 8, "background": 12, "waiting": null},
            ],
            "events": [
                {"t_ms": 0.0, "kind": "precopy"},
                {"t_ms": 20.0, "kind": "switchover"},
            ],
            "events_dropped": 0,
        });
        assert_eq!(j, want);
        let kinds = [
            EventKind::Precopy,
            EventKind::Switchover,
            EventKind::Postcopy,
            EventKind::Break,
            EventKind::Recovery,
            EventKind::Completed,
            EventKind::Failed,
        ];
        let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            [
                "precopy",
                "switchover",
                "postcopy",
                "break",
                "recovery",
                "completed",
                "failed"
            ]
        );
    }
}
