//! What is on a volume, by its magic numbers: filesystem type, label and
//! UUID, spelled as `blkid` spells them (TYPE, LABEL, UUID), so that
//! `volumes/index.json` says what a user would see in the guest. Only the
//! first blocks are read; nothing is mounted or walked beyond the FAT root
//! directory's first cluster (where FAT keeps its label).

use super::ReadBytes;

/// The result of [`probe`]; all `None` when nothing is recognised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    /// `ext4`, `vfat`, `xfs`, `ntfs`, `swap`, `crypto_LUKS`, `BitLocker`,
    /// `LVM2_member`, `btrfs`, `exfat`, `ReFS`, `zfs_member` ...
    pub fstype: Option<String>,
    pub label: Option<String>,
    pub uuid: Option<String>,
}

/// Recognises the filesystem (or container) at the start of `bytes`.
pub fn probe(bytes: &dyn ReadBytes) -> Probe {
    let probes: [fn(&dyn ReadBytes) -> Option<Probe>; 13] = [
        luks, bitlocker, lvm2, xfs, ext, btrfs, swap, ntfs, exfat, refs, vfat, iso9660, zfs,
    ];
    probes.iter().find_map(|p| p(bytes)).unwrap_or_default()
}

fn read(bytes: &dyn ReadBytes, offset: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    bytes.read_exact_at(&mut buf, offset).ok()?;
    Some(buf)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn found(fstype: &str, label: Option<String>, uuid: Option<String>) -> Option<Probe> {
    Some(Probe {
        fstype: Some(fstype.to_string()),
        label: label.filter(|l| !l.is_empty()),
        uuid: uuid.filter(|u| !u.is_empty()),
    })
}

/// A NUL-padded text field.
fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// A 16-byte UUID in big-endian textual form; `None` if all zero.
fn uuid(b: &[u8]) -> Option<String> {
    if b.iter().all(|&c| c == 0) {
        return None;
    }
    let id: &[u8; 16] = b.get(..16)?.try_into().ok()?;
    Some(crate::units::uuid_text(id))
}

/// ext2/3/4: the superblock at 1024, magic 0xEF53 at 56. The type follows
/// blkid's rule: a journal device is `jbd`; without a journal and with only
/// ext2 features, `ext2`; with a journal and only ext3 features, `ext3`;
/// else `ext4`.
fn ext(bytes: &dyn ReadBytes) -> Option<Probe> {
    let sb = read(bytes, 1024, 1024)?;
    if le16(&sb, 56) != 0xef53 {
        return None;
    }
    let (compat, incompat, ro) = (le32(&sb, 92), le32(&sb, 96), le32(&sb, 100));
    const HAS_JOURNAL: u32 = 0x4;
    const JOURNAL_DEV: u32 = 0x8;
    // ext2/ext3 know filetype, recover (ext3 only) and meta_bg; sparse
    // super, large file and btree dir read-only-compatibly.
    const EXT2_INCOMPAT: u32 = 0x2 | 0x10;
    const EXT3_INCOMPAT: u32 = 0x2 | 0x4 | 0x10;
    const EXT23_RO: u32 = 0x1 | 0x2 | 0x4;
    let fstype = if incompat & JOURNAL_DEV != 0 {
        "jbd"
    } else if compat & HAS_JOURNAL == 0 && incompat & !EXT2_INCOMPAT == 0 && ro & !EXT23_RO == 0 {
        "ext2"
    } else if compat & HAS_JOURNAL != 0 && incompat & !EXT3_INCOMPAT == 0 && ro & !EXT23_RO == 0 {
        "ext3"
    } else {
        "ext4"
    };
    found(fstype, Some(text(&sb[120..136])), uuid(&sb[104..120]))
}

/// XFS: "XFSB" at 0, UUID at 32, 12-byte label at 108.
fn xfs(bytes: &dyn ReadBytes) -> Option<Probe> {
    let sb = read(bytes, 0, 512)?;
    if &sb[0..4] != b"XFSB" {
        return None;
    }
    found("xfs", Some(text(&sb[108..120])), uuid(&sb[32..48]))
}

/// btrfs: the superblock at 64 KiB, magic "_BHRfS_M" at 64, fsid at 32,
/// label at 299.
fn btrfs(bytes: &dyn ReadBytes) -> Option<Probe> {
    let sb = read(bytes, 65536, 4096)?;
    if &sb[64..72] != b"_BHRfS_M" {
        return None;
    }
    found("btrfs", Some(text(&sb[299..299 + 256])), uuid(&sb[32..48]))
}

/// Linux swap: "SWAPSPACE2" in the last 10 bytes of the first page (page
/// sizes 4–64 KiB); version-1 header at 1024 with UUID at 12, label at 28.
fn swap(bytes: &dyn ReadBytes) -> Option<Probe> {
    for page in [4096u64, 8192, 16384, 65536] {
        let Some(magic) = read(bytes, page - 10, 10) else {
            continue;
        };
        if &magic == b"SWAPSPACE2" {
            let h = read(bytes, 1024, 44)?;
            return found("swap", Some(text(&h[28..44])), uuid(&h[12..28]));
        }
        if &magic == b"SWAP-SPACE" {
            return found("swap", None, None);
        }
    }
    None
}

/// LUKS 1 and 2: magic "LUKS\xba\xbe" at 0, UUID as text at 168; LUKS2
/// keeps a label at 24.
fn luks(bytes: &dyn ReadBytes) -> Option<Probe> {
    let h = read(bytes, 0, 208)?;
    if &h[0..6] != b"LUKS\xba\xbe" {
        return None;
    }
    let version = u16::from_be_bytes([h[6], h[7]]);
    let label = (version == 2).then(|| text(&h[24..72]));
    found("crypto_LUKS", label, Some(text(&h[168..208])))
}

/// An LVM2 PV: "LABELONE" and "LVM2 001" in one of the first four
/// sectors; UUID is the PV UUID in its dashed form.
fn lvm2(bytes: &dyn ReadBytes) -> Option<Probe> {
    for sector in 0..4u64 {
        let s = read(bytes, sector * 512, 512)?;
        if &s[0..8] == b"LABELONE" && &s[24..32] == b"LVM2 001" {
            let at = (le32(&s, 20) as usize).min(512 - 32);
            let raw = String::from_utf8_lossy(&s[at..at + 32]).into_owned();
            return found("LVM2_member", None, Some(super::volumes::pv_uuid(&raw)));
        }
    }
    None
}

/// NTFS: "NTFS    " at 3; the UUID blkid shows is the 64-bit volume
/// serial at 0x48 in upper-case hex; the label is the $VOLUME_NAME
/// attribute of MFT record 3 ($Volume).
fn ntfs(bytes: &dyn ReadBytes) -> Option<Probe> {
    let b = read(bytes, 0, 512)?;
    if &b[3..11] != b"NTFS    " {
        return None;
    }
    let serial = u64::from_le_bytes(b[0x48..0x50].try_into().ok()?);
    found(
        "ntfs",
        ntfs_label(bytes, &b),
        Some(format!("{serial:016X}")),
    )
}

fn ntfs_label(bytes: &dyn ReadBytes, boot: &[u8]) -> Option<String> {
    let sector = le16(boot, 0x0b) as u64;
    let spc = boot[0x0d] as u64;
    if !matches!(sector, 256..=4096) || !sector.is_power_of_two() || !spc.is_power_of_two() {
        return None;
    }
    let cluster = sector * spc;
    let per = boot[0x40] as i8;
    let record = match per {
        1..=127 => per as u64 * cluster,
        -31..=-1 => 1u64 << (-per as u32),
        _ => return None,
    };
    if !(sector..=65536).contains(&record) {
        return None;
    }
    let mft = u64::from_le_bytes(boot[0x30..0x38].try_into().ok()?);
    let at = mft.checked_mul(cluster)?.checked_add(3 * record)?;
    let mut r = read(bytes, at, record as usize)?;
    if &r[0..4] != b"FILE" {
        return None;
    }
    // Update sequence: the last two bytes of each sector were swapped out.
    let (usa, count) = (le16(&r, 4) as usize, le16(&r, 6) as usize);
    if count == 0 || usa + 2 * count > r.len() || (count - 1) as u64 * sector > record {
        return None;
    }
    for i in 1..count {
        let end = i * sector as usize;
        let (a, b) = (r[usa + 2 * i], r[usa + 2 * i + 1]);
        r[end - 2] = a;
        r[end - 1] = b;
    }
    let mut pos = le16(&r, 0x14) as usize;
    while pos + 24 <= r.len() {
        let (kind, len) = (le32(&r, pos), le32(&r, pos + 4) as usize);
        if kind == 0xffff_ffff || len < 24 || pos + len > r.len() {
            return None;
        }
        if kind == 0x60 && r[pos + 8] == 0 {
            let (vlen, voff) = (le32(&r, pos + 0x10) as usize, le16(&r, pos + 0x14) as usize);
            let value = r.get(pos + voff..pos + voff + vlen)?;
            let units: Vec<u16> = value
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            return Some(String::from_utf16_lossy(&units));
        }
        pos += len;
    }
    None
}

/// BitLocker (Vista and later): the boot sector's OEM name is
/// "-FVE-FS-" instead of "NTFS    "; the volume inside is encrypted.
fn bitlocker(bytes: &dyn ReadBytes) -> Option<Probe> {
    let b = read(bytes, 0, 512)?;
    (&b[3..11] == b"-FVE-FS-")
        .then(|| found("BitLocker", None, None))
        .flatten()
}

/// exFAT: "EXFAT   " at 3, the volume serial at 100 (shown XXXX-XXXX as
/// blkid does). The label lives in the root directory; not read here.
fn exfat(bytes: &dyn ReadBytes) -> Option<Probe> {
    let b = read(bytes, 0, 512)?;
    if &b[3..11] != b"EXFAT   " {
        return None;
    }
    let id = le32(&b, 100);
    found(
        "exfat",
        None,
        Some(format!("{:04X}-{:04X}", id >> 16, id & 0xffff)),
    )
}

/// ReFS: "ReFS" and four NULs at 3, "FSRS" at 16.
fn refs(bytes: &dyn ReadBytes) -> Option<Probe> {
    let b = read(bytes, 0, 512)?;
    (&b[3..11] == b"ReFS\0\0\0\0" && &b[16..20] == b"FSRS")
        .then(|| found("ReFS", None, None))
        .flatten()
}

/// A ZFS pool member: the uberblock magic 0x00bab10c (either byte order)
/// at the start of one of the first uberblocks of label 0, whose
/// uberblock ring starts 128 KiB into the label, 1 KiB per slot at the
/// smallest ashift.
fn zfs(bytes: &dyn ReadBytes) -> Option<Probe> {
    let ring = read(bytes, 128 << 10, 32 << 10)?;
    let magic = 0x00ba_b10cu64;
    ring.chunks_exact(1024)
        .any(|u| {
            let m: [u8; 8] = u[..8].try_into().expect("8 bytes");
            u64::from_le_bytes(m) == magic || u64::from_be_bytes(m) == magic
        })
        .then(|| found("zfs_member", None, None))
        .flatten()
}

/// ISO 9660: "CD001" in the primary volume descriptor at 32 KiB; the label
/// is the volume identifier, the UUID blkid makes from the creation time.
fn iso9660(bytes: &dyn ReadBytes) -> Option<Probe> {
    let d = read(bytes, 32768, 2048)?;
    if d[0] != 1 || &d[1..6] != b"CD001" {
        return None;
    }
    let label = String::from_utf8_lossy(&d[40..72]).trim_end().to_string();
    let t = &d[813..829];
    let uuid = t.iter().all(u8::is_ascii_digit).then(|| {
        let s = |r: std::ops::Range<usize>| String::from_utf8_lossy(&t[r]).into_owned();
        format!(
            "{}-{}-{}-{}-{}-{}-{}",
            s(0..4),
            s(4..6),
            s(6..8),
            s(8..10),
            s(10..12),
            s(12..14),
            s(14..16)
        )
    });
    found("iso9660", Some(label), uuid)
}

/// FAT12/16/32 (Microsoft FAT spec): a plausible BPB, then the volume ID as
/// XXXX-XXXX and the label from the root directory's volume-label entry,
/// else from the boot sector, as blkid does ("NO NAME" is no label).
fn vfat(bytes: &dyn ReadBytes) -> Option<Probe> {
    let b = read(bytes, 0, 512)?;
    let bps = le16(&b, 11) as u64;
    let spc = b[13] as u64;
    let reserved = le16(&b, 14) as u64;
    let fats = b[16] as u64;
    let root_entries = le16(&b, 17) as u64;
    if !matches!(bps, 512 | 1024 | 2048 | 4096)
        || !spc.is_power_of_two()
        || reserved == 0
        || !(1..=4).contains(&fats)
    {
        return None;
    }
    if b[510] != 0x55 || b[511] != 0xaa || !matches!(b[0], 0xeb | 0xe9) {
        return None;
    }
    let fat32 = le16(&b, 22) == 0;
    let (id_at, label_at, sig_at) = if fat32 { (67, 71, 66) } else { (39, 43, 38) };
    if !matches!(b[sig_at], 0x28 | 0x29) {
        return found("vfat", None, None);
    }
    let id = le32(&b, id_at);
    let uuid = format!("{:04X}-{:04X}", id >> 16, id & 0xffff);
    let fat_size = if fat32 {
        le32(&b, 36) as u64
    } else {
        le16(&b, 22) as u64
    };
    let data = (reserved + fats * fat_size) * bps;
    let root = if fat32 {
        let cluster = le32(&b, 44) as u64;
        data + (root_entries * 32).div_ceil(bps) * bps + cluster.saturating_sub(2) * spc * bps
    } else {
        data
    };
    let root_len = if fat32 { spc * bps } else { root_entries * 32 };
    let label = fat_root_label(bytes, root, root_len.min(1 << 20))
        .or_else(|| {
            Some(
                String::from_utf8_lossy(&b[label_at..label_at + 11])
                    .trim_end()
                    .to_string(),
            )
        })
        .filter(|l| l != "NO NAME");
    found("vfat", label, Some(uuid))
}

/// The volume-label entry (attribute 0x08, not a long-name part) of a
/// root directory region.
fn fat_root_label(bytes: &dyn ReadBytes, at: u64, len: u64) -> Option<String> {
    let dir = read(bytes, at, len as usize)?;
    for e in dir.chunks_exact(32) {
        match e[0] {
            0 => return None,
            0xe5 => continue,
            _ => {}
        }
        if e[11] & 0x3f == 0x08 {
            return Some(String::from_utf8_lossy(&e[..11]).trim_end().to_string());
        }
    }
    None
}
