//! Control files: `ctl` commands of a snapshot point and `merge-now`.
//!
//! One command per write, parsed once (see `command`) and dispatched
//! here. The write's errno is the outcome, and the reason is recorded for
//! `status`, because an errno alone cannot say why.

use super::command::Command;
use super::inodes::{self, encode, Inode, PointFile};
use super::layout::MEMORY_FILE;
use super::{errno, SnapFs};
use crate::tree::{PointDisk, Tree, TreeError};
use fuser::{Errno, INodeNo};
use std::ffi::OsStr;
use std::time::Duration;

/// A command is shorter than one page. A longer command arrives in
/// pieces: the kernel splits a `write(2)` larger than `max_write` (1 MiB)
/// into requests whose later ones are at offsets past 0, and a program's
/// stdio (bash's `printf`, anything using `FILE *`) flushes a buffer of
/// `st_blksize` (4096, see `attrs`) as soon as it is full, so the first
/// piece of any command of 4096 bytes or more is a whole page. Refusing
/// every write of a page or more, and every write past offset 0, refuses
/// such a command before any piece of it runs.
pub const PAGE: usize = 4096;

/// Refuses (EINVAL) a control file write that cannot be one whole command:
/// [`PAGE`] bytes or longer, or not at offset 0 (the rest of a split
/// write, or a second command through one descriptor). `label` names the
/// file in `status`.
pub fn whole_command(tree: &Tree, label: &str, offset: u64, len: usize) -> Result<(), TreeError> {
    let why = if len >= PAGE {
        format!("a write of {len} bytes: a command is shorter than {PAGE} bytes; nothing was run")
    } else if offset != 0 {
        format!(
            "a write at offset {offset}: one command per open and write (or the rest of a command of {PAGE} bytes or more); nothing was run"
        )
    } else {
        return Ok(());
    };
    let r = Err(TreeError::new(libc::EINVAL, why));
    tree.record(label, &r);
    r
}

impl SnapFs {
    /// A write of `data` to point `p`'s `ctl`: parses the command once,
    /// refuses one that would replace a memory view still open (see
    /// `memory_in_use`), runs the rest.
    pub(super) fn ctl_write(&self, p: &PointDisk, data: &[u8]) -> Result<(), Errno> {
        let text = String::from_utf8_lossy(data);
        let label = format!("{}/ctl: {}", p.name, text.trim());
        let command = text.parse::<Command>();
        if command.as_ref().is_ok_and(|c| self.memory_in_use(p, c)) {
            let r = Err(TreeError::new(
                libc::EBUSY,
                format!(
                    "{}/{MEMORY_FILE} is open; close it before changing the point's memory",
                    p.name
                ),
            ));
            self.tree.record(&label, &r);
            return r.map_err(|e| errno(e.errno));
        }
        let r = run_ctl(&self.merge, p.id, &p.name, &label, command);
        // Also after a failure: `merge` deletes before it fails.
        self.invalidate_after_command(p.name.clone());
        r.map_err(|e| errno(e.errno))
    }

    /// After a `ctl` command changed the tree: make the kernel forget the
    /// entry of `name` and the attributes of every disk (a leaf may have
    /// become a snapshot or the other way round), before the command's
    /// write returns, so the next `stat` sees the change. Sent from another
    /// thread and waited for at most a second: a notification that needs a
    /// directory lock held by a request we are serving must not hang us.
    pub(super) fn invalidate_after_command(&self, name: String) {
        let Some(n) = self.notifier.get().cloned() else {
            return;
        };
        let disks: Vec<u64> = self
            .tree
            .visible_disks()
            .iter()
            .map(|p| encode(Inode::Point(p.id, PointFile::Disk)))
            .collect();
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = n.inval_entry(INodeNo(inodes::ROOT), OsStr::new(&name));
            for d in disks {
                let _ = n.inval_inode(INodeNo(d), -1, 0);
            }
            let _ = done.send(());
        });
        let _ = wait.recv_timeout(Duration::from_secs(1));
    }
}

/// Runs one parsed `ctl` command (or reports why it did not parse) on
/// point `id`, recording the outcome under `label` for `status`.
pub fn run_ctl(
    merge: &crate::merge::Engine,
    id: u64,
    point_name: &str,
    label: &str,
    command: Result<Command, TreeError>,
) -> Result<(), TreeError> {
    let tree = merge.tree();
    let result = command.and_then(|c| {
        tree.refuse_internal(id, c.verb())?;
        Ok(c)
    });
    let result = result.and_then(|c| match c {
        Command::Snapshot(name) => tree.snapshot(id, &name),
        Command::Clone(name) => tree.clone_point(id, &name),
        Command::Delete => tree.delete(id),
        Command::Merge => merge.merge_point(id).map(|_| ()),
        Command::Checkpoint(source) => checkpoint(tree, id, point_name, &source),
        Command::Memory(source) => tree.set_memory(id, source.as_deref()),
    });
    tree.record(label, &result);
    result
}

/// A write to `merge-now`: coalesce everything coalescable, at full speed.
pub fn run_merge_now(merge: &crate::merge::Engine) -> Result<(), TreeError> {
    let result = merge.merge_all(&crate::merge::Throttle::full()).map(|_| ());
    merge.tree().record("merge-now", &result);
    result
}

/// `checkpoint SOURCE`: imports a memory source as a page-delta
/// checkpoint of the point, throttled by the default settings; the write
/// returns when it is done, and `status` shows its progress meanwhile.
/// Throttled by the mount options `ckpt_pages` and `ckpt_wait`.
fn checkpoint(tree: &Tree, id: u64, point_name: &str, source: &str) -> Result<(), TreeError> {
    let throttle = tree.import_throttle();
    let result = tree.checkpoint(id, source, true, throttle, &mut |s| {
        tree.import_progress(point_name, Some(s.describe()));
        // The mount is going away.
        !tree.closing()
    });
    tree.import_progress(point_name, None);
    let stats = result?;
    tracing::info!(
        "checkpoint of {point_name:?} from {source}: {}",
        stats.describe()
    );
    Ok(())
}
