//! The [`Mount`] guard and what it needs from the system: `/proc/mounts`,
//! `pgrep`, `kill`, `umount` and bounded waits. Kept apart because its
//! teardown must work while a test is panicking, so it never panics in
//! `Drop` and always bounds how long it waits.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{bin, describe, fuse_unavailable, run_unchecked, run_with_timeout, test_name};
use super::{EXIT_DEADLINE, MOUNT_DEADLINE};

/// Whether `path` (canonical) is a mount point, per `/proc/mounts`.
pub fn is_mounted(path: &Path) -> bool {
    mount_entry(path).is_some()
}

/// The `/proc/mounts` line of mount point `path`, if mounted.
pub fn mount_entry(path: &Path) -> Option<String> {
    let want = path.to_string_lossy();
    let text = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    text.lines()
        .find(|l| {
            l.split(' ')
                .nth(1)
                .map(unescape_mount_field)
                .is_some_and(|m| m == want)
        })
        .map(str::to_string)
}

/// Whether a `/proc/mounts` line is a FUSE mount (type `fuse` or
/// `fuse.<subtype>`; fuser's pure-Rust mount drops the subtype).
pub fn is_fuse_entry(entry: &str) -> bool {
    entry
        .split(' ')
        .nth(2)
        .is_some_and(|t| t == "fuse" || t.starts_with("fuse."))
}

/// Undoes the octal escapes (`\040` for a space) of `/proc/mounts`.
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pids of processes whose command line contains `pattern` (`pgrep -f`).
pub fn pgrep(pattern: &str) -> Vec<i32> {
    let o = run_with_timeout(
        Command::new("pgrep").args(["-f", "--", pattern]),
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Sends `sig` to `pid`.
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: plain syscall; a stale pid at worst yields ESRCH.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// `umount [-l] path`, bounded.
fn umount(path: &Path, lazy: bool) -> Output {
    let mut c = Command::new("umount");
    if lazy {
        c.arg("-l");
    }
    c.arg(path);
    run_with_timeout(&mut c, Duration::from_secs(20))
}

/// Waits up to `deadline` for `child` to exit.
pub fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < end => thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `deadline` passes.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `path` exists, asked from a helper thread so that a hung
/// daemon cannot block the caller for longer than `timeout` (then `false`;
/// the helper thread stays blocked until the mount is torn down).
pub fn exists_within(path: &Path, timeout: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    thread::spawn(move || {
        let _ = tx.send(p.exists());
    });
    rx.recv_timeout(timeout).unwrap_or(false)
}

/// A mounted tree, unmounted when dropped (see the module docs).
pub struct Mount {
    /// The mount point.
    pub mnt: PathBuf,
    /// The foreground daemon, when this guard started it with `-f`.
    child: Option<Child>,
    /// The daemon's stdout+stderr (foreground mounts).
    log: Option<PathBuf>,
    /// Set once torn down, so `Drop` has nothing left to do.
    finished: bool,
    /// Set once this guard's file system was unmounted: from then on the
    /// mount point may hold another mount, which `Drop` must not touch.
    unmounted: bool,
}

impl Mount {
    /// Spawns `snaptree mount SOURCE MNT -f ARGS` and waits until
    /// `MNT/tree` exists. `Err(why)` only when the kernel refused the FUSE
    /// mount; any other failure panics with the daemon's log.
    pub fn foreground(
        source: &Path,
        mnt: &Path,
        args: &[&str],
        log: &Path,
    ) -> Result<Mount, String> {
        let log_file = File::create(log).expect("daemon log");
        let mut cmd = Command::new(bin());
        cmd.arg("mount")
            .arg(source)
            .arg(mnt)
            .arg("-f")
            .args(args)
            .current_dir("/")
            .env("SNAPTREE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", describe(&cmd)));
        let mut m = Mount {
            mnt: mnt.to_path_buf(),
            child: Some(child),
            log: Some(log.to_path_buf()),
            finished: false,
            unmounted: false,
        };
        let start = Instant::now();
        loop {
            if exists_within(&mnt.join("tree"), MOUNT_DEADLINE) {
                let entry = mount_entry(mnt).unwrap_or_default();
                assert!(
                    is_fuse_entry(&entry),
                    "{}: MNT/tree exists but /proc/mounts says {entry:?}",
                    describe(&cmd)
                );
                return Ok(m);
            }
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                m.child = None;
                m.finished = true;
                let text = std::fs::read_to_string(log).unwrap_or_default();
                if fuse_unavailable(&text) {
                    return Err(text.trim().to_string());
                }
                panic!(
                    "{} exited ({status}) before the mount was ready; its output:\n{text}",
                    describe(&cmd)
                );
            }
            if start.elapsed() > MOUNT_DEADLINE {
                let text = m.log_text();
                drop(m);
                panic!(
                    "{}: MNT/tree did not appear within {MOUNT_DEADLINE:?}; output:\n{text}",
                    describe(&cmd)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A guard for a background mount whose daemon is found by `pgrep -f`
    /// on the mount point.
    pub fn background(mnt: &Path) -> Mount {
        Mount {
            mnt: mnt.to_path_buf(),
            child: None,
            log: None,
            finished: false,
            unmounted: false,
        }
    }

    /// The foreground daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("foreground mount").id() as i32
    }

    /// Pids of daemons serving this mount point.
    pub fn daemon_pids(&self) -> Vec<i32> {
        match &self.child {
            Some(c) => vec![c.id() as i32],
            None => pgrep(&self.mnt.to_string_lossy()),
        }
    }

    /// What the daemon printed so far.
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// `umount MNT` (must succeed), then waits for the daemon to exit.
    /// Returns the foreground daemon's exit status (`None` for background
    /// mounts, whose daemon is only required to disappear).
    pub fn unmount(mut self) -> Option<ExitStatus> {
        self.umount_only();
        self.wait_daemon()
    }

    /// `umount MNT` (must succeed) without waiting for the daemon; the
    /// guard still reaps (or kills) it when dropped, but never unmounts
    /// the mount point again.
    pub fn umount_only(&mut self) {
        // Another test thread's child, between fork and exec, can hold a
        // copy of a descriptor this test just closed: EBUSY for a moment.
        let mut o = umount(&self.mnt, false);
        let end = Instant::now() + Duration::from_secs(3);
        while !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("busy")
            && Instant::now() < end
        {
            eprintln!("{}: umount: busy; retrying", test_name());
            thread::sleep(Duration::from_millis(50));
            o = umount(&self.mnt, false);
        }
        assert!(
            o.status.success(),
            "umount {} failed: {}",
            self.mnt.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        self.unmounted = true;
    }

    /// After SIGKILL: waits for the daemon and returns its status; the
    /// guard then only cleans up the dead mount.
    pub fn wait_for_kill(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("foreground mount");
        let s = wait_child(child, EXIT_DEADLINE).expect("killed daemon did not exit");
        self.child = None;
        s
    }

    /// Whether the foreground daemon is still running.
    pub fn daemon_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits (bounded) for the foreground daemon to exit by itself, e.g.
    /// after a signal, and returns its status; panics if it does not.
    pub fn wait_exit(mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("foreground mount");
        match wait_child(child, EXIT_DEADLINE) {
            Some(s) => {
                self.child = None;
                if self.unmounted || !is_mounted(&self.mnt) {
                    self.finished = true;
                }
                s
            }
            None => panic!(
                "daemon {} did not exit within {EXIT_DEADLINE:?}; log:\n{}",
                self.pid(),
                self.log_text()
            ),
        }
    }

    /// After the file system is gone: waits for the daemon to exit.
    fn wait_daemon(&mut self) -> Option<ExitStatus> {
        self.finished = true;
        assert!(
            !is_mounted(&self.mnt),
            "{} still mounted after umount",
            self.mnt.display()
        );
        self.wait_gone()
    }

    /// Waits for the daemon to exit (SIGKILL and panic if it does not).
    fn wait_gone(&mut self) -> Option<ExitStatus> {
        if let Some(mut child) = self.child.take() {
            match wait_child(&mut child, EXIT_DEADLINE) {
                Some(s) => return Some(s),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "daemon did not exit within {EXIT_DEADLINE:?} of umount; killed. log:\n{}",
                        self.log_text()
                    );
                }
            }
        }
        let pattern = self.mnt.to_string_lossy().into_owned();
        if !wait_until(EXIT_DEADLINE, || pgrep(&pattern).is_empty()) {
            let pids = pgrep(&pattern);
            for p in &pids {
                kill(*p, libc::SIGKILL);
            }
            panic!(
                "background daemon(s) {pids:?} still alive {EXIT_DEADLINE:?} after umount; killed"
            );
        }
        None
    }

    /// Best-effort teardown for `Drop`: never panics.
    fn teardown(&mut self) {
        if !self.unmounted && is_mounted(&self.mnt) {
            let o = umount(&self.mnt, false);
            if !o.status.success() {
                eprintln!(
                    "umount {} failed ({}); trying umount -l",
                    self.mnt.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                let _ = umount(&self.mnt, true);
            }
        }
        if let Some(mut child) = self.child.take() {
            if wait_child(&mut child, EXIT_DEADLINE).is_none() {
                eprintln!("daemon {} did not exit; SIGKILL", child.id());
                let _ = child.kill();
                let _ = child.wait();
            }
        } else {
            let pattern = self.mnt.to_string_lossy().into_owned();
            if !wait_until(EXIT_DEADLINE, || pgrep(&pattern).is_empty()) {
                for p in pgrep(&pattern) {
                    eprintln!("background daemon {p} did not exit; SIGKILL");
                    kill(p, libc::SIGKILL);
                }
            }
        }
        if !self.unmounted && is_mounted(&self.mnt) {
            let _ = umount(&self.mnt, true);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = self.log_text();
            if !log.trim().is_empty() {
                eprintln!(
                    "--- snaptree daemon log ({}) ---\n{log}",
                    self.mnt.display()
                );
            }
        }
        if !self.finished {
            self.finished = true;
            self.teardown();
        }
    }
}

/// `umount -l` of a dead daemon's mount, then waits for it to be gone.
pub fn lazy_umount(mnt: &Path) {
    if !run_unchecked(Command::new("umount").arg("-l").arg(mnt))
        .status
        .success()
    {
        run_unchecked(Command::new("fusermount3").args(["-u", "-z"]).arg(mnt));
    }
    assert!(
        wait_until(Duration::from_secs(10), || !is_mounted(mnt)),
        "{} still mounted after umount -l",
        mnt.display()
    );
}
