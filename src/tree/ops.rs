//! Operations that change the tree: `snapshot`, `clone`, `delete`.
//!
//! Each one changes files first, in an order that is safe at every
//! instant, then the in-memory tree, then the manifest:
//! - snapshot of leaf L as NAME: flush L; create the new overlay as
//!   `L.snaptree-tmp` (backing `NAME.<ext>`); rename L's image to
//!   `NAME.<ext>`; rename the overlay into L's place. A crash between the
//!   renames is finished on the next open (`open::recover_snapshots`).
//!   No data is copied; open handles on L keep working because they refer
//!   to the point, whose chain is swapped under its I/O lock.
//! - clone of P as NAME: a new overlay `NAME.qcow2` on P's image.
//! - delete of a leaf removes its overlay (then hidden ancestors left
//!   without children); delete of a point with children hides it.

mod snapshot;

use super::manifest::{self, Manifest, ManifestPoint};
use super::{DiskIo, Node, PointDisk, Tree, TreeError};
use crate::chain::Chain;
use crate::image::lock::LockMode;
use crate::image::{overlay, probe, Format, Layer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(super) fn err(errno: i32, msg: impl Into<String>) -> TreeError {
    TreeError::new(errno, msg)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn image_err(e: impl std::fmt::Display, errno: i32) -> TreeError {
    err(errno, e.to_string())
}

/// `rename` that fails instead of replacing an existing target.
pub(super) fn rename_noreplace(from: &Path, to: &Path) -> Result<(), TreeError> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| err(libc::EINVAL, "path contains NUL"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(err(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("rename {} to {}: {e}", from.display(), to.display()),
        ));
    }
    Ok(())
}

/// The image file of point NAME: `NAME.ext`, or `NAME.DISK.ext` for one
/// disk of a multi-disk point, so the disks of one point never collide.
fn image_file_name(name: &str, disk: Option<&str>, ext: &str) -> String {
    match disk {
        Some(d) => format!("{name}.{d}.{ext}"),
        None => format!("{name}.{ext}"),
    }
}

impl Tree {
    /// Takes the structural lock for a tree command. A background merge
    /// holding it is asked to give way: it stops before its commit and
    /// starts over later, so a command never waits for a long merge.
    pub(crate) fn lock_ops(&self) -> parking_lot::MutexGuard<'_, ()> {
        use std::sync::atomic::Ordering;
        self.commands_waiting.fetch_add(1, Ordering::SeqCst);
        let g = self.ops.lock();
        self.commands_waiting.fetch_sub(1, Ordering::SeqCst);
        g
    }

    /// Takes the structural lock for work that gives way to commands (a
    /// background merge): it asks no holder to give way itself.
    pub(crate) fn lock_ops_yielding(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.ops.lock()
    }

    /// Whether a tree command waits for the structural lock: work holding
    /// it that gives way (a background merge) stops before its commit.
    pub fn commands_waiting(&self) -> bool {
        self.commands_waiting
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    }

    fn check_new_name(&self, nodes: &BTreeMap<u64, Node>, name: &str) -> Result<(), TreeError> {
        if let Some(why) = super::naming::name_problem(name, &self.opts.reserved_names) {
            return Err(err(
                libc::EINVAL,
                format!("{name:?} is not a valid snapshot name: it {why}"),
            ));
        }
        if nodes.values().any(|n| n.point.name == name)
            || self.foreign.iter().any(|m| m.name == name)
        {
            return Err(err(
                libc::EEXIST,
                format!("a snapshot point named {name:?} exists already"),
            ));
        }
        Ok(())
    }

    /// Refuses `what` (a command's name) on point `id` when it is an
    /// internal snapshot (except `delete`, which deletes it from its image),
    /// or (`delete` only) the current state of an image that holds
    /// internal snapshots.
    pub fn refuse_internal(&self, id: u64, what: &str) -> Result<(), TreeError> {
        let nodes = self.nodes.read();
        let Some(n) = nodes.get(&id) else {
            return Ok(());
        };
        let name = n.point.name.clone();
        let members: Vec<&Node> = nodes.values().filter(|m| m.point.name == name).collect();
        let internal = members
            .iter()
            .filter(|m| m.point.internal.is_some())
            .count();
        if internal > 0 && (what != "delete" || internal < members.len()) {
            return Err(err(
                libc::EROFS,
                format!("{name:?} is an internal snapshot of its image, which snaptree shows read-only: `{what}` is not supported on it"),
            ));
        }
        if what == "delete" && members.iter().all(|m| m.point.internal.is_none()) {
            let images: Vec<PathBuf> = members
                .iter()
                .map(|m| m.point.io.read().image.clone())
                .collect();
            let holds = nodes
                .values()
                .any(|o| o.point.internal.is_some() && images.contains(&o.point.io.read().image));
            if holds {
                return Err(err(
                    libc::EROFS,
                    format!("the image of {name:?} holds internal snapshots, which deleting it would delete too; snaptree does not delete them"),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn writable_check(&self) -> Result<(), TreeError> {
        if self.opts.read_only {
            return Err(err(libc::EROFS, "mounted read-only (-o ro)"));
        }
        Ok(())
    }

    /// Runs `op` on each disk of a point, stopping at the first failure,
    /// whose message then says which disks were done (each disk's step is
    /// atomic, the point's is not).
    pub(super) fn for_each_disk(
        &self,
        members: &[Arc<PointDisk>],
        what: &str,
        name: &str,
        mut op: impl FnMut(&Arc<PointDisk>) -> Result<(), TreeError>,
    ) -> Result<(), TreeError> {
        let mut done = Vec::new();
        for m in members {
            if let Err(e) = op(m) {
                if done.is_empty() {
                    return Err(e);
                }
                return Err(err(
                    e.errno,
                    format!("{what} {name}: disk {} failed ({e}) after disks {} were done; {name:?} holds only those", m.disk.as_deref().unwrap_or("disk"), done.join(", ")),
                ));
            }
            done.push(m.disk.clone().unwrap_or_else(|| "disk".into()));
        }
        Ok(())
    }

    /// `clone NAME` on point `id`: a new writable leaf whose parent it is,
    /// with one overlay per disk.
    pub fn clone_point(&self, id: u64, name: &str) -> Result<(), TreeError> {
        self.writable_check()?;
        self.refuse_internal(id, "clone")?;
        let _ops = self.lock_ops();
        self.check_new_name(&self.nodes.read(), name)?;
        let members = self.members(id);
        if members.is_empty() {
            return Err(err(libc::ENOENT, "no such snapshot point"));
        }
        self.for_each_disk(&members, "clone", name, |m| self.clone_disk(m, name))
    }

    /// Clone of one disk (`point`) as NAME: a new overlay on its image,
    /// then the point becomes a read-only inner point (held as a reader),
    /// then the nodes, then the manifest.
    fn clone_disk(&self, point: &Arc<PointDisk>, name: &str) -> Result<(), TreeError> {
        let id = point.id;
        // The parent stops being a leaf: drain its writes first.
        let mut io = point.io.write();
        io.chain.flush().map_err(|e| image_err(&e, e.errno()))?;
        let (image, child_format) = self.create_clone_image(&io, point, name)?;
        let layer = open_clone_layer(&image, child_format)?;
        let mut layers = vec![layer];
        layers.extend(io.chain.layers().iter().cloned());
        io.writable = false;
        // It is no leaf any more: hold it as a reader, as a fresh open would.
        let own = io.chain.leaf();
        own.unlock();
        if let Err(why) = own.lock(LockMode::Reader) {
            self.problem(format!("{}: {why}", io.image.display()));
        }
        drop(io);
        let child = self.new_point(
            name.to_string(),
            point.disk.clone(),
            now(),
            DiskIo {
                chain: Arc::new(Chain::from_layers(layers)),
                image,
                writable: true,
            },
        );
        self.insert_child(id, child);
        self.save_manifest()
    }

    /// Creates the clone NAME's overlay on `point`'s image (its I/O state
    /// `io`) in the tree directory, synced into it. Returns the overlay's
    /// path and format.
    fn create_clone_image(
        &self,
        io: &DiskIo,
        point: &PointDisk,
        name: &str,
    ) -> Result<(PathBuf, Format), TreeError> {
        let parent_layer = io.chain.leaf().clone();
        let child_format = overlay::child_format(parent_layer.format());
        let image = self.dir.join(image_file_name(
            name,
            point.disk.as_deref(),
            overlay::extension(child_format),
        ));
        // Named relative to the clone's directory (the tree directory):
        // the parent may sit in a subdirectory.
        let parent_file = io
            .image
            .strip_prefix(&self.dir)
            .unwrap_or(&io.image)
            .to_string_lossy()
            .into_owned();
        if let Err(e) = overlay::create_child(
            &image,
            parent_layer.as_ref(),
            &io.image,
            &parent_file,
            io.chain.size(),
        ) {
            // A create that failed half-way leaves nothing behind; one that
            // found the name taken never touched the file.
            if e.errno() != libc::EEXIST {
                let _ = std::fs::remove_file(&image);
            }
            return Err(image_err(&e, e.errno()));
        }
        let _ = manifest::sync_dir(&self.dir);
        Ok((image, child_format))
    }

    /// Adds `child` as a new leaf under point `parent` in the nodes.
    fn insert_child(&self, parent: u64, child: Arc<PointDisk>) {
        let new_id = child.id;
        let mut nodes = self.nodes.write();
        nodes.insert(
            new_id,
            Node {
                point: child,
                parent: Some(parent),
                children: Vec::new(),
                hidden: false,
            },
        );
        if let Some(n) = nodes.get_mut(&parent) {
            n.children.push(new_id);
        }
    }

    /// `delete` (or `rmdir`) of point `id`, all its disks.
    pub fn delete(&self, id: u64) -> Result<(), TreeError> {
        self.writable_check()?;
        self.refuse_internal(id, "delete")?;
        let _ops = self.lock_ops();
        let members = self.members(id);
        if members.is_empty() {
            return Err(err(libc::ENOENT, "no such snapshot point"));
        }
        let name = members[0].name.clone();
        if members.iter().all(|m| m.internal.is_some()) {
            return self.delete_internal_point(&members, &name);
        }
        self.for_each_disk(&members, "delete", &name, |m| self.delete_disk(m.id))
    }

    /// Delete of one disk: hidden if it has children, else removed with
    /// the hidden ancestors nothing needs any more.
    fn delete_disk(&self, id: u64) -> Result<(), TreeError> {
        let has_children = {
            let nodes = self.nodes.read();
            !nodes
                .get(&id)
                .ok_or_else(|| err(libc::ENOENT, "no such snapshot point"))?
                .children
                .is_empty()
        };
        if has_children {
            // Kept for its children; the merge engine coalesces it.
            if let Some(n) = self.nodes.write().get_mut(&id) {
                n.hidden = true;
            }
            return self.save_manifest();
        }
        let mut cur = Some(id);
        while let Some(victim) = cur.take() {
            let (point, parent) = {
                let nodes = self.nodes.read();
                let n = &nodes[&victim];
                (n.point.clone(), n.parent)
            };
            let mut io = point.io.write();
            io.writable = false;
            std::fs::remove_file(&io.image).map_err(|e| {
                err(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("{}: {e}", io.image.display()),
                )
            })?;
            drop(io);
            let mut nodes = self.nodes.write();
            nodes.remove(&victim);
            if let Some(pid) = parent {
                if let Some(p) = nodes.get_mut(&pid) {
                    p.children.retain(|c| *c != victim);
                    if p.children.is_empty() {
                        if p.hidden {
                            cur = Some(pid); // nothing needs it any more
                        } else {
                            let p = p.point.clone();
                            drop(nodes);
                            self.make_leaf_writable(&p);
                        }
                    }
                }
            }
        }
        let _ = manifest::sync_dir(&self.dir);
        self.save_manifest()
    }

    /// A point that became a leaf again becomes writable: its own image is
    /// reopened for writing (nothing else stacks on it now).
    fn make_leaf_writable(&self, point: &Arc<PointDisk>) {
        if self.opts.read_only {
            return;
        }
        let mut io = point.io.write();
        let old = io.chain.leaf().clone();
        // Our reader locks on the old descriptor would refuse the writer.
        old.unlock();
        let mut problems = Vec::new();
        match super::open::open_point_layer(
            &io.image,
            old.format(),
            true,
            &point.name,
            &mut problems,
        ) {
            Ok((layer, writable, locked)) => {
                if !locked {
                    self.unlocked.lock().insert(io.image.clone());
                }
                let mut layers = vec![layer];
                layers.extend(io.chain.layers()[1..].iter().cloned());
                io.chain = Arc::new(Chain::from_layers(layers));
                io.writable = writable;
            }
            Err(e) => {
                let _ = old.lock(LockMode::Reader);
                problems.push(format!(
                    "{:?} is a leaf again but stays read-only: {e}",
                    point.name
                ));
            }
        }
        drop(io);
        for p in problems {
            self.problem(p);
        }
    }

    /// Writes the manifest for the current tree.
    pub fn save_manifest(&self) -> Result<(), TreeError> {
        let nodes = self.nodes.read();
        let mut points: Vec<ManifestPoint> = nodes
            .values()
            // Internal snapshots are recorded by their image's own table.
            .filter(|n| n.point.internal.is_none())
            .map(|n| ManifestPoint {
                name: n.point.name.clone(),
                image: n
                    .point
                    .io
                    .read()
                    .image
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                parent: n
                    .parent
                    .and_then(|p| nodes.get(&p))
                    .map(|p| p.point.name.clone()),
                created: n.point.created,
                hidden: n.hidden,
                disk: n.point.disk.clone(),
                garbage: false,
                format: Some(n.point.io.read().chain.leaf().format().name().to_string()),
                memory: n.point.memory.read().as_ref().map(|m| m.source.clone()),
            })
            .collect();
        points.extend(self.foreign.iter().cloned());
        points.extend(self.garbage.lock().iter().cloned());
        points.sort_by(|a, b| a.name.cmp(&b.name));
        drop(nodes);
        manifest::store(&self.dir, &Manifest { version: 1, points }).map_err(|e| {
            err(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("writing the manifest in {}: {e}", self.dir.display()),
            )
        })?;
        self.sweep_memory(false);
        Ok(())
    }
}

/// Opens a new clone overlay `image` for writing and takes its writer
/// lock; on failure the overlay is removed again (nothing refers to it).
fn open_clone_layer(image: &Path, format: Format) -> Result<Arc<dyn Layer>, TreeError> {
    match probe::open_layer(image, Some(format), true)
        .map_err(|e| image_err(&e, e.errno()))
        .and_then(|l| {
            l.lock(LockMode::Writer)
                .map(|_| l)
                .map_err(|why| err(libc::EBUSY, why.to_string()))
        }) {
        Ok(l) => Ok(l),
        Err(e) => {
            let _ = std::fs::remove_file(image);
            Err(e)
        }
    }
}
