//! Control files: `ctl` commands of a snapshot point and `merge-now`.
//!
//! One command per write (parsed in `command`). The write's errno is the outcome, and the reason
//! is recorded for `status`, because an errno alone cannot say why.

use super::command::Command;
use crate::tree::{Tree, TreeError};

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

/// Runs one parsed `ctl` command (or reports why it did not parse) on
/// point `id`, recording the outcome under `label` for `status`.
pub fn run_ctl(
    tree: &Tree,
    id: u64,
    point_name: &str,
    label: &str,
    command: Result<Command, TreeError>,
) -> Result<(), TreeError> {
    let result = command.and_then(|c| match c {
        Command::Snapshot(name) => tree.snapshot(id, &name),
        Command::Clone(name) => tree.clone_point(id, &name),
        Command::Delete => tree.delete(id),
        Command::Merge => tree.merge_point(id).map(|_| ()),
        Command::Checkpoint(source) => checkpoint(tree, id, point_name, &source),
        Command::Memory(source) => tree.set_memory(id, source.as_deref()),
    });
    tree.record(label, &result);
    result
}

/// A write to `merge-now`: coalesce everything coalescable, at full speed.
pub fn run_merge_now(tree: &Tree) -> Result<(), TreeError> {
    let result = tree.merge_all(&crate::merge::Throttle::full()).map(|_| ());
    tree.record("merge-now", &result);
    result
}

/// `checkpoint SOURCE`: imports a memory source as a page-delta
/// checkpoint of the point, throttled by the default settings; the write
/// returns when it is done, and `status` shows its progress meanwhile.
/// Throttled by the mount options `ckpt_pages` and `ckpt_wait`.
fn checkpoint(tree: &Tree, id: u64, point_name: &str, source: &str) -> Result<(), TreeError> {
    use std::sync::atomic::Ordering;
    let throttle = tree.import_throttle();
    let result = tree.checkpoint(id, source, true, throttle, &mut |s| {
        tree.import_progress(point_name, Some(s.describe()));
        // The mount is going away.
        !tree.merge.cancel.load(Ordering::Relaxed)
    });
    tree.import_progress(point_name, None);
    let stats = result?;
    tracing::info!(
        "checkpoint of {point_name:?} from {source}: {}",
        stats.describe()
    );
    Ok(())
}
