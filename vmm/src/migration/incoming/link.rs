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
    self, ErrorCode, Frame, Limits, Message, WireError, CHANNEL_MAIN, PAGE_URGENT, PAGE_ZERO,
};
use crate::source::remote::{Arrival, ArrivalSender, RUN_BYTES};

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

/// Most zero pages handed to the fault loop before it is woken.
const WAKE_EVERY: usize = 32;

/// Pages with bytes that follow each other in RAM, read straight into one buffer.
struct Gather {
    first: usize,
    pages: usize,
    urgent: bool,
    data: Vec<u8>,
}

impl Gather {
    /// Hands the run over (if it has pages) and starts an empty one; false once the
    /// fault loop has ended.
    fn hand_over(&mut self, arrivals: &ArrivalSender, precopy: bool) -> bool {
        if self.pages == 0 {
            return true;
        }
        let data = std::mem::replace(&mut self.data, arrivals.buffer(RUN_BYTES));
        let a = Arrival::Run {
            first: self.first,
            data,
            precopy,
            urgent: self.urgent,
        };
        self.pages = 0;
        arrivals.send(a)
    }
}

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
    let page = limits.page_size as usize;
    let mut run = Gather {
        first: 0,
        pages: 0,
        urgent: false,
        data: arrivals.buffer(RUN_BYTES),
    };
    // Zero pages handed over without waking the fault loop yet.
    let mut quiet = 0;
    loop {
        // Before a read that may block (the next frame is not whole in the buffer), the
        // run goes over, and one wake for the zero pages handed over quietly.
        let blocking = !wire::frame_buffered(r.buffer());
        if (blocking || run.data.len() + page > RUN_BYTES) && !run.hand_over(arrivals, precopy) {
            return;
        }
        if quiet > 0 && (quiet >= WAKE_EVERY || blocking) {
            arrivals.wake();
            quiet = 0;
        }
        let m = match wire::read_frame(&mut r, &limits, &mut run.data) {
            Ok(Frame::Page { gpa, flags }) => {
                let zero = flags & PAGE_ZERO != 0;
                let urgent = flags & PAGE_URGENT != 0;
                let bytes = (wire::HEADER + 12 + if zero { 0 } else { page }) as u64;
                progress.count_page(precopy, urgent, zero, bytes);
                let idx = (gpa / limits.page_size) as usize;
                if zero {
                    // In stream order: what came before it goes first.
                    if !run.hand_over(arrivals, precopy) {
                        return;
                    }
                    let a = Arrival::Page {
                        idx,
                        data: None,
                        precopy,
                        urgent,
                    };
                    if !arrivals.send_quiet(a) {
                        return;
                    }
                    quiet += 1;
                } else if run.pages == 0 || (idx == run.first + run.pages && urgent == run.urgent) {
                    if run.pages == 0 {
                        (run.first, run.urgent) = (idx, urgent);
                    }
                    run.pages += 1;
                } else {
                    // Out of the run's order: the run goes without this page, which
                    // starts the next one.
                    let mut next = arrivals.buffer(RUN_BYTES);
                    next.extend_from_slice(&run.data[run.data.len() - page..]);
                    run.data.truncate(run.data.len() - page);
                    if !run.hand_over(arrivals, precopy) {
                        return;
                    }
                    run.data = next;
                    (run.first, run.pages, run.urgent) = (idx, 1, urgent);
                }
                continue;
            }
            Ok(Frame::Other(m)) => m,
            Err(e) => {
                let bad = !matches!(
                    e,
                    WireError::Io(_) | WireError::Closed | WireError::Truncated { .. }
                );
                // Pages read whole before the failure are here: install them.
                let _ = run.hand_over(arrivals, precopy);
                if quiet > 0 {
                    arrivals.wake();
                }
                let _ = tx.send(Ev::Lost(gen, e.to_string(), bad));
                return;
            }
        };
        // Anything else comes after the pages before it.
        if !run.hand_over(arrivals, precopy) {
            return;
        }
        match m {
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
