//! Opening an image file by format: from the name a backing reference
//! records, or by the file's magic.

use super::qcow2::Qcow2Layer;
use super::raw::RawLayer;
use super::vhd::VhdLayer;
use super::{Format, Layer};
use crate::error::{ImageError, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Guesses the format from the first bytes: qcow2 and VHD (dynamic and
/// differencing: a footer copy) have a magic; a file named `*.vhd` with a
/// valid checksummed footer at the end is a fixed VHD (a raw disk can end
/// in any bytes its guest wrote, so the footer alone does not decide);
/// anything else is raw.
pub fn detect_format(file: &File, path: &Path) -> Result<Format> {
    let mut magic = [0u8; 8];
    let n = file
        .read_at(&mut magic, 0)
        .map_err(|e| ImageError::io(path, "read", 0, e))?;
    if n >= 4 && &magic[..4] == super::qcow2::header::MAGIC {
        Ok(Format::Qcow2)
    } else if n == 8 && &magic == super::vhd::footer::COOKIE
        || named_vhd(path) && super::vhd::footer::is_fixed_vhd(file, path)
    {
        Ok(Format::Vhd)
    } else {
        Ok(Format::Raw)
    }
}

/// Whether the file name says VHD (`.vhd`, `.vpc`, any case).
fn named_vhd(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("vhd") || e.eq_ignore_ascii_case("vpc"))
}

/// Opens `path` as `format` (or detects it), read-only or for writing.
pub fn open_layer(path: &Path, format: Option<Format>, writable: bool) -> Result<Arc<dyn Layer>> {
    let file = crate::input::open_input(path, writable, crate::input::Accept::RegularOrBlock)?;
    let format = match format {
        Some(f) => f,
        None => detect_format(&file, path)?,
    };
    Ok(match format {
        Format::Qcow2 => Arc::new(Qcow2Layer::open(path, file, writable)?),
        Format::Raw => Arc::new(RawLayer::open(path, file, writable)?),
        Format::Vhd => Arc::new(VhdLayer::open_with(path, file, writable)?),
    })
}
