//! The session's connections: taking a new one (as the channel its hello names), the
//! thread that reads each, writing to the main one, and what a lost one means.

use std::io::BufReader;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;

use super::{refuse_never_started, Ev, Hi, Session};
use crate::migration::conn::{self, FrameWriter};
use crate::migration::listener::refuse;
use crate::migration::progress::Progress;
use crate::migration::wire::{
    self, ErrorCode, Limits, Message, WireError, CHANNEL_MAIN, PAGE_URGENT, PAGE_ZERO,
};
use crate::source::remote::{Arrival, ArrivalSender};

impl Session {
    /// A new connection: must belong to this migration. A resuming one while this side
    /// still thinks the old connections live means the source saw a break first.
    pub(super) fn on_conn(&mut self, hi: Hi, s: TcpStream, peer: &str) {
        let ours = hi.session == self.hi.session
            && hi.mem_size == self.hi.mem_size
            && hi.vcpus == self.hi.vcpus
            && hi.page_size == self.hi.page_size;
        if !ours {
            return refuse(
                &s,
                peer,
                ErrorCode::OtherMigration,
                "not the migration in progress here",
            );
        }
        if self.failed.is_some() {
            // Failed before the start: whatever this connection is, the guest never
            // starts here now.
            return refuse_never_started(&self.verdicts, &hi, &s, peer, "");
        }
        if hi.resume {
            if !self.started {
                // The source lost the link in switch-over and asks. Never start now: drop
                // the old connections first, so a device state still on its way there
                // cannot start the guest after the source has taken it back.
                self.lost_before_start("the source reconnected before the start".into());
                return refuse_never_started(&self.verdicts, &hi, &s, peer, "");
            }
            if self.fresh == (true, true) {
                // A whole pair is still attached: the source saw a break we did not.
                self.break_link("the source reconnected".into());
            }
        } else if hi.channel == CHANNEL_MAIN || self.urgent_ever {
            return refuse(
                &s,
                peer,
                ErrorCode::ChannelOpen,
                "this channel is already open",
            );
        }
        self.attach(hi, s);
    }

    /// Takes connection `s` as the channel its hello names, with a reader thread.
    pub(super) fn attach(&mut self, hi: Hi, s: TcpStream) {
        self.gen += 1;
        let gen = self.gen;
        let w = match FrameWriter::new(&s) {
            Ok(w) => w,
            Err(e) => return eprintln!("ufvmm: incoming: socket: {e}"),
        };
        if hi.channel == CHANNEL_MAIN {
            conn::cap_receive_buffer(&s, conn::STREAM_RCVBUF);
        }
        let precopy = hi.channel == CHANNEL_MAIN && !hi.resume;
        let (limits, arrivals, progress, tx) = (
            self.limits,
            self.arrivals.clone(),
            self.progress.clone(),
            self.tx.clone(),
        );
        let channel = hi.channel;
        let spawned = std::thread::Builder::new()
            .name("ufvmm-mig-read".into())
            .spawn(move || read_conn(s, gen, channel, precopy, limits, &arrivals, &progress, &tx));
        if let Err(e) = spawned {
            return eprintln!("ufvmm: incoming: cannot start a thread: {e}");
        }
        let slot = if hi.channel == CHANNEL_MAIN {
            self.fresh.0 = true;
            &mut self.main
        } else {
            self.fresh.1 = true;
            self.urgent_ever = true;
            &mut self.urgent
        };
        if let Some((_, old)) = slot.replace((gen, w)) {
            old.close();
        }
        self.progress.set_links(
            [&self.main, &self.urgent]
                .into_iter()
                .flatten()
                .filter_map(|(_, w)| w.stream().try_clone().ok())
                .collect(),
        );
        if hi.resume && self.fresh == (true, true) {
            self.resume();
        } else if !hi.resume && hi.channel != CHANNEL_MAIN && self.started {
            // The first urgent connection came after the start: requests made before
            // it had nowhere to go.
            let requested = self.requested_pages();
            self.ask(&requested);
        }
    }

    pub(super) fn send_main(&mut self, m: &Message) {
        let Some((gen, w)) = self.main.as_mut() else {
            return;
        };
        let gen = *gen;
        if let Err(e) = w.send(m).and_then(|_| w.flush()) {
            self.lost(gen, e.to_string(), false);
        }
    }

    /// Connection `gen` ended.
    pub(super) fn lost(&mut self, gen: u64, why: String, bad: bool) {
        let current = self.main.as_ref().is_some_and(|(g, _)| *g == gen)
            || self.urgent.as_ref().is_some_and(|(g, _)| *g == gen);
        if !current {
            return;
        }
        self.close();
        if self.completed {
            return; // The source hangs up once it hears every page is here.
        }
        if bad {
            self.progress.bad_frames.fetch_add(1, Ordering::Relaxed);
        }
        self.progress.note_error(&why);
        if !self.started {
            self.lost_before_start(why);
            return;
        }
        self.break_link(why);
    }

    pub(super) fn close(&mut self) {
        for (_, w) in [self.main.take(), self.urgent.take()].into_iter().flatten() {
            w.close();
        }
        self.fresh = (false, false);
    }
}

/// Most pages handed to the fault loop before it is woken.
const WAKE_EVERY: usize = 32;

/// Reads one connection: pages and discards go straight to the fault loop (in stream
/// order), everything else to the session. `precopy` holds until the device state.
#[allow(clippy::too_many_arguments)]
fn read_conn(
    s: TcpStream,
    gen: u64,
    channel: u16,
    mut precopy: bool,
    limits: Limits,
    arrivals: &ArrivalSender,
    progress: &Progress,
    tx: &Sender<Ev>,
) {
    let mut r = BufReader::with_capacity(256 * 1024, s);
    // Pages handed over without waking the fault loop yet.
    let mut quiet = 0;
    loop {
        // One wake for a run of pages: before a read that may block (the next frame is
        // not whole in the buffer), and every so often to keep the loop installing.
        if quiet > 0 && (quiet >= WAKE_EVERY || !wire::frame_buffered(r.buffer())) {
            arrivals.wake();
            quiet = 0;
        }
        let m = match wire::read_message(&mut r, &limits) {
            Ok(m) => m,
            Err(e) => {
                let bad = !matches!(
                    e,
                    WireError::Io(_) | WireError::Closed | WireError::Truncated { .. }
                );
                // Pages handed over quietly before the failure are here: install them.
                if quiet > 0 {
                    arrivals.wake();
                }
                let _ = tx.send(Ev::Lost(gen, e.to_string(), bad));
                return;
            }
        };
        match m {
            Message::Page { gpa, flags, data } => {
                let zero = flags & PAGE_ZERO != 0;
                let urgent = flags & PAGE_URGENT != 0;
                let bytes = (wire::HEADER + 12 + data.len()) as u64;
                progress.count_page(precopy, urgent, zero, bytes);
                let a = Arrival::Page {
                    idx: (gpa / limits.page_size) as usize,
                    data: (!zero).then_some(data),
                    precopy,
                    urgent,
                };
                if !arrivals.send_quiet(a) {
                    return;
                }
                quiet += 1;
            }
            Message::Discard { bits } if channel == CHANNEL_MAIN && precopy => {
                let n: u32 = bits.iter().map(|w| w.count_ones()).sum();
                progress.discarded.store(u64::from(n), Ordering::Relaxed);
                if !arrivals.send(Arrival::Discard(bits)) {
                    return;
                }
            }
            m if channel == CHANNEL_MAIN => {
                if matches!(m, Message::DeviceState { .. }) {
                    precopy = false;
                }
                if tx.send(Ev::Msg(gen, m)).is_err() {
                    return;
                }
            }
            _ => {
                if quiet > 0 {
                    arrivals.wake();
                }
                let _ = tx.send(Ev::Lost(
                    gen,
                    "unexpected message on the urgent channel".into(),
                    true,
                ));
                return;
            }
        }
    }
}
