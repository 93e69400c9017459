//! The real gdb (Debian's), attached to ufvmm's stub and fed commands on stdin, for
//! any `target remote` argument (a Unix socket's path or `HOST:PORT`).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use super::{s, signal};

/// A gdb attached to a stub, fed commands on stdin.
pub struct Gdb {
    pub child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    marks: u32,
}

impl Gdb {
    /// Starts gdb and connects it with `target remote TARGET` (`TARGET` a Unix socket's
    /// path or `HOST:PORT`).
    pub fn attach(target: &str) -> Gdb {
        Self::attach_with(target, None)
    }

    /// [`Gdb::attach`], with the symbols of `elf` (if any) loaded.
    pub fn attach_with(target: &str, elf: Option<&Path>) -> Gdb {
        // stderr into stdout, one stream: an error must come before the marker after
        // it (`exec` keeps the pid, so a signal to the child reaches gdb).
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exec \"$0\" \"$@\" 2>&1", "gdb", "-q", "-nx"])
            .args(["-ex", "set pagination off", "-ex", "set confirm off"])
            .args(["-ex", "set width 0", "-ex"])
            .arg(format!("target remote {target}"));
        if let Some(elf) = elf {
            cmd.arg(elf);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("gdb (on these machines, as for tests/escalation.rs)");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Gdb {
            child,
            stdin,
            lines,
            marks: 0,
        }
    }

    /// [`Gdb::attach`] to the stub's Unix socket at `sock`.
    pub fn attach_unix(sock: &Path) -> Gdb {
        Self::attach(s(sock))
    }

    pub fn send(&mut self, cmd: &str) {
        let _ = writeln!(self.stdin, "{cmd}");
        let _ = self.stdin.flush();
    }

    /// Runs `cmd` and returns what gdb printed for it (up to a marker), within `limit`.
    pub fn run(&mut self, cmd: &str, limit: Duration) -> String {
        self.marks += 1;
        let mark = format!("@@done{}", self.marks);
        self.send(cmd);
        self.send(&format!("echo {mark}\\n"));
        self.until(&mark, limit)
    }

    /// Collects lines until one contains `pat`; panics after `limit`.
    pub fn until(&mut self, pat: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut text = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(pat);
                    text.push_str(&l);
                    text.push('\n');
                    if hit {
                        return text;
                    }
                }
                Err(_) => panic!("gdb printed no {pat:?} within {limit:?}:\n{text}"),
            }
        }
    }

    /// gdb's Ctrl-C.
    pub fn interrupt(&self) {
        signal(self.child.id(), libc::SIGINT);
    }

    pub fn detach(mut self) {
        self.run("detach", Duration::from_secs(10));
        self.send("quit");
        let _ = self.child.wait();
    }
}

impl Drop for Gdb {
    /// A gdb left behind by a failed test does not outlive it.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
