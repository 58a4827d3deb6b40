//! qemu-storage-daemon's FUSE export of a chain as a peer: whether it can
//! run here, a guard that stops the daemon (by its pid) and removes its
//! mount even on errors, and one cold sequential pass through the export.

use crate::build::Model;
use crate::util::{drop_caches, mbps, which};
use crate::{R, READ};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why qemu-storage-daemon's FUSE export cannot run here, if it cannot.
pub fn available() -> Result<(), String> {
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (needs to mount and to drop caches)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse does not exist".into());
    }
    if which("qemu-storage-daemon").is_none() {
        return Err("qemu-storage-daemon is not on PATH".into());
    }
    Ok(())
}

/// A running qemu-storage-daemon and its mount: on drop (also on error or
/// panic) the daemon gets SIGTERM (which unmounts), SIGKILL if it lingers,
/// and a mount it left behind is detached.
struct Qsd {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) {
            if t.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if is_mounted(&self.mountpoint) {
            if let Ok(c) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) {
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

fn start(dir: &Path, leaf: &Path) -> R<Qsd> {
    let mountpoint = dir.join("qsd.mnt");
    File::create(&mountpoint)?;
    let log = dir.join("qsd.log");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=qcow2,node-name=disk0,read-only=on,file.driver=file,file.filename={}",
            leaf.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=fuse,id=exp0,node-name=disk0,mountpoint={},writable=off",
            mountpoint.display()
        ))
        .stdin(Stdio::null())
        .stdout(File::create(&log)?)
        .stderr(File::create(&log)?)
        .spawn()?;
    let mut qsd = Qsd { child, mountpoint };
    let t = Instant::now();
    while !is_mounted(&qsd.mountpoint) {
        if let Some(status) = qsd.child.try_wait()? {
            let msg = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("qemu-storage-daemon exited ({status}): {}", msg.trim()).into());
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err("qemu-storage-daemon did not mount its export within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(qsd)
}

/// One cold sequential pass of `size` bytes in 1 MiB `read`s through a
/// fresh daemon's FUSE export of `leaf` (mounted in `dir`), spot-checked
/// against `model`; MB/s.
pub fn pass(root: bool, dir: &Path, leaf: &Path, model: &Model, size: u64) -> R<f64> {
    let qsd = start(dir, leaf)?;
    drop_caches(root)?;
    let t = Instant::now();
    let mut f = File::open(&qsd.mountpoint)?;
    let mut buf = vec![0u8; READ as usize];
    let mut off = 0;
    while off < size {
        let n = READ.min(size - off) as usize;
        f.read_exact(&mut buf[..n])?;
        model.spot_check(&buf[..n], off, "qsd")?;
        off += n as u64;
    }
    let v = mbps(size, t.elapsed());
    drop(f);
    drop(qsd);
    Ok(v)
}
