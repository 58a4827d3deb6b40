//! Helpers for the FUSE mount tests in `tests/mount/`.
//!
//! ARCHITECTURE.md ("Testing"): FUSE tests mount for real, and `qemu-img` /
//! `qemu-io` are the oracle. This module keeps the tests themselves about
//! behaviour:
//!
//! - **Skipping honestly.** [`prerequisites_or_skip`] checks for
//!   `/dev/fuse`, `qemu-img`, `qemu-io` and `umount`; [`Workspace::mount`]
//!   returns `None` when the kernel refuses the FUSE mount itself. Either
//!   way `SKIP: <test>: <why>` goes to stderr and the test returns early; a
//!   test never passes without having run.
//! - **Bounded commands.** [`run`] / [`run_unchecked`] run a [`Command`]
//!   with a timeout and describe it (command line, status, stdout, stderr)
//!   when it fails.
//! - **Images.** [`Workspace`] is a temp directory with `images/` (the tree
//!   snaptree mounts), `mnt/` (the mount point) and scratch space for
//!   expected data and daemon logs, kept outside `images/` so they never
//!   become part of the tree. It wraps `qemu-img create/convert/check/
//!   compare` and `qemu-io`.
//! - **Mounts that always go away.** [`Mount`] is a guard. A foreground
//!   mount (`snaptree mount -f`) is spawned as a child, so its pid is known;
//!   a background mount's daemon is found with `pgrep -f` on the (unique)
//!   mount point. Dropping the guard, including while a test panics, runs
//!   `umount` (falling back to `umount -l`), then waits a bounded time for
//!   the daemon to exit and SIGKILLs it otherwise. When the test is
//!   panicking the daemon's log is printed too.
//! - **Mounted layout.** [`ctl`], [`read_text`], [`info`], [`visible`],
//!   [`read_disk`] (drops the page cache first, so the bytes come from the
//!   daemon), [`data_ranges`] (`SEEK_DATA`/`SEEK_HOLE`) and byte
//!   comparison that reports every differing range ([`assert_bytes_eq`]).
//!
//! Set `SNAPTREE_KEEP_TEST_DIRS=1` to keep each workspace for a
//! post-mortem (its path is printed).
#![allow(dead_code)]

mod bytes;
mod command;
mod guard;
mod layout;
mod workspace;

pub use bytes::*;
pub use command::*;
pub use guard::*;
pub use layout::*;
pub use workspace::*;

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// How long a mount may take to become ready (MNT/tree appears).
pub const MOUNT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a daemon may take to exit after its file system is unmounted.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// How long one external command may run before the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The snaptree binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_snaptree")
}

// ---------------------------------------------------------------------------
// Skipping
// ---------------------------------------------------------------------------

/// Name of the running test (libtest names each test's thread after it).
pub fn test_name() -> String {
    thread::current().name().unwrap_or("<test>").to_string()
}

/// Says on stderr that the running test is skipped, and why.
pub fn skip(why: &str) {
    eprintln!("SKIP: {}: {why}", test_name());
}

/// What the mount tests need from the machine, or why they cannot run.
pub fn prerequisites() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing (no FUSE in this kernel or container)".into());
    }
    for (tool, arg) in [
        ("qemu-img", "--version"),
        ("qemu-io", "--version"),
        ("umount", "--version"),
        ("pgrep", "--version"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("{tool} not found (qemu-utils, util-linux, procps)"));
        }
    }
    Ok(())
}

/// `true` when the test can run; otherwise prints `SKIP` and returns
/// `false`, and the test returns.
pub fn prerequisites_or_skip() -> bool {
    match prerequisites() {
        Ok(()) => true,
        Err(why) => {
            skip(&why);
            false
        }
    }
}

/// Whether a failed mount's log says the kernel refused FUSE itself
/// (rather than snaptree failing): then the test is skipped, not failed.
fn fuse_unavailable(log: &str) -> bool {
    log.contains("cannot mount")
        && [
            "No such device",
            "Operation not permitted",
            "Permission denied",
            "fusermount",
            "/dev/fuse",
        ]
        .iter()
        .any(|s| log.contains(s))
}
