//! The tree as DESIGN.md describes it, in memory, and a randomised test
//! that drives the mount and the model with the same operations (writes,
//! punches, snapshots, clones, deletes) and compares them after each step.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

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
#[derive(Default)]
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
        assert_eq!(
            info(mnt, &name)["kind"],
            kind,
            "{step}: {name}/info.json kind"
        );
    }
}

#[test]
fn random_tree_operations_match_a_model() {
    let Some(ws) = workspace() else {
        return;
    };
    const S: u64 = 8 * MIB;
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
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    // Descriptors of leaves, kept open across snapshots.
    let mut fds: BTreeMap<String, File> = Default::default();
    let mut next = 0;
    for step in 0..45 {
        let leaves = model.leaves();
        let vis: Vec<String> = model.visible().into_iter().collect();
        let what = match rng.gen_range(0..100) {
            0..=39 => {
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
            40..=49 => {
                let l = &leaves[rng.gen_range(0..leaves.len())];
                let len = rng.gen_range(1..300_000u64);
                let off = rng.gen_range(0..=S - len);
                let f = open_rw(&mnt, l).unwrap_or_else(|e| panic!("open {l}: {e}"));
                punch_hole(&f, off, len).unwrap_or_else(|e| panic!("punch {l}: {e}"));
                let p = model.points.get_mut(l).expect("leaf");
                p.data[off as usize..(off + len) as usize].fill(0);
                format!("punch {l} {off}+{len}")
            }
            50..=64 => {
                let l = leaves[rng.gen_range(0..leaves.len())].clone();
                next += 1;
                let name = format!("s{next}");
                ctl_ok(&mnt, &l, &format!("snapshot {name}"));
                model.snapshot(&l, &name);
                format!("snapshot {l} as {name}")
            }
            65..=79 => {
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
            80..=94 if vis.len() > 2 && leaves.len() > 1 => {
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
            _ => {
                for f in fds.values() {
                    f.sync_all().expect("fsync");
                }
                ws.check_all();
                "fsync + qemu-img check".to_string()
            }
        };
        assert_tree_matches(&mnt, &model, &format!("step {step} ({what}, seed {seed})"));
    }
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
    ws.check_all();
    for (name, img) in &images {
        ws.compare(img, &model.points[name].data);
    }
    let m = ws.remount(&[]);
    assert_tree_matches(&m.mnt, &model, "after remount");
    unmount_ok(m);
}
