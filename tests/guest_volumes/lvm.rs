//! LVM2 judged by LVM itself: a VG over a GPT partition of one disk and the
//! whole of another, made with pvcreate/vgcreate/lvcreate (no
//! device-mapper: `--driverloaded n -an -Zn`), a thin pool written into the
//! metadata through vgcfgbackup/vgcfgrestore (lvcreate cannot make one
//! without device-mapper). LV content goes in at the places `lvs
//! --segments` and `pvs` report; the library must read it back.

use super::tools::*;
use snaptree::guest::probe::probe;
use snaptree::guest::volumes::{scan, Source, VolumeBytes};
use snaptree::guest::ReadBytes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const VG: &str = "t-vg";

/// The two disks of the VG, and what `lvs`/`pvs` said about it.
pub struct Setup {
    pub a: PathBuf,
    pub b: PathBuf,
    /// (LV name, LV size, segment type, seg_pe_ranges, stripe size) per segment, in order.
    pub segments: Vec<(String, u64, String, String, u64)>,
    /// PV device -> (file, byte offset of the PV in it, pe_start, PV UUID).
    pub pvs: HashMap<String, (PathBuf, u64, u64, String)>,
    pub extent: u64,
    _lvm: Lvm,
    _loops: (Loop, Loop),
}

fn lvcreate(lvm: &Lvm, args: &[&str]) {
    let mut all = vec!["--driverloaded", "n", "-an", "-Zn", "-y"];
    all.extend_from_slice(args);
    lvm.cmd("lvcreate", &all);
}

/// Builds the VG. `None` (after printing SKIP) when tools are missing.
pub fn build(dir: &Path) -> Option<Setup> {
    if !have(&["sgdisk", "pvcreate", "losetup"]) {
        return None;
    }
    let a = image(dir, "a.img", 40);
    let b = image(dir, "b.img", 24);
    run(
        "sgdisk",
        &[
            "-n1:2048:+4M",
            "-t1:8300",
            "-n2:0:0",
            "-t2:8e00",
            a.to_str().unwrap(),
        ],
    );
    let part = scan(&[("a".into(), disk(&a))]).volumes[1].pieces[0];
    let (off, size) = (part.offset.to_string(), part.len.to_string());
    let la = Loop::new(&a, &["-o", &off, "--sizelimit", &size]);
    let lb = Loop::new(&b, &[]);
    let lvm = Lvm::new(VG, &[&la, &lb]);
    lvm.cmd("pvcreate", &["-y", &la.0, &lb.0]);
    lvm.cmd("vgcreate", &["-s", "1M", VG, &la.0, &lb.0]);
    lvcreate(&lvm, &["-L", "3M", "-n", "lv1", VG, &la.0]);
    lvcreate(&lvm, &["-L", "2M", "-n", "my-lv", VG, &la.0]);
    lvm.cmd(
        "lvextend",
        &[
            "--driverloaded",
            "n",
            "-L",
            "+4M",
            &format!("{VG}/lv1"),
            &la.0,
        ],
    );
    lvcreate(&lvm, &["-L", "2M", "-n", "tmeta_hold", VG, &lb.0]);
    lvcreate(&lvm, &["-L", "2M", "-n", "tdata_hold", VG, &lb.0]);
    lvcreate(
        &lvm,
        &[
            "-i", "2", "-I", "64k", "-L", "4M", "-n", "str", VG, &la.0, &lb.0,
        ],
    );
    // Whatever is left of a (about 25 extents) and some of b.
    lvcreate(&lvm, &["-L", "32M", "-n", "span", VG]);
    add_thin_pool(&lvm, dir);
    let segments = lvm
        .report("lvs", "lv_name,lv_size,segtype,seg_pe_ranges,stripe_size")
        .iter()
        .map(|s| {
            let ranges = s["seg_pe_ranges"].as_str().unwrap().trim().to_string();
            let name = s["lv_name"].as_str().unwrap().to_string();
            let kind = s["segtype"].as_str().unwrap().to_string();
            (name, num(s, "lv_size"), kind, ranges, num(s, "stripe_size"))
        })
        .collect();
    let mut pvs = HashMap::new();
    for p in lvm.report("pvs", "pv_name,pe_start,pv_uuid") {
        let name = p["pv_name"].as_str().unwrap().to_string();
        let (file, base) = if name == la.0 {
            (a.clone(), part.offset)
        } else {
            (b.clone(), 0)
        };
        let uuid = p["pv_uuid"].as_str().unwrap().to_string();
        pvs.insert(name, (file, base, num(&p, "pe_start"), uuid));
    }
    let extent = num(&lvm.report("vgs", "vg_extent_size")[0], "vg_extent_size");
    Some(Setup {
        a,
        b,
        segments,
        pvs,
        extent,
        _lvm: lvm,
        _loops: (la, lb),
    })
}

/// Turns the two placeholder LVs into a thin pool's hidden data and
/// metadata LVs and adds the pool and a thin LV, through LVM's own restore.
fn add_thin_pool(lvm: &Lvm, dir: &Path) {
    let file = dir.join("vg.txt");
    let f = file.to_str().unwrap();
    lvm.cmd("vgcfgbackup", &["-f", f, VG]);
    let mut text = std::fs::read_to_string(&file).unwrap();
    for (hold, name) in [("tmeta_hold", "pool_tmeta"), ("tdata_hold", "pool_tdata")] {
        let at = text.find(&format!("{hold} {{")).unwrap();
        let rest = text[at..]
            .replacen(", \"VISIBLE\"", "", 1)
            .replacen(hold, name, 1);
        text = format!("{}{rest}", &text[..at]);
    }
    let pool = "pool {\nid = \"aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa1\"\nstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\
        flags = []\nsegment_count = 1\nsegment1 {\nstart_extent = 0\nextent_count = 2\ntype = \"thin-pool\"\n\
        metadata = \"pool_tmeta\"\npool = \"pool_tdata\"\ntransaction_id = 1\nchunk_size = 128\n\
        discards = \"passdown\"\nzero_new_blocks = 0\n}\n}\n\
        thin1 {\nid = \"aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaa2\"\nstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\
        flags = []\nsegment_count = 1\nsegment1 {\nstart_extent = 0\nextent_count = 8\ntype = \"thin\"\n\
        thin_pool = \"pool\"\ntransaction_id = 0\ndevice_id = 1\n}\n}\n";
    let at = text.find("logical_volumes {").unwrap() + "logical_volumes {".len();
    text.insert_str(at, &format!("\n{pool}"));
    std::fs::write(&file, text).unwrap();
    lvm.cmd("vgcfgrestore", &["--force", "-f", f, VG]);
}

/// Writes distinct bytes into every linear and striped LV at the places
/// LVM reports; the expected content of each LV.
fn fill(s: &Setup) -> HashMap<String, Vec<u8>> {
    let mut out: HashMap<String, Vec<u8>> = HashMap::new();
    for (seed, (lv, size, kind, ranges, stripe)) in s.segments.iter().enumerate() {
        if !matches!(kind.as_str(), "linear" | "striped") || lv.starts_with('[') {
            continue;
        }
        // "dev:first-last" per stripe.
        let stripes: Vec<(String, u64, u64)> = ranges
            .split_whitespace()
            .map(|r| {
                let (dev, pes) = r.rsplit_once(':').unwrap();
                let (a, b) = pes.split_once('-').unwrap();
                (dev.to_string(), a.parse().unwrap(), b.parse().unwrap())
            })
            .collect();
        let per = (stripes[0].2 - stripes[0].1 + 1) * s.extent;
        let data = pattern(seed as u64 + 7, per as usize * stripes.len());
        let chunk = if stripes.len() > 1 { *stripe } else { per };
        for (c, piece) in data.chunks(chunk as usize).enumerate() {
            let (dev, pe, _) = &stripes[c % stripes.len()];
            let (file, base, pe_start, _) = &s.pvs[dev];
            let row = (c / stripes.len()) as u64 * chunk;
            write_at(file, base + pe_start + pe * s.extent + row, piece);
        }
        let content = out.entry(lv.clone()).or_default();
        content.extend_from_slice(&data);
        assert!(content.len() as u64 <= *size);
    }
    out
}

#[test]
fn lvm_lvs_match_the_lvs_report_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let Some(setup) = build(dir.path()) else {
        return;
    };
    let want = fill(&setup);
    assert_eq!(want.len(), 4, "{:?}", setup.segments);
    let disks: Vec<Arc<dyn ReadBytes>> = vec![disk(&setup.a), disk(&setup.b)];
    let found = scan(&[
        ("vda".into(), disks[0].clone()),
        ("vdb".into(), disks[1].clone()),
    ]);
    assert!(found.problems.is_empty(), "{:?}", found.problems);
    let names: Vec<&str> = found.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "vda-p1",
            "vda-p2",
            "vdb-disk",
            "t--vg-lv1",
            "t--vg-my--lv",
            "t--vg-pool",
            "t--vg-span",
            "t--vg-str",
            "t--vg-thin1"
        ]
    );
    let by = |n: &str| found.volumes.iter().find(|v| v.name == n).unwrap();
    for (lv, content) in &want {
        let v = by(&format!("t--vg-{}", lv.replace('-', "--")));
        assert_eq!(v.source, Source::Lvm);
        let size = setup.segments.iter().find(|s| &s.0 == lv).unwrap().1;
        assert_eq!((v.size, content.len() as u64), (size, size), "{lv}");
        assert!(v.unreadable.is_none(), "{lv}: {:?}", v.unreadable);
        assert!(read_volume(v, &disks) == *content, "{lv}: bytes differ");
    }
    assert_eq!(by("t--vg-lv1").pieces.len(), 2, "lv1 has two segments");
    let span = by("t--vg-span");
    assert!(span.pieces.iter().any(|p| p.disk == 0) && span.pieces.iter().any(|p| p.disk == 1));
    assert_eq!(
        by("t--vg-pool").unreadable.as_deref(),
        Some("thin-pool LV: not supported")
    );
    assert_eq!(
        by("t--vg-thin1").unreadable.as_deref(),
        Some("thin LV: not supported")
    );
    assert_eq!(by("t--vg-thin1").size, 8 * setup.extent);
    // Both PVs probe as blkid sees them.
    for (name, file) in [("vda-p2", None), ("vdb-disk", Some(&setup.b))] {
        let got = probe(&VolumeBytes::new(by(name), &disks));
        assert_eq!(got.fstype.as_deref(), Some("LVM2_member"));
        assert!(
            setup.pvs.values().any(|p| Some(&p.3) == got.uuid.as_ref()),
            "{got:?}"
        );
        if let Some(f) = file {
            assert_eq!(got.uuid, blkid(f).get("UUID").cloned());
        }
    }
}

#[test]
fn lvm_lvs_on_a_missing_pv_are_listed_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let Some(setup) = build(dir.path()) else {
        return;
    };
    let want = fill(&setup);
    let disks: Vec<Arc<dyn ReadBytes>> = vec![disk(&setup.a)];
    let found = scan(&[("vda".into(), disks[0].clone())]);
    let b_uuid = &setup.pvs.values().find(|p| p.0 == setup.b).unwrap().3;
    let missing = format!("PV {b_uuid} missing");
    assert!(
        found.problems.iter().any(|p| p.contains(&missing)),
        "{:?}",
        found.problems
    );
    let by = |n: &str| found.volumes.iter().find(|v| v.name == n).unwrap();
    assert_eq!(
        by("t--vg-span").unreadable.as_deref(),
        Some(missing.as_str())
    );
    assert_eq!(
        by("t--vg-str").unreadable.as_deref(),
        Some(missing.as_str())
    );
    assert!(by("t--vg-span").pieces.is_empty());
    let lv1 = by("t--vg-lv1");
    assert!(lv1.unreadable.is_none());
    assert!(read_volume(lv1, &disks) == want["lv1"]);
}

#[test]
fn lvm_duplicate_pvs_use_the_first_copy_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let Some(setup) = build(dir.path()) else {
        return;
    };
    let want = fill(&setup);
    let copy = dir.path().join("b-copy.img");
    std::fs::copy(&setup.b, &copy).unwrap();
    let disks = [disk(&setup.a), disk(&setup.b), disk(&copy)];
    let named: Vec<(String, Arc<dyn ReadBytes>)> = ["vda", "vdb", "vdc"]
        .iter()
        .map(|n| n.to_string())
        .zip(disks.iter().cloned())
        .collect();
    let found = scan(&named);
    assert_eq!(found.problems.len(), 1, "{:?}", found.problems);
    assert!(
        found.problems[0].starts_with("vdc-disk: PV ")
            && found.problems[0].ends_with("using vdb-disk")
    );
    let span = found
        .volumes
        .iter()
        .find(|v| v.name == "t--vg-span")
        .unwrap();
    assert!(span.pieces.iter().all(|p| p.disk != 2));
    assert!(read_volume(span, &disks) == want["span"]);
}

/// (offset, size, area size) of the current text of the metadata area at 4096.
fn raw_locn(file: &Path) -> (u64, u64, u64) {
    let b = std::fs::read(file).unwrap();
    let le = |at: usize| u64::from_le_bytes(b[4096 + at..4096 + at + 8].try_into().unwrap());
    (le(40), le(48), le(32))
}

#[test]
fn lvm_metadata_text_wrapping_round_the_circular_buffer_is_read() {
    if !have(&["pvcreate", "losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "w.img", 16);
    let lo = Loop::new(&img, &[]);
    let lvm = Lvm::new("wrapvg", &[&lo]);
    // The smallest metadata area LVM makes (32 KiB), so a few updates wrap.
    lvm.cmd(
        "pvcreate",
        &[
            "-y",
            "--metadatasize",
            "32k",
            "--dataalignment",
            "64k",
            &lo.0,
        ],
    );
    lvm.cmd("vgcreate", &["-s", "64k", "wrapvg", &lo.0]);
    let mut wrapped = false;
    for i in 0..80 {
        lvcreate(
            &lvm,
            &[
                "-L",
                "64k",
                "-n",
                &format!("volume_with_a_long_name_{i}"),
                "wrapvg",
            ],
        );
        let (offset, size, area) = raw_locn(&img);
        if offset + size > area {
            wrapped = true;
            break;
        }
    }
    assert!(
        wrapped,
        "the metadata text never straddled the end of its area"
    );
    let want: Vec<String> = lvm
        .report("lvs", "lv_name")
        .iter()
        .map(|l| format!("wrapvg-{}", l["lv_name"].as_str().unwrap()))
        .collect();
    let found = scan(&[("vda".into(), disk(&img))]);
    assert!(found.problems.is_empty(), "{:?}", found.problems);
    let mut got: Vec<String> = found.volumes[1..].iter().map(|v| v.name.clone()).collect();
    let mut want = want;
    got.sort();
    want.sort();
    assert_eq!(got, want);
}
