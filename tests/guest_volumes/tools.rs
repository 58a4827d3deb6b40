//! Helpers of the volume tests: running the real tools (sgdisk, sfdisk,
//! LVM, blkid), loop devices and LVM state that are torn down on drop, and
//! reading a volume through the library.

use snaptree::guest::volumes::{Volume, VolumeBytes};
use snaptree::guest::{FileBytes, ReadBytes};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// True if every tool is on PATH; else prints `SKIP: ...`.
pub fn have(tools: &[&str]) -> bool {
    for t in tools {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            println!("SKIP: {t} not installed");
            return false;
        }
    }
    true
}

/// Runs a command, panics with its stderr if it fails; its stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    run_env(cmd, args, &[])
}

pub fn run_env(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sparse file of `mib` MiB.
pub fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

pub fn disk(path: &Path) -> Arc<dyn ReadBytes> {
    Arc::new(FileBytes::open(path).unwrap())
}

/// `dd` of `data` into `path` at `offset`, without truncating.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

pub fn read_volume(v: &Volume, disks: &[Arc<dyn ReadBytes>]) -> Vec<u8> {
    let bytes = VolumeBytes::new(v, disks);
    let mut buf = vec![0u8; bytes.size() as usize];
    bytes.read_exact_at(&mut buf, 0).unwrap();
    buf
}

/// `blkid -p -o export` of a file: TYPE, LABEL, UUID ...
pub fn blkid(path: &Path) -> HashMap<String, String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), unescape(v)))
        .collect()
}

/// blkid's export format escapes shell-special characters with `\`.
fn unescape(v: &str) -> String {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    out
}

/// A loop device over a file (optionally a slice of it), detached on drop.
pub struct Loop(pub String);

impl Loop {
    pub fn new(file: &Path, extra: &[&str]) -> Loop {
        let mut args = vec!["-f", "--show"];
        args.extend_from_slice(extra);
        let f = file.to_str().unwrap();
        args.push(f);
        Loop(run("losetup", &args).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// LVM with a private configuration that sees only our loop devices (so
/// tests running at the same time do not see each other's PVs), no udev,
/// no devices file, no backups. Drop removes the VG and the PV labels'
/// in-memory state goes with the loop devices (dropped after this).
pub struct Lvm {
    dir: tempfile::TempDir,
    pub vg: String,
    pvs: Vec<String>,
}

impl Lvm {
    pub fn new(vg: &str, devices: &[&Loop]) -> Lvm {
        let dir = tempfile::tempdir().unwrap();
        let accept: Vec<String> = devices
            .iter()
            .map(|l| format!("\"a|^{}$|\"", l.0))
            .collect();
        let conf = format!(
            "devices {{ use_devicesfile = 0 obtain_device_list_from_udev = 0 filter = [ {}, \"r|.*|\" ] }}\n\
             activation {{ udev_sync = 0 udev_rules = 0 }}\n\
             global {{ use_lvmetad = 0 }}\n\
             backup {{ backup = 0 archive = 0 }}\n",
            accept.join(", ")
        );
        std::fs::write(dir.path().join("lvm.conf"), conf).unwrap();
        Lvm {
            dir,
            vg: vg.to_string(),
            pvs: devices.iter().map(|l| l.0.clone()).collect(),
        }
    }

    /// Runs an LVM command (`pvcreate`, `lvs` ...) under this configuration.
    pub fn cmd(&self, cmd: &str, args: &[&str]) -> String {
        let dir = self.dir.path().to_str().unwrap().to_string();
        run_env(
            cmd,
            args,
            &[("LVM_SYSTEM_DIR", &dir), ("LVM_SUPPRESS_FD_WARNINGS", "1")],
        )
    }

    /// A JSON report (`lvs`/`pvs`/`vgs --reportformat json --units b --nosuffix`).
    pub fn report(&self, cmd: &str, fields: &str) -> Vec<serde_json::Value> {
        let mut args = vec![
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            fields,
        ];
        if cmd == "lvs" {
            args.extend(["-a", "--segments"]);
        }
        let text = self.cmd(cmd, &args);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Rows sit under "pv", "vg", "lv" or "seg" (lvs --segments).
        let report = v["report"][0].as_object().unwrap();
        let rows = report.values().find_map(|r| r.as_array()).cloned();
        rows.unwrap_or_default()
    }
}

impl Drop for Lvm {
    fn drop(&mut self) {
        let dir = self.dir.path().to_str().unwrap().to_string();
        let env = [
            ("LVM_SYSTEM_DIR", dir.as_str()),
            ("LVM_SUPPRESS_FD_WARNINGS", "1"),
        ];
        let _ = Command::new("vgremove")
            .args(["-ff", &self.vg])
            .envs(env)
            .output();
        for pv in &self.pvs {
            let _ = Command::new("pvremove")
                .args(["-ff", "-y", pv])
                .envs(env)
                .output();
        }
    }
}

/// A report field as a number.
pub fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_str().unwrap().trim().parse().unwrap()
}

/// xorshift bytes, reproducible from a seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `sfdisk` of a script onto a file or device.
pub fn sfdisk(target: &Path, script: &str) {
    use std::io::Write;
    let mut child = Command::new("sfdisk")
        .args(["-q", target.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
}
