//! Running info, map and export on each bad image of a test, and collecting
//! every contract violation into one report.
//!
//! Why a report instead of asserting per run: a test covers many cases, and
//! a failing test should list every failing case and command, not just the
//! first. Most cases are a valid image with a few bytes changed, so they
//! are written as data ([`Case`]: source, edits, acceptable offsets) and
//! checked by [`check_cases`].

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::contract::{refusal_problems, Expect, FileState};
use crate::fixtures::copy_to;
use crate::outcome::{snaptree_with_timeout, RUN_TIMEOUT};
use crate::qcow2::Edit;

/// What a command must do with a corrupted image.
#[derive(Clone, Copy, PartialEq)]
pub enum Must {
    /// Refuse it cleanly.
    Fail,
    /// Refuse it cleanly, or succeed.
    FailOrSucceed,
}

/// What each of `info`, `map` and `export` must do with a corrupted image.
pub struct Runs {
    pub info: Must,
    pub map: Must,
    pub export: Must,
    /// Deadline for each of the three runs.
    pub timeout: Duration,
}

impl Runs {
    /// What each command must do, with the default deadline.
    const fn new(info: Must, map: Must, export: Must) -> Runs {
        Runs {
            info,
            map,
            export,
            timeout: RUN_TIMEOUT,
        }
    }
}

/// Every command must refuse the image.
pub const ALL_FAIL: Runs = Runs::new(Must::Fail, Must::Fail, Must::Fail);
/// The commands that read guest data must refuse it; `info` may succeed.
pub const READS_FAIL: Runs = Runs::new(Must::FailOrSucceed, Must::Fail, Must::Fail);
/// Only `export` (which reads every byte) must refuse it.
pub const EXPORT_FAILS: Runs = Runs::new(Must::FailOrSucceed, Must::FailOrSucceed, Must::Fail);
/// Any command may refuse the image or succeed, but cleanly.
pub const ANY_CLEAN: Runs = Runs::new(
    Must::FailOrSucceed,
    Must::FailOrSucceed,
    Must::FailOrSucceed,
);

/// A corrupted copy of a valid image, and what a refusal of it must name.
pub struct Case<'a> {
    /// The valid image the copy is made from.
    pub src: &'a Path,
    /// File name of the copy (next to the tests' other images), also the
    /// case's label in failure messages.
    pub name: String,
    /// What is changed in the copy.
    pub edits: Vec<Edit>,
    /// One of these must follow the word `offset` in stderr.
    pub offsets: Vec<u64>,
}

impl Case<'_> {
    /// Writes the corrupted copy into `dir` and returns its path.
    pub fn make(&self, dir: &Path) -> PathBuf {
        let img = copy_to(self.src, dir, &self.name);
        for edit in &self.edits {
            edit.apply(&img);
        }
        img
    }
}

/// Makes every case's copy in `dir` and checks it against `runs`; a
/// refusal must name the copy, one of the case's offsets and (if `words` is
/// not empty) one of `words`. Panics with every violation found.
pub fn check_cases<'a>(
    dir: &Path,
    runs: &Runs,
    words: &[&str],
    cases: impl IntoIterator<Item = Case<'a>>,
) {
    let mut report = Report::default();
    report.check_cases(dir, runs, words, cases);
    report.finish();
}

/// Collects contract violations over the cases of one test, so that a
/// failing test lists every failing case, not just the first.
#[derive(Default)]
pub struct Report {
    failures: String,
}

impl Report {
    /// See [`check_cases`].
    pub fn check_cases<'a>(
        &mut self,
        dir: &Path,
        runs: &Runs,
        words: &[&str],
        cases: impl IntoIterator<Item = Case<'a>>,
    ) {
        for case in cases {
            let img = case.make(dir);
            self.check_case(&case, &img, runs, words);
        }
    }

    /// Checks `img`, the copy [`Case::make`] made of `case`.
    pub fn check_case(&mut self, case: &Case, img: &Path, runs: &Runs, words: &[&str]) {
        let exp = Expect {
            paths: &[img],
            offsets: &case.offsets,
            words,
        };
        self.check(&case.name, img, &[], runs, &exp);
    }

    /// Runs info, map and export on `image` (with `extra` args appended),
    /// checks each against `runs`/`exp` and that `image` is untouched.
    /// `label` names the case in failure messages.
    pub fn check(&mut self, label: &str, image: &Path, extra: &[&str], runs: &Runs, exp: &Expect) {
        self.check_inputs(label, image, extra, runs, exp, &[image]);
    }

    /// As `check`, but proves every file in `inputs` untouched.
    pub fn check_inputs(
        &mut self,
        label: &str,
        image: &Path,
        extra: &[&str],
        runs: &Runs,
        exp: &Expect,
        inputs: &[&Path],
    ) {
        let out_file = image.with_extension("exported.raw");
        let commands = [
            ("info", Vec::from(args!["info", image]), runs.info),
            (
                "map",
                Vec::from(args!["map", image, "--output", "json"]),
                runs.map,
            ),
            (
                "export",
                Vec::from(args!["export", image, out_file]),
                runs.export,
            ),
        ];
        for (name, mut args, must) in commands {
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

    /// Panics with every violation collected, if any.
    pub fn finish(self) {
        assert!(self.failures.is_empty(), "\n{}", self.failures);
    }
}
