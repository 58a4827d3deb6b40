//! Where a source's RAM goes in guest-physical address space, so that
//! `memory.raw` reads like a raw physical dump (what Volatility and crash
//! expect).
//!
//! Sources that know physical addresses (ELF cores) are placed as they
//! are. A migration stream knows only RAM blocks: the machine's main RAM
//! block (`pc.ram`, or a memory backend's id; the largest block when none
//! is called `pc.ram`) is split the way QEMU's x86 machines split it: the
//! first `below_4g` bytes at address 0, the rest from 4 GiB up, with a
//! hole in between for PCI and firmware. QEMU's rules (hw/i386/pc_piix.c
//! and pc_q35.c, gigabyte-aligned machine types):
//! - i440fx (`pc-i440fx-*`, `pc`): all below 4 GiB up to 3.5 GiB of RAM,
//!   else 3 GiB below;
//! - q35 (`pc-q35-*`, `q35`): all below up to 2.75 GiB of RAM, else 2 GiB
//!   below.
//!
//! A machine started with `max-ram-below-4g` splits elsewhere; the stream
//! does not record that property, so such RAM is placed as if it were
//! not set. Other blocks (video memory, ROMs) are not placed; they are
//! shown by name beside `memory.raw`.

use super::{MemorySource, RamBlock, Run};

const GIB: u64 = 1 << 30;
const FOUR_GIB: u64 = 4 * GIB;

/// A source placed at guest-physical addresses.
#[derive(Clone, Debug)]
pub struct Placement {
    /// End of the highest placed byte: the size of `memory.raw`.
    pub size: u64,
    /// Sorted, non-overlapping, guest-physical.
    pub runs: Vec<Run>,
    /// The block placed (`None` for physical sources).
    pub ram_block: Option<String>,
    /// RAM bytes placed below 4 GiB.
    pub below_4g: u64,
    /// Blocks not placed.
    pub others: Vec<RamBlock>,
}

/// RAM of `ram` bytes below 4 GiB on machine type `machine`.
pub fn below_4g(machine: Option<&str>, ram: u64) -> u64 {
    let q35 = machine.is_some_and(|m| m.contains("q35"));
    let (limit, split) = if q35 {
        (0xb000_0000, 2 * GIB)
    } else {
        (0xe000_0000, 3 * GIB)
    };
    if ram >= limit {
        split
    } else {
        ram
    }
}

/// Why a source cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("RAM block {name:?} of {size} bytes is larger than any file can be")]
    BlockTooLarge { name: String, size: u64 },
    #[error("the source holds no memory")]
    NoMemory,
    #[error("the source holds no RAM block")]
    NoRamBlock,
    #[error("the RAM block is too large to place above 4 GiB")]
    TooLargeAbove4G,
}

/// Places `src` (see the module docs). `Err` when it holds no RAM block,
/// or one too large to place.
pub fn place(src: &MemorySource) -> Result<Placement, PlacementError> {
    // No file can be larger: sizes beyond would wrap as file sizes.
    if let Some(b) = src.blocks.iter().find(|b| b.size > i64::MAX as u64) {
        return Err(PlacementError::BlockTooLarge {
            name: b.name.clone(),
            size: b.size,
        });
    }
    if src.physical {
        let b = src.blocks.first().ok_or(PlacementError::NoMemory)?;
        return Ok(Placement {
            size: b.size,
            runs: b.runs.clone(),
            ram_block: None,
            below_4g: b.size.min(FOUR_GIB),
            others: src.blocks[1..].to_vec(),
        });
    }
    let main = src
        .blocks
        .iter()
        .position(|b| b.name == "pc.ram")
        .or_else(|| {
            (0..src.blocks.len()).max_by_key(|&i| (src.blocks[i].size, std::cmp::Reverse(i)))
        })
        .ok_or(PlacementError::NoRamBlock)?;
    let ram = &src.blocks[main];
    let below = below_4g(src.machine.as_deref(), ram.size);
    // Parsers bound block sizes (and every run lies inside its block), so
    // this only keeps a source built some other way from wrapping around.
    let size = if ram.size > below {
        FOUR_GIB
            .checked_add(ram.size - below)
            .filter(|&s| s <= i64::MAX as u64)
            .ok_or(PlacementError::TooLargeAbove4G)?
    } else {
        ram.size
    };
    let mut runs = Vec::with_capacity(ram.runs.len() + 1);
    for r in &ram.runs {
        let mut r = *r;
        if r.start < below && r.start + r.len > below {
            // Crosses the split: the part above goes to 4 GiB.
            let first = below - r.start;
            runs.push(Run { len: first, ..r });
            r = Run {
                start: below,
                len: r.len - first,
                piece: advance(r.piece, first),
            };
        }
        if r.start >= below {
            r.start = FOUR_GIB + (r.start - below);
        }
        runs.push(r);
    }
    let others = src
        .blocks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != main)
        .map(|(_, b)| b.clone())
        .collect();
    Ok(Placement {
        size,
        runs,
        ram_block: Some(ram.name.clone()),
        below_4g: below,
        others,
    })
}

/// `piece` moved `by` bytes into its run.
fn advance(piece: super::Piece, by: u64) -> super::Piece {
    match piece {
        super::Piece::Data { file_offset } => super::Piece::Data {
            file_offset: file_offset + by,
        },
        z => z,
    }
}

#[cfg(test)]
mod tests {
    use super::super::Piece;
    use super::*;

    #[test]
    fn splits() {
        assert_eq!(below_4g(Some("pc-i440fx-10.0"), 64 << 20), 64 << 20);
        assert_eq!(below_4g(Some("pc-i440fx-10.0"), 4 * GIB), 3 * GIB);
        assert_eq!(below_4g(Some("pc-q35-10.0"), 3 * GIB), 2 * GIB);
        assert_eq!(below_4g(Some("pc-q35-10.0"), 2 * GIB), 2 * GIB);
        assert_eq!(below_4g(None, 0xdfff_f000), 0xdfff_f000);
    }

    #[test]
    fn a_run_across_the_split_goes_both_ways() {
        let src = MemorySource {
            path: "x".into(),
            kind: "test".into(),
            machine: Some("pc-q35-10.0".into()),
            physical: false,
            blocks: vec![RamBlock {
                name: "pc.ram".into(),
                size: 3 * GIB,
                runs: vec![Run {
                    start: 2 * GIB - 4096,
                    len: 8192,
                    piece: Piece::Data { file_offset: 100 },
                }],
            }],
        };
        let p = place(&src).unwrap();
        assert_eq!(p.size, FOUR_GIB + GIB);
        assert_eq!(
            p.runs,
            vec![
                Run {
                    start: 2 * GIB - 4096,
                    len: 4096,
                    piece: Piece::Data { file_offset: 100 }
                },
                Run {
                    start: FOUR_GIB,
                    len: 4096,
                    piece: Piece::Data {
                        file_offset: 100 + 4096
                    }
                },
            ]
        );
    }
}
