//! What a table is: its id, key space, value shape, update rule, initial
//! values and consistency. Shared by workers (which declare tables), servers
//! (which store them) and the wire protocol (which carries the spec).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::slot::MAX_DIM;

/// Identifies a table within a job.
pub type TableId = u32;

/// A parameter key.
pub type Key = u64;

/// How a table's slots are allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Storage {
    /// Every key of the key space has a slot from the start, found by offset.
    /// For keys `0..n` with most keys in use.
    Dense,
    /// Slots are created on first push and found through an index. For huge,
    /// sparsely used key spaces (hashed features).
    Sparse,
}

/// When an operation may complete relative to other workers' progress
/// (DESIGN section 3). An operation issued at clock `t` waits until every
/// shard it touches has applied every worker's pushes of clocks `<= t - tau - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// tau = 0: bulk-synchronous.
    Sequential,
    /// At most `tau` clocks of other workers' pushes may be missing.
    BoundedDelay(u32),
    /// Never waits.
    Eventual,
}

impl Consistency {
    /// The maximal delay tau, `None` for eventual.
    pub fn tau(self) -> Option<u32> {
        match self {
            Consistency::Sequential => Some(0),
            Consistency::BoundedDelay(t) => Some(t),
            Consistency::Eventual => None,
        }
    }
}

/// Initial values of keys never pushed. Deterministic per (seed, key,
/// coordinate), so every server and every restart agrees.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Init {
    Zeros,
    Constant(f32),
    Uniform { low: f32, high: f32, seed: u64 },
    Normal { mean: f32, std: f32, seed: u64 },
}

impl Init {
    /// Fills the initial values of `key`.
    pub fn fill(&self, key: Key, out: &mut [f32]) {
        match *self {
            Init::Zeros => out.fill(0.0),
            Init::Constant(c) => out.fill(c),
            Init::Uniform { low, high, seed } => {
                for (i, v) in out.iter_mut().enumerate() {
                    *v = low + (high - low) * unit(seed, key, i as u64, 0);
                }
            }
            Init::Normal { mean, std, seed } => {
                for (i, v) in out.iter_mut().enumerate() {
                    // Box-Muller on two independent uniforms in (0, 1].
                    let u1 = 1.0 - unit(seed, key, i as u64, 1) as f64;
                    let u2 = unit(seed, key, i as u64, 2) as f64;
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    *v = mean + std * z as f32;
                }
            }
        }
    }

    pub(crate) fn is_zeros(&self) -> bool {
        matches!(self, Init::Zeros | Init::Constant(0.0))
    }
}

/// splitmix64 finalizer: a cheap, well-mixed 64-bit hash.
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The key hash used across pserver (public for tools and benchmarks).
pub fn mix64_public(x: u64) -> u64 {
    mix64(x)
}

/// A uniform float in [0, 1) from (seed, key, coordinate, stream).
fn unit(seed: u64, key: Key, coord: u64, stream: u64) -> f32 {
    let h = mix64(mix64(mix64(seed ^ stream.wrapping_mul(0xA24B_AED4_963E_E407)) ^ key) ^ coord);
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// The update rule a server applies to pushes. Built-in rules are named here so
/// that a spec can travel to server processes; `Custom` names a rule the
/// server's program registered (see `server::Rules`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum UpdaterSpec {
    /// w = pushed value.
    Assign,
    /// w += pushed value (aggregation of gradients or counts).
    Sum,
    /// w -= lr * g.
    Sgd { lr: f32 },
    /// Heavy-ball momentum: v = momentum * v - lr * g; w += v.
    Momentum { lr: f32, momentum: f32 },
    /// n += g^2; w -= lr * g / (sqrt(n) + eps).
    AdaGrad { lr: f32, eps: f32, initial_accumulator: f32 },
    /// FTRL-proximal (McMahan et al. 2013), per coordinate.
    Ftrl { alpha: f32, beta: f32, l1: f32, l2: f32 },
    /// Proximal gradient step: w = soft_threshold(w - eta*g, eta*l1) / (1 + eta*l2).
    Proximal { eta: f32, l1: f32, l2: f32 },
    /// Aggregated proximal Newton step (dim 2, values `[w, g]`, pushes
    /// `[g, h]`): once every worker finished a clock,
    /// w = soft_threshold(h*w - g, l1) / (h + l2) with the summed g and h;
    /// the summed g stays beside w. `max_step` > 0 bounds |w' - w| per step.
    ProximalNewton { l1: f32, l2: f32, max_step: f32 },
    /// A rule registered under this name in the server's program.
    Custom(String),
}

/// Everything that defines a table. Two declarations of the same id must be
/// identical.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableSpec {
    pub id: TableId,
    /// Keys are `0..keys`.
    pub keys: u64,
    /// Values per key.
    pub dim: u32,
    pub storage: Storage,
    pub updater: UpdaterSpec,
    pub init: Init,
    /// The default of the table's operations. It also decides what a lost
    /// worker (one that may be restarted) does to the table: a sequential
    /// table keeps its place, as an aggregating rule does (a clock's state
    /// is not complete without its pushes), while eventual and bounded-delay
    /// tables count it as left until its new incarnation comes. A
    /// per-operation `with_consistency` does not change that.
    pub consistency: Consistency,
}

impl TableSpec {
    /// A dense table of keys `0..keys`, `dim` values each, summing pushes.
    pub fn dense(id: TableId, keys: u64, dim: u32) -> Self {
        TableSpec {
            id,
            keys,
            dim,
            storage: Storage::Dense,
            updater: UpdaterSpec::Sum,
            init: Init::Zeros,
            consistency: Consistency::Eventual,
        }
    }

    /// A sparse table over keys `0..keys` (use `u64::MAX` for any hashed key).
    pub fn sparse(id: TableId, keys: u64, dim: u32) -> Self {
        TableSpec { storage: Storage::Sparse, ..TableSpec::dense(id, keys, dim) }
    }

    pub fn updater(mut self, updater: UpdaterSpec) -> Self {
        self.updater = updater;
        self
    }

    pub fn init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }

    pub fn consistency(mut self, consistency: Consistency) -> Self {
        self.consistency = consistency;
        self
    }

    /// Checks the spec is usable; the error says what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidSpec(format!("table {}: {m}", self.id)));
        if self.keys == 0 {
            return bad("the key space is empty (keys = 0)".into());
        }
        if self.dim == 0 || self.dim > MAX_DIM {
            return bad(format!("dim {} is outside 1..={MAX_DIM}", self.dim));
        }
        let finite =
            |name: &str, v: f32| if v.is_finite() { Ok(()) } else { bad(format!("{name} = {v} is not finite")) };
        match &self.updater {
            UpdaterSpec::Sgd { lr } => finite("lr", *lr)?,
            UpdaterSpec::Momentum { lr, momentum } => {
                finite("lr", *lr)?;
                if !(*momentum >= 0.0 && *momentum < 1.0) {
                    return bad(format!("momentum {momentum} must be in [0, 1)"));
                }
            }
            UpdaterSpec::AdaGrad { lr, eps, initial_accumulator } => {
                finite("lr", *lr)?;
                if !(*eps > 0.0 && eps.is_finite()) {
                    return bad(format!("adagrad eps = {eps} must be positive"));
                }
                if !(*initial_accumulator >= 0.0 && initial_accumulator.is_finite()) {
                    return bad(format!("adagrad initial_accumulator = {initial_accumulator} must be >= 0"));
                }
            }
            UpdaterSpec::Ftrl { alpha, beta, l1, l2 } => {
                if !(*alpha > 0.0 && alpha.is_finite()) {
                    return bad(format!("ftrl alpha = {alpha} must be positive"));
                }
                for (n, v) in [("beta", beta), ("l1", l1), ("l2", l2)] {
                    if !(*v >= 0.0 && v.is_finite()) {
                        return bad(format!("ftrl {n} = {v} must be >= 0"));
                    }
                }
            }
            UpdaterSpec::Proximal { eta, l1, l2 } => {
                if !(*eta > 0.0 && eta.is_finite()) {
                    return bad(format!("proximal eta = {eta} must be positive"));
                }
                for (n, v) in [("l1", l1), ("l2", l2)] {
                    if !(*v >= 0.0 && v.is_finite()) {
                        return bad(format!("proximal {n} = {v} must be >= 0"));
                    }
                }
            }
            UpdaterSpec::ProximalNewton { l1, l2, max_step } => {
                if !(*max_step >= 0.0 && max_step.is_finite()) {
                    return bad(format!("proximal newton max_step = {max_step} must be finite and >= 0"));
                }
                if self.dim != 2 {
                    return bad(format!("ProximalNewton needs dim 2 ([w, g]), not {}", self.dim));
                }
                for (n, v) in [("l1", l1), ("l2", l2)] {
                    if !(*v >= 0.0 && v.is_finite()) {
                        return bad(format!("proximal newton {n} = {v} must be >= 0"));
                    }
                }
            }
            UpdaterSpec::Custom(name) if name.is_empty() => return bad("custom updater name is empty".into()),
            _ => {}
        }
        match self.init {
            Init::Constant(c) => finite("init constant", c)?,
            Init::Uniform { low, high, .. } => {
                if !(low.is_finite() && high.is_finite() && low <= high) {
                    return bad(format!("uniform init [{low}, {high}) is not a finite interval"));
                }
            }
            Init::Normal { mean, std, .. } => {
                if !(mean.is_finite() && std.is_finite() && std >= 0.0) {
                    return bad(format!("normal init mean {mean} std {std} is invalid"));
                }
            }
            Init::Zeros => {}
        }
        if let Consistency::BoundedDelay(t) = self.consistency
            && t > 1_000_000
        {
            return bad(format!("bounded delay {t} is absurd; use Eventual"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_deterministic_and_within_bounds() {
        let init = Init::Uniform { low: -0.5, high: 0.5, seed: 7 };
        let (mut a, mut b) = ([0.0; 8], [0.0; 8]);
        init.fill(42, &mut a);
        init.fill(42, &mut b);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)));
        let mut c = [0.0; 8];
        init.fill(43, &mut c);
        assert_ne!(a, c);
    }

    #[test]
    fn normal_init_has_roughly_the_requested_moments() {
        let init = Init::Normal { mean: 1.0, std: 2.0, seed: 1 };
        let mut v = vec![0.0f32; 1];
        let n = 20_000;
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for k in 0..n {
            init.fill(k, &mut v);
            s += v[0] as f64;
            s2 += (v[0] as f64).powi(2);
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
    }

    #[test]
    fn invalid_specs_are_refused_with_a_reason() {
        assert!(TableSpec::dense(1, 0, 1).validate().unwrap_err().to_string().contains("empty"));
        assert!(TableSpec::dense(1, 10, 0).validate().is_err());
        let s = TableSpec::dense(1, 10, 1).updater(UpdaterSpec::Sgd { lr: f32::NAN });
        assert!(s.validate().unwrap_err().to_string().contains("lr"));
        let s =
            TableSpec::dense(1, 10, 1).updater(UpdaterSpec::AdaGrad { lr: 0.1, eps: 0.0, initial_accumulator: 0.0 });
        assert!(s.validate().is_err());
        assert!(TableSpec::sparse(2, u64::MAX, 4).validate().is_ok());
    }
}
