//! `ufvmm link-proxy`: forwards TCP connections through the link model, so a migration
//! (or anything else) can be run over a slow, stalling, breaking or corrupting network.
//!
//! Each accepted connection is paired with a new connection to the target. Each
//! direction has its own wire (a [`LinkModel`]): a reader thread stamps every chunk with
//! its delivery time, a writer thread delivers it then. At most [`QUEUED`] chunks wait
//! per direction, so a slow or stalled link pushes back on the sender as a real network
//! does; where the link stops for good the proxy stops reading. A side that closes its
//! sending half has that close delivered after its last data. Times in the spec (stall
//! windows, `disconnect@T`, `corrupt@T`) count from the proxy's start, so a reconnection
//! after a drop meets the rest of the schedule. `disconnect@T` drops the connection live
//! at T, both sides at once, queued data lost; `corrupt@T` flips one byte of the first
//! chunk forwarded from the connecting side (the migration source) at or after T.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::conn::normalize_addr;
use crate::source::link::{LinkModel, LinkSpec};

/// Errors starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The listen address cannot be bound.
    #[error("link-proxy --listen {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;
/// Chunks that may wait for delivery in one direction.
const QUEUED: usize = 8;
/// How long connecting to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often waiting threads look at the connection's closed flag.
const TICK: Duration = Duration::from_millis(20);

/// Runs the proxy until the process is stopped. Prints the bound address first.
pub fn run(listen: &str, connect: &str, link: &LinkSpec) -> Result<(), ProxyError> {
    let listen = normalize_addr(listen);
    let connect = normalize_addr(connect);
    let bind_err = |source| ProxyError::Bind {
        addr: listen.clone(),
        source,
    };
    let listener = TcpListener::bind(&listen).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    println!("link-proxy: listening on {local}, forwarding to {connect}");
    let _ = std::io::stdout().flush();
    let start = Instant::now();
    // Proxy-wide: each corruption happens once, on whichever connection carries data then.
    let corrupts = Arc::new(Mutex::new(link.corrupts.clone()));
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                // Out of fds, say: do not spin on it.
                eprintln!("link-proxy: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let (link, corrupts, connect) = (link.clone(), corrupts.clone(), connect.clone());
        let spawned = std::thread::Builder::new()
            .name("link-proxy-conn".into())
            .spawn(move || match connect_target(&connect) {
                Ok(server) => serve(client, server, &link, start, corrupts),
                Err(e) => {
                    eprintln!("link-proxy: cannot connect to {connect}: {e}; dropping the client")
                }
            });
        if let Err(e) = spawned {
            eprintln!("link-proxy: cannot start a thread: {e}; dropping the client");
        }
    }
    Ok(())
}

/// Connects to the target with a bounded wait.
fn connect_target(addr: &str) -> std::io::Result<TcpStream> {
    let to: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    let mut last = std::io::Error::other("no address");
    for a in to {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Makes the next close of `s` a reset (SO_LINGER 0): a dropped link, not a polite close.
fn reset_on_close(s: &TcpStream) {
    let lin = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a valid linger struct and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lin as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Both directions of one proxied connection, and the drop its schedule asks for.
fn serve(
    client: TcpStream,
    server: TcpStream,
    link: &LinkSpec,
    start: Instant,
    corrupts: Arc<Mutex<Vec<Duration>>>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // Set only by a drop: every thread of this connection stops at once.
    let dropped = Arc::new(AtomicBool::new(false));
    // Only drops after this connection began apply to it.
    let since = start.elapsed();
    let disconnect = link.disconnects.iter().copied().find(|&t| t >= since);
    let none = Arc::new(Mutex::new(Vec::new()));
    let pipes = [
        (client.try_clone(), server.try_clone(), corrupts),
        (server.try_clone(), client.try_clone(), none),
    ];
    let mut threads = Vec::new();
    for (from, to, corrupts) in pipes {
        let (Ok(from), Ok(to)) = (from, to) else {
            eprintln!("link-proxy: cannot duplicate a socket; dropping the connection");
            break;
        };
        let model = LinkModel::new(link.clone(), start);
        let dropped = dropped.clone();
        match std::thread::Builder::new()
            .name("link-proxy-pipe".into())
            .spawn(move || pipe(from, to, model, corrupts, start, &dropped))
        {
            Ok(t) => threads.push(t),
            Err(e) => eprintln!("link-proxy: cannot start a thread: {e}"),
        }
    }
    if threads.len() < 2 {
        dropped.store(true, Ordering::Release);
    }
    if let Some(at) = disconnect {
        while !dropped.load(Ordering::Acquire)
            && !threads.iter().all(|t| t.is_finished())
            && start.elapsed() < at
        {
            std::thread::sleep(TICK.min(at.saturating_sub(start.elapsed())));
        }
        if start.elapsed() >= at && !dropped.swap(true, Ordering::AcqRel) {
            eprintln!("link-proxy: dropping the connection (disconnect@{at:?})");
        }
    }
    if dropped.load(Ordering::Acquire) {
        // Both sides at once, even with a writer blocked on a peer that does not read.
        reset_on_close(&client);
        reset_on_close(&server);
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
}

/// One direction: a reader that stamps chunks with delivery times, a writer (this
/// thread) that delivers them, then passes on the end of the stream.
fn pipe(
    from: TcpStream,
    mut to: TcpStream,
    model: LinkModel,
    corrupts: Arc<Mutex<Vec<Duration>>>,
    start: Instant,
    dropped: &Arc<AtomicBool>,
) {
    // The link's queue is QUEUED chunks; past it the sender must feel the link, not
    // fill a receive buffer autotuned to megabytes.
    super::conn::cap_receive_buffer(&from, 2 * CHUNK);
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(QUEUED);
    let reader_dropped = dropped.clone();
    let reader = std::thread::Builder::new()
        .name("link-proxy-read".into())
        .spawn(move || read_side(from, model, tx, &reader_dropped));
    let Ok(reader) = reader else {
        dropped.store(true, Ordering::Release);
        return;
    };
    if write_side(&mut to, rx, &corrupts, start, dropped) {
        // The sender closed its half after its last data: pass that on.
        let _ = to.shutdown(Shutdown::Write);
    } else {
        // The receiving side is gone: nothing more can be delivered either way.
        dropped.store(true, Ordering::Release);
        let _ = to.shutdown(Shutdown::Both);
    }
    let _ = reader.join();
}

fn read_side(
    mut from: TcpStream,
    mut model: LinkModel,
    tx: SyncSender<(Instant, Vec<u8>)>,
    dropped: &AtomicBool,
) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; CHUNK];
    while !dropped.load(Ordering::Acquire) {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        match model.schedule(Instant::now(), n as u64) {
            // Blocks while QUEUED chunks wait: the sender feels the link.
            Some(due) => {
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            None => {
                // The link is dead for good: stop reading, as a dead network would.
                while !dropped.load(Ordering::Acquire) {
                    std::thread::sleep(TICK);
                }
                return;
            }
        }
    }
}

/// Delivers chunks when due. True when the stream ended normally (the reader saw the
/// sender close), false when it was dropped or the receiver is gone.
fn write_side(
    to: &mut TcpStream,
    rx: Receiver<(Instant, Vec<u8>)>,
    corrupts: &Mutex<Vec<Duration>>,
    start: Instant,
    dropped: &AtomicBool,
) -> bool {
    loop {
        let (due, mut data) = match rx.recv_timeout(TICK) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) if !dropped.load(Ordering::Acquire) => continue,
            Err(RecvTimeoutError::Timeout) => return false,
            Err(RecvTimeoutError::Disconnected) => return !dropped.load(Ordering::Acquire),
        };
        loop {
            if dropped.load(Ordering::Acquire) {
                return false;
            }
            let now = Instant::now();
            if now >= due {
                break;
            }
            std::thread::sleep(TICK.min(due - now));
        }
        let mut pending = corrupts.lock().unwrap_or_else(|e| e.into_inner());
        if pending.first().is_some_and(|&t| start.elapsed() >= t) {
            pending.remove(0);
            let mid = data.len() / 2;
            data[mid] ^= 0xff;
            eprintln!("link-proxy: flipped one byte of {} forwarded", data.len());
        }
        drop(pending);
        if to.write_all(&data).is_err() {
            return false;
        }
    }
}
