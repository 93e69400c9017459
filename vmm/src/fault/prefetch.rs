//! Read-ahead and background fill: the policies that fetch pages nobody faulted on yet.
//!
//! Both are off by default, so that a fault's cost is measured per fault.
//!
//! - `--prefetch N|auto` ([`Prefetch`]): after a sequential fault, fetch the pages that
//!   follow. The model is the kernel's read-ahead (mm/readahead.c): each faulting
//!   thread (a vCPU) is a stream; a fault on the page after the stream's last fault, or
//!   on a page the stream already fetched ahead, is sequential and keeps a window of
//!   pages fetched ahead of it; any other fault collapses the window and fetches
//!   nothing. `N` keeps the window at N pages; `auto` starts it at
//!   [`AUTO_START`] pages and doubles it on each sequential fault up to [`AUTO_MAX`].
//!   VMM threads' requests never trigger it.
//! - `--background RATE` ([`Background`]): a local source's missing pages, low to high,
//!   at RATE, a few booked at a time.
//!
//! Every such page goes through the link model; the fault loop gives faults priority
//! over them on the link (see `ahead`).

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::abi::PAGE_SIZE;
use crate::config::ConfigError;
use crate::memory::PageStateMap;

/// The read-ahead window `auto` starts with, in pages.
pub const AUTO_START: usize = 4;
/// The largest window `auto` grows to, in pages (1 MiB).
pub const AUTO_MAX: usize = 256;
/// The largest fixed window accepted, in pages (4 MiB).
pub const MAX_PREFETCH: usize = 1024;
/// Streams tracked at once (one per faulting vCPU thread; the least recent goes).
const STREAMS: usize = 64;

/// The `--prefetch` policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefetch {
    /// Only the faulting page (`--prefetch 0`, `off`, the default).
    #[default]
    Off,
    /// A window of this many pages after each sequential fault.
    Fixed(usize),
    /// A window that grows while faults are sequential.
    Auto,
}

impl std::str::FromStr for Prefetch {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::Policy {
            flag: "--prefetch",
            value: s.to_string(),
            why,
        };
        match s {
            "off" => return Ok(Prefetch::Off),
            "auto" => return Ok(Prefetch::Auto),
            _ => {}
        }
        let n: usize = s.parse().map_err(|_| {
            bad(format!(
                "expected a number of pages (0..={MAX_PREFETCH}), 'auto' or 'off'"
            ))
        })?;
        match n {
            0 => Ok(Prefetch::Off),
            n if n <= MAX_PREFETCH => Ok(Prefetch::Fixed(n)),
            _ => Err(bad(format!(
                "at most {MAX_PREFETCH} pages ({} MiB)",
                (MAX_PREFETCH * PAGE_SIZE as usize) >> 20
            ))),
        }
    }
}

impl Prefetch {
    /// As the report states it: "off", "auto" or the number of pages.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Prefetch::Off => "off".into(),
            Prefetch::Auto => "auto".into(),
            Prefetch::Fixed(n) => n.into(),
        }
    }
}

/// A `--background` rate: pages per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackgroundRate {
    /// Pages per second (at least 1), counted in 4 KiB pages until
    /// [`BackgroundRate::in_pages_of`] says the RAM page size.
    pub pages_per_s: f64,
    /// The rate asked for in bytes per second, if it was (`64MiB/s`): it turns into
    /// pages of the RAM page size then.
    pub bytes_per_s: Option<f64>,
}

impl BackgroundRate {
    /// The rate in pages of `page_size` bytes: a byte rate stays that byte rate (at
    /// least one page a second), a page rate stays that page rate.
    pub fn in_pages_of(self, page_size: u64) -> Self {
        match self.bytes_per_s {
            Some(b) => BackgroundRate {
                pages_per_s: (b / page_size as f64).max(1.0),
                bytes_per_s: Some(b),
            },
            None => self,
        }
    }
}

/// The highest background rate accepted, in pages per second (about 4 TiB/s: no cap
/// in practice, but the arithmetic stays finite).
const MAX_RATE: f64 = 1e9;

impl std::str::FromStr for BackgroundRate {
    type Err = ConfigError;

    /// `64MiB/s` (bytes, with the link spec's units) or `5000pages/s`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Policy {
            flag: "--background",
            value: s.to_string(),
            why: why.to_string(),
        };
        let (pages_per_s, bytes_per_s) = match s.strip_suffix("pages/s") {
            Some(n) => (
                n.parse::<u64>()
                    .map_err(|_| bad("expected e.g. 64MiB/s or 5000pages/s"))?
                    as f64,
                None,
            ),
            None => {
                let b = crate::source::link::parse_bandwidth(s).ok_or_else(|| {
                    bad("expected e.g. 64MiB/s (B, KB, MB, GB, KiB, MiB, GiB per s) or 5000pages/s")
                })? as f64;
                (b / PAGE_SIZE as f64, Some(b))
            }
        };
        if pages_per_s < 1.0 {
            return Err(bad("at least one page (4 KiB) per second"));
        }
        if pages_per_s > MAX_RATE {
            return Err(bad("at most 1000000000 pages per second"));
        }
        Ok(BackgroundRate {
            pages_per_s,
            bytes_per_s,
        })
    }
}

/// The policies of one fault loop.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Policies {
    /// Read-ahead after sequential faults.
    pub prefetch: Prefetch,
    /// Background fill of a local source, if any.
    pub background: Option<BackgroundRate>,
}

/// What the report says of the policies: set once by the fault loop, counted by it.
#[derive(Default)]
pub struct PolicyStats {
    /// The policies in force (unset: both off).
    pub policies: OnceLock<Policies>,
    /// Pages installed because read-ahead fetched them.
    pub prefetched: AtomicU64,
    /// Pages installed by the background fill.
    pub background: AtomicU64,
}

impl PolicyStats {
    /// The report's `policy` object.
    pub fn to_json(&self) -> serde_json::Value {
        let p = self.policies.get().copied().unwrap_or_default();
        serde_json::json!({
            "prefetch": p.prefetch.to_json(),
            "background_pages_per_s": p.background.map(|b| b.pages_per_s),
        })
    }
}

/// One faulting thread's read-ahead state.
#[derive(Clone, Copy)]
struct Stream {
    tid: i32,
    /// The page of its last fault.
    last: usize,
    /// Pages below this were fetched ahead already.
    ahead_end: usize,
    window: usize,
    /// For replacing the least recent stream.
    used: u64,
}

/// Read-ahead state of every stream.
pub struct Readahead {
    policy: Prefetch,
    streams: Vec<Stream>,
    clock: u64,
}

impl Readahead {
    /// Read-ahead under `policy`.
    pub fn new(policy: Prefetch) -> Self {
        Readahead {
            policy,
            streams: Vec::new(),
            clock: 0,
        }
    }

    /// True if read-ahead is on.
    pub fn enabled(&self) -> bool {
        self.policy != Prefetch::Off
    }

    fn start_window(&self) -> usize {
        match self.policy {
            Prefetch::Off => 0,
            Prefetch::Fixed(n) => n,
            Prefetch::Auto => AUTO_START,
        }
    }

    /// Thread `tid` faulted on page `idx` of `npages`: the pages to fetch ahead of it
    /// (some may be requested already; the caller skips those). Empty unless the fault
    /// is sequential for its stream.
    pub fn on_fault(&mut self, tid: i32, idx: usize, npages: usize) -> Range<usize> {
        if !self.enabled() {
            return 0..0;
        }
        self.clock += 1;
        let start = self.start_window();
        let clock = self.clock;
        let s = match self.streams.iter().position(|s| s.tid == tid) {
            Some(i) => &mut self.streams[i],
            None => {
                let fresh = Stream {
                    tid,
                    last: idx,
                    ahead_end: idx + 1,
                    window: start,
                    used: clock,
                };
                if self.streams.len() < STREAMS {
                    self.streams.push(fresh);
                } else if let Some(old) = self.streams.iter_mut().min_by_key(|s| s.used) {
                    *old = fresh;
                }
                return 0..0;
            }
        };
        s.used = clock;
        let sequential = idx > s.last && idx <= s.ahead_end.max(s.last + 1);
        if !sequential {
            s.last = idx;
            s.ahead_end = idx + 1;
            s.window = start;
            return 0..0;
        }
        if self.policy == Prefetch::Auto && s.ahead_end > s.last + 1 {
            // The last window was used: grow (the first sequential fault uses the
            // start window as it is).
            s.window = (s.window * 2).min(AUTO_MAX);
        }
        s.last = idx;
        let from = s.ahead_end.max(idx + 1).min(npages);
        let to = (idx + 1 + s.window).min(npages);
        s.ahead_end = to.max(from);
        from..to.max(from)
    }
}

/// Most background pages on the link at once: a few, so faults and read-ahead find the
/// wire nearly free and memory stays bounded.
pub const BACKGROUND_QUEUED: usize = 16;
/// Most page states looked at per turn for the next missing page.
const SCAN_PER_TURN: usize = 4096;
/// Most credit saved up, in pages: a loop that was busy does not burst afterwards.
const BURST: f64 = 32.0;

/// The background fill's pacing and cursor.
pub struct Background {
    rate: f64,
    cursor: usize,
    credit: f64,
    last: Instant,
    /// Every page was looked at (or the link will deliver nothing more).
    pub done: bool,
}

impl Background {
    /// A fill at `rate` starting now from page 0.
    pub fn new(rate: BackgroundRate, now: Instant) -> Self {
        Background {
            rate: rate.pages_per_s,
            cursor: 0,
            credit: 1.0,
            last: now,
            done: false,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.credit = (self.credit + dt * self.rate).min(BURST);
        self.last = now;
    }

    /// Up to `room` missing pages, moved to `Requested`, that the rate allows now.
    pub fn take(&mut self, now: Instant, pages: &PageStateMap, room: usize) -> Vec<usize> {
        self.refill(now);
        let mut out = Vec::new();
        let mut looked = 0;
        while !self.done && self.credit >= 1.0 && out.len() < room && looked < SCAN_PER_TURN {
            if self.cursor >= pages.len() {
                self.done = true;
                break;
            }
            if pages.try_request(self.cursor) {
                out.push(self.cursor);
                self.credit -= 1.0;
            }
            self.cursor += 1;
            looked += 1;
        }
        out
    }

    /// How long until the next page may go (`None` when done). Zero when the scan
    /// stopped at its per-turn limit with credit left.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        if self.done {
            return None;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        let missing = 1.0 - (self.credit + dt * self.rate);
        if missing <= 0.0 {
            return Some(Duration::ZERO);
        }
        Some(Duration::from_secs_f64(missing / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PageState;

    #[test]
    fn parses_prefetch() {
        assert_eq!("0".parse::<Prefetch>(), Ok(Prefetch::Off));
        assert_eq!("off".parse::<Prefetch>(), Ok(Prefetch::Off));
        assert_eq!("auto".parse::<Prefetch>(), Ok(Prefetch::Auto));
        assert_eq!("64".parse::<Prefetch>(), Ok(Prefetch::Fixed(64)));
        for bad in ["-1", "10000000", "1025", "", "lots", "1.5"] {
            assert!(bad.parse::<Prefetch>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn parses_background() {
        let r: BackgroundRate = "64MiB/s".parse().unwrap();
        assert_eq!(r.pages_per_s, 16384.0);
        let p: BackgroundRate = "5000pages/s".parse().unwrap();
        assert_eq!(p.pages_per_s, 5000.0);
        for bad in [
            "fast",
            "",
            "100B/s",
            "0pages/s",
            "-5pages/s",
            "64MiB",
            "1GiB",
        ] {
            assert!(bad.parse::<BackgroundRate>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn sequential_faults_grow_the_window_and_random_ones_collapse_it() {
        let mut r = Readahead::new(Prefetch::Auto);
        assert_eq!(r.on_fault(1, 10, 10_000), 0..0); // first fault: no history
        assert_eq!(r.on_fault(1, 11, 10_000), 12..16); // sequential: the start window
        assert_eq!(r.on_fault(1, 16, 10_000), 17..25); // past the window: doubled
        assert_eq!(r.on_fault(1, 20, 10_000), 25..37); // inside it (a page in flight)
        assert_eq!(r.on_fault(1, 5000, 10_000), 0..0); // random: collapse
        assert_eq!(r.on_fault(1, 5001, 10_000), 5002..5006);
        // Another thread is another stream.
        assert_eq!(r.on_fault(2, 5002, 10_000), 0..0);
        // The window stops at the end of RAM and at AUTO_MAX.
        let mut p = 100;
        for _ in 0..20 {
            let w = r.on_fault(1, p, 10_000);
            p = w.end.max(p + 1);
            assert!(w.len() <= AUTO_MAX);
        }
        assert_eq!(r.on_fault(1, 9_999, 10_000), 0..0);
    }

    #[test]
    fn a_fixed_window_stays_fixed() {
        let mut r = Readahead::new(Prefetch::Fixed(8));
        assert_eq!(r.on_fault(7, 0, 100), 0..0);
        assert_eq!(r.on_fault(7, 1, 100), 2..10);
        assert_eq!(r.on_fault(7, 10, 100), 11..19);
        assert_eq!(r.on_fault(7, 95, 100), 0..0);
        assert_eq!(r.on_fault(7, 96, 100), 97..100);
        let mut off = Readahead::new(Prefetch::Off);
        assert_eq!(off.on_fault(7, 1, 100), 0..0);
        assert_eq!(off.on_fault(7, 2, 100), 0..0);
    }

    #[test]
    fn background_keeps_its_rate_and_skips_pages_in() {
        let pages = PageStateMap::new(100, PageState::Missing);
        pages.set(1, PageState::Present);
        let t0 = Instant::now();
        let mut b = Background::new(
            BackgroundRate {
                pages_per_s: 10.0,
                bytes_per_s: None,
            },
            t0,
        );
        assert_eq!(b.take(t0, &pages, 16), vec![0]);
        assert!(b.wait(t0).unwrap() > Duration::from_millis(90));
        // 0.5 s later: 5 pages, page 1 skipped.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(t1, &pages, 16), vec![2, 3, 4, 5, 6]);
        // Credit is capped: 100 s later, no more than the burst.
        let t2 = t1 + Duration::from_secs(100);
        assert_eq!(b.take(t2, &pages, 100).len(), BURST as usize);
        assert!(!b.done);
        let mut later = t2;
        let mut rest = 0;
        for _ in 0..10 {
            later += Duration::from_secs(100);
            rest += b.take(later, &pages, 100).len();
        }
        assert_eq!(rest, 100 - 2 - 5 - BURST as usize);
        assert!(b.done && b.wait(later).is_none());
    }
}
