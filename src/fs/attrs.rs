//! File attributes of the mounted layout.

use super::inodes::{encode, Inode};
use crate::ownership::Ownership;
use fuser::{FileAttr, FileType, INodeNo};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and entries. Short, because
/// the tree changes under commands (a leaf becomes a snapshot).
pub const TTL: Duration = Duration::from_secs(1);

pub fn epoch(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// The attributes of a file of `kind` owned and moded as `own` (see
/// [`super::modes`] for who gets what).
pub fn attr(ino: Inode, kind: FileType, own: Ownership, size: u64, time: SystemTime) -> FileAttr {
    FileAttr {
        ino: INodeNo(encode(ino)),
        size,
        blocks: size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind,
        perm: own.mode as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: own.uid,
        gid: own.gid,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}
