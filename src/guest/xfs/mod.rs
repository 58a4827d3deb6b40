//! XFS (v5 with CRCs, and v4) read in userspace, written from the on-disk
//! format documentation (there is no mature crate). Implements
//! [`GuestFs`] over a [`ReadBytes`] volume: superblock (`sb`), inodes and
//! their forks (`inode`), extent lists and bmbt trees (`bmap`),
//! directories in every format (`dir`, with hash lookups through the
//! dabtree in `dabtree`), xattrs (`attr`) and the log state (`log`). v5
//! metadata CRCs and self-describing headers are verified; a mismatch
//! fails that object with a Corrupt error naming the volume and offset.
//! A dirty log is not replayed: the volume is served as
//! `mount -o ro,norecovery` shows it, with a note saying so.

mod attr;
mod bmap;
mod dabtree;
mod dir;
mod disk;
mod inode;
mod log;
mod sb;

use crate::guest::fsapi::Ino;
use crate::guest::{Attr, DirEntry, FileKind, FsInfo, GuestError, GuestFs, GuestResult, ReadBytes};
use bmap::{Extent, Run};
use disk::{be32, Disk, V5Hdr};
use inode::{Fork, Inode, FMT_BTREE, FMT_LOCAL};
use lru::LruCache;
use parking_lot::Mutex;
use sb::{Superblock, SB_READ};
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Parsed inodes kept per volume.
const INODE_CACHE: usize = 16384;
/// Extents of bmbt-format forks kept per volume (32 bytes each).
const MAP_CACHE_EXTENTS: usize = 2 << 20;
/// Longest symlink target XFS allows.
const MAX_LINK: u64 = 1024;
const SYMLINK_MAGIC: u32 = 0x5853_4c4d; // "XSLM"
const SYMLINK_HDR: usize = 56;
const SYMLINK_V5: V5Hdr = V5Hdr {
    crc: 12,
    blkno: 40,
    uuid: 16,
    owner: Some(32),
};

/// True if `bytes` starts with the XFS superblock magic.
pub fn probe(bytes: &dyn ReadBytes) -> bool {
    let mut m = [0u8; 4];
    bytes.read_exact_at(&mut m, 0).is_ok() && u32::from_be_bytes(m) == sb::MAGIC
}

/// The root directory's inode number (`sb_rootino`), read from the
/// superblock without opening the filesystem; None if this is not a
/// valid XFS superblock.
pub fn root_ino(bytes: &dyn ReadBytes) -> Option<u64> {
    let mut raw = vec![0u8; SB_READ.max(1 << 15).min(bytes.size() as usize)];
    bytes.read_exact_at(&mut raw, 0).ok()?;
    Superblock::parse("", &raw, bytes.size())
        .ok()
        .map(|s| s.rootino)
}

/// Opens the XFS filesystem on `bytes` (read-only; a dirty log is noted,
/// not replayed).
pub fn open(volume: &str, bytes: Arc<dyn ReadBytes>) -> GuestResult<Arc<dyn GuestFs>> {
    Ok(Arc::new(XfsFs::open(volume, bytes)?))
}

type MapCache = LruCache<(u64, bool), Arc<Vec<Extent>>>;

/// An open XFS filesystem.
pub struct XfsFs {
    disk: Disk,
    sb: Superblock,
    notes: Vec<String>,
    /// The log is dirty and served without replay (see `check_log`).
    unclean: bool,
    inodes: Mutex<LruCache<u64, Arc<Inode>>>,
    /// Extents of bmbt-format forks: (inode, attr fork?) -> extents, and
    /// the total number held.
    maps: Mutex<(MapCache, usize)>,
}

impl XfsFs {
    pub fn open(name: &str, bytes: Arc<dyn ReadBytes>) -> GuestResult<XfsFs> {
        let size = bytes.size();
        // The superblock's sector is at most 32 KiB; read what the volume has.
        let mut raw = vec![0u8; (1usize << 15).min(size as usize)];
        bytes
            .read_exact_at(&mut raw, 0)
            .map_err(|e| GuestError::io(name, 0, raw.len(), e))?;
        if raw.len() < SB_READ {
            return Err(GuestError::corrupt(
                name,
                0,
                "volume too small for an XFS superblock",
            ));
        }
        let sb = Superblock::parse(name, &raw, size)?;
        let disk = Disk::new(name, bytes, sb.block_size, sb.dblocks);
        let mut fs = XfsFs {
            disk,
            sb,
            notes: Vec::new(),
            unclean: false,
            inodes: Mutex::new(LruCache::new(NonZeroUsize::new(INODE_CACHE).unwrap())),
            maps: Mutex::new((LruCache::unbounded(), 0)),
        };
        fs.check_log();
        if fs.sb.incompat & sb::INCOMPAT_NEEDSREPAIR != 0 {
            fs.notes.push(
                "needs repair: xfs_repair did not finish; the kernel refuses to mount this volume"
                    .into(),
            );
        }
        let root = fs.inode(fs.sb.rootino)?;
        if root.kind != FileKind::Dir {
            return Err(GuestError::corrupt(
                name,
                root.offset,
                "root inode is not a directory",
            ));
        }
        Ok(fs)
    }

    fn check_log(&mut self) {
        if self.sb.logstart == 0 {
            self.notes.push(
                "external log: not checked (the log device is not part of this volume)".into(),
            );
            return;
        }
        // Checked in Superblock::parse.
        let blk = self.sb.fsb_to_block(self.sb.logstart).unwrap_or(0);
        let bs = self.sb.block_size;
        if let log::LogState::Dirty(why) = log::state(&self.disk, blk * bs, self.sb.logblocks * bs)
        {
            self.unclean = true;
            self.notes.push(format!(
                "dirty log: not replayed, served as mount -o ro,norecovery would ({why})"
            ));
        }
    }

    /// Reads and checks inode `ino` (through the cache).
    fn inode(&self, ino: u64) -> GuestResult<Arc<Inode>> {
        if let Some(i) = self.inodes.lock().get(&ino) {
            return Ok(i.clone());
        }
        let Some((byte, _, _)) = self.sb.ino_location(ino) else {
            return Err(GuestError::corrupt(
                &self.disk.name,
                0x38,
                format!("inode number {ino} out of range"),
            ));
        };
        let bs = self.sb.block_size;
        let block = self.disk.block(byte / bs)?;
        let within = (byte % bs) as usize;
        let raw = &block[within..within + self.sb.inode_size as usize];
        let inode = Arc::new(Inode::parse(&self.disk.name, &self.sb, ino, raw, byte)?);
        self.inodes.lock().put(ino, inode.clone());
        Ok(inode)
    }

    /// The extents of a fork in extents or btree format.
    fn extents(&self, d: &Inode, fork: Fork) -> GuestResult<Arc<Vec<Extent>>> {
        let (fmt, inline, n) = match fork {
            Fork::Data => (d.format, &d.extents, d.nextents),
            Fork::Attr => (d.aformat, &d.aextents, d.anextents),
        };
        if let Some(e) = inline {
            return Ok(Arc::new(e.clone()));
        }
        if fmt != FMT_BTREE {
            return Err(GuestError::corrupt(
                &self.disk.name,
                d.offset,
                format!("inode {}: {fork:?} fork has no block map", d.ino),
            ));
        }
        let key = (d.ino, fork == Fork::Attr);
        if let Some(e) = self.maps.lock().0.get(&key) {
            return Ok(e.clone());
        }
        let mut w = bmap::Walk {
            disk: &self.disk,
            sb: &self.sb,
            ino: d.ino,
            nextents: n,
            out: Vec::new(),
        };
        w.run(d.fork(fork), d.fork_offset(fork))?;
        let e = Arc::new(w.out);
        let mut g = self.maps.lock();
        g.1 += e.len();
        if let Some(old) = g.0.put(key, e.clone()) {
            g.1 -= old.len();
        }
        while g.1 > MAP_CACHE_EXTENTS {
            match g.0.pop_lru() {
                Some((_, old)) => g.1 -= old.len(),
                None => break,
            }
        }
        Ok(e)
    }

    /// `n` fork blocks from fork block `fblk` as one buffer with its volume
    /// byte offset; None if the first is a hole.
    fn fork_block(
        &self,
        d: &Inode,
        fork: Fork,
        fblk: u64,
        n: u64,
    ) -> GuestResult<Option<(Arc<Vec<u8>>, u64)>> {
        let ext = self.extents(d, fork)?;
        let run = bmap::lookup(&ext, fblk);
        let Some(p) = run.phys else {
            return Ok(None);
        };
        let at = p * self.sb.block_size;
        if run.len >= n {
            return Ok(Some((self.disk.blocks(p, n)?, at)));
        }
        // A directory block split over extents: assembled, not cached.
        let mut v = Vec::with_capacity((n * self.sb.block_size) as usize);
        for i in 0..n {
            let Run { phys: Some(q), .. } = bmap::lookup(&ext, fblk + i) else {
                return Err(GuestError::corrupt(
                    &self.disk.name,
                    at,
                    format!("inode {}: block {fblk} is partly unmapped", d.ino),
                ));
            };
            v.extend_from_slice(&self.disk.block(q)?);
        }
        Ok(Some((Arc::new(v), at)))
    }

    /// The directory block at data fork block `fblk`.
    fn dir_block(&self, d: &Inode, fblk: u64) -> GuestResult<Option<(Arc<Vec<u8>>, u64)>> {
        self.fork_block(d, Fork::Data, fblk, 1 << self.sb.dirblklog)
    }

    fn dir_inode(&self, ino: Ino) -> GuestResult<Arc<Inode>> {
        let d = self.inode(ino)?;
        if d.kind != FileKind::Dir {
            return Err(GuestError::NotDir);
        }
        Ok(d)
    }

    fn file_inode(&self, ino: Ino) -> GuestResult<Arc<Inode>> {
        let f = self.inode(ino)?;
        match f.kind {
            FileKind::File => {}
            FileKind::Dir => return Err(GuestError::IsDir),
            _ => return Err(GuestError::Invalid),
        }
        if f.realtime() {
            return Err(GuestError::unsupported(
                &self.disk.name,
                format!("inode {ino}: data on the realtime device"),
            ));
        }
        Ok(f)
    }

    /// Validates an entry's inode number.
    fn check_entry(&self, d: &Inode, name: &[u8], ino: u64) -> GuestResult<u64> {
        let special = name == b"." || name == b"..";
        if self.sb.ino_location(ino).is_none()
            || (!special && (ino == d.ino || ino == self.sb.rootino))
        {
            return Err(GuestError::corrupt(
                &self.disk.name,
                d.offset,
                format!(
                    "directory {}: entry {:?} points to inode {ino} (loop or out of range)",
                    d.ino,
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        Ok(ino)
    }

    /// The next data (`data`) or hole boundary at or after `offset`.
    fn seek(&self, ino: Ino, offset: u64, data: bool) -> GuestResult<Option<u64>> {
        let f = self.file_inode(ino)?;
        let ext = self.extents(&f, Fork::Data)?;
        let bs = self.sb.block_size;
        let mut off = offset;
        while off < f.size {
            let run = bmap::lookup(&ext, off / bs);
            if run.phys.is_some() == data {
                return Ok(Some(off));
            }
            off = (off / bs).saturating_add(run.len).saturating_mul(bs);
        }
        Ok(None)
    }
}

impl GuestFs for XfsFs {
    fn root(&self) -> Ino {
        self.sb.rootino
    }

    fn info(&self) -> FsInfo {
        FsInfo {
            unclean: self.unclean,
            ..FsInfo::with_uuid(
                self.sb.fstype(),
                &self.sb.label,
                &self.sb.uuid,
                self.notes.clone(),
            )
        }
    }

    fn getattr(&self, ino: Ino) -> GuestResult<Attr> {
        Ok(self.inode(ino)?.attr())
    }

    fn lookup(&self, dir: Ino, name: &[u8]) -> GuestResult<Ino> {
        let d = self.dir_inode(dir)?;
        if name == b"." {
            return Ok(dir);
        }
        let found = if d.format == FMT_LOCAL || name == b".." {
            let mut found = None;
            self.dir_entries(&d, &mut |e| {
                if e.name == name {
                    found = Some(e.ino);
                }
                found.is_some()
            })?;
            found
        } else {
            self.dir_hash_lookup(&d, name)?
        };
        match found {
            Some(ino) => self.check_entry(&d, name, ino),
            None => Err(GuestError::NotFound),
        }
    }

    fn readdir(&self, dir: Ino) -> GuestResult<Vec<DirEntry>> {
        let d = self.dir_inode(dir)?;
        let mut raw = Vec::new();
        self.dir_entries(&d, &mut |e| {
            if e.name != b"." && e.name != b".." {
                raw.push((e.name.to_vec(), e.ino, e.ftype));
            }
            false
        })?;
        let mut out = Vec::with_capacity(raw.len());
        for (name, ino, ftype) in raw {
            let ino = self.check_entry(&d, &name, ino)?;
            let kind = match FileKind::from_dirent_type(ftype).filter(|_| self.sb.ftype) {
                Some(k) => k,
                None => self.inode(ino)?.kind,
            };
            out.push(DirEntry { name, ino, kind });
        }
        Ok(out)
    }

    fn read(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> GuestResult<usize> {
        let f = self.file_inode(ino)?;
        if offset >= f.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(f.size - offset) as usize;
        let ext = self.extents(&f, Fork::Data)?;
        let bs = self.sb.block_size;
        let mut pos = 0;
        while pos < n {
            let at = offset + pos as u64;
            let run = bmap::lookup(&ext, at / bs);
            let within = at % bs;
            let avail = run.len.saturating_mul(bs) - within;
            let chunk = avail.min((n - pos) as u64) as usize;
            match run.phys {
                Some(p) => self.disk.read_data(p, within, &mut buf[pos..pos + chunk])?,
                None => buf[pos..pos + chunk].fill(0),
            }
            pos += chunk;
        }
        Ok(n)
    }

    fn readlink(&self, ino: Ino) -> GuestResult<Vec<u8>> {
        let l = self.inode(ino)?;
        if l.kind != FileKind::Symlink {
            return Err(GuestError::Invalid);
        }
        let bad = |what: &str| {
            GuestError::corrupt(&self.disk.name, l.offset, format!("symlink {ino}: {what}"))
        };
        if l.size == 0 || l.size > MAX_LINK {
            return Err(bad("bad length"));
        }
        if l.format == FMT_LOCAL {
            let f = l.fork(Fork::Data);
            return f
                .get(..l.size as usize)
                .map(|s| s.to_vec())
                .ok_or_else(|| bad("target exceeds the inode"));
        }
        let mut out = Vec::with_capacity(l.size as usize);
        let mut fblk = 0;
        while (out.len() as u64) < l.size {
            let Some((b, at)) = self.fork_block(&l, Fork::Data, fblk, 1)? else {
                return Err(bad("target block is a hole"));
            };
            let left = l.size as usize - out.len();
            if self.sb.v5 {
                let chunk = left.min(b.len() - SYMLINK_HDR);
                if be32(&b, 0) != SYMLINK_MAGIC
                    || be32(&b, 4) as usize != out.len()
                    || be32(&b, 8) as usize != chunk
                {
                    return Err(GuestError::corrupt(
                        &self.disk.name,
                        at,
                        format!("symlink {ino}: bad block header"),
                    ));
                }
                if let Some(w) = SYMLINK_V5.check(&b, at, self.sb.meta_uuid(), ino) {
                    return Err(GuestError::corrupt(
                        &self.disk.name,
                        at,
                        format!("symlink {ino} block: {w}"),
                    ));
                }
                out.extend_from_slice(&b[SYMLINK_HDR..SYMLINK_HDR + chunk]);
            } else {
                out.extend_from_slice(&b[..left.min(b.len())]);
            }
            fblk += 1;
        }
        Ok(out)
    }

    fn listxattr(&self, ino: Ino) -> GuestResult<Vec<Vec<u8>>> {
        self.xattr_names(&*self.inode(ino)?)
    }

    fn getxattr(&self, ino: Ino, name: &[u8]) -> GuestResult<Vec<u8>> {
        self.xattr(&*self.inode(ino)?, name)?
            .ok_or(GuestError::NotFound)
    }

    fn next_data(&self, ino: Ino, offset: u64) -> GuestResult<Option<u64>> {
        self.seek(ino, offset, true)
    }

    fn next_hole(&self, ino: Ino, offset: u64) -> GuestResult<u64> {
        let size = self.file_inode(ino)?.size;
        Ok(self
            .seek(ino, offset, false)?
            .unwrap_or(size)
            .max(offset.min(size)))
    }
}
