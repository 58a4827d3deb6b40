//! Refcounts for the writer: the refcount table kept in memory, refcount
//! blocks loaded on demand, any width from 1 to 64 bits.
//!
//! New clusters are always appended at `file_end` (see the module docs of
//! `qcow2`): a refcount block or a grown refcount table needed on the way is
//! appended too, and gets its own refcount, possibly in itself. Dirty
//! blocks and a moved table reach the disk only in `Meta::flush`, in the
//! order that keeps the image consistent after a crash.

use super::header::{self, Header};
use crate::error::{ImageError, Result};
use crate::fileio::{read_exact_at, write_all_at};
use crate::image::storage::Storage;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

pub(crate) struct Refcounts {
    order: u32,
    cluster_size: u64,
    /// Refcount entries per block.
    per_block: u64,
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u64,
    pub table_dirty: bool,
    /// The table was moved: the header must point at the new one.
    pub table_moved: bool,
    /// Old tables to free once the header points elsewhere.
    pub old_tables: Vec<(u64, u64)>,
    pub blocks: HashMap<u64, Vec<u8>>,
    pub dirty_blocks: BTreeSet<u64>,
}

impl Refcounts {
    pub fn load(file: &dyn Storage, path: &Path, h: &Header, _len: u64) -> Result<Refcounts> {
        let cs = h.cluster_size();
        let mut bytes = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
        read_exact_at(
            file,
            path,
            &mut bytes,
            h.refcount_table_offset,
            "refcount table",
        )?;
        Ok(Refcounts {
            order: h.refcount_order,
            cluster_size: cs,
            per_block: (cs * 8) >> h.refcount_order,
            table: header::decode_u64s(&bytes),
            table_offset: h.refcount_table_offset,
            table_clusters: h.refcount_table_clusters as u64,
            table_dirty: false,
            table_moved: false,
            old_tables: Vec::new(),
            blocks: HashMap::new(),
            dirty_blocks: BTreeSet::new(),
        })
    }

    fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    /// Loads block `i` (which the table says exists) into the cache.
    fn load_block(&mut self, file: &dyn Storage, path: &Path, i: u64, file_end: u64) -> Result<()> {
        if self.blocks.contains_key(&i) {
            return Ok(());
        }
        let off = self.table[i as usize] & !(self.cluster_size - 1);
        let at = self.table_offset + i * 8;
        if off < self.cluster_size || off >= file_end {
            return Err(ImageError::corrupt(
                path,
                at,
                format!("refcount table entry {i} points to offset {off}, outside the file"),
            ));
        }
        let mut b = vec![0u8; self.cluster_size as usize];
        read_exact_at(file, path, &mut b, off, "refcount block")?;
        self.blocks.insert(i, b);
        Ok(())
    }

    /// The refcount of host cluster number `c`.
    pub fn get(&mut self, file: &dyn Storage, path: &Path, c: u64, file_end: u64) -> Result<u64> {
        let i = c / self.per_block;
        if i >= self.table.len() as u64 || self.table[i as usize] == 0 {
            return Ok(0);
        }
        self.load_block(file, path, i, file_end)?;
        let b = &self.blocks[&i];
        Ok(read_entry(b, self.order, c % self.per_block))
    }

    /// Sets the refcount of cluster `c`, creating its block (appended at
    /// `file_end`) and growing the table when needed.
    pub fn set(
        &mut self,
        file: &dyn Storage,
        path: &Path,
        c: u64,
        value: u64,
        file_end: &mut u64,
    ) -> Result<()> {
        if value > self.max_value() {
            return Err(ImageError::invalid(
                path,
                format!(
                    "refcount of the cluster at offset {} would overflow {} bits",
                    c * self.cluster_size,
                    1u32 << self.order
                ),
            ));
        }
        let i = c / self.per_block;
        if i >= self.table.len() as u64 {
            self.grow_table(file, path, i + 1, file_end)?;
        }
        if self.table[i as usize] == 0 {
            let block_off = *file_end;
            *file_end += self.cluster_size;
            self.table[i as usize] = block_off;
            self.table_dirty = true;
            self.blocks.insert(i, vec![0u8; self.cluster_size as usize]);
            self.dirty_blocks.insert(i);
            // The new block needs a refcount of its own (possibly in itself).
            self.set(file, path, block_off / self.cluster_size, 1, file_end)?;
        } else {
            self.load_block(file, path, i, *file_end)?;
        }
        let order = self.order;
        let b = self.blocks.get_mut(&i).expect("block loaded above");
        write_entry(b, order, c % self.per_block, value);
        self.dirty_blocks.insert(i);
        Ok(())
    }

    /// Moves the table to a larger one appended at `file_end`.
    fn grow_table(
        &mut self,
        file: &dyn Storage,
        path: &Path,
        min_entries: u64,
        file_end: &mut u64,
    ) -> Result<()> {
        let per_cluster = self.cluster_size / 8;
        let max_entries = header::MAX_REFTABLE_BYTES / 8;
        // Room for what is asked and the new table's own blocks; double for
        // growth, but never past the limit when less would do.
        let needed = min_entries + 2;
        let entries = needed
            .max((self.table.len() as u64 * 2).min(max_entries))
            .div_ceil(per_cluster)
            * per_cluster;
        let clusters = entries / per_cluster;
        if clusters * self.cluster_size > header::MAX_REFTABLE_BYTES {
            return Err(ImageError::invalid(
                path,
                "refcount table would exceed 8 MiB; the image is too large for its cluster size",
            ));
        }
        let new_off = *file_end;
        *file_end += clusters * self.cluster_size;
        if self.table_moved {
            // The previous new table never reached the disk: release it.
            let (o, l) = (self.table_offset, self.table_clusters * self.cluster_size);
            self.set_range(file, path, o, l, 0, file_end)?;
        } else {
            self.old_tables
                .push((self.table_offset, self.table_clusters * self.cluster_size));
        }
        self.table.resize(entries as usize, 0);
        self.table_offset = new_off;
        self.table_clusters = clusters;
        self.table_dirty = true;
        self.table_moved = true;
        self.set_range(
            file,
            path,
            new_off,
            clusters * self.cluster_size,
            1,
            file_end,
        )
    }

    /// Numbers of the clusters `[off, off+len)` touches.
    fn clusters_of(&self, off: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        off / self.cluster_size..=(off + len.max(1) - 1) / self.cluster_size
    }

    /// Sets the refcount of every cluster touched by `[off, off+len)`.
    pub fn set_range(
        &mut self,
        file: &dyn Storage,
        path: &Path,
        off: u64,
        len: u64,
        value: u64,
        file_end: &mut u64,
    ) -> Result<()> {
        for c in self.clusters_of(off, len) {
            self.set(file, path, c, value, file_end)?;
        }
        Ok(())
    }

    /// Decrements the refcount of every cluster touched by `[off, off+len)`.
    pub fn decrement_range(
        &mut self,
        file: &dyn Storage,
        path: &Path,
        off: u64,
        len: u64,
        file_end: &mut u64,
    ) -> Result<()> {
        for c in self.clusters_of(off, len) {
            let v = self.get(file, path, c, *file_end)?;
            if v == 0 {
                return Err(ImageError::corrupt(
                    path,
                    c * self.cluster_size,
                    "freeing a cluster whose refcount is already 0",
                ));
            }
            self.set(file, path, c, v - 1, file_end)?;
        }
        Ok(())
    }

    /// Writes dirty blocks and, if needed, the table (not the header).
    /// Writes dirty blocks, syncs, then writes the table if it changed (a
    /// table entry must never reach the disk before the block it points
    /// at). Each item stays dirty until its own write succeeded, so a
    /// failed flush loses nothing and the next one retries.
    pub fn write_out(&mut self, file: &dyn Storage, path: &Path) -> Result<()> {
        let dirty: Vec<u64> = self.dirty_blocks.iter().copied().collect();
        for i in dirty {
            let off = self.table[i as usize];
            write_all_at(file, path, &self.blocks[&i], off)?;
            self.dirty_blocks.remove(&i);
        }
        if self.table_dirty {
            crate::fileio::sync_data(file, path)?;
            write_all_at(
                file,
                path,
                &header::encode_u64s(&self.table),
                self.table_offset,
            )?;
            self.table_dirty = false;
        }
        Ok(())
    }

    /// Refcount entries per refcount block.
    pub fn per_block(&self) -> u64 {
        self.per_block
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_blocks.len() as u64 * self.cluster_size
    }
}

fn read_entry(b: &[u8], order: u32, idx: u64) -> u64 {
    let idx = idx as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            ((b[idx / per_byte] >> shift) as u64) & ((1 << bits) - 1)
        }
        3 => b[idx] as u64,
        4 => u16::from_be_bytes([b[idx * 2], b[idx * 2 + 1]]) as u64,
        5 => crate::fileio::be_u32(b, idx * 4) as u64,
        _ => crate::fileio::be_u64(b, idx * 8),
    }
}

fn write_entry(b: &mut [u8], order: u32, idx: u64, v: u64) {
    let idx = idx as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            b[idx / per_byte] = (b[idx / per_byte] & !mask) | (((v as u8) << shift) & mask);
        }
        3 => b[idx] = v as u8,
        4 => b[idx * 2..idx * 2 + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => b[idx * 4..idx * 4 + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => b[idx * 8..idx * 8 + 8].copy_from_slice(&v.to_be_bytes()),
    }
}
