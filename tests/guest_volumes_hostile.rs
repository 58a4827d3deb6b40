//! Regression tests for hostile partition tables and LVM metadata that a
//! review found: arithmetic overflow on metadata numbers, work quadratic in
//! repeated names, one PV re-read under many partition entries, volume
//! names that are not safe directory entries, and one byte range listed as
//! many readable volumes. No real tool writes such disks, so they are built
//! here by hand, byte by byte, after the LVM2 and UEFI layouts (with their
//! CRCs, so the readers get past their checks).

use snaptree::guest::volumes::{scan, Scan, Source, MAX_NAME, MAX_VOLUMES};
use snaptree::guest::ReadBytes;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const UUID: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const LVM_TYPE: [u8; 16] = [
    0x79, 0xd3, 0xd6, 0xe6, 0x07, 0xf5, 0xc4, 0x44, 0xa2, 0x3c, 0x23, 0x8c, 0x2a, 0x3d, 0xf9, 0x28,
];

fn crc32(mut crc: u32, data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

fn lvm_crc(d: &[u8]) -> u32 {
    crc32(0xf597_a6cf, d)
}

fn gpt_crc(d: &[u8]) -> u32 {
    !crc32(!0, d)
}

/// A disk in memory that counts the bytes read from it.
struct Counted {
    bytes: Vec<u8>,
    read: AtomicU64,
}

impl ReadBytes for Counted {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.bytes.read_exact_at(buf, offset)
    }
}

/// Writes a PV (label in sector 1, one metadata area at 4096 of `mda`
/// bytes) at `base` of `disk`, holding `text`.
fn put_pv(disk: &mut [u8], base: usize, uuid: &str, text: &str, mda: u64) {
    let s = &mut disk[base + 512..base + 1024];
    s[..8].copy_from_slice(b"LABELONE");
    s[8..16].copy_from_slice(&1u64.to_le_bytes());
    s[20..24].copy_from_slice(&32u32.to_le_bytes());
    s[24..32].copy_from_slice(b"LVM2 001");
    s[32..64].copy_from_slice(uuid.as_bytes());
    s[64..72].copy_from_slice(&(1u64 << 30).to_le_bytes());
    s[72..80].copy_from_slice(&(1u64 << 20).to_le_bytes());
    s[104..112].copy_from_slice(&4096u64.to_le_bytes());
    s[112..120].copy_from_slice(&mda.to_le_bytes());
    let c = lvm_crc(&s[20..]);
    s[16..20].copy_from_slice(&c.to_le_bytes());
    let m = base + 4096;
    let t = text.as_bytes();
    disk[m + 512..m + 512 + t.len()].copy_from_slice(t);
    let h = &mut disk[m..m + 512];
    h[4..20].copy_from_slice(b"\x20LVM2\x20x[5A%r0N*>");
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h[24..32].copy_from_slice(&4096u64.to_le_bytes());
    h[32..40].copy_from_slice(&mda.to_le_bytes());
    h[40..48].copy_from_slice(&512u64.to_le_bytes());
    h[48..56].copy_from_slice(&(t.len() as u64).to_le_bytes());
    h[56..60].copy_from_slice(&lvm_crc(t).to_le_bytes());
    let c = lvm_crc(&h[4..]);
    h[0..4].copy_from_slice(&c.to_le_bytes());
}

/// The text of VG `name` (id `id`) with PV pv0 (`pv_extra` appended to its
/// section) and the LV sections `lvs`.
fn vg_text(name: &str, id: &str, pe_start: &str, pv_extra: &str, lvs: &str) -> String {
    format!(
        "{name} {{\nid = \"{id}\"\nseqno = 1\nextent_size = 8\nphysical_volumes {{\n\
         pv0 {{\nid = \"{UUID}\"\npe_start = {pe_start}\npe_count = 100\n}}\n{pv_extra}}}\n\
         logical_volumes {{\n{lvs}\n}}\n}}\n"
    )
}

/// A visible linear LV section of one segment.
fn lv(name: &str, segments: &[(&str, &str)]) -> String {
    let mut out = format!(
        "{name} {{ status = [\"VISIBLE\"] segment_count = {}\n",
        segments.len()
    );
    for (i, (start, count)) in segments.iter().enumerate() {
        out += &format!(
            "segment{} {{ start_extent = {start} extent_count = {count} type = \"striped\" \
             stripe_count = 1 stripes = [\"pv0\", 0] }}\n",
            i + 1
        );
    }
    out + "}\n"
}

fn pv_disk(text: &str) -> Vec<u8> {
    let mda = (text.len() as u64 + 4096).next_power_of_two().max(1 << 20);
    let mut d = vec![0u8; (mda as usize + (1 << 20)).max(4 << 20)];
    put_pv(&mut d, 0, UUID, text, mda);
    d
}

fn scan_one(disk: Vec<u8>) -> Scan {
    let d: Arc<dyn ReadBytes> = Arc::new(disk);
    scan(&[("vda".to_string(), d)])
}

/// A GPT (512-byte sectors) whose entries are the LBA ranges `ranges`.
fn put_gpt(disk: &mut [u8], ranges: &[(u64, u64)], kind: [u8; 16]) {
    let sectors = disk.len() as u64 / 512;
    let mut arr = vec![0u8; ranges.len().max(128) * 128];
    for (i, &(first, last)) in ranges.iter().enumerate() {
        let e = &mut arr[i * 128..i * 128 + 128];
        e[..16].copy_from_slice(&kind);
        e[16..24].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
    }
    disk[1024..1024 + arr.len()].copy_from_slice(&arr);
    let mut h = [0u8; 92];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&(sectors - 1).to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&((arr.len() / 128) as u32).to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&gpt_crc(&arr).to_le_bytes());
    let c = gpt_crc(&h);
    h[16..20].copy_from_slice(&c.to_le_bytes());
    disk[512..604].copy_from_slice(&h);
    disk[450] = 0xee;
    disk[454..458].copy_from_slice(&1u32.to_le_bytes());
    disk[458..462].copy_from_slice(&u32::MAX.to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
}

fn names(s: &Scan) -> Vec<&str> {
    s.volumes.iter().map(|v| v.name.as_str()).collect()
}

#[test]
fn pe_start_past_what_a_byte_offset_holds_marks_the_pv_bad() {
    let lvs = lv("lv", &[("0", "1")]);
    let s = scan_one(pv_disk(&vg_text(
        "vg",
        "VGID",
        &i64::MAX.to_string(),
        "",
        &lvs,
    )));
    let v = s.volumes.iter().find(|v| v.name == "vg-lv").unwrap();
    assert!(
        v.unreadable.as_deref().unwrap().contains("pe_start"),
        "{v:?}"
    );
    assert!(
        s.problems.iter().any(|p| p.contains("pe_start")),
        "{:?}",
        s.problems
    );
}

#[test]
fn segment_extent_counts_that_overflow_are_refused() {
    let max = i64::MAX.to_string();
    let lvs = lv("lv", &[("0", &max), (&max, &max), ("0", &max)]) + &lv("big", &[("0", "500")]);
    let s = scan_one(pv_disk(&vg_text("vg", "VGID", "2048", "", &lvs)));
    for name in ["vg-lv", "vg-big"] {
        let v = s.volumes.iter().find(|v| v.name == name).unwrap();
        assert!(v.unreadable.is_some() && v.pieces.is_empty(), "{v:?}");
        assert!(
            s.problems.iter().any(|p| p.starts_with(name)),
            "{name}: {:?}",
            s.problems
        );
    }
    assert!(s
        .problems
        .iter()
        .any(|p| p.contains("more than the VG's 100")));
}

#[test]
fn repeated_lv_and_pv_sections_are_used_once() {
    let lvs = "lv{status=[\"VISIBLE\"]}\n".repeat(5000);
    let pv_extra = format!("pv0 {{ id = \"{UUID}\" pe_start = 0 pe_count = 1 }}\n");
    let s = scan_one(pv_disk(&vg_text("vg", "VGID", "2048", &pv_extra, &lvs)));
    assert_eq!(names(&s), ["disk", "vg-lv"], "{:?}", s.problems);
    for want in [
        "VG vg: 4999 LV sections repeat",
        "VG vg: 1 PV sections repeat",
    ] {
        assert!(
            s.problems.iter().any(|p| p.starts_with(want)),
            "{want}: {:?}",
            s.problems
        );
    }
}

#[test]
fn volumes_past_the_cap_are_left_out_with_a_problem() {
    let lvs: String = (0..3000)
        .map(|i| lv(&format!("lv{i:04}"), &[("0", "1")]))
        .collect();
    let s = scan_one(pv_disk(&vg_text("vg", "VGID", "2048", "", &lvs)));
    assert_eq!(s.volumes.len(), MAX_VOLUMES);
    assert_eq!(s.volumes[1].name, "vg-lv0000");
    let want = format!("{} more volumes left out", 3001 - MAX_VOLUMES);
    assert!(
        s.problems.iter().any(|p| p.starts_with(&want)),
        "{:?}",
        s.problems
    );
}

#[test]
fn one_pv_under_many_partition_entries_is_read_once() {
    // 100 entries start at the same PV and end at different places; its
    // metadata text (1 MiB of it) is read and parsed once.
    let pad = "#".repeat(1 << 20);
    let text = vg_text("vg", "VGID", "2048", "", &lv("lv", &[("0", "1")])) + &pad + "\n";
    let mut d = vec![0u8; 8 << 20];
    put_pv(&mut d, 2048 * 512, UUID, &text, 2 << 20);
    let ranges: Vec<(u64, u64)> = (0..100).map(|i| (2048, 16000 - i)).collect();
    put_gpt(&mut d, &ranges, LVM_TYPE);
    let disk = Arc::new(Counted {
        bytes: d,
        read: AtomicU64::new(0),
    });
    let s = scan(&[("vda".to_string(), disk.clone() as Arc<dyn ReadBytes>)]);
    assert!(names(&s).contains(&"vg-lv"), "{:?}", s.problems);
    let read = disk.read.load(Ordering::Relaxed);
    assert!(read < 3 << 20, "{read} bytes read");
}

#[test]
fn metadata_text_read_per_scan_is_bounded() {
    // Ten PVs (one per disk) of ten VGs, each text 7 MiB: 70 MiB in all.
    let pad = "#".repeat(7 << 20);
    let disks: Vec<Arc<Counted>> = (0..10)
        .map(|i| {
            let uuid = format!("{:A<32}", format!("PV{i}"));
            let text = vg_text(&format!("vg{i}"), &format!("VG{i}"), "2048", "", "")
                .replace(UUID, &uuid)
                + &pad
                + "\n";
            let mut d = vec![0u8; 9 << 20];
            put_pv(&mut d, 0, &uuid, &text, 8 << 20);
            Arc::new(Counted {
                bytes: d,
                read: AtomicU64::new(0),
            })
        })
        .collect();
    let named: Vec<(String, Arc<dyn ReadBytes>)> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("vd{i}"), d.clone() as Arc<dyn ReadBytes>))
        .collect();
    let s = scan(&named);
    let read: u64 = disks.iter().map(|d| d.read.load(Ordering::Relaxed)).sum();
    assert!(read <= (64 << 20) + (1 << 20), "{read} bytes read");
    assert!(
        s.problems.iter().any(|p| p.contains("MiB read per scan")),
        "{:?}",
        s.problems
    );
}

#[test]
fn names_outside_lvms_charset_are_left_out() {
    let long = "x".repeat(5000);
    let lvs = [
        lv("\"a/b\"", &[]),
        lv(&format!("\"{long}\""), &[]),
        lv("\"nul\\\0x\"", &[]),
        lv("\"..\"", &[]),
        lv("\"-x\"", &[]),
        lv("ok", &[]),
    ]
    .concat();
    let good = pv_disk(&vg_text("vg", "VG\u{1}ID", "2048", "", &lvs));
    let bad_vg = {
        let uuid = "B".repeat(32);
        let text = vg_text("\"bad/vg\"", "BADVG", "2048", "", &lv("lv", &[])).replace(UUID, &uuid);
        let mut d = vec![0u8; 4 << 20];
        put_pv(&mut d, 0, &uuid, &text, 1 << 20);
        d
    };
    let disks: Vec<(String, Arc<dyn ReadBytes>)> = vec![
        ("sub/dir\n".to_string(), Arc::new(good)),
        ("x".repeat(300), Arc::new(bad_vg)),
    ];
    let s = scan(&disks);
    let long_disk = format!("{}-disk", "x".repeat(64));
    assert_eq!(names(&s), ["sub_dir_-disk", &long_disk, "vg-ok"]);
    for p in &s.problems {
        assert!(!p.chars().any(char::is_control), "{p:?}");
    }
    let want = [
        "VG with id VG\\u{1}ID: 5 LV(s) left out",
        "VG with id BADVG: name",
    ];
    for w in want {
        assert!(
            s.problems.iter().any(|p| p.starts_with(w)),
            "{w}: {:?}",
            s.problems
        );
    }
}

#[test]
fn partitions_over_the_same_bytes_are_listed_but_read_once() {
    let mut d = vec![0u8; 4 << 20];
    let ranges = vec![(2048, 4095); MAX_VOLUMES + 44];
    put_gpt(&mut d, &ranges, LVM_TYPE);
    let s = scan_one(d);
    assert_eq!(s.volumes.len(), MAX_VOLUMES);
    assert!(s.volumes[0].unreadable.is_none() && s.volumes[0].pieces.len() == 1);
    for v in &s.volumes[1..] {
        assert_eq!(v.source, Source::Gpt);
        assert_eq!(v.unreadable.as_deref(), Some("same bytes as p1"), "{v:?}");
        assert!(v.pieces.is_empty() && v.size == 1 << 20);
        assert!(v.name.len() <= MAX_NAME);
    }
    assert!(s
        .problems
        .iter()
        .any(|p| p.starts_with("44 more volumes left out")));
}
