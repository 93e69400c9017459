//! `ufvmm link-proxy`: forwards TCP connections through the link model, so a migration
//! (or anything else) can be run over a slow, stalling, breaking or corrupting network.
//!
//! Each accepted connection is paired with a new connection to the target. Each
//! direction has its own wire (a [`LinkModel`]): a reader thread stamps every chunk with
//! its delivery time, a writer thread delivers it then. Times in the spec (stall windows,
//! `disconnect@T`, `corrupt@T`) count from the proxy's start, so a reconnection after a
//! drop meets the rest of the schedule. `corrupt@T` flips one byte of the first chunk
//! forwarded from the connecting side (the migration source) at or after T. Where the
//! link stops for good, the proxy stops reading, so the sender's buffers fill as on a
//! dead network.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
/// How often waiting threads look at the connection's closed flag.
const TICK: Duration = Duration::from_millis(20);

/// `PORT` means `127.0.0.1:PORT`; anything else is taken as `HOST:PORT`.
pub fn normalize_addr(s: &str) -> String {
    if s.parse::<u16>().is_ok() {
        format!("127.0.0.1:{s}")
    } else {
        s.to_string()
    }
}

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
                eprintln!("link-proxy: accept failed: {e}");
                continue;
            }
        };
        let server = match TcpStream::connect(&connect) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("link-proxy: cannot connect to {connect}: {e}; dropping the client");
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let link = link.clone();
        let corrupts = corrupts.clone();
        let spawned = std::thread::Builder::new()
            .name("link-proxy-conn".into())
            .spawn(move || serve(client, server, &link, start, corrupts));
        if let Err(e) = spawned {
            eprintln!("link-proxy: cannot start a thread: {e}");
        }
    }
    Ok(())
}

/// Both directions of one proxied connection, and the drops its schedule asks for.
fn serve(
    client: TcpStream,
    server: TcpStream,
    link: &LinkSpec,
    start: Instant,
    corrupts: Arc<Mutex<Vec<Duration>>>,
) {
    let closed = Arc::new(AtomicBool::new(false));
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
        let closed = closed.clone();
        threads.push(std::thread::spawn(move || {
            pipe(from, to, model, corrupts, start, &closed)
        }));
    }
    if let Some(at) = disconnect {
        // Sleep in ticks until the drop is due or the connection ended by itself.
        while !closed.load(Ordering::Acquire) && start.elapsed() < at {
            std::thread::sleep(TICK.min(at.saturating_sub(start.elapsed())));
        }
        if !closed.swap(true, Ordering::AcqRel) {
            eprintln!("link-proxy: dropping the connection (disconnect@{at:?})");
        }
    }
    for t in threads {
        let _ = t.join();
    }
    closed.store(true, Ordering::Release);
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// One direction: a reader that stamps chunks with delivery times, a writer (this
/// thread) that delivers them.
fn pipe(
    from: TcpStream,
    mut to: TcpStream,
    model: LinkModel,
    corrupts: Arc<Mutex<Vec<Duration>>>,
    start: Instant,
    closed: &Arc<AtomicBool>,
) {
    let (tx, rx) = channel::<(Instant, Vec<u8>)>();
    let reader_closed = closed.clone();
    let reader = std::thread::spawn(move || read_side(from, model, tx, &reader_closed));
    write_side(&mut to, rx, &corrupts, start, closed);
    // Wake the reader if it is blocked in read(), then let it go.
    closed.store(true, Ordering::Release);
    let _ = to.shutdown(Shutdown::Both);
    let _ = reader.join();
}

fn read_side(
    mut from: TcpStream,
    mut model: LinkModel,
    tx: std::sync::mpsc::Sender<(Instant, Vec<u8>)>,
    closed: &AtomicBool,
) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; CHUNK];
    while !closed.load(Ordering::Acquire) {
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
            Some(due) => {
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            None => {
                // The link is dead for good: stop reading, as a dead network would.
                while !closed.load(Ordering::Acquire) {
                    std::thread::sleep(TICK);
                }
                return;
            }
        }
    }
}

fn write_side(
    to: &mut TcpStream,
    rx: Receiver<(Instant, Vec<u8>)>,
    corrupts: &Mutex<Vec<Duration>>,
    start: Instant,
    closed: &AtomicBool,
) {
    loop {
        let (due, mut data) = match rx.recv_timeout(TICK) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) if !closed.load(Ordering::Acquire) => continue,
            Err(_) => return,
        };
        loop {
            if closed.load(Ordering::Acquire) {
                return;
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
            return;
        }
    }
}
