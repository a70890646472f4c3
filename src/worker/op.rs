//! One operation in flight: its runs and their completion.
//!
//! Replies arrive on transport threads, possibly several at once for one
//! operation (one per server). A reply first *claims* each run it answers
//! (an atomic swap), so no run is answered twice whatever a peer sends, then
//! parks the run's values as received. The thread that waits for the result
//! assembles the output from the parked segments: the transport's receive
//! loop never spends its time copying large results.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::transport::pod_slice;

pub(super) struct OpRun {
    /// Index of the run's first key in the request.
    pub lo: usize,
    pub count: usize,
    /// The server it was sent to (changes when it is sent to a new owner).
    server: AtomicU32,
    /// Pushes: the run's sequence number, given when first sent (the same
    /// on every retry).
    seq: AtomicU64,
    claimed: AtomicBool,
}

impl OpRun {
    pub fn new(lo: usize, count: usize, server: u32) -> Self {
        OpRun { lo, count, server: AtomicU32::new(server), seq: AtomicU64::new(0), claimed: AtomicBool::new(false) }
    }
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
    pub fn set_seq(&self, seq: u64) {
        self.seq.store(seq, Ordering::Release);
    }
    pub fn server(&self) -> u32 {
        self.server.load(Ordering::Acquire)
    }
    pub fn set_server(&self, s: u32) {
        self.server.store(s, Ordering::Release);
    }
    pub fn is_claimed(&self) -> bool {
        self.claimed.load(Ordering::Acquire)
    }
}

/// What an operation sent, kept until it is done so that its runs can be
/// sent again to a new owner after a failover.
pub(super) struct Sent {
    pub kind: u16,
    pub table: u32,
    pub keys: Bytes,
    pub vals: Option<Bytes>,
    pub known: Option<Bytes>,
    pub tau: u32,
}

/// Fills a version-filtered run: (first key index, key count, reply data,
/// output slice).
pub(super) type FillChanged<'a> = dyn FnMut(usize, usize, &Part, &mut [f32]) -> Result<()> + 'a;

/// A run's reply data, as received.
pub(super) enum Part {
    /// All values of the run.
    Values(Bytes),
    /// Version-filtered: which keys changed, their values and versions.
    Changed { bitmap: Bytes, values: Bytes, versions: Bytes },
}

#[derive(Default)]
struct OpState {
    done: bool,
    error: Option<Error>,
    /// Reply data of each run (pulls only).
    parts: Vec<Option<Part>>,
    /// The caller's output buffer, until the result is taken.
    out: Option<Vec<f32>>,
}

pub(super) struct Op {
    pub ts: u64,
    /// Carries a push (its runs count in the per-server push backlog).
    pub is_push: bool,
    /// The worker's clock when the operation was issued.
    pub clock: u32,
    /// Smallest shard progress any reply reported (u64::MAX: none yet).
    progress: AtomicU64,
    dim: usize,
    runs: Vec<OpRun>,
    remaining: AtomicUsize,
    has_output: bool,
    state: Mutex<OpState>,
    cv: Condvar,
    /// The request, for sending runs again (none for one-sided pulls).
    pub sent: Option<Sent>,
}

impl Op {
    pub fn new(ts: u64, clock: u32, dim: usize, runs: Vec<OpRun>, out: Option<Vec<f32>>, is_push: bool) -> Op {
        let remaining = AtomicUsize::new(runs.len());
        let has_output = out.is_some();
        let parts = if has_output { (0..runs.len()).map(|_| None).collect() } else { Vec::new() };
        let state = OpState { done: false, error: None, parts, out };
        let progress = AtomicU64::new(u64::MAX);
        Op {
            ts,
            is_push,
            clock,
            progress,
            dim,
            runs,
            remaining,
            has_output,
            state: Mutex::new(state),
            cv: Condvar::new(),
            sent: None,
        }
    }

    /// The same operation, keeping what it sends.
    pub fn with_sent(mut self, sent: Sent) -> Op {
        self.sent = Some(sent);
        self
    }

    pub fn note_progress(&self, p: u64) {
        self.progress.fetch_min(p, Ordering::Relaxed);
    }

    /// The smallest progress reported, once done.
    pub fn observed_progress(&self) -> Option<u64> {
        let done = self.state.lock().done;
        let p = self.progress.load(Ordering::Relaxed);
        (done && p != u64::MAX).then_some(p)
    }

    pub fn runs(&self) -> &[OpRun] {
        &self.runs
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn has_output(&self) -> bool {
        self.has_output
    }

    /// Takes exclusive responsibility for run `i`; false if it is unknown or
    /// already taken.
    pub fn claim(&self, i: usize) -> bool {
        self.runs.get(i).is_some_and(|r| !r.claimed.swap(true, Ordering::AcqRel))
    }

    /// Gives a claimed run back (its server answered `MOVED`): another
    /// server will answer it.
    pub fn unclaim(&self, i: usize) {
        if let Some(r) = self.runs.get(i) {
            r.claimed.store(false, Ordering::Release);
        }
    }

    /// Finishes claimed run `i` with its values (pulls), or an error; true
    /// when it was the last run.
    pub fn finish_run(&self, i: usize, values: Option<Part>, err: Option<Error>) -> bool {
        if values.is_some() || err.is_some() {
            let mut st = self.state.lock();
            if let Some(v) = values
                && let Some(p) = st.parts.get_mut(i)
            {
                *p = Some(v);
            }
            if let Some(e) = err {
                st.error.get_or_insert(e);
            }
        }
        // AcqRel: the last finisher sees every other run's parked values.
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.mark_done();
            return true;
        }
        false
    }

    pub fn mark_done(&self) {
        self.state.lock().done = true;
        self.cv.notify_all();
    }

    pub fn error(&self) -> Option<Error> {
        self.state.lock().error.clone()
    }

    /// Blocks until every run finished.
    pub fn wait(&self) -> Result<()> {
        let mut st = self.state.lock();
        while !st.done {
            self.cv.wait(&mut st);
        }
        st.error.clone().map_or(Ok(()), Err)
    }

    /// The result of a finished pull: the output buffer filled from the
    /// parked run data; `changed` fills a version-filtered run (its keys are
    /// `lo..lo+count` of the request) into its slice of the output.
    pub fn take_values(&self, changed: &mut FillChanged<'_>) -> Result<Vec<f32>> {
        let (mut out, parts) = {
            let mut st = self.state.lock();
            assert!(st.done, "take_values before the operation finished");
            (st.out.take().unwrap_or_default(), std::mem::take(&mut st.parts))
        };
        for (run, part) in self.runs.iter().zip(parts) {
            let (start, n) = (run.lo * self.dim, run.count * self.dim);
            match part {
                Some(Part::Values(bytes)) => out[start..start + n].copy_from_slice(&pod_slice::<f32>(&bytes)),
                Some(p @ Part::Changed { .. }) => changed(run.lo, run.count, &p, &mut out[start..start + n])?,
                None => {}
            }
        }
        Ok(out)
    }
}
