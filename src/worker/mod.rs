//! The worker: the key-value client applications use (DESIGN section 1).
//!
//! `push`, `pull` and `push_pull` return at once with a [`Timestamp`]; `wait`
//! blocks until that operation is acknowledged. A request is checked (keys
//! sorted, unique and inside the table, values `keys x dim` long), split into
//! runs by the range map, and sent as one frame per server. Replies place
//! their values straight into the caller's output buffer at each run's
//! offset. Everything a worker sends to one server travels on one ordered
//! connection and is applied in order, so a pull issued after a push observes
//! it.

mod filter;
mod op;

use filter::TableFilter;
pub use filter::{FilterStats, Filters, Kkt, Significant};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use rustc_hash::FxHashMap;

use crate::error::{Error, Result};
use crate::proto::{self, Control, DataHeader, ReplyHeader, Role, RunHeader, RunReply, kind, run_form, status};
use crate::scheduler::ring::{NO_SERVER, RangeMap, Ring};
use crate::table::{Consistency, Key, TableId, TableSpec};
use crate::transport::rdma::{self, ConnInfo, Link, RdmaMode};
use crate::transport::{Frame, Handler, Messenger, PeerId, RegionDesc, Transport, bytes_of_vec, pod_slice};

use op::{Op, OpRun, Part, Sent};

/// Identifies an operation of one worker; increases with every operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp(pub u64);

/// Sorted, unique keys, checked once and shareable without copying: pass the
/// same list to many requests.
#[derive(Clone, Debug)]
pub struct KeyList {
    bytes: Bytes,
}

impl KeyList {
    /// Takes ownership of `keys` (no copy) after checking they are sorted
    /// and unique.
    pub fn new(keys: Vec<Key>) -> Result<KeyList> {
        check_sorted(&keys)?;
        Ok(KeyList { bytes: bytes_of_vec(keys) })
    }

    /// Copies `keys`.
    pub fn from_slice(keys: &[Key]) -> Result<KeyList> {
        KeyList::new(keys.to_vec())
    }

    /// The contiguous keys `start..end`.
    pub fn range(start: Key, end: Key) -> KeyList {
        KeyList { bytes: bytes_of_vec((start..end).collect::<Vec<Key>>()) }
    }

    pub fn as_slice(&self) -> &[Key] {
        // Built from a Vec<u64>, so always 8-aligned: a borrowed view.
        bytemuck::cast_slice(&self.bytes)
    }

    pub fn len(&self) -> usize {
        self.bytes.len() / 8
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Values for a zero-copy push: owned, immutable and cheap to clone, so the
/// same buffer can be sent many times.
#[derive(Clone, Debug)]
pub struct Values {
    bytes: Bytes,
}

impl From<Vec<f32>> for Values {
    fn from(v: Vec<f32>) -> Self {
        Values { bytes: bytes_of_vec(v) }
    }
}

impl Values {
    pub fn as_slice(&self) -> &[f32] {
        bytemuck::cast_slice(&self.bytes)
    }
    pub fn len(&self) -> usize {
        self.bytes.len() / 4
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

fn check_sorted(keys: &[Key]) -> Result<()> {
    match keys.windows(2).position(|w| w[0] >= w[1]) {
        Some(i) => Err(Error::KeysNotSorted { index: i + 1, prev: keys[i], key: keys[i + 1] }),
        None => Ok(()),
    }
}

/// Whether a worker uses shared memory with servers on its host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShmMode {
    /// Network only.
    #[default]
    Off,
    /// Shared memory where a server on the same host offers it.
    Auto,
    /// Shared memory with every server, or fail.
    Require,
}

/// The one-sided channels a node uses beside its transport's messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OneSided {
    pub shm: ShmMode,
    pub rdma: RdmaMode,
}

/// How a worker joins a job.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Requested rank (for example from PSERVER_RANK); the scheduler assigns
    /// one when absent or taken.
    pub rank: Option<u32>,
    /// Operations in flight before `push`/`pull` block.
    pub max_inflight: usize,
    /// How long to wait for the rest of the job to register.
    pub join_timeout: Duration,
    pub shm: ShmMode,
    /// RDMA with the servers (tried before shared memory).
    pub rdma: RdmaMode,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            rank: None,
            max_inflight: 1024,
            join_timeout: Duration::from_secs(120),
            shm: ShmMode::Off,
            rdma: RdmaMode::Off,
        }
    }
}

struct TableInfo {
    spec: TableSpec,
    map: RangeMap,
    /// Per server, its shards readable one-sided (dense tables), by shared
    /// memory or RDMA.
    one_sided: Vec<Option<Arc<Vec<View>>>>,
    /// The table's last push seq (see [`push_seq`]), kept across the new
    /// maps of membership changes. Held while a push is given its seq and
    /// first sent, so that every server gets a table's pushes in seq order.
    push_seq: Arc<Mutex<u64>>,
}

/// The seq of a worker's next push to a table at `clock`, after the table's
/// `last`: `clock << 32` plus the push's place among the worker's pushes to
/// the table at that clock (from 1). A push is named by what it is (its rank,
/// table, clock and place), not by which process sent it: a restarted worker
/// that does its resume clock's work again gives its pushes the seqs its
/// predecessor gave the same pushes, so the shards that applied the
/// predecessor's skip them and the others apply them; every push counts
/// once (when the worker issues the same pushes in the same order: from one
/// thread, and without push filters, whose residuals a new process does not
/// have). Seqs only grow (a guard: `issue` reads the clock under the ring's
/// read lock, so a push's clock is never older than the table's last).
fn push_seq(last: u64, clock: u32) -> u64 {
    (last + 1).max((u64::from(clock) << 32) + 1)
}

/// A server's shard mapped read-only.
struct ShmView {
    range: crate::store::KeyRange,
    header: crate::transport::shm::Mapped,
    slots: crate::transport::shm::Mapped,
}

/// A server's shard registered for RDMA READ, and the link that reads it.
struct RdmaView {
    range: crate::store::KeyRange,
    header: RegionDesc,
    slots: RegionDesc,
    link: Arc<Link>,
}

/// A shard the worker reads one-sided. The pull routine
/// (`Inner::try_one_sided_pull`) is the same for both; they differ only in
/// how the words get to the worker: loads from a mapping, or RDMA READs into
/// a registered buffer. Either way `slot::read_run` validates them.
enum View {
    Shm(ShmView),
    Rdma(RdmaView),
}

impl View {
    fn range(&self) -> crate::store::KeyRange {
        match self {
            View::Shm(v) => v.range,
            View::Rdma(v) => v.range,
        }
    }

    /// The shard's minimum progress (over RDMA only when `progress` asks:
    /// it costs a round trip; else `u64::MAX`), then (no earlier) `len`
    /// words of its slots from word `at`, handed to `f` as atomics.
    fn fetch<R>(
        &self,
        at: usize,
        len: usize,
        progress: bool,
        f: impl FnOnce(u64, &[std::sync::atomic::AtomicU64]) -> R,
    ) -> Result<R> {
        use crate::store::shard::HEADER_MIN_PROGRESS;
        match self {
            View::Shm(v) => {
                // Acquire: the slot stores of the progress it shows are visible.
                let progress = v.header.load(HEADER_MIN_PROGRESS).unwrap_or(0);
                Ok(f(progress, v.slots.words_at(at, len)?))
            }
            View::Rdma(v) => v.link.read(progress.then_some((&v.header, HEADER_MIN_PROGRESS)), &v.slots, at, len, f),
        }
    }

    /// The most words one fetch takes.
    fn max_words(&self) -> usize {
        match self {
            View::Shm(v) => v.slots.len_words(),
            View::Rdma(v) => v.link.max_read_words(),
        }
    }

    /// Whether each aligned word is copied atomically (scalar slots, whose
    /// version shares their only word, need it).
    fn word_atomic(&self) -> bool {
        match self {
            View::Shm(_) => true,
            View::Rdma(v) => v.link.word_atomic(),
        }
    }

    /// Whether fetching one slot at a time is cheap (a load, not a round trip).
    fn cheap_single_slot(&self) -> bool {
        matches!(self, View::Shm(_))
    }
}

/// Bytes and keys a worker moved: payload bytes (keys, values, versions and
/// bitmaps), not counting frame headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    pub requests: u64,
    pub keys_sent: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Pulls served by reading servers' shared memory, and the bytes read.
    pub shm_pulls: u64,
    pub shm_bytes_read: u64,
    /// Pulls served by RDMA READs of servers' shards, and the bytes read.
    pub rdma_pulls: u64,
    pub rdma_bytes_read: u64,
    /// Frames written into servers' push rings by RDMA, and their bytes.
    pub rdma_frames: u64,
    pub rdma_bytes_written: u64,
}

#[derive(Default)]
struct TrafficCounters {
    requests: AtomicU64,
    keys_sent: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    shm_bytes_read: AtomicU64,
    shm_pulls: AtomicU64,
    rdma_pulls: AtomicU64,
    rdma_bytes_read: AtomicU64,
    rdma_frames: AtomicU64,
    rdma_bytes_written: AtomicU64,
}

impl TrafficCounters {
    fn snapshot(&self) -> Traffic {
        Traffic {
            requests: self.requests.load(Ordering::Relaxed),
            keys_sent: self.keys_sent.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            shm_pulls: self.shm_pulls.load(Ordering::Relaxed),
            shm_bytes_read: self.shm_bytes_read.load(Ordering::Relaxed),
            rdma_pulls: self.rdma_pulls.load(Ordering::Relaxed),
            rdma_bytes_read: self.rdma_bytes_read.load(Ordering::Relaxed),
            rdma_frames: self.rdma_frames.load(Ordering::Relaxed),
            rdma_bytes_written: self.rdma_bytes_written.load(Ordering::Relaxed),
        }
    }
}

/// Key lists this worker asked servers to keep (see `proto::run_form`).
#[derive(Default)]
struct KeyCache {
    /// Every list announced to some server, by digest (kept to resupply).
    lists: HashMap<u64, Bytes>,
    /// Per server index: digests it keeps for us, and their bytes.
    announced: Vec<std::collections::HashSet<u64>>,
    bytes: Vec<usize>,
}

impl KeyCache {
    /// How to send `keys` to `server`: (form, digest, key bytes saved).
    fn form_for(&mut self, server: usize, keys: &Bytes) -> (u32, u64, usize) {
        let digest = xxhash_rust::xxh3::xxh3_64(keys);
        if let Some(known) = self.lists.get(&digest) {
            let same = (known.as_ptr() == keys.as_ptr() && known.len() == keys.len()) || known == keys;
            if !same {
                return (run_form::LIST, 0, 0); // a digest collision: never name this list
            }
        }
        if self.announced.len() <= server {
            self.announced.resize_with(server + 1, Default::default);
            self.bytes.resize(server + 1, 0);
        }
        if self.announced[server].contains(&digest) {
            return (run_form::CACHED, digest, keys.len());
        }
        if self.bytes[server] + keys.len() > proto::KEY_CACHE_BUDGET {
            return (run_form::LIST, 0, 0);
        }
        self.announced[server].insert(digest);
        self.bytes[server] += keys.len();
        self.lists.entry(digest).or_insert_with(|| keys.clone());
        (run_form::LIST_CACHE, digest, 0)
    }

    /// The server forgot everything (it restarted or the connection dropped).
    fn forget(&mut self, server: usize) {
        if let Some(a) = self.announced.get_mut(server) {
            a.clear();
            self.bytes[server] = 0;
        }
    }
}

/// State shared with the transport's handler.
struct Shared {
    /// A membership epoch to acknowledge to the scheduler once every
    /// operation issued before it (timestamps below the second value) is
    /// done: the scheduler moves ranges to a joining server only when no
    /// worker still has a request routed by an older map.
    ack: Mutex<Option<(u32, u64)>>,
    ack_pending: AtomicBool,
    key_cache: Mutex<KeyCache>,
    traffic: TrafficCounters,
    /// Per server: the shared-memory push ring, when there is one.
    rings: RwLock<Vec<Option<Arc<crate::transport::shm::Ring>>>>,
    /// Per server: the RDMA link, when there is one.
    links: RwLock<Vec<Option<Arc<Link>>>>,
    /// Per server: the `DataHeader::seq` of the next ordered frame.
    seqs: RwLock<Vec<AtomicU64>>,
    /// Per server: push runs sent and not yet acknowledged. A one-sided pull
    /// must not overtake them.
    push_inflight: RwLock<Vec<std::sync::atomic::AtomicUsize>>,
    ops: Mutex<FxHashMap<u64, Arc<Op>>>,
    ops_changed: Condvar,
    /// Failed operations nobody has waited for yet.
    failed: Mutex<HashMap<u64, Error>>,
    /// Replies to control calls, by id.
    control: Mutex<HashMap<u64, Option<Result<Control>>>>,
    control_ready: Condvar,
    /// Server peers by server index, and back.
    servers: RwLock<Vec<PeerId>>,
    scheduler: Mutex<Option<PeerId>>,
    shutdown: std::sync::atomic::AtomicBool,
    /// Copies of each range besides the owner's (0: a lost server fails
    /// the operations it had not answered).
    replicas: AtomicU32,
    /// Runs answered `MOVED`, with the epoch of the server that said so.
    moved: Mutex<Vec<(Arc<Op>, usize, u32)>>,
    /// Membership changes and moved runs for the router thread.
    router: Mutex<Option<crossbeam::channel::Sender<Route>>>,
    /// Per server: held while giving push seqs and sending (see `send_runs`).
    sending: RwLock<Vec<Mutex<()>>>,
}

/// Work for a worker's router thread.
enum Route {
    Membership {
        epoch: u32,
        servers: Vec<proto::ServerInfo>,
    },
    Moved,
    /// An operation completed while a membership acknowledgement waits.
    AckCheck,
    /// A server's connection dropped at this instant.
    Lost {
        server: u32,
        at: Instant,
    },
}

/// How long runs wait for a new owner after their server's connection
/// dropped before they fail.
fn failover_timeout() -> Duration {
    crate::scheduler::heartbeat::timeout() * 2 + Duration::from_secs(10)
}

const CONTROL_ID_BASE: u64 = 1 << 63;

/// Pushes at least this large go through a shared-memory ring when there is one.
const RING_MIN_BYTES: u64 = 16 << 10;

/// Times a torn slot copy is read again before a pull falls back to asking
/// the server.
const TORN_RETRIES: usize = 64;

/// One operation to send.
struct Issue {
    kind: u16,
    table: TableId,
    keys: Bytes,
    vals: Option<Bytes>,
    /// The output buffer of a pull.
    out: Option<Vec<f32>>,
    /// Overrides the table's consistency.
    consistency: Option<Consistency>,
    /// Known versions, for a version-filtered pull.
    known: Option<Bytes>,
}

impl Issue {
    fn new(kind: u16, table: TableId, keys: Bytes, vals: Option<Bytes>) -> Issue {
        Issue { kind, table, keys, vals, out: None, consistency: None, known: None }
    }
}

struct Inner {
    shared: Arc<Shared>,
    net: Arc<dyn Messenger>,
    rank: u32,
    /// The workers the job started with (`num_workers`), and its seats.
    workers: u32,
    seats: u32,
    ring: RwLock<Ring>,
    tables: RwLock<HashMap<TableId, Arc<TableInfo>>>,
    filters: RwLock<HashMap<TableId, Arc<Mutex<TableFilter>>>>,
    next_ts: AtomicU64,
    next_control: AtomicU64,
    /// Shared with the heartbeat, which reports it.
    clock: Arc<AtomicU32>,
    /// Checkpoint at clocks divisible by this (0: never).
    checkpoint_every: u32,
    /// The clock of the checkpoint this job resumed from.
    resumed: Option<u32>,
    /// A restarted worker's resume clock (see [`Worker::restarted`]).
    restarted: std::sync::OnceLock<u32>,
    /// A joined worker's first clock (see [`Worker::joined`]).
    joined: std::sync::OnceLock<u32>,
    /// The RDMA device, when this worker may use RDMA: servers that join
    /// later are linked too.
    rdma_dev: Option<Arc<rdma::Rdma>>,
    /// Held by a `remap` (one at a time: two would link a server twice,
    /// and an older one could install its views after a newer one's).
    remapping: Mutex<()>,
    /// Whether this worker reads shared memory (its `--transport` allows it).
    shm_reads: bool,
    /// Servers a link was asked of mid-job (asked once: a server that
    /// accepted while this worker gave up must not be asked again).
    link_asked: Mutex<std::collections::HashSet<usize>>,
    /// Barriers this worker passed (`Control::Barrier::n`).
    barriers: AtomicU64,
    max_inflight: usize,
    finished: std::sync::atomic::AtomicBool,
    heartbeat: Mutex<Option<crate::scheduler::heartbeat::Heartbeat>>,
}

/// A key-value client. Cheap to clone; clones share one connection set and
/// one timestamp sequence.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

/// A pull in flight: [`Pull::wait`] returns its values.
pub struct Pull {
    ts: Timestamp,
    op: Arc<Op>,
    shared: Arc<Shared>,
    /// Filters that learn the pulled weights, with the keys.
    observe: Option<(Arc<Mutex<TableFilter>>, Bytes)>,
}

impl Pull {
    pub fn timestamp(&self) -> Timestamp {
        self.ts
    }

    /// The worker clock this pull was issued at.
    pub fn clock(&self) -> u32 {
        self.op.clock
    }

    /// Once done: the smallest shard progress the pull was served at (every
    /// worker's pushes of clocks below it were applied); `None` before.
    pub fn observed_progress(&self) -> Option<u64> {
        self.op.observed_progress()
    }

    /// Waits for the values: `keys x dim`, in key order.
    pub fn wait(self) -> Result<Vec<f32>> {
        let r = self.op.wait();
        self.shared.forget_failure(&self.op, &r);
        r?;
        match &self.observe {
            Some((filter, keys)) => {
                let keys: &[Key] = bytemuck::cast_slice(keys);
                let mut f = filter.lock();
                let mut versioned = false;
                let vals = self.op.take_values(&mut |lo, count, part, out| {
                    versioned = true;
                    let Part::Changed { bitmap, values, versions } = part else { return Ok(()) };
                    f.apply_changed(
                        &keys[lo..lo + count],
                        bitmap,
                        &pod_slice::<f32>(values),
                        &pod_slice::<u32>(versions),
                        out,
                    )
                    .map_err(|m| Error::protocol("server", m))
                })?;
                if !versioned {
                    f.observe(keys, &vals);
                }
                Ok(vals)
            }
            None => {
                self.op.take_values(&mut |_, _, _, _| Err(Error::protocol("server", "unrequested changed-keys reply")))
            }
        }
    }

    /// Waits; returns the values and the shard progress they were served at.
    pub fn wait_observed(self) -> Result<(Vec<f32>, u64)> {
        let op = self.op.clone();
        let vals = self.wait()?;
        Ok((vals, op.observed_progress().unwrap_or(u64::MAX)))
    }

    /// Waits and copies the values into `out` (`keys x dim` long).
    pub fn wait_into(self, out: &mut [f32]) -> Result<()> {
        let vals = self.wait()?;
        if vals.len() != out.len() {
            return Err(Error::LengthMismatch { table: 0, keys: 0, dim: 0, expected: vals.len(), got: out.len() });
        }
        out.copy_from_slice(&vals);
        Ok(())
    }
}

impl Worker {
    /// Joins the job whose scheduler listens at `scheduler`; returns once
    /// the whole job has registered and this worker is connected to every
    /// server.
    pub fn connect(transport: &dyn Transport, scheduler: &str, cfg: WorkerConfig) -> Result<Worker> {
        let shared = Arc::new(Shared {
            ack: Mutex::new(None),
            ack_pending: AtomicBool::new(false),
            key_cache: Mutex::new(KeyCache::default()),
            traffic: TrafficCounters::default(),
            rings: RwLock::new(Vec::new()),
            links: RwLock::new(Vec::new()),
            seqs: RwLock::new(Vec::new()),
            push_inflight: RwLock::new(Vec::new()),
            ops: Mutex::new(FxHashMap::default()),
            ops_changed: Condvar::new(),
            failed: Mutex::new(HashMap::new()),
            control: Mutex::new(HashMap::new()),
            control_ready: Condvar::new(),
            servers: RwLock::new(Vec::new()),
            scheduler: Mutex::new(None),
            shutdown: Default::default(),
            replicas: AtomicU32::new(0),
            moved: Mutex::new(Vec::new()),
            router: Mutex::new(None),
            sending: RwLock::new(Vec::new()),
        });
        // Membership changes that come before the router runs (a restarted
        // worker joins a job that may fail over meanwhile) wait for it.
        let (tx, rx) = crossbeam::channel::unbounded();
        *shared.router.lock() = Some(tx);
        let net = transport.bind("", Arc::new(WorkerHandler { shared: shared.clone() }))?;
        let sched = net.connect(scheduler)?;
        *shared.scheduler.lock() = Some(sched);
        let reg = Control::Register { role: Role::Worker, addr: net.local_addr(), rank: cfg.rank };
        let id = CONTROL_ID_BASE;
        shared.control.lock().insert(id, None);
        net.send(sched, reg.to_frame(id))?;
        let welcome = shared.wait_control(id, cfg.join_timeout)?;
        let Control::Welcome {
            rank,
            servers,
            workers,
            vnodes,
            epoch,
            replicas,
            incarnation,
            checkpoint,
            restarted,
            seated,
            joined,
            ..
        } = welcome
        else {
            if let Control::Error(message) = welcome {
                return Err(Error::Remote { peer: format!("scheduler {scheduler}"), message });
            }
            return Err(Error::protocol(net.peer_addr(sched), format!("expected a welcome, got {welcome:?}")));
        };
        shared.replicas.store(replicas, Ordering::Release);
        let mut peers = Vec::with_capacity(servers.len());
        for s in &servers {
            peers.push(if s.alive { net.connect(&s.addr)? } else { PeerId(u64::MAX) });
        }
        *shared.push_inflight.write() = (0..peers.len()).map(|_| Default::default()).collect();
        *shared.sending.write() = (0..peers.len()).map(|_| Mutex::new(())).collect();
        *shared.seqs.write() = (0..peers.len()).map(|_| AtomicU64::new(1)).collect();
        *shared.servers.write() = peers.clone();
        let mut links: Vec<Option<Arc<Link>>> = vec![None; peers.len()];
        // Servers that accepted a link this worker could not establish: they
        // sequence its frames, so no shared push ring (whose doorbells are
        // not sequenced) may be opened with them.
        let mut sequenced = vec![false; peers.len()];
        let mut rdma_dev = None;
        if cfg.rdma != RdmaMode::Off {
            let required = cfg.rdma == RdmaMode::Require;
            match rdma::device() {
                Ok(dev) => {
                    rdma_dev = Some(dev.clone());
                    for (s, &p) in peers.iter().enumerate().filter(|(s, _)| servers[*s].alive) {
                        match open_link(&shared, &net, p, &dev, &servers[s].addr, &mut sequenced[s]) {
                            Ok(l) => links[s] = Some(Arc::new(l)),
                            Err(e) if required => {
                                return Err(Error::Config(format!(
                                    "--transport rdma: no RDMA link with server {s} ({}): {e}",
                                    servers[s].addr
                                )));
                            }
                            Err(e) => tracing::info!(target: "transport", server = s, reason = %e,
                                "RDMA unavailable with this server; falling back to shm/tcp"),
                        }
                    }
                    let n = links.iter().filter(|l| l.is_some()).count();
                    if n > 0 {
                        tracing::info!(target: "transport", "transport=rdma {} servers={n}", dev.describe());
                    }
                }
                Err(e) if required => return Err(Error::Config(format!("--transport rdma: {e}"))),
                Err(e) => {
                    tracing::info!(target: "transport", reason = %e, "RDMA unavailable; falling back to shm/tcp")
                }
            }
        }
        *shared.links.write() = links.clone();
        let mut rings = vec![None; peers.len()];
        if cfg.shm != ShmMode::Off {
            for (s, &p) in peers.iter().enumerate() {
                if links[s].is_some() || !servers[s].alive || sequenced[s] {
                    continue;
                }
                let r = if net.same_host(p) {
                    open_ring(&shared, &net, p)
                } else {
                    Err(Error::Config(format!("server {} is not on this host", servers[s].addr)))
                };
                match r {
                    Ok(ring) => rings[s] = Some(Arc::new(ring)),
                    Err(e) if cfg.shm == ShmMode::Require => {
                        return Err(Error::Config(format!("shared memory with server {s} is unavailable: {e}")));
                    }
                    Err(e) => tracing::info!(server = s, reason = %e, "using the network, not shared memory"),
                }
            }
            let n = rings.iter().filter(|r| r.is_some()).count();
            tracing::info!(servers = n, "shared memory with same-host servers");
            if n > 0 {
                tracing::info!(target: "transport", "transport=shm servers={n}");
            }
        }
        *shared.rings.write() = rings;
        tracing::debug!(rank, servers = servers.len(), replicas, "worker joined the job");
        // A resumed job continues the clocks of its checkpoint.
        let resumed = checkpoint.as_ref().and_then(|c| c.restore.as_ref()).map(|r| r.1);
        let clock = Arc::new(AtomicU32::new(resumed.unwrap_or(0)));
        let (sh, c) = (shared.clone(), clock.clone());
        let heartbeat = crate::scheduler::heartbeat::Heartbeat::start_reporting(
            net.clone(),
            sched,
            crate::scheduler::heartbeat::interval(),
            move || {
                let (clock, traffic) = (c.load(Ordering::Acquire), sh.traffic.snapshot());
                Some(crate::status::Report::Worker(crate::status::WorkerReport { rank, clock, traffic }))
            },
        );
        let w = Worker {
            inner: Arc::new(Inner {
                shared,
                rank,
                workers: seated,
                seats: workers,
                ring: RwLock::new(Ring::new(servers, vnodes, epoch).with_replicas(replicas)),
                tables: RwLock::new(HashMap::new()),
                filters: RwLock::new(HashMap::new()),
                next_ts: AtomicU64::new(1),
                next_control: AtomicU64::new(CONTROL_ID_BASE + 1),
                clock,
                checkpoint_every: checkpoint.as_ref().map_or(0, |c| c.every),
                resumed,
                restarted: std::sync::OnceLock::new(),
                joined: std::sync::OnceLock::new(),
                rdma_dev,
                remapping: Mutex::new(()),
                shm_reads: cfg.shm != ShmMode::Off,
                link_asked: Default::default(),
                barriers: AtomicU64::new(0),
                max_inflight: cfg.max_inflight.max(1),
                finished: Default::default(),
                heartbeat: Mutex::new(Some(heartbeat)),
                net,
            }),
        };
        let weak = Arc::downgrade(&w.inner);
        std::thread::Builder::new()
            .name(format!("pserver-router-{rank}"))
            .spawn(move || router(weak, rx))
            .map_err(|e| Error::io("spawning the worker's router thread", e))?;
        let start = if restarted {
            let c = w.inner.resume()?;
            tracing::info!(rank, clock = c, incarnation, "restarted worker resumes at its rank's clock");
            Some(c)
        } else if joined {
            let c = w.inner.join_clock()?;
            tracing::info!(rank, clock = c, "worker joined the running job in a free seat");
            Some(c)
        } else {
            None
        };
        // Starting at a checkpoint clock: the job's round for it may wait
        // for this rank (its predecessor sent the clock, then died before
        // asking; or the seat was taken while the round was open).
        let every = w.inner.checkpoint_every;
        if let Some(c) = start.filter(|&c| every > 0 && c > 0 && c % every == 0) {
            w.checkpoint(c)?;
        }
        Ok(w)
    }

    /// This worker's rank, `0..num_workers()`.
    pub fn rank(&self) -> u32 {
        self.inner.rank
    }
    /// The workers the job started with (ranks `0..num_workers()`; the
    /// applications split their data by it). Workers that joined later
    /// have ranks from `num_workers()` up to [`Worker::max_workers`].
    pub fn num_workers(&self) -> u32 {
        self.inner.workers
    }
    /// The job's worker seats (`--max-workers`, at least `num_workers()`).
    pub fn max_workers(&self) -> u32 {
        self.inner.seats
    }
    /// Servers of the job (alive now).
    pub fn num_servers(&self) -> usize {
        self.inner.ring.read().live()
    }

    /// The membership epoch this worker routes with (1 until a server
    /// fails, joins or leaves).
    pub fn epoch(&self) -> u32 {
        self.inner.ring.read().epoch()
    }

    /// Declares a table on every server. Idempotent: every worker declares
    /// the tables it uses, with the same spec.
    pub fn create_table(&self, spec: TableSpec) -> Result<()> {
        spec.validate()?;
        let peers = self.inner.shared.servers.read().clone();
        let live: Vec<PeerId> = {
            let ring = self.inner.ring.read();
            peers.iter().enumerate().filter(|(s, _)| ring.is_alive(*s as u32)).map(|(_, &p)| p).collect()
        };
        let ids: Vec<u64> = live
            .iter()
            .map(|&p| self.inner.control_send(p, &Control::CreateTable(spec.clone())))
            .collect::<Result<_>>()?;
        for id in ids {
            match self.inner.shared.wait_control(id, Duration::from_secs(600))? {
                Control::TableReady { .. } => {}
                Control::Error(m) => return Err(Error::Remote { peer: "server".into(), message: m }),
                other => return Err(Error::protocol("server", format!("unexpected reply {other:?}"))),
            }
        }
        let map = self.inner.ring.read().ranges(spec.keys);
        let one_sided = self.inner.map_shards(&spec, false)?;
        let mut tables = self.inner.tables.write();
        // Created again (the same spec): the pushes' seqs go on.
        let push_seq = tables.get(&spec.id).map_or_else(Default::default, |t| t.push_seq.clone());
        tables.insert(spec.id, Arc::new(TableInfo { spec, map, one_sided, push_seq }));
        Ok(())
    }

    /// Pushes `vals` (`keys x dim`) for sorted, unique `keys`; copies both.
    pub fn push(&self, table: TableId, keys: &[Key], vals: &[f32]) -> Result<Timestamp> {
        self.scoped(None).push(table, keys, vals)
    }

    /// Pushes without copying: the key list and the values are shared with
    /// the request (a `Vec<f32>` converts into [`Values`] without a copy).
    pub fn push_with(&self, table: TableId, keys: &KeyList, vals: impl Into<Values>) -> Result<Timestamp> {
        self.scoped(None).push_with(table, keys, vals)
    }

    /// Pulls the values of sorted, unique `keys`.
    pub fn pull(&self, table: TableId, keys: &[Key]) -> Result<Pull> {
        self.scoped(None).pull(table, keys)
    }

    /// Pulls into `buf` (resized to `keys x dim`, its allocation reused).
    pub fn pull_with(&self, table: TableId, keys: &KeyList, buf: Vec<f32>) -> Result<Pull> {
        self.scoped(None).pull_with(table, keys, buf)
    }

    /// [`Worker::pull`] answered over the network only (see
    /// [`Scoped::pull_over_network`]).
    pub fn pull_over_network(&self, table: TableId, keys: &[Key]) -> Result<Pull> {
        self.scoped(None).pull_over_network(table, keys)
    }

    /// Pulls and waits, writing the values into `out` (`keys x dim` long).
    pub fn pull_into(&self, table: TableId, keys: &[Key], out: &mut [f32]) -> Result<()> {
        self.scoped(None).pull_into(table, keys, out)
    }

    /// Pushes, then pulls the same keys in one round trip.
    pub fn push_pull(&self, table: TableId, keys: &[Key], vals: &[f32]) -> Result<Pull> {
        self.scoped(None).push_pull(table, keys, vals)
    }

    /// `push_pull` without copying; the results land in `buf`.
    pub fn push_pull_with(
        &self,
        table: TableId,
        keys: &KeyList,
        vals: impl Into<Values>,
        buf: Vec<f32>,
    ) -> Result<Pull> {
        self.scoped(None).push_pull_with(table, keys, vals, buf)
    }

    /// Sets this worker's push filters for `table` (see [`Filters`]); an empty
    /// set removes them (after flushing what they held).
    pub fn set_filters(&self, table: TableId, filters: Filters) -> Result<()> {
        let info = self.inner.table(table)?;
        if let Some(s) = filters.significant
            && !(s.threshold >= 0.0
                && s.threshold.is_finite()
                && s.decay > 0.0
                && s.decay <= 1.0
                && s.min_threshold >= 0.0)
        {
            return Err(Error::Config(format!(
                "significant filter {s:?}: need threshold >= 0, 0 < decay <= 1, min >= 0"
            )));
        }
        if let Some(k) = filters.kkt
            && !(k.lambda >= 0.0 && k.delta >= 0.0 && k.lambda.is_finite() && k.delta.is_finite())
        {
            return Err(Error::Config(format!("kkt filter {k:?}: lambda and delta must be finite and >= 0")));
        }
        self.flush(table)?;
        let mut fs = self.inner.filters.write();
        if filters.is_empty() {
            fs.remove(&table);
        } else {
            fs.insert(table, Arc::new(Mutex::new(TableFilter::new(filters, info.spec.dim as usize))));
        }
        Ok(())
    }

    /// Sends everything the table's filters hold back.
    pub fn flush(&self, table: TableId) -> Result<Timestamp> {
        let (keys, vals) = match self.inner.filter(table) {
            Some(f) => f.lock().drain(),
            None => (Vec::new(), Vec::new()),
        };
        self.inner
            .issue(Issue::new(kind::PUSH, table, bytes_of_vec(keys), Some(bytes_of_vec(vals))))
            .map(|op| Timestamp(op.ts))
    }

    /// What this worker has sent and received so far.
    pub fn traffic(&self) -> Traffic {
        self.inner.shared.traffic.snapshot()
    }

    /// What the filters of `table` did on this worker.
    pub fn filter_stats(&self, table: TableId) -> FilterStats {
        self.inner.filter(table).map(|f| f.lock().stats).unwrap_or_default()
    }

    /// The same operations under another consistency model than the table's,
    /// for the calls made through the returned view.
    pub fn with_consistency(&self, c: Consistency) -> Scoped<'_> {
        self.scoped(Some(c))
    }

    fn scoped(&self, consistency: Option<Consistency>) -> Scoped<'_> {
        Scoped { w: self, consistency }
    }

    /// Blocks until operation `ts` is acknowledged; its error if it failed.
    pub fn wait(&self, ts: Timestamp) -> Result<()> {
        let sh = &self.inner.shared;
        let op = sh.ops.lock().get(&ts.0).cloned();
        if let Some(op) = op {
            let r = op.wait();
            sh.forget_failure(&op, &r);
            return r;
        }
        if let Some(e) = sh.failed.lock().remove(&ts.0) {
            return Err(e);
        }
        if ts.0 == 0 || ts.0 >= self.inner.next_ts.load(Ordering::Acquire) {
            return Err(Error::UnknownTimestamp(ts.0));
        }
        Ok(())
    }

    /// Blocks until every operation issued so far is acknowledged; reports
    /// the first failure nobody has waited for.
    pub fn wait_all(&self) -> Result<()> {
        let sh = &self.inner.shared;
        let mut ops = sh.ops.lock();
        while !ops.is_empty() {
            sh.ops_changed.wait(&mut ops);
        }
        drop(ops);
        let mut failed = sh.failed.lock();
        let first = failed.keys().min().copied();
        match first {
            Some(ts) => {
                let n = failed.len();
                let e = failed.remove(&ts).expect("present");
                failed.clear();
                Err(if n == 1 {
                    e
                } else {
                    Error::Remote { peer: "job".into(), message: format!("{n} operations failed; first: {e}") }
                })
            }
            None => Ok(()),
        }
    }

    /// The worker's current clock.
    pub fn current_clock(&self) -> u32 {
        self.inner.clock.load(Ordering::Acquire)
    }

    /// Ends the current clock: tells every server that all pushes issued so
    /// far belong to finished clocks. Returns the new clock.
    pub fn clock(&self) -> Result<u32> {
        let c = {
            // The write lock waits for the operations being issued (they
            // hold it for reading from reading the clock until they are
            // sent): none of them can be sent after this clock's frame, or
            // take the next clock's place among its pushes.
            let ring = self.inner.ring.write();
            let c = self.inner.clock.fetch_add(1, Ordering::AcqRel) + 1;
            let ring = parking_lot::RwLockWriteGuard::downgrade(ring);
            self.inner.send_clock(&ring, c)?;
            c
        };
        let every = self.inner.checkpoint_every;
        if every > 0 && c % every == 0 {
            self.checkpoint(c)?;
        }
        Ok(c)
    }

    /// The clock of the checkpoint this job was restored from, if it was.
    pub fn resumed_from(&self) -> Option<u32> {
        self.inner.resumed
    }

    /// For a worker that took the place of a lost one mid-job: the clock it
    /// resumed at (its rank's clock on the servers; it starts there, and
    /// every push of its predecessor at an earlier clock is applied). The
    /// application continues from that clock; work of the clock itself may
    /// have been applied in part by the predecessor and is done again. Its
    /// pushes then carry the seqs the predecessor gave the same pushes (a
    /// push is named by its table, clock and place among the clock's pushes
    /// to the table), so each applies once, provided the worker issues the
    /// same pushes in the same order: from one thread, and without push
    /// filters (whose residuals the new process does not have).
    pub fn restarted(&self) -> Option<u32> {
        self.inner.restarted.get().copied()
    }

    /// For a worker that joined the running job in a free seat (a rank from
    /// `num_workers()` on): the clock it started at, the largest any server
    /// had received from a worker (so it holds nobody back). Its pushes
    /// belong to that clock and later ones; it reads the current model.
    pub fn joined(&self) -> Option<u32> {
        self.inner.joined.get().copied()
    }

    /// Waits until this worker's pushes are acknowledged and the scheduler
    /// has written the checkpoint of clock `c` (taken while every worker
    /// waits here, so it holds exactly the pushes of clocks below `c`).
    fn checkpoint(&self, c: u32) -> Result<()> {
        self.wait_all()?;
        let sched = self.inner.shared.scheduler.lock().ok_or(Error::ShuttingDown)?;
        let id = self.inner.control_send(sched, &Control::Checkpoint { worker: self.inner.rank, clock: c })?;
        match self.inner.shared.wait_control(id, Duration::MAX)? {
            Control::CheckpointDone { written: true, .. } => Ok(()),
            Control::CheckpointDone { written: false, .. } => {
                tracing::warn!(clock = c, "the checkpoint of this clock was not written; going on");
                Ok(())
            }
            Control::Error(m) => Err(Error::Remote { peer: "scheduler".into(), message: m }),
            other => Err(Error::protocol("scheduler", format!("unexpected reply {other:?}"))),
        }
    }

    /// Blocks until every worker of the job reaches a barrier.
    /// A restarted worker calls the same barriers as its predecessor did:
    /// those the job passed already return at once.
    pub fn barrier(&self) -> Result<()> {
        let sched = self.inner.shared.scheduler.lock().ok_or(Error::ShuttingDown)?;
        let n = self.inner.barriers.load(Ordering::Acquire);
        let id = self.inner.control_send(sched, &Control::Barrier { worker: self.inner.rank, n })?;
        match self.inner.shared.wait_control(id, Duration::MAX)? {
            Control::BarrierDone => {
                self.inner.barriers.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Control::Error(m) => Err(Error::Remote { peer: "scheduler".into(), message: m }),
            other => Err(Error::protocol("scheduler", format!("unexpected reply {other:?}"))),
        }
    }

    /// Waits for everything in flight, tells the scheduler this worker is
    /// done (with `error` if the application failed) and leaves the job.
    pub fn finish(&self, error: Option<String>) -> Result<()> {
        if self.inner.finished.load(Ordering::Acquire) {
            return Ok(());
        }
        // Nothing a filter holds back is lost at the end.
        let tables: Vec<TableId> = self.inner.filters.read().keys().copied().collect();
        let flushed: Result<()> = tables.into_iter().try_for_each(|t| self.flush(t).map(|_| ()));
        self.inner.finished.store(true, Ordering::Release);
        let pending = self.wait_all().and(flushed);
        let error = error.or_else(|| pending.as_ref().err().map(|e| e.to_string()));
        self.inner.heartbeat.lock().take();
        if let Some(sched) = *self.inner.shared.scheduler.lock() {
            let _ = self.inner.net.send(sched, Control::WorkerDone { worker: self.inner.rank, error }.to_frame(0));
        }
        self.inner.net.shutdown();
        pending
    }
}

/// Data operations with a per-call consistency model; see
/// [`Worker::with_consistency`].
#[derive(Clone, Copy)]
pub struct Scoped<'a> {
    w: &'a Worker,
    consistency: Option<Consistency>,
}

impl Scoped<'_> {
    pub fn push(&self, table: TableId, keys: &[Key], vals: &[f32]) -> Result<Timestamp> {
        check_sorted(keys)?;
        let keys = Bytes::copy_from_slice(bytemuck::cast_slice(keys));
        let vals = Bytes::copy_from_slice(bytemuck::cast_slice(vals));
        self.push_filtered(table, keys, vals)
    }

    pub fn push_with(&self, table: TableId, keys: &KeyList, vals: impl Into<Values>) -> Result<Timestamp> {
        self.push_filtered(table, keys.bytes.clone(), vals.into().bytes)
    }

    pub fn pull(&self, table: TableId, keys: &[Key]) -> Result<Pull> {
        check_sorted(keys)?;
        let keys = Bytes::copy_from_slice(bytemuck::cast_slice(keys));
        self.pull_bytes(kind::PULL, table, keys, None, Vec::new())
    }

    pub fn pull_with(&self, table: TableId, keys: &KeyList, buf: Vec<f32>) -> Result<Pull> {
        self.pull_bytes(kind::PULL, table, keys.bytes.clone(), None, buf)
    }

    /// [`Scoped::pull`] answered by the owners over the network, never read
    /// one-sided from shared or registered memory: for diagnosis, to tell a
    /// stale one-sided read from the servers' state.
    pub fn pull_over_network(&self, table: TableId, keys: &[Key]) -> Result<Pull> {
        check_sorted(keys)?;
        let keys = Bytes::copy_from_slice(bytemuck::cast_slice(keys));
        let req =
            Issue { out: Some(Vec::new()), consistency: self.consistency, ..Issue::new(kind::PULL, table, keys, None) };
        let op = self.w.inner.issue(req)?;
        Ok(Pull { ts: Timestamp(op.ts), op, shared: self.w.inner.shared.clone(), observe: None })
    }

    pub fn pull_into(&self, table: TableId, keys: &[Key], out: &mut [f32]) -> Result<()> {
        self.pull(table, keys)?.wait_into(out)
    }

    pub fn push_pull(&self, table: TableId, keys: &[Key], vals: &[f32]) -> Result<Pull> {
        check_sorted(keys)?;
        let keys = Bytes::copy_from_slice(bytemuck::cast_slice(keys));
        let vals = Bytes::copy_from_slice(bytemuck::cast_slice(vals));
        self.pull_bytes(kind::PUSH_PULL, table, keys, Some(vals), Vec::new())
    }

    pub fn push_pull_with(
        &self,
        table: TableId,
        keys: &KeyList,
        vals: impl Into<Values>,
        buf: Vec<f32>,
    ) -> Result<Pull> {
        self.pull_bytes(kind::PUSH_PULL, table, keys.bytes.clone(), Some(vals.into().bytes), buf)
    }

    fn issue(
        &self,
        k: u16,
        table: TableId,
        keys: Bytes,
        vals: Option<Bytes>,
        out: Option<Vec<f32>>,
    ) -> Result<Arc<Op>> {
        self.w.inner.issue(Issue { out, consistency: self.consistency, ..Issue::new(k, table, keys, vals) })
    }

    fn pull_bytes(&self, k: u16, table: TableId, keys: Bytes, vals: Option<Bytes>, buf: Vec<f32>) -> Result<Pull> {
        let vals = match vals {
            Some(v) => Some(self.filtered(table, &keys, v)?.1),
            None => None,
        };
        let filter = self.w.inner.filter(table).filter(|f| f.lock().needs_weights());
        // A plain pull of a version-filtered table sends the versions it knows.
        let known = match &filter {
            Some(f) if k == kind::PULL && f.lock().version_pull() => {
                Some(bytes_of_vec(f.lock().known_versions(&pod_slice::<Key>(&keys))))
            }
            _ => None,
        };
        let observe = filter.map(|f| (f, keys.clone()));
        let mut buf = buf;
        if k == kind::PULL
            && known.is_none()
            && let Some(op) = self.w.inner.try_one_sided_pull(table, &keys, &mut buf, self.consistency)?
        {
            return Ok(Pull { ts: Timestamp(op.ts), op, shared: self.w.inner.shared.clone(), observe });
        }
        let req = Issue { out: Some(buf), consistency: self.consistency, known, ..Issue::new(k, table, keys, vals) };
        let op = self.w.inner.issue(req)?;
        Ok(Pull { ts: Timestamp(op.ts), op, shared: self.w.inner.shared.clone(), observe })
    }

    /// Pushed values after the table's filters. A push-pull's keys stay as
    /// they are (their values are wanted back); filtered-out keys push zeros.
    fn filtered(&self, table: TableId, keys: &Bytes, vals: Bytes) -> Result<(Bytes, Bytes)> {
        let Some(f) = self.w.inner.filter(table).filter(|f| f.lock().filters_pushes()) else {
            return Ok((keys.clone(), vals));
        };
        let k: &[Key] = &pod_slice::<Key>(keys);
        let (sk, sv) = f.lock().filter_push(k, &pod_slice::<f32>(&vals), self.w.current_clock());
        if sk.len() == k.len() {
            return Ok((keys.clone(), bytes_of_vec(sv)));
        }
        // Spread the sent values back over all keys (zeros elsewhere).
        let dim = self.w.inner.table(table)?.spec.dim as usize;
        let mut full = vec![0.0f32; k.len() * dim];
        let mut j = 0;
        for (i, key) in k.iter().enumerate() {
            if j < sk.len() && sk[j] == *key {
                full[i * dim..(i + 1) * dim].copy_from_slice(&sv[j * dim..(j + 1) * dim]);
                j += 1;
            }
        }
        Ok((keys.clone(), bytes_of_vec(full)))
    }

    /// A push through the table's filters.
    fn push_filtered(&self, table: TableId, keys: Bytes, vals: Bytes) -> Result<Timestamp> {
        let Some(f) = self.w.inner.filter(table).filter(|f| f.lock().filters_pushes()) else {
            return self.issue(kind::PUSH, table, keys, Some(vals), None).map(|op| Timestamp(op.ts));
        };
        let (sk, sv) = {
            let k: &[Key] = &pod_slice::<Key>(&keys);
            let dim = self.w.inner.table(table)?.spec.dim as usize;
            if vals.len() != k.len() * dim * 4 {
                return Err(Error::LengthMismatch {
                    table,
                    keys: k.len(),
                    dim: dim as u32,
                    expected: k.len() * dim,
                    got: vals.len() / 4,
                });
            }
            f.lock().filter_push(k, &pod_slice::<f32>(&vals), self.w.current_clock())
        };
        self.issue(kind::PUSH, table, bytes_of_vec(sk), Some(bytes_of_vec(sv)), None).map(|op| Timestamp(op.ts))
    }
}

/// A control call made while joining (before `Inner` exists).
fn join_call(shared: &Arc<Shared>, net: &Arc<dyn Messenger>, peer: PeerId, msg: &Control) -> Result<Control> {
    static NEXT: AtomicU64 = AtomicU64::new(CONTROL_ID_BASE / 2);
    let id = NEXT.fetch_add(1, Ordering::Relaxed) | CONTROL_ID_BASE;
    shared.control.lock().insert(id, None);
    if let Err(e) = net.send(peer, msg.to_frame(id)) {
        shared.control.lock().remove(&id);
        return Err(e);
    }
    shared.wait_control(id, Duration::from_secs(60))
}

/// Opens an RDMA link with server `peer`: our queue pair's description
/// goes over the TCP connection, the server's and our push ring come back.
fn open_link(
    shared: &Arc<Shared>,
    net: &Arc<dyn Messenger>,
    peer: PeerId,
    dev: &Arc<rdma::Rdma>,
    addr: &str,
    sequenced: &mut bool,
) -> Result<Link> {
    let (link, info) = Link::new(dev, addr)?;
    let server = shared.server_index(peer).map_or(0, |s| s as usize);
    let next_seq = shared.seqs.read()[server].load(Ordering::Acquire);
    // From the request on the server may sequence this worker's frames,
    // unless it says no (an answer that never comes leaves it in doubt).
    *sequenced = true;
    let answer = join_call(shared, net, peer, &Control::RdmaConnect { conn: info.to_bytes(), next_seq })?;
    if matches!(answer, Control::Error(_)) {
        *sequenced = false;
    }
    establish_link(link, answer, addr)
}

/// Completes an RDMA link with the server's answer to its `RdmaConnect`.
fn establish_link(link: Link, answer: Control, addr: &str) -> Result<Link> {
    match answer {
        Control::RdmaAccept { conn, ring, ring_ctl } => {
            let remote = ConnInfo::from_bytes(&conn).map_err(|m| Error::protocol(addr, m))?;
            link.establish(&remote, ring, ring_ctl)?;
            Ok(link)
        }
        Control::Error(m) => Err(Error::Remote { peer: addr.into(), message: m }),
        other => Err(Error::protocol(addr, format!("unexpected reply {other:?}"))),
    }
}

/// Asks server `peer` for a push ring and maps it.
fn open_ring(shared: &Arc<Shared>, net: &Arc<dyn Messenger>, peer: PeerId) -> Result<crate::transport::shm::Ring> {
    match join_call(shared, net, peer, &Control::OpenRing { bytes: 64 << 20 })? {
        Control::RingReady { path } => crate::transport::shm::Ring::open(std::path::Path::new(&path)),
        Control::Error(m) => Err(Error::Remote { peer: "server".into(), message: m }),
        other => Err(Error::protocol("server", format!("unexpected reply {other:?}"))),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.heartbeat.lock().take();
        self.net.shutdown();
    }
}

impl Inner {
    fn control_send(&self, peer: PeerId, msg: &Control) -> Result<u64> {
        let id = self.next_control.fetch_add(1, Ordering::Relaxed);
        self.shared.control.lock().insert(id, None);
        if let Err(e) = self.net.send(peer, msg.to_frame(id)) {
            self.shared.control.lock().remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    fn filter(&self, id: TableId) -> Option<Arc<Mutex<TableFilter>>> {
        self.filters.read().get(&id).cloned()
    }

    fn table(&self, id: TableId) -> Result<Arc<TableInfo>> {
        self.tables.read().get(&id).cloned().ok_or(Error::UnknownTable(id))
    }

    /// A pull served one-sided (shared memory or RDMA READ), when every run
    /// can be: each touched server offers its shards to us, none of our
    /// pushes to it is unacknowledged (a pull must observe them), and every
    /// touched shard's progress already satisfies the consistency model.
    /// `None` means "ask the servers"; `buf` then comes back untouched.
    ///
    /// The routine is the same for every one-sided transport; a [`View`]
    /// only says how words are fetched. Whatever fetched them, the copy is
    /// validated by `slot::read_run`; torn slots are read again, then the
    /// pull falls back to the server.
    fn try_one_sided_pull(
        &self,
        table: TableId,
        keys: &Bytes,
        buf: &mut Vec<f32>,
        consistency: Option<Consistency>,
    ) -> Result<Option<Arc<Op>>> {
        use crate::store::SlotLayout;
        use crate::store::slot;
        let info = self.table(table)?;
        if info.one_sided.iter().all(Option::is_none) {
            return Ok(None);
        }
        let view = pod_slice::<Key>(keys);
        let ks: &[Key] = &view;
        let (n, dim) = (ks.len(), info.spec.dim as usize);
        if let Some(&last) = ks.last()
            && last >= info.spec.keys
        {
            return Err(Error::KeyOutOfRange { table, key: last, len: info.spec.keys });
        }
        let layout = SlotLayout::new(info.spec.dim).ok_or(Error::UnknownTable(table))?;
        let mut runs = Vec::new();
        info.map.split(n, |i| ks[i], &mut runs);
        {
            let backlog = self.shared.push_inflight.read();
            if runs.iter().any(|r| {
                info.one_sided.get(r.server as usize).is_none_or(Option::is_none)
                    || backlog.get(r.server as usize).is_none_or(|b| b.load(Ordering::Acquire) > 0)
            }) {
                return Ok(None);
            }
        }
        let clock = self.clock.load(Ordering::Acquire);
        let need = consistency
            .unwrap_or(info.spec.consistency)
            .tau()
            .and_then(|t| u64::from(clock).checked_sub(u64::from(t)))
            .filter(|&n| n > 0);
        let mut out = std::mem::take(buf);
        out.clear();
        out.resize(n * dim, 0.0);
        let words = layout.words();
        let mut torn = Vec::new();
        let (mut min_progress, mut shm_bytes, mut rdma_bytes) = (u64::MAX, 0u64, 0u64);
        // Slots `first..first+count` of `v` into `dst`; false when the
        // progress is too old or a slot stays torn (ask the server then).
        let mut read =
            |v: &View, first: usize, count: usize, dst: &mut [f32], min_progress: &mut u64| -> Result<bool> {
                let step = (v.max_words() / words).max(1);
                let mut done = 0;
                while done < count {
                    let c = step.min(count - done);
                    let part = &mut dst[done * dim..(done + c) * dim];
                    torn.clear();
                    let fresh = v.fetch((first + done) * words, c * words, need.is_some(), |progress, src| {
                        *min_progress = (*min_progress).min(progress);
                        let fresh = need.is_none_or(|need| progress >= need);
                        if fresh {
                            slot::read_run(layout, src, part, &mut torn);
                        }
                        fresh
                    })?;
                    if !fresh {
                        return Ok(false);
                    }
                    for &t in &torn {
                        let one = &mut part[t * dim..(t + 1) * dim];
                        let mut ok = false;
                        for _ in 0..TORN_RETRIES {
                            let mut again = Vec::new();
                            v.fetch((first + done + t) * words, words, false, |_, src| {
                                slot::read_run(layout, src, one, &mut again)
                            })?;
                            if again.is_empty() {
                                ok = true;
                                break;
                            }
                            std::hint::spin_loop();
                        }
                        if !ok {
                            return Ok(false);
                        }
                    }
                    done += c;
                }
                Ok(true)
            };
        for r in &runs {
            let views = info.one_sided[r.server as usize].as_ref().expect("checked");
            let (first, last) = (ks[r.lo], ks[r.hi - 1]);
            let Some(v) = views.partition_point(|v| v.range().start <= first).checked_sub(1).map(|i| &views[i]) else {
                *buf = out;
                return Ok(None);
            };
            let range = v.range();
            if !range.contains(last) || (layout.dim() == 1 && !v.word_atomic()) {
                *buf = out;
                return Ok(None);
            }
            let count = r.hi - r.lo;
            let dst = &mut out[r.lo * dim..r.hi * dim];
            let base = (first - range.start) as usize;
            let span = (last - first) as usize + 1;
            let mut fetched = span;
            let ok = if span == count {
                read(v, base, count, dst, &mut min_progress)?
            } else if v.cheap_single_slot() {
                fetched = count;
                let mut ok = true;
                for (j, &k) in ks[r.lo..r.hi].iter().enumerate() {
                    let at = (k - range.start) as usize;
                    if !read(v, at, 1, &mut dst[j * dim..(j + 1) * dim], &mut min_progress)? {
                        ok = false;
                        break;
                    }
                }
                ok
            } else if span <= 4 * count {
                // Scattered keys over a remote link: one READ of the span
                // beats a round trip per key.
                let mut all = vec![0.0f32; span * dim];
                let ok = read(v, base, span, &mut all, &mut min_progress)?;
                for (j, &k) in ks[r.lo..r.hi].iter().enumerate() {
                    let at = (k - first) as usize;
                    dst[j * dim..(j + 1) * dim].copy_from_slice(&all[at * dim..(at + 1) * dim]);
                }
                ok
            } else {
                false
            };
            if !ok {
                *buf = out;
                return Ok(None);
            }
            let b = (fetched * words * 8) as u64;
            match v {
                View::Shm(_) => shm_bytes += b,
                View::Rdma(_) => rdma_bytes += b,
            }
        }
        let ts = self.next_ts.fetch_add(1, Ordering::AcqRel);
        let op = Arc::new(Op::new(ts, clock, dim, Vec::new(), Some(out), false));
        op.note_progress(min_progress);
        op.mark_done();
        let t = &self.shared.traffic;
        if shm_bytes > 0 {
            t.shm_pulls.fetch_add(1, Ordering::Relaxed);
            t.shm_bytes_read.fetch_add(shm_bytes, Ordering::Relaxed);
        }
        if rdma_bytes > 0 {
            t.rdma_pulls.fetch_add(1, Ordering::Relaxed);
            t.rdma_bytes_read.fetch_add(rdma_bytes, Ordering::Relaxed);
        }
        Ok(Some(op))
    }

    /// Sends an ordered frame (push, pull, push-pull, clock) to `server`:
    /// through its RDMA push ring when there is a link and the frame fits,
    /// else over the connection (the frame's sequence number keeps its
    /// place). A failed link closes the connection, which fails everything
    /// in flight to that server with the link's error.
    fn send_ordered(&self, server: usize, peer: PeerId, frame: Frame) -> Result<()> {
        let link = self.shared.links.read().get(server).cloned().flatten();
        let Some(link) = link else { return self.net.send(peer, frame) };
        match link.send(&frame) {
            Ok(true) => {
                let t = &self.shared.traffic;
                t.rdma_frames.fetch_add(1, Ordering::Relaxed);
                t.rdma_bytes_written.fetch_add(frame.wire_len(), Ordering::Relaxed);
                Ok(())
            }
            Ok(false) => self.net.send(peer, frame),
            Err(e) => {
                tracing::warn!(server, error = %e, "closing the connection to a server whose RDMA link failed");
                self.net.disconnect(peer);
                Err(e)
            }
        }
    }

    /// Where the shards of a dense table can be read one-sided: by RDMA
    /// from servers with a link, else from the servers this worker shares
    /// memory with (with a push ring; when this worker reads shared memory,
    /// every other live server is asked too, as one that joined has no ring
    /// but may share its memory, and one that cannot be mapped is read over
    /// the network). `again` (after a membership change): a server that
    /// does not answer in time, or whose shards cannot be mapped, is read
    /// over the network instead of failing the call.
    fn map_shards(&self, spec: &TableSpec, again: bool) -> Result<Vec<Option<Arc<Vec<View>>>>> {
        let rings = self.shared.rings.read().clone();
        let links = self.shared.links.read().clone();
        let peers = self.shared.servers.read().clone();
        let mut out: Vec<Option<Arc<Vec<View>>>> = peers.iter().map(|_| None).collect();
        if spec.storage != crate::table::Storage::Dense {
            return Ok(out);
        }
        let wait = if again { Duration::from_secs(5) } else { Duration::from_secs(60) };
        // A server's views; `lenient`: none (read over the network) when it
        // has no shard or its shards cannot be mapped, instead of an error.
        let views = |s: usize, got: Result<Vec<View>>, lenient: bool| match got {
            Ok(v) if lenient && v.is_empty() => Ok(None),
            Ok(v) => Ok(Some(Arc::new(v))),
            Err(e) if lenient => {
                tracing::debug!(server = s, error = %e, "shards not mapped for one-sided reads");
                Ok(None)
            }
            Err(e) => Err(e),
        };
        for (s, link) in links.iter().enumerate().take(peers.len()) {
            let Some(link) = link else { continue };
            out[s] = views(s, self.map_rdma(spec, peers[s], s, link, wait), again)?;
        }
        let alive: Vec<bool> = {
            let ring = self.ring.read();
            (0..peers.len()).map(|s| ring.is_alive(s as u32)).collect()
        };
        for s in 0..peers.len() {
            let same_host = rings.get(s).is_some_and(Option::is_some);
            let maybe = self.shm_reads && alive[s];
            if out[s].is_some() || !(same_host || maybe) {
                continue;
            }
            out[s] = views(s, self.map_shm(spec, peers[s], s, wait), again || !same_host)?;
        }
        Ok(out)
    }

    /// A linked server's shards of `spec`, for RDMA READ.
    fn map_rdma(
        &self,
        spec: &TableSpec,
        peer: PeerId,
        s: usize,
        link: &Arc<Link>,
        wait: Duration,
    ) -> Result<Vec<View>> {
        let id = self.control_send(peer, &Control::RdmaShardMap { table: spec.id })?;
        let shards = match self.shared.wait_control(id, wait)? {
            Control::RdmaShardMapReply { shards } => shards,
            Control::Error(m) => return Err(Error::Remote { peer: format!("server {s}"), message: m }),
            other => return Err(Error::protocol("server", format!("unexpected reply {other:?}"))),
        };
        let layout = crate::store::SlotLayout::new(spec.dim).ok_or(Error::UnknownTable(spec.id))?;
        let mut views = Vec::with_capacity(shards.len());
        for sh in shards {
            let range = crate::store::KeyRange::new(sh.start, sh.end);
            // The slots must hold the whole range (a peer's word is
            // checked, not trusted): reads are bounded by them.
            let need = range.len().checked_mul(layout.bytes() as u64);
            if range.is_empty() || need.is_none_or(|n| n > sh.slots.len) || sh.header.len < 64 {
                return Err(Error::protocol(format!("server {s}"), format!("shard {range} does not fit its region")));
            }
            views.push(View::Rdma(RdmaView { range, header: sh.header, slots: sh.slots, link: link.clone() }));
        }
        views.sort_by_key(|v| v.range().start);
        Ok(views)
    }

    /// Opens RDMA links with live servers that have none, once per server
    /// (servers that joined after this worker started; servers that had
    /// none from the start are asked again once, unless this worker pushes
    /// to them through a shared ring, whose doorbells are not sequenced),
    /// when this worker uses RDMA. The
    /// request carries the seq of this worker's next ordered frame to the
    /// server and is sent under the server's send lock: every frame before
    /// it went over TCP ahead of the request, and the server sequences the
    /// frames from that seq on, whichever channel brings them (frames sent
    /// while the answer is on its way go over TCP). A server that offers no
    /// RDMA, or does not answer, stays on TCP.
    fn link_new_servers(&self) {
        let Some(dev) = &self.rdma_dev else { return };
        let servers: Vec<(usize, String, PeerId)> = {
            let ring = self.ring.read();
            let links = self.shared.links.read();
            let rings = self.shared.rings.read();
            let peers = self.shared.servers.read();
            let mut asked = self.link_asked.lock();
            ring.servers()
                .iter()
                .enumerate()
                .filter(|(s, i)| {
                    i.alive
                        && !i.joining
                        && links.get(*s).is_some_and(Option::is_none)
                        && rings.get(*s).is_none_or(Option::is_none)
                        && peers.get(*s).is_some()
                })
                .filter(|(s, _)| asked.insert(*s))
                .map(|(s, i)| (s, i.addr.clone(), peers[s]))
                .collect()
        };
        for (s, addr, peer) in servers {
            match self.link_mid_job(dev, s, &addr) {
                Ok(l) => {
                    // Only for the server it was opened with, if still alive
                    // (a link of a server that died meanwhile is dropped).
                    let ring = self.ring.read();
                    let same = self.shared.servers.read().get(s) == Some(&peer);
                    if ring.is_alive(s as u32) && same {
                        if let Some(slot) = self.shared.links.write().get_mut(s) {
                            *slot = Some(Arc::new(l));
                        }
                        tracing::info!(target: "transport", server = s, "RDMA link opened with a server mid-job");
                    }
                }
                Err(e) => tracing::info!(target: "transport", server = s, reason = %e,
                    "no RDMA link with a server mid-job; it stays on tcp"),
            }
        }
    }

    fn link_mid_job(&self, dev: &Arc<rdma::Rdma>, s: usize, addr: &str) -> Result<Link> {
        let peer = self.shared.servers.read().get(s).copied().ok_or_else(|| Error::Disconnected(addr.into()))?;
        let (link, info) = Link::new(dev, addr)?;
        let id = {
            let locks = self.shared.sending.read();
            let _order = locks.get(s).map(|l| l.lock());
            let next_seq = self.shared.seqs.read().get(s).map_or(1, |q| q.load(Ordering::Acquire));
            self.control_send(peer, &Control::RdmaConnect { conn: info.to_bytes(), next_seq })?
        };
        establish_link(link, self.shared.wait_control(id, Duration::from_secs(10))?, addr)
    }

    /// A same-host server's shards of `spec`, mapped read-only.
    fn map_shm(&self, spec: &TableSpec, peer: PeerId, s: usize, wait: Duration) -> Result<Vec<View>> {
        let id = self.control_send(peer, &Control::ShardMap { table: spec.id })?;
        let shards = match self.shared.wait_control(id, wait)? {
            Control::ShardMapReply { shards } => shards,
            Control::Error(m) => return Err(Error::Remote { peer: format!("server {s}"), message: m }),
            other => return Err(Error::protocol("server", format!("unexpected reply {other:?}"))),
        };
        let mut views = Vec::with_capacity(shards.len());
        for sh in shards {
            let view = ShmView {
                range: crate::store::KeyRange::new(sh.start, sh.end),
                header: crate::transport::shm::Mapped::open(std::path::Path::new(&sh.header))?,
                slots: crate::transport::shm::Mapped::open(std::path::Path::new(&sh.slots))?,
            };
            let layout = view.header.load(crate::store::shard::HEADER_LAYOUT).unwrap_or(0);
            if layout as u32 != spec.dim {
                return Err(Error::Config(format!("shared shard {} does not hold dim {}", sh.slots, spec.dim)));
            }
            views.push(View::Shm(view));
        }
        views.sort_by_key(|v| v.range().start);
        Ok(views)
    }

    /// After a membership change: the one-sided views of every dense table
    /// again (a server that joined, or new shards of the others: copies
    /// re-replicated, ranges taken over). Views of servers that died
    /// meanwhile are not installed.
    fn remap(&self) {
        let _one = self.remapping.lock();
        self.link_new_servers();
        let tables: Vec<Arc<TableInfo>> = self.tables.read().values().cloned().collect();
        for info in tables.iter().filter(|t| t.spec.storage == crate::table::Storage::Dense) {
            let views = match self.map_shards(&info.spec, true) {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(table = info.spec.id, error = %e, "one-sided views not refreshed");
                    continue;
                }
            };
            let ring = self.ring.read();
            let mut tables = self.tables.write();
            let Some(cur) = tables.get_mut(&info.spec.id) else { continue };
            let one_sided = (0..ring.servers().len())
                .map(|s| {
                    let mine = views.get(s).cloned().flatten();
                    if ring.is_alive(s as u32) {
                        mine.or_else(|| cur.one_sided.get(s).cloned().flatten())
                    } else {
                        None
                    }
                })
                .collect();
            *cur = Arc::new(TableInfo {
                spec: cur.spec.clone(),
                map: cur.map.clone(),
                one_sided,
                push_seq: cur.push_seq.clone(),
            });
        }
    }

    /// Checks, splits and sends one operation. `keys` are sorted and unique
    /// (checked by the caller or by `KeyList`).
    fn issue(&self, req: Issue) -> Result<Arc<Op>> {
        let Issue { kind: k, table, keys, vals, out, consistency, known } = req;
        if self.finished.load(Ordering::Acquire) || self.shared.shutdown.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let info = self.table(table)?;
        let key_view = pod_slice::<Key>(&keys);
        let keys_s: &[Key] = &key_view;
        let n = keys_s.len();
        let dim = info.spec.dim as usize;
        if let Some(&last) = keys_s.last()
            && last >= info.spec.keys
        {
            return Err(Error::KeyOutOfRange { table, key: last, len: info.spec.keys });
        }
        if let Some(v) = &vals
            && v.len() != n * dim * 4
        {
            return Err(Error::LengthMismatch {
                table,
                keys: n,
                dim: info.spec.dim,
                expected: n * dim,
                got: v.len() / 4,
            });
        }
        let out = out.map(|mut b| {
            b.clear();
            b.resize(n * dim, 0.0);
            b
        });
        let tau = consistency.unwrap_or(info.spec.consistency).tau().unwrap_or(proto::TAU_EVENTUAL);
        let is_push = k != kind::PULL;
        {
            let mut ops = self.shared.ops.lock();
            while ops.len() >= self.max_inflight {
                self.shared.ops_changed.wait(&mut ops);
            }
        }
        // Routing happens under the ring's read lock: a membership change
        // waits until this operation is sent, then re-routes it if needed;
        // and `clock()` (which takes it for writing) cannot end the clock
        // between reading it here and sending the operation.
        let ring = self.ring.read();
        let clock = self.clock.load(Ordering::Acquire);
        let info = self.table(table)?; // the map of the current epoch
        // A push takes its seq, and its timestamp, under the table's push
        // lock, held until it is sent: every server gets a table's pushes in
        // seq order, and re-routes (in timestamp order) keep that order.
        let mut order = is_push.then(|| info.push_seq.lock());
        let ts = self.next_ts.fetch_add(1, Ordering::AcqRel);
        // Every push call has its place among the clock's pushes to the
        // table, an empty or failing one too, so that a restarted worker's
        // places match its predecessor's.
        let seq = order.as_mut().map(|last| {
            **last = push_seq(**last, clock);
            **last
        });
        let mut runs = Vec::new();
        info.map.split(n, |i| keys_s[i], &mut runs);
        if let Some(r) = runs.iter().find(|r| r.server == NO_SERVER) {
            return Err(Error::Disconnected(format!("no live server holds key {}", keys_s[r.lo])));
        }
        let op_runs = runs.iter().map(|r| OpRun::new(r.lo, r.hi - r.lo, r.server)).collect();
        let sent = Sent { kind: k, table, keys: keys.clone(), vals: vals.clone(), known: known.clone(), tau };
        let op = Arc::new(Op::new(ts, clock, dim, op_runs, out, is_push).with_sent(sent));
        if let Some(seq) = seq {
            // Every run of the push has its seq. No piece of a shard's key
            // range history gets two runs of one push: runs are cut at the
            // ranges of the push's epoch, and histories at every epoch's.
            // (`order` is held until the push is sent, below.)
            op.runs().iter().for_each(|r| r.set_seq(seq));
        }
        if runs.is_empty() {
            op.mark_done();
            return Ok(op);
        }
        self.shared.ops.lock().insert(ts, op.clone());
        let all: Vec<usize> = (0..runs.len()).collect();
        self.send_runs(&ring, &info, &op, &all, true);
        Ok(op)
    }

    /// Sends runs `which` of `op` to their servers, one frame per server.
    /// `first_time`: the key cache and the shared-memory ring may be used
    /// (a retry spells its keys out and takes the connection).
    fn send_runs(&self, ring: &Ring, info: &TableInfo, op: &Arc<Op>, which: &[usize], first_time: bool) {
        let sent = op.sent.as_ref().expect("network operations keep their request");
        let (k, table, dim) = (sent.kind, sent.table, info.spec.dim as usize);
        let key_view = pod_slice::<Key>(&sent.keys);
        let keys_s: &[Key] = &key_view;
        let mut by_server: Vec<Vec<usize>> = vec![Vec::new(); ring.servers().len()];
        for &i in which {
            let s = op.runs()[i].server() as usize;
            if s < by_server.len() {
                by_server[s].push(i);
            }
        }
        let peers = self.shared.servers.read().clone();
        let filter = self.filter(table);
        let key_cache = first_time && filter.as_ref().is_some_and(|f| f.lock().key_cache());
        let locks = self.shared.sending.read();
        for (server, rs) in by_server.iter().enumerate().filter(|(_, rs)| !rs.is_empty()) {
            // The frame's place in the connection's order (`DataHeader::seq`)
            // is given, and the frame sent, under the server's send lock.
            let _order = locks.get(server).map(|l| l.lock());
            let mut headers = Vec::with_capacity(rs.len());
            let mut segments = Vec::with_capacity(rs.len() * 2);
            for &i in rs {
                let r = &op.runs()[i];
                let (lo, hi) = (r.lo, r.lo + r.count);
                let (first, last) = (keys_s[lo], keys_s[hi - 1]);
                let count = r.count as u64;
                let run_keys = sent.keys.slice(lo * 8..hi * 8);
                let (form, digest) = if last - first + 1 == count {
                    (run_form::RANGE, 0)
                } else if key_cache {
                    let (form, digest, saved) = self.shared.key_cache.lock().form_for(server, &run_keys);
                    if let (true, Some(f)) = (saved > 0, &filter) {
                        f.lock().stats.key_cache_bytes_saved += saved as u64;
                    }
                    (form, digest)
                } else {
                    (run_form::LIST, 0)
                };
                headers.push(RunHeader { run: i as u32, form, first, count, digest, seq: r.seq() });
                if run_form::has_keys(form) {
                    segments.push(run_keys);
                }
                if let Some(kv) = &sent.known {
                    segments.push(kv.slice(lo * 4..hi * 4));
                }
                if let Some(v) = &sent.vals {
                    segments.push(v.slice(lo * dim * 4..hi * dim * 4));
                }
            }
            let h = DataHeader {
                table,
                worker: self.rank,
                clock: op.clock,
                epoch: ring.epoch(),
                runs: headers.len() as u32,
                flags: if sent.known.is_some() { proto::flags::VERSIONED } else { 0 },
                seq: self.shared.next_seq(server),
                tau: sent.tau,
                reserved: 0,
            };
            let mut frame = Frame::new(k, op.ts, proto::build_meta(&h, &headers));
            frame.segments = segments;
            let t = &self.shared.traffic;
            t.requests.fetch_add(1, Ordering::Relaxed);
            t.keys_sent.fetch_add(headers.iter().map(|r| r.count).sum(), Ordering::Relaxed);
            t.bytes_sent.fetch_add(frame.segments.iter().map(|s| s.len() as u64).sum(), Ordering::Relaxed);
            if op.is_push
                && let Some(c) = self.shared.push_inflight.read().get(server)
            {
                c.fetch_add(rs.len(), Ordering::AcqRel);
            }
            // Large pushes to a same-host server go through the shared ring;
            // the doorbell keeps their place in the connection's order.
            let ring_buf = if first_time && op.is_push && frame.wire_len() >= RING_MIN_BYTES {
                self.shared.rings.read().get(server).cloned().flatten()
            } else {
                None
            };
            let Some(&peer) = peers.get(server) else { continue };
            let sent = match ring_buf.and_then(|r| r.write(&frame)) {
                Some((pos, len)) => {
                    let bell = Frame::new(kind::RING, op.ts, crate::transport::shm::doorbell_meta(pos, len));
                    self.net.send(peer, bell)
                }
                None => self.send_ordered(server, peer, frame),
            };
            if let Err(e) = sent {
                if self.shared.replicas.load(Ordering::Acquire) > 0 {
                    // The server may be failing over: its runs wait for the
                    // new owner (the router fails them if none comes).
                    tracing::debug!(server, error = %e, "send failed; waiting for a new owner");
                } else {
                    self.shared.fail_server_runs(op, server as u32, &e);
                }
            }
        }
    }

    /// Acknowledges the newest membership to the scheduler once every
    /// operation issued before it is done.
    fn try_ack(&self) {
        if !self.shared.ack_pending.load(Ordering::Acquire) {
            return;
        }
        let mut ack = self.shared.ack.lock();
        let Some((epoch, boundary)) = *ack else { return };
        if self.shared.ops.lock().keys().any(|&ts| ts < boundary) {
            return;
        }
        self.shared.ack_pending.store(false, Ordering::Release);
        *ack = Some((epoch, 0));
        drop(ack);
        let sched = *self.shared.scheduler.lock();
        if let Some(p) = sched
            && let Err(e) = self.net.send(p, Control::MembershipAck { epoch }.to_frame(0))
        {
            tracing::debug!(epoch, error = %e, "membership acknowledgement not delivered");
        }
    }

    /// A new server list: routes every run that is not answered yet and
    /// whose server lost its range (or answered `MOVED`) to the range's new
    /// owner, in issue order, then tells every server this worker's clock
    /// again (so that promoted copies know its progress).
    fn apply_membership(&self, epoch: u32, servers: Vec<proto::ServerInfo>) {
        let mut ring = self.ring.write();
        if epoch <= ring.epoch() {
            drop(ring);
            self.reroute_moved();
            return;
        }
        let new = Ring::new(servers, ring.vnodes(), epoch).with_replicas(ring.replicas());
        // Connections: new servers are connected, dead ones forgotten.
        {
            let mut peers = self.shared.servers.write();
            for (i, s) in new.servers().iter().enumerate() {
                let changed = ring.servers().get(i).is_none_or(|o| o.addr != s.addr);
                if i >= peers.len() || (changed && s.alive) {
                    let p = if s.alive {
                        self.net.connect(&s.addr).unwrap_or_else(|e| {
                            tracing::warn!(server = i, error = %e, "cannot reach a server of the new epoch");
                            PeerId(u64::MAX)
                        })
                    } else {
                        PeerId(u64::MAX)
                    };
                    if i < peers.len() {
                        peers[i] = p;
                    } else {
                        peers.push(p);
                    }
                }
            }
            let mut inflight = self.shared.push_inflight.write();
            while inflight.len() < peers.len() {
                inflight.push(Default::default());
            }
            let mut sending = self.shared.sending.write();
            while sending.len() < peers.len() {
                sending.push(Mutex::new(()));
            }
            let mut seqs = self.shared.seqs.write();
            while seqs.len() < peers.len() {
                seqs.push(AtomicU64::new(1));
            }
            let mut links = self.shared.links.write();
            links.resize(peers.len(), None);
            for (i, l) in links.iter_mut().enumerate() {
                if !new.is_alive(i as u32) {
                    *l = None;
                }
            }
            let mut rings = self.shared.rings.write();
            rings.resize(peers.len(), None);
            for (i, r) in rings.iter_mut().enumerate() {
                if !new.is_alive(i as u32) {
                    *r = None;
                }
            }
        }
        let mut tables = self.tables.write();
        for info in tables.values_mut() {
            let map = new.ranges(info.spec.keys);
            // Shared-memory views of servers that are gone are dropped; views
            // of new owners come with the next `remap`.
            let one_sided = info
                .one_sided
                .iter()
                .enumerate()
                .map(|(i, v)| if new.is_alive(i as u32) { v.clone() } else { None })
                .collect();
            *info = Arc::new(TableInfo { spec: info.spec.clone(), map, one_sided, push_seq: info.push_seq.clone() });
        }
        let tables = tables.clone();
        *ring = new;
        let moved: Vec<(Arc<Op>, usize, u32)> = std::mem::take(&mut *self.shared.moved.lock());
        let mut ops: Vec<Arc<Op>> = self.shared.ops.lock().values().cloned().collect();
        ops.sort_by_key(|o| o.ts);
        let mut n = 0;
        for op in ops {
            let Some(sent) = &op.sent else { continue };
            let Some(info) = tables.get(&sent.table) else { continue };
            let keys = pod_slice::<Key>(&sent.keys);
            let mut which = Vec::new();
            for (i, r) in op.runs().iter().enumerate() {
                if r.is_claimed() {
                    continue;
                }
                let mut was_moved = moved.iter().any(|(m, j, _)| Arc::ptr_eq(m, &op) && *j == i);
                if !was_moved {
                    // Answered MOVED since the list was taken: sent again
                    // here, in issue order (a later push to the same keys
                    // must not reach the new owner first, which would skip
                    // this one by its seq), unless the server that said so
                    // is ahead of this epoch: then it waits for that one.
                    let mut live = self.shared.moved.lock();
                    if let Some(at) = live.iter().position(|(m, j, _)| Arc::ptr_eq(m, &op) && *j == i) {
                        if live[at].2 > epoch {
                            continue;
                        }
                        live.remove(at);
                        was_moved = true;
                    }
                }
                let Some(ri) = info.map.find(keys[r.lo]) else { continue };
                let owner = info.map.range(ri).1;
                if owner == r.server() && !was_moved {
                    continue;
                }
                if owner == NO_SERVER || single_owner(&info.map, keys[r.lo], keys[r.lo + r.count - 1]).is_none() {
                    // No live copy, or the range split under the run.
                    if op.claim(i) {
                        let e =
                            Error::Disconnected(format!("keys {}.. have no live owner in epoch {epoch}", keys[r.lo]));
                        self.shared.finish_run(&op, i, None, Some(e));
                    }
                    continue;
                }
                if op.is_push
                    && let Some(c) = self.shared.push_inflight.read().get(r.server() as usize)
                {
                    c.fetch_sub(1, Ordering::AcqRel);
                }
                tracing::debug!(
                    ts = op.ts,
                    first = keys[r.lo],
                    from = r.server(),
                    to = owner,
                    seq = r.seq(),
                    "re-routing a run"
                );
                r.set_server(owner);
                which.push(i);
            }
            if !which.is_empty() {
                n += which.len();
                self.send_runs(&ring, info, &op, &which, false);
            }
        }
        let clock = self.clock.load(Ordering::Acquire);
        if let Err(e) = self.send_clock(&ring, clock) {
            tracing::debug!(error = %e, "clock not delivered to every server");
        }
        drop(ring);
        tracing::info!(epoch, runs = n, "new membership: unanswered runs sent to the new owners");
    }

    /// Runs answered `MOVED` by a server whose epoch is not newer than ours
    /// go again to the current owner; the others wait for the membership.
    fn reroute_moved(&self) {
        let ring = self.ring.read();
        let moved: Vec<(Arc<Op>, usize)> = {
            let mut m = self.shared.moved.lock();
            let (now, later): (Vec<_>, Vec<_>) = m.drain(..).partition(|(_, _, e)| *e <= ring.epoch());
            *m = later;
            now.into_iter().map(|(o, i, _)| (o, i)).collect::<Vec<_>>()
        };
        for (op, i) in moved {
            let Some(sent) = &op.sent else { continue };
            let Ok(info) = self.table(sent.table) else { continue };
            let keys = pod_slice::<Key>(&sent.keys);
            let r = &op.runs()[i];
            let Some(owner) = single_owner(&info.map, keys[r.lo], keys[r.lo + r.count - 1]) else {
                if op.claim(i) {
                    let e = Error::Disconnected(format!(
                        "keys {}.. are split between owners in epoch {}",
                        keys[r.lo],
                        ring.epoch()
                    ));
                    self.shared.finish_run(&op, i, None, Some(e));
                }
                continue;
            };
            if owner == NO_SERVER {
                continue;
            }
            if op.is_push
                && let Some(c) = self.shared.push_inflight.read().get(r.server() as usize)
            {
                c.fetch_sub(1, Ordering::AcqRel);
            }
            r.set_server(owner);
            self.send_runs(&ring, &info, &op, &[i], false);
        }
    }

    /// Tells every live server that this worker finished the clocks below `c`.
    fn send_clock(&self, ring: &Ring, c: u32) -> Result<()> {
        self.send_clock_frame(ring, c, 0)
    }

    /// Asks every live server of the current epoch `ask` (answered with a
    /// clock) and folds the answers with `fold`; `u32::MAX` answers (no
    /// clock there) are left out.
    fn ask_servers_clock(&self, ask: &Control, fold: fn(u32, u32) -> u32, what: &str) -> Result<Option<u32>> {
        let limit = failover_timeout();
        let started = Instant::now();
        let mut c = None;
        let servers = self.ring.read().servers().len();
        for s in 0..servers {
            loop {
                // A server that dies meanwhile is skipped: its ranges passed
                // to servers that received the same clocks.
                let peer = {
                    let ring = self.ring.read();
                    ring.is_alive(s as u32).then(|| self.shared.servers.read().get(s).copied()).flatten()
                };
                let Some(peer) = peer else { break };
                let answer = self
                    .control_send(peer, ask)
                    .and_then(|id| self.shared.wait_control(id, Duration::from_millis(500)));
                match answer {
                    Ok(Control::WorkerClockReply { clock }) => {
                        if clock != u32::MAX {
                            c = Some(c.map_or(clock, |x| fold(x, clock)));
                        }
                        break;
                    }
                    Ok(Control::Error(m)) => return Err(Error::Remote { peer: format!("server {s}"), message: m }),
                    Ok(other) => {
                        return Err(Error::protocol(format!("server {s}"), format!("unexpected reply {other:?}")));
                    }
                    Err(Error::ShuttingDown) => return Err(Error::ShuttingDown),
                    Err(e) if started.elapsed() >= limit => {
                        return Err(Error::Disconnected(format!(
                            "server {s} did not tell this {what} worker its clock within {limit:?}: {e}"
                        )));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        Ok(c)
    }

    /// A restarted worker: asks every live server of the current epoch for
    /// the last clock it received from this rank and takes the smallest, `c`
    /// (a clock frame follows the worker's pushes on the same ordered
    /// connection, so every push of clocks below `c` was applied on every
    /// server), then sets the rank's clock back to `c` everywhere (it was
    /// `u64::MAX` while the rank was lost, where shards do not wait for lost
    /// workers).
    fn resume(&self) -> Result<u32> {
        let known = self.ask_servers_clock(&Control::WorkerClock { worker: self.rank }, u32::min, "restarted")?;
        let c = match known {
            Some(c) => {
                self.enter_at(c, proto::flags::CLOCK_RESET)?;
                c
            }
            // No server heard of the rank (a worker that took a free seat
            // and died before it said where it starts): it starts as a
            // joining worker would.
            None => self.start_in_seat()?,
        };
        let _ = self.restarted.set(c);
        Ok(c)
    }

    /// Starts this worker at clock `c`, telling every live server (a clock
    /// frame with `flags`).
    fn enter_at(&self, c: u32, flags: u32) -> Result<()> {
        self.clock.store(c, Ordering::Release);
        let ring = self.ring.read();
        self.send_clock_frame(&ring, c, flags)
    }

    /// A worker taking a free seat (a left worker, `u64::MAX`, until now).
    fn join_clock(&self) -> Result<u32> {
        let c = self.start_in_seat()?;
        let _ = self.joined.set(c);
        Ok(c)
    }

    /// Every live server sets this seat's clock to the largest clock it
    /// received from any worker, and the worker starts at the largest of
    /// those, `c` (the job's clock: it holds nobody back, and reads the
    /// current model), raising the seat to `c` everywhere.
    fn start_in_seat(&self) -> Result<u32> {
        let c = self.ask_servers_clock(&Control::JobClock { worker: self.rank }, u32::max, "joining")?.unwrap_or(0);
        self.enter_at(c, 0)?;
        Ok(c)
    }

    /// A CLOCK frame with `flags` to every live server.
    fn send_clock_frame(&self, ring: &Ring, c: u32, flags: u32) -> Result<()> {
        let peers = self.shared.servers.read().clone();
        let locks = self.shared.sending.read();
        for (server, &p) in peers.iter().enumerate() {
            if !ring.is_alive(server as u32) {
                continue;
            }
            let _order = locks.get(server).map(|l| l.lock());
            let h = DataHeader {
                table: 0,
                worker: self.rank,
                clock: c,
                epoch: ring.epoch(),
                runs: 0,
                flags,
                seq: self.shared.next_seq(server),
                tau: proto::TAU_EVENTUAL,
                reserved: 0,
            };
            let meta = proto::build_meta::<DataHeader, RunHeader>(&h, &[]);
            match self.send_ordered(server, p, Frame::new(kind::CLOCK, 0, meta)) {
                // A server failing over: the new owners of its ranges are
                // told this clock again once the membership changes.
                Err(e) if self.shared.replicas.load(Ordering::Acquire) > 0 => {
                    tracing::debug!(server, error = %e, "clock not delivered; waiting for a new owner")
                }
                r => r?,
            }
        }
        Ok(())
    }
}

impl Shared {
    /// The job is over for this worker: whatever is still unanswered fails.
    fn shut_down(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.control_ready.notify_all();
        let ops: Vec<Arc<Op>> = self.ops.lock().values().cloned().collect();
        for op in ops {
            for i in 0..op.runs().len() {
                if op.claim(i) {
                    self.finish_run(&op, i, None, Some(Error::ShuttingDown));
                }
            }
        }
    }

    /// Fails every unanswered run sent to `server`.
    fn fail_server(&self, server: u32, e: &Error) {
        let ops: Vec<Arc<Op>> = self.ops.lock().values().cloned().collect();
        for op in ops {
            self.fail_server_runs(&op, server, e);
        }
    }

    fn wait_control(&self, id: u64, timeout: Duration) -> Result<Control> {
        let deadline = Instant::now().checked_add(timeout);
        let mut ctl = self.control.lock();
        loop {
            if let Some(slot) = ctl.get_mut(&id)
                && let Some(r) = slot.take()
            {
                ctl.remove(&id);
                return r;
            }
            if self.shutdown.load(Ordering::Acquire) {
                ctl.remove(&id);
                return Err(Error::ShuttingDown);
            }
            match deadline {
                Some(d) => {
                    if self.control_ready.wait_until(&mut ctl, d).timed_out() {
                        ctl.remove(&id);
                        return Err(Error::Config(format!("no answer from the job within {timeout:?}")));
                    }
                }
                None => self.control_ready.wait(&mut ctl),
            }
        }
    }

    fn answer_control(&self, id: u64, r: Result<Control>) -> bool {
        let mut ctl = self.control.lock();
        match ctl.get_mut(&id) {
            Some(slot) => {
                *slot = Some(r);
                drop(ctl);
                self.control_ready.notify_all();
                true
            }
            None => false,
        }
    }

    /// Run `i` of `op` is finished (claimed by the caller).
    fn finish_run(&self, op: &Arc<Op>, i: usize, values: Option<Part>, err: Option<Error>) {
        if op.is_push
            && let Some(c) = self.push_inflight.read().get(op.runs()[i].server() as usize)
        {
            c.fetch_sub(1, Ordering::AcqRel);
        }
        if op.finish_run(i, values, err) {
            self.complete(op);
        }
    }

    /// A waiter saw `op` end with `r`: its failure is not reported again.
    /// The op is done before `complete` files its failure, so a failed op is
    /// first waited out of `ops` (which `complete` leaves after filing).
    fn forget_failure(&self, op: &Op, r: &Result<()>) {
        if r.is_ok() {
            return;
        }
        let mut ops = self.ops.lock();
        while ops.contains_key(&op.ts) {
            self.ops_changed.wait(&mut ops);
        }
        drop(ops);
        self.failed.lock().remove(&op.ts);
    }

    fn complete(&self, op: &Arc<Op>) {
        if let Some(e) = op.error() {
            self.failed.lock().insert(op.ts, e);
        }
        self.ops.lock().remove(&op.ts);
        self.ops_changed.notify_all();
        if self.ack_pending.load(Ordering::Acquire)
            && let Some(tx) = self.router.lock().as_ref()
        {
            let _ = tx.send(Route::AckCheck);
        }
    }

    fn fail_server_runs(&self, op: &Arc<Op>, server: u32, e: &Error) {
        for i in 0..op.runs().len() {
            if op.runs()[i].server() == server && op.claim(i) {
                self.finish_run(op, i, None, Some(e.clone()));
            }
        }
    }

    /// The sequence number of the next ordered frame to `server`.
    fn next_seq(&self, server: usize) -> u64 {
        self.seqs.read().get(server).map_or(0, |s| s.fetch_add(1, Ordering::Relaxed))
    }

    fn server_index(&self, peer: PeerId) -> Option<u32> {
        self.servers.read().iter().position(|&p| p == peer).map(|i| i as u32)
    }

    fn on_reply(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) -> Result<()> {
        let peer = || net.peer_addr(from);
        let server = self.server_index(from).ok_or_else(|| Error::protocol(peer(), "reply from a non-server"))?;
        let op = self.ops.lock().get(&frame.id).cloned();
        let op = op.ok_or_else(|| Error::protocol(peer(), format!("reply for unknown operation {}", frame.id)))?;
        let (h, runs) = proto::parse_meta::<ReplyHeader, RunReply>(&frame.meta, |h| h.runs)
            .ok_or_else(|| Error::protocol(peer(), "malformed reply meta"))?;
        let received = frame.segments.iter().map(|s| s.len() as u64).sum();
        self.traffic.bytes_received.fetch_add(received, Ordering::Relaxed);
        op.note_progress(h.progress);
        let with_values = op.has_output();
        let segs_of = |st: u32| match st {
            status::OK => usize::from(with_values),
            status::CHANGED => 3,
            _ => 0,
        };
        if runs.iter().any(|r| r.status == status::MOVED) {
            // Nothing of the request was applied: every run goes again, to
            // the owner of a map at least as new as the server's.
            let mut moved = self.moved.lock();
            for r in &runs {
                let i = r.run as usize;
                if op.runs().get(i).is_some_and(|run| run.server() == server) && op.claim(i) {
                    op.unclaim(i);
                    moved.push((op.clone(), i, h.epoch));
                }
            }
            drop(moved);
            if let Some(tx) = self.router.lock().as_ref() {
                let _ = tx.send(Route::Moved);
            }
            return Ok(());
        }
        let n_vals: usize = runs.iter().map(|r| segs_of(r.status)).sum();
        let n_errs = runs.iter().filter(|r| r.status == status::ERROR).count();
        if frame.segments.len() != n_vals + n_errs || runs.iter().any(|r| r.status > status::MOVED) {
            return Err(Error::protocol(peer(), "reply segment count does not match its runs"));
        }
        let (mut vals, mut errs) = (frame.segments[..n_vals].iter(), frame.segments[n_vals..].iter());
        for r in runs {
            let i = r.run as usize;
            let Some(run) = op.runs().get(i) else {
                return Err(Error::protocol(peer(), format!("reply names run {i} of {}", op.runs().len())));
            };
            if run.server() != server {
                // A late answer from the server the run was taken from (a
                // range handed over): the new owner answers it, and skips
                // it by its seq if it was a push this one applied.
                let _ = vals.by_ref().take(segs_of(r.status)).count();
                let _ = errs.by_ref().take(usize::from(r.status == status::ERROR)).count();
                continue;
            }
            if run.count as u64 != r.count {
                return Err(Error::protocol(peer(), format!("reply for run {i} does not match the request")));
            }
            if !op.claim(i) {
                // Answered already: a run sent twice to its owner (a MOVED
                // answer and a membership change re-routing it at the same
                // moment). A push was applied once (its seq); the other
                // runs of this reply still count.
                tracing::debug!(ts = op.ts, run = i, "a second answer for a run; ignored");
                let _ = vals.by_ref().take(segs_of(r.status)).count();
                let _ = errs.by_ref().take(usize::from(r.status == status::ERROR)).count();
                continue;
            }
            if r.status == status::OK {
                let (mut values, mut err) = (None, None);
                if with_values {
                    let seg = vals.next().expect("counted");
                    if seg.len() != run.count * op.dim() * 4 {
                        err = Some(Error::protocol(peer(), format!("run {i}: {} value bytes", seg.len())));
                    } else {
                        values = Some(Part::Values(seg.clone()));
                    }
                }
                self.finish_run(&op, i, values, err);
            } else if r.status == status::CHANGED {
                let (bitmap, values, versions) =
                    (vals.next().expect("counted"), vals.next().expect("counted"), vals.next().expect("counted"));
                let changed = versions.len() / 4;
                let ones: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
                let ok = with_values
                    && bitmap.len() == run.count.div_ceil(8)
                    && versions.len() % 4 == 0
                    && ones == changed
                    && values.len() == changed * op.dim() * 4;
                if ok {
                    let part =
                        Part::Changed { bitmap: bitmap.clone(), values: values.clone(), versions: versions.clone() };
                    self.finish_run(&op, i, Some(part), None);
                } else {
                    let e = Error::protocol(peer(), format!("run {i}: malformed changed-keys reply"));
                    self.finish_run(&op, i, None, Some(e));
                }
            } else {
                let msg = errs.next().map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
                self.finish_run(&op, i, None, Some(Error::Remote { peer: peer(), message: msg }));
            }
        }
        Ok(())
    }
}

/// The owner of every key of `[first, last]`, if one server owns them all.
fn single_owner(map: &crate::scheduler::ring::RangeMap, first: Key, last: Key) -> Option<u32> {
    let mut i = map.find(first)?;
    let owner = map.range(i).1;
    loop {
        let (range, o) = map.range(i);
        if o != owner {
            return None;
        }
        if range.contains(last) {
            return Some(owner);
        }
        i += 1;
        if i >= map.len() {
            return None;
        }
    }
}

/// The router thread: applies membership changes and re-sends moved runs
/// off the transport's threads (it connects and sends, which may block).
/// It also fails the runs of a server whose connection dropped when no new
/// owner is announced in time.
fn router(inner: std::sync::Weak<Inner>, rx: crossbeam::channel::Receiver<Route>) {
    let mut lost: HashMap<u32, Instant> = HashMap::new();
    loop {
        let msg = rx.recv_timeout(Duration::from_millis(500));
        let Some(inner) = inner.upgrade() else { return };
        if inner.shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        match msg {
            Ok(Route::Membership { epoch, servers }) => {
                inner.apply_membership(epoch, servers);
                // New views (it asks the servers: not on this thread, which
                // must go on routing).
                let weak = Arc::downgrade(&inner);
                let _ = std::thread::Builder::new().name("pserver-remap".into()).spawn(move || {
                    if let Some(inner) = weak.upgrade() {
                        inner.remap();
                    }
                });
                {
                    let ring = inner.ring.read();
                    lost.retain(|s, _| ring.is_alive(*s));
                }
                let boundary = inner.next_ts.load(Ordering::Acquire);
                let mut ack = inner.shared.ack.lock();
                if ack.is_none_or(|(e, _)| e < epoch) {
                    *ack = Some((epoch, boundary));
                    inner.shared.ack_pending.store(true, Ordering::Release);
                }
            }
            Ok(Route::Moved) => inner.reroute_moved(),
            Ok(Route::AckCheck) => {}
            Ok(Route::Lost { server, at }) => {
                lost.entry(server).or_insert(at);
            }
            Err(crossbeam::channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam::channel::RecvTimeoutError::Disconnected) => return,
        }
        inner.try_ack();
        let limit = failover_timeout();
        lost.retain(|&server, at| {
            if at.elapsed() < limit {
                return true;
            }
            let e = Error::Disconnected(format!("server {server}: no new owner announced within {limit:?}"));
            inner.shared.fail_server(server, &e);
            false
        });
    }
}

struct WorkerHandler {
    shared: Arc<Shared>,
}

impl Handler for WorkerHandler {
    fn on_frame(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) {
        let sh = &self.shared;
        let result = match frame.kind {
            kind::REPLY => sh.on_reply(net, from, frame),
            kind::NEED_KEYS => {
                let digests = frame.segments.first().map(|d| pod_slice::<u64>(d).into_owned()).unwrap_or_default();
                let kc = sh.key_cache.lock();
                let mut reply = Frame::new(kind::KEYS, 0, bytes_of_vec(digests.clone()));
                for d in &digests {
                    // An unknown digest gets an empty list: the server then
                    // fails that request instead of waiting forever.
                    reply.segments.push(kc.lists.get(d).cloned().unwrap_or_default());
                }
                drop(kc);
                tracing::debug!(lists = digests.len(), "resupplying key lists");
                net.send(from, reply)
            }
            kind::REFUSED => {
                let msg = frame.segments.first().map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
                let e = Error::Remote { peer: net.peer_addr(from), message: msg };
                if frame.id >= CONTROL_ID_BASE {
                    sh.answer_control(frame.id, Err(e));
                } else {
                    // Looked up first: failing the runs completes the op,
                    // which takes the ops lock again.
                    let op = sh.ops.lock().get(&frame.id).cloned();
                    if let (Some(op), Some(server)) = (op, sh.server_index(from)) {
                        sh.fail_server_runs(&op, server, &e);
                    }
                }
                Ok(())
            }
            kind::CONTROL => match Control::from_frame(&frame, &net.peer_addr(from)) {
                Ok(Control::Shutdown) => {
                    sh.shut_down();
                    Ok(())
                }
                Ok(Control::Membership { epoch, servers }) => {
                    if let Some(tx) = sh.router.lock().as_ref() {
                        let _ = tx.send(Route::Membership { epoch, servers });
                    }
                    Ok(())
                }
                Ok(c) => {
                    if !sh.answer_control(frame.id, Ok(c)) {
                        tracing::debug!(id = frame.id, "unsolicited control message");
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            },
            other => Err(Error::protocol(net.peer_addr(from), format!("unexpected frame kind {other}"))),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "worker dropped a bad frame");
        }
    }

    fn on_disconnect(&self, _net: &Arc<dyn Messenger>, peer: PeerId) {
        let sh = &self.shared;
        if let Some(server) = sh.server_index(peer) {
            sh.key_cache.lock().forget(server as usize);
            if sh.replicas.load(Ordering::Acquire) > 0 {
                // Its ranges have copies: the scheduler will announce their
                // new owners; the router fails the runs if it never does.
                if let Some(tx) = sh.router.lock().as_ref() {
                    let _ = tx.send(Route::Lost { server, at: Instant::now() });
                }
            } else {
                sh.fail_server(server, &Error::Disconnected(format!("server {server}")));
            }
        }
        if *sh.scheduler.lock() == Some(peer) {
            sh.shut_down();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::push_seq;

    #[test]
    fn push_seqs_name_a_push_by_its_clock_and_place_and_only_grow() {
        let c = |clock: u64, n: u64| (clock << 32) + n;
        assert_eq!(push_seq(0, 0), 1);
        assert_eq!(push_seq(1, 0), 2);
        // A new clock starts its places from 1, whatever came before...
        assert_eq!(push_seq(2, 5), c(5, 1));
        assert_eq!(push_seq(c(5, 1), 5), c(5, 2));
        // ... so a new process at clock 5 names its first push as its
        // predecessor did.
        assert_eq!(push_seq(0, 5), c(5, 1));
        // A push issued at an older clock than the last one takes the next.
        assert_eq!(push_seq(c(6, 3), 5), c(6, 4));
    }
}
