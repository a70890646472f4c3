//! A lane: a set of shards applied by one thread at a time.
//!
//! The thread that delivers a request (a transport's receive loop, or the
//! sender's own thread in process) locks each lane the request touches and
//! applies its runs there, with no hand-off to another thread: on machines
//! where waking a thread costs tens of microseconds, that hop would dominate a
//! small request. Holding the lane is what makes its shards single-writer:
//! slot stores never race, and readers (local, shared memory, RDMA) never take
//! the lock. Requests of one connection are delivered by one thread in order,
//! so they reach every lane in the order they were sent.

use std::collections::HashMap;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::proto::{RunHeader, RunReply, kind, run_form, status};
use crate::store::{KeyRun, Shard};
use crate::transport::{bytes_of_vec, pod_slice};

/// One run of a request, checked by the handler, ready for its lane.
pub(super) struct LaneRun {
    pub header: RunHeader,
    pub shard: u32,
    pub keys: Option<Bytes>,
    pub vals: Option<Bytes>,
}

#[derive(Default)]
pub(super) struct LaneState {
    shards: HashMap<u32, Shard>,
    /// Latest clock per worker, so shards created later start from it.
    clocks: Vec<u64>,
}

#[derive(Default)]
pub(super) struct Lane {
    state: Mutex<LaneState>,
}

/// What a lane produced for a request: per-run replies, value segments (in
/// run order) and error messages.
#[derive(Default)]
pub(super) struct Output {
    pub replies: Vec<RunReply>,
    pub values: Vec<Bytes>,
    pub errors: Vec<Bytes>,
}

impl Lane {
    pub fn install(&self, id: u32, mut shard: Shard) {
        let mut st = self.state.lock();
        for (w, &c) in st.clocks.iter().enumerate() {
            let _ = shard.record_progress(w, c);
        }
        st.shards.insert(id, shard);
    }

    pub fn record_clock(&self, worker: u32, clock: u64) {
        let mut st = self.state.lock();
        let w = worker as usize;
        if st.clocks.len() <= w {
            st.clocks.resize(w + 1, 0);
        }
        st.clocks[w] = st.clocks[w].max(clock);
        for s in st.shards.values_mut() {
            let _ = s.record_progress(w, clock);
        }
    }

    /// Applies `runs` of one request of kind `op`, appending to `out`.
    pub fn apply(&self, op: u16, dim: u32, runs: &[LaneRun], out: &mut Output) {
        let mut st = self.state.lock();
        for r in runs {
            let count = r.header.count;
            match apply_run(&mut st.shards, op, dim, r) {
                Ok(v) => {
                    out.replies.push(RunReply { run: r.header.run, status: status::OK, count });
                    if let Some(v) = v {
                        out.values.push(bytes_of_vec(v));
                    }
                }
                Err(msg) => {
                    out.replies.push(RunReply { run: r.header.run, status: status::ERROR, count });
                    out.errors.push(Bytes::from(msg));
                }
            }
        }
    }
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
        let vals = pod_slice::<f32>(r.vals.as_ref().expect("checked by the handler"));
        shard.push(keys, &vals).map_err(|e| e.to_string())?;
    }
    if op == kind::PUSH {
        return Ok(None);
    }
    let mut out = vec![0.0f32; keys.len() * dim as usize];
    shard.pull(keys, &mut out, None).map_err(|e| e.to_string())?;
    Ok(Some(out))
}
