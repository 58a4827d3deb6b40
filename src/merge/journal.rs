//! The merge journal: `.snaptree-merge.json` in the tree directory names
//! the merge in flight, written (atomically) before the first byte is
//! copied and removed after the cleanup. The next read-write open looks
//! at the images to tell whether the commit step happened:
//! - `stream`: the child's header names the hidden node's parent (or, for
//!   a format re-pointed by several writes such as a differencing VHD,
//!   the journal holds those writes, applied again now) → it did:
//!   remove the hidden image (if nothing references it) and fix the
//!   manifest. Otherwise the child still reads through the hidden node and
//!   whatever was copied already reads the same, so the merge is redone.
//! - `commit`: the hidden image's file is gone (renamed onto the child's)
//!   → it did: fix the manifest. Otherwise redo; the hidden node only
//!   changed in ranges its child covers.
//!
//! A journal is a file in a directory that may come from someone else, so
//! recovery acts only on one that matches the tree (see [`Trusted`]): its
//! names pass the confinement check for snaptree's own records, the
//! manifest marks the hidden image as hidden, and the images' backing
//! references say what the journal says. Anything else is reported and
//! left untouched, journal included.

use crate::confine::{shown, Confine, Refused};
use crate::image::formats::{self, repoint_of};
use crate::image::probe;
use crate::image::repoint::{unhex, Patch, RepointPlan};
use crate::tree::discover;
use crate::tree::manifest::{self, write_atomic, RecordError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const JOURNAL_NAME: &str = ".snaptree-merge.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub direction: String,
    /// Image files, relative to the tree directory.
    pub hidden: String,
    pub child: String,
    /// The hidden node's backing file name as stored in its header (what
    /// the child names after a stream), `None` for a root.
    pub parent: Option<String>,
    /// A stream into a child whose format re-points by several writes (a
    /// differencing VHD): those writes, stored at its commit point (see
    /// `run::repoint`). Present = committed; recovery checks them through
    /// the child's format and applies them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patches: Option<Vec<Patch>>,
    /// A commit that gives the hidden image the child's identity (a VHD's
    /// unique id) before the rename: the hidden image's own id (hex),
    /// which recovery puts back if the rename did not happen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_id: Option<String>,
}

pub fn store(dir: &Path, e: &Entry) -> std::io::Result<()> {
    write_atomic(dir, JOURNAL_NAME, e)
}

pub fn clear(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(JOURNAL_NAME)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => manifest::sync_dir(dir),
    }
}

fn load(dir: &Path) -> Result<Option<Entry>, RecordError> {
    manifest::load_record(&dir.join(JOURNAL_NAME), 1 << 20, "merge journal")
}

/// Why recovery does not act on a journal entry: it cannot be checked, or
/// it contradicts the tree (see [`trust`]).
#[derive(Debug, thiserror::Error)]
enum Mismatch {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Name(#[from] Refused),
    #[error("{}: backing file: {source}", image.display())]
    Backing {
        image: PathBuf,
        #[source]
        source: Refused,
    },
    #[error(transparent)]
    Image(#[from] crate::error::ImageError),
    /// The journal says one thing, the manifest or the images another.
    #[error("{0}")]
    Contradicts(String),
}

/// An image in `dir`, other than those in `except`, that names `image` as
/// its backing file (`dir` itself when the directory cannot be read: then
/// nobody can tell, so it counts as referenced).
pub fn referenced_by(dir: &Path, image: &Path, except: &[&Path]) -> Option<std::path::PathBuf> {
    let target = image.canonicalize().ok()?;
    let except: Vec<_> = except
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    // References that leave the tree count too: the file is in use.
    let scan = Confine::new(dir, true).and_then(|c| discover::scan_dir(&c));
    match scan {
        Ok(scan) => scan
            .found
            .into_iter()
            .find(|(p, f)| f.backing.as_ref() == Some(&target) && !except.contains(p))
            .map(|(p, _)| p),
        Err(_) => Some(dir.to_path_buf()),
    }
}

fn referenced(dir: &Path, image: &Path) -> bool {
    referenced_by(dir, image, &[]).is_some()
}

/// Removes the hidden point's entry from the manifest and hangs its
/// children under its parent.
fn drop_from_manifest(dir: &Path, hidden_image: &str) -> Result<(), Mismatch> {
    let Some(mut m) = manifest::load(dir)? else {
        return Ok(());
    };
    let Some(gone) = m
        .points
        .iter()
        .find(|p| p.image == hidden_image && !p.garbage)
        .cloned()
    else {
        return Ok(());
    };
    m.points.retain(|p| p.image != hidden_image);
    for p in m.points.iter_mut() {
        if p.parent.as_deref() == Some(gone.name.as_str()) && p.disk == gone.disk {
            p.parent = gone.parent.clone();
        }
    }
    manifest::store(dir, &m).map_err(|source| Mismatch::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Removes the images the manifest marks as garbage, unless something
/// still references them, and their manifest entries.
pub fn reclaim_garbage(dir: &Path, problems: &mut Vec<String>) {
    let Ok(Some(mut m)) = manifest::load(dir) else {
        return;
    };
    if !m.points.iter().any(|p| p.garbage) {
        return;
    }
    let Ok(confine) = Confine::new(dir, false) else {
        return;
    };
    m.points.retain(|p| {
        if !p.garbage {
            return true;
        }
        // Only what snaptree itself marked: a hidden point's image, named
        // as snaptree names images.
        let path = match confine.record(&p.image) {
            Ok(path) if p.hidden => path,
            Ok(_) => {
                problems.push(format!(
                    "manifest marks {} as garbage but not as hidden; kept",
                    shown(&p.image)
                ));
                return true;
            }
            Err(why) => {
                problems.push(format!("manifest garbage entry: {why}; kept"));
                return true;
            }
        };
        if !path.exists() {
            return false;
        }
        if referenced(dir, &path) {
            problems.push(format!(
                "{} is marked as garbage but an image still uses it; kept",
                p.image
            ));
            return true;
        }
        match formats::remove_image(&path) {
            Ok(()) => false,
            Err(e) => {
                problems.push(format!("removing garbage image {}: {e}", p.image));
                true
            }
        }
    });
    if let Err(e) = manifest::store(dir, &m) {
        problems.push(format!("{}: {e}", dir.display()));
    }
}

/// A journal entry checked against the tree (see the module docs).
struct Trusted {
    entry: Entry,
    hidden: PathBuf,
    child: PathBuf,
    /// Whether the merge reached its commit point.
    committed: bool,
}

/// The canonical path of the image `image`'s backing reference (`None`
/// for none); `Err` when the image does not open or its reference does
/// not resolve inside the tree.
fn backing_of(confine: &Confine, image: &Path) -> Result<Option<PathBuf>, Mismatch> {
    let name = match probe::open_layer(image, None, false) {
        Ok(layer) => layer.backing().map(|b| b.name.clone()),
        // A child that checks its parent's identity when it opens (a
        // VMDK's parentCID) does not open while a commit that had given
        // the hidden image the child's identity is interrupted before its
        // rename; its backing name is still read, unchecked, so recovery
        // can give the hidden image its own identity back.
        Err(e) => Some(formats::backing_name_unchecked(image).ok_or(e)?),
    };
    let Some(name) = name else {
        return Ok(None);
    };
    let base = image.parent().unwrap_or(confine.root());
    confine
        .reference(base, &name)
        .map(Some)
        .map_err(|source| Mismatch::Backing {
            image: image.to_path_buf(),
            source,
        })
}

/// Checks the journal entry `e` against the manifest and the images, and
/// tells whether its merge was committed.
fn trust(dir: &Path, e: Entry) -> Result<Trusted, Mismatch> {
    let confine = Confine::new(dir, false).map_err(|source| Mismatch::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let hidden = confine.record(&e.hidden)?;
    let child = confine.record(&e.child)?;
    let contradicts = |why: String| Err(Mismatch::Contradicts(why));
    if hidden == child {
        return contradicts("it names one image as both the hidden image and its child".into());
    }
    if e.direction != "stream" && e.direction != "commit" {
        return contradicts(format!("its direction {:?} is unknown", e.direction));
    }
    if !child.exists() {
        return contradicts(format!("{} does not exist", e.child));
    }
    let m = manifest::load(dir)?.unwrap_or_default();
    let listed: Vec<_> = m.points.iter().filter(|p| p.image == e.hidden).collect();
    if hidden.exists() && !listed.iter().any(|p| p.hidden) || listed.iter().any(|p| !p.hidden) {
        return contradicts(format!(
            "the manifest does not mark {} as a hidden point",
            e.hidden
        ));
    }
    let child_backing = backing_of(&confine, &child);
    let committed = match (e.direction.as_str(), hidden.exists()) {
        ("stream", _) if e.patches.is_some() => {
            // Re-pointing a differencing VHD, perhaps torn: the writes
            // must be re-pointing writes of that very file.
            let patches = e.patches.as_deref().unwrap_or_default();
            formats::format_of(&child)
                .and_then(|f| repoint_of(f, &child))
                .and_then(|r| r.check(&child, patches))?;
            true
        }
        ("stream", true) => {
            let hidden_backing = backing_of(&confine, &hidden)?;
            match child_backing? {
                Some(b) if b == hidden => false,
                b if b == hidden_backing => true,
                _ => {
                    return contradicts(format!(
                        "{} backs onto neither {} nor its backing file",
                        e.child, e.hidden
                    ))
                }
            }
        }
        ("stream", false) => {
            let name = probe::open_layer(&child, None, false)
                .map(|l| l.backing().map(|b| b.name.clone()))?;
            if name != e.parent {
                return contradicts(format!(
                    "{} is gone, and {} does not name its backing file {:?}",
                    e.hidden, e.child, e.parent
                ));
            }
            true
        }
        ("commit", true) => {
            if child_backing? != Some(hidden.clone()) {
                return contradicts(format!("{} does not back onto {}", e.child, e.hidden));
            }
            false
        }
        // The hidden file was renamed onto the child: only the manifest is
        // left to fix.
        _ => true,
    };
    Ok(Trusted {
        entry: e,
        hidden,
        child,
        committed,
    })
}

/// Finishes or prepares to redo the merge a crash interrupted. Returns
/// whether one must be redone; what happened goes to `problems`.
pub fn recover(dir: &Path, problems: &mut Vec<String>) -> bool {
    let e = match load(dir) {
        Ok(Some(e)) => e,
        Ok(None) => return false,
        Err(why) => {
            problems.push(why.to_string());
            return false;
        }
    };
    let Some(t) = trusted(dir, e, problems) else {
        return false;
    };
    repair_both(&t, problems);
    if !reapply_patches(&t, problems) || !restore_hidden_id(&t, problems) {
        return false;
    }
    let what = format!("{} into {}", t.entry.hidden, t.entry.child);
    if !t.committed {
        // The journal stays until the redone merge replaces it, so another
        // interruption before that is still found.
        problems.push(format!(
            "an interrupted merge ({what}) had not reached its commit; it is redone now"
        ));
        return true;
    }
    finish_committed(dir, &t, problems);
    false
}

/// The journal entry `e` if it matches the tree (see [`trust`]). A
/// journal whose child is gone has nothing left to finish or redo and is
/// dropped; any other mismatch is reported and left as it is.
fn trusted(dir: &Path, e: Entry, problems: &mut Vec<String>) -> Option<Trusted> {
    let what = format!("{} into {}", shown(&e.hidden), shown(&e.child));
    let child_gone = Confine::new(dir, false)
        .ok()
        .and_then(|c| c.record(&e.child).ok())
        .is_some_and(|c| !c.exists());
    match trust(dir, e) {
        Ok(t) => Some(t),
        Err(why) if child_gone => {
            problems.push(format!(
                "{JOURNAL_NAME} names a merge of {what}, but {why}; the journal is dropped"
            ));
            let _ = clear(dir);
            None
        }
        Err(why) => {
            problems.push(format!(
                "{JOURNAL_NAME} names a merge of {what} that does not match the tree: {why}; nothing was done and the journal is left as it is"
            ));
            None
        }
    }
}

/// A kill inside a flush leaves leaked clusters in the image being
/// written (never lost data): its format frees them (qcow2), so
/// `qemu-img check` is clean.
fn repair_both(t: &Trusted, problems: &mut Vec<String>) {
    for img in [&t.hidden, &t.child] {
        if !img.exists() {
            continue;
        }
        problems.extend(formats::repair_and_report(img, "merge"));
    }
}

/// A committed re-pointing that needs several writes (a differencing
/// VHD) is applied again from the journal. `false` when that failed: the
/// child may be torn between two headers and only these writes mend it,
/// so the journal stays for the next try.
fn reapply_patches(t: &Trusted, problems: &mut Vec<String>) -> bool {
    let (e, child) = (&t.entry, &t.child);
    let Some(patches) = e.patches.as_deref() else {
        return true;
    };
    let plan = RepointPlan::Journaled(patches.to_vec());
    let applied = formats::format_of(child)
        .and_then(|f| repoint_of(f, child))
        .and_then(|r| r.apply(child, &plan));
    if let Err(err) = applied {
        problems.push(format!(
            "an interrupted merge ({} into {}) had committed, but re-pointing {} failed: {err}; the journal is kept for the next open",
            e.hidden, e.child, e.child
        ));
        return false;
    }
    true
}

/// A commit that had given the hidden image the child's unique id but not
/// reached its rename: the hidden image gets its own id back. `false`
/// when that failed (the journal is kept).
fn restore_hidden_id(t: &Trusted, problems: &mut Vec<String>) -> bool {
    let (e, hidden) = (&t.entry, &t.hidden);
    let (false, Some(id)) = (t.committed, &e.hidden_id) else {
        return true;
    };
    let restored = unhex(id)
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .ok_or_else(|| format!("hidden_id {id:?} is not 16 bytes of hex"))
        .and_then(|id| {
            formats::format_of(hidden)
                .and_then(|f| formats::set_id(f, hidden, id))
                .map_err(|e| e.to_string())
        });
    if let Err(why) = restored {
        problems.push(format!(
            "an interrupted merge ({} into {}): giving {} its unique id back failed: {why}; the journal is kept",
            e.hidden, e.child, e.hidden
        ));
        return false;
    }
    true
}

/// The cleanup after a commit point: a streamed hidden image goes (once
/// nothing references it), the manifest drops it, the journal goes.
fn finish_committed(dir: &Path, t: &Trusted, problems: &mut Vec<String>) {
    let (e, hidden) = (&t.entry, &t.hidden);
    let what = format!("{} into {}", e.hidden, e.child);
    if e.direction == "stream" && hidden.exists() {
        if referenced(dir, hidden) {
            problems.push(format!(
                "interrupted merge {what}: {} is still referenced; kept",
                e.hidden
            ));
        } else if let Err(err) = formats::remove_image(hidden) {
            problems.push(format!(
                "interrupted merge {what}: removing {}: {err}",
                e.hidden
            ));
        }
    }
    if let Err(why) = drop_from_manifest(dir, &e.hidden) {
        problems.push(format!("interrupted merge {what}: {why}"));
    }
    problems.push(format!("an interrupted merge ({what}) was finished"));
    if let Err(err) = clear(dir) {
        problems.push(format!("removing the merge journal: {err}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal written before the format capabilities (patches as VHD
    /// header writes, the hidden VHD's id) reads, and writes back, the same.
    #[test]
    fn journal_json_keeps_its_fields() {
        let text = r#"{"direction":"stream","hidden":"h.vhd","child":"c.vhd","parent":"p.vhd","patches":[{"offset":512,"hex":"00ff"}],"hidden_id":"000102030405060708090a0b0c0d0e0f"}"#;
        let e: Entry = serde_json::from_str(text).expect("parse");
        assert_eq!(
            e.patches.as_deref(),
            Some(&[Patch::new(512, &[0, 0xff])][..])
        );
        assert_eq!(
            unhex(e.hidden_id.as_deref().unwrap()),
            Some((0u8..16).collect())
        );
        assert_eq!(serde_json::to_string(&e).unwrap(), text);
    }
}
