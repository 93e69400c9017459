//! The gdb stub (`--gdb`): real gdb debugs the guest over the remote protocol, with
//! every vCPU a thread, also while vCPUs wait for pages.
//!
//! One thread, `ufvmm-gdb`, owns the listening socket and serves one connection at a
//! time ([`session`]); a later gdb connects once the earlier one is gone. The stub
//! never touches a vCPU fd: it stops vCPUs with a [`crate::vcpu::Holder::Debugger`]
//! hold, reads and writes their registers through the parked vCPU's op mailbox
//! ([`crate::vcpu::inspect`]), and reads guest memory only through `get_guest_pages`
//! with a bounded wait ([`memory`]), so no page that has not arrived can hang it.
//!
//! All-stop: whatever stops one vCPU (gdb's interrupt, connecting) stops all of them.
//! The operator's `pause` and gdb's stop are separate holders: a vCPU runs only when
//! neither holds it. `resume` on the control socket does not undo gdb's stop, and gdb's
//! `continue` does not undo a `pause`.

mod breakpoints;
mod memory;
mod monitor;
mod session;
mod target;
pub mod user_trap;

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::ConfigError;
use crate::vm::shared::VmShared;

/// Where the stub listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GdbAddr {
    /// TCP, `HOST:PORT` (a bare `PORT` means 127.0.0.1).
    Tcp(String),
    /// A Unix socket, created with mode 0600.
    Unix(PathBuf),
}

/// Errors of the gdb stub's set-up.
#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    /// The socket could not be set up.
    #[error("--gdb {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

impl FromStr for GdbAddr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return if path.is_empty() {
                Err(ConfigError::Gdb(s.into()))
            } else {
                Ok(GdbAddr::Unix(path.into()))
            };
        }
        if s.parse::<u16>().is_ok() {
            return Ok(GdbAddr::Tcp(format!("127.0.0.1:{s}")));
        }
        match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(GdbAddr::Tcp(s.into())),
            _ => Err(ConfigError::Gdb(s.into())),
        }
    }
}

impl std::fmt::Display for GdbAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GdbAddr::Tcp(a) => write!(f, "{a}"),
            GdbAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What status shows about the debugger.
#[derive(Default)]
pub struct DebugStatus {
    attached: AtomicBool,
    stopped: AtomicBool,
    /// Microseconds the last all-stop took, from asking to every vCPU parked (0: none).
    last_stop_us: AtomicU64,
    /// `--gdb-wait`'s hold is still waiting for a gdb to continue or detach: a
    /// connection that fails before that (bad bytes, dropped) leaves the VM held.
    waiting: AtomicBool,
    /// The Unix socket to remove when the VM ends.
    unix_path: Mutex<Option<PathBuf>>,
    /// Stops vCPUs reported (breakpoints, steps), oldest first; at most one per vCPU
    /// at a time (a vCPU parks after reporting).
    events: Mutex<VecDeque<(usize, DebugStop)>>,
    /// Stops dropped for vCPUs that have stayed stopped since (a step ran another).
    quiet_stops: Mutex<BTreeMap<usize, DebugStop>>,
    /// Software breakpoints by guest-virtual address.
    sw_breakpoints: Mutex<BTreeMap<u64, Int3>>,
    /// vCPUs stopped in a CPL3 trap the guest offered.
    traps: user_trap::UserTraps,
}

/// One of the debugger's `int3`s in guest memory.
#[derive(Clone, Copy, Debug)]
struct Int3 {
    /// Where it is, guest-physical (so it can be put back without any vCPU's page
    /// tables at hand).
    gpa: u64,
    /// The byte it replaced.
    orig: u8,
}

/// What stopped a vCPU for the debugger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugStop {
    /// Its `int3` at one of the debugger's software breakpoints.
    SwBreak,
    /// A hardware breakpoint.
    HwBreak,
    /// A single step done.
    Step,
}

impl DebugStop {
    /// The stop a `KVM_EXIT_DEBUG` stands for: DR6.BS is a step, B0-B3 a hardware
    /// breakpoint, exception 3 (`int3` intercepted, on hardware KVM) a software one.
    pub fn from_exit(exception: u32, dr6: u64) -> Self {
        if exception == 3 {
            DebugStop::SwBreak
        } else if dr6 & (1 << 14) != 0 {
            DebugStop::Step
        } else if dr6 & 0xf != 0 {
            DebugStop::HwBreak
        } else {
            DebugStop::Step
        }
    }
}

impl DebugStatus {
    /// A gdb is connected.
    pub fn attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// The VM is stopped by gdb.
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// True if the debugger has a software breakpoint at `gva`.
    pub fn is_sw_breakpoint(&self, gva: u64) -> bool {
        self.attached() && lock(&self.sw_breakpoints).contains_key(&gva)
    }

    /// A vCPU stopped for the debugger (it parks next).
    pub fn report(&self, vcpu: usize, stop: DebugStop) {
        lock(&self.events).push_back((vcpu, stop));
    }

    /// The stop vCPU `vcpu` reported that is not passed on to gdb (another's was).
    fn pending_stop(&self, vcpu: usize) -> Option<DebugStop> {
        let queued = lock(&self.events)
            .iter()
            .find(|(v, _)| *v == vcpu)
            .map(|(_, s)| *s);
        queued.or_else(|| lock(&self.quiet_stops).get(&vcpu).copied())
    }

    fn take_event(&self) -> Option<(usize, DebugStop)> {
        lock(&self.events).pop_front()
    }

    /// Forgets stops not reported (all-stop: a vCPU that hit a breakpoint while
    /// another's stop was reported hits it again when it runs on, as gdb expects).
    /// Those of vCPUs that stay stopped (not `released`) are kept, for their thread
    /// text only.
    fn drop_events(&self, released: &[usize]) {
        let mut events = lock(&self.events);
        let mut quiet = lock(&self.quiet_stops);
        quiet.retain(|v, _| !released.contains(v));
        for (v, stop) in events.drain(..) {
            if !released.contains(&v) {
                quiet.insert(v, stop);
            }
        }
    }

    /// How long the last all-stop took (microseconds), if there was one.
    pub fn last_stop_us(&self) -> Option<u64> {
        let us = self.last_stop_us.load(Ordering::Acquire);
        (us > 0).then_some(us)
    }

    fn set_stop_us(&self, us: u64) {
        self.last_stop_us.store(us.max(1), Ordering::Release);
    }

    fn waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    fn set_waiting(&self, w: bool) {
        self.waiting.store(w, Ordering::Release);
    }

    fn set(&self, attached: bool, stopped: bool) {
        self.attached.store(attached, Ordering::Release);
        self.stopped.store(stopped, Ordering::Release);
    }
}

/// A breakpoint or step of the debugger's stopped vCPU `me` (on its thread): tell the
/// stub, and park (at the run loop's top) under the debugger's hold, which the stub
/// extends to every vCPU.
pub fn stop_vcpu(me: &crate::vcpu::VcpuShared, vm: &VmShared, stop: DebugStop) {
    vm.debugger.report(me.id, stop);
    vm.ask(
        me,
        crate::vcpu::Request::Stop(crate::vcpu::Holder::Debugger),
    );
}

/// A bound listening socket, before the VM runs (so a bad address fails the start).
pub enum Listener {
    /// TCP.
    Tcp(std::net::TcpListener),
    /// Unix (the path is removed when the stub's thread ends).
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    /// A Unix socket goes with its listener (also when the VM fails to start after
    /// the bind).
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Listener {
    /// Binds `addr`.
    pub fn bind(addr: &GdbAddr) -> Result<Self, DebugError> {
        let err = |source| DebugError::Listen {
            addr: addr.to_string(),
            source,
        };
        match addr {
            GdbAddr::Tcp(a) => std::net::TcpListener::bind(a)
                .map(Listener::Tcp)
                .map_err(err),
            GdbAddr::Unix(p) => {
                let l = UnixListener::bind(p).map_err(err)?;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
                Ok(Listener::Unix(l, p.clone()))
            }
        }
    }

    /// The address gdb connects to (the port picked, for port 0).
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Starts the stub's thread on `listener` for `vm`. With `wait`, the vCPUs were held
/// before their first instruction (see [`hold_for_gdb`]); the first gdb takes over
/// that hold.
pub fn spawn(listener: Listener, vm: Arc<VmShared>) -> std::io::Result<()> {
    eprintln!("ufvmm: gdb stub listening on {}", listener.local());
    if let Listener::Unix(_, p) = &listener {
        *lock(&vm.debugger.unix_path) = Some(p.clone());
    }
    std::thread::Builder::new()
        .name("ufvmm-gdb".into())
        .spawn(move || session::serve(listener, &vm))
        .map(|_| ())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// At the VM's end: gives an attached gdb up to 1 s to hear how it ended (the stub
/// sees the shutdown within a tick), then removes the stub's Unix socket, if any.
pub fn vm_ended(vm: &VmShared) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while vm.debugger.attached() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    remove_socket(vm);
}

/// Removes the stub's Unix socket, if any.
fn remove_socket(vm: &VmShared) {
    let p = lock(&vm.debugger.unix_path).take();
    if let Some(p) = p {
        let _ = std::fs::remove_file(p);
    }
}

/// `--gdb-wait`: holds every vCPU before its first instruction until a gdb connects
/// and continues.
pub fn hold_for_gdb(vm: &VmShared) {
    for v in vm.vcpus.iter() {
        vm.ask(v, crate::vcpu::Request::Stop(crate::vcpu::Holder::Debugger));
    }
    vm.debugger.set_waiting(true);
    vm.debugger.set(false, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_garbage_is_refused() {
        assert_eq!(
            "1234".parse::<GdbAddr>().ok(),
            Some(GdbAddr::Tcp("127.0.0.1:1234".into()))
        );
        assert_eq!(
            "0.0.0.0:99".parse::<GdbAddr>().ok(),
            Some(GdbAddr::Tcp("0.0.0.0:99".into()))
        );
        assert_eq!(
            "unix:/tmp/g".parse::<GdbAddr>().ok(),
            Some(GdbAddr::Unix("/tmp/g".into()))
        );
        for bad in ["", "unix:", "x", ":1", "h:", "h:70000", "-1"] {
            assert!(bad.parse::<GdbAddr>().is_err(), "{bad:?}");
        }
    }
}
