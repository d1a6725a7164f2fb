//! The durable-mode fuzz harness (`ops_durable`): sequences of operations on a store active
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
//! a mark acknowledged while the bitmap recorded (a `mark` that returned `Ok`, an intent
//! that `is_durable` said or `wait` returned), and every bit a store or merge that returned
//! put in; a clear that returned empties it. Extra dirty bits are always allowed. At a crash
//! point strictly inside an operation the disk must hold what both the model before and the
//! model after it require (so a torn clear, or a copy-on-write replacement, may lose the old
//! bits); at the operation's last log entry (it has returned) the model after it.
//!
//! See `docs/FUZZING.md` for the input format.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::OnceLock;

use dirty_bitmap::storage::{CrashMode, CrashStorage, MemStorage, Op as LogOp};
use dirty_bitmap::{
    BitmapState, BitmapStore, DirtyBitmap, DurableTracker, Error, Intent, OpenMode, Recording,
    SharedStore, StateProblem,
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
    /// Drops the tracker of `handle` (its intents keep their clone) and takes a new one.
    NewTracker {
        handle: usize,
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
    match r.u8() % 24 {
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
        2..=4 => {
            let handle = handle(r);
            let (offset, len) = range(r);
            DOp::Mark {
                handle,
                offset,
                len,
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
        10 => DOp::NewTracker { handle: handle(r) },
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
        18 | 19 => DOp::ActivateDurable,
        20 => DOp::Reopen,
        21 => DOp::AbandonReopen,
        _ => DOp::Crash { at: r.u8() },
    }
}

/// Whether the library makes directory changes durable on an active durable store
/// (`add` of a second bitmap succeeds there) rather than refusing them with
/// `WrongState(Durable)`. With them `set_enabled` writes the flag in place before it
/// returns; without them the flag reaches the disk at the inactivation. Probed once.
fn durable_edits() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| {
        let mut s = BitmapStore::create(MemStorage::new(), 1 << 20, 512).expect("create");
        s.add("a", 65536, Recording::Enabled).expect("add");
        s.activate_durable().expect("activate_durable");
        match s.add("b", 65536, Recording::Enabled) {
            Ok(()) => true,
            Err(Error::WrongState(StateProblem::Durable)) => false,
            Err(e) => panic!("add on a durable store: {e:?}"),
        }
    })
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
    /// Whether marks record into it: the in-memory flag while it has an in-memory copy,
    /// the `auto` flag otherwise.
    enabled: bool,
    /// The `auto` flag on disk.
    disk_enabled: bool,
    /// It has an in-memory copy from the store's current or last durable activation
    /// (active, or parked by an inactivate): the trackers mark it.
    tracked: bool,
    /// Granules the disk must hold (a superset is fine).
    must: BTreeSet<u64>,
    /// Cleared while parked. Open finding `tracker-acknowledges-after-inactive-clear`
    /// (`tests/durable.rs`, ignored): the trackers' durable bits still claim the bits the
    /// clear dropped, so a mark through them returns at once and its write is not on disk.
    /// Until it is fixed, a write acknowledged while inactive is not required of such a
    /// bitmap.
    cleared_parked: bool,
}

#[derive(Debug, Clone, Default)]
struct Model {
    size: u64,
    /// Active in durable mode.
    durable: bool,
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

    /// Parked bitmaps (an inactivate kept them): `activate_durable` needs a reopen.
    fn parked(&self) -> bool {
        !self.durable && self.bms.iter().any(|b| b.tracked)
    }

    /// A write of `[offset, offset + len)` was acknowledged: every bitmap the trackers
    /// mark and that records must hold it.
    fn ack(&mut self, offset: u64, len: u64) {
        let size = self.size;
        let durable = self.durable;
        for b in self.bms.iter_mut().filter(|b| b.tracked && b.enabled) {
            if durable || !b.cleared_parked {
                b.must.extend(granules(size, b.granularity, offset, len));
            }
        }
    }

    /// After a reopen: nothing in memory, the flags as on disk.
    fn reopened(&mut self) {
        self.durable = false;
        for b in &mut self.bms {
            b.tracked = false;
            b.cleared_parked = false;
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

/// What an image must show at a crash point inside an operation that took the model from
/// `before` to `after`; `returned` when the crash point is the operation's last log entry.
fn expectations(before: &Model, after: &Model, returned: bool) -> Vec<Expect> {
    NAMES
        .iter()
        .map(|&name| {
            let a = after.find(name).map(|i| &after.bms[i]);
            let b = before.find(name).map(|i| &before.bms[i]);
            if returned {
                return Expect {
                    name,
                    must_exist: a.is_some(),
                    may_exist: a.is_some(),
                    granularities: a.map(|a| a.granularity).into_iter().collect(),
                    flags: a.map(|a| a.disk_enabled).into_iter().collect(),
                    must: a.map(|a| a.must.clone()).unwrap_or_default(),
                };
            }
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
        .collect()
}

// ---------------------------------------------------------------------------------------
// Expected results
// ---------------------------------------------------------------------------------------

/// A typed refusal the model allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    InvalidInput,
    NotFound,
    Exists,
    State(StateProblem),
    Poisoned,
}

impl Refusal {
    fn matches(self, e: &Error) -> bool {
        match (self, e) {
            (Refusal::InvalidInput, Error::InvalidInput(_))
            | (Refusal::NotFound, Error::NotFound { .. })
            | (Refusal::Exists, Error::Exists { .. })
            | (Refusal::Poisoned, Error::Poisoned) => true,
            (Refusal::State(p), Error::WrongState(q)) => p == *q,
            _ => false,
        }
    }
}

/// What the model allows of one call: success, and these refusals.
#[derive(Debug, Clone)]
struct Allowed {
    ok: bool,
    refusals: Vec<Refusal>,
}

impl Allowed {
    fn ok() -> Self {
        Allowed {
            ok: true,
            refusals: Vec::new(),
        }
    }

    fn refused(r: Refusal) -> Self {
        Allowed {
            ok: false,
            refusals: vec![r],
        }
    }

    /// Success, or the first refusal `checks` finds.
    fn first(checks: impl IntoIterator<Item = Option<Refusal>>) -> Self {
        checks
            .into_iter()
            .flatten()
            .next()
            .map_or_else(Allowed::ok, Allowed::refused)
    }

    fn or_ok(mut self) -> Self {
        self.ok = true;
        self
    }

    fn or(mut self, r: Refusal) -> Self {
        self.refusals.push(r);
        self
    }

    /// A directory change on an active durable store may also be refused as such.
    fn or_durable(self, durable: bool) -> Self {
        if durable {
            self.or(Refusal::State(StateProblem::Durable))
        } else {
            self
        }
    }
}

/// Checks `got` against `allowed`: `Some(value)` on an allowed success, `None` on an
/// allowed refusal; anything else is a finding.
fn check<T>(ctx: &str, allowed: &Allowed, got: dirty_bitmap::Result<T>) -> Option<T> {
    match got {
        Ok(v) if allowed.ok => Some(v),
        Ok(_) => panic!("{ctx}: succeeded; expected one of {:?}", allowed.refusals),
        Err(e) if allowed.refusals.iter().any(|r| r.matches(&e)) => None,
        Err(e) => panic!(
            "{ctx}: {e:?}; expected {}{:?}",
            if allowed.ok { "success or " } else { "" },
            allowed.refusals
        ),
    }
}

// ---------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------

type Store<'a> = BitmapStore<&'a CrashStorage>;

struct Handle<'a> {
    tracker: DurableTracker<&'a CrashStorage>,
    /// Taken when the store had no bitmap it marks: it may refuse every intent.
    empty: bool,
}

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
    handles: Vec<Option<Handle<'a>>>,
    tickets: Vec<Ticket<'a>>,
    /// The crash point asked for the next operation that writes.
    crash_at: Option<u8>,
    crashes: usize,
    /// Crash images refused for the known torn-header limit (`docs/CRASH-CONSISTENCY.md`).
    torn_headers: usize,
    /// Whether the current operation was refused (then it must write nothing).
    refused: bool,
    /// Prints each operation and its log range (`OPS_DURABLE_TRACE` set).
    trace: bool,
}

impl<'a> Harness<'a> {
    fn shared(&self) -> &SharedStore<&'a CrashStorage> {
        self.shared.as_ref().expect("the store is open")
    }

    fn lock(&self) -> dirty_bitmap::StoreGuard<'_, &'a CrashStorage> {
        self.shared().lock()
    }

    fn check<T>(
        &mut self,
        ctx: &str,
        allowed: &Allowed,
        got: dirty_bitmap::Result<T>,
    ) -> Option<T> {
        let r = check(ctx, allowed, got);
        self.refused |= r.is_none();
        r
    }

    /// The tracker of `handle`, taken from the store if there is none.
    fn tracker(&mut self, ctx: &str, handle: usize) -> Option<DurableTracker<&'a CrashStorage>> {
        if let Some(h) = &self.handles[handle] {
            return Some(h.tracker.clone());
        }
        let allowed = if self.model.durable {
            Allowed::ok()
        } else {
            Allowed::refused(Refusal::State(StateProblem::NotDurable))
        };
        let got = self.shared().durable_tracker();
        let t = self.check(ctx, &allowed, got)?;
        self.handles[handle] = Some(Handle {
            tracker: t.clone(),
            empty: !self.model.bms.iter().any(|b| b.tracked),
        });
        Some(t)
    }

    /// What a call that may commit allows: success while durable; once the store was
    /// inactivated, the commit's refusal (or the tracker's `Poisoned` after one), or
    /// success when the fast path finds the range durable.
    fn commit_allowed(&self) -> Allowed {
        if self.model.durable {
            Allowed::ok()
        } else {
            Allowed::ok()
                .or(Refusal::State(StateProblem::NotActive))
                .or(Refusal::Poisoned)
        }
    }

    /// `(offset, len)` placed on the disk, and whether it lies inside it.
    fn placed(&self, offset: u64, len: u64) -> (u64, u64, bool) {
        let size = self.model.size;
        let (o, l) = place(size, offset, len).expect("a non-empty disk");
        (o, l, o.checked_add(l).is_some_and(|e| e <= size))
    }

    /// Runs `op`, checks its result against the model and updates the model.
    fn run(&mut self, ctx: &str, op: &DOp) {
        let size = self.model.size;
        let durable = self.model.durable;
        match *op {
            DOp::Add {
                name,
                granularity,
                enabled,
            } => {
                let n = NAMES[name];
                let allowed = Allowed::first([self.model.find(n).map(|_| Refusal::Exists)])
                    .or_durable(durable);
                let got = self.lock().add(n, granularity, recording(enabled));
                if self.check(ctx, &allowed, got).is_some() {
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
                        cleared_parked: false,
                    });
                }
            }
            DOp::Remove { name } => {
                let n = NAMES[name];
                let allowed =
                    Allowed::first([self.model.find(n).is_none().then_some(Refusal::NotFound)])
                        .or_durable(durable);
                let got = self.lock().remove(n);
                if self.check(ctx, &allowed, got).is_some() {
                    self.model.bms.retain(|b| b.name != n);
                }
            }
            DOp::Mark {
                handle,
                offset,
                len,
            } => {
                let Some(t) = self.tracker(ctx, handle) else {
                    return;
                };
                let (o, l, inside) = self.placed(offset, len);
                let allowed = if inside {
                    self.commit_allowed()
                } else if self.model.bms.iter().any(|b| b.tracked && b.enabled) {
                    Allowed::refused(Refusal::InvalidInput)
                } else {
                    // Open finding `mark-past-the-disk-succeeds-when-nothing-records`
                    // (`tests/durable.rs`, ignored): the fast path answers before the range
                    // is checked.
                    Allowed::refused(Refusal::InvalidInput).or_ok()
                };
                if self.check(ctx, &allowed, t.mark(o, l)).is_some() {
                    self.model.ack(o, l);
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
                let Some(t) = self.tracker(ctx, handle) else {
                    return;
                };
                let (o, l, inside) = self.placed(offset, len);
                let empty = self.handles[handle].as_ref().is_some_and(|h| h.empty)
                    || !self.model.bms.iter().any(|b| b.tracked);
                let allowed = if !inside {
                    Allowed::refused(Refusal::InvalidInput)
                } else if empty {
                    // A tracker over no bitmap knows no disk size.
                    Allowed::ok().or(Refusal::InvalidInput)
                } else {
                    Allowed::ok()
                };
                if let Some(intent) = self.check(ctx, &allowed, t.intent(o, l)) {
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
                    let t = self.tickets.remove(k);
                    self.model.ack(t.offset, t.len);
                }
            }
            DOp::Wait { ticket } => {
                if self.tickets.is_empty() {
                    return;
                }
                let t = self.tickets.remove(ticket % self.tickets.len());
                let allowed = self.commit_allowed();
                if self.check(ctx, &allowed, t.intent.wait()).is_some() {
                    self.model.ack(t.offset, t.len);
                }
            }
            DOp::Commit { handle } => {
                let Some(t) = self.tracker(ctx, handle) else {
                    return;
                };
                let allowed = if durable {
                    Allowed::ok()
                } else {
                    Allowed::refused(Refusal::State(StateProblem::NotActive)).or(Refusal::Poisoned)
                };
                self.check(ctx, &allowed, t.commit());
            }
            DOp::NewTracker { handle } => {
                self.handles[handle] = None;
                let _ = self.tracker(ctx, handle);
            }
            DOp::Flush => {
                let allowed = if durable {
                    Allowed::ok()
                } else {
                    Allowed::refused(Refusal::State(StateProblem::NotActive))
                };
                let got = self.lock().flush();
                self.check(ctx, &allowed, got);
            }
            DOp::Clear { name } => {
                let n = NAMES[name];
                let allowed =
                    Allowed::first([self.model.find(n).is_none().then_some(Refusal::NotFound)]);
                let got = self.lock().clear(n);
                if self.check(ctx, &allowed, got).is_some() {
                    let b = self.model.bm(n);
                    b.must.clear();
                    b.cleared_parked |= !durable && b.tracked;
                }
            }
            DOp::SetEnabled { name, enabled } => {
                let n = NAMES[name];
                let allowed =
                    Allowed::first([self.model.find(n).is_none().then_some(Refusal::NotFound)]);
                let got = self.lock().set_enabled(n, enabled);
                if self.check(ctx, &allowed, got).is_some() {
                    let b = self.model.bm(n);
                    b.enabled = enabled;
                    if !durable || durable_edits() {
                        b.disk_enabled = enabled;
                    }
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
                let allowed = Allowed::first([
                    found.is_none().then_some(Refusal::NotFound),
                    wrong_granularity.then_some(Refusal::InvalidInput),
                ])
                .or_durable(durable);
                let got = self.lock().store(n, &bm);
                if self.check(ctx, &allowed, got).is_some() {
                    let b = self.model.bm(n);
                    if b.tracked {
                        // ORed into the in-memory copy (active or parked), durable as a
                        // whole when it returns.
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
                let allowed = Allowed::first([
                    content.is_none().then_some(Refusal::NotFound),
                    self.model.find(d).is_none().then_some(Refusal::NotFound),
                ])
                .or_durable(durable);
                let got = self.lock().merge(s, d);
                if self.check(ctx, &allowed, got).is_some() {
                    self.merged(d, &content.expect("the source exists"));
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
                let allowed =
                    Allowed::first([self.model.find(d).is_none().then_some(Refusal::NotFound)])
                        .or_durable(durable);
                let got = self.lock().merge_from(&other, "s", d);
                if self.check(ctx, &allowed, got).is_some() {
                    self.merged(d, &src);
                }
            }
            DOp::Inactivate => {
                let got = self.lock().inactivate();
                self.check(ctx, &Allowed::ok(), got);
                self.inactivated();
            }
            DOp::ActivateDurable => {
                let allowed = Allowed::first([
                    durable.then_some(Refusal::State(StateProblem::Active)),
                    self.model
                        .parked()
                        .then_some(Refusal::State(StateProblem::ParkedBitmaps)),
                ]);
                let got = self.lock().activate_durable();
                if self.check(ctx, &allowed, got).is_some() {
                    // Open finding `tracker-of-an-earlier-activation-after-reactivation`
                    // (`tests/durable.rs`, ignored): a tracker of an earlier activation
                    // marks that activation's bitmaps, so its marks return without marking
                    // these, or never return. Until it is fixed, they are dropped here.
                    self.drop_handles();
                    self.model.durable = true;
                    for b in &mut self.model.bms {
                        b.tracked = true;
                        b.cleared_parked = false;
                    }
                }
            }
            DOp::Reopen => {
                let store = self.take_store(ctx);
                let got = store.close();
                self.check(ctx, &Allowed::ok(), got);
                self.inactivated();
                self.reopen(ctx);
            }
            DOp::AbandonReopen => {
                drop(self.take_store(ctx));
                self.reopen(ctx);
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

    /// An inactivation returned: the `auto` flags are the in-memory ones, the copies parked.
    fn inactivated(&mut self) {
        if self.model.durable {
            for b in self.model.bms.iter_mut().filter(|b| b.tracked) {
                b.disk_enabled = b.enabled;
            }
        }
        self.model.durable = false;
    }

    fn drop_handles(&mut self) {
        self.tickets.clear();
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
        // Allocating and freeing operations may leak while they run; commits in place,
        // clears in durable mode and the flags written in place never do.
        let leaks = match op {
            DOp::Add { .. }
            | DOp::Remove { .. }
            | DOp::Store { .. }
            | DOp::Merge { .. }
            | DOp::MergeFrom { .. }
            | DOp::ActivateDurable => p < end,
            DOp::Clear { .. } | DOp::SetEnabled { .. } => !before.durable && p < end,
            _ => false,
        };
        let exp = expectations(&before, &self.model, p == end);
        let cctx = format!("{ctx}: crash after log op {p} ({start}..{end})");
        self.check_crash(&cctx, p, &exp, leaks);
    }

    /// The crash images at log point `p`, unsynced writes dropped, kept and torn (one
    /// image right after a barrier), against `exp`.
    fn check_crash(&mut self, ctx: &str, p: usize, exp: &[Expect], leaks: bool) {
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
            self.check_image(&format!("{ctx}, {mode:?}"), image, mode, exp, leaks);
        }
    }

    /// One image against `exp`: it opens (a torn cluster-0 write may be refused, the known
    /// limit), has no corruption, leaks only if `leaks`, has the model's disk size, and each
    /// bitmap is one `exp` allows, consistent and not `in_use`, with an allowed granularity
    /// and flag, holding every granule it must.
    fn check_image(
        &mut self,
        ctx: &str,
        image: Vec<u8>,
        mode: CrashMode,
        exp: &[Expect],
        leaks: bool,
    ) {
        let s = match BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadOnly) {
            Ok(s) => s,
            // The known limit of docs/CRASH-CONSISTENCY.md ("a torn cluster-0 write"):
            // refused as corrupt, never falsely clean; tests/crash.rs accepts it too.
            Err(e)
                if matches!(mode, CrashMode::Torn { .. })
                    && e.to_string().contains("nb_bitmaps 0") =>
            {
                self.torn_headers += 1;
                return;
            }
            Err(e) => panic!("{ctx}: the image does not open: {e}"),
        };
        let r = s.image().check().expect("check runs");
        assert_eq!(r.corruptions, 0, "{ctx}: corrupt: {:?}", r.messages);
        assert!(
            leaks || r.leaks == 0,
            "{ctx}: {} leaked clusters: {:?}",
            r.leaks,
            r.messages
        );
        assert_eq!(s.disk_size(), self.model.size, "{ctx}: disk size");
        let list = s.list();
        for e in exp {
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
                    "{ctx}: {} lacks granule {i} (offset {}), which an acknowledged mark, a \
                     store or a merge put there; it holds {:?}",
                    e.name,
                    i * g,
                    bm.dirty_extents().collect::<Vec<_>>()
                );
            }
        }
        assert_eq!(
            list.len(),
            list.iter()
                .filter(|i| NAMES.iter().any(|n| i.name.as_bytes() == n.as_bytes()))
                .count(),
            "{ctx}: a bitmap the operations never named"
        );
    }

    /// The end: a crash now (every acknowledged mark is durable), the live store against
    /// the model, then `close` and the closed image, flags and all.
    fn finish(&mut self) {
        let end = self.crash.op_count();
        let now = expectations(&self.model, &self.model, true);
        self.check_crash(&format!("end: crash after log op {end}"), end, &now, false);

        {
            let store = self.lock();
            let names: Vec<String> = store.list().iter().map(|i| i.name.to_string()).collect();
            let want: Vec<&str> = self.model.bms.iter().map(|b| b.name).collect();
            assert_eq!(names, want, "end: bitmaps");
            assert_eq!(store.is_durable(), self.model.durable, "end: durable");
            for (info, b) in store.list().iter().zip(&self.model.bms) {
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
        check("end: close", &Allowed::ok(), got);
        self.inactivated();
        self.model.reopened();
        let closed = expectations(&self.model, &self.model, true);
        let live = self.crash.live_image();
        self.check_image("end: closed", live, CrashMode::Kept, &closed, false);
    }
}

/// Fuzz target `ops_durable`. Input: cluster size `512 << (b0 % 4)`, disk size
/// `(u16 BE % 8192 + 1) · 512` (up to 4 MiB), a seed byte for the torn crash images, then
/// operations (see [`decode_op`]), at most [`MAX_OPS`].
///
/// The image is created on a `MemStorage` and becomes the durable base of a `CrashStorage`;
/// the store is opened writable and shared (`SharedStore`), so trackers can be taken. Every
/// operation's result is the model's (success or a documented typed refusal, which writes
/// nothing). At each crash point the input asks for (`DOp::Crash`, the next operation that
/// writes) and at the end, the crash images (unsynced writes dropped, kept, torn at 512 B)
/// must open with no corruption, leak only inside an allocating operation, never hold a
/// bitmap `in_use`, and hold every granule the model requires (`expectations`). At the end
/// the live store must list the model's bitmaps and hold every required granule in memory,
/// and after `close` the image must be clean with the model's flags.
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
        tickets: Vec::new(),
        crash_at: None,
        crashes: 0,
        torn_headers: 0,
        refused: false,
        trace: std::env::var_os("OPS_DURABLE_TRACE").is_some(),
    };
    for (i, op) in ops.iter().enumerate() {
        h.step(i, op);
    }
    h.finish();
}
