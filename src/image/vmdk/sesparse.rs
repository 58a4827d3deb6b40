//! ESXi's seSparse extents (`-sesparse.vmdk`).
//!
//! Not read yet: opening one is refused as unsupported.

use super::tables::GrainTables;
use crate::error::{ImageError, Result};
use crate::storage::Storage;
use std::path::Path;

/// The constant header's magic, little-endian.
pub const MAGIC_BYTES: [u8; 8] = 0xcafe_babe_u64.to_le_bytes();

/// The capacity (sectors) and grain map of the seSparse extent `file`.
pub fn open(file: &dyn Storage, path: &Path, file_len: u64) -> Result<(u64, GrainTables)> {
    let _ = (file, file_len);
    Err(ImageError::unsupported(path, "seSparse extents"))
}
