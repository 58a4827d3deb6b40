//! The RAM section's contents (QEMU's migration/ram.c): page records up
//! to each part's EOS, the block list (`RAM_SAVE_FLAG_MEM_SIZE`), and
//! ZERO and PAGE records placed into the page index. Every flag the
//! parser cannot read in place (compression, XBZRLE, multifd) is refused
//! by name; every page offset is checked against its block's length.

use super::{Block, PageMap, Pages, Parser};
use crate::error::{ImageError, Result};
use crate::memory::Piece;

// Page record flags (ram.c), in the low bits of the page offset.
const RAM_SAVE_FLAG_FULL: u64 = 0x01;
const RAM_SAVE_FLAG_ZERO: u64 = 0x02;
const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
const RAM_SAVE_FLAG_PAGE: u64 = 0x08;
const RAM_SAVE_FLAG_EOS: u64 = 0x10;
const RAM_SAVE_FLAG_CONTINUE: u64 = 0x20;
const RAM_SAVE_FLAG_XBZRLE: u64 = 0x40;
const RAM_SAVE_FLAG_HOOK: u64 = 0x80;
const RAM_SAVE_FLAG_COMPRESS_PAGE: u64 = 0x100;
const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;
const KNOWN_FLAGS: u64 = RAM_SAVE_FLAG_ZERO
    | RAM_SAVE_FLAG_MEM_SIZE
    | RAM_SAVE_FLAG_PAGE
    | RAM_SAVE_FLAG_EOS
    | RAM_SAVE_FLAG_CONTINUE
    | RAM_SAVE_FLAG_HOOK;

/// No RAM block is larger; a bigger length is corruption.
const MAX_BLOCK: u64 = 16 << 40;

impl Parser<'_> {
    /// Page records up to RAM_SAVE_FLAG_EOS.
    pub(super) fn ram_part(&mut self) -> Result<()> {
        let mask = self.page_size - 1;
        loop {
            let at = self.r.pos;
            let word = self.r.be64("RAM record header")?;
            let (addr, flags) = (word & !mask, word & mask);
            self.check_flags(at, flags)?;
            match flags & !RAM_SAVE_FLAG_CONTINUE {
                RAM_SAVE_FLAG_EOS => return Ok(()),
                RAM_SAVE_FLAG_HOOK => {} // RDMA's hook: nothing in the stream
                RAM_SAVE_FLAG_MEM_SIZE => self.block_list(at, addr)?,
                RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE => self.page(at, addr, flags)?,
                _ => corrupt!(
                    self,
                    at,
                    "RAM record with an invalid combination of flags 0x{flags:x}"
                ),
            }
        }
    }

    fn check_flags(&self, at: u64, flags: u64) -> Result<()> {
        let named = [
            (
                RAM_SAVE_FLAG_XBZRLE,
                "an XBZRLE-compressed page (xbzrle capability)",
            ),
            (
                RAM_SAVE_FLAG_COMPRESS_PAGE,
                "a compressed page (compress capability, QEMU < 9.1)",
            ),
            (
                RAM_SAVE_FLAG_MULTIFD_FLUSH,
                "multifd: the pages went over other channels, not into this file",
            ),
            (RAM_SAVE_FLAG_FULL, "RAM_SAVE_FLAG_FULL (QEMU before 0.13)"),
        ];
        for (flag, what) in named {
            if flags & flag != 0 {
                unsupported!(
                    self,
                    at,
                    "RAM record flag 0x{flag:x}: {what}; migrate without it"
                );
            }
        }
        if flags & !KNOWN_FLAGS != 0 {
            corrupt!(
                self,
                at,
                "RAM record with unknown flag 0x{:x}",
                flags & !KNOWN_FLAGS
            );
        }
        if self.mapped_ram
            && flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_HOOK) != 0
        {
            corrupt!(
                self,
                at,
                "page record (flags 0x{flags:x}) in a mapped-ram stream"
            );
        }
        Ok(())
    }

    /// RAM_SAVE_FLAG_MEM_SIZE: the block list (ram_save_setup).
    fn block_list(&mut self, at: u64, total: u64) -> Result<()> {
        if self.listed {
            corrupt!(self, at, "a second RAM block list");
        }
        if self.postcopy_advised && self.ignore_shared {
            unsupported!(
                self,
                at,
                "a block list written with both postcopy-ram and x-ignore-shared"
            );
        }
        self.listed = true;
        // Each block takes at least 9 bytes of the file and a page of
        // the total, so the loop ends by one or the other.
        let mut left = total;
        while left > 0 {
            let at = self.r.pos;
            let name = self.r.str8("RAM block name")?;
            let size = self.r.be64("RAM block length")?;
            if size == 0 || size > MAX_BLOCK || !size.is_multiple_of(self.page_size) {
                corrupt!(
                    self,
                    at,
                    "RAM block '{name}' has an impossible length {size}"
                );
            }
            if size > left {
                corrupt!(
                    self,
                    at,
                    "RAM block '{name}' ({size} bytes) is longer than the {left} bytes \
                    the block list's total ({total}) leaves"
                );
            }
            left -= size;
            if self.postcopy_advised {
                // A page size (a power of two >= 4 KiB) follows only for
                // blocks on huge pages; neither the next block's name
                // length (top byte non-zero) nor a record (flags < 4 KiB)
                // looks like one.
                let save = self.r.pos;
                let v = self.r.be64("RAM block page size")?;
                if !(v.is_power_of_two() && v >= 4096 && v >> 56 == 0) {
                    self.r.pos = save;
                }
            }
            if self.ignore_shared {
                self.r.be64("RAM block guest address")?;
            }
            let pages = if self.mapped_ram {
                Pages::Mapped(self.mapped_block(&name, size)?)
            } else {
                Pages::Records(PageMap::default())
            };
            let index = self.blocks.len();
            if self.by_name.insert(name.clone(), index).is_some() {
                corrupt!(self, at, "RAM block '{name}' is listed twice");
            }
            self.blocks.push(Block { name, size, pages });
        }
        Ok(())
    }

    /// A ZERO or PAGE record.
    fn page(&mut self, at: u64, addr: u64, flags: u64) -> Result<()> {
        let b = if flags & RAM_SAVE_FLAG_CONTINUE != 0 {
            let Some(b) = self.last_block else {
                corrupt!(
                    self,
                    at,
                    "a page record continues a block, but no block came before"
                );
            };
            b
        } else {
            let name = self.r.str8("RAM block name")?;
            let Some(&b) = self.by_name.get(&name) else {
                corrupt!(
                    self,
                    at,
                    "page record for RAM block '{name}', which the block list does not name"
                );
            };
            self.last_block = Some(b);
            b
        };
        let (size, name) = (self.blocks[b].size, &self.blocks[b].name);
        if addr >= size {
            corrupt!(
                self,
                at,
                "page offset 0x{addr:x} is past the end of RAM block '{name}' ({size} bytes)"
            );
        }
        let piece = if flags & RAM_SAVE_FLAG_PAGE != 0 {
            let data = self.r.pos;
            self.r.skip(self.page_size, "page data")?;
            self.stats.data_pages += 1;
            Piece::Data { file_offset: data }
        } else {
            let fill = self.r.u8("zero page fill byte")?;
            if fill != 0 {
                corrupt!(
                    self,
                    at,
                    "zero-page record with fill byte 0x{fill:02x} (QEMU only sends 0)"
                );
            }
            self.stats.zero_pages += 1;
            Piece::Zero
        };
        let ps = self.page_size;
        if let Pages::Records(map) = &mut self.s.blocks[b].pages {
            if map.set(addr / ps, piece, ps) {
                self.s.stats.resent += 1;
            }
        }
        Ok(())
    }
}
