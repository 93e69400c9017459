//! The `ufvmm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ufvmm::config::{self, Mode, SourceSpec, VmConfig, Workload};
use ufvmm::source::link::LinkSpec;

#[derive(Parser)]
#[command(
    name = "ufvmm",
    version,
    about = "A small KVM VMM whose vCPUs stay controllable while guest pages arrive late"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest (the built-in one unless --kernel) with RAM served through userfaultfd.
    Run(Box<RunArgs>),
    /// Send one command to a running VM's control socket and print the reply.
    Ctl(CtlArgs),
    /// Wait for a migration from `run --migrate-to` and run the guest it brings, in its
    /// RAM page size (2 MiB hugetlb pages for a `--hugepages` source, which the pool
    /// must hold).
    Incoming(IncomingArgs),
    /// Forward TCP connections through the link model (latency, bandwidth, stalls,
    /// disconnect@T, corrupt@T).
    LinkProxy(ProxyArgs),
    /// Write the built-in guest's ELF, with its symbols and debug info, for gdb
    /// (`gdb FILE -ex 'target remote :PORT'`).
    GuestElf {
        /// Where to write it.
        file: PathBuf,
    },
    /// Draw SVG figures of `--report` files: fault latency, kick and pause latency, and
    /// a migration over time. Several reports go on the same figures, labelled.
    Plot(PlotArgs),
}

#[derive(clap::Args)]
struct PlotArgs {
    /// The `--report` JSON files.
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    /// The folder the SVG files go to (made if missing).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// A report's name on the figures, once per report in order (default: file names).
    #[arg(long)]
    label: Vec<String>,
}

fn plot(a: &PlotArgs) -> ExitCode {
    match ufvmm::plot::plot_reports(&a.reports, &a.label, &a.out) {
        Ok(done) => {
            for s in &done.skipped {
                eprintln!("ufvmm: plot: not drawn: {s}");
            }
            for p in &done.written {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ufvmm: error: plot: {e}");
            ExitCode::from(1)
        }
    }
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Where to listen: HOST:PORT, or PORT for 127.0.0.1:PORT (port 0 picks one).
    #[arg(long)]
    listen: String,
    /// Where to forward: HOST:PORT, or PORT for 127.0.0.1:PORT.
    #[arg(long)]
    connect: String,
    /// The link model, e.g. latency=2ms,bandwidth=100MiB/s,stall=2s@1s,disconnect@3s.
    #[arg(long)]
    link: Option<String>,
}

fn link_proxy(a: &ProxyArgs) -> ExitCode {
    let link = match a.link.as_deref().map(str::parse::<LinkSpec>).transpose() {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => {
            eprintln!("ufvmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    match ufvmm::migration::proxy::run(&a.listen, &a.connect, &link) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ufvmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

#[derive(clap::Args)]
struct IncomingArgs {
    /// Where to listen: HOST:PORT, or PORT for 127.0.0.1:PORT (port 0 picks one).
    #[arg(long)]
    listen: String,
    /// Control socket (JSON lines), up once a migration has arrived.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Write a JSON report here when the VM ends.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Serve gdb once the guest is here: PORT, HOST:PORT, or unix:PATH (mode 0600).
    #[arg(long)]
    gdb: Option<String>,
    /// With --gdb: hold the guest before its first instruction here until gdb
    /// continues it.
    #[arg(long)]
    gdb_wait: bool,
    /// Read-ahead as a request window: after sequential faults also ask the source for
    /// the next pages: 0 or off (default), N pages (up to 1024), or auto (4 doubling to 256).
    #[arg(long, allow_hyphen_values = true)]
    prefetch: Option<String>,
}

fn incoming(a: IncomingArgs) -> ExitCode {
    let gdb = match a.gdb.as_deref().map(str::parse).transpose() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("ufvmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    let prefetch = match a.prefetch.as_deref().map(str::parse).transpose() {
        Ok(p) => p.unwrap_or_default(),
        Err(e) => {
            eprintln!("ufvmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = ufvmm::migration::incoming::Options {
        listen: a.listen,
        api_sock: a.api_sock,
        report: a.report,
        gdb,
        gdb_wait: a.gdb_wait,
        prefetch,
    };
    if let Err(e) = opts.validate() {
        eprintln!("ufvmm: error: {e}");
        return ExitCode::from(2);
    }
    match ufvmm::migration::incoming::run(&opts) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ufvmm: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[derive(clap::Args)]
struct CtlArgs {
    /// The VM's --api-sock.
    #[arg(long)]
    sock: PathBuf,
    /// A command name (pause, resume, status, stats, kick, wake, quit, migrate-recover)
    /// or a JSON object such as {"cmd":"migrate","to":"127.0.0.1:4444"}.
    cmd: String,
}

/// `ufvmm ctl`: one request, one reply line.
fn ctl(a: &CtlArgs) -> Result<String, String> {
    use std::io::{BufRead, BufReader, Write};
    let line = if a.cmd.trim_start().starts_with('{') {
        a.cmd.clone()
    } else {
        serde_json::json!({ "cmd": a.cmd }).to_string()
    };
    let sock = std::os::unix::net::UnixStream::connect(&a.sock)
        .map_err(|e| format!("cannot connect to {}: {e}", a.sock.display()))?;
    let _ = sock.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    (&sock)
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&sock)
        .read_line(&mut reply)
        .map_err(|e| format!("no reply: {e}"))?;
    Ok(reply.trim_end().to_string())
}

#[derive(clap::Args)]
struct RunArgs {
    /// Number of vCPUs (1..=64, or KVM's limit if lower).
    #[arg(long, default_value_t = 2)]
    vcpus: u64,
    /// Guest RAM: bytes or K/M/G, a multiple of 2 MiB, 8 MiB..=1 TiB and at most the
    /// host's MemTotal; beyond 3 GiB it lies at GPA 4 GiB.
    #[arg(long, default_value = "256M")]
    mem: String,
    /// NAME[:key=value,...]: touch, verify, spin, halt, mailbox, crash.
    #[arg(long, default_value = "touch")]
    workload: String,
    /// Run the workload at CPL3 (user) or CPL0 (kernel).
    #[arg(long, default_value = "user")]
    mode: Mode,
    /// Where missing pages come from: zero | image:PATH.
    #[arg(long, default_value = "zero")]
    source: String,
    /// Link model in front of the source, e.g. latency=2ms,bandwidth=200MiB/s,stall=5s@300ms.
    #[arg(long)]
    link: Option<String>,
    /// Plain memory, no userfaultfd (the baseline).
    #[arg(long)]
    no_uffd: bool,
    /// With --no-uffd: populate all RAM before the guest starts, so the baseline leaves
    /// out the host's own page allocation on first touch.
    #[arg(long)]
    prefault: bool,
    /// Back guest RAM with 2 MiB hugetlb pages and serve it 2 MiB at a time (--mem a
    /// multiple of 2 MiB; the pool must hold it: /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    hugepages: bool,
    /// Boot this ELF instead of the built-in guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Control socket (JSON lines).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Write a JSON report here when the VM ends.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write a raw memory image here when the guest exits.
    #[arg(long)]
    dump_memory: Option<PathBuf>,
    /// Migrate the running guest to `ufvmm incoming` at HOST:PORT (or PORT).
    #[arg(long)]
    migrate_to: Option<String>,
    /// When to migrate, counted from the start (e.g. 2s).
    #[arg(long)]
    migrate_at: Option<String>,
    /// Rounds of precopy (memory sent while the guest runs) before postcopy.
    #[arg(long)]
    precopy_rounds: Option<u32>,
    /// Serve gdb: PORT (on 127.0.0.1), HOST:PORT, or unix:PATH (mode 0600).
    #[arg(long)]
    gdb: Option<String>,
    /// With --gdb: hold the guest before its first instruction until gdb continues it.
    #[arg(long)]
    gdb_wait: bool,
    /// Read-ahead after sequential faults: 0 or off (default), N pages (up to 1024),
    /// or auto (a window of 4 pages doubling to 256).
    #[arg(long, allow_hyphen_values = true)]
    prefetch: Option<String>,
    /// Stream the source's missing pages in the background at RATE, e.g. 64MiB/s or
    /// 5000pages/s (default off).
    #[arg(long, allow_hyphen_values = true)]
    background: Option<String>,
}

fn to_config(a: RunArgs) -> Result<VmConfig, config::ConfigError> {
    let cfg = VmConfig {
        vcpus: config::check_vcpus(a.vcpus)?,
        mem: config::parse_mem(&a.mem)?,
        workload: a.workload.parse::<Workload>()?,
        mode: a.mode,
        source: a.source.parse::<SourceSpec>()?,
        link: a.link.as_deref().map(str::parse::<LinkSpec>).transpose()?,
        no_uffd: a.no_uffd,
        prefault: a.prefault,
        hugepages: a.hugepages,
        kernel: a.kernel,
        api_sock: a.api_sock,
        report: a.report,
        dump_memory: a.dump_memory,
        migrate_at: a
            .migrate_at
            .as_deref()
            .map(config::parse_duration)
            .transpose()?
            .unwrap_or_default(),
        precopy_rounds: a.precopy_rounds.unwrap_or(0),
        migrate_to: a.migrate_to,
        gdb: a.gdb.as_deref().map(str::parse).transpose()?,
        gdb_wait: a.gdb_wait,
        policies: ufvmm::fault::prefetch::Policies {
            prefetch: a
                .prefetch
                .as_deref()
                .map(str::parse)
                .transpose()?
                .unwrap_or_default(),
            background: a.background.as_deref().map(str::parse).transpose()?,
        },
    };
    if cfg.migrate_to.is_none() && (a.migrate_at.is_some() || a.precopy_rounds.is_some()) {
        return Err(config::ConfigError::Conflict(
            "--migrate-at and --precopy-rounds go with --migrate-to",
        ));
    }
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let args = match Cli::parse().cmd {
        Cmd::Run(args) => *args,
        Cmd::LinkProxy(p) => return link_proxy(&p),
        Cmd::Incoming(a) => return incoming(a),
        Cmd::Plot(a) => return plot(&a),
        Cmd::GuestElf { file } => {
            return match std::fs::write(&file, ufvmm::boot::BUILTIN_GUEST) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ufvmm: error: cannot write {}: {e}", file.display());
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Ctl(c) => {
            return match ctl(&c) {
                Ok(reply) => {
                    println!("{reply}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ufvmm: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    };
    let cfg = match to_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ufvmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    match ufvmm::vm::run(&cfg) {
        // Exit at once: vCPU threads stuck in the kernel must not be waited for.
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ufvmm: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
