//! What every guest filesystem reader (ext2/3/4, FAT, later NTFS and XFS)
//! offers the FUSE layer: inode-number based lookups, attributes, reads,
//! symlink targets, xattrs and data/hole maps. The FUSE layer maps guest
//! inode numbers to its own and never parses a filesystem itself.

use super::GuestResult;

/// A guest inode number, as the guest filesystem numbers it (ext: the inode
/// number; FAT: a synthetic number). Hard links share one.
pub type Ino = u64;

/// The type of a directory entry or inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl FileKind {
    /// The kind a Linux directory entry's file-type byte names: ext2/3/4
    /// (`EXT2_FT_*`) and XFS (`XFS_DIR3_FT_*`) use the same codes, 1 (file)
    /// to 7 (symlink); others (0 unknown, XFS's 8 whiteout) name none.
    pub fn from_dirent_type(t: u8) -> Option<FileKind> {
        Some(match t {
            1 => FileKind::File,
            2 => FileKind::Dir,
            3 => FileKind::CharDevice,
            4 => FileKind::BlockDevice,
            5 => FileKind::Fifo,
            6 => FileKind::Socket,
            7 => FileKind::Symlink,
            _ => return None,
        })
    }
}

/// Seconds since the epoch (negative before 1970) and nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timestamp {
    pub secs: i64,
    pub nsecs: u32,
}

/// An inode's attributes, as `stat` shows them for the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    /// Bytes allocated on the guest volume (for `st_blocks`).
    pub allocated: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// Device number of character and block devices (Linux encoding).
    pub rdev: u32,
}

/// One entry of a directory listing ("." and ".." are not listed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
}

/// What `volumes/index.json` and `status` say about a filesystem.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FsInfo {
    /// "ext4", "ext3", "ext2", "vfat" ...
    pub fstype: String,
    pub label: Option<String>,
    pub uuid: Option<String>,
    /// Things a user should know: "journal replayed in memory (12
    /// transactions)", "dirty log not replayed" ...
    pub notes: Vec<String>,
    /// Served as a crash left it: an XFS log or NTFS `$LogFile` not
    /// replayed, an NTFS volume marked dirty (a note says which).
    pub unclean: bool,
}

impl FsInfo {
    /// The info of a filesystem whose superblock holds a 16-byte UUID and
    /// a NUL-trimmed label (ext2/3/4, XFS): an empty label is none.
    pub fn with_uuid(fstype: &str, label: &[u8], uuid: &[u8; 16], notes: Vec<String>) -> FsInfo {
        FsInfo {
            fstype: fstype.to_string(),
            label: (!label.is_empty()).then(|| String::from_utf8_lossy(label).into_owned()),
            uuid: Some(uuid_text(uuid)),
            notes,
            unclean: false,
        }
    }
}

/// A UUID as `blkid` prints it: lower-case hex, 8-4-4-4-12.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A read-only guest filesystem. `Send + Sync`: FUSE serves requests from
/// several threads; readers keep their caches behind locks.
pub trait GuestFs: Send + Sync {
    /// The root directory's inode.
    fn root(&self) -> Ino;

    /// Type, label, UUID and notes.
    fn info(&self) -> FsInfo;

    /// Attributes of `ino`.
    fn getattr(&self, ino: Ino) -> GuestResult<Attr>;

    /// The inode `name` names in directory `dir`: `NotFound` if none,
    /// `NotDir` if `dir` is no directory. Large directories use their
    /// index (htree) when the filesystem has one.
    fn lookup(&self, dir: Ino, name: &[u8]) -> GuestResult<Ino>;

    /// Every entry of directory `dir`, without "." and "..".
    fn readdir(&self, dir: Ino) -> GuestResult<Vec<DirEntry>>;

    /// Reads file data at `offset` into `buf`; returns the bytes read
    /// (short only at end of file). Holes read as zeros.
    fn read(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> GuestResult<usize>;

    /// A symlink's target, byte for byte.
    fn readlink(&self, ino: Ino) -> GuestResult<Vec<u8>>;

    /// Full xattr names (`user.x`, `security.selinux`, `trusted.y` ...).
    fn listxattr(&self, ino: Ino) -> GuestResult<Vec<Vec<u8>>>;

    /// One xattr's value; `NotFound` if absent.
    fn getxattr(&self, ino: Ino, name: &[u8]) -> GuestResult<Vec<u8>>;

    /// For `SEEK_DATA`: the first byte at or after `offset` that is data
    /// (not a hole), or `None` if only holes follow before end of file.
    /// For `SEEK_HOLE`: [`GuestFs::next_hole`].
    fn next_data(&self, ino: Ino, offset: u64) -> GuestResult<Option<u64>>;

    /// For `SEEK_HOLE`: the first byte at or after `offset` that is in a
    /// hole, or the file size if none (the end of file counts as a hole).
    fn next_hole(&self, ino: Ino, offset: u64) -> GuestResult<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_label_and_dirent_types() {
        let mut u = [0u8; 16];
        u[0] = 0xab;
        u[15] = 0x01;
        let i = FsInfo::with_uuid("xfs", b"", &u, vec![]);
        assert_eq!(
            i.uuid.as_deref(),
            Some("ab000000-0000-0000-0000-000000000001")
        );
        assert_eq!(i.label, None);
        let i = FsInfo::with_uuid("ext4", b"root", &u, vec!["n".into()]);
        assert_eq!(
            (i.fstype.as_str(), i.label.as_deref()),
            ("ext4", Some("root"))
        );
        assert_eq!(FileKind::from_dirent_type(2), Some(FileKind::Dir));
        assert_eq!(FileKind::from_dirent_type(7), Some(FileKind::Symlink));
        assert_eq!(FileKind::from_dirent_type(0), None);
        assert_eq!(FileKind::from_dirent_type(8), None);
    }
}
