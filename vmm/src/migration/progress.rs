//! What a migration has done so far, for the terminal, `status` and the report. Both
//! sides keep one; counters mean "sent" on the source and "received" on the
//! destination. Its [`Timeline`] holds the same counters over time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use super::timeline::{EventKind, Sample, Timeline};

/// Which end of the migration this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sends the guest.
    Source,
    /// Receives it.
    Destination,
}

/// Where the migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Opening the connections.
    Connecting,
    /// Sending memory while the guest runs on the source.
    Precopy,
    /// vCPUs stopped on the source; state on its way.
    Switchover,
    /// The guest runs on the destination; pages follow.
    Postcopy,
    /// The connection broke in postcopy; waiting for it to come back.
    PostcopyPaused,
    /// Every page has arrived.
    Completed,
    /// Ended without moving the guest.
    Failed,
}

impl Phase {
    /// The name users see.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Precopy => "precopy",
            Phase::Switchover => "switchover",
            Phase::Postcopy => "postcopy",
            Phase::PostcopyPaused => "postcopy-paused",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
        }
    }
}

/// The source's count of pages sent once, sent again (and why), and of requests the
/// stream answered.
#[derive(Default)]
pub struct Resends {
    /// Pages sent at least once.
    pub distinct: AtomicU64,
    /// Pages sent again because the guest wrote them after they were sent (precopy).
    pub dirtied: AtomicU64,
    /// Pages sent again because the destination lacked them after a break.
    pub lost: AtomicU64,
    /// Urgent requests for a page the stream had already sent (or was sending): not
    /// sent again, the stream's copy answers them.
    pub answered_by_stream: AtomicU64,
}

#[derive(Default)]
struct Times {
    switchover: Option<Instant>,
    completed: Option<Instant>,
    /// Source: when the last vCPU stopped (wall clock, to compare across processes).
    source_stop: Option<SystemTime>,
    last_error: Option<String>,
    /// The switch-over's steps as they happened here (wall clock, to set against the
    /// source's stop): what the downtime consists of.
    marks: Vec<(&'static str, SystemTime)>,
}

/// A migration's progress.
pub struct Progress {
    /// Source or destination.
    pub role: Role,
    /// The other end (address).
    pub peer: String,
    /// Pages of guest RAM.
    pub total_pages: u64,
    /// When the migration began.
    pub started: Instant,
    phase: Mutex<Phase>,
    times: Mutex<Times>,
    /// Pages moved before switch-over (all precopy rounds).
    pub precopy_pages: AtomicU64,
    /// Pages moved because the destination asked.
    pub urgent_pages: AtomicU64,
    /// Pages moved by the background stream after switch-over.
    pub background_pages: AtomicU64,
    /// Of all pages moved, those sent as "all zeros".
    pub zero_pages: AtomicU64,
    /// Pages the destination asked for.
    pub requested: AtomicU64,
    /// Bytes of frames moved.
    pub bytes: AtomicU64,
    /// Precopy rounds finished.
    pub precopy_rounds: AtomicU64,
    /// Pages dropped at switch-over (written again after their precopy copy).
    pub discarded: AtomicU64,
    /// Pages sent with the switch-over because the vCPUs' page walk and event delivery
    /// need them (rule 7: a wait for one of those must never be left to the network).
    pub critical: AtomicU64,
    /// Times the connection broke.
    pub breaks: AtomicU64,
    /// Times the migration resumed after a break.
    pub recoveries: AtomicU64,
    /// Frames refused (bad checksum, bad format).
    pub bad_frames: AtomicU64,
    /// Source: pages sent once and again.
    pub resends: Resends,
    /// Milliseconds since `started` of the last page moved.
    last_page_ms: AtomicU64,
    recover: (Mutex<bool>, Condvar),
    /// The source's current connections: `migrate-recover` shuts them down, so a
    /// thread blocked on a silent link gives up at once and reconnects.
    links: Mutex<Vec<std::net::TcpStream>>,
    /// `migrate-cancel` was asked for (honoured only before the destination started).
    cancel: std::sync::atomic::AtomicBool,
    timeline: Mutex<Timeline>,
    /// Microseconds since `started` when the next sample is due (`u64::MAX`: none
    /// will be): checked without the timeline's lock.
    next_sample_us: AtomicU64,
}

impl Progress {
    /// A migration starting now.
    pub fn new(role: Role, peer: String, total_pages: u64) -> Self {
        Progress {
            role,
            peer,
            total_pages,
            started: Instant::now(),
            phase: Mutex::new(Phase::Connecting),
            times: Mutex::new(Times::default()),
            precopy_pages: AtomicU64::new(0),
            urgent_pages: AtomicU64::new(0),
            background_pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            precopy_rounds: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            critical: AtomicU64::new(0),
            breaks: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            resends: Resends::default(),
            last_page_ms: AtomicU64::new(0),
            recover: (Mutex::new(false), Condvar::new()),
            links: Mutex::new(Vec::new()),
            cancel: std::sync::atomic::AtomicBool::new(false),
            timeline: Mutex::new(Timeline::new()),
            next_sample_us: AtomicU64::new(0),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every page is here: a postcopy (running or paused) is complete. Called by the
    /// fault loop as it installs the last page, so a guest that ends right after finds
    /// its migration complete; false if the migration was in another phase.
    pub fn complete_postcopy(&self) -> bool {
        let done = matches!(self.phase(), Phase::Postcopy | Phase::PostcopyPaused);
        if done {
            self.set_phase(Phase::Completed);
        }
        done
    }

    /// Moves to `p`, recording switch-over and completion times, and on a change the
    /// timeline's event (a break's is [`Progress::broke`]'s; the way back from one is a
    /// recovery, not a second start of postcopy) and, at the end, its last sample.
    /// `Completed` is final: every page is where it must be, whatever comes after.
    pub fn set_phase(&self, p: Phase) {
        let old = {
            let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
            if *phase == Phase::Completed {
                return;
            }
            std::mem::replace(&mut *phase, p)
        };
        {
            let mut t = self.times();
            match p {
                Phase::Switchover => t.switchover = Some(Instant::now()),
                Phase::Completed => t.completed = Some(Instant::now()),
                _ => {}
            }
        }
        if old == p {
            return;
        }
        let kind = match p {
            Phase::Connecting | Phase::PostcopyPaused => return,
            Phase::Postcopy if old == Phase::PostcopyPaused => return,
            Phase::Precopy => EventKind::Precopy,
            Phase::Switchover => EventKind::Switchover,
            Phase::Postcopy => EventKind::Postcopy,
            Phase::Completed => EventKind::Completed,
            Phase::Failed => EventKind::Failed,
        };
        let mut tl = self.timeline();
        let t = self.now_ms();
        tl.event(t, kind);
        if matches!(p, Phase::Completed | Phase::Failed) {
            // A destination's vCPUs wait for nothing once every page is here, and
            // never ran if it failed.
            let waiting = (self.role == Role::Destination).then_some(0);
            tl.finish(self.snapshot(t, waiting));
            self.next_sample_us.store(u64::MAX, Ordering::Relaxed);
        }
    }

    /// The connection broke: counts it, records it and pauses postcopy.
    pub fn broke(&self) {
        // Every page is here already: a connection lost now breaks nothing.
        if self.phase() == Phase::Completed {
            return;
        }
        self.breaks.fetch_add(1, Ordering::Relaxed);
        self.timeline().event(self.now_ms(), EventKind::Break);
        self.set_phase(Phase::PostcopyPaused);
    }

    /// The migration resumed after a break: counts and records it (the caller sets the
    /// phase).
    pub fn recovered(&self) {
        if self.phase() == Phase::Completed {
            return;
        }
        self.recoveries.fetch_add(1, Ordering::Relaxed);
        self.timeline().event(self.now_ms(), EventKind::Recovery);
    }

    /// True if [`Progress::sample`] would keep a sample now: one clock read and one
    /// load, so that a caller can skip working out `waiting` most turns.
    pub fn sample_due(&self) -> bool {
        let now = self.started.elapsed().as_micros() as u64;
        now >= self.next_sample_us.load(Ordering::Relaxed)
    }

    /// Adds a sample to the timeline if one is due (cheap otherwise). `waiting`: the
    /// vCPUs waiting for a page now (a destination's; `None` on a source).
    pub fn sample(&self, waiting: Option<u64>) {
        if !self.sample_due() {
            return;
        }
        let mut tl = self.timeline();
        // Under the lock: samples from two threads stay in time order.
        let t = self.now_ms();
        tl.sample(self.snapshot(t, waiting));
        let next = tl.next_due_ms().map_or(u64::MAX, |ms| (ms * 1000.0) as u64);
        self.next_sample_us.store(next, Ordering::Relaxed);
    }

    /// The report's `migration.timeline` (not in `status`: up to 100 KB a poll),
    /// ending with the counts now, `waiting` vCPUs waiting, if the migration has not
    /// ended.
    pub fn timeline_json(&self, waiting: Option<u64>) -> Value {
        let tl = self.timeline();
        let now = self.snapshot(self.now_ms(), waiting);
        tl.to_json(Some(now))
    }

    fn timeline(&self) -> std::sync::MutexGuard<'_, Timeline> {
        self.timeline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the migration began.
    fn now_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    /// The counters at `t_ms`.
    fn snapshot(&self, t_ms: f64, waiting: Option<u64>) -> Sample {
        let ld = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Sample {
            t_ms,
            precopy: ld(&self.precopy_pages),
            urgent: ld(&self.urgent_pages),
            background: ld(&self.background_pages),
            waiting,
        }
    }

    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True once the guest may be running on the destination: the source must never
    /// run it again.
    pub fn guest_moved(&self) -> bool {
        self.role == Role::Source
            && matches!(
                self.phase(),
                Phase::Postcopy | Phase::PostcopyPaused | Phase::Completed
            )
    }

    /// True on a source from the moment its vCPUs are being stopped for the switch-over:
    /// nothing but the migration itself may let them run again.
    pub fn vcpus_held(&self) -> bool {
        self.role == Role::Source
            && matches!(
                self.phase(),
                Phase::Switchover | Phase::Postcopy | Phase::PostcopyPaused | Phase::Completed
            )
    }

    /// Records an error (the last one is shown by `status` and the report).
    pub fn note_error(&self, e: &str) {
        self.times().last_error = Some(e.to_string());
    }

    /// Records when the source's vCPUs stopped.
    pub fn set_source_stop(&self, t: SystemTime) {
        self.times().source_stop = Some(t);
    }

    /// Records that switch-over step `what` is done now (kept once per name: a retried
    /// switch-over keeps its first marks).
    pub fn mark(&self, what: &'static str) {
        let now = SystemTime::now();
        let mut t = self.times();
        if t.marks.len() < 16 && !t.marks.iter().any(|(w, _)| *w == what) {
            t.marks.push((what, now));
        }
    }

    /// When the source's vCPUs stopped, if known.
    pub fn source_stop(&self) -> Option<SystemTime> {
        self.times().source_stop
    }

    /// Counts one page moved (`urgent`, before switch-over or background) of `bytes`.
    pub fn count_page(&self, precopy: bool, urgent: bool, zero: bool, bytes: u64) {
        let c = if precopy {
            &self.precopy_pages
        } else if urgent {
            &self.urgent_pages
        } else {
            &self.background_pages
        };
        c.fetch_add(1, Ordering::Relaxed);
        if zero {
            self.zero_pages.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.last_page_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Pages moved so far.
    pub fn pages_moved(&self) -> u64 {
        self.precopy_pages.load(Ordering::Relaxed)
            + self.urgent_pages.load(Ordering::Relaxed)
            + self.background_pages.load(Ordering::Relaxed)
    }

    /// `migrate-cancel`: on a source in switch-over (the destination has not confirmed
    /// it started the guest), give up and let the guest go on here. The operator takes
    /// the risk that the destination did start it and its answer was lost.
    pub fn request_cancel(&self) -> Result<(), String> {
        if self.role != Role::Source || self.phase() != Phase::Switchover {
            return Err(format!(
                "migrate-cancel is for a source in switch-over; this migration is {}",
                self.phase().name()
            ));
        }
        self.cancel.store(true, Ordering::Release);
        self.request_recover();
        Ok(())
    }

    /// True once `migrate-cancel` was asked for.
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Records the connections of the current attempt (see [`Progress::request_recover`]).
    pub fn set_links(&self, links: Vec<std::net::TcpStream>) {
        *self.links.lock().unwrap_or_else(|e| e.into_inner()) = links;
    }

    /// Asks the migration to reconnect now (`migrate-recover`): a paused one tries at
    /// once; one on a link that may be silently dead drops it first (on a destination
    /// that makes the source reconnect).
    pub fn request_recover(&self) {
        if matches!(self.phase(), Phase::Postcopy | Phase::Switchover) {
            for s in self.links.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        let (m, cv) = &self.recover;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Waits up to `d` or until recovery is asked for; true if it was.
    pub fn wait_recover(&self, d: Duration) -> bool {
        let (m, cv) = &self.recover;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        if !*g {
            g = match cv.wait_timeout(g, d) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        std::mem::replace(&mut *g, false)
    }

    /// One line for the terminal.
    pub fn line(&self, extra: &str) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let moved = self.pages_moved();
        let mib = self.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
        let idle_ms = (self.started.elapsed().as_millis() as u64)
            .saturating_sub(self.last_page_ms.load(Ordering::Relaxed));
        let stall = if idle_ms >= 500 && !matches!(self.phase(), Phase::Completed) {
            format!(", no page for {:.1} s", idle_ms as f64 / 1000.0)
        } else {
            String::new()
        };
        format!(
            "ufvmm: migration {} {:.1}s: {moved} pages {} ({} precopy, {} urgent, {} background) \
             of {}, {} requested, {mib:.1} MiB at {:.1} MiB/s{stall}{extra}",
            self.phase().name(),
            secs,
            if self.role == Role::Source {
                "sent"
            } else {
                "received"
            },
            self.precopy_pages.load(Ordering::Relaxed),
            self.urgent_pages.load(Ordering::Relaxed),
            self.background_pages.load(Ordering::Relaxed),
            self.total_pages,
            self.requested.load(Ordering::Relaxed),
            mib / secs.max(1e-3),
        )
    }

    /// The `migration` object of `status` and the report (`downtime_ms` is filled in
    /// by the destination, which sees both ends of it).
    pub fn to_json(&self, downtime_ms: Option<f64>) -> Value {
        let t = self.times();
        let ms = |i: Option<Instant>| {
            i.map(|i| i.saturating_duration_since(self.started).as_secs_f64() * 1000.0)
        };
        let ld = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // Each step in ms after the source's stop (negative: before it).
        let marks: serde_json::Map<String, Value> = match t.source_stop {
            Some(stop) => t
                .marks
                .iter()
                .map(|(w, at)| ((*w).to_string(), json!(wall_ms(stop, *at))))
                .collect(),
            None => serde_json::Map::new(),
        };
        let mut v = json!({
            "role": if self.role == Role::Source { "source" } else { "destination" },
            "peer": self.peer,
            "state": self.phase().name(),
            "elapsed_ms": self.started.elapsed().as_millis() as u64,
            "switchover_at_ms": ms(t.switchover),
            "total_ms": ms(t.completed),
            "downtime_ms": downtime_ms,
            "switchover_steps_ms": marks,
            "pages": {
                "total": self.total_pages,
                "precopy": ld(&self.precopy_pages),
                "urgent": ld(&self.urgent_pages),
                "background": ld(&self.background_pages),
                "zero": ld(&self.zero_pages),
                "requested": ld(&self.requested),
                "discarded": ld(&self.discarded),
                "critical": ld(&self.critical),
            },

            "precopy_rounds": ld(&self.precopy_rounds),
            "bytes": ld(&self.bytes),
            "connection_breaks": ld(&self.breaks),
            "recoveries": ld(&self.recoveries),
            "bad_frames": ld(&self.bad_frames),
            "last_error": t.last_error,
        });
        if self.role == Role::Source {
            v["sent"] = json!({
                "pages": ld(&self.resends.distinct),
                "resent_dirtied": ld(&self.resends.dirtied),
                "resent_lost": ld(&self.resends.lost),
                "requests_answered_by_stream": ld(&self.resends.answered_by_stream),
            });
        }
        v
    }
}

/// Paces the progress lines: one a second.
pub struct Ticker {
    next: Instant,
}

impl Ticker {
    /// The first line is due in a second.
    pub fn new() -> Self {
        Ticker {
            next: Instant::now() + Duration::from_secs(1),
        }
    }

    /// True once a second (a late check does not make up for missed ones).
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        if now < self.next {
            return false;
        }
        self.next = now + Duration::from_secs(1);
        true
    }
}

impl Default for Ticker {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds from `a` to `b` (wall clock), negative if `b` is earlier.
pub fn wall_ms(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(p: &Progress) -> Vec<String> {
        let j = p.timeline_json(None);
        j["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    #[test]
    fn phase_changes_breaks_and_recoveries_become_events_and_the_end_a_last_sample() {
        let p = Progress::new(Role::Destination, "test".into(), 8);
        p.set_phase(Phase::Precopy);
        p.set_phase(Phase::Precopy); // no change: no second event
        p.sample(Some(0));
        p.precopy_pages.store(3, Ordering::Relaxed);
        p.set_phase(Phase::Switchover);
        p.set_phase(Phase::Postcopy);
        p.broke();
        p.broke(); // a second break while paused still counts
        assert_eq!(p.phase(), Phase::PostcopyPaused);
        p.recovered();
        p.set_phase(Phase::Postcopy); // back from a break: the recovery says so
        p.urgent_pages.store(2, Ordering::Relaxed);
        p.background_pages.store(3, Ordering::Relaxed);
        // (A last sample within 0.1 ms of the one before would replace it.)
        std::thread::sleep(Duration::from_millis(1));
        p.set_phase(Phase::Completed);
        p.urgent_pages.store(9, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(110));
        assert!(!p.sample_due());
        p.sample(Some(5)); // after the end: not kept
        assert_eq!(
            kinds(&p),
            [
                "precopy",
                "switchover",
                "postcopy",
                "break",
                "break",
                "recovery",
                "completed"
            ]
        );
        let j = p.to_json(None);
        assert_eq!(j["connection_breaks"], 2);
        assert_eq!(j["recoveries"], 1);
        assert!(j.get("timeline").is_none(), "status carries no timeline");
        let j = p.timeline_json(Some(5));
        let s = j["samples"].as_array().expect("samples");
        assert_eq!(s.len(), 2, "{j}");
        assert_eq!(s[0]["precopy"], 0);
        let last = &s[1];
        assert_eq!(
            (&last["precopy"], &last["urgent"], &last["background"]),
            (&json!(3), &json!(2), &json!(3))
        );
        assert_eq!(last["waiting"], 0);
    }

    #[test]
    fn a_source_samples_without_waiting_and_a_failure_ends_its_timeline() {
        let p = Progress::new(Role::Source, "test".into(), 8);
        assert!(p.sample_due());
        p.sample(None);
        assert!(!p.sample_due(), "the next is 100 ms away");
        std::thread::sleep(Duration::from_millis(1));
        p.set_phase(Phase::Failed);
        let j = p.timeline_json(None);
        let s = j["samples"].as_array().expect("samples");
        assert_eq!(s.len(), 2, "{j}");
        assert!(s.iter().all(|s| s["waiting"].is_null()), "{j}");
        assert_eq!(kinds(&p), ["failed"]);
    }
}
