//! Header extensions: the known types, and byte-for-byte preservation of unknown ones. The
//! framing is in `frame.rs`, the feature name table in [`feature`](super::feature).
//!
//! Byte tables: `docs/FORMAT.md`, "Header extensions", "Feature name table" and
//! "Bitmaps extension". Decoding follows QEMU's `qcow2_read_extensions`; encoding follows
//! `header_ext_add`.

use super::bytes::{be_u32, be_u64, put_u32, put_u64};
use super::corruption::{invalid_input, Corruption, InvalidValue};
use super::feature::{
    decode_feature_table, FeatureName, AUTOCLEAR_BITMAPS, FEATURE_NAME_ENTRY_LEN,
};
use super::frame::{frame_into, Frames};
use super::header::{Header, CRYPT_LUKS};
use super::mode::ModeExtension;

/// The bitmaps extension's data length; QEMU refuses any other.
pub const BITMAPS_EXT_LEN: usize = 24;
/// The full disk encryption pointer's data length; QEMU refuses any other.
pub const CRYPTO_EXT_LEN: usize = 16;
/// QEMU's backing format buffer is 16 bytes with a NUL, so names must be shorter than 16.
pub const MAX_BACKING_FORMAT_LEN: usize = 15;
/// `QCOW2_MAX_BITMAPS`.
pub const MAX_BITMAPS: u32 = 65535;
/// `QCOW2_MAX_BITMAP_DIRECTORY_SIZE` = 1024 × 65535.
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * 65535;

pub use super::frame::{
    EXTENSION_FRAME_LEN, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO_HEADER, EXT_DATA_FILE,
    EXT_END, EXT_FEATURE_TABLE,
};
pub use super::mode::EXT_MODE;

// Field offsets inside the bitmaps extension data.
const OFF_BM_NB_BITMAPS: usize = 0;
const OFF_BM_RESERVED: usize = 4;
const OFF_BM_DIR_SIZE: usize = 8;
const OFF_BM_DIR_OFFSET: usize = 16;
// Field offsets inside the crypto header pointer data.
const OFF_CRYPTO_OFFSET: usize = 0;
const OFF_CRYPTO_LENGTH: usize = 8;

/// The 24-byte bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// "The number of bitmaps contained in the image. Must be greater than or equal to 1."
    pub nb_bitmaps: u32,
    /// "Size of the bitmap directory in bytes. It is the cumulative size of all
    /// (nb_bitmaps) bitmap directory entries."
    pub directory_size: u64,
    /// "Offset into the image file at which the bitmap directory starts. Must be aligned to a
    /// cluster boundary."
    pub directory_offset: u64,
}

impl BitmapsExtension {
    /// Decodes and checks the extension data found in the frame at `frame_offset`.
    ///
    /// # Errors
    /// [`Corruption::ExtensionLength`] unless `data` is exactly 24 bytes; then, in QEMU's
    /// order, [`Corruption::BitmapsReserved`], [`Corruption::BitmapCount`] (above 65535 or 0),
    /// [`Corruption::BitmapDirectoryOffset`] and [`Corruption::BitmapDirectorySize`].
    pub fn decode(data: &[u8], frame_offset: u64, cluster_size: u64) -> Result<Self, Corruption> {
        check_len(
            data,
            BITMAPS_EXT_LEN,
            EXT_BITMAPS,
            frame_offset,
            "exactly 24",
        )?;
        let field = |at| be_u32(data, at).unwrap_or(0);
        let field64 = |at| be_u64(data, at).unwrap_or(0);
        let reserved = field(OFF_BM_RESERVED);
        if reserved != 0 {
            return Err(Corruption::BitmapsReserved {
                offset: frame_offset,
                found: reserved,
            });
        }
        let ext = Self {
            nb_bitmaps: field(OFF_BM_NB_BITMAPS),
            directory_size: field64(OFF_BM_DIR_SIZE),
            directory_offset: field64(OFF_BM_DIR_OFFSET),
        };
        if ext.nb_bitmaps == 0 || ext.nb_bitmaps > MAX_BITMAPS {
            return Err(Corruption::BitmapCount {
                offset: frame_offset,
                found: ext.nb_bitmaps,
            });
        }
        if cluster_size == 0 || !ext.directory_offset.is_multiple_of(cluster_size) {
            return Err(Corruption::BitmapDirectoryOffset {
                offset: frame_offset,
                found: ext.directory_offset,
            });
        }
        if ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(Corruption::BitmapDirectorySize {
                offset: frame_offset,
                found: ext.directory_size,
            });
        }
        Ok(ext)
    }

    /// The 24 data bytes (reserved field zero).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BITMAPS_EXT_LEN);
        put_u32(&mut out, self.nb_bitmaps);
        put_u32(&mut out, 0);
        put_u64(&mut out, self.directory_size);
        put_u64(&mut out, self.directory_offset);
        out
    }
}

/// The full disk encryption header pointer (LUKS only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoHeaderPointer {
    /// "Offset to the start of encryption header in the image file. Must be aligned to the
    /// cluster size."
    pub offset: u64,
    /// "Length of the written encryption header in bytes."
    pub length: u64,
}

impl CryptoHeaderPointer {
    /// The 16 data bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CRYPTO_EXT_LEN);
        put_u64(&mut out, self.offset);
        put_u64(&mut out, self.length);
        out
    }
}

/// An extension this crate does not interpret, kept byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownExtension {
    /// The type code.
    pub kind: u32,
    /// The data, without the padding.
    pub data: Vec<u8>,
}

/// One decoded header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extension {
    /// Backing file format name, for example `qcow2` or `raw`.
    BackingFormat(Vec<u8>),
    /// The image's feature name table.
    FeatureTable(Vec<FeatureName>),
    /// A trusted bitmaps extension (autoclear bit 0 set), already checked.
    Bitmaps(BitmapsExtension),
    /// A bitmaps extension while autoclear bit 0 is clear. QEMU warns that a program without
    /// bitmap support modified the file, does not check or use it, and drops it on the next
    /// header write: every bitmap in it is lost and its clusters leak. The raw 24 bytes.
    StaleBitmaps(Vec<u8>),
    /// Full disk encryption header pointer.
    CryptoHeader(CryptoHeaderPointer),
    /// External data file name.
    DataFile(Vec<u8>),
    /// This crate's mode extension (`EXT_MODE`, "DBMD"; see [`mode`](super::mode)), when
    /// its data is 8 bytes long. Of any other length it is an [`Extension::Unknown`], kept
    /// byte for byte.
    Mode(ModeExtension),
    /// Any other type.
    Unknown(UnknownExtension),
}

impl Extension {
    /// The type code written in the frame.
    pub fn kind(&self) -> u32 {
        match self {
            Self::BackingFormat(_) => EXT_BACKING_FORMAT,
            Self::FeatureTable(_) => EXT_FEATURE_TABLE,
            Self::Bitmaps(_) | Self::StaleBitmaps(_) => EXT_BITMAPS,
            Self::CryptoHeader(_) => EXT_CRYPTO_HEADER,
            Self::DataFile(_) => EXT_DATA_FILE,
            Self::Mode(_) => EXT_MODE,
            Self::Unknown(u) => u.kind,
        }
    }

    /// The extension's data bytes, without frame or padding.
    ///
    /// # Errors
    /// [`InvalidValue`] for a feature name longer than 46 bytes.
    pub fn data(&self) -> Result<Vec<u8>, InvalidValue> {
        Ok(match self {
            Self::BackingFormat(d) | Self::DataFile(d) | Self::StaleBitmaps(d) => d.clone(),
            Self::FeatureTable(t) => {
                let mut out = Vec::with_capacity(t.len().saturating_mul(FEATURE_NAME_ENTRY_LEN));
                for f in t {
                    f.encode_into(&mut out)?;
                }
                out
            }
            Self::Bitmaps(b) => b.encode(),
            Self::CryptoHeader(c) => c.encode(),
            Self::Mode(m) => m.encode(),
            Self::Unknown(u) => u.data.clone(),
        })
    }

    /// The framed extension: type, length, data, zero padding to a multiple of 8.
    ///
    /// # Errors
    /// [`InvalidValue`] if the type is 0 (the end marker) or the data does not fit the
    /// u32 length field, or as for [`Extension::data`].
    pub fn encode(&self) -> Result<Vec<u8>, InvalidValue> {
        if self.kind() == EXT_END {
            return Err(invalid_input!("extension type 0 is the end marker"));
        }
        let mut out = Vec::new();
        frame_into(&mut out, self.kind(), &self.data()?)?;
        Ok(out)
    }
}

/// Encodes `extensions` in the order given, then the end marker. Unknown extensions come
/// out exactly as they were read.
///
/// # Errors
/// As for [`Extension::encode`].
pub fn encode_extensions(extensions: &[Extension]) -> Result<Vec<u8>, InvalidValue> {
    let mut out = Vec::new();
    for e in extensions {
        out.extend_from_slice(&e.encode()?);
    }
    frame_into(&mut out, EXT_END, &[])?;
    Ok(out)
}

fn check_len(
    data: &[u8],
    want: usize,
    kind: u32,
    frame_offset: u64,
    expected: &'static str,
) -> Result<(), Corruption> {
    if data.len() == want {
        Ok(())
    } else {
        Err(Corruption::ExtensionLength {
            offset: frame_offset,
            kind,
            len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            expected,
        })
    }
}

/// Decodes every extension in `header`'s extension area of `cluster0`, with QEMU's checks.
///
/// `cluster0` is the image from offset 0; it must reach at least the last extension read.
/// The walk stops at the end marker or at the end of the area. Extensions are returned in
/// file order; later duplicates of a known type are returned too (QEMU lets the last win).
///
/// # Errors
/// [`Corruption::ExtensionTooLarge`] when a frame or its data passes the end of the area,
/// [`Corruption::Truncated`] when `cluster0` ends first, and the type-specific errors:
/// backing format of 16 bytes or more, crypto pointer without LUKS, of the wrong length or
/// unaligned, and the bitmaps extension checks of [`BitmapsExtension::decode`]. A mode
/// extension of the wrong length is not an error: it comes back as
/// [`Extension::Unknown`] (the mode then reads as unknown; QEMU opens such an image).
pub fn decode_extensions(cluster0: &[u8], header: &Header) -> Result<Vec<Extension>, Corruption> {
    let (start, end) = header.extension_area();
    let cluster_size = header.cluster_size();
    let mut frames = Frames {
        bytes: cluster0,
        offset: start,
        end,
    };
    let mut out = Vec::new();
    while let Some(f) = frames.next_frame()? {
        let ext = match f.kind {
            EXT_BACKING_FORMAT => {
                if f.data.len() > MAX_BACKING_FORMAT_LEN {
                    return Err(Corruption::ExtensionLength {
                        offset: f.offset,
                        kind: f.kind,
                        len: u32::try_from(f.data.len()).unwrap_or(u32::MAX),
                        expected: "below 16",
                    });
                }
                Extension::BackingFormat(f.data.to_vec())
            }
            EXT_FEATURE_TABLE => Extension::FeatureTable(decode_feature_table(f.data)),
            EXT_CRYPTO_HEADER => {
                if header.crypt_method != CRYPT_LUKS {
                    return Err(Corruption::CryptoWithoutLuks {
                        offset: f.offset,
                        crypt_method: header.crypt_method,
                    });
                }
                check_len(f.data, CRYPTO_EXT_LEN, f.kind, f.offset, "exactly 16")?;
                let ptr = CryptoHeaderPointer {
                    offset: be_u64(f.data, OFF_CRYPTO_OFFSET).unwrap_or(0),
                    length: be_u64(f.data, OFF_CRYPTO_LENGTH).unwrap_or(0),
                };
                if !ptr.offset.is_multiple_of(cluster_size) {
                    return Err(Corruption::CryptoHeaderOffset {
                        offset: f.offset,
                        found: ptr.offset,
                    });
                }
                Extension::CryptoHeader(ptr)
            }
            EXT_BITMAPS => {
                check_len(f.data, BITMAPS_EXT_LEN, f.kind, f.offset, "exactly 24")?;
                if header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
                    Extension::StaleBitmaps(f.data.to_vec())
                } else {
                    Extension::Bitmaps(BitmapsExtension::decode(f.data, f.offset, cluster_size)?)
                }
            }
            EXT_DATA_FILE => Extension::DataFile(f.data.to_vec()),
            EXT_MODE => match ModeExtension::decode(f.data, f.offset) {
                Ok(m) => Extension::Mode(m),
                Err(_) => Extension::Unknown(UnknownExtension {
                    kind: EXT_MODE,
                    data: f.data.to_vec(),
                }),
            },
            kind => Extension::Unknown(UnknownExtension {
                kind,
                data: f.data.to_vec(),
            }),
        };
        out.push(ext);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::feature::{qemu_feature_table, FeatureKind};
    use super::*;

    fn header() -> Header {
        Header {
            autoclear_features: AUTOCLEAR_BITMAPS,
            ..crate::format::header::tests::sample()
        }
    }

    /// Cluster 0 with `h`'s header followed by `area`.
    fn cluster(h: &Header, area: &[u8]) -> Vec<u8> {
        let mut b = h.encode().unwrap();
        b.extend_from_slice(area);
        b.resize(h.cluster_size() as usize, 0);
        b
    }

    fn bitmaps_data(nb: u32, reserved: u32, size: u64, offset: u64) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&nb.to_be_bytes());
        d.extend_from_slice(&reserved.to_be_bytes());
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&offset.to_be_bytes());
        d
    }

    fn framed(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame_into(&mut out, kind, data).unwrap();
        out
    }

    #[test]
    fn frame_is_8_bytes_plus_padded_data() {
        assert_eq!(framed(0x1234, &[]).len(), EXTENSION_FRAME_LEN);
        assert_eq!(framed(0x1234, &[1]).len(), 16);
        assert_eq!(framed(0x1234, &[1; 8]).len(), 16);
        assert_eq!(framed(0x1234, &[1; 9]).len(), 24);
        assert_eq!(
            framed(0x1234, &[1, 2, 3]),
            [0, 0, 0x12, 0x34, 0, 0, 0, 3, 1, 2, 3, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn feature_table_entry_is_48_bytes_and_qemu_table_is_384() {
        let t = Extension::FeatureTable(qemu_feature_table());
        let data = t.data().unwrap();
        assert_eq!(data.len(), 8 * FEATURE_NAME_ENTRY_LEN);
        assert_eq!(data.len(), 384);
        assert_eq!(&data[..11], b"\x00\x00dirty bit");
        assert_eq!(&data[48..50], &[0, 1]);
        assert_eq!(&data[6 * 48..6 * 48 + 9], b"\x02\x00bitmaps");
        assert_eq!(decode_feature_table(&data), qemu_feature_table());
    }

    #[test]
    fn feature_table_ignores_a_partial_entry() {
        let mut data = Extension::FeatureTable(qemu_feature_table())
            .data()
            .unwrap();
        data.extend_from_slice(&[0, 7, b'x']);
        assert_eq!(decode_feature_table(&data), qemu_feature_table());
        let b = cluster(&header(), &framed(EXT_FEATURE_TABLE, &data));
        assert_eq!(
            decode_extensions(&b, &header()).unwrap(),
            vec![Extension::FeatureTable(qemu_feature_table())]
        );
    }

    #[test]
    fn bitmaps_extension_is_24_bytes_and_round_trips() {
        let b = BitmapsExtension {
            nb_bitmaps: 1,
            directory_size: 32,
            directory_offset: 0x50000,
        };
        let data = b.encode();
        assert_eq!(data.len(), BITMAPS_EXT_LEN);
        assert_eq!(BitmapsExtension::decode(&data, 0x1f8, 65536).unwrap(), b);
    }

    #[test]
    fn round_trip_all_kinds_in_order() {
        let exts = vec![
            Extension::BackingFormat(b"raw".to_vec()),
            Extension::FeatureTable(qemu_feature_table()),
            Extension::Bitmaps(BitmapsExtension {
                nb_bitmaps: 2,
                directory_size: 64,
                directory_offset: 0x70000,
            }),
            Extension::DataFile(b"data.img".to_vec()),
            Extension::Unknown(UnknownExtension {
                kind: 0x2222_2222,
                data: vec![9; 13],
            }),
            Extension::Unknown(UnknownExtension {
                kind: 0x1111_1111,
                data: vec![],
            }),
        ];
        let area = encode_extensions(&exts).unwrap();
        let b = cluster(&header(), &area);
        assert_eq!(decode_extensions(&b, &header()).unwrap(), exts);
    }

    #[test]
    fn unknown_extension_keeps_bytes_exactly() {
        let data: Vec<u8> = (0..=255).collect();
        let e = Extension::Unknown(UnknownExtension {
            kind: 0xdead_beef,
            data: data.clone(),
        });
        let b = cluster(
            &header(),
            &encode_extensions(std::slice::from_ref(&e)).unwrap(),
        );
        let got = decode_extensions(&b, &header()).unwrap();
        assert_eq!(got, vec![e.clone()]);
        assert_eq!(got[0].encode().unwrap(), e.encode().unwrap());
        assert_eq!(&b[120..376], &data[..]);
    }

    #[test]
    fn crypto_round_trip_with_luks() {
        let mut h = header();
        h.crypt_method = CRYPT_LUKS;
        let e = Extension::CryptoHeader(CryptoHeaderPointer {
            offset: 0x20000,
            length: 0x1000,
        });
        let b = cluster(&h, &encode_extensions(std::slice::from_ref(&e)).unwrap());
        assert_eq!(decode_extensions(&b, &h).unwrap(), vec![e]);
    }

    #[test]
    fn walk_stops_at_end_marker() {
        let mut area = encode_extensions(&[]).unwrap();
        area.extend_from_slice(&framed(0x3333_3333, &[1, 2]));
        let b = cluster(&header(), &area);
        assert_eq!(decode_extensions(&b, &header()).unwrap(), vec![]);
    }

    #[test]
    fn area_ends_at_backing_file_offset() {
        let mut h = header();
        h.backing_file_offset = 0x200;
        h.backing_file_size = 4;
        // An extension whose data would cross the backing file name is too large.
        let area = framed(0x3333_3333, &[0; 0x200 - 112 - 8 + 1]);
        let b = cluster(&h, &area);
        assert_eq!(
            decode_extensions(&b, &h),
            Err(Corruption::ExtensionTooLarge {
                offset: 112,
                len: 0x200 - 112 - 8 + 1,
                room: 0x200 - 112 - 8
            })
        );
    }

    #[test]
    fn rejects_extension_too_large_for_cluster() {
        let mut area = Vec::new();
        area.extend_from_slice(&0x3333_3333u32.to_be_bytes());
        area.extend_from_slice(&65536u32.to_be_bytes());
        let b = cluster(&header(), &area);
        assert_eq!(
            decode_extensions(&b, &header()),
            Err(Corruption::ExtensionTooLarge {
                offset: 112,
                len: 65536,
                room: 65536 - 120
            })
        );
    }

    #[test]
    fn rejects_frame_that_does_not_fit() {
        let mut h = header();
        h.backing_file_offset = 116;
        let b = cluster(&h, &[0x33; 8]);
        assert!(matches!(
            decode_extensions(&b, &h),
            Err(Corruption::ExtensionTooLarge {
                offset: 112,
                room: 0,
                ..
            })
        ));
    }

    #[test]
    fn rejects_truncated_input() {
        let b = cluster(&header(), &framed(0x3333_3333, &[1; 40]));
        assert!(matches!(
            decode_extensions(&b[..130], &header()),
            Err(Corruption::Truncated { offset: 112, .. })
        ));
    }

    #[test]
    fn rejects_long_backing_format() {
        let b = cluster(&header(), &framed(EXT_BACKING_FORMAT, &[b'a'; 16]));
        assert!(matches!(
            decode_extensions(&b, &header()),
            Err(Corruption::ExtensionLength {
                len: 16,
                kind: EXT_BACKING_FORMAT,
                ..
            })
        ));
    }

    #[test]
    fn rejects_crypto_without_luks() {
        let e = framed(EXT_CRYPTO_HEADER, &[0; 16]);
        let b = cluster(&header(), &e);
        assert_eq!(
            decode_extensions(&b, &header()),
            Err(Corruption::CryptoWithoutLuks {
                offset: 112,
                crypt_method: 0
            })
        );
    }

    #[test]
    fn rejects_crypto_of_wrong_length() {
        let mut h = header();
        h.crypt_method = CRYPT_LUKS;
        let b = cluster(&h, &framed(EXT_CRYPTO_HEADER, &[0; 24]));
        assert!(matches!(
            decode_extensions(&b, &h),
            Err(Corruption::ExtensionLength { len: 24, .. })
        ));
    }

    #[test]
    fn rejects_unaligned_crypto_offset() {
        let mut h = header();
        h.crypt_method = CRYPT_LUKS;
        let ptr = CryptoHeaderPointer {
            offset: 0x20200,
            length: 1,
        };
        let b = cluster(&h, &framed(EXT_CRYPTO_HEADER, &ptr.encode()));
        assert_eq!(
            decode_extensions(&b, &h),
            Err(Corruption::CryptoHeaderOffset {
                offset: 112,
                found: 0x20200
            })
        );
    }

    #[test]
    fn rejects_bitmaps_extension_not_24_bytes() {
        let b = cluster(&header(), &framed(EXT_BITMAPS, &[0; 32]));
        assert!(matches!(
            decode_extensions(&b, &header()),
            Err(Corruption::ExtensionLength {
                len: 32,
                kind: EXT_BITMAPS,
                ..
            })
        ));
    }

    #[test]
    fn rejects_bitmaps_reserved_nonzero() {
        let b = cluster(
            &header(),
            &framed(EXT_BITMAPS, &bitmaps_data(1, 5, 32, 0x50000)),
        );
        assert_eq!(
            decode_extensions(&b, &header()),
            Err(Corruption::BitmapsReserved {
                offset: 112,
                found: 5
            })
        );
    }

    #[test]
    fn rejects_zero_bitmaps() {
        let b = cluster(
            &header(),
            &framed(EXT_BITMAPS, &bitmaps_data(0, 0, 32, 0x50000)),
        );
        assert_eq!(
            decode_extensions(&b, &header()),
            Err(Corruption::BitmapCount {
                offset: 112,
                found: 0
            })
        );
    }

    #[test]
    fn rejects_more_than_65535_bitmaps() {
        let b = cluster(
            &header(),
            &framed(EXT_BITMAPS, &bitmaps_data(65536, 0, 32, 0x50000)),
        );
        assert_eq!(
            decode_extensions(&b, &header()),
            Err(Corruption::BitmapCount {
                offset: 112,
                found: 65536
            })
        );
        let ok = cluster(
            &header(),
            &framed(EXT_BITMAPS, &bitmaps_data(65535, 0, 32, 0x50000)),
        );
        assert!(decode_extensions(&ok, &header()).is_ok());
    }

    #[test]
    fn rejects_unaligned_directory_offset() {
        let b = cluster(
            &header(),
            &framed(EXT_BITMAPS, &bitmaps_data(1, 0, 32, 0x50200)),
        );
        assert_eq!(
            decode_extensions(&b, &header()),
            Err(Corruption::BitmapDirectoryOffset {
                offset: 112,
                found: 0x50200
            })
        );
    }

    #[test]
    fn rejects_directory_larger_than_limit() {
        let too_big = MAX_BITMAP_DIRECTORY_SIZE + 1;
        let b = cluster(
            &header(),
            &framed(EXT_BITMAPS, &bitmaps_data(1, 0, too_big, 0x50000)),
        );
        assert_eq!(
            decode_extensions(&b, &header()),
            Err(Corruption::BitmapDirectorySize {
                offset: 112,
                found: too_big
            })
        );
    }

    #[test]
    fn bitmaps_without_autoclear_bit_are_stale_and_unchecked() {
        let mut h = header();
        h.autoclear_features = 0;
        let data = bitmaps_data(0, 7, 0, 3); // would fail every check if trusted
        let b = cluster(&h, &framed(EXT_BITMAPS, &data));
        assert_eq!(
            decode_extensions(&b, &h).unwrap(),
            vec![Extension::StaleBitmaps(data)]
        );
    }

    #[test]
    fn unknown_incompatible_bits_are_named_from_the_image_table() {
        let mut h = header();
        h.incompatible_features = (1 << 5) | (1 << 9);
        let table = Extension::FeatureTable(vec![
            FeatureName {
                kind: FeatureKind::Incompatible,
                bit: 5,
                name: b"future thing".to_vec(),
            },
            FeatureName {
                kind: FeatureKind::Compatible,
                bit: 9,
                name: b"not this one".to_vec(),
            },
        ]);
        let mut b = h.encode().unwrap();
        b.extend_from_slice(&encode_extensions(&[table]).unwrap());
        b.resize(65536, 0);
        let err = Header::decode(&b).unwrap_err();
        assert_eq!(
            err,
            Corruption::UnsupportedFeatures {
                bits: (1 << 5) | (1 << 9),
                named: vec!["future thing".into()],
                unnamed: 1 << 9
            }
        );
        assert_eq!(
            err.to_string(),
            "unsupported qcow2 feature(s): future thing, unknown incompatible feature: 200"
        );
    }

    #[test]
    fn encode_rejects_end_marker_type_and_long_feature_names() {
        let e = Extension::Unknown(UnknownExtension {
            kind: EXT_END,
            data: vec![],
        });
        assert!(matches!(e.encode(), Err(InvalidValue(_))));
        let t = Extension::FeatureTable(vec![FeatureName {
            kind: FeatureKind::Other(9),
            bit: 0,
            name: vec![b'x'; 47],
        }]);
        assert!(matches!(t.encode(), Err(InvalidValue(_))));
    }

    #[test]
    fn mode_extension_decodes_when_8_bytes_and_is_kept_as_unknown_otherwise() {
        let m = Extension::Mode(ModeExtension { flags: 3 });
        let b = cluster(&header(), &encode_extensions(std::slice::from_ref(&m)).unwrap());
        assert_eq!(&b[112..120], b"DBMD\0\0\0\x08");
        assert_eq!(decode_extensions(&b, &header()).unwrap(), vec![m]);
        for len in [0usize, 4, 7, 9, 16] {
            let b = cluster(&header(), &framed(EXT_MODE, &vec![0xA5; len]));
            assert_eq!(
                decode_extensions(&b, &header()).unwrap(),
                vec![Extension::Unknown(UnknownExtension {
                    kind: EXT_MODE,
                    data: vec![0xA5; len],
                })],
                "{len} bytes"
            );
        }
    }
}
