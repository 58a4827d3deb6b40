//! Disk I/O of a snapshot point through its chain: reads, writes to
//! leaves, fsync, fallocate (punch hole / zero range), SEEK_DATA and
//! SEEK_HOLE from the allocation map, and statfs of the tree directory;
//! and reads of its memory view (`memory.raw`), which is read-only.

use crate::chain::resolve::Source;
use crate::chain::Chain;
use crate::memory::view::MemoryView;
use crate::merge::Engine;
use crate::tree::{PointDisk, Tree};
use fuser::Errno;
use std::path::Path;

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn alive(tree: &Tree, p: &PointDisk) -> Result<(), Errno> {
    // Deleted while open. A hidden point's image may be rewritten by a
    // merge (its child committed into it), so its old handles end too.
    if tree.view(p.id).is_none_or(|v| v.hidden) {
        return Err(Errno::ESTALE);
    }
    Ok(())
}

pub fn read(
    tree: &Tree,
    merge: &Engine,
    p: &PointDisk,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>, Errno> {
    alive(tree, p)?;
    merge.note_io();
    let io = p.io.read();
    let end = (offset.saturating_add(size as u64)).min(io.chain.size());
    if offset >= end {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; (end - offset) as usize];
    io.chain.read_at(&mut buf, offset).map_err(|e| {
        tracing::error!("read of {} at {offset}: {e}", p.name);
        tree.problem(format!("read of {} at offset {offset}: {e}", p.name));
        errno(e.errno())
    })?;
    Ok(buf)
}

pub fn write(
    tree: &Tree,
    merge: &Engine,
    p: &PointDisk,
    offset: u64,
    data: &[u8],
) -> Result<(), Errno> {
    alive(tree, p)?;
    merge.note_io();
    let io = p.io.read();
    if !io.writable {
        return Err(Errno::EROFS);
    }
    if offset.saturating_add(data.len() as u64) > io.chain.size() {
        return Err(Errno::EFBIG); // a disk does not grow
    }
    io.chain.write_at(data, offset).map_err(|e| {
        tree.problem(format!("write to {} at offset {offset}: {e}", p.name));
        errno(e.errno())
    })
}

pub fn fsync(p: &PointDisk) -> Result<(), Errno> {
    let io = p.io.read();
    if !io.writable {
        return Ok(());
    }
    io.chain.flush().map_err(|e| errno(e.errno()))
}

pub fn fallocate(
    tree: &Tree,
    p: &PointDisk,
    offset: u64,
    len: u64,
    mode: i32,
) -> Result<(), Errno> {
    alive(tree, p)?;
    let io = p.io.read();
    if !io.writable {
        return Err(Errno::EROFS);
    }
    let size = io.chain.size();
    let end = offset.saturating_add(len).min(size);
    if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 || mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
        if offset >= end {
            return Ok(());
        }
        let r = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            io.chain.discard(offset, end - offset)
        } else {
            io.chain.write_zeroes(offset, end - offset)
        };
        return r.map_err(|e| errno(e.errno()));
    }
    // Plain preallocation: a virtual disk has all its bytes already; only
    // growing it is impossible.
    if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    if offset.saturating_add(len) > size && mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
        return Err(Errno::EFBIG);
    }
    Ok(())
}

/// The chain a memory handle reads: `memory.raw`, or block `b` under
/// `memory/`.
pub fn memory_chain(m: &MemoryView, b: Option<usize>) -> &Chain {
    match b.and_then(|i| m.blocks.get(i)) {
        Some(block) => &block.chain,
        None => &m.chain,
    }
}

/// Reads of a memory view (`memory.raw`, or block `block` under
/// `memory/`).
pub fn read_memory(
    tree: &Tree,
    m: &MemoryView,
    block: Option<usize>,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>, Errno> {
    let chain = memory_chain(m, block);
    let end = (offset.saturating_add(size as u64)).min(chain.size());
    if offset >= end {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; (end - offset) as usize];
    chain.read_at(&mut buf, offset).map_err(|e| {
        tree.problem(format!(
            "read of {} at offset {offset}: {e}",
            m.path.display()
        ));
        errno(e.errno())
    })?;
    Ok(buf)
}

/// SEEK_DATA / SEEK_HOLE from the allocation map of `chain`.
pub fn seek(chain: &Chain, offset: i64, whence: i32) -> Result<i64, Errno> {
    let size = chain.size();
    if offset < 0 {
        return Err(Errno::EINVAL);
    }
    let offset = offset as u64;
    if offset >= size {
        return Err(Errno::ENXIO);
    }
    let want_data = match whence {
        libc::SEEK_DATA => true,
        libc::SEEK_HOLE => false,
        _ => return Err(Errno::EINVAL),
    };
    const STEP: u64 = 1 << 30;
    let mut at = offset;
    while at < size {
        let len = STEP.min(size - at);
        let map = chain.map(at, len).map_err(|e| errno(e.errno()))?;
        for r in map {
            let is_data = matches!(r.source, Source::Data { .. } | Source::Compressed { .. });
            if is_data == want_data {
                return Ok(r.start.max(offset) as i64);
            }
        }
        at += len;
    }
    if want_data {
        Err(Errno::ENXIO)
    } else {
        Ok(size as i64) // the implicit hole at the end
    }
}

/// What statfs reports, in `ReplyStatfs::statfs` argument order.
pub struct Statfs(
    pub u64,
    pub u64,
    pub u64,
    pub u64,
    pub u64,
    pub u32,
    pub u32,
    pub u32,
);

/// (blocks, bfree, bavail, files, ffree, bsize, namelen, frsize) of `dir`.
pub fn statfs(dir: &Path) -> Result<Statfs, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and a zeroed struct to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(Errno::from(std::io::Error::last_os_error()));
    }
    Ok(Statfs(
        s.f_blocks as u64,
        s.f_bfree as u64,
        s.f_bavail as u64,
        s.f_files as u64,
        s.f_ffree as u64,
        s.f_bsize as u32,
        s.f_namemax as u32,
        s.f_frsize as u32,
    ))
}
