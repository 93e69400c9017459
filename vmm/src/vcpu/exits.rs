//! Exit dispatch: what a `KVM_RUN` exit means, as a free function over the exit.
//!
//! Port I/O goes to the built-in devices (console, done/exit, results, heartbeat,
//! mailbox doorbell, exception report). Devices that read guest memory do it through
//! `get_guest_pages`, interruptibly: a kick ends the wait and the access is redone
//! before the next `KVM_RUN` (the OUT instruction is completed by KVM on re-entry).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::ByteValued;

use super::kvm_run::Exit;
use super::VcpuShared;
use crate::abi;
use crate::fault::{FaultOutcome, GupFlags, Signal};
use crate::vm::shared::{VcpuEnd, VmShared};

/// A port write that still has work to do.
#[derive(Clone, Copy, Debug)]
pub struct PendingIo {
    /// The port.
    pub port: u16,
    /// The value written.
    pub value: u32,
}

/// What the run loop does next.
#[derive(Debug)]
pub enum ExitAction {
    /// Enter `KVM_RUN` again.
    Continue,
    /// Answer kicks, then redo this I/O before entering `KVM_RUN`.
    Retry(PendingIo),
    /// The vCPU is finished.
    End(VcpuEnd),
}

// SAFETY: plain `repr(C)` integer records; every bit pattern is valid.
unsafe impl ByteValued for abi::Results {}
// SAFETY: as above.
unsafe impl ByteValued for abi::ExceptionRecord {}

const GUP: GupFlags = GupFlags {
    write: false,
    interruptible: true,
    nowait: false,
};

/// Reads guest memory for a device on the vCPU thread, through `get_guest_pages`. While
/// it waits for a missing page the vCPU shows as stalled (path "vmm").
fn guest_read(
    me: &VcpuShared,
    vm: &VmShared,
    gpa: u64,
    buf: &mut [u8],
    signal: &dyn Fn() -> Signal,
) -> FaultOutcome {
    let missing = vm.fault.ram.page_range(gpa, buf.len()).map(|r| {
        r.into_iter()
            .find(|&i| vm.fault.ram.pages.get(i) != crate::memory::PageState::Present)
    });
    if let Ok(Some(idx)) = missing {
        me.stall.begin_vmm_wait(vm.fault.ram.page_gpa(idx));
    }
    let out = vm.fault.read(gpa, buf, GUP, signal);
    // Interrupted with the page still missing (a pause, say), the wait is kept in view:
    // the access is redone, and waits again, when the vCPU runs on.
    me.stall.leave_vmm_wait(|g| page_missing(vm, g));
    out
}

/// True if guest page `gpa` is not (yet) in guest RAM.
pub(super) fn page_missing(vm: &VmShared, gpa: u64) -> bool {
    let idx = vm.fault.ram.page_of(gpa).unwrap_or(usize::MAX);
    vm.fault.ram.pages.get(idx) != crate::memory::PageState::Present
}

/// Reads a plain-old-data record with [`guest_read`].
fn guest_read_obj<T: ByteValued + Default>(
    me: &VcpuShared,
    vm: &VmShared,
    gpa: u64,
    signal: &dyn Fn() -> Signal,
) -> Result<T, FaultOutcome> {
    let mut v = T::default();
    match guest_read(me, vm, gpa, v.as_mut_slice(), signal) {
        FaultOutcome::Done => Ok(v),
        other => Err(other),
    }
}

/// Dispatches one exit.
pub fn handle_exit(
    exit: Exit<'_>,
    me: &Arc<VcpuShared>,
    vm: &Arc<VmShared>,
    signal: &dyn Fn() -> Signal,
) -> ExitAction {
    match exit {
        Exit::IoOut(port, data) => {
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            handle_io(
                PendingIo {
                    port,
                    value: u32::from_le_bytes(v),
                },
                me,
                vm,
                signal,
            )
        }
        Exit::IoIn(port, data) => {
            // Serial line status: transmitter always empty; everything else floats high.
            let fill = if port == abi::PORT_SERIAL + 5 {
                0x60
            } else {
                0xff
            };
            data.fill(fill);
            ExitAction::Continue
        }
        Exit::MmioRead(_, data) => {
            data.fill(0xff);
            ExitAction::Continue
        }
        Exit::MmioWrite(..) | Exit::Hlt | Exit::Intr | Exit::IrqWindowOpen => ExitAction::Continue,
        Exit::Debug { exception, .. } => ExitAction::End(VcpuEnd::Failed(format!(
            "a guest-debug exit (exception {exception}) with no debugger to take it"
        ))),
        Exit::Shutdown => ExitAction::End(VcpuEnd::Failed(
            "triple fault: the guest reset itself (KVM_EXIT_SHUTDOWN)".into(),
        )),
        Exit::InternalError(sub) => ExitAction::End(VcpuEnd::Failed(format!(
            "KVM internal error, suberror {sub}{}",
            if sub == 1 {
                " (instruction emulation failed)"
            } else {
                ""
            }
        ))),
        Exit::FailEntry(reason, cpu) => ExitAction::End(VcpuEnd::Failed(format!(
            "KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"
        ))),
        Exit::BadData(what) => {
            ExitAction::End(VcpuEnd::Failed(format!("KVM exit not understood: {what}")))
        }
        Exit::Other(reason) => ExitAction::End(VcpuEnd::Failed(format!(
            "unexpected vCPU exit (reason {reason})"
        ))),
    }
}

/// Handles a port write (also when redoing one a kick interrupted).
pub fn handle_io(
    io: PendingIo,
    me: &Arc<VcpuShared>,
    vm: &Arc<VmShared>,
    signal: &dyn Fn() -> Signal,
) -> ExitAction {
    let gpa = u64::from(io.value);
    match io.port {
        abi::PORT_SERIAL => {
            vm.console.put(me.id, io.value as u8);
            ExitAction::Continue
        }
        abi::PORT_DONE => ExitAction::End(VcpuEnd::Done(io.value)),
        abi::PORT_EXIT => ExitAction::End(VcpuEnd::VmExit(io.value)),
        abi::PORT_HEARTBEAT => {
            me.heartbeats.fetch_add(1, Ordering::Relaxed);
            ExitAction::Continue
        }
        abi::PORT_RESULT => match guest_read_obj::<abi::Results>(me, vm, gpa, signal) {
            Ok(r) if r.magic == abi::RESULTS_MAGIC => {
                *me.results.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                ExitAction::Continue
            }
            Ok(r) => ExitAction::End(VcpuEnd::Failed(format!(
                "results at {gpa:#x} have a bad magic {:#x}",
                r.magic
            ))),
            Err(o) => retry_or_fail(io, o, "results"),
        },
        abi::PORT_DOORBELL => doorbell(io, me, vm, signal),
        abi::PORT_DEBUG => debug_trap(io, me, vm, signal),
        abi::PORT_EXCEPTION => match guest_read_obj::<abi::ExceptionRecord>(me, vm, gpa, signal) {
            Ok(r) => ExitAction::End(VcpuEnd::Failed(describe_exception(&r))),
            Err(o) => retry_or_fail(io, o, "exception record"),
        },
        // Unknown ports are ignored, as on real hardware.
        _ => ExitAction::Continue,
    }
}

fn retry_or_fail(io: PendingIo, o: FaultOutcome, what: &str) -> ExitAction {
    match o {
        FaultOutcome::Interrupted | FaultOutcome::Retry => ExitAction::Retry(io),
        other => ExitAction::End(VcpuEnd::Failed(format!(
            "cannot read the {what} at {:#x} from guest memory: {other:?}",
            io.value
        ))),
    }
}

/// A CPL3 #BP or #DB the guest offers the debugger (see `debug::user_trap`).
fn debug_trap(
    io: PendingIo,
    me: &Arc<VcpuShared>,
    vm: &Arc<VmShared>,
    signal: &dyn Fn() -> Signal,
) -> ExitAction {
    let gpa = u64::from(io.value);
    // Anywhere else it is not a frame the guest's entry built (CPL3 code can write
    // this port too): ignored, so nothing is written at an address it chose.
    if gpa != abi::debug_frame_gpa(me.id as u64) {
        return ExitAction::Continue;
    }
    let frame = match guest_read_obj::<abi::DebugFrame>(me, vm, gpa, signal) {
        Ok(f) => f,
        Err(o) => return retry_or_fail(io, o, "debug frame"),
    };
    // The byte before a #BP's RIP (the built-in guest is identity-mapped): still an
    // `int3`, or one of the debugger's that is gone.
    let mut byte = [0xccu8];
    if frame.vector == 3 {
        match guest_read(me, vm, frame.rip.wrapping_sub(1), &mut byte, signal) {
            FaultOutcome::Done => {}
            o => return retry_or_fail(io, o, "breakpoint byte"),
        }
    }
    crate::debug::user_trap::offered(me, vm, gpa, frame, byte[0] == 0xcc);
    ExitAction::Continue
}

/// The mailbox: read the message out of guest memory and print it.
fn doorbell(
    io: PendingIo,
    me: &Arc<VcpuShared>,
    vm: &Arc<VmShared>,
    signal: &dyn Fn() -> Signal,
) -> ExitAction {
    let gpa = u64::from(io.value);
    let mut header = [0u8; abi::MAILBOX_HEADER];
    match guest_read(me, vm, gpa, &mut header, signal) {
        FaultOutcome::Done => {}
        o => return retry_or_fail(io, o, "mailbox"),
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > abi::MAILBOX_TEXT {
        vm.console.line(
            me.id,
            &format!(
                "mailbox at {gpa:#x} refused: length {len} > {}",
                abi::MAILBOX_TEXT
            ),
        );
        return ExitAction::Continue;
    }
    let mut text = vec![0u8; len];
    if len > 0 {
        match vm
            .fault
            .read(gpa + abi::MAILBOX_HEADER as u64, &mut text, GUP, signal)
        {
            FaultOutcome::Done => {}
            o => return retry_or_fail(io, o, "mailbox"),
        }
    }
    let shown: String = String::from_utf8_lossy(&text)
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    vm.console.line(me.id, &format!("mailbox: {shown}"));
    vm.mailbox_count.fetch_add(1, Ordering::Relaxed);
    ExitAction::Continue
}

/// One line for an exception the guest reported.
pub fn describe_exception(r: &abi::ExceptionRecord) -> String {
    const NAMES: [&str; 21] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE",
    ];
    let name = NAMES.get(r.vector as usize).copied().unwrap_or("exception");
    format!(
        "guest exception {name} (vector {}) error code {:#x} at rip {:#x}, cr2 {:#x}, cpl {}",
        r.vector,
        r.error_code,
        r.rip,
        r.cr2,
        r.cs & 3
    )
}
