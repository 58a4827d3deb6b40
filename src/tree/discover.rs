//! Finding the images of a tree and how they reference each other.
//!
//! A directory source: every qcow2 and VHD image (found by its magic; a
//! fixed VHD, which has none at its start, by its `.vhd`/`.vpc` name and
//! checksummed footer) plus raw files that an image names as backing (or
//! that end in .raw/.img).
//! A file source: the chain of that one leaf. Images that cannot be parsed
//! are kept as *broken* entries with the reason, so the rest of the tree
//! still mounts and the user learns what is wrong.

use crate::image::{probe, Format};
use crate::input::{open_input, Accept};
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

/// Reads one image's header: its format and backing reference.
pub fn inspect(path: &Path, format: Option<Format>, dir: &Path, allow_external: bool) -> Found {
    let mut found = Found {
        path: path.to_path_buf(),
        format: format.unwrap_or(Format::Raw),
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
            found.backing = header_backing(path)
                .and_then(|n| path.parent().unwrap_or(dir).join(n).canonicalize().ok());
            return found;
        }
    };
    found.format = layer.format();
    if let Some(b) = layer.backing() {
        found.backing_format = b.format.as_deref().and_then(Format::from_name);
        let parent = path.parent().unwrap_or(dir).join(&b.name);
        match parent.canonicalize() {
            Ok(p) if allow_external || p.starts_with(dir) => found.backing = Some(p),
            Ok(p) => {
                found.broken = Some(format!(
                    "{}: backing file {:?} (named at offset {}) resolves to {}, outside the tree directory",
                    path.display(),
                    b.name,
                    b.offset,
                    p.display()
                ))
            }
            Err(e) => {
                found.broken = Some(format!(
                    "{}: backing file {:?} (named at offset {}) cannot be opened: {e}",
                    path.display(),
                    b.name,
                    b.offset
                ))
            }
        }
    }
    found
}

/// The backing file name in a qcow2 header, read with no more checks than
/// it takes to read it safely (for images that do not open).
fn header_backing(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let f = open_input(path, false, Accept::RegularOrBlock).ok()?;
    let mut h = [0u8; 20];
    f.read_exact_at(&mut h, 0).ok()?;
    if &h[..4] != b"QFI\xfb" {
        return None;
    }
    let off = u64::from_be_bytes(h[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(h[16..20].try_into().ok()?) as usize;
    if off == 0 || len == 0 || len > 1023 || off > 2 << 20 {
        return None;
    }
    let mut name = vec![0u8; len];
    f.read_exact_at(&mut name, off).ok()?;
    String::from_utf8(name).ok().filter(|n| !n.contains('\0'))
}

/// Qcow2 or VHD by its magic (a fixed VHD also by its name), else raw.
fn sniff(path: &Path) -> Format {
    open_input(path, false, Accept::RegularOrBlock)
        .ok()
        .and_then(|f| probe::detect_format(&f, path).ok())
        .unwrap_or(Format::Raw)
}

/// Every image of the tree in `dir` (canonical), keyed by canonical path.
pub fn scan_dir(dir: &Path, allow_external: bool) -> std::io::Result<BTreeMap<PathBuf, Found>> {
    let mut found = BTreeMap::new();
    let mut raw_candidates = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_own_file(&name) || !entry.file_type()?.is_file() {
            continue;
        }
        let path = entry.path().canonicalize()?;
        let format = open_input(&path, false, Accept::RegularOrBlock)
            .ok()
            .and_then(|f| probe::detect_format(&f, &path).ok())
            .filter(|f| *f != Format::Raw);
        if let Some(format) = format {
            found.insert(
                path.clone(),
                inspect(&path, Some(format), dir, allow_external),
            );
        } else if name.ends_with(".raw") || name.ends_with(".img") {
            raw_candidates.push(path);
        }
    }
    // Raw files are images when named like one.
    for path in raw_candidates {
        found.insert(
            path.clone(),
            inspect(&path, Some(Format::Raw), dir, allow_external),
        );
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
        let f = inspect(&path, Some(format), dir, allow_external);
        if let Some(b) = &f.backing {
            queue.push((b.clone(), f.backing_format));
        }
        found.insert(path, f);
    }
    // A raw disk whose guest wrote a qcow2 header into its first sector
    // must stay raw: the format its child records wins over the magic.
    let raw_by_reference: Vec<PathBuf> = found
        .values()
        .filter(|f| f.backing_format == Some(Format::Raw))
        .filter_map(|f| f.backing.clone())
        .collect();
    force_raw(&mut found, raw_by_reference, dir, allow_external);
    Ok(found)
}

/// The chain of one leaf image, as found entries.
pub fn scan_chain(
    leaf: &Path,
    dir: &Path,
    allow_external: bool,
    max_depth: usize,
) -> std::io::Result<BTreeMap<PathBuf, Found>> {
    let mut found = BTreeMap::new();
    let mut next = Some((leaf.canonicalize()?, None));
    while let Some((path, format)) = next.take() {
        if found.contains_key(&path) || found.len() >= max_depth {
            break; // a cycle or too deep: the open of the chain reports it
        }
        let f = inspect(&path, format, dir, allow_external);
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
pub fn force_raw(
    found: &mut BTreeMap<PathBuf, Found>,
    paths: Vec<PathBuf>,
    dir: &Path,
    allow_external: bool,
) {
    for p in paths {
        if found.get(&p).is_some_and(|f| f.format != Format::Raw) {
            found.insert(
                p.clone(),
                inspect(&p, Some(Format::Raw), dir, allow_external),
            );
        }
    }
}
