//! A vCPU's whole architectural state as bytes, to move it to another VM (migration
//! switch-over, issue 3): general and special registers, XSAVE (FPU, SSE, AVX) and XCRs,
//! the MSRs that matter, the LAPIC, the MP state and pending events.
//!
//! Format: `VCPU_STATE_MAGIC`, then sections `[tag u32][length u32][bytes]`, each the raw
//! bytes of one KVM structure (MSRs as `[index u32][value u64]` pairs). Parsing checks
//! every tag and length, and takes only MSRs from [`MIGRATED_MSRS`], in order; it never
//! panics. Saving reads the MP state and events first (reading the MP state may apply a
//! latched INIT); restoring writes special registers before the LAPIC, the LAPIC before
//! the MSRs (TSC deadline), and events before the MP state.
//!
//! Not carried yet: debug registers, the TSC frequency, MTRRs, SPEC_CTRL, PDPTRs.

use kvm_bindings::{
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs, KVM_VCPUEVENT_VALID_PAYLOAD,
};
use kvm_ioctls::VcpuFd;
use zerocopy::{FromBytes, IntoBytes};

/// First bytes of a saved state: "UFVCPU01".
pub const VCPU_STATE_MAGIC: [u8; 8] = *b"UFVCPU01";

/// The MSRs carried across (EFER, APIC base, FS/GS base live in the special registers).
pub const MIGRATED_MSRS: [u32; 13] = [
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x6e0,       // TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Section tags.
mod tag {
    pub const REGS: u32 = 1;
    pub const SREGS: u32 = 2;
    pub const XSAVE: u32 = 3;
    pub const XCRS: u32 = 4;
    pub const MSRS: u32 = 5;
    pub const LAPIC: u32 = 6;
    pub const MP_STATE: u32 = 7;
    pub const EVENTS: u32 = 8;
}

/// Errors saving, parsing or restoring vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The error.
        source: vmm_sys_util::errno::Error,
    },
    /// The bytes are not a saved vCPU state.
    #[error("bad vcpu state: {0}")]
    Format(String),
}

/// A vCPU's state, parsed. (Compare two with [`VcpuState::to_bytes`].)
#[derive(Debug)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// XSAVE area (legacy FPU/SSE included).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// (index, value) of the MSRs in [`MIGRATED_MSRS`] this host supports.
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, ...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
}

fn kvm(what: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

fn section(out: &mut Vec<u8>, t: u32, bytes: &[u8]) {
    out.extend_from_slice(&t.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (its thread is out of `KVM_RUN`).
    /// `supported` is the host's MSR index list; only MSRs on it are saved.
    pub fn save(fd: &VcpuFd, supported: &[u32]) -> Result<Self, StateError> {
        let indexes: Vec<u32> = MIGRATED_MSRS
            .iter()
            .copied()
            .filter(|i| supported.contains(i))
            .collect();
        let entries: Vec<kvm_msr_entry> = indexes
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Format(format!("MSR list: {e:?}")))?;
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if n != indexes.len() {
            return Err(StateError::Format(format!(
                "KVM read {n} of {} MSRs",
                indexes.len()
            )));
        }
        Ok(VcpuState {
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            mp_state,
            events,
        })
    }

    /// Writes this state into a fresh vCPU (CPUID already set). `payload`: the VM has
    /// `KVM_CAP_EXCEPTION_PAYLOAD` on (see [`VcpuState::events_for`]).
    pub fn restore(&self, fd: &VcpuFd, payload: bool) -> Result<(), StateError> {
        let (events, cr2) = self.events_for(payload);
        let mut sregs = self.sregs;
        if let Some(cr2) = cr2 {
            sregs.cr2 = cr2;
        }
        fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        // SAFETY: ufvmm enables no dynamic XSTATE features (arch_prctl), so the state fits
        // the 4096-byte kvm_xsave that KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Format(format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(StateError::Format(format!(
                "KVM took {n} of {} MSRs",
                entries.len()
            )));
        }
        fd.set_vcpu_events(&events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        Ok(())
    }

    /// The pending events as a VM with exception payloads on (`payload`) or off takes
    /// them, and the CR2 to set with them, if it changes.
    ///
    /// A source with payloads on saves a flag (`KVM_VCPUEVENT_VALID_PAYLOAD`) that KVM
    /// refuses on a VM without them. For such a VM the state is made the way KVM
    /// itself reports it there: an exception pending is injected, and a #PF's payload
    /// (its address) is in CR2 already. A #DB's payload (DR6 bits) is dropped: debug
    /// registers are not carried.
    pub fn events_for(&self, payload: bool) -> (kvm_vcpu_events, Option<u64>) {
        const PF: u8 = 14;
        let mut ev = self.events;
        if payload || ev.flags & KVM_VCPUEVENT_VALID_PAYLOAD == 0 {
            return (ev, None);
        }
        ev.flags &= !KVM_VCPUEVENT_VALID_PAYLOAD;
        let cr2 =
            (ev.exception.pending != 0 && ev.exception_has_payload != 0 && ev.exception.nr == PF)
                .then_some(ev.exception_payload);
        if ev.exception.pending != 0 {
            ev.exception.injected = 1;
            ev.exception.pending = 0;
        }
        ev.exception_has_payload = 0;
        ev.exception_payload = 0;
        (ev, cr2)
    }

    /// The state as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = VCPU_STATE_MAGIC.to_vec();
        section(&mut out, tag::REGS, self.regs.as_bytes());
        section(&mut out, tag::SREGS, self.sregs.as_bytes());
        section(&mut out, tag::XSAVE, self.xsave.as_bytes());
        section(&mut out, tag::XCRS, self.xcrs.as_bytes());
        let mut msrs = Vec::with_capacity(self.msrs.len() * 12);
        for &(i, v) in &self.msrs {
            msrs.extend_from_slice(&i.to_le_bytes());
            msrs.extend_from_slice(&v.to_le_bytes());
        }
        section(&mut out, tag::MSRS, &msrs);
        section(&mut out, tag::LAPIC, self.lapic.as_bytes());
        section(&mut out, tag::MP_STATE, self.mp_state.as_bytes());
        section(&mut out, tag::EVENTS, self.events.as_bytes());
        out
    }

    /// Parses bytes made by [`VcpuState::to_bytes`]; every section must be there, once,
    /// with its exact size.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let bad = |why: String| StateError::Format(why);
        let rest = bytes
            .strip_prefix(&VCPU_STATE_MAGIC)
            .ok_or_else(|| bad("wrong magic".into()))?;
        let mut sections: [Option<&[u8]>; 9] = [None; 9];
        let mut at = 0;
        while at < rest.len() {
            let head = rest
                .get(at..at + 8)
                .ok_or_else(|| bad(format!("section header cut at byte {at}")))?;
            let t = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let body = rest
                .get(at + 8..at + 8 + len)
                .ok_or_else(|| bad(format!("section {t} of {len} bytes is cut short")))?;
            let slot = sections
                .get_mut(t as usize)
                .filter(|_| t >= tag::REGS)
                .ok_or_else(|| bad(format!("unknown section {t}")))?;
            if slot.replace(body).is_some() {
                return Err(bad(format!("section {t} twice")));
            }
            at += 8 + len;
        }
        let get = |t: u32, name: &str| {
            sections[t as usize].ok_or_else(|| bad(format!("no {name} section")))
        };
        fn read<T: FromBytes>(b: &[u8], name: &str) -> Result<T, StateError> {
            T::read_from_bytes(b).map_err(|_| {
                StateError::Format(format!(
                    "{name}: {} bytes, expected {}",
                    b.len(),
                    size_of::<T>()
                ))
            })
        }
        let msr_bytes = get(tag::MSRS, "msrs")?;
        if msr_bytes.len() % 12 != 0 || msr_bytes.len() / 12 > MIGRATED_MSRS.len() {
            return Err(bad(format!("msrs: {} bytes", msr_bytes.len())));
        }
        let msrs: Vec<(u32, u64)> = msr_bytes
            .chunks_exact(12)
            .map(|c| {
                let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(&c[4..]);
                (i, u64::from_le_bytes(v))
            })
            .collect();
        // Only MSRs we migrate, each once, in our order: a peer cannot make us write others.
        let mut allowed = MIGRATED_MSRS.iter();
        for &(i, _) in &msrs {
            if !allowed.any(|&m| m == i) {
                return Err(bad(format!("msr {i:#x} not expected here")));
            }
        }
        Ok(VcpuState {
            regs: read(get(tag::REGS, "regs")?, "regs")?,
            sregs: read(get(tag::SREGS, "sregs")?, "sregs")?,
            xsave: read(get(tag::XSAVE, "xsave")?, "xsave")?,
            xcrs: read(get(tag::XCRS, "xcrs")?, "xcrs")?,
            msrs,
            lapic: read(get(tag::LAPIC, "lapic")?, "lapic")?,
            mp_state: read(get(tag::MP_STATE, "mp state")?, "mp state")?,
            events: read(get(tag::EVENTS, "events")?, "events")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_page_fault_moves_to_a_vm_without_payloads_as_kvm_reports_it_there() {
        let mut st = VcpuState::from_bytes(&sample().to_bytes()).expect("parses");
        st.events.flags = KVM_VCPUEVENT_VALID_PAYLOAD;
        st.events.exception.nr = 14;
        st.events.exception.pending = 1;
        st.events.exception.has_error_code = 1;
        st.events.exception.error_code = 2;
        st.events.exception_has_payload = 1;
        st.events.exception_payload = 0x3fe0_0000;
        // A VM with payloads takes it as it is.
        let (ev, cr2) = st.events_for(true);
        assert_eq!(
            (ev.flags, ev.exception.pending, cr2),
            (KVM_VCPUEVENT_VALID_PAYLOAD, 1, None)
        );
        // One without: injected, the address in CR2, no flag KVM would refuse.
        let (ev, cr2) = st.events_for(false);
        assert_eq!(ev.flags & KVM_VCPUEVENT_VALID_PAYLOAD, 0);
        assert_eq!((ev.exception.pending, ev.exception.injected), (0, 1));
        assert_eq!((ev.exception.nr, ev.exception.error_code), (14, 2));
        assert_eq!((ev.exception_has_payload, cr2), (0, Some(0x3fe0_0000)));
    }
    use proptest::prelude::*;

    fn sample() -> VcpuState {
        VcpuState {
            regs: kvm_regs {
                rip: 0x10_0000,
                rax: 0xdead_beef,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            msrs: vec![
                (0x277, 0x0007_0406_0007_0406),
                (0xc000_0082, 0xffff_8000_0000_1000),
            ],
            lapic: kvm_lapic_state::default(),
            mp_state: kvm_mp_state::default(),
            events: kvm_vcpu_events::default(),
        }
    }

    #[test]
    fn bytes_round_trip() {
        let b = sample().to_bytes();
        let back = VcpuState::from_bytes(&b).unwrap();
        assert_eq!(back.regs.rax, 0xdead_beef);
        assert_eq!(back.msrs, sample().msrs);
        assert_eq!(back.to_bytes(), b);
    }

    #[test]
    fn every_truncation_and_a_duplicated_section_are_refused() {
        let b = sample().to_bytes();
        for cut in 0..b.len() {
            // Cutting exactly between sections leaves later sections missing: also an error.
            assert!(
                VcpuState::from_bytes(&b[..cut]).is_err(),
                "accepted a cut at {cut}"
            );
        }
        let mut twice = b.clone();
        twice.extend_from_slice(&b[8..8 + 8 + size_of::<kvm_regs>()]);
        assert!(VcpuState::from_bytes(&twice).is_err());
        for msrs in [
            vec![(0xc000_0080, 0)],             // EFER: not ours to write
            vec![(0xc000_0082, 1), (0x277, 2)], // out of order
            vec![(0x277, 1), (0x277, 2)],       // twice
        ] {
            let bytes = VcpuState { msrs, ..sample() }.to_bytes();
            assert!(VcpuState::from_bytes(&bytes).is_err());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..6000), magic in any::<bool>()) {
            if magic && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&VCPU_STATE_MAGIC);
            }
            let _ = VcpuState::from_bytes(&bytes);
        }
    }
}
