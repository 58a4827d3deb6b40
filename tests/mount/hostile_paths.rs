//! Hostile tree directories (issue: "a crafted tree directory can make a
//! mount delete host files"): a merge journal, a manifest and memory
//! sources that name files outside the tree or images they do not own,
//! names that are no names. Each test builds the hostile file the way a
//! stranger's tree would hold it, mounts, and checks that nothing outside
//! the tree changed, no image the manifest does not mark as hidden went,
//! every visible point still reads what `qemu-img convert` reads, and
//! `status` says what was refused.
//!
//! The fuzz test runs `SNAPTREE_HOSTILE_ROUNDS` random journals and
//! manifests (default 12; CI keeps it small); it prints its seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::*;

/// `base.qcow2` (4 MiB, data) <- `snap1.qcow2` <- `leaf.qcow2`, and a
/// second leaf `other.qcow2` on `snap1.qcow2`; a manifest names them, with
/// `snap1` hidden.
fn tree(ws: &Workspace) {
    ws.create_qcow2("base.qcow2", 4 * MIB, None, "");
    ws.qemu_io("base.qcow2", "qcow2", &["write -P 0x11 0 1M"]);
    ws.create_qcow2("snap1.qcow2", 4 * MIB, Some(("base.qcow2", "qcow2")), "");
    ws.qemu_io("snap1.qcow2", "qcow2", &["write -P 0x22 1M 1M"]);
    ws.create_qcow2("leaf.qcow2", 4 * MIB, Some(("snap1.qcow2", "qcow2")), "");
    ws.qemu_io("leaf.qcow2", "qcow2", &["write -P 0x33 2M 64k"]);
    ws.create_qcow2("other.qcow2", 4 * MIB, Some(("snap1.qcow2", "qcow2")), "");
    ws.qemu_io("other.qcow2", "qcow2", &["write -P 0x44 3M 64k"]);
    write_json(&ws.img(".snaptree.json"), &manifest(&[]));
}

/// The manifest of [`tree`], with `extra` entries appended.
fn manifest(extra: &[Value]) -> Value {
    let p = |name: &str, image: &str, parent: Option<&str>, hidden: bool| json!({"name": name, "image": image, "parent": parent, "created": 0, "hidden": hidden});
    let mut points = vec![
        p("base", "base.qcow2", None, false),
        p("snap1", "snap1.qcow2", Some("base"), true),
        p("leaf", "leaf.qcow2", Some("snap1"), false),
        p("other", "other.qcow2", Some("snap1"), false),
    ];
    points.extend(extra.iter().cloned());
    json!({"version": 1, "points": points})
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).expect("json")).expect("write json");
}

/// Every file under `dir` (recursively, not following symlinks) with its
/// bytes, or the symlink target: to tell that nothing there changed.
fn snapshot_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_symlink() {
                let target = std::fs::read_link(e.path()).expect("readlink");
                out.insert(e.path(), target.into_os_string().into_encoded_bytes());
            } else if t.is_file() {
                out.insert(e.path(), std::fs::read(e.path()).expect("read"));
            }
        }
    }
    out
}

/// Files outside the tree, beside it: what a hostile name aims at.
fn bait(ws: &Workspace) -> PathBuf {
    let outside = ws.scratch("outside");
    std::fs::create_dir_all(&outside).expect("outside dir");
    std::fs::write(outside.join("precious.txt"), b"precious\n").expect("bait");
    std::fs::write(ws.scratch("precious.txt"), b"precious too\n").expect("bait");
    outside
}

/// The disk bytes of every image, as `qemu-img convert` reads them.
fn flattened(ws: &Workspace, images: &[&str]) -> BTreeMap<String, Vec<u8>> {
    images
        .iter()
        .map(|i| (i.to_string(), ws.flatten(i)))
        .collect()
}

/// The checks every hostile mount must pass: `images` still exist and
/// read as before through their points `points` (image -> point name),
/// nothing outside the tree changed.
#[track_caller]
fn assert_unharmed(
    ws: &Workspace,
    m: &Mount,
    before_outside: &BTreeMap<PathBuf, Vec<u8>>,
    want: &BTreeMap<String, Vec<u8>>,
    points: &[(&str, &str)],
) {
    let status = status_text(&m.mnt);
    assert_eq!(
        &outside_files(ws),
        before_outside,
        "a file outside the tree changed; status:\n{status}"
    );
    for (image, point) in points {
        assert!(
            ws.img(image).exists(),
            "{image} was removed; status:\n{status}"
        );
        assert_bytes_eq(
            &format!("{point}/disk.raw"),
            &read_disk(&disk(&m.mnt, point)),
            &want[*image],
        );
    }
}

/// The scratch files beside the tree (not the tree, not the mount, not
/// the daemon logs, which grow).
fn outside_files(ws: &Workspace) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(ws.root()).expect("read_dir").flatten() {
        let p = e.path();
        if p == ws.images || p == ws.mnt || e.file_name().to_string_lossy().starts_with("daemon-") {
            continue;
        }
        if e.file_type().expect("file type").is_dir() {
            out.extend(snapshot_files(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).expect("read"));
        }
    }
    out
}

const IMAGES: [&str; 4] = ["base.qcow2", "snap1.qcow2", "leaf.qcow2", "other.qcow2"];
const POINTS: [(&str, &str); 3] = [
    ("base.qcow2", "base"),
    ("leaf.qcow2", "leaf"),
    ("other.qcow2", "other"),
];

/// The reproduction of the issue: a journal whose hidden image is a file
/// outside the tree, then one whose hidden image is a writable leaf the
/// manifest knows. Neither is acted on; the journal stays; `status` says
/// why.
#[test]
fn a_journal_that_does_not_match_the_tree_is_left_untouched() {
    let Some(ws) = workspace() else { return };
    tree(&ws);
    bait(&ws);
    let want = flattened(&ws, &IMAGES);
    for hidden in [
        "../precious.txt",
        "../outside/precious.txt",
        "other.qcow2",
        "/etc/hostname",
    ] {
        let journal = json!({"direction": "stream", "hidden": hidden, "child": "leaf.qcow2", "parent": "snap1.qcow2"});
        write_json(&ws.img(".snaptree-merge.json"), &journal);
        let before = outside_files(&ws);
        let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
            return;
        };
        let status = status_text(&m.mnt);
        assert!(
            status.contains("does not match the tree"),
            "hidden {hidden:?}: status does not report the journal:\n{status}"
        );
        assert_unharmed(&ws, &m, &before, &want, &POINTS);
        assert_eq!(
            visible(&m.mnt),
            names(&["base", "leaf", "other"]),
            "{status}"
        );
        unmount_ok(m);
        assert!(
            ws.img(".snaptree-merge.json").exists(),
            "the journal was removed"
        );
        for i in IMAGES {
            ws.check(i);
        }
    }
    // A commit whose "hidden" image is the other leaf, and a VHD patch
    // list aimed at a qcow2 leaf: refused as well.
    for journal in [
        json!({"direction": "commit", "hidden": "other.qcow2", "child": "leaf.qcow2", "parent": "snap1.qcow2"}),
        json!({"direction": "stream", "hidden": "snap1.qcow2", "child": "leaf.qcow2", "parent": "base.qcow2",
               "patches": [{"offset": 0, "hex": "00000000"}]}),
    ] {
        write_json(&ws.img(".snaptree-merge.json"), &journal);
        let before = outside_files(&ws);
        let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
            return;
        };
        assert_unharmed(&ws, &m, &before, &want, &POINTS);
        unmount_ok(m);
    }
}

/// Garbage entries are removed only when they name a hidden image inside
/// the tree, by a plain relative name.
#[test]
fn garbage_entries_outside_the_tree_or_on_visible_images_are_kept() {
    let Some(ws) = workspace() else { return };
    tree(&ws);
    bait(&ws);
    let want = flattened(&ws, &IMAGES);
    let g = |image: &str, hidden: bool| json!({"name": "g", "image": image, "parent": null, "created": 0, "hidden": hidden, "garbage": true});
    write_json(
        &ws.img(".snaptree.json"),
        &manifest(&[
            g("../precious.txt", true),
            g("../outside/precious.txt", true),
            g("other.qcow2", false),
        ]),
    );
    let before = outside_files(&ws);
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    assert_unharmed(&ws, &m, &before, &want, &POINTS);
    let status = status_text(&m.mnt);
    assert!(status.contains("garbage"), "{status}");
    unmount_ok(m);
}

/// A manifest's memory source outside the tree is not shown; `ctl
/// memory` of an outside file is refused (EACCES) and not recorded.
#[test]
fn memory_sources_outside_the_tree_are_refused() {
    let Some(ws) = workspace() else { return };
    tree(&ws);
    let outside = bait(&ws);
    let secret = outside.join("precious.txt");
    let mut entries = manifest(&[]);
    entries["points"][2]["memory"] = json!(secret.to_string_lossy());
    entries["points"][3]["memory"] = json!("../outside/precious.txt");
    write_json(&ws.img(".snaptree.json"), &entries);
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    for p in ["leaf", "other"] {
        assert!(
            !m.mnt.join(p).join("memory.raw").exists(),
            "{p}/memory.raw shows a file outside the tree"
        );
    }
    let status = status_text(&m.mnt);
    assert!(status.contains("outside the tree"), "{status}");
    ctl_ok(&m.mnt, "leaf", "memory none");
    assert_errno(
        "memory of a file outside the tree",
        ctl(&m.mnt, "leaf", &format!("memory {}", secret.display())),
        libc::EACCES,
    );
    assert_errno(
        "checkpoint of a file outside the tree",
        ctl(&m.mnt, "leaf", &format!("checkpoint {}", secret.display())),
        libc::EACCES,
    );
    assert!(!m.mnt.join("leaf/memory.raw").exists());
    unmount_ok(m);
    let text = std::fs::read_to_string(ws.img(".snaptree.json")).expect("manifest");
    assert!(
        !text.contains(secret.to_string_lossy().as_ref()),
        "the refused source was recorded:\n{text}"
    );
    // `other` keeps naming its (refused) source: nothing is lost.
    assert!(text.contains("../outside/precious.txt"), "{text}");
}

/// Names from the manifest pass the same check as `ctl` names: invalid
/// and duplicate ones fall back to the file stem, and `status` lists them.
#[test]
fn invalid_and_duplicate_manifest_names_fall_back_to_stems() {
    let Some(ws) = workspace() else { return };
    for i in ["a", "b", "c", "d", "e"] {
        ws.create_qcow2(&format!("{i}.qcow2"), MIB, None, "");
    }
    let p = |name: &str, image: &str| json!({"name": name, "image": image, "parent": null, "created": 0});
    write_json(
        &ws.img(".snaptree.json"),
        &json!({"version": 1, "points": [
            p("../../etc", "a.qcow2"), p("tree", "b.qcow2"), p(".", "c.qcow2"),
            p("base", "d.qcow2"), p("base", "e.qcow2"),
        ]}),
    );
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let status = status_text(&m.mnt);
    assert_eq!(
        visible(&m.mnt),
        names(&["a", "b", "c", "base", "e"]),
        "{status}"
    );
    for bad in ["\"../../etc\"", "\"tree\"", "\".\"", "as another image is"] {
        assert!(
            status.contains(bad),
            "status does not list {bad}:\n{status}"
        );
    }
    assert!(!status.contains("Some("), "debug text in status:\n{status}");
    // ctl names get the same check, also invalid UTF-8 and bidi controls.
    for bad in ["x\u{202e}gpj", "..", "tree"] {
        assert_errno(
            &format!("snapshot {bad:?}"),
            ctl(&m.mnt, "a", &format!("snapshot {bad}")),
            libc::EINVAL,
        );
    }
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(m.mnt.join("a/ctl"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"snapshot bad\xff\xfe"));
    assert_errno("snapshot with invalid UTF-8", raw, libc::EINVAL);
    unmount_ok(m);
}

/// Symlinks in the tree directory are not used as images and are listed
/// in `status`, as are manifest entries naming images outside the tree.
#[test]
fn symlinks_and_outside_entries_are_reported() {
    let Some(ws) = workspace() else { return };
    tree(&ws);
    let outside = bait(&ws);
    std::fs::copy(ws.img("base.qcow2"), outside.join("elsewhere.qcow2")).expect("copy");
    std::os::unix::fs::symlink(outside.join("elsewhere.qcow2"), ws.img("linked.qcow2"))
        .expect("symlink");
    write_json(
        &ws.img(".snaptree.json"),
        &manifest(&[
            json!({"name": "far", "image": "../outside/elsewhere.qcow2", "parent": null, "created": 0}),
        ]),
    );
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let status = status_text(&m.mnt);
    assert!(status.contains("linked.qcow2: a symbolic link"), "{status}");
    assert!(status.contains("\"far\" ignored"), "{status}");
    assert_eq!(
        visible(&m.mnt),
        names(&["base", "leaf", "other"]),
        "{status}"
    );
    unmount_ok(m);
    let text = std::fs::read_to_string(ws.img(".snaptree.json")).expect("manifest");
    assert!(
        text.contains("elsewhere.qcow2"),
        "the entry was dropped:\n{text}"
    );
}

/// Random journals and manifests whose names use `..`, absolute paths,
/// symlinks, FIFOs, other images' names, and huge or duplicate entries.
/// After each mount: nothing outside the tree changed, no image the
/// manifest does not mark as hidden was deleted, and every visible point
/// reads what `qemu-img convert` of its image reads.
#[test]
fn fuzzed_journals_and_manifests_harm_nothing() {
    let Some(ws) = workspace() else { return };
    let rounds: usize = std::env::var("SNAPTREE_HOSTILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seed = seed();
    eprintln!("fuzzed_journals_and_manifests_harm_nothing: seed {seed}, {rounds} rounds");
    let mut rng = SmallRng::seed_from_u64(seed);
    tree(&ws);
    let outside = bait(&ws);
    std::os::unix::fs::symlink(outside.join("precious.txt"), ws.img("link-out")).expect("symlink");
    std::os::unix::fs::symlink("leaf.qcow2", ws.img("link-leaf")).expect("symlink");
    let fifo = std::ffi::CString::new(ws.img("fifo").to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a valid path.
    unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) };
    let want = flattened(&ws, &IMAGES);
    let abs_leaf = ws.img("leaf.qcow2").to_string_lossy().into_owned();
    let abs_secret = outside.join("precious.txt").to_string_lossy().into_owned();
    let pool: Vec<String> = [
        "../precious.txt",
        "../outside/precious.txt",
        "link-out",
        "link-leaf",
        "fifo",
        "leaf.qcow2",
        "other.qcow2",
        "base.qcow2",
        "snap1.qcow2",
        "./leaf.qcow2",
        "sub/../other.qcow2",
        "",
        ".",
        "..",
        "/",
        &abs_leaf,
        &abs_secret,
        ".snaptree.json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let pick = |rng: &mut SmallRng| pool[rng.gen_range(0..pool.len())].clone();
    for round in 0..rounds {
        // The journal.
        if rng.gen_bool(0.8) {
            let dir = ["stream", "commit", "sideways"][rng.gen_range(0..3)];
            let mut j = json!({"direction": dir, "hidden": pick(&mut rng), "child": pick(&mut rng),
                               "parent": if rng.gen_bool(0.5) { json!(pick(&mut rng)) } else { Value::Null }});
            if rng.gen_bool(0.2) {
                j["patches"] = json!([{"offset": rng.gen_range(0..4096u64), "hex": "deadbeef"}]);
            }
            if rng.gen_bool(0.2) {
                j["hidden_id"] = json!("00112233445566778899aabbccddeeff");
            }
            write_json(&ws.img(".snaptree-merge.json"), &j);
        }
        // The manifest: the real entries (each perhaps with a hostile
        // field), plus hostile extra ones, some huge, some duplicates.
        let mut m = manifest(&[]);
        for i in 0..4 {
            match rng.gen_range(0..6) {
                0 => m["points"][i]["memory"] = json!(pick(&mut rng)),
                1 => m["points"][i]["name"] = json!(pick(&mut rng)),
                2 => m["points"][i]["disk"] = json!(pick(&mut rng)),
                _ => {}
            }
        }
        for _ in 0..rng.gen_range(0..6) {
            let name = if rng.gen_bool(0.1) {
                "x".repeat(100_000)
            } else {
                pick(&mut rng)
            };
            m["points"].as_array_mut().unwrap().push(json!({
                "name": name, "image": pick(&mut rng), "parent": null, "created": 0,
                "hidden": rng.gen_bool(0.5), "garbage": rng.gen_bool(0.5),
                "memory": if rng.gen_bool(0.3) { json!(pick(&mut rng)) } else { Value::Null },
            }));
        }
        write_json(&ws.img(".snaptree.json"), &m);
        let hidden_in_manifest: Vec<String> = m["points"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["hidden"] == json!(true))
            .filter_map(|p| p["image"].as_str().map(str::to_string))
            .collect();
        let before = outside_files(&ws);
        let Some(mnt) = ws.mount(&["-o", "gc_idle=off"]) else {
            return;
        };
        let status = status_text(&mnt.mnt);
        assert_eq!(
            outside_files(&ws),
            before,
            "round {round}: outside changed\n{status}"
        );
        for image in ["base.qcow2", "leaf.qcow2", "other.qcow2"] {
            if hidden_in_manifest.iter().any(|h| h == image) {
                continue;
            }
            assert!(
                ws.img(image).exists(),
                "round {round}: {image} removed\n{status}"
            );
        }
        // Every visible point reads what its image reads.
        for p in visible(&mnt.mnt) {
            let i = info(&mnt.mnt, &p);
            let Some(disks) = i["disks"].as_object() else {
                continue;
            };
            for (d, v) in disks {
                let image = v["image"].as_str().unwrap_or_default();
                let file = Path::new(image)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if let Some(w) = want.get(&file) {
                    let got = read_disk(&mnt.mnt.join(&p).join(format!("{d}.raw")));
                    assert_bytes_eq(&format!("round {round}: {p}/{d}.raw"), &got, w);
                }
            }
        }
        drop(mnt);
        // Start the next round from the real tree again.
        let _ = std::fs::remove_file(ws.img(".snaptree-merge.json"));
        for i in IMAGES {
            assert!(
                ws.img(i).exists() || hidden_in_manifest.iter().any(|h| h == i),
                "round {round}: {i}"
            );
        }
        if IMAGES.iter().any(|i| !ws.img(i).exists()) {
            // A hidden image went (the manifest allowed it): rebuild.
            for i in IMAGES {
                let _ = std::fs::remove_file(ws.img(i));
            }
            tree(&ws);
        }
    }
}
