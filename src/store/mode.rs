//! The mode an image records for its bitmaps ([`StoreMode`], read from the mode extension
//! of `src/format/mode.rs`), and the header write that records it.
//!
//! The invariant: **while a store of this crate is active in deferred mode (`in_use` set on
//! its bitmaps), the image's mode extension, if it has one, has no flag set**, and the
//! durable activation sets bit 0 before its bitmaps are published. So a reader that finds bit 0 set on a
//! bitmap that is not `in_use` knows its writer keeps it in durable mode, or did last: the
//! bitmap covers every write that writer acknowledged. The durable `inactivate` writes
//! nothing extra (a migration's stop in durable mode writes 0 bytes), so the flag stays and
//! means "last kept in durable mode"; the bitmaps are then consistent as any inactive
//! store leaves them.
//!
//! Crash reasoning (`docs/CRASH-CONSISTENCY.md`, "The mode extension"). Once the image has
//! a well-formed mode extension (and no unknown autoclear bit, whose clearing rewrites
//! cluster 0 first), a change of mode is its 8-byte flags word written in place and one
//! barrier: the word is 8-aligned (the extension area starts at the 8-aligned
//! header length and every frame is padded to 8), so it lies inside one sector, and a torn
//! write leaves the old word or the new one; nothing else moves. The first durable
//! activation of an image without one adds it: one header write and one barrier (more when
//! the backing file's name moves through a spare place, `Image::put_header_moving_name`,
//! or a foreign layout is bracketed). The mode extension is the last one in cluster 0
//! (`HeaderArea::encode`), after the bitmaps extension, so adding or removing it changes no
//! byte of the bitmaps extension or of anything before it but the backing file fields.
//! `torn_mix_keeps_bitmaps` checks exactly that against the bytes on disk; when it holds,
//! every sector-wise mix of the old and new cluster 0 decodes the same bitmaps extension
//! and the same autoclear bit 0, so a torn write changes no bitmap's state. When it does
//! not hold (cluster 0 was laid out by another program, or differs from what this handle
//! would write), the write is bracketed as resize brackets its commit (`resize.rs`):
//! autoclear bit 0 cleared in place first, then cluster 0, then bit 0 set in place, each
//! with a barrier: a crash in between leaves every bitmap untrusted, never a torn mix that
//! loads as clean.

use std::fmt;

use super::BitmapStore;
use crate::error::Result;
use crate::format::header::{AUTOCLEAR_BITMAPS, AUTOCLEAR_MASK};
use crate::format::mode::{ModeExtension, EXT_MODE};
use crate::format::{Frames, Header, HeaderArea, EXTENSION_FRAME_LEN};
use crate::storage::Storage;

/// The backing file offset and size fields: bytes 8..20 of the header.
const BACKING_FIELDS: std::ops::Range<usize> = 8..20;

/// How the image says its bitmaps are kept, from this crate's mode extension
/// (`docs/FORMAT.md`, "Mode extension"). [`BitmapStore::mode`] reads it.
///
/// It qualifies what a bitmap that is *not* `in_use` means; a bitmap that is `in_use` is
/// inconsistent whatever the mode says (a writer that keeps it in deferred mode is active,
/// or crashed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreMode {
    /// No mode extension (or one with no flag set): the bitmaps are kept in the deferred
    /// mode (`in_use` set while a writer is active), by QEMU, or never activated. A bitmap
    /// that is not `in_use` was saved cleanly by its last writer and none holds it now.
    Deferred,
    /// Bit 0 set: the bitmaps are kept in durable mode
    /// ([`BitmapStore::activate_durable`]), or were when last active. A bitmap that is not
    /// `in_use` covers every write its writer acknowledged, even while that writer runs or
    /// after it crashed.
    Durable,
    /// A reserved flag bit is set (a later version's mode): what a clean bitmap means is
    /// not known here. Never an error.
    Unknown {
        /// The flags word as found.
        flags: u64,
    },
    /// A mode extension whose data is not 8 bytes long: the mode is unknown. Never an
    /// error.
    Malformed {
        /// Its data length.
        len: usize,
    },
}

impl StoreMode {
    /// The mode cluster 0 records: a malformed mode extension wins, then the flags of the
    /// last well-formed one, else [`StoreMode::Deferred`].
    pub fn of(area: &HeaderArea) -> Self {
        if let Some(u) = area.unknown.iter().find(|u| u.kind == EXT_MODE) {
            return Self::Malformed { len: u.data.len() };
        }
        match area.mode {
            None => Self::Deferred,
            Some(m) if m.reserved() != 0 => Self::Unknown { flags: m.flags },
            Some(m) if m.durable() => Self::Durable,
            Some(_) => Self::Deferred,
        }
    }

    /// One word for it: `durable`, `deferred` or `unknown`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Durable => "durable",
            Self::Deferred => "deferred",
            Self::Unknown { .. } | Self::Malformed { .. } => "unknown",
        }
    }

    /// The flags word of a well-formed mode extension, if the image has one.
    pub fn flags(&self) -> Option<u64> {
        match self {
            Self::Durable => Some(crate::format::mode::MODE_DURABLE),
            Self::Unknown { flags } => Some(*flags),
            Self::Deferred | Self::Malformed { .. } => None,
        }
    }
}

impl fmt::Display for StoreMode {
    /// `durable`, `deferred`, `unknown (flags 0x…)` or `unknown (mode extension of N
    /// bytes)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown { flags } => write!(f, "unknown (flags {flags:#018x})"),
            Self::Malformed { len } => write!(f, "unknown (mode extension of {len} bytes)"),
            _ => f.write_str(self.name()),
        }
    }
}

impl<S: Storage> BitmapStore<S> {
    /// The mode the image records for its bitmaps (see [`StoreMode`]): as found when the
    /// image was opened, or as this store last wrote it ([`StoreMode::Durable`] from
    /// [`activate_durable`](Self::activate_durable) on, [`StoreMode::Deferred`] from
    /// [`activate`](Self::activate) on).
    pub fn mode(&self) -> StoreMode {
        StoreMode::of(self.image.area())
    }

    /// Refuses, with [`Error::InvalidInput`](crate::Error::InvalidInput), an image whose
    /// cluster 0 cannot hold the durable mode's extension (the header area with it does not
    /// encode: a long backing file name beside the bitmaps extension in a small cluster).
    /// A durable activation asks before its first write.
    pub(super) fn ensure_durable_mode_fits(&self) -> Result<()> {
        self.mode_changes_area(Some(ModeExtension::DURABLE))
            .map(|_| ())
    }

    /// Whether setting `mode` changes the header area, and, when it does, that the area
    /// with it still fits in cluster 0 (`InvalidInput` otherwise).
    fn mode_changes_area(&self, mode: Option<ModeExtension>) -> Result<bool> {
        let mut next = self.image.area().clone();
        if !next.set_mode(mode) {
            return Ok(false);
        }
        next.encode()?;
        Ok(true)
    }

    /// Records the durable mode (bit 0 set) before a durable activation publishes its
    /// bitmaps: the flags word in place if the image has a well-formed mode extension, else
    /// the extension added. Writes nothing when the image already records exactly that.
    pub(super) fn record_durable_mode(&mut self) -> Result<()> {
        if self.flags_in_place(ModeExtension::DURABLE)? {
            return Ok(());
        }
        self.record_mode(Some(ModeExtension::DURABLE))
    }

    /// Clears every flag before a deferred activation sets `in_use`: the flags word in
    /// place if the image has a well-formed mode extension (a malformed one is removed).
    /// Writes nothing when there is none, or no flag is set.
    pub(super) fn record_deferred_mode(&mut self) -> Result<()> {
        if self.flags_in_place(ModeExtension { flags: 0 })? {
            return Ok(());
        }
        if self.image.area().mode.is_some() {
            // A malformed one beside it: the rewrite drops both.
            return self.record_mode(Some(ModeExtension { flags: 0 }));
        }
        self.record_mode(None)
    }

    /// Writes `want`'s flags word over the well-formed mode extension on disk, in place,
    /// then a barrier (nothing if it already holds them). False, having written nothing,
    /// when there is no such extension to write over: none, a malformed one beside it,
    /// cluster 0 on disk not holding the one this handle decoded, or an unknown autoclear
    /// bit set (then the caller rewrites the header). Poisons the store on an I/O failure.
    fn flags_in_place(&mut self, want: ModeExtension) -> Result<bool> {
        self.ensure_writable()?;
        let area = self.image.area();
        let Some(have) = area.mode else {
            return Ok(false);
        };
        if area.unknown.iter().any(|u| u.kind == EXT_MODE) {
            return Ok(false);
        }
        if have == want {
            return Ok(true);
        }
        // The image's first write clears unknown autoclear bits by rewriting cluster 0 in
        // this crate's layout (`Image::write_at`), which may move the extensions: an offset
        // found in the layout on disk now could then name another extension's bytes. The
        // header rewrite (`record_mode`) clears them in its own write, bracketed if the
        // layout changes.
        if self.image.header().autoclear_features & !AUTOCLEAR_MASK != 0 {
            return Ok(false);
        }
        let len = usize::try_from(self.image.storage().len()?)
            .unwrap_or(usize::MAX)
            .min(usize::try_from(self.image.cluster_size()).unwrap_or(usize::MAX));
        let mut disk = vec![0u8; len];
        self.image.storage().read_exact_at(&mut disk, 0)?;
        let Some(at) = mode_flags_offset(&disk).filter(|&at| {
            disk.get(at..at + 8)
                .is_some_and(|w| w == have.flags.to_be_bytes())
        }) else {
            return Ok(false);
        };
        let r = self
            .image
            .write_at(&want.flags.to_be_bytes(), at as u64)
            .and_then(|()| self.image.sync());
        match r {
            Ok(()) => {
                self.image.area_mut().mode = Some(want);
                self.image
                    .note_cluster0_write(at as u64, &want.flags.to_be_bytes());
                Ok(true)
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Sets or removes the mode extension: one header write and a barrier, or the bracket
    /// of the module documentation. Poisons the store on failure (the disk then holds the
    /// old or the new extension, or bit 0 clear: never a bitmap falsely clean).
    fn record_mode(&mut self, mode: Option<ModeExtension>) -> Result<()> {
        self.ensure_writable()?;
        // A cluster 0 with no room for the extension: refused before the area changes or
        // anything is written (a refusal of the image, not a failed write: no poison).
        if !self.mode_changes_area(mode)? {
            return Ok(());
        }
        let r = self.write_mode(mode);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn write_mode(&mut self, mode: Option<ModeExtension>) -> Result<()> {
        self.image.area_mut().set_mode(mode);
        let new = self.image.header_bytes()?;
        let len = usize::try_from(self.image.storage().len()?)
            .unwrap_or(usize::MAX)
            .min(new.len());
        let mut old = vec![0u8; len];
        self.image.storage().read_exact_at(&mut old, 0)?;
        if torn_mix_keeps_bitmaps(&old, &new) {
            return self.image.write_header();
        }
        // The bracket. `autoclear` is what cluster 0 is written with (`header_bytes`): bit 0
        // set exactly when a trusted bitmaps extension goes with it. In place, bit 0 clear
        // changes one sector of the old layout whatever it is; then the whole cluster, with
        // bit 0 still clear; then bit 0 back, one sector of the layout now on disk.
        let autoclear = self.image.header().autoclear_features;
        self.write_autoclear_in_place(autoclear & !AUTOCLEAR_BITMAPS)?;
        self.image.write_header()?;
        self.write_autoclear_in_place(autoclear)
    }

    /// The autoclear field alone, in place (one sector), then a barrier.
    fn write_autoclear_in_place(&mut self, value: u64) -> Result<()> {
        self.image.write_autoclear(value)
    }
}

/// Where the flags word of the last well-formed mode extension lies in cluster 0 `area`
/// (the one the decoder keeps, as QEMU keeps the last of a known kind), by the decoder's
/// own walk over the extension frames. None on a v2 header, or without one.
fn mode_flags_offset(area: &[u8]) -> Option<usize> {
    let header = Header::decode(area).ok().filter(|h| h.version >= 3)?;
    let (start, end) = header.extension_area();
    let mut frames = Frames {
        bytes: area,
        offset: start,
        end,
    };
    let mut found = None;
    while let Ok(Some(f)) = frames.next_frame() {
        let data = usize::try_from(f.offset)
            .ok()
            .and_then(|o| o.checked_add(EXTENSION_FRAME_LEN));
        if let Some(data) = data.filter(|d| f.kind == EXT_MODE && f.data.len() == 8 && d % 8 == 0) {
            found = Some(data);
        }
    }
    found
}

/// Whether every 512-byte-sector mix of cluster 0 `old` (on disk) and `new` (about to
/// replace it) decodes the same bitmaps extension, with the same autoclear bit 0, as both
/// do: the bytes up to the end of the bitmaps extension are the same in both but for the
/// backing file fields (bytes 8..20, one sector, so both from one side), and both backing
/// file offsets leave the bitmaps extension inside the extension area. The walk to the
/// bitmaps extension then reads the same frames in every mix. True when neither has a
/// bitmaps extension.
pub(super) fn torn_mix_keeps_bitmaps(old: &[u8], new: &[u8]) -> bool {
    // A v2 image holds no bitmaps ("Cannot store dirty bitmaps in qcow2 v2 files"), and its
    // 72-byte header has neither the header length at 100 that the walk below starts from
    // nor the autoclear field the bracket writes.
    let version = |b: &[u8]| b.get(4..8).and_then(|f| <[u8; 4]>::try_from(f).ok());
    if version(new).map(u32::from_be_bytes).is_some_and(|v| v < 3) {
        return true;
    }
    let end = super::resize::bitmaps_extension_end(new);
    if end != super::resize::bitmaps_extension_end(old) {
        return false;
    }
    if end == 0 {
        return true;
    }
    let Ok(end) = usize::try_from(end) else {
        return false;
    };
    let (Some(o), Some(n)) = (old.get(..end), new.get(..end)) else {
        return false;
    };
    let same = o
        .iter()
        .zip(n)
        .enumerate()
        .all(|(i, (a, b))| a == b || BACKING_FIELDS.contains(&i));
    let backing_after = |b: &[u8]| {
        b.get(8..16)
            .and_then(|f| <[u8; 8]>::try_from(f).ok())
            .map(u64::from_be_bytes)
            .is_some_and(|off| off == 0 || off >= end as u64)
    };
    same && backing_after(o) && backing_after(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::header::tests::sample;
    use crate::format::{BitmapsExtension, UnknownExtension};

    fn area(cluster_bits: u32) -> HeaderArea {
        let mut a = HeaderArea::new(crate::format::Header {
            cluster_bits,
            l1_size: 1 << 12,
            l1_table_offset: 3 << cluster_bits,
            refcount_table_offset: 1 << cluster_bits,
            autoclear_features: AUTOCLEAR_BITMAPS,
            ..sample()
        });
        a.bitmaps = Some(BitmapsExtension {
            nb_bitmaps: 1,
            directory_size: 32,
            directory_offset: 0x50000,
        });
        a
    }

    #[test]
    fn autoclear_field_is_at_88() {
        let mut a = area(16);
        a.header.autoclear_features = 0x0102_0304_0506_0708;
        let b = a.encode().unwrap();
        // The autoclear features field: 8 bytes at offset 88 of the header (`docs/FORMAT.md`,
        // "Image header"), inside the first sector, where `Image::write_autoclear` writes it.
        let (at, _) = a.header.autoclear_field();
        assert_eq!(at, 88);
        let at = at as usize;
        assert_eq!(b[at..at + 8], 0x0102_0304_0506_0708u64.to_be_bytes());
    }

    #[test]
    fn mode_of_an_area() {
        let mut a = area(16);
        assert_eq!(StoreMode::of(&a), StoreMode::Deferred);
        a.mode = Some(ModeExtension::DURABLE);
        assert_eq!(StoreMode::of(&a), StoreMode::Durable);
        a.mode = Some(ModeExtension { flags: 0 });
        assert_eq!(StoreMode::of(&a), StoreMode::Deferred);
        a.mode = Some(ModeExtension { flags: 3 });
        assert_eq!(StoreMode::of(&a), StoreMode::Unknown { flags: 3 });
        assert_eq!(
            StoreMode::of(&a).to_string(),
            "unknown (flags 0x0000000000000003)"
        );
        a.unknown.push(UnknownExtension {
            kind: EXT_MODE,
            data: vec![0; 5],
        });
        assert_eq!(StoreMode::of(&a), StoreMode::Malformed { len: 5 });
        assert_eq!(
            StoreMode::of(&a).to_string(),
            "unknown (mode extension of 5 bytes)"
        );
        assert_eq!(StoreMode::Durable.to_string(), "durable");
        assert_eq!(StoreMode::Deferred.flags(), None);
        assert_eq!(StoreMode::Durable.flags(), Some(1));
    }

    #[test]
    fn adding_or_removing_the_mode_keeps_the_bitmaps_extension_in_every_layout() {
        for bits in [9, 12, 16, 21] {
            let old = area(bits);
            let mut new = old.clone();
            new.set_mode(Some(ModeExtension::DURABLE));
            let (o, n) = (old.encode().unwrap(), new.encode().unwrap());
            assert!(torn_mix_keeps_bitmaps(&o, &n), "cluster bits {bits}");
            assert!(torn_mix_keeps_bitmaps(&n, &o), "cluster bits {bits}");
            // With a backing file, its offset moves (first sector) and still passes.
            let mut ob = old.clone();
            ob.backing_file = Some(b"base.qcow2".to_vec());
            let mut nb = ob.clone();
            nb.set_mode(Some(ModeExtension::DURABLE));
            let (o, n) = (ob.encode().unwrap(), nb.encode().unwrap());
            assert_ne!(o[8..16], n[8..16]);
            assert!(torn_mix_keeps_bitmaps(&o, &n), "cluster bits {bits}");
        }
    }

    #[test]
    fn a_v2_image_has_nothing_to_bracket() {
        let mut old = HeaderArea::new(crate::format::Header {
            version: 2,
            header_length: 72,
            autoclear_features: 0,
            compatible_features: 0,
            incompatible_features: 0,
            refcount_order: 4,
            ..sample()
        });
        old.unknown.push(UnknownExtension {
            kind: 0x1111_1111,
            data: vec![0xff; 40],
        });
        // The v2 extension area starts at 72, so bytes 100.. are extension data: here the
        // bytes a v3 walk would read as a header length of 104 and a bitmaps frame there.
        let mut data = vec![0u8; 40];
        data[20..24].copy_from_slice(&104u32.to_be_bytes());
        data[24..28].copy_from_slice(&0x2385_2875u32.to_be_bytes());
        data[28..32].copy_from_slice(&24u32.to_be_bytes());
        let mut new = old.clone();
        new.unknown[0].data = data;
        new.set_mode(Some(ModeExtension::DURABLE));
        let (o, n) = (old.encode().unwrap(), new.encode().unwrap());
        assert_eq!(&n[..4], b"QFI\xfb");
        assert_eq!(n[7], 2);
        assert_eq!(u32::from_be_bytes(n[100..104].try_into().unwrap()), 104);
        assert!(
            torn_mix_keeps_bitmaps(&o, &n),
            "no bracket (and no write at 88) on v2"
        );
    }

    #[test]
    fn a_moved_bitmaps_extension_is_refused() {
        let old = area(16);
        // On disk, an unknown extension before the bitmaps extension (another writer's
        // layout); this crate writes the unknown ones after it.
        let mut disk = old.encode().unwrap();
        let frame = [0x11, 0x11, 0x11, 0x11, 0, 0, 0, 0];
        disk.splice(112..112, frame);
        disk.truncate(1 << 16);
        let d = HeaderArea::decode(&disk).unwrap();
        assert_eq!(d.bitmaps, old.bitmaps);
        let mut new = d.clone();
        new.set_mode(Some(ModeExtension::DURABLE));
        assert!(!torn_mix_keeps_bitmaps(&disk, &new.encode().unwrap()));
        // A different directory is refused too, and nothing to protect passes.
        let mut moved = old.clone();
        moved.bitmaps = Some(BitmapsExtension {
            directory_offset: 0x60000,
            ..old.bitmaps.unwrap()
        });
        assert!(!torn_mix_keeps_bitmaps(
            &old.encode().unwrap(),
            &moved.encode().unwrap()
        ));
        let mut none = old.clone();
        none.bitmaps = None;
        let e = none.encode().unwrap();
        assert!(torn_mix_keeps_bitmaps(&e, &e));
        assert!(!torn_mix_keeps_bitmaps(&e, &old.encode().unwrap()));
        assert!(!torn_mix_keeps_bitmaps(&[], &old.encode().unwrap()));
    }
}
