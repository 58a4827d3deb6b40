//! Creating the empty child a snapshot or a clone puts on a parent image,
//! in the format that parent's family uses: a differencing VHD on a VHD
//! (XCP and Hyper-V read VHD chains only, and a qcow2 overlay on a
//! differencing VHD would ask QEMU to open that VHD without its parent), a
//! qcow2 overlay on anything else. The tree code calls this and never
//! names a format's create function itself.

use super::formats::ChildRequest;
use super::{Format, Layer};
use crate::error::Result;
use crate::ownership::Ownership;
use std::path::Path;

/// The format of a new child of a `parent` image.
pub fn child_format(parent: Format) -> Format {
    if parent.driver().children_own_format() {
        parent
    } else {
        // qcow2 overlays take any backing format.
        Format::Qcow2
    }
}

/// The file extension new images of `format` get.
pub fn extension(format: Format) -> &'static str {
    format.driver().extension()
}

/// Creates at `path` an empty child of `parent` (its top layer, whose file
/// is `parent_path` now: a layer's own `path()` is where it was opened,
/// which a commit merge may have renamed since) that names it `name`:
/// relative to `path`'s directory, or absolute. `name` may differ from the
/// parent's current file name when the parent is about to be renamed (a
/// snapshot). `size` is the child's virtual size.
pub fn create_child(
    path: &Path,
    parent: &dyn Layer,
    parent_path: &Path,
    name: &str,
    size: u64,
) -> Result<()> {
    // The child holds the parent's future writes: as private as it is.
    let like = Ownership::of(parent_path)
        .map_err(|e| crate::error::ImageError::io(parent_path, "stat", 0, e))?;
    child_format(parent.format())
        .driver()
        .create_child(&ChildRequest {
            path,
            parent,
            parent_path,
            name,
            size,
            like,
        })
}
