//! Copy on write of what the current state shares with an internal
//! snapshot, on the hand-built image of `qcow2::tests` given a snapshot
//! that shares its L2 table, data cluster and compressed cluster (with the
//! refcounts and COPIED flags QEMU would leave): writes go to new
//! clusters, the snapshot reads as before, and the refcounts match the
//! references (the leak repair, which counts them, finds nothing); and
//! deleting the snapshot gives the current state its clusters back.

use super::l2::OFLAG_COPIED;
use super::repair::repair_leaks_in;
use super::tests::{data_cluster, hand_image, CS, SIZE};
use super::Qcow2Layer;
use crate::image::storage::MemStorage;
use crate::image::testutil::{mem_path, pattern, read_guest};
use crate::image::{NoBacking, ReadMap, Writable};

const SN_L1: u64 = 7 * CS;
const TABLE: u64 = 8 * CS;

fn put(b: &mut [u8], at: u64, v: &[u8]) {
    b[at as usize..at as usize + v.len()].copy_from_slice(v);
}

/// The hand-built image with snapshot "s1" whose L1 (at `SN_L1`) shares
/// the active L2 table: L1[0] and L2[0] lose COPIED, and the L2 table,
/// data and compressed clusters get refcount 2.
fn shared_image() -> Vec<u8> {
    let mut img = hand_image();
    img.resize((9 * CS) as usize, 0);
    put(&mut img, 3 * CS, &(4 * CS).to_be_bytes());
    put(&mut img, 4 * CS, &(5 * CS).to_be_bytes());
    put(&mut img, SN_L1, &(4 * CS).to_be_bytes());
    for (c, n) in [(4u64, 2u16), (5, 2), (6, 2), (7, 1), (8, 1)] {
        put(&mut img, 2 * CS + c * 2, &n.to_be_bytes());
    }
    let mut e = Vec::new();
    e.extend(SN_L1.to_be_bytes());
    e.extend(1u32.to_be_bytes()); // l1_size
    e.extend(1u16.to_be_bytes()); // id length
    e.extend(2u16.to_be_bytes()); // name length
    e.extend([0u8; 20]); // dates, vm clock, vm_state_size
    e.extend(24u32.to_be_bytes()); // extra data size
    e.extend(0u64.to_be_bytes()); // vmstate size
    e.extend(SIZE.to_be_bytes()); // disk size
    e.extend(u64::MAX.to_be_bytes()); // no icount
    e.extend(b"1s1");
    e.resize(e.len().div_ceil(8) * 8, 0);
    put(&mut img, 60, &1u32.to_be_bytes());
    put(&mut img, 64, &TABLE.to_be_bytes());
    put(&mut img, TABLE, &e);
    img
}

fn open_rw(mem: &MemStorage) -> Qcow2Layer {
    Qcow2Layer::open_storage(mem_path("hand.qcow2"), Box::new(mem.clone()), true).unwrap()
}

fn word(mem: &MemStorage, at: u64) -> u64 {
    let mut b = [0u8; 8];
    crate::fileio::read_exact_at(mem, mem_path("hand.qcow2"), &mut b, at, "test").unwrap();
    u64::from_be_bytes(b)
}

#[test]
fn shared_clusters_and_l2_tables_are_copied_on_write() {
    let mem = MemStorage::from_bytes(shared_image());
    assert_eq!(
        repair_leaks_in(&mem, mem_path("hand.qcow2")).unwrap(),
        Some(0),
        "the hand-built snapshot image is consistent"
    );
    let l = open_rw(&mem);
    let before = read_guest(&l, 0, SIZE).unwrap();
    assert_eq!(&before[..CS as usize], &data_cluster()[..]);
    let data = pattern(0x77, 0, 5000);
    l.write(100, &data, &NoBacking).unwrap();
    // A partial write over the compressed cluster and zeros over the rest.
    l.write(3 * CS + 7, &data, &NoBacking).unwrap();
    l.write_zeroes(2 * CS, CS, &NoBacking).unwrap();
    l.flush().unwrap();
    let mut want = before.clone();
    want[100..5100].copy_from_slice(&data);
    want[(3 * CS + 7) as usize..(3 * CS + 5007) as usize].copy_from_slice(&data);
    assert_eq!(read_guest(&l, 0, SIZE).unwrap(), want);
    // The active L1 points at a new L2 table with COPIED; the old one and
    // the old data cluster are the snapshot's, unchanged.
    let l1 = word(&mem, 3 * CS);
    assert_ne!(l1 & !OFLAG_COPIED, 4 * CS);
    assert!(l1 & OFLAG_COPIED != 0);
    assert_eq!(word(&mem, 4 * CS), 5 * CS);
    let sn = l.open_internal(0).unwrap();
    assert_eq!(read_guest(&*sn.disk, 0, SIZE).unwrap(), before);
    drop((l, sn));
    assert_eq!(
        repair_leaks_in(&mem, mem_path("hand.qcow2")).unwrap(),
        Some(0),
        "refcounts match the references after copy on write"
    );
    let again = open_rw(&mem);
    assert_eq!(read_guest(&again, 0, SIZE).unwrap(), want);
}

#[test]
fn deleting_the_snapshot_frees_its_share_and_restores_copied() {
    let mem = MemStorage::from_bytes(shared_image());
    let l = open_rw(&mem);
    let before = read_guest(&l, 0, SIZE).unwrap();
    assert!(l.delete_internal("2").is_err(), "no snapshot with ID 2");
    l.delete_internal("1").unwrap();
    assert_eq!(read_guest(&l, 0, SIZE).unwrap(), before);
    // No snapshot left: the header says so, and the current state owns
    // its L2 table and data cluster alone again (COPIED set).
    assert_eq!(word(&mem, 56) & 0xffff_ffff, 0, "nb_snapshots");
    assert_eq!(word(&mem, 3 * CS), (4 * CS) | OFLAG_COPIED);
    assert_eq!(word(&mem, 4 * CS), (5 * CS) | OFLAG_COPIED);
    drop(l);
    assert_eq!(
        repair_leaks_in(&mem, mem_path("hand.qcow2")).unwrap(),
        Some(0),
        "refcounts and COPIED flags match the references"
    );
}
