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
//! Being the runner is what makes the lane's shards single-writer: slot
//! stores never race, and readers (local, shared memory, RDMA) never lock.
//! Jobs run in the order they were queued, and one connection's requests are
//! queued by one thread in the order they arrived, so a pull issued after a
//! push by the same worker always observes it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::proto::{self, ReplyHeader, RunHeader, RunReply, kind, status};
use crate::store::{KeyRun, Shard};
use crate::transport::{Frame, Messenger, PeerId, bytes_of_vec, pod_slice};

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
    pending: AtomicUsize,
    out: Mutex<Output>,
}

impl Request {
    pub fn new(
        net: Arc<dyn Messenger>,
        peer: PeerId,
        id: u64,
        kind: u16,
        h: &proto::DataHeader,
        lanes: usize,
    ) -> Request {
        let out = Mutex::new(Output { progress: u64::MAX, ..Output::default() });
        let (table, need, clock) = (h.table, h.needed_progress(), u64::from(h.clock));
        Request { net, peer, id, kind, table, need, clock, pending: AtomicUsize::new(lanes), out }
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
        let header = ReplyHeader { table: self.table, runs: out.replies.len() as u32, progress: out.progress };
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
    Runs { req: Arc<Request>, runs: Vec<LaneRun> },
    Clock { worker: u32, clock: u64 },
    Install { id: u32, shard: Box<Shard> },
}

#[derive(Default)]
struct LaneState {
    shards: HashMap<u32, Shard>,
    /// Latest clock per worker, so shards created later start from it.
    clocks: Vec<u64>,
    /// Requests waiting for progress, in arrival order.
    parked: Vec<Parked>,
}

impl LaneState {
    /// Applies a request's pushes, then completes it or parks it.
    fn start(&mut self, req: Arc<Request>, runs: Vec<LaneRun>) -> Option<Frame> {
        let pushed: Vec<Result<(), String>> = if req.kind == kind::PULL {
            runs.iter().map(|_| Ok(())).collect()
        } else {
            runs.iter().map(|r| push_run(&mut self.shards, r, req.clock)).collect()
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
        runs.iter().all(|r| self.shards.get(&r.shard).is_none_or(|s| s.min_progress() >= need))
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
            if let Some(s) = self.shards.get(&r.shard) {
                out.progress = out.progress.min(s.min_progress());
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

#[derive(Default)]
struct Helper {
    kicked: Mutex<bool>,
    cv: Condvar,
}

#[derive(Default)]
pub(super) struct Lane {
    queue: Mutex<VecDeque<Job>>,
    running: AtomicBool,
    /// Only the runner touches it; the lock is never contended.
    state: Mutex<LaneState>,
    helper: Helper,
    stopped: AtomicBool,
}

impl Lane {
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
                        Job::Clock { worker, clock } => {
                            let w = worker as usize;
                            if st.clocks.len() <= w {
                                st.clocks.resize(w + 1, 0);
                            }
                            st.clocks[w] = st.clocks[w].max(clock);
                            for s in st.shards.values_mut() {
                                let _ = s.record_progress(w, clock);
                            }
                            st.release_parked(&mut replies);
                        }
                        Job::Install { id, shard } => {
                            let mut shard = *shard;
                            for (w, &c) in st.clocks.iter().enumerate() {
                                let _ = shard.record_progress(w, c);
                            }
                            st.shards.insert(id, shard);
                        }
                    }
                }
            }
            // Release: the next runner sees everything applied above.
            self.running.store(false, Ordering::Release);
            // Replies go out after the lane is released: a slow peer never
            // holds a lane.
            for (req, reply) in replies {
                if let Err(e) = req.net.send(req.peer, reply) {
                    tracing::debug!(error = %e, "reply not delivered");
                }
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

fn push_run(shards: &mut HashMap<u32, Shard>, r: &LaneRun, clock: u64) -> Result<(), String> {
    let shard = shards.get_mut(&r.shard).ok_or_else(|| format!("shard {} is not on this lane", r.shard))?;
    let view = r.keys.as_ref().map(pod_slice::<u64>);
    let keys = run_keys(r, &view)?;
    let vals = pod_slice::<f32>(r.vals.as_ref().expect("checked by the handler"));
    shard.push_at(keys, &vals, clock).map_err(|e| e.to_string())
}

fn pull_run(shards: &HashMap<u32, Shard>, r: &LaneRun) -> Result<RunOut, String> {
    let shard = shards.get(&r.shard).ok_or_else(|| format!("shard {} is not on this lane", r.shard))?;
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
