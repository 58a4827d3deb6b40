//! Unit tests of the libvirt readers over records in libvirt's format.

use super::snapshot::{self, Mode};
use super::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn a_record_in_libvirts_format_parses() {
    let d = tmp();
    let mem = d.path().join("s1.mem");
    let overlay = d.path().join("vm1.s1");
    std::fs::write(&mem, b"ram").unwrap();
    std::fs::write(&overlay, b"img").unwrap();
    let text = format!(
        "<domainsnapshot>\n  <name>s1</name>\n  <description>d</description>\n  <state>running</state>\n  <parent><name>s0</name></parent>\n  <creationTime>1700000001</creationTime>\n  <memory snapshot='external' file='{}'/>\n  <disks><disk name='vda' snapshot='external' type='file'><source file='{}'/></disk><disk name='vdb' snapshot='internal'/></disks>\n</domainsnapshot>\n",
        mem.display(),
        overlay.display()
    );
    let p = d.path().join("s1.xml");
    std::fs::write(&p, text).unwrap();
    let s = snapshot::load(&p).expect("parses");
    assert_eq!(s.name, "s1");
    assert_eq!(s.parent.as_deref(), Some("s0"));
    assert_eq!(s.created, 1700000001);
    assert_eq!(s.description.as_deref(), Some("d"));
    assert_eq!(s.memory, Mode::External);
    assert_eq!(s.memory_file, Some(mem.canonicalize().unwrap()));
    assert_eq!(s.disks.len(), 2);
    assert_eq!(s.disks[0].overlay, Some(overlay.canonicalize().unwrap()));
    assert_eq!(s.disks[1].mode, Mode::Internal);
    let r = point(&s, true);
    assert_eq!(r.overlays.len(), 1);
    assert_eq!(r.overlays[0].0.as_deref(), Some("vda"));
}

#[test]
fn doctype_and_entities_are_refused() {
    let d = tmp();
    let p = d.path().join("e.xml");
    std::fs::write(&p, "<!DOCTYPE x [<!ENTITY a 'b'>]><domainsnapshot/>").unwrap();
    assert!(matches!(
        snapshot::load(&p),
        Err(LibvirtError::Doctype { .. })
    ));
}

#[test]
fn a_huge_file_is_refused_without_reading_it() {
    let d = tmp();
    let p = d.path().join("big.xml");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    assert!(matches!(xml::read(&p), Err(LibvirtError::TooLarge { .. })));
}

#[test]
fn a_memory_file_must_be_a_regular_file() {
    let d = tmp();
    let p = d.path().join("s.xml");
    let text = format!(
        "<domainsnapshot><name>s</name><memory snapshot='external' file='{}'/></domainsnapshot>",
        d.path().display()
    );
    std::fs::write(&p, text).unwrap();
    assert!(matches!(
        snapshot::load(&p),
        Err(LibvirtError::BadDiskPath { .. })
    ));
}

#[test]
fn parent_cycles_are_found() {
    let d = tmp();
    let mut snaps = BTreeMap::new();
    for (n, p) in [
        ("a", Some("b")),
        ("b", Some("a")),
        ("c", Some("a")),
        ("r", None),
    ] {
        let path = d.path().join(format!("{n}.xml"));
        let text = match p {
            Some(p) => format!("<domainsnapshot><name>{n}</name><parent><name>{p}</name></parent></domainsnapshot>"),
            None => format!("<domainsnapshot><name>{n}</name></domainsnapshot>"),
        };
        std::fs::write(&path, text).unwrap();
        snaps.insert(n.to_string(), snapshot::load(&path).unwrap());
    }
    assert_eq!(in_cycles(&snaps), vec!["a".to_string(), "b".to_string()]);
}

#[test]
fn bad_names_and_outside_overlays_are_refused() {
    let d = tmp();
    let disks = d.path().join("disks");
    std::fs::create_dir(&disks).unwrap();
    let outside = d.path().join("o.qcow2");
    std::fs::write(&outside, b"x").unwrap();
    let p = d.path().join("o.xml");
    let text = format!(
        "<domainsnapshot><name>o</name><disks><disk name='vda' snapshot='external'><source file='{}'/></disk></disks></domainsnapshot>",
        outside.display()
    );
    std::fs::write(&p, text).unwrap();
    let s = snapshot::load(&p).unwrap();
    let dir = disks.canonicalize().unwrap();
    let e = check(s, &dir, &[], &BTreeMap::new()).unwrap_err();
    assert!(matches!(e, LibvirtError::OutsideDisks { .. }), "{e}");
    std::fs::write(&p, "<domainsnapshot><name>a/b</name></domainsnapshot>").unwrap();
    let s = snapshot::load(&p).unwrap();
    let e = check(s, &dir, &[], &BTreeMap::new()).unwrap_err();
    assert!(matches!(e, LibvirtError::BadName { .. }), "{e}");
}
