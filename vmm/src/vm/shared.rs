//! State shared by every thread of a running VM, and the events they send the main
//! thread.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::fault::{new_histogram, FaultLayer};
use crate::vcpu::{Request, VcpuShared};

/// How a vCPU thread ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest said this vCPU finished, with a status (0 = success).
    Done(u32),
    /// The guest asked to end the VM with an exit code.
    VmExit(u32),
    /// Something went wrong; the message says what.
    Failed(String),
    /// The VM is shutting down.
    Stopped,
}

/// Events the main thread waits for.
#[derive(Debug)]
pub enum VmEvent {
    /// A vCPU thread ended.
    VcpuEnded {
        /// Which.
        id: usize,
        /// How.
        end: VcpuEnd,
    },
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// `quit` on the control socket.
    Quit,
    /// The fault loop died.
    FaultLoopFailed(String),
    /// The outgoing migration completed: the guest runs on the destination now.
    Migrated(String),
    /// An incoming migration failed before the guest started here.
    MigrationFailed(String),
}

/// The guest console: bytes from port 0x3f8, printed a whole line at a time.
pub struct Console {
    lines: Mutex<Vec<Vec<u8>>>,
}

/// Longest console line kept before it is printed anyway.
const MAX_LINE: usize = 1024;

impl Console {
    /// A console for `n` vCPUs.
    pub fn new(n: usize) -> Self {
        Console {
            lines: Mutex::new(vec![Vec::new(); n]),
        }
    }

    /// One byte from vCPU `id`.
    pub fn put(&self, id: usize, b: u8) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let Some(buf) = lines.get_mut(id) else {
            return;
        };
        let done = push_byte(buf, b);
        drop(lines);
        if let Some(text) = done {
            self.line(id, &text);
        }
    }

    /// A whole line attributed to vCPU `id`.
    pub fn line(&self, id: usize, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[vcpu{id}] {text}");
        let _ = out.flush();
    }
}

/// Adds one console byte to `buf`; returns a line to print when `b` ends it or `buf`
/// is full. A byte that overflows a full line starts the next one: nothing is lost.
fn push_byte(buf: &mut Vec<u8>, b: u8) -> Option<String> {
    if b == b'\n' {
        let text = String::from_utf8_lossy(buf).into_owned();
        buf.clear();
        return Some(text);
    }
    if b == b'\r' {
        return None;
    }
    let full = (buf.len() >= MAX_LINE).then(|| {
        let text = String::from_utf8_lossy(buf).into_owned();
        buf.clear();
        text
    });
    buf.push(b);
    full
}

/// Everything the VM's threads share.
pub struct VmShared {
    /// Pages, requests, waiting.
    pub fault: Arc<FaultLayer>,
    /// The vCPUs.
    pub vcpus: Arc<[Arc<VcpuShared>]>,
    /// Which CPUs the fault loop and the vCPU threads run on.
    pub placement: super::placement::Placement,
    /// Set once the VM is going away: every wait ends, every vCPU stops.
    shutdown: AtomicBool,
    events: Mutex<Sender<VmEvent>>,
    /// Kick-to-acknowledgement latency in microseconds.
    pub kick_latency_us: Mutex<Histogram<u64>>,
    /// Pause latencies in microseconds.
    pub pause_latency_us: Mutex<Histogram<u64>>,
    /// Guest console.
    pub console: Console,
    /// Mailbox messages printed.
    pub mailbox_count: AtomicU64,
    /// When the VM started.
    pub started: Instant,
    /// Guest TSC frequency (0 if KVM does not say).
    pub tsc_khz: u64,
    /// The first SIGINT/SIGTERM seen (0 = none); ends even uninterruptible VMM waits.
    pub interrupted: crate::control::signals::Interrupted,
    /// What this host's KVM can do for the VM.
    pub caps: HostCaps,
    /// Whether a debugger is attached, and whether it stopped the VM.
    pub debugger: crate::debug::DebugStatus,
    /// The migration in progress or done, if any.
    pub migration: Mutex<Option<Arc<crate::migration::Progress>>>,
    vm_fd: Arc<kvm_ioctls::VmFd>,
}

/// What the host's KVM offers that changes how vCPU state is read and written.
#[derive(Clone, Debug, Default)]
pub struct HostCaps {
    /// MSR indexes this host's KVM can save and restore.
    pub msrs: Vec<u32>,
    /// `KVM_CAP_EXCEPTION_PAYLOAD` is on for this VM (see `vcpu::state`).
    pub exception_payload: bool,
}

impl VmShared {
    /// Shared state for a VM.
    pub fn new(
        vm_fd: Arc<kvm_ioctls::VmFd>,
        fault: Arc<FaultLayer>,
        vcpus: Arc<[Arc<VcpuShared>]>,
        events: Sender<VmEvent>,
        tsc_khz: u64,
        interrupted: crate::control::signals::Interrupted,
        caps: HostCaps,
    ) -> Self {
        let n = vcpus.len();
        VmShared {
            placement: super::placement::Placement::plan(n),
            fault,
            vcpus,
            shutdown: AtomicBool::new(false),
            events: Mutex::new(events),
            kick_latency_us: Mutex::new(new_histogram()),
            pause_latency_us: Mutex::new(new_histogram()),
            console: Console::new(n),
            mailbox_count: AtomicU64::new(0),
            started: Instant::now(),
            tsc_khz,
            interrupted,
            caps,
            debugger: Default::default(),
            migration: Mutex::new(None),
            vm_fd,
        }
    }

    /// The migration, if one started.
    pub fn migration(&self) -> Option<Arc<crate::migration::Progress>> {
        self.migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Turns KVM dirty-page logging of guest RAM on or off.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), vmm_sys_util::errno::Error> {
        let ram = &self.fault.ram;
        for (slot, r) in ram.layout().regions().enumerate() {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if on {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: ram.host_base() + r.offset,
            };
            // SAFETY: the same region as registered at build (our own mapping, alive as
            // long as the VM), only its flags change.
            unsafe { self.vm_fd.set_user_memory_region(region) }?;
        }
        Ok(())
    }

    /// Pages written by the guest since the last call (one bit per page index of the
    /// RAM's unit), and clears the log. Dirty logging must be on. KVM logs each slot
    /// per 4 KiB, whatever the page size: a page is dirty if any 4 KiB of it was
    /// written (`RamLayout::fold_dirty_log`). Writes ufvmm made for a vCPU (rule 7),
    /// which KVM does not log, are merged in.
    pub fn dirty_log(&self) -> Result<Vec<u64>, vmm_sys_util::errno::Error> {
        let ram = &self.fault.ram;
        let layout = ram.layout();
        let mut bits = layout.page_bitmap();
        for (slot, r) in layout.regions().enumerate() {
            let log = self.vm_fd.get_dirty_log(slot as u32, r.len as usize)?;
            layout.fold_dirty_log(&r, &log, &mut bits);
        }
        ram.take_vmm_dirty(&mut bits);
        Ok(bits)
    }

    /// Bytes of each vCPU's `kvm_run` mapping (`KVM_GET_VCPU_MMAP_SIZE`).
    pub fn kvm_run_size(&self) -> usize {
        self.vm_fd.run_size()
    }

    /// Injects the wake-up interrupt (a fixed MSI to the vCPU's LAPIC).
    pub fn send_wake_interrupt(&self, id: usize) -> Result<(), vmm_sys_util::errno::Error> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: crate::abi::LAPIC_GPA as u32 | ((id as u32) << 12),
            data: u32::from(crate::abi::WAKE_VECTOR),
            ..Default::default()
        };
        self.vm_fd.signal_msi(msi).map(|_| ())
    }

    /// Sends an event to the main thread (ignored once it stopped listening).
    pub fn send(&self, ev: VmEvent) {
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(ev);
    }

    /// True once shutdown began.
    pub fn is_shutting_down(&self) -> bool {
        // SeqCst, as the store: see `wait_vcpus_exited` on vCPUs not started.
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Begins shutdown: every vCPU is kicked (a parked one leaves its park, whoever
    /// holds it) and every page wait ends. Does not wait.
    pub fn begin_shutdown(&self) {
        let now = Instant::now();
        for v in self.vcpus.iter() {
            v.stall.note_at_stop(now);
        }
        self.shutdown.store(true, Ordering::SeqCst);
        for v in self.vcpus.iter() {
            self.kick(v);
        }
    }

    /// Posts request `r` to vCPU `v` (see [`crate::vcpu::control`]) and rings its
    /// doorbell where the request needs an answer. Returns the kick to wait for
    /// ([`crate::vcpu::kick::Kick::wait_answered`]), or `None` if there is none: no
    /// thread, or a request that needs no answer.
    pub fn ask(&self, v: &VcpuShared, r: Request) -> Option<u64> {
        if v.control.post(r) {
            self.kick(v)
        } else {
            None
        }
    }

    /// Kicks one vCPU (see [`VcpuShared::request_kick`]) and wakes page waits, so a vCPU
    /// waiting in `get_guest_pages` sees the kick at once.
    pub fn kick(&self, v: &VcpuShared) -> Option<u64> {
        let seq = v.request_kick();
        self.fault.poke_waiters();
        seq
    }

    /// Waits until every vCPU thread has ended or `deadline` passes; true if all ended.
    /// A vCPU whose thread has not started (a destination stopped before its
    /// switch-over) is not waited for, once shutdown has begun.
    ///
    /// A thread starting right then cannot slip by: it shows running (SeqCst) before
    /// its first look at shutdown (SeqCst, at the top of its loop), and shutdown was
    /// stored (SeqCst) before this looks at its state. So if this still sees it
    /// created, its look comes later and finds shutdown: it ends before any `KVM_RUN`.
    pub fn wait_vcpus_exited(&self, deadline: Instant) -> bool {
        let shutting_down = self.is_shutting_down();
        loop {
            let gone =
                |v: &Arc<VcpuShared>| v.control.ended() || (!v.control.started() && shutting_down);
            if self.vcpus.iter().all(gone) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{push_byte, MAX_LINE};

    /// Feeds `bytes` through the console's line logic; returns the lines and the rest.
    fn feed(bytes: &[u8]) -> (Vec<String>, Vec<u8>) {
        let mut buf = Vec::new();
        let lines = bytes
            .iter()
            .filter_map(|&b| push_byte(&mut buf, b))
            .collect();
        (lines, buf)
    }

    #[test]
    fn an_overlong_line_is_split_without_losing_a_byte() {
        let text: Vec<u8> = (0..MAX_LINE * 2 + 10)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        let mut input = text.clone();
        input.push(b'\n');
        let (lines, rest) = feed(&input);
        assert!(rest.is_empty());
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() <= MAX_LINE));
        assert_eq!(lines.concat().into_bytes(), text);
    }

    #[test]
    fn newlines_end_lines_and_carriage_returns_vanish() {
        let (lines, rest) = feed(b"one\r\ntwo\n\nthr");
        assert_eq!(lines, ["one", "two", ""]);
        assert_eq!(rest, b"thr");
    }
}
