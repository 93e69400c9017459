//! After the start: asking the source for pages, pausing on a break and resuming when
//! it is back, and telling it once every page is here.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Session;
use crate::memory::PageState;
use crate::migration::progress::Phase;
use crate::migration::wire::{ErrorCode, Message, MAX_REQUEST};

impl Session {
    /// Sends page requests on the urgent channel (dropped while paused: a resume asks
    /// again for every page still requested).
    pub(super) fn ask(&mut self, pages: &[usize]) {
        if pages.is_empty() {
            return;
        }
        self.progress
            .requested
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        if self.progress.phase() != Phase::Postcopy {
            return;
        }
        let Some((gen, w)) = self.urgent.as_mut() else {
            return;
        };
        let gen = *gen;
        let mut r = Ok(());
        let page = self.limits.page_size;
        for chunk in pages.chunks(MAX_REQUEST) {
            let gpas = chunk.iter().map(|&i| i as u64 * page).collect();
            r = w.send(&Message::PageRequest { gpas }).map(|_| ());
            if r.is_err() {
                break;
            }
        }
        if let Err(e) = r.and_then(|()| w.flush()) {
            self.lost(gen, e.to_string(), false);
        }
    }

    /// Every page here: tell the source, which then ends. If the source says it sent
    /// everything but pages are still missing a second later, say which.
    pub(super) fn check_done(&mut self) {
        if !self.started || self.done_told {
            return;
        }
        let pages = &self.vm.fault.ram.pages;
        if pages.present() == pages.len() {
            if !self.completed {
                self.completed = true;
                // No run buffer will be filled again.
                self.arrivals.release_spare();
                self.progress.set_phase(Phase::Completed);
                eprintln!("{}", self.progress.line(""));
                eprintln!("ufvmm: incoming: migration complete: every page is here");
            }
            if self.fresh == (true, true) {
                let n = pages.len() as u64;
                self.send_main(&Message::PagesDone { pages: n });
                self.done_told = true;
            }
        } else if self
            .source_done
            .is_some_and(|t| t.elapsed() > Duration::from_secs(1))
        {
            self.source_done = None;
            let bits = self.missing_bits();
            self.send_main(&Message::Missing { bits });
        }
    }

    /// True once every page is here: the session has seen it, or the fault loop has
    /// just installed the last page and said so (its message may still be queued).
    pub(super) fn all_here(&self) -> bool {
        self.completed || self.progress.phase() == Phase::Completed
    }

    /// The VM ends after the guest started here: the source is told it may stop. All
    /// pages here: `PagesDone`, as at the end of any migration. Otherwise the VM's end,
    /// on both channels, so it is heard whichever of the source's readers sees the
    /// connections close first.
    pub(super) fn last_word(&mut self) {
        let pages = &self.vm.fault.ram.pages;
        if self.all_here() || pages.present() == pages.len() {
            let n = self.vm.fault.ram.pages.len() as u64;
            self.send_main(&Message::PagesDone { pages: n });
            return;
        }
        let m = Message::Error {
            code: ErrorCode::VmEnded,
            text: "the destination VM has ended".into(),
        };
        for (_, w) in [&mut self.main, &mut self.urgent].into_iter().flatten() {
            let _ = w.send(&m).and_then(|_| w.flush());
        }
    }

    /// The connections are gone: postcopy pauses until the source is back.
    pub(super) fn break_link(&mut self, why: String) {
        self.close();
        if self.all_here() {
            return;
        }
        self.progress.broke();
        eprintln!(
            "ufvmm: incoming: postcopy-paused: {why}; vcpus that touch missing pages wait; \
             waiting for the source to reconnect"
        );
    }

    /// Both channels are back: say what is missing, and ask again for what was in
    /// flight.
    pub(super) fn resume(&mut self) {
        let bits = self.missing_bits();
        let requested = self.requested_pages();
        let missing: u32 = bits.iter().map(|w| w.count_ones()).sum();
        self.progress.recovered();
        self.progress.set_phase(Phase::Postcopy); // Not after Completed: that is final.
        eprintln!(
            "ufvmm: incoming: migration resumed: {missing} pages missing, asking again for {} in \
             flight",
            requested.len()
        );
        self.send_main(&Message::Missing { bits });
        self.done_told = false;
        // This Missing says it all: a PagesDone of the attempt before must not make
        // check_done send another a second later (which would resend pages on their way).
        self.source_done = None;
        self.ask(&requested);
    }

    /// One bit per page not yet here.
    fn missing_bits(&self) -> Vec<u64> {
        let pages = &self.vm.fault.ram.pages;
        let mut bits = vec![0u64; self.limits.bitmap_words()];
        for i in (0..pages.len()).filter(|&i| pages.get(i) != PageState::Present) {
            bits[i / 64] |= 1 << (i % 64);
        }
        bits
    }

    /// Pages asked for and not yet here.
    pub(super) fn requested_pages(&self) -> Vec<usize> {
        let pages = &self.vm.fault.ram.pages;
        (0..pages.len())
            .filter(|&i| pages.get(i) == PageState::Requested)
            .collect()
    }
}
