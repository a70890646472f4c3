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
use crate::transport::{Frame, Handler, Messenger, PeerId, Transport};
use crate::updater::Rules;

use lane::{INLINE_MAX_KEYS, Job, Lane, LaneRun, Request};

/// Largest number of keys one request may carry to one server.
pub const MAX_KEYS_PER_REQUEST: u64 = 1 << 28;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { lanes: 4, rules: Rules::default(), max_memory: None, rank: None }
    }
}

struct Table {
    spec: TableSpec,
    /// Owned ranges sorted by start, with the lane and shard id holding each.
    ranges: Vec<(KeyRange, usize, u32)>,
}

impl Table {
    fn find(&self, key: u64) -> Option<&(KeyRange, usize, u32)> {
        let i = self.ranges.partition_point(|(r, _, _)| r.start <= key).checked_sub(1)?;
        self.ranges.get(i).filter(|(r, _, _)| r.contains(key))
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
}

struct Shared {
    cfg: ServerConfig,
    lanes: Vec<Arc<Lane>>,
    membership: Mutex<Membership>,
    changed: Condvar,
    tables: RwLock<HashMap<TableId, Arc<Table>>>,
    next_shard: Mutex<u32>,
    memory: Mutex<u64>,
}

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
}

impl ServerNode {
    /// Binds at `bind` (empty: any address), registers with the scheduler at
    /// `scheduler` and starts serving. Returns once registered; the ring
    /// arrives when the whole job has registered ([`ServerNode::wait_welcome`]).
    pub fn start(transport: &dyn Transport, bind: &str, scheduler: &str, cfg: ServerConfig) -> Result<ServerNode> {
        let cfg_rank = cfg.rank;
        let lanes: Vec<Arc<Lane>> = (0..cfg.lanes.max(1)).map(|_| Arc::new(Lane::default())).collect();
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
        let shared = Arc::new(Shared {
            cfg,
            lanes,
            membership: Mutex::new(Membership::default()),
            changed: Condvar::new(),
            tables: RwLock::new(HashMap::new()),
            next_shard: Mutex::new(0),
            memory: Mutex::new(0),
        });
        let net = transport.bind(bind, Arc::new(ServerHandler { shared: shared.clone() }))?;
        let mut node = ServerNode { shared, net, helpers, heartbeat: None };
        let sched = node.net.connect(scheduler)?;
        node.shared.membership.lock().scheduler = Some(sched);
        // Tell the job the address it can reach us at (a wildcard bind is
        // advertised as the interface that reaches the scheduler).
        let reg = Control::Register { role: Role::Server, addr: node.net.advertised_addr(sched), rank: cfg_rank };
        node.net.send(sched, reg.to_frame(0))?;
        let every = crate::scheduler::heartbeat::interval();
        node.heartbeat = Some(crate::scheduler::heartbeat::Heartbeat::start(node.net.clone(), sched, every));
        Ok(node)
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

    /// Blocks until the scheduler ends the job.
    pub fn wait(&self) {
        let mut m = self.shared.membership.lock();
        while !m.stopping {
            self.shared.changed.wait(&mut m);
        }
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
        self.net.shutdown();
        for l in &self.shared.lanes {
            l.stop();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Handler for ServerHandler {
    fn on_disconnect(&self, _net: &Arc<dyn Messenger>, peer: PeerId) {
        let mut m = self.shared.membership.lock();
        if m.scheduler == Some(peer) && !m.stopping {
            tracing::warn!("lost the connection to the scheduler; stopping");
            m.stopping = true;
            drop(m);
            self.shared.changed.notify_all();
        }
    }

    fn on_frame(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) {
        let id = frame.id;
        let result = match frame.kind {
            kind::CONTROL => self.on_control(net, from, &frame),
            kind::PUSH | kind::PULL | kind::PUSH_PULL => self.on_data(net, from, frame),
            kind::CLOCK => self.on_clock(net, from, &frame),
            other => Err(Error::protocol(net.peer_addr(from), format!("unknown frame kind {other}"))),
        };
        if let Err(e) = result {
            tracing::debug!(peer = %net.peer_addr(from), error = %e, "refused a request");
            let _ = net.send(from, proto::refused(id, &e.to_string()));
        }
    }
}

impl ServerHandler {
    fn on_control(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: &Frame) -> Result<()> {
        let peer = net.peer_addr(from);
        match Control::from_frame(frame, &peer)? {
            Control::Welcome { role: Role::Server, rank, servers, workers, vnodes, epoch } => {
                let mut m = self.shared.membership.lock();
                m.index = Some(rank);
                m.workers = workers;
                m.ring = Some(Ring::new(servers, vnodes, epoch));
                drop(m);
                self.shared.changed.notify_all();
                tracing::info!(rank, workers, "server joined the job");
                net.send(from, Control::Ready { rank }.to_frame(frame.id))
            }
            Control::Shutdown => {
                self.shared.membership.lock().stopping = true;
                self.shared.changed.notify_all();
                Ok(())
            }
            Control::CreateTable(spec) => {
                let reply = match self.create_table(spec) {
                    Ok(table) => Control::TableReady { table },
                    Err(e) => Control::Error(e.to_string()),
                };
                net.send(from, reply.to_frame(frame.id))
            }
            other => Err(Error::protocol(peer, format!("unexpected control message {other:?}"))),
        }
    }

    fn create_table(&self, spec: TableSpec) -> Result<TableId> {
        spec.validate()?;
        // One creation at a time, so two workers declaring the same table
        // cannot both allocate it.
        let mut next_shard = self.shared.next_shard.lock();
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
        let rule = self.shared.cfg.rules.resolve(&spec.updater)?;
        let (index, ring, workers) = {
            let m = self.shared.membership.lock();
            match (m.index, &m.ring) {
                (Some(i), Some(r)) => (i, r.clone(), m.workers),
                _ => return Err(Error::Config("server has not joined a job yet".into())),
            }
        };
        let map = ring.ranges(spec.keys);
        let owned: Vec<KeyRange> = map.ranges_of(index).collect();
        let layout = crate::store::SlotLayout::new(spec.dim)
            .ok_or_else(|| Error::InvalidSpec(format!("table {}: dim {}", spec.id, spec.dim)))?;
        if spec.storage == crate::table::Storage::Dense {
            let keys: u64 = owned.iter().map(|r| r.len()).sum();
            let per_key = (layout.bytes() + layout.dim() * 4 * rule.state_per_value()) as u64;
            let need = keys.saturating_mul(per_key);
            let mut used = self.shared.memory.lock();
            if let Some(max) = self.shared.cfg.max_memory
                && used.saturating_add(need) > max
            {
                return Err(Error::OutOfMemory(format!(
                    "table {} needs {need} bytes on this server, {} of the {max} byte budget are in use",
                    spec.id, *used
                )));
            }
            *used += need;
        }
        let mut ranges = Vec::with_capacity(owned.len());
        for range in owned {
            let cfg = ShardConfig {
                table: spec.id,
                range,
                dim: spec.dim,
                storage: spec.storage,
                init: spec.init,
                workers: workers as usize,
            };
            let shard = Shard::new(cfg, rule.clone())?;
            let id = *next_shard;
            *next_shard += 1;
            let lane = id as usize % self.shared.lanes.len();
            self.shared.lanes[lane].submit(Job::Install { id, shard: Box::new(shard) }, true);
            ranges.push((range, lane, id));
        }
        tracing::debug!(table = spec.id, shards = ranges.len(), "table created");
        // Published after the shards are in their lanes.
        self.shared.tables.write().insert(spec.id, Arc::new(Table { spec: spec.clone(), ranges }));
        Ok(spec.id)
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
        let expected_segments: usize = runs
            .iter()
            .map(|r| usize::from(r.form == run_form::LIST) + usize::from(with_values) + usize::from(versioned))
            .sum();
        if frame.segments.len() != expected_segments {
            return Err(bad(format!("{} segments, the runs need {expected_segments}", frame.segments.len())));
        }
        let mut total = 0u64;
        let mut per_lane: Vec<Vec<LaneRun>> = (0..self.shared.lanes.len()).map(|_| Vec::new()).collect();
        let mut segs = frame.segments.into_iter();
        for r in runs {
            total = total.saturating_add(r.count);
            if r.count == 0 || total > MAX_KEYS_PER_REQUEST {
                return Err(bad(format!(
                    "run {} has {} keys (limit {MAX_KEYS_PER_REQUEST} per request)",
                    r.run, r.count
                )));
            }
            let (keys, last): (Option<Bytes>, u64) = match r.form {
                run_form::RANGE => {
                    let last = r.first.checked_add(r.count - 1).ok_or_else(|| bad("key range overflows".into()))?;
                    (None, last)
                }
                run_form::LIST => {
                    let k = segs.next().expect("segment count checked");
                    if k.len() as u64 != r.count * 8 {
                        return Err(bad(format!("run {}: {} key bytes for {} keys", r.run, k.len(), r.count)));
                    }
                    let first = u64::from_le_bytes(k[..8].try_into().expect("8 bytes"));
                    let last = u64::from_le_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
                    if first != r.first {
                        return Err(bad(format!("run {}: first key {first} != declared {}", r.run, r.first)));
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
            let &(range, lane, shard) = table
                .find(r.first)
                .filter(|(range, _, _)| range.contains(last))
                .ok_or_else(|| Error::NotOwned { table: h.table, key: r.first, range: "no shard here".into() })?;
            let _ = range;
            per_lane[lane].push(LaneRun { header: r, shard, keys, vals, known });
        }
        let lanes = per_lane.iter().filter(|r| !r.is_empty()).count();
        if lanes == 0 {
            return Err(bad("a data request without runs".into()));
        }
        let req = Arc::new(Request::new(net.clone(), from, frame.id, frame.kind, h.table, h.needed_progress(), lanes));
        let inline = total <= INLINE_MAX_KEYS;
        for (lane, runs) in per_lane.into_iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            self.shared.lanes[lane].submit(Job::Runs { req: req.clone(), runs }, inline);
        }
        Ok(())
    }

    fn on_clock(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: &Frame) -> Result<()> {
        let (h, _) = proto::parse_meta::<DataHeader, RunHeader>(&frame.meta, |h| h.runs)
            .ok_or_else(|| Error::protocol(net.peer_addr(from), "clock meta is malformed"))?;
        let workers = self.shared.membership.lock().workers;
        if h.worker >= workers {
            return Err(Error::protocol(net.peer_addr(from), format!("worker rank {} of {workers}", h.worker)));
        }
        for l in &self.shared.lanes {
            l.submit(Job::Clock { worker: h.worker, clock: u64::from(h.clock) }, true);
        }
        Ok(())
    }
}
