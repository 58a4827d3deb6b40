//! Crash test of merges on VHD trees (ARCHITECTURE.md, "The merge
//! invariant"), the VHD counterpart of `merge_crash.rs`: the harness
//! (trees, kills, checks, summary) is `common/diff_merge_crash.rs`; this
//! crate says how a VHD tree is built and where a VHD keeps its id.
//!
//! `leaf.vhd` is a dynamic VHD made by `qemu-img create -f vpc`; the
//! snaptree-made children are differencing VHDs, whose identity is the
//! footer's unique id (written twice: the footer copy at the start and the
//! footer at the end). A commit into mid re-points the child's header and
//! parent locators.
//!
//! `SNAPTREE_VHD_CRASH_RUNS` (default 20) sets the number of runs;
//! `SNAPTREE_VHD_CRASH_STRICT_IDS=1` makes the known window fatal;
//! `SNAPTREE_TEST_SEED` replays a seed (printed at the start);
//! `SNAPTREE_KEEP_TEST_DIRS=1` keeps each run's directory.

#[path = "mount/support/mod.rs"]
mod support;

#[path = "common/diff_merge_crash.rs"]
mod harness;

use std::fs::File;
use std::os::unix::fs::FileExt;
use support::Workspace;

static FORMAT: harness::Format = harness::Format {
    ext: "vhd",
    name: "VHD",
    id_name: "unique id",
    file: |point| format!("{point}.vhd"),
    create_leaf: |ws, name, size| ws.create_vpc(name, size),
    qemu_format: "vpc",
    images: |ws| ws.vhd_images(),
    id_copies: |ws, image| footer_ids(ws, image).to_vec(),
    current_id: |ws, image| footer_ids(ws, image)[1].clone(),
    runs_env: "SNAPTREE_VHD_CRASH_RUNS",
    default_runs: 20,
    strict_ids_env: "SNAPTREE_VHD_CRASH_STRICT_IDS",
};

/// The unique ids (hex) of the footer copy at the start of
/// `images/<image>` and of the footer at its end (the one that counts).
fn footer_ids(ws: &Workspace, image: &str) -> [String; 2] {
    let f = File::open(ws.img(image)).expect("open image");
    let len = f.metadata().expect("stat image").len();
    [0, len - 512].map(|at| {
        let mut footer = [0u8; 512];
        f.read_exact_at(&mut footer, at).expect("read footer");
        footer[68..84].iter().map(|b| format!("{b:02x}")).collect()
    })
}

#[test]
fn sigkill_during_vhd_merges_keeps_every_visible_point() {
    harness::sigkill_during_merges_keeps_every_visible_point();
}
