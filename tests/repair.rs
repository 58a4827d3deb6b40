//! Leak repair (`qcow2::repair::repair_leaks`) on images qemu-img made,
//! with leaks planted the way a killed flush leaves them: a cluster whose
//! refcount is 1 that nothing references. Judged by `qemu-img check` and by
//! the bytes `qemu-img convert` reads.

use std::path::Path;
use std::process::Command;

use snaptree::image::qcow2::repair::repair_leaks;

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok();
    if !ok {
        eprintln!("SKIP: qemu-img is not installed");
    }
    ok
}

fn run(args: &[&str], dir: &Path) -> std::process::Output {
    let o = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .expect("run");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `qemu-img check` exit status: 0 clean, 3 leaks only, 2 corruption.
fn check(dir: &Path, img: &str) -> i32 {
    Command::new("qemu-img")
        .args(["check", "-q", img])
        .current_dir(dir)
        .status()
        .expect("qemu-img check")
        .code()
        .unwrap_or(-1)
}

fn flat(dir: &Path, img: &str) -> Vec<u8> {
    run(&["qemu-img", "convert", "-O", "raw", img, "flat.raw"], dir);
    std::fs::read(dir.join("flat.raw")).expect("read flat")
}

fn be(b: &[u8], at: usize, n: usize) -> u64 {
    b[at..at + n].iter().fold(0, |v, x| v << 8 | *x as u64)
}

/// Appends `n` clusters to the image and gives each refcount 1 in the
/// first refcount block (16-bit refcounts), as a flush killed after its
/// refcount increments leaves them.
fn plant_leaks(path: &Path, n: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut h = vec![0u8; 104];
    f.read_exact_at(&mut h, 0).expect("header");
    let cs = 1u64 << be(&h, 20, 4);
    assert_eq!(be(&h, 96, 4), 4, "test expects 16-bit refcounts");
    let rt = be(&h, 48, 8);
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, rt).expect("refcount table");
    let block = be(&e, 0, 8);
    let len = f.metadata().expect("stat").len().div_ceil(cs) * cs;
    for i in 0..n {
        let c = len / cs + i;
        assert!(c < cs / 2, "test image too big for one refcount block");
        f.write_all_at(&1u16.to_be_bytes(), block + c * 2)
            .expect("refcount");
    }
    f.set_len(len + n * cs).expect("extend");
}

#[test]
fn planted_leaks_are_freed_and_data_kept() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    run(
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "base.qcow2",
            "16M",
        ],
        d,
    );
    run(
        &[
            "qemu-io",
            "-c",
            "write -P 7 0 3M",
            "-c",
            "write -z 5M 1M",
            "base.qcow2",
        ],
        d,
    );
    run(
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "top.qcow2",
        ],
        d,
    );
    run(&["qemu-io", "-c", "write -P 9 100k 300k", "top.qcow2"], d);
    // Compressed clusters too.
    run(
        &[
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "base.qcow2",
            "comp.qcow2",
        ],
        d,
    );
    for img in ["base.qcow2", "top.qcow2", "comp.qcow2"] {
        let before = flat(d, img);
        assert_eq!(
            repair_leaks(&d.join(img)).expect("repair clean"),
            Some(0),
            "{img}: clean image"
        );
        plant_leaks(&d.join(img), 3);
        assert_eq!(check(d, img), 3, "{img}: planted leaks must show as leaks");
        assert_eq!(
            repair_leaks(&d.join(img)).expect("repair"),
            Some(3),
            "{img}"
        );
        assert_eq!(check(d, img), 0, "{img}: check after repair");
        assert!(flat(d, img) == before, "{img}: bytes changed by repair");
    }
}

#[test]
fn images_with_snapshots_are_left_alone() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let d = t.path();
    run(
        &["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "4M"],
        d,
    );
    run(&["qemu-img", "snapshot", "-c", "one", "s.qcow2"], d);
    let bytes = std::fs::read(d.join("s.qcow2")).expect("read");
    assert_eq!(repair_leaks(&d.join("s.qcow2")).expect("repair"), None);
    assert!(
        std::fs::read(d.join("s.qcow2")).expect("read") == bytes,
        "file changed"
    );
}
