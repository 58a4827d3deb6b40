//! Errors of the image layer: every failure names the image file and, where
//! one exists, the byte offset in that file that is wrong, so a user can find
//! the bad spot with `xxd` and an engineer can reproduce it.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while opening, reading or writing one image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The operating system refused an I/O request.
    #[error("{path}: {op} at offset {offset} failed: {source}{hint}", path = .path.display(), hint = crate::fdlimit::hint(.source))]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The file's contents contradict the format: a user must repair or
    /// replace the image; nothing was changed on disk.
    #[error("{path}: corrupt image at offset {offset}: {what}", path = .path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// A valid image that uses something snaptree does not implement.
    #[error("{path}: unsupported: {what}", path = .path.display())]
    Unsupported { path: PathBuf, what: String },
    /// The request itself is invalid (out of range, read-only layer, ...).
    #[error("{path}: {what}", path = .path.display())]
    Invalid { path: PathBuf, what: String },
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

impl ImageError {
    pub fn io(path: &Path, op: &'static str, offset: u64, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.to_path_buf(),
            op,
            offset,
            source,
        }
    }

    pub fn corrupt(path: &Path, offset: u64, what: impl Into<String>) -> Self {
        ImageError::Corrupt {
            path: path.to_path_buf(),
            offset,
            what: what.into(),
        }
    }

    pub fn unsupported(path: &Path, what: impl Into<String>) -> Self {
        ImageError::Unsupported {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    pub fn invalid(path: &Path, what: impl Into<String>) -> Self {
        ImageError::Invalid {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    /// The errno a filesystem front end should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ImageError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ImageError::Corrupt { .. } => libc::EIO,
            ImageError::Unsupported { .. } => libc::EOPNOTSUPP,
            ImageError::Invalid { .. } => libc::EINVAL,
        }
    }
}
