//! Running external commands (qemu-img, qemu-io, snaptree) from tests.
//!
//! Why a module of its own: a test must never hang and never fail without
//! saying what it ran. Every command here runs with stdin closed, its output
//! captured and a deadline ([`run_until`]); a failure message always shows
//! the full command line (with its working directory), the exit status,
//! stdout and stderr ([`describe_output`]).
//!
//! Each command runs in a process group of its own, and whatever is left in
//! that group when the command ends (or its deadline passes) is killed: a
//! stray grandchild holding the stdout/stderr pipes open would otherwise
//! keep the reader threads, and so the test, waiting forever.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long one external command may run before it is killed and the test
/// fails. Generous: the images are a few MiB, so anything near this is a hang.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Quotes one word for a shell command line, only where needed.
pub fn shell_quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The command as a shell line, prefixed with `cd DIR &&` when it has a
/// working directory, for failure messages and reproduction scripts.
pub fn command_line(cmd: &Command) -> String {
    let mut line = String::new();
    if let Some(dir) = cmd.get_current_dir() {
        let _ = write!(line, "cd {} && ", shell_quote(dir.as_os_str()));
    }
    line.push_str(&shell_quote(cmd.get_program()));
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&shell_quote(arg));
    }
    line
}

/// Describes a finished command for a failure message: command line, status,
/// stdout and stderr (each cut to a readable length).
pub fn describe_output(cmd: &Command, out: &Output) -> String {
    fn cut(bytes: &[u8]) -> String {
        const MAX: usize = 8000;
        let text = String::from_utf8_lossy(bytes);
        if text.len() <= MAX {
            text.trim_end().to_string()
        } else {
            let mut end = MAX;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}\n... ({} bytes in all)", &text[..end], text.len())
        }
    }
    format!(
        "command: {}\nstatus:  {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        command_line(cmd),
        out.status,
        cut(&out.stdout),
        cut(&out.stderr)
    )
}

/// How a command run by [`run_until`] ended.
pub struct Finished {
    /// Exit status (a `SIGKILL` one if the deadline passed), stdout, stderr.
    pub output: Output,
    /// The deadline passed and the command was killed.
    pub timed_out: bool,
    /// Time from start to exit (or kill).
    pub elapsed: Duration,
}

/// Runs `cmd` (stdin closed, stdout and stderr captured, in a process group
/// of its own) until it exits or `timeout` passes, when its process group is
/// killed. Never blocks longer than that; panics only if the command cannot
/// be started or waited for. What the command did is for the caller to
/// judge.
pub fn run_until(cmd: &mut Command, timeout: Duration) -> Finished {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => panic!("cannot start `{}`: {e}", command_line(cmd)),
    };
    let stdout = read_in_background(child.stdout.take().expect("stdout is piped"));
    let stderr = read_in_background(child.stderr.take().expect("stderr is piped"));
    let deadline = start + timeout;
    let mut nap = Duration::from_micros(200);
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (status, false),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(&child);
                let _ = child.kill();
                break (child.wait().expect("wait for killed child"), true);
            }
            Ok(None) => {
                thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(10));
            }
            Err(e) => panic!("waiting for `{}`: {e}", command_line(cmd)),
        }
    };
    let elapsed = start.elapsed();
    kill_group(&child);
    Finished {
        output: Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        },
        timed_out,
        elapsed,
    }
}

/// Reads `pipe` to its end on a thread of its own, so that a command filling
/// one pipe cannot block while we wait on the other.
fn read_in_background(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// SIGKILLs the process group `child` leads (only processes this test
/// started: [`run_until`] puts each command in a group of its own).
fn kill_group(child: &Child) {
    let Ok(pgid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) touches no memory; a negative pid names a group.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Runs `cmd` (stdin closed, stdout and stderr captured) and returns its
/// output whatever the exit status. Panics with a full description if it
/// cannot be started or runs longer than [`COMMAND_TIMEOUT`] (it is then
/// killed).
pub fn run_unchecked(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

/// Like [`run_unchecked`] with an explicit timeout.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let finished = run_until(cmd, timeout);
    if finished.timed_out {
        panic!(
            "timed out after {timeout:?} and killed\n{}",
            describe_output(cmd, &finished.output)
        );
    }
    finished.output
}

/// Runs `cmd` and panics with command line, status, stdout and stderr unless
/// it exits 0.
pub fn run(cmd: &mut Command) -> Output {
    let out = run_unchecked(cmd);
    if !out.status.success() {
        panic!("command failed\n{}", describe_output(cmd, &out));
    }
    out
}

/// Runs a command and returns `Err(description)` instead of panicking when it
/// exits non-zero, so a check can report several failures at once.
pub fn try_run(cmd: &mut Command) -> Result<Output, String> {
    let out = run_unchecked(cmd);
    if out.status.success() {
        Ok(out)
    } else {
        Err(describe_output(cmd, &out))
    }
}

/// A `qemu-img` command running in `dir` (so relative names resolve there).
pub fn qemu_img_cmd<I, S>(dir: &Path, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("qemu-img");
    cmd.current_dir(dir).args(args);
    cmd
}

/// Runs `qemu-img ARGS` in `dir`; panics with details unless it exits 0.
pub fn qemu_img<I, S>(dir: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut qemu_img_cmd(dir, args))
}

/// Path of the snaptree binary under test.
pub fn snaptree_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_snaptree"))
}

/// A snaptree command with `/` as working directory, so that nothing can be
/// found relative to the caller's cwd by accident. Pass absolute paths.
pub fn snaptree_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(snaptree_bin());
    cmd.current_dir("/").args(args);
    cmd
}

/// Runs `snaptree ARGS` (see [`snaptree_cmd`]); panics with details unless it
/// exits 0.
pub fn snaptree<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut snaptree_cmd(args))
}
