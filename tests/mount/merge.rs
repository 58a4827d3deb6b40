//! The merge engine through the mount (ARCHITECTURE.md, "The merge
//! invariant"): `merge-now`, `ctl merge` and the background merge coalesce a
//! hidden point with exactly one child, in whichever direction copies less,
//! while every visible point reads the same bytes. Each test judges the
//! result with `qemu-img` (check, `info --backing-chain`, convert), the
//! image files left in the tree, `.snaptree.json`, and a remount.
//!
//! Mounts use `-o gc_idle=off` so only the test decides when merges run,
//! except the test of the background merge itself.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

/// Mount options of the deterministic tests: no background merge.
const NO_GC: [&str; 2] = ["-o", "gc_idle=off"];

/// Writes `1` to `MNT/merge-now` in one `write(2)`; `Err` carries the
/// errno of the open or the write.
pub(crate) fn merge_now(mnt: &Path) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(mnt.join("merge-now"))?;
    let n = f.write(b"1\n")?;
    assert_eq!(n, 2, "short write to merge-now");
    Ok(())
}

/// [`merge_now`], which must succeed (else the panic shows `status`).
#[track_caller]
pub(crate) fn merge_now_ok(mnt: &Path) {
    if let Err(e) = merge_now(mnt) {
        panic!("merge-now failed: {e}\nstatus:\n{}", status_text(mnt));
    }
}

/// What reading `MNT/merge-now` says: the last merge's result.
fn last_merge(mnt: &Path) -> String {
    read_text(&mnt.join("merge-now"))
}

/// `chain_depth` of point `p`'s disk, from its `info.json`.
fn depth(mnt: &Path, p: &str) -> u64 {
    let i = info(mnt, p);
    i["disks"]["disk"]["chain_depth"]
        .as_u64()
        .unwrap_or_else(|| panic!("{p}/info.json has no chain_depth: {i}"))
}

/// The file names of `images/<image>`'s backing chain, leaf first, as
/// `qemu-img info --backing-chain` reports them.
fn qemu_chain(ws: &Workspace, image: &str) -> Vec<String> {
    let o = ws.qemu_img(&["info", "-U", "--backing-chain", "--output=json", image]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("qemu-img info json");
    v.as_array()
        .expect("--backing-chain gives an array")
        .iter()
        .map(|e| {
            let f = e["filename"].as_str().expect("filename");
            Path::new(f)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect()
}

/// The point names `.snaptree.json` lists.
fn manifest_names(ws: &Workspace) -> BTreeSet<String> {
    let path = ws.img(".snaptree.json");
    let v: Value = serde_json::from_str(&read_text(&path)).expect("manifest json");
    v["points"]
        .as_array()
        .expect("manifest points")
        .iter()
        .map(|p| p["name"].as_str().expect("point name").to_string())
        .collect()
}

/// The tree after a merge, on disk: exactly these qcow2 images, all
/// passing `qemu-img check`, `leaf`'s backing chain as given, the
/// manifest naming exactly `points`, and no merge journal left.
#[track_caller]
fn assert_tree_files(ws: &Workspace, images: &[&str], leaf_chain: &[&str], points: &[&str]) {
    assert_eq!(ws.qcow2_images(), images, "image files");
    ws.check_all();
    assert_eq!(qemu_chain(ws, leaf_chain[0]), leaf_chain, "backing chain");
    assert_eq!(manifest_names(ws), names(points), ".snaptree.json points");
    assert_no_journal(ws, "the merge");
}

/// [`assert_tree_files`] of `base.qcow2 <- leaf.qcow2`: what is left of
/// [`three_chain`] once `mid` is merged.
#[track_caller]
fn assert_base_leaf_files(ws: &Workspace) {
    assert_tree_files(
        ws,
        &["base.qcow2", "leaf.qcow2"],
        &["leaf.qcow2", "base.qcow2"],
        &["base", "leaf"],
    );
}

/// No merge journal in the tree (`by`: what would have left it).
#[track_caller]
fn assert_no_journal(ws: &Workspace, by: &str) {
    assert!(
        !ws.img(".snaptree-merge.json").exists(),
        "merge journal left behind by {by}"
    );
}

/// Which way a merge must have copied.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    /// The child into the hidden point (`committing the child`).
    Commit,
    /// The hidden point into the child.
    Stream,
    /// Either (not checked).
    Any,
}

impl Way {
    /// [`Way::Commit`] if `commit`, else [`Way::Stream`].
    fn commit_if(commit: bool) -> Way {
        if commit {
            Way::Commit
        } else {
            Way::Stream
        }
    }
}

/// `last` (what `merge-now` says) reports that `hidden` was merged into
/// `child` the `way` given.
#[track_caller]
fn assert_merged(last: &str, hidden: &str, child: &str, way: Way) {
    assert!(
        last.starts_with(&format!("ok: merged \"{hidden}\" into \"{child}\"")),
        "merge-now: {last:?}"
    );
    if way != Way::Any {
        assert_eq!(
            last.contains("committing the child"),
            way == Way::Commit,
            "direction (want {way:?}): {last:?}"
        );
    }
}

/// [`merge_now_ok`], which must merge `hidden` into `child` the `way`
/// given ([`assert_merged`]); returns what it said.
#[track_caller]
fn merge_now_merges(mnt: &Path, hidden: &str, child: &str, way: Way) -> String {
    merge_now_ok(mnt);
    let last = last_merge(mnt);
    assert_merged(&last, hidden, child, way);
    last
}

/// The mount shows exactly the points `shown`, and each `(point, depth,
/// bytes)` of `points` has that chain depth and reads those bytes.
#[track_caller]
fn assert_points(mnt: &Path, shown: &[&str], points: &[(&str, u64, &[u8])]) {
    assert_eq!(visible(mnt), names(shown), "visible points");
    for &(p, d, bytes) in points {
        assert_eq!(depth(mnt, p), d, "chain depth of {p}");
        assert_disk(mnt, p, bytes);
    }
}

/// `mid` of [`three_chain`] merged into `leaf`: `base` and `leaf` shown,
/// the leaf at depth 2 reading `leaf_bytes`, [`assert_base_leaf_files`].
#[track_caller]
fn assert_mid_merged(ws: &Workspace, mnt: &Path, leaf_bytes: &[u8]) {
    assert_points(mnt, &["base", "leaf"], &[("leaf", 2, leaf_bytes)]);
    assert_base_leaf_files(ws);
}

/// [`assert_mid_merged`], then unmounts `m` and compares `leaf.qcow2`
/// with `leaf_bytes`.
#[track_caller]
fn assert_mid_merged_then_unmount(ws: &Workspace, m: Mount, leaf_bytes: &[u8]) {
    assert_mid_merged(ws, &m.mnt, leaf_bytes);
    unmount_ok(m);
    ws.compare("leaf.qcow2", leaf_bytes);
}

/// `mid` of [`three_chain`] hidden but not merged: still hidden in `tree`,
/// `base` and `leaf` shown, the leaf at depth 3 reading `leaf_bytes`,
/// mid.qcow2 byte for byte `mid_file` and no merge journal.
#[track_caller]
fn assert_mid_left_alone(ws: &Workspace, mnt: &Path, leaf_bytes: &[u8], mid_file: &[u8]) {
    let tree = tree_text(mnt);
    assert!(tree_shows_hidden(&tree, "mid"), "mid not hidden:\n{tree}");
    assert_points(mnt, &["base", "leaf"], &[("leaf", 3, leaf_bytes)]);
    assert_mid_file_is(ws, mid_file);
    assert_no_journal(ws, "a merge that was not done");
}

/// mid.qcow2 is byte for byte `mid_file`.
#[track_caller]
fn assert_mid_file_is(ws: &Workspace, mid_file: &[u8]) {
    assert!(
        std::fs::read(ws.img("mid.qcow2")).expect("read mid.qcow2") == mid_file,
        "mid.qcow2 changed by a merge that was not done"
    );
}

/// `leaf`'s backing chain still goes through `mid` (qemu-img).
#[track_caller]
fn assert_mid_still_in_chain(ws: &Workspace) {
    assert_eq!(
        qemu_chain(ws, "leaf.qcow2"),
        ["leaf.qcow2", "mid.qcow2", "base.qcow2"],
        "backing chain"
    );
}

/// qcow2 images of `size` bytes, base first, each backed by the one
/// before it and written with its qemu-io commands (if any).
fn qcow2_chain(ws: &Workspace, size: u64, layers: &[(&str, &[&str])]) {
    let mut backing = None;
    for &(name, cmds) in layers {
        ws.create_qcow2(name, size, backing.map(|b| (b, "qcow2")), "");
        if !cmds.is_empty() {
            ws.qemu_io(name, "qcow2", cmds);
        }
        backing = Some(name);
    }
}

/// `base.qcow2 <- mid.qcow2 <- leaf.qcow2` of `size` bytes, each written
/// with its qemu-io commands.
fn three_chain(ws: &Workspace, size: u64, base: &[&str], mid: &[&str], leaf: &[&str]) {
    qcow2_chain(
        ws,
        size,
        &[
            ("base.qcow2", base),
            ("mid.qcow2", mid),
            ("leaf.qcow2", leaf),
        ],
    );
}

/// [`workspace`] holding the [`three_chain`] of `size` bytes.
fn three_chain_workspace(
    size: u64,
    base: &[&str],
    mid: &[&str],
    leaf: &[&str],
) -> Option<Workspace> {
    let ws = workspace()?;
    three_chain(&ws, size, base, mid, leaf);
    Some(ws)
}

/// Whether `tool --version` runs here.
fn have_tool(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Hidden `mid` under a leaf, merged by `merge-now` in the direction its
/// size asks for; everything a merge promises is checked, then again
/// after a remount.
fn merge_hidden_mid(commit: bool) {
    const S: u64 = 16 * MIB;
    let base = ["write -P 0x11 0 4M", "write -P 0x12 10M 1M"];
    let (mid, leaf): (&[&str], &[&str]) = if commit {
        // mid holds 12 MiB, the leaf a little (with a zero range over
        // mid's data, which the commit must carry into mid).
        (
            &["write -P 0x21 0 12M"],
            &[
                "write -P 0x31 1M 256K",
                "write -P 0x32 9437307 5000",
                "write -z 2M 512K",
            ],
        )
    } else {
        // mid holds a little (with a zero range over base's data, which
        // must reach the leaf), the leaf 10 MiB.
        (
            &[
                "write -P 0x21 4M 256K",
                "write -P 0x22 11M 64K",
                "write -z 3M 512K",
            ],
            &["write -P 0x31 5M 10M"],
        )
    };
    let Some(ws) = three_chain_workspace(S, &base, mid, leaf) else {
        return;
    };
    let base_bytes = ws.flatten("base.qcow2");
    let mut model = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&NO_GC) else { return };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "mid", "delete");
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));
    assert_eq!(depth(&mnt, "leaf"), 3);
    assert!(ws.img("mid.qcow2").exists(), "mid.qcow2 gone before merge");
    // A descriptor opened before the merge goes on writing after it.
    let early = open_rw(&mnt, "leaf").expect("open leaf rw");

    merge_now_merges(&mnt, "mid", "leaf", Way::commit_if(commit));
    let status = status_text(&mnt);
    assert!(
        status.contains("last merge: ok: merged \"mid\""),
        "status:\n{status}"
    );
    let both = [("leaf", 2, &model[..]), ("base", 1, &base_bytes[..])];
    assert_points(&mnt, &["base", "leaf"], &both);
    assert_eq!(parent_link(&mnt, "leaf").as_deref(), Some("../base"));
    assert_base_leaf_files(&ws);

    write_both(&early, &mut model, 3 * MIB + 17, &pattern(1, 300_000));
    write_both(&early, &mut model, 0, &pattern(2, 4096));
    early.sync_all().expect("fsync leaf");
    assert_disk(&mnt, "leaf", &model);
    drop(early);
    unmount_ok(m);
    ws.check_all();
    ws.compare("leaf.qcow2", &model);
    ws.compare("base.qcow2", &base_bytes);

    let m = ws.remount(&NO_GC);
    let both = [("leaf", 2, &model[..]), ("base", 1, &base_bytes[..])];
    assert_points(&m.mnt, &["base", "leaf"], &both);
    assert!(
        !tree_text(&m.mnt).contains("mid"),
        "tree:\n{}",
        tree_text(&m.mnt)
    );
    unmount_ok(m);
}

#[test]
fn merge_now_commits_a_small_leaf_into_a_big_hidden_parent() {
    merge_hidden_mid(true);
}

#[test]
fn merge_now_streams_a_small_hidden_parent_into_its_leaf() {
    merge_hidden_mid(false);
}

/// `base <- a <- b <- c`, `a` hidden and merged into `b` (not a leaf):
/// `b` and `c` read the same, and `c`'s chain is `c <- b <- base`.
#[test]
fn merging_into_a_child_with_children_keeps_the_chain_below() {
    for a_big in [true, false] {
        let Some(ws) = workspace() else {
            return;
        };
        let a_cmds: &[&str] = if a_big {
            &["write -P 0x21 0 8M"]
        } else {
            &["write -P 0x21 1M 128K", "write -z 3M 64K"]
        };
        let b_cmds = [
            "write -P 0x31 2M 1M",
            "write -z 5M 64K",
            "write -P 0x32 12M 4097",
        ];
        qcow2_chain(
            &ws,
            16 * MIB,
            &[
                ("base.qcow2", &["write -P 0x11 0 4M"]),
                ("a.qcow2", a_cmds),
                ("b.qcow2", &b_cmds),
                ("c.qcow2", &["write -P 0x41 3M 64K"]),
            ],
        );
        let b_bytes = ws.flatten("b.qcow2");
        let mut c_bytes = ws.flatten("c.qcow2");
        let Some(m) = ws.mount(&NO_GC) else { return };
        let mnt = m.mnt.clone();
        ctl_ok(&mnt, "a", "delete");
        assert_eq!(visible(&mnt), names(&["base", "b", "c"]));
        assert_eq!(depth(&mnt, "c"), 4);

        merge_now_merges(&mnt, "a", "b", Way::commit_if(a_big));
        let b_and_c = [("b", 2, &b_bytes[..]), ("c", 3, &c_bytes[..])];
        assert_points(&mnt, &["base", "b", "c"], &b_and_c);
        assert_eq!(parent_link(&mnt, "b").as_deref(), Some("../base"));
        assert_eq!(parent_link(&mnt, "c").as_deref(), Some("../b"));
        assert_tree_files(
            &ws,
            &["b.qcow2", "base.qcow2", "c.qcow2"],
            &["c.qcow2", "b.qcow2", "base.qcow2"],
            &["base", "b", "c"],
        );
        // The leaf below goes on being writable over the new b.
        {
            let f = open_rw(&mnt, "c").expect("open c rw");
            write_both(&f, &mut c_bytes, 2 * MIB - 5, &pattern(3, 70_000));
            f.sync_all().expect("fsync c");
        }
        assert_disk(&mnt, "c", &c_bytes);
        assert_disk(&mnt, "b", &b_bytes);
        unmount_ok(m);
        ws.check_all();
        ws.compare("b.qcow2", &b_bytes);
        ws.compare("c.qcow2", &c_bytes);

        let m = ws.remount(&NO_GC);
        let b_and_c = [("b", 2, &b_bytes[..]), ("c", 3, &c_bytes[..])];
        assert_points(&m.mnt, &["base", "b", "c"], &b_and_c);
        unmount_ok(m);
    }
}

/// A hidden root with one child: the child becomes standalone (no
/// backing file) with the same bytes, in either direction.
#[test]
fn merging_a_hidden_root_leaves_a_standalone_child() {
    for base_big in [true, false] {
        let Some(ws) = workspace() else {
            return;
        };
        let (base_cmds, leaf_cmds): (&[&str], &[&str]) = if base_big {
            (
                &["write -P 0x11 0 10M", "write -z 12M 1M"],
                &["write -P 0x21 1M 64K", "write -z 2M 64K"],
            )
        } else {
            (
                &["write -P 0x11 1M 128K", "write -z 6M 64K"],
                &["write -P 0x21 4M 6M", "write -z 1M 64K"],
            )
        };
        qcow2_chain(
            &ws,
            16 * MIB,
            &[("base.qcow2", base_cmds), ("leaf.qcow2", leaf_cmds)],
        );
        let leaf_bytes = ws.flatten("leaf.qcow2");
        let Some(m) = ws.mount(&NO_GC) else { return };
        let mnt = m.mnt.clone();
        ctl_ok(&mnt, "base", "delete");
        assert_eq!(visible(&mnt), names(&["leaf"]));
        assert_eq!(depth(&mnt, "leaf"), 2);

        merge_now_merges(&mnt, "base", "leaf", Way::commit_if(base_big));
        assert_points(&mnt, &["leaf"], &[("leaf", 1, &leaf_bytes)]);
        assert_eq!(parent_link(&mnt, "leaf"), None);
        assert_tree_files(&ws, &["leaf.qcow2"], &["leaf.qcow2"], &["leaf"]);
        let o = ws.qemu_img(&["info", "-U", "--output=json", "leaf.qcow2"]);
        let v: Value = serde_json::from_slice(&o.stdout).expect("qemu-img info json");
        assert!(
            v.get("backing-filename").is_none(),
            "leaf.qcow2 still has a backing file: {v}"
        );
        unmount_ok(m);
        ws.check_all();
        ws.compare("leaf.qcow2", &leaf_bytes);
        let m = ws.remount(&NO_GC);
        assert_points(&m.mnt, &["leaf"], &[("leaf", 1, &leaf_bytes)]);
        unmount_ok(m);
    }
}

/// A clone keeps its hidden parent: `merge-now` leaves it (and says so)
/// until one of the two children is deleted.
#[test]
fn a_hidden_point_with_two_children_waits_for_one_to_go() {
    let Some(ws) = three_chain_workspace(
        16 * MIB,
        &["write -P 0x11 0 4M"],
        &["write -P 0x21 1M 2M"],
        &["write -P 0x31 2M 64K"],
    ) else {
        return;
    };
    let leaf_bytes = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&NO_GC) else { return };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "mid", "clone c");
    {
        let f = open_rw(&mnt, "c").expect("open c rw");
        let mut c_bytes = read_disk(&disk(&mnt, "c"));
        write_both(&f, &mut c_bytes, 5 * MIB, &pattern(4, 100_000));
    }
    let c_bytes = read_disk(&disk(&mnt, "c"));
    ctl_ok(&mnt, "mid", "delete");
    assert_eq!(visible(&mnt), names(&["base", "leaf", "c"]));

    merge_now_ok(&mnt);
    let last = last_merge(&mnt);
    assert!(
        last.starts_with("ok: nothing to merge") && last.contains("left hidden: \"mid\""),
        "merge-now: {last:?}"
    );
    assert!(ws.img("mid.qcow2").exists(), "mid.qcow2 removed");
    let leaf_and_c = [("leaf", 3, &leaf_bytes[..]), ("c", 3, &c_bytes[..])];
    assert_points(&mnt, &["base", "leaf", "c"], &leaf_and_c);
    ws.check_all();

    ctl_ok(&mnt, "c", "delete");
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));
    assert!(ws.img("mid.qcow2").exists(), "mid.qcow2 removed with c");
    let last = merge_now_merges(&mnt, "mid", "leaf", Way::Any);
    assert!(!last.contains("left hidden"), "merge-now: {last:?}");
    assert_mid_merged_then_unmount(&ws, m, &leaf_bytes);
}

/// `echo merge > MNT/mid/ctl` = delete, then coalesce, in one command;
/// on a hidden-to-be root it leaves the leaf standalone.
#[test]
fn ctl_merge_deletes_and_coalesces_in_one_command() {
    let Some(ws) = three_chain_workspace(
        16 * MIB,
        &["write -P 0x11 0 4M"],
        &["write -P 0x21 1M 2M"],
        &["write -P 0x31 2M 64K"],
    ) else {
        return;
    };
    let leaf_bytes = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&NO_GC) else { return };
    let mnt = m.mnt.clone();
    merge_now_ok(&mnt);
    assert_eq!(last_merge(&mnt), "ok: nothing to merge\n");

    ctl_ok(&mnt, "mid", "merge");
    let status = status_text(&mnt);
    assert!(
        status.contains("last command: mid/ctl: merge: ok"),
        "status:\n{status}"
    );
    assert_merged(&last_merge(&mnt), "mid", "leaf", Way::Any);
    assert_errno(
        "stat of the merged point",
        std::fs::metadata(mnt.join("mid")),
        libc::ENOENT,
    );
    assert_mid_merged(&ws, &mnt, &leaf_bytes);

    ctl_ok(&mnt, "base", "merge");
    assert_points(&mnt, &["leaf"], &[("leaf", 1, &leaf_bytes)]);
    assert_tree_files(&ws, &["leaf.qcow2"], &["leaf.qcow2"], &["leaf"]);
    unmount_ok(m);
    ws.compare("leaf.qcow2", &leaf_bytes);
}

/// A leaf written by fio (verifying what it wrote as it goes) while
/// `merge-now` commits it into its big hidden parent: pre-copy passes,
/// then a short writer pause for the last pass and the rename.
#[test]
fn leaf_coalesce_under_a_running_fio_writer() {
    if !have_tool("fio") {
        skip("fio not found (CI installs it: apt-get install fio)");
        return;
    }
    let Some(ws) = workspace() else {
        return;
    };
    const S: u64 = 64 * MIB;
    qcow2_chain(
        &ws,
        S,
        &[
            ("base.qcow2", &["write -P 0x11 0 4M"]),
            ("mid.qcow2", &["write -P 0x21 0 64M"]),
        ],
    );
    // 4 KiB clusters: the leaf holds only what fio wrote so far, far less
    // than mid, so the merge commits the leaf into mid.
    ws.create_qcow2(
        "leaf.qcow2",
        S,
        Some(("mid.qcow2", "qcow2")),
        "cluster_size=4096",
    );
    let Some(m) = ws.mount(&NO_GC) else { return };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "mid", "delete");
    assert_eq!(depth(&mnt, "leaf"), 3);

    let target = disk(&mnt, "leaf").to_string_lossy().into_owned();
    let size = format!("--size={S}");
    let mut fio = Command::new("fio");
    fio.args([
        "--name=merge-under-io",
        "--filename",
        &target,
        "--rw=randwrite",
        "--bs=4k",
        "--direct=1",
        "--ioengine=psync",
        &size,
        "--fallocate=none",
        // At most 16 MiB written per second, whatever the machine: the
        // leaf stays well below mid's 64 MiB when the merge is planned.
        "--rate_iops=4000",
        "--time_based",
        "--runtime=6",
        "--verify=crc32c",
        "--verify_backlog=256",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
    ])
    .current_dir(ws.root());
    let merger = {
        let mnt = mnt.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            let t = Instant::now();
            (merge_now(&mnt), t.elapsed())
        })
    };
    let out = run_with_timeout(&mut fio, Duration::from_secs(120));
    let (merged, took) = merger.join().expect("merge thread");
    let status = status_text(&mnt);
    let text = format!(
        "{}: {}\nstdout:\n{}\nstderr:\n{}\nstatus:\n{status}",
        describe(&fio),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fio failed: {text}");
    // `issued rwts: total=READS,WRITES,...`: the reads are the verifies.
    let verified: u64 = String::from_utf8_lossy(&out.stdout)
        .split("issued rwts: total=")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(verified > 0, "fio verified nothing: {text}");
    if let Err(e) = merged {
        panic!("merge-now under fio failed: {e}\n{text}");
    }
    eprintln!("merge-now under fio took {took:?}\n{status}");
    let last = last_merge(&mnt);
    assert!(
        last.starts_with("ok: merged \"mid\" into \"leaf\"")
            && last.contains("committing the child"),
        "merge-now: {last:?}\n{text}"
    );
    assert!(status.contains("merge pass 1: copied"), "{text}");
    assert!(status.contains("merge writer pause: "), "{text}");
    assert_eq!(depth(&mnt, "leaf"), 2);

    let through_mount = read_disk(&disk(&mnt, "leaf"));
    unmount_ok(m);
    assert_eq!(ws.qcow2_images(), ["base.qcow2", "leaf.qcow2"]);
    ws.check_all();
    assert_eq!(
        qemu_chain(&ws, "leaf.qcow2"),
        ["leaf.qcow2", "base.qcow2"],
        "backing chain"
    );
    ws.compare("leaf.qcow2", &through_mount);
    let m = ws.remount(&["-o", "ro"]);
    assert_disk(&m.mnt, "leaf", &through_mount);
    unmount_ok(m);
}

/// With `gc_idle=1`, a hidden point is merged in the background once the
/// mount is idle, in small throttled steps.
#[test]
fn background_merge_coalesces_when_idle() {
    let Some(ws) = three_chain_workspace(
        16 * MIB,
        &["write -P 0x11 0 4M"],
        &["write -P 0x21 1M 4M", "write -z 8M 1M"],
        &["write -P 0x31 2M 64K"],
    ) else {
        return;
    };
    let leaf_bytes = ws.flatten("leaf.qcow2");
    let base_bytes = ws.flatten("base.qcow2");
    let Some(m) = ws.mount(&["-o", "gc_idle=1,gc_step=256K,gc_pause=1"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let status = status_text(&mnt);
    assert!(
        status.contains("background merge after 1 s idle"),
        "status:\n{status}"
    );
    ctl_ok(&mnt, "mid", "delete");
    // Only `tree` and `status` are read while waiting: disk I/O would
    // hold the background merge off.
    let done = wait_until(Duration::from_secs(30), || {
        !tree_text(&mnt).contains("mid") && status_text(&mnt).contains("last merge: ok: merged")
    });
    assert!(
        done,
        "mid not merged within 30 s; tree:\n{}\nstatus:\n{}",
        tree_text(&mnt),
        status_text(&mnt)
    );
    assert_disk(&mnt, "base", &base_bytes);
    assert_mid_merged_then_unmount(&ws, m, &leaf_bytes);
}

/// On a read-only mount nothing merges: `merge-now` and `ctl merge` fail
/// with EROFS and the hidden point stays.
#[test]
fn merge_on_a_read_only_mount_is_erofs() {
    let Some(ws) = three_chain_workspace(
        8 * MIB,
        &["write -P 0x11 0 2M"],
        &["write -P 0x21 1M 2M"],
        &["write -P 0x31 2M 64K"],
    ) else {
        return;
    };
    let leaf_bytes = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&NO_GC) else { return };
    ctl_ok(&m.mnt, "mid", "delete");
    unmount_ok(m);

    let m = ws.remount(&["-o", "ro"]);
    let mnt = m.mnt.clone();
    assert_errno("merge-now on -o ro", merge_now(&mnt), libc::EROFS);
    assert_errno(
        "ctl merge on -o ro",
        ctl(&mnt, "leaf", "merge"),
        libc::EROFS,
    );
    assert!(
        !last_merge(&mnt).starts_with("ok"),
        "merge-now: {}",
        last_merge(&mnt)
    );
    assert!(ws.img("mid.qcow2").exists(), "mid.qcow2 removed");
    assert_points(&mnt, &["base", "leaf"], &[("leaf", 3, &leaf_bytes)]);
    unmount_ok(m);
    ws.check_all();
}

/// A leaf that was cloned is a snapshot with the clone as its child; once
/// its hidden parent holds less than it does, `merge-now` streams the
/// parent into it, and reopens the child as a reader (regression: it used
/// to fail with EBUSY after its commit, the child's old descriptor still
/// holding the writer lock taken while it was a leaf).
#[test]
fn stream_merge_into_a_cloned_leaf() {
    let Some(ws) = workspace() else {
        return;
    };
    qcow2_chain(
        &ws,
        16 * MIB,
        &[
            ("base.qcow2", &["write -P 0x11 0 64K"]),
            ("leaf.qcow2", &["write -P 0x21 0 4M"]),
        ],
    );
    let leaf_bytes = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&NO_GC) else { return };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "leaf", "clone c");
    ctl_ok(&mnt, "base", "delete");
    merge_now_merges(&mnt, "base", "leaf", Way::Stream);
    let status = status_text(&mnt);
    assert!(status.contains("problems: none"), "status:\n{status}");
    let leaf_and_c = [("leaf", 1, &leaf_bytes[..]), ("c", 2, &leaf_bytes[..])];
    assert_points(&mnt, &["leaf", "c"], &leaf_and_c);
    assert_tree_files(
        &ws,
        &["c.qcow2", "leaf.qcow2"],
        &["c.qcow2", "leaf.qcow2"],
        &["c", "leaf"],
    );
    unmount_ok(m);
}

/// Regression: reading `tree`, `status` and `info.json` while merges run
/// must not deadlock (a merge held the child's I/O lock while taking the
/// tree's structure lock at its commit, and `tree` took them the other way
/// round). Many merges, each with that short window, both directions.
#[test]
fn tree_files_read_during_merges() {
    const S: u64 = 16 * MIB;
    let Some(ws) = workspace() else { return };
    qcow2_chain(&ws, S, &[("base.qcow2", &[]), ("leaf.qcow2", &[])]);
    let Some(m) = ws.mount(&NO_GC) else { return };
    let mnt = m.mnt.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (mnt, stop) = (mnt.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::read(mnt.join("tree"));
                let _ = std::fs::read(mnt.join("status"));
                let _ = std::fs::read(mnt.join("leaf/info.json"));
                n += 1;
            }
            n
        })
    };
    let mut model = ws.flatten("leaf.qcow2");
    let leaf = open_rw(&mnt, "leaf").expect("open leaf");
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    let worker = {
        let mnt = mnt.clone();
        std::thread::spawn(move || {
            for i in 0..40u64 {
                // Odd rounds: the snapshot holds less than the leaf will, so
                // it is streamed into the leaf; even rounds: committed.
                let name = format!("s{i}");
                ctl_ok(&mnt, "leaf", &format!("snapshot {name}"));
                let _ = tx.send(Some(name.clone()));
                ctl_ok(&mnt, &name, "delete");
                if let Err(e) = merge_now(&mnt) {
                    panic!("merge-now {i}: {e}\n{}", status_text(&mnt));
                }
            }
            let _ = tx.send(None);
        })
    };
    let mut round = 0u64;
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(_)) => {
                let len = if round % 2 == 1 { 3 * MIB } else { 64 * 1024 };
                let off = (round * 997 * 4096) % (S - len);
                write_both(&leaf, &mut model, off, &pattern(round, len as usize));
                round += 1;
            }
            Ok(None) => break,
            Err(_) => panic!("a merge did not finish within 60 s (deadlock?)"),
        }
    }
    worker.join().expect("merge thread");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader thread");
    assert!(reads > 0, "the reader never completed a round");
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));
    assert_disk(&mnt, "leaf", &model);
    drop(leaf);
    unmount_ok(m);
    ws.check_all();
}

/// Whether `MNT/tree` text shows point `p` as hidden.
fn tree_shows_hidden(tree: &str, p: &str) -> bool {
    tree.lines()
        .any(|l| l.contains(&format!("{p} ")) && l.contains("hidden"))
}

/// A tmpfs mounted on a directory of the test, unmounted when dropped
/// (also while the test panics; declare it before the [`Mount`] guard so
/// the FUSE mount goes first).
struct Tmpfs {
    dir: std::path::PathBuf,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs DIR`; `Err` with mount's output
    /// when the machine does not let the test mount (then it skips).
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        let mut c = Command::new("mount");
        c.args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir);
        let o = run_unchecked(&mut c);
        if !o.status.success() {
            return Err(format!(
                "{}: {}",
                describe(&c),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// `mount -o remount,size=SIZE DIR` (must succeed).
    fn resize(&self, size: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir));
    }

    /// Bytes an unprivileged writer may still allocate (`f_bavail`).
    fn free(&self) -> u64 {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).expect("path");
        // SAFETY: statvfs fills the struct we own from a valid path.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0, "statvfs");
        s.f_bavail as u64 * s.f_frsize as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let o = run_with_timeout(
            Command::new("umount").arg(&self.dir),
            Duration::from_secs(20),
        );
        if !o.status.success() {
            eprintln!(
                "umount {} failed ({}); trying umount -l",
                self.dir.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            let _ = run_with_timeout(
                Command::new("umount").arg("-l").arg(&self.dir),
                Duration::from_secs(20),
            );
        }
    }
}

/// A tree on a filesystem too small for the copy: `merge-now` refuses
/// before writing anything (ENOSPC, the estimate in `status`), the hidden
/// point stays for a retry, and the retry works once there is room.
#[test]
fn merge_refused_without_free_space() {
    let Some(ws) = workspace() else {
        return;
    };
    // The tree directory itself is the small file system (still empty).
    let fs = match Tmpfs::mount(&ws.images, "72M") {
        Ok(fs) => fs,
        Err(why) => {
            skip(&format!("cannot mount a tmpfs for the tree: {why}"));
            return;
        }
    };
    const S: u64 = 64 * MIB;
    // mid holds 24 MiB, the leaf 28 MiB elsewhere: mid is streamed into
    // the leaf, a copy of 24 MiB (the engine asks for 24 + 1.5 + 16 MiB).
    three_chain(
        &ws,
        S,
        &["write -P 0x11 0 1M"],
        &["write -P 0x21 1M 24M"],
        &["write -P 0x31 26M 28M"],
    );
    let free = fs.free();
    assert!(
        free < 20 * MIB,
        "{} bytes free on the tmpfs: too many for this test",
        free
    );
    let leaf_bytes = ws.flatten("leaf.qcow2");
    let base_bytes = ws.flatten("base.qcow2");
    let mid_file = std::fs::read(ws.img("mid.qcow2")).expect("read mid.qcow2");
    let Some(m) = ws.mount(&NO_GC) else { return };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "mid", "delete");
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));

    assert_errno("merge-now on a full disk", merge_now(&mnt), libc::ENOSPC);
    let status = status_text(&mnt);
    assert!(
        status.contains("not enough free space"),
        "status:\n{status}"
    );
    let last = last_merge(&mnt);
    assert!(
        last.starts_with("error: merging \"mid\" into \"leaf\"")
            && last.contains("not enough free space"),
        "merge-now: {last:?}"
    );
    assert!(
        status.contains("merge queue: \"mid\""),
        "mid left the merge queue:\n{status}"
    );
    assert_mid_left_alone(&ws, &mnt, &leaf_bytes, &mid_file);
    assert_disk(&mnt, "base", &base_bytes);
    unmount_ok(m);
    assert_eq!(
        ws.qcow2_images(),
        ["base.qcow2", "leaf.qcow2", "mid.qcow2"],
        "image files"
    );
    ws.check_all();
    ws.compare("leaf.qcow2", &leaf_bytes);
    assert_mid_still_in_chain(&ws);
    assert_no_journal(&ws, "a refused merge");

    // With room, the same hidden point merges.
    fs.resize("160M");
    let m = ws.remount(&NO_GC);
    let mnt = m.mnt.clone();
    let tree = tree_text(&mnt);
    assert!(
        tree_shows_hidden(&tree, "mid"),
        "mid not hidden after remount:\n{tree}"
    );
    merge_now_merges(&mnt, "mid", "leaf", Way::Stream);
    assert_mid_merged_then_unmount(&ws, m, &leaf_bytes);
    drop(fs);
}

/// Another process (`qemu-storage-daemon`) with an image open for
/// writing, killed when dropped.
struct OtherHolder {
    child: std::process::Child,
}

impl OtherHolder {
    /// Stops the process and waits for it (its locks go with it).
    fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OtherHolder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A hidden image that another process holds open for writing (a running
/// VM, here `qemu-storage-daemon`): the mount says so in `status`, and
/// `merge-now` leaves it hidden and untouched, saying why; once the other
/// process is gone, a remount merges it.
#[test]
fn merge_refused_when_another_process_holds_the_image() {
    if !have_tool("qemu-storage-daemon") {
        skip("qemu-storage-daemon not found (apt-get install qemu-system-common)");
        return;
    }
    let Some(ws) = three_chain_workspace(
        16 * MIB,
        &["write -P 0x11 0 4M"],
        &["write -P 0x21 1M 2M", "write -z 6M 64K"],
        &["write -P 0x31 2M 5M"],
    ) else {
        return;
    };
    let leaf_bytes = ws.flatten("leaf.qcow2");
    let mid = ws.img("mid.qcow2");
    let log = ws.scratch("qemu-storage-daemon.log");
    let pidfile = ws.scratch("qemu-storage-daemon.pid");
    let log_file = std::fs::File::create(&log).expect("daemon log");
    let mut qsd = Command::new("qemu-storage-daemon");
    qsd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            mid.display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=q,file=f"])
        .arg("--pidfile")
        .arg(&pidfile)
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone().expect("dup log"))
        .stderr(log_file);
    let mut holder = OtherHolder {
        child: qsd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", describe(&qsd))),
    };
    // It writes its pid file once its block devices are open, locks
    // taken. (Probing the lock with qemu-img before that could make it
    // fail to get its own.)
    let ready = wait_until(Duration::from_secs(10), || {
        pidfile.exists() || holder.child.try_wait().ok().flatten().is_some()
    });
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        ready && pidfile.exists() && holder.child.try_wait().ok().flatten().is_none(),
        "{} did not come up; its log:\n{}",
        describe(&qsd),
        log_text()
    );
    // It holds the write permission: qemu-img, which does not share
    // writes, is refused.
    let o = ws.qemu_img_unchecked(&["info", "mid.qcow2"]);
    let lock_msg = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && lock_msg.contains("\"write\" lock"),
        "qemu-storage-daemon does not hold mid.qcow2's write lock; qemu-img info: {lock_msg}\nits log: {}",
        log_text()
    );
    let mid_file = std::fs::read(&mid).expect("read mid.qcow2");

    let Some(m) = ws.mount(&NO_GC) else { return };
    let mnt = m.mnt.clone();
    let status = status_text(&mnt);
    assert!(
        status
            .lines()
            .any(|l| l.contains("mid") && l.contains("mounted without a lock")),
        "status names no lock problem for mid:\n{status}"
    );
    ctl_ok(&mnt, "mid", "delete");
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));

    merge_now_ok(&mnt);
    let last = last_merge(&mnt);
    assert!(
        last.starts_with("ok: nothing to merge")
            && last.contains("left hidden: \"mid\"")
            && last.contains("locked by another process"),
        "merge-now: {last:?}"
    );
    assert_mid_left_alone(&ws, &mnt, &leaf_bytes, &mid_file);
    unmount_ok(m);
    assert_mid_file_is(&ws, &mid_file);
    holder.stop();
    ws.check_all();
    assert_mid_still_in_chain(&ws);

    // The other process is gone: the next mount locks mid and merges it.
    let m = ws.remount(&NO_GC);
    let mnt = m.mnt.clone();
    let status = status_text(&mnt);
    assert!(status.contains("problems: none"), "status:\n{status}");
    let last = merge_now_merges(&mnt, "mid", "leaf", Way::Any);
    assert!(!last.contains("left hidden"), "merge-now: {last:?}");
    assert!(
        !tree_text(&mnt).contains("mid"),
        "tree:\n{}",
        tree_text(&mnt)
    );
    assert_mid_merged_then_unmount(&ws, m, &leaf_bytes);
}
