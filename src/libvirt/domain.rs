//! A domain's XML: which file disks it has. libvirt keeps the defined
//! domain in `/etc/libvirt/qemu/NAME.xml` and, while it runs, its live
//! state in `/run/libvirt/qemu/NAME.xml` (a `<domstatus>` wrapping the
//! `<domain>`); the live one wins when present.
//!
//! Each `<disk type='file' device='disk'>` gives its target name
//! (`<target dev='vda'/>`) and its `<source file='…'/>`, the leaf of that
//! disk's chain (the backing chain is found in the images, as always).
//! A source must be an absolute path to an existing regular file.

use super::xml::{self, child};
use super::LibvirtError;
use std::path::{Path, PathBuf};

/// One file disk of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// The guest's name for it (`vda`).
    pub target: String,
    /// Canonical path of its leaf image.
    pub source: PathBuf,
}

/// What the domain XML says, as far as snaptree needs it.
#[derive(Clone, Debug)]
pub struct Domain {
    pub name: String,
    pub disks: Vec<Disk>,
    /// Read from `/run/libvirt/qemu` (the domain runs).
    pub running: bool,
}

/// Reads domain `name`'s XML under `root` (`/` but in tests).
pub fn load(root: &Path, name: &str) -> Result<Domain, LibvirtError> {
    let live = root.join("run/libvirt/qemu").join(format!("{name}.xml"));
    let defined = root.join("etc/libvirt/qemu").join(format!("{name}.xml"));
    let (path, running) = if live.exists() {
        (live, true)
    } else {
        (defined, false)
    };
    let text = xml::read(&path)?;
    let doc = xml::parse(&path, &text)?;
    let mut top = doc.root_element();
    if top.has_tag_name("domstatus") {
        top =
            child(top, "domain").ok_or_else(|| malformed(&path, "<domstatus> without <domain>"))?;
    }
    if !top.has_tag_name("domain") {
        return Err(malformed(&path, "the root element is not <domain>"));
    }
    let disks = file_disks(&path, top, Sources::Required)?;
    if disks.is_empty() {
        return Err(LibvirtError::NoDisks { path });
    }
    Ok(Domain {
        name: name.to_string(),
        disks,
        running,
    })
}

/// How [`file_disks`] treats a source that is no regular file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sources {
    /// Refuse it: the domain's own disks must exist.
    Required,
    /// Leave the disk out: the `<domain>` a snapshot record embeds names
    /// the files as they were, and some may be gone since (merged away).
    MayBeGone,
}

/// The file disks of `domain` (a `<domain>` element of the file `path`).
/// Also used for the `<domain>` a snapshot record embeds.
pub fn file_disks(
    path: &Path,
    domain: roxmltree::Node,
    sources: Sources,
) -> Result<Vec<Disk>, LibvirtError> {
    let Some(devices) = child(domain, "devices") else {
        return Ok(Vec::new());
    };
    let mut disks = Vec::new();
    for d in devices.children().filter(|c| c.has_tag_name("disk")) {
        if d.attribute("type") != Some("file") || d.attribute("device").unwrap_or("disk") != "disk"
        {
            continue;
        }
        let Some(file) = child(d, "source").and_then(|s| s.attribute("file")) else {
            continue;
        };
        let target = child(d, "target")
            .and_then(|t| t.attribute("dev"))
            .ok_or_else(|| malformed(path, "a <disk> without <target dev=…>"))?;
        let source = match regular_file(path, file) {
            Ok(f) => f,
            Err(_) if sources == Sources::MayBeGone => continue,
            Err(e) => return Err(e),
        };
        disks.push(Disk {
            target: target.to_string(),
            source,
        });
    }
    Ok(disks)
}

/// `file` (named in the XML file `path`) canonical, if it is an absolute
/// path to a regular file.
pub fn regular_file(path: &Path, file: &str) -> Result<PathBuf, LibvirtError> {
    let bad = |why: &str| LibvirtError::BadDiskPath {
        path: path.to_path_buf(),
        file: file.to_string(),
        why: why.to_string(),
    };
    if !Path::new(file).is_absolute() {
        return Err(bad("not an absolute path"));
    }
    let canon = Path::new(file)
        .canonicalize()
        .map_err(|e| bad(&e.to_string()))?;
    match std::fs::metadata(&canon) {
        Ok(m) if m.is_file() => Ok(canon),
        Ok(_) => Err(bad("not a regular file")),
        Err(e) => Err(bad(&e.to_string())),
    }
}

fn malformed(path: &Path, why: &str) -> LibvirtError {
    LibvirtError::Malformed {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}
