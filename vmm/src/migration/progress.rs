//! What a migration has done so far, for the terminal, `status` and the report. Both
//! sides keep one; counters mean "sent" on the source and "received" on the
//! destination.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

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
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves to `p`, recording switch-over and completion times.
    pub fn set_phase(&self, p: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = p;
        let mut t = self.times();
        match p {
            Phase::Switchover => t.switchover = Some(Instant::now()),
            Phase::Completed => t.completed = Some(Instant::now()),
            _ => {}
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
