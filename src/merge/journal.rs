//! The merge journal: `.snaptree-merge.json` in the tree directory names
//! the merge in flight, written (atomically) before the first byte is
//! copied and removed after the cleanup. The next read-write open looks
//! at the images to tell whether the commit step happened:
//! - `stream`: the child's header names the hidden node's parent (or, for
//!   a differencing VHD, the journal holds the writes that re-point it,
//!   applied again now) → it did:
//!   remove the hidden image (if nothing references it) and fix the
//!   manifest. Otherwise the child still reads through the hidden node and
//!   whatever was copied already reads the same, so the merge is redone.
//! - `commit`: the hidden image's file is gone (renamed onto the child's)
//!   → it did: fix the manifest. Otherwise redo; the hidden node only
//!   changed in ranges its child covers.

use crate::image::probe;
use crate::tree::discover;
use crate::tree::manifest::{self, write_atomic};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
    /// A stream into a differencing VHD: the writes that re-point the
    /// child, stored at its commit point (see `run::repoint`). Present =
    /// committed; recovery applies them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patches: Option<Vec<crate::image::vhd::reparent::Patch>>,
    /// A commit that gives the hidden VHD the child's unique id before the
    /// rename: the hidden VHD's own id (hex), which recovery puts back if
    /// the rename did not happen.
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

fn load(dir: &Path) -> Result<Option<Entry>, String> {
    let path = dir.join(JOURNAL_NAME);
    let text = match crate::input::read_input(&path, 1 << 20) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if text.len() > 1 << 20 {
        return Err(format!("{}: larger than 1 MiB, ignored", path.display()));
    }
    serde_json::from_slice(&text).map(Some).map_err(|e| {
        format!(
            "{}: not a valid merge journal ({e}); ignored",
            path.display()
        )
    })
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
    match discover::scan_dir(dir, true) {
        Ok(found) => found
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
fn drop_from_manifest(dir: &Path, hidden_image: &str) -> Result<(), String> {
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
    manifest::store(dir, &m).map_err(|e| format!("{}: {e}", dir.display()))
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
    m.points.retain(|p| {
        if !p.garbage {
            return true;
        }
        let path = dir.join(&p.image);
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
        match std::fs::remove_file(&path) {
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

/// Finishes or prepares to redo the merge a crash interrupted. Returns
/// whether one must be redone; what happened goes to `problems`.
pub fn recover(dir: &Path, problems: &mut Vec<String>) -> bool {
    let e = match load(dir) {
        Ok(Some(e)) => e,
        Ok(None) => return false,
        Err(why) => {
            problems.push(why);
            return false;
        }
    };
    let hidden = dir.join(&e.hidden);
    let child = dir.join(&e.child);
    // A kill inside a flush leaves leaked clusters in the image being
    // written (never lost data): free them, so `qemu-img check` is clean.
    for img in [&hidden, &child] {
        if !img.exists() {
            continue;
        }
        match crate::image::qcow2::repair::repair_leaks(img) {
            Ok(Some(n)) if n > 0 => problems.push(format!(
                "{}: freed {n} clusters an interrupted merge had leaked",
                img.display()
            )),
            Ok(_) => {}
            Err(err) => problems.push(format!("{}: leak repair: {err}", img.display())),
        }
    }
    let committed = match e.direction.as_str() {
        "stream" if e.patches.is_some() => {
            let patches = e.patches.as_deref().unwrap_or_default();
            if let Err(err) = crate::image::vhd::reparent::apply(&child, patches) {
                // Torn between two headers: only these writes mend it, so
                // the journal stays for the next try.
                problems.push(format!(
                    "an interrupted merge ({} into {}) had committed, but re-pointing {} failed: {err}; the journal is kept for the next open",
                    e.hidden, e.child, e.child
                ));
                return false;
            }
            true
        }
        "stream" => probe::open_layer(&child, None, false)
            .map(|l| l.backing().map(|b| b.name.clone()) == e.parent)
            .unwrap_or(false),
        "commit" => !hidden.exists() && child.exists(),
        other => {
            problems.push(format!(
                "merge journal: unknown direction {other:?}; ignored"
            ));
            return false;
        }
    };
    let what = format!("{} into {}", e.hidden, e.child);
    if let (false, Some(id)) = (committed, &e.hidden_id) {
        let restored = crate::image::vhd::reparent::unhex(id)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .ok_or_else(|| format!("hidden_id {id:?} is not 16 bytes of hex"))
            .and_then(|id| {
                crate::image::vhd::reparent::set_unique_id(&hidden, id).map_err(|e| e.to_string())
            });
        if let Err(why) = restored {
            problems.push(format!(
                "an interrupted merge ({what}): giving {} its unique id back failed: {why}; the journal is kept",
                e.hidden
            ));
            return false;
        }
    }
    if !committed && !child.exists() {
        problems.push(format!(
            "merge journal names {what}, but {} is gone; ignored",
            e.child
        ));
        let _ = clear(dir);
        return false;
    }
    if !committed {
        // The journal stays until the redone merge replaces it, so another
        // interruption before that is still found.
        problems.push(format!(
            "an interrupted merge ({what}) had not reached its commit; it is redone now"
        ));
        return true;
    }
    if e.direction == "stream" && hidden.exists() {
        if referenced(dir, &hidden) {
            problems.push(format!(
                "interrupted merge {what}: {} is still referenced; kept",
                e.hidden
            ));
        } else if let Err(err) = std::fs::remove_file(&hidden) {
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
    false
}
