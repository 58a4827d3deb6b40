//! Inode numbers of the mounted layout, derived from point ids so they
//! never need a table: the top-level files have fixed numbers; point `p`
//! owns the sixteen numbers from `FIRST_POINT + p * 16`, the files of its
//! `memory/` directory (other RAM blocks) the numbers from
//! `FIRST_BLOCK + p * MAX_BLOCKS`, and its `volumes/<vol>.raw` files
//! those from `FIRST_VOLUME + p * MAX_VOLUMES`. Guest files (under
//! `fs/`) are `FIRST_GUEST + slot << GUEST_BITS + guest inode`, where a
//! slot names one volume of one point (see `guest::views`). Point ids
//! stay far below 2^40, so the ranges never meet.

pub const ROOT: u64 = 1;
pub const TREE: u64 = 2;
pub const STATUS: u64 = 3;
pub const MERGE_NOW: u64 = 4;
const FIRST_POINT: u64 = 16;
const POINT_STRIDE: u64 = 16;
const FIRST_BLOCK: u64 = 1 << 46;
const FIRST_VOLUME: u64 = 1 << 56;
/// Volumes shown per point in `volumes/`.
pub const MAX_VOLUMES: u64 = 4096;
const FIRST_GUEST: u64 = 1 << 62;
/// Guest inode numbers below 2^44 (ext's are 32-bit; FAT's are directory
/// entry offsets / 32; NTFS's are MFT record numbers; XFS's are
/// `agno << agino_log | agino`, 44 bits for 4096 AGs of 2^32 inodes) and
/// 2^17 slots fill the rest. A guest inode past it is refused with
/// `EOVERFLOW` (see [`guest_fits`]), never folded into another slot.
pub const GUEST_BITS: u32 = 44;
/// Guest-view slots (volumes of points) the numbers have room for.
pub const MAX_SLOTS: u64 = 1 << 17;

/// Whether guest inode `g` has a number in the mount.
pub fn guest_fits(g: u64) -> bool {
    g < 1 << GUEST_BITS
}
/// RAM blocks shown per point under `memory/` (QEMU machines have a
/// dozen or so).
pub const MAX_BLOCKS: u64 = 1024;

/// The inode slots of a snapshot point: its directory and the files it
/// holds (named and described in `layout`). The order is the numbering:
/// append, never reorder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointFile {
    Dir,
    Disk,
    Info,
    Ctl,
    Parent,
    /// `memory.raw`, when the point has a memory checkpoint.
    Memory,
    /// `memory/`: the checkpoint's other RAM blocks (video memory, ROMs),
    /// when it has any.
    MemoryDir,
    /// `files`: symlink to the `fs/<vol>` holding the guest's root.
    Files,
    /// `fs/`: one directory per browsable volume.
    FsDir,
    /// `volumes/`: every volume as `<vol>.raw`, and `index.json`.
    VolumesDir,
    /// `volumes/index.json`.
    VolumesIndex,
}

impl PointFile {
    const ALL: [PointFile; 11] = [
        PointFile::Dir,
        PointFile::Disk,
        PointFile::Info,
        PointFile::Ctl,
        PointFile::Parent,
        PointFile::Memory,
        PointFile::MemoryDir,
        PointFile::Files,
        PointFile::FsDir,
        PointFile::VolumesDir,
        PointFile::VolumesIndex,
    ];
}

/// What an inode number stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inode {
    Root,
    Tree,
    Status,
    MergeNow,
    Point(u64, PointFile),
    /// RAM block `i` of point `p`'s memory, in `memory/`.
    MemoryBlock(u64, u64),
    /// Volume `i` of point `p`, `volumes/<vol>.raw`.
    Volume(u64, u64),
    /// Guest inode `g` of guest-view slot `s` (see `guest::views`).
    Guest(u64, u64),
}

pub fn encode(i: Inode) -> u64 {
    match i {
        Inode::Root => ROOT,
        Inode::Tree => TREE,
        Inode::Status => STATUS,
        Inode::MergeNow => MERGE_NOW,
        Inode::MemoryBlock(p, i) => FIRST_BLOCK + p * MAX_BLOCKS + i,
        Inode::Volume(p, i) => FIRST_VOLUME + p * MAX_VOLUMES + i,
        Inode::Guest(s, g) => FIRST_GUEST + (s << GUEST_BITS) + g,
        Inode::Point(p, f) => {
            let slot = PointFile::ALL.iter().position(|x| *x == f).unwrap_or(0);
            FIRST_POINT + p * POINT_STRIDE + slot as u64
        }
    }
}

pub fn decode(ino: u64) -> Option<Inode> {
    match ino {
        ROOT => Some(Inode::Root),
        TREE => Some(Inode::Tree),
        STATUS => Some(Inode::Status),
        MERGE_NOW => Some(Inode::MergeNow),
        n if n >= FIRST_GUEST => {
            let k = n - FIRST_GUEST;
            Some(Inode::Guest(k >> GUEST_BITS, k & ((1 << GUEST_BITS) - 1)))
        }
        n if n >= FIRST_VOLUME => {
            let k = n - FIRST_VOLUME;
            Some(Inode::Volume(k / MAX_VOLUMES, k % MAX_VOLUMES))
        }
        n if n >= FIRST_BLOCK => {
            let k = n - FIRST_BLOCK;
            Some(Inode::MemoryBlock(k / MAX_BLOCKS, k % MAX_BLOCKS))
        }
        n if n >= FIRST_POINT => {
            let p = (n - FIRST_POINT) / POINT_STRIDE;
            let f = *PointFile::ALL.get(((n - FIRST_POINT) % POINT_STRIDE) as usize)?;
            Some(Inode::Point(p, f))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_inode_decodes_to_itself() {
        let mut all = vec![Inode::Root, Inode::Tree, Inode::Status, Inode::MergeNow];
        for p in [0, 1, 9999, (1 << 40) - 1] {
            all.extend(PointFile::ALL.iter().map(|f| Inode::Point(p, *f)));
            all.push(Inode::MemoryBlock(p, MAX_BLOCKS - 1));
            all.push(Inode::Volume(p, MAX_VOLUMES - 1));
        }
        for s in [0, 1, MAX_SLOTS - 1] {
            all.push(Inode::Guest(s, 2));
            all.push(Inode::Guest(s, (1 << GUEST_BITS) - 1));
        }
        for i in all {
            assert_eq!(decode(encode(i)), Some(i), "{i:?}");
        }
    }
}
