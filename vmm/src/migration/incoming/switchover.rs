//! The switch-over: the source's vCPU states are restored, its device state starts the
//! guest here; or the migration ends before that, and the source hears the guest never
//! started here.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant, SystemTime};

use kvm_ioctls::VcpuFd;

use super::{
    refuse_never_started, Ev, Session, EXIT_GRACE, EXIT_GRACE_MAX, FAILED_EXIT_GRACE, FAIL_GRACE,
    NEVER_STARTED,
};
use crate::migration::progress::Phase;
use crate::migration::verdicts::Start;
use crate::migration::wire::{ErrorCode, Message};
use crate::source::remote::Arrival;
use crate::vcpu::state::VcpuState;
use crate::vm;
use crate::vm::shared::VmEvent;

/// How long the fault loop may take to handle what came before the device state.
const BARRIER_BOUND: Duration = Duration::from_secs(30);

impl Session {
    pub(super) fn on_msg(&mut self, gen: u64, m: Message) -> Result<(), String> {
        if self.main.as_ref().is_none_or(|(g, _)| *g != gen) {
            return Ok(()); // From a connection already replaced.
        }
        match m {
            Message::VcpuState { id, data } => {
                self.progress.mark("first_vcpu_state");
                let fd = self
                    .fds
                    .get(id as usize)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| format!("state for vcpu {id}, which is not waiting for one"))?;
                if self.restored[id as usize] {
                    return Err(format!("a second state for vcpu {id}"));
                }
                let st = VcpuState::from_bytes(&data).map_err(|e| format!("vcpu {id}: {e}"))?;
                st.restore(fd, self.vm.caps.exception_payload)
                    .map_err(|e| format!("vcpu {id}: {e}"))?;
                self.restored[id as usize] = true;
                Ok(())
            }
            Message::DeviceState { data } => self.start(&data),
            Message::PagesDone { .. } => {
                self.source_done = Some(Instant::now());
                Ok(())
            }
            Message::Error { code, text } => {
                Err(format!("the source says ({}): {text}", code.name()))
            }
            other => Err(format!("unexpected {other:?}").chars().take(80).collect()),
        }
    }

    /// The device state ends the switch-over: start the guest here.
    fn start(&mut self, data: &[u8]) -> Result<(), String> {
        let states = self.restored.iter().filter(|&&r| r).count();
        if self.started || states != self.fds.len() {
            return Err(format!(
                "device state after {states} of {} vcpu states",
                self.fds.len()
            ));
        }
        self.progress.mark("device_state");
        let dev: serde_json::Value =
            serde_json::from_slice(data).map_err(|e| format!("device state: {e}"))?;
        if let Some(n) = dev.get("critical_pages").and_then(|v| v.as_u64()) {
            self.progress.critical.store(n, Ordering::Relaxed);
        }
        if let Some(us) = dev.get("source_stop_unix_us").and_then(|v| v.as_u64()) {
            self.progress
                .set_source_stop(SystemTime::UNIX_EPOCH + Duration::from_micros(us));
        }
        // Discards and precopy pages sent before must be in place first. A quit meanwhile
        // ends the wait: the loop's top then tells the source the guest never started.
        let (btx, brx) = sync_channel(1);
        if !self.arrivals.send(Arrival::Barrier(btx)) {
            return Err("the fault loop did not take the precopy pages".into());
        }
        let bound = Instant::now() + BARRIER_BOUND;
        loop {
            match brx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => break,
                Err(_) if self.vm.is_shutting_down() => return Ok(()),
                Err(RecvTimeoutError::Timeout) if Instant::now() < bound => {}
                Err(_) => return Err("the fault loop did not take the precopy pages".into()),
            }
        }
        self.progress.mark("barrier");
        match self.verdicts.start(self.hi.session) {
            Start::Go => {}
            // The VM is ending (its shutdown follows the stop at once): the loop's top
            // says so to the source on both connections, which stay open for that.
            Start::Stopping => return Ok(()),
            // Never after saying it would not (the paths that say so close the main
            // connection first, so this is a last guard).
            Start::Denied => {
                return Err("this migration was told its guest never started here".into())
            }
        }
        self.progress.set_phase(Phase::Switchover);
        let fds: Vec<VcpuFd> = self.fds.iter_mut().filter_map(Option::take).collect();
        // Started from the first thread on: should a later one fail to spawn, the VM
        // ends here, but it never claims the guest did not start.
        self.started = true;
        if let Err(e) = vm::spawn_vcpus(&self.vm, fds) {
            self.vm
                .send(VmEvent::MigrationFailed(format!("starting the vcpus: {e}")));
            return Ok(());
        }
        self.progress.mark("vcpus_spawned");
        self.progress.set_phase(Phase::Postcopy);
        // The source may forget the guest only once it hears this.
        self.send_main(&Message::Started);
        eprintln!(
            "ufvmm: incoming: guest started here; pages follow on demand and in the background"
        );
        Ok(())
    }

    /// The migration failed before the guest started here.
    pub(super) fn lost_before_start(&mut self, why: String) {
        // The guest never starts here now. The source, unsure whether it did, will
        // reconnect and ask: stay a while to tell it so (then it runs the guest on).
        self.close();
        self.progress.set_phase(Phase::Failed);
        eprintln!(
            "ufvmm: incoming: migration failed before the guest started here: {why}; \
             telling a reconnecting source for {} s",
            FAIL_GRACE.as_secs()
        );
        self.failed = Some((Instant::now(), why));
    }

    /// The VM ends before the guest started here: the source, which still has it, is
    /// told so on both channels, and so is any connection that arrives within
    /// [`EXIT_GRACE`], or while one is still saying hello (up to [`EXIT_GRACE_MAX`]): a
    /// source that reconnects to ask.
    pub(super) fn end_before_start(mut self, rx: &Receiver<Ev>) {
        if self.verdicts.deny(self.hi.session) {
            let m = Message::Error {
                code: ErrorCode::NeverStarted,
                text: format!("{NEVER_STARTED}: the destination has ended"),
            };
            for (_, w) in [&mut self.main, &mut self.urgent].into_iter().flatten() {
                let _ = w.send(&m).and_then(|_| w.flush());
            }
        }
        self.close();
        let now = Instant::now();
        // After a failure the connections are closed already: the source hears the
        // answer only by reconnecting, which its backoff may put off for 2 s.
        let len = if self.failed.is_some() {
            FAILED_EXIT_GRACE
        } else {
            EXIT_GRACE
        };
        // A hello still being read when that time is up gets the same extra time as
        // without a failure.
        let (grace, most) = (now + len, now + len + (EXIT_GRACE_MAX - EXIT_GRACE));
        loop {
            // A handshake hands its connection over before it counts as done: look at
            // the count first, then answer everything already handed over.
            let idle = self.busy.load(Ordering::Acquire) == 0;
            let now = Instant::now();
            let last = now >= most || (now >= grace && idle);
            loop {
                match rx.try_recv() {
                    Ok(Ev::Conn(hi, s, peer)) => {
                        refuse_never_started(&self.verdicts, &hi, &s, &peer, "")
                    }
                    Ok(_) => {}
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if last {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
