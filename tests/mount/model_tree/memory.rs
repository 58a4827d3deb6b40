//! The memory side of the model test: random memory checkpoints (page
//! deltas and dumps attached in place) and the checks that every visible
//! point's `memory.raw`, `info.json` and the files of `.snaptree-memory`
//! match the model.

use super::*;

/// Where the tree keeps page-delta checkpoints.
pub(super) const MEMORY_DIR: &str = ".snaptree-memory";
/// One guest page: the cluster size of a delta.
pub(super) const PAGE: usize = 4096;

/// Every visible point's `memory.raw` (present exactly when the model
/// has a memory for it, with its bytes) and `info.json` memory object,
/// and the files of `.snaptree-memory`: no delta leaked, none lost.
pub(super) fn assert_memory_matches(ws: &Workspace, mnt: &Path, model: &ModelTree, step: &str) {
    for name in model.visible() {
        let path = mnt.join(&name).join("memory.raw");
        let i = info(mnt, &name);
        let Some(m) = &model.points[&name].memory else {
            assert!(!path.exists(), "{step}: {name}/memory.raw exists: {i}");
            assert!(i["memory"].is_null(), "{step}: {name}/info.json: {i}");
            continue;
        };
        assert_bytes_eq(
            &format!("{step}: {name}/memory.raw ({})", m.source),
            &read_disk(&path),
            &m.ram,
        );
        let mi = &i["memory"];
        assert_eq!(mi["source"], m.source, "{step}: {name}/info.json memory");
        assert_eq!(mi["size"], m.ram.len(), "{step}: {name}/info.json memory");
        match &m.delta {
            Some(d) => {
                assert_eq!(
                    mi["kind"], "page-delta checkpoint (qcow2)",
                    "{step}: {name}/info.json memory"
                );
                assert_eq!(
                    mi["chain_depth"],
                    model.delta_chain(d).len(),
                    "{step}: {name}/info.json memory chain_depth (deltas {:?})",
                    model.delta_chain(d)
                );
                assert_eq!(
                    mi["delta_parent"].as_str(),
                    model.deltas[d].as_deref(),
                    "{step}: {name}/info.json memory delta_parent"
                );
            }
            None => assert_eq!(mi["kind"], "raw dump", "{step}: {name}/info.json memory"),
        }
    }
    assert_eq!(
        memory_dir_files(ws),
        model.memory_files(),
        "{step}: files in {MEMORY_DIR} (the deltas points name, and what they back onto)"
    );
}

/// `qemu-img check` of every delta in `.snaptree-memory` is clean.
pub(super) fn check_memory_deltas(ws: &Workspace, model: &ModelTree) {
    for f in model.memory_files() {
        ws.check(&format!("{MEMORY_DIR}/{f}"));
    }
}

/// Fresh RAM of 64..=256 pages: random, a fifth of the pages zero, and
/// sometimes a run of zero pages.
pub(super) fn fresh_ram(rng: &mut SmallRng) -> Vec<u8> {
    let pages = rng.gen_range(64..=256usize);
    let mut ram = pattern(rng.gen(), pages * PAGE);
    for p in 0..pages {
        if rng.gen_bool(0.2) {
            ram[p * PAGE..(p + 1) * PAGE].fill(0);
        }
    }
    if rng.gen_bool(0.3) {
        let a = rng.gen_range(0..pages);
        let b = rng.gen_range(a..=pages.min(a + 32));
        ram[a * PAGE..b * PAGE].fill(0);
    }
    ram
}

/// The guest a little later than `parent`: a few pages rewritten,
/// touched, zeroed or filled, and sometimes more or less RAM (added RAM
/// is half zero pages: a delta then holds none there, and reads past the
/// end of the smaller parent's, as zeros).
pub(super) fn derived_ram(rng: &mut SmallRng, parent: &[u8]) -> Vec<u8> {
    let mut ram = parent.to_vec();
    if rng.gen_bool(0.25) {
        let old = ram.len();
        ram.resize(rng.gen_range(64..=256usize) * PAGE, 0);
        for p in old / PAGE..ram.len() / PAGE {
            if rng.gen_bool(0.5) {
                ram[p * PAGE..(p + 1) * PAGE].copy_from_slice(&pattern(rng.gen(), PAGE));
            }
        }
    }
    let pages = ram.len() / PAGE;
    for _ in 0..rng.gen_range(1..=8) {
        let p = rng.gen_range(0..pages);
        let page = &mut ram[p * PAGE..(p + 1) * PAGE];
        match rng.gen_range(0..4) {
            0 => page.copy_from_slice(&pattern(rng.gen(), PAGE)),
            1 => page[rng.gen_range(0..PAGE)] ^= rng.gen_range(1..=255u8),
            2 => page.fill(0),
            _ => page.fill(rng.gen_range(1..=255u8)),
        }
    }
    ram
}

/// Writes `ram` as raw dump number `n` in the tree directory (the mount
/// shows no memory from outside it), sometimes sparse (zero pages as
/// holes). Returns the name, as `ctl` takes it and as `info.json` shows
/// it once attached.
pub(super) fn write_dump(ws: &Workspace, rng: &mut SmallRng, n: usize, ram: &[u8]) -> String {
    let file = format!("ram-{n}.vmem");
    let path = ws.img(&file);
    if rng.gen_bool(0.5) {
        let f = File::create(&path).expect("create dump");
        f.set_len(ram.len() as u64).expect("size dump");
        for (k, page) in ram.chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                f.write_all_at(page, (k * PAGE) as u64).expect("write dump");
            }
        }
    } else {
        std::fs::write(&path, ram).expect("write dump");
    }
    file
}

/// One random memory operation on the mount and the model, if one
/// applies: `checkpoint` of a point without memory (RAM derived from the
/// parent's, whose delta the new one backs onto), a refused second
/// `checkpoint`, `memory none`, or `memory DUMP` (a raw dump in place).
pub(super) fn memory_step(
    ws: &Workspace,
    mnt: &Path,
    model: &mut ModelTree,
    rng: &mut SmallRng,
    dumps: &mut usize,
    step: u64,
) -> Option<String> {
    let vis: Vec<String> = model.visible().into_iter().collect();
    let (with, without): (Vec<String>, Vec<String>) = vis
        .iter()
        .cloned()
        .partition(|n| model.points[n].memory.is_some());
    let parent_ram = |model: &ModelTree, p: &str| {
        let pp = model.points[p].parent.as_ref()?;
        Some(model.points[pp].memory.as_ref()?.ram.clone())
    };
    let what = match rng.gen_range(0..100) {
        0..=69 if !without.is_empty() => {
            // Mostly a point whose parent has memory: chains of deltas.
            let on_parent: Vec<&String> = without
                .iter()
                .filter(|n| parent_ram(model, n).is_some())
                .collect();
            let p = match on_parent.is_empty() || rng.gen_bool(0.3) {
                true => without[rng.gen_range(0..without.len())].clone(),
                false => on_parent[rng.gen_range(0..on_parent.len())].clone(),
            };
            let ram = match parent_ram(model, &p) {
                Some(r) => derived_ram(rng, &r),
                None => fresh_ram(rng),
            };
            *dumps += 1;
            let src = write_dump(ws, rng, *dumps, &ram);
            let base = model.delta_base(&p);
            let file = model.new_delta_name(&p);
            ctl_ok(mnt, &p, &format!("checkpoint {src}"));
            let what = format!(
                "checkpoint {p} ({} pages) into {file} on {base:?}",
                ram.len() / PAGE
            );
            model.deltas.insert(file.clone(), base);
            model.points.get_mut(&p).expect("point").memory = Some(ModelMemory {
                ram,
                source: format!("{MEMORY_DIR}/{file}"),
                delta: Some(file),
            });
            what
        }
        70..=77 if !with.is_empty() => {
            let p = with[rng.gen_range(0..with.len())].clone();
            *dumps += 1;
            let ram = fresh_ram(rng);
            let src = write_dump(ws, rng, *dumps, &ram);
            assert_errno(
                &format!("step {step}: a second checkpoint of {p}"),
                ctl(mnt, &p, &format!("checkpoint {src}")),
                libc::EEXIST,
            );
            format!("second checkpoint of {p} refused")
        }
        78..=89 if !with.is_empty() => {
            let p = with[rng.gen_range(0..with.len())].clone();
            ctl_ok(mnt, &p, "memory none");
            model.points.get_mut(&p).expect("point").memory = None;
            model.prune_deltas();
            format!("memory none on {p}")
        }
        90..=99 if !vis.is_empty() => {
            let p = vis[rng.gen_range(0..vis.len())].clone();
            let ram = match parent_ram(model, &p) {
                Some(r) if rng.gen_bool(0.7) => derived_ram(rng, &r),
                _ => fresh_ram(rng),
            };
            *dumps += 1;
            let src = write_dump(ws, rng, *dumps, &ram);
            ctl_ok(mnt, &p, &format!("memory {src}"));
            model.points.get_mut(&p).expect("point").memory = Some(ModelMemory {
                ram,
                source: src.clone(),
                delta: None,
            });
            model.prune_deltas();
            format!("memory {src} on {p}")
        }
        _ => return None,
    };
    Some(what)
}
