//! The scheduler's view for operators: the latest report of every node
//! (sent with heartbeats) and the job status assembled from them on demand.
//! Only stores and reads; it never decides anything about the job.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::State;
use crate::proto::Role;
use crate::status::{JobStatus, NodeStatus, Rates, Report, ServerReport, WorkerReport};
use crate::transport::PeerId;

/// Reports by node, and which nodes are gone.
pub(super) struct Ops {
    started: Instant,
    /// Latest report per peer, and the server report before it (for rates).
    reports: HashMap<PeerId, (Instant, Report)>,
    previous: HashMap<PeerId, (Instant, ServerReport)>,
    gone: HashSet<PeerId>,
}

impl Default for Ops {
    fn default() -> Self {
        Ops { started: Instant::now(), reports: HashMap::new(), previous: HashMap::new(), gone: HashSet::new() }
    }
}

impl Ops {
    pub(super) fn record(&mut self, from: PeerId, report: Report) {
        let now = Instant::now();
        if let Some((t, Report::Server(old))) = self.reports.insert(from, (now, report)) {
            self.previous.insert(from, (t, old));
        }
    }

    pub(super) fn gone(&mut self, peer: PeerId) {
        self.gone.insert(peer);
    }

    fn server_report(&self, peer: PeerId) -> (Option<ServerReport>, Rates) {
        let Some((t, Report::Server(r))) = self.reports.get(&peer) else { return (None, Rates::default()) };
        let rates = match self.previous.get(&peer) {
            Some((t0, old)) => Rates::between(old, r, t.duration_since(*t0).as_secs_f64()),
            None => Rates::default(),
        };
        (Some(r.clone()), rates)
    }

    fn worker_report(&self, peer: PeerId) -> Option<WorkerReport> {
        match self.reports.get(&peer) {
            Some((_, Report::Worker(w))) => Some(w.clone()),
            _ => None,
        }
    }
}

impl State {
    /// The job as it stands.
    pub(super) fn job_status(&self, servers: u32, workers: u32) -> JobStatus {
        let now = Instant::now();
        let heard = |p: PeerId| self.last_seen.get(&p).map(|t| now.duration_since(*t).as_secs_f64());
        let mut nodes = Vec::new();
        let welcomed = !self.server_peers.is_empty();
        for p in &self.servers {
            let rank = self.server_peers.iter().position(|&q| q == p.peer).map(|r| r as u32).or(p.rank);
            let dead = rank.and_then(|r| self.server_infos.get(r as usize)).is_some_and(|i| !i.alive);
            let state = if dead {
                "dead"
            } else if self.ops.gone.contains(&p.peer) && !self.finished {
                "lost"
            } else if self.finished {
                "finished"
            } else if welcomed {
                "running"
            } else {
                "registered"
            };
            let (server, rates) = self.ops.server_report(p.peer);
            nodes.push(NodeStatus {
                role: Role::Server,
                rank,
                addr: p.addr.clone(),
                state: state.into(),
                last_heartbeat_s: heard(p.peer),
                server,
                worker: None,
                rates,
            });
        }
        for p in &self.workers {
            let rank = self.worker_peers.iter().position(|&q| q == Some(p.peer)).map(|r| r as u32);
            let done = rank.is_some_and(|r| self.done.get(r as usize).copied().unwrap_or(false));
            let failed = rank
                .is_some_and(|r| self.failure.as_deref().is_some_and(|f| f.starts_with(&format!("worker {r} failed"))));
            let state = if failed {
                "failed"
            } else if done {
                "done"
            } else if self.ops.gone.contains(&p.peer) {
                "lost"
            } else if rank.is_some() {
                "running"
            } else {
                "registered"
            };
            nodes.push(NodeStatus {
                role: Role::Worker,
                rank: rank.or(p.rank),
                addr: p.addr.clone(),
                state: state.into(),
                last_heartbeat_s: heard(p.peer),
                server: None,
                worker: self.ops.worker_report(p.peer),
                rates: Rates::default(),
            });
        }
        nodes.sort_by_key(|n| (n.role != Role::Server, n.rank));
        let phase = match (&self.failure, self.finished) {
            (Some(_), _) => "failed",
            (None, true) => "finished",
            (None, false) if self.worker_peers.is_empty() => "registering",
            _ => "running",
        };
        let epoch = self.epoch.max(1);
        JobStatus {
            servers,
            workers,
            epoch,
            phase: phase.into(),
            failure: self.failure.clone(),
            uptime_s: now.duration_since(self.ops.started).as_secs_f64(),
            nodes,
            migrations_ms: self.migrations.clone(),
            joining: self.join.as_ref().map(|j| j.rank as u32),
        }
    }
}
