//! Skipping a test honestly when the peers it needs are missing.
//!
//! A test that cannot run must say so, not pass silently: these checks print
//! `SKIP: <test>: <why>` to the real stderr (never captured by the harness,
//! so visible for passing tests too) and return `false`; the caller then
//! returns (the `require_qemu!` macro does both in one line).

use std::fmt;
use std::io::Write as _;
use std::process::Command;
use std::sync::OnceLock;
use std::thread;

use tempfile::TempDir;

use super::run::run_unchecked;

/// Name of the running test (libtest names each test's thread after it).
pub fn test_name() -> String {
    thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

/// Writes a line to the process's real stderr. Unlike `eprintln!`, this is
/// not captured by the test harness, so it is visible even for passing tests.
pub fn note(line: impl fmt::Display) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Prints `SKIP: <test>: <reason>` to stderr (uncaptured, see [`note`]).
/// Call it, then return from the test: a test that cannot run must say so,
/// not pass silently.
pub fn skip(reason: impl fmt::Display) {
    note(format_args!("SKIP: {}: {reason}", test_name()));
}

/// Checks that every tool answers `TOOL --version`. If one does not, prints
/// `SKIP: <test>: <why>` and returns `false`; the caller should return.
pub fn require_tools(tools: &[&str]) -> bool {
    for tool in tools {
        match Command::new(tool).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                skip(format!(
                    "`{tool} --version` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                return false;
            }
            Err(e) => {
                skip(format!(
                    "`{tool}` is not usable ({e}); install it (Debian: qemu-utils) to run this test"
                ));
                return false;
            }
        }
    }
    true
}

/// Checks that `qemu-img` and `qemu-io` are installed and runnable (see
/// [`require_tools`]). Returns `false` after printing a `SKIP:` line if not.
pub fn require_qemu() -> bool {
    require_tools(&["qemu-img", "qemu-io"])
}

/// Checks that this qemu-img can create zstd-compressed qcow2 images (QEMU
/// may be built without zstd). Returns `false` after printing a `SKIP:` line
/// if not. Call [`require_qemu`] first.
pub fn require_qemu_zstd() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        let dir = TempDir::with_prefix("snaptree-zstd-probe-").map_err(|e| e.to_string())?;
        let out = run_unchecked(Command::new("qemu-img").current_dir(dir.path()).args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "probe.qcow2",
            "1M",
        ]));
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    });
    match probe {
        Ok(()) => true,
        Err(why) => {
            skip(format!(
                "qemu-img cannot create zstd-compressed qcow2: {why}"
            ));
            false
        }
    }
}
