//! Memory checkpoints through the mount: `memory SOURCE` on a point's
//! `ctl` shows the source as `memory.raw` (read in place, by guest-physical
//! address), kept in the manifest across remounts, moved to the frozen
//! point by `snapshot`, read-only, with holes where the source has none.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::Value;

use super::*;

const RAM: u64 = 16 * MIB;

/// A raw dump: random pages, whole zero pages, and a sparse hole.
fn raw_dump(ws: &Workspace, name: &str) -> Vec<u8> {
    let mut ram = pattern(42, RAM as usize);
    ram[(3 * MIB) as usize..(3 * MIB + 8192) as usize].fill(0);
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(ws.img(name))
        .expect("create dump");
    f.write_all_at(&ram[..(8 * MIB) as usize], 0)
        .expect("write dump");
    // 8..12 MiB stays a hole in the file (zeros), then data again.
    ram[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    f.write_all_at(&ram[(12 * MIB) as usize..], 12 * MIB)
        .expect("write dump");
    ram
}

#[test]
fn memory_checkpoint_of_a_raw_dump() {
    let Some(ws) = base_and_leaf_workspace(RAM) else {
        return;
    };
    let ram = raw_dump(&ws, "leaf.vmem");
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    assert!(!mnt.join("leaf/memory.raw").exists(), "no checkpoint yet");
    // Refusals: a missing file, a disk image of the tree.
    assert_errno(
        "memory of a missing file",
        ctl(&mnt, "leaf", "memory nosuch.vmem"),
        libc::ENOENT,
    );
    assert_errno(
        "memory of a disk image",
        ctl(&mnt, "leaf", "memory base.qcow2"),
        libc::EINVAL,
    );
    assert!(status_text(&mnt).contains("disk image of this tree"));

    ctl_ok(&mnt, "leaf", "memory leaf.vmem");
    let mem = mnt.join("leaf/memory.raw");
    assert_bytes_eq("leaf/memory.raw", &read_disk(&mem), &ram);
    let i = info(&mnt, "leaf");
    assert_eq!(i["memory"]["source"], "leaf.vmem", "{i}");
    assert_eq!(i["memory"]["kind"], "raw dump", "{i}");
    assert_eq!(i["memory"]["size"], RAM, "{i}");
    // The file's hole is a hole of memory.raw too.
    let f = std::fs::File::open(&mem).expect("open memory.raw");
    let data: Vec<(u64, u64)> = data_ranges(&f, RAM);
    drop(f); // an open file would keep the unmount below busy
    assert!(
        data.iter().all(|&(s, e)| e <= 8 * MIB || s >= 12 * MIB),
        "data reported inside the dump's hole: {data:?}"
    );
    assert_errno(
        "write to memory.raw",
        OpenOptions::new().write(true).open(&mem),
        libc::EROFS,
    );

    // The checkpoint moves to the point a snapshot freezes.
    ctl_ok(&mnt, "leaf", "snapshot s1");
    assert!(!mnt.join("leaf/memory.raw").exists());
    assert_bytes_eq(
        "s1/memory.raw",
        &read_disk(&mnt.join("s1/memory.raw")),
        &ram,
    );
    unmount_ok(m);

    // Kept in the manifest.
    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_eq!(visible(&m.mnt), names(&["base", "s1", "leaf"]));
    assert_bytes_eq(
        "s1/memory.raw after remount",
        &read_disk(&m.mnt.join("s1/memory.raw")),
        &ram,
    );
    // Read through the page cache (not dropped), then another source on
    // the same point: the same file name and inode must not serve the
    // old bytes.
    assert_bytes_eq(
        "s1/memory.raw, cached",
        &std::fs::read(m.mnt.join("s1/memory.raw")).unwrap(),
        &ram,
    );
    // While it is open (the kernel keeps the inode and its pages), the
    // point's memory cannot change.
    let held = std::fs::File::open(m.mnt.join("s1/memory.raw")).unwrap();
    assert_errno(
        "memory none while memory.raw is open",
        ctl(&m.mnt, "s1", "memory none"),
        libc::EBUSY,
    );
    assert!(status_text(&m.mnt).contains("memory.raw is open"));
    drop(held);
    ctl_ok(&m.mnt, "s1", "memory none");
    assert!(!m.mnt.join("s1/memory.raw").exists());
    assert!(info(&m.mnt, "s1")["memory"].is_null());
    let other = pattern(43, RAM as usize);
    std::fs::write(ws.img("other.vmem"), &other).unwrap();
    ctl_ok(&m.mnt, "s1", "memory other.vmem");
    assert_bytes_eq(
        "s1/memory.raw, another source",
        &std::fs::read(m.mnt.join("s1/memory.raw")).unwrap(),
        &other,
    );
    ctl_ok(&m.mnt, "s1", "memory none");
    unmount_ok(m);
    assert!(
        ws.img("leaf.vmem").exists(),
        "the dump itself is never removed"
    );
}

/// Pages of `len` bytes of data at depth 0 of `image` (a memory delta),
/// by `qemu-img map`: `(first page, pages, zero)`.
fn own_pages(ws: &Workspace, image: &str) -> Vec<(u64, u64, bool)> {
    let out = ws.qemu_img(&["map", "-U", "--output=json", image]);
    let map: Vec<Value> = serde_json::from_slice(&out.stdout).expect("qemu-img map json");
    map.iter()
        .filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true))
        .map(|e| {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            (s / PAGE, l / PAGE, e["data"] == false)
        })
        .collect()
}

const PAGE: u64 = 4096;

/// `qemu-img convert -O raw` of `image` (in the tree directory).
fn qemu_convert(ws: &Workspace, image: &str) -> Vec<u8> {
    let out = ws.scratch("converted.raw");
    let _ = std::fs::remove_file(&out);
    ws.qemu_img(&["convert", "-U", "-O", "raw", image, out.to_str().unwrap()]);
    std::fs::read(&out).expect("read converted")
}

fn check_clean(ws: &Workspace, image: &str) {
    let out = ws.qemu_img(&["check", "-U", image]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("No errors were found"),
        "qemu-img check {image}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn page_delta_checkpoints_store_only_changed_pages_and_survive_merges() {
    let Some(ws) = base_and_leaf_workspace(RAM) else {
        return;
    };
    // Two checkpoints of a guest that changed a few pages in between:
    // three pages rewritten, two neighbours, one page zeroed, one zero
    // page written.
    let ram1 = {
        let mut r = pattern(7, RAM as usize);
        r[(5 * MIB) as usize..(6 * MIB) as usize].fill(0);
        r
    };
    let mut ram2 = ram1.clone();
    let changed_pages = [3u64, 1000, 1001];
    for p in changed_pages {
        ram2[(p * PAGE + 17) as usize] ^= 0xff;
    }
    ram2[(2000 * PAGE) as usize..(2001 * PAGE) as usize].fill(0);
    let filled = 5 * MIB / PAGE + 3;
    ram2[(filled * PAGE) as usize..((filled + 1) * PAGE) as usize].fill(0x5a);
    std::fs::write(ws.img("ram1.vmem"), &ram1).unwrap();
    std::fs::write(ws.img("ram2.vmem"), &ram2).unwrap();
    let (src1, src2) = (ws.img("ram1.vmem"), ws.img("ram2.vmem"));
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();

    // base: a whole checkpoint, zero pages as holes.
    ctl_ok(&mnt, "base", &format!("checkpoint {}", src1.display()));
    assert_bytes_eq(
        "base/memory.raw",
        &read_disk(&mnt.join("base/memory.raw")),
        &ram1,
    );
    let i = info(&mnt, "base");
    assert_eq!(i["memory"]["kind"], "page-delta checkpoint (qcow2)", "{i}");
    let base_delta = i["memory"]["source"].as_str().unwrap().to_string();
    assert_eq!(base_delta, ".snaptree-memory/base.qcow2");
    let pages = own_pages(&ws, &base_delta);
    let stored: u64 = pages.iter().filter(|p| !p.2).map(|p| p.1).sum();
    assert_eq!(
        stored,
        RAM / PAGE - MIB / PAGE,
        "every non-zero page: {pages:?}"
    );
    assert_bytes_eq(
        "qemu-img convert of base's delta",
        &qemu_convert(&ws, &base_delta),
        &ram1,
    );
    assert!(status_text(&mnt).contains("last command: base/ctl: checkpoint"));
    let tree = tree_text(&mnt);
    assert!(tree.contains("; memory 16.0 MiB (delta)"), "{tree}");

    // s1 (the leaf frozen) on base: only what changed.
    ctl_ok(&mnt, "leaf", "snapshot s1");
    ctl_ok(&mnt, "s1", &format!("checkpoint {}", src2.display()));
    assert_bytes_eq(
        "s1/memory.raw",
        &read_disk(&mnt.join("s1/memory.raw")),
        &ram2,
    );
    let s1_delta = info(&mnt, "s1")["memory"]["source"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(info(&mnt, "s1")["memory"]["chain_depth"], 2);
    assert_eq!(
        own_pages(&ws, &s1_delta),
        vec![
            (3, 1, false),
            (1000, 2, false),
            (filled, 1, false),
            (2000, 1, true)
        ],
        "the delta holds the changed pages only (zeroed page as a zero cluster)"
    );
    assert_bytes_eq(
        "qemu-img convert of s1's delta",
        &qemu_convert(&ws, &s1_delta),
        &ram2,
    );
    check_clean(&ws, &s1_delta);
    // The base's memory did not change.
    assert_bytes_eq(
        "base/memory.raw again",
        &read_disk(&mnt.join("base/memory.raw")),
        &ram1,
    );
    assert_errno(
        "a second checkpoint of s1",
        ctl(&mnt, "s1", &format!("checkpoint {}", src1.display())),
        libc::EEXIST,
    );

    // The leaf gets one too, on s1's; deleting the leaf removes it.
    ctl_ok(&mnt, "leaf", &format!("checkpoint {}", src1.display()));
    assert_bytes_eq(
        "leaf/memory.raw",
        &read_disk(&mnt.join("leaf/memory.raw")),
        &ram1,
    );
    assert_eq!(
        memory_dir_files(&ws),
        names(&["base.qcow2", "s1.qcow2", "leaf.qcow2"])
    );
    ctl_ok(&mnt, "leaf", "delete");
    assert_eq!(memory_dir_files(&ws), names(&["base.qcow2", "s1.qcow2"]));

    // Deleting base hides it (s1 needs it); merging it away puts its pages
    // into s1's delta first: s1's memory reads the same throughout.
    let reader = std::fs::File::open(mnt.join("s1/memory.raw")).unwrap();
    ctl_ok(&mnt, "base", "delete");
    assert_bytes_eq(
        "s1/memory.raw, base hidden",
        &read_disk(&mnt.join("s1/memory.raw")),
        &ram2,
    );
    std::fs::write(mnt.join("merge-now"), "1").expect("merge-now");
    assert_eq!(visible(&mnt), names(&["s1"]));
    assert_bytes_eq(
        "s1/memory.raw after the merge",
        &read_disk(&mnt.join("s1/memory.raw")),
        &ram2,
    );
    assert_eq!(
        read_at(&reader, 0, RAM as usize),
        ram2,
        "a file opened before the merge reads the same"
    );
    drop(reader);
    assert_eq!(
        memory_dir_files(&ws),
        names(&["s1.qcow2"]),
        "base's delta is gone"
    );
    assert_eq!(info(&mnt, "s1")["memory"]["chain_depth"], 1);
    check_clean(&ws, &s1_delta);
    assert_bytes_eq(
        "qemu-img convert of s1's delta alone",
        &qemu_convert(&ws, &s1_delta),
        &ram2,
    );
    unmount_ok(m);

    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_bytes_eq(
        "s1/memory.raw after remount",
        &read_disk(&m.mnt.join("s1/memory.raw")),
        &ram2,
    );
    unmount_ok(m);
}

/// A paused VM whose RAM is `ram`, or `None` (printed SKIP) without
/// qemu-system-x86_64.
fn vm(ws: &Workspace, ram: &[u8]) -> Option<super::qemu_vm::Vm> {
    use super::qemu_vm::{Vm, VmError};
    let dir = ws.scratch("vm");
    std::fs::create_dir_all(&dir).unwrap();
    let ram_file = dir.join("ram.bin");
    std::fs::write(&ram_file, ram).unwrap();
    match Vm::start(&dir, &ram_file, ram.len() as u64, false) {
        Ok(vm) => Some(vm),
        Err(VmError::Missing(why)) | Err(VmError::NoStart(why)) => {
            skip(&why);
            None
        }
    }
}

/// A migration stream of a paused VM whose RAM is `ram`, saved to `to`.
fn vm_stream(ws: &Workspace, ram: &[u8], to: &Path) -> Option<()> {
    let mut vm = vm(ws, ram)?;
    vm.migrate_to_file(to);
    vm.quit();
    Some(())
}

#[test]
fn every_kind_of_source_reads_through_memory_raw() {
    const VM_RAM: u64 = 32 * MIB;
    let Some(ws) = base_and_leaf_workspace(RAM) else {
        return;
    };
    let ram = {
        let mut r = pattern(23, VM_RAM as usize);
        r[(3 * MIB) as usize..(4 * MIB) as usize].fill(0);
        r
    };
    let (plain, mapped, core, dump) = (
        ws.img("plain.mig"),
        ws.img("mapped.mig"),
        ws.img("core.elf"),
        ws.img("ram.vmem"),
    );
    // QEMU migrates a VM once: two VMs on the same RAM.
    let Some(mut first) = vm(&ws, &ram) else {
        return;
    };
    first.migrate_to_file(&plain);
    first.dump_guest_memory(&core);
    first.quit();
    let Some(mut second) = vm(&ws, &ram) else {
        return;
    };
    second.set_capability("mapped-ram", true);
    second.migrate_to_file(&mapped);
    second.quit();
    std::fs::write(&dump, &ram).unwrap();
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "base", "clone c1");
    ctl_ok(&mnt, "base", "clone c2");
    for (point, src, kind) in [
        ("base", &plain, "qemu migration stream"),
        ("leaf", &mapped, "qemu migration stream (mapped-ram)"),
        ("c1", &dump, "raw dump"),
        ("c2", &core, "elf core"),
    ] {
        ctl_ok(&mnt, point, &format!("memory {}", src.display()));
        assert_eq!(info(&mnt, point)["memory"]["kind"], kind);
        let f = File::open(mnt.join(point).join("memory.raw")).expect("open memory.raw");
        if kind == "elf core" {
            // Guest-physical: RAM, the ROMs over 0xc0000..1 MiB, the BIOS
            // below 4 GiB, nothing in between.
            let size = f.metadata().unwrap().len();
            assert_eq!(size, 4 << 30);
            assert_bytes_eq(
                "ELF core, low RAM",
                &read_at(&f, 0, 0xc0000),
                &ram[..0xc0000],
            );
            assert_bytes_eq(
                "ELF core, RAM above 1 MiB",
                &read_at(&f, 0x100000, (VM_RAM - 0x100000) as usize),
                &ram[0x100000..],
            );
            let data = data_ranges(&f, size);
            assert!(
                data.iter().all(|&(s, e)| e <= VM_RAM || s >= 0xfffc0000),
                "data reported in the PCI hole: {data:?}"
            );
        } else {
            assert_bytes_eq(
                &format!("{point}/memory.raw ({kind})"),
                &read_disk(&mnt.join(point).join("memory.raw")),
                &ram,
            );
            if kind == "raw dump" {
                continue; // written whole: its zero pages are data in the file
            }
            let data = data_ranges(&f, VM_RAM);
            assert!(
                data.iter().all(|&(s, e)| e <= 3 * MIB || s >= 4 * MIB),
                "{kind}: data reported for zero pages: {data:?}"
            );
        }
    }
    unmount_ok(m);
}

#[test]
fn checkpoints_of_real_migration_streams() {
    const VM_RAM: u64 = 32 * MIB;
    let Some(ws) = base_and_leaf_workspace(RAM) else {
        return;
    };
    let ram1 = {
        let mut r = pattern(11, VM_RAM as usize);
        r[(MIB as usize)..(2 * MIB) as usize].fill(0);
        r
    };
    let mut ram2 = ram1.clone();
    for p in [17u64, 18, 4000, 7000] {
        ram2[(p * PAGE) as usize] ^= 1;
    }
    let (s1, s2) = (ws.img("one.mig"), ws.img("two.mig"));
    if vm_stream(&ws, &ram1, &s1).is_none() || vm_stream(&ws, &ram2, &s2).is_none() {
        return;
    }
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();

    // In place: the stream itself, RAM by guest-physical address, the
    // firmware blocks under memory/.
    ctl_ok(&mnt, "base", &format!("memory {}", s1.display()));
    assert_bytes_eq(
        "base/memory.raw (stream in place)",
        &read_disk(&mnt.join("base/memory.raw")),
        &ram1,
    );
    let i = info(&mnt, "base");
    assert_eq!(i["memory"]["kind"], "qemu migration stream", "{i}");
    assert_eq!(i["memory"]["ram_block"], "mem", "{i}");
    let blocks: BTreeSet<String> = std::fs::read_dir(mnt.join("base/memory"))
        .expect("base/memory/")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        blocks.contains("pc.bios.raw") && blocks.contains("pc.rom.raw"),
        "{blocks:?}"
    );
    let bios = read_disk(&mnt.join("base/memory/pc.bios.raw"));
    assert_eq!(bios.len(), 256 << 10);
    if let Ok(want) = std::fs::read("/usr/share/seabios/bios-256k.bin") {
        assert_bytes_eq(
            "memory/pc.bios.raw is the firmware QEMU loaded",
            &bios,
            &want,
        );
    }
    // Its index is cached beside the tree, used by the next mount, and
    // rebuilt when the stream changes.
    let index_files = || {
        std::fs::read_dir(ws.img(".snaptree-memory/index"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let cached = index_files();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let first = std::fs::metadata(&cached[0]).unwrap().modified().unwrap();
    unmount_ok(m);
    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_bytes_eq(
        "base/memory.raw (index from the cache)",
        &read_disk(&m.mnt.join("base/memory.raw")),
        &ram1,
    );
    assert_eq!(
        std::fs::metadata(&cached[0]).unwrap().modified().unwrap(),
        first
    );
    unmount_ok(m);
    let t = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    File::options()
        .write(true)
        .open(&s1)
        .unwrap()
        .set_modified(t)
        .unwrap();
    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_bytes_eq(
        "base/memory.raw (indexed again)",
        &read_disk(&m.mnt.join("base/memory.raw")),
        &ram1,
    );
    assert_ne!(
        std::fs::metadata(&cached[0]).unwrap().modified().unwrap(),
        first
    );
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "base", "memory none");
    assert!(
        index_files().is_empty(),
        "the index goes with the last point naming it"
    );

    // Imported: the first whole, the second as a delta of four pages.
    ctl_ok(&mnt, "base", &format!("checkpoint {}", s1.display()));
    ctl_ok(&mnt, "leaf", "snapshot s1");
    ctl_ok(&mnt, "s1", &format!("checkpoint {}", s2.display()));
    assert_bytes_eq(
        "base/memory.raw",
        &read_disk(&mnt.join("base/memory.raw")),
        &ram1,
    );
    assert_bytes_eq(
        "s1/memory.raw",
        &read_disk(&mnt.join("s1/memory.raw")),
        &ram2,
    );
    let delta = ".snaptree-memory/s1.qcow2";
    assert_eq!(
        own_pages(&ws, delta),
        vec![(17, 2, false), (4000, 1, false), (7000, 1, false)],
        "s1's delta holds the four changed pages only"
    );
    assert_bytes_eq(
        "qemu-img convert of s1's delta",
        &qemu_convert(&ws, delta),
        &ram2,
    );
    check_clean(&ws, delta);
    unmount_ok(m);

    // Offline, the same against s1: back to the first stream's pages.
    let out = run(std::process::Command::new(bin()).args([
        "checkpoint",
        "import",
        ws.images.to_str().unwrap(),
        "leaf",
        s1.to_str().unwrap(),
        "--wait-ms",
        "1",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": 4 stored,"), "{text}");
    let m = ws.remount(&["-o", "gc_idle=off,ro"]);
    assert_bytes_eq(
        "leaf/memory.raw (offline import)",
        &read_disk(&m.mnt.join("leaf/memory.raw")),
        &ram1,
    );
    assert_eq!(info(&m.mnt, "leaf")["memory"]["chain_depth"], 3);
    unmount_ok(m);
}
