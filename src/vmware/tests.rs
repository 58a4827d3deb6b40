//! Unit tests of the VMware readers over text in VMware's format (the
//! layout of the sample in "VMware Snapshot Forensics",
//! stuffphilwrites.com, 2013).

use super::*;
use std::path::Path;

/// A `.vmsd` as Workstation writes it: a root, a child, and a second
/// child of the root (a branch).
const SAMPLE: &str = r#".encoding = "UTF-8"
snapshot.lastUID = "3"
snapshot.current = "3"
snapshot.mru0.uid = "3"
snapshot0.uid = "1"
snapshot0.filename = "vm-Snapshot1.vmsn"
snapshot0.displayName = "base snap"
snapshot0.description = "first|0Asecond line |22quoted|22"
snapshot0.createTimeHigh = "300237"
snapshot0.createTimeLow = "-1952402371"
snapshot0.numDisks = "1"
snapshot0.disk0.fileName = "vm.vmdk"
snapshot0.disk0.node = "scsi0:0"
snapshot1.uid = "2"
snapshot1.filename = "vm-Snapshot2.vmsn"
snapshot1.parent = "1"
snapshot1.displayName = "test snap 1"
snapshot1.type = "1"
snapshot1.createTimeHigh = "300237"
snapshot1.createTimeLow = "100"
snapshot1.numDisks = "1"
snapshot1.disk0.fileName = "vm-000001.vmdk"
snapshot1.disk0.node = "scsi0:0"
snapshot2.uid = "3"
snapshot2.parent = "1"
snapshot2.displayName = "branch"
snapshot2.numDisks = "1"
snapshot2.disk0.fileName = "vm-000003.vmdk"
snapshot2.disk0.node = "scsi0:0"
snapshot.numSnapshots = "3"
"#;

fn parse(text: &str) -> Result<Vmsd, VmwareError> {
    let p = Path::new("vm.vmsd");
    dict::parse(p, text.as_bytes()).and_then(|d| vmsd::from_dict(p, &d))
}

#[test]
fn the_sample_parses_with_times_and_escapes() {
    let v = parse(SAMPLE).expect("parses");
    assert_eq!(v.current, Some(3));
    assert_eq!(v.snapshots.len(), 3);
    let s0 = &v.snapshots[0];
    assert_eq!((s0.uid, s0.parent), (1, None));
    assert_eq!(s0.name, "base snap");
    assert_eq!(
        s0.description.as_deref(),
        Some("first\nsecond line \"quoted\"")
    );
    // 2010-11-11 21:20:38.614077 UTC.
    assert_eq!(s0.created_us, 1_289_510_438_614_077);
    assert_eq!(s0.disks[0].file, "vm.vmdk");
    assert_eq!(s0.disks[0].node, "scsi0:0");
    assert_eq!(v.snapshots[1].created_us, (300237u64 << 32) | 100);
    assert_eq!(v.snapshots[2].parent, Some(1));
    assert_eq!(v.snapshots[2].created_us, 0);
}

#[test]
fn malformed_files_are_refused_with_the_line_or_key() {
    let cases: &[(&str, &str)] = &[
        ("a = \"b\nsnapshot.numSnapshots = \"0\"\n", "line 1: malformed: the value's closing quote"),
        ("x = \"1\"\nx = \"2\"\n", "line 2: malformed: \"x\" is set twice"),
        ("just words\n", "line 1: malformed: no '='"),
        ("a = \"b\" c\n", "line 1: malformed: text after the value"),
        ("a = \"|zz\"\n", "'|' not followed by two hex digits"),
        ("a = \"\u{1b}\"\n", "a raw control character"),
        ("snapshot.numSnapshots = \"x\"\n", "snapshot.numSnapshots: bad value: \"x\" is not a decimal number"),
        ("snapshot.numSnapshots = \"99999\"\n", "outside 0..=4096"),
        ("snapshot.numSnapshots = \"0\"\nsnapshot0.uid = \"1\"\n", "beyond snapshot.numSnapshots"),
        ("snapshot.numSnapshots = \"1\"\nsnapshot0.displayName = \"a\"\n", "snapshot0.uid: bad value: missing"),
        (
            "snapshot.numSnapshots = \"1\"\nsnapshot0.uid = \"1\"\nsnapshot0.displayName = \"a\"\nsnapshot0.createTimeHigh = \"-5\"\nsnapshot0.createTimeLow = \"1\"\n",
            "snapshot0.createTimeHigh: bad value: -5 is outside",
        ),
        (
            "snapshot.numSnapshots = \"1\"\nsnapshot0.uid = \"1\"\nsnapshot0.displayName = \"a\"\nsnapshot0.numDisks = \"1\"\nsnapshot0.disk1.fileName = \"x.vmdk\"\n",
            "beyond numDisks = 1",
        ),
        (
            "snapshot.lastUID = \"1\"\nsnapshot.numSnapshots = \"1\"\nsnapshot0.uid = \"7\"\nsnapshot0.displayName = \"a\"\n",
            "7 is above snapshot.lastUID = 1",
        ),
        ("snapshot00.uid = \"1\"\n", "malformed index"),
    ];
    for (text, want) in cases {
        let e = parse(text).expect_err(text).to_string();
        assert!(e.contains(want), "{text:?}: {e:?} lacks {want:?}");
        assert!(e.starts_with("vm.vmsd: "), "{e}");
    }
}

/// Review finding 7: every snapshot used to scan every key, so a 1 MiB
/// list of 4096 snapshots took tens of seconds. It parses (in well under
/// a second), each snapshot gets its own disks, and a stray disk key of
/// the last snapshot is still caught.
#[test]
fn a_list_of_4096_snapshots_in_1_mib_parses() {
    use std::fmt::Write;
    let n = vmsd::MAX_SNAPSHOTS;
    let mut text = format!("snapshot.numSnapshots = \"{n}\"\nsnapshot.lastUID = \"{n}\"\n");
    for i in 0..n {
        // Each the child of the one before (a root first).
        let parent = match i {
            0 => String::new(),
            _ => format!("snapshot{i}.parent = \"{i}\"\n"),
        };
        write!(
            text,
            "snapshot{i}.uid = \"{}\"\n{parent}snapshot{i}.displayName = \"s{i}\"\n\
             snapshot{i}.numDisks = \"2\"\nsnapshot{i}.disk0.fileName = \"a{i}.vmdk\"\n\
             snapshot{i}.disk0.node = \"scsi0:0\"\nsnapshot{i}.disk1.fileName = \"b{i}.vmdk\"\n\
             snapshot{i}.disk1.node = \"scsi0:1\"\n",
            i + 1
        )
        .unwrap();
    }
    assert!(
        (900_000..1_200_000).contains(&text.len()),
        "about 1 MiB: {}",
        text.len()
    );
    let v = parse(&text).expect("parses");
    assert_eq!(v.snapshots.len(), n as usize);
    let last = &v.snapshots[n as usize - 1];
    assert_eq!(last.disks[1].file, format!("b{}.vmdk", n - 1));
    assert_eq!(last.parent, Some(n - 1));
    let stray = format!("{text}snapshot{}.disk2.node = \"scsi0:2\"\n", n - 1);
    let e = parse(&stray).unwrap_err().to_string();
    assert!(e.contains("beyond numDisks = 2"), "{e}");
}

#[test]
fn byte_flips_never_panic() {
    let iters: usize = std::env::var("SNAPTREE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let base = SAMPLE.as_bytes();
    for _ in 0..iters {
        let mut b = base.to_vec();
        for _ in 0..1 + next() % 4 {
            let i = (next() % b.len() as u64) as usize;
            b[i] ^= 1 << (next() % 8);
        }
        let p = Path::new("f.vmsd");
        if let Ok(d) = dict::parse(p, &b) {
            let _ = vmsd::from_dict(p, &d);
        }
    }
}

/// A VM directory with the sample's files.
fn vm_dir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().expect("temp dir");
    let dir = t.path().canonicalize().unwrap();
    for f in [
        "vm.vmdk",
        "vm-000001.vmdk",
        "vm-000003.vmdk",
        "vm-Snapshot1.vmsn",
    ] {
        std::fs::write(dir.join(f), b"x").unwrap();
    }
    std::fs::write(dir.join("vm-Snapshot1.vmem"), b"ram").unwrap();
    (t, dir)
}

fn load_text(dir: &Path, text: &str) -> Records {
    let p = dir.join("vm.vmsd");
    std::fs::write(&p, text).unwrap();
    load(dir, &p, &["tree".into()])
}

#[test]
fn records_follow_the_list() {
    let (_t, dir) = vm_dir();
    let r = load_text(&dir, SAMPLE);
    let names: Vec<&str> = r.points.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["base snap", "test snap 1", "branch"],
        "parents first"
    );
    let base = r.point("base snap").unwrap();
    assert_eq!(base.created, 1_289_510_438);
    assert_eq!(base.images, vec![(None, dir.join("vm.vmdk"))]);
    assert_eq!(base.memory, Some(dir.join("vm-Snapshot1.vmem")));
    let t1 = r.point("test snap 1").unwrap();
    assert_eq!(t1.parent.as_deref(), Some("base snap"));
    assert!(t1.memory.is_none());
    // vm-Snapshot2.vmsn is named but missing; no .vmx beside the list.
    let notes = r.notes.join("\n");
    assert!(
        notes.contains("\"vm-Snapshot2.vmsn\" is missing"),
        "{notes}"
    );
    assert!(notes.contains("no .vmx beside it"), "{notes}");
}

#[test]
fn hostile_entries_are_left_out_by_name() {
    let (_t, dir) = vm_dir();
    let text = SAMPLE
        .replace(
            "snapshot.numSnapshots = \"3\"",
            "snapshot.numSnapshots = \"7\"",
        )
        .replace("snapshot.lastUID = \"3\"", "snapshot.lastUID = \"30\"")
        + "snapshot3.uid = \"2\"\nsnapshot3.displayName = \"dup uid\"\n\
           snapshot4.uid = \"10\"\nsnapshot4.parent = \"11\"\nsnapshot4.displayName = \"c1\"\n\
           snapshot5.uid = \"11\"\nsnapshot5.parent = \"10\"\nsnapshot5.displayName = \"c2\"\n\
           snapshot6.uid = \"12\"\nsnapshot6.displayName = \"out\"\nsnapshot6.numDisks = \"1\"\n\
           snapshot6.disk0.fileName = \"../etc/passwd\"\nsnapshot6.disk0.node = \"scsi0:0\"\n";
    let r = load_text(&dir, &text);
    let notes = r.notes.join("\n");
    for want in [
        "snapshot3 \"dup uid\": uid 2 is also another snapshot's",
        "snapshot \"c1\" (uid 10): its parents form a cycle",
        "snapshot \"c2\" (uid 11): its parents form a cycle",
        "snapshot6 \"out\": disk0.fileName \"../etc/passwd\" refused: outside the VM directory",
    ] {
        assert!(notes.contains(want), "{want:?} not in {notes}");
    }
    let names: Vec<&str> = r.points.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["base snap", "test snap 1", "branch"]);
    let text = SAMPLE.replace("\"branch\"", "\"test snap 1\"");
    let notes = load_text(&dir, &text).notes.join("\n");
    assert!(
        notes.contains("name \"test snap 1\" is also another snapshot's"),
        "{notes}"
    );
    let text = SAMPLE.replace("\"branch\"", "\"tree\"");
    let notes = load_text(&dir, &text).notes.join("\n");
    assert!(
        notes.contains("name \"tree\" refused: it is one of the mount's own"),
        "{notes}"
    );
}

#[test]
fn absolute_paths_must_be_in_the_directory() {
    let (_t, dir) = vm_dir();
    assert!(plain_name_in(&dir, &dir.join("vm.vmdk").to_string_lossy()));
    assert!(plain_name_in(&dir, "vm.vmdk"));
    for bad in ["/etc/passwd", "sub/vm.vmdk", "..", "C:\\vm.vmdk", ""] {
        assert!(!plain_name_in(&dir, bad), "{bad}");
    }
    std::os::unix::fs::symlink("/etc/passwd", dir.join("link.vmdk")).unwrap();
    assert!(
        !plain_name_in(&dir, "link.vmdk"),
        "a link out of the directory"
    );
}

#[test]
fn a_huge_list_is_refused_without_reading_it() {
    let (_t, dir) = vm_dir();
    let p = dir.join("vm.vmsd");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let r = load(&dir, &p, &[]);
    assert!(r.points.is_empty());
    assert!(
        r.notes[0].contains("refused: larger than 1048576 bytes"),
        "{:?}",
        r.notes
    );
}
