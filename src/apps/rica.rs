//! Reconstruction ICA (Le et al., NIPS 2011) on natural image patches, on the
//! public API.
//!
//! Minimizes, over filters W (k x n),
//!     lambda * sum_i sum_j sqrt((W x_i)_j^2 + eps) + 1/2 sum_i ||W^T W x_i - x_i||^2
//! averaged over the patches x_i (n = patch x patch pixels, each patch with
//! its mean removed, then ZCA-whitened). W lives on the servers, one key per
//! filter (dim n), updated with heavy-ball momentum from the workers' summed
//! gradients;
//! each worker holds its own patches. Every clock is one full-batch step
//! (sequential consistency), so the objective printed each iteration is that
//! of one model.
//!
//! Whitening must be identical on every worker: each computes it from the
//! same deterministic sample of patches, then draws its own training patches
//! with a rank-dependent seed.

use std::path::Path;
use std::time::Instant;

use nalgebra::{DMatrix, SymmetricEigen};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::table::{Consistency, Init, TableId, TableSpec, UpdaterSpec, mix64};
use crate::worker::{KeyList, Worker};

/// How to train.
#[derive(Clone, Debug)]
pub struct RicaConfig {
    /// Patch side in pixels (n = patch^2).
    pub patch: usize,
    /// Number of filters k.
    pub filters: usize,
    /// Training patches per worker.
    pub patches: usize,
    pub lambda: f32,
    pub iters: u32,
    /// Learning rate (heavy-ball momentum 0.9).
    pub learning_rate: f32,
    pub seed: u64,
    pub table_base: TableId,
}

impl Default for RicaConfig {
    fn default() -> Self {
        RicaConfig {
            patch: 8,
            filters: 64,
            patches: 5000,
            lambda: 0.3,
            iters: 500,
            learning_rate: 0.05,
            seed: 1,
            table_base: 0x5249_0000,
        }
    }
}

/// One iteration's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RicaIteration {
    pub iteration: u32,
    pub objective: f64,
    pub sparsity: f64,
    pub reconstruction: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default)]
pub struct RicaResult {
    pub iterations: Vec<RicaIteration>,
    /// k x n filters (rank 0 only).
    pub filters: Option<Vec<f32>>,
}

/// A grayscale image with pixels in [0, 1].
pub struct Gray {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f32>,
}

/// Loads JPEG or PNG images as grayscale; a directory means every image in it.
pub fn load_images(paths: &[std::path::PathBuf]) -> Result<Vec<Gray>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
            let mut v: Vec<_> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    let ext = f.extension().and_then(|x| x.to_str()).unwrap_or("").to_ascii_lowercase();
                    matches!(ext.as_str(), "jpg" | "jpeg" | "png")
                })
                .collect();
            v.sort();
            files.extend(v);
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        return Err(Error::Config("no JPEG or PNG images given".into()));
    }
    files.iter().map(|f| load_gray(f)).collect()
}

fn load_gray(path: &Path) -> Result<Gray> {
    let img = image::open(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?.to_luma8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok(Gray { width: w, height: h, pixels: img.into_raw().into_iter().map(|p| f32::from(p) / 255.0).collect() })
}

/// `count` random patches (row-major, n values each), each with its mean
/// removed. Deterministic by `seed`.
pub fn sample_patches(images: &[Gray], patch: usize, count: usize, seed: u64) -> Result<Vec<f32>> {
    let usable: Vec<&Gray> = images.iter().filter(|g| g.width >= patch && g.height >= patch).collect();
    if usable.is_empty() {
        return Err(Error::Config(format!("no image is at least {patch}x{patch} pixels")));
    }
    let n = patch * patch;
    let mut out = Vec::with_capacity(count * n);
    for i in 0..count as u64 {
        let h = mix64(seed ^ mix64(i));
        let img = usable[(h % usable.len() as u64) as usize];
        let x = (mix64(h ^ 1) % (img.width - patch + 1) as u64) as usize;
        let y = (mix64(h ^ 2) % (img.height - patch + 1) as u64) as usize;
        let start = out.len();
        for r in 0..patch {
            out.extend_from_slice(&img.pixels[(y + r) * img.width + x..][..patch]);
        }
        let mean = out[start..].iter().sum::<f32>() / n as f32;
        out[start..].iter_mut().for_each(|v| *v -= mean);
    }
    Ok(out)
}

/// The ZCA whitening matrix (n x n, row-major) of patches.
pub fn zca(patches: &[f32], n: usize) -> Vec<f32> {
    let m = patches.len() / n;
    let x = DMatrix::<f64>::from_fn(n, m, |r, c| f64::from(patches[c * n + r]));
    let cov = (&x * x.transpose()) / m as f64;
    let eig = SymmetricEigen::new(cov);
    let mean_ev = eig.eigenvalues.iter().sum::<f64>() / n as f64;
    let eps = 0.01 * mean_ev.max(1e-12);
    let d = DMatrix::from_diagonal(&eig.eigenvalues.map(|l| 1.0 / (l.max(0.0) + eps).sqrt()));
    let w = &eig.eigenvectors * d * eig.eigenvectors.transpose();
    (0..n * n).map(|i| w[(i / n, i % n)] as f32).collect()
}

/// Applies a whitening matrix to patches in place.
pub fn whiten(patches: &mut [f32], zca: &[f32], n: usize) {
    let mut tmp = vec![0.0f32; n];
    for p in patches.chunks_exact_mut(n) {
        for (r, t) in tmp.iter_mut().enumerate() {
            *t = zca[r * n..(r + 1) * n].iter().zip(p.iter()).map(|(a, b)| a * b).sum();
        }
        p.copy_from_slice(&tmp);
    }
}

const SMOOTH_EPS: f64 = 0.01;

/// Objective terms and gradient of one worker's patches (sums, not means).
fn objective_and_gradient(w: &DMatrix<f64>, x: &DMatrix<f64>, lambda: f64) -> (f64, f64, DMatrix<f64>) {
    let z = w * x; // k x m
    let r = w.transpose() * &z - x; // n x m
    let s = z.map(|v| v / (v * v + SMOOTH_EPS).sqrt());
    let sparsity = lambda * z.iter().map(|v| (v * v + SMOOTH_EPS).sqrt()).sum::<f64>();
    let recon = 0.5 * r.iter().map(|v| v * v).sum::<f64>();
    let wr = w * &r; // k x m
    let grad = &z * r.transpose() + (wr + s * lambda) * x.transpose();
    (sparsity, recon, grad)
}

/// Trains on this worker's (whitened) patches; every worker calls it.
pub fn train(
    wk: &Worker,
    patches: &[f32],
    total_patches: usize,
    cfg: &RicaConfig,
    on_iteration: &mut dyn FnMut(&RicaIteration),
) -> Result<RicaResult> {
    super::needs_a_share(wk, "train rica")?;
    let n = cfg.patch * cfg.patch;
    let k = cfg.filters;
    if k == 0 || n == 0 || !patches.len().is_multiple_of(n) || total_patches == 0 {
        return Err(Error::Config("RICA needs filters, a patch size and patches".into()));
    }
    let m = patches.len() / n;
    let start = Instant::now();
    let (wt, stats) = (cfg.table_base, cfg.table_base + 1);
    let seq = Consistency::Sequential;
    wk.create_table(
        TableSpec::dense(wt, k as u64, n as u32)
            .updater(UpdaterSpec::Momentum { lr: cfg.learning_rate, momentum: 0.9 })
            .init(Init::Normal { mean: 0.0, std: 0.1, seed: cfg.seed })
            .consistency(seq),
    )?;
    // Sequential: a lost worker's place is kept (its iteration's sums are
    // not complete without it).
    wk.create_table(TableSpec::dense(stats, u64::from(cfg.iters) + 1, 2).consistency(seq))?;
    let keys = KeyList::range(0, k as u64);
    let x = DMatrix::<f64>::from_fn(n, m, |r, c| f64::from(patches[c * n + r]));
    let scale = 1.0 / total_patches as f64;
    let mut result = RicaResult::default();
    let mut buf = Vec::new();
    // Iteration `i` is clock `i`. A restarted worker (or a job restored
    // from a checkpoint) starts at its clock: the iterations before it are
    // read back from their sums, and the one in flight is done again (its
    // pushes carry the predecessor's seqs, so each applies once).
    let resume = wk.restarted().or(wk.resumed_from()).unwrap_or(0).min(cfg.iters);
    for iter in 0..resume {
        let s = wk.with_consistency(seq).pull(stats, &[u64::from(iter)])?.wait()?;
        result.iterations.push(RicaIteration {
            iteration: iter + 1,
            objective: f64::from(s[0]) + f64::from(s[1]),
            sparsity: f64::from(s[0]),
            reconstruction: f64::from(s[1]),
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    for iter in resume..cfg.iters {
        buf = wk.pull_with(wt, &keys, buf)?.wait()?;
        let w = DMatrix::<f64>::from_fn(k, n, |r, c| f64::from(buf[r * n + c]));
        let (sparsity, recon, grad) = objective_and_gradient(&w, &x, f64::from(cfg.lambda));
        let g: Vec<f32> = (0..k * n).map(|i| (grad[(i / n, i % n)] * scale) as f32).collect();
        wk.push_with(wt, &keys, g)?;
        wk.push(stats, &[u64::from(iter)], &[(sparsity * scale) as f32, (recon * scale) as f32])?;
        wk.clock()?;
        // The objective of the weights this iteration used, from all workers.
        let s = wk.with_consistency(seq).pull(stats, &[u64::from(iter)])?.wait()?;
        let it = RicaIteration {
            iteration: iter + 1,
            objective: f64::from(s[0]) + f64::from(s[1]),
            sparsity: f64::from(s[0]),
            reconstruction: f64::from(s[1]),
            seconds: start.elapsed().as_secs_f64(),
        };
        if wk.rank() == 0 {
            on_iteration(&it);
        }
        result.iterations.push(it);
    }
    if wk.rank() == 0 {
        result.filters = Some(wk.with_consistency(seq).pull_with(wt, &keys, Vec::new())?.wait()?);
    }
    wk.barrier()?;
    Ok(result)
}

/// Writes the filters as a PNG grid (each scaled to its own range, mid-gray
/// for zero), `zoom` pixels per patch pixel.
pub fn write_filters_png(filters: &[f32], patch: usize, zoom: usize, path: &Path) -> Result<()> {
    let n = patch * patch;
    let k = filters.len() / n;
    let cols = (k as f64).sqrt().ceil() as usize;
    let rows = k.div_ceil(cols.max(1));
    let cell = patch * zoom + 1;
    let (wpx, hpx) = (cols * cell + 1, rows * cell + 1);
    let mut img = image::GrayImage::from_pixel(wpx as u32, hpx as u32, image::Luma([0]));
    for (f, filt) in filters.chunks_exact(n).enumerate() {
        let m = filt.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1e-12);
        let (cx, cy) = ((f % cols) * cell + 1, (f / cols) * cell + 1);
        for py in 0..patch * zoom {
            for px in 0..patch * zoom {
                let v = filt[(py / zoom) * patch + px / zoom] / m;
                img.put_pixel((cx + px) as u32, (cy + py) as u32, image::Luma([(127.5 + 127.5 * v) as u8]));
            }
        }
    }
    img.save(path).map_err(|e| Error::Config(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let (k, n, m) = (3, 4, 5);
        let w = DMatrix::<f64>::from_fn(k, n, |r, c| ((r * 7 + c * 3) % 5) as f64 * 0.1 - 0.2);
        let x = DMatrix::<f64>::from_fn(n, m, |r, c| ((r * 11 + c * 13) % 7) as f64 * 0.2 - 0.6);
        let f = |w: &DMatrix<f64>| {
            let (a, b, _) = objective_and_gradient(w, &x, 0.3);
            a + b
        };
        let (_, _, g) = objective_and_gradient(&w, &x, 0.3);
        for i in 0..k {
            for j in 0..n {
                let mut wp = w.clone();
                wp[(i, j)] += 1e-6;
                let mut wm = w.clone();
                wm[(i, j)] -= 1e-6;
                let fd = (f(&wp) - f(&wm)) / 2e-6;
                assert!((fd - g[(i, j)]).abs() < 1e-5 * (1.0 + fd.abs()), "({i},{j}): {fd} vs {}", g[(i, j)]);
            }
        }
    }

    #[test]
    fn zca_whitening_gives_identity_covariance() {
        let imgs = [Gray {
            width: 40,
            height: 40,
            pixels: (0..1600).map(|i| ((i * 37 % 101) as f32 / 101.0 + (i / 40) as f32 * 0.01).sin().abs()).collect(),
        }];
        let n = 16;
        let mut p = sample_patches(&imgs, 4, 4000, 3).unwrap();
        let z = zca(&p, n);
        whiten(&mut p, &z, n);
        let m = p.len() / n;
        let x = DMatrix::<f64>::from_fn(n, m, |r, c| f64::from(p[c * n + r]));
        let cov = (&x * x.transpose()) / m as f64;
        // Whitened: near identity on the non-degenerate directions (patch
        // means removed, so one direction is empty).
        let diag_mean = (0..n).map(|i| cov[(i, i)]).sum::<f64>() / n as f64;
        assert!(diag_mean > 0.8 && diag_mean < 1.05, "{diag_mean}");
    }
}
