//! The index of a memory source, kept beside the tree so that a source is
//! parsed once, not at every mount. A plain migration stream has to be read
//! end to end to find its pages (a record header before every page), which
//! for a few GiB of RAM on a cold disk takes seconds; its index (one run per
//! page, about 6 MiB per GiB) loads in milliseconds.
//!
//! Cache files live in a directory the caller names (the tree's is
//! `TREE/.snaptree-memory/index/`), one per source,
//! named by a hash of the source's canonical path. Each records what it was
//! built from (path, size, modification time, inode): a source that changed
//! in any of these is indexed again. A cache file is input like any other:
//! it is bounds-checked against its own length and against the source's
//! size, and one that does not check out is ignored and rebuilt, never
//! trusted.

use super::{MemorySource, Piece, RamBlock, Run};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 16] = b"snaptree-memidx\x01";
/// Sources this small are indexed again rather than cached.
const MIN_SOURCE: u64 = 16 << 20;

/// The cache file for the source at canonical path `source`.
pub fn file_for(cache_dir: &Path, source: &Path) -> PathBuf {
    // FNV-1a: stable across builds, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in source.as_os_str().as_encoded_bytes() {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    cache_dir.join(format!("{h:016x}.idx"))
}

/// What identifies one version of a source file.
#[derive(PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: i64,
    mtime_ns: i64,
    ino: u64,
    dev: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        size: m.len(),
        mtime: m.mtime(),
        mtime_ns: m.mtime_nsec(),
        ino: m.ino(),
        dev: m.dev(),
    })
}

/// The index of the source at `path` (canonical): from the cache in
/// `cache_dir` when it is there and current, else from `index`, then
/// stored (when `cache_dir` is `Some`; a read-only tree passes `None`).
pub fn load_or_index(
    cache_dir: Option<&Path>,
    path: &Path,
    index: impl FnOnce(&Path) -> crate::error::Result<MemorySource>,
) -> crate::error::Result<MemorySource> {
    let st = stamp(path);
    let cache = cache_dir.map(|d| file_for(d, path));
    if let (Some(c), Some(st)) = (&cache, &st) {
        // At most one 24-byte run per page of the source, plus names: a
        // larger file is not a cache of this source (and a FIFO is none).
        let max = (st.size / 4096).saturating_mul(32).saturating_add(1 << 20);
        if let Some(src) = crate::input::read_input(c, max)
            .ok()
            .and_then(|b| decode(&b, path, st))
        {
            return Ok(src);
        }
    }
    let src = index(path)?;
    if let (Some(c), Some(st)) = (cache, st) {
        if st.size >= MIN_SOURCE && !src.kind.starts_with("raw") {
            if let Err(e) = store(&c, &encode(&src, path, &st), path) {
                tracing::info!("memory index cache {}: {e}", c.display());
            }
        }
    }
    Ok(src)
}

/// Writes the index of `source` to `to`, as private as the source (it
/// names the source and its layout).
fn store(to: &Path, bytes: &[u8], source: &Path) -> std::io::Result<()> {
    // The cache directory is `.snaptree-memory/index` of a tree that may
    // come from someone else: each is created if missing, and neither may
    // be a symlink.
    let dir = to.parent().unwrap_or(Path::new("."));
    let mem_dir = dir.parent().unwrap_or(Path::new("."));
    let tree_dir = mem_dir.parent().unwrap_or(Path::new("."));
    let name = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| std::io::Error::other(format!("{}: not a cache directory", p.display())))
    };
    crate::confine::own_dir(tree_dir, &name(mem_dir)?)?;
    crate::confine::own_dir(mem_dir, &name(dir)?)?;
    let tmp = to.with_extension("tmp");
    let like = crate::ownership::Ownership::of(source)?.masked(0o666);
    let mut f = crate::ownership::create_replacing(&tmp, &like)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, to)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode(src: &MemorySource, path: &Path, st: &Stamp) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    put_str(&mut out, &path.to_string_lossy());
    for v in [st.size, st.mtime as u64, st.mtime_ns as u64, st.ino, st.dev] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    put_str(&mut out, &src.kind);
    put_str(&mut out, src.machine.as_deref().unwrap_or(""));
    out.push(src.machine.is_some() as u8);
    out.push(src.physical as u8);
    out.extend_from_slice(&(src.blocks.len() as u32).to_le_bytes());
    for b in &src.blocks {
        put_str(&mut out, &b.name);
        out.extend_from_slice(&b.size.to_le_bytes());
        out.extend_from_slice(&(b.runs.len() as u64).to_le_bytes());
        for r in &b.runs {
            out.extend_from_slice(&r.start.to_le_bytes());
            out.extend_from_slice(&r.len.to_le_bytes());
            let off = match r.piece {
                Piece::Data { file_offset } => file_offset,
                Piece::Zero => u64::MAX,
            };
            out.extend_from_slice(&off.to_le_bytes());
        }
    }
    out
}

/// A bounds-checked reader over a cache file.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len())?;
        let s = &self.b[self.at..end];
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
}

/// The source a cache file holds, if it is well formed, describes the
/// source `path` as `st` says it is now, and stays inside it.
fn decode(b: &[u8], path: &Path, st: &Stamp) -> Option<MemorySource> {
    let mut c = Cursor { b, at: 0 };
    if c.take(MAGIC.len())? != MAGIC || c.string()? != path.to_string_lossy() {
        return None;
    }
    let got = Stamp {
        size: c.u64()?,
        mtime: c.u64()? as i64,
        mtime_ns: c.u64()? as i64,
        ino: c.u64()?,
        dev: c.u64()?,
    };
    if got != *st {
        return None;
    }
    let kind = c.string()?;
    let machine = c.string()?;
    let machine = (c.u8()? == 1).then_some(machine);
    let physical = c.u8()? == 1;
    let n_blocks = c.u32()? as usize;
    let mut blocks = Vec::new();
    for _ in 0..n_blocks {
        let name = c.string()?;
        let size = c.u64().filter(|s| *s <= i64::MAX as u64)?;
        let n_runs = usize::try_from(c.u64()?).ok()?;
        // Each run is 24 bytes: a count the file cannot hold is a lie.
        if n_runs > c.left() / 24 {
            return None;
        }
        let mut runs = Vec::with_capacity(n_runs);
        let mut prev_end = 0;
        for _ in 0..n_runs {
            let (start, len, off) = (c.u64()?, c.u64()?, c.u64()?);
            let end = start.checked_add(len).filter(|e| *e <= size)?;
            if start < prev_end || len == 0 {
                return None;
            }
            prev_end = end;
            let piece = if off == u64::MAX {
                Piece::Zero
            } else {
                off.checked_add(len).filter(|e| *e <= st.size)?;
                Piece::Data { file_offset: off }
            };
            runs.push(Run { start, len, piece });
        }
        blocks.push(RamBlock { name, size, runs });
    }
    (c.left() == 0).then_some(MemorySource {
        path: path.to_path_buf(),
        kind,
        machine,
        physical,
        blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> MemorySource {
        MemorySource {
            path: "/x".into(),
            kind: "qemu migration stream".into(),
            machine: Some("pc-i440fx-10.0".into()),
            physical: false,
            blocks: vec![RamBlock {
                name: "pc.ram".into(),
                size: 1 << 20,
                runs: vec![
                    Run {
                        start: 0,
                        len: 4096,
                        piece: Piece::Data { file_offset: 100 },
                    },
                    Run {
                        start: 8192,
                        len: 4096,
                        piece: Piece::Zero,
                    },
                ],
            }],
        }
    }

    const ST: Stamp = Stamp {
        size: 1 << 30,
        mtime: 5,
        mtime_ns: 6,
        ino: 7,
        dev: 8,
    };

    #[test]
    fn round_trip_and_stale_or_damaged_caches_are_refused() {
        let p = Path::new("/x");
        let bytes = encode(&source(), p, &ST);
        let back = decode(&bytes, p, &ST).expect("decodes");
        assert_eq!(back.blocks[0].runs, source().blocks[0].runs);
        assert_eq!(back.machine, source().machine);
        let newer = Stamp { mtime_ns: 9, ..ST };
        assert!(decode(&bytes, p, &newer).is_none(), "a changed source");
        assert!(
            decode(&bytes, Path::new("/y"), &ST).is_none(),
            "another path"
        );
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut], p, &ST).is_none(), "cut at {cut}");
        }
        let mut huge = source();
        huge.blocks[0].size = u64::MAX;
        huge.blocks[0].runs.clear();
        assert!(
            decode(&encode(&huge, p, &ST), p, &ST).is_none(),
            "a block no file can hold"
        );
        let small = Stamp { size: 4000, ..ST };
        let bytes = encode(&source(), p, &small);
        assert!(
            decode(&bytes, p, &small).is_none(),
            "data past the source's end"
        );
    }
}
