//! The durable-mode fuzz harness (`ops_durable`): sequences of operations on a store kept
//! in durable mode (`BitmapStore::activate_durable`), checked against a model at crash
//! points the input picks and at the end.
//!
//! Included with `#[path]` by the fuzz target `fuzz/fuzz_targets/ops_durable.rs` and by the
//! corpus replay `tests/fuzz_ops_corpus.rs`, beside `ops.rs`, whose input reader and helpers
//! it shares. A panic is a finding: the library panicked, returned what the model does not
//! allow, or broke the invariant of the durable mode:
//!
//! **the bitmap on disk, in place, covers every write whose mark was acknowledged**, no
//! bitmap is ever `in_use`, and every crash image opens, has no corruption, and holds every
//! acknowledged mark that no clear has begun to drop since.
//!
//! The model keeps, per bitmap, the granules the disk must hold ("must"): every granule of
//! a write acknowledged while the bitmap recorded (a `mark` that returned `Ok`, an intent
//! that `is_durable` said or `wait` returned), and every bit a store or merge that returned
//! put in; a clear that returned empties it. Extra dirty bits are always allowed. At a crash
//! point strictly inside an operation the disk must hold what both the model before and the
//! model after it require (so a torn clear, or a copy-on-write replacement, may lose the old
//! bits); at the operation's last log entry (it has returned) the model after it.
//!
//! See `docs/FUZZING.md` for the input format.
#![allow(dead_code)]

use std::collections::BTreeSet;

use dirty_bitmap::storage::{CrashMode, CrashStorage, MemStorage, Op as LogOp};
use dirty_bitmap::store::mode::StoreMode;
use dirty_bitmap::{
    BitmapState, BitmapStore, DirtyBitmap, DurableTracker, Error, Intent, OpenMode, Preloaded,
    Recording, SharedStore, StateProblem, StoreGuard, WriteInFlight,
};

use super::ops::{granules, place, recording, Bytes, NAMES};

/// Most operations decoded from one input (crash markers included).
const MAX_OPS: usize = 32;
/// Most crash points checked per input, besides the end.
const MAX_CRASHES: usize = 4;
/// Durable trackers the operations pick from.
const HANDLES: usize = 3;
/// Most intents held at once.
const MAX_TICKETS: usize = 8;
/// Most writes held in flight at once.
const MAX_WRITES: usize = 8;

/// One operation. Names are indexes into [`NAMES`]; handles into the [`HANDLES`] tracker
/// slots, each taken from the store (`SharedStore::durable_tracker`) at its first use and
/// kept until a reopen; tickets into the intents held (modulo their number).
#[derive(Debug, Clone)]
enum DOp {
    Add {
        name: usize,
        granularity: u64,
        enabled: bool,
    },
    Remove {
        name: usize,
    },
    /// `DurableTracker::mark`, `offset` modulo the disk size (past the disk when
    /// `offset + len` is).
    Mark {
        handle: usize,
        offset: u64,
        len: u64,
    },
    /// `DurableTracker::intent`: the ticket is held until polled durable or waited.
    Intent {
        handle: usize,
        offset: u64,
        len: u64,
    },
    /// `DurableTracker::begin_write`: the write is acknowledged and held in flight (its
    /// guard kept) until an `EndWrite`, or until the store is inactivated or reopened (a
    /// VMM drains its writes before it hands the disk over). With `via_intent`, as an
    /// asynchronous stack does it: `register_write`, then `intent`, whose ticket is held
    /// (acknowledged when polled durable or waited, as `Intent`'s).
    BeginWrite {
        handle: usize,
        offset: u64,
        len: u64,
        via_intent: bool,
    },
    /// Drops the guard of the oldest write held in flight: it completed.
    EndWrite,
    /// `BitmapStore::checkpoint`: the bitmap that records disabled and `name` added
    /// recording, in one directory commit.
    Checkpoint {
        name: usize,
    },
    /// `Intent::is_durable`: when it says so the write is acknowledged and the ticket goes.
    Poll {
        ticket: usize,
    },
    /// `Intent::wait`.
    Wait {
        ticket: usize,
    },
    /// `DurableTracker::commit`.
    Commit {
        handle: usize,
    },
    /// `DurableTracker::refresh` on the tracker of `handle` if it has one and `refresh`;
    /// otherwise drops it (its intents keep their clone) and takes a new one. The calls
    /// above go to the kept handle itself, whose copy of the list of bitmaps an `add` or
    /// `remove` makes stale until this.
    NewTracker {
        handle: usize,
        refresh: bool,
    },
    Flush,
    Clear {
        name: usize,
    },
    SetEnabled {
        name: usize,
        enabled: bool,
    },
    /// `store` of a bitmap with these marks (offsets modulo the disk size); at twice the
    /// bitmap's granularity when `wrong_granularity` (refused).
    Store {
        name: usize,
        wrong_granularity: bool,
        marks: Vec<(u64, u64)>,
    },
    Merge {
        src: usize,
        dst: usize,
    },
    /// `merge_from` of a bitmap at `granularity` with these marks, in another image.
    MergeFrom {
        dst: usize,
        granularity: u64,
        marks: Vec<(u64, u64)>,
    },
    Inactivate,
    ActivateDurable,
    /// `close` (drops every tracker and intent first), then `open` writable.
    Reopen,
    /// Drops the store without closing (the process died), then `open` writable.
    AbandonReopen,
    /// `BitmapStore::preload`: the next `ActivateDurable` starts from what it read
    /// (`activate_durable_preloaded`, which refreshes it from the disk), kept across reopens
    /// (a migration destination preloads with a store of its own).
    Preload,
    /// To `sectors · 512` bytes (1 to 8192 sectors), plus one byte when `odd` (refused).
    Resize {
        sectors: u64,
        odd: bool,
    },
    /// The next operation that writes is crashed into, at its `at`-th crash point (modulo
    /// their number); checked in every crash mode. At most [`MAX_CRASHES`] per input.
    Crash {
        at: u8,
    },
}

fn decode_op(r: &mut Bytes) -> DOp {
    let name = |r: &mut Bytes| usize::from(r.u8()) % NAMES.len();
    let handle = |r: &mut Bytes| usize::from(r.u8()) % HANDLES;
    let range = |r: &mut Bytes| (u64::from(r.u16()) * 64, u64::from(r.u16()) + 1);
    let marks = |r: &mut Bytes, n: u8| (0..n % 5).map(|_| range(r)).collect::<Vec<_>>();
    match r.u8() % 26 {
        0 => {
            let name = name(r);
            let b = r.u8();
            DOp::Add {
                name,
                granularity: 512 << (b % 8),
                enabled: b & 0x80 == 0,
            }
        }
        1 => DOp::Remove { name: name(r) },
        2 | 3 => {
            let handle = handle(r);
            let (offset, len) = range(r);
            DOp::Mark {
                handle,
                offset,
                len,
            }
        }
        4 => {
            let b = r.u8();
            let (offset, len) = range(r);
            DOp::BeginWrite {
                handle: usize::from(b & 0x7f) % HANDLES,
                offset,
                len,
                via_intent: b & 0x80 != 0,
            }
        }
        5 | 6 => {
            let handle = handle(r);
            let (offset, len) = range(r);
            DOp::Intent {
                handle,
                offset,
                len,
            }
        }
        7 => DOp::Poll {
            ticket: usize::from(r.u8()),
        },
        8 => DOp::Wait {
            ticket: usize::from(r.u8()),
        },
        9 => DOp::Commit { handle: handle(r) },
        10 => {
            let b = r.u8();
            DOp::NewTracker {
                handle: usize::from(b) % HANDLES,
                refresh: b & 0x80 != 0,
            }
        }
        11 => DOp::Flush,
        12 => DOp::Clear { name: name(r) },
        13 => DOp::SetEnabled {
            name: name(r),
            enabled: r.u8() & 1 == 1,
        },
        14 => {
            let name = name(r);
            let b = r.u8();
            DOp::Store {
                name,
                wrong_granularity: b & 0x80 != 0,
                marks: marks(r, b),
            }
        }
        15 => DOp::Merge {
            src: name(r),
            dst: name(r),
        },
        16 => {
            let dst = name(r);
            let b = r.u8();
            DOp::MergeFrom {
                dst,
                granularity: 512 << (b % 8),
                marks: marks(r, b >> 3),
            }
        }
        17 => DOp::Inactivate,
        18 => DOp::ActivateDurable,
        19 => DOp::EndWrite,
        20 => DOp::Reopen,
        21 => DOp::AbandonReopen,
        22 => DOp::Crash { at: r.u8() },
        23 => DOp::Checkpoint { name: name(r) },
        24 => DOp::Preload,
        _ => {
            let v = r.u16();
            DOp::Resize {
                sectors: u64::from(v & 0x7fff) % 8192 + 1,
                odd: v & 0x8000 != 0,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

/// What the model knows of one bitmap.
#[derive(Debug, Clone)]
struct Bm {
    /// A new bitmap of the same name (removed and added again) is another bitmap.
    id: u64,
    name: &'static str,
    granularity: u64,
    /// Whether writes record into it: the in-memory flag while it has an in-memory copy,
    /// the `auto` flag otherwise.
    enabled: bool,
    /// The `auto` flag on disk.
    disk_enabled: bool,
    /// It has an in-memory copy from the store's current or last durable activation
    /// (active, or parked by an inactivate).
    tracked: bool,
    /// Granules the disk must hold (a superset is fine).
    must: BTreeSet<u64>,
}

#[derive(Debug, Clone, Default)]
struct Model {
    size: u64,
    /// Active in durable mode.
    durable: bool,
    /// The image records the durable mode (the mode extension's bit 0): from the first
    /// durable activation on (the harness never activates in deferred mode).
    mode_durable: bool,
    /// The disk size of the last durable activation: the trackers check ranges against
    /// it (a resize while inactive reaches them at the next durable activation).
    tracked_size: u64,
    next_id: u64,
    /// In directory order.
    bms: Vec<Bm>,
}

impl Model {
    fn find(&self, name: &str) -> Option<usize> {
        self.bms.iter().position(|b| b.name == name)
    }

    fn bm(&mut self, name: &str) -> &mut Bm {
        let i = self.find(name).expect("the bitmap is in the model");
        &mut self.bms[i]
    }

    /// Whether the trackers take `[offset, offset + len)` as inside the disk.
    fn tracks(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|e| e <= self.tracked_size)
    }

    /// Parked bitmaps (a durable inactivate kept them): a resize needs a reopen.
    fn parked(&self) -> bool {
        !self.durable && self.bms.iter().any(|b| b.tracked)
    }

    /// A write of `[offset, offset + len)` was acknowledged: every bitmap of the durable
    /// activation that records must hold it.
    fn ack(&mut self, offset: u64, len: u64) {
        assert!(self.durable, "a write acknowledged while not durable");
        let size = self.size;
        for b in self.bms.iter_mut().filter(|b| b.tracked && b.enabled) {
            b.must.extend(granules(size, b.granularity, offset, len));
        }
    }

    /// An inactivation returned: the `auto` flags are the in-memory ones, the copies parked.
    fn inactivated(&mut self) {
        if self.durable {
            for b in self.bms.iter_mut().filter(|b| b.tracked) {
                b.disk_enabled = b.enabled;
            }
        }
        self.durable = false;
    }

    /// After a reopen: nothing in memory, the flags as on disk.
    fn reopened(&mut self) {
        self.durable = false;
        for b in &mut self.bms {
            b.tracked = false;
            b.enabled = b.disk_enabled;
        }
    }
}

/// What an image must show of one name.
#[derive(Debug)]
struct Expect {
    name: &'static str,
    must_exist: bool,
    may_exist: bool,
    /// Granularities it may have.
    granularities: Vec<u64>,
    /// Values its `auto` flag may have.
    flags: Vec<bool>,
    /// Granules it must hold (at its granularity: only set when there is one).
    must: BTreeSet<u64>,
}

/// What an image must show.
#[derive(Debug)]
struct Expected {
    /// Disk sizes it may have.
    sizes: Vec<u64>,
    /// Whether it may record the durable mode, and the deferred one.
    modes: Vec<bool>,
    names: Vec<Expect>,
}

/// What an image must show at a crash point inside an operation that took the model from
/// `before` to `after`; `returned` when the crash point is the operation's last log entry.
fn expectations(before: &Model, after: &Model, returned: bool) -> Expected {
    let either = |x: u64, y: u64| if x == y { vec![x] } else { vec![x, y] };
    if returned {
        return expectations(after, after, false);
    }
    let names = NAMES
        .iter()
        .map(|&name| {
            let a = after.find(name).map(|i| &after.bms[i]);
            let b = before.find(name).map(|i| &before.bms[i]);
            let same = matches!((a, b), (Some(a), Some(b)) if a.id == b.id);
            let both: Vec<&Bm> = a.into_iter().chain(b).collect();
            Expect {
                name,
                must_exist: same,
                may_exist: !both.is_empty(),
                granularities: both.iter().map(|x| x.granularity).collect(),
                flags: both.iter().map(|x| x.disk_enabled).collect(),
                must: match (a, b) {
                    (Some(a), Some(b)) if same => a.must.intersection(&b.must).copied().collect(),
                    _ => BTreeSet::new(),
                },
            }
        })
        .collect();
    Expected {
        sizes: either(before.size, after.size),
        modes: vec![before.mode_durable, after.mode_durable],
        names,
    }
}

// ---------------------------------------------------------------------------------------
// Expected results
// ---------------------------------------------------------------------------------------

/// A typed refusal the model expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    InvalidInput,
    NotFound,
    Exists,
    State(StateProblem),
}

impl Refusal {
    fn matches(self, e: &Error) -> bool {
        match (self, e) {
            (Refusal::InvalidInput, Error::InvalidInput(_))
            | (Refusal::NotFound, Error::NotFound { .. })
            | (Refusal::Exists, Error::Exists { .. }) => true,
            (Refusal::State(p), Error::WrongState(q)) => p == *q,
            _ => false,
        }
    }
}

/// The model's answer to one call: success, or one typed refusal.
type Want = Result<(), Refusal>;

/// Success, or the first refusal `checks` finds.
fn first<const N: usize>(checks: [Option<Refusal>; N]) -> Want {
    checks.into_iter().flatten().next().map_or(Ok(()), Err)
}

/// `Ok(())` while `active`, else the refusal.
fn while_active(active: bool, otherwise: StateProblem) -> Want {
    first([(!active).then_some(Refusal::State(otherwise))])
}

/// Checks `got` against `want`: `Some(value)` when both say it succeeds, `None` when both
/// agree on the refusal; a mismatch is a finding.
fn check<T>(ctx: &str, want: Want, got: dirty_bitmap::Result<T>) -> Option<T> {
    match (want, got) {
        (Ok(()), Ok(v)) => Some(v),
        (Err(w), Err(e)) if w.matches(&e) => None,
        (Ok(()), Err(e)) => panic!("{ctx}: unexpected error {e:?}"),
        (Err(w), Err(e)) => panic!("{ctx}: expected {w:?}, got {e:?}"),
        (Err(w), Ok(_)) => panic!("{ctx}: expected {w:?}, got success"),
    }
}

// ---------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------

type Store<'a> = BitmapStore<&'a CrashStorage>;

struct Ticket<'a> {
    intent: Intent<&'a CrashStorage>,
    offset: u64,
    len: u64,
}

struct Harness<'a> {
    crash: &'a CrashStorage,
    shared: Option<SharedStore<&'a CrashStorage>>,
    model: Model,
    seed: u64,
    handles: Vec<Option<DurableTracker<&'a CrashStorage>>>,
    /// What the last `Preload` read, for the next durable activation.
    preloaded: Option<Preloaded>,
    tickets: Vec<Ticket<'a>>,
    /// Writes in flight ([`DOp::BeginWrite`]), oldest first, with their ranges.
    writes: Vec<(WriteInFlight, u64, u64)>,
    /// The crash point asked for the next operation that writes.
    crash_at: Option<u8>,
    crashes: usize,
    /// Whether the current operation was refused (then it must write nothing).
    refused: bool,
    /// Prints each operation and its log range (`OPS_DURABLE_TRACE` set).
    trace: bool,
}

impl<'a> Harness<'a> {
    fn lock(&self) -> StoreGuard<'_, &'a CrashStorage> {
        self.shared.as_ref().expect("the store is open").lock()
    }

    /// [`check`], remembering a refusal (which must write nothing).
    fn check<T>(&mut self, ctx: &str, want: Want, got: dirty_bitmap::Result<T>) -> Option<T> {
        let r = check(ctx, want, got);
        self.refused |= r.is_none();
        r
    }

    /// Whether `handle` has a tracker, taken from the store if there was none.
    fn ensure_tracker(&mut self, ctx: &str, handle: usize) -> bool {
        if self.handles[handle].is_none() {
            let want = while_active(self.model.durable, StateProblem::NotDurable);
            let got = self
                .shared
                .as_ref()
                .expect("the store is open")
                .durable_tracker();
            self.handles[handle] = self.check(ctx, want, got);
        }
        self.handles[handle].is_some()
    }

    /// The tracker of `handle` (see [`ensure_tracker`](Self::ensure_tracker)).
    fn handle(&self, handle: usize) -> &DurableTracker<&'a CrashStorage> {
        self.handles[handle].as_ref().expect("a tracker")
    }

    /// A change of which bitmaps record (an add of a recording bitmap, `set_enabled`, a
    /// checkpoint) returned on a durable store: every write held in flight, its intent
    /// acknowledged or still pending, is then on disk in every bitmap that records
    /// (`BitmapStore::commit_in_flight` marks every registered write in each).
    fn in_flight_recorded(&mut self) {
        if !self.model.durable {
            return;
        }
        let ranges: Vec<(u64, u64)> = self.writes.iter().map(|&(_, o, l)| (o, l)).collect();
        for (o, l) in ranges {
            self.model.ack(o, l);
        }
    }

    /// `(offset, len)` placed on the disk, and whether it lies inside the disk the
    /// trackers check ranges against ([`Model::tracked_size`]).
    fn placed(&self, offset: u64, len: u64) -> (u64, u64, bool) {
        let (o, l) = place(self.model.size, offset, len).expect("a non-empty disk");
        (o, l, self.model.tracks(o, l))
    }

    /// Runs `op`, checks its result against the model and updates the model.
    fn run(&mut self, ctx: &str, op: &DOp) {
        let size = self.model.size;
        let durable = self.model.durable;
        let missing = |m: &Model, n: &str| m.find(n).is_none().then_some(Refusal::NotFound);
        match *op {
            DOp::Add {
                name,
                granularity,
                enabled,
            } => {
                let n = NAMES[name];
                let want = first([self.model.find(n).map(|_| Refusal::Exists)]);
                let got = self.lock().add(n, granularity, recording(enabled));
                if self.check(ctx, want, got).is_some() {
                    let id = self.model.next_id;
                    self.model.next_id += 1;
                    self.model.bms.push(Bm {
                        id,
                        name: n,
                        granularity,
                        enabled,
                        disk_enabled: enabled,
                        tracked: durable,
                        must: BTreeSet::new(),
                    });
                    if enabled {
                        self.in_flight_recorded();
                    }
                }
            }
            DOp::Remove { name } => {
                let n = NAMES[name];
                let want = first([missing(&self.model, n)]);
                // The rule of `docs/CRASH-CONSISTENCY.md` ("Commit"), modelled apart from
                // the code: removing the bitmap that records while no kept one records
                // (the end of a chain) makes every kept bitmap all dirty (a durable bitmap
                // is never inconsistent).
                let chain_ends = self.model.bms.iter().any(|b| b.name == n && b.enabled)
                    && !self.model.bms.iter().any(|b| b.name != n && b.enabled);
                let got = self.lock().remove(n);
                if let Some(made) = self.check(ctx, want, got) {
                    self.model.bms.retain(|b| b.name != n);
                    let want: Vec<&str> = if chain_ends {
                        self.model.bms.iter().map(|b| b.name).collect()
                    } else {
                        Vec::new()
                    };
                    let made: Vec<&str> = made
                        .iter()
                        .map(|m| m.to_str().unwrap_or_default())
                        .collect();
                    assert_eq!(made, want, "{ctx}: made all dirty by the removal of {n}");
                    if chain_ends {
                        let size = self.model.size;
                        for b in &mut self.model.bms {
                            b.must.extend(granules(size, b.granularity, 0, size));
                        }
                    }
                }
            }
            DOp::Mark {
                handle,
                offset,
                len,
            } => {
                if !self.ensure_tracker(ctx, handle) {
                    return;
                }
                let (o, l, inside) = self.placed(offset, len);
                let want = first([
                    (!inside).then_some(Refusal::InvalidInput),
                    (!durable).then_some(Refusal::State(StateProblem::NotActive)),
                ]);
                let got = self.handle(handle).mark(o, l);
                if self.check(ctx, want, got).is_some() {
                    self.model.ack(o, l);
                }
            }
            DOp::BeginWrite {
                handle,
                offset,
                len,
                via_intent: true,
            } => {
                if self.writes.len() >= MAX_WRITES
                    || self.tickets.len() >= MAX_TICKETS
                    || !self.ensure_tracker(ctx, handle)
                {
                    return;
                }
                let (o, l, inside) = self.placed(offset, len);
                // Registered in flight (not acknowledged yet: its intent is), then the
                // intent, which registration does not replace.
                let want = first([(!inside).then_some(Refusal::InvalidInput)]);
                let got = self.handle(handle).register_write(o, l);
                let Some(guard) = self.check(ctx, want, got) else {
                    return;
                };
                let got = self.handle(handle).intent(o, l);
                let intent = self
                    .check(ctx, Ok(()), got)
                    .expect("an intent for a range its registration took");
                self.writes.push((guard, o, l));
                self.tickets.push(Ticket {
                    intent,
                    offset: o,
                    len: l,
                });
            }
            DOp::BeginWrite {
                handle,
                offset,
                len,
                via_intent: false,
            } => {
                if self.writes.len() >= MAX_WRITES || !self.ensure_tracker(ctx, handle) {
                    return;
                }
                let (o, l, inside) = self.placed(offset, len);
                let want = first([
                    (!inside).then_some(Refusal::InvalidInput),
                    (!durable).then_some(Refusal::State(StateProblem::NotActive)),
                ]);
                let got = self.handle(handle).begin_write(o, l);
                if let Some(guard) = self.check(ctx, want, got) {
                    self.model.ack(o, l);
                    self.writes.push((guard, o, l));
                }
            }
            DOp::EndWrite => {
                if !self.writes.is_empty() {
                    drop(self.writes.remove(0));
                }
            }
            DOp::Checkpoint { name } => {
                let n = NAMES[name];
                let recording: Vec<usize> = (0..self.model.bms.len())
                    .filter(|&i| self.model.bms[i].enabled)
                    .collect();
                let want = first([
                    (recording.len() > 1).then_some(Refusal::InvalidInput),
                    self.model.find(n).map(|_| Refusal::Exists),
                ]);
                let got = self.lock().checkpoint(n);
                if let Some(old) = self.check(ctx, want, got) {
                    let granularity = match recording[..] {
                        [i] => {
                            let b = &mut self.model.bms[i];
                            assert_eq!(
                                old.as_ref().map(|o| o.to_string()).as_deref(),
                                Some(b.name),
                                "{ctx}: the checkpoint disabled another bitmap"
                            );
                            b.enabled = false;
                            b.disk_enabled = false;
                            b.granularity
                        }
                        _ => {
                            assert!(old.is_none(), "{ctx}: disabled {old:?}, none recorded");
                            dirty_bitmap::store::checkpoint::DEFAULT_CHECKPOINT_GRANULARITY
                        }
                    };
                    let id = self.model.next_id;
                    self.model.next_id += 1;
                    self.model.bms.push(Bm {
                        id,
                        name: n,
                        granularity,
                        enabled: true,
                        disk_enabled: true,
                        tracked: durable,
                        must: BTreeSet::new(),
                    });
                    self.in_flight_recorded();
                }
            }
            DOp::Intent {
                handle,
                offset,
                len,
            } => {
                if self.tickets.len() >= MAX_TICKETS {
                    return;
                }
                if !self.ensure_tracker(ctx, handle) {
                    return;
                }
                let (o, l, inside) = self.placed(offset, len);
                let want = first([(!inside).then_some(Refusal::InvalidInput)]);
                let got = self.handle(handle).intent(o, l);
                if let Some(intent) = self.check(ctx, want, got) {
                    self.tickets.push(Ticket {
                        intent,
                        offset: o,
                        len: l,
                    });
                }
            }
            DOp::Poll { ticket } => {
                if self.tickets.is_empty() {
                    return;
                }
                let k = ticket % self.tickets.len();
                if self.tickets[k].intent.is_durable() {
                    assert!(durable, "{ctx}: an intent reads durable while inactive");
                    let t = self.tickets.remove(k);
                    self.model.ack(t.offset, t.len);
                }
            }
            DOp::Wait { ticket } => {
                if self.tickets.is_empty() {
                    return;
                }
                let t = self.tickets.remove(ticket % self.tickets.len());
                // An intent issued before the disk shrank below its range fails: no bit
                // can ever cover it.
                let want = first([
                    (!self.model.tracks(t.offset, t.len)).then_some(Refusal::InvalidInput),
                    (!durable).then_some(Refusal::State(StateProblem::NotActive)),
                ]);
                if self.check(ctx, want, t.intent.wait()).is_some() {
                    self.model.ack(t.offset, t.len);
                }
            }
            DOp::Commit { handle } => {
                if self.ensure_tracker(ctx, handle) {
                    let want = while_active(durable, StateProblem::NotActive);
                    let got = self.handle(handle).commit();
                    self.check(ctx, want, got);
                }
            }
            DOp::NewTracker { handle, refresh } => match &mut self.handles[handle] {
                Some(t) if refresh => t.refresh(),
                _ => {
                    self.handles[handle] = None;
                    self.ensure_tracker(ctx, handle);
                }
            },
            DOp::Flush => {
                let want = while_active(durable, StateProblem::NotActive);
                let got = self.lock().flush();
                self.check(ctx, want, got);
            }
            DOp::Clear { name } => {
                let n = NAMES[name];
                let want = first([missing(&self.model, n)]);
                let got = self.lock().clear(n);
                if self.check(ctx, want, got).is_some() {
                    self.model.bm(n).must.clear();
                    // A write in flight lands after the clear: a durable clear marks it in
                    // the bitmap it clears, recording or not (`BitmapStore::clear_durable`);
                    // the other bitmaps keep what they held. (Only a write whose intent was
                    // acknowledged is in them: one registered with its intent still pending
                    // is required only where the clear put it.)
                    if durable {
                        let size = self.model.size;
                        let ranges: Vec<(u64, u64)> =
                            self.writes.iter().map(|&(_, o, l)| (o, l)).collect();
                        let b = self.model.bm(n);
                        if b.tracked {
                            for (o, l) in ranges {
                                b.must.extend(granules(size, b.granularity, o, l));
                            }
                        }
                    }
                }
            }
            DOp::SetEnabled { name, enabled } => {
                let n = NAMES[name];
                let want = first([missing(&self.model, n)]);
                let got = self.lock().set_enabled(n, enabled);
                if self.check(ctx, want, got).is_some() {
                    // Durable when it returns, active (the flags in place) or not.
                    let b = self.model.bm(n);
                    b.enabled = enabled;
                    b.disk_enabled = enabled;
                    self.in_flight_recorded();
                }
            }
            DOp::Store {
                name,
                wrong_granularity,
                ref marks,
            } => {
                let n = NAMES[name];
                let found = self.model.find(n);
                let g = found
                    .map_or(4096, |i| self.model.bms[i].granularity)
                    .saturating_mul(if wrong_granularity { 2 } else { 1 });
                let bm = DirtyBitmap::new(size, g).expect("a valid bitmap");
                let mut bits = BTreeSet::new();
                for &(o, l) in marks {
                    let (o, l) = place(size, o, l).expect("a non-empty disk");
                    bm.mark_dirty(o, l);
                    bits.extend(granules(size, g, o, l));
                }
                let want = first([
                    found.is_none().then_some(Refusal::NotFound),
                    wrong_granularity.then_some(Refusal::InvalidInput),
                ]);
                let got = self.lock().store(n, &bm);
                if self.check(ctx, want, got).is_some() {
                    let b = self.model.bm(n);
                    if b.tracked {
                        // ORed into the in-memory copy (active or parked), on disk when
                        // it returns.
                        b.must.extend(bits);
                    } else {
                        // Inactive, nothing in memory: the disk holds exactly these bits.
                        b.must = bits;
                    }
                }
            }
            DOp::Merge { src, dst } => {
                let (s, d) = (NAMES[src], NAMES[dst]);
                // What the merge reads: the source's in-memory copy (active or parked),
                // or its disk copy.
                let content = self.model.find(s).map(|_| {
                    self.lock()
                        .load(s)
                        .unwrap_or_else(|e| panic!("{ctx}: load {s}: {e}"))
                });
                let want = first([missing(&self.model, s), missing(&self.model, d)]);
                let got = self.lock().merge(s, d);
                if self.check(ctx, want, got).is_some() {
                    self.merged(d, &content.expect("the source exists"));
                    // And what the model requires of the source, whatever the library's
                    // copy held: the oracle must not come from the code under test alone.
                    self.merged_must(s, d);
                }
            }
            DOp::MergeFrom {
                dst,
                granularity,
                ref marks,
            } => {
                let d = NAMES[dst];
                let src = DirtyBitmap::new(size, granularity).expect("a valid bitmap");
                for &(o, l) in marks {
                    let (o, l) = place(size, o, l).expect("a non-empty disk");
                    src.mark_dirty(o, l);
                }
                let mut other =
                    BitmapStore::create(MemStorage::new(), size, 512).expect("another image");
                other
                    .add("s", granularity, Recording::Enabled)
                    .expect("a bitmap in another image");
                other.store("s", &src).expect("its bits");
                let want = first([missing(&self.model, d)]);
                let got = self.lock().merge_from(&other, "s", d);
                if self.check(ctx, want, got).is_some() {
                    self.merged(d, &src);
                }
            }
            DOp::Inactivate => {
                // Writes drained before the hand-over.
                self.writes.clear();
                let got = self.lock().inactivate();
                self.check(ctx, Ok(()), got);
                self.model.inactivated();
            }
            DOp::ActivateDurable => {
                // After a durable inactivate too: the parked copies are dropped and the
                // disk, which holds every acknowledged write, is loaded.
                let want = first([durable.then_some(Refusal::State(StateProblem::Active))]);
                let got = match self.preloaded.take() {
                    Some(pre) => self.lock().activate_durable_preloaded(pre),
                    None => self.lock().activate_durable(),
                };
                if self.check(ctx, want, got).is_some() {
                    self.model.durable = true;
                    self.model.mode_durable = true;
                    self.model.tracked_size = self.model.size;
                    for b in &mut self.model.bms {
                        b.tracked = true;
                    }
                }
            }
            DOp::Reopen => {
                let store = self.take_store(ctx);
                let got = store.close();
                self.check(ctx, Ok(()), got);
                self.model.inactivated();
                self.reopen(ctx);
            }
            DOp::AbandonReopen => {
                drop(self.take_store(ctx));
                self.reopen(ctx);
            }
            DOp::Resize { sectors, odd } => {
                let new = sectors * 512 + u64::from(odd);
                let want = first([
                    durable.then_some(Refusal::State(StateProblem::Active)),
                    self.model
                        .parked()
                        .then_some(Refusal::State(StateProblem::ParkedBitmaps)),
                    odd.then_some(Refusal::InvalidInput),
                ]);
                let got = self.lock().resize(new);
                if self.check(ctx, want, got).is_some() {
                    // The trackers are kept: from the next durable activation on they check
                    // ranges against the new disk.
                    self.model.size = new;
                    for b in &mut self.model.bms {
                        let g = b.granularity;
                        b.must.retain(|&i| i * g < new);
                    }
                }
            }
            DOp::Preload => {
                let got = self.lock().preload();
                self.preloaded = self.check(ctx, Ok(()), got);
            }
            DOp::Crash { .. } => {}
        }
    }

    /// A merge into `dst` of `src` returned: `dst` holds every granule `src`'s dirty
    /// extents touch, at its own granularity.
    fn merged(&mut self, dst: &str, src: &DirtyBitmap) {
        let size = self.model.size;
        let b = self.model.bm(dst);
        let g = b.granularity;
        for (off, len) in src.dirty_extents() {
            b.must.extend(granules(size, g, off, len));
        }
    }

    /// A merge into `dst` of `src` returned: `dst` holds every granule of its own that a
    /// granule the model requires of `src` touches.
    fn merged_must(&mut self, src: &str, dst: &str) {
        let size = self.model.size;
        let (gs, must) = {
            let b = self.model.bm(src);
            (b.granularity, b.must.clone())
        };
        let b = self.model.bm(dst);
        let g = b.granularity;
        for k in must {
            b.must.extend(granules(size, g, k.saturating_mul(gs), gs));
        }
    }

    fn drop_handles(&mut self) {
        self.tickets.clear();
        self.writes.clear();
        for h in &mut self.handles {
            *h = None;
        }
    }

    /// The store itself, every tracker and intent dropped.
    fn take_store(&mut self, ctx: &str) -> Store<'a> {
        self.drop_handles();
        let shared = self.shared.take().expect("the store is open");
        shared
            .try_into_inner()
            .unwrap_or_else(|_| panic!("{ctx}: a handle of the store is still alive"))
    }

    fn reopen(&mut self, ctx: &str) {
        let store = BitmapStore::open(self.crash, OpenMode::ReadWrite)
            .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
        self.shared = Some(SharedStore::new(store));
        self.model.reopened();
    }

    /// One step: the operation, then the crash point asked for, if it wrote.
    fn step(&mut self, index: usize, op: &DOp) {
        if let DOp::Crash { at } = *op {
            if self.crashes < MAX_CRASHES {
                self.crash_at = Some(at);
            }
            return;
        }
        let ctx = format!("op {index} {op:?}");
        let before = self.model.clone();
        let start = self.crash.op_count();
        self.refused = false;
        self.run(&ctx, op);
        let end = self.crash.op_count();
        if self.trace {
            eprintln!(
                "{ctx}: log {start}..{end}{}",
                if self.refused { ", refused" } else { "" }
            );
        }
        if self.refused {
            assert_eq!(start, end, "{ctx}: a refused operation wrote");
        }
        if end == start {
            return;
        }
        let Some(at) = self.crash_at.take() else {
            return;
        };
        self.crashes += 1;
        let points: Vec<usize> = self
            .crash
            .crash_points()
            .into_iter()
            .filter(|&p| p > start && p <= end)
            .collect();
        let Some(&p) = points.get(usize::from(at) % points.len().max(1)) else {
            return;
        };
        // Allocating and freeing operations may leak while they run (an activation, an
        // add, a remove, a resize and the copy-on-write operations of an inactive store);
        // the durable commits in place and the flags written in place never do.
        let leaks = p < end
            && match op {
                DOp::Add { .. }
                | DOp::Remove { .. }
                | DOp::Checkpoint { .. }
                | DOp::ActivateDurable => true,
                DOp::Resize { .. } => true,
                DOp::Store { .. }
                | DOp::Merge { .. }
                | DOp::MergeFrom { .. }
                | DOp::Clear { .. }
                | DOp::SetEnabled { .. } => !before.durable,
                _ => false,
            };
        let exp = expectations(&before, &self.model, p == end);
        let cctx = format!("{ctx}: crash after log op {p} ({start}..{end})");
        self.check_crash(&cctx, p, &exp, leaks);
    }

    /// The crash images at log point `p`, unsynced writes dropped, kept and torn (one
    /// image right after a barrier), against `exp`.
    fn check_crash(&self, ctx: &str, p: usize, exp: &Expected, leaks: bool) {
        let synced = p == 0 || matches!(self.crash.ops().get(p - 1), Some(LogOp::Sync));
        let modes = [
            CrashMode::Dropped,
            CrashMode::Kept,
            CrashMode::Torn {
                seed: self.seed ^ p as u64,
            },
        ];
        for mode in modes.into_iter().take(if synced { 1 } else { 3 }) {
            let image = self
                .crash
                .crash_image(p, mode)
                .expect("a valid crash point");
            self.check_image(&format!("{ctx}, {mode:?}"), image, exp, leaks);
        }
    }

    /// One image against `exp`: it opens (a torn cluster-0 write too), has no corruption, leaks only if `leaks`, has an allowed disk size and mode,
    /// and each bitmap is one `exp` allows, consistent and not `in_use`, with an allowed
    /// granularity and flag, holding every granule it must.
    fn check_image(&self, ctx: &str, image: Vec<u8>, exp: &Expected, leaks: bool) {
        let s = BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadOnly)
            .unwrap_or_else(|e| panic!("{ctx}: the image does not open: {e}"));
        let r = s.image().check().expect("check runs");
        assert_eq!(r.corruptions, 0, "{ctx}: corrupt: {:?}", r.messages);
        assert!(
            leaks || r.leaks == 0,
            "{ctx}: {} leaked clusters: {:?}",
            r.leaks,
            r.messages
        );
        assert!(
            exp.sizes.contains(&s.disk_size()),
            "{ctx}: disk size {}, expected one of {:?}",
            s.disk_size(),
            exp.sizes
        );
        let recorded = match s.mode() {
            StoreMode::Durable => true,
            StoreMode::Deferred => false,
            m => panic!("{ctx}: the image records mode {m}"),
        };
        assert!(
            exp.modes.contains(&recorded),
            "{ctx}: the image records durable = {recorded}, expected one of {:?}",
            exp.modes
        );
        let list = s.list();
        for e in &exp.names {
            let info = list.iter().find(|i| i.name.as_bytes() == e.name.as_bytes());
            let Some(info) = info else {
                assert!(!e.must_exist, "{ctx}: bitmap {} missing", e.name);
                continue;
            };
            assert!(e.may_exist, "{ctx}: bitmap {} present", e.name);
            assert!(!info.in_use, "{ctx}: {} is in_use", e.name);
            assert_eq!(info.state, BitmapState::Consistent, "{ctx}: {}", e.name);
            assert!(
                e.granularities.contains(&info.granularity),
                "{ctx}: {} has granularity {}, expected one of {:?}",
                e.name,
                info.granularity,
                e.granularities
            );
            assert!(
                e.flags.contains(&info.enabled),
                "{ctx}: {} has auto = {}, expected one of {:?}",
                e.name,
                info.enabled,
                e.flags
            );
            if e.must.is_empty() {
                continue;
            }
            let bm = s
                .load(e.name)
                .unwrap_or_else(|err| panic!("{ctx}: load {}: {err}", e.name));
            let g = bm.granularity();
            if let Some(i) = e.must.iter().find(|&&i| !bm.is_dirty(i * g)) {
                panic!(
                    "{ctx}: {} lacks granule {i} (offset {}), which an acknowledged write, a \
                     store or a merge put there; it holds {:?}",
                    e.name,
                    i * g,
                    bm.dirty_extents().collect::<Vec<_>>()
                );
            }
        }
        assert!(
            list.iter()
                .all(|i| NAMES.iter().any(|n| i.name.as_bytes() == n.as_bytes())),
            "{ctx}: a bitmap the operations never named"
        );
    }

    /// The end: a crash now (every acknowledged write is durable), the live store against
    /// the model, then `close` and the closed image, flags and all.
    fn finish(&mut self) {
        let end = self.crash.op_count();
        let now = expectations(&self.model, &self.model, true);
        self.check_crash(&format!("end: crash after log op {end}"), end, &now, false);

        {
            let store = self.lock();
            let list = store.list();
            let names: Vec<String> = list.iter().map(|i| i.name.to_string()).collect();
            let want: Vec<&str> = self.model.bms.iter().map(|b| b.name).collect();
            assert_eq!(names, want, "end: bitmaps");
            assert_eq!(store.is_durable(), self.model.durable, "end: durable");
            assert_eq!(store.disk_size(), self.model.size, "end: disk size");
            for (info, b) in list.iter().zip(&self.model.bms) {
                assert_eq!(info.granularity, b.granularity, "end: {}", b.name);
                assert_eq!(info.enabled, b.enabled, "end: {} enabled", b.name);
                let bm = store
                    .load(b.name)
                    .unwrap_or_else(|e| panic!("end: load {}: {e}", b.name));
                let g = b.granularity;
                if let Some(i) = b.must.iter().find(|&&i| !bm.is_dirty(i * g)) {
                    panic!("end: {} reads granule {i} clean in memory", b.name);
                }
            }
        }

        let store = self.take_store("end");
        let got = store.close();
        check("end: close", Ok(()), got);
        self.model.inactivated();
        self.model.reopened();
        let closed = expectations(&self.model, &self.model, true);
        let live = self.crash.live_image();
        self.check_image("end: closed", live, &closed, false);
    }
}

/// Fuzz target `ops_durable`. Input: cluster size `512 << (b0 % 4)`, disk size
/// `(u16 BE % 8192 + 1) · 512` (up to 4 MiB), a seed byte for the torn crash images, then
/// operations (see [`decode_op`]), at most [`MAX_OPS`].
///
/// The image is created on a `MemStorage` and becomes the durable base of a `CrashStorage`;
/// the store is opened writable and shared (`SharedStore`), so trackers can be taken. Every
/// operation's result is the model's (success or the documented typed refusal, which
/// writes nothing). At each crash point the input asks for (`DOp::Crash`, in the next
/// operation that writes) and at the end, the crash images (unsynced writes dropped, kept,
/// torn at 512 B) must open with no corruption, leak only inside an allocating operation,
/// record the durable mode from the first durable activation on, never hold a bitmap
/// `in_use`, and hold every granule the model requires (`expectations`). At the end the
/// live store must list the model's bitmaps and hold every required granule in memory, and
/// after `close` the image must be clean with the model's flags.
pub fn ops_durable(data: &[u8]) {
    let mut r = Bytes::new(data);
    let cs = 512u64 << (r.u8() % 4);
    let size = (u64::from(r.u16()) % 8192 + 1) * 512;
    let seed = u64::from(r.u8());
    let mut ops = Vec::new();
    while !r.is_empty() && ops.len() < MAX_OPS {
        ops.push(decode_op(&mut r));
    }
    let base = BitmapStore::create(MemStorage::new(), size, cs)
        .expect("create")
        .image()
        .storage()
        .to_vec();
    let crash = CrashStorage::from_bytes(base);
    let store = BitmapStore::open(&crash, OpenMode::ReadWrite).expect("open the created image");
    let mut h = Harness {
        crash: &crash,
        shared: Some(SharedStore::new(store)),
        model: Model {
            size,
            ..Model::default()
        },
        seed,
        handles: (0..HANDLES).map(|_| None).collect(),
        preloaded: None,
        tickets: Vec::new(),
        writes: Vec::new(),
        crash_at: None,
        crashes: 0,
        refused: false,
        trace: std::env::var_os("OPS_DURABLE_TRACE").is_some(),
    };
    for (i, op) in ops.iter().enumerate() {
        h.step(i, op);
    }
    h.finish();
}
