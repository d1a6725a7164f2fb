//! Cluster 0 as a whole: header, extensions and backing file name, laid out like QEMU.
//!
//! QEMU rewrites the entire first cluster on every header update (`qcow2_update_header`),
//! so anything in cluster 0 beyond what [`HeaderArea`] models is lost. See
//! `docs/FORMAT.md`, "Layout QEMU writes".

use super::bytes::{slice, to_u64, to_usize, truncated};
use super::corruption::{invalid_input, Corruption, InvalidValue};
use super::extension::{
    decode_extensions, BitmapsExtension, CryptoHeaderPointer, Extension, UnknownExtension,
    MAX_BACKING_FORMAT_LEN,
};
use super::feature::{qemu_feature_table, FeatureName, FEATURE_NAME_ENTRY_LEN};
use super::frame::{
    frame_into, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO_HEADER, EXT_DATA_FILE, EXT_END,
    EXT_FEATURE_TABLE,
};
use super::header::{Header, MAX_BACKING_FILE_NAME};
use super::mode::{ModeExtension, EXT_MODE};

/// Everything QEMU keeps in cluster 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderArea {
    /// The fixed header. On encode, backing_file_offset, backing_file_size and header_length
    /// are recomputed.
    pub header: Header,
    /// Backing file format name (shorter than 16 bytes).
    pub backing_format: Option<Vec<u8>>,
    /// External data file name; written only while incompatible bit 2 is set, as QEMU does.
    pub data_file: Option<Vec<u8>>,
    /// LUKS header pointer; written only if its offset is non-zero.
    pub crypto: Option<CryptoHeaderPointer>,
    /// The image's own feature name table, as read. Never written back: encoding emits
    /// QEMU's table instead (v3 with clusters above 4 KiB only).
    pub feature_table: Option<Vec<FeatureName>>,
    /// The bitmaps extension; written only if nb_bitmaps > 0.
    pub bitmaps: Option<BitmapsExtension>,
    /// Whether a bitmaps extension was present while autoclear bit 0 was clear. Such an
    /// extension is dropped on encode, as QEMU drops it.
    pub stale_bitmaps: bool,
    /// Unknown extensions, byte for byte, in the order they are written. Decoding yields
    /// file order; QEMU itself writes them back reversed, and accepts either order. A mode
    /// extension whose data is not 8 bytes long is kept here too (see
    /// [`set_mode`](Self::set_mode)).
    pub unknown: Vec<UnknownExtension>,
    /// This crate's mode extension ([`mode`](super::mode)), when one of 8 bytes was found
    /// (the last one, if several). Written after the unknown extensions, right before the
    /// end marker: adding or removing it changes no byte before its own frame.
    pub mode: Option<ModeExtension>,
    /// Backing file name (at most 1023 bytes).
    pub backing_file: Option<Vec<u8>>,
}

impl HeaderArea {
    /// A header area holding `header` and nothing else.
    pub fn new(header: Header) -> Self {
        Self {
            header,
            backing_format: None,
            data_file: None,
            crypto: None,
            feature_table: None,
            bitmaps: None,
            stale_bitmaps: false,
            unknown: Vec::new(),
            mode: None,
            backing_file: None,
        }
    }

    /// The external data file's name as QEMU opens it: the extension's bytes up to the
    /// first NUL (QEMU reads them as a C string, `qcow2_read_extensions`). The bytes stay
    /// in [`data_file`](Self::data_file) as they are, and are written back so.
    pub fn data_file_name(&self) -> Option<&[u8]> {
        let name = self.data_file.as_deref()?;
        Some(name.split(|&b| b == 0).next().unwrap_or(name))
    }

    /// Sets the mode extension to `mode` (`None` removes it) and drops every malformed one
    /// kept among [`unknown`](Self::unknown), so that the next encoding holds at most one
    /// mode extension, the one given. Returns whether the encoding changes.
    pub fn set_mode(&mut self, mode: Option<ModeExtension>) -> bool {
        let malformed = self.unknown.iter().any(|u| u.kind == EXT_MODE);
        let changed = malformed || self.mode != mode;
        self.unknown.retain(|u| u.kind != EXT_MODE);
        self.mode = mode;
        changed
    }

    /// Decodes cluster 0: the header, every extension, and the backing file name.
    ///
    /// When a known extension appears twice, the last one wins, as in QEMU.
    ///
    /// # Errors
    /// Any error of [`Header::decode`] or [`decode_extensions`], or
    /// [`Corruption::Truncated`] if the backing file name lies past the end of `cluster0`.
    pub fn decode(cluster0: &[u8]) -> Result<Self, Corruption> {
        let header = Header::decode(cluster0)?;
        let mut area = Self::new(header);
        for ext in decode_extensions(cluster0, &area.header)? {
            match ext {
                Extension::BackingFormat(f) => area.backing_format = Some(f),
                Extension::FeatureTable(t) => area.feature_table = Some(t),
                Extension::Bitmaps(b) => area.bitmaps = Some(b),
                Extension::StaleBitmaps(_) => area.stale_bitmaps = true,
                Extension::CryptoHeader(c) => area.crypto = Some(c),
                Extension::DataFile(d) => area.data_file = Some(d),
                Extension::Mode(m) => area.mode = Some(m),
                Extension::Unknown(u) => area.unknown.push(u),
            }
        }
        let h = &area.header;
        if h.backing_file_offset != 0 {
            let len = u64::from(h.backing_file_size);
            let name = slice(cluster0, to_usize(h.backing_file_offset), to_usize(len)).ok_or_else(
                || {
                    truncated(
                        "backing file name",
                        h.backing_file_offset,
                        len,
                        to_u64(cluster0.len()).saturating_sub(h.backing_file_offset),
                    )
                },
            )?;
            area.backing_file = Some(name.to_vec());
        }
        Ok(area)
    }

    /// Lays out cluster 0 exactly as QEMU's `qcow2_update_header` does and returns the whole
    /// cluster:
    ///
    /// 1. the header (112 bytes plus unknown header fields; 72 for v2),
    /// 2. backing format, 3. external data file name, 4. crypto header pointer,
    /// 5. QEMU's feature name table (v3 and clusters above 4 KiB),
    /// 6. the bitmaps extension (nb_bitmaps > 0), 7. unknown extensions, 8. the end marker,
    /// 9. the backing file name, then zeros to the end of the cluster.
    ///
    /// This crate's mode extension, which QEMU keeps as an unknown one, is written last of 7.
    ///
    /// # Errors
    /// [`InvalidValue`] if the header cannot be encoded, the backing format is 16
    /// bytes or longer, the backing file name is longer than 1023 bytes, an unknown extension
    /// uses a known type code, or the result does not fit in one cluster.
    pub fn encode(&self) -> Result<Vec<u8>, InvalidValue> {
        let mut header = self.header.clone();
        header.backing_file_offset = 0;
        header.backing_file_size = 0;
        let cluster_size = to_usize(header.cluster_size());
        // Encode once to learn the header length (and validate it).
        let header_len = header.encode()?.len();

        let mut tail = Vec::new();
        if let Some(fmt) = &self.backing_format {
            if fmt.len() > MAX_BACKING_FORMAT_LEN {
                return Err(invalid_input!(
                    "backing format of {} bytes must be shorter than 16",
                    fmt.len()
                ));
            }
            frame_into(&mut tail, EXT_BACKING_FORMAT, fmt)?;
        }
        if let Some(df) = &self.data_file {
            if header.has_data_file() {
                frame_into(&mut tail, EXT_DATA_FILE, df)?;
            }
        }
        if let Some(c) = &self.crypto {
            if c.offset != 0 {
                frame_into(&mut tail, EXT_CRYPTO_HEADER, &c.encode())?;
            }
        }
        if header.version >= 3 && cluster_size > 4096 {
            let table = Extension::FeatureTable(qemu_feature_table()).data()?;
            debug_assert_eq!(table.len(), 8 * FEATURE_NAME_ENTRY_LEN);
            frame_into(&mut tail, EXT_FEATURE_TABLE, &table)?;
        }
        if let Some(b) = &self.bitmaps {
            if b.nb_bitmaps > 0 {
                frame_into(&mut tail, EXT_BITMAPS, &b.encode())?;
            }
        }
        for u in &self.unknown {
            if matches!(
                u.kind,
                EXT_END
                    | EXT_BACKING_FORMAT
                    | EXT_FEATURE_TABLE
                    | EXT_BITMAPS
                    | EXT_CRYPTO_HEADER
                    | EXT_DATA_FILE
            ) {
                return Err(invalid_input!(
                    "unknown extension uses the known type {:#010x}",
                    u.kind
                ));
            }
            frame_into(&mut tail, u.kind, &u.data)?;
        }
        if let Some(m) = &self.mode {
            frame_into(&mut tail, EXT_MODE, &m.encode())?;
        }
        frame_into(&mut tail, EXT_END, &[])?;

        if let Some(name) = &self.backing_file {
            let size = u32::try_from(name.len())
                .ok()
                .filter(|&n| n <= MAX_BACKING_FILE_NAME)
                .ok_or_else(|| {
                    invalid_input!("backing file name of {} bytes exceeds 1023", name.len())
                })?;
            header.backing_file_offset = to_u64(header_len.saturating_add(tail.len()));
            header.backing_file_size = size;
            tail.extend_from_slice(name);
        }

        let mut out = header.encode()?;
        out.extend_from_slice(&tail);
        if out.len() > cluster_size {
            return Err(invalid_input!(
                "header area of {} bytes does not fit in a {cluster_size}-byte cluster",
                out.len()
            ));
        }
        out.resize(cluster_size, 0);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::header::AUTOCLEAR_BITMAPS;
    use super::*;

    fn header(cluster_bits: u32) -> Header {
        Header {
            cluster_bits,
            l1_size: 1 << 12,
            l1_table_offset: 3 << cluster_bits,
            refcount_table_offset: 1 << cluster_bits,
            autoclear_features: AUTOCLEAR_BITMAPS,
            ..crate::format::header::tests::sample()
        }
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn layout_matches_qemu_with_one_bitmap() {
        let mut a = HeaderArea::new(header(16));
        a.bitmaps = Some(BitmapsExtension {
            nb_bitmaps: 1,
            directory_size: 32,
            directory_offset: 0x50000,
        });
        let b = a.encode().unwrap();
        assert_eq!(b.len(), 65536);
        assert_eq!(be32(&b, 0x70), EXT_FEATURE_TABLE);
        assert_eq!(be32(&b, 0x74), 384);
        assert_eq!(be32(&b, 0x1F8), EXT_BITMAPS);
        assert_eq!(be32(&b, 0x1FC), 24);
        assert_eq!(&b[0x218..0x220], &[0; 8]);
        assert!(b[0x220..].iter().all(|&x| x == 0));
        let mut back = HeaderArea::decode(&b).unwrap();
        assert_eq!(back.feature_table, Some(qemu_feature_table()));
        back.feature_table = None;
        assert_eq!(back, a);
    }

    #[test]
    fn backing_file_name_follows_end_marker() {
        let mut a = HeaderArea::new(header(16));
        a.backing_format = Some(b"qcow2".to_vec());
        a.backing_file = Some(b"base.qcow2".to_vec());
        a.bitmaps = Some(BitmapsExtension {
            nb_bitmaps: 1,
            directory_size: 32,
            directory_offset: 0x50000,
        });
        let b = a.encode().unwrap();
        assert_eq!(be32(&b, 0x70), EXT_BACKING_FORMAT);
        assert_eq!(be32(&b, 0x80), EXT_FEATURE_TABLE);
        let d = HeaderArea::decode(&b).unwrap();
        assert_eq!(d.header.backing_file_offset, 0x230);
        assert_eq!(d.header.backing_file_size, 10);
        assert_eq!(&b[0x230..0x23a], b"base.qcow2");
        assert_eq!(d.backing_file, a.backing_file);
        assert_eq!(d.backing_format, a.backing_format);
    }

    #[test]
    fn small_clusters_have_no_feature_table() {
        let a = HeaderArea::new(header(12));
        let b = a.encode().unwrap();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[112..120], &[0; 8]);
        assert_eq!(HeaderArea::decode(&b).unwrap().feature_table, None);
    }

    #[test]
    fn empty_bitmaps_extension_and_stale_bitmaps_are_not_written() {
        let mut a = HeaderArea::new(header(16));
        a.bitmaps = Some(BitmapsExtension {
            nb_bitmaps: 0,
            directory_size: 0,
            directory_offset: 0,
        });
        a.stale_bitmaps = true;
        let b = a.encode().unwrap();
        assert_eq!(be32(&b, 0x1F8), EXT_END);
    }

    #[test]
    fn unknown_extensions_and_header_fields_survive() {
        let mut h = header(16);
        h.unknown_fields = vec![0xAB; 8];
        h.header_length = 120;
        let mut a = HeaderArea::new(h);
        a.unknown = vec![
            UnknownExtension {
                kind: 0x1111_1111,
                data: vec![1, 2, 3],
            },
            UnknownExtension {
                kind: 0x2222_2222,
                data: vec![4; 9],
            },
        ];
        let b = a.encode().unwrap();
        let mut d = HeaderArea::decode(&b).unwrap();
        d.feature_table = None;
        assert_eq!(d, a);
        assert_eq!(d.encode().unwrap(), b);
    }

    #[test]
    fn data_file_written_only_with_its_feature_bit() {
        let mut a = HeaderArea::new(header(16));
        a.data_file = Some(b"data.raw".to_vec());
        assert_eq!(be32(&a.encode().unwrap(), 0x70), EXT_FEATURE_TABLE);
        a.header.incompatible_features = crate::format::header::INCOMPAT_DATA_FILE;
        assert_eq!(be32(&a.encode().unwrap(), 0x70), EXT_DATA_FILE);
    }

    #[test]
    fn encode_rejects_caller_mistakes() {
        let mut a = HeaderArea::new(header(16));
        a.backing_file = Some(vec![b'a'; 1024]);
        assert!(matches!(a.encode(), Err(InvalidValue(_))));
        let mut a = HeaderArea::new(header(16));
        a.backing_format = Some(vec![b'a'; 16]);
        assert!(matches!(a.encode(), Err(InvalidValue(_))));
        let mut a = HeaderArea::new(header(9));
        a.unknown.push(UnknownExtension {
            kind: 0x1111_1111,
            data: vec![0; 400],
        });
        assert!(matches!(a.encode(), Err(InvalidValue(_))));
        let mut a = HeaderArea::new(header(16));
        a.unknown.push(UnknownExtension {
            kind: EXT_BITMAPS,
            data: vec![],
        });
        assert!(matches!(a.encode(), Err(InvalidValue(_))));
    }

    #[test]
    fn rejects_backing_name_past_input() {
        let mut a = HeaderArea::new(header(16));
        a.backing_file = Some(b"base".to_vec());
        let b = a.encode().unwrap();
        assert!(matches!(
            HeaderArea::decode(&b[..0x202]),
            Err(Corruption::Truncated {
                what: "backing file name",
                ..
            })
        ));
    }
    #[test]
    fn mode_extension_follows_the_bitmaps_and_unknown_extensions() {
        let mut a = HeaderArea::new(header(16));
        a.bitmaps = Some(BitmapsExtension {
            nb_bitmaps: 1,
            directory_size: 32,
            directory_offset: 0x50000,
        });
        let without = a.encode().unwrap();
        assert!(a.set_mode(Some(ModeExtension::DURABLE)));
        assert!(!a.set_mode(Some(ModeExtension::DURABLE)));
        let b = a.encode().unwrap();
        // QEMU's layout up to the bitmaps extension, then the mode extension where the end
        // marker was: only the bytes from 0x218 on change.
        assert_eq!(&b[..0x218], &without[..0x218]);
        assert_eq!(&b[0x218..0x230], b"DBMD\0\0\0\x08\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\0");
        assert!(b[0x230..].iter().all(|&x| x == 0));
        let mut back = HeaderArea::decode(&b).unwrap();
        back.feature_table = None;
        assert_eq!(back, a);
        // After an unknown extension too; and removal restores the bytes without it.
        a.unknown.push(UnknownExtension {
            kind: 0x1111_1111,
            data: vec![7; 3],
        });
        let b = a.encode().unwrap();
        assert_eq!(be32(&b, 0x218), 0x1111_1111);
        assert_eq!(be32(&b, 0x228), EXT_MODE);
        assert_eq!(be32(&b, 0x238), EXT_END);
        a.unknown.clear();
        assert!(a.set_mode(None));
        assert_eq!(a.encode().unwrap(), without);
    }

    #[test]
    fn set_mode_drops_a_malformed_mode_extension() {
        let mut a = HeaderArea::new(header(16));
        a.unknown.push(UnknownExtension {
            kind: EXT_MODE,
            data: vec![1; 5],
        });
        let b = a.encode().unwrap();
        let d = HeaderArea::decode(&b).unwrap();
        assert_eq!(d.mode, None);
        assert_eq!(d.unknown, a.unknown, "kept byte for byte");
        assert!(a.set_mode(None), "removing the malformed one changes the encoding");
        assert!(a.unknown.is_empty());
        a.unknown.push(UnknownExtension {
            kind: EXT_MODE,
            data: vec![1; 5],
        });
        assert!(a.set_mode(Some(ModeExtension::DURABLE)));
        let d = HeaderArea::decode(&a.encode().unwrap()).unwrap();
        assert_eq!(d.mode, Some(ModeExtension::DURABLE));
        assert!(d.unknown.is_empty());
    }
}
