//! Errors of guest volumes and filesystems. Each names the volume (or disk)
//! it happened on and, for damage, the byte offset inside that volume, so a
//! user can find the bad spot with `xxd` on `volumes/<vol>.raw`.

use std::io;

/// Everything that can go wrong reading a guest volume or filesystem.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Reading the underlying disk failed (or the range ran past its end).
    #[error("{volume}: read of {len} bytes at offset {offset} failed: {source}")]
    Io {
        volume: String,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    /// The structure contradicts its format. Nothing is guessed.
    #[error("{volume}: corrupt {what} at offset {offset}")]
    Corrupt {
        volume: String,
        offset: u64,
        what: String,
    },
    /// Valid, but uses something snaptree does not read (inline_data,
    /// encryption, compression ...). The volume or file fails; never wrong bytes.
    #[error("{volume}: unsupported: {what}")]
    Unsupported { volume: String, what: String },
    /// No such entry.
    #[error("not found")]
    NotFound,
    /// A directory operation on a non-directory.
    #[error("not a directory")]
    NotDir,
    /// A file operation on a directory.
    #[error("is a directory")]
    IsDir,
    /// An operation the kind of inode does not have (readlink of a file,
    /// reading a device node ...).
    #[error("invalid for this kind of file")]
    Invalid,
}

pub type GuestResult<T> = Result<T, GuestError>;

impl GuestError {
    pub fn io(volume: &str, offset: u64, len: usize, source: io::Error) -> Self {
        GuestError::Io {
            volume: volume.to_string(),
            offset,
            len,
            source,
        }
    }

    pub fn corrupt(volume: &str, offset: u64, what: impl Into<String>) -> Self {
        GuestError::Corrupt {
            volume: volume.to_string(),
            offset,
            what: what.into(),
        }
    }

    pub fn unsupported(volume: &str, what: impl Into<String>) -> Self {
        GuestError::Unsupported {
            volume: volume.to_string(),
            what: what.into(),
        }
    }

    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            GuestError::Io { .. } | GuestError::Corrupt { .. } => libc::EIO,
            GuestError::Unsupported { .. } => libc::EOPNOTSUPP,
            GuestError::NotFound => libc::ENOENT,
            GuestError::NotDir => libc::ENOTDIR,
            GuestError::IsDir => libc::EISDIR,
            GuestError::Invalid => libc::EINVAL,
        }
    }
}
