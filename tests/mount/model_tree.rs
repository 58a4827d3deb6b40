//! The tree as ARCHITECTURE.md describes it, in memory, and a randomised test
//! that drives the mount and the model with the same operations (writes,
//! punches, snapshots, clones, deletes, `merge-now` and `ctl merge`, and
//! memory checkpoints: `checkpoint SOURCE`, `memory SOURCE`, `memory
//! none`) and compares them after each step: every visible point's bytes,
//! parent and kind, its chain depth, which images exist, its `memory.raw`
//! and which page-delta checkpoints `.snaptree-memory` holds.
//!
//! Merges change nothing visible, so the model coalesces a hidden point
//! with exactly one child the way the engine does (the child takes its
//! place under its parent) and each image's chain depth stays "1 + number
//! of ancestors in the model". After `merge-now` the depth is also checked
//! against the formula computed before the merge: 1 + the ancestors that
//! are visible or hidden with two or more children (those stay as layers).
//!
//! Memory: a checkpoint's RAM is the parent point's (hidden or not) with a
//! few pages changed, zeroed or the size changed, or fresh when the
//! parent has none; its delta backs onto the parent's delta, if the
//! parent has one. The model keeps each delta file's backing file: a
//! snapshot moves the leaf's memory to the frozen point, a deleted point's
//! memory goes, and coalescing a hidden point re-points its child's delta
//! to the hidden delta's backing when it backed onto the hidden delta.
//! `.snaptree-memory` must hold exactly the deltas some point names and
//! the files they back onto, and `qemu-img check` them clean.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

mod memory;

use super::merge::merge_now_ok;
use super::*;
use memory::*;

/// One snapshot point of the model tree.
#[derive(Clone)]
struct ModelPoint {
    data: Vec<u8>,
    parent: Option<String>,
    children: Vec<String>,
    hidden: bool,
    memory: Option<ModelMemory>,
}

/// A point's memory checkpoint in the model.
#[derive(Clone)]
struct ModelMemory {
    ram: Vec<u8>,
    /// The source as `info.json` names it.
    source: String,
    /// The page-delta checkpoint's file in `.snaptree-memory`; `None` for
    /// a raw dump attached in place (`memory SOURCE`).
    delta: Option<String>,
}

/// The tree as ARCHITECTURE.md describes it, in memory.
#[derive(Clone, Default)]
struct ModelTree {
    points: BTreeMap<String, ModelPoint>,
    /// Each delta file in `.snaptree-memory` -> the delta it backs onto.
    deltas: BTreeMap<String, Option<String>>,
    /// Child deltas re-pointed by merges (for the log).
    repointed: usize,
}

impl ModelTree {
    fn visible(&self) -> BTreeSet<String> {
        self.points
            .iter()
            .filter(|(_, p)| !p.hidden)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn leaves(&self) -> Vec<String> {
        self.points
            .iter()
            .filter(|(_, p)| !p.hidden && p.children.is_empty())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Nearest visible ancestor.
    fn visible_parent(&self, name: &str) -> Option<String> {
        let mut cur = self.points[name].parent.clone();
        while let Some(p) = cur {
            if !self.points[&p].hidden {
                return Some(p);
            }
            cur = self.points[&p].parent.clone();
        }
        None
    }

    fn snapshot(&mut self, leaf: &str, name: &str) {
        let l = self.points[leaf].clone();
        if let Some(pp) = &l.parent {
            for c in self.points.get_mut(pp).expect("parent").children.iter_mut() {
                if c == leaf {
                    *c = name.to_string();
                }
            }
        }
        // The checkpoint describes the content frozen now.
        self.points.insert(
            name.to_string(),
            ModelPoint {
                data: l.data.clone(),
                parent: l.parent.clone(),
                children: vec![leaf.to_string()],
                hidden: false,
                memory: l.memory.clone(),
            },
        );
        let l = self.points.get_mut(leaf).expect("leaf");
        l.parent = Some(name.to_string());
        l.memory = None;
    }

    fn clone_point(&mut self, of: &str, name: &str) {
        let data = self.points[of].data.clone();
        self.points.insert(
            name.to_string(),
            ModelPoint {
                data,
                parent: Some(of.to_string()),
                children: Vec::new(),
                hidden: false,
                memory: None,
            },
        );
        self.points
            .get_mut(of)
            .expect("point")
            .children
            .push(name.to_string());
    }

    /// All ancestors of `name`, nearest first (hidden ones included).
    fn ancestors(&self, name: &str) -> Vec<String> {
        let mut v = Vec::new();
        let mut cur = self.points[name].parent.clone();
        while let Some(p) = cur {
            cur = self.points[&p].parent.clone();
            v.push(p);
        }
        v
    }

    /// Hidden points a merge can coalesce (exactly one child).
    fn coalescable(&self) -> Vec<String> {
        self.points
            .iter()
            .filter(|(_, p)| p.hidden && p.children.len() == 1)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Hidden points a merge must leave (two or more children).
    fn stuck(&self) -> Vec<String> {
        self.points
            .iter()
            .filter(|(_, p)| p.hidden && p.children.len() >= 2)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The chain depth every visible point must have once everything
    /// coalescable is merged: its own layer plus every ancestor that stays
    /// (visible, or hidden with 2+ children). Coalescing one hidden point
    /// puts its child in its place, so no other point's child count
    /// changes and the formula can be evaluated before the merge.
    fn depths_after_merge(&self) -> BTreeMap<String, usize> {
        self.visible()
            .into_iter()
            .map(|n| {
                let kept = self
                    .ancestors(&n)
                    .iter()
                    .filter(|a| {
                        let a = &self.points[*a];
                        !a.hidden || a.children.len() >= 2
                    })
                    .count();
                (n, 1 + kept)
            })
            .collect()
    }

    /// `merge-now`: every hidden point with one child is coalesced into it
    /// (the child hangs under the hidden point's parent). Nothing visible
    /// changes. Returns the points merged away.
    fn merge_all(&mut self) -> Vec<String> {
        let mut merged = Vec::new();
        while let Some(h) = self.coalescable().into_iter().next() {
            let hp = self.points.remove(&h).expect("hidden point");
            let child = hp.children[0].clone();
            if let Some(pp) = &hp.parent {
                for c in self.points.get_mut(pp).expect("parent").children.iter_mut() {
                    if *c == h {
                        *c = child.clone();
                    }
                }
            }
            // The child's delta stops needing the hidden one first.
            let c = self.points.get_mut(&child).expect("child");
            c.parent = hp.parent;
            let hd = hp.memory.and_then(|m| m.delta);
            let cd = c.memory.as_ref().and_then(|m| m.delta.clone());
            if let (Some(hd), Some(cd)) = (hd, cd) {
                if self.deltas[&cd].as_ref() == Some(&hd) {
                    let to = self.deltas[&hd].clone();
                    self.deltas.insert(cd, to);
                    self.repointed += 1;
                }
            }
            merged.push(h);
        }
        self.prune_deltas();
        merged
    }

    /// Delta `file`, then the deltas it backs onto, nearest first.
    fn delta_chain(&self, file: &str) -> Vec<String> {
        let mut v = vec![file.to_string()];
        while let Some(Some(b)) = self.deltas.get(v.last().expect("chain")) {
            v.push(b.clone());
        }
        v
    }

    /// The files `.snaptree-memory` must hold: every point's delta
    /// (hidden points' too) and what they back onto.
    fn memory_files(&self) -> BTreeSet<String> {
        self.points
            .values()
            .filter_map(|p| p.memory.as_ref()?.delta.as_deref())
            .flat_map(|d| self.delta_chain(d))
            .collect()
    }

    /// Forgets deltas that nothing needs (the sweep removes their files).
    fn prune_deltas(&mut self) {
        let keep = self.memory_files();
        self.deltas.retain(|f, _| keep.contains(f));
    }

    /// The delta a checkpoint of `name` backs onto: its parent's (hidden
    /// or not), if that is a page-delta checkpoint.
    fn delta_base(&self, name: &str) -> Option<String> {
        let parent = self.points[name].parent.as_ref()?;
        self.points[parent].memory.as_ref()?.delta.clone()
    }

    /// The file name a new checkpoint of `name` gets: `NAME.qcow2`, or
    /// `NAME.N.qcow2` with the first N whose file does not exist.
    fn new_delta_name(&self, name: &str) -> String {
        let files = self.memory_files();
        (0..)
            .map(|n| match n {
                0 => format!("{name}.qcow2"),
                _ => format!("{name}.{n}.qcow2"),
            })
            .find(|f| !files.contains(f))
            .expect("a free name")
    }

    /// The image files the tree must consist of: one `NAME.<ext>` per
    /// point, hidden ones included (a commit merge renames the hidden
    /// image onto the child's name; a stream merge removes it).
    fn images(&self, fmt: Fmt) -> Vec<String> {
        self.points
            .keys()
            .map(|n| format!("{n}.{}", fmt.ext()))
            .collect()
    }

    /// Returns the points removed (their images go).
    fn delete(&mut self, name: &str) -> Vec<String> {
        if !self.points[name].children.is_empty() {
            self.points.get_mut(name).expect("point").hidden = true;
            return Vec::new();
        }
        let mut removed = Vec::new();
        let mut cur = Some(name.to_string());
        while let Some(victim) = cur.take() {
            let p = self.points.remove(&victim).expect("victim");
            removed.push(victim.clone());
            if let Some(parent) = p.parent {
                let pp = self.points.get_mut(&parent).expect("parent");
                pp.children.retain(|c| *c != victim);
                if pp.children.is_empty() && pp.hidden {
                    cur = Some(parent);
                }
            }
        }
        self.prune_deltas();
        removed
    }
}

/// Compares every visible point of the mount with the model.
fn assert_tree_matches(mnt: &Path, model: &ModelTree, step: &str) {
    assert_eq!(visible(mnt), model.visible(), "{step}: visible points");
    for name in model.visible() {
        let p = &model.points[&name];
        assert_bytes_eq(
            &format!("{step}: {name}/disk.raw"),
            &read_disk(&disk(mnt, &name)),
            &p.data,
        );
        assert_eq!(
            parent_link(mnt, &name),
            model.visible_parent(&name).map(|p| format!("../{p}")),
            "{step}: {name}/parent"
        );
        let kind = if p.children.is_empty() {
            "leaf"
        } else {
            "snapshot"
        };
        let i = info(mnt, &name);
        assert_eq!(i["kind"], kind, "{step}: {name}/info.json kind");
        assert_eq!(
            i["disks"]["disk"]["chain_depth"],
            1 + model.ancestors(&name).len(),
            "{step}: {name}/info.json chain_depth (ancestors {:?})",
            model.ancestors(&name)
        );
    }
}

/// The images a tree is made of: qcow2 (on a qcow2 base) or VHD (on a
/// dynamic VHD base: every snapshot and clone is a differencing VHD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fmt {
    Qcow2,
    Vhd,
}

impl Fmt {
    fn ext(self) -> &'static str {
        match self {
            Fmt::Qcow2 => "qcow2",
            Fmt::Vhd => "vhd",
        }
    }

    fn images(self, ws: &Workspace) -> Vec<String> {
        match self {
            Fmt::Qcow2 => ws.qcow2_images(),
            Fmt::Vhd => ws.vhd_images(),
        }
    }

    /// Every image passes the format's checker: `qemu-img check` for
    /// qcow2, libvhdi's `vhdiinfo` for VHD (qemu-img checks no VHD).
    fn check_all(self, ws: &Workspace) {
        match self {
            Fmt::Qcow2 => ws.check_all(),
            Fmt::Vhd => ws.vhdiinfo_all(),
        }
    }
}

/// The images of the tree are exactly the model's points.
#[track_caller]
fn assert_images_match(ws: &Workspace, model: &ModelTree, fmt: Fmt, step: &str) {
    assert_eq!(fmt.images(ws), model.images(fmt), "{step}: image files");
}

/// `merge-now` on the mount and in the model, then every check that a
/// merge must pass: the result text, the chain depths computed from the
/// model before the merge, the image files, and `qemu-img check`.
fn merge_now_step(
    ws: &Workspace,
    mnt: &Path,
    model: &mut ModelTree,
    fmt: Fmt,
    fds: &BTreeMap<String, File>,
    step: &str,
) -> Vec<String> {
    let want_depth = model.depths_after_merge();
    let stuck = model.stuck();
    let merged = model.merge_all();
    merge_now_ok(mnt);
    let last = read_text(&mnt.join("merge-now"));
    assert!(last.starts_with("ok: "), "{step}: merge-now says {last:?}");
    for h in &merged {
        assert!(
            last.contains(&format!("{h:?}")),
            "{step}: {h} merged, but merge-now says {last:?}"
        );
    }
    if merged.is_empty() {
        assert!(
            last.contains("nothing to merge"),
            "{step}: merge-now says {last:?}"
        );
    }
    for h in &stuck {
        assert!(
            last.contains("left hidden") && last.contains(&format!("{h:?}")),
            "{step}: {h} has 2+ children, merge-now says {last:?}"
        );
    }
    for (name, d) in &want_depth {
        assert_eq!(
            info(mnt, name)["disks"]["disk"]["chain_depth"],
            *d,
            "{step}: {name} chain_depth after merge-now (1 + ancestors kept)"
        );
    }
    for f in fds.values() {
        f.sync_all().expect("fsync");
    }
    fmt.check_all(ws);
    check_memory_deltas(ws, model);
    merged
}

#[test]
fn random_tree_operations_match_a_model() {
    let Some(ws) = workspace() else {
        return;
    };
    ws.create_qcow2("base.qcow2", S, None, "");
    ws.qemu_io(
        "base.qcow2",
        "qcow2",
        &["write -P 0x41 0 3M", "write -P 0x42 5M 1M"],
    );
    ws.create_qcow2("leaf.qcow2", S, Some(("base.qcow2", "qcow2")), "");
    let mut model = ModelTree::default();
    model.points.insert(
        "base".into(),
        ModelPoint {
            data: ws.flatten("base.qcow2"),
            parent: None,
            children: vec!["leaf".into()],
            hidden: false,
            memory: None,
        },
    );
    model.points.insert(
        "leaf".into(),
        ModelPoint {
            data: ws.flatten("leaf.qcow2"),
            parent: Some("base".into()),
            children: Vec::new(),
            hidden: false,
            memory: None,
        },
    );
    run_model(&ws, model, Fmt::Qcow2);
}

/// The same on a VHD tree: a dynamic VHD made by qemu-img, and every
/// snapshot and clone a differencing VHD made by snaptree; merges stream
/// (re-pointing differencing disks through the journal) or commit.
#[test]
fn random_vhd_tree_operations_match_a_model() {
    let Some(ws) = workspace() else {
        return;
    };
    ws.create_vpc("base.vhd", S);
    ws.qemu_io(
        "base.vhd",
        "vpc",
        &["write -P 0x41 0 3M", "write -P 0x42 5M 1M"],
    );
    let mut model = ModelTree::default();
    model.points.insert(
        "base".into(),
        ModelPoint {
            data: ws.flatten("base.vhd"),
            parent: None,
            children: Vec::new(),
            hidden: false,
            memory: None,
        },
    );
    run_model(&ws, model, Fmt::Vhd);
}

/// Virtual size of the model tests' disks.
const S: u64 = 8 * MIB;

/// Drives the mount and `model` with the same random operations; see the
/// module docs.
fn run_model(ws: &Workspace, mut model: ModelTree, fmt: Fmt) {
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    // No background merge: the test decides when chains get shorter.
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    // Descriptors of leaves, kept open across snapshots and merges.
    let mut fds: BTreeMap<String, File> = Default::default();
    let mut next = 0;
    // Points coalesced by merge-now / ctl merge, for the log.
    let mut merged_count = 0;
    // Raw dumps written (their names: ram-N.vmem), checkpoints imported.
    let (mut dumps, mut checkpoints) = (0, 0);
    let check = |model: &ModelTree, label: &str| {
        assert_tree_matches(&mnt, model, label);
        assert_images_match(ws, model, fmt, label);
        assert_memory_matches(ws, &mnt, model, label);
    };
    for step in 0..90 {
        let leaves = model.leaves();
        let vis: Vec<String> = model.visible().into_iter().collect();
        let mem = match rng.gen_bool(0.25) {
            true => memory_step(ws, &mnt, &mut model, &mut rng, &mut dumps, step),
            false => None,
        };
        checkpoints += mem.as_ref().is_some_and(|w| w.starts_with("checkpoint")) as usize;
        if let Some(what) = mem {
            check(&model, &format!("step {step} ({what}, seed {seed})"));
            continue;
        }
        let what = match rng.gen_range(0..100) {
            0..=33 => {
                let l = &leaves[rng.gen_range(0..leaves.len())];
                let len = rng.gen_range(1..300_000u64);
                let off = rng.gen_range(0..=S - len);
                let f = match fds.get(l) {
                    Some(f) => f,
                    None => {
                        let f = open_rw(&mnt, l).unwrap_or_else(|e| panic!("open {l}: {e}"));
                        fds.entry(l.clone()).or_insert(f)
                    }
                };
                let data = pattern(seed ^ step, len as usize);
                let p = model.points.get_mut(l).expect("leaf");
                write_both(f, &mut p.data, off, &data);
                format!("write {l} {off}+{len}")
            }
            34..=41 => {
                let l = &leaves[rng.gen_range(0..leaves.len())];
                let len = rng.gen_range(1..300_000u64);
                let off = rng.gen_range(0..=S - len);
                let f = open_rw(&mnt, l).unwrap_or_else(|e| panic!("open {l}: {e}"));
                punch_hole(&f, off, len).unwrap_or_else(|e| panic!("punch {l}: {e}"));
                let p = model.points.get_mut(l).expect("leaf");
                p.data[off as usize..(off + len) as usize].fill(0);
                format!("punch {l} {off}+{len}")
            }
            42..=54 => {
                let l = leaves[rng.gen_range(0..leaves.len())].clone();
                next += 1;
                let name = format!("s{next}");
                ctl_ok(&mnt, &l, &format!("snapshot {name}"));
                model.snapshot(&l, &name);
                format!("snapshot {l} as {name}")
            }
            55..=66 if !vis.is_empty() => {
                let p = vis[rng.gen_range(0..vis.len())].clone();
                next += 1;
                let name = format!("c{next}");
                ctl_ok(&mnt, &p, &format!("clone {name}"));
                if let Some(f) = fds.remove(&p) {
                    // p was a leaf: its open descriptor is read-only now.
                    assert_errno(
                        &format!("step {step}: write to a cloned leaf"),
                        f.write_at(b"x", 0),
                        libc::EROFS,
                    );
                }
                model.clone_point(&p, &name);
                format!("clone {p} as {name}")
            }
            67..=80 if vis.len() > 2 && leaves.len() > 1 => {
                let p = vis[rng.gen_range(0..vis.len())].clone();
                if rng.gen_bool(0.5) {
                    ctl_ok(&mnt, &p, "delete");
                } else {
                    std::fs::remove_dir(mnt.join(&p))
                        .unwrap_or_else(|e| panic!("step {step}: rmdir {p}: {e}"));
                }
                for gone in model.delete(&p) {
                    if let Some(f) = fds.remove(&gone) {
                        assert_errno(
                            &format!("step {step}: write to a deleted leaf"),
                            f.write_at(b"x", 0),
                            libc::ESTALE,
                        );
                    }
                }
                format!("delete {p}")
            }
            81..=90 => {
                let merged =
                    merge_now_step(ws, &mnt, &mut model, fmt, &fds, &format!("step {step}"));
                merged_count += merged.len();
                format!("merge-now (merged {merged:?})")
            }
            91..=95 if vis.len() > 2 && leaves.len() > 1 => {
                // `merge` = delete, then coalesce everything now.
                let p = vis[rng.gen_range(0..vis.len())].clone();
                let want_depth = {
                    let mut after = model.clone();
                    after.delete(&p);
                    after.depths_after_merge()
                };
                ctl_ok(&mnt, &p, "merge");
                for gone in model.delete(&p) {
                    if let Some(f) = fds.remove(&gone) {
                        assert_errno(
                            &format!("step {step}: write to a merged-away leaf"),
                            f.write_at(b"x", 0),
                            libc::ESTALE,
                        );
                    }
                }
                let merged = model.merge_all();
                merged_count += merged.len();
                for (name, d) in &want_depth {
                    assert_eq!(
                        info(&mnt, name)["disks"]["disk"]["chain_depth"],
                        *d,
                        "step {step}: {name} chain_depth after `merge` of {p}"
                    );
                }
                check_memory_deltas(ws, &model);
                format!("ctl merge {p} (merged {merged:?})")
            }
            _ => {
                for f in fds.values() {
                    f.sync_all().expect("fsync");
                }
                fmt.check_all(ws);
                check_memory_deltas(ws, &model);
                "fsync + image check".to_string()
            }
        };
        check(&model, &format!("step {step} ({what}, seed {seed})"));
    }
    // Always end with everything coalescable merged.
    let merged = merge_now_step(ws, &mnt, &mut model, fmt, &fds, "final merge-now");
    merged_count += merged.len();
    eprintln!(
        "{}: {merged_count} points merged; {checkpoints} memory checkpoints, {} deltas \
         re-pointed by merges, {} deltas left",
        test_name(),
        model.repointed,
        model.memory_files().len()
    );
    let label = format!("final merge-now (merged {merged:?}), seed {seed}");
    assert_tree_matches(&mnt, &model, &label);
    assert_images_match(ws, &model, fmt, &label);
    assert_memory_matches(ws, &mnt, &model, &label);
    assert!(
        model.coalescable().is_empty(),
        "model still has coalescable points"
    );
    drop(fds);
    // Images of the visible points, to compare with qemu after unmounting.
    let images: Vec<(String, String)> = model
        .visible()
        .into_iter()
        .map(|n| {
            let img = info(&mnt, &n)["disks"]["disk"]["image"]
                .as_str()
                .expect("image name")
                .to_string();
            (n, img)
        })
        .collect();
    unmount_ok(m);
    fmt.check_all(ws);
    assert_images_match(ws, &model, fmt, "after unmount");
    assert_eq!(
        memory_dir_files(ws),
        model.memory_files(),
        "after unmount: files in {MEMORY_DIR}, seed {seed}"
    );
    check_memory_deltas(ws, &model);
    for (name, img) in &images {
        match fmt {
            Fmt::Qcow2 => ws.compare(img, &model.points[name].data),
            // qemu-img reads no differencing VHD: judged by a fresh
            // `snaptree export` here, by vhdimount in tests/vhd_write.rs.
            Fmt::Vhd => assert_bytes_eq(
                &format!("after unmount: snaptree export {img}"),
                &ws.export(img),
                &model.points[name].data,
            ),
        }
    }
    // qemu-img reads each visible point's delta, through the deltas it
    // backs onto, as the model's RAM.
    for p in model.points.values().filter(|p| !p.hidden) {
        if let Some(ModelMemory {
            ram,
            delta: Some(d),
            ..
        }) = &p.memory
        {
            ws.compare(&format!("{MEMORY_DIR}/{d}"), ram);
        }
    }
    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_tree_matches(&m.mnt, &model, "after remount");
    assert_memory_matches(ws, &m.mnt, &model, &format!("after remount, seed {seed}"));
    unmount_ok(m);
}
