//! libvirt's snapshot records without a libvirt daemon: `mount --domain`
//! over a fake root (`--libvirt-root`) holding a domain XML and snapshot
//! records written exactly in libvirt's documented format
//! (`formatdomain.rst`, `formatsnapshot.rst`; no libvirtd is installed
//! here), over images made as libvirt makes them: an external snapshot is
//! a `qemu-img create -b` overlay, an internal one `qemu-img snapshot -c`,
//! the external memory a raw RAM file. Names, parents, descriptions and
//! memory come from the records, `.snaptree.json` disagreements show in
//! `status`, the XML files stay byte-identical, and hostile records are
//! refused each with a named error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

const SIZE: u64 = 4 * MIB;

/// The fake root's domain XML and snapshot directories.
fn dirs(root: &Path) -> (PathBuf, PathBuf) {
    let etc = root.join("etc/libvirt/qemu");
    let snap = root.join("var/lib/libvirt/qemu/snapshot/vm1");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    (etc, snap)
}

/// A domain XML as `virsh dumpxml --inactive` writes it, one file disk.
fn domain_xml(leaf: &Path) -> String {
    format!(
        "<domain type='kvm'>\n  <name>vm1</name>\n  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>\n  <memory unit='KiB'>4096</memory>\n  <vcpu>1</vcpu>\n  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n    <disk type='file' device='cdrom'>\n      <source file='/nonexistent.iso'/>\n      <target dev='sda' bus='sata'/>\n    </disk>\n  </devices>\n</domain>\n",
        leaf.display()
    )
}

/// A `<domainsnapshot>` record as libvirt stores it.
fn record(name: &str, parent: Option<&str>, desc: &str, disk: &str, memory: &str) -> String {
    let parent = parent
        .map(|p| format!("  <parent>\n    <name>{p}</name>\n  </parent>\n"))
        .unwrap_or_default();
    format!(
        "<domainsnapshot>\n  <name>{name}</name>\n  <description>{desc}</description>\n  <state>running</state>\n{parent}  <creationTime>1700000000</creationTime>\n  {memory}\n  <disks>\n    {disk}\n  </disks>\n  <active>0</active>\n</domainsnapshot>\n"
    )
}

fn external_disk(overlay: &Path) -> String {
    format!(
        "<disk name='vda' snapshot='external' type='file'>\n      <driver type='qcow2'/>\n      <source file='{}'/>\n    </disk>",
        overlay.display()
    )
}

const INTERNAL_DISK: &str = "<disk name='vda' snapshot='internal'/>";
const NO_MEMORY: &str = "<memory snapshot='no'/>";

/// Every file under `dir`, by path, with its bytes.
fn snapshot_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(snapshot_files(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

/// vm1.qcow2 (0x11) under the external snapshot s1's overlay vm1.s1
/// (0x22), internal snapshots s2 and s3 of vm1.s1, then 0x33. Returns
/// the RAM of s1's memory file.
fn build_domain(ws: &Workspace, root: &Path) -> Vec<u8> {
    let (etc, snap) = dirs(root);
    ws.create_qcow2("vm1.qcow2", SIZE, None, "");
    ws.qemu_io("vm1.qcow2", "qcow2", &["write -P 0x11 0 1M"]);
    let base = ws.img("vm1.qcow2");
    ws.create_qcow2("vm1.s1", SIZE, Some((base.to_str().unwrap(), "qcow2")), "");
    ws.qemu_io("vm1.s1", "qcow2", &["write -P 0x22 1M 1M"]);
    ws.qemu_img(&["snapshot", "-c", "s2", "vm1.s1"]);
    ws.qemu_io("vm1.s1", "qcow2", &["write -P 0x44 3M 4k"]);
    ws.qemu_img(&["snapshot", "-c", "s3", "vm1.s1"]);
    ws.qemu_io("vm1.s1", "qcow2", &["write -P 0x33 2M 1M"]);
    let mem = root.join("s1.mem");
    let ram = pattern(7, (2 * MIB) as usize);
    std::fs::write(&mem, &ram).unwrap();
    std::fs::write(etc.join("vm1.xml"), domain_xml(&ws.img("vm1.s1"))).unwrap();
    let mem_xml = format!("<memory snapshot='external' file='{}'/>", mem.display());
    let s1 = record(
        "s1",
        None,
        "before the upgrade",
        &external_disk(&ws.img("vm1.s1")),
        &mem_xml,
    );
    std::fs::write(snap.join("s1.xml"), s1).unwrap();
    let s2 = record("s2", Some("s1"), "internal one", INTERNAL_DISK, NO_MEMORY);
    std::fs::write(snap.join("s2.xml"), s2).unwrap();
    // s3's record hangs it under s1, not under s2 (creation order).
    let s3 = record("s3", Some("s1"), "a branch", INTERNAL_DISK, NO_MEMORY);
    std::fs::write(snap.join("s3.xml"), s3).unwrap();
    // The manifest says otherwise about vm1.qcow2: libvirt wins.
    let manifest = r#"{"version":1,"points":[{"name":"old-name","image":"vm1.qcow2","parent":null,"created":5}]}"#;
    std::fs::write(ws.img(".snaptree.json"), manifest).unwrap();
    ram
}

fn domain_args(root: &Path) -> Vec<String> {
    let r = root.to_string_lossy().into_owned();
    [
        "--domain",
        "vm1",
        "--libvirt-root",
        &r,
        "-o",
        "ro,gc_idle=off",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn libvirt_records_name_and_shape_the_tree() {
    let Some(ws) = workspace() else {
        return;
    };
    let root = ws.scratch("root");
    let ram = build_domain(&ws, &root);
    let before = snapshot_files(&root.join("etc"));
    let before_snaps = snapshot_files(&root.join("var"));
    let args = domain_args(&root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some(m) = ws.mount_source(Path::new("vm1"), &args) else {
        return;
    };
    let mnt = m.mnt.clone();
    let seen = visible(&mnt);
    for n in ["s1", "s2", "s3"] {
        assert!(seen.contains(n), "{n} missing from {seen:?}");
    }
    assert!(!seen.contains("old-name"), "{seen:?}");
    assert_eq!(parent_link(&mnt, "s1"), None);
    assert_eq!(parent_link(&mnt, "s2").as_deref(), Some("../s1"));
    assert_eq!(
        parent_link(&mnt, "s3").as_deref(),
        Some("../s1"),
        "record beats creation order"
    );
    let i1 = info(&mnt, "s1");
    assert_eq!(i1["description"], "before the upgrade", "{i1}");
    assert_eq!(i1["parent_from"], "libvirt", "{i1}");
    assert_eq!(i1["created"], 1700000000u64, "{i1}");
    assert_eq!(i1["disks"]["disk"]["image"], "vm1.qcow2", "{i1}");
    let i3 = info(&mnt, "s3");
    assert_eq!(i3["parent"], "s1", "{i3}");
    assert_eq!(i3["description"], "a branch", "{i3}");
    assert_eq!(i3["internal"]["tag"], "s3", "{i3}");
    // s1 is the overlay's backing file: vm1.qcow2's bytes.
    let mut want = vec![0u8; SIZE as usize];
    want[..MIB as usize].fill(0x11);
    assert_disk(&mnt, "s1", &want);
    want[MIB as usize..2 * MIB as usize].fill(0x22);
    assert_disk(&mnt, "s2", &want);
    assert_bytes_eq(
        "s1/memory.raw",
        &read_disk(&mnt.join("s1/memory.raw")),
        &ram,
    );
    let status = status_text(&mnt);
    assert!(
        status.contains("disagreement: .snaptree.json names image \"vm1.qcow2\" \"old-name\", libvirt's records \"s1\""),
        "{status}"
    );
    unmount_ok(m);
    assert_eq!(
        before,
        snapshot_files(&root.join("etc")),
        "domain XML changed"
    );
    assert_eq!(
        before_snaps,
        snapshot_files(&root.join("var")),
        "records changed"
    );
}

#[test]
fn libvirt_hostile_records_are_refused_by_name() {
    let Some(ws) = workspace() else {
        return;
    };
    let root = ws.scratch("root");
    build_domain(&ws, &root);
    let snap = root.join("var/lib/libvirt/qemu/snapshot/vm1");
    let evil = "<?xml version='1.0'?>\n<!DOCTYPE d [<!ENTITY x SYSTEM 'file:///etc/shadow'>]>\n<domainsnapshot><name>&x;</name></domainsnapshot>\n";
    std::fs::write(snap.join("doctype.xml"), evil).unwrap();
    let big = std::fs::File::create(snap.join("big.xml")).unwrap();
    big.set_len(100 << 20).unwrap();
    drop(big);
    std::fs::create_dir(root.join("elsewhere")).unwrap();
    let outside = root.join("elsewhere/o.qcow2");
    std::fs::write(&outside, b"x").unwrap();
    let o = record("outside", None, "", &external_disk(&outside), NO_MEMORY);
    std::fs::write(snap.join("outside.xml"), o).unwrap();
    for (n, p) in [("c1", "c2"), ("c2", "c1")] {
        let r = record(n, Some(p), "", INTERNAL_DISK, NO_MEMORY);
        std::fs::write(snap.join(format!("{n}.xml")), r).unwrap();
    }
    let slash = record("a/b", None, "", INTERNAL_DISK, NO_MEMORY);
    std::fs::write(snap.join("slash.xml"), slash).unwrap();
    // As fstab mounts it: `vm1 MNT snaptree domain=vm1,ro`.
    let r = root.to_string_lossy().into_owned();
    let args = ["--libvirt-root", &r, "-o", "domain=vm1,ro,gc_idle=off"];
    let Some(m) = ws.mount_source(Path::new("vm1"), &args) else {
        return;
    };
    let status = status_text(&m.mnt);
    for want in [
        "doctype.xml: refused: has a DOCTYPE",
        "big.xml: refused: larger than 4194304 bytes",
        "outside the domain's disk directory",
        "snapshot \"c1\": its parents form a cycle",
        "snapshot \"c2\": its parents form a cycle",
        "snapshot name \"a/b\" refused: it contains '/'",
    ] {
        assert!(status.contains(want), "status lacks {want:?}:\n{status}");
    }
    assert!(visible(&m.mnt).contains("s1"), "good records still apply");
    unmount_ok(m);
}

#[test]
fn libvirt_hostile_domain_xml_fails_the_mount_by_name() {
    let Some(ws) = workspace() else {
        return;
    };
    let root = ws.scratch("root");
    build_domain(&ws, &root);
    let xml = root.join("etc/libvirt/qemu/vm1.xml");
    let cases: [(&str, String); 2] = [
        (
            "has a DOCTYPE",
            "<!DOCTYPE domain [<!ENTITY e 'x'>]><domain><name>&e;</name></domain>".into(),
        ),
        ("not an absolute path", domain_xml(Path::new("vm1.s1"))),
    ];
    for (want, text) in cases {
        std::fs::write(&xml, text).unwrap();
        let out = Command::new(bin())
            .args(["mount", "--domain", "vm1", "--libvirt-root"])
            .arg(&root)
            .arg(&ws.mnt)
            .arg("-f")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(want), "{want:?} not in {err}");
    }
}

/// A process holding an image open for writing, as the running domain's
/// QEMU does; killed (by pid) when dropped.
struct Holder(std::process::Child);

impl Holder {
    /// `qemu-io` holding `image`, its stderr in `<image>.holder.log`
    /// (outside the tree) to say why should it not take the lock.
    fn hold(ws: &Workspace, image: &str) -> Holder {
        let log = std::fs::File::create(ws.scratch(&format!("{image}.holder.log"))).unwrap();
        Holder(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "sleep 120000", image])
                .current_dir(ws.img(""))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn qemu-io"),
        )
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `<disk>` of a domain XML.
fn domain_disk(source: &Path, dev: &str) -> String {
    format!(
        "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n",
        source.display()
    )
}

/// A `<domain>` named vm2 with these disks.
fn domain_vm2(disks: &[(&Path, &str)]) -> String {
    let disks: String = disks.iter().map(|(s, d)| domain_disk(s, d)).collect();
    format!("<domain type='kvm' id='1'>\n  <name>vm2</name>\n  <memory unit='KiB'>4096</memory>\n  <devices>\n{disks}  </devices>\n</domain>\n")
}

/// A running two-disk domain (`/run/libvirt/qemu/vm2.xml`, a `<domstatus>`)
/// with an external disk-and-memory snapshot of both disks: the snapshot
/// is one point with `vda.raw` and `vdb.raw`, so is the current state
/// (named after the domain), the leaves QEMU holds are mounted read-only,
/// and a record whose embedded `<domain>` names another file than the
/// overlay backs onto is reported.
#[test]
fn libvirt_running_two_disk_domain() {
    let Some(ws) = workspace() else {
        return;
    };
    let root = ws.scratch("root");
    let run = root.join("run/libvirt/qemu");
    let snap = root.join("var/lib/libvirt/qemu/snapshot/vm2");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    let mut want = BTreeMap::new();
    for (dev, base, top) in [("vda", 0x11u8, 0x22u8), ("vdb", 0x55, 0x66)] {
        let b = format!("vm2-{dev}.qcow2");
        ws.create_qcow2(&b, SIZE, None, "");
        ws.qemu_io(&b, "qcow2", &[&format!("write -P {base} 0 1M")]);
        let o = format!("vm2-{dev}.s1");
        let bp = ws.img(&b);
        ws.create_qcow2(&o, SIZE, Some((bp.to_str().unwrap(), "qcow2")), "");
        ws.qemu_io(&o, "qcow2", &[&format!("write -P {top} 1M 1M")]);
        let mut then = vec![0u8; SIZE as usize];
        then[..MIB as usize].fill(base);
        let mut now = then.clone();
        now[MIB as usize..2 * MIB as usize].fill(top);
        want.insert(dev, (then, now));
    }
    let (vda, vdb) = (ws.img("vm2-vda.s1"), ws.img("vm2-vdb.s1"));
    let live = domain_vm2(&[(&vda, "vda"), (&vdb, "vdb")]);
    let status_xml = format!("<domstatus state='running' reason='booted' pid='4242'>\n  <monitor path='/var/lib/libvirt/qemu/domain-1-vm2/monitor.sock' type='unix'/>\n{live}</domstatus>\n");
    std::fs::write(run.join("vm2.xml"), status_xml).unwrap();
    let mem = root.join("s1.mem");
    let ram = pattern(9, MIB as usize);
    std::fs::write(&mem, &ram).unwrap();
    // The embedded <domain> names vda's base for vdb too: a record that
    // disagrees with the images.
    let then = domain_vm2(&[
        (&ws.img("vm2-vda.qcow2"), "vda"),
        (&ws.img("vm2-vda.qcow2"), "vdb"),
    ]);
    let disks = format!(
        "{}\n    {}",
        external_disk(&vda),
        external_disk(&vdb).replace("name='vda'", "name='vdb'")
    );
    let mem_xml = format!("<memory snapshot='external' file='{}'/>", mem.display());
    let s1 = record("s1", None, "both disks", &disks, &mem_xml)
        .replace("</domainsnapshot>", &format!("{then}</domainsnapshot>"));
    std::fs::write(snap.join("s1.xml"), s1).unwrap();
    // Both images held once qemu-img (without -U) cannot open them; one
    // fresh try if a loaded machine lost the first holders.
    let mut holders: Vec<Holder> = Vec::new();
    let mut held = false;
    for _ in 0..2 {
        holders.clear();
        holders.extend([
            Holder::hold(&ws, "vm2-vda.s1"),
            Holder::hold(&ws, "vm2-vdb.s1"),
        ]);
        held = wait_until(std::time::Duration::from_secs(30), || {
            ["vm2-vda.s1", "vm2-vdb.s1"]
                .iter()
                .all(|i| !ws.qemu_img_unchecked(&["info", i]).status.success())
        });
        if held {
            break;
        }
    }
    let logs: Vec<String> = ["vm2-vda.s1", "vm2-vdb.s1"]
        .iter()
        .map(|i| {
            std::fs::read_to_string(ws.scratch(&format!("{i}.holder.log"))).unwrap_or_default()
        })
        .collect();
    assert!(held, "qemu-io did not take the image locks: {logs:?}");
    let r = root.to_string_lossy().into_owned();
    let args = ["--domain", "vm2", "--libvirt-root", &r, "-o", "gc_idle=off"];
    let Some(m) = ws.mount_source(Path::new("vm2"), &args) else {
        return;
    };
    let mnt = m.mnt.clone();
    assert_eq!(visible(&mnt), super::names(&["s1", "vm2"]));
    assert_eq!(parent_link(&mnt, "vm2").as_deref(), Some("../s1"));
    for (dev, (then, now)) in &want {
        assert_bytes_eq(dev, &read_disk(&mnt.join(format!("s1/{dev}.raw"))), then);
        assert_bytes_eq(dev, &read_disk(&mnt.join(format!("vm2/{dev}.raw"))), now);
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join(format!("vm2/{dev}.raw")));
        assert!(w.is_err(), "{dev}: QEMU's leaf opened for writing");
    }
    assert_bytes_eq(
        "s1/memory.raw",
        &read_disk(&mnt.join("s1/memory.raw")),
        &ram,
    );
    let status = status_text(&mnt);
    for line in [
        "domain \"vm2\" is running",
        "disagreement: libvirt snapshot \"s1\": its overlay",
    ] {
        assert!(status.contains(line), "status lacks {line:?}:\n{status}");
    }
    unmount_ok(m);
}
