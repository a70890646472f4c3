//! `pserver bench`: push, pull and push-pull throughput at several value
//! sizes, sparse requests, and one-key latency, each measured against a
//! baseline that moves the same bytes in the same pattern in the same run
//! (memcpy for the in-process transport; a plain socket for TCP).
//!
//! Every case also checks its results (the values pulled are the values
//! pushed, sums count every push), so a fast wrong answer cannot pass.
//! Workers measure concurrently on disjoint keys; rank 0 gathers their
//! figures through a table of the job itself and prints them.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::table::{Storage, TableSpec, UpdaterSpec, mix64};
use crate::worker::{KeyList, Pull, Timestamp, Values, Worker};

/// What a case measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Push,
    Pull,
    PushPull,
    /// Random keys, one float each: push then pull.
    Sparse,
    /// Sequential one-key pulls.
    Latency,
}

impl Op {
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "push" => Op::Push,
            "pull" => Op::Pull,
            "pushpull" | "push_pull" => Op::PushPull,
            "sparse" => Op::Sparse,
            "latency" => Op::Latency,
            _ => return None,
        })
    }
}

/// One benchmark case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    pub op: Op,
    /// Value bytes per request (dense ops).
    pub bytes: usize,
    /// Keys per request (sparse).
    pub keys: usize,
}

/// The full suite: dense ops at 4 KiB, 64 KiB, 1 MiB and 16 MiB, sparse 100k
/// keys, and latency.
pub fn default_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for op in [Op::Push, Op::Pull, Op::PushPull] {
        for bytes in [4 << 10, 64 << 10, 1 << 20, 16 << 20] {
            v.push(Case { op, bytes, keys: 0 });
        }
    }
    v.push(Case { op: Op::Sparse, bytes: 0, keys: 100_000 });
    v.push(Case { op: Op::Latency, bytes: 4, keys: 1 });
    v
}

/// Figures of one measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measured {
    /// Payload bytes per second (dense, latency).
    pub bytes_per_s: f64,
    /// Keys per second (sparse).
    pub keys_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One line of output: the pserver figures, the baseline's, and their ratio.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub transport: String,
    pub op: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goodput_bytes_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_per_s: Option<f64>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub baseline: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_goodput_bytes_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_keys_per_s: Option<f64>,
    pub baseline_p50_us: f64,
    pub baseline_p99_us: f64,
    /// Goodput (or keys/s) over the baseline's; for latency, p50 over the
    /// baseline's p50.
    pub ratio: f64,
    pub servers: usize,
    pub workers: u32,
    pub verified: bool,
    /// What rank 0's worker sent and received during the case (payload bytes).
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A same-run reference moving the same bytes in the same pattern.
pub trait Baseline {
    fn name(&self) -> &'static str;
    fn measure(&mut self, case: Case, seconds: f64) -> Result<Vec<Measured>>;
}

/// Percentiles of a latency sample, in microseconds.
pub fn percentiles(lat: &mut [Duration]) -> (f64, f64) {
    if lat.is_empty() {
        return (0.0, 0.0);
    }
    lat.sort_unstable();
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    (at(0.50), at(0.99))
}

/// Requests in flight for a payload of `bytes`: enough to keep the pipe
/// full, at most 64 MiB outstanding.
fn depth(bytes: usize) -> usize {
    ((64 << 20) / bytes.max(1)).clamp(2, 64)
}

/// The memcpy baseline for the in-process transport.
pub struct Memcpy;

impl Baseline for Memcpy {
    fn name(&self) -> &'static str {
        "memcpy"
    }

    fn measure(&mut self, case: Case, seconds: f64) -> Result<Vec<Measured>> {
        let copy_loop = |bytes: usize, per_op: usize| -> Measured {
            let src = vec![1u8; bytes];
            let mut dst = vec![0u8; bytes];
            let mut lat = Vec::new();
            let deadline = Instant::now() + Duration::from_secs_f64(seconds);
            let start = Instant::now();
            let mut ops = 0u64;
            while Instant::now() < deadline || ops == 0 {
                let t = Instant::now();
                for _ in 0..per_op {
                    dst.copy_from_slice(std::hint::black_box(&src));
                }
                std::hint::black_box(&mut dst);
                lat.push(t.elapsed());
                ops += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            let (p50, p99) = percentiles(&mut lat);
            Measured {
                bytes_per_s: (ops as f64 * (bytes * per_op) as f64) / secs,
                keys_per_s: 0.0,
                p50_us: p50,
                p99_us: p99,
            }
        };
        Ok(match case.op {
            Op::Push | Op::Pull => vec![copy_loop(case.bytes, 1)],
            Op::PushPull => vec![copy_loop(case.bytes, 2)],
            Op::Latency => vec![copy_loop(4, 1)],
            Op::Sparse => {
                // Keys and values of a request: 12 bytes per key.
                let mut m = copy_loop(case.keys * 12, 1);
                m.keys_per_s = m.bytes_per_s / 12.0;
                vec![m, m]
            }
        })
    }
}

/// The baseline for RDMA: the same device and queue-pair set-up as a
/// pserver link, moving the same value bytes with nothing on top: a pull is
/// one RDMA READ of the bytes (posted and waited for, as a pserver pull is),
/// a push one write-with-immediate of a frame carrying them into a push ring
/// whose frames the receiving thread drops (frames larger than the ring go
/// as ring-sized pieces). No slots, no validation, no server work: the
/// ceiling pserver's one-sided path is measured against, in the same run.
pub struct RawRdma;

impl Baseline for RawRdma {
    fn name(&self) -> &'static str {
        "raw rdma"
    }

    fn measure(&mut self, case: Case, seconds: f64) -> Result<Vec<Measured>> {
        use crate::store::Region;
        use crate::transport::rdma::{self, Inbox, Link};
        use crate::transport::{Access, Frame, Limits};
        let dev = rdma::device()?;
        let inbox = Inbox::start(dev.clone(), Limits::default(), Box::new(|_, _| {}))?;
        let (link, info) = Link::new(&dev, "raw rdma baseline")?;
        let ring = 8 << 20;
        let acc = inbox.accept(u64::MAX, &info, ring)?;
        link.establish(&acc.info, acc.ring, acc.ring_ctl)?;
        let bytes = match case.op {
            Op::Sparse => case.keys * 12,
            Op::Latency => 8,
            _ => case.bytes,
        }
        .max(8);
        let words = bytes.div_ceil(8);
        let region = Arc::new(Region::anon(words * 8)?);
        let reg = dev.register(region, Access::READ)?;
        let d = reg.desc();
        let chunk = link.max_read_words();
        let pull = || -> Result<()> {
            let mut at = 0;
            while at < words {
                let n = chunk.min(words - at);
                link.read(None, &d, at, n, |_, _| ())?;
                at += n;
            }
            Ok(())
        };
        let piece = (bytes).min(ring / 2);
        let frame = Frame::new(crate::proto::kind::PUSH, 0, bytes::Bytes::new())
            .with_segment(bytes::Bytes::from(vec![1u8; piece]));
        let push = || -> Result<()> {
            let mut left = bytes;
            while left > 0 {
                link.send(&frame)?;
                left = left.saturating_sub(piece);
            }
            Ok(())
        };
        let run = |f: &dyn Fn() -> Result<()>, per_op: usize| -> Result<Measured> {
            let mut lat = Vec::new();
            let start = Instant::now();
            let deadline = start + Duration::from_secs_f64(seconds);
            let mut ops = 0u64;
            while Instant::now() < deadline || ops == 0 {
                let t = Instant::now();
                f()?;
                lat.push(t.elapsed());
                ops += 1;
            }
            Ok(measured(ops, per_op, 0, start.elapsed().as_secs_f64(), &mut lat))
        };
        Ok(match case.op {
            Op::Pull | Op::Latency => vec![run(&pull, bytes)?],
            Op::Push => vec![run(&push, bytes)?],
            Op::PushPull => vec![run(&|| push().and_then(|()| pull()), 2 * bytes)?],
            Op::Sparse => {
                let mut p = run(&push, bytes)?;
                let mut q = run(&pull, bytes)?;
                p.keys_per_s = p.bytes_per_s / 12.0;
                q.keys_per_s = q.bytes_per_s / 12.0;
                vec![p, q]
            }
        })
    }
}

/// Table ids the bench uses (far from what applications pick).
const STATS_TABLE: u32 = 0xBE00_0000;
const CASE_TABLE_BASE: u32 = 0xBE00_0001;

/// Figures a worker reports through the stats table.
const STATS_DIM: u32 = 5;

/// Runs `cases` on this worker (every worker of the job runs this), and on
/// rank 0 returns the gathered results (empty elsewhere).
pub fn run(
    w: &Worker,
    cases: &[Case],
    seconds: f64,
    transport: &str,
    baseline: &mut dyn Baseline,
    dim: u32,
) -> Result<Vec<BenchResult>> {
    let workers = w.num_workers();
    let rank = w.rank();
    w.create_table(TableSpec::dense(STATS_TABLE, u64::from(workers) * 2, STATS_DIM).updater(UpdaterSpec::Assign))?;
    let mut results = Vec::new();
    for (i, &case) in cases.iter().enumerate() {
        let table = CASE_TABLE_BASE + i as u32;
        let before = w.traffic();
        let mine = run_case(w, case, table, seconds, dim)?;
        let after = w.traffic();
        // Report: [bytes/s, keys/s, p50, p99, verified] per sub-result.
        for (j, m) in mine.iter().enumerate() {
            let key = u64::from(rank) * 2 + j as u64;
            w.wait(w.push(
                STATS_TABLE,
                &[key],
                &[
                    m.0.bytes_per_s as f32,
                    m.0.keys_per_s as f32,
                    m.0.p50_us as f32,
                    m.0.p99_us as f32,
                    f32::from(u8::from(m.1)),
                ],
            )?)?;
        }
        w.barrier()?;
        let base = if rank == 0 { Some(baseline.measure(case, seconds)?) } else { None };
        if let Some(base) = base {
            let keys: Vec<u64> = (0..u64::from(workers) * 2).collect();
            let all = w.pull(STATS_TABLE, &keys)?.wait()?;
            for (j, b) in base.iter().enumerate().take(mine.len()) {
                let rows =
                    (0..workers as usize).map(|r| &all[(r * 2 + j) * STATS_DIM as usize..][..STATS_DIM as usize]);
                let (mut bps, mut kps, mut p50, mut p99, mut ok) = (0.0, 0.0, 0.0f64, 0.0f64, true);
                for row in rows {
                    bps += f64::from(row[0]);
                    kps += f64::from(row[1]);
                    p50 = p50.max(f64::from(row[2]));
                    p99 = p99.max(f64::from(row[3]));
                    ok &= row[4] == 1.0;
                }
                let mut r = result(
                    case,
                    j,
                    transport,
                    baseline.name(),
                    Measured { bytes_per_s: bps, keys_per_s: kps, p50_us: p50, p99_us: p99 },
                    *b,
                    w,
                    ok,
                );
                r.bytes_sent = after.bytes_sent - before.bytes_sent;
                r.bytes_received = after.bytes_received - before.bytes_received;
                results.push(r);
            }
        }
        w.barrier()?;
    }
    Ok(results)
}

#[allow(clippy::too_many_arguments)]
fn result(
    case: Case,
    sub: usize,
    transport: &str,
    baseline: &str,
    m: Measured,
    b: Measured,
    w: &Worker,
    verified: bool,
) -> BenchResult {
    let (op, dense) = match case.op {
        Op::Push => ("push", true),
        Op::Pull => ("pull", true),
        Op::PushPull => ("pushpull", true),
        Op::Latency => ("latency", true),
        Op::Sparse => (if sub == 0 { "sparse_push" } else { "sparse_pull" }, false),
    };
    let ratio = match case.op {
        Op::Latency => m.p50_us / b.p50_us.max(1e-9),
        Op::Sparse => m.keys_per_s / b.keys_per_s.max(1e-9),
        _ => m.bytes_per_s / b.bytes_per_s.max(1e-9),
    };
    BenchResult {
        transport: transport.into(),
        op: op.into(),
        bytes: dense.then_some(case.bytes as u64),
        keys: (!dense).then_some(case.keys as u64),
        goodput_bytes_per_s: dense.then_some(m.bytes_per_s),
        keys_per_s: (!dense).then_some(m.keys_per_s),
        p50_us: m.p50_us,
        p99_us: m.p99_us,
        baseline: baseline.into(),
        baseline_goodput_bytes_per_s: dense.then_some(b.bytes_per_s),
        baseline_keys_per_s: (!dense).then_some(b.keys_per_s),
        baseline_p50_us: b.p50_us,
        baseline_p99_us: b.p99_us,
        ratio,
        servers: w.num_servers(),
        workers: w.num_workers(),
        verified,
        bytes_sent: 0,
        bytes_received: 0,
    }
}

/// Issues `issue()` for `seconds`, keeping up to `depth` in flight, and
/// calls `done` on each completion. Returns (operations, seconds, latencies).
fn pipelined<T>(
    seconds: f64,
    depth: usize,
    mut issue: impl FnMut() -> Result<T>,
    mut done: impl FnMut(T) -> Result<()>,
) -> Result<(u64, f64, Vec<Duration>)> {
    let mut inflight: VecDeque<(T, Instant)> = VecDeque::with_capacity(depth);
    let mut lat = Vec::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut ops = 0u64;
    while Instant::now() < deadline || ops == 0 {
        if inflight.len() == depth {
            let (t, t0) = inflight.pop_front().expect("full");
            done(t)?;
            lat.push(t0.elapsed());
        }
        inflight.push_back((issue()?, Instant::now()));
        ops += 1;
    }
    while let Some((t, t0)) = inflight.pop_front() {
        done(t)?;
        lat.push(t0.elapsed());
    }
    Ok((ops, start.elapsed().as_secs_f64(), lat))
}

fn measured(ops: u64, per_op_bytes: usize, per_op_keys: usize, secs: f64, lat: &mut [Duration]) -> Measured {
    let (p50, p99) = percentiles(lat);
    Measured {
        bytes_per_s: ops as f64 * per_op_bytes as f64 / secs,
        keys_per_s: ops as f64 * per_op_keys as f64 / secs,
        p50_us: p50,
        p99_us: p99,
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Remote { peer: "bench".into(), message: format!("verification failed: {}", what()) })
    }
}

/// Runs one case on this worker; returns its figures (two for sparse: push
/// then pull) and whether the results were verified.
/// Dense cases use tables of `dim` values per key (the bytes of a case are
/// values, whatever the key count).
fn run_case(w: &Worker, case: Case, table: u32, seconds: f64, dim: u32) -> Result<Vec<(Measured, bool)>> {
    let workers = u64::from(w.num_workers());
    let rank = u64::from(w.rank());
    match case.op {
        Op::Push | Op::Pull | Op::PushPull | Op::Latency => {
            let dm = dim.max(1) as usize;
            let nk = ((case.bytes / 4) / dm).max(1) as u64;
            let n = nk as usize * dm;
            w.create_table(TableSpec::dense(table, workers * nk, dm as u32))?;
            let keys = KeyList::range(rank * nk, (rank + 1) * nk);
            let d = depth(case.bytes);
            match case.op {
                Op::Push => {
                    let ones: Values = vec![1.0f32; n].into();
                    let (ops, secs, mut lat) =
                        pipelined(seconds, d, || w.push_with(table, &keys, ones.clone()), |ts: Timestamp| w.wait(ts))?;
                    let got = w.pull_with(table, &keys, Vec::new())?.wait()?;
                    let exact = ops < (1 << 24);
                    check(got.iter().all(|&v| if exact { v == ops as f32 } else { v > 0.0 }), || {
                        format!("after {ops} pushes of 1.0 a value reads {}", got[0])
                    })?;
                    Ok(vec![(measured(ops, n * 4, n, secs, &mut lat), true)])
                }
                Op::Pull | Op::Latency => {
                    let vals: Vec<f32> = (0..n).map(|i| i as f32).collect();
                    w.wait(w.push_with(table, &keys, vals)?)?;
                    let pool: RefCell<Vec<Vec<f32>>> = RefCell::default();
                    let mut bad = 0u64;
                    let d = if case.op == Op::Latency { 1 } else { d };
                    let (ops, secs, mut lat) = pipelined(
                        seconds,
                        d,
                        || w.pull_with(table, &keys, pool.borrow_mut().pop().unwrap_or_default()),
                        |p: Pull| {
                            let v = p.wait()?;
                            bad += u64::from(v[n - 1] != (n - 1) as f32 || v[0] != 0.0);
                            pool.borrow_mut().push(v);
                            Ok(())
                        },
                    )?;
                    let last = pool.borrow_mut().pop().unwrap_or_default();
                    check(bad == 0 && last.iter().enumerate().all(|(i, &v)| v == i as f32), || {
                        format!("{bad} pulls returned values that were never pushed")
                    })?;
                    Ok(vec![(measured(ops, n * 4, n, secs, &mut lat), true)])
                }
                _ => {
                    let ones: Values = vec![1.0f32; n].into();
                    let pool: RefCell<Vec<Vec<f32>>> = RefCell::default();
                    let mut last_seen = 0.0f32;
                    let mut monotone = true;
                    let (ops, secs, mut lat) = pipelined(
                        seconds,
                        d,
                        || w.push_pull_with(table, &keys, ones.clone(), pool.borrow_mut().pop().unwrap_or_default()),
                        |p: Pull| {
                            let v = p.wait()?;
                            monotone &= v[0] > last_seen || v[0] >= (1 << 24) as f32;
                            last_seen = v[0];
                            pool.borrow_mut().push(v);
                            Ok(())
                        },
                    )?;
                    let exact = ops < (1 << 24);
                    check(monotone && (!exact || last_seen == ops as f32), || {
                        format!("push-pull returned {last_seen} after {ops} increments")
                    })?;
                    Ok(vec![(measured(ops, 2 * n * 4, n, secs, &mut lat), true)])
                }
            }
        }
        Op::Sparse => {
            let n = case.keys.max(1);
            w.create_table(TableSpec { storage: Storage::Sparse, ..TableSpec::sparse(table, 1 << 40, 1) })?;
            // Distinct random keys per worker: the rank in the low bits.
            let mut keys: Vec<u64> = (0..n as u64)
                .map(|i| (mix64(i ^ (rank << 40) ^ 0x5EED) % ((1 << 40) / workers)) * workers + rank)
                .collect();
            keys.sort_unstable();
            keys.dedup();
            let keys = KeyList::new(keys)?;
            let n = keys.len();
            let ones: Values = vec![1.0f32; n].into();
            let d = depth(n * 12);
            let (ops, secs, mut lat) =
                pipelined(seconds / 2.0, d, || w.push_with(table, &keys, ones.clone()), |ts: Timestamp| w.wait(ts))?;
            let push = measured(ops, n * 12, n, secs, &mut lat);
            let pool: RefCell<Vec<Vec<f32>>> = RefCell::default();
            let mut bad = 0u64;
            let (pops, psecs, mut plat) = pipelined(
                seconds / 2.0,
                d,
                || w.pull_with(table, &keys, pool.borrow_mut().pop().unwrap_or_default()),
                |p: Pull| {
                    let v = p.wait()?;
                    bad += v.iter().filter(|&&x| x != ops as f32).count() as u64;
                    pool.borrow_mut().push(v);
                    Ok(())
                },
            )?;
            check(ops >= 1 << 24 || bad == 0, || format!("{bad} sparse values differ from the {ops} pushes"))?;
            Ok(vec![(push, true), (measured(pops, n * 4, n, psecs, &mut plat), true)])
        }
    }
}

/// Parses a byte size: `4096`, `4KiB`, `64k`, `1MiB`, `16M`.
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult).filter(|&b| b > 0)
}

/// Human-readable table of results.
pub fn render(results: &[BenchResult]) -> String {
    let mut out = format!(
        "{:<12} {:>9} {:>14} {:>10} {:>10} {:>14} {:>10} {:>7} {:>11} {:>11}\n",
        "op", "size", "throughput", "p50 us", "p99 us", "baseline", "base p50", "ratio", "sent", "received"
    );
    for r in results {
        let size = r.bytes.map_or_else(|| format!("{}k keys", r.keys.unwrap_or(0) / 1000), human_bytes);
        let (tp, base) = match (r.goodput_bytes_per_s, r.keys_per_s) {
            (Some(g), _) => (
                format!("{}/s", human_bytes(g as u64)),
                format!("{}/s", human_bytes(r.baseline_goodput_bytes_per_s.unwrap_or(0.0) as u64)),
            ),
            (_, Some(k)) => (
                format!("{:.1} Mkeys/s", k / 1e6),
                format!("{:.1} Mkeys/s", r.baseline_keys_per_s.unwrap_or(0.0) / 1e6),
            ),
            _ => (String::new(), String::new()),
        };
        out += &format!(
            "{:<12} {:>9} {:>14} {:>10.1} {:>10.1} {:>14} {:>10.2} {:>7.2} {:>11} {:>11}{}\n",
            r.op,
            size,
            tp,
            r.p50_us,
            r.p99_us,
            base,
            r.baseline_p50_us,
            r.ratio,
            human_bytes(r.bytes_sent),
            human_bytes(r.bytes_received),
            if r.verified { "" } else { "  UNVERIFIED" }
        );
    }
    out
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 { format!("{v:.0} {}", U[i]) } else { format!("{v:.1} {}", U[i]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("12XB"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn percentiles_pick_the_right_ranks() {
        let mut l: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let (p50, p99) = percentiles(&mut l);
        assert!((p50 - 50.0).abs() <= 1.0 && (p99 - 99.0).abs() <= 1.0);
    }

    #[test]
    fn the_bench_runs_and_verifies_on_an_embedded_job() {
        let cases = [
            Case { op: Op::Push, bytes: 4096, keys: 0 },
            Case { op: Op::Pull, bytes: 65536, keys: 0 },
            Case { op: Op::PushPull, bytes: 4096, keys: 0 },
            Case { op: Op::Sparse, bytes: 0, keys: 1000 },
            Case { op: Op::Latency, bytes: 4, keys: 1 },
        ];
        let out = crate::job::run(crate::JobConfig::default().servers(2).workers(2), |w| {
            run(w, &cases, 0.05, "inproc", &mut Memcpy, 1)
        })
        .unwrap();
        let r = &out[0];
        assert_eq!(r.len(), 6);
        assert!(out[1].is_empty());
        assert!(r.iter().all(|r| r.verified && r.p50_us > 0.0 && r.ratio > 0.0));
        assert_eq!(r[3].op, "sparse_push");
        let line = serde_json::to_string(&r[0]).unwrap();
        assert!(line.contains("\"goodput_bytes_per_s\"") && line.contains("\"ratio\""));
        assert!(render(r).contains("sparse_pull"));
    }
}

/// The plain-socket baseline for TCP: a server thread on loopback and a
/// client moving the same payload bytes in the same pattern as the pserver
/// case (request and reply sizes, pipelining depth), with no framing, no
/// keys and no store: what the network stack alone gives.
pub struct PlainTcp;

mod plain {
    use std::io::{self, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// (request payload bytes, reply bytes) of one operation.
    pub type Pattern = (usize, usize);

    fn serve(mut s: TcpStream) -> io::Result<()> {
        s.set_nodelay(true)?;
        let mut hdr = [0u8; 16];
        let mut buf = Vec::new();
        let mut reply = Vec::new();
        loop {
            if s.read_exact(&mut hdr).is_err() {
                return Ok(());
            }
            let req = u64::from_le_bytes(hdr[..8].try_into().expect("8")) as usize;
            let rep = u64::from_le_bytes(hdr[8..].try_into().expect("8")) as usize;
            buf.resize(req, 0);
            s.read_exact(&mut buf)?;
            reply.resize(rep.max(8), 1);
            s.write_all(&reply[..rep.max(8)])?;
        }
    }

    /// Runs `pattern` for `seconds` with `depth` operations in flight.
    /// Returns (operations, seconds, latencies).
    pub fn run(pattern: Pattern, depth: usize, seconds: f64) -> io::Result<(u64, f64, Vec<Duration>)> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let server = std::thread::spawn(move || -> io::Result<()> {
            let (s, _) = l.accept()?;
            serve(s)
        });
        let client = TcpStream::connect(addr)?;
        client.set_nodelay(true)?;
        let mut reader = client.try_clone()?;
        let (req, rep) = pattern;
        let rep_len = rep.max(8);
        let (done_tx, done_rx) = mpsc::channel::<Instant>();
        let (sent_tx, sent_rx) = mpsc::channel::<Instant>();
        let rx_thread = std::thread::spawn(move || -> io::Result<Vec<Duration>> {
            let mut buf = vec![0u8; rep_len];
            let mut lat = Vec::new();
            for t0 in sent_rx {
                reader.read_exact(&mut buf)?;
                lat.push(t0.elapsed());
                let _ = done_tx.send(Instant::now());
            }
            Ok(lat)
        });
        let mut w = client;
        let mut msg = Vec::with_capacity(16 + req);
        msg.extend_from_slice(&(req as u64).to_le_bytes());
        msg.extend_from_slice(&(rep as u64).to_le_bytes());
        msg.resize(16 + req, 2);
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(seconds);
        let (mut ops, mut inflight) = (0u64, 0usize);
        while Instant::now() < deadline || ops == 0 {
            if inflight == depth {
                done_rx.recv().map_err(io::Error::other)?;
                inflight -= 1;
            }
            sent_tx.send(Instant::now()).map_err(io::Error::other)?;
            w.write_all(&msg)?;
            ops += 1;
            inflight += 1;
        }
        drop(sent_tx);
        let lat = rx_thread.join().map_err(|_| io::Error::other("reader panicked"))??;
        let secs = start.elapsed().as_secs_f64();
        drop(w);
        let _ = server.join();
        Ok((ops, secs, lat))
    }
}

impl Baseline for PlainTcp {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn measure(&mut self, case: Case, seconds: f64) -> Result<Vec<Measured>> {
        let io = |e: std::io::Error| Error::io("running the plain-socket baseline", e);
        let one = |pattern: plain::Pattern, depth: usize, payload: usize, keys: usize, secs: f64| -> Result<Measured> {
            let (ops, s, mut lat) = plain::run(pattern, depth, secs).map_err(io)?;
            Ok(measured(ops, payload, keys, s, &mut lat))
        };
        let b = case.bytes;
        Ok(match case.op {
            Op::Push => vec![one((b, 8), depth(b), b, b / 4, seconds)?],
            Op::Pull => vec![one((16, b), depth(b), b, b / 4, seconds)?],
            Op::PushPull => vec![one((b, b), depth(b), 2 * b, b / 4, seconds)?],
            Op::Latency => vec![one((64, 64), 1, 4, 1, seconds)?],
            Op::Sparse => {
                let n = case.keys;
                vec![
                    one((12 * n, 8), depth(12 * n), 12 * n, n, seconds / 2.0)?,
                    one((8 * n, 4 * n), depth(12 * n), 4 * n, n, seconds / 2.0)?,
                ]
            }
        })
    }
}
