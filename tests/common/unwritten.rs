//! Deterministic host files: turning the unwritten extents qemu leaves in
//! image files into written zeros before maps are compared.
//!
//! Why this exists: qemu zero-fills copy-on-write areas with `fallocate`,
//! and ext4 reports such unwritten extents as holes or as data depending on
//! the page cache; qemu-img map (and so snaptree) turns holes under qcow2
//! data clusters into `zero: true`. Without this step the expected map
//! could change between two runs. [`fill_unwritten_extents`] has the
//! details.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::MIB;

/// The *unwritten* extents of a file (allocated by `fallocate` but never
/// written; they read as zeros), from the `FS_IOC_FIEMAP` ioctl, as sorted
/// `(start, end)` byte ranges clipped to the file length. Empty if the
/// filesystem does not support FIEMAP.
pub fn unwritten_extents(file: &File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct FiemapExtent {
        fe_logical: u64,
        fe_physical: u64,
        fe_length: u64,
        fe_reserved64: [u64; 2],
        fe_flags: u32,
        fe_reserved: [u32; 3],
    }
    const N: usize = 256;
    #[repr(C)]
    struct Fiemap {
        fm_start: u64,
        fm_length: u64,
        fm_flags: u32,
        fm_mapped_extents: u32,
        fm_extent_count: u32,
        fm_reserved: u32,
        fm_extents: [FiemapExtent; N],
    }
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 0x1;
    const FIEMAP_EXTENT_LAST: u32 = 0x1;
    const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;

    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let mut map = Fiemap {
            fm_start: pos,
            fm_length: len - pos,
            fm_flags: FIEMAP_FLAG_SYNC,
            fm_mapped_extents: 0,
            fm_extent_count: N as u32,
            fm_reserved: 0,
            fm_extents: [FiemapExtent::default(); N],
        };
        // SAFETY: FS_IOC_FIEMAP reads and writes exactly a `struct fiemap`
        // followed by `fm_extent_count` extents, which `map` provides.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut map) };
        if r < 0 || map.fm_mapped_extents == 0 {
            break;
        }
        let extents = &map.fm_extents[..(map.fm_mapped_extents as usize).min(N)];
        for e in extents {
            let (s, end) = (e.fe_logical, (e.fe_logical + e.fe_length).min(len));
            if e.fe_flags & FIEMAP_EXTENT_UNWRITTEN != 0 && s < end {
                out.push((s, end));
            }
        }
        let last = extents[extents.len() - 1];
        let next = last.fe_logical + last.fe_length;
        if last.fe_flags & FIEMAP_EXTENT_LAST != 0 || next <= pos {
            break;
        }
        pos = next;
    }
    out
}

/// Overwrites every unwritten extent of the file at `path` with zeros (the
/// bytes it already reads as) and syncs, so that the file has only written
/// data and real holes. Returns the number of bytes rewritten.
///
/// Why: qemu-img map, for a qcow2 image it believes is metadata-preallocated
/// (a heuristic that holds for most small, sparse test images: more
/// clusters have a refcount than the file has blocks allocated), asks the
/// host file for holes under data clusters and reports them as
/// `zero: true`; snaptree follows the same rule. qemu zero-fills
/// copy-on-write areas with `fallocate`, leaving unwritten extents, and
/// ext4's `SEEK_DATA` reports an unwritten extent as a hole or as data
/// depending on whether its pages happen to be in the page cache, which
/// changes under our feet (the kernel drops clean pages at any time). The
/// answer would differ between two runs, or between the qemu and the
/// snaptree call of one check. Real holes (never written, e.g. with
/// `preallocation=metadata`) are left alone and still compared; the
/// image's contents are unchanged.
pub fn fill_unwritten_extents(path: &Path) -> u64 {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let zeros = vec![0u8; MIB as usize];
    let mut total = 0;
    for (start, end) in unwritten_extents(&file) {
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(MIB) as usize;
            file.write_all_at(&zeros[..n], pos)
                .unwrap_or_else(|e| panic!("write {} at {pos}: {e}", path.display()));
            pos += n as u64;
            total += n as u64;
        }
    }
    if total > 0 {
        file.sync_all()
            .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    }
    total
}
