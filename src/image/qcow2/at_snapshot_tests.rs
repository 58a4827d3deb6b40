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

/// Random byte flips in the snapshot table, the snapshots' L1 and L2
/// tables and the header's table pointer (`SNAPTREE_FUZZ_ITERS` rounds,
/// 300 by default): opening the image, each snapshot's disk and vmstate,
/// reading them and deleting a snapshot never panic or hang; what fails,
/// fails with an error.
#[test]
fn flipped_snapshot_tables_fail_by_error() {
    use crate::image::Writable;
    use rand::{Rng, SeedableRng};
    let iters: u64 = std::env::var("SNAPTREE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let good = with_snapshots(&[
        entry(SN_L1, 2, "1", "s1", 23, SIZE),
        entry(SN_L1, 1, "2", "s2", 0, SIZE / 2),
    ]);
    let regions = [(60u64, 12u64), (TABLE, 200), (SN_L1, 16), (VM_L2, 16)];
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    for round in 0..iters {
        let mut img = good.clone();
        for _ in 0..rng.gen_range(1..4) {
            let (at, len) = regions[rng.gen_range(0..regions.len())];
            let i = (at + rng.gen_range(0..len)) as usize;
            img[i] ^= 1 << rng.gen_range(0..8);
        }
        // A panic names the round and seed through this guard's message.
        let _ctx = Ctx(format!("round {round} (seed {seed})"));
        let storage = MemStorage::from_bytes(img).with_limit(64 * CS);
        let Ok(l) = Qcow2Layer::open_storage(mem_path("fuzz.qcow2"), Box::new(storage), true)
        else {
            continue;
        };
        let count = l.info().map(|i| i.snapshots.len()).unwrap_or(0);
        for i in 0..count.min(4) {
            if let Ok(o) = l.open_internal(i) {
                let size = o.disk.virtual_size().min(4 * CS);
                let _ = read_guest(&*o.disk, 0, size);
                if let Some(vm) = o.vmstate {
                    let mut buf = vec![0u8; 64];
                    let _ = vm.read_at(&mut buf, 0);
                }
            }
        }
        let _ = l.delete_internal(if rng.gen_bool(0.5) { "1" } else { "2" });
    }
}

/// Prints its text when dropped during a panic: which fuzz round failed.
struct Ctx(String);

impl Drop for Ctx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("failed at {}", self.0);
        }
    }
}
