//! A refcount check with `qemu-img check`'s rules and exit codes.
//!
//! [`check`] rebuilds the number of references to every cluster from the metadata
//! (QEMU's `calculate_refcounts`): the header cluster, the active L1 table with its L2
//! tables and data clusters, every snapshot's L1/L2/data and the snapshot table, the
//! refcount table and blocks, the LUKS header, and (when autoclear bit 0 trusts it) the
//! bitmap directory, each bitmap table and each data cluster a table names
//! (`qcow2_check_bitmaps_refcounts`). It then compares those counts with the on-disk
//! refcounts (`compare_refcounts`): more on disk is a leak, less is a corruption. Last,
//! as `check_oflag_copied`, the COPIED flag of every entry of the active L1 and L2 tables
//! must say whether the cluster's refcount on disk is 1 (and is never set on a compressed
//! cluster). QEMU reads the active tables and the refcount blocks again for that; here the
//! walk keeps two bits a cluster from its own read of the active tables (`CopiedFlags`)
//! and the comparison judges them against the refcount blocks it reads anyway, so a sound
//! image's tables and blocks are read once each. Only where that finds a flag wrong, or
//! the image already corrupt or with a data file, does a pass of its own read them again
//! (`oflag_copied`), for QEMU's exact counts and messages.
//!
//! Every length read from the image is checked against the file size before anything is
//! allocated for it, so a corrupt image cannot make the check allocate without bound. The
//! reference counts and the COPIED bits live in pages allocated on first use
//! (`RefCounts`, `CopiedFlags`): a large sparse file costs two page tables of 16 bytes per
//! 4096 clusters, and a page is allocated only once metadata read from the file names a
//! cluster in it. The bound is the file's, about 4¼ bytes a cluster of it (QEMU's check
//! allocates its array for every cluster up front): an image a qcow2 writer made fills
//! the pages it touches, while a hostile one in a sparse file can name one cluster a page
//! and reach that bound with little metadata (docs/DESIGN.md, "Memory"). The second COPIED pass, which only an image already found corrupt
//! (or with a wrong flag, or a data file) runs, holds a fixed batch of lookups beside what
//! it reads (`CopiedBatch`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use byteorder::{BigEndian, ByteOrder};

use super::alloc::read_metadata;
use crate::error::{Corruption, Error, Result};
use crate::format::header::INCOMPAT_EXTL2;
use crate::format::refcount::{
    decode_reftable_entry, entries_per_block, get_refcount, REFTABLE_OFFSET_MASK,
    REFTABLE_RESERVED_MASK,
};
use crate::format::{decode_directory_as_qemu_opens, DirEntry, HeaderArea, TableEntry};
use crate::storage::{Storage, StorageExt};

/// L1 and L2 entries: bits 9-55 hold the offset.
const L2_OFFSET_MASK: u64 = 0x00FF_FFFF_FFFF_FE00;
/// L2 entry bit 62: the cluster is compressed.
const L2_COMPRESSED: u64 = 1 << 62;
/// L1 and L2 entry bit 63: refcount exactly one.
const L2_COPIED: u64 = 1 << 63;
/// L2 entry bit 0: the cluster reads as zeros.
const L2_ZERO: u64 = 1;
/// QEMU's `L1E_RESERVED_MASK`: bits of an L1 entry that must be zero (0-8, 56-62).
const L1_RESERVED: u64 = 0x7F00_0000_0000_01FF;
/// QEMU's `L2E_STD_RESERVED_MASK`: bits of a standard (not compressed, not extended) L2
/// entry that must be zero (1-8, 56-61).
const L2_STD_RESERVED: u64 = 0x3F00_0000_0000_01FE;
/// Largest number of clusters the check keeps counts for (page tables of 8 MiB each).
const MAX_CHECK_CLUSTERS: u64 = 1 << 31;
/// L2 tables the walk asks the storage to read ahead at once ([`Storage::prefetch`]).
const PREFETCH_TABLES: usize = 128;
/// Clusters per page of [`RefCounts`].
const PAGE_CLUSTERS: usize = 4096;
/// QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`: the most extra data a snapshot table entry may
/// have.
const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// The extra data every version 3 snapshot table entry must hold: the large VM state size
/// and the disk size, 8 bytes each (`qcow2_check_read_snapshot_table`).
const MIN_V3_SNAPSHOT_EXTRA_DATA: u32 = 16;
/// QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`: the longest snapshot table it reads.
const MAX_SNAPSHOTS_SIZE: u64 = 64 << 20;

/// References per cluster, for `len` clusters, in pages of [`PAGE_CLUSTERS`] counters that
/// are allocated when a cluster in them is first referenced.
struct RefCounts {
    len: u64,
    pages: Vec<Option<Box<[u32]>>>,
}

impl RefCounts {
    fn new(len: u64) -> Result<Self> {
        let n = usize::try_from(len.div_ceil(PAGE_CLUSTERS as u64)).map_err(|_| {
            Error::Unsupported(format!("image of {len} clusters is too large to check"))
        })?;
        let mut pages = Vec::new();
        pages.try_reserve_exact(n).map_err(|_| {
            Error::Unsupported(format!("cannot allocate counters for {len} clusters"))
        })?;
        pages.resize_with(n, || None);
        Ok(RefCounts { len, pages })
    }

    /// Adds `n` references to cluster `c`; `false` if `c` is past the end.
    fn add(&mut self, c: u64, n: u32) -> bool {
        if c >= self.len {
            return false;
        }
        let (p, i) = (
            (c / PAGE_CLUSTERS as u64) as usize,
            (c % PAGE_CLUSTERS as u64) as usize,
        );
        let page = self.pages[p].get_or_insert_with(|| vec![0u32; PAGE_CLUSTERS].into());
        page[i] = page[i].saturating_add(n);
        true
    }

    /// Pages allocated so far.
    #[cfg(test)]
    fn pages_allocated(&self) -> usize {
        self.pages.iter().filter(|p| p.is_some()).count()
    }

    /// The references to cluster `c` (0 past the end or in an untouched page).
    fn get(&self, c: u64) -> u64 {
        let p = (c / PAGE_CLUSTERS as u64) as usize;
        match self.pages.get(p) {
            Some(Some(page)) => u64::from(page[(c % PAGE_CLUSTERS as u64) as usize]),
            _ => 0,
        }
    }

    /// Whether any cluster in `[first, end)` is referenced (page granular, then exact).
    fn any_in(&self, first: u64, end: u64) -> bool {
        let mut c = first;
        while c < end.min(self.len) {
            let p = (c / PAGE_CLUSTERS as u64) as usize;
            let page_end = (p as u64 + 1) * PAGE_CLUSTERS as u64;
            if self.pages[p].is_some() && (c..end.min(page_end)).any(|x| self.get(x) != 0) {
                return true;
            }
            c = page_end;
        }
        false
    }
}

/// What the active tables' entries say of each cluster's COPIED flag (bit 63), gathered
/// by the walk's one read of them: whether an entry naming the cluster has the flag, and
/// whether one lacks it. QEMU's `check_oflag_copied` wants the flag exactly where the
/// refcount on disk is 1, so a cluster named with it must have refcount 1 and one named
/// without it must not: [`wrong`](Self::wrong) says whether a cluster breaks that, given
/// its refcount on disk. Two bits a cluster, in pages allocated as entries name them (only
/// clusters inside the file: the pages stay bounded by the file, and take a sixteenth of
/// what [`RefCounts`] holds for the same clusters).
struct CopiedFlags {
    len: u64,
    pages: Vec<Option<Box<[u64]>>>,
}

/// Words of a [`CopiedFlags`] page: two bits for each of its [`PAGE_CLUSTERS`] clusters.
const FLAG_PAGE_WORDS: usize = PAGE_CLUSTERS / 32;

impl CopiedFlags {
    fn new(len: u64) -> Result<Self> {
        let n = usize::try_from(len.div_ceil(PAGE_CLUSTERS as u64)).map_err(|_| {
            Error::Unsupported(format!("image of {len} clusters is too large to check"))
        })?;
        let mut pages = Vec::new();
        pages
            .try_reserve_exact(n)
            .map_err(|_| Error::Unsupported(format!("cannot allocate flags for {len} clusters")))?;
        pages.resize_with(n, || None);
        Ok(CopiedFlags { len, pages })
    }

    /// Page, word and shift of cluster `c`'s two bits (`c` below `len`): the low one "named with
    /// COPIED", the high one "named without".
    fn at(c: u64) -> (usize, usize, u32) {
        let p = (c / PAGE_CLUSTERS as u64) as usize;
        let i = (c % PAGE_CLUSTERS as u64) as usize;
        (p, i / 32, (i % 32) as u32 * 2)
    }

    /// An active entry names cluster `c`, with the COPIED flag or without. Past the end
    /// nothing is kept: the walk counts such a name as a corruption, which sends the check
    /// to the pass of its own ([`oflag_copied`]).
    fn name(&mut self, c: u64, copied: bool) {
        if c >= self.len {
            return;
        }
        let (p, w, shift) = Self::at(c);
        let page = self.pages[p].get_or_insert_with(|| vec![0u64; FLAG_PAGE_WORDS].into());
        page[w] |= 1u64 << (shift + u32::from(!copied));
    }

    /// Whether cluster `c`, of refcount `refcount` on disk, is named against its refcount
    /// by an active entry: with the flag and a refcount other than 1, or without it and a
    /// refcount of 1.
    fn wrong(&self, c: u64, refcount: u64) -> bool {
        if c >= self.len {
            return false;
        }
        let (p, w, shift) = Self::at(c);
        let Some(page) = &self.pages[p] else {
            return false;
        };
        let bits = page[w] >> shift;
        (bits & 1 != 0 && refcount != 1) || (bits & 2 != 0 && refcount == 1)
    }
}

/// `qemu-img check`'s allocation figures (`BlockFragInfo`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FragInfo {
    /// Guest clusters with data (normal, zero with an offset, compressed).
    pub allocated: u64,
    /// Of those, how many do not follow the one before on the host (compressed ones too).
    pub fragmented: u64,
    /// Of those, how many are compressed.
    pub compressed: u64,
}

/// Most messages kept in a report; the counts stay exact beyond it.
const MAX_MESSAGES: usize = 1000;

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters referenced more often than their refcount says, plus broken structures
    /// (bad entries, metadata past the end of the file, refcount blocks referenced twice).
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Clusters whose refcount could not be read: `qemu-img check`'s "internal errors"
    /// (`check-errors`), one for each cluster a refcount table entry with an offset that is
    /// not cluster-aligned covers (QEMU's `qcow2_get_refcount` refuses it; that entry is
    /// also a corruption). Such clusters are neither compared nor judged.
    pub check_errors: u64,
    /// Clusters in the file.
    pub total_clusters: u64,
    /// One past the last byte of the highest cluster with a refcount or a reference:
    /// `qemu-img check`'s "Image end offset".
    pub image_end_offset: u64,
    /// Guest clusters allocated, fragmented and compressed in the active L1's tables, as
    /// `qemu-img check` counts them.
    pub frag: FragInfo,
    /// Human-readable findings, in QEMU's wording where QEMU has one (at most 1000).
    pub messages: Vec<String>,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 1 when refcounts could not be read (QEMU's "Check
    /// failed"), else 0 clean, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Neither corruptions nor leaks, and every refcount read.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }

    /// Counts one corruption found outside the walk (the bitmaps extension's own fields,
    /// which the walk judges untrusted), its message first among the findings, within the
    /// cap on messages.
    pub fn corrupt_first(&mut self, msg: String) {
        self.corruptions = self.corruptions.saturating_add(1);
        self.messages.insert(0, msg);
        self.messages.truncate(MAX_MESSAGES);
    }

    fn note(&mut self, msg: impl FnOnce() -> String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg());
        }
    }

    fn corrupt(&mut self, msg: impl FnOnce() -> String) {
        self.corrupt_n(1, msg);
    }

    /// `n` corruptions of one kind, noted once.
    fn corrupt_n(&mut self, n: u64, msg: impl FnOnce() -> String) {
        self.corruptions = self.corruptions.saturating_add(n);
        self.note(msg);
    }

    /// The refcounts of clusters `range` could not be read, one check error and (within
    /// the cap) one message each, in QEMU's wording.
    fn unreadable(&mut self, range: std::ops::Range<u64>) {
        self.check_errors = self
            .check_errors
            .saturating_add(range.end.saturating_sub(range.start));
        for cl in range.take(MAX_MESSAGES.saturating_sub(self.messages.len())) {
            self.note(|| format!("Can't get refcount for cluster {cl}: Input/output error"));
        }
    }
}

/// A refcount table entry as the comparison and the COPIED pass read it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RefBlock {
    /// No block (or one past the end of the file, which reads as zeros): its clusters'
    /// refcounts are 0.
    Absent,
    /// The block at this offset.
    At(u64),
    /// An offset that is not cluster-aligned: QEMU's `qcow2_get_refcount` refuses it, so
    /// its clusters are check errors, and `check_oflag_copied` skips what they hold.
    Unreadable,
}

struct Counter<'a, S: Storage + ?Sized> {
    storage: &'a S,
    cluster_bits: u32,
    file_len: u64,
    refs: RefCounts,
    report: CheckReport,
    /// Where the next allocated guest cluster would be if it were contiguous.
    next_contiguous: u64,
    /// When the walk gives up ([`check_references_within`]).
    deadline: Option<std::time::Instant>,
    /// A read was refused because the deadline had passed.
    timed_out: bool,
    /// The first read that failed other than on the file's bounds (I/O): the walk reads
    /// nothing more and its caller gets this error, not a report. A failed read says
    /// nothing about the image, and a report counting it as a corruption would have a
    /// repair or a preflight refuse a sound image as corrupt, or (were it counted as
    /// nothing) act on a walk that missed the references of the tables it did not read.
    io_error: Option<Error>,
    /// The COPIED flags of the active tables' entries, for the check that follows the
    /// comparison; `None` with an external data file (its data clusters count as
    /// refcount 1 whatever the refcount: [`oflag_copied`] judges those).
    copied: Option<CopiedFlags>,
}

impl<S: Storage + ?Sized> Counter<'_, S> {
    /// One reference to every cluster overlapping `[offset, offset + len)`.
    fn inc(&mut self, offset: u64, len: u64, what: &str) {
        self.inc_n(offset, len, 1, what);
    }

    /// The references `names` add to the clusters of the tables they name at `offset`:
    /// every cluster a name's table overlaps, once per name, as QEMU counts them, in one
    /// pass over the clusters of the largest (a cluster is reached by every name whose
    /// table is long enough).
    fn inc_aliased(&mut self, offset: u64, names: &Aliases, what: &str) {
        let first = offset >> self.cluster_bits;
        let mut from = first;
        let mut reaching = names.total();
        for &(size, count) in &names.sizes {
            let len = u64::from(size).saturating_mul(8);
            if len > 0 {
                let last = offset.saturating_add(len - 1) >> self.cluster_bits;
                if last >= from {
                    let clusters = last - from + 1;
                    self.inc_n(
                        from << self.cluster_bits,
                        clusters << self.cluster_bits,
                        reaching,
                        what,
                    );
                    from = last + 1;
                }
            }
            reaching = reaching.saturating_sub(count);
        }
    }

    /// `n` references to every cluster overlapping `[offset, offset + len)`: what `n`
    /// tables that name the same structure add, counted once.
    ///
    /// A range that passes the last cluster of the file is one corruption and counts
    /// nothing, as QEMU's `qcow2_inc_refcounts_imrt`, and is not walked: a declared length
    /// (a LUKS header's, a table's) is never read, so walking its in-file part first would
    /// fill a page of counters per 4096 clusters up to the end of a sparse file.
    fn inc_n(&mut self, offset: u64, len: u64, n: u32, what: &str) {
        if len == 0 || n == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = offset
            .checked_add(len - 1)
            .map(|end| end >> self.cluster_bits);
        let Some(last) = last.filter(|&l| l < self.refs.len) else {
            let at = first.max(self.refs.len) << self.cluster_bits;
            self.report.corrupt(|| {
                format!(
                    "ERROR {what} at {offset:#x} ({len:#x} bytes): cluster {at:#x} is beyond \
                     the end of the image file"
                )
            });
            return;
        };
        for c in first..=last {
            self.refs.add(c, n);
        }
    }

    /// Whether the deadline has passed (from then on, `timed_out`).
    fn past_deadline(&mut self) -> bool {
        if !self.timed_out
            && self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
        {
            self.timed_out = true;
        }
        self.timed_out
    }

    /// Reads a structure whose clusters [`inc_n`](Self::inc_n) has just counted, as QEMU's
    /// check reads it: past the end of the file it reads zeros and counts nothing more. A
    /// range that passes the file's last cluster was counted as one corruption by `inc_n`
    /// and is not walked; one that ends inside the last, partial cluster is read, the
    /// missing bytes as zeros (at most a cluster). Anything else as [`read`](Self::read).
    fn read_counted(&mut self, what: &'static str, offset: u64, len: u64) -> Option<Vec<u8>> {
        let end = offset.checked_add(len);
        if end.is_some_and(|end| end <= self.file_len) {
            return self.read(what, offset, len);
        }
        let in_last_cluster = end
            .filter(|&end| len > 0 && (end - 1) >> self.cluster_bits < self.refs.len)
            .is_some();
        if !in_last_cluster || offset >= self.file_len {
            // Reported by `inc_n` (or a structure wholly past the end: zeros name nothing).
            return None;
        }
        let mut bytes = self.read(what, offset, self.file_len - offset)?;
        bytes.resize(usize::try_from(len).ok()?, 0);
        Some(bytes)
    }

    fn read(&mut self, what: &'static str, offset: u64, len: u64) -> Option<Vec<u8>> {
        // Past the deadline nothing more is read: the walk runs on through what it has
        // and its caller gets an error, not a report.
        if self.past_deadline() || self.io_error.is_some() {
            return None;
        }
        match read_metadata(self.storage, what, offset, len) {
            Ok(b) => Some(b),
            // The bounds check: the structure lies past the end of the file.
            Err(e @ Error::Corrupt(_)) => {
                self.report.corrupt(|| format!("ERROR reading {what}: {e}"));
                None
            }
            Err(e) => {
                self.io_error = Some(e);
                None
            }
        }
    }

    /// Every L1 table (the active one and each snapshot's) with its L2 tables and, unless
    /// they live in a data file, their data clusters: QEMU's `check_refcounts_l1` and
    /// `check_refcounts_l2` for each, with the same counts.
    ///
    /// The work is bounded by the file, not by how often a structure is named: each
    /// distinct L1 table and each distinct L2 table is read once, and the references it
    /// holds are added as many times as it is named. A snapshot legitimately shares L2
    /// tables with the active L1 (and QEMU counts their data once per sharer), while a
    /// hostile L1 whose entries all name one L2 table would otherwise cost a cluster read
    /// per entry.
    ///
    /// # Errors
    /// [`Corruption::OverlappingTables`] before any table is read.
    fn l1_tables(&mut self, l1s: &[(u64, u32)], data_file: bool, extl2: bool) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        let mut l2_mult: BTreeMap<u64, u32> = BTreeMap::new();
        // The active L1's L2 tables in its order, kept from its one read: QEMU's
        // allocation and fragmentation figures follow the guest's clusters through them
        // (`CHECK_FRAG_INFO`).
        let active = l1s.first().copied();
        let mut active_order: Vec<u64> = Vec::new();
        let l1s = aliases(l1s.iter().copied());
        self.ensure_no_overlap("L1 table", &l1s)?;
        for (offset, names) in l1s {
            self.inc_aliased(offset, &names, "L1 table");
            let Some(l1) = self.read_counted("L1 table", offset, names.len_bytes()) else {
                continue;
            };
            let active_size = active.filter(|a| a.0 == offset).map(|a| a.1);
            for (i, e) in l1.chunks_exact(8).map(BigEndian::read_u64).enumerate() {
                // `check_refcounts_l1` skips only an entry that is all zeros: one with
                // reserved or flag bits and offset 0 names cluster 0 as its L2 table,
                // which is counted (a second reference to the header) and walked, as QEMU
                // walks it.
                if e == 0 {
                    continue;
                }
                let l2_off = e & L2_OFFSET_MASK;
                // Once per L1 table naming the entry; the entry is still followed.
                if e & L1_RESERVED != 0 {
                    self.report.corrupt_n(u64::from(names.past(i)), || {
                        format!("ERROR found L1 entry with reserved bits set: {e:x}")
                    });
                }
                if l2_off & (cs - 1) != 0 {
                    self.report
                        .corrupt(|| format!("ERROR L1 entry {i}: L2 offset {l2_off:#x} unaligned"));
                    continue;
                }
                let m = names.past(i);
                self.inc_n(l2_off, cs, m, "L2 table");
                bump(&mut l2_mult, l2_off, m);
                if active_size.is_some_and(|s| (i as u64) < u64::from(s)) {
                    active_order.push(l2_off);
                    // `check_oflag_copied` looks at the L2 cluster of every active entry
                    // with an offset.
                    if let (Some(f), true) = (self.copied.as_mut(), l2_off != 0) {
                        f.name(l2_off >> self.cluster_bits, e & L2_COPIED != 0);
                    }
                }
            }
        }
        // The active L1's tables first, in its order; each table is still read once.
        let mut done = std::collections::HashSet::new();
        let mut order: Vec<(u64, u32, bool)> = Vec::with_capacity(l2_mult.len());
        for l2_off in active_order {
            if let Some(&m) = l2_mult.get(&l2_off) {
                if done.insert(l2_off) {
                    order.push((l2_off, m, true));
                }
            }
        }
        for (&l2_off, &m) in &l2_mult {
            if !done.contains(&l2_off) {
                order.push((l2_off, m, false));
            }
        }
        // Read ahead a batch at a time: a cold table read waits for the device, and a
        // disk full of data has an L2 table every 512 MiB (64 KiB clusters), each its own
        // seek (`Storage::prefetch`).
        for batch in order.chunks(PREFETCH_TABLES) {
            // Past the deadline, or after a read failed, nothing more is read, nor read
            // ahead: the walk is given up.
            if self.past_deadline() || self.io_error.is_some() {
                break;
            }
            let ranges: Vec<(u64, u64)> = batch.iter().map(|&(off, _, _)| (off, cs)).collect();
            self.storage.prefetch(&ranges);
            for &(l2_off, m, frag) in batch {
                self.l2(l2_off, m, data_file, extl2, frag);
            }
        }
        if self.timed_out || self.io_error.is_some() {
            // Ranges of the last batch left unread stay fresh on a device-reading handle
            // until it reads something else; an empty prefetch ends that now, whatever
            // the caller reads next.
            self.storage.prefetch(&[]);
        }
        Ok(())
    }

    /// Refuses tables named at different offsets (`groups`, from [`aliases`]) whose
    /// lengths inside the file add up to more than the file
    /// ([`Corruption::OverlappingTables`]): the walk reads each distinct offset once, so
    /// this bounds its reads by the file. A table reaching past the end counts only its
    /// part inside (the rest is reported, not read). An error and not a reported
    /// corruption: the walk's counts would be incomplete, and a repair must never lower a
    /// refcount from them.
    fn ensure_no_overlap(&self, what: &'static str, groups: &[(u64, Aliases)]) -> Result<()> {
        ensure_tables_fit(
            what,
            self.file_len,
            groups.iter().map(|(off, names)| (*off, names.len_bytes())),
        )
    }

    /// The data clusters of the L2 table at `l2_off`, each counted `m` times; with `frag`
    /// (a table of the active L1, in its order), the allocation figures too.
    fn l2(&mut self, l2_off: u64, m: u32, data_file: bool, extl2: bool, frag: bool) {
        let cs = 1u64 << self.cluster_bits;
        // QEMU's `next_contiguous_offset` is local to `check_refcounts_l2`: the first
        // allocated cluster of each table never counts as fragmented.
        self.next_contiguous = 0;
        let Some(l2) = self.read_counted("L2 table", l2_off, cs) else {
            return;
        };
        let stride = if extl2 { 16 } else { 8 };
        for (j, e) in l2.chunks_exact(stride).enumerate() {
            let entry = BigEndian::read_u64(&e[..8]);
            // An extended entry's second word: the subcluster allocation bitmap.
            let l2_bitmap = if extl2 {
                BigEndian::read_u64(&e[8..])
            } else {
                0
            };
            // A compressed entry the checks below skip is not in QEMU's allocation figures
            // either (`check_refcounts_l2` breaks out before counting it).
            let skipped = entry & L2_COMPRESSED != 0 && (data_file || l2_bitmap != 0);
            if frag && !skipped {
                self.frag_info(entry, data_file);
            }
            if entry & L2_COMPRESSED != 0 {
                // `check_refcounts_l2`'s compressed case: the copied flag is corruption
                // (the rest of the entry is still read); with a data file, or in an
                // extended entry with a non-zero allocation bitmap, the entry is corrupt
                // and not counted.
                // qcow2_parse_compressed_l2_entry.
                let shift = 62 - (self.cluster_bits - 8);
                let coffset = entry & ((1u64 << shift) - 1);
                if entry & L2_COPIED != 0 {
                    self.report.corrupt_n(u64::from(m), || {
                        format!(
                            "ERROR: coffset={coffset:#x}: copied flag must never be set for \
                             compressed clusters"
                        )
                    });
                }
                let entry = entry & !L2_COPIED;
                if data_file {
                    self.report.corrupt_n(u64::from(m), || {
                        format!("ERROR compressed cluster {j} with data file, entry={entry:#x}")
                    });
                    continue;
                }
                if l2_bitmap != 0 {
                    self.report.corrupt_n(u64::from(m), || {
                        format!(
                            "ERROR compressed cluster {j} with non-zero subcluster allocation \
                             bitmap, entry={entry:#x}"
                        )
                    });
                    continue;
                }
                let mask = (1u64 << (self.cluster_bits - 8)) - 1;
                let sectors = ((entry >> shift) & mask) + 1;
                let csize = (sectors * 512).saturating_sub(coffset & 511);
                self.inc_n(coffset, csize, m, "compressed data");
                continue;
            }
            // `check_refcounts_l2`, once per L1 table naming this table, for every
            // entry that is not compressed, allocated or not; of an extended entry, its
            // first word (the subcluster bitmap's own rules are not checked here).
            if entry & L2_STD_RESERVED != 0 {
                self.report.corrupt_n(u64::from(m), || {
                    format!("ERROR found l2 entry with reserved bits set: {entry:x}")
                });
            }
            let data = entry & L2_OFFSET_MASK;
            if data == 0 {
                continue;
            }
            // Judged with a data file too; only the count below is skipped then. An
            // unaligned cluster is still counted, as QEMU's `inc_refcounts` counts it:
            // every cluster its `cs` bytes from the offset touch.
            if data & (cs - 1) != 0 {
                let kind = if entry & L2_ZERO != 0 {
                    "Preallocated"
                } else {
                    "Data"
                };
                self.report.corrupt_n(u64::from(m), || {
                    format!(
                        "ERROR offset={data:x}: {kind} cluster is not properly aligned; L2 \
                         entry corrupted."
                    )
                });
            }
            if data_file {
                continue;
            }
            self.inc_n(data, cs, m, "data");
            // `check_oflag_copied`'s data clusters: the aligned offsets of the active
            // tables' entries that are not compressed (a table at offset 0 it does not
            // read).
            if let (Some(f), true) = (self.copied.as_mut(), frag && l2_off != 0) {
                if data & (cs - 1) == 0 {
                    f.name(data >> self.cluster_bits, entry & L2_COPIED != 0);
                }
            }
        }
    }

    /// QEMU's `qcow2_get_cluster_type` and the `CHECK_FRAG_INFO` counts of
    /// `check_refcounts_l2` for one L2 entry of the active L1: an allocated cluster
    /// (normal, zero with an offset, or compressed); fragmented when it does not follow the
    /// last one; compressed ones count as fragmented too.
    fn frag_info(&mut self, entry: u64, data_file: bool) {
        let f = &mut self.report.frag;
        if entry & L2_COMPRESSED != 0 {
            f.allocated = f.allocated.saturating_add(1);
            f.compressed = f.compressed.saturating_add(1);
            f.fragmented = f.fragmented.saturating_add(1);
            return;
        }
        let offset = entry & L2_OFFSET_MASK;
        let allocated =
            offset != 0 || (data_file && entry & L2_COPIED != 0 && entry & L2_ZERO == 0);
        if !allocated {
            return;
        }
        f.allocated = f.allocated.saturating_add(1);
        if self.next_contiguous != 0 && offset != self.next_contiguous {
            f.fragmented = f.fragmented.saturating_add(1);
        }
        self.next_contiguous = offset.saturating_add(1u64 << self.cluster_bits);
    }

    /// The snapshot table (counted) and each snapshot's L1 table `(offset, entries)`, for
    /// [`l1_tables`](Self::l1_tables).
    ///
    /// # Errors
    /// What QEMU's `qcow2_do_read_snapshots` refuses, which fails QEMU's open and
    /// `qemu-img check` (with exit code 1): an entry with more than 1024 bytes of extra
    /// data ([`Corruption::SnapshotExtraData`]), a table above 64 MiB
    /// ([`Corruption::SnapshotTableTooBig`]). So the table counted is at most 64 MiB long.
    fn snapshots(&mut self, area: &HeaderArea) -> Result<Vec<(u64, u32)>> {
        let h = &area.header;
        let mut at = h.snapshots_offset;
        let start = at;
        let mut l1s = Vec::new();
        for i in 0..h.nb_snapshots {
            let Some(fixed) = self.read("snapshot header", at, 40) else {
                return Ok(l1s);
            };
            let l1_off = BigEndian::read_u64(&fixed[0..8]);
            let l1_size = BigEndian::read_u32(&fixed[8..12]);
            let id_len = u64::from(BigEndian::read_u16(&fixed[12..14]));
            let name_len = u64::from(BigEndian::read_u16(&fixed[14..16]));
            let extra = BigEndian::read_u32(&fixed[36..40]);
            if extra > MAX_SNAPSHOT_EXTRA_DATA {
                return Err(Corruption::SnapshotExtraData {
                    index: i,
                    size: extra,
                }
                .into());
            }
            // `qcow2_check_read_snapshot_table`: version 3 requires the large VM state
            // size and the disk size (16 bytes) in each entry's extra data.
            if h.version >= 3 && extra < MIN_V3_SNAPSHOT_EXTRA_DATA {
                self.report
                    .corrupt(|| format!("ERROR snapshot table entry {i} is incomplete"));
            }
            let len = 40 + u64::from(extra) + id_len + name_len;
            let size = (at - start).saturating_add(len);
            if size > MAX_SNAPSHOTS_SIZE {
                return Err(Corruption::SnapshotTableTooBig { index: i, size }.into());
            }
            // The entry's bytes must be in the file; its padding to 8 need not: QEMU writes
            // an entry's fields, not the padding after it, so a table at the end of the
            // file ends with its last entry's name (`qcow2_write_snapshots`).
            if at.saturating_add(len) > self.file_len {
                self.report
                    .corrupt(|| "ERROR snapshot table past end of file".to_string());
                return Ok(l1s);
            }
            let len = (len + 7) & !7;
            if l1_size > (32 << 20) / 8 {
                self.report
                    .corrupt(|| format!("ERROR snapshot {i}: L1 table of {l1_size} entries"));
            } else if l1_off & ((1u64 << self.cluster_bits) - 1) != 0 {
                // QEMU's check_refcounts_l1 skips such a table as corrupt: read at its
                // offset, it would name the wrong clusters.
                self.report.corrupt(|| {
                    format!(
                        "ERROR snapshot {i} l1_offset={l1_off:#x}: L1 table is not cluster \
                         aligned; snapshot table entry corrupted"
                    )
                });
            } else {
                l1s.push((l1_off, l1_size));
            }
            at = at.saturating_add(len);
        }
        self.inc(start, at - start, "snapshot table");
        Ok(l1s)
    }

    /// The bitmap directory, each bitmap table and each data cluster a table names
    /// (`qcow2_check_bitmaps_refcounts`), when autoclear bit 0 trusts the extension. The
    /// directory is judged with the rules QEMU applies when it opens the image (a table
    /// size that does not fit the disk makes QEMU refuse the image), so check and open
    /// never disagree. Each distinct table is read once and its data counted once per
    /// entry that names it, as QEMU counts them.
    ///
    /// # Errors
    /// [`Corruption::OverlappingTables`] before any table is read.
    fn bitmaps(&mut self, area: &HeaderArea) -> Result<()> {
        let Some(ext) = area.bitmaps else {
            return Ok(());
        };
        let h = &area.header;
        self.inc(ext.directory_offset, ext.directory_size, "bitmap directory");
        // Read as `read` reads (a second finding past the end of the file): QEMU's
        // `bitmap_list_load` reads zeros there, which no directory decodes from, and counts
        // that as a corruption of its own.
        let Some(dir) = self.read("bitmap directory", ext.directory_offset, ext.directory_size)
        else {
            return Ok(());
        };
        let geo = match h.geometry() {
            Ok(g) => g,
            Err(e) => {
                self.report
                    .corrupt(|| format!("ERROR bitmap directory: {e}"));
                return Ok(());
            }
        };
        let entries = match decode_directory_as_qemu_opens(&dir, ext.nb_bitmaps, &geo) {
            Ok(e) => e,
            Err(e) => {
                self.report
                    .corrupt(|| format!("ERROR bitmap directory: {e}"));
                return Ok(());
            }
        };
        let mut at = 0u64;
        for (index, e) in entries.iter().enumerate() {
            if let Err(reason) = e.check_table_size(&geo) {
                let err = Corruption::DirectoryEntry {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    offset: at,
                    reason,
                };
                self.report.corrupt(|| {
                    format!(
                        "ERROR bitmap {}: {err} (QEMU refuses to open the image)",
                        e.name
                    )
                });
            }
            at = at.saturating_add(e.encoded_len());
        }
        // The first entry naming each table offset, for the messages.
        let mut named: BTreeMap<u64, &DirEntry> = BTreeMap::new();
        for e in &entries {
            named.entry(e.table_offset).or_insert(e);
        }
        let cs = h.cluster_size();
        let tables = aliases(entries.iter().map(|e| (e.table_offset, e.table_size)));
        self.ensure_no_overlap("bitmap table", &tables)?;
        for (offset, names) in tables {
            self.inc_aliased(offset, &names, "bitmap table");
            let Some(table) = self.read_counted("bitmap table", offset, names.len_bytes()) else {
                continue;
            };
            let name = named
                .get(&offset)
                .map(|e| e.name.to_string())
                .unwrap_or_default();
            for (i, raw) in table.chunks_exact(8).map(BigEndian::read_u64).enumerate() {
                match TableEntry::from_raw(raw, cs) {
                    Ok(TableEntry::Data(off)) => {
                        self.inc_n(off, cs, names.past(i), "bitmap data");
                    }
                    Ok(_) => {}
                    Err(p) => self
                        .report
                        .corrupt(|| format!("ERROR bitmap {name} table entry {i} ({raw:#x}): {p}")),
                }
            }
        }
        Ok(())
    }
}

/// Refuses tables of one kind given as `(offset, bytes)`, one per distinct offset (the
/// longest named there), whose lengths inside a file of `file` bytes add up to more than
/// the file ([`Corruption::OverlappingTables`]): tables that do not overlap fit, so a walk
/// that reads each distinct offset once stays bounded by the file. A table reaching past
/// the end counts only its part inside.
///
/// # Errors
/// [`Corruption::OverlappingTables`].
pub(crate) fn ensure_tables_fit(
    what: &'static str,
    file: u64,
    tables: impl IntoIterator<Item = (u64, u64)>,
) -> Result<()> {
    let bytes = tables
        .into_iter()
        .map(|(off, len)| len.min(file.saturating_sub(off)))
        .fold(0u64, u64::saturating_add);
    if bytes > file {
        return Err(Corruption::OverlappingTables { what, bytes, file }.into());
    }
    Ok(())
}

/// The tables named at one offset (L1 tables, bitmap tables): how many names give each
/// size, by size. A hostile image may name one offset thousands of times with a different
/// size each time; the walk reads it once, at the largest, and counts entry `j` (and each
/// cluster) once per name whose table reaches it, so its work is bounded by the file, not
/// by the names times the sizes.
struct Aliases {
    /// `(entries, names)`, ascending by entries.
    sizes: Vec<(u32, u32)>,
    /// `past[k]`: the names of `sizes[k..]`.
    past: Vec<u32>,
}

impl Aliases {
    fn total(&self) -> u32 {
        self.past.first().copied().unwrap_or(0)
    }

    /// Bytes of the largest table.
    fn len_bytes(&self) -> u64 {
        self.sizes
            .last()
            .map_or(0, |&(s, _)| u64::from(s).saturating_mul(8))
    }

    /// How many names have a table of more than `j` entries, i.e. reach entry `j`.
    fn past(&self, j: usize) -> u32 {
        let k = self.sizes.partition_point(|&(s, _)| (s as usize) <= j);
        self.past.get(k).copied().unwrap_or(0)
    }
}

/// The `(offset, size)` names grouped by offset, in offset order.
fn aliases(names: impl Iterator<Item = (u64, u32)>) -> Vec<(u64, Aliases)> {
    let mut by_offset: BTreeMap<u64, BTreeMap<u32, u32>> = BTreeMap::new();
    for (offset, size) in names {
        bump(by_offset.entry(offset).or_default(), size, 1);
    }
    by_offset
        .into_iter()
        .map(|(offset, sizes)| {
            let sizes: Vec<(u32, u32)> = sizes.into_iter().collect();
            let mut past = vec![0u32; sizes.len() + 1];
            for k in (0..sizes.len()).rev() {
                past[k] = past[k + 1].saturating_add(sizes[k].1);
            }
            (offset, Aliases { sizes, past })
        })
        .collect()
}

/// Adds `n` to how often `key` is named (the multiplicity the walk reads it with).
fn bump<K: Ord>(map: &mut BTreeMap<K, u32>, key: K, n: u32) {
    let m = map.entry(key).or_insert(0);
    *m = m.saturating_add(n);
}

/// Checks an image's refcounts against its metadata. See the module docs.
///
/// # Errors
/// [`crate::Error::Unsupported`] when the file has more than 2^31 clusters or the counters
/// cannot be allocated, or when the second COPIED pass would read more than twice the
/// file and 64 MiB of refcount blocks (active entries that name clusters many times over,
/// alternating between blocks: `CopiedBatch`); [`crate::Error::Corrupt`] for a snapshot
/// table QEMU refuses to read ([`Corruption::SnapshotExtraData`],
/// [`Corruption::SnapshotTableTooBig`]: `qemu-img check` fails on it, exit 1), or for L1
/// or bitmap tables that overlap beyond the file ([`Corruption::OverlappingTables`],
/// before any is read); I/O errors.
/// Other broken structures are reported as corruptions, not errors.
pub fn check<S: Storage + ?Sized>(storage: &S, area: &HeaderArea) -> Result<CheckReport> {
    Ok(check_references(storage, area)?.0)
}

/// The header fields the reference walk ([`check_references`]) reads the image's layout
/// from: where the active L1 table, the refcount table and the snapshot table lie and how
/// large they are, the disk size, the cluster and refcount widths, the encryption method
/// and the incompatible features (the dirty and corrupt bits, an external data file,
/// extended L2 entries among them). Not the bitmaps (the activate checks their clusters
/// itself) nor the LUKS header's pointer, an extension QEMU writes once and never moves. A
/// walk made while another process wrote the image (a migration destination's preload)
/// stands for the image at a later moment only if that moment's header has the same
/// shape: a table that moved is one the walk never read. (A table rewritten at its old
/// offset and size is not seen; a qcow2 writer writes a new table into new clusters.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalkShape {
    version: u32,
    cluster_bits: u32,
    size: u64,
    crypt_method: u32,
    l1: (u64, u32),
    refcount_table: (u64, u32),
    snapshots: (u64, u32),
    incompatible_features: u64,
    refcount_order: u32,
}

impl WalkShape {
    /// The shape of the image `header` describes.
    pub(crate) fn of(header: &crate::format::Header) -> Self {
        WalkShape {
            version: header.version,
            cluster_bits: header.cluster_bits,
            size: header.size,
            crypt_method: header.crypt_method,
            l1: (header.l1_table_offset, header.l1_size),
            refcount_table: (header.refcount_table_offset, header.refcount_table_clusters),
            snapshots: (header.snapshots_offset, header.nb_snapshots),
            incompatible_features: header.incompatible_features,
            refcount_order: header.refcount_order,
        }
    }
}

/// How many times the image's metadata references each cluster, as [`check`] counts them:
/// the header, every L1 and L2 table and data cluster (the active ones and each
/// snapshot's), the snapshot table, the refcount table and blocks, the LUKS header, the
/// bitmap directory, every bitmap table and every bitmap data cluster. The store decides
/// every free and every in-place write from it, so that what may be freed or overwritten
/// is judged by the same walk as `qemu-img check`, never by a second, narrower one.
pub(crate) struct References {
    refs: RefCounts,
    cluster_bits: u32,
}

impl std::fmt::Debug for References {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("References")
            .field("clusters", &self.refs.len)
            .finish_non_exhaustive()
    }
}

impl References {
    /// References to the cluster holding byte `offset` (0 past the end of the file).
    pub(crate) fn at(&self, offset: u64) -> u64 {
        self.refs.get(offset >> self.cluster_bits)
    }

    /// One more reference to every cluster overlapping `[offset, offset + len)`; `false`
    /// if one of them is past the end of the file.
    pub(crate) fn add(&mut self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        (first..=last).all(|c| self.refs.add(c, 1))
    }

    /// Clusters the counts cover (the file's).
    pub(crate) fn clusters(&self) -> u64 {
        self.refs.len
    }

    /// Pages of counters the walk allocated.
    #[cfg(test)]
    pub(crate) fn pages_allocated(&self) -> usize {
        self.refs.pages_allocated()
    }
}

/// [`check`], also returning the reference counts it computed.
///
/// # Errors
/// As [`check`].
pub(crate) fn check_references<S: Storage + ?Sized>(
    storage: &S,
    area: &HeaderArea,
) -> Result<(CheckReport, References)> {
    walk_references(storage, area, None)
}

/// [`check_references`], given up once `budget` has passed: [`Error::Unsupported`] then
/// (no read starts after it; a read under way ends first). A walk made beside a running
/// stream reader (a migration destination's preload) must not hold it for longer.
pub(crate) fn check_references_within<S: Storage + ?Sized>(
    storage: &S,
    area: &HeaderArea,
    budget: std::time::Duration,
) -> Result<(CheckReport, References)> {
    walk_references(storage, area, std::time::Instant::now().checked_add(budget))
}

fn walk_references<S: Storage + ?Sized>(
    storage: &S,
    area: &HeaderArea,
    deadline: Option<std::time::Instant>,
) -> Result<(CheckReport, References)> {
    let h = &area.header;
    let cb = h.cluster_bits;
    let cs = h.cluster_size();
    let file_len = storage.len()?;
    let nb_clusters = file_len.div_ceil(cs);
    if nb_clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::Unsupported(format!(
            "image of {nb_clusters} clusters is too large to check"
        )));
    }
    let refs = RefCounts::new(nb_clusters)?;
    let mut ctr = Counter {
        storage,
        cluster_bits: cb,
        file_len,
        refs,
        report: CheckReport {
            total_clusters: nb_clusters,
            ..CheckReport::default()
        },
        next_contiguous: 0,
        deadline,
        timed_out: false,
        io_error: None,
        copied: if h.has_data_file() {
            None
        } else {
            Some(CopiedFlags::new(nb_clusters)?)
        },
    };
    let data_file = h.has_data_file();
    let extl2 = h.incompatible_features & INCOMPAT_EXTL2 != 0;
    ctr.inc(0, cs, "header");
    let mut l1s = vec![(h.l1_table_offset, h.l1_size)];
    if h.nb_snapshots > 0 {
        // `qcow2_check_refcounts`: an image with an external data file has no snapshots
        // (its data clusters would be shared with nothing to count them).
        if data_file {
            ctr.report
                .corrupt(|| format!("ERROR {} snapshots in image with data file", h.nb_snapshots));
        }
        l1s.extend(ctr.snapshots(area)?);
    }
    ctr.l1_tables(&l1s, data_file, extl2)?;
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    ctr.inc(h.refcount_table_offset, rt_len, "refcount table");
    if let Some(c) = area.crypto {
        ctr.inc(c.offset, c.length, "encryption header");
    }
    ctr.bitmaps(area)?;

    // Refcount blocks: each referenced once, and read for the comparison.
    let per_block = entries_per_block(cb, h.refcount_order)?;
    let rt = ctr
        .read_counted("refcount table", h.refcount_table_offset, rt_len)
        .unwrap_or_default();
    let mut blocks: Vec<RefBlock> = Vec::with_capacity(rt.len() / 8);
    // Blocks read for the comparison though the walk does not count them: QEMU's
    // `check_refblocks` skips an entry with reserved bits set (no reference, one
    // corruption), while its comparison reads the refcounts through the entry's offset
    // bits (`qcow2_get_refcount`).
    let mut uncounted: Vec<(usize, u64)> = Vec::new();
    for (i, raw) in rt.chunks_exact(8).map(BigEndian::read_u64).enumerate() {
        if raw & REFTABLE_RESERVED_MASK != 0 {
            ctr.report
                .corrupt(|| format!("ERROR refcount table entry {i} has reserved bits set"));
            // One whose offset bits are not cluster-aligned QEMU cannot read
            // (`qcow2_get_refcount` refuses it), and neither is it read here.
            let off = raw & REFTABLE_OFFSET_MASK;
            if off != 0 && !off.is_multiple_of(cs) {
                blocks.push(RefBlock::Unreadable);
                continue;
            }
            if off != 0 && off.checked_add(cs).is_some_and(|end| end <= file_len) {
                uncounted.push((i, off));
            }
            blocks.push(RefBlock::Absent);
            continue;
        }
        let entry = match decode_reftable_entry(raw, i as u64, cs) {
            Ok(e) => e,
            Err(_) => {
                // The only other problem `decode_reftable_entry` finds: an offset that is
                // not cluster-aligned, in `check_refblocks`'s wording.
                ctr.report.corrupt(|| {
                    format!(
                        "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                         corrupted"
                    )
                });
                blocks.push(RefBlock::Unreadable);
                continue;
            }
        };
        let entry = entry.filter(|&off| {
            let ok = off.checked_add(cs).is_some_and(|end| end <= file_len);
            if !ok {
                ctr.report
                    .corrupt(|| format!("ERROR refcount block {i} is outside image"));
            }
            ok
        });
        if let Some(off) = entry {
            ctr.inc(off, cs, "refcount block");
        }
        blocks.push(entry.map_or(RefBlock::Absent, RefBlock::At));
    }
    let Counter {
        refs,
        mut report,
        timed_out,
        io_error,
        copied,
        ..
    } = ctr;
    if let Some(e) = io_error {
        return Err(e);
    }
    if timed_out {
        return Err(past_budget());
    }
    for (i, b) in blocks.iter().enumerate() {
        if let RefBlock::At(off) = b {
            let r = refs.get(off >> cb);
            if r != 1 {
                report.corrupt(|| format!("ERROR refcount block {i} refcount={r}"));
            }
        }
    }
    for (i, off) in uncounted {
        if let Some(b) = blocks.get_mut(i) {
            *b = RefBlock::At(off);
        }
    }
    // Compare, one block at a time.
    let mut copied_wrong = false;
    let mut c = 0u64;
    while c < nb_clusters {
        let index = (c / per_block) as usize;
        let end = (c.saturating_add(per_block) / per_block * per_block).min(nb_clusters);
        let block = match blocks.get(index).copied().unwrap_or(RefBlock::Absent) {
            RefBlock::At(off) => {
                within(deadline)?;
                Some(storage.read_vec_at(off, cs)?)
            }
            // As `compare_refcounts`: each cluster whose refcount does not read is an
            // internal error, and compared with nothing.
            RefBlock::Unreadable => {
                report.unreadable(c..end);
                c = end;
                continue;
            }
            // No refcount block and no reference: nothing to compare (and no cluster an
            // active entry names: each is referenced).
            RefBlock::Absent if !refs.any_in(c, end) => {
                c = end;
                continue;
            }
            RefBlock::Absent => None,
        };
        for cl in c..end {
            let on_disk = match &block {
                Some(b) => get_refcount(b, h.refcount_order, cl % per_block)?,
                None => 0,
            };
            let computed = refs.get(cl);
            copied_wrong |= copied.as_ref().is_some_and(|f| f.wrong(cl, on_disk));
            if on_disk > 0 || computed > 0 {
                report.image_end_offset = cl.saturating_add(1).saturating_mul(cs);
            }
            if on_disk > computed {
                report.leaks = report.leaks.saturating_add(1);
                report.note(|| {
                    let mut s = String::new();
                    let _ = write!(
                        s,
                        "Leaked cluster {cl} refcount={on_disk} reference={computed}"
                    );
                    s
                });
            } else if on_disk < computed {
                report.corrupt(|| {
                    format!("ERROR cluster {cl} refcount={on_disk} reference={computed}")
                });
            }
        }
        c = end;
    }
    // `compare_refcounts` starts its highest cluster at cluster 0, read or not.
    report.image_end_offset = report.image_end_offset.max(cs);
    // QEMU's `check_oflag_copied`. On an image the walk and the comparison found sound,
    // every active table was read (a table that does not read is a corruption) and every
    // cluster an active entry names was compared (it is referenced, inside the file) with
    // the refcount on disk that a pass of its own would read: that pass finds a
    // corruption exactly where `copied` is wrong, so it runs only then, for QEMU's counts
    // and messages. Any corruption already found, or a data file, runs it as well: it
    // judges what it reads itself.
    if copied.is_none() || report.corruptions > 0 || copied_wrong {
        oflag_copied(storage, area, &blocks, per_block, &mut report, deadline)?;
    }
    // A walk whose last read ended past the deadline is given up too: the budget bounds
    // the whole walk, whichever pass was last.
    within(deadline)?;
    Ok((
        report,
        References {
            refs,
            cluster_bits: cb,
        },
    ))
}

/// Which of `clusters` (cluster indices, sorted) the active L1 table, or one of its L2
/// tables, names without the COPIED flag (bit 63), as a sorted list: QEMU's
/// `check_oflag_copied` calls such an entry corrupt once the cluster's refcount is 1, so a
/// repair must not lower it to 1 (QEMU's repair sets the flag then; ours writes no guest
/// metadata). Entries [`oflag_copied`] skips are skipped here too: compressed ones, and
/// data clusters of an image whose guest data is in an external file (they count as 1
/// whatever the refcount). Reads each distinct L2 table once; a table past the end of the
/// file names nothing here (the walk reported it), and a read that fails is the error.
///
/// # Errors
/// I/O: a table that could not be read may name any of `clusters`.
pub(crate) fn named_without_copied<S: Storage + ?Sized>(
    storage: &S,
    area: &HeaderArea,
    clusters: &[u64],
) -> Result<Vec<u64>> {
    let h = &area.header;
    let cb = h.cluster_bits;
    let cs = h.cluster_size();
    let mut hits = Vec::new();
    if clusters.is_empty() {
        return Ok(hits);
    }
    let wanted = |c: u64| clusters.binary_search(&c).is_ok();
    let data_file = h.has_data_file();
    let extl2 = h.incompatible_features & INCOMPAT_EXTL2 != 0;
    let stride = if extl2 { 16 } else { 8 };
    let l1_len = u64::from(h.l1_size).saturating_mul(8);
    let Some(l1) = read_or_reported(storage, "L1 table", h.l1_table_offset, l1_len)? else {
        return Ok(hits);
    };
    let mut tables = std::collections::BTreeSet::new();
    for l1e in l1.chunks_exact(8).map(BigEndian::read_u64) {
        let l2_off = l1e & L2_OFFSET_MASK;
        if l2_off == 0 || l2_off & (cs - 1) != 0 {
            continue;
        }
        if l1e & L2_COPIED == 0 && wanted(l2_off >> cb) {
            hits.push(l2_off >> cb);
        }
        tables.insert(l2_off);
    }
    if !data_file {
        for l2_off in tables {
            let Some(l2) = read_or_reported(storage, "L2 table", l2_off, cs)? else {
                continue;
            };
            for e in l2.chunks_exact(stride).map(BigEndian::read_u64) {
                let data = e & L2_OFFSET_MASK;
                if e & L2_COMPRESSED != 0 || data == 0 || data & (cs - 1) != 0 {
                    continue;
                }
                if e & L2_COPIED == 0 && wanted(data >> cb) {
                    hits.push(data >> cb);
                }
            }
        }
    }
    hits.sort_unstable();
    hits.dedup();
    Ok(hits)
}

/// [`past_budget`] once `deadline` has passed.
fn within(deadline: Option<std::time::Instant>) -> Result<()> {
    if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
        Err(past_budget())
    } else {
        Ok(())
    }
}

/// A second read of a table the walk read: `None` for one past the end of the file (the
/// walk counted that corruption), the error for a read that fails (I/O), which is no
/// verdict on the image: skipping the table would judge its entries unseen.
fn read_or_reported<S: Storage + ?Sized>(
    storage: &S,
    what: &'static str,
    offset: u64,
    len: u64,
) -> Result<Option<Vec<u8>>> {
    match read_metadata(storage, what, offset, len) {
        Ok(b) => Ok(Some(b)),
        Err(Error::Corrupt(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The error of a walk given up at its deadline ([`check_references_within`]).
fn past_budget() -> Error {
    Error::Unsupported("the reference walk ran past its time budget".to_string())
}

/// QEMU's `check_oflag_copied` and the compressed-cluster rule of `check_refcounts_l2`:
/// in the active L1 table and its L2 tables, bit 63 (COPIED) is set exactly where the
/// cluster's refcount on disk is 1 (with an external data file a data cluster counts as
/// 1), and never on a compressed cluster; each entry that breaks it is a corruption, as
/// `qemu-img check` counts it. Snapshots' tables are not looked at, as in QEMU. A second
/// read of the active tables, as QEMU's; a table past the end of the file was reported by
/// the walk and is skipped, and a read that fails ends the check with its error. The
/// lookups are resolved in batches ([`CopiedBatch`]).
///
/// # Errors
/// [`Error::Unsupported`] when the refcount blocks the entries name would cost more reads
/// than [`CopiedBatch`] allows (only a hostile image's entries alternate that way; it need
/// not be corrupt otherwise: with a data file, or one flag wrong, this pass runs anyway).
fn oflag_copied<S: Storage + ?Sized>(
    storage: &S,
    area: &HeaderArea,
    blocks: &[RefBlock],
    per_block: u64,
    report: &mut CheckReport,
    deadline: Option<std::time::Instant>,
) -> Result<()> {
    let h = &area.header;
    let cb = h.cluster_bits;
    let cs = h.cluster_size();
    let data_file = h.has_data_file();
    let extl2 = h.incompatible_features & INCOMPAT_EXTL2 != 0;
    let l1_len = u64::from(h.l1_size).saturating_mul(8);
    within(deadline)?;
    let Some(l1) = read_or_reported(storage, "L1 table", h.l1_table_offset, l1_len)? else {
        return Ok(());
    };
    let stride = if extl2 { 16 } else { 8 };
    let mut batch = CopiedBatch {
        storage,
        blocks,
        per_block,
        cluster_size: cs,
        refcount_order: h.refcount_order,
        deadline,
        lookups: Vec::new(),
        held: None,
        read_left: storage
            .len()?
            .saturating_mul(2)
            .saturating_add(COPIED_READ_SLACK),
    };
    // Each distinct L2 table is read once and its findings counted once per L1 entry that
    // names it, as QEMU counts them, so the work stays bounded by the file. The findings
    // come in QEMU's order: each L1 entry's, then (at the first entry naming it) its
    // table's. An entry whose table's refcount does not read is skipped with its table,
    // as `check_oflag_copied` skips it.
    let unreadable = |cl: u64| {
        usize::try_from(cl / per_block)
            .ok()
            .and_then(|i| blocks.get(i))
            .is_some_and(|b| *b == RefBlock::Unreadable)
    };
    let entries = || {
        l1.chunks_exact(8)
            .map(BigEndian::read_u64)
            .enumerate()
            .map(|(i, l1e)| (i, l1e, l1e & L2_OFFSET_MASK))
            .filter(|&(_, _, l2_off)| {
                l2_off != 0 && l2_off & (cs - 1) == 0 && !unreadable(l2_off >> cb)
            })
    };
    let mut l2_mult: BTreeMap<u64, u64> = BTreeMap::new();
    for (_, _, l2_off) in entries() {
        *l2_mult.entry(l2_off).or_insert(0) += 1;
    }
    let mut read = std::collections::HashSet::new();
    for (i, l1e, l2_off) in entries() {
        batch.push(Some(l2_off >> cb), Site::L2Cluster { i, l1e }, report)?;
        if !read.insert(l2_off) {
            continue;
        }
        let m = l2_mult.get(&l2_off).copied().unwrap_or(1);
        within(deadline)?;
        let Some(l2) = read_or_reported(storage, "L2 table", l2_off, cs)? else {
            continue;
        };
        for e in l2.chunks_exact(stride).map(BigEndian::read_u64) {
            // A compressed entry's copied flag is `check_refcounts_l2`'s finding, counted
            // by the walk (`l2`), not this pass's (`check_oflag_copied` looks only at
            // normal and zero-allocated entries).
            if e & L2_COMPRESSED != 0 {
                continue;
            }
            let data = e & L2_OFFSET_MASK;
            // QEMU's cluster types NORMAL and ZERO_ALLOC: an offset, or with an external
            // data file the COPIED bit on an entry that does not read as zeros.
            let zero = !extl2 && e & L2_ZERO != 0;
            let allocated = data != 0 || (data_file && e & L2_COPIED != 0 && !zero);
            if !allocated || data & (cs - 1) != 0 {
                continue;
            }
            let cl = (!data_file).then_some(data >> cb);
            batch.push(cl, Site::Data { e, m }, report)?;
        }
    }
    batch.resolve(report)
}

/// Where [`oflag_copied`] looks a refcount up: an active L1 entry (its index and value),
/// or a data entry of an active L2 table (its value, and how many active L1 entries name
/// the table).
enum Site {
    L2Cluster { i: usize, l1e: u64 },
    Data { e: u64, m: u64 },
}

/// Lookups [`CopiedBatch`] holds at once (about 72 bytes each with their refcounts and
/// their order).
const COPIED_BATCH: usize = 8192;

/// Bytes of refcount blocks [`CopiedBatch`] may read beyond twice the file's length.
const COPIED_READ_SLACK: u64 = 64 << 20;

/// [`oflag_copied`]'s lookups, resolved a batch at a time, in the entries' order (so the
/// findings keep QEMU's order): each batch's refcounts are read block by block, sorted, one
/// block held at a time and kept into the next batch (entries alternating between blocks
/// would otherwise cost a block read each, and holding every block read would let a
/// sparse file's holes, named as blocks, fill memory); then its findings are reported.
///
/// Beyond the L1 table, the table being read and two map entries per distinct table (all
/// bounded by bytes read from the file), memory stays at one batch and one block whatever
/// the image. A corrupt image runs this pass, and its tables can name a cluster with each
/// of their entries (2^27 of them in a 1 GiB file of 2 MiB clusters: listing them all
/// would take 17 GB). A batch reads a block at most once, and at most one block per
/// lookup; so when the active entries name only clusters inside the file, each at most
/// once, as in any image a writer made, the pass reads at most the file's length of
/// blocks (entries in order, as a writer allocates, cost about one read of each block).
/// Only entries naming clusters many times over, or past the end, can cost more: bounded
/// (`read_left`: twice the file and [`COPIED_READ_SLACK`]) and refused past it with a
/// typed error, rather than read without end.
struct CopiedBatch<'a, S: Storage + ?Sized> {
    storage: &'a S,
    blocks: &'a [RefBlock],
    per_block: u64,
    cluster_size: u64,
    refcount_order: u32,
    deadline: Option<std::time::Instant>,
    /// (the cluster whose refcount is looked up, `None` for one that counts as 1, where)
    lookups: Vec<(Option<u64>, Site)>,
    /// The block read last: its index and its bytes.
    held: Option<(u64, Vec<u8>)>,
    /// Bytes of blocks this pass may still read.
    read_left: u64,
}

impl<S: Storage + ?Sized> CopiedBatch<'_, S> {
    fn push(&mut self, cluster: Option<u64>, site: Site, report: &mut CheckReport) -> Result<()> {
        self.lookups.push((cluster, site));
        if self.lookups.len() >= COPIED_BATCH {
            self.resolve(report)?;
        }
        Ok(())
    }

    /// Reports the findings of the lookups held, in order, and drops them.
    fn resolve(&mut self, report: &mut CheckReport) -> Result<()> {
        let per_block = self.per_block;
        // The refcount on disk of each lookup (`None`: it does not read).
        let mut refcounts: Vec<Option<u64>> = vec![Some(1); self.lookups.len()];
        let mut order: Vec<(u64, usize)> = self
            .lookups
            .iter()
            .enumerate()
            .filter_map(|(k, (cl, _))| cl.map(|cl| (cl, k)))
            .collect();
        // The held block's lookups first: it is not read again.
        let held_index = self.held.as_ref().map(|(i, _)| *i);
        order.sort_unstable_by_key(|&(cl, _)| {
            let index = cl / per_block;
            (Some(index) != held_index, index)
        });
        for (cl, k) in order {
            let index = cl / per_block;
            let off = match usize::try_from(index)
                .ok()
                .and_then(|i| self.blocks.get(i))
                .copied()
            {
                Some(RefBlock::At(off)) => off,
                // As `qcow2_get_refcount`'s error: no finding.
                Some(RefBlock::Unreadable) => {
                    refcounts[k] = None;
                    continue;
                }
                Some(RefBlock::Absent) | None => {
                    refcounts[k] = Some(0);
                    continue;
                }
            };
            if self.held.as_ref().is_none_or(|(i, _)| *i != index) {
                within(self.deadline)?;
                self.read_left =
                    self.read_left
                        .checked_sub(self.cluster_size)
                        .ok_or_else(|| {
                            Error::Unsupported(
                                "the active tables name refcount blocks in an order that takes \
                             more than twice the file's size and 64 MiB of reads to check"
                                    .to_string(),
                            )
                        })?;
                // The block lies in the file (the comparison's `blocks`): a failed read is
                // I/O, and the check stops on it rather than skip the entries it covers.
                self.held = Some((index, self.storage.read_vec_at(off, self.cluster_size)?));
            }
            refcounts[k] = match self.held.as_ref().map(|(_, b)| b.as_slice()) {
                Some(block) => Some(get_refcount(block, self.refcount_order, cl % per_block)?),
                None => None,
            };
        }
        for ((_, site), r) in self.lookups.drain(..).zip(refcounts) {
            let Some(r) = r else { continue };
            match site {
                Site::L2Cluster { i, l1e } => {
                    if (r == 1) != (l1e & L2_COPIED != 0) {
                        report.corrupt(|| {
                            format!(
                                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} \
                                 refcount={r}"
                            )
                        });
                    }
                }
                Site::Data { e, m } => {
                    if (r == 1) != (e & L2_COPIED != 0) {
                        report.corrupt_n(m, || {
                            format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}")
                        });
                    }
                }
            }
        }
        Ok(())
    }
}
