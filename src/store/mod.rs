//! [`BitmapStore`]: the persistent bitmaps of one qcow2 image.
//!
//! A store is opened *inactive*: it reads the directory, and every operation reads or
//! rewrites bitmaps on disk, with QEMU's copy-on-write order (new clusters, refcounts
//! flushed, header commit, old clusters freed). [`BitmapStore::activate`] loads every
//! consistent bitmap into memory and sets `in_use` on disk; from then on the in-memory
//! [`DirtyBitmap`]s are authoritative ([`BitmapStore::bitmap`] hands them out for marking)
//! until [`BitmapStore::inactivate`] or [`BitmapStore::close`] stores them and clears
//! `in_use`. A crash while active leaves `in_use` set: the bitmaps then load as
//! [`BitmapState::Inconsistent`], never as falsely clean.
//!
//! The write order of every operation and what a crash after each step leaves are in
//! `docs/CRASH-CONSISTENCY.md`.

use std::sync::Arc;

use std::time::Instant;

use crate::bitmap::DirtyBitmap;
use crate::error::{invalid_input, Corruption, Error, Result};
use crate::flush::{self, FlushStats};
use crate::format::directory::{MAX_GRANULARITY_BITS, MAX_NAME_SIZE, MIN_GRANULARITY_BITS};
use crate::format::extension::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE};
use crate::format::header::AUTOCLEAR_BITMAPS;
use crate::format::{
    decode_directory, decode_table, encode_directory, encode_table, table_size, BitmapName,
    BitmapsExtension, DirEntry, ImageGeometry, TableEntry,
};
use crate::image::check::References;
use crate::image::{read_metadata, Image};
use crate::storage::Storage;
use crate::tracker::TrackedSet;

/// Most bytes of bitmap data [`BitmapStore::activate`] will hold in memory for one image
/// (16 GiB: 512 bitmaps of a 16 TiB disk at 64 KiB granularity).
pub const ACTIVE_MEMORY_LIMIT: u64 = 16 << 30;

/// Bytes of serialized bitmap per change-map region of the store's in-memory bitmaps, when
/// the cluster is at least this large (otherwise the region is the cluster). One page: a
/// region write is a whole page of the page cache (no read-modify-write) and a whole number
/// of 512-byte sectors. At 64 KiB granularity a region covers 2 GiB of disk, so a scattered
/// workload rewrites 4 KiB per region it touches rather than a 64 KiB cluster per 32 GiB.
pub const STORE_REGION_SIZE: u64 = 4096;

/// Whether a bitmap's on-disk data can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapState {
    /// Saved cleanly (or owned by this activated store).
    Consistent,
    /// `in_use` was set when the image was opened, or a program without bitmap support
    /// modified the image (autoclear bit 0 clear). Treat it as all dirty; only removal is
    /// allowed.
    Inconsistent,
}

/// One bitmap as [`BitmapStore::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name, as its bytes on disk (shown escaped; see [`BitmapName`]).
    pub name: BitmapName,
    /// Disk bytes per bit.
    pub granularity: u64,
    /// The `auto` flag: the bitmap records every write (QEMU's "enabled").
    pub enabled: bool,
    /// The `in_use` flag as it is on disk now.
    pub in_use: bool,
    /// Whether its data can be trusted.
    pub state: BitmapState,
    /// Entries in its bitmap table.
    pub table_size: u32,
}

#[derive(Debug)]
struct Slot {
    /// The entry as it is on disk.
    entry: DirEntry,
    inconsistent: bool,
    /// Found in an untrusted (stale) directory: its clusters are never freed, since a
    /// repair tool may have given them to other data.
    stale: bool,
    /// The authoritative bitmap while the store is active.
    mem: Option<Arc<DirtyBitmap>>,
    /// The in-memory bitmap kept across an incremental [`BitmapStore::inactivate`], so that
    /// a later [`BitmapStore::activate`] resumes it instead of reloading the disk. It stays
    /// authoritative: every region where it differs from the disk is in its change map.
    parked: Option<Arc<DirtyBitmap>>,
}

/// The persistent bitmaps of one qcow2 image. See the module docs.
///
/// Call [`close`](Self::close) (or [`inactivate`](Self::inactivate)) on an activated store:
/// dropping it leaves `in_use` set, and the bitmaps load as inconsistent next time.
#[must_use = "an activated store must be closed to save its bitmaps"]
#[derive(Debug)]
pub struct BitmapStore<S: Storage> {
    image: Image<S>,
    slots: Vec<Slot>,
    /// The trusted directory's `(offset, size)` on disk.
    dir: Option<(u64, u64)>,
    active: bool,
    /// Set when a flush or an inactivation failed part-way: every later write is refused
    /// ([`Error::Poisoned`]) until the image is reopened.
    poisoned: bool,
    /// The reference counts of the last [`preflight`](Self::preflight). While the store is
    /// active it stays valid for deciding frees: since then only this handle wrote, and it
    /// only added clusters that nothing referenced (see `safe_frees`).
    walk: Option<References>,
    /// The in-memory bitmaps (active or parked) every [`Tracker`](crate::Tracker) taken from
    /// this store marks; republished by [`publish`](Self::publish) whenever the slots change.
    tracked: TrackedSet,
}

/// A [`BitmapStore`] shared between threads: the owner, a background
/// [`FlushPolicy`](background::FlushPolicy) and whoever else needs the store take turns
/// through [`lock`](Self::lock). Cloning it clones the handle, not the store.
///
/// Marks never need it: they go to the in-memory bitmaps through a
/// [`Tracker`](crate::Tracker) or [`BitmapStore::bitmap`], without a lock.
#[derive(Debug)]
pub struct SharedStore<S: Storage> {
    inner: Arc<parking_lot::Mutex<BitmapStore<S>>>,
}

/// Exclusive access to the [`BitmapStore`] of a [`SharedStore`], until dropped. It
/// dereferences to the store.
#[derive(Debug)]
#[must_use = "the store is unlocked as soon as the guard is dropped"]
pub struct StoreGuard<'a, S: Storage> {
    guard: parking_lot::MutexGuard<'a, BitmapStore<S>>,
}

impl<S: Storage> SharedStore<S> {
    /// Shares `store`.
    pub fn new(store: BitmapStore<S>) -> Self {
        Self {
            inner: Arc::new(parking_lot::Mutex::new(store)),
        }
    }

    /// Waits for the store and locks it until the guard is dropped.
    pub fn lock(&self) -> StoreGuard<'_, S> {
        StoreGuard {
            guard: self.inner.lock(),
        }
    }

    /// The store itself, if this is the last handle; otherwise this handle back.
    ///
    /// # Errors
    /// The handle, when other clones (a running flusher's among them) are still alive.
    pub fn try_into_inner(self) -> std::result::Result<BitmapStore<S>, Self> {
        Arc::try_unwrap(self.inner)
            .map(parking_lot::Mutex::into_inner)
            .map_err(|inner| Self { inner })
    }
}

impl<S: Storage> Clone for SharedStore<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: Storage> From<BitmapStore<S>> for SharedStore<S> {
    fn from(store: BitmapStore<S>) -> Self {
        Self::new(store)
    }
}

impl<S: Storage> std::ops::Deref for StoreGuard<'_, S> {
    type Target = BitmapStore<S>;
    fn deref(&self) -> &BitmapStore<S> {
        &self.guard
    }
}

impl<S: Storage> std::ops::DerefMut for StoreGuard<'_, S> {
    fn deref_mut(&mut self) -> &mut BitmapStore<S> {
        &mut self.guard
    }
}

fn ceil_clusters(bytes: u64, cs: u64) -> u64 {
    bytes.div_ceil(cs)
}

impl<S: Storage> BitmapStore<S> {
    /// Opens the bitmaps of an image, inactive. Reads the header and the directory; writes
    /// nothing.
    ///
    /// # Errors
    /// As [`Image::open`]; [`Error::Corrupt`] when the trusted directory breaks one of QEMU's
    /// rules (QEMU refuses to open such an image too), including a consistent bitmap whose
    /// table size differs from the one the disk size needs.
    pub fn open(storage: S, writable: bool) -> Result<Self> {
        let image = Image::open(storage, writable)?;
        let geo = image.header().geometry()?;
        let mut slots = Vec::new();
        let mut dir = None;
        if let Some(ext) = image.area().bitmaps {
            let bytes = read_metadata(
                image.storage(),
                "bitmap directory",
                ext.directory_offset,
                ext.directory_size,
            )?;
            let entries = decode_directory(&bytes, ext.nb_bitmaps, &geo)?;
            let mut at = 0u64;
            for (index, entry) in entries.into_iter().enumerate() {
                entry
                    .check_table_size(&geo)
                    .map_err(|reason| Corruption::DirectoryEntry {
                        index: u32::try_from(index).unwrap_or(u32::MAX),
                        offset: at,
                        reason,
                    })?;
                at = at.saturating_add(entry.encoded_len());
                slots.push(Slot {
                    inconsistent: entry.in_use,
                    entry,
                    stale: false,
                    mem: None,
                    parked: None,
                });
            }
            dir = Some((ext.directory_offset, ext.directory_size));
        } else if let Some(data) = image.stale_bitmaps() {
            // Untrusted: list what it names, all inconsistent; ignore it if it is broken.
            let listed = BitmapsExtension::decode(data, 0, geo.cluster_size())
                .ok()
                .and_then(|ext| {
                    let b = read_metadata(
                        image.storage(),
                        "bitmap directory",
                        ext.directory_offset,
                        ext.directory_size,
                    )
                    .ok()?;
                    decode_directory(&b, ext.nb_bitmaps, &geo).ok()
                })
                .unwrap_or_default();
            slots = listed
                .into_iter()
                .map(|entry| Slot {
                    entry,
                    inconsistent: true,
                    stale: true,
                    mem: None,
                    parked: None,
                })
                .collect();
        }
        Ok(Self {
            image,
            slots,
            dir,
            active: false,
            poisoned: false,
            walk: None,
            tracked: TrackedSet::default(),
        })
    }

    /// Creates a bitmap-only image (see [`Image::create_bitmap_only`]) and opens it
    /// writable, with no bitmaps.
    ///
    /// # Errors
    /// As [`Image::create_bitmap_only`].
    pub fn create(storage: S, disk_size: u64, cluster_size: u64) -> Result<Self> {
        Ok(Self {
            image: Image::create_bitmap_only(storage, disk_size, cluster_size)?,
            slots: Vec::new(),
            dir: None,
            active: false,
            poisoned: false,
            walk: None,
            tracked: TrackedSet::default(),
        })
    }

    /// The image underneath.
    pub fn image(&self) -> &Image<S> {
        &self.image
    }

    /// Whether [`activate`](Self::activate) has run (and no inactivate since).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The disk length bitmaps cover: the virtual size rounded down to 512 bytes, as QEMU
    /// uses it.
    pub fn disk_size(&self) -> u64 {
        self.image.header().disk_length()
    }

    /// Every bitmap, in directory order.
    pub fn list(&self) -> Vec<BitmapInfo> {
        self.slots
            .iter()
            .map(|s| BitmapInfo {
                name: s.entry.name.clone(),
                granularity: 1u64 << s.entry.granularity_bits,
                enabled: s.mem.as_ref().map_or(s.entry.auto, |m| m.is_enabled()),
                in_use: s.entry.in_use,
                state: if s.inconsistent {
                    BitmapState::Inconsistent
                } else {
                    BitmapState::Consistent
                },
                table_size: s.entry.table_size,
            })
            .collect()
    }

    /// The change-map region size of this store's in-memory bitmaps: [`STORE_REGION_SIZE`],
    /// or the cluster size if that is smaller. Either way it divides the cluster size.
    pub fn region_size(&self) -> u64 {
        self.image.cluster_size().min(STORE_REGION_SIZE)
    }

    /// A clean in-memory bitmap of this store's disk at granularity `g`, with the store's
    /// region size.
    fn new_bitmap(&self, g: u64) -> Result<DirtyBitmap> {
        DirtyBitmap::with_region_size(self.disk_size(), g, self.region_size())
    }

    fn geometry(&self) -> Result<ImageGeometry> {
        Ok(self.image.header().geometry()?)
    }

    /// The slot of the bitmap named `name`, compared byte for byte.
    fn find(&self, name: impl AsRef<[u8]>) -> Result<usize> {
        let name = name.as_ref();
        self.slots
            .iter()
            .position(|s| s.entry.name.as_bytes() == name)
            .ok_or_else(|| Error::NotFound(format!("bitmap {:?}", BitmapName::from(name))))
    }

    fn find_consistent(&self, name: impl AsRef<[u8]>) -> Result<usize> {
        let i = self.find(name)?;
        if self.slots[i].inconsistent {
            return Err(Error::Inconsistent {
                name: self.slots[i].entry.name.to_string(),
            });
        }
        Ok(i)
    }

    fn ensure_writable(&self) -> Result<()> {
        if self.poisoned || self.image.is_poisoned() {
            Err(Error::Poisoned)
        } else if self.image.is_writable() {
            Ok(())
        } else {
            Err(Error::ReadOnly)
        }
    }

    /// The in-memory bitmap of an activated store, shared with whoever marks it.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Inconsistent`], or [`Error::InvalidInput`] if the store
    /// is not active.
    pub fn bitmap(&self, name: impl AsRef<[u8]>) -> Result<Arc<DirtyBitmap>> {
        let i = self.find_consistent(name)?;
        self.slots[i]
            .mem
            .clone()
            .ok_or_else(|| invalid_input!("the store is not active; call activate() first"))
    }

    /// A copy of the bitmap: from memory when active or when an incremental
    /// [`inactivate`](Self::inactivate) kept the in-memory copy (which may hold marks made
    /// since, not yet on disk: reading the disk would drop them), otherwise read from disk.
    /// All-zero and all-ones table entries are honoured, and tail bits past the disk are
    /// masked.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Inconsistent`], [`Error::Corrupt`] for a bad table or
    /// data past the end of the file, I/O errors.
    pub fn load(&self, name: impl AsRef<[u8]>) -> Result<DirtyBitmap> {
        let i = self.find_consistent(name)?;
        match self.slots[i].mem.as_ref().or(self.slots[i].parked.as_ref()) {
            Some(m) => Ok(m.snapshot()),
            None => self.load_disk(&self.slots[i].entry),
        }
    }

    fn read_table(&self, entry: &DirEntry) -> Result<Vec<TableEntry>> {
        let len = u64::from(entry.table_size).saturating_mul(8);
        let bytes = read_metadata(
            self.image.storage(),
            "bitmap table",
            entry.table_offset,
            len,
        )?;
        Ok(decode_table(
            &bytes,
            entry.table_size,
            self.image.header().cluster_bits,
        )?)
    }

    fn load_disk(&self, entry: &DirEntry) -> Result<DirtyBitmap> {
        let cs = self.image.cluster_size();
        let bm = self.new_bitmap(1u64 << entry.granularity_bits)?;
        let table = self.read_table(entry)?;
        let clusters = bm.serialized_len().div_ceil(cs);
        if table.len() as u64 != clusters {
            return Err(invalid_input!(
                "bitmap {:?}: table of {} entries for {} clusters of data",
                entry.name,
                table.len(),
                clusters
            ));
        }
        let per_cluster = cs / bm.region_size();
        let mut ones = Vec::new();
        for (c, t) in table.iter().enumerate() {
            let c = c as u64;
            let len = bm
                .serialized_len()
                .saturating_sub(c.saturating_mul(cs))
                .min(cs);
            let data = match *t {
                TableEntry::Zeroes => continue,
                TableEntry::Ones => {
                    ones.resize(len as usize, 0xFF);
                    &ones[..len as usize]
                }
                TableEntry::Data(off) => {
                    &read_metadata(self.image.storage(), "bitmap data", off, len)?[..]
                }
            };
            let first = c.saturating_mul(per_cluster);
            let mut at = 0usize;
            for r in first..first.saturating_add(per_cluster).min(bm.region_count()) {
                let rl = bm.region_len(r) as usize;
                bm.load_region(r, &data[at..at + rl])?;
                at += rl;
            }
        }
        // What was just loaded is what is on disk.
        let _ = bm.take_changed();
        // Not shared yet: no mark can be in flight, so nothing to wait for.
        bm.set_enabled_unshared(entry.auto);
        Ok(bm)
    }

    /// The clusters of `frees` that are safe to release, as byte offsets: each cluster once,
    /// only those that the walk of the last [`preflight`](Self::preflight) found referenced
    /// at most once (by the owner being dropped, which named it), and none whose refcount
    /// is already 0.
    ///
    /// The walk is `Image::check`'s: it counts the header, L1 and L2 tables, guest data,
    /// snapshots, the LUKS header, the refcount structures and every bitmap structure. A
    /// cluster that anything else also references stays allocated: at worst a leak, never a
    /// loss. Clusters allocated since the walk had no reference and refcount 0 then (the
    /// preflight found no corruption, so no referenced cluster has refcount 0), so only
    /// this store references them.
    fn safe_frees(&mut self, frees: Vec<(u64, u64)>) -> Result<Vec<u64>> {
        let cb = self.image.header().cluster_bits;
        let walk = self
            .walk
            .take()
            .ok_or_else(|| invalid_input!("a commit without a preflight"))?;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let r = (|| {
            for (off, n) in frees {
                let first = off >> cb;
                for c in first..first.saturating_add(n) {
                    if seen.insert(c) && walk.at(c << cb) <= 1 && self.image.refcount(c << cb)? > 0
                    {
                        out.push(c << cb);
                    }
                }
            }
            Ok(out)
        })();
        self.walk = Some(walk);
        r
    }

    /// What every operation that writes checks before its first write, so that a refusal
    /// writes nothing:
    /// - the image passes the walk `Image::check` does with no corruption, so every
    ///   cluster anything references has a refcount at least as high, and the allocator
    ///   (which hands out only refcount-0 clusters) can never hand out a referenced one;
    /// - every cluster of the bitmap directory, of each bitmap table and of each consistent
    ///   bitmap's data has exactly one reference and refcount 1: bitmaps are written in
    ///   place, and a cluster shared with another table, another entry or other metadata
    ///   would be overwritten under its other owner.
    ///
    /// One walk over the file's metadata: each table is read once however many entries
    /// name it, so the cost is O(the file's metadata), never O(bitmaps × table). The walk's
    /// counts are kept for the frees of the operation's commit.
    ///
    /// # Errors
    /// [`Corruption::CheckFailed`], [`Corruption::SharedCluster`], I/O.
    fn preflight(&mut self) -> Result<()> {
        self.walk = None;
        let (report, walk) = self.image.references()?;
        if report.corruptions > 0 {
            return Err(Corruption::CheckFailed {
                corruptions: report.corruptions,
                first: report.messages.first().cloned().unwrap_or_default(),
            }
            .into());
        }
        let cs = self.image.cluster_size();
        let mut owned: Vec<(u64, u64, &'static str)> = Vec::new();
        if let Some((off, size)) = self.dir {
            owned.push((off, ceil_clusters(size, cs), "bitmap directory"));
        }
        for s in self.slots.iter().filter(|s| !s.stale) {
            owned.push((
                s.entry.table_offset,
                ceil_clusters(u64::from(s.entry.table_size) * 8, cs),
                "bitmap table",
            ));
            if !s.inconsistent {
                for t in self.read_table(&s.entry)? {
                    if let TableEntry::Data(off) = t {
                        owned.push((off, 1, "bitmap data"));
                    }
                }
            }
        }
        for (off, n, what) in owned {
            for k in 0..n {
                let at = off.saturating_add(k.saturating_mul(cs));
                let references = walk.at(at);
                let refcount = self.image.refcount(at)?;
                if references != 1 || refcount != 1 {
                    return Err(Corruption::SharedCluster {
                        offset: at,
                        what,
                        references,
                        refcount,
                    }
                    .into());
                }
            }
        }
        self.walk = Some(walk);
        Ok(())
    }

    /// Whether cluster 0 still holds the header once the bitmaps extension is there (it
    /// grows by the extension's 24 bytes when the first bitmap is added). Checked before
    /// anything is allocated, so a refusal leaks nothing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the sizes.
    fn ensure_header_fits(&self, nb_bitmaps: u32) -> Result<()> {
        let mut area = self.image.area().clone();
        area.bitmaps = (nb_bitmaps > 0).then_some(BitmapsExtension {
            nb_bitmaps,
            directory_size: 1,
            directory_offset: self.image.cluster_size(),
        });
        area.encode().map(|_| ())
    }

    /// The clusters a bitmap owns: its data clusters, then its table.
    fn owned_clusters(&self, entry: &DirEntry) -> Result<Vec<(u64, u64)>> {
        let cs = self.image.cluster_size();
        let mut out: Vec<(u64, u64)> = self
            .read_table(entry)?
            .into_iter()
            .filter_map(|t| match t {
                TableEntry::Data(off) => Some((off, 1)),
                _ => None,
            })
            .collect();
        out.push((
            entry.table_offset,
            ceil_clusters(u64::from(entry.table_size) * 8, cs),
        ));
        Ok(out)
    }

    /// Writes `bm` into fresh clusters: one data cluster per table entry with a set bit
    /// (zero-filled past the valid bytes), then the table. Returns the table offset. `bm`
    /// has this store's region size.
    fn write_bitmap(&mut self, bm: &DirtyBitmap, stats: &mut FlushStats) -> Result<u64> {
        let cs = self.image.cluster_size();
        let cb = self.image.header().cluster_bits;
        let per_cluster = cs / bm.region_size();
        let clusters = bm.serialized_len().div_ceil(cs);
        let mut entries = Vec::with_capacity(clusters as usize);
        let mut buf = vec![0u8; cs as usize];
        for c in 0..clusters {
            buf.fill(0);
            let first = c * per_cluster;
            let mut at = 0usize;
            for r in first..(first + per_cluster).min(bm.region_count()) {
                let rl = bm.region_len(r) as usize;
                bm.serialize_region(r, &mut buf[at..at + rl])?;
                at += rl;
            }
            if buf.iter().all(|&b| b == 0) {
                entries.push(TableEntry::Zeroes);
            } else {
                let off = self.image.alloc_clusters(1)?;
                self.image.write_at(&buf, off)?;
                entries.push(TableEntry::Data(off));
                stats.clusters_allocated += 1;
                stats.bytes_written += cs;
            }
        }
        stats.regions += bm.region_count();
        let table = encode_table(&entries, cb)?;
        let off = self
            .image
            .alloc_clusters(ceil_clusters(table.len() as u64, cs))?;
        self.image.write_at(&table, off)?;
        stats.bytes_written += table.len() as u64;
        Ok(off)
    }

    /// The directory commit every change goes through:
    /// 1. the new directory into fresh clusters;
    /// 2. refcounts flushed (new clusters durable as allocated);
    /// 3. the header with the new extension (or none) and autoclear bit 0, then a barrier:
    ///    the commit point;
    /// 4. the old directory and `frees` released, refcounts flushed.
    ///
    /// A crash before 3 leaves the old image plus leaked new clusters; after 3, the new
    /// image plus leaked old clusters until 4 is durable.
    fn commit(&mut self, entries: Vec<DirEntry>, frees: Vec<(u64, u64)>) -> Result<()> {
        self.commit_as(entries, frees, true)
    }

    /// [`commit`](Self::commit), with autoclear bit 0 left clear in the header write when
    /// `trusted` is false: the caller cleared it durably before and sets it afterwards
    /// (`resize`, whose header write may tear between the sector holding the size and the
    /// one holding the bitmaps extension).
    fn commit_as(
        &mut self,
        entries: Vec<DirEntry>,
        mut frees: Vec<(u64, u64)>,
        trusted: bool,
    ) -> Result<()> {
        let geo = self.geometry()?;
        let cs = geo.cluster_size();
        if let Some((off, size)) = self.dir {
            frees.push((off, ceil_clusters(size, cs)));
        }
        // Decided before anything is allocated or written, so that nothing after the
        // commit point can fail on bad metadata.
        self.ensure_header_fits(u32::try_from(entries.len()).unwrap_or(u32::MAX))?;
        let frees = self.safe_frees(frees)?;
        let new_dir = if entries.is_empty() {
            None
        } else {
            let bytes = encode_directory(&entries, &geo)?;
            let off = self
                .image
                .alloc_clusters(ceil_clusters(bytes.len() as u64, cs))?;
            self.image.write_at(&bytes, off)?;
            Some((off, bytes.len() as u64))
        };
        self.image.flush_refcounts()?;
        let area = self.image.area_mut();
        match new_dir {
            Some((off, size)) => {
                area.bitmaps = Some(BitmapsExtension {
                    nb_bitmaps: entries.len() as u32,
                    directory_size: size,
                    directory_offset: off,
                });
                if trusted {
                    area.header.autoclear_features |= AUTOCLEAR_BITMAPS;
                }
            }
            None => {
                area.bitmaps = None;
                area.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
            }
        }
        self.image.write_header()?;
        // Committed: the new directory is the one in force, whatever happens next.
        self.dir = new_dir;
        for off in frees {
            self.image.free_clusters(off, 1)?;
        }
        self.image.flush_refcounts()?;
        // Stale entries vanished with the header rewrite; the others match `entries`.
        let mut carried = Vec::new();
        for e in &entries {
            let old = self
                .slots
                .iter_mut()
                .find(|s| !s.stale && s.entry.name == e.name);
            carried.push(old.map_or((None, None, false), |s| {
                (s.mem.take(), s.parked.take(), s.inconsistent)
            }));
        }
        self.slots = entries
            .into_iter()
            .zip(carried)
            .map(|(entry, (mem, parked, inconsistent))| Slot {
                entry,
                inconsistent,
                stale: false,
                mem,
                parked,
            })
            .collect();
        self.publish();
        Ok(())
    }

    /// Publishes the in-memory bitmaps (active or parked) to every tracker taken from this
    /// store. Called after every change of the slots, before the call that changed them
    /// returns, so a mark that starts afterwards reaches every enabled bitmap.
    fn publish(&self) {
        let list: Vec<Arc<DirtyBitmap>> = self
            .slots
            .iter()
            .filter_map(|s| s.mem.as_ref().or(s.parked.as_ref()).cloned())
            .collect();
        self.tracked.store(Arc::new(list));
    }

    fn current_entries(&self) -> Vec<DirEntry> {
        self.slots
            .iter()
            .filter(|s| !s.stale)
            .map(|s| s.entry.clone())
            .collect()
    }

    /// Adds an empty bitmap. `granularity` is a power of two from 512 B to 2 GiB;
    /// `enabled` sets the `auto` flag. On an active store the bitmap is also created in
    /// memory and written with `in_use` set.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a name that is empty, longer than 1023 bytes, holds a
    /// NUL or is taken, a bad granularity, a bitmap above 512 MiB, the 65535-bitmap or the
    /// directory size limit; [`Error::Unsupported`] on a v2 image; [`Error::ReadOnly`]; I/O.
    pub fn add(&mut self, name: &str, granularity: u64, enabled: bool) -> Result<()> {
        self.ensure_writable()?;
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
        let live: Vec<DirEntry> = self.current_entries();
        if live.iter().any(|e| e.name == name) {
            return Err(invalid_input!("bitmap {name:?} already exists"));
        }
        if live.len() as u64 >= u64::from(MAX_BITMAPS) {
            return Err(invalid_input!("the image already holds 65535 bitmaps"));
        }
        let cs = self.image.cluster_size();
        let disk = self.disk_size();
        if disk == 0 {
            return Err(invalid_input!("a 0-byte disk cannot hold a bitmap"));
        }
        let ts = table_size(disk, gbits, cs)?;
        let mut entry = DirEntry {
            name: name.into(),
            table_offset: 0,
            table_size: ts,
            granularity_bits: gbits,
            in_use: self.active,
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
        let mem = if self.active {
            let m = self.new_bitmap(granularity)?;
            m.set_enabled_unshared(enabled);
            Some(Arc::new(m))
        } else {
            None
        };
        self.ensure_header_fits(u32::try_from(live.len() + 1).unwrap_or(u32::MAX))?;
        self.preflight()?;
        // All input is valid and the image is sound: from here on, only I/O can fail.
        let table_bytes = u64::from(ts) * 8;
        let off = self.image.alloc_clusters(ceil_clusters(table_bytes, cs))?;
        self.image.write_at(&vec![0u8; table_bytes as usize], off)?;
        entry.table_offset = off;
        let mut entries = live;
        entries.push(entry);
        self.commit(entries, Vec::new())?;
        if let Some(slot) = self.slots.last_mut() {
            slot.mem = mem;
        }
        self.publish();
        Ok(())
    }

    /// Removes a bitmap, consistent or not, and frees its table and data clusters. The
    /// clusters of a bitmap from an untrusted (stale) directory are never freed: removing
    /// one drops every stale entry (as QEMU does on its first header write), leaking their
    /// clusters until `qemu-img check -r leaks`.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::ReadOnly`], [`Error::Corrupt`] for a consistent bitmap
    /// with a bad table, I/O.
    pub fn remove(&mut self, name: impl AsRef<[u8]>) -> Result<()> {
        self.ensure_writable()?;
        let i = self.find(name)?;
        self.preflight()?;
        let slot = &self.slots[i];
        let frees = if slot.stale {
            Vec::new()
        } else {
            match self.owned_clusters(&slot.entry) {
                Ok(f) => f,
                // An inconsistent bitmap's table may be garbage: free only the table.
                Err(_) if slot.inconsistent => vec![(
                    slot.entry.table_offset,
                    ceil_clusters(
                        u64::from(slot.entry.table_size) * 8,
                        self.image.cluster_size(),
                    ),
                )],
                Err(e) => return Err(e),
            }
        };
        let mut entries = Vec::new();
        for (j, s) in self.slots.iter().enumerate() {
            if j != i && !s.stale {
                entries.push(s.entry.clone());
            }
        }
        self.commit(entries, frees)
    }

    /// Rewrites a bitmap whole, as QEMU stores one: fresh data clusters (only for table
    /// entries with a set bit), a fresh table, a fresh directory, refcounts flushed, the
    /// header commit, then the old clusters freed.
    ///
    /// On an active store the in-memory bitmap is authoritative and I/O threads may be
    /// marking it, so `bitmap`'s bits are ORed into it and nothing is written: replacing it
    /// could drop a concurrent mark, and the disk copy is untrusted (`in_use`) until the
    /// next inactivate writes it. Use [`clear`](Self::clear) to reset a bitmap.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the disk size or granularity differ;
    /// [`Error::NotFound`], [`Error::Inconsistent`], [`Error::ReadOnly`], I/O.
    pub fn store(&mut self, name: impl AsRef<[u8]>, bitmap: &DirtyBitmap) -> Result<()> {
        self.ensure_writable()?;
        let i = self.find_consistent(name)?;
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
            // Active: OR into the authoritative copy, write nothing (see above).
            return m.merge_from(bm);
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

    /// Clears every bit. Active: in memory only (`in_use` protects the disk). Inactive:
    /// stores an empty bitmap.
    ///
    /// # Errors
    /// As [`store`](Self::store).
    pub fn clear(&mut self, name: impl AsRef<[u8]>) -> Result<()> {
        self.ensure_writable()?;
        let i = self.find_consistent(name)?;
        if let Some(m) = &self.slots[i].mem {
            m.clear(0, self.disk_size());
            return Ok(());
        }
        self.preflight()?;
        if let Some(p) = &self.slots[i].parked {
            p.clear(0, self.disk_size());
        }
        let empty = self.new_bitmap(1u64 << self.slots[i].entry.granularity_bits)?;
        self.rewrite(i, &empty, false)
    }

    /// Sets the `auto` flag (QEMU's enabled). Active: in memory, written at inactivation.
    /// Inactive: a new directory is committed, unless the flag already has that value.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Inconsistent`], [`Error::ReadOnly`], I/O.
    pub fn set_enabled(&mut self, name: impl AsRef<[u8]>, enabled: bool) -> Result<()> {
        self.ensure_writable()?;
        let i = self.find_consistent(name)?;
        if let Some(m) = &self.slots[i].mem {
            m.set_enabled(enabled);
            return Ok(());
        }
        if self.slots[i].entry.auto != enabled {
            self.preflight()?;
        }
        if let Some(p) = &self.slots[i].parked {
            p.set_enabled(enabled);
        }
        if self.slots[i].entry.auto == enabled {
            return Ok(());
        }
        let mut entries = self.current_entries();
        entries[i].auto = enabled;
        self.commit(entries, Vec::new())
    }

    /// ORs bitmap `src_name` into `dst_name`, both in this image.
    ///
    /// # Errors
    /// As [`merge_from`](Self::merge_from).
    pub fn merge(&mut self, src_name: impl AsRef<[u8]>, dst_name: impl AsRef<[u8]>) -> Result<()> {
        let src = self.load(src_name)?;
        self.merge_bitmap(&src, dst_name)
    }

    /// ORs bitmap `src_name` of another store into `dst_name` of this one, as
    /// `qemu-img bitmap --merge SRC -b OTHER` does. The granularities may differ: every
    /// dirty extent of the source dirties the granules it touches. The disk sizes must
    /// match.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for different disk sizes; [`Error::NotFound`] or
    /// [`Error::Inconsistent`] for either bitmap; [`Error::ReadOnly`]; I/O.
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
        let i = self.find_consistent(dst_name)?;
        if src.disk_size() != self.disk_size() {
            return Err(invalid_input!(
                "cannot merge a bitmap of a {}-byte disk into one of {} bytes",
                src.disk_size(),
                self.disk_size()
            ));
        }
        let g = 1u64 << self.slots[i].entry.granularity_bits;
        let converted = self.new_bitmap(g)?;
        for (off, len) in src.dirty_extents() {
            converted.mark_dirty(off, len);
        }
        if let Some(m) = &self.slots[i].mem {
            return m.merge_from(&converted);
        }
        self.preflight()?;
        if let Some(p) = &self.slots[i].parked {
            p.merge_from(&converted)?;
        }
        let dst = self.load_disk(&self.slots[i].entry)?;
        dst.merge_from(&converted)?;
        self.rewrite(i, &dst, false)
    }

    /// Marks every consistent bitmap `in_use` on disk and makes its in-memory copy
    /// authoritative, so that a crash from now on leaves it inconsistent rather than falsely
    /// clean. Only the directory's flags words change, in place, with one barrier: each
    /// lies inside one sector, so a torn write leaves every entry old (clean, and no mark
    /// was recorded yet) or new (`in_use`); see `docs/CRASH-CONSISTENCY.md`. (QEMU clears
    /// autoclear bit 0 around the directory write, with three barriers; that sequence is
    /// the fallback should the directory ever differ in more than the flags.) Inconsistent
    /// bitmaps are left alone. Does nothing if already active.
    ///
    /// The in-memory copy is the one kept by the last incremental
    /// [`inactivate`](Self::inactivate) when there is one (a resumed hand-over): it is *not*
    /// reloaded from disk, so every bit it holds survives, including marks made through a
    /// [`Tracker`](crate::Tracker) or an `Arc` while the store was inactive. Those marks sit
    /// in its change map and reach the disk at the next flush or inactivation. Other
    /// consistent bitmaps (first activation, or added while inactive) are loaded from disk.
    ///
    /// Resuming checks first that cluster 0 and the directory are still what this store
    /// last wrote: if another program (a migration target that took the disk over) wrote
    /// them meanwhile, the cached refcounts and tables are stale and the image must be
    /// reopened.
    ///
    /// # Errors
    /// [`Error::ReadOnly`], [`Error::Poisoned`]; [`Error::InvalidInput`] if the image
    /// changed while inactive; load errors as [`load`](Self::load); I/O.
    pub fn activate(&mut self) -> Result<()> {
        self.ensure_writable()?;
        if self.active {
            return Ok(());
        }
        // Every consistent bitmap is about to be held in memory. QEMU caps each at 512 MiB
        // but not their sum; a crafted image with 65535 entries could ask for 32 TiB. The
        // sum is checked before anything is allocated.
        let needed: u64 = self
            .slots
            .iter()
            .filter(|s| !s.inconsistent)
            .map(|s| {
                self.disk_size()
                    .div_ceil(1u64 << s.entry.granularity_bits)
                    .div_ceil(8)
            })
            .fold(0u64, u64::saturating_add);
        if needed > ACTIVE_MEMORY_LIMIT {
            return Err(Error::Unsupported(format!(
                "activating would hold {needed} bytes of bitmaps in memory, more than the \
                 limit of {ACTIVE_MEMORY_LIMIT}"
            )));
        }
        if self.slots.iter().any(|s| s.parked.is_some()) {
            self.ensure_unchanged_since_inactivate()?;
        }
        // From here on bitmaps are written in place: each of their clusters must be theirs
        // alone (see `preflight`), or nothing is written.
        self.preflight()?;
        let mut mems = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            mems.push(if s.inconsistent {
                None
            } else if let Some(p) = &s.parked {
                Some(Arc::clone(p))
            } else {
                Some(Arc::new(self.load_disk(&s.entry)?))
            });
        }
        if mems.iter().any(Option::is_some) {
            let mut entries = self.current_entries();
            for (e, m) in entries.iter_mut().zip(&mems) {
                if m.is_some() {
                    e.in_use = true;
                }
            }
            self.write_flags_in_place(entries)?;
        }
        for (s, m) in self.slots.iter_mut().zip(mems) {
            s.mem = m;
            s.parked = None;
        }
        self.active = true;
        self.publish();
        Ok(())
    }

    /// Resuming parked bitmaps is only safe if nobody else wrote the image's metadata
    /// while it was inactive (another QEMU taking the disk over stores its bitmaps into new
    /// clusters and frees ours, and changes the refcounts this handle caches). Cluster 0 and
    /// the directory must still be byte for byte what this handle last wrote.
    fn ensure_unchanged_since_inactivate(&self) -> Result<()> {
        let changed = || invalid_input!("the image changed while inactive; reopen it");
        let area = self.image.area().encode()?;
        let mut disk = vec![0u8; area.len()];
        self.image.storage().read_exact_at(&mut disk, 0)?;
        if disk != area {
            return Err(changed());
        }
        if let Some((off, size)) = self.dir {
            let ours = encode_directory(&self.current_entries(), &self.geometry()?)?;
            let disk = read_metadata(self.image.storage(), "bitmap directory", off, size)?;
            if disk != ours {
                return Err(changed());
            }
        }
        Ok(())
    }

    /// Rewrites the directory in place with `entries` (same offset and size: only flags
    /// differ), QEMU's `update_ext_header_and_dir_in_place`:
    /// 1. autoclear bit 0 cleared in cluster 0, barrier: from here every bitmap is
    ///    untrusted, so a torn or half-written directory is never read as clean;
    /// 2. the directory in place, barrier;
    /// 3. autoclear bit 0 set, barrier: the new flags are in force.
    fn write_directory_in_place(&mut self, entries: Vec<DirEntry>) -> Result<()> {
        let (dir_off, dir_size) = self
            .dir
            .ok_or_else(|| invalid_input!("consistent bitmaps without a directory"))?;
        let geo = self.geometry()?;
        let bytes = encode_directory(&entries, &geo)?;
        if bytes.len() as u64 != dir_size {
            return Err(invalid_input!("in-place directory changed size"));
        }
        self.image.area_mut().header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        self.image.write_header()?;
        self.image.write_at(&bytes, dir_off)?;
        self.image.sync()?;
        self.image.area_mut().header.autoclear_features |= AUTOCLEAR_BITMAPS;
        self.image.write_header()?;
        for (s, e) in self.slots.iter_mut().filter(|s| !s.stale).zip(entries) {
            s.entry = e;
        }
        Ok(())
    }

    /// Rewrites only the flags of directory entries in place, with one barrier, when a torn
    /// write cannot mix an entry: `entries` must differ from the directory on disk only in
    /// flags, and every entry's changed bytes must lie in one 512-byte sector of the file.
    /// The flags word is 4 bytes at offset 12 of an entry, entries are 8-byte aligned and
    /// the directory starts on a cluster, so the word never straddles a sector; a sector
    /// lands whole or not at all (the crash model of `docs/CRASH-CONSISTENCY.md`, the same
    /// one the header commit relies on). So after a crash every entry reads as wholly old or
    /// wholly new, never a mix, and the caller need not clear autoclear bit 0 around it.
    /// Falls back to [`write_directory_in_place`](Self::write_directory_in_place) (three
    /// barriers) when the check fails.
    ///
    /// The caller must have made durable everything a new entry vouches for before this
    /// (for clearing `in_use`: every data write), since this write may land at any moment.
    fn write_flags_in_place(&mut self, entries: Vec<DirEntry>) -> Result<()> {
        let (dir_off, _) = self
            .dir
            .ok_or_else(|| invalid_input!("consistent bitmaps without a directory"))?;
        let geo = self.geometry()?;
        let old_entries = self.current_entries();
        let old = encode_directory(&old_entries, &geo)?;
        let new = encode_directory(&entries, &geo)?;
        if !flags_only_change(dir_off, &old_entries, &entries, &old, &new) {
            return self.write_directory_in_place(entries);
        }
        self.image.write_at(&new, dir_off)?;
        self.image.sync()?;
        for (s, e) in self.slots.iter_mut().filter(|s| !s.stale).zip(entries) {
            s.entry = e;
        }
        Ok(())
    }

    /// The flush targets of an active store: every in-memory bitmap with its table.
    fn flush_targets(&self) -> Result<Vec<flush::Target>> {
        let mut out = Vec::new();
        for s in &self.slots {
            if let Some(m) = &s.mem {
                out.push(flush::Target {
                    bitmap: Arc::clone(m),
                    table_offset: s.entry.table_offset,
                    table: self.read_table(&s.entry)?,
                });
            }
        }
        Ok(out)
    }

    fn ensure_active(&self) -> Result<()> {
        if self.active {
            Ok(())
        } else {
            Err(invalid_input!(
                "the store is not active; call activate() first"
            ))
        }
    }

    /// Writes only what changed since the last flush, then clears `in_use` in place: the
    /// incremental stop. Call it with the guest stopped. Afterwards every bitmap is on disk,
    /// clean, exactly as QEMU would read it, and the store is inactive.
    ///
    /// Write order (crash reasoning in `docs/CRASH-CONSISTENCY.md`):
    /// 1. the remaining changed regions, as in [`flush`](Self::flush), then a barrier if
    ///    anything was written (still `in_use`: a crash leaves the bitmaps inconsistent);
    /// 2. the directory in place with `in_use` clear and `auto` from each bitmap's enabled
    ///    state, barrier: the commit point. Only the 4-byte flags words change, each inside
    ///    one sector, so a torn write leaves every entry old (`in_use`) or new (clean, its
    ///    data durable since 1). If the directory ever changed otherwise, QEMU's dance
    ///    (autoclear bit 0 cleared, directory, bit 0 set) is used instead.
    ///
    /// Two barriers (one if nothing remained), plus the refcount flush if the remainder
    /// allocates.
    ///
    /// The in-memory bitmaps are kept (parked): [`activate`](Self::activate) resumes them.
    /// Does nothing if not active.
    ///
    /// Call it with the guest stopped; if it is not, the bitmaps are sealed while this runs
    /// (see [`DirtyBitmap::seal`]): a mark that would write waits until the outcome is on
    /// disk and then lands in the parked bitmap, so no mark returns in between.
    ///
    /// # Errors
    /// - [`Error::MarksDuringInactivate`] if a bitmap changed while this ran other than
    ///   through a mark (for example a `merge_from` on its `Arc`): `in_use` is set again
    ///   and the store stays active.
    /// - [`Error::Poisoned`] or I/O: the store is then poisoned and the memory keeps every
    ///   bit. The disk holds `in_use` set or autoclear bit 0 clear (every bitmap loads as
    ///   inconsistent) or, if the final header write reached the disk before the failure,
    ///   the completed state with every bit marked before the call. Never falsely clean.
    pub fn inactivate(&mut self) -> Result<FlushStats> {
        if !self.active {
            return Ok(FlushStats::default());
        }
        self.ensure_writable()?;
        let start = Instant::now();
        let syncs0 = self.image.sync_count();
        let r = self.sealed(Self::inactivate_incremental);
        if matches!(r, Err(ref e) if !matches!(e, Error::MarksDuringInactivate)) {
            self.poisoned = true;
        }
        let mut stats = r?;
        stats.syncs = self.image.sync_count().saturating_sub(syncs0);
        stats.duration = start.elapsed();
        Ok(stats)
    }

    fn inactivate_incremental(&mut self) -> Result<FlushStats> {
        let mut targets = self.flush_targets()?;
        // With its barrier: the data is durable before any entry says clean.
        let stats = flush::flush(&mut self.image, &mut targets, true)?;
        if self.slots.iter().any(|s| s.mem.is_some()) {
            let mut entries = self.current_entries();
            for (e, s) in entries
                .iter_mut()
                .zip(self.slots.iter().filter(|s| !s.stale))
            {
                if let Some(m) = &s.mem {
                    e.in_use = false;
                    e.auto = m.is_enabled();
                }
            }
            self.write_flags_in_place(entries)?;
            self.refuse_late_marks()?;
        }
        self.park();
        Ok(stats)
    }

    /// Runs an inactivation with every in-memory bitmap sealed ([`DirtyBitmap::seal`]):
    /// sealing waits for the marks in flight, so the last take-and-serialize sees every bit
    /// a returned mark relied on (one that found its bit already set may have returned on
    /// another mark's unfinished work), and a mark that would write waits until the outcome
    /// is on disk. So no mark returns, and no guest write it guards goes ahead, between the
    /// last serialize and the durable "clean"; the waiting marks then land in the parked
    /// bitmaps (or, if the inactivation failed, in the still active ones). Unsealed on every
    /// path.
    fn sealed<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let mems: Vec<Arc<DirtyBitmap>> = self.slots.iter().filter_map(|s| s.mem.clone()).collect();
        DirtyBitmap::seal_all(&mems.iter().map(|m| &**m).collect::<Vec<_>>());
        let r = f(self);
        for m in &mems {
            m.unseal();
        }
        r
    }

    /// After an inactivation's commit wrote "clean": a mark that arrived after its region
    /// was taken is in memory only, while the directory says clean. Put `in_use` back (in
    /// place, one barrier) and stay active, so the disk never claims a bit it lacks; the
    /// caller must stop the writers first. Both inactivation paths end with it.
    fn refuse_late_marks(&mut self) -> Result<()> {
        if !self.slots.iter().any(|s| {
            s.mem
                .as_ref()
                .is_some_and(|m| m.changed_region_count() > 0 || m.marks_in_flight())
        }) {
            return Ok(());
        }
        let mut back = self.current_entries();
        for (e, s) in back.iter_mut().zip(self.slots.iter().filter(|s| !s.stale)) {
            if s.mem.is_some() {
                e.in_use = true;
            }
        }
        self.write_flags_in_place(back)?;
        Err(Error::MarksDuringInactivate)
    }

    /// Keeps the in-memory bitmaps for a later [`activate`](Self::activate) and goes
    /// inactive.
    fn park(&mut self) {
        for s in &mut self.slots {
            s.parked = s.mem.take();
        }
        self.active = false;
    }

    /// QEMU's stop (`qcow2_store_persistent_dirty_bitmaps`): stores every in-memory bitmap
    /// whole into fresh clusters and commits one new directory with `in_use` cleared and
    /// `auto` from each bitmap's enabled state, then frees the old clusters. Inconsistent
    /// entries are copied unchanged. Kept as the baseline that the incremental
    /// [`inactivate`](Self::inactivate) is measured against; the result is equivalent. The
    /// in-memory bitmaps are parked as by `inactivate`. Does nothing if not active.
    ///
    /// # Errors
    /// - [`Error::MarksDuringInactivate`] as for [`inactivate`](Self::inactivate), whose
    ///   seal this shares: `in_use` is set again in place and the store stays active.
    /// - I/O errors; the store is then poisoned and the bitmaps stay `in_use` on disk.
    pub fn inactivate_full_rewrite(&mut self) -> Result<FlushStats> {
        if !self.active {
            return Ok(FlushStats::default());
        }
        self.ensure_writable()?;
        let start = Instant::now();
        let syncs0 = self.image.sync_count();
        let mut stats = FlushStats::default();
        let r = self.sealed(|s| {
            s.full_rewrite(&mut stats)?;
            s.refuse_late_marks()
        });
        if matches!(r, Err(ref e) if !matches!(e, Error::MarksDuringInactivate)) {
            self.poisoned = true;
        }
        r?;
        self.park();
        stats.syncs = self.image.sync_count().saturating_sub(syncs0);
        stats.duration = start.elapsed();
        Ok(stats)
    }

    fn full_rewrite(&mut self, stats: &mut FlushStats) -> Result<()> {
        let mut entries = self.current_entries();
        let mut frees = Vec::new();
        let mems: Vec<Option<Arc<DirtyBitmap>>> =
            self.slots.iter().map(|s| s.mem.clone()).collect();
        let mut taken = Vec::new();
        let r = (|| {
            for (i, m) in mems.iter().enumerate() {
                let Some(m) = m else { continue };
                frees.extend(self.owned_clusters(&self.slots[i].entry)?);
                // The whole bitmap is written, so the change map restarts empty; handed
                // back below if anything fails.
                taken.push((Arc::clone(m), m.take_changed()));
                let table = self.write_bitmap(m, stats)?;
                entries[i].table_offset = table;
                entries[i].in_use = false;
                entries[i].auto = m.is_enabled();
            }
            if mems.iter().any(Option::is_some) {
                self.commit(entries, frees)?;
            }
            Ok(())
        })();
        if r.is_err() {
            for (m, t) in &taken {
                m.requeue_changed(t);
            }
        }
        r
    }

    /// [`inactivate`](Self::inactivate)s and hands the image back.
    ///
    /// # Errors
    /// As [`inactivate`](Self::inactivate).
    pub fn close(mut self) -> Result<Image<S>> {
        self.inactivate()?;
        Ok(self.image)
    }
}

/// Whether replacing directory `old` (entries `old_e`) by `new` (entries `new_e`) at file
/// offset `dir_off` changes only flags, with each entry's changed bytes inside one
/// 512-byte sector, so that any sector-torn mix of the two reads every entry as wholly
/// old or wholly new.
fn flags_only_change(
    dir_off: u64,
    old_e: &[DirEntry],
    new_e: &[DirEntry],
    old: &[u8],
    new: &[u8],
) -> bool {
    const SECTOR: u64 = 512;
    if old.len() != new.len() || old_e.len() != new_e.len() {
        return false;
    }
    let same_but_flags = old_e.iter().zip(new_e).all(|(a, b)| {
        a.name == b.name
            && a.table_offset == b.table_offset
            && a.table_size == b.table_size
            && a.granularity_bits == b.granularity_bits
    });
    if !same_but_flags {
        return false;
    }
    let mut at = 0u64;
    for e in old_e {
        let end = at.saturating_add(e.encoded_len());
        let mut sector = None;
        for i in at..end.min(old.len() as u64) {
            if old[i as usize] != new[i as usize] {
                let s = dir_off.saturating_add(i) / SECTOR;
                if *sector.get_or_insert(s) != s {
                    return false;
                }
            }
        }
        at = end;
    }
    true
}

pub mod background;
mod live;
mod resize;
#[cfg(test)]
mod tests;
