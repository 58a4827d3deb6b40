//! The differential check: one image read by snaptree and by qemu, every
//! disagreement reported at once.
//!
//! Why one function does all of it: a test that builds a chain wants a
//! single verdict per layer, and a failure message that lets the next
//! engineer reproduce it without rerunning the test. So every check runs
//! even after one fails, and the panic message carries the failures of
//! every layer, the chain's construction script and `qemu-img info` of the
//! leaf ([`assert_layers_match_qemu`]).

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::bytes::{diff_files, DiffReport};
use super::chain::{Chain, Layer};
use super::map::{diff_extents, extents, format_mismatches, parse_map, qemu_layer_map, MapEntry};
use super::run::{qemu_img, qemu_img_cmd, snaptree_cmd, try_run};
use super::unwritten::fill_unwritten_extents;
use super::MIB;

/// What [`assert_matches_qemu`] checks besides the raw export and the map.
#[derive(Clone, Copy, Debug)]
pub struct CheckOptions {
    /// Also `snaptree export --format qcow2` and judge the result with
    /// `qemu-img check` and `qemu-img compare`.
    pub qcow2_export: bool,
    /// Also verify the host `offset`s snaptree's map reports
    /// ([`check_map_offsets`]).
    pub map_offsets: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            qcow2_export: true,
            map_offsets: true,
        }
    }
}

/// The differential check of layer `idx` (base first) of `chain` against
/// qemu, with every problem collected into one panic message:
///
/// 1. `snaptree export IMAGE OUT` is byte-identical to
///    `qemu-img convert -O raw IMAGE`;
/// 2. `snaptree map IMAGE --output json` is well-formed, covers the virtual
///    size, and agrees with `qemu-img map --output=json` on depth, present,
///    zero and data for every byte (entry splitting may differ); its data
///    `offset`s point at the right bytes (see [`check_map_offsets`]);
/// 3. `snaptree export --format qcow2` gives an image without backing file,
///    of the same virtual size, that `qemu-img check` finds clean and
///    `qemu-img compare` finds equal to IMAGE.
///
/// First the layer files' unwritten extents are filled with zeros
/// ([`fill_unwritten_extents`] says why). Output files are written into the
/// chain directory as `check-*`.
pub fn assert_matches_qemu(chain: &Chain, idx: usize, opts: CheckOptions) {
    assert_layers_match_qemu(chain, &[idx], opts);
}

/// [`assert_matches_qemu`] for several layers (base-first indices), all
/// checked before one panic reports every failing layer: seeing which layers
/// fail and which pass localises a bug.
pub fn assert_layers_match_qemu(chain: &Chain, idxs: &[usize], opts: CheckOptions) {
    let mut report = String::new();
    let mut failing = Vec::new();
    for &idx in idxs {
        let failures = differential_failures(chain, idx, opts);
        if !failures.is_empty() {
            let layer = &chain.layers()[idx];
            let _ = write!(
                report,
                "\n=== {} (layer {idx} of {}, base first; virtual size {}) ===\n{}\n",
                layer.name,
                chain.layers().len(),
                chain.virtual_size(idx),
                failures.join("\n\n")
            );
            failing.push(layer.name.as_str());
        }
    }
    if !report.is_empty() {
        panic!(
            "snaptree disagrees with qemu on {failing:?} (checked: {} layer(s))\n\
             chain directory: {} (set SNAPTREE_KEEP_TEST_DIRS=1 to keep it)\n\
             --- how the chain was built (run in that directory) ---\n{}\n\
             --- qemu-img info --backing-chain of the leaf ---\n{}\n\
             --- failures ---{report}",
            idxs.len(),
            chain.dir().display(),
            chain.script(),
            chain.describe(chain.leaf_index()),
        );
    }
}

/// Runs the checks of [`assert_matches_qemu`] on one layer and returns what
/// failed (empty = snaptree agrees with qemu). Panics only on setup errors
/// (qemu itself failing).
pub fn differential_failures(chain: &Chain, idx: usize, opts: CheckOptions) -> Vec<String> {
    let layer = &chain.layers()[idx];
    let size = chain.virtual_size(idx);
    for below in &chain.layers()[..=idx] {
        fill_unwritten_extents(&below.path);
    }
    let check = LayerCheck {
        chain,
        idx,
        layer,
        size,
        tag: format!("check-{}", layer.name.replace('.', "_")),
    };
    let mut failures = Vec::new();
    let expected_raw = check.raw_export(&mut failures);
    check.map(&expected_raw, opts, &mut failures);
    if opts.qcow2_export {
        check.qcow2_export(&mut failures);
    }
    failures
}

/// One layer under [`differential_failures`]; its output files are named
/// `<tag>.*` in the chain directory.
struct LayerCheck<'a> {
    chain: &'a Chain,
    idx: usize,
    layer: &'a Layer,
    size: u64,
    tag: String,
}

impl LayerCheck<'_> {
    fn dir(&self) -> &Path {
        self.chain.dir()
    }

    /// Check 1: `snaptree export` against `qemu-img convert -O raw`.
    /// Returns the path of qemu's flattened disk, which the map check reads.
    fn raw_export(&self, failures: &mut Vec<String>) -> PathBuf {
        let (dir, layer) = (self.dir(), self.layer);
        let expected_raw = dir.join(format!("{}.qemu.raw", self.tag));
        qemu_img(
            dir,
            args![
                "convert",
                "-q",
                "-f",
                layer.format.as_str(),
                "-O",
                "raw",
                layer.path,
                expected_raw
            ],
        );
        let expected_len = std::fs::metadata(&expected_raw)
            .map(|m| m.len())
            .unwrap_or_else(|e| panic!("stat {}: {e}", expected_raw.display()));
        assert_eq!(
            expected_len, self.size,
            "qemu-img convert output size != virtual size"
        );
        let got_raw = dir.join(format!("{}.snaptree.raw", self.tag));
        match try_run(&mut snaptree_cmd(args!["export", layer.path, got_raw])) {
            Err(e) => failures.push(format!("snaptree export failed:\n{e}")),
            Ok(_) => match diff_files(&expected_raw, &got_raw) {
                Err(e) => failures.push(format!(
                    "snaptree export exited 0 but its output cannot be compared: {e}"
                )),
                Ok(Some(diff)) => failures.push(format!(
                    "`snaptree export` differs from `qemu-img convert -O raw`:\n{diff}"
                )),
                Ok(None) => {}
            },
        }
        expected_raw
    }

    /// Check 2: `snaptree map` against `qemu-img map`, and snaptree's data
    /// offsets against the layer files (qemu's offsets first, to prove the
    /// offset check itself right).
    fn map(&self, expected_raw: &Path, opts: CheckOptions, failures: &mut Vec<String>) {
        let (dir, layer, size) = (self.dir(), self.layer, self.size);
        let (qemu_json, qemu_entries) = qemu_layer_map(dir, layer);
        let _ = std::fs::write(dir.join(format!("{}.qemu.map.json", self.tag)), qemu_json);
        let qemu_extents = extents(&qemu_entries, size)
            .unwrap_or_else(|e| panic!("unexpected qemu-img map output: {e}"));
        if let Err(e) = check_map_offsets(self.chain, self.idx, &qemu_entries, expected_raw) {
            // A failure here is a bug in this helper, not in snaptree.
            panic!("test helper disagrees with qemu-img map offsets:\n{e}");
        }
        let mut map = snaptree_cmd(args!["map", layer.path, "--output", "json"]);
        let out = match try_run(&mut map) {
            Ok(out) => out,
            Err(e) => {
                failures.push(format!("snaptree map failed:\n{e}"));
                return;
            }
        };
        let _ = std::fs::write(
            dir.join(format!("{}.snaptree.map.json", self.tag)),
            &out.stdout,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let parsed = parse_map(&text).and_then(|entries| {
            let ext = extents(&entries, size)?;
            Ok((entries, ext))
        });
        let (entries, ext) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                failures.push(format!(
                    "snaptree map output is not a valid map of the whole disk: {e}"
                ));
                return;
            }
        };
        let mismatches = diff_extents(&qemu_extents, &ext);
        if !mismatches.is_empty() {
            failures.push(format!(
                "`snaptree map` disagrees with `qemu-img map` (expected = qemu):\n{}",
                format_mismatches(&mismatches)
            ));
        }
        if opts.map_offsets {
            if let Err(e) = check_map_offsets(self.chain, self.idx, &entries, expected_raw) {
                failures.push(format!("`snaptree map` offsets are wrong:\n{e}"));
            }
        }
    }

    /// Check 3: `snaptree export --format qcow2`, judged by qemu-img.
    fn qcow2_export(&self, failures: &mut Vec<String>) {
        let got_qcow2 = self.dir().join(format!("{}.snaptree.qcow2", self.tag));
        let mut export = snaptree_cmd(args![
            "export",
            self.layer.path,
            got_qcow2,
            "--format",
            "qcow2"
        ]);
        match try_run(&mut export) {
            Err(e) => failures.push(format!("snaptree export --format qcow2 failed:\n{e}")),
            Ok(_) => failures.extend(judge_qcow2_export(
                self.dir(),
                &got_qcow2,
                self.layer,
                self.size,
            )),
        }
    }
}

/// Judges a qcow2 file snaptree exported from `source`: `qemu-img check`
/// clean, no backing file, same virtual size, `qemu-img compare` equal.
/// Returns the failures found.
pub fn judge_qcow2_export(dir: &Path, exported: &Path, source: &Layer, size: u64) -> Vec<String> {
    let mut failures = Vec::new();
    let mut check = qemu_img_cmd(dir, args!["check", "-f", "qcow2", exported]);
    if let Err(e) = try_run(&mut check) {
        failures.push(format!(
            "`qemu-img check` of the qcow2 export is not clean:\n{e}"
        ));
        return failures;
    }
    let mut info = qemu_img_cmd(dir, args!["info", "--output=json", "-f", "qcow2", exported]);
    match try_run(&mut info).map(|o| serde_json::from_slice::<Value>(&o.stdout)) {
        Err(e) => failures.push(format!("qemu-img info of the qcow2 export failed:\n{e}")),
        Ok(Err(e)) => failures.push(format!("qemu-img info output is not JSON: {e}")),
        Ok(Ok(v)) => {
            if v["virtual-size"].as_u64() != Some(size) {
                failures.push(format!(
                    "qcow2 export has virtual-size {}, expected {size}",
                    v["virtual-size"]
                ));
            }
            if let Some(b) = v.get("backing-filename") {
                failures.push(format!(
                    "qcow2 export is not flattened: it has backing file {b}"
                ));
            }
        }
    }
    let mut compare = qemu_img_cmd(
        dir,
        args![
            "compare",
            "-f",
            "qcow2",
            "-F",
            source.format.as_str(),
            exported,
            source.path
        ],
    );
    if let Err(e) = try_run(&mut compare) {
        failures.push(format!(
            "`qemu-img compare` says the qcow2 export differs from {}:\n{e}",
            source.name
        ));
    }
    failures
}

/// Checks the host offsets of a map of image `top` (base-first index in
/// `chain`): for every entry with `data` and an `offset`, not `zero` and not
/// `compressed`, the bytes at that offset of the layer file at `depth` must
/// equal the flattened disk (the file `flat`, e.g. `qemu-img convert -O raw`
/// output) at the entry's guest range.
pub fn check_map_offsets(
    chain: &Chain,
    top: usize,
    entries: &[MapEntry],
    flat: &Path,
) -> Result<(), String> {
    let flat_file = File::open(flat).map_err(|e| format!("open {}: {e}", flat.display()))?;
    let mut errors = Vec::new();
    for e in entries {
        let Some(offset) = e.offset else { continue };
        if !e.data || e.zero || e.compressed {
            continue;
        }
        let Some(layer) = chain.layer_at_depth(top, e.depth) else {
            errors.push(format!("depth {} is below the base: {e:?}", e.depth));
            continue;
        };
        let layer_file = File::open(&layer.path)
            .map_err(|err| format!("open {}: {err}", layer.path.display()))?;
        let mut report = DiffReport::default();
        const PIECE: u64 = 4 * MIB;
        let (mut want, mut have) = (Vec::new(), Vec::new());
        let mut done = 0;
        while done < e.length {
            let n = (e.length - done).min(PIECE) as usize;
            want.resize(n, 0);
            have.resize(n, 0);
            if let Err(err) = flat_file.read_exact_at(&mut want, e.start + done) {
                errors.push(format!("entry beyond the flattened disk ({err}): {e:?}"));
                break;
            }
            if let Err(err) = layer_file.read_exact_at(&mut have, offset + done) {
                errors.push(format!(
                    "cannot read {n} bytes at offset {} of {}: {err} (entry {e:?})",
                    offset + done,
                    layer.name
                ));
                break;
            }
            report.compare(e.start + done, &want, &have);
            done += n as u64;
        }
        if let Some(diff) = report.render(e.length, e.length) {
            errors.push(format!(
                "entry {e:?}: the bytes at offset {offset} of {} are not the disk's bytes \
                 (ranges below are guest offsets):\n{diff}",
                layer.name
            ));
        }
        if errors.len() >= 5 {
            errors.push("...".into());
            break;
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}
