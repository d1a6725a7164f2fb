//! The qcow2 image header: the fixed fields at offset 0 of cluster 0.
//!
//! Byte table: `docs/FORMAT.md`, "Image header". Decoding applies every check QEMU's
//! `qcow2_do_open` makes before it reads the extensions; encoding writes the header the way
//! `qcow2_update_header` does (72 bytes for v2, 112 plus the preserved unknown fields for v3).

use super::bytes::{be_u32, be_u64, be_u8, put_u32, put_u64, slice, to_u64, truncated};
use super::corruption::{invalid_input, Corruption, InvalidValue};
use super::feature::{scan_feature_table, unsupported_features};

/// `QFI\xfb`, the first four bytes of every qcow2 image.
pub const MAGIC: u32 = 0x5146_49FB;
/// Size of a version 2 header; also its implied header_length.
pub const HEADER_V2_LEN: usize = 72;
/// The smallest header_length QEMU accepts for version 3.
pub const HEADER_V3_MIN_LEN: usize = 104;
/// `sizeof(QCowHeader)`: the v3 header QEMU writes, before any preserved unknown fields.
pub const HEADER_V3_LEN: usize = 112;
/// Smallest cluster_bits QEMU accepts (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU accepts (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest refcount_order (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Largest backing file name QEMU reads or writes.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;

pub use super::feature::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, AUTOCLEAR_MASK, COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
    INCOMPAT_MASK,
};

/// crypt_method 0: no encryption.
pub const CRYPT_NONE: u32 = 0;
/// crypt_method 1: legacy AES-CBC.
pub const CRYPT_AES: u32 = 1;
/// crypt_method 2: LUKS (needs the full disk encryption header pointer extension).
pub const CRYPT_LUKS: u32 = 2;
/// compression_type 0: deflate ("zlib").
pub const COMPRESSION_ZLIB: u8 = 0;
/// compression_type 1: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;

// Field offsets (docs/FORMAT.md, "Image header").
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_BACKING_FILE_OFFSET: usize = 8;
const OFF_BACKING_FILE_SIZE: usize = 16;
const OFF_CLUSTER_BITS: usize = 20;
const OFF_SIZE: usize = 24;
const OFF_CRYPT_METHOD: usize = 32;
const OFF_L1_SIZE: usize = 36;
const OFF_L1_TABLE_OFFSET: usize = 40;
const OFF_REFCOUNT_TABLE_OFFSET: usize = 48;
const OFF_REFCOUNT_TABLE_CLUSTERS: usize = 56;
const OFF_NB_SNAPSHOTS: usize = 60;
const OFF_SNAPSHOTS_OFFSET: usize = 64;
const OFF_INCOMPATIBLE_FEATURES: usize = 72;
const OFF_COMPATIBLE_FEATURES: usize = 80;
const OFF_AUTOCLEAR_FEATURES: usize = 88;
const OFF_REFCOUNT_ORDER: usize = 96;
const OFF_HEADER_LENGTH: usize = 100;
const OFF_COMPRESSION_TYPE: usize = 104;
// Bytes 105..112 are padding that QEMU writes as zero and never reads.

// Limits of QEMU's `qcow2_validate_table` calls in `qcow2_do_open`.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const SNAPSHOT_HEADER_LEN: u64 = 40;
const MAX_SNAPSHOTS: u64 = 65536;
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
const L1_ENTRY_LEN: u64 = 8;

/// The qcow2 header, every field of versions 2 and 3.
///
/// Field docs quote `docs/interop/qcow2.rst`. A v2 header has no fields past
/// `snapshots_offset`; decoding fills in what QEMU implies (features 0, refcount_order 4,
/// header_length 72).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// "Version number (valid values are 2 and 3)". Offset 4.
    pub version: u32,
    /// "Offset into the image file at which the backing file name is stored (NB: The string is
    /// not null terminated). 0 if the image doesn't have a backing file." Offset 8.
    pub backing_file_offset: u64,
    /// "Length of the backing file name in bytes. Must not be longer than 1023 bytes.
    /// Undefined if the image doesn't have a backing file." Offset 16.
    pub backing_file_size: u32,
    /// "Number of bits that are used for addressing an offset within a cluster
    /// (1 << cluster_bits is the cluster size)." QEMU accepts 9..=21. Offset 20.
    pub cluster_bits: u32,
    /// "Virtual disk size in bytes." Offset 24.
    pub size: u64,
    /// "0 for no encryption, 1 for AES encryption, 2 for LUKS encryption." Offset 32.
    pub crypt_method: u32,
    /// "Number of entries in the active L1 table." Offset 36.
    pub l1_size: u32,
    /// "Offset into the image file at which the active L1 table starts. Must be aligned to a
    /// cluster boundary." Offset 40.
    pub l1_table_offset: u64,
    /// "Offset into the image file at which the refcount table starts. Must be aligned to a
    /// cluster boundary." Offset 48.
    pub refcount_table_offset: u64,
    /// "Number of clusters that the refcount table occupies." Offset 56.
    pub refcount_table_clusters: u32,
    /// "Number of snapshots contained in the image." Offset 60.
    pub nb_snapshots: u32,
    /// "Offset into the image file at which the snapshot table starts. Must be aligned to a
    /// cluster boundary." Offset 64.
    pub snapshots_offset: u64,
    /// "Bitmask of incompatible features. An implementation must fail to open an image if an
    /// unknown bit is set." v3 only; offset 72.
    pub incompatible_features: u64,
    /// "Bitmask of compatible features. An implementation can safely ignore any unknown bits
    /// that are set." v3 only; offset 80.
    pub compatible_features: u64,
    /// "Bitmask of auto-clear features. An implementation may only write to an image with
    /// unknown auto-clear features if it clears the respective bits from this field first."
    /// v3 only; offset 88.
    pub autoclear_features: u64,
    /// "Describes the width of a reference count block entry (width in bits:
    /// refcount_bits = 1 << refcount_order)." At most 6; v2 implies 4. Offset 96.
    pub refcount_order: u32,
    /// "Length of the header structure in bytes. For version 2 images, the length is always
    /// assumed to be 72 bytes." v3: at least 104. Offset 100.
    pub header_length: u32,
    /// "Defines the compression method used for compressed clusters": 0 deflate, 1 zstd.
    /// Present only when header_length > 104; otherwise 0. Offset 104.
    pub compression_type: u8,
    /// Header bytes from offset 112 up to header_length, which QEMU does not know and keeps
    /// verbatim (`unknown_header_fields`).
    pub unknown_fields: Vec<u8>,
}

/// Cluster size and guest disk length: what the bitmap checks need from the header.
///
/// The constructor guarantees `cluster_bits` is within 9..=21, so the cluster size needs no
/// further checking before arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGeometry {
    cluster_bits: u32,
    disk_size: u64,
}

impl ImageGeometry {
    /// Geometry for 2^`cluster_bits`-byte clusters and a disk of `disk_size` bytes.
    ///
    /// # Errors
    /// [`Corruption::ClusterBits`] if `cluster_bits` is outside 9..=21.
    pub fn new(cluster_bits: u32, disk_size: u64) -> Result<Self, Corruption> {
        check_cluster_bits(cluster_bits)?;
        Ok(Self {
            cluster_bits,
            disk_size,
        })
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The guest disk length in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }
}

/// Checks QEMU's cluster_bits range.
pub(crate) fn check_cluster_bits(cluster_bits: u32) -> Result<u64, Corruption> {
    if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        Ok(1u64 << cluster_bits)
    } else {
        Err(Corruption::ClusterBits {
            found: cluster_bits,
        })
    }
}

fn need(bytes: &[u8], n: usize) -> Result<(), Corruption> {
    if bytes.len() < n {
        Err(truncated("qcow2 header", 0, to_u64(n), to_u64(bytes.len())))
    } else {
        Ok(())
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, Corruption> {
    be_u32(bytes, at).ok_or_else(|| {
        truncated(
            "qcow2 header",
            0,
            to_u64(at).saturating_add(4),
            to_u64(bytes.len()),
        )
    })
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64, Corruption> {
    be_u64(bytes, at).ok_or_else(|| {
        truncated(
            "qcow2 header",
            0,
            to_u64(at).saturating_add(8),
            to_u64(bytes.len()),
        )
    })
}

/// QEMU's `qcow2_validate_table`: the table must not be larger than `max_bytes`, must end
/// below `i64::MAX`, and must start on a cluster boundary.
fn validate_table(
    table: &'static str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Result<(), Corruption> {
    let err = Corruption::TableGeometry {
        table,
        offset,
        entries,
    };
    // entry_len is never 0 (constants and the cluster size).
    if entries > max_bytes.checked_div(entry_len).unwrap_or(0) {
        return Err(err);
    }
    let bytes = entries.checked_mul(entry_len).ok_or_else(|| err.clone())?;
    let room = (i64::MAX as u64)
        .checked_sub(bytes)
        .ok_or_else(|| err.clone())?;
    if room < offset || !offset.is_multiple_of(cluster_size) {
        return Err(err);
    }
    Ok(())
}

impl Header {
    /// The version 3 header `qemu-img create -f qcow2` writes for a disk of `size` bytes with
    /// 2^`cluster_bits`-byte clusters: 16-bit refcounts, a 112-byte header, deflate, no
    /// feature bits, no backing file, no snapshots, no encryption. The table fields
    /// (`l1_size`, `l1_table_offset`, `refcount_table_offset`, `refcount_table_clusters`)
    /// are 0; the caller sets them where it lays the tables out:
    ///
    /// ```
    /// use dirty_bitmap::format::Header;
    /// let h = Header { l1_size: 2, l1_table_offset: 0x30000, refcount_table_offset: 0x10000,
    ///                  refcount_table_clusters: 1, ..Header::v3(16, 1 << 30) };
    /// assert_eq!(h.encode()?.len(), 112);
    /// # Ok::<(), dirty_bitmap::format::InvalidValue>(())
    /// ```
    pub fn v3(cluster_bits: u32, size: u64) -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: CRYPT_NONE,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: HEADER_V3_LEN as u32,
            compression_type: COMPRESSION_ZLIB,
            unknown_fields: Vec::new(),
        }
    }

    /// Decodes and validates the header at the start of `bytes` (normally the whole first
    /// cluster).
    ///
    /// Applies QEMU's open-time checks in QEMU's order: magic, version, cluster_bits,
    /// header_length, backing file offset, compression type, unknown incompatible features,
    /// subcluster size, refcount_order, the refcount/snapshot/L1 table geometry, the L1 size,
    /// crypt_method and the backing file name length. When unknown incompatible bits are set,
    /// the image's own feature name table (if `bytes` holds it) supplies their names.
    ///
    /// # Errors
    /// [`Corruption::Truncated`] if `bytes` ends before the header does, otherwise the
    /// variant naming the first check that failed.
    pub fn decode(bytes: &[u8]) -> Result<Self, Corruption> {
        need(bytes, HEADER_V2_LEN)?;
        let magic = u32_at(bytes, OFF_MAGIC)?;
        if magic != MAGIC {
            return Err(Corruption::BadMagic { found: magic });
        }
        let version = u32_at(bytes, OFF_VERSION)?;
        if version != 2 && version != 3 {
            return Err(Corruption::UnsupportedVersion { found: version });
        }
        let cluster_bits = u32_at(bytes, OFF_CLUSTER_BITS)?;
        let cluster_size = check_cluster_bits(cluster_bits)?;

        let mut h = Header {
            version,
            backing_file_offset: u64_at(bytes, OFF_BACKING_FILE_OFFSET)?,
            backing_file_size: u32_at(bytes, OFF_BACKING_FILE_SIZE)?,
            cluster_bits,
            size: u64_at(bytes, OFF_SIZE)?,
            crypt_method: u32_at(bytes, OFF_CRYPT_METHOD)?,
            l1_size: u32_at(bytes, OFF_L1_SIZE)?,
            l1_table_offset: u64_at(bytes, OFF_L1_TABLE_OFFSET)?,
            refcount_table_offset: u64_at(bytes, OFF_REFCOUNT_TABLE_OFFSET)?,
            refcount_table_clusters: u32_at(bytes, OFF_REFCOUNT_TABLE_CLUSTERS)?,
            nb_snapshots: u32_at(bytes, OFF_NB_SNAPSHOTS)?,
            snapshots_offset: u64_at(bytes, OFF_SNAPSHOTS_OFFSET)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: HEADER_V2_LEN as u32,
            compression_type: COMPRESSION_ZLIB,
            unknown_fields: Vec::new(),
        };

        if version == 3 {
            need(bytes, HEADER_V3_MIN_LEN)?;
            h.incompatible_features = u64_at(bytes, OFF_INCOMPATIBLE_FEATURES)?;
            h.compatible_features = u64_at(bytes, OFF_COMPATIBLE_FEATURES)?;
            h.autoclear_features = u64_at(bytes, OFF_AUTOCLEAR_FEATURES)?;
            h.refcount_order = u32_at(bytes, OFF_REFCOUNT_ORDER)?;
            h.header_length = u32_at(bytes, OFF_HEADER_LENGTH)?;
            if (h.header_length as usize) < HEADER_V3_MIN_LEN {
                return Err(Corruption::HeaderTooShort {
                    header_length: h.header_length,
                });
            }
        }
        if u64::from(h.header_length) > cluster_size {
            return Err(Corruption::HeaderExceedsCluster {
                header_length: h.header_length,
                cluster_size,
            });
        }
        if version == 3 {
            let len = h.header_length as usize;
            need(bytes, len)?;
            // The compression type exists only when the header reaches past offset 104;
            // a 104-byte header's extensions start right there.
            if len > OFF_COMPRESSION_TYPE {
                h.compression_type = be_u8(bytes, OFF_COMPRESSION_TYPE).unwrap_or(0);
            }
            if len > HEADER_V3_LEN {
                let extra = len.saturating_sub(HEADER_V3_LEN);
                h.unknown_fields = slice(bytes, HEADER_V3_LEN, extra)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| {
                        truncated("qcow2 header", 0, to_u64(len), to_u64(bytes.len()))
                    })?;
            }
        }
        if h.backing_file_offset > cluster_size {
            return Err(Corruption::BackingFileOffset {
                offset: h.backing_file_offset,
                cluster_size,
            });
        }
        h.check_compression_type()?;
        if h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 && !h.has_data_file() {
            return Err(Corruption::DataFileRawWithoutDataFile);
        }

        let unknown = h.incompatible_features & !INCOMPAT_MASK;
        if unknown != 0 {
            let (start, end) = h.extension_area();
            let table = scan_feature_table(bytes, start, end);
            return Err(unsupported_features(unknown, &table));
        }
        if h.incompatible_features & INCOMPAT_EXTL2 != 0 && cluster_bits < MIN_CLUSTER_BITS + 5 {
            // 32 subclusters per cluster; each must be at least 512 bytes.
            return Err(Corruption::SubclusterTooSmall { cluster_bits });
        }
        if h.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(Corruption::RefcountOrder {
                found: h.refcount_order,
            });
        }
        if h.refcount_table_clusters == 0 {
            return Err(Corruption::NoRefcountTable);
        }
        validate_table(
            "refcount table",
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters),
            cluster_size,
            MAX_REFTABLE_BYTES,
            cluster_size,
        )?;
        validate_table(
            "snapshot table",
            h.snapshots_offset,
            u64::from(h.nb_snapshots),
            SNAPSHOT_HEADER_LEN,
            SNAPSHOT_HEADER_LEN * MAX_SNAPSHOTS,
            cluster_size,
        )?;
        validate_table(
            "L1 table",
            h.l1_table_offset,
            u64::from(h.l1_size),
            L1_ENTRY_LEN,
            MAX_L1_BYTES,
            cluster_size,
        )?;
        let needed = h.l1_entries_needed();
        if needed > i32::MAX as u64 {
            return Err(Corruption::ImageTooBig { size: h.size });
        }
        if u64::from(h.l1_size) < needed {
            return Err(Corruption::L1TooSmall {
                l1_size: h.l1_size,
                needed,
            });
        }
        if h.crypt_method > CRYPT_LUKS {
            return Err(Corruption::CryptMethod {
                found: h.crypt_method,
            });
        }
        if h.backing_file_offset != 0 {
            // backing_file_offset <= cluster_size was checked above.
            let room = cluster_size.saturating_sub(h.backing_file_offset);
            let max = room.min(u64::from(MAX_BACKING_FILE_NAME));
            if u64::from(h.backing_file_size) > max {
                return Err(Corruption::BackingFileName {
                    offset: h.backing_file_offset,
                    size: h.backing_file_size,
                    max,
                });
            }
        }
        Ok(h)
    }

    /// QEMU's `validate_compression_type`: the type must be deflate or zstd, and the
    /// "compression type" incompatible bit must be set exactly when it is not deflate.
    fn check_compression_type(&self) -> Result<(), Corruption> {
        let bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        let ok = match self.compression_type {
            COMPRESSION_ZLIB => !bit,
            COMPRESSION_ZSTD => bit,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(Corruption::CompressionType {
                found: self.compression_type,
                feature_bit_set: bit,
            })
        }
    }

    /// L1 entries needed to map `size` bytes (QEMU's `size_to_l1`).
    pub(crate) fn l1_entries_needed(&self) -> u64 {
        // An L2 table is one cluster of 8-byte entries (16 with extended L2), each mapping
        // one cluster. cluster_bits <= 21, so the shift is at most 2·21 − 3 = 39.
        let l2_entry_bits = if self.incompatible_features & INCOMPAT_EXTL2 != 0 {
            4
        } else {
            3
        };
        let shift = self
            .cluster_bits
            .saturating_mul(2)
            .saturating_sub(l2_entry_bits)
            .min(63);
        let whole = self.size >> shift;
        let rest = self.size & ((1u64 << shift).wrapping_sub(1));
        whole.saturating_add(u64::from(rest != 0))
    }

    /// Encodes the header the way QEMU's `qcow2_update_header` lays it out.
    ///
    /// Version 3 writes 112 bytes plus [`Header::unknown_fields`], and sets header_length to
    /// that total whatever [`Header::header_length`] says. Version 2 writes 72 bytes.
    /// Bytes 105..112 are written as zero.
    ///
    /// # Errors
    /// [`InvalidValue`] if the version is not 2 or 3, cluster_bits is outside 9..=21,
    /// the header would not fit in one cluster, or a v2 header carries v3-only values.
    pub fn encode(&self) -> Result<Vec<u8>, InvalidValue> {
        let cluster_size = check_cluster_bits(self.cluster_bits)
            .map_err(|_| invalid_input!("cluster_bits {} is outside 9..=21", self.cluster_bits))?;
        let v3 = match self.version {
            2 => false,
            3 => true,
            v => return Err(invalid_input!("qcow2 version {v} is not 2 or 3")),
        };
        if !v3
            && (self.incompatible_features != 0
                || self.compatible_features != 0
                || self.autoclear_features != 0
                || self.refcount_order != 4
                || self.compression_type != COMPRESSION_ZLIB
                || !self.unknown_fields.is_empty())
        {
            return Err(invalid_input!(
                "a v2 header cannot carry feature bits, refcount_order other than 4, \
                 a compression type or unknown header fields"
            ));
        }
        let total = if v3 {
            HEADER_V3_LEN.saturating_add(self.unknown_fields.len())
        } else {
            HEADER_V2_LEN
        };
        if to_u64(total) > cluster_size {
            return Err(invalid_input!(
                "header of {total} bytes does not fit in a {cluster_size}-byte cluster"
            ));
        }
        let header_length = u32::try_from(total)
            .map_err(|_| invalid_input!("header of {total} bytes is too long"))?;

        let mut out = Vec::with_capacity(total);
        put_u32(&mut out, MAGIC);
        put_u32(&mut out, self.version);
        put_u64(&mut out, self.backing_file_offset);
        put_u32(&mut out, self.backing_file_size);
        put_u32(&mut out, self.cluster_bits);
        put_u64(&mut out, self.size);
        put_u32(&mut out, self.crypt_method);
        put_u32(&mut out, self.l1_size);
        put_u64(&mut out, self.l1_table_offset);
        put_u64(&mut out, self.refcount_table_offset);
        put_u32(&mut out, self.refcount_table_clusters);
        put_u32(&mut out, self.nb_snapshots);
        put_u64(&mut out, self.snapshots_offset);
        if v3 {
            put_u64(&mut out, self.incompatible_features);
            put_u64(&mut out, self.compatible_features);
            put_u64(&mut out, self.autoclear_features);
            put_u32(&mut out, self.refcount_order);
            put_u32(&mut out, header_length);
            out.push(self.compression_type);
            out.resize(HEADER_V3_LEN, 0);
            out.extend_from_slice(&self.unknown_fields);
        }
        Ok(out)
    }

    /// The cluster size in bytes (cluster_bits is within 9..=21 on every decoded header).
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }

    /// Whether this image can hold persistent bitmaps: only version 3 can
    /// ("Cannot store dirty bitmaps in qcow2 v2 files").
    pub fn can_hold_bitmaps(&self) -> bool {
        self.version >= 3
    }

    /// Whether the incompatible `data_file` bit is set: the guest data is in the external
    /// file the `data_file` extension names. Without it QEMU ignores that name.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// Whether autoclear bit 0 is set, i.e. a bitmaps extension may be trusted.
    pub fn bitmaps_consistent(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_BITMAPS != 0
    }

    /// The autoclear features field as it lies in a version 3 header: its byte offset in
    /// the file and its 8 big-endian bytes, for a write of that field alone. The field
    /// lies in the first sector, so such a write lands whole or not at all.
    pub fn autoclear_field(&self) -> (u64, [u8; 8]) {
        (
            OFF_AUTOCLEAR_FEATURES as u64,
            self.autoclear_features.to_be_bytes(),
        )
    }

    /// The backing_file_offset field holding `offset`, as it lies in every header: its byte
    /// offset in the file and its 8 big-endian bytes, for a write of that field alone. The
    /// field lies in the first sector, so such a write lands whole or not at all.
    pub fn backing_file_offset_field(offset: u64) -> (u64, [u8; 8]) {
        (OFF_BACKING_FILE_OFFSET as u64, offset.to_be_bytes())
    }

    /// The header extension area as `(start, end)` byte offsets: from header_length to
    /// backing_file_offset if that is non-zero, otherwise to the end of cluster 0.
    pub fn extension_area(&self) -> (u64, u64) {
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        };
        (u64::from(self.header_length), end)
    }

    /// The disk length QEMU works with: `size` rounded down to 512 bytes
    /// (`bs->total_sectors * BDRV_SECTOR_SIZE`). Bitmap sizes derive from this value.
    pub fn disk_length(&self) -> u64 {
        self.size & !511
    }

    /// The geometry the bitmap checks need: cluster size and [`Header::disk_length`].
    ///
    /// # Errors
    /// [`Corruption::ClusterBits`] if cluster_bits is outside 9..=21 (never on a decoded header).
    pub fn geometry(&self) -> Result<ImageGeometry, Corruption> {
        ImageGeometry::new(self.cluster_bits, self.disk_length())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The header `qemu-img create -f qcow2 -o cluster_size=65536 IMG 1G` writes.
    pub(crate) fn sample() -> Header {
        Header {
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            ..Header::v3(16, 1 << 30)
        }
    }

    fn encoded(h: &Header) -> Vec<u8> {
        let mut b = h.encode().unwrap();
        b.resize(h.cluster_size() as usize, 0);
        b
    }

    fn patch32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn patch64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn encoded_v3_header_is_112_bytes() {
        assert_eq!(sample().encode().unwrap().len(), HEADER_V3_LEN);
    }

    #[test]
    fn encoded_v2_header_is_72_bytes() {
        let mut h = sample();
        h.version = 2;
        h.header_length = 72;
        assert_eq!(h.encode().unwrap().len(), HEADER_V2_LEN);
    }

    #[test]
    fn round_trip_v3() {
        let h = sample();
        assert_eq!(Header::decode(&encoded(&h)).unwrap(), h);
    }

    #[test]
    fn round_trip_keeps_unknown_header_fields() {
        let mut h = sample();
        h.unknown_fields = vec![1, 2, 3, 4, 5, 6, 7, 8];
        h.header_length = 120;
        let b = encoded(&h);
        assert_eq!(&b[100..104], &120u32.to_be_bytes());
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn encode_normalises_header_length_to_112() {
        let mut h = sample();
        h.header_length = 104;
        let b = encoded(&h);
        assert_eq!(Header::decode(&b).unwrap().header_length, 112);
    }

    #[test]
    fn v2_round_trip_and_cannot_hold_bitmaps() {
        let mut h = sample();
        h.version = 2;
        h.header_length = 72;
        let d = Header::decode(&encoded(&h)).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.refcount_order, 4);
        assert!(!d.can_hold_bitmaps());
        assert!(sample().can_hold_bitmaps());
    }

    #[test]
    fn v2_decode_ignores_bytes_past_72() {
        let mut h = sample();
        h.version = 2;
        h.header_length = 72;
        let mut b = encoded(&h);
        patch64(&mut b, 72, u64::MAX); // would be incompatible features in v3
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn header_length_104_has_no_compression_type() {
        let mut b = encoded(&sample());
        patch32(&mut b, 100, 104);
        b[104] = 7; // first byte of the extension area, not a compression type
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.header_length, 104);
        assert_eq!(h.compression_type, 0);
        assert_eq!(h.extension_area(), (104, 65536));
    }

    #[test]
    fn rejects_short_input() {
        let b = encoded(&sample());
        assert!(matches!(
            Header::decode(&b[..71]),
            Err(Corruption::Truncated { needed: 72, .. })
        ));
        assert!(matches!(
            Header::decode(&b[..100]),
            Err(Corruption::Truncated { needed: 104, .. })
        ));
    }

    #[test]
    fn rejects_bad_magic() {
        let mut b = encoded(&sample());
        b[3] = 0xfa;
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::BadMagic { found: 0x514649FA })
        );
    }

    #[test]
    fn rejects_version_1_and_4() {
        for v in [1, 4] {
            let mut b = encoded(&sample());
            patch32(&mut b, 4, v);
            assert_eq!(
                Header::decode(&b),
                Err(Corruption::UnsupportedVersion { found: v })
            );
        }
    }

    #[test]
    fn rejects_cluster_bits_outside_9_to_21() {
        for bits in [8, 22] {
            let mut b = encoded(&sample());
            patch32(&mut b, 20, bits);
            assert_eq!(
                Header::decode(&b),
                Err(Corruption::ClusterBits { found: bits })
            );
        }
    }

    #[test]
    fn rejects_header_length_below_104() {
        let mut b = encoded(&sample());
        patch32(&mut b, 100, 103);
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::HeaderTooShort { header_length: 103 })
        );
    }

    #[test]
    fn rejects_header_length_above_cluster_size() {
        let mut h = sample();
        h.cluster_bits = 9;
        h.l1_size = 8192;
        h.size = 1 << 20;
        let mut b = encoded(&h);
        patch32(&mut b, 100, 513);
        b.resize(1024, 0);
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::HeaderExceedsCluster {
                header_length: 513,
                cluster_size: 512
            })
        );
    }

    #[test]
    fn rejects_backing_file_offset_beyond_cluster_0() {
        let mut b = encoded(&sample());
        patch64(&mut b, 8, 65537);
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::BackingFileOffset {
                offset: 65537,
                cluster_size: 65536
            })
        );
    }

    #[test]
    fn rejects_backing_file_name_above_1023() {
        let mut b = encoded(&sample());
        patch64(&mut b, 8, 0x200);
        patch32(&mut b, 16, 1024);
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::BackingFileName {
                offset: 0x200,
                size: 1024,
                max: 1023
            })
        );
    }

    #[test]
    fn rejects_backing_file_name_past_cluster_0() {
        let mut b = encoded(&sample());
        patch64(&mut b, 8, 65536 - 10);
        patch32(&mut b, 16, 11);
        assert!(matches!(
            Header::decode(&b),
            Err(Corruption::BackingFileName { max: 10, .. })
        ));
    }

    #[test]
    fn rejects_unknown_compression_type() {
        let mut b = encoded(&sample());
        b[104] = 2;
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::CompressionType {
                found: 2,
                feature_bit_set: false
            })
        );
    }

    #[test]
    fn rejects_zstd_without_feature_bit() {
        let mut b = encoded(&sample());
        b[104] = 1;
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::CompressionType {
                found: 1,
                feature_bit_set: false
            })
        );
        let mut h = sample();
        h.compression_type = 1;
        h.incompatible_features = INCOMPAT_COMPRESSION;
        assert_eq!(Header::decode(&encoded(&h)).unwrap(), h);
    }

    #[test]
    fn rejects_unknown_incompatible_bits_without_names() {
        let mut b = encoded(&sample());
        patch64(&mut b, 72, 1 << 40 | 1);
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::UnsupportedFeatures {
                bits: 1 << 40,
                named: vec![],
                unnamed: 1 << 40
            })
        );
    }

    #[test]
    fn rejects_extended_l2_with_small_clusters() {
        let mut h = sample();
        h.cluster_bits = 13;
        h.l1_size = 1 << 10;
        h.l1_table_offset = 0x6000;
        h.refcount_table_offset = 0x2000;
        h.incompatible_features = INCOMPAT_EXTL2;
        assert_eq!(
            Header::decode(&encoded(&h)),
            Err(Corruption::SubclusterTooSmall { cluster_bits: 13 })
        );
    }

    #[test]
    fn rejects_refcount_order_above_6() {
        let mut b = encoded(&sample());
        patch32(&mut b, 96, 7);
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::RefcountOrder { found: 7 })
        );
    }

    #[test]
    fn rejects_missing_refcount_table() {
        let mut b = encoded(&sample());
        patch32(&mut b, 56, 0);
        assert_eq!(Header::decode(&b), Err(Corruption::NoRefcountTable));
    }

    #[test]
    fn rejects_unaligned_or_oversized_tables() {
        let mut b = encoded(&sample());
        patch64(&mut b, 48, 0x10200);
        assert!(matches!(
            Header::decode(&b),
            Err(Corruption::TableGeometry {
                table: "refcount table",
                ..
            })
        ));
        let mut b = encoded(&sample());
        patch32(&mut b, 56, 129); // 129 × 64 KiB > 8 MiB
        assert!(matches!(
            Header::decode(&b),
            Err(Corruption::TableGeometry {
                table: "refcount table",
                ..
            })
        ));
        let mut b = encoded(&sample());
        patch32(&mut b, 60, 1);
        patch64(&mut b, 64, 0x123);
        assert!(matches!(
            Header::decode(&b),
            Err(Corruption::TableGeometry {
                table: "snapshot table",
                ..
            })
        ));
        let mut b = encoded(&sample());
        patch64(&mut b, 40, !0xFFFF);
        assert!(matches!(
            Header::decode(&b),
            Err(Corruption::TableGeometry {
                table: "L1 table",
                ..
            })
        ));
    }

    #[test]
    fn rejects_l1_too_small_for_size() {
        let mut b = encoded(&sample());
        patch32(&mut b, 36, 1); // 1 GiB with 64 KiB clusters needs 2 entries
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::L1TooSmall {
                l1_size: 1,
                needed: 2
            })
        );
    }

    #[test]
    fn rejects_image_too_big() {
        let mut b = encoded(&sample());
        patch32(&mut b, 20, 9);
        patch64(&mut b, 24, u64::MAX);
        patch64(&mut b, 48, 0x200);
        patch64(&mut b, 40, 0x400);
        patch32(&mut b, 100, 112);
        assert_eq!(
            Header::decode(&b[..512]),
            Err(Corruption::ImageTooBig { size: u64::MAX })
        );
    }

    #[test]
    fn rejects_unknown_crypt_method() {
        let mut b = encoded(&sample());
        patch32(&mut b, 32, 3);
        assert_eq!(
            Header::decode(&b),
            Err(Corruption::CryptMethod { found: 3 })
        );
    }

    #[test]
    fn encode_rejects_caller_mistakes() {
        let mut h = sample();
        h.version = 4;
        assert!(matches!(h.encode(), Err(InvalidValue(_))));
        let mut h = sample();
        h.cluster_bits = 22;
        assert!(matches!(h.encode(), Err(InvalidValue(_))));
        let mut h = sample();
        h.cluster_bits = 9;
        h.unknown_fields = vec![0; 401];
        assert!(matches!(h.encode(), Err(InvalidValue(_))));
        let mut h = sample();
        h.version = 2;
        h.autoclear_features = 1;
        assert!(matches!(h.encode(), Err(InvalidValue(_))));
    }

    #[test]
    fn disk_length_rounds_down_to_sectors() {
        let mut h = sample();
        h.size = 1025;
        assert_eq!(h.disk_length(), 1024);
        assert_eq!(h.geometry().unwrap().disk_size(), 1024);
    }
}
