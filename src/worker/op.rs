//! One operation in flight: its runs, their completion, and the output buffer
//! replies write into.
//!
//! Replies arrive on transport threads, possibly several at once for one
//! operation (one per server lane). Each writes only its own run's slice of
//! the output, and only after *claiming* the run (an atomic swap), so no two
//! writers ever touch the same bytes and no run is written twice, whatever a
//! peer sends. The output is handed to the waiter only after every run is
//! claimed and finished.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

pub(super) struct OpRun {
    /// Index of the run's first key in the request.
    pub lo: usize,
    pub count: usize,
    pub server: u32,
    claimed: AtomicBool,
}

impl OpRun {
    pub fn new(lo: usize, count: usize, server: u32) -> Self {
        OpRun { lo, count, server, claimed: AtomicBool::new(false) }
    }
}

#[derive(Default)]
struct OpState {
    done: bool,
    error: Option<Error>,
}

pub(super) struct Op {
    pub ts: u64,
    dim: usize,
    runs: Vec<OpRun>,
    remaining: AtomicUsize,
    /// Pull results; `None` for pushes. Written through `ptr` by run owners.
    out: Option<UnsafeCell<Vec<f32>>>,
    ptr: *mut f32,
    len: usize,
    state: Mutex<OpState>,
    cv: Condvar,
}

// SAFETY: `out` is only written through `ptr`, by disjoint run slices, each by
// the one thread that claimed the run (see `write_run`), and read or taken only
// after every run finished (see `take_values`). All other fields are Sync.
unsafe impl Send for Op {}
// SAFETY: as above; shared access never creates overlapping mutable access.
unsafe impl Sync for Op {}

impl Op {
    pub fn new(ts: u64, dim: usize, runs: Vec<OpRun>, out: Option<Vec<f32>>) -> Op {
        let remaining = AtomicUsize::new(runs.len());
        let (out, ptr, len) = match out {
            Some(mut v) => {
                let (p, l) = (v.as_mut_ptr(), v.len());
                (Some(UnsafeCell::new(v)), p, l)
            }
            None => (None, std::ptr::null_mut(), 0),
        };
        Op { ts, dim, runs, remaining, out, ptr, len, state: Mutex::new(OpState::default()), cv: Condvar::new() }
    }

    pub fn runs(&self) -> &[OpRun] {
        &self.runs
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn has_output(&self) -> bool {
        self.out.is_some()
    }

    /// Takes exclusive responsibility for run `i`; false if it is unknown or
    /// already taken.
    pub fn claim(&self, i: usize) -> bool {
        // AcqRel: the winner's later writes are ordered after the swap; a
        // loser learns nothing it relies on.
        self.runs.get(i).is_some_and(|r| !r.claimed.swap(true, Ordering::AcqRel))
    }

    /// Copies run `i`'s values into the output. The caller claimed run `i`
    /// and has not finished it; `vals` is exactly `count x dim` long.
    pub fn write_run(&self, i: usize, vals: &[f32]) {
        let r = &self.runs[i];
        assert!(r.claimed.load(Ordering::Relaxed) && self.out.is_some());
        let (start, n) = (r.lo * self.dim, r.count * self.dim);
        assert!(vals.len() == n && start + n <= self.len);
        // SAFETY: `ptr..ptr+len` is the buffer of the Vec in `out`, which is
        // never resized while the op lives and is only moved out in
        // `take_values` after every run finished. Runs partition the request's
        // keys, so `[start, start+n)` overlaps no other run's slice, and this
        // thread claimed run `i`, so no other thread writes this slice. The
        // bounds were asserted just above.
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), self.ptr.add(start), n) };
    }

    /// Finishes claimed run `i`; true when it was the last.
    pub fn finish_run(&self, _i: usize, err: Option<Error>) -> bool {
        if let Some(e) = err {
            let mut st = self.state.lock();
            st.error.get_or_insert(e);
        }
        // AcqRel: the last finisher sees every other run's writes (they
        // released them with this same RMW), and publishes them with `done`.
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

    /// The output values, once done (empty for pushes or a second call).
    pub fn take_values(&self) -> Vec<f32> {
        let st = self.state.lock();
        assert!(st.done, "take_values before the operation finished");
        match &self.out {
            // SAFETY: every run finished (`done`), so no writer remains, and
            // the state lock serializes callers of `take_values`.
            Some(cell) => std::mem::take(unsafe { &mut *cell.get() }),
            None => Vec::new(),
        }
    }
}
