//! Opening internal snapshots of an image built in memory from the spec
//! (the hand-built image of `qcow2::tests`, given a snapshot table by
//! hand): reads through the snapshot's L1, the vmstate past the disk, and
//! the refusal of each kind of lying entry with its offset.

use super::super::tests::{data_cluster, hand_image, CS, SIZE};
use super::super::Qcow2Layer;
use super::vm_state_offset;
use crate::error::ImageError;
use crate::image::storage::MemStorage;
use crate::image::testutil::{mem_path, read_guest};
use crate::image::ReadMap;

/// Where the added structures live (cluster numbers): the snapshot's L1
/// (2 entries), the snapshot table, an L2 table for the vmstate, and the
/// vmstate's data cluster.
const SN_L1: u64 = 7 * CS;
const TABLE: u64 = 8 * CS;
const VM_L2: u64 = 9 * CS;
const VM_DATA: u64 = 10 * CS;
const L2_SPAN: u64 = (CS / 8) * CS;

fn put(b: &mut [u8], at: u64, v: &[u8]) {
    b[at as usize..at as usize + v.len()].copy_from_slice(v);
}

/// One snapshot table entry (v3 extra data: vmstate size, disk size,
/// icount), padded to 8 bytes.
fn entry(l1: u64, l1_size: u32, id: &str, name: &str, vm: u64, disk: u64) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend(l1.to_be_bytes());
    e.extend(l1_size.to_be_bytes());
    e.extend((id.len() as u16).to_be_bytes());
    e.extend((name.len() as u16).to_be_bytes());
    e.extend(7u32.to_be_bytes()); // date_sec
    e.extend(0u32.to_be_bytes()); // date_nsec
    e.extend(99u64.to_be_bytes()); // vm_clock_nsec
    e.extend((vm.min(u32::MAX as u64) as u32).to_be_bytes());
    e.extend(24u32.to_be_bytes()); // extra_data_size
    e.extend(vm.to_be_bytes());
    e.extend(disk.to_be_bytes());
    e.extend(u64::MAX.to_be_bytes()); // no icount
    e.extend(id.as_bytes());
    e.extend(name.as_bytes());
    e.resize(e.len().div_ceil(8) * 8, 0);
    e
}

/// The hand-built image with the snapshot `entries` (whose L1 tables are
/// placed by the caller) and a snapshot L1 at `SN_L1` that shares the
/// active L2 table and maps the vmstate's first cluster.
fn with_snapshots(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut img = hand_image();
    img.resize((11 * CS) as usize, 0);
    let active_l1 = img[(3 * CS) as usize..(3 * CS + 8) as usize].to_vec();
    put(&mut img, SN_L1, &active_l1);
    put(&mut img, SN_L1 + 8, &VM_L2.to_be_bytes());
    put(&mut img, VM_L2, &VM_DATA.to_be_bytes());
    put(&mut img, VM_DATA, b"QEVM-like vmstate bytes");
    put(&mut img, 60, &(entries.len() as u32).to_be_bytes());
    put(&mut img, 64, &TABLE.to_be_bytes());
    put(&mut img, TABLE, &entries.concat());
    img
}

fn open(bytes: Vec<u8>) -> Qcow2Layer {
    Qcow2Layer::open_storage(
        mem_path("hand.qcow2"),
        Box::new(MemStorage::from_bytes(bytes)),
        false,
    )
    .unwrap()
}

/// The error opening snapshot `index` gives: its offset and message.
fn refusal(l: &Qcow2Layer, index: usize) -> (u64, String) {
    match l.open_internal(index) {
        Err(ImageError::Corrupt { offset, what, .. }) => (offset, what),
        Err(e) => panic!("not a corrupt-field error: {e}"),
        Ok(_) => panic!("snapshot {index} opened"),
    }
}

#[test]
fn the_vmstate_starts_at_the_first_l1_span_past_the_disk() {
    assert_eq!(vm_state_offset(L2_SPAN, 0), 0);
    assert_eq!(vm_state_offset(L2_SPAN, 1), L2_SPAN);
    assert_eq!(vm_state_offset(L2_SPAN, L2_SPAN), L2_SPAN);
    assert_eq!(vm_state_offset(L2_SPAN, SIZE), L2_SPAN);
}

#[test]
fn a_snapshot_reads_its_disk_and_its_vmstate() {
    let l = open(with_snapshots(&[entry(SN_L1, 2, "1", "s1", 23, SIZE)]));
    let info = l.info().unwrap();
    assert_eq!(info.snapshots[0].name, "s1");
    assert_eq!(info.snapshots[0].icount, None);
    let o = l.open_internal(0).unwrap();
    assert_eq!(o.disk.virtual_size(), SIZE);
    assert!(
        o.disk.lock_storage().is_none(),
        "the image's locks stay its own"
    );
    let got = read_guest(&*o.disk, 0, CS).unwrap();
    assert_eq!(got, data_cluster());
    let vm = o.vmstate.expect("vmstate");
    assert_eq!(vm.len().unwrap(), 23);
    let mut buf = vec![0u8; 40];
    assert_eq!(vm.read_at(&mut buf, 0).unwrap(), 23);
    assert_eq!(&buf[..23], b"QEVM-like vmstate bytes");
    assert!(vm.write_at(b"x", 0).is_err(), "the vmstate is read-only");
}

#[test]
fn lying_entries_are_refused_with_their_offset() {
    let good = entry(SN_L1, 2, "1", "s1", 0, SIZE);
    let cases: Vec<(Vec<u8>, u64, &str)> = vec![
        (
            entry(1 << 40, 1, "2", "past", 0, SIZE),
            0,
            "past the end of the file",
        ),
        (
            entry(SN_L1 + 8, 1, "2", "odd", 0, SIZE),
            0,
            "not cluster aligned",
        ),
        (
            entry(0, 1, "2", "hdr", 0, SIZE),
            0,
            "inside the header cluster",
        ),
        (
            entry(3 * CS, 1, "2", "act", 0, SIZE),
            0,
            "overlaps the active L1 table",
        ),
        (
            entry(SN_L1, 1, "2", "dupl1", 0, SIZE),
            0,
            "overlaps the L1 table of snapshot entry 0",
        ),
        (
            entry(VM_L2, 1, "1", "dupid", 0, SIZE),
            12,
            "id is also the id",
        ),
        (
            entry(VM_L2, 1, "2", "s1", 0, SIZE),
            12,
            "name is also the name",
        ),
        (
            entry(VM_L2, 1, "2", "vm", 1 << 40, SIZE),
            32,
            "vm_state_size",
        ),
        (entry(VM_L2, 1, "2", "disk", 0, u64::MAX), 8, "disk size"),
    ];
    for (bad, field, why) in cases {
        let l = open(with_snapshots(&[good.clone(), bad]));
        assert!(l.open_internal(0).is_ok(), "{why}: the good snapshot opens");
        let (offset, what) = refusal(&l, 1);
        assert!(what.contains(why), "{why}: {what}");
        assert_eq!(offset, TABLE + good.len() as u64 + field, "{why}: {what}");
    }
}

#[test]
fn an_l1_entry_past_the_end_is_refused() {
    let mut img = with_snapshots(&[entry(SN_L1, 2, "1", "s1", 0, SIZE)]);
    put(&mut img, SN_L1 + 8, &(64 * CS).to_be_bytes());
    let (offset, what) = refusal(&open(img), 0);
    assert_eq!(offset, SN_L1 + 8, "{what}");
    assert!(what.contains("L1 entry 1"), "{what}");
}

#[test]
fn a_disk_larger_than_its_l1_reads_unallocated_past_it() {
    let l = open(with_snapshots(&[entry(
        SN_L1,
        1,
        "1",
        "big",
        0,
        3 * L2_SPAN,
    )]));
    let o = l.open_internal(0).unwrap();
    assert_eq!(o.disk.virtual_size(), 3 * L2_SPAN);
    let m = o.disk.map(L2_SPAN, 2 * L2_SPAN).unwrap();
    assert!(
        m.iter()
            .all(|e| e.mapping == crate::image::Mapping::Unallocated),
        "{m:?}"
    );
    assert_eq!(read_guest(&*o.disk, 0, CS).unwrap(), data_cluster());
}
