//! The control plane: registration, ranks, the ring, barriers and the end of
//! the job. Never on the data path.
//!
//! Start-up: every node registers; once S servers and W workers have, the
//! scheduler welcomes the servers (rank and ring), waits for each to say it
//! is ready, then welcomes the workers, so that no worker can reach a server
//! that does not yet know the ring. The job ends when every worker has said
//! it is done; the scheduler then tells every node to shut down.
//!
//! Failures (DESIGN section 6): a server whose connection drops or whose
//! heartbeats stop is marked dead, the epoch goes up and the new server list
//! goes to the live servers first; once each has applied it (its first
//! replicas now own the dead server's ranges and new replicas received their
//! copies), it goes to the workers, which send what the dead server had not
//! acknowledged to the new owners. The job fails only when a range lost its
//! owner and every replica (or had none).
//!
//! Joins (two-phase migration): a server that registers once the job runs
//! is welcomed as *joining*: an epoch in which it owns nothing and learns
//! copies of the ranges it will hold from their owners (copy). Once every
//! server applied that, a second epoch makes it a member: the servers that
//! hand ranges over apply it first and acknowledge only when everything
//! they applied is on the joiner (hand over the delta), then the joiner
//! applies it, and only then are workers told. Joins go one at a time.
//!
//! A worker whose connection drops or whose heartbeats stop before it said
//! it is done is *lost*: the servers are told at once (`WorkerLost`), so
//! that the consistency waits of eventual and bounded-delay tables do not
//! wait for it (sequential tables and aggregating rules keep its place:
//! their clocks are not complete without it), and its rank waits
//! `worker_restart_timeout` for a new incarnation to register. That one
//! gets the rank, the current server list and a larger incarnation, asks
//! the servers for the rank's clock and continues from it. Barriers and
//! checkpoints keep the rank's seat meanwhile (they mean "every worker"); a
//! rank not taken again in time fails the job. A worker that reports an
//! error (`WorkerDone` with one) fails the job at once.

pub mod heartbeat;
pub mod ring;
mod status;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::proto::{Control, Role, ServerInfo};
use crate::transport::{Frame, Handler, Messenger, PeerId, Transport};

/// Shape of the job the scheduler waits for.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub servers: u32,
    pub workers: u32,
    /// Ring tokens per server.
    pub vnodes: u32,
    /// A node not heard from for this long is declared dead.
    pub heartbeat_timeout: std::time::Duration,
    /// Copies of every range besides its owner's; `None`: 1 when the job has
    /// at least 2 servers, else 0.
    pub replicas: Option<u32>,
    /// Where checkpoints go (and the newest one is restored from).
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Checkpoint at every clock divisible by this (0: never).
    pub checkpoint_every: u32,
    /// How long the rank of a lost worker (connection dropped, or silent)
    /// waits for a new incarnation before the job fails; zero fails at once.
    pub worker_restart_timeout: std::time::Duration,
    /// Worker seats: the job starts with `workers`, and workers registering
    /// later take the free seats `workers..max_workers` (0: `workers`).
    pub max_workers: u32,
}

/// Default of [`SchedulerConfig::worker_restart_timeout`]: time for a
/// supervisor (or a person) to start the worker again.
pub const WORKER_RESTART_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            servers: 2,
            workers: 2,
            vnodes: 64,
            heartbeat_timeout: heartbeat::timeout(),
            replicas: None,
            checkpoint_dir: None,
            checkpoint_every: 0,
            worker_restart_timeout: WORKER_RESTART_TIMEOUT,
            max_workers: 0,
        }
    }
}

impl SchedulerConfig {
    /// Replicas per range, as configured or by default.
    pub fn replicas(&self) -> u32 {
        self.replicas.unwrap_or(u32::from(self.servers >= 2)).min(self.servers.saturating_sub(1))
    }

    /// Worker seats of the job (ranks `0..seats()`): the workers it starts
    /// with, and the free seats workers joining later take.
    pub fn seats(&self) -> u32 {
        self.max_workers.max(self.workers)
    }
}

struct Pending {
    peer: PeerId,
    id: u64,
    addr: String,
    rank: Option<u32>,
}

#[derive(Default)]
struct State {
    servers: Vec<Pending>,
    workers: Vec<Pending>,
    /// Server peers in rank order, once welcomed.
    server_peers: Vec<PeerId>,
    server_infos: Vec<ServerInfo>,
    /// The servers as of the last membership every live server applied: the
    /// copies they hold are complete (a server acknowledges an epoch only
    /// once the copies it sent for it are applied), while those of a newer
    /// epoch may still be filling.
    stable_infos: Vec<ServerInfo>,
    ready: HashSet<u32>,
    /// Worker peers by rank, once welcomed.
    worker_peers: Vec<Option<PeerId>>,
    done: Vec<bool>,
    /// Ranks whose worker was lost, waiting for a new incarnation.
    lost: Vec<Option<Lost>>,
    /// Seats no worker ever took (`workers..max_workers` at the start): a
    /// worker registering mid-job takes one. A seat is never given twice
    /// (a rank's exactly-once seqs are its workers' history).
    free: Vec<bool>,
    /// New incarnations (and workers taking a free seat: `true`) registered
    /// while the servers apply a membership change: welcomed once it is in
    /// effect (with its server list).
    rejoining: Vec<(usize, Pending, bool)>,
    /// Workers registered for a rank that still runs (its death not noticed
    /// yet): they take it once it is lost, and are refused once it is done.
    queued: Vec<(usize, Pending)>,
    barrier: Vec<(PeerId, u64)>,
    /// Barriers the job completed (a worker's `n`-th barrier is number `n`).
    barriers_done: u64,
    /// The clock of the last checkpoint round (taken or abandoned).
    last_checkpoint: Option<u32>,
    failure: Option<String>,
    finished: bool,
    /// When each node was last heard from.
    last_seen: std::collections::HashMap<PeerId, std::time::Instant>,
    /// The membership epoch (1 at the start, +1 per change).
    epoch: u32,
    /// Worker registrations so far (a worker's incarnation).
    registrations: u32,
    /// A membership change the servers are applying: its epoch and the
    /// servers that have not acknowledged it.
    applying: Option<(u32, HashSet<u32>)>,
    /// A server applying the change once the others have (a joining server
    /// that takes ranges over).
    applying_next: Option<u32>,
    /// Servers that registered once the job ran, waiting for their turn.
    joiners: VecDeque<Pending>,
    /// The join in progress.
    join: Option<Join>,
    /// How long each completed join took, from registration to the epoch
    /// that made it a member (milliseconds).
    migrations: Vec<f64>,
    /// The checkpoint restored at the start: its directory and clock.
    restore: Option<(String, u32)>,
    /// The checkpoint being taken.
    checkpoint: Option<CheckpointRound>,
    /// Nodes' reports, for `pserver status` and metrics.
    ops: status::Ops,
}

/// A server joining the running job.
struct Join {
    rank: usize,
    phase: JoinPhase,
    since: std::time::Instant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum JoinPhase {
    /// Welcomed; its `Ready` has not come yet.
    Welcomed,
    /// Owners fill its copies (it is `joining` in the server list).
    Learning,
    /// Its copies are complete; waiting for every worker to acknowledge
    /// that epoch (no request routed by an older map is still unanswered),
    /// so that every request in flight at the handover was split by a map
    /// that already separates the ranges it takes.
    Draining(HashSet<u32>),
    /// A member: ranges are handed over to it.
    Promoting,
}

/// A worker rank whose worker was lost: since when, why, and its peer.
struct Lost {
    since: std::time::Instant,
    why: String,
    peer: PeerId,
}

/// A checkpoint in progress: workers that arrived (by rank, with the request
/// to answer), servers still writing.
struct CheckpointRound {
    clock: u32,
    workers: Vec<(u32, PeerId, u64)>,
    servers: HashSet<u32>,
    files: Vec<crate::server::checkpoint::FileEntry>,
    tables: Vec<crate::table::TableSpec>,
}

struct Shared {
    cfg: SchedulerConfig,
    state: Mutex<State>,
    changed: Condvar,
}

/// A running scheduler.
pub struct SchedulerNode {
    shared: Arc<Shared>,
    net: Arc<dyn Messenger>,
    monitor: Option<std::thread::JoinHandle<()>>,
}

impl SchedulerNode {
    pub fn start(transport: &dyn Transport, bind: &str, cfg: SchedulerConfig) -> Result<SchedulerNode> {
        if cfg.servers == 0 || cfg.workers == 0 {
            return Err(Error::Config(format!(
                "a job needs at least one server and one worker (got {} and {})",
                cfg.servers, cfg.workers
            )));
        }
        if cfg.max_workers != 0 && cfg.max_workers < cfg.workers {
            return Err(Error::Config(format!(
                "--max-workers {} is below the job's {} workers",
                cfg.max_workers, cfg.workers
            )));
        }
        let mut state = State::default();
        if let Some(root) = &cfg.checkpoint_dir
            && let Some((dir, m)) = crate::server::checkpoint::latest(root)?
        {
            if m.workers != cfg.seats() {
                return Err(Error::Config(format!(
                    "the checkpoint in {} was taken by a job of {} worker seats; this job has {}",
                    dir.display(),
                    m.workers,
                    cfg.seats()
                )));
            }
            tracing::info!(dir = %dir.display(), clock = m.clock, tables = m.tables.len(), "restoring a checkpoint");
            state.restore = Some((dir.display().to_string(), m.clock));
        }
        let shared = Arc::new(Shared { cfg, state: Mutex::new(state), changed: Condvar::new() });
        let net = transport.bind(bind, Arc::new(SchedulerHandler { shared: shared.clone() }))?;
        let (sh, n2) = (shared.clone(), net.clone());
        let monitor = std::thread::Builder::new()
            .name("pserver-monitor".into())
            .spawn(move || monitor(&sh, &n2))
            .map_err(|e| Error::io("spawning the heartbeat monitor", e))?;
        Ok(SchedulerNode { shared, net, monitor: Some(monitor) })
    }

    /// The address nodes register at.
    pub fn addr(&self) -> String {
        self.net.local_addr()
    }

    /// The job as it stands (what `pserver status` prints).
    pub fn status(&self) -> crate::status::JobStatus {
        let cfg = &self.shared.cfg;
        self.shared.state.lock().job_status(cfg.servers, cfg.workers)
    }

    /// Blocks until every worker is done and the servers were told to stop.
    /// An error if any worker failed.
    pub fn wait(&self) -> Result<()> {
        let mut st = self.shared.state.lock();
        while !st.finished {
            self.shared.changed.wait(&mut st);
        }
        match &st.failure {
            Some(f) => Err(Error::Remote { peer: "job".into(), message: f.clone() }),
            None => Ok(()),
        }
    }
}

impl Drop for SchedulerNode {
    fn drop(&mut self) {
        {
            let mut st = self.shared.state.lock();
            st.finished = true;
        }
        self.shared.changed.notify_all();
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        self.net.shutdown();
    }
}

/// Declares nodes dead when their heartbeats stop.
fn monitor(shared: &Shared, net: &Arc<dyn Messenger>) {
    let timeout = shared.cfg.heartbeat_timeout;
    let restart = shared.cfg.worker_restart_timeout;
    let shortest = if restart.is_zero() { timeout } else { timeout.min(restart) };
    let tick = (shortest / 4).clamp(std::time::Duration::from_millis(20), std::time::Duration::from_secs(1));
    let mut st = shared.state.lock();
    while !st.finished {
        shared.changed.wait_for(&mut st, tick);
        if st.finished {
            break;
        }
        let now = std::time::Instant::now();
        let silent = |p: &PeerId, st: &State| st.last_seen.get(p).is_some_and(|t| now.duration_since(*t) > timeout);
        let mut out = Vec::new();
        let dead_workers: Vec<usize> = (0..st.worker_peers.len())
            .filter(|&r| !st.done[r] && st.worker_peers[r].is_some_and(|p| silent(&p, &st)))
            .collect();
        for r in dead_workers {
            let msg = format!("no heartbeat for {timeout:?}");
            SchedulerHandler::worker_lost_in(shared, &mut st, r, msg, &mut out);
        }
        SchedulerHandler::restart_deadlines_in(shared, &mut st, now, &mut out);
        // Workers deferred while a joining server applied its welcome (its
        // join may also have been abandoned since).
        SchedulerHandler::welcome_rejoining_in(shared, &mut st, &mut out);
        let silent_servers: Vec<usize> = (0..st.server_peers.len())
            .filter(|&r| st.server_infos[r].alive && silent(&st.server_peers[r], &st))
            .collect();
        for rank in silent_servers {
            let why = format!("sent no heartbeat for {timeout:?}");
            SchedulerHandler::server_failed_in(shared, &mut st, rank, &why, &mut out);
        }
        if !out.is_empty() {
            drop(st);
            shared.changed.notify_all();
            for (p, f) in out {
                let _ = net.send(p, f);
            }
            st = shared.state.lock();
        }
    }
}

/// Ranks for registrants: requested ranks first (launchers set PSERVER_RANK),
/// then the free ranks in registration order.
fn assign_ranks(nodes: &[Pending], n: usize) -> Vec<usize> {
    let mut ranks: Vec<Option<usize>> = vec![None; nodes.len()];
    let mut taken = vec![false; n];
    for (i, p) in nodes.iter().enumerate() {
        if let Some(r) = p.rank.map(|r| r as usize).filter(|&r| r < n && !taken[r]) {
            taken[r] = true;
            ranks[i] = Some(r);
        }
    }
    ranks
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                let free = taken.iter().position(|t| !t).expect("as many ranks as nodes");
                taken[free] = true;
                free
            })
        })
        .collect()
}

struct SchedulerHandler {
    shared: Arc<Shared>,
}

impl Handler for SchedulerHandler {
    fn on_frame(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) {
        let msg = match Control::from_frame(&frame, &net.peer_addr(from)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler dropped a bad frame");
                let _ = net.send(from, Control::Error(e.to_string()).to_frame(frame.id));
                return;
            }
        };
        if let Control::Status = msg {
            // An operator's question: answered, but the asker is no node.
            let cfg = &self.shared.cfg;
            let status = self.shared.state.lock().job_status(cfg.servers, cfg.workers);
            let _ = net.send(from, Control::StatusReply(Box::new(status)).to_frame(frame.id));
            return;
        }
        let mut out: Vec<(PeerId, Frame)> = Vec::new();
        {
            let mut st = self.shared.state.lock();
            st.last_seen.insert(from, std::time::Instant::now());
            self.handle(&mut st, net, from, frame.id, msg, &mut out);
        }
        self.shared.changed.notify_all();
        for (peer, f) in out {
            if let Err(e) = net.send(peer, f) {
                tracing::warn!(error = %e, "scheduler could not reach a node");
            }
        }
    }

    fn on_disconnect(&self, _net: &Arc<dyn Messenger>, peer: PeerId) {
        let mut out = Vec::new();
        {
            let mut st = self.shared.state.lock();
            if st.servers.iter().chain(&st.workers).any(|p| p.peer == peer) {
                st.ops.gone(peer);
            }
            Self::rejoining_gone_in(&mut st, peer);
            st.joiners.retain(|p| p.peer != peer);
            if let Some(rank) = st.worker_peers.iter().position(|p| *p == Some(peer))
                && !st.done[rank]
            {
                Self::worker_lost_in(&self.shared, &mut st, rank, "disconnected before finishing".into(), &mut out);
            } else if let Some(rank) = st.server_peers.iter().position(|p| *p == peer)
                && !st.finished
            {
                self.server_failed(&mut st, rank, "disconnected", &mut out);
            }
        }
        self.shared.changed.notify_all();
        for (peer, f) in out {
            let _ = _net.send(peer, f);
        }
    }
}

impl SchedulerHandler {
    fn handle(
        &self,
        st: &mut State,
        net: &Arc<dyn Messenger>,
        from: PeerId,
        id: u64,
        msg: Control,
        out: &mut Vec<(PeerId, Frame)>,
    ) {
        let cfg = &self.shared.cfg;
        match msg {
            Control::Register { role: Role::Server, addr, .. } if !st.server_peers.is_empty() => {
                if st.finished || st.failure.is_some() {
                    out.push((from, Control::Error("the job is ending; no server can join".into()).to_frame(id)));
                    return;
                }
                tracing::info!(target: "membership", %addr, "a server asks to join the running job");
                st.joiners.push_back(Pending { peer: from, id, addr, rank: None });
                self.start_join(st, out);
            }
            Control::Register { role, addr, rank } => {
                if role == Role::Worker && !st.worker_peers.is_empty() {
                    return Self::rejoin_worker_in(&self.shared, st, Pending { peer: from, id, addr, rank }, out);
                }
                let list = match role {
                    Role::Server if st.servers.len() < cfg.servers as usize => &mut st.servers,
                    Role::Worker if st.workers.len() < cfg.workers as usize => &mut st.workers,
                    _ => {
                        out.push((from, Control::Error(format!("the job has no free {role} place")).to_frame(id)));
                        return;
                    }
                };
                tracing::debug!(%role, %addr, "registered");
                list.push(Pending { peer: from, id, addr, rank });
                if st.servers.len() == cfg.servers as usize
                    && st.workers.len() == cfg.workers as usize
                    && st.server_peers.is_empty()
                {
                    self.welcome_servers(st, out);
                }
            }
            Control::Ready { rank } if st.join.as_ref().is_some_and(|j| j.rank == rank as usize) => {
                let Some(j) = st.join.as_mut().filter(|j| j.phase == JoinPhase::Welcomed) else { return };
                j.phase = JoinPhase::Learning;
                // A change under way already lists it as joining; else the
                // epoch of its welcome goes to the others now.
                if st.applying.is_none() {
                    self.announce(st, out);
                }
            }
            Control::Ready { rank } => {
                st.ready.insert(rank);
                if st.ready.len() == cfg.servers as usize && st.worker_peers.is_empty() {
                    self.welcome_workers(st, out);
                }
            }
            Control::Barrier { worker, n } => {
                if let Some(f) = &st.failure {
                    out.push((from, Control::Error(format!("barrier abandoned: {f}")).to_frame(id)));
                    return;
                }
                if n < st.barriers_done {
                    // A restarted worker passing again a barrier its
                    // predecessor (and everyone else) passed.
                    out.push((from, Control::BarrierDone.to_frame(id)));
                    return;
                }
                if n > st.barriers_done {
                    let m = format!("barrier {n} of worker {worker}: the job is at barrier {}", st.barriers_done);
                    out.push((from, Control::Error(m).to_frame(id)));
                    return;
                }
                st.barrier.push((from, id));
                // Lost ranks count: their next incarnation will come here.
                let alive = st.done.iter().filter(|d| !**d).count();
                tracing::trace!(worker, waiting = st.barrier.len(), alive, "barrier");
                Self::release_barrier_in(st, out);
            }
            Control::Heartbeat => {}
            Control::Checkpoint { worker, clock } => {
                if cfg.checkpoint_dir.is_none() {
                    out.push((from, Control::CheckpointDone { clock, written: false }.to_frame(id)));
                    return;
                }
                if st.worker_peers.get(worker as usize) != Some(&Some(from))
                    || st.last_checkpoint.is_some_and(|c| clock <= c)
                {
                    // Not that worker, or a restarted worker reaching a
                    // clock the job checkpointed (or gave up) already.
                    out.push((from, Control::CheckpointDone { clock, written: false }.to_frame(id)));
                    return;
                }
                let round = st.checkpoint.get_or_insert_with(|| CheckpointRound {
                    clock,
                    workers: Vec::new(),
                    servers: HashSet::new(),
                    files: Vec::new(),
                    tables: Vec::new(),
                });
                if round.clock != clock {
                    tracing::warn!(worker, clock, pending = round.clock, "a checkpoint request for another clock");
                    out.push((from, Control::CheckpointDone { clock, written: false }.to_frame(id)));
                    return;
                }
                // By rank: a restarted worker's request replaces its
                // predecessor's, which stays valid while the rank is lost
                // (it had all its pushes of clocks below `clock` answered).
                round.workers.retain(|(r, _, _)| *r != worker);
                round.workers.push((worker, from, id));
                Self::start_checkpoint_in(&self.shared, st, out);
            }
            Control::SnapshotDone { clock, files, tables } => {
                let Some(rank) = st.server_peers.iter().position(|p| *p == from) else { return };
                let Some(round) = st.checkpoint.as_mut().filter(|r| r.clock == clock) else { return };
                round.servers.remove(&(rank as u32));
                round.files.extend(files);
                for t in tables {
                    if !round.tables.iter().any(|x| x.id == t.id) {
                        round.tables.push(t);
                    }
                }
                if round.servers.is_empty() {
                    let round = st.checkpoint.take().expect("present");
                    let root = cfg.checkpoint_dir.clone().expect("a round needs a directory");
                    let m = crate::server::checkpoint::Manifest {
                        format: 1,
                        clock,
                        workers: cfg.seats(),
                        tables: round.tables,
                        files: round.files,
                    };
                    let written = match crate::server::checkpoint::commit(&root, &m) {
                        Ok(()) => {
                            tracing::info!(clock, files = m.files.len(), dir = %root.display(), "checkpoint written");
                            true
                        }
                        Err(e) => {
                            tracing::error!(clock, error = %e, "checkpoint not written");
                            false
                        }
                    };
                    st.last_checkpoint = Some(clock);
                    for (_, p, i) in round.workers {
                        out.push((p, Control::CheckpointDone { clock, written }.to_frame(i)));
                    }
                    self.start_join(st, out);
                }
            }
            Control::Error(m) => {
                // Never answered (that would echo forever); a server that
                // could not write its part of a checkpoint abandons it.
                tracing::warn!(peer = %net.peer_addr(from), error = %m, "a node reported an error");
                let is_server = st.server_peers.contains(&from);
                if is_server && let Some(round) = st.checkpoint.take_if(|r| !r.servers.is_empty()) {
                    tracing::error!(clock = round.clock, "checkpoint abandoned: {m}");
                    Self::checkpoint_unwritten(st, round, out);
                    self.start_join(st, out);
                }
            }
            Control::Leave { rank } => {
                let r = rank as usize;
                if st.server_peers.get(r) != Some(&from) {
                    out.push((from, Control::Error(format!("server {rank} is not this connection")).to_frame(id)));
                    return;
                }
                if cfg.replicas() == 0 {
                    out.push((
                        from,
                        Control::Error("cannot leave: the job keeps no replicas, its ranges would be lost".into())
                            .to_frame(id),
                    ));
                    return;
                }
                tracing::info!(server = rank, "server leaves the job");
                self.server_failed(st, r, "left the job", out);
            }
            Control::MembershipAck { epoch } => {
                if let Some(w) = st.worker_peers.iter().position(|p| *p == Some(from)) {
                    if epoch == st.epoch
                        && let Some(j) = st.join.as_mut()
                        && let JoinPhase::Draining(waiting) = &mut j.phase
                    {
                        waiting.remove(&(w as u32));
                        Self::promote_if_drained(st, out);
                    }
                    return;
                }
                let Some(rank) = st.server_peers.iter().position(|p| *p == from) else { return };
                let complete = match &mut st.applying {
                    Some((e, waiting)) if *e == epoch => {
                        waiting.remove(&(rank as u32));
                        waiting.is_empty()
                    }
                    _ => false,
                };
                if complete {
                    Self::applied(&self.shared, st, out);
                    Self::welcome_rejoining_in(&self.shared, st, out);
                }
            }
            Control::MembershipFailed { epoch, error } => {
                let Some(rank) = st.server_peers.iter().position(|p| *p == from) else { return };
                if st.applying.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    return;
                }
                tracing::error!(target: "membership", server = rank, epoch, error, "a server could not apply a membership change");
                match st.join.as_ref().map(|j| j.rank) {
                    // A join abandoned: the joiner goes, and with it the
                    // change the servers could not make.
                    Some(joiner) => {
                        let why = format!("abandoned its join: server {rank} could not apply epoch {epoch}: {error}");
                        self.server_failed(st, joiner, &why, out);
                    }
                    // Ranges nobody can serve now: the job cannot go on.
                    None => {
                        if let Some(round) = st.checkpoint.take() {
                            Self::checkpoint_unwritten(st, round, out);
                        }
                        let failure = format!("server {rank} could not apply membership epoch {epoch}: {error}");
                        Self::fail_job_in(st, failure, out);
                    }
                }
            }
            Control::Report(r) => st.ops.record(from, r),
            Control::WorkerDone { worker, error } => {
                let rank = worker as usize;
                if st.worker_peers.get(rank) != Some(&Some(from)) {
                    tracing::warn!(worker, "done message from a peer that is not that worker");
                    return;
                }
                if !st.done[rank] {
                    self.worker_done(st, rank, error, out);
                }
            }
            other => {
                tracing::warn!(peer = %net.peer_addr(from), "unexpected control message {other:?}");
                out.push((from, Control::Error("unexpected message".into()).to_frame(id)));
            }
        }
    }

    fn server_failed(&self, st: &mut State, rank: usize, why: &str, out: &mut Vec<(PeerId, Frame)>) {
        Self::server_failed_in(&self.shared, st, rank, why, out)
    }

    /// Server `rank` is gone: a new epoch without it, or the end of the job
    /// when that loses data.
    fn server_failed_in(shared: &Shared, st: &mut State, rank: usize, why: &str, out: &mut Vec<(PeerId, Frame)>) {
        if st.finished || !st.server_infos.get(rank).is_some_and(|s| s.alive) {
            return;
        }
        let k = shared.cfg.replicas();
        if st.join.as_ref().is_some_and(|j| j.rank == rank) {
            // A joiner gone before its join completed never served its
            // ranges: their owners before it still hold them.
            st.server_infos[rank].joining = true;
        }
        // The holders of every range are those of the last membership all
        // servers applied: a copy a newer epoch asked for may not be filled
        // yet (its owner dying now would leave it empty), so it does not
        // count. A server that joined since holds nothing yet either.
        let mut held = st.server_infos.clone();
        for (i, s) in held.iter_mut().enumerate() {
            match st.stable_infos.get(i) {
                Some(was) => {
                    s.alive = s.alive && was.alive;
                    s.joining = was.joining || (st.server_infos[i].joining && i == rank);
                }
                None => s.joining = true,
            }
        }
        let before = crate::scheduler::ring::Ring::new(held, shared.cfg.vnodes, st.epoch).with_replicas(k);
        st.server_infos[rank].alive = false;
        let after = crate::scheduler::ring::Ring::new(st.server_infos.clone(), shared.cfg.vnodes, st.epoch + 1);
        // Data is lost when some range had no live copy left: check on the
        // finest key space (every token its own range).
        let map = before.ranges(u64::MAX);
        let lost = (0..map.len()).any(|i| {
            let (_, owner) = map.range(i);
            std::iter::once(owner).chain(map.replicas(i)).all(|s| !after.is_alive(s))
        });
        if why == "left the job" {
            tracing::info!(server = rank, "server left; its replicas take its ranges");
        } else {
            tracing::error!(server = rank, why, "server failed");
        }
        if let Some(round) = st.checkpoint.take_if(|r| !r.servers.is_empty()) {
            tracing::warn!(clock = round.clock, "checkpoint abandoned: a server failed while writing it");
            Self::checkpoint_unwritten(st, round, out);
        }
        // Tell a server declared dead that it is out, in case it still runs.
        out.push((st.server_peers[rank], Control::Shutdown.to_frame(0)));
        if lost {
            let failure =
                format!("server {rank} {why}, and some of its key ranges have no replica left (--replicas {k})");
            Self::fail_job_in(st, failure, out);
            return;
        }
        if st.join.as_ref().is_some_and(|j| j.rank == rank) {
            tracing::warn!(target: "membership", server = rank, "the joining server is gone; its join is abandoned");
            st.join = None;
        }
        st.epoch += 1;
        tracing::warn!(target: "membership", server = rank, epoch = st.epoch, live = after.live(), "failing over: its replicas take its ranges");
        Self::announce_in(st, out);
    }

    fn announce(&self, st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        Self::announce_in(st, out)
    }

    /// Sends the membership of `st.epoch` to the live servers. While ranges
    /// are handed to a joining server, it gets it only once the others
    /// applied it (see `applied`).
    fn announce_in(st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        let epoch = st.epoch;
        let mut live: HashSet<u32> =
            (0..st.server_infos.len() as u32).filter(|&s| st.server_infos[s as usize].alive).collect();
        st.applying_next = None;
        if let Some(j) = st.join.as_ref().filter(|j| j.phase == JoinPhase::Promoting)
            && live.len() > 1
            && live.remove(&(j.rank as u32))
        {
            st.applying_next = Some(j.rank as u32);
        }
        for &s in &live {
            let m = Control::Membership { epoch, servers: st.server_infos.clone() };
            out.push((st.server_peers[s as usize], m.to_frame(0)));
        }
        st.applying = Some((epoch, live));
    }

    /// Every server it went to applied the membership change: the next
    /// step of a join, and the workers are told.
    fn applied(shared: &Shared, st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        if let Some(next) = st.applying_next.take() {
            let epoch = st.epoch;
            let m = Control::Membership { epoch, servers: st.server_infos.clone() };
            out.push((st.server_peers[next as usize], m.to_frame(0)));
            st.applying = Some((epoch, HashSet::from([next])));
            return;
        }
        st.applying = None;
        st.stable_infos = st.server_infos.clone();
        Self::tell_workers_in(st, out);
        match st.join.as_ref().map(|j| (j.rank, j.phase.clone())) {
            Some((_, JoinPhase::Learning)) => {
                // Every copy it will hold is filled and kept up to date;
                // once no worker has a request routed by an older map, it
                // becomes a member.
                let waiting: HashSet<u32> = (0..st.worker_peers.len() as u32)
                    .filter(|&w| {
                        st.worker_peers[w as usize].is_some() && !st.done.get(w as usize).copied().unwrap_or(true)
                    })
                    .collect();
                if let Some(j) = st.join.as_mut() {
                    j.phase = JoinPhase::Draining(waiting);
                }
                Self::promote_if_drained(st, out);
                return;
            }
            Some((_, JoinPhase::Draining(_))) => {
                // A change (a failure) came between: the promotion waited.
                Self::promote_if_drained(st, out);
                if st.applying.is_some() {
                    return;
                }
            }
            Some((rank, JoinPhase::Promoting)) => {
                let ms = st.join.take().map_or(0.0, |j| j.since.elapsed().as_secs_f64() * 1e3);
                st.migrations.push(ms);
                tracing::info!(target: "membership", server = rank, epoch = st.epoch, migration_ms = ms, "server joined the job");
            }
            _ => {}
        }
        Self::start_checkpoint_in(shared, st, out);
        Self::start_join_in(shared, st, out);
    }

    /// Every worker acknowledged the joining epoch: the joiner becomes a
    /// member (the second phase).
    fn promote_if_drained(st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        let Some(j) = st.join.as_mut() else { return };
        if !matches!(&j.phase, JoinPhase::Draining(w) if w.is_empty()) || st.applying.is_some() {
            return;
        }
        j.phase = JoinPhase::Promoting;
        let rank = j.rank;
        st.server_infos[rank].joining = false;
        st.epoch += 1;
        tracing::info!(target: "membership", server = rank, epoch = st.epoch, "the joining server holds its copies; handing over");
        Self::announce_in(st, out);
    }

    /// A worker finished or died: a join does not wait for it.
    fn worker_gone_from_join(st: &mut State, rank: usize, out: &mut Vec<(PeerId, Frame)>) {
        if let Some(j) = st.join.as_mut()
            && let JoinPhase::Draining(waiting) = &mut j.phase
        {
            waiting.remove(&(rank as u32));
            Self::promote_if_drained(st, out);
        }
    }

    fn start_join(&self, st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        Self::start_join_in(&self.shared, st, out)
    }

    /// Welcomes the next server waiting to join, when no membership change
    /// or checkpoint is under way.
    fn start_join_in(shared: &Shared, st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        if st.join.is_some()
            || st.applying.is_some()
            || st.finished
            || st.checkpoint.as_ref().is_some_and(|r| !r.servers.is_empty())
        {
            return;
        }
        let Some(p) = st.joiners.pop_front() else { return };
        let cfg = &shared.cfg;
        let rank = st.server_infos.len();
        st.server_infos.push(ServerInfo { id: rank as u32, addr: p.addr.clone(), alive: true, joining: true });
        st.server_peers.push(p.peer);
        st.last_seen.insert(p.peer, std::time::Instant::now());
        st.epoch += 1;
        let w = welcome(
            cfg,
            st,
            Role::Server,
            rank as u32,
            0,
            crate::proto::CheckpointPlan { every: Self::every(shared), restore: None },
            false,
            false,
        );
        out.push((p.peer, w.to_frame(p.id)));
        // The workers that hold nobody back (done, or a free seat) or are
        // lost, as the other servers were told: tables it creates later
        // must not wait for them.
        for r in 0..st.done.len() {
            let m = if st.done[r] {
                Control::WorkerLeft { worker: r as u32 }
            } else if st.lost[r].is_some() {
                Control::WorkerLost { worker: r as u32 }
            } else {
                continue;
            };
            out.push((p.peer, m.to_frame(0)));
        }
        tracing::info!(target: "membership", server = rank, addr = %p.addr, epoch = st.epoch, "welcoming a joining server");
        st.servers.push(p);
        st.join = Some(Join { rank, phase: JoinPhase::Welcomed, since: std::time::Instant::now() });
    }

    /// Takes the checkpoint once every worker waits for it, unless ranges
    /// are moving (then once they have moved).
    fn start_checkpoint_in(shared: &Shared, st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        let Some(root) = shared.cfg.checkpoint_dir.clone() else { return };
        let alive = st.done.iter().filter(|d| !**d).count();
        let Some(clock) = st
            .checkpoint
            .as_ref()
            .filter(|r| !r.workers.is_empty() && r.workers.len() >= alive && r.servers.is_empty())
            .map(|r| r.clock)
        else {
            return;
        };
        if st.applying.is_some() || st.join.is_some() {
            tracing::debug!(clock, "checkpoint waits for the membership change");
            return;
        }
        let dir = crate::server::checkpoint::dir_for(&root, clock).display().to_string();
        let live: Vec<usize> = (0..st.server_infos.len()).filter(|&s| st.server_infos[s].alive).collect();
        for &s in &live {
            out.push((st.server_peers[s], Control::Snapshot { clock, dir: dir.clone() }.to_frame(0)));
        }
        if let Some(r) = &mut st.checkpoint {
            r.servers = live.into_iter().map(|s| s as u32).collect();
        }
        tracing::info!(clock, "taking a checkpoint");
    }

    fn every(shared: &Shared) -> u32 {
        if shared.cfg.checkpoint_dir.is_some() { shared.cfg.checkpoint_every } else { 0 }
    }

    /// The membership every server applied goes to the workers.
    fn tell_workers_in(st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        let m = Control::Membership { epoch: st.epoch, servers: st.server_infos.clone() };
        for (r, p) in st.worker_peers.iter().enumerate() {
            if let Some(p) = p
                && !st.done.get(r).copied().unwrap_or(true)
            {
                out.push((*p, m.to_frame(0)));
            }
        }
    }

    fn plan(&self, st: &State) -> crate::proto::CheckpointPlan {
        crate::proto::CheckpointPlan { every: Self::every(&self.shared), restore: st.restore.clone() }
    }

    fn welcome_servers(&self, st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        let cfg = &self.shared.cfg;
        let order = assign_ranks(&st.servers, cfg.servers as usize);
        let mut by_rank: Vec<&Pending> = vec![&st.servers[0]; cfg.servers as usize];
        for (p, &r) in st.servers.iter().zip(&order) {
            by_rank[r] = p;
        }
        st.server_infos = by_rank
            .iter()
            .enumerate()
            .map(|(i, p)| ServerInfo { id: i as u32, addr: p.addr.clone(), alive: true, joining: false })
            .collect();
        st.stable_infos = st.server_infos.clone();
        st.epoch = 1;
        st.server_peers = by_rank.iter().map(|p| p.peer).collect();
        for (rank, p) in by_rank.iter().enumerate() {
            let w = welcome(cfg, st, Role::Server, rank as u32, 0, self.plan(st), false, false);
            out.push((p.peer, w.to_frame(p.id)));
        }
    }

    fn welcome_workers(&self, st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        let cfg = &self.shared.cfg;
        let (w, seats) = (cfg.workers as usize, cfg.seats() as usize);
        let ranks = assign_ranks(&st.workers, w);
        st.worker_peers = vec![None; seats];
        // Free seats hold nobody back (done) until a worker takes one.
        st.done = (0..seats).map(|r| r >= w).collect();
        st.free = (0..seats).map(|r| r >= w).collect();
        st.lost = (0..seats).map(|_| None).collect();
        for rank in w..seats {
            for &p in &st.server_peers {
                out.push((p, Control::WorkerLeft { worker: rank as u32 }.to_frame(0)));
            }
        }
        for (p, rank) in st.workers.iter().zip(ranks) {
            st.worker_peers[rank] = Some(p.peer);
            st.registrations += 1;
            let m = welcome(cfg, st, Role::Worker, rank as u32, st.registrations, self.plan(st), false, false);
            out.push((p.peer, m.to_frame(p.id)));
        }
        tracing::info!(servers = cfg.servers, workers = cfg.workers, seats, "job started");
    }

    fn worker_done(&self, st: &mut State, rank: usize, error: Option<String>, out: &mut Vec<(PeerId, Frame)>) {
        Self::worker_done_in(&self.shared, st, rank, error, out)
    }

    fn worker_done_in(
        _shared: &Shared,
        st: &mut State,
        rank: usize,
        error: Option<String>,
        out: &mut Vec<(PeerId, Frame)>,
    ) {
        st.done[rank] = true;
        Self::worker_gone_from_join(st, rank, out);
        for (_, p) in st.queued.extract_if(.., |(r, _)| *r == rank) {
            let m = format!("worker rank {rank} finished; the job has no free worker place");
            out.push((p.peer, Control::Error(m).to_frame(p.id)));
        }
        // Consistency waits of the others must not wait for this worker.
        for (s, &p) in st.server_peers.iter().enumerate() {
            if st.server_infos[s].alive {
                out.push((p, Control::WorkerLeft { worker: rank as u32 }.to_frame(0)));
            }
        }
        if let Some(e) = error {
            tracing::error!(worker = rank, error = %e, "worker failed");
            st.failure.get_or_insert_with(|| format!("worker {rank} failed: {e}"));
            let msg = format!("barrier abandoned: worker {rank} failed: {e}");
            for (p, i) in st.barrier.drain(..) {
                out.push((p, Control::Error(msg.clone()).to_frame(i)));
            }
            // Nor does a checkpoint wait for it.
            if let Some(round) = st.checkpoint.take_if(|r| r.servers.is_empty()) {
                st.last_checkpoint = Some(round.clock);
                let msg = format!("checkpoint abandoned: worker {rank} failed: {e}");
                for (_, p, i) in round.workers {
                    out.push((p, Control::Error(msg.clone()).to_frame(i)));
                }
            }
        } else {
            // A finished worker no longer counts towards barriers.
            Self::release_barrier_in(st, out);
        }
        if st.done.iter().all(|d| *d) {
            for (s, &p) in st.server_peers.iter().enumerate() {
                if st.server_infos[s].alive {
                    out.push((p, Control::Shutdown.to_frame(0)));
                }
            }
            for p in st.joiners.drain(..) {
                out.push((p.peer, Control::Shutdown.to_frame(p.id)));
            }
            st.finished = true;
            tracing::info!("all workers done; job finished");
        }
    }

    /// Completes the barrier once every worker that is not done (lost ranks
    /// included: their next incarnation comes) has arrived.
    /// A checkpoint round ends unwritten: its workers hear so.
    fn checkpoint_unwritten(st: &mut State, round: CheckpointRound, out: &mut Vec<(PeerId, Frame)>) {
        st.last_checkpoint = Some(round.clock);
        for (_, p, i) in round.workers {
            out.push((p, Control::CheckpointDone { clock: round.clock, written: false }.to_frame(i)));
        }
    }

    /// The job cannot go on: `failure` (unless one came first) ends it, and
    /// the workers waiting at a barrier hear why.
    fn fail_job_in(st: &mut State, failure: String, out: &mut Vec<(PeerId, Frame)>) {
        st.failure.get_or_insert(failure);
        let msg = format!("barrier abandoned: {}", st.failure.as_deref().unwrap_or_default());
        for (p, i) in st.barrier.drain(..) {
            out.push((p, Control::Error(msg.clone()).to_frame(i)));
        }
    }

    fn release_barrier_in(st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        let alive = st.done.iter().filter(|d| !**d).count();
        if alive > 0 && st.barrier.len() >= alive {
            st.barriers_done += 1;
            for (p, i) in st.barrier.drain(..) {
                out.push((p, Control::BarrierDone.to_frame(i)));
            }
        }
    }

    /// Worker `rank` died (its connection dropped or it went silent) before
    /// saying it is done: the servers stop waiting for it and its rank waits
    /// for a new incarnation, or the job fails at once when the job allows
    /// no restarts.
    fn worker_lost_in(shared: &Shared, st: &mut State, rank: usize, why: String, out: &mut Vec<(PeerId, Frame)>) {
        let timeout = shared.cfg.worker_restart_timeout;
        if timeout.is_zero() || st.failure.is_some() {
            return Self::worker_done_in(shared, st, rank, Some(why), out);
        }
        let Some(peer) = st.worker_peers[rank].take() else { return };
        Self::worker_gone_from_join(st, rank, out);
        tracing::warn!(worker = rank, why, "worker lost; waiting {timeout:?} for it to be restarted");
        st.ops.gone(peer);
        // Consistency waits of the others must not wait for it meanwhile
        // (but where its pushes are part of a clock's state).
        for (s, &p) in st.server_peers.iter().enumerate() {
            if st.server_infos[s].alive {
                out.push((p, Control::WorkerLost { worker: rank as u32 }.to_frame(0)));
            }
        }
        // Its barrier entry is dropped (the new incarnation arrives again);
        // its checkpoint arrival stays valid (see `Control::Checkpoint`).
        st.barrier.retain(|(p, _)| *p != peer);
        // In case it still runs (silent, not dead): it is out.
        out.push((peer, Control::Shutdown.to_frame(0)));
        st.lost[rank] = Some(Lost { since: std::time::Instant::now(), why, peer });
        if let Some(i) = st.queued.iter().position(|(r, _)| *r == rank) {
            let (_, p) = st.queued.remove(i);
            Self::rejoin_worker_in(shared, st, p, out);
        }
    }

    /// Fails the job for every lost rank whose grace period is over.
    fn restart_deadlines_in(shared: &Shared, st: &mut State, now: std::time::Instant, out: &mut Vec<(PeerId, Frame)>) {
        let timeout = shared.cfg.worker_restart_timeout;
        for rank in 0..st.lost.len() {
            let Some(lost) = st.lost[rank].take_if(|l| now.duration_since(l.since) >= timeout) else { continue };
            let e = format!(
                "lost ({}) and not restarted within {timeout:?} (--worker-restart-timeout {})",
                lost.why,
                timeout.as_secs_f64()
            );
            Self::worker_done_in(shared, st, rank, Some(e), out);
        }
    }

    /// A worker registering after the job started: it takes a lost rank, or
    /// else a free seat.
    fn rejoin_worker_in(shared: &Shared, st: &mut State, p: Pending, out: &mut Vec<(PeerId, Frame)>) {
        if let Some(f) = &st.failure {
            out.push((p.peer, Control::Error(format!("the job failed: {f}")).to_frame(p.id)));
            return;
        }
        if st.finished {
            out.push((p.peer, Control::Error("the job has finished".into()).to_frame(p.id)));
            return;
        }
        let free: Vec<bool> =
            (0..st.lost.len()).map(|r| st.lost[r].is_some() && !st.rejoining.iter().any(|(q, _, _)| *q == r)).collect();
        let Some(rank) = rejoin_rank(&free, p.rank) else {
            if let Some(r) = p.rank.map(|r| r as usize).filter(|&r| r < st.done.len() && !st.done[r])
                && st.worker_peers[r].is_some()
            {
                // A supervisor restarting a worker whose death the scheduler
                // has not noticed yet (its connection's end is still on its
                // way, or its heartbeats have not timed out).
                tracing::info!(worker = r, "a new worker for a rank that still runs: it waits until it is lost");
                st.queued.push((r, p));
                return;
            }
            if let Some(seat) = rejoin_rank(&st.free, p.rank) {
                return Self::take_seat_in(shared, st, seat, p, out);
            }
            let lost: Vec<usize> = (0..free.len()).filter(|&r| free[r]).collect();
            let seats = shared.cfg.seats();
            let m = match p.rank {
                Some(r) if lost.is_empty() => {
                    format!("the job has no free worker place (rank {r} is not lost, and no seat of {seats} is free)")
                }
                Some(r) => format!("worker rank {r} is not lost (lost ranks: {lost:?})"),
                None => format!("the job has no free worker place (all {seats} seats taken; see --max-workers)"),
            };
            out.push((p.peer, Control::Error(m).to_frame(p.id)));
            return;
        };
        let lost = st.lost[rank].take().expect("a free rank is lost");
        // The new incarnation's row replaces the old one's in the status.
        if let Some(old) = st.workers.iter_mut().find(|q| q.peer == lost.peer) {
            *old = Pending { peer: p.peer, id: p.id, addr: p.addr.clone(), rank: Some(rank as u32) };
        }
        tracing::info!(worker = rank, addr = %p.addr, after = ?lost.since.elapsed(), "a worker restarts in a lost rank");
        if !Self::can_welcome_worker(st) {
            // Its server list would be one the servers are still applying.
            st.rejoining.push((rank, p, false));
        } else {
            Self::welcome_restarted_in(shared, st, rank, p, false, out);
        }
    }

    /// A worker joining the running job takes free seat `seat`: from now on
    /// barriers and checkpoints count it, and it starts at the job's clock.
    fn take_seat_in(shared: &Shared, st: &mut State, seat: usize, p: Pending, out: &mut Vec<(PeerId, Frame)>) {
        st.free[seat] = false;
        st.done[seat] = false;
        st.workers.push(Pending { peer: p.peer, id: p.id, addr: p.addr.clone(), rank: Some(seat as u32) });
        tracing::info!(worker = seat, addr = %p.addr, "a worker joins the running job in a free seat");
        if !Self::can_welcome_worker(st) {
            st.rejoining.push((seat, p, true));
        } else {
            Self::welcome_restarted_in(shared, st, seat, p, true, out);
        }
    }

    /// Whether a worker taking a rank mid-job can be welcomed now: not while
    /// the servers apply a membership change (its server list would be one
    /// they are still applying), nor while a joining server has not applied
    /// its welcome (it would refuse the worker's clock).
    fn can_welcome_worker(st: &State) -> bool {
        st.applying.is_none() && !st.join.as_ref().is_some_and(|j| j.phase == JoinPhase::Welcomed)
    }

    /// A new incarnation that disconnected before its (deferred) welcome:
    /// its rank is lost again, with a fresh grace period; a worker that was
    /// to take a free seat gives it back (it sent nothing).
    fn rejoining_gone_in(st: &mut State, peer: PeerId) {
        st.queued.retain(|(_, p)| p.peer != peer);
        if let Some(i) = st.rejoining.iter().position(|(_, p, _)| p.peer == peer) {
            let (rank, _, joined) = st.rejoining.remove(i);
            if joined {
                st.free[rank] = true;
                st.done[rank] = true;
                st.workers.retain(|q| q.peer != peer);
                return;
            }
            let why = "its new worker disconnected before it was welcomed".to_string();
            st.lost[rank] = Some(Lost { since: std::time::Instant::now(), why, peer });
        }
    }

    /// New incarnations that waited for a membership change to be in effect.
    fn welcome_rejoining_in(shared: &Shared, st: &mut State, out: &mut Vec<(PeerId, Frame)>) {
        if !Self::can_welcome_worker(st) {
            return;
        }
        for (rank, p, joined) in std::mem::take(&mut st.rejoining) {
            Self::welcome_restarted_in(shared, st, rank, p, joined, out);
        }
    }

    fn welcome_restarted_in(
        shared: &Shared,
        st: &mut State,
        rank: usize,
        p: Pending,
        joined: bool,
        out: &mut Vec<(PeerId, Frame)>,
    ) {
        let cfg = &shared.cfg;
        st.worker_peers[rank] = Some(p.peer);
        st.registrations += 1;
        // Checkpoints go on; the job's restored one is long applied.
        let every = if cfg.checkpoint_dir.is_some() { cfg.checkpoint_every } else { 0 };
        let plan = crate::proto::CheckpointPlan { every, restore: None };
        let m = welcome(cfg, st, Role::Worker, rank as u32, st.registrations, plan, !joined, joined);
        out.push((p.peer, m.to_frame(p.id)));
    }
}

/// The welcome of a node: the job as it stands (servers, epoch) and what
/// the node is in it.
#[allow(clippy::too_many_arguments)]
fn welcome(
    cfg: &SchedulerConfig,
    st: &State,
    role: Role,
    rank: u32,
    incarnation: u32,
    plan: crate::proto::CheckpointPlan,
    restarted: bool,
    joined: bool,
) -> Control {
    Control::Welcome {
        role,
        rank,
        servers: st.server_infos.clone(),
        workers: cfg.seats(),
        seated: cfg.workers,
        joined,
        vnodes: cfg.vnodes,
        epoch: st.epoch,
        replicas: cfg.replicas(),
        incarnation,
        checkpoint: Some(plan),
        restarted,
    }
}

/// The rank a worker registering mid-job takes: the one it asks for if that
/// rank is `free` (lost, not yet taken again), else, when it asks for none,
/// the lowest free one.
fn rejoin_rank(free: &[bool], requested: Option<u32>) -> Option<usize> {
    match requested {
        Some(r) => free.get(r as usize).copied().unwrap_or(false).then_some(r as usize),
        None => free.iter().position(|f| *f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_worker_takes_its_lost_rank_or_the_lowest_one() {
        let free = [false, true, false, true];
        assert_eq!(rejoin_rank(&free, Some(3)), Some(3));
        assert_eq!(rejoin_rank(&free, None), Some(1));
        // A rank that runs (or does not exist) is never taken over.
        assert_eq!(rejoin_rank(&free, Some(0)), None);
        assert_eq!(rejoin_rank(&free, Some(9)), None);
        assert_eq!(rejoin_rank(&[false, false], None), None);
    }
}
