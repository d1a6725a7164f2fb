//! Reading a bitmap directory QEMU refuses, entry by entry, so that tools can say which
//! bitmaps are broken and why (`dbm info`) instead of failing as a whole.
//!
//! [`BitmapStore::open`](super::BitmapStore::open) refuses such an image, as QEMU does;
//! [`triage_bitmaps`] reads what it can: each entry whose framing is intact, with the
//! first constraint it breaks (`format::triage_directory`), and then, for the entries QEMU
//! would accept, their tables (a reserved bit or an unaligned offset in a table is what
//! QEMU's `bitmap_table_load` refuses).

use crate::error::{Error, Result};
use crate::format::{decode_table, triage_directory, Corruption, Triage, TriagedEntry};
use crate::image::{read_metadata, Image};
use crate::storage::Storage;

/// One bitmap of a directory read by [`triage_bitmaps`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriagedBitmap {
    /// The entry as read, with its verdict on the entry's own fields.
    pub entry: TriagedEntry,
    /// Why the bitmap is broken (the entry's problem, or its table's), or `None` when QEMU
    /// would load it.
    pub broken: Option<String>,
    /// Whether what breaks it is a table reaching past the end of the file (but not past
    /// QEMU's largest request end, 2^63 − 2^30). QEMU does not refuse that: it reads the
    /// missing part as zeros, so it may load the bitmap as clean there, and a QEMU writer
    /// then saves it so. This crate refuses it as broken.
    pub table_past_end: bool,
}

/// What [`triage_bitmaps`] found in an image's bitmaps extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapTriage {
    /// The bitmaps whose entries could be read, in directory order.
    pub bitmaps: Vec<TriagedBitmap>,
    /// Why the directory as a whole cannot be read (its size, an entry past its end, the
    /// count of entries), if it cannot: then `bitmaps` may not name every bitmap.
    pub unreadable: Option<String>,
}

impl BitmapTriage {
    /// Whether QEMU would load every bitmap: nothing broken, the directory readable.
    pub fn is_sound(&self) -> bool {
        self.unreadable.is_none() && self.bitmaps.iter().all(|b| b.broken.is_none())
    }
}

/// Reads the bitmaps extension of `image` entry by entry (see the module docs). `None`
/// when the image has no trusted bitmaps extension.
///
/// Only what the image's bytes say is a verdict: a directory or table past the end of the
/// file, or one that does not decode. A read that fails (I/O) is the storage's problem, not
/// the image's, and is returned as the error: a repair acting on such a verdict would remove
/// a sound bitmap, or every bitmap.
///
/// # Errors
/// [`crate::Error::Io`] when the directory or a table cannot be read from the file; the
/// image's geometry being invalid; [`Corruption::OverlappingTables`] for tables that
/// overlap beyond the file, before any is read.
pub fn triage_bitmaps<S: Storage>(image: &Image<S>) -> Result<Option<BitmapTriage>> {
    let Some(ext) = image.area().bitmaps else {
        return Ok(None);
    };
    let geo = image.header().geometry()?;
    let bytes = match read_metadata(
        image.storage(),
        "bitmap directory",
        ext.directory_offset,
        ext.directory_size,
    ) {
        Ok(b) => b,
        Err(e) => {
            return Ok(Some(BitmapTriage {
                bitmaps: Vec::new(),
                unreadable: Some(image_problem(e)?),
            }))
        }
    };
    let Triage { entries, framing } = triage_directory(&bytes, ext.nb_bitmaps, &geo);
    ensure_tables_fit(image, &entries)?;
    let mut bitmaps = Vec::with_capacity(entries.len());
    // Each table is read once however many entries name it: the cost stays that of the
    // file, not entries × table (65,534 entries naming one 2 MiB table would read 128 GiB).
    let mut verdicts: std::collections::HashMap<(u64, u32), Option<(String, bool)>> =
        std::collections::HashMap::new();
    for entry in entries {
        let problem = match &entry.verdict {
            Err(p) => Some((p.to_string(), false)),
            // QEMU reads the table of a bitmap that is not in use when it opens the image.
            Ok(e) if e.in_use => None,
            Ok(e) => match verdicts.get(&(e.table_offset, e.table_size)) {
                Some(v) => v.clone(),
                None => {
                    let v = table_problem(image, e)?;
                    verdicts.insert((e.table_offset, e.table_size), v.clone());
                    v
                }
            },
        };
        let table_past_end = problem.as_ref().is_some_and(|p| p.1);
        bitmaps.push(TriagedBitmap {
            entry,
            broken: problem.map(|p| p.0),
            table_past_end,
        });
    }
    Ok(Some(BitmapTriage {
        bitmaps,
        unreadable: framing.map(|c: Corruption| c.to_string()),
    }))
}

/// The tables of the entries whose fields read (at most the longest at each offset) must
/// fit in the file, as far as each lies in it: tables that overlap at shifted offsets would
/// each be read whole, a cost of entries × table instead of the file's (`image::check`
/// refuses them the same way). Triage reads only the tables of entries QEMU loads, but a
/// repair reads every entry's, in use or not (`repair.rs`, `owned_clusters`), and QEMU
/// gives an in-use table its own clusters too.
///
/// # Errors
/// [`Corruption::OverlappingTables`]; I/O reading the file's length.
fn ensure_tables_fit<S: Storage>(image: &Image<S>, entries: &[TriagedEntry]) -> Result<()> {
    let file = image.storage().len()?;
    let mut longest: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for e in entries.iter().filter_map(|t| t.verdict.as_ref().ok()) {
        let len = u64::from(e.table_size).saturating_mul(8);
        let l = longest.entry(e.table_offset).or_insert(0);
        *l = (*l).max(len);
    }
    crate::image::check::ensure_tables_fit("bitmap table", file, longest)
}

/// QEMU's `BDRV_MAX_LENGTH`: `INT64_MAX` aligned down to 1 GiB, the end no request may pass.
const QEMU_MAX_LENGTH: u64 = (1 << 63) - (1 << 30);

/// Why the table of `e` cannot be loaded, if it cannot, and whether that is because it
/// reaches past the end of the file (not past QEMU's largest request end), which QEMU
/// reads as zeros.
///
/// # Errors
/// [`Error::Io`] when the read fails (see [`image_problem`]).
fn table_problem<S: Storage>(
    image: &Image<S>,
    e: &crate::format::DirEntry,
) -> Result<Option<(String, bool)>> {
    let len = u64::from(e.table_size).saturating_mul(8);
    match read_metadata(image.storage(), "bitmap table", e.table_offset, len) {
        // QEMU reads a table past the end of the file as zeros, up to its largest request
        // end (`BDRV_MAX_LENGTH`); beyond that its read fails and it refuses the image.
        Err(err) => image_problem(err).map(|why| {
            let zeros = e
                .table_offset
                .checked_add(len)
                .is_some_and(|end| end <= QEMU_MAX_LENGTH);
            Some((why, zeros))
        }),
        Ok(bytes) => Ok(
            decode_table(&bytes, e.table_size, image.header().cluster_bits)
                .err()
                .map(|c| (c.to_string(), false)),
        ),
    }
}

/// A failed metadata read as a verdict on the image: the bounds check's
/// [`Error::Corrupt`] (the structure lies past the end of the file) is one; any other error
/// (I/O) is returned, since it says nothing about the bytes.
fn image_problem(e: Error) -> Result<String> {
    match e {
        e @ Error::Corrupt(_) => Ok(e.to_string()),
        e => Err(e),
    }
}
