//! A proxy, in the test itself (plain TCP threads), between a migration source and its
//! destination that holds back the bytes of the first connection it accepts (the main
//! connection of the first attempt); every other connection passes both ways as is.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ufvmm::migration::wire::{self, Limits, Message};

/// What happens to the first connection.
#[derive(Clone, Copy, Debug)]
pub enum Hold {
    /// Every byte is held, the source's side is closed once the source has sent its
    /// device state, and the bytes go to the destination, on a new connection, only on
    /// [`HoldProxy::deliver`].
    Delay,
    /// The first `n` bytes pass (the hello, say), the rest never do; the destination's
    /// answers pass.
    After(usize),
}

/// The proxy; it stops when dropped.
pub struct HoldProxy {
    /// Where the source connects.
    pub port: u16,
    deliver: Sender<()>,
    answer: Receiver<Result<Message, String>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HoldProxy {
    /// A proxy in front of the destination at `dest`, for a guest of `mem_size` bytes.
    pub fn start(dest: u16, hold: Hold, mem_size: u64) -> HoldProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let (deliver, deliver_rx) = channel();
        let (answer_tx, answer) = channel();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut first = Some((deliver_rx, answer_tx));
            while !stop2.load(Ordering::Acquire) {
                let Ok((c, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = c.set_nonblocking(false);
                let _ = c.set_nodelay(true);
                match first.take() {
                    Some((d, a)) => {
                        std::thread::spawn(move || hold_first(c, dest, hold, mem_size, &d, &a));
                    }
                    None => pass(c, dest),
                }
            }
        });
        HoldProxy {
            port,
            deliver,
            answer,
            stop,
            thread: Some(thread),
        }
    }

    /// With [`Hold::Delay`]: sends the held bytes to the destination now; returns its
    /// first answer on that connection (or why there was none within `limit`).
    pub fn deliver(&self, limit: Duration) -> Result<Message, String> {
        self.deliver
            .send(())
            .map_err(|_| "the proxy is gone".to_string())?;
        self.answer
            .recv_timeout(limit)
            .map_err(|e| format!("no answer: {e}"))?
    }
}

impl Drop for HoldProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn connect(dest: u16) -> Option<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", dest)).ok()?;
    let _ = s.set_nodelay(true);
    Some(s)
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s sending half.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Both);
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Passes a connection both ways, as is.
fn pass(c: TcpStream, dest: u16) {
    let Some(d) = connect(dest) else {
        return;
    };
    let (Ok(c2), Ok(d2)) = (c.try_clone(), d.try_clone()) else {
        return;
    };
    std::thread::spawn(move || copy(c, d));
    std::thread::spawn(move || copy(d2, c2));
}

fn hold_first(
    mut c: TcpStream,
    dest: u16,
    hold: Hold,
    mem_size: u64,
    deliver: &Receiver<()>,
    answer: &Sender<Result<Message, String>>,
) {
    match hold {
        Hold::Delay => {
            let held = read_through_device_state(&mut c, mem_size);
            let _ = c.shutdown(Shutdown::Both);
            if deliver.recv().is_err() {
                return;
            }
            let r = match connect(dest) {
                Some(mut d) => d
                    .write_all(&held)
                    .map_err(|e| format!("delivering: {e}"))
                    .and_then(|()| {
                        let _ = d.set_read_timeout(Some(Duration::from_secs(20)));
                        let limits = Limits {
                            mem_size,
                            page_size: 4096,
                        };
                        wire::read_message(&mut d, &limits).map_err(|e| e.to_string())
                    }),
                None => Err("cannot connect to the destination".into()),
            };
            let _ = answer.send(r);
        }
        Hold::After(n) => {
            let Some(mut d) = connect(dest) else {
                return;
            };
            let (Ok(c2), Ok(d2)) = (c.try_clone(), d.try_clone()) else {
                return;
            };
            std::thread::spawn(move || copy(d2, c2));
            let mut head = vec![0u8; n];
            if c.read_exact(&mut head).is_err() || d.write_all(&head).is_err() {
                return;
            }
            // The rest is read and dropped: it never arrives.
            let mut sink = vec![0u8; 64 * 1024];
            while matches!(c.read(&mut sink), Ok(k) if k > 0) {}
            let _ = d.shutdown(Shutdown::Write);
        }
    }
}

/// Reads the source's frames up to and with its device state (or until it stops
/// sending for 30 s, or closes); returns the bytes.
fn read_through_device_state(c: &mut TcpStream, mem_size: u64) -> Vec<u8> {
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let limits = Limits {
        mem_size,
        page_size: 4096,
    };
    let mut held = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return held,
            Ok(n) => held.extend_from_slice(&buf[..n]),
        }
        let mut at = 0;
        loop {
            match wire::decode(&held[at..], &limits) {
                Ok((Message::DeviceState { .. }, _)) => return held,
                Ok((_, used)) => at += used,
                Err(_) => break,
            }
        }
    }
}
