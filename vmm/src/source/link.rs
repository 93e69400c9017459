//! A model of the network between the fault layer and a page source: latency,
//! bandwidth, windows in which nothing is delivered, and the stall that never ends.
//!
//! Spec grammar (comma-separated, any order):
//! `latency=2ms`, `bandwidth=200MiB/s`, `stall=5s@300ms` (from 300 ms after start,
//! deliver nothing for 5 s; repeatable), `stall=5s@N` (once N pages have arrived,
//! nothing more for 5 s; repeatable), `stall=forever@N` (deliver N pages, then
//! nothing) or `stall=forever@2s` (nothing after 2 s). A page is 4 KiB of data (the
//! proxy counts bytes). For `ufvmm link-proxy` only:
//! `disconnect@T` (drop the connection at time T) and `corrupt@T` (flip one byte of
//! the first data forwarded at or after T); both repeatable.

use std::time::{Duration, Instant};

use crate::config::{parse_duration, ConfigError};

/// One window in which the link delivers nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StallWindow {
    /// Offset from the link's start.
    pub start: Duration,
    /// How long it lasts.
    pub len: Duration,
}

/// A window in which the link delivers nothing, counted from the arrival of a number
/// of pages rather than from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageStallWindow {
    /// It begins when this many pages (4 KiB each of data) have arrived; 0 = at start.
    pub after_pages: u64,
    /// How long it lasts.
    pub len: Duration,
}

/// When the link stops for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forever {
    /// After this many pages.
    AfterPages(u64),
    /// After this much time.
    AfterTime(Duration),
}

/// A parsed `--link` spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkSpec {
    /// One-way delay added to every page.
    pub latency: Duration,
    /// Bytes per second; `None` = unlimited.
    pub bandwidth: Option<u64>,
    /// Windows with no delivery, sorted by start.
    pub stalls: Vec<StallWindow>,
    /// Windows with no delivery that begin after some pages, sorted by that count.
    pub page_stalls: Vec<PageStallWindow>,
    /// The stall that never ends, if any.
    pub forever: Option<Forever>,
    /// Times at which a proxied connection is dropped (sorted).
    pub disconnects: Vec<Duration>,
    /// Times at which one forwarded byte is flipped (sorted).
    pub corrupts: Vec<Duration>,
}

impl LinkSpec {
    /// True if the spec has events that only a connection can have (for `--link` on a
    /// VM's page source they mean nothing).
    pub fn has_connection_events(&self) -> bool {
        !self.disconnects.is_empty() || !self.corrupts.is_empty()
    }
}

/// Bytes per second from `200MiB/s` (B, KB, MB, GB, KiB, MiB, GiB per s); `None` if it
/// does not parse or is zero.
pub fn parse_bandwidth(v: &str) -> Option<u64> {
    let v = v.strip_suffix("/s")?;
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit {
        "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul).filter(|&b| b > 0)
}

impl std::str::FromStr for LinkSpec {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::Link {
            spec: spec.to_string(),
            why,
        };
        let mut l = LinkSpec::default();
        if spec.trim().is_empty() {
            return Err(bad("empty spec".into()));
        }
        for item in spec.split(',') {
            let event = |at: &str| parse_duration(at).map_err(|e| bad(e.to_string()));
            if let Some(at) = item.strip_prefix("disconnect@") {
                l.disconnects.push(event(at)?);
                continue;
            }
            if let Some(at) = item.strip_prefix("corrupt@") {
                l.corrupts.push(event(at)?);
                continue;
            }
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("'{item}' is not key=value")))?;
            match k {
                "latency" => l.latency = parse_duration(v).map_err(|e| bad(e.to_string()))?,
                "bandwidth" => {
                    l.bandwidth = Some(parse_bandwidth(v).ok_or_else(|| {
                        bad(format!(
                            "bandwidth={v}: expected e.g. 200MiB/s (B, KB, MB, GB, KiB, MiB, GiB per s)"
                        ))
                    })?)
                }
                "stall" => {
                    let (len, at) = v
                        .split_once('@')
                        .ok_or_else(|| {
                            bad(format!("stall={v}: expected LEN@START, LEN@N or forever@N"))
                        })?;
                    if len == "forever" {
                        if l.forever.is_some() {
                            return Err(bad("more than one stall=forever".into()));
                        }
                        l.forever = Some(match at.parse::<u64>() {
                            Ok(n) => Forever::AfterPages(n),
                            Err(_) => Forever::AfterTime(
                                parse_duration(at).map_err(|e| bad(e.to_string()))?,
                            ),
                        });
                    } else {
                        let len = parse_duration(len).map_err(|e| bad(e.to_string()))?;
                        // A bare number counts pages, as in forever@N.
                        match at.parse::<u64>() {
                            Ok(after_pages) => l.page_stalls.push(PageStallWindow { after_pages, len }),
                            Err(_) => {
                                let start = parse_duration(at).map_err(|e| bad(e.to_string()))?;
                                l.stalls.push(StallWindow { start, len });
                            }
                        }
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key '{k}' (latency, bandwidth, stall, disconnect@T, corrupt@T)"
                    )))
                }
            }
        }
        l.stalls.sort_by_key(|w| w.start);
        l.page_stalls.sort_by_key(|w| w.after_pages);
        l.disconnects.sort();
        l.corrupts.sort();
        Ok(l)
    }
}

/// One transfer's place on the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Booking {
    /// When it starts on the wire (before that it can still be given up).
    pub send: Instant,
    /// When it arrives.
    pub due: Instant,
}

/// The link's running state: decides when each page arrives.
#[derive(Debug)]
pub struct LinkModel {
    spec: LinkSpec,
    start: Instant,
    /// When the wire is free again (offset from start).
    next_free: Duration,
    /// Bytes let through so far (`stall=forever@N` and `stall=LEN@N` count N pages of
    /// them).
    scheduled_bytes: u64,
    /// For each of `spec.page_stalls`, when it begins (offset from start), once its
    /// pages have been let through: the arrival of the last of them.
    page_stall_starts: Vec<Option<Duration>>,
}

impl LinkModel {
    /// A link that starts now.
    pub fn new(spec: LinkSpec, start: Instant) -> Self {
        // After 0 pages is at the start.
        let page_stall_starts = spec
            .page_stalls
            .iter()
            .map(|w| (w.after_pages == 0).then_some(Duration::ZERO))
            .collect();
        LinkModel {
            spec,
            start,
            next_free: Duration::ZERO,
            scheduled_bytes: 0,
            page_stall_starts,
        }
    }

    /// Moves `arrive` past every window it falls in, until it falls in none (a move can
    /// land it in another window).
    fn past_windows(&self, mut arrive: Duration) -> Duration {
        loop {
            let time = self.spec.stalls.iter().map(|w| (w.start, w.len));
            let pages = self
                .spec
                .page_stalls
                .iter()
                .zip(&self.page_stall_starts)
                .filter_map(|(w, s)| s.map(|s| (s, w.len)));
            let end = time
                .chain(pages)
                .map(|(start, len)| (start, start.saturating_add(len)))
                .find(|&(start, end)| arrive >= start && arrive < end);
            match end {
                Some((_, end)) => arrive = end,
                None => return arrive,
            }
        }
    }

    /// A link with no delay at all.
    pub fn ideal(start: Instant) -> Self {
        Self::new(LinkSpec::default(), start)
    }

    /// When a transfer of `bytes` asked for at `now` arrives; `None` = never.
    pub fn schedule(&mut self, now: Instant, bytes: u64) -> Option<Instant> {
        self.book(now, bytes).map(|b| b.due)
    }

    /// When the wire is free of everything booked so far (now or earlier if idle).
    pub fn free_at(&self) -> Instant {
        self.start + self.next_free
    }

    /// Books a transfer of `bytes` asked for at `now`: when it goes on the wire and when
    /// it arrives; `None` = never. Bookings of equal size are interchangeable: giving one
    /// page's booking to another page keeps every promise of the link.
    pub fn book(&mut self, now: Instant, bytes: u64) -> Option<Booking> {
        let t = now.saturating_duration_since(self.start);
        if let Some(Forever::AfterPages(n)) = self.spec.forever {
            if self.scheduled_bytes >= n.saturating_mul(crate::abi::PAGE_SIZE) {
                return None;
            }
        }
        let send = t.max(self.next_free);
        let xfer = match self.spec.bandwidth {
            Some(bw) => Duration::from_nanos((bytes as u128 * 1_000_000_000 / bw as u128) as u64),
            None => Duration::ZERO,
        };
        self.next_free = send + xfer;
        let arrive = self.past_windows(self.next_free + self.spec.latency);
        if let Some(Forever::AfterTime(after)) = self.spec.forever {
            if arrive >= after {
                return None;
            }
        }
        self.scheduled_bytes = self.scheduled_bytes.saturating_add(bytes);
        // The transfer that completes a window's pages starts it when it arrives.
        for (w, s) in self
            .spec
            .page_stalls
            .iter()
            .zip(&mut self.page_stall_starts)
        {
            if s.is_none()
                && self.scheduled_bytes >= w.after_pages.saturating_mul(crate::abi::PAGE_SIZE)
            {
                *s = Some(arrive);
            }
        }
        // Durations are capped at parse time; should the sum still not fit, never.
        Some(Booking {
            send: self.start.checked_add(send)?,
            due: self.start.checked_add(arrive)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_the_documented_forms() {
        let l: LinkSpec =
            "latency=2ms,bandwidth=200MiB/s,stall=5s@300ms,stall=1s@10s,stall=forever@7"
                .parse()
                .unwrap();
        assert_eq!(l.latency, ms(2));
        assert_eq!(l.bandwidth, Some(200 << 20));
        assert_eq!(l.stalls.len(), 2);
        assert_eq!(
            l.stalls[0],
            StallWindow {
                start: ms(300),
                len: ms(5000)
            }
        );
        assert_eq!(l.forever, Some(Forever::AfterPages(7)));
        let t: LinkSpec = "stall=forever@2s".parse().unwrap();
        assert_eq!(t.forever, Some(Forever::AfterTime(ms(2000))));
        let c: LinkSpec = "corrupt@2s,disconnect@1s,latency=1ms,disconnect@500ms"
            .parse()
            .unwrap();
        assert_eq!(c.disconnects, vec![ms(500), ms(1000)]);
        assert_eq!(c.corrupts, vec![ms(2000)]);
        assert!(c.has_connection_events() && !t.has_connection_events());
    }

    #[test]
    fn rejects_bad_specs() {
        for s in [
            "",
            "latency",
            "latency=2",
            "bandwidth=200",
            "bandwidth=0MiB/s",
            "bandwidth=5XB/s",
            "stall=5s",
            "stall=5s@x",
            "stall=forever@",
            "speed=1ms",
            "stall=forever@1,stall=forever@2",
            "disconnect@",
            "disconnect@soon",
            "corrupt",
        ] {
            assert!(s.parse::<LinkSpec>().is_err(), "accepted {s:?}");
        }
    }

    #[test]
    fn latency_and_bandwidth_add_up() {
        let t0 = Instant::now();
        let spec: LinkSpec = "latency=10ms,bandwidth=4MB/s".parse().unwrap();
        let mut l = LinkModel::new(spec, t0);
        // 4000 bytes at 4 MB/s = 1 ms on the wire, then 10 ms latency.
        assert_eq!(l.schedule(t0, 4000), Some(t0 + ms(11)));
        // The second queues behind the first on the wire.
        assert_eq!(l.schedule(t0, 4000), Some(t0 + ms(12)));
    }

    #[test]
    fn a_stall_after_n_pages_begins_when_the_nth_arrives() {
        let spec: LinkSpec = "latency=10ms,stall=1s@3,stall=500ms@0".parse().unwrap();
        assert_eq!(
            spec.page_stalls,
            vec![
                PageStallWindow {
                    after_pages: 0,
                    len: ms(500)
                },
                PageStallWindow {
                    after_pages: 3,
                    len: ms(1000)
                }
            ]
        );
        assert!(spec.stalls.is_empty());
        let t0 = Instant::now();
        let mut l = LinkModel::new(spec, t0);
        // After 0 pages is at the start: nothing before 500 ms.
        assert_eq!(l.schedule(t0, 4096), Some(t0 + ms(500)));
        // Pages asked one after another as each arrives, as a lone vCPU does.
        assert_eq!(l.schedule(t0 + ms(600), 4096), Some(t0 + ms(610)));
        assert_eq!(l.schedule(t0 + ms(610), 4096), Some(t0 + ms(620)));
        // The third arrived at 620 ms: nothing more until 1620 ms.
        assert_eq!(l.schedule(t0 + ms(620), 4096), Some(t0 + ms(1620)));
        assert_eq!(l.schedule(t0 + ms(1700), 4096), Some(t0 + ms(1710)));
    }

    #[test]
    fn a_stall_after_n_pages_counts_bytes_for_the_proxy() {
        // Chunks of 3 KiB: the third completes 2 pages' worth (8 KiB) and starts it.
        let t0 = Instant::now();
        let mut l = LinkModel::new("stall=1s@2".parse().unwrap(), t0);
        assert_eq!(l.schedule(t0, 3072), Some(t0));
        assert_eq!(l.schedule(t0 + ms(1), 3072), Some(t0 + ms(1)));
        assert_eq!(l.schedule(t0 + ms(2), 3072), Some(t0 + ms(2)));
        assert_eq!(l.schedule(t0 + ms(3), 3072), Some(t0 + ms(1002)));
    }

    #[test]
    fn windows_that_overlap_are_all_waited_out() {
        // Moved out of the page window, the page lands in the time window.
        let t0 = Instant::now();
        let mut l = LinkModel::new("stall=100ms@1,stall=1s@50ms".parse().unwrap(), t0);
        assert_eq!(l.schedule(t0, 4096), Some(t0));
        assert_eq!(l.schedule(t0 + ms(1), 4096), Some(t0 + ms(1050)));
    }

    #[test]
    fn stall_window_delays_and_forever_stops() {
        let t0 = Instant::now();
        let mut l = LinkModel::new("stall=100ms@50ms,stall=forever@2".parse().unwrap(), t0);
        assert_eq!(l.schedule(t0, 4096), Some(t0));
        assert_eq!(l.schedule(t0 + ms(60), 4096), Some(t0 + ms(150)));
        assert_eq!(l.schedule(t0 + ms(200), 4096), None);
        let mut ideal = LinkModel::ideal(t0);
        assert_eq!(ideal.schedule(t0 + ms(5), 4096), Some(t0 + ms(5)));
    }
}
