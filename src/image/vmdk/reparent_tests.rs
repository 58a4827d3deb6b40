//! Unit tests of `reparent`: the text edit, CID writes in one sector,
//! journaled re-pointing checked against torn and hostile writes, and a
//! descriptor file replaced by rename.

use super::*;

const TEXT: &str = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nparentFileNameHint=\"a.vmdk\"\n\n# Extent description\nRW 2048 SPARSE \"c.vmdk\"\n\nddb.adapterType = \"ide\"\n";

#[test]
fn edit_changes_the_parent_alone() {
    let t = edit_parent(TEXT.as_bytes(), 0xabcdef01, Some("long-parent-name.vmdk"));
    let s = String::from_utf8(t).unwrap();
    assert_eq!(
        s,
        TEXT.replace("parentCID=ffffffff", "parentCID=abcdef01")
            .replace("a.vmdk", "long-parent-name.vmdk")
    );
    let none = String::from_utf8(edit_parent(TEXT.as_bytes(), NO_PARENT, None)).unwrap();
    assert_eq!(none, TEXT.replace("parentFileNameHint=\"a.vmdk\"\n", ""));
    // A base gains the hint after createType, keeping CRLF endings.
    let base = "CID=1\r\ncreateType=\"monolithicSparse\"\r\nRW 8 SPARSE \"x.vmdk\"";
    let s = String::from_utf8(edit_parent(base.as_bytes(), 7, Some("p.vmdk"))).unwrap();
    assert_eq!(
        s,
        "CID=1\r\nparentCID=00000007\r\ncreateType=\"monolithicSparse\"\r\nparentFileNameHint=\"p.vmdk\"\r\nRW 8 SPARSE \"x.vmdk\""
    );
}

#[test]
fn cid_writes_stay_in_one_sector() {
    let t = b"# Disk DescriptorFile\nversion=1\nCID=c21c7fb\nparentCID=ffffffff\n\n# Extent\n";
    // Fits: padded in place.
    assert_eq!(cid_write(t, 512, 0xabc).unwrap(), (36, b"0000abc".to_vec()));
    // Wider: a blank line makes room; the text after it stays put.
    let (at, w) = cid_write(t, 512, 0xc21c7fb0).unwrap();
    let mut new = t[..at].to_vec();
    new.extend(&w);
    new.extend(&t[at + w.len()..]);
    assert_eq!(new.len(), t.len());
    let s = String::from_utf8(new).unwrap();
    assert!(
        s.contains("CID=c21c7fb0\nparentCID=ffffffff\n# Extent\n"),
        "{s}"
    );
    // No blank line, or one in another sector: refused.
    assert!(cid_write(b"CID=1\nx=1\n", 0, 0x100).is_err());
    assert!(cid_write(t, 512 - 40, 0xc21c7fb0).is_err());
}

#[test]
fn same_but_parent_sees_other_changes() {
    let p = |t: &str| descriptor::parse(Path::new("x"), 0, t.as_bytes()).unwrap();
    let a = p(TEXT);
    assert!(same_but_parent(&a, &p(&TEXT.replace("a.vmdk", "b.vmdk"))));
    assert!(!same_but_parent(
        &a,
        &p(&TEXT.replace("12345678", "12345679"))
    ));
    assert!(!same_but_parent(
        &a,
        &p(&TEXT.replace("RW 2048", "RW 4096"))
    ));
    assert!(!same_but_parent(&a, &p(&TEXT.replace("ide", "lsilogic"))));
}

/// A monolithicSparse child `c.vmdk` of `p1.vmdk` (made by
/// `create_child`), and a second parent `p2.vmdk`; both parents are
/// descriptor files (only their descriptors are read).
fn family() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for (name, cid) in [("p1.vmdk", "0000abcd"), ("p2.vmdk", "1234")] {
        let text = format!("# Disk DescriptorFile\nversion=1\nCID={cid}\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"x-flat.vmdk\" 0\n");
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let c = dir.path().join("c.vmdk");
    let like = crate::ownership::Ownership::own(0o644);
    super::super::create::create_child(&c, &dir.path().join("p1.vmdk"), "p1.vmdk", 1 << 20, &like)
        .unwrap();
    (dir, c)
}

fn to_p2(dir: &Path) -> NewBacking<'_> {
    NewBacking {
        name: "p2.vmdk",
        format: "vmdk",
        path: Some(Box::leak(dir.join("p2.vmdk").into_boxed_path())),
    }
}

fn try_desc(c: &Path) -> Option<Descriptor> {
    let f = std::fs::File::open(c).ok()?;
    let len = f.metadata().ok()?.len();
    let text = super::super::driver::descriptor_text(&f, c, len).ok()?;
    descriptor::parse(c, 0, &text).ok()
}

fn desc(c: &Path) -> Descriptor {
    let f = std::fs::File::open(c).unwrap();
    let len = f.metadata().unwrap().len();
    let text = super::super::driver::descriptor_text(&f, c, len).unwrap();
    descriptor::parse(c, 0, &text).unwrap()
}

#[test]
fn an_embedded_descriptor_is_repointed_through_checked_writes() {
    let (dir, c) = family();
    let before = desc(&c);
    let plan = plan(&c, Some(to_p2(dir.path()))).unwrap();
    let patches = plan.patches().expect("journaled").to_vec();
    check(&c, &patches).unwrap();
    // Torn: the new text's first sector only. Still checkable, and
    // applying mends it.
    let new = patches[1].bytes().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&c).unwrap();
    FileExt::write_all_at(&f, &new[..SECTOR], patches[1].offset).unwrap();
    check(&c, &patches).unwrap();
    apply(&c, &plan).unwrap();
    let after = desc(&c);
    assert!(same_but_parent(&before, &after));
    assert_eq!(
        (after.parent_cid, after.parent_hint.as_deref()),
        (0x1234, Some("p2.vmdk"))
    );
    // Applying again (recovery) changes nothing.
    apply(&c, &plan).unwrap();
    check(&c, &patches).unwrap();
}

#[test]
fn journaled_writes_that_do_more_than_repoint_are_refused() {
    let (dir, c) = family();
    let plan = plan(&c, Some(to_p2(dir.path()))).unwrap();
    let p = plan.patches().unwrap().to_vec();
    let file_before = std::fs::read(&c).unwrap();
    let text = |p: &Patch| String::from_utf8(p.bytes().unwrap()).unwrap();
    let with = |i: usize, t: String| {
        let mut q = p.clone();
        q[i] = Patch::new(q[i].offset, t.as_bytes());
        q
    };
    let cid_line = format!("CID={:08x}", desc(&c).cid);
    let bad = [
        vec![p[1].clone()],
        vec![
            p[0].clone(),
            Patch::new(p[1].offset + 512, &p[1].bytes().unwrap()),
        ],
        with(1, text(&p[1]).replace(&cid_line, "CID=00000001")),
        with(1, text(&p[1]).replace("RW 2048", "RW 1024")),
        // An "old" text that is not what the file holds.
        with(0, text(&p[0]).replace("p1.vmdk", "p3.vmdk")),
    ];
    for q in bad {
        assert!(check(&c, &q).is_err(), "{q:?}");
    }
    assert_eq!(std::fs::read(&c).unwrap(), file_before, "a check wrote");
}

#[test]
fn a_descriptor_file_is_replaced_and_a_cid_adopted() {
    let (dir, _) = family();
    let d = dir.path().join("d.vmdk");
    let text = "# Disk DescriptorFile\nversion=1\nCID=fedc\nparentCID=0000abcd\ncreateType=\"twoGbMaxExtentSparse\"\nparentFileNameHint=\"p1.vmdk\"\n\nRW 2048 SPARSE \"d-s001.vmdk\"\n";
    std::fs::write(&d, text).unwrap();
    let plan = plan(&d, Some(to_p2(dir.path()))).unwrap();
    assert!(plan.patches().is_none(), "one rename");
    apply(&d, &plan).unwrap();
    let now = std::fs::read_to_string(&d).unwrap();
    assert_eq!(
        now,
        text.replace("0000abcd", "00001234")
            .replace("p1.vmdk", "p2.vmdk")
    );
    apply(&d, &RepointPlan::OneWrite(None)).unwrap();
    let base = desc(&d);
    assert_eq!((base.parent_cid, base.parent_hint), (NO_PARENT, None));
    // CID adoption: in place, wider than the line thanks to a blank line.
    set_cid(&d, super::super::cid_id(0x89abc)).unwrap();
    assert_eq!(desc(&d).cid, 0x89abc);
    // Three more digits than blank lines: refused, nothing written.
    let held = std::fs::read(&d).unwrap();
    assert!(set_cid(&d, super::super::cid_id(0x89abcdef)).is_err());
    assert_eq!(std::fs::read(&d).unwrap(), held);
    assert!(set_cid(&d, [0; 16]).is_err());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 4, "no temporary file left: {names:?}");
}

/// Byte flips in the journaled writes (as a journal from elsewhere may
/// hold) and in the child's descriptor area: no panic; a journal the
/// check accepts re-points the child and changes nothing else; a plan
/// over a damaged descriptor is either refused or re-points alone.
#[test]
fn byte_flips_in_journaled_writes_and_descriptors() {
    use rand::{Rng, SeedableRng};
    let iters: u64 = std::env::var("SNAPTREE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x766d_646b);
    let (dir, c) = family();
    let pristine = std::fs::read(&c).unwrap();
    let before = desc(&c);
    let p = plan(&c, Some(to_p2(dir.path())))
        .unwrap()
        .patches()
        .unwrap()
        .to_vec();
    for _ in 0..iters {
        std::fs::write(&c, &pristine).unwrap();
        let mut q = p.clone();
        let i = rng.gen_range(0..2);
        let mut b = q[i].bytes().unwrap();
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(0..b.len().min(700));
            b[at] ^= 1 << rng.gen_range(0..8);
        }
        q[i] = Patch::new(q[i].offset, &b);
        if check(&c, &q).is_ok() {
            apply(&c, &RepointPlan::Journaled(q.clone())).unwrap();
            let after = desc(&c);
            assert!(same_but_parent(&before, &after), "{q:?}");
        } else {
            assert_eq!(
                std::fs::read(&c).unwrap(),
                pristine,
                "a refused check wrote"
            );
        }
        // A damaged descriptor area in the child itself.
        let mut file = pristine.clone();
        let at = 512 + rng.gen_range(0..600);
        file[at] ^= 1 << rng.gen_range(0..8);
        std::fs::write(&c, &file).unwrap();
        let damaged = try_desc(&c);
        if let Ok(RepointPlan::Journaled(w)) = plan(&c, Some(to_p2(dir.path()))) {
            let old = damaged.expect("a plan over a descriptor that does not parse");
            check(&c, &w).unwrap();
            apply(&c, &RepointPlan::Journaled(w)).unwrap();
            assert!(same_but_parent(&old, &desc(&c)));
        }
    }
}
