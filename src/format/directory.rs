//! Bitmap directory entries and whole directories.
//!
//! Byte table: `docs/FORMAT.md`, "Bitmap directory entry". Decoding applies QEMU's
//! `bitmap_list_load` and `check_dir_entry`; encoding applies what `bitmap_list_store` checks.

use std::collections::HashSet;

use super::bytes::{
    be_u16, be_u32, be_u64, be_u8, pad8, put_u16, put_u32, put_u64, round_up8, slice, to_u64,
    to_usize,
};
use super::corruption::{invalid_input, Corruption, EntryProblem, InvalidValue};
use super::extension::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE};
use super::header::{check_cluster_bits, ImageGeometry};

/// The fixed part of a directory entry; extra data and the name follow it.
pub const DIR_ENTRY_FIXED_LEN: usize = 24;
/// Longest bitmap name (`BME_MAX_NAME_SIZE`).
pub const MAX_NAME_SIZE: usize = 1023;
/// Smallest granularity_bits QEMU accepts (512-byte granularity).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity_bits QEMU accepts (2 GiB granularity).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Largest bitmap_table_size (`BME_MAX_TABLE_SIZE`, 2^27 entries).
pub const MAX_TABLE_SIZE: u32 = 0x800_0000;
/// Largest bitmap_table_size × cluster_size (`BME_MAX_PHYS_SIZE`, 512 MiB).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// The only bitmap type: dirty tracking.
pub const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;
/// Flag bit 0: the bitmap was in use when the image was last written and may be stale.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap tracks writes (is enabled) whenever the image is open.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag bit 2, which the spec defines but QEMU rejects as reserved.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Every flag QEMU rejects (`BME_RESERVED_FLAGS`), bit 2 included.
pub const RESERVED_FLAGS: u32 = 0xFFFF_FFFC;

// Field offsets inside an entry.
const OFF_TABLE_OFFSET: usize = 0;
const OFF_TABLE_SIZE: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_TYPE: usize = 16;
const OFF_GRANULARITY_BITS: usize = 17;
const OFF_NAME_SIZE: usize = 18;
const OFF_EXTRA_DATA_SIZE: usize = 20;

/// A directory entry exactly as stored, before any of QEMU's constraints are applied.
///
/// Useful for tools and for building deliberately broken fixtures; everything else should
/// use [`DirEntry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDirEntry {
    /// "Offset into the image file at which the bitmap table for this bitmap starts. Must be
    /// aligned to a cluster boundary."
    pub table_offset: u64,
    /// "Number of entries in the bitmap table of the bitmap."
    pub table_size: u32,
    /// Bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible, the rest reserved.
    pub flags: u32,
    /// "This field describes the sort of the bitmap": 1 is dirty tracking.
    pub bitmap_type: u8,
    /// "Granularity bits. Valid values: 0 - 63." QEMU accepts 9..=31.
    pub granularity_bits: u8,
    /// Extra data (`extra_data_size` bytes); QEMU refuses any.
    pub extra_data: Vec<u8>,
    /// The name (`name_size` bytes, not NUL-terminated).
    pub name: Vec<u8>,
}

impl RawDirEntry {
    /// Decodes the entry at the start of `bytes`, returning it and its padded length.
    /// Returns `None` if `bytes` is shorter than the fixed part or than the padded entry.
    fn decode_framed(bytes: &[u8]) -> Option<Result<(Self, usize), usize>> {
        let extra_len = be_u32(bytes, OFF_EXTRA_DATA_SIZE)?;
        let name_len = be_u16(bytes, OFF_NAME_SIZE)?;
        let len = entry_len(u64::from(name_len), u64::from(extra_len));
        if to_u64(bytes.len()) < len {
            return Some(Err(to_usize(len)));
        }
        let extra = slice(bytes, DIR_ENTRY_FIXED_LEN, to_usize(u64::from(extra_len)))?;
        let name_at = DIR_ENTRY_FIXED_LEN.checked_add(extra.len())?;
        let name = slice(bytes, name_at, usize::from(name_len))?;
        Some(Ok((
            Self {
                table_offset: be_u64(bytes, OFF_TABLE_OFFSET)?,
                table_size: be_u32(bytes, OFF_TABLE_SIZE)?,
                flags: be_u32(bytes, OFF_FLAGS)?,
                bitmap_type: be_u8(bytes, OFF_TYPE)?,
                granularity_bits: be_u8(bytes, OFF_GRANULARITY_BITS)?,
                extra_data: extra.to_vec(),
                name: name.to_vec(),
            },
            to_usize(len),
        )))
    }

    /// Decodes the entry at the start of `bytes` without applying any constraint, and returns
    /// it with its length including padding.
    ///
    /// # Errors
    /// [`Corruption::Truncated`] if `bytes` ends before the padded entry does.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), Corruption> {
        let available = to_u64(bytes.len());
        let short = |needed| Corruption::Truncated {
            what: "bitmap directory entry",
            offset: 0,
            needed,
            available,
        };
        match Self::decode_framed(bytes) {
            Some(Ok(v)) => Ok(v),
            Some(Err(len)) => Err(short(to_u64(len))),
            None => Err(short(to_u64(DIR_ENTRY_FIXED_LEN))),
        }
    }

    /// The encoded length: round_up(24 + extra + name, 8).
    pub fn encoded_len(&self) -> u64 {
        entry_len(to_u64(self.name.len()), to_u64(self.extra_data.len()))
    }

    /// Encodes the entry as it is, with zero padding.
    ///
    /// # Errors
    /// [`InvalidValue`] if the name does not fit the u16 name_size or the extra data
    /// does not fit the u32 extra_data_size.
    pub fn encode(&self) -> Result<Vec<u8>, InvalidValue> {
        let name_size = u16::try_from(self.name.len()).map_err(|_| {
            invalid_input!("name of {} bytes does not fit name_size", self.name.len())
        })?;
        let extra_size = u32::try_from(self.extra_data.len()).map_err(|_| {
            invalid_input!("{} bytes of extra data do not fit", self.extra_data.len())
        })?;
        let mut out = Vec::with_capacity(to_usize(self.encoded_len()));
        put_u64(&mut out, self.table_offset);
        put_u32(&mut out, self.table_size);
        put_u32(&mut out, self.flags);
        out.push(self.bitmap_type);
        out.push(self.granularity_bits);
        put_u16(&mut out, name_size);
        put_u32(&mut out, extra_size);
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(&self.name);
        pad8(&mut out);
        Ok(out)
    }
}

/// `round_up(24 + name + extra, 8)`; cannot overflow for u16 + u32 inputs.
fn entry_len(name_len: u64, extra_len: u64) -> u64 {
    round_up8(
        to_u64(DIR_ENTRY_FIXED_LEN)
            .saturating_add(name_len)
            .saturating_add(extra_len),
    )
    .unwrap_or(u64::MAX)
}

/// A bitmap's name as it is on disk: 1..=1023 bytes, compared byte for byte.
///
/// The spec asks for UTF-8, but QEMU neither checks it nor refuses an image for it: it lists,
/// loads and stores back a name with any bytes. So a name is kept as its bytes, never
/// refused and never rewritten, and shown escaped: [`Display`](std::fmt::Display) prints
/// valid UTF-8 as it is, with `\` for a backslash and `\xNN` for every byte that is not
/// part of valid UTF-8 or is a control character. [`parse_escaped`](Self::parse_escaped)
/// reads that form back, so a name shown by `dbm info` can be typed on the command line.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BitmapName(Vec<u8>);

impl BitmapName {
    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name as QEMU reads it: its bytes up to the first NUL (QEMU copies a name with
    /// `g_strndup`, a C string). Two names QEMU reads alike make an image it refuses to
    /// open ("Bitmap already exists").
    pub fn qemu_name(&self) -> &[u8] {
        self.0.split(|&b| b == 0).next().unwrap_or(&[])
    }

    /// The name as text, when it is valid UTF-8.
    pub fn to_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// Bytes in the name.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the name has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads the escaped form that [`Display`](std::fmt::Display) writes: `\\` is a
    /// backslash, `\xNN` (two hex digits) is that byte, anything else is itself. A
    /// backslash that starts neither is kept as it is.
    pub fn parse_escaped(text: &str) -> Self {
        let mut rest = text.as_bytes();
        let mut out = Vec::with_capacity(rest.len());
        // Two hex digits, nothing else (`from_str_radix` alone would take `+1`).
        let hex = |h: &[u8]| {
            if !h.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        };
        loop {
            rest = match rest {
                [] => break,
                [b'\\', b'\\', tail @ ..] => {
                    out.push(b'\\');
                    tail
                }
                [b'\\', b'x', h1, h2, tail @ ..] if hex(&[*h1, *h2]).is_some() => {
                    out.extend(hex(&[*h1, *h2]));
                    tail
                }
                [b, tail @ ..] => {
                    out.push(*b);
                    tail
                }
            };
        }
        BitmapName(out)
    }
}

impl std::fmt::Display for BitmapName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '\\' => f.write_str("\\\\")?,
                    c if c.is_control() => {
                        let mut buf = [0u8; 4];
                        for byte in c.encode_utf8(&mut buf).bytes() {
                            write!(f, "\\x{byte:02x}")?;
                        }
                    }
                    c => f.write_char(c)?,
                }
            }
            for byte in chunk.invalid() {
                write!(f, "\\x{byte:02x}")?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for BitmapName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl AsRef<[u8]> for BitmapName {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for BitmapName {
    fn from(s: &str) -> Self {
        BitmapName(s.as_bytes().to_vec())
    }
}

impl From<String> for BitmapName {
    fn from(s: String) -> Self {
        BitmapName(s.into_bytes())
    }
}

impl From<Vec<u8>> for BitmapName {
    fn from(b: Vec<u8>) -> Self {
        BitmapName(b)
    }
}

impl From<&[u8]> for BitmapName {
    fn from(b: &[u8]) -> Self {
        BitmapName(b.to_vec())
    }
}

impl PartialEq<str> for BitmapName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for BitmapName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<String> for BitmapName {
    fn eq(&self, other: &String) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<BitmapName> for String {
    fn eq(&self, other: &BitmapName) -> bool {
        self.as_bytes() == other.0
    }
}

impl PartialEq<BitmapName> for &str {
    fn eq(&self, other: &BitmapName) -> bool {
        self.as_bytes() == other.0
    }
}

/// A bitmap directory entry that satisfies QEMU's constraints.
///
/// Type is always 1 and extra data always empty, since QEMU refuses anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The bitmap's name: 1..=1023 bytes, unique in the directory (see [`BitmapName`]).
    pub name: BitmapName,
    /// Cluster-aligned, non-zero offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table, 1..=2^27.
    pub table_size: u32,
    /// log2 of the bytes each bit covers, 9..=31.
    pub granularity_bits: u8,
    /// Flag bit 0: "The bitmap was not saved correctly and may be inconsistent." Such a
    /// bitmap must be treated as all dirty; its data is not loaded.
    pub in_use: bool,
    /// Flag bit 1: "The bitmap must reflect all changes of the virtual disk by any
    /// application that would write to this qcow2 file."
    pub auto: bool,
}

impl DirEntry {
    /// The flags field: in_use as bit 0, auto as bit 1.
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.in_use {
            f |= FLAG_IN_USE;
        }
        if self.auto {
            f |= FLAG_AUTO;
        }
        f
    }

    /// The raw form of this entry (type 1, no extra data).
    pub fn to_raw(&self) -> RawDirEntry {
        RawDirEntry {
            table_offset: self.table_offset,
            table_size: self.table_size,
            flags: self.flags(),
            bitmap_type: BITMAP_TYPE_DIRTY_TRACKING,
            granularity_bits: self.granularity_bits,
            extra_data: Vec::new(),
            name: self.name.as_bytes().to_vec(),
        }
    }

    /// The encoded length: round_up(24 + name, 8).
    pub fn encoded_len(&self) -> u64 {
        entry_len(to_u64(self.name.len()), 0)
    }

    /// Encodes the entry.
    ///
    /// # Errors
    /// [`InvalidValue`] if the name is empty or longer than 1023 bytes.
    pub fn encode(&self) -> Result<Vec<u8>, InvalidValue> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_SIZE {
            return Err(invalid_input!(
                "bitmap name of {} bytes is outside 1..=1023",
                self.name.len()
            ));
        }
        self.to_raw().encode()
    }

    /// Applies `check_dir_entry` (plus the spec's non-empty name) to a raw entry. The name's
    /// bytes are kept as they are, as QEMU keeps them (see [`BitmapName`]).
    ///
    /// # Errors
    /// The first constraint broken, in QEMU's order.
    pub fn from_raw(raw: &RawDirEntry, geometry: &ImageGeometry) -> Result<Self, EntryProblem> {
        if !raw.extra_data.is_empty() {
            return Err(EntryProblem::ExtraData {
                size: u32::try_from(raw.extra_data.len()).unwrap_or(u32::MAX),
            });
        }
        let cluster_size = geometry.cluster_size();
        if raw.table_size == 0 {
            return Err(EntryProblem::TableSizeZero);
        }
        if raw.table_offset == 0 {
            return Err(EntryProblem::TableOffsetZero);
        }
        if !raw.table_offset.is_multiple_of(cluster_size) {
            return Err(EntryProblem::TableOffsetUnaligned {
                offset: raw.table_offset,
            });
        }
        if raw.table_size > MAX_TABLE_SIZE {
            return Err(EntryProblem::TableSizeTooLarge {
                size: raw.table_size,
            });
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&raw.granularity_bits) {
            return Err(EntryProblem::Granularity {
                bits: raw.granularity_bits,
            });
        }
        if raw.flags & RESERVED_FLAGS != 0 {
            return Err(EntryProblem::ReservedFlags { flags: raw.flags });
        }
        if raw.name.len() > MAX_NAME_SIZE {
            return Err(EntryProblem::NameTooLong {
                size: u16::try_from(raw.name.len()).unwrap_or(u16::MAX),
            });
        }
        if raw.name.is_empty() {
            return Err(EntryProblem::NameEmpty);
        }
        if raw.bitmap_type != BITMAP_TYPE_DIRTY_TRACKING {
            return Err(EntryProblem::Type {
                found: raw.bitmap_type,
            });
        }
        // table_size <= 2^27 and cluster_size <= 2^21: the product fits easily.
        let phys = u64::from(raw.table_size).saturating_mul(cluster_size);
        if phys > MAX_PHYS_SIZE {
            return Err(EntryProblem::PhysicalSizeTooLarge { bytes: phys });
        }
        let in_use = raw.flags & FLAG_IN_USE != 0;
        // phys <= 2^29, so phys · 8 · 2^31 <= 2^63; u128 keeps it obviously safe.
        let covered = (u128::from(phys) << 3) << raw.granularity_bits;
        if !in_use && u128::from(geometry.disk_size()) > covered {
            return Err(EntryProblem::TooSmallForDisk {
                covered,
                disk_size: geometry.disk_size(),
            });
        }
        Ok(Self {
            name: BitmapName(raw.name.clone()),
            table_offset: raw.table_offset,
            table_size: raw.table_size,
            granularity_bits: raw.granularity_bits,
            in_use,
            auto: raw.flags & FLAG_AUTO != 0,
        })
    }

    /// The check QEMU makes when it loads a consistent bitmap's data (`load_bitmap_data`):
    /// bitmap_table_size must equal exactly `ceil(disk_size / (granularity · cluster_size · 8))`.
    /// In-use entries are not loaded, so any size passes.
    ///
    /// # Errors
    /// [`EntryProblem::TableSizeMismatch`] with the size QEMU expects.
    pub fn check_table_size(&self, geometry: &ImageGeometry) -> Result<(), EntryProblem> {
        if self.in_use {
            return Ok(());
        }
        let expected = expected_table_size(
            geometry.disk_size(),
            self.granularity_bits,
            geometry.cluster_bits(),
        );
        if expected == u64::from(self.table_size) {
            Ok(())
        } else {
            Err(EntryProblem::TableSizeMismatch {
                found: self.table_size,
                expected,
            })
        }
    }
}

/// `ceil(disk_size / (2^granularity_bits · 2^cluster_bits · 8))` without overflow.
fn expected_table_size(disk_size: u64, granularity_bits: u8, cluster_bits: u32) -> u64 {
    let shift = u32::from(granularity_bits)
        .saturating_add(cluster_bits)
        .saturating_add(3);
    if shift >= 64 {
        return u64::from(disk_size != 0);
    }
    let whole = disk_size >> shift;
    let rest = disk_size & ((1u64 << shift).wrapping_sub(1));
    whole.saturating_add(u64::from(rest != 0))
}

/// The bitmap table size QEMU uses for a disk: `ceil(disk_size / (g · cluster_size · 8))`
/// with `g = 2^granularity_bits`. A 0-byte disk gives 0, which no entry may hold.
///
/// Also applies QEMU's `check_constraints_on_bitmap`: the serialized bitmap
/// (`ceil(ceil(disk_size / g) / 8)` bytes) may not exceed 512 MiB or 2^27 clusters.
///
/// # Errors
/// [`InvalidValue`] if granularity_bits is outside 9..=31, cluster_size is not a power
/// of two in 512..=2 MiB, or the bitmap would be too large ("use larger granularity").
pub fn table_size(
    disk_size: u64,
    granularity_bits: u8,
    cluster_size: u64,
) -> Result<u32, InvalidValue> {
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
        return Err(invalid_input!(
            "granularity_bits {granularity_bits} is outside 9..=31"
        ));
    }
    let cluster_bits = cluster_size.trailing_zeros();
    if !cluster_size.is_power_of_two() || check_cluster_bits(cluster_bits).is_err() {
        return Err(invalid_input!(
            "cluster size {cluster_size} is not a power of two in 512..=2097152"
        ));
    }
    // nbits = ceil(disk_size / g); the serialized bitmap is ceil(nbits / 8) bytes.
    let bits = {
        let g = u32::from(granularity_bits);
        let whole = disk_size >> g;
        whole.saturating_add(u64::from(disk_size & ((1u64 << g).wrapping_sub(1)) != 0))
    };
    let bitmap_bytes = (bits >> 3).saturating_add(u64::from(bits & 7 != 0));
    let max_by_table = u64::from(MAX_TABLE_SIZE).saturating_mul(cluster_size);
    if bitmap_bytes > MAX_PHYS_SIZE || bitmap_bytes > max_by_table {
        return Err(invalid_input!(
            "a {disk_size}-byte disk at granularity 2^{granularity_bits} needs {bitmap_bytes} \
             bytes of bitmap, more than 512 MiB; use a larger granularity"
        ));
    }
    let size = expected_table_size(disk_size, granularity_bits, cluster_bits);
    u32::try_from(size).map_err(|_| invalid_input!("bitmap table of {size} entries is too large"))
}

/// Decodes a whole bitmap directory of `nb_bitmaps` entries (QEMU's `bitmap_list_load`).
///
/// Offsets in errors are relative to the start of the directory. The exact table size rule
/// for loading is separate: see [`DirEntry::check_table_size`].
///
/// # Errors
/// In QEMU's order: [`Corruption::DirectorySize`] for an empty or oversized directory;
/// then per entry [`Corruption::DirectoryTrailingBytes`] (fewer than 24 bytes left),
/// [`Corruption::TooManyBitmaps`], [`Corruption::DirectoryEntryPastEnd`], and
/// [`Corruption::DirectoryEntry`] for a broken constraint or a duplicate name; finally
/// [`Corruption::TooFewBitmaps`].
pub fn decode_directory(
    bytes: &[u8],
    nb_bitmaps: u32,
    geometry: &ImageGeometry,
) -> Result<Vec<DirEntry>, Corruption> {
    decode_entries(bytes, nb_bitmaps, geometry, false)
}

/// [`decode_directory`] with QEMU's rule for a repeated name: a later entry of a name is
/// accepted when it is `in_use` (`qcow2_load_dirty_bitmaps` skips it, and opens the image);
/// one that is not is refused, as QEMU fails ("Bitmap already exists"). For a check that
/// judges an image as `qemu-img check` does; the store refuses every repeated name.
///
/// # Errors
/// As [`decode_directory`].
pub fn decode_directory_as_qemu_opens(
    bytes: &[u8],
    nb_bitmaps: u32,
    geometry: &ImageGeometry,
) -> Result<Vec<DirEntry>, Corruption> {
    decode_entries(bytes, nb_bitmaps, geometry, true)
}

fn decode_entries(
    bytes: &[u8],
    nb_bitmaps: u32,
    geometry: &ImageGeometry,
    in_use_repeats: bool,
) -> Result<Vec<DirEntry>, Corruption> {
    let mut entries: Vec<DirEntry> = Vec::new();
    let mut names = HashSet::new();
    let framing = walk_directory(bytes, nb_bitmaps, |index, offset, raw| {
        let bad = |reason| Corruption::DirectoryEntry {
            index,
            offset,
            reason,
        };
        let entry = DirEntry::from_raw(&raw, geometry).map_err(bad)?;
        // Names QEMU reads alike (up to their first NUL) collide in QEMU's load.
        let repeated = !names.insert(entry.name.qemu_name().to_vec());
        if repeated && !(in_use_repeats && entry.in_use) {
            return Err(bad(EntryProblem::DuplicateName {
                name: entry.name.to_string(),
            }));
        }
        entries.push(entry);
        Ok(())
    })?;
    match framing {
        Some(c) => Err(c),
        None => Ok(entries),
    }
}

/// The framing walk both readers share, in QEMU's order: the directory's size, then per
/// entry trailing bytes, too many entries and an entry past the end, finally too few.
/// Calls `each(index, offset, raw)` for every entry whose framing is intact, in order; an
/// error from it ends the walk and is returned. Otherwise returns the framing problem that
/// stopped the walk (or made the count disagree), if any.
fn walk_directory<E>(
    bytes: &[u8],
    nb_bitmaps: u32,
    mut each: impl FnMut(u32, u64, RawDirEntry) -> Result<(), E>,
) -> Result<Option<Corruption>, E> {
    let size = to_u64(bytes.len());
    if size == 0 || size > MAX_BITMAP_DIRECTORY_SIZE {
        return Ok(Some(Corruption::DirectorySize { found: size }));
    }
    let mut at = 0usize;
    let mut count = 0u32;
    while at < bytes.len() {
        let offset = to_u64(at);
        let rest = bytes.get(at..).unwrap_or_default();
        if rest.len() < DIR_ENTRY_FIXED_LEN {
            return Ok(Some(Corruption::DirectoryTrailingBytes {
                offset,
                len: to_u64(rest.len()),
            }));
        }
        if count >= nb_bitmaps {
            return Ok(Some(Corruption::TooManyBitmaps {
                expected: nb_bitmaps,
                offset,
            }));
        }
        let index = count;
        count = count.saturating_add(1);
        let Some(Ok((raw, len))) = RawDirEntry::decode_framed(rest) else {
            return Ok(Some(Corruption::DirectoryEntryPastEnd {
                index,
                offset,
                end: size,
            }));
        };
        each(index, offset, raw)?;
        at = at.saturating_add(len);
    }
    if count != nb_bitmaps {
        return Ok(Some(Corruption::TooFewBitmaps {
            expected: nb_bitmaps,
            found: count,
        }));
    }
    Ok(None)
}

/// One entry of a directory read by [`triage_directory`]: where it is, its raw fields, and
/// either the entry QEMU would accept or the first constraint it breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriagedEntry {
    /// Its position in the directory.
    pub index: u32,
    /// Its byte offset in the directory.
    pub offset: u64,
    /// The entry as stored.
    pub raw: RawDirEntry,
    /// The entry QEMU would load, or why it refuses it (a duplicate name breaks every
    /// occurrence after the first).
    pub verdict: Result<DirEntry, EntryProblem>,
}

/// A directory read entry by entry for a repair: the entries whose framing could be read,
/// each with its verdict, and the framing problem that stopped the walk, if any (then the
/// directory as a whole cannot be trusted to name every bitmap, and a repair drops it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triage {
    /// The entries read, in order.
    pub entries: Vec<TriagedEntry>,
    /// What stopped the walk, or made the count disagree with `nb_bitmaps`.
    pub framing: Option<Corruption>,
}

/// Reads a directory as [`decode_directory`] does, but an entry that breaks a constraint
/// (QEMU's `check_dir_entry`, the exact table size, a duplicate name) is recorded with its
/// problem and the walk goes on; only a problem with the framing (the directory's size,
/// an entry past its end, trailing bytes, more or fewer entries than `nb_bitmaps`) stops
/// it. The table size is checked here too (`DirEntry::check_table_size`), so a verdict of
/// `Ok` is an entry `BitmapStore::open` accepts.
pub fn triage_directory(bytes: &[u8], nb_bitmaps: u32, geometry: &ImageGeometry) -> Triage {
    let mut entries = Vec::new();
    let mut names = HashSet::new();
    let framing = walk_directory(bytes, nb_bitmaps, |index, offset, raw| {
        let verdict = DirEntry::from_raw(&raw, geometry)
            .and_then(|e| e.check_table_size(geometry).map(|()| e))
            .and_then(|e| {
                if names.insert(e.name.qemu_name().to_vec()) {
                    Ok(e)
                } else {
                    Err(EntryProblem::DuplicateName {
                        name: e.name.to_string(),
                    })
                }
            });
        entries.push(TriagedEntry {
            index,
            offset,
            raw,
            verdict,
        });
        Ok::<(), std::convert::Infallible>(())
    });
    Triage {
        entries,
        framing: match framing {
            Ok(f) => f,
            Err(never) => match never {},
        },
    }
}

/// Encodes a whole directory, entries back to back, checking what QEMU's
/// `bitmap_list_store` checks plus the exact table size of every consistent entry.
///
/// # Errors
/// [`InvalidValue`] if there are no entries or more than 65535, the directory would
/// exceed 67,107,840 bytes, two names repeat, or an entry breaks a constraint of
/// [`DirEntry::from_raw`] or [`DirEntry::check_table_size`].
pub fn encode_directory(
    entries: &[DirEntry],
    geometry: &ImageGeometry,
) -> Result<Vec<u8>, InvalidValue> {
    if entries.is_empty() || to_u64(entries.len()) > u64::from(MAX_BITMAPS) {
        return Err(invalid_input!(
            "a directory holds 1..=65535 bitmaps, not {}",
            entries.len()
        ));
    }
    let total = entries
        .iter()
        .fold(0u64, |acc, e| acc.saturating_add(e.encoded_len()));
    if total > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(invalid_input!(
            "directory of {total} bytes exceeds 67107840"
        ));
    }
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(to_usize(total));
    for e in entries {
        let raw = e.to_raw();
        let checked = DirEntry::from_raw(&raw, geometry)
            .and_then(|c| c.check_table_size(geometry).map(|()| c))
            .map_err(|p| invalid_input!("bitmap {:?}: {p}", e.name))?;
        if !names.insert(checked.name) {
            return Err(invalid_input!("bitmap name {:?} appears twice", e.name));
        }
        out.extend_from_slice(&e.encode()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> ImageGeometry {
        ImageGeometry::new(16, 1 << 30).unwrap()
    }

    /// The entry `qemu-img bitmap --add` writes for "b0" on a 1 GiB disk, opened (flags 3).
    fn b0() -> DirEntry {
        DirEntry {
            name: "b0".into(),
            table_offset: 0x0B0000,
            table_size: 1,
            granularity_bits: 16,
            in_use: true,
            auto: true,
        }
    }

    const B0_GOLDEN: [u8; 32] = [
        0, 0, 0, 0, 0, 0x0B, 0, 0, // bitmap_table_offset
        0, 0, 0, 1, // bitmap_table_size
        0, 0, 0, 3,    // flags: in_use | auto
        1,    // type
        0x10, // granularity_bits
        0, 2, // name_size
        0, 0, 0, 0, // extra_data_size
        b'b', b'0', 0, 0, 0, 0, 0, 0, // name + padding
    ];

    fn raw(e: &DirEntry) -> RawDirEntry {
        e.to_raw()
    }

    fn dir_of(raws: &[RawDirEntry]) -> Vec<u8> {
        raws.iter().flat_map(|r| r.encode().unwrap()).collect()
    }

    fn reason_of(r: RawDirEntry) -> EntryProblem {
        match decode_directory(&dir_of(&[r]), 1, &geometry()) {
            Err(Corruption::DirectoryEntry {
                index: 0,
                offset: 0,
                reason,
            }) => reason,
            other => panic!("expected a DirectoryEntry error, got {other:?}"),
        }
    }

    #[test]
    fn triage_goes_on_past_broken_entries_and_stops_at_the_framing() {
        let good = raw(&b0());
        let mut bad_gran = raw(&DirEntry {
            name: "g".into(),
            ..b0()
        });
        bad_gran.granularity_bits = 40;
        let dup = raw(&b0());
        let bytes = dir_of(&[good.clone(), bad_gran, dup, good.clone()]);
        // Four entries, but the last is a third "b0": duplicates both.
        let t = triage_directory(&bytes, 4, &geometry());
        assert_eq!(t.framing, None);
        let verdicts: Vec<bool> = t.entries.iter().map(|e| e.verdict.is_ok()).collect();
        assert_eq!(verdicts, [true, false, false, false]);
        assert!(matches!(
            t.entries[1].verdict,
            Err(EntryProblem::Granularity { .. })
        ));
        assert!(matches!(
            t.entries[2].verdict,
            Err(EntryProblem::DuplicateName { .. })
        ));
        assert_eq!(t.entries[3].offset, 96);
        // More announced than stored, and an entry cut short: framing problems, with the
        // entries before them still read.
        let t = triage_directory(&bytes, 5, &geometry());
        assert!(matches!(t.framing, Some(Corruption::TooFewBitmaps { .. })));
        assert_eq!(t.entries.len(), 4);
        let t = triage_directory(&bytes[..bytes.len() - 8], 4, &geometry());
        assert!(matches!(
            t.framing,
            Some(Corruption::DirectoryEntryPastEnd { index: 3, .. })
        ));
        assert_eq!(t.entries.len(), 3);
        // Whatever decode_directory accepts, triage accepts entry for entry.
        let one = dir_of(&[good]);
        let t = triage_directory(&one, 1, &geometry());
        assert_eq!(t.framing, None);
        assert_eq!(
            t.entries[0].verdict.clone().unwrap(),
            decode_directory(&one, 1, &geometry()).unwrap()[0]
        );
    }

    #[test]
    fn golden_b0_entry() {
        assert_eq!(b0().encode().unwrap(), B0_GOLDEN);
        assert_eq!(
            decode_directory(&B0_GOLDEN, 1, &geometry()).unwrap(),
            vec![b0()]
        );
    }

    #[test]
    fn entry_size_is_24_plus_name_padded_to_8() {
        for (len, want) in [(1, 32), (8, 32), (9, 40), (16, 40), (1023, 1048)] {
            let mut e = b0();
            e.name = "x".repeat(len).into();
            assert_eq!(e.encoded_len(), want);
            assert_eq!(e.encode().unwrap().len() as u64, want);
        }
        let mut r = raw(&b0());
        r.extra_data = vec![1; 3];
        assert_eq!(r.encoded_len(), 32);
        r.extra_data = vec![1; 7];
        assert_eq!(r.encode().unwrap().len(), 40);
    }

    #[test]
    fn raw_round_trip_with_extra_data() {
        let mut r = raw(&b0());
        r.extra_data = vec![7; 7];
        r.flags = 0xFFFF_FFFF;
        r.bitmap_type = 9;
        let bytes = r.encode().unwrap();
        assert_eq!(RawDirEntry::decode(&bytes).unwrap(), (r, 40));
        assert!(matches!(
            RawDirEntry::decode(&bytes[..39]),
            Err(Corruption::Truncated { needed: 40, .. })
        ));
    }

    #[test]
    fn directory_round_trip() {
        let mut e2 = b0();
        e2.name = "second bitmap".into();
        e2.table_offset = 0x0C0000;
        e2.in_use = false;
        e2.auto = false;
        let entries = vec![b0(), e2];
        let bytes = encode_directory(&entries, &geometry()).unwrap();
        assert_eq!(bytes.len(), 32 + 40);
        assert_eq!(decode_directory(&bytes, 2, &geometry()).unwrap(), entries);
    }

    #[test]
    fn rejects_empty_or_oversized_directory() {
        assert_eq!(
            decode_directory(&[], 1, &geometry()),
            Err(Corruption::DirectorySize { found: 0 })
        );
        let big = vec![0; MAX_BITMAP_DIRECTORY_SIZE as usize + 1];
        assert!(matches!(
            decode_directory(&big, 1, &geometry()),
            Err(Corruption::DirectorySize { .. })
        ));
    }

    #[test]
    fn rejects_entry_past_end() {
        let bytes = b0().encode().unwrap();
        assert_eq!(
            decode_directory(&bytes[..30], 1, &geometry()),
            Err(Corruption::DirectoryEntryPastEnd {
                index: 0,
                offset: 0,
                end: 30
            })
        );
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = b0().encode().unwrap();
        bytes.extend_from_slice(&[0; 8]);
        assert_eq!(
            decode_directory(&bytes, 1, &geometry()),
            Err(Corruption::DirectoryTrailingBytes { offset: 32, len: 8 })
        );
    }

    #[test]
    fn rejects_too_many_entries() {
        let mut e2 = b0();
        e2.name = "b1".into();
        let bytes = dir_of(&[raw(&b0()), raw(&e2)]);
        assert_eq!(
            decode_directory(&bytes, 1, &geometry()),
            Err(Corruption::TooManyBitmaps {
                expected: 1,
                offset: 32
            })
        );
    }

    #[test]
    fn rejects_too_few_entries() {
        assert_eq!(
            decode_directory(&B0_GOLDEN, 2, &geometry()),
            Err(Corruption::TooFewBitmaps {
                expected: 2,
                found: 1
            })
        );
    }

    #[test]
    fn rejects_extra_data() {
        let mut r = raw(&b0());
        r.extra_data = vec![0; 8];
        assert_eq!(reason_of(r), EntryProblem::ExtraData { size: 8 });
    }

    #[test]
    fn rejects_table_size_zero() {
        let mut r = raw(&b0());
        r.table_size = 0;
        assert_eq!(reason_of(r), EntryProblem::TableSizeZero);
    }

    #[test]
    fn rejects_table_size_above_2_pow_27() {
        let mut r = raw(&b0());
        r.table_size = MAX_TABLE_SIZE + 1;
        assert_eq!(
            reason_of(r),
            EntryProblem::TableSizeTooLarge {
                size: MAX_TABLE_SIZE + 1
            }
        );
    }

    #[test]
    fn rejects_table_offset_zero() {
        let mut r = raw(&b0());
        r.table_offset = 0;
        assert_eq!(reason_of(r), EntryProblem::TableOffsetZero);
    }

    #[test]
    fn rejects_unaligned_table_offset() {
        let mut r = raw(&b0());
        r.table_offset = 0x0B0200;
        assert_eq!(
            reason_of(r),
            EntryProblem::TableOffsetUnaligned { offset: 0x0B0200 }
        );
    }

    #[test]
    fn rejects_granularity_outside_9_to_31() {
        for bits in [8, 32] {
            let mut r = raw(&b0());
            r.granularity_bits = bits;
            assert_eq!(reason_of(r), EntryProblem::Granularity { bits });
        }
    }

    #[test]
    fn rejects_reserved_flags_including_bit_2() {
        for flags in [FLAG_EXTRA_DATA_COMPATIBLE | 3, 1 << 31] {
            let mut r = raw(&b0());
            r.flags = flags;
            assert_eq!(reason_of(r), EntryProblem::ReservedFlags { flags });
        }
    }

    #[test]
    fn rejects_empty_name() {
        let mut r = raw(&b0());
        r.name.clear();
        assert_eq!(reason_of(r), EntryProblem::NameEmpty);
    }

    #[test]
    fn rejects_name_longer_than_1023() {
        let mut r = raw(&b0());
        r.name = vec![b'n'; 1024];
        assert_eq!(reason_of(r), EntryProblem::NameTooLong { size: 1024 });
    }

    #[test]
    fn keeps_non_utf8_and_nul_names_as_their_bytes() {
        // QEMU neither checks nor refuses them (`tests/review_defects.rs`, defect 11): they decode, compare
        // byte for byte, re-encode unchanged and show escaped.
        for name in [vec![0xff, 0xfe], b"a\0b".to_vec(), b"b\xe90".to_vec()] {
            let mut r = raw(&b0());
            r.name = name.clone();
            let bytes = dir_of(&[r]);
            let entries = decode_directory(&bytes, 1, &geometry()).unwrap();
            assert_eq!(entries[0].name.as_bytes(), &name[..]);
            assert_eq!(encode_directory(&entries, &geometry()).unwrap(), bytes);
            let shown = entries[0].name.to_string();
            assert!(shown.is_ascii(), "{shown}");
            assert_eq!(BitmapName::parse_escaped(&shown), entries[0].name);
        }
        assert_eq!(BitmapName::from(&[0xff, b'a'][..]).to_string(), "\\xffa");
        assert_eq!(BitmapName::from("back\\slash").to_string(), "back\\\\slash");
        assert_eq!(BitmapName::from("naïve").to_string(), "naïve");
        assert_eq!(
            BitmapName::parse_escaped("naïve"),
            BitmapName::from("naïve")
        );
        // `\x+1` is not byte 1, though `from_str_radix` takes a sign: only two hex digits
        // make a byte; anything else is itself.
        for text in ["\\x+1", "\\x-1", "\\x 1"] {
            assert_eq!(
                BitmapName::parse_escaped(text),
                BitmapName::from(text),
                "{text}"
            );
        }
        assert_eq!(
            BitmapName::parse_escaped("\\x0A"),
            BitmapName::from(&[0x0a][..])
        );
    }

    #[test]
    fn rejects_type_other_than_1() {
        for t in [0, 2, 255] {
            let mut r = raw(&b0());
            r.bitmap_type = t;
            assert_eq!(reason_of(r), EntryProblem::Type { found: t });
        }
    }

    #[test]
    fn rejects_physical_size_above_512_mib() {
        let mut r = raw(&b0());
        r.table_size = 8193; // × 64 KiB > 512 MiB
        assert_eq!(
            reason_of(r),
            EntryProblem::PhysicalSizeTooLarge {
                bytes: 8193 * 65536
            }
        );
    }

    #[test]
    fn rejects_consistent_table_too_small_for_disk() {
        // One 64 KiB table cluster at 512-byte granularity covers 256 MiB.
        let mut r = raw(&b0());
        r.flags = FLAG_AUTO;
        r.granularity_bits = 9;
        assert_eq!(
            reason_of(r.clone()),
            EntryProblem::TooSmallForDisk {
                covered: 256 << 20,
                disk_size: 1 << 30
            }
        );
        // The same entry in use is tolerated.
        r.flags = FLAG_IN_USE;
        assert!(decode_directory(&dir_of(&[r]), 1, &geometry()).is_ok());
    }

    #[test]
    fn rejects_duplicate_names() {
        let mut e2 = b0();
        e2.table_offset = 0x0C0000;
        let bytes = dir_of(&[raw(&b0()), raw(&e2)]);
        assert_eq!(
            decode_directory(&bytes, 2, &geometry()),
            Err(Corruption::DirectoryEntry {
                index: 1,
                offset: 32,
                reason: EntryProblem::DuplicateName { name: "b0".into() }
            })
        );
    }

    /// QEMU opens a directory whose later entry of a name is `in_use` (it skips that entry),
    /// and refuses one where it is not: the check's decoding follows it.
    #[test]
    fn a_repeated_name_that_is_in_use_decodes_as_qemu_opens_it() {
        let mut e2 = b0();
        e2.table_offset = 0x0C0000;
        e2.in_use = false;
        let plain = dir_of(&[raw(&b0()), raw(&e2)]);
        e2.in_use = true;
        let in_use = dir_of(&[raw(&b0()), raw(&e2)]);
        assert!(decode_directory(&in_use, 2, &geometry()).is_err());
        assert!(decode_directory_as_qemu_opens(&plain, 2, &geometry()).is_err());
        let entries = decode_directory_as_qemu_opens(&in_use, 2, &geometry()).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries[1].in_use && entries[1].name == entries[0].name);
    }

    /// QEMU reads a name up to its first NUL, so `b0\0x` beside `b0` is a second `b0` to
    /// it ("Bitmap already exists"): refused here too, by both readers.
    #[test]
    fn rejects_names_qemu_reads_alike() {
        let mut e2 = b0();
        e2.table_offset = 0x0C0000;
        let mut r2 = raw(&e2);
        r2.name = b"b0\0x".to_vec();
        let bytes = dir_of(&[raw(&b0()), r2]);
        assert!(matches!(
            decode_directory(&bytes, 2, &geometry()),
            Err(Corruption::DirectoryEntry {
                index: 1,
                reason: EntryProblem::DuplicateName { .. },
                ..
            })
        ));
        let t = triage_directory(&bytes, 2, &geometry());
        assert!(t.entries[0].verdict.is_ok());
        assert!(matches!(
            t.entries[1].verdict,
            Err(EntryProblem::DuplicateName { .. })
        ));
    }

    #[test]
    fn table_size_matches_qemu() {
        // 1 GiB, 64 KiB granularity, 64 KiB clusters: 16384 bits, one cluster.
        assert_eq!(table_size(1 << 30, 16, 65536).unwrap(), 1);
        // 16 GiB + 512 at 512-byte granularity: 65 clusters (`docs/FORMAT.md`, bitmap table size).
        assert_eq!(table_size((16 << 30) + 512, 9, 65536).unwrap(), 65);
        assert_eq!(table_size(4 << 20, 16, 65536).unwrap(), 1);
        assert_eq!(table_size(0, 16, 65536).unwrap(), 0);
        // Exactly one cluster's coverage, and one byte more.
        let cover = 65536u64 * 65536 * 8;
        assert_eq!(table_size(cover, 16, 65536).unwrap(), 1);
        assert_eq!(table_size(cover + 1, 16, 65536).unwrap(), 2);
    }

    #[test]
    fn table_size_rejects_bad_arguments() {
        assert!(matches!(table_size(1, 8, 65536), Err(InvalidValue(_))));
        assert!(matches!(table_size(1, 32, 65536), Err(InvalidValue(_))));
        assert!(matches!(table_size(1, 16, 65535), Err(InvalidValue(_))));
        assert!(matches!(table_size(1, 16, 1 << 22), Err(InvalidValue(_))));
        // 2^42 bits of bitmap is far beyond 512 MiB.
        assert!(matches!(
            table_size(u64::MAX, 9, 65536),
            Err(InvalidValue(_))
        ));
        // 512 MiB of bitmap exactly is accepted.
        assert_eq!(table_size(1 << 41, 9, 65536).unwrap(), 8192);
    }

    #[test]
    fn check_table_size_requires_exact_size_unless_in_use() {
        let mut e = b0();
        e.in_use = false;
        assert_eq!(e.check_table_size(&geometry()), Ok(()));
        e.table_size = 2;
        assert_eq!(
            e.check_table_size(&geometry()),
            Err(EntryProblem::TableSizeMismatch {
                found: 2,
                expected: 1
            })
        );
        e.in_use = true;
        assert_eq!(e.check_table_size(&geometry()), Ok(()));
    }

    #[test]
    fn encode_rejects_caller_mistakes() {
        let mut e = b0();
        e.name = "n".repeat(1024).into();
        assert!(matches!(e.encode(), Err(InvalidValue(_))));
        assert!(matches!(
            encode_directory(&[e], &geometry()),
            Err(InvalidValue(_))
        ));
        assert!(matches!(
            encode_directory(&[], &geometry()),
            Err(InvalidValue(_))
        ));
        assert!(matches!(
            encode_directory(&[b0(), b0()], &geometry()),
            Err(InvalidValue(_))
        ));
        let mut wrong = b0();
        wrong.in_use = false;
        wrong.table_size = 3;
        assert!(matches!(
            encode_directory(&[wrong], &geometry()),
            Err(InvalidValue(_))
        ));
    }
}
