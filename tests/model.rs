//! Model test: random sequences of every `DirtyBitmap` operation, checked against a
//! `BTreeSet` of dirty bits, a `BTreeSet` of changed regions for the primary change map,
//! and one for a `ChangeConsumer`'s map.
//!
//! proptest prints the failing case (and keeps it in `tests/model.proptest-regressions`), and
//! each test prints its seed, so `DBM_TEST_SEED=<seed>` replays its whole run of cases.

use std::collections::BTreeSet;
use std::sync::Arc;

use dirty_bitmap::{ConsumerStart, DirtyBitmap};
use proptest::prelude::*;

mod common;

#[derive(Debug, Clone)]
struct Geo {
    disk_size: u64,
    granularity: u64,
    region_size: u64,
}

impl Geo {
    fn nbits(&self) -> u64 {
        self.disk_size.div_ceil(self.granularity)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Mark(u64, u64),
    Clear(u64, u64),
    SetEnabled(bool),
    TakeChanged,
    TakeDirty,
    Merge(Vec<(u64, u64)>),
    /// A merge from a bitmap at `granularity << shift` (`shift` > 0) or `>> -shift`.
    MergeOtherGranularity(i8, Vec<(u64, u64)>),
    MergeMismatch,
    Snapshot,
    Resize(u64),
    RoundTrip(u64),
    Load(u64, Vec<u8>),
    Query(u64),
    TakeConsumer,
    /// Drops the consumer and adds a new one, with every region (true) or none.
    ReplaceConsumer(bool),
}

/// The model: exact bits, exact changed regions of the primary map and of the consumer's.
struct Model {
    geo: Geo,
    bits: BTreeSet<u64>,
    changed: BTreeSet<u64>,
    consumed: BTreeSet<u64>,
    enabled: bool,
}

impl Model {
    fn region_of(&self, bit: u64) -> u64 {
        bit / (self.geo.region_size * 8)
    }
    fn nregions(&self) -> u64 {
        self.geo.nbits().div_ceil(8).div_ceil(self.geo.region_size)
    }
    fn set(&mut self, bit: u64) {
        if self.bits.insert(bit) {
            self.changed(self.region_of(bit));
        }
    }
    /// A change of region `r`: in the primary map and in the consumer's.
    fn changed(&mut self, r: u64) {
        self.changed.insert(r);
        self.consumed.insert(r);
    }
    fn unset(&mut self, bit: u64) {
        if self.bits.remove(&bit) {
            self.changed(self.region_of(bit));
        }
    }
    /// Touched bits of a byte range (outward rounding, clamped).
    fn touched(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 || off >= self.geo.disk_size {
            return 0..0;
        }
        let last = off.saturating_add(len - 1).min(self.geo.disk_size - 1);
        off / self.geo.granularity..last / self.geo.granularity + 1
    }
    /// Fully covered bits (inward rounding; the last partial granule counts at disk end).
    fn covered(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 || off >= self.geo.disk_size {
            return 0..0;
        }
        let end = off.saturating_add(len).min(self.geo.disk_size);
        let first = off.div_ceil(self.geo.granularity);
        let last = if end == self.geo.disk_size {
            self.geo.nbits()
        } else {
            end / self.geo.granularity
        };
        first..last.max(first)
    }
    fn extents(&self) -> Vec<(u64, u64)> {
        let g = self.geo.granularity;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &b in &self.bits {
            let s = b * g;
            let e = ((b + 1) * g).min(self.geo.disk_size);
            match out.last_mut() {
                Some((os, ol)) if *os + *ol == s => *ol = e - *os,
                _ => out.push((s, e - s)),
            }
        }
        out
    }
    fn serialize(&self, region: u64) -> Vec<u8> {
        let total = self.geo.nbits().div_ceil(8);
        let start = region * self.geo.region_size;
        let len = (total - start).min(self.geo.region_size);
        let mut out = vec![0u8; len as usize];
        let first_bit = start * 8;
        for &b in self.bits.range(first_bit..first_bit + len * 8) {
            let rel = b - first_bit;
            out[(rel / 8) as usize] |= 1 << (rel % 8);
        }
        out
    }
}

fn geo_strategy() -> impl Strategy<Value = Geo> {
    (
        9u32..=13,
        prop::sample::select(vec![
            1u64, 2, 63, 64, 65, 511, 512, 513, 4097, 32_775, 40_000, 300_001, 2_200_000,
        ]),
        prop::sample::select(vec![512u64, 1024, 4096]),
        any::<u64>(),
    )
        .prop_map(|(gb, nbits, region_size, partial)| {
            let g = 1u64 << gb;
            Geo {
                disk_size: (nbits - 1) * g + 1 + partial % g,
                granularity: g,
                region_size,
            }
        })
}

fn range_strategy(geo: &Geo) -> impl Strategy<Value = (u64, u64)> {
    let g = geo.granularity;
    let disk = geo.disk_size;
    let nbits = geo.nbits();
    (
        0..nbits + 2,
        0..g,
        prop_oneof![
            4 => 0u64..8,
            3 => 0u64..200,
            1 => 0u64..50_000,
        ],
        0..g,
        any::<bool>(),
    )
        .prop_map(move |(bit, dstart, nb, dlen, aligned)| {
            let off = if aligned { bit * g } else { bit * g + dstart };
            let len = if aligned { nb * g } else { nb * g + dlen };
            (off.min(disk + 3 * g), len)
        })
}

fn ops_strategy(geo: Geo) -> impl Strategy<Value = (Geo, Vec<Op>)> {
    let g = geo.granularity;
    let disk = geo.disk_size;
    let nregions = geo.nbits().div_ceil(8).div_ceil(geo.region_size);
    let rs = geo.region_size as usize;
    let op = prop_oneof![
        10 => range_strategy(&geo).prop_map(|(o, l)| Op::Mark(o, l)),
        4 => range_strategy(&geo).prop_map(|(o, l)| Op::Clear(o, l)),
        1 => any::<bool>().prop_map(Op::SetEnabled),
        2 => Just(Op::TakeChanged),
        1 => Just(Op::TakeDirty),
        1 => prop::collection::vec(range_strategy(&geo), 0..4).prop_map(Op::Merge),
        1 => (prop_oneof![Just(-2i8), Just(-1), Just(1), Just(3)], prop::collection::vec(range_strategy(&geo), 0..4))
            .prop_map(|(s, r)| Op::MergeOtherGranularity(s, r)),
        1 => Just(Op::MergeMismatch),
        1 => Just(Op::Snapshot),
        1 => (1u64..disk * 2 + 1).prop_map(Op::Resize),
        2 => (0..nregions).prop_map(Op::RoundTrip),
        1 => (0..nregions, prop::collection::vec(any::<u8>(), rs)).prop_map(|(r, b)| Op::Load(r, b)),
        3 => (0..disk + 2 * g).prop_map(Op::Query),
        2 => Just(Op::TakeConsumer),
        1 => any::<bool>().prop_map(Op::ReplaceConsumer),
    ];
    (Just(geo), prop::collection::vec(op, 1..30))
}

fn check_queries(bm: &DirtyBitmap, m: &Model, probe: u64) {
    assert_eq!(bm.count(), m.bits.len() as u64, "count");
    let g = m.geo.granularity;
    let exp_bytes: u64 = m
        .bits
        .iter()
        .map(|&b| ((b + 1) * g).min(m.geo.disk_size) - b * g)
        .sum();
    assert_eq!(bm.dirty_bytes(), exp_bytes, "dirty_bytes");
    assert_eq!(
        bm.dirty_extents().collect::<Vec<_>>(),
        m.extents(),
        "extents"
    );
    let in_disk = probe < m.geo.disk_size;
    assert_eq!(
        bm.is_dirty(probe),
        in_disk && m.bits.contains(&(probe / g)),
        "is_dirty({probe})"
    );
    let exp_next_dirty = if in_disk {
        m.bits
            .range(probe / g..)
            .next()
            .map(|&b| (b * g).max(probe))
    } else {
        None
    };
    assert_eq!(bm.next_dirty(probe), exp_next_dirty, "next_dirty({probe})");
    let exp_next_clean = if in_disk {
        (probe / g..m.geo.nbits())
            .find(|b| !m.bits.contains(b))
            .map(|b| (b * g).max(probe))
    } else {
        None
    };
    assert_eq!(bm.next_clean(probe), exp_next_clean, "next_clean({probe})");
}

fn bits_of(bm: &DirtyBitmap) -> BTreeSet<u64> {
    let g = bm.granularity();
    bm.dirty_extents()
        .flat_map(|(o, l)| (o / g)..(o + l).div_ceil(g))
        .collect()
}

fn run(geo: Geo, ops: Vec<Op>) {
    let mut bm = Arc::new(
        DirtyBitmap::with_region_size(geo.disk_size, geo.granularity, geo.region_size).unwrap(),
    );
    let mut consumer = Some(bm.add_consumer(ConsumerStart::Empty).unwrap());
    let mut m = Model {
        geo: geo.clone(),
        bits: BTreeSet::new(),
        changed: BTreeSet::new(),
        consumed: BTreeSet::new(),
        enabled: true,
    };
    for op in ops {
        let mut probe = 0;
        match op {
            Op::Mark(o, l) => {
                bm.mark_dirty(o, l);
                if m.enabled {
                    for b in m.touched(o, l) {
                        m.set(b);
                    }
                }
                probe = o;
            }
            Op::Clear(o, l) => {
                bm.clear(o, l);
                for b in m.covered(o, l) {
                    m.unset(b);
                }
                probe = o;
            }
            Op::SetEnabled(e) => {
                bm.set_enabled(e);
                m.enabled = e;
                assert_eq!(bm.is_enabled(), e);
            }
            Op::TakeChanged => {
                let taken = bm.take_changed();
                let got: BTreeSet<u64> = taken.iter().collect();
                assert_eq!(got, m.changed, "take_changed");
                assert_eq!(taken.len(), m.changed.len() as u64);
                assert_eq!(taken.region_count(), m.nregions());
                m.changed.clear();
                assert_eq!(bm.changed_region_count(), 0);
            }
            Op::TakeDirty => {
                let taken = bm.take_dirty();
                assert_eq!(bits_of(&taken), m.bits, "take_dirty result");
                assert_eq!(taken.count(), m.bits.len() as u64);
                let taken_regions: BTreeSet<u64> = taken.take_changed().iter().collect();
                let exp: BTreeSet<u64> = m.bits.iter().map(|&b| m.region_of(b)).collect();
                assert_eq!(taken_regions, exp, "take_dirty result's change map");
                for b in std::mem::take(&mut m.bits) {
                    m.changed(m.region_of(b));
                }
            }
            Op::Merge(ranges) => {
                let other = DirtyBitmap::new(m.geo.disk_size, m.geo.granularity).unwrap();
                for &(o, l) in &ranges {
                    other.mark_dirty(o, l);
                }
                // Merge ignores the enabled flag: it works on disabled bitmaps too.
                bm.merge_from(&other).unwrap();
                for (o, l) in ranges {
                    for b in m.touched(o, l) {
                        m.set(b);
                    }
                }
            }
            Op::MergeOtherGranularity(shift, ranges) => {
                let g = if shift > 0 {
                    m.geo.granularity << shift
                } else {
                    (m.geo.granularity >> -shift).max(512)
                };
                let other = DirtyBitmap::new(m.geo.disk_size, g).unwrap();
                for &(o, l) in &ranges {
                    other.mark_dirty(o, l);
                }
                // Merge ignores the enabled flag, and takes another granularity as QEMU's
                // `hbitmap_merge` does: each of the other's dirty granules dirties every
                // granule of ours its bytes touch.
                bm.merge_from(&other).unwrap();
                for (o, l) in ranges {
                    if l == 0 || o >= m.geo.disk_size {
                        continue;
                    }
                    let last = o.saturating_add(l - 1).min(m.geo.disk_size - 1);
                    let (start, end) = (o / g * g, (last / g + 1).saturating_mul(g));
                    for b in m.touched(start, end - start) {
                        m.set(b);
                    }
                }
            }
            Op::MergeMismatch => {
                let other =
                    DirtyBitmap::new(m.geo.disk_size + m.geo.granularity, m.geo.granularity)
                        .unwrap();
                assert!(bm.merge_from(&other).is_err());
            }
            Op::Snapshot => {
                let snap = bm.snapshot();
                assert_eq!(bits_of(&snap), m.bits, "snapshot bits");
                assert_eq!(snap.is_enabled(), m.enabled);
                let snap_changed: BTreeSet<u64> = snap.take_changed().iter().collect();
                assert_eq!(snap_changed, m.changed, "snapshot change map");
                // The copy is independent.
                snap.mark_dirty(0, m.geo.disk_size);
                assert_eq!(bm.count(), m.bits.len() as u64);
            }
            Op::Resize(new_size) => {
                // A consumer holds the bitmap's Arc: resizing needs it gone.
                drop(consumer.take());
                Arc::get_mut(&mut bm)
                    .expect("no consumer holds the bitmap")
                    .resize(new_size)
                    .unwrap();
                consumer = Some(bm.add_consumer(ConsumerStart::AllRegions).unwrap());
                m.geo.disk_size = new_size;
                let nbits = m.geo.nbits();
                m.bits.retain(|&b| b < nbits);
                m.changed = (0..m.nregions()).collect();
                m.consumed = (0..m.nregions()).collect();
                assert_eq!(bm.disk_size(), new_size);
                assert_eq!(bm.bit_count(), nbits);
            }
            Op::RoundTrip(r) => {
                let r = r % m.nregions();
                let mut buf = vec![0u8; bm.region_len(r) as usize];
                bm.serialize_region(r, &mut buf).unwrap();
                assert_eq!(buf, m.serialize(r), "serialize_region({r})");
                let fresh = DirtyBitmap::with_region_size(
                    m.geo.disk_size,
                    m.geo.granularity,
                    m.geo.region_size,
                )
                .unwrap();
                fresh.load_region(r, &buf).unwrap();
                let first = r * m.geo.region_size * 8;
                let last = first + m.geo.region_size * 8;
                let exp: BTreeSet<u64> = m.bits.range(first..last).copied().collect();
                assert_eq!(bits_of(&fresh), exp, "load_region({r})");
                assert_eq!(
                    fresh.changed_region_count(),
                    0,
                    "load_region leaves the change map"
                );
                let mut short = vec![0u8; buf.len() + 1];
                assert!(bm.serialize_region(r, &mut short).is_err());
                assert!(bm.serialize_region(m.nregions(), &mut buf).is_err());
            }
            Op::Load(r, bytes) => {
                let r = r % m.nregions();
                let len = bm.region_len(r) as usize;
                bm.load_region(r, &bytes[..len]).unwrap();
                let first = r * m.geo.region_size * 8;
                let nbits = m.geo.nbits();
                let stale: Vec<u64> = m
                    .bits
                    .range(first..first + len as u64 * 8)
                    .copied()
                    .collect();
                let mut loaded = Vec::new();
                for (i, byte) in bytes[..len].iter().enumerate() {
                    for k in 0..8 {
                        let b = first + i as u64 * 8 + k;
                        if byte & (1 << k) != 0 && b < nbits {
                            loaded.push(b);
                        }
                    }
                }
                // The primary map is left alone (the bytes are what is on disk); for the
                // consumer a load that changes a bit is a change.
                if stale != loaded {
                    m.consumed.insert(r);
                }
                for b in stale {
                    m.bits.remove(&b);
                }
                m.bits.extend(loaded);
            }
            Op::Query(p) => probe = p,
            Op::TakeConsumer => {
                let c = consumer.as_ref().unwrap();
                let got: BTreeSet<u64> = c.take_changed().iter().collect();
                assert_eq!(got, m.consumed, "the consumer's take");
                m.consumed.clear();
            }
            Op::ReplaceConsumer(all) => {
                drop(consumer.take());
                assert_eq!(bm.consumer_count(), 0);
                let start = if all {
                    ConsumerStart::AllRegions
                } else {
                    ConsumerStart::Empty
                };
                consumer = Some(bm.add_consumer(start).unwrap());
                m.consumed = if all {
                    (0..m.nregions()).collect()
                } else {
                    BTreeSet::new()
                };
            }
        }
        check_queries(&bm, &m, probe);
        assert_eq!(bm.changed_region_count(), m.changed.len() as u64);
        assert_eq!(
            consumer.as_ref().unwrap().changed_region_count(),
            m.consumed.len() as u64,
            "the consumer's count"
        );
    }
}

proptest! {
    #![proptest_config(common::seeded_proptest(ProptestConfig { cases: 256, ..ProptestConfig::default() }))]

    #[test]
    fn bitmap_matches_btreeset_model((geo, ops) in geo_strategy().prop_flat_map(ops_strategy)) {
        run(geo, ops);
    }
}

/// Bits of a bitmap whose any tower has three levels: 2^22 granules of 512 bytes, 8,192
/// blocks, 128 level-1 words, 2 level-2 words.
const TALL_BITS: u64 = 1 << 22;
const TALL_G: u64 = 512;

/// A run's first bit: anywhere, or within two bits of a block, level-1-word or
/// level-2-word boundary (512, 32,768 and 2,097,152 bits), where an iterator's step moves
/// to the next word of a tower level.
fn tall_start() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..TALL_BITS,
        (
            prop::sample::select(vec![512u64, 32_768, 2_097_152]),
            0..TALL_BITS,
            0u64..4
        )
            .prop_map(|(unit, at, d)| (at / unit * unit + d).saturating_sub(2) % TALL_BITS),
    ]
}

fn runs_strategy(max: usize) -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((tall_start(), 1u64..130), 0..max)
}

fn mark_runs(bm: &DirtyBitmap, bits: &mut BTreeSet<u64>, runs: &[(u64, u64)]) {
    for &(s, n) in runs {
        let e = (s + n).min(TALL_BITS);
        bm.mark_dirty(s * TALL_G, (e - s) * TALL_G);
        bits.extend(s..e);
    }
}

/// `bits` as merged byte extents.
fn extents_of(bits: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in bits {
        match out.last_mut() {
            Some((o, l)) if *o + *l == b * TALL_G => *l += TALL_G,
            _ => out.push((b * TALL_G, TALL_G)),
        }
    }
    out
}

proptest! {
    #![proptest_config(common::seeded_proptest(ProptestConfig { cases: 128, ..ProptestConfig::default() }))]

    /// `dirty_extents` steps between blocks through the words its cursor keeps
    /// (`AnyTower::next_block_kept`); here the steps cross level-1 and level-2 words and
    /// runs end in their own word, the next, or further on.
    #[test]
    fn extents_match_the_bits_across_tower_words(runs in runs_strategy(80)) {
        let bm = DirtyBitmap::new(TALL_BITS * TALL_G, TALL_G).unwrap();
        let mut bits = BTreeSet::new();
        mark_runs(&bm, &mut bits, &runs);
        prop_assert_eq!(bm.dirty_extents().collect::<Vec<_>>(), extents_of(&bits));
    }

    /// A clear that empties a block moves the tower's guard, so an iterator drops the
    /// words it kept: a run marked ahead of it after that clear, in words its cursor had
    /// already loaded, is found, and the emptied block is not reported.
    #[test]
    fn an_iterator_rereads_the_tower_after_a_clear(
        runs in runs_strategy(40),
        later in runs_strategy(8),
        taken in 0usize..1000,
        emptied in 0..TALL_BITS / 512,
    ) {
        let bm = DirtyBitmap::new(TALL_BITS * TALL_G, TALL_G).unwrap();
        let mut bits = BTreeSet::new();
        mark_runs(&bm, &mut bits, &runs);
        mark_runs(&bm, &mut bits, &[(emptied * 512 + 7, 1)]);
        // At least one extent (the one just marked); take 1 to all of them.
        let taken = 1 + taken % extents_of(&bits).len();
        let mut it = bm.dirty_extents();
        let first: Vec<_> = it.by_ref().take(taken).collect();
        prop_assert_eq!(first.len(), taken);
        // The iterator resumes past the clean bit after its last extent; the clear and the
        // later marks land in blocks after the one it holds.
        let (o, l) = first[taken - 1];
        let pos = (o + l) / TALL_G + 1;
        let block = emptied.max(pos.div_ceil(512));
        prop_assume!(block < TALL_BITS / 512);
        mark_runs(&bm, &mut bits, &[(block * 512 + 7, 1)]);
        bm.clear(block * 512 * TALL_G, 512 * TALL_G);
        bits.retain(|&b| b / 512 != block);
        // Marks after the iterator read a block may be missed in that block (it keeps the
        // block as read): the later runs start in blocks it has not read.
        let unread = pos.div_ceil(512) * 512;
        let later: Vec<(u64, u64)> = later.into_iter().filter(|&(s, _)| s >= unread).collect();
        mark_runs(&bm, &mut bits, &later);
        let rest: Vec<_> = it.collect();
        prop_assert_eq!(rest, extents_of(&bits.range(pos..).copied().collect()));
    }
}

/// Once `dirty_extents` has returned `None` it keeps returning `None` (it is a
/// `FusedIterator`), also when a clear moves the tower's guard and a mark lands after the
/// end.
#[test]
fn extents_stay_finished_after_a_later_mark() {
    let bm = DirtyBitmap::new(TALL_BITS * TALL_G, TALL_G).unwrap();
    let far = 100 * 512 * TALL_G;
    bm.mark_dirty(0, TALL_G);
    bm.mark_dirty(far, TALL_G);
    let mut it = bm.dirty_extents();
    assert_eq!(it.next(), Some((0, TALL_G)));
    assert_eq!(it.next(), Some((far, TALL_G)));
    assert_eq!(it.next(), None);
    bm.clear(far, 512 * TALL_G);
    bm.mark_dirty(1 << 30, TALL_G);
    assert_eq!(it.next(), None);
}

/// The failures recorded in `tests/model.proptest-regressions`, replayed as they were
/// shrunk. Proptest keeps only each case's RNG seed, and a seed no longer regenerates its
/// case once the strategy changes (ops were added to it since): each line's `shrinks to`
/// text is parsed here and run as it stands, so the recorded cases keep running whatever
/// the strategy becomes. An op this parser does not know fails the test.
#[test]
fn recorded_regressions_replay_as_they_were_shrunk() {
    let text = include_str!("model.proptest-regressions");
    let (mut replayed, mut ops_run) = (0, 0);
    for line in text.lines().filter(|l| l.starts_with("cc ")) {
        let case = line
            .split_once("shrinks to (geo, ops) = (")
            .unwrap_or_else(|| panic!("no shrunk case in {line:?}"))
            .1;
        let (geo, ops) = parse_case(case).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        ops_run += ops.len();
        run(geo, ops);
        replayed += 1;
    }
    // Load then Clear, and Mark then Load: every op of both cases parsed.
    assert_eq!(
        (replayed, ops_run),
        (2, 4),
        "the file records two cases of two ops"
    );
}

/// Parses `Geo { disk_size: N, granularity: N, region_size: N }, [OP, ...])`, the Debug
/// form proptest recorded, for the ops `Mark`, `Clear` and `Load`.
fn parse_case(s: &str) -> Result<(Geo, Vec<Op>), String> {
    let num = |s: &str| -> Result<u64, String> {
        s.trim().parse().map_err(|_| format!("not a number: {s:?}"))
    };
    let field = |name: &str| -> Result<u64, String> {
        let at = s.find(&format!("{name}: ")).ok_or(format!("no {name}"))?;
        let rest = &s[at + name.len() + 2..];
        let end = rest
            .find([',', ' ', '}'])
            .ok_or(format!("unterminated {name}"))?;
        num(&rest[..end])
    };
    let geo = Geo {
        disk_size: field("disk_size")?,
        granularity: field("granularity")?,
        region_size: field("region_size")?,
    };
    let list = s
        .split_once("}, [")
        .ok_or("no op list")?
        .1
        .strip_suffix("])")
        .ok_or("the op list does not end the case")?;
    let mut ops = Vec::new();
    let mut rest = list.trim();
    while !rest.is_empty() {
        let open = rest.find('(').ok_or(format!("no '(' in {rest:?}"))?;
        let name = &rest[..open];
        let args = &rest[open + 1..];
        let (op, used) = match name {
            "Mark" | "Clear" => {
                let close = args.find(')').ok_or("unterminated op")?;
                let (a, b) = args[..close].split_once(',').ok_or("two numbers")?;
                let (a, b) = (num(a)?, num(b)?);
                let op = if name == "Mark" {
                    Op::Mark(a, b)
                } else {
                    Op::Clear(a, b)
                };
                (op, close + 1)
            }
            "Load" => {
                let (region, bytes) = args.split_once(", [").ok_or("Load(region, [bytes])")?;
                let close = bytes.find("])").ok_or("unterminated Load")?;
                let data = bytes[..close]
                    .split(',')
                    .map(|b| num(b).and_then(|v| u8::try_from(v).map_err(|e| e.to_string())))
                    .collect::<Result<Vec<u8>, String>>()?;
                let used = args.len() - bytes.len() + close + 2;
                (Op::Load(num(region)?, data), used)
            }
            other => return Err(format!("op {other:?} is not parsed here")),
        };
        ops.push(op);
        rest = args[used..].trim_start_matches(',').trim();
    }
    Ok((geo, ops))
}

/// Four tower levels (more than 2^27 bits: 128 GiB at 512 B, 32 MiB of words), which the
/// proptests above (three levels at most) never build: runs at and around each level's
/// boundaries (2^9, 2^15, 2^21 and 2^27 bits) and at the disk's partial end are found by
/// `dirty_extents`, `next_dirty` and `next_clean` as the bits say.
#[test]
fn a_four_level_tower_finds_runs_around_every_levels_boundaries() {
    use rand::RngExt;
    const BITS: u64 = (1 << 28) + 777;
    let (mut rng, _) = common::seeded_rng("four_level_tower");
    let bm = DirtyBitmap::new(BITS * TALL_G, TALL_G).unwrap();
    let mut bits = BTreeSet::new();
    let mark = |start: u64, len: u64, bits: &mut BTreeSet<u64>| {
        let len = len.min(BITS - start);
        bm.mark_dirty(start * TALL_G, len * TALL_G);
        bits.extend(start..start + len);
    };
    let mut probes = vec![0, BITS - 1];
    for _ in 0..80 {
        let level = [9u32, 15, 21, 27][rng.random_range(0..4usize)];
        let k = rng.random_range(1..=(BITS - 1) >> level);
        let start = (k << level)
            .saturating_add_signed(rng.random_range(-3i64..=3))
            .min(BITS - 1);
        mark(start, rng.random_range(1..300u64), &mut bits);
        probes.extend([k << level, (k << level) - 1, start.saturating_sub(1)]);
    }
    mark(BITS - 5, 5, &mut bits);
    assert_eq!(bm.dirty_extents().collect::<Vec<_>>(), extents_of(&bits));
    probes.extend(bits.iter().step_by(97).flat_map(|&b| [b, b + 1]));
    for p in probes.into_iter().filter(|&p| p < BITS) {
        let want_dirty = bits.range(p..).next().map(|&b| b * TALL_G);
        assert_eq!(
            bm.next_dirty(p * TALL_G),
            want_dirty,
            "next_dirty at bit {p}"
        );
        let want_clean = (p..BITS).find(|b| !bits.contains(b)).map(|b| b * TALL_G);
        assert_eq!(
            bm.next_clean(p * TALL_G),
            want_clean,
            "next_clean at bit {p}"
        );
    }
}
