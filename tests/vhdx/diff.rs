//! Differencing VHDX (AVHDX) read through its parent: qemu-img cannot make
//! one (QEMU refuses has-parent), so a child is edited from a fresh qemu-img
//! image (`spec`): has-parent, a parent locator, and blocks in every
//! state: fully present, partially present with a sector bitmap, zero,
//! unmapped, not present. The expected disk is the parent's (by qemu-img)
//! with the child's sectors laid over it; libvhdi's `vhdimount` must read
//! the same.

use super::spec::{self, Vhdx, MIB};
use super::*;

const SIZE: u64 = 16 * MIB;
const SECTOR: u64 = 512;
/// Sectors of block 1 the child's bitmap marks present.
const PRESENT: [(u64, u64); 3] = [(0, 8), (100, 101), (2000, 2048)];

fn fill(seed: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// The parent made by qemu-img and written by qemu-io; its flat bytes.
fn parent(d: &Path) -> Vec<u8> {
    create(d, "base.vhdx", SIZE, "block_size=1M");
    let w: Vec<String> = (0..6)
        .map(|i| write(0x10 + i as u8, i * MIB + 4096, MIB))
        .collect();
    qemu_io(d, "base.vhdx", &w);
    fs::read(qemu_raw(d, "base.vhdx")).unwrap()
}

/// Locator pairs naming `rel` (and Windows paths to `base.vhdx`), linked to
/// `linkage`.
fn pairs(rel: &str, linkage: &[u8; 16]) -> Vec<(&'static str, String)> {
    vec![
        ("parent_linkage", spec::guid_text(linkage)),
        ("relative_path", rel.to_string()),
        (
            "volume_path",
            "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\VMs\\base.vhdx".into(),
        ),
        ("absolute_win32_path", "C:\\VMs\\base.vhdx".into()),
    ]
}

/// Makes `name` a child with `pairs`, its blocks in every state; returns
/// the expected flat disk given the parent's.
fn child(d: &Path, name: &str, pairs: &[(&str, String)], base: &[u8]) -> Vec<u8> {
    create(d, name, SIZE, "block_size=1M");
    let mut v = Vhdx::load(&d.join(name));
    v.make_differencing(pairs);
    let cr = (1u64 << 23) * SECTOR / MIB;
    let mut want = base.to_vec();
    // Block 0 fully present.
    let a = fill(0xa0, MIB);
    let at = v.append(&a, MIB);
    v.set_bat(0, at | 6);
    want[..MIB as usize].copy_from_slice(&a);
    // Block 1 partially present: only the bitmap's sectors show.
    let b = fill(0xb0, MIB);
    let at = v.append(&b, MIB);
    v.set_bat(1, at | 7);
    let mut bits = vec![0u8; MIB as usize];
    for (s, e) in PRESENT {
        for i in s..e {
            let bit = (MIB / SECTOR) + i; // block 1's bits follow block 0's
            bits[(bit / 8) as usize] |= 1 << (bit % 8);
            let g = (MIB + i * SECTOR) as usize;
            want[g..g + SECTOR as usize]
                .copy_from_slice(&b[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize]);
        }
    }
    let at = v.append(&bits, MIB);
    v.set_bat(cr, at | 6);
    // Block 2 zero, block 3 unmapped: zeros whatever the parent says.
    v.set_bat(2, 2);
    v.set_bat(3, 3);
    want[2 * MIB as usize..4 * MIB as usize].fill(0);
    v.save(&d.join(name));
    want
}

fn vhdimount_reads(d: &Path, img: &Path, want: &[u8]) {
    if !vhd_peers::libvhdi_tool("vhdimount") {
        return skip("vhdimount is not installed (apt-get install libvhdi-utils)");
    }
    vhd_peers::vhdiinfo(img).unwrap_or_else(|e| panic!("{e}"));
    let m = vhd_peers::VhdiMount::new(img, &d.join("vhdimnt")).unwrap_or_else(|e| panic!("{e}"));
    let got = fs::read(m.last_view()).expect("read vhdimount view");
    if let Some(diff) = diff_bytes(want, &got) {
        panic!(
            "vhdimount of {} differs from the model:\n{diff}",
            img.display()
        );
    }
}

#[test]
fn differencing_child_reads_through_its_parent() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let base = parent(d);
    let link = Vhdx::load(&d.join("base.vhdx")).data_write_guid();
    let want = child(d, "child.avhdx", &pairs(".\\base.vhdx", &link), &base);
    let got = chain_bytes(&d.join("child.avhdx")).unwrap_or_else(|e| panic!("{e}"));
    assert_same(&want, &got, "child.avhdx");
    assert_same_bytes_file(&want, &snaptree_raw(&d.join("child.avhdx")));
    let info = snaptree_info(&d.join("child.avhdx"));
    assert_eq!(info["chain"].as_array().map(|c| c.len()), Some(2), "{info}");
    // libvhdi (20210425) reads a differencing disk's ZERO and UNMAPPED
    // blocks from the parent; MS-VHDX defines ZERO blocks as zeros, which
    // snaptree (and QEMU, for any VHDX) follows. Elsewhere they must agree.
    let mut libvhdi = want.clone();
    libvhdi[2 * MIB as usize..4 * MIB as usize]
        .copy_from_slice(&base[2 * MIB as usize..4 * MIB as usize]);
    vhdimount_reads(d, &d.join("child.avhdx"), &libvhdi);

    // relative_path names nothing: the Windows paths' file name is tried
    // beside the child.
    let want = child(d, "c2.avhdx", &pairs("..\\gone\\base.vhdx", &link), &base);
    assert_same(
        &want,
        &chain_bytes(&d.join("c2.avhdx")).unwrap(),
        "c2.avhdx",
    );
}

fn assert_same_bytes_file(want: &[u8], file: &Path) {
    assert_same(
        want,
        &fs::read(file).expect("read export"),
        &file.display().to_string(),
    );
}

fn assert_same(want: &[u8], got: &[u8], what: &str) {
    if let Some(diff) = diff_bytes(want, got) {
        panic!("{what}:\n{diff}");
    }
}

#[test]
fn parent_linkage_is_checked_and_loops_end() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let base = parent(d);
    let link = Vhdx::load(&d.join("base.vhdx")).data_write_guid();
    let mut other = link;
    other[0] ^= 0xff;
    child(d, "bad.avhdx", &pairs("base.vhdx", &other), &base);
    let err = chain_bytes(&d.join("bad.avhdx")).unwrap_err();
    assert!(
        err.contains("parent linkage mismatch") && err.contains("bad.avhdx"),
        "{err}"
    );
    // parent_linkage2 may carry the parent's GUID instead.
    let mut p = pairs("base.vhdx", &other);
    p.push(("parent_linkage2", spec::guid_text(&link)));
    let want = child(d, "alt.avhdx", &p, &base);
    assert_same(
        &want,
        &chain_bytes(&d.join("alt.avhdx")).unwrap(),
        "alt.avhdx",
    );

    // A child naming itself, and two children naming each other.
    create(d, "self.avhdx", SIZE, "block_size=1M");
    let own = Vhdx::load(&d.join("self.avhdx")).data_write_guid();
    let mut v = Vhdx::load(&d.join("self.avhdx"));
    v.make_differencing(&pairs("self.avhdx", &own));
    v.save(&d.join("self.avhdx"));
    let err = chain_bytes(&d.join("self.avhdx")).unwrap_err();
    assert!(
        err.contains("self.avhdx") && err.contains("backing chain loops"),
        "{err}"
    );
    create(d, "x.avhdx", SIZE, "block_size=1M");
    create(d, "y.avhdx", SIZE, "block_size=1M");
    let (gx, gy) = (
        Vhdx::load(&d.join("x.avhdx")).data_write_guid(),
        Vhdx::load(&d.join("y.avhdx")).data_write_guid(),
    );
    for (name, to, g) in [("x.avhdx", "y.avhdx", gy), ("y.avhdx", "x.avhdx", gx)] {
        let mut v = Vhdx::load(&d.join(name));
        v.make_differencing(&pairs(to, &g));
        v.save(&d.join(name));
    }
    let err = chain_bytes(&d.join("x.avhdx")).unwrap_err();
    assert!(
        err.contains("x.avhdx") && err.contains("backing chain loops"),
        "{err}"
    );
}
