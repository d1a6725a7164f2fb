//! The write-path fuzz harness: sequences of `BitmapStore` operations decoded from bytes.
//!
//! Shared by the fuzz targets `ops_crash` and `ops_guest_data` (`fuzz/fuzz_targets/`) and by
//! the corpus replay `tests/fuzz_ops_corpus.rs`, each of which includes this file with
//! `#[path]`, so the library itself carries no test harness. A panic is a finding: either
//! the library panicked or it broke an invariant spelled out by an `assert!` below.
//!
//! - [`ops_crash`]: a small bitmap-only image on a `CrashStorage`, driven through a random
//!   operation sequence and checked against a model after every operation, on the live
//!   image and on a sample of the images a crash inside the operation could leave.
//! - [`ops_guest_data`]: an arbitrary (fuzzed, seeded from QEMU-made) image with guest data,
//!   opened writable, driven through a short operation sequence; no byte of a cluster that
//!   holds guest data, an L1/L2 table or a snapshot table may change.
//!
//! See `docs/FUZZING.md` for the input formats.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use dirty_bitmap::storage::{CrashMode, CrashStorage, MemStorage, Op as LogOp};
use dirty_bitmap::{BitmapState, BitmapStore, DirtyBitmap, Error, OpenMode, Recording};

/// The recording mode an input's `enabled` bit asks for.
pub(crate) fn recording(enabled: bool) -> Recording {
    if enabled {
        Recording::Enabled
    } else {
        Recording::Disabled
    }
}

/// Bitmap names the operations pick from (by index).
pub(crate) const NAMES: [&str; 4] = ["a", "b", "c", "d"];
/// Most operations decoded from one `ops_crash` input.
const MAX_OPS: usize = 24;
/// Most operations decoded from one `ops_guest_data` input.
const MAX_GUEST_OPS: usize = 8;
/// Crash points checked per operation besides its last (spread over its crash points), each
/// in every crash mode.
const CRASH_SAMPLES: usize = 2;

// ---------------------------------------------------------------------------------------
// Input decoding
// ---------------------------------------------------------------------------------------

/// Reads bytes in order; every read past the end is 0.
pub(crate) struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.at >= self.data.len()
    }

    pub(crate) fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at = self.at.saturating_add(1);
        b
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
}

/// One operation. Names are indexes into [`NAMES`] (or, for [`ops_guest_data`], into the
/// image's own bitmaps followed by `NAMES`).
#[derive(Debug, Clone)]
enum Op {
    Add {
        name: usize,
        granularity: u64,
        enabled: bool,
    },
    Remove {
        name: usize,
    },
    /// Marks `[offset, offset + len)` (offset taken modulo the disk size) in one bitmap: the
    /// store's in-memory bitmap when active, the handle kept from the last activation when
    /// inactive (a `Tracker` keeps marking parked bitmaps).
    Mark {
        name: usize,
        offset: u64,
        len: u64,
    },
    Flush,
    Clear {
        name: usize,
    },
    Merge {
        src: usize,
        dst: usize,
    },
    SetEnabled {
        name: usize,
        enabled: bool,
    },
    /// To `sectors · 512` bytes, plus one byte when `odd` (refused).
    Resize {
        sectors: u64,
        odd: bool,
    },
    Activate,
    Inactivate,
    InactivateFullRewrite,
    /// `close`, then `BitmapStore::open` writable again.
    CloseReopen,
    /// Drops the store without closing (the process died), then opens again.
    AbandonReopen,
    /// `store` of a bitmap with these marks (offsets modulo the disk size); at twice the
    /// bitmap's granularity when `wrong_granularity` (refused).
    Store {
        name: usize,
        wrong_granularity: bool,
        marks: Vec<(u64, u64)>,
    },
    /// Marks `[offset, offset + len)` through a `Tracker` (taken from the store at the first
    /// such mark while active, kept until a reopen): every enabled in-memory bitmap, active
    /// or parked, including bitmaps added or loaded after the tracker was taken.
    TrackerMark {
        offset: u64,
        len: u64,
    },
}

fn decode_op(r: &mut Bytes) -> Op {
    let name = |r: &mut Bytes| usize::from(r.u8());
    let range = |r: &mut Bytes| (u64::from(r.u16()) * 64, u64::from(r.u16()) + 1);
    match r.u8() % 15 {
        0 => {
            let name = name(r);
            let b = r.u8();
            Op::Add {
                name,
                granularity: 512 << (b % 8),
                enabled: b & 0x80 == 0,
            }
        }
        1 => Op::Remove { name: name(r) },
        2 => {
            let name = name(r);
            let (offset, len) = range(r);
            Op::Mark { name, offset, len }
        }
        3 => Op::Flush,
        4 => Op::Clear { name: name(r) },
        5 => Op::Merge {
            src: name(r),
            dst: name(r),
        },
        6 => Op::SetEnabled {
            name: name(r),
            enabled: r.u8() & 1 == 1,
        },
        7 => {
            let v = r.u16();
            Op::Resize {
                sectors: u64::from(v & 0x7fff) % 8193,
                odd: v & 0x8000 != 0,
            }
        }
        8 => Op::Activate,
        9 => Op::Inactivate,
        10 => Op::InactivateFullRewrite,
        11 => Op::CloseReopen,
        12 => Op::AbandonReopen,
        13 => {
            let name = name(r);
            let b = r.u8();
            let marks = (0..b % 5).map(|_| range(r)).collect();
            Op::Store {
                name,
                wrong_granularity: b & 0x80 != 0,
                marks,
            }
        }
        _ => {
            let (offset, len) = range(r);
            Op::TrackerMark { offset, len }
        }
    }
}

fn decode_ops(r: &mut Bytes, max: usize) -> Vec<Op> {
    let mut ops = Vec::new();
    while !r.is_empty() && ops.len() < max {
        ops.push(decode_op(r));
    }
    ops
}

/// `(offset modulo size, len)`, or `None` on a 0-byte disk.
pub(crate) fn place(size: u64, offset: u64, len: u64) -> Option<(u64, u64)> {
    (size > 0).then(|| (offset % size, len))
}

/// The granules `[offset, offset + len)` touches on a disk of `size` bytes.
pub(crate) fn granules(size: u64, g: u64, offset: u64, len: u64) -> impl Iterator<Item = u64> {
    let end = offset.saturating_add(len).min(size);
    let (first, last) = if offset < end {
        (offset / g, (end - 1) / g + 1)
    } else {
        (0, 0)
    };
    first..last
}

// ---------------------------------------------------------------------------------------
// The model of `ops_crash`
// ---------------------------------------------------------------------------------------

/// What the model knows of one bitmap.
#[derive(Debug)]
struct Bm {
    name: String,
    granularity: u64,
    enabled: bool,
    /// False once the bitmap was left `in_use` by a store dropped while active.
    consistent: bool,
    /// Granules `load` must report dirty (a superset is fine).
    mem: BTreeSet<u64>,
    /// Granules the image on disk must hold whenever the bitmap reads as consistent there:
    /// every mark made before the last completed inactive copy-on-write operation, or before
    /// the last inactivate that started (the stricter rule of `tests/crash.rs`).
    req: BTreeSet<u64>,
    /// The in-memory bitmap of the last activation: authoritative while active, parked by
    /// an inactivate (marks through it still count), gone at reopen.
    handle: Option<Arc<DirtyBitmap>>,
    /// Added while the store was parking (inactive after an inactivate of an active store,
    /// with or without parked bitmaps): the store parks it too (a tracker marks
    /// it, `activate` resumes it), though this model holds no handle to it; gone at the
    /// next activation or reopen.
    parked_added: bool,
}

/// What a crash image (or the image on disk) must hold.
#[derive(Debug, Clone)]
struct Checkpoint {
    size: u64,
    /// `(name, granularity, granules)` of every bitmap with a requirement.
    req: Vec<(String, u64, BTreeSet<u64>)>,
    /// Every bitmap in the model, in directory order.
    names: Vec<String>,
    /// The model's inconsistent bitmaps (`in_use` on disk): only their removal changes
    /// that, so every image must list them inconsistent until then.
    inconsistent: Vec<String>,
}

impl Checkpoint {
    /// Whether the consistent bitmap `name`, loaded as `bm`, meets this checkpoint.
    fn met_by(&self, name: &str, bm: &DirtyBitmap) -> bool {
        match self.req.iter().find(|(n, _, _)| n == name) {
            None => true,
            Some((_, g, want)) => {
                bm.granularity() == *g
                    && want
                        .iter()
                        .all(|&i| i.saturating_mul(*g) >= bm.disk_size() || bm.is_dirty(i * g))
            }
        }
    }
}

#[derive(Debug, Default)]
struct Model {
    size: u64,
    active: bool,
    /// Inactive after an inactivate of an active store: trackers mark the published list,
    /// and an add parks the new bitmap whether or not any other is parked.
    parking: bool,
    /// In directory order.
    bms: Vec<Bm>,
}

/// A typed error an operation is expected to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    InvalidInput,
    WrongState,
    NotFound,
    Exists,
    Inconsistent,
}

impl Want {
    fn matches(self, e: &Error) -> bool {
        matches!(
            (self, e),
            (Want::InvalidInput, Error::InvalidInput(_))
                | (Want::WrongState, Error::WrongState(_))
                | (Want::NotFound, Error::NotFound { .. })
                | (Want::Exists, Error::Exists { .. })
                | (Want::Inconsistent, Error::Inconsistent { .. })
        )
    }
}

impl Model {
    fn find(&self, name: &str) -> Option<usize> {
        self.bms.iter().position(|b| b.name == name)
    }

    /// The bitmaps a removal of bitmap `i` must make all dirty, in directory order, by the
    /// rule of `docs/CRASH-CONSISTENCY.md` ("Commit"), modelled here apart from the code:
    /// every kept consistent bitmap, when the removed one is inconsistent (it may have held
    /// writes they lack) or is the one that records while no kept one records (the end of
    /// a chain: its writes would be in no kept bitmap).
    fn made_all_dirty(&self, i: usize) -> Vec<String> {
        let gone = &self.bms[i];
        let kept = || {
            self.bms
                .iter()
                .enumerate()
                .filter(move |&(j, _)| j != i)
                .map(|(_, b)| b)
        };
        let chain_ends =
            gone.consistent && gone.enabled && !kept().any(|b| b.consistent && b.enabled);
        if gone.consistent && !chain_ends {
            return Vec::new();
        }
        kept()
            .filter(|b| b.consistent)
            .map(|b| b.name.clone())
            .collect()
    }

    /// `NotFound` or `Inconsistent` for a bitmap that must exist and be consistent.
    fn usable(&self, name: &str) -> Result<usize, Want> {
        let i = self.find(name).ok_or(Want::NotFound)?;
        if self.bms[i].consistent {
            Ok(i)
        } else {
            Err(Want::Inconsistent)
        }
    }

    fn parked(&self) -> bool {
        !self.active && self.parking
    }

    /// Whether the store keeps parked bitmaps (which a resize refuses).
    fn holds_parked(&self) -> bool {
        self.parked()
            && self
                .bms
                .iter()
                .any(|b| b.handle.is_some() || b.parked_added)
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            size: self.size,
            req: self
                .bms
                .iter()
                .filter(|b| b.consistent)
                .map(|b| (b.name.clone(), b.granularity, b.req.clone()))
                .collect(),
            names: self.bms.iter().map(|b| b.name.clone()).collect(),
            inconsistent: self
                .bms
                .iter()
                .filter(|b| !b.consistent)
                .map(|b| b.name.clone())
                .collect(),
        }
    }

    /// From the start of an inactivate every mark made before it is required of a bitmap
    /// that reads as consistent.
    fn promote(&mut self) {
        if self.active {
            for b in self.bms.iter_mut().filter(|b| b.consistent) {
                b.req = b.mem.clone();
            }
        }
    }

    /// A reopen: parked marks and handles are gone; bitmaps the dropped store held active
    /// are `in_use` on disk, so inconsistent, when `abandoned`.
    fn reopened(&mut self, abandoned: bool) {
        for b in &mut self.bms {
            if abandoned && self.active && b.consistent {
                b.consistent = false;
            }
            b.handle = None;
            b.parked_added = false;
            if b.consistent {
                b.mem = b.req.clone();
            } else {
                b.mem.clear();
                b.req.clear();
            }
        }
        self.active = false;
        self.parking = false;
    }
}

/// Which write opens an operation's leak window (`docs/CRASH-CONSISTENCY.md`, "Leak
/// windows"; the same classification as `tests/crash.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opens {
    Never,
    RefcountWrite,
    RefcountOrHeaderWrite,
}

fn leak_window(op: &Op) -> Opens {
    match op {
        Op::Activate | Op::Mark { .. } | Op::TrackerMark { .. } | Op::AbandonReopen => Opens::Never,
        // The incremental stop writes the directory's flags in place and no cluster 0: it
        // leaves autoclear bit 0 set, so only its flush part's refcounts may leak.
        Op::Inactivate | Op::CloseReopen => Opens::RefcountWrite,
        Op::InactivateFullRewrite | Op::Resize { .. } => Opens::RefcountOrHeaderWrite,
        // Removing the last bitmap allocates no directory, so nothing is written before
        // the commit's header write, after which the old table and data leak until they are
        // freed (step 5 of the commit table). The leak-window table names only the refcount
        // write; with bitmaps left a new directory's refcounts always come first, so this
        // is the same window there. (Finding `remove-last-leaks-at-header-write`.)
        Op::Remove { .. } => Opens::RefcountOrHeaderWrite,
        _ => Opens::RefcountWrite,
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap_or([0; 4])))
}

fn be16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_be_bytes(s.try_into().unwrap_or([0; 2])))
}

/// Cluster indexes of the reftable and the refcount blocks an image names.
fn refcount_clusters(image: &[u8]) -> HashSet<u64> {
    let cb = be32(image, 20);
    let mut out = HashSet::new();
    if !(9..=21).contains(&cb) {
        return out;
    }
    let (rt, n) = (be64(image, 48), u64::from(be32(image, 56)));
    let first = rt >> cb;
    out.extend(first..first + n);
    for k in 0..(n << cb) / 8 {
        let e = be64(image, (rt + 8 * k) as usize) & !511;
        if e != 0 {
            out.insert(e >> cb);
        }
    }
    out
}

fn is_header_write(op: &LogOp) -> bool {
    matches!(op, LogOp::Write { offset: 0, data } if data.len() >= 104)
}

fn is_refcount_write(op: &LogOp, cb: u32, clusters: &HashSet<u64>) -> bool {
    let LogOp::Write { offset, data } = op else {
        return false;
    };
    if *offset == 48 && data.len() == 12 {
        return true;
    }
    let first = offset >> cb;
    let last = (offset + data.len() as u64 - 1) >> cb;
    (first..=last).any(|c| clusters.contains(&c))
}

struct Crash<'a> {
    crash: &'a CrashStorage,
    store: Option<BitmapStore<&'a CrashStorage>>,
    model: Model,
    cluster_bits: u32,
    seed: u64,
    /// Whether the current operation was refused with the expected typed error.
    refused: bool,
    /// The tracker taken by the first `TrackerMark` while active; dropped at a reopen.
    tracker: Option<dirty_bitmap::Tracker>,
}

/// Checks an operation's result against the model's expectation. `Ok(Some(value))` when
/// both say it succeeds, `Ok(None)` when both agree on the error; a mismatch is a finding.
fn expect<T>(ctx: &str, want: Result<(), Want>, got: dirty_bitmap::Result<T>) -> Option<T> {
    match (want, got) {
        (Ok(()), Ok(v)) => Some(v),
        (Err(w), Err(e)) if w.matches(&e) => None,
        (Ok(()), Err(e)) => panic!("{ctx}: unexpected error {e:?}"),
        (Err(w), Err(e)) => panic!("{ctx}: expected {w:?}, got {e:?}"),
        (Err(w), Ok(_)) => panic!("{ctx}: expected {w:?}, got success"),
    }
}

impl<'a> Crash<'a> {
    fn store(&mut self) -> &mut BitmapStore<&'a CrashStorage> {
        self.store.as_mut().expect("the store is open")
    }

    fn name(i: usize) -> &'static str {
        NAMES[i % NAMES.len()]
    }

    /// [`expect`], remembering a refusal (which must write nothing).
    fn expect<T>(
        &mut self,
        ctx: &str,
        want: Result<(), Want>,
        got: dirty_bitmap::Result<T>,
    ) -> Option<T> {
        let r = expect(ctx, want, got);
        self.refused |= r.is_none();
        r
    }

    /// The model's bitmap `name`, which the caller knows exists.
    fn bm(&mut self, name: &str) -> &mut Bm {
        let i = self.model.find(name).expect("the bitmap is in the model");
        &mut self.model.bms[i]
    }

    /// Runs `op`, checks its result against the model and updates the model.
    fn run(&mut self, ctx: &str, op: &Op) {
        let size = self.model.size;
        let active = self.model.active;
        match *op {
            Op::Add {
                name,
                granularity,
                enabled,
            } => {
                let n = Self::name(name);
                let want = if self.model.find(n).is_some() {
                    Err(Want::Exists)
                } else if size == 0 {
                    Err(Want::InvalidInput)
                } else {
                    Ok(())
                };
                let got = self.store().add(n, granularity, recording(enabled));
                if self.expect(ctx, want, got).is_some() {
                    let handle = if active {
                        Some(self.store().bitmap(n).expect("an added bitmap is active"))
                    } else {
                        None
                    };
                    // Parked only while a tracker may mark it.
                    let parked_added = self.model.parked() && self.tracker.is_some();
                    self.model.bms.push(Bm {
                        name: n.to_string(),
                        granularity,
                        enabled,
                        consistent: true,
                        mem: BTreeSet::new(),
                        req: BTreeSet::new(),
                        handle,
                        parked_added,
                    });
                }
            }
            Op::Remove { name } => {
                let n = Self::name(name);
                let found = self.model.find(n);
                let want = found.map(|_| ()).ok_or(Want::NotFound);
                let all_dirty = found.map_or_else(Vec::new, |i| self.model.made_all_dirty(i));
                let got = self.store().remove(n);
                if let Some(made) = self.expect(ctx, want, got) {
                    let made: Vec<&str> = made
                        .iter()
                        .map(|m| m.to_str().unwrap_or_default())
                        .collect();
                    assert_eq!(
                        made, all_dirty,
                        "{ctx}: made all dirty by the removal of {n}"
                    );
                    self.model.bms.retain(|b| b.name != n);
                    for b in &mut self.model.bms {
                        if all_dirty.contains(&b.name) {
                            b.mem.extend(granules(size, b.granularity, 0, size));
                            b.req.extend(granules(size, b.granularity, 0, size));
                        }
                    }
                }
            }
            Op::Mark { name, offset, len } => {
                let n = Self::name(name);
                let Some((offset, len)) = place(size, offset, len) else {
                    return;
                };
                let usable = self.model.usable(n);
                let kept = usable.ok().and_then(|i| self.model.bms[i].handle.clone());
                let handle = if active {
                    let got = self.store().bitmap(n);
                    let Some(h) = self.expect(ctx, usable.map(|_| ()), got) else {
                        return;
                    };
                    if let Some(kept) = &kept {
                        assert!(
                            Arc::ptr_eq(kept, &h),
                            "{ctx}: the active bitmap is not the one activate handed out"
                        );
                    }
                    h
                } else if let Some(h) = kept {
                    // Parked: a Tracker or handle from the last activation still marks it.
                    h
                } else {
                    let want = Err(usable.err().unwrap_or(Want::WrongState));
                    let got = self.store().bitmap(n);
                    self.expect(ctx, want, got);
                    return;
                };
                handle.mark_dirty(offset, len);
                let b = self.bm(n);
                if b.enabled {
                    let g = b.granularity;
                    b.mem.extend(granules(size, g, offset, len));
                }
            }
            Op::Flush => {
                let want = if active {
                    Ok(())
                } else {
                    Err(Want::WrongState)
                };
                let got = self.store().flush();
                self.expect(ctx, want, got);
            }
            Op::Clear { name } => {
                let n = Self::name(name);
                let want = self.model.usable(n).map(|_| ());
                let got = self.store().clear(n);
                if self.expect(ctx, want, got).is_some() {
                    let b = self.bm(n);
                    b.mem.clear();
                    if !active {
                        b.req.clear();
                    }
                }
            }
            Op::Merge { src, dst } => {
                let (s, d) = (Self::name(src), Self::name(dst));
                let want = self
                    .model
                    .usable(s)
                    .and_then(|_| self.model.usable(d))
                    .map(|_| ());
                let got = self.store().merge(s, d);
                if self.expect(ctx, want, got).is_some() {
                    let (gs, src_bits) = {
                        let b = self.bm(s);
                        (b.granularity, b.mem.clone())
                    };
                    let b = self.bm(d);
                    let gd = b.granularity;
                    let conv: BTreeSet<u64> = src_bits
                        .iter()
                        .flat_map(|&i| granules(size, gd, i * gs, gs))
                        .collect();
                    b.mem.extend(&conv);
                    if !active {
                        b.req.extend(&conv);
                    }
                }
            }
            Op::SetEnabled { name, enabled } => {
                let n = Self::name(name);
                let want = self.model.usable(n).map(|_| ());
                let got = self.store().set_enabled(n, enabled);
                if self.expect(ctx, want, got).is_some() {
                    self.bm(n).enabled = enabled;
                }
            }
            Op::Resize { sectors, odd } => {
                let new = sectors * 512 + u64::from(odd);
                let m = &self.model;
                let want = if active || m.holds_parked() {
                    Err(Want::WrongState)
                } else if odd {
                    Err(Want::InvalidInput)
                } else if m.bms.iter().any(|b| !b.consistent) {
                    Err(Want::Inconsistent)
                } else if new == 0 && new != size && !m.bms.is_empty() {
                    Err(Want::InvalidInput)
                } else {
                    Ok(())
                };
                let got = self.store().resize(new);
                if self.expect(ctx, want, got).is_some() {
                    let old = self.model.size;
                    self.model.size = new;
                    for b in &mut self.model.bms {
                        let g = b.granularity;
                        b.mem.retain(|&i| i * g < new);
                        b.req.retain(|&i| i * g < new);
                        // A grown area is dirty, from the granule straddling the old end
                        // on (it may have been inside the disk before a shrink).
                        if new > old {
                            let grown: Vec<u64> = granules(new, g, old, new - old).collect();
                            b.mem.extend(&grown);
                            b.req.extend(&grown);
                        }
                    }
                }
            }
            Op::Activate => {
                let got = self.store().activate();
                self.expect(ctx, Ok(()), got);
                if !active {
                    self.model.active = true;
                    self.model.parking = false;
                    for i in 0..self.model.bms.len() {
                        self.model.bms[i].parked_added = false;
                        if !self.model.bms[i].consistent {
                            continue;
                        }
                        let n = self.model.bms[i].name.clone();
                        let h = self
                            .store()
                            .bitmap(&n)
                            .unwrap_or_else(|e| panic!("{ctx}: bitmap({n}) after activate: {e}"));
                        if let Some(kept) = &self.model.bms[i].handle {
                            assert!(
                                Arc::ptr_eq(kept, &h),
                                "{ctx}: activate did not resume the parked bitmap {n}"
                            );
                        }
                        self.model.bms[i].handle = Some(h);
                    }
                }
            }
            Op::Inactivate => {
                let got = self.store().inactivate();
                self.expect(ctx, Ok(()), got);
                self.model.parking |= active;
                self.model.active = false;
            }
            Op::InactivateFullRewrite => {
                let got = self.store().inactivate_full_rewrite();
                self.expect(ctx, Ok(()), got);
                self.model.parking |= active;
                self.model.active = false;
            }
            Op::CloseReopen => {
                let store = self.store.take().expect("the store is open");
                let got = store.close();
                self.expect(ctx, Ok(()), got);
                self.store = Some(
                    BitmapStore::open(self.crash, OpenMode::ReadWrite)
                        .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}")),
                );
                self.model.reopened(false);
                self.tracker = None;
            }
            Op::AbandonReopen => {
                drop(self.store.take());
                self.store = Some(
                    BitmapStore::open(self.crash, OpenMode::ReadWrite)
                        .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}")),
                );
                self.model.reopened(true);
                self.tracker = None;
            }
            Op::TrackerMark { offset, len } => {
                let Some((offset, len)) = place(size, offset, len) else {
                    return;
                };
                if self.tracker.is_none() {
                    let want = if active {
                        Ok(())
                    } else {
                        Err(Want::WrongState)
                    };
                    let got = self.store().tracker();
                    self.tracker = self.expect(ctx, want, got);
                }
                let Some(t) = &self.tracker else {
                    return;
                };
                t.mark(offset, len);
                // Every bitmap with an in-memory copy (active or parked) that is enabled.
                for b in self.model.bms.iter_mut() {
                    if (b.handle.is_some() || b.parked_added) && b.enabled {
                        let g = b.granularity;
                        b.mem.extend(granules(size, g, offset, len));
                    }
                }
            }
            Op::Store {
                name,
                wrong_granularity,
                ref marks,
            } => {
                let n = Self::name(name);
                if size == 0 {
                    return;
                }
                let usable = self.model.usable(n);
                let g = usable
                    .map_or(4096, |i| self.model.bms[i].granularity)
                    .saturating_mul(if wrong_granularity { 2 } else { 1 });
                let bm = DirtyBitmap::new(size, g).expect("a valid bitmap");
                let mut bits = BTreeSet::new();
                for &(o, l) in marks {
                    let (o, l) = place(size, o, l).expect("a non-empty disk");
                    bm.mark_dirty(o, l);
                    bits.extend(granules(size, g, o, l));
                }
                let want = match usable {
                    Err(w) => Err(w),
                    Ok(_) if wrong_granularity => Err(Want::InvalidInput),
                    Ok(_) => Ok(()),
                };
                let got = self.store().store(n, &bm);
                if self.expect(ctx, want, got).is_some() {
                    let b = self.bm(n);
                    if active {
                        b.mem.extend(bits);
                    } else if b.handle.is_some() || b.parked_added {
                        // Parked: ORed into the parked copy, which is written whole.
                        b.mem.extend(bits);
                        b.req = b.mem.clone();
                    } else {
                        // Replaced: the disk holds exactly the stored bits.
                        b.mem = bits.clone();
                        b.req = bits;
                    }
                }
            }
        }
    }

    /// One step: the operation, its crash images, the image as of the last barrier.
    fn step(&mut self, index: usize, op: &Op) {
        let ctx = format!("op {index} {op:?}");
        let start_live = self.crash.live_image();
        if matches!(
            op,
            Op::Inactivate | Op::InactivateFullRewrite | Op::CloseReopen
        ) {
            self.model.promote();
        }
        let before = self.model.checkpoint();
        let start = self.crash.op_count();
        self.refused = false;
        self.run(&ctx, op);
        let end = self.crash.op_count();
        if self.refused {
            assert_eq!(start, end, "{ctx}: a refused operation wrote");
        }
        let after = self.model.checkpoint();
        self.check_crash_points(&ctx, index, op, start, end, &start_live, &before, &after);
        self.check_live(&ctx);
    }

    /// A sample of the crash points inside `[start, end]` of the log: each crash image must
    /// open, have no corruption, leak only inside the operation's leak window, list every
    /// bitmap the model holds both before and after the operation, list every bitmap the
    /// model holds inconsistent as inconsistent (absent only when the operation is its
    /// removal), and every consistent bitmap must meet `before`, or `after` once the
    /// operation's last header write was issued.
    #[allow(clippy::too_many_arguments)]
    fn check_crash_points(
        &mut self,
        ctx: &str,
        index: usize,
        op: &Op,
        start: usize,
        end: usize,
        start_live: &[u8],
        before: &Checkpoint,
        after: &Checkpoint,
    ) {
        if end == start {
            return;
        }
        let ops = self.crash.ops();
        let mut layout = refcount_clusters(start_live);
        layout.extend(refcount_clusters(&self.crash.live_image()));
        let cb = self.cluster_bits;
        let first_refcount = (start..end).find(|&j| is_refcount_write(&ops[j], cb, &layout));
        let headers: Vec<usize> = (start..end).filter(|&j| is_header_write(&ops[j])).collect();
        let open = match leak_window(op) {
            Opens::Never => None,
            Opens::RefcountWrite => first_refcount,
            Opens::RefcountOrHeaderWrite => match (first_refcount, headers.first().copied()) {
                (Some(r), Some(h)) => Some(r.min(h)),
                (r, h) => r.or(h),
            },
        };
        let points: Vec<usize> = self
            .crash
            .crash_points()
            .into_iter()
            .filter(|&p| p > start && p <= end)
            .collect();
        let n = points.len();
        let salt = self.seed.wrapping_add(index as u64);
        let picks: Vec<usize> = if n <= CRASH_SAMPLES {
            points
        } else {
            // Evenly spread, shifted by the seed, always including the last point.
            (0..CRASH_SAMPLES)
                .map(|k| points[(k * n / CRASH_SAMPLES + salt as usize) % n])
                .chain(std::iter::once(points[n - 1]))
                .collect()
        };
        // Each point in every mode; right after a barrier the three are one image.
        let modes = |p: usize| {
            let synced = matches!(ops.get(p.wrapping_sub(1)), Some(LogOp::Sync));
            let all = [
                CrashMode::Dropped,
                CrashMode::Kept,
                CrashMode::Torn {
                    seed: salt ^ p as u64,
                },
            ];
            all.into_iter().take(if synced { 1 } else { 3 })
        };
        for (p, mode) in picks.iter().flat_map(|&p| modes(p).map(move |m| (p, m))) {
            let cctx = format!("{ctx}: crash after log op {p} ({start}..{end}), {mode:?}");
            let image = self
                .crash
                .crash_image(p, mode)
                .expect("a valid crash point");
            // A torn first add or removal of the last bitmap too (`Image::put_header`).
            let s = BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("{cctx}: the crash image does not open: {e}"));
            let r = s.image().check().expect("check runs");
            assert_eq!(r.corruptions, 0, "{cctx}: corrupt: {:?}", r.messages);
            if r.leaks > 0 {
                assert!(
                    open.is_some_and(|o| o < p) && p < end,
                    "{cctx}: {} leaked clusters outside the leak window (opens at {open:?}): {:?}",
                    r.leaks,
                    r.messages
                );
            }
            let size = s.disk_size();
            let committed = headers.first().is_some_and(|&h| h < p);
            let trusted = headers.last().is_some_and(|&h| h < p);
            assert!(
                size == before.size || (committed && size == after.size),
                "{cctx}: disk size {size}, expected {} or (after the commit) {}",
                before.size,
                after.size
            );
            let listed = s.list();
            let state = |name: &str| {
                listed
                    .iter()
                    .find(|i| i.name.to_str() == Some(name))
                    .map(|i| i.state)
            };
            // A bitmap the operation neither added nor removed is in every image: a
            // missing one would be a tracked disk's history lost.
            for name in before.names.iter().filter(|n| after.names.contains(n)) {
                assert!(
                    state(name).is_some(),
                    "{cctx}: {name} is missing though the operation keeps it; lists {:?}",
                    listed.iter().map(|i| &i.name).collect::<Vec<_>>()
                );
            }
            for info in &listed {
                let name = info.name.to_str().unwrap_or_default();
                assert!(
                    before.names.iter().chain(&after.names).any(|n| n == name),
                    "{cctx}: {:?} is listed though the model holds it neither before nor after",
                    info.name
                );
            }
            // An inconsistent bitmap (`in_use` on disk) stays inconsistent until removed:
            // reading consistent it would be trusted with bits no one kept (a false clean
            // that no requirement below would catch, as the model requires nothing of it).
            for name in &before.inconsistent {
                let removed = matches!(*op, Op::Remove { name: i } if Self::name(i) == name);
                match state(name) {
                    Some(BitmapState::Inconsistent) => {}
                    None if removed => {}
                    got => panic!(
                        "{cctx}: {name}, inconsistent in the model, reads {got:?} (None: absent)"
                    ),
                }
            }
            for info in listed {
                if info.state == BitmapState::Inconsistent {
                    continue;
                }
                let bm = s
                    .load(&info.name)
                    .unwrap_or_else(|e| panic!("{cctx}: load {}: {e}", info.name));
                let old = size == before.size
                    && before.met_by(info.name.to_str().unwrap_or_default(), &bm);
                let new = trusted
                    && size == after.size
                    && after.met_by(info.name.to_str().unwrap_or_default(), &bm);
                assert!(
                    old || new,
                    "{cctx}: false clean: {} (granularity {}) lacks required bits; before {:?}, after {:?}, has {:?}",
                    info.name,
                    bm.granularity(),
                    before.req.iter().find(|r| r.0 == info.name),
                    after.req.iter().find(|r| r.0 == info.name),
                    bm.dirty_extents().collect::<Vec<_>>()
                );
            }
        }
    }

    /// After every operation: the live store agrees with the model and loads every bit the
    /// model holds; the image as of the last barrier opens, is clean (no corruption, no leak), has the
    /// model's size, holds every required bit in each consistent bitmap, and while active
    /// shows every bitmap inconsistent.
    fn check_live(&mut self, ctx: &str) {
        let store = self.store.as_ref().expect("the store is open");
        let list = store.list();
        let names: Vec<&str> = list
            .iter()
            .map(|i| i.name.to_str().unwrap_or_default())
            .collect();
        let want: Vec<&str> = self.model.bms.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, want, "{ctx}: bitmaps");
        assert_eq!(store.disk_size(), self.model.size, "{ctx}: disk size");
        assert_eq!(store.is_active(), self.model.active, "{ctx}: active");
        for (info, b) in list.iter().zip(&self.model.bms) {
            let state = if b.consistent {
                BitmapState::Consistent
            } else {
                BitmapState::Inconsistent
            };
            assert_eq!(info.state, state, "{ctx}: {}", b.name);
            assert_eq!(info.granularity, b.granularity, "{ctx}: {}", b.name);
            if !b.consistent {
                assert!(
                    matches!(store.load(&b.name), Err(Error::Inconsistent { .. })),
                    "{ctx}: {} loads though inconsistent",
                    b.name
                );
                continue;
            }
            assert_eq!(info.enabled, b.enabled, "{ctx}: {} enabled", b.name);
            let bm = store
                .load(&b.name)
                .unwrap_or_else(|e| panic!("{ctx}: load {}: {e}", b.name));
            let g = b.granularity;
            if let Some(i) = b.mem.iter().find(|&&i| !bm.is_dirty(i * g)) {
                panic!(
                    "{ctx}: {} reads granule {i} (offset {}) clean; the model marked it",
                    b.name,
                    i * g
                );
            }
        }
        // The image as of the last barrier: an operation that returned made what it
        // promises durable (a write still in the page cache is not on the disk a crash
        // leaves).
        let disk = BitmapStore::open(
            MemStorage::from_bytes(self.crash.durable_image()),
            OpenMode::ReadOnly,
        )
        .unwrap_or_else(|e| panic!("{ctx}: the durable image does not open: {e}"));
        let r = disk.image().check().expect("check runs");
        assert!(
            r.is_clean(),
            "{ctx}: durable image not clean: {:?}",
            r.messages
        );
        assert_eq!(
            disk.disk_size(),
            self.model.size,
            "{ctx}: disk size on disk"
        );
        let required = self.model.checkpoint();
        let on_disk = disk.list();
        let names: Vec<&str> = on_disk
            .iter()
            .map(|i| i.name.to_str().unwrap_or_default())
            .collect();
        assert_eq!(names, want, "{ctx}: bitmaps on disk");
        for (info, b) in on_disk.iter().zip(&self.model.bms) {
            // Active: every bitmap is `in_use` on disk. Inactive: exactly the model's
            // consistent bitmaps read as consistent (what an inactivate or close promises).
            let consistent = b.consistent && !self.model.active;
            assert_eq!(
                info.state == BitmapState::Consistent,
                consistent,
                "{ctx}: {} is {:?} on disk",
                info.name,
                info.state
            );
            if !consistent {
                continue;
            }
            let bm = disk
                .load(&info.name)
                .unwrap_or_else(|e| panic!("{ctx}: load {} from disk: {e}", info.name));
            assert!(
                required.met_by(info.name.to_str().unwrap_or_default(), &bm),
                "{ctx}: false clean on disk: {} lacks required bits",
                info.name
            );
        }
    }
}

/// Fuzz target `ops_crash`. Input: cluster size `512 << (b0 % 4)`, disk size
/// `(u16 BE % 8192 + 1) · 512` (up to 4 MiB), a sampling seed byte, then operations (see
/// [`decode_op`]), at most [`MAX_OPS`].
///
/// The image is created on a `MemStorage` (create's own crash points are
/// `tests/crash.rs`'s) and becomes the durable base of a `CrashStorage`. After every
/// operation:
/// - its result is the model's: success, or the typed refusal the API documents, which
///   writes nothing;
/// - the live store lists what the model lists and `load` holds every bit the model
///   marked (`Crash::check_live`), and the image on disk is clean;
/// - at up to [`CRASH_SAMPLES`] + 1 crash points inside the operation, the crash images
///   (unsynced writes dropped, kept, torn) open read-only, show no corruption, leak only inside the operation's leak window,
///   list every bitmap the operation keeps and each the model holds inconsistent as
///   inconsistent, and every consistent bitmap in them holds every required bit: those of the last
///   completed inactive operation or of the last inactivate that started, or, once the
///   operation's header write was issued, its result (`Crash::check_crash_points`).
pub fn ops_crash(data: &[u8]) {
    let mut r = Bytes::new(data);
    let cs = 512u64 << (r.u8() % 4);
    let size = (u64::from(r.u16()) % 8192 + 1) * 512;
    let seed = u64::from(r.u8());
    let ops = decode_ops(&mut r, MAX_OPS);
    let base = BitmapStore::create(MemStorage::new(), size, cs)
        .expect("create")
        .image()
        .storage()
        .to_vec();
    let crash = CrashStorage::from_bytes(base);
    let store = BitmapStore::open(&crash, OpenMode::ReadWrite).expect("open the created image");
    let mut h = Crash {
        crash: &crash,
        store: Some(store),
        model: Model {
            size,
            ..Model::default()
        },
        cluster_bits: cs.trailing_zeros(),
        seed,
        refused: false,
        tracker: None,
    };
    for (i, op) in ops.iter().enumerate() {
        h.step(i, op);
    }
}

// ---------------------------------------------------------------------------------------
// ops_guest_data
// ---------------------------------------------------------------------------------------

/// Most bytes of bitmap the `ops_guest_data` harness lets an image make it hold in memory
/// (libFuzzer's `-malloc_limit_mb=512` would otherwise report the library's documented
/// 16 GiB activation limit as an out-of-memory).
const GUEST_MEMORY_LIMIT: u64 = 64 << 20;

/// Byte ranges of an image that belong to the guest: the active L1 table, every L2 table
/// it names and every cluster (or compressed run) those name; the snapshot table, and each
/// snapshot's L1 table, L2 tables and clusters, up to the first entry QEMU would refuse.
/// Walked from the raw bytes, independently of the library. Ranges are clipped to the file.
pub fn guest_ranges(img: &[u8]) -> (u32, Vec<(u64, u64)>) {
    let len = img.len() as u64;
    let mut out = Vec::new();
    if img.len() < 72 || img[..4] != *b"QFI\xfb" {
        return (0, out);
    }
    let cb = be32(img, 20);
    if !(9..=21).contains(&cb) {
        return (0, out);
    }
    let cs = 1u64 << cb;
    let version = be32(img, 4);
    let incompat = if version >= 3 { be64(img, 72) } else { 0 };
    let data_file = incompat & (1 << 2) != 0;
    let extl2 = incompat & (1 << 4) != 0;
    let clip = |off: u64, n: u64, out: &mut Vec<(u64, u64)>| {
        if off < len && n > 0 {
            out.push((off, n.min(len - off)));
        }
    };
    let mut l2_seen = HashSet::new();
    let mut walk_l1 = |l1_off: u64, l1_size: u64, out: &mut Vec<(u64, u64)>| {
        let l1_len = l1_size.saturating_mul(8);
        if l1_off >= len || l1_len > len {
            return;
        }
        clip(l1_off, l1_len, out);
        for k in 0..l1_size {
            let l2 = be64(img, (l1_off + 8 * k) as usize) & 0x00ff_ffff_ffff_fe00;
            if l2 == 0 || l2 >= len || !l2_seen.insert(l2) {
                continue;
            }
            clip(l2, cs, out);
            let entry_len = if extl2 { 16 } else { 8 };
            for e in 0..cs / entry_len {
                let at = l2 + e * entry_len;
                if at + 8 > len {
                    break;
                }
                let v = be64(img, at as usize);
                if v & (1 << 62) != 0 {
                    // Compressed: offset in the low x bits, then (sectors - 1).
                    let x = 62 - (cb - 8);
                    let off = v & ((1u64 << x) - 1);
                    let sectors = ((v >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
                    let end = (off & !511).saturating_add(sectors * 512);
                    clip(off, end.saturating_sub(off), out);
                } else if !data_file {
                    let off = v & 0x00ff_ffff_ffff_fe00;
                    if off != 0 {
                        clip(off, cs, out);
                    }
                }
            }
        }
    };
    walk_l1(be64(img, 40), u64::from(be32(img, 36)), &mut out);
    let (nb, mut at) = (be32(img, 60), be64(img, 64));
    for _ in 0..nb {
        if at.saturating_add(40) > len {
            break;
        }
        let a = at as usize;
        let extra = u64::from(be32(img, a + 36));
        let entry = 40 + extra + u64::from(be16(img, a + 12)) + u64::from(be16(img, a + 14));
        let entry = entry.div_ceil(8) * 8;
        // QEMU refuses a snapshot table whose entry has more than 1 KiB of extra data
        // (`QCOW_MAX_SNAPSHOT_EXTRA_DATA`) or runs off the file: the rest is not a table.
        if extra > 1024 || at + entry > len {
            break;
        }
        clip(at, entry, &mut out);
        walk_l1(be64(img, a), u64::from(be32(img, a + 8)), &mut out);
        at = at.saturating_add(entry);
    }
    (cb, out)
}

/// What the bitmaps extension of `img` makes of cluster `c` (directory, a table, a data
/// cluster), for the message of a finding.
fn bitmap_owners(img: &[u8], c: u64) -> Vec<String> {
    let cb = be32(img, 20);
    let mut out = Vec::new();
    let covers = |off: u64, len: u64| len > 0 && off >> cb <= c && c <= (off + len - 1) >> cb;
    let mut at = be32(img, 100) as usize;
    while at + 8 <= img.len().min(1 << cb) {
        let (kind, len) = (be32(img, at), be32(img, at + 4) as usize);
        if kind == 0 {
            break;
        }
        if kind == 0x2385_2875 {
            let (dsize, doff) = (be64(img, at + 16), be64(img, at + 24));
            if covers(doff, dsize) {
                out.push("the bitmap directory".to_string());
            }
            let mut p = doff as usize;
            while (p as u64) < doff.saturating_add(dsize) && p + 24 <= img.len() {
                let (toff, tsize) = (be64(img, p), u64::from(be32(img, p + 8)));
                let (nsize, esize) = (usize::from(be16(img, p + 18)), be32(img, p + 20) as usize);
                let name = img
                    .get(p + 24 + esize..p + 24 + esize + nsize)
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                if covers(toff, tsize * 8) {
                    out.push(format!("the table of bitmap {name:?}"));
                }
                for k in 0..tsize.min(img.len() as u64 / 8) {
                    let e = be64(img, (toff + 8 * k) as usize) & !511;
                    if e != 0 && covers(e, 1) {
                        out.push(format!("data cluster {k} of bitmap {name:?}"));
                    }
                }
                p += (24 + esize + nsize).div_ceil(8) * 8;
            }
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    out
}

/// The refcount of cluster `c` as the image's own refcount table and blocks say (0 where
/// none covers it), read independently of the library.
fn refcount(img: &[u8], c: u64) -> u64 {
    let cb = be32(img, 20);
    let order = if be32(img, 4) >= 3 { be32(img, 96) } else { 4 };
    if !(9..=21).contains(&cb) || order > 6 {
        return 0;
    }
    let per_block = ((1u64 << cb) * 8) >> order;
    let (rt, rt_clusters) = (be64(img, 48), u64::from(be32(img, 56)));
    let index = c / per_block;
    if index >= (rt_clusters << cb) / 8 {
        return 0;
    }
    let block = be64(img, (rt + 8 * index) as usize) & !511;
    if block == 0 {
        return 0;
    }
    let slot = c % per_block;
    let bits = 1u64 << order;
    if bits < 8 {
        let byte = img
            .get((block + slot * bits / 8) as usize)
            .copied()
            .unwrap_or(0);
        u64::from(byte >> (slot * bits % 8)) & ((1 << bits) - 1)
    } else {
        let at = (block + slot * bits / 8) as usize;
        match bits {
            8 => u64::from(img.get(at).copied().unwrap_or(0)),
            16 => u64::from(be16(img, at)),
            32 => u64::from(be32(img, at)),
            _ => be64(img, at),
        }
    }
}

/// Fuzz target `ops_guest_data`. Input: an image, then up to 255 operation bytes, then
/// one byte giving how many operation bytes precede it (so the image is a prefix and the
/// operations its tail).
///
/// The image is opened writable with `BitmapStore::open` on a `MemStorage` and driven
/// through at most [`MAX_GUEST_OPS`] operations; names pick among the image's bitmaps and
/// [`NAMES`]. Any error is allowed except `Error::Io` (every read is checked against the
/// file length first), and a refused open or operation must have written nothing (no I/O
/// fails here, so a refusal that wrote wrote before it refused). Afterwards no cluster of
/// [`guest_ranges`] with a refcount may have a lower one (a guest cluster freed or
/// decremented: the library only ever changes the refcounts of its own clusters), the
/// image may hold no more corruptions by this crate's check than it did, and no byte of
/// [`guest_ranges`] may have changed, except in
/// cluster 0 and the refcount structures the header names (the library rewrites those; a
/// guest cluster that is also one of them is a corruption QEMU's overlap checks catch), and
/// in clusters whose refcount is 0 (a reference without a refcount: any allocator, QEMU's
/// included, may hand such a cluster out; `qemu-img check` reports it as corruption).
pub fn ops_guest_data(data: &[u8]) {
    let _ = guest_data_ops_run(data);
}

/// [`ops_guest_data`], returning how many operations succeeded: 0 when the input holds no
/// image the store opens, or the store refused every operation, so that a replay can tell
/// a corpus that checks something from one every input of which is refused.
pub fn guest_data_ops_run(data: &[u8]) -> usize {
    let Some((&n, rest)) = data.split_last() else {
        return 0;
    };
    let (image, op_bytes) = rest.split_at(rest.len() - usize::from(n).min(rest.len()));
    let (cb, ranges) = guest_ranges(image);
    let storage = MemStorage::from_bytes(image.to_vec());
    let store = match BitmapStore::open(&storage, OpenMode::ReadWrite) {
        Ok(store) => store,
        Err(e) => {
            // Any refusal but I/O (memory never fails a read): a read past the end of the
            // bytes is a missing bounds check.
            assert!(!matches!(e, Error::Io(_)), "the writable open: {e}");
            assert!(storage.to_vec() == image, "a refused open wrote");
            return 0;
        }
    };
    let mut store = Some(store);
    let ops = decode_ops(&mut Bytes::new(op_bytes), MAX_GUEST_OPS);
    let mut ran = 0;
    for op in &ops {
        let Some(s) = store.as_mut() else {
            break;
        };
        if memory_needed(s) > GUEST_MEMORY_LIMIT {
            break;
        }
        let before = storage.to_vec();
        match guest_op(&mut store, &storage, op) {
            Ok(()) => ran += 1,
            Err(e) => {
                assert!(!matches!(e, Error::Io(_)), "{op:?}: I/O error {e}");
                assert!(
                    storage.to_vec() == before,
                    "{op:?} refused ({e}) after it wrote"
                );
            }
        }
    }
    drop(store);
    let after = storage.to_vec();
    let corruptions = |bytes: &[u8]| {
        dirty_bitmap::Image::open(MemStorage::from_bytes(bytes.to_vec()), OpenMode::ReadOnly)
            .and_then(|i| i.check())
            .map(|r| r.corruptions)
    };
    if let Ok(was) = corruptions(image) {
        match corruptions(&after) {
            Ok(now) => assert!(now <= was, "the image went from {was} to {now} corruptions"),
            Err(e) => panic!("an image our check read ({was} corruptions) no longer reads: {e}"),
        }
    }
    // Cluster 0 is the library's to rewrite, but what it says of the guest's data may not
    // change: the backing file and its format, the data file, the encryption, the
    // snapshots, the disk's feature bits, and every extension the library does not know (as
    // a set; a malformed mode extension, which a deferred activation drops, aside).
    if let (Some(was), Some(now)) = (guest_view(image, cb), guest_view(&after, cb)) {
        assert_eq!(
            now, was,
            "cluster 0 changed what it says of the guest's data"
        );
    }
    let mut exempt = refcount_clusters(image);
    exempt.insert(0);
    // A resize that grew the L1 table moved it into fresh clusters and freed the old one
    // (QEMU's `qcow2_grow_l1_table` does the same): once the header names another L1, the
    // old table's clusters are free space, if it named nothing. Resize takes only images
    // whose L1 is all zeros; an old L1 that named guest data keeps its clusters checked,
    // so a resize that dropped the data it mapped fails the refcount check below.
    let (old_l1, l1_len) = (be64(image, 40), u64::from(be32(image, 36)) * 8);
    let old_l1_empty = usize::try_from(old_l1)
        .ok()
        .zip(usize::try_from(l1_len).ok())
        .and_then(|(o, n)| image.get(o..o.checked_add(n)?))
        .is_some_and(|t| t.iter().all(|&b| b == 0));
    if after.len() >= 48 && be64(&after, 40) != old_l1 && cb > 0 && old_l1_empty {
        let first = old_l1 >> cb;
        exempt.extend(first..(old_l1 + l1_len).div_ceil(1 << cb));
    }
    for (off, len) in ranges {
        let mut c = off >> cb;
        while c << cb < off + len {
            let s = (c << cb).max(off);
            let e = ((c + 1) << cb).min(off + len);
            if !exempt.contains(&c) && refcount(image, c) > 0 {
                assert!(
                    refcount(&after, c) >= refcount(image, c),
                    "guest cluster {c}: refcount {} -> {}; before the operations the cluster \
                     was also {:?}",
                    refcount(image, c),
                    refcount(&after, c),
                    bitmap_owners(image, c)
                );
                let (s, e) = (s as usize, e as usize);
                let now = after.get(s..e);
                assert!(
                    now == Some(&image[s..e]),
                    "guest bytes {s:#x}..{e:#x} (cluster {c}) changed; before the operations \
                     the cluster was also {:?}",
                    bitmap_owners(image, c)
                );
            }
            c += 1;
        }
    }
    ran
}

/// What cluster 0 of `img` (clusters of `1 << cb` bytes) says of the guest's data, decoded
/// through `HeaderArea` (the library's decoder, which the `header` target checks against
/// the bytes): `None` when it does not decode.
#[allow(clippy::type_complexity)]
fn guest_view(
    img: &[u8],
    cb: u32,
) -> Option<(
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<(u64, u64)>,
    [u64; 6],
    Vec<(u32, Vec<u8>)>,
)> {
    use dirty_bitmap::format::{mode::EXT_MODE, HeaderArea};
    let cs = 1usize.checked_shl(cb)?;
    let a = HeaderArea::decode(img.get(..cs.min(img.len()))?).ok()?;
    let h = &a.header;
    let data_file = h
        .has_data_file()
        .then(|| a.data_file_name().map(<[u8]>::to_vec))
        .flatten();
    let crypto = a
        .crypto
        .filter(|c| c.offset != 0)
        .map(|c| (c.offset, c.length));
    let fields = [
        u64::from(h.version),
        u64::from(h.crypt_method),
        u64::from(h.nb_snapshots),
        h.snapshots_offset,
        h.incompatible_features,
        h.compatible_features,
    ];
    let mut unknown: Vec<(u32, Vec<u8>)> = a
        .unknown
        .iter()
        .filter(|u| u.kind != EXT_MODE)
        .map(|u| (u.kind, u.data.clone()))
        .collect();
    unknown.sort();
    Some((
        a.backing_file.clone(),
        a.backing_format.clone(),
        data_file,
        crypto,
        fields,
        unknown,
    ))
}

/// Bytes of bitmap the store could be made to hold: every listed bitmap and one more at
/// the smallest granularity.
fn memory_needed<S: dirty_bitmap::storage::Storage>(s: &BitmapStore<S>) -> u64 {
    let size = s.disk_size();
    s.list()
        .iter()
        .map(|i| size.div_ceil(i.granularity.max(512)).div_ceil(8))
        .fold(size.div_ceil(512).div_ceil(8), u64::saturating_add)
}

/// One operation of [`ops_guest_data`]: any result but a panic is fine here.
fn guest_op<'a>(
    store: &mut Option<BitmapStore<&'a MemStorage>>,
    storage: &'a MemStorage,
    op: &Op,
) -> dirty_bitmap::Result<()> {
    let s = store.as_mut().expect("open");
    let names: Vec<String> = s.list().into_iter().map(|i| i.name.to_string()).collect();
    let name = |i: usize| -> String {
        let k = i % (names.len() + NAMES.len());
        names
            .get(k)
            .cloned()
            .unwrap_or_else(|| NAMES[k - names.len()].to_string())
    };
    let size = s.disk_size();
    match *op {
        Op::Add {
            name: n,
            granularity,
            enabled,
        } => s.add(&name(n), granularity, recording(enabled)),
        Op::Remove { name: n } => s.remove(name(n)).map(|_| ()),
        Op::Mark {
            name: n,
            offset,
            len,
        } => {
            if let Some((o, l)) = place(size, offset, len) {
                s.bitmap(name(n))?.mark_dirty(o, l);
            }
            Ok(())
        }
        Op::Flush => s.flush().map(drop),
        Op::TrackerMark { offset, len } => {
            if let Some((o, l)) = place(size, offset, len) {
                s.tracker()?.mark(o, l);
            }
            Ok(())
        }
        Op::Clear { name: n } => s.clear(name(n)),
        Op::Merge { src, dst } => s.merge(name(src), name(dst)),
        Op::SetEnabled { name: n, enabled } => s.set_enabled(name(n), enabled),
        Op::Resize { sectors, odd } => s.resize(sectors * 512 + u64::from(odd)),
        Op::Activate => s.activate(),
        Op::Inactivate => s.inactivate().map(drop),
        Op::InactivateFullRewrite => s.inactivate_full_rewrite().map(drop),
        Op::CloseReopen | Op::AbandonReopen => {
            let s = store.take().expect("open");
            if matches!(op, Op::CloseReopen) {
                s.close()?;
            }
            *store = Some(BitmapStore::open(storage, OpenMode::ReadWrite)?);
            Ok(())
        }
        Op::Store {
            name: n,
            wrong_granularity,
            ref marks,
        } => {
            let n = name(n);
            let g = s
                .list()
                .iter()
                .find(|i| i.name == n)
                .map_or(65536, |i| i.granularity)
                .saturating_mul(if wrong_granularity { 2 } else { 1 });
            let Ok(bm) = DirtyBitmap::new(size, g) else {
                return Ok(());
            };
            for &(o, l) in marks {
                if let Some((o, l)) = place(size, o, l) {
                    bm.mark_dirty(o, l);
                }
            }
            s.store(&n, &bm)
        }
    }
}
