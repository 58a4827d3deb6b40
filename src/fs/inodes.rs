//! Inode numbers of the mounted layout, derived from point ids so they
//! never need a table: the top-level files have fixed numbers, and point
//! `p` owns the eight numbers from `FIRST_POINT + p * 8`, and the files
//! of its `memory/` directory (other RAM blocks) the numbers from
//! `FIRST_BLOCK + p * MAX_BLOCKS`, far above.

pub const ROOT: u64 = 1;
pub const TREE: u64 = 2;
pub const STATUS: u64 = 3;
pub const MERGE_NOW: u64 = 4;
const FIRST_POINT: u64 = 16;
const FIRST_BLOCK: u64 = 1 << 44;
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
}

impl PointFile {
    const ALL: [PointFile; 7] = [
        PointFile::Dir,
        PointFile::Disk,
        PointFile::Info,
        PointFile::Ctl,
        PointFile::Parent,
        PointFile::Memory,
        PointFile::MemoryDir,
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
}

pub fn encode(i: Inode) -> u64 {
    match i {
        Inode::Root => ROOT,
        Inode::Tree => TREE,
        Inode::Status => STATUS,
        Inode::MergeNow => MERGE_NOW,
        Inode::MemoryBlock(p, i) => FIRST_BLOCK + p * MAX_BLOCKS + i,
        Inode::Point(p, f) => {
            FIRST_POINT + p * 8 + PointFile::ALL.iter().position(|x| *x == f).unwrap_or(0) as u64
        }
    }
}

pub fn decode(ino: u64) -> Option<Inode> {
    match ino {
        ROOT => Some(Inode::Root),
        TREE => Some(Inode::Tree),
        STATUS => Some(Inode::Status),
        MERGE_NOW => Some(Inode::MergeNow),
        n if n >= FIRST_BLOCK => {
            let k = n - FIRST_BLOCK;
            Some(Inode::MemoryBlock(k / MAX_BLOCKS, k % MAX_BLOCKS))
        }
        n if n >= FIRST_POINT => {
            let p = (n - FIRST_POINT) / 8;
            let f = *PointFile::ALL.get(((n - FIRST_POINT) % 8) as usize)?;
            Some(Inode::Point(p, f))
        }
        _ => None,
    }
}
