//! Which parser reads a memory source: chosen by the file's first bytes,
//! never by its name (a `.sav` may be a libvirt image or a bare stream).
//! A file with no known magic is a raw dump; formats that look like a
//! dump but are not raw RAM are refused rather than shown as garbage.

use super::{elf, migstream, raw, MemorySource};
use crate::error::{ImageError, Result};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Indexes the memory source at `path`, whatever its format.
pub fn index_any(path: &Path) -> Result<MemorySource> {
    let file = crate::input::open_input(path, false, crate::input::Accept::Regular)?;
    let mut head = [0u8; 16];
    let mut n = 0;
    while n < head.len() {
        match file.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io(path, "read", n as u64, e)),
        }
    }
    let head = &head[..n];
    if head.starts_with(b"QEVM") || head.starts_with(b"LibvirtQemud") {
        return migstream::index(path);
    }
    if head.starts_with(b"\x7fELF") {
        return elf::index(path);
    }
    let refused = [
        (
            &b"KDUMP   "[..],
            "a kdump-compressed dump (dump-guest-memory format kdump-*)",
        ),
        (b"DISKDUMP", "a diskdump file"),
        (
            b"PAGEDU64",
            "a Windows crash dump (dump-guest-memory format win-dmp)",
        ),
        (b"PAGEDUMP", "a Windows crash dump"),
    ];
    if head.starts_with(crate::image::qcow2::header::MAGIC) {
        return Err(ImageError::unsupported(
            path,
            "a qcow2 image, not a memory dump (memory sources are raw dumps, ELF cores, \
             QEMU migration streams and libvirt save images)",
        ));
    }
    for (magic, what) in refused {
        if head.starts_with(magic) {
            return Err(ImageError::unsupported(
                path,
                format!(
                    "{what} (magic at offset 0), which snaptree does not read; dump the \
                     guest with dump-guest-memory in its default ELF format"
                ),
            ));
        }
    }
    raw::index(path)
}
