//! What a VM is asked to be: parsed and validated command-line values.
//!
//! Every parser here turns bad input into a [`ConfigError`] with a one-line message;
//! nothing panics on user input.

use std::path::PathBuf;
use std::time::Duration;

use crate::abi;

/// Errors in command-line values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size such as `--mem` did not parse.
    #[error("invalid size '{0}': expected a number with an optional K, M, G or T suffix")]
    Size(String),
    /// `--mem` is outside what ufvmm supports.
    #[error("--mem {got}: {why}")]
    Mem {
        /// The value given.
        got: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `--mem` is more than the host has.
    #[error("--mem {got}: more than this host's RAM ({host_mib} MiB in /proc/meminfo)")]
    MemHost {
        /// The value given.
        got: String,
        /// The host's `MemTotal`, in MiB.
        host_mib: u64,
    },
    /// `--vcpus` is outside 1..=MAX_VCPUS.
    #[error("--vcpus {0}: must be between 1 and {max}", max = abi::MAX_VCPUS)]
    Vcpus(u64),
    /// The workload spec did not parse.
    #[error("--workload '{spec}': {why}")]
    Workload {
        /// The spec given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// An address is not HOST:PORT or PORT.
    #[error("{flag} '{value}': expected HOST:PORT or PORT")]
    Address {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
    },
    /// `--source` did not parse.
    #[error("--source '{0}': expected 'zero' or 'image:PATH'")]
    Source(String),
    /// A duration did not parse.
    #[error("invalid duration '{0}': expected a number with a unit (ns, us, ms, s), e.g. 300ms")]
    Duration(String),
    /// The link spec did not parse.
    #[error("--link '{spec}': {why}")]
    Link {
        /// The spec given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// A `--prefetch` or `--background` value that does not parse.
    #[error("{flag} '{value}': {why}")]
    Policy {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// Two options that cannot be used together.
    #[error("{0}")]
    Conflict(&'static str),
    /// A `--gdb` value that is no address.
    #[error("--gdb '{0}': expected PORT, HOST:PORT or unix:PATH")]
    Gdb(String),
    /// An output path whose directory does not exist.
    #[error("{flag} {path}: the directory does not exist")]
    NoDirectory {
        /// The flag.
        flag: &'static str,
        /// The path given.
        path: String,
    },
}

/// Largest guest RAM ufvmm's structures and boot page tables are made for; the host's
/// `MemTotal` is the other bound. RAM beyond 3 GiB lies at 4 GiB (`memory::layout`).
pub const MAX_MEM: u64 = 1 << 40;
/// Smallest guest RAM: the guest image region plus a 4 MiB test area.
pub const MIN_MEM: u64 = 8 << 20;
/// RAM must be a whole number of these (the boot page tables use 2 MiB pages).
pub const MEM_ALIGN: u64 = 2 << 20;

/// Parses a size: plain bytes, or a number with a K, M, G or T suffix (binary units).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        Some((i, 't' | 'T')) => (&t[..i], 40),
        Some(_) => (t, 0),
        None => return Err(err()),
    };
    let n: u64 = num.trim().parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Parses and checks `--mem`.
pub fn parse_mem(s: &str) -> Result<u64, ConfigError> {
    let bytes = parse_size(s)?;
    let bad = |why| ConfigError::Mem {
        got: s.to_string(),
        why,
    };
    if bytes == 0 {
        return Err(bad("must not be zero"));
    }
    if bytes % MEM_ALIGN != 0 {
        return Err(bad("must be a multiple of 2 MiB"));
    }
    if bytes < MIN_MEM {
        return Err(bad("must be at least 8 MiB"));
    }
    if bytes > MAX_MEM {
        return Err(bad("must be at most 1 TiB"));
    }
    check_host_mem(bytes).map_err(|host_mib| ConfigError::MemHost {
        got: s.to_string(),
        host_mib,
    })?;
    Ok(bytes)
}

/// Checks `bytes` of guest RAM against the host's `MemTotal`; on refusal gives it in
/// MiB. A host whose `/proc/meminfo` cannot be read is not checked.
pub fn check_host_mem(bytes: u64) -> Result<(), u64> {
    match crate::memory::usage::host_mem_total() {
        Some(host) if bytes > host => Err(host >> 20),
        _ => Ok(()),
    }
}

/// Checks `--vcpus`.
pub fn check_vcpus(n: u64) -> Result<usize, ConfigError> {
    if n == 0 || n > abi::MAX_VCPUS as u64 {
        return Err(ConfigError::Vcpus(n));
    }
    Ok(n as usize)
}

/// Longest duration accepted anywhere (a year): keeps time arithmetic far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a duration such as `300ms`, `5s`, `20us`, `100ns` (at most a year).
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let err = || ConfigError::Duration(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let d = match unit {
        "ns" => Duration::from_nanos(n),
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        _ => return Err(err()),
    };
    if d > MAX_DURATION {
        return Err(err());
    }
    Ok(d)
}

/// Where the workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// CPL3: runs natively on this machine; signals interrupt page waits.
    User,
    /// CPL0: run by KVM's instruction emulator here; page waits ignore signals.
    Kernel,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "user" => Ok(Mode::User),
            "kernel" => Ok(Mode::Kernel),
            _ => Err(format!("'{s}': expected 'user' or 'kernel'")),
        }
    }
}

/// The guest workload and its parameters, as written into [`abi::BootInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Name as given (`touch`, `verify`, ...).
    pub name: String,
    /// The abi workload number.
    pub id: u32,
    /// Pages per vCPU (0 = whole slice).
    pub pages: u64,
    /// Pseudo-random order.
    pub random: bool,
    /// Write (touch).
    pub write: bool,
    /// All vCPUs use the same pages.
    pub shared: bool,
    /// verify phase.
    pub phase: u32,
    /// verify seed.
    pub seed: u64,
    /// verify words per page.
    pub words: u32,
    /// mailbox: use a page the guest never touched.
    pub fresh: bool,
    /// spin duration / halt timer / verify idle time (ms).
    pub ms: u64,
    /// spin heartbeat interval (ms).
    pub heartbeat_ms: u64,
    /// halt count.
    pub count: u32,
    /// crash kind.
    pub crash_kind: u32,
    /// verify rounds.
    pub rounds: u32,
    /// verify: at least this many seconds.
    pub seconds: u32,
    /// touch/verify: one page in this many (1 = every page).
    pub stride: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            name: "touch".into(),
            id: abi::workload::TOUCH,
            pages: 0,
            random: false,
            write: true,
            shared: false,
            phase: abi::phase::BOTH,
            seed: 1,
            words: 8,
            fresh: false,
            ms: 0,
            heartbeat_ms: 100,
            count: 1,
            crash_kind: abi::crash::UD,
            rounds: 1,
            seconds: 0,
            stride: 1,
        }
    }
}

impl std::str::FromStr for Workload {
    type Err = ConfigError;

    /// Parses `NAME[:key=value,...]`.
    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::Workload {
            spec: spec.to_string(),
            why,
        };
        let (name, params) = spec.split_once(':').unwrap_or((spec, ""));
        let mut w = Workload {
            name: name.to_string(),
            ..Workload::default()
        };
        let allowed: &[&str] = match name {
            "touch" => &["pages", "order", "access", "shared", "stride"],
            "verify" => &[
                "pages", "order", "shared", "seed", "phase", "words", "rounds", "seconds",
                "stride", "idle",
            ],
            "spin" => &["ms", "heartbeat"],
            "halt" => &["ms", "count"],
            "mailbox" => &["fresh"],
            "crash" => &["kind"],
            _ => {
                return Err(bad(format!(
                    "unknown workload '{name}' (touch, verify, spin, halt, mailbox, crash)"
                )))
            }
        };
        w.id = match name {
            "touch" => abi::workload::TOUCH,
            "verify" => abi::workload::VERIFY,
            "spin" => abi::workload::SPIN,
            "halt" => abi::workload::HALT,
            "mailbox" => abi::workload::MAILBOX,
            _ => abi::workload::CRASH,
        };
        if name == "spin" {
            w.ms = 1000;
        }
        if name == "halt" {
            w.ms = 100;
        }
        for kv in params.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("'{kv}' is not key=value")))?;
            if !allowed.contains(&k) {
                return Err(bad(format!(
                    "'{name}' takes no '{k}' (it takes: {})",
                    allowed.join(", ")
                )));
            }
            let num = || -> Result<u64, ConfigError> {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{k}={v}: expected a number")))
            };
            let flag = || -> Result<bool, ConfigError> {
                match v {
                    "1" | "true" | "yes" => Ok(true),
                    "0" | "false" | "no" => Ok(false),
                    _ => Err(bad(format!("{k}={v}: expected 0 or 1"))),
                }
            };
            match k {
                "pages" => w.pages = num()?,
                "order" => {
                    w.random = match v {
                        "seq" | "sequential" => false,
                        "random" => true,
                        _ => return Err(bad(format!("order={v}: expected seq or random"))),
                    }
                }
                "access" => {
                    w.write = match v {
                        "read" => false,
                        "write" => true,
                        _ => return Err(bad(format!("access={v}: expected read or write"))),
                    }
                }
                "shared" => w.shared = flag()?,
                "seed" => w.seed = num()?,
                "phase" => {
                    w.phase = match v {
                        "both" => abi::phase::BOTH,
                        "write" => abi::phase::WRITE,
                        "check" => abi::phase::CHECK,
                        _ => return Err(bad(format!("phase={v}: expected both, write or check"))),
                    }
                }
                "words" => {
                    let n = num()?;
                    if !(1..=512).contains(&n) {
                        return Err(bad(format!("words={v}: expected 1..=512")));
                    }
                    w.words = n as u32;
                }
                "fresh" => w.fresh = flag()?,
                "stride" => {
                    w.stride = Some(num()?)
                        .filter(|n| (1..=1 << 28).contains(n))
                        .ok_or_else(|| bad(format!("stride={v}: expected 1..=268435456")))?
                }
                "rounds" => {
                    w.rounds = num()?
                        .try_into()
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| bad(format!("rounds={v}: expected 1..=4294967295")))?
                }
                "seconds" => {
                    w.seconds = num()?
                        .try_into()
                        .ok()
                        .filter(|&n| n <= 86_400)
                        .ok_or_else(|| bad(format!("seconds={v}: expected 0..=86400")))?
                }
                // verify's idle time shares the boot info's `ms` with spin and halt.
                "ms" | "idle" => w.ms = num()?,
                "heartbeat" => {
                    w.heartbeat_ms = num()?;
                    if w.heartbeat_ms == 0 {
                        return Err(bad("heartbeat=0: expected at least 1 ms".into()));
                    }
                }
                "count" => {
                    let n = num()?;
                    if !(1..=1_000_000).contains(&n) {
                        return Err(bad(format!("count={v}: expected 1..=1000000")));
                    }
                    w.count = n as u32;
                }
                "kind" => {
                    w.crash_kind = match v {
                        "ud" => abi::crash::UD,
                        "pf" => abi::crash::PF,
                        "de" => abi::crash::DE,
                        "triple" => abi::crash::TRIPLE,
                        _ => return Err(bad(format!("kind={v}: expected ud, pf, de or triple"))),
                    }
                }
                _ => unreachable!("keys are checked against the allowed list"),
            }
        }
        let many_rounds = w.rounds > 1 || w.seconds > 0;
        if many_rounds && w.shared {
            // vCPUs on the same pages run rounds at different speeds: each would see the
            // others' newer pattern as damage.
            return Err(bad(
                "rounds/seconds need each vCPU on its own pages (shared=0)".into(),
            ));
        }
        if many_rounds && w.phase != abi::phase::BOTH {
            return Err(bad("rounds/seconds go with phase=both".into()));
        }
        Ok(w)
    }
}

/// Where missing pages come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// Zero-filled pages (plus the boot image).
    Zero,
    /// A raw memory image exactly `--mem` bytes long.
    Image(PathBuf),
}

impl std::str::FromStr for SourceSpec {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.split_once(':') {
            None if s == "zero" => Ok(SourceSpec::Zero),
            Some(("image", p)) if !p.is_empty() => Ok(SourceSpec::Image(PathBuf::from(p))),
            _ => Err(ConfigError::Source(s.to_string())),
        }
    }
}

/// The whole VM configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Bytes of RAM.
    pub mem: u64,
    /// What the guest runs.
    pub workload: Workload,
    /// At which privilege level.
    pub mode: Mode,
    /// Where pages come from.
    pub source: SourceSpec,
    /// The link model in front of the source, if any.
    pub link: Option<crate::source::link::LinkSpec>,
    /// Run on plain memory, without userfaultfd (the baseline).
    pub no_uffd: bool,
    /// With `no_uffd`: populate all RAM before the guest starts.
    pub prefault: bool,
    /// Back RAM with 2 MiB hugetlb pages, served 2 MiB at a time.
    pub hugepages: bool,
    /// Another guest ELF instead of the built-in one.
    pub kernel: Option<PathBuf>,
    /// Control socket path.
    pub api_sock: Option<PathBuf>,
    /// Report file path.
    pub report: Option<PathBuf>,
    /// Where to write a memory image when the guest exits.
    pub dump_memory: Option<PathBuf>,
    /// Migrate the guest to this destination (HOST:PORT)...
    pub migrate_to: Option<String>,
    /// ...this long after the start.
    pub migrate_at: Duration,
    /// Precopy rounds before switch-over (0: postcopy only).
    pub precopy_rounds: u32,
    /// Read-ahead and background fill (both off by default).
    pub policies: crate::fault::prefetch::Policies,
    /// Serve gdb here.
    pub gdb: Option<crate::debug::GdbAddr>,
    /// Hold the vCPUs before their first instruction until gdb continues them.
    pub gdb_wait: bool,
}

/// Most precopy rounds accepted.
pub const MAX_PRECOPY_ROUNDS: u32 = 100;

/// Checks a HOST:PORT (or PORT) address without resolving it.
pub fn check_addr(flag: &'static str, s: &str) -> Result<(), ConfigError> {
    let ok = s.parse::<u16>().is_ok()
        || s.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Address {
            flag,
            value: s.to_string(),
        })
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 2,
            mem: 256 << 20,
            workload: Workload::default(),
            mode: Mode::User,
            source: SourceSpec::Zero,
            link: None,
            no_uffd: false,
            prefault: false,
            hugepages: false,
            kernel: None,
            api_sock: None,
            report: None,
            dump_memory: None,
            migrate_to: None,
            migrate_at: Duration::ZERO,
            precopy_rounds: 0,
            policies: Default::default(),
            gdb: None,
            gdb_wait: false,
        }
    }
}

impl VmConfig {
    /// Checks combinations of options that each parsed fine on their own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_vcpus(self.vcpus as u64)?;
        parse_mem(&self.mem.to_string())?;
        if self
            .link
            .as_ref()
            .is_some_and(|l| l.has_connection_events())
        {
            return Err(ConfigError::Conflict(
                "--link: disconnect@ and corrupt@ are for link-proxy connections, not a VM's page source",
            ));
        }
        if self.no_uffd && self.link.is_some() {
            return Err(ConfigError::Conflict(
                "--link needs userfaultfd: it cannot be combined with --no-uffd",
            ));
        }
        if self.no_uffd && self.policies != Default::default() {
            return Err(ConfigError::Conflict(
                "--prefetch and --background need userfaultfd: they cannot be combined with --no-uffd",
            ));
        }
        if self.prefault && !self.no_uffd {
            return Err(ConfigError::Conflict(
                "--prefault goes with --no-uffd (with userfaultfd every page starts missing)",
            ));
        }
        if let Some(to) = &self.migrate_to {
            check_addr("--migrate-to", to)?;
        }
        if self.gdb_wait && self.gdb.is_none() {
            return Err(ConfigError::Conflict("--gdb-wait goes with --gdb"));
        }
        if self.precopy_rounds > MAX_PRECOPY_ROUNDS {
            return Err(ConfigError::Conflict(
                "--precopy-rounds: at most 100 rounds",
            ));
        }
        let outputs = [
            ("--report", &self.report),
            ("--dump-memory", &self.dump_memory),
            ("--api-sock", &self.api_sock),
        ];
        check_output_dirs(&outputs)
    }
}

/// Checks that each given output path's directory exists (before a long run, not
/// after it).
pub fn check_output_dirs(outputs: &[(&'static str, &Option<PathBuf>)]) -> Result<(), ConfigError> {
    for (flag, path) in outputs {
        let Some(p) = path else { continue };
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.is_some_and(|d| !d.is_dir()) {
            return Err(ConfigError::NoDirectory {
                flag,
                path: p.display().to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("8k"), Ok(8192));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("9999999999999G").is_err());
    }

    #[test]
    fn mem_limits() {
        assert!(parse_mem("0").is_err());
        assert!(parse_mem("257M").is_err());
        assert!(parse_mem("4M").is_err());
        assert_eq!(parse_mem("8M"), Ok(8 << 20));
        assert_eq!(parse_mem("3G"), Ok(3 << 30));
        assert_eq!(parse_mem("4G"), Ok(4 << 30));
        assert!(parse_mem("1025G").is_err(), "past the fixed ceiling");
        let host = crate::memory::usage::host_mem_total().expect("/proc/meminfo");
        let over = (host + (2 << 20)) & !((2 << 20) - 1);
        if over <= MAX_MEM {
            let e = parse_mem(&over.to_string()).expect_err("more than the host has");
            assert!(matches!(e, ConfigError::MemHost { .. }), "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("20us"), Ok(Duration::from_micros(20)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("99999999999s").is_err());
    }

    #[test]
    fn workloads() {
        let w: Workload = "touch:pages=10,order=random,access=read,shared=1"
            .parse()
            .unwrap();
        assert_eq!(w.pages, 10);
        assert!(w.random && !w.write && w.shared);
        let s: Workload = "touch:stride=512".parse().unwrap();
        assert_eq!(s.stride, 512);
        assert!("touch:stride=0".parse::<Workload>().is_err());
        assert!("spin:stride=2".parse::<Workload>().is_err());
        let r: Workload = "verify:rounds=5,seconds=2".parse().unwrap();
        assert_eq!((r.rounds, r.seconds), (5, 2));
        let v: Workload = "verify:seed=7,phase=check,words=512".parse().unwrap();
        assert!("verify:rounds=0".parse::<Workload>().is_err());
        assert!("verify:rounds=2,shared=1".parse::<Workload>().is_err());
        assert!("verify:seconds=1,phase=write".parse::<Workload>().is_err());
        assert!("verify:seconds=999999".parse::<Workload>().is_err());
        assert_eq!(
            "verify:rounds=1,idle=250".parse::<Workload>().unwrap().ms,
            250
        );
        assert!("touch:idle=5".parse::<Workload>().is_err());
        assert_eq!((v.seed, v.phase, v.words), (7, abi::phase::CHECK, 512));
        assert!("nope".parse::<Workload>().is_err());
        assert!("touch:pages".parse::<Workload>().is_err());
        assert!("touch:seed=1".parse::<Workload>().is_err());
        assert!("verify:words=0".parse::<Workload>().is_err());
        assert!("crash:kind=boom".parse::<Workload>().is_err());
        assert!("spin:heartbeat=0".parse::<Workload>().is_err());
    }

    #[test]
    fn sources() {
        assert_eq!("zero".parse::<SourceSpec>(), Ok(SourceSpec::Zero));
        assert_eq!(
            "image:/tmp/x".parse::<SourceSpec>(),
            Ok(SourceSpec::Image("/tmp/x".into()))
        );
        assert!("image:".parse::<SourceSpec>().is_err());
        assert!("http://x".parse::<SourceSpec>().is_err());
    }
}
