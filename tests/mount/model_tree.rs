//! The tree as DESIGN.md describes it, in memory, and a randomised test
//! that drives the mount and the model with the same operations (writes,
//! punches, snapshots, clones, deletes, `merge-now` and `ctl merge`) and
//! compares them after each step: every visible point's bytes, parent and
//! kind, its chain depth, and which images exist.
//!
//! Merges change nothing visible, so the model coalesces a hidden point
//! with exactly one child the way the engine does (the child takes its
//! place under its parent) and each image's chain depth stays "1 + number
//! of ancestors in the model". After `merge-now` the depth is also checked
//! against the formula computed before the merge: 1 + the ancestors that
//! are visible or hidden with two or more children (those stay as layers).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::merge::merge_now_ok;
use super::*;

/// One snapshot point of the model tree.
#[derive(Clone)]
struct ModelPoint {
    data: Vec<u8>,
    parent: Option<String>,
    children: Vec<String>,
    hidden: bool,
}

/// The tree as DESIGN.md describes it, in memory.
#[derive(Clone, Default)]
struct ModelTree {
    points: BTreeMap<String, ModelPoint>,
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
        self.points.insert(
            name.to_string(),
            ModelPoint {
                data: l.data.clone(),
                parent: l.parent.clone(),
                children: vec![leaf.to_string()],
                hidden: false,
            },
        );
        self.points.get_mut(leaf).expect("leaf").parent = Some(name.to_string());
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
            self.points.get_mut(&child).expect("child").parent = hp.parent;
            merged.push(h);
        }
        merged
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
        },
    );
    model.points.insert(
        "leaf".into(),
        ModelPoint {
            data: ws.flatten("leaf.qcow2"),
            parent: Some("base".into()),
            children: Vec::new(),
            hidden: false,
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
    for step in 0..80 {
        let leaves = model.leaves();
        let vis: Vec<String> = model.visible().into_iter().collect();
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
                format!("ctl merge {p} (merged {merged:?})")
            }
            _ => {
                for f in fds.values() {
                    f.sync_all().expect("fsync");
                }
                fmt.check_all(ws);
                "fsync + image check".to_string()
            }
        };
        let label = format!("step {step} ({what}, seed {seed})");
        assert_tree_matches(&mnt, &model, &label);
        assert_images_match(ws, &model, fmt, &label);
    }
    // Always end with everything coalescable merged.
    let merged = merge_now_step(ws, &mnt, &mut model, fmt, &fds, "final merge-now");
    merged_count += merged.len();
    eprintln!("{}: {merged_count} points merged", test_name());
    let label = format!("final merge-now (merged {merged:?}), seed {seed}");
    assert_tree_matches(&mnt, &model, &label);
    assert_images_match(ws, &model, fmt, &label);
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
    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_tree_matches(&m.mnt, &model, "after remount");
    unmount_ok(m);
}
