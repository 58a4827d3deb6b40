//! Backing chains built by the qemu tools, the images every differential
//! test reads.
//!
//! Why the chain is built through one type: every construction command is
//! recorded ([`Chain::script`]) so that a failure message doubles as a
//! reproduction script, and every overlay names its backing file relative
//! to its own directory, so that snaptree's relative resolution is
//! exercised. Layers are kept **base first**; `qemu-img map` depths count
//! the other way, from the mapped image down ([`Chain::layer_at_depth`]).

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

use super::run::{
    command_line, describe_output, qemu_img, qemu_img_cmd, run, run_unchecked, shell_quote,
};
use super::skip::{note, test_name};

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

    /// Runs `qemu-io` commands (see [`super::qio`]) on the leaf, through its
    /// whole backing chain (so partial-cluster writes copy from the backing
    /// files).
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
