//! Owners and permission bits of the mounted files: each file grants no
//! more than the host file it shows.
//!
//! The mount runs with `default_permissions`, so the kernel checks every
//! access against the owner and mode we report (with `allow_other`, other
//! users reach the mount; the ownership is what keeps them from a disk
//! they could not read on the host). The policy:
//! - a disk (`disk.raw`, `<disk>.raw`): owner and read/write bits of the
//!   point's own image file (the leaf's image for a leaf, the frozen
//!   image for a snapshot point), without the write bits when the point
//!   is read-only (not a leaf, the image opened read-only, or `-o ro`);
//! - `memory.raw`, `memory/*`: owner and read bits of the memory source
//!   file (the delta image for a checkpoint); the `memory` directory
//!   those, plus search where readable;
//! - `info.json`: readable as the point's disk is (it describes it);
//! - the root, point directories, `parent`, `tree`, `status`: the tree
//!   directory's owner and read/search bits (what `ls` of it would show);
//!   the root and point directories keep the owner's write bit, as the
//!   layout always had;
//! - `ctl`, `merge-now`: the tree directory's read bits, writable by its
//!   owner, and by its group where the group may write it (not sticky):
//!   commands create and delete files there; by nobody on a read-only
//!   mount.
//!
//! Sources are `stat`ed at most once per attribute time-to-live: a
//! `chmod` on the host shows within that time, and a busy `getattr`
//! costs no system call.

use crate::ownership::Ownership;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// More cached paths than this (images come and go) and the cache starts
/// over.
const MAX_CACHED: usize = 1 << 16;

/// Cached ownership of host files, by path.
pub struct Owners {
    dir: PathBuf,
    cache: Mutex<HashMap<PathBuf, (Instant, Ownership)>>,
}

impl Owners {
    /// For the tree in directory `dir`.
    pub fn new(dir: &Path) -> Owners {
        Owners {
            dir: dir.to_path_buf(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The ownership of `path`, at most [`super::attrs::TTL`] old. A file
    /// we cannot `stat` (renamed away a moment ago) shows as ours and
    /// private: never more open than it was.
    pub fn of(&self, path: &Path) -> Ownership {
        let now = Instant::now();
        if let Some((at, o)) = self.cache.lock().get(path) {
            if now.duration_since(*at) < super::attrs::TTL {
                return *o;
            }
        }
        let o = Ownership::of(path).unwrap_or_else(|_| Ownership::own(0o600));
        let mut c = self.cache.lock();
        if c.len() >= MAX_CACHED {
            c.clear();
        }
        c.insert(path.to_path_buf(), (now, o));
        o
    }

    /// The tree directory's ownership.
    pub fn tree_dir(&self) -> Ownership {
        self.of(&self.dir)
    }
}

/// A disk of a point whose image has ownership `image`.
pub fn disk(image: Ownership, writable: bool) -> Ownership {
    image.masked(if writable { 0o666 } else { 0o444 })
}

/// `info.json` of a point whose disk shows as `disk`.
pub fn info(disk: Ownership) -> Ownership {
    disk.masked(0o444)
}

/// `memory.raw` and `memory/*` of a memory source with ownership `source`.
pub fn memory(source: Ownership) -> Ownership {
    source.masked(0o444)
}

/// The `memory` directory of a memory source with ownership `source`.
pub fn memory_dir(source: Ownership) -> Ownership {
    searchable(source.masked(0o444))
}

/// `fs/` and `volumes/` of a point whose disk shows as `disk`: whoever
/// may read the disk may browse its guest files (inside, the guest's own
/// owners and modes apply), nobody else.
pub fn guest_dir(disk: Ownership) -> Ownership {
    searchable(disk.masked(0o444))
}

/// The root and point directories, of a tree directory owned `dir`.
pub fn directory(dir: Ownership) -> Ownership {
    let d = dir.masked(0o555);
    Ownership {
        mode: d.mode | 0o200,
        ..d
    }
}

/// `tree` and `status`.
pub fn text(dir: Ownership) -> Ownership {
    dir.masked(0o444)
}

/// The `parent` symlink (a link's bits are never checked).
pub fn link(dir: Ownership) -> Ownership {
    Ownership { mode: 0o777, ..dir }
}

/// `ctl` and `merge-now`: commands create, rename and delete files in the
/// tree directory, so they are for whoever may do that there: its owner,
/// and its group where it is group-writable and not sticky (sticky, a
/// member may not delete another's file); never others.
pub fn control(dir: Ownership, read_only: bool) -> Ownership {
    let d = dir.masked(0o444);
    let group = dir.mode & 0o020 != 0 && dir.mode & 0o1000 == 0;
    let write = match (read_only, group) {
        (true, _) => 0,
        (false, true) => 0o220,
        (false, false) => 0o200,
    };
    Ownership {
        mode: d.mode | write,
        ..d
    }
}

/// What shows bytes of both `a` and `b` (a volume over two disks, the
/// guest views of a multi-disk point): nobody may do more than both
/// allow. With one owner and group, the bits both grant; otherwise only
/// what both grant everyone, for everyone (so neither owner gains access
/// to the other's image through it).
pub fn both(a: Ownership, b: Ownership) -> Ownership {
    if a.uid == b.uid && a.gid == b.gid {
        return a.masked(b.mode);
    }
    let other = a.mode & b.mode & 0o7;
    Ownership {
        mode: other * 0o111,
        ..a
    }
}

/// Search (`x`) wherever read (`r`) is granted.
fn searchable(o: Ownership) -> Ownership {
    Ownership {
        mode: o.mode | ((o.mode & 0o444) >> 2),
        ..o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(mode: u32) -> Ownership {
        Ownership {
            uid: 1234,
            gid: 99,
            mode,
        }
    }

    #[test]
    fn never_more_than_the_source() {
        assert_eq!(disk(o(0o600), true).mode, 0o600);
        assert_eq!(disk(o(0o600), false).mode, 0o400);
        assert_eq!(disk(o(0o755), true).mode, 0o644);
        assert_eq!(info(disk(o(0o640), true)).mode, 0o440);
        assert_eq!(memory(o(0o666)).mode, 0o444);
        assert_eq!(memory_dir(o(0o640)).mode, 0o550);
        assert_eq!(directory(o(0o700)).mode, 0o700);
        assert_eq!(directory(o(0o777)).mode, 0o755);
        assert_eq!(text(o(0o751)).mode, 0o440);
        assert_eq!(control(o(0o777), false).mode, 0o664);
        assert_eq!(control(o(0o1777), false).mode, 0o644);
        assert_eq!(control(o(0o755), false).mode, 0o644);
        assert_eq!(directory(o(0o1777)).mode, 0o755);
        assert_eq!(disk(o(0o4755), true).mode, 0o644);
        assert_eq!(control(o(0o700), true).mode, 0o400);
        assert_eq!(disk(o(0o600), true).uid, 1234);
    }

    #[test]
    fn both_never_grants_what_either_refuses() {
        assert_eq!(both(o(0o644), o(0o600)).mode, 0o600);
        let other = Ownership { uid: 1, ..o(0o644) };
        assert_eq!(both(o(0o644), other).mode, 0o444);
        assert_eq!(both(o(0o640), other).mode, 0);
    }
}
