//! A VMware VM directory through the mount: its `.vmsd` names and shapes
//! the tree as VMware's snapshot manager shows it.
//!
//! The directory is laid out as VMware Workstation leaves it (VMware KB
//! 1015180 "Understanding virtual machine snapshots"): taking a snapshot
//! freezes each disk's running file and starts a new delta on it, so a
//! snapshot's `diskN.fileName` is the file that was running when it was
//! taken; reverting discards the running delta and starts a new one on
//! the snapshot's file. The disks are made by `qemu-img create -f vmdk`
//! (deltas with `-b`, which writes `parentFileNameHint`), the data by
//! `qemu-io`. The `.vmsd` and `.vmx` are written with VMware's key names
//! and quoting (the sample in "VMware Snapshot Forensics",
//! stuffphilwrites.com, 2013; escapes as open-vm-tools' `dictll.c`
//! writes them; the creation time as the write-up decodes it). No VMware
//! product is installed here; the `.vmsn` files are stand-ins (VMware's
//! checkpoint magic, then zeros) since snaptree never parses them.
//!
//! A binary of its own (the mount tests' `support` is shared by path) so
//! that it adds no line to `tests/mount/main.rs`.

#[path = "mount/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;

use support::*;

const SIZE: u64 = 4 * MIB;

/// 2024-01-02 03:04:05.123456 UTC, as VMware splits it: the high half,
/// and the low half written as a signed 32-bit number.
fn vmware_time(secs: u64) -> (i64, i64) {
    let us = secs * 1_000_000 + 123_456;
    ((us >> 32) as i64, (us & 0xffff_ffff) as u32 as i32 as i64)
}

/// One `snapshotN.*` block of a `.vmsd`.
fn snap(n: u32, uid: u32, parent: Option<u32>, name: &str, desc: &str, disk: &str) -> String {
    let (hi, lo) = vmware_time(1_704_164_645 + uid as u64);
    let parent = parent
        .map(|p| format!("snapshot{n}.parent = \"{p}\"\n"))
        .unwrap_or_default();
    format!(
        "snapshot{n}.uid = \"{uid}\"\nsnapshot{n}.filename = \"vm-Snapshot{uid}.vmsn\"\n{parent}snapshot{n}.displayName = \"{name}\"\nsnapshot{n}.description = \"{desc}\"\nsnapshot{n}.type = \"1\"\nsnapshot{n}.createTimeHigh = \"{hi}\"\nsnapshot{n}.createTimeLow = \"{lo}\"\nsnapshot{n}.numDisks = \"1\"\nsnapshot{n}.disk0.fileName = \"{disk}\"\nsnapshot{n}.disk0.node = \"scsi0:0\"\n"
    )
}

/// The `.vmsd` of the directory `build` makes; `s3_parent` is the parent
/// uid the list gives "Branch test" (1 is the truth).
fn vmsd(s3_parent: u32) -> String {
    format!(
        ".encoding = \"UTF-8\"\nsnapshot.lastUID = \"3\"\nsnapshot.current = \"3\"\nsnapshot.mru0.uid = \"3\"\nsnapshot.mru1.uid = \"1\"\n{}{}{}snapshot.numSnapshots = \"3\"\n",
        snap(0, 1, None, "Clean install", "fresh OS|0Ano updates", "vm.vmdk"),
        snap(1, 2, Some(1), "After update", "patched", "vm-000001.vmdk"),
        snap(2, 3, Some(s3_parent), "Branch test", "", "vm-000003.vmdk"),
    )
}

const VMX: &str = ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"vm\"\nguestOS = \"ubuntu-64\"\nmemsize = \"4\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"lsilogic\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"vm-000004.vmdk\"\nide1:0.present = \"TRUE\"\nide1:0.deviceType = \"cdrom-image\"\nide1:0.fileName = \"ubuntu.iso\"\nnvram = \"vm.nvram\"\n";

fn create(ws: &Workspace, name: &str, parent: Option<&str>) {
    let size = SIZE.to_string();
    let mut args = vec!["create", "-q", "-f", "vmdk"];
    if let Some(p) = parent {
        args.extend(["-b", p, "-F", "vmdk"]);
    }
    args.push(name);
    if parent.is_none() {
        args.push(&size);
    }
    ws.qemu_img(&args);
}

/// VMware's checkpoint-file magic (0xbed2bed0, little-endian), then zeros.
fn vmsn_stand_in() -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    v[..4].copy_from_slice(&0xbed2_bed0u32.to_le_bytes());
    v
}

/// Base `vm.vmdk` ("Clean install", with RAM in a `.vmem`), its delta
/// `vm-000001.vmdk` ("After update", RAM only possibly in its `.vmsn`),
/// a revert to "Clean install" then `vm-000003.vmdk` ("Branch test"), and
/// the running `vm-000004.vmdk` on it. Returns the `.vmem`'s bytes.
fn build(ws: &Workspace, s3_parent: u32) -> Vec<u8> {
    create(ws, "vm.vmdk", None);
    ws.qemu_io("vm.vmdk", "vmdk", &["write -P 0x11 0 1M"]);
    create(ws, "vm-000001.vmdk", Some("vm.vmdk"));
    ws.qemu_io("vm-000001.vmdk", "vmdk", &["write -P 0x22 1M 1M"]);
    create(ws, "vm-000003.vmdk", Some("vm.vmdk"));
    ws.qemu_io("vm-000003.vmdk", "vmdk", &["write -P 0x33 2M 1M"]);
    create(ws, "vm-000004.vmdk", Some("vm-000003.vmdk"));
    ws.qemu_io("vm-000004.vmdk", "vmdk", &["write -P 0x44 3M 64k"]);
    for uid in 1..=3 {
        std::fs::write(ws.img(&format!("vm-Snapshot{uid}.vmsn")), vmsn_stand_in()).unwrap();
    }
    let ram = pattern(11, MIB as usize);
    std::fs::write(ws.img("vm-Snapshot1.vmem"), &ram).unwrap();
    std::fs::write(ws.img("vm.vmsd"), vmsd(s3_parent)).unwrap();
    std::fs::write(ws.img("vm.vmx"), VMX).unwrap();
    ram
}

/// Every file of the VM directory with its bytes.
fn files(ws: &Workspace) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(&ws.images)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

fn disk_of(mnt: &Path, point: &str) -> Vec<u8> {
    read_disk(&mnt.join(point).join("disk.raw"))
}

#[test]
fn vmsd_names_and_shapes_the_tree() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    let ram = build(&ws, 1);
    let want: Vec<(&str, Vec<u8>)> = [
        ("Clean install", "vm.vmdk"),
        ("After update", "vm-000001.vmdk"),
        ("Branch test", "vm-000003.vmdk"),
        ("You are here", "vm-000004.vmdk"),
    ]
    .iter()
    .map(|(p, f)| (*p, ws.flatten(f)))
    .collect();
    let vmware_files = |ws: &Workspace| {
        let mut f = files(ws);
        f.retain(|n, _| n.starts_with("vm"));
        f
    };
    let before = vmware_files(&ws);
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let status = status_text(&mnt);
    assert_eq!(
        visible(&mnt),
        names(&[
            "Clean install",
            "After update",
            "Branch test",
            "You are here"
        ]),
        "{status}"
    );
    assert!(!status.contains("disagreement"), "{status}");
    assert_eq!(parent_link(&mnt, "Clean install"), None);
    for (p, parent) in [
        ("After update", "Clean install"),
        ("Branch test", "Clean install"),
        ("You are here", "Branch test"),
    ] {
        assert_eq!(
            parent_link(&mnt, p),
            Some(format!("../{parent}")),
            "{p}\n{status}"
        );
    }
    for (p, bytes) in &want {
        assert_bytes_eq(p, &disk_of(&mnt, p), bytes);
    }
    let i = info(&mnt, "Clean install");
    assert_eq!(i["description"], "fresh OS\nno updates", "{i}");
    assert_eq!(i["parent_from"], "vmware", "{i}");
    assert_eq!(i["created"], 1_704_164_646u64, "{i}");
    assert_eq!(i["disks"]["disk"]["image"], "vm.vmdk", "{i}");
    assert_bytes_eq(
        "memory.raw",
        &read_disk(&mnt.join("Clean install/memory.raw")),
        &ram,
    );
    let i = info(&mnt, "After update");
    assert_eq!(i["created"], 1_704_164_647u64, "{i}");
    assert!(i["memory"].is_null(), "{i}");
    let unreadable = &i["memory_unreadable"];
    assert!(
        unreadable["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("/vm-Snapshot2.vmsn")),
        "{i}"
    );
    assert!(
        unreadable["why"]
            .as_str()
            .is_some_and(|w| w.contains("no .vmem beside this .vmsn")),
        "{i}"
    );
    assert!(!mnt.join("After update/memory.raw").exists());

    // A point made through ctl goes to .snaptree.json; VMware's files keep
    // their bytes.
    ctl_ok(&mnt, "You are here", "snapshot mine");
    assert!(visible(&mnt).contains("mine"), "{}", status_text(&mnt));
    unmount_ok(m);
    let manifest = std::fs::read_to_string(ws.img(".snaptree.json")).unwrap();
    assert!(manifest.contains("\"mine\""), "{manifest}");
    let after = vmware_files(&ws);
    for n in [
        "vm.vmsd",
        "vm.vmx",
        "vm.vmdk",
        "vm-000001.vmdk",
        "vm-000003.vmdk",
    ] {
        assert_eq!(before[n], after[n], "{n} changed");
    }
}

/// Where the list and the files disagree, `status` says so and the files
/// are followed.
#[test]
fn vmsd_disagreements_are_in_status() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    // "Branch test" is said to be a child of "After update", but its file
    // backs onto vm.vmdk; a fourth snapshot names a disk that is gone.
    build(&ws, 2);
    let extra = snap(3, 4, Some(2), "Gone", "", "vm-000009.vmdk");
    let text = vmsd(2)
        .replace(
            "snapshot.numSnapshots = \"3\"",
            "snapshot.numSnapshots = \"4\"",
        )
        .replace("snapshot.lastUID = \"3\"", "snapshot.lastUID = \"4\"")
        + &extra;
    std::fs::write(ws.img("vm.vmsd"), text).unwrap();
    let Some(m) = ws.mount(&["-o", "ro,gc_idle=off"]) else {
        return;
    };
    let status = status_text(&m.mnt);
    for want in [
        "disagreement: vmware's records say the parent of \"Branch test\" is \"After update\", but its image \"vm-000003.vmdk\" backs onto \"Clean install\"",
        "disagreement: vm.vmsd: snapshot \"Gone\" names scsi0:0 file \"vm-000009.vmdk\", which is missing",
        "disagreement: \"Gone\": its state file \"vm-Snapshot4.vmsn\" is missing",
    ] {
        assert!(status.contains(want), "status lacks {want:?}:\n{status}");
    }
    assert_eq!(
        parent_link(&m.mnt, "Branch test").as_deref(),
        Some("../Clean install"),
        "the image is followed"
    );
    unmount_ok(m);
}

/// Hostile `.vmsd` files: each gives a named line in `status`, the tree
/// falls back to file names where the list is refused, and no file of the
/// directory changes.
#[test]
fn hostile_vmsd_is_refused_by_name() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    build(&ws, 1);
    let good = vmsd(1);
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("huge", None, "vm.vmsd: refused: larger than 1048576 bytes; the snapshot list is not used"),
        (
            "outside",
            Some(good.replace("\"vm-000001.vmdk\"", "\"../../etc/passwd\"")),
            "snapshot1 \"After update\": disk0.fileName \"../../etc/passwd\" refused: outside the VM directory",
        ),
        (
            "absolute outside",
            Some(good.replace("\"vm-Snapshot2.vmsn\"", "\"/etc/passwd\"")),
            "snapshot1 \"After update\": filename \"/etc/passwd\" refused: outside the VM directory",
        ),
        (
            "duplicate uid",
            Some(good.replace("snapshot2.uid = \"3\"", "snapshot2.uid = \"2\"")),
            "snapshot2 \"Branch test\": uid 2 is also another snapshot's; left out",
        ),
        (
            "cycle",
            Some(good.replace("snapshot0.uid = \"1\"\n", "snapshot0.uid = \"1\"\nsnapshot0.parent = \"2\"\n")),
            "snapshot \"Clean install\" (uid 1): its parents form a cycle; left out",
        ),
        (
            "bad number",
            Some(good.replace("snapshot1.createTimeLow = \"", "snapshot1.createTimeLow = \"x")),
            "vm.vmsd: snapshot1.createTimeLow: bad value: \"x",
        ),
        (
            "bad line",
            Some(good.replace("snapshot.current = \"3\"", "snapshot.current = \"3")),
            "vm.vmsd: line 3: malformed: the value's closing quote is missing",
        ),
    ];
    for (what, text, want) in cases {
        match text {
            Some(t) => std::fs::write(ws.img("vm.vmsd"), t).unwrap(),
            None => {
                let f = std::fs::File::create(ws.img("vm.vmsd")).unwrap();
                f.set_len(64 << 20).unwrap();
            }
        }
        let before = files(&ws);
        let Some(m) = ws.mount(&["-o", "ro,gc_idle=off"]) else {
            return;
        };
        let status = status_text(&m.mnt);
        assert!(
            status.contains(want),
            "{what}: status lacks {want:?}:\n{status}"
        );
        let seen = visible(&m.mnt);
        assert_eq!(
            seen.len(),
            4,
            "{what}: every disk is still a point: {seen:?}"
        );
        unmount_ok(m);
        assert!(
            before == files(&ws),
            "{what}: a file of the directory changed"
        );
    }
}

/// Unmounts `m` and requires its daemon to exit 0.
#[track_caller]
fn unmount_ok(m: Mount) {
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
}

/// A suspended two-disk VM: one snapshot of both disks, the running
/// deltas in the `.vmx` (per node), the suspend state in a `.vmss` with
/// its RAM in a `.vmem` beside it. Each point has one `<node>.raw` per
/// disk; "You are here" gets the suspended RAM as `memory.raw`. With
/// `-o novmsd` the list is not read.
#[test]
fn vmsd_of_a_suspended_two_disk_vm() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    let mut want = BTreeMap::new();
    for (node, stem, a, b) in [
        ("scsi0:0", "vm", 0x11u8, 0x12u8),
        ("scsi0:1", "data", 0x21, 0x22),
    ] {
        let base = format!("{stem}.vmdk");
        let delta = format!("{stem}-000001.vmdk");
        create(&ws, &base, None);
        ws.qemu_io(&base, "vmdk", &[&format!("write -P {a} 0 1M")]);
        create(&ws, &delta, Some(&base));
        ws.qemu_io(&delta, "vmdk", &[&format!("write -P {b} 1M 1M")]);
        want.insert(node, (ws.flatten(&base), ws.flatten(&delta)));
    }
    let (hi, lo) = vmware_time(1_704_164_645);
    let list = format!(
        ".encoding = \"UTF-8\"\nsnapshot.lastUID = \"1\"\nsnapshot.current = \"1\"\nsnapshot0.uid = \"1\"\nsnapshot0.filename = \"vm-Snapshot1.vmsn\"\nsnapshot0.displayName = \"Both disks\"\nsnapshot0.createTimeHigh = \"{hi}\"\nsnapshot0.createTimeLow = \"{lo}\"\nsnapshot0.numDisks = \"2\"\nsnapshot0.disk0.fileName = \"vm.vmdk\"\nsnapshot0.disk0.node = \"scsi0:0\"\nsnapshot0.disk1.fileName = \"data.vmdk\"\nsnapshot0.disk1.node = \"scsi0:1\"\nsnapshot.numSnapshots = \"1\"\n"
    );
    std::fs::write(ws.img("vm.vmsd"), list).unwrap();
    let vmx = VMX.replace(
        "scsi0:0.fileName = \"vm-000004.vmdk\"\n",
        "scsi0:0.fileName = \"vm-000001.vmdk\"\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"data-000001.vmdk\"\ncheckpoint.vmState = \"vm-7c1e.vmss\"\n",
    );
    std::fs::write(ws.img("vm.vmx"), vmx).unwrap();
    std::fs::write(ws.img("vm-Snapshot1.vmsn"), vmsn_stand_in()).unwrap();
    std::fs::write(ws.img("vm-7c1e.vmss"), vmsn_stand_in()).unwrap();
    let ram = pattern(5, MIB as usize);
    std::fs::write(ws.img("vm-7c1e.vmem"), &ram).unwrap();
    let Some(m) = ws.mount(&["-o", "ro,gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let status = status_text(&mnt);
    assert_eq!(
        visible(&mnt),
        names(&["Both disks", "You are here"]),
        "{status}"
    );
    assert_eq!(
        parent_link(&mnt, "You are here").as_deref(),
        Some("../Both disks")
    );
    for (node, (then, now)) in &want {
        let f = format!("{node}.raw");
        assert_bytes_eq(node, &read_disk(&mnt.join("Both disks").join(&f)), then);
        assert_bytes_eq(node, &read_disk(&mnt.join("You are here").join(&f)), now);
    }
    assert_bytes_eq(
        "memory.raw",
        &read_disk(&mnt.join("You are here/memory.raw")),
        &ram,
    );
    let i = info(&mnt, "Both disks");
    assert!(
        i["memory_unreadable"]["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("/vm-Snapshot1.vmsn")),
        "{i}"
    );
    unmount_ok(m);
    let Some(m) = ws.mount(&["-o", "ro,novmsd,gc_idle=off"]) else {
        return;
    };
    let seen = visible(&m.mnt);
    assert!(!seen.contains("Both disks"), "novmsd: {seen:?}");
    unmount_ok(m);
}
