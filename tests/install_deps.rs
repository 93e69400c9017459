//! `scripts/install-deps --check` finds the libclang that bindgen loads, and only that.
//! Each case lays out a fake root directory (as on a new machine, or after the install)
//! and points the check at it with `UFVMM_LIBCLANG_ROOT`.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

/// Runs the check against `root`; true if it says libclang is there.
fn check(root: &Path) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps");
    let out = Command::new("sh")
        .arg(script)
        .arg("--check")
        .env("UFVMM_LIBCLANG_ROOT", root)
        .env_remove("LIBCLANG_PATH")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run scripts/install-deps");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match out.status.code() {
        Some(0) => (true, text),
        Some(1) => (false, text),
        other => panic!("install-deps --check exited {other:?}: {text}"),
    }
}

/// Creates `rel` (and its directories) under `root` as an empty file.
fn touch(root: &Path, rel: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, b"").expect("write");
}

#[test]
fn a_new_machine_with_only_libclang_cpp_has_no_libclang() {
    let root = tempfile::tempdir().expect("tempdir");
    // What package libclang-cpp14 puts on a new machine, and the LLVM library beside it.
    touch(root.path(), "usr/lib/llvm-14/lib/libclang-cpp.so.14");
    touch(root.path(), "usr/lib/x86_64-linux-gnu/libclang-cpp.so.14");
    touch(root.path(), "usr/lib/llvm-14/lib/libLLVM-14.so.1");
    let (found, text) = check(root.path());
    assert!(!found, "libclang-cpp must not count: {text}");
    assert!(text.contains("not found"), "{text}");
}

#[test]
fn the_libraries_libclang_dev_installs_are_found() {
    // libclang1-14 ships libclang-14.so.1 (versioned), libclang-14-dev the libclang.so link.
    for rel in [
        "usr/lib/x86_64-linux-gnu/libclang-14.so.1",
        "usr/lib/llvm-14/lib/libclang.so.1",
        "usr/lib/llvm-14/lib/libclang.so",
        "usr/local/lib/libclang-17.so",
        "usr/local/llvm18/lib/libclang.so.18",
    ] {
        let root = tempfile::tempdir().expect("tempdir");
        touch(root.path(), "usr/lib/llvm-14/lib/libclang-cpp.so.14");
        touch(root.path(), rel);
        let (found, text) = check(root.path());
        assert!(found, "{rel} should be found: {text}");
        assert!(
            text.contains(rel),
            "{rel}: the check names another file: {text}"
        );
    }
}

#[test]
fn a_dangling_libclang_link_does_not_count() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("usr/lib/llvm-14/lib");
    std::fs::create_dir_all(&dir).expect("mkdir");
    symlink(
        "../../x86_64-linux-gnu/libclang-14.so.1",
        dir.join("libclang.so"),
    )
    .expect("link");
    let (found, text) = check(root.path());
    assert!(!found, "a link to a missing file must not count: {text}");
}

#[test]
fn a_bad_argument_is_refused() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps");
    let out = Command::new("sh")
        .arg(script)
        .arg("--bogus")
        .output()
        .expect("run scripts/install-deps");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}

/// On this machine's real files: where libclang-dev is installed, the check finds it;
/// in `scripts/simulate-new-machine` (which hides what a new machine lacks) it does not.
#[test]
fn the_check_tells_this_machine_from_a_simulated_new_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED the_check_tells_this_machine_from_a_simulated_new_one: needs root");
        return;
    }
    let here = Command::new("sh")
        .arg(root.join("scripts/install-deps"))
        .arg("--check")
        .output()
        .expect("run the check");
    // The build of this very test loaded libclang, so it is here.
    assert_eq!(
        here.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&here.stdout)
    );
    let sim = Command::new(root.join("scripts/simulate-new-machine"))
        .args(["sh", "scripts/install-deps", "--check"])
        .current_dir(root)
        .env_remove("LIBCLANG_PATH")
        .output()
        .expect("run the simulation");
    let out = String::from_utf8_lossy(&sim.stdout);
    let err = String::from_utf8_lossy(&sim.stderr);
    assert_eq!(sim.status.code(), Some(1), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("not found"), "{out}");
}

/// Runs the check against `root` with `LIBCLANG_PATH` set to `value`.
fn check_with_libclang_path(root: &Path, value: &str) -> bool {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps");
    let out = Command::new("sh")
        .arg(script)
        .arg("--check")
        .env("UFVMM_LIBCLANG_ROOT", root)
        .env("LIBCLANG_PATH", value)
        .output()
        .expect("run scripts/install-deps");
    out.status.code() == Some(0)
}

#[test]
fn libclang_path_is_the_only_place_looked_at_when_set() {
    let root = tempfile::tempdir().expect("tempdir");
    touch(root.path(), "usr/lib/llvm-14/lib/libclang.so.1");
    touch(root.path(), "opt/clang/libclang-17.so.1");
    touch(root.path(), "opt/empty/libclang-cpp.so.17");
    let r = root.path();
    // The library file itself, or its directory, as clang-sys takes either.
    let file = r.join("opt/clang/libclang-17.so.1");
    assert!(check_with_libclang_path(r, file.to_str().expect("utf-8")));
    let dir = r.join("opt/clang");
    assert!(check_with_libclang_path(r, dir.to_str().expect("utf-8")));
    // Set, clang-sys looks nowhere else: not in the usual directories either.
    let empty = r.join("opt/empty");
    assert!(!check_with_libclang_path(r, empty.to_str().expect("utf-8")));
    let cpp = r.join("opt/empty/libclang-cpp.so.17");
    assert!(!check_with_libclang_path(r, cpp.to_str().expect("utf-8")));
    assert!(!check_with_libclang_path(r, ""));
}
