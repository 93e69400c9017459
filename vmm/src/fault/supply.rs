//! The fault loop's side of a remote supply: asking for pages, installing arrivals.

use std::sync::mpsc::TryRecvError;
use std::time::Instant;

use super::handler::{FaultLoop, Supply};
use super::{bump, FaultError};
use crate::abi::PAGE_SIZE;
use crate::memory::PageState;
use crate::source::remote::Arrival;

/// Most arrivals handled in one turn, so fault events and kicks are not kept waiting
/// behind a long background stream.
const ARRIVALS_PER_TURN: usize = 256;

/// Most arrivals put in by one ioctl (256 KiB).
const RUN_PAGES: usize = 64;
/// Pages this large or larger go in one by one, not gathered: a 2 MiB page is one
/// ioctl's worth already, and gathering would copy it once more.
const RUN_BYTES: u64 = RUN_PAGES as u64 * PAGE_SIZE;

/// Arrivals with bytes for pages that follow each other, gathered for one install.
#[derive(Default)]
pub(super) struct ArrivalRun {
    first: usize,
    /// The pages' bytes, back to back.
    buf: Vec<u8>,
    pages: Vec<RunPage>,
}

struct RunPage {
    idx: usize,
    asked: Option<Instant>,
    urgent: bool,
}

impl ArrivalRun {
    /// True if page `idx` can join the run: the run is empty, or `idx` comes next and
    /// the run has room.
    fn extends(&self, idx: usize) -> bool {
        self.pages.is_empty()
            || (self.pages.len() < RUN_PAGES && self.first + self.pages.len() == idx)
    }

    fn push(&mut self, idx: usize, data: &[u8], asked: Option<Instant>, urgent: bool) {
        // Only 4 KiB pages are gathered (`RUN_BYTES`); a run checks only its total length.
        debug_assert_eq!(data.len(), PAGE_SIZE as usize);
        if self.pages.is_empty() {
            self.first = idx;
        }
        self.buf.extend_from_slice(data);
        self.pages.push(RunPage { idx, asked, urgent });
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.pages.clear();
    }
}

impl FaultLoop {
    /// Sends the pages asked for this turn to the migration session, in one request.
    pub(super) fn flush_asks(&mut self) {
        if self.to_ask.is_empty() {
            return;
        }
        if let Supply::Remote(r) = &self.supply {
            let mut pages = std::mem::take(&mut self.to_ask);
            pages.sort_unstable();
            pages.dedup();
            (r.ask)(pages);
        }
    }

    /// Installs what the migration connections brought. A page already present is a
    /// duplicate (asked for and also streamed) and is dropped, except before switch-over,
    /// when a newer precopy copy replaces the older one. Arrivals with bytes that follow
    /// each other in RAM go in as one `UFFDIO_COPY` (the background stream sends in
    /// order): a copy per page cost the destination's loop a third of its time in the
    /// ioctl's fixed part and the wake.
    pub(super) fn take_arrivals(&mut self) -> Result<(), FaultError> {
        let mut installed = false;
        let mut more = true;
        let mut run = std::mem::take(&mut self.run);
        let result = (|| {
            for _ in 0..ARRIVALS_PER_TURN {
                let Supply::Remote(r) = &self.supply else {
                    return Ok(());
                };
                let a = match r.urgent.try_recv().or_else(|_| r.arrivals.try_recv()) {
                    Ok(a) => a,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                        more = false;
                        break;
                    }
                };
                match a {
                    Arrival::Page {
                        idx,
                        data,
                        precopy,
                        urgent,
                    } => {
                        if idx >= self.fault.ram.pages.len() {
                            continue;
                        }
                        // A page out of the run's order (or a repeat of one in it) puts
                        // the run in first, so the page states below are up to date.
                        if data.is_none() || !run.extends(idx) {
                            self.install_arrivals(&mut run)?;
                        }
                        let ram = &self.fault.ram;
                        if ram.pages.get(idx) == PageState::Present {
                            if precopy {
                                let zeros = crate::memory::zeros(ram.page_size() as usize);
                                ram.overwrite(idx, data.as_deref().unwrap_or(zeros))?;
                            } else {
                                bump(&self.fault.stats.duplicates, 1);
                            }
                            continue;
                        }
                        let asked = self.asked.remove(&idx);
                        match data {
                            Some(d) if ram.uffd().is_some() && ram.page_size() < RUN_BYTES => {
                                run.push(idx, &d, asked, urgent)
                            }
                            d => {
                                self.install_page(idx, d.as_deref(), true, asked)?;
                                self.arrived_ahead(idx, urgent);
                            }
                        }
                        installed = true;
                    }
                    Arrival::Discard(bits) => {
                        self.install_arrivals(&mut run)?;
                        self.discard(&bits)?;
                    }
                    Arrival::Barrier(done) => {
                        // What came before the barrier is in before it is answered.
                        self.install_arrivals(&mut run)?;
                        let _ = done.send(());
                    }
                }
            }
            self.install_arrivals(&mut run)
        })();
        self.run = run;
        result?;
        if installed {
            self.fault.ram.pages.notify();
        }
        if more {
            // Stopped at the cap with arrivals left: come back at once (nothing else may
            // wake the loop, e.g. before any vCPU runs).
            let _ = self.fault.wake_fd().write(1);
        }
        Ok(())
    }

    /// Installs the gathered run in one waking ioctl (page by page from the first
    /// page that was there already, as `install_run` asks), and empties it.
    fn install_arrivals(&mut self, run: &mut ArrivalRun) -> Result<(), FaultError> {
        if run.pages.is_empty() {
            return Ok(());
        }
        let page = self.fault.ram.page_size() as usize;
        let ram = &self.fault.ram;
        // Escalated pages carry a poison marker: drop it so the copy can fill them.
        for p in &run.pages {
            if ram.pages.clear_marker(p.idx) {
                ram.clear_poison(p.idx)?;
            }
        }
        let done = ram.install_run(run.first, run.pages.len(), Some(&run.buf), true)?;
        let stats = &self.fault.stats;
        for (k, p) in run.pages.iter().enumerate() {
            if k >= done {
                ram.install(p.idx, Some(&run.buf[k * page..(k + 1) * page]), true)?;
            }
            ram.pages.set(p.idx, PageState::Present);
            bump(&stats.served, 1);
            if let Some(asked) = p.asked {
                let us = asked.elapsed().as_micros() as u64;
                if let Ok(mut h) = stats.latency_us.lock() {
                    let _ = h.record(us.max(1));
                }
            }
            let at = Instant::now();
            self.stalls
                .installed(ram.page_gpa(p.idx), |v| self.timing(|t| t.woke(v, at)));
        }
        for p in &run.pages {
            self.arrived_ahead(p.idx, p.urgent);
        }
        run.clear();
        Ok(())
    }

    /// Drops the pages whose bits are set, in runs.
    fn discard(&mut self, bits: &[u64]) -> Result<(), FaultError> {
        let n = self.fault.ram.pages.len();
        let set = |i: usize| bits.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1);
        let mut i = 0;
        while i < n {
            if !set(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < n && set(i) {
                i += 1;
            }
            self.fault.ram.discard(start..i)?;
            bump(&self.fault.stats.discarded, (i - start) as u64);
        }
        Ok(())
    }
}
