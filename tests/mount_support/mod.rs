//! Helpers for the FUSE mount tests in `tests/mount.rs`.
//!
//! DESIGN.md ("Testing"): FUSE tests mount for real, and `qemu-img` /
//! `qemu-io` are the oracle. This module keeps the tests themselves about
//! behaviour:
//!
//! - **Skipping honestly.** [`prerequisites_or_skip`] checks for
//!   `/dev/fuse`, `qemu-img`, `qemu-io` and `umount`; [`Workspace::mount`]
//!   returns `None` when the kernel refuses the FUSE mount itself. Either
//!   way `SKIP: <test>: <why>` goes to stderr and the test returns early; a
//!   test never passes without having run.
//! - **Bounded commands.** [`run`] / [`run_unchecked`] run a [`Command`]
//!   with a timeout and describe it (command line, status, stdout, stderr)
//!   when it fails.
//! - **Images.** [`Workspace`] is a temp directory with `images/` (the tree
//!   snaptree mounts), `mnt/` (the mount point) and scratch space for
//!   expected data and daemon logs, kept outside `images/` so they never
//!   become part of the tree. It wraps `qemu-img create/convert/check/
//!   compare` and `qemu-io`.
//! - **Mounts that always go away.** [`Mount`] is a guard. A foreground
//!   mount (`snaptree mount -f`) is spawned as a child, so its pid is known;
//!   a background mount's daemon is found with `pgrep -f` on the (unique)
//!   mount point. Dropping the guard, including while a test panics, runs
//!   `umount` (falling back to `umount -l`), then waits a bounded time for
//!   the daemon to exit and SIGKILLs it otherwise. When the test is
//!   panicking the daemon's log is printed too.
//! - **Mounted layout.** [`ctl`], [`read_text`], [`info`], [`visible`],
//!   [`read_disk`] (drops the page cache first, so the bytes come from the
//!   daemon), [`data_ranges`] (`SEEK_DATA`/`SEEK_HOLE`) and byte
//!   comparison that reports every differing range ([`assert_bytes_eq`]).
//!
//! Set `SNAPTREE_KEEP_TEST_DIRS=1` to keep each workspace for a
//! post-mortem (its path is printed).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// How long a mount may take to become ready (MNT/tree appears).
pub const MOUNT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a daemon may take to exit after its file system is unmounted.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// How long one external command may run before the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The snaptree binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_snaptree")
}

// ---------------------------------------------------------------------------
// Skipping
// ---------------------------------------------------------------------------

/// Name of the running test (libtest names each test's thread after it).
pub fn test_name() -> String {
    thread::current().name().unwrap_or("<test>").to_string()
}

/// Says on stderr that the running test is skipped, and why.
pub fn skip(why: &str) {
    eprintln!("SKIP: {}: {why}", test_name());
}

/// What the mount tests need from the machine, or why they cannot run.
pub fn prerequisites() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing (no FUSE in this kernel or container)".into());
    }
    for (tool, arg) in [
        ("qemu-img", "--version"),
        ("qemu-io", "--version"),
        ("umount", "--version"),
        ("pgrep", "--version"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("{tool} not found (qemu-utils, util-linux, procps)"));
        }
    }
    Ok(())
}

/// `true` when the test can run; otherwise prints `SKIP` and returns
/// `false`, and the test returns.
pub fn prerequisites_or_skip() -> bool {
    match prerequisites() {
        Ok(()) => true,
        Err(why) => {
            skip(&why);
            false
        }
    }
}

/// Whether a failed mount's log says the kernel refused FUSE itself
/// (rather than snaptree failing): then the test is skipped, not failed.
fn fuse_unavailable(log: &str) -> bool {
    log.contains("cannot mount")
        && [
            "No such device",
            "Operation not permitted",
            "Permission denied",
            "fusermount",
            "/dev/fuse",
        ]
        .iter()
        .any(|s| log.contains(s))
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if let Some(d) = cmd.get_current_dir() {
        s = format!("(cd {} && {s})", d.display());
    }
    s
}

fn describe_output(cmd: &Command, o: &Output) -> String {
    format!(
        "{}\n  status: {}\n  stdout: {}\n  stderr: {}",
        describe(cmd),
        o.status,
        String::from_utf8_lossy(&o.stdout).trim_end(),
        String::from_utf8_lossy(&o.stderr).trim_end()
    )
}

/// Runs `cmd` to completion within `timeout`; panics if it cannot start
/// or runs too long. Output is captured.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", describe(cmd)));
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut err = child.stderr.take().expect("stderr pipe");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not finish within {timeout:?}", describe(cmd));
            }
            Err(e) => panic!("waiting for {}: {e}", describe(cmd)),
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs `cmd` (bounded by [`COMMAND_TIMEOUT`]) whatever its exit status.
pub fn run_unchecked(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

/// Runs `cmd` and panics, describing it, unless it exits 0.
pub fn run(cmd: &mut Command) -> Output {
    let o = run_unchecked(cmd);
    assert!(
        o.status.success(),
        "command failed: {}",
        describe_output(cmd, &o)
    );
    o
}

// ---------------------------------------------------------------------------
// Bytes
// ---------------------------------------------------------------------------

/// Every range where `got` and `want` differ, as text (at most 10 ranges
/// spelled out), or `None` when they are equal.
pub fn diff_bytes(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let mut s = String::new();
    if got.len() != want.len() {
        s.push_str(&format!("length {} instead of {}; ", got.len(), want.len()));
    }
    let n = got.len().min(want.len());
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < n {
        if got[i] != want[i] {
            let start = i;
            while i < n && got[i] != want[i] {
                i += 1;
            }
            ranges.push((start, i));
        } else {
            i += 1;
        }
    }
    let total: usize = ranges.iter().map(|(a, b)| b - a).sum();
    s.push_str(&format!("{total} bytes differ in {} ranges:", ranges.len()));
    for (a, b) in ranges.iter().take(10) {
        s.push_str(&format!(
            " [{a:#x}, {b:#x}) got {:02x?}.. want {:02x?}..;",
            &got[*a..(*a + 4).min(*b)],
            &want[*a..(*a + 4).min(*b)]
        ));
    }
    Some(s)
}

/// Panics, naming `what` and every differing range, unless equal.
#[track_caller]
pub fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    if let Some(d) = diff_bytes(got, want) {
        panic!("{what}: wrong bytes: {d}");
    }
}

/// `len` bytes from a small fast generator seeded by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The seed for a randomised test: `SNAPTREE_TEST_SEED` if set, else the
/// clock. Printed so a failure can be replayed.
pub fn seed() -> u64 {
    let s = std::env::var("SNAPTREE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!(
        "{}: seed {s} (replay with SNAPTREE_TEST_SEED={s})",
        test_name()
    );
    s
}

// ---------------------------------------------------------------------------
// Workspace: images, scratch files, qemu
// ---------------------------------------------------------------------------

/// A temp directory holding `images/` (the tree), `mnt/` (the mount point)
/// and scratch files.
pub struct Workspace {
    dir: TempDir,
    /// The tree directory: the SOURCE of the mounts.
    pub images: PathBuf,
    /// The mount point (canonical).
    pub mnt: PathBuf,
    log_count: std::cell::Cell<u32>,
}

impl Workspace {
    pub fn new() -> Workspace {
        let mut b = tempfile::Builder::new();
        b.prefix("snaptree-mount-");
        let dir = b.tempdir().expect("temp dir");
        let root = dir.path().canonicalize().expect("canonical temp dir");
        let images = root.join("images");
        let mnt = root.join("mnt");
        std::fs::create_dir(&images).expect("images dir");
        std::fs::create_dir(&mnt).expect("mount point");
        let mut dir = dir;
        if std::env::var_os("SNAPTREE_KEEP_TEST_DIRS").is_some_and(|v| v != "0") {
            dir.disable_cleanup(true);
            eprintln!("{}: keeping {}", test_name(), root.display());
        }
        Workspace {
            dir,
            images,
            mnt,
            log_count: std::cell::Cell::new(0),
        }
    }

    /// The workspace root (outside the tree).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `images/<name>`.
    pub fn img(&self, name: &str) -> PathBuf {
        self.images.join(name)
    }

    /// A scratch path outside the tree.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `qemu-img ARGS` in the tree directory.
    pub fn qemu_img(&self, args: &[&str]) -> Output {
        run(Command::new("qemu-img")
            .args(args)
            .current_dir(&self.images))
    }

    /// Creates a qcow2 image of `size` bytes, with a backing file (named
    /// relative to the tree directory) and its format if given, and extra
    /// `-o` options (`cluster_size=4096`).
    pub fn create_qcow2(&self, name: &str, size: u64, backing: Option<(&str, &str)>, opts: &str) {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if let Some((b, f)) = backing {
            args.extend(["-b", b, "-F", f]);
        }
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let size = size.to_string();
        args.push(name);
        args.push(&size);
        self.qemu_img(&args);
    }

    /// Creates a sparse raw image of `size` bytes.
    pub fn create_raw(&self, name: &str, size: u64) {
        File::create(self.img(name))
            .and_then(|f| f.set_len(size))
            .expect("create raw image");
    }

    /// Runs `qemu-io -f FMT -c CMD...` on `images/<name>`.
    pub fn qemu_io(&self, name: &str, fmt: &str, cmds: &[&str]) {
        let mut c = Command::new("qemu-io");
        c.current_dir(&self.images).args(["-f", fmt]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(name);
        let o = run(&mut c);
        // qemu-io reports some failures on stdout with status 0.
        let text = String::from_utf8_lossy(&o.stdout).to_lowercase();
        assert!(
            !text.contains("error") && !text.contains("failed"),
            "qemu-io reported a failure: {}",
            describe_output(&c, &o)
        );
    }

    /// The disk of `images/<name>` as `qemu-img convert -O raw` flattens
    /// it (through its whole chain). `-U`: safe while mounted.
    pub fn flatten(&self, name: &str) -> Vec<u8> {
        let out = self.scratch(&format!("flat-{}.raw", name.replace('/', "_")));
        let _ = std::fs::remove_file(&out);
        let o = out.to_string_lossy().into_owned();
        self.qemu_img(&["convert", "-U", "-O", "raw", name, &o]);
        let v = std::fs::read(&out).expect("read converted image");
        let _ = std::fs::remove_file(&out);
        v
    }

    /// `qemu-img check` of `images/<name>` must be clean. `-U` so that it
    /// may run while mounted (check only reads).
    pub fn check(&self, name: &str) {
        self.qemu_img(&["check", "-U", "-q", name]);
    }

    /// `qemu-img ARGS` in the images directory, whatever its exit status.
    pub fn qemu_img_unchecked(&self, args: &[&str]) -> Output {
        let mut c = Command::new("qemu-img");
        c.args(args).current_dir(&self.images);
        run_unchecked(&mut c)
    }

    /// The qcow2 images of the tree directory (by magic), sorted.
    pub fn qcow2_images(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.images)
            .expect("list images")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter(|e| {
                let mut magic = [0u8; 4];
                File::open(e.path())
                    .and_then(|mut f| f.read_exact(&mut magic))
                    .is_ok()
                    && magic == *b"QFI\xfb"
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// `qemu-img check` of every qcow2 image in the tree.
    pub fn check_all(&self) {
        for name in self.qcow2_images() {
            self.check(&name);
        }
    }

    /// `qemu-img compare` of `images/<name>` (through its chain) with
    /// `expected` as a raw disk must say identical.
    pub fn compare(&self, name: &str, expected: &[u8]) {
        let model = self.scratch(&format!("model-{}.raw", name.replace('/', "_")));
        std::fs::write(&model, expected).expect("write model");
        let m = model.to_string_lossy().into_owned();
        let mut c = Command::new("qemu-img");
        c.current_dir(&self.images)
            .args(["compare", "-U", "-F", "raw", name, &m]);
        let o = run_unchecked(&mut c);
        if !o.status.success() {
            let got = self.flatten(name);
            panic!(
                "qemu-img compare: {name} differs from the model: {}\n{}",
                diff_bytes(&got, expected).unwrap_or_else(|| "(flattened bytes equal?)".into()),
                describe_output(&c, &o)
            );
        }
        let _ = std::fs::remove_file(&model);
    }

    /// Mounts the tree in the foreground (`snaptree mount images mnt -f
    /// ARGS`). `None` (after printing SKIP) if the kernel refuses FUSE;
    /// panics if snaptree fails otherwise.
    pub fn mount(&self, args: &[&str]) -> Option<Mount> {
        self.mount_source(&self.images, args)
    }

    /// As [`Workspace::mount`], with another SOURCE (one leaf image).
    pub fn mount_source(&self, source: &Path, args: &[&str]) -> Option<Mount> {
        let n = self.log_count.get() + 1;
        self.log_count.set(n);
        let log = self.scratch(&format!("daemon-{n}.log"));
        match Mount::foreground(source, &self.mnt, args, &log) {
            Ok(m) => Some(m),
            Err(why) => {
                skip(&format!("FUSE mount refused: {why}"));
                None
            }
        }
    }

    /// Like [`Workspace::mount`] where a mount already worked in this
    /// test, so FUSE is available: any failure is a test failure.
    pub fn remount(&self, args: &[&str]) -> Mount {
        self.mount(args)
            .unwrap_or_else(|| panic!("remount of {} refused", self.images.display()))
    }
}

impl Default for Workspace {
    fn default() -> Self {
        Workspace::new()
    }
}

// ---------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// The mounted layout
// ---------------------------------------------------------------------------

/// Writes one command to `MNT/<point>/ctl` in a single `write(2)`;
/// `Err` carries the write's (or open's) errno.
pub fn ctl(mnt: &Path, point: &str, command: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(mnt.join(point).join("ctl"))?;
    let n = f.write(command.as_bytes())?;
    assert_eq!(n, command.len(), "short write of ctl command {command:?}");
    Ok(())
}

/// Like [`ctl`], but the command must succeed (else the panic shows
/// `status`).
#[track_caller]
pub fn ctl_ok(mnt: &Path, point: &str, command: &str) {
    if let Err(e) = ctl(mnt, point, command) {
        panic!(
            "{point}/ctl: {command:?} failed: {e}\nstatus:\n{}",
            read_text(&mnt.join("status"))
        );
    }
}

/// A text file of the mount (`tree`, `status`, `info.json`).
pub fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `MNT/<point>/info.json`, parsed.
pub fn info(mnt: &Path, point: &str) -> Value {
    let text = read_text(&mnt.join(point).join("info.json"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{point}/info.json: {e}: {text}"))
}

/// The point directories listed in `MNT` (everything but the top files).
pub fn visible(mnt: &Path) -> BTreeSet<String> {
    std::fs::read_dir(mnt)
        .unwrap_or_else(|e| panic!("ls {}: {e}", mnt.display()))
        .map(|e| e.expect("dir entry"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A set of names, for comparisons with [`visible`].
pub fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Where `MNT/<point>/parent` points (`None` if it does not exist).
pub fn parent_link(mnt: &Path, point: &str) -> Option<String> {
    std::fs::read_link(mnt.join(point).join("parent"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Drops the page cache of `f`, so the next reads come from the daemon.
pub fn drop_cache(f: &File) {
    // SAFETY: advisory call on an open descriptor.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Reads a whole file through a fresh descriptor, its cache dropped first.
pub fn read_disk(path: &Path) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    drop_cache(&f);
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// Reads `len` bytes at `off` of an open disk (cache dropped first).
pub fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    drop_cache(f);
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off)
        .unwrap_or_else(|e| panic!("pread {len} at {off}: {e}"));
    v
}

/// `lseek(fd, off, whence)`, as an `io::Result`.
pub fn lseek(f: &File, off: u64, whence: i32) -> std::io::Result<u64> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// The data ranges of `f` as `SEEK_DATA`/`SEEK_HOLE` report them.
pub fn data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < size {
        let start = match lseek(f, at, libc::SEEK_DATA) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA at {at}: {e}"),
        };
        let end = lseek(f, start, libc::SEEK_HOLE)
            .unwrap_or_else(|e| panic!("SEEK_HOLE at {start}: {e}"));
        assert!(
            end > start && end <= size,
            "SEEK_DATA {start} then SEEK_HOLE {end} (size {size})"
        );
        v.push((start, end));
        at = end;
    }
    v
}

/// The data ranges `qemu-img map` reports for `images/<name>` (entries
/// with `"data": true`, adjacent ones merged).
pub fn qemu_data_ranges(ws: &Workspace, name: &str) -> Vec<(u64, u64)> {
    let o = ws.qemu_img(&["map", "-U", "--output=json", name]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("qemu-img map json");
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("map array") {
        if e["data"] != Value::Bool(true) {
            continue;
        }
        let s = e["start"].as_u64().expect("start");
        let end = s + e["length"].as_u64().expect("length");
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = end,
            _ => out.push((s, end)),
        }
    }
    out
}

/// `fallocate(fd, mode, off, len)`, as an `io::Result`.
pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r != 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The errno of `r`'s error, or a panic naming `what` if it succeeded.
#[track_caller]
pub fn errno_of<T>(what: &str, r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => panic!("{what}: succeeded, but it must fail"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: error without errno: {e}")),
    }
}
