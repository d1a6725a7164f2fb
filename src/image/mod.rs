//! The qcow2 container: open and create images, allocate clusters, rewrite the header.
//!
//! [`Image`] is the layer between the pure codecs in [`format`](crate::format) and the
//! bitmap store. It knows the header area, the refcount structures (through a first-fit
//! allocator) and how to check an image's refcounts as `qemu-img check` does. It knows
//! nothing about bitmap contents.
//!
//! # What it opens
//! Everything `qemu-img create -f qcow2` makes: versions 2 and 3, cluster sizes 512 B to
//! 2 MiB, refcount widths 1 to 64 bits, backing files, external data files, zstd
//! compression, extended L2 entries, encryption and snapshots. It refuses unknown
//! incompatible features (the error names them from the image's feature table) and refuses
//! to open writable an image with the dirty or corrupt bit set: those need
//! `qemu-img check -r`. Unknown extensions and header bytes past offset 112 are kept
//! byte for byte (see [`HeaderArea`]).
//!
//! # Writes
//! A read-only image never writes: every writing method returns [`Error::ReadOnly`]
//! first. A writable one writes only when a method that changes the image is called.

mod alloc;
pub mod check;

use crate::error::{internal, invalid_input, Corruption, Error, Result, StateProblem};
use crate::format::extension::EXT_BITMAPS;
use crate::format::header::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, AUTOCLEAR_MASK, CRYPT_LUKS, INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS,
};
use crate::format::refcount::{encode_reftable, set_refcount};
use crate::format::{
    decode_extensions, BitmapsExtension, Extension, Frames, Header, HeaderArea, RawGuestMap,
};
use crate::storage::{OpenMode, Storage, StorageExt, SECTOR_SIZE};
use alloc::Refcounts;
pub(crate) use alloc::{check_in_file, read_metadata};
pub use check::{CheckReport, FragInfo};

/// Largest cluster 0 (2 MiB clusters): the most read before the header is known.
const MAX_CLUSTER_SIZE: u64 = 1 << MAX_CLUSTER_BITS;

/// What [`Image::open`] reads first: cluster 0 at the default cluster size.
pub(crate) const FIRST_READ: u64 = 65536;

/// The largest disk [`Image::create_with_data_file`] maps: 2^56 bytes, where the offsets
/// its L2 entries name (the guest's own, in the raw file) end.
pub const MAX_RAW_DATA_FILE_DISK: u64 = 1 << 56;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Image<S: Storage> {
    storage: S,
    writable: bool,
    area: HeaderArea,
    /// The bitmaps extension data found while autoclear bit 0 was clear (untrusted).
    stale_bitmaps: Option<Vec<u8>>,
    /// Cluster 0 as a writable handle read it at the open or last wrote it and made
    /// durable, trailing zeros cut (the encoder pads with zeros to the cluster size);
    /// `None` on a read-only handle or when a write failed part-way. A header write that
    /// changes more than one sector of it is checked, and bracketed when a torn mix could
    /// trust the wrong bitmaps extension ([`put_header`](Self::put_header)). The in-place
    /// writes into cluster 0 (the reftable growth's header fields, bytes 48..60, and the
    /// store's mode flags word) are patched into it once durable.
    disk_header: Option<Vec<u8>>,
    refcounts: Refcounts,
    /// Why the reftable could not be read, on a read-only handle that opened without it
    /// (`refcounts` is then empty, and no refcount question is answered from it).
    refcounts_unreadable: Option<Corruption>,
    /// Set by the first failed write: the in-memory state may disagree with the disk.
    poisoned: bool,
    /// Barriers this image issued itself (header writes, [`Image::sync`]); the refcount
    /// layer counts its own.
    syncs: Barriers,
}

/// Barriers (`sync_data` calls) issued, and the time they took: the stop-cost model of the
/// migration loop (`crate::flush::DiskRate`) tells write time from barrier latency with it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Barriers {
    pub(crate) count: u64,
    pub(crate) time: std::time::Duration,
}

impl Barriers {
    /// One barrier on `storage`, counted and timed (also when it fails: the time was spent).
    pub(crate) fn sync(&mut self, storage: &(impl Storage + ?Sized)) -> Result<()> {
        let start = std::time::Instant::now();
        let r = storage.sync_data();
        self.count = self.count.saturating_add(1);
        self.time = self.time.saturating_add(start.elapsed());
        r
    }
}

impl<S: Storage> Image<S> {
    /// Opens an image, read-only or writable as `mode` says. Reads cluster 0 and the
    /// refcount table; writes nothing.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a header or extension QEMU would refuse (including unknown
    /// incompatible features, named), or, opened writable, a reftable that does not read
    /// (read-only, the image opens as QEMU's does, and refcount questions fail instead);
    /// [`Error::Unsupported`] when `mode` is [`OpenMode::ReadWrite`] and the dirty or
    /// corrupt bit is set, or the image is encrypted with LUKS and has no crypto header
    /// extension (QEMU opens it for no I/O), or a crypto header pointer QEMU refuses
    /// (shorter than a LUKS1 header, past the end of the file, without LUKS magic or
    /// version 1); [`Error::Io`] from the storage.
    pub fn open(storage: S, mode: OpenMode) -> Result<Self> {
        Self::open_inner(storage, mode, false).map(|(img, _)| img)
    }

    /// [`open`](Self::open) for a repair or a report: when the bitmaps extension itself is
    /// what QEMU refuses (a reserved field, a bitmap count of 0 or above 65535, an
    /// unaligned directory offset, a directory above the size limit), the image opens
    /// with the extension untrusted, as if autoclear bit 0 were clear (in memory only:
    /// nothing is written), and the problem comes back beside it. A writable image's next
    /// header write drops the extension.
    ///
    /// # Errors
    /// As [`open`](Self::open) for every other problem.
    pub fn open_untrusting_bitmaps(
        storage: S,
        mode: OpenMode,
    ) -> Result<(Self, Option<Corruption>)> {
        Self::open_inner(storage, mode, true)
    }

    fn open_inner(
        storage: S,
        mode: OpenMode,
        lenient_bitmaps: bool,
    ) -> Result<(Self, Option<Corruption>)> {
        let writable = mode.is_writable();
        // A writer vouches for what it reads (a durable activation acknowledges writes on
        // the bits it loads; every commit starts from the tables and directory read here),
        // so it reads the device, not the cache: after an earlier writer's failed barrier
        // the cache holds pages the disk lacks, which no later barrier writes
        // (`Storage::forget_cached`).
        if writable {
            storage.forget_cached()?;
        }
        let len = storage.len()?;
        // The header is in the first 512 bytes whatever the cluster size; reading the most
        // a cluster can be (2 MiB) would cost a migration destination milliseconds of its
        // downtime. The usual cluster size first, then the rest of a larger cluster 0.
        let mut first = storage.read_vec_at(0, len.min(FIRST_READ))?;
        let header = match Header::decode(&first) {
            // A v3 header may be as long as its cluster (unknown header fields, which QEMU
            // keeps): read on, to the most a cluster can be.
            Err(Corruption::Truncated { .. })
                if (first.len() as u64) < len.min(MAX_CLUSTER_SIZE) =>
            {
                first = storage.read_vec_at(0, len.min(MAX_CLUSTER_SIZE))?;
                Header::decode(&first)?
            }
            r => r?,
        };
        let want = header.cluster_size().min(len).min(MAX_CLUSTER_SIZE);
        let whole;
        let cluster0 = if want > first.len() as u64 {
            whole = storage.read_vec_at(0, want)?;
            &whole[..]
        } else {
            let cs = usize::try_from(header.cluster_size()).unwrap_or(usize::MAX);
            first.get(..cs.min(first.len())).unwrap_or(&first)
        };
        // What a writable handle knows cluster 0 holds, before any lenient patch below.
        let disk_header = writable.then(|| trim_zeros(cluster0).to_vec());
        let mut problem = None;
        let patched;
        let (area, cluster0) = match HeaderArea::decode(cluster0) {
            Ok(a) => (a, cluster0),
            Err(c) if lenient_bitmaps && c.is_bitmaps_extension() => {
                // Autoclear bit 0 (the low bit of the big-endian word at 88) cleared in a
                // copy: the extension then decodes as stale, unchecked.
                let mut copy = cluster0.to_vec();
                if let Some(b) = copy.get_mut(95) {
                    *b &= !1;
                }
                patched = copy;
                problem = Some(c);
                (HeaderArea::decode(&patched)?, &patched[..])
            }
            Err(c) => return Err(c.into()),
        };
        if writable && area.header.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0
        {
            return Err(Error::Unsupported(
                "the image has the dirty or corrupt bit set; repair it with `qemu-img check -r all` \
                 before opening it writable"
                    .to_string(),
            ));
        }
        // A LUKS image (crypt_method 2) without its crypto header extension: QEMU refuses
        // every open that reads or writes it ("Missing CRYPTO header for crypt method 2",
        // `qcow2_do_open`), so no writer of its disk exists whose writes the bitmaps could
        // track, and a write here would change an image QEMU cannot use. Refused before
        // anything is written; read-only opens still list it.
        if writable && area.header.crypt_method == CRYPT_LUKS && area.crypto.is_none() {
            return Err(Error::Unsupported(
                "the image is encrypted with LUKS (crypt_method 2) but has no crypto header \
                 extension: QEMU refuses to open it (\"Missing CRYPTO header for crypt method \
                 2\"), so it is opened read-only only"
                    .to_string(),
            ));
        }
        // The header the pointer names must be a LUKS1 header that lies inside the pointer's
        // length: QEMU opens every LUKS image through `qcrypto_block_open`, which reads 592
        // bytes through the pointer (refusing a read past its length) and refuses another
        // magic or version ("Volume is not in LUKS format"). An image QEMU cannot open is
        // not written here.
        // QEMU opens the header of every crypto extension it meets, so each one must pass
        // (the area keeps only the last, which a rewrite of cluster 0 would keep alone).
        if writable && area.header.crypt_method == CRYPT_LUKS {
            for e in decode_extensions(cluster0, &area.header)? {
                let Extension::CryptoHeader(c) = e else {
                    continue;
                };
                if let Some(why) = luks_header_problem(&storage, &c)? {
                    return Err(Error::Unsupported(format!(
                        "the image is encrypted with LUKS, but its crypto header {why}: QEMU \
                         refuses to open it, so it is opened read-only only"
                    )));
                }
            }
        }
        let stale_bitmaps = if area.stale_bitmaps {
            decode_extensions(cluster0, &area.header)?
                .into_iter()
                .filter_map(|e| match e {
                    Extension::StaleBitmaps(d) => Some(d),
                    _ => None,
                })
                .next_back()
        } else {
            None
        };
        // QEMU reads the reftable at open without judging it (`qcow2_refcount_init`), so it
        // opens, lists and reads the bitmaps of an image whose reftable has a reserved bit
        // set, an entry past the end of the file or two entries naming one block; only
        // `qemu-img check` reports them. A read-only open does the same: the refcounts are
        // then unknown, and every question about them fails with the load's error. A
        // writable open refuses the image, before anything is written; a block past the end
        // of the file is left to the walk each writing operation runs first (`preflight`).
        let (refcounts, refcounts_unreadable) = match Refcounts::load(&storage, &area.header) {
            Ok(r) => (r, None),
            Err(Error::Corrupt(c)) if !writable => (Refcounts::unread(&area.header)?, Some(c)),
            Err(e) => return Err(e),
        };
        Ok((
            Self {
                storage,
                writable,
                area,
                stale_bitmaps,
                disk_header,
                refcounts,
                refcounts_unreadable,
                poisoned: false,
                syncs: Barriers::default(),
            },
            problem,
        ))
    }

    /// Creates a qcow2 v3 image for a raw device of `disk_size` bytes that holds no guest
    /// data, only room for bitmaps: the layout `qemu-img create -f qcow2` writes. Cluster 0
    /// holds the header, cluster 1 the refcount table, cluster 2 the refcount block
    /// (16-bit refcounts), and the L1 table (all zeros, sized for `disk_size`) follows.
    ///
    /// Write order: refcount table and block, the L1 table, then a barrier, then the header
    /// and a barrier. Until the header is written the file is not a qcow2 image at all.
    ///
    /// # Errors
    /// [`Error::WrongState`] ([`StateProblem::StorageNotEmpty`]) if the storage is not
    /// empty; [`Error::InvalidInput`] if `cluster_size` is not a power of two in 512..=2 MiB,
    /// `disk_size` is not a multiple of 512 (QEMU counts the disk in 512-byte sectors and
    /// drops a partial one, so bitmaps would not cover its bytes; `qemu-img create` rounds
    /// up, `dbm create` too) or the disk needs an L1 table above 32 MiB; [`Error::Io`] from
    /// the storage.
    ///
    /// [`StateProblem::StorageNotEmpty`]: crate::error::StateProblem::StorageNotEmpty
    pub fn create_bitmap_only(storage: S, disk_size: u64, cluster_size: u64) -> Result<Self> {
        Self::create_inner(storage, disk_size, cluster_size, None)
    }

    /// Creates a qcow2 v3 image whose guest data is the existing raw file `data_file` (the
    /// name the image's `data_file` extension records; give an absolute path: QEMU 10 opens
    /// a relative one against its own working directory, not the image's, as it does for
    /// images `qemu-img create` made), with every guest cluster mapped to the same offset of that
    /// file: the `data_file` incompatible bit, the `data_file_raw` autoclear bit, and L1
    /// and L2 tables for all of `disk_size` (the layout `qemu-img create -f qcow2 -o
    /// data_file=RAW,data_file_raw=on,preallocation=metadata` writes). QEMU, `qemu-nbd` and
    /// `qemu-storage-daemon` then serve the raw file's contents through the image, and its
    /// bitmaps beside them.
    ///
    /// **The raw file is never opened here, let alone written:** the caller checks that it
    /// exists and holds `disk_size` bytes. (`qemu-img create` with an existing data file
    /// truncates it.) The metadata costs 8 bytes per guest cluster: 2 GiB of L2 tables for
    /// 16 TiB at 64 KiB clusters, 64 MiB at 2 MiB clusters.
    ///
    /// Write order: refcount structures, the L1 table and the L2 tables, a barrier, then
    /// the header and a barrier, so that no crash leaves a header naming tables that are
    /// not on disk.
    ///
    /// # Errors
    /// As [`create_bitmap_only`](Self::create_bitmap_only); [`Error::InvalidInput`] for an
    /// empty `data_file` name, one with a NUL byte, or one too long for cluster 0, and for a
    /// disk above [`MAX_RAW_DATA_FILE_DISK`], before anything is written.
    pub fn create_with_data_file(
        storage: S,
        disk_size: u64,
        cluster_size: u64,
        data_file: &str,
    ) -> Result<Self> {
        if data_file.is_empty() || data_file.contains('\0') {
            return Err(invalid_input!(
                "the data file name {data_file:?} is empty or holds a NUL byte"
            ));
        }
        // Each guest cluster's L2 entry names its own offset in the raw file, and an L2
        // entry holds offsets below 2^56 (bits 9 to 55; QEMU's `L2E_OFFSET_MASK`): past
        // that the entries would set reserved bits, which `qemu-img check` flags.
        if disk_size > MAX_RAW_DATA_FILE_DISK {
            return Err(invalid_input!(
                "a disk of {disk_size} bytes in a raw data file maps guest offsets at or \
                 above 2^56, which an L2 entry cannot hold"
            ));
        }
        Self::create_inner(storage, disk_size, cluster_size, Some(data_file))
    }

    fn create_inner(
        storage: S,
        disk_size: u64,
        cluster_size: u64,
        data_file: Option<&str>,
    ) -> Result<Self> {
        let cluster_bits = cluster_size.trailing_zeros();
        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
        {
            return Err(invalid_input!(
                "cluster size {cluster_size} is not a power of two in 512..=2097152"
            ));
        }
        // The header's size is read as whole 512-byte sectors (`Header::disk_length`, as
        // QEMU's `total_sectors`): a partial last sector would be a disk no bitmap covers.
        if !disk_size.is_multiple_of(512) {
            return Err(invalid_input!(
                "disk size {disk_size} is not a multiple of 512"
            ));
        }
        if !storage.is_empty()? {
            return Err(Error::WrongState(StateProblem::StorageNotEmpty));
        }
        // One L1 entry maps cs/8 L2 entries of cs bytes each.
        let per_l1 = (cluster_size / 8).saturating_mul(cluster_size);
        let l1_size = u32::try_from(disk_size.div_ceil(per_l1))
            .ok()
            .filter(|&n| u64::from(n).saturating_mul(8) <= 32 << 20)
            .ok_or_else(|| {
                invalid_input!("disk size {disk_size} needs an L1 table above 32 MiB")
            })?;
        let mut header = Header {
            l1_size,
            l1_table_offset: 3 * cluster_size,
            refcount_table_offset: cluster_size,
            refcount_table_clusters: 1,
            ..Header::v3(cluster_bits, disk_size)
        };
        if data_file.is_some() {
            header.incompatible_features |= INCOMPAT_DATA_FILE;
            header.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
        }
        let mut area = HeaderArea::new(header.clone());
        area.data_file = data_file.map(|n| n.as_bytes().to_vec());
        // Refused here, before anything is written, if the name does not fit cluster 0.
        area.encode()?;
        storage.set_len(3 * cluster_size)?;
        let reftable = encode_reftable(&[Some(2 * cluster_size)], cluster_bits)?;
        storage.write_all_at(&reftable, cluster_size)?;
        let mut block = vec![0u8; cluster_size as usize];
        for c in 0..3 {
            set_refcount(&mut block, 4, c, 1)?;
        }
        storage.write_all_at(&block, 2 * cluster_size)?;
        let mut probe = header.clone();
        probe.l1_size = 0;
        let mut refcounts = Refcounts::load(&storage, &probe)?;
        if l1_size > 0 {
            let l1_len = u64::from(l1_size) * 8;
            // This may grow the reftable, which moves it and rewrites the header's reftable
            // fields on disk: `header` follows, so the header written below names the
            // table in force, not cluster 1.
            let l1_clusters = l1_len.div_ceil(cluster_size);
            let l1 = refcounts.alloc(&storage, &mut header, l1_clusters)?;
            storage.write_zeroes_at(l1, l1_clusters * cluster_size)?;
            header.l1_table_offset = l1;
            if data_file.is_some() {
                write_raw_guest_map(&storage, &mut refcounts, &mut header, l1)?;
            }
        }
        refcounts.flush(&storage)?;
        storage.sync_data()?;
        area.header = header;
        let bytes = area.encode()?;
        storage.write_all_at(&bytes, 0)?;
        storage.sync_data()?;
        let refcounts = Refcounts::load(&storage, &area.header)?;
        Ok(Self {
            storage,
            writable: true,
            disk_header: Some(trim_zeros(&bytes).to_vec()),
            area,
            stale_bitmaps: None,
            refcounts,
            refcounts_unreadable: None,
            poisoned: false,
            syncs: Barriers::default(),
        })
    }

    /// The fixed header as it is on disk (or will be after the next header write).
    pub fn header(&self) -> &Header {
        &self.area.header
    }

    /// Cluster 0 as decoded: header, extensions, backing file name.
    pub fn area(&self) -> &HeaderArea {
        &self.area
    }

    /// The underlying storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Gives the storage back.
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// Whether the image was opened writable.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.area.header.cluster_size()
    }

    /// The bitmaps extension's raw data when it was found with autoclear bit 0 clear
    /// (written by a program without bitmap support; untrusted).
    pub fn stale_bitmaps(&self) -> Option<&[u8]> {
        self.stale_bitmaps.as_deref()
    }

    /// Rebuilds every cluster's reference count from the metadata and compares it with the
    /// on-disk refcounts, as `qemu-img check` does. Reads only.
    ///
    /// # Errors
    /// [`Error::Io`] from the storage, [`Error::Unsupported`] if the image is too large to
    /// check in memory or its active entries would make the COPIED check read more than
    /// twice the file and 64 MiB, or [`Error::Corrupt`] for a structure the walk cannot count within
    /// the file's length ([`check::check`] lists them).
    pub fn check(&self) -> Result<CheckReport> {
        check::check(&self.storage, &self.area)
    }

    /// [`check`](Self::check), also returning how often the metadata references each
    /// cluster: the one walk that decides what the store may free or write in place.
    /// Which of `clusters` (sorted cluster indices) the active L1 or L2 tables name without
    /// the COPIED flag ([`check::named_without_copied`]).
    pub(crate) fn named_without_copied(&self, clusters: &[u64]) -> Result<Vec<u64>> {
        check::named_without_copied(&self.storage, &self.area, clusters)
    }

    pub(crate) fn references(&self) -> Result<(CheckReport, check::References)> {
        check::check_references(&self.storage, &self.area)
    }

    /// The [`WalkShape`](check::WalkShape) of the header as the disk holds it now (read
    /// again, not the copy of the open): whether a walk made earlier, while another process
    /// wrote the image, still read the tables it has now.
    ///
    /// # Errors
    /// A header that does not decode; I/O.
    pub(crate) fn walk_shape_now(&self) -> Result<check::WalkShape> {
        // The fields lie in the first 104 bytes; a longer v3 header is read on.
        let len = self.storage.len()?;
        let mut first = self.storage.read_vec_at(0, len.min(SECTOR_SIZE))?;
        let header = match Header::decode(&first) {
            // A header is never longer than its cluster: read on to the handle's cluster
            // size (a header that says otherwise has another shape anyway).
            Err(Corruption::Truncated { .. })
                if (first.len() as u64) < len.min(self.cluster_size()) =>
            {
                first = self.storage.read_vec_at(0, len.min(self.cluster_size()))?;
                Header::decode(&first)?
            }
            r => r?,
        };
        Ok(check::WalkShape::of(&header))
    }

    /// Whether the cluster holding byte `offset` is one of the image's own structures that
    /// the handle knows without a read: cluster 0, the active L1 table, the refcount table,
    /// a refcount block, or the first cluster of the snapshot table.
    pub(crate) fn is_structure_cluster(&self, offset: u64) -> bool {
        let h = &self.area.header;
        let c = offset >> h.cluster_bits;
        self.refcounts.is_reserved(c)
            || (h.nb_snapshots > 0 && h.snapshots_offset >> h.cluster_bits == c)
    }

    /// [`references`](Self::references), given up with [`Error::Unsupported`] once `budget`
    /// has passed.
    pub(crate) fn references_within(
        &self,
        budget: std::time::Duration,
    ) -> Result<(CheckReport, check::References)> {
        check::check_references_within(&self.storage, &self.area, budget)
    }

    /// [`references`](Self::references) as if the image had no bitmaps extension: what
    /// everything but the bitmaps references (a repair's view of an image whose bitmap
    /// directory QEMU refuses).
    pub(crate) fn references_without_bitmaps(&self) -> Result<(CheckReport, check::References)> {
        let mut area = self.area.clone();
        area.bitmaps = None;
        check::check_references(&self.storage, &area)
    }

    fn ensure_writable(&self) -> Result<()> {
        if self.poisoned {
            Err(Error::Poisoned)
        } else if !self.writable {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Runs `f`, poisoning the image if it fails: after a failed write the in-memory
    /// refcounts may disagree with the disk, so every later write is refused. An unwind out
    /// of `f` (a `Storage` that panicked) poisons it too, before it goes on: the caller's
    /// lock may outlive the panic (`parking_lot`'s does not poison), and a write that
    /// unwound is as doubtful as one that failed.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.ensure_writable()?;
        // The first write clears unknown autoclear bits by rewriting cluster 0: a cluster 0
        // this crate cannot encode is refused here, before anything is written, as input
        // (not a failed write, so the image is not poisoned).
        if self.area.header.autoclear_features & !AUTOCLEAR_MASK != 0 {
            let mut area = self.area.clone();
            area.header.autoclear_features &= AUTOCLEAR_MASK;
            area.encode()?;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.clear_unknown_autoclear().and_then(|()| f(self))
        }));
        let r = r.unwrap_or_else(|panic| {
            self.poisoned = true;
            std::panic::resume_unwind(panic)
        });
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// The spec lets a writer modify an image with unknown autoclear bits only after it has
    /// cleared them, so the first write of any kind is a header write that clears them.
    fn clear_unknown_autoclear(&mut self) -> Result<()> {
        if self.area.header.autoclear_features & !AUTOCLEAR_MASK == 0 {
            return Ok(());
        }
        self.area.header.autoclear_features &= AUTOCLEAR_MASK;
        let bytes = self.area.encode()?;
        self.put_header(&bytes)
    }

    /// Writes `bytes` (cluster 0 encoded from the in-memory area) at offset 0 and makes it
    /// durable, never leaving a torn cluster 0 that trusts a bitmaps extension no one
    /// vouched for, nor one QEMU refuses that it would open with bit 0 clear.
    ///
    /// A 512-byte sector lands whole or not at all, but the sectors of one write land in
    /// any subset. The autoclear field (bit 0) lies in the first sector; the bitmaps
    /// extension's frame and 24 data bytes may lie in any sector, even across two: at
    /// clusters above 4 KiB (QEMU's feature-name table first) the frame is at 0x1F8 and the
    /// data at 0x200, and a data-file name of 481 to 496 bytes puts the data across the
    /// boundary at 1024 (`nb_bitmaps` in one sector, `bitmap_directory_offset` in the next).
    /// [`torn_mixes_keep_trust`] tries every mix of the sectors the write changes; when
    /// each mix read with bit 0 set names the bitmaps extension of the side its first sector
    /// came from (a write that changes one sector always passes), `bytes` are written as
    /// they are. Otherwise a torn write could pair bit 0 with an extension no side trusts:
    /// the untrusted extension of a bitmap-unaware writer (its directory, never freed, then
    /// loads as consistent without the writes made while it was untrusted), the old
    /// `nb_bitmaps` with the new directory (a checkpoint: the new directory's first entry
    /// alone, the old bitmap disabled and no bitmap recording), or a frame over zeros
    /// (`nb_bitmaps = 0`, refused as corrupt). The write is then bracketed, so that every
    /// mix of each step has bit 0 clear, untrusted (QEMU ignores the extension, checking
    /// only its length, and lists no bitmap; this crate lists each bitmap it names as
    /// inconsistent), or differs from the disk in the first sector alone:
    /// 1. unless the disk is known to hold bit 0 clear, the autoclear field alone with bit
    ///    0 clear (8 bytes in the first sector), a barrier;
    /// 2. if `bytes` set bit 0, `bytes` with bit 0 clear, a barrier;
    /// 3. `bytes`, a barrier (after step 2 it differs from the disk in the autoclear field
    ///    alone).
    ///
    /// A crash inside the bracket leaves every bitmap untrusted, never a mix read as clean.
    /// Both directories are intact until the write's last barrier completes (the caller
    /// frees the old one after it), so a mix naming either reads it whole.
    /// `docs/CRASH-CONSISTENCY.md`, "Known limit: a torn cluster-0 write", has the rest.
    ///
    /// A write that moves the backing file name (an extension added or dropped before it)
    /// moves it first, in steps of its own ([`put_header_moving_name`](Self::put_header_moving_name)).
    fn put_header(&mut self, bytes: &[u8]) -> Result<()> {
        self.clear_autoclear_first(bytes)?;
        match self
            .disk_header
            .as_deref()
            .and_then(|disk| NameMove::plan(disk, bytes))
        {
            Some(m) => self.put_header_moving_name(bytes, &m),
            None => self.put_header_bracketed(bytes),
        }
    }

    /// [`put_header`](Self::put_header) for a write that moves the backing file name. In
    /// one write, the name's offset (first sector) and the extension frames and name (the
    /// sectors after it) could land apart: the old offset ending the extension area inside
    /// a new frame ("Header extension too large", which QEMU and this crate refuse: the
    /// image does not open, the VM does not boot), or the new offset over the old bytes (a
    /// wrong backing file). So the name goes through a spare place past both layouts
    /// (`m.spare`), and every step leaves a cluster 0 that opens with the same name:
    /// 1. the name at the spare place, a barrier (no header reads those bytes yet);
    /// 2. the offset field alone, naming the spare place (first sector: lands whole), a
    ///    barrier: the extension area now ends past both layouts' frames;
    /// 3. zeros over the name at its old place, a barrier, so that the bytes after the old
    ///    end marker read as an end marker in any mix of the next write;
    /// 4. `bytes` with the name at the spare place only (zeros at its new place), through
    ///    [`put_header_bracketed`](Self::put_header_bracketed): every mix of its sectors
    ///    ends its extension area at the spare place, and reads past either side's end
    ///    marker only zeros;
    /// 5. the name at its new place, past the new end marker, a barrier;
    /// 6. the offset field alone, naming the new place, a barrier;
    /// 7. zeros over the spare place (no header reads it any more), a barrier: cluster 0 is
    ///    then `bytes`, which a store comparing the disk with its own encoding expects.
    fn put_header_moving_name(&mut self, bytes: &[u8], m: &NameMove) -> Result<()> {
        let (spare_end, to_end) = (m.spare + m.len, m.to + m.len);
        let name = bytes
            .get(m.to..to_end)
            .ok_or_else(|| internal!("backing file name past cluster 0"))?
            .to_vec();
        let field = |offset: usize| Header::backing_file_offset_field(offset as u64);
        self.write_cluster0_at(m.spare as u64, &name)?;
        let (at, spare_field) = field(m.spare);
        self.write_cluster0_at(at, &spare_field)?;
        self.write_cluster0_at(m.from as u64, &vec![0; m.len])?;
        let mut staged = bytes.to_vec();
        staged
            .get_mut(m.to..to_end)
            .ok_or_else(|| internal!("backing file name past cluster 0"))?
            .fill(0);
        staged
            .get_mut(m.spare..spare_end)
            .ok_or_else(|| internal!("spare place past cluster 0"))?
            .copy_from_slice(&name);
        let at_usize = usize::try_from(at).map_err(|_| internal!("field at {at}"))?;
        staged[at_usize..at_usize + spare_field.len()].copy_from_slice(&spare_field);
        self.put_header_bracketed(&staged)?;
        self.write_cluster0_at(m.to as u64, &name)?;
        let (at, to_field) = field(m.to);
        self.write_cluster0_at(at, &to_field)?;
        self.write_cluster0_at(m.spare as u64, &vec![0; m.len])
    }

    /// Autoclear bits that `bytes` clears and the disk holds go first, in a write of the
    /// field alone and a barrier: an unknown bit must be cleared before any other write
    /// (the spec's rule), and a torn cluster-0 write could otherwise land its other sectors
    /// under the old field; clearing bit 0 early only untrusts the bitmaps sooner. Nothing
    /// when the write changes the first sector alone (it lands whole), or when the disk's
    /// cluster 0 is not known (the bracket then writes the field first).
    fn clear_autoclear_first(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(disk) = self.disk_header.as_deref() else {
            return Ok(());
        };
        let mut old = disk.to_vec();
        old.resize(bytes.len().max(old.len()), 0);
        let (Ok(d), Ok(n)) = (Header::decode(&old), Header::decode(bytes)) else {
            return Ok(());
        };
        if d.version < 3 || d.autoclear_features & !n.autoclear_features == 0 {
            return Ok(());
        }
        // A write that changes the first sector alone (the field's) lands whole.
        const SECTOR: usize = SECTOR_SIZE as usize;
        if old
            .get(SECTOR..bytes.len())
            .is_some_and(|rest| bytes.get(SECTOR..) == Some(rest))
        {
            return Ok(());
        }
        let mut h = d;
        h.autoclear_features &= n.autoclear_features;
        let (at, field) = h.autoclear_field();
        self.write_cluster0_at(at, &field)
    }

    /// The body of [`put_header`](Self::put_header) for a write that does not move the
    /// backing file name: the bracket, when a torn mix could trust the wrong extension.
    fn put_header_bracketed(&mut self, bytes: &[u8]) -> Result<()> {
        let header = &self.area.header;
        let lands_safely = self
            .disk_header
            .as_deref()
            .is_some_and(|disk| torn_mixes_keep_trust(disk, bytes));
        if !lands_safely && header.version >= 3 {
            let mut untrusted = header.clone();
            untrusted.autoclear_features &= !AUTOCLEAR_BITMAPS;
            let (at, field) = untrusted.autoclear_field();
            let at_usize = usize::try_from(at).map_err(|_| internal!("autoclear field at {at}"))?;
            let field_range = at_usize..at_usize + field.len();
            let bit0_set = |b: &[u8]| {
                b.get(field_range.clone())
                    .is_some_and(|f| f.last().is_some_and(|&x| x & 1 != 0))
            };
            if self.disk_header.as_deref().is_none_or(bit0_set) {
                self.write_cluster0_at(at, &field)?;
            }
            if bit0_set(bytes) {
                let mut first = bytes.to_vec();
                first
                    .get_mut(field_range)
                    .ok_or_else(|| internal!("cluster 0 shorter than its header"))?
                    .copy_from_slice(&field);
                self.write_cluster0(&first)?;
            }
        }
        self.write_cluster0(bytes)
    }

    /// Writes cluster 0 whole and a barrier. Until the barrier completes, what the disk
    /// holds is not known.
    fn write_cluster0(&mut self, bytes: &[u8]) -> Result<()> {
        self.disk_header = None;
        self.storage.grow_to(bytes.len() as u64)?;
        self.storage.write_all_at(bytes, 0)?;
        self.syncs.sync(&self.storage)?;
        self.disk_header = Some(trim_zeros(bytes).to_vec());
        Ok(())
    }

    /// Whether `disk` (cluster 0 as read now, any length) is byte for byte what this
    /// handle knows the disk holds: read at the open or written since (every in-place write
    /// into cluster 0 is noted: the reftable growth's fields, the store's mode flags word),
    /// trailing zeros aside. False when the handle does not know (read-only, or after a
    /// failed write).
    pub(crate) fn known_cluster0_is(&self, disk: &[u8]) -> bool {
        self.disk_header
            .as_deref()
            .is_some_and(|known| known == trim_zeros(disk))
    }

    /// Reads cluster 0 again into the handle's copy of what the disk holds: after a store
    /// that handed the image over took it back, another writer may have laid cluster 0
    /// out its own way, and the next header write's torn-write analysis
    /// ([`put_header`](Self::put_header)) must start from the bytes on disk.
    ///
    /// # Errors
    /// I/O.
    pub(crate) fn refresh_known_cluster0(&mut self) -> Result<()> {
        if self.disk_header.is_none() || !self.writable {
            return Ok(());
        }
        let len = self.storage.len()?.min(self.area.header.cluster_size());
        let mut c0 = vec![0u8; usize::try_from(len).map_err(|_| internal!("cluster 0 of {len}"))?];
        self.storage.read_exact_at(&mut c0, 0)?;
        self.disk_header = Some(trim_zeros(&c0).to_vec());
        Ok(())
    }

    /// Records that `data` was written at `at` inside cluster 0, in place, and made durable
    /// (the store's mode flags word, the reftable growth's fields), so that the known copy
    /// follows.
    pub(crate) fn note_cluster0_write(&mut self, at: u64, data: &[u8]) {
        self.disk_header = self.disk_header.take().and_then(|d| patched(d, at, data));
    }

    /// Writes `data` at `at` inside cluster 0 (a field of the first sector, which lands
    /// whole or not at all, or bytes no header reads) and a barrier; the known copy of
    /// cluster 0 follows.
    fn write_cluster0_at(&mut self, at: u64, data: &[u8]) -> Result<()> {
        let known = self.disk_header.take();
        self.storage.write_all_at(data, at)?;
        self.syncs.sync(&self.storage)?;
        self.disk_header = known.and_then(|d| patched(d, at, data));
        Ok(())
    }

    /// Whether the refcounts this image caches still match the disk (see
    /// `Refcounts::cache_matches_disk`): `false` once another writer allocated or freed
    /// clusters they count. Reads only.
    ///
    /// # Errors
    /// I/O, or a table past the end of the file.
    pub(crate) fn refcounts_match_disk(&self) -> Result<bool> {
        self.ensure_refcounts_read()?;
        self.refcounts.cache_matches_disk(&self.storage)
    }

    /// The refcounts were read at open: a read-only open keeps going without them when
    /// the reftable is corrupt.
    ///
    /// # Errors
    /// [`Error::Corrupt`] with the load's corruption.
    fn ensure_refcounts_read(&self) -> Result<()> {
        match &self.refcounts_unreadable {
            Some(c) => Err(Error::Corrupt(c.clone())),
            None => Ok(()),
        }
    }

    /// Allocates `n` contiguous clusters (first fit), sets their refcounts to 1 in memory
    /// and grows the file to cover them. Returns the byte offset of the first cluster.
    /// The refcounts reach the disk at the next [`flush_refcounts`](Self::flush_refcounts).
    ///
    /// # Errors
    /// [`Error::ReadOnly`], [`Error::Poisoned`], refcount corruption found on the way, or an
    /// I/O error (which poisons the image).
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        self.guarded(|img| {
            let before = img.refcounts.reftable_location();
            let r = img.refcounts.alloc(&img.storage, &mut img.area.header, n);
            // A reftable growth wrote its 12 header bytes in place, with a barrier
            // (`alloc.rs`, step 3): the known copy of cluster 0 follows.
            if img.refcounts.reftable_location() != before {
                let encoded = img.area.header.encode()?;
                let at = alloc::HEADER_REFTABLE_FIELDS;
                let fields = encoded
                    .get(at..at + 12)
                    .ok_or_else(|| internal!("header too short for the reftable fields"))?;
                img.note_cluster0_write(at as u64, fields);
            }
            r
        })
    }

    /// Decrements the refcounts of the `n` clusters at `offset`, in memory.
    ///
    /// # Errors
    /// As [`alloc_clusters`](Self::alloc_clusters); [`Error::Corrupt`] if a refcount is
    /// already 0 or the cluster is a refcount structure.
    pub(crate) fn free_clusters(&mut self, offset: u64, n: u64) -> Result<()> {
        self.guarded(|img| img.refcounts.free(&img.storage, offset, n))
    }

    /// Lowers the refcount of the cluster holding byte `offset` to `to`, in memory, in one
    /// step (a leak's repair: [`free_clusters`](Self::free_clusters) decrements once per
    /// call, and a refcount may be as large as 2^64 - 1).
    ///
    /// A refcount structure may be lowered to 1, not to 0.
    ///
    /// # Errors
    /// As [`free_clusters`](Self::free_clusters), and [`Error::Internal`] if `to` is not
    /// below the current refcount.
    pub(crate) fn lower_refcount(&mut self, offset: u64, to: u64) -> Result<()> {
        self.guarded(|img| img.refcounts.lower(&img.storage, offset, to))
    }

    /// Raises the refcount of the cluster holding byte `offset` to `to`, in memory (a
    /// repair's: a cluster referenced but at a lower refcount). It reaches the disk at the
    /// next [`flush_refcounts`](Self::flush_refcounts); a failure changes nothing, so it
    /// does not poison the image.
    ///
    /// # Errors
    /// [`Error::ReadOnly`], [`Error::Poisoned`]; [`Corruption::Refcount`] when no refcount
    /// block covers the cluster; [`Error::Internal`] if `to` is not above the current
    /// refcount; I/O.
    pub(crate) fn raise_refcount(&mut self, offset: u64, to: u64) -> Result<()> {
        self.ensure_writable()?;
        self.refcounts.raise(&self.storage, offset, to)
    }

    /// The in-memory refcount of the cluster holding byte `offset`.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if its refcount block lies past the end of the file; I/O errors.
    pub(crate) fn refcount(&mut self, offset: u64) -> Result<u64> {
        self.ensure_refcounts_read()?;
        let c = offset >> self.area.header.cluster_bits;
        self.refcounts.get(&self.storage, c)
    }

    /// Writes every changed refcount block and reftable entry, with barriers, and syncs.
    /// Does nothing when no refcount changed.
    ///
    /// # Errors
    /// As [`alloc_clusters`](Self::alloc_clusters).
    pub(crate) fn flush_refcounts(&mut self) -> Result<()> {
        if self.refcounts.is_clean() {
            return Ok(());
        }
        self.guarded(|img| img.refcounts.flush(&img.storage))
    }

    /// Points the in-memory header at a new L1 table of `l1_size` entries at `offset` (clusters
    /// the caller allocated and filled) and guards it as a structure; the old table becomes an
    /// ordinary cluster run. Nothing is written: the next [`write_header`](Self::write_header)
    /// commits the move, and only after that may the caller free the old table.
    pub(crate) fn move_l1(&mut self, offset: u64, l1_size: u32) {
        self.area.header.l1_table_offset = offset;
        self.area.header.l1_size = l1_size;
        self.refcounts
            .move_l1(offset, u64::from(l1_size).saturating_mul(8));
    }

    /// Mutable access to the header area, for a following [`write_header`](Self::write_header).
    pub(crate) fn area_mut(&mut self) -> &mut HeaderArea {
        &mut self.area
    }

    /// Cluster 0 exactly as the next [`write_header`](Self::write_header) writes it: the
    /// in-memory area with the fixes every header write makes applied to it (reftable
    /// location, unknown autoclear bits cleared, autoclear bit 0 cleared without a bitmaps
    /// extension). Writes nothing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if the area no longer fits in cluster 0; [`Error::Internal`]
    /// if the reftable outgrew its field.
    pub(crate) fn header_bytes(&mut self) -> Result<Vec<u8>> {
        let (offset, clusters) = self.refcounts.reftable_location();
        let h = &mut self.area.header;
        h.refcount_table_offset = offset;
        h.refcount_table_clusters = u32::try_from(clusters)
            .map_err(|_| internal!("refcount table of {clusters} clusters"))?;
        h.autoclear_features &= AUTOCLEAR_MASK;
        if self.area.bitmaps.is_none_or(|b| b.nb_bitmaps == 0) {
            self.area.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        }
        Ok(self.area.encode()?)
    }

    /// Writes cluster 0 from the in-memory header area in one write, then syncs: the commit
    /// point of every metadata change. Unknown autoclear bits are cleared (the spec allows a
    /// writer to modify the image only after clearing them), and autoclear bit 0 is cleared
    /// when there is no bitmaps extension to go with it. A write that changes more than one
    /// sector of cluster 0, where a torn mix could trust a bitmaps extension neither side
    /// vouches for (bit 0 set over an untrusted extension or none, the last bitmap
    /// removed, a checkpoint whose extension data straddles a sector boundary), is
    /// bracketed: up to three writes and three barriers ([`put_header`](Self::put_header));
    /// a backing file's name that must move goes through a spare place first, up to seven
    /// writes, each with its barrier (`put_header_moving_name`).
    ///
    /// # Errors
    /// As [`alloc_clusters`](Self::alloc_clusters); [`Error::InvalidInput`] if the area no
    /// longer fits in cluster 0; [`Error::Internal`] if the reftable outgrew its field.
    pub(crate) fn write_header(&mut self) -> Result<()> {
        self.guarded(|img| {
            let bytes = img.header_bytes()?;
            img.put_header(&bytes)?;
            // The stale extension is gone from disk once cluster 0 is rewritten.
            img.area.stale_bitmaps = false;
            img.stale_bitmaps = None;
            Ok(())
        })
    }

    /// Writes `buf` at `offset` (a cluster the caller allocated).
    ///
    /// # Errors
    /// As [`alloc_clusters`](Self::alloc_clusters).
    pub(crate) fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.guarded(|img| img.storage.write_all_at(buf, offset))
    }

    /// A barrier: everything written before is durable before anything written after.
    ///
    /// # Errors
    /// As [`alloc_clusters`](Self::alloc_clusters).
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.guarded(|img| {
            img.syncs.sync(&img.storage)?;
            Ok(())
        })
    }

    /// Barriers (`sync_data` calls) this handle has issued since it was opened, counting
    /// header writes, explicit barriers and refcount flushes.
    pub fn sync_count(&self) -> u64 {
        self.syncs.count.saturating_add(self.refcounts.syncs.count)
    }

    /// Time spent in those barriers since the handle was opened.
    pub fn sync_time(&self) -> std::time::Duration {
        self.syncs.time.saturating_add(self.refcounts.syncs.time)
    }

    /// Whether a failed write poisoned this handle: every later write returns
    /// [`Error::Poisoned`] until the image is reopened.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Writes `buf` at `offset` and issues a barrier, on a poisoned handle too. Only for a
    /// write that withdraws a claim of "clean" a failed operation may have left on disk
    /// (`BitmapStore`'s stop): the poison guards the in-memory refcounts, and such a write
    /// allocates, frees and counts nothing; it rewrites bytes of a structure whose place
    /// the caller knows for certain. The handle stays poisoned.
    ///
    /// # Errors
    /// [`Error::ReadOnly`], or the storage's error.
    pub(crate) fn withdraw_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.storage.write_all_at(buf, offset)?;
        self.syncs.sync(&self.storage)
    }

    /// Clears autoclear bit 0 on disk (the 8-byte field alone, then a barrier), on a
    /// poisoned handle too, as [`withdraw_at`](Self::withdraw_at): whichever directory the
    /// header points to, no bitmap of the image is trusted then (here each loads as
    /// inconsistent; QEMU ignores the extension and drops it at its first header write).
    /// The last resort of a stop that failed after it may have written "clean".
    ///
    /// # Errors
    /// As [`withdraw_at`](Self::withdraw_at).
    pub(crate) fn untrust_bitmaps(&mut self) -> Result<()> {
        self.area.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        let (offset, bytes) = self.area.header.autoclear_field();
        // What cluster 0 holds is not known until the write and its barrier succeed, nor
        // kept after (the caller's handle is poisoned): a later header write is bracketed.
        self.disk_header = None;
        self.withdraw_at(&bytes, offset)
    }

    /// Writes the autoclear field alone (8 bytes at offset 88, inside the first sector, so
    /// it lands whole or not at all) with `value`, then a barrier. Setting bit 0 this way
    /// is the caller's bracket: cluster 0 on disk must already be the one bit 0 vouches for.
    ///
    /// # Errors
    /// As [`alloc_clusters`](Self::alloc_clusters).
    pub(crate) fn write_autoclear(&mut self, value: u64) -> Result<()> {
        self.guarded(|img| {
            img.area.header.autoclear_features = value;
            let (offset, field) = img.area.header.autoclear_field();
            img.write_cluster0_at(offset, &field)
        })
    }
}

/// The bytes of a LUKS1 header QEMU reads (`QCryptoBlockLUKSHeader`): magic, version,
/// names, offsets, the master key digest and its parameters, the UUID and eight key slots.
const LUKS1_HEADER_LEN: u64 = 592;

/// Why the crypto header `c` names is not one QEMU opens (a LUKS1 header: magic
/// `LUKS\xba\xbe`, version 1, 592 bytes, inside `c.length` and the file), or `None`.
fn luks_header_problem<S: Storage>(
    storage: &S,
    c: &crate::format::extension::CryptoHeaderPointer,
) -> Result<Option<String>> {
    if c.length < LUKS1_HEADER_LEN {
        return Ok(Some(format!(
            "is {} bytes long, shorter than a LUKS1 header ({LUKS1_HEADER_LEN})",
            c.length
        )));
    }
    if c.offset.saturating_add(LUKS1_HEADER_LEN) > storage.len()? {
        return Ok(Some(format!(
            "at {} lies past the end of the file",
            c.offset
        )));
    }
    let mut head = [0u8; 8];
    storage.read_exact_at(&mut head, c.offset)?;
    if head[..6] != *b"LUKS\xba\xbe" {
        return Ok(Some(format!("at {} is not in LUKS format", c.offset)));
    }
    let version = u16::from_be_bytes([head[6], head[7]]);
    if version != 1 {
        return Ok(Some(format!(
            "is LUKS version {version}, which QEMU does not open"
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests;

/// Most sectors of cluster 0 a header write may change and still be written without a
/// bracket: [`torn_mixes_keep_trust`] tries 2^n mixes.
const MAX_MIXED_SECTORS: usize = 8;

/// Whether a write of `new` (cluster 0, a whole cluster) over `disk` (cluster 0 on disk,
/// trailing zeros cut) can tear into no mix that trusts the wrong bitmaps extension: every
/// mix of the 512-byte sectors the write changes that is read with autoclear bit 0 set
/// ([`trusted_bitmaps`]) reads the bitmaps extension (or none) of the side whose first
/// sector it holds, old or new (either, when the first sector does not change). The bit
/// lies in the first sector, so a mix has it set exactly when that side has. A mix that
/// QEMU and this crate refuse to open for its extension frames is no trust question, and
/// clearing bit 0 would not open it. False when the write changes more than
/// [`MAX_MIXED_SECTORS`] sectors.
///
/// The reftable fields (bytes 48..60, one sector) are taken from `new`: the reftable
/// growth writes them in place (`alloc.rs`) before any header write that follows, and
/// every header write after a growth carries the location the refcount layer holds
/// ([`Image::header_bytes`]; [`Image::clear_unknown_autoclear`] runs before the handle's
/// first allocation), so the disk holds `new`'s values even where `disk` (not updated by
/// the growth) does not.
fn torn_mixes_keep_trust(disk: &[u8], new: &[u8]) -> bool {
    const SECTOR: usize = SECTOR_SIZE as usize;
    if disk.len() > new.len() {
        return false;
    }
    let mut old = disk.to_vec();
    old.resize(new.len(), 0);
    let fields = alloc::HEADER_REFTABLE_FIELDS..alloc::HEADER_REFTABLE_FIELDS + 12;
    if let (Some(o), Some(n)) = (old.get_mut(fields.clone()), new.get(fields)) {
        o.copy_from_slice(n);
    }
    let changed: Vec<std::ops::Range<usize>> = (0..new.len())
        .step_by(SECTOR)
        .map(|s| s..new.len().min(s + SECTOR))
        .filter(|r| old[r.clone()] != new[r.clone()])
        .collect();
    if changed.len() <= 1 {
        return true;
    }
    if changed.len() > MAX_MIXED_SECTORS {
        return false;
    }
    let first_changes = changed.first().is_some_and(|r| r.start == 0);
    let (trusted_old, trusted_new) = (trusted_bitmaps(&old), trusted_bitmaps(new));
    let mut mix = new.to_vec();
    // Bit k of `from_old`: the k-th changed sector comes from the old cluster 0.
    (0u32..1 << changed.len()).all(|from_old| {
        for (k, r) in changed.iter().enumerate() {
            let side = if from_old >> k & 1 == 1 {
                &old[..]
            } else {
                new
            };
            mix[r.clone()].copy_from_slice(&side[r.clone()]);
        }
        let Some(seen) = trusted_bitmaps(&mix) else {
            return true;
        };
        let first_old = !first_changes || from_old & 1 == 1;
        let first_new = !first_changes || from_old & 1 == 0;
        (first_old && trusted_old == Some(seen)) || (first_new && trusted_new == Some(seen))
    })
}

/// The bitmaps extension a reader of cluster 0 `bytes` trusts: `None` when autoclear bit 0
/// is clear (or the header is v2), or the image does not open (the header does not decode,
/// or the walk over the extension frames fails, as `qcow2_read_extensions` fails); else
/// the data of the last bitmaps extension (QEMU keeps the last), `Some(None)` without one.
/// With bit 0 set QEMU validates every bitmaps extension, not only the last, and refuses
/// the image for one it rejects, which it would open with bit 0 clear: the data of the
/// first such extension is returned, which no image this crate writes or opens holds, so
/// such a mix is never taken for either side.
fn trusted_bitmaps(bytes: &[u8]) -> Option<Option<&[u8]>> {
    let header = Header::decode(bytes).ok()?;
    if header.version < 3 || !header.bitmaps_consistent() {
        return None;
    }
    let (offset, end) = header.extension_area();
    let mut frames = Frames { bytes, offset, end };
    let mut found = None;
    loop {
        match frames.next_frame() {
            Ok(Some(f)) if f.kind == EXT_BITMAPS => {
                if BitmapsExtension::decode(f.data, 0, header.cluster_size()).is_err() {
                    return Some(Some(f.data));
                }
                found = Some(f.data);
            }
            Ok(Some(_)) => {}
            Ok(None) => return Some(found),
            Err(_) => return None,
        }
    }
}

/// `disk` (cluster 0, trailing zeros cut) with `data` written at `at`, trailing zeros cut.
fn patched(mut disk: Vec<u8>, at: u64, data: &[u8]) -> Option<Vec<u8>> {
    let at = usize::try_from(at).ok()?;
    let end = at.checked_add(data.len())?;
    if disk.len() < end {
        disk.resize(end, 0);
    }
    disk.get_mut(at..end)?.copy_from_slice(data);
    let kept = trim_zeros(&disk).len();
    disk.truncate(kept);
    Some(disk)
}

/// Where [`Image::put_header_moving_name`] moves the backing file name through: from
/// `from` (on disk) to `to` (in the new cluster 0) by way of `spare`, `len` bytes each.
#[derive(Debug)]
struct NameMove {
    from: usize,
    to: usize,
    spare: usize,
    len: usize,
}

impl NameMove {
    /// The move a write of `new` over `disk` (cluster 0, trailing zeros cut) makes: `None`
    /// when it keeps the name where it is, changes one sector only (which lands whole),
    /// changes the name itself, or leaves no room in cluster 0 for a spare place past both
    /// layouts (clusters of 2 KiB or less with a long name: the write is then as
    /// `docs/CRASH-CONSISTENCY.md`'s known limit says).
    ///
    /// Also `None` when the name on disk starts inside the header (a backing file offset
    /// below `header_length`, which QEMU opens: it then reads no extension at all and takes
    /// header bytes as the name). The move's third step would zero header fields (the
    /// refcount table's offset, say) until the fourth rewrites them, and its second would
    /// make the bytes after the header, never read before, an extension area.
    fn plan(disk: &[u8], new: &[u8]) -> Option<NameMove> {
        let mut old = disk.to_vec();
        old.resize(new.len().max(old.len()), 0);
        let (d, n) = (Header::decode(&old).ok()?, Header::decode(new).ok()?);
        let len = usize::try_from(n.backing_file_size).ok()?;
        let from = usize::try_from(d.backing_file_offset).ok()?;
        let to = usize::try_from(n.backing_file_offset).ok()?;
        if len == 0 || from == 0 || to == 0 || from == to {
            return None;
        }
        if from < usize::try_from(d.header_length).ok()? {
            return None;
        }
        if d.backing_file_size != n.backing_file_size
            || old.get(from..from.checked_add(len)?)? != new.get(to..to.checked_add(len)?)?
        {
            return None;
        }
        const SECTOR: usize = SECTOR_SIZE as usize;
        let changed = (0..new.len())
            .step_by(SECTOR)
            .filter(|&s| {
                let r = s..new.len().min(s + SECTOR);
                old[r.clone()] != new[r]
            })
            .count();
        if changed <= 1 {
            return None;
        }
        let spare = (from.max(to) + len).next_multiple_of(8);
        (spare + len <= new.len()).then_some(NameMove {
            from,
            to,
            spare,
            len,
        })
    }
}

/// `bytes` without its trailing zeros.
fn trim_zeros(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    &bytes[..end]
}

/// The L2 tables of a raw data file's identity map (`format::guest_map`), allocated
/// contiguously and written in chunks of up to 8 MiB, then the L1 table at `l1` naming
/// them. Nothing points at them until the header is written.
fn write_raw_guest_map<S: Storage>(
    storage: &S,
    refcounts: &mut Refcounts,
    header: &mut Header,
    l1: u64,
) -> Result<()> {
    let cs = header.cluster_size();
    let map = RawGuestMap::new(cs, header.size)?;
    let tables = map.l2_tables();
    let first = refcounts.alloc(storage, header, tables)?;
    let per_chunk = ((8u64 << 20) / cs).max(1);
    let mut buf = Vec::new();
    let mut t = 0;
    while t < tables {
        let n = per_chunk.min(tables - t);
        buf.resize(
            usize::try_from(n * cs).map_err(|_| internal!("chunk too large"))?,
            0,
        );
        map.fill_l2(t, &mut buf)?;
        storage.write_all_at(&buf, first + t * cs)?;
        t += n;
    }
    storage.write_all_at(&map.encode_l1(first)?, l1)?;
    Ok(())
}
