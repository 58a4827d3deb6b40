//! Small helpers of the benchmark: running commands, dropping the page
//! cache, reading the environment, units.

use crate::R;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `statfs` f_type of tmpfs, where "cold" reads would come from RAM.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// MB/s (10^6 bytes per second) of `bytes` in `d`.
pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A positive integer from the environment, or `default` when unset.
pub fn env_u64(name: &str, default: u64) -> R<u64> {
    match std::env::var(name) {
        Ok(v) => Ok(v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{name}={v:?}: expected a positive integer"))?),
        Err(_) => Ok(default),
    }
}

/// Writes back dirty pages and empties the page cache (root only).
pub fn drop_caches(root: bool) -> R<()> {
    unsafe { libc::sync() };
    if root {
        std::fs::write("/proc/sys/vm/drop_caches", "3")
            .map_err(|e| format!("writing /proc/sys/vm/drop_caches: {e}"))?;
    }
    Ok(())
}

/// Runs `c` to completion; a non-zero exit is an error quoting stderr.
pub fn run_cmd(c: &mut Command) -> R<Output> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{:?}: {e}", c.get_program()))?;
    if !out.status.success() {
        let mut line = format!("{:?}", c.get_program());
        for a in c.get_args() {
            let a = a.to_string_lossy();
            line.push(' ');
            line.push_str(if a.len() > 80 { "…" } else { &a });
        }
        return Err(format!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(out)
}

/// Where `tool` is on PATH, if it is.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn is_tmpfs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == TMPFS_MAGIC
}
