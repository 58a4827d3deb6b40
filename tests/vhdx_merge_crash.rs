//! Crash test of merges on VHDX trees (ARCHITECTURE.md, "The merge
//! invariant"), the VHDX counterpart of `vhd_merge_crash.rs`: the harness
//! (trees, kills, checks, summary) is `common/diff_merge_crash.rs`; this
//! crate says how a VHDX tree is built and where a VHDX keeps its id.
//!
//! `leaf.vhdx` is a dynamic VHDX made by `qemu-img create -f vhdx`; the
//! snaptree-made children are differencing VHDXs (a clone's image is
//! `side.avhdx`), whose identity is the data write GUID of the current
//! header, which their children name as their `parent_linkage`. A stream
//! merge re-points the child's parent locator.
//!
//! `SNAPTREE_VHDX_CRASH_RUNS` (default 12) sets the number of runs;
//! `SNAPTREE_VHD_CRASH_STRICT_IDS=1` makes the known window fatal (the
//! same knob as the VHD test's);
//! `SNAPTREE_TEST_SEED` replays a seed (printed at the start);
//! `SNAPTREE_KEEP_TEST_DIRS=1` keeps each run's directory.

#[path = "vhdx/spec.rs"]
mod spec;
#[path = "mount/support/mod.rs"]
mod support;

#[path = "common/diff_merge_crash.rs"]
mod harness;

use std::fs::File;
use std::os::unix::fs::FileExt;
use support::Workspace;

static FORMAT: harness::Format = harness::Format {
    ext: "vhdx",
    name: "VHDX",
    id_name: "data write GUID",
    file,
    create_leaf: |ws, name, size| ws.create_vhdx(name, size),
    qemu_format: "vhdx",
    images: |ws| ws.vhdx_images(),
    id_copies: header_guids,
    current_id: |ws, image| {
        let g = spec::Vhdx::load(&ws.img(image)).data_write_guid();
        g.iter().map(|b| format!("{b:02x}")).collect()
    },
    runs_env: "SNAPTREE_VHDX_CRASH_RUNS",
    default_runs: 12,
    strict_ids_env: "SNAPTREE_VHD_CRASH_STRICT_IDS",
};

/// A clone's image is an `.avhdx` (the VHDX driver's extension for the
/// images snaptree makes); snapshots keep the leaf's `.vhdx`.
fn file(point: &str) -> String {
    if point == "side" {
        "side.avhdx".into()
    } else {
        format!("{point}.vhdx")
    }
}

/// The data write GUIDs (hex) of both header slots of `images/<image>`
/// that carry a header signature (a kill between two header writes may
/// leave them apart).
fn header_guids(ws: &Workspace, image: &str) -> Vec<String> {
    let f = File::open(ws.img(image)).expect("open image");
    [64 * 1024u64, 128 * 1024]
        .iter()
        .filter_map(|at| {
            let mut h = [0u8; 4096];
            f.read_exact_at(&mut h, *at).ok()?;
            (&h[0..4] == b"head").then(|| h[32..48].iter().map(|b| format!("{b:02x}")).collect())
        })
        .collect()
}

#[test]
fn sigkill_during_vhdx_merges_keeps_every_visible_point() {
    harness::sigkill_during_merges_keeps_every_visible_point();
}
