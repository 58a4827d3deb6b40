//! The crash test of merges on differencing-disk trees (ARCHITECTURE.md,
//! "The merge invariant") that `vhd_merge_crash.rs` and
//! `vhdx_merge_crash.rs` share: same trees, kills, checks and summary; the
//! crate says which format through its `FORMAT` ([`Format`]). SIGKILL the
//! process doing a merge at a random moment, then check that nothing
//! visible changed and that the merge completes afterwards.
//!
//! Each run builds a small random tree. `leaf.EXT` starts as a dynamic
//! image made by `qemu-img create` and written with `qemu-io`; the rest is
//! snaptree's own differencing disks, made through the mount (`snapshot`
//! and `clone` on `ctl`) and written through `disk.raw`:
//!
//! ```text
//! [base] <- mid (hidden) <- [snap <-] leaf      (+ sometimes a clone `side`
//!                                                  on base or snap)
//! ```
//!
//! `base` is sometimes absent: the hidden node is then the root, which can
//! only be committed into (a differencing disk needs a parent). Otherwise
//! the data is sized so that both directions happen: a hidden node bigger
//! than its child is merged by committing the child into it (then
//! `rename`; when the child has children, mid's file first takes the
//! child's id, which they check), a smaller one by streaming it into the
//! child (then the child's parent reference is re-pointed by writes the
//! journal holds at the commit point).
//!
//! Every point's disk is recorded through the mount. Then either
//! - **mount**: `snaptree mount -f -o gc_idle=off`, `delete` on `mid/ctl`,
//!   `1` to `merge-now` from a thread, SIGKILL after a random delay; or
//! - **offline**: `snaptree merge SRC mid` as a child, SIGKILL after a
//!   random delay, then `snaptree merge SRC` to completion.
//!
//! Delays are spread over [0, 1.2 × the merge's duration], measured on
//! the first run of each variant and direction (not killed before it
//! ends). After the kill: libvhdi's `vhdiinfo` accepts every image, every
//! visible point's image exports (`snaptree export`) to the recorded
//! bytes; a remount shows the same points with the same bytes, the
//! interrupted merge completes, `mid.EXT` is gone, every chain is as short
//! as the visible tree, no journal is left and the manifest forgets `mid`;
//! once unmounted `vhdiinfo` accepts every image again, and on some runs
//! `vhdimount` reads the leaf's recorded bytes through the new chain. A
//! daemon that hangs is SIGKILLed by a watchdog after saving its threads'
//! stacks.
//!
//! One window is known and tolerated (counted in the summary; fatal with
//! `F.strict_ids_env` set to 1): a kill after mid's file took its child's
//! id and before the rename leaves the points below mid failing the parent
//! id check (snaptree and libvhdi alike) until the next read-write open
//! puts mid's id back; see [`adopted_id_window`].
//!
//! `F.runs_env` sets the number of runs; `SNAPTREE_TEST_SEED` replays a
//! seed (printed at the start); `SNAPTREE_KEEP_TEST_DIRS=1` keeps each
//! run's directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::support::*;
use crate::FORMAT as F;

/// What differs between the formats this harness tests.
pub struct Format {
    /// The images' extension ("vhd"); points are `P.EXT` unless `file`
    /// says otherwise.
    pub ext: &'static str,
    /// The format's name in messages ("VHD").
    pub name: &'static str,
    /// What the identity children check is called ("unique id").
    pub id_name: &'static str,
    /// The image file of a point.
    pub file: fn(&str) -> String,
    /// Creates the dynamic leaf image `name` of `size` bytes.
    pub create_leaf: fn(&Workspace, &str, u64),
    /// The `qemu-io` format name of the leaf.
    pub qemu_format: &'static str,
    /// The images of this format in the tree directory, sorted.
    pub images: fn(&Workspace) -> Vec<String>,
    /// Every on-disk copy of an image's id (hex): a kill between two
    /// writes of it may leave them apart.
    pub id_copies: fn(&Workspace, &str) -> Vec<String>,
    /// The id (hex) an image's children check.
    pub current_id: fn(&Workspace, &str) -> String,
    /// The environment variable with the number of runs.
    pub runs_env: &'static str,
    pub default_runs: u64,
    /// The environment variable that makes the known window fatal.
    pub strict_ids_env: &'static str,
}

/// The hidden node's image.
fn mid() -> String {
    (F.file)("mid")
}

/// libvhdi's `vhdiinfo` accepts every image of the tree.
fn vhdiinfo_all(ws: &Workspace) {
    for name in (F.images)(ws) {
        let o = Command::new("vhdiinfo")
            .arg(ws.img(&name))
            .stdin(Stdio::null())
            .output()
            .expect("run vhdiinfo");
        assert!(
            o.status.success(),
            "vhdiinfo {name}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Virtual size of every disk.
const VSIZE: u64 = 48 * MIB;
/// Bytes of random data the writes take their contents from.
const POOL: usize = 2 * MIB as usize;
/// How long the interrupted merge may take to complete after remount.
const MERGE_DEADLINE: Duration = Duration::from_secs(30);
const JOURNAL: &str = ".snaptree-merge.json";
const MANIFEST: &str = ".snaptree.json";
/// `vhdimount` reads the leaf after runs `i` with `i % VHDIMOUNT_EVERY == 1`.
const VHDIMOUNT_EVERY: u64 = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Mount,
    Offline,
}

/// Where the kill landed, judged from the files it left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Moment {
    /// No journal and `mid.EXT` there: the merge had not started.
    Before,
    /// A journal, commit point not reached: the merge is redone.
    MidMerge,
    /// A journal, commit point passed: the next open finishes it.
    AfterCommit,
    /// No journal and `mid.EXT` gone: the merge had finished.
    After,
    /// Calibration run: the merge ran to its end before the kill (mount)
    /// or was not killed at all (offline).
    Uninterrupted,
}

/// A random tree; every point `P` is the image `(F.file)(P)`.
struct Spec {
    /// `mid` is the root (no `base`).
    mid_root: bool,
    /// `snap` sits between `mid` and `leaf`.
    snap: bool,
    /// The parent of the clone `side`, if any.
    side: Option<&'static str>,
    /// The direction the sizes aim at (the engine picks by allocated
    /// bytes; a root `mid` is always committed into).
    intended: &'static str,
}

impl Spec {
    fn random(rng: &mut SmallRng) -> Spec {
        let mid_root = rng.gen_bool(0.25);
        let snap = rng.gen_bool(0.4);
        let side = match (rng.gen_bool(0.3), mid_root, snap) {
            (false, ..) | (true, true, false) => None,
            (true, false, true) => Some(["base", "snap"][rng.gen_range(0..2)]),
            (true, false, false) => Some("base"),
            (true, true, true) => Some("snap"),
        };
        let intended = if mid_root || rng.gen_bool(0.5) {
            "commit"
        } else {
            "stream"
        };
        Spec {
            mid_root,
            snap,
            side,
            intended,
        }
    }

    /// Every point with its parent, parents first.
    fn points(&self) -> Vec<(&'static str, Option<&'static str>)> {
        let mut v = Vec::new();
        if !self.mid_root {
            v.push(("base", None));
        }
        v.push(("mid", (!self.mid_root).then_some("base")));
        if self.snap {
            v.push(("snap", Some("mid")));
        }
        v.push(("leaf", Some(if self.snap { "snap" } else { "mid" })));
        if let Some(p) = self.side {
            v.push(("side", Some(p)));
        }
        v
    }

    fn parent(&self, name: &str) -> Option<&'static str> {
        self.points().into_iter().find(|p| p.0 == name)?.1
    }

    /// The one child of `mid`.
    fn mid_child(&self) -> &'static str {
        if self.snap {
            "snap"
        } else {
            "leaf"
        }
    }

    fn visible(&self) -> Vec<&'static str> {
        self.points()
            .into_iter()
            .map(|p| p.0)
            .filter(|&n| n != "mid")
            .collect()
    }

    /// 1 + the visible ancestors of `name`: its chain depth after the merge.
    fn depth(&self, name: &str) -> u64 {
        let mut n = 1;
        let mut cur = self.parent(name);
        while let Some(p) = cur {
            n += u64::from(p != "mid");
            cur = self.parent(p);
        }
        n
    }

    fn desc(&self) -> String {
        self.points()
            .iter()
            .map(|(n, p)| format!("{}<-{n}", p.unwrap_or("-")))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What the run did, for the summary.
struct Outcome {
    variant: Variant,
    moment: Moment,
    direction: &'static str,
    intended: &'static str,
    /// Killed inside the adopted-id window (see [`adopted_id_window`]).
    id_window: bool,
}

/// Duration of an uninterrupted merge per variant and intended direction.
type Calibration = BTreeMap<(Variant, &'static str), Duration>;

/// The recorded disk of every point (`mid` included).
type Refs = BTreeMap<&'static str, Vec<u8>>;

fn file(point: &str) -> String {
    (F.file)(point)
}

/// The whole test: `F.runs_env` runs (default `F.default_runs`), then a
/// summary of where the kills fell.
pub fn sigkill_during_merges_keeps_every_visible_point() {
    if !prerequisites_or_skip() {
        return;
    }
    let tool_ok = |t: &str| {
        Command::new(t)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !tool_ok("vhdiinfo") {
        skip(&format!(
            "vhdiinfo not found (libvhdi-utils); it judges the {} images",
            F.name
        ));
        return;
    }
    let vhdimount = tool_ok("vhdimount") && tool_ok("fusermount3");
    if !vhdimount {
        eprintln!(
            "{}: vhdimount or fusermount3 missing: no vhdimount reads",
            test_name()
        );
    }
    let seed = seed();
    let n: u64 = std::env::var(F.runs_env)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(F.default_runs);
    let started = Instant::now();
    let mut cal = Calibration::new();
    let mut outcomes = Vec::new();
    for i in 0..n {
        let run_seed = seed ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let vm = vhdimount && i % VHDIMOUNT_EVERY == 1;
        match one_run(i, run_seed, &mut cal, vm) {
            Some(o) => outcomes.push(o),
            None => return, // FUSE refused; already said why
        }
    }
    let mut by: BTreeMap<(Variant, &str, Moment), usize> = BTreeMap::new();
    for o in &outcomes {
        *by.entry((o.variant, o.direction, o.moment)).or_default() += 1;
    }
    eprintln!(
        "{}_merge_crash: {} runs in {:.1} s (seed {seed})",
        F.ext,
        outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    for ((v, d, m), c) in &by {
        eprintln!("  {v:?} {d}: killed {m:?}: {c}");
    }
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let window = count(|o| o.id_window);
    if window > 0 {
        eprintln!("  killed while {} held its child's {} before the rename (points below it unreadable until the next read-write open): {window}", mid(), F.id_name);
    }
    let off = count(|o| o.direction != o.intended);
    if off > 0 {
        eprintln!("  runs merged the other way than their sizes aimed at: {off}");
    }
}

// ---------------------------------------------------------------------------
// Building a tree
// ---------------------------------------------------------------------------

/// Writes about `target` bytes (counted in 4 KiB granules) of random
/// data, byte fills, zeros, and zero ranges and holes (`fallocate`), some
/// of them unaligned, through `MNT/<point>/disk.raw`.
fn fill(mnt: &Path, point: &str, target: u64, pool: &[u8], rng: &mut SmallRng) {
    const G: u64 = 4096;
    let path = mnt.join(point).join("disk.raw");
    let f = OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut covered = vec![false; (VSIZE / G) as usize];
    let mut count = 0;
    while count * G < target {
        let mut len = rng.gen_range(1..=256) * G;
        let mut off = rng.gen_range(0..=(VSIZE - len) / G) * G;
        if rng.gen_bool(0.15) {
            // Unaligned: sub-sector start and length.
            off += rng.gen_range(1..512);
            len = rng.gen_range(1..len.min(VSIZE - off));
        }
        let kind = rng.gen_range(0..100);
        let r = match kind {
            0..=89 => {
                let data = match kind {
                    0..=69 => {
                        let at = rng.gen_range(0..=POOL - len as usize);
                        pool[at..at + len as usize].to_vec()
                    }
                    70..=84 => vec![rng.gen_range(1..=255u8); len as usize],
                    _ => vec![0; len as usize],
                };
                f.write_all_at(&data, off)
            }
            90..=95 => fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, off, len),
            _ => fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            ),
        };
        r.unwrap_or_else(|e| panic!("{point}: write kind {kind}, {len} bytes at {off}: {e}"));
        for g in off / G..(off + len).div_ceil(G) {
            if !std::mem::replace(&mut covered[g as usize], true) {
                count += 1;
            }
        }
    }
    f.sync_all().expect("fsync");
}

/// `qemu-io` commands writing about `target` bytes into the leaf image.
fn qemu_writes(rng: &mut SmallRng, target: u64, pattern_file: &str) -> Vec<String> {
    let mut done = 0;
    let mut cmds = Vec::new();
    while done < target {
        let len = rng.gen_range(1..=256) * 4096;
        let off = rng.gen_range(0..=(VSIZE - len) / 4096) * 4096;
        cmds.push(match rng.gen_range(0..10) {
            0..=4 => format!("write -s {pattern_file} {off} {len}"),
            5..=8 => format!("write -P {} {off} {len}", rng.gen_range(1..=255)),
            _ => format!("write -z {off} {len}"),
        });
        done += len;
    }
    cmds
}

/// Builds the tree of `spec` and records every point's disk; `None` when
/// FUSE is refused.
fn build(ws: &Workspace, spec: &Spec, rng: &mut SmallRng, tag: &str) -> Option<Refs> {
    let pool = pattern(rng.gen(), POOL);
    let pat = ws.scratch("pattern.bin");
    std::fs::write(&pat, &pool[..MIB as usize]).expect("pattern file");
    let small = rng.gen_range(3..=10) * MIB;
    let big = small + rng.gen_range(6..=16) * MIB;
    let (mid_size, child_size) = match spec.intended {
        // A root mid is committed into whatever the sizes say.
        _ if spec.mid_root && rng.gen_bool(0.3) => (small, big),
        "commit" => (big, small),
        _ => (small, big),
    };
    let leaf = format!("leaf.{}", F.ext);
    (F.create_leaf)(ws, &leaf, VSIZE);
    let first = if spec.mid_root {
        mid_size
    } else {
        rng.gen_range(4..=12) * MIB
    };
    let cmds = qemu_writes(rng, first, &pat.to_string_lossy());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    ws.qemu_io(&leaf, F.qemu_format, &cmds);
    let _ = std::fs::remove_file(&pat);

    let m = ws.mount(&["-o", "gc_idle=off"])?;
    let mnt = m.mnt.clone();
    if !spec.mid_root {
        ctl_ok(&mnt, "leaf", "snapshot base");
        fill(&mnt, "leaf", mid_size, &pool, rng);
    }
    ctl_ok(&mnt, "leaf", "snapshot mid");
    fill(&mnt, "leaf", child_size, &pool, rng);
    if spec.snap {
        ctl_ok(&mnt, "leaf", "snapshot snap");
        fill(&mnt, "leaf", rng.gen_range(1..=4) * MIB, &pool, rng);
    }
    if let Some(p) = spec.side {
        ctl_ok(&mnt, p, "clone side");
        fill(&mnt, "side", rng.gen_range(1..=4) * MIB, &pool, rng);
    }
    let want: BTreeSet<String> = spec.points().iter().map(|p| p.0.to_string()).collect();
    assert_eq!(
        visible(&mnt),
        want,
        "{tag}: points built\n{}",
        tree_text(&mnt)
    );
    let refs = spec
        .points()
        .iter()
        .map(|&(p, _)| (p, read_disk(&mnt.join(p).join("disk.raw"))))
        .collect();
    let s = m.unmount();
    assert!(s.is_some_and(|s| s.success()), "{tag}: daemon exit {s:?}");
    let mut files: Vec<String> = spec.points().iter().map(|p| file(p.0)).collect();
    files.sort();
    assert_eq!((F.images)(ws), files, "{tag}: images built");
    Some(refs)
}

// ---------------------------------------------------------------------------
// Looking at the tree directory
// ---------------------------------------------------------------------------

/// The manifest's entries for `mid` that are not garbage.
fn manifest_mid(ws: &Workspace) -> Vec<Value> {
    read_json(&ws.images.join(MANIFEST))
        .and_then(|m| m["points"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p["name"] == "mid" && p["garbage"] != Value::Bool(true))
        .collect()
}

/// Whether `mid` is still a visible point (offline variant killed before
/// `snaptree merge` hid it).
fn mid_visible(ws: &Workspace) -> bool {
    ws.img(&mid()).exists()
        && !manifest_mid(ws)
            .iter()
            .any(|p| p["hidden"] == Value::Bool(true))
}

/// Where the kill landed (see [`Moment`]), and the journal's direction.
fn classify(ws: &Workspace) -> (Moment, Option<String>) {
    let Some(j) = read_json(&ws.images.join(JOURNAL)) else {
        let m = if ws.img(&mid()).exists() {
            Moment::Before
        } else {
            Moment::After
        };
        return (m, None);
    };
    let dir = j["direction"].as_str().unwrap_or("?").to_string();
    let committed = match dir.as_str() {
        // Into a differencing image: the journal holds the re-pointing
        // writes from the commit point on.
        "stream" => j["patches"].is_array(),
        _ => {
            let at = |k: &str| ws.img(j[k].as_str().unwrap_or("?")).exists();
            !at("hidden") && at("child")
        }
    };
    let m = if committed {
        Moment::AfterCommit
    } else {
        Moment::MidMerge
    };
    (m, Some(dir))
}

/// The points below `mid` when the kill left the known window of a commit
/// whose child has children: `mid.EXT` already carries the child's id
/// (`F.id_name`, so the child's children accept it once renamed), the rename has not
/// happened, and the journal holds mid's own id for the next read-write
/// open to put back. Until then the child's parent id check fails, in
/// snaptree and in libvhdi alike. Empty otherwise.
fn adopted_id_window(ws: &Workspace, spec: &Spec) -> Vec<&'static str> {
    let j = read_json(&ws.images.join(JOURNAL)).unwrap_or_default();
    let Some(own) = j["hidden_id"].as_str() else {
        return Vec::new();
    };
    let child = file(spec.mid_child());
    // Either copy: a kill between two writes of the id leaves them apart.
    let theirs = &(F.current_id)(ws, &child);
    if !ws.img(&mid()).exists() || !(F.id_copies)(ws, &mid()).contains(theirs) {
        return Vec::new();
    }
    assert_ne!(theirs, own, "journal: {j}");
    let below = |p: &str| {
        let mut cur = Some(p);
        std::iter::from_fn(|| {
            cur = spec.parent(cur?);
            cur
        })
        .any(|a| a == "mid")
    };
    spec.visible().into_iter().filter(|p| below(p)).collect()
}

/// Every visible point's image (and `mid`'s when `with_mid`) but those in
/// `unreadable` exports to its recorded bytes, and `vhdiinfo` accepts every
/// image.
fn check_files(
    ws: &Workspace,
    spec: &Spec,
    refs: &Refs,
    with_mid: bool,
    unreadable: &[&str],
    tag: &str,
) {
    vhdiinfo_all(ws);
    let points = spec.visible().into_iter().chain(with_mid.then_some("mid"));
    for p in points.filter(|p| !unreadable.contains(p)) {
        if let Some(d) = diff_bytes(&ws.export(&file(p)), &refs[p]) {
            panic!("{tag}: snaptree export {}: {d}", file(p));
        }
    }
}

// ---------------------------------------------------------------------------
// Killing
// ---------------------------------------------------------------------------

/// SIGKILLs daemon `pid` unless dropped within `limit`: a hung mount would
/// block the test for ever. First saves where its threads wait (`gdb`
/// backtraces when installed) to `dump` and prints the summary.
struct Watchdog(Option<mpsc::Sender<()>>, Option<thread::JoinHandle<()>>);

impl Watchdog {
    fn new(pid: i32, limit: Duration, what: String, dump: std::path::PathBuf) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let t = thread::spawn(move || {
            if rx.recv_timeout(limit) != Err(mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            let mut text = format!("HUNG: daemon {pid}: {what} not done within {limit:?}\n");
            for t in std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
            {
                let p = t.map(|t| t.path()).unwrap_or_default();
                let read = |f| std::fs::read_to_string(p.join(f)).unwrap_or_default();
                text += &format!("  {} waits in {}\n", read("comm").trim(), read("wchan"));
            }
            let bt = Command::new("timeout")
                .args(["50", "gdb", "-p", &pid.to_string(), "-batch"])
                .args(["-ex", "thread apply all bt"])
                .stdin(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let _ = std::fs::write(&dump, &bt);
            for l in bt.lines().filter(|l| l.contains(" snaptree::")) {
                text += &format!("  {l}\n");
            }
            eprintln!("{text}  (stacks in {}) SIGKILL {pid}", dump.display());
            kill(pid, libc::SIGKILL);
        });
        Watchdog(Some(tx), Some(t))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.take());
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

/// Mount variant: delete `mid`, start `merge-now`, SIGKILL the daemon
/// after a random delay in [0, 1.2 × `cal`] (when calibrating: after the
/// merge, whose duration goes to `cal`). `None` when FUSE is refused.
fn kill_mounted(
    ws: &Workspace,
    rng: &mut SmallRng,
    cal: &mut Option<Duration>,
    tag: &str,
) -> Option<(Moment, Option<String>)> {
    let mut m = ws.mount(&["-o", "gc_idle=off"])?;
    let pid = m.pid();
    let dog = Watchdog::new(
        pid,
        Duration::from_secs(100),
        format!("{tag}: delete and merge-now"),
        ws.scratch(&format!("hang-{pid}.txt")),
    );
    ctl_ok(&ws.mnt, "mid", "delete");
    let (tx, rx) = mpsc::channel();
    let target = ws.mnt.join("merge-now");
    let wait = cal.map(|t| t.mul_f64(rng.gen_range(0.0..1.2)));
    let t0 = Instant::now();
    thread::spawn(move || {
        let r = OpenOptions::new()
            .write(true)
            .open(&target)
            .and_then(|mut f| f.write_all(b"1"));
        let _ = tx.send((r, t0.elapsed()));
    });
    let calibrated = match wait {
        Some(d) => {
            thread::sleep(d);
            false
        }
        None => {
            let (r, took) = rx
                .recv_timeout(Duration::from_secs(90))
                .expect("merge-now did not return within 90 s");
            if let Err(e) = r {
                panic!("{tag}: merge-now: {e}\nstatus:\n{}", status_text(&ws.mnt));
            }
            eprintln!("{tag}: mount merge takes {took:?}");
            *cal = Some(took);
            true
        }
    };
    drop(dog);
    kill(pid, libc::SIGKILL);
    m.wait_for_kill();
    let returned = calibrated
        || rx
            .recv_timeout(Duration::from_secs(20))
            .is_ok_and(|(r, _)| r.is_ok());
    lazy_umount(&ws.mnt);
    drop(m);
    let (moment, dir) = classify(ws);
    if returned {
        assert_eq!(
            moment,
            Moment::After,
            "{tag}: merge-now succeeded but the files say {moment:?}"
        );
    }
    if calibrated {
        return Some((Moment::Uninterrupted, dir));
    }
    eprintln!(
        "{tag}: killed after {:?}: {moment:?}",
        wait.unwrap_or_default()
    );
    Some((moment, dir))
}

fn snaptree(ws: &Workspace, args: &[&str], log: &str) -> Child {
    let out = File::create(ws.scratch(log)).expect("log file");
    Command::new(bin())
        .args(args)
        .current_dir("/")
        .env("SNAPTREE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup log"))
        .stderr(out)
        .spawn()
        .expect("start snaptree")
}

/// Runs `snaptree merge SRC [NAME]` to completion; it must succeed.
fn merge_ok(ws: &Workspace, name: Option<&str>, tag: &str) {
    let src = ws.images.to_string_lossy().into_owned();
    let mut args = vec!["merge", &src, "--quiet"];
    args.extend(name);
    let mut child = snaptree(ws, &args, "merge.log");
    let s = wait_child(&mut child, COMMAND_TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("{tag}: snaptree {args:?} did not finish within {COMMAND_TIMEOUT:?}")
    });
    let log = std::fs::read_to_string(ws.scratch("merge.log")).unwrap_or_default();
    assert!(s.success(), "{tag}: snaptree {args:?}: {s}\n{log}");
}

/// Offline variant: `snaptree merge SRC mid`, SIGKILLed after a random
/// delay (not at all when calibrating).
fn kill_offline(
    ws: &Workspace,
    rng: &mut SmallRng,
    cal: &mut Option<Duration>,
    tag: &str,
) -> (Moment, Option<String>) {
    let Some(t) = *cal else {
        let t0 = Instant::now();
        merge_ok(ws, Some("mid"), tag);
        let took = t0.elapsed();
        eprintln!("{tag}: offline merge takes {took:?}");
        *cal = Some(took);
        let (moment, dir) = classify(ws);
        assert_eq!(
            moment,
            Moment::After,
            "{tag}: merged, but the files say {moment:?}"
        );
        return (Moment::Uninterrupted, dir);
    };
    let d = t.mul_f64(rng.gen_range(0.0..1.2));
    let src = ws.images.to_string_lossy().into_owned();
    let t0 = Instant::now();
    let mut child = snaptree(ws, &["merge", &src, "mid", "--quiet"], "merge-killed.log");
    thread::sleep(d.saturating_sub(t0.elapsed()));
    kill(child.id() as i32, libc::SIGKILL);
    let s = wait_child(&mut child, EXIT_DEADLINE).expect("killed snaptree merge did not exit");
    let (moment, dir) = classify(ws);
    if s.success() {
        assert_eq!(
            moment,
            Moment::After,
            "{tag}: merged, but the files say {moment:?}"
        );
    }
    eprintln!("{tag}: killed after {d:?} ({s}): {moment:?}");
    (moment, dir)
}

// ---------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------

fn one_run(i: u64, run_seed: u64, cal: &mut Calibration, vhdimount: bool) -> Option<Outcome> {
    let mut rng = SmallRng::seed_from_u64(run_seed);
    let variant = if rng.gen_bool(0.3) {
        Variant::Offline
    } else {
        Variant::Mount
    };
    let spec = Spec::random(&mut rng);
    let tag = format!("run {i} ({variant:?}, {}, {})", spec.intended, spec.desc());
    let ws = Workspace::new();
    let refs = build(&ws, &spec, &mut rng, &tag)?;
    // A commit renames mid's file onto its child's, inode and all.
    let mid_inode = inode(&ws.img(&mid()));
    let child = file(spec.mid_child());

    let mut slot = cal.get(&(variant, spec.intended)).copied();
    let (moment, journal_dir) = match variant {
        Variant::Mount => kill_mounted(&ws, &mut rng, &mut slot, &tag)?,
        Variant::Offline => kill_offline(&ws, &mut rng, &mut slot, &tag),
    };
    if let Some(t) = slot {
        cal.insert((variant, spec.intended), t);
    }
    let tag = format!("{tag} killed {moment:?}");

    // Right after the kill, before anything recovers.
    let mid_seen = variant == Variant::Offline && mid_visible(&ws);
    let unreadable = adopted_id_window(&ws, &spec);
    if !unreadable.is_empty() {
        eprintln!("{tag}: killed between {} taking {child}'s {} and the rename: {unreadable:?} unreadable until the next read-write open", mid(), F.id_name);
        assert!(
            std::env::var_os(F.strict_ids_env).is_none_or(|v| v == "0"),
            "{tag}: after the kill, {unreadable:?} fail the parent id check ({})",
            F.strict_ids_env
        );
    }
    let after_kill = format!("{tag}: after the kill");
    check_files(&ws, &spec, &refs, mid_seen, &unreadable, &after_kill);

    if variant == Variant::Offline {
        merge_ok(&ws, None, &tag);
        if mid_visible(&ws) {
            merge_ok(&ws, Some("mid"), &tag);
        }
        assert!(
            !ws.img(&mid()).exists(),
            "{tag}: {} left after snaptree merge",
            mid()
        );
    }
    verify_mounted(
        &ws,
        &spec,
        &refs,
        variant == Variant::Mount && moment == Moment::Before,
        &tag,
    );

    let direction = if inode(&ws.img(&child)) == mid_inode {
        "commit"
    } else {
        "stream"
    };
    if let Some(d) = journal_dir {
        assert_eq!(
            d, direction,
            "{tag}: the journal's direction and the merge done differ"
        );
    }
    if spec.mid_root {
        assert_eq!(
            direction, "commit",
            "{tag}: a root {} was streamed into its child",
            F.name
        );
    }
    // Unmounted: images sound, only the visible points' images left, no
    // journal, mid forgotten.
    vhdiinfo_all(&ws);
    let mut want: Vec<String> = spec.visible().into_iter().map(file).collect();
    want.sort();
    assert_eq!((F.images)(&ws), want, "{tag}: images after the merge");
    assert!(
        !ws.images.join(JOURNAL).exists(),
        "{tag}: the merge journal is left"
    );
    assert!(
        manifest_mid(&ws).is_empty(),
        "{tag}: the manifest still lists mid: {:?}",
        std::fs::read_to_string(ws.images.join(MANIFEST))
    );
    if vhdimount {
        let v = VhdiMount::new(&ws, &format!("leaf.{}", F.ext));
        if let Some(d) = diff_bytes(&v.read(), &refs["leaf"]) {
            panic!("{tag}: vhdimount leaf.{} after the merge: {d}", F.ext);
        }
    }
    Some(Outcome {
        variant,
        moment,
        direction,
        intended: spec.intended,
        id_window: !unreadable.is_empty(),
    })
}

/// Remounts, checks every visible point, lets the merge complete (starting
/// it when `start_merge`: the kill came before it began), checks the
/// points and chain depths again and unmounts.
fn verify_mounted(ws: &Workspace, spec: &Spec, refs: &Refs, start_merge: bool, tag: &str) {
    let mnt = ws.mnt.clone();
    let m = ws.remount(&["-o", "gc_idle=off"]);
    let pid = m.pid();
    let dog = Watchdog::new(
        pid,
        Duration::from_secs(100),
        format!("{tag}: the checks after remount"),
        ws.scratch(&format!("hang-{pid}.txt")),
    );
    let want: BTreeSet<String> = spec.visible().iter().map(|p| p.to_string()).collect();
    assert_eq!(
        visible(&mnt),
        want,
        "{tag}: points after remount\n{}",
        tree_text(&mnt)
    );
    let compare_all = |when: &str| {
        for p in spec.visible() {
            if let Some(d) = diff_bytes(&read_disk(&mnt.join(p).join("disk.raw")), &refs[p]) {
                panic!(
                    "{tag}: {when}: {p}/disk.raw: {d}\nstatus:\n{}",
                    status_text(&mnt)
                );
            }
        }
    };
    compare_all("after remount");
    if start_merge {
        std::fs::write(mnt.join("merge-now"), "1")
            .unwrap_or_else(|e| panic!("{tag}: merge-now: {e}\nstatus:\n{}", status_text(&mnt)));
    }
    let mut status = String::new();
    let done = wait_until(MERGE_DEADLINE, || {
        // The tree before the status (see merge_crash.rs, verify_mounted):
        // "idle" read after a tree without mid can only be the end of the
        // merge that removed it.
        let names = tree_names(&tree_text(&mnt));
        status = status_text(&mnt);
        assert!(
            !status.contains("last merge: error"),
            "{tag}: the merge failed after remount:\n{status}"
        );
        !names.contains("mid") && status.contains("merge: idle")
    });
    assert!(
        done,
        "{tag}: the merge did not complete within {MERGE_DEADLINE:?} of the remount\nstatus:\n{status}\ntree:\n{}",
        tree_text(&mnt)
    );
    assert_eq!(visible(&mnt), want, "{tag}: points after the merge");
    assert!(
        !ws.img(&mid()).exists(),
        "{tag}: {} still exists after the merge",
        mid()
    );
    for p in spec.visible() {
        let info = info(&mnt, p);
        assert_eq!(
            info["disks"]["disk"]["chain_depth"].as_u64(),
            Some(spec.depth(p)),
            "{tag}: {p}/info.json chain_depth: {info}"
        );
    }
    compare_all("after the merge");
    let s = m.unmount();
    drop(dog);
    assert!(
        s.is_none_or(|s| s.success()),
        "{tag}: daemon exit status {s:?}"
    );
}

/// `vhdimount -v IMAGE DIR` in the foreground (so its pid is ours),
/// unmounted and stopped when dropped, also when the test fails.
struct VhdiMount {
    child: Child,
    dir: std::path::PathBuf,
}

impl VhdiMount {
    fn new(ws: &Workspace, image: &str) -> VhdiMount {
        let dir = ws.scratch("vhdi");
        let log = ws.scratch("vhdimount.log");
        std::fs::create_dir_all(&dir).expect("vhdimount dir");
        let child = Command::new("vhdimount")
            .arg("-v")
            .arg(ws.img(image))
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("vhdimount log"))
            .spawn()
            .expect("start vhdimount");
        let m = VhdiMount { child, dir };
        assert!(
            wait_until(Duration::from_secs(10), || m.dir.join("vhdi1").exists()),
            "vhdimount {image} did not show vhdi1: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        m
    }

    /// The image's disk: vhdimount shows the chain as `vhdi1` (the root)
    /// .. `vhdiN` (the image itself).
    fn read(&self) -> Vec<u8> {
        let n = (1..)
            .take_while(|i| self.dir.join(format!("vhdi{i}")).exists())
            .last()
            .expect("vhdi1");
        std::fs::read(self.dir.join(format!("vhdi{n}"))).expect("read vhdimount's file")
    }
}

impl Drop for VhdiMount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        if wait_child(&mut self.child, Duration::from_secs(5)).is_none() {
            kill(self.child.id() as i32, libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
