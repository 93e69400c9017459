//! How cost grows with guest RAM: demand paging and postcopy migration at 256 MiB,
//! 1 GiB, 4 GiB and 8 GiB, with 4 KiB pages and with 2 MiB hugetlb pages
//! (`--hugepages`). The per-page cost should stay flat; each size's figure is also
//! given as a ratio to the smallest size's in the same repetition (median of those
//! ratios), and with it the VMM's resident memory beyond guest RAM (the report's
//! `memory.rss_beyond_ram_bytes`), which should grow with RAM only by the page-state
//! map's byte and bit a page.
//!
//! Paging: the guest's sequential `touch` over all of RAM (1 and 2 vCPUs, CPL3 and
//! CPL0), every first touch a userfaultfd fault; the figure is microseconds per page
//! per vCPU (a vCPU's time for its part over the pages it touched, the slowest
//! vCPU's). To keep 8 GiB runs short the guest touches one page in
//! `UFVMM_BENCH_STRIDE` (default 8; 1 touches every page), the same stride at every
//! size, so every size does the same work per page.
//!
//! Migration: the source runs `verify` over the same stride of its RAM on 2 vCPUs; once
//! every page of that stride has been faulted in (written), the bench asks it to
//! migrate (postcopy, no precopy round, no link model) to an `ufvmm incoming`, and
//! quits the destination once it has every page (the destination takes the page size
//! from the source's hello). The figure is the destination's `total_ms` (first byte to
//! last page) in microseconds per 4 KiB of RAM, with 2 MiB pages too, so the two page
//! sizes compare; most pages are never written and go as zero frames, the same share at
//! every size.
//!
//! Run with `cargo bench --bench scale`. Environment: `UFVMM_BENCH_SIZES` (default
//! 256M,1G,4G,8G; the first is the ratios' base), `UFVMM_BENCH_PAGES` (4k,2m; also
//! `4k-plain`, plain memory with `--no-uffd`, a paging baseline shown as 4k/4k-plain),
//! `UFVMM_BENCH_REPS` (3), `UFVMM_BENCH_STRIDE` (8), `UFVMM_BENCH_TABLES` (paging,
//! migration), `UFVMM_BENCH_VCPUS` (1,2), `UFVMM_BENCH_MODES` (user,kernel),
//! `UFVMM_BENCH_UFVMM` (another ufvmm binary). 2m needs a binary that knows
//! `--hugepages` and room in the hugetlb pool: as root the bench raises
//! `/proc/sys/vm/nr_hugepages` by what the largest size needs and takes that many back
//! at the end (not if it is killed: then the pool stays raised); otherwise it says why
//! 2m is skipped. The pool is the machine's: a test that shrinks it meanwhile makes a
//! 2m run fail with ufvmm's own message. Needs /dev/kvm.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::child::{ctl, listen_port, poll_until, spawn};

use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const HUGE: u64 = 2 * MIB;
/// What `UFVMM_BENCH_PAGES` may name: `4k-plain` is 4 KiB pages on plain memory
/// (`--no-uffd`, the host's first touch), a paging baseline; not run unless named.
const PAGES: [&str; 3] = ["4k", "2m", "4k-plain"];
const TABLES: [&str; 2] = ["paging", "migration"];
const MODES: [&str; 2] = ["user", "kernel"];
const SIZES: &str = "256M,1G,4G,8G";
/// vCPUs of the migration source (as in `benches/migration.rs`).
const MIGRATION_VCPUS: usize = 2;
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("scale: /dev/kvm is missing; this bench needs real KVM");
        std::process::exit(1);
    }
    let reps = common::reps(3);
    let sizes = sizes_env();
    let pages = match std::env::var_os("UFVMM_BENCH_PAGES") {
        Some(_) => common::choice_env("UFVMM_BENCH_PAGES", &PAGES),
        None => PAGES[..2].to_vec(),
    };
    let tables = common::choice_env("UFVMM_BENCH_TABLES", &TABLES);
    let vcpus = common::list_env("UFVMM_BENCH_VCPUS", &[1usize, 2]);
    let modes = common::choice_env("UFVMM_BENCH_MODES", &MODES);
    let stride = common::list_env("UFVMM_BENCH_STRIDE", &[8u64])[0];
    assert!(stride >= 1, "UFVMM_BENCH_STRIDE must be at least 1");
    let bin = common::binary();
    println!(
        "scale: sizes {}, pages {pages:?}, touch stride {stride}, {reps} run(s) per configuration, binary {}",
        sizes.iter().map(|s| s.1.as_str()).collect::<Vec<_>>().join(","),
        bin.display()
    );

    // 2m: the flag, and a pool for the largest VM (two at once for a migration).
    let mut pool = None;
    let mut kinds: Vec<Kind> = Vec::new();
    for &p in &pages {
        if p != "2m" {
            let plain = p == "4k-plain";
            kinds.push(Kind {
                huge: false,
                plain,
                migration: !plain,
            });
            continue;
        }
        let largest = sizes.iter().map(|s| s.0).max().unwrap_or(0);
        match hugepages_ready(&bin, tables.contains(&"migration"), largest / HUGE) {
            Ok((p, migration)) => {
                pool = Some(p);
                kinds.push(Kind {
                    huge: true,
                    plain: false,
                    migration,
                });
            }
            Err(why) => println!("2m: skipped: {why}"),
        }
    }
    let result = run_all(&bin, &sizes, &kinds, &tables, &vcpus, &modes, stride, reps);
    // Put the pool back before anything else can end the process.
    drop(pool);
    if let Err(e) = result {
        eprintln!("scale: {e}");
        std::process::exit(1);
    }
}

/// 4 KiB or 2 MiB pages behind guest RAM (or 4 KiB of plain memory, no userfaultfd),
/// and whether the migration table runs with them (a build may take `--hugepages` for
/// `run` and not yet for a migration).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Kind {
    huge: bool,
    plain: bool,
    migration: bool,
}

impl Kind {
    fn name(self) -> &'static str {
        match (self.huge, self.plain) {
            (true, _) => "2m",
            (false, true) => "4k-plain",
            (false, false) => "4k",
        }
    }
    fn args(self) -> Vec<String> {
        if self.huge {
            vec!["--hugepages".into()]
        } else if self.plain {
            vec!["--no-uffd".into()]
        } else {
            Vec::new()
        }
    }
}

/// `UFVMM_BENCH_SIZES` as (bytes, as written), each a multiple of 2 MiB.
fn sizes_env() -> Vec<(u64, String)> {
    let v = std::env::var("UFVMM_BENCH_SIZES").unwrap_or_else(|_| SIZES.into());
    let sizes: Vec<(u64, String)> = v
        .split(',')
        .map(|t| {
            let t = t.trim();
            let (num, unit) = t.split_at(t.trim_end_matches(['K', 'M', 'G']).len());
            let n: u64 = num
                .parse()
                .unwrap_or_else(|_| panic!("UFVMM_BENCH_SIZES: cannot use {t:?}"));
            let bytes = n * match unit {
                "K" => KIB,
                "M" => MIB,
                "G" => GIB,
                _ => 1,
            };
            assert!(
                bytes >= 8 * MIB && bytes.is_multiple_of(HUGE),
                "UFVMM_BENCH_SIZES: {t:?} is not a multiple of 2 MiB from 8M"
            );
            (bytes, t.to_string())
        })
        .collect();
    assert!(!sizes.is_empty(), "UFVMM_BENCH_SIZES is empty");
    sizes
}

/// A raised hugetlb pool; dropping it writes the old size back.
struct Pool {
    /// Pages this bench added to the pool.
    added: u64,
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.added == 0 {
            return;
        }
        // The pool is the machine's: take back only what was added, from its size now
        // (someone else may have changed it meanwhile), not the size seen at the start.
        let now = std::fs::read_to_string(NR_HUGEPAGES)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        let Some(now) = now else {
            eprintln!(
                "scale: cannot read {NR_HUGEPAGES}; it keeps the {} pages added",
                self.added
            );
            return;
        };
        let back = now.saturating_sub(self.added);
        match std::fs::write(NR_HUGEPAGES, back.to_string()) {
            Ok(()) => println!("2m: hugetlb pool back from {now} to {back} pages"),
            Err(e) => eprintln!("scale: could not put {NR_HUGEPAGES} back to {back}: {e}"),
        }
    }
}

/// Whether 2m can run: the binary knows `--hugepages`, and the pool has room for one
/// VM of `per_vm` pages, or two at once if the migration table runs (asked for, and
/// `incoming` knows the flag: the second element), raised if it must be.
fn hugepages_ready(bin: &Path, migration: bool, per_vm: u64) -> Result<(Pool, bool), String> {
    let knows = |sub: &str| {
        Command::new(bin)
            .args([sub, "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("--hugepages"))
            .unwrap_or(false)
    };
    if !knows("run") {
        return Err(format!(
            "{} does not know --hugepages (set UFVMM_BENCH_UFVMM to a build that does)",
            bin.display()
        ));
    }
    let migration = migration && {
        let ok = knows("incoming");
        if !ok {
            println!(
                "2m migration: skipped: {} incoming does not know --hugepages",
                bin.display()
            );
        }
        ok
    };
    let need = if migration { 2 * per_vm } else { per_vm };
    let read = |what: &str| -> Result<u64, String> {
        let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
        text.lines()
            .find_map(|l| l.strip_prefix(what))
            .and_then(|r| r.trim().parse().ok())
            .ok_or_else(|| format!("/proc/meminfo has no {what}"))
    };
    let total = read("HugePages_Total:")?;
    let free = read("HugePages_Free:")?;
    // The pool raised is the default size's; `--hugepages` takes 2 MiB pages.
    let size_ok = std::fs::read_to_string("/proc/meminfo").is_ok_and(|t| {
        t.lines()
            .filter_map(|l| l.strip_prefix("Hugepagesize:"))
            .any(|r| r.trim() == "2048 kB")
    });
    if !size_ok {
        return Err("the default hugetlb page size is not 2 MiB".into());
    }
    let mut pool = Pool { added: 0 };
    if free < need {
        let want = total + (need - free);
        std::fs::write(NR_HUGEPAGES, want.to_string())
            .map_err(|e| format!("cannot raise {NR_HUGEPAGES} to {want} (root is needed): {e}"))?;
        // What the kernel found room for, which may be less than asked.
        pool.added = read("HugePages_Total:")?.saturating_sub(total);
        let got = read("HugePages_Free:")?;
        if got < need {
            // `pool` puts the old size back as it goes.
            return Err(format!(
                "the hugetlb pool has {got} free pages after asking for {want}, {need} needed"
            ));
        }
        println!("2m: hugetlb pool raised from {total} to {want} pages ({need} needed)");
    }
    Ok((pool, migration))
}

/// One configuration's runs, by repetition.
struct Series<T> {
    label: String,
    size: u64,
    size_name: String,
    runs: Vec<T>,
}

impl<T> Series<T> {
    /// One empty series of `group` for each size.
    fn per_size(group: &str, sizes: &[(u64, String)]) -> Vec<Series<T>> {
        sizes
            .iter()
            .map(|(b, s)| Series {
                label: format!("{group} {s}"),
                size: *b,
                size_name: s.clone(),
                runs: Vec::new(),
            })
            .collect()
    }
}

/// One paging run's figures.
struct Paging {
    /// A vCPU's microseconds per page of its part (the slowest vCPU).
    us_per_page: f64,
    faults: u64,
    rss_beyond_ram: f64,
    load: Option<common::Load>,
}

/// One migration's figures.
struct Migration {
    us_per_page: f64,
    total_ms: f64,
    downtime_ms: f64,
    zero_share: f64,
    dest_rss_beyond_ram: f64,
    src_rss_beyond_ram: f64,
    load: Option<common::Load>,
}

#[allow(clippy::too_many_arguments)]
fn run_all(
    bin: &Path,
    sizes: &[(u64, String)],
    kinds: &[Kind],
    tables: &[&str],
    vcpus: &[usize],
    modes: &[&str],
    stride: u64,
    reps: usize,
) -> Result<(), String> {
    let mut paging: Vec<(String, Vec<Series<Paging>>)> = Vec::new();
    let mut migration: Vec<(String, Vec<Series<Migration>>)> = Vec::new();
    for &k in kinds {
        if tables.contains(&"paging") {
            for &mode in modes {
                for &n in vcpus {
                    let group = format!("{} {mode} {n} vCPU(s)", k.name());
                    let series = Series::per_size(&group, sizes);
                    paging.push((group, series));
                }
            }
        }
        if tables.contains(&"migration") && k.migration {
            let group = format!("{} migration", k.name());
            let series = Series::per_size(&group, sizes);
            migration.push((group, series));
        }
    }
    let start = Instant::now();
    // Repetitions outermost, so the machine's drift spreads over every configuration.
    for rep in 1..=reps {
        let mut g = 0;
        for &k in kinds {
            if tables.contains(&"paging") {
                for &mode in modes {
                    for &n in vcpus {
                        for s in paging[g].1.iter_mut() {
                            let r = paging_once(bin, k, mode, n, s.size, stride)
                                .map_err(|e| format!("{}: {e}", s.label))?;
                            println!(
                                "  rep {rep}/{reps} {:<28} {:>7.1} us/page  {:>8} faults  RSS beyond RAM {:>6.1} MiB  other/steal CPUs {}",
                                s.label,
                                r.us_per_page,
                                r.faults,
                                r.rss_beyond_ram / MIB as f64,
                                common::Load::show(r.load)
                            );
                            s.runs.push(r);
                        }
                        g += 1;
                    }
                }
            }
        }
        let mut g = 0;
        for &k in kinds {
            if tables.contains(&"migration") && k.migration {
                for s in migration[g].1.iter_mut() {
                    let r = migrate_once(bin, k, s.size, stride)
                        .map_err(|e| format!("{}: {e}", s.label))?;
                    println!(
                        "  rep {rep}/{reps} {:<28} {:>7.2} us/page  total {:>7.0} ms  downtime {:>5.1} ms  zero {:>4.1}%  RSS beyond RAM dest {:>6.1} MiB source {:>6.1} MiB  other/steal CPUs {}",
                        s.label,
                        r.us_per_page,
                        r.total_ms,
                        r.downtime_ms,
                        r.zero_share * 100.0,
                        r.dest_rss_beyond_ram / MIB as f64,
                        r.src_rss_beyond_ram / MIB as f64,
                        common::Load::show(r.load)
                    );
                    s.runs.push(r);
                }
                g += 1;
            }
        }
    }
    println!("all runs took {:.1} s", start.elapsed().as_secs_f64());

    if !paging.is_empty() {
        println!();
        println!("demand paging, touch seq stride {stride}: us per page per vCPU, median (min-max) of {reps}; ratio: median over reps of size/base in the same rep");
        println!(
            "{:<24} {:>6} {:>20} {:>20} {:>9} {:>22} {:>12} {:>11}",
            "config",
            "RAM",
            "us/page",
            "ratio to base",
            "faults",
            "RSS beyond RAM MiB",
            "+KiB/GiB",
            "others max"
        );
        for (group, series) in &paging {
            let base = &series[0];
            for s in series {
                let us: Vec<f64> = s.runs.iter().map(|r| r.us_per_page).collect();
                let ratio: Vec<f64> = s
                    .runs
                    .iter()
                    .zip(&base.runs)
                    .map(|(r, b)| r.us_per_page / b.us_per_page)
                    .collect();
                let rss: Vec<f64> = s
                    .runs
                    .iter()
                    .map(|r| r.rss_beyond_ram / MIB as f64)
                    .collect();
                let faults = common::median(s.runs.iter().map(|r| r.faults as f64).collect());
                println!(
                    "{group:<24} {:>6} {:>20} {:>20} {faults:>9.0} {:>22} {:>12} {:>11}",
                    s.size_name,
                    common::spread(&us, 1),
                    common::spread(&ratio, 2),
                    common::spread(&rss, 1),
                    growth(s, base, |r| r.rss_beyond_ram),
                    others_max(s.runs.iter().map(|r| r.load))
                );
            }
        }
    }
    against_4k(&paging, "2m", false);
    against_4k(&paging, "4k-plain", true);
    if !migration.is_empty() {
        println!();
        println!("postcopy migration, no link model, 2 vCPUs verify stride {stride}: destination total_ms in us per 4 KiB of RAM (both page sizes), median (min-max) of {reps}");
        println!(
            "{:<16} {:>6} {:>18} {:>18} {:>18} {:>16} {:>7} {:>20} {:>20} {:>13} {:>11}",
            "config",
            "RAM",
            "us/page",
            "ratio to base",
            "total ms",
            "downtime ms",
            "zero %",
            "dest RSS>RAM MiB",
            "src RSS>RAM MiB",
            "dest +KiB/GiB",
            "others max"
        );
        for (group, series) in &migration {
            let base = &series[0];
            for s in series {
                let f =
                    |g: &dyn Fn(&Migration) -> f64| -> Vec<f64> { s.runs.iter().map(g).collect() };
                let ratio: Vec<f64> = s
                    .runs
                    .iter()
                    .zip(&base.runs)
                    .map(|(r, b)| r.us_per_page / b.us_per_page)
                    .collect();
                println!(
                    "{group:<16} {:>6} {:>18} {:>18} {:>18} {:>16} {:>7.1} {:>20} {:>20} {:>13} {:>11}",
                    s.size_name,
                    common::spread(&f(&|r| r.us_per_page), 2),
                    common::spread(&ratio, 2),
                    common::spread(&f(&|r| r.total_ms), 0),
                    common::spread(&f(&|r| r.downtime_ms), 1),
                    common::median(f(&|r| r.zero_share * 100.0)),
                    common::spread(&f(&|r| r.dest_rss_beyond_ram / MIB as f64), 1),
                    common::spread(&f(&|r| r.src_rss_beyond_ram / MIB as f64), 1),
                    growth(s, base, |r| r.dest_rss_beyond_ram),
                    others_max(s.runs.iter().map(|r| r.load)),
                );
            }
        }
    }
    Ok(())
}

/// Another kind of page against 4 KiB behind userfaultfd: each `kind` configuration's
/// us per page over the 4k one's of the same mode, vCPUs and size in the same
/// repetition (median, min-max); `invert` gives 4k over it instead (for the plain
/// memory baseline: what userfaultfd costs, as `uffd/first` in demand_paging).
fn against_4k(paging: &[(String, Vec<Series<Paging>>)], kind: &str, invert: bool) {
    let pairs: Vec<_> = paging
        .iter()
        .filter_map(|(group, huge)| {
            let rest = group.strip_prefix(&format!("{kind} "))?;
            let small = paging.iter().find(|(g, _)| g == &format!("4k {rest}"))?;
            Some((rest, huge, &small.1))
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    println!();
    let what = if invert {
        format!("4k/{kind}")
    } else {
        format!("{kind}/4k")
    };
    println!("{kind} against 4k, same run: us per page {what} (median, min-max over reps)");
    for (rest, huge, small) in pairs {
        for (h, s) in huge.iter().zip(small.iter()) {
            let r: Vec<f64> = h
                .runs
                .iter()
                .zip(&s.runs)
                .map(|(h, s)| {
                    let r = h.us_per_page / s.us_per_page;
                    if invert {
                        1.0 / r
                    } else {
                        r
                    }
                })
                .collect();
            if !r.is_empty() {
                println!(
                    "{rest:<20} {:>6} {:>20}",
                    h.size_name,
                    common::spread(&r, 3)
                );
            }
        }
    }
}

/// How much the RSS beyond RAM grew per GiB of RAM over the base size, in KiB (median
/// over reps of each rep's growth); "-" for the base itself. The page-state map alone
/// is 288 KiB per GiB (a byte and a bit a page).
fn growth<T>(s: &Series<T>, base: &Series<T>, rss: impl Fn(&T) -> f64) -> String {
    if s.size == base.size {
        return "-".into();
    }
    let gib = (s.size as f64 - base.size as f64) / GIB as f64;
    let per: Vec<f64> = s
        .runs
        .iter()
        .zip(&base.runs)
        .map(|(r, b)| (rss(r) - rss(b)) / KIB as f64 / gib)
        .collect();
    format!("{:.0}", common::median(per))
}

/// The most CPUs other processes kept busy in any run of a configuration: a figure
/// from a run beside a compile is not this VMM's cost.
fn others_max(loads: impl Iterator<Item = Option<common::Load>>) -> String {
    let xs: Vec<f64> = loads.flatten().map(|l| l.others).collect();
    if xs.is_empty() {
        return "?".into();
    }
    format!("{:.2}", common::min_max(&xs).1)
}

/// Generous bound for a run that touches `pages` pages: 1 ms a page beyond a minute.
fn limit_for(pages: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_micros(1000 * pages)
}

fn paging_once(
    bin: &Path,
    k: Kind,
    mode: &str,
    vcpus: usize,
    size: u64,
    stride: u64,
) -> Result<Paging, String> {
    let mut args: Vec<String> = vec![
        "--vcpus".into(),
        vcpus.to_string(),
        "--mem".into(),
        size.to_string(),
        "--mode".into(),
        mode.into(),
        "--workload".into(),
        format!("touch:order=seq,stride={stride}"),
    ];
    args.extend(k.args());
    let out = common::run_vm(bin, &args, limit_for(size / (4 * KIB) / stride))?;
    let doc = &out.report;
    let touch = common::GuestTouch::from_report(doc, vcpus)?;
    let faults = doc["vcpus"]
        .as_array()
        .map_or(0, |vs| vs.iter().filter_map(|v| v["faults"].as_u64()).sum());
    Ok(Paging {
        us_per_page: touch.us_per_page() * vcpus as f64,
        faults,
        rss_beyond_ram: rss_beyond_ram(doc)?,
        load: out.load,
    })
}

/// The report's `memory.rss_beyond_ram_bytes`.
fn rss_beyond_ram(doc: &Value) -> Result<f64, String> {
    doc["memory"]["rss_beyond_ram_bytes"]
        .as_f64()
        .ok_or_else(|| {
            format!(
                "report lacks memory.rss_beyond_ram_bytes: {}",
                doc["memory"]
            )
        })
}

/// One postcopy migration of a `size` guest; figures from both reports.
fn migrate_once(bin: &Path, k: Kind, size: u64, stride: u64) -> Result<Migration, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let p = |name: &str| -> PathBuf { dir.path().join(name) };
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let (dlog, slog) = (p("dest.log"), p("source.log"));
    let (dsock, ssock) = (p("dest.sock"), p("source.sock"));

    let dargs: Vec<String> = [
        "incoming",
        "--listen",
        "127.0.0.1:0",
        "--api-sock",
        &s(dsock.clone()),
        "--report",
        &s(p("dest.json")),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    // No page-size flag: the destination takes the source's from its hello.
    let mark = common::CpuMark::now();
    let mut dest = spawn(bin, &dargs, &dlog, Stdio::piped())?;
    let port = listen_port(&mut dest)?;

    let mut sargs: Vec<String> = vec![
        "run".into(),
        "--vcpus".into(),
        MIGRATION_VCPUS.to_string(),
        "--mem".into(),
        size.to_string(),
        "--workload".into(),
        format!("verify:stride={stride},seconds=86400"),
        "--api-sock".into(),
        s(ssock.clone()),
        "--report".into(),
        s(p("source.json")),
    ];
    sargs.extend(k.args());
    let mut source = spawn(bin, &sargs, &slog, Stdio::null())?;

    // Every page of the stride written once: what is faulted in is what the guest
    // wrote (one fault a page, or a 2 MiB page for several). 90%: the boot area is
    // not the guest's to write.
    let unit = (4 * KIB * stride).max(if k.huge { HUGE } else { 4 * KIB });
    let written = size / unit;
    let limit = limit_for(written);
    poll_until(
        &mut source,
        "source",
        &slog,
        &ssock,
        r#"{"cmd":"stats"}"#,
        limit,
        |v| {
            let faults: u64 = v["vcpus"]
                .as_array()
                .map_or(0, |vs| vs.iter().filter_map(|v| v["faults"].as_u64()).sum());
            faults * 10 >= written * 9
        },
    )?;
    let m = ctl(
        &ssock,
        &format!(r#"{{"cmd":"migrate","to":"127.0.0.1:{port}"}}"#),
    )?
    .ok_or("the source's control socket went away")?;
    if m["ok"] != true {
        return Err(format!("migrate refused: {m}"));
    }
    // The destination quits once every page is there; its report has the migration.
    let all_pages = limit_for(size / (4 * KIB) / 20);
    poll_until(
        &mut dest,
        "destination",
        &dlog,
        &dsock,
        r#"{"cmd":"status"}"#,
        all_pages,
        |v| v["migration"]["state"] == "completed",
    )?;
    let q = ctl(&dsock, r#"{"cmd":"quit"}"#)?.ok_or("the destination's socket went away")?;
    if q["ok"] != true {
        return Err(format!("quit refused: {q}"));
    }
    dest.wait_ok("destination", Duration::from_secs(30), &dlog)?;
    source.wait_ok("source", Duration::from_secs(30), &slog)?;
    let load = mark.and_then(|m| m.load_since());

    let read = |path: PathBuf| -> Result<Value, String> {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path:?}: {e}"))?;
        serde_json::from_str(&text).map_err(|e| format!("{path:?}: {e}"))
    };
    let (d, src) = (read(p("dest.json"))?, read(p("source.json"))?);
    let mig = &d["migration"];
    let (Some(total_ms), Some(pages)) = (mig["total_ms"].as_f64(), mig["pages"]["total"].as_f64())
    else {
        return Err(format!(
            "destination report lacks migration.total_ms or pages.total: {mig}"
        ));
    };
    // Per 4 KiB of RAM whatever the page size, so that 4k and 2m compare.
    Ok(Migration {
        us_per_page: total_ms * 1e3 / (size / (4 * KIB)) as f64,
        total_ms,
        downtime_ms: mig["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        zero_share: mig["pages"]["zero"].as_f64().unwrap_or(f64::NAN) / pages,
        dest_rss_beyond_ram: rss_beyond_ram(&d)?,
        src_rss_beyond_ram: rss_beyond_ram(&src)?,
        load,
    })
}
