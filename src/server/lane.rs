//! A lane: one thread that owns a set of shards and applies the runs queued
//! to it, in arrival order. Owning the `Shard` values is what makes each slot
//! single-writer.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use crossbeam::channel::Receiver;

use crate::proto::{self, ReplyHeader, RunHeader, RunReply, kind, run_form, status};
use crate::store::{KeyRun, Shard};
use crate::transport::{Frame, Messenger, PeerId, bytes_of_vec, pod_slice};

pub(super) struct LaneRun {
    pub header: RunHeader,
    pub shard: u32,
    pub keys: Option<Bytes>,
    pub vals: Option<Bytes>,
}

pub(super) enum LaneJob {
    Install { id: u32, shard: Box<Shard> },
    Data { net: Arc<dyn Messenger>, peer: PeerId, id: u64, kind: u16, table: u32, dim: u32, runs: Vec<LaneRun> },
    Clock { worker: u32, clock: u64 },
    Stop,
}

pub(super) fn run(rx: Receiver<LaneJob>) {
    let mut shards: HashMap<u32, Shard> = HashMap::new();
    // Latest clock per worker, so shards created later start from it.
    let mut clocks: Vec<u64> = Vec::new();
    while let Ok(job) = rx.recv() {
        match job {
            LaneJob::Install { id, shard } => {
                let mut shard = *shard;
                for (w, &c) in clocks.iter().enumerate() {
                    let _ = shard.record_progress(w, c);
                }
                shards.insert(id, shard);
            }
            LaneJob::Clock { worker, clock } => {
                let w = worker as usize;
                if clocks.len() <= w {
                    clocks.resize(w + 1, 0);
                }
                clocks[w] = clocks[w].max(clock);
                for s in shards.values_mut() {
                    let _ = s.record_progress(w, clock);
                }
            }
            LaneJob::Data { net, peer, id, kind, table, dim, runs } => {
                let reply = apply(&mut shards, kind, table, dim, runs);
                if let Err(e) = net.send(peer, reply.with_id(id)) {
                    tracing::debug!(error = %e, "reply not delivered");
                }
            }
            LaneJob::Stop => break,
        }
    }
}

trait WithId {
    fn with_id(self, id: u64) -> Frame;
}
impl WithId for Frame {
    fn with_id(mut self, id: u64) -> Frame {
        self.id = id;
        self
    }
}

fn apply(shards: &mut HashMap<u32, Shard>, op: u16, table: u32, dim: u32, runs: Vec<LaneRun>) -> Frame {
    let mut replies = Vec::with_capacity(runs.len());
    let mut values = Vec::new();
    let mut errors = Vec::new();
    for r in runs {
        let count = r.header.count;
        let result = apply_run(shards, op, dim, &r);
        match result {
            Ok(v) => {
                replies.push(RunReply { run: r.header.run, status: status::OK, count });
                if let Some(v) = v {
                    values.push(bytes_of_vec(v));
                }
            }
            Err(msg) => {
                replies.push(RunReply { run: r.header.run, status: status::ERROR, count });
                errors.push(Bytes::from(msg));
            }
        }
    }
    let meta = proto::build_meta(&ReplyHeader { table, runs: replies.len() as u32 }, &replies);
    let mut f = Frame::new(kind::REPLY, 0, meta);
    f.segments = values;
    f.segments.extend(errors);
    f
}

fn apply_run(shards: &mut HashMap<u32, Shard>, op: u16, dim: u32, r: &LaneRun) -> Result<Option<Vec<f32>>, String> {
    let shard = shards.get_mut(&r.shard).ok_or_else(|| format!("shard {} is not on this lane", r.shard))?;
    let keys_view = r.keys.as_ref().map(pod_slice::<u64>);
    let keys = match (&keys_view, r.header.form) {
        (Some(k), run_form::LIST) => {
            if let Some(i) = k.windows(2).position(|w| w[0] >= w[1]) {
                return Err(format!("keys must be sorted and unique: key[{}] = {} follows {}", i + 1, k[i + 1], k[i]));
            }
            KeyRun::List(k)
        }
        _ => KeyRun::Range { first: r.header.first, count: r.header.count as usize },
    };
    if op != kind::PULL {
        let vals = pod_slice::<f32>(r.vals.as_ref().expect("validated by the handler"));
        shard.push(keys, &vals).map_err(|e| e.to_string())?;
    }
    if op == kind::PUSH {
        return Ok(None);
    }
    let mut out = vec![0.0f32; keys.len() * dim as usize];
    shard.pull(keys, &mut out, None).map_err(|e| e.to_string())?;
    Ok(Some(out))
}
