//! One attempt's two connections: opening them, the threads that read them (the
//! urgent one's also answers page requests), and the destination's refusals.

use std::io::BufReader;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Ctx;
use crate::migration::conn::{self, FrameWriter};
use crate::migration::pages::send_page;
use crate::migration::progress::Phase;
use crate::migration::wire::{
    self, ErrorCode, Limits, Message, WireError, CHANNEL_MAIN, CHANNEL_URGENT, PAGE_URGENT,
};

/// What the connection threads tell the migration thread.
pub(super) enum Ev {
    /// A message (never an error) from the destination on attempt `gen`'s main
    /// connection.
    Msg(u64, Message),
    /// The destination refused attempt `gen` (on either connection).
    Refused(u64, Refusal),
    /// Attempt `gen` broke.
    Lost(u64, String),
}

/// Why the destination refused an attempt: what is acted on is typed, never the text.
#[derive(Debug)]
pub(super) enum Refusal {
    /// Its error frame: the code to act on, and the text for people.
    Said(ErrorCode, String),
    /// Its first frame was an intact frame of another wire version: it is not a
    /// destination of this version, so it cannot be running this guest (this version's
    /// destination answers in this version).
    Version(WireError),
}

impl Refusal {
    /// True if the refusal shows the destination never started the guest.
    pub(super) fn guest_not_started(&self) -> bool {
        match self {
            Refusal::Said(code, _) => code.guest_not_started(),
            Refusal::Version(_) => true,
        }
    }

    /// True if the destination's VM has ended (it wants nothing more).
    pub(super) fn vm_ended(&self) -> bool {
        matches!(self, Refusal::Said(ErrorCode::VmEnded, _))
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Said(code, text) => write!(f, "{text} ({})", code.name()),
            Refusal::Version(e) => write!(f, "{e}"),
        }
    }
}

/// What a connection's reader reports when reading fails: an intact frame of another
/// version first of all is that version's refusal; anything else is a break.
fn read_failed(gen: u64, e: WireError, first: bool) -> Ev {
    match e {
        WireError::BadVersion { .. } if first => Ev::Refused(gen, Refusal::Version(e)),
        e => Ev::Lost(gen, e.to_string()),
    }
}

/// Whether an attempt's urgent thread may take pages off the send list yet. A resumed
/// attempt's list is only right once the destination's `Missing` is in it: the
/// destination asks for the pages its vCPUs wait on right after sending `Missing`, on the
/// other connection, and a request read before the list is rebuilt would find those
/// pages off the old list (sent before the break, lost with it) and be dropped as
/// answered by the stream, leaving the vCPUs to wait for the stream to come round.
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

/// How long a resumed attempt's urgent thread waits for its send list at most: longer
/// than the migration thread waits for the destination's `Missing`, which closes the
/// attempt (opening the gate) when it gives up.
const LIST_WAIT: Duration = Duration::from_secs(30);

impl Gate {
    fn new(open: bool) -> Self {
        Gate {
            open: Mutex::new(open),
            cv: Condvar::new(),
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Waits until the gate opens; false if it did not within `LIST_WAIT`.
    fn wait(&self) -> bool {
        let g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, LIST_WAIT, |open| !*open)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// One attempt's connections.
pub(super) struct Link {
    pub(super) gen: u64,
    pub(super) main: FrameWriter,
    streams: Vec<TcpStream>,
    /// Set when the attempt is closed: its urgent thread, maybe still inside a page read
    /// when a new attempt rebuilds the send list, must not claim pages off that list.
    closed: Arc<AtomicBool>,
    /// Opened when the send list is this attempt's (at once unless it resumes).
    listed: Arc<Gate>,
}

impl Link {
    /// Opens both connections and starts their threads.
    pub(super) fn open(s: &Sender<Ev>, ctx: &Ctx, gen: u64, resume: bool) -> Result<Link, String> {
        let hello = |channel| Message::Hello {
            mem_size: ctx.vm.fault.ram.size(),
            vcpus: ctx.vm.vcpus.len() as u32,
            page_size: ctx.limits.page_size,
            session: ctx.session,
            channel,
            resume,
        };
        let err = |what: &str, e: &dyn std::fmt::Display| format!("{what} {}: {e}", ctx.to);
        let m = conn::connect(&ctx.to).map_err(|e| err("cannot connect to", &e))?;
        conn::cap_unsent(&m, conn::STREAM_NOTSENT);
        let mut main = FrameWriter::new(&m).map_err(|e| err("socket", &e))?;
        main.send(&hello(CHANNEL_MAIN))
            .and_then(|_| main.flush())
            .map_err(|e| err("cannot send to", &e))?;
        let u = conn::connect(&ctx.to).map_err(|e| err("cannot connect to", &e))?;
        let mut uw = FrameWriter::new(&u).map_err(|e| err("socket", &e))?;
        uw.send(&hello(CHANNEL_URGENT))
            .and_then(|_| uw.flush())
            .map_err(|e| err("cannot send to", &e))?;
        ctx.progress
            .set_links([&m, &u].iter().filter_map(|s| s.try_clone().ok()).collect());
        let link = Link {
            gen,
            main,
            streams: vec![
                m.try_clone().map_err(|e| err("socket", &e))?,
                u.try_clone().map_err(|e| err("socket", &e))?,
            ],
            closed: Arc::new(AtomicBool::new(false)),
            listed: Arc::new(Gate::new(!resume)),
        };
        let (tx, limits) = (s.clone(), ctx.limits);
        spawn("ufvmm-mig-read", move || read_main(m, gen, limits, &tx))?;
        let (tx, c) = (s.clone(), ctx.clone());
        let (closed, listed) = (link.closed.clone(), link.listed.clone());
        spawn("ufvmm-mig-urgent", move || {
            serve_urgent(u, uw, gen, &c, &closed, &listed, &tx)
        })?;
        Ok(link)
    }

    /// The send list now holds what the destination said it lacks: page requests of
    /// this attempt may be answered.
    pub(super) fn listed(&self) {
        self.listed.open();
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // A thread waiting for the list goes on, to find the attempt closed.
        self.listed.open();
        for s in &self.streams {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| format!("cannot start a thread: {e}"))
}

/// Reads the destination's messages on the main connection, until it refuses or the
/// connection ends (then it reports exactly once).
fn read_main(s: TcpStream, gen: u64, limits: Limits, tx: &Sender<Ev>) {
    let mut r = BufReader::new(s);
    let mut first = true;
    loop {
        let ev = match wire::read_message(&mut r, &limits) {
            Ok(Message::Error { code, text }) => Ev::Refused(gen, Refusal::Said(code, text)),
            Ok(m) => Ev::Msg(gen, m),
            Err(e) => read_failed(gen, e, first),
        };
        first = false;
        let last = !matches!(ev, Ev::Msg(..));
        if tx.send(ev).is_err() || last {
            return;
        }
    }
}

/// Answers page requests on the urgent connection, once the send list is this
/// attempt's (`listed`).
fn serve_urgent(
    s: TcpStream,
    mut w: FrameWriter,
    gen: u64,
    ctx: &Ctx,
    closed: &AtomicBool,
    listed: &Gate,
    tx: &Sender<Ev>,
) {
    let peer = s.try_clone().ok();
    let mut r = BufReader::new(s);
    // Reports how the connection ended (exactly once) and ends it.
    let end = |ev: Ev| {
        let _ = tx.send(ev);
        if let Some(p) = &peer {
            let _ = p.shutdown(std::net::Shutdown::Both);
        }
    };
    let fail = |e: String| end(Ev::Lost(gen, e));
    let mut first = true;
    loop {
        let read = wire::read_message(&mut r, &ctx.limits);
        let gpas = match read {
            Ok(Message::PageRequest { gpas }) => gpas,
            // A refusal: the main connection's reader may not have its copy yet.
            Ok(Message::Error { code, text }) => {
                return end(Ev::Refused(gen, Refusal::Said(code, text)))
            }
            Ok(other) => return fail(format!("unexpected {} on the urgent channel", other.name())),
            Err(e) => return end(read_failed(gen, e, first)),
        };
        first = false;
        // Until then the requests wait, in this thread and the socket behind it.
        if !listed.wait() {
            return fail("no send list for the resumed attempt".into());
        }
        ctx.progress
            .requested
            .fetch_add(gpas.len() as u64, Ordering::Relaxed);
        for gpa in gpas {
            let idx = (gpa / ctx.limits.page_size) as usize;
            // A closed attempt claims nothing: the next one's send list may be in place
            // already (`claim_urgent` checks again under the list's lock).
            if closed.load(Ordering::Acquire) {
                return fail("the attempt was closed".into());
            }
            // A page the stream took already is on its way: sent once, never twice.
            if !ctx.to_send.claim_urgent(idx, &ctx.progress.resends, closed) {
                continue;
            }
            match send_page(&ctx.vm, &mut w, idx, PAGE_URGENT) {
                Ok((bytes, zero)) => ctx.progress.count_page(false, true, zero, bytes),
                Err(e) => return fail(e),
            }
        }
        if let Err(e) = w.flush() {
            return fail(e.to_string());
        }
    }
}

/// How long a failed attempt's readers may take to say whether the destination refused.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// Closes `link`, whose attempt failed with `e` before the guest moved (`ended` of its
/// readers have reported already); if the destination had refused it (a write error or
/// a reset is often just the echo of a refusal), adds the refusal, which says why.
pub(super) fn refusal_or(rx: &Receiver<Ev>, link: &Link, mut ended: usize, e: String) -> String {
    link.close();
    let deadline = Instant::now() + REFUSAL_WAIT;
    // Each of the attempt's readers reports once as it ends.
    while ended < link.streams.len() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ev::Refused(g, r)) if g == link.gen => {
                return format!("the destination refused: {r} ({e})")
            }
            Ok(Ev::Lost(g, _)) if g == link.gen => ended += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    e
}

/// How long a broken postcopy attempt's other readers may take to bring the
/// destination's last word.
const LAST_WORD_WAIT: Duration = Duration::from_millis(500);

/// What a destination said just before its connections ended.
enum LastWord {
    /// Every page is there.
    PagesDone,
    /// Its VM has ended: it wants nothing more.
    VmEnded(Refusal),
}

/// Attempt `link` broke in postcopy (`ended` of its readers have reported already):
/// waits a moment for the others, without closing it, in case the destination said
/// why before it went. Each connection has its own reader, so an ended destination's
/// urgent connection can report its end before the main one brings the `PagesDone` or
/// "VM ended" sent just before it; taken for a break, that would leave this side
/// reconnecting for ever to a destination that is gone and done.
fn last_word(rx: &Receiver<Ev>, link: &Link, mut ended: usize) -> Option<LastWord> {
    let deadline = Instant::now() + LAST_WORD_WAIT;
    while ended < link.streams.len() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ev::Msg(g, Message::PagesDone { .. })) if g == link.gen => {
                return Some(LastWord::PagesDone)
            }
            Ok(Ev::Refused(g, r)) if g == link.gen => {
                if r.vm_ended() {
                    return Some(LastWord::VmEnded(r));
                }
                ended += 1;
            }
            Ok(Ev::Lost(g, _)) if g == link.gen => ended += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    None
}

/// After a break of attempt `link` (`ended` of its readers reported): true if the
/// destination's last word ([`last_word`]) ended the migration, which is then closed
/// and complete here.
pub(super) fn finished_there(ctx: &Ctx, rx: &Receiver<Ev>, link: &Link, ended: usize) -> bool {
    match last_word(rx, link, ended) {
        Some(LastWord::PagesDone) => {
            link.close();
            ctx.progress.set_phase(Phase::Completed);
            true
        }
        Some(LastWord::VmEnded(r)) => {
            ended_there(ctx, link, &r);
            true
        }
        None => false,
    }
}

/// The destination's VM has ended, so it wants nothing more: the migration is over
/// here too.
pub(super) fn ended_there(ctx: &Ctx, link: &Link, r: &Refusal) {
    link.close();
    let why = format!("the destination ended the migration: {r}");
    eprintln!("ufvmm: {why}");
    ctx.progress.note_error(&why);
    ctx.progress.set_phase(Phase::Completed);
}
