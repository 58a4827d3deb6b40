//! The memory layer's error: opening a memory source as a point's view
//! fails in the image layer (reading and indexing the file), the chain
//! layer (a page-delta checkpoint's chain) or in placing its RAM by
//! guest-physical address. One type, so callers keep the cause and map it
//! to an errno in one place.

use crate::chain::ChainError;
use crate::error::ImageError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The source's RAM cannot be laid out by guest-physical address.
    #[error("{}: {source}", .path.display())]
    Placement {
        path: PathBuf,
        source: super::layout::PlacementError,
    },
}

impl MemoryError {
    /// The errno a file system call reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            MemoryError::Image(e) => e.errno(),
            MemoryError::Chain(e) => e.errno(),
            MemoryError::Placement { .. } => libc::EINVAL,
        }
    }
}
