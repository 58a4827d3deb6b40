//! ESXi snapshot deltas: vmfsSparse (`COWD`, `-delta.vmdk`) and seSparse
//! (`-sesparse.vmdk`). No tool here makes them, so they are built by hand
//! from the layouts QEMU's vmdk driver reads (`vmdk_open_vmfs_sparse`,
//! `vmdk_open_se_sparse`, and `VMFSSPARSE`/`SESPARSE` extent lines), as
//! deltas over an ESXi-style `vmfs` base whose `-flat.vmdk` qemu-io
//! wrote. Each must read like `qemu-img convert -O raw` (and like the
//! bytes put in), and `snaptree map` must agree with `qemu-img map`.
//!
//! Cases: COWD grains over the parent, grains in a second grain table, a
//! grain table that is absent, unallocated grains falling through, a
//! COWD file behind a `SPARSE` line (QEMU takes either header on either
//! line); seSparse allocated grains (one numbered past 4095, so both
//! halves of the split grain number matter), zero and unmapped grains
//! hiding the parent, unallocated grains, an absent grain table; and
//! refusals: a dirty seSparse journal, a wrong version, a COWD grain
//! table past the end, a capacity that disagrees with the extent line.

#[macro_use]
mod common;

use common::qio::write;
use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;
use tempfile::TempDir;

const GRAIN: u64 = 4096;

/// An ESXi-style base: `base.vmdk` (createType vmfs) on `base-flat.vmdk`,
/// written by qemu-io; returns its CID.
fn vmfs_base(dir: &Path, size: u64) -> u32 {
    qemu_img(
        dir,
        [
            "create",
            "-q",
            "-f",
            "raw",
            "base-flat.vmdk",
            &size.to_string(),
        ],
    );
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", "raw"]);
    for w in [write(0x11, 0, size), write(0x12, 5000, 70000)] {
        c.arg("-c").arg(w);
    }
    run(c.arg("base-flat.vmdk"));
    let cid = 0x1234_5678;
    fs::write(
        dir.join("base.vmdk"),
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\nparentCID=ffffffff\n\
             isNativeSnapshot=\"no\"\ncreateType=\"vmfs\"\n\n# Extent description\n\
             RW {} VMFS \"base-flat.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n",
            size / 512
        ),
    )
    .unwrap();
    cid
}

fn delta_descriptor(
    dir: &Path,
    name: &str,
    kind: &str,
    line: &str,
    file: &str,
    size: u64,
    parent_cid: u32,
) {
    fs::write(
        dir.join(name),
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fedcba98\nparentCID={parent_cid:08x}\n\
             isNativeSnapshot=\"no\"\ncreateType=\"{kind}\"\nparentFileNameHint=\"base.vmdk\"\n\
             # Extent description\nRW {} {line} \"{file}\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.longContentID = \"00112233445566778899aabbfedcba98\"\n",
            size / 512
        ),
    )
    .unwrap();
}

fn put32(b: &mut Vec<u8>, at: u64, v: u32) {
    let at = at as usize;
    if b.len() < at + 4 {
        b.resize(at + 4, 0);
    }
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut Vec<u8>, at: u64, v: u64) {
    let at = at as usize;
    if b.len() < at + 8 {
        b.resize(at + 8, 0);
    }
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A `COWD` file of `size` bytes with `grain` bytes per grain, holding
/// `grains` (grain index, fill byte).
fn cowd(size: u64, grain: u64, grains: &[(u64, u8)]) -> Vec<u8> {
    let mut b = vec![0u8; 2048];
    b[..4].copy_from_slice(b"COWD");
    let per_gt = 4096 * grain;
    let gd_entries = size.div_ceil(per_gt);
    for (at, v) in [
        (4, 1),
        (8, 3),
        (12, size / 512),
        (16, grain / 512),
        (20, 4),
        (24, gd_entries),
    ] {
        put32(&mut b, at, v as u32);
    }
    let mut next = (2048 + gd_entries * 4).div_ceil(512) * 512;
    let mut tables = std::collections::BTreeMap::new();
    for &(g, _) in grains {
        let t = g * grain / per_gt;
        tables.entry(t).or_insert_with(|| {
            let at = next;
            next += 4096 * 4;
            at
        });
    }
    for (&t, &at) in &tables {
        put32(&mut b, 2048 + t * 4, (at / 512) as u32);
    }
    b.resize(next as usize, 0);
    for &(g, fill) in grains {
        let at = b.len() as u64;
        b.extend(vec![fill; grain as usize]);
        let t = tables[&(g * grain / per_gt)];
        put32(&mut b, t + (g % 4096) * 4, (at / 512) as u32);
    }
    b
}

/// What the delta reads: the parent, with `grains` filled in (`None`:
/// zeros).
fn expected(dir: &Path, grain: u64, grains: &[(u64, Option<u8>)]) -> Vec<u8> {
    let mut want = fs::read(dir.join("base-flat.vmdk")).unwrap();
    for &(g, fill) in grains {
        let s = (g * grain) as usize;
        want[s..s + grain as usize].fill(fill.unwrap_or(0));
    }
    want
}

fn judge(dir: &Path, name: &str, want: &[u8]) {
    let img = dir.join(name);
    let q = dir.join("q.raw");
    qemu_img(dir, args!["convert", "-f", "vmdk", "-O", "raw", name, &q]);
    assert!(
        fs::read(&q).unwrap() == want,
        "{name}: qemu-img convert differs from what was put in"
    );
    let ours = dir.join("s.raw");
    snaptree(args!["export", "--quiet", "--force", &img, &ours]);
    assert_same_file(&q, &ours);
    let size = want.len() as u64;
    let parse = |out: std::process::Output| {
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        extents(&parse_map(&json).unwrap(), size).unwrap_or_else(|e| panic!("{e}\n{json}"))
    };
    let theirs = parse(qemu_img(dir, ["map", "--output=json", "-f", "vmdk", name]));
    let mine = parse(snaptree(args!["map", "--output", "json", &img]));
    let m = diff_extents(&theirs, &mine);
    assert!(
        m.is_empty(),
        "{name}: map differs from qemu-img's:\n{}",
        format_mismatches(&m)
    );
}

#[test]
fn vmfs_sparse_cowd_deltas() {
    require_qemu!();
    let d = TempDir::with_prefix("snaptree-vmdk-esx-").unwrap();
    let dir = d.path();
    let size = 48 * MIB;
    let cid = vmfs_base(dir, size);
    // 16 MiB per grain table with 4 KiB grains: grains in tables 0 and 2,
    // none in table 1.
    let grains = [(0, 0x21), (1, 0x22), (5, 0x23), (8192 + 7, 0x24)];
    fs::write(
        dir.join("base-000001-delta.vmdk"),
        cowd(size, GRAIN, &grains),
    )
    .unwrap();
    delta_descriptor(
        dir,
        "base-000001.vmdk",
        "vmfsSparse",
        "VMFSSPARSE",
        "base-000001-delta.vmdk",
        size,
        cid,
    );
    let want = expected(dir, GRAIN, &grains.map(|(g, f)| (g, Some(f))));
    judge(dir, "base-000001.vmdk", &want);
    // The same file behind a SPARSE line, with 64 KiB grains.
    let grains = [(3, 0x31), (300, 0x32)];
    fs::write(dir.join("b2-delta.vmdk"), cowd(size, 65536, &grains)).unwrap();
    delta_descriptor(
        dir,
        "b2.vmdk",
        "vmfsSparse",
        "SPARSE",
        "b2-delta.vmdk",
        size,
        cid,
    );
    judge(
        dir,
        "b2.vmdk",
        &expected(dir, 65536, &grains.map(|(g, f)| (g, Some(f)))),
    );
    // A grain table past the end of the file, and a line that disagrees
    // with the capacity, are refused naming the file.
    let mut bad = cowd(size, GRAIN, &[(0, 1)]);
    put32(&mut bad, 2048, 0x00ff_ffff);
    fs::write(dir.join("b3-delta.vmdk"), bad).unwrap();
    delta_descriptor(
        dir,
        "b3.vmdk",
        "vmfsSparse",
        "VMFSSPARSE",
        "b3-delta.vmdk",
        size,
        cid,
    );
    refused(
        dir,
        "b3.vmdk",
        "b3-delta.vmdk: corrupt image at offset 2048",
    );
    delta_descriptor(
        dir,
        "b4.vmdk",
        "vmfsSparse",
        "VMFSSPARSE",
        "b2-delta.vmdk",
        size - 512,
        cid,
    );
    refused(dir, "b4.vmdk", "holds");
}

fn refused(dir: &Path, name: &str, want: &str) {
    let out = snaptree_cmd(args!["info", dir.join(name)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{name}: {err}");
    assert!(err.contains(want), "{name}: want {want:?} in {err}");
}

/// An seSparse file of `size` bytes: `grains` are (grain index, entry)
/// where entry is `Some(fill)` for allocated data (stored at grain slot
/// `slot`), `None` for a zero grain (type 2); `unmapped` grains get type 1.
fn sesparse(size: u64, data: &[(u64, u64, u8)], zero: &[u64], unmapped: &[u64]) -> Vec<u8> {
    let per_gt = 4096 * GRAIN;
    let needed = size.div_ceil(per_gt);
    let gd_sectors = (needed * 8).div_ceil(512);
    let mut used: Vec<u64> = data
        .iter()
        .map(|d| d.0)
        .chain(zero.iter().copied())
        .chain(unmapped.iter().copied())
        .map(|g| g * GRAIN / per_gt)
        .collect();
    used.sort();
    used.dedup();
    let gd_at = 2;
    let gts_at = gd_at + gd_sectors;
    let gts_sectors = used.len() as u64 * 64;
    let grains_at = gts_at + gts_sectors;
    let slots = data.iter().map(|d| d.1 + 1).max().unwrap_or(0);
    let mut b = vec![0u8; 1024];
    let fields = [
        0xcafe_babe,
        0x0000_0002_0000_0001,
        size / 512,
        8,
        64,
        0,
        0,
        0,
        0,
        0,
        1,
        1,
        0,
        0,
        0,
        0,
        gd_at,
        gd_sectors,
        gts_at,
        gts_sectors,
        0,
        0,
        0,
        0,
        grains_at,
        slots * 8,
    ];
    for (i, v) in fields.iter().enumerate() {
        put64(&mut b, i as u64 * 8, *v);
    }
    put64(&mut b, 512, 0xcafe_cafe);
    b.resize(((grains_at + slots * 8) * 512) as usize, 0);
    for (n, t) in used.iter().enumerate() {
        put64(
            &mut b,
            gd_at * 512 + t * 8,
            0x1000_0000_0000_0000 | n as u64,
        );
    }
    let entry_at = |g: u64| {
        let n = used.iter().position(|&t| t == g * GRAIN / per_gt).unwrap() as u64;
        (gts_at + n * 64) * 512 + (g % 4096) * 8
    };
    for &(g, slot, fill) in data {
        let at = ((grains_at + slot * 8) * 512) as usize;
        b[at..at + GRAIN as usize].fill(fill);
        let v = 0x3000_0000_0000_0000 | ((slot & 0xfff) << 48) | (slot >> 12);
        put64(&mut b, entry_at(g), v);
    }
    for &g in zero {
        put64(&mut b, entry_at(g), 0x2000_0000_0000_0000);
    }
    for &g in unmapped {
        put64(&mut b, entry_at(g), 0x1000_0000_0000_0000);
    }
    b
}

#[test]
fn se_sparse_deltas() {
    require_qemu!();
    let d = TempDir::with_prefix("snaptree-vmdk-esx-").unwrap();
    let dir = d.path();
    let size = 48 * MIB;
    let cid = vmfs_base(dir, size);
    // Grain slot 4100 needs both halves of the split grain number.
    let data = [(0, 0, 0x41), (2, 4100, 0x42), (8192 + 3, 7, 0x43)];
    let zero = [1, 8192 + 4];
    let unmapped = [4];
    fs::write(
        dir.join("base-000001-sesparse.vmdk"),
        sesparse(size, &data, &zero, &unmapped),
    )
    .unwrap();
    delta_descriptor(
        dir,
        "base-000001.vmdk",
        "seSparse",
        "SESPARSE",
        "base-000001-sesparse.vmdk",
        size,
        cid,
    );
    let mut grains: Vec<(u64, Option<u8>)> = data.iter().map(|d| (d.0, Some(d.2))).collect();
    grains.extend(zero.iter().chain(&unmapped).map(|&g| (g, None)));
    judge(dir, "base-000001.vmdk", &expected(dir, GRAIN, &grains));
    // A journal to replay, a version QEMU does not know: refused.
    let good = sesparse(size, &data, &zero, &unmapped);
    let mut dirty = good.clone();
    put64(&mut dirty, 512 + 24, 1);
    fs::write(dir.join("d-sesparse.vmdk"), dirty).unwrap();
    delta_descriptor(
        dir,
        "d.vmdk",
        "seSparse",
        "SESPARSE",
        "d-sesparse.vmdk",
        size,
        cid,
    );
    refused(dir, "d.vmdk", "journal");
    let mut v = good;
    put64(&mut v, 8, 0x0000_0003_0000_0001);
    fs::write(dir.join("v-sesparse.vmdk"), v).unwrap();
    delta_descriptor(
        dir,
        "v.vmdk",
        "seSparse",
        "SESPARSE",
        "v-sesparse.vmdk",
        size,
        cid,
    );
    refused(dir, "v.vmdk", "seSparse version");
}

/// Random byte flips in the COWD and seSparse headers, directories and
/// tables: opening and reading fail cleanly or succeed, never panic
/// (`SNAPTREE_FUZZ_ITERS`, default 100 per kind).
#[test]
fn byte_flips_in_esx_deltas_never_panic() {
    let d = TempDir::with_prefix("snaptree-vmdk-esx-").unwrap();
    let dir = d.path();
    let size = 40 * MIB;
    fs::write(dir.join("base-flat.vmdk"), vec![0x11; 4096]).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(dir.join("base-flat.vmdk"))
        .unwrap()
        .set_len(size)
        .unwrap();
    fs::write(
        dir.join("base.vmdk"),
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=00000001\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\
             RW {} VMFS \"base-flat.vmdk\"\n",
            size / 512
        ),
    )
    .unwrap();
    let iters: u64 = std::env::var("SNAPTREE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let cases = [
        (
            "c-delta.vmdk",
            "VMFSSPARSE",
            cowd(size, GRAIN, &[(0, 1), (9000, 2)]),
        ),
        (
            "s-sesparse.vmdk",
            "SESPARSE",
            sesparse(size, &[(0, 0, 1), (9000, 4100, 2)], &[3], &[4]),
        ),
    ];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (file, line, good) in cases {
        delta_descriptor(dir, "child.vmdk", "vmfsSparse", line, file, size, 1);
        fs::write(dir.join(file), &good).unwrap();
        read_all(&dir.join("child.vmdk")).unwrap_or_else(|e| panic!("{file} before flips: {e}"));
        // The metadata: everything before the first grain.
        let meta = good.len().min(64 * 1024) as u64;
        let (mut opened, mut refused) = (0, 0);
        for _ in 0..iters {
            let mut b = good.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() % meta) as usize;
                b[at] ^= 1 << (next() % 8);
            }
            fs::write(dir.join(file), &b).unwrap();
            match std::panic::catch_unwind(|| read_all(&dir.join("child.vmdk"))) {
                Ok(Ok(())) => opened += 1,
                Ok(Err(_)) => refused += 1,
                Err(_) => panic!("{file}: panic on a flipped image"),
            }
        }
        note(format_args!("{file}: {opened} opened, {refused} refused"));
    }
}

fn read_all(leaf: &Path) -> Result<(), String> {
    use snaptree::chain::{Chain, OpenOptions};
    let chain = Chain::open(leaf, &OpenOptions::default()).map_err(|e| e.to_string())?;
    let size = chain.size();
    chain.map(0, size).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; size.min(8 * MIB) as usize];
    chain.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    Ok(())
}
