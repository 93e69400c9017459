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
        if self.all_here() {
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

/// Pages that follow each other in RAM, all with bytes (read straight into one buffer)
/// or all zeros, that go to the fault loop as one arrival.
struct Gather {
    first: usize,
    pages: usize,
    urgent: bool,
    zero: bool,
    /// The pages' bytes (empty for zeros).
    data: Vec<u8>,
}

impl Gather {
    /// True if page `idx` can join the run.
    fn extends(&self, idx: usize, urgent: bool, zero: bool, page: usize) -> bool {
        self.pages == 0
            || (idx == self.first + self.pages
                && urgent == self.urgent
                && zero == self.zero
                && (self.pages + 1) * page <= RUN_BYTES)
    }

    /// Hands the run over (if it has pages) and starts an empty one; false once the
    /// fault loop has ended.
    fn hand_over(&mut self, arrivals: &ArrivalSender, precopy: bool) -> bool {
        if self.pages == 0 {
            return true;
        }
        let (first, n, urgent) = (self.first, self.pages, self.urgent);
        self.pages = 0;
        let a = if self.zero {
            Arrival::Zeros {
                first,
                n,
                precopy,
                urgent,
            }
        } else {
            let data = std::mem::replace(&mut self.data, arrivals.buffer(RUN_BYTES));
            Arrival::Run {
                first,
                data,
                precopy,
                urgent,
            }
        };
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
    let idx_of = |gpa: u64| (gpa / limits.page_size) as usize;
    let mut run = Gather {
        first: 0,
        pages: 0,
        urgent: false,
        zero: false,
        data: arrivals.buffer(RUN_BYTES),
    };
    loop {
        // The run goes over before a read that may block (the next frame is not whole
        // in the buffer), and before a frame that does not extend it (its header says,
        // so a page out of order is read into the next run's buffer, not copied there).
        let next = wire::peek_page(r.buffer());
        let keep = next.is_some_and(|(gpa, flags)| {
            let (urgent, zero) = (flags & PAGE_URGENT != 0, flags & PAGE_ZERO != 0);
            run.extends(idx_of(gpa), urgent, zero, page)
        });
        if !keep && !run.hand_over(arrivals, precopy) {
            return;
        }
        let m = match wire::read_frame(&mut r, &limits, &mut run.data) {
            Ok(Frame::Page { gpa, flags }) => {
                let zero = flags & PAGE_ZERO != 0;
                let urgent = flags & PAGE_URGENT != 0;
                let bytes = (wire::HEADER + 12 + if zero { 0 } else { page }) as u64;
                progress.count_page(precopy, urgent, zero, bytes);
                let idx = idx_of(gpa);
                if !run.extends(idx, urgent, zero, page) {
                    // Defensive only: the peek read the very bytes `read_frame` checked,
                    // so a kept run is always extended. Should it not be, the run goes
                    // without this page, which starts the next one.
                    let tail = (!zero).then(|| {
                        let mut t = arrivals.buffer(RUN_BYTES);
                        t.extend_from_slice(&run.data[run.data.len() - page..]);
                        run.data.truncate(run.data.len() - page);
                        t
                    });
                    if !run.hand_over(arrivals, precopy) {
                        return;
                    }
                    if let Some(t) = tail {
                        run.data = t;
                    }
                }
                if run.pages == 0 {
                    (run.first, run.urgent, run.zero) = (idx, urgent, zero);
                }
                run.pages += 1;
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::mpsc::channel;
    use std::sync::Arc;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::abi::PAGE_SIZE;
    use crate::migration::progress::Role;
    use crate::source::remote::Remote;

    const MEM: u64 = 16 << 20;

    fn page(out: &mut Vec<u8>, idx: u64, fill: u8, flags: u32) {
        wire::append_page(out, idx * PAGE_SIZE, flags, PAGE_SIZE as usize, |b| {
            b.fill(fill);
            Ok::<(), ()>(())
        })
        .unwrap();
    }

    /// What an arrival says, page by page: (index, zeros?, urgent?, first byte).
    fn pages_of(a: &Arrival, out: &mut Vec<(usize, bool, bool, u8)>) {
        match a {
            Arrival::Run {
                first,
                data,
                urgent,
                ..
            } => {
                for (k, p) in data.chunks(PAGE_SIZE as usize).enumerate() {
                    assert!(p.iter().all(|&b| b == p[0]), "a page's bytes mixed up");
                    out.push((first + k, false, *urgent, p[0]));
                }
            }
            Arrival::Zeros {
                first, n, urgent, ..
            } => out.extend((*first..first + n).map(|i| (i, true, *urgent, 0))),
            _ => panic!("not a page arrival"),
        }
    }

    #[test]
    fn a_reader_gathers_runs_in_stream_order_and_hands_over_nothing_of_a_damaged_frame() {
        // 1, 2 with bytes; 3, 4 zeros; 6, 7 with bytes (out of order after 4); 8 urgent;
        // 9 with bytes; then 10 damaged.
        let mut s = Vec::new();
        for (idx, fill, flags) in [
            (1, 1, 0),
            (2, 2, 0),
            (3, 0, 0),
            (4, 0, 0),
            (6, 6, 0),
            (7, 7, 0),
            (8, 8, PAGE_URGENT),
            (9, 9, 0),
        ] {
            page(&mut s, idx, fill, flags);
        }
        let mut bad = Vec::new();
        page(&mut bad, 10, 10, 0);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        s.extend(bad);

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut w = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (conn, _) = l.accept().unwrap();
        w.write_all(&s).unwrap();
        drop(w);
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let (remote, sender) = Remote::new(Box::new(|_| {}), Box::new(|| {}), wake, PAGE_SIZE);
        let progress = Progress::new(Role::Destination, "test".into(), MEM / PAGE_SIZE);
        let (tx, rx) = channel();
        let limits = Limits {
            mem_size: MEM,
            page_size: PAGE_SIZE,
        };
        read_conn(
            conn,
            7,
            CHANNEL_MAIN,
            false,
            limits,
            &sender,
            &progress,
            &tx,
        );

        let mut main = Vec::new();
        let mut arrivals = 0;
        while let Ok(a) = remote.arrivals.try_recv() {
            pages_of(&a, &mut main);
            arrivals += 1;
        }
        let want: Vec<_> = [(1, 1), (2, 2), (3, 0), (4, 0), (6, 6), (7, 7), (9, 9)]
            .into_iter()
            .map(|(i, f)| (i, f == 0, false, f))
            .collect();
        assert_eq!(main, want, "stream order, and nothing of the damaged page");
        // Gathered: [1,2] [3,4] [6,7] [9], unless the socket split a read between them.
        assert!(arrivals <= 5, "{arrivals} arrivals for 4 runs");
        let mut urgent = Vec::new();
        while let Ok(a) = remote.urgent.try_recv() {
            pages_of(&a, &mut urgent);
        }
        assert_eq!(urgent, [(8, false, true, 8)]);
        match rx.try_recv() {
            Ok(Ev::Lost(7, _, true)) => {}
            _ => panic!("the damaged frame must end the connection as bad bytes"),
        }
    }

    #[test]
    fn a_peeked_page_is_only_a_page_frame_whole_in_the_buffer() {
        let mut f = Vec::new();
        page(&mut f, 5, 3, PAGE_URGENT);
        assert_eq!(wire::peek_page(&f), Some((5 * PAGE_SIZE, PAGE_URGENT)));
        assert_eq!(wire::peek_page(&f[..f.len() - 1]), None);
        let mut other = Vec::new();
        wire::encode(&Message::Started, &mut other).unwrap();
        assert_eq!(wire::peek_page(&other), None);
        assert_eq!(wire::peek_page(&[]), None);
    }
}
