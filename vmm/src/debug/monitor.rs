//! `monitor` commands (page states, the stall list) and the watchpoints this host
//! cannot give, for the gdb target.

use std::fmt::Write as _;
use std::time::Instant;

use gdbstub::target::ext::breakpoints::{HwWatchpoint, WatchKind};
use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput, MonitorCmd};
use gdbstub::target::TargetResult;

use super::target::{waiting, GuestTarget};
use crate::memory::PageState;

impl HwWatchpoint for GuestTarget {
    /// Refused: this host's KVM checks no data breakpoint, at CPL0 (its emulator) or
    /// at CPL3 (measured: `repro/cpl3_debugregs.c`). gdb says it cannot insert it.
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        _kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        eprintln!("ufvmm: gdb: watchpoint at {addr:#x} ({len} bytes) refused: this host's KVM checks no data breakpoints");
        Ok(false)
    }

    fn remove_hw_watchpoint(
        &mut self,
        _addr: u64,
        _len: u64,
        _kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        Ok(false)
    }
}

impl MonitorCmd for GuestTarget {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), Self::Error> {
        let cmd = String::from_utf8_lossy(cmd);
        let mut words = cmd.split_whitespace();
        match (words.next(), words.next()) {
            (Some("page"), Some(a)) => {
                let parsed = a.strip_prefix("0x").map_or_else(
                    || a.parse::<u64>().ok(),
                    |h| u64::from_str_radix(h, 16).ok(),
                );
                match parsed {
                    Some(gpa) => outputln!(out, "{}", self.page_line(gpa)),
                    None => outputln!(out, "monitor page: {a:?} is no address"),
                }
            }
            (Some("stalls"), None) => {
                let now = Instant::now();
                let mut any = false;
                for (id, s) in self.stalls() {
                    let before = self.before_state(id);
                    outputln!(out, "vcpu {id}: {}", waiting(&s, before, now));
                    any = true;
                }
                if !any {
                    outputln!(out, "no vcpu waits for a page");
                }
            }
            (Some("cregs"), None) => {
                // gdb's x86-64 description has no control registers: shown here.
                for (id, st) in self.live_states_by_id() {
                    let r = &st.sregs;
                    outputln!(
                        out,
                        "vcpu {id}: cpl {} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} fs_base {:#x} gs_base {:#x}",
                        r.cs.selector & 3,
                        r.cr0,
                        r.cr2,
                        r.cr3,
                        r.cr4,
                        r.efer,
                        r.fs.base,
                        r.gs.base
                    );
                }
            }
            _ => {
                outputln!(out, "ufvmm monitor commands:");
                outputln!(
                    out,
                    "  page ADDR   the state of the guest-physical page at ADDR"
                );
                outputln!(out, "  stalls      which vcpus wait for which pages");
                outputln!(
                    out,
                    "  cregs       each vcpu's CPL, control registers, EFER, FS/GS base"
                );
            }
        }
        Ok(())
    }
}

impl GuestTarget {
    /// "page 0x…: present" / "requested for N ms (vcpu 1 waits)" / "missing".
    fn page_line(&self, gpa: u64) -> String {
        let page = self.vm().fault.ram.page_base(gpa);
        let map = &self.vm().fault.ram.pages;
        let Some(idx) = self.vm().fault.ram.page_of(gpa) else {
            return format!("page {page:#x}: outside guest RAM");
        };
        let now = Instant::now();
        let mut line = format!("page {page:#x}: ");
        let waiters: Vec<(usize, Instant)> = self
            .stalls()
            .filter(|(_, s)| s.gpa == page)
            .map(|(id, s)| (id, s.since))
            .collect();
        let _ = match map.get(idx) {
            PageState::Present => write!(line, "present"),
            PageState::Missing => write!(line, "missing"),
            PageState::Lost => write!(line, "lost (it will never come)"),
            PageState::Requested => match waiters.iter().map(|w| w.1).min() {
                Some(since) => write!(
                    line,
                    "requested for {} ms",
                    now.saturating_duration_since(since).as_millis()
                ),
                None => write!(line, "requested"),
            },
        };
        for (id, _) in waiters {
            let _ = write!(line, ", vcpu {id} waits for it");
        }
        line
    }
}
