//! Directory listings, for `readdir` and `readdirplus`: which entries a
//! page holds after a cookie, and (for `readdirplus`) each entry's
//! attributes, so a tree walk needs one round trip per page rather than a
//! lookup per entry.
//!
//! Cookies: in a directory of the layout (root, point, `memory/`, `fs/`,
//! `volumes/`), an entry's cookie is its inode number plus 2, entries in
//! ascending order, so a cookie stays valid while the tree changes between
//! two calls. A guest directory is listed once at opendir, and its cookies
//! are positions in that listing: hard links (one inode, several names)
//! never repeat or skip an entry.

use super::attrs::TTL;
use super::handles::Handle;
use super::inodes::{self, decode, Inode};
use super::SnapFs;
use fuser::{Errno, FileAttr, FileHandle, FileType, INodeNo};
use std::ffi::OsStr;
use std::time::{Duration, UNIX_EPOCH};

/// How long the kernel may keep an entry of the layout: read-only regular
/// files not at all (a `memory.raw` can be replaced under its name and
/// size), everything else [`TTL`].
pub(super) fn entry_ttl(a: &FileAttr) -> Duration {
    if matches!(a.kind, FileType::RegularFile) && a.perm & 0o222 == 0 {
        Duration::ZERO
    } else {
        TTL
    }
}

impl SnapFs {
    /// Calls `emit(inode, cookie, kind, name)` for each entry of directory
    /// `ino` (open as `fh`) after cookie `offset`, until it returns true
    /// (the reply is full).
    pub(super) fn each_entry(
        &self,
        ino: u64,
        fh: FileHandle,
        offset: u64,
        mut emit: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        let dots = [(ino, "."), (inodes::ROOT, "..")];
        if let Some(Handle::GuestDir(listing)) = self.handle(fh) {
            let all = dots
                .iter()
                .map(|(i, n)| (*i, FileType::Directory, OsStr::new(*n)))
                .chain(listing.iter().map(|(i, k, n)| (*i, *k, n.as_os_str())));
            for (i, (e_ino, kind, name)) in all.enumerate().skip(offset as usize) {
                if emit(e_ino, i as u64 + 1, kind, name) {
                    break;
                }
            }
            return Ok(());
        }
        let mut listed = decode(ino)
            .ok_or(Errno::ENOTDIR)
            .and_then(|d| self.list(d))?;
        listed.sort_by_key(|e| e.0);
        for (i, (e_ino, name)) in dots.iter().enumerate() {
            if i as u64 >= offset
                && emit(*e_ino, i as u64 + 1, FileType::Directory, OsStr::new(name))
            {
                return Ok(());
            }
        }
        for (e_ino, kind, name) in listed {
            let cookie = e_ino + 2;
            if cookie > offset && emit(e_ino, cookie, kind, OsStr::new(&name)) {
                break;
            }
        }
        Ok(())
    }

    /// The attributes `readdirplus` gives entry `e_ino`, and for how long.
    /// An entry whose attributes cannot be had now gets placeholder ones
    /// valid for no time at all: the kernel looks it up again on use, and
    /// that lookup reports the error.
    pub(super) fn entry_attr(&self, e_ino: u64, kind: FileType) -> (FileAttr, Duration) {
        let got = match decode(e_ino) {
            Some(Inode::Guest(s, g)) => self.guest_getattr(s, g).ok(),
            Some(i) => self.getattr_of(i).ok().map(|a| (a, entry_ttl(&a))),
            None => None,
        };
        got.unwrap_or_else(|| (placeholder(e_ino, kind), Duration::ZERO))
    }
}

fn placeholder(ino: u64, kind: FileType) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}
