//! A VMware VM directory's snapshot list, read without VMware: the
//! `.vmsd` (`vmsd`, through the dictionary reader `dict`), and the `.vmx`
//! for the disks the VM runs on now, turned into the tree's
//! [`Records`](crate::tree::records::Records) so that the mount shows the
//! tree VMware's snapshot manager shows, under the same names.
//!
//! Layering: like `libvirt`, above `tree` and used by `cli` only. It only
//! reads: the `.vmsd` and `.vmx` are never written; points made through
//! `ctl` go to `.snaptree.json` as everywhere.
//!
//! How VMware lays out a snapshot (VMware KB 1015180): taking snapshot S
//! makes each disk's running file read-only and creates a new delta
//! (`vm-000001.vmdk` ...) whose parent it is, which the VM writes from
//! then on. So S's `diskN.fileName` is the file that was running when S
//! was taken: S's own, frozen state, a record's `images`. The files the
//! `.vmx` names now (`scsi0:0.fileName`) are the running state, VMware's
//! "You are here", whose parent is `snapshot.current`.
//!
//! Memory: a snapshot of a running VM saves its RAM either in a `.vmem`
//! beside its `.vmsn` (same stem; a raw dump, shown as `memory.raw`) or
//! inside the `.vmsn` (older versions), whose layout is not read: then
//! `info.json` says so. A suspended VM's `.vmss` (the `.vmx`'s
//! `checkpoint.vmState`) is treated the same way for "You are here".
//!
//! Rules (each refusal a named [`VmwareError`] in `status`): dictionary
//! files at most 1 MiB and well-formed (see `dict`, `vmsd`), else the list
//! is not used at all; every file they name is a plain name in the VM
//! directory (or an absolute path into it), else that snapshot is left
//! out; names pass the tree's name check; a uid or name given twice, and
//! parent cycles, leave the snapshot out.

pub mod dict;
pub mod vmsd;

use crate::tree::records::{RecordPoint, Records};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use vmsd::{Snapshot, Vmsd};

/// The records' keeper, as `status` and `info.json` name it.
pub const KEEPER: &str = "vmware";

/// The name of the running state when no snapshot has it.
pub const CURRENT: &str = "You are here";

/// Why a VMware file, or part of it, was refused.
#[derive(Debug, thiserror::Error)]
pub enum VmwareError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: refused: larger than {limit} bytes", .path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{}: line {line}: malformed: {why}", .path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{}: {key}: bad value: {why}", .path.display())]
    BadValue {
        path: PathBuf,
        key: String,
        why: String,
    },
    #[error("{}: several .vmsd files ({}); none is read", .dir.display(), .names.join(", "))]
    SeveralVmsd { dir: PathBuf, names: Vec<String> },
    #[error("{}: snapshot{index} {name:?}: {key} {file:?} refused: outside the VM directory", .path.display())]
    OutsideDir {
        path: PathBuf,
        index: u32,
        name: String,
        key: String,
        file: String,
    },
    #[error("{}: snapshot{index}: name {name:?} refused: it {why}", .path.display())]
    BadName {
        path: PathBuf,
        index: u32,
        name: String,
        why: String,
    },
    #[error("{}: snapshot{index} {name:?}: uid {uid} is also another snapshot's; left out", .path.display())]
    DuplicateUid {
        path: PathBuf,
        index: u32,
        name: String,
        uid: u32,
    },
    #[error("{}: snapshot{index}: name {name:?} is also another snapshot's; left out", .path.display())]
    DuplicateName {
        path: PathBuf,
        index: u32,
        name: String,
    },
    #[error("snapshot {name:?} (uid {uid}): its parents form a cycle; left out")]
    ParentCycle { name: String, uid: u32 },
}

/// The `.vmsd` of directory `dir`: `None` when it has none.
pub fn find_vmsd(dir: &Path) -> Result<Option<PathBuf>, VmwareError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| VmwareError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| has_ext(p, "vmsd"))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(VmwareError::SeveralVmsd {
            dir: dir.to_path_buf(),
            names: found.iter().map(|p| shown(p)).collect(),
        }),
    }
}

/// Records that only carry a refusal, for `status`.
pub fn refused(e: &VmwareError) -> Records {
    Records {
        keeper: KEEPER.into(),
        points: Vec::new(),
        notes: vec![format!("{KEEPER}: {e}; the snapshot list is not used")],
    }
}

/// Reads `vmsd` (in the VM directory `dir`, canonical) and the `.vmx`
/// beside it into records. `reserved` are the mount's own names. Never
/// fails: what is refused is in the records' notes.
pub fn load(dir: &Path, vmsd_path: &Path, reserved: &[String]) -> Records {
    let list = match dict::read(vmsd_path).and_then(|d| vmsd::from_dict(vmsd_path, &d)) {
        Ok(l) => l,
        Err(e) => return refused(&e),
    };
    let mut notes = Vec::new();
    let snaps = checked(dir, vmsd_path, &list, reserved, &mut notes);
    let vmx = vmx_path(dir, vmsd_path);
    let running = vmx.as_deref().map(|v| running_state(dir, v, &mut notes));
    let multi = snaps.values().any(|s| s.disks.len() > 1)
        || running.as_ref().is_some_and(|r| r.disks.len() > 1);
    let by_uid: BTreeMap<u32, &Snapshot> = snaps.values().map(|s| (s.uid, s)).collect();
    let mut points = Vec::new();
    for uid in parents_first(&by_uid) {
        let s = by_uid[&uid];
        points.push(point(dir, vmsd_path, s, &by_uid, multi, &mut notes));
    }
    if let Some(cur) = list.current.filter(|c| !by_uid.contains_key(c)) {
        notes.push(format!(
            "{KEEPER}: {}: snapshot.current = {cur} is no snapshot of the list",
            shown(vmsd_path)
        ));
    }
    match running {
        Some(r) if !r.disks.is_empty() => {
            let parent = list
                .current
                .and_then(|c| by_uid.get(&c))
                .map(|s| s.name.clone());
            points.push(r.point(&snaps, parent, multi));
        }
        Some(_) => {}
        None => notes.push(format!(
            "{KEEPER}: {}: no .vmx beside it; the running state is named after its file",
            shown(vmsd_path)
        )),
    }
    Records {
        keeper: KEEPER.into(),
        points,
        notes,
    }
}

/// The snapshots that pass the rules (module docs), by index; the others
/// go to `notes`.
fn checked(
    dir: &Path,
    path: &Path,
    list: &Vmsd,
    reserved: &[String],
    notes: &mut Vec<String>,
) -> BTreeMap<u32, Snapshot> {
    let mut out: BTreeMap<u32, Snapshot> = BTreeMap::new();
    let (mut uids, mut names) = (HashSet::new(), HashSet::new());
    for s in &list.snapshots {
        let r = check(dir, path, s, reserved).and_then(|s| {
            if !uids.insert(s.uid) {
                return Err(VmwareError::DuplicateUid {
                    path: path.to_path_buf(),
                    index: s.index,
                    name: s.name.clone(),
                    uid: s.uid,
                });
            }
            if !names.insert(s.name.clone()) {
                return Err(VmwareError::DuplicateName {
                    path: path.to_path_buf(),
                    index: s.index,
                    name: s.name.clone(),
                });
            }
            Ok(s)
        });
        match r {
            Ok(s) => {
                out.insert(s.index, s);
            }
            Err(e) => notes.push(format!("{KEEPER}: {e}")),
        }
    }
    let by_uid: BTreeMap<u32, Option<u32>> = out.values().map(|s| (s.uid, s.parent)).collect();
    for s in out.values().filter(|s| in_cycle(&by_uid, s.uid)) {
        notes.push(format!(
            "{KEEPER}: {}",
            VmwareError::ParentCycle {
                name: s.name.clone(),
                uid: s.uid
            }
        ));
    }
    out.retain(|_, s| !in_cycle(&by_uid, s.uid));
    out
}

/// One snapshot against the name and path rules.
fn check(
    dir: &Path,
    path: &Path,
    s: &Snapshot,
    reserved: &[String],
) -> Result<Snapshot, VmwareError> {
    if let Some(why) = crate::tree::naming::name_problem(&s.name, reserved) {
        return Err(VmwareError::BadName {
            path: path.to_path_buf(),
            index: s.index,
            name: s.name.clone(),
            why: why.into(),
        });
    }
    let files = s
        .disks
        .iter()
        .enumerate()
        .map(|(m, d)| (format!("disk{m}.fileName"), &d.file))
        .chain(s.state_file.iter().map(|f| ("filename".to_string(), f)));
    for (key, file) in files {
        if !plain_name_in(dir, file) {
            return Err(VmwareError::OutsideDir {
                path: path.to_path_buf(),
                index: s.index,
                name: s.name.clone(),
                key,
                file: file.clone(),
            });
        }
    }
    Ok(s.clone())
}

/// Whether `file`, as a VMware file names it, is a file of `dir`: a plain
/// name, or an absolute path whose directory is `dir`; and, if it is a
/// symbolic link, one that resolves into `dir`.
fn plain_name_in(dir: &Path, file: &str) -> bool {
    let p = Path::new(file);
    let name = match p.parent() {
        _ if file.is_empty() || file.contains('\\') || file.contains('\0') => return false,
        Some(parent) if p.is_absolute() => {
            match parent.canonicalize() {
                Ok(c) if c == dir => {}
                _ => return false,
            }
            p.file_name()
        }
        _ if file.contains('/') => return false,
        _ => p.file_name(),
    };
    let Some(name) = name.filter(|n| *n != "." && *n != "..") else {
        return false;
    };
    let joined = dir.join(name);
    match joined.symlink_metadata() {
        Ok(m) if m.file_type().is_symlink() => {
            joined.canonicalize().is_ok_and(|c| c.parent() == Some(dir))
        }
        _ => true,
    }
}

/// `file` (checked by `plain_name_in`) as a canonical path in `dir`, if
/// it is a regular file there.
fn resolve(dir: &Path, file: &str) -> Option<PathBuf> {
    let name = Path::new(file).file_name()?;
    let c = dir.join(name).canonicalize().ok()?;
    (c.parent() == Some(dir) && c.is_file()).then_some(c)
}

/// Whether `uid`'s parent chain comes back to it.
fn in_cycle(parents: &BTreeMap<u32, Option<u32>>, uid: u32) -> bool {
    let mut seen = HashSet::new();
    let mut cur = parents.get(&uid).copied().flatten();
    while let Some(c) = cur {
        if c == uid {
            return true;
        }
        if !seen.insert(c) {
            return false;
        }
        cur = parents.get(&c).copied().flatten();
    }
    false
}

/// Uids with every parent before its children (the tree names a point's
/// parent by looking it up among those already laid out).
fn parents_first(by_uid: &BTreeMap<u32, &Snapshot>) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo: Vec<u32> = by_uid
        .values()
        .filter(|s| s.parent.is_none_or(|p| !by_uid.contains_key(&p)))
        .map(|s| s.uid)
        .rev()
        .collect();
    while let Some(u) = todo.pop() {
        out.push(u);
        todo.extend(
            by_uid
                .values()
                .filter(|s| s.parent == Some(u))
                .map(|s| s.uid)
                .rev(),
        );
    }
    out
}

/// The record of snapshot `s`.
fn point(
    dir: &Path,
    vmsd_path: &Path,
    s: &Snapshot,
    by_uid: &BTreeMap<u32, &Snapshot>,
    multi: bool,
    notes: &mut Vec<String>,
) -> RecordPoint {
    let mut images = Vec::new();
    for d in &s.disks {
        match resolve(dir, &d.file) {
            Some(p) => images.push((multi.then(|| d.node.clone()), p)),
            None => notes.push(format!(
                "disagreement: {}: snapshot {:?} names {} file {:?}, which is missing; that disk of it is not shown",
                shown(vmsd_path),
                s.name,
                d.node,
                d.file
            )),
        }
    }
    let parent = match s.parent {
        Some(p) => match by_uid.get(&p) {
            Some(ps) => Some(ps.name.clone()),
            None => {
                notes.push(format!(
                    "{KEEPER}: {}: snapshot {:?}: parent uid {p} is no snapshot of the list",
                    shown(vmsd_path),
                    s.name
                ));
                None
            }
        },
        None => None,
    };
    let (memory, unreadable_memory) = match &s.state_file {
        Some(f) => memory_beside(dir, f, "vmsn", notes, &s.name),
        None => (None, None),
    };
    RecordPoint {
        name: s.name.clone(),
        parent,
        created: s.created_us / 1_000_000,
        description: s.description.clone(),
        memory,
        unreadable_memory,
        images,
        ..RecordPoint::default()
    }
}

/// The RAM saved with a state file `file` (`.vmsn` or `.vmss`): the
/// `.vmem` of the same stem if there is one, else a note that whatever
/// RAM was saved is inside `file`, unread.
fn memory_beside(
    dir: &Path,
    file: &str,
    kind: &str,
    notes: &mut Vec<String>,
    point: &str,
) -> (Option<PathBuf>, Option<(PathBuf, String)>) {
    let Some(state) = resolve(dir, file) else {
        notes.push(format!(
            "disagreement: {point:?}: its state file {file:?} is missing"
        ));
        return (None, None);
    };
    let vmem = state.with_extension("vmem");
    match resolve(dir, &vmem.to_string_lossy()) {
        Some(v) => (Some(v), None),
        None => (
            None,
            Some((
                state,
                format!(
                    "no .vmem beside this .{kind}: the RAM saved with it, if any, is inside the .{kind}, whose layout snaptree does not read"
                ),
            )),
        ),
    }
}

/// What the `.vmx` says the VM runs on now.
struct Running {
    /// `(node, canonical file)` of each disk that is a VMDK of the
    /// directory.
    disks: Vec<(String, PathBuf)>,
    /// `checkpoint.vmState`: the `.vmss` of a suspended VM.
    suspended: Option<String>,
    dir: PathBuf,
}

impl Running {
    /// The running state as one point under `parent`.
    fn point(
        self,
        snaps: &BTreeMap<u32, Snapshot>,
        parent: Option<String>,
        multi: bool,
    ) -> RecordPoint {
        let name = if snaps.values().any(|s| s.name == CURRENT) {
            format!("{CURRENT}@current")
        } else {
            CURRENT.to_string()
        };
        let mut notes = Vec::new();
        let (memory, unreadable_memory) = match &self.suspended {
            Some(f) => memory_beside(&self.dir, f, "vmss", &mut notes, &name),
            None => (None, None),
        };
        RecordPoint {
            name,
            parent,
            description: Some("the VM's running state".into()),
            images: self
                .disks
                .into_iter()
                .map(|(n, p)| (multi.then_some(n), p))
                .collect(),
            memory,
            unreadable_memory,
            ..RecordPoint::default()
        }
    }
}

/// The `.vmx` beside `vmsd`: the one of the same stem, else the only one.
fn vmx_path(dir: &Path, vmsd: &Path) -> Option<PathBuf> {
    let same = vmsd.with_extension("vmx");
    if same.is_file() {
        return Some(same);
    }
    let all: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| has_ext(p, "vmx"))
        .collect();
    (all.len() == 1).then(|| all[0].clone())
}

/// The disks (`<bus>N:M.fileName` naming a `.vmdk`, not switched off by
/// `.present = "FALSE"`) and suspend file of the `.vmx` at `path`.
fn running_state(dir: &Path, path: &Path, notes: &mut Vec<String>) -> Running {
    let mut r = Running {
        disks: Vec::new(),
        suspended: None,
        dir: dir.to_path_buf(),
    };
    let d = match dict::read(path) {
        Ok(d) => d,
        Err(e) => {
            notes.push(format!(
                "{KEEPER}: {e}; the running state is named after its file"
            ));
            return r;
        }
    };
    for (k, v) in d.iter() {
        let Some(node) = k.strip_suffix(".filename").filter(|n| is_disk_node(n)) else {
            continue;
        };
        let off = |f: &str| {
            d.get(&format!("{node}.{f}"))
                .is_some_and(|p| p.eq_ignore_ascii_case("false"))
        };
        if off("present") || !v.to_ascii_lowercase().ends_with(".vmdk") {
            continue;
        }
        match (plain_name_in(dir, v), resolve(dir, v)) {
            (true, Some(p)) => r.disks.push((node.to_string(), p)),
            (false, _) => notes.push(format!(
                "{KEEPER}: {}: {node}.fileName {v:?} refused: outside the VM directory",
                shown(path)
            )),
            (true, None) => notes.push(format!(
                "disagreement: {}: {node}.fileName {v:?} is missing",
                shown(path)
            )),
        }
    }
    r.suspended = d
        .get("checkpoint.vmState")
        .filter(|s| !s.is_empty())
        .filter(|s| {
            let ok = plain_name_in(dir, s);
            if !ok {
                notes.push(format!(
                    "{KEEPER}: {}: checkpoint.vmState {s:?} refused: outside the VM directory",
                    shown(path)
                ));
            }
            ok
        })
        .map(str::to_string);
    r
}

/// `scsi0:0`, `sata1:2`, `ide0:1`, `nvme0:3` (lower-cased).
fn is_disk_node(n: &str) -> bool {
    let Some((bus, unit)) = n.split_once(':') else {
        return false;
    };
    let num = |s: &str| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
    ["scsi", "sata", "ide", "nvme"]
        .iter()
        .any(|b| bus.strip_prefix(b).is_some_and(num))
        && num(unit)
}

fn has_ext(p: &Path, ext: &str) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext)) && p.is_file()
}

/// A file's name for messages.
fn shown(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

#[cfg(test)]
mod tests;
