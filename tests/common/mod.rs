//! Shared helpers for snaptree's integration tests.
//!
//! DESIGN.md ("Testing: real peers are the oracle"): `qemu-img` and `qemu-io`
//! build the images a test reads, and their answers are the expected results.
//! This module holds everything a test needs to do that without repeating
//! itself:
//!
//! - **Skipping honestly.** [`require_qemu`] (and [`require_tools`],
//!   [`require_qemu_zstd`]) check that the peers exist; if not they print
//!   `SKIP: <test>: <why>` to stderr and return `false`, and the test returns
//!   early. A test never passes silently without having run.
//! - **Running commands.** [`run`] / [`run_unchecked`] run a [`Command`] with a
//!   timeout; a failure message always shows the full command line (with its
//!   working directory), the exit status, stdout and stderr.
//! - **Building chains.** [`Chain`] creates a backing chain in its own temp
//!   directory with `qemu-img create -q` / `qemu-io`, with backing files named
//!   relative to the image directory (so snaptree's relative resolution is
//!   exercised), and records every construction command so a failure message
//!   doubles as a reproduction script. [`qio`] builds `qemu-io` command
//!   strings.
//! - **Comparing bytes.** [`diff_bytes`] / [`diff_files`] /
//!   [`assert_same_file`] describe every differing byte range, not just the
//!   first byte; file comparison reads only data ranges (`SEEK_DATA`), so
//!   sparse multi-GiB disks compare quickly.
//! - **Comparing maps.** [`parse_map`] reads `map --output json` (snaptree's or
//!   `qemu-img map --output=json`'s) into [`MapEntry`]s, [`extents`] validates
//!   and expands them into per-byte attribute intervals ([`Extent`]), and
//!   [`diff_extents`] compares two maps over the union of their boundaries, so
//!   the two tools may split entries differently.
//! - **The whole differential check** of one image against qemu:
//!   [`assert_matches_qemu`].
//!
//! Every snaptree invocation runs with `/` as its working directory and an
//! absolute image path: a backing file must be found relative to the image
//! that names it, never relative to the caller's cwd.
//!
//! Set `SNAPTREE_KEEP_TEST_DIRS=1` to keep each chain's temp directory (its
//! path is printed) for a post-mortem with qemu-img; the qemu and snaptree
//! outputs of [`assert_matches_qemu`] are left in it under `check-*` names.
//!
//! Each test binary uses only part of this module, hence `dead_code` is
//! allowed here.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{Read, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// 1 KiB.
pub const KIB: u64 = 1024;
/// 1 MiB.
pub const MIB: u64 = 1024 * 1024;

/// How long one external command may run before it is killed and the test
/// fails. Generous: the images are a few MiB, so anything near this is a hang.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Skipping
// ---------------------------------------------------------------------------

/// Name of the running test (libtest names each test's thread after it).
pub fn test_name() -> String {
    thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

/// Writes a line to the process's real stderr. Unlike `eprintln!`, this is
/// not captured by the test harness, so it is visible even for passing tests.
pub fn note(line: impl fmt::Display) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Prints `SKIP: <test>: <reason>` to stderr (uncaptured, see [`note`]).
/// Call it, then return from the test: a test that cannot run must say so,
/// not pass silently.
pub fn skip(reason: impl fmt::Display) {
    note(format_args!("SKIP: {}: {reason}", test_name()));
}

/// Checks that every tool answers `TOOL --version`. If one does not, prints
/// `SKIP: <test>: <why>` and returns `false`; the caller should return.
pub fn require_tools(tools: &[&str]) -> bool {
    for tool in tools {
        match Command::new(tool).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                skip(format!(
                    "`{tool} --version` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                return false;
            }
            Err(e) => {
                skip(format!(
                    "`{tool}` is not usable ({e}); install it (Debian: qemu-utils) to run this test"
                ));
                return false;
            }
        }
    }
    true
}

/// Checks that `qemu-img` and `qemu-io` are installed and runnable (see
/// [`require_tools`]). Returns `false` after printing a `SKIP:` line if not.
pub fn require_qemu() -> bool {
    require_tools(&["qemu-img", "qemu-io"])
}

/// Checks that this qemu-img can create zstd-compressed qcow2 images (QEMU
/// may be built without zstd). Returns `false` after printing a `SKIP:` line
/// if not. Call [`require_qemu`] first.
pub fn require_qemu_zstd() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        let dir = TempDir::with_prefix("snaptree-zstd-probe-").map_err(|e| e.to_string())?;
        let out = run_unchecked(Command::new("qemu-img").current_dir(dir.path()).args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "probe.qcow2",
            "1M",
        ]));
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    });
    match probe {
        Ok(()) => true,
        Err(why) => {
            skip(format!(
                "qemu-img cannot create zstd-compressed qcow2: {why}"
            ));
            false
        }
    }
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

fn shell_quote(s: &OsStr) -> String {
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

/// Runs `cmd` (stdin closed, stdout and stderr captured) and returns its
/// output whatever the exit status. Panics with a full description if it
/// cannot be started or runs longer than [`COMMAND_TIMEOUT`] (it is then
/// killed).
pub fn run_unchecked(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

/// Like [`run_unchecked`] with an explicit timeout.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => panic!("cannot start `{}`: {e}", command_line(cmd)),
    };
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_micros(200);
    let (status, timed_out): (ExitStatus, bool) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (status, false),
            Ok(None) if Instant::now() >= deadline => {
                // Only our own child, by its handle.
                let _ = child.kill();
                let status = child.wait().expect("wait for killed child");
                break (status, true);
            }
            Ok(None) => {
                thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(10));
            }
            Err(e) => panic!("waiting for `{}`: {e}", command_line(cmd)),
        }
    };
    let out = Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    };
    if timed_out {
        panic!(
            "timed out after {timeout:?} and killed\n{}",
            describe_output(cmd, &out)
        );
    }
    out
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

// ---------------------------------------------------------------------------
// qemu-io command strings
// ---------------------------------------------------------------------------

/// Builders for `qemu-io -c` command strings. Offsets and lengths are bytes
/// and may be unaligned (qemu-io does read-modify-write as needed).
pub mod qio {
    /// `write -P PATTERN OFF LEN`: fill with one byte value.
    pub fn write(pattern: u8, off: u64, len: u64) -> String {
        format!("write -P {pattern} {off} {len}")
    }

    /// `write -z OFF LEN`: zero write (a zero cluster/subcluster in qcow2 v3,
    /// keeping any host allocation).
    pub fn zero(off: u64, len: u64) -> String {
        format!("write -z {off} {len}")
    }

    /// `write -z -u OFF LEN`: zero write that may unmap (drop allocation).
    pub fn zero_unmap(off: u64, len: u64) -> String {
        format!("write -z -u {off} {len}")
    }

    /// `write -c -P PATTERN OFF LEN`: compressed write; OFF and LEN must be
    /// cluster-aligned.
    pub fn write_compressed(pattern: u8, off: u64, len: u64) -> String {
        format!("write -c -P {pattern} {off} {len}")
    }

    /// `discard OFF LEN`: unaligned head and tail are ignored by qemu.
    pub fn discard(off: u64, len: u64) -> String {
        format!("discard {off} {len}")
    }
}

// ---------------------------------------------------------------------------
// Chains
// ---------------------------------------------------------------------------

/// Image formats a [`Chain`] layer can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Plain raw file (only as a base).
    Raw,
    /// qcow2, any version/options.
    Qcow2,
}

impl Format {
    /// The name qemu uses (`-f`/`-F`/`-O`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// One image of a [`Chain`].
#[derive(Clone, Debug)]
pub struct Layer {
    /// File name inside the chain directory (what the child's header names).
    pub name: String,
    /// Absolute path.
    pub path: PathBuf,
    /// Image format.
    pub format: Format,
}

/// A backing chain built by qemu tools in its own temporary directory.
///
/// Layers are kept **base first**: `layers()[0]` is the base, the last one the
/// leaf. `qemu-img map` depths count the other way, from the mapped image
/// down; [`Chain::layer_at_depth`] converts. Every overlay names its backing
/// file by bare file name, i.e. relative to its own directory.
///
/// All builder methods panic (with the failing command's output) on error,
/// and return `&mut Self` to chain calls.
pub struct Chain {
    dir: Option<TempDir>,
    path: PathBuf,
    layers: Vec<Layer>,
    log: Vec<String>,
}

impl Default for Chain {
    fn default() -> Self {
        Self::new()
    }
}

impl Chain {
    /// An empty chain in a fresh temp directory.
    pub fn new() -> Self {
        let dir = TempDir::with_prefix("snaptree-test-").expect("create temp dir");
        let path = dir.path().to_path_buf();
        Chain {
            dir: Some(dir),
            path,
            layers: Vec::new(),
            log: Vec::new(),
        }
    }

    /// The chain's directory.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// Absolute path of `name` inside the chain directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// All layers, base first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The leaf (last added) layer. Panics on an empty chain.
    pub fn leaf(&self) -> &Layer {
        self.layers.last().expect("chain has no layers yet")
    }

    /// Index (base first) of the leaf.
    pub fn leaf_index(&self) -> usize {
        self.layers.len() - 1
    }

    /// The layer a `map` entry of image `top` (base-first index) with the
    /// given `depth` refers to.
    pub fn layer_at_depth(&self, top: usize, depth: u64) -> Option<&Layer> {
        let depth = usize::try_from(depth).ok()?;
        top.checked_sub(depth).map(|i| &self.layers[i])
    }

    /// Every construction command so far, one per line, runnable in
    /// [`Chain::dir`]: a reproduction script for failure messages.
    pub fn script(&self) -> String {
        self.log.join("\n")
    }

    fn run_logged(&mut self, mut cmd: Command) -> Output {
        let line = command_line(&cmd);
        let dir_prefix = format!("cd {} && ", shell_quote(self.path.as_os_str()));
        self.log
            .push(line.strip_prefix(&dir_prefix).unwrap_or(&line).to_string());
        run(&mut cmd)
    }

    fn push(&mut self, name: &str, format: Format) {
        assert!(
            self.layers.iter().all(|l| l.name != name),
            "layer name {name} used twice"
        );
        self.layers.push(Layer {
            name: name.to_string(),
            path: self.file(name),
            format,
        });
    }

    /// Runs `qemu-img ARGS` in the chain directory, logged in
    /// [`Chain::script`], without adding a layer (scratch images, rebase...).
    pub fn qemu_img<S: AsRef<OsStr>>(&mut self, args: &[S]) -> Output {
        let cmd = qemu_img_cmd(&self.path, args);
        self.run_logged(cmd)
    }

    /// Creates the base image: `qemu-img create -q -f FORMAT [-o OPTS] NAME SIZE`.
    /// `opts` are joined with commas (e.g. `["cluster_size=512", "compat=0.10"]`).
    pub fn base(&mut self, name: &str, format: Format, size: u64, opts: &[&str]) -> &mut Self {
        assert!(self.layers.is_empty(), "base() on a non-empty chain");
        self.create_image(name, format, size, opts);
        self.push(name, format);
        self
    }

    /// Creates an image that is not (yet) part of the chain, e.g. the source
    /// of a conversion. Fill it with [`Chain::io_file`].
    pub fn create_image(&mut self, name: &str, format: Format, size: u64, opts: &[&str]) {
        let mut args = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            format.as_str().into(),
        ];
        if !opts.is_empty() {
            args.push("-o".into());
            args.push(opts.join(","));
        }
        args.push(name.into());
        args.push(size.to_string());
        self.qemu_img(&args);
    }

    /// Makes the base by converting an existing image in the chain directory:
    /// `qemu-img convert -q -f SRC_FORMAT -O qcow2 EXTRA... SRC NAME`.
    /// With `extra = ["-c", "-o", "compression_type=zstd"]` this makes a
    /// compressed base.
    pub fn base_converted(
        &mut self,
        name: &str,
        src: &str,
        src_format: Format,
        extra: &[&str],
    ) -> &mut Self {
        assert!(
            self.layers.is_empty(),
            "base_converted() on a non-empty chain"
        );
        let mut args = vec!["convert", "-q", "-f", src_format.as_str(), "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.push(src);
        args.push(name);
        self.qemu_img(&args);
        self.push(name, Format::Qcow2);
        self
    }

    /// Adds a qcow2 overlay on the current leaf:
    /// `qemu-img create -q -f qcow2 -b LEAF -F LEAF_FORMAT [-o OPTS] NAME [SIZE]`
    /// (`size: None` = the backing file's size).
    pub fn overlay(&mut self, name: &str, size: Option<u64>, opts: &[&str]) -> &mut Self {
        self.overlay_impl(name, size, opts, false)
    }

    /// Like [`Chain::overlay`] but with `-u` (qemu does not open the backing
    /// chain), which keeps very deep chains fast. The size is required.
    pub fn overlay_unchecked(&mut self, name: &str, size: u64, opts: &[&str]) -> &mut Self {
        self.overlay_impl(name, Some(size), opts, true)
    }

    fn overlay_impl(
        &mut self,
        name: &str,
        size: Option<u64>,
        opts: &[&str],
        unsafe_create: bool,
    ) -> &mut Self {
        let backing = self.leaf().clone();
        let mut args: Vec<String> = vec!["create".into(), "-q".into()];
        if unsafe_create {
            args.push("-u".into());
        }
        args.extend(["-f", "qcow2", "-b"].map(String::from));
        args.push(backing.name.clone());
        args.push("-F".into());
        args.push(backing.format.as_str().into());
        if !opts.is_empty() {
            args.push("-o".into());
            args.push(opts.join(","));
        }
        args.push(name.into());
        if let Some(size) = size {
            args.push(size.to_string());
        }
        self.qemu_img(&args);
        self.push(name, Format::Qcow2);
        self
    }

    /// Runs `qemu-io` commands (see [`qio`]) on the leaf, through its whole
    /// backing chain (so partial-cluster writes copy from the backing files).
    pub fn io<S: AsRef<str>>(&mut self, cmds: &[S]) -> &mut Self {
        let idx = self.leaf_index();
        self.io_layer(idx, cmds)
    }

    /// Runs `qemu-io` commands on layer `idx` (base first) with the chain
    /// below it.
    pub fn io_layer<S: AsRef<str>>(&mut self, idx: usize, cmds: &[S]) -> &mut Self {
        let layer = self.layers[idx].clone();
        self.io_file(&layer.name, layer.format, cmds);
        self
    }

    /// Runs `qemu-io -f FORMAT -c CMD... NAME` on any file in the chain
    /// directory (a layer or a scratch image).
    pub fn io_file<S: AsRef<str>>(&mut self, name: &str, format: Format, cmds: &[S]) {
        if cmds.is_empty() {
            return;
        }
        let mut cmd = Command::new("qemu-io");
        cmd.current_dir(&self.path).args(["-f", format.as_str()]);
        for c in cmds {
            cmd.arg("-c").arg(c.as_ref());
        }
        cmd.arg(name);
        self.run_logged(cmd);
    }

    /// Runs `qemu-io` commands on the leaf (through its chain) and then
    /// `abort`s, so qemu-io dies by SIGABRT without closing the image
    /// cleanly: with `lazy_refcounts=on` the qcow2 header keeps its dirty bit
    /// (an image left behind by a crashed VM). Core dumps are disabled.
    pub fn io_then_abort<S: AsRef<str>>(&mut self, cmds: &[S]) -> &mut Self {
        let layer = self.leaf().clone();
        let mut cmd = Command::new("sh");
        cmd.current_dir(&self.path)
            .args(["-c", r#"ulimit -c 0; exec qemu-io "$@""#, "qemu-io"])
            .args(["-f", layer.format.as_str()]);
        for c in cmds {
            cmd.arg("-c").arg(c.as_ref());
        }
        cmd.args(["-c", "abort"]).arg(&layer.name);
        let line = command_line(&cmd);
        self.log
            .push(format!("{line}  # expected to die by SIGABRT"));
        let out = run_unchecked(&mut cmd);
        assert!(
            !out.status.success(),
            "qemu-io with `abort` exited successfully\n{}",
            describe_output(&cmd, &out)
        );
        self
    }

    /// Runs `qemu-io` commands on many qcow2 layers in **one** qemu-io
    /// process, opening each layer *without* its backing file
    /// (`"backing": null`). Opening a chain costs time linear in its depth,
    /// so this is what keeps building a 100-deep chain fast.
    ///
    /// Semantics differ from [`Chain::io`]: a partial-cluster write pads the
    /// cluster with zeros instead of copying from the backing file, and zero
    /// writes/discards behave as on an image without backing. The result is
    /// still a valid chain; it just holds different bytes.
    pub fn io_isolated<S: AsRef<str>>(&mut self, batch: &[(usize, Vec<S>)]) -> &mut Self {
        let mut cmd = Command::new("qemu-io");
        cmd.current_dir(&self.path);
        for (idx, cmds) in batch {
            let layer = &self.layers[*idx];
            assert_eq!(
                layer.format,
                Format::Qcow2,
                "io_isolated on a non-qcow2 layer"
            );
            assert!(
                !layer.name.contains(|c: char| c.is_whitespace() || c == '"'),
                "layer name unusable in a qemu-io open command"
            );
            cmd.arg("-c").arg(format!(
                r#"open json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#,
                layer.name
            ));
            for c in cmds {
                cmd.arg("-c").arg(c.as_ref());
            }
            cmd.arg("-c").arg("close");
        }
        self.run_logged(cmd);
        self
    }

    /// Writes `data` at `offset` into file `name` of the chain directory,
    /// directly (for content qemu-io cannot produce, e.g. random bytes in a
    /// raw scratch image). Logged as a comment in [`Chain::script`].
    pub fn write_bytes(&mut self, name: &str, offset: u64, data: &[u8]) {
        let path = self.file(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        file.write_all_at(data, offset)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        self.log.push(format!(
            "# wrote {} test-generated bytes at offset {offset} of {name}",
            data.len()
        ));
    }

    /// Virtual size of layer `idx`, from `qemu-img info --output=json`.
    pub fn virtual_size(&self, idx: usize) -> u64 {
        let layer = &self.layers[idx];
        image_virtual_size(&self.path, &layer.name, layer.format)
    }

    /// `qemu-img info --backing-chain` of layer `idx`, for failure messages.
    pub fn describe(&self, idx: usize) -> String {
        let layer = &self.layers[idx];
        let out = run_unchecked(&mut qemu_img_cmd(
            &self.path,
            [
                "info",
                "--backing-chain",
                "-f",
                layer.format.as_str(),
                &layer.name,
            ],
        ));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        if std::env::var_os("SNAPTREE_KEEP_TEST_DIRS").is_some_and(|v| v != "0") {
            if let Some(dir) = self.dir.take() {
                let path = dir.keep();
                note(format_args!(
                    "{}: kept chain directory {}",
                    test_name(),
                    path.display()
                ));
            }
        }
    }
}

/// The qcow2 header's `incompatible_features` field (bit 0 = dirty,
/// bit 1 = corrupt, bit 2 = external data file, bit 3 = compression type,
/// bit 4 = extended L2), read straight from the file.
pub fn qcow2_incompatible_features(path: &Path) -> u64 {
    let mut field = [0u8; 8];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut field, 72))
        .unwrap_or_else(|e| panic!("read qcow2 header of {}: {e}", path.display()));
    u64::from_be_bytes(field)
}

/// `virtual-size` from `qemu-img info --output=json` of `name` in `dir`.
pub fn image_virtual_size(dir: &Path, name: &str, format: Format) -> u64 {
    let info = image_info(dir, name, format);
    info["virtual-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no virtual-size in qemu-img info of {name}: {info}"))
}

/// `qemu-img info --output=json` of `name` in `dir`, parsed.
pub fn image_info(dir: &Path, name: &str, format: Format) -> Value {
    let out = qemu_img(dir, ["info", "--output=json", "-f", format.as_str(), name]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info of {name} is not JSON: {e}"))
}

// ---------------------------------------------------------------------------
// Byte comparison
// ---------------------------------------------------------------------------

/// Reads a whole file, panicking with its path on error.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Collects differing byte ranges (with sample bytes) while two byte streams
/// are compared piece by piece; renders the report of [`diff_bytes`] and
/// [`diff_files`].
#[derive(Default)]
struct DiffReport {
    /// `(start, end, expected sample, got sample)`, merged when adjacent.
    ranges: Vec<(u64, u64, Vec<u8>, Vec<u8>)>,
}

impl DiffReport {
    const SHOW: usize = 12;
    const SAMPLE: usize = 8;

    /// Compares two equally long pieces that start at guest offset `base`.
    fn compare(&mut self, base: u64, expected: &[u8], got: &[u8]) {
        const CHUNK: usize = 4096;
        for (c, (e, g)) in expected.chunks(CHUNK).zip(got.chunks(CHUNK)).enumerate() {
            if e == g {
                continue;
            }
            for (i, (a, b)) in e.iter().zip(g).enumerate() {
                if a == b {
                    continue;
                }
                let at = base + (c * CHUNK + i) as u64;
                match self.ranges.last_mut() {
                    Some(last) if last.1 == at => {
                        last.1 = at + 1;
                        if last.2.len() < Self::SAMPLE {
                            last.2.push(*a);
                            last.3.push(*b);
                        }
                    }
                    _ => self.ranges.push((at, at + 1, vec![*a], vec![*b])),
                }
            }
        }
    }

    fn render(&self, expected_len: u64, got_len: u64) -> Option<String> {
        let mut report = String::new();
        if expected_len != got_len {
            let _ = writeln!(
                report,
                "length: expected {expected_len} bytes, got {got_len}"
            );
        }
        if self.ranges.is_empty() {
            if report.is_empty() {
                return None;
            }
            let _ = writeln!(
                report,
                "the first {} bytes are identical",
                expected_len.min(got_len)
            );
            return Some(report);
        }
        let total: u64 = self.ranges.iter().map(|r| r.1 - r.0).sum();
        let _ = writeln!(
            report,
            "{total} differing bytes in {} ranges{}",
            self.ranges.len(),
            if self.ranges.len() > Self::SHOW {
                format!(" (first {} shown)", Self::SHOW)
            } else {
                String::new()
            }
        );
        for (s, e, exp, got) in self.ranges.iter().take(Self::SHOW) {
            let _ = writeln!(
                report,
                "  [{s:#x}, {e:#x}) = [{s}, {e}) {} bytes: expected {exp:02x?}.., got {got:02x?}..",
                e - s,
            );
        }
        Some(report)
    }
}

/// Compares `expected` and `got`; `None` if identical, else a description of
/// the length difference and of every differing byte range (the first ones
/// with sample bytes).
pub fn diff_bytes(expected: &[u8], got: &[u8]) -> Option<String> {
    let mut report = DiffReport::default();
    let common = expected.len().min(got.len());
    report.compare(0, &expected[..common], &got[..common]);
    report.render(expected.len() as u64, got.len() as u64)
}

/// The data ranges of `file` (of length `len`) per `SEEK_DATA`/`SEEK_HOLE`,
/// sorted; everything else reads as zeros. Falls back to one range covering
/// the whole file if the filesystem cannot tell.
pub fn data_ranges(file: &File, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let whole = if len == 0 { vec![] } else { vec![(0, len)] };
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let Ok(at) = libc::off_t::try_from(pos) else {
            return whole;
        };
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole up to the end
            }
            return whole;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return whole;
        }
        let (data, hole) = (data as u64, (hole as u64).min(len));
        if data >= len {
            break;
        }
        out.push((data, hole));
        pos = hole;
    }
    out
}

/// Compares two files like [`diff_bytes`], but reads only the ranges where
/// either file holds data ([`data_ranges`]; holes read as zeros), so sparse
/// multi-GiB disks compare in milliseconds. `None` if identical.
pub fn diff_files(expected: &Path, got: &Path) -> Result<Option<String>, String> {
    let open = |p: &Path| File::open(p).map_err(|e| format!("open {}: {e}", p.display()));
    let (fe, fg) = (open(expected)?, open(got)?);
    let len = |f: &File, p: &Path| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| format!("stat {}: {e}", p.display()))
    };
    let (le, lg) = (len(&fe, expected)?, len(&fg, got)?);
    let common = le.min(lg);
    // Union of both files' data ranges within the common length.
    let mut ranges = data_ranges(&fe, common);
    ranges.extend(data_ranges(&fg, common));
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut report = DiffReport::default();
    const PIECE: u64 = 4 * MIB;
    let (mut be, mut bg) = (Vec::new(), Vec::new());
    for (s, e) in merged {
        let mut pos = s;
        while pos < e {
            let n = (e - pos).min(PIECE) as usize;
            be.resize(n, 0);
            bg.resize(n, 0);
            fe.read_exact_at(&mut be, pos)
                .map_err(|err| format!("read {} at {pos}: {err}", expected.display()))?;
            fg.read_exact_at(&mut bg, pos)
                .map_err(|err| format!("read {} at {pos}: {err}", got.display()))?;
            report.compare(pos, &be, &bg);
            pos += n as u64;
        }
    }
    Ok(report.render(le, lg))
}

/// Panics with a [`diff_files`] report unless the two files are identical.
pub fn assert_same_file(expected: &Path, got: &Path) {
    match diff_files(expected, got) {
        Ok(None) => {}
        Ok(Some(diff)) => panic!(
            "{} differs from {}:\n{diff}",
            got.display(),
            expected.display()
        ),
        Err(e) => panic!("cannot compare files: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------

/// One entry of `qemu-img map --output=json` (and of `snaptree map --output
/// json`, which has the same shape).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer answering for these bytes, 0 = the mapped image itself.
    pub depth: u64,
    /// Allocated (data or zero) in that layer; false = fell through.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data in the layer's file.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the layer's file, where there is one.
    pub offset: Option<u64>,
}

/// The attributes compared between two maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attrs {
    /// See [`MapEntry::depth`].
    pub depth: u64,
    /// See [`MapEntry::present`].
    pub present: bool,
    /// See [`MapEntry::zero`].
    pub zero: bool,
    /// See [`MapEntry::data`].
    pub data: bool,
}

impl fmt::Display for Attrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{depth:{}, present:{}, zero:{}, data:{}}}",
            self.depth, self.present, self.zero, self.data
        )
    }
}

impl MapEntry {
    /// The compared attributes of this entry.
    pub fn attrs(&self) -> Attrs {
        Attrs {
            depth: self.depth,
            present: self.present,
            zero: self.zero,
            data: self.data,
        }
    }
}

/// Parses a `map --output json` document: a JSON array of objects each with
/// integer `start`, `length`, `depth`, booleans `present`, `zero`, `data`,
/// `compressed`, and optionally integer `offset`. Strict about types so a
/// shape error is reported, not misread.
pub fn parse_map(json: &str) -> Result<Vec<MapEntry>, String> {
    let value: Value = serde_json::from_str(json).map_err(|e| {
        format!(
            "not JSON ({e}); text starts: {:?}",
            json.chars().take(200).collect::<String>()
        )
    })?;
    let items = value
        .as_array()
        .ok_or_else(|| format!("top level is not an array: {}", short(&value)))?;
    let mut entries = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item
            .as_object()
            .ok_or_else(|| format!("entry {i} is not an object: {}", short(item)))?;
        let int = |key: &str| -> Result<u64, String> {
            obj.get(key)
                .ok_or_else(|| format!("entry {i} has no \"{key}\": {}", short(item)))?
                .as_u64()
                .ok_or_else(|| {
                    format!(
                        "entry {i}: \"{key}\" is not an unsigned integer: {}",
                        short(item)
                    )
                })
        };
        let boolean = |key: &str| -> Result<bool, String> {
            obj.get(key)
                .ok_or_else(|| format!("entry {i} has no \"{key}\": {}", short(item)))?
                .as_bool()
                .ok_or_else(|| format!("entry {i}: \"{key}\" is not a boolean: {}", short(item)))
        };
        let offset = match obj.get("offset") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                format!(
                    "entry {i}: \"offset\" is not an unsigned integer: {}",
                    short(item)
                )
            })?),
        };
        entries.push(MapEntry {
            start: int("start")?,
            length: int("length")?,
            depth: int("depth")?,
            present: boolean("present")?,
            zero: boolean("zero")?,
            data: boolean("data")?,
            compressed: boolean("compressed")?,
            offset,
        });
    }
    Ok(entries)
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 300 {
        format!("{}...", &s[..300])
    } else {
        s
    }
}

/// A byte interval `[start, end)` with the attributes of every byte in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Attributes of every byte in the interval.
    pub attrs: Attrs,
}

/// Expands map entries into per-byte attribute intervals covering exactly
/// `[0, size)`. Checks that entries are non-empty, in order, contiguous and
/// cover the whole disk; merges neighbours with equal attributes, so two maps
/// that split the same facts differently yield the same extents.
pub fn extents(entries: &[MapEntry], size: u64) -> Result<Vec<Extent>, String> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = 0u64;
    for (i, e) in entries.iter().enumerate() {
        if e.length == 0 {
            return Err(format!("entry {i} has length 0: {e:?}"));
        }
        if e.start != pos {
            return Err(format!(
                "entry {i} starts at {} but the previous one ended at {pos} ({}): {e:?}",
                e.start,
                if e.start > pos { "gap" } else { "overlap" }
            ));
        }
        let end = e
            .start
            .checked_add(e.length)
            .ok_or_else(|| format!("entry {i} overflows: {e:?}"))?;
        match out.last_mut() {
            Some(last) if last.attrs == e.attrs() => last.end = end,
            _ => out.push(Extent {
                start: e.start,
                end,
                attrs: e.attrs(),
            }),
        }
        pos = end;
    }
    if pos != size {
        return Err(format!(
            "entries cover [0, {pos}) but the virtual size is {size}"
        ));
    }
    Ok(out)
}

/// A byte interval where two maps disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Attributes in the expected (reference) map.
    pub expected: Attrs,
    /// Attributes in the map under test.
    pub got: Attrs,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}) = [{}, {}) ({} bytes): expected {}, got {}",
            self.start,
            self.end,
            self.start,
            self.end,
            self.end - self.start,
            self.expected,
            self.got
        )
    }
}

/// Compares two extent lists (as from [`extents`], both covering the same
/// range) over the union of their boundaries. Returns the maximal intervals
/// where the attributes differ; empty = the maps agree on every byte.
pub fn diff_extents(expected: &[Extent], got: &[Extent]) -> Vec<Mismatch> {
    let mut bounds = BTreeSet::new();
    for e in expected.iter().chain(got) {
        bounds.insert(e.start);
        bounds.insert(e.end);
    }
    let bounds: Vec<u64> = bounds.into_iter().collect();
    let (mut i, mut j) = (0, 0);
    let mut out: Vec<Mismatch> = Vec::new();
    for w in bounds.windows(2) {
        let (s, e) = (w[0], w[1]);
        while i < expected.len() && expected[i].end <= s {
            i += 1;
        }
        while j < got.len() && got[j].end <= s {
            j += 1;
        }
        let (Some(a), Some(b)) = (expected.get(i), got.get(j)) else {
            break;
        };
        if a.attrs != b.attrs {
            match out.last_mut() {
                Some(m) if m.end == s && m.expected == a.attrs && m.got == b.attrs => m.end = e,
                _ => out.push(Mismatch {
                    start: s,
                    end: e,
                    expected: a.attrs,
                    got: b.attrs,
                }),
            }
        }
    }
    out
}

/// Formats mismatches for a failure message (at most 25 shown).
pub fn format_mismatches(mismatches: &[Mismatch]) -> String {
    let mut s = String::new();
    let total: u64 = mismatches.iter().map(|m| m.end - m.start).sum();
    let _ = writeln!(
        s,
        "{} mismatching ranges, {total} bytes in all",
        mismatches.len()
    );
    for m in mismatches.iter().take(25) {
        let _ = writeln!(s, "  {m}");
    }
    if mismatches.len() > 25 {
        let _ = writeln!(s, "  ...");
    }
    s
}

/// Checks the host offsets of a map of image `top` (base-first index in
/// `chain`): for every entry with `data` and an `offset`, not `zero` and not
/// `compressed`, the bytes at that offset of the layer file at `depth` must
/// equal the flattened disk (the file `flat`, e.g. `qemu-img convert -O raw`
/// output) at the entry's guest range.
pub fn check_map_offsets(
    chain: &Chain,
    top: usize,
    entries: &[MapEntry],
    flat: &Path,
) -> Result<(), String> {
    let flat_file = File::open(flat).map_err(|e| format!("open {}: {e}", flat.display()))?;
    let mut errors = Vec::new();
    for e in entries {
        let Some(offset) = e.offset else { continue };
        if !e.data || e.zero || e.compressed {
            continue;
        }
        let Some(layer) = chain.layer_at_depth(top, e.depth) else {
            errors.push(format!("depth {} is below the base: {e:?}", e.depth));
            continue;
        };
        let layer_file = File::open(&layer.path)
            .map_err(|err| format!("open {}: {err}", layer.path.display()))?;
        let mut report = DiffReport::default();
        const PIECE: u64 = 4 * MIB;
        let (mut want, mut have) = (Vec::new(), Vec::new());
        let mut done = 0;
        while done < e.length {
            let n = (e.length - done).min(PIECE) as usize;
            want.resize(n, 0);
            have.resize(n, 0);
            if let Err(err) = flat_file.read_exact_at(&mut want, e.start + done) {
                errors.push(format!("entry beyond the flattened disk ({err}): {e:?}"));
                break;
            }
            if let Err(err) = layer_file.read_exact_at(&mut have, offset + done) {
                errors.push(format!(
                    "cannot read {n} bytes at offset {} of {}: {err} (entry {e:?})",
                    offset + done,
                    layer.name
                ));
                break;
            }
            report.compare(e.start + done, &want, &have);
            done += n as u64;
        }
        if let Some(diff) = report.render(e.length, e.length) {
            errors.push(format!(
                "entry {e:?}: the bytes at offset {offset} of {} are not the disk's bytes \
                 (ranges below are guest offsets):\n{diff}",
                layer.name
            ));
        }
        if errors.len() >= 5 {
            errors.push("...".into());
            break;
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

/// The *unwritten* extents of a file (allocated by `fallocate` but never
/// written; they read as zeros), from the `FS_IOC_FIEMAP` ioctl, as sorted
/// `(start, end)` byte ranges clipped to the file length. Empty if the
/// filesystem does not support FIEMAP.
pub fn unwritten_extents(file: &File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct FiemapExtent {
        fe_logical: u64,
        fe_physical: u64,
        fe_length: u64,
        fe_reserved64: [u64; 2],
        fe_flags: u32,
        fe_reserved: [u32; 3],
    }
    const N: usize = 256;
    #[repr(C)]
    struct Fiemap {
        fm_start: u64,
        fm_length: u64,
        fm_flags: u32,
        fm_mapped_extents: u32,
        fm_extent_count: u32,
        fm_reserved: u32,
        fm_extents: [FiemapExtent; N],
    }
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 0x1;
    const FIEMAP_EXTENT_LAST: u32 = 0x1;
    const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;

    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let mut map = Fiemap {
            fm_start: pos,
            fm_length: len - pos,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_mapped_extents: 0,
            fm_extent_count: N as u32,
            fm_reserved: 0,
            fm_extents: [FiemapExtent::default(); N],
        };
        // SAFETY: FS_IOC_FIEMAP reads and writes exactly a `struct fiemap`
        // followed by `fm_extent_count` extents, which `map` provides.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut map) };
        if r < 0 || map.fm_mapped_extents == 0 {
            break;
        }
        let extents = &map.fm_extents[..(map.fm_mapped_extents as usize).min(N)];
        for e in extents {
            let (s, end) = (e.fe_logical, (e.fe_logical + e.fe_length).min(len));
            if e.fe_flags & FIEMAP_EXTENT_UNWRITTEN != 0 && s < end {
                out.push((s, end));
            }
        }
        let last = extents[extents.len() - 1];
        let next = last.fe_logical + last.fe_length;
        if last.fe_flags & FIEMAP_EXTENT_LAST != 0 || next <= pos {
            break;
        }
        pos = next;
    }
    out
}

/// Overwrites every unwritten extent of the file at `path` with zeros (the
/// bytes it already reads as) and syncs, so that the file has only written
/// data and real holes. Returns the number of bytes rewritten.
///
/// Why: qemu-img map, for a qcow2 image it believes is metadata-preallocated
/// (a heuristic that holds for most small, sparse test images: more
/// clusters have a refcount than the file has blocks allocated), asks the
/// host file for holes under data clusters and reports them as
/// `zero: true`; snaptree follows the same rule. qemu zero-fills
/// copy-on-write areas with `fallocate`, leaving unwritten extents, and
/// ext4's `SEEK_DATA` reports an unwritten extent as a hole or as data
/// depending on whether its pages happen to be in the page cache, which
/// changes under our feet (the kernel drops clean pages at any time). The
/// answer would differ between two runs, or between the qemu and the
/// snaptree call of one check. Real holes (never written, e.g. with
/// `preallocation=metadata`) are left alone and still compared; the
/// image's contents are unchanged.
pub fn fill_unwritten_extents(path: &Path) -> u64 {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let zeros = vec![0u8; MIB as usize];
    let mut total = 0;
    for (start, end) in unwritten_extents(&file) {
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(MIB) as usize;
            file.write_all_at(&zeros[..n], pos)
                .unwrap_or_else(|e| panic!("write {} at {pos}: {e}", path.display()));
            pos += n as u64;
            total += n as u64;
        }
    }
    if total > 0 {
        file.sync_all()
            .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    }
    total
}

/// `qemu-img map --output=json` of layer `idx` (base first) of `chain`,
/// parsed. Useful to assert that a case really contains what it is meant to
/// test (compressed clusters, zero clusters, ...).
pub fn qemu_map(chain: &Chain, idx: usize) -> Vec<MapEntry> {
    let layer = &chain.layers()[idx];
    let out = qemu_img(
        chain.dir(),
        [
            OsStr::new("map"),
            OsStr::new("--output=json"),
            OsStr::new("-f"),
            OsStr::new(layer.format.as_str()),
            layer.path.as_os_str(),
        ],
    );
    parse_map(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("cannot parse qemu-img map of {}: {e}", layer.name))
}

/// Panics unless some entry of `entries` satisfies `pred`: guards a test
/// against silently not covering what it claims to (`what` names it).
pub fn assert_map_has(entries: &[MapEntry], what: &str, pred: impl Fn(&MapEntry) -> bool) {
    assert!(
        entries.iter().any(pred),
        "test setup error: the image has no {what}; map: {entries:#?}"
    );
}

// ---------------------------------------------------------------------------
// The differential check
// ---------------------------------------------------------------------------

/// What [`assert_matches_qemu`] checks besides the raw export and the map.
#[derive(Clone, Copy, Debug)]
pub struct CheckOptions {
    /// Also `snaptree export --format qcow2` and judge the result with
    /// `qemu-img check` and `qemu-img compare`.
    pub qcow2_export: bool,
    /// Also verify the host `offset`s snaptree's map reports
    /// ([`check_map_offsets`]).
    pub map_offsets: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            qcow2_export: true,
            map_offsets: true,
        }
    }
}

/// The differential check of layer `idx` (base first) of `chain` against
/// qemu, with every problem collected into one panic message:
///
/// 1. `snaptree export IMAGE OUT` is byte-identical to
///    `qemu-img convert -O raw IMAGE`;
/// 2. `snaptree map IMAGE --output json` is well-formed, covers the virtual
///    size, and agrees with `qemu-img map --output=json` on depth, present,
///    zero and data for every byte (entry splitting may differ); its data
///    `offset`s point at the right bytes (see [`check_map_offsets`]);
/// 3. `snaptree export --format qcow2` gives an image without backing file,
///    of the same virtual size, that `qemu-img check` finds clean and
///    `qemu-img compare` finds equal to IMAGE.
///
/// First the layer files' unwritten extents are filled with zeros
/// ([`fill_unwritten_extents`] says why). Output files are written into the
/// chain directory as `check-*`.
pub fn assert_matches_qemu(chain: &Chain, idx: usize, opts: CheckOptions) {
    assert_layers_match_qemu(chain, &[idx], opts);
}

/// [`assert_matches_qemu`] for several layers (base-first indices), all
/// checked before one panic reports every failing layer: seeing which layers
/// fail and which pass localises a bug.
pub fn assert_layers_match_qemu(chain: &Chain, idxs: &[usize], opts: CheckOptions) {
    let mut report = String::new();
    let mut failing = Vec::new();
    for &idx in idxs {
        let failures = differential_failures(chain, idx, opts);
        if !failures.is_empty() {
            let layer = &chain.layers()[idx];
            let _ = write!(
                report,
                "\n=== {} (layer {idx} of {}, base first; virtual size {}) ===\n{}\n",
                layer.name,
                chain.layers().len(),
                chain.virtual_size(idx),
                failures.join("\n\n")
            );
            failing.push(layer.name.as_str());
        }
    }
    if !report.is_empty() {
        panic!(
            "snaptree disagrees with qemu on {failing:?} (checked: {} layer(s))\n\
             chain directory: {} (set SNAPTREE_KEEP_TEST_DIRS=1 to keep it)\n\
             --- how the chain was built (run in that directory) ---\n{}\n\
             --- qemu-img info --backing-chain of the leaf ---\n{}\n\
             --- failures ---{report}",
            idxs.len(),
            chain.dir().display(),
            chain.script(),
            chain.describe(chain.leaf_index()),
        );
    }
}

/// Runs the checks of [`assert_matches_qemu`] on one layer and returns what
/// failed (empty = snaptree agrees with qemu). Panics only on setup errors
/// (qemu itself failing).
pub fn differential_failures(chain: &Chain, idx: usize, opts: CheckOptions) -> Vec<String> {
    let layer = &chain.layers()[idx];
    let dir = chain.dir();
    let fmt = layer.format.as_str();
    let size = chain.virtual_size(idx);
    let tag = format!("check-{}", layer.name.replace('.', "_"));
    let mut failures: Vec<String> = Vec::new();
    for below in &chain.layers()[..=idx] {
        fill_unwritten_extents(&below.path);
    }

    // 1. Raw export.
    let expected_raw = dir.join(format!("{tag}.qemu.raw"));
    qemu_img(
        dir,
        [
            OsStr::new("convert"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new(fmt),
            OsStr::new("-O"),
            OsStr::new("raw"),
            layer.path.as_os_str(),
            expected_raw.as_os_str(),
        ],
    );
    let expected_len = std::fs::metadata(&expected_raw)
        .map(|m| m.len())
        .unwrap_or_else(|e| panic!("stat {}: {e}", expected_raw.display()));
    assert_eq!(
        expected_len, size,
        "qemu-img convert output size != virtual size"
    );
    let got_raw = dir.join(format!("{tag}.snaptree.raw"));
    let mut export = snaptree_cmd([
        OsStr::new("export"),
        layer.path.as_os_str(),
        got_raw.as_os_str(),
    ]);
    match try_run(&mut export) {
        Err(e) => failures.push(format!("snaptree export failed:\n{e}")),
        Ok(_) => match diff_files(&expected_raw, &got_raw) {
            Err(e) => failures.push(format!(
                "snaptree export exited 0 but its output cannot be compared: {e}"
            )),
            Ok(Some(diff)) => failures.push(format!(
                "`snaptree export` differs from `qemu-img convert -O raw`:\n{diff}"
            )),
            Ok(None) => {}
        },
    }

    // 2. Map.
    let qemu_out = qemu_img(
        dir,
        [
            OsStr::new("map"),
            OsStr::new("--output=json"),
            OsStr::new("-f"),
            OsStr::new(fmt),
            layer.path.as_os_str(),
        ],
    );
    let _ = std::fs::write(dir.join(format!("{tag}.qemu.map.json")), &qemu_out.stdout);
    let qemu_entries = parse_map(&String::from_utf8_lossy(&qemu_out.stdout))
        .unwrap_or_else(|e| panic!("cannot parse qemu-img map output: {e}"));
    let qemu_extents = extents(&qemu_entries, size)
        .unwrap_or_else(|e| panic!("unexpected qemu-img map output: {e}"));
    if let Err(e) = check_map_offsets(chain, idx, &qemu_entries, &expected_raw) {
        // A failure here is a bug in this helper, not in snaptree.
        panic!("test helper disagrees with qemu-img map offsets:\n{e}");
    }
    let mut map = snaptree_cmd([
        OsStr::new("map"),
        layer.path.as_os_str(),
        OsStr::new("--output"),
        OsStr::new("json"),
    ]);
    match try_run(&mut map) {
        Err(e) => failures.push(format!("snaptree map failed:\n{e}")),
        Ok(out) => {
            let _ = std::fs::write(dir.join(format!("{tag}.snaptree.map.json")), &out.stdout);
            let text = String::from_utf8_lossy(&out.stdout);
            match parse_map(&text).and_then(|entries| {
                let ext = extents(&entries, size)?;
                Ok((entries, ext))
            }) {
                Err(e) => failures.push(format!(
                    "snaptree map output is not a valid map of the whole disk: {e}"
                )),
                Ok((entries, ext)) => {
                    let mismatches = diff_extents(&qemu_extents, &ext);
                    if !mismatches.is_empty() {
                        failures.push(format!(
                            "`snaptree map` disagrees with `qemu-img map` (expected = qemu):\n{}",
                            format_mismatches(&mismatches)
                        ));
                    }
                    if opts.map_offsets {
                        if let Err(e) = check_map_offsets(chain, idx, &entries, &expected_raw) {
                            failures.push(format!("`snaptree map` offsets are wrong:\n{e}"));
                        }
                    }
                }
            }
        }
    }

    // 3. qcow2 export.
    if opts.qcow2_export {
        let got_qcow2 = dir.join(format!("{tag}.snaptree.qcow2"));
        let mut export = snaptree_cmd([
            OsStr::new("export"),
            layer.path.as_os_str(),
            got_qcow2.as_os_str(),
            OsStr::new("--format"),
            OsStr::new("qcow2"),
        ]);
        match try_run(&mut export) {
            Err(e) => failures.push(format!("snaptree export --format qcow2 failed:\n{e}")),
            Ok(_) => failures.extend(judge_qcow2_export(dir, &got_qcow2, layer, size)),
        }
    }

    failures
}

/// Judges a qcow2 file snaptree exported from `source`: `qemu-img check`
/// clean, no backing file, same virtual size, `qemu-img compare` equal.
/// Returns the failures found.
pub fn judge_qcow2_export(dir: &Path, exported: &Path, source: &Layer, size: u64) -> Vec<String> {
    let mut failures = Vec::new();
    let mut check = qemu_img_cmd(
        dir,
        [
            OsStr::new("check"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            exported.as_os_str(),
        ],
    );
    if let Err(e) = try_run(&mut check) {
        failures.push(format!(
            "`qemu-img check` of the qcow2 export is not clean:\n{e}"
        ));
        return failures;
    }
    let mut info = qemu_img_cmd(
        dir,
        [
            OsStr::new("info"),
            OsStr::new("--output=json"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            exported.as_os_str(),
        ],
    );
    match try_run(&mut info).map(|o| serde_json::from_slice::<Value>(&o.stdout)) {
        Err(e) => failures.push(format!("qemu-img info of the qcow2 export failed:\n{e}")),
        Ok(Err(e)) => failures.push(format!("qemu-img info output is not JSON: {e}")),
        Ok(Ok(v)) => {
            if v["virtual-size"].as_u64() != Some(size) {
                failures.push(format!(
                    "qcow2 export has virtual-size {}, expected {size}",
                    v["virtual-size"]
                ));
            }
            if let Some(b) = v.get("backing-filename") {
                failures.push(format!(
                    "qcow2 export is not flattened: it has backing file {b}"
                ));
            }
        }
    }
    let mut compare = qemu_img_cmd(
        dir,
        [
            OsStr::new("compare"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-F"),
            OsStr::new(source.format.as_str()),
            exported.as_os_str(),
            source.path.as_os_str(),
        ],
    );
    if let Err(e) = try_run(&mut compare) {
        failures.push(format!(
            "`qemu-img compare` says the qcow2 export differs from {}:\n{e}",
            source.name
        ));
    }
    failures
}
