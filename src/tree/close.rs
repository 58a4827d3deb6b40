//! Letting go of the images when the mount goes away.
//!
//! `umount` of a FUSE mount returns as soon as the kernel has dropped the
//! connection; it never waits for the daemon (only `fuseblk` mounts get a
//! DESTROY request the kernel waits for). The daemon learns of it at the
//! same moment, when its next read of `/dev/fuse` fails, and its FUSE
//! `destroy` callback runs. Until the process exits, its image
//! descriptors and their QEMU-style locks would stay, so a script's
//! `umount M; qemu-img check M/..` failed on "Failed to get shared
//! "write" lock". So `destroy` calls [`Tree::release_for_unmount`]: stop
//! merges, flush, and drop every lock right away, leaving only the
//! process exit behind.

use super::{Tree, TreeError};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;

impl Tree {
    /// The mount is going away: long work (a merge, a memory import)
    /// stops at its next check, and no merge starts again.
    pub fn begin_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Whether [`Tree::begin_closing`] was called.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Stops merges (one running stops before its commit; none starts
    /// again), flushes every image, then releases every image lock and
    /// the tree lock. Nothing is written afterwards: no FUSE request
    /// arrives after `destroy`, and the merge engine refuses once the tree
    /// is closing.
    pub fn release_for_unmount(&self) -> Result<(), TreeError> {
        self.begin_closing();
        // A merge holds `ops` from start to end: taking it waits for the
        // running one to stop.
        let _ops = self.ops.lock();
        let flushed = self.flush_all();
        for p in self.all_points() {
            for layer in p.io.read().chain.layers() {
                layer.unlock();
            }
        }
        if let Some(f) = &self._tree_lock {
            // SAFETY: flock on a descriptor the tree owns.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
        flushed
    }
}
