//! libvirt's snapshot records, `/var/lib/libvirt/qemu/snapshot/NAME/*.xml`,
//! one `<domainsnapshot>` each (see libvirt's `formatsnapshot.rst`):
//! `<name>`, `<description>`, `<creationTime>` (seconds since the epoch),
//! `<state>`, `<parent><name>`, `<memory snapshot='no|internal|external'
//! file='…'/>`, `<disks><disk name='vda' snapshot='no|internal|external'>
//! <source file='…'/></disk></disks>` and the `<domain>` as it was when the
//! snapshot was taken.

use super::domain::{self, Disk};
use super::xml::{self, child, child_text};
use super::LibvirtError;
use std::path::{Path, PathBuf};

/// How a disk or the memory is kept by one snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    No,
    Internal,
    External,
}

impl Mode {
    fn parse(v: Option<&str>) -> Mode {
        match v {
            Some("internal") => Mode::Internal,
            Some("external") => Mode::External,
            _ => Mode::No,
        }
    }
}

/// One disk of a snapshot record.
#[derive(Clone, Debug)]
pub struct SnapDisk {
    /// The disk's target name (`vda`) or, as libvirt also accepts, its
    /// source path.
    pub name: String,
    pub mode: Mode,
    /// For an external snapshot: the overlay created at that moment
    /// (canonical); the snapshot's own state is that overlay's backing.
    pub overlay: Option<PathBuf>,
}

/// One snapshot record.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The record file.
    pub path: PathBuf,
    pub name: String,
    pub description: Option<String>,
    pub created: u64,
    pub parent: Option<String>,
    pub state: Option<String>,
    pub memory: Mode,
    pub memory_file: Option<PathBuf>,
    pub disks: Vec<SnapDisk>,
    /// The file disks of the embedded `<domain>` (the disks as they were
    /// when the snapshot was taken: for an external snapshot, the images
    /// holding the snapshot's own state); those whose file is gone are
    /// left out.
    pub domain_disks: Vec<Disk>,
}

/// Reads the record at `path`. Paths must be absolute regular files; the
/// caller checks where they lie.
pub fn load(path: &Path) -> Result<Snapshot, LibvirtError> {
    let text = xml::read(path)?;
    let doc = xml::parse(path, &text)?;
    let top = doc.root_element();
    if !top.has_tag_name("domainsnapshot") {
        return Err(LibvirtError::Malformed {
            path: path.to_path_buf(),
            why: "the root element is not <domainsnapshot>".into(),
        });
    }
    let name = child_text(top, "name").ok_or_else(|| LibvirtError::Malformed {
        path: path.to_path_buf(),
        why: "no <name>".into(),
    })?;
    let mem = child(top, "memory");
    let memory = Mode::parse(mem.and_then(|m| m.attribute("snapshot")));
    let memory_file = match (memory, mem.and_then(|m| m.attribute("file"))) {
        (Mode::External, Some(f)) => Some(domain::regular_file(path, f)?),
        _ => None,
    };
    let domain_disks = match child(top, "domain") {
        Some(d) => domain::file_disks(path, d, domain::Sources::MayBeGone)?,
        None => Vec::new(),
    };
    Ok(Snapshot {
        path: path.to_path_buf(),
        name,
        description: child_text(top, "description"),
        created: child_text(top, "creationTime")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
        parent: child(top, "parent").and_then(|p| child_text(p, "name")),
        state: child_text(top, "state"),
        memory,
        memory_file,
        disks: snap_disks(path, top)?,
        domain_disks,
    })
}

/// The `<disks>` of a record.
fn snap_disks(path: &Path, top: roxmltree::Node) -> Result<Vec<SnapDisk>, LibvirtError> {
    let Some(disks) = child(top, "disks") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for d in disks.children().filter(|c| c.has_tag_name("disk")) {
        let name = d.attribute("name").unwrap_or_default().to_string();
        let mode = Mode::parse(d.attribute("snapshot"));
        let overlay = match (mode, child(d, "source").and_then(|s| s.attribute("file"))) {
            (Mode::External, Some(f)) => Some(domain::regular_file(path, f)?),
            _ => None,
        };
        out.push(SnapDisk {
            name,
            mode,
            overlay,
        });
    }
    Ok(out)
}

/// The record files of domain `name` under `root`, sorted.
pub fn record_files(root: &Path, name: &str) -> Vec<PathBuf> {
    let dir = root.join("var/lib/libvirt/qemu/snapshot").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    files.sort();
    files
}
