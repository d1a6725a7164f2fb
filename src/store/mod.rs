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
//!
//! This file holds the types, [`open`](BitmapStore::open), [`list`](BitmapStore::list) and
//! [`load`](BitmapStore::load); the rest of [`BitmapStore`] is split by concern, each file an
//! `impl` block over the types here:
//! - `commit.rs`: the copy-on-write directory commit, the preflight every write runs first,
//!   the safe frees and the in-place flag writes;
//! - `edit.rs`: add, remove, store, clear, set_enabled, merge;
//! - `lifecycle.rs`: activate, inactivate (incremental, and the full-rewrite baseline), the
//!   seal, close;
//! - `live.rs`: flush, the pending queries, the stop loop and the tracker of an active store;
//! - `resize.rs`: resize;
//! - [`mode`]: the mode the image records for its bitmaps ([`StoreMode`](mode::StoreMode),
//!   [`BitmapStore::mode`]) and the header write of the activations that records it;
//! - [`background`]: the background [`FlushPolicy`](background::FlushPolicy) over a
//!   [`SharedStore`].
//!
//! The children use the types of this file; this file uses nothing of theirs.

use std::sync::Arc;

use crate::bitmap::{ChangedRegions, DirtyBitmap};
use crate::error::{internal, Corruption, Error, Result, StateProblem};
use crate::format::{
    decode_directory, decode_table, encode_directory, BitmapName, BitmapsExtension, DirEntry,
    HeaderArea, ImageGeometry, TableEntry,
};
use crate::image::check::{References, WalkShape};
use crate::image::{check_in_file, read_metadata, Image};
use crate::storage::{OpenMode, Storage};
use crate::tracker::TrackedSet;

/// Most bytes of bitmap data [`BitmapStore::activate`] will hold in memory for one image
/// (16 GiB: 512 bitmaps of a 16 TiB disk at 64 KiB granularity). A durable activation
/// ([`BitmapStore::activate_durable`]) also holds each bitmap's durable bits, an array of the
/// same size (zeroed pages stay unmapped until a bit is set): up to twice this.
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

/// Whether a bitmap records the guest's writes: QEMU's "enabled", the `auto` flag on disk.
/// [`BitmapStore::add`] takes it; [`BitmapStore::set_enabled`] changes it later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Recording {
    /// Every write is recorded (`auto` set).
    Enabled,
    /// No write is recorded (`auto` clear): the bitmap keeps the bits it has.
    Disabled,
}

impl Recording {
    /// Whether writes are recorded.
    #[must_use]
    pub const fn is_enabled(self) -> bool {
        matches!(self, Recording::Enabled)
    }
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

/// The persistent bitmaps of one qcow2 image. See the module docs.
///
/// Call [`close`](Self::close) (or [`inactivate`](Self::inactivate)) on an activated store:
/// dropping it leaves `in_use` set, and the bitmaps load as inconsistent next time.
#[must_use = "an activated store must be closed to save its bitmaps"]
#[derive(Debug)]
pub struct BitmapStore<S: Storage> {
    image: Image<S>,
    slots: slots::Slots,
    /// The trusted directory's `(offset, size)` on disk.
    dir: Option<(u64, u64)>,
    active: bool,
    /// Set when a flush or an inactivation failed part-way: every later write is refused
    /// ([`Error::Poisoned`]) until the image is reopened.
    poisoned: bool,
    /// The next activation may take back an image whose directory differs from what this
    /// handle left only in `in_use` bits a destination set
    /// ([`accept_destination_in_use`](Self::accept_destination_in_use)); taken by it.
    accept_in_use: bool,
    /// Bitmaps the last activation took from its preload as they were, reading none of
    /// their data ([`taken_as_preloaded`](Self::taken_as_preloaded)).
    taken_as_is: usize,
    /// Activations of this handle that succeeded ([`activations`](Self::activations)).
    activations: u64,
    /// How far the running stop has gone towards saying "clean" on disk; read only if it
    /// fails (`lifecycle.rs`, `withdraw_claim`).
    claim: Claim,
    /// A stop failed after it may have written "clean", and nothing could take that back
    /// on disk: the in-memory bitmaps stay sealed ([`marks_held`](Self::marks_held)).
    marks_held: bool,
    /// The reference counts of the last [`preflight`](Self::preflight) (or of the preload
    /// walk it started from). While the store is active it stays valid for deciding frees:
    /// a cluster it counted at most once that a bitmap of this store names is referenced by
    /// no one else now, and one it counted more is kept, a leak at worst (see
    /// `safe_frees`).
    walk: Option<References>,
    /// The header's shape when [`walk`](Self::walk)'s tables were read (`None`: not known,
    /// never reused by [`reusing_walk`](Self::reusing_walk)).
    walk_shape: Option<WalkShape>,
    /// Inside [`reusing_walk`](Self::reusing_walk): an active store's preflight starts from
    /// [`walk`](Self::walk).
    reuse_walk: bool,
    /// The in-memory bitmaps (active or parked) every [`Tracker`](crate::Tracker) taken from
    /// this store marks; republished by [`publish`](Self::publish) whenever the slots change.
    tracked: TrackedSet,
    /// Lists [`publish`](Self::publish) replaced that a mark may still hold (pruned at
    /// each publish): a grace period waits for them (`publish_quiesced`).
    retired: parking_lot::Mutex<Vec<Arc<Vec<Arc<DirtyBitmap>>>>>,
    /// The list of `tracked`, in a list of its own republished with it, for the lock-free
    /// pending estimate of a [`FlushPolicy`](background::FlushPolicy): it follows every
    /// add, checkpoint, remove and activation as a tracker does. Never handed to a tracker:
    /// holding it is no deferred tracker to [`activate_durable`](Self::activate_durable),
    /// and no hold of it delays a grace period (`publish_quiesced`).
    gauge: TrackedSet,
    /// Active in durable mode: the bitmaps' tables and durable bits (`durable.rs`).
    durable: Option<durable_bits::Durable>,
    /// The parked bitmaps come from a durable inactivation: the disk holds every mark
    /// acknowledged on them, and no deferred [`Tracker`](crate::Tracker) marks them.
    parked_durable: bool,
    /// Inactive after a stop that parked the in-memory bitmaps, however many it held (none
    /// is a case too): trackers keep marking the published list and the next activation
    /// resumes from memory, so a bitmap added meanwhile is parked as well. Set by `park`,
    /// cleared by an activation.
    parking: bool,
    /// What every [`DurableTracker`](durable::DurableTracker) of this store marks, across
    /// durable activations.
    durable_set: durable_bits::DurableSet,
    /// The regions written since the last take of the write log, while one runs
    /// (`write_log.rs`).
    write_log: Option<Logging>,
    /// The changed fraction of a bitmap's regions from which a flush writes every region of
    /// its data clusters in place instead of the changed ones alone
    /// ([`set_rewrite_threshold`](Self::set_rewrite_threshold)).
    rewrite_threshold: f64,
    /// Whether this handle holds QEMU's writer locks on the image (`lifecycle.rs`,
    /// `take_writer_locks`).
    writer: WriterLocks,
}

/// Whether a store holds QEMU's writer locks (`Storage::set_writer_locks`). An
/// inactivation releases them so that a migration destination can open the image
/// writable; from then on this handle writes nothing until it takes them back and has
/// checked that nobody else wrote the image meanwhile (`take_writer_locks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriterLocks {
    /// Held since the open, or taken back by an activation.
    Held,
    /// Released by an inactivation.
    Released,
    /// Taken back after an inactivation by an edit of the inactive store; the next
    /// [`BitmapStore::inactivate`] releases them again.
    Reclaimed,
}

/// What became of the image since a handle that handed it over last wrote it
/// ([`BitmapStore::image_since_inactivate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SinceInactivate {
    /// Cluster 0, the directory and every cached refcount are byte for byte what the
    /// handle last wrote (cluster 0: its encoding, the bytes it knows the disk holds, or
    /// bytes that decode to its encoding). Another writer of this crate may still have flushed marks in
    /// place, into clusters the bitmaps already had.
    Unchanged,
    /// As `Unchanged`, but the directory's `in_use` bits differ: another writer activated
    /// the image, and holds it now or died holding it. Marks it holds only in memory are
    /// nowhere on this disk, and it may have written guest data: taken back only by an
    /// activation its caller allowed (`accept_destination_in_use`).
    InUseSet,
    /// Anything else: the handle's cached header, directory, tables or refcounts are
    /// stale.
    Changed,
}

/// How far a stop has gone towards saying "clean" on disk, so that a failure knows what to
/// take back (`lifecycle.rs`, `withdraw_claim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Nothing written says clean: the disk holds `in_use` for every in-memory bitmap.
    Nothing,
    /// The directory's flags, in place, may say clean; the directory has not moved.
    InPlace,
    /// A new directory saying clean may be in force, or the old one: the header may point
    /// to either.
    Relocated,
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

/// The most bytes of adjacent data clusters [`BitmapStore::walk_regions`] reads in one call.
const MAX_READ_RUN: u64 = 4 << 20;

/// What [`BitmapStore::walk_regions`] makes of a table entry that is not a data cluster.
#[derive(Debug, Clone, Copy)]
enum NotData {
    /// All zeros: skipped (a fresh bitmap is clean already); all ones: handed over as
    /// `None`, "every bit set", with no bytes made or read.
    Skip,
    /// Zeros as zeros, ones as ones.
    AsIs,
    /// Timed as the worst case, a data cluster of all ones (see
    /// [`BitmapStore::time_load`]).
    WorstCase,
}

/// Change-map regions of `bm` per cluster of `cs` bytes. A region larger than a cluster is
/// refused ([`Error::Internal`]): walked or written cluster by cluster, such a bitmap would
/// read and write no region at all (every table entry 0: a bitmap written clean). The
/// store's bitmaps have its own region size, which is never larger than a cluster; this
/// holds the walks to that, as the flush engine's `Layout::of` does (and, as there, without
/// the debug build's panic of `internal!`, so that a unit test checks the refusal).
fn regions_per_cluster(cs: u64, bm: &DirtyBitmap) -> Result<u64> {
    match cs / bm.region_size() {
        0 => Err(Error::Internal(format!(
            "a bitmap of {}-byte regions walked in {cs}-byte clusters",
            bm.region_size()
        ))),
        n => Ok(n),
    }
}

/// Time the calling thread has spent waiting on a run queue for a CPU since it started
/// (`/proc/thread-self/schedstat`, second field, in ns), where the kernel reports it.
fn runqueue_wait() -> Option<std::time::Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(std::time::Duration::from_nanos(ns))
}

/// Bitmaps read from an image that another process may still be writing (a migration
/// destination on shared storage, during precopy): a head start for
/// [`BitmapStore::activate_preloaded`], which reads every cluster again and keeps only what
/// the disk says then. Never trusted as is: it was read without the image's locks and may
/// hold bitmaps the writer had `in_use`. Unless it follows the writer's log
/// ([`follow`](Self::follow), [`apply`](Self::apply), see [`WriteLog`]): a bitmap the last
/// log left current is taken as it is, and nothing of it is read again.
#[derive(Debug, Default)]
pub struct Preloaded {
    bitmaps: Vec<PreBitmap>,
    /// Bitmaps whose content replaces the disk's ([`BitmapStore::activate_with`]).
    adopted: Vec<(BitmapName, Arc<DirtyBitmap>)>,
    /// The writer's log this preload follows, and the sequence number of the next log.
    follows: Option<(u64, u64)>,
    /// Durable bits of bitmaps an activate took as current, for its durable state.
    ready_bits: Vec<(Arc<DirtyBitmap>, durable_bits::DurableBits)>,
    /// A bitmap of the directory the preload could not read: the activate loads it whole.
    skipped: bool,
    /// The reference walk the preload made, if it found nothing wrong: the activate's
    /// preflight starts from it instead of walking inside the downtime (`commit.rs`).
    walk: Option<PreWalk>,
}

/// How long [`BitmapStore::preload`] walks the image's metadata at most: a migration
/// destination preloads in the thread that reads the stream, whose source gives up on a
/// send after 10 s by default (`migration::tcp`), and the bitmaps' own load comes on top.
/// A longer walk (2 GiB of L2 tables read from a slow device) is left to the activate, as
/// without a preload, and the preload then does not say it follows.
pub const PRELOAD_WALK_BUDGET: std::time::Duration = std::time::Duration::from_secs(4);

/// A reference walk made by [`BitmapStore::preload`] beside a running writer, and the
/// header shape it read the image's tables from.
#[derive(Debug)]
struct PreWalk {
    refs: References,
    shape: WalkShape,
}

impl Preloaded {
    /// Bitmaps held.
    pub fn len(&self) -> usize {
        self.bitmaps.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.bitmaps.is_empty()
    }

    /// The most regions a bitmap held has (0 when none is held).
    pub fn max_region_count(&self) -> u64 {
        self.bitmaps
            .iter()
            .map(|p| p.bitmap.region_count())
            .max()
            .unwrap_or(0)
    }

    /// Whether it holds a reference walk the activate starts from (see
    /// [`BitmapStore::preload`]): false when the walk found a corruption, ran past its
    /// budget, or read tables the image had moved by its end.
    pub fn has_walk(&self) -> bool {
        self.walk.is_some()
    }

    /// Whether a bitmap named `name` of `region_count` regions is held.
    pub fn holds(&self, name: &[u8], region_count: u64) -> bool {
        self.bitmaps
            .iter()
            .any(|p| p.name.as_bytes() == name && p.bitmap.region_count() == region_count)
    }

    /// How many of the bitmaps held are current: the activate takes them as they are.
    pub fn current(&self) -> usize {
        self.bitmaps.iter().filter(|p| p.current).count()
    }

    /// Takes the bitmap named `name` if it is held with this disk size, granularity and
    /// region size.
    fn take(
        &mut self,
        name: &BitmapName,
        (disk_size, granularity, region_size): (u64, u64, u64),
    ) -> Option<PreBitmap> {
        let i = self.bitmaps.iter().position(|p| {
            p.name == *name
                && p.bitmap.disk_size() == disk_size
                && p.bitmap.granularity() == granularity
                && p.bitmap.region_size() == region_size
        })?;
        Some(self.bitmaps.swap_remove(i))
    }

    /// Takes the bitmap named `name` whose content replaces the disk's, if any.
    fn take_adopted(&mut self, name: &BitmapName) -> Option<Arc<DirtyBitmap>> {
        let i = self.adopted.iter().position(|(n, _)| n == name)?;
        Some(self.adopted.swap_remove(i).1)
    }
}

/// [`BitmapStore::time_load`] in parts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LoadTime {
    /// The reference walk of the activate's preflight.
    pub(crate) walk: std::time::Duration,
    /// Reading and comparing every region of every bitmap.
    pub(crate) regions: std::time::Duration,
    /// How many regions that was.
    pub(crate) region_count: u64,
}

/// The regions of each bitmap a store wrote on disk since its previous log, taken by
/// [`BitmapStore::take_write_log`]. See the [`write_log`] module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteLog {
    /// The id [`BitmapStore::start_write_log`] returned.
    pub id: u64,
    /// 1 for the first take after the start, then 2, 3, ...
    pub seq: u64,
    /// Something other than in-place region writes changed the bitmaps on disk: a reader
    /// must read them whole.
    pub whole: bool,
    /// Taken from an inactive store: the last of its log, with each bitmap's dirty count.
    pub last: bool,
    /// Each bitmap written in place (with [`last`](Self::last): every bitmap the store
    /// held), in directory order.
    pub bitmaps: Vec<LoggedBitmap>,
}

/// One bitmap of a [`WriteLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedBitmap {
    /// Its name.
    pub name: BitmapName,
    /// Where its table is: a region number means something only for this table.
    pub table_offset: u64,
    /// Bytes of bitmap per region, as the writer counts its regions.
    pub region_size: u64,
    /// The regions written.
    pub regions: ChangedRegions,
    /// In the last log ([`WriteLog::last`]): its dirty bits, as the writer left them.
    pub dirty: Option<u64>,
}

/// The log a store keeps between [`BitmapStore::start_write_log`] and its last take
/// (`write_log.rs`).
#[derive(Debug)]
struct Logging {
    id: u64,
    seq: u64,
    whole: bool,
    bitmaps: Vec<LoggedBitmap>,
}

/// One bitmap of a [`Preloaded`], with what is known of it (`write_log.rs`).
#[derive(Debug)]
struct PreBitmap {
    name: BitmapName,
    bitmap: DirtyBitmap,
    /// Its table's offset when it was read.
    table_offset: u64,
    /// Its durable bits, kept equal to `bitmap` ([`Preloaded::prepare_durable`]).
    bits: Option<durable_bits::DurableBits>,
    /// Every log since the preload was applied to it: false once one could not be (its
    /// table moved, its geometry differs, it left the directory).
    intact: bool,
    /// Every log since the preload was applied to it, the last one included, and its
    /// dirty count matched: it equals the disk, and the activate reads none of it.
    current: bool,
}

/// Whether a reader of `named` regions of one data cluster of `per_cluster` regions reads
/// the whole cluster at once (`walk_some_regions`): from a quarter of them on.
fn reads_whole_cluster(named: u64, per_cluster: u64) -> bool {
    named >= per_cluster.div_ceil(4)
}

/// Regions' worth of bytes a reader reads for `regions` of a bitmap of `region_size`-byte
/// regions in `cs`-byte clusters ([`reads_whole_cluster`]).
fn region_reads(regions: &ChangedRegions, region_size: u64, cs: u64) -> u64 {
    let per_cluster = (cs / region_size.max(1)).max(1);
    let group = |n: u64| {
        if n > 0 && reads_whole_cluster(n, per_cluster) {
            per_cluster
        } else {
            n
        }
    };
    let (mut total, mut cluster, mut n) = (0u64, None, 0u64);
    for r in regions.iter() {
        let c = r / per_cluster;
        if cluster != Some(c) {
            total = total.saturating_add(group(n));
            cluster = Some(c);
            n = 0;
        }
        n += 1;
    }
    total.saturating_add(group(n))
}

fn ceil_clusters(bytes: u64, cs: u64) -> u64 {
    bytes.div_ceil(cs)
}

impl<S: Storage> BitmapStore<S> {
    /// Opens the bitmaps of an image, inactive. Reads the header and the directory; writes
    /// nothing. Writable, on an image whose guest data is an external raw file, it holds
    /// that file's locks as a QEMU writer of the image does ([`Storage::hold_data_file`]).
    ///
    /// # Errors
    /// As [`Image::open`]; [`Error::Corrupt`] when the trusted directory breaks one of QEMU's
    /// rules (QEMU refuses to open such an image too), including a consistent bitmap whose
    /// table size differs from the one the disk size needs; writable, [`Error::Locked`]
    /// while another program holds the raw data file writable, and I/O when it cannot be
    /// opened (QEMU refuses to open the image then too).
    pub fn open(storage: S, mode: OpenMode) -> Result<Self> {
        let image = Image::open(storage, mode)?;
        if mode.is_writable() {
            // The raw disk the bitmaps track is locked as a QEMU writer of the image locks
            // it, so that no program honouring QEMU's locks writes it unseen. Only with the
            // incompatible `data_file` bit: without it QEMU reads the guest data from the
            // image itself and ignores the name (`qcow2_do_open`).
            //
            // With the bit and no name, QEMU opens the image only when its user names the
            // raw disk (the `data-file` option; `qcow2_do_open` fails "'data-file' is
            // required for this image" otherwise), and nothing here can name the file to
            // lock: writes from a QEMU writer of that disk would go unseen. Refused.
            if image.header().has_data_file() {
                let Some(name) = image.area().data_file_name() else {
                    return Err(Error::Unsupported(
                        "the image keeps its guest data in an external data file (incompatible \
                         bit 2) but names none: its raw disk cannot be locked, and QEMU opens \
                         it only with a 'data-file' option"
                            .into(),
                    ));
                };
                image.storage().hold_data_file(name)?;
            }
        }
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
                    table: None,
                });
            }
            dir = Some((ext.directory_offset, ext.directory_size));
        } else if let Some(data) = image.stale_bitmaps() {
            // Untrusted: list what it names, all inconsistent; ignore it if it is broken.
            // A read that fails (I/O) is no verdict: it fails the open, or the store would
            // list no bitmap and a commit would drop them without naming them.
            let ext = BitmapsExtension::decode(data, 0, geo.cluster_size()).ok();
            let bytes = match ext.map(|ext| {
                read_metadata(
                    image.storage(),
                    "bitmap directory",
                    ext.directory_offset,
                    ext.directory_size,
                )
            }) {
                Some(Ok(b)) => Some(b),
                Some(Err(Error::Corrupt(_))) | None => None,
                Some(Err(e)) => return Err(e),
            };
            let listed = ext
                .zip(bytes)
                .and_then(|(ext, b)| decode_directory(&b, ext.nb_bitmaps, &geo).ok())
                .unwrap_or_default();
            slots = listed
                .into_iter()
                .map(|entry| Slot {
                    entry,
                    inconsistent: true,
                    stale: true,
                    mem: None,
                    parked: None,
                    table: None,
                })
                .collect();
        }
        Ok(Self {
            image,
            slots: slots.into(),
            dir,
            active: false,
            poisoned: false,
            accept_in_use: false,
            taken_as_is: 0,
            activations: 0,
            claim: Claim::Nothing,
            marks_held: false,
            walk: None,
            walk_shape: None,
            reuse_walk: false,
            tracked: TrackedSet::default(),
            retired: parking_lot::Mutex::default(),
            gauge: TrackedSet::default(),
            durable: None,
            parked_durable: false,
            parking: false,
            durable_set: durable_bits::DurableSet::default(),
            write_log: None,
            rewrite_threshold: crate::flush::DEFAULT_REWRITE_THRESHOLD,
            writer: WriterLocks::Held,
        })
    }

    /// Creates a bitmap-only image (see [`Image::create_bitmap_only`]) and opens it
    /// writable, with no bitmaps.
    ///
    /// # Errors
    /// As [`Image::create_bitmap_only`].
    pub fn create(storage: S, disk_size: u64, cluster_size: u64) -> Result<Self> {
        Ok(Self::with_new_image(Image::create_bitmap_only(
            storage,
            disk_size,
            cluster_size,
        )?))
    }

    /// Creates an image whose guest data is the existing raw file `data_file` (see
    /// [`Image::create_with_data_file`]: the raw file is never written) and opens it
    /// writable, with no bitmaps. The bitmaps added to it track writes to the raw disk,
    /// and QEMU's NBD server exports the disk and its bitmaps together. A writable store
    /// holds the raw file's locks as a QEMU writer of the image does
    /// ([`Storage::hold_data_file`]): no program honouring QEMU's locks writes the raw disk
    /// beside it, unseen by its bitmaps. The writer whose writes the bitmaps track opens
    /// the raw file without QEMU's locks.
    ///
    /// # Errors
    /// As [`Image::create_with_data_file`]; [`Error::Locked`] while another program holds
    /// the raw file writable, and I/O if it cannot be opened, before anything is written.
    pub fn create_with_data_file(
        storage: S,
        disk_size: u64,
        cluster_size: u64,
        data_file: &str,
    ) -> Result<Self> {
        if !data_file.is_empty() && !data_file.contains('\0') {
            // Before anything is written: refused while a QEMU writer holds the raw disk.
            storage.hold_data_file(data_file.as_bytes())?;
        }
        Ok(Self::with_new_image(Image::create_with_data_file(
            storage,
            disk_size,
            cluster_size,
            data_file,
        )?))
    }

    fn with_new_image(image: Image<S>) -> Self {
        Self {
            image,
            slots: slots::Slots::default(),
            dir: None,
            active: false,
            poisoned: false,
            accept_in_use: false,
            taken_as_is: 0,
            activations: 0,
            claim: Claim::Nothing,
            marks_held: false,
            walk: None,
            walk_shape: None,
            reuse_walk: false,
            tracked: TrackedSet::default(),
            retired: parking_lot::Mutex::default(),
            gauge: TrackedSet::default(),
            durable: None,
            parked_durable: false,
            parking: false,
            durable_set: durable_bits::DurableSet::default(),
            write_log: None,
            rewrite_threshold: crate::flush::DEFAULT_REWRITE_THRESHOLD,
            writer: WriterLocks::Held,
        }
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

    /// The granularity QEMU gives a bitmap added without one on this image
    /// (`block-dirty-bitmap-add`, `qemu-img bitmap --add` without `-g` or with `-g 0`): the
    /// cluster size, kept within 4 KiB to 64 KiB (`bdrv_get_default_bitmap_granularity`).
    pub fn default_granularity(&self) -> u64 {
        self.image.cluster_size().clamp(4 << 10, 64 << 10)
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
        self.slots.position(name).ok_or_else(|| Error::NotFound {
            name: BitmapName::from(name),
        })
    }

    fn find_consistent(&self, name: impl AsRef<[u8]>) -> Result<usize> {
        let i = self.find(name)?;
        if self.slots[i].inconsistent {
            return Err(Error::Inconsistent {
                name: self.slots[i].entry.name.clone(),
            });
        }
        Ok(i)
    }

    /// [`Error::Arriving`] while slot `i`'s in-memory bitmap (active or parked) is still
    /// incomplete (`DirtyBitmap::hold_incomplete`: a migration destination's bitmap while
    /// the source's postcopy push runs): a copy of it would lack bits still on their way,
    /// and so would the disk after a stop; a bitmap removed or disabled now would take the
    /// late bits where no reader looks.
    fn ensure_arrived(&self, i: usize) -> Result<()> {
        let s = &self.slots[i];
        if s.mem
            .iter()
            .chain(s.parked.iter())
            .any(|m| m.is_incomplete())
        {
            return Err(Error::Arriving {
                name: s.entry.name.clone(),
            });
        }
        Ok(())
    }

    /// Refuses to drop slot `i`'s in-memory bitmap (active or parked) while a
    /// [`ChangeConsumer`](crate::ChangeConsumer) of it exists: every consumer of a bitmap
    /// this store holds reads a bitmap its trackers mark.
    fn ensure_not_busy(&self, i: usize) -> Result<()> {
        self.ensure_arrived(i)?;
        let s = &self.slots[i];
        if s.mem
            .iter()
            .chain(s.parked.iter())
            .any(|m| m.consumer_count() > 0)
        {
            return Err(Error::Busy {
                name: s.entry.name.clone(),
            });
        }
        Ok(())
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
    /// Its primary change map is the store's flusher's: watch changes with
    /// [`DirtyBitmap::add_consumer`], not [`DirtyBitmap::take_changed`] (a take, or a
    /// [`DirtyBitmap::load_region`], makes the next flush or stop write every region of the
    /// bitmap, since the store can no longer tell which changed).
    ///
    /// Refused while the store is active in durable mode: the handle could clear, take or
    /// disable the bitmap behind the durable bits (`durable.rs`), which would then vouch
    /// for granules neither memory nor the disk holds any more, and a later intent on them
    /// would be acknowledged with no bit anywhere. There marks go through
    /// [`SharedStore::durable_tracker`], changes through the store's own calls
    /// ([`clear`](Self::clear), [`set_enabled`](Self::set_enabled), ...), and reads through
    /// [`load`](Self::load), a copy.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Inconsistent`], or [`Error::WrongState`]
    /// ([`StateProblem::NotActive`]) if the store is not active, ([`StateProblem::Durable`])
    /// if it is active in durable mode.
    pub fn bitmap(&self, name: impl AsRef<[u8]>) -> Result<Arc<DirtyBitmap>> {
        let i = self.find_consistent(name)?;
        self.ensure_not_durable()?;
        self.slots[i]
            .mem
            .clone()
            .ok_or(Error::WrongState(StateProblem::NotActive))
    }

    /// A copy of the bitmap: from memory when active or when an incremental
    /// [`inactivate`](Self::inactivate) kept the in-memory copy (which may hold marks made
    /// since, not yet on disk: reading the disk would drop them), otherwise read from disk.
    /// All-zero and all-ones table entries are honoured, and tail bits past the disk are
    /// masked.
    ///
    /// A store that handed the image over (its inactivation released the writer locks,
    /// and no activation or edit took them back) reads without taking them. If the image
    /// is still as it left it (cluster 0, the directory but its `in_use` bits, the
    /// refcounts), the kept copy gets what the disk holds ORed in, as a resume does:
    /// another writer of this crate flushes its marks in place. If another writer changed
    /// the image otherwise, the kept copy is returned as it is (what this handle holds;
    /// that writer's marks are not in it). A bitmap with no kept copy is read from disk
    /// only while the image is as the store left it, `in_use` bits included.
    /// [`changed_since`](Self::changed_since), which a backup copies by, refuses the doubt
    /// instead.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Inconsistent`], [`Error::Corrupt`] for a bad table or
    /// data past the end of the file, I/O errors; [`Error::WrongState`]
    /// ([`StateProblem::ChangedWhileInactive`]) for a bitmap with no kept copy on a store
    /// that handed the image over, once another writer activated or changed the image;
    /// [`Error::Arriving`] while its bits are still arriving (a migration destination's
    /// bitmap during the source's postcopy push).
    pub fn load(&self, name: impl AsRef<[u8]>) -> Result<DirtyBitmap> {
        let i = self.find_consistent(name)?;
        self.load_slot(i, self.handed_over()?)
    }

    /// What became of the image, if this store handed it over
    /// ([`image_since_inactivate`](Self::image_since_inactivate)); `None` while it holds the
    /// writer locks (since its open, or taken back), when its caches are the image's.
    fn handed_over(&self) -> Result<Option<SinceInactivate>> {
        if self.writer == WriterLocks::Released {
            self.image_since_inactivate().map(Some)
        } else {
            Ok(None)
        }
    }

    /// [`load`](Self::load) of slot `i` (consistent), `since` as
    /// [`handed_over`](Self::handed_over) found it.
    fn load_slot(&self, i: usize, since: Option<SinceInactivate>) -> Result<DirtyBitmap> {
        self.ensure_arrived(i)?;
        let s = &self.slots[i];
        match (s.mem.as_ref().or(s.parked.as_ref()), since) {
            (Some(m), None | Some(SinceInactivate::Changed)) => Ok(m.snapshot()),
            (Some(m), Some(SinceInactivate::Unchanged | SinceInactivate::InUseSet)) => {
                // The cached table is still the bitmap's: what another writer flushed in
                // place is read through it.
                let copy = m.snapshot();
                self.merge_disk_into(&s.entry, &copy)?;
                Ok(copy)
            }
            (None, None | Some(SinceInactivate::Unchanged)) => self.load_disk(&s.entry),
            // Nothing of it in memory, and the disk is another writer's: the cached table
            // may name freed clusters, and `in_use` says the bits are not all there.
            (None, Some(SinceInactivate::InUseSet | SinceInactivate::Changed)) => {
                Err(Error::WrongState(StateProblem::ChangedWhileInactive))
            }
        }
    }

    /// What another writer left of the image this handle last wrote: cluster 0 and the
    /// directory compared byte for byte with what it would write from its caches, and
    /// every refcount it caches with the disk's. Reads only, and takes no lock.
    ///
    /// Cluster 0 may also be byte for byte what this handle knows the disk holds
    /// (`Image::known_cluster0_is`: read at the open, or written since), or decode to what
    /// it would write (the same bytes once encoded again), when the disk is not its own
    /// encoding: a header write moving the backing file name that a process crash cut
    /// short (`Image::put_header_moving_name`) leaves the name at a spare place, or a stray
    /// copy of it, and a QEMU destination lays cluster 0 out its own way (unknown
    /// extensions in reverse order: they compare as a set). Every field a bitmap, a refcount or the guest depends
    /// on is in the decoded area; a writer that changed the directory or a refcount is
    /// caught below, and one that set `in_use` is taken back only by a fail-back the
    /// caller allowed (`accept_destination_in_use`).
    fn image_since_inactivate(&self) -> Result<SinceInactivate> {
        let area = self.image.area().encode()?;
        let mut disk = vec![0u8; area.len()];
        self.image.storage().read_exact_at(&mut disk, 0)?;
        // Unknown extensions compare as a set: QEMU writes them back in reverse order.
        let canonical = |mut a: HeaderArea| {
            a.unknown
                .sort_by(|x, y| (x.kind, &x.data).cmp(&(y.kind, &y.data)));
            a.encode().ok()
        };
        if disk != area
            && !self.image.known_cluster0_is(&disk)
            && HeaderArea::decode(&disk)
                .ok()
                .and_then(canonical)
                .is_none_or(|d| Some(d) != canonical(self.image.area().clone()))
        {
            return Ok(SinceInactivate::Changed);
        }
        let mut since = SinceInactivate::Unchanged;
        if let Some((off, size)) = self.dir {
            let entries = self.current_entries();
            let ours = encode_directory(&entries, &self.geometry()?)?;
            let disk = read_metadata(self.image.storage(), "bitmap directory", off, size)?;
            if disk != ours {
                if !same_but_in_use(&entries, &ours, &disk) {
                    return Ok(SinceInactivate::Changed);
                }
                since = SinceInactivate::InUseSet;
            }
        }
        // A writer that kept cluster 0 and the directory (one of this crate, flushing in
        // place) may still have allocated clusters: the cached refcounts would then hand
        // them out again.
        if !self.image.refcounts_match_disk()? {
            return Ok(SinceInactivate::Changed);
        }
        Ok(since)
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
        let bm = self.new_bitmap(1u64 << entry.granularity_bits)?;
        self.walk_regions(entry, &bm, NotData::Skip, |r, bytes| {
            bm.load_region_unshared(r, bytes)
        })?;
        // What was just loaded is what is on disk.
        let _ = bm.take_primary();
        // Not shared yet: no mark can be in flight, so nothing to wait for.
        bm.set_enabled_unshared(entry.auto);
        Ok(bm)
    }

    /// Calls `f(region, bytes)` for the regions of `entry`'s bitmap (`bm` has its
    /// geometry), cluster by cluster from its table: a data cluster as read from disk, and
    /// a cluster that is not data as `not_data` says.
    fn walk_regions(
        &self,
        entry: &DirEntry,
        bm: &DirtyBitmap,
        not_data: NotData,
        mut f: impl FnMut(u64, Option<&[u8]>) -> Result<()>,
    ) -> Result<()> {
        let cs = self.image.cluster_size();
        let clusters = bm.serialized_len().div_ceil(cs);
        // Before the read: the size of an in-use entry's table is not checked at open (QEMU
        // reads none), and a wrong one would be read whole first, up to 8 MiB an entry. Such
        // an entry is what its flag says, inconsistent (a preload leaves it out); a
        // consistent one's size was checked at open.
        if u64::from(entry.table_size) != clusters {
            if entry.in_use {
                return Err(Error::Inconsistent {
                    name: entry.name.clone(),
                });
            }
            return Err(internal!(
                "bitmap {:?}: table of {} entries for {} clusters of data",
                entry.name,
                entry.table_size,
                clusters
            ));
        }
        let table = self.read_table(entry)?;
        if table.len() as u64 != clusters {
            return Err(internal!(
                "bitmap {:?}: table of {} entries for {} clusters of data",
                entry.name,
                table.len(),
                clusters
            ));
        }
        let per_cluster = regions_per_cluster(cs, bm)?;
        let ser = bm.serialized_len();
        let len_of = |c: u64| ser.saturating_sub(c.saturating_mul(cs)).min(cs);
        let file_len = self.image.storage().len()?;
        let mut fill = Vec::new();
        // The last read: data clusters `first..first + n`, back to back in the file.
        let mut run: (u64, u64, Vec<u8>) = (0, 0, Vec::new());
        for (c, t) in table.iter().enumerate() {
            let c = c as u64;
            let len = len_of(c);
            let data = match (*t, not_data) {
                (TableEntry::Data(off), _) => {
                    if !(run.0..run.0.saturating_add(run.1)).contains(&c) {
                        // Data clusters that follow each other in the file (as a bitmap
                        // written in one go lays them out) are read in one call, up to
                        // MAX_READ_RUN bytes; a run that would pass the file's end is
                        // read cluster by cluster, so the error names the cluster.
                        let mut n = 1u64;
                        while n.saturating_mul(cs) < MAX_READ_RUN
                            && table.get((c + n) as usize)
                                == Some(&TableEntry::Data(off.saturating_add(n.saturating_mul(cs))))
                        {
                            n += 1;
                        }
                        let mut bytes =
                            (n - 1).saturating_mul(cs).saturating_add(len_of(c + n - 1));
                        if off.saturating_add(bytes) > file_len {
                            n = 1;
                            bytes = len;
                        }
                        // One buffer for every run: a fresh one of megabytes would be
                        // faulted in and zeroed again each time.
                        check_in_file("bitmap data", off, bytes, file_len)?;
                        run.2.resize(bytes as usize, 0);
                        self.image.storage().read_exact_at(&mut run.2, off)?;
                        run.0 = c;
                        run.1 = n;
                    }
                    let at = ((c - run.0) * cs) as usize;
                    Some(&run.2[at..at + len as usize])
                }
                (TableEntry::Zeroes, NotData::Skip) => continue,
                (TableEntry::Ones, NotData::Skip) => None,
                (TableEntry::Zeroes, NotData::AsIs) => {
                    fill.clear();
                    fill.resize(len as usize, 0);
                    Some(&fill[..])
                }
                (TableEntry::Ones, NotData::AsIs) => {
                    fill.clear();
                    fill.resize(len as usize, 0xFF);
                    Some(&fill[..])
                }
                (_, NotData::WorstCase) => {
                    // A cluster-sized read (of the header cluster, which always exists)
                    // and a cluster of all ones.
                    let _ = read_metadata(self.image.storage(), "image header", 0, len)?;
                    fill.clear();
                    fill.resize(len as usize, 0xFF);
                    Some(&fill[..])
                }
            };
            let first = c.saturating_mul(per_cluster);
            let mut at = 0usize;
            for r in first..first.saturating_add(per_cluster).min(bm.region_count()) {
                let rl = bm.region_len(r) as usize;
                f(r, data.map(|d| &d[at..at + rl]))?;
                at += rl;
            }
        }
        Ok(())
    }

    /// As [`walk_regions`](Self::walk_regions) with [`NotData::AsIs`], but only the
    /// regions `regions` names (of `bm`'s geometry): each is read alone, or its cluster
    /// whole when a quarter of the cluster's regions or more are named.
    fn walk_some_regions(
        &self,
        entry: &DirEntry,
        bm: &DirtyBitmap,
        regions: &crate::bitmap::ChangedRegions,
        mut f: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let cs = self.image.cluster_size();
        let table = self.read_table(entry)?;
        if table.len() as u64 != bm.serialized_len().div_ceil(cs)
            || regions.region_count() != bm.region_count()
        {
            return Err(internal!(
                "bitmap {:?}: table of {} entries, {} regions named, for a bitmap of {} \
                 regions",
                entry.name,
                table.len(),
                regions.region_count(),
                bm.region_count()
            ));
        }
        let per_cluster = (cs / bm.region_size()).max(1);
        let named: Vec<u64> = regions.iter().collect();
        let mut fill = Vec::new();
        for group in named.chunk_by(|a, b| a / per_cluster == b / per_cluster) {
            let c = group[0] / per_cluster;
            let first = c.saturating_mul(per_cluster);
            let entry_c = usize::try_from(c)
                .ok()
                .and_then(|i| table.get(i))
                .copied()
                .ok_or_else(|| internal!("region {} past the table", group[0]))?;
            let whole = reads_whole_cluster(group.len() as u64, per_cluster);
            match entry_c {
                TableEntry::Data(off) if whole => {
                    let len = bm
                        .serialized_len()
                        .saturating_sub(c.saturating_mul(cs))
                        .min(cs);
                    let data = read_metadata(self.image.storage(), "bitmap data", off, len)?;
                    for &r in group {
                        let at = ((r - first) * bm.region_size()) as usize;
                        let rl = bm.region_len(r) as usize;
                        let bytes = data
                            .get(at..at.saturating_add(rl))
                            .ok_or_else(|| internal!("region {r} past its cluster"))?;
                        f(r, bytes)?;
                    }
                }
                TableEntry::Data(off) => {
                    for &r in group {
                        let at = off.saturating_add((r - first) * bm.region_size());
                        let data = read_metadata(
                            self.image.storage(),
                            "bitmap data",
                            at,
                            bm.region_len(r),
                        )?;
                        f(r, &data)?;
                    }
                }
                TableEntry::Zeroes | TableEntry::Ones => {
                    let byte = if entry_c == TableEntry::Ones { 0xFF } else { 0 };
                    for &r in group {
                        fill.clear();
                        fill.resize(bm.region_len(r) as usize, byte);
                        f(r, &fill)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses, before anything is read, to build every consistent bitmap of the image
    /// one after another plus `extra` more bytes of bitmap (what
    /// [`changed_since`](Self::changed_since) and `dbm info` do) when their sizes add up
    /// to more than [`ACTIVE_MEMORY_LIMIT`], the most an activation may hold: QEMU caps
    /// each bitmap at 512 MiB but not their number, and 65535 entries naming one table
    /// would cost 65535 builds of it. The sizes are a budget of work here, as the memory
    /// is released between builds.
    ///
    /// # Errors
    /// [`Error::Unsupported`], as [`activate`](Self::activate) refuses the same image.
    pub fn ensure_loadable_in_turn(&self, extra: u64) -> Result<()> {
        let needed = self
            .memory_needed(self.slots.iter().filter(|s| !s.inconsistent))
            .saturating_add(extra);
        if needed > ACTIVE_MEMORY_LIMIT {
            return Err(Error::Unsupported(format!(
                "loading every bitmap would build {needed} bytes of bitmaps, more than the \
                 limit of {ACTIVE_MEMORY_LIMIT}"
            )));
        }
        Ok(())
    }

    /// Bytes of memory the bitmaps of `slots` take when held.
    fn memory_needed<'a>(&self, slots: impl Iterator<Item = &'a Slot>) -> u64 {
        slots
            .map(|s| {
                self.disk_size()
                    .div_ceil(1u64 << s.entry.granularity_bits)
                    .div_ceil(8)
            })
            .fold(0u64, u64::saturating_add)
    }

    /// Reads every bitmap of the directory, `in_use` or not, as it is on disk now, for a
    /// later [`activate_preloaded`](Self::activate_preloaded) of the same image by a store
    /// opened writable (a migration destination reads here while the source still runs
    /// and writes the image: open this store with
    /// [`FileStorage::open_shared`](crate::FileStorage::open_shared)). A bitmap whose table
    /// does not read is left out; the activate then loads it whole. Writes nothing.
    ///
    /// It also makes the reference walk the activate's preflight would make (every L1 and
    /// L2 table, the refcounts: O(the image's metadata), seconds for a 16 TiB disk full of
    /// data), so that the activate, inside a migration's downtime, makes none while the
    /// header still locates the tables where this walk read them. A walk that finds any
    /// corruption, or runs past [`PRELOAD_WALK_BUDGET`], is not kept: the activate walks
    /// then, and judges.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the bitmaps would take more memory than an activate
    /// allows (the same limit).
    pub fn preload(&self) -> Result<Preloaded> {
        self.preload_within(PRELOAD_WALK_BUDGET)
    }

    /// [`preload`](Self::preload), with its reference walk given up after `walk_budget`.
    ///
    /// # Errors
    /// As [`preload`](Self::preload).
    pub fn preload_within(&self, walk_budget: std::time::Duration) -> Result<Preloaded> {
        let live: Vec<&Slot> = self.slots.iter().filter(|s| !s.stale).collect();
        let needed = self.memory_needed(live.iter().copied());
        if needed > ACTIVE_MEMORY_LIMIT {
            return Err(Error::Unsupported(format!(
                "preloading would hold {needed} bytes of bitmaps in memory, more than the \
                 limit of {ACTIVE_MEMORY_LIMIT}"
            )));
        }
        let mut pre = Preloaded::default();
        for s in live {
            let Ok(bm) = self.load_disk(&s.entry) else {
                pre.skipped = true;
                continue;
            };
            // The disk may still be mostly clean (a migration that starts soon after the
            // bitmaps did): fault the pages in now, not in the refresh.
            bm.prefault_unshared();
            pre.bitmaps.push(PreBitmap {
                name: s.entry.name.clone(),
                bitmap: bm,
                table_offset: s.entry.table_offset,
                bits: None,
                intact: true,
                current: false,
            });
        }
        pre.walk = self.prewalk(walk_budget);
        Ok(pre)
    }

    /// The reference walk of [`preload`](Self::preload) alone, holding no bitmap, given
    /// up after `walk_budget`: for an activation that takes the bitmaps it changes from
    /// elsewhere ([`activate_with_preloaded`](Self::activate_with_preloaded), a migration
    /// destination whose bitmaps come over the stream) while another process may still
    /// write the image (a mirror filling the destination's disk during precopy). Kept, as
    /// `preload` keeps its walk, only if it found no corruption and the header's shape did
    /// not change while it ran; [`Preloaded::has_walk`] says which. Writes nothing.
    pub fn preload_walk_within(&self, walk_budget: std::time::Duration) -> Preloaded {
        Preloaded {
            walk: self.prewalk(walk_budget),
            ..Preloaded::default()
        }
    }

    /// The preflight's reference walk, made now (during a migration's precopy, beside the
    /// writer), for the activate to start from: `None` if it fails, runs past `budget`,
    /// finds any corruption, or the header's shape changed while it ran (it then read
    /// tables the image no longer has). A walk beside a writer may also find what is only a writer's step half done
    /// (an L2 entry read before a discard cleared it and its refcount read after): it is
    /// then dropped too, and the activate walks.
    fn prewalk(&self, budget: std::time::Duration) -> Option<PreWalk> {
        let shape = WalkShape::of(self.image.header());
        let (report, refs) = self.image.references_within(budget).ok()?;
        (report.corruptions == 0 && self.image.walk_shape_now().ok()? == shape)
            .then_some(PreWalk { refs, shape })
    }

    /// Loads `entry` into `held` (a preloaded bitmap of the same geometry, not shared):
    /// every region is set from the disk as it is now, word for word, so the result is
    /// what [`load_disk`](Self::load_disk) would return; only the words that differ are
    /// written, and no memory is allocated or faulted in.
    /// ORs what the disk holds of `entry`'s bitmap into `held` (its geometry), beside
    /// concurrent marks: every bit of either stays set.
    fn merge_disk_into(&self, entry: &DirEntry, held: &DirtyBitmap) -> Result<()> {
        let mut ones = Vec::new();
        self.walk_regions(entry, held, NotData::Skip, |r, bytes| {
            let at = r.saturating_mul(held.region_size());
            match bytes {
                Some(b) => held.or_serialized(at, b),
                None => {
                    ones.clear();
                    ones.resize(held.region_len(r) as usize, 0xFF);
                    held.or_serialized(at, &ones)
                }
            }
        })
    }

    fn refresh_disk(&self, entry: &DirEntry, held: DirtyBitmap) -> Result<DirtyBitmap> {
        self.walk_regions(entry, &held, NotData::AsIs, |r, bytes| {
            held.load_region_unflagged(r, bytes.ok_or_else(|| internal!("region {r} not read"))?)
                .map(drop)
        })?;
        let _ = held.take_primary();
        held.set_enabled_unshared(entry.auto);
        Ok(held)
    }

    /// Times what loading this image's bitmaps costs another process's activate of the
    /// same image, on a CPU of its own: the wall time less the time this thread waited for
    /// a CPU meanwhile (Linux's per-thread scheduler statistics; elsewhere the wall time),
    /// since the source that asks shares its CPUs with its running guest and the
    /// destination loads while that guest is stopped. The other process is a migration
    /// destination on shared storage, which
    /// [`preload`](Self::preload)s them during precopy and then
    /// [`activate_preloaded`](Self::activate_preloaded)s; what is timed: the reference
    /// walk of its preflight, then every cluster of every bitmap held in memory or consistent on disk
    /// read and compared, region by region, with a bitmap that holds about the same
    /// content (this store's own in-memory bitmap, read only; the words that differ are
    /// what the refresh writes, a few against the many it compares). A bitmap not in
    /// memory here is timed as a whole load into fresh memory. A table entry that is not a
    /// data cluster now may be one by the time the other process loads (a guest writing
    /// meanwhile), so it is timed as a cluster-sized read (of the header cluster, which
    /// always exists) of all ones. Writes nothing and changes nothing in this store. A
    /// migration's switchover rule counts the result as downtime (see
    /// [`SharedDiskState`](crate::migration::SharedDiskState)).
    ///
    /// # Errors
    /// As [`load`](Self::load) from disk.
    pub fn time_load(&self) -> Result<std::time::Duration> {
        self.time_load_parts()
            .map(|t| t.walk.saturating_add(t.regions))
    }

    /// The reads, in regions' worth of bytes, beyond the regions it loads, of an activate
    /// that starts from a preload's reference walk (`preflight_from` in `commit.rs`), of the
    /// writable open before it and of the last log's apply: the open's first read of cluster
    /// 0, its refcount table and its directory; the header's sector at the apply and at the
    /// activate; every bitmap's table at each (their clusters are checked, the logged
    /// regions read through them), and once more in durable mode (the activation's flush
    /// targets); and the refcount blocks behind the bitmaps' clusters, at most one per
    /// bitmap cluster and at most every block the file needs.
    ///
    /// # Errors
    /// I/O asking the file's length.
    pub(crate) fn activate_check_reads(&self) -> Result<u64> {
        let h = self.image.header();
        let cs = self.image.cluster_size();
        let regions = |bytes: u64| bytes.div_ceil(self.region_size().max(1)).max(1);
        let per_block = (cs.saturating_mul(8) >> h.refcount_order).max(1);
        let len = self.image.storage().len()?;
        let file_blocks = len.div_ceil(cs.saturating_mul(per_block));
        // The open's first read of cluster 0, and all of it again when it is larger.
        let cluster0 = len.min(cs);
        let open = regions(len.min(crate::image::FIRST_READ))
            .saturating_add(if cluster0 > crate::image::FIRST_READ {
                regions(cluster0)
            } else {
                0
            })
            .saturating_add(regions(
                u64::from(h.refcount_table_clusters).saturating_mul(cs),
            ))
            .saturating_add(self.dir.map_or(0, |(_, n)| regions(n)));
        let table_reads: u64 = if self.durable.is_some() { 3 } else { 2 };
        let (mut tables, mut clusters) = (0u64, self.dir.map_or(0, |(_, n)| n.div_ceil(cs)));
        for s in self.slots.iter().filter(|s| !s.stale) {
            let entries = u64::from(s.entry.table_size);
            tables = tables.saturating_add(self.table_regions(entries).saturating_mul(table_reads));
            clusters = clusters
                .saturating_add(entries.saturating_mul(8).div_ceil(cs))
                .saturating_add(entries);
        }
        let blocks = file_blocks.min(clusters).saturating_mul(regions(cs));
        Ok(open
            .saturating_add(2)
            .saturating_add(tables)
            .saturating_add(blocks))
    }

    /// Regions' worth of bytes in a whole bitmap table of `entries` entries, at least one:
    /// what a read of that table costs in the destination's figures.
    pub(crate) fn table_regions(&self, entries: u64) -> u64 {
        entries
            .saturating_mul(8)
            .div_ceil(self.region_size().max(1))
            .max(1)
    }

    /// [`time_load`](Self::time_load), in its two parts: the reference walk, and the
    /// regions of every bitmap (of which there are `region_count`).
    pub(crate) fn time_load_parts(&self) -> Result<LoadTime> {
        let start = std::time::Instant::now();
        let waited = runqueue_wait();
        let _ = self.image.references()?;
        let walk = start.elapsed();
        let mut region_count = 0u64;
        for s in &self.slots {
            if s.stale || (s.mem.is_none() && s.parked.is_none() && s.inconsistent) {
                continue;
            }
            match s.mem.as_ref().or(s.parked.as_ref()) {
                Some(m) => {
                    region_count = region_count.saturating_add(m.region_count());
                    self.walk_regions(&s.entry, m, NotData::WorstCase, |r, bytes| {
                        let bytes = bytes.ok_or_else(|| internal!("region {r} not read"))?;
                        std::hint::black_box(m.region_equals(r, bytes)?);
                        Ok(())
                    })?;
                }
                None => {
                    let fresh = self.new_bitmap(1u64 << s.entry.granularity_bits)?;
                    region_count = region_count.saturating_add(fresh.region_count());
                    self.walk_regions(&s.entry, &fresh, NotData::WorstCase, |r, bytes| {
                        fresh.load_region_unshared(r, bytes)
                    })?;
                }
            }
        }
        let wall = start.elapsed();
        let wall = match (waited, runqueue_wait()) {
            (Some(a), Some(b)) => wall.saturating_sub(b.saturating_sub(a)),
            _ => wall,
        };
        Ok(LoadTime {
            walk,
            regions: wall.saturating_sub(walk),
            region_count,
        })
    }

    /// Publishes the in-memory bitmaps (active or parked) to every tracker taken from this
    /// store. Called after every change of the slots, before the call that changed them
    /// returns, so a mark that starts afterwards reaches every enabled bitmap.
    fn publish(&self) {
        let old = self.swap_published();
        let mut retired = self.retired.lock();
        retired.retain(|l| Arc::strong_count(l) > 1);
        if Arc::strong_count(&old) > 1 {
            retired.push(old);
        }
    }

    fn swap_published(&self) -> Arc<Vec<Arc<DirtyBitmap>>> {
        let list: Vec<Arc<DirtyBitmap>> = self
            .slots
            .iter()
            .filter_map(|s| s.mem.as_ref().or(s.parked.as_ref()).cloned())
            .collect();
        // A list of its own: `publish_quiesced` counts the holders of `tracked`'s.
        self.gauge.store(Arc::new(list.clone()));
        self.tracked.swap(Arc::new(list))
    }

    /// [`publish`](Self::publish), then waits until no mark still runs over any list
    /// published before: a grace period. A [`Tracker::mark`](crate::Tracker::mark) holds
    /// the list it loaded for the whole mark, and a swap turns every such hold into a
    /// count on the replaced list (`arc_swap` pays the readers' debts in `swap`); nothing
    /// else keeps a published list (`Tracker::bitmaps` hands out copies), and each replaced
    /// list a mark may still hold is kept in `retired`. After this, a bitmap dropped from
    /// recording can be disabled without losing a mark that loaded an older list and has
    /// not yet reached it (`checkpoint`).
    fn publish_quiesced(&self) {
        let old = self.swap_published();
        wait_until_unheld(&old);
        self.wait_for_older_lists();
    }

    /// Waits until no mark still runs over a list published before the current one (the
    /// lists kept in `retired`). A disable calls this before it stops a bitmap: a mark that
    /// loaded a list without the bitmap taking over (published by an `add` that returned
    /// before the disable began) has announced nothing to the bitmap it has not reached
    /// yet, so [`DirtyBitmap::set_enabled`] alone would not wait for it, and it would land
    /// in neither. A mark over the current list is the disable's own race: it overlaps the
    /// call.
    fn wait_for_older_lists(&self) {
        let retired = std::mem::take(&mut *self.retired.lock());
        for list in &retired {
            wait_until_unheld(list);
        }
    }

    fn current_entries(&self) -> Vec<DirEntry> {
        self.slots
            .iter()
            .filter(|s| !s.stale)
            .map(|s| s.entry.clone())
            .collect()
    }

    /// Refuses a deferred marking handle, or any handle on a live bitmap, while active in
    /// durable mode.
    fn ensure_not_durable(&self) -> Result<()> {
        if self.durable.is_some() {
            Err(Error::WrongState(StateProblem::Durable))
        } else {
            Ok(())
        }
    }

    fn ensure_active(&self) -> Result<()> {
        if self.active {
            Ok(())
        } else {
            Err(Error::WrongState(StateProblem::NotActive))
        }
    }
}

pub mod background;
pub mod checkpoint;
mod commit;
pub mod durable;
mod durable_bits;
#[cfg(loom)]
#[doc(hidden)]
pub use durable_bits::InFlight;
mod edit;
mod lifecycle;
mod live;
pub mod mode;
pub mod repair;
mod resize;
mod slots;
use slots::Slot;
#[cfg(test)]
mod tests;
pub mod triage;
pub mod write_log;

/// Waits until no mark holds `list` but the caller (a swap turned every mark's hold into
/// a count; see `publish_quiesced`).
fn wait_until_unheld(list: &Arc<Vec<Arc<DirtyBitmap>>>) {
    while Arc::strong_count(list) > 1 {
        std::thread::yield_now();
    }
}

/// Whether directory `disk` equals `ours` (the encoding of `entries`) in every byte but the
/// `in_use` bit of each entry's flags word (bit 0 of the big-endian word at bytes 12..16 of
/// the entry).
fn same_but_in_use(entries: &[crate::format::DirEntry], ours: &[u8], disk: &[u8]) -> bool {
    const IN_USE_BYTE: u64 = 15;
    if ours.len() != disk.len() {
        return false;
    }
    let mut in_use_at = std::collections::HashSet::new();
    let mut at = 0u64;
    for e in entries {
        in_use_at.insert(at.saturating_add(IN_USE_BYTE));
        at = at.saturating_add(e.encoded_len());
    }
    ours.iter().zip(disk).enumerate().all(|(i, (&a, &b))| {
        let mask = if in_use_at.contains(&(i as u64)) {
            !1u8
        } else {
            !0u8
        };
        a & mask == b & mask
    })
}
