//! Opening an image file by format: from the name a backing reference
//! records, or by the file's magic.

use super::qcow2::Qcow2Layer;
use super::raw::RawLayer;
use super::{Format, Layer};
use crate::error::{ImageError, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Guesses the format from the first bytes: qcow2 has a magic, anything else
/// is raw.
pub fn detect_format(file: &File, path: &Path) -> Result<Format> {
    let mut magic = [0u8; 4];
    let n = file
        .read_at(&mut magic, 0)
        .map_err(|e| ImageError::io(path, "read", 0, e))?;
    if n == 4 && &magic == super::qcow2::header::MAGIC {
        Ok(Format::Qcow2)
    } else {
        Ok(Format::Raw)
    }
}

/// Opens `path` as `format` (or detects it), read-only or for writing.
pub fn open_layer(path: &Path, format: Option<Format>, writable: bool) -> Result<Arc<dyn Layer>> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| ImageError::io(path, "open", 0, e))?;
    let format = match format {
        Some(f) => f,
        None => detect_format(&file, path)?,
    };
    Ok(match format {
        Format::Qcow2 => Arc::new(Qcow2Layer::open(path, file, writable)?),
        Format::Raw => Arc::new(RawLayer::open(path, file, writable)?),
    })
}
