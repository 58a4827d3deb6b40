//! Shared helpers for snaptree's integration tests.
//!
//! ARCHITECTURE.md ("Testing"): `qemu-img` and `qemu-io`
//! build the images a test reads, and their answers are the expected results.
//! This module holds what every such test needs, so that the tests
//! themselves say only what they build and what they expect:
//!
//! - [`skip`]: **skipping honestly.** [`require_qemu`] (and
//!   [`require_tools`], [`require_qemu_zstd`]) check that the peers exist; if
//!   not they print `SKIP: <test>: <why>` where the harness does not capture
//!   it, and the test returns early. A test never passes silently without
//!   having run. [`require_qemu!`] is the one-line form.
//! - [`run`]: **running commands** with a deadline and a failure message
//!   that shows the full command line, the exit status, stdout and stderr.
//! - [`chain`] and [`qio`]: **building chains** with `qemu-img create` /
//!   `qemu-io` in a temp directory, recording every command so a failure
//!   message doubles as a reproduction script.
//! - [`bytes`]: **comparing bytes** range by range, reading only the data
//!   ranges of sparse files.
//! - [`map`]: **comparing maps** (`snaptree map` against `qemu-img map`)
//!   over the union of their boundaries, so the two tools may split entries
//!   differently.
//! - [`unwritten`]: **deterministic host files**: filling the
//!   `fallocate`d-but-unwritten extents qemu leaves behind, which ext4
//!   reports as holes or data depending on the page cache.
//! - [`check`]: **the whole differential check** of one image against qemu
//!   ([`assert_matches_qemu`] / [`assert_layers_match_qemu`]).
//!
//! Everything is re-exported here, so `use common::*;` is all a test needs.
//!
//! Every snaptree invocation runs with `/` as its working directory and an
//! absolute image path: a backing file must be found relative to the image
//! that names it, never relative to the caller's cwd.
//!
//! Set `SNAPTREE_KEEP_TEST_DIRS=1` to keep each chain's temp directory (its
//! path is printed) for a post-mortem with qemu-img; the qemu and snaptree
//! outputs of [`assert_matches_qemu`] are left in it under `check-*` names.
//!
//! Declare it with `#[macro_use] mod common;` so that the macros below are
//! in scope in the whole test crate. Each test binary uses only part of
//! this module, hence `dead_code` and `unused_macros` are allowed here.
#![allow(dead_code, unused_macros)]

/// `[OsString; N]` from string- and path-like expressions, for argument
/// lists that mix `&str`, `String` and paths:
/// `args!["map", image_path, "--output", "json"]`.
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        [$(::std::ffi::OsString::from(
            ::std::convert::AsRef::<::std::ffi::OsStr>::as_ref(&$a),
        )),*]
    };
}

/// Returns from the calling test, after a `SKIP:` line, unless `qemu-img`
/// and `qemu-io` run (see [`require_qemu`]).
macro_rules! require_qemu {
    () => {
        if !$crate::common::require_qemu() {
            return;
        }
    };
}

pub mod bytes;
pub mod chain;
pub mod check;
pub mod map;
pub mod qio;
pub mod run;
pub mod skip;
pub mod unwritten;

// Each test crate uses only some of these.
#[allow(unused_imports)]
pub use self::{bytes::*, chain::*, check::*, map::*, run::*, skip::*, unwritten::*};

/// 1 KiB.
pub const KIB: u64 = 1024;
/// 1 MiB.
pub const MIB: u64 = 1024 * 1024;
