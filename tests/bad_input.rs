//! Bad-input integration tests for the `snaptree` CLI.
//!
//! Every test builds a valid image with qemu-img/qemu-io (the oracle for what
//! "valid" means), corrupts it by patching bytes as laid out in the qcow2
//! spec (header fields are big-endian), and runs `snaptree info`, `map` and
//! `export` on it. The contract checked here:
//!
//! * a failing command exits with status 1: never 101 (a Rust panic), never a
//!   signal (an abort after a failed huge allocation shows up as SIGABRT
//!   because every run is capped at a 4 GiB address space), never a hang
//!   (every run has a deadline and is killed and reported when it passes it);
//! * its stderr names the image file path and contains the word `offset`
//!   followed (closely) by the decimal byte offset that is wrong;
//! * the input file is never modified (bytes and mtime are compared).
//!
//! The file is self-contained on purpose: it shares no helpers with the other
//! integration tests so that it can be read (and fixed) on its own.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::ops::Range;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

const SNAPTREE: &str = env!("CARGO_BIN_EXE_snaptree");

/// Deadline for one snaptree run on bad input. Generous: a correct
/// implementation answers in milliseconds; this only turns a hang into a
/// failure instead of a blocked CI.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for one qemu-img / qemu-io run while building fixtures.
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
/// Address-space cap (KiB) for every snaptree run, so that "allocate what the
/// header says" fails fast (as SIGABRT) instead of dragging the machine into
/// the OOM killer.
const MEM_LIMIT_KIB: u64 = 4 * 1024 * 1024;

// qcow2 header field offsets (qcow2 spec, "Header").
const OFF_BACKING_FILE_OFFSET: u64 = 8;
const OFF_BACKING_FILE_SIZE: u64 = 16;
const OFF_CLUSTER_BITS: u64 = 20;
const OFF_SIZE: u64 = 24;
const OFF_CRYPT_METHOD: u64 = 32;
const OFF_L1_SIZE: u64 = 36;
const OFF_L1_TABLE_OFFSET: u64 = 40;
const OFF_INCOMPATIBLE_FEATURES: u64 = 72;
const OFF_HEADER_LENGTH: u64 = 100;

/// (offset, length) of every fixed header field up to `compression_type`.
const HEADER_FIELDS: &[(u64, u64)] = &[
    (0, 4),
    (4, 4),
    (8, 8),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 4),
    (36, 4),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 4),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 8),
    (96, 4),
    (100, 4),
    (104, 1),
];

/// Bits 9-55 of an L1 or standard L2 entry: the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const FLAG_COPIED: u64 = 1 << 63;
const FLAG_COMPRESSED: u64 = 1 << 62;

// ---------------------------------------------------------------------------
// Running processes with a deadline
// ---------------------------------------------------------------------------

/// What one process run produced.
struct Outcome {
    cmdline: String,
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    elapsed: Duration,
    stdout: Vec<u8>,
    stderr: String,
}

impl Outcome {
    fn describe(&self) -> String {
        let status = if self.timed_out {
            format!("TIMED OUT after {:?} (killed)", self.elapsed)
        } else if let Some(sig) = self.signal {
            format!("killed by signal {sig} after {:?}", self.elapsed)
        } else {
            format!("exit {:?} after {:?}", self.code, self.elapsed)
        };
        format!(
            "command: {}\nstatus:  {}\nstderr:\n{}",
            self.cmdline,
            status,
            tail(&self.stderr, 4000)
        )
    }

    fn panicked(&self) -> bool {
        self.code == Some(101) || self.stderr.contains("panicked at")
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs `program args` with a deadline; on timeout the whole process group is
/// SIGKILLed and the outcome says so (it never blocks forever).
fn run_with_deadline(
    program: &OsStr,
    args: &[OsString],
    wrapper: Option<&str>,
    timeout: Duration,
) -> Outcome {
    let cmdline = std::iter::once(program)
        .chain(args.iter().map(OsString::as_os_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = match wrapper {
        // `sh -c 'ulimit ...; exec "$0" "$@"' program args...`: the wrapper
        // execs, so the pid we wait on is the program itself.
        Some(script) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(script).arg(program).args(args);
            c
        }
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_BACKTRACE", "1")
        .env("NO_COLOR", "1")
        .process_group(0);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmdline}: {e}"));
    let pid = child.id();
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let mut timed_out = false;
    let mut nap = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => panic!("waiting for {cmdline}: {e}"),
        }
        if start.elapsed() > timeout {
            timed_out = true;
            kill_group(pid);
            let _ = child.kill();
            break child.wait().expect("wait after kill");
        }
        thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    // Anything the program left behind in its group must not keep our pipes
    // open forever.
    kill_group(pid);
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Outcome {
        cmdline,
        code: status.code(),
        signal: status.signal(),
        timed_out,
        elapsed,
        stdout,
        stderr: strip_ansi(&String::from_utf8_lossy(&stderr)),
    }
}

fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs snaptree under the address-space cap with the default deadline.
fn snaptree<S: AsRef<OsStr>>(args: &[S]) -> Outcome {
    snaptree_with_timeout(args, RUN_TIMEOUT)
}

fn snaptree_with_timeout<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Outcome {
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    let script = format!("ulimit -v {MEM_LIMIT_KIB} 2>/dev/null; exec \"$0\" \"$@\"");
    run_with_deadline(OsStr::new(SNAPTREE), &args, Some(&script), timeout)
}

// ---------------------------------------------------------------------------
// qemu helpers
// ---------------------------------------------------------------------------

/// Returns why qemu-img/qemu-io cannot be used, or None when both run.
fn qemu_missing() -> Option<String> {
    for tool in ["qemu-img", "qemu-io"] {
        match Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => return Some(format!("`{tool} --version` failed: {s}")),
            Err(e) => return Some(format!("{tool} not runnable: {e}")),
        }
    }
    None
}

macro_rules! require_qemu {
    () => {
        if let Some(why) = qemu_missing() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

/// Builds an `[OsString; N]` from string- and path-like arguments.
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        [$(OsString::from(AsRef::<OsStr>::as_ref(&$a))),*]
    };
}

fn qemu_try(tool: &str, args: &[OsString]) -> Outcome {
    run_with_deadline(OsStr::new(tool), args, None, QEMU_TIMEOUT)
}

fn qemu(tool: &str, args: &[OsString]) -> Outcome {
    let out = qemu_try(tool, args);
    assert!(
        out.code == Some(0),
        "fixture command failed:\n{}",
        out.describe()
    );
    out
}

/// `qemu-img create -f qcow2 [-o opts] path size`.
fn create_qcow2(path: &Path, opts: &str, size: &str) {
    let mut args = Vec::from(args!["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        args.extend(args!["-o", opts]);
    }
    args.extend(args![path, size]);
    qemu("qemu-img", &args);
}

/// `qemu-img create -f qcow2 -b backing -F qcow2 [-o opts] path` (the
/// backing name is stored as given, resolved relative to `path`'s folder).
fn create_overlay(path: &Path, backing_name: &str, opts: &str) {
    let mut args = Vec::from(args![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing_name,
        "-F",
        "qcow2"
    ]);
    if !opts.is_empty() {
        args.extend(args!["-o", opts]);
    }
    args.push(path.into());
    // qemu-img resolves the backing name relative to the overlay itself.
    qemu("qemu-img", &args);
}

/// Runs qemu-io commands (`-c` each) against a qcow2 image.
fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = Vec::from(args!["-f", "qcow2"]);
    for c in cmds {
        args.extend(args!["-c", c]);
    }
    args.push(path.into());
    qemu("qemu-io", &args);
}

// ---------------------------------------------------------------------------
// Header access and patching
// ---------------------------------------------------------------------------

fn be32(bytes: &[u8], off: u64) -> u32 {
    let o = off as usize;
    u32::from_be_bytes(bytes[o..o + 4].try_into().expect("4 bytes"))
}

fn be64(bytes: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_be_bytes(bytes[o..o + 8].try_into().expect("8 bytes"))
}

fn patch(path: &Path, off: u64, data: &[u8]) {
    let mut bytes = fs::read(path).expect("read image to patch");
    let o = off as usize;
    assert!(
        o + data.len() <= bytes.len(),
        "patch at {off} beyond {}",
        path.display()
    );
    bytes[o..o + data.len()].copy_from_slice(data);
    fs::write(path, bytes).expect("write patched image");
}

fn patch_be32(path: &Path, off: u64, v: u32) {
    patch(path, off, &v.to_be_bytes());
}

fn patch_be64(path: &Path, off: u64, v: u64) {
    patch(path, off, &v.to_be_bytes());
}

/// The qcow2 header fields these tests care about, read from a valid image.
#[derive(Debug, Clone, Copy)]
struct Header {
    backing_file_offset: u64,
    backing_file_size: u32,
    cluster_bits: u32,
    l1_table_offset: u64,
    file_len: u64,
}

impl Header {
    fn read(path: &Path) -> Header {
        let b = fs::read(path).expect("read header");
        assert_eq!(&b[..4], b"QFI\xfb", "{} is not qcow2", path.display());
        Header {
            backing_file_offset: be64(&b, OFF_BACKING_FILE_OFFSET),
            backing_file_size: be32(&b, OFF_BACKING_FILE_SIZE),
            cluster_bits: be32(&b, OFF_CLUSTER_BITS),
            l1_table_offset: be64(&b, OFF_L1_TABLE_OFFSET),
            file_len: b.len() as u64,
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// File offset of L1 entry `i`.
    fn l1_entry_pos(&self, i: u64) -> u64 {
        self.l1_table_offset + 8 * i
    }

    /// Host offset of the L2 table behind L1 entry `i` (must be allocated).
    fn l2_table(&self, path: &Path, i: u64) -> u64 {
        let b = fs::read(path).expect("read image");
        let l2 = be64(&b, self.l1_entry_pos(i)) & OFFSET_MASK;
        assert_ne!(l2, 0, "L1[{i}] of {} is unallocated", path.display());
        l2
    }

    /// A cluster-aligned offset well past the end of the file.
    fn past_eof(&self) -> u64 {
        let cs = self.cluster_size();
        self.file_len.div_ceil(cs) * cs + 16 * cs
    }
}

// ---------------------------------------------------------------------------
// Input-file integrity
// ---------------------------------------------------------------------------

/// Bytes and mtime of a file, to prove a command left it alone.
struct FileState {
    path: PathBuf,
    bytes: Vec<u8>,
    mtime: SystemTime,
}

impl FileState {
    fn capture(path: &Path) -> FileState {
        FileState {
            path: path.to_owned(),
            bytes: fs::read(path).expect("read input file"),
            mtime: fs::metadata(path)
                .and_then(|m| m.modified())
                .expect("mtime"),
        }
    }

    /// Returns a description of any change, or None.
    fn changed(&self) -> Option<String> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                return Some(format!(
                    "{} unreadable afterwards: {e}",
                    self.path.display()
                ))
            }
        };
        if bytes != self.bytes {
            let first = bytes
                .iter()
                .zip(&self.bytes)
                .position(|(a, b)| a != b)
                .unwrap_or(bytes.len().min(self.bytes.len()));
            return Some(format!(
                "{} was modified (length {} -> {}, first difference at byte {first})",
                self.path.display(),
                self.bytes.len(),
                bytes.len()
            ));
        }
        let mtime = fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if mtime != Some(self.mtime) {
            return Some(format!("{} mtime changed", self.path.display()));
        }
        None
    }

    fn assert_unchanged(&self, out: &Outcome) {
        if let Some(what) = self.changed() {
            panic!("input file changed: {what}\n{}", out.describe());
        }
    }
}

// ---------------------------------------------------------------------------
// Checking outcomes
// ---------------------------------------------------------------------------

/// Decimal numbers in `s`, skipping hex literals and digits glued to letters
/// (`L2`, `0x1f`, `qcow2`).
fn decimal_tokens(s: &str) -> Vec<u64> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            if b[i] == b'0' && i + 1 < b.len() && (b[i + 1] | 0x20) == b'x' {
                i += 2;
                while i < b.len() && b[i].is_ascii_hexdigit() {
                    i += 1;
                }
                continue;
            }
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
                i += 1;
            }
            let glued_before = start > 0 && b[start - 1].is_ascii_alphabetic();
            let glued_after = i < b.len() && b[i].is_ascii_alphabetic();
            if !glued_before && !glued_after {
                let digits: String = s[start..i].chars().filter(|c| *c != '_').collect();
                if let Ok(v) = digits.parse() {
                    out.push(v);
                }
            }
        } else {
            i += 1;
        }
    }
    out
}

/// How far after the word `offset` the number may stand ("offset 123",
/// "at offset: 123", "offset (file) 123", "offset 0x7b (123)").
const OFFSET_WINDOW: usize = 64;

/// Numbers standing shortly after some occurrence of the word "offset".
fn numbers_after_offset(stderr: &str) -> Vec<u64> {
    let lower = stderr.to_ascii_lowercase();
    let mut nums = Vec::new();
    for (pos, _) in lower.match_indices("offset") {
        let from = pos + "offset".len();
        let mut to = (from + OFFSET_WINDOW).min(lower.len());
        while !lower.is_char_boundary(to) {
            to -= 1;
        }
        nums.extend(decimal_tokens(&lower[from..to]));
    }
    nums
}

fn contains_any_path(stderr: &str, paths: &[&Path]) -> bool {
    paths.iter().any(|p| {
        let plain = p.display().to_string();
        let canon = fs::canonicalize(p)
            .map(|c| c.display().to_string())
            .unwrap_or_else(|_| plain.clone());
        stderr.contains(&plain) || stderr.contains(&canon)
    })
}

/// What a clean refusal of bad input must look like.
struct Expect<'a> {
    /// One of these must be named in stderr.
    paths: &'a [&'a Path],
    /// One of these must follow the word "offset" in stderr.
    offsets: &'a [u64],
    /// If non-empty, one of these words must appear (case-insensitive).
    words: &'a [&'a str],
}

/// Returns the list of contract violations of a run that should have refused
/// the input (empty = fine).
fn refusal_problems(out: &Outcome, exp: &Expect) -> Vec<String> {
    let mut p = Vec::new();
    if out.timed_out {
        p.push(format!("hung: killed after {:?}", out.elapsed));
        return p;
    }
    if let Some(sig) = out.signal {
        p.push(format!(
            "killed by signal {sig} (6 = abort, e.g. allocation failure under the {} GiB cap)",
            MEM_LIMIT_KIB >> 20
        ));
        return p;
    }
    if out.panicked() {
        p.push("panicked (exit 101 / 'panicked at')".into());
        return p;
    }
    if out.code != Some(1) {
        p.push(format!("exit status {:?}, expected 1", out.code));
        return p;
    }
    if !contains_any_path(&out.stderr, exp.paths) {
        let names: Vec<_> = exp.paths.iter().map(|p| p.display().to_string()).collect();
        p.push(format!("stderr names none of the image paths {names:?}"));
    }
    let lower = out.stderr.to_ascii_lowercase();
    if !lower.contains("offset") {
        p.push("stderr lacks the word `offset`".into());
    } else {
        let nums = numbers_after_offset(&out.stderr);
        if !nums.iter().any(|n| exp.offsets.contains(n)) {
            p.push(format!(
                "no expected byte offset after `offset` in stderr (wanted one of {:?}, found {nums:?})",
                exp.offsets
            ));
        }
    }
    if !exp.words.is_empty() && !exp.words.iter().any(|w| lower.contains(w)) {
        p.push(format!("stderr mentions none of {:?}", exp.words));
    }
    p
}

/// Asserts the run refused the input cleanly.
fn assert_refused(out: &Outcome, exp: &Expect) {
    let problems = refusal_problems(out, exp);
    assert!(
        problems.is_empty(),
        "bad input not refused cleanly: {}\n{}",
        problems.join("; "),
        out.describe()
    );
}

/// Why the run counts as a crash (signal, hang, panic, exit other than 0/1),
/// or None.
fn crash_problem(out: &Outcome) -> Option<String> {
    if out.timed_out {
        Some(format!("hung: killed after {:?}", out.elapsed))
    } else if let Some(sig) = out.signal {
        Some(format!("killed by signal {sig}"))
    } else if out.panicked() {
        Some("panicked".into())
    } else if out.code != Some(0) && out.code != Some(1) {
        Some(format!("exit status {:?}, expected 0 or 1", out.code))
    } else if out.code == Some(1) && out.stderr.trim().is_empty() {
        Some("exit 1 with an empty stderr".into())
    } else {
        None
    }
}

/// Which commands a corruption must make fail.
#[derive(Clone, Copy, PartialEq)]
enum Must {
    Fail,
    FailOrSucceed,
}

struct Runs {
    info: Must,
    map: Must,
    export: Must,
    /// Deadline for each of the three runs.
    timeout: Duration,
}

const ALL_FAIL: Runs = Runs {
    info: Must::Fail,
    map: Must::Fail,
    export: Must::Fail,
    timeout: RUN_TIMEOUT,
};
const READS_FAIL: Runs = Runs {
    info: Must::FailOrSucceed,
    map: Must::Fail,
    export: Must::Fail,
    timeout: RUN_TIMEOUT,
};
const EXPORT_FAILS: Runs = Runs {
    info: Must::FailOrSucceed,
    map: Must::FailOrSucceed,
    export: Must::Fail,
    timeout: RUN_TIMEOUT,
};

/// Collects contract violations over the cases of one test, so that a
/// failing test lists every failing case, not just the first.
#[derive(Default)]
struct Report {
    failures: String,
}

impl Report {
    /// Runs info, map and export on `image` (with `extra` args appended),
    /// checks each against `runs`/`exp` and that `image` is untouched.
    /// `label` names the case in failure messages.
    fn check(&mut self, label: &str, image: &Path, extra: &[&str], runs: &Runs, exp: &Expect) {
        self.check_inputs(label, image, extra, runs, exp, &[image]);
    }

    /// As `check`, but proves every file in `inputs` untouched.
    fn check_inputs(
        &mut self,
        label: &str,
        image: &Path,
        extra: &[&str],
        runs: &Runs,
        exp: &Expect,
        inputs: &[&Path],
    ) {
        let out_file = image.with_extension("exported.raw");
        let img = image.as_os_str().to_owned();
        let cases: [(&str, Vec<OsString>, Must); 3] = [
            ("info", vec!["info".into(), img.clone()], runs.info),
            (
                "map",
                vec!["map".into(), img.clone(), "--output".into(), "json".into()],
                runs.map,
            ),
            (
                "export",
                vec!["export".into(), img.clone(), out_file.clone().into()],
                runs.export,
            ),
        ];
        for (name, mut args, must) in cases {
            args.extend(extra.iter().map(OsString::from));
            let states: Vec<FileState> = inputs.iter().map(|p| FileState::capture(p)).collect();
            let out = snaptree_with_timeout(&args, runs.timeout);
            let _ = fs::remove_file(&out_file);
            if std::env::var_os("BAD_INPUT_VERBOSE").is_some() {
                eprintln!("[{label}] {}", out.describe());
            }
            let succeeded = out.code == Some(0) && !out.timed_out && !out.panicked();
            let mut problems = if must == Must::FailOrSucceed && succeeded {
                Vec::new()
            } else {
                refusal_problems(&out, exp)
            };
            problems.extend(states.iter().filter_map(FileState::changed));
            if !problems.is_empty() {
                let _ = writeln!(
                    self.failures,
                    "--- [{label}] `{name}`: {}\n{}\n",
                    problems.join("; "),
                    out.describe()
                );
            }
        }
    }

    fn finish(self) {
        assert!(self.failures.is_empty(), "\n{}", self.failures);
    }
}

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("snaptree-bad-input-")
        .tempdir()
        .expect("create temp dir")
}

/// Copies `src` to `dir/name` and returns the new path.
fn copy_to(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    fs::copy(src, &dst).expect("copy fixture");
    dst
}

/// A 1 MiB qcow2 (64 KiB clusters) with data at guest 0 and 512 KiB, so the
/// first L1 entry and its L2 table exist.
fn image_with_data(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let path = dir.join(name);
    create_qcow2(&path, opts, "1M");
    qemu_io(&path, &["write -P 0xab 0 64k", "write -P 0xcd 512k 4k"]);
    path
}

// ---------------------------------------------------------------------------
// Tests: headers
// ---------------------------------------------------------------------------

/// Start offsets of the header fields that `len` cuts through or that start
/// at `len` (the first field that is missing).
fn fields_cut_at(len: u64) -> Vec<u64> {
    HEADER_FIELDS
        .iter()
        .filter(|(off, size)| *off <= len && len < off + size)
        .map(|(off, _)| *off)
        .collect()
}

#[test]
fn truncated_header_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let v3 = dir.path().join("v3.qcow2");
    let v2 = dir.path().join("v2.qcow2");
    create_qcow2(&v3, "", "1M");
    create_qcow2(&v2, "compat=0.10", "1M");
    let cases: &[(&Path, &str, u64)] = &[
        (&v3, "v3", 10),
        (&v3, "v3", 50),
        (&v3, "v3", 90),
        (&v3, "v3", 72),
        (&v3, "v3", 100),
        (&v2, "v2", 10),
        (&v2, "v2", 50),
        (&v2, "v2", 70),
    ];
    for &(src, kind, len) in cases {
        let name = format!("{kind}-cut{len}.qcow2");
        let img = copy_to(src, dir.path(), &name);
        let mut bytes = fs::read(&img).unwrap();
        bytes.truncate(len as usize);
        fs::write(&img, &bytes).unwrap();
        let mut offsets = vec![0, len, 72, 104, 112];
        offsets.extend(fields_cut_at(len));
        report.check(
            &name,
            &img,
            &[],
            &ALL_FAIL,
            &Expect {
                paths: &[&img],
                offsets: &offsets,
                words: &[],
            },
        );
    }
    report.finish();
}

#[test]
fn header_length_beyond_cluster_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let big = dir.path().join("c64k.qcow2");
    let small = dir.path().join("c512.qcow2");
    create_qcow2(&big, "", "1M");
    create_qcow2(&small, "cluster_size=512", "1M");
    let cases: &[(&Path, u32)] = &[
        (&big, 65536 + 8),
        (&big, 0xffff_fff8),
        (&small, 520),
        (&small, 4096),
    ];
    for &(src, header_length) in cases {
        let cs = Header::read(src).cluster_size();
        let name = format!("hl{header_length}-c{cs}.qcow2");
        let img = copy_to(src, dir.path(), &name);
        patch_be32(&img, OFF_HEADER_LENGTH, header_length);
        report.check(
            &name,
            &img,
            &[],
            &ALL_FAIL,
            &Expect {
                paths: &[&img],
                offsets: &[OFF_HEADER_LENGTH, cs, u64::from(header_length)],
                words: &[],
            },
        );
    }
    report.finish();
}

#[test]
fn bad_cluster_bits_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = dir.path().join("src.qcow2");
    create_qcow2(&src, "", "1M");
    for bits in [0u32, 8, 22, 31, 63, 64, 255, u32::MAX] {
        let name = format!("cb{bits}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch_be32(&img, OFF_CLUSTER_BITS, bits);
        report.check(
            &name,
            &img,
            &[],
            &ALL_FAIL,
            &Expect {
                paths: &[&img],
                offsets: &[OFF_CLUSTER_BITS],
                words: &[],
            },
        );
    }
    report.finish();
}

#[test]
fn virtual_size_2_pow_63_is_refused_without_huge_allocation() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    for size in [1u64 << 63, u64::MAX, (1u64 << 63) - 512] {
        let name = format!("size{size}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch_be64(&img, OFF_SIZE, size);
        report.check(
            &name,
            &img,
            &[],
            &ALL_FAIL,
            &Expect {
                paths: &[&img],
                offsets: &[OFF_SIZE, OFF_L1_SIZE],
                words: &[],
            },
        );
    }
    report.finish();
}

#[test]
fn huge_l1_size_is_refused_without_huge_allocation() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let h = Header::read(&src);
    for l1_size in [0x0400_0000u32, 0x7fff_ffff, u32::MAX] {
        let name = format!("l1size{l1_size}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch_be32(&img, OFF_L1_SIZE, l1_size);
        report.check(
            &name,
            &img,
            &[],
            &READS_FAIL,
            &Expect {
                paths: &[&img],
                offsets: &[OFF_L1_SIZE, OFF_L1_TABLE_OFFSET, h.l1_table_offset],
                words: &[],
            },
        );
    }
    report.finish();
}

#[test]
fn unknown_incompatible_feature_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let b = fs::read(&src).unwrap();
    let base_features = be64(&b, OFF_INCOMPATIBLE_FEATURES);
    for bit in [5u32, 17, 40, 63] {
        let name = format!("feature{bit}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch_be64(&img, OFF_INCOMPATIBLE_FEATURES, base_features | (1 << bit));
        report.check(
            &name,
            &img,
            &[],
            &ALL_FAIL,
            &Expect {
                paths: &[&img],
                offsets: &[OFF_INCOMPATIBLE_FEATURES],
                words: &["feature", "incompatible", "unsupported"],
            },
        );
    }
    report.finish();
}

#[test]
fn encrypted_image_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let words: &[&str] = &["encrypt", "crypt"];
    // crypt_method 1 = the legacy AES scheme; 2 = LUKS (normally with a LUKS
    // header extension, which this patched image lacks); 7 = unknown.
    for method in [1u32, 2, 7] {
        let name = format!("crypt{method}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch_be32(&img, OFF_CRYPT_METHOD, method);
        report.check(
            &name,
            &img,
            &[],
            &EXPORT_FAILS,
            &Expect {
                paths: &[&img],
                offsets: &[OFF_CRYPT_METHOD],
                words,
            },
        );
    }
    // A real LUKS-encrypted image as qemu-img makes it.
    let luks = dir.path().join("luks.qcow2");
    let out = qemu_try(
        "qemu-img",
        &args![
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=snaptree-test",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            luks.as_os_str(),
            "1M",
        ],
    );
    if out.code != Some(0) {
        eprintln!(
            "note: cannot create a LUKS qcow2 here, patched cases only\n{}",
            out.describe()
        );
        report.finish();
        return;
    }
    report.check(
        "luks",
        &luks,
        &[],
        &EXPORT_FAILS,
        &Expect {
            paths: &[&luks],
            offsets: &[OFF_CRYPT_METHOD],
            words,
        },
    );
    report.finish();
}

#[test]
fn bad_header_pointers_are_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base, "cluster_size=512", "1M");
    let src = dir.path().join("src.qcow2");
    create_overlay(&src, "base.qcow2", "cluster_size=512");
    let b = fs::read(&src).unwrap();
    let header_length = u64::from(be32(&b, OFF_HEADER_LENGTH));
    let bfo = be64(&b, OFF_BACKING_FILE_OFFSET);
    // (name, field offset, new big-endian bytes, acceptable offsets)
    let cases: Vec<(&str, u64, Vec<u8>, Vec<u64>)> = vec![
        (
            // First header extension (backing format) claims ~4 GiB.
            "ext-len",
            header_length + 4,
            0xffff_fff0u32.to_be_bytes().to_vec(),
            vec![header_length, header_length + 4],
        ),
        (
            "backing-offset-past-cluster",
            OFF_BACKING_FILE_OFFSET,
            0x000f_fff0u64.to_be_bytes().to_vec(),
            vec![OFF_BACKING_FILE_OFFSET, OFF_BACKING_FILE_SIZE, 0x000f_fff0],
        ),
        (
            "backing-offset-overflows",
            OFF_BACKING_FILE_OFFSET,
            (u64::MAX - 15).to_be_bytes().to_vec(),
            vec![
                OFF_BACKING_FILE_OFFSET,
                OFF_BACKING_FILE_SIZE,
                u64::MAX - 15,
            ],
        ),
        (
            "backing-size-4g",
            OFF_BACKING_FILE_SIZE,
            u32::MAX.to_be_bytes().to_vec(),
            vec![OFF_BACKING_FILE_OFFSET, OFF_BACKING_FILE_SIZE, bfo],
        ),
        (
            // refcount_order above 6 (refcounts wider than 64 bits).
            "refcount-order-7",
            96,
            7u32.to_be_bytes().to_vec(),
            vec![96],
        ),
    ];
    for (what, off, bytes, offsets) in cases {
        let name = format!("{what}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch(&img, off, &bytes);
        report.check(
            &name,
            &img,
            &[],
            &ALL_FAIL,
            &Expect {
                paths: &[&img],
                offsets: &offsets,
                words: &[],
            },
        );
    }

    // Internal snapshot table: whether a read-only tool looks at it is its
    // business, but if it does it must neither crash nor allocate for 4G
    // entries.
    let lenient = Runs {
        info: Must::FailOrSucceed,
        map: Must::FailOrSucceed,
        export: Must::FailOrSucceed,
        timeout: RUN_TIMEOUT,
    };
    for (what, nb, table) in [
        ("snapshots-4g", u32::MAX, 512u64),
        ("snapshots-past-eof", 1, 0xffff_0000),
        ("snapshots-offset-overflows", 2, u64::MAX - 511),
    ] {
        let name = format!("{what}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch_be32(&img, 60, nb);
        patch_be64(&img, 64, table);
        report.check(
            &name,
            &img,
            &[],
            &lenient,
            &Expect {
                paths: &[&img],
                offsets: &[60, 64, table],
                words: &[],
            },
        );
    }
    report.finish();
}

/// Creates `dir/name`, a qcow2 whose guest range 128 KiB.. is unallocated
/// (so reads fall through) and whose backing file is `reference` (raw).
fn overlay_on(dir: &Path, name: &str, reference: &str) -> PathBuf {
    let img = image_with_data(dir, name, "");
    rebase_unsafe_fmt(&img, reference, "raw");
    img
}

#[test]
fn backing_file_that_is_missing_or_not_a_file_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    fs::create_dir(dir.path().join("subdir")).unwrap();
    let fifo = dir.path().join("fifo");
    let made_fifo = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mut cases = vec![
        ("missing", "gone.raw"),
        ("dot", "."),
        ("subdir", "subdir"),
        ("missing-in-missing-dir", "nowhere/gone.raw"),
    ];
    if made_fifo {
        // Opening a FIFO for reading blocks until a writer shows up: a tool
        // that opens whatever the image names would hang here.
        cases.push(("fifo", "fifo"));
    } else {
        eprintln!("note: mkfifo failed, FIFO case skipped");
    }
    let runs = Runs {
        info: Must::Fail,
        map: Must::Fail,
        export: Must::Fail,
        timeout: Duration::from_secs(10),
    };
    for (what, reference) in cases {
        let name = format!("{what}.qcow2");
        let img = overlay_on(dir.path(), &name, reference);
        let h = Header::read(&img);
        let target = dir.path().join(reference);
        report.check(
            &name,
            &img,
            &[],
            &runs,
            &Expect {
                paths: &[&img, &target],
                offsets: &[
                    OFF_BACKING_FILE_OFFSET,
                    OFF_BACKING_FILE_SIZE,
                    h.backing_file_offset,
                ],
                words: &[],
            },
        );
    }
    report.finish();
}

// ---------------------------------------------------------------------------
// Tests: L1 / L2 tables
// ---------------------------------------------------------------------------

#[test]
fn l1_entry_past_eof_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let h = Header::read(&src);
    let entry_pos = h.l1_entry_pos(0);
    for target in [
        h.past_eof(),
        h.file_len.div_ceil(h.cluster_size()) * h.cluster_size(),
        OFFSET_MASK & !(h.cluster_size() - 1),
    ] {
        let name = format!("l1-{target}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch_be64(&img, entry_pos, FLAG_COPIED | target);
        report.check(
            &name,
            &img,
            &[],
            &READS_FAIL,
            &Expect {
                paths: &[&img],
                offsets: &[entry_pos, target],
                words: &[],
            },
        );
    }
    report.finish();
}

#[test]
fn l1_entry_into_header_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let h = Header::read(&src);
    let entry_pos = h.l1_entry_pos(0);
    // Inside cluster 0 (the header): necessarily unaligned, since offset 0
    // itself means "unallocated".
    for target in [512u64, 0x8000] {
        let name = format!("l1-hdr{target}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch_be64(&img, entry_pos, FLAG_COPIED | target);
        report.check(
            &name,
            &img,
            &[],
            &READS_FAIL,
            &Expect {
                paths: &[&img],
                offsets: &[entry_pos, target],
                words: &[],
            },
        );
    }
    report.finish();
}

#[test]
fn l2_entry_past_eof_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = image_with_data(dir.path(), "base.qcow2", "");
    let h = Header::read(&src);
    let l2 = h.l2_table(&src, 0);
    let entry_pos = l2; // L2[0] maps guest offset 0, which holds data.
    for target in [h.past_eof(), OFFSET_MASK & !(h.cluster_size() - 1)] {
        let name = format!("l2-{target}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch_be64(&img, entry_pos, FLAG_COPIED | target);
        let exp = Expect {
            paths: &[&img],
            offsets: &[entry_pos, target],
            words: &[],
        };
        report.check(&name, &img, &[], &EXPORT_FAILS, &exp);
    }

    // The same corruption in a backing file, read through an overlay: the
    // message must name the backing file, not the overlay.
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    create_overlay(&overlay, "base.qcow2", "");
    qemu_io(&overlay, &["write -P 0x77 768k 4k"]);
    let target = h.past_eof();
    patch_be64(&base, entry_pos, FLAG_COPIED | target);
    report.check_inputs(
        "overlay over corrupt base",
        &overlay,
        &[],
        &EXPORT_FAILS,
        &Expect {
            paths: &[&base],
            offsets: &[entry_pos, target],
            words: &[],
        },
        &[&overlay, &base],
    );
    report.finish();
}

#[test]
fn l2_entry_into_header_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let h = Header::read(&src);
    let entry_pos = h.l2_table(&src, 0);
    for target in [512u64, 0x8000] {
        let name = format!("l2-hdr{target}.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        patch_be64(&img, entry_pos, FLAG_COPIED | target);
        report.check(
            &name,
            &img,
            &[],
            &EXPORT_FAILS,
            &Expect {
                paths: &[&img],
                offsets: &[entry_pos, target],
                words: &[],
            },
        );
    }
    report.finish();
}

// ---------------------------------------------------------------------------
// Tests: compressed clusters
// ---------------------------------------------------------------------------

/// A compressed L2 entry decoded per the spec: where its bytes are.
struct Compressed {
    entry_pos: u64,
    host_offset: u64,
    /// End (exclusive) of the sectors the descriptor says it uses.
    end: u64,
}

/// Whether `qemu-img convert` reads every byte of `img` (run on a copy, so
/// qemu can never flag or repair the original).
fn qemu_reads_ok(img: &Path) -> bool {
    let dir = tempdir();
    let copy = dir.path().join("copy.qcow2");
    fs::copy(img, &copy).expect("copy for qemu");
    let out = dir.path().join("out.raw");
    let res = qemu_try(
        "qemu-img",
        &args!["convert", "-O", "raw", copy.as_os_str(), out.as_os_str(),],
    );
    res.code == Some(0)
}

fn first_compressed(path: &Path) -> Compressed {
    let h = Header::read(path);
    let b = fs::read(path).unwrap();
    let l2 = h.l2_table(path, 0);
    let entries = h.cluster_size() / 8;
    for i in 0..entries {
        let pos = l2 + 8 * i;
        let e = be64(&b, pos);
        if e & FLAG_COMPRESSED == 0 {
            continue;
        }
        let x = 62 - (u64::from(h.cluster_bits) - 8);
        let host_offset = e & ((1 << x) - 1);
        let sectors = ((e >> x) & ((1 << (62 - x)) - 1)) + 1;
        let end = (host_offset & !511) + sectors * 512;
        return Compressed {
            entry_pos: pos,
            host_offset,
            end,
        };
    }
    panic!("no compressed cluster in {}", path.display());
}

/// Converts `raw` to a compressed qcow2 with the given compression type;
/// returns None (after a note) when this qemu-img cannot.
fn compressed_image(dir: &Path, raw: &Path, ctype: &str) -> Option<PathBuf> {
    let img = dir.join(format!("{ctype}.qcow2"));
    let opts = format!("compression_type={ctype}");
    let out = qemu_try(
        "qemu-img",
        &args![
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            raw.as_os_str(),
            img.as_os_str(),
        ],
    );
    if out.code != Some(0) {
        eprintln!("note: no {ctype} compression here\n{}", out.describe());
        return None;
    }
    Some(img)
}

#[test]
fn compressed_cluster_that_does_not_inflate_fails_export() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let raw = dir.path().join("data.raw");
    let text: Vec<u8> = b"snaptree compressed cluster test line\n"
        .iter()
        .copied()
        .cycle()
        .take(4 * 65536)
        .collect();
    fs::write(&raw, &text).unwrap();
    for ctype in ["zlib", "zstd"] {
        let Some(src) = compressed_image(dir.path(), &raw, ctype) else {
            assert_ne!(ctype, "zlib", "qemu-img cannot write zlib-compressed qcow2");
            continue;
        };
        let c = first_compressed(&src);
        let len = (c.end - c.host_offset) as usize;
        // A stream that ends early: valid, but inflates to far less than a
        // cluster (qemu treats that as an I/O error too).
        let short: Vec<u8> = match ctype {
            "zlib" => {
                use flate2::write::DeflateEncoder;
                use std::io::Write;
                let mut enc = DeflateEncoder::new(Vec::new(), flate2::Compression::default());
                enc.write_all(&[0x5a; 100]).unwrap();
                enc.finish().unwrap()
            }
            _ => zstd::bulk::compress(&[0x5a; 100], 3).unwrap(),
        };
        assert!(short.len() <= len, "short stream does not fit");
        // 0xff: as raw deflate, BFINAL=1 with the reserved block type 3; as
        // zstd, a bad magic number. Never inflates.
        let garbage = vec![0xffu8; len];
        // Keep the first bytes of the real stream, scramble the rest. Whether
        // that still inflates depends on the bytes, so qemu decides: the case
        // is only checked when qemu-img itself cannot read the result.
        let scrambled: Vec<u8> = {
            let mut rng = SmallRng::seed_from_u64(0x00c0_ffee);
            let mut g = fs::read(&src).unwrap()[c.host_offset as usize..c.end as usize].to_vec();
            for byte in g.iter_mut().skip(4) {
                *byte = rng.gen();
            }
            g
        };
        let cases: [(&str, &[u8]); 3] = [
            ("ff", &garbage),
            ("short", &short),
            ("scrambled", &scrambled),
        ];
        let offsets = [c.host_offset, c.host_offset & !511, c.entry_pos];
        for (what, bytes) in cases {
            let name = format!("{ctype}-{what}.qcow2");
            let img = copy_to(&src, dir.path(), &name);
            patch(&img, c.host_offset, bytes);
            if what == "scrambled" && qemu_reads_ok(&img) {
                eprintln!("note: {name} still reads in qemu-img; case skipped");
                continue;
            }
            report.check(
                &name,
                &img,
                &[],
                &EXPORT_FAILS,
                &Expect {
                    paths: &[&img],
                    offsets: &offsets,
                    words: &[],
                },
            );
        }
        // A compressed descriptor whose bytes lie past the end of the file.
        let h = Header::read(&src);
        let name = format!("{ctype}-past-eof.qcow2");
        let img = copy_to(&src, dir.path(), &name);
        let x = 62 - (u64::from(h.cluster_bits) - 8);
        let target = h.past_eof() + 1024;
        assert!(target < 1 << x);
        patch_be64(&img, c.entry_pos, FLAG_COMPRESSED | target);
        report.check(
            &name,
            &img,
            &[],
            &EXPORT_FAILS,
            &Expect {
                paths: &[&img],
                offsets: &[target, c.entry_pos],
                words: &[],
            },
        );
    }
    report.finish();
}

// ---------------------------------------------------------------------------
// Tests: backing chains
// ---------------------------------------------------------------------------

fn rebase_unsafe(img: &Path, backing_name: &str) {
    rebase_unsafe_fmt(img, backing_name, "qcow2");
}

/// `qemu-img rebase -u`: rewrites the backing reference without opening it.
fn rebase_unsafe_fmt(img: &Path, backing_name: &str, format: &str) {
    qemu(
        "qemu-img",
        &args!["rebase", "-u", "-b", backing_name, "-F", format, img],
    );
}

const CYCLE_WORDS: &[&str] = &[
    "cycle", "loop", "itself", "circular", "recurs", "depth", "deep",
];

#[test]
fn self_referencing_backing_file_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    for (file, reference) in [
        ("self.qcow2", "self.qcow2".to_string()),
        ("dot.qcow2", "./dot.qcow2".to_string()),
        (
            "abs.qcow2",
            dir.path().join("abs.qcow2").display().to_string(),
        ),
    ] {
        let img = image_with_data(dir.path(), file, "");
        rebase_unsafe(&img, &reference);
        let h = Header::read(&img);
        assert_eq!(h.backing_file_size as usize, reference.len());
        report.check(
            file,
            &img,
            &[],
            &READS_FAIL,
            &Expect {
                paths: &[&img],
                offsets: &[
                    OFF_BACKING_FILE_OFFSET,
                    OFF_BACKING_FILE_SIZE,
                    h.backing_file_offset,
                ],
                words: CYCLE_WORDS,
            },
        );
    }
    report.finish();
}

#[test]
fn two_image_backing_cycle_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let a = image_with_data(dir.path(), "a.qcow2", "");
    let b = dir.path().join("b.qcow2");
    create_overlay(&b, "a.qcow2", "");
    qemu_io(&b, &["write -P 0x42 128k 4k"]);
    rebase_unsafe(&a, "b.qcow2");
    let ha = Header::read(&a);
    let hb = Header::read(&b);
    let exp = Expect {
        paths: &[&a, &b],
        offsets: &[
            OFF_BACKING_FILE_OFFSET,
            OFF_BACKING_FILE_SIZE,
            ha.backing_file_offset,
            hb.backing_file_offset,
        ],
        words: CYCLE_WORDS,
    };
    report.check_inputs("a->b->a", &a, &[], &READS_FAIL, &exp, &[&a, &b]);
    report.check_inputs("b->a->b", &b, &[], &READS_FAIL, &exp, &[&a, &b]);
    report.finish();
}

const DEEP_CHAIN: usize = 10_000;

fn chain_name(i: usize) -> String {
    format!("c{i:05}.qcow2")
}

/// Builds c00000.qcow2 <- c00001.qcow2 <- ... <- c{n-1}.qcow2: two images
/// from qemu-img, the rest cloned from the second with the (same-length)
/// backing name patched in place.
fn build_chain(dir: &Path, n: usize) -> Header {
    let base = dir.join(chain_name(0));
    create_qcow2(&base, "cluster_size=512", "1M");
    qemu_io(&base, &["write -P 0x01 0 512"]);
    let second = dir.join(chain_name(1));
    create_overlay(&second, &chain_name(0), "cluster_size=512");
    let template = fs::read(&second).unwrap();
    let h = Header::read(&second);
    assert_eq!(h.backing_file_size as usize, chain_name(0).len());
    let at = h.backing_file_offset as usize;
    for i in 2..n {
        let mut bytes = template.clone();
        bytes[at..at + chain_name(0).len()].copy_from_slice(chain_name(i - 1).as_bytes());
        fs::write(dir.join(chain_name(i)), bytes).unwrap();
    }
    h
}

#[test]
fn chain_of_10000_images_fails_fast_at_depth_cap() {
    require_qemu!();
    let started = Instant::now();
    let dir = tempdir();
    let mut report = Report::default();
    let h = build_chain(dir.path(), DEEP_CHAIN);
    eprintln!(
        "built a {DEEP_CHAIN}-image chain in {:?}",
        started.elapsed()
    );
    let leaf = dir.path().join(chain_name(DEEP_CHAIN - 1));
    let watched: Vec<PathBuf> = [0, 1, DEEP_CHAIN - 1025, DEEP_CHAIN - 2, DEEP_CHAIN - 1]
        .iter()
        .map(|&i| dir.path().join(chain_name(i)))
        .collect();
    let watched_refs: Vec<&Path> = watched.iter().map(PathBuf::as_path).collect();
    let chain_files: Vec<PathBuf> = (0..DEEP_CHAIN)
        .map(|i| dir.path().join(chain_name(i)))
        .collect();
    let chain_refs: Vec<&Path> = chain_files.iter().map(PathBuf::as_path).collect();
    let offsets = [
        OFF_BACKING_FILE_OFFSET,
        OFF_BACKING_FILE_SIZE,
        h.backing_file_offset,
    ];

    // Default cap: 1024 layers; the message must say so.
    let exp = Expect {
        paths: &chain_refs,
        offsets: &offsets,
        words: &["deep", "depth"],
    };
    report.check_inputs("default cap", &leaf, &[], &READS_FAIL, &exp, &watched_refs);
    let out = snaptree(&args!["map", leaf.as_os_str(), "--output", "json"]);
    assert!(
        decimal_tokens(&out.stderr).contains(&1024),
        "depth error does not name the cap 1024\n{}",
        out.describe()
    );

    // An explicit cap is honoured and named too.
    let ten = dir.path().join(chain_name(9));
    let out = snaptree(&args![
        "map",
        ten.as_os_str(),
        "--output",
        "json",
        "--max-depth",
        "8",
    ]);
    assert_refused(&out, &exp);
    assert!(
        decimal_tokens(&out.stderr).contains(&8),
        "depth error does not name the cap 8\n{}",
        out.describe()
    );
    report.check_inputs(
        "--max-depth 8, 10 layers",
        &ten,
        &["--max-depth", "8"],
        &READS_FAIL,
        &exp,
        &watched_refs,
    );

    // ...and a chain within the cap works.
    let six = dir.path().join(chain_name(5));
    let out = snaptree(&args![
        "map",
        six.as_os_str(),
        "--output",
        "json",
        "--max-depth",
        "8",
    ]);
    assert!(
        out.code == Some(0),
        "6-layer chain with --max-depth 8 should map\n{}",
        out.describe()
    );
    assert!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok(),
        "map --output json printed no valid JSON\n{}",
        out.describe()
    );
    let elapsed = started.elapsed();
    eprintln!("deep-chain test took {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(60),
        "deep-chain test took {elapsed:?} (limit 60 s)"
    );
    report.finish();
}

// ---------------------------------------------------------------------------
// Tests: positive control and fuzzing
// ---------------------------------------------------------------------------

/// DESIGN.md: dirty images open read-only. Setting the dirty bit is not bad
/// input; this keeps the refusals above honest (a tool that refuses every
/// image would pass them).
#[test]
fn dirty_bit_is_not_refused() {
    require_qemu!();
    let dir = tempdir();
    let img = image_with_data(dir.path(), "dirty.qcow2", "");
    let expected = dir.path().join("expected.raw");
    qemu(
        "qemu-img",
        &args![
            "convert",
            "-O",
            "raw",
            img.as_os_str(),
            expected.as_os_str(),
        ],
    );
    let b = fs::read(&img).unwrap();
    patch_be64(
        &img,
        OFF_INCOMPATIBLE_FEATURES,
        be64(&b, OFF_INCOMPATIBLE_FEATURES) | 1,
    );
    let state = FileState::capture(&img);
    let out_file = dir.path().join("out.raw");
    let out = snaptree(&args!["export", img.as_os_str(), out_file.as_os_str()]);
    state.assert_unchanged(&out);
    assert!(
        out.code == Some(0),
        "export of a dirty image failed\n{}",
        out.describe()
    );
    assert!(
        fs::read(&out_file).unwrap() == fs::read(&expected).unwrap(),
        "export of a dirty image differs from qemu-img convert"
    );
}

/// Small valid images for the fuzzer: mostly 512-byte clusters, so that the
/// files are tiny and flips land in metadata.
fn fuzz_seeds(dir: &Path) -> Vec<PathBuf> {
    let base = dir.join("fbase.qcow2");
    create_qcow2(&base, "cluster_size=512", "256K");
    qemu_io(&base, &["write -P 0x33 0 8k", "write -P 0x44 128k 1k"]);

    let v3 = dir.join("fv3.qcow2");
    create_overlay(&v3, "fbase.qcow2", "cluster_size=512");
    qemu_io(
        &v3,
        &[
            "write -P 0x11 0 4k",
            "write -z 8k 2k",
            "write -c -P 0x22 64k 512",
            "write -c -P 0x23 66048 512",
            "write -P 0x55 200k 3k",
        ],
    );

    let v2 = dir.join("fv2.qcow2");
    create_qcow2(&v2, "cluster_size=512,compat=0.10", "256K");
    qemu_io(
        &v2,
        &[
            "write -P 0x66 0 2k",
            "write -c -P 0x77 32k 512",
            "write -P 0x88 100k 1k",
        ],
    );
    // Subclusters (extended L2 entries) and zstd.
    let ext = dir.join("fext.qcow2");
    create_overlay(
        &ext,
        "fbase.qcow2",
        "cluster_size=16k,extended_l2=on,compression_type=zstd",
    );
    qemu_io(
        &ext,
        &[
            "write -P 0x99 1k 1k",
            "write -z 20k 1k",
            "write -c -P 0xaa 64k 16k",
            "write -P 0xbb 130k 3k",
        ],
    );
    vec![v3, v2, ext]
}

/// Byte ranges of a valid qcow2 holding metadata: header fields, header
/// extensions and backing name, L1 table, L2 tables, refcount table.
fn metadata_ranges(b: &[u8]) -> Vec<Range<usize>> {
    let cluster = 1usize << be32(b, OFF_CLUSTER_BITS);
    let version = be32(b, 4);
    let header_len = if version >= 3 {
        be32(b, OFF_HEADER_LENGTH) as usize
    } else {
        72
    };
    let mut ranges = Vec::new();
    ranges.push(0..header_len);
    // Extensions follow the header up to the backing name (or a short way).
    let bfo = be64(b, OFF_BACKING_FILE_OFFSET) as usize;
    let bfs = be32(b, OFF_BACKING_FILE_SIZE) as usize;
    let ext_end = if bfo > 0 { bfo + bfs } else { header_len + 256 };
    ranges.push(header_len..ext_end.min(cluster));
    let l1 = be64(b, OFF_L1_TABLE_OFFSET) as usize;
    let l1_size = be32(b, OFF_L1_SIZE) as usize;
    ranges.push(l1..l1 + 8 * l1_size);
    for i in 0..l1_size {
        let l2 = (be64(b, (l1 + 8 * i) as u64) & OFFSET_MASK) as usize;
        if l2 != 0 {
            ranges.push(l2..l2 + cluster);
        }
    }
    let rt = be64(b, 48) as usize;
    ranges.push(rt..rt + cluster);
    ranges.retain(|r| r.start < r.end && r.end <= b.len());
    ranges
}

#[test]
fn random_byte_flips_never_crash() {
    require_qemu!();
    let iterations: usize = std::env::var("SNAPTREE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    const MAX_REPORTED: usize = 5;
    let dir = tempdir();
    let seeds = fuzz_seeds(dir.path());
    let seed_bytes: Vec<Vec<u8>> = seeds.iter().map(|p| fs::read(p).unwrap()).collect();
    let hot: Vec<Vec<Range<usize>>> = seed_bytes.iter().map(|b| metadata_ranges(b)).collect();
    let seed: u64 = std::env::var("SNAPTREE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_bad1);
    let mut rng = SmallRng::seed_from_u64(seed);
    let img = dir.path().join("fuzz.qcow2");
    let out_file = dir.path().join("fuzz.raw");
    let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad_input_fuzz");
    let mut failures: Vec<String> = Vec::new();
    let mut refused = 0usize;
    let mut runs = 0usize;
    for iter in 0..iterations {
        let which = iter % seeds.len();
        let mut bytes = seed_bytes[which].clone();
        let flips = rng.gen_range(1..=4);
        let mut log = Vec::new();
        for _ in 0..flips {
            // Most flips land in metadata, where they matter.
            let pos = if rng.gen_bool(0.65) {
                let r = &hot[which][rng.gen_range(0..hot[which].len())];
                rng.gen_range(r.clone())
            } else {
                rng.gen_range(0..bytes.len())
            };
            let old = bytes[pos];
            bytes[pos] = match rng.gen_range(0..4) {
                0 => old ^ (1 << rng.gen_range(0..8)),
                1 => 0xff,
                2 => 0x00,
                _ => old ^ rng.gen_range(1..=255u8),
            };
            log.push(format!("{pos}:{old:#04x}->{:#04x}", bytes[pos]));
        }
        fs::write(&img, &bytes).unwrap();
        let commands = [
            args!["info", img].to_vec(),
            args!["info", img, "--json"].to_vec(),
            args!["map", img, "--output", "json"].to_vec(),
            args!["export", img, out_file].to_vec(),
        ];
        for args in commands {
            let state = FileState::capture(&img);
            let out = snaptree_with_timeout(&args, Duration::from_secs(20));
            let _ = fs::remove_file(&out_file);
            runs += 1;
            if out.code == Some(1) {
                refused += 1;
            }
            let problem = crash_problem(&out).or_else(|| state.changed());
            if let Some(problem) = problem {
                let _ = fs::create_dir_all(&keep);
                let kept = keep.join(format!(
                    "iter{iter}-{}",
                    seeds[which].file_name().unwrap().to_string_lossy()
                ));
                let _ = fs::write(&kept, &bytes);
                let _ = fs::copy(dir.path().join("fbase.qcow2"), keep.join("fbase.qcow2"));
                failures.push(format!(
                    "iteration {iter} (seed image {}, flips {}), kept as {}: {problem}\n{}",
                    seeds[which].display(),
                    log.join(" "),
                    kept.display(),
                    out.describe()
                ));
                break;
            }
        }
        if failures.len() >= MAX_REPORTED {
            break;
        }
    }
    eprintln!(
        "fuzz (seed {seed}): {runs} runs, {refused} refused with exit 1, {} crashes",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} fuzz case(s) crashed/hung (stopped after {MAX_REPORTED}):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
