//! Reconstruction ICA on real photographs (the two that Debian's
//! python3-sklearn ships; `.ci/run` unpacks them into target/test-data). The
//! objective must fall, and the learned filters must be spatially
//! structured (oriented edges and gratings), unlike their random start.

use std::path::PathBuf;

use pserver::apps::rica::{self, RicaConfig};
use pserver::{JobConfig, job};

fn images() -> Option<PathBuf> {
    let dir = std::env::var_os("PSERVER_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data/images"));
    if dir.join("china.jpg").exists() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: no test photographs in {} (.ci/run fetches them from python3-sklearn)", dir.display());
        None
    }
}

/// Mean over filters of the strongest neighbour correlation (right, down,
/// and both diagonals) of their pixels: about 0 for noise, large for edges
/// and gratings.
fn structure(filters: &[f32], patch: usize) -> f64 {
    let n = patch * patch;
    let corr = |f: &[f32], dx: isize, dy: isize| {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for y in 0..patch as isize {
            for x in 0..patch as isize {
                let (x2, y2) = (x + dx, y + dy);
                if (0..patch as isize).contains(&x2) && (0..patch as isize).contains(&y2) {
                    a.push(f64::from(f[(y * patch as isize + x) as usize]));
                    b.push(f64::from(f[(y2 * patch as isize + x2) as usize]));
                }
            }
        }
        let (ma, mb) = (a.iter().sum::<f64>() / a.len() as f64, b.iter().sum::<f64>() / b.len() as f64);
        let cov: f64 = a.iter().zip(&b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
        (cov / (va * vb).sqrt().max(1e-12)).abs()
    };
    let per: Vec<f64> = filters
        .chunks_exact(n)
        .map(|f| [(1, 0), (0, 1), (1, 1), (1, -1)].iter().map(|&(dx, dy)| corr(f, dx, dy)).fold(0.0, f64::max))
        .collect();
    per.iter().sum::<f64>() / per.len() as f64
}

#[test]
fn rica_learns_structured_filters_from_photographs() {
    let Some(dir) = images() else { return };
    let imgs = rica::load_images(&[dir]).unwrap();
    assert_eq!(imgs.len(), 2);
    let cfg = RicaConfig { iters: 300, patches: 3000, ..RicaConfig::default() };
    let n = cfg.patch * cfg.patch;
    let zca = rica::zca(&rica::sample_patches(&imgs, cfg.patch, 20_000, 7).unwrap(), n);
    let out = job::run(JobConfig::default().servers(2).workers(2), |w| {
        let mut p = rica::sample_patches(&imgs, cfg.patch, cfg.patches, 100 + u64::from(w.rank()))?;
        rica::whiten(&mut p, &zca, n);
        rica::train(w, &p, cfg.patches * 2, &cfg, &mut |_| {})
    })
    .unwrap();
    let r = &out[0];
    let (first, last) = (r.iterations[0].objective, r.iterations.last().unwrap().objective);
    println!("objective {first:.4} -> {last:.4}");
    assert!(last < 0.6 * first, "the objective barely fell: {first} -> {last}");
    let filters = r.filters.as_ref().unwrap();
    assert_eq!(filters.len(), cfg.filters * n);
    // The random start, for comparison.
    let init: Vec<f32> = (0..cfg.filters as u64)
        .flat_map(|k| {
            let mut v = vec![0.0; n];
            pserver::Init::Normal { mean: 0.0, std: 0.1, seed: cfg.seed }.fill(k, &mut v);
            v
        })
        .collect();
    let (s0, s1) = (structure(&init, cfg.patch), structure(filters, cfg.patch));
    println!("spatial structure: random start {s0:.3}, learned {s1:.3}");
    assert!(s1 > s0 + 0.15, "the filters did not become structured ({s0:.3} -> {s1:.3})");
    let png = std::env::temp_dir().join(format!("pserver-rica-{}.png", std::process::id()));
    rica::write_filters_png(filters, cfg.patch, 4, &png).unwrap();
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (8 * 33 + 1, 8 * 33 + 1));
    std::fs::remove_file(&png).unwrap();
}
