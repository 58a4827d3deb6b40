//! Making FAT volumes with the real tools (`mkfs.vfat`, `mcopy`, `mdel`,
//! `mattrib`) for the FAT reader's tests, and opening them.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use snaptree::guest::fat;
use snaptree::guest::{FileBytes, GuestFs, ReadBytes};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn tools_or_skip() -> bool {
    for t in ["mkfs.vfat", "mcopy", "mdel", "mattrib", "mdir"] {
        if !have(t) {
            println!("SKIP: {t} not installed (apt-get install dosfstools mtools)");
            return false;
        }
    }
    true
}

/// Runs a tool with mtools' environment; panics with its stderr on failure.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("MTOOLSRC", "/dev/null")
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic bytes for file contents.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut r = SmallRng::seed_from_u64(seed);
    (0..len).map(|_| r.gen()).collect()
}

/// Writes the source tree; `many` is the size of the big directory.
pub fn make_tree(root: &Path, many: usize) {
    let w = |rel: &str, data: &[u8]| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    };
    w(
        "Long unicode name ünïcödé ☃ 日本語 with spaces.txt",
        b"unicode\n",
    );
    w("UPPER.TXT", b"upper\n");
    w("lower.txt", b"lower\n");
    w("Mixed.Txt", b"mixed\n");
    w("lowerdir/inner.c", b"int main;\n");
    w("a/b/c/d/e/deep file.txt", b"deep\n");
    w("big.bin", &noise(1, 1_500_000));
    w("empty.txt", b"");
    w("empty2", b"");
    w("readonly.txt", b"ro\n");
    for i in 0..many {
        let data = if i % 97 == 0 {
            noise(i as u64, 3000)
        } else {
            Vec::new()
        };
        w(&format!("many/f{i:04}.txt"), &data);
    }
}

/// A volume image made and filled by the real tools.
pub struct Volume {
    pub _dir: tempfile::TempDir,
    pub img: PathBuf,
}

/// `mkfs.vfat ARGS` on a `kib` KiB image, the tree copied in with `mcopy`,
/// `readonly.txt` marked read-only and a file fragmented by deleting every
/// other small file before copying it.
pub fn make_volume(mkfs_args: &[&str], kib: u64, many: usize) -> Volume {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fat.img");
    let img_s = img.to_str().unwrap().to_string();
    let kib_s = kib.to_string();
    let mut a = vec!["mkfs.vfat", "-C"];
    a.extend_from_slice(mkfs_args);
    a.extend_from_slice(&[&img_s, &kib_s]);
    run(&a);
    let src = dir.path().join("src");
    make_tree(&src, many);
    let mut a = vec![
        "mcopy".to_string(),
        "-s".into(),
        "-m".into(),
        "-i".into(),
        img_s.clone(),
    ];
    for e in std::fs::read_dir(&src).unwrap() {
        a.push(e.unwrap().path().to_str().unwrap().to_string());
    }
    a.push("::/".into());
    run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    run(&["mattrib", "-i", &img_s, "+r", "::/readonly.txt"]);
    // Fragment: small files, delete every other, then a file filling the gaps.
    let frag = dir.path().join("fragsrc");
    std::fs::create_dir(&frag).unwrap();
    let mut small = Vec::new();
    for i in 0..8 {
        let p = frag.join(format!("s{i}"));
        std::fs::write(&p, noise(100 + i, 4096)).unwrap();
        small.push(p.to_str().unwrap().to_string());
    }
    let mut a = vec!["mcopy", "-i", &img_s];
    a.extend(small.iter().map(String::as_str));
    a.push("::/");
    run(&a);
    run(&["mdel", "-i", &img_s, "::/s1", "::/s3", "::/s5"]);
    rewind_fsinfo_hint(&img);
    let f = dir.path().join("fragmented.bin");
    std::fs::write(&f, noise(7, 40_000)).unwrap();
    run(&["mcopy", "-m", "-i", &img_s, f.to_str().unwrap(), "::/"]);
    Volume { _dir: dir, img }
}

/// On FAT32, mtools allocates after the FSInfo "next free" hint, past the
/// gaps just freed; setting the hint to cluster 2 makes it fill them.
pub fn rewind_fsinfo_hint(img: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, 0).unwrap();
    if u16::from_le_bytes([b[22], b[23]]) != 0 {
        return; // FAT12/16: no FSInfo; mtools searches from the start
    }
    let bps = u64::from(u16::from_le_bytes([b[11], b[12]]));
    let fsinfo = u64::from(u16::from_le_bytes([b[48], b[49]])) * bps;
    let mut sig = [0u8; 4];
    f.read_exact_at(&mut sig, fsinfo).unwrap();
    assert_eq!(&sig, b"RRaA", "FSInfo signature");
    f.write_all_at(&2u32.to_le_bytes(), fsinfo + 492).unwrap();
}

/// Runs of `fragmented.bin` as sleuthkit's `istat -r` lists them, or `None`
/// without sleuthkit.
pub fn sleuthkit_runs(img: &Path) -> Option<usize> {
    if !have("fls") || !have("istat") {
        println!("SKIP: sleuthkit second opinion: fls/istat not installed");
        return None;
    }
    let img_s = img.to_str().unwrap();
    let list = run(&["fls", "-f", "fat", img_s]);
    let line = list.lines().find(|l| l.ends_with("\tfragmented.bin"))?;
    let inum = line
        .split(':')
        .next()?
        .split_whitespace()
        .last()?
        .to_string();
    let stat = run(&["istat", "-r", "-f", "fat", img_s, &inum]);
    Some(
        stat.lines()
            .filter(|l| l.contains("Starting address"))
            .count(),
    )
}

pub fn open(img: &Path) -> Arc<dyn GuestFs> {
    let bytes: Arc<dyn ReadBytes> = Arc::new(FileBytes::open(img).unwrap());
    assert!(fat::probe(&*bytes), "probe rejects {}", img.display());
    fat::open("testvol", bytes).unwrap()
}
