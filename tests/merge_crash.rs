//! Crash test of the merge engine (ARCHITECTURE.md, "The merge invariant"):
//! SIGKILL the process doing a merge at a random moment, then check that
//! nothing visible changed and that the merge completes afterwards.
//!
//! Each run builds a small random tree with `qemu-img`/`qemu-io`:
//!
//! ```text
//! [base] <- mid (hidden) <- [snap <-] leaf      (+ sometimes a side leaf)
//! ```
//!
//! `base` is sometimes raw, sometimes absent (the hidden node is the root);
//! `snap` makes the hidden node's child a non-leaf. The data is sized so
//! that both merge directions happen: a hidden node bigger than its child
//! is merged by committing the child into it (then `rename`), a smaller
//! one by streaming it into the child (then a header rewrite).
//!
//! The points get memory checkpoints through a mount's `ctl` (the mount
//! that is killed, in the mount variant; see [`give_memory`]): page-delta
//! checkpoints, parents first, each backing onto its parent's delta, so
//! that in some runs `mid`'s child backs onto `mid`'s delta (the merge
//! first copies mid's pages into it and re-points it) and in others not
//! (no memory on mid, a raw dump on mid, no checkpoint on the child, or
//! mid's checkpoint taken again after the child's, so the child backs
//! onto mid's first delta, which must stay).
//!
//! The flattened disk of every visible point is recorded (`qemu-img
//! convert -O raw`, kept as files outside the tree), and so is its
//! `memory.raw`. Then either
//! - **mount**: `snaptree mount -f -o gc_idle=off`, `delete` on `mid/ctl`,
//!   `1` to `merge-now` from a thread, SIGKILL after a random delay; or
//! - **offline**: `snaptree merge SRC mid` as a child, SIGKILL after a
//!   random delay, then `snaptree merge SRC` to completion.
//!
//! The delays are spread over [0, 1.2 × the merge's duration], measured
//! on the first run of each variant and direction (not killed before it
//! ends).
//! After the kill: `qemu-img check` of every image and memory delta,
//! every visible point's image and delta flatten to the recorded bytes, a
//! remount shows the same points with the same bytes (`disk.raw` and
//! `memory.raw`), the interrupted merge completes (redone in the
//! background after the mount), `mid`'s image is gone, every chain is as
//! short as the visible tree, `.snaptree-memory` holds exactly the
//! visible points' deltas and what they back onto, and once unmounted
//! `qemu-img check` and the flattened bytes agree again.
//!
//! `qemu-img check`: errors and corruption fail a run. Leaked clusters
//! (exit 3), which the qcow2 writer's ordering allows right after a kill
//! in the middle of its metadata flush, are tolerated (and counted in the
//! summary) only right after the kill: recovery must free them, so once
//! the merge has completed the check must be clean; with
//! `SNAPTREE_CRASH_STRICT_LEAKS=1` leaks right after the kill fail too.
//! A daemon that
//! hangs is SIGKILLed by a watchdog after printing its threads' stacks.
//!
//! `SNAPTREE_CRASH_RUNS` (default 50) sets the number of runs;
//! `SNAPTREE_TEST_SEED` replays a seed (printed at the start);
//! `SNAPTREE_KEEP_TEST_DIRS=1` keeps each run's directory.
//! `scripts/merge_crash_soak.sh` runs many more in release mode.

#[path = "mount/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use support::*;

/// Virtual size of every disk.
const VSIZE: u64 = 64 * MIB;
/// Bytes per pattern file (`qemu-io write -s`); also the longest write.
const PATTERN_BYTES: u64 = MIB;
/// How long the interrupted merge may take to complete after remount.
const MERGE_DEADLINE: Duration = Duration::from_secs(30);
const JOURNAL: &str = ".snaptree-merge.json";
const MANIFEST: &str = ".snaptree.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Mount,
    Offline,
}

/// Where the kill landed, judged from the files it left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Moment {
    /// No journal and `mid` untouched: the merge had not started.
    Before,
    /// A journal, commit point not reached: the merge is redone.
    MidMerge,
    /// A journal, commit point passed: the next open finishes it.
    AfterCommit,
    /// No journal and `mid` gone: the merge had finished.
    After,
    /// Calibration run: the merge ran to its end before the kill (mount)
    /// or was not killed at all (offline).
    Uninterrupted,
}

/// One image of the tree.
struct Img {
    /// PointDisk name (the file stem).
    name: &'static str,
    file: String,
    parent: Option<usize>,
    raw: bool,
}

/// A random tree: images in creation order (parents first).
struct Spec {
    imgs: Vec<Img>,
    desc: String,
    /// The direction the sizes aim at (the engine picks by allocated bytes).
    intended: &'static str,
}

impl Spec {
    fn index(&self, name: &str) -> usize {
        self.imgs
            .iter()
            .position(|i| i.name == name)
            .unwrap_or_else(|| panic!("no image {name}"))
    }

    /// The one child of `mid`.
    fn mid_child(&self) -> usize {
        self.imgs
            .iter()
            .position(|i| i.parent.is_some_and(|p| self.imgs[p].name == "mid"))
            .expect("mid has a child")
    }

    fn visible(&self) -> Vec<&Img> {
        self.imgs.iter().filter(|i| i.name != "mid").collect()
    }

    /// Visible ancestors of image `i`.
    fn visible_ancestors(&self, i: usize) -> usize {
        let mut n = 0;
        let mut cur = self.imgs[i].parent;
        while let Some(p) = cur {
            if self.imgs[p].name != "mid" {
                n += 1;
            }
            cur = self.imgs[p].parent;
        }
        n
    }
}

/// What the run did, for the summary.
struct Outcome {
    variant: Variant,
    moment: Moment,
    direction: String,
    /// Bytes of leaked clusters right after the kill (disks and memory
    /// deltas).
    leaked: u64,
    /// What memory `mid` and its child had, and where the kill left the
    /// child's delta (see [`memory_moment`]).
    memory: (&'static str, &'static str),
}

/// Duration of an uninterrupted merge (from the write to `merge-now` or
/// the start of `snaptree merge` to its end), per variant and intended
/// direction: measured on the first run of each.
type Calibration = BTreeMap<(Variant, &'static str), Duration>;

fn runs() -> u64 {
    std::env::var("SNAPTREE_CRASH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50)
}

#[test]
fn sigkill_during_merges_keeps_every_visible_point() {
    if !prerequisites_or_skip() {
        return;
    }
    let seed = seed();
    let n = runs();
    let started = Instant::now();
    let mut cal = Calibration::new();
    let mut outcomes = Vec::new();
    for i in 0..n {
        let run_seed = seed ^ (i.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        match one_run(i, run_seed, &mut cal) {
            Some(o) => outcomes.push(o),
            None => return, // skipped (FUSE refused); already said why
        }
    }
    summarize(&outcomes, started.elapsed(), seed);
}

fn summarize(outcomes: &[Outcome], took: Duration, seed: u64) {
    let mut by: BTreeMap<(Variant, &str, Moment), usize> = BTreeMap::new();
    for o in outcomes {
        *by.entry((o.variant, o.direction.as_str(), o.moment))
            .or_default() += 1;
    }
    eprintln!(
        "merge_crash: {} runs in {:.1} s (seed {seed})",
        outcomes.len(),
        took.as_secs_f64()
    );
    for ((v, d, m), c) in &by {
        eprintln!("  {v:?} {d}: killed {m:?}: {c}");
    }
    let mut by_memory: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for o in outcomes {
        *by_memory.entry(o.memory).or_default() += 1;
    }
    for ((case, m), c) in &by_memory {
        eprintln!("  memory: {case}; child's delta after the kill: {m}: {c}");
    }
    let leaky: Vec<&Outcome> = outcomes.iter().filter(|o| o.leaked > 0).collect();
    if !leaky.is_empty() {
        eprintln!(
            "  runs whose kill left leaked clusters (qemu-img check exit 3): {} ({})",
            leaky.len(),
            leaky
                .iter()
                .map(|o| format!(
                    "{:?} {} {:?}: {} KiB",
                    o.variant,
                    o.direction,
                    o.moment,
                    o.leaked >> 10
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

// ---------------------------------------------------------------------------
// Building a random tree
// ---------------------------------------------------------------------------

fn random_spec(rng: &mut SmallRng) -> Spec {
    let mid_root = rng.gen_bool(0.2);
    let raw_base = !mid_root && rng.gen_bool(0.25);
    let snap = rng.gen_bool(0.4);
    let side = rng.gen_bool(0.3);
    let mut imgs = Vec::new();
    let mut push = |name: &'static str, parent: Option<usize>, raw: bool| {
        let file = format!("{name}.{}", if raw { "raw" } else { "qcow2" });
        imgs.push(Img {
            name,
            file,
            parent,
            raw,
        });
        imgs.len() - 1
    };
    let base = (!mid_root).then(|| push("base", None, raw_base));
    let mid = push("mid", base, false);
    let snap_i = snap.then(|| push("snap", Some(mid), false));
    push("leaf", Some(snap_i.unwrap_or(mid)), false);
    if side {
        if let Some(p) = base.or(snap_i) {
            push("side", Some(p), false);
        }
    }
    let intended = if rng.gen_bool(0.5) {
        "commit"
    } else {
        "stream"
    };
    let mut desc = String::new();
    for i in &imgs {
        let parent = i.parent.map_or("-", |p| imgs[p].name);
        desc.push_str(&format!("{}<-{} ", parent, i.file));
    }
    Spec {
        imgs,
        desc: desc.trim_end().to_string(),
        intended,
    }
}

/// `qemu-io` commands that cover about `target` bytes of the disk (in
/// 64 KiB granules), with patterns from the pattern files, byte patterns,
/// zero writes and (qcow2) compressed clusters.
fn writes(
    rng: &mut SmallRng,
    target: u64,
    raw: bool,
    cluster: u64,
    pats: &[String],
) -> Vec<String> {
    const G: u64 = 64 << 10;
    let mut covered = vec![false; (VSIZE / G) as usize];
    let mut count = 0u64;
    let mut cmds = Vec::new();
    // Compressed clusters first: qemu cannot write one over an allocated
    // cluster.
    let mut compressed = BTreeSet::new();
    for _ in 0..if raw { 0 } else { rng.gen_range(0..=6) } {
        let off = rng.gen_range(0..VSIZE / cluster) * cluster;
        if compressed.insert(off) {
            cmds.push(format!(
                "write -c -P {} {off} {cluster}",
                rng.gen_range(1..=255)
            ));
        }
    }
    while count * G < target {
        let len = rng.gen_range(1..=PATTERN_BYTES / 4096) * 4096;
        let off = rng.gen_range(0..=(VSIZE - len) / 4096) * 4096;
        cmds.push(match rng.gen_range(0..100) {
            0..=59 => format!(
                "write -s {} {off} {len}",
                pats[rng.gen_range(0..pats.len())]
            ),
            60..=89 => format!("write -P {} {off} {len}", rng.gen_range(1..=255)),
            _ => format!("write -z {off} {len}"),
        });
        for g in off / G..(off + len).div_ceil(G) {
            if !covered[g as usize] {
                covered[g as usize] = true;
                count += 1;
            }
        }
    }
    cmds
}

/// Creates the images of `spec` in `ws`, with data.
fn build(ws: &Workspace, spec: &Spec, rng: &mut SmallRng) {
    let pats: Vec<String> = (0..4)
        .map(|k| {
            let p = ws.scratch(&format!("pattern-{k}.bin"));
            std::fs::write(&p, pattern(rng.gen(), PATTERN_BYTES as usize)).expect("pattern file");
            p.to_string_lossy().into_owned()
        })
        .collect();
    let (small, big) = {
        let small = rng.gen_range(12..=28) * MIB;
        (small, (small + rng.gen_range(8..=20) * MIB).min(58 * MIB))
    };
    let mid_child = spec.mid_child();
    for (k, img) in spec.imgs.iter().enumerate() {
        let cluster = [16 << 10, 64 << 10, 64 << 10, 64 << 10, 128 << 10][rng.gen_range(0..5)];
        let target = match img.name {
            "base" => rng.gen_range(8..=32) * MIB,
            "mid" if spec.intended == "commit" => big,
            "mid" => small,
            _ if k == mid_child && spec.intended == "commit" => small,
            _ if k == mid_child => big,
            _ => rng.gen_range(1..=6) * MIB,
        };
        if img.raw {
            ws.create_raw(&img.file, VSIZE);
        } else {
            let backing = img.parent.map(|p| {
                let p = &spec.imgs[p];
                (p.file.as_str(), if p.raw { "raw" } else { "qcow2" })
            });
            ws.create_qcow2(
                &img.file,
                VSIZE,
                backing,
                &format!("cluster_size={cluster}"),
            );
        }
        let cmds = writes(rng, target, img.raw, cluster, &pats);
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        for chunk in cmds.chunks(200) {
            ws.qemu_io(&img.file, if img.raw { "raw" } else { "qcow2" }, chunk);
        }
    }
    for p in &pats {
        let _ = std::fs::remove_file(p);
    }
}

// ---------------------------------------------------------------------------
// Memory checkpoints
// ---------------------------------------------------------------------------

/// Where the tree keeps page-delta checkpoints.
const MEMORY_DIR: &str = ".snaptree-memory";
/// One guest page: the cluster size of a delta.
const PAGE: usize = 4096;

/// The memory checkpoints the points got before the kill (through a
/// mount's `ctl`), and what the merge of `mid` must make of them.
#[derive(Default)]
struct Memory {
    /// Points with a memory (their `memory.raw` is recorded).
    has: BTreeSet<&'static str>,
    /// PointDisk -> its page-delta checkpoint's file in `MEMORY_DIR`.
    delta: BTreeMap<&'static str, String>,
    /// Delta file -> the delta it backs onto.
    backing: BTreeMap<String, Option<String>>,
    /// What was done, for the tag.
    desc: String,
    /// The length of the file of `mid`'s child's delta before the kill.
    child_len: Option<u64>,
}

impl Memory {
    /// The kind of run this is for the merge of `mid` (for the summary).
    fn case(&self, spec: &Spec) -> &'static str {
        let child = spec.imgs[spec.mid_child()].name;
        match (self.delta.get("mid"), self.delta.get(child)) {
            (Some(m), Some(c)) if self.backing[c].as_ref() == Some(m) => "child's delta on mid's",
            (Some(_), _) => "mid's delta, child not on it",
            (None, _) if self.has.contains("mid") => "mid's raw dump",
            (None, _) => "no memory on mid",
        }
    }

    /// The files `MEMORY_DIR` holds once `mid` is merged away: the deltas
    /// of the visible points and what they back onto, the child's
    /// re-pointed to mid's backing first if it backed onto mid's delta.
    fn files_after_merge(&self, spec: &Spec) -> BTreeSet<String> {
        let mut backing = self.backing.clone();
        let child = spec.imgs[spec.mid_child()].name;
        if let (Some(m), Some(c)) = (self.delta.get("mid"), self.delta.get(child)) {
            if backing[c].as_ref() == Some(m) {
                backing.insert(c.clone(), backing[m].clone());
            }
        }
        let mut files = BTreeSet::new();
        for (_, d) in self.delta.iter().filter(|(p, _)| **p != "mid") {
            let mut cur = Some(d.clone());
            while let Some(f) = cur {
                cur = backing.get(&f).cloned().flatten();
                files.insert(f);
            }
        }
        files
    }
}

fn memory_reference(ws: &Workspace, name: &str) -> PathBuf {
    ws.scratch(&format!("ref-{name}.memory.raw"))
}

/// Fresh RAM of `pages` pages: random, some pages zero.
fn fresh_ram(rng: &mut SmallRng, pages: usize) -> Vec<u8> {
    let mut ram = pattern(rng.gen(), pages * PAGE);
    for p in 0..pages {
        if rng.gen_bool(0.15) {
            ram[p * PAGE..(p + 1) * PAGE].fill(0);
        }
    }
    ram
}

/// The guest a little later than `parent`: 1-5 % of the pages rewritten
/// or zeroed, so that most of the parent's pages are not in the delta
/// (and a merge has them to copy).
fn derived_ram(rng: &mut SmallRng, parent: &[u8]) -> Vec<u8> {
    let mut ram = parent.to_vec();
    let pages = ram.len() / PAGE;
    for _ in 0..(pages * rng.gen_range(1..=5) / 100).max(1) {
        let p = rng.gen_range(0..pages);
        let page = &mut ram[p * PAGE..(p + 1) * PAGE];
        match rng.gen_range(0..3) {
            0 => page.copy_from_slice(&pattern(rng.gen(), PAGE)),
            1 => page[rng.gen_range(0..PAGE)] ^= rng.gen_range(1..=255u8),
            _ => page.fill(0),
        }
    }
    ram
}

/// Gives the points memory through the mount: page-delta checkpoints
/// (`ctl checkpoint`, parents first, each RAM derived from the parent's
/// so it backs onto the parent's delta), sometimes a raw dump on `mid`
/// (`ctl memory`), sometimes `mid`'s checkpoint taken again after its
/// child's (the child then backs onto mid's first delta, which a merge
/// must keep); then records every point's `memory.raw`.
fn give_memory(ws: &Workspace, spec: &Spec, rng: &mut SmallRng, tag: &str) -> Memory {
    let mnt = ws.mnt.clone();
    let pages = rng.gen_range(256..=2048usize);
    let child = spec.imgs[spec.mid_child()].name;
    let mut mem = Memory::default();
    let mut ram: BTreeMap<&'static str, Vec<u8>> = BTreeMap::new();
    let mut dumps = 0;
    let mut dump = |r: &[u8]| {
        dumps += 1;
        // Inside the tree: the mount shows no memory from outside it.
        let p = ws.img(&format!("ram-{dumps}.vmem"));
        std::fs::write(&p, r).expect("write dump");
        p.to_string_lossy().into_owned()
    };
    let mut steps = Vec::new();
    let checkpoint =
        |mem: &mut Memory, name: &'static str, parent: Option<&'static str>, src: &str| {
            ctl_ok(&mnt, name, &format!("checkpoint {src}"));
            let i = info(&mnt, name);
            let file = i["memory"]["source"]
                .as_str()
                .and_then(|s| s.strip_prefix(&format!("{MEMORY_DIR}/")))
                .unwrap_or_else(|| panic!("{tag}: {name}/info.json after checkpoint: {i}"))
                .to_string();
            let base = parent.and_then(|p| mem.delta.get(p).cloned());
            assert_eq!(
                i["memory"]["delta_parent"].as_str(),
                base.as_deref(),
                "{tag}: {name}'s delta backs onto its parent's: {i}"
            );
            mem.backing.insert(file.clone(), base);
            mem.delta.insert(name, file);
            mem.has.insert(name);
        };
    for img in &spec.imgs {
        let p = if img.name == "mid" || img.name == child {
            0.8
        } else {
            0.5
        };
        if !rng.gen_bool(p) {
            continue;
        }
        let parent = img.parent.map(|i| spec.imgs[i].name);
        let r = match parent.and_then(|p| ram.get(p)) {
            Some(r) => derived_ram(rng, r),
            None => fresh_ram(rng, pages),
        };
        let src = dump(&r);
        if img.name == "mid" && rng.gen_bool(0.15) {
            ctl_ok(&mnt, "mid", &format!("memory {src}"));
            mem.has.insert("mid");
            steps.push("mid:dump".to_string());
        } else {
            checkpoint(&mut mem, img.name, parent, &src);
            steps.push(format!("{}:{}", img.name, mem.delta[img.name]));
        }
        ram.insert(img.name, r);
    }
    let child_on_mid = matches!(
        (mem.delta.get("mid"), mem.delta.get(child)),
        (Some(m), Some(c)) if mem.backing[c].as_ref() == Some(m)
    );
    if child_on_mid && rng.gen_bool(0.25) {
        ctl_ok(&mnt, "mid", "memory none");
        mem.delta.remove("mid");
        let parent = spec.imgs[spec.index("mid")]
            .parent
            .map(|i| spec.imgs[i].name);
        let r = derived_ram(rng, &ram["mid"]);
        let src = dump(&r);
        checkpoint(&mut mem, "mid", parent, &src);
        steps.push(format!("mid:{} again", mem.delta["mid"]));
        ram.insert("mid", r);
    }
    for (name, r) in &ram {
        let got = std::fs::read(mnt.join(name).join("memory.raw"))
            .unwrap_or_else(|e| panic!("{tag}: read {name}/memory.raw: {e}"));
        assert!(
            got == *r,
            "{tag}: {name}/memory.raw is not the RAM checkpointed"
        );
        std::fs::write(memory_reference(ws, name), r).expect("write reference");
    }
    mem.desc = format!("memory {} pages: {}", pages, steps.join(" "));
    mem.child_len = mem
        .delta
        .get(child)
        .map(|d| file_len(&ws.img(&format!("{MEMORY_DIR}/{d}"))));
    eprintln!("{tag}: {}", mem.desc);
    mem
}

/// Right after the kill: every visible point's delta, read by
/// `qemu-img convert` through the deltas it backs onto, is its recorded
/// memory.
fn check_memory_offline(ws: &Workspace, mem: &Memory, points: &[&Img], tag: &str) {
    for img in points {
        let Some(d) = mem.delta.get(img.name) else {
            continue;
        };
        let now = ws.scratch(&format!("now-{}.memory.raw", img.name));
        flatten_to(ws, &format!("{MEMORY_DIR}/{d}"), &now);
        if let Err(e) = same_bytes(&now, &memory_reference(ws, img.name)) {
            panic!(
                "{tag}: after the kill, {}'s memory ({d}) changed: {e}",
                img.name
            );
        }
        let _ = std::fs::remove_file(&now);
    }
}

/// `qemu-img check` of every file in `MEMORY_DIR`; returns the bytes of
/// leaked clusters (as [`check_all`] does for the disks).
fn check_deltas(ws: &Workspace, tag: &str) -> u64 {
    let names = memory_dir_files(ws)
        .into_iter()
        .map(|f| format!("{MEMORY_DIR}/{f}"));
    check_images(ws, tag, names)
}

/// Where the kill left the memory of `mid`'s child, judged from its
/// delta: untouched, some of mid's pages copied in (the file grew), or
/// re-pointed to mid's backing (the memory step is done).
fn memory_moment(ws: &Workspace, mem: &Memory, spec: &Spec) -> &'static str {
    let child = spec.imgs[spec.mid_child()].name;
    let (Some(c), Some(before)) = (mem.delta.get(child), mem.child_len) else {
        return "-";
    };
    if mem.case(spec) != "child's delta on mid's" {
        return "-";
    }
    let name = format!("{MEMORY_DIR}/{c}");
    if backing_name(ws, &name) != mem.backing[c] {
        return "re-pointed";
    }
    match std::fs::metadata(ws.img(&name)).map(|m| m.len()) {
        Ok(len) if len > before => "copying",
        _ => "untouched",
    }
}

// ---------------------------------------------------------------------------
// Reference bytes and comparisons
// ---------------------------------------------------------------------------

fn reference(ws: &Workspace, name: &str) -> PathBuf {
    ws.scratch(&format!("ref-{name}.raw"))
}

/// `qemu-img convert -O raw` of `images/<file>` to `out`.
fn flatten_to(ws: &Workspace, file: &str, out: &Path) {
    let _ = std::fs::remove_file(out);
    ws.qemu_img(&["convert", "-U", "-O", "raw", file, &out.to_string_lossy()]);
}

/// Compares two files in 1 MiB pieces; `Err` names the differing 4 KiB
/// blocks (the first few) and how many there are.
fn same_bytes(got: &Path, want: &Path) -> Result<(), String> {
    let open = |p: &Path| File::open(p).map_err(|e| format!("open {}: {e}", p.display()));
    let (mut a, mut b) = (open(got)?, open(want)?);
    drop_cache(&a);
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut off = 0u64;
    let mut bad = Vec::new();
    loop {
        let na = read_full(&mut a, &mut ba)
            .map_err(|e| format!("read {} at {off}: {e}", got.display()))?;
        let nb = read_full(&mut b, &mut bb).map_err(|e| format!("read {}: {e}", want.display()))?;
        if na != nb {
            return Err(format!(
                "{} is {} bytes shorter/longer near offset {off}",
                got.display(),
                na.abs_diff(nb)
            ));
        }
        if na == 0 {
            break;
        }
        if ba[..na] != bb[..nb] {
            for (k, (x, y)) in ba[..na].chunks(4096).zip(bb[..nb].chunks(4096)).enumerate() {
                if x != y {
                    bad.push(off + k as u64 * 4096);
                }
            }
        }
        off += na as u64;
    }
    if bad.is_empty() {
        return Ok(());
    }
    let first: Vec<String> = bad.iter().take(8).map(|o| format!("{o:#x}")).collect();
    Err(format!(
        "{} differs from {} in {} blocks of 4 KiB, first at {}",
        got.display(),
        want.display(),
        bad.len(),
        first.join(", ")
    ))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// Looking at the tree directory
// ---------------------------------------------------------------------------

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

/// Whether the manifest says `mid` is a visible point (no manifest, or no
/// entry: its file makes it one).
fn mid_visible_offline(ws: &Workspace) -> bool {
    if !ws.img("mid.qcow2").exists() {
        return false;
    }
    let Some(m) = read_json(&ws.images.join(MANIFEST)) else {
        return true;
    };
    !m["points"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["name"] == "mid" && p["hidden"] == Value::Bool(true))
}

fn manifest_names(ws: &Workspace) -> BTreeSet<String> {
    read_json(&ws.images.join(MANIFEST))
        .and_then(|m| m["points"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        // An image marked garbage is on its way out (reclaimed at open).
        .filter(|p| p["garbage"] != Value::Bool(true))
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

/// The backing file name `images/<file>`'s header holds.
fn backing_name(ws: &Workspace, file: &str) -> Option<String> {
    let o = ws.qemu_img(&["info", "-U", "--output=json", file]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("qemu-img info json");
    v["backing-filename"].as_str().map(str::to_string)
}

/// Where the kill landed (see [`Moment`]), and the journal's direction.
fn classify(ws: &Workspace) -> (Moment, Option<String>) {
    match read_json(&ws.images.join(JOURNAL)) {
        Some(j) => {
            let dir = j["direction"].as_str().unwrap_or("?").to_string();
            let hidden = j["hidden"].as_str().unwrap_or("");
            let child = j["child"].as_str().unwrap_or("");
            let committed = match dir.as_str() {
                "stream" => backing_name(ws, child).as_deref() == j["parent"].as_str(),
                _ => !ws.img(hidden).exists() && ws.img(child).exists(),
            };
            let m = if committed {
                Moment::AfterCommit
            } else {
                Moment::MidMerge
            };
            (m, Some(dir))
        }
        None if ws.img("mid.qcow2").exists() => (Moment::Before, None),
        None => (Moment::After, None),
    }
}

// ---------------------------------------------------------------------------
// Killing
// ---------------------------------------------------------------------------

/// SIGKILLs a daemon that has not finished a phase within its limit: a
/// hung mount would otherwise block the test for ever. First prints where
/// the daemon's threads wait, with a backtrace when `gdb` is installed
/// (also saved to `hang-<pid>.txt` in the run's directory).
struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    fn new(pid: i32, limit: Duration, what: String, dump: PathBuf) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = thread::spawn(move || {
            if rx.recv_timeout(limit) != Err(mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            let mut text = format!("HUNG: daemon {pid} did not finish {what} within {limit:?}\n");
            if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for t in tasks.flatten() {
                    let read = |f: &str| {
                        std::fs::read_to_string(t.path().join(f))
                            .unwrap_or_default()
                            .trim()
                            .to_string()
                    };
                    text.push_str(&format!(
                        "  thread {} waits in {}\n",
                        read("comm"),
                        read("wchan")
                    ));
                }
            }
            let gdb = Command::new("timeout")
                .args([
                    "50",
                    "gdb",
                    "-p",
                    &pid.to_string(),
                    "-batch",
                    "-ex",
                    "thread apply all bt",
                ])
                .stdin(Stdio::null())
                .output();
            if let Ok(o) = gdb {
                let bt = String::from_utf8_lossy(&o.stdout);
                let _ = std::fs::write(&dump, bt.as_bytes());
                for l in bt
                    .lines()
                    .filter(|l| l.starts_with("Thread ") || l.contains(" snaptree::"))
                {
                    text.push_str("  ");
                    text.push_str(l);
                    text.push('\n');
                }
            }
            eprintln!("{text}  SIGKILL {pid}");
            kill(pid, libc::SIGKILL);
        });
        Watchdog {
            done: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A delay in [0, 1.2 × `t`].
fn delay(rng: &mut SmallRng, t: Duration) -> Duration {
    t.mul_f64(rng.gen_range(0.0..1.2))
}

/// Mount variant: give the points memory (see [`give_memory`]), delete
/// `mid`, start `merge-now`, SIGKILL the daemon after a random delay (or
/// after the merge, when calibrating). `None` when FUSE is refused.
fn kill_mounted(
    ws: &Workspace,
    spec: &Spec,
    rng: &mut SmallRng,
    cal: &mut Option<Duration>,
    tag: &str,
) -> Option<(Moment, Option<String>, Memory)> {
    let mut m = ws.mount(&["-o", "gc_idle=off"])?;
    let pid = m.pid();
    let dog = Watchdog::new(
        pid,
        Duration::from_secs(150),
        format!("{tag}: checkpoints, delete and merge-now"),
        ws.scratch(&format!("hang-{pid}.txt")),
    );
    let mem = give_memory(ws, spec, rng, tag);
    let want: BTreeSet<String> = spec.imgs.iter().map(|i| i.name.to_string()).collect();
    assert_eq!(visible(&ws.mnt), want, "{tag}: points before the delete");
    ctl_ok(&ws.mnt, "mid", "delete");
    let (tx, rx) = mpsc::channel();
    let target = ws.mnt.join("merge-now");
    let wait = cal.map(|t| delay(rng, t));
    let t0 = Instant::now();
    thread::spawn(move || {
        let r = OpenOptions::new()
            .write(true)
            .open(&target)
            .and_then(|mut f| f.write_all(b"1"));
        let _ = tx.send((r, t0.elapsed()));
    });
    let early = match wait {
        Some(d) => {
            thread::sleep(d);
            None
        }
        None => {
            // Calibration: wait for the merge to end, then kill anyway.
            let (r, took) = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("merge-now did not return within 120 s");
            if let Err(e) = r {
                panic!(
                    "{tag}: merge-now failed: {e}\nstatus:\n{}",
                    status_text(&ws.mnt)
                );
            }
            *cal = Some(took);
            eprintln!(
                "{tag}: mount merge takes {took:?}; kills spread over [0, {:?}]",
                took.mul_f64(1.2)
            );
            Some(took)
        }
    };
    drop(dog);
    kill(pid, libc::SIGKILL);
    m.wait_for_kill();
    let finished = match early {
        Some(took) => Some(Ok(took)),
        None => rx
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .map(|(r, t)| r.map(|()| t)),
    };
    lazy_umount(&ws.mnt);
    drop(m);
    let (moment, dir) = classify(ws);
    if let Some(Ok(took)) = finished {
        assert_eq!(
            moment,
            Moment::After,
            "{tag}: merge-now returned ({took:?}) but the files say {moment:?}"
        );
        if early.is_some() {
            return Some((Moment::Uninterrupted, dir, mem));
        }
    }
    eprintln!(
        "{tag}: killed after {:?}: {moment:?}",
        wait.unwrap_or_default()
    );
    Some((moment, dir, mem))
}

fn snaptree(args: &[&str], log: &Path) -> Command {
    let mut c = Command::new(bin());
    let out = File::create(log).expect("log file");
    c.args(args)
        .current_dir("/")
        .env("SNAPTREE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup log"))
        .stderr(out);
    c
}

/// Runs `snaptree ARGS` to completion; panics with its output unless it
/// succeeds.
fn snaptree_ok(ws: &Workspace, args: &[&str], tag: &str) {
    let log = ws.scratch("cli.log");
    let mut child = snaptree(args, &log).spawn().expect("start snaptree");
    let s = wait_child(&mut child, COMMAND_TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("{tag}: snaptree {args:?} did not finish within {COMMAND_TIMEOUT:?}")
    });
    assert!(
        s.success(),
        "{tag}: snaptree {args:?}: {s}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Offline variant: `snaptree merge SRC mid`, SIGKILLed after a random
/// delay (not at all when calibrating).
fn kill_offline(
    ws: &Workspace,
    rng: &mut SmallRng,
    cal: &mut Option<Duration>,
    tag: &str,
) -> (Moment, Option<String>) {
    let log = ws.scratch("merge-killed.log");
    let src = ws.images.to_string_lossy().into_owned();
    let wait = cal.map(|t| delay(rng, t));
    let t0 = Instant::now();
    let mut child = snaptree(&["merge", &src, "mid", "--quiet"], &log)
        .spawn()
        .expect("start snaptree merge");
    let Some(d) = wait else {
        let s = wait_child(&mut child, COMMAND_TIMEOUT).expect("snaptree merge did not finish");
        let took = t0.elapsed();
        assert!(
            s.success(),
            "{tag}: snaptree merge: {s}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        *cal = Some(took);
        eprintln!(
            "{tag}: offline merge takes {took:?}; kills spread over [0, {:?}]",
            took.mul_f64(1.2)
        );
        let (moment, dir) = classify(ws);
        assert_eq!(
            moment,
            Moment::After,
            "{tag}: snaptree merge succeeded, but the files say {moment:?}"
        );
        return (Moment::Uninterrupted, dir);
    };
    thread::sleep(d.saturating_sub(t0.elapsed()));
    kill(child.id() as i32, libc::SIGKILL);
    let s = wait_child(&mut child, EXIT_DEADLINE).expect("killed snaptree merge did not exit");
    let (moment, dir) = classify(ws);
    if s.success() {
        assert_eq!(
            moment,
            Moment::After,
            "{tag}: snaptree merge succeeded, but the files say {moment:?}"
        );
    }
    eprintln!("{tag}: killed after {d:?} ({s}): {moment:?}");
    (moment, dir)
}

// ---------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------

fn one_run(i: u64, run_seed: u64, cal: &mut Calibration) -> Option<Outcome> {
    let mut rng = SmallRng::seed_from_u64(run_seed);
    let variant = if rng.gen_bool(0.3) {
        Variant::Offline
    } else {
        Variant::Mount
    };
    let spec = random_spec(&mut rng);
    let tag = format!("run {i} ({variant:?}, {}, {})", spec.intended, spec.desc);
    let ws = Workspace::new();
    build(&ws, &spec, &mut rng);
    eprintln!("{tag}: built in {}", ws.root().display());
    for img in &spec.imgs {
        flatten_to(&ws, &img.file, &reference(&ws, img.name));
    }
    // A commit renames mid's file onto its child's: the child's file then
    // has mid's inode.
    let mid_inode = inode(&ws.img("mid.qcow2"));
    let child = spec.mid_child();

    let mut slot = cal.get(&(variant, spec.intended)).copied();
    let (moment, journal_dir, mem) = match variant {
        Variant::Mount => kill_mounted(&ws, &spec, &mut rng, &mut slot, &tag)?,
        Variant::Offline => {
            let m = ws.mount(&["-o", "gc_idle=off"])?;
            let mem = give_memory(&ws, &spec, &mut rng, &tag);
            let s = m.unmount();
            assert!(
                s.is_none_or(|s| s.success()),
                "{tag}: daemon exit status {s:?}"
            );
            let (moment, dir) = kill_offline(&ws, &mut rng, &mut slot, &tag);
            (moment, dir, mem)
        }
    };
    if let Some(t) = slot {
        cal.insert((variant, spec.intended), t);
    }
    let mem_moment = memory_moment(&ws, &mem, &spec);
    let tag = format!(
        "{tag} [{}] killed {moment:?} (memory: {mem_moment})",
        mem.desc
    );

    // Right after the kill, before anything recovers: images are sound
    // and every visible point reads what it read before.
    let leaked = check_all(&ws, &tag) + check_deltas(&ws, &tag);
    let mid_visible = variant == Variant::Offline && mid_visible_offline(&ws);
    let points: Vec<&Img> = spec
        .imgs
        .iter()
        .filter(|i| i.name != "mid" || mid_visible)
        .collect();
    check_memory_offline(&ws, &mem, &points, &tag);
    for img in points {
        let now = ws.scratch(&format!("now-{}.raw", img.name));
        flatten_to(&ws, &img.file, &now);
        if let Err(e) = same_bytes(&now, &reference(&ws, img.name)) {
            panic!("{tag}: after the kill, point {} changed: {e}", img.name);
        }
        let _ = std::fs::remove_file(&now);
    }

    if variant == Variant::Offline {
        let src = ws.images.to_string_lossy().into_owned();
        snaptree_ok(&ws, &["merge", &src, "--quiet"], &tag);
        if mid_visible_offline(&ws) {
            snaptree_ok(&ws, &["merge", &src, "mid", "--quiet"], &tag);
        }
        assert!(
            !ws.img("mid.qcow2").exists(),
            "{tag}: mid.qcow2 left after snaptree merge"
        );
    }

    verify_mounted(
        &ws,
        &spec,
        &mem,
        variant == Variant::Mount && moment == Moment::Before,
        &tag,
    );
    let direction = if inode(&ws.img(&spec.imgs[child].file)) == mid_inode {
        "commit"
    } else {
        "stream"
    };
    if let Some(d) = journal_dir {
        assert_eq!(
            d, direction,
            "{tag}: the journal's direction and the merge done differ"
        );
    }

    // Unmounted: images sound, bytes right, chains short, no leftovers,
    // and no leaks: recovery freed what the kill left.
    let leaked_after = check_all(&ws, &tag) + check_deltas(&ws, &tag);
    assert_eq!(
        leaked_after, 0,
        "{tag}: {leaked_after} bytes of leaked clusters after the merge completed ({leaked} after the kill)"
    );
    assert_eq!(
        memory_dir_files(&ws),
        mem.files_after_merge(&spec),
        "{tag}: files in {MEMORY_DIR} after unmount"
    );
    check_memory_offline(&ws, &mem, &spec.visible(), &tag);
    for img in spec.visible() {
        let now = ws.scratch(&format!("now-{}.raw", img.name));
        flatten_to(&ws, &img.file, &now);
        if let Err(e) = same_bytes(&now, &reference(&ws, img.name)) {
            panic!(
                "{tag}: after the merge completed, point {} changed: {e}",
                img.name
            );
        }
        let _ = std::fs::remove_file(&now);
        if !img.raw {
            let o = ws.qemu_img(&["info", "-U", "--backing-chain", "--output=json", &img.file]);
            let v: Value = serde_json::from_slice(&o.stdout).expect("qemu-img info json");
            let depth = v.as_array().map_or(0, Vec::len);
            let want = spec.visible_ancestors(spec.index(img.name)) + 1;
            assert_eq!(
                depth, want,
                "{tag}: qemu-img info --backing-chain {}: depth",
                img.file
            );
        }
    }
    assert!(
        !ws.img("mid.qcow2").exists(),
        "{tag}: mid.qcow2 still exists"
    );
    assert!(
        !ws.images.join(JOURNAL).exists(),
        "{tag}: the merge journal is left"
    );
    assert!(
        !manifest_names(&ws).contains("mid"),
        "{tag}: the manifest still lists mid: {:?}",
        std::fs::read_to_string(ws.images.join(MANIFEST))
    );
    Some(Outcome {
        variant,
        moment,
        direction: direction.to_string(),
        leaked,
        memory: (mem.case(&spec), mem_moment),
    })
}

/// `qemu-img check` of every qcow2 image; returns the bytes of leaked
/// clusters. Any error or corruption fails the run; so do leaks with
/// `SNAPTREE_CRASH_STRICT_LEAKS=1`. (The qcow2 writer orders its
/// metadata so that a crash leaves at worst leaked clusters; see
/// `src/image/qcow2/write.rs`.)
fn check_all(ws: &Workspace, tag: &str) -> u64 {
    check_images(ws, tag, ws.qcow2_images())
}

/// `qemu-img check` of the qcow2 images `names` (relative to the tree),
/// with the rules of [`check_all`]; returns the bytes of leaked clusters.
fn check_images(ws: &Workspace, tag: &str, names: impl IntoIterator<Item = String>) -> u64 {
    let strict = std::env::var_os("SNAPTREE_CRASH_STRICT_LEAKS").is_some_and(|v| v != "0");
    let mut leaked = 0;
    for name in names {
        let o = ws.qemu_img_unchecked(&["check", "-U", "--output=json", &name]);
        let code = o.status.code();
        let v: Option<Value> = serde_json::from_slice(&o.stdout).ok();
        let leaks = v.as_ref().and_then(|v| v["leaks"].as_u64()).unwrap_or(0);
        let clean = code == Some(0) || (code == Some(3) && !strict);
        if !clean {
            let text = ws.qemu_img_unchecked(&["check", "-U", &name]);
            panic!(
                "{tag}: qemu-img check {name}: {}\n{}{}",
                o.status,
                String::from_utf8_lossy(&text.stdout),
                String::from_utf8_lossy(&text.stderr)
            );
        }
        if leaks > 0 {
            let info = ws.qemu_img(&["info", "-U", "--output=json", &name]);
            let info: Value = serde_json::from_slice(&info.stdout).expect("qemu-img info json");
            let cluster = info["cluster-size"].as_u64().unwrap_or(65536);
            eprintln!("{tag}: qemu-img check {name}: {leaks} leaked clusters of {cluster} bytes");
            leaked += leaks * cluster;
        }
    }
    leaked
}

/// Remounts, checks every visible point, lets the merge complete (starting
/// it when `start_merge`: the kill came before it began), checks again and
/// unmounts.
fn verify_mounted(ws: &Workspace, spec: &Spec, mem: &Memory, start_merge: bool, tag: &str) {
    let mnt = ws.mnt.clone();
    let m = ws.remount(&["-o", "gc_idle=off"]);
    let pid = m.pid();
    let dog = Watchdog::new(
        pid,
        Duration::from_secs(120),
        format!("{tag}: the checks after remount"),
        ws.scratch(&format!("hang-{pid}.txt")),
    );
    let want: BTreeSet<String> = spec.visible().iter().map(|i| i.name.to_string()).collect();
    assert_eq!(
        visible(&mnt),
        want,
        "{tag}: points after remount\n{}",
        tree_text(&mnt)
    );
    let compare_all = |when: &str| {
        for img in spec.visible() {
            let disk = mnt.join(img.name).join("disk.raw");
            if let Err(e) = same_bytes(&disk, &reference(ws, img.name)) {
                panic!(
                    "{tag}: {when}: point {} reads wrong bytes: {e}\nstatus:\n{}",
                    img.name,
                    status_text(&mnt)
                );
            }
            let memory = mnt.join(img.name).join("memory.raw");
            if !mem.has.contains(img.name) {
                assert!(
                    !memory.exists(),
                    "{tag}: {when}: {}/memory.raw exists",
                    img.name
                );
            } else if let Err(e) = same_bytes(&memory, &memory_reference(ws, img.name)) {
                panic!(
                    "{tag}: {when}: {}/memory.raw reads wrong bytes: {e}\nstatus:\n{}",
                    img.name,
                    status_text(&mnt)
                );
            }
        }
    };
    compare_all("after remount");
    if start_merge {
        std::fs::write(mnt.join("merge-now"), "1")
            .unwrap_or_else(|e| panic!("{tag}: merge-now: {e}\nstatus:\n{}", status_text(&mnt)));
    }
    let mut status = String::new();
    let done = wait_until(MERGE_DEADLINE, || {
        // The tree first, then the status: "idle" read after a tree
        // without mid can only be the end of the merge that removed it
        // (read the other way round, "idle" may come from before the
        // redone merge began, and the tree from between its relink and
        // the removal of mid's file).
        let names = tree_names(&tree_text(&mnt));
        status = status_text(&mnt);
        assert!(
            !status.contains("last merge: error"),
            "{tag}: the merge failed after remount:\n{status}"
        );
        !names.contains("mid") && status.contains("merge: idle")
    });
    assert!(
        done,
        "{tag}: the merge did not complete within {MERGE_DEADLINE:?} of the remount\nstatus:\n{status}\ntree:\n{}",
        tree_text(&mnt)
    );
    assert_eq!(visible(&mnt), want, "{tag}: points after the merge");
    assert!(
        !ws.img("mid.qcow2").exists(),
        "{tag}: mid.qcow2 still exists after the merge"
    );
    for img in spec.visible() {
        let info = info(&mnt, img.name);
        let depth = info["disks"]["disk"]["chain_depth"].as_u64();
        let want = spec.visible_ancestors(spec.index(img.name)) as u64 + 1;
        assert_eq!(
            depth,
            Some(want),
            "{tag}: {}/info.json chain_depth: {info}",
            img.name
        );
    }
    compare_all("after the merge");
    assert_eq!(
        memory_dir_files(ws),
        mem.files_after_merge(spec),
        "{tag}: files in {MEMORY_DIR} after the merge (the visible points' deltas and what \
         they back onto)"
    );
    let s = m.unmount();
    drop(dog);
    assert!(
        s.is_none_or(|s| s.success()),
        "{tag}: daemon exit status {s:?}"
    );
}
