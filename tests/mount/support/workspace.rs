//! The per-test temp directory: the image tree (`images/`), the mount
//! point (`mnt/`) and scratch space kept outside the tree, with the
//! `qemu-img`/`qemu-io` wrappers that build trees and judge the results.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use super::command::describe_output;
use super::{bin, diff_bytes, run, run_unchecked, skip, test_name, Mount};

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

    /// Creates a dynamic VHD of exactly `size` bytes (`force_size`, so the
    /// size is not rounded to a CHS geometry).
    pub fn create_vpc(&self, name: &str, size: u64) {
        let size = size.to_string();
        self.qemu_img(&[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            name,
            &size,
        ]);
    }

    /// `qemu-img create -f vhdx -o block_size=1M` of `images/<name>`.
    pub fn create_vhdx(&self, name: &str, size: u64) {
        let size = size.to_string();
        self.qemu_img(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            name,
            &size,
        ]);
    }

    /// The VHDX images of the tree directory (by their `vhdxfile`
    /// identifier), sorted.
    pub fn vhdx_images(&self) -> Vec<String> {
        self.images_with_magic(b"vhdxfile")
    }

    /// The VHD images of the tree directory (dynamic and differencing, by
    /// the footer copy at their start), sorted.
    pub fn vhd_images(&self) -> Vec<String> {
        self.images_with_magic(b"conectix")
    }

    /// libvhdi's `vhdiinfo` accepts every VHD image of the tree; without
    /// it (libvhdi-utils), says so once per call and checks nothing.
    pub fn vhdiinfo_all(&self) {
        let images = self.vhd_images();
        for name in &images {
            let mut c = Command::new("vhdiinfo");
            c.current_dir(&self.images).arg(name);
            match c.output() {
                Err(e) => {
                    eprintln!(
                        "{}: vhdiinfo not run ({e}); install libvhdi-utils",
                        test_name()
                    );
                    return;
                }
                Ok(o) => assert!(
                    o.status.success(),
                    "vhdiinfo rejects {name}: {}",
                    describe_output(&c, &o)
                ),
            }
        }
    }

    /// `snaptree export` of `images/<name>` (through its chain), read back.
    pub fn export(&self, name: &str) -> Vec<u8> {
        let out = self.scratch(&format!("export-{}.raw", name.replace('/', "_")));
        let mut c = Command::new(bin());
        c.current_dir(&self.images)
            .arg("export")
            .arg("--quiet")
            .arg("--force")
            .arg(name)
            .arg(&out);
        run(&mut c);
        let v = std::fs::read(&out).expect("read exported image");
        let _ = std::fs::remove_file(&out);
        v
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
        self.images_with_magic(b"QFI\xfb")
    }

    /// Files of the tree directory that start with `magic`, sorted.
    fn images_with_magic(&self, magic: &[u8]) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.images)
            .expect("list images")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter(|e| {
                let mut head = vec![0u8; magic.len()];
                File::open(e.path())
                    .and_then(|mut f| f.read_exact(&mut head))
                    .is_ok()
                    && head == magic
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
