//! Unit tests: descriptors parsed strictly, and VMDKs built by hand in
//! memory from the spec (hosted sparse with zero grains and a redundant
//! directory, streamOptimized grains, several extent files with flat, zero
//! and sparse extents), checked through map and reads.

use super::descriptor::{self, Access, ExtentType, NO_PARENT};
use super::extents::ExtentFiles;
use super::VmdkLayer;
use crate::error::{ImageError, Result};
use crate::image::testutil::{mem_path, pattern, read_guest};
use crate::image::{Identity, Mapping, ReadMap};
use crate::storage::{MemStorage, Storage};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

const DESC: &str = "# Disk DescriptorFile\nversion=1\nCID=0000abcd\nparentCID=ffffffff\n\
createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\nRW 16 FLAT \"a-f001.vmdk\" 0\n\
RDONLY 8 ZERO\nRW 16 FLAT \"b-f002.vmdk\" 2\n\n#DDB\nddb.adapterType = \"lsilogic\"\n\
ddb.geometry.cylinders = \"1\"\n";

fn parse(text: &str) -> Result<descriptor::Descriptor> {
    descriptor::parse(mem_path("d.vmdk"), 0, text.as_bytes())
}

#[test]
fn descriptor_fields_and_extent_lines() {
    let d = parse(DESC).unwrap();
    assert_eq!(d.cid, 0xabcd);
    assert_eq!(d.parent_cid, NO_PARENT);
    assert_eq!(d.create_type, "twoGbMaxExtentFlat");
    assert_eq!(d.extents.len(), 3);
    assert_eq!(d.extents[1].access, Access::ReadOnly);
    assert_eq!(d.extents[1].kind, ExtentType::Zero);
    assert_eq!(d.extents[2].offset, 2);
    assert_eq!(d.ddb("adapterType"), Some("lsilogic"));
    assert_eq!(d.sectors(), 40);
    // What `render` writes parses back to the same.
    let again = parse(&descriptor::render(&d)).unwrap();
    let key = |d: &descriptor::Descriptor| -> Vec<_> {
        d.extents
            .iter()
            .map(|e| (e.access, e.sectors, e.kind, e.file.clone(), e.offset))
            .collect()
    };
    assert_eq!(key(&again), key(&d));
    assert_eq!((again.cid, again.ddb.clone()), (d.cid, d.ddb.clone()));
}

/// QEMU's CID update writes the descriptor file back as DESC_SIZE bytes:
/// when the new CID has fewer hex digits than the old, the old text's last
/// bytes stay after the new text's NUL. QEMU reads up to the NUL; so do we.
#[test]
fn text_after_the_first_nul_is_not_read() {
    let stale = format!("{DESC}\0er\"\n\0\0\0");
    let d = parse(&stale).unwrap();
    assert_eq!(d.cid, 0xabcd);
    assert_eq!(d.ddb("geometry.cylinders"), Some("1"));
}

#[test]
fn descriptor_refusals_name_the_line() {
    for (text, want) in [
        (DESC.replace("CID=0000abcd", "CID=xyz"), "CID is not hex"),
        (
            DESC.replace("RW 16 FLAT \"a-f001.vmdk\" 0", "RW 16 FLAT a-f001.vmdk 0"),
            "quoted",
        ),
        (
            DESC.replace("RW 16 FLAT \"a-f001.vmdk\" 0", "RW 16 FLAT \"a-f001.vmdk\""),
            "sector offset",
        ),
        (DESC.replace("RW 16 FLAT", "RW -1 FLAT"), "positive"),
        (
            DESC.replace("RW 16 FLAT \"a", "RW 16 VMFSRDM \"a"),
            "VMFSRDM",
        ),
        (DESC.replace("version=1", "version=1\nversion=1"), "twice"),
        (
            DESC.replace("createType=\"twoGbMaxExtentFlat\"", "createType=\"fancy\""),
            "fancy",
        ),
        (
            DESC.replace("parentCID=ffffffff", "parentCID=12345678"),
            "parentFileNameHint",
        ),
        (DESC.replace("#DDB", "garbage here"), "neither"),
        (DESC.replace("RDONLY 8 ZERO", "RDONLY 8 ZERO \"x\""), "ZERO"),
    ] {
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains(want), "want {want:?} in {err}");
    }
    let many: String = (0..1025).map(|_| "RW 1 ZERO\n").collect();
    let err = parse(&format!("{DESC}{many}")).unwrap_err().to_string();
    assert!(err.contains("more than 1024 extents"), "{err}");
}

/// Extent files from memory.
struct MemFiles(HashMap<String, Arc<MemStorage>>);

impl ExtentFiles for MemFiles {
    fn open(&self, name: &str, at: u64) -> Result<(PathBuf, Arc<dyn Storage>)> {
        match self.0.get(name) {
            Some(s) => Ok((PathBuf::from(name), s.clone() as Arc<dyn Storage>)),
            None => Err(ImageError::corrupt(
                mem_path("d.vmdk"),
                at,
                "no such extent file",
            )),
        }
    }
}

fn mem(bytes: Vec<u8>) -> Arc<MemStorage> {
    Arc::new(MemStorage::from_bytes(bytes))
}

#[test]
fn several_files_read_through_their_own_host_windows() {
    let a = pattern(1, 0, 16 * 512);
    let b = pattern(2, 0, 18 * 512);
    let files = MemFiles(HashMap::from([
        ("a-f001.vmdk".to_string(), mem(a.clone())),
        ("b-f002.vmdk".to_string(), mem(b.clone())),
    ]));
    let desc = mem(DESC.as_bytes().to_vec());
    let l = VmdkLayer::open_storage(mem_path("d.vmdk"), desc, &files, false).unwrap();
    assert_eq!(l.virtual_size(), 40 * 512);
    let got = read_guest(&l, 0, 40 * 512).unwrap();
    let mut want = a.clone();
    want.extend(vec![0u8; 8 * 512]);
    want.extend_from_slice(&b[1024..]);
    assert_eq!(got, want);
    let m = l.map(0, 40 * 512).unwrap();
    assert_eq!(m[0].mapping, Mapping::Data { host: 0 });
    assert_eq!(m[1].mapping, Mapping::Zero);
    assert_eq!(
        m[2].mapping,
        Mapping::Data {
            host: (2 << 48) | 1024
        }
    );
    assert_eq!(l.unique_id(), Some(super::cid_id(0xabcd)));
    assert_eq!(l.expected_parent_id(), None);
    // A missing extent file is an error naming the line.
    let files = MemFiles(HashMap::new());
    let desc = mem(DESC.as_bytes().to_vec());
    assert!(VmdkLayer::open_storage(mem_path("d.vmdk"), desc, &files, false).is_err());
}

/// A monolithicSparse image by hand: 4 MiB, 64 KiB grains, 16 entries per
/// grain table (so 4 tables), a redundant directory; grain 0 data, grain
/// 1 a zero grain, grain 17 data, the rest unallocated.
fn hand_sparse(compressed: bool) -> Vec<u8> {
    let grain = 65536u64;
    let mut f = vec![0u8; 512];
    f[..4].copy_from_slice(b"KDMV");
    let flags: u32 = 1 | 2 | 4 | if compressed { 3 << 16 } else { 0 };
    f[4..8].copy_from_slice(&(if compressed { 3u32 } else { 1 }).to_le_bytes());
    f[8..12].copy_from_slice(&flags.to_le_bytes());
    f[12..20].copy_from_slice(&(8192u64).to_le_bytes()); // 4 MiB
    f[20..28].copy_from_slice(&128u64.to_le_bytes());
    f[28..36].copy_from_slice(&1u64.to_le_bytes()); // descriptor at sector 1
    f[36..44].copy_from_slice(&2u64.to_le_bytes());
    f[44..48].copy_from_slice(&16u32.to_le_bytes());
    f[48..56].copy_from_slice(&3u64.to_le_bytes()); // RGD sector 3
    f[56..64].copy_from_slice(&4u64.to_le_bytes()); // GD sector 4
    f[64..72].copy_from_slice(&128u64.to_le_bytes());
    f[73..77].copy_from_slice(b"\n \r\n");
    f[77..79].copy_from_slice(&(compressed as u16).to_le_bytes());
    let desc = "# Disk DescriptorFile\nversion=1\nCID=11112222\nparentCID=33334444\n\
                createType=\"monolithicSparse\"\nparentFileNameHint=\"p.vmdk\"\n\
                RW 8192 SPARSE \"x.vmdk\"\n";
    f.resize(1024 + 1024, 0);
    f[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
    // GD (sector 4) and RGD (sector 3): tables 0 and 1 at sectors 5 and 6.
    f.resize(128 * 512, 0);
    for (gd, t0, t1) in [(4 * 512, 5u32, 6u32), (3 * 512, 7, 8)] {
        f[gd..gd + 4].copy_from_slice(&t0.to_le_bytes());
        f[gd + 4..gd + 8].copy_from_slice(&t1.to_le_bytes());
    }
    let mut grains = Vec::new();
    for (table, entry, seed) in [(0usize, 0usize, 7u8), (1, 1, 9)] {
        let at = f.len() as u64;
        let data = pattern(seed, 0, grain as usize);
        let index = (table * 16 + entry) as u64;
        if compressed {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(&data).unwrap();
            let z = z.finish().unwrap();
            f.extend_from_slice(&(index * 128).to_le_bytes());
            f.extend_from_slice(&(z.len() as u32).to_le_bytes());
            f.extend_from_slice(&z);
            f.resize(f.len().div_ceil(512) * 512, 0);
        } else {
            f.extend_from_slice(&data);
        }
        grains.push((table, entry, (at / 512) as u32));
    }
    for (table, entry, sector) in grains {
        for t in [5 + table, 7 + table] {
            let at = t * 512 + entry * 4;
            f[at..at + 4].copy_from_slice(&sector.to_le_bytes());
        }
    }
    // Grain 1: a zero grain.
    for t in [5, 7] {
        f[t * 512 + 4..t * 512 + 8].copy_from_slice(&1u32.to_le_bytes());
    }
    f
}

fn open_mem(bytes: Vec<u8>) -> Result<VmdkLayer> {
    VmdkLayer::open_storage(
        mem_path("s.vmdk"),
        mem(bytes),
        &MemFiles(HashMap::new()),
        false,
    )
}

#[test]
fn hand_made_sparse_maps_and_reads() {
    for compressed in [false, true] {
        let l = open_mem(hand_sparse(compressed)).unwrap();
        assert_eq!(l.virtual_size(), 4 << 20);
        assert_eq!(l.backing().unwrap().name, "p.vmdk");
        assert_eq!(l.expected_parent_id(), Some(super::cid_id(0x33334444)));
        let m = l.map(0, 4 << 20).unwrap();
        let kinds: Vec<_> = m.iter().map(|e| (e.start, e.mapping)).collect();
        if compressed {
            assert_eq!(kinds[0], (0, Mapping::Compressed { cluster_start: 0 }));
        } else {
            assert!(matches!(kinds[0], (0, Mapping::Data { .. })));
        }
        assert_eq!(kinds[1], (65536, Mapping::Zero));
        assert_eq!(kinds[2], (131072, Mapping::Unallocated));
        let got = read_guest(&l, 0, 4 << 20).unwrap();
        assert_eq!(&got[..65536], &pattern(7, 0, 65536)[..]);
        assert!(got[65536..17 * 65536].iter().all(|&b| b == 0));
        assert_eq!(&got[17 * 65536..18 * 65536], &pattern(9, 0, 65536)[..]);
        // An unaligned read inside a compressed grain.
        let part = read_guest(&l, 17 * 65536 + 1000, 3000).unwrap();
        assert_eq!(part, pattern(9, 1000, 3000));
    }
}

#[test]
fn hand_made_sparse_refusals() {
    let good = hand_sparse(false);
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Damage, &str)> = vec![
        (Box::new(|f| f[0] = b'X'), "descriptor"),
        (Box::new(|f| f[4] = 9), "version 9"),
        (Box::new(|f| f[74] = b'x'), "newline check"),
        (Box::new(|f| f[20] = 3), "grain of 3"),
        (
            Box::new(|f| f[44..48].copy_from_slice(&0u32.to_le_bytes())),
            "entries per grain table",
        ),
        (Box::new(|f| f[58] = 1), "outside the file"),
        (Box::new(|f| f[4 * 512 + 4] = 5), "overlapping grain tables"),
        (Box::new(|f| f[4 * 512] = 4), "overlaps the grain directory"),
        (
            Box::new(|f| f[3 * 512] = 1),
            "overlaps the embedded descriptor",
        ),
        (Box::new(|f| f[512 + 10] = 0xff), "UTF-8"),
        (
            Box::new(|f| {
                f[12..20].copy_from_slice(&(1u64 << 32).to_le_bytes());
                f[20] = 1;
                f[44..48].copy_from_slice(&1u32.to_le_bytes());
            }),
            "grain directory entries (at most",
        ),
    ];
    for (damage, want) in cases {
        let mut f = good.clone();
        damage(&mut f);
        let err = open_mem(f).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(want), "want {want:?} in {err:?}");
    }
    // A grain outside the file fails the read of that grain, naming the
    // grain table entry.
    let mut f = good.clone();
    f[5 * 512..5 * 512 + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    let l = open_mem(f).unwrap();
    let err = l.map(0, 65536).unwrap_err().to_string();
    assert!(
        err.contains("offset 2560") && err.contains("outside the grain area"),
        "{err}"
    );
}

#[test]
fn compressed_grain_damage_is_an_error() {
    let good = hand_sparse(true);
    let l = open_mem(good.clone()).unwrap();
    let Mapping::Compressed { .. } = l.map(0, 512).unwrap()[0].mapping else {
        panic!("not compressed")
    };
    // Find grain 0's marker: table 0 entry 0.
    let sector = u32::from_le_bytes(good[5 * 512..5 * 512 + 4].try_into().unwrap()) as usize;
    for (at, value, want) in [
        (sector * 512, 0x40u8, "marker says sector"),
        (sector * 512 + 8, 0, "compressed grain of 0 bytes"),
        (sector * 512 + 14, 0x5a, "compressed grain"),
    ] {
        let mut f = good.clone();
        if at == sector * 512 + 8 {
            f[at..at + 4].fill(value);
        } else {
            f[at] ^= value;
        }
        let l = open_mem(f).unwrap();
        let err = read_guest(&l, 0, 512).unwrap_err().to_string();
        assert!(err.contains(want), "want {want:?} in {err}");
    }
}

/// Writes into the hand-made sparse image: into an allocated grain, a
/// partial grain over the parent (completed from below), a whole zero
/// grain, and a grain whose table does not exist yet (tables 2 and 3 are
/// absent), which makes both table copies and names them in both
/// directories. Reopened, everything reads back; the CID changed.
#[test]
fn writes_allocate_grains_and_tables() {
    use crate::image::testutil::{pattern_byte, PatternBelow};
    use crate::image::Writable;
    let mem_file = mem(hand_sparse(false));
    let open = |writable| {
        VmdkLayer::open_storage(
            mem_path("s.vmdk"),
            mem_file.clone(),
            &MemFiles(HashMap::new()),
            writable,
        )
        .unwrap()
    };
    let l = open(true);
    let below = PatternBelow(5);
    let mut want = read_guest(&l, 0, 4 << 20).unwrap();
    // Unallocated grains read the parent in a chain; model them so.
    for e in l.map(0, 4 << 20).unwrap() {
        if e.mapping == Mapping::Unallocated {
            for o in e.start..e.end() {
                want[o as usize] = pattern_byte(5, o);
            }
        }
    }
    let mut put = |off: u64, data: &[u8]| {
        l.write(off, data, &below).unwrap();
        want[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    put(100, &[1; 300]); // allocated grain 0
    put(2 * 65536 + 7, &[2; 5000]); // unallocated grain 2, over the parent
    put(65536 + 10, &[3; 10]); // zero grain 1: the rest stays zeros
    put(40 * 65536 + 65000, &[4; 1000]); // grains 40-41: table 2 is new
    let zeros_at = 50 * 65536;
    l.write_zeroes(zeros_at, 65536, &below).unwrap(); // a whole grain
    want[zeros_at as usize..zeros_at as usize + 65536].fill(0);
    l.flush().unwrap();
    let new_cid = l.unique_id();
    assert_ne!(new_cid, Some(super::cid_id(0x11112222)));
    drop(l);
    let l = open(false);
    assert_eq!(l.unique_id(), new_cid);
    let mut got = read_guest(&l, 0, 4 << 20).unwrap();
    for e in l.map(0, 4 << 20).unwrap() {
        if e.mapping == Mapping::Unallocated {
            for o in e.start..e.end() {
                got[o as usize] = pattern_byte(5, o);
            }
        }
    }
    assert!(
        got == want,
        "reads after reopen differ from what was written"
    );
    // Both directories name the new table 2, and the redundant copy has
    // the entry too.
    let b = mem_file.to_vec();
    let le = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let (p, r) = (le(4 * 512 + 8) * 512, le(3 * 512 + 8) * 512);
    assert!(p != 0 && r != 0 && p != r, "tables {p} {r}");
    assert_eq!(le(p + 8 * 4), le(r + 8 * 4), "grain 40 in both copies");
    assert_ne!(le(p + 8 * 4), 0);
    // The zeroed whole grain is a zero grain (the image has them).
    assert_eq!(l.map(zeros_at, 65536).unwrap()[0].mapping, Mapping::Zero);
}

#[test]
fn cid_digits_are_replaced_in_place() {
    let text = b"# Disk DescriptorFile\nversion=1\nCID=3c7a33a\nparentCID=ffffffff\n";
    let (at, n) = super::write::cid_digits(text).unwrap();
    assert_eq!((&text[at..at + n], n), (&b"3c7a33a"[..], 7));
    for _ in 0..100 {
        let c = super::write::new_cid(7, 0x3c7a33a);
        assert!(c < 1 << 28 && c != 0x3c7a33a);
    }
    assert!(super::write::cid_digits(b"parentCID=1\n").is_none());
}

/// A grain entry that points at a grain table (a crafted image) is
/// readable, but the disk does not open for writing (the grain overlaps
/// metadata), changing nothing; tables shared by both directories make
/// the disk unwritable.
#[test]
fn writes_never_touch_metadata() {
    let mut f = hand_sparse(false);
    // Grain 2 (table 0, entry 2) at sector 6: table 1.
    f[5 * 512 + 8..5 * 512 + 12].copy_from_slice(&6u32.to_le_bytes());
    let file = mem(f);
    let before = file.to_vec();
    let open = |writable| {
        VmdkLayer::open_storage(
            mem_path("s.vmdk"),
            file.clone(),
            &MemFiles(HashMap::new()),
            writable,
        )
    };
    let err = open(true).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("overlaps metadata"), "{err}");
    let l = open(false).unwrap();
    read_guest(&l, 2 * 65536, 512).unwrap();
    drop(l);
    assert!(file.to_vec() == before, "a refused open changed the file");
    let mut f = hand_sparse(false);
    let primary = f[4 * 512..4 * 512 + 8].to_vec();
    f[3 * 512..3 * 512 + 8].copy_from_slice(&primary);
    let err = VmdkLayer::open_storage(mem_path("s.vmdk"), mem(f), &MemFiles(HashMap::new()), true)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("not writable"), "{err}");
}

/// Review finding 6: host offsets are `extent << 48 | offset`, so a
/// grain ending at or past 2^48 bytes of its file would read another
/// extent's window. No file here can be that large (ext4 stops at 16
/// TiB), so a seSparse table is decoded with such a length claimed: a
/// grain ending exactly at 2^48 is refused naming the entry, one grain
/// below it is not.
#[test]
fn grains_ending_at_2_pow_48_are_refused() {
    use super::tables::{EntryCodec, Grain, GrainTables};
    let grain = 4096u64;
    // seSparse "allocated" entries: type 3, grain number split (low 12
    // bits in bits 48..60, the rest in bits 0..48).
    let entry = |n: u64| (3u64 << 60) | ((n & 0xfff) << 48) | (n >> 12);
    let last = (1u64 << 48) / grain - 1;
    let p = mem_path("x-sesparse.vmdk");
    let lookup = |n: u64| {
        // The table at 512 (0 means none), one entry.
        let mut bytes = vec![0u8; 512 + 32];
        bytes[512..520].copy_from_slice(&entry(n).to_le_bytes());
        let t = GrainTables::new(
            grain,
            4,
            vec![512],
            EntryCodec::SeSparse { grains_at: 0 },
            0,
            1 << 50,
        );
        t.lookup(&*mem(bytes), p, 0)
    };
    let err = lookup(last).unwrap_err().to_string();
    assert!(err.contains("2^48") && err.contains("offset 512"), "{err}");
    assert_eq!(lookup(last - 1).unwrap(), Grain::At((last - 1) * grain));
}
