//! The internal snapshot table: parsed so `info` can list it, a writer
//! the leak repair can count the references of their L1 tables, and
//! `at_snapshot` can open each snapshot read-only through its own L1 table.

use super::header::Header;
use crate::error::{ImageError, Result};
use crate::fileio::{be_u16, be_u32, be_u64, read_exact_at};
use crate::image::storage::Storage;
use crate::image::InternalSnapshot;
use std::path::Path;

/// Fixed part of a snapshot table entry.
const ENTRY_FIXED: u64 = 40;
/// Reading more than this for the table means it is corrupt.
const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One entry of the snapshot table: what `info` lists, and where the
/// snapshot's L1 table and the entry itself are (checked only when the
/// snapshot is opened, see `at_snapshot`).
#[derive(Clone, Debug)]
pub struct SnapshotEntry {
    pub info: InternalSnapshot,
    pub l1_offset: u64,
    pub l1_size: u32,
    /// Where the entry is in the file, and its length with padding.
    pub entry_at: u64,
    pub entry_len: u64,
}

pub fn read_snapshots(
    file: &dyn Storage,
    path: &Path,
    h: &Header,
    file_len: u64,
) -> Result<Vec<SnapshotEntry>> {
    let mut out = Vec::new();
    let mut at = h.snapshots_offset;
    let limit = h
        .snapshots_offset
        .saturating_add(MAX_TABLE_BYTES)
        .min(file_len);
    for _ in 0..h.nb_snapshots {
        if at + ENTRY_FIXED > limit {
            return Err(ImageError::corrupt(
                path,
                at,
                "snapshot table entry runs past the end of the file",
            ));
        }
        let mut fixed = [0u8; ENTRY_FIXED as usize];
        read_exact_at(file, path, &mut fixed, at, "snapshot table entry")?;
        let id_len = be_u16(&fixed, 12) as u64;
        let name_len = be_u16(&fixed, 14) as u64;
        let extra_len = be_u32(&fixed, 36) as u64;
        let var_len = extra_len + id_len + name_len;
        if at + ENTRY_FIXED + var_len > limit || extra_len > 1024 {
            return Err(ImageError::corrupt(
                path,
                at,
                format!("snapshot table entry with {extra_len} bytes of extra data, {id_len}-byte id and {name_len}-byte name runs past the end of the file"),
            ));
        }
        let mut var = vec![0u8; var_len as usize];
        read_exact_at(
            file,
            path,
            &mut var,
            at + ENTRY_FIXED,
            "snapshot table entry",
        )?;
        let extra = &var[..extra_len as usize];
        let vm_state_size = if extra.len() >= 8 {
            be_u64(extra, 0)
        } else {
            be_u32(&fixed, 32) as u64
        };
        let disk_size = (extra.len() >= 16).then(|| be_u64(extra, 8));
        let id = String::from_utf8_lossy(&var[extra_len as usize..(extra_len + id_len) as usize])
            .into_owned();
        let name = String::from_utf8_lossy(&var[(extra_len + id_len) as usize..]).into_owned();
        // QEMU writes -1 when no icount was recorded.
        let icount = (extra.len() >= 24)
            .then(|| be_u64(extra, 16))
            .filter(|&i| i != u64::MAX);
        let entry_len = (ENTRY_FIXED + var_len).div_ceil(8) * 8;
        out.push(SnapshotEntry {
            info: InternalSnapshot {
                id,
                name,
                date_sec: be_u32(&fixed, 16),
                vm_clock_nsec: be_u64(&fixed, 24),
                vm_state_size,
                disk_size,
                date_nsec: be_u32(&fixed, 20),
                icount,
            },
            l1_offset: be_u64(&fixed, 0),
            l1_size: be_u32(&fixed, 8),
            entry_at: at,
            entry_len,
        });
        at += entry_len;
    }
    Ok(out)
}
