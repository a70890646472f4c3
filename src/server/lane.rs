//! A lane: a set of shards, a FIFO of jobs for them, and one *runner* at a
//! time that drains the FIFO.
//!
//! Whoever delivers a request queues its runs on each lane it touches and,
//! for a small request, tries to become that lane's runner and apply them at
//! once on its own thread: no hand-off, because waking another thread costs
//! tens of microseconds on small virtual machines, more than the work of a
//! small request. A large request is handed to the lane's helper thread
//! instead, so that the delivering thread (a transport's receive loop) goes
//! back to receiving while it is applied.
//!
//! Consistency (DESIGN section 3): a request issued at clock `t` with delay
//! `tau` may complete only once every shard it touches has applied every
//! worker's pushes of clocks `< t - tau`. Its pushes are applied at once (so
//! that the progress a worker's clock reports is always true); its reads and
//! its reply are *parked* in the lane until the shards' progress allows them,
//! and re-examined whenever a clock advances progress. Nothing spins, and a
//! parked request never holds up the requests behind it, whose clocks may be
//! exactly what it waits for.
//!
//! Replication (DESIGN section 6): a shard this server owns notes which of
//! its slots change; at the end of each run of the lane, the new state of
//! every changed slot goes to the replicas of its range, once however many
//! pushes touched it in that run (replication *after aggregation*). The
//! requests whose pushes the run applied form a *batch*: their replies are
//! held until every replica acknowledged the batch, so an acknowledged push
//! is on every live copy. A replica applies the owner's state to its copy
//! of the shard in the same lanes, single writer as ever.
//!
//! Being the runner is what makes the lane's shards single-writer: slot
//! stores never race, and readers (local, shared memory, RDMA) never lock.
//! Jobs run in the order they were queued, and one connection's requests are
//! queued by one thread in the order they arrived, so a pull issued after a
//! push by the same worker always observes it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::proto::{self, ReplHeader, ReplyHeader, RunHeader, RunReply, kind, repl, status};
use crate::store::{Delta, KeyRange, KeyRun, Shard};
use crate::transport::{Frame, Messenger, PeerId, bytes_of_vec, pod_slice};

/// Largest REPLICATE frame a lane builds (a big snapshot goes in several).
const MAX_DELTA_BYTES: usize = 16 << 20;

/// What a server's lanes share for replication: where frames go, and the
/// batches whose replicas have not all acknowledged yet.
#[derive(Default)]
pub(super) struct Replication {
    pub net: OnceLock<Arc<dyn Messenger>>,
    /// This server's index in the ring and its membership epoch, stamped on
    /// what it replicates.
    pub me: AtomicU32,
    pub epoch: AtomicU32,
    batches: Mutex<HashMap<u64, Arc<Batch>>>,
    /// Signalled whenever batches complete.
    settled: Condvar,
    next_batch: AtomicU64,
}

/// Requests whose replies wait for replicas.
struct Batch {
    /// Replica servers, with the frames of the batch each has not
    /// acknowledged yet.
    waiting: Mutex<Vec<(u32, usize)>>,
    requests: Vec<Arc<Request>>,
}

impl Batch {
    fn complete(&self) {
        self.requests.iter().for_each(|r| r.release());
    }
}

/// One delta of a REPLICATE frame: its header and segments.
#[derive(Clone)]
pub(super) struct SubDelta {
    pub header: ReplHeader,
    pub segments: Vec<Bytes>,
}

/// Segments a delta with these flags carries.
pub(super) fn delta_segments(flags: u32) -> usize {
    let keys = usize::from(flags & repl::RANGE == 0);
    let slots = if flags & repl::RAW != 0 { 1 } else { 2 };
    keys + slots + usize::from(flags & repl::STATE != 0) + usize::from(flags & repl::PENDING != 0) + 2
}

/// Segments one REPLICATE frame may carry (below the frame limit).
const MAX_FRAME_SEGMENTS: usize = 960;

/// Packs deltas into REPLICATE frames (meta: their headers, one after the
/// other; segments: theirs, in order), `batch` stamped on every header.
fn pack(ds: Vec<SubDelta>, batch: u64) -> Vec<Frame> {
    let mut frames = Vec::new();
    let (mut meta, mut segs, mut bytes) = (Vec::new(), Vec::new(), 0usize);
    for mut d in ds {
        let b: usize = d.segments.iter().map(|s| s.len()).sum();
        let full = !segs.is_empty()
            && (segs.len() + d.segments.len() > MAX_FRAME_SEGMENTS
                || bytes + b > MAX_DELTA_BYTES
                || meta.len() + std::mem::size_of::<ReplHeader>() > 60 << 10);
        if full {
            let mut f = Frame::new(kind::REPLICATE, 0, Bytes::from(std::mem::take(&mut meta)));
            f.segments = std::mem::take(&mut segs);
            frames.push(f);
            bytes = 0;
        }
        d.header.batch = batch;
        meta.extend_from_slice(bytemuck::bytes_of(&d.header));
        segs.extend(d.segments);
        bytes += b;
    }
    if !meta.is_empty() {
        let mut f = Frame::new(kind::REPLICATE, 0, Bytes::from(meta));
        f.segments = segs;
        frames.push(f);
    }
    frames
}

/// The deltas of a REPLICATE frame, checked for their segment counts.
pub(super) fn unpack(frame: &Frame) -> Result<Vec<SubDelta>, String> {
    let hs = std::mem::size_of::<ReplHeader>();
    if frame.meta.is_empty() || !frame.meta.len().is_multiple_of(hs) {
        return Err(format!("REPLICATE meta of {} bytes", frame.meta.len()));
    }
    let mut segs = frame.segments.iter();
    let mut out = Vec::with_capacity(frame.meta.len() / hs);
    for h in frame.meta.chunks_exact(hs) {
        let header: ReplHeader = bytemuck::pod_read_unaligned(h);
        let n = delta_segments(header.flags);
        let segments: Vec<Bytes> = segs.by_ref().take(n).cloned().collect();
        if segments.len() != n {
            return Err("a delta lacks segments".into());
        }
        out.push(SubDelta { header, segments });
    }
    if segs.next().is_some() {
        return Err("more segments than the deltas announce".into());
    }
    Ok(out)
}

impl Replication {
    /// Replica `server` applied batch `id`.
    pub fn acked(&self, id: u64, server: u32) {
        let done = {
            let mut batches = self.batches.lock();
            let Some(b) = batches.get(&id) else { return };
            let mut w = b.waiting.lock();
            if let Some(at) = w.iter().position(|&(s, _)| s == server) {
                w[at].1 -= 1;
                if w[at].1 == 0 {
                    w.swap_remove(at);
                }
            }
            let empty = w.is_empty();
            drop(w);
            if empty { batches.remove(&id) } else { None }
        };
        if let Some(b) = done {
            b.complete();
            self.settled.notify_all();
        }
    }

    /// The last batch id handed out so far.
    pub fn last_batch(&self) -> u64 {
        self.next_batch.load(Ordering::Acquire)
    }

    /// Waits until every batch up to `last` completed (acknowledged by its
    /// replicas, or forgotten because they are gone), at most `timeout`,
    /// and no longer once `give_up()` says so (checked every few
    /// milliseconds); false when some had not completed.
    pub fn settle(&self, last: u64, timeout: std::time::Duration, give_up: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut batches = self.batches.lock();
        loop {
            if !batches.keys().any(|&id| id <= last) {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline || give_up() {
                return false;
            }
            let slice = (deadline - now).min(std::time::Duration::from_millis(10));
            self.settled.wait_for(&mut batches, slice);
        }
    }

    /// Stops waiting for servers that are gone (dead or no longer copies).
    pub fn forget(&self, gone: impl Fn(u32) -> bool) {
        let done: Vec<Arc<Batch>> = {
            let mut batches = self.batches.lock();
            let ids: Vec<u64> = batches
                .iter()
                .filter_map(|(&id, b)| {
                    let mut w = b.waiting.lock();
                    w.retain(|&(s, _)| !gone(s));
                    w.is_empty().then_some(id)
                })
                .collect();
            ids.into_iter().filter_map(|id| batches.remove(&id)).collect()
        };
        for b in &done {
            b.complete();
        }
        if !done.is_empty() {
            self.settled.notify_all();
        }
    }
}

/// Where the changes of an owned part of a shard go: the replicas of one
/// range (server index and connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub range: KeyRange,
    pub peers: Vec<(u32, PeerId)>,
}

/// A shard in its lane, with what this server does with it.
struct Entry {
    shard: Shard,
    /// This server owns some range of the shard: it applies workers'
    /// requests and clocks to it. Otherwise it only holds a copy, kept up to
    /// date by the owner.
    active: bool,
    /// Owned parts of the shard that have replicas (or learners).
    targets: Vec<Target>,
    /// The membership epoch of these roles, stamped on what the shard
    /// replicates: a receiver that has not reached it yet holds it back.
    epoch: u32,
    /// The parts of the shard this server owns (sorted, disjoint).
    owned: Vec<KeyRange>,
    /// Exactly-once seqs per key range: per part (sorted, disjoint), the
    /// last seq applied per worker in *that* part's history. A worker's seqs
    /// grow across all servers and all ranges, so the seqs of one range say
    /// nothing about the pushes of another: a shard that applied a run of
    /// seq 7 to one range must still apply seq 6 to another (a retry sent
    /// after it, or a range taken back from a dead owner). Every owned part
    /// has an entry from the moment it is owned (see [`Entry::set_owned`]);
    /// copies get theirs from the owner's seqs (`learn`). Keys without one
    /// (a copy nothing was learned of yet) use the shard's own seqs.
    lineage: Vec<(KeyRange, Vec<u64>)>,
    /// Every bound inside the shard of a range of any epoch this server
    /// applied (sorted): the parts are split at all of them, learned ones
    /// too. A push's runs share its seq and are cut at the ranges of the
    /// push's epoch, so no part ever holds two runs of one push (the second
    /// would look applied).
    cuts: Vec<u64>,
}

impl Entry {
    /// `range` in pieces of one history each: `(piece, Some(lineage
    /// index))` for a part with its own seqs, `(piece, None)` for keys that
    /// use the shard's own seqs. In key order, covering all of `range`.
    fn pieces(&self, range: KeyRange) -> Vec<(KeyRange, Option<usize>)> {
        let mut out = Vec::new();
        let mut at = range.start;
        for (i, (r, _)) in self.lineage.iter().enumerate() {
            if r.end <= at {
                continue;
            }
            if r.start >= range.end {
                break;
            }
            if r.start > at {
                out.push((KeyRange::new(at, r.start), None));
            }
            let end = r.end.min(range.end);
            out.push((KeyRange::new(r.start.max(at), end), Some(i)));
            at = end;
        }
        if at < range.end {
            out.push((KeyRange::new(at, range.end), None));
        }
        out
    }

    /// The seqs of one piece (see [`Entry::pieces`]).
    fn piece_seqs(&self, part: Option<usize>) -> &[u64] {
        match part {
            Some(i) => &self.lineage[i].1,
            None => self.shard.applied(),
        }
    }

    /// The last seq per worker applied to `range`, when it is one history
    /// (tests).
    #[cfg(test)]
    fn seqs_for(&self, range: KeyRange) -> Vec<u64> {
        let pieces = self.pieces(range);
        assert_eq!(pieces.len(), 1, "{range} spans {} histories", pieces.len());
        self.piece_seqs(pieces[0].1).to_vec()
    }

    /// Gives the keys of `range` without an entry their own, with `seqs`
    /// (the parts that have one keep it).
    fn cover(&mut self, range: KeyRange, seqs: &[u64]) {
        let gaps: Vec<KeyRange> = self.pieces(range).into_iter().filter(|(_, p)| p.is_none()).map(|(r, _)| r).collect();
        if gaps.is_empty() {
            return;
        }
        self.lineage.extend(gaps.into_iter().map(|r| (r, seqs.to_vec())));
        self.lineage.sort_by_key(|(r, _)| r.start);
    }

    /// An owner's seqs for `range`: they replace what was known of those
    /// keys (merged, as they only grow along one range's history); keys
    /// outside `range` keep theirs. Parts never share keys, so one range's
    /// seqs never leak into another's.
    fn learn(&mut self, range: KeyRange, seqs: &[u64]) {
        let mut merged = seqs.to_vec();
        let mut kept = Vec::with_capacity(self.lineage.len() + 1);
        for (r, v) in std::mem::take(&mut self.lineage) {
            if r.end <= range.start || range.end <= r.start {
                kept.push((r, v));
                continue;
            }
            for (m, &x) in merged.iter_mut().zip(&v) {
                *m = (*m).max(x);
            }
            if r.start < range.start {
                kept.push((KeyRange::new(r.start, range.start), v.clone()));
            }
            if range.end < r.end {
                kept.push((KeyRange::new(range.end, r.end), v));
            }
        }
        kept.push((range, merged));
        kept.sort_by_key(|(r, _)| r.start);
        self.lineage = kept;
        // The owner's part may span a bound of an epoch this server saw
        // (the other parts were split already).
        let i = self.cuts.partition_point(|&c| c <= range.start);
        if self.cuts.get(i).is_some_and(|&c| c < range.end) {
            self.split_at_cuts();
        }
    }

    /// New roles: every owned part gets seqs of its own, split at the
    /// parts' bounds, so that two runs of one worker to different parts
    /// never share a history (a retry of the first arriving after the second
    /// would otherwise look old). The parts this server stops owning keep
    /// the seqs they had (pushes to them go to another server now), the
    /// parts it starts owning without a known history start from none
    /// applied, and the keys it owned without an entry yet (since the shard
    /// was installed) start from the shard's own seqs.
    fn set_owned(&mut self, owned: Vec<KeyRange>) {
        let own = self.shard.applied().to_vec();
        for r in self.owned.clone() {
            self.cover(r, &own);
        }
        let zeros = vec![0; own.len()];
        for r in &owned {
            self.cover(*r, &zeros);
        }
        let bounds: Vec<u64> = self.owned.iter().chain(&owned).flat_map(|r| [r.start, r.end]).collect();
        self.add_cuts(&bounds);
        self.owned = owned;
    }

    /// Bounds of the ranges of an epoch (or of owned parts): the parts are
    /// split at them from now on.
    fn add_cuts(&mut self, bounds: &[u64]) {
        self.cuts.extend_from_slice(bounds);
        self.cuts.sort_unstable();
        self.cuts.dedup();
        self.split_at_cuts();
    }

    /// Splits the parts at every cut (both halves keep the part's seqs: one
    /// history so far).
    fn split_at_cuts(&mut self) {
        let cuts = &self.cuts;
        let mut out = Vec::with_capacity(self.lineage.len());
        for (r, v) in std::mem::take(&mut self.lineage) {
            let mut at = r.start;
            let from = cuts.partition_point(|&c| c <= r.start);
            for &c in cuts[from..].iter().take_while(|&&c| c < r.end) {
                out.push((KeyRange::new(at, c), v.clone()));
                at = c;
            }
            out.push((KeyRange::new(at, r.end), v));
        }
        self.lineage = out;
    }

    /// Whether this server owns every key of `[first, last]` of the shard.
    fn owns(&self, first: u64, last: u64) -> bool {
        let mut at = first;
        for r in &self.owned {
            if r.end <= at {
                continue;
            }
            if r.start > at {
                return false;
            }
            if r.end > last {
                return true;
            }
            at = r.end;
        }
        false
    }
}

/// The first and last key of a run.
fn span(r: &LaneRun) -> Option<(u64, u64)> {
    match &r.keys {
        Some(k) => {
            let v = pod_slice::<u64>(k);
            Some((*v.first()?, *v.last()?))
        }
        None => r.header.count.checked_sub(1).map(|n| (r.header.first, r.header.first + n)),
    }
}

/// Requests with more keys than this are applied by the lane's helper thread.
pub(super) const INLINE_MAX_KEYS: u64 = 32 * 1024;

/// One run of a request, checked by the handler, ready for its lane.
pub(super) struct LaneRun {
    pub header: RunHeader,
    pub shard: u32,
    pub keys: Option<Bytes>,
    pub vals: Option<Bytes>,
    /// Versions the worker last saw (version-filtered pulls).
    pub known: Option<Bytes>,
    /// 0 for a whole run; 1, 2, ... for the parts of a run split along
    /// shards (in key order), joined again in the reply.
    pub part: u32,
}

/// What a run returns.
enum RunOut {
    Ack,
    Values(Vec<f32>),
    Changed { bitmap: Vec<u8>, values: Vec<f32>, versions: Vec<u32> },
}

/// A data request being answered: the lanes it waits for and what they
/// produced so far.
pub(super) struct Request {
    pub net: Arc<dyn Messenger>,
    pub peer: PeerId,
    pub id: u64,
    pub kind: u16,
    pub table: u32,
    /// Progress every touched shard must reach before completing.
    pub need: Option<u64>,
    /// The worker clock the request was issued at.
    pub clock: u64,
    /// The worker's rank (whose push seqs the runs carry).
    pub worker: u32,
    pending: AtomicUsize,
    out: Mutex<Output>,
    /// Replication batches holding the reply, plus one until it is built.
    holds: AtomicUsize,
    reply: Mutex<Option<Frame>>,
    /// The server's epoch, for the reply header.
    epoch: u32,
    /// Runs split along shards: run index -> number of parts.
    parts: HashMap<u32, u32>,
}

impl Request {
    pub fn new(
        net: Arc<dyn Messenger>,
        peer: PeerId,
        id: u64,
        kind: u16,
        h: &proto::DataHeader,
        lanes: usize,
        epoch: u32,
    ) -> Request {
        let out = Mutex::new(Output { progress: u64::MAX, ..Output::default() });
        let (table, need, clock) = (h.table, h.needed_progress(), u64::from(h.clock));
        Request {
            net,
            peer,
            id,
            kind,
            table,
            need,
            clock,
            worker: h.worker,
            pending: AtomicUsize::new(lanes),
            out,
            holds: AtomicUsize::new(1),
            reply: Mutex::new(None),
            epoch,
            parts: HashMap::new(),
        }
    }

    /// The same request, with some runs split into parts.
    pub fn with_parts(mut self, parts: HashMap<u32, u32>) -> Request {
        self.parts = parts;
        self
    }

    /// The reply is built: send it once no replication batch holds it.
    fn deliver(&self, reply: Frame) {
        *self.reply.lock() = Some(reply);
        self.release();
    }

    /// One hold less; the last one sends the reply.
    fn release(&self) {
        // AcqRel: the thread that sends sees the reply stored by another.
        if self.holds.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(f) = self.reply.lock().take()
            && let Err(e) = self.net.send(self.peer, f)
        {
            tracing::debug!(error = %e, "reply not delivered");
        }
    }

    /// Adds one lane's part; returns the reply when it was the last part.
    fn finish_part(&self, part: Output) -> Option<Frame> {
        {
            let mut out = self.out.lock();
            out.items.extend(part.items);
            out.progress = out.progress.min(part.progress);
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        let out = std::mem::take(&mut *self.out.lock());
        let items = if self.parts.is_empty() { out.items } else { join_parts(out.items) };
        let header = ReplyHeader {
            table: self.table,
            runs: items.len() as u32,
            progress: out.progress,
            epoch: self.epoch,
            reserved: 0,
        };
        let replies: Vec<RunReply> = items.iter().map(|i| i.reply).collect();
        let meta = proto::build_meta(&header, &replies);
        let mut reply = Frame::new(kind::REPLY, self.id, meta);
        let mut errors = Vec::new();
        for i in items {
            reply.segments.extend(i.segs);
            errors.extend(i.error);
        }
        reply.segments.extend(errors);
        Some(reply)
    }
}

/// One run's (or run part's) answer: its record, value segments (none, one,
/// or bitmap, values and versions) and error message.
struct Item {
    reply: RunReply,
    part: u32,
    segs: Vec<Bytes>,
    error: Option<Bytes>,
}

/// What a lane produced for a request.
#[derive(Default)]
struct Output {
    items: Vec<Item>,
    /// Smallest progress of the shards served.
    progress: u64,
}

/// Joins the parts of runs split along shards into one answer per run: the
/// first error if any part failed, else their values (and, for a
/// version-filtered pull, bitmaps and versions) in key order.
fn join_parts(items: Vec<Item>) -> Vec<Item> {
    let (whole, mut parts): (Vec<Item>, Vec<Item>) = items.into_iter().partition(|i| i.part == 0);
    parts.sort_by_key(|i| (i.reply.run, i.part));
    let mut out = whole;
    let mut i = 0;
    while i < parts.len() {
        let run = parts[i].reply.run;
        let j = (i..parts.len()).find(|&j| parts[j].reply.run != run).unwrap_or(parts.len());
        let group = &mut parts[i..j];
        let count: u64 = group.iter().map(|p| p.reply.count).sum();
        if group.iter().any(|p| p.reply.status == status::MOVED) {
            out.push(Item {
                reply: RunReply { run, status: status::MOVED, count },
                part: 0,
                segs: Vec::new(),
                error: None,
            });
        } else if let Some(bad) = group.iter_mut().find(|p| p.reply.status == status::ERROR) {
            out.push(Item {
                reply: RunReply { run, status: status::ERROR, count },
                part: 0,
                segs: Vec::new(),
                error: bad.error.take(),
            });
        } else if group[0].reply.status == status::CHANGED {
            let mut bitmap = vec![0u8; (count as usize).div_ceil(8)];
            let (mut values, mut versions) = (Vec::new(), Vec::new());
            let mut at = 0usize;
            for p in group.iter() {
                let n = p.reply.count as usize;
                for b in 0..n {
                    if p.segs[0][b / 8] >> (b % 8) & 1 == 1 {
                        bitmap[(at + b) / 8] |= 1 << ((at + b) % 8);
                    }
                }
                values.extend_from_slice(&p.segs[1]);
                versions.extend_from_slice(&p.segs[2]);
                at += n;
            }
            let segs = vec![Bytes::from(bitmap), Bytes::from(values), Bytes::from(versions)];
            out.push(Item { reply: RunReply { run, status: status::CHANGED, count }, part: 0, segs, error: None });
        } else {
            let mut values = Vec::new();
            for p in group.iter() {
                for s in &p.segs {
                    values.extend_from_slice(s);
                }
            }
            let segs = if group[0].segs.is_empty() { Vec::new() } else { vec![Bytes::from(values)] };
            out.push(Item { reply: RunReply { run, status: status::OK, count }, part: 0, segs, error: None });
        }
        i = j;
    }
    out
}

/// A request part whose pushes are applied and whose reads and reply wait
/// for progress.
struct Parked {
    req: Arc<Request>,
    runs: Vec<LaneRun>,
    pushed: Vec<Result<(), String>>,
}

pub(super) enum Job {
    Runs {
        req: Arc<Request>,
        runs: Vec<LaneRun>,
    },
    Clock {
        worker: u32,
        clock: u64,
    },
    /// A worker was lost (it may come back as a new incarnation).
    WorkerLost {
        worker: u32,
    },
    /// A restarted worker re-enters at `clock`: its clock is set, not raised.
    ResetClock {
        worker: u32,
        clock: u64,
    },
    Install {
        id: u32,
        shard: Box<Shard>,
        active: bool,
        targets: Vec<Target>,
        epoch: u32,
        owned: Vec<KeyRange>,
        /// Bounds inside the shard of the epoch's ranges (see `Entry::cuts`).
        bounds: Vec<u64>,
    },
    /// The membership changed: what this server now does with shard `id`
    /// (what changed under the old roles is replicated first).
    Roles {
        id: u32,
        active: bool,
        targets: Vec<Target>,
        epoch: u32,
        owned: Vec<KeyRange>,
        bounds: Vec<u64>,
    },
    /// Sends a full copy of the keys of `range` to a new replica; when
    /// `tracked` (a copy for a joining server, which will take ranges over
    /// from it), as a batch that membership changes wait for.
    Snapshot {
        id: u32,
        range: KeyRange,
        to: (u32, PeerId),
        tracked: bool,
    },
    /// Replicates what changed so far, then answers: every batch of state
    /// made before has an id up to `Replication::last_batch()` after this.
    Fence {
        reply: crossbeam::channel::Sender<()>,
    },
    /// Replica side: the owner's state of some keys (a REPLICATE frame,
    /// checked only for its header so far), acknowledged on `from` once
    /// every part is applied (a frame spanning several shards here is
    /// applied in parts, the keys inside `only` by each).
    Delta {
        id: u32,
        from: PeerId,
        header: ReplHeader,
        segments: Vec<Bytes>,
        only: Option<KeyRange>,
        parts: Arc<AtomicUsize>,
    },
    /// The state of the keys of `range`, as frames, for a checkpoint.
    Checkpoint {
        id: u32,
        range: KeyRange,
        reply: crossbeam::channel::Sender<Vec<Frame>>,
    },
    /// Restores the keys of the shard's range found in checkpoint frames;
    /// every worker's progress becomes `clock`.
    Restore {
        id: u32,
        frames: Vec<Frame>,
        clock: u64,
        reply: crossbeam::channel::Sender<Result<(), String>>,
    },
}

#[derive(Default)]
struct LaneState {
    shards: HashMap<u32, Entry>,
    /// Latest clock per worker, so shards created later start from it.
    clocks: Vec<u64>,
    /// Workers lost (waiting for a new incarnation): shards that do not
    /// wait for lost workers ([`Shard::waits_for_lost`]) count them as left.
    lost: Vec<bool>,
    /// Requests waiting for progress, in arrival order.
    parked: Vec<Parked>,
    /// Requests whose pushes this run applied (they join its batch).
    pushed: Vec<Arc<Request>>,
}

impl LaneState {
    /// Applies a request's pushes, then completes it or parks it.
    fn start(&mut self, req: Arc<Request>, runs: Vec<LaneRun>) -> Option<Frame> {
        let owned = |r: &LaneRun| {
            let Some(e) = self.shards.get(&r.shard) else { return true };
            span(r).is_none_or(|(first, last)| e.owns(first, last))
        };
        if !runs.iter().all(owned) {
            // Checked against the map of an epoch in which this server
            // owned these keys, queued after the change that handed them
            // over: nothing is applied, the worker sends it to the new owner
            // (runs other lanes applied are retried too, and skipped there
            // by their seqs).
            let items = runs
                .iter()
                .map(|r| Item {
                    reply: RunReply { run: r.header.run, status: status::MOVED, count: r.header.count },
                    part: r.part,
                    segs: Vec::new(),
                    error: None,
                })
                .collect();
            return req.finish_part(Output { items, progress: u64::MAX });
        }
        let pushed: Vec<Result<(), String>> = if req.kind == kind::PULL {
            runs.iter().map(|_| Ok(())).collect()
        } else {
            self.pushed.push(req.clone());
            runs.iter().map(|r| push_run(&mut self.shards, r, req.clock, req.worker as usize)).collect()
        };
        if self.ready(&req, &runs) {
            self.finish(req, runs, pushed)
        } else {
            self.parked.push(Parked { req, runs, pushed });
            None
        }
    }

    fn ready(&self, req: &Request, runs: &[LaneRun]) -> bool {
        let Some(need) = req.need else { return true };
        runs.iter().all(|r| self.shards.get(&r.shard).is_none_or(|e| e.shard.min_progress() >= need))
    }

    /// Reads (for pulls), builds this lane's part of the reply.
    fn finish(&self, req: Arc<Request>, runs: Vec<LaneRun>, pushed: Vec<Result<(), String>>) -> Option<Frame> {
        let mut out = Output { progress: u64::MAX, ..Output::default() };
        for (r, res) in runs.iter().zip(pushed) {
            let res =
                res.and_then(|()| if req.kind == kind::PUSH { Ok(RunOut::Ack) } else { pull_run(&self.shards, r) });
            let count = r.header.count;
            let item = match res {
                Ok(o) => {
                    let status = if matches!(o, RunOut::Changed { .. }) { status::CHANGED } else { status::OK };
                    let segs = match o {
                        RunOut::Ack => Vec::new(),
                        RunOut::Values(v) => vec![bytes_of_vec(v)],
                        RunOut::Changed { bitmap, values, versions } => {
                            vec![Bytes::from(bitmap), bytes_of_vec(values), bytes_of_vec(versions)]
                        }
                    };
                    Item { reply: RunReply { run: r.header.run, status, count }, part: r.part, segs, error: None }
                }
                Err(msg) => Item {
                    reply: RunReply { run: r.header.run, status: status::ERROR, count },
                    part: r.part,
                    segs: Vec::new(),
                    error: Some(Bytes::from(msg)),
                },
            };
            out.items.push(item);
            if let Some(e) = self.shards.get(&r.shard) {
                out.progress = out.progress.min(e.shard.min_progress());
            }
        }
        req.finish_part(out)
    }

    /// Completes the parked requests that progress now allows, in order.
    fn release_parked(&mut self, replies: &mut Vec<(Arc<Request>, Frame)>) {
        if self.parked.is_empty() {
            return;
        }
        for p in std::mem::take(&mut self.parked) {
            if self.ready(&p.req, &p.runs) {
                let req = p.req.clone();
                if let Some(reply) = self.finish(p.req, p.runs, p.pushed) {
                    replies.push((req, reply));
                }
            } else {
                self.parked.push(p);
            }
        }
    }
}

impl LaneState {
    /// Applies a worker's clock to the shards this server owns.
    fn clock(&mut self, worker: u32, clock: u64, replies: &mut Vec<(Arc<Request>, Frame)>) {
        let w = worker as usize;
        if self.clocks.len() <= w {
            self.clocks.resize(w + 1, 0);
        }
        self.clocks[w] = self.clocks[w].max(clock);
        for e in self.shards.values_mut().filter(|e| e.active) {
            let _ = e.shard.record_progress(w, clock);
        }
        self.release_parked(replies);
    }

    /// A worker was lost: the shards that do not wait for lost workers count
    /// it as left until a new incarnation resets its clock; the others keep
    /// its place (their clock's pushes are not complete without it).
    fn worker_lost(&mut self, worker: u32, replies: &mut Vec<(Arc<Request>, Frame)>) {
        let w = worker as usize;
        if self.clocks.len() <= w {
            self.clocks.resize(w + 1, 0);
        }
        if self.lost.len() <= w {
            self.lost.resize(w + 1, false);
        }
        self.lost[w] = true;
        for e in self.shards.values_mut().filter(|e| e.active && !e.shard.waits_for_lost()) {
            let _ = e.shard.record_progress(w, u64::MAX);
        }
        self.release_parked(replies);
    }

    /// A restarted worker's clock (or a joined one's first): set (a lost
    /// worker's was raised to `u64::MAX` where shards do not wait for lost
    /// workers, a free seat's everywhere) on every shard, copies included, so that a
    /// copy promoted later does not let others run ahead of it either.
    fn reset_clock(&mut self, worker: u32, clock: u64) {
        let w = worker as usize;
        if self.clocks.len() <= w {
            self.clocks.resize(w + 1, 0);
        }
        self.clocks[w] = clock;
        if let Some(l) = self.lost.get_mut(w) {
            *l = false;
        }
        for e in self.shards.values_mut() {
            let _ = e.shard.reset_progress(w, clock);
        }
    }

    /// The clock `worker` holds a shard back at: a lost worker holds only
    /// the shards that wait for lost workers.
    fn clock_for(&self, shard: &Shard, w: usize) -> u64 {
        if self.lost.get(w).copied().unwrap_or(false) && !shard.waits_for_lost() { u64::MAX } else { self.clocks[w] }
    }

    #[allow(clippy::too_many_arguments)]
    fn install(
        &mut self,
        id: u32,
        mut shard: Shard,
        active: bool,
        targets: Vec<Target>,
        epoch: u32,
        owned: Vec<KeyRange>,
        bounds: &[u64],
    ) {
        if active {
            for w in 0..self.clocks.len() {
                let _ = shard.record_progress(w, self.clock_for(&shard, w));
            }
        }
        shard.track_changes(targets.iter().any(|t| !t.peers.is_empty()));
        let mut e = Entry { shard, active, targets, epoch, owned: Vec::new(), lineage: Vec::new(), cuts: Vec::new() };
        e.add_cuts(bounds);
        e.set_owned(owned);
        self.shards.insert(id, e);
    }

    fn roles(&mut self, id: u32, active: bool, targets: Vec<Target>, epoch: u32, owned: Vec<KeyRange>, bounds: &[u64]) {
        let clocks: Vec<u64> = match self.shards.get(&id) {
            Some(e) => (0..self.clocks.len()).map(|w| self.clock_for(&e.shard, w)).collect(),
            None => return,
        };
        let Some(e) = self.shards.get_mut(&id) else { return };
        e.epoch = epoch;
        e.add_cuts(bounds);
        e.set_owned(owned);
        if active && !e.active {
            // Promoted: the copy becomes the range's state of record. Its
            // progress is the old owner's; workers that left (and lost ones,
            // unless it waits for them) hold nobody back, and live workers
            // send their clocks again after their retries.
            e.shard.take_ownership();
            for (w, &c) in clocks.iter().enumerate() {
                if c == u64::MAX {
                    let _ = e.shard.record_progress(w, c);
                } else if e.shard.progress(w) > c {
                    // The copy's progress came from the old owner, which may
                    // have sent it before a restarted or joined worker's
                    // reset reached it: this server's own clock of the
                    // worker is never too high (lower only waits longer).
                    let _ = e.shard.reset_progress(w, c);
                }
            }
        }
        e.active = active;
        e.shard.track_changes(targets.iter().any(|t| !t.peers.is_empty()));
        e.targets = targets;
    }

    /// The state of slots `ids` of a shard (owned part `range`) as REPLICATE
    /// deltas: headers with their segments, at most `MAX_DELTA_BYTES` each.
    /// Each delta covers one piece of `range` with one history and carries
    /// that piece's seqs (see [`Entry::pieces`]), so a receiver never takes
    /// one part's seqs for another's. A snapshot (`repl::SNAPSHOT`) has a
    /// delta for every piece, with no slot too: the receiver learns every
    /// piece's seqs.
    fn deltas(&self, repl: &Replication, e: &Entry, range: KeyRange, ids: &[u32], flags: u32) -> Vec<SubDelta> {
        let pieces = e.pieces(range);
        if let [(piece, part)] = pieces[..] {
            return self.piece_deltas(repl, e, piece, e.piece_seqs(part), ids, flags);
        }
        let mut out = Vec::new();
        for (piece, part) in pieces {
            let mine: Vec<u32> = ids.iter().copied().filter(|&id| piece.contains(e.shard.key_of(id))).collect();
            if mine.is_empty() && flags & repl::SNAPSHOT == 0 {
                continue;
            }
            out.extend(self.piece_deltas(repl, e, piece, e.piece_seqs(part), &mine, flags));
        }
        out
    }

    /// [`LaneState::deltas`] of one piece, with its seqs.
    fn piece_deltas(
        &self,
        repl: &Replication,
        e: &Entry,
        range: KeyRange,
        seqs: &[u64],
        ids: &[u32],
        flags: u32,
    ) -> Vec<SubDelta> {
        let s = &e.shard;
        let probe = s.delta_of(&ids[..ids.len().min(1)]);
        let per_key = 8 + s.layout().bytes() + probe.state.len() * 4 + probe.pending.len() * 8;
        let chunk = (MAX_DELTA_BYTES / per_key.max(1)).max(1);
        let applied = bytes_of_vec(seqs.to_vec());
        let progress = bytes_of_vec(s.progress_all());
        // No slot at all (a sparse range nobody pushed to yet) still makes
        // one delta: the receiver learns the range's seqs and progress.
        let parts: Vec<&[u32]> = if ids.is_empty() { vec![ids] } else { ids.chunks(chunk).collect() };
        let n = parts.len();
        parts
            .into_iter()
            .enumerate()
            .map(|(at, part)| {
                let d = s.delta_of(part);
                let mut f = flags;
                if at + 1 == n {
                    f |= repl::LAST;
                }
                if d.range.is_some() {
                    f |= repl::RANGE;
                }
                if !d.state.is_empty() {
                    f |= repl::STATE;
                }
                if !d.pending.is_empty() {
                    f |= repl::PENDING;
                }
                if !d.raw.is_empty() {
                    f |= repl::RAW;
                }
                let (first, count) = d.range.unwrap_or((d.keys.first().copied().unwrap_or(0), d.len() as u64));
                let h = ReplHeader {
                    table: s.table(),
                    from: repl.me.load(Ordering::Relaxed),
                    epoch: e.epoch,
                    flags: f,
                    batch: 0,
                    start: range.start,
                    end: range.end,
                    first,
                    count,
                    workers: s.applied().len() as u32,
                    reserved: 0,
                };
                let Delta { keys, versions, values, raw, state, pending, range: r } = d;
                let mut segs = Vec::with_capacity(6);
                if r.is_none() {
                    segs.push(bytes_of_vec(keys));
                }
                if f & repl::RAW != 0 {
                    segs.push(bytes_of_vec(raw));
                } else {
                    segs.push(bytes_of_vec(versions));
                    segs.push(bytes_of_vec(values));
                }
                if f & repl::STATE != 0 {
                    segs.push(bytes_of_vec(state));
                }
                if f & repl::PENDING != 0 {
                    segs.push(bytes_of_vec(pending));
                }
                segs.push(applied.clone());
                segs.push(progress.clone());
                SubDelta { header: h, segments: segs }
            })
            .collect()
    }

    /// Frames carrying the state of slots `ids` of a shard to a replica.
    fn delta_frames(&self, repl: &Replication, e: &Entry, range: KeyRange, ids: &[u32], flags: u32) -> Vec<Frame> {
        pack(self.deltas(repl, e, range, ids, flags), 0)
    }

    /// End of a run: sends what changed in owned shards to their replicas,
    /// all of it to one replica in as few frames as the limits allow, and
    /// makes the requests that pushed in this run wait for them.
    fn replicate(&mut self, repl: &Replication, outbox: &mut Vec<(PeerId, Frame)>) {
        let mut to: Vec<((u32, PeerId), Vec<SubDelta>)> = Vec::new();
        let ids: Vec<u32> = self.shards.iter().filter(|(_, e)| e.shard.has_changes()).map(|(&id, _)| id).collect();
        for id in ids {
            let changed = self.shards.get_mut(&id).expect("listed").shard.take_changes();
            let e = &self.shards[&id];
            for t in &e.targets {
                let mine: Vec<u32> =
                    changed.iter().copied().filter(|&slot| t.range.contains(e.shard.key_of(slot))).collect();
                if mine.is_empty() || t.peers.is_empty() {
                    continue;
                }
                let ds = self.deltas(repl, e, t.range, &mine, 0);
                for &p in &t.peers {
                    match to.iter_mut().find(|(q, _)| *q == p) {
                        Some((_, v)) => v.extend(ds.iter().cloned()),
                        None => to.push((p, ds.clone())),
                    }
                }
            }
        }
        let pushed = std::mem::take(&mut self.pushed);
        if to.is_empty() {
            return;
        }
        let id = repl.next_batch.fetch_add(1, Ordering::Relaxed) + 1;
        let mut waiting: Vec<(u32, usize)> = Vec::new();
        let mut frames: Vec<(PeerId, Frame)> = Vec::new();
        for ((server, peer), ds) in to {
            let fs = pack(ds, id);
            match waiting.iter_mut().find(|(s, _)| *s == server) {
                Some((_, n)) => *n += fs.len(),
                None => waiting.push((server, fs.len())),
            }
            frames.extend(fs.into_iter().map(|f| (peer, f)));
        }
        for r in &pushed {
            r.holds.fetch_add(1, Ordering::AcqRel);
        }
        repl.batches.lock().insert(id, Arc::new(Batch { waiting: Mutex::new(waiting), requests: pushed }));
        outbox.extend(frames);
    }

    fn snapshot(
        &self,
        repl: &Replication,
        id: u32,
        range: KeyRange,
        to: (u32, PeerId),
        tracked: bool,
        outbox: &mut Vec<(PeerId, Frame)>,
    ) {
        let Some(e) = self.shards.get(&id) else { return };
        let ids = e.shard.slots_in(range);
        tracing::debug!(table = e.shard.table(), %range, keys = ids.len(), to = to.0, "sending a copy to a new replica");
        // Still sent with no keys: the replica learns the range's seqs and
        // progress.
        let ds = self.deltas(repl, e, range, &ids, repl::SNAPSHOT);
        let frames = if tracked && !ds.is_empty() {
            // A batch without requests, complete once all of it is applied.
            let batch = repl.next_batch.fetch_add(1, Ordering::Relaxed) + 1;
            let fs = pack(ds, batch);
            let b = Batch { waiting: Mutex::new(vec![(to.0, fs.len())]), requests: Vec::new() };
            repl.batches.lock().insert(batch, Arc::new(b));
            fs
        } else {
            pack(ds, 0)
        };
        outbox.extend(frames.into_iter().map(|f| (to.1, f)));
    }

    /// Replica side: applies a REPLICATE frame; acknowledges it unless it
    /// was malformed.
    #[allow(clippy::too_many_arguments)]
    fn delta(
        &mut self,
        id: u32,
        from: PeerId,
        h: ReplHeader,
        segs: &[Bytes],
        only: Option<KeyRange>,
        parts: &AtomicUsize,
        outbox: &mut Vec<(PeerId, Frame)>,
    ) {
        let Some(e) = self.shards.get_mut(&id) else {
            tracing::warn!(table = h.table, "replicated state for a shard that is not here");
            return;
        };
        // Checked again here, in the lane's order: state the old owner sent
        // before it died may be read off its connection after this server
        // took the range over (and applied retried pushes to it). Applying
        // it now would overwrite newer pushes.
        let range = only.unwrap_or(KeyRange::new(h.start, h.end));
        if e.targets.iter().any(|t| t.range.start < range.end && range.start < t.range.end) {
            tracing::debug!(table = h.table, %range, from = h.from, "dropped state from a former owner of a range this server owns");
            return;
        }
        match apply_delta_frame(e, &h, segs, only) {
            Ok(()) => {
                // AcqRel: the last part acknowledges after every other one.
                if h.batch != 0 && parts.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let ack = Frame::new(kind::REPLICATED, 0, Bytes::copy_from_slice(&h.batch.to_le_bytes()));
                    outbox.push((from, ack));
                }
            }
            // Never acknowledged: the owner's pushes stay unacknowledged
            // rather than being reported safe when they are not.
            Err(m) => tracing::error!(table = h.table, error = %m, "refused replicated state"),
        }
    }
}

impl LaneState {
    /// Checkpoint frames into shard `id`: the keys inside its range.
    fn restore(&mut self, id: u32, frames: &[Frame], clock: u64) -> Result<(), String> {
        let e = self.shards.get_mut(&id).ok_or_else(|| format!("shard {id} is not on this lane"))?;
        let range = e.shard.range();
        for f in frames {
            for d in unpack(f)? {
                let h = d.header;
                if h.table != e.shard.table() {
                    return Err(format!("a delta of table {} in a file of table {}", h.table, e.shard.table()));
                }
                // Not the seqs: they belong to the workers of the job that
                // wrote the checkpoint, and this job's workers count afresh.
                apply_delta_parts(e, &h, &d.segments, Some(range), false)?;
            }
        }
        let workers = e.shard.applied().len();
        if e.active {
            for w in 0..workers {
                let _ = e.shard.record_progress(w, clock);
            }
        } else {
            e.shard.merge_progress(&vec![clock; workers]);
        }
        Ok(())
    }
}

fn apply_delta_frame(e: &mut Entry, h: &ReplHeader, segs: &[Bytes], only: Option<KeyRange>) -> Result<(), String> {
    apply_delta_parts(e, h, segs, only, h.flags & repl::LAST != 0)?;
    let progress = segs.last().map(pod_slice::<u64>).unwrap_or_default();
    if !e.active {
        e.shard.merge_progress(&progress);
    }
    Ok(())
}

/// Applies a REPLICATE frame's keys (those inside `only`, when given) and
/// its applied seqs; returns nothing of its progress (callers decide).
fn apply_delta_parts(
    e: &mut Entry,
    h: &ReplHeader,
    segs: &[Bytes],
    only: Option<KeyRange>,
    seqs: bool,
) -> Result<(), String> {
    let mut it = segs.iter();
    let mut next = |what: &str| it.next().ok_or_else(|| format!("no {what} segment"));
    let keys_seg = if h.flags & repl::RANGE == 0 { Some(next("keys")?) } else { None };
    let raw = if h.flags & repl::RAW != 0 { Some(pod_slice::<u64>(next("slots")?)) } else { None };
    let (versions, values) = match raw {
        Some(_) => (Default::default(), Default::default()),
        None => (pod_slice::<u32>(next("versions")?), pod_slice::<f32>(next("values")?)),
    };
    let state = if h.flags & repl::STATE != 0 { pod_slice::<f32>(next("state")?) } else { Default::default() };
    let pending = if h.flags & repl::PENDING != 0 { pod_slice::<u64>(next("pending")?) } else { Default::default() };
    let applied = pod_slice::<u64>(next("applied seqs")?);
    let progress = pod_slice::<u64>(next("progress")?);
    if it.next().is_some() {
        return Err("more segments than the header announces".into());
    }
    if applied.len() != h.workers as usize || progress.len() != h.workers as usize {
        return Err(format!("{} seqs and {} progress words for {} workers", applied.len(), progress.len(), h.workers));
    }
    if seqs && applied.len() != e.shard.applied().len() {
        return Err(format!("seqs of {} workers for a job of {}", applied.len(), e.shard.applied().len()));
    }
    let key_view = keys_seg.map(pod_slice::<u64>);
    let keys = match &key_view {
        Some(k) => KeyRun::List(k),
        None => KeyRun::Range { first: h.first, count: h.count as usize },
    };
    if keys.len() as u64 != h.count {
        return Err(format!("{} keys, header says {}", keys.len(), h.count));
    }
    // The part of the keys inside `only` (keys are sorted).
    let (lo, hi) = match only {
        None => (0, keys.len()),
        Some(r) => {
            let n = keys.len();
            let (mut a, mut b) = (0, n);
            while a < b {
                let m = (a + b) / 2;
                if keys.get(m) < r.start { a = m + 1 } else { b = m }
            }
            let lo = a;
            let (mut a, mut b) = (lo, n);
            while a < b {
                let m = (a + b) / 2;
                if keys.get(m) < r.end { a = m + 1 } else { b = m }
            }
            (lo, a)
        }
    };
    let d = e.shard.layout().dim();
    let spk = if keys.is_empty() { 0 } else { state.len() / keys.len() };
    if let (Some(raw), KeyRun::Range { first, .. }) = (&raw, keys) {
        let w = e.shard.layout().words();
        if hi > lo {
            let short = || format!("{} words and {} state values for {} keys", raw.len(), state.len(), keys.len());
            let words = raw.get(lo * w..hi * w).ok_or_else(short)?;
            let st: &[f32] = if state.is_empty() { &[] } else { state.get(lo * spk..hi * spk).ok_or_else(short)? };
            let pend: &[u64] = if pending.is_empty() { &[] } else { pending.get(lo..hi).ok_or_else(short)? };
            e.shard.apply_raw(first + lo as u64, words, st, pend).map_err(|x| x.to_string())?;
        }
    } else if raw.is_some() {
        return Err("raw slots need a key range".into());
    } else if hi > lo {
        let part = match keys {
            KeyRun::List(k) => KeyRun::List(&k[lo..hi]),
            KeyRun::Range { first, .. } => KeyRun::Range { first: first + lo as u64, count: hi - lo },
        };
        let short = || format!("{} versions and {} values for {} keys", versions.len(), values.len(), keys.len());
        let pend: &[u64] = if pending.is_empty() { &[] } else { pending.get(lo..hi).ok_or_else(short)? };
        let st: &[f32] = if state.is_empty() { &[] } else { state.get(lo * spk..hi * spk).ok_or_else(short)? };
        let vs = versions.get(lo..hi).ok_or_else(short)?;
        let vals = values.get(lo * d..hi * d).ok_or_else(short)?;
        e.shard.apply_delta(part, vs, vals, st, pend).map_err(|x| x.to_string())?;
    }
    if seqs {
        e.learn(only.unwrap_or(KeyRange::new(h.start, h.end)), &applied);
    }
    Ok(())
}

#[derive(Default)]
struct Helper {
    kicked: Mutex<bool>,
    cv: Condvar,
}

pub(super) struct Lane {
    repl: Arc<Replication>,
    queue: Mutex<VecDeque<Job>>,
    running: AtomicBool,
    /// Only the runner touches it; the lock is never contended.
    state: Mutex<LaneState>,
    helper: Helper,
    stopped: AtomicBool,
}

impl Lane {
    pub fn new(repl: Arc<Replication>) -> Lane {
        Lane {
            repl,
            queue: Mutex::default(),
            running: AtomicBool::new(false),
            state: Mutex::default(),
            helper: Helper::default(),
            stopped: AtomicBool::new(false),
        }
    }

    /// Queues `job` and, when `inline`, applies the queue on this thread
    /// (unless another thread is applying it); otherwise wakes the helper.
    pub fn submit(&self, job: Job, inline: bool) {
        self.queue.lock().push_back(job);
        if inline {
            self.run();
        } else {
            *self.helper.kicked.lock() = true;
            self.helper.cv.notify_one();
        }
    }

    /// Drains the queue if no other thread is.
    fn run(&self) {
        loop {
            // Acquire: see the shards as the previous runner left them.
            if self.running.swap(true, Ordering::Acquire) {
                return; // the current runner will take our job too
            }
            let mut replies: Vec<(Arc<Request>, Frame)> = Vec::new();
            let mut outbox: Vec<(PeerId, Frame)> = Vec::new();
            {
                let mut st = self.state.lock();
                loop {
                    let job = self.queue.lock().pop_front();
                    let Some(job) = job else { break };
                    match job {
                        Job::Runs { req, runs } => {
                            if let Some(reply) = st.start(req.clone(), runs) {
                                replies.push((req, reply));
                            }
                        }
                        Job::Clock { worker, clock } => st.clock(worker, clock, &mut replies),
                        Job::ResetClock { worker, clock } => st.reset_clock(worker, clock),
                        Job::WorkerLost { worker } => st.worker_lost(worker, &mut replies),
                        Job::Install { id, shard, active, targets, epoch, owned, bounds } => {
                            st.install(id, *shard, active, targets, epoch, owned, &bounds)
                        }
                        Job::Roles { id, active, targets, epoch, owned, bounds } => {
                            // Changes made under the old roles go where
                            // those roles said (a range handed to a joining
                            // server reaches it before this one lets go).
                            st.replicate(&self.repl, &mut outbox);
                            st.roles(id, active, targets, epoch, owned, &bounds)
                        }
                        Job::Snapshot { id, range, to, tracked } => {
                            st.snapshot(&self.repl, id, range, to, tracked, &mut outbox)
                        }
                        Job::Fence { reply } => {
                            st.replicate(&self.repl, &mut outbox);
                            let _ = reply.send(());
                        }
                        Job::Delta { id, from, header, segments, only, parts } => {
                            st.delta(id, from, header, &segments, only, &parts, &mut outbox)
                        }
                        Job::Checkpoint { id, range, reply } => {
                            let frames = st.shards.get(&id).map_or_else(Vec::new, |e| {
                                let ids = e.shard.slots_in(range);
                                st.delta_frames(&self.repl, e, range, &ids, repl::SNAPSHOT)
                            });
                            let _ = reply.send(frames);
                        }
                        Job::Restore { id, frames, clock, reply } => {
                            let _ = reply.send(st.restore(id, &frames, clock));
                        }
                    }
                }
                st.replicate(&self.repl, &mut outbox);
                // Replicated state goes out while this thread is still the
                // runner: a replica must receive a shard's states in the
                // order they were made (the next runner, on another thread,
                // could otherwise send a newer state first, and the older
                // one would then overwrite it). Sends only queue when the
                // socket is full, so a slow replica delays but never blocks
                // this lane for long.
                if let Some(net) = self.repl.net.get() {
                    for (peer, f) in outbox.drain(..) {
                        if let Err(e) = net.send(peer, f) {
                            tracing::debug!(error = %e, "replication frame not delivered");
                        }
                    }
                }
            }
            // Release: the next runner sees everything applied above.
            self.running.store(false, Ordering::Release);
            // Replies go out after the lane is released: a slow worker never
            // holds a lane.
            for (req, reply) in replies {
                req.deliver(reply);
            }
            // A job queued after our last pop but before we released would
            // otherwise wait for the next submission.
            if self.queue.lock().is_empty() {
                return;
            }
        }
    }

    /// The helper thread's loop: apply whenever kicked, until stopped.
    pub fn helper_loop(&self) {
        loop {
            {
                let mut k = self.helper.kicked.lock();
                while !*k && !self.stopped.load(Ordering::Acquire) {
                    self.helper.cv.wait(&mut k);
                }
                if self.stopped.load(Ordering::Acquire) {
                    return;
                }
                *k = false;
            }
            self.run();
        }
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _k = self.helper.kicked.lock();
        self.helper.cv.notify_all();
    }
}

/// The keys of a run, checked sorted and unique when spelled out.
fn run_keys<'a>(r: &LaneRun, view: &'a Option<std::borrow::Cow<'a, [u64]>>) -> Result<KeyRun<'a>, String> {
    match (view, r.header.form) {
        (Some(k), _) => {
            if let Some(i) = k.windows(2).position(|w| w[0] >= w[1]) {
                return Err(format!("keys must be sorted and unique: key[{}] = {} follows {}", i + 1, k[i + 1], k[i]));
            }
            Ok(KeyRun::List(k))
        }
        _ => Ok(KeyRun::Range { first: r.header.first, count: r.header.count as usize }),
    }
}

fn push_run(shards: &mut HashMap<u32, Entry>, r: &LaneRun, clock: u64, worker: usize) -> Result<(), String> {
    let e = shards.get_mut(&r.shard).ok_or_else(|| format!("shard {} is not on this lane", r.shard))?;
    let view = r.keys.as_ref().map(pod_slice::<u64>);
    let keys = run_keys(r, &view)?;
    let vals = pod_slice::<f32>(r.vals.as_ref().expect("checked by the handler"));
    let seq = r.header.seq;
    let n = keys.len();
    if n == 0 {
        e.shard.push_from(keys, &vals, clock, worker, seq).map_err(|e| e.to_string())?;
        return Ok(());
    }
    if worker >= e.shard.applied().len() {
        return Err(format!("worker rank {worker} is outside the job's {} workers", e.shard.applied().len()));
    }
    // Decided piece by piece, each by its own history: a retry whose run
    // was applied to some of its keys before (by this server or the owner
    // it learned them from) and not to others is applied to the others.
    // Every piece is decided before any is applied; the keys of the
    // shard's own history decide once for the whole run (the first of them
    // would otherwise pass its seq to the others).
    let d = e.shard.layout().dim();
    let (first, last) = (keys.get(0), keys.get(n - 1));
    let own_fresh = seq == 0 || seq > e.shard.applied()[worker];
    let mut plan: Vec<(usize, usize, Option<usize>, bool)> = Vec::new();
    let mut lo = 0;
    for (piece, part) in e.pieces(KeyRange::new(first, last + 1)) {
        let hi = keys.lower_bound(piece.end, lo);
        if hi == lo {
            continue;
        }
        let fresh = match part {
            None => own_fresh,
            Some(i) => match e.lineage[i].1.get(worker) {
                Some(&known) => seq == 0 || seq > known,
                None => return Err(format!("no seq of worker rank {worker} for keys {piece}")),
            },
        };
        plan.push((lo, hi, part, fresh));
        lo = hi;
    }
    // Each piece's seq is recorded as soon as the piece is applied: a
    // failure in a later piece (a sparse shard out of memory) leaves the
    // run half applied, and its retry must apply only the other half.
    let mut result = Ok(());
    for &(lo, hi, part, fresh) in &plan {
        if !fresh {
            skipped(r, worker, lo, hi);
            continue;
        }
        let (sub, v) = (keys.slice(lo, hi), &vals[lo * d..hi * d]);
        if let Err(x) = e.shard.push_from(sub, v, clock, worker, 0) {
            result = Err(x.to_string());
            break;
        }
        if seq != 0 {
            match part {
                None => e.shard.note_applied(worker, seq),
                Some(i) => e.lineage[i].1[worker] = seq,
            }
        }
    }
    result
}

/// A retried push run (keys `lo..hi` of it) was applied before: skipped.
fn skipped(r: &LaneRun, worker: usize, lo: usize, hi: usize) {
    tracing::debug!(
        worker,
        seq = r.header.seq,
        first = r.header.first,
        lo,
        hi,
        "a retried push run was applied before; skipped"
    );
}

fn pull_run(shards: &HashMap<u32, Entry>, r: &LaneRun) -> Result<RunOut, String> {
    let shard = &shards.get(&r.shard).ok_or_else(|| format!("shard {} is not on this lane", r.shard))?.shard;
    let view = r.keys.as_ref().map(pod_slice::<u64>);
    let keys = run_keys(r, &view)?;
    match &r.known {
        Some(known) => {
            let (bitmap, values, versions) =
                shard.pull_changed(keys, &pod_slice::<u32>(known)).map_err(|e| e.to_string())?;
            Ok(RunOut::Changed { bitmap, values, versions })
        }
        None => shard.pull_vec(keys).map(RunOut::Values).map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ShardConfig;
    use crate::table::{Init, Storage, UpdaterSpec};

    fn shard(table: u32) -> Box<Shard> {
        shard_waiting(table, false)
    }

    fn shard_waiting(table: u32, waits_for_lost: bool) -> Box<Shard> {
        let rule = crate::updater::Rules::default().resolve(&UpdaterSpec::Sum).unwrap();
        let cfg = ShardConfig {
            table,
            range: KeyRange::new(0, 8),
            dim: 1,
            storage: Storage::Dense,
            init: Init::Zeros,
            workers: 2,
            files: None,
            waits_for_lost,
        };
        Box::new(Shard::new(cfg, rule).unwrap())
    }

    /// A push of 1 to keys `first..first + count` of shard 1, run seq `seq`.
    fn run(first: u64, count: u64, seq: u64) -> LaneRun {
        LaneRun {
            header: RunHeader { run: 0, form: proto::run_form::RANGE, first, count, digest: 0, seq },
            shard: 1,
            keys: None,
            vals: Some(bytes_of_vec(vec![1.0f32; count as usize])),
            known: None,
            part: 0,
        }
    }

    /// Shard 1 owning `owned` (or a copy, when empty), with no seqs yet.
    fn entry(owned: Vec<KeyRange>) -> Entry {
        Entry {
            shard: *shard(1),
            active: !owned.is_empty(),
            targets: vec![],
            epoch: 1,
            owned,
            lineage: vec![],
            cuts: vec![],
        }
    }

    #[test]
    fn a_restarted_workers_clock_is_set_back_in_owned_shards_and_copies() {
        let lane = Lane::new(Arc::new(Replication::default()));
        install(&lane, 1, shard(1), true);
        install(&lane, 2, shard(2), false);
        for (worker, clock) in [(0, 12), (1, 9), (1, u64::MAX)] {
            lane.submit(Job::Clock { worker, clock }, true);
        }
        {
            let st = lane.state.lock();
            assert_eq!(st.shards[&1].shard.min_progress(), 12, "worker 1 left: only worker 0 counts");
        }
        lane.submit(Job::ResetClock { worker: 1, clock: 9 }, true);
        {
            let st = lane.state.lock();
            assert_eq!(st.clocks, [12, 9]);
            assert_eq!((st.shards[&1].shard.progress(1), st.shards[&1].shard.min_progress()), (9, 9));
            assert_eq!(st.shards[&2].shard.progress(1), 9, "the copy is set back too");
        }
        // A shard installed later starts from the reset clock, and clocks
        // raise it again from there.
        install(&lane, 3, shard(3), true);
        lane.submit(Job::Clock { worker: 1, clock: 10 }, true);
        let st = lane.state.lock();
        assert_eq!((st.shards[&3].shard.progress(1), st.shards[&3].shard.min_progress()), (10, 10));
    }

    fn install(lane: &Lane, id: u32, shard: Box<Shard>, active: bool) {
        install_with(lane, id, shard, active, Vec::new(), Vec::new());
    }

    /// Installs `shard` as `id` (epoch 1, no replicas), owning `owned`, with
    /// the epoch's range bounds `bounds` inside it.
    fn install_with(lane: &Lane, id: u32, shard: Box<Shard>, active: bool, owned: Vec<KeyRange>, bounds: Vec<u64>) {
        lane.submit(Job::Install { id, shard, active, targets: Vec::new(), epoch: 1, owned, bounds }, true);
    }

    /// A lost worker holds back the shards that wait for lost workers (its
    /// clock's pushes are part of their state) and no others, shards
    /// installed meanwhile included, until its new incarnation's reset.
    #[test]
    fn a_lost_worker_holds_back_only_the_shards_that_wait_for_lost_workers() {
        let lane = Lane::new(Arc::new(Replication::default()));
        install(&lane, 1, shard(1), true);
        install(&lane, 2, shard_waiting(2, true), true);
        for (worker, clock) in [(0, 12), (1, 9)] {
            lane.submit(Job::Clock { worker, clock }, true);
        }
        lane.submit(Job::WorkerLost { worker: 1 }, true);
        install(&lane, 3, shard(3), true);
        install(&lane, 4, shard_waiting(4, true), true);
        {
            let st = lane.state.lock();
            let mins: Vec<u64> = (1..=4).map(|i| st.shards[&i].shard.min_progress()).collect();
            assert_eq!(mins, [12, 9, 12, 9], "only the waiting shards wait for the lost worker");
        }
        lane.submit(Job::ResetClock { worker: 1, clock: 8 }, true);
        install(&lane, 5, shard(5), true);
        let st = lane.state.lock();
        let mins: Vec<u64> = (1..=5).map(|i| st.shards[&i].shard.min_progress()).collect();
        assert_eq!(mins, [8; 5], "the new incarnation counts everywhere again");
    }

    /// The runs of one push share its seq. Two of them to two ranges of one
    /// shard (ranges of the push's epoch) both apply, each once, although
    /// this server owns both ranges; and a copy that learns one history for
    /// both ranges keeps them apart as well.
    #[test]
    fn the_runs_of_one_push_to_two_ranges_of_a_shard_each_apply_once() {
        let lane = Lane::new(Arc::new(Replication::default()));
        let owned = vec![KeyRange::new(0, 8)];
        install_with(&lane, 1, shard(1), true, owned, vec![4]);
        let mut st = lane.state.lock();
        let shards = &mut st.shards;
        for _ in 0..2 {
            push_run(shards, &run(4, 4, 7), 0, 0).unwrap();
            push_run(shards, &run(0, 4, 7), 0, 0).unwrap();
        }
        let got = shards[&1].shard.pull_vec(KeyRun::Range { first: 0, count: 8 }).unwrap();
        assert_eq!(got, [1.0; 8], "both runs once");
        // A copy with the epoch's cut learns 0..8 as one owner's history.
        let mut copy = entry(vec![]);
        copy.add_cuts(&[4]);
        copy.learn(KeyRange::new(0, 8), &[3, 0]);
        assert_eq!((copy.seqs_for(KeyRange::new(0, 4)), copy.seqs_for(KeyRange::new(4, 8))), (vec![3, 0], vec![3, 0]));
        copy.set_owned(vec![KeyRange::new(0, 8)]);
        let mut shards = HashMap::from([(1u32, copy)]);
        push_run(&mut shards, &run(0, 4, 7), 0, 0).unwrap();
        push_run(&mut shards, &run(4, 4, 7), 0, 0).unwrap();
        let got = shards[&1].shard.pull_vec(KeyRun::Range { first: 0, count: 8 }).unwrap();
        assert_eq!(got, [1.0; 8], "both runs once on the copy promoted");
    }

    #[test]
    fn lineage_keeps_each_ranges_seqs_apart_and_dedups_by_them() {
        let mut e = entry(vec![KeyRange::new(0, 8)]);
        // One owner's history of 0..8, then another's of 2..4 only.
        e.learn(KeyRange::new(0, 8), &[10, 20]);
        e.learn(KeyRange::new(2, 4), &[50, 5]);
        assert_eq!(e.seqs_for(KeyRange::new(0, 2)), [10, 20], "keys outside 2..4 keep their history");
        assert_eq!(e.seqs_for(KeyRange::new(4, 8)), [10, 20]);
        assert_eq!(e.seqs_for(KeyRange::new(2, 4)), [50, 20], "merged along the keys' own history");
        // A retry of worker 0's seq 30 to keys 0..2 was never applied there:
        // it is, although seq 50 was applied to keys 2..4.
        let mut shards = HashMap::from([(1u32, e)]);
        push_run(&mut shards, &run(0, 2, 30), 0, 0).unwrap();
        push_run(&mut shards, &run(2, 2, 40), 0, 0).unwrap(); // applied before (50): skipped
        let e = &shards[&1];
        let got = e.shard.pull_vec(KeyRun::Range { first: 0, count: 4 }).unwrap();
        assert_eq!(got, [1.0, 1.0, 0.0, 0.0]);
        assert_eq!(e.seqs_for(KeyRange::new(0, 2)), [30, 20]);
    }

    /// The joiner-killed loss, deterministically: a shard hands part of its
    /// keys over, keeps applying the runs of its other keys (their seqs
    /// pass the handed-over run's), then takes the part back from the dead
    /// new owner, and the retried run must be applied there.
    #[test]
    fn a_range_taken_back_applies_the_retry_its_other_keys_overtook() {
        let e = entry(vec![KeyRange::new(0, 8)]);
        let mut shards = HashMap::from([(1u32, e)]);
        push_run(&mut shards, &run(0, 8, 10), 0, 0).unwrap();
        // 2..4 goes to a joining server; the next op's runs: 11 here, 12 to
        // the joiner, 13 here.
        let e = shards.get_mut(&1).unwrap();
        e.set_owned(vec![KeyRange::new(0, 2), KeyRange::new(4, 8)]);
        push_run(&mut shards, &run(0, 2, 11), 0, 0).unwrap();
        push_run(&mut shards, &run(4, 4, 13), 0, 0).unwrap();
        // The joiner died before answering 12: its retry comes back here.
        shards.get_mut(&1).unwrap().set_owned(vec![KeyRange::new(0, 8)]);
        push_run(&mut shards, &run(2, 2, 12), 0, 0).unwrap();
        push_run(&mut shards, &run(2, 2, 12), 0, 0).unwrap(); // a second retry: skipped
        push_run(&mut shards, &run(4, 4, 13), 0, 0).unwrap(); // applied before: skipped
        // A later op over the whole shard, in pieces of two histories.
        push_run(&mut shards, &run(0, 8, 14), 0, 0).unwrap();
        push_run(&mut shards, &run(0, 8, 14), 0, 0).unwrap();
        let got = shards[&1].shard.pull_vec(KeyRun::Range { first: 0, count: 8 }).unwrap();
        assert_eq!(got, [3.0; 8], "every run once, none lost, none twice");
    }

    /// A range this server starts to own with no history known here (a copy
    /// that never learned seqs) does not take the seqs of its other keys.
    #[test]
    fn a_range_owned_without_a_known_history_starts_from_no_seq() {
        let e = entry(vec![KeyRange::new(0, 4)]);
        let mut shards = HashMap::from([(1u32, e)]);
        push_run(&mut shards, &run(0, 4, 20), 0, 0).unwrap();
        shards.get_mut(&1).unwrap().set_owned(vec![KeyRange::new(0, 8)]);
        push_run(&mut shards, &run(4, 4, 15), 0, 0).unwrap();
        let got = shards[&1].shard.pull_vec(KeyRun::Range { first: 0, count: 8 }).unwrap();
        assert_eq!(got, [1.0; 8]);
        assert_eq!(shards[&1].seqs_for(KeyRange::new(4, 8)), [15, 0]);
        assert_eq!(shards[&1].seqs_for(KeyRange::new(0, 4)), [20, 0]);
    }

    /// A copy of a shard with two histories carries each piece's seqs, and
    /// the receiver learns them apart (never the larger for both).
    #[test]
    fn a_copy_carries_each_pieces_seqs_and_the_receiver_learns_them_apart() {
        let repl = Replication::default();
        let lane = Lane::new(Arc::new(Replication::default()));
        let mut owner = entry(vec![KeyRange::new(0, 8)]);
        owner.learn(KeyRange::new(4, 8), &[5, 6]);
        let mut shards = HashMap::from([(1u32, owner)]);
        push_run(&mut shards, &run(0, 4, 30), 0, 0).unwrap();
        push_run(&mut shards, &run(4, 4, 7), 0, 0).unwrap();
        let owner = &shards[&1];
        let ids = owner.shard.slots_in(KeyRange::new(0, 8));
        let st = lane.state.lock();
        let ds = st.deltas(&repl, owner, KeyRange::new(0, 8), &ids, repl::SNAPSHOT);
        let ranges: Vec<(u64, u64, bool)> =
            ds.iter().map(|d| (d.header.start, d.header.end, d.header.flags & repl::LAST != 0)).collect();
        assert_eq!(ranges, [(0, 4, true), (4, 8, true)]);
        let mut copy = entry(vec![]);
        for d in &ds {
            apply_delta_frame(&mut copy, &d.header, &d.segments, None).unwrap();
        }
        assert_eq!(copy.seqs_for(KeyRange::new(0, 4)), [30, 0]);
        assert_eq!(copy.seqs_for(KeyRange::new(4, 8)), [7, 6]);
        let got = copy.shard.pull_vec(KeyRun::Range { first: 0, count: 8 }).unwrap();
        assert_eq!(got, [1.0; 8]);
        // A delta that is not the last of its range teaches no seqs.
        let mut h = ds[0].header;
        h.flags &= !repl::LAST;
        let mut fresh = Entry { lineage: vec![], ..copy };
        apply_delta_frame(&mut fresh, &h, &ds[0].segments, None).unwrap();
        assert!(fresh.lineage.is_empty());
    }

    /// Runs of one worker to different ranges of a shard may be applied out
    /// of their seq order (a retry of the first after the second, when
    /// MOVED answers are sent again run by run): each range keeps its own
    /// seqs, so the first is not taken for old.
    #[test]
    fn a_retry_after_a_later_run_to_another_range_of_the_shard_is_applied() {
        let lane = Lane::new(Arc::new(Replication::default()));
        let owned = vec![KeyRange::new(0, 4), KeyRange::new(4, 6), KeyRange::new(6, 8)];
        install_with(&lane, 1, shard(1), true, owned, Vec::new());
        let mut st = lane.state.lock();
        let shards = &mut st.shards;
        push_run(shards, &run(6, 2, 12), 0, 0).unwrap();
        push_run(shards, &run(0, 4, 10), 0, 0).unwrap();
        push_run(shards, &run(4, 2, 11), 0, 0).unwrap();
        push_run(shards, &run(0, 4, 10), 0, 0).unwrap(); // a second retry: skipped
        let got = shards[&1].shard.pull_vec(KeyRun::Range { first: 0, count: 8 }).unwrap();
        assert_eq!(got, [1.0; 8]);
    }
}
