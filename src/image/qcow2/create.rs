//! Creating new qcow2 images: an empty standalone image (for `export
//! --format qcow2`) or an empty overlay on a parent (what `qemu-img create
//! -f qcow2 -b P -F fmt` makes).
//!
//! Layout: header cluster (header, extensions, backing name), refcount
//! table, refcount blocks covering all of this metadata, L1 table. The
//! sizes depend on each other, so they are found by iterating to a fixed
//! point.

use super::header::{
    self, EXT_BACKING_FORMAT, EXT_END, EXT_FEATURE_NAMES, MAX_L1_BYTES,
    V3_HEADER_LEN_WITH_COMPRESSION,
};
use crate::error::{ImageError, Result};
use crate::fileio::{sync_data, write_all_at};
use crate::image::storage::Storage;
use crate::ownership::{new_file, Ownership};
use std::path::Path;

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub size: u64,
    /// log2 of the cluster size (9..=21); 16 = 64 KiB as qemu-img's default.
    pub cluster_bits: u32,
    /// Backing file name as it will be stored (relative to the new image's
    /// directory, or absolute) and its format name.
    pub backing: Option<(String, String)>,
    pub extended_l2: bool,
    /// The owner and mode the new file takes (those of the image it
    /// derives from; see `crate::ownership`), or `None` for the umask's.
    pub like: Option<Ownership>,
}

impl CreateOptions {
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            cluster_bits: 16,
            backing: None,
            extended_l2: false,
            like: None,
        }
    }
}

/// Names of the incompatible, compatible and autoclear features, as QEMU
/// writes them, so tools can name what they do not understand.
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Creates a new qcow2 v3 image at `path`; fails if the file exists.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let file = new_file(opts.like.as_ref())
        .open(path)
        .map_err(|e| ImageError::io(path, "create", 0, e))?;
    let result = (|| {
        if let Some(like) = &opts.like {
            like.apply(&file, path)
                .map_err(|e| ImageError::io(path, "set owner and mode of", 0, e))?;
        }
        create_on(&file, path, opts)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Writes a new qcow2 v3 image into empty `storage` (a new file, or
/// memory in unit tests); `path` names it in errors. Ownership in `opts`
/// is the caller's business.
pub fn create_on(storage: &dyn Storage, path: &Path, opts: &CreateOptions) -> Result<()> {
    // QEMU works in 512-byte sectors and rounds sizes up, as qemu-img
    // create does; an unaligned size would be cut down when QEMU opens it.
    let mut opts = opts.clone();
    opts.size = opts.size.div_ceil(512) * 512;
    let opts = &opts;
    let lay = Layout::plan(path, opts)?;
    let head = header_cluster(path, opts, &lay)?;
    let (rt, rb) = refcount_structures(&lay);
    let cs = lay.cs;

    write_all_at(storage, path, &head, 0)?;
    write_all_at(storage, path, &rt, lay.rt_off)?;
    write_all_at(storage, path, &rb, lay.rb_off)?;
    storage
        .set_len(lay.l1_off + lay.l1_clusters * cs)
        .map_err(|e| ImageError::io(path, "extend", lay.l1_off, e))?;
    sync_data(storage, path)
}

/// Where the metadata of a new image goes: header cluster, refcount table,
/// refcount blocks, then the L1 table, with no data clusters yet.
struct Layout {
    /// Cluster size in bytes.
    cs: u64,
    /// L1 entries needed to map the virtual size.
    l1_size: u64,
    l1_clusters: u64,
    rt_clusters: u64,
    rb_clusters: u64,
    rt_off: u64,
    rb_off: u64,
    l1_off: u64,
    /// Clusters in use (all of the above), each with refcount 1.
    total: u64,
}

impl Layout {
    /// Checks the cluster size, extended L2 and virtual size, in that
    /// order (the first problem is the one reported), and places the
    /// metadata.
    fn plan(path: &Path, opts: &CreateOptions) -> Result<Layout> {
        if !(9..=21).contains(&opts.cluster_bits) {
            return Err(ImageError::invalid(
                path,
                format!("cluster size 2^{} outside 512 B..2 MiB", opts.cluster_bits),
            ));
        }
        if opts.extended_l2 && opts.cluster_bits < 14 {
            return Err(ImageError::invalid(
                path,
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        let cs = 1u64 << opts.cluster_bits;
        let l2_entries = cs / if opts.extended_l2 { 16 } else { 8 };
        let l1_size = opts.size.div_ceil(cs * l2_entries);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(ImageError::invalid(
                path,
                format!(
                    "virtual size {} is too large for {cs}-byte clusters",
                    opts.size
                ),
            ));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let (rt_clusters, rb_clusters) = refcount_clusters(cs, l1_clusters);
        let rt_off = cs;
        let rb_off = rt_off + rt_clusters * cs;
        let l1_off = rb_off + rb_clusters * cs;
        Ok(Layout {
            cs,
            l1_size,
            l1_clusters,
            rt_clusters,
            rb_clusters,
            rt_off,
            rb_off,
            l1_off,
            total: 1 + rt_clusters + rb_clusters + l1_clusters,
        })
    }
}

/// Refcount table and block clusters for an image whose other metadata is
/// the header cluster and `l1_clusters`.
fn refcount_clusters(cs: u64, l1_clusters: u64) -> (u64, u64) {
    let per_block = cs * 8 / 16;
    // Fixed point: metadata clusters need refcounts, refcount blocks need
    // table entries, the table needs clusters.
    let (mut rt_clusters, mut rb_clusters) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + rb_clusters + l1_clusters;
        let rb = total.div_ceil(per_block);
        let rt = (rb * 8).div_ceil(cs);
        if rb == rb_clusters && rt == rt_clusters {
            break;
        }
        rb_clusters = rb;
        rt_clusters = rt;
    }
    (rt_clusters, rb_clusters)
}

/// Stores `v` big-endian at `at`.
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Stores `v` big-endian at `at`.
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Appends a header extension of type `ty` at `*at`, padded to 8 bytes.
fn put_ext(head: &mut [u8], at: &mut usize, ty: u32, data: &[u8]) {
    put32(head, *at, ty);
    put32(head, *at + 4, data.len() as u32);
    head[*at + 8..*at + 8 + data.len()].copy_from_slice(data);
    *at += 8 + data.len().div_ceil(8) * 8;
}

/// The first cluster: the v3 header, its extensions (backing format,
/// feature names when they fit) and the backing file name, which is
/// checked only here, after the layout checks of `Layout::plan`.
fn header_cluster(path: &Path, opts: &CreateOptions, lay: &Layout) -> Result<Vec<u8>> {
    let cs = lay.cs;
    let mut head = vec![0u8; cs as usize];
    head[0..4].copy_from_slice(header::MAGIC);
    put32(&mut head, 4, 3);
    put32(&mut head, 20, opts.cluster_bits);
    put64(&mut head, 24, opts.size);
    put32(&mut head, 36, lay.l1_size as u32);
    put64(&mut head, 40, lay.l1_off);
    put64(&mut head, 48, lay.rt_off);
    put32(&mut head, 56, lay.rt_clusters as u32);
    let incompat = if opts.extended_l2 {
        header::INCOMPAT_EXTL2
    } else {
        0
    };
    put64(&mut head, 72, incompat);
    put32(&mut head, 96, 4); // refcount_order: 16-bit refcounts
    put32(&mut head, 100, V3_HEADER_LEN_WITH_COMPRESSION as u32);
    let mut at = V3_HEADER_LEN_WITH_COMPRESSION;
    if let Some((_, fmt)) = &opts.backing {
        put_ext(&mut head, &mut at, EXT_BACKING_FORMAT, fmt.as_bytes());
    }
    let names = feature_name_table();
    if at + 8 + names.len() + 8 + 1024 < cs as usize {
        put_ext(&mut head, &mut at, EXT_FEATURE_NAMES, &names);
    }
    put_ext(&mut head, &mut at, EXT_END, &[]);
    if let Some((name, _)) = &opts.backing {
        if name.is_empty() || name.len() > 1023 || at + name.len() > cs as usize {
            return Err(ImageError::invalid(
                path,
                format!("backing file name {name:?} does not fit in the header"),
            ));
        }
        put64(&mut head, 8, at as u64);
        put32(&mut head, 16, name.len() as u32);
        head[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    Ok(head)
}

/// The feature name table extension's payload: 48 bytes per feature.
fn feature_name_table() -> Vec<u8> {
    let mut names = Vec::new();
    for (ty, bit, name) in FEATURE_NAMES {
        let mut e = [0u8; 48];
        e[0] = *ty;
        e[1] = *bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        names.extend_from_slice(&e);
    }
    names
}

/// The refcount table (pointing at the blocks) and the refcount blocks
/// (16-bit refcount 1 for every metadata cluster).
fn refcount_structures(lay: &Layout) -> (Vec<u8>, Vec<u8>) {
    let cs = lay.cs;
    let mut rt = vec![0u8; (lay.rt_clusters * cs) as usize];
    for i in 0..lay.rb_clusters {
        put64(&mut rt, (i * 8) as usize, lay.rb_off + i * cs);
    }
    let mut rb = vec![0u8; (lay.rb_clusters * cs) as usize];
    for c in 0..lay.total {
        rb[(c * 2) as usize..(c * 2 + 2) as usize].copy_from_slice(&1u16.to_be_bytes());
    }
    (rt, rb)
}
