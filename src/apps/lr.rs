//! L1-regularized logistic regression by delayed block proximal gradient
//! (Li et al., "Scaling distributed machine learning with the parameter
//! server", OSDI 2014), on the public API.
//!
//! Minimizes F(w) = sum_i log(1 + exp(-y_i w.x_i)) + lambda ||w||_1 (plus an
//! optional bias feature, regularized like the others, as liblinear does).
//!
//! Features are cut into blocks; each clock works on one block. A worker
//! pulls the block it is about to work on and the block updated last, folds
//! the weight changes into the margins of its rows, and pushes, for its
//! features of the block, the gradient g_k and a curvature h_k. Servers hold
//! w in a `ProximalNewton` table: they sum every worker's (g, h) for the clock
//! and, once all workers have finished it, take one proximal Newton step
//! w_k <- soft_threshold(h_k w_k - g_k, lambda) / h_k. The curvature a worker
//! reports is sum_i s_i(1-s_i) x_ik^2 * n_ib, where n_ib counts row i's
//! features in the block: by Cauchy-Schwarz that majorizes the block's
//! Hessian, so updating every coordinate of a block at once cannot overshoot
//! the quadratic model; a global damping factor doubles if the objective ever
//! rises. Bounded delay tau lets a worker compute on weights up to tau clocks
//! old.
//!
//! KKT filter (as in the paper): a feature whose weight is 0 and whose last
//! global gradient satisfied |g_k| <= lambda - delta is skipped; every worker
//! skips the same features, because they all read the same global gradient
//! from the servers. A skipped feature's gradient is not recomputed, so every
//! [`KKT_FULL_PASS_EVERY`]-th pass skips nothing, and training only stops
//! after such a full pass: a feature the filter wrongly left at 0 gets its
//! chance again, and the final objective is that of the unfiltered problem.

use std::time::Instant;

use serde::Serialize;

use super::Rows;
use crate::error::{Error, Result};
use crate::table::{Consistency, TableId, TableSpec, UpdaterSpec};
use crate::worker::{KeyList, Worker};

/// How to train.
#[derive(Clone, Debug)]
pub struct LrConfig {
    pub lambda: f32,
    /// Maximal delay (clocks); 0 is sequential.
    pub tau: u32,
    /// Maximal passes over the data.
    pub iters: u32,
    /// Stop when the relative objective decrease of a pass falls below this.
    pub tol: f64,
    /// Features per block.
    pub block_size: u64,
    /// Add a constant feature (the bias), regularized like the others.
    pub bias: bool,
    /// KKT filter margin delta (None: no KKT filter).
    pub kkt_delta: Option<f32>,
    /// Name key lists by digest after their first use.
    pub key_cache: bool,
    /// Refresh weights with version-filtered pulls.
    pub version_pull: bool,
    /// First of the table ids the run uses (4 consecutive ids).
    pub table_base: TableId,
}

impl Default for LrConfig {
    fn default() -> Self {
        LrConfig {
            lambda: 1.0,
            tau: 0,
            iters: 100,
            tol: 1e-5,
            block_size: 2048,
            bias: false,
            kkt_delta: Some(1e-3),
            key_cache: true,
            version_pull: true,
            table_base: 0x4C52_0000,
        }
    }
}

/// One pass's figures (printed per iteration; the last one is the summary).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Iteration {
    pub iteration: u32,
    pub objective: f64,
    pub nnz: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auc: Option<f64>,
    pub seconds: f64,
    pub bytes_pushed: u64,
    pub bytes_pulled: u64,
    /// Feature updates the KKT filter skipped in this pass (all workers).
    pub kkt_skipped: u64,
}

impl Iteration {
    /// Pass `iter` (from 0) as its stats row `sums` says (all workers).
    fn from_sums(iter: u32, sums: &[f32], start: Instant) -> Iteration {
        Iteration {
            iteration: iter + 1,
            objective: f64::from(sums[0]) + f64::from(sums[1]),
            nnz: sums[2] as u64,
            seconds: start.elapsed().as_secs_f64(),
            bytes_pushed: sums[3] as u64,
            bytes_pulled: sums[4] as u64,
            kkt_skipped: sums[5] as u64,
            ..Iteration::default()
        }
    }
}

/// The outcome of training (the weights on rank 0 only).
#[derive(Clone, Debug, Default)]
pub struct LrResult {
    pub iterations: Vec<Iteration>,
    pub weights: Option<Vec<f32>>,
    pub converged: bool,
}

/// log(1 + exp(-z)), without overflow.
pub fn logistic_loss(z: f64) -> f64 {
    if z > 0.0 { (-z).exp().ln_1p() } else { -z + z.exp().ln_1p() }
}

/// F(w) on `rows` (weights indexed by feature id; the bias, when used, is the
/// weight after the last feature).
pub fn objective(rows: Rows, w: &[f32], lambda: f32, bias: bool) -> f64 {
    let loss: f64 = (0..rows.len()).map(|i| logistic_loss(f64::from(rows.labels[i]) * margin(rows, i, w, bias))).sum();
    loss + f64::from(lambda) * w.iter().map(|x| f64::from(x.abs())).sum::<f64>()
}

fn margin(rows: Rows, i: usize, w: &[f32], bias: bool) -> f64 {
    let (f, v) = rows.row(i);
    let mut m: f64 =
        f.iter().zip(v).map(|(&k, &x)| w.get(k as usize).map_or(0.0, |&wk| f64::from(wk) * f64::from(x))).sum();
    if bias && let Some(b) = w.last() {
        m += f64::from(*b);
    }
    m
}

/// Accuracy and AUC of `w` on `rows` (the bias, when used, is the last weight).
pub fn evaluate(rows: Rows, w: &[f32], bias: bool) -> (f64, f64) {
    let b = if bias { w.last().copied() } else { None };
    let n = if bias { w.len().saturating_sub(1) } else { w.len() };
    evaluate_with_bias(rows, &w[..n], b)
}

fn evaluate_with_bias(rows: Rows, w: &[f32], bias: Option<f32>) -> (f64, f64) {
    let margin_of = |i: usize| margin(rows, i, w, false) + bias.map_or(0.0, f64::from);
    let mut scored: Vec<(f64, bool)> = (0..rows.len()).map(|i| (margin_of(i), rows.labels[i] > 0.0)).collect();
    let correct = scored.iter().filter(|(m, pos)| (*m > 0.0) == *pos).count();
    let accuracy = correct as f64 / rows.len().max(1) as f64;
    // AUC by ranks (ties share the average rank).
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut i) = (0.0f64, 0);
    while i < scored.len() {
        let mut j = i;
        while j + 1 < scored.len() && scored[j + 1].0 == scored[i].0 {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += avg * scored[i..=j].iter().filter(|s| s.1).count() as f64;
        i = j + 1;
    }
    let pos = scored.iter().filter(|s| s.1).count() as f64;
    let neg = scored.len() as f64 - pos;
    let auc = if pos == 0.0 || neg == 0.0 { 0.5 } else { (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg) };
    (accuracy, auc)
}

/// This worker's data, cut by feature blocks.
struct Block {
    /// Sorted global feature ids of this worker in the block.
    keys: KeyList,
    /// Entries (row, local feature index, value), by row.
    entries: Vec<(u32, u32, f32)>,
    /// The weights folded into the margins, per local feature.
    w: Vec<f32>,
    /// Features of the block per row, for the rows that have any.
    row_nnz: Vec<(u32, u32)>,
}

/// Largest change of one weight in one step (trust region): a margin moved
/// by more than a few units is deep in the flat part of the logistic loss.
const MAX_STEP: f32 = 2.0;

/// Every this many passes, the KKT filter skips nothing.
pub const KKT_FULL_PASS_EVERY: u32 = 4;

/// Table ids of a run.
struct Tables {
    meta: TableId,
    weights: TableId,
    stats: TableId,
    owners: TableId,
}

/// Above this many features the weight tables are sparse.
const DENSE_MAX_FEATURES: u64 = 1 << 26;

/// A u64 as two f32 bit patterns (moved bit-exactly by `Assign`).
fn u64_to_f32s(x: u64) -> [f32; 2] {
    [f32::from_bits(x as u32), f32::from_bits((x >> 32) as u32)]
}
fn f32s_to_u64(v: &[f32]) -> u64 {
    u64::from(v[0].to_bits()) | u64::from(v[1].to_bits()) << 32
}

const STATS_DIM: u32 = 6; // loss, reg, nnz, bytes pushed, bytes pulled, kkt skipped

/// Trains on this worker's share of the data; every worker of the job calls
/// it. `on_iteration` runs on rank 0 after each pass.
pub fn train(
    w: &Worker,
    data: Rows,
    test: Option<Rows>,
    cfg: &LrConfig,
    on_iteration: &mut dyn FnMut(&Iteration),
) -> Result<LrResult> {
    if !(cfg.lambda >= 0.0 && cfg.lambda.is_finite()) {
        return Err(Error::Config(format!("lambda {} must be a finite number >= 0", cfg.lambda)));
    }
    if cfg.block_size == 0 || cfg.iters == 0 {
        return Err(Error::Config("block size and iterations must be positive".into()));
    }
    // Where this worker starts: 0, or the clock a restarted worker (or a job
    // restored from a checkpoint) resumes at. Every step below is one clock
    // (`step`); the steps before `resume` were done (the servers hold their
    // outcome), so they are replayed without pushes: the setup's tables are
    // read, each pass's decisions are taken again from the sums of its
    // stats row, and the first live step pulls all weights into the
    // margins. A step in flight when the predecessor died is done again:
    // its pushes carry the predecessor's seqs, so each applies once, and
    // sequential tables and the aggregating rule waited for this rank.
    super::needs_a_share(w, "train lr")?;
    let resume = w.restarted().or(w.resumed_from()).unwrap_or(0);
    if resume > 0 {
        tracing::info!(rank = w.rank(), clock = resume, "train lr continues from the clock it resumed at");
    }
    let start = Instant::now();
    let workers = u64::from(w.num_workers());
    let rank = u64::from(w.rank());
    let t = Tables {
        meta: cfg.table_base,
        weights: cfg.table_base + 1,
        stats: cfg.table_base + 2,
        owners: cfg.table_base + 3,
    };
    let seq = Consistency::Sequential;

    let mut step = 0u32;
    let live = |step: u32| step >= resume;

    // 1. Agree on the number of features (the largest id any worker has).
    w.create_table(TableSpec::dense(t.meta, workers, 2).updater(UpdaterSpec::Assign).consistency(seq))?;
    let local_max = data.features.iter().max().map_or(0, |&m| m + 1);
    if live(step) {
        w.wait(w.push(t.meta, &[rank], &u64_to_f32s(local_max))?)?;
        w.clock()?;
    }
    step += 1;
    let maxes = w.with_consistency(seq).pull(t.meta, &(0..workers).collect::<Vec<_>>())?.wait()?;
    let mut features = maxes.chunks_exact(2).map(f32s_to_u64).max().unwrap_or(0);
    let bias_id = features;
    if cfg.bias {
        features += 1;
    }
    let features = features.max(1);
    let make = |id, dim| {
        if features <= DENSE_MAX_FEATURES {
            TableSpec::dense(id, features, dim)
        } else {
            TableSpec::sparse(id, features, dim)
        }
    };
    let spec = make(t.weights, 2)
        .updater(UpdaterSpec::ProximalNewton { l1: cfg.lambda, l2: 0.0, max_step: MAX_STEP })
        .consistency(if cfg.tau == 0 { seq } else { Consistency::BoundedDelay(cfg.tau) });
    w.create_table(spec)?;
    // Sequential, so that a lost worker's place is kept (see `resume`).
    w.create_table(TableSpec::dense(t.stats, u64::from(cfg.iters) + 2, STATS_DIM).consistency(seq))?;
    w.create_table(make(t.owners, 1).updater(UpdaterSpec::Assign).consistency(seq))?;
    // Refresh pulls ask only for weights that changed since this worker last
    // saw them (most do not, once the KKT filter holds them at 0).
    let filters =
        crate::worker::Filters { key_cache: cfg.key_cache, version_pull: cfg.version_pull, ..Default::default() };
    if !filters.is_empty() {
        w.set_filters(t.weights, filters)?;
    }

    // 2. Cut this worker's data into blocks.
    let blocks_n = features.div_ceil(cfg.block_size) as usize;
    let mut blocks = build_blocks(data, features, cfg.block_size, cfg.bias.then_some(bias_id), blocks_n)?;
    let mut margins = vec![0.0f64; data.len()];
    let labels: Vec<f64> = data.labels.iter().map(|&y| f64::from(y)).collect();
    // Each feature gets exactly one owner among the workers that have it
    // (the last writer wins); owners count it in ||w||_1 and nnz.
    if live(step) {
        for blk in &blocks {
            if !blk.keys.is_empty() {
                w.push_with(t.owners, &blk.keys, vec![rank as f32; blk.keys.len()])?;
            }
        }
        w.wait_all()?;
        w.clock()?;
    }
    step += 1;
    let mut owned: Vec<Vec<bool>> = Vec::with_capacity(blocks.len());
    for blk in &blocks {
        let o = if blk.keys.is_empty() {
            Vec::new()
        } else {
            w.with_consistency(seq).pull_with(t.owners, &blk.keys, Vec::new())?.wait()?
        };
        owned.push(o.iter().map(|&r| r as u64 == rank).collect());
    }
    // Test rows' features, for rank 0's evaluation.
    let test_keys = match (test, rank) {
        (Some(tr), 0) => {
            let mut k: Vec<u64> = tr.features.iter().copied().filter(|&f| f < features).collect();
            if cfg.bias {
                k.push(bias_id);
            }
            k.sort_unstable();
            k.dedup();
            Some(KeyList::new(k)?)
        }
        _ => None,
    };

    let mut result = LrResult::default();
    let (mut damping, mut prev_objective) = (1.0f64, f64::INFINITY);
    // Skipped features per block (KKT), decided from the global gradient.
    let mut skip: Vec<Vec<bool>> = blocks.iter().map(|b| vec![false; b.w.len()]).collect();
    // Whether the margins hold every block's weights (a resumed worker's
    // are filled at its first live step).
    let mut synced = resume == 0;
    for iter in 0..cfg.iters {
        let mut kkt_skipped = 0u64;
        let full_pass = cfg.kkt_delta.is_none() || iter % KKT_FULL_PASS_EVERY == 0;
        for b in 0..blocks_n {
            if !live(step) {
                step += 1;
                continue;
            }
            step += 1;
            if !synced {
                for blk in blocks.iter_mut() {
                    refresh(w, t.weights, blk, &mut margins)?;
                }
                synced = true;
            }
            // Refresh the block we are about to use and the one updated last.
            let mut refreshed = vec![b];
            if blocks_n > 1 {
                refreshed.push((b + blocks_n - 1) % blocks_n);
            }
            for &r in &refreshed {
                let got = refresh(w, t.weights, &mut blocks[r], &mut margins)?;
                if r == b
                    && let Some(delta) = cfg.kkt_delta
                {
                    let bound = cfg.lambda - delta;
                    for (k, s) in skip[b].iter_mut().enumerate() {
                        *s = !full_pass && got[2 * k] == 0.0 && got[2 * k + 1].abs() <= bound;
                    }
                }
            }
            // Gradient and curvature of this worker's rows for the block.
            let blk = &blocks[b];
            let n = blk.w.len();
            let (mut g, mut h) = (vec![0.0f64; n], vec![0.0f64; n]);
            let mut nnz_of = std::collections::HashMap::with_capacity(blk.row_nnz.len());
            for &(row, c) in &blk.row_nnz {
                nnz_of.insert(row, c);
            }
            let mut cur_row = u32::MAX;
            let (mut coef, mut curv) = (0.0, 0.0);
            for &(row, k, x) in &blk.entries {
                if row != cur_row {
                    cur_row = row;
                    let y = labels[row as usize];
                    let s = 1.0 / (1.0 + (-y * margins[row as usize]).exp()); // P(label y)
                    coef = -y * (1.0 - s);
                    curv = s * (1.0 - s) * f64::from(nnz_of[&row]) * damping;
                }
                let x = f64::from(x);
                g[k as usize] += coef * x;
                h[k as usize] += curv * x * x;
            }
            // Push [g, h] for the block's features, minus what KKT skips.
            let keys = blk.keys.as_slice();
            let (mut pk, mut pv) = (Vec::with_capacity(n), Vec::with_capacity(2 * n));
            for k in 0..n {
                if skip[b][k] {
                    kkt_skipped += 1;
                    continue;
                }
                pk.push(keys[k]);
                pv.push(g[k] as f32);
                pv.push(h[k] as f32);
            }
            if pk.len() == n {
                w.push_with(t.weights, &blk.keys, pv)?;
            } else if !pk.is_empty() {
                w.push(t.weights, &pk, &pv)?;
            }
            w.clock()?;
        }
        let live_pass = live(step);
        step += 1;
        if !live_pass {
            // Done before this worker resumed: its decisions are taken again
            // from the pass's sums, as every worker took them.
            let sums = w.with_consistency(seq).pull(t.stats, &[u64::from(iter)])?.wait()?;
            let it = Iteration::from_sums(iter, &sums, start);
            let objective = it.objective;
            result.iterations.push(it);
            if next_damping(&mut damping, &mut prev_objective, objective, full_pass, cfg.tol) {
                result.converged = true;
                break;
            }
            continue;
        }
        if !synced {
            for blk in blocks.iter_mut() {
                refresh(w, t.weights, blk, &mut margins)?;
            }
            synced = true;
        }
        // End of a pass: fold in the last block's update, then report.
        let last = blocks_n - 1;
        refresh(w, t.weights, &mut blocks[last], &mut margins)?;
        let loss: f64 = margins.iter().zip(&labels).map(|(m, y)| logistic_loss(y * m)).sum();
        let traffic = w.traffic();
        let (mut reg, mut nnz) = (0.0f64, 0u64);
        for (blk, own) in blocks.iter().zip(&owned) {
            for (x, _) in blk.w.iter().zip(own).filter(|(_, o)| **o) {
                reg += f64::from(x.abs());
                nnz += u64::from(*x != 0.0);
            }
        }
        reg *= f64::from(cfg.lambda);
        let row = [
            loss as f32,
            reg as f32,
            nnz as f32,
            traffic.bytes_sent as f32,
            traffic.bytes_received as f32,
            kkt_skipped as f32,
        ];
        let mut eval = None;
        if let (Some(keys), Some(tr)) = (&test_keys, test) {
            let got = w.with_consistency(seq).pull_with(t.weights, keys, Vec::new())?.wait()?;
            // A dense weight vector over the test features only.
            let ks = keys.as_slice();
            let size = ks.last().map_or(0, |&k| k as usize + 1);
            let mut wv = vec![0.0f32; size];
            for (k, c) in ks.iter().zip(got.chunks_exact(2)) {
                wv[*k as usize] = c[0];
            }
            let bias_w = if cfg.bias { wv.get(bias_id as usize).copied() } else { None };
            eval = Some(evaluate_with_bias(tr, &wv, bias_w));
        }
        w.wait(w.push(t.stats, &[u64::from(iter)], &row)?)?;
        w.clock()?;
        let sums = w.with_consistency(seq).pull(t.stats, &[u64::from(iter)])?.wait()?;
        tracing::debug!(iter, full_pass, loss = sums[0], reg = sums[1], skipped = kkt_skipped, damping, "pass");
        let mut it = Iteration::from_sums(iter, &sums, start);
        let objective = it.objective;
        if let Some((acc, auc)) = eval {
            it.accuracy = Some(acc);
            it.auc = Some(auc);
        }
        if rank == 0 {
            on_iteration(&it);
        }
        result.iterations.push(it);
        if next_damping(&mut damping, &mut prev_objective, objective, full_pass, cfg.tol) {
            result.converged = true;
            break;
        }
    }
    // The model, on rank 0, when it fits in memory.
    if rank == 0 && features <= DENSE_MAX_FEATURES {
        let all = w.with_consistency(seq).pull(t.weights, &(0..features).collect::<Vec<_>>())?.wait()?;
        result.weights = Some(all.chunks_exact(2).map(|c| c[0]).collect());
    }
    w.barrier()?;
    Ok(result)
}

/// The decisions after a pass of objective `objective`; true when training
/// has converged. Every worker reads the same sums, so all take the same
/// decisions. The diagonal Newton step can overshoot where the loss curves
/// more than at the current point: damp after a rise, relax after progress.
fn next_damping(damping: &mut f64, prev_objective: &mut f64, objective: f64, full_pass: bool, tol: f64) -> bool {
    if objective > *prev_objective * (1.0 + 1e-9) {
        *damping *= 2.0;
        tracing::info!(damping, "the objective rose: damping the steps");
    } else {
        *damping = (*damping / 2.0).max(1.0);
        if full_pass && prev_objective.is_finite() && (*prev_objective - objective) / objective.abs().max(1e-12) < tol {
            return true;
        }
    }
    *prev_objective = objective;
    false
}

/// Pulls a block's weights and folds their changes into the margins;
/// returns the pulled `[w, g]` pairs.
fn refresh(w: &Worker, table: TableId, blk: &mut Block, margins: &mut [f64]) -> Result<Vec<f32>> {
    if blk.w.is_empty() {
        return Ok(Vec::new());
    }
    let got = w.pull_with(table, &blk.keys, Vec::new())?.wait()?;
    let delta: Vec<f64> =
        blk.w.iter().zip(got.chunks_exact(2)).map(|(&old, c)| f64::from(c[0]) - f64::from(old)).collect();
    if delta.iter().any(|d| *d != 0.0) {
        for &(row, k, x) in &blk.entries {
            let d = delta[k as usize];
            if d != 0.0 {
                margins[row as usize] += d * f64::from(x);
            }
        }
        for (old, c) in blk.w.iter_mut().zip(got.chunks_exact(2)) {
            *old = c[0];
        }
    }
    Ok(got)
}

fn build_blocks(data: Rows, features: u64, block_size: u64, bias: Option<u64>, n: usize) -> Result<Vec<Block>> {
    // Global feature ids per block, then local indices.
    let mut ids: Vec<Vec<u64>> = vec![Vec::new(); n];
    for &f in data.features.iter().chain(bias.iter()) {
        if f >= features {
            return Err(Error::Config(format!("feature {f} is beyond the {features} features agreed")));
        }
        ids[(f / block_size) as usize].push(f);
    }
    let mut blocks = Vec::with_capacity(n);
    for mut v in ids {
        v.sort_unstable();
        v.dedup();
        blocks.push(v);
    }
    let mut entries: Vec<Vec<(u32, u32, f32)>> = vec![Vec::new(); n];
    let mut row_nnz: Vec<Vec<(u32, u32)>> = vec![Vec::new(); n];
    for i in 0..data.len() {
        let (f, v) = data.row(i);
        let bias_entry = bias.map(|b| (b, 1.0f32));
        let mut counts: Vec<(usize, u32)> = Vec::new();
        for (feat, x) in f.iter().copied().zip(v.iter().copied()).chain(bias_entry) {
            let b = (feat / block_size) as usize;
            let k = blocks[b].binary_search(&feat).expect("collected above") as u32;
            entries[b].push((i as u32, k, x));
            match counts.iter_mut().find(|c| c.0 == b) {
                Some(c) => c.1 += 1,
                None => counts.push((b, 1)),
            }
        }
        for (b, c) in counts {
            row_nnz[b].push((i as u32, c));
        }
    }
    blocks
        .into_iter()
        .zip(entries)
        .zip(row_nnz)
        .map(|((keys, entries), row_nnz)| {
            let w = vec![0.0; keys.len()];
            Ok(Block { keys: KeyList::new(keys)?, entries, w, row_nnz })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_stable_at_extremes() {
        assert!((logistic_loss(0.0) - 2f64.ln()).abs() < 1e-12);
        assert!(logistic_loss(1000.0) >= 0.0 && logistic_loss(1000.0) < 1e-300 + 1e-12);
        assert!((logistic_loss(-1000.0) - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn auc_and_accuracy_by_hand() {
        let labels = [1.0, -1.0, 1.0, -1.0];
        let offsets = [0u64, 1, 2, 3, 4];
        let features = [0u64, 0, 0, 0];
        let values = [2.0f32, 1.0, -1.0, -2.0];
        let rows = Rows { labels: &labels, offsets: &offsets, features: &features, values: &values };
        // margins 2, 1, -1, -2 with w = 1: predictions +,+,-,- vs labels +,-,+,-
        let (acc, auc) = evaluate(rows, &[1.0], false);
        assert_eq!(acc, 0.5);
        // positives at 2 and -1, negatives at 1 and -2: pairs won 3 of 4.
        assert!((auc - 0.75).abs() < 1e-12);
    }
}
