//! The editing operations of [`BitmapStore`]: add, remove, store, clear, enable or disable,
//! merge. On an inactive store each one is a [`preflight`](BitmapStore::preflight) and a
//! copy-on-write [`commit`](BitmapStore::commit) (`src/store/commit.rs`); on an active one
//! the in-memory bitmap is authoritative, so most of them change only memory, which the next
//! flush or inactivation writes.

use std::sync::Arc;

use super::{ceil_clusters, BitmapStore, Recording, ACTIVE_MEMORY_LIMIT};
use crate::bitmap::DirtyBitmap;
use crate::error::{invalid_input, Error, Result, StateProblem};
use crate::flush::{self, FlushStats};
use crate::format::directory::{MAX_GRANULARITY_BITS, MAX_NAME_SIZE, MIN_GRANULARITY_BITS};
use crate::format::extension::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE};
use crate::format::{table_size, BitmapName, DirEntry, TableEntry};
use crate::storage::Storage;

impl<S: Storage> BitmapStore<S> {
    /// Adds an empty bitmap. `granularity` is a power of two from 512 B to 2 GiB;
    /// `recording` sets the `auto` flag. On an active store the bitmap is also created in
    /// memory and written with `in_use` set. On a store active in durable mode it is written
    /// without `in_use`, with every data cluster allocated before the directory names it,
    /// and every [`DurableTracker`](super::durable::DurableTracker) marks it from the next
    /// intent on; recording, it also takes every write registered in flight
    /// ([`begin_write`](super::durable::DurableTracker::begin_write)), on disk, before the
    /// call returns (a write whose plain `mark` returned before the call must have completed
    /// before it).
    ///
    /// On an image whose bitmaps extension is untrusted
    /// ([`Image::stale_bitmaps`](crate::image::Image::stale_bitmaps): written by a program
    /// without bitmap support, QEMU ignores its bitmaps) the new directory holds this bitmap
    /// alone: the untrusted one goes, as QEMU drops it at its first header write, with every
    /// bitmap it listed (their clusters are never freed). [`checkpoint`](Self::checkpoint)
    /// refuses such an image instead.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a name that is empty, longer than 1023 bytes or holds a
    /// NUL, a bad granularity, a 0-byte disk, a bitmap above 512 MiB, the 65535-bitmap or
    /// the directory size limit; [`Error::Exists`] for a name that is taken (as QEMU reads
    /// names, up to a NUL: beside a foreign `a\0x`, `a` is taken);
    /// [`Error::Unsupported`] on a v2 image, and while the bitmaps are held in memory
    /// (active, or parked by an inactivation) when this one beside them would pass
    /// [`ACTIVE_MEMORY_LIMIT`]; [`Error::ReadOnly`]; I/O.
    pub fn add(&mut self, name: &str, granularity: u64, recording: Recording) -> Result<()> {
        self.add_disabling(name, granularity, recording, None)
    }

    /// [`add`](Self::add), and in the same directory commit the `auto` flag of bitmap
    /// `disable` cleared ([`checkpoint`](Self::checkpoint)). Active, the new bitmap records
    /// (it is published to the trackers) before `disable` stops: a mark racing the call
    /// lands in one of them or both, never in neither.
    pub(super) fn add_disabling(
        &mut self,
        name: &str,
        granularity: u64,
        recording: Recording,
        disable: Option<usize>,
    ) -> Result<()> {
        self.add_inner(name, granularity, recording, disable, None, None)
    }

    /// [`add`](Self::add), the new bitmap holding every granule that a dirty extent of
    /// `src` touches (any granularity; the disk sizes must match), as
    /// [`merge`](Self::merge) would OR them in, but with no moment at which the bitmap
    /// exists without them: inactive, its data clusters and table are written before the
    /// one directory commit that names it, so a crash or a failure leaves it absent or
    /// whole, never empty and consistent (which a backup through it would take for
    /// "nothing changed"). Active, the bits are in memory before the commit (which names it
    /// `in_use`); active in durable mode, in the clusters allocated and written before the
    /// commit. [`export_since`](Self::export_since) and `dbm bitmap --add --merge` add
    /// this way.
    ///
    /// # Errors
    /// As [`add`](Self::add); [`Error::InvalidInput`] for a `src` of another disk size.
    pub fn add_from(
        &mut self,
        name: &str,
        granularity: u64,
        recording: Recording,
        src: &DirtyBitmap,
    ) -> Result<()> {
        if src.disk_size() != self.disk_size() {
            return Err(invalid_input!(
                "cannot add a bitmap of a {}-byte disk to one of {} bytes",
                src.disk_size(),
                self.disk_size()
            ));
        }
        // Checked here, so that a bad granularity is the add's refusal, not the
        // conversion's.
        let _ = self.new_entry(&self.current_entries(), name, granularity, false)?;
        let bits = self.new_bitmap(granularity)?;
        bits.merge_from(src)?;
        self.add_inner(name, granularity, recording, None, None, Some(bits))
    }

    /// [`add`](Self::add) on a store active in deferred mode, holding `content` as the new
    /// bitmap (shared, or copied if its region size is not this store's), with every
    /// region counted as changed, as [`activate_with`](Self::activate_with) holds what it
    /// is given: a migration destination's bitmap that came over the stream. The directory
    /// commit names it `in_use`, so from the commit on a crash leaves it inconsistent,
    /// never empty and clean; the next flush writes its content.
    ///
    /// # Errors
    /// As [`add`](Self::add); [`Error::WrongState`] if the store is not active or is
    /// active in durable mode; [`Error::InvalidInput`] for content of another disk size.
    pub(crate) fn add_holding(
        &mut self,
        name: &str,
        recording: Recording,
        content: Arc<DirtyBitmap>,
    ) -> Result<()> {
        let granularity = content.granularity();
        self.add_inner(name, granularity, recording, None, Some(content), None)
    }

    /// Whether removing the bitmaps named `remove`, then adding one of each `(name,
    /// granularity)` of `add` in turn, would pass every check of
    /// [`remove`](Self::remove) and [`add`](Self::add) on this store as it is (each write
    /// still runs [`preflight`](Self::preflight) first). Writes nothing: a caller that must
    /// refuse before its first write asks this before it.
    ///
    /// # Errors
    /// [`Error::NotFound`] for a name of `remove` the directory lacks; then as
    /// [`add`](Self::add), as if the bitmaps before it in `add` were there.
    pub(crate) fn check_replace(&self, remove: &[&[u8]], add: &[(&str, u64)]) -> Result<()> {
        self.ensure_writable()?;
        let mut live = self.current_entries();
        for &name in remove {
            let i = self.find(name)?;
            let gone = self.slots[i].entry.name.clone();
            live.retain(|e| e.name != gone);
        }
        for &(name, granularity) in add {
            let entry = self.new_entry(&live, name, granularity, false)?;
            live.push(entry);
        }
        Ok(())
    }

    /// The directory entry [`add`](Self::add) would write for `name` beside the entries
    /// `live` (its table not allocated yet: offset 0), once every check of the name, the
    /// granularity and the room in the image passed. Writes nothing.
    fn new_entry(
        &self,
        live: &[DirEntry],
        name: &str,
        granularity: u64,
        enabled: bool,
    ) -> Result<DirEntry> {
        if !self.image.header().can_hold_bitmaps() {
            return Err(Error::Unsupported(
                "cannot store dirty bitmaps in qcow2 v2 files".to_string(),
            ));
        }
        if name.is_empty() || name.len() > MAX_NAME_SIZE || name.contains('\0') {
            return Err(invalid_input!(
                "bitmap name of {} bytes must be 1..=1023 bytes without NUL",
                name.len()
            ));
        }
        let gbits = granularity.trailing_zeros();
        if !granularity.is_power_of_two()
            || !(u32::from(MIN_GRANULARITY_BITS)..=u32::from(MAX_GRANULARITY_BITS)).contains(&gbits)
        {
            return Err(invalid_input!(
                "granularity {granularity} is not a power of two from 512 to 2^31"
            ));
        }
        let gbits = gbits as u8;
        // As QEMU reads names (up to a NUL): `name` beside a foreign entry "name\0..."
        // would make an image QEMU refuses to open.
        if live.iter().any(|e| e.name.qemu_name() == name.as_bytes()) {
            return Err(Error::Exists { name: name.into() });
        }
        if live.len() as u64 >= u64::from(MAX_BITMAPS) {
            return Err(invalid_input!("the image already holds 65535 bitmaps"));
        }
        let disk = self.disk_size();
        if disk == 0 {
            return Err(invalid_input!("a 0-byte disk cannot hold a bitmap"));
        }
        let ts = table_size(disk, gbits, self.image.cluster_size())?;
        let entry = DirEntry {
            name: name.into(),
            table_offset: 0,
            table_size: ts,
            granularity_bits: gbits,
            in_use: self.active && self.durable.is_none(),
            auto: enabled,
        };
        let dir_size = live
            .iter()
            .chain(std::iter::once(&entry))
            .fold(0u64, |a, e| a.saturating_add(e.encoded_len()));
        if dir_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(invalid_input!(
                "the directory would grow to {dir_size} bytes, above 67107840"
            ));
        }
        self.ensure_header_fits(u32::try_from(live.len() + 1).unwrap_or(u32::MAX))?;
        // While the bitmaps are held in memory (active, or parked by an inactivation), a
        // new one is held beside them, and the next activation holds them all: past the
        // activation's limit that activation would refuse the image (a failed migration's
        // source could not take its bitmaps back), one step after the add that caused it.
        if self.active || self.slots.iter().any(|s| s.parked.is_some()) {
            let held = self.memory_needed(self.slots.iter().filter(|s| !s.inconsistent));
            let new = disk.div_ceil(granularity).div_ceil(8);
            let needed = held.saturating_add(new);
            if needed > ACTIVE_MEMORY_LIMIT {
                return Err(Error::Unsupported(format!(
                    "adding {name:?} would hold {needed} bytes of bitmaps in memory, more \
                     than the limit of {ACTIVE_MEMORY_LIMIT} an activation holds"
                )));
            }
        }
        Ok(entry)
    }

    /// The add of [`add`](Self::add) and its kin: `content` is adopted as the new bitmap
    /// (`add_holding`), `bits` (at `granularity`, this store's region size) is what it starts
    /// with (`add_from`).
    fn add_inner(
        &mut self,
        name: &str,
        granularity: u64,
        recording: Recording,
        disable: Option<usize>,
        content: Option<Arc<DirtyBitmap>>,
        bits: Option<DirtyBitmap>,
    ) -> Result<()> {
        self.ensure_writable()?;
        self.reclaimed(|s| s.add_reclaimed(name, granularity, recording, disable, content, bits))
    }

    /// [`add_inner`](Self::add_inner), the writer locks held.
    fn add_reclaimed(
        &mut self,
        name: &str,
        granularity: u64,
        recording: Recording,
        disable: Option<usize>,
        content: Option<Arc<DirtyBitmap>>,
        mut bits: Option<DirtyBitmap>,
    ) -> Result<()> {
        let enabled = recording.is_enabled();
        if let Some(c) = &content {
            if !self.active {
                return Err(Error::WrongState(StateProblem::NotActive));
            }
            if self.durable.is_some() {
                return Err(Error::WrongState(StateProblem::Durable));
            }
            if c.disk_size() != self.disk_size() {
                return Err(invalid_input!(
                    "bitmap {name:?} covers {} bytes; the image {}",
                    c.disk_size(),
                    self.disk_size()
                ));
            }
        }
        let live: Vec<DirEntry> = self.current_entries();
        let mut entry = self.new_entry(&live, name, granularity, enabled)?;
        let ts = entry.table_size;
        let cs = self.image.cluster_size();
        self.preflight()?;
        // Inactive after an incremental inactivate, trackers still mark the parked bitmaps
        // and `activate` resumes them instead of reading the disk: the new bitmap is parked
        // too, so that it holds the marks from its commit on (for a checkpoint, those the
        // disabled old one no longer takes). Its disk image is empty, as it is. Whether
        // the stop parked any bitmap does not matter: a tracker of a store that held none
        // (or whose parked ones were removed since) marks the list this add publishes.
        // With no tracker alive nothing can mark it before the next activation (a tracker
        // is made only while active, and only trackers hold `tracked` besides the store),
        // so it is not parked, and a durable activation or a resize is not refused for it.
        let parked_too = !self.active
            && self.parking
            && !self.parked_durable
            && Arc::strong_count(&self.tracked) > 1;
        let mem = match (self.active, content) {
            (true, Some(c)) => Some(self.adopt(&entry, c)?),
            (true, None) | (false, _) if self.active || parked_too => {
                // Unshared until published below: nothing marks it yet.
                let m = match bits.take() {
                    Some(b) => b,
                    None => self.new_bitmap(granularity)?,
                };
                m.set_enabled_unshared(enabled);
                Some(Arc::new(m))
            }
            (_, _) => None,
        };
        // All input is valid and the image is sound: from here on, only I/O can fail.
        // Inactive, a bitmap that starts with bits has them written (data clusters, then
        // its table) before the directory commit names it, whose refcount flush is their
        // barrier: the commit point names it whole or not at all. Active, its content is
        // in memory (the commit names it `in_use`), or, durable, written by the
        // allocation below.
        let (off, zero_table) = match (self.active, bits.as_ref().or(mem.as_deref())) {
            (false, Some(b)) if b.count() > 0 => {
                (self.write_bitmap(b, &mut FlushStats::default())?, false)
            }
            _ => {
                let table_bytes = u64::from(ts) * 8;
                let off = self.image.alloc_clusters(ceil_clusters(table_bytes, cs))?;
                self.image.write_at(&vec![0u8; table_bytes as usize], off)?;
                (off, true)
            }
        };
        let target = match (&self.durable, &mem) {
            (Some(_), Some(m)) => Some(self.allocate_new_durable(m, off, ts)?),
            _ => None,
        };
        entry.table_offset = off;
        let mut entries = live;
        let old_name = disable
            .and_then(|i| self.slots.get(i))
            .map(|s| s.entry.name.clone());
        if let Some(n) = &old_name {
            if let Some(e) = entries.iter_mut().find(|e| &e.name == n) {
                e.auto = false;
            }
        }
        entries.push(entry);
        if let Err(e) = self.commit(entries, Vec::new()) {
            // Durable: the header write (the commit point) may have landed, naming the new
            // bitmap recording (and `disable` not) while the trackers' list lacks it, so
            // even a granule durable in the old bitmaps may be missing from the new one.
            // The trackers' list is closed (as an inactivation closes it): every intent
            // fails from now on, and the poison keeps the store from activating again.
            if let Some(d) = &mut self.durable {
                d.close();
                self.poisoned = true;
            }
            return Err(e);
        }
        if let Some(slot) = self.slots.last_mut() {
            // Active and deferred, the table is the zero table written above, and only the
            // flush engine writes it from here on: kept, so that the next flush reads it
            // no more than the others. (Durable, the allocation above wrote its entries.)
            if zero_table && self.active && self.durable.is_none() && mem.is_some() {
                slot.table = Some(vec![TableEntry::Zeroes; ts as usize]);
            }
            if parked_too {
                slot.parked = mem;
            } else {
                slot.mem = mem;
            }
        }
        if let (Some(d), Some(t)) = (&mut self.durable, target) {
            d.push(t);
        }
        // Only once no mark runs over the list without the new bitmap does the old one
        // stop: such a mark may not have reached the old one yet, and would land in
        // neither. A recording bitmap added alone waits the same way before the call
        // returns, so that every mark completing after it is in the new bitmap: the caller
        // may then disable or remove the old one (a mark over the older list, finishing
        // later in a bitmap that is then removed, would be in none). (A durable intent sets
        // its bits again with the current list until they are durable in every recording
        // bitmap, so it needs no grace period.)
        if old_name.is_some() || enabled {
            self.publish_quiesced();
        } else {
            self.publish();
        }
        if let Some(n) = &old_name {
            if let Some(s) = self.slots.position(n.as_bytes()).map(|i| &self.slots[i]) {
                for m in s.mem.iter().chain(s.parked.iter()) {
                    self.stop_recording(m);
                }
            }
        }
        // Durable: a write whose intent was acknowledged before the new bitmap was
        // published may land after this returns; the new bitmap takes every write
        // registered in flight, on disk, now (the old one holds it already).
        if enabled {
            self.commit_in_flight()?;
        }
        Ok(())
    }

    /// Stops `m` recording in memory ([`DirtyBitmap::set_enabled`], which waits for its
    /// marks in flight). Deferred, it first waits for marks over a list published before
    /// the current one, which have announced nothing to `m` yet
    /// ([`wait_for_older_lists`](Self::wait_for_older_lists)). Active in durable mode, the
    /// trackers' epoch moves on first instead (a durable intent sets its bits again with
    /// the current list until they are durable): a
    /// durable fast path skips a bitmap it reads disabled, and one that read the epoch
    /// before this bump and the flag after the clear must find the epoch moved when it
    /// reads it again, and take the slow path (the argument is at
    /// [`DurableTracker::is_durable`](super::durable::DurableTracker::is_durable)). The
    /// caller has made the stop durable on disk first (the directory commit of a
    /// checkpoint, the flags write of a disable) and published any bitmap taking over.
    fn stop_recording(&self, m: &DirtyBitmap) {
        if self.durable.is_some() {
            self.durable_set.bump();
        } else {
            self.wait_for_older_lists();
        }
        m.set_enabled(false);
    }

    /// Starts `m` recording in memory. Active in durable mode, the trackers' epoch moves on
    /// after the flag, so that a fast path that read the flag cleared (and skipped the
    /// bitmap) cannot answer after the enable returns (the argument is at
    /// [`DurableTracker::is_durable`](super::durable::DurableTracker::is_durable)); the
    /// mirror of [`stop_recording`](Self::stop_recording). Deferred, it then waits out a
    /// grace period ([`publish_quiesced`](Self::publish_quiesced)), as an `add` of a
    /// recording bitmap does, so that every mark completing after the enable is in `m`: a
    /// mark over a list published before `m` was (added disabled, then enabled) has
    /// announced nothing to it, and a fan-out over the current list may have passed `m`
    /// while it was still disabled and not yet reached the bitmap it is handed over from.
    /// Either, completing after the enable returned, would be missing from `m`, and from
    /// every bitmap once the caller removes the other (a merge before the removal copies
    /// what that bitmap held when it read it).
    fn start_recording(&self, m: &DirtyBitmap) {
        m.set_enabled(true);
        if self.durable.is_some() {
            self.durable_set.bump();
        } else {
            self.publish_quiesced();
        }
    }

    /// A durable store's new bitmap `m`, whose all-zero table of `ts` entries is at `off`:
    /// every entry gets a zero data cluster (refcounts, clusters, entries, barrier) before
    /// the directory names the table, so the bitmap is consistent and in place from its
    /// first commit on. A crash before the directory commit leaves only leaked clusters.
    /// Poisons the store on failure.
    fn allocate_new_durable(
        &mut self,
        m: &Arc<DirtyBitmap>,
        off: u64,
        ts: u32,
    ) -> Result<flush::Target> {
        let mut t = flush::Target {
            bitmap: Arc::clone(m),
            table_offset: off,
            table: vec![TableEntry::Zeroes; ts as usize],
        };
        if let Err(e) = flush::allocate_all(&mut self.image, std::slice::from_mut(&mut t)) {
            self.poisoned = true;
            return Err(e);
        }
        Ok(t)
    }

    /// Removes a bitmap, consistent or not, and frees its table and data clusters (on a
    /// store active in durable mode too: its trackers stop marking it). The
    /// clusters of a bitmap from an untrusted (stale) directory are never freed: removing
    /// one drops every stale entry (as QEMU does on its first header write), leaking their
    /// clusters until `qemu-img check -r leaks`.
    ///
    /// Removing an inconsistent bitmap makes every consistent bitmap kept all dirty, in
    /// the same directory commit, and returns their names (empty for a removal that
    /// changes no other; see the recording bitmap below).
    /// The removed bitmap may be a later checkpoint holding writes no kept one has, and
    /// "what changed since" a kept one is the union of the bitmaps left
    /// ([`changed_since`](Self::changed_since)): with the kept bits as they were, those
    /// writes would read clean. Every "since" over the kept bitmaps is then a full backup.
    /// Inactive, each kept bitmap is committed with a new table of all-ones entries
    /// (which QEMU loads as set bits; a parked copy gets every bit too); active, its
    /// in-memory bitmap gets every bit (its disk copy is `in_use`; in durable mode the bits
    /// are written in place, one barrier, before the directory commit). A crash leaves the
    /// old directory (the inconsistent bitmap still there, so no "since" over it reads
    /// clean) or the new one with the kept bitmaps all dirty, never the new one with their
    /// bits as they were (`docs/CRASH-CONSISTENCY.md`). Removing the bitmap that records
    /// (a chain's latest checkpoint) while no kept bitmap records does the same: its
    /// writes, and those made from then on, are in no kept bitmap. Removing any other
    /// consistent bitmap changes no other: drop the oldest checkpoint of a chain. A
    /// checkpoint between two others holds writes no other bitmap has, which "since" every
    /// older one then lacks, and the image cannot say which is older: [`merge`](Self::merge)
    /// it into the one made just before it first (as libvirt deletes a checkpoint).
    ///
    /// A bitmap whose changes a [`ChangeConsumer`](crate::ChangeConsumer) reads is busy and
    /// is not removed: the consumer would read, from then on, a bitmap nothing marks.
    ///
    /// Durable, after a checkpoint: the old bitmap may be the only one holding a write
    /// acknowledged before the checkpoint and landing after it, unless the write was
    /// registered ([`DurableTracker::begin_write`](super::durable::DurableTracker::begin_write):
    /// the checkpoint then marked it in the new bitmap) or the caller drained its writes
    /// around the checkpoint.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Busy`], [`Error::Arriving`] (a bitmap a postcopy push
    /// still fills), [`Error::ReadOnly`], [`Error::Corrupt`] for a bad table (an
    /// inconsistent bitmap's too when the preflight's walk finds it corrupt: `dbm check -r
    /// all` removes such a bitmap), [`Error::InvalidInput`] for a header that cannot be
    /// rewritten, I/O (all before any write; active in durable mode, an I/O error in the
    /// commit poisons the store).
    pub fn remove(&mut self, name: impl AsRef<[u8]>) -> Result<Vec<BitmapName>> {
        self.remove_replaced(name.as_ref(), &[])
    }

    /// [`remove`](Self::remove), where the bitmaps named in `foreign` are left as they are
    /// when an inconsistent bitmap goes: their content did not come from this image's
    /// history (a migration destination's bitmaps adopted from the stream, which replaces
    /// the image's own, or ones about to be removed), so no write only the removed bitmap
    /// held can be missing from them. Every other kept bitmap is made all dirty as
    /// `remove` makes it. Removing a bitmap named in `foreign` that records ends no chain
    /// of the image's own.
    ///
    /// # Errors
    /// As [`remove`](Self::remove).
    pub(crate) fn remove_replaced(
        &mut self,
        name: &[u8],
        foreign: &[&[u8]],
    ) -> Result<Vec<BitmapName>> {
        self.ensure_writable()?;
        self.reclaimed(|s| s.remove_reclaimed(name, foreign))
    }

    fn remove_reclaimed(&mut self, name: &[u8], foreign: &[&[u8]]) -> Result<Vec<BitmapName>> {
        let i = self.find(name)?;
        self.ensure_not_busy(i)?;
        self.preflight()?;
        let slot = &self.slots[i];
        let mut frees = if slot.stale {
            Vec::new()
        } else {
            match self.owned_clusters(&slot.entry) {
                Ok(f) => f,
                // An inconsistent bitmap's table may be garbage: free only the table. (The
                // preflight's walk refuses most such tables first.) Any other error, an
                // I/O one, fails the remove before it wrote: freeing only the table would
                // leak the data clusters and report success.
                Err(Error::Corrupt(_)) if slot.inconsistent => vec![(
                    slot.entry.table_offset,
                    ceil_clusters(
                        u64::from(slot.entry.table_size) * 8,
                        self.image.cluster_size(),
                    ),
                )],
                Err(e) => return Err(e),
            }
        };
        let gone_inconsistent = slot.inconsistent;
        // A foreign bitmap (a migration's) is no checkpoint of the image's own chain.
        let gone_records =
            !slot.stale && !slot.inconsistent && !foreign.contains(&name) && self.records(slot);
        let mut entries = Vec::new();
        let mut kept = Vec::new();
        let mut own = Vec::new();
        for (j, s) in self.slots.iter().enumerate() {
            if j != i && !s.stale {
                if !foreign.contains(&s.entry.name.as_bytes()) {
                    own.push(entries.len());
                }
                entries.push(s.entry.clone());
                kept.push(j);
            }
        }
        // The recording bitmap of a chain is its latest checkpoint: once it goes with no
        // kept bitmap recording, its writes, and every write from now on until a new chain,
        // are in no kept bitmap, and "since" a kept one would read them clean.
        let chain_ends = gone_records
            && !kept.iter().any(|&j| {
                let s = &self.slots[j];
                !s.inconsistent && self.records(s)
            });
        let made_all_dirty = if gone_inconsistent || chain_ends {
            self.make_all_dirty(&kept, &own, &mut entries, &mut frees)?
        } else {
            Vec::new()
        };
        let gone = self.slots[i].mem.clone();
        self.commit(entries, frees)?;
        // No commit ran since the directory commit freed the clusters (this call holds the
        // store), and none writes them from here on.
        if let (Some(d), Some(m)) = (&mut self.durable, gone) {
            d.drop_bitmap(&m);
        }
        Ok(made_all_dirty)
    }

    /// Makes every consistent bitmap among slots `kept` (whose entries, in order, are
    /// `entries`) at the positions `own` (the others are foreign: see
    /// [`remove_replaced`](Self::remove_replaced)) all dirty, ahead of the directory commit of `entries` that removes an
    /// inconsistent bitmap ([`remove`](Self::remove)), and returns their names. Each one
    /// the store holds in memory (active) gets every bit there; active in durable mode,
    /// they are then written in place with one barrier, before the commit. Each other one
    /// gets a new table of all-ones entries in fresh clusters, its entry in `entries`
    /// names it, and its old table and data clusters join `frees`; a parked copy gets
    /// every bit too (it stays authoritative, and would otherwise write the old bits back
    /// at the next flush). The bits in memory are set before anything is written: a
    /// failure leaves them all dirty, never short of the disk.
    ///
    /// Crash reasoning: until the commit's header write the old directory is in force,
    /// the inconsistent bitmap in it (the new tables are leaked clusters; in durable mode
    /// the kept bitmaps' bits in place are all set, which is only more dirty); from it on,
    /// the kept entries name the all-ones tables (or are `in_use`, active in deferred
    /// mode), so no crash leaves the kept bitmaps with their old bits and the removed one
    /// gone.
    fn make_all_dirty(
        &mut self,
        kept: &[usize],
        own: &[usize],
        entries: &mut [DirEntry],
        frees: &mut Vec<(u64, u64)>,
    ) -> Result<Vec<BitmapName>> {
        // The commit's own refusal of a header it cannot rewrite, before the tables below
        // are allocated and written: nothing is written before a refusal.
        self.ensure_header_fits(u32::try_from(entries.len()).unwrap_or(u32::MAX))?;
        let mut made = Vec::new();
        let mut in_memory = false;
        for &k in own {
            let s = &self.slots[kept[k]];
            if s.inconsistent {
                continue;
            }
            match s.mem.as_ref().or(s.parked.as_ref()) {
                Some(m) => {
                    m.fill();
                    in_memory |= s.mem.is_some();
                }
                None if entries[k].in_use => continue,
                None => {}
            }
            made.push(s.entry.name.clone());
        }
        if in_memory && self.durable.is_some() {
            for &j in kept {
                if let Some(m) = &self.slots[j].mem {
                    m.wait_for_marks();
                }
            }
            self.commit_durable()?;
        }
        for &k in own {
            let s = &self.slots[kept[k]];
            if s.inconsistent || s.mem.is_some() || entries[k].in_use {
                continue;
            }
            let owned = self.owned_clusters(&s.entry)?;
            let table_size = s.entry.table_size;
            entries[k].table_offset = self.write_all_ones_table(table_size)?;
            frees.extend(owned);
        }
        Ok(made)
    }

    /// Rewrites a bitmap whole, as QEMU stores one: fresh data clusters (only for table
    /// entries with a set bit), a fresh table, a fresh directory, refcounts flushed, the
    /// header commit, then the old clusters freed.
    ///
    /// On an active store the in-memory bitmap is authoritative and I/O threads may be
    /// marking it, so `bitmap`'s bits are ORed into it and nothing is written: replacing it
    /// could drop a concurrent mark, and the disk copy is untrusted (`in_use`) until the
    /// next inactivate writes it. Active in durable mode, the bits are ORed in the same way
    /// and are on disk, in place, when the call returns. Use [`clear`](Self::clear) to
    /// reset a bitmap.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the disk size or granularity differ;
    /// [`Error::NotFound`], [`Error::Inconsistent`], [`Error::Busy`] (a migration stream
    /// reads the bitmap), [`Error::ReadOnly`], I/O.
    pub fn store(&mut self, name: impl AsRef<[u8]>, bitmap: &DirtyBitmap) -> Result<()> {
        self.ensure_writable()?;
        self.reclaimed(|s| s.store_reclaimed(name.as_ref(), bitmap))
    }

    fn store_reclaimed(&mut self, name: &[u8], bitmap: &DirtyBitmap) -> Result<()> {
        let i = self.find_consistent(name)?;
        // As a merge: no OR into a bitmap a consumer reads (`merge_reclaimed`).
        self.ensure_not_busy(i)?;
        let g = 1u64 << self.slots[i].entry.granularity_bits;
        if bitmap.disk_size() != self.disk_size() || bitmap.granularity() != g {
            return Err(invalid_input!(
                "bitmap of {} bytes at granularity {} does not fit {:?} ({} bytes at {g})",
                bitmap.disk_size(),
                bitmap.granularity(),
                self.slots[i].entry.name,
                self.disk_size()
            ));
        }
        let owned;
        let bm = if bitmap.region_size() == self.region_size() {
            bitmap
        } else {
            let b = self.new_bitmap(g)?;
            b.merge_from(bitmap)?;
            owned = b;
            &owned
        };
        if let Some(m) = &self.slots[i].mem {
            // Active: OR into the authoritative copy, write nothing (see above), unless
            // durable.
            m.merge_from(bm)?;
            return self.commit_marked_if_durable(m.clone());
        }
        self.preflight()?;
        if let Some(kept) = self.slots[i].parked.clone() {
            // Inactive after an incremental inactivate: the kept copy takes `bitmap`'s bits
            // too (it may hold marks made while inactive), and the disk gets the copy whole,
            // so the two keep matching.
            kept.merge_from(bm)?;
            return self.rewrite(i, &kept, self.slots[i].entry.in_use);
        }
        self.rewrite(i, bm, self.slots[i].entry.in_use)
    }

    /// Writes `bm` as slot `i`'s new data with the given in_use flag, and commits.
    /// The caller ran [`preflight`](Self::preflight) before changing anything.
    fn rewrite(&mut self, i: usize, bm: &DirtyBitmap, in_use: bool) -> Result<()> {
        // The commit rewrites cluster 0 as this crate encodes it, which an image laid out
        // otherwise may not hold: refused before the bitmap's clusters are allocated.
        self.ensure_header_fits(u32::try_from(self.current_entries().len()).unwrap_or(u32::MAX))?;
        let old = self.slots[i].entry.clone();
        let frees = self.owned_clusters(&old)?;
        let table = self.write_bitmap(bm, &mut FlushStats::default())?;
        let mut entries = self.current_entries();
        if let Some(e) = entries.iter_mut().find(|e| e.name == old.name) {
            e.table_offset = table;
            e.in_use = in_use;
        }
        self.commit(entries, frees)
    }

    /// Clears every bit. Active: in memory only (`in_use` protects the disk); active in
    /// durable mode, on disk too before it returns (the durable bits first, then memory,
    /// then the regions in place and a barrier: see [`super::durable`]). Inactive: stores
    /// an empty bitmap.
    ///
    /// Durable: a write registered in flight
    /// ([`DurableTracker::begin_write`](super::durable::DurableTracker::begin_write)) keeps
    /// its bits, on disk (it may land after the clear). A write whose plain
    /// [`mark`](super::durable::DurableTracker::mark) returned before the call must have
    /// completed before it: the caller drains.
    ///
    /// # Errors
    /// As [`store`](Self::store): [`Error::Busy`] while a migration stream reads the bitmap,
    /// [`Error::Arriving`] while a postcopy push still fills it.
    pub fn clear(&mut self, name: impl AsRef<[u8]>) -> Result<()> {
        self.ensure_writable()?;
        self.reclaimed(|s| s.clear_reclaimed(name.as_ref()))
    }

    fn clear_reclaimed(&mut self, name: &[u8]) -> Result<()> {
        let i = self.find_consistent(name)?;
        // As QEMU refuses `block-dirty-bitmap-clear` on a busy bitmap: a migration stream
        // carries what it reads of the bitmap, and a clear it never reads would leave the
        // destination's copy other than the source's.
        self.ensure_not_busy(i)?;
        if self.durable.is_some() {
            return self.clear_durable(i);
        }
        if let Some(m) = &self.slots[i].mem {
            m.clear(0, self.disk_size());
            return Ok(());
        }
        self.preflight()?;
        let empty = self.new_bitmap(1u64 << self.slots[i].entry.granularity_bits)?;
        self.rewrite(i, &empty, false)?;
        // A parked copy (after an incremental inactivate) may hold marks made since that
        // the disk lacks: it is cleared only once the disk is, so a failed clear loses none
        // (a mark racing the call is ordered before it, as on an active store).
        if let Some(p) = &self.slots[i].parked {
            p.clear(0, self.disk_size());
        }
        Ok(())
    }

    /// Sets the `auto` flag (QEMU's enabled). Active: in memory, written at inactivation;
    /// active in durable mode, also written in place (the entry's flags, one barrier)
    /// before it returns: enabling sets memory first, disabling writes the flags first,
    /// so that no mark is acknowledged without a bitmap the disk may still say records.
    /// Inactive: a new directory is committed, unless the flag already has that value.
    ///
    /// Durable: every write registered in flight
    /// ([`DurableTracker::begin_write`](super::durable::DurableTracker::begin_write)) is
    /// marked, on disk, in every bitmap that records after the call, before it returns (an
    /// enabled bitmap, or one taking over from a disabled one, holds a write acknowledged
    /// before it recorded and landing after). A write whose plain
    /// [`mark`](super::durable::DurableTracker::mark) returned before the call must have
    /// completed before it: the caller drains.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Inconsistent`], [`Error::ReadOnly`], I/O (active in
    /// durable mode, the store is then poisoned); [`Error::Busy`] for a change of the flag
    /// of a bitmap a [`ChangeConsumer`](crate::ChangeConsumer) reads (a migration stream),
    /// and [`Error::Arriving`] for one a postcopy push still fills, before anything
    /// changes.
    pub fn set_enabled(&mut self, name: impl AsRef<[u8]>, enabled: bool) -> Result<()> {
        self.ensure_writable()?;
        self.reclaimed(|s| s.set_enabled_reclaimed(name.as_ref(), enabled))
    }

    fn set_enabled_reclaimed(&mut self, name: &[u8], enabled: bool) -> Result<()> {
        let i = self.find_consistent(name)?;
        // A bitmap a migration stream reads keeps its flag, as QEMU's busy bitmaps do: a
        // disable (a checkpoint's hand-over) would send writes where the stream does not
        // look, an enable would fail the stream's stop on a changed START.
        if self.records(&self.slots[i]) != enabled {
            self.ensure_not_busy(i)?;
        }
        if let Some(m) = self.slots[i].mem.clone() {
            if self.durable.is_none() || self.slots[i].entry.auto == enabled {
                if enabled {
                    self.start_recording(&m);
                } else {
                    self.stop_recording(&m);
                }
                return self.commit_in_flight();
            }
            // Durable: while the disk may say the bitmap records, so does memory, and the
            // fast path acknowledges no intent without its bits durable in it. Enabling
            // sets memory first; disabling writes the flags first (the write may land at
            // any moment from its start), and only once it is durable stops memory (the
            // trackers' epoch bumped first, then the flag, which waits for the marks in
            // flight). A failed write leaves memory recording.
            if enabled {
                self.start_recording(&m);
            }
            let name = self.slots[i].entry.name.clone();
            let mut entries = self.current_entries();
            if let Some(e) = entries.iter_mut().find(|e| e.name == name) {
                e.auto = enabled;
            }
            let r = self.write_flags_in_place(entries);
            if r.is_err() {
                self.poisoned = true;
                return r;
            }
            if !enabled {
                self.stop_recording(&m);
            }
            // A write acknowledged before the change, still in flight, is marked in every
            // bitmap that records now (the one enabled, the one taking over from the one
            // disabled), on disk, before this returns.
            return self.commit_in_flight();
        }
        if self.slots[i].entry.auto != enabled {
            self.preflight()?;
        }
        if let Some(p) = &self.slots[i].parked {
            if enabled {
                self.start_recording(p);
            } else {
                self.stop_recording(p);
            }
        }
        if self.slots[i].entry.auto == enabled {
            return Ok(());
        }
        let mut entries = self.current_entries();
        entries[i].auto = enabled;
        self.commit(entries, Vec::new())
    }

    /// In durable mode, a commit: what `store` or `merge` ORed into memory is on disk when
    /// they return.
    /// After bits were ORed into `m`, active: in durable mode, commits them, so that they
    /// are on disk when the call returns. A bit a racing mark set before the OR read it is
    /// not ORed again (`set_bits` skips a set bit), and its change-map region may not be
    /// recorded yet (a mark writes its word before it records the region): the wait for
    /// the marks in flight makes every such region recorded before the commit takes them.
    fn commit_marked_if_durable(&mut self, m: Arc<DirtyBitmap>) -> Result<()> {
        if self.durable.is_some() {
            m.wait_for_marks();
            self.commit_durable()?;
        }
        Ok(())
    }

    /// ORs bitmap `src_name` into `dst_name`, both in this image (active in durable mode:
    /// on disk when it returns). A store that handed the image over takes the writer locks
    /// back, and checks the image, before it reads `src_name` (its kept copy then holds
    /// what another writer flushed meanwhile, and nobody writes between the read and the
    /// commit).
    ///
    /// # Errors
    /// As [`merge_from`](Self::merge_from).
    pub fn merge(&mut self, src_name: impl AsRef<[u8]>, dst_name: impl AsRef<[u8]>) -> Result<()> {
        self.reclaimed(|s| {
            let src = s.load(src_name)?;
            s.merge_bitmap(&src, dst_name)
        })
    }

    /// ORs bitmap `src_name` of another store into `dst_name` of this one, as
    /// `qemu-img bitmap --merge SRC -b OTHER` does. The granularities may differ: every
    /// dirty extent of the source dirties the granules it touches. The disk sizes must
    /// match.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for different disk sizes; [`Error::NotFound`] or
    /// [`Error::Inconsistent`] for either bitmap; [`Error::Arriving`] for a bitmap whose
    /// bits are still arriving (a postcopy push); [`Error::Busy`] for a destination bitmap
    /// a migration stream reads (as QEMU's); [`Error::ReadOnly`]; I/O.
    pub fn merge_from<T: Storage>(
        &mut self,
        src: &BitmapStore<T>,
        src_name: impl AsRef<[u8]>,
        dst_name: impl AsRef<[u8]>,
    ) -> Result<()> {
        let bm = src.load(src_name)?;
        self.merge_bitmap(&bm, dst_name)
    }

    fn merge_bitmap(&mut self, src: &DirtyBitmap, dst_name: impl AsRef<[u8]>) -> Result<()> {
        self.ensure_writable()?;
        self.reclaimed(|s| s.merge_reclaimed(src, dst_name.as_ref()))
    }

    fn merge_reclaimed(&mut self, src: &DirtyBitmap, dst_name: &[u8]) -> Result<()> {
        let i = self.find_consistent(dst_name)?;
        // A bitmap a consumer reads (a migration stream carries it) takes no merge, as
        // QEMU refuses a merge into a busy bitmap: bits ORed in after the stream's last
        // take of it would never reach the destination, which would start without them.
        self.ensure_not_busy(i)?;
        if src.disk_size() != self.disk_size() {
            return Err(invalid_input!(
                "cannot merge a bitmap of a {}-byte disk into one of {} bytes",
                src.disk_size(),
                self.disk_size()
            ));
        }
        if let Some(m) = &self.slots[i].mem {
            m.merge_from(src)?;
            return self.commit_marked_if_durable(m.clone());
        }
        self.preflight()?;
        if let Some(p) = &self.slots[i].parked {
            p.merge_from(src)?;
        }
        let dst = self.load_disk(&self.slots[i].entry)?;
        dst.merge_from(src)?;
        self.rewrite(i, &dst, false)
    }
}
