//! Builds the built-in guest (`guest/`) into `$OUT_DIR/guest.elf`.
//!
//! The guest is a `no_std` x86-64 ELF compiled by invoking the same `rustc` cargo uses,
//! for the host target, and linked with `cc` and `guest/linker.ld`. No nested cargo,
//! no nightly features, no extra tools.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The only target the guest is built for (it is an x86-64 long-mode kernel).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest = root.join("guest");
    let src = guest.join("src");
    let linker_script = guest.join("linker.ld");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let elf = out_dir.join("guest.elf");

    println!("cargo:rerun-if-changed=vmm/build.rs");
    println!("cargo:rerun-if-changed={}", linker_script.display());
    // The directory itself, so that adding a module reruns the build too.
    println!("cargo:rerun-if-changed={}", src.display());
    for file in rust_sources(&src) {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.arg(src.join("main.rs"))
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "ufvmm_guest",
        ])
        .args(["--target", GUEST_TARGET])
        .args(guest_codegen_flags())
        .arg(format!("-Clink-arg=-T{}", linker_script.display()))
        // Paths would otherwise end up in panic locations; keep the image independent of
        // where the tree is checked out.
        .arg(format!("--remap-path-prefix={}=guest", guest.display()))
        .arg("-o")
        .arg(&elf)
        // A RUSTFLAGS meant for the VMM must not leak into the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run rustc for the guest: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "building the guest failed ({}):\n{}\ncommand: {:?}",
            output.status, stderr, cmd
        );
    }
    for line in unexpected_warnings(&stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        println!("cargo:warning=guest: {line}");
    }
}

/// rustc's stderr without the one warning we expect: disabling SSE2 on a hard-float
/// target (rust-lang/rust#116344). It is the price of building a no-SSE kernel on
/// stable Rust with only the host target; the guest passes no floats anywhere.
fn unexpected_warnings(stderr: &str) -> String {
    stderr
        .split("\n\n")
        .filter(|d| !d.contains("must be enabled to ensure that the ABI of the current target"))
        .filter(|d| !(d.starts_with("warning: ") && d.trim_end().ends_with("emitted")))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Code generation and link flags for the guest.
fn guest_codegen_flags() -> Vec<&'static str> {
    vec![
        "-Cpanic=abort",
        "-Copt-level=2",
        "-Cdebug-assertions=off",
        "-Coverflow-checks=off",
        // Full debug info and frame pointers: gdb loads this very file (`ufvmm
        // guest-elf`) for symbols, source lines and backtraces. Debug sections are not
        // loaded into guest RAM.
        "-Cdebuginfo=2",
        "-Cforce-frame-pointers=yes",
        "-Ccodegen-units=1",
        "-Cmetadata=ufvmm-guest",
        "-Crelocation-model=static",
        "-Ccode-model=small",
        // Interrupts and exceptions at CPL0 are delivered on the current stack.
        "-Cno-redzone=yes",
        // KVM's instruction emulator (all CPL0 code here) cannot run SSE instructions.
        "-Ctarget-feature=-sse,-sse2,-avx,-avx2",
        "-Cforce-unwind-tables=no",
        "-Clink-arg=-nostartfiles",
        "-Clink-arg=-nostdlib",
        "-Clink-arg=-static",
        "-Clink-arg=-Wl,--build-id=none",
        "-Clink-arg=-Wl,-z,max-page-size=4096",
        "-Clink-arg=-Wl,-z,noexecstack",
    ]
}

/// All `.rs` files under `dir`, sorted (so the rerun list is stable).
fn rust_sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}
