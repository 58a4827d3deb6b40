//! A libvirt domain's snapshot records, read without a libvirt daemon:
//! the domain XML (`domain`), its snapshot records (`snapshot`), read
//! safely (`xml`), checked here and turned into the tree's
//! [`Records`](crate::tree::records::Records).
//!
//! Layering: this module sits beside `cli`, above `tree` (it uses the
//! tree's name check and builds the tree's `Records`); `cli` uses it, and
//! nothing below `cli` uses it. It only ever reads: every file is opened
//! read-only, and the domain XML and the records are never written.
//!
//! Rules (each refusal is a named [`LibvirtError`]):
//! - XML: at most 4 MiB, UTF-8, no DOCTYPE or entities (see `xml`).
//! - The domain's file disks are absolute paths to regular files, all in
//!   one directory: that directory is the tree's.
//! - A record's overlay files must lie in that directory (a record cannot
//!   pull in an image from elsewhere). Its memory file may lie anywhere
//!   (records are root-owned host configuration and libvirt puts memory
//!   files where the user asked) but must be a regular file.
//! - Names pass the tree's name check; duplicates and parent cycles are
//!   refused. A refused record is left out (its error goes to `status`);
//!   a refused domain XML fails the mount.

pub mod domain;
pub mod snapshot;
pub mod xml;

use crate::tree::records::{RecordPoint, Records};
use snapshot::{Mode, Snapshot};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Why a libvirt file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: refused: larger than {limit} bytes", .path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{}: refused: has a DOCTYPE or entity declarations (libvirt writes none)", .path.display())]
    Doctype { path: PathBuf },
    #[error("{}: malformed: {why}", .path.display())]
    Malformed { path: PathBuf, why: String },
    #[error("{}: no file disk (<disk type='file' device='disk'>)", .path.display())]
    NoDisks { path: PathBuf },
    #[error("{}: disk path {file:?} refused: {why}", .path.display())]
    BadDiskPath {
        path: PathBuf,
        file: String,
        why: String,
    },
    #[error("the domain's disks are in several directories ({}); snaptree mounts one", .dirs.join(", "))]
    SeveralDirs { dirs: Vec<String> },
    #[error("{}: disk {} refused: outside the domain's disk directory {}", .path.display(), .file.display(), .dir.display())]
    OutsideDisks {
        path: PathBuf,
        file: PathBuf,
        dir: PathBuf,
    },
    #[error("{}: snapshot name {name:?} refused: it {why}", .path.display())]
    BadName {
        path: PathBuf,
        name: String,
        why: String,
    },
    #[error("{}: snapshot {name:?} is recorded twice; left out", .path.display())]
    Duplicate { path: PathBuf, name: String },
    #[error("snapshot {name:?}: its parents form a cycle; left out")]
    ParentCycle { name: String },
}

/// What mounting a domain needs: the tree directory and the records
/// (with what was refused, in their `notes`, for `status`).
pub struct Loaded {
    pub dir: PathBuf,
    pub running: bool,
    pub records: Records,
}

/// Reads domain `name` under `root` (`/` but in tests; it relocates
/// libvirt's own directories only, not the paths the XML names).
/// `reserved` are the mount's own names.
pub fn load(root: &Path, name: &str, reserved: &[String]) -> Result<Loaded, LibvirtError> {
    if let Some(why) = crate::tree::naming::name_problem(name, &[]) {
        return Err(LibvirtError::BadName {
            path: root.to_path_buf(),
            name: name.into(),
            why: why.into(),
        });
    }
    let dom = domain::load(root, name)?;
    let dirs: Vec<PathBuf> = dom
        .disks
        .iter()
        .filter_map(|d| d.source.parent().map(Path::to_path_buf))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if dirs.len() != 1 {
        return Err(LibvirtError::SeveralDirs {
            dirs: dirs.iter().map(|d| d.display().to_string()).collect(),
        });
    }
    let dir = dirs[0].clone();
    let mut problems = Vec::new();
    let mut snaps: BTreeMap<String, Snapshot> = BTreeMap::new();
    for f in snapshot::record_files(root, name) {
        match snapshot::load(&f).and_then(|s| check(s, &dir, reserved, &snaps)) {
            Ok(s) => {
                snaps.insert(s.name.clone(), s);
            }
            Err(e) => problems.push(format!("libvirt: {e}")),
        }
    }
    for n in in_cycles(&snaps) {
        snaps.remove(&n);
        problems.push(format!(
            "libvirt: {}",
            LibvirtError::ParentCycle { name: n }
        ));
    }
    if dom.running {
        problems.push(format!(
            "libvirt: domain {name:?} is running: QEMU holds its active leaf, mounted read-only"
        ));
    }
    let multi = dom.disks.len() > 1;
    let mut points: Vec<RecordPoint> = snaps.values().map(|s| point(s, multi)).collect();
    if multi {
        points.push(current(&dom, &snaps));
    }
    Ok(Loaded {
        dir,
        running: dom.running,
        records: Records {
            keeper: "libvirt".into(),
            points,
            notes: problems,
        },
    })
}

/// Checks a loaded record against the rules (module docs).
fn check(
    s: Snapshot,
    dir: &Path,
    reserved: &[String],
    seen: &BTreeMap<String, Snapshot>,
) -> Result<Snapshot, LibvirtError> {
    if let Some(why) = crate::tree::naming::name_problem(&s.name, reserved) {
        return Err(LibvirtError::BadName {
            path: s.path.clone(),
            name: s.name.clone(),
            why: why.into(),
        });
    }
    if seen.contains_key(&s.name) {
        return Err(LibvirtError::Duplicate {
            path: s.path.clone(),
            name: s.name.clone(),
        });
    }
    for o in s.disks.iter().filter_map(|d| d.overlay.as_ref()) {
        if o.parent() != Some(dir) {
            return Err(LibvirtError::OutsideDisks {
                path: s.path.clone(),
                file: o.clone(),
                dir: dir.to_path_buf(),
            });
        }
    }
    Ok(s)
}

/// The names of records whose parent chain loops.
fn in_cycles(snaps: &BTreeMap<String, Snapshot>) -> Vec<String> {
    let mut out = Vec::new();
    for start in snaps.keys() {
        let mut seen = HashSet::new();
        let mut cur = Some(start.clone());
        while let Some(c) = cur {
            if !seen.insert(c.clone()) {
                if c == *start {
                    out.push(start.clone());
                }
                break;
            }
            cur = snaps.get(&c).and_then(|s| s.parent.clone());
        }
    }
    out
}

/// The tree's record of snapshot `s`. libvirt's external snapshot (see
/// `formatsnapshot.rst`): the `<source file>` of a disk with
/// `snapshot='external'` is the NEW overlay libvirt created at that
/// moment, which the running domain wrote from then on; the snapshot's
/// own, frozen state is therefore the file that overlay backs onto (the
/// same file the record's embedded `<domain>` names as that disk's
/// source). The tree resolves the overlay's backing among the images it
/// found. Internal snapshots need no image: the point is the tag, which
/// is the snapshot's name.
fn point(s: &Snapshot, multi: bool) -> RecordPoint {
    let overlays = s
        .disks
        .iter()
        .filter(|d| d.mode == Mode::External)
        .filter_map(|d| Some((multi.then(|| d.name.clone()), d.overlay.clone()?)))
        .collect();
    let states = s
        .domain_disks
        .iter()
        .map(|d| (multi.then(|| d.target.clone()), d.source.clone()))
        .collect();
    RecordPoint {
        name: s.name.clone(),
        parent: s.parent.clone(),
        created: s.created,
        description: s.description.clone(),
        overlays,
        memory: s.memory_file.clone(),
        unreadable_memory: None,
        images: Vec::new(),
        states,
    }
}

/// The current state of a multi-disk domain: its disks' leaves as one
/// point, named after the domain (`<domain>@current` if a snapshot has
/// that name), with one `<target>.raw` per disk.
fn current(dom: &domain::Domain, snaps: &BTreeMap<String, Snapshot>) -> RecordPoint {
    let name = if snaps.contains_key(&dom.name) {
        format!("{}@current", dom.name)
    } else {
        dom.name.clone()
    };
    RecordPoint {
        name,
        description: Some("the domain's current state".into()),
        images: dom
            .disks
            .iter()
            .map(|d| (Some(d.target.clone()), d.source.clone()))
            .collect(),
        ..RecordPoint::default()
    }
}

#[cfg(test)]
mod tests;
