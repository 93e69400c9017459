//! The fault loop's side of a remote supply: asking for pages, installing arrivals.

use std::sync::mpsc::TryRecvError;

use super::handler::{FaultLoop, Supply};
use super::{bump, FaultError};
use crate::abi::PAGE_SIZE;
use crate::memory::PageState;
use crate::source::remote::Arrival;

/// Most arrivals handled in one turn, so fault events and kicks are not kept waiting
/// behind a long background stream.
const ARRIVALS_PER_TURN: usize = 256;

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
    /// when a newer precopy copy replaces the older one.
    pub(super) fn take_arrivals(&mut self) -> Result<(), FaultError> {
        let mut installed = false;
        let mut more = true;
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
                    let ram = &self.fault.ram;
                    if idx >= ram.pages.len() {
                        continue;
                    }
                    if ram.pages.get(idx) == PageState::Present {
                        if precopy {
                            static ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
                            ram.overwrite(idx, data.as_deref().unwrap_or(&ZEROS))?;
                        } else {
                            bump(&self.fault.stats.duplicates, 1);
                        }
                        continue;
                    }
                    let asked = self.asked.remove(&idx);
                    self.install_page(idx, data.as_deref(), true, asked)?;
                    self.arrived_ahead(idx, urgent);
                    installed = true;
                }
                Arrival::Discard(bits) => self.discard(&bits)?,
                Arrival::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
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
