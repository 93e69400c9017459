//! One gdb connection at a time: accept, stop the VM (gdb expects a stopped target),
//! drive gdbstub's state machine, and on any end (detach, a dropped connection, bad
//! bytes, the VM ending) let the VM run on.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use gdbstub::conn::ConnectionExt;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub};

use super::target::GuestTarget;
use super::Listener;
use crate::vm::shared::{VmEvent, VmShared};

/// The longest packet taken from gdb (it is told this size, and sends no longer).
const PACKET_BUFFER: usize = 16 << 10;

/// How often a waiting stub looks at whether the VM is ending.
const TICK: Duration = Duration::from_millis(50);

/// The stub thread's body: serves connections one after the other until the VM ends.
pub(super) fn serve(listener: Listener, vm: &Arc<VmShared>) {
    loop {
        if vm.is_shutting_down() {
            break;
        }
        let served = match &listener {
            Listener::Tcp(l) => accept(l.as_raw_fd(), vm)
                .and_then(|()| l.accept().ok())
                .map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    // A peer that stops reading cannot hold the stub for good.
                    let _ = s.set_write_timeout(Some(WRITE_BOUND));
                    guarded(s, vm)
                }),
            Listener::Unix(l, _) => accept(l.as_raw_fd(), vm)
                .and_then(|()| l.accept().ok())
                .map(|(s, _)| {
                    let _ = s.set_write_timeout(Some(WRITE_BOUND));
                    if peer_is_us(&s) {
                        guarded(s, vm)
                    } else {
                        Err("a peer of another user; refused".into())
                    }
                }),
        };
        match served {
            Some(Ok(DisconnectReason::Kill)) => {
                eprintln!("ufvmm: gdb: kill: stopping the VM");
                vm.send(VmEvent::Quit);
            }
            Some(Ok(_)) => eprintln!("ufvmm: gdb: detached; the VM runs on"),
            Some(Err(e)) if vm.debugger.waiting() => {
                eprintln!("ufvmm: gdb: {e}; connection closed, the VM stays held (--gdb-wait)")
            }
            Some(Err(e)) => eprintln!("ufvmm: gdb: {e}; connection closed, the VM runs on"),
            None => {}
        }
    }
    // The listener's drop removes a Unix socket.
    drop(listener);
}

/// Longest a write to gdb may block.
const WRITE_BOUND: Duration = Duration::from_secs(5);

/// True if the Unix peer runs as this process's user (or as root): the socket's mode
/// 0600 is set just after it is bound, and this closes that window.
fn peer_is_us(s: &std::os::unix::net::UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of `len` bytes on a valid socket fd.
    let ok = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    } == 0;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    ok && (cred.uid == me || cred.uid == 0)
}

/// [`run`], with a panic (a gdbstub bug a peer found) ending only the connection: the
/// target's drop has let the VM go, and `--gdb-wait`'s hold is lifted too.
fn guarded<C>(conn: C, vm: &Arc<VmShared>) -> Result<DisconnectReason, String>
where
    C: ConnectionExt<Error = std::io::Error> + AsRawFd,
{
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(conn, vm))) {
        Ok(r) => r,
        Err(_) => {
            if vm.debugger.waiting() {
                vm.debugger.set_waiting(false);
                for v in vm.vcpus.iter() {
                    vm.ask(
                        v,
                        crate::vcpu::Request::Release(crate::vcpu::Holder::Debugger),
                    );
                }
                vm.debugger.set(false, false);
            }
            Err("the stub failed on that connection's packets".into())
        }
    }
}

/// Waits until the listener has a connection (`Some`) or the VM is ending (`None`).
fn accept(fd: i32, vm: &VmShared) -> Option<()> {
    ready(fd, vm).then_some(())
}

/// Waits until `fd` is readable (true) or the VM is ending (false).
fn ready(fd: i32, vm: &VmShared) -> bool {
    loop {
        if vm.is_shutting_down() {
            return false;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a bounded timeout.
        let n = unsafe { libc::poll(&mut p, 1, TICK.as_millis() as i32) };
        if n > 0 {
            return true;
        }
        if n < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Serves one connection to its end.
fn run<C>(conn: C, vm: &Arc<VmShared>) -> Result<DisconnectReason, String>
where
    C: ConnectionExt<Error = std::io::Error> + AsRawFd,
{
    let fd = conn.as_raw_fd();
    let mut target = {
        // Under the migration lock (see `migration::outgoing::start`).
        let mig = vm.migration.lock().unwrap_or_else(|e| e.into_inner());
        let leaving = mig.as_ref().is_some_and(|p| {
            p.role == crate::migration::progress::Role::Source
                && p.phase() != crate::migration::progress::Phase::Failed
        });
        if leaving {
            return Err("the guest is migrating away; no debugger now".into());
        }
        let mut t = GuestTarget::new(vm.clone(), fd);
        t.stop_all();
        t
    };
    eprintln!("ufvmm: gdb: connected; the VM is stopped");
    // A fixed buffer: a peer sending one endless packet ends its connection (gdbstub
    // grows an owned buffer without a bound).
    let mut packets = vec![0u8; PACKET_BUFFER];
    let stub = GdbStub::builder(conn)
        .with_packet_buffer(&mut packets)
        .build()
        .map_err(|e| e.to_string())?;
    let mut sm = stub
        .run_state_machine(&mut target)
        .map_err(|e| e.to_string())?;
    let gone = || "the VM ended".to_string();
    loop {
        sm = match sm {
            GdbStubStateMachine::Idle(mut g) => {
                if !ready(fd, vm) {
                    return Err(gone());
                }
                let byte = g.borrow_conn().read().map_err(|e| e.to_string())?;
                g.incoming_data(&mut target, byte)
                    .map_err(|e| e.to_string())?
            }
            GdbStubStateMachine::Running(mut g) => {
                // A breakpoint or step: stop the rest, and say which thread and why.
                if let Some((id, stop)) = vm.debugger.take_event() {
                    target.stop_all();
                    let reason = target.debug_reason(id, stop);
                    sm = g
                        .report_stop(&mut target, reason)
                        .map_err(|e| e.to_string())?;
                    continue;
                }
                if let Some(reason) = target.step_lost() {
                    sm = g
                        .report_stop(&mut target, reason)
                        .map_err(|e| e.to_string())?;
                    continue;
                }
                if target.vm_ended() {
                    let reason = target.exit_reason();
                    let _ = g.report_stop(&mut target, reason);
                    return Err(gone());
                }
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, a bounded timeout.
                if unsafe { libc::poll(&mut p, 1, TICK.as_millis() as i32) } <= 0 {
                    GdbStubStateMachine::Running(g)
                } else {
                    let byte = g.borrow_conn().read().map_err(|e| e.to_string())?;
                    g.incoming_data(&mut target, byte)
                        .map_err(|e| e.to_string())?
                }
            }
            GdbStubStateMachine::CtrlCInterrupt(g) => {
                // Already stopped (a Ctrl-C while gdb waits at its prompt): nothing
                // to stop, and no stop to defer to the next continue.
                let reason = if vm.debugger.stopped() {
                    None
                } else {
                    target.stop_all();
                    Some(target.stop_reason())
                };
                g.interrupt_handled(&mut target, reason)
                    .map_err(|e| e.to_string())?
            }
            GdbStubStateMachine::Disconnected(g) => {
                // A gdb that detached (or killed) has had its turn: `--gdb-wait` is
                // over.
                vm.debugger.set_waiting(false);
                return Ok(g.get_reason());
            }
        };
    }
}
