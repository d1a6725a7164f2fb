//! What a decoder reports about malformed bytes ([`Corruption`] and the `*Problem` enums it
//! carries), and what an encoder reports about a value it cannot represent
//! ([`InvalidValue`]). These are the codecs' own error types: nothing in
//! [`format`](crate::format) depends on the crate's [`Error`](crate::Error), which lifts both
//! (`Error::Corrupt`, `Error::InvalidInput`).

/// A value a caller asked an encoder to write that the format cannot represent (a name too
/// long for its size field, a cluster size outside QEMU's range, …); the message names the
/// value and the limit. The crate's [`Error`](crate::Error) lifts it into
/// [`Error::InvalidInput`](crate::Error::InvalidInput).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

/// Builds an [`InvalidValue`] from format arguments.
macro_rules! invalid_input {
    ($($arg:tt)*) => {
        $crate::format::InvalidValue(format!($($arg)*))
    };
}
pub(crate) use invalid_input;

/// Malformed on-disk data, with where it was found and what was there.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// A structure ends before its fixed size.
    #[error(
        "{what} at offset {offset:#x} is truncated: needs {needed} bytes, {available} available"
    )]
    Truncated {
        /// The structure being decoded.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// Bytes the structure needs.
        needed: u64,
        /// Bytes that were there.
        available: u64,
    },

    // ---- image header (offset 0) ----
    /// The first four bytes are not `QFI\xfb`.
    #[error("not a qcow2 image: magic {found:#010x} at offset 0")]
    BadMagic {
        /// The value found at offset 0.
        found: u32,
    },
    /// The version at offset 4 is neither 2 nor 3.
    #[error("unsupported qcow2 version {found} at offset 4")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// cluster_bits at offset 20 is outside QEMU's 9..=21.
    #[error("unsupported cluster size 2^{found} at offset 20 (QEMU accepts 2^9..=2^21)")]
    ClusterBits {
        /// The cluster_bits found.
        found: u32,
    },
    /// A v3 header_length below 104 ("qcow2 header too short").
    #[error("qcow2 header too short: header_length {header_length} at offset 100 is below 104")]
    HeaderTooShort {
        /// The header_length found.
        header_length: u32,
    },
    /// header_length is larger than a cluster ("qcow2 header exceeds cluster size").
    #[error("qcow2 header exceeds cluster size: header_length {header_length} > {cluster_size}")]
    HeaderExceedsCluster {
        /// The header_length found.
        header_length: u32,
        /// The cluster size.
        cluster_size: u64,
    },
    /// backing_file_offset (offset 8) lies beyond the first cluster.
    #[error("invalid backing file offset {offset:#x}: beyond cluster 0 ({cluster_size} bytes)")]
    BackingFileOffset {
        /// The backing_file_offset found.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// backing_file_size is above 1023 or runs past cluster 0 ("Backing file name too long").
    #[error(
        "backing file name too long: {size} bytes at offset {offset:#x}, at most {max} allowed"
    )]
    BackingFileName {
        /// Where the name starts.
        offset: u64,
        /// The backing_file_size found.
        size: u32,
        /// The largest size QEMU accepts here.
        max: u64,
    },
    /// compression_type (offset 104) is unknown, or disagrees with incompatible bit 3.
    #[error(
        "bad compression type {found} at offset 104 (incompatible bit 3 set: {feature_bit_set})"
    )]
    CompressionType {
        /// The compression_type found (0 when the header has no such field).
        found: u8,
        /// Whether the "compression type" incompatible feature bit is set.
        feature_bit_set: bool,
    },
    /// Incompatible feature bits this crate (and QEMU) does not know are set.
    #[error("unsupported qcow2 feature(s): {}{}{}", .named.join(", "),
        if .named.is_empty() || *.unnamed == 0 { "" } else { ", " },
        if *.unnamed == 0 { String::new() } else { format!("unknown incompatible feature: {:x}", .unnamed) })]
    UnsupportedFeatures {
        /// Every unknown incompatible bit that is set (offset 72).
        bits: u64,
        /// Names of those bits taken from the image's feature name table, in table order.
        named: Vec<String>,
        /// The bits the feature name table did not name.
        unnamed: u64,
    },
    /// Extended L2 entries with clusters below 16 KiB (subclusters below 512 bytes).
    #[error(
        "unsupported subcluster size: extended L2 entries with 2^{cluster_bits}-byte clusters"
    )]
    SubclusterTooSmall {
        /// The cluster_bits found.
        cluster_bits: u32,
    },
    /// Autoclear bit 1 (`data_file_raw`) without the incompatible `data_file` bit: QEMU
    /// refuses to open the image ("data-file-raw requires a data file").
    #[error(
        "autoclear bit 1 (data_file_raw) is set without the data_file incompatible bit \
         (QEMU: data-file-raw requires a data file)"
    )]
    DataFileRawWithoutDataFile,
    /// refcount_order (offset 96) above 6.
    #[error("refcount_order {found} at offset 96 exceeds 6 (64-bit refcounts)")]
    RefcountOrder {
        /// The refcount_order found.
        found: u32,
    },
    /// crypt_method (offset 32) is not 0, 1 or 2.
    #[error("unsupported encryption method {found} at offset 32")]
    CryptMethod {
        /// The crypt_method found.
        found: u32,
    },
    /// refcount_table_clusters (offset 56) is 0.
    #[error("image does not contain a reference count table")]
    NoRefcountTable,
    /// A table named in the header is too large or its offset is invalid
    /// (QEMU's `qcow2_validate_table`).
    #[error("{table} at offset {offset:#x} with {entries} entries is too large or misplaced")]
    TableGeometry {
        /// Which table: "refcount table", "snapshot table" or "L1 table".
        table: &'static str,
        /// The table offset from the header.
        offset: u64,
        /// The entry count from the header (clusters for the refcount table).
        entries: u64,
    },
    /// A snapshot table entry with more extra data than QEMU reads
    /// (`QCOW_MAX_SNAPSHOT_EXTRA_DATA`, 1024 bytes): QEMU refuses to open the image and
    /// `qemu-img check` fails ("failed to read the snapshot table").
    #[error("too much extra metadata in snapshot table entry {index}: {size} > 1024 bytes")]
    SnapshotExtraData {
        /// The entry's index in the table.
        index: u32,
        /// Its extra_data_size.
        size: u32,
    },
    /// A snapshot table longer than QEMU reads (`QCOW_MAX_SNAPSHOTS_SIZE`, 64 MiB): QEMU
    /// refuses to open the image and `qemu-img check` fails.
    #[error("snapshot table is too big: {size} bytes at entry {index}, above 64 MiB")]
    SnapshotTableTooBig {
        /// The entry whose end passes the limit.
        index: u32,
        /// The table's length up to that entry's end.
        size: u64,
    },
    /// Tables of one kind (L1 tables, bitmap tables) named at different offsets that add
    /// up to more than the file, as far as each lies in it: tables that do not overlap
    /// fit, so these overlap at shifted offsets, and a walk of each would read the same
    /// bytes once per table (65,535 bitmap tables of 8 MiB a cluster apart: 512 GiB read
    /// from an 11 MiB file). No image QEMU writes has them; its check counts every
    /// overlapped cluster once per table, so only refcounts raised to match hide them.
    #[error(
        "{what}s named at different offsets add up to {bytes} bytes in a file of {file}: \
         they overlap"
    )]
    OverlappingTables {
        /// The kind of table.
        what: &'static str,
        /// Their lengths inside the file, added up.
        bytes: u64,
        /// The file's length.
        file: u64,
    },
    /// The virtual size needs more than `INT_MAX` L1 entries.
    #[error("image is too big: virtual size {size}")]
    ImageTooBig {
        /// The virtual size found.
        size: u64,
    },
    /// l1_size cannot map the whole virtual disk.
    #[error("L1 table is too small: {l1_size} entries, {needed} needed")]
    L1TooSmall {
        /// The l1_size found.
        l1_size: u32,
        /// The entries the virtual size needs.
        needed: u64,
    },

    // ---- header extensions ----
    /// A header extension's data runs past the extension area ("Header extension too large").
    #[error(
        "header extension too large at offset {offset:#x}: length {len}, {room} bytes of room"
    )]
    ExtensionTooLarge {
        /// Where the extension's 8-byte frame starts.
        offset: u64,
        /// The length field (0 when the frame itself does not fit).
        len: u32,
        /// Bytes left in the area after the frame (0 when the frame does not fit).
        room: u64,
    },
    /// A known header extension has a length QEMU refuses.
    #[error(
        "header extension {kind:#010x} at offset {offset:#x} has length {len}, expected {expected}"
    )]
    ExtensionLength {
        /// Where the extension's frame starts.
        offset: u64,
        /// The extension type.
        kind: u32,
        /// The length found.
        len: u32,
        /// What QEMU requires, in words.
        expected: &'static str,
    },
    /// A full-disk-encryption pointer extension in an image not encrypted with LUKS.
    #[error("crypto header extension at offset {offset:#x} with crypt_method {crypt_method}, only LUKS (2) may have one")]
    CryptoWithoutLuks {
        /// Where the extension's frame starts.
        offset: u64,
        /// The header's crypt_method.
        crypt_method: u32,
    },
    /// The LUKS header offset is not cluster-aligned.
    #[error(
        "encryption header offset {found:#x} (extension at {offset:#x}) is not cluster-aligned"
    )]
    CryptoHeaderOffset {
        /// Where the extension's frame starts.
        offset: u64,
        /// The LUKS header offset found.
        found: u64,
    },
    /// The bitmaps extension's reserved field is not zero.
    #[error("bitmaps extension at offset {offset:#x}: reserved field is {found:#x}, not zero")]
    BitmapsReserved {
        /// Where the extension's frame starts.
        offset: u64,
        /// The reserved field found.
        found: u32,
    },
    /// The bitmaps extension counts 0 bitmaps or more than 65535.
    #[error("bitmaps extension at offset {offset:#x}: nb_bitmaps {found} is outside 1..=65535")]
    BitmapCount {
        /// Where the extension's frame starts.
        offset: u64,
        /// The nb_bitmaps found.
        found: u32,
    },
    /// The bitmap directory offset is not cluster-aligned.
    #[error("bitmaps extension at offset {offset:#x}: directory offset {found:#x} is not cluster-aligned")]
    BitmapDirectoryOffset {
        /// Where the extension's frame starts.
        offset: u64,
        /// The directory offset found.
        found: u64,
    },
    /// The bitmap directory size exceeds 67,107,840 bytes.
    #[error("bitmaps extension at offset {offset:#x}: directory size {found} exceeds 67107840")]
    BitmapDirectorySize {
        /// Where the extension's frame starts.
        offset: u64,
        /// The directory size found.
        found: u64,
    },

    // ---- bitmap directory (offsets relative to the directory start) ----
    /// The directory is empty or larger than 67,107,840 bytes.
    #[error("bitmap directory size {found} is 0 or exceeds 67107840")]
    DirectorySize {
        /// The directory size.
        found: u64,
    },
    /// An entry's name or padding runs past the end of the directory ("Broken bitmap directory").
    #[error(
        "broken bitmap directory: entry {index} at offset {offset:#x} runs past the end ({end:#x})"
    )]
    DirectoryEntryPastEnd {
        /// The entry's index.
        index: u32,
        /// Where the entry starts.
        offset: u64,
        /// The directory size.
        end: u64,
    },
    /// Fewer than 24 bytes are left after the last whole entry ("Broken bitmap directory").
    #[error("broken bitmap directory: {len} stray bytes at offset {offset:#x}")]
    DirectoryTrailingBytes {
        /// Where the stray bytes start.
        offset: u64,
        /// How many there are.
        len: u64,
    },
    /// The directory holds more entries than the extension's nb_bitmaps.
    #[error("more bitmaps found than the {expected} in the header extension (extra entry at {offset:#x})")]
    TooManyBitmaps {
        /// nb_bitmaps from the extension.
        expected: u32,
        /// Where the extra entry starts.
        offset: u64,
    },
    /// The directory holds fewer entries than the extension's nb_bitmaps.
    #[error("fewer bitmaps found ({found}) than the {expected} in the header extension")]
    TooFewBitmaps {
        /// nb_bitmaps from the extension.
        expected: u32,
        /// Entries found.
        found: u32,
    },
    /// A directory entry breaks one of QEMU's constraints.
    #[error("bitmap directory entry {index} at offset {offset:#x}: {reason}")]
    DirectoryEntry {
        /// The entry's index.
        index: u32,
        /// Where the entry starts, relative to the directory.
        offset: u64,
        /// Which constraint, and what was found.
        reason: EntryProblem,
    },

    // ---- refcount structures ----
    /// A refcount is inconsistent with the metadata that uses the cluster (for example a
    /// cluster about to be freed already has refcount 0).
    #[error("cluster {cluster:#x}: {what}")]
    Refcount {
        /// The cluster's byte offset.
        cluster: u64,
        /// What was wrong.
        what: &'static str,
    },
    /// The image's metadata and refcounts disagree the way `qemu-img check` calls
    /// corruption (a cluster referenced more often than its refcount says, a structure past
    /// the end of the file, a bad table entry, a directory QEMU would refuse). Reading goes
    /// on; every write is refused before it starts, since the allocator could hand out a
    /// cluster that something still references. What repairs it depends on `found`: a
    /// finding in the bitmaps' structures is `dbm check -r all`'s to repair (it removes the
    /// broken bitmaps), since `qemu-img check -r all` repairs refcounts only and keeps a
    /// broken bitmap, which may then read as clean (a table past the end of the file, say,
    /// which QEMU reads as zeros).
    #[error(
        "the image fails `qemu-img check` with {corruptions} error(s) (first: {first}); \
         writes are refused until {}",
        found.advice()
    )]
    CheckFailed {
        /// Corruptions found.
        corruptions: u64,
        /// The first finding, in `qemu-img check`'s wording.
        first: String,
        /// Which structures the findings lie in.
        found: CheckFindings,
    },
    /// A cluster of the bitmap directory, a bitmap table or a consistent bitmap's data is
    /// not owned by exactly one reference with refcount 1: two directory entries share a
    /// table, two table entries share a data cluster, or a bitmap structure overlaps other
    /// metadata or guest data. Bitmaps are written in place, so such a cluster would be
    /// overwritten under its other owner; every write is refused before it starts.
    #[error(
        "{what} cluster {offset:#x} is referenced {references} time(s) with refcount \
         {refcount}; a bitmap cluster must have exactly one reference and refcount 1"
    )]
    SharedCluster {
        /// The cluster's byte offset.
        offset: u64,
        /// Which bitmap structure names it.
        what: &'static str,
        /// References to it that the image's metadata holds.
        references: u64,
        /// Its refcount.
        refcount: u64,
    },
    /// A metadata structure lies (partly) past the end of the image file.
    #[error("{what} at offset {offset:#x} ({len} bytes) lies past the end of the file ({file_len} bytes)")]
    PastEnd {
        /// The structure.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file length.
        file_len: u64,
    },

    // ---- bitmap table and refcount table ----
    /// A bitmap table entry is invalid.
    #[error("bitmap table entry {index} ({raw:#018x}): {reason}")]
    TableEntry {
        /// The entry's index in the table.
        index: u64,
        /// The raw big-endian value.
        raw: u64,
        /// What is wrong with it.
        reason: TableEntryProblem,
    },
    /// A refcount table entry is invalid.
    #[error("refcount table entry {index} ({raw:#018x}): {reason}")]
    RefcountTableEntry {
        /// The entry's index in the refcount table.
        index: u64,
        /// The raw big-endian value.
        raw: u64,
        /// What is wrong with it.
        reason: RefcountEntryProblem,
    },
}

impl Corruption {
    /// Whether this is a problem of the bitmaps extension's own fields (a reserved field, a
    /// bitmap count of 0 or above 65535, an unaligned directory offset, a directory above
    /// the size limit): the extension is unusable as a whole, and a repair drops it.
    pub fn is_bitmaps_extension(&self) -> bool {
        matches!(
            self,
            Corruption::BitmapsReserved { .. }
                | Corruption::BitmapCount { .. }
                | Corruption::BitmapDirectoryOffset { .. }
                | Corruption::BitmapDirectorySize { .. }
        )
    }
}

/// Which structures the findings of a [`Corruption::CheckFailed`] lie in: the image's own
/// metadata and refcounts, the bitmaps' (the directory, the tables and the data clusters
/// they name: what a walk of the rest of the image does not find), or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckFindings {
    /// Only outside the bitmaps: `qemu-img check -r all` repairs them.
    Image,
    /// Only in the bitmaps: `dbm check -r all` removes the broken bitmaps.
    Bitmaps,
    /// In both: `dbm check -r all` refuses until `qemu-img check -r all` has repaired the
    /// rest, and that may keep a broken bitmap as clean.
    Both,
}

impl CheckFindings {
    /// What the refusal tells the user to run.
    fn advice(&self) -> &'static str {
        match self {
            CheckFindings::Image => "`qemu-img check -r all` repairs it",
            CheckFindings::Bitmaps => {
                "`dbm check -r all` removes the broken bitmaps (`qemu-img check -r all` \
                 repairs refcounts only, and a broken bitmap it keeps may read as clean)"
            }
            CheckFindings::Both => {
                "`qemu-img check -r all` repairs it; a broken bitmap it keeps may then read \
                 as clean, so treat every bitmap of the image as all dirty afterwards"
            }
        }
    }
}

/// Why a bitmap directory entry was rejected (QEMU's `bitmap_list_load` and `check_dir_entry`).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    /// extra_data_size is not 0 ("Bitmap extra data is not supported").
    #[error("extra_data_size {size} is not 0")]
    ExtraData {
        /// The extra_data_size found.
        size: u32,
    },
    /// bitmap_table_size is 0.
    #[error("bitmap_table_size is 0")]
    TableSizeZero,
    /// bitmap_table_size is above 2^27.
    #[error("bitmap_table_size {size} exceeds 2^27")]
    TableSizeTooLarge {
        /// The bitmap_table_size found.
        size: u32,
    },
    /// bitmap_table_offset is 0.
    #[error("bitmap_table_offset is 0")]
    TableOffsetZero,
    /// bitmap_table_offset is not cluster-aligned.
    #[error("bitmap_table_offset {offset:#x} is not cluster-aligned")]
    TableOffsetUnaligned {
        /// The bitmap_table_offset found.
        offset: u64,
    },
    /// granularity_bits is outside 9..=31.
    #[error("granularity_bits {bits} is outside 9..=31")]
    Granularity {
        /// The granularity_bits found.
        bits: u8,
    },
    /// A flag outside in_use and auto is set (QEMU rejects bit 2 as well).
    #[error("reserved flags set: {flags:#010x}")]
    ReservedFlags {
        /// The whole flags field.
        flags: u32,
    },
    /// name_size is 0 (the spec forbids it; QEMU does not check).
    #[error("name_size is 0")]
    NameEmpty,
    /// name_size is above 1023.
    #[error("name_size {size} exceeds 1023")]
    NameTooLong {
        /// The name_size found.
        size: u16,
    },
    /// Another entry earlier in the directory has the same name.
    #[error("duplicate bitmap name {name:?}")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// type is not 1 (dirty tracking).
    #[error("type {found} is not 1 (dirty tracking)")]
    Type {
        /// The type found.
        found: u8,
    },
    /// bitmap_table_size × cluster_size exceeds 512 MiB.
    #[error("bitmap occupies {bytes} bytes on disk, more than 512 MiB")]
    PhysicalSizeTooLarge {
        /// bitmap_table_size × cluster_size.
        bytes: u64,
    },
    /// A consistent (not in_use) bitmap's table cannot cover the whole disk.
    #[error("table covers {covered} guest bytes, less than the disk size {disk_size}")]
    TooSmallForDisk {
        /// Guest bytes the table can describe.
        covered: u128,
        /// The disk size.
        disk_size: u64,
    },
    /// A consistent bitmap's table size differs from the one QEMU computes for the disk.
    #[error("bitmap_table_size {found} differs from the {expected} the disk size needs")]
    TableSizeMismatch {
        /// The bitmap_table_size found.
        found: u32,
        /// ceil(size / (granularity · cluster_size · 8)).
        expected: u64,
    },
}

/// Why a bitmap table entry was rejected (QEMU's `check_table_entry`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableEntryProblem {
    /// One of bits 1-8 or 56-63 is set.
    #[error("reserved bits set")]
    ReservedBits,
    /// Bit 0 (all ones) is set together with a data offset.
    #[error("all-ones bit set with a data offset")]
    OnesWithOffset,
    /// The data offset is not cluster-aligned.
    #[error("data offset is not cluster-aligned")]
    Unaligned,
}

/// Why a refcount table entry was rejected (QEMU's refcount checks).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RefcountEntryProblem {
    /// One of bits 0-8 is set.
    #[error("reserved bits set")]
    ReservedBits,
    /// The refcount block offset is not cluster-aligned.
    #[error("refcount block offset is not cluster-aligned")]
    Unaligned,
}
