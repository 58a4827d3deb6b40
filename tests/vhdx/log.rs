//! Metadata logs left unapplied, read as QEMU reads them after its own
//! replay (`qemu-img check -r all` on a copy, then `convert`): one made by
//! killing a `qemu-io` write session (QEMU puts every BAT update through
//! the log), and ones built from the spec (sequences, zero descriptors, a
//! stale entry of another log GUID, a broken checksum, a log that wraps
//! onto itself). Reading never changes the file; a replay into the file
//! (what a read-write open does under the write lock) leaves a file
//! `qemu-img check` finds clean.

use super::spec::{self, Vhdx, MIB};
use super::*;
use snaptree::image::vhdx::{driver, header, log as vlog};
use std::time::Duration;

/// How many entries a pending log of `img` replays (`None`: nothing).
fn pending(img: &Path) -> Option<usize> {
    let f = fs::File::open(img).unwrap();
    let h = header::read_current(&f, img).unwrap();
    let len = f.metadata().unwrap().len();
    vlog::find(&f, img, &h, len).unwrap().map(|r| r.entries)
}

/// QEMU's reading of `name` after its own replay, on a copy.
fn qemu_after_replay(d: &Path, name: &str) -> Vec<u8> {
    let copy = format!("{name}.qemu-replayed.vhdx");
    fs::copy(d.join(name), d.join(&copy)).unwrap();
    qemu_img(d, ["check", "-r", "all", "-f", "vhdx", &copy]);
    fs::read(qemu_raw(d, &copy)).unwrap()
}

/// snaptree's reading of `name` (read-only, replay in memory); the file
/// must not change.
fn ours(d: &Path, name: &str) -> Vec<u8> {
    let before = fs::read(d.join(name)).unwrap();
    let got = fs::read(snaptree_raw(&d.join(name))).unwrap();
    assert!(
        fs::read(d.join(name)).unwrap() == before,
        "{name}: reading changed the file"
    );
    got
}

fn same(want: &[u8], got: &[u8], what: &str) {
    if let Some(d) = diff_bytes(want, got) {
        panic!("{what}:\n{d}");
    }
}

/// Whether reading `name` with its log GUID cleared (what a reader that
/// ignored the log would read) differs from `replayed`: if not, the log
/// was already applied in place and a test of it proves nothing.
fn replay_matters(d: &Path, name: &str, replayed: &[u8]) -> bool {
    let mut v = Vhdx::load(&d.join(name));
    v.edit_header(|h| h[48..64].fill(0));
    let plain = format!("{name}.nolog.vhdx");
    v.save(&d.join(&plain));
    ours(d, &plain) != replayed
}

/// Replays into a copy of `name` as a read-write open does; QEMU must find
/// the result clean and read it as before.
fn assert_file_replay(d: &Path, name: &str, want: &[u8]) {
    let copy = d.join(format!("{name}.ours-replayed.vhdx"));
    fs::copy(d.join(name), &copy).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&copy)
        .unwrap();
    let n = driver::replay_into_file(&f, &copy).unwrap();
    assert!(n.is_some_and(|n| n > 0), "{name}: nothing replayed");
    drop(f);
    assert_eq!(
        pending(&copy),
        None,
        "{name}: log still pending after replay"
    );
    qemu_img(d, ["check", "-f", "vhdx", copy.to_str().unwrap()]);
    same(
        want,
        &fs::read(qemu_raw(d, copy.file_name().unwrap().to_str().unwrap())).unwrap(),
        "after our replay into the file",
    );
}

#[test]
fn killed_qemu_io_session_leaves_a_log_read_like_qemu() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let cmds: Vec<String> = (0..200)
        .map(|i| write(0x40 + (i % 64) as u8, i * MIB + 512, 4096))
        .collect();
    for attempt in 0..60u64 {
        let _ = fs::remove_file(d.join("k.vhdx"));
        create(d, "k.vhdx", 256 * MIB, "block_size=1M");
        let mut cmd = Command::new("qemu-io");
        cmd.current_dir(d).args(["-f", "vhdx"]);
        for c in &cmds {
            cmd.arg("-c").arg(c);
        }
        let mut child = cmd
            .arg("k.vhdx")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io");
        std::thread::sleep(Duration::from_millis(30 + (attempt * 37) % 400));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if pending(&d.join("k.vhdx")).is_none() {
            continue;
        }
        let want = qemu_after_replay(d, "k.vhdx");
        same(
            &want,
            &ours(d, "k.vhdx"),
            "killed session: snaptree vs QEMU's replay",
        );
        if !replay_matters(d, "k.vhdx", &want) {
            continue; // killed after the update reached its place
        }
        assert_file_replay(d, "k.vhdx", &want);
        return;
    }
    panic!("60 killed qemu-io sessions left no log with updates still to replay");
}

/// A qemu-img image with block 0 written; its BAT's first sector.
fn base(d: &Path, name: &str) -> (Vhdx, u64, Vec<u8>) {
    create(d, name, 16 * MIB, "block_size=1M");
    qemu_io(d, name, &[write(0x5a, 0, MIB), write(0x6b, 5 * MIB, MIB)]);
    let v = Vhdx::load(&d.join(name));
    let bat = v.region(&spec::BAT).0;
    let sector = v.b[bat as usize..bat as usize + 4096].to_vec();
    (v, bat, sector)
}

#[test]
fn log_built_from_the_spec_replays_like_qemu() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let (mut v, bat, s) = base(d, "s.vhdx");
    let b0 = spec::u64_at(&s, 0);
    let g = [0x42; 16];
    // Entry 7: block 3 points at block 0's data. Entry 8 (next): also
    // block 5 becomes ZERO, and the first 4 KiB of block 0's data are
    // zeroed by a zero descriptor. A stale entry of another GUID and an
    // older sequence sit elsewhere in the log.
    let mut s7 = s.clone();
    s7[24..32].copy_from_slice(&b0.to_le_bytes());
    let mut s8 = s7.clone();
    s8[40..48].copy_from_slice(&2u64.to_le_bytes());
    let used = v.log_entry(g, 7, 0, &[(bat, s7)], &[]);
    v.log_entry(g, 8, used, &[(bat, s8)], &[(b0 & !0xfffff, 4096)]);
    v.log_entry([0x43; 16], 99, 40, &[(bat, vec![0xee; 4096])], &[]);
    v.log_entry(g, 3, 60, &[(bat, vec![0xdd; 4096])], &[]);
    v.edit_header(|h| h[48..64].copy_from_slice(&g));
    v.save(&d.join("s.vhdx"));
    assert_eq!(pending(&d.join("s.vhdx")), Some(2));
    let want = qemu_after_replay(d, "s.vhdx");
    same(
        &want,
        &ours(d, "s.vhdx"),
        "spec-built log: snaptree vs QEMU's replay",
    );
    assert!(
        replay_matters(d, "s.vhdx", &want),
        "the log changes nothing"
    );
    assert_file_replay(d, "s.vhdx", &want);

    // A broken checksum: the entry is not valid, nothing is replayed, and
    // both read the file as it is.
    let (mut v, bat, s) = base(d, "crc.vhdx");
    let mut s2 = s.clone();
    s2[24..32].copy_from_slice(&spec::u64_at(&s, 0).to_le_bytes());
    v.log_entry(g, 1, 0, &[(bat, s2)], &[]);
    let (log_at, _) = v.log_region();
    v.b[log_at as usize + 4096 + 100] ^= 1;
    v.save(&d.join("crc.vhdx"));
    assert_eq!(pending(&d.join("crc.vhdx")), None);
    same(
        &qemu_after_replay(d, "crc.vhdx"),
        &ours(d, "crc.vhdx"),
        "bad checksum",
    );
}

/// QEMU's own search never ends on this log (it does not check that
/// sequence numbers follow on), so the judge is the file read by QEMU
/// before the log was added, with the one replayed zero sector.
#[test]
fn a_log_that_fills_and_wraps_onto_itself_ends() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let (mut v, _, _) = base(d, "w.vhdx");
    let mut want = fs::read(qemu_raw(d, "w.vhdx")).unwrap();
    let (_, log_len) = v.log_region();
    let g = [0x44; 16];
    // One-sector entries (a zero descriptor each) with consecutive
    // sequence numbers in every sector of the buffer: a sequence with no
    // start that goes round and round. Each zeroes the first 4 KiB of
    // block 5's data.
    let target = spec::u64_at(&v.b, v.region(&spec::BAT).0 as usize + 5 * 8) & !0xfffff;
    for i in 0..log_len / 4096 {
        v.log_entry(g, 1000 + i, i, &[], &[(target, 4096)]);
    }
    v.save(&d.join("w.vhdx"));
    assert_eq!(pending(&d.join("w.vhdx")), Some((log_len / 4096) as usize));
    want[5 * MIB as usize..5 * MIB as usize + 4096].fill(0);
    same(&want, &ours(d, "w.vhdx"), "full log");
}

/// Review finding 3: an entry numbered 2^64 - 1 followed by another valid
/// entry made the search add 1 to it (a panic; a wrap in release). It has
/// no successor, so it ends its sequence: that entry alone is the active
/// sequence (the highest head), read as if written in place.
#[test]
fn a_log_entry_numbered_u64_max_ends_its_sequence() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let (mut v, bat, s) = base(d, "max.vhdx");
    let mut s2 = s.clone();
    s2[24..32].copy_from_slice(&spec::u64_at(&s, 0).to_le_bytes());
    // What the entry writes, put in place by hand: QEMU's reading of it.
    let mut placed = Vhdx { b: v.b.clone() };
    placed.b[bat as usize..bat as usize + 4096].copy_from_slice(&s2);
    placed.save(&d.join("placed.vhdx"));
    let want = fs::read(qemu_raw(d, "placed.vhdx")).unwrap();
    let g = [0x45; 16];
    let used = v.log_entry(g, u64::MAX, 0, &[(bat, s2)], &[]);
    v.log_entry(g, 5, used, &[(bat, vec![0xdd; 4096])], &[]);
    v.save(&d.join("max.vhdx"));
    assert_eq!(pending(&d.join("max.vhdx")), Some(1));
    same(&want, &ours(d, "max.vhdx"), "entry u64::MAX replayed alone");
    assert!(
        replay_matters(d, "max.vhdx", &want),
        "the log changes nothing"
    );
}

/// Review finding 4: the cap on zeroed bytes was per entry, and every
/// zeroed 4 KiB became a record (twice), so 64 entries took 885 MB. The
/// cap is now on the whole sequence (a named error beyond it) and zeroed
/// ranges stay ranges: two entries of 1 GiB each are refused; before,
/// they were accepted as 2^19 records.
#[test]
fn zero_descriptors_are_capped_over_the_whole_sequence() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let (mut v, _, _) = base(d, "zz.vhdx");
    let g = [0x46; 16];
    let far = 64 << 30;
    let used = v.log_entry(g, 1, 0, &[], &[(far, 1 << 30)]);
    v.log_entry(g, 2, used, &[], &[(far + (1 << 30), 1 << 30)]);
    let img = d.join("zz.vhdx");
    v.save(&img);
    let f = fs::File::open(&img).unwrap();
    let h = header::read_current(&f, &img).unwrap();
    let err = vlog::find(&f, &img, &h, v.b.len() as u64)
        .expect_err("the sequence refused")
        .to_string();
    assert!(
        err.contains("zz.vhdx") && err.contains("snaptree replays at most"),
        "{err}"
    );
}
