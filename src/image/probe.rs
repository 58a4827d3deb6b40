//! Opening an image file by format: from the name a backing reference
//! records, or by the file's magic, through the drivers registered in
//! `formats`.

use super::formats::FORMATS;
use super::{Format, Layer};
use crate::error::{ImageError, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Guesses the format from the first bytes, asking each registered driver
/// (see `formats::FORMATS`); anything no driver recognises is raw.
pub fn detect_format(file: &File, path: &Path) -> Result<Format> {
    let mut magic = [0u8; 8];
    let n = file
        .read_at(&mut magic, 0)
        .map_err(|e| ImageError::io(path, "read", 0, e))?;
    Ok(FORMATS
        .iter()
        .find(|d| d.sniff(file, path, &magic[..n]))
        .map_or_else(Format::raw, |d| d.format()))
}

/// The format `detect_format` finds when it is not raw: an image format
/// recognised by its contents, `None` for plain bytes or an unreadable
/// file.
pub fn sniff_image(path: &Path) -> Option<Format> {
    let file = crate::input::open_input(path, false, crate::input::Accept::RegularOrBlock).ok()?;
    detect_format(&file, path).ok().filter(|f| !f.is_raw())
}

/// Opens `path` as `format` (or detects it), read-only or for writing.
pub fn open_layer(path: &Path, format: Option<Format>, writable: bool) -> Result<Arc<dyn Layer>> {
    let file = crate::input::open_input(path, writable, crate::input::Accept::RegularOrBlock)?;
    let format = match format {
        Some(f) => f,
        None => detect_format(&file, path)?,
    };
    format.driver().open(path, file, writable)
}
