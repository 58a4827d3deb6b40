//! Which points have their guest view open: a bounded LRU of
//! [`PointGuest`]s, opened on first access to a point's `fs/`,
//! `volumes/` or `files`, closed when evicted or idle, and rebuilt when a
//! leaf's disk was written (checked at most once a second, at lookup and
//! opendir). Files already open keep the view they were opened from.
//!
//! Guest inode numbers are mapped to the mount's without a per-inode
//! table: each (point, volume) pair gets a small "slot" number for the
//! life of the mount, and a guest inode `g` of slot `s` is
//! `inodes::guest(s, g)`. The slot table grows by one entry per volume
//! ever browsed.

use super::bytes::ChainBytes;
use crate::chain::Chain;
use crate::guest::point::PointGuest;
use crate::guest::ReadBytes;
use crate::tree::Tree;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Guest views kept open at once. Each holds parsed metadata caches of
/// its filesystems (bounded by the readers), so the count bounds memory.
const MAX_OPEN: usize = 16;
/// A view nobody used for this long is closed at the next access.
const IDLE: Duration = Duration::from_secs(300);
/// How often a leaf's view is checked against its disk.
const RECHECK: Duration = Duration::from_secs(1);

/// One opened view and what it was built from.
pub(crate) struct Opened {
    pub guest: PointGuest,
    /// The chain and write count of each disk when the view was built.
    built_from: Vec<(Arc<Chain>, u64)>,
    checked: Mutex<Instant>,
    used: Mutex<Instant>,
    /// Whether any disk of the point can change (a writable leaf).
    pub changes: bool,
}

pub(crate) struct GuestViews {
    open: Mutex<lru::LruCache<u64, Arc<Opened>>>,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    by_key: HashMap<(u64, String), u64>,
    keys: Vec<(u64, String)>,
}

impl GuestViews {
    pub fn new() -> GuestViews {
        GuestViews {
            open: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(MAX_OPEN).unwrap_or(NonZeroUsize::MIN),
            )),
            slots: Mutex::new(Slots::default()),
        }
    }

    /// The guest view of visible point `p`, opened or rebuilt if needed.
    /// `recheck`: look whether a leaf's disk changed (lookup, opendir).
    pub fn get(&self, tree: &Tree, p: u64, recheck: bool) -> Option<Arc<Opened>> {
        let now = Instant::now();
        let cached = {
            let mut open = self.open.lock();
            // Close what sat idle (the least recently used come first).
            while let Some((_, o)) = open.peek_lru() {
                if now.duration_since(*o.used.lock()) < IDLE {
                    break;
                }
                open.pop_lru();
            }
            open.get(&p).cloned()
        };
        if let Some(o) = cached {
            // A leaf's disk may have been written; any point's chain may
            // have been replaced by a merge (same bytes, other files).
            if !(recheck && o.stale(tree, p, now)) {
                *o.used.lock() = now;
                return Some(o);
            }
        }
        let o = Arc::new(Self::build(tree, p)?);
        self.open.lock().put(p, o.clone());
        Some(o)
    }

    /// Scans point `p`'s disks as they are now.
    fn build(tree: &Tree, p: u64) -> Option<Opened> {
        let members = tree.members(p);
        if members.is_empty() {
            return None;
        }
        let several = members.len() > 1;
        let mut disks: Vec<(String, Arc<dyn ReadBytes>)> = Vec::new();
        let mut built_from = Vec::new();
        let mut changes = false;
        for m in &members {
            let io = m.io.read();
            changes |= io.writable;
            let name = if several {
                m.disk.clone().unwrap_or_else(|| "disk".into())
            } else {
                "disk".into()
            };
            disks.push((name, Arc::new(ChainBytes::new(io.chain.clone()))));
            built_from.push((io.chain.clone(), io.chain.generation()));
        }
        let now = Instant::now();
        Some(Opened {
            guest: PointGuest::scan(disks),
            built_from,
            checked: Mutex::new(now),
            used: Mutex::new(now),
            changes,
        })
    }

    /// The slot of volume `volume` of point `p`, made if new; `None` once
    /// every slot the inode numbers have room for is taken (a guest that
    /// keeps renaming its volumes could get there in days).
    pub fn slot(&self, p: u64, volume: &str) -> Option<u64> {
        let mut s = self.slots.lock();
        let key = (p, volume.to_string());
        if let Some(&n) = s.by_key.get(&key) {
            return Some(n);
        }
        let n = s.keys.len() as u64;
        if n >= super::super::inodes::MAX_SLOTS {
            return None;
        }
        s.keys.push(key.clone());
        s.by_key.insert(key, n);
        Some(n)
    }

    /// Lines for `status` about the views open now: how much damage, how
    /// many volumes that did not open, how many reader notes (a journal
    /// replayed in memory), pointing to each point's `index.json`.
    pub fn status_lines(&self, tree: &Tree) -> String {
        use std::fmt::Write;
        let open: Vec<(u64, Arc<Opened>)> = self
            .open
            .lock()
            .iter()
            .map(|(p, o)| (*p, o.clone()))
            .collect();
        let mut out = String::new();
        for (p, o) in open {
            let Some(v) = tree.view(p) else { continue };
            let name = crate::tree::one_line(&v.point.name).into_owned();
            if let Some(line) = o.guest.status_line() {
                let _ = writeln!(out, "guest files of {name}: {line}");
            }
        }
        out
    }

    /// The point and volume name of slot `n`.
    pub fn slot_key(&self, n: u64) -> Option<(u64, String)> {
        self.slots.lock().keys.get(n as usize).cloned()
    }
}

impl Opened {
    /// Whether a disk was written or its chain replaced since the view was
    /// built; looked at no more than once per [`RECHECK`].
    fn stale(&self, tree: &Tree, p: u64, now: Instant) -> bool {
        {
            let mut checked = self.checked.lock();
            if now.duration_since(*checked) < RECHECK {
                return false;
            }
            *checked = now;
        }
        let members = tree.members(p);
        members.len() != self.built_from.len()
            || members.iter().zip(&self.built_from).any(|(m, (c, g))| {
                let io = m.io.read();
                !Arc::ptr_eq(&io.chain, c) || io.chain.generation() != *g
            })
    }
}
