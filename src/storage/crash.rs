//! [`CrashStorage`]: records every operation and builds the images a crash could leave.

use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;

use super::memory::{read_slice, resize, write_clipped, write_slice};
use super::{Storage, SECTOR_SIZE};
use crate::error::{invalid_input, Result};
use crate::rng::SplitMix64;


/// One logged mutating call of a [`CrashStorage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A successful [`write_all_at`](Storage::write_all_at) of at least one byte.
    Write {
        /// Where it was written.
        offset: u64,
        /// What was written.
        data: Arc<[u8]>,
    },
    /// A successful [`set_len`](Storage::set_len).
    SetLen(u64),
    /// A [`sync_data`](Storage::sync_data): everything before it is durable.
    Sync,
    /// A barrier that failed ([`CrashStorage::fail_sync`]): the writes since the previous
    /// barrier never land, at this point or at any later barrier, while reads still return
    /// them (until [`forget_cached`](Storage::forget_cached)). Its length changes are the
    /// file system's metadata, which a failed data writeback does not undo: they stay
    /// pending into the next unsynced tail (they land at the next barrier, and a crash
    /// before it may or may not have them). Linux
    /// marks the pages of a failed writeback clean without writing them and reports the
    /// error once, so a later `fdatasync` succeeds without writing them. This models the
    /// case where none of them landed; some sectors of a partial writeback may land in
    /// reality, which the model does not produce. Nor does it produce a lost byte landing
    /// after all: a later write into the same page dirties it again, and Linux then writes
    /// the whole page, the lost bytes too, where the model keeps only the later write.
    FailedSync,
}

/// How much of the unsynced tail a crash image keeps; see [`CrashStorage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every write and length change since the last sync is lost.
    Dropped,
    /// Every write and length change since the last sync landed.
    Kept,
    /// A seeded pseudo-random subset of the unsynced sectors and length changes landed.
    /// The same seed, log and crash point always give the same image.
    Torn {
        /// Seeds the generator that picks what landed.
        seed: u64,
    },
}

/// An in-memory storage that logs every operation and builds crash images from the log.
///
/// Reads see the *live* image. [`crash_image`](Self::crash_image) builds the image a crash
/// after any prefix of the log could leave, from the *durable* state at the last sync before
/// that point plus the chosen fate of the unsynced tail. A test tool: run an operation once,
/// then reopen the image built at every [`crash_points`](Self::crash_points) entry.
///
/// The log holds every byte ever written, so this is meant for small test images.
///
/// # The crash-image model
///
/// The storage starts from a *base* image, durable by definition, and logs every successful
/// mutating call as an [`Op`]. A crash "after `k` ops" happens once `ops[..k]` were issued.
/// Let `s` be the last [`Op::Sync`] among them. Everything before `s` is durable: it is
/// replayed onto the base unconditionally. The ops between `s` and the crash point (the
/// *unsynced tail*; it holds no sync) are what the crash may lose, and the [`CrashMode`]
/// decides how much of them landed:
///
/// - [`Dropped`](CrashMode::Dropped): none (the image is the durable image);
/// - [`Kept`](CrashMode::Kept): all (the image is the live image at the crash point);
/// - [`Torn`](CrashMode::Torn): each write is cut at absolute [`SECTOR_SIZE`] boundaries
///   and each piece landed or not, and each `set_len` happened or not, as a seeded
///   pseudo-random generator decides, in log order.
///
/// A [`FailedSync`](Op::FailedSync) ends its unsynced tail too, but loses its writes: none
/// of them lands, neither in a crash image after it nor at a later sync. Its `set_len`s
/// carry over into the next unsynced tail, ahead of its ops.
///
/// A 512-byte sector is assumed atomic, as disks promise. A landed piece that lies past the
/// end of the image being built (because a growing `set_len` before it did not happen) is
/// cut at that end, so a crash image's length is always one the `set_len`s could produce.
/// Writes that land out of order relative to each other are modelled by the per-sector
/// choice; a sector that two unsynced writes touched shows the later one if its piece
/// landed, else the earlier one if that landed, else the durable bytes.
///
/// Building an image copies the base once and replays the log; nothing is copied per op.
/// [`CrashStorage::crash_images`] walks all crash points with one running durable image.
#[derive(Default)]
pub struct CrashStorage {
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    /// The image at creation; durable.
    base: Arc<[u8]>,
    /// What reads return: the base with every op applied.
    live: Vec<u8>,
    /// Every successful mutating call since creation, in order.
    ops: Vec<Op>,
}

impl CrashStorage {
    /// An empty storage with an empty log.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage whose durable base image is `bytes`, with an empty log.
    #[must_use]
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        let live: Vec<u8> = bytes.into();
        Self {
            state: RwLock::new(State {
                base: Arc::from(live.as_slice()),
                live,
                ops: Vec::new(),
            }),
        }
    }

    /// A copy of the live image: what reads return now.
    #[must_use]
    pub fn live_image(&self) -> Vec<u8> {
        self.state.read().live.clone()
    }

    /// The image as of the last sync: what a crash now would leave in
    /// [`CrashMode::Dropped`].
    #[must_use]
    pub fn durable_image(&self) -> Vec<u8> {
        let state = self.state.read();
        build(&state.base, &state.ops, CrashMode::Dropped)
    }

    /// Records a barrier that failed ([`Op::FailedSync`]), for a test whose wrapper (a
    /// [`FaultStorage`](super::FaultStorage) failing `sync_data`) kept the call from
    /// reaching this storage: the writes since the last barrier are then lost for good,
    /// though reads still return them, as the page cache does after a failed writeback.
    pub fn fail_sync(&self) {
        self.state.write().ops.push(Op::FailedSync);
    }

    /// How many ops the log holds.
    #[must_use]
    pub fn op_count(&self) -> usize {
        self.state.read().ops.len()
    }

    /// A copy of the log (written data is shared, not copied).
    #[must_use]
    pub fn ops(&self) -> Vec<Op> {
        self.state.read().ops.clone()
    }

    /// The crash points worth testing, ascending: `0` (before anything), and the point
    /// after every op except a sync that follows the start or another sync (it changes
    /// nothing). Each is a valid `after_ops` for [`crash_image`](Self::crash_image).
    #[must_use]
    pub fn crash_points(&self) -> Vec<usize> {
        crash_points(&self.state.read().ops)
    }

    /// The image a crash after the first `after_ops` ops would leave, in `mode`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when `after_ops` exceeds
    /// [`op_count`](Self::op_count).
    pub fn crash_image(&self, after_ops: usize, mode: CrashMode) -> Result<Vec<u8>> {
        let state = self.state.read();
        let ops = state.ops.get(..after_ops).ok_or_else(|| {
            invalid_input!(
                "crash point {after_ops} is past the end of the log ({} ops)",
                state.ops.len()
            )
        })?;
        Ok(build(&state.base, ops, mode))
    }

    /// Every crash point with its image in `mode`, in order of
    /// [`crash_points`](Self::crash_points).
    ///
    /// The iterator works on a snapshot of the log taken now, and keeps one running durable
    /// image, so the whole walk costs one image copy per point plus one replay of the log.
    #[must_use]
    pub fn crash_images(&self, mode: CrashMode) -> CrashImages {
        let state = self.state.read();
        CrashImages {
            durable: state.base.to_vec(),
            ops: state.ops.clone(),
            points: crash_points(&state.ops).into_iter(),
            pending: 0,
            carried: Vec::new(),
            scanned: 0,
            mode,
        }
    }
}

impl fmt::Debug for CrashStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.read();
        f.debug_struct("CrashStorage")
            .field("base_len", &state.base.len())
            .field("live_len", &state.live.len())
            .field("ops", &state.ops.len())
            .finish()
    }
}

impl Storage for CrashStorage {
    fn len(&self) -> Result<u64> {
        Ok(self.state.read().live.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_slice(&self.state.read().live, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut state = self.state.write();
        write_slice(&mut state.live, buf, offset)?;
        if !buf.is_empty() {
            state.ops.push(Op::Write {
                offset,
                data: Arc::from(buf),
            });
        }
        Ok(())
    }

    fn set_len(&self, new_len: u64) -> Result<()> {
        let mut state = self.state.write();
        resize(&mut state.live, new_len)?;
        state.ops.push(Op::SetLen(new_len));
        Ok(())
    }

    fn sync_data(&self) -> Result<()> {
        self.state.write().ops.push(Op::Sync);
        Ok(())
    }

    /// Reads from now on see what the log says the device holds or will hold: the writes a
    /// [`FailedSync`](Op::FailedSync) lost are gone from the live image (their clean pages
    /// dropped), the unsynced tail stays (dirty pages are kept).
    fn forget_cached(&self) -> Result<()> {
        let mut state = self.state.write();
        state.live = build(&state.base, &state.ops, CrashMode::Kept);
        Ok(())
    }
}

/// Iterator over `(crash point, crash image)`, from [`CrashStorage::crash_images`].
#[derive(Debug)]
pub struct CrashImages {
    /// The base with the durable ops of `ops[..pending]` replayed.
    durable: Vec<u8>,
    ops: Vec<Op>,
    points: std::vec::IntoIter<usize>,
    /// Where the unsynced tail of the last point starts.
    pending: usize,
    /// The length changes of failed barriers' tails since the last barrier, ahead of the
    /// unsynced tail.
    carried: Vec<Op>,
    /// How far the log has been scanned for barriers.
    scanned: usize,
    mode: CrashMode,
}

impl Iterator for CrashImages {
    type Item = (usize, Vec<u8>);

    fn next(&mut self) -> Option<Self::Item> {
        let point = self.points.next()?;
        let ops = self.ops.get(..point)?;
        // Points ascend, so the durable prefix only ever grows.
        let from = self.scanned;
        self.pending = settle(&mut self.durable, ops, from, self.pending, &mut self.carried);
        self.scanned = point;
        let mut image = self.durable.clone();
        let tail = ops.get(self.pending..).unwrap_or(&[]);
        apply_tail(&mut image, &self.carried, tail, self.mode);
        Some((point, image))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.points.size_hint()
    }
}

impl ExactSizeIterator for CrashImages {}

fn crash_points(ops: &[Op]) -> Vec<usize> {
    let mut points = vec![0];
    let mut previous_was_sync = true;
    for (i, op) in ops.iter().enumerate() {
        let is_sync = matches!(op, Op::Sync);
        if !(is_sync && previous_was_sync) {
            points.push(i.saturating_add(1));
        }
        previous_was_sync = is_sync;
    }
    points
}

/// Replays onto `durable` what the barriers among `ops[from..]` make durable, given that
/// the unsynced tail before `from` starts at `pending` behind the length changes
/// `carried`: at a sync those and the ops since the tail's start land; at a failed sync
/// the tail's writes are dropped and its length changes join `carried`. Returns where the
/// unsynced tail of `ops` starts.
fn settle(
    durable: &mut Vec<u8>,
    ops: &[Op],
    from: usize,
    mut pending: usize,
    carried: &mut Vec<Op>,
) -> usize {
    for (i, op) in ops.iter().enumerate().skip(from) {
        match op {
            Op::Sync => {
                apply_all(durable, carried);
                carried.clear();
                apply_all(durable, ops.get(pending..i).unwrap_or(&[]));
                pending = i.saturating_add(1);
            }
            Op::FailedSync => {
                let tail = ops.get(pending..i).unwrap_or(&[]);
                carried.extend(tail.iter().filter(|o| matches!(o, Op::SetLen(_))).cloned());
                pending = i.saturating_add(1);
            }
            Op::Write { .. } | Op::SetLen(_) => {}
        }
    }
    pending
}

/// The crash image after `ops`, in `mode`.
fn build(base: &[u8], ops: &[Op], mode: CrashMode) -> Vec<u8> {
    let mut image = base.to_vec();
    let mut carried = Vec::new();
    let pending = settle(&mut image, ops, 0, 0, &mut carried);
    apply_tail(&mut image, &carried, ops.get(pending..).unwrap_or(&[]), mode);
    image
}

fn set_len(image: &mut Vec<u8>, new_len: u64) {
    // The live image held this length once, so it fits in usize.
    if let Ok(n) = usize::try_from(new_len) {
        image.resize(n, 0);
    }
}

/// Replays every op: what landed for certain.
fn apply_all(image: &mut Vec<u8>, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Write { offset, data } => write_clipped(image, *offset, data),
            Op::SetLen(n) => set_len(image, *n),
            Op::Sync | Op::FailedSync => {}
        }
    }
}

/// Replays the unsynced tail, behind the length changes `carried` from failed barriers, as
/// `mode` says.
fn apply_tail(image: &mut Vec<u8>, carried: &[Op], tail: &[Op], mode: CrashMode) {
    let seed = match mode {
        CrashMode::Dropped => return,
        CrashMode::Kept => {
            apply_all(image, carried);
            return apply_all(image, tail);
        }
        CrashMode::Torn { seed } => seed,
    };
    let mut rng = SplitMix64::new(seed);
    for op in carried.iter().chain(tail) {
        match op {
            Op::Write { offset, data } => {
                let mut done = 0usize;
                while let Some(rest) = data.get(done..).filter(|r| !r.is_empty()) {
                    let pos = offset.saturating_add(done as u64);
                    let to_boundary = SECTOR_SIZE.wrapping_sub(pos & SECTOR_MASK);
                    let n = usize::try_from(to_boundary).map_or(rest.len(), |b| b.min(rest.len()));
                    if rng.coin() {
                        write_clipped(image, pos, rest.get(..n).unwrap_or(rest));
                    }
                    done = done.saturating_add(n);
                }
            }
            Op::SetLen(n) => {
                if rng.coin() {
                    set_len(image, *n);
                }
            }
            // The tail holds no barrier: `settle` ends it at the last one.
            Op::Sync | Op::FailedSync => {}
        }
    }
}

const SECTOR_MASK: u64 = SECTOR_SIZE - 1;
