//! The manifest: the tree's own metadata that images cannot hold — names
//! of snapshot points, creation times, hidden flags — in a JSON file in the
//! tree directory.
//!
//! Written atomically (temp file, fsync, rename, fsync of the directory)
//! whenever the mount changes the tree, so a crash leaves either the old
//! or the new manifest. It is advisory: the images' backing references are
//! the truth about structure, and disagreements are reported.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST_NAME: &str = ".snaptree.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub points: Vec<ManifestPoint>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestPoint {
    pub name: String,
    /// Image file name, relative to the tree directory.
    pub image: String,
    /// Name of the parent point (`None` for a root).
    pub parent: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    #[serde(default)]
    pub hidden: bool,
    /// Format of the image (`qcow2`, `raw`): a raw disk can start with
    /// whatever its guest wrote, so its format is recorded, not guessed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The disk this image is, when a snapshot point has several: the
    /// entries sharing a `name` are one point, one entry per disk, and the
    /// mount shows `<disk>.raw` for each. Absent for a one-disk point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The image is no longer part of the tree (a merge made it
    /// unreferenced) and is removed at the next open if nothing references
    /// it. Images the manifest does not know are never removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub garbage: bool,
    /// Memory checkpoint file, relative to the tree directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(MANIFEST_NAME)
}

/// Why a JSON record of the tree directory (the manifest, the merge
/// journal) could not be read. Each names the file; the caller ignores the
/// record and says so.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: larger than {limit} bytes, ignored", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{}: not a valid {what} ({source}); ignored", path.display())]
    Invalid {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads the manifest; `Ok(None)` when there is none.
pub fn load(dir: &Path) -> Result<Option<Manifest>, RecordError> {
    load_record(&path_in(dir), 64 << 20, "manifest")
}

/// Reads the JSON record at `path` (at most `limit` bytes) as a `T`;
/// `Ok(None)` when the file does not exist.
pub fn load_record<T: serde::de::DeserializeOwned>(
    path: &Path,
    limit: u64,
    what: &'static str,
) -> Result<Option<T>, RecordError> {
    let path = path.to_path_buf();
    let text = match crate::input::read_input(&path, limit) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RecordError::Read { path, source }),
    };
    if text.len() as u64 > limit {
        return Err(RecordError::TooLarge { path, limit });
    }
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| RecordError::Invalid { path, what, source })
}

/// Replaces the manifest atomically.
pub fn store(dir: &Path, m: &Manifest) -> std::io::Result<()> {
    write_atomic(dir, MANIFEST_NAME, m)
}

/// Replaces `dir/name` with `value` as JSON atomically: temp file, fsync,
/// rename, fsync of the directory.
pub fn write_atomic(dir: &Path, name: &str, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        // It names every image of the tree: no more open than the file it
        // replaces, or than the directory (see `ownership::tree_file`).
        let like = crate::ownership::tree_file(dir, &dir.join(name));
        let mut f = crate::ownership::create_replacing(&tmp, &like)?;
        f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Makes renames and creations in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
