//! The source's pages: which are still to be sent, reading them, and framing them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::conn::FrameWriter;
use super::wire::{self, Message, PAGE_ZERO};
use crate::abi::PAGE_SIZE;
use crate::fault::{FaultOutcome, GupFlags, Signal};
use crate::vcpu::state::VcpuState;
use crate::vm::shared::VmShared;

/// The pages still to send, and where the background scan is.
pub(super) struct ToSend {
    bits: Mutex<Vec<u64>>,
    cursor: AtomicUsize,
    pages: usize,
}

impl ToSend {
    pub(super) fn new(pages: usize) -> Self {
        ToSend {
            bits: Mutex::new(vec![0; pages.div_ceil(64)]),
            cursor: AtomicUsize::new(0),
            pages,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.bits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every page.
    pub(super) fn fill(&self) {
        let mut b = self.lock();
        for (i, w) in b.iter_mut().enumerate() {
            let left = self.pages - i * 64;
            *w = if left >= 64 { !0 } else { (1u64 << left) - 1 };
        }
    }

    /// Exactly these pages (bits past the last page are ignored).
    pub(super) fn replace(&self, bits: &[u64]) {
        let mut b = self.lock();
        for (i, w) in b.iter_mut().enumerate() {
            let left = self.pages - i * 64;
            let mask = if left >= 64 { !0 } else { (1u64 << left) - 1 };
            *w = bits.get(i).copied().unwrap_or(0) & mask;
        }
    }

    /// Takes page `idx` off the list (it is being sent urgently) and moves the scan
    /// just past it: pages near a fault are likely next.
    pub(super) fn claim_urgent(&self, idx: usize) {
        if let Some(w) = self.lock().get_mut(idx / 64) {
            *w &= !(1u64 << (idx % 64));
        }
        self.cursor
            .store((idx + 1) % self.pages.max(1), Ordering::Relaxed);
    }

    /// Takes up to `max` pages from the scan position on, wrapping around.
    pub(super) fn next_batch(&self, max: usize) -> Vec<usize> {
        let mut b = self.lock();
        let words = b.len();
        let mut out = Vec::new();
        let start = self.cursor.load(Ordering::Relaxed) % self.pages.max(1);
        let mut i = start / 64;
        // Bits below the cursor in its first word are looked at after wrapping.
        let mut first_mask = !0u64 << (start % 64);
        for _ in 0..=words {
            let w = b[i] & first_mask;
            first_mask = !0;
            let mut w2 = w;
            while w2 != 0 && out.len() < max {
                let bit = w2.trailing_zeros() as usize;
                w2 &= w2 - 1;
                out.push(i * 64 + bit);
                b[i] &= !(1u64 << bit);
            }
            if out.len() >= max {
                break;
            }
            i = (i + 1) % words;
        }
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
/// (a wait rule 7 must not poison). They are taken out of `to_send`: sent once.
pub(super) fn critical_pages(
    vm: &VmShared,
    states: &[Vec<u8>],
    to_send: &ToSend,
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
    let idxs: Vec<usize> = all
        .into_iter()
        .filter_map(|g| vm.fault.ram.page_of(g))
        .collect();
    for &idx in &idxs {
        to_send.claim_urgent(idx);
    }
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
            let _ = vm
                .fault
                .get_guest_pages(gpa, PAGE_SIZE as usize, flags, &|| Signal::None);
        }
    }
}

/// Queues one page frame; returns its bytes and whether it went as zeros.
pub(super) fn send_page(
    w: &mut FrameWriter,
    idx: usize,
    buf: &[u8],
    flags: u32,
) -> Result<(u64, bool), wire::WireError> {
    let zero = buf.iter().all(|&b| b == 0);
    let m = Message::Page {
        gpa: idx as u64 * PAGE_SIZE,
        flags: if zero { flags | PAGE_ZERO } else { flags },
        data: if zero {
            Box::default()
        } else {
            buf.to_vec().into_boxed_slice()
        },
    };
    Ok((w.send(&m)?, zero))
}
