//! The feature bits of the image header and the feature name table that names them.
//!
//! Both the header decoder (which names unknown incompatible bits in its error, as QEMU's
//! `report_unsupported_feature` does) and the extension codec (which reads and writes the
//! table) use this module; it uses only the extension framing in `frame.rs`.

use super::bytes::{be_u8, slice};
use super::corruption::{invalid_input, Corruption, InvalidValue};
use super::frame::{Frames, EXT_FEATURE_TABLE};

/// Incompatible bit 0: refcounts may be stale (lazy refcounts); repair before writing.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: the image is corrupt; open read-only except for repair.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: compression_type is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit QEMU 10 knows (`QCOW2_INCOMPAT_MASK`).
pub const INCOMPAT_MASK: u64 = 0x1F;
/// Compatible bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is raw (valid without the qcow2 metadata).
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Every autoclear bit QEMU 10 knows (`QCOW2_AUTOCLEAR_MASK`).
pub const AUTOCLEAR_MASK: u64 = 0x3;

/// One feature name table entry.
pub const FEATURE_NAME_ENTRY_LEN: usize = 48;
/// Bytes for the name in a feature name table entry (zero-padded, not NUL-terminated if full).
pub const FEATURE_NAME_LEN: usize = 46;

// Field offsets inside a feature name table entry.
const OFF_FEAT_TYPE: usize = 0;
const OFF_FEAT_BIT: usize = 1;
const OFF_FEAT_NAME: usize = 2;

/// Which feature bitmask a feature name table entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// Type 0: incompatible_features.
    Incompatible,
    /// Type 1: compatible_features.
    Compatible,
    /// Type 2: autoclear_features.
    Autoclear,
    /// Any other type byte, kept as found.
    Other(u8),
}

impl FeatureKind {
    fn from_byte(b: u8) -> Self {
        match b {
            0 => Self::Incompatible,
            1 => Self::Compatible,
            2 => Self::Autoclear,
            other => Self::Other(other),
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Self::Incompatible => 0,
            Self::Compatible => 1,
            Self::Autoclear => 2,
            Self::Other(b) => b,
        }
    }
}

/// One 48-byte entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which bitmask the bit belongs to.
    pub kind: FeatureKind,
    /// Bit number within that bitmask (0-63).
    pub bit: u8,
    /// The name, up to 46 bytes, without the zero padding.
    pub name: Vec<u8>,
}

impl FeatureName {
    /// Decodes one entry from the first 48 bytes of `bytes`; `None` if it is shorter.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let kind = FeatureKind::from_byte(be_u8(bytes, OFF_FEAT_TYPE)?);
        let bit = be_u8(bytes, OFF_FEAT_BIT)?;
        let raw = slice(bytes, OFF_FEAT_NAME, FEATURE_NAME_LEN)?;
        // QEMU prints the name with "%.46s": it stops at the first NUL.
        let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let name = raw.get(..len).unwrap_or_default().to_vec();
        Some(Self { kind, bit, name })
    }

    /// Appends the 48-byte entry; names longer than 46 bytes are a caller mistake.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), InvalidValue> {
        if self.name.len() > FEATURE_NAME_LEN {
            return Err(invalid_input!(
                "feature name of {} bytes exceeds 46",
                self.name.len()
            ));
        }
        out.push(self.kind.to_byte());
        out.push(self.bit);
        out.extend_from_slice(&self.name);
        out.resize(
            out.len()
                .saturating_add(FEATURE_NAME_LEN.saturating_sub(self.name.len())),
            0,
        );
        Ok(())
    }

    /// The name as text, with invalid UTF-8 replaced.
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// QEMU's own feature name table: the 8 entries, in the order `qcow2_update_header`
/// writes them (384 bytes of extension data).
pub fn qemu_feature_table() -> Vec<FeatureName> {
    let entry = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.as_bytes().to_vec(),
    };
    vec![
        entry(FeatureKind::Incompatible, 0, "dirty bit"),
        entry(FeatureKind::Incompatible, 1, "corrupt bit"),
        entry(FeatureKind::Incompatible, 2, "external data file"),
        entry(FeatureKind::Incompatible, 3, "compression type"),
        entry(FeatureKind::Incompatible, 4, "extended L2 entries"),
        entry(FeatureKind::Compatible, 0, "lazy refcounts"),
        entry(FeatureKind::Autoclear, 0, "bitmaps"),
        entry(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}

/// Decodes feature name table data. A trailing partial entry is ignored, as QEMU ignores it.
pub fn decode_feature_table(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(FEATURE_NAME_ENTRY_LEN)
        .filter_map(FeatureName::decode)
        .collect()
}

/// Builds the error for unknown incompatible bits, naming them from `table` like QEMU's
/// `report_unsupported_feature`.
pub(crate) fn unsupported_features(bits: u64, table: &[FeatureName]) -> Corruption {
    let mut unnamed = bits;
    let mut named = Vec::new();
    for f in table {
        if f.kind != FeatureKind::Incompatible || f.bit > 63 {
            continue;
        }
        let mask = 1u64 << f.bit;
        if unnamed & mask != 0 {
            named.push(f.name_lossy());
            unnamed &= !mask;
        }
    }
    Corruption::UnsupportedFeatures {
        bits,
        named,
        unnamed,
    }
}

/// Best-effort read of the feature name table from the extension area, for naming unknown
/// incompatible bits. Stops quietly at the first malformed frame.
pub(crate) fn scan_feature_table(bytes: &[u8], start: u64, end: u64) -> Vec<FeatureName> {
    let mut frames = Frames {
        bytes,
        offset: start,
        end,
    };
    let mut table = Vec::new();
    while let Ok(Some(f)) = frames.next_frame() {
        if f.kind == EXT_FEATURE_TABLE {
            table = decode_feature_table(f.data);
        }
    }
    table
}
