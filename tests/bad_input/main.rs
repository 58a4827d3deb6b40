//! Bad-input integration tests for the `snaptree` CLI.
//!
//! Every test builds a valid image with qemu-img/qemu-io (the oracle for what
//! "valid" means), corrupts it by patching bytes as laid out in the qcow2
//! spec (header fields are big-endian), and runs `snaptree info`, `map` and
//! `export` on it. The contract checked here:
//!
//! * a failing command exits with status 1: never 101 (a Rust panic), never a
//!   signal (an abort after a failed huge allocation shows up as SIGABRT
//!   because every run is capped at a 4 GiB address space), never a hang
//!   (every run has a deadline and is killed and reported when it passes it);
//! * its stderr names the image file path and contains the word `offset`
//!   followed (closely) by the decimal byte offset that is wrong;
//! * the input file is never modified (bytes and mtime are compared).
//!
//! Most tests are tables of [`Case`]s: a source image, the bytes changed in a
//! copy of it, and the offsets a refusal may name. The modules hold the
//! rest: [`outcome`] runs snaptree under the cap and deadline, [`contract`]
//! states the contract above as checks, [`report`] runs the three commands
//! per case and collects every violation, [`qcow2`] is the layout being
//! corrupted, [`fixtures`] builds the valid images, [`fuzz`] flips random
//! bytes. Set `BAD_INPUT_VERBOSE=1` to see every run; `SNAPTREE_FUZZ_ITERS`
//! and `SNAPTREE_FUZZ_SEED` steer the fuzzer.
//!
//! The test functions stay in this file, the crate root, so that their names
//! (`cargo test --test bad_input -- NAME`) carry no module path.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod contract;
mod deep_chain;
mod fixtures;
mod fuzz;
mod outcome;
mod qcow2;
mod report;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use common::note;
use contract::{Expect, FileState};
use fixtures::{
    compressed_image, convert_to_raw, create_luks_qcow2, create_overlay, create_qcow2,
    image_with_data, make_fifo, overlay_on, qemu_io, qemu_reads_ok, rebase_unsafe, short_stream,
    tempdir,
};
use outcome::snaptree;
use qcow2::*;
use report::{check_cases, Case, Report, Runs, ALL_FAIL, ANY_CLEAN, EXPORT_FAILS, READS_FAIL};

/// Words one of which a refusal of a backing cycle must use.
const CYCLE_WORDS: &[&str] = &[
    "cycle", "loop", "itself", "circular", "recurs", "depth", "deep",
];

/// Cases that point the L1 or L2 entry at `entry_pos` of `src` at each of
/// `targets` (copies named `{prefix}{target}.qcow2`); a refusal must name
/// the entry or the target.
fn pointer_cases<'a>(
    src: &'a Path,
    entry_pos: u64,
    prefix: &str,
    targets: &[u64],
) -> Vec<Case<'a>> {
    targets
        .iter()
        .map(|&target| Case {
            src,
            name: format!("{prefix}{target}.qcow2"),
            edits: vec![Edit::be64(entry_pos, FLAG_COPIED | target)],
            offsets: vec![entry_pos, target],
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests: headers
// ---------------------------------------------------------------------------

#[test]
fn truncated_header_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let v3 = dir.path().join("v3.qcow2");
    let v2 = dir.path().join("v2.qcow2");
    create_qcow2(&v3, "", "1M");
    create_qcow2(&v2, "compat=0.10", "1M");
    let cuts: [(&Path, &str, u64); 8] = [
        (&v3, "v3", 10),
        (&v3, "v3", 50),
        (&v3, "v3", 90),
        (&v3, "v3", 72),
        (&v3, "v3", 100),
        (&v2, "v2", 10),
        (&v2, "v2", 50),
        (&v2, "v2", 70),
    ];
    let cases = cuts.map(|(src, kind, len)| {
        let mut offsets = vec![0, len, 72, 104, 112];
        offsets.extend(fields_cut_at(len));
        Case {
            src,
            name: format!("{kind}-cut{len}.qcow2"),
            edits: vec![Edit::Truncate(len)],
            offsets,
        }
    });
    check_cases(dir.path(), &ALL_FAIL, &[], cases);
}

#[test]
fn header_length_beyond_cluster_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let big = dir.path().join("c64k.qcow2");
    let small = dir.path().join("c512.qcow2");
    create_qcow2(&big, "", "1M");
    create_qcow2(&small, "cluster_size=512", "1M");
    let lengths: [(&Path, u32); 4] = [
        (&big, 65536 + 8),
        (&big, 0xffff_fff8),
        (&small, 520),
        (&small, 4096),
    ];
    let cases = lengths.map(|(src, header_length)| {
        let cs = Header::read(src).cluster_size();
        Case {
            src,
            name: format!("hl{header_length}-c{cs}.qcow2"),
            edits: vec![Edit::be32(OFF_HEADER_LENGTH, header_length)],
            offsets: vec![OFF_HEADER_LENGTH, cs, u64::from(header_length)],
        }
    });
    check_cases(dir.path(), &ALL_FAIL, &[], cases);
}

#[test]
fn bad_cluster_bits_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let src = dir.path().join("src.qcow2");
    create_qcow2(&src, "", "1M");
    let cases = [0u32, 8, 22, 31, 63, 64, 255, u32::MAX].map(|bits| Case {
        src: &src,
        name: format!("cb{bits}.qcow2"),
        edits: vec![Edit::be32(OFF_CLUSTER_BITS, bits)],
        offsets: vec![OFF_CLUSTER_BITS],
    });
    check_cases(dir.path(), &ALL_FAIL, &[], cases);
}

#[test]
fn virtual_size_2_pow_63_is_refused_without_huge_allocation() {
    require_qemu!();
    let dir = tempdir();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let cases = [1u64 << 63, u64::MAX, (1u64 << 63) - 512].map(|size| Case {
        src: &src,
        name: format!("size{size}.qcow2"),
        edits: vec![Edit::be64(OFF_SIZE, size)],
        offsets: vec![OFF_SIZE, OFF_L1_SIZE],
    });
    check_cases(dir.path(), &ALL_FAIL, &[], cases);
}

#[test]
fn huge_l1_size_is_refused_without_huge_allocation() {
    require_qemu!();
    let dir = tempdir();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let h = Header::read(&src);
    let cases = [0x0400_0000u32, 0x7fff_ffff, u32::MAX].map(|l1_size| Case {
        src: &src,
        name: format!("l1size{l1_size}.qcow2"),
        edits: vec![Edit::be32(OFF_L1_SIZE, l1_size)],
        offsets: vec![OFF_L1_SIZE, OFF_L1_TABLE_OFFSET, h.l1_table_offset],
    });
    check_cases(dir.path(), &READS_FAIL, &[], cases);
}

#[test]
fn unknown_incompatible_feature_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let base_features = Header::read(&src).incompatible_features;
    let cases = [5u32, 17, 40, 63].map(|bit| Case {
        src: &src,
        name: format!("feature{bit}.qcow2"),
        edits: vec![Edit::be64(
            OFF_INCOMPATIBLE_FEATURES,
            base_features | (1 << bit),
        )],
        offsets: vec![OFF_INCOMPATIBLE_FEATURES],
    });
    let words = ["feature", "incompatible", "unsupported"];
    check_cases(dir.path(), &ALL_FAIL, &words, cases);
}

#[test]
fn encrypted_image_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let words: &[&str] = &["encrypt", "crypt"];
    // crypt_method 1 = the legacy AES scheme; 2 = LUKS (normally with a LUKS
    // header extension, which this patched image lacks); 7 = unknown.
    let cases = [1u32, 2, 7].map(|method| Case {
        src: &src,
        name: format!("crypt{method}.qcow2"),
        edits: vec![Edit::be32(OFF_CRYPT_METHOD, method)],
        offsets: vec![OFF_CRYPT_METHOD],
    });
    report.check_cases(dir.path(), &EXPORT_FAILS, words, cases);
    // A real LUKS-encrypted image as qemu-img makes it.
    let luks = dir.path().join("luks.qcow2");
    match create_luks_qcow2(&luks) {
        Err(why) => note(format_args!(
            "note: cannot create a LUKS qcow2 here, patched cases only\n{why}"
        )),
        Ok(_) => report.check(
            "luks",
            &luks,
            &[],
            &EXPORT_FAILS,
            &Expect {
                paths: &[&luks],
                offsets: &[OFF_CRYPT_METHOD],
                words,
            },
        ),
    }
    report.finish();
}

#[test]
fn bad_header_pointers_are_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base, "cluster_size=512", "1M");
    let src = dir.path().join("src.qcow2");
    create_overlay(&src, "base.qcow2", "cluster_size=512");
    let h = Header::read(&src);
    let header_length = u64::from(h.header_length);
    let bfo = h.backing_file_offset;
    let case = |what: &str, edit: Edit, offsets: Vec<u64>| Case {
        src: &src,
        name: format!("{what}.qcow2"),
        edits: vec![edit],
        offsets,
    };
    let pointers = [
        // First header extension (backing format) claims ~4 GiB.
        case(
            "ext-len",
            Edit::be32(header_length + 4, 0xffff_fff0),
            vec![header_length, header_length + 4],
        ),
        case(
            "backing-offset-past-cluster",
            Edit::be64(OFF_BACKING_FILE_OFFSET, 0x000f_fff0),
            vec![OFF_BACKING_FILE_OFFSET, OFF_BACKING_FILE_SIZE, 0x000f_fff0],
        ),
        case(
            "backing-offset-overflows",
            Edit::be64(OFF_BACKING_FILE_OFFSET, u64::MAX - 15),
            vec![
                OFF_BACKING_FILE_OFFSET,
                OFF_BACKING_FILE_SIZE,
                u64::MAX - 15,
            ],
        ),
        case(
            "backing-size-4g",
            Edit::be32(OFF_BACKING_FILE_SIZE, u32::MAX),
            vec![OFF_BACKING_FILE_OFFSET, OFF_BACKING_FILE_SIZE, bfo],
        ),
        // refcount_order above 6 (refcounts wider than 64 bits).
        case(
            "refcount-order-7",
            Edit::be32(OFF_REFCOUNT_ORDER, 7),
            vec![OFF_REFCOUNT_ORDER],
        ),
    ];
    report.check_cases(dir.path(), &ALL_FAIL, &[], pointers);

    // Internal snapshot table: whether a read-only tool looks at it is its
    // business, but if it does it must neither crash nor allocate for 4G
    // entries.
    let snapshot_tables = [
        ("snapshots-4g", u32::MAX, 512u64),
        ("snapshots-past-eof", 1, 0xffff_0000),
        ("snapshots-offset-overflows", 2, u64::MAX - 511),
    ]
    .map(|(what, nb, table)| Case {
        src: &src,
        name: format!("{what}.qcow2"),
        edits: vec![
            Edit::be32(OFF_NB_SNAPSHOTS, nb),
            Edit::be64(OFF_SNAPSHOTS_OFFSET, table),
        ],
        offsets: vec![OFF_NB_SNAPSHOTS, OFF_SNAPSHOTS_OFFSET, table],
    });
    report.check_cases(dir.path(), &ANY_CLEAN, &[], snapshot_tables);
    report.finish();
}

#[test]
fn backing_file_that_is_missing_or_not_a_file_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    fs::create_dir(dir.path().join("subdir")).unwrap();
    let mut cases = vec![
        ("missing", "gone.raw"),
        ("dot", "."),
        ("subdir", "subdir"),
        ("missing-in-missing-dir", "nowhere/gone.raw"),
    ];
    if make_fifo(&dir.path().join("fifo")) {
        // Opening a FIFO for reading blocks until a writer shows up: a tool
        // that opens whatever the image names would hang here.
        cases.push(("fifo", "fifo"));
    } else {
        note("note: mkfifo failed, FIFO case skipped");
    }
    let runs = Runs {
        timeout: Duration::from_secs(10),
        ..ALL_FAIL
    };
    for (what, reference) in cases {
        let name = format!("{what}.qcow2");
        let img = overlay_on(dir.path(), &name, reference);
        let target = dir.path().join(reference);
        let exp = Expect {
            paths: &[&img, &target],
            offsets: &Header::read(&img).backing_offsets(),
            words: &[],
        };
        report.check(&name, &img, &[], &runs, &exp);
    }
    report.finish();
}

// ---------------------------------------------------------------------------
// Tests: L1 / L2 tables
// ---------------------------------------------------------------------------

#[test]
fn l1_entry_past_eof_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let h = Header::read(&src);
    let targets = [h.past_eof(), h.eof_cluster(), h.max_entry_offset()];
    let cases = pointer_cases(&src, h.l1_entry_pos(0), "l1-", &targets);
    check_cases(dir.path(), &READS_FAIL, &[], cases);
}

#[test]
fn l1_entry_into_header_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let h = Header::read(&src);
    // Inside cluster 0 (the header): necessarily unaligned, since offset 0
    // itself means "unallocated".
    let cases = pointer_cases(&src, h.l1_entry_pos(0), "l1-hdr", &[512, 0x8000]);
    check_cases(dir.path(), &READS_FAIL, &[], cases);
}

#[test]
fn l2_entry_past_eof_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let src = image_with_data(dir.path(), "base.qcow2", "");
    let h = Header::read(&src);
    // L2[0] maps guest offset 0, which holds data.
    let entry_pos = h.l2_table(&src, 0);
    let targets = [h.past_eof(), h.max_entry_offset()];
    let cases = pointer_cases(&src, entry_pos, "l2-", &targets);
    report.check_cases(dir.path(), &EXPORT_FAILS, &[], cases);

    // The same corruption in a backing file, read through an overlay: the
    // message must name the backing file, not the overlay.
    let base = &src;
    let overlay = dir.path().join("overlay.qcow2");
    create_overlay(&overlay, "base.qcow2", "");
    qemu_io(&overlay, &["write -P 0x77 768k 4k"]);
    let target = h.past_eof();
    Edit::be64(entry_pos, FLAG_COPIED | target).apply(base);
    report.check_inputs(
        "overlay over corrupt base",
        &overlay,
        &[],
        &EXPORT_FAILS,
        &Expect {
            paths: &[base],
            offsets: &[entry_pos, target],
            words: &[],
        },
        &[&overlay, base],
    );
    report.finish();
}

#[test]
fn l2_entry_into_header_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let src = image_with_data(dir.path(), "src.qcow2", "");
    let entry_pos = Header::read(&src).l2_table(&src, 0);
    let cases = pointer_cases(&src, entry_pos, "l2-hdr", &[512, 0x8000]);
    check_cases(dir.path(), &EXPORT_FAILS, &[], cases);
}

// ---------------------------------------------------------------------------
// Tests: compressed clusters
// ---------------------------------------------------------------------------

#[test]
fn compressed_cluster_that_does_not_inflate_fails_export() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let raw = dir.path().join("data.raw");
    let text: Vec<u8> = b"snaptree compressed cluster test line\n"
        .iter()
        .copied()
        .cycle()
        .take(4 * 65536)
        .collect();
    fs::write(&raw, &text).unwrap();
    for ctype in ["zlib", "zstd"] {
        let Some(src) = compressed_image(dir.path(), &raw, ctype) else {
            assert_ne!(ctype, "zlib", "qemu-img cannot write zlib-compressed qcow2");
            continue;
        };
        let c = first_compressed(&src);
        let len = (c.end - c.host_offset) as usize;
        let short = short_stream(ctype);
        assert!(short.len() <= len, "short stream does not fit");
        // 0xff: as raw deflate, BFINAL=1 with the reserved block type 3; as
        // zstd, a bad magic number. Never inflates.
        let garbage = vec![0xffu8; len];
        // Keep the first bytes of the real stream, scramble the rest. Whether
        // that still inflates depends on the bytes, so qemu decides: the case
        // is only checked when qemu-img itself cannot read the result.
        let scrambled: Vec<u8> = {
            let mut rng = SmallRng::seed_from_u64(0x00c0_ffee);
            let mut g = fs::read(&src).unwrap()[c.host_offset as usize..c.end as usize].to_vec();
            for byte in g.iter_mut().skip(4) {
                *byte = rng.gen();
            }
            g
        };
        let offsets = vec![c.host_offset, c.host_offset & !511, c.entry_pos];
        for (what, bytes) in [("ff", garbage), ("short", short), ("scrambled", scrambled)] {
            let case = Case {
                src: &src,
                name: format!("{ctype}-{what}.qcow2"),
                edits: vec![Edit::Bytes(c.host_offset, bytes)],
                offsets: offsets.clone(),
            };
            let img = case.make(dir.path());
            if what == "scrambled" && qemu_reads_ok(&img) {
                note(format_args!(
                    "note: {} still reads in qemu-img; case skipped",
                    case.name
                ));
                continue;
            }
            report.check_case(&case, &img, &EXPORT_FAILS, &[]);
        }
        // A compressed descriptor whose bytes lie past the end of the file.
        let h = Header::read(&src);
        let target = h.past_eof() + 1024;
        assert!(target < 1 << h.compressed_offset_bits());
        let past_eof = Case {
            src: &src,
            name: format!("{ctype}-past-eof.qcow2"),
            edits: vec![Edit::be64(c.entry_pos, FLAG_COMPRESSED | target)],
            offsets: vec![target, c.entry_pos],
        };
        report.check_cases(dir.path(), &EXPORT_FAILS, &[], [past_eof]);
    }
    report.finish();
}

// ---------------------------------------------------------------------------
// Tests: backing chains
// ---------------------------------------------------------------------------

#[test]
fn self_referencing_backing_file_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    for (file, reference) in [
        ("self.qcow2", "self.qcow2".to_string()),
        ("dot.qcow2", "./dot.qcow2".to_string()),
        (
            "abs.qcow2",
            dir.path().join("abs.qcow2").display().to_string(),
        ),
    ] {
        let img = image_with_data(dir.path(), file, "");
        rebase_unsafe(&img, &reference);
        let h = Header::read(&img);
        assert_eq!(h.backing_file_size as usize, reference.len());
        let exp = Expect {
            paths: &[&img],
            offsets: &h.backing_offsets(),
            words: CYCLE_WORDS,
        };
        report.check(file, &img, &[], &READS_FAIL, &exp);
    }
    report.finish();
}

#[test]
fn two_image_backing_cycle_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let mut report = Report::default();
    let a = image_with_data(dir.path(), "a.qcow2", "");
    let b = dir.path().join("b.qcow2");
    create_overlay(&b, "a.qcow2", "");
    qemu_io(&b, &["write -P 0x42 128k 4k"]);
    rebase_unsafe(&a, "b.qcow2");
    let mut offsets = Header::read(&a).backing_offsets().to_vec();
    offsets.push(Header::read(&b).backing_file_offset);
    let exp = Expect {
        paths: &[&a, &b],
        offsets: &offsets,
        words: CYCLE_WORDS,
    };
    report.check_inputs("a->b->a", &a, &[], &READS_FAIL, &exp, &[&a, &b]);
    report.check_inputs("b->a->b", &b, &[], &READS_FAIL, &exp, &[&a, &b]);
    report.finish();
}

/// A chain of 10,000 images is refused at the default depth cap (1024) and
/// at an explicit `--max-depth 8`, each time naming the cap; a chain within
/// the cap maps; all of it in under a minute.
#[test]
fn chain_of_10000_images_fails_fast_at_depth_cap() {
    require_qemu!();
    deep_chain::fails_fast_at_depth_cap();
}

// ---------------------------------------------------------------------------
// Tests: positive control and fuzzing
// ---------------------------------------------------------------------------

/// README ("What is supported"): dirty images are read (and repaired only by a read-write
/// mount, never by `export`). Setting the dirty bit is not bad
/// input; this keeps the refusals above honest (a tool that refuses every
/// image would pass them).
#[test]
fn dirty_bit_is_not_refused() {
    require_qemu!();
    let dir = tempdir();
    let img = image_with_data(dir.path(), "dirty.qcow2", "");
    let expected = dir.path().join("expected.raw");
    convert_to_raw(&img, &expected);
    let features = Header::read(&img).incompatible_features;
    Edit::be64(OFF_INCOMPATIBLE_FEATURES, features | 1).apply(&img);
    let state = FileState::capture(&img);
    let out_file = dir.path().join("out.raw");
    let out = snaptree(&args!["export", img, out_file]);
    state.assert_unchanged(&out);
    assert!(
        out.code == Some(0),
        "export of a dirty image failed\n{}",
        out.describe()
    );
    assert!(
        fs::read(&out_file).unwrap() == fs::read(&expected).unwrap(),
        "export of a dirty image differs from qemu-img convert"
    );
}

/// `NAME` from the environment, parsed, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Random byte flips in small valid images, most of them in metadata, never
/// make snaptree crash, hang or touch its input. `SNAPTREE_FUZZ_ITERS`
/// (default 300) and `SNAPTREE_FUZZ_SEED` steer it.
#[test]
fn random_byte_flips_never_crash() {
    require_qemu!();
    let iterations: usize = env_or("SNAPTREE_FUZZ_ITERS", 300);
    let seed: u64 = env_or("SNAPTREE_FUZZ_SEED", 0x5eed_bad1);
    const MAX_REPORTED: usize = 5;
    let dir = tempdir();
    let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad_input_fuzz");
    let found = fuzz::run(dir.path(), iterations, seed, MAX_REPORTED, &keep);
    eprintln!(
        "fuzz (seed {seed}): {} runs, {} refused with exit 1, {} crashes",
        found.runs,
        found.refused,
        found.failures.len()
    );
    assert!(
        found.failures.is_empty(),
        "{} fuzz case(s) crashed/hung (stopped after {MAX_REPORTED}):\n\n{}",
        found.failures.len(),
        found.failures.join("\n\n")
    );
}
