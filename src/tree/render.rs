//! Text the mount shows: the `tree` drawing, `status`, and each point's
//! `info.json`.

use super::{Node, PointDisk, Tree};
use crate::units::human_size;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

impl Tree {
    /// The tree drawn as text: names, sizes, chain depth, flags. Separate
    /// trees (several roots) are separated by a blank line.
    pub fn render_tree(&self) -> String {
        let nodes = self.nodes.read();
        let groups = groups(&nodes);
        let mut out = String::new();
        let mut roots: Vec<u64> = nodes
            .iter()
            .filter(|(_, n)| n.parent.is_none())
            .map(|(id, _)| *id)
            .filter(|id| is_first_disk(&nodes, &groups, *id))
            .collect();
        roots.sort_by(|a, b| nodes[a].point.name.cmp(&nodes[b].point.name));
        for (i, r) in roots.into_iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            draw(&nodes, &groups, r, &mut out);
        }
        out
    }

    /// Problems found at open or since (broken images, recovered merges).
    pub fn problems(&self) -> Vec<String> {
        self.status.lock().problems.clone()
    }

    /// What `status` shows: the tree's lines, with `between` (the merge
    /// engine's lines, which `fs` composes in) after the mode.
    pub fn render_status(&self, between: &str) -> String {
        let s = self.status.lock();
        let mut out = String::new();
        let _ = writeln!(out, "tree: {}", self.dir.display());
        let _ = writeln!(
            out,
            "mode: {}",
            if self.opts.read_only {
                "read-only"
            } else {
                "read-write"
            }
        );
        out.push_str(between);
        for (name, line) in &s.imports {
            let _ = writeln!(out, "memory import into {name:?}: {line}");
        }
        match &s.last_command {
            None => {
                let _ = writeln!(out, "last command: none");
            }
            Some((cmd, Ok(()))) => {
                let _ = writeln!(out, "last command: {}: ok", one_line(cmd));
            }
            Some((cmd, Err(e))) => {
                let _ = writeln!(
                    out,
                    "last command: {}: error: {}",
                    one_line(cmd),
                    one_line(e)
                );
            }
        }
        if s.problems.is_empty() {
            let _ = writeln!(out, "problems: none");
        } else {
            let _ = writeln!(out, "problems:");
            for p in &s.problems {
                let _ = writeln!(out, "  - {}", one_line(p));
            }
        }
        out
    }

    /// `info.json` of point `id`, with every disk of the point. The
    /// mount names the files: `disk_file` a disk's, `memory_file` the
    /// memory's.
    pub fn info_json(
        &self,
        id: u64,
        disk_file: impl Fn(&PointDisk) -> String,
        memory_file: &str,
    ) -> Option<String> {
        let v = self.view(id)?;
        let mut disks = serde_json::Map::new();
        for m in self.members(id) {
            let io = m.io.read();
            let leaf = io.chain.leaf();
            let held = leaf.allocated_bytes().ok();
            disks.insert(
                m.disk.clone().unwrap_or_else(|| "disk".into()),
                json!({
                    "file": disk_file(&m),
                    "format": leaf.format().name(),
                    "image": io.image.file_name().map(|n| n.to_string_lossy().into_owned()),
                    "virtual_size": io.chain.size(),
                    "chain_depth": io.chain.layers().len(),
                    "bytes_held": held,
                    "writable": io.writable,
                }),
            );
        }
        let kind = match (&v.point.internal, v.children.is_empty()) {
            (Some(_), _) => "internal",
            (None, true) => "leaf",
            (None, false) => "snapshot",
        };
        let mut j = json!({
            "name": v.point.name,
            "parent": v.parent,
            "children": v.children,
            "created": v.point.created,
            "kind": kind,
            "hidden": v.hidden,
            "disks": disks,
            "memory": v.point.memory.read().as_ref().map(|m| match &m.view {
                Ok(view) => {
                    let mut i = view.info.clone();
                    i["file"] = json!(memory_file);
                    i
                }
                Err(why) => json!({ "source": m.source, "error": why }),
            }),
        });
        if let Some(i) = &v.point.internal {
            j["internal"] = json!({
                "tag": i.tag,
                "id": i.id,
                "date": i.date_sec,
                "date_nsec": i.date_nsec,
                "vm_clock": i.vm_clock_nsec,
                "icount": i.icount,
                "vm_state_size": i.vm_state_size,
            });
            j["parent_from"] = json!("creation order");
        } else if v
            .parent
            .as_deref()
            .and_then(|p| self.lookup(p))
            .is_some_and(|p| p.internal.is_some())
        {
            // The current state of an image with internal snapshots.
            j["parent_from"] = json!("creation order");
        }
        if let Some(r) = self.opts.records.as_ref() {
            if let Some(p) = r.point(&v.point.name) {
                j["parent_from"] = json!(r.keeper);
                j["description"] = json!(p.description);
                if let Some((file, why)) = &p.unreadable_memory {
                    j["memory_unreadable"] = json!({ "file": file, "why": why });
                }
            }
        }
        Some(serde_json::to_string_pretty(&j).unwrap_or_default() + "\n")
    }
}

/// `text` with every control character escaped (`\n`, `\u{1b}`, ...):
/// commands, file names and messages quoted in `status` come from users
/// and directories, and a raw newline in one would forge a line of its
/// own ("problems: none").
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Whether `id` is the first disk of its point: the one the drawing shows
/// (the other disks of a point hang in parallel chains under the first
/// disks of the parent's point).
fn is_first_disk(nodes: &BTreeMap<u64, Node>, groups: &Groups, id: u64) -> bool {
    let me = &nodes[&id].point;
    !groups[me.name.as_str()]
        .iter()
        .any(|n| nodes[n].point.disk < me.disk)
}

/// The nodes of each point (one per disk), by point name: found once per
/// drawing, since scanning all nodes for each point made drawing a tree of
/// 10,000 points take seconds, on every `stat` of `tree`.
type Groups<'a> = HashMap<&'a str, Vec<u64>>;

fn groups(nodes: &BTreeMap<u64, Node>) -> Groups<'_> {
    let mut g: Groups = HashMap::new();
    for (id, n) in nodes {
        g.entry(n.point.name.as_str()).or_default().push(*id);
    }
    g
}

/// Draws the tree under `root` as `git log --graph` draws history: a
/// point's only child goes on the next line in the same column, so a
/// linear chain of any depth stays as narrow as its names; where a point
/// has several children they branch with `├──`/`└──` and indent one
/// level. A stack, not recursion: a chain may be thousands deep.
fn draw(nodes: &BTreeMap<u64, Node>, groups: &Groups, root: u64, out: &mut String) {
    let mut todo = vec![(root, String::new(), String::new())];
    while let Some((id, first, rest)) = todo.pop() {
        draw_point(nodes, groups, id, &first, out);
        let mut kids = nodes[&id].children.clone();
        kids.sort_by(|a, b| nodes[a].point.name.cmp(&nodes[b].point.name));
        if let [only] = kids[..] {
            todo.push((only, rest.clone(), rest));
            continue;
        }
        // Pushed last first, so the first child is drawn first.
        for (i, k) in kids.iter().enumerate().rev() {
            let (f, r) = if i + 1 == kids.len() {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            todo.push((*k, format!("{rest}{f}"), format!("{rest}{r}")));
        }
    }
}

/// One point's line, after `first` (the drawing left of its name).
fn draw_point(
    nodes: &BTreeMap<u64, Node>,
    groups: &Groups,
    id: u64,
    first: &str,
    out: &mut String,
) {
    let n = &nodes[&id];
    let mut flags = Vec::new();
    if n.children.is_empty() {
        flags.push("leaf");
    }
    if n.hidden {
        flags.push("hidden");
    }
    let mut disks = Vec::new();
    let mut read_only = false;
    let mut memory = None;
    for m in groups[n.point.name.as_str()].iter().map(|m| &nodes[m]) {
        memory = memory.or_else(|| match m.point.memory.read().as_ref().map(|m| &m.view) {
            Some(Ok(v)) if v.delta => {
                Some(format!("memory {} (delta)", human_size(v.chain.size())))
            }
            Some(Ok(v)) => Some(format!("memory {}", human_size(v.chain.size()))),
            Some(Err(_)) => Some("memory unreadable".to_string()),
            None => None,
        });
        let io = m.point.io.read();
        read_only |= !io.writable && m.children.is_empty();
        let what = format!(
            "{}, depth {}",
            human_size(io.chain.size()),
            io.chain.layers().len()
        );
        disks.push((m.point.disk.clone(), what));
    }
    disks.sort();
    if read_only {
        flags.push("read-only");
    }
    let mut detail = match disks.as_slice() {
        [(None, what)] => what.clone(),
        _ => disks
            .iter()
            .map(|(d, what)| format!("{}: {what}", d.as_deref().unwrap_or("disk")))
            .collect::<Vec<_>>()
            .join("; "),
    };
    if let Some(m) = memory {
        detail.push_str("; ");
        detail.push_str(&m);
    }
    let _ = writeln!(
        out,
        "{first}{}  ({detail}){}",
        n.point.name,
        if flags.is_empty() {
            String::new()
        } else {
            format!(" [{}]", flags.join(", "))
        }
    );
}
