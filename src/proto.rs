//! The pserver protocol on top of frames: frame kinds, the plain headers of
//! data requests and replies, and the control messages.
//!
//! A data request (push, pull, push-pull) goes to one server and carries one
//! or more *runs*: the keys of the worker's request that fall in one key range
//! (one shard) of that server, each with its index in the worker's request so
//! that replies can be placed without any server-side reassembly.
//!
//! ```text
//! meta      DataHeader, then DataHeader.runs x RunHeader
//! segments  per run, in order: keys (u64, only for RunForm::List), then
//!           values (f32, keys x dim, only for push and push-pull)
//! ```
//! A version-filtered pull (`flags::VERSIONED`) adds, per run after its keys,
//! the versions the worker last saw (u32 per key; [`VERSION_UNKNOWN`] for a
//! key it never saw).
//!
//! A reply names the runs it answers:
//! ```text
//! meta      ReplyHeader, then ReplyHeader.runs x RunReply
//! segments  per run, in the order of the RunReply records:
//!             status OK with values: values (f32)
//!             status CHANGED: bitmap of changed keys (1 bit per key, LSB
//!               first), values of the changed keys, their versions (u32)
//!           then, after all runs, one UTF-8 message per run with an error
//! ```
//! Control messages (registration, tables, barriers) are small and rare:
//! `Control` values encoded with postcard in segment 0 of a CONTROL frame.

use bytemuck::{Pod, Zeroable};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::table::TableSpec;
use crate::transport::{Frame, RegionDesc};

/// Frame kinds.
pub mod kind {
    pub const CONTROL: u16 = 1;
    pub const PUSH: u16 = 16;
    pub const PULL: u16 = 17;
    pub const PUSH_PULL: u16 = 18;
    /// Worker finished a clock: meta is a DataHeader with 0 runs.
    pub const CLOCK: u16 = 19;
    /// Reply to a data request.
    pub const REPLY: u16 = 32;
    /// The request as a whole was refused; segment 0 is the message.
    pub const REFUSED: u16 = 33;
    /// Server -> worker: digests this connection's cache lacks (segment 0,
    /// u64 each); the server holds the connection's data requests, in order,
    /// until a KEYS frame supplies them.
    pub const NEED_KEYS: u16 = 34;
    /// Worker -> server: key lists for a cache; meta is their digests (u64
    /// each), one keys segment per digest.
    pub const KEYS: u16 = 20;
    /// Worker -> server: a frame waits in the connection's shared-memory
    /// ring; meta is its position and length (u64 each).
    pub const RING: u16 = 21;
    /// Owner -> replica: the state of keys of one range after the owner
    /// applied pushes to them (see [`super::ReplHeader`]).
    pub const REPLICATE: u16 = 22;
    /// Replica -> owner: a REPLICATE frame is applied; meta is its batch (u64).
    pub const REPLICATED: u16 = 36;
}

/// How a run's keys are spelled.
pub mod run_form {
    /// A keys segment lists them.
    pub const LIST: u32 = 0;
    /// `first, first+1, ..., first+count-1`; no keys segment.
    pub const RANGE: u32 = 1;
    /// A keys segment lists them; the server keeps the list under the run's
    /// digest for later requests on this connection.
    pub const LIST_CACHE: u32 = 2;
    /// No keys segment: the keys are the list kept under the run's digest.
    pub const CACHED: u32 = 3;

    /// Whether a run of this form carries a keys segment.
    pub fn has_keys(form: u32) -> bool {
        form == LIST || form == LIST_CACHE
    }
}

/// Bytes of key lists a worker may ask one server to keep for it; the
/// server accepts twice that before it treats the peer as misbehaving.
pub const KEY_CACHE_BUDGET: usize = 64 << 20;

/// Reply status of one run.
pub mod status {
    pub const OK: u32 = 0;
    pub const ERROR: u32 = 1;
    /// A version-filtered pull: only the changed keys are returned.
    pub const CHANGED: u32 = 2;
    /// The server does not own the run's keys in its epoch (the reply
    /// header's): route it again with a newer map. Nothing was applied.
    pub const MOVED: u32 = 3;
}

/// `DataHeader::flags` bits.
pub mod flags {
    /// A pull that carries known versions and wants only changed keys.
    pub const VERSIONED: u32 = 1;
    /// A CLOCK frame that *sets* the worker's clock to its value, lower or
    /// not (a restarted worker re-entering the consistency bookkeeping at
    /// its resume clock); a plain CLOCK frame only raises it.
    pub const CLOCK_RESET: u32 = 2;
}

/// The version a worker sends for a key it never saw: odd, so it never equals
/// a published version.
pub const VERSION_UNKNOWN: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct DataHeader {
    pub table: u32,
    /// Worker rank.
    pub worker: u32,
    /// The worker's clock when it issued the request.
    pub clock: u32,
    /// The range-map epoch the worker routed with.
    pub epoch: u32,
    pub runs: u32,
    pub flags: u32,
    /// Sequence number of the worker's ordered frames to this server:
    /// consecutive per (worker, server), so that a server can apply frames
    /// that came by different channels (TCP, RDMA ring) in order.
    pub seq: u64,
    /// Maximal delay: the request completes once every shard it touches has
    /// applied all workers' pushes of clocks `< clock - tau`.
    /// [`TAU_EVENTUAL`] never waits.
    pub tau: u32,
    pub reserved: u32,
}

/// `DataHeader::tau` of an eventual-consistency request.
pub const TAU_EVENTUAL: u32 = u32::MAX;

impl DataHeader {
    /// The progress every touched shard must have reached, if any.
    pub fn needed_progress(&self) -> Option<u64> {
        if self.tau == TAU_EVENTUAL {
            return None;
        }
        let need = u64::from(self.clock).checked_sub(u64::from(self.tau))?;
        (need > 0).then_some(need)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct RunHeader {
    /// Index of this run in the worker's request.
    pub run: u32,
    pub form: u32,
    pub first: u64,
    pub count: u64,
    /// Names the run's key list (`run_form::LIST_CACHE` and `CACHED`).
    pub digest: u64,
    /// Pushes: the push's sequence number, `clock << 32` plus its place
    /// among the worker's pushes to the table at that clock (all runs of a
    /// push share it; it grows in issue order). A shard applies a worker's
    /// run to a key range only if its seq is above the last one that range
    /// applied from the worker, so a retry (after a failover) is never
    /// applied twice, and a restarted worker's redone pushes apply only
    /// where its predecessor's did not. 0 for pulls and for pushes that opt
    /// out.
    pub seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct ReplyHeader {
    pub table: u32,
    pub runs: u32,
    /// The smallest shard progress this reply was served at: every worker's
    /// pushes of clocks `< progress` were applied (`u64::MAX`: no shard).
    pub progress: u64,
    /// The server's membership epoch (runs answered `MOVED` need a map at
    /// least this new).
    pub epoch: u32,
    pub reserved: u32,
}

/// `ReplHeader::flags` bits.
pub mod repl {
    /// Keys are `first..first + count` (no keys segment).
    pub const RANGE: u32 = 1;
    /// A state segment follows the values (rules with per-key state).
    pub const STATE: u32 = 2;
    /// A pending-clock segment follows (aggregating rules).
    pub const PENDING: u32 = 4;
    /// Part of a full copy of the range (a new replica's first data).
    pub const SNAPSHOT: u32 = 8;
    /// The keys' slots as raw words (`first..first + count`, a dense
    /// range) instead of versions and values.
    pub const RAW: u32 = 16;
    /// The last delta of its range (`start..end`) in the batch: the
    /// receiver learns the range's seqs from it, once all of the range's
    /// keys of the batch are applied (a batch cut short by the sender's
    /// death must not teach seqs of pushes whose keys did not all arrive).
    pub const LAST: u32 = 32;
}

/// Owner -> replica: the state of `count` keys of `table` after the owner
/// applied pushes, replication *after aggregation*: every key once per
/// batch of applied requests, whatever number of pushes touched it.
/// ```text
/// segments  keys (u64, unless repl::RANGE), versions (u32), values (f32,
///           count x dim) -- or, with repl::RAW, the slots' words (u64),
///           state (f32, count x state per key, repl::STATE),
///           pending clock (u64 per key, repl::PENDING),
///           last applied push seq per worker (u64 x workers),
///           progress per worker (u64 x workers)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct ReplHeader {
    pub table: u32,
    /// The owner's server index and membership epoch.
    pub from: u32,
    pub epoch: u32,
    pub flags: u32,
    /// Acknowledged with a REPLICATED frame naming it.
    pub batch: u64,
    /// The owner's range the keys belong to.
    pub start: u64,
    pub end: u64,
    pub first: u64,
    pub count: u64,
    pub workers: u32,
    pub reserved: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct RunReply {
    pub run: u32,
    pub status: u32,
    pub count: u64,
}

/// Splits `meta` into a fixed header and `n` trailing records, checking sizes.
pub fn parse_meta<H: Pod, R: Pod>(meta: &[u8], count: impl Fn(&H) -> u32) -> Option<(H, Vec<R>)> {
    let hs = std::mem::size_of::<H>();
    let h: H = bytemuck::try_pod_read_unaligned(meta.get(..hs)?).ok()?;
    let n = count(&h) as usize;
    let rs = std::mem::size_of::<R>();
    let rest = &meta[hs..];
    if rest.len() != n.checked_mul(rs)? {
        return None;
    }
    let recs = rest.chunks_exact(rs).map(bytemuck::pod_read_unaligned).collect();
    Some((h, recs))
}

/// Builds `meta` from a header and records.
pub fn build_meta<H: Pod, R: Pod>(h: &H, recs: &[R]) -> Bytes {
    let mut v = Vec::with_capacity(std::mem::size_of::<H>() + std::mem::size_of_val(recs));
    v.extend_from_slice(bytemuck::bytes_of(h));
    v.extend_from_slice(bytemuck::cast_slice(recs));
    Bytes::from(v)
}

/// A node's role in the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Scheduler,
    Server,
    Worker,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Scheduler => "scheduler",
            Role::Server => "server",
            Role::Worker => "worker",
        })
    }
}

/// A server as the ring knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Stable node id (also the ring's hash input).
    pub id: u32,
    pub addr: String,
    /// Dead servers stay in the list (their tokens stay on the ring).
    pub alive: bool,
    /// A server joining the job (first phase of its migration): it owns
    /// nothing yet and learns copies of the ranges it will hold.
    #[serde(default)]
    pub joining: bool,
}

/// A shard as a same-host worker maps it (dense tables): its key range and
/// the files of its header and slots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmShard {
    pub start: u64,
    pub end: u64,
    pub header: String,
    pub slots: String,
}

/// A shard as an RDMA worker reads it (dense tables): its key range, and
/// its header (progress words) and slots, both registered for remote READ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaShard {
    pub start: u64,
    pub end: u64,
    pub header: RegionDesc,
    pub slots: RegionDesc,
}

/// How a job checkpoints, and what it restores from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointPlan {
    /// Workers wait for a checkpoint at every clock divisible by this (0:
    /// never).
    pub every: u32,
    /// The checkpoint to restore (its directory) and its clock.
    pub restore: Option<(String, u32)>,
}

/// Control-plane messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Control {
    /// Node -> scheduler: join the job. `rank` is a requested rank (workers
    /// launched with PSERVER_RANK), honoured when free.
    Register { role: Role, addr: String, rank: Option<u32> },
    /// Scheduler -> node: its place in the job (once everyone has registered,
    /// or when it joins or restarts mid-job). `workers`: worker
    /// seats (ranks `0..workers`, the size of every shard's progress
    /// header); `seated`: the workers the job started with (the rest are
    /// free seats, for workers joining later). `replicas`: copies
    /// of every range besides its owner's. `incarnation`: how many workers
    /// took this rank before (logged). `joined`: the worker takes a free
    /// seat mid-job (it starts at the job's clock, see `JobClock`).
    /// `restarted`: the worker
    /// takes the place of a lost one mid-job (it asks the servers for its
    /// rank's clock, see `WorkerClock`, and continues from there).
    Welcome {
        role: Role,
        rank: u32,
        servers: Vec<ServerInfo>,
        workers: u32,
        vnodes: u32,
        epoch: u32,
        replicas: u32,
        incarnation: u32,
        checkpoint: Option<CheckpointPlan>,
        restarted: bool,
        seated: u32,
        joined: bool,
    },
    /// Scheduler -> nodes: the server list changed (a server died, joined or
    /// left); ranges move as the new ring says.
    Membership { epoch: u32, servers: Vec<ServerInfo> },
    /// Server -> scheduler: the membership of `epoch` is in effect here.
    MembershipAck { epoch: u32 },
    /// Worker -> scheduler: all my pushes of clocks below `clock` are
    /// acknowledged; checkpoint once every worker says so.
    Checkpoint { worker: u32, clock: u32 },
    /// Scheduler -> worker: the checkpoint at `clock` is written (or, when
    /// `written` is false, was abandoned; the job goes on).
    CheckpointDone { clock: u32, written: bool },
    /// Scheduler -> server: write the ranges you own into `dir`.
    Snapshot { clock: u32, dir: String },
    /// Server -> scheduler: the files written for `Snapshot`, and the specs
    /// of the tables they hold.
    SnapshotDone { clock: u32, files: Vec<crate::server::checkpoint::FileEntry>, tables: Vec<TableSpec> },
    /// Server -> scheduler: this server leaves the job (SIGTERM); its
    /// replicas take over its ranges. Answered by `Shutdown`, or by `Error`
    /// when its ranges have no replica to take them.
    Leave { rank: u32 },
    /// Server -> scheduler: welcomed, ready for workers.
    Ready { rank: u32 },
    /// Worker -> server: create the table (idempotent for an identical spec).
    CreateTable(TableSpec),
    /// Server -> worker: the table is ready.
    TableReady { table: u32 },
    /// Worker -> scheduler: wait until every worker arrives. `n`: how many
    /// barriers this worker passed before (a restarted worker calls the same
    /// barriers again; those the job already passed are answered at once).
    Barrier { worker: u32, n: u64 },
    /// Scheduler -> worker: everyone arrived.
    BarrierDone,
    /// Worker -> scheduler: finished (`error` when it failed).
    WorkerDone { worker: u32, error: Option<String> },
    /// Scheduler -> all: the job is over.
    Shutdown,
    /// Node -> scheduler: still alive.
    Heartbeat,
    /// Worker -> server: where are the shards of `table` in shared memory?
    ShardMap { table: u32 },
    /// Server -> worker: they are here (empty when the server offers no
    /// shared memory, or the table is sparse).
    ShardMapReply { shards: Vec<ShmShard> },
    /// Worker -> server: give this connection a push ring of `bytes`.
    OpenRing { bytes: u64 },
    /// Server -> worker: the ring's file.
    RingReady { path: String },
    /// Worker -> server: open an RDMA link on this connection. `conn` is the
    /// worker queue pair's `transport::rdma::ConnInfo`; `next_seq` the
    /// `DataHeader::seq` of the worker's next ordered frame to this server,
    /// from which the server applies frames in sequence order.
    RdmaConnect { conn: Vec<u8>, next_seq: u64 },
    /// Server -> worker: the server's queue pair, and the worker's push ring
    /// (data: remote WRITE; control words: remote READ).
    RdmaAccept { conn: Vec<u8>, ring: RegionDesc, ring_ctl: RegionDesc },
    /// Worker -> server: where are the shards of `table` for RDMA reads?
    RdmaShardMap { table: u32 },
    /// Server -> worker: here (empty for sparse tables).
    RdmaShardMapReply { shards: Vec<RdmaShard> },
    /// Scheduler -> servers: a worker left the job (finished, failed or
    /// died); its clock no longer holds anyone back.
    WorkerLeft { worker: u32 },
    /// Scheduler -> servers: a worker was lost (died before it finished)
    /// and its rank waits for a new incarnation: shards that wait for lost
    /// workers (sequential tables, aggregating rules) keep its place, the
    /// others count it as left until the new one resets its clock.
    WorkerLost { worker: u32 },
    /// Restarted worker -> server: the last clock you received from rank
    /// `worker` (any incarnation; never the `WorkerLeft` mark).
    WorkerClock { worker: u32 },
    /// Server -> worker: it (0 when none came).
    WorkerClockReply { clock: u32 },
    /// Worker taking free seat `worker` -> server: the largest clock you
    /// received from any worker, `m` (answered with a `WorkerClockReply`;
    /// the restored checkpoint's clock, or 0, when none came). The server
    /// sets the seat's clock to `m` before it answers: every read it served
    /// so far was at a clock up to `m`, so none missed the seat's pushes.
    JobClock { worker: u32 },
    /// A refused control request.
    Error(String),
    /// Node -> scheduler, with each heartbeat: the node's figures.
    Report(crate::status::Report),
    /// Anyone (authenticated) -> scheduler: how is the job doing?
    Status,
    /// Scheduler -> asker.
    StatusReply(Box<crate::status::JobStatus>),
    /// Server -> scheduler: the membership of `epoch` could not be put in
    /// effect here (this server cannot hold the ranges it gives it).
    MembershipFailed { epoch: u32, error: String },
}

impl Control {
    pub fn to_frame(&self, id: u64) -> Frame {
        let body = postcard::to_allocvec(self).expect("control messages always serialize");
        Frame::new(kind::CONTROL, id, Bytes::new()).with_segment(Bytes::from(body))
    }

    pub fn from_frame(frame: &Frame, peer: &str) -> Result<Control> {
        let seg = frame.segments.first().ok_or_else(|| Error::protocol(peer, "control frame without a body"))?;
        postcard::from_bytes(seg).map_err(|e| Error::protocol(peer, format!("bad control message: {e}")))
    }
}

/// A REFUSED frame for request `id`.
pub fn refused(id: u64, message: &str) -> Frame {
    Frame::new(kind::REFUSED, id, Bytes::new()).with_segment(Bytes::copy_from_slice(message.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_wrong_sizes_are_refused() {
        let h = DataHeader { table: 1, worker: 2, clock: 3, epoch: 4, runs: 2, flags: 0, seq: 5, tau: 1, reserved: 0 };
        let runs = [
            RunHeader { run: 0, form: run_form::RANGE, first: 10, count: 5, digest: 0, seq: 1 },
            RunHeader { run: 3, form: run_form::LIST, first: 99, count: 1, digest: 7, seq: 0 },
        ];
        let meta = build_meta(&h, &runs);
        let (h2, r2) = parse_meta::<DataHeader, RunHeader>(&meta, |h| h.runs).unwrap();
        assert_eq!((h2, r2.as_slice()), (h, &runs[..]));
        assert!(parse_meta::<DataHeader, RunHeader>(&meta[..meta.len() - 1], |h| h.runs).is_none());
        let mut lying = h;
        lying.runs = u32::MAX;
        assert!(parse_meta::<DataHeader, RunHeader>(&build_meta(&lying, &runs), |h| h.runs).is_none());
        assert!(parse_meta::<DataHeader, RunHeader>(&[0u8; 3], |h| h.runs).is_none());
    }

    #[test]
    fn needed_progress_follows_clock_and_tau() {
        let h = |clock, tau| DataHeader {
            table: 0,
            worker: 0,
            clock,
            epoch: 0,
            runs: 0,
            flags: 0,
            seq: 0,
            tau,
            reserved: 0,
        };
        assert_eq!(h(5, 0).needed_progress(), Some(5));
        assert_eq!(h(5, 2).needed_progress(), Some(3));
        assert_eq!(h(2, 2).needed_progress(), None);
        assert_eq!(h(1, 5).needed_progress(), None);
        assert_eq!(h(9, TAU_EVENTUAL).needed_progress(), None);
    }

    #[test]
    fn control_messages_round_trip_and_garbage_is_an_error() {
        let c = Control::Register { role: Role::Worker, addr: "x".into(), rank: Some(3) };
        let f = c.to_frame(7);
        assert_eq!(Control::from_frame(&f, "p").unwrap(), c);
        let bad = Frame::new(kind::CONTROL, 1, Bytes::new()).with_segment(Bytes::from_static(&[0xff, 0xff, 0xff]));
        assert!(Control::from_frame(&bad, "p").is_err());
        assert!(Control::from_frame(&Frame::new(kind::CONTROL, 1, Bytes::new()), "p").is_err());
    }
}
