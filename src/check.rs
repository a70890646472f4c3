//! `pserver check`: a smoke test of a running job. Every worker pushes known
//! values into a dense and a sparse table for several rounds, waits for the
//! others, pulls everything back and verifies the exact sums; it also checks
//! that a pull right after a push observes it. Exits non-zero on any
//! mismatch. Useful after deploying, and it is what the multi-process tests
//! run as their workers.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::table::{TableSpec, mix64};
use crate::worker::Worker;

/// Table ids used by the check (far from application ids).
const DENSE: u32 = 0xC4EC_0001;
const SPARSE: u32 = 0xC4EC_0002;
const COUNT_DENSE: u32 = 0xC4EC_0003;
const COUNT_SPARSE: u32 = 0xC4EC_0004;
/// One counter: restarted workers of the counting check add 1 to it.
const COUNT_RESTARTS: u32 = 0xC4EC_0005;
/// One counter: workers in seats beyond the job's start add 1 per round.
const COUNT_JOINED: u32 = 0xC4EC_0006;

/// What a worker verified.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckReport {
    pub keys_checked: u64,
    pub pushes: u64,
    /// What the worker moved, by which channel.
    pub traffic: crate::worker::Traffic,
}

fn fail(what: String) -> Error {
    Error::Remote { peer: "check".into(), message: what }
}

/// Runs the check on this worker (every worker of the job must run it).
pub fn run(w: &Worker, keys: u64, dim: u32, rounds: u32) -> Result<CheckReport> {
    let (rank, workers) = (u64::from(w.rank()), u64::from(w.num_workers()));
    let d = dim as usize;
    w.create_table(TableSpec::dense(DENSE, keys, dim))?;
    w.create_table(TableSpec::sparse(SPARSE, u64::MAX, dim))?;
    let all: Vec<u64> = (0..keys).collect();
    // Sparse keys spread over the whole u64 space; shared by all workers.
    let mut sparse: Vec<u64> = (0..keys).map(|i| mix64(i) | 1).collect();
    sparse.sort_unstable();
    sparse.dedup();
    // Worker r pushes (r + 1) * (key % 7 + 1) + j to coordinate j.
    let vals = |ks: &[u64]| -> Vec<f32> {
        ks.iter()
            .enumerate()
            .flat_map(|(i, _)| (0..d).map(move |j| ((rank + 1) * (i as u64 % 7 + 1)) as f32 + j as f32))
            .collect()
    };
    let (dense_vals, sparse_vals) = (vals(&all), vals(&sparse));
    let mut pushes = 0;
    for _ in 0..rounds {
        w.push(DENSE, &all, &dense_vals)?;
        w.push(SPARSE, &sparse, &sparse_vals)?;
        pushes += 2;
        w.clock()?;
    }
    w.wait_all()?;
    w.barrier()?;
    let r = u64::from(rounds);
    let sum_ranks = workers * (workers + 1) / 2;
    let expect = |i: usize, j: usize| -> f32 { (r * (sum_ranks * (i as u64 % 7 + 1) + workers * j as u64)) as f32 };
    for (table, ks) in [(DENSE, &all), (SPARSE, &sparse)] {
        let got = w.pull(table, ks)?.wait()?;
        for i in 0..ks.len() {
            for j in 0..d {
                let (g, e) = (got[i * d + j], expect(i, j));
                if g != e {
                    return Err(fail(format!("table {table:#x} key {} coordinate {j}: got {g}, expected {e}", ks[i])));
                }
            }
        }
    }
    // Read-your-writes: a pull right after a push (no wait) sees it.
    w.barrier()?;
    let mine = [rank];
    let before = w.pull(DENSE, &mine)?.wait()?;
    w.push(DENSE, &mine, &vec![1.0; d])?;
    let after = w.pull(DENSE, &mine)?.wait()?;
    if after[0] < before[0] + 1.0 {
        return Err(fail(format!("a pull after a push did not observe it ({} then {})", before[0], after[0])));
    }
    w.wait_all()?;
    w.barrier()?;
    Ok(CheckReport { keys_checked: (all.len() + sparse.len()) as u64 * u64::from(dim), pushes, traffic: w.traffic() })
}

/// What a worker of the counting check saw.
#[derive(Clone, Debug, PartialEq)]
pub struct CountingReport {
    /// Rounds whose pushes were acknowledged (all of them, or the check fails).
    pub acked: u64,
    /// The value every counter ended with.
    pub counter: f32,
    /// The longest a round's pushes took to be acknowledged: across a
    /// failover, the time from the failure to the first push served by the
    /// new owner, plus one round trip.
    pub slowest_ms: f64,
    /// The membership epoch at the end (above 1 after a failover).
    pub epoch: u32,
    /// Workers of the job that were restarted (each adds 1 to a counter of
    /// the job when it starts; two that resume at the same clock count once).
    pub restarts: u64,
    /// The clock this worker resumed at, when it was restarted.
    pub resumed: Option<u32>,
    /// The clock this worker started at, when it joined in a free seat.
    pub joined: Option<u32>,
    /// What went one-sided (shared memory, RDMA) during the check.
    pub traffic: crate::worker::Traffic,
    /// The final read of the dense counters went one-sided (every server
    /// owning some of them, one that joined included, is mapped).
    pub final_one_sided: bool,
}

/// The counting check, for fault injection: each round every worker adds 1
/// to every counter of a dense and a sparse table and waits until the
/// pushes are acknowledged; at the end every counter must equal the number
/// of acknowledged pushes of all workers. A lost acknowledged push shows as
/// a smaller counter, a push applied twice as a larger one.
///
/// A restarted worker (see [`Worker::restarted`]) first counts itself in
/// the job's restarts table, then runs the rounds from its resume clock
/// (round `r` is clock `r`). Its predecessor may have had that round in
/// flight, applied on some servers and not on others; done again, its
/// pushes carry the predecessor's seqs (a push is named by its clock and
/// place, see `RunHeader::seq`), so they apply only where the predecessor's
/// did not, and every counter must still equal the acknowledged pushes.
///
/// `tau`: the dense table's pushes are acknowledged under bounded delay
/// (every worker's pushes of clocks `< clock - tau` applied), so that a
/// worker that falls behind, or is lost, would hold the others up if the
/// bookkeeping did not exclude it; `None`: eventual, as the sparse table.
pub fn counting(w: &Worker, keys: u64, rounds: u32, pace: Duration, tau: Option<u32>) -> Result<CountingReport> {
    let (resumed, joined) = (w.restarted(), w.joined());
    w.create_table(TableSpec::dense(COUNT_RESTARTS, 1, 1))?;
    w.create_table(TableSpec::dense(COUNT_JOINED, 1, 1))?;
    if resumed.is_some() {
        w.wait(w.push(COUNT_RESTARTS, &[0], &[1.0])?)?;
    }
    let consistency = tau.map_or(crate::table::Consistency::Eventual, crate::table::Consistency::BoundedDelay);
    w.create_table(TableSpec::dense(COUNT_DENSE, keys, 1).consistency(consistency))?;
    w.create_table(TableSpec::sparse(COUNT_SPARSE, u64::MAX, 1))?;
    let all: Vec<u64> = (0..keys).collect();
    let mut sparse: Vec<u64> = (0..keys).map(|i| mix64(i ^ 0x5eed)).collect();
    sparse.sort_unstable();
    sparse.dedup();
    let (ones, sparse_ones) = (vec![1.0f32; all.len()], vec![1.0f32; sparse.len()]);
    // A restarted worker passes it at once (the job did already).
    w.barrier()?;
    let mut slowest = Duration::ZERO;
    let first = resumed.or(joined).unwrap_or(0).min(rounds);
    for round in first..rounds {
        let t0 = Instant::now();
        let a = w.push(COUNT_DENSE, &all, &ones)?;
        let b = w.push(COUNT_SPARSE, &sparse, &sparse_ones)?;
        // A seat taken mid-job counts its rounds where the counters are
        // checked against them (its restarts' redone rounds count once, as
        // they do on the counters).
        if w.rank() >= w.num_workers() {
            w.wait(w.push(COUNT_JOINED, &[0], &[1.0])?)?;
        }
        w.wait(a)?;
        w.wait(b)?;
        slowest = slowest.max(t0.elapsed());
        w.clock()?;
        if round % 10 == 9 {
            eprintln!("counting: worker {} round {} acknowledged", w.rank(), round + 1);
        }
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
    }
    w.barrier()?;
    // Every worker acknowledged every round it ran (or returned the error
    // above): the job's workers all of them, the joined ones those from
    // their first clock.
    let joined_rounds = w.pull(COUNT_JOINED, &[0])?.wait()?[0];
    let expect = (u64::from(rounds) * u64::from(w.num_workers())) as f32 + joined_rounds;
    let restarts = w.pull(COUNT_RESTARTS, &[0])?.wait()?[0];
    let mut final_one_sided = false;
    for (table, ks) in [(COUNT_DENSE, &all), (COUNT_SPARSE, &sparse)] {
        let before = w.traffic();
        let got = w.pull(table, ks)?.wait()?;
        if table == COUNT_DENSE {
            let after = w.traffic();
            final_one_sided = after.shm_pulls + after.rdma_pulls > before.shm_pulls + before.rdma_pulls
                && after.requests == before.requests;
        }
        if let Some(i) = got.iter().position(|&v| v != expect) {
            let wrong = got.iter().filter(|&&v| v != expect).count();
            // The wrong keys as runs of consecutive indices, for diagnosis.
            let mut spans: Vec<String> = Vec::new();
            let mut j = 0;
            while j < got.len() && spans.len() < 16 {
                if got[j] == expect {
                    j += 1;
                    continue;
                }
                let k = (j..got.len()).find(|&k| got[k] != got[j]).unwrap_or(got.len());
                spans.push(format!("keys {}..={} count {}", ks[j], ks[k - 1], got[j]));
                j = k;
            }
            let expected = if restarts > 0.0 {
                format!("{expect} acknowledged pushes ({restarts} restarts)")
            } else {
                format!("{expect} acknowledged pushes")
            };
            // The servers' own answer, when the pull above was read from
            // shared or registered memory: tells a stale read from a loss.
            let net = match w.pull_over_network(table, &ks[i..=i]).and_then(|p| p.wait()) {
                Ok(v) if v.first() == Some(&got[i]) => String::new(),
                Ok(v) => format!("; the owner answers {:?} over the network", v.first()),
                Err(e) => format!("; the owner did not answer over the network: {e}"),
            };
            return Err(fail(format!(
                "table {table:#x}: key {} counts {}, expected {expected} ({wrong} of {} counters wrong: {}){net}",
                ks[i],
                got[i],
                ks.len(),
                spans.join(", ")
            )));
        }
    }
    w.barrier()?;
    Ok(CountingReport {
        acked: u64::from(rounds - first) * 2,
        counter: expect,
        slowest_ms: slowest.as_secs_f64() * 1e3,
        epoch: w.epoch(),
        restarts: restarts as u64,
        resumed,
        joined,
        traffic: w.traffic(),
        final_one_sided,
    })
}
