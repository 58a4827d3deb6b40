//! `snapshot NAME` of a leaf: its image is frozen under NAME and a new
//! overlay takes the leaf's place. Apart from the other operations because
//! it is the one whose files change in several steps: the order of the
//! steps in `swap_files` (overlay under a temporary name, two renames, a
//! directory sync) is the crash-safety argument of the `ops` module doc,
//! and `open::recover_snapshots` finishes or undoes what a crash leaves.

use super::{err, image_err, image_file_name, now, rename_noreplace};
use crate::chain::Chain;
use crate::image::lock::LockMode;
use crate::image::{overlay, probe, Format, Layer};
use crate::tree::manifest;
use crate::tree::open::TMP_SUFFIX;
use crate::tree::{DiskIo, Node, PointDisk, Tree, TreeError};
use std::path::PathBuf;
use std::sync::Arc;

/// The files of one disk's snapshot.
struct SnapshotFiles {
    /// The leaf's image now; renamed to `frozen_image`.
    old_image: PathBuf,
    /// `frozen_image`'s file name, which the new overlay names as its
    /// backing file.
    frozen_file: String,
    /// Where the leaf's content is frozen: NAME's image.
    frozen_image: PathBuf,
    /// The new overlay's final name: `old_image`, or beside it with the
    /// overlay format's extension when that differs (a raw leaf).
    leaf_image: PathBuf,
    /// The overlay's name while it is created (`leaf_image` + TMP_SUFFIX).
    tmp: PathBuf,
    /// The new overlay's format.
    child_format: Format,
}

impl Tree {
    /// `snapshot NAME` on leaf `id`: every disk of the point is
    /// snapshotted, each as one atomic step. Refusals (not a leaf,
    /// read-only, name taken) are checked for all disks first, so they
    /// change nothing.
    pub fn snapshot(&self, id: u64, name: &str) -> Result<(), TreeError> {
        self.writable_check()?;
        let _ops = self.lock_ops();
        self.check_new_name(&self.nodes.read(), name)?;
        let members = self.members(id);
        for m in &members {
            let nodes = self.nodes.read();
            if nodes.get(&m.id).is_some_and(|n| !n.children.is_empty()) {
                return Err(err(
                    libc::EINVAL,
                    format!(
                        "{:?} is not a leaf; `snapshot` works on leaves (use `clone` here)",
                        m.name
                    ),
                ));
            }
            if !m.io.read().writable {
                return Err(err(libc::EROFS, format!("{:?} is read-only", m.name)));
            }
        }
        self.for_each_disk(&members, "snapshot", name, |m| {
            self.snapshot_disk(m.id, name)
        })
    }

    /// Snapshot of one disk (leaf `id`) as NAME: the files first (see
    /// `swap_files`), then the chains under the point's I/O lock, then the
    /// nodes, then the manifest.
    fn snapshot_disk(&self, id: u64, name: &str) -> Result<(), TreeError> {
        let (point, parent) = self.snapshot_leaf(id)?;
        let mut io = point.io.write();
        if !io.writable {
            return Err(err(libc::EROFS, format!("{:?} is read-only", point.name)));
        }
        io.chain.flush().map_err(|e| image_err(&e, e.errno()))?;
        let leaf_layer = io.chain.leaf().clone();
        let files = self.snapshot_files(&io, &point, name, leaf_layer.as_ref())?;
        swap_files(&files, leaf_layer.as_ref(), &self.dir)?;
        // Reopen the frozen image under its new name, read-only, and stack
        // the new overlay on it.
        // Our writer locks on the old descriptor would conflict with the
        // reader locks of the new one.
        leaf_layer.unlock();
        let built = self.reopen_snapshot(&files, &io, name, leaf_layer.format());
        let (frozen_chain, leaf_chain) = match built {
            Ok(c) => c,
            Err(e) => {
                self.problem(format!("snapshot {name}: files are in place but reopening failed ({e}); remount to pick them up"));
                io.writable = false;
                return Err(e);
            }
        };
        drop(leaf_layer);
        let frozen_point = self.new_point(
            name.to_string(),
            point.disk.clone(),
            now(),
            DiskIo {
                chain: frozen_chain,
                image: files.frozen_image,
                writable: false,
            },
        );
        // A memory checkpoint describes the content that is frozen now;
        // the leaf goes on changing without one.
        *frozen_point.memory.write() = point.memory.write().take();
        io.chain = leaf_chain;
        io.image = files.leaf_image;
        drop(io);
        self.insert_frozen(id, parent, frozen_point);
        self.save_manifest()
    }

    /// The point of leaf `id` and its parent's id; refused if `id` is gone
    /// or has children.
    fn snapshot_leaf(&self, id: u64) -> Result<(Arc<PointDisk>, Option<u64>), TreeError> {
        let nodes = self.nodes.read();
        let n = nodes
            .get(&id)
            .ok_or_else(|| err(libc::ENOENT, "no such snapshot point"))?;
        if !n.children.is_empty() {
            return Err(err(
                libc::EINVAL,
                format!(
                    "{:?} is not a leaf; `snapshot` works on leaves (use `clone` here)",
                    n.point.name
                ),
            ));
        }
        Ok((n.point.clone(), n.parent))
    }

    /// Names the files of snapshotting `point` (whose I/O state is `io`
    /// and leaf layer `leaf_layer`) as NAME; refused if the frozen image's
    /// name, or a raw leaf's new overlay name, is taken.
    fn snapshot_files(
        &self,
        io: &DiskIo,
        point: &PointDisk,
        name: &str,
        leaf_layer: &dyn Layer,
    ) -> Result<SnapshotFiles, TreeError> {
        let old_image = io.image.clone();
        let ext = old_image
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_else(|| "qcow2".into());
        let frozen_file = image_file_name(name, point.disk.as_deref(), &ext);
        let frozen_image = self.dir.join(&frozen_file);
        if frozen_image.exists() {
            return Err(err(
                libc::EEXIST,
                format!("{} exists already", frozen_image.display()),
            ));
        }
        // The leaf's overlay keeps the leaf's file name if it is of the
        // leaf's own format (qcow2 on qcow2, VHD on VHD); a raw leaf gets
        // `<stem>.qcow2` beside it.
        let child_format = overlay::child_format(leaf_layer.format());
        let leaf_image = if leaf_layer.format() == child_format {
            old_image.clone()
        } else {
            old_image.with_extension(overlay::extension(child_format))
        };
        if leaf_image != old_image && leaf_image.exists() {
            return Err(err(
                libc::EEXIST,
                format!("{} exists already", leaf_image.display()),
            ));
        }
        let tmp = PathBuf::from(format!("{}{TMP_SUFFIX}", leaf_image.display()));
        Ok(SnapshotFiles {
            old_image,
            frozen_file,
            frozen_image,
            leaf_image,
            tmp,
            child_format,
        })
    }

    /// Opens the chains after the files were swapped: the frozen image
    /// read-only on the leaf's old backing layers (NAME's chain), and the
    /// new overlay, locked for writing, on that (the leaf's new chain).
    fn reopen_snapshot(
        &self,
        files: &SnapshotFiles,
        io: &DiskIo,
        name: &str,
        leaf_format: Format,
    ) -> Result<(Arc<Chain>, Arc<Chain>), TreeError> {
        let frozen: Arc<dyn Layer> =
            probe::open_layer(&files.frozen_image, Some(leaf_format), false)
                .map_err(|e| image_err(&e, e.errno()))?;
        if let Err(why) = frozen.lock(LockMode::Reader) {
            self.problem(format!("{name}: {why}"));
        }
        let mut below = vec![frozen];
        below.extend(io.chain.layers()[1..].iter().cloned());
        let overlay = probe::open_layer(&files.leaf_image, Some(files.child_format), true)
            .map_err(|e| image_err(&e, e.errno()))?;
        overlay
            .lock(LockMode::Writer)
            .map_err(|why| err(libc::EBUSY, why.to_string()))?;
        let mut leaf_layers = vec![overlay];
        leaf_layers.extend(below.iter().cloned());
        Ok((
            Arc::new(Chain::from_layers(below)),
            Arc::new(Chain::from_layers(leaf_layers)),
        ))
    }

    /// Puts `frozen` (NAME) between leaf `id` and its parent `parent` in
    /// the nodes.
    fn insert_frozen(&self, id: u64, parent: Option<u64>, frozen: Arc<PointDisk>) {
        let new_id = frozen.id;
        let mut nodes = self.nodes.write();
        if let Some(pid) = parent {
            if let Some(p) = nodes.get_mut(&pid) {
                for c in p.children.iter_mut() {
                    if *c == id {
                        *c = new_id;
                    }
                }
            }
        }
        nodes.insert(
            new_id,
            Node {
                point: frozen,
                parent,
                children: vec![id],
                hidden: false,
            },
        );
        if let Some(n) = nodes.get_mut(&id) {
            n.parent = Some(new_id);
        }
    }
}

/// The file steps of a snapshot, in the order that is safe at every
/// instant (see the `ops` module doc): the new overlay is created under
/// its temporary name, the leaf's image is renamed to the frozen name, the
/// overlay is renamed into the leaf's place, and the directory is synced.
/// A failure before the last rename undoes the earlier steps.
fn swap_files(
    files: &SnapshotFiles,
    leaf_layer: &dyn Layer,
    dir: &std::path::Path,
) -> Result<(), TreeError> {
    let tmp = &files.tmp;
    let _ = std::fs::remove_file(tmp);
    if let Err(e) = overlay::create_child(
        tmp,
        leaf_layer,
        &files.old_image,
        &files.frozen_file,
        leaf_layer.virtual_size(),
    ) {
        let _ = std::fs::remove_file(tmp);
        return Err(image_err(&e, e.errno()));
    }
    if let Err(e) = rename_noreplace(&files.old_image, &files.frozen_image) {
        let _ = std::fs::remove_file(tmp);
        return Err(e);
    }
    if let Err(e) = rename_noreplace(tmp, &files.leaf_image) {
        // Put the leaf back as it was.
        let _ = std::fs::rename(&files.frozen_image, &files.old_image);
        let _ = std::fs::remove_file(tmp);
        return Err(e);
    }
    let _ = manifest::sync_dir(dir);
    Ok(())
}
