//! Image locking compatible with QEMU's, so snaptree and QEMU (a running
//! VM, qemu-img, qemu-io, another snaptree) never write one image at once.
//!
//! QEMU's file driver describes who uses an image with open-file-description
//! (OFD) read locks on single bytes: byte `100 + p` means "I use permission
//! p", byte `200 + p` means "I do not let others have permission p". Before
//! taking its locks a user tests that nobody holds `200 + p` for a
//! permission p it wants, and nobody holds `100 + p` for one it refuses to
//! share. Permissions: 0 consistent read, 1 write, 2 write-unchanged,
//! 3 resize. The locks die with the descriptor, also when the process is
//! killed. They are taken on the layer's own descriptor, the one its reads
//! use: that is why a mount keeps one descriptor per image open for as
//! long as it is mounted, and cannot close idle ones (see `crate::fdlimit`).

use crate::image::storage::Storage;
use std::fs::File;
use std::os::unix::io::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// How an image is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// A leaf we write: all permissions, sharing only reads.
    Writer,
    /// A layer we only read and whose bytes must not change under us.
    Reader,
}

impl LockMode {
    /// (permissions used, permissions not shared), as bit masks.
    fn masks(self) -> (u32, u32) {
        match self {
            LockMode::Writer => (0b1111, 0b1010),
            LockMode::Reader => (0b0001, 0b1010),
        }
    }
}

fn flock(ty: i32, start: i64) -> libc::flock {
    // SAFETY: flock is plain data; zero is a valid start for every field.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = ty as libc::c_short;
    f.l_whence = libc::SEEK_SET as libc::c_short;
    f.l_start = start;
    f.l_len = 1;
    f
}

/// Whether another open file description holds a lock on `byte`.
fn held_by_other(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut f = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK fills the struct we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut f) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f.l_type != libc::F_UNLCK as libc::c_short)
}

fn set(file: &File, ty: i32, byte: i64) -> std::io::Result<()> {
    let f = flock(ty, byte);
    // SAFETY: F_OFD_SETLK reads the struct we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &f) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process uses the image in a way `mode` cannot share.
    #[error("another process (a running VM, qemu-img, another mount?) {}", if *.holds { format!("holds the {} permission", .permission) } else { format!("does not share the {} permission", .permission) })]
    Conflict {
        permission: &'static str,
        /// It holds the permission (else: it refuses to share it).
        holds: bool,
    },
    /// The system refused to test or set a lock byte.
    #[error("{} byte {byte}: {source}", if *.testing { "testing lock" } else { "locking" })]
    Io {
        byte: i64,
        testing: bool,
        source: std::io::Error,
    },
}

impl LockError {
    /// The errno of a call refused for it.
    pub fn errno(&self) -> i32 {
        match self {
            LockError::Conflict { .. } => libc::EBUSY,
            LockError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Tests for conflicts, then takes the locks of `mode`. The error says
/// which permission another process holds or refuses.
///
/// Storage without a descriptor (memory, in unit tests) is never shared,
/// so it takes no locks.
pub fn acquire(storage: &dyn Storage, mode: LockMode) -> Result<(), LockError> {
    let Some(file) = storage.as_file() else {
        return Ok(());
    };
    let (used, unshared) = mode.masks();
    for (p, name) in PERM_NAMES.iter().enumerate() {
        let bit = 1 << p;
        let busy = |byte: i64| {
            held_by_other(file, byte).map_err(|source| LockError::Io {
                byte,
                testing: true,
                source,
            })
        };
        if used & bit != 0 && busy(SHARED_BASE + p as i64)? {
            return Err(LockError::Conflict {
                permission: name,
                holds: false,
            });
        }
        if unshared & bit != 0 && busy(PERM_BASE + p as i64)? {
            return Err(LockError::Conflict {
                permission: name,
                holds: true,
            });
        }
    }
    for p in 0..PERM_NAMES.len() as i64 {
        let bit = 1 << p;
        let take = |byte: i64| {
            set(file, libc::F_RDLCK, byte).map_err(|source| LockError::Io {
                byte,
                testing: false,
                source,
            })
        };
        if used & bit != 0 {
            take(PERM_BASE + p)?;
        }
        if unshared & bit != 0 {
            take(SHARED_BASE + p)?;
        }
    }
    Ok(())
}

/// Drops every lock this descriptor holds (before reopening the same
/// image in another mode, where our own locks would conflict).
pub fn release(storage: &dyn Storage) {
    let Some(file) = storage.as_file() else {
        return;
    };
    for p in 0..PERM_NAMES.len() as i64 {
        let _ = set(file, libc::F_UNLCK, PERM_BASE + p);
        let _ = set(file, libc::F_UNLCK, SHARED_BASE + p);
    }
}
