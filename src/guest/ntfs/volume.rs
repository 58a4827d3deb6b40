//! Opening a volume: `$MFT` located from its own first record (and its
//! attribute list when the MFT is fragmented), the `$UpCase` table, the
//! label and dirty flag from `$Volume`, and whether `$LogFile` says the
//! volume was shut down cleanly. A crash-consistent snapshot of a running
//! Windows guest has an unclean log; it is served as it is on disk (no
//! replay) and the notes say so.

use super::mft::Vol;
use super::node::{self, Data};
use super::record::*;
use super::runlist::{self, Map};
use super::upcase::Upcase;
use crate::guest::GuestResult;

/// Reads `$MFT`'s runlist: first from record 0's own extent, then, if it
/// has an attribute list, all of it.
pub fn locate_mft(vol: &mut Vol) -> GuestResult<()> {
    let cs = vol.boot.cluster;
    let rec0 = vol.record_at(0, vol.boot.mft_lcn * cs)?;
    let attrs = rec0.attributes(&vol.name)?;
    let data = attrs
        .iter()
        .find(|a| a.ty == AT_DATA && a.name.is_empty())
        .ok_or_else(|| vol.corrupt(rec0.offset, "$MFT has no $DATA"))?;
    let Body::NonResident(nr) = &data.body else {
        return Err(vol.corrupt(data.offset, "$MFT's $DATA is resident"));
    };
    if nr.lowest_vcn != 0 {
        return Err(vol.corrupt(data.offset, "$MFT's first extent does not start at VCN 0"));
    }
    let runs = runlist::decode(
        &vol.name,
        &nr.pairs,
        nr.pairs_offset,
        0,
        (vol.boot.clusters, vol.boot.cluster),
    )?;
    let size = nr.size;
    vol.set_mft(Map::join(&vol.name, data.offset, vec![runs])?, size);
    if attrs.iter().any(|a| a.ty == AT_ATTRIBUTE_LIST) {
        let n = node::load(vol, 0)?;
        if let Some(s) = n.data() {
            if let Data::NonResident { map, size, .. } = &s.data {
                vol.set_mft(map.clone(), *size);
            }
        }
    }
    Ok(())
}

/// `$UpCase` (record 10).
pub fn upcase(vol: &Vol) -> GuestResult<Upcase> {
    let n = node::load(vol, 10)?;
    let s = n
        .data()
        .ok_or_else(|| vol.corrupt(n.offset, "$UpCase has no data"))?;
    if s.size() != 131_072 {
        return Err(vol.corrupt(
            s.at,
            format!("$UpCase holds {} bytes, not 131072", s.size()),
        ));
    }
    let mut raw = vec![0u8; 131_072];
    super::data::read(vol, s, 0, &mut raw)?;
    Ok(Upcase::new(&raw))
}

/// What `$Volume` (record 3) and `$LogFile` (record 2) say of the volume.
pub struct State {
    pub label: Option<String>,
    pub notes: Vec<String>,
    /// The dirty flag is set or the log was not left clean.
    pub unclean: bool,
}

/// Label, notes and cleanliness from `$Volume` and `$LogFile`.
pub fn state(vol: &Vol) -> GuestResult<State> {
    let n = node::load(vol, 3)?;
    let label = n
        .stream(AT_VOLUME_NAME, &[])
        .and_then(|s| s.resident())
        .map(|v| {
            let u: Vec<u16> = v
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&u)
        });
    let mut notes = Vec::new();
    let mut unclean = false;
    if let Some(v) = n
        .stream(AT_VOLUME_INFORMATION, &[])
        .and_then(|s| s.resident())
    {
        if v.len() >= 12 {
            let flags = le16(v, 10);
            notes.push(format!("NTFS {}.{}", v[8], v[9]));
            if flags & 0x0001 != 0 {
                unclean = true;
                notes.push("volume dirty: $Volume has the dirty flag set (Windows or ntfs-3g did not unmount it cleanly, or chkdsk is due)".into());
            }
        }
    }
    let log = log_clean(vol);
    unclean |= !matches!(log, Ok(true));
    match log {
        Ok(true) => {}
        Ok(false) => notes.push("log not replayed: $LogFile holds an unclean restart area; shown as on disk, like a crash-consistent snapshot".into()),
        Err(e) => notes.push(format!("log not replayed: $LogFile unreadable ({e})")),
    }
    Ok(State {
        label,
        notes,
        unclean,
    })
}

/// True if `$LogFile`'s newest restart area says the volume is clean (or
/// the log was reset, all 0xFF, as ntfsfix and mkntfs leave it).
fn log_clean(vol: &Vol) -> GuestResult<bool> {
    let n = node::load(vol, 2)?;
    let s = n
        .data()
        .ok_or_else(|| vol.corrupt(n.offset, "$LogFile has no data"))?;
    let mut newest: Option<(u64, bool)> = None;
    let mut page = 4096u64;
    let mut at = 0u64;
    for _ in 0..2 {
        let mut b = vec![0u8; page as usize];
        if at + page > s.size() || super::data::read(vol, s, at, &mut b)? < b.len() {
            break;
        }
        if b.iter().all(|&x| x == 0xFF) {
            at += page;
            continue;
        }
        if &b[0..4] == b"CHKD" {
            return Ok(false);
        }
        let sys = u64::from(le32(&b, 0x10));
        if &b[0..4] != b"RSTR" || !(512..=65536).contains(&sys) || !sys.is_power_of_two() {
            return Err(vol.corrupt(
                s.at,
                format!("$LogFile: no restart page at byte {at} of the log"),
            ));
        }
        if sys != page {
            page = sys;
            b.resize(page as usize, 0);
            super::data::read(vol, s, at, &mut b)?;
        }
        fixup(&vol.name, &mut b, 0, b"RSTR")?;
        let ra = usize::from(le16(&b, 0x18));
        if ra + 0x10 > b.len() {
            return Err(vol.corrupt(s.at, "$LogFile: restart area outside its page"));
        }
        let lsn = le64(&b, ra);
        let in_use = le16(&b, ra + 0x0C);
        let clean = in_use == 0xFFFF || le16(&b, ra + 0x0E) & 0x0002 != 0;
        if newest.is_none_or(|(l, _)| lsn >= l) {
            newest = Some((lsn, clean));
        }
        at += page;
    }
    Ok(newest.is_none_or(|(_, clean)| clean))
}
