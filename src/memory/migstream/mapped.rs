//! A mapped-ram block (QEMU's `mapped-ram` capability, ram.c
//! `mapped_ram_setup_ramblock`): a header after the block's list entry
//! gives the block a bitmap and a fixed region of the file; page `i` is
//! at `pages_offset + i * page_size` when bit `i` is set. The bitmap and
//! the region are checked against the file before a byte of either is
//! used, and the bitmap is read in windows, so an index of a block costs
//! memory per run of set bits, which the file's own bytes bound.

use super::reader::WINDOW;
use super::Parser;
use crate::error::{ImageError, Result};
use crate::fileio;
use crate::memory::{Piece, Run};

/// `MappedRamHeader` (ram.c), packed: be32 version, be64 page_size,
/// be64 bitmap_offset, be64 pages_offset.
const MAPPED_RAM_HEADER_LEN: usize = 28;
const MAPPED_RAM_HDR_VERSION: u32 = 1;

impl Parser<'_> {
    /// A mapped-ram block: header, bitmap, fixed page region. Leaves the
    /// reader after the page region, where the stream goes on.
    pub(super) fn mapped_block(&mut self, name: &str, size: u64) -> Result<Vec<Run>> {
        let at = self.r.pos;
        let h = self.r.bytes(MAPPED_RAM_HEADER_LEN, "mapped-ram header")?;
        let version = fileio::be_u32(&h, 0);
        let (ps, bitmap_at, pages_at) = (
            fileio::be_u64(&h, 4),
            fileio::be_u64(&h, 12),
            fileio::be_u64(&h, 20),
        );
        if version == 0 || version > MAPPED_RAM_HDR_VERSION {
            unsupported!(
                self,
                at,
                "mapped-ram header version {version} of block '{name}'"
            );
        }
        if ps != self.page_size || !pages_at.is_multiple_of(ps) {
            corrupt!(
                self,
                at,
                "mapped-ram header of block '{name}': page size {ps}, pages at {pages_at}"
            );
        }
        let (pages, len) = (size / ps, self.r.len);
        let bitmap_len = pages.div_ceil(64) * 8;
        if bitmap_at.checked_add(bitmap_len).is_none_or(|e| e > len) {
            corrupt!(
                self,
                at,
                "bitmap of block '{name}' ({bitmap_len} bytes at {bitmap_at}) runs \
                past the end of the file"
            );
        }
        // The stream goes on after the region, so it must lie ahead.
        let ahead = |&e: &u64| e <= len && pages_at >= self.r.pos;
        let Some(region_end) = pages_at.checked_add(size).filter(ahead) else {
            corrupt!(
                self,
                at,
                "the pages of block '{name}' ({size} bytes at {pages_at}) are not \
                between its header and the end of the file"
            );
        };
        // An array of host `unsigned long`s, little-endian on the hosts
        // QEMU runs on (x86, arm, ...): bit i of byte i/8 is page i.
        let mut runs: Vec<Run> = Vec::new();
        let mut chunk = vec![0u8; WINDOW];
        let mut done = 0u64;
        while done < bitmap_len {
            let n = (bitmap_len - done).min(WINDOW as u64) as usize;
            fileio::read_exact_at(
                self.r.file,
                self.path,
                &mut chunk[..n],
                bitmap_at + done,
                "mapped-ram bitmap",
            )?;
            for (i, &byte) in chunk[..n].iter().enumerate() {
                for bit in (0..8).filter(|b| byte & (1 << b) != 0) {
                    let page = (done + i as u64) * 8 + bit;
                    if page >= pages {
                        break;
                    }
                    let (start, file_offset) = (page * ps, pages_at + page * ps);
                    self.s.stats.data_pages += 1;
                    match runs.last_mut() {
                        Some(r) if r.start + r.len == start => r.len += ps,
                        _ => runs.push(Run {
                            start,
                            len: ps,
                            piece: Piece::Data { file_offset },
                        }),
                    }
                }
            }
            done += n as u64;
        }
        self.r.pos = region_end;
        Ok(runs)
    }
}
