//! Issue 11, findings 4, 5, 7, 8 and 9 (the filesystem part): hostile
//! input that used to hang the mount or a writer (FIFOs named as backing
//! files and memory sources), half-run large ctl writes, image locks that
//! outlived `umount`, ENOSYS answers and silently ignored `touch`, control
//! characters forged into `status`, and a `tree` drawing as wide as the
//! chain is deep. Each test builds the hostile file the way the issue's
//! reproduction does.

use super::*;
use std::process::Command;
use std::time::Duration;

/// How long a command that used to hang may take before the test calls it
/// a hang (generous: this is no timing assertion, only a bound on a hang).
const HANG: Duration = Duration::from_secs(20);

/// `mkfifo PATH`.
fn mkfifo(path: &Path) {
    run(Command::new("mkfifo").arg(path));
}

/// [`ctl`] in a thread, bounded by [`HANG`]: a write that hangs fails
/// the test instead of blocking it (the stuck thread is left behind).
fn ctl_bounded(mnt: &Path, point: &str, command: &str) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (mnt, point, command) = (mnt.to_path_buf(), point.to_string(), command.to_string());
    std::thread::spawn(move || {
        let _ = tx.send(ctl(&mnt, &point, &command));
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("ctl write did not return within {HANG:?}"))
}

/// Finding 4: a qcow2 whose backing file is a FIFO. The mount comes up
/// (the guard fails the test if `MNT/tree` does not appear within its
/// deadline), the healthy image beside it is a point, and `status` names
/// the FIFO. `snaptree info` refuses the image without hanging.
#[test]
fn fifo_backing_file_does_not_hang_mount() {
    let Some(ws) = workspace() else { return };
    mkfifo(&ws.img("pipe"));
    ws.create_qcow2("ok.qcow2", MIB, None, "");
    run(Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-b", "pipe", "-F", "raw", "-u",
        ])
        .arg(ws.img("onfifo.qcow2"))
        .arg("1M"));
    let Some(m) = ws.mount(&[]) else { return };
    assert!(visible(&m.mnt).contains("ok"), "{:?}", visible(&m.mnt));
    assert_eq!(read_disk(&disk(&m.mnt, "ok")).len() as u64, MIB);
    let status = status_text(&m.mnt);
    assert!(
        status.contains("pipe") && status.contains("FIFO"),
        "status does not name the FIFO:\n{status}"
    );
    unmount_ok(m);

    let o = run_with_timeout(
        Command::new(bin()).arg("info").arg(ws.img("onfifo.qcow2")),
        HANG,
    );
    assert!(!o.status.success(), "info on a FIFO-backed image succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("pipe"),
        "info error does not name the FIFO: {err}"
    );
}

/// Finding 5: `checkpoint FIFO` and `memory FIFO` fail at once with
/// EINVAL; no FUSE thread stays stuck in the open, so the mount still
/// answers and unmounts cleanly.
#[test]
fn fifo_memory_source_fails_promptly() {
    let Some(ws) = base_and_leaf_workspace(16 * MIB) else {
        return;
    };
    let fifo = ws.scratch("fifo1");
    mkfifo(&fifo);
    mkfifo(&ws.img("fifo2"));
    let Some(m) = ws.mount(&[]) else { return };
    // Outside the tree, the FIFO is refused for being outside (EACCES)
    // before anything opens it; inside, for being a FIFO.
    for (cmd, errno, why) in [
        (
            format!("checkpoint {}", fifo.display()),
            libc::EACCES,
            "outside the tree",
        ),
        (
            format!("memory {}", fifo.display()),
            libc::EACCES,
            "outside the tree",
        ),
        ("memory fifo2".to_string(), libc::EINVAL, "FIFO"),
        ("checkpoint fifo2".to_string(), libc::EINVAL, "FIFO"),
    ] {
        assert_errno(&cmd, ctl_bounded(&m.mnt, "leaf", &cmd), errno);
        let status = status_text(&m.mnt);
        assert!(status.contains(why), "{cmd:?}: status:\n{status}");
    }
    // Nothing was attached, and the mount still serves.
    assert!(!m.mnt.join("leaf/memory.raw").exists());
    ctl_ok(&m.mnt, "leaf", "snapshot after");
    unmount_ok(m);
}

/// Finding 4, the tree's own files: a FIFO planted as the manifest, as
/// the merge journal or as the manifest's temp file does not hang the
/// mount or a command (each is refused and reported, or replaced); one
/// named as a point's memory source in the manifest is refused and
/// reported; one planted as the lock file makes the mount fail with a
/// message naming it instead of blocking.
#[test]
fn fifo_manifest_journal_and_lock_do_not_hang() {
    let Some(ws) = base_and_leaf_workspace(16 * MIB) else {
        return;
    };
    mkfifo(&ws.img(".snaptree.json"));
    mkfifo(&ws.img(".snaptree-merge.json"));
    mkfifo(&ws.img(".snaptree.json.tmp"));
    let Some(m) = ws.mount(&[]) else { return };
    assert!(visible(&m.mnt).contains("leaf"), "{:?}", visible(&m.mnt));
    let status = status_text(&m.mnt);
    assert!(status.contains("FIFO"), "status:\n{status}");
    // Saving the manifest goes through the temp file.
    ctl_bounded(&m.mnt, "leaf", "snapshot s1").expect("snapshot with a FIFO temp file");
    unmount_ok(m);

    // The manifest (now a file) names a FIFO as the leaf's memory.
    let path = ws.img(".snaptree.json");
    let mut manifest = read_json(&path).expect("manifest saved");
    for p in manifest["points"].as_array_mut().expect("points") {
        if p["name"] == "leaf" {
            p["memory"] = "fifo-mem".into();
        }
    }
    std::fs::write(&path, manifest.to_string()).unwrap();
    mkfifo(&ws.img("fifo-mem"));
    let m = ws.remount(&[]);
    assert!(!m.mnt.join("leaf/memory.raw").exists());
    let info = info(&m.mnt, "leaf");
    assert!(
        info["memory"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("FIFO")),
        "leaf/info.json: {info}"
    );
    unmount_ok(m);

    let lock = ws.img(".snaptree.lock");
    let _ = std::fs::remove_file(&lock);
    mkfifo(&lock);
    let o = run_with_timeout(
        Command::new(bin())
            .arg("mount")
            .arg(&ws.images)
            .arg(&ws.mnt)
            .arg("-f"),
        HANG,
    );
    assert!(!o.status.success(), "mount with a FIFO lock file succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(".snaptree.lock"), "{err}");
}

/// Finding 8: the images are free for the next command as soon as
/// `umount` returns (a script's `umount M; qemu-img check ...`). Checked
/// over several rounds (`SNAPTREE_TEST_UMOUNT_ROUNDS`, default 5), each
/// with a write to flush first; while mounted the same check must fail,
/// so the test sees the lock it expects to be gone.
#[test]
fn image_locks_are_free_when_umount_returns() {
    let Some(ws) = base_and_leaf_workspace(16 * MIB) else {
        return;
    };
    let rounds: u64 = std::env::var("SNAPTREE_TEST_UMOUNT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut model = ws.flatten("leaf.qcow2");
    for round in 0..rounds {
        let mut m = if round == 0 {
            let Some(m) = ws.mount(&[]) else { return };
            m
        } else {
            ws.remount(&[])
        };
        {
            let f = open_rw(&m.mnt, "leaf").expect("open leaf");
            write_both(
                &f,
                &mut model,
                (round % 15) * MIB + 7,
                &pattern(round, 70_000),
            );
        }
        let held = ws.qemu_img_unchecked(&["check", "-q", "leaf.qcow2"]);
        assert!(
            !held.status.success(),
            "round {round}: qemu-img check passed while the leaf is mounted read-write"
        );
        m.umount_only();
        let o = ws.qemu_img_unchecked(&["check", "-q", "leaf.qcow2"]);
        assert!(
            o.status.success(),
            "round {round}: qemu-img check right after umount: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let st = m.wait_exit();
        assert!(st.success(), "round {round}: daemon exit {st}");
    }
    ws.compare("leaf.qcow2", &model);
}

/// Finding 7: a command of a page or more is refused whole. The 1 MiB
/// `printf` of the issue (bash: stdio flushes a full first page, then the
/// rest at offsets past 0) runs nothing: no `big5` point appears, and
/// `status` says why. So does one `write(2)` of 1 MiB + 13 bytes, which
/// the kernel splits at `max_write`. A second write through the same
/// descriptor (offset past 0) is refused too; 4095 bytes still run.
#[test]
fn ctl_write_of_a_page_or_more_runs_nothing() {
    let Some(ws) = base_and_leaf_workspace(16 * MIB) else {
        return;
    };
    let Some(m) = ws.mount(&[]) else { return };
    let ctl_path = m.mnt.join("leaf/ctl");
    let o = run_with_timeout(
        Command::new("bash")
            .arg("-c")
            .arg("printf 'snapshot big5%1048576s' '' > \"$1\"")
            .arg("bash")
            .arg(&ctl_path),
        HANG,
    );
    assert!(!o.status.success(), "the 1 MiB ctl write succeeded");
    assert!(!visible(&m.mnt).contains("big5"), "{:?}", visible(&m.mnt));
    let status = status_text(&m.mnt);
    assert!(
        status.contains("leaf/ctl: error: a write of") && status.contains("nothing was run"),
        "status:\n{status}"
    );

    // One write(2) of 1 MiB + 13 bytes: split by the kernel, none runs.
    let huge = format!("snapshot big6{}", " ".repeat(1 << 20));
    assert_errno("1 MiB command", ctl(&m.mnt, "leaf", &huge), libc::EINVAL);
    // Exactly a page: refused.
    let page = format!("snapshot big7{}", " ".repeat(4096 - "snapshot big7".len()));
    assert_errno(
        "4096-byte command",
        ctl(&m.mnt, "leaf", &page),
        libc::EINVAL,
    );
    assert!(!visible(&m.mnt).contains("big6") && !visible(&m.mnt).contains("big7"));
    // One byte less: runs.
    let under = format!("snapshot big8{}", " ".repeat(4095 - "snapshot big8".len()));
    ctl_ok(&m.mnt, "leaf", &under);
    assert!(visible(&m.mnt).contains("big8"));

    // A second command through one descriptor lands at offset > 0.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&ctl_path)
            .expect("open ctl");
        f.write_all(b"snapshot two1").expect("first command");
        assert_errno("second write", f.write(b"snapshot two2"), libc::EINVAL);
    }
    assert!(visible(&m.mnt).contains("two1"));
    assert!(!visible(&m.mnt).contains("two2"));
    assert!(status_text(&m.mnt).contains("a write at offset 13"));

    // merge-now takes the same rule.
    assert_errno(
        "8 KiB merge-now",
        std::fs::write(m.mnt.join("merge-now"), vec![b'x'; 8192]),
        libc::EINVAL,
    );
    unmount_ok(m);
}

/// Finding 9: `tree` draws as `git log --graph` does. A linear chain
/// stays in one column however deep it is (`SNAPTREE_TEST_TREE_DEPTH`,
/// default 300: it used to draw 4 columns wider per level); only where a
/// point has several children do they branch and indent.
#[test]
fn tree_drawing_stays_narrow_and_branches_indent() {
    let Some(ws) = workspace() else { return };
    let depth: usize = std::env::var("SNAPTREE_TEST_TREE_DEPTH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    // p0 <- p1 <- ... <- p{depth-1}, and a second tree: r <- s <- {a <- a2, b}.
    ws.create_qcow2("p0.qcow2", MIB, None, "");
    for i in 1..depth {
        let parent = format!("p{}.qcow2", i - 1);
        run(Command::new("qemu-img")
            .args([
                "create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", &parent,
            ])
            .arg(ws.img(&format!("p{i}.qcow2")))
            .arg("1M"));
    }
    ws.create_qcow2("r.qcow2", MIB, None, "");
    ws.create_qcow2("s.qcow2", MIB, Some(("r.qcow2", "qcow2")), "");
    ws.create_qcow2("a.qcow2", MIB, Some(("s.qcow2", "qcow2")), "");
    ws.create_qcow2("a2.qcow2", MIB, Some(("a.qcow2", "qcow2")), "");
    ws.create_qcow2("b.qcow2", MIB, Some(("s.qcow2", "qcow2")), "");
    let Some(m) = ws.mount(&["--max-depth", &(depth + 8).to_string()]) else {
        return;
    };
    let tree = tree_text(&m.mnt);
    let lines: Vec<&str> = tree.lines().collect();
    // The chain: one line per point, every name in column 0, in order.
    for i in 0..depth {
        assert!(
            lines[i].starts_with(&format!("p{i}  (")),
            "line {i}: {:?}\n(tree starts:\n{})",
            lines[i],
            lines[..depth.min(5)].join("\n")
        );
    }
    let widest = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    assert!(widest < 80, "widest line {widest} columns");
    // A blank line, then the branching tree, drawn exactly (names only).
    assert_eq!(lines[depth], "", "no blank line between the trees");
    let names: Vec<String> = lines[depth + 1..]
        .iter()
        .map(|l| l.split("  (").next().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        names,
        ["r", "s", "├── a", "│   a2", "└── b"],
        "tree:\n{}",
        lines[depth + 1..].join("\n")
    );
    unmount_ok(m);
}

/// `touch -d DATE PATH`, bounded by [`HANG`]; `Err` carries its stderr.
fn touch_d(path: &Path) -> Result<(), String> {
    let o = run_with_timeout(
        Command::new("touch")
            .args(["-d", "2001-02-03 04:05:06"])
            .arg(path),
        HANG,
    );
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

/// Every name-changing call at `dir` (a directory of the mount) fails
/// with `want`; `existing` is a file in it to rename, unlink and link.
#[track_caller]
fn assert_names_refused(dir: &Path, existing: &Path, want: i32) {
    use std::os::unix::fs::symlink;
    let new = dir.join("new-name");
    let d = dir.display();
    assert_errno(&format!("mkdir in {d}"), std::fs::create_dir(&new), want);
    assert_errno(
        &format!("create in {d}"),
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&new),
        want,
    );
    let c = std::ffi::CString::new(new.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFREG | 0o644, 0) };
    let mknod = if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    };
    assert_errno(&format!("mknod in {d}"), mknod, want);
    assert_errno(&format!("symlink in {d}"), symlink("x", &new), want);
    assert_errno(
        &format!("link in {d}"),
        std::fs::hard_link(existing, &new),
        want,
    );
    assert_errno(
        &format!("rename of {}", existing.display()),
        std::fs::rename(existing, &new),
        want,
    );
    assert_errno(
        &format!("unlink of {}", existing.display()),
        std::fs::remove_file(existing),
        want,
    );
    assert!(existing.exists() && !new.exists());
}

/// Finding 9: names and times. mkdir, create, mknod, symlink, link,
/// rename and unlink answer EPERM (EROFS at a read-only point or on a
/// read-only mount) instead of ENOSYS, and `touch -d` on a disk fails
/// instead of succeeding without effect.
#[test]
fn name_changes_and_times_are_refused() {
    let Some(ws) = base_and_leaf_workspace(16 * MIB) else {
        return;
    };
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    assert_names_refused(&mnt, &mnt.join("status"), libc::EPERM);
    assert_names_refused(&mnt.join("leaf"), &mnt.join("leaf/disk.raw"), libc::EPERM);
    assert_names_refused(&mnt.join("base"), &mnt.join("base/disk.raw"), libc::EROFS);
    let before = std::fs::metadata(mnt.join("leaf/disk.raw"))
        .unwrap()
        .modified()
        .unwrap();
    let e = touch_d(&mnt.join("leaf/disk.raw")).expect_err("touch -d on leaf/disk.raw succeeded");
    assert!(e.contains("Operation not permitted"), "{e}");
    let e = touch_d(&mnt.join("base/disk.raw")).expect_err("touch -d on base/disk.raw succeeded");
    assert!(e.contains("Read-only file system"), "{e}");
    assert!(
        touch_d(&mnt.join("tree")).is_err(),
        "touch -d on tree succeeded"
    );
    let after = std::fs::metadata(mnt.join("leaf/disk.raw"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    // A command still opens ctl with O_TRUNC (size and times together).
    ctl_ok(&mnt, "leaf", "snapshot s1");
    unmount_ok(m);

    let m = ws.remount(&["-o", "ro"]);
    let mnt = m.mnt.clone();
    assert_names_refused(&mnt, &mnt.join("status"), libc::EROFS);
    assert_names_refused(&mnt.join("leaf"), &mnt.join("leaf/disk.raw"), libc::EROFS);
    let e = touch_d(&mnt.join("leaf/disk.raw")).expect_err("touch -d on a read-only mount");
    assert!(e.contains("Read-only file system"), "{e}");
    unmount_ok(m);
}

/// Finding 9: a newline (or any control character) inside a ctl command
/// is escaped in `status`, so a command cannot forge a status line.
#[test]
fn control_characters_in_a_command_are_escaped_in_status() {
    let Some(ws) = base_and_leaf_workspace(16 * MIB) else {
        return;
    };
    let Some(m) = ws.mount(&[]) else { return };
    let forged = "snapshot x\nproblems: none\nmerge: \u{1b}[2Jidle";
    assert_errno("forging command", ctl(&m.mnt, "leaf", forged), libc::EINVAL);
    let status = status_text(&m.mnt);
    let last: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("last command:"))
        .collect();
    assert_eq!(last.len(), 1, "status:\n{status}");
    assert!(
        last[0].contains(r"snapshot x\nproblems: none\nmerge: \u{1b}[2Jidle"),
        "status:\n{status}"
    );
    assert_eq!(
        status
            .lines()
            .filter(|l| l.starts_with("problems:"))
            .count(),
        1,
        "status:\n{status}"
    );
    assert!(!status.contains('\u{1b}'), "status:\n{status}");
    unmount_ok(m);
}
