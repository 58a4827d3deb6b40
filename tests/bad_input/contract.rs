//! The contract a refusal of bad input must meet, and the checks of a run
//! against it.
//!
//! Why it is written down as code: "fails cleanly" is easy to claim and
//! hard to see. A failing command exits with status 1 (never 101, a panic;
//! never a signal; never a hang), its stderr names the image file and
//! contains the word `offset` followed closely by the decimal byte offset
//! that is wrong, and the input file is left alone (bytes and mtime). Each
//! check returns the list of violations rather than panicking, so a test
//! can report every failing case at once.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::outcome::{Outcome, MEM_LIMIT_KIB};

/// Bytes and mtime of a file, to prove a command left it alone.
pub struct FileState {
    path: PathBuf,
    bytes: Vec<u8>,
    mtime: SystemTime,
}

impl FileState {
    pub fn capture(path: &Path) -> FileState {
        FileState {
            path: path.to_owned(),
            bytes: fs::read(path).expect("read input file"),
            mtime: fs::metadata(path)
                .and_then(|m| m.modified())
                .expect("mtime"),
        }
    }

    /// Returns a description of any change, or None.
    pub fn changed(&self) -> Option<String> {
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

    pub fn assert_unchanged(&self, out: &Outcome) {
        if let Some(what) = self.changed() {
            panic!("input file changed: {what}\n{}", out.describe());
        }
    }
}

/// Decimal numbers in `s`, skipping hex literals and digits glued to letters
/// (`L2`, `0x1f`, `qcow2`).
pub fn decimal_tokens(s: &str) -> Vec<u64> {
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
pub struct Expect<'a> {
    /// One of these must be named in stderr.
    pub paths: &'a [&'a Path],
    /// One of these must follow the word "offset" in stderr.
    pub offsets: &'a [u64],
    /// If non-empty, one of these words must appear (case-insensitive).
    pub words: &'a [&'a str],
}

/// Returns the list of contract violations of a run that should have refused
/// the input (empty = fine).
pub fn refusal_problems(out: &Outcome, exp: &Expect) -> Vec<String> {
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
pub fn assert_refused(out: &Outcome, exp: &Expect) {
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
pub fn crash_problem(out: &Outcome) -> Option<String> {
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
