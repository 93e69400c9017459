//! The control socket: JSON lines over a Unix socket (mode 0600).
//!
//! Request `{"cmd":"pause"}` (also `resume`, `status`, `stats`, `wake`, `quit`,
//! `migrate-recover`, `{"cmd":"kick","count":N}` and
//! `{"cmd":"migrate","to":"HOST:PORT","precopy_rounds":N}`); the
//! reply is one JSON object per line with `"ok": true|false` and `"error"` when false.
//! Malformed lines get an error reply; so do lines longer than 64 KiB (their rest is
//! discarded and the connection goes on). At most [`MAX_CONNECTIONS`] connections are
//! served at once; one more gets an error line and is closed.
//!
//! The socket may come up before its VM exists (`ufvmm incoming` waiting for a
//! migration): then `status` and `quit` answer and the rest is refused.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde_json::{json, Value};

use super::ops;
use crate::vm::shared::{VmEvent, VmShared};

/// Connections served at once; each has a thread.
pub const MAX_CONNECTIONS: usize = 16;

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process is serving this socket.
    #[error("--api-sock {0}: another process is listening there")]
    InUse(PathBuf),
    /// Something other than a stale socket is in the way.
    #[error("--api-sock {0}: the path exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// bind/chmod failed.
    #[error("--api-sock {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What the socket controls: the VM, once it exists.
pub struct Target {
    vm: OnceLock<Arc<VmShared>>,
    /// The migration listen address of a destination (shown while it waits).
    listen: Option<String>,
    /// The main thread's events, for `quit` while there is no VM.
    events: Option<Mutex<Sender<VmEvent>>>,
    started: Instant,
}

impl Target {
    /// A target for `vm`, which exists already.
    pub fn with_vm(vm: Arc<VmShared>) -> Arc<Target> {
        Arc::new(Target {
            vm: OnceLock::from(vm),
            listen: None,
            events: None,
            started: Instant::now(),
        })
    }

    /// A destination with no VM yet, waiting for its migration on `listen`; `quit`
    /// before the VM exists goes to `events`.
    pub fn waiting(listen: String, events: Sender<VmEvent>) -> Arc<Target> {
        Arc::new(Target {
            vm: OnceLock::new(),
            listen: Some(listen),
            events: Some(Mutex::new(events)),
            started: Instant::now(),
        })
    }

    /// The VM now exists: every command reaches it from here on.
    pub fn set_vm(&self, vm: Arc<VmShared>) {
        let _ = self.vm.set(vm);
    }

    fn vm(&self) -> Option<&Arc<VmShared>> {
        self.vm.get()
    }

    fn quit(&self) {
        if let Some(vm) = self.vm() {
            vm.send(VmEvent::Quit);
        } else if let Some(events) = &self.events {
            let _ = events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(VmEvent::Quit);
        }
    }

    /// `status` before the VM exists.
    fn waiting_status(&self) -> Value {
        json!({
            "ok": true,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "vcpus": [],
            "migration": {"role": "destination", "state": "waiting", "listen": self.listen},
        })
    }
}

/// Binds the socket (replacing a stale one) and serves it on a thread.
pub fn spawn(path: &Path, target: Arc<Target>) -> Result<(), ApiError> {
    let bind_err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_path_buf()));
        }
        // A socket someone still answers on is not stale: leave it alone.
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    std::thread::Builder::new()
        .name("ufvmm-api".into())
        .spawn(move || accept(&listener, &target))
        .map_err(bind_err)?;
    Ok(())
}

/// Gives each connection a thread, at most [`MAX_CONNECTIONS`] at a time.
fn accept(listener: &UnixListener, target: &Arc<Target>) {
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else {
            // Out of descriptors, say: back off instead of spinning on the error.
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            refuse(&mut stream);
            continue;
        }
        let slot = Slot(open.clone());
        let target = target.clone();
        // On a spawn error the closure, and the slot with it, is dropped.
        let _ = std::thread::Builder::new()
            .name("ufvmm-api-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve(stream, &target);
            });
    }
}

/// One of the [`MAX_CONNECTIONS`]; given back when dropped, also by a panic.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One error line to a connection over the cap, then close it. The accept thread does
/// this itself, so it must not block: a fresh socket's buffer takes one line.
fn refuse(stream: &mut UnixStream) {
    let _ = stream.set_nonblocking(true);
    let msg = format!(
        "too many control connections (at most {MAX_CONNECTIONS} at once); try again later"
    );
    let _ = reply(stream, &error(&msg));
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Take what the client already sent, so that closing does not reset its connection
    // before it reads the error.
    // At most 64 KiB: a client that keeps sending must not hold the accept thread.
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if !matches!(stream.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
}

fn serve(stream: UnixStream, target: &Target) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match reader
            .by_ref()
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() as u64 > MAX_LINE {
            let too_long = error(&format!("request longer than {MAX_LINE} bytes"));
            if reply(&mut out, &too_long).is_err() {
                return;
            }
            // Discard the rest of that line, a bounded chunk at a time (closing with
            // unread input would reset the client's connection before it reads the
            // reply); the connection goes on with the next line.
            while line.last() != Some(&b'\n') {
                line.clear();
                match reader.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            continue;
        }
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let (answer, quit) = handle_line(&line, target);
        if reply(&mut out, &answer).is_err() {
            return;
        }
        if quit {
            target.quit();
        }
    }
}

fn reply(out: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut s = v.to_string();
    s.push('\n');
    out.write_all(s.as_bytes())
}

fn error(msg: &str) -> Value {
    json!({"ok": false, "error": msg})
}

/// `{"cmd":"migrate","to":"HOST:PORT","precopy_rounds":N}`: starts migrating.
fn migrate(req: &Value, vm: &Arc<VmShared>) -> Value {
    let Some(to) = req.get("to").and_then(Value::as_str) else {
        return error("\"to\" must be a string HOST:PORT");
    };
    if let Err(e) = crate::config::check_addr("to", to) {
        return error(&e.to_string());
    }
    let rounds = match req.get("precopy_rounds").map(Value::as_u64) {
        None => 0,
        Some(Some(n)) if n <= u64::from(crate::config::MAX_PRECOPY_ROUNDS) => n as u32,
        Some(_) => return error("\"precopy_rounds\" must be a number from 0 to 100"),
    };
    let plan = crate::migration::outgoing::Plan {
        to: to.to_string(),
        precopy_rounds: rounds,
    };
    match crate::migration::outgoing::start(vm, plan) {
        Ok(p) => json!({"ok": true, "to": p.peer}),
        Err(e) => error(&e),
    }
}

/// Answers one request line; the flag says the VM (or the waiting process) should quit
/// after the reply.
pub fn handle_line(line: &[u8], target: &Target) -> (Value, bool) {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return (error(&format!("not JSON: {e}")), false),
    };
    let Some(cmd) = req.get("cmd").and_then(Value::as_str) else {
        return (error("missing \"cmd\" (a string)"), false);
    };
    let Some(vm) = target.vm() else {
        return match cmd {
            "status" => (target.waiting_status(), false),
            "quit" => (json!({"ok": true}), true),
            c if COMMANDS.contains(&c) => (
                error(&format!(
                    "'{c}' needs a VM, and there is none yet: this destination is waiting \
                     for a migration on {}",
                    target.listen.as_deref().unwrap_or("its listen address")
                )),
                false,
            ),
            other => (unknown(other), false),
        };
    };
    match cmd {
        "pause" => (ops::pause(vm), false),
        "resume" => (ops::resume(vm), false),
        "status" => {
            let mut v = ops::status(vm);
            if let (Some(l), Some(m)) = (&target.listen, v["migration"].as_object_mut()) {
                m.insert("listen".into(), json!(l));
            }
            (v, false)
        }
        "stats" => (ops::stats(vm), false),
        "wake" => (ops::wake(vm), false),
        "kick" => {
            let count = req.get("count").map_or(Some(1), Value::as_u64);
            match count {
                Some(n @ 1..=100_000) => (ops::kick(vm, n), false),
                _ => (error("\"count\" must be a number from 1 to 100000"), false),
            }
        }
        "quit" => (json!({"ok": true}), true),
        "migrate" => (migrate(&req, vm), false),
        "migrate-cancel" => (
            match vm.migration().map(|p| p.request_cancel()) {
                Some(Ok(())) => json!({"ok": true}),
                Some(Err(e)) => error(&e),
                None => error("no migration here"),
            },
            false,
        ),
        "migrate-recover" => (
            match vm.migration() {
                Some(p) => {
                    p.request_recover();
                    json!({"ok": true, "state": p.phase().name()})
                }
                None => error("no migration here"),
            },
            false,
        ),
        other => (unknown(other), false),
    }
}

/// Every command the socket knows.
const COMMANDS: &[&str] = &[
    "pause",
    "resume",
    "status",
    "stats",
    "kick",
    "wake",
    "quit",
    "migrate",
    "migrate-recover",
    "migrate-cancel",
];

fn unknown(cmd: &str) -> Value {
    error(&format!(
        "unknown command '{cmd}' ({})",
        COMMANDS.join(", ")
    ))
}
