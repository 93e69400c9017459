//! Child processes of a bench: killed on drop, waited for with a bound, asked over
//! their control socket, and the port a listening one prints.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A child process, killed on drop unless it already exited.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Kill {
    /// Waits up to `limit` for the exit; an error unless it exits 0.
    pub fn wait_ok(&mut self, what: &str, limit: Duration, log: &Path) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            match self.0.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => {
                    return Err(format!("{what} exited {st}\n{}", super::log_tail(log)))
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    return Err(format!(
                        "{what} still running after {limit:?}\n{}",
                        super::log_tail(log)
                    ))
                }
                Err(e) => return Err(format!("waitpid {what}: {e}")),
            }
        }
    }

    pub fn check_alive(&mut self, what: &str, log: &Path) -> Result<(), String> {
        match self.0.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(format!(
                "{what} exited early ({st})\n{}",
                super::log_tail(log)
            )),
            Err(e) => Err(format!("waitpid {what}: {e}")),
        }
    }
}

/// One request on the control socket at `sock`, a fresh connection each time (the
/// bench asks seldom); `None` while nothing listens there yet.
pub fn ctl(sock: &Path, line: &str) -> Result<Option<Value>, String> {
    let mut s = match UnixStream::connect(sock) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) => return Err(format!("{}: {e}", sock.display())),
    };
    let limit = Some(Duration::from_secs(5));
    s.set_read_timeout(limit).map_err(|e| e.to_string())?;
    s.set_write_timeout(limit).map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("sending {line}: {e}"))?;
    let mut reply = String::new();
    BufReader::new(s.take(1 << 20))
        .read_line(&mut reply)
        .map_err(|e| format!("reading the reply to {line}: {e}"))?;
    serde_json::from_str(&reply)
        .map(Some)
        .map_err(|e| format!("bad reply to {line}: {e}: {reply}"))
}

/// Polls `sock` with `line` every 100 ms until `done` holds for the reply, the child
/// dies or `limit` passes.
pub fn poll_until(
    child: &mut Kill,
    what: &str,
    log: &Path,
    sock: &Path,
    line: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<Value, String> {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    loop {
        child.check_alive(what, log)?;
        if let Some(v) = ctl(sock, line)? {
            if done(&v) {
                return Ok(v);
            }
            last = v;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what}: not there after {limit:?}; last {line}: {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Spawns `bin ARGS` (stdin closed, stderr to `log`, stdout as given).
pub fn spawn(bin: &Path, args: &[String], log: &Path, stdout: Stdio) -> Result<Kill, String> {
    let err = std::fs::File::create(log).map_err(|e| format!("{log:?}: {e}"))?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(err)
        .spawn()
        .map(Kill)
        .map_err(|e| format!("spawn {}: {e}", bin.display()))
}

/// The port of a child's first stdout line, "... listening on HOST:PORT" (as
/// `incoming` and `link-proxy` print it); the rest of its stdout is drained so that it
/// never blocks.
pub fn listen_port(child: &mut Kill) -> Result<u16, String> {
    let out = child.0.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(out);
    let mut line = String::new();
    lines.read_line(&mut line).map_err(|e| e.to_string())?;
    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
    line.split("listening on ")
        .nth(1)
        .and_then(|r| r.split([',', '\n']).next())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| format!("no port in {line:?}"))
}
