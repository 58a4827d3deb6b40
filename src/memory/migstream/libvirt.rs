//! libvirt's save image header (`virsh save`, `managedsave`), which sits
//! in front of the QEMU stream: recognised, checked and stepped over, so
//! a save image is indexed like the bare stream behind it. Compressed
//! images and saves that never finished are refused with what to do.
//!
//! The header (libvirt's src/qemu/qemu_saveimage.h) is magic[16], then
//! u32 version, data_len, was_running, format, cookieOffset, unused[14],
//! in the byte order of the host that wrote it; then `data_len` bytes of
//! XML (and cookie, and padding); then the stream.

use super::Reader;
use crate::error::{ImageError, Result};

const LIBVIRT_MAGIC: &[u8] = b"LibvirtQemudSave";
const LIBVIRT_PARTIAL: &[u8] = b"LibvirtQemudPart";
/// What both magics start with.
const LIBVIRT_PREFIX: usize = 12;
const LIBVIRT_HEADER_LEN: usize = 92;
const LIBVIRT_VERSION: u32 = 2;
const LIBVIRT_FORMATS: [&str; 7] = ["raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse"];
const LIBVIRT_FORMAT_SPARSE: u32 = 6;

/// Whether the file starts like a libvirt save image (finished or not).
pub(super) fn present(r: &mut Reader) -> Result<bool> {
    r.pos = 0;
    Ok(r.len >= LIBVIRT_PREFIX as u64
        && r.bytes(LIBVIRT_PREFIX, "magic")?[..] == LIBVIRT_MAGIC[..LIBVIRT_PREFIX])
}

/// Checks libvirt's header; returns where the QEMU stream starts.
pub(super) fn header(r: &mut Reader) -> Result<u64> {
    r.pos = 0;
    let h = r.bytes(LIBVIRT_HEADER_LEN, "libvirt save image header")?;
    if h[..16] == LIBVIRT_PARTIAL[..] {
        unsupported!(
            r,
            0,
            "incomplete libvirt save image (magic LibvirtQemudPart: the save did \
            not finish); save the domain again"
        );
    }
    if h[..16] != LIBVIRT_MAGIC[..] {
        corrupt!(r, 0, "unknown libvirt save image magic");
    }
    let field = |i: usize, swap: bool| {
        let b = [h[16 + 4 * i], h[17 + 4 * i], h[18 + 4 * i], h[19 + 4 * i]];
        if swap {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    // The saving host's byte order: libvirt swaps when the version makes
    // no sense as it is.
    let swap = field(0, false) > LIBVIRT_VERSION;
    let (version, data_len, format) = (field(0, swap), field(1, swap), field(3, swap));
    if version == 0 || version > LIBVIRT_VERSION {
        unsupported!(
            r,
            16,
            "libvirt save image version {version} (snaptree reads 1 and 2)"
        );
    }
    if version == 2 && format != 0 && format != LIBVIRT_FORMAT_SPARSE {
        let name = LIBVIRT_FORMATS
            .get(format as usize)
            .copied()
            .unwrap_or("an unknown format");
        unsupported!(
            r,
            28,
            "libvirt save image compressed with {name} (format {format}); snaptree \
            reads uncompressed images only: save with save_image_format = \"raw\" \
            in qemu.conf, or restore the domain and save it again"
        );
    }
    let start = LIBVIRT_HEADER_LEN as u64 + u64::from(data_len);
    if start > r.len {
        corrupt!(
            r,
            20,
            "libvirt XML length {data_len} runs past the end of the file"
        );
    }
    Ok(start)
}
