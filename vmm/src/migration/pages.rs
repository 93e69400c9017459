//! The source's pages: which are still to be sent, reading them, and framing them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::conn::FrameWriter;
use super::progress::Resends;
use crate::fault::{FaultOutcome, GupFlags, Signal};
use crate::vcpu::state::VcpuState;
use crate::vm::shared::VmShared;

/// Why pages are on the list again after a first send: what a second send of one is
/// counted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Again {
    /// The guest wrote them after they were sent (precopy's dirty log).
    Dirtied,
    /// The destination said, after a break, that it lacks them.
    Lost,
}

/// The pages still to send, the pages sent at least once, and where the background
/// scan is. A page leaves the list when it is taken for sending (by the background
/// stream or for an urgent request), so no page is sent twice unless the guest wrote it
/// since (precopy) or the destination says it lacks it (after a break).
pub(super) struct ToSend {
    bits: Mutex<Bits>,
    cursor: AtomicUsize,
    pages: usize,
}

struct Bits {
    /// Still to send.
    todo: Vec<u64>,
    /// Sent at least once.
    sent: Vec<u64>,
    /// What a second send counts as now.
    again: Again,
}

impl ToSend {
    pub(super) fn new(pages: usize) -> Self {
        let words = pages.div_ceil(64);
        ToSend {
            bits: Mutex::new(Bits {
                todo: vec![0; words],
                sent: vec![0; words],
                again: Again::Dirtied,
            }),
            cursor: AtomicUsize::new(0),
            pages,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bits> {
        self.bits.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mask(&self, word: usize) -> u64 {
        let left = self.pages - word * 64;
        if left >= 64 {
            !0
        } else {
            (1u64 << left) - 1
        }
    }

    /// Every page not sent yet (all of them at first).
    pub(super) fn fill(&self) {
        let mut b = self.lock();
        for i in 0..b.todo.len() {
            b.todo[i] = !b.sent[i] & self.mask(i);
        }
    }

    /// Exactly these pages (bits past the last page are ignored); a page among them
    /// that was sent before counts as sent again for `why`.
    pub(super) fn replace(&self, bits: &[u64], why: Again) {
        let mut b = self.lock();
        b.again = why;
        for i in 0..b.todo.len() {
            b.todo[i] = bits.get(i).copied().unwrap_or(0) & self.mask(i);
        }
    }

    /// Marks `idx` sent; true if it had been sent before.
    fn note_sent(b: &mut Bits, idx: usize, resends: &Resends) {
        let (w, bit) = (idx / 64, 1u64 << (idx % 64));
        if b.sent[w] & bit != 0 {
            let c = match b.again {
                Again::Dirtied => &resends.dirtied,
                Again::Lost => &resends.lost,
            };
            c.fetch_add(1, Ordering::Relaxed);
        } else {
            resends.distinct.fetch_add(1, Ordering::Relaxed);
        }
        b.sent[w] |= bit;
    }

    /// Takes page `idx` off the list to send it urgently, and moves the scan just past
    /// it (pages near a fault are likely next). False if it is not on the list: the
    /// stream sent it already or is sending it, and that copy is the answer. False too
    /// once the asking attempt is `closed`: checked under the list's lock, because a new
    /// attempt's list replaces this one only after the old attempt was closed, so a
    /// closed attempt can never take a page off its successor's list.
    pub(super) fn claim_urgent(&self, idx: usize, resends: &Resends, closed: &AtomicBool) -> bool {
        if idx >= self.pages {
            return false;
        }
        let mut b = self.lock();
        if closed.load(Ordering::Acquire) {
            return false;
        }
        let (w, bit) = (idx / 64, 1u64 << (idx % 64));
        if b.todo[w] & bit == 0 {
            resends.answered_by_stream.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        b.todo[w] &= !bit;
        Self::note_sent(&mut b, idx, resends);
        drop(b);
        self.cursor
            .store((idx + 1) % self.pages.max(1), Ordering::Relaxed);
        true
    }

    /// Keeps of `idxs` only the pages on the list, and takes those off it (marked sent).
    pub(super) fn take_listed(&self, idxs: &mut Vec<usize>, resends: &Resends) {
        let mut b = self.lock();
        idxs.retain(|&idx| {
            let (w, bit) = (idx / 64, 1u64 << (idx % 64));
            if idx >= self.pages || b.todo[w] & bit == 0 {
                return false;
            }
            b.todo[w] &= !bit;
            Self::note_sent(&mut b, idx, resends);
            true
        });
    }

    /// Takes up to `max` pages from the scan position on, wrapping around, and marks
    /// them sent.
    pub(super) fn next_batch(&self, max: usize, resends: &Resends) -> Vec<usize> {
        let mut b = self.lock();
        let words = b.todo.len();
        let mut out = Vec::new();
        if words == 0 {
            return out;
        }
        let start = self.cursor.load(Ordering::Relaxed) % self.pages.max(1);
        let mut i = start / 64;
        // Bits below the cursor in its first word are looked at after wrapping.
        let mut first_mask = !0u64 << (start % 64);
        for _ in 0..=words {
            let mut w = b.todo[i] & first_mask;
            first_mask = !0;
            while w != 0 && out.len() < max {
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                out.push(i * 64 + bit);
                b.todo[i] &= !(1u64 << bit);
            }
            if out.len() >= max {
                break;
            }
            i = (i + 1) % words;
        }
        for &idx in &out {
            Self::note_sent(&mut b, idx, resends);
        }
        drop(b);
        if let Some(&last) = out.last() {
            self.cursor
                .store((last + 1) % self.pages.max(1), Ordering::Relaxed);
        }
        out
    }
}

/// Reads guest page `idx` on the source, fetching it through the fault layer if this
/// side never had it (it comes from the source's own page source).
pub(super) fn read_page(vm: &VmShared, idx: usize, buf: &mut [u8]) -> Result<(), String> {
    let gpa = vm.fault.ram.page_gpa(idx);
    let signal = || {
        if vm.is_shutting_down() {
            Signal::Fatal
        } else {
            Signal::None
        }
    };
    match vm.fault.read(gpa, buf, GupFlags::default(), &signal) {
        FaultOutcome::Done => Ok(()),
        other => Err(format!("cannot read page {gpa:#x} here: {other:?}")),
    }
}

/// The pages the vCPUs of `states` (saved [`VcpuState`]s) need for KVM's walk of their
/// page tables and for event delivery ([`crate::vcpu::critical`]), read from guest RAM
/// here: the switch-over sends them, so that no vCPU on the destination waits for one
/// (a wait rule 7 must not poison). Only those still to send are sent, and they are
/// taken out of `to_send`: sent once.
pub(super) fn critical_pages(
    vm: &VmShared,
    states: &[Vec<u8>],
    to_send: &ToSend,
    resends: &Resends,
) -> Result<Vec<usize>, String> {
    let mut all = std::collections::BTreeSet::new();
    for (id, bytes) in states.iter().enumerate() {
        let st = VcpuState::from_bytes(bytes).map_err(|e| format!("vcpu {id}: {e}"))?;
        let mut read = |gpa: u64| {
            let mut b = [0u8; 8];
            let signal = || {
                if vm.is_shutting_down() {
                    Signal::Fatal
                } else {
                    Signal::None
                }
            };
            match vm.fault.read(gpa, &mut b, GupFlags::default(), &signal) {
                FaultOutcome::Done => Some(u64::from_le_bytes(b)),
                _ => None,
            }
        };
        all.extend(crate::vcpu::critical::critical_pages(
            &st.sregs,
            st.regs.rsp,
            &mut read,
        ));
    }
    let mut idxs: Vec<usize> = all
        .into_iter()
        .filter_map(|g| vm.fault.ram.page_of(g))
        .collect();
    // Those the destination has already (sent in precopy, not written since) stay there.
    to_send.take_listed(&mut idxs, resends);
    Ok(idxs)
}

/// Asks the fault layer for the pages of `idxs` this side lacks, without waiting, so
/// they arrive while earlier ones are sent.
pub(super) fn prefetch(vm: &VmShared, idxs: &[usize]) {
    let flags = GupFlags {
        nowait: true,
        ..GupFlags::default()
    };
    for &i in idxs {
        if vm.fault.ram.pages.get(i) != crate::memory::PageState::Present {
            let gpa = vm.fault.ram.page_gpa(i);
            let page = vm.fault.ram.page_size() as usize;
            let _ = vm.fault.get_guest_pages(gpa, page, flags, &|| Signal::None);
        }
    }
}

/// Queues page `idx` (a page of the RAM's unit, 4 KiB or 2 MiB), read from guest RAM
/// here straight into the frame; returns its
/// bytes and whether it went as zeros.
pub(super) fn send_page(
    vm: &VmShared,
    w: &mut FrameWriter,
    idx: usize,
    flags: u32,
) -> Result<(u64, bool), String> {
    let page = vm.fault.ram.page_size();
    w.send_page(idx as u64 * page, flags, page as usize, |buf| {
        read_page(vm, idx, buf)
    })
}
