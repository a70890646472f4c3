//! `pserver gen ctr`: synthetic click-through-like data in LIBSVM format, for
//! exercising sparse logistic regression at any scale.
//!
//! Feature popularity follows a power law (a few features occur in most
//! rows, a long tail rarely), values are mostly 1 (one-hot data), and labels
//! come from a planted sparse weight vector w*, so a trained model can be
//! compared with the truth (`planted_weights`). Popularity ranks are
//! scattered over the id space, as hashed features are, so hot keys do not
//! all land on one server.
//!
//! The output is a function of the config alone (same seed, same bytes) and
//! is streamed: memory does not grow with the number of rows, and w* is a
//! hash of the seed and the feature, never stored.

use std::fmt;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::write_atomically;
use crate::error::{Error, Result};
use crate::table::mix64;

/// What to generate. `Default` gives a small, learnable problem.
#[derive(Clone, Debug, PartialEq)]
pub struct CtrConfig {
    pub rows: u64,
    /// Size of the feature id space: ids are 0..features (LIBSVM indices 1..=features).
    pub features: u64,
    /// Distinct features per row (at most `features`).
    pub nnz_per_row: u32,
    pub seed: u64,
    /// Power-law exponent: the feature of popularity rank r (from 1) is
    /// drawn with probability proportional to 1 / r^alpha.
    pub alpha: f64,
    /// Fraction of features with a non-zero planted weight; popular
    /// features are likelier to be among them, so most rows carry signal.
    pub signal: f64,
    /// Fraction of features whose values are real numbers in (0, 2]
    /// (multiples of 0.001) instead of 1.
    pub real_valued: f64,
    /// Added to every row's margin w*·x; below zero makes positives rarer,
    /// as clicks are.
    pub bias: f64,
    pub labels: LabelModel,
}

/// How a row's margin m = bias + w*·x becomes its label.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LabelModel {
    /// y = sign(m), then flipped with probability `flip` (label noise).
    Threshold { flip: f64 },
    /// y = +1 with probability sigmoid(m): the logistic model is exact.
    Logistic,
}

impl Default for CtrConfig {
    fn default() -> Self {
        CtrConfig {
            rows: 100_000,
            features: 1_000_000,
            nnz_per_row: 40,
            seed: 1,
            alpha: 1.1,
            signal: 0.02,
            real_valued: 0.0,
            bias: -1.0,
            labels: LabelModel::Threshold { flip: 0.05 },
        }
    }
}

impl CtrConfig {
    pub fn validate(&self) -> Result<()> {
        let fraction = |name: &str, x: f64| {
            if (0.0..=1.0).contains(&x) { Ok(()) } else { Err(bad(format!("{name} must be in [0, 1], got {x}"))) }
        };
        if self.features == 0 {
            return Err(bad("features must be at least 1".into()));
        }
        if u64::from(self.nnz_per_row) > self.features {
            return Err(bad(format!(
                "{} features per row cannot be distinct among {}",
                self.nnz_per_row, self.features
            )));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(bad(format!("alpha must be a positive number, got {}", self.alpha)));
        }
        if !self.bias.is_finite() {
            return Err(bad(format!("bias must be a finite number, got {}", self.bias)));
        }
        fraction("signal", self.signal)?;
        fraction("real_valued", self.real_valued)?;
        if let LabelModel::Threshold { flip } = self.labels {
            fraction("flip", flip)?;
        }
        Ok(())
    }
}

fn bad(detail: String) -> Error {
    Error::Config(format!("gen ctr: {detail}"))
}

/// What was generated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CtrSummary {
    pub rows: u64,
    pub nnz: u64,
    pub positives: u64,
    /// Features that occur at least once; counted when `features` is at
    /// most 2^28 (a 32 MiB bitmap), `None` above.
    pub distinct_features: Option<u64>,
    pub bytes: u64,
}

impl CtrSummary {
    pub fn positive_rate(&self) -> f64 {
        self.positives as f64 / self.rows.max(1) as f64
    }
}

impl fmt::Display for CtrSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rows, {} nonzeros ({:.1} per row), {:.1}% positive, ",
            self.rows,
            self.nnz,
            self.nnz as f64 / self.rows.max(1) as f64,
            100.0 * self.positive_rate()
        )?;
        match self.distinct_features {
            Some(n) => write!(f, "{n} distinct features, ")?,
            None => write!(f, "distinct features not counted, ")?,
        }
        write!(f, "{:.1} MB", self.bytes as f64 / 1e6)
    }
}

const DISTINCT_LIMIT: u64 = 1 << 28;

/// Writes `cfg.rows` rows of LIBSVM text to `out` (buffered here).
pub fn gen_ctr(cfg: &CtrConfig, out: &mut dyn Write) -> Result<CtrSummary> {
    cfg.validate()?;
    let model = Planted::new(cfg);
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut rng = Rng(mix64(cfg.seed ^ 0x5EED_0F02));
    let mut seen = (cfg.features <= DISTINCT_LIMIT).then(|| vec![0u64; cfg.features.div_ceil(64) as usize]);
    let (mut ranks, mut row, mut line) = (Vec::new(), Vec::new(), Vec::new());
    let mut summary = CtrSummary::default();
    for _ in 0..cfg.rows {
        model.draw_ranks(&mut rng, &mut ranks);
        let mut margin = cfg.bias;
        row.clear();
        for &rank in &ranks {
            // Values in thousandths, so that the text is short and exact.
            let milli = if model.is_real(rank) { 1 + rng.next() % 2000 } else { 1000 };
            margin += f64::from(model.weight(rank)) * milli as f64 / 1000.0;
            row.push((model.id(rank), milli));
        }
        row.sort_unstable_by_key(|&(id, _)| id);
        let positive = match cfg.labels {
            LabelModel::Threshold { flip } => {
                let sign = if margin == 0.0 { rng.next() & 1 == 0 } else { margin > 0.0 };
                sign ^ (rng.unit() < flip)
            }
            LabelModel::Logistic => rng.unit() < 1.0 / (1.0 + (-margin).exp()),
        };
        line.clear();
        line.extend_from_slice(if positive { b"+1" } else { b"-1" });
        for &(id, milli) in &row {
            line.push(b' ');
            push_decimal(&mut line, id + 1);
            line.push(b':');
            push_milli(&mut line, milli);
            if let Some(seen) = &mut seen {
                seen[(id / 64) as usize] |= 1 << (id % 64);
            }
        }
        line.push(b'\n');
        out.write_all(&line).map_err(|e| Error::io("gen ctr: writing rows", e))?;
        summary.rows += 1;
        summary.nnz += row.len() as u64;
        summary.positives += u64::from(positive);
        summary.bytes += line.len() as u64;
    }
    out.flush().map_err(|e| Error::io("gen ctr: writing rows", e))?;
    summary.distinct_features = seen.map(|s| s.iter().map(|w| u64::from(w.count_ones())).sum());
    Ok(summary)
}

/// `gen_ctr` into a file, which appears only once complete.
pub fn gen_ctr_file(cfg: &CtrConfig, path: impl AsRef<Path>) -> Result<CtrSummary> {
    cfg.validate()?;
    write_atomically(path.as_ref(), |out| gen_ctr(cfg, out))
}

/// The planted weights: (feature id, weight) for every feature with a
/// non-zero weight, sorted by id. Walks the whole feature space.
pub fn planted_weights(cfg: &CtrConfig) -> Result<Vec<(u64, f32)>> {
    cfg.validate()?;
    let model = Planted::new(cfg);
    let mut weights: Vec<_> =
        (1..=cfg.features).map(|r| (model.id(r), model.weight(r))).filter(|&(_, w)| w != 0.0).collect();
    weights.sort_unstable_by_key(|&(id, _)| id);
    Ok(weights)
}

/// Writes `planted_weights` as text: `# bias b`, then one `id weight` line
/// per feature (0-based ids, as in `Dataset`). Returns the number of lines.
pub fn write_planted(cfg: &CtrConfig, out: &mut dyn Write) -> Result<u64> {
    let weights = planted_weights(cfg)?;
    let mut out = BufWriter::new(out);
    let io_err = |e| Error::io("gen ctr: writing planted weights", e);
    writeln!(out, "# planted weights of gen ctr (seed {}): 0-based feature id, weight", cfg.seed).map_err(io_err)?;
    writeln!(out, "# bias {}", cfg.bias).map_err(io_err)?;
    for (id, w) in &weights {
        writeln!(out, "{id} {w}").map_err(io_err)?;
    }
    out.flush().map_err(io_err)?;
    Ok(weights.len() as u64)
}

/// Writes n / 1000 with up to three decimals: `1`, `0.125`, `1.500`.
fn push_milli(out: &mut Vec<u8>, n: u64) {
    push_decimal(out, n / 1000);
    let frac = n % 1000;
    if frac != 0 {
        out.push(b'.');
        out.extend([frac / 100, frac / 10 % 10, frac % 10].map(|d| b'0' + d as u8));
    }
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The hidden truth: popularity, ids and weights of features, all derived
/// from the seed.
struct Planted {
    zipf: Zipf,
    ids: Permutation,
    nnz: usize,
    features: f64,
    signal: f64,
    real_valued: f64,
    weight_seed: u64,
    real_seed: u64,
}

impl Planted {
    fn new(cfg: &CtrConfig) -> Self {
        Planted {
            zipf: Zipf::new(cfg.features, cfg.alpha),
            ids: Permutation::new(cfg.features, mix64(cfg.seed ^ 0x1D5)),
            nnz: cfg.nnz_per_row as usize,
            features: cfg.features as f64,
            signal: cfg.signal,
            real_valued: cfg.real_valued,
            weight_seed: mix64(cfg.seed ^ 0x3E16_7715),
            real_seed: mix64(cfg.seed ^ 0x4EA1),
        }
    }

    /// `nnz` distinct popularity ranks.
    fn draw_ranks(&self, rng: &mut Rng, ranks: &mut Vec<u64>) {
        ranks.clear();
        for _ in 0..32 {
            while ranks.len() < self.nnz {
                ranks.push(self.zipf.sample(rng));
            }
            ranks.sort_unstable();
            ranks.dedup();
            if ranks.len() == self.nnz {
                return;
            }
        }
        // Rows nearly as wide as the feature space keep drawing repeats:
        // complete them with the most popular features not drawn yet.
        let missing = self.nnz - ranks.len();
        let extra: Vec<u64> = (1u64..).filter(|r| ranks.binary_search(r).is_err()).take(missing).collect();
        ranks.extend(extra);
    }

    fn id(&self, rank: u64) -> u64 {
        self.ids.apply(rank - 1)
    }

    /// w* of the feature of this rank. A feature carries signal with
    /// probability decaying as 1/sqrt(rank) (at most 1/2), scaled so that
    /// about `signal` of all features do; weights are +-[0.5, 1.5).
    fn weight(&self, rank: u64) -> f32 {
        let h = mix64(self.weight_seed ^ rank);
        let p = (0.5 * self.signal * (self.features / rank as f64).sqrt()).min(0.5);
        if unit(h) >= p {
            return 0.0;
        }
        let g = mix64(h);
        let magnitude = 0.5 + unit(g) as f32;
        if g & 1 == 0 { magnitude } else { -magnitude }
    }

    fn is_real(&self, rank: u64) -> bool {
        self.real_valued > 0.0 && unit(mix64(self.real_seed ^ rank)) < self.real_valued
    }
}

/// A uniform number in [0, 1) from the high 53 bits.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// splitmix64: fast, and plenty for synthetic data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    fn unit(&mut self) -> f64 {
        unit(self.next())
    }
}

/// Zipf's law on 1..=n, P(k) proportional to 1/k^s, by rejection-inversion
/// (Hörmann and Derflinger 1996; as in Apache Commons RNG): O(1) per draw
/// whatever n is, with no tables.
struct Zipf {
    n: f64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    threshold: f64,
}

impl Zipf {
    fn new(n: u64, s: f64) -> Self {
        let mut z = Zipf { n: n as f64, s, h_integral_x1: 0.0, h_integral_n: 0.0, threshold: 0.0 };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(z.n + 0.5);
        z.threshold = 2.0 - z.h_integral_inverse(z.h_integral(2.5) - z.h(2.0));
        z
    }

    fn sample(&self, rng: &mut Rng) -> u64 {
        loop {
            let u = self.h_integral_n + rng.unit() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            let k = (x + 0.5).clamp(1.0, self.n).floor();
            if k - x <= self.threshold || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }

    /// The integral of h from 1 to x, shifted: (x^(1-s) - 1) / (1-s), or log x when s = 1.
    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper2((1.0 - self.s) * log_x) * log_x
    }

    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }

    fn h_integral_inverse(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (helper1(t) * x).exp()
    }
}

/// ln(1 + x) / x, accurate near 0.
fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 { x.ln_1p() / x } else { 1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x)) }
}

/// (e^x - 1) / x, accurate near 0.
fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 { x.exp_m1() / x } else { 1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x)) }
}

/// A keyed bijection of 0..n: a mixing bijection of the enclosing power of
/// two, applied until the value falls back inside 0..n (cycle walking; under
/// two rounds on average).
struct Permutation {
    n: u64,
    mask: u64,
    shift: u32,
    key: u64,
}

impl Permutation {
    fn new(n: u64, key: u64) -> Self {
        let bits = if n <= 1 { 0 } else { 64 - (n - 1).leading_zeros() };
        let mask = if bits == 0 { 0 } else { u64::MAX >> (64 - bits) };
        Permutation { n, mask, shift: (bits / 2).max(1), key }
    }

    fn apply(&self, x: u64) -> u64 {
        let mut y = x;
        loop {
            // Each step is a bijection of 0..=mask: xor, multiply by an odd
            // number, xorshift.
            y = (y ^ self.key) & self.mask;
            y = y.wrapping_mul(0x9E37_79B9_7F4A_7C15) & self.mask;
            y ^= y >> self.shift;
            y = y.wrapping_mul(0xBF58_476D_1CE4_E5B9) & self.mask;
            y ^= y >> self.shift;
            if y < self.n {
                return y;
            }
        }
    }
}

/// Generates `cfg.rows` rows from one planted model into two files: the
/// first `cfg.rows - test_rows` rows into `train`, the rest into `test` (a
/// held-out set of the same distribution). Each file appears only once
/// complete. Returns the summaries of both parts.
pub fn gen_ctr_split(
    cfg: &CtrConfig,
    test_rows: u64,
    train: impl AsRef<Path>,
    test: impl AsRef<Path>,
) -> Result<(CtrSummary, CtrSummary)> {
    if test_rows >= cfg.rows {
        return Err(bad(format!("test rows {test_rows} must be fewer than the {} rows generated", cfg.rows)));
    }
    let train_cfg = CtrConfig { rows: cfg.rows - test_rows, ..cfg.clone() };
    // Two passes over the same deterministic stream: the first keeps the
    // leading rows, the second the trailing ones.
    let a = write_atomically(train.as_ref(), |out| gen_ctr(&train_cfg, out))?;
    let mut total = None;
    write_atomically(test.as_ref(), |out| {
        let mut skip = SkipLines { out, skip: train_cfg.rows };
        let s = gen_ctr(cfg, &mut skip)?;
        total = Some(s);
        Ok(())
    })?;
    let t = total.expect("generated");
    let b = CtrSummary {
        rows: t.rows - a.rows,
        nnz: t.nnz - a.nnz,
        positives: t.positives - a.positives,
        distinct_features: None,
        bytes: t.bytes - a.bytes,
    };
    Ok((a, b))
}

/// Drops the first `skip` lines written through it.
struct SkipLines<'a> {
    out: &'a mut dyn Write,
    skip: u64,
}

impl Write for SkipLines<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while self.skip > 0 {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.skip -= 1;
                    rest = &rest[i + 1..];
                }
                None => return Ok(buf.len()),
            }
        }
        self.out.write_all(rest)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection_for_every_small_n() {
        for n in 1..=300u64 {
            let p = Permutation::new(n, mix64(n));
            let mut ids: Vec<u64> = (0..n).map(|x| p.apply(x)).collect();
            ids.sort_unstable();
            assert!(ids.iter().copied().eq(0..n), "n = {n}");
        }
    }

    #[test]
    fn zipf_matches_its_law() {
        for s in [0.8, 1.0, 1.2] {
            let (n, draws) = (50u64, 400_000);
            let z = Zipf::new(n, s);
            let mut rng = Rng(s.to_bits());
            let mut counts = vec![0u64; n as usize + 1];
            for _ in 0..draws {
                counts[z.sample(&mut rng) as usize] += 1;
            }
            let norm: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
            for k in [1, 2, 5, 20, 50] {
                let expected = draws as f64 * (k as f64).powf(-s) / norm;
                let got = counts[k as usize] as f64;
                assert!((got - expected).abs() < 5.0 * expected.sqrt() + 1.0, "s {s} k {k}: {got} vs {expected}");
            }
        }
    }

    #[test]
    fn zipf_stays_in_range_at_the_extremes() {
        let mut rng = Rng(7);
        for (n, s) in [(1, 1.1), (2, 0.01), (u64::MAX, 1.0), (1 << 40, 3.0)] {
            let z = Zipf::new(n, s);
            assert!((0..1000).all(|_| (1..=n).contains(&z.sample(&mut rng))), "n {n} s {s}");
        }
    }

    #[test]
    fn decimals_are_written_like_display() {
        for n in [0, 7, 10, 99, 1000, 123_456_789, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for (n, text) in [(1000, "1"), (1, "0.001"), (125, "0.125"), (1500, "1.500"), (2000, "2")] {
            let mut out = Vec::new();
            push_milli(&mut out, n);
            assert_eq!(out, text.as_bytes());
        }
    }

    #[test]
    fn rows_as_wide_as_the_feature_space_terminate() {
        let cfg = CtrConfig { rows: 20, features: 30, nnz_per_row: 30, ..CtrConfig::default() };
        let summary = gen_ctr(&cfg, &mut Vec::new()).unwrap();
        assert_eq!((summary.nnz, summary.distinct_features), (600, Some(30)));
    }
}
