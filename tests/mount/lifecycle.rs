//! The life of a mount and the daemon behind it: `mount -t snaptree`,
//! background mode, signals (SIGTERM, SIGINT, SIGKILL), remounting at
//! once, other users (`allow_other`) and other writers of the same images.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::*;

/// The helper installed at a path; dropping it puts back what was there
/// before (or removes it).
struct InstalledHelper {
    path: &'static str,
    previous: Option<Vec<u8>>,
}

impl InstalledHelper {
    fn install(from: &Path, path: &'static str) -> InstalledHelper {
        use std::os::unix::fs::PermissionsExt;
        let previous = std::fs::read(path).ok();
        let installed = InstalledHelper { path, previous };
        let tmp = format!("{path}.snaptree-test-{}", std::process::id());
        std::fs::copy(from, &tmp).expect("copy the helper");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the helper");
        std::fs::rename(&tmp, path).expect("install the helper");
        installed
    }
}

impl Drop for InstalledHelper {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        match &self.previous {
            Some(old) => {
                let _ = std::fs::write(self.path, old);
                let _ = std::fs::set_permissions(self.path, std::fs::Permissions::from_mode(0o755));
            }
            None => {
                let _ = std::fs::remove_file(self.path);
            }
        }
    }
}

#[test]
fn mount_t_snaptree_through_the_helper() {
    if !prerequisites_or_skip() {
        return;
    }
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helper/mount.snaptree");
    if !helper.exists() {
        skip(&format!("{} does not exist yet", helper.display()));
        return;
    }
    let _installed = InstalledHelper::install(&helper, "/sbin/mount.snaptree");
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    base_and_leaf(&ws, S);
    let leaf_bytes = ws.flatten("leaf.qcow2");

    for opts in [None, Some("ro")] {
        let guard = Mount::background(&ws.mnt);
        let mut c = Command::new("mount");
        c.args(["-t", "snaptree"]);
        if let Some(o) = opts {
            c.args(["-o", o]);
        }
        c.arg(&ws.images)
            .arg(&ws.mnt)
            .env("SNAPTREE_BIN", bin())
            .current_dir("/");
        let o = run_unchecked(&mut c);
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("/dev/fuse") || err.contains("No such device") {
                skip(&format!("FUSE mount refused: {err}"));
                return;
            }
            panic!(
                "{} failed ({}): {}{}",
                describe(&c),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                err
            );
        }
        // mount(8) returns once mounted: no polling.
        assert!(
            ws.mnt.join("tree").exists(),
            "{}: returned 0 but MNT/tree does not exist",
            describe(&c)
        );
        let entry = mount_entry(&ws.mnt).unwrap_or_default();
        assert!(is_fuse_entry(&entry), "/proc/mounts: {entry:?}");
        assert_eq!(visible(&ws.mnt), names(&["base", "leaf"]));
        assert_disk(&ws.mnt, "leaf", &leaf_bytes);
        let pids = guard.daemon_pids();
        assert_eq!(
            pids.len(),
            1,
            "daemons serving {}: {pids:?}",
            ws.mnt.display()
        );
        match opts {
            Some("ro") => {
                assert!(
                    entry
                        .split(' ')
                        .nth(3)
                        .is_some_and(|o| o.split(',').any(|x| x == "ro")),
                    "-o ro not in /proc/mounts: {entry}"
                );
                assert_errno(
                    "ro: open leaf for write",
                    open_rw(&ws.mnt, "leaf"),
                    libc::EROFS,
                );
            }
            _ => {
                let f = open_rw(&ws.mnt, "leaf").expect("open leaf rw");
                f.write_all_at(&leaf_bytes[..4096], 0).expect("write");
            }
        }
        guard.unmount();
        assert!(!is_mounted(&ws.mnt));
    }
    ws.check_all();
    ws.compare("leaf.qcow2", &leaf_bytes);
}

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    if !prerequisites_or_skip() {
        return;
    }
    for (sig, sig_name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let ws = Workspace::new();
        const S: u64 = 16 * MIB;
        base_and_leaf(&ws, S);
        let mut model = ws.flatten("leaf.qcow2");
        let Some(m) = ws.mount(&[]) else { return };
        {
            // Written, not fsynced: the daemon must flush on its way out.
            let f = open_rw(&m.mnt, "leaf").expect("open leaf rw");
            write_both(&f, &mut model, 77, &pattern(sig as u64, 3 * MIB as usize));
            write_both(&f, &mut model, 11 * MIB + 1, &pattern(5, 4097));
            punch_hole(&f, MIB, 65_536).expect("punch hole");
            model[MIB as usize..(MIB + 65_536) as usize].fill(0);
        }
        ctl_ok(&m.mnt, "leaf", "snapshot before-signal");
        let snap = model.clone();
        {
            let f = open_rw(&m.mnt, "leaf").expect("open leaf rw");
            write_both(&f, &mut model, 6 * MIB, &pattern(6, 100_000));
        }
        let mnt = m.mnt.clone();
        kill(m.pid(), sig);
        let status = m.wait_exit();
        assert_eq!(status.code(), Some(0), "{sig_name}: daemon exit {status:?}");
        assert!(
            !is_mounted(&mnt),
            "{sig_name}: {} still in /proc/mounts",
            mnt.display()
        );
        ws.check_all();
        ws.compare("leaf.qcow2", &model);
        ws.compare("before-signal.qcow2", &snap);
    }
}

/// SIGKILL while writing: the images stay consistent (`qemu-img check`
/// finds no corruption; leaked clusters are allowed) and everything
/// fsynced before the kill reads back exactly.
#[test]
fn sigkill_leaves_images_consistent() {
    const S: u64 = 16 * MIB;
    let Some(ws) = base_and_leaf_workspace(S) else {
        return;
    };
    let mut model = ws.flatten("leaf.qcow2");
    let Some(mut m) = ws.mount(&[]) else { return };
    let synced_end = {
        let f = open_rw(&m.mnt, "leaf").expect("open leaf rw");
        write_both(&f, &mut model, 12_345, &pattern(1, 5 * MIB as usize));
        write_both(&f, &mut model, 9 * MIB + 3, &pattern(2, 70_000));
        f.sync_all().expect("fsync");
        // Not synced: may or may not survive, but must not corrupt.
        for i in 0..64u64 {
            f.write_all_at(&pattern(100 + i, 40_000), 10 * MIB + i * 65_536)
                .expect("pwrite");
        }
        10 * MIB
    };
    let mnt = m.mnt.clone();
    kill(m.pid(), libc::SIGKILL);
    let status = m.wait_for_kill();
    assert!(!status.success(), "killed daemon exited {status:?}");
    let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    let out = ws.qemu_img_unchecked(&["check", "leaf.qcow2"]);
    // 0 = clean, 3 = leaked clusters only; 2 would be corruption.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check after SIGKILL: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    let got = ws.flatten("leaf.qcow2");
    assert_bytes_eq(
        "fsynced part of the leaf after SIGKILL",
        &got[..synced_end as usize],
        &model[..synced_end as usize],
    );
}

#[test]
fn background_mount_returns_when_ready() {
    const S: u64 = 16 * MIB;
    let Some(ws) = base_and_leaf_workspace(S) else {
        return;
    };
    let leaf_bytes = ws.flatten("leaf.qcow2");
    // The guard exists before the mount, so even a failure below unmounts.
    let guard = Mount::background(&ws.mnt);
    let mut c = Command::new(bin());
    c.arg("mount")
        .arg(&ws.images)
        .arg(&ws.mnt)
        .current_dir("/")
        .env("SNAPTREE_LOG", "warn");
    let o = run_with_timeout(&mut c, Duration::from_secs(30));
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("cannot mount") {
            skip(&format!("FUSE mount refused: {err}"));
            return;
        }
        panic!("{} failed ({}): {err}", describe(&c), o.status);
    }
    // Ready when the command returns: no polling.
    assert!(
        ws.mnt.join("tree").exists(),
        "snaptree mount returned 0 before MNT/tree existed"
    );
    let pids = guard.daemon_pids();
    assert_eq!(
        pids.len(),
        1,
        "daemons serving {}: {pids:?}",
        ws.mnt.display()
    );
    assert_eq!(visible(&ws.mnt), names(&["base", "leaf"]));
    assert_disk(&ws.mnt, "leaf", &leaf_bytes);
    let mut model = leaf_bytes.clone();
    {
        let f = open_rw(&ws.mnt, "leaf").expect("open leaf rw");
        write_both(&f, &mut model, 4097, &pattern(8, 50_000));
    }
    guard.unmount();
    assert!(!is_mounted(&ws.mnt));
    ws.check_all();
    ws.compare("leaf.qcow2", &model);

    // A failing background mount says why, exits non-zero, leaves nothing.
    let empty = ws.scratch("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let guard = Mount::background(&ws.mnt);
    let mut c = Command::new(bin());
    c.arg("mount").arg(&empty).arg(&ws.mnt).current_dir("/");
    let o = run_with_timeout(&mut c, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "mounting an empty directory succeeded");
    assert!(err.contains("no usable image"), "stderr: {err}");
    assert!(!is_mounted(&ws.mnt), "mounted anyway");
    assert!(
        wait_until(EXIT_DEADLINE, || guard.daemon_pids().is_empty()),
        "a daemon is left: {:?}",
        guard.daemon_pids()
    );
    drop(guard);
}

/// A daemon whose mount was removed by `umount` calls `umount2(MNT)` once
/// more while exiting (fuser's `Mount` drop, after up to 100 ms of
/// polling); if MNT was mounted again meanwhile, it unmounts the new mount.
#[test]
fn remount_right_after_umount_keeps_the_new_mount() {
    let Some(ws) = base_and_leaf_workspace(16 * MIB) else {
        return;
    };
    let Some(mut first) = ws.mount(&[]) else {
        return;
    };
    first.umount_only();
    // Mount again at once, without waiting for the first daemon to exit.
    let mut second = ws.remount(&[]);
    let status = first.wait_exit();
    assert!(status.success(), "first daemon: {status:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        second.daemon_alive() && ws.mnt.join("tree").exists(),
        "the second mount vanished when the first daemon exited (alive: {}, mounted: {})",
        second.daemon_alive(),
        is_mounted(&ws.mnt)
    );
}

/// SIGTERM while a file of the mount is open: the daemon's unmount fails
/// with EBUSY, it exits 1, and the mount stays behind, dead (ENOTCONN).
#[test]
fn sigterm_with_an_open_file_leaves_no_dead_mount() {
    let Some(ws) = base_and_leaf_workspace(16 * MIB) else {
        return;
    };
    let mut model = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&[]) else { return };
    let mut m = m;
    let f = open_rw(&m.mnt, "leaf").expect("open leaf rw");
    write_both(&f, &mut model, 5, &pattern(40, 100_000));
    kill(m.pid(), libc::SIGTERM);
    // Either it detaches at once (the mount leaves /proc/mounts) or it
    // keeps serving until the file is closed; a dead mount is neither.
    let mnt = m.mnt.clone();
    wait_until(Duration::from_secs(3), || {
        !m.daemon_alive() || !is_mounted(&mnt)
    });
    let alive = m.daemon_alive();
    assert!(
        alive || !is_mounted(&mnt),
        "daemon exited but left {} mounted (dead); log:\n{}",
        mnt.display(),
        m.log_text()
    );
    drop(f);
    let status = m.wait_exit();
    assert_eq!(status.code(), Some(0), "daemon exit: {status:?}");
    assert!(!is_mounted(&mnt), "still mounted");
    ws.check_all();
    ws.compare("leaf.qcow2", &model);
}

/// `-o allow_other` lets other users in (within file permissions);
/// without it, FUSE keeps them out.
#[test]
fn allow_other_lets_other_users_read() {
    if !prerequisites_or_skip() {
        return;
    }
    let setpriv_ok = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !setpriv_ok {
        skip("setpriv (util-linux) not found");
        return;
    }
    let ws = Workspace::new();
    base_and_leaf(&ws, 16 * MIB);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(ws.root(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod workspace");
    }
    let as_nobody = |script: &str| {
        run_unchecked(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .args(["sh", "-c", script])
                .current_dir("/"),
        )
    };
    let tree = ws.mnt.join("tree").display().to_string();
    let leaf = disk(&ws.mnt, "leaf").display().to_string();
    let ctl_path = ws.mnt.join("leaf").join("ctl").display().to_string();

    let Some(m) = ws.mount(&[]) else { return };
    let o = as_nobody(&format!("cat {tree}"));
    assert!(
        !o.status.success(),
        "without allow_other, another user read MNT/tree"
    );
    drop(m);

    let m = ws.remount(&["-o", "allow_other"]);
    let o = as_nobody(&format!("cat {tree}"));
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("leaf"),
        "with allow_other, another user cannot read MNT/tree: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = as_nobody(&format!("cmp {leaf} {leaf}"));
    assert!(o.status.success(), "other user reading disk.raw: {o:?}");
    // Permissions still apply: root's 0644 disk and ctl are not theirs.
    let o = as_nobody(&format!("printf x > {leaf}"));
    assert!(!o.status.success(), "another user wrote the leaf");
    let o = as_nobody(&format!("echo 'snapshot z' > {ctl_path}"));
    assert!(!o.status.success(), "another user ran a ctl command");
    assert_eq!(visible(&m.mnt), names(&["base", "leaf"]));
    unmount_ok(m);
}

/// qemu locks the images it writes (OFD locks), so two writers of one
/// qcow2 file cannot corrupt it. snaptree took no lock: while it had the
/// leaf open for writing, `qemu-io` wrote the same file, and a second
/// read-write mount of the same tree succeeded.
#[test]
fn a_mounted_leaf_is_locked_against_other_writers() {
    let Some(ws) = base_and_leaf_workspace(16 * MIB) else {
        return;
    };
    let Some(m) = ws.mount(&[]) else { return };
    let mut c = Command::new("qemu-io");
    c.current_dir(&ws.images)
        .args(["-f", "qcow2", "-c", "write -P 0x99 0 64k", "leaf.qcow2"]);
    let o = run_unchecked(&mut c);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() || out.contains("lock"),
        "qemu-io wrote leaf.qcow2 while snaptree has it open for writing: {out}"
    );
    // A second read-write mount of the tree is refused (it would recover
    // the first one's in-flight snapshots and merges); a read-only one
    // mounts, with the leaf read-only.
    let mnt2 = ws.scratch("mnt2");
    std::fs::create_dir(&mnt2).expect("mkdir mnt2");
    let mut c = Command::new(env!("CARGO_BIN_EXE_snaptree"));
    c.arg("mount").arg(&ws.images).arg(&mnt2).arg("-f");
    let o = run_with_timeout(&mut c, std::time::Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("in use by another snaptree"),
        "a second read-write mount: {} {err}",
        o.status
    );
    let log = ws.scratch("second.log");
    let second = Mount::foreground(&ws.images, &mnt2, &["-o", "ro"], &log).expect("ro mount");
    let writable = open_rw(&mnt2, "leaf").is_ok();
    drop(second);
    assert!(
        !writable,
        "a second mount of the same tree can write the leaf too"
    );
    drop(m);
}
