//! libvhdi's tools as a second opinion on VHDs snaptree wrote: `vhdiinfo`
//! must accept an image, `vhdimount` must read the same bytes.
//!
//! Why a guard type: `vhdimount` is a FUSE daemon. A test that fails while
//! it is mounted must still unmount it and end the daemon, or the next run
//! finds a stale mount (and a test directory that cannot be removed). The
//! daemon runs in the foreground (`-v`) as our child, so we know its pid.
//!
//! Declared by the test crates that use it with
//! `#[path = "common/vhd_peers.rs"] mod vhd_peers;`.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `tool -V` runs (libvhdi's tools print their version with `-V`).
pub fn libvhdi_tool(tool: &str) -> bool {
    Command::new(tool)
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success() || !o.stdout.is_empty())
}

/// `vhdiinfo IMG`: `Err` with its output if it refuses the image.
pub fn vhdiinfo(img: &Path) -> Result<String, String> {
    let out = Command::new("vhdiinfo")
        .arg(img)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run vhdiinfo: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "vhdiinfo {} failed ({}):\n{text}",
            img.display(),
            out.status
        ))
    }
}

/// A `vhdimount` of one image; unmounted and its daemon ended on drop.
pub struct VhdiMount {
    pub dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl VhdiMount {
    /// Mounts `img` on `dir` (created if missing) and waits until the
    /// mount is there. `Err` says why it is not (with the daemon's output).
    pub fn new(img: &Path, dir: &Path) -> Result<VhdiMount, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let log = dir.with_extension("vhdimount.log");
        let err = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let child = Command::new("vhdimount")
            .arg("-v")
            .arg(img)
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start vhdimount: {e}"))?;
        let mut m = VhdiMount {
            dir: dir.to_path_buf(),
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if is_mounted(dir) {
                return Ok(m);
            }
            let exited = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "vhdimount {} exited ({status}) before mounting:\n{}",
                    img.display(),
                    m.log_text()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "vhdimount {} did not mount within 20 s:\n{}",
                    img.display(),
                    m.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's stderr so far (the last 4 KiB).
    pub fn log_text(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let cut = bytes.len().saturating_sub(4096);
        String::from_utf8_lossy(&bytes[cut..]).into_owned()
    }

    /// The `n`-th view (`vhdi1` is the base of the chain, the last one the
    /// image that was mounted).
    pub fn view(&self, n: usize) -> PathBuf {
        self.dir.join(format!("vhdi{n}"))
    }

    /// The view of the image that was mounted (the last one).
    pub fn last_view(&self) -> PathBuf {
        let n = (1..)
            .take_while(|&n| self.view(n).exists())
            .last()
            .unwrap_or(1);
        self.view(n)
    }
}

/// Whether `dir` is a mount point now.
fn is_mounted(dir: &Path) -> bool {
    let Ok(canon) = dir.canonicalize() else {
        return false;
    };
    let target = canon.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
    })
}

impl Drop for VhdiMount {
    fn drop(&mut self) {
        for (tool, args) in [("fusermount3", vec!["-u"]), ("umount", vec![])] {
            if !is_mounted(&self.dir) {
                break;
            }
            let _ = Command::new(tool)
                .args(args)
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // Still running after the unmount: end it by its pid.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
