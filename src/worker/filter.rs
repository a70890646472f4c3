//! Worker-side filters (DESIGN section 4): send fewer bytes, lose nothing
//! that matters.
//!
//! * **Significantly modified**: each pushed change is added to a per-key
//!   accumulator; a key is sent only when its accumulated change is
//!   significant (larger than a threshold, absolute or relative to the key's
//!   current weight), and the threshold shrinks clock after clock. What is
//!   not sent stays accumulated; [`crate::Worker::flush`] sends the rest, so
//!   the sum of everything applied equals the sum of everything pushed.
//! * **KKT** (L1 problems): a coordinate whose weight is 0 and whose gradient
//!   satisfies |g| <= lambda - delta would stay 0 after the proximal step, so
//!   it is not sent at all.
//!
//! Both need the key's current weight, which the worker knows from its last
//! pull of that key (the value cache); a key never pulled is never skipped.

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::table::Key;

/// The significantly-modified filter's threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Significant {
    /// Threshold at clock 0.
    pub threshold: f32,
    /// Compare against |change| / |weight| instead of |change|.
    pub relative: bool,
    /// The threshold is multiplied by this every clock (e.g. 0.9).
    pub decay: f32,
    /// It never shrinks below this.
    pub min_threshold: f32,
}

impl Significant {
    /// Send a key when some coordinate's accumulated change exceeds `t`.
    pub fn absolute(t: f32) -> Self {
        Significant { threshold: t, relative: false, decay: 1.0, min_threshold: 0.0 }
    }
    /// Send a key when some coordinate's accumulated change exceeds `t` times
    /// the key's current weight.
    pub fn relative(t: f32) -> Self {
        Significant { relative: true, ..Significant::absolute(t) }
    }
    /// Shrink the threshold by `decay` per clock, down to `min`.
    pub fn decaying(mut self, decay: f32, min: f32) -> Self {
        self.decay = decay;
        self.min_threshold = min;
        self
    }
    fn at(&self, clock: u32) -> f32 {
        (self.threshold * self.decay.powi(clock.min(i32::MAX as u32) as i32)).max(self.min_threshold)
    }
}

/// The KKT filter for L1-regularized problems.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Kkt {
    pub lambda: f32,
    /// Safety margin: skip only when |g| <= lambda - delta.
    pub delta: f32,
}

/// Filters of one table, on one worker.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Filters {
    pub significant: Option<Significant>,
    pub kkt: Option<Kkt>,
    /// Version-filtered pulls: the worker keeps the values and versions it
    /// last pulled, and a pull transfers only the keys whose version advanced.
    pub version_pull: bool,
    /// Key caching: a key list sent before to a server is named by a 64-bit
    /// digest instead of being sent again.
    pub key_cache: bool,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        self.significant.is_none() && self.kkt.is_none() && !self.version_pull && !self.key_cache
    }
    fn needs_weights(&self) -> bool {
        self.kkt.is_some() || self.significant.is_some_and(|s| s.relative) || self.version_pull
    }
}

/// What the filters did, in keys and payload bytes (a key costs 8 bytes, a
/// value 4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FilterStats {
    /// Keys handed to push.
    pub push_keys: u64,
    /// Keys actually sent (a flush counts here too).
    pub push_keys_sent: u64,
    pub push_bytes_sent: u64,
    /// Keys the KKT filter dropped, and the bytes that saved.
    pub kkt_keys_skipped: u64,
    pub kkt_bytes_saved: u64,
    /// Key pushes folded into accumulators instead of being sent, and the
    /// bytes that saved.
    pub significant_keys_held: u64,
    pub significant_bytes_saved: u64,
    /// Version-filtered pulls: keys not transferred because they had not
    /// changed, the value bytes that saved, and the bytes the scheme costs
    /// (4 per requested key for its version, plus the changed-keys bitmap and
    /// 4 per changed key).
    pub version_keys_unchanged: u64,
    pub version_bytes_saved: u64,
    pub version_bytes_overhead: u64,
    /// Key bytes not sent because the server kept the list (key caching).
    pub key_cache_bytes_saved: u64,
}

impl FilterStats {
    pub fn add(&mut self, o: &FilterStats) {
        self.push_keys += o.push_keys;
        self.push_keys_sent += o.push_keys_sent;
        self.push_bytes_sent += o.push_bytes_sent;
        self.kkt_keys_skipped += o.kkt_keys_skipped;
        self.kkt_bytes_saved += o.kkt_bytes_saved;
        self.significant_keys_held += o.significant_keys_held;
        self.significant_bytes_saved += o.significant_bytes_saved;
        self.version_keys_unchanged += o.version_keys_unchanged;
        self.version_bytes_saved += o.version_bytes_saved;
        self.version_bytes_overhead += o.version_bytes_overhead;
        self.key_cache_bytes_saved += o.key_cache_bytes_saved;
    }
    /// Bytes all filters saved, net of what version filtering costs.
    pub fn bytes_saved(&self) -> i64 {
        (self.kkt_bytes_saved + self.significant_bytes_saved + self.version_bytes_saved + self.key_cache_bytes_saved)
            as i64
            - self.version_bytes_overhead as i64
    }
}

/// Per-key arrays indexed through a hash map; entries are never removed.
#[derive(Default)]
struct KeyedArrays {
    index: FxHashMap<Key, u32>,
    keys: Vec<Key>,
    vals: Vec<f32>,
}

impl KeyedArrays {
    fn get(&self, key: Key, dim: usize) -> Option<&[f32]> {
        self.index.get(&key).map(|&i| &self.vals[i as usize * dim..(i as usize + 1) * dim])
    }
    fn entry(&mut self, key: Key, dim: usize) -> (usize, &mut [f32]) {
        let n = self.keys.len() as u32;
        let i = *self.index.entry(key).or_insert_with(|| n) as usize;
        if i == self.keys.len() {
            self.keys.push(key);
            self.vals.resize(self.vals.len() + dim, 0.0);
        }
        (i, &mut self.vals[i * dim..(i + 1) * dim])
    }
}

/// The filter state of one table on one worker.
pub(super) struct TableFilter {
    cfg: Filters,
    dim: usize,
    /// Accumulated, not yet sent changes, and which entries hold any.
    acc: KeyedArrays,
    pending: Vec<bool>,
    /// The last weights pulled (for KKT, relative thresholds and version
    /// filtering), and their versions (parallel to `weights`' entries).
    weights: KeyedArrays,
    versions: Vec<u32>,
    pub stats: FilterStats,
}

impl TableFilter {
    pub fn new(cfg: Filters, dim: usize) -> Self {
        TableFilter {
            cfg,
            dim,
            acc: KeyedArrays::default(),
            pending: Vec::new(),
            weights: KeyedArrays::default(),
            versions: Vec::new(),
            stats: FilterStats::default(),
        }
    }

    pub fn needs_weights(&self) -> bool {
        self.cfg.needs_weights()
    }

    /// Remembers pulled weights (of a pull that did not report versions:
    /// the cached versions stay, so a later version-filtered pull may fetch
    /// an unchanged key once more, never miss a change).
    pub fn observe(&mut self, keys: &[Key], vals: &[f32]) {
        if !self.needs_weights() {
            return;
        }
        let d = self.dim;
        for (k, v) in keys.iter().zip(vals.chunks_exact(d)) {
            let (idx, w) = self.weights.entry(*k, d);
            w.copy_from_slice(v);
            if self.versions.len() <= idx {
                self.versions.resize(idx + 1, crate::proto::VERSION_UNKNOWN);
            }
        }
    }

    pub fn version_pull(&self) -> bool {
        self.cfg.version_pull
    }

    pub fn key_cache(&self) -> bool {
        self.cfg.key_cache
    }

    /// Whether pushes go through `filter_push` at all.
    pub fn filters_pushes(&self) -> bool {
        self.cfg.significant.is_some() || self.cfg.kkt.is_some()
    }

    /// The versions to send with a version-filtered pull of `keys`.
    pub fn known_versions(&mut self, keys: &[Key]) -> Vec<u32> {
        self.stats.version_bytes_overhead += 4 * keys.len() as u64;
        keys.iter()
            .map(|k| self.weights.index.get(k).map_or(crate::proto::VERSION_UNKNOWN, |&i| self.versions[i as usize]))
            .collect()
    }

    /// Fills `out` for `keys` from a version-filtered reply: changed keys
    /// from the reply (and into the cache), the others from the cache.
    pub fn apply_changed(
        &mut self,
        keys: &[Key],
        bitmap: &[u8],
        values: &[f32],
        versions: &[u32],
        out: &mut [f32],
    ) -> Result<(), String> {
        let d = self.dim;
        let mut j = 0;
        let changed = versions.len();
        if bitmap.len() != keys.len().div_ceil(8) || values.len() != changed * d || out.len() != keys.len() * d {
            return Err("malformed version-filtered reply".into());
        }
        for (i, (&key, o)) in keys.iter().zip(out.chunks_exact_mut(d)).enumerate() {
            if bitmap[i / 8] >> (i % 8) & 1 == 1 {
                let v = values.get(j * d..(j + 1) * d).ok_or("more changed keys than values")?;
                o.copy_from_slice(v);
                let (idx, w) = self.weights.entry(key, d);
                w.copy_from_slice(v);
                if self.versions.len() <= idx {
                    self.versions.resize(idx + 1, crate::proto::VERSION_UNKNOWN);
                }
                self.versions[idx] = versions[j];
                j += 1;
            } else {
                let w =
                    self.weights.get(key, d).ok_or_else(|| format!("key {key} reported unchanged but never pulled"))?;
                o.copy_from_slice(w);
                self.stats.version_keys_unchanged += 1;
                self.stats.version_bytes_saved += 4 * d as u64;
            }
        }
        if j != changed {
            return Err("fewer changed keys than values".into());
        }
        self.stats.version_bytes_overhead += bitmap.len() as u64 + 4 * changed as u64;
        Ok(())
    }

    /// Filters one push: returns the keys and values to send now (sorted,
    /// since `keys` are).
    pub fn filter_push(&mut self, keys: &[Key], vals: &[f32], clock: u32) -> (Vec<Key>, Vec<f32>) {
        let d = self.dim;
        let per_key = 8 + 4 * d as u64;
        let mut out_k = Vec::with_capacity(keys.len());
        let mut out_v = Vec::with_capacity(vals.len());
        self.stats.push_keys += keys.len() as u64;
        let threshold = self.cfg.significant.map(|s| s.at(clock));
        for (&key, g) in keys.iter().zip(vals.chunks_exact(d)) {
            if let Some(kkt) = self.cfg.kkt {
                let w = self.weights.get(key, d);
                let bound = kkt.lambda - kkt.delta;
                if w.is_some_and(|w| w.iter().all(|&x| x == 0.0)) && g.iter().all(|x| x.abs() <= bound) {
                    self.stats.kkt_keys_skipped += 1;
                    self.stats.kkt_bytes_saved += per_key;
                    continue;
                }
            }
            let Some(sig) = self.cfg.significant else {
                out_k.push(key);
                out_v.extend_from_slice(g);
                continue;
            };
            let t = threshold.expect("set with significant");
            let weight = self.weights.get(key, d).map(|w| w.to_vec());
            let (i, acc) = self.acc.entry(key, d);
            for (a, x) in acc.iter_mut().zip(g) {
                *a += x;
            }
            let significant = acc.iter().enumerate().any(|(j, a)| {
                let scale = if sig.relative { weight.as_ref().map_or(0.0, |w| w[j].abs()) } else { 1.0 };
                // Relative to an unknown or zero weight, any change counts.
                if sig.relative && scale == 0.0 { *a != 0.0 } else { a.abs() > t * scale }
            });
            if self.pending.len() <= i {
                self.pending.resize(i + 1, false);
            }
            if significant {
                out_k.push(key);
                out_v.extend_from_slice(acc);
                acc.fill(0.0);
                self.pending[i] = false;
            } else {
                self.pending[i] = acc.iter().any(|&a| a != 0.0);
                self.stats.significant_keys_held += 1;
                self.stats.significant_bytes_saved += per_key;
            }
        }
        self.stats.push_keys_sent += out_k.len() as u64;
        self.stats.push_bytes_sent += out_k.len() as u64 * per_key;
        (out_k, out_v)
    }

    /// Everything still accumulated, sorted by key, and clears it.
    pub fn drain(&mut self) -> (Vec<Key>, Vec<f32>) {
        let d = self.dim;
        let mut idx: Vec<usize> = (0..self.pending.len()).filter(|&i| self.pending[i]).collect();
        idx.sort_unstable_by_key(|&i| self.acc.keys[i]);
        let mut out_k = Vec::with_capacity(idx.len());
        let mut out_v = Vec::with_capacity(idx.len() * d);
        for i in idx {
            out_k.push(self.acc.keys[i]);
            let a = &mut self.acc.vals[i * d..(i + 1) * d];
            out_v.extend_from_slice(a);
            a.fill(0.0);
            self.pending[i] = false;
        }
        // A flush sends what was held before: those bytes were deferred, not saved.
        let per_key = 8 + 4 * d as u64;
        self.stats.push_keys_sent += out_k.len() as u64;
        self.stats.push_bytes_sent += out_k.len() as u64 * per_key;
        self.stats.significant_bytes_saved =
            self.stats.significant_bytes_saved.saturating_sub(out_k.len() as u64 * per_key);
        (out_k, out_v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_changes_accumulate_until_significant_and_drain_returns_the_rest() {
        let mut f =
            TableFilter::new(Filters { significant: Some(Significant::absolute(2.5)), ..Filters::default() }, 1);
        assert_eq!(f.filter_push(&[1, 2], &[1.0, 3.0], 0), (vec![2], vec![3.0]));
        assert_eq!(f.filter_push(&[1, 2], &[1.0, 1.0], 0), (vec![], vec![]));
        assert_eq!(f.filter_push(&[1], &[1.0], 0), (vec![1], vec![3.0]));
        assert_eq!(f.drain(), (vec![2], vec![1.0]));
        assert_eq!(f.drain(), (vec![], vec![]));
        // Nothing lost: 1+1+1 = 3 and 3+1 = 4 were sent in total.
        assert_eq!(f.stats.push_keys, 5);
    }

    #[test]
    fn the_threshold_decays_per_clock() {
        let s = Significant::absolute(8.0).decaying(0.5, 1.0);
        assert_eq!((s.at(0), s.at(1), s.at(3), s.at(10)), (8.0, 4.0, 1.0, 1.0));
    }

    #[test]
    fn relative_thresholds_use_the_last_pulled_weight() {
        let mut f =
            TableFilter::new(Filters { significant: Some(Significant::relative(0.1)), ..Filters::default() }, 1);
        f.observe(&[1, 2], &[100.0, 1.0]);
        // 5 is 5% of 100: held; 0.5 is 50% of 1: sent; key 3 has no weight: sent.
        assert_eq!(f.filter_push(&[1, 2, 3], &[5.0, 0.5, 0.01], 0), (vec![2, 3], vec![0.5, 0.01]));
        assert_eq!(f.filter_push(&[1], &[6.0], 0), (vec![1], vec![11.0]));
    }

    #[test]
    fn kkt_skips_zero_weights_with_small_gradients_only() {
        let mut f = TableFilter::new(Filters { kkt: Some(Kkt { lambda: 1.0, delta: 0.1 }), ..Filters::default() }, 1);
        f.observe(&[1, 2, 3], &[0.0, 0.0, 0.5]);
        // key 1: w=0, |g|=0.5 <= 0.9 skipped; key 2: w=0, |g|=0.95 sent;
        // key 3: w!=0 sent; key 4: weight unknown, sent.
        assert_eq!(f.filter_push(&[1, 2, 3, 4], &[0.5, -0.95, 0.1, 0.0], 0), (vec![2, 3, 4], vec![-0.95, 0.1, 0.0]));
        assert_eq!(f.stats.kkt_keys_skipped, 1);
        assert_eq!(f.stats.kkt_bytes_saved, 12);
    }
}
