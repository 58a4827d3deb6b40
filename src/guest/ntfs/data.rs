//! Reading an attribute's value: resident bytes, runs of clusters with
//! sparse runs as zeros and bytes past the initialized size as zeros, and
//! compressed attributes unit by unit (a unit whose clusters are all
//! allocated is stored raw, one with a sparse tail is LZNT1, an all-sparse
//! one is zeros). A compressed unit that fails to decode fails the read
//! with its volume offset; no bytes are guessed.

use super::lznt1;
use super::mft::Vol;
use super::node::{Data, Stream};
use super::record::ATTR_ENCRYPTED;
use super::runlist::Map;
use crate::guest::{GuestError, GuestResult};

/// Largest compression unit read (NTFS uses 16 clusters of <= 4 KiB).
pub const MAX_UNIT: u64 = 1 << 20;

/// Reads `s` from `offset` into `buf`; returns the bytes read (short only
/// at the end of the value).
pub fn read(vol: &Vol, s: &Stream, offset: u64, buf: &mut [u8]) -> GuestResult<usize> {
    if s.flags & ATTR_ENCRYPTED != 0 {
        return Err(GuestError::unsupported(&vol.name, "encrypted (EFS) file"));
    }
    let size = s.size();
    if offset >= size || buf.is_empty() {
        return Ok(0);
    }
    let len = (size - offset).min(buf.len() as u64) as usize;
    let buf = &mut buf[..len];
    match &s.data {
        Data::Resident(v) => buf.copy_from_slice(&v[offset as usize..offset as usize + len]),
        Data::NonResident {
            map,
            initialized,
            cu,
            at,
            ..
        } => {
            // Past the initialized size the value reads as zeros.
            let init = (*initialized).clamp(offset, offset + len as u64);
            let n = (init - offset) as usize;
            buf[n..].fill(0);
            if *cu == 0 {
                plain(vol, map, *at, offset, &mut buf[..n])?;
            } else {
                compressed(vol, map, *at, (*cu, size), offset, &mut buf[..n])?;
            }
        }
    }
    Ok(len)
}

/// Uncompressed runs.
fn plain(vol: &Vol, map: &Map, at: u64, offset: u64, buf: &mut [u8]) -> GuestResult<()> {
    let cs = vol.boot.cluster;
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let vcn = pos / cs;
        let run = map.find(vcn).ok_or_else(|| {
            vol.corrupt(
                at,
                format!("attribute: no run maps VCN {vcn} below its size"),
            )
        })?;
        // Runlists bound VCNs and LCNs (see `runlist::decode`); checked
        // anyway, as a wrong product would read the wrong bytes.
        let overflow = || vol.corrupt(at, format!("attribute: run at VCN {} overflows", run.vcn));
        let run_end = (run.vcn + run.len).checked_mul(cs).ok_or_else(overflow)?;
        let n = (run_end - pos).min((buf.len() - done) as u64) as usize;
        let dst = &mut buf[done..done + n];
        match run.lcn {
            None => dst.fill(0),
            Some(lcn) => {
                let src = lcn
                    .checked_mul(cs)
                    .and_then(|b| b.checked_add(pos - run.vcn * cs))
                    .ok_or_else(overflow)?;
                vol.read_at(dst, src)?
            }
        }
        done += n;
    }
    Ok(())
}

/// Compressed runs, one compression unit at a time.
fn compressed(
    vol: &Vol,
    map: &Map,
    at: u64,
    (cu, size): (u8, u64),
    offset: u64,
    buf: &mut [u8],
) -> GuestResult<()> {
    let cs = vol.boot.cluster;
    let unit = cs
        .checked_shl(u32::from(cu))
        .filter(|u| *u <= MAX_UNIT && cu <= 16);
    let Some(unit) = unit else {
        return Err(vol.corrupt(at, format!("compression unit of 2^{cu} clusters")));
    };
    let mut done = 0usize;
    let mut scratch = Vec::new();
    while done < buf.len() {
        let pos = offset + done as u64;
        let u = pos / unit;
        let within = (pos - u * unit) as usize;
        let n = (unit as usize - within).min(buf.len() - done);
        let data = decode_unit(vol, map, at, (u, unit, size), &mut scratch)?;
        let dst = &mut buf[done..done + n];
        match data {
            None => dst.fill(0),
            Some(d) => dst.copy_from_slice(&d[within..within + n]),
        }
        done += n;
    }
    Ok(())
}

/// Unit `u`'s bytes (`None`: all zeros) of a stream of `size` bytes in
/// units of `unit` bytes, decoded into `scratch`.
fn decode_unit<'a>(
    vol: &Vol,
    map: &Map,
    at: u64,
    (u, unit, size): (u64, u64, u64),
    scratch: &'a mut Vec<u8>,
) -> GuestResult<Option<&'a [u8]>> {
    let cs = vol.boot.cluster;
    let per = unit / cs;
    let first = u * per;
    // Allocated clusters of the unit, in order; they must come first.
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut allocated = 0u64;
    let mut sparse = false;
    let mut vcn = first;
    while vcn < first + per {
        let Some(run) = map.find(vcn) else {
            // The map may end inside the last unit, past the data: the
            // rest is sparse. Unmapped clusters holding data are corrupt
            // (ntfs-3g fails them with EIO); zeros would be a guess.
            if vcn.saturating_mul(cs) < size {
                return Err(vol.corrupt(
                    at,
                    format!("compressed attribute: no run maps VCN {vcn} below its size {size}"),
                ));
            }
            sparse = true;
            break;
        };
        let n = (run.vcn + run.len).min(first + per) - vcn;
        match run.lcn {
            None => sparse = true,
            Some(lcn) => {
                if sparse {
                    return Err(vol.corrupt(
                        at,
                        format!("compression unit at VCN {first}: data after its sparse tail"),
                    ));
                }
                extents.push(((lcn + vcn - run.vcn) * cs, n * cs));
                allocated += n;
            }
        }
        vcn += n;
    }
    if allocated == 0 {
        return Ok(None);
    }
    let mut raw = vec![0u8; (allocated * cs) as usize];
    let mut o = 0usize;
    for (off, len) in &extents {
        vol.read_at(&mut raw[o..o + *len as usize], *off)?;
        o += *len as usize;
    }
    if !sparse {
        // Did not compress: stored as it is.
        *scratch = raw;
        return Ok(Some(&scratch[..]));
    }
    scratch.clear();
    scratch.resize(unit as usize, 0);
    lznt1::decompress(&raw, scratch).map_err(|(i, what)| {
        let off = extents.iter().scan(0u64, |acc, (o, l)| {
            let r = (i as u64 >= *acc && (i as u64) < *acc + l).then(|| o + (i as u64 - *acc));
            *acc += l;
            Some(r)
        });
        let off = off.flatten().next().unwrap_or(extents[0].0);
        vol.corrupt(
            off,
            format!("LZNT1 data of compression unit at VCN {first}: {what}"),
        )
    })?;
    Ok(Some(&scratch[..]))
}
