//! ext2, ext3 and ext4 read in userspace (our own reader; the ext4-view
//! crate is path based, `!Send`, and offers no xattrs, inode numbers or
//! hole maps). Implements [`GuestFs`] over a [`ReadBytes`] volume:
//! superblock and group descriptors (`sb`), inodes (`inode`), extent trees
//! and block maps (`map`), linear and htree directories (`dir`, `hash`),
//! xattrs (`xattr`), and the jbd2 journal replayed in memory (`journal`)
//! when the filesystem was not cleanly unmounted. Every metadata checksum
//! (metadata_csum) is verified; a mismatch fails that object with a
//! Corrupt error naming the volume and byte offset. Nothing is written.

mod dir;
mod dirscan;
mod disk;
mod hash;
mod inode;
mod journal;
mod map;
mod names;
mod sb;
mod xattr;

use crate::guest::fsapi::Ino;
use crate::guest::{Attr, DirEntry, FileKind, FsInfo, GuestError, GuestFs, GuestResult, ReadBytes};
use dir::{DirBlocks, DxResult};
use disk::Disk;
use inode::{Inode, FL_CASEFOLD, FL_EA_INODE, FL_ENCRYPT, FL_INDEX, FL_INLINE_DATA};
use sb::{Group, Superblock, SB_OFFSET, SB_SIZE};
use std::sync::Arc;

/// The root directory's inode number on every ext filesystem.
pub const ROOT_INO: u64 = 2;

/// True if `bytes` carries the ext2/3/4 superblock magic.
pub fn probe(bytes: &dyn ReadBytes) -> bool {
    let mut m = [0u8; 2];
    bytes.read_exact_at(&mut m, SB_OFFSET + 0x38).is_ok() && u16::from_le_bytes(m) == sb::MAGIC
}

/// Opens the ext2/3/4 filesystem on `bytes` (replaying its journal in
/// memory if needed).
pub fn open(volume_name: &str, bytes: Arc<dyn ReadBytes>) -> GuestResult<Arc<dyn GuestFs>> {
    Ok(Arc::new(ExtFs::open(volume_name, bytes)?))
}

/// An open ext2/3/4 filesystem.
pub struct ExtFs {
    disk: Disk,
    sb: Superblock,
    notes: Vec<String>,
    /// Name indexes of linear directories (see `names`).
    names: names::Names,
}

impl ExtFs {
    /// Reads and checks group descriptor `g` (through the block cache).
    /// Descriptors are read when needed, not all at open: their count comes
    /// from the superblock, and a hostile one may claim billions.
    fn group(&self, g: u64) -> GuestResult<Group> {
        let sb = &self.sb;
        let per_block = sb.block_size / sb.desc_size;
        let blk = sb.gdt_block(g / per_block);
        self.disk
            .check_block(blk, 1, SB_OFFSET, "group descriptor table")?;
        let block = self.disk.block(blk)?;
        let within = ((g % per_block) * sb.desc_size) as usize;
        let off = blk * sb.block_size + within as u64;
        let d = &block[within..within + sb.desc_size as usize];
        sb::parse_group(&self.disk.name, sb, g, d, off)
    }

    /// Checks the first and last group descriptors, so a volume whose
    /// table is plainly broken fails at open.
    fn check_groups(&self) -> GuestResult<()> {
        self.group(0)?;
        self.group(self.sb.group_count - 1)?;
        Ok(())
    }
}

impl ExtFs {
    pub fn open(name: &str, bytes: Arc<dyn ReadBytes>) -> GuestResult<ExtFs> {
        let mut raw = vec![0u8; SB_SIZE];
        bytes
            .read_exact_at(&mut raw, SB_OFFSET)
            .map_err(|e| GuestError::io(name, SB_OFFSET, SB_SIZE, e))?;
        let size = bytes.size();
        let sb = Superblock::parse(name, &raw, size)?;
        let disk = Disk::new(name, bytes, sb.block_size, sb.blocks_count);
        let mut fs = ExtFs {
            disk,
            sb,
            notes: Vec::new(),
            names: names::Names::default(),
        };
        fs.check_groups()?;
        if fs.sb.has_incompat(sb::INCOMPAT_RECOVER) {
            fs.recover(size)?;
        }
        if fs.sb.has_incompat(sb::INCOMPAT_INLINE_DATA) {
            fs.notes
                .push("inline_data: small files and directories are read from their inodes".into());
        }
        if fs.sb.has_incompat(sb::INCOMPAT_CASEFOLD) {
            fs.notes
                .push("casefold: names are matched exactly (byte for byte)".into());
        }
        Ok(fs)
    }

    /// Replays the journal in memory and re-reads what it may have changed.
    fn recover(&mut self, size: u64) -> GuestResult<()> {
        let name = self.disk.name.clone();
        if !self.sb.has_compat(sb::COMPAT_HAS_JOURNAL) || self.sb.journal_inum == 0 {
            if self.sb.journal_dev != 0 {
                return Err(GuestError::unsupported(
                    &name,
                    "needs recovery from a journal on an external device",
                ));
            }
            return Err(GuestError::corrupt(
                &name,
                SB_OFFSET + 0x60,
                "superblock: needs recovery but has no journal",
            ));
        }
        let jinode = self.inode(self.sb.journal_inum as u64)?;
        let alloc = jinode.allocated_bytes(&self.sb);
        let replay = journal::replay(&self.disk, self.sb.csum(), &jinode, alloc)?;
        if replay.transactions == 0 {
            self.notes
                .push("journal needed recovery but held no committed transaction".into());
            return Ok(());
        }
        self.disk.set_overlay(replay.overlay);
        let mut raw = vec![0u8; SB_SIZE];
        self.disk.read_meta(SB_OFFSET, &mut raw)?;
        let sb = Superblock::parse(&name, &raw, size)?;
        if sb.block_size != self.sb.block_size || sb.blocks_count != self.sb.blocks_count {
            return Err(GuestError::unsupported(
                &name,
                "journal changes the filesystem geometry (online resize)",
            ));
        }
        self.sb = sb;
        self.check_groups()?;
        self.notes.push(format!(
            "journal replayed in memory ({} transactions)",
            replay.transactions
        ));
        if replay.bad_blocks > 0 {
            self.notes.push(format!(
                "journal: {} block copies skipped (checksum mismatch)",
                replay.bad_blocks
            ));
        }
        Ok(())
    }

    /// Reads and checks inode `ino`.
    fn inode(&self, ino: u64) -> GuestResult<Inode> {
        if ino == 0 || ino > self.sb.inodes_count as u64 {
            return Err(GuestError::corrupt(
                &self.disk.name,
                SB_OFFSET,
                format!("inode number {ino} out of range"),
            ));
        }
        let g = (ino - 1) / self.sb.inodes_per_group;
        let idx = (ino - 1) % self.sb.inodes_per_group;
        let group = self.group(g)?;
        let bs = self.sb.block_size;
        let byte = group.inode_table * bs + idx * self.sb.inode_size;
        let block = self.disk.block(byte / bs)?;
        let within = (byte % bs) as usize;
        let raw = &block[within..within + self.sb.inode_size as usize];
        Inode::parse(&self.disk.name, &self.sb, ino, raw, byte)
    }

    /// Refuses inodes whose data this reader cannot decode.
    fn check_readable(&self, inode: &Inode) -> GuestResult<()> {
        let what = if inode.flags & FL_ENCRYPT != 0 {
            "encrypted"
        } else {
            return Ok(());
        };
        Err(GuestError::unsupported(
            &self.disk.name,
            format!("{what} inode {}", inode.ino),
        ))
    }

    fn csum(&self) -> bool {
        self.sb.csum()
    }

    /// The whole content of an inline_data inode: i_block, then the
    /// system.data xattr.
    fn inline_content(&self, inode: &Inode) -> GuestResult<Vec<u8>> {
        let mut v = inode.i_block().to_vec();
        v.extend_from_slice(&xattr::system_data(&self.disk.name, inode)?);
        Ok(v)
    }

    /// Reads file bytes of `inode` (no kind checks).
    fn read_inode_data(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> GuestResult<usize> {
        if offset >= inode.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(inode.size - offset) as usize;
        if inode.flags & FL_INLINE_DATA != 0 {
            let v = self.inline_content(inode)?;
            if (v.len() as u64) < inode.size {
                return Err(GuestError::corrupt(
                    &self.disk.name,
                    inode.offset,
                    format!(
                        "inode {}: size {} exceeds its inline data ({} bytes)",
                        inode.ino,
                        inode.size,
                        v.len()
                    ),
                ));
            }
            buf[..n].copy_from_slice(&v[offset as usize..offset as usize + n]);
            return Ok(n);
        }
        let bs = self.sb.block_size;
        let mut pos = 0;
        while pos < n {
            let at = offset + pos as u64;
            let run = map::map(&self.disk, self.csum(), inode, at / bs)?;
            let within = at % bs;
            let avail = run.len.saturating_mul(bs) - within;
            let chunk = (avail.min((n - pos) as u64)) as usize;
            match run.phys {
                Some(p) => self.disk.read_data(p, within, &mut buf[pos..pos + chunk])?,
                None => buf[pos..pos + chunk].fill(0),
            }
            pos += chunk;
        }
        Ok(n)
    }

    fn dir_inode(&self, ino: Ino) -> GuestResult<Inode> {
        let inode = self.inode(ino)?;
        if inode.kind() != Some(FileKind::Dir) {
            return Err(GuestError::NotDir);
        }
        self.check_readable(&inode)?;
        Ok(inode)
    }

    /// Validates an entry's inode number (range, and no loop back to the
    /// directory itself or the root).
    fn check_entry(&self, dir: &Inode, name: &[u8], ino: u32) -> GuestResult<u64> {
        let ino = ino as u64;
        let special = name == b"." || name == b"..";
        if ino > self.sb.inodes_count as u64 || (!special && (ino == dir.ino || ino == ROOT_INO)) {
            return Err(GuestError::corrupt(
                &self.disk.name,
                dir.offset,
                format!(
                    "directory {}: entry {:?} points to inode {ino} (loop or out of range)",
                    dir.ino,
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        Ok(ino)
    }

    fn xattrs(&self, ino: Ino) -> GuestResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let inode = self.inode(ino)?;
        let acl = inode.file_acl();
        let block = if acl != 0 {
            self.disk.check_block(
                acl,
                1,
                inode.offset + 0x68,
                &format!("inode {ino} xattr block"),
            )?;
            Some(self.disk.block(acl)?)
        } else {
            None
        };
        let read_ea = |inum: u32, size: u32| -> GuestResult<Vec<u8>> {
            let ea = self.inode(inum as u64)?;
            if ea.flags & FL_EA_INODE == 0 || ea.size != size as u64 {
                return Err(GuestError::corrupt(
                    &self.disk.name,
                    ea.offset,
                    format!("inode {inum}: not the xattr value inode"),
                ));
            }
            let mut v = vec![0u8; size as usize];
            self.read_inode_data(&ea, 0, &mut v)?;
            Ok(v)
        };
        let seed = self.csum().then_some(self.sb.csum_seed);
        xattr::all(
            &self.disk.name,
            seed,
            &inode,
            block.as_ref().map(|b| (&b[..], acl)),
            &read_ea,
        )
    }
}

impl DirBlocks for ExtFs {
    fn dir_block(&self, dir: &Inode, lblk: u64) -> GuestResult<Option<(Arc<Vec<u8>>, u64)>> {
        if lblk.saturating_mul(self.sb.block_size) >= dir.size {
            return Err(GuestError::corrupt(
                &self.disk.name,
                dir.offset,
                format!("directory {}: index points past its end", dir.ino),
            ));
        }
        let run = map::map(&self.disk, self.csum(), dir, lblk)?;
        match run.phys {
            Some(p) => Ok(Some((self.disk.block(p)?, p * self.sb.block_size))),
            None => Ok(None),
        }
    }
}

impl GuestFs for ExtFs {
    fn root(&self) -> Ino {
        ROOT_INO
    }

    fn info(&self) -> FsInfo {
        FsInfo::with_uuid(
            self.sb.fstype(),
            &self.sb.label,
            &self.sb.uuid,
            self.notes.clone(),
        )
    }

    fn getattr(&self, ino: Ino) -> GuestResult<Attr> {
        Ok(self.inode(ino)?.attr(&self.sb))
    }

    fn lookup(&self, dir: Ino, name: &[u8]) -> GuestResult<Ino> {
        let d = self.dir_inode(dir)?;
        if name == b"." {
            return Ok(dir);
        }
        if d.flags & FL_INDEX != 0
            && self.sb.compat & sb::COMPAT_DIR_INDEX != 0
            && d.flags & FL_CASEFOLD == 0
            && name != b".."
        {
            match dir::dx_lookup(&self.disk.name, &self.sb, &d, self, name) {
                Ok(DxResult::Found(ino)) => return self.check_entry(&d, name, ino),
                Ok(DxResult::NotFound) => return Err(GuestError::NotFound),
                Ok(DxResult::Linear) => {}
                // A bad index without checksums: the kernel falls back to a
                // linear search (ERR_BAD_DX_DIR), and so does scan_dir.
                Err(GuestError::Corrupt { .. }) if !self.csum() => {}
                Err(e) => return Err(e),
            }
        }
        if name == b".." && d.flags & FL_INLINE_DATA != 0 {
            return self.check_entry(&d, name, sb::le32(d.i_block(), 0));
        }
        if name == b".." {
            // In block 0, right after ".", also in an htree root.
            let Some((b, off)) = self.dir_block(&d, 0)? else {
                return Err(GuestError::NotFound);
            };
            let r0 = sb::le16(&b, 4) as usize;
            if r0 + 12 > b.len() || b[r0 + 6] != 2 || &b[r0 + 8..r0 + 10] != b".." {
                return Err(GuestError::corrupt(
                    &self.disk.name,
                    off,
                    format!("directory {dir}: no \"..\" entry"),
                ));
            }
            return self.check_entry(&d, name, sb::le32(&b, r0));
        }
        let index = match self.names.get(dir) {
            Some(index) => index,
            None => {
                let mut index = names::Index::new();
                self.scan_dir(&d, |e| {
                    names::add(&mut index, &e);
                    Ok(false)
                })?;
                let index = Arc::new(index);
                self.names.put(dir, index.clone());
                index
            }
        };
        match index.get(name) {
            Some(&ino) => self.check_entry(&d, name, ino),
            None => Err(GuestError::NotFound),
        }
    }

    fn readdir(&self, dir: Ino) -> GuestResult<Vec<DirEntry>> {
        let d = self.dir_inode(dir)?;
        let filetype = self.sb.has_incompat(sb::INCOMPAT_FILETYPE);
        let mut out = Vec::new();
        self.scan_dir(&d, |e| {
            if e.name == b"." || e.name == b".." {
                return Ok(false);
            }
            let ino = self.check_entry(&d, e.name, e.ino)?;
            let kind = match FileKind::from_dirent_type(e.ftype).filter(|_| filetype) {
                Some(k) => k,
                None => self.inode(ino)?.kind().unwrap_or(FileKind::File),
            };
            out.push(DirEntry {
                name: e.name.to_vec(),
                ino,
                kind,
            });
            Ok(false)
        })?;
        Ok(out)
    }

    fn read(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> GuestResult<usize> {
        let inode = self.file_inode(ino)?;
        self.read_inode_data(&inode, offset, buf)
    }

    fn readlink(&self, ino: Ino) -> GuestResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        if inode.kind() != Some(FileKind::Symlink) {
            return Err(GuestError::Invalid);
        }
        self.check_readable(&inode)?;
        let size = inode.size;
        // As ext4_inode_is_fast_symlink: the target is in i_block when the
        // inode owns no data blocks (i_blocks minus its xattr block), not
        // by its length.
        let ea = if inode.file_acl() != 0 {
            self.sb.block_size
        } else {
            0
        };
        if inode.flags & FL_INLINE_DATA == 0 && inode.allocated_bytes(&self.sb) == ea {
            if size >= 60 {
                return Err(GuestError::corrupt(
                    &self.disk.name,
                    inode.offset + 4,
                    format!("fast symlink {ino}: size {size} exceeds i_block"),
                ));
            }
            return Ok(inode.i_block()[..size as usize].to_vec());
        }
        if size > self.sb.block_size {
            return Err(GuestError::corrupt(
                &self.disk.name,
                inode.offset + 4,
                format!("symlink {ino}: size {size} too large"),
            ));
        }
        let mut v = vec![0u8; size as usize];
        let n = self.read_inode_data(&inode, 0, &mut v)?;
        v.truncate(n);
        Ok(v)
    }

    fn listxattr(&self, ino: Ino) -> GuestResult<Vec<Vec<u8>>> {
        Ok(self.xattrs(ino)?.into_iter().map(|(n, _)| n).collect())
    }

    fn getxattr(&self, ino: Ino, name: &[u8]) -> GuestResult<Vec<u8>> {
        self.xattrs(ino)?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(GuestError::NotFound)
    }

    fn next_data(&self, ino: Ino, offset: u64) -> GuestResult<Option<u64>> {
        let inode = self.file_inode(ino)?;
        if inode.flags & FL_INLINE_DATA != 0 {
            return Ok((offset < inode.size).then_some(offset));
        }
        let bs = self.sb.block_size;
        let mut off = offset;
        while off < inode.size {
            let run = map::map(&self.disk, self.csum(), &inode, off / bs)?;
            if run.phys.is_some() {
                return Ok(Some(off));
            }
            off = (off / bs).saturating_add(run.len).saturating_mul(bs);
        }
        Ok(None)
    }

    fn next_hole(&self, ino: Ino, offset: u64) -> GuestResult<u64> {
        let inode = self.file_inode(ino)?;
        if inode.flags & FL_INLINE_DATA != 0 {
            return Ok(inode.size);
        }
        let bs = self.sb.block_size;
        let mut off = offset;
        while off < inode.size {
            let run = map::map(&self.disk, self.csum(), &inode, off / bs)?;
            if run.phys.is_none() {
                return Ok(off);
            }
            off = (off / bs).saturating_add(run.len).saturating_mul(bs);
        }
        Ok(inode.size)
    }
}

impl ExtFs {
    fn file_inode(&self, ino: Ino) -> GuestResult<Inode> {
        let inode = self.inode(ino)?;
        match inode.kind() {
            Some(FileKind::File) => {}
            Some(FileKind::Dir) => return Err(GuestError::IsDir),
            _ => return Err(GuestError::Invalid),
        }
        self.check_readable(&inode)?;
        Ok(inode)
    }
}
