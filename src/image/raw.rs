//! A raw image: guest offset = file offset. Used as the base of a chain.
//!
//! Holes in the file (found with `SEEK_DATA`/`SEEK_HOLE`) are reported as
//! `Zero`, as QEMU does, so maps and sparse exports skip them.

use super::{check_range, push_extent, BackingRef, Extent, Format, LayerInfo, Mapping};
use crate::error::{ImageError, Result};
use crate::fileio;
use crate::image::storage::Storage;
use crate::image::{Identity, Locking, ReadMap, Writable};
use std::fs::File;
use std::path::{Path, PathBuf};

pub struct RawLayer {
    path: PathBuf,
    file: Box<dyn Storage>,
    size: u64,
    writable: bool,
}

impl RawLayer {
    pub fn open(path: &Path, file: File, writable: bool) -> Result<RawLayer> {
        RawLayer::open_storage(path, Box::new(file), writable)
    }

    /// A raw layer over any storage (memory, in unit tests).
    pub fn open_storage(path: &Path, file: Box<dyn Storage>, writable: bool) -> Result<RawLayer> {
        // QEMU sees a raw file in whole 512-byte sectors; the tail past
        // EOF reads as zeros. Matching it keeps sizes and maps identical.
        let size = fileio::file_len(&*file, path)?.div_ceil(512) * 512;
        Ok(RawLayer {
            path: path.to_path_buf(),
            file,
            size,
            writable,
        })
    }
}

impl ReadMap for RawLayer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn backing(&self) -> Option<&BackingRef> {
        None
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.path, self.size, offset, len)?;
        let mut out = Vec::new();
        for (s, e, data) in fileio::data_segments(&*self.file, &self.path, offset, offset + len)? {
            let mapping = if data {
                Mapping::Data { host: s }
            } else {
                Mapping::Zero
            };
            push_extent(
                &mut out,
                Extent {
                    start: s,
                    len: e - s,
                    mapping,
                },
            );
        }
        Ok(out)
    }

    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        fileio::read_at_zero_fill(&*self.file, &self.path, buf, host)
    }

    fn host_segments(&self, host: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        fileio::data_segments(&*self.file, &self.path, host, host + len)
    }

    fn info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            file: self.path.clone(),
            format: Format::Raw,
            version: None,
            virtual_size: self.size,
            cluster_size: None,
            file_size: fileio::file_len(&*self.file, &self.path)?,
            backing: None,
            features: Vec::new(),
            snapshots: Vec::new(),
        })
    }
}

impl Writable for RawLayer {
    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write(&self, offset: u64, data: &[u8], _below: &dyn super::BackingRead) -> Result<()> {
        if !self.writable {
            return Err(ImageError::invalid(&self.path, "image is open read-only"));
        }
        check_range(&self.path, self.size, offset, data.len() as u64)?;
        fileio::write_all_at(&*self.file, &self.path, data, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _below: &dyn super::BackingRead) -> Result<()> {
        if !self.writable {
            return Err(ImageError::invalid(&self.path, "image is open read-only"));
        }
        check_range(&self.path, self.size, offset, len)?;
        if self.file.punch_hole(offset, len).is_ok() {
            return Ok(());
        }
        // No hole punching here: write the zeros.
        let chunk = vec![0u8; (len.min(1 << 20)) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(chunk.len() as u64) as usize;
            fileio::write_all_at(&*self.file, &self.path, &chunk[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        fileio::sync_data(&*self.file, &self.path)
    }
}

impl Identity for RawLayer {}

impl Locking for RawLayer {
    fn lock_storage(&self) -> Option<&dyn crate::storage::Storage> {
        Some(&*self.file)
    }
}

/// Raw in the format registry (see `image::formats`): never recognised by
/// magic (a raw disk holds any bytes), only what nothing else is or what
/// a name or a child's backing format says; names no backing file, so it
/// is neither re-pointed nor committed into.
pub struct RawDriver;

pub static DRIVER: RawDriver = RawDriver;

impl super::formats::Driver for RawDriver {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn names(&self) -> &'static [&'static str] {
        &["raw", "file"]
    }

    fn extension(&self) -> &'static str {
        "raw"
    }

    fn sniff(&self, _file: &File, _path: &Path, _magic: &[u8]) -> bool {
        false
    }

    fn open(
        &self,
        path: &Path,
        file: File,
        writable: bool,
    ) -> Result<std::sync::Arc<dyn super::Layer>> {
        Ok(std::sync::Arc::new(RawLayer::open(path, file, writable)?))
    }

    fn merge_caps(&self) -> super::formats::MergeCaps {
        super::formats::MergeCaps {
            can_repoint: false,
            repoint_needs_parent: false,
            parent_same_format: false,
            can_commit_into: false,
            children_check_id: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::storage::MemStorage;
    use crate::image::testutil::{mem_path, pattern, read_guest};
    use crate::image::NoBacking;

    fn raw(len: usize, writable: bool) -> (MemStorage, RawLayer) {
        let mem = MemStorage::from_bytes(pattern(2, 0, len));
        let l = RawLayer::open_storage(mem_path("r.raw"), Box::new(mem.clone()), writable).unwrap();
        (mem, l)
    }

    #[test]
    fn guest_offset_is_file_offset_and_the_tail_sector_reads_zeros() {
        let (_, l) = raw(1000, false);
        // As QEMU: whole sectors, the tail past EOF reads as zeros.
        assert_eq!(l.virtual_size(), 1024);
        assert_eq!(
            l.map(0, 1024).unwrap(),
            vec![Extent {
                start: 0,
                len: 1024,
                mapping: Mapping::Data { host: 0 }
            }]
        );
        let got = read_guest(&l, 0, 1024).unwrap();
        assert_eq!(&got[..1000], &pattern(2, 0, 1000)[..]);
        assert!(got[1000..].iter().all(|b| *b == 0));
        assert!(l.map(1000, 100).is_err());
        assert!(l.write(0, b"x", &NoBacking).is_err());
    }

    #[test]
    fn writes_and_zeros_land_in_the_storage() {
        let (mem, l) = raw(8192, true);
        l.write(10, b"abc", &NoBacking).unwrap();
        // Memory cannot punch holes: zeros are written instead.
        l.write_zeroes(4096, 4096, &NoBacking).unwrap();
        l.flush().unwrap();
        let bytes = mem.to_vec();
        assert_eq!(&bytes[10..13], b"abc");
        assert_eq!(&bytes[13..4096], &pattern(2, 13, 4083)[..]);
        assert!(bytes[4096..].iter().all(|b| *b == 0));
        assert!(l.write(8190, b"abc", &NoBacking).is_err());
    }
}
