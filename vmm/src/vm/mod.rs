//! Builds a VM from a [`VmConfig`], runs it to its end, and reports.
//!
//! Threads: main (waits for the end), signals, the fault loop, one per vCPU, and the
//! control socket's. Only the main thread decides when and how the VM ends.

pub mod placement;
pub mod shared;

use std::sync::mpsc::{channel, Receiver, Sender};

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::boot::{self, BootError, BootImage};
use crate::config::{SourceSpec, VmConfig};
use crate::control::{self, report::Ending, signals::Interrupted};
use crate::fault::{
    handler::{FaultLoop, Supply},
    FaultError, FaultLayer, FaultOutcome, GupFlags, Signal,
};
use crate::memory::{GuestRam, MemoryError, PageState};
use crate::source::link::LinkModel;
use crate::source::{ImageSource, Overlay, PageData, PageSource, SourceError, ZeroSource};
use crate::vcpu::{self, stalls::Stalls, VcpuShared};
use shared::{HostCaps, VcpuEnd, VmEvent, VmShared};

/// Errors that stop a VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The gdb stub's socket.
    #[error(transparent)]
    Debug(#[from] crate::debug::DebugError),
    /// /dev/kvm cannot be opened.
    #[error("cannot open {path}: {source}; {hint}")]
    Kvm {
        /// The device path.
        path: String,
        /// The error.
        source: vmm_sys_util::errno::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The error.
        source: vmm_sys_util::errno::Error,
    },
    /// Too many vCPUs for this host.
    #[error("--vcpus {0}: this host's KVM allows at most {1}")]
    TooManyVcpus(usize, usize),
    /// More guest RAM than the host has (a migration source's size, on a destination).
    #[error("guest RAM of {mib} MiB: more than this host's RAM ({host_mib} MiB in /proc/meminfo)")]
    HostMem {
        /// The guest's RAM in MiB.
        mib: u64,
        /// The host's `MemTotal` in MiB.
        host_mib: u64,
    },
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The boot image.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The page source.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The fault layer.
    #[error(transparent)]
    Fault(#[from] FaultError),
    /// vCPU setup.
    #[error(transparent)]
    Setup(#[from] vcpu::setup::SetupError),
    /// The control socket.
    #[error(transparent)]
    Api(#[from] control::api::ApiError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    /// The migration listener cannot be bound.
    #[error("--listen {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// A destination refused a migration whose guest RAM it cannot hold (in 2 MiB
    /// pages, with a hugetlb pool too short).
    #[error("incoming: refused the migration from {peer} (no-memory): its guest RAM is in 2 MiB pages, and {source}")]
    NoRoom {
        /// The source's address.
        peer: String,
        /// What the pool check said.
        source: MemoryError,
    },
    /// SIGINT or SIGTERM arrived while the VM was being set up.
    #[error("interrupted by signal {0} during set-up")]
    Interrupted(i32),
}

impl VmError {
    /// The process exit code for this error: 128 + signal for an interrupted set-up.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmError::Interrupted(sig) => (128 + sig).clamp(0, 255) as u8,
            _ => 1,
        }
    }
}

fn ioctl(what: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// Opens KVM; the device path can be overridden (for tests) with `UFVMM_KVM_DEVICE`.
fn open_kvm() -> Result<Kvm, VmError> {
    let path = std::env::var("UFVMM_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
    let cpath = std::ffi::CString::new(path.clone()).map_err(|_| VmError::Kvm {
        path: path.clone(),
        source: vmm_sys_util::errno::Error::new(libc::EINVAL),
        hint: "the path has a NUL byte",
    })?;
    Kvm::new_with_path(&cpath).map_err(|source| VmError::Kvm {
        hint: match source.errno() {
            libc::ENOENT => {
                "KVM is not available: load the kvm module or run on a host with virtualization"
            }
            libc::EACCES | libc::EPERM => {
                "permission denied: add your user to the 'kvm' group or run as root"
            }
            _ => "is this a KVM device?",
        },
        path,
        source,
    })
}

/// A VM ready to run.
pub(crate) struct Built {
    /// What its threads share.
    pub vm: Arc<VmShared>,
    /// The vCPUs, for their threads.
    pub fds: Vec<VcpuFd>,
    /// The fault loop, to be started.
    pub fault_loop: Option<FaultLoop>,
}

fn make_source(cfg: &VmConfig, image: BootImage) -> Result<Box<dyn PageSource>, VmError> {
    let base: Box<dyn PageSource> = match &cfg.source {
        SourceSpec::Zero => Box::new(ZeroSource),
        SourceSpec::Image(path) => Box::new(ImageSource::open(path, cfg.mem)?),
    };
    Ok(Box::new(Overlay::new(image.pages, base)))
}

/// Without userfaultfd everything is filled in before the guest starts (a signal stops
/// it: a 3 GiB image takes a while).
fn prefill(ram: &GuestRam, source: &mut dyn PageSource, stop: &Interrupted) -> Result<(), VmError> {
    let mut buf = vec![0u8; ram.page_size() as usize];
    for idx in 0..ram.pages.len() {
        let sig = stop.load(std::sync::atomic::Ordering::Acquire);
        if sig != 0 {
            return Err(VmError::Interrupted(sig));
        }
        if source.read_page(idx, &mut buf)? == PageData::Bytes {
            ram.install(idx, Some(&buf), false)?;
        }
    }
    Ok(())
}

/// A KVM VM with guest RAM and vCPUs, before they are given a state.
struct Machine {
    kvm: Kvm,
    vm_fd: VmFd,
    ram: Arc<GuestRam>,
    fds: Vec<VcpuFd>,
    cpuid: kvm_bindings::CpuId,
    tsc_khz: u64,
    /// `KVM_CAP_EXCEPTION_PAYLOAD` took.
    exception_payload: bool,
}

fn create_machine(vcpus: usize, mem: u64, uffd: bool, huge: bool) -> Result<Machine, VmError> {
    let kvm = open_kvm()?;
    crate::config::check_host_mem(mem).map_err(|host_mib| VmError::HostMem {
        mib: mem >> 20,
        host_mib,
    })?;
    let max = kvm.get_max_vcpus();
    if vcpus > max {
        return Err(VmError::TooManyVcpus(vcpus, max));
    }
    let vm_fd: VmFd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    // Needed on Intel for the in-kernel irqchip; harmless elsewhere.
    let _ = vm_fd.set_tss_address(0xfffb_d000);
    vm_fd
        .create_irq_chip()
        .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    // Exception payloads: a #PF KVM queues keeps its address with it instead of
    // writing CR2 at once (on kernels that defer the payload to injection, as this
    // host's does), so a #PF that a poisoned page-table walk queued can be cancelled
    // without a trace (rule 7, `vcpu::poison::cancel_walk_fault`). Where KVM lacks it,
    // a cancelled #PF leaves CR2 changed, as it did before.
    let payload = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_EXCEPTION_PAYLOAD,
        args: [1, 0, 0, 0],
        ..Default::default()
    };
    let exception_payload = vm_fd.enable_cap(&payload).is_ok();

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;

    let ram = Arc::new(GuestRam::new(mem, uffd, huge)?);
    // One KVM slot per RAM region, both in the one host mapping (`memory::layout`).
    for (slot, r) in ram.layout().regions().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.gpa,
            memory_size: r.len,
            userspace_addr: ram.host_base() + r.offset,
        };
        // SAFETY: the region is part of our own mapping of `mem` bytes, which lives (in
        // `ram`, held by the fault layer) until the process exits.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    }

    let mut fds = Vec::with_capacity(vcpus);
    for id in 0..vcpus {
        fds.push(
            vm_fd
                .create_vcpu(id as u64)
                .map_err(ioctl("KVM_CREATE_VCPU"))?,
        );
    }
    let tsc_khz = fds[0].get_tsc_khz().unwrap_or(0) as u64;
    Ok(Machine {
        kvm,
        vm_fd,
        ram,
        fds,
        cpuid,
        tsc_khz,
        exception_payload,
    })
}

/// Wraps a machine into the state its threads share, with a fault loop on `supply`.
fn assemble(
    m: Machine,
    tx: Sender<VmEvent>,
    interrupted: Interrupted,
    supply: impl FnOnce(&Arc<FaultLayer>) -> Option<Supply>,
) -> Result<Built, VmError> {
    let (fault, req_rx) = FaultLayer::new(m.ram.clone(), m.fds.len())?;
    let vcpus: Arc<[Arc<VcpuShared>]> = (0..m.fds.len())
        .map(|i| Arc::new(VcpuShared::new(i)))
        .collect();
    let caps = HostCaps {
        msrs: m
            .kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default(),
        exception_payload: m.exception_payload,
    };
    let vm = Arc::new(VmShared::new(
        Arc::new(m.vm_fd),
        fault.clone(),
        vcpus.clone(),
        tx,
        m.tsc_khz,
        interrupted,
        caps,
    ));
    let fault_loop = supply(&fault).map(|s| FaultLoop::new(fault, req_rx, s, Stalls::new(vcpus)));
    Ok(Built {
        vm,
        fds: m.fds,
        fault_loop,
    })
}

fn build(cfg: &VmConfig, tx: Sender<VmEvent>, interrupted: Interrupted) -> Result<Built, VmError> {
    let (elf_name, elf) = boot::read_elf(cfg.kernel.as_deref())?;
    let m = create_machine(cfg.vcpus, cfg.mem, !cfg.no_uffd, cfg.hugepages)?;
    let image = boot::build(&elf_name, &elf, cfg, m.tsc_khz)?;
    for (id, fd) in m.fds.iter().enumerate() {
        vcpu::setup::configure(fd, id, image.entry, &m.cpuid)?;
    }
    let mut source = make_source(cfg, image)?;
    let critical = if cfg.no_uffd {
        prefill(&m.ram, source.as_mut(), &interrupted)?;
        if cfg.prefault {
            m.ram.populate()?;
        }
        0
    } else {
        serve_critical(&m.ram, source.as_mut(), &m.fds)?
    };
    let link = match &cfg.link {
        Some(spec) => LinkModel::new(spec.clone(), Instant::now()),
        None => LinkModel::ideal(Instant::now()),
    };
    let no_uffd = cfg.no_uffd;
    let built = assemble(m, tx, interrupted, move |_| {
        (!no_uffd).then_some(Supply::Local { source, link })
    })?;
    let mut built = built;
    built.fault_loop = built.fault_loop.map(|l| l.with_policies(cfg.policies));
    built
        .vm
        .fault
        .stats
        .critical
        .store(critical, std::sync::atomic::Ordering::Relaxed);
    Ok(built)
}

/// Installs, before any vCPU runs and past the link model, the pages that KVM's walk
/// of the guest's page tables and its event delivery need for each vCPU's state
/// ([`vcpu::critical`]), as a migration destination gets them with the switch-over:
/// a wait for one of those must not be poisoned (rule 7), so none may be left to the
/// link. Returns how many were installed.
fn serve_critical(
    ram: &GuestRam,
    source: &mut dyn PageSource,
    fds: &[VcpuFd],
) -> Result<u64, VmError> {
    // Only the last page read is kept: a walk reads a table's entries one after another,
    // and a hostile image must not make this hold a copy of guest RAM (review).
    let mut cached: Option<(usize, PageData)> = None;
    let page = ram.page_size();
    let mut buf = vec![0u8; page as usize];
    let mut wanted = std::collections::BTreeSet::new();
    for fd in fds {
        let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let rsp = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?.rsp;
        let mut failed = None;
        let mut read = |gpa: u64| -> Option<u64> {
            let idx = ram.page_of(gpa)?;
            let off = (gpa % page) as usize;
            if idx >= ram.pages.len() || off + 8 > page as usize {
                return None;
            }
            let data = match cached {
                Some((i, d)) if i == idx => d,
                _ => match source.read_page(idx, &mut buf) {
                    Ok(d) => {
                        cached = Some((idx, d));
                        d
                    }
                    Err(e) => {
                        failed = Some(e);
                        return None;
                    }
                },
            };
            match data {
                PageData::Bytes => Some(u64::from_le_bytes(buf[off..off + 8].try_into().ok()?)),
                PageData::Zero => Some(0),
            }
        };
        wanted.extend(vcpu::critical::critical_pages(&sregs, rsp, &mut read));
        if let Some(e) = failed {
            return Err(e.into());
        }
    }
    // In pages of the RAM unit: with huge pages several 4 KiB tables share one.
    let indices: std::collections::BTreeSet<usize> =
        wanted.iter().filter_map(|&gpa| ram.page_of(gpa)).collect();
    for &idx in &indices {
        let data = match source.read_page(idx, &mut buf)? {
            PageData::Bytes => Some(&buf[..]),
            PageData::Zero => None,
        };
        ram.install(idx, data, false)?;
        ram.pages.set(idx, PageState::Present);
    }
    Ok(indices.len() as u64)
}

/// Builds a migration destination: `vcpus` vCPUs (CPUID set, state to come from the
/// source) and `mem` bytes of RAM, all missing, served from a remote source.
pub(crate) fn build_incoming(
    vcpus: usize,
    mem: u64,
    tx: Sender<VmEvent>,
    interrupted: Interrupted,
    huge: bool,
    supply: impl FnOnce(&Arc<FaultLayer>) -> Supply,
) -> Result<Built, VmError> {
    // In the source's page size (its hello says): 2 MiB pages are hugetlb here too.
    let m = create_machine(vcpus, mem, true, huge)?;
    for (id, fd) in m.fds.iter().enumerate() {
        vcpu::setup::configure(fd, id, 0, &m.cpuid)?;
    }
    assemble(m, tx, interrupted, |f| Some(supply(f)))
}

/// What the main thread saw end the run.
enum Finish {
    AllDone,
    GuestExit(u32),
    Failed(String),
    Signal(i32),
    Quit,
    Migrated(String),
}

fn wait_for_end(vm: &VmShared, rx: &Receiver<VmEvent>) -> (Finish, Vec<Option<VcpuEnd>>) {
    let mut ends: Vec<Option<VcpuEnd>> = vec![None; vm.vcpus.len()];
    let finish = loop {
        let Ok(ev) = rx.recv() else {
            break Finish::Failed("every thread of the VM is gone".into());
        };
        match ev {
            VmEvent::VcpuEnded { id, end } => {
                if let Some(slot) = ends.get_mut(id) {
                    *slot = Some(end.clone());
                }
                match end {
                    VcpuEnd::VmExit(code) => break Finish::GuestExit(code),
                    VcpuEnd::Failed(msg) => break Finish::Failed(format!("vcpu {id}: {msg}")),
                    VcpuEnd::Done(_) | VcpuEnd::Stopped => {
                        if ends.iter().all(|e| matches!(e, Some(VcpuEnd::Done(_)))) {
                            break Finish::AllDone;
                        }
                    }
                }
            }
            VmEvent::Signal(sig) => break Finish::Signal(sig),
            VmEvent::Quit => break Finish::Quit,
            VmEvent::FaultLoopFailed(msg) => break Finish::Failed(format!("fault loop: {msg}")),
            VmEvent::Migrated(to) => break Finish::Migrated(to),
            VmEvent::MigrationFailed(msg) => break Finish::Failed(format!("migration: {msg}")),
        }
    };
    (finish, ends)
}

fn ending(finish: &Finish, ends: &[Option<VcpuEnd>], vm: &VmShared) -> Ending {
    let mk = |reason: String, exit_code: i32, guest: Option<u32>| Ending {
        reason,
        exit_code,
        guest_exit_code: guest,
    };
    match finish {
        Finish::AllDone => {
            let failed: Vec<String> = ends
                .iter()
                .enumerate()
                .filter_map(|(id, e)| match e {
                    Some(VcpuEnd::Done(s)) if *s != 0 => {
                        let mism = vm.vcpus[id]
                            .results
                            .lock()
                            .ok()
                            .and_then(|r| r.map(|r| r.mismatches))
                            .unwrap_or(0);
                        Some(format!("vcpu {id} status {s} ({mism} mismatches)"))
                    }
                    _ => None,
                })
                .collect();
            if failed.is_empty() {
                mk(
                    "guest finished: every vcpu reported success".into(),
                    0,
                    Some(0),
                )
            } else {
                mk(format!("guest failed: {}", failed.join(", ")), 1, Some(1))
            }
        }
        Finish::GuestExit(code) => mk(
            format!("guest exited with code {code}"),
            (*code).min(255) as i32,
            Some(*code),
        ),
        Finish::Failed(msg) => mk(msg.clone(), 1, None),
        Finish::Signal(sig) => Ending::stopped(Some(*sig)),
        Finish::Quit => Ending::stopped(None),
        Finish::Migrated(to) => mk(format!("migrated to {to}"), 0, None),
    }
}

/// Writes guest RAM to `path` in page-index order (the low region, then the high one:
/// `--mem` bytes, as an image file holds them), fetching missing pages through
/// `get_guest_pages`. A signal stops it.
fn dump_memory(vm: &VmShared, path: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    let ram = &vm.fault.ram;
    let signal = || {
        if vm.interrupted.load(std::sync::atomic::Ordering::Acquire) != 0 {
            Signal::Fatal
        } else {
            Signal::None
        }
    };
    // Ask for everything first so the link streams it while we write.
    let flags = GupFlags {
        nowait: true,
        ..GupFlags::default()
    };
    for r in ram.layout().regions() {
        let _ = vm
            .fault
            .get_guest_pages(r.gpa, r.len as usize, flags, &signal);
    }
    let mut f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; (64 * crate::abi::PAGE_SIZE) as usize];
    for r in ram.layout().regions() {
        // Regions are 2 MiB multiples: whole buffers.
        let mut gpa = r.gpa;
        while gpa < r.gpa + r.len {
            match vm.fault.read(gpa, &mut buf, GupFlags::default(), &signal) {
                FaultOutcome::Done => {}
                other => return Err(format!("page at {gpa:#x}: {other:?}")),
            }
            f.write_all(&buf).map_err(|e| e.to_string())?;
            gpa += buf.len() as u64;
        }
    }
    f.sync_all().map_err(|e| e.to_string())
}

/// Signal handling and the main thread's event channel, set up before anything else.
pub(crate) struct Plumbing {
    /// Events to the main thread.
    pub tx: Sender<VmEvent>,
    /// The main thread's end.
    pub rx: Receiver<VmEvent>,
    /// The first SIGINT/SIGTERM.
    pub interrupted: Interrupted,
}

/// Blocks signals on this (and every later) thread, installs the kick handler and
/// starts the signal thread.
pub(crate) fn plumbing() -> Result<Plumbing, VmError> {
    control::signals::block_all();
    vcpu::kick::install_handler().map_err(VmError::Signals)?;
    vcpu::poison::install_handler().map_err(VmError::Signals)?;
    let (tx, rx) = channel();
    let interrupted = Interrupted::default();
    control::signals::spawn(tx.clone(), interrupted.clone()).map_err(VmError::Signals)?;
    Ok(Plumbing {
        tx,
        rx,
        interrupted,
    })
}

/// Starts the fault loop and the control socket.
pub(crate) fn start_helpers(
    fault_loop: Option<FaultLoop>,
    vm: &Arc<VmShared>,
    api_sock: Option<&std::path::Path>,
) -> Result<(), VmError> {
    if let Some(fl) = fault_loop {
        let vm2 = vm.clone();
        std::thread::Builder::new()
            // `GuestRam::install_run` checks this name (DONTWAKE only here).
            .name("ufvmm-fault".into())
            .spawn(move || {
                let spin = vm2.placement.enter_fault_loop();
                let run = std::panic::AssertUnwindSafe(|| fl.run(spin));
                let err = match std::panic::catch_unwind(run) {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "the fault loop panicked".into(),
                };
                vm2.send(VmEvent::FaultLoopFailed(err));
            })
            .map_err(VmError::Thread)?;
    }
    if let Some(path) = api_sock {
        control::api::spawn(path, control::api::Target::with_vm(vm.clone()))?;
    }
    Ok(())
}

/// Starts one thread per vCPU.
pub(crate) fn spawn_vcpus(vm: &Arc<VmShared>, fds: Vec<VcpuFd>) -> Result<(), VmError> {
    for (id, fd) in fds.into_iter().enumerate() {
        let me = vm.vcpus[id].clone();
        let vm2 = vm.clone();
        std::thread::Builder::new()
            .name(format!("ufvmm-vcpu{id}"))
            .spawn(move || {
                vm2.placement.enter_vcpu();
                vcpu::run::run(fd, me, vm2)
            })
            .map_err(VmError::Thread)?;
    }
    Ok(())
}

/// Where the end of a run is written.
pub(crate) struct Outputs<'a> {
    /// `--report`.
    pub report: Option<&'a std::path::Path>,
    /// `--api-sock` (removed at the end).
    pub api_sock: Option<&'a std::path::Path>,
    /// `--dump-memory`.
    pub dump_memory: Option<&'a std::path::Path>,
    /// The report's `config` object.
    pub config: serde_json::Value,
    /// Called once the end is decided, just before the vCPUs are told to stop.
    pub before_shutdown: Option<&'a dyn Fn()>,
}

/// Waits for the VM's end, stops it, reports; returns the process exit code.
pub(crate) fn finish(vm: &Arc<VmShared>, rx: &Receiver<VmEvent>, out: Outputs) -> i32 {
    let (finish, ends) = wait_for_end(vm, rx);
    let mut end = ending(&finish, &ends, vm);
    if matches!(finish, Finish::Failed(_)) {
        eprintln!("ufvmm: error: {}", end.reason);
    }
    if let Some(f) = out.before_shutdown {
        f();
    }
    vm.begin_shutdown();
    // vCPUs that can be interrupted leave now; any in a stall that ignores signals are
    // ended by the process exit (a fatal signal), which the kernel always lets in.
    vm.wait_vcpus_exited(Instant::now() + Duration::from_millis(300));
    if let (Some(path), Finish::AllDone | Finish::GuestExit(_)) = (out.dump_memory, &finish) {
        if let Err(e) = dump_memory(vm, path) {
            eprintln!("ufvmm: error: --dump-memory {}: {e}", path.display());
            end.exit_code = end.exit_code.max(1);
            let sig = vm.interrupted.load(std::sync::atomic::Ordering::Acquire);
            if sig != 0 {
                end.reason = format!(
                    "{}; the memory dump was stopped by signal {sig}",
                    end.reason
                );
                end.exit_code = 128 + sig;
            }
        }
    }
    vm.fault.stop();
    control::report::print_summary(vm, &end);
    if let Some(path) = out.report {
        let doc = control::report::report(vm, out.config, &end);
        if let Err(e) = control::report::write(path, &doc) {
            eprintln!("ufvmm: error: --report {}: {e}", path.display());
            end.exit_code = end.exit_code.max(1);
        }
    }
    if let Some(path) = out.api_sock {
        let _ = std::fs::remove_file(path);
    }
    crate::debug::vm_ended(vm);
    end.exit_code
}

/// Starts the migration of `--migrate-to` once `--migrate-at` has passed.
fn schedule_migration(vm: &Arc<VmShared>, cfg: &VmConfig) -> Result<(), VmError> {
    let Some(to) = cfg.migrate_to.clone() else {
        return Ok(());
    };
    let plan = crate::migration::outgoing::Plan {
        to,
        precopy_rounds: cfg.precopy_rounds,
    };
    let at = vm.started + cfg.migrate_at;
    let vm = vm.clone();
    std::thread::Builder::new()
        .name("ufvmm-migrate-at".into())
        .spawn(move || {
            while Instant::now() < at {
                if vm.is_shutting_down() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10).min(at - Instant::now()));
            }
            if let Err(e) = crate::migration::outgoing::start(&vm, plan) {
                eprintln!("ufvmm: cannot migrate: {e}");
            }
        })
        .map_err(VmError::Thread)?;
    Ok(())
}

/// Runs a VM to its end and returns the process exit code.
pub fn run(cfg: &VmConfig) -> Result<i32, VmError> {
    let p = plumbing()?;
    let Built {
        vm,
        fds,
        fault_loop,
    } = build(cfg, p.tx, p.interrupted)?;
    let gdb = cfg
        .gdb
        .as_ref()
        .map(crate::debug::Listener::bind)
        .transpose()?;
    start_helpers(fault_loop, &vm, cfg.api_sock.as_deref())?;
    if let Some(l) = gdb {
        if cfg.gdb_wait {
            crate::debug::hold_for_gdb(&vm);
        }
        crate::debug::spawn(l, vm.clone()).map_err(VmError::Thread)?;
    }
    schedule_migration(&vm, cfg)?;
    // After the helper threads (they keep SIGUSR1 blocked) and before the vCPUs: a stray
    // process-wide SIGUSR1 lands on this thread, never on a vCPU that might not take it.
    control::signals::unblock_usr1();
    spawn_vcpus(&vm, fds)?;
    Ok(finish(
        &vm,
        &p.rx,
        Outputs {
            report: cfg.report.as_deref(),
            api_sock: cfg.api_sock.as_deref(),
            dump_memory: cfg.dump_memory.as_deref(),
            config: control::report::config_json(cfg, vm.tsc_khz),
            before_shutdown: None,
        },
    ))
}
