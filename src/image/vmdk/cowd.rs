//! ESXi's `COWD` sparse extents (vmfsSparse, `-delta.vmdk`).
//!
//! Not read yet: opening one is refused as unsupported.

use super::tables::GrainTables;
use crate::error::{ImageError, Result};
use crate::storage::Storage;
use std::path::Path;

pub const MAGIC: &[u8; 4] = b"COWD";

/// The capacity (sectors) and grain map of the `COWD` extent `file`.
pub fn open(file: &dyn Storage, path: &Path, file_len: u64) -> Result<(u64, GrainTables)> {
    let _ = (file, file_len);
    Err(ImageError::unsupported(path, "vmfsSparse (COWD) extents"))
}
