//! Entry points for the fuzz targets in `fuzz/` and the corpus replay in `tests/`.
//!
//! Each function takes arbitrary bytes, feeds them to one layer of the crate and asserts
//! that layer's invariants. A panic inside one of them is a bug: either the code under test
//! panicked, or it broke an invariant that the `assert!`s below spell out. A returned
//! error is never a bug; these functions swallow errors after checking their type.
//!
//! The same functions run under libFuzzer (`cargo +nightly fuzz run <target>`) and in
//! `tests/fuzz_corpus.rs`, which replays the committed corpus on every `cargo test`.
//! See `docs/FUZZING.md`.

use crate::error::{Corruption, Error};
use crate::format::header::{HEADER_V2_LEN, HEADER_V3_LEN};
use crate::format::refcount::{get_refcount, max_refcount, set_refcount};
use crate::format::InvalidValue;
use crate::format::TableEntry;
use crate::format::{
    decode_directory, decode_table, encode_directory, encode_table, qemu_feature_table,
    triage_directory, Header, HeaderArea, ImageGeometry, TableEntryProblem,
};
use crate::migration::bitmap_codec::{self, BitmapSection, Section};
use crate::migration::dest::{Destination, DestinationConfig};
use crate::migration::disk_log_codec::{self, LogSection};
use crate::migration::frame::{
    encode_frame, encode_raw_frame, encode_stream_header, Frame, FrameError, FrameKind, Hello,
    MAX_REASON_LEN, STREAM_HEADER_LEN, STREAM_VERSION,
};
use crate::migration::ram_codec::{self, PageEntry};
use crate::migration::stream::FrameReader;
use crate::migration::MigrationError;
use crate::migration::{SharedDestState, SharedDiskDest, StreamDiskDest};
use crate::storage::MemStorage;
use crate::storage::OpenMode;
use crate::store::Recording;
use crate::store::{BitmapState, BitmapStore};
use crate::{DirtyBitmap, Image};
use std::sync::{Arc, Mutex};

/// The largest cluster 0 a target looks at (2 MiB clusters).
const MAX_CLUSTER0: usize = 1 << 21;

/// Fuzz target `header`: [`Header::decode`] and [`HeaderArea::decode`] on `data` as
/// cluster 0 (cut to the cluster size, as [`Image::open`] cuts it).
///
/// Invariants:
/// - a decoded header encodes, and the encoding decodes to the same header with
///   `header_length` normalised to what the encoder writes;
/// - a decoded header area encodes exactly when its normalised layout (see
///   `encoded_area_len`) fits in the cluster: it can legitimately outgrow the cluster,
///   since encoding adds QEMU's feature table and puts the backing file name after the
///   extensions, and no other refusal is allowed; an encoding decodes to the area with the
///   documented normalisations (see [`normalize_area`]) and re-encodes byte for byte to
///   itself.
pub fn header(data: &[u8]) {
    let Ok(h) = Header::decode(data) else {
        return;
    };
    let encoded = h.encode().expect("a decoded header must encode");
    let again = Header::decode(&encoded).expect("an encoded header must decode");
    assert_eq!(again, normalize_header(&h), "header round trip");
    assert_eq!(
        again.encode().expect("re-encode"),
        encoded,
        "header encoding is a fixed point"
    );

    let cs = usize::try_from(h.cluster_size()).unwrap_or(MAX_CLUSTER0);
    let cluster0 = data.get(..cs.min(data.len())).unwrap_or(data);
    let Ok(area) = HeaderArea::decode(cluster0) else {
        return;
    };
    assert_eq!(area.header, h, "HeaderArea::decode decodes the same header");
    let need = encoded_area_len(&area);
    let bytes = match area.encode() {
        Ok(b) => b,
        // The one documented refusal of a decoded area: it outgrew the cluster.
        Err(InvalidValue(e)) => {
            assert!(
                need > cs as u64,
                "a decoded header area of {need} bytes fits the {cs}-byte cluster, yet does \
                 not encode: {e}"
            );
            return;
        }
    };
    assert!(
        need <= cs as u64,
        "a header area of {need} bytes encoded into a {cs}-byte cluster"
    );
    assert_eq!(bytes.len(), cs, "an encoded header area fills cluster 0");
    let area2 = HeaderArea::decode(&bytes).expect("an encoded header area must decode");
    assert_eq!(area2, normalize_area(&area), "header area round trip");
    let bytes2 = area2
        .encode()
        .expect("a re-decoded header area must encode");
    assert_eq!(bytes2, bytes, "header area encoding is a fixed point");
}

/// What [`Header::encode`] does to a decoded header: it recomputes `header_length`.
fn normalize_header(h: &Header) -> Header {
    let mut n = h.clone();
    n.header_length = if n.version >= 3 {
        u32::try_from(HEADER_V3_LEN + n.unknown_fields.len()).unwrap_or(u32::MAX)
    } else {
        u32::try_from(HEADER_V2_LEN).unwrap_or(u32::MAX)
    };
    n
}

/// What [`HeaderArea::encode`] does to a decoded area, as its documentation states:
/// header_length and the backing file fields are recomputed, the image's own feature
/// table is replaced by QEMU's (v3 with clusters above 4 KiB) or dropped, the data file
/// name survives only with incompatible bit 2, a crypto pointer only with a non-zero
/// offset, the bitmaps extension only with nb_bitmaps > 0, a stale bitmaps extension
/// is dropped, and the mode extension follows the unknown ones.
pub fn normalize_area(area: &HeaderArea) -> HeaderArea {
    let mut n = area.clone();
    n.header = normalize_header(&area.header);
    n.feature_table =
        (n.header.version >= 3 && n.header.cluster_size() > 4096).then(qemu_feature_table);
    if !n.header.has_data_file() {
        n.data_file = None;
    }
    n.crypto = n.crypto.filter(|c| c.offset != 0);
    n.bitmaps = n.bitmaps.filter(|b| b.nb_bitmaps > 0);
    n.stale_bitmaps = false;
    // The name follows the extensions: header, frames, end marker.
    let at = extensions_end(&n);
    match &n.backing_file {
        Some(name) => {
            n.header.backing_file_offset = at;
            n.header.backing_file_size = u32::try_from(name.len()).unwrap_or(u32::MAX);
        }
        None => {
            n.header.backing_file_offset = 0;
            n.header.backing_file_size = 0;
        }
    }
    n
}

/// Where the end marker of a normalised area `n` ends: its header, every extension frame
/// [`HeaderArea::encode`] writes (data padded to 8 bytes), and the end marker.
fn extensions_end(n: &HeaderArea) -> u64 {
    let frame = |len: usize| 8 + (len as u64).div_ceil(8) * 8;
    let mut at = u64::from(n.header.header_length);
    if let Some(f) = &n.backing_format {
        at += frame(f.len());
    }
    if let Some(d) = &n.data_file {
        at += frame(d.len());
    }
    if n.crypto.is_some() {
        at += frame(16);
    }
    if n.feature_table.is_some() {
        at += frame(8 * 48);
    }
    if n.bitmaps.is_some() {
        at += frame(24);
    }
    for u in &n.unknown {
        at += frame(u.data.len());
    }
    if n.mode.is_some() {
        at += frame(8);
    }
    at + frame(0)
}

/// The bytes [`HeaderArea::encode`] lays out for `area` before padding to the cluster:
/// the normalised area's extensions and end marker, then the backing file name.
fn encoded_area_len(area: &HeaderArea) -> u64 {
    let n = normalize_area(area);
    extensions_end(&n) + n.backing_file.as_ref().map_or(0, |b| b.len() as u64)
}

/// Splits off a fixed-size prefix, zero-padded when `data` is shorter.
fn prefix<const N: usize>(data: &[u8]) -> ([u8; N], &[u8]) {
    let mut p = [0u8; N];
    let n = N.min(data.len());
    p[..n].copy_from_slice(&data[..n]);
    (p, &data[n..])
}

/// Fuzz target `directory`: [`decode_directory`] on `data[11..]`.
///
/// The prefix picks the parameters: `data[0..2]` is nb_bitmaps (big-endian u16),
/// `data[2] % 13 + 9` the cluster bits, `data[3..11]` the disk size (big-endian u64).
///
/// Invariants: [`triage_directory`](crate::format::triage_directory) finds no problem
/// exactly when the directory decodes with every table size right; a decoded directory has
/// `nb_bitmaps` entries with distinct names; it encodes
/// exactly when every consistent entry has the table size the disk needs; the encoding has
/// the input's length and decodes to the same entries.
pub fn directory(data: &[u8]) {
    let (p, rest) = prefix::<11>(data);
    let nb_bitmaps = u32::from(u16::from_be_bytes([p[0], p[1]]));
    let cluster_bits = 9 + u32::from(p[2] % 13);
    let mut disk = [0u8; 8];
    disk.copy_from_slice(&p[3..11]);
    let geo = ImageGeometry::new(cluster_bits, u64::from_be_bytes(disk))
        .expect("cluster bits are in range by construction");
    // The repair's reading agrees with the strict one: no problem at all exactly when the
    // directory decodes with every table size right.
    let triage = triage_directory(rest, nb_bitmaps, &geo);
    let sound = triage.framing.is_none() && triage.entries.iter().all(|e| e.verdict.is_ok());
    let strict = decode_directory(rest, nb_bitmaps, &geo)
        .map(|es| es.iter().all(|e| e.check_table_size(&geo).is_ok()))
        .unwrap_or(false);
    assert_eq!(sound, strict, "triage against decode_directory");
    let Ok(entries) = decode_directory(rest, nb_bitmaps, &geo) else {
        return;
    };
    assert_eq!(entries.len() as u64, u64::from(nb_bitmaps), "entry count");
    let mut names: Vec<&[u8]> = entries.iter().map(|e| e.name.as_bytes()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), entries.len(), "names are unique");
    let sizes_ok = entries.iter().all(|e| e.check_table_size(&geo).is_ok());
    match encode_directory(&entries, &geo) {
        Ok(bytes) => {
            assert!(sizes_ok, "encode_directory accepted a wrong table size");
            assert_eq!(bytes.len(), rest.len(), "directory length round trip");
            let again = decode_directory(&bytes, nb_bitmaps, &geo)
                .expect("an encoded directory must decode");
            assert_eq!(again, entries, "directory round trip");
        }
        Err(InvalidValue(_)) => {
            assert!(!sizes_ok, "encode_directory refused a decoded directory");
        }
    }
}

/// Fuzz target `bitmap_table`: [`decode_table`] on `data[5..]`.
///
/// `data[0] % 13 + 9` is the cluster bits and `data[1..5]` the table size (big-endian
/// u32).
///
/// Invariants: a too-short input is [`Corruption::Truncated`] (checked before anything is
/// allocated); a decoded table has `table_size` entries and encodes to exactly the first
/// `table_size × 8` input bytes.
pub fn bitmap_table(data: &[u8]) {
    let (p, rest) = prefix::<5>(data);
    let cluster_bits = 9 + u32::from(p[0] % 13);
    let table_size = u32::from_be_bytes([p[1], p[2], p[3], p[4]]);
    let needed = u64::from(table_size) * 8;
    let raw = |i: u64| {
        let at = usize::try_from(i * 8).ok()?;
        let b: [u8; 8] = rest.get(at..at.checked_add(8)?)?.try_into().ok()?;
        Some(u64::from_be_bytes(b))
    };
    let cluster_size = 1u64 << cluster_bits;
    match decode_table(rest, table_size, cluster_bits) {
        Ok(entries) => {
            assert_eq!(entries.len() as u64, u64::from(table_size), "entry count");
            for i in 0..u64::from(table_size) {
                let r = raw(i).expect("a decoded table is long enough");
                let problem = qemu_table_entry_problem(r, cluster_size);
                assert_eq!(problem, None, "entry {i} ({r:#x}) taken, QEMU refuses it");
            }
            let bytes = encode_table(&entries, cluster_bits).expect("a decoded table must encode");
            assert_eq!(
                bytes.as_slice(),
                &rest[..needed as usize],
                "table round trip is byte-exact"
            );
        }
        Err(Corruption::Truncated { .. }) => {
            assert!(
                (rest.len() as u64) < needed,
                "Truncated on a long enough input"
            );
        }
        Err(Corruption::TableEntry {
            index,
            raw: r,
            reason,
        }) => {
            assert!(index < u64::from(table_size), "bad entry index in range");
            assert_eq!(raw(index), Some(r), "the refused entry's raw value");
            assert_eq!(
                qemu_table_entry_problem(r, cluster_size),
                Some(reason),
                "entry {index} ({r:#x}) refused for {reason}"
            );
            for i in 0..index {
                let r = raw(i).expect("an earlier entry is in the input");
                let problem = qemu_table_entry_problem(r, cluster_size);
                assert_eq!(problem, None, "entry {i} ({r:#x}) passed over");
            }
        }
        Err(e) => panic!("decode_table failed with an unexpected error: {e}"),
    }
}

/// QEMU's `check_table_entry` (`block/qcow2-bitmap.c`), written out apart from
/// `format::table`, with its masks as QEMU spells them: the oracle for [`bitmap_table`].
fn qemu_table_entry_problem(raw: u64, cluster_size: u64) -> Option<TableEntryProblem> {
    const RESERVED: u64 = 0xff00_0000_0000_01fe;
    const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
    if raw & RESERVED != 0 {
        return Some(TableEntryProblem::ReservedBits);
    }
    let offset = raw & OFFSET;
    if offset != 0 {
        if raw & 1 != 0 {
            return Some(TableEntryProblem::OnesWithOffset);
        }
        if !offset.is_multiple_of(cluster_size) {
            return Some(TableEntryProblem::Unaligned);
        }
    }
    None
}

/// An independent reading of refcount `index` (the oracle for [`refcount_block`]).
fn reference_refcount(block: &[u8], order: u32, index: u64) -> Option<u64> {
    let bits = 1u64 << order;
    let bit = index.checked_mul(bits)?;
    let byte = usize::try_from(bit / 8).ok()?;
    if bits < 8 {
        let b = *block.get(byte)?;
        Some(u64::from(b >> (bit % 8)) & ((1 << bits) - 1))
    } else {
        let field = block.get(byte..byte.checked_add(usize::try_from(bits / 8).ok()?)?)?;
        Some(field.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }
}

/// Fuzz target `refcount_block`: [`get_refcount`] and [`set_refcount`] on `data[1..]` as
/// a refcount block of order `data[0] % 7`.
///
/// Invariants, for every refcount of the block: get agrees with an independent reading;
/// set-then-get returns the value written; a set changes no other refcount (checked on the
/// neighbours and, after restoring every refcount, on the whole block); out-of-range
/// indices and values are [`Error::InvalidInput`].
pub fn refcount_block(data: &[u8]) {
    let Some((&first, block)) = data.split_first() else {
        return;
    };
    let order = u32::from(first % 7);
    let max = max_refcount(order).expect("order is at most 6");
    let count = (block.len() as u64 * 8) >> order;
    let original = block.to_vec();
    let mut b = block.to_vec();
    let get = |b: &[u8], i: u64| get_refcount(b, order, i).expect("index in range");
    for i in 0..count {
        let old = get(&b, i);
        assert_eq!(Some(old), reference_refcount(&b, order, i), "get at {i}");
        assert!(old <= max);
        let before = (i > 0).then(|| get(&b, i - 1));
        let after = (i + 1 < count).then(|| get(&b, i + 1));
        // A value unlike the old one, derived from the data so both halves get exercised:
        // `!old + i` can wrap back to `old` (at order 0, for every odd `i`), so such a value
        // is flipped instead.
        let derived = (!old).wrapping_add(i) & max;
        let new = if derived == old { !old & max } else { derived };
        assert_ne!(new, old, "the set at {i} must change the value");
        set_refcount(&mut b, order, i, new).expect("in-range set");
        assert_eq!(get(&b, i), new, "set-then-get at {i}");
        assert_eq!(
            before,
            (i > 0).then(|| get(&b, i - 1)),
            "left neighbour of {i}"
        );
        assert_eq!(
            after,
            (i + 1 < count).then(|| get(&b, i + 1)),
            "right neighbour of {i}"
        );
        if order < 6 {
            assert!(matches!(
                set_refcount(&mut b, order, i, max + 1),
                Err(InvalidValue(_))
            ));
        }
        set_refcount(&mut b, order, i, old).expect("restore");
    }
    assert_eq!(b, original, "set of the old values restores the block");
    for i in [count, count.saturating_add(1), u64::MAX] {
        assert!(matches!(get_refcount(&b, order, i), Err(InvalidValue(_))));
        assert!(matches!(
            set_refcount(&mut b, order, i, 0),
            Err(InvalidValue(_))
        ));
    }
    assert_eq!(b, original, "a refused set writes nothing");
}

/// Fuzz target `open_image`: `data` as a whole image in [`MemStorage`], opened read-only
/// with [`BitmapStore::open`] (or [`Image::open`] when the store refuses it), then
/// [`BitmapStore::list`], [`BitmapStore::load`] of every bitmap and [`Image::check`].
///
/// Invariants: nothing panics; no error is [`Error::Io`] (every read is bounds-checked
/// against the file length first, so a corrupt length or offset is [`Error::Corrupt`]);
/// listed names are unique; inconsistent bitmaps refuse to load with
/// [`Error::Inconsistent`]; a loaded bitmap covers the disk at its granularity, and its
/// memory is bounded by its table (`table_size` entries, each naming at most one cluster
/// of data), which must lie in the file; the image bytes are never written.
pub fn open_image(data: &[u8]) {
    let not_io = |what: &str, e: &Error| {
        assert!(!matches!(e, Error::Io(_)), "{what} gave an I/O error: {e}");
    };
    let storage = MemStorage::from_bytes(data.to_vec());
    let store = match BitmapStore::open(storage, OpenMode::ReadOnly) {
        Ok(s) => s,
        Err(e) => {
            not_io("BitmapStore::open", &e);
            // The store refused it; the image layer may still open, and check it.
            if let Ok(image) =
                Image::open(MemStorage::from_bytes(data.to_vec()), OpenMode::ReadOnly)
            {
                if let Err(e) = image.check() {
                    not_io("Image::check", &e);
                }
                assert_eq!(image.storage().to_vec(), data, "read-only open wrote");
            }
            return;
        }
    };
    let file_len = data.len() as u64;
    let cs = store.image().cluster_size();
    let list = store.list();
    let mut names: Vec<&[u8]> = list.iter().map(|b| b.name.as_bytes()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), list.len(), "listed names are unique");
    match store.image().area().bitmaps {
        // A trusted directory lists exactly nb_bitmaps bitmaps.
        Some(ext) => assert_eq!(list.len() as u64, u64::from(ext.nb_bitmaps), "bitmap count"),
        // Without one, whatever a stale extension names is inconsistent.
        None => assert!(
            list.iter().all(|b| b.state == BitmapState::Inconsistent),
            "a bitmap without a trusted directory is consistent"
        ),
    }
    // The flags and granularity of each entry, read from the bytes apart from the decoder.
    let raw = store.image().area().bitmaps.map(|ext| {
        raw_directory(
            data,
            ext.directory_offset,
            ext.directory_size,
            ext.nb_bitmaps,
        )
    });
    for info in &list {
        if let Some(raw) = &raw {
            let (_, flags, gbits) = raw
                .iter()
                .find(|(n, _, _)| n.as_slice() == info.name.as_bytes())
                .unwrap_or_else(|| panic!("{:?} listed, not in the directory's bytes", info.name));
            if info.state == BitmapState::Consistent {
                assert_eq!(
                    flags & 1,
                    0,
                    "{:?} in_use on disk, listed consistent",
                    info.name
                );
            }
            assert_eq!(
                info.granularity,
                1u64 << gbits.min(&63),
                "{:?} granularity",
                info.name
            );
        }
        match store.load(&info.name) {
            Ok(bm) => {
                assert_eq!(
                    info.state,
                    BitmapState::Consistent,
                    "loaded an inconsistent bitmap"
                );
                assert_eq!(bm.disk_size(), store.disk_size(), "bitmap covers the disk");
                assert_eq!(bm.granularity(), info.granularity, "granularity");
                // The table (8 bytes per entry) was read from the file, and each entry
                // stands for at most one cluster of serialized bitmap.
                let table = u64::from(info.table_size);
                assert!(table * 8 <= file_len, "table larger than the file");
                assert!(
                    bm.serialized_len() <= table * cs,
                    "bitmap larger than its table"
                );
                assert!(bm.count() <= bm.bit_count(), "bits set past the disk");
                compare_with_disk(data, &store, &info.name, &bm);
            }
            Err(Error::Inconsistent { .. }) => {
                assert_eq!(
                    info.state,
                    BitmapState::Inconsistent,
                    "refused a consistent bitmap"
                );
            }
            Err(e) => {
                not_io("BitmapStore::load", &e);
                assert_eq!(info.state, BitmapState::Consistent);
            }
        }
    }
    if let Err(e) = store.image().check() {
        not_io("Image::check", &e);
    }
    assert_eq!(
        store.image().storage().to_vec(),
        data,
        "read-only open wrote"
    );
}

/// `(name, flags, granularity_bits)` of each entry of the directory at `offset` (`size`
/// bytes, `n` entries), read from `data` by the layout of docs/FORMAT.md alone (table
/// offset 8, table size 4, flags 4, type 1, granularity bits 1, name size 2, extra data
/// size 4, the extra data, the name, padding to 8): the oracle's own reading, apart from
/// `format::directory`. Stops at the first entry that does not fit.
fn raw_directory(data: &[u8], offset: u64, size: u64, n: u32) -> Vec<(Vec<u8>, u32, u8)> {
    let mut out = Vec::new();
    let (Ok(start), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
        return out;
    };
    let Some(dir) = start.checked_add(size).and_then(|end| data.get(start..end)) else {
        return out;
    };
    let mut at = 0usize;
    for _ in 0..n {
        let Some(fixed) = dir.get(at..at + 24) else {
            break;
        };
        let flags = u32::from_be_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
        let gbits = fixed[17];
        let name_len = usize::from(u16::from_be_bytes([fixed[18], fixed[19]]));
        let extra = u32::from_be_bytes([fixed[20], fixed[21], fixed[22], fixed[23]]) as usize;
        let name_at = at + 24 + extra;
        let Some(name) = dir.get(name_at..name_at + name_len) else {
            break;
        };
        out.push((name.to_vec(), flags, gbits));
        at = (name_at + name_len).div_ceil(8) * 8;
    }
    out
}

/// The oracle for a loaded bitmap: re-reads its directory entry and table straight from
/// `data` and checks that every serialized region equals what the table names (zeros,
/// ones, or the data cluster), with the bits past the end of the disk cleared.
fn compare_with_disk(
    data: &[u8],
    store: &BitmapStore<MemStorage>,
    name: &crate::format::BitmapName,
    bm: &DirtyBitmap,
) {
    let area = store.image().area();
    let ext = area
        .bitmaps
        .expect("a loaded bitmap comes from a trusted directory");
    let geo = area.header.geometry().expect("geometry of an open image");
    let at = |off: u64, len: u64| {
        let start = usize::try_from(off).expect("offset in the file");
        let end = start + usize::try_from(len).expect("length in the file");
        &data[start..end]
    };
    let entries = decode_directory(
        at(ext.directory_offset, ext.directory_size),
        ext.nb_bitmaps,
        &geo,
    )
    .expect("the directory decoded on open");
    let entry = entries
        .iter()
        .find(|e| &e.name == name)
        .expect("a listed bitmap is in the directory");
    let table = decode_table(
        at(entry.table_offset, u64::from(entry.table_size) * 8),
        entry.table_size,
        geo.cluster_bits(),
    )
    .expect("load accepted the table");
    let cs = geo.cluster_size();
    let nbits = bm.bit_count();
    for (r, t) in (0u64..).zip(table) {
        let len = bm.region_len(r);
        let mut got = vec![0u8; len as usize];
        bm.serialize_region(r, &mut got)
            .expect("serialize a loaded region");
        let mut want = match t {
            TableEntry::Zeroes => vec![0u8; len as usize],
            TableEntry::Ones => vec![0xFFu8; len as usize],
            TableEntry::Data(off) => at(off, len).to_vec(),
        };
        let first_bit = r * cs * 8;
        let tail = (first_bit + len * 8 > nbits).then_some(want.iter_mut());
        for (j, byte) in (0u64..).zip(tail.into_iter().flatten()) {
            for k in 0..8 {
                if first_bit + j * 8 + k >= nbits {
                    *byte &= !(1u8 << k);
                }
            }
        }
        assert_eq!(
            got, want,
            "bitmap {name:?} region {r} differs from the disk"
        );
    }
}

/// Fuzz target `migration_stream`: the migration stream's decoders and the destination.
/// `data[0] % 4` picks the mode, the rest is its input:
///
/// - 0, the reader: `data[1..]` as a whole stream, read to its first error. Invariants:
///   every frame read re-encodes (with its sequence number) to exactly the bytes it was read
///   from; sequence numbers count up from 0; the only errors are [`MigrationError::Frame`]
///   (a slice never fails to read), and after one the reader stays failed; RAM sections
///   (after a Hello with a valid page size) go through the RAM checks below.
/// - 1, the RAM codec: `data[2..]` as a RAM section of page size `512 << (data[1] % 8)`,
///   and as a page request. Invariants: `decode_pages` succeeds exactly when
///   `decode_entries` does and finds no discard; data slices are one page long; entries
///   re-encode and decode to themselves.
/// - 2, the payload decoders: `data[2..]` as the payload of frame kind `data[1] % 11`
///   (0 is not a kind). Invariant: a decoded payload re-encodes to the input (reasons
///   longer than [`MAX_REASON_LEN`] to their cut prefix); a Section's state payload that
///   decodes as a disk bitmap section ([`bitmap_codec::decode`]), and a Report's as a
///   disk bitmap report, re-encode to it too.
/// - 3, the destination: `data[1..]` as records `kind (u8), len (u16 BE), payload`, framed
///   with valid checksums and consecutive sequence numbers, so the fuzzer reaches past the
///   CRCs into the protocol; bit 7 of `data[0]` makes the destination refuse to start.
///   Invariants: the destination never panics or fails with [`MigrationError::Io`]; a
///   success sent exactly one Started, and its RAM equals the model (precopy: the last copy
///   of each page sent; postcopy: some copy of it); a failure sent Abort (or Refused when
///   refusing) unless the source aborted. Bit 6 of `data[0]` gives the destination two disk
///   states (`FuzzDisks`): a [`SharedDiskDest`] named "d", preloading, on an
///   image a source left with bitmap "b" holding [`SHARED_BITS`], and a
///   [`StreamDiskDest`] named "s" on an empty image of its own. Their invariants: the
///   shared image's bitmap "b" holds exactly [`SHARED_BITS`] whatever the sections said
///   (in the store "d" took over on a success, on the image after a failure, where it is
///   consistent again); each image checks without corruption afterwards.
pub fn migration_stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => fuzz_reader(rest),
        1 => {
            let Some((&p, payload)) = rest.split_first() else {
                return;
            };
            fuzz_ram_payload(512 << (p % 8), payload);
            if let Ok((first, count)) = ram_codec::decode_page_request(payload) {
                assert_eq!(payload.len(), ram_codec::PAGE_REQUEST_LEN);
                assert_eq!(ram_codec::encode_page_request(first, count), payload);
            }
        }
        2 => {
            let Some((&k, payload)) = rest.split_first() else {
                return;
            };
            let Some(kind) = FrameKind::from_u8(k % 11) else {
                return;
            };
            let Ok(frame) = Frame::decode_payload(kind, payload) else {
                return;
            };
            assert_eq!(frame.kind(), kind);
            let enc = frame.encode_payload().expect("a decoded payload encodes");
            match &frame {
                Frame::Refused { reason } | Frame::Abort { reason }
                    if reason.len() > MAX_REASON_LEN =>
                {
                    assert!(payload.starts_with(&enc), "a cut reason is a prefix");
                }
                _ => assert_eq!(enc, payload, "payload round trip"),
            }
            match &frame {
                Frame::Section { payload, .. } => {
                    bitmap_round_trip(payload);
                    disk_log_round_trip(payload);
                }
                Frame::Report { payload, .. } => {
                    if let Ok(n) = bitmap_codec::decode_report(payload) {
                        assert_eq!(
                            &bitmap_codec::encode_report(n),
                            payload,
                            "report round trip"
                        );
                    }
                    if let Ok(r) = disk_log_codec::decode_report(payload) {
                        assert_eq!(
                            &disk_log_codec::encode_report(r),
                            payload,
                            "preload report round trip"
                        );
                    }
                }
                _ => {}
            }
        }
        _ => fuzz_destination(mode & 0x80 != 0, mode & 0x40 != 0, rest),
    }
}

/// The RAM codec checks of [`migration_stream`].
fn fuzz_ram_payload(page_size: usize, payload: &[u8]) {
    let entries = ram_codec::decode_entries(page_size, payload);
    let pages = ram_codec::decode_pages(page_size, payload);
    for r in [entries.as_ref().map(|_| ()), pages.as_ref().map(|_| ())] {
        if let Err(e) = r {
            assert!(
                matches!(e, MigrationError::Frame(FrameError::BadPayload { .. })),
                "RAM decode error of the wrong type: {e}"
            );
        }
    }
    let Ok(entries) = entries else {
        assert!(
            pages.is_err(),
            "decode_pages accepted what decode_entries refused"
        );
        return;
    };
    let has_discard = entries.iter().any(|e| matches!(e, PageEntry::Discard(_)));
    assert_eq!(
        pages.is_ok(),
        !has_discard,
        "decode_pages vs decode_entries"
    );
    let data: Vec<(u64, &[u8])> = entries
        .iter()
        .filter_map(|e| match *e {
            PageEntry::Data(p, d) => Some((p, d)),
            PageEntry::Discard(_) => None,
        })
        .collect();
    for (p, d) in &data {
        assert_eq!(d.len(), page_size, "page {p} has a wrong length");
    }
    let enc = ram_codec::encode_pages(page_size, &data);
    assert_eq!(
        ram_codec::decode_pages(page_size, &enc).expect("encoded pages decode"),
        data,
        "pages round trip"
    );
    let discards: Vec<u64> = entries
        .iter()
        .filter_map(|e| match *e {
            PageEntry::Discard(p) => Some(p),
            PageEntry::Data(..) => None,
        })
        .collect();
    let enc = ram_codec::encode_discards(page_size, &discards);
    let again = ram_codec::decode_entries(page_size, &enc).expect("encoded discards decode");
    assert_eq!(
        again,
        discards
            .iter()
            .map(|&p| PageEntry::Discard(p))
            .collect::<Vec<_>>(),
        "discards round trip"
    );
}

/// The reader checks of [`migration_stream`].
fn fuzz_reader(data: &[u8]) {
    let mut r = FrameReader::with_max_frame_len(data, 1 << 16);
    let mut page_size = None;
    let mut ram_id = None;
    let mut seq = 0u64;
    let err = loop {
        let before = r.bytes_read().get() as usize;
        let frame = match r.read_frame() {
            Ok(f) => f,
            Err(e) => break e,
        };
        let after = r.bytes_read().get() as usize;
        let header = if seq == 0 { STREAM_HEADER_LEN } else { 0 };
        let read = &data[before + header..after];
        let enc = encode_frame(seq, &frame).expect("a decoded frame encodes");
        match &frame {
            Frame::Refused { reason } | Frame::Abort { reason }
                if reason.len() > MAX_REASON_LEN =>
            {
                assert!(enc.len() < read.len(), "a cut reason is shorter");
            }
            _ => assert_eq!(enc, read, "frame {seq} does not re-encode to its bytes"),
        }
        seq += 1;
        assert_eq!(r.frames_read(), seq, "sequence numbers count up");
        match frame {
            Frame::Hello(h) => {
                let ps = h.page_size as usize;
                page_size = ram_codec::check_page_size(ps).is_ok().then_some(ps);
                ram_id = h
                    .states
                    .iter()
                    .find(|s| s.name == ram_codec::RAM_STATE_NAME)
                    .map(|s| s.id);
            }
            Frame::Section { state, payload } if Some(state) == ram_id => {
                if let Some(ps) = page_size {
                    fuzz_ram_payload(ps, &payload);
                }
            }
            _ => {}
        }
    };
    assert!(
        matches!(err, MigrationError::Frame(_)),
        "reader error of the wrong type: {err}"
    );
    assert!(
        matches!(
            r.read_frame(),
            Err(MigrationError::Frame(FrameError::Failed(_)))
        ),
        "the reader did not stay failed"
    );
}

/// A disk bitmap section that decodes re-encodes to the same bytes.
/// A shared-storage disk state's section ([`disk_log_codec`]) that decodes encodes to
/// what decodes the same (the encoder may pick the other region encoding), and the bound
/// on a LOG's length holds for it. The caller holds a bitmap of every name of up to 2^20
/// regions, so that entries of any count up to that keep their regions; a larger one keeps
/// none, as a name a destination does not hold: nothing is allocated for it.
fn disk_log_round_trip(payload: &[u8]) {
    let holds = |_: &[u8], regions: u64| regions <= 1 << 20;
    let Ok(section) = disk_log_codec::decode(payload, holds) else {
        return;
    };
    let enc = match &section {
        LogSection::Begin(id) => disk_log_codec::encode_begin(*id),
        LogSection::Log(log) => {
            let enc = disk_log_codec::encode_log(log);
            let bound = disk_log_codec::log_len_bound(
                log.bitmaps
                    .iter()
                    .map(|b| (b.name.len(), b.regions.region_count())),
            );
            assert!(enc.len() as u64 <= bound, "a LOG longer than its bound");
            enc
        }
    };
    let again = disk_log_codec::decode(&enc, holds).expect("an encoded section decodes");
    assert_eq!(again, section, "disk log round trip");
}

fn bitmap_round_trip(payload: &[u8]) {
    let Ok(section) = bitmap_codec::decode(payload) else {
        return;
    };
    let enc = match &section.body {
        BitmapSection::Start(s) => bitmap_codec::encode_start(s, section.seq),
        BitmapSection::Regions { index, regions } => {
            let mut out = bitmap_codec::begin_regions(*index, section.seq);
            for (r, body) in regions {
                bitmap_codec::push_region_body(&mut out, *r, *body);
                // A body that holds a region of 4 KiB expands to one the encoder writes
                // back no longer, and to the same bytes.
                let mut region = vec![0u8; 4096];
                if body.expand(&mut region).is_ok() {
                    let mut scratch = Vec::new();
                    let mut again = bitmap_codec::begin_regions(0, 1);
                    bitmap_codec::push_region(&mut again, *r, &region, &mut scratch);
                    bitmap_codec::finish_regions(&mut again, 1);
                    let Ok(Section {
                        body: BitmapSection::Regions { regions: back, .. },
                        ..
                    }) = bitmap_codec::decode(&again)
                    else {
                        panic!("an encoded entry does not decode");
                    };
                    let mut twice = vec![0u8; 4096];
                    back[0]
                        .1
                        .expand(&mut twice)
                        .expect("an encoded entry expands");
                    assert_eq!(region, twice, "sparse round trip");
                }
            }
            let n = u32::try_from(regions.len()).expect("a decoded count fits u32");
            bitmap_codec::finish_regions(&mut out, n);
            out
        }
        BitmapSection::Complete { index, more } => {
            bitmap_codec::encode_complete(*index, section.seq, *more)
        }
        BitmapSection::Query { stream } => bitmap_codec::encode_query(*stream),
    };
    assert_eq!(enc, payload, "bitmap section round trip");
}

/// The disk size of the images of [`fuzz_disk_states`] (granularity 64 KiB: 16,384 bits).
const FUZZ_DISK: u64 = 1 << 30;
/// The granules bitmap "b" of the shared image has dirty, as its source left it.
pub const SHARED_BITS: [u64; 4] = [0, 5, 4096, 16383];

/// The disk states of [`migration_stream`]'s destination mode with bit 6: the shared
/// image (bitmap "b", granularity 64 KiB, [`SHARED_BITS`] dirty, inactivated as a source's
/// stop leaves it) and the stream state's own empty image, with the states over them.
struct FuzzDisks {
    shared: Arc<MemStorage>,
    d: Arc<Mutex<SharedDiskDest<Arc<MemStorage>>>>,
    own: Arc<MemStorage>,
    s: Arc<Mutex<StreamDiskDest<Arc<MemStorage>>>>,
}

fn fuzz_disk_states() -> FuzzDisks {
    let shared = Arc::new(MemStorage::new());
    let mut st = BitmapStore::create(Arc::clone(&shared), FUZZ_DISK, 65536).expect("create");
    st.add("b", 65536, Recording::Enabled).expect("add");
    st.activate().expect("activate");
    let b = st.bitmap("b").expect("bitmap b");
    for g in SHARED_BITS {
        b.mark_dirty(g * 65536, 1);
    }
    st.inactivate().expect("inactivate");
    drop(st);
    let (w, r) = (Arc::clone(&shared), Arc::clone(&shared));
    let d = SharedDiskDest::new("d", move || {
        BitmapStore::open(Arc::clone(&w), OpenMode::ReadWrite)
    })
    .with_preload(move || BitmapStore::open(Arc::clone(&r), OpenMode::ReadOnly));
    let own = Arc::new(MemStorage::new());
    drop(BitmapStore::create(Arc::clone(&own), FUZZ_DISK, 65536).expect("create"));
    let o = Arc::clone(&own);
    let s = StreamDiskDest::new("s", move || {
        BitmapStore::open(Arc::clone(&o), OpenMode::ReadWrite)
    })
    .with_max_bytes(1 << 20);
    FuzzDisks {
        shared,
        d: Arc::new(Mutex::new(d)),
        own,
        s: Arc::new(Mutex::new(s)),
    }
}

/// The dirty granules of `b` (at 64 KiB).
fn granules(b: &DirtyBitmap) -> Vec<u64> {
    b.dirty_extents()
        .flat_map(|(o, l)| (o / 65536)..(o + l).div_ceil(65536))
        .collect()
}

/// The disk states' invariants after the destination ran ([`migration_stream`]).
fn check_disk_states(f: &FuzzDisks) {
    let (shared, own) = (&*f.shared, &*f.own);
    let taken = f.d.lock().expect("d").take_store();
    if let Some(mut st) = taken {
        let b = st.load("b").expect("the taken-over store loads b");
        assert_eq!(granules(&b), SHARED_BITS, "the shared bitmap changed");
        st.inactivate().expect("inactivate d");
    }
    // The image as its source left it (or as the taken-over store left it again): "b"
    // consistent with exactly its bits.
    let st = BitmapStore::open(shared, OpenMode::ReadOnly).expect("open the shared image");
    let info = st.list();
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0].state, BitmapState::Consistent, "{info:?}");
    let b = st.load("b").expect("load b");
    assert_eq!(
        granules(&b),
        SHARED_BITS,
        "the shared image's bitmap changed"
    );
    let r = st.image().check().expect("check the shared image");
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    let taken = f.s.lock().expect("s").take_store();
    if let Some(mut st) = taken {
        if let Err(e) = st.inactivate() {
            assert!(!matches!(e, Error::Io(_)), "inactivate s: {e}");
        }
    }
    let st = BitmapStore::open(own, OpenMode::ReadOnly).expect("open the stream image");
    let r = st.image().check().expect("check the stream image");
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
}

/// The preload reports the shared disk state "d" sent on a success of
/// [`migration_stream`]'s destination with disk states: each decodes, and the last take it
/// says it applied is a LOG the stream sent it.
fn check_preload_reports(hello: &Hello, frames: &[(u8, &[u8])], replies: &[Frame]) {
    let Some(d) = hello.states.iter().find(|s| s.name == "d").map(|s| s.id) else {
        return;
    };
    let mut last = 0;
    for &(k, p) in frames {
        if let Some(Ok(Frame::Section { state, payload })) =
            FrameKind::from_u8(k).map(|kind| Frame::decode_payload(kind, p))
        {
            if state == d {
                if let Ok(LogSection::Log(log)) = disk_log_codec::decode(&payload, |_, _| false) {
                    last = last.max(log.seq);
                }
            }
        }
    }
    for f in replies {
        if let Frame::Report { state, payload } = f {
            if *state == d {
                let r = disk_log_codec::decode_report(payload).expect("a preload report decodes");
                assert!(r.through <= last, "{r:?} after LOGs up to {last}");
            }
        }
    }
}

/// The destination checks of [`migration_stream`].
fn fuzz_destination(refuse: bool, disks: bool, data: &[u8]) {
    // Build a well-framed stream from the records, and the model from the same frames.
    let mut stream = encode_stream_header(STREAM_VERSION).to_vec();
    let mut frames = Vec::new();
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        let payload = &rest[3..(3 + len).min(rest.len())];
        rest = &rest[3 + payload.len()..];
        stream.extend(encode_raw_frame(kind, frames.len() as u64, payload));
        frames.push((kind, payload));
    }
    let config = DestinationConfig {
        refuse_start: refuse.then(|| "fuzz".to_owned()),
        max_ram_bytes: crate::migration::Bytes(1 << 20),
        max_frame_len: 1 << 16,
        nonce: None,
    };
    let mut answers = Vec::new();
    let mut dest = Destination::new(&stream[..], &mut answers, config);
    let disk_states = disks.then(fuzz_disk_states);
    if let Some(f) = &disk_states {
        dest.add_state(Arc::clone(&f.d) as SharedDestState);
        dest.add_state(Arc::clone(&f.s) as SharedDestState);
    }
    let result = dest.run();
    if let Some(f) = &disk_states {
        check_disk_states(f);
    }
    let mut replies = Vec::new();
    let mut r = FrameReader::new(&answers[..]);
    while let Ok(f) = r.read_frame() {
        replies.push(f);
    }
    assert_eq!(
        r.bytes_read().get() as usize,
        answers.len(),
        "the destination's answers are a well-formed stream"
    );
    let started = replies.iter().filter(|f| **f == Frame::Started).count();
    let guest = match result {
        Ok(g) => g,
        Err(e) => {
            assert!(
                !matches!(e, MigrationError::Io(_)),
                "I/O error from memory: {e}"
            );
            let last = replies.last();
            match e {
                MigrationError::PeerAborted(_) => {}
                MigrationError::DestinationRefused(why) => {
                    // Told to refuse, or a disk state refused to start on what the stream
                    // said (a START for another disk size, say): before it wrote anything,
                    // which the disk states' checks above hold it to.
                    assert!(refuse || disks, "refused: {why}");
                    assert!(
                        matches!(last, Some(Frame::Refused { .. })),
                        "no Refused sent"
                    );
                }
                other => assert!(
                    matches!(last, Some(Frame::Abort { .. })),
                    "{other} without an Abort sent"
                ),
            }
            assert!(started <= 1);
            return;
        }
    };
    assert!(!refuse, "a refusing destination started");
    assert_eq!(started, 1, "one Started");
    assert!(
        replies
            .iter()
            .all(|f| matches!(f, Frame::Started | Frame::PageRequest { .. })
                || (disks && matches!(f, Frame::Report { .. }))),
        "only Started, page requests and (with disk states) preload reports on success"
    );
    // The model: every copy of each page, in order.
    let Some(Frame::Hello(hello)) = frames
        .first()
        .and_then(|&(k, p)| Frame::decode_payload(FrameKind::from_u8(k)?, p).ok())
    else {
        panic!("a migration succeeded without a Hello first");
    };
    let ram_id = hello
        .states
        .iter()
        .find(|s| s.name == ram_codec::RAM_STATE_NAME)
        .map(|s| s.id);
    if disks {
        check_preload_reports(&hello, &frames, &replies);
    }
    let ps = guest.page_size();
    let mut copies: Vec<Vec<&[u8]>> = vec![Vec::new(); guest.pages() as usize];
    for &(k, p) in &frames[1..] {
        match FrameKind::from_u8(k).map(|kind| Frame::decode_payload(kind, p)) {
            Some(Ok(Frame::End)) => break,
            Some(Ok(Frame::Section { state, .. })) if Some(state) == ram_id => {
                let entries = ram_codec::decode_entries(ps, &p[4..]).expect("applied section");
                for e in entries {
                    if let PageEntry::Data(page, d) = e {
                        copies[page as usize].push(d);
                    }
                }
            }
            _ => {}
        }
    }
    for (page, c) in copies.iter().enumerate() {
        let got = guest.page(page as u64).expect("page in range");
        if guest.was_postcopy() {
            assert!(c.contains(&got), "page {page} is no copy the source sent");
        } else {
            assert_eq!(
                Some(&got),
                c.last(),
                "page {page} is not the last copy sent"
            );
        }
    }
}

/// Fuzz target `repair`: `data[0]` picks the repair (even: `-r leaks`, odd: `-r all`), and
/// `data[1..]` becomes a `MemStorage` that [`repair`](crate::store::repair::repair) opens
/// writable.
///
/// Invariants: no error is `Error::Io`; a refusal writes nothing; a repair never makes the
/// image worse by `Image::check`'s count of corruptions (a leaks repair that made a leaky
/// image corrupt is the defect `tests/repair.rs`
/// `repairing_a_lost_snapshots_leaks_never_leaves_a_copied_flag_wrong` names), and leaves
/// no more leaks than it found but those it keeps at refcount 2 (`leaks_uncopied`: a
/// cluster another reference it removed shared with a guest table entry without COPIED);
/// no bitmap loses a bit: each that loaded before and is still listed loads a superset of
/// its bits (all of them for one the repair made all dirty), one that loaded is gone only
/// if the report removed it or its directory, and one inconsistent before stays
/// inconsistent; after an `-r all` that removed a bitmap, every consistent bitmap left
/// loads all dirty, and they are the ones the report says it made all dirty; after `-r all`
/// the image has no corruption, and the store opens it;
/// a second repair of the same kind finds nothing to do and writes nothing.
pub fn repair(data: &[u8]) {
    use crate::store::repair::{repair, Repair};
    let Some((&pick, image)) = data.split_first() else {
        return;
    };
    let what = if pick % 2 == 0 {
        Repair::Leaks
    } else {
        Repair::All
    };
    let before = Image::open(MemStorage::from_bytes(image.to_vec()), OpenMode::ReadOnly)
        .and_then(|i| i.check())
        .ok();
    let opened = BitmapStore::open(MemStorage::from_bytes(image.to_vec()), OpenMode::ReadOnly);
    // Whether the store opens the image: its directory decodes whole, so the repair's walk
    // sees every reference a kept bitmap holds.
    let store_opens = opened.is_ok();
    // What each bitmap held before, as the store reads it (`None`: inconsistent).
    let held: Vec<(crate::BitmapName, Option<DirtyBitmap>)> = match opened {
        Ok(s) => s
            .list()
            .into_iter()
            .filter_map(|i| match s.load(&i.name) {
                Ok(bm) => Some((i.name, Some(bm))),
                Err(Error::Inconsistent { .. }) => Some((i.name, None)),
                Err(_) => None,
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    let st = MemStorage::from_bytes(image.to_vec());
    let (repaired, report) = match repair(&st, what) {
        Ok((img, report)) => (img.check(), report),
        Err(e) => {
            assert!(!matches!(e, Error::Io(_)), "repair gave an I/O error: {e}");
            assert!(st.to_vec() == image, "a refused repair wrote: {e}");
            return;
        }
    };
    let after = repaired.expect("the repaired image checks");
    if let Some(b) = &before {
        assert!(
            after.corruptions <= b.corruptions,
            "{what:?} made the image worse: {} corruptions from {} ({report:?}): {:?}",
            after.corruptions,
            b.corruptions,
            after.messages
        );
        assert!(
            after.leaks <= b.leaks.saturating_add(report.leaks_uncopied),
            "{what:?} left {} leaks from {} ({report:?})",
            after.leaks,
            b.leaks
        );
        // Every leak the check finds is one the repair lowered, or says it kept: a repair
        // that skipped leaks silently would pass the clause above by writing nothing.
        if store_opens {
            assert!(
                after.leaks <= report.leaks_kept.saturating_add(report.leaks_uncopied),
                "{what:?} left {} leaks unreported ({report:?}): {:?}",
                after.leaks,
                after.messages
            );
        }
    }
    let bytes = st.to_vec();
    if let Ok(s) = BitmapStore::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadOnly) {
        let listed = s.list();
        // A removal makes every kept consistent bitmap all dirty (a removed bitmap may
        // have held writes it lacks): checked on the image as it is, whether or not the
        // store could read it before (it refuses a directory with one broken entry).
        if what == Repair::All && !report.removed.is_empty() {
            let consistent: Vec<&crate::BitmapName> = listed
                .iter()
                .filter(|i| i.state == BitmapState::Consistent)
                .map(|i| &i.name)
                .collect();
            for name in &consistent {
                let bm = s.load(name).unwrap_or_else(|e| {
                    panic!("-r all left {name:?} consistent and unloadable: {e}")
                });
                assert_eq!(
                    bm.count(),
                    bm.bit_count(),
                    "-r all removed {:?} and kept {name:?} with clean bits ({report:?})",
                    report.removed
                );
            }
            let said: Vec<&crate::BitmapName> = report.made_all_dirty.iter().collect();
            assert_eq!(
                said, consistent,
                "made all dirty, as reported and as loaded"
            );
        }
        for (name, was) in &held {
            let Some(now) = listed.iter().find(|i| i.name == *name) else {
                // Gone: only a bitmap the repair says it removed, or with the directory.
                assert!(
                    was.is_none()
                        || report.extension_dropped.is_some()
                        || report.removed.iter().any(|(n, _)| n == name),
                    "{what:?} dropped {name:?}, which loaded, without a word ({report:?})"
                );
                continue;
            };
            match (was, s.load(name)) {
                (None, r) => assert!(
                    now.state == BitmapState::Inconsistent,
                    "{what:?} made the inconsistent {name:?} consistent: {r:?}"
                ),
                (Some(was), Ok(bm)) => {
                    let all = report.made_all_dirty.contains(name);
                    assert!(
                        !all || bm.count() == bm.bit_count(),
                        "{what:?} left {name:?}, said all dirty, with clean bits"
                    );
                    let lost = was
                        .dirty_extents()
                        .find(|&(off, len)| bm.next_clean(off).is_some_and(|c| c < off + len));
                    assert!(lost.is_none(), "{what:?} lost {lost:?} of {name:?}");
                }
                (Some(_), Err(e)) => {
                    assert!(
                        matches!(e, Error::Inconsistent { .. }),
                        "{what:?} left {name:?} unloadable: {e}"
                    );
                }
            }
        }
    }
    if what == Repair::All {
        assert_eq!(
            after.corruptions, 0,
            "-r all left corruption ({report:?}): {:?}",
            after.messages
        );
        if let Err(e) = BitmapStore::open(MemStorage::from_bytes(bytes.clone()), OpenMode::ReadOnly)
        {
            panic!("-r all left an image the store refuses: {e}");
        }
    }
    let again = MemStorage::from_bytes(bytes.clone());
    match repair(&again, what) {
        Ok((_, r)) => {
            assert!(
                r.removed.is_empty()
                    && r.extension_dropped.is_none()
                    && r.leaks_freed == 0
                    && r.refcounts_raised == 0
                    && r.made_all_dirty.is_empty(),
                "a second {what:?} repaired more: {r:?} after {report:?}"
            );
            assert!(again.to_vec() == bytes, "a second {what:?} wrote");
        }
        Err(e) => panic!("a second {what:?} failed after {report:?}: {e}"),
    }
}
