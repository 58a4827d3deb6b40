//! FAT12, FAT16 and FAT32 volumes (USB sticks, the EFI system partition)
//! read in userspace, with VFAT long names, shown the way Linux vfat shows
//! them mounted with `-o ro,uid=0,gid=0,tz=UTC` and the default umask 022.
//!
//! Why our own reader and not the `fatfs` crate: `fatfs::FileSystem` is
//! generic over a `Read + Write + Seek` stream whose one seek position all
//! reads share, and keeps its state in `RefCell`/`Cell`, so it is not
//! `Sync` and every FUSE thread would queue behind one lock; it exposes no
//! entry offsets or first clusters, so it cannot give stable inode numbers;
//! and its `DirEntry::to_file`/`to_dir` panic on the wrong kind. What we
//! need is small: positioned reads, the BPB, the FAT and directory entries.
//!
//! What a user sees, and why:
//! - Inodes: the root is 1 (so is any directory entry pointing at the
//!   root's cluster). Every other file or directory's inode is the volume
//!   byte offset of its short entry (`2^32 + offset/32`): distinct for
//!   empty files, and decodable with no state, so a number one `FatFs`
//!   handed out resolves in any later one on the same bytes (the mount
//!   reopens volumes while the kernel still holds their inodes). A hostile
//!   directory entry pointing back at an ancestor's cluster lists the
//!   ancestor's entries at the same offsets, so the same inodes: the
//!   looping directory contains itself or an ancestor, and the kernel
//!   (`ELOOP`) and `find` stop there; walks by inode terminate because a
//!   volume has finitely many entry offsets.
//! - Mode: directories 0755, files 0755 (Linux vfat's default fmask/dmask
//!   are the umask, 022, and it shows no `showexec` by default); the
//!   read-only attribute clears the write bits of files, not directories
//!   (Linux's default without `rodir`). uid/gid 0.
//! - nlink: files 1; directories 2 + their subdirectories, as Linux counts.
//! - Size: files their size; directories the bytes of their cluster chain
//!   (the FAT12/16 root: its fixed region), as Linux shows them.
//! - Times in UTC (Linux with `tz=UTC`): mtime and ctime from the write
//!   date/time (2 s), atime from the access date, crtime from the creation
//!   date/time and its 10 ms field, as Linux >= 6.4 reports them. The root
//!   has no entry: all its times are the epoch, as in Linux.
//! - No xattrs; FAT has no holes, so a file is all data.
//! - Lookup is exact, then ASCII case-insensitive (Linux vfat is
//!   case-insensitive); listings show each name as stored.
//! - The type follows the volume's layout: a FAT32 boot sector means FAT32
//!   even with fewer than 65,525 clusters (Windows makes 100 MB FAT32 ESPs
//!   on 4K-sector disks; Windows and Linux read them as FAT32); a FAT12/16
//!   boot sector is FAT12 or FAT16 by cluster count, as the spec says.
//! - Damage: a file whose chain loops, leaves the volume, hits a free or
//!   bad cluster or ends before its size fails as a whole with
//!   `Corrupt` (no partial reads); a directory whose chain does fails to
//!   list but its entry still shows (nlink 1, size 0). Entries whose name
//!   holds `/` or NUL are left out. Directories longer than 65,536 entries
//!   (the spec's limit) are corrupt. Listing stops at the first 0x00 entry
//!   (the spec; Linux scans on, which differs only on damaged volumes).
//! - Names: a long name over 255 bytes of UTF-8 (up to 20 slots can hold
//!   260 UTF-16 units; no path component can carry it) shows as its short
//!   name; unpaired surrogates show as U+FFFD. Names are unique within a
//!   listing so every entry can be looked up: when a decoded name repeats
//!   (damage, or surrogates mapped alike), the first entry keeps it, a
//!   later one shows as its short name if that is still free, else it is
//!   left out.
//!
//! The Linux behaviour above is taken from fs/fat as of 6.x; the tests
//! compare against a kernel mount where the kernel has vfat, and against
//! mtools (names, types, sizes, bytes, mtimes) everywhere.

mod bpb;
mod chains;
mod dirent;
mod dirs;
mod table;

use crate::guest::{
    Attr, DirEntry, FileKind, FsInfo, GuestError, GuestFs, GuestResult, ReadBytes, Timestamp,
};
use bpb::{Geometry, RootDir};
use chains::{ChainCache, FileMap};
use dirent::{Short, ATTR_LFN, ATTR_RO, ATTR_VOLUME};
use dirs::{Cache, Dir, Loc};
use parking_lot::Mutex;
use std::sync::Arc;
use table::Table;

const ROOT: u64 = 1;
/// File inodes are this plus the short entry's offset / 32.
const FILE_BASE: u64 = 1 << 32;
/// Parsed directories cached, in total entries.
const DIR_CACHE_ENTRIES: usize = 256 * 1024;
/// Bytes of file maps (cluster runs) cached per volume.
const CHAIN_BYTES: usize = 16 << 20;

/// What an inode number stands for.
enum Node {
    Root,
    /// A short entry (file or directory) by its volume offset.
    Entry(u64),
}

/// Decodes an inode number; numbers that stand for nothing (0, and those
/// between the root and `FILE_BASE`) are `NotFound`.
fn node(ino: u64) -> GuestResult<Node> {
    if ino == ROOT {
        return Ok(Node::Root);
    }
    ino.checked_sub(FILE_BASE)
        .and_then(|i| i.checked_mul(32))
        .map(Node::Entry)
        .ok_or(GuestError::NotFound)
}

/// True if the first sector looks like a FAT boot sector with a valid BPB.
pub fn probe(bytes: &dyn ReadBytes) -> bool {
    let mut b = [0u8; 512];
    bytes.read_exact_at(&mut b, 0).is_ok() && bpb::parse("probe", &b).is_ok()
}

/// Opens the FAT volume `bytes`; `volume_name` names it in errors.
pub fn open(volume_name: &str, bytes: Arc<dyn ReadBytes>) -> GuestResult<Arc<dyn GuestFs>> {
    Ok(Arc::new(FatFs::open(volume_name, bytes)?))
}

/// An open FAT volume.
pub struct FatFs {
    volume: String,
    bytes: Arc<dyn ReadBytes>,
    geo: Geometry,
    table: Table,
    label: Option<String>,
    notes: Vec<String>,
    /// Parsed directories by first cluster (the root: 0).
    dirs: Mutex<Cache>,
    chains: Mutex<ChainCache>,
}

impl FatFs {
    pub fn open(volume: &str, bytes: Arc<dyn ReadBytes>) -> GuestResult<FatFs> {
        let mut b = [0u8; 512];
        bytes
            .read_exact_at(&mut b, 0)
            .map_err(|e| GuestError::io(volume, 0, 512, e))?;
        let geo = bpb::parse(volume, &b)?;
        let mut notes = vec![format!(
            "{}, {} clusters of {} bytes, {}-byte sectors",
            geo.fat_type.name(),
            geo.cluster_count,
            geo.cluster_size,
            geo.bytes_per_sector
        )];
        if geo.volume_bytes > bytes.size() {
            notes.push(format!(
                "the boot sector says {} bytes but the volume has {}; reads past its end fail",
                geo.volume_bytes,
                bytes.size()
            ));
        }
        let table = Table::new(volume, bytes.clone(), geo.clone());
        let mut fs = FatFs {
            volume: volume.to_string(),
            bytes,
            geo,
            table,
            label: None,
            notes,
            dirs: Mutex::new(Cache::new(DIR_CACHE_ENTRIES)),
            chains: Mutex::new(ChainCache::new(CHAIN_BYTES)),
        };
        // The label: the root's label entry, else the BPB's (as blkid).
        let root = fs.dir(ROOT)?;
        let label = root.label.clone().or_else(|| fs.geo.bpb_label.clone());
        fs.label = label.map(|l| l.iter().map(|&c| char::from(c)).collect());
        Ok(fs)
    }

    fn corrupt(&self, offset: u64, what: impl Into<String>) -> GuestError {
        GuestError::corrupt(&self.volume, offset, what)
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> GuestResult<()> {
        self.bytes
            .read_exact_at(buf, off)
            .map_err(|e| GuestError::io(&self.volume, off, buf.len(), e))
    }

    /// The short entry at volume offset `off`; `NotFound` unless it is a
    /// live file or directory entry where directories can be (the fixed
    /// root region or the data area).
    fn short_at(&self, off: u64) -> GuestResult<Short> {
        let in_root = match self.geo.root {
            RootDir::Fixed { offset, entries } => {
                (offset..offset + u64::from(entries) * 32).contains(&off)
            }
            RootDir::Cluster(_) => false,
        };
        if !in_root && (off < self.geo.data_offset || off >= self.bytes.size()) {
            return Err(GuestError::NotFound);
        }
        let mut e = [0u8; 32];
        self.read_at(&mut e, off)?;
        let dots = e[0] == b'.' && e[1..11].iter().all(|&c| c == b' ' || c == b'.');
        if e[0] == 0 || e[0] == 0xE5 || e[11] & 0x3F == ATTR_LFN || e[11] & ATTR_VOLUME != 0 || dots
        {
            return Err(GuestError::NotFound);
        }
        Ok(Short::parse(&e))
    }

    fn is_root_cluster(&self, c: u32) -> bool {
        c == 0 || self.geo.root == RootDir::Cluster(c)
    }

    /// The inode of a listed entry (see the module docs).
    fn entry_ino(&self, offset: u64, s: &Short) -> u64 {
        if s.is_dir() && self.is_root_cluster(s.first_cluster) {
            ROOT
        } else {
            FILE_BASE + offset / 32
        }
    }

    /// The parsed directory `ino`, from the cache or the volume.
    fn dir(&self, ino: u64) -> GuestResult<Arc<Dir>> {
        let loc = match node(ino)? {
            Node::Root => Loc::Root,
            Node::Entry(off) => {
                let s = self.short_at(off)?;
                if !s.is_dir() {
                    return Err(GuestError::NotDir);
                }
                if self.is_root_cluster(s.first_cluster) {
                    Loc::Root
                } else if self.geo.valid_cluster(s.first_cluster) {
                    Loc::Cluster(s.first_cluster)
                } else {
                    return Err(self.corrupt(
                        off,
                        format!("directory entry points to cluster {}", s.first_cluster),
                    ));
                }
            }
        };
        let key = match loc {
            Loc::Root => 0,
            Loc::Cluster(c) => u64::from(c),
        };
        if let Some(d) = self.dirs.lock().get(key) {
            return Ok(d);
        }
        let d = Arc::new(dirs::load(
            &self.volume,
            &*self.bytes,
            &self.geo,
            &self.table,
            loc,
        )?);
        self.dirs.lock().put(key, d.clone());
        Ok(d)
    }

    fn attr_of(&self, ino: u64, s: &Short) -> GuestResult<Attr> {
        let (kind, size, nlink, perm) = if s.is_dir() {
            let (size, nlink) = match self.dir(ino) {
                Ok(d) => (d.bytes, 2 + d.subdirs),
                // The entry is still shown; listing it reports the damage.
                Err(_) => (0, 1),
            };
            (FileKind::Dir, size, nlink, 0o755)
        } else {
            let perm = if s.attr & ATTR_RO != 0 { 0o555 } else { 0o755 };
            (FileKind::File, u64::from(s.size), 1, perm)
        };
        let cs = u64::from(self.geo.cluster_size);
        Ok(Attr {
            ino,
            kind,
            perm,
            uid: 0,
            gid: 0,
            size,
            nlink,
            allocated: size.div_ceil(cs) * cs,
            atime: s.atime(),
            mtime: s.mtime(),
            ctime: s.mtime(),
            crtime: s.crtime(),
            rdev: 0,
        })
    }

    fn root_attr(&self) -> GuestResult<Attr> {
        let d = self.dir(ROOT)?;
        Ok(Attr {
            ino: ROOT,
            kind: FileKind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            size: d.bytes,
            nlink: 2 + d.subdirs,
            allocated: d.bytes,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            crtime: Timestamp::default(),
            rdev: 0,
        })
    }

    /// The short entry of file inode `ino`.
    fn file(&self, ino: u64) -> GuestResult<Short> {
        match node(ino)? {
            Node::Entry(off) => {
                let s = self.short_at(off)?;
                if s.is_dir() {
                    Err(GuestError::IsDir)
                } else {
                    Ok(s)
                }
            }
            _ => Err(GuestError::IsDir),
        }
    }

    /// File `ino`'s size and where its clusters are, cached so reads
    /// neither re-read its entry nor re-walk the FAT.
    fn file_map(&self, ino: u64) -> GuestResult<Arc<FileMap>> {
        if let Some(m) = self.chains.lock().get(ino) {
            return Ok(m);
        }
        let s = self.file(ino)?;
        let need = u64::from(s.size).div_ceil(u64::from(self.geo.cluster_size));
        let runs = if need == 0 {
            Vec::new()
        } else {
            self.table
                .chain(s.first_cluster, Some(need), true)
                .map_err(|e| match e {
                    GuestError::Corrupt {
                        offset: 0, what, ..
                    } => self.corrupt((ino - FILE_BASE) * 32, format!("file entry: {what}")),
                    e => e,
                })?
        };
        let m = Arc::new(FileMap::new(
            u64::from(s.size),
            need,
            runs,
            chains::MAX_RUNS,
        ));
        self.chains.lock().put(ino, m.clone());
        Ok(m)
    }
}

impl GuestFs for FatFs {
    fn root(&self) -> u64 {
        ROOT
    }

    fn info(&self) -> FsInfo {
        FsInfo {
            fstype: "vfat".to_string(),
            label: self.label.clone(),
            uuid: self
                .geo
                .volume_id
                .map(|id| format!("{:04X}-{:04X}", id >> 16, id & 0xFFFF)),
            notes: self.notes.clone(),
            unclean: false,
        }
    }

    fn getattr(&self, ino: u64) -> GuestResult<Attr> {
        match node(ino)? {
            Node::Root => self.root_attr(),
            Node::Entry(off) => {
                let s = self.short_at(off)?;
                self.attr_of(ino, &s)
            }
        }
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> GuestResult<u64> {
        let d = self.dir(dir)?;
        let i = match d.index.get(name) {
            Some(&i) => i,
            None => d
                .entries
                .iter()
                .position(|e| e.name.eq_ignore_ascii_case(name))
                .ok_or(GuestError::NotFound)?,
        };
        let e = &d.entries[i];
        Ok(self.entry_ino(e.offset, &e.short))
    }

    fn readdir(&self, dir: u64) -> GuestResult<Vec<DirEntry>> {
        let d = self.dir(dir)?;
        Ok(d.entries
            .iter()
            .map(|e| DirEntry {
                name: e.name.clone(),
                ino: self.entry_ino(e.offset, &e.short),
                kind: if e.short.is_dir() {
                    FileKind::Dir
                } else {
                    FileKind::File
                },
            })
            .collect())
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> GuestResult<usize> {
        let m = self.file_map(ino)?;
        if offset >= m.size || buf.is_empty() {
            return Ok(0);
        }
        let len = (m.size - offset).min(buf.len() as u64) as usize;
        let cs = u64::from(self.geo.cluster_size);
        let from = offset / cs;
        let count = (offset + len as u64).div_ceil(cs) - from;
        let mut done = 0usize;
        for r in m.extents(&self.table, from, count)? {
            let pos = offset + done as u64;
            // Only the first run starts inside a cluster.
            let in_run = pos - (pos / cs) * cs;
            let n = ((u64::from(r.len) * cs - in_run) as usize).min(len - done);
            let at = self.geo.cluster_offset(r.start) + in_run;
            self.read_at(&mut buf[done..done + n], at)?;
            done += n;
            if done == len {
                break;
            }
        }
        Ok(done)
    }

    fn readlink(&self, _ino: u64) -> GuestResult<Vec<u8>> {
        Err(GuestError::Invalid)
    }

    fn listxattr(&self, _ino: u64) -> GuestResult<Vec<Vec<u8>>> {
        Ok(Vec::new())
    }

    fn getxattr(&self, _ino: u64, _name: &[u8]) -> GuestResult<Vec<u8>> {
        Err(GuestError::NotFound)
    }

    fn next_data(&self, ino: u64, offset: u64) -> GuestResult<Option<u64>> {
        let size = self.getattr(ino)?.size;
        Ok((offset < size).then_some(offset))
    }

    fn next_hole(&self, ino: u64, offset: u64) -> GuestResult<u64> {
        Ok(self.getattr(ino)?.size.max(offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_decode() {
        assert!(matches!(node(1), Ok(Node::Root)));
        // Numbers no instance hands out: not found, no underflow.
        for ino in [0, 2, 77, FILE_BASE - 1] {
            assert!(matches!(node(ino), Err(GuestError::NotFound)), "{ino}");
        }
        assert!(matches!(node(FILE_BASE), Ok(Node::Entry(0))));
        assert!(matches!(node(FILE_BASE + 5), Ok(Node::Entry(160))));
        assert!(matches!(node(u64::MAX), Err(GuestError::NotFound)));
    }

    #[test]
    fn garbage_is_not_fat() {
        let v: Vec<u8> = vec![0xEB; 4096];
        assert!(!probe(&v));
        assert!(open("g", Arc::new(v)).is_err());
        let short: Vec<u8> = vec![0; 100];
        assert!(!probe(&short));
    }
}
