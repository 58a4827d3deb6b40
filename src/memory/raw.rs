//! Raw memory dumps: a file that is guest RAM byte for byte (VMware's
//! `.vmem`, a QEMU `memory-backend-file`, `pmemsave` output). The file is
//! one block, "ram", placed like a migration stream's main RAM block (the
//! x86 split around the PCI hole), since a RAM file knows nothing of
//! guest-physical addresses. Holes of a sparse file (SEEK_HOLE) are zero
//! runs, so they stay holes in `memory.raw`.

use super::{MemorySource, Piece, RamBlock, Run};
use crate::error::{ImageError, Result};
use crate::fileio;
use std::path::Path;

/// Indexes the raw dump at `path`.
pub fn index(path: &Path) -> Result<MemorySource> {
    let file = crate::input::open_input(path, false, crate::input::Accept::Regular)?;
    let len = fileio::file_len(&file, path)?;
    if len == 0 {
        return Err(ImageError::invalid(
            path,
            "the memory dump is empty: it holds no RAM",
        ));
    }
    let runs = fileio::data_segments(&file, path, 0, len)?
        .into_iter()
        .map(|(start, end, data)| Run {
            start,
            len: end - start,
            piece: if data {
                Piece::Data { file_offset: start }
            } else {
                Piece::Zero
            },
        })
        .collect();
    Ok(MemorySource {
        path: path.to_path_buf(),
        kind: "raw dump".to_string(),
        machine: None,
        physical: false,
        blocks: vec![RamBlock {
            name: "ram".to_string(),
            size: len,
            runs,
        }],
    })
}
