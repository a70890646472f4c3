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
    next_batch: AtomicU64,
}

/// Requests whose replies wait for replicas.
struct Batch {
    /// Replica servers that have not acknowledged yet.
    waiting: Mutex<Vec<u32>>,
    requests: Vec<Arc<Request>>,
}

impl Replication {
    /// Replica `server` applied batch `id`.
    pub fn acked(&self, id: u64, server: u32) {
        let done = {
            let mut batches = self.batches.lock();
            let Some(b) = batches.get(&id) else { return };
            let mut w = b.waiting.lock();
            w.retain(|&s| s != server);
            let empty = w.is_empty();
            drop(w);
            if empty { batches.remove(&id) } else { None }
        };
        if let Some(b) = done {
            b.requests.iter().for_each(|r| r.release());
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
                    w.retain(|&s| !gone(s));
                    w.is_empty().then_some(id)
                })
                .collect();
            ids.into_iter().filter_map(|id| batches.remove(&id)).collect()
        };
        for b in done {
            b.requests.iter().for_each(|r| r.release());
        }
    }

    /// Batches waiting for replicas (for tests and status).
    pub fn pending(&self) -> usize {
        self.batches.lock().len()
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
    /// Owned parts of the shard that have replicas.
    targets: Vec<Target>,
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
        }
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
            out.replies.extend(part.replies);
            out.values.extend(part.values);
            out.errors.extend(part.errors);
            out.progress = out.progress.min(part.progress);
        }
        if self.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        let out = std::mem::take(&mut *self.out.lock());
        let header = ReplyHeader {
            table: self.table,
            runs: out.replies.len() as u32,
            progress: out.progress,
            epoch: self.epoch,
            reserved: 0,
        };
        let meta = proto::build_meta(&header, &out.replies);
        let mut reply = Frame::new(kind::REPLY, self.id, meta);
        reply.segments = out.values;
        reply.segments.extend(out.errors);
        Some(reply)
    }
}

/// What a lane produced for a request: per-run replies, value segments (in
/// run order) and error messages.
#[derive(Default)]
struct Output {
    replies: Vec<RunReply>,
    values: Vec<Bytes>,
    errors: Vec<Bytes>,
    /// Smallest progress of the shards served.
    progress: u64,
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
    Install {
        id: u32,
        shard: Box<Shard>,
        active: bool,
        targets: Vec<Target>,
    },
    /// The membership changed: what this server now does with shard `id`.
    Roles {
        id: u32,
        active: bool,
        targets: Vec<Target>,
    },
    /// Sends a full copy of the keys of `range` to a new replica.
    Snapshot {
        id: u32,
        range: KeyRange,
        to: (u32, PeerId),
    },
    /// Replica side: the owner's state of some keys (a REPLICATE frame,
    /// checked only for its header so far), acknowledged on `from`.
    Delta {
        id: u32,
        from: PeerId,
        header: ReplHeader,
        segments: Vec<Bytes>,
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
    /// Requests waiting for progress, in arrival order.
    parked: Vec<Parked>,
    /// Requests whose pushes this run applied (they join its batch).
    pushed: Vec<Arc<Request>>,
}

impl LaneState {
    /// Applies a request's pushes, then completes it or parks it.
    fn start(&mut self, req: Arc<Request>, runs: Vec<LaneRun>) -> Option<Frame> {
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
            match res {
                Ok(o) => {
                    let status = if matches!(o, RunOut::Changed { .. }) { status::CHANGED } else { status::OK };
                    out.replies.push(RunReply { run: r.header.run, status, count });
                    match o {
                        RunOut::Ack => {}
                        RunOut::Values(v) => out.values.push(bytes_of_vec(v)),
                        RunOut::Changed { bitmap, values, versions } => {
                            out.values.push(Bytes::from(bitmap));
                            out.values.push(bytes_of_vec(values));
                            out.values.push(bytes_of_vec(versions));
                        }
                    }
                }
                Err(msg) => {
                    out.replies.push(RunReply { run: r.header.run, status: status::ERROR, count });
                    out.errors.push(Bytes::from(msg));
                }
            }
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

    fn install(&mut self, id: u32, mut shard: Shard, active: bool, targets: Vec<Target>) {
        if active {
            for (w, &c) in self.clocks.iter().enumerate() {
                let _ = shard.record_progress(w, c);
            }
        }
        shard.track_changes(!targets.is_empty());
        self.shards.insert(id, Entry { shard, active, targets });
    }

    fn roles(&mut self, id: u32, active: bool, targets: Vec<Target>) {
        let Some(e) = self.shards.get_mut(&id) else { return };
        if active && !e.active {
            // Promoted: the copy becomes the range's state of record. Its
            // progress is the old owner's; workers that left hold nobody
            // back, and live workers send their clocks again after their
            // retries.
            e.shard.take_ownership();
            for (w, &c) in self.clocks.iter().enumerate() {
                if c == u64::MAX {
                    let _ = e.shard.record_progress(w, c);
                }
            }
        }
        e.active = active;
        e.shard.track_changes(!targets.is_empty());
        e.targets = targets;
    }

    /// Frames carrying the state of slots `ids` of shard `id` (owned part
    /// `range`) to a replica.
    fn delta_frames(&self, repl: &Replication, e: &Entry, range: KeyRange, ids: &[u32], flags: u32) -> Vec<Frame> {
        let s = &e.shard;
        let probe = s.delta_of(&ids[..ids.len().min(1)]);
        let per_key = 8 + 4 + s.layout().dim() * 4 + probe.state.len() * 4 + probe.pending.len() * 8;
        let chunk = (MAX_DELTA_BYTES / per_key.max(1)).max(1);
        let applied = bytes_of_vec(s.applied().to_vec());
        let progress = bytes_of_vec(s.progress_all());
        ids.chunks(chunk)
            .map(|part| {
                let d = s.delta_of(part);
                let mut f = flags;
                if d.range.is_some() {
                    f |= repl::RANGE;
                }
                if !d.state.is_empty() {
                    f |= repl::STATE;
                }
                if !d.pending.is_empty() {
                    f |= repl::PENDING;
                }
                let (first, count) = d.range.unwrap_or((d.keys.first().copied().unwrap_or(0), d.len() as u64));
                let h = ReplHeader {
                    table: s.table(),
                    from: repl.me.load(Ordering::Relaxed),
                    epoch: repl.epoch.load(Ordering::Acquire),
                    flags: f,
                    batch: 0,
                    start: range.start,
                    end: range.end,
                    first,
                    count,
                    workers: s.applied().len() as u32,
                    reserved: 0,
                };
                let mut frame = Frame::new(kind::REPLICATE, 0, Bytes::copy_from_slice(bytemuck::bytes_of(&h)));
                let Delta { keys, versions, values, state, pending, range: r, .. } = d;
                if r.is_none() {
                    frame.segments.push(bytes_of_vec(keys));
                }
                frame.segments.push(bytes_of_vec(versions));
                frame.segments.push(bytes_of_vec(values));
                if f & repl::STATE != 0 {
                    frame.segments.push(bytes_of_vec(state));
                }
                if f & repl::PENDING != 0 {
                    frame.segments.push(bytes_of_vec(pending));
                }
                frame.segments.push(applied.clone());
                frame.segments.push(progress.clone());
                frame
            })
            .collect()
    }

    /// End of a run: sends what changed in owned shards to their replicas,
    /// and makes the requests that pushed in this run wait for them.
    fn replicate(&mut self, repl: &Replication, outbox: &mut Vec<(PeerId, Frame)>) {
        let mut frames: Vec<(u32, PeerId, Frame)> = Vec::new();
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
                for f in self.delta_frames(repl, e, t.range, &mine, 0) {
                    for &(server, peer) in &t.peers {
                        frames.push((server, peer, f.clone()));
                    }
                }
            }
        }
        let pushed = std::mem::take(&mut self.pushed);
        if frames.is_empty() {
            return;
        }
        let id = repl.next_batch.fetch_add(1, Ordering::Relaxed) + 1;
        let mut waiting: Vec<u32> = frames.iter().map(|f| f.0).collect();
        waiting.sort_unstable();
        waiting.dedup();
        for r in &pushed {
            r.holds.fetch_add(1, Ordering::AcqRel);
        }
        repl.batches.lock().insert(id, Arc::new(Batch { waiting: Mutex::new(waiting), requests: pushed }));
        for (_, peer, mut f) in frames {
            let mut h: ReplHeader = bytemuck::pod_read_unaligned(&f.meta);
            h.batch = id;
            f.meta = Bytes::copy_from_slice(bytemuck::bytes_of(&h));
            outbox.push((peer, f));
        }
    }

    fn snapshot(&self, repl: &Replication, id: u32, range: KeyRange, to: PeerId, outbox: &mut Vec<(PeerId, Frame)>) {
        let Some(e) = self.shards.get(&id) else { return };
        let ids = e.shard.slots_in(range);
        tracing::debug!(table = e.shard.table(), %range, keys = ids.len(), "sending a copy to a new replica");
        if ids.is_empty() {
            // Still tell the replica the seqs and progress of the range.
            let mut f = self.delta_frames(repl, e, range, &[], repl::SNAPSHOT);
            outbox.extend(f.drain(..).map(|f| (to, f)));
            return;
        }
        for f in self.delta_frames(repl, e, range, &ids, repl::SNAPSHOT) {
            outbox.push((to, f));
        }
    }

    /// Replica side: applies a REPLICATE frame; acknowledges it unless it
    /// was malformed.
    fn delta(&mut self, id: u32, from: PeerId, h: ReplHeader, segs: Vec<Bytes>, outbox: &mut Vec<(PeerId, Frame)>) {
        let Some(e) = self.shards.get_mut(&id) else {
            tracing::warn!(table = h.table, "replicated state for a shard that is not here");
            return;
        };
        // Checked again here, in the lane's order: state the old owner sent
        // before it died may be read off its connection after this server
        // took the range over (and applied retried pushes to it). Applying
        // it now would overwrite newer pushes.
        let range = KeyRange::new(h.start, h.end);
        if e.targets.iter().any(|t| t.range.start < range.end && range.start < t.range.end) {
            tracing::debug!(table = h.table, %range, from = h.from, "dropped state from a former owner of a range this server owns");
            return;
        }
        match apply_delta_frame(e, &h, &segs) {
            Ok(()) => {
                if h.batch != 0 {
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
            let h: ReplHeader =
                bytemuck::try_pod_read_unaligned(&f.meta).map_err(|_| "a malformed frame".to_string())?;
            if h.table != e.shard.table() {
                return Err(format!("a frame of table {} in a file of table {}", h.table, e.shard.table()));
            }
            // Not the seqs: they belong to the workers of the job that wrote
            // the checkpoint, and this job's workers count afresh.
            apply_delta_parts(e, &h, &f.segments, Some(range), false)?;
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

fn apply_delta_frame(e: &mut Entry, h: &ReplHeader, segs: &[Bytes]) -> Result<(), String> {
    apply_delta_parts(e, h, segs, None, true)?;
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
    let versions = pod_slice::<u32>(next("versions")?);
    let values = pod_slice::<f32>(next("values")?);
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
    if hi > lo {
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
        e.shard.merge_applied(&applied);
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
                        Job::Install { id, shard, active, targets } => st.install(id, *shard, active, targets),
                        Job::Roles { id, active, targets } => st.roles(id, active, targets),
                        Job::Snapshot { id, range, to } => st.snapshot(&self.repl, id, range, to.1, &mut outbox),
                        Job::Delta { id, from, header, segments } => st.delta(id, from, header, segments, &mut outbox),
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
    let applied = e.shard.push_from(keys, &vals, clock, worker, r.header.seq).map_err(|e| e.to_string())?;
    if !applied {
        tracing::trace!(
            worker,
            seq = r.header.seq,
            first = r.header.first,
            "a retried push run was applied before; skipped"
        );
    }
    Ok(())
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
