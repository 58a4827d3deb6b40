//! File attributes of the mounted layout.

use super::inodes::{encode, Inode, PointFile};
use fuser::{FileAttr, FileType, INodeNo};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may cache attributes and entries. Short, because
/// the tree changes under commands (a leaf becomes a snapshot).
pub const TTL: Duration = Duration::from_secs(1);

pub fn epoch(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

pub fn attr(ino: Inode, kind: FileType, perm: u16, size: u64, time: SystemTime) -> FileAttr {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    FileAttr {
        ino: INodeNo(encode(ino)),
        size,
        blocks: size.div_ceil(512),
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid,
        gid,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

pub fn dir(ino: Inode, time: SystemTime) -> FileAttr {
    attr(ino, FileType::Directory, 0o755, 0, time)
}

/// The kind of each file of a point directory.
pub fn point_kind(f: PointFile) -> FileType {
    match f {
        PointFile::Dir | PointFile::MemoryDir => FileType::Directory,
        PointFile::Parent => FileType::Symlink,
        _ => FileType::RegularFile,
    }
}
