//! The `.vmsd` snapshot list: what VMware's snapshot manager shows.
//!
//! Keys, as VMware Workstation and ESXi write them (a real file is quoted
//! in "VMware Snapshot Forensics", stuffphilwrites.com, 2013; VMware KB
//! 1015180 "Understanding virtual machine snapshots" describes the file):
//! `snapshot.numSnapshots`, `snapshot.lastUID`, `snapshot.current` (the uid
//! the running state descends from) and per snapshot `snapshotN.uid`,
//! `.parent` (a uid; absent on a root), `.displayName`, `.description`,
//! `.createTimeHigh`/`.createTimeLow`, `.filename` (its `.vmsn`),
//! `.numDisks`, `.diskM.fileName`, `.diskM.node` (`scsi0:0`). Other keys
//! (`snapshot.mru*`, `snapshotN.type`, `.encoding` ...) are not needed and
//! are ignored.
//!
//! The creation time is microseconds since the Unix epoch split in two
//! 32-bit halves, each written as a signed decimal: `high * 2^32 + (low as
//! u32)` (the forensics write-up above; its sample `300237` /
//! `-1952402371` is 2010-11-11 21:20:38 UTC).
//!
//! Everything that is not a well-formed number where one is due, a count
//! that does not match the entries, or an entry beyond its count refuses
//! the whole file: such a file was not written by VMware.

use super::dict::Dict;
use super::VmwareError;
use std::collections::BTreeMap;
use std::path::Path;

/// At most this many snapshots (VMware allows a few hundred).
pub const MAX_SNAPSHOTS: u32 = 4096;
/// At most this many disks per snapshot (ESXi allows 4 x 64 SCSI disks
/// plus SATA and NVMe: a few hundred at most).
pub const MAX_DISKS: u32 = 512;

/// One disk of a snapshot: the file holding the disk's state as it was
/// when the snapshot was taken, and the device it is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapDisk {
    pub file: String,
    pub node: String,
}

/// One `snapshotN.*` entry.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// `N`, for messages.
    pub index: u32,
    pub uid: u32,
    pub parent: Option<u32>,
    pub name: String,
    pub description: Option<String>,
    /// Microseconds since the epoch (0 when not recorded).
    pub created_us: u64,
    /// The `.vmsn` file, as written.
    pub state_file: Option<String>,
    pub disks: Vec<SnapDisk>,
}

/// What a `.vmsd` says.
#[derive(Clone, Debug, Default)]
pub struct Vmsd {
    pub current: Option<u32>,
    pub snapshots: Vec<Snapshot>,
}

/// Reads the snapshot list out of the parsed `.vmsd` at `path`.
pub fn from_dict(path: &Path, d: &Dict) -> Result<Vmsd, VmwareError> {
    let bad = |key: &str, why: String| VmwareError::BadValue {
        path: path.to_path_buf(),
        key: key.to_string(),
        why,
    };
    let count = match d.get("snapshot.numSnapshots") {
        Some(v) => {
            number(v, 0, MAX_SNAPSHOTS as i64).map_err(|w| bad("snapshot.numSnapshots", w))? as u32
        }
        None => 0,
    };
    // Every snapshotN.* key must belong to an N below the count. One pass
    // groups the `snapshotN.diskM.*` keys by N, so each snapshot checks
    // only its own (a scan of every key per snapshot is quadratic: 4096
    // snapshots in 1 MiB took seconds).
    let mut disk_keys: BTreeMap<u32, Vec<(&str, Option<u32>)>> = BTreeMap::new();
    for (k, _) in d.iter() {
        if let Some(n) = index_of(k, "snapshot") {
            let Some(n) = n.filter(|n| *n < count) else {
                return Err(bad(
                    k,
                    format!("beyond snapshot.numSnapshots = {count} (or a malformed index)"),
                ));
            };
            let rest = &k[k.find('.').map_or(k.len(), |i| i + 1)..];
            if let Some(m) = index_of(rest, "disk") {
                disk_keys.entry(n).or_default().push((k, m));
            }
        }
    }
    let current = match d.get("snapshot.current") {
        Some(v) => {
            Some(number(v, 0, u32::MAX as i64).map_err(|w| bad("snapshot.current", w))? as u32)
        }
        None => None,
    };
    let last = match d.get("snapshot.lastUID") {
        Some(v) => {
            Some(number(v, 0, u32::MAX as i64).map_err(|w| bad("snapshot.lastUID", w))? as u32)
        }
        None => None,
    };
    let mut snapshots = Vec::new();
    for n in 0..count {
        let disks = disk_keys.get(&n).map_or(&[][..], |v| &v[..]);
        let s = snapshot(path, d, n, disks)?;
        if let Some(last) = last.filter(|l| s.uid > *l) {
            return Err(bad(
                &format!("snapshot{n}.uid"),
                format!("{} is above snapshot.lastUID = {last}", s.uid),
            ));
        }
        snapshots.push(s);
    }
    Ok(Vmsd { current, snapshots })
}

/// `Some(Some(n))` for `<prefix>N.<rest>`, `Some(None)` for a malformed
/// `N`, `None` for other keys (`key` lower-cased).
fn index_of(key: &str, prefix: &str) -> Option<Option<u32>> {
    let rest = key.strip_prefix(prefix)?;
    let digits = rest.find('.').map(|e| &rest[..e])?;
    if digits.is_empty() {
        return None; // `snapshot.current`
    }
    let ok = digits.len() <= 9
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    Some(ok.then(|| digits.parse().ok()).flatten())
}

/// Snapshot entry `n`; `disk_keys` are its `snapshotN.diskM.*` keys with
/// their `M` (`None`: malformed).
fn snapshot(
    path: &Path,
    d: &Dict,
    n: u32,
    disk_keys: &[(&str, Option<u32>)],
) -> Result<Snapshot, VmwareError> {
    let e = Entry { path, d, n };
    let uid = e
        .num("uid", 0, u32::MAX as i64)?
        .ok_or_else(|| e.bad("uid", "missing".into()))? as u32;
    let parent = e.num("parent", 0, u32::MAX as i64)?.map(|p| p as u32);
    let name = e
        .text("displayName")
        .ok_or_else(|| e.bad("displayName", "missing".into()))?
        .to_string();
    let created_us = e.created_us()?;
    let disks = e.disks(disk_keys)?;
    let optional = |k: &str| e.text(k).filter(|s| !s.is_empty()).map(str::to_string);
    Ok(Snapshot {
        index: n,
        uid,
        parent,
        name,
        description: optional("description"),
        created_us,
        state_file: optional("filename"),
        disks,
    })
}

/// The `snapshotN.*` keys of one entry: reads them by their short name and
/// words errors with the full key, so the parts of an entry parsed in
/// separate functions below report the same way.
struct Entry<'a> {
    path: &'a Path,
    d: &'a Dict,
    n: u32,
}

impl Entry<'_> {
    /// The full key `snapshotN.<k>`.
    fn key(&self, k: &str) -> String {
        format!("snapshot{}.{k}", self.n)
    }

    /// A bad-value error for `snapshotN.<k>`.
    fn bad(&self, k: &str, why: String) -> VmwareError {
        VmwareError::BadValue {
            path: self.path.to_path_buf(),
            key: self.key(k),
            why,
        }
    }

    /// The value of `snapshotN.<k>`, if set.
    fn text(&self, k: &str) -> Option<&str> {
        self.d.get(&self.key(k))
    }

    /// `snapshotN.<k>` as a number in `lo..=hi`, if set.
    fn num(&self, k: &str, lo: i64, hi: i64) -> Result<Option<i64>, VmwareError> {
        self.text(k)
            .map(|v| number(v, lo, hi).map_err(|w| self.bad(k, w)))
            .transpose()
    }

    /// The creation time in microseconds from its two halves (0 when
    /// neither is set; one alone is refused).
    fn created_us(&self) -> Result<u64, VmwareError> {
        let high = self.num("createTimeHigh", 0, i32::MAX as i64)?;
        let low = self.num("createTimeLow", i32::MIN as i64, u32::MAX as i64)?;
        match (high, low) {
            (Some(h), Some(l)) => Ok(((h as u64) << 32) | (l as u32 as u64)),
            (None, None) => Ok(0),
            _ => Err(self.bad("createTimeHigh", "only one half of the time is set".into())),
        }
    }

    /// The entry's disks: `numDisks` of them, every `diskM.*` key within
    /// that count, each with a file name and a node no other disk has.
    fn disks(&self, disk_keys: &[(&str, Option<u32>)]) -> Result<Vec<SnapDisk>, VmwareError> {
        let num_disks = self.num("numDisks", 0, MAX_DISKS as i64)?.unwrap_or(0) as u32;
        for &(k, m) in disk_keys {
            if m.is_none_or(|m| m >= num_disks) {
                return Err(self.bad(
                    "numDisks",
                    format!("{k} is beyond numDisks = {num_disks} (or a malformed index)"),
                ));
            }
        }
        let mut disks = Vec::new();
        for m in 0..num_disks {
            let get = |f: &str| {
                self.text(&format!("disk{m}.{f}"))
                    .map(str::to_string)
                    .ok_or_else(|| self.bad(&format!("disk{m}.{f}"), "missing".into()))
            };
            disks.push(SnapDisk {
                file: get("fileName")?,
                node: get("node")?,
            });
        }
        let mut nodes = BTreeMap::new();
        for (i, dk) in disks.iter().enumerate() {
            if let Some(j) = nodes.insert(dk.node.to_ascii_lowercase(), i) {
                return Err(self.bad(
                    &format!("disk{i}.node"),
                    format!("{:?} is also disk{j}'s", dk.node),
                ));
            }
        }
        Ok(disks)
    }
}

/// A decimal integer in `lo..=hi` (an optional `-`, digits only).
fn number(v: &str, lo: i64, hi: i64) -> Result<i64, String> {
    let digits = v.strip_prefix('-').unwrap_or(v);
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{v:?} is not a decimal number"));
    }
    let n: i64 = v
        .parse()
        .map_err(|_| format!("{v:?} is not a decimal number"))?;
    if !(lo..=hi).contains(&n) {
        return Err(format!("{n} is outside {lo}..={hi}"));
    }
    Ok(n)
}
