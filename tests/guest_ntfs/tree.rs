//! Helpers for the NTFS tests: running tools, an ntfs-3g mount that is
//! unmounted on drop, and walking a tree two ways (through ntfs-3g with
//! std::fs, and through our reader) into the same record shape.

use snaptree::guest::{FileKind, GuestFs};
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::Hasher;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn skip(why: &str) {
    eprintln!("SKIP: {why}");
}

/// Runs a command; Err with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The tools the NTFS tests need, or why not.
pub fn tools() -> Result<(), String> {
    for t in ["mkntfs", "ntfs-3g", "setfattr", "fusermount"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Err(format!("{t} not installed"));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse".into());
    }
    Ok(())
}

/// An ntfs-3g mount, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    pub fn new(img: &Path, dir: &Path, ro: bool) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let mut args = vec![img.to_str().unwrap(), dir.to_str().unwrap()];
        if ro {
            args.extend(["-o", "ro"]);
        }
        run("ntfs-3g", &args)?;
        Ok(Mount {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let d = self.dir.to_str().unwrap();
        if run("fusermount", &["-u", d]).is_err() {
            let _ = run("umount", &["-l", d]);
        }
    }
}

/// What is compared for each path.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Rec {
    pub ino: u64,
    pub kind: &'static str,
    pub size: u64,
    pub mtime: (i64, u32),
    pub target: Option<String>,
    pub content: Option<u64>,
    pub xattrs: BTreeMap<String, u64>,
}

pub type Tree = BTreeMap<String, Rec>;

fn hash(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(b);
    h.write_usize(b.len());
    h.finish()
}

fn user_xattrs(p: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(list) = run(
        "getfattr",
        &[
            "--absolute-names",
            "-h",
            "-d",
            "-e",
            "hex",
            "-m",
            "^user\\.",
            p.to_str().unwrap(),
        ],
    ) else {
        return out;
    };
    for l in list.lines().filter(|l| l.starts_with("user.")) {
        let (k, v) = l.split_once('=').unwrap();
        let v = v.trim_start_matches("0x");
        let bytes: Vec<u8> = (0..v.len() / 2)
            .map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        out.insert(k.to_string(), hash(&bytes));
    }
    out
}

/// Walks an ntfs-3g mount. Absolute symlink targets under the mount are
/// made relative to the link's directory, as our reader shows them.
pub fn walk_mount(root: &Path) -> Tree {
    let mut t = Tree::new();
    let mut todo = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = String::from_utf8(e.file_name().as_bytes().to_vec()).unwrap();
            let p = e.path();
            let path = format!("{rel}/{name}");
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else {
                "special"
            };
            let target = ft.is_symlink().then(|| {
                let t = std::fs::read_link(&p).unwrap();
                let t = t.to_str().unwrap().to_string();
                let prefix = format!("{}/", root.to_str().unwrap());
                match t.strip_prefix(&prefix) {
                    Some(abs) => format!("{}{abs}", "../".repeat(rel.matches('/').count())),
                    None => t,
                }
            });
            // A rewritten target's length is what our readlink gives.
            let size = match &target {
                Some(t) => t.len() as u64,
                None if ft.is_dir() => 0,
                None => m.size(),
            };
            let content = ft.is_file().then(|| hash(&std::fs::read(&p).unwrap()));
            t.insert(
                path.clone(),
                Rec {
                    ino: m.ino(),
                    kind,
                    size,
                    mtime: (m.mtime(), m.mtime_nsec() as u32),
                    target,
                    content,
                    xattrs: if ft.is_symlink() {
                        BTreeMap::new()
                    } else {
                        user_xattrs(&p)
                    },
                },
            );
            if ft.is_dir() {
                todo.push((p, path));
            }
        }
    }
    t
}

/// Walks our reader the same way.
pub fn walk_ours(fs: &dyn GuestFs) -> Tree {
    let mut t = Tree::new();
    let mut todo = vec![(fs.root(), String::new())];
    while let Some((dir, rel)) = todo.pop() {
        for e in fs.readdir(dir).unwrap() {
            let name = String::from_utf8(e.name.clone()).unwrap();
            let path = format!("{rel}/{name}");
            assert_eq!(fs.lookup(dir, &e.name).unwrap(), e.ino, "lookup {path}");
            let a = fs.getattr(e.ino).unwrap();
            assert_eq!(a.kind, e.kind, "readdir kind of {path}");
            let kind = match a.kind {
                FileKind::Dir => "dir",
                FileKind::Symlink => "symlink",
                FileKind::File => "file",
                _ => "special",
            };
            let target = (a.kind == FileKind::Symlink)
                .then(|| String::from_utf8(fs.readlink(e.ino).unwrap()).unwrap());
            let content = (a.kind == FileKind::File).then(|| {
                let mut b = vec![0u8; a.size as usize];
                let mut done = 0;
                while done < b.len() {
                    let n = fs
                        .read(
                            e.ino,
                            done as u64,
                            &mut b[done..(done + 131072).min(a.size as usize)],
                        )
                        .unwrap();
                    assert!(n > 0, "short read of {path}");
                    done += n;
                }
                hash(&b)
            });
            let mut xattrs = BTreeMap::new();
            if a.kind != FileKind::Symlink {
                for x in fs
                    .listxattr(e.ino)
                    .unwrap()
                    .into_iter()
                    .filter(|x| x.starts_with(b"user."))
                {
                    let v = fs.getxattr(e.ino, &x).unwrap();
                    xattrs.insert(String::from_utf8(x).unwrap(), hash(&v));
                }
            }
            t.insert(
                path.clone(),
                Rec {
                    ino: e.ino,
                    kind,
                    size: if a.kind == FileKind::Dir { 0 } else { a.size },
                    mtime: (a.mtime.secs, a.mtime.nsecs),
                    target,
                    content,
                    xattrs,
                },
            );
            if a.kind == FileKind::Dir {
                todo.push((e.ino, path));
            }
        }
    }
    t
}
