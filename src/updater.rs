//! Update rules: how a server folds a pushed vector into a key's values.
//!
//! A rule sees one key at a time: its current values, its per-key optimizer
//! state (kept by the shard beside, not inside, the slot, so remote readers
//! never pay for it) and the pushed vector. Rules are pure arithmetic; they
//! know nothing of shards, transports or threads.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::table::{Key, UpdaterSpec};

/// A server-side update rule. Implement it for a custom rule and register it
/// with [`Rules::register`]; closures work through [`rule_fn`].
pub trait Updater: Send + Sync + 'static {
    /// Floats of state kept per value (AdaGrad keeps 1, FTRL 2).
    fn state_per_value(&self) -> usize {
        0
    }

    /// Initial state of a key (zeros unless overridden).
    fn init_state(&self, state: &mut [f32]) {
        state.fill(0.0);
    }

    /// Applies `push` to `value` (both `dim` long); `state` is
    /// `dim * state_per_value()` long.
    fn apply(&self, key: Key, value: &mut [f32], state: &mut [f32], push: &[f32]);

    /// The same rule as a stateless scalar function, when it is one: lets
    /// the store run dense scalar pushes in a tight loop. Custom rules keep
    /// the default (`None`) and always go through `apply`.
    fn scalar(&self) -> Option<ScalarRule> {
        None
    }

    /// Aggregating rules (DESIGN section 1's "server aggregates, then
    /// updates"): a push only folds into the key's state ([`Updater::accumulate`]);
    /// the value changes once every worker has finished the clock the pushes
    /// belong to ([`Updater::finalize`]). `apply` is not used for them.
    fn aggregates(&self) -> bool {
        false
    }

    /// Folds one push into the key's accumulator (aggregating rules).
    fn accumulate(&self, state: &mut [f32], push: &[f32]) {
        for (a, p) in state.iter_mut().zip(push) {
            *a += p;
        }
    }

    /// Applies what was accumulated and resets the accumulator (aggregating
    /// rules).
    fn finalize(&self, key: Key, value: &mut [f32], state: &mut [f32]) {
        let _ = (key, value, state);
    }
}

/// Proximal Newton step for L1/L2-regularized problems, aggregated over all
/// workers per clock. A table of dim 2 holds `[w, g]` per key; workers push
/// `[g, h]` (their gradient and curvature for the key); once every worker has
/// finished the clock, `w <- soft_threshold(h*w - g, l1) / (h + l2)` with the
/// summed `g` and `h`, and the value's second slot keeps that summed `g` (the
/// KKT filter of L1 solvers reads it).
struct ProximalNewton {
    l1: f32,
    l2: f32,
    max_step: f32,
}
impl Updater for ProximalNewton {
    fn state_per_value(&self) -> usize {
        1
    }
    fn apply(&self, _: Key, _: &mut [f32], _: &mut [f32], _: &[f32]) {}
    fn aggregates(&self) -> bool {
        true
    }
    fn finalize(&self, _: Key, value: &mut [f32], state: &mut [f32]) {
        let (g, h) = (state[0], state[1]);
        state.fill(0.0);
        // Where the loss is flat (every example of the feature saturated, so
        // g = h = 0), the step must still apply the penalty: with the floored
        // curvature it takes the weight to 0, as the exact step would.
        let h = h.max(1e-12);
        let w = value[0];
        let mut next = soft_threshold(h * w - g, self.l1) / (h + self.l2);
        // Trust region: a Newton step on a nearly flat loss can jump far
        // beyond where the quadratic model holds.
        if self.max_step > 0.0 {
            next = next.clamp(w - self.max_step, w + self.max_step);
        }
        value[0] = next;
        value[1] = g;
    }
}

/// A stateless per-coordinate rule `w' = f(w, g)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScalarRule {
    Assign,
    Sum,
    Sgd { lr: f32 },
    Proximal { eta: f32, l1: f32, l2: f32 },
}

impl ScalarRule {
    #[inline(always)]
    pub fn apply(self, w: f32, g: f32) -> f32 {
        match self {
            ScalarRule::Assign => g,
            ScalarRule::Sum => w + g,
            ScalarRule::Sgd { lr } => w - lr * g,
            ScalarRule::Proximal { eta, l1, l2 } => soft_threshold(w - eta * g, eta * l1) / (1.0 + eta * l2),
        }
    }
}

struct Assign;
impl Updater for Assign {
    fn apply(&self, _: Key, value: &mut [f32], _: &mut [f32], push: &[f32]) {
        value.copy_from_slice(push);
    }
    fn scalar(&self) -> Option<ScalarRule> {
        Some(ScalarRule::Assign)
    }
}

struct Sum;
impl Updater for Sum {
    fn apply(&self, _: Key, value: &mut [f32], _: &mut [f32], push: &[f32]) {
        for (w, g) in value.iter_mut().zip(push) {
            *w += g;
        }
    }
    fn scalar(&self) -> Option<ScalarRule> {
        Some(ScalarRule::Sum)
    }
}

struct Sgd {
    lr: f32,
}
impl Updater for Sgd {
    fn apply(&self, _: Key, value: &mut [f32], _: &mut [f32], push: &[f32]) {
        for (w, g) in value.iter_mut().zip(push) {
            *w -= self.lr * g;
        }
    }
    fn scalar(&self) -> Option<ScalarRule> {
        Some(ScalarRule::Sgd { lr: self.lr })
    }
}

/// Heavy-ball momentum: v = momentum * v - lr * g; w += v.
struct Momentum {
    lr: f32,
    momentum: f32,
}
impl Updater for Momentum {
    fn state_per_value(&self) -> usize {
        1
    }
    fn apply(&self, _: Key, value: &mut [f32], state: &mut [f32], push: &[f32]) {
        for ((w, v), g) in value.iter_mut().zip(state.iter_mut()).zip(push) {
            *v = self.momentum * *v - self.lr * g;
            *w += *v;
        }
    }
}

struct AdaGrad {
    lr: f32,
    eps: f32,
    initial_accumulator: f32,
}
impl Updater for AdaGrad {
    fn state_per_value(&self) -> usize {
        1
    }
    fn init_state(&self, state: &mut [f32]) {
        state.fill(self.initial_accumulator);
    }
    fn apply(&self, _: Key, value: &mut [f32], state: &mut [f32], push: &[f32]) {
        for ((w, n), g) in value.iter_mut().zip(state.iter_mut()).zip(push) {
            *n += g * g;
            *w -= self.lr * g / (n.sqrt() + self.eps);
        }
    }
}

/// FTRL-proximal; state per coordinate is (z, n).
struct Ftrl {
    alpha: f32,
    beta: f32,
    l1: f32,
    l2: f32,
}
impl Updater for Ftrl {
    fn state_per_value(&self) -> usize {
        2
    }
    fn apply(&self, _: Key, value: &mut [f32], state: &mut [f32], push: &[f32]) {
        for ((w, zn), g) in value.iter_mut().zip(state.chunks_exact_mut(2)).zip(push) {
            let (z, n) = (zn[0], zn[1]);
            let n_new = n + g * g;
            let sigma = (n_new.sqrt() - n.sqrt()) / self.alpha;
            let z_new = z + g - sigma * *w;
            zn[0] = z_new;
            zn[1] = n_new;
            *w = if z_new.abs() <= self.l1 {
                0.0
            } else {
                -(z_new - z_new.signum() * self.l1) / ((self.beta + n_new.sqrt()) / self.alpha + self.l2)
            };
        }
    }
}

struct Proximal {
    eta: f32,
    l1: f32,
    l2: f32,
}
impl Updater for Proximal {
    fn apply(&self, _: Key, value: &mut [f32], _: &mut [f32], push: &[f32]) {
        let rule = ScalarRule::Proximal { eta: self.eta, l1: self.l1, l2: self.l2 };
        for (w, g) in value.iter_mut().zip(push) {
            *w = rule.apply(*w, *g);
        }
    }
    fn scalar(&self) -> Option<ScalarRule> {
        Some(ScalarRule::Proximal { eta: self.eta, l1: self.l1, l2: self.l2 })
    }
}

/// sign(u) * max(|u| - t, 0): the proximal operator of t * |.|.
#[inline]
pub fn soft_threshold(u: f32, t: f32) -> f32 {
    if u > t {
        u - t
    } else if u < -t {
        u + t
    } else {
        0.0
    }
}

struct FnRule<F>(F);
impl<F> Updater for FnRule<F>
where
    F: Fn(&mut [f32], &[f32]) + Send + Sync + 'static,
{
    fn apply(&self, _: Key, value: &mut [f32], _: &mut [f32], push: &[f32]) {
        (self.0)(value, push)
    }
}

/// A stateless custom rule from a closure `(value, push)`.
pub fn rule_fn<F>(f: F) -> Arc<dyn Updater>
where
    F: Fn(&mut [f32], &[f32]) + Send + Sync + 'static,
{
    Arc::new(FnRule(f))
}

/// The custom rules a server program offers, by name. Built-in rules need no
/// registration.
#[derive(Clone, Default)]
pub struct Rules {
    custom: HashMap<String, Arc<dyn Updater>>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.custom.keys()).finish()
    }
}

impl Rules {
    /// Registers `rule` under `name` (a spec names it as `UpdaterSpec::Custom(name)`).
    pub fn register(&mut self, name: impl Into<String>, rule: Arc<dyn Updater>) -> &mut Self {
        self.custom.insert(name.into(), rule);
        self
    }

    /// The rule a spec names.
    pub fn resolve(&self, spec: &UpdaterSpec) -> Result<Arc<dyn Updater>> {
        Ok(match *spec {
            UpdaterSpec::Assign => Arc::new(Assign),
            UpdaterSpec::Sum => Arc::new(Sum),
            UpdaterSpec::Sgd { lr } => Arc::new(Sgd { lr }),
            UpdaterSpec::Momentum { lr, momentum } => Arc::new(Momentum { lr, momentum }),
            UpdaterSpec::AdaGrad { lr, eps, initial_accumulator } => Arc::new(AdaGrad { lr, eps, initial_accumulator }),
            UpdaterSpec::Ftrl { alpha, beta, l1, l2 } => Arc::new(Ftrl { alpha, beta, l1, l2 }),
            UpdaterSpec::Proximal { eta, l1, l2 } => Arc::new(Proximal { eta, l1, l2 }),
            UpdaterSpec::ProximalNewton { l1, l2, max_step } => Arc::new(ProximalNewton { l1, l2, max_step }),
            UpdaterSpec::Custom(ref name) => {
                self.custom.get(name).cloned().ok_or_else(|| Error::UnknownUpdater(name.clone()))?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(spec: UpdaterSpec, w0: &[f32], pushes: &[&[f32]]) -> (Vec<f32>, Vec<f32>) {
        let rule = Rules::default().resolve(&spec).unwrap();
        let mut w = w0.to_vec();
        let mut state = vec![0.0; w.len() * rule.state_per_value()];
        rule.init_state(&mut state);
        for p in pushes {
            rule.apply(0, &mut w, &mut state, p);
        }
        (w, state)
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{a:?} != {b:?}");
        }
    }

    #[test]
    fn assign_and_sum() {
        assert_eq!(run(UpdaterSpec::Assign, &[1.0, 2.0], &[&[5.0, 6.0]]).0, vec![5.0, 6.0]);
        assert_eq!(run(UpdaterSpec::Sum, &[1.0, 2.0], &[&[5.0, 6.0], &[1.0, 1.0]]).0, vec![7.0, 9.0]);
    }

    #[test]
    fn sgd_by_hand() {
        // w = 1 - 0.1*2 = 0.8, then 0.8 - 0.1*(-1) = 0.9
        close(&run(UpdaterSpec::Sgd { lr: 0.1 }, &[1.0], &[&[2.0], &[-1.0]]).0, &[0.9]);
    }

    #[test]
    fn momentum_by_hand() {
        // v = -0.1*2 = -0.2, w = 0.8; v = 0.5*-0.2 - 0.1*1 = -0.2, w = 0.6
        let (w, v) = run(UpdaterSpec::Momentum { lr: 0.1, momentum: 0.5 }, &[1.0], &[&[2.0], &[1.0]]);
        close(&w, &[0.6]);
        close(&v, &[-0.2]);
    }

    #[test]
    fn adagrad_by_hand() {
        // n = 0.1 + 4 = 4.1; w = 1 - 0.5*2/(sqrt(4.1)+1e-8) = 1 - 1/2.0248457 = 0.5061350
        // n = 4.1 + 1 = 5.1; w = 0.5061350 - 0.5*1/sqrt(5.1) = 0.5061350 - 0.2214037 = 0.2847313
        let spec = UpdaterSpec::AdaGrad { lr: 0.5, eps: 1e-8, initial_accumulator: 0.1 };
        let (w, n) = run(spec, &[1.0], &[&[2.0], &[1.0]]);
        close(&w, &[0.284_731_3]);
        close(&n, &[5.1]);
    }

    #[test]
    fn ftrl_by_hand() {
        // alpha 1, beta 1, l1 0.5, l2 0, w0 = 0.
        // g = 2: n' = 4, sigma = 2, z = 2 - 0 = 2; |z| > 0.5 -> w = -(2 - 0.5)/((1+2)/1) = -0.5
        // g = -1: n' = 5, sigma = sqrt5 - 2 = 0.2360680, z = 2 - 1 - 0.2360680*(-0.5) = 1.1180340
        //         w = -(1.1180340 - 0.5)/(1 + sqrt5) = -0.6180340/3.2360680 = -0.1909830
        let spec = UpdaterSpec::Ftrl { alpha: 1.0, beta: 1.0, l1: 0.5, l2: 0.0 };
        let (w1, s1) = run(spec.clone(), &[0.0], &[&[2.0]]);
        close(&w1, &[-0.5]);
        close(&s1, &[2.0, 4.0]);
        let (w2, s2) = run(spec, &[0.0], &[&[2.0], &[-1.0]]);
        close(&w2, &[-0.190_983]);
        close(&s2, &[1.118_034, 5.0]);
        // A small gradient keeps |z| <= l1: the weight stays exactly 0.
        let spec = UpdaterSpec::Ftrl { alpha: 1.0, beta: 1.0, l1: 0.5, l2: 0.0 };
        assert_eq!(run(spec, &[0.0], &[&[0.3]]).0, vec![0.0]);
    }

    #[test]
    fn proximal_soft_thresholds_and_shrinks() {
        // eta 0.5, l1 1, l2 1: u = w - 0.5 g; w' = soft(u, 0.5) / 1.5
        // w=2, g=1 -> u=1.5 -> 1.0/1.5 = 0.6666667
        // w=0.2, g=0 -> u=0.2 -> 0
        // w=-2, g=-1 -> u=-1.5 -> -1/1.5
        let spec = UpdaterSpec::Proximal { eta: 0.5, l1: 1.0, l2: 1.0 };
        close(&run(spec, &[2.0, 0.2, -2.0], &[&[1.0, 0.0, -1.0]]).0, &[0.666_666_7, 0.0, -0.666_666_7]);
        assert_eq!(soft_threshold(0.5, 0.5), 0.0);
    }

    #[test]
    fn proximal_newton_aggregates_then_steps() {
        let rule = Rules::default().resolve(&UpdaterSpec::ProximalNewton { l1: 1.0, l2: 0.0, max_step: 0.0 }).unwrap();
        assert!(rule.aggregates());
        let (mut value, mut state) = ([0.5f32, 0.0], [0.0f32; 2]);
        rule.accumulate(&mut state, &[1.0, 2.0]);
        rule.accumulate(&mut state, &[2.0, 2.0]);
        assert_eq!(state, [3.0, 4.0]);
        // soft(4*0.5 - 3, 1) / 4 = soft(-1, 1) / 4 = 0
        rule.finalize(0, &mut value, &mut state);
        assert_eq!(value, [0.0, 3.0]);
        assert_eq!(state, [0.0, 0.0]);
        // soft(2*0 + 5, 1) / 2 = 2
        rule.accumulate(&mut state, &[-5.0, 2.0]);
        rule.finalize(0, &mut value, &mut state);
        assert_eq!(value, [2.0, -5.0]);
        // A flat loss (nothing pushed but zeros) still shrinks the weight.
        rule.accumulate(&mut state, &[0.0, 0.0]);
        rule.finalize(0, &mut value, &mut state);
        assert_eq!(value[0], 0.0);
        // The trust region bounds one step.
        let capped =
            Rules::default().resolve(&UpdaterSpec::ProximalNewton { l1: 0.0, l2: 0.0, max_step: 0.5 }).unwrap();
        let (mut value, mut state) = ([1.0f32, 0.0], [-10.0f32, 1.0]);
        capped.finalize(0, &mut value, &mut state);
        assert_eq!(value[0], 1.5);
    }

    #[test]
    fn custom_rules_resolve_by_name_and_unknown_names_are_errors() {
        let mut rules = Rules::default();
        rules.register("max", rule_fn(|w, g| w.iter_mut().zip(g).for_each(|(w, g)| *w = w.max(*g))));
        let r = rules.resolve(&UpdaterSpec::Custom("max".into())).unwrap();
        let mut w = [1.0, 5.0];
        r.apply(0, &mut w, &mut [], &[3.0, 2.0]);
        assert_eq!(w, [3.0, 5.0]);
        let err = rules.resolve(&UpdaterSpec::Custom("nope".into())).err().unwrap();
        assert!(matches!(err, Error::UnknownUpdater(_)));
    }
}
