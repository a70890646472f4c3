//! What a running job reports about itself (DESIGN section 10): the figures
//! servers and workers send the scheduler with their heartbeats, the job
//! status the scheduler assembles from them, the `pserver status` client,
//! and its human rendering. Prometheus rendering of the same figures is in
//! [`crate::metrics`].
//!
//! Everything here is plain data with serde derives; nodes fill it in from
//! their own counters, the scheduler only stores and forwards it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::proto::{Control, Role};
use crate::transport::{Frame, Handler, Messenger, PeerId, Transport, TransportStats};
use crate::worker::Traffic;

/// A worker clock meaning "this worker left the job" in clock lists.
pub const CLOCK_LEFT: u64 = u64::MAX;

/// One table as one server holds it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TableReport {
    pub id: u32,
    pub keys: u64,
    pub dim: u32,
    /// "dense" or "sparse".
    pub storage: String,
    /// "sequential", "bounded-delay(T)" or "eventual".
    pub consistency: String,
    /// The key ranges `[start, end)` this server owns.
    pub ranges: Vec<(u64, u64)>,
    /// Per worker rank: the last clock whose pushes every shard of the table
    /// on this server has applied ([`CLOCK_LEFT`] once the worker left).
    pub clocks: Vec<u64>,
}

impl TableReport {
    /// Smallest and largest clock over the workers still in the job.
    pub fn clock_span(&self) -> Option<(u64, u64)> {
        let live = self.clocks.iter().copied().filter(|&c| c != CLOCK_LEFT);
        let min = live.clone().min()?;
        Some((min, live.max().unwrap_or(min)))
    }

    /// How many clocks the slowest live worker is behind the fastest.
    pub fn staleness(&self) -> u64 {
        self.clock_span().map_or(0, |(lo, hi)| hi - lo)
    }
}

/// A server's figures, cumulative since it started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerReport {
    pub rank: Option<u32>,
    pub addr: String,
    pub epoch: u32,
    /// Data requests by kind.
    pub pushes: u64,
    pub pulls: u64,
    pub push_pulls: u64,
    /// Keys in those requests.
    pub keys_pushed: u64,
    pub keys_pulled: u64,
    /// Payload bytes (keys, values) of requests and of replies.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    /// Requests refused (malformed, over a limit, unknown table...).
    pub refused: u64,
    /// Shard memory in use and the budget (`--max-memory`).
    pub memory_used: u64,
    pub memory_limit: Option<u64>,
    /// Wire-level counters of the server's endpoint.
    pub transport: TransportStats,
    pub tables: Vec<TableReport>,
}

/// A worker's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    pub rank: u32,
    pub clock: u32,
    pub traffic: Traffic,
}

/// What a node sends the scheduler with its heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Report {
    Server(ServerReport),
    Worker(WorkerReport),
}

/// Rates over the last two reports of a node, per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub pushes: f64,
    pub pulls: f64,
    pub bytes_received: f64,
    pub bytes_sent: f64,
}

/// One node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub role: Role,
    pub rank: Option<u32>,
    pub addr: String,
    /// "registered" (waiting for the job to fill), "running", "done",
    /// "failed", "dead" (a server the job failed over from) or "lost"
    /// (disconnected before the end).
    pub state: String,
    /// Seconds since the scheduler last heard from the node.
    pub last_heartbeat_s: Option<f64>,
    pub server: Option<ServerReport>,
    pub worker: Option<WorkerReport>,
    pub rates: Rates,
}

/// The whole job, as `pserver status` prints it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Servers and workers the job is made of.
    pub servers: u32,
    pub workers: u32,
    pub epoch: u32,
    /// "registering", "running", "finished" or "failed".
    pub phase: String,
    pub failure: Option<String>,
    pub uptime_s: f64,
    pub nodes: Vec<NodeStatus>,
    /// Servers that joined the running job, and how long each migration
    /// took (registration to owning its ranges), milliseconds.
    #[serde(default)]
    pub migrations_ms: Vec<f64>,
    /// A server joining right now (its rank), if any.
    #[serde(default)]
    pub joining: Option<u32>,
}

impl Rates {
    /// From two reports `dt` seconds apart.
    pub fn between(old: &ServerReport, new: &ServerReport, dt: f64) -> Rates {
        if dt <= 0.0 {
            return Rates::default();
        }
        let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt;
        Rates {
            pushes: per_s(old.pushes + old.push_pulls, new.pushes + new.push_pulls),
            pulls: per_s(old.pulls + old.push_pulls, new.pulls + new.push_pulls),
            bytes_received: per_s(old.bytes_received, new.bytes_received),
            bytes_sent: per_s(old.bytes_sent, new.bytes_sent),
        }
    }
}

/// Collects the one reply a status query waits for.
struct Answer {
    tx: parking_lot::Mutex<Option<std::sync::mpsc::SyncSender<Result<Control>>>>,
}

impl Handler for Answer {
    fn on_frame(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) {
        let r = Control::from_frame(&frame, &net.peer_addr(from));
        if let Some(tx) = self.tx.lock().take() {
            let _ = tx.send(r);
        }
    }
    fn on_disconnect(&self, _net: &Arc<dyn Messenger>, peer: PeerId) {
        if let Some(tx) = self.tx.lock().take() {
            let _ = tx.send(Err(Error::Disconnected(format!("the scheduler ({peer})"))));
        }
    }
}

/// Asks the scheduler at `addr` for the job's status (over `transport`,
/// authenticated like any connection).
pub fn query(transport: &dyn Transport, addr: &str, timeout: Duration) -> Result<JobStatus> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let net = transport.bind("", Arc::new(Answer { tx: parking_lot::Mutex::new(Some(tx)) }))?;
    let result = (|| {
        let peer = net.connect(addr)?;
        net.send(peer, Control::Status.to_frame(1))?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(Control::StatusReply(s))) => Ok(*s),
            Ok(Ok(Control::Error(m))) => Err(Error::Remote { peer: addr.into(), message: m }),
            Ok(Ok(other)) => Err(Error::protocol(addr, format!("expected the job status, got {other:?}"))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Config(format!("no status from the scheduler at {addr} within {timeout:?}"))),
        }
    })();
    net.shutdown();
    result
}

fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn clock_text(c: u64) -> String {
    if c == CLOCK_LEFT { "left".into() } else { c.to_string() }
}

/// The status as a human reads it.
pub fn render(s: &JobStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "job: {}, {} servers, {} workers, epoch {}, up {:.1} s",
        s.phase, s.servers, s.workers, s.epoch, s.uptime_s
    );
    if let Some(f) = &s.failure {
        let _ = writeln!(o, "failure: {f}");
    }
    if let Some(r) = s.joining {
        let _ = writeln!(o, "server {r} is joining (ranges are being copied to it)");
    }
    if !s.migrations_ms.is_empty() {
        let ms: Vec<String> = s.migrations_ms.iter().map(|m| format!("{m:.0} ms")).collect();
        let _ = writeln!(o, "servers joined: {} (migrations {})", ms.len(), ms.join(", "));
    }
    let _ = writeln!(o, "\n{:<9} {:>4}  {:<22} {:<10} {:>14}", "NODE", "RANK", "ADDRESS", "STATE", "LAST HEARTBEAT");
    for n in &s.nodes {
        let rank = n.rank.map_or_else(|| "-".into(), |r| r.to_string());
        let hb = n.last_heartbeat_s.map_or_else(|| "-".into(), |t| format!("{t:.1} s ago"));
        let _ = writeln!(o, "{:<9} {:>4}  {:<22} {:<10} {:>14}", n.role.to_string(), rank, n.addr, n.state, hb);
    }
    let servers: Vec<&ServerReport> = s.nodes.iter().filter_map(|n| n.server.as_ref()).collect();
    let mut tables: Vec<u32> = servers.iter().flat_map(|r| r.tables.iter().map(|t| t.id)).collect();
    tables.sort_unstable();
    tables.dedup();
    if !tables.is_empty() {
        let _ = writeln!(o, "\ntables:");
    }
    for id in tables {
        let parts: Vec<(Option<u32>, &TableReport)> =
            servers.iter().filter_map(|r| r.tables.iter().find(|t| t.id == id).map(|t| (r.rank, t))).collect();
        let t = parts[0].1;
        let lo = parts.iter().filter_map(|(_, t)| t.clock_span()).map(|(lo, _)| lo).min();
        let hi = parts.iter().filter_map(|(_, t)| t.clock_span()).map(|(_, hi)| hi).max();
        let clocks = match (lo, hi) {
            (Some(lo), Some(hi)) => format!("clocks {lo}..{hi}, staleness {}", hi - lo),
            _ => "no live workers".into(),
        };
        let _ = writeln!(o, "  table {id}: {} keys x {} ({}, {}), {clocks}", t.keys, t.dim, t.storage, t.consistency);
        for (rank, t) in &parts {
            let ranges: Vec<String> = t.ranges.iter().take(4).map(|(a, b)| format!("[{a}, {b})")).collect();
            let more = if t.ranges.len() > 4 { format!(" and {} more", t.ranges.len() - 4) } else { String::new() };
            let per_worker: Vec<String> = t.clocks.iter().map(|&c| clock_text(c)).collect();
            let _ = writeln!(
                o,
                "    server {}: {} ranges {}{more}; worker clocks [{}]",
                rank.map_or_else(|| "?".into(), |r| r.to_string()),
                t.ranges.len(),
                ranges.join(" "),
                per_worker.join(", ")
            );
        }
    }
    let with_traffic: Vec<&NodeStatus> = s.nodes.iter().filter(|n| n.server.is_some() || n.worker.is_some()).collect();
    if !with_traffic.is_empty() {
        let _ = writeln!(o, "\ntraffic:");
    }
    for n in with_traffic {
        let rank = n.rank.map_or_else(|| "?".into(), |r| r.to_string());
        if let Some(r) = &n.server {
            let _ = writeln!(
                o,
                "  server {rank}: {:.0} pushes/s, {:.0} pulls/s, in {}/s, out {}/s; total {} pushes, {} pulls, \
                 {} push-pulls, {} in, {} out, {} refused; memory {}{}; {} connections, {} failed authentication",
                n.rates.pushes,
                n.rates.pulls,
                human_bytes(n.rates.bytes_received),
                human_bytes(n.rates.bytes_sent),
                r.pushes,
                r.pulls,
                r.push_pulls,
                human_bytes(r.bytes_received as f64),
                human_bytes(r.bytes_sent as f64),
                r.refused,
                human_bytes(r.memory_used as f64),
                r.memory_limit.map_or_else(String::new, |m| format!(" of {}", human_bytes(m as f64))),
                r.transport.connections,
                r.transport.auth_failures,
            );
        }
        if let Some(w) = &n.worker {
            let t = &w.traffic;
            let _ = writeln!(
                o,
                "  worker {rank}: clock {}, {} requests, {} keys, sent {}, received {}, {} shared-memory pulls",
                w.clock,
                t.requests,
                t.keys_sent,
                human_bytes(t.bytes_sent as f64),
                human_bytes(t.bytes_received as f64),
                t.shm_pulls
            );
        }
    }
    o
}
