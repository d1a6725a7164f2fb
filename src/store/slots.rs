//! The store's slots, one per directory entry in the directory's order, with an index by
//! name so that finding a bitmap costs a hash lookup, not a comparison with every entry (a
//! directory may hold 65,535 entries, and `dbm info` or a directory commit looks each of
//! them up).
//!
//! Names are unique in a store's list: the directory codec refuses a repeated name
//! (`decode_directory`) and an add refuses a name that exists. The list is replaced whole
//! whenever its entries are added or removed (a directory commit, an open, a repair), and
//! the index is built with it. A slot's fields may change in place through the slice
//! this derefs to (flags, `in_use`, the kept table); its name does not, but a lookup does
//! not rest on that: an index hit is checked against the slot's name, and a miss is
//! answered by a scan.

use crate::bitmap::DirtyBitmap;
use crate::format::{DirEntry, TableEntry};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

#[derive(Debug)]
pub(super) struct Slot {
    /// The entry as it is on disk.
    pub(super) entry: DirEntry,
    pub(super) inconsistent: bool,
    /// Found in an untrusted (stale) directory: its clusters are never freed, since a
    /// repair tool may have given them to other data.
    pub(super) stale: bool,
    /// The authoritative bitmap while the store is active.
    pub(super) mem: Option<Arc<DirtyBitmap>>,
    /// The in-memory bitmap kept across an incremental `BitmapStore::inactivate`, so that
    /// a later `BitmapStore::activate` resumes it instead of reloading the disk. It stays
    /// authoritative: every region where it differs from the disk is in its change map.
    pub(super) parked: Option<Arc<DirtyBitmap>>,
    /// The bitmap's table as it is on disk at `entry.table_offset`, kept while the store is
    /// active so that a flush (and the stop) does not read it again: only the flush engine
    /// writes a table in place, and `BitmapStore::keep_tables` stores what it wrote.
    /// `None` when unknown; dropped whenever the entry moves to another table and when the
    /// store goes inactive (another process may then rewrite the image).
    pub(super) table: Option<Vec<TableEntry>>,
}

impl Slot {
    /// Replaces the entry as on disk; the kept table goes unless the entry still names the
    /// same table (a flags-only change).
    pub(super) fn set_entry(&mut self, e: DirEntry) {
        if e.table_offset != self.entry.table_offset || e.table_size != self.entry.table_size {
            self.table = None;
        }
        self.entry = e;
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct Slots {
    list: Vec<Slot>,
    /// Each name's first position in `list`, under the name's hash (no copy of the names:
    /// a directory's names may take 64 MiB).
    index: HashMap<u64, Vec<usize>>,
}

impl From<Vec<Slot>> for Slots {
    fn from(list: Vec<Slot>) -> Self {
        let mut index: HashMap<u64, Vec<usize>> = HashMap::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            let at = index.entry(hash(s.entry.name.as_bytes())).or_default();
            if !at.iter().any(|&j| list[j].entry.name == s.entry.name) {
                at.push(i);
            }
        }
        Self { list, index }
    }
}

impl FromIterator<Slot> for Slots {
    fn from_iter<I: IntoIterator<Item = Slot>>(iter: I) -> Self {
        Vec::from_iter(iter).into()
    }
}

fn hash(name: &[u8]) -> u64 {
    use std::hash::Hasher;
    // A fixed key: the index lives with one store, and its hashes never leave it.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(name);
    h.finish()
}

impl Slots {
    /// The position of the slot named `name`, compared byte for byte: the first one, as a
    /// scan from the start finds it.
    pub(super) fn position(&self, name: &[u8]) -> Option<usize> {
        let named = |i: usize| self.list[i].entry.name.as_bytes() == name;
        if let Some(&i) = self
            .index
            .get(&hash(name))
            .and_then(|at| at.iter().find(|&&i| i < self.list.len() && named(i)))
        {
            // Names are unique (see the module docs), so this is the only one.
            return Some(i);
        }
        (0..self.list.len()).find(|&i| named(i))
    }

    /// The slot of a non-stale bitmap named `name`, for changes.
    pub(super) fn live_mut(&mut self, name: &[u8]) -> Option<&mut Slot> {
        let i = self.position(name)?;
        let s = &mut self.list[i];
        (!s.stale).then_some(s)
    }
}

impl Deref for Slots {
    type Target = [Slot];
    fn deref(&self) -> &[Slot] {
        &self.list
    }
}

impl DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [Slot] {
        &mut self.list
    }
}

impl<'a> IntoIterator for &'a Slots {
    type Item = &'a Slot;
    type IntoIter = std::slice::Iter<'a, Slot>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

impl<'a> IntoIterator for &'a mut Slots {
    type Item = &'a mut Slot;
    type IntoIter = std::slice::IterMut<'a, Slot>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BitmapName, DirEntry};

    fn slot(name: &str) -> Slot {
        Slot {
            entry: DirEntry {
                name: BitmapName::from(name),
                table_offset: 65536,
                table_size: 1,
                granularity_bits: 16,
                in_use: false,
                auto: true,
            },
            inconsistent: false,
            stale: false,
            mem: None,
            parked: None,
            table: None,
        }
    }

    #[test]
    fn finds_every_name_and_only_those() {
        let names: Vec<String> = (0..1000).map(|i| format!("b{i:05}")).collect();
        let slots: Slots = names.iter().map(|n| slot(n)).collect();
        for (i, n) in names.iter().enumerate() {
            assert_eq!(slots.position(n.as_bytes()), Some(i), "{n}");
        }
        assert_eq!(slots.position(b"b01000"), None);
        assert_eq!(slots.position(b""), None);
    }

    #[test]
    fn a_repeated_name_answers_its_first_place_as_a_scan_does() {
        let slots: Slots = ["a", "b", "a"].into_iter().map(slot).collect();
        assert_eq!(slots.position(b"a"), Some(0));
    }

    #[test]
    fn a_name_changed_in_place_is_still_found_and_the_old_one_is_not() {
        let mut slots: Slots = ["a", "b", "c"].into_iter().map(slot).collect();
        slots[1].entry.name = BitmapName::from(&b"z"[..]);
        assert_eq!(slots.position(b"z"), Some(1));
        assert_eq!(slots.position(b"b"), None);
        slots[1].stale = true;
        assert!(slots.live_mut(b"z").is_none());
        assert!(slots.live_mut(b"c").is_some());
    }
}
