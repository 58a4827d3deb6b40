//! NTFS read in userspace: our own reader (the `ntfs` crate reads no
//! LZNT1-compressed files and no `$LogFile` state, and is path based).
//! Modules: `boot` (geometry), `record` (MFT/INDX fixups, attribute
//! headers), `runlist`, `node` (a file's attributes across extension
//! records via `$ATTRIBUTE_LIST`), `data` (reads incl. sparse and
//! compressed), `lznt1`, `index` (`$I30` B+ trees), `upcase`, `meta`
//! (kinds, links, xattrs), `volume` (`$MFT`, `$UpCase`, `$Volume`,
//! `$LogFile`), `mft` (records by number, cached).
//!
//! What a user sees is what `ntfs-3g` shows with its default options
//! (`ntfs-3g IMAGE MNT`, no user mapping, streams_interface=xattr):
//! - Inodes are MFT record numbers; the root is 5. One directory entry per
//!   hard link (each link is its own `$FILE_NAME` index entry); DOS (8.3)
//!   names are not listed (a Win32+DOS name shows once, by its Win32
//!   name); POSIX names are listed. The root's self entry and the
//!   metafiles (records below 16: `$MFT`, `$Bitmap`, ..., `$Extend`) are
//!   not listed, as ntfs-3g hides them. Names that are not valid UTF-16,
//!   or hold `/` or NUL, are left out.
//! - Lookup is exact (ntfs-3g is case-sensitive by default): the name is
//!   found by descending the `$I30` B+ tree with the volume's `$UpCase`
//!   collation, visiting every entry equal ignoring case, then the one
//!   spelled exactly (and not a DOS-only name) is taken. So a lookup in a
//!   large directory reads one block per tree level.
//! - Modes (ntfs-3g without permission mapping, umask 0): directories
//!   0777, files 0777, symlinks 0777, uid and gid 0. nlink: directories 1
//!   (as ntfs-3g, "to make find work"), else the record's link count.
//! - Kinds: a directory is a record with the directory flag; a reparse
//!   point tagged SYMLINK or MOUNT_POINT (junction), or WSL's LX_SYMLINK,
//!   is a symlink; a file with the SYSTEM attribute holding an Interix
//!   header (`IntxLNK\1` symlink, `IntxBLK`/`IntxCHR` device) is that
//!   kind, and an empty (1-byte) SYSTEM file that is not HIDDEN is a FIFO
//!   (socket): ntfs-3g makes its symlinks and special files that way.
//!   Other reparse tags show as the file or directory they are, with the
//!   reparse buffer as the `system.ntfs_reparse_data` xattr (ntfs-3g
//!   without a plugin would show them as broken symlinks).
//! - Symlink targets: Interix, WSL and relative reparse targets as stored
//!   (backslashes turned to slashes). Absolute ones (`\??\C:\dir`,
//!   `C:\dir`, `\dir`): ntfs-3g looks the path up on this volume
//!   (ignoring case) and, if found, shows `<its mount point>/<path as
//!   stored>`, else `<mount point>/.NTFS-3G/C:/dir`. Our mount point is
//!   not known here, so the same path is given relative to the link's
//!   directory (`../../Windows/System32`), which resolves to the same file
//!   inside our tree wherever it is mounted.
//! - Sizes: files their data size; symlinks their target's length;
//!   directories their `$INDEX_ALLOCATION` size (else the index root's).
//! - Times from `$STANDARD_INFORMATION` (100 ns since 1601): mtime = data
//!   change, ctime = MFT change, atime = access, crtime = creation.
//! - Xattrs: each named data stream (alternate data stream) `NAME` as
//!   `user.NAME` (ntfs-3g's streams_interface=xattr);
//!   `system.ntfs_attrib_be`, the DOS attributes as 4 big-endian bytes
//!   (read-only 0x1, hidden 0x2, system 0x4, directory 0x10, archive 0x20,
//!   compressed 0x800 ...); `system.ntfs_reparse_data` for reparse
//!   points. All are listed (ntfs-3g lists only `user.*`).
//! - Data: sparse runs and bytes past the initialized size read as zeros;
//!   compressed files are decoded (LZNT1) or the read fails naming the
//!   unit's volume offset; encrypted (EFS) files fail as unsupported.
//! - Volume state in `FsInfo::notes`: "volume dirty: ..." when `$Volume`
//!   has the dirty flag; "log not replayed: ..." when `$LogFile`'s restart
//!   area is not marked clean (nothing is replayed; the volume is shown as
//!   on disk). Label: `$VOLUME_NAME`; UUID: the 64-bit serial in upper-case
//!   hex, as blkid.

mod boot;
mod data;
mod fs;
mod index;
mod lznt1;
mod meta;
mod mft;
mod node;
mod record;
mod runlist;
mod upcase;
mod volume;

use crate::guest::{GuestFs, GuestResult, ReadBytes};
use std::sync::Arc;

pub use fs::NtfsFs;

/// The root directory's record.
pub const ROOT: u64 = 5;

/// True if the first sector carries the NTFS signature.
pub fn probe(bytes: &dyn ReadBytes) -> bool {
    let mut b = [0u8; 512];
    bytes.read_exact_at(&mut b, 0).is_ok() && &b[3..11] == b"NTFS    "
}

/// Opens the NTFS volume `bytes`; `volume` names it in errors.
pub fn open(volume: &str, bytes: Arc<dyn ReadBytes>) -> GuestResult<Arc<dyn GuestFs>> {
    Ok(Arc::new(NtfsFs::open(volume, bytes)?))
}
