//! Unit tests of the qcow2 layer on images in memory: one built byte by
//! byte from the spec (QEMU's docs/interop/qcow2.rst), corrupt variants of
//! it, and images made by our own `create` and then written through the
//! layer. qemu-img judges the same code in the integration tests
//! (tests/qemu_differential.rs, tests/bad_input.rs); these run in
//! milliseconds and pin the format facts down beside the code.

use super::create::{create_on, CreateOptions};
use super::l2::{OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use super::repair::repair_leaks_in;
use super::Qcow2Layer;
use crate::error::ImageError;
use crate::image::storage::{MemStorage, Storage};
use crate::image::testutil::{mem_path, pattern, read_guest, PatternBelow};
use crate::image::{Extent, Format, Mapping, NoBacking, ReadMap, Writable};
use std::io::Write;

pub(super) const CS: u64 = 64 << 10;
pub(super) const SIZE: u64 = 1 << 20;

fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

/// The bytes guest cluster 0 of the hand-built image holds.
pub(super) fn data_cluster() -> Vec<u8> {
    pattern(0x11, 0, CS as usize)
}

/// The bytes guest cluster 3 (compressed) holds.
fn compressed_cluster() -> Vec<u8> {
    (0..CS).map(|i| (i / 1000) as u8).collect()
}

/// A qcow2 v3 image of 1 MiB in 64 KiB clusters, written field by field:
/// header at 0, refcount table at 1, refcount block at 2, L1 at 3, L2 at 4
/// (cluster numbers). Guest cluster 0 is data at host cluster 5, 1 is
/// unallocated, 2 is a zero cluster, 3 is deflated at host cluster 6; the
/// rest is unallocated.
pub(super) fn hand_image() -> Vec<u8> {
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&compressed_cluster()).unwrap();
    let deflated = enc.finish().unwrap();
    let mut img = vec![0u8; (6 * CS) as usize];
    img[0..4].copy_from_slice(b"QFI\xfb");
    put32(&mut img, 4, 3); // version
    put32(&mut img, 20, 16); // cluster_bits
    put64(&mut img, 24, SIZE); // size
    put32(&mut img, 36, 1); // l1_size
    put64(&mut img, 40, 3 * CS); // l1_table_offset
    put64(&mut img, 48, CS); // refcount_table_offset
    put32(&mut img, 56, 1); // refcount_table_clusters
    put32(&mut img, 96, 4); // refcount_order: 16 bits
    put32(&mut img, 100, 104); // header_length
    put64(&mut img, CS, 2 * CS); // refcount table -> block
    for c in 0..7u64 {
        img[(2 * CS + c * 2) as usize + 1] = 1;
    }
    put64(&mut img, 3 * CS, (4 * CS) | OFLAG_COPIED); // L1[0] -> L2
    put64(&mut img, 4 * CS, (5 * CS) | OFLAG_COPIED); // L2[0]: data
    put64(&mut img, 4 * CS + 16, OFLAG_ZERO); // L2[2]: zeros
                                              // L2[3]: compressed; offset in the low 62 - (cluster_bits - 8) bits,
                                              // above them the count of 512-byte sectors beyond the first.
    let sectors = (deflated.len() as u64).div_ceil(512) - 1;
    put64(
        &mut img,
        4 * CS + 24,
        OFLAG_COMPRESSED | (sectors << 54) | (6 * CS),
    );
    img[(5 * CS) as usize..].copy_from_slice(&data_cluster());
    img.extend_from_slice(&deflated);
    img
}

fn open(bytes: Vec<u8>) -> Result<Qcow2Layer, ImageError> {
    Qcow2Layer::open_storage(
        mem_path("hand.qcow2"),
        Box::new(MemStorage::from_bytes(bytes)),
        false,
    )
}

fn ext(start: u64, len: u64, mapping: Mapping) -> Extent {
    Extent {
        start,
        len,
        mapping,
    }
}

#[test]
fn hand_built_image_maps_and_reads_as_the_spec_says() {
    let l = open(hand_image()).unwrap();
    assert_eq!(l.format(), Format::Qcow2);
    assert_eq!(l.virtual_size(), SIZE);
    assert_eq!(l.allocation_unit(), CS);
    assert!(l.backing().is_none());
    assert_eq!(
        l.map(0, SIZE).unwrap(),
        vec![
            ext(0, CS, Mapping::Data { host: 5 * CS }),
            ext(CS, CS, Mapping::Unallocated),
            ext(2 * CS, CS, Mapping::Zero),
            ext(
                3 * CS,
                CS,
                Mapping::Compressed {
                    cluster_start: 3 * CS
                }
            ),
            ext(4 * CS, SIZE - 4 * CS, Mapping::Unallocated),
        ]
    );
    // A map of a piece inside a cluster keeps the host offset exact.
    assert_eq!(
        l.map(100, 50).unwrap(),
        vec![ext(100, 50, Mapping::Data { host: 5 * CS + 100 })]
    );
    let all = read_guest(&l, 0, 4 * CS).unwrap();
    assert_eq!(&all[..CS as usize], &data_cluster()[..]);
    assert!(all[CS as usize..3 * CS as usize].iter().all(|b| *b == 0));
    assert_eq!(&all[3 * CS as usize..], &compressed_cluster()[..]);
    // Reads inside a compressed cluster start where asked.
    let mid = read_guest(&l, 3 * CS + 5000, 3000).unwrap();
    assert_eq!(mid, compressed_cluster()[5000..8000]);
    assert_eq!(l.allocated_bytes().unwrap(), 3 * CS);
    let info = l.info().unwrap();
    assert_eq!(info.version, Some(3));
    assert_eq!(info.cluster_size, Some(CS));
}

#[test]
fn requests_outside_the_virtual_size_are_refused() {
    let l = open(hand_image()).unwrap();
    assert!(matches!(
        l.map(SIZE - 1, 2),
        Err(ImageError::Invalid { .. })
    ));
    assert!(matches!(
        l.map(u64::MAX, 2),
        Err(ImageError::Invalid { .. })
    ));
}

/// Opens `hand_image()` changed by `f` and returns the corruption offset
/// and message.
fn corrupt_open(f: impl FnOnce(&mut Vec<u8>)) -> (u64, String) {
    let mut img = hand_image();
    f(&mut img);
    match open(img) {
        Err(ImageError::Corrupt { offset, what, .. }) => (offset, what),
        Err(e) => panic!("expected a corrupt-image error, got {e}"),
        Ok(_) => panic!("a corrupt header was accepted"),
    }
}

#[test]
fn corrupt_headers_are_refused_naming_the_field() {
    type Mutation = Box<dyn FnOnce(&mut Vec<u8>)>;
    let cases: Vec<(Mutation, u64, &str)> = vec![
        (Box::new(|i| i.truncate(50)), 0, "shorter than the 72-byte"),
        (Box::new(|i| i[0] = b'X'), 0, "no qcow2 magic"),
        (Box::new(|i| put32(i, 20, 30)), 20, "cluster_bits 30"),
        (Box::new(|i| put64(i, 24, 1 << 63)), 24, "beyond any image"),
        (Box::new(|i| put32(i, 36, 0)), 36, "cannot cover"),
        (
            Box::new(|i| put32(i, 36, 1 << 28)),
            36,
            "exceeds the 32 MiB",
        ),
        (Box::new(|i| put64(i, 40, 100 * CS)), 40, "past the end"),
        (
            Box::new(|i| put64(i, 40, 3 * CS + 8)),
            40,
            "not a cluster-aligned",
        ),
        (Box::new(|i| put64(i, 40, 0)), 40, "not a cluster-aligned"),
        (Box::new(|i| put64(i, 48, !(CS - 1))), 48, "past the end"),
        (
            Box::new(|i| put32(i, 56, u32::MAX)),
            56,
            "exceeds the 8 MiB",
        ),
        (Box::new(|i| put32(i, 56, 0)), 56, "no clusters"),
        (Box::new(|i| put32(i, 60, 70000)), 60, "exceed the limit"),
        (Box::new(|i| put32(i, 96, 7)), 96, "refcount_order 7"),
        (Box::new(|i| put32(i, 100, 8)), 100, "header_length 8"),
        (
            Box::new(|i| put32(i, 100, CS as u32 + 8)),
            100,
            "header_length",
        ),
    ];
    for (f, offset, what) in cases {
        let (at, msg) = corrupt_open(f);
        assert_eq!(at, offset, "{msg}");
        assert!(msg.contains(what), "{msg:?} should say {what:?}");
    }
}

#[test]
fn unknown_versions_are_unsupported_not_corrupt() {
    let mut img = hand_image();
    put32(&mut img, 4, 4);
    assert!(matches!(open(img), Err(ImageError::Unsupported { .. })));
}

#[test]
fn tables_pointing_outside_the_file_fail_on_use_naming_the_entry() {
    // An L1 entry to an L2 table past the end: the error is at the entry.
    let mut img = hand_image();
    put64(&mut img, 3 * CS, (1000 * CS) | OFLAG_COPIED);
    let l = open(img).unwrap();
    match l.map(0, CS) {
        Err(ImageError::Corrupt { offset, what, .. }) => {
            assert_eq!(offset, 3 * CS);
            assert!(what.contains("past the end"), "{what}");
        }
        other => panic!("expected corrupt, got {other:?}"),
    }
    // An L2 table inside the header cluster.
    let mut img = hand_image();
    put64(&mut img, 3 * CS, 0);
    put64(&mut img, 3 * CS, 512 | OFLAG_COPIED);
    assert!(matches!(
        open(img).unwrap().map(0, CS),
        Err(ImageError::Corrupt { offset, .. }) if offset == 3 * CS
    ));
    // A data cluster past the end: the error is at the L2 entry.
    let mut img = hand_image();
    put64(&mut img, 4 * CS + 8, (1 << 40) | OFLAG_COPIED);
    assert!(matches!(
        open(img).unwrap().map(CS, CS),
        Err(ImageError::Corrupt { offset, .. }) if offset == 4 * CS + 8
    ));
    // A compressed cluster pointing into the header.
    let mut img = hand_image();
    put64(&mut img, 4 * CS + 24, OFLAG_COMPRESSED | 512);
    assert!(matches!(
        open(img).unwrap().map(3 * CS, CS),
        Err(ImageError::Corrupt { offset, .. }) if offset == 4 * CS + 24
    ));
}

#[test]
fn garbage_in_a_compressed_cluster_is_an_error_not_a_panic() {
    let mut img = hand_image();
    let at = (6 * CS) as usize;
    img[at..].fill(0xff);
    let l = open(img).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(l.read_compressed(3 * CS, 3 * CS, &mut buf).is_err());
}

/// A new image made by our own `create`, in memory, open for writing.
fn created(opts: &CreateOptions) -> (MemStorage, Qcow2Layer) {
    let mem = MemStorage::new();
    create_on(&mem, mem_path("new.qcow2"), opts).unwrap();
    let l = Qcow2Layer::open_storage(mem_path("new.qcow2"), Box::new(mem.clone()), true).unwrap();
    (mem, l)
}

fn reopen(mem: &MemStorage) -> Qcow2Layer {
    Qcow2Layer::open_storage(mem_path("new.qcow2"), Box::new(mem.clone()), false).unwrap()
}

#[test]
fn create_rounds_the_size_and_records_the_backing_file() {
    let mut opts = CreateOptions::new(1_000_001);
    opts.backing = Some(("base.raw".into(), "raw".into()));
    let (mem, l) = created(&opts);
    assert_eq!(l.virtual_size(), 1_000_448);
    let b = l.backing().unwrap();
    assert_eq!(
        (b.name.as_str(), b.format.as_deref()),
        ("base.raw", Some("raw"))
    );
    assert_eq!(l.map(0, l.virtual_size()).unwrap().len(), 1);
    // Header, refcount table, refcount block, L1: four clusters.
    assert_eq!(mem.len().unwrap(), 4 * CS);
    drop(l);
    assert_eq!(
        repair_leaks_in(&mem, mem_path("new.qcow2")).unwrap(),
        Some(0)
    );
}

#[test]
fn create_refuses_impossible_options() {
    let mem = MemStorage::new();
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_bits = 8;
    assert!(create_on(&mem, mem_path("x"), &opts).is_err());
    let mut opts = CreateOptions::new(1 << 62);
    opts.cluster_bits = 9;
    assert!(create_on(&mem, mem_path("x"), &opts).is_err());
    assert_eq!(mem.len().unwrap(), 0);
}

#[test]
fn writes_read_back_and_survive_a_reopen() {
    let (mem, l) = created(&CreateOptions::new(4 << 20));
    let data = pattern(0x42, 100_000, 200_000);
    l.write(100_000, &data, &NoBacking).unwrap();
    let got = read_guest(&l, 0, 4 << 20).unwrap();
    assert_eq!(&got[100_000..300_000], &data[..]);
    assert!(got[..100_000].iter().all(|b| *b == 0));
    assert!(got[300_000..].iter().all(|b| *b == 0));
    l.flush().unwrap();
    let map = l.map(0, 4 << 20).unwrap();
    drop(l);

    let again = reopen(&mem);
    assert_eq!(again.map(0, 4 << 20).unwrap(), map);
    assert_eq!(read_guest(&again, 0, 4 << 20).unwrap(), got);
    // Clusters 1..=4 hold the written bytes (100_000..300_000).
    let held: u64 = map
        .iter()
        .filter(|e| matches!(e.mapping, Mapping::Data { .. }))
        .map(|e| e.len)
        .sum();
    assert_eq!(held, 4 * CS);
    drop(again);
    // Refcounts match the metadata: nothing leaked, nothing to repair.
    assert_eq!(
        repair_leaks_in(&mem, mem_path("new.qcow2")).unwrap(),
        Some(0)
    );
}

#[test]
fn a_partial_cluster_write_copies_the_rest_from_below() {
    let mut opts = CreateOptions::new(SIZE);
    opts.backing = Some(("base".into(), "raw".into()));
    let (_mem, l) = created(&opts);
    l.write(CS + 7, b"0123456789", &PatternBelow(9)).unwrap();
    let got = read_guest(&l, CS, CS).unwrap();
    let mut want = pattern(9, CS, CS as usize);
    want[7..17].copy_from_slice(b"0123456789");
    assert_eq!(got, want);
    // Only that cluster is this layer's; the rest falls through.
    assert_eq!(
        l.map(0, 3 * CS)
            .unwrap()
            .iter()
            .map(|e| e.mapping == Mapping::Unallocated)
            .collect::<Vec<_>>(),
        vec![true, false, true]
    );
}

#[test]
fn extended_l2_writes_only_the_subclusters_touched() {
    let mut opts = CreateOptions::new(SIZE);
    opts.extended_l2 = true;
    opts.backing = Some(("base".into(), "raw".into()));
    let (mem, l) = created(&opts);
    // Subclusters are 2 KiB; a 100-byte write allocates one.
    l.write(4096 + 10, &[0xee; 100], &PatternBelow(3)).unwrap();
    let map = l.map(0, CS).unwrap();
    assert_eq!(map.len(), 3, "{map:?}");
    assert_eq!((map[1].start, map[1].len), (4096, 2048));
    let got = read_guest(&l, 4096, 2048).unwrap();
    let mut want = pattern(3, 4096, 2048);
    want[10..110].fill(0xee);
    assert_eq!(got, want);
    l.flush().unwrap();
    drop(l);
    assert_eq!(reopen(&mem).map(0, CS).unwrap(), map);
}

#[test]
fn zero_writes_make_zero_clusters_that_hide_the_backing_file() {
    let mut opts = CreateOptions::new(SIZE);
    opts.backing = Some(("base".into(), "raw".into()));
    let (mem, l) = created(&opts);
    l.write(0, &vec![7u8; 2 * CS as usize], &PatternBelow(1))
        .unwrap();
    l.write_zeroes(0, 3 * CS, &PatternBelow(1)).unwrap();
    assert_eq!(
        l.map(0, 4 * CS).unwrap(),
        vec![
            ext(0, 3 * CS, Mapping::Zero),
            ext(3 * CS, CS, Mapping::Unallocated)
        ]
    );
    assert!(read_guest(&l, 0, 3 * CS).unwrap().iter().all(|b| *b == 0));
    l.flush().unwrap();
    drop(l);
    // The freed data clusters are not leaked.
    assert_eq!(
        repair_leaks_in(&mem, mem_path("new.qcow2")).unwrap(),
        Some(0)
    );
}

#[test]
fn a_read_only_layer_refuses_writes() {
    let l = open(hand_image()).unwrap();
    assert!(!l.is_writable());
    assert!(matches!(
        l.write(0, b"x", &NoBacking),
        Err(ImageError::Invalid { .. })
    ));
    assert!(l.write_zeroes(0, 512, &NoBacking).is_err());
}

#[test]
fn leak_repair_frees_a_cluster_nothing_references() {
    let (mem, l) = created(&CreateOptions::new(SIZE));
    drop(l);
    // Cluster 4, past the metadata, with refcount 1 and no reference.
    mem.set_len(5 * CS).unwrap();
    mem.write_all_at(&1u16.to_be_bytes(), 2 * CS + 8).unwrap();
    let path = mem_path("new.qcow2");
    assert_eq!(repair_leaks_in(&mem, path).unwrap(), Some(1));
    assert_eq!(repair_leaks_in(&mem, path).unwrap(), Some(0));
    // Images it does not understand fully are left alone.
    let raw = MemStorage::from_bytes(vec![0; 4096]);
    assert_eq!(repair_leaks_in(&raw, path).unwrap(), None);
}

#[test]
fn a_full_storage_fails_the_write_with_an_io_error() {
    let mem = MemStorage::new().with_limit(5 * CS);
    create_on(&mem, mem_path("small.qcow2"), &CreateOptions::new(SIZE)).unwrap();
    let l = Qcow2Layer::open_storage(mem_path("small.qcow2"), Box::new(mem.clone()), true).unwrap();
    let r = l
        .write(0, &vec![1u8; 4 * CS as usize], &NoBacking)
        .and_then(|_| l.flush());
    assert!(matches!(r, Err(ImageError::Io { .. })), "{r:?}");
}
