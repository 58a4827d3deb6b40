//! Differential tests: snaptree against qemu-img on chains built by qemu.
//!
//! Every test builds a backing chain with `qemu-img create -q` / `qemu-io`
//! (or `qemu-img convert -c` for compressed bases) in its own temp directory,
//! then runs [`assert_matches_qemu`] on the leaf and usually on every layer:
//!
//! 1. `snaptree export` == `qemu-img convert -O raw`, byte for byte;
//! 2. `snaptree map --output json` agrees with `qemu-img map --output=json`
//!    on depth/present/zero/data for every byte (entry splitting may differ);
//! 3. `snaptree export --format qcow2` passes `qemu-img check` and
//!    `qemu-img compare` equals the source.
//!
//! Offsets and lengths are deliberately odd and overlapping between layers.
//! Virtual sizes stay at a few MiB (16 MiB for 2 MiB clusters) so the whole
//! file runs in seconds. Tests print `SKIP:` and return when qemu is missing.
//!
//! Each test is one scenario, a chain spelled out layer by layer; they stay
//! in this file, the crate root, so that their names carry no module path.
//! What they share (building chains, the differential check) is in
//! `tests/common`.

#[macro_use]
mod common;

use common::qio::{discard, write, write_compressed, zero, zero_unmap};
use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// Differential check of the leaf only.
fn check_leaf(chain: &Chain) {
    assert_matches_qemu(chain, chain.leaf_index(), CheckOptions::default());
}

/// Differential check of every layer as a leaf of its own sub-chain.
fn check_every_layer(chain: &Chain) {
    let all: Vec<usize> = (0..chain.layers().len()).collect();
    assert_layers_match_qemu(chain, &all, CheckOptions::default());
}

/// Pattern byte for layer `i`: never 0, so a layer's data is never mistaken
/// for zeros.
fn pattern(i: usize) -> u8 {
    (i % 255) as u8 + 1
}

/// `n` random writes of `pat` inside `[0, size)`, odd offsets and lengths up
/// to `max_len` bytes.
fn random_writes(rng: &mut SmallRng, size: u64, pat: u8, n: usize, max_len: u64) -> Vec<String> {
    (0..n)
        .map(|_| {
            let off = rng.gen_range(0..size - 1);
            let len = rng.gen_range(1..=max_len.min(size - off));
            write(pat, off, len)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Cluster sizes
// ---------------------------------------------------------------------------

/// 512-byte clusters (smallest qcow2 allows; L2 tables of 64 entries), three
/// layers with unaligned writes, zero writes and discards.
#[test]
fn cluster_size_512() {
    require_qemu!();
    let mut c = Chain::new();
    let opts = ["cluster_size=512"];
    c.base("base.qcow2", Format::Qcow2, 2 * MIB, &opts).io(&[
        write(1, 0, 1000),
        write(2, 4097, 70_001),
        write(3, MIB - 300, 5000),
        zero(200_000, 3000),
        write(4, 400_000, 10_000),
        discard(401_408, 4096),
    ]);
    c.overlay("mid.qcow2", None, &opts).io(&[
        write(5, 700, 1500),
        write(6, 60_000, 20_001),
        zero(4100, 999),
        discard(MIB - 512, 4096),
        write(7, 2 * MIB - 513, 513),
    ]);
    c.overlay("top.qcow2", None, &opts).io(&[
        write(8, 1, 1),
        write(9, 65_000, 10_000),
        zero_unmap(MIB - 1024, 2048),
        write(10, 1_500_000, 333),
    ]);
    assert_map_has(&qemu_map(&c, 2), "zero cluster", |e| e.present && e.zero);
    check_every_layer(&c);
}

/// Default 64 KiB clusters, three layers.
#[test]
fn cluster_size_64k() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.qcow2", Format::Qcow2, 4 * MIB, &[]).io(&[
        write(1, 12_345, 300_001),
        write(2, 3 * MIB + 7, MIB - 7),
        zero(MIB, 128 * KIB),
    ]);
    c.overlay("mid.qcow2", None, &["cluster_size=65536"]).io(&[
        write(3, 100_000, 100_000),
        write(4, MIB + 65_535, 2),
        zero(3 * MIB + 100, 70_000),
        discard(2 * MIB, 64 * KIB),
    ]);
    c.overlay("top.qcow2", None, &[]).io(&[
        write(5, 0, 65_537),
        write(6, 250_000, 1_000_000),
        write(7, 4 * MIB - 1, 1),
    ]);
    check_every_layer(&c);
}

/// 2 MiB clusters (largest qcow2 allows) on a 16 MiB disk: writes straddling
/// cluster boundaries, aligned and unaligned zero writes, discards.
#[test]
fn cluster_size_2m() {
    require_qemu!();
    let mut c = Chain::new();
    let opts = ["cluster_size=2M"];
    c.base("base.qcow2", Format::Qcow2, 16 * MIB, &opts).io(&[
        write(1, 3 * MIB + 5, 5 * MIB),
        write(2, 15 * MIB + 1, MIB - 1),
        zero(6 * MIB, 2 * MIB),
        zero(9 * MIB + 77, 1000),
    ]);
    c.overlay("mid.qcow2", None, &opts).io(&[
        write(3, 2 * MIB - 7, 14),
        discard(4 * MIB, 2 * MIB),
        write(4, 11 * MIB + 12_345, 3 * MIB),
        zero_unmap(14 * MIB, 2 * MIB),
    ]);
    c.overlay("top.qcow2", None, &opts)
        .io(&[write(5, 0, 1), write(6, 8 * MIB - 1, 2)]);
    check_every_layer(&c);
}

/// One chain mixing 2 MiB, 512 B and 64 KiB clusters (each layer's cluster
/// size differs from its backing file's).
#[test]
fn mixed_cluster_sizes() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.qcow2", Format::Qcow2, 8 * MIB, &["cluster_size=2M"])
        .io(&[write(1, 0, 8 * MIB), zero(2 * MIB, 2 * MIB)]);
    c.overlay("small.qcow2", None, &["cluster_size=512"]).io(&[
        write(2, 1000, 3000),
        write(3, 2 * MIB - 100, 300),
        zero(5 * MIB + 3, 10_000),
    ]);
    c.overlay("mid.qcow2", None, &["cluster_size=64k"]).io(&[
        write(4, 2500, 70_000),
        discard(6 * MIB, 128 * KIB),
        write(5, 7 * MIB + 999, 1),
    ]);
    c.overlay("big.qcow2", None, &["cluster_size=2M"])
        .io(&[write(6, 4 * MIB - 1, 2)]);
    check_every_layer(&c);
}

// ---------------------------------------------------------------------------
// qcow2 versions and options
// ---------------------------------------------------------------------------

/// qcow2 v2 (compat=0.10) throughout: no zero clusters in v2, so zero writes
/// become data, and a discard in an overlay unallocates (the backing file
/// shows through again).
#[test]
fn qcow2_v2() {
    require_qemu!();
    let mut c = Chain::new();
    let v2 = ["compat=0.10"];
    c.base("base.qcow2", Format::Qcow2, 4 * MIB, &v2).io(&[
        write(1, 0, 2 * MIB + 3),
        zero(MIB + 11, 50_000),
        discard(512 * KIB, 128 * KIB),
    ]);
    c.overlay("mid.qcow2", None, &v2).io(&[
        write(2, 300_000, 500_000),
        zero(1_900_000, 300_000),
        discard(384 * KIB, 64 * KIB),
        write(3, 3 * MIB, 17),
    ]);
    c.overlay("top.qcow2", None, &v2).io(&[
        discard(0, 4 * MIB),
        write(4, 64 * KIB - 1, 2),
        zero_unmap(2 * MIB, 64 * KIB),
    ]);
    check_every_layer(&c);
}

/// qcow2 v3 (compat=1.1) with refcount widths 1, 64 and 16, lazy refcounts,
/// zero clusters with and without allocation (`write -z` / `write -z -u`) and
/// discards over own and backing data.
#[test]
fn qcow2_v3() {
    require_qemu!();
    let mut c = Chain::new();
    c.base(
        "base.qcow2",
        Format::Qcow2,
        4 * MIB,
        &["compat=1.1", "refcount_bits=1"],
    )
    .io(&[write(1, 0, 4 * MIB), zero(MIB, 64 * KIB)]);
    c.overlay(
        "mid.qcow2",
        None,
        &["compat=1.1", "refcount_bits=64", "lazy_refcounts=on"],
    )
    .io(&[
        write(2, 70_000, 200_000),
        zero(100_000, 100_000),
        zero_unmap(2 * MIB, 192 * KIB),
        discard(3 * MIB, 128 * KIB),
    ]);
    c.overlay("top.qcow2", None, &["compat=1.1"]).io(&[
        write(3, 2 * MIB + 5, 10),
        discard(64 * KIB, 64 * KIB),
        zero(3 * MIB + 64 * KIB, 64 * KIB + 1),
    ]);
    assert_map_has(&qemu_map(&c, 2), "zero cluster", |e| e.present && e.zero);
    check_every_layer(&c);
}

/// v2 and v3 images mixed in one chain (v3 over v2 over v3).
#[test]
fn qcow2_v2_v3_mixed() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.qcow2", Format::Qcow2, 3 * MIB, &["compat=1.1"])
        .io(&[write(1, 0, 3 * MIB), zero(MIB, MIB)]);
    c.overlay("v2.qcow2", None, &["compat=0.10"]).io(&[
        write(2, MIB - 5, 10),
        discard(MIB + 64 * KIB, 64 * KIB),
        zero(2 * MIB, 64 * KIB),
    ]);
    c.overlay("v3.qcow2", None, &["compat=1.1"])
        .io(&[zero(0, 64 * KIB), write(3, 2 * MIB + 1, 1)]);
    check_every_layer(&c);
}

/// qcow2 header features a reader must cope with: internal snapshots (taken,
/// then the active state reverted with `snapshot -a`, so clusters are shared
/// with refcount > 1 and copied on the next write), persistent dirty bitmaps
/// (bitmaps header extension, autoclear bit), and a dirty leaf (lazy
/// refcounts, qemu-io killed by `abort` before a clean close).
#[test]
fn qcow2_header_features() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.qcow2", Format::Qcow2, 4 * MIB, &["lazy_refcounts=on"])
        .io(&[write(1, 0, 2 * MIB)]);
    c.qemu_img(&["snapshot", "-c", "snap1", "base.qcow2"]);
    c.io(&[
        write(2, 64 * KIB, 100_000),
        discard(MIB, 128 * KIB),
        zero(1536 * KIB, 64 * KIB),
    ]);
    c.qemu_img(&["snapshot", "-c", "snap2", "base.qcow2"]);
    c.io(&[write(3, 3 * MIB, 5000)]);
    // Back to snap2: the pattern-3 write must disappear.
    c.qemu_img(&["snapshot", "-a", "snap2", "base.qcow2"]);
    c.io(&[write(4, 100, 100)]);
    c.qemu_img(&["bitmap", "--add", "base.qcow2", "bm0"]);
    c.overlay("top.qcow2", None, &["lazy_refcounts=on"])
        .io(&[write(5, 500_000, 1000)]);
    c.qemu_img(&["bitmap", "--add", "top.qcow2", "bm1"]);
    c.qemu_img(&["snapshot", "-c", "top-snap", "top.qcow2"]);
    c.io_then_abort(&[write(6, 2 * MIB + 1, 70_000), zero(0, 64 * KIB)]);
    assert_eq!(
        qcow2_incompatible_features(&c.leaf().path) & 1,
        1,
        "test setup error: the leaf's dirty bit is not set"
    );
    check_every_layer(&c);
}

/// Preallocated qcow2: `preallocation=metadata` (every cluster allocated in
/// a sparse file; qemu maps the host file's holes under data clusters as
/// `zero: true, data: true`), then `falloc` and `full` overlays (qemu allows
/// preallocation with a backing file only with extended L2, whose
/// preallocated-but-unallocated subclusters still fall through).
#[test]
fn qcow2_preallocation() {
    require_qemu!();
    let mut c = Chain::new();
    c.base(
        "meta.qcow2",
        Format::Qcow2,
        2 * MIB,
        &["preallocation=metadata"],
    )
    .io(&[write(1, 100_000, 5000), zero(MIB, 64 * KIB)]);
    let ext = |mode: &'static str| ["extended_l2=on", mode];
    c.overlay("falloc.qcow2", None, &ext("preallocation=falloc"))
        .io(&[write(2, 300_000, 3000), write(3, 99_000, 2000)]);
    c.overlay("full.qcow2", None, &ext("preallocation=full"))
        .io(&[write(4, 1_000_000, 10), zero(1_500_000, 4096)]);
    check_every_layer(&c);
}

// ---------------------------------------------------------------------------
// Extended L2 (subclusters)
// ---------------------------------------------------------------------------

/// Extended L2, 64 KiB clusters (2 KiB subclusters): subcluster-granular
/// writes (an overlay's partial write allocates only the touched
/// subclusters, the rest still falls through), zero subclusters over backing
/// data and in unallocated clusters, discards; a standard-L2 overlay on top.
#[test]
fn extended_l2_64k() {
    require_qemu!();
    let mut c = Chain::new();
    let ext = ["extended_l2=on", "cluster_size=64k"];
    c.base("base.qcow2", Format::Qcow2, 4 * MIB, &ext).io(&[
        write(1, 2048, 2048),
        write(2, 5000, 3000),
        zero(64 * KIB + 4096, 8192),
        zero(10_240, 2048),
        write(3, 200_000, 100_000),
        discard(256 * KIB, 64 * KIB),
        write(4, MIB, 512 * KIB),
    ]);
    c.overlay("mid.qcow2", None, &ext).io(&[
        write(5, 2048 + 512, 512),
        write(6, 5 * 64 * KIB + 6144, 2048),
        zero(4096, 2048),
        zero(150_000, 10_000),
        write(7, MIB + 1000, 77_777),
        zero_unmap(MIB + 128 * KIB, 6 * 1024),
        discard(MIB + 256 * KIB, 64 * KIB),
    ]);
    c.overlay("top.qcow2", None, &["cluster_size=64k"])
        .io(&[write(8, 30_000, 5000), write(9, MIB + 129 * KIB, 100)]);
    let map = qemu_map(&c, 1);
    assert_map_has(&map, "subcluster-sized extent", |e| {
        e.depth == 0 && e.present && e.length < 64 * KIB
    });
    check_every_layer(&c);
}

/// Extended L2 with 16 KiB clusters (512-byte subclusters, the smallest)
/// over a standard 64 KiB base.
#[test]
fn extended_l2_16k() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.qcow2", Format::Qcow2, 2 * MIB, &[])
        .io(&[write(1, 0, MIB + 3333)]);
    c.overlay("sub.qcow2", None, &["extended_l2=on", "cluster_size=16k"])
        .io(&[
            write(2, 512, 512),
            write(3, 3000, 700),
            zero(8192, 1536),
            zero(MIB + 16 * KIB + 512, 512),
            write(4, 1_500_000, 1000),
            zero_unmap(32 * KIB, 16 * KIB),
        ]);
    c.overlay("top.qcow2", None, &["extended_l2=on", "cluster_size=16k"])
        .io(&[write(5, 1024 + 100, 50), zero(3000, 100)]);
    check_every_layer(&c);
}

/// Extended L2 with 2 MiB clusters (64 KiB subclusters) on 16 MiB.
#[test]
fn extended_l2_2m() {
    require_qemu!();
    let mut c = Chain::new();
    let ext = ["extended_l2=on", "cluster_size=2M"];
    c.base("base.qcow2", Format::Qcow2, 16 * MIB, &ext).io(&[
        write(1, 64 * KIB, 64 * KIB),
        write(2, 3 * MIB + 1, 300_000),
        zero(5 * MIB, 128 * KIB),
        write(3, 10 * MIB, 3 * MIB),
    ]);
    c.overlay("top.qcow2", None, &ext).io(&[
        write(4, 100_000, 1),
        zero(11 * MIB + 64 * KIB, 64 * KIB),
        zero(12 * MIB + 7, 200_000),
        discard(14 * MIB, 2 * MIB),
        write(5, 16 * MIB - 64 * KIB, 64 * KIB),
    ]);
    check_every_layer(&c);
}

// ---------------------------------------------------------------------------
// Compressed clusters
// ---------------------------------------------------------------------------

/// Builds a chain whose base is `qemu-img convert -c` of a raw scratch image
/// holding patterns, incompressible random bytes (stored uncompressed by
/// qemu) and zeros; then an overlay with partial writes over compressed
/// clusters, zero writes, discards and compressed writes (`write -c`).
fn compressed_chain(compression: &str, cluster: u64, size: u64) -> Chain {
    let mut c = Chain::new();
    c.create_image("src.raw", Format::Raw, size, &[]);
    c.io_file(
        "src.raw",
        Format::Raw,
        &[
            write(1, 0, size / 4 + 12_345),
            write(2, size / 4 + 12_345, 3 * cluster + 1),
            write(3, size - 3 * cluster - 700, 3 * cluster + 700),
        ],
    );
    let mut rng = SmallRng::seed_from_u64(0x5eed_c0de);
    let mut noise = vec![0u8; (2 * cluster + 777) as usize];
    rng.fill_bytes(&mut noise);
    c.write_bytes("src.raw", size / 2 + 333, &noise);
    let mut half = vec![0u8; (cluster / 2) as usize];
    rng.fill_bytes(&mut half);
    c.write_bytes("src.raw", size / 2 + 4 * cluster, &half);

    let opts = format!("cluster_size={cluster},compression_type={compression}");
    c.base_converted("base.qcow2", "src.raw", Format::Raw, &["-c", "-o", &opts]);
    assert_map_has(&qemu_map(&c, 0), "compressed cluster", |e| e.compressed);

    let ov = [opts.as_str()];
    c.overlay("top.qcow2", None, &ov).io(&[
        write(4, cluster / 2 + 1, cluster),
        zero(2 * cluster, cluster),
        zero(5 * cluster + 100, 10),
        discard(
            size * 3 / 4 - (size * 3 / 4) % cluster - 2 * cluster,
            2 * cluster,
        ),
        write_compressed(5, size / 4 - (size / 4) % cluster, 2 * cluster),
        write_compressed(6, size - cluster, cluster),
        write(7, size / 2 + cluster + 17, 3),
    ]);
    assert_map_has(&qemu_map(&c, 1), "compressed cluster in the overlay", |e| {
        e.compressed && e.depth == 0
    });
    c
}

/// Builds [`compressed_chain`] and checks every layer; skips (with a
/// `SKIP:` line) when this qemu-img cannot write zstd and zstd is asked for.
fn check_compressed_chain(compression: &str, cluster: u64, size: u64) {
    if compression == "zstd" && !require_qemu_zstd() {
        return;
    }
    check_every_layer(&compressed_chain(compression, cluster, size));
}

/// zlib-compressed base (default compression type), 64 KiB clusters.
#[test]
fn compressed_zlib_64k() {
    require_qemu!();
    check_compressed_chain("zlib", 64 * KIB, 4 * MIB);
}

/// zlib-compressed base with 512-byte clusters (compressed-size field of
/// only a few bits).
#[test]
fn compressed_zlib_512() {
    require_qemu!();
    check_compressed_chain("zlib", 512, MIB);
}

/// zstd-compressed base, 64 KiB clusters.
#[test]
fn compressed_zstd_64k() {
    require_qemu!();
    check_compressed_chain("zstd", 64 * KIB, 4 * MIB);
}

/// zstd-compressed base, 2 MiB clusters.
#[test]
fn compressed_zstd_2m() {
    require_qemu!();
    check_compressed_chain("zstd", 2 * MIB, 16 * MIB);
}

// ---------------------------------------------------------------------------
// Discards
// ---------------------------------------------------------------------------

/// Discards everywhere: in a base without backing (clusters become
/// unallocated = zeros), in overlays over own data and over backing data
/// (zero clusters in v3), unaligned discards (partly ignored by qemu), and a
/// discard of a whole half of the disk in the leaf.
#[test]
fn discards() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.qcow2", Format::Qcow2, 4 * MIB, &[]).io(&[
        write(1, 0, 4 * MIB),
        discard(512 * KIB, 256 * KIB),
        discard(MIB + 1000, 100_000),
    ]);
    c.overlay("mid.qcow2", None, &[]).io(&[
        write(2, 2 * MIB, 512 * KIB),
        discard(2 * MIB + 64 * KIB, 128 * KIB),
        discard(3 * MIB, 64 * KIB),
        discard(0, 4096),
    ]);
    c.overlay("top.qcow2", None, &[]).io(&[
        write(3, MIB + 3, 300_000),
        discard(0, 2 * MIB),
        write(4, 100, 100),
    ]);
    check_every_layer(&c);
}

// ---------------------------------------------------------------------------
// Raw base
// ---------------------------------------------------------------------------

/// A sparse raw base with holes, data, data that happens to be zeros, a
/// punched hole (discard) and zero writes, under a qcow2 overlay larger than
/// it (reads past the raw file's end are zeros).
#[test]
fn raw_base_sparse() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.raw", Format::Raw, 4 * MIB, &[]).io(&[
        write(1, 0, 4096),
        write(2, 100_000, 50_000),
        write(0, MIB, 64 * KIB),
        write(3, 2 * MIB, 512 * KIB),
        discard(2 * MIB + 128 * KIB, 128 * KIB),
        zero_unmap(2 * MIB + 384 * KIB, 64 * KIB),
        zero(3 * MIB, 64 * KIB),
    ]);
    assert_map_has(&qemu_map(&c, 0), "hole in the raw base", |e| {
        e.present && e.zero && !e.data
    });
    c.overlay("top.qcow2", Some(6 * MIB), &[]).io(&[
        write(4, 4 * MIB - 1000, 2000),
        write(5, 5 * MIB, 1234),
        discard(2 * MIB, 64 * KIB),
        zero(100_000, 4096),
        write(6, 60_000, 10),
    ]);
    check_every_layer(&c);
}

/// A raw base whose size is not a multiple of 512 bytes (1 MiB + 1000),
/// alone and under a larger qcow2 overlay. qemu rounds a raw file's size up
/// to a whole sector, so it reports the raw image as 1 MiB + 1024 bytes and
/// maps the 24 bytes past the file's end as part of the raw layer (the
/// overlay leaves that cluster unallocated so the difference is visible in
/// the leaf's map too).
#[test]
fn raw_base_unaligned_size() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.raw", Format::Raw, MIB, &[])
        .io(&[write(1, 0, 300_000)]);
    c.write_bytes("base.raw", MIB, &[7u8; 1000]);
    c.overlay("top.qcow2", Some(2 * MIB), &[])
        .io(&[write(2, MIB - 70_000, 20), write(3, MIB + 64 * KIB, 10)]);
    check_every_layer(&c);
}

// ---------------------------------------------------------------------------
// Size differences between layers
// ---------------------------------------------------------------------------

/// A base smaller than its overlays, with a size that is not a multiple of
/// the cluster size; writes straddle the base's end (copy-on-write of the
/// base's partial last cluster).
#[test]
fn base_smaller_than_overlay() {
    require_qemu!();
    let mut c = Chain::new();
    let base_size = MIB + 1536;
    c.base("base.qcow2", Format::Qcow2, base_size, &[])
        .io(&[write(1, 0, base_size)]);
    c.overlay("mid.qcow2", Some(3 * MIB), &[])
        .io(&[write(2, MIB - 100, 5000), write(3, 2 * MIB, 1000)]);
    c.overlay("top.qcow2", Some(3 * MIB + 512), &[])
        .io(&[write(4, 3 * MIB, 512), write(5, MIB + 1000, 10)]);
    check_every_layer(&c);
}

/// An overlay smaller than its backing file, under a larger leaf: the bytes
/// past the small layer's end read as zeros even though the base below has
/// data there.
#[test]
fn overlay_smaller_than_backing() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.qcow2", Format::Qcow2, 4 * MIB, &[])
        .io(&[write(1, 0, 4 * MIB)]);
    let small = 2 * MIB + 1536;
    c.overlay("small.qcow2", Some(small), &[])
        .io(&[write(2, small - 1546, 1546)]);
    c.overlay("top.qcow2", Some(4 * MIB), &[])
        .io(&[write(3, 3 * MIB, 1000), write(4, 100, 100)]);
    check_every_layer(&c);
}

/// A sparse disk larger than 4 GiB: data straddling 2^32 and at the very
/// end, in a raw base, a 4 KiB-cluster overlay (L1 table of 2560 entries)
/// and a 2 MiB-cluster leaf, so any 32-bit truncation of offsets shows. Only data
/// ranges are compared (see [`diff_files`]), so this stays fast.
#[test]
fn large_sparse_disk_beyond_4g() {
    require_qemu!();
    let g4 = 1u64 << 32;
    let size = 5 * 1024 * MIB + 192 * KIB;
    let mut c = Chain::new();
    c.base("base.raw", Format::Raw, size, &[])
        .io(&[write(1, g4 - 1000, 2000), write(2, size - 4096, 4096)]);
    c.overlay("mid.qcow2", None, &["cluster_size=4096"]).io(&[
        write(3, g4 - 300, 600),
        zero(g4 + 512, 1024),
        write(4, g4 + 700 * MIB + 3, 5000),
        write(5, size - 100, 100),
    ]);
    c.overlay("top.qcow2", None, &["cluster_size=2M"]).io(&[
        write(6, g4 + 1, 10),
        discard(g4 + 698 * MIB, 4 * MIB),
        write(7, 3 * MIB, 1),
    ]);
    check_every_layer(&c);
}

// ---------------------------------------------------------------------------
// Chain depth
// ---------------------------------------------------------------------------

/// Depth 1: a single qcow2 image without backing file.
#[test]
fn depth_1_qcow2() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("only.qcow2", Format::Qcow2, 3 * MIB, &[]).io(&[
        write(1, 1, 99_999),
        write(2, MIB + 7, 777_777),
        zero(MIB + 64 * KIB, 64 * KIB),
        zero_unmap(2 * MIB, 64 * KIB),
        discard(MIB + 256 * KIB, 128 * KIB),
        write(3, 3 * MIB - 3, 3),
    ]);
    check_leaf(&c);
}

/// Depth 1: a single sparse raw image.
#[test]
fn depth_1_raw() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("only.raw", Format::Raw, 2 * MIB, &[]).io(&[
        write(1, 8192, 10_000),
        write(2, MIB + 1, 4094),
        write(3, 2 * MIB - 512, 512),
    ]);
    check_leaf(&c);
}

/// Depth 8 built the realistic way (each layer written through its whole
/// chain, so partial writes copy from below), each layer with a different
/// pattern at random overlapping offsets, plus zero writes and discards in
/// some layers. Every layer is checked as a leaf.
#[test]
fn depth_8() {
    require_qemu!();
    let size = 4 * MIB;
    let mut rng = SmallRng::seed_from_u64(8);
    let mut c = Chain::new();
    c.base("layer0.qcow2", Format::Qcow2, size, &[]);
    let cmds = random_writes(&mut rng, size, pattern(0), 6, 400_000);
    c.io(&cmds);
    for i in 1..8 {
        c.overlay(&format!("layer{i}.qcow2"), None, &[]);
        let mut cmds = random_writes(&mut rng, size, pattern(i), 4, 300_000);
        // Overlap the previous layer's area at a shifted, odd offset.
        cmds.push(write(pattern(i), (i as u64) * 150_001, 200_003));
        if i % 3 == 0 {
            cmds.push(zero(rng.gen_range(0..size - 100_000), 99_999));
        }
        if i % 4 == 1 {
            cmds.push(discard(rng.gen_range(0..size / 2), 256 * KIB));
        }
        c.io(&cmds);
    }
    check_every_layer(&c);
}

/// Depth 100: every layer writes its own pattern at different, overlapping
/// offsets with odd lengths; some layers also zero a cluster or discard.
/// Layers cycle through 4 KiB clusters, extended L2 with 32 KiB clusters,
/// qcow2 v2 and the defaults. Built fast: overlays are created with `qemu-img create -u` and all layers
/// are written by one `qemu-io` process opening each without its backing
/// file (see [`Chain::io_isolated`]). The leaf, a middle layer and the
/// second layer are checked.
#[test]
fn depth_100() {
    require_qemu!();
    let size = 4 * MIB;
    let mut rng = SmallRng::seed_from_u64(100);
    let mut c = Chain::new();
    c.base("d000.qcow2", Format::Qcow2, size, &[]);
    for i in 1..100 {
        // Vary the layer format along the chain.
        let opts: &[&str] = match i % 4 {
            1 => &["cluster_size=4096"],
            2 => &["extended_l2=on", "cluster_size=32k"],
            3 => &["compat=0.10"],
            _ => &[],
        };
        c.overlay_unchecked(&format!("d{i:03}.qcow2"), size, opts);
    }
    let batch: Vec<(usize, Vec<String>)> = (0..100)
        .map(|i| {
            let p = pattern(i);
            let mut cmds = vec![
                // A window sliding up the disk: overlaps its neighbours.
                write(p, (i as u64) * 37_123 + 1, 70_001),
                write(p, rng.gen_range(0..size - 5000), rng.gen_range(1..5000)),
            ];
            if i % 7 == 3 {
                let cl = rng.gen_range(0..size / (64 * KIB));
                cmds.push(zero(cl * 64 * KIB, 64 * KIB));
            }
            if i % 11 == 5 {
                let cl = rng.gen_range(0..size / (64 * KIB));
                cmds.push(discard(cl * 64 * KIB, 128 * KIB));
            }
            (i, cmds)
        })
        .collect();
    c.io_isolated(&batch);
    assert_eq!(c.layers().len(), 100);
    let map = qemu_map(&c, 99);
    assert_map_has(&map, "extent from deep in the chain", |e| {
        e.present && e.depth >= 90
    });
    assert_layers_match_qemu(&c, &[99, 50, 1], CheckOptions::default());
}

// ---------------------------------------------------------------------------
// Images snaptree may refuse
// ---------------------------------------------------------------------------

/// Runs snaptree on an image it may not support and returns the output if
/// it succeeded; if it failed, asserts the failure is clean (no panic) and
/// the message on stderr mentions one of `keywords` (case-insensitive).
fn success_or_clear_refusal<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    keywords: &[&str],
) -> Option<std::process::Output> {
    let mut cmd = snaptree_cmd(args);
    let out = run_unchecked(&mut cmd);
    if out.status.success() {
        return Some(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        out.status.code() != Some(101) && !stderr.contains("panicked"),
        "snaptree panicked instead of refusing cleanly\n{}",
        describe_output(&cmd, &out)
    );
    assert!(
        keywords.iter().any(|k| stderr.contains(k)),
        "snaptree refused without saying why (expected one of {keywords:?} on stderr)\n{}",
        describe_output(&cmd, &out)
    );
    None
}

/// README ("What is supported"): encryption is refused with a clear message. A LUKS-encrypted qcow2
/// cannot be exported without its key: `export` must fail cleanly and say
/// it is encrypted; `map` and `info` may work but must not panic.
#[test]
fn encrypted_image_refused() {
    require_qemu!();
    let mut c = Chain::new();
    c.qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=test-secret",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "enc.qcow2",
        "1M",
    ]);
    let img = c.file("enc.qcow2");
    let out = c.file("enc.out");
    let got = success_or_clear_refusal(&args!["export", img, out], &["encrypt"]);
    assert!(
        got.is_none(),
        "snaptree exported an encrypted image without its key"
    );
    success_or_clear_refusal(&args!["map", img, "--output", "json"], &["encrypt"]);
    success_or_clear_refusal(&args!["info", img], &["encrypt"]);
}

/// README ("What is supported"): external data files are refused with a clear message, or supported
/// them. Whichever snaptree does, it must do it cleanly: either `export`
/// and `map` agree with qemu (map offsets then refer to the data file, so
/// they are not checked), or both fail and say "data file".
#[test]
fn external_data_file_supported_or_refused() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("df.qcow2", Format::Qcow2, 2 * MIB, &["data_file=df.data"])
        .io(&[write(1, 1000, 70_000), zero(MIB, 64 * KIB)]);
    let img = c.leaf().path.clone();
    let probe = c.file("probe.raw");
    let keywords = ["data file", "data_file", "data-file"];
    let exported = success_or_clear_refusal(&args!["export", img, probe], &keywords);
    if exported.is_some() {
        assert_matches_qemu(
            &c,
            0,
            CheckOptions {
                qcow2_export: true,
                map_offsets: false,
            },
        );
    } else {
        success_or_clear_refusal(&args!["map", img, "--output", "json"], &keywords);
    }
}

// ---------------------------------------------------------------------------
// CLI surface
// ---------------------------------------------------------------------------

/// Explicit `--format raw` and `--format qcow2` exports of a mixed chain
/// (raw base, compressed qcow2, v3 overlay with zero clusters): raw equals
/// `qemu-img convert`, qcow2 passes `qemu-img check` and `qemu-img compare`,
/// and snaptree reads its own qcow2 export back to the same bytes.
#[test]
fn export_format_flags() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.raw", Format::Raw, 2 * MIB, &[])
        .io(&[write(1, 0, 300_000), write(2, MIB, 4096)]);
    c.overlay("mid.qcow2", None, &[])
        .io(&[write_compressed(3, 512 * KIB, 128 * KIB), zero(0, 64 * KIB)]);
    c.overlay("top.qcow2", None, &[])
        .io(&[write(4, 100_000, 1), discard(MIB, 64 * KIB)]);
    let leaf = c.leaf().clone();
    let size = c.virtual_size(c.leaf_index());

    let expected = c.file("expected.raw");
    qemu_img(
        c.dir(),
        [
            "convert",
            "-q",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "top.qcow2",
            "expected.raw",
        ],
    );

    let raw = c.file("explicit.raw");
    snaptree(args!["export", leaf.path, raw, "--format", "raw"]);
    assert_same_file(&expected, &raw);

    let q = c.file("explicit.qcow2");
    snaptree(args!["export", leaf.path, q, "--format", "qcow2"]);
    let failures = judge_qcow2_export(c.dir(), &q, &leaf, size);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    let back = c.file("roundtrip.raw");
    snaptree(args!["export", q, back]);
    assert_same_file(&expected, &back);
}

/// `snaptree info` and `snaptree info --json` succeed on a chain; the JSON is
/// well-formed and mentions the virtual size somewhere.
#[test]
fn info_smoke() {
    require_qemu!();
    let mut c = Chain::new();
    c.base("base.qcow2", Format::Qcow2, 3 * MIB, &[])
        .io(&[write(1, 0, 1000)]);
    c.overlay("top.qcow2", None, &[])
        .io(&[write(2, 5000, 1000)]);
    let leaf = c.leaf().path.clone();

    let out = snaptree(args!["info", leaf]);
    assert!(!out.stdout.is_empty(), "snaptree info printed nothing");

    let out = snaptree(args!["info", leaf, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "snaptree info --json is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    fn has_number(v: &serde_json::Value, n: u64) -> bool {
        match v {
            serde_json::Value::Number(x) => x.as_u64() == Some(n),
            serde_json::Value::Array(a) => a.iter().any(|x| has_number(x, n)),
            serde_json::Value::Object(o) => o.values().any(|x| has_number(x, n)),
            _ => false,
        }
    }
    assert!(
        has_number(&v, 3 * MIB),
        "snaptree info --json does not mention the virtual size {}: {v:#}",
        3 * MIB
    );
}

/// Self-test of the map comparison helpers (no qemu needed): differently
/// split maps with the same facts agree; a real difference is found at the
/// right bytes; malformed maps are rejected.
#[test]
fn map_helpers_self_test() {
    let e = |start, length, depth, present, zero, data| MapEntry {
        start,
        length,
        depth,
        present,
        zero,
        data,
        compressed: false,
        offset: None,
    };
    let a = vec![
        e(0, 100, 0, true, false, true),
        e(100, 50, 1, false, true, false),
    ];
    let b = vec![
        e(0, 30, 0, true, false, true),
        e(30, 70, 0, true, false, true),
        e(100, 10, 1, false, true, false),
        e(110, 40, 1, false, true, false),
    ];
    let ea = extents(&a, 150).unwrap();
    let eb = extents(&b, 150).unwrap();
    assert_eq!(ea, eb);
    assert!(diff_extents(&ea, &eb).is_empty());

    let c = vec![
        e(0, 40, 0, true, false, true),
        e(40, 20, 0, true, true, false),
        e(60, 90, 1, false, true, false),
    ];
    let ec = extents(&c, 150).unwrap();
    let d = diff_extents(&ea, &ec);
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!((d[0].start, d[0].end), (40, 60));
    assert_eq!((d[1].start, d[1].end), (60, 100));

    assert!(extents(&a, 200).is_err(), "short coverage accepted");
    let gap = vec![
        e(0, 10, 0, true, false, true),
        e(20, 130, 0, true, false, true),
    ];
    assert!(extents(&gap, 150).is_err(), "gap accepted");
    assert!(parse_map("[{\"start\": 0}]").is_err());
    assert!(parse_map("{}").is_err());
    let parsed = parse_map(
        r#"[{ "start": 0, "length": 512, "depth": 0, "present": true, "zero": false,
              "data": true, "compressed": false, "offset": 327680}]"#,
    )
    .unwrap();
    assert_eq!(parsed[0].offset, Some(327_680));

    assert!(diff_bytes(b"abc", b"abc").is_none());
    let report = diff_bytes(b"abcdef", b"abXdeY").unwrap();
    assert!(report.contains("2 differing bytes in 2 ranges"), "{report}");
}
