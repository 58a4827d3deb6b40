//! Bounded external commands: every `qemu-img`, `umount` or `pgrep` the
//! tests run has a timeout, and a failure is described in full (command
//! line, status, stdout, stderr) so a red test says what went wrong.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::COMMAND_TIMEOUT;

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

pub(super) fn describe_output(cmd: &Command, o: &Output) -> String {
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
