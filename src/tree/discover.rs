//! Finding the images of a tree and how they reference each other.
//!
//! A directory source: every qcow2 and VHD image (found by its magic; a
//! fixed VHD, which has none at its start, by its `.vhd`/`.vpc` name and
//! checksummed footer) plus raw files that an image names as backing (or
//! that end in .raw/.img).
//! A file source: the chain of that one leaf. Images that cannot be parsed
//! are kept as *broken* entries with the reason, so the rest of the tree
//! still mounts and the user learns what is wrong.

use crate::confine::Confine;
use crate::image::{formats, probe, Format};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One image file found in the tree directory.
#[derive(Clone, Debug)]
pub struct Found {
    /// Canonical path.
    pub path: PathBuf,
    pub format: Format,
    /// Canonical path of its backing file, if it names one.
    pub backing: Option<PathBuf>,
    /// The backing file's format as this image records it.
    pub backing_format: Option<Format>,
    /// Why it cannot be used, if so.
    pub broken: Option<String>,
}

/// Files snaptree writes itself and never treats as images.
pub fn is_own_file(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".snaptree-tmp") || name.ends_with(".snaptree-partial")
}

/// Reads one image's header: its format and backing reference, which must
/// pass `confine`.
pub fn inspect(path: &Path, format: Option<Format>, confine: &Confine) -> Found {
    let mut found = Found {
        path: path.to_path_buf(),
        format: format.unwrap_or_else(Format::raw),
        backing: None,
        backing_format: None,
        broken: None,
    };
    let layer = match probe::open_layer(path, format, false) {
        Ok(l) => l,
        Err(e) => {
            found.broken = Some(e.to_string());
            // Even a broken image may still use a backing file (qemu-img
            // may open it): record it, so nothing it uses is merged away.
            found.backing = header_backing(path).and_then(|n| {
                confine
                    .reference(path.parent().unwrap_or(confine.root()), &n)
                    .ok()
            });
            return found;
        }
    };
    found.format = layer.format();
    if let Some(b) = layer.backing() {
        found.backing_format = b.format.as_deref().and_then(Format::from_name);
        match confine.reference(path.parent().unwrap_or(confine.root()), &b.name) {
            Ok(p) => found.backing = Some(p),
            Err(why) => {
                found.broken = Some(format!(
                    "{}: backing file named at offset {}: {why}",
                    path.display(),
                    b.offset
                ))
            }
        }
    }
    found
}

/// The backing file name an image that does not open records, read with
/// no more checks than it takes to read it safely (by its format; see
/// `image::formats`).
fn header_backing(path: &Path) -> Option<String> {
    formats::backing_name_unchecked(path)
}

/// An image format by its contents (a fixed VHD also by its name), else
/// raw.
fn sniff(path: &Path) -> Format {
    probe::sniff_image(path).unwrap_or_else(Format::raw)
}

/// What a directory scan found: the images, keyed by canonical path, and
/// the entries it passed over that a user may have meant as images.
pub struct Scan {
    pub found: BTreeMap<PathBuf, Found>,
    pub skipped: Vec<String>,
}

/// Every image of the tree in `confine`'s directory.
pub fn scan_dir(confine: &Confine) -> std::io::Result<Scan> {
    let dir = confine.root();
    let mut found = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut raw_candidates = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type()?;
        if is_own_file(&name) || kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            // A symlink may lead out of the tree, or make one image two
            // points; FIFOs and devices are no image files of a tree.
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else {
                "not a regular file"
            };
            skipped.push(format!(
                "{}: {what}; not used as an image",
                entry.path().display()
            ));
            continue;
        }
        let path = entry.path().canonicalize()?;
        if let Some(format) = probe::sniff_image(&path) {
            found.insert(path.clone(), inspect(&path, Some(format), confine));
        } else if name.ends_with(".raw") || name.ends_with(".img") {
            raw_candidates.push(path);
        }
    }
    // Raw files are images when named like one.
    for path in raw_candidates {
        found.insert(path.clone(), inspect(&path, Some(Format::raw()), confine));
    }
    // Backing files elsewhere (a subdirectory, or outside with
    // --allow-external-backing) are images too, of the format their child
    // records, else the one their magic says; and so are their backing
    // files in turn.
    let mut queue: Vec<(PathBuf, Option<Format>)> = found
        .values()
        .filter_map(|f| f.backing.clone().map(|b| (b, f.backing_format)))
        .collect();
    while let Some((path, format)) = queue.pop() {
        if found.contains_key(&path) || found.len() > 1 << 16 {
            continue;
        }
        let format = format.unwrap_or_else(|| sniff(&path));
        let f = inspect(&path, Some(format), confine);
        if let Some(b) = &f.backing {
            queue.push((b.clone(), f.backing_format));
        }
        found.insert(path, f);
    }
    // A raw disk whose guest wrote a qcow2 header into its first sector
    // must stay raw: the format its child records wins over the magic.
    let raw_by_reference: Vec<PathBuf> = found
        .values()
        .filter(|f| f.backing_format.is_some_and(Format::is_raw))
        .filter_map(|f| f.backing.clone())
        .collect();
    force_raw(&mut found, raw_by_reference, confine);
    Ok(Scan { found, skipped })
}

/// The chain of one leaf image, as found entries.
pub fn scan_chain(
    leaf: &Path,
    confine: &Confine,
    max_depth: usize,
) -> std::io::Result<BTreeMap<PathBuf, Found>> {
    let mut found = BTreeMap::new();
    let mut next = Some((leaf.canonicalize()?, None));
    while let Some((path, format)) = next.take() {
        if found.contains_key(&path) || found.len() >= max_depth {
            break; // a cycle or too deep: the open of the chain reports it
        }
        let f = inspect(&path, format, confine);
        if let Some(b) = &f.backing {
            // Respect a recorded backing format for raw files.
            let fmt = probe::open_layer(&path, format, false)
                .ok()
                .and_then(|l| l.backing().and_then(|r| r.format.clone()))
                .and_then(|n| Format::from_name(&n));
            next = Some((b.clone(), fmt));
        }
        found.insert(path, f);
    }
    Ok(found)
}

/// Re-reads `paths` as raw images where they were taken for qcow2.
pub fn force_raw(found: &mut BTreeMap<PathBuf, Found>, paths: Vec<PathBuf>, confine: &Confine) {
    for p in paths {
        if found.get(&p).is_some_and(|f| !f.format.is_raw()) {
            found.insert(p.clone(), inspect(&p, Some(Format::raw()), confine));
        }
    }
}
