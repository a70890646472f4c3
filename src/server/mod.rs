//! A server node: owns shards of tables and applies workers' requests.
//!
//! The transport calls [`ServerHandler::on_frame`], which checks a request
//! (every length, count and key range, before anything is touched), groups its
//! runs by the *lane* holding each run's shard, applies them lane by lane on
//! the calling thread (see `lane`), and answers with one reply frame. Requests
//! from one worker are delivered in the order they were sent, so a pull
//! issued after a push by the same worker always observes it.
//!
//! The server never trusts a peer: a malformed request gets a REFUSED reply
//! naming the problem and changes nothing.
//!
//! Ranges and copies (DESIGN section 6): every server holds, per table, a
//! set of disjoint shards covering each range of the current map it owns or
//! keeps a copy of. Shards are built for the ranges of the epoch in which
//! they are needed and kept: after a failover, a range this server owns may
//! span its own shard and the copy of the dead server's range next to it,
//! so a run is split along the shards it spans and the parts' answers are
//! joined in the reply. A server applies requests only for ranges it owns in
//! its epoch; a request that names keys it does not own is answered
//! `MOVED`, with nothing applied, and the worker routes it again.
//! Membership changes (a server died or left) and table creation are
//! applied in order by one control thread, which builds the shards and
//! tells the lanes what each shard is for; a new replica of
//! an owned range first receives a full copy of it.

pub mod checkpoint;
mod lane;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::proto::{self, Control, DataHeader, Role, RunHeader, kind, run_form};
use crate::scheduler::ring::Ring;
use crate::store::{KeyRange, Shard, ShardConfig};
use crate::table::{TableId, TableSpec};
use crate::transport::rdma::{self, ConnInfo, RdmaMode};
use crate::transport::{Access, Frame, Handler, Messenger, PeerId, Transport};
use crate::updater::Rules;

use lane::{INLINE_MAX_KEYS, Job, Lane, LaneRun, Replication, Request, Target};

/// Default of [`ServerConfig::max_keys_per_request`].
pub const MAX_KEYS_PER_REQUEST: u64 = 1 << 28;

/// Default of [`ServerConfig::max_pending`]: well above what a worker keeps
/// in flight by default (`WorkerConfig::max_inflight`, 1024).
pub const MAX_PENDING_REQUESTS: usize = 4096;

/// How a server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Lanes: shards are striped over this many independently locked sets, so
    /// requests delivered on different threads apply in parallel.
    pub lanes: usize,
    /// Custom update rules this server offers.
    pub rules: Rules,
    /// Refuse tables that would take the server's shards beyond this many bytes.
    pub max_memory: Option<u64>,
    /// Requested rank (from PSERVER_RANK), honoured when free.
    pub rank: Option<u32>,
    /// Offer same-host workers one-sided access through shared memory.
    pub shm: bool,
    /// Offer workers RDMA: shards readable one-sided, a push ring per worker.
    pub rdma: RdmaMode,
    /// Keys one data request may carry; a larger one is refused.
    pub max_keys_per_request: u64,
    /// Data requests one connection may have unanswered (applied, waiting for
    /// consistency, or queued); more are refused until replies go out.
    pub max_pending: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            lanes: 4,
            rules: Rules::default(),
            max_memory: None,
            rank: None,
            shm: false,
            rdma: RdmaMode::Off,
            max_keys_per_request: MAX_KEYS_PER_REQUEST,
            max_pending: MAX_PENDING_REQUESTS,
        }
    }
}

/// Bytes of a worker's push ring (`PSERVER_RDMA_RING_BYTES`, default 8 MiB).
fn rdma_ring_bytes() -> usize {
    std::env::var("PSERVER_RDMA_RING_BYTES")
        .ok()
        .and_then(|v| crate::bench::parse_size(&v))
        .unwrap_or(8 << 20)
        .clamp(1 << 16, 1 << 30)
}

/// A shard of a table on this server: its range, lane and id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ShardRef {
    range: KeyRange,
    lane: usize,
    id: u32,
}

struct Table {
    spec: TableSpec,
    /// The ranges of the current epoch, with owners and replicas.
    map: crate::scheduler::ring::RangeMap,
    /// The epoch of `map` (ahead of the epoch replicated state is held for
    /// while a membership change is being applied).
    epoch: u32,
    /// Where same-host workers find the shards (dense tables, shm on).
    shm: Vec<proto::ShmShard>,
    /// Where RDMA workers read the shards (dense tables, RDMA on), and the
    /// registrations that keep them readable.
    rdma: Vec<proto::RdmaShard>,
    _registered: Vec<Arc<rdma::Registration>>,
    /// Shards here (owned ranges and copies), disjoint, sorted by start.
    shards: Vec<ShardRef>,
    /// The shards' header regions by shard id, where reports read progress.
    headers: HashMap<u32, Arc<crate::store::Region>>,
}

impl Table {
    /// The shard holding every key of `[first, last]`.
    fn shard(&self, first: u64, last: u64) -> Option<ShardRef> {
        let i = self.shards.partition_point(|s| s.range.start <= first).checked_sub(1)?;
        self.shards.get(i).filter(|s| s.range.contains(first) && s.range.contains(last)).copied()
    }

    /// The shards holding `[first, last]`, in key order, when they cover it
    /// without a gap.
    fn cover(&self, first: u64, last: u64) -> Option<Vec<ShardRef>> {
        let mut i = self.shards.partition_point(|s| s.range.start <= first).checked_sub(1)?;
        let mut out = Vec::with_capacity(1);
        let mut at = first;
        loop {
            let s = self.shards.get(i).filter(|s| s.range.contains(at))?;
            out.push(*s);
            if s.range.contains(last) {
                return Some(out);
            }
            at = s.range.end;
            i += 1;
        }
    }

    /// The shards overlapping `[start, end)`, each with the overlap.
    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (ShardRef, KeyRange)> + '_ {
        self.shards
            .iter()
            .filter(move |s| s.range.start < end && start < s.range.end)
            .map(move |s| (*s, KeyRange::new(s.range.start.max(start), s.range.end.min(end))))
    }

    /// Whether server `me` owns every key of `[first, last]` in this epoch.
    fn owns(&self, me: u32, first: u64, last: u64) -> bool {
        // Consecutive ranges may share an owner (they differ in replicas).
        let Some(mut i) = self.map.find(first) else { return false };
        while i < self.map.len() {
            let (range, owner) = self.map.range(i);
            if owner != me {
                return false;
            }
            if range.contains(last) {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether server `me` owns any key of `[start, end)` in this epoch.
    fn owns_any(&self, me: u32, start: u64, end: u64) -> bool {
        let Some(mut i) = self.map.find(start) else { return false };
        while i < self.map.len() {
            let (range, owner) = self.map.range(i);
            if range.start >= end {
                return false;
            }
            if owner == me {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether every key of `[start, end)` has a shard here.
    fn covers(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end).map(|(_, r)| r.len()).sum::<u64>() == end - start
    }
}

#[derive(Default)]
struct Membership {
    /// The connection to the scheduler; losing it ends the job for us.
    scheduler: Option<PeerId>,
    /// This server's index in the ring, once welcomed.
    index: Option<u32>,
    ring: Option<Ring>,
    workers: u32,
    stopping: bool,
    /// Connections this server opened to other servers (its replicas), by
    /// server index.
    peers: HashMap<u32, PeerId>,
    /// The scheduler refused to let this server leave.
    refusal: Option<String>,
    /// Why this server stopped on its own, when it did (it exits with it).
    fatal: Option<String>,
}

/// Control id of a server's request to leave.
const LEAVE_ID: u64 = u64::MAX - 1;
/// Control id of a table spec an owner sends a joining server (its answer
/// is only logged).
const PEER_TABLE_ID: u64 = u64::MAX - 2;
/// How long a membership change waits for state to reach the servers that
/// take ranges over before it is acknowledged anyway (with an error logged).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// Work for the control thread, in arrival order.
enum ControlJob {
    Welcome {
        from: PeerId,
        id: u64,
        servers: Vec<proto::ServerInfo>,
        rank: u32,
        workers: u32,
        vnodes: u32,
        epoch: u32,
        replicas: u32,
        checkpoint: Option<proto::CheckpointPlan>,
    },
    Membership {
        from: PeerId,
        epoch: u32,
        servers: Vec<proto::ServerInfo>,
    },
    CreateTable {
        from: PeerId,
        id: u64,
        spec: TableSpec,
    },
    Snapshot {
        from: PeerId,
        clock: u32,
        dir: String,
    },
}

/// Per-connection state: the key lists a worker asked us to keep, and the
/// requests held while we wait for lists we lost.
#[derive(Default)]
struct ConnState {
    /// The connection's push ring (shared memory).
    ring: Option<Arc<crate::transport::shm::Ring>>,
    lists: HashMap<u64, Bytes>,
    bytes: usize,
    blocked: bool,
    parked: std::collections::VecDeque<Frame>,
    /// Set once the connection has an RDMA link: its ordered frames arrive
    /// by two channels and are applied in sequence-number order.
    seq: Option<Sequencer>,
    /// Data requests taken and not yet answered; `answer` gives it back.
    pending: Arc<std::sync::atomic::AtomicUsize>,
    /// What lanes reply through for this connection (see [`Answering`]).
    answer: Option<Arc<dyn Messenger>>,
}

/// The messenger a connection's replies go through: counts their payload
/// and gives back the connection's pending-request slot as each reply
/// leaves (every data request taken gets exactly one REPLY).
struct Answering {
    net: Arc<dyn Messenger>,
    pending: Arc<std::sync::atomic::AtomicUsize>,
    stats: Arc<ServerStats>,
}

impl Messenger for Answering {
    fn local_addr(&self) -> String {
        self.net.local_addr()
    }
    fn connect(&self, addr: &str) -> Result<PeerId> {
        self.net.connect(addr)
    }
    fn send(&self, peer: PeerId, frame: Frame) -> Result<()> {
        use std::sync::atomic::Ordering::{AcqRel, Relaxed};
        if frame.kind == kind::REPLY {
            let _ = self.pending.fetch_update(AcqRel, Relaxed, |n| n.checked_sub(1));
            let bytes = frame.segments.iter().map(|s| s.len() as u64).sum();
            self.stats.bytes_sent.fetch_add(bytes, Relaxed);
        }
        self.net.send(peer, frame)
    }
    fn peer_addr(&self, peer: PeerId) -> String {
        self.net.peer_addr(peer)
    }
    fn disconnect(&self, peer: PeerId) {
        self.net.disconnect(peer)
    }
    fn shutdown(&self) {
        self.net.shutdown()
    }
    fn same_host(&self, peer: PeerId) -> bool {
        self.net.same_host(peer)
    }
    fn advertised_addr(&self, via: PeerId) -> String {
        self.net.advertised_addr(via)
    }
    fn remote_memory(&self) -> Option<Arc<dyn crate::transport::RemoteMemory>> {
        self.net.remote_memory()
    }
    fn stats(&self) -> crate::transport::TransportStats {
        self.net.stats()
    }
}

/// Applies one connection's ordered frames in `DataHeader::seq` order,
/// whichever channel (TCP, RDMA ring) brought them; see `transport::rdma`.
#[derive(Debug)]
struct Sequencer {
    /// The next sequence number to apply.
    next: u64,
    /// A thread is applying this connection's frames (it applies the held
    /// ones that become next before it lets go).
    busy: bool,
    held: std::collections::BTreeMap<u64, Frame>,
}

/// The sequence number of an ordered frame (every one starts with a DataHeader).
fn seq_of(frame: &Frame) -> Option<u64> {
    let h: DataHeader = bytemuck::try_pod_read_unaligned(frame.meta.get(..std::mem::size_of::<DataHeader>())?).ok()?;
    Some(h.seq)
}

/// Requests a connection may have held while it resupplies key lists.
const MAX_PARKED_FRAMES: usize = 4096;

/// Counters of one server.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub requests: std::sync::atomic::AtomicU64,
    pub keys: std::sync::atomic::AtomicU64,
    /// Runs whose keys came from the key cache, and the key bytes not sent.
    pub key_cache_hits: std::sync::atomic::AtomicU64,
    pub key_cache_bytes_saved: std::sync::atomic::AtomicU64,
    /// Times a worker had to resupply key lists.
    pub key_cache_misses: std::sync::atomic::AtomicU64,
    /// Frames that arrived through RDMA push rings.
    pub rdma_frames: std::sync::atomic::AtomicU64,
    /// Data requests by kind, and their keys.
    pub pushes: std::sync::atomic::AtomicU64,
    pub pulls: std::sync::atomic::AtomicU64,
    pub push_pulls: std::sync::atomic::AtomicU64,
    pub keys_pushed: std::sync::atomic::AtomicU64,
    pub keys_pulled: std::sync::atomic::AtomicU64,
    /// Payload bytes of data requests and of their replies.
    pub bytes_received: std::sync::atomic::AtomicU64,
    pub bytes_sent: std::sync::atomic::AtomicU64,
    /// Requests refused as a whole (malformed, over a limit, ...).
    pub refused: std::sync::atomic::AtomicU64,
}

struct Shared {
    cfg: ServerConfig,
    /// Files of this server's shared memory (shm on).
    shm: Option<Arc<crate::transport::shm::Namespace>>,
    /// RDMA links of this server's workers (RDMA on and a device usable).
    inbox: RwLock<Option<Arc<rdma::Inbox>>>,
    conns: Mutex<HashMap<PeerId, ConnState>>,
    /// Connections currently blocked (skip the lock when 0).
    blocked: std::sync::atomic::AtomicUsize,
    /// Connections with a sequencer (skip the lock when 0).
    sequenced: std::sync::atomic::AtomicUsize,
    stats: Arc<ServerStats>,
    lanes: Vec<Arc<Lane>>,
    membership: Mutex<Membership>,
    changed: Condvar,
    tables: RwLock<HashMap<TableId, Arc<Table>>>,
    next_shard: Mutex<u32>,
    memory: Mutex<u64>,
    repl: Arc<Replication>,
    control: Mutex<Option<crossbeam::channel::Sender<ControlJob>>>,
    /// The checkpoint this job restores (its directory, manifest and clock).
    restore: Mutex<Option<(std::path::PathBuf, checkpoint::Manifest, u32)>>,
    /// The epoch whose tables are in place (replicated state stamped with a
    /// later one waits), and the REPLICATE frames held until it catches up.
    early: Mutex<(u32, Vec<(PeerId, Frame)>)>,
    /// The newest membership epoch the scheduler sent (queued for the
    /// control thread, maybe not applied yet).
    announced: std::sync::atomic::AtomicU32,
    /// Per worker rank: the last clock it sent here (any incarnation; not
    /// the `u64::MAX` of `WorkerLeft`), what a restarted worker resumes
    /// from.
    worker_clocks: Mutex<Vec<u32>>,
}

/// REPLICATE frames a server holds for a newer epoch before it refuses more.
const MAX_EARLY_FRAMES: usize = 4096;
/// And the bytes of those frames.
const MAX_EARLY_BYTES: u64 = 1 << 30;

/// The transport-facing side of a server.
pub struct ServerHandler {
    shared: Arc<Shared>,
}

/// A running server node.
pub struct ServerNode {
    shared: Arc<Shared>,
    net: Arc<dyn Messenger>,
    helpers: Vec<std::thread::JoinHandle<()>>,
    heartbeat: Option<crate::scheduler::heartbeat::Heartbeat>,
    control: Option<std::thread::JoinHandle<()>>,
}

impl ServerNode {
    /// Binds at `bind` (empty: any address), registers with the scheduler at
    /// `scheduler` and starts serving. Returns once registered; the ring
    /// arrives when the whole job has registered ([`ServerNode::wait_welcome`]).
    pub fn start(transport: &dyn Transport, bind: &str, scheduler: &str, cfg: ServerConfig) -> Result<ServerNode> {
        let cfg_rank = cfg.rank;
        let repl = Arc::new(Replication::default());
        let lanes: Vec<Arc<Lane>> = (0..cfg.lanes.max(1)).map(|_| Arc::new(Lane::new(repl.clone()))).collect();
        let helpers = lanes
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let l = l.clone();
                std::thread::Builder::new()
                    .name(format!("pserver-lane-{i}"))
                    .spawn(move || l.helper_loop())
                    .map_err(|e| Error::io("spawning a lane helper thread", e))
            })
            .collect::<Result<Vec<_>>>()?;
        let shm = if cfg.shm {
            if crate::transport::shm::available() {
                Some(Arc::new(crate::transport::shm::Namespace::new()?))
            } else {
                tracing::warn!(dir = %crate::transport::shm::dir().display(), "shared memory is not usable here; serving over the network only");
                None
            }
        } else {
            None
        };
        let device = match cfg.rdma {
            RdmaMode::Off => None,
            mode => match rdma::device() {
                Ok(d) => Some(d),
                Err(e) if mode == RdmaMode::Require => {
                    return Err(Error::Config(format!("--transport rdma: {e}")));
                }
                Err(e) => {
                    tracing::info!(target: "transport", reason = %e, "server: RDMA unavailable, offering shm/tcp");
                    None
                }
            },
        };
        let shared = Arc::new(Shared {
            shm,
            inbox: RwLock::new(None),
            cfg,
            conns: Mutex::new(HashMap::new()),
            blocked: Default::default(),
            sequenced: Default::default(),
            stats: Arc::new(ServerStats::default()),
            lanes,
            membership: Mutex::new(Membership::default()),
            changed: Condvar::new(),
            tables: RwLock::new(HashMap::new()),
            next_shard: Mutex::new(0),
            memory: Mutex::new(0),
            repl,
            control: Mutex::new(None),
            early: Mutex::new((0, Vec::new())),
            announced: std::sync::atomic::AtomicU32::new(0),
            worker_clocks: Mutex::new(Vec::new()),
            restore: Mutex::new(None),
        });
        let net = transport.bind(bind, Arc::new(ServerHandler { shared: shared.clone() }))?;
        let _ = shared.repl.net.set(net.clone());
        let (tx, rx) = crossbeam::channel::unbounded();
        *shared.control.lock() = Some(tx);
        let (sh, n2) = (shared.clone(), net.clone());
        let control = std::thread::Builder::new()
            .name("pserver-control".into())
            .spawn(move || {
                let h = ServerHandler { shared: sh };
                for job in rx {
                    h.control_job(&n2, job);
                }
            })
            .map_err(|e| Error::io("spawning the server's control thread", e))?;
        if let Some(dev) = device {
            // Frames from push rings go where TCP frames go; the closure holds
            // only weak references (the inbox lives inside `shared`).
            let (weak_shared, weak_net) = (Arc::downgrade(&shared), Arc::downgrade(&net));
            let deliver: rdma::Deliver = Box::new(move |token, frame| {
                let (Some(shared), Some(net)) = (weak_shared.upgrade(), weak_net.upgrade()) else { return };
                let h = ServerHandler { shared };
                let peer = PeerId(token);
                match frame {
                    Ok(f) => {
                        h.shared.stats.rdma_frames.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        h.deliver_ordered(&net, peer, f)
                    }
                    Err(e) => {
                        tracing::warn!(peer = %net.peer_addr(peer), error = %e, "closing a worker's connection: its RDMA link failed");
                        net.disconnect(peer);
                    }
                }
            });
            match rdma::Inbox::start(dev.clone(), crate::transport::Limits::default(), deliver) {
                Ok(inbox) => {
                    tracing::info!(target: "transport", "server offers transport=rdma {}", dev.describe());
                    *shared.inbox.write() = Some(Arc::new(inbox));
                }
                Err(e) if shared.cfg.rdma == RdmaMode::Require => return Err(e),
                Err(e) => {
                    tracing::info!(target: "transport", reason = %e, "server: RDMA unavailable, offering shm/tcp")
                }
            }
        }
        let mut node = ServerNode { shared, net, helpers, heartbeat: None, control: Some(control) };
        let sched = node.net.connect(scheduler)?;
        node.shared.membership.lock().scheduler = Some(sched);
        // Tell the job the address it can reach us at (a wildcard bind is
        // advertised as the interface that reaches the scheduler).
        let reg = Control::Register { role: Role::Server, addr: node.net.advertised_addr(sched), rank: cfg_rank };
        node.net.send(sched, reg.to_frame(0))?;
        let every = crate::scheduler::heartbeat::interval();
        let (sh, net) = (node.shared.clone(), node.net.clone());
        node.heartbeat =
            Some(crate::scheduler::heartbeat::Heartbeat::start_reporting(node.net.clone(), sched, every, move || {
                Some(crate::status::Report::Server(report(&sh, net.as_ref())))
            }));
        Ok(node)
    }

    /// This server's figures (what it reports to the scheduler).
    pub fn report(&self) -> crate::status::ServerReport {
        report(&self.shared, self.net.as_ref())
    }

    /// The address workers connect to.
    pub fn addr(&self) -> String {
        self.net.local_addr()
    }

    /// Blocks until the scheduler has told this server its place in the job.
    pub fn wait_welcome(&self, timeout: Duration) -> Result<u32> {
        let mut m = self.shared.membership.lock();
        let deadline = std::time::Instant::now() + timeout;
        while m.index.is_none() && !m.stopping {
            if self.shared.changed.wait_until(&mut m, deadline).timed_out() {
                return Err(Error::Config(format!("no welcome from the scheduler within {timeout:?}")));
            }
        }
        m.index.ok_or(Error::ShuttingDown)
    }

    /// Why the node stopped on its own (not because the job ended or it
    /// left), if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.membership.lock().fatal.clone()
    }

    /// Whether the node stopped (the job ended, or it left).
    pub fn is_stopping(&self) -> bool {
        self.shared.membership.lock().stopping
    }

    /// Blocks until the scheduler ends the job.
    pub fn wait(&self) {
        let mut m = self.shared.membership.lock();
        while !m.stopping {
            self.shared.changed.wait(&mut m);
        }
    }

    /// This server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.shared.stats
    }

    /// Drops every key list workers asked this server to keep, as a restart
    /// would; workers resupply them when next used.
    pub fn forget_key_caches(&self) {
        for c in self.shared.conns.lock().values_mut() {
            c.lists.clear();
            c.bytes = 0;
        }
    }

    /// Leaves the job gracefully: asks the scheduler to hand this server's
    /// ranges to their replicas and waits (up to `timeout`) until it says
    /// this server is out. Pushes it acknowledged are on its replicas
    /// already; those it did not are sent again by the workers to the new
    /// owners. An error when the job keeps no replicas (the ranges would be
    /// lost) or the scheduler does not answer.
    pub fn leave(&self, timeout: Duration) -> Result<()> {
        let (sched, rank) = {
            let m = self.shared.membership.lock();
            (m.scheduler.ok_or(Error::ShuttingDown)?, m.index.ok_or(Error::ShuttingDown)?)
        };
        self.net.send(sched, Control::Leave { rank }.to_frame(LEAVE_ID))?;
        let deadline = std::time::Instant::now() + timeout;
        let mut m = self.shared.membership.lock();
        while !m.stopping {
            if let Some(e) = m.refusal.take() {
                return Err(Error::Remote { peer: "scheduler".into(), message: e });
            }
            if self.shared.changed.wait_until(&mut m, deadline).timed_out() {
                return Err(Error::Config(format!("the scheduler did not let this server leave within {timeout:?}")));
            }
        }
        Ok(())
    }

    /// Stops serving now.
    pub fn stop(&self) {
        self.shared.membership.lock().stopping = true;
        self.shared.changed.notify_all();
    }
}

impl Drop for ServerNode {
    fn drop(&mut self) {
        self.stop();
        self.heartbeat.take();
        self.shared.control.lock().take();
        self.net.shutdown();
        // Joins the inbox thread and releases the links' queue pairs.
        self.shared.inbox.write().take();
        for l in &self.shared.lanes {
            l.stop();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
        if let Some(c) = self.control.take()
            && c.thread().id() != std::thread::current().id()
        {
            let _ = c.join();
        }
    }
}

/// The figures of a server: counters, memory, and per table the ranges it
/// owns and the progress of each worker there (read from the shards'
/// headers, lock-free).
fn report(sh: &Shared, net: &dyn Messenger) -> crate::status::ServerReport {
    use std::sync::atomic::Ordering::{Acquire, Relaxed};
    let (rank, epoch, workers) = {
        let m = sh.membership.lock();
        (m.index, m.ring.as_ref().map_or(0, |r| r.epoch()), m.workers as usize)
    };
    let me = rank.unwrap_or(u32::MAX);
    let mut tables: Vec<crate::status::TableReport> = sh
        .tables
        .read()
        .values()
        .map(|t| {
            let owned: Vec<KeyRange> =
                (0..t.map.len()).map(|i| t.map.range(i)).filter(|(_, o)| *o == me).map(|(r, _)| r).collect();
            let mut clocks = vec![u64::MAX; workers];
            let mut seen = false;
            for r in &owned {
                let Some(h) =
                    r.end.checked_sub(1).and_then(|last| t.shard(r.start, last)).and_then(|s| t.headers.get(&s.id))
                else {
                    continue;
                };
                seen = true;
                let words = h.words();
                for (w, c) in clocks.iter_mut().enumerate() {
                    let p = words.get(crate::store::shard::HEADER_PROGRESS + w).map_or(0, |x| x.load(Acquire));
                    *c = (*c).min(p);
                }
            }
            if !seen {
                clocks.fill(0);
            }
            crate::status::TableReport {
                id: t.spec.id,
                keys: t.spec.keys,
                dim: t.spec.dim,
                storage: match t.spec.storage {
                    crate::table::Storage::Dense => "dense".into(),
                    crate::table::Storage::Sparse => "sparse".into(),
                },
                consistency: match t.spec.consistency {
                    crate::table::Consistency::Sequential => "sequential".into(),
                    crate::table::Consistency::BoundedDelay(tau) => format!("bounded-delay({tau})"),
                    crate::table::Consistency::Eventual => "eventual".into(),
                },
                ranges: owned.iter().map(|r| (r.start, r.end)).collect(),
                clocks,
            }
        })
        .collect();
    tables.sort_by_key(|t| t.id);
    let s = &sh.stats;
    crate::status::ServerReport {
        rank,
        addr: net.local_addr(),
        epoch,
        pushes: s.pushes.load(Relaxed),
        pulls: s.pulls.load(Relaxed),
        push_pulls: s.push_pulls.load(Relaxed),
        keys_pushed: s.keys_pushed.load(Relaxed),
        keys_pulled: s.keys_pulled.load(Relaxed),
        bytes_received: s.bytes_received.load(Relaxed),
        bytes_sent: s.bytes_sent.load(Relaxed),
        refused: s.refused.load(Relaxed),
        memory_used: *sh.memory.lock(),
        memory_limit: sh.cfg.max_memory,
        transport: net.stats(),
        tables,
    }
}

impl Handler for ServerHandler {
    fn on_disconnect(&self, _net: &Arc<dyn Messenger>, peer: PeerId) {
        if let Some(inbox) = self.shared.inbox.read().as_ref() {
            inbox.close(peer.0);
        }
        if let Some(c) = self.shared.conns.lock().remove(&peer) {
            if c.blocked {
                self.shared.blocked.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
            if c.seq.is_some() {
                self.shared.sequenced.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
        }
        let mut m = self.shared.membership.lock();
        m.peers.retain(|_, p| *p != peer);
        if m.scheduler == Some(peer) && !m.stopping {
            tracing::warn!("lost the connection to the scheduler; stopping");
            m.stopping = true;
            drop(m);
            self.shared.changed.notify_all();
        }
    }

    fn on_frame(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) {
        let (id, frame_kind) = (frame.id, frame.kind);
        let result = match frame.kind {
            kind::CONTROL => self.on_control(net, from, &frame),
            kind::PUSH | kind::PULL | kind::PUSH_PULL | kind::CLOCK | kind::RING => {
                self.deliver_ordered(net, from, frame);
                Ok(())
            }
            kind::KEYS => self.on_keys(net, from, &frame),
            kind::REPLICATE => self.on_replicate(net, from, frame),
            kind::REPLICATED => self.on_replicated(net, from, &frame),
            other => Err(Error::protocol(net.peer_addr(from), format!("unknown frame kind {other}"))),
        };
        if let Err(e) = result {
            tracing::debug!(peer = %net.peer_addr(from), error = %e, "refused a request");
            self.shared.stats.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Servers talk to each other only to replicate: a refusal is
            // logged, never answered (two servers would refuse each other's
            // refusals forever).
            if !matches!(frame_kind, kind::REPLICATE | kind::REPLICATED | kind::REFUSED) {
                let _ = net.send(from, proto::refused(id, &e.to_string()));
            } else {
                tracing::warn!(peer = %net.peer_addr(from), error = %e, "dropped a replication frame");
            }
        }
    }
}

impl ServerHandler {
    /// An ordered frame from `from`, applied now or, on a sequenced
    /// connection, in its turn. Refusals are replied here.
    fn deliver_ordered(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) {
        if self.shared.sequenced.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return self.ordered_or_refuse(net, from, frame);
        }
        {
            let mut conns = self.shared.conns.lock();
            let seq = conns.get_mut(&from).and_then(|c| c.seq.as_mut());
            if let Some(sq) = seq {
                let Some(n) = seq_of(&frame) else {
                    drop(conns);
                    let e = Error::protocol(net.peer_addr(from), "an ordered frame without a data header");
                    let _ = net.send(from, proto::refused(frame.id, &e.to_string()));
                    return;
                };
                if n < sq.next || sq.held.contains_key(&n) {
                    drop(conns);
                    let e = Error::protocol(net.peer_addr(from), format!("frame sequence number {n} repeats"));
                    let _ = net.send(from, proto::refused(frame.id, &e.to_string()));
                    return;
                }
                if n != sq.next || sq.busy {
                    if sq.held.len() >= MAX_PARKED_FRAMES {
                        drop(conns);
                        tracing::warn!(peer = %net.peer_addr(from), "a worker's frame {n} never came; closing");
                        net.disconnect(from);
                        return;
                    }
                    sq.held.insert(n, frame);
                    return;
                }
                sq.busy = true;
                sq.next += 1;
            } else {
                drop(conns);
                return self.ordered_or_refuse(net, from, frame);
            }
        }
        // This thread applies the connection's frames in order until the
        // next one has not arrived yet.
        self.ordered_or_refuse(net, from, frame);
        self.drain_held(net, from);
    }

    /// The thread that holds a sequenced connection's `busy` applies the
    /// held frames that are next, in order, then lets go.
    fn drain_held(&self, net: &Arc<dyn Messenger>, from: PeerId) {
        loop {
            let frame = {
                let mut conns = self.shared.conns.lock();
                let Some(sq) = conns.get_mut(&from).and_then(|c| c.seq.as_mut()) else { return };
                match sq.held.remove(&sq.next) {
                    Some(f) => {
                        sq.next += 1;
                        f
                    }
                    None => {
                        sq.busy = false;
                        return;
                    }
                }
            };
            self.ordered_or_refuse(net, from, frame);
        }
    }

    fn ordered_or_refuse(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) {
        let id = frame.id;
        if let Err(e) = self.on_ordered(net, from, frame) {
            tracing::debug!(peer = %net.peer_addr(from), error = %e, "refused a request");
            self.shared.stats.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = net.send(from, proto::refused(id, &e.to_string()));
        }
    }

    fn on_control(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: &Frame) -> Result<()> {
        let peer = net.peer_addr(from);
        match Control::from_frame(frame, &peer)? {
            Control::Welcome {
                role: Role::Server,
                rank,
                servers,
                workers,
                vnodes,
                epoch,
                replicas,
                checkpoint,
                ..
            } => self.to_control(ControlJob::Welcome {
                from,
                id: frame.id,
                servers,
                rank,
                workers,
                vnodes,
                epoch,
                replicas,
                checkpoint,
            }),
            Control::Snapshot { clock, dir } => self.to_control(ControlJob::Snapshot { from, clock, dir }),
            Control::Membership { epoch, servers } => {
                // Relaxed: a hint for a waiting handover (see `apply_membership`).
                self.shared.announced.fetch_max(epoch, std::sync::atomic::Ordering::Relaxed);
                self.to_control(ControlJob::Membership { from, epoch, servers })
            }
            Control::ShardMap { table } => {
                let shards = self.shared.tables.read().get(&table).map(|t| t.shm.clone());
                let reply = match shards {
                    Some(shards) => Control::ShardMapReply { shards },
                    None => Control::Error(Error::UnknownTable(table).to_string()),
                };
                net.send(from, reply.to_frame(frame.id))
            }
            Control::OpenRing { bytes } => {
                let reply = match &self.shared.shm {
                    None => Control::Error("this server offers no shared memory".into()),
                    Some(ns) => {
                        let bytes = (bytes as usize).clamp(1 << 16, 1 << 30);
                        match crate::transport::shm::Ring::create(ns, bytes) {
                            Ok(ring) => {
                                let path = ring.path().map(|p| p.display().to_string()).unwrap_or_default();
                                self.shared.conns.lock().entry(from).or_default().ring = Some(Arc::new(ring));
                                Control::RingReady { path }
                            }
                            Err(e) => Control::Error(format!("cannot create a push ring: {e}")),
                        }
                    }
                };
                net.send(from, reply.to_frame(frame.id))
            }
            Control::RdmaConnect { conn, next_seq } => {
                let inbox = self.shared.inbox.read().clone();
                let linked = self.shared.conns.lock().get(&from).is_some_and(|c| c.seq.is_some());
                let reply = match inbox {
                    // Its frames are sequenced already: a second sequencer
                    // would drop the frames the first one holds.
                    _ if linked => Control::Error("this connection has an RDMA link already".into()),
                    None => Control::Error("this server offers no RDMA".into()),
                    Some(inbox) => match ConnInfo::from_bytes(&conn) {
                        Err(m) => Control::Error(m),
                        Ok(remote) => match inbox.accept(from.0, &remote, rdma_ring_bytes()) {
                            Ok(acc) => {
                                // Sequenced from now on: everything the worker
                                // sent before this arrived before it.
                                let mut conns = self.shared.conns.lock();
                                let c = conns.entry(from).or_default();
                                if c.seq.is_none() {
                                    self.shared.sequenced.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                                }
                                c.seq = Some(Sequencer { next: next_seq, busy: false, held: Default::default() });
                                drop(conns);
                                tracing::debug!(peer = %peer, "accepted an RDMA link");
                                Control::RdmaAccept {
                                    conn: acc.info.to_bytes(),
                                    ring: acc.ring,
                                    ring_ctl: acc.ring_ctl,
                                }
                            }
                            Err(e) => Control::Error(format!("cannot accept an RDMA link: {e}")),
                        },
                    },
                };
                net.send(from, reply.to_frame(frame.id))
            }
            Control::RdmaShardMap { table } => {
                let has_link = self.shared.conns.lock().get(&from).is_some_and(|c| c.seq.is_some());
                let shards = self.shared.tables.read().get(&table).map(|t| t.rdma.clone());
                let reply = match shards {
                    // Addresses and rkeys only to a worker with a link on this connection.
                    _ if !has_link => Control::Error("no RDMA link on this connection".into()),
                    Some(shards) => Control::RdmaShardMapReply { shards },
                    None => Control::Error(Error::UnknownTable(table).to_string()),
                };
                net.send(from, reply.to_frame(frame.id))
            }
            Control::WorkerLeft { worker } => {
                tracing::debug!(worker, "worker left the job");
                for l in &self.shared.lanes {
                    l.submit(Job::Clock { worker, clock: u64::MAX }, true);
                }
                Ok(())
            }
            Control::WorkerLost { worker } => {
                tracing::debug!(worker, "worker lost; waiting for a new incarnation");
                for l in &self.shared.lanes {
                    l.submit(Job::WorkerLost { worker }, true);
                }
                Ok(())
            }
            Control::JobClock { worker } => {
                let workers = self.shared.membership.lock().workers;
                if worker >= workers {
                    return net
                        .send(from, Control::Error(format!("worker rank {worker} of {workers}")).to_frame(frame.id));
                }
                let clock = {
                    let mut clocks = self.shared.worker_clocks.lock();
                    let m = clocks.iter().copied().filter(|&c| c != u32::MAX).max().unwrap_or(0);
                    if clocks.len() <= worker as usize {
                        clocks.resize(worker as usize + 1, u32::MAX);
                    }
                    clocks[worker as usize] = m;
                    m
                };
                // The seat (a left worker until now) holds reads from `m` on;
                // the lanes take it before any request that comes after.
                for l in &self.shared.lanes {
                    l.submit(Job::ResetClock { worker, clock: u64::from(clock) }, true);
                }
                tracing::info!(worker, clock, "a worker takes a free seat at the job's clock");
                net.send(from, Control::WorkerClockReply { clock }.to_frame(frame.id))
            }
            Control::WorkerClock { worker } => {
                // u32::MAX: no clock from that worker here (a server that
                // joined after it died), which the asker ignores.
                let clock = self.shared.worker_clocks.lock().get(worker as usize).copied().unwrap_or(u32::MAX);
                net.send(from, Control::WorkerClockReply { clock }.to_frame(frame.id))
            }
            Control::Shutdown => {
                self.shared.membership.lock().stopping = true;
                self.shared.changed.notify_all();
                Ok(())
            }
            Control::Error(m) if frame.id == LEAVE_ID => {
                self.shared.membership.lock().refusal = Some(m);
                self.shared.changed.notify_all();
                Ok(())
            }
            Control::CreateTable(spec) => self.to_control(ControlJob::CreateTable { from, id: frame.id, spec }),
            // A joining server's answer to a table its owner sent it.
            Control::TableReady { .. } if frame.id == PEER_TABLE_ID => Ok(()),
            Control::Error(m) if frame.id == PEER_TABLE_ID => {
                // The joiner stops on it, which abandons its join.
                tracing::error!(peer, error = %m, "a joining server could not create a table");
                Ok(())
            }
            other => Err(Error::protocol(peer, format!("unexpected control message {other:?}"))),
        }
    }

    fn to_control(&self, job: ControlJob) -> Result<()> {
        match self.shared.control.lock().as_ref() {
            Some(tx) => tx.send(job).map_err(|_| Error::ShuttingDown),
            None => Err(Error::ShuttingDown),
        }
    }

    /// The control thread: membership changes and table creation, in order.
    fn control_job(&self, net: &Arc<dyn Messenger>, job: ControlJob) {
        match job {
            ControlJob::Welcome { from, id, servers, rank, workers, vnodes, epoch, replicas, checkpoint } => {
                if let Some((dir, clock)) = checkpoint.and_then(|c| c.restore) {
                    let dir = std::path::PathBuf::from(dir);
                    // Every worker starts at the checkpoint's clock: what a
                    // worker restarted (or joining) before its first clock
                    // frame here resumes at.
                    *self.shared.worker_clocks.lock() = vec![clock; workers as usize];
                    match checkpoint::open(&dir) {
                        Ok(m) => *self.shared.restore.lock() = Some((dir, m, clock)),
                        Err(e) => {
                            // Never serve a fresh model in place of the
                            // checkpoint the job was started to resume.
                            tracing::error!(error = %e, "cannot restore the checkpoint; stopping");
                            self.shared.membership.lock().stopping = true;
                            self.shared.changed.notify_all();
                            return;
                        }
                    }
                }
                {
                    let mut m = self.shared.membership.lock();
                    m.index = Some(rank);
                    m.workers = workers;
                    m.ring = Some(Ring::new(servers, vnodes, epoch).with_replicas(replicas));
                }
                self.shared.repl.me.store(rank, std::sync::atomic::Ordering::Relaxed);
                self.shared.repl.epoch.store(epoch, std::sync::atomic::Ordering::Release);
                self.shared.early.lock().0 = epoch;
                self.shared.changed.notify_all();
                tracing::info!(rank, workers, replicas, "server joined the job");
                let _ = net.send(from, Control::Ready { rank }.to_frame(id));
            }
            ControlJob::Membership { from, epoch, servers } => {
                // A failure is reported, never acknowledged: the scheduler
                // must not hand ranges to (or route workers by) a layout
                // this server could not build.
                let reply = match self.apply_membership(net, epoch, servers) {
                    Ok(()) => Control::MembershipAck { epoch },
                    Err(e) => {
                        tracing::error!(epoch, error = %e, "could not apply a membership change");
                        Control::MembershipFailed { epoch, error: e.to_string() }
                    }
                };
                let _ = net.send(from, reply.to_frame(0));
            }
            ControlJob::Snapshot { from, clock, dir } => {
                let reply = match self.snapshot(std::path::Path::new(&dir)) {
                    Ok((files, tables)) => Control::SnapshotDone { clock, files, tables },
                    Err(e) => {
                        tracing::error!(clock, error = %e, "could not write this server's part of a checkpoint");
                        Control::Error(format!("checkpoint at clock {clock}: {e}"))
                    }
                };
                let _ = net.send(from, reply.to_frame(0));
            }
            ControlJob::CreateTable { from, id, spec } => {
                let reply = match self.create_table(net, spec) {
                    Ok(table) => Control::TableReady { table },
                    Err(e) if id == PEER_TABLE_ID => {
                        // A joining server that cannot hold a table its
                        // owners fill would complete a join without it: it
                        // stops instead, and the scheduler abandons the join.
                        tracing::error!(error = %e, "cannot create a table of the job this server joins; stopping");
                        {
                            let mut m = self.shared.membership.lock();
                            m.fatal.get_or_insert_with(|| format!("cannot hold a table of the job it joins: {e}"));
                            m.stopping = true;
                        }
                        self.shared.changed.notify_all();
                        Control::Error(e.to_string())
                    }
                    Err(e) => Control::Error(e.to_string()),
                };
                let _ = net.send(from, reply.to_frame(id));
            }
        }
    }

    /// A connection to server `s` (opened once, kept).
    fn peer(&self, net: &Arc<dyn Messenger>, ring: &Ring, s: u32) -> Result<PeerId> {
        if let Some(&p) = self.shared.membership.lock().peers.get(&s) {
            return Ok(p);
        }
        let info = ring.servers().get(s as usize).ok_or_else(|| Error::Config(format!("no server {s}")))?;
        let p = net.connect(&info.addr)?;
        self.shared.membership.lock().peers.insert(s, p);
        Ok(p)
    }

    fn create_table(&self, net: &Arc<dyn Messenger>, spec: TableSpec) -> Result<TableId> {
        spec.validate()?;
        if let Some(t) = self.shared.tables.read().get(&spec.id) {
            return if t.spec == spec {
                Ok(spec.id)
            } else {
                Err(Error::TableMismatch {
                    table: spec.id,
                    detail: format!("existing {:?}, requested {spec:?}", t.spec),
                })
            };
        }
        let (index, ring) = {
            let m = self.shared.membership.lock();
            match (m.index, &m.ring) {
                (Some(i), Some(r)) => (i, r.clone()),
                _ => return Err(Error::Config("server has not joined a job yet".into())),
            }
        };
        let table = self.layout(net, &spec, &ring, index, None)?;
        self.restore_table(&table)?;
        tracing::debug!(table = spec.id, shards = table.shards.len(), "table created");
        // Published after the shards are in their lanes.
        self.shared.tables.write().insert(spec.id, Arc::new(table));
        self.replay_early(net, None);
        Ok(spec.id)
    }

    /// Builds (or rebuilds, after a membership change) a table's shards on
    /// this server for `ring`: a shard for every range it owns or copies
    /// that no shard covers yet, each shard told what it is for, and a full
    /// copy of every owned range sent to replicas that did not have it.
    /// Copies sent to joining servers are tracked as replication batches,
    /// which membership changes wait for (see `apply_membership`).
    fn layout(
        &self,
        net: &Arc<dyn Messenger>,
        spec: &TableSpec,
        ring: &Ring,
        me: u32,
        old: Option<&Table>,
    ) -> Result<Table> {
        let rule = self.shared.cfg.rules.resolve(&spec.updater)?;
        let map = ring.ranges(spec.keys);
        let epoch = ring.epoch();
        let layout = crate::store::SlotLayout::new(spec.dim)
            .ok_or_else(|| Error::InvalidSpec(format!("table {}: dim {}", spec.id, spec.dim)))?;
        let mut shards: Vec<ShardRef> = old.map(|t| t.shards.clone()).unwrap_or_default();
        // New shards first (their memory is checked before anything changes):
        // one for every gap that the shards built so far leave in a range
        // this server owns or copies.
        let mut new: Vec<KeyRange> = Vec::new();
        for i in 0..map.len() {
            let (r, owner) = map.range(i);
            if owner != me && !map.targets(i).any(|s| s == me) {
                continue;
            }
            let mut at = r.start;
            let mut inside: Vec<KeyRange> =
                shards.iter().filter(|s| s.range.start < r.end && r.start < s.range.end).map(|s| s.range).collect();
            inside.sort_by_key(|x| x.start);
            for x in inside {
                if x.start > at {
                    new.push(KeyRange::new(at, x.start));
                }
                at = at.max(x.end);
            }
            if at < r.end {
                new.push(KeyRange::new(at, r.end));
            }
        }
        if spec.storage == crate::table::Storage::Dense && !new.is_empty() {
            let keys: u64 = new.iter().map(|r| r.len()).sum();
            let per_key = (layout.bytes() + layout.dim() * 4 * rule.state_per_value()) as u64;
            let need = keys.saturating_mul(per_key);
            let mut used = self.shared.memory.lock();
            if let Some(max) = self.shared.cfg.max_memory
                && used.saturating_add(need) > max
            {
                return Err(Error::OutOfMemory(format!(
                    "table {} needs {need} bytes on this server, {} of the {max} byte budget (--max-memory) are in use",
                    spec.id, *used
                )));
            }
            *used += need;
        }
        let workers = self.shared.membership.lock().workers;
        let mut built: Vec<(ShardRef, Shard)> = Vec::with_capacity(new.len());
        for range in new {
            let cfg = ShardConfig {
                table: spec.id,
                range,
                dim: spec.dim,
                storage: spec.storage,
                init: spec.init,
                workers: workers as usize,
                files: self.shared.shm.clone(),
                // A clock's state is not complete without every worker's
                // pushes: sequential reads, and the steps of aggregating
                // rules, wait for a lost worker's new incarnation.
                waits_for_lost: spec.consistency == crate::table::Consistency::Sequential || rule.aggregates(),
            };
            let shard = Shard::new(cfg, rule.clone())?;
            let id = {
                let mut next = self.shared.next_shard.lock();
                *next += 1;
                *next - 1
            };
            built.push((ShardRef { range, lane: id as usize % self.shared.lanes.len(), id }, shard));
        }
        shards.extend(built.iter().map(|(r, _)| *r));
        shards.sort_by_key(|s| s.range.start);
        // What each shard is for: owned parts and their replicas.
        let mut active = vec![false; shards.len()];
        let mut owned: Vec<Vec<KeyRange>> = vec![Vec::new(); shards.len()];
        let mut targets: Vec<Vec<Target>> = vec![Vec::new(); shards.len()];
        let mut snapshots: Vec<(usize, KeyRange, u32, bool)> = Vec::new();
        let mut learners: Vec<u32> = Vec::new();
        for i in 0..map.len() {
            let (r, owner) = map.range(i);
            if owner != me {
                continue;
            }
            let reps: Vec<u32> = map.targets(i).collect();
            for s in map.learners(i) {
                if !learners.contains(&s) {
                    learners.push(s);
                }
            }
            let mut peers = Vec::with_capacity(reps.len());
            for &s in &reps {
                match self.peer(net, ring, s) {
                    Ok(p) => peers.push((s, p)),
                    Err(e) => tracing::warn!(server = s, error = %e, "cannot reach a replica"),
                }
            }
            for (at, sref) in shards.iter().enumerate() {
                if sref.range.end <= r.start || r.end <= sref.range.start {
                    continue;
                }
                let part = KeyRange::new(sref.range.start.max(r.start), sref.range.end.min(r.end));
                active[at] = true;
                owned[at].push(part);
                // Who holds this part's current state already: the copies
                // this server kept up to date when it owned the part before;
                // or, when it learned the part as a joining server, the
                // owner it learned from (everything that owner applied
                // reached this server before the handover). Everyone else
                // gets a copy, so a server that takes over from a dead owner
                // copies to all its replicas: theirs may lack the dead
                // owner's last state.
                let had: Vec<u32> = old
                    .and_then(|t| {
                        let j = t.map.find(part.start)?;
                        let (old_range, old_owner) = t.map.range(j);
                        if !old_range.contains(part.end - 1) {
                            return None;
                        }
                        if old_owner == me {
                            Some(t.map.targets(j).collect())
                        } else if t.map.learners(j).any(|s| s == me) {
                            Some(vec![old_owner])
                        } else {
                            None
                        }
                    })
                    .unwrap_or_default();
                for &(s, _) in &peers {
                    if (old.is_some() || map.learners(i).any(|l| l == s)) && !had.contains(&s) {
                        snapshots.push((at, part, s, map.learners(i).any(|l| l == s)));
                    }
                }
                targets[at].push(Target { range: part, peers: peers.clone() });
            }
        }
        let mut shm = Vec::new();
        let mut headers: HashMap<u32, Arc<crate::store::Region>> = old.map(|t| t.headers.clone()).unwrap_or_default();
        let mut rdma_shards: Vec<proto::RdmaShard> = old.map(|t| t.rdma.clone()).unwrap_or_default();
        let mut registered: Vec<Arc<rdma::Registration>> = old.map(|t| t._registered.clone()).unwrap_or_default();
        let inbox = self.shared.inbox.read().clone();
        let mut fresh: HashMap<u32, Shard> = built.into_iter().map(|(r, s)| (r.id, s)).collect();
        for (at, sref) in shards.iter().enumerate() {
            let (act, tg) = (active[at], std::mem::take(&mut targets[at]));
            let mut own = std::mem::take(&mut owned[at]);
            own.sort_by_key(|r| r.start);
            let bounds: Vec<u64> = (0..map.len())
                .map(|i| map.range(i).0.start)
                .filter(|&b| sref.range.start < b && b < sref.range.end)
                .collect();
            match fresh.remove(&sref.id) {
                Some(shard) => {
                    headers.insert(sref.id, shard.regions().0.clone());
                    if spec.storage == crate::table::Storage::Dense {
                        let (hdr, chunks) = shard.regions();
                        if let (Some(h), Some(c)) = (hdr.path(), chunks.first().and_then(|c| c.path())) {
                            shm.push((sref.range, h.display().to_string(), c.display().to_string()));
                        }
                        // Remote READ only: slots and the header's progress words.
                        if let (Some(inbox), Some(c)) = (&inbox, chunks.first()) {
                            let h = inbox.rdma().register(hdr.clone(), Access::READ)?;
                            let sl = inbox.rdma().register(c.clone(), Access::READ)?;
                            rdma_shards.push(proto::RdmaShard {
                                start: sref.range.start,
                                end: sref.range.end,
                                header: h.desc(),
                                slots: sl.desc(),
                            });
                            registered.extend([Arc::new(h), Arc::new(sl)]);
                        }
                    }
                    let job = Job::Install {
                        id: sref.id,
                        shard: Box::new(shard),
                        active: act,
                        targets: tg,
                        epoch,
                        owned: own,
                        bounds,
                    };
                    self.shared.lanes[sref.lane].submit(job, true);
                }
                None => {
                    let job = Job::Roles { id: sref.id, active: act, targets: tg, epoch, owned: own, bounds };
                    self.shared.lanes[sref.lane].submit(job, true)
                }
            }
        }
        // A joining server learns the table from the owners that fill it,
        // ahead of the state on the same connection.
        for s in learners {
            let peer = self.shared.membership.lock().peers.get(&s).copied();
            if let Some(p) = peer
                && let Err(e) = net.send(p, Control::CreateTable(spec.clone()).to_frame(PEER_TABLE_ID))
            {
                tracing::warn!(server = s, error = %e, "cannot send a table to a joining server");
            }
        }
        for (at, range, s, tracked) in snapshots {
            let sref = shards[at];
            let peer = self.shared.membership.lock().peers.get(&s).copied();
            if let Some(p) = peer {
                let job = Job::Snapshot { id: sref.id, range, to: (s, p), tracked };
                self.shared.lanes[sref.lane].submit(job, false);
            }
        }
        let mut shm_all: Vec<proto::ShmShard> = old.map(|t| t.shm.clone()).unwrap_or_default();
        shm_all.extend(shm.into_iter().map(|(r, header, slots)| proto::ShmShard {
            start: r.start,
            end: r.end,
            header,
            slots,
        }));
        Ok(Table {
            spec: spec.clone(),
            map,
            epoch,
            shm: shm_all,
            rdma: rdma_shards,
            _registered: registered,
            shards,
            headers,
        })
    }

    /// Fills a new table's shards (owned ranges and copies) from the
    /// checkpoint the job restores, if it holds the table.
    fn restore_table(&self, table: &Table) -> Result<()> {
        let guard = self.shared.restore.lock();
        let Some((dir, m, clock)) = guard.as_ref() else { return Ok(()) };
        let Some(saved) = m.tables.iter().find(|t| t.id == table.spec.id) else { return Ok(()) };
        if *saved != table.spec {
            return Err(Error::TableMismatch {
                table: table.spec.id,
                detail: format!(
                    "the checkpoint in {} holds {saved:?}, the job asks for {:?}",
                    dir.display(),
                    table.spec
                ),
            });
        }
        let (tx, rx) = crossbeam::channel::unbounded();
        let mut pending = 0;
        for sref in &table.shards {
            let files = m
                .files
                .iter()
                .filter(|f| f.table == table.spec.id && f.start < sref.range.end && sref.range.start < f.end);
            let mut frames = Vec::new();
            for f in files {
                frames.extend(checkpoint::read_range(dir, f)?);
            }
            let job = Job::Restore { id: sref.id, frames, clock: u64::from(*clock), reply: tx.clone() };
            self.shared.lanes[sref.lane].submit(job, false);
            pending += 1;
        }
        for _ in 0..pending {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(Error::Config(format!(
                        "restoring table {} from {}: {e}",
                        table.spec.id,
                        dir.display()
                    )));
                }
                Err(_) => return Err(Error::ShuttingDown),
            }
        }
        tracing::info!(table = table.spec.id, clock, "table restored from the checkpoint");
        Ok(())
    }

    /// Writes the ranges this server owns into checkpoint directory `dir`:
    /// the files, and the specs of the tables they hold.
    fn snapshot(&self, dir: &std::path::Path) -> Result<(Vec<checkpoint::FileEntry>, Vec<TableSpec>)> {
        let me = self.shared.membership.lock().index.ok_or(Error::ShuttingDown)?;
        let tables: Vec<Arc<Table>> = self.shared.tables.read().values().cloned().collect();
        let (mut files, mut specs) = (Vec::new(), Vec::new());
        for t in tables {
            specs.push(t.spec.clone());
            for (range, owner) in t.map.iter() {
                if owner != me {
                    continue;
                }
                for (sref, part) in t.overlapping(range.start, range.end) {
                    let (tx, rx) = crossbeam::channel::bounded(1);
                    self.shared.lanes[sref.lane].submit(Job::Checkpoint { id: sref.id, range: part, reply: tx }, false);
                    let frames = rx.recv().map_err(|_| Error::ShuttingDown)?;
                    files.push(checkpoint::write_range(dir, t.spec.id, part.start, part.end, &frames)?);
                }
            }
        }
        Ok((files, specs))
    }

    /// A new epoch: ranges of dead servers pass to their first replica here,
    /// lost replicas are replaced (and sent a copy), batches stop waiting
    /// for servers that are gone.
    fn apply_membership(&self, net: &Arc<dyn Messenger>, epoch: u32, servers: Vec<proto::ServerInfo>) -> Result<()> {
        let (me, ring) = {
            let mut m = self.shared.membership.lock();
            let (Some(me), Some(old)) = (m.index, &m.ring) else {
                return Err(Error::Config("a membership change before the welcome".into()));
            };
            if epoch <= old.epoch() {
                return Ok(());
            }
            let ring = Ring::new(servers, old.vnodes(), epoch).with_replicas(old.replicas());
            m.ring = Some(ring.clone());
            let dead: Vec<u32> = (0..ring.servers().len() as u32).filter(|&s| !ring.is_alive(s)).collect();
            m.peers.retain(|s, _| !dead.contains(s));
            (me, ring)
        };
        tracing::info!(epoch, live = ring.live(), "membership changed");
        // What this server replicates from now on carries the new epoch
        // (its copies to new replicas included), so receivers still in the
        // old epoch hold it until they catch up.
        self.shared.repl.epoch.store(epoch, std::sync::atomic::Ordering::Release);
        let tables: Vec<Arc<Table>> = self.shared.tables.read().values().cloned().collect();
        for t in tables {
            let table = self.layout(net, &t.spec, &ring, me, Some(&t))?;
            self.shared.tables.write().insert(t.spec.id, Arc::new(table));
        }
        self.shared.repl.forget(|s| !ring.is_alive(s));
        // The new epoch's tables are in place: replicated state that arrived
        // ahead of them is applied now.
        self.replay_early(net, Some(epoch));
        // Handover: everything this server applied under its old roles (and
        // the copies it sent joining servers) must be on the servers holding
        // those ranges now before it acknowledges; only then are workers
        // told, so a new owner never serves a range before it holds all of
        // it. A fence through every lane bounds the batches made so far.
        let mut fences = Vec::with_capacity(self.shared.lanes.len());
        for l in &self.shared.lanes {
            let (tx, rx) = crossbeam::channel::bounded(1);
            l.submit(Job::Fence { reply: tx }, true);
            fences.push(rx);
        }
        for f in fences {
            f.recv().map_err(|_| Error::ShuttingDown)?;
        }
        // The old roles' last changes went to their replicas, dead ones
        // included: nobody waits for those.
        self.shared.repl.forget(|s| !ring.is_alive(s));
        let last = self.shared.repl.last_batch();
        let t0 = std::time::Instant::now();
        // A newer membership (a server failed meanwhile) ends the wait: it
        // forgets the servers that are gone, whose acknowledgements may
        // never come, and settles again.
        let newer = || self.shared.announced.load(std::sync::atomic::Ordering::Relaxed) > epoch;
        if !self.shared.repl.settle(last, HANDOVER_TIMEOUT, newer) {
            if newer() {
                tracing::info!(target: "membership", epoch, "a newer membership came before the handover settled");
            } else {
                tracing::error!(epoch, "replicated state not acknowledged within {HANDOVER_TIMEOUT:?}; going on");
            }
        }
        tracing::debug!(epoch, waited_ms = t0.elapsed().as_millis() as u64, "handover settled");
        Ok(())
    }

    /// Applies the replicated state held back for a newer epoch or for a
    /// table not created yet (what still does not fit stays held); `epoch`
    /// is this server's new epoch, if it changed.
    fn replay_early(&self, net: &Arc<dyn Messenger>, epoch: Option<u32>) {
        // Under the lock throughout: a frame arriving meanwhile waits, and
        // so is queued to the lanes after the older ones replayed here.
        let mut early = self.shared.early.lock();
        if let Some(epoch) = epoch {
            early.0 = epoch;
        }
        let held = std::mem::take(&mut early.1);
        tracing::trace!(frames = held.len(), "replaying held replicated state");
        for (from, f) in held {
            if let Err(e) = self.replicate_locked(net, from, f, &mut early) {
                tracing::debug!(error = %e, "dropped early replicated state");
            }
        }
    }

    /// Replica side of replication: the owner's state of some keys (one or
    /// more deltas per frame), acknowledged once every delta is applied.
    fn on_replicate(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) -> Result<()> {
        let mut early = self.shared.early.lock();
        self.replicate_locked(net, from, frame, &mut early)
    }

    /// [`Self::on_replicate`] under the lock of the held-back frames: the
    /// decision to hold a frame back and the queueing of one applied now
    /// happen under it, so one sender's frames reach the lanes in order
    /// (a state applied after a newer one would overwrite it).
    fn replicate_locked(
        &self,
        net: &Arc<dyn Messenger>,
        from: PeerId,
        frame: Frame,
        early: &mut (u32, Vec<(PeerId, Frame)>),
    ) -> Result<()> {
        let bad = |d: String| Error::protocol(net.peer_addr(from), d);
        let deltas = lane::unpack(&frame).map_err(bad)?;
        let epoch = deltas.iter().map(|d| d.header.epoch).max().unwrap_or(0);
        let tables = {
            let tables = self.shared.tables.read().clone();
            // State for a table not here yet: an owner filling this joining
            // server sent the spec ahead of it, and its creation replays it.
            let unknown = deltas.iter().any(|d| !tables.contains_key(&d.header.table));
            // Behind a held frame of the same sender: held too, in order.
            let behind = early.1.iter().any(|(f, _)| *f == from);
            // A newer epoch's state waits for that epoch here, unless it is
            // the state of ranges whose owner is the same in both epochs
            // and that this server only copies: then nothing here depends
            // on the change. (The owner of a range a joining server learns
            // replicates it with the handover's epoch while the joiner
            // waits for that epoch, which comes only once the owner has
            // applied it and settled what it sent: holding it would stall
            // the handover.)
            let me = self.shared.membership.lock().index.unwrap_or(u32::MAX);
            let copy_only = |d: &lane::SubDelta| {
                let h = &d.header;
                tables.get(&h.table).is_some_and(|t| {
                    h.start < h.end
                        && t.owns(h.from, h.start, h.end - 1)
                        && !t.owns_any(me, h.start, h.end)
                        && t.covers(h.start, h.end)
                })
            };
            let ahead = epoch > early.0 && !deltas.iter().all(copy_only);
            if ahead || unknown || behind {
                tracing::trace!(
                    epoch,
                    mine = early.0,
                    unknown,
                    table = deltas[0].header.table,
                    batch = deltas[0].header.batch,
                    "replicated state held back"
                );
                let held: u64 = early.1.iter().map(|(_, f)| f.wire_len()).sum();
                if early.1.len() >= MAX_EARLY_FRAMES || held.saturating_add(frame.wire_len()) > MAX_EARLY_BYTES {
                    return Err(Error::LimitExceeded("replicated state far ahead of this server's epoch".into()));
                }
                early.1.push((from, frame));
                return Ok(());
            }
            tables
        };
        let mut jobs = Vec::new();
        for d in deltas {
            let h = d.header;
            let table = tables.get(&h.table).ok_or(Error::UnknownTable(h.table))?;
            if h.end <= h.start {
                return Err(bad(format!("replicated range [{}, {})", h.start, h.end)));
            }
            if !table.owns(h.from, h.start, h.end - 1) {
                // Not the owner in our epoch. A live server that owned the
                // range in an earlier epoch replicated it before letting go
                // (a range handed to a joining server): applied wherever a
                // copy is kept, so its pushes complete. A server declared
                // dead that still runs: never acknowledged, so its pushes
                // are not either.
                let alive = self.shared.membership.lock().ring.as_ref().is_some_and(|r| r.is_alive(h.from));
                // Against the epoch of the map just checked: this server
                // may be laying out a newer one.
                if !(alive && h.epoch < table.epoch) {
                    tracing::debug!(table = h.table, from = h.from, "refused replicated state from a non-owner");
                    return Ok(());
                }
            }
            let parts: Vec<(ShardRef, KeyRange)> = table.overlapping(h.start, h.end).collect();
            let covered: u64 = parts.iter().map(|(_, r)| r.len()).sum();
            if covered != h.end - h.start {
                return Err(bad(format!("no copy of all of [{}, {}) of table {} here", h.start, h.end, h.table)));
            }
            let n = parts.len();
            for (sref, only) in parts {
                jobs.push((sref, h, d.segments.clone(), (n > 1).then_some(only)));
            }
        }
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(jobs.len()));
        let bytes: usize = frame.segments.iter().map(|s| s.len()).sum();
        let inline = bytes <= INLINE_MAX_KEYS as usize * 8;
        for (sref, header, segments, only) in jobs {
            let job = Job::Delta { id: sref.id, from, header, segments, only, parts: left.clone() };
            self.shared.lanes[sref.lane].submit(job, inline);
        }
        Ok(())
    }

    /// Owner side: a replica applied a batch.
    fn on_replicated(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: &Frame) -> Result<()> {
        let batch = frame
            .meta
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| Error::protocol(net.peer_addr(from), "REPLICATED meta is malformed"))?;
        let server = self.shared.membership.lock().peers.iter().find(|(_, p)| **p == from).map(|(s, _)| *s);
        match server {
            Some(s) => self.shared.repl.acked(batch, s),
            None => tracing::debug!(batch, "acknowledgement from a server that is not a replica"),
        }
        Ok(())
    }

    /// Data and clock frames: held, in order, while the connection waits
    /// for key lists.
    fn on_ordered(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) -> Result<()> {
        use std::sync::atomic::Ordering::Acquire;
        if self.shared.blocked.load(Acquire) > 0 {
            let mut conns = self.shared.conns.lock();
            if let Some(c) = conns.get_mut(&from)
                && c.blocked
            {
                if c.parked.len() >= MAX_PARKED_FRAMES {
                    return Err(Error::LimitExceeded(format!(
                        "{MAX_PARKED_FRAMES} requests held waiting for key lists the worker does not resupply"
                    )));
                }
                c.parked.push_back(frame);
                return Ok(());
            }
        }
        match frame.kind {
            kind::CLOCK => self.on_clock(net, from, &frame),
            kind::RING => {
                let (pos, len) = crate::transport::shm::parse_doorbell(&frame.meta)
                    .ok_or_else(|| Error::protocol(net.peer_addr(from), "malformed doorbell"))?;
                let ring = self.shared.conns.lock().get(&from).and_then(|c| c.ring.clone());
                let ring = ring.ok_or_else(|| Error::protocol(net.peer_addr(from), "doorbell without a ring"))?;
                let inner = ring.read(pos, len, &crate::transport::Limits::default())?;
                if !matches!(inner.kind, kind::PUSH | kind::PUSH_PULL) {
                    return Err(Error::protocol(net.peer_addr(from), "only pushes travel through the ring"));
                }
                self.on_data(net, from, inner)
            }
            _ => self.on_data(net, from, frame),
        }
    }

    /// Key lists resupplied by a worker; releases its held requests.
    fn on_keys(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: &Frame) -> Result<()> {
        use std::sync::atomic::Ordering::AcqRel;
        let bad = |d: &str| Error::protocol(net.peer_addr(from), d.to_string());
        if !frame.meta.len().is_multiple_of(8) || frame.meta.len() / 8 != frame.segments.len() {
            return Err(bad("KEYS frame: digests and key lists do not match"));
        }
        // On a sequenced connection (an RDMA link), frames after the parked
        // ones arrive on the ring's thread: this thread takes the sequencer
        // (they wait in it) until the parked ones are replayed, so none
        // overtakes them. The thread applying frames now lets go soon (its
        // frames are parked while the connection is blocked).
        let sequenced = loop {
            let mut conns = self.shared.conns.lock();
            match conns.get_mut(&from).and_then(|c| c.seq.as_mut()) {
                None => break false,
                Some(sq) if !sq.busy => {
                    sq.busy = true;
                    break true;
                }
                Some(_) => {
                    drop(conns);
                    std::thread::yield_now();
                }
            }
        };
        let parked = {
            let mut conns = self.shared.conns.lock();
            let c = conns.entry(from).or_default();
            let mut bad_list = None;
            for (d, keys) in frame.meta.chunks_exact(8).zip(&frame.segments) {
                if !keys.len().is_multiple_of(8) {
                    bad_list = Some(bad("KEYS frame: a key list is not a whole number of keys"));
                    break;
                }
                let digest = u64::from_le_bytes(d.try_into().expect("8 bytes"));
                if c.lists.insert(digest, keys.clone()).is_none() {
                    c.bytes += keys.len();
                }
            }
            if bad_list.is_none() && c.bytes > 2 * proto::KEY_CACHE_BUDGET {
                bad_list = Some(Error::LimitExceeded(format!("key cache of {} bytes for one connection", c.bytes)));
            }
            if let Some(e) = bad_list {
                // Refused (by the caller); the frames that came meanwhile go
                // on as they would have (parked, while still blocked).
                drop(conns);
                if sequenced {
                    self.drain_held(net, from);
                }
                return Err(e);
            }
            if c.blocked {
                c.blocked = false;
                self.shared.blocked.fetch_sub(1, AcqRel);
            }
            std::mem::take(&mut c.parked)
        };
        // Replayed in order on this (the connection's) thread; a frame that
        // blocks again holds the ones after it. (They were sequenced already.)
        for f in parked {
            self.ordered_or_refuse(net, from, f);
        }
        if sequenced {
            self.drain_held(net, from);
        }
        Ok(())
    }

    fn on_data(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) -> Result<()> {
        let peer = || net.peer_addr(from);
        let bad = |detail: String| Error::protocol(peer(), detail);
        let (h, runs) = proto::parse_meta::<DataHeader, RunHeader>(&frame.meta, |h| h.runs)
            .ok_or_else(|| bad("data request meta is malformed".into()))?;
        let table = self.shared.tables.read().get(&h.table).cloned().ok_or(Error::UnknownTable(h.table))?;
        let with_values = frame.kind != kind::PULL;
        let dim = u64::from(table.spec.dim);
        let versioned = h.flags & proto::flags::VERSIONED != 0;
        if versioned && frame.kind != kind::PULL {
            return Err(bad("only pulls can be version-filtered".into()));
        }
        if h.flags & !proto::flags::VERSIONED != 0 {
            return Err(bad(format!("unknown request flags {:#x}", h.flags)));
        }
        let max_keys = self.shared.cfg.max_keys_per_request;
        let total_keys = runs.iter().fold(0u64, |n, r| n.saturating_add(r.count));
        if total_keys > max_keys {
            return Err(Error::LimitExceeded(format!(
                "a request of {total_keys} keys; this server takes at most {max_keys} keys per request \
                 (--max-keys-per-request): split it"
            )));
        }
        let expected_segments: usize = runs
            .iter()
            .map(|r| usize::from(run_form::has_keys(r.form)) + usize::from(with_values) + usize::from(versioned))
            .sum();
        if frame.segments.len() != expected_segments {
            return Err(bad(format!("{} segments, the runs need {expected_segments}", frame.segments.len())));
        }
        // Key lists named by digest: all must be here, or the connection
        // waits (with this request first) until the worker resupplies them.
        let (cached, pending, answer): (Vec<Option<Bytes>>, _, _) = {
            let mut conns = self.shared.conns.lock();
            let c = conns.entry(from).or_default();
            let max_pending = self.shared.cfg.max_pending;
            if c.pending.load(std::sync::atomic::Ordering::Acquire) >= max_pending {
                return Err(Error::LimitExceeded(format!(
                    "this connection has {max_pending} requests waiting for their replies \
                     (--max-pending-requests); read replies before sending more"
                )));
            }
            let pending = c.pending.clone();
            let answer = c
                .answer
                .get_or_insert_with(|| {
                    Arc::new(Answering { net: net.clone(), pending: pending.clone(), stats: self.shared.stats.clone() })
                })
                .clone();
            let mut missing = Vec::new();
            let cached = runs
                .iter()
                .map(|r| {
                    if r.form != run_form::CACHED {
                        return None;
                    }
                    let hit = c.lists.get(&r.digest).cloned();
                    if hit.is_none() {
                        missing.push(r.digest);
                    }
                    hit
                })
                .collect();
            if !missing.is_empty() {
                c.blocked = true;
                c.parked.push_back(frame);
                self.shared.blocked.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                self.shared.stats.key_cache_misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(conns);
                let id = missing.len(); // for the log
                tracing::debug!(peer = %peer(), lists = id, "asking for key lists");
                let f =
                    Frame::new(kind::NEED_KEYS, 0, Bytes::new()).with_segment(crate::transport::bytes_of_vec(missing));
                return net.send(from, f);
            }
            (cached, pending, answer)
        };
        let me = self.shared.membership.lock().index.unwrap_or(u32::MAX);
        // Runs split along shards: run index -> parts.
        let mut split: HashMap<u32, u32> = HashMap::new();
        let mut total = 0u64;
        let mut per_lane: Vec<Vec<LaneRun>> = (0..self.shared.lanes.len()).map(|_| Vec::new()).collect();
        self.shared.stats.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let payload: u64 = frame.segments.iter().map(|s| s.len() as u64).sum();
        let mut segs = frame.segments.into_iter();
        for (i, r) in runs.iter().copied().enumerate() {
            total = total.saturating_add(r.count);
            if r.count == 0 {
                return Err(bad(format!("run {} has no keys", r.run)));
            }
            let (keys, last): (Option<Bytes>, u64) = match r.form {
                run_form::RANGE => {
                    let last = r.first.checked_add(r.count - 1).ok_or_else(|| bad("key range overflows".into()))?;
                    (None, last)
                }
                run_form::LIST | run_form::LIST_CACHE | run_form::CACHED => {
                    let k = match r.form {
                        run_form::CACHED => {
                            let k = cached[i].clone().expect("resolved above");
                            self.shared.stats.key_cache_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            self.shared
                                .stats
                                .key_cache_bytes_saved
                                .fetch_add(k.len() as u64, std::sync::atomic::Ordering::Relaxed);
                            k
                        }
                        _ => segs.next().expect("segment count checked"),
                    };
                    if k.len() as u64 != r.count * 8 {
                        return Err(bad(format!("run {}: {} key bytes for {} keys", r.run, k.len(), r.count)));
                    }
                    let first = u64::from_le_bytes(k[..8].try_into().expect("8 bytes"));
                    let last = u64::from_le_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
                    if first != r.first {
                        return Err(bad(format!("run {}: first key {first} != declared {}", r.run, r.first)));
                    }
                    if r.form == run_form::LIST_CACHE {
                        let mut conns = self.shared.conns.lock();
                        let c = conns.entry(from).or_default();
                        if c.bytes + k.len() <= 2 * proto::KEY_CACHE_BUDGET
                            && c.lists.insert(r.digest, k.clone()).is_none()
                        {
                            c.bytes += k.len();
                        }
                    }
                    (Some(k), last)
                }
                f => return Err(bad(format!("run {}: unknown key form {f}", r.run))),
            };
            if last >= table.spec.keys {
                return Err(Error::KeyOutOfRange { table: h.table, key: last, len: table.spec.keys });
            }
            let known = if versioned {
                let v = segs.next().expect("segment count checked");
                if v.len() as u64 != r.count * 4 {
                    return Err(bad(format!("run {}: {} version bytes for {} keys", r.run, v.len(), r.count)));
                }
                Some(v)
            } else {
                None
            };
            let vals = if with_values {
                let v = segs.next().expect("segment count checked");
                if v.len() as u64 != r.count * dim * 4 {
                    return Err(Error::LengthMismatch {
                        table: h.table,
                        keys: r.count as usize,
                        dim: table.spec.dim,
                        expected: (r.count * dim) as usize,
                        got: v.len() / 4,
                    });
                }
                Some(v)
            } else {
                None
            };
            if !table.owns(me, r.first, last) {
                return self.moved(net, from, frame.id, &h, &runs);
            }
            let cover = table.cover(r.first, last).ok_or_else(|| Error::NotOwned {
                table: h.table,
                key: r.first,
                range: "no shard here".into(),
            })?;
            if let [sref] = cover[..] {
                per_lane[sref.lane].push(LaneRun { header: r, shard: sref.id, keys, vals, known, part: 0 });
                continue;
            }
            // The run spans several shards (a range this server took over
            // next to one of its own): one part per shard, joined again in
            // the reply.
            let key_view = keys.as_ref().map(crate::transport::pod_slice::<u64>);
            let key_at = |j: usize| key_view.as_ref().map_or(r.first + j as u64, |k| k[j]);
            let n = r.count as usize;
            let mut parts = 0u32;
            let mut lo = 0usize;
            for sref in cover {
                let (mut a, mut b) = (lo, n);
                while a < b {
                    let m = (a + b) / 2;
                    if key_at(m) < sref.range.end { a = m + 1 } else { b = m }
                }
                let hi = a;
                if hi == lo {
                    continue;
                }
                let c = (hi - lo) as u64;
                let header = RunHeader {
                    run: r.run,
                    form: if keys.is_some() { run_form::LIST } else { run_form::RANGE },
                    first: key_at(lo),
                    count: c,
                    digest: 0,
                    seq: r.seq,
                };
                let d = dim as usize;
                per_lane[sref.lane].push(LaneRun {
                    header,
                    shard: sref.id,
                    keys: keys.as_ref().map(|k| k.slice(lo * 8..hi * 8)),
                    vals: vals.as_ref().map(|v| v.slice(lo * d * 4..hi * d * 4)),
                    known: known.as_ref().map(|v| v.slice(lo * 4..hi * 4)),
                    part: parts + 1,
                });
                parts += 1;
                lo = hi;
            }
            split.insert(r.run, parts);
        }
        let lanes = per_lane.iter().filter(|r| !r.is_empty()).count();
        if lanes == 0 {
            return Err(bad("a data request without runs".into()));
        }
        {
            use std::sync::atomic::Ordering::Relaxed;
            let st = &self.shared.stats;
            st.keys.fetch_add(total, Relaxed);
            let (count, keys_pushed, keys_pulled) = match frame.kind {
                kind::PUSH => (&st.pushes, total, 0),
                kind::PULL => (&st.pulls, 0, total),
                _ => (&st.push_pulls, total, total),
            };
            count.fetch_add(1, Relaxed);
            st.keys_pushed.fetch_add(keys_pushed, Relaxed);
            st.keys_pulled.fetch_add(keys_pulled, Relaxed);
            st.bytes_received.fetch_add(payload, Relaxed);
        }
        let epoch = self.shared.repl.epoch.load(std::sync::atomic::Ordering::Acquire);
        // One slot until the reply leaves through `answer`.
        pending.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let req = Arc::new(Request::new(answer, from, frame.id, frame.kind, &h, lanes, epoch).with_parts(split));
        let inline = total <= INLINE_MAX_KEYS;
        for (lane, runs) in per_lane.into_iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            self.shared.lanes[lane].submit(Job::Runs { req: req.clone(), runs }, inline);
        }
        Ok(())
    }

    /// Answers every run of a request `MOVED`: this server does not own
    /// some of its keys in its epoch. Nothing was applied.
    fn moved(&self, net: &Arc<dyn Messenger>, from: PeerId, id: u64, h: &DataHeader, runs: &[RunHeader]) -> Result<()> {
        let epoch = self.shared.repl.epoch.load(std::sync::atomic::Ordering::Acquire);
        let header =
            proto::ReplyHeader { table: h.table, runs: runs.len() as u32, progress: u64::MAX, epoch, reserved: 0 };
        let recs: Vec<proto::RunReply> =
            runs.iter().map(|r| proto::RunReply { run: r.run, status: proto::status::MOVED, count: r.count }).collect();
        net.send(from, Frame::new(kind::REPLY, id, proto::build_meta(&header, &recs)))
    }

    fn on_clock(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: &Frame) -> Result<()> {
        let (h, _) = proto::parse_meta::<DataHeader, RunHeader>(&frame.meta, |h| h.runs)
            .ok_or_else(|| Error::protocol(net.peer_addr(from), "clock meta is malformed"))?;
        let workers = self.shared.membership.lock().workers;
        if h.worker >= workers {
            return Err(Error::protocol(net.peer_addr(from), format!("worker rank {} of {workers}", h.worker)));
        }
        let reset = h.flags & proto::flags::CLOCK_RESET != 0;
        {
            // Recorded before the lanes see it: a clock here means the
            // worker's pushes of earlier clocks to this server were applied
            // (they came before it on this ordered connection).
            let mut clocks = self.shared.worker_clocks.lock();
            let w = h.worker as usize;
            if clocks.len() <= w {
                clocks.resize(w + 1, u32::MAX);
            }
            clocks[w] = if reset || clocks[w] == u32::MAX { h.clock } else { clocks[w].max(h.clock) };
        }
        if reset {
            tracing::info!(worker = h.worker, clock = h.clock, "a restarted worker re-enters at its rank's clock");
            for l in &self.shared.lanes {
                l.submit(Job::ResetClock { worker: h.worker, clock: u64::from(h.clock) }, true);
            }
            return Ok(());
        }
        for l in &self.shared.lanes {
            l.submit(Job::Clock { worker: h.worker, clock: u64::from(h.clock) }, true);
        }
        Ok(())
    }
}
