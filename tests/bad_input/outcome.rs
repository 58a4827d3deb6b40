//! Running snaptree on bad input, and what one run did.
//!
//! Why not the panicking helpers of `common::run`: here a hang, a signal or
//! a panic *is* the result under test, so a run never panics; it returns an
//! [`Outcome`] for the contract checks to judge. Every run has a deadline
//! (a hang becomes a reported failure, not a blocked CI) and is capped at a
//! 4 GiB address space, so that "allocate what the header says" fails fast
//! as SIGABRT instead of dragging the machine into the OOM killer.

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use crate::common::{run_until, shell_quote, snaptree_bin};

/// Deadline for one snaptree run on bad input. Generous: a correct
/// implementation answers in milliseconds; this only turns a hang into a
/// failure instead of a blocked CI.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Address-space cap (KiB) for every snaptree run, so that "allocate what the
/// header says" fails fast (as SIGABRT) instead of dragging the machine into
/// the OOM killer.
pub const MEM_LIMIT_KIB: u64 = 4 * 1024 * 1024;

/// What one snaptree run produced.
pub struct Outcome {
    /// The command line, shell-quoted (without the `ulimit` wrapper).
    pub cmdline: String,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// It ran past its deadline and was killed.
    pub timed_out: bool,
    /// Time from start to exit (or kill).
    pub elapsed: Duration,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error, without ANSI escapes.
    pub stderr: String,
}

impl Outcome {
    /// Command line, status and the tail of stderr, for failure messages.
    pub fn describe(&self) -> String {
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

    /// It died of a Rust panic.
    pub fn panicked(&self) -> bool {
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
pub fn snaptree<S: AsRef<OsStr>>(args: &[S]) -> Outcome {
    snaptree_with_timeout(args, RUN_TIMEOUT)
}

/// Runs snaptree under the address-space cap, killed after `timeout`.
pub fn snaptree_with_timeout<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> Outcome {
    let program = snaptree_bin();
    let cmdline = std::iter::once(program.as_os_str())
        .chain(args.iter().map(AsRef::as_ref))
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ");
    // `sh -c 'ulimit ...; exec "$0" "$@"' program args...`: the wrapper
    // execs, so the process that runs and dies is snaptree itself.
    let script = format!("ulimit -v {MEM_LIMIT_KIB} 2>/dev/null; exec \"$0\" \"$@\"");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(&program)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("NO_COLOR", "1");
    let finished = run_until(&mut cmd, timeout);
    let status = finished.output.status;
    Outcome {
        cmdline,
        code: status.code(),
        signal: status.signal(),
        timed_out: finished.timed_out,
        elapsed: finished.elapsed,
        stdout: finished.output.stdout,
        stderr: strip_ansi(&String::from_utf8_lossy(&finished.output.stderr)),
    }
}
