//! The open-file limit (`RLIMIT_NOFILE`), which a mount of many images
//! meets first.
//!
//! A mount keeps one descriptor per image for as long as it is mounted,
//! and that cannot be avoided by opening images lazily: the QEMU-compatible
//! locks (see `image::lock`) are OFD locks, which live exactly as long as
//! the descriptor that took them. Every layer holds one (a writer lock on
//! a leaf we write, a reader lock on every other layer so nobody writes a
//! backing file under us), so closing an idle image's descriptor would drop
//! its lock and let a VM or `qemu-img commit` write it while it is shown.
//! The data reads use the same descriptor, so there is one per image, not
//! two (QEMU, too, holds one per image in a chain).
//!
//! So instead: the soft limit is raised to the hard limit at startup
//! ([`raise`]); a tree that needs more descriptors than that is refused
//! before anything is opened ([`check_budget`]), with the count and the
//! limit in the message; and any "Too many open files" error names the
//! limit ([`hint`]).

use std::io;

/// Descriptors a mount uses besides one per image: standard streams, the
/// tree lock, `/dev/fuse` (one per FUSE thread), and files opened for a
/// moment by commands (snapshots, merges, journals, memory imports).
pub const RESERVE: u64 = 64;

/// (soft, hard) `RLIMIT_NOFILE`; `None` if it cannot be read.
pub fn limits() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a local struct.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0)
        .then_some((lim.rlim_cur, lim.rlim_max))
}

/// Lifts the soft limit to the hard one (deep chains and big trees keep one
/// descriptor per image, see the module docs).
pub fn raise() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A tree that needs more descriptors than the open-file limit allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {images} images need about {need} open files (one per image, which holds its QEMU-compatible lock, plus {RESERVE}), but the open-file limit (RLIMIT_NOFILE) is {soft} (hard limit {hard}); raise it, e.g. `ulimit -Hn {need}; ulimit -n {need}` as root, `LimitNOFILE={need}` in a systemd unit, or `nofile` in /etc/security/limits.conf", .dir.display())]
pub struct OverBudget {
    pub dir: std::path::PathBuf,
    pub images: u64,
    pub need: u64,
    pub soft: u64,
    pub hard: u64,
}

impl OverBudget {
    /// The errno of a call refused for it.
    pub fn errno(&self) -> i32 {
        libc::EMFILE
    }
}

/// Refuses a tree of `images` images when the descriptors it needs
/// (`images` + [`RESERVE`]) exceed the soft limit, which [`raise`] has
/// already lifted as far as it goes.
pub fn check_budget(images: u64, dir: &std::path::Path) -> Result<(), OverBudget> {
    let Some((soft, hard)) = limits() else {
        return Ok(());
    };
    let need = images.saturating_add(RESERVE);
    if need <= soft {
        return Ok(());
    }
    Err(OverBudget {
        dir: dir.to_path_buf(),
        images,
        need,
        soft,
        hard,
    })
}

/// For an error that is "Too many open files" (EMFILE, this process) or
/// "Too many open files in system" (ENFILE): a sentence naming the limit
/// to append to the message. Empty for any other error.
pub fn hint(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE) => match limits() {
            Some((soft, hard)) => format!(
                " (the open-file limit, RLIMIT_NOFILE, is {soft}, hard limit {hard}: a mount keeps one open file per image; raise it with `ulimit -n`)"
            ),
            None => " (the open-file limit, RLIMIT_NOFILE, is reached: a mount keeps one open file per image; raise it with `ulimit -n`)".into(),
        },
        Some(libc::ENFILE) => {
            " (the system-wide open-file limit is reached: see /proc/sys/fs/file-max)".into()
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_names_the_limit_only_for_emfile_and_enfile() {
        let (soft, hard) = limits().expect("getrlimit");
        let h = hint(&io::Error::from_raw_os_error(libc::EMFILE));
        assert!(h.contains(&format!("is {soft}, hard limit {hard}")), "{h}");
        assert!(hint(&io::Error::from_raw_os_error(libc::ENFILE)).contains("file-max"));
        assert_eq!(hint(&io::Error::from_raw_os_error(libc::ENOENT)), "");
    }

    #[test]
    fn budget_names_count_and_limit() {
        let (soft, _) = limits().expect("getrlimit");
        assert!(check_budget(0, std::path::Path::new("/t")).is_ok() || soft < RESERVE);
        let e = check_budget(soft, std::path::Path::new("/t"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{soft} images need about {}", soft + RESERVE)),
            "{e}"
        );
        assert!(e.contains(&format!("RLIMIT_NOFILE) is {soft}")), "{e}");
    }
}
