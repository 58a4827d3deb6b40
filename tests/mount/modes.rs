//! Issue 11, finding 3: shown files grant no more than their source, and
//! new images are as private as the image they derive from.
//!
//! The images are made `0600` and given to uid 1234 (the tests run as
//! root); the tree is mounted with `allow_other`, and `setpriv` reads
//! through the mount as uid 1234 (allowed) and as `nobody` (refused by the
//! kernel, which checks the mode and owner we report).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use super::*;

const OWNER: u32 = 1234;
const NOBODY: u32 = 65534;

/// Whether the test can run: root (to chown) and `setpriv` (to read as
/// another user). Prints SKIP otherwise.
fn can_switch_users() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root to chown the images");
        return false;
    }
    let found = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip("setpriv (util-linux) is missing");
    }
    found
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// (permission bits, uid, gid) of `path`.
fn mode_of(path: &Path) -> (u32, u32, u32) {
    let m =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// Reads the first 512 bytes of `path` as `uid` (no groups).
fn read_as(uid: u32, path: &Path) -> std::process::Output {
    run_unchecked(
        Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .args(["head", "-c", "512"])
            .arg(path),
    )
}

#[track_caller]
fn assert_denied(uid: u32, path: &Path) {
    let out = read_as(uid, path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Permission denied"),
        "uid {uid} read {}: status {}, {} bytes, stderr {err:?}",
        path.display(),
        out.status,
        out.stdout.len()
    );
}

#[track_caller]
fn assert_reads(uid: u32, path: &Path, want: &[u8]) {
    let out = read_as(uid, path);
    assert!(
        out.status.success(),
        "uid {uid} read {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_bytes_eq(&path.display().to_string(), &out.stdout, want);
}

/// A workspace whose root others may traverse (the temp dir is 0700), with
/// a tree directory owned by OWNER (0755) holding base ← leaf, both 0600
/// and owned by OWNER.
fn private_tree() -> Option<Workspace> {
    if !can_switch_users() {
        return None;
    }
    let ws = base_and_leaf_workspace(16 * MIB)?;
    chmod(ws.root(), 0o755);
    chmod(&ws.images, 0o755);
    chown(&ws.images, OWNER);
    for img in ["base.qcow2", "leaf.qcow2"] {
        chmod(&ws.img(img), 0o600);
        chown(&ws.img(img), OWNER);
    }
    Some(ws)
}

#[test]
fn disks_show_their_images_owner_and_mode() {
    let Some(ws) = private_tree() else {
        return;
    };
    let leaf_head = ws.export("leaf.qcow2")[..512].to_vec();
    let base_head = ws.export("base.qcow2")[..512].to_vec();
    let Some(m) = ws.mount(&["-o", "allow_other,gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let leaf = disk(&mnt, "leaf");
    let base = disk(&mnt, "base");
    assert_eq!(mode_of(&leaf), (0o600, OWNER, OWNER), "writable leaf");
    assert_eq!(mode_of(&base), (0o400, OWNER, OWNER), "read-only point");
    assert_eq!(mode_of(&mnt.join("leaf/info.json")), (0o400, OWNER, OWNER));
    // Tree-wide files: the tree directory's owner, its read bits;
    // commands only for its owner.
    assert_eq!(mode_of(&mnt.join("leaf")), (0o755, OWNER, OWNER));
    assert_eq!(mode_of(&mnt.join("status")), (0o444, OWNER, OWNER));
    assert_eq!(mode_of(&mnt.join("leaf/ctl")), (0o644, OWNER, OWNER));
    assert_eq!(mode_of(&mnt.join("merge-now")), (0o644, OWNER, OWNER));

    // The kernel enforces it: nobody is refused, the owner reads.
    assert_denied(NOBODY, &leaf);
    assert_denied(NOBODY, &base);
    assert_denied(NOBODY, &mnt.join("leaf/info.json"));
    assert_reads(OWNER, &leaf, &leaf_head);
    assert_reads(OWNER, &base, &base_head);
    let w = run_unchecked(
        Command::new("setpriv")
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .arg("--clear-groups")
            .args(["sh", "-c", "echo snapshot stolen > \"$0\""])
            .arg(mnt.join("leaf/ctl")),
    );
    assert!(!w.status.success(), "nobody ran a command");
    assert!(!mnt.join("stolen").exists());

    // New images inherit the leaf's owner and mode, whatever the umask.
    let before = inode(&ws.img("leaf.qcow2"));
    ctl_ok(&mnt, "leaf", "snapshot new");
    assert_ne!(inode(&ws.img("leaf.qcow2")), before, "a new overlay");
    assert_eq!(mode_of(&ws.img("leaf.qcow2")), (0o600, OWNER, OWNER));
    assert_eq!(mode_of(&ws.img("new.qcow2")), (0o600, OWNER, OWNER));
    ctl_ok(&mnt, "new", "clone twin");
    assert_eq!(mode_of(&ws.img("twin.qcow2")), (0o600, OWNER, OWNER));
    assert_eq!(mode_of(&disk(&mnt, "new")), (0o400, OWNER, OWNER));
    assert_eq!(mode_of(&disk(&mnt, "twin")), (0o600, OWNER, OWNER));
    assert_denied(NOBODY, &disk(&mnt, "twin"));
    // The manifest: the tree directory's owner, never world-writable.
    let (mode, uid, _) = mode_of(&ws.img(".snaptree.json"));
    assert_eq!((mode, uid), (0o644, OWNER), ".snaptree.json");
    unmount_ok(m);

    // Read-only mount: no write bits anywhere.
    let m = ws.remount(&["-o", "ro,allow_other"]);
    assert_eq!(mode_of(&disk(&m.mnt, "leaf")), (0o400, OWNER, OWNER));
    assert_eq!(mode_of(&m.mnt.join("leaf/ctl")), (0o444, OWNER, OWNER));
    assert_denied(NOBODY, &disk(&m.mnt, "leaf"));
    unmount_ok(m);
    ws.check_all();
}

#[test]
fn a_private_tree_directory_hides_the_whole_mount() {
    let Some(ws) = private_tree() else {
        return;
    };
    chmod(&ws.images, 0o750);
    let Some(m) = ws.mount(&["-o", "allow_other,gc_idle=off"]) else {
        return;
    };
    assert_eq!(mode_of(&m.mnt), (0o750, OWNER, OWNER));
    assert_eq!(mode_of(&m.mnt.join("tree")), (0o440, OWNER, OWNER));
    assert_denied(NOBODY, &m.mnt.join("tree"));
    let text = read_text(&m.mnt.join("tree")).into_bytes();
    assert_reads(OWNER, &m.mnt.join("tree"), &text[..text.len().min(512)]);
    unmount_ok(m);
}

#[test]
fn memory_shows_its_sources_owner_and_mode() {
    let Some(ws) = private_tree() else {
        return;
    };
    // Two memory sources inside the tree: one attached as is, one
    // imported as a page-delta checkpoint.
    let ram = pattern(7, (4 * MIB) as usize);
    for (name, mode) in [("leaf.vmem", 0o640), ("base.vmem", 0o600)] {
        std::fs::write(ws.img(name), &ram).unwrap();
        chmod(&ws.img(name), mode);
        chown(&ws.img(name), OWNER);
    }
    let Some(m) = ws.mount(&["-o", "allow_other,gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "leaf", "memory leaf.vmem");
    let mem = mnt.join("leaf/memory.raw");
    assert_eq!(mode_of(&mem), (0o440, OWNER, OWNER), "source minus writes");
    assert_denied(NOBODY, &mem);
    assert_reads(OWNER, &mem, &ram[..512]);

    ctl_ok(&mnt, "base", "checkpoint base.vmem");
    let deltas = memory_dir_files(&ws);
    assert!(!deltas.is_empty(), "checkpoint made no delta");
    for d in &deltas {
        let p = ws.img(".snaptree-memory").join(d);
        assert_eq!(mode_of(&p), (0o600, OWNER, OWNER), "{}", p.display());
    }
    let mem = mnt.join("base/memory.raw");
    assert_eq!(mode_of(&mem), (0o400, OWNER, OWNER));
    assert_denied(NOBODY, &mem);
    assert_reads(OWNER, &mem, &ram[..512]);
    unmount_ok(m);
}

/// A commit merge renames the hidden parent's file onto the leaf's: the
/// leaf's data must not become as open as the parent was.
#[test]
fn a_commit_merge_keeps_the_leafs_owner_and_mode() {
    if !can_switch_users() {
        return;
    }
    let Some(ws) = workspace() else {
        return;
    };
    chmod(ws.root(), 0o755);
    // mid holds much, the leaf little: the merge commits the leaf into mid.
    ws.create_qcow2("base.qcow2", 16 * MIB, None, "");
    ws.create_qcow2("mid.qcow2", 16 * MIB, Some(("base.qcow2", "qcow2")), "");
    ws.qemu_io("mid.qcow2", "qcow2", &["write -P 0x21 0 12M"]);
    ws.create_qcow2("leaf.qcow2", 16 * MIB, Some(("mid.qcow2", "qcow2")), "");
    ws.qemu_io("leaf.qcow2", "qcow2", &["write -P 0x31 1M 4K"]);
    let head = ws.export("leaf.qcow2")[1 << 20..(1 << 20) + 512].to_vec();
    chmod(&ws.img("mid.qcow2"), 0o644);
    chmod(&ws.img("leaf.qcow2"), 0o600);
    chown(&ws.img("leaf.qcow2"), OWNER);
    let Some(m) = ws.mount(&["-o", "allow_other,gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "mid", "delete");
    super::merge::merge_now_ok(&mnt);
    let last = read_text(&mnt.join("merge-now"));
    assert!(last.contains("committing the child"), "{last}");
    assert!(!ws.img("mid.qcow2").exists(), "mid merged away");
    assert_eq!(mode_of(&ws.img("leaf.qcow2")), (0o600, OWNER, OWNER));
    let leaf = disk(&mnt, "leaf");
    assert_eq!(mode_of(&leaf), (0o600, OWNER, OWNER));
    assert_denied(NOBODY, &leaf);
    let out = run_unchecked(
        Command::new("setpriv")
            .arg(format!("--reuid={OWNER}"))
            .arg(format!("--regid={OWNER}"))
            .arg("--clear-groups")
            .args(["dd", "bs=512", "skip=2048", "count=1", "status=none"])
            .arg(format!("if={}", leaf.display())),
    );
    assert_bytes_eq("leaf after the merge, as its owner", &out.stdout, &head);
    unmount_ok(m);
    ws.check_all();
}

/// A VHD leaf's snapshot makes a differencing VHD, which is as private as
/// the leaf too.
#[test]
fn a_vhd_snapshot_inherits_the_leafs_owner_and_mode() {
    if !can_switch_users() {
        return;
    }
    let Some(ws) = workspace() else {
        return;
    };
    ws.create_vpc("disk.vhd", 8 * MIB);
    chmod(&ws.img("disk.vhd"), 0o640);
    chown(&ws.img("disk.vhd"), OWNER);
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    ctl_ok(&m.mnt, "disk", "snapshot frozen");
    assert_eq!(mode_of(&ws.img("frozen.vhd")), (0o640, OWNER, OWNER));
    assert_eq!(mode_of(&ws.img("disk.vhd")), (0o640, OWNER, OWNER));
    assert_eq!(mode_of(&disk(&m.mnt, "disk")), (0o640, OWNER, OWNER));
    assert_eq!(mode_of(&disk(&m.mnt, "frozen")), (0o440, OWNER, OWNER));
    ctl_ok(&m.mnt, "frozen", "clone other");
    assert_eq!(mode_of(&ws.img("other.vhd")), (0o640, OWNER, OWNER));
    unmount_ok(m);
}
