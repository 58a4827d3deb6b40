//! Owners and permission bits of the files snaptree makes.
//!
//! A guest's disk and memory are as private as the files they come from.
//! A new image holds what its parent will hold next (a snapshot's overlay
//! takes the leaf's future writes; a memory delta holds the source's
//! pages), so it gets the owner and mode of the file it derives from, not
//! the process's umask. Each new file is created `0600` (nobody else can
//! open it before its mode is set), then given its owner with `fchown`
//! and its bits with `fchmod`, before it is renamed into place or used.
//!
//! Giving a file away needs root; a caller that is not root (or whose
//! file system refuses) keeps itself as the owner. When the group cannot be set either, the group bits are cut to
//! what everyone else may do: members of our group had only that on the
//! source.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Owner, group and mode bits as `stat` gives them; [`Ownership::apply`]
/// never copies the set-id and sticky bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl Ownership {
    /// The ownership of the file at `path` (following symlinks).
    pub fn of(path: &Path) -> std::io::Result<Ownership> {
        std::fs::metadata(path).map(|m| Ownership::from_meta(&m))
    }

    pub fn from_meta(m: &std::fs::Metadata) -> Ownership {
        Ownership {
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode() & 0o7777,
        }
    }

    /// The process's own identity with `mode`.
    pub fn own(mode: u32) -> Ownership {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ownership {
            uid,
            gid,
            mode: mode & 0o777,
        }
    }

    /// The same with the bits of `mask` only.
    pub fn masked(self, mask: u32) -> Ownership {
        Ownership {
            mode: self.mode & mask,
            ..self
        }
    }

    /// Gives the open file `f` (at `path`, for messages) this owner, as
    /// far as we may, and these bits.
    pub fn apply(&self, f: &File, path: &Path) -> std::io::Result<()> {
        let fd = f.as_raw_fd();
        // Root may give the file away; anyone may pick a group they are
        // in. Otherwise (or where the file system refuses, as NFS does
        // for a squashed root) the owner stays us, who could read the
        // source, and a group that stays ours has its bits cut below.
        // SAFETY: fchown on a descriptor we own.
        unsafe {
            if libc::fchown(fd, self.uid, self.gid) != 0 {
                let _ = libc::fchown(fd, u32::MAX, self.gid);
            }
        }
        let gid = f.metadata().map_err(|e| with_path(path, "stat", e))?.gid();
        let mut mode = self.mode & 0o777;
        if gid != self.gid {
            let group = (mode >> 3) & 0o7;
            let other = mode & 0o7;
            mode = (mode & !0o070) | ((group & other) << 3);
        }
        // SAFETY: fchmod on a descriptor we own.
        if unsafe { libc::fchmod(fd, mode as libc::mode_t) } != 0 {
            return Err(annotate(path, "chmod"));
        }
        Ok(())
    }

    /// [`Ownership::apply`] on the file at `path` (an image of the tree
    /// that is about to take another's place).
    pub fn apply_path(&self, path: &Path) -> std::io::Result<()> {
        let f = File::open(path).map_err(|e| with_path(path, "open", e))?;
        self.apply(&f, path)
    }
}

/// Options that create a new file (`create_new`) private to us when it
/// will get the ownership of another file, or with the usual `0666` less
/// umask when it will not (`like` is `None`).
pub fn new_file(like: Option<&Ownership>) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create_new(true);
    o.mode(if like.is_some() { 0o600 } else { 0o666 });
    o
}

/// Creates `path` (replacing a stale one) for atomic writes in the style
/// of the manifest's (temp file, then rename), with ownership `like`. The temporary names are
/// fixed, so a crafted tree may hold a symlink by that name: the old entry
/// (the link itself, never its target) is unlinked and `create_new`
/// (`O_EXCL`) never follows one that reappears.
pub fn create_replacing(path: &Path, like: &Ownership) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(path, "remove", e)),
    }
    let f = new_file(Some(like))
        .open(path)
        .map_err(|e| with_path(path, "create", e))?;
    like.apply(&f, path)?;
    Ok(f)
}

/// The ownership for a file of the tree directory `dir` that is not
/// derived from one image (the manifest, the merge journal): that of the
/// file it replaces if there is one, else the directory's owner with the
/// directory's read bits and the owner's write bit. Never writable by
/// anyone but the owner.
pub fn tree_file(dir: &Path, replaces: &Path) -> Ownership {
    let o = Ownership::of(replaces)
        .or_else(|_| Ownership::of(dir).map(|d| d.masked(0o444).with_bits(0o200)))
        .unwrap_or_else(|_| Ownership::own(0o600));
    o.masked(0o644)
}

impl Ownership {
    fn with_bits(self, bits: u32) -> Ownership {
        Ownership {
            mode: self.mode | bits,
            ..self
        }
    }
}

fn annotate(path: &Path, what: &str) -> std::io::Error {
    with_path(path, what, std::io::Error::last_os_error())
}

fn with_path(path: &Path, what: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_replacing_replaces_fifos_and_symlinks_not_their_targets() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let tmp = d.path().join("x.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let like = Ownership::own(0o600);
        create_replacing(&tmp, &like)
            .unwrap()
            .write_all(b"new")
            .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&tmp).unwrap(), b"new");
        std::fs::remove_file(&tmp).unwrap();
        let c = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        create_replacing(&tmp, &like)
            .unwrap()
            .write_all(b"new")
            .unwrap();
        assert!(std::fs::metadata(&tmp).unwrap().is_file());
    }

    #[test]
    fn new_file_takes_mode_not_umask() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        let like = Ownership::own(0o640);
        let f = new_file(Some(&like)).open(&p).unwrap();
        like.apply(&f, &p).unwrap();
        let got = Ownership::of(&p).unwrap();
        assert_eq!(got.mode, 0o640);
        // A second create of the same name fails: create_new.
        assert!(new_file(Some(&like)).open(&p).is_err());
    }

    #[test]
    fn tree_file_never_world_writable() {
        let d = tempfile::tempdir().unwrap();
        let old = d.path().join("old");
        std::fs::write(&old, b"").unwrap();
        std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .unwrap();
        assert_eq!(tree_file(d.path(), &old).mode, 0o644);
        let missing = d.path().join("missing");
        std::fs::set_permissions(
            d.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o750),
        )
        .unwrap();
        assert_eq!(tree_file(d.path(), &missing).mode, 0o640);
    }

    /// Not root: the file stays ours, the mode is applied, and a group we
    /// could not set gets no more than the others. Runs itself again as
    /// `nobody` through `setpriv` (the tests run as root).
    #[test]
    fn not_root_keeps_the_owner_and_cuts_a_foreign_groups_bits() {
        const CHILD: &str = "SNAPTREE_OWNERSHIP_CHILD_DIR";
        if let Some(dir) = std::env::var_os(CHILD) {
            let dir = std::path::PathBuf::from(dir);
            for (i, (mode, want)) in [(0o640, 0o600), (0o644, 0o644), (0o660, 0o600)]
                .into_iter()
                .enumerate()
            {
                let p = dir.join(format!("f{i}"));
                let like = Ownership {
                    uid: 1234,
                    gid: 1234,
                    mode,
                };
                let f = new_file(Some(&like)).open(&p).unwrap();
                like.apply(&f, &p).unwrap();
                let got = Ownership::of(&p).unwrap();
                assert_eq!(got.mode, want, "template {mode:o}");
                assert_eq!(got.uid, 65534);
            }
            return;
        }
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: needs root to run itself as nobody");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            d.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args([
                "--exact",
                "ownership::tests::not_root_keeps_the_owner_and_cuts_a_foreign_groups_bits",
            ])
            .env(CHILD, d.path())
            .output();
        let Ok(out) = out else {
            eprintln!("SKIP: setpriv (util-linux) is missing");
            return;
        };
        assert!(
            out.status.success(),
            "as nobody: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(d.path().join("f2").exists(), "the child ran the test");
    }
}
