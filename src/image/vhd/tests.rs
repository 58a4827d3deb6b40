//! Unit tests of the VHD layer on images in memory, laid out by our own
//! `create` (`dynamic_bytes`, `differencing_bytes`) or by hand (a fixed
//! disk), then damaged or written through the layer. qemu-img and
//! libvhdi judge the same code in tests/vhd.rs and tests/vhd_write.rs;
//! these pin the format facts down beside the code, in milliseconds.

use super::create::{differencing_bytes, dynamic_bytes, new_footer, ParentNames};
use super::footer::{DiskGeometry, Footer, DISK_FIXED, FOOTER_LEN, OFF_CHECKSUM};
use super::header::DynamicHeader;
use super::VhdLayer;
use crate::error::{ImageError, Result};
use crate::image::storage::{MemStorage, Storage};
use crate::image::testutil::{mem_path, pattern, read_guest};
use crate::image::{BackingRead, Extent, Identity, Layer, Mapping, NoBacking, ReadMap, Writable};
use std::path::Path;

const BS: u32 = 64 << 10;
const SIZE: u64 = 1 << 20;
/// Where our `create` puts the BAT.
const BAT_AT: u64 = 1536;

fn dynamic() -> MemStorage {
    MemStorage::from_bytes(dynamic_bytes(mem_path("d.vhd"), SIZE, BS).unwrap())
}

fn open(mem: &MemStorage, writable: bool) -> Result<VhdLayer> {
    VhdLayer::open_storage(mem_path("d.vhd"), Box::new(mem.clone()), writable)
}

fn corrupt_at(r: Result<VhdLayer>) -> (u64, String) {
    match r {
        Err(ImageError::Corrupt { offset, what, .. }) => (offset, what),
        Err(e) => panic!("expected a corrupt-image error, got {e}"),
        Ok(_) => panic!("a corrupt image was accepted"),
    }
}

/// Rewrites the dynamic disk header of `mem` after `f` changed it (with a
/// fresh checksum, so only the change is wrong).
fn edit_header(mem: &MemStorage, f: impl FnOnce(&mut DynamicHeader)) {
    let path = mem_path("d.vhd");
    let footer = Footer::read(mem, path).unwrap();
    let mut h = DynamicHeader::read(mem, path, &footer, mem.len().unwrap()).unwrap();
    f(&mut h);
    mem.write_all_at(&h.encode(), h.at).unwrap();
}

/// The flattened view of a layer (what a child's copy-on-write reads).
struct Below<'a>(&'a dyn Layer);

impl BackingRead for Below<'_> {
    fn read_below(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.copy_from_slice(&read_guest(self.0, offset, buf.len() as u64)?);
        Ok(())
    }
}

#[test]
fn a_new_dynamic_disk_reads_zeros_and_has_an_id() {
    let l = open(&dynamic(), false).unwrap();
    assert_eq!(l.virtual_size(), SIZE);
    assert_eq!(
        l.map(0, SIZE).unwrap(),
        vec![Extent {
            start: 0,
            len: SIZE,
            mapping: Mapping::Zero
        }]
    );
    assert!(l.backing().is_none());
    assert_eq!(l.unique_id(), Some(l.footer().unique_id));
    assert_ne!(l.footer().unique_id, [0; 16]);
    assert_eq!(l.expected_parent_id(), None);
    assert_eq!(l.dynamic_header().unwrap().block_size, BS);
}

#[test]
fn footer_checksums_are_checked_at_the_end_and_in_the_copy() {
    // A changed byte in the footer at the end, checksum left alone.
    let mem = dynamic();
    let end = mem.len().unwrap() - FOOTER_LEN;
    mem.write_all_at(&[0x7f], end + 45).unwrap();
    let (at, what) = corrupt_at(open(&mem, false));
    assert_eq!(at, end + OFF_CHECKSUM as u64);
    assert!(what.contains("checksum"), "{what}");
    // The same in the copy at offset 0: a damaged copy is a damaged image.
    let mem = dynamic();
    mem.write_all_at(&[0x7f], 45).unwrap();
    assert_eq!(corrupt_at(open(&mem, false)).0, OFF_CHECKSUM as u64);
}

#[test]
fn without_a_footer_at_the_end_the_copy_at_offset_0_serves() {
    let mem = dynamic();
    let end = mem.len().unwrap() - FOOTER_LEN;
    mem.write_all_at(b"xxxxxxxx", end).unwrap();
    let l = open(&mem, false).unwrap();
    assert!(l.footer().from_head_copy);
    assert_eq!(l.virtual_size(), SIZE);
    // With neither, it is no VHD.
    mem.write_all_at(b"xxxxxxxx", 0).unwrap();
    assert_eq!(corrupt_at(open(&mem, false)).0, end);
}

#[test]
fn bat_entries_outside_the_file_or_over_metadata_are_refused() {
    // Block 3 at sector 100000: past the end of the file.
    let mem = dynamic();
    mem.write_all_at(&100_000u32.to_be_bytes(), BAT_AT + 3 * 4)
        .unwrap();
    let (at, what) = corrupt_at(open(&mem, false));
    assert_eq!(at, BAT_AT + 12);
    assert!(what.contains("past the end"), "{what}");
    // Block 0 at sector 1: over the dynamic disk header (in a file long
    // enough to hold the block, so only the overlap is wrong).
    let mut img = dynamic().to_vec();
    let footer = img.split_off(img.len() - FOOTER_LEN as usize);
    img.resize(img.len() + 2 * BS as usize, 0);
    img.extend_from_slice(&footer);
    let mem = MemStorage::from_bytes(img);
    assert!(open(&mem, false).is_ok());
    mem.write_all_at(&1u32.to_be_bytes(), BAT_AT).unwrap();
    let (at, what) = corrupt_at(open(&mem, false));
    assert_eq!(at, BAT_AT);
    assert!(what.contains("dynamic disk header"), "{what}");
}

#[test]
fn header_fields_that_do_not_fit_are_refused() {
    let mem = dynamic();
    edit_header(&mem, |h| h.max_table_entries = 3);
    let (at, what) = corrupt_at(open(&mem, false));
    assert_eq!(at, 512 + 28);
    assert!(what.contains("max_table_entries 3"), "{what}");
    let mem = dynamic();
    edit_header(&mem, |h| h.table_offset = 1 << 40);
    assert_eq!(corrupt_at(open(&mem, false)).0, 512 + 16);
    // A header checksum that does not match.
    let mem = dynamic();
    mem.write_all_at(&[1], 512 + 40).unwrap();
    assert!(matches!(open(&mem, false), Err(ImageError::Corrupt { .. })));
}

#[test]
fn writes_set_sector_bitmaps_and_survive_a_reopen() {
    let mem = dynamic();
    let l = open(&mem, true).unwrap();
    let data = pattern(5, 1000, 5000);
    l.write(1000, &data, &NoBacking).unwrap();
    l.write(3 * BS as u64 + 512, &[9; 512], &NoBacking).unwrap();
    l.flush().unwrap();
    let map = l.map(0, SIZE).unwrap();
    let got = read_guest(&l, 0, SIZE).unwrap();
    drop(l);
    // Without a parent a written block is the disk's whole (its bitmap all
    // set, the unwritten bytes zeros); blocks never written read as zeros.
    let kinds: Vec<(u64, u64, bool)> = map
        .iter()
        .map(|e| (e.start, e.len, matches!(e.mapping, Mapping::Data { .. })))
        .collect();
    let b3 = 3 * BS as u64;
    assert_eq!(
        kinds,
        vec![
            (0, BS as u64, true),
            (BS as u64, b3 - BS as u64, false),
            (b3, BS as u64, true),
            (b3 + BS as u64, SIZE - b3 - BS as u64, false),
        ]
    );
    let mut want = vec![0u8; SIZE as usize];
    want[1000..6000].copy_from_slice(&data);
    want[b3 as usize + 512..b3 as usize + 1024].fill(9);
    assert!(got == want);
    // Both blocks are in the BAT; the footer at the end is intact.
    let mut e = [0u8; 4];
    for i in [0u64, 3] {
        mem.read_exact_at(&mut e, BAT_AT + i * 4).unwrap();
        assert_ne!(u32::from_be_bytes(e), u32::MAX, "BAT entry {i}");
    }
    let again = open(&mem, false).unwrap();
    assert!(!again.footer().from_head_copy);
    assert_eq!(again.map(0, SIZE).unwrap(), map);
    assert!(read_guest(&again, 0, SIZE).unwrap() == want);
}

#[test]
fn zero_writes_on_a_dynamic_disk_read_as_zeros() {
    let mem = dynamic();
    let l = open(&mem, true).unwrap();
    l.write(0, &vec![3; 2 * BS as usize], &NoBacking).unwrap();
    l.write_zeroes(100, BS as u64, &NoBacking).unwrap();
    let got = read_guest(&l, 0, 2 * BS as u64).unwrap();
    assert!(got[..100].iter().all(|b| *b == 3));
    assert!(got[100..BS as usize + 100].iter().all(|b| *b == 0));
    assert!(got[BS as usize + 100..].iter().all(|b| *b == 3));
}

#[test]
fn a_differencing_disk_names_its_parent_and_copies_from_it() {
    let parent_mem = dynamic();
    let parent = open(&parent_mem, true).unwrap();
    parent
        .write(0, &pattern(7, 0, 2 * BS as usize), &NoBacking)
        .unwrap();
    parent.flush().unwrap();
    let child_path = mem_path("child.vhd");
    let names =
        ParentNames::from_name(child_path, Path::new("d.vhd"), Path::new("/vm/d.vhd")).unwrap();
    let bytes = differencing_bytes(child_path, &parent, &names, 0).unwrap();
    let child_mem = MemStorage::from_bytes(bytes);
    let child = VhdLayer::open_storage(child_path, Box::new(child_mem.clone()), true).unwrap();
    assert!(child.footer().is_differencing());
    assert_eq!(child.virtual_size(), SIZE);
    assert_eq!(child.expected_parent_id(), parent.unique_id());
    assert_ne!(child.unique_id(), parent.unique_id());
    let b = child.backing().unwrap();
    assert_eq!(
        (b.name.as_str(), b.format.as_deref()),
        ("d.vhd", Some("vpc"))
    );
    // Nothing is the child's yet: everything falls through to the parent.
    assert!(child
        .map(0, SIZE)
        .unwrap()
        .iter()
        .all(|e| e.mapping == Mapping::Unallocated));

    // 100 bytes in the middle of a 4 KiB group: the group's other bytes
    // are copied from the parent, the rest of the block stays the parent's.
    child.write(5000, &[0xaa; 100], &Below(&parent)).unwrap();
    child.flush().unwrap();
    let map = child.map(0, BS as u64).unwrap();
    assert_eq!(map.len(), 3, "{map:?}");
    assert_eq!((map[1].start, map[1].len), (4096, 4096));
    assert_eq!(map[0].mapping, Mapping::Unallocated);
    let mut want = pattern(7, 4096, 4096);
    want[904..1004].fill(0xaa);
    assert_eq!(read_guest(&child, 4096, 4096).unwrap(), want);
    drop(child);
    let again = VhdLayer::open_storage(child_path, Box::new(child_mem), false).unwrap();
    assert_eq!(again.map(0, BS as u64).unwrap(), map);
    assert_eq!(again.expected_parent_id(), parent.unique_id());
}

/// A fixed disk: the data, then a footer.
fn fixed(data_len: u64) -> MemStorage {
    let mut f = new_footer(DISK_FIXED, SIZE, DiskGeometry::MAX).unwrap();
    f.data_offset = u64::MAX;
    let mut img = pattern(4, 0, data_len as usize);
    img.extend_from_slice(&f.encode());
    MemStorage::from_bytes(img)
}

#[test]
fn a_fixed_disk_is_its_data_and_a_truncated_one_is_refused() {
    let l = open(&fixed(SIZE), true).unwrap();
    assert_eq!(
        l.map(10, 100).unwrap(),
        vec![Extent {
            start: 10,
            len: 100,
            mapping: Mapping::Data { host: 10 }
        }]
    );
    assert_eq!(read_guest(&l, 0, 4096).unwrap(), pattern(4, 0, 4096));
    l.write(4096, b"fixed", &NoBacking).unwrap();
    assert_eq!(&read_guest(&l, 4096, 5).unwrap(), b"fixed");
    // Holes cannot be punched in memory: zeros are written instead.
    l.write_zeroes(0, 8192, &NoBacking).unwrap();
    assert!(read_guest(&l, 0, 8192).unwrap().iter().all(|b| *b == 0));
    let (at, what) = corrupt_at(open(&fixed(SIZE - 4096), false));
    assert_eq!(at, SIZE - 4096 + 48);
    assert!(what.contains("truncated"), "{what}");
}
