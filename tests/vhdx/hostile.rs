//! Hostile VHDX files: each damaged structure gives a named error (the
//! file, the offset, what is wrong), never a panic or a hang, and reading
//! changes nothing. Then random byte flips over every structure the
//! reader parses (headers, region tables, metadata table and items, BAT,
//! log), `SNAPTREE_FUZZ_ITERS` of them (default 300), read in memory.

use super::spec::{self, Vhdx, MIB};
use super::*;
use snaptree::image::vhdx::{driver, VhdxLayer};
use snaptree::image::ReadMap;
use snaptree::storage::MemStorage;

/// `snaptree info` and `export` must fail with status 1, naming the file
/// and `needle`; the file must not change.
fn refused(d: &Path, name: &str, v: &Vhdx, needle: &str) {
    let img = d.join(name);
    v.save(&img);
    for sub in ["info", "export"] {
        let out_file = d.join(format!("{name}.out"));
        let mut cmd = if sub == "info" {
            snaptree_cmd(args!["info", img])
        } else {
            snaptree_cmd(args!["export", "--quiet", "--force", img, out_file])
        };
        let out = run_unchecked(&mut cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            describe_output(&cmd, &out)
        );
        assert!(
            err.contains(name) && err.contains(needle),
            "wanted {needle:?}:\n{}",
            describe_output(&cmd, &out)
        );
    }
    assert!(fs::read(&img).unwrap() == v.b, "{name}: changed by reading");
}

/// Payload state 5 is VHDX 0.95's "unmapped": QEMU reads the block as
/// zeros (`PAYLOAD_BLOCK_UNMAPPED_v095`) even though its entry still
/// names data, and so must snaptree.
#[test]
fn unmapped_v095_block_reads_zeros_like_qemu() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    create(d, "v095.vhdx", 16 * MIB, "block_size=1M");
    qemu_io(d, "v095.vhdx", &[write(0x21, 0, 3 * MIB)]);
    let mut v = Vhdx::load(&d.join("v095.vhdx"));
    let e = v.bat(1);
    assert_eq!(e & 7, 6, "qemu-io left block 1 fully present");
    v.set_bat(1, e & !7 | 5);
    v.save(&d.join("v095.vhdx"));
    let want = fs::read(qemu_raw(d, "v095.vhdx")).unwrap();
    assert!(want[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(want[..MIB as usize].iter().all(|&b| b == 0x21));
    let got = fs::read(snaptree_raw(&d.join("v095.vhdx"))).unwrap();
    assert!(got == want, "state 5 block: snaptree differs from QEMU");
}

#[test]
fn damaged_structures_give_named_errors() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    create(d, "good.vhdx", 16 * MIB, "block_size=1M");
    qemu_io(d, "good.vhdx", &[write(0x21, 0, 3 * MIB)]);
    let good = Vhdx::load(&d.join("good.vhdx"));
    let bat = good.region(&spec::BAT);
    let meta = good.region(&spec::METADATA);

    let mut v = Vhdx { b: good.b.clone() };
    v.b[65536 + 200] ^= 1;
    v.b[131072 + 200] ^= 1;
    refused(d, "headers.vhdx", &v, "both VHDX headers are bad");

    let mut v = Vhdx { b: good.b.clone() };
    v.b[196_608 + 100] ^= 1;
    v.b[262_144 + 100] ^= 1;
    refused(d, "regions.vhdx", &v, "CRC-32C mismatch");

    let mut v = Vhdx { b: good.b.clone() };
    v.set_region(&spec::METADATA, bat.0, meta.1 as u32);
    refused(d, "overlap.vhdx", &v, "overlaps");

    let mut v = Vhdx { b: good.b.clone() };
    v.add_region(&[9; 16], 8 * MIB, MIB as u32, true);
    refused(d, "unknown.vhdx", &v, "unknown required region");

    let mut v = Vhdx { b: good.b.clone() };
    v.set_bat(1, (64 * MIB) | 6);
    refused(d, "pasteof.vhdx", &v, "outside the file");

    let mut v = Vhdx { b: good.b.clone() };
    v.set_bat(1, meta.0 | 6);
    refused(d, "onmeta.vhdx", &v, "overlapping the metadata region");

    let mut v = Vhdx { b: good.b.clone() };
    v.set_bat(1, spec::u64_at(&good.b, bat.0 as usize) & !7 | 4);
    refused(d, "state.vhdx", &v, "state 4");

    let mut v = Vhdx { b: good.b.clone() };
    let (fp, _) = v.item(&spec::FILE_PARAMETERS).unwrap();
    v.b[fp..fp + 4].copy_from_slice(&(3 * MIB as u32).to_le_bytes());
    refused(d, "blocksize.vhdx", &v, "not a power of two");

    let mut v = Vhdx { b: good.b.clone() };
    v.add_item(&[7; 16], &[0; 8], 4);
    refused(d, "item.vhdx", &v, "unknown required item");

    let mut v = Vhdx { b: good.b.clone() };
    v.set_logical_sector(1024);
    refused(d, "sector.vhdx", &v, "neither 512 nor 4096");

    // A log entry written to a longer file than this one: truncated.
    let mut v = Vhdx { b: good.b.clone() };
    let sector = v.b[bat.0 as usize..bat.0 as usize + 4096].to_vec();
    v.log_entry([5; 16], 1, 0, &[(bat.0, sector)], &[]);
    let (log_at, _) = v.log_region();
    let big = (1u64 << 40).to_le_bytes();
    v.b[log_at as usize + 48..log_at as usize + 56].copy_from_slice(&big);
    v.b[log_at as usize + 4..log_at as usize + 8].fill(0);
    let entry_len = 8192;
    let c = spec::crc32c(&v.b[log_at as usize..log_at as usize + entry_len]);
    v.b[log_at as usize + 4..log_at as usize + 8].copy_from_slice(&c.to_le_bytes());
    refused(d, "truncated.vhdx", &v, "truncated?");
}

/// Opens `bytes` in memory, maps and reads all of it, and replays its log
/// into the (memory) file; any error is fine, a panic is not.
fn exercise(bytes: Vec<u8>) {
    let p = Path::new("fuzz.vhdx");
    if let Ok(l) = VhdxLayer::open(p, Box::new(MemStorage::from_bytes(bytes.clone()))) {
        let size = l.virtual_size();
        if let Ok(map) = l.map(0, size) {
            let mut buf = vec![0u8; 64 * 1024];
            for e in map.iter().take(64) {
                if let snaptree::image::Mapping::Data { host } = e.mapping {
                    let n = e.len.min(buf.len() as u64) as usize;
                    let _ = l.read_host(host, &mut buf[..n]);
                }
            }
        }
        let _ = l.info();
        let _ = l.allocated_bytes();
    }
    let _ = driver::replay_into_file(&MemStorage::from_bytes(bytes), p);
}

#[test]
fn byte_flips_never_panic() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    create(d, "f.vhdx", 8 * MIB, "block_size=1M");
    qemu_io(
        d,
        "f.vhdx",
        &[write(0x21, 0, 2 * MIB), write(0x22, 5 * MIB, 4096)],
    );
    let mut v = Vhdx::load(&d.join("f.vhdx"));
    let (bat, _) = v.region(&spec::BAT);
    let (meta, _) = v.region(&spec::METADATA);
    let sector = v.b[bat as usize..bat as usize + 4096].to_vec();
    v.log_entry([5; 16], 1, 0, &[(bat, sector)], &[(6 * MIB, 8192)]);
    v.b.resize(v.b.len().max(7 * MIB as usize), 0);
    let (log, _) = v.log_region();
    let (lp, ll) = v.item(&spec::FILE_PARAMETERS).unwrap();
    // (start, length) of every parsed structure.
    let targets = [
        (0u64, 64u64),
        (65536, 4096),
        (131_072, 4096),
        (196_608, 512),
        (262_144, 512),
        (meta, 512),
        (lp as u64, ll as u64 + 64),
        (bat, 128),
        (log, 8192),
    ];
    let iters: u64 = std::env::var("SNAPTREE_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let clean = VhdxLayer::open(
        Path::new("f.vhdx"),
        Box::new(MemStorage::from_bytes(v.b.clone())),
    );
    assert_eq!(
        clean.expect("the unflipped image opens").replayed_entries(),
        1
    );
    exercise(v.b.clone());
    for _ in 0..iters {
        let mut b = v.b.clone();
        for _ in 0..1 + next() % 4 {
            let (s, l) = targets[(next() % targets.len() as u64) as usize];
            let at = (s + next() % l) as usize;
            b[at] ^= 1 << (next() % 8);
            if next() % 3 == 0 {
                b[at] = 0xff;
            }
        }
        exercise(b);
    }
}
