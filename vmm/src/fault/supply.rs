//! The fault loop's side of a remote supply: asking for pages, installing arrivals.

use std::sync::mpsc::TryRecvError;
use std::time::Instant;

use super::handler::{FaultLoop, Supply};
use super::{bump, FaultError};
use crate::memory::{zeros, PageState};
use crate::source::remote::Arrival;

/// Most arrivals handled in one turn, and most bytes of pages (at least one arrival), so
/// fault events and kicks are not kept waiting behind a long background stream: the
/// readers refill the queues while the loop drains them.
const ARRIVALS_PER_TURN: usize = 256;
const BYTES_PER_TURN: usize = 1 << 20;

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
    /// when a newer precopy copy replaces the older one. A run of pages (the readers
    /// gather those that follow each other in RAM, as the background stream sends them)
    /// goes in as one `UFFDIO_COPY` straight from the reader's buffer: a copy per page
    /// cost the destination's loop a third of its time in the ioctl's fixed part and the
    /// wake, and gathering the pages here a copy of each.
    pub(super) fn take_arrivals(&mut self) -> Result<(), FaultError> {
        let mut installed = false;
        let mut more = true;
        let mut bytes = 0;
        for _ in 0..ARRIVALS_PER_TURN {
            if bytes >= BYTES_PER_TURN {
                break;
            }
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
                Arrival::Run {
                    first,
                    data,
                    precopy,
                    urgent,
                } => {
                    bytes += data.len();
                    let page = self.fault.ram.page_size() as usize;
                    let n = data.len() / page;
                    installed |= self.take_run(first, n, Some(&data), precopy, urgent)?;
                    if let Supply::Remote(r) = &self.supply {
                        r.recycle(data);
                    }
                }
                Arrival::Zeros {
                    first,
                    n,
                    precopy,
                    urgent,
                } => {
                    bytes += n.saturating_mul(self.fault.ram.page_size() as usize);
                    installed |= self.take_run(first, n, None, precopy, urgent)?;
                }
                Arrival::Discard(bits) => self.discard(&bits)?,
                Arrival::Barrier(done) => {
                    // What came before the barrier is in before it is answered.
                    let _ = done.send(());
                }
            }
        }
        if installed {
            let pages = &self.fault.ram.pages;
            pages.notify();
            if pages.present() == pages.len() {
                if let Supply::Remote(r) = &self.supply {
                    (r.all_here)();
                }
            }
        }
        if more {
            // Stopped at the cap with arrivals left: come back at once (nothing else may
            // wake the loop, e.g. before any vCPU runs).
            let _ = self.fault.wake_fd().write(1);
        }
        Ok(())
    }

    /// True if page `idx` is present already: then a precopy copy (`data`, or zeros)
    /// replaces it, and any other copy is a duplicate, counted and dropped.
    fn present(
        &mut self,
        idx: usize,
        precopy: bool,
        data: Option<&[u8]>,
    ) -> Result<bool, FaultError> {
        let ram = &self.fault.ram;
        if ram.pages.get(idx) != PageState::Present {
            return Ok(false);
        }
        if precopy {
            ram.overwrite(idx, data.unwrap_or(zeros(ram.page_size() as usize)))?;
        } else {
            bump(&self.fault.stats.duplicates, 1);
        }
        Ok(true)
    }

    /// Installs the `n` pages of a run from page `first` on (`data`: their bytes, or
    /// `None` for zeros): those present already as [`FaultLoop::present`] says, the
    /// others in stretches, each one waking ioctl (`UFFDIO_COPY` from `data` itself, or
    /// `UFFDIO_ZEROPAGE`). True if it installed any.
    fn take_run(
        &mut self,
        first: usize,
        n: usize,
        data: Option<&[u8]>,
        precopy: bool,
        urgent: bool,
    ) -> Result<bool, FaultError> {
        let page = self.fault.ram.page_size() as usize;
        if first.saturating_add(n) > self.fault.ram.pages.len() {
            return Ok(false);
        }
        let bytes = |a: usize, b: usize| data.map(|d| &d[a * page..b * page]);
        let mut installed = false;
        let mut k = 0;
        while k < n {
            if self.present(first + k, precopy, bytes(k, k + 1))? {
                k += 1;
                continue;
            }
            let start = k;
            while k < n && self.fault.ram.pages.get(first + k) != PageState::Present {
                k += 1;
            }
            self.install_stretch(first + start, k - start, bytes(start, k), urgent)?;
            installed = true;
        }
        Ok(installed)
    }

    /// Installs `n` pages that are all missing, from page `first` on (`data`: their
    /// bytes, or `None` for zeros), in one waking ioctl (page by page from the first
    /// page that was there already, as `install_run` asks).
    fn install_stretch(
        &mut self,
        first: usize,
        n: usize,
        data: Option<&[u8]>,
        urgent: bool,
    ) -> Result<(), FaultError> {
        let ram = &self.fault.ram;
        let page = ram.page_size() as usize;
        // Escalated pages carry a poison marker: drop it so the copy can fill them.
        for idx in first..first + n {
            if ram.pages.clear_marker(idx) {
                ram.clear_poison(idx)?;
            }
        }
        let done = if ram.uffd().is_some() {
            ram.install_run(first, n, data, true)?
        } else {
            0
        };
        let stats = &self.fault.stats;
        if data.is_none() {
            bump(&stats.zero, n as u64);
        }
        for k in 0..n {
            let idx = first + k;
            if k >= done {
                ram.install(idx, data.map(|d| &d[k * page..(k + 1) * page]), true)?;
            }
            ram.pages.set(idx, PageState::Present);
            bump(&stats.served, 1);
            if let Some((at, vcpu)) = self.asked.remove(&idx) {
                super::latency::record(&stats.latency, at, vcpu);
            }
            let at = Instant::now();
            let gpa = ram.page_gpa(idx);
            self.stalls.installed(gpa, |v| self.woke(v, at));
        }
        for idx in first..first + n {
            self.arrived_ahead(idx, urgent);
        }
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
