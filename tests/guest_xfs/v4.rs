//! v4 XFS (`mkfs.xfs -m crc=0`): this kernel no longer mounts it, so the
//! filesystem is populated by mkfs itself from a protofile (files copied
//! from a source tree, directories up to node form, local and remote
//! symlinks, devices, owners, setuid) and xattrs are added with
//! `xfs_db -x attr_set` (shortform, leaf and node forms; xfs_db 6.1
//! crashes making remote values on v4, so those are covered on v5 only). The judges are
//! the source tree and xfs_db (`ls` for names and inode numbers, `print`
//! for attr values).

use super::tree::{noise, sh_out};
use crate::{have, skip};
use snaptree::guest::{xfs, FileBytes, FileKind, GuestFs, ReadBytes};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// What the protofile makes: name -> (kind char, mode, uid, gid, data or target).
pub type Want = BTreeMap<String, (char, u16, u32, u32, Vec<u8>)>;

/// Writes the source files and the protofile; returns what to expect.
fn build(src: &Path, proto: &Path, big: usize) -> Want {
    let mut want = Want::new();
    let mut p = String::from("/dummy\n0 0\nd--755 0 0\n");
    let file =
        |want: &mut Want, p: &mut String, name: &str, mode: &str, uid: u32, data: Vec<u8>| {
            let path = src.join(name.replace('/', "_"));
            std::fs::write(&path, &data).unwrap();
            let leaf = name.rsplit('/').next().unwrap();
            writeln!(p, "{leaf} {mode} {uid} {uid} {}", path.display()).unwrap();
            let perm = u16::from_str_radix(&mode[3..], 8).unwrap()
                | if &mode[1..2] == "u" { 0o4000 } else { 0 };
            want.insert(name.to_string(), ('f', perm, uid, uid, data));
        };
    file(
        &mut want,
        &mut p,
        "hello",
        "---644",
        1000,
        b"hello, v4\n".to_vec(),
    );
    file(&mut want, &mut p, "empty", "---600", 0, Vec::new());
    file(
        &mut want,
        &mut p,
        "data-4097",
        "-u-755",
        70000,
        noise(1, 4097),
    );
    file(
        &mut want,
        &mut p,
        "data-3000001",
        "---644",
        0,
        noise(2, 3_000_001),
    );
    let long = format!("/{}/end", "component".repeat(100));
    writeln!(
        p,
        "short-link l--777 0 0 hello\nlong-link l--777 0 0 {long}"
    )
    .unwrap();
    want.insert("short-link".into(), ('l', 0o777, 0, 0, b"hello".to_vec()));
    want.insert("long-link".into(), ('l', 0o777, 0, 0, long.into_bytes()));
    writeln!(
        p,
        "null c--666 0 0 1 3\nsda b--660 0 6 8 1\nfifo p--644 0 0"
    )
    .unwrap();
    want.insert("null".into(), ('c', 0o666, 0, 0, Vec::new()));
    want.insert("sda".into(), ('b', 0o660, 0, 6, Vec::new()));
    want.insert("fifo".into(), ('p', 0o644, 0, 0, Vec::new()));
    for (d, n) in [("blockdir", 20), ("leafdir", 400), ("bigdir", big)] {
        writeln!(p, "{d} d--755 0 0").unwrap();
        want.insert(d.into(), ('d', 0o755, 0, 0, Vec::new()));
        for i in 0..n {
            let name = format!("{d}/entry-{i:06}-{}", "long-name-part-".repeat(1 + i % 9));
            file(
                &mut want,
                &mut p,
                &name,
                "---644",
                0,
                format!("{i}").into_bytes(),
            );
        }
        p.push_str("$\n");
    }
    p.push_str("$\n");
    std::fs::write(proto, p).unwrap();
    want
}

fn xfs_db(img: &Path, expert: bool, cmds: &[String]) -> String {
    let mut args = vec![if expert { "-x" } else { "-r" }.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(img.to_str().unwrap().into());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    sh_out("xfs_db", &a)
}

fn kind_char(k: FileKind) -> char {
    match k {
        FileKind::File => 'f',
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::CharDevice => 'c',
        FileKind::BlockDevice => 'b',
        FileKind::Fifo => 'p',
        FileKind::Socket => 's',
    }
}

/// Checks every expected entry through the reader.
fn check_entries(fs: &dyn GuestFs, want: &Want) {
    for (path, (kind, perm, uid, gid, data)) in want {
        let mut ino = fs.root();
        for part in path.split('/') {
            ino = fs
                .lookup(ino, part.as_bytes())
                .unwrap_or_else(|e| panic!("{path}: {e}"));
        }
        let a = fs.getattr(ino).unwrap();
        assert_eq!(
            (kind_char(a.kind), a.perm, a.uid, a.gid),
            (*kind, *perm, *uid, *gid),
            "{path}"
        );
        match kind {
            'f' => {
                assert_eq!(a.size, data.len() as u64, "{path}");
                let mut buf = vec![0u8; data.len()];
                assert_eq!(fs.read(ino, 0, &mut buf).unwrap(), data.len());
                assert!(buf == *data, "{path}: content differs");
            }
            'l' => assert_eq!(fs.readlink(ino).unwrap(), *data, "{path}"),
            _ => {}
        }
    }
    let root = fs.root();
    let null = fs.getattr(fs.lookup(root, b"null").unwrap()).unwrap();
    assert_eq!(null.rdev, 0x103);
}

/// Our readdir of `dir` against `xfs_db ls` (names and inode numbers).
fn check_ls(img: &Path, fs: &dyn GuestFs, dir: &str) {
    let out = xfs_db(img, false, &[format!("path /{dir}"), "ls".into()]);
    let mut theirs: Vec<(Vec<u8>, u64)> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[5] != "." && f[5] != "..")
                .then(|| (f[5].as_bytes().to_vec(), f[1].parse().unwrap()))
        })
        .collect();
    let d = fs.lookup(fs.root(), dir.as_bytes()).unwrap();
    let mut ours: Vec<(Vec<u8>, u64)> = fs
        .readdir(d)
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.ino))
        .collect();
    theirs.sort();
    ours.sort();
    assert_eq!(ours.len(), theirs.len(), "{dir}: entry count");
    assert!(ours == theirs, "{dir}: readdir differs from xfs_db ls");
}

/// Adds xattrs with xfs_db; returns the (inode path, names) set.
fn add_xattrs(img: &Path) -> Vec<(&'static str, Vec<(String, usize)>)> {
    let sets: Vec<(&str, Vec<(String, usize)>)> = vec![
        (
            "hello",
            vec![
                ("-u small".into(), 5),
                ("-r rootattr".into(), 9),
                ("-s secattr".into(), 3),
            ],
        ),
        // A leaf-form fork with a large local value (xfs_db 6.1 crashes
        // making remote values on v4).
        (
            "empty",
            vec![("-u first".into(), 10), ("-u big".into(), 3000)],
        ),
        (
            "leafdir",
            (0..200).map(|i| (format!("-u attr-{i:03}"), 40)).collect(),
        ),
    ];
    for (path, attrs) in &sets {
        let mut cmds = vec![format!("path /{path}")];
        cmds.extend(
            attrs
                .iter()
                .map(|(n, len)| format!("attr_set -v {len} {n}")),
        );
        xfs_db(img, true, &cmds);
    }
    sets
}

fn check_xattrs(fs: &dyn GuestFs, sets: &[(&str, Vec<(String, usize)>)]) {
    for (path, attrs) in sets {
        let ino = fs.lookup(fs.root(), path.as_bytes()).unwrap();
        let mut names = fs.listxattr(ino).unwrap();
        names.sort();
        let mut want: Vec<Vec<u8>> = attrs
            .iter()
            .map(|(n, _)| {
                let (flag, name) = n.split_once(' ').unwrap();
                let ns = match flag {
                    "-r" => "trusted.",
                    "-s" => "security.",
                    _ => "user.",
                };
                format!("{ns}{name}").into_bytes()
            })
            .collect();
        want.sort();
        assert_eq!(names, want, "{path}: xattr names");
        for ((_, len), name) in attrs.iter().zip(attrs.iter().map(|(n, _)| n)) {
            let (flag, n) = name.split_once(' ').unwrap();
            let full = match flag {
                "-r" => format!("trusted.{n}"),
                "-s" => format!("security.{n}"),
                _ => format!("user.{n}"),
            };
            let v = fs.getxattr(ino, full.as_bytes()).unwrap();
            // xfs_db attr_set fills values with 'v'.
            assert_eq!(v, vec![b'v'; *len], "{path}: {full}");
        }
    }
}

/// Builds the v4 image in `dir`: its path, what it holds and its xattrs;
/// None (after SKIP) if the tools are missing or refuse v4.
#[allow(clippy::type_complexity)]
pub fn image(
    dir: &Path,
    big: usize,
) -> Option<(
    std::path::PathBuf,
    Want,
    Vec<(&'static str, Vec<(String, usize)>)>,
)> {
    for tool in ["mkfs.xfs", "xfs_db"] {
        if !have(tool) {
            skip(&format!("{tool} missing"));
            return None;
        }
    }
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    let proto = dir.join("proto");
    let want = build(&src, &proto, big);
    let img = dir.join("v4.img");
    sh_out("truncate", &["-s", "500M", img.to_str().unwrap()]);
    let out = Command::new("mkfs.xfs")
        .args(["-q", "-f", "-m", "crc=0", "-L", "v4vol", "-p"])
        .arg(&proto)
        .arg(&img)
        .output()
        .unwrap();
    if !out.status.success() {
        skip(&format!(
            "mkfs.xfs -m crc=0: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
        return None;
    }
    let sets = add_xattrs(&img);
    Some((img, want, sets))
}

pub fn run(big: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let Some((img, want, sets)) = image(tmp.path(), big) else {
        return;
    };
    let bytes: Arc<dyn ReadBytes> = Arc::new(FileBytes::open(&img).unwrap());
    let fs = xfs::open("v4vol", bytes).unwrap();
    assert!(
        fs.info().notes.iter().all(|n| !n.starts_with("dirty log")),
        "{:?}",
        fs.info().notes
    );
    check_entries(&*fs, &want);
    for d in ["blockdir", "leafdir", "bigdir"] {
        check_ls(&img, &*fs, d);
    }
    check_xattrs(&*fs, &sets);
    let bigdir = fs.lookup(fs.root(), b"bigdir").unwrap();
    let fmt = xfs_db(
        &img,
        false,
        &[
            format!("inode {bigdir}"),
            "print core.version core.size".into(),
        ],
    );
    eprintln!(
        "v4: {} entries checked; bigdir {}",
        want.len(),
        fmt.replace('\n', " ")
    );
}
