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
                    run(s, vm)
                }),
            Listener::Unix(l, _) => accept(l.as_raw_fd(), vm)
                .and_then(|()| l.accept().ok())
                .map(|(s, _)| run(s, vm)),
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
    if let Listener::Unix(_, p) = &listener {
        let _ = std::fs::remove_file(p);
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
    let mut target = GuestTarget::new(vm.clone(), fd);
    target.stop_all();
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
                // Nothing stops a vCPU by itself yet but the VM's end; gdb's
                // interrupt comes as a byte.
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
                target.stop_all();
                let reason = target.stop_reason();
                g.interrupt_handled(&mut target, Some(reason))
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
