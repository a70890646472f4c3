//! L1-regularized logistic regression against a reference solver: liblinear
//! (`liblinear-train -s 6`, Debian's liblinear-tools) and pserver minimize the
//! same objective on the same data; pserver's final objective must be within
//! 0.5% of liblinear's (both evaluated by the same code), with the same
//! signs on the large weights. Embedded and as separate processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use pserver::apps::{Rows, lr};
use pserver::data::{self, CtrConfig, Dataset, FeatureMode, Shard, Source};
use pserver::{JobConfig, job};

const HEART: &str = "/usr/share/doc/liblinear-tools/examples/heart_scale";

fn have_liblinear() -> bool {
    let ok = Command::new("liblinear-train").output().is_ok();
    if !ok {
        eprintln!("SKIPPED: liblinear-train not installed (apt-get install liblinear-tools)");
    }
    ok
}

fn rows(d: &Dataset) -> Rows<'_> {
    Rows { labels: d.labels(), offsets: d.offsets(), features: d.features(), values: d.values() }
}

/// liblinear's weights for `data` (the bias last when `bias`).
fn liblinear(data: &Path, lambda: f32, bias: bool, dir: &Path) -> Vec<f32> {
    let model = dir.join("liblinear.model");
    let mut cmd = Command::new("liblinear-train");
    cmd.args(["-s", "6", "-c", &(1.0 / lambda).to_string(), "-e", "0.0001", "-q"]);
    if bias {
        cmd.args(["-B", "1"]);
    }
    let out = cmd.arg(data).arg(&model).output().unwrap();
    assert!(out.status.success(), "liblinear failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&model).unwrap();
    let mut lines = text.lines();
    let mut sign = 1.0;
    for l in lines.by_ref() {
        if let Some(labels) = l.strip_prefix("label ") {
            sign = if labels.split_whitespace().next() == Some("1") { 1.0 } else { -1.0 };
        }
        if l.trim() == "w" {
            break;
        }
    }
    lines.map(|l| sign * l.trim().parse::<f32>().unwrap()).collect()
}

/// pserver's objective is within 0.5% of liblinear's, and every weight of
/// liblinear above a fifth of its largest is non-zero with the same sign.
fn compare(what: &str, data: &Dataset, ours: &[f32], theirs: &[f32], lambda: f32, bias: bool) {
    let f_ours = lr::objective(rows(data), ours, lambda, bias);
    let f_theirs = lr::objective(rows(data), theirs, lambda, bias);
    println!("{what}: pserver {f_ours:.6}, liblinear {f_theirs:.6} ({:+.4}%)", 100.0 * (f_ours / f_theirs - 1.0));
    assert!(f_ours <= f_theirs * 1.005, "{what}: objective {f_ours} is not within 0.5% of liblinear's {f_theirs}");
    let max = theirs.iter().fold(0.0f32, |a, w| a.max(w.abs()));
    for (k, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
        if b.abs() >= 0.2 * max {
            assert!(a != 0.0 && a.signum() == b.signum(), "{what}: large weight {k}: liblinear {b}, pserver {a}");
        }
    }
}

fn embedded(data_path: &Path, lambda: f32, bias: bool, workers: u32) -> Vec<f32> {
    let cfg = lr::LrConfig { lambda, bias, iters: 400, tol: 1e-7, ..lr::LrConfig::default() };
    let out = job::run(JobConfig::default().servers(2).workers(workers), |w| {
        let shard = Shard::new(w.rank(), w.num_workers())?;
        let d = data::read(&Source::File(data_path.to_path_buf()), shard, FeatureMode::Direct)?;
        lr::train(w, rows(&d), None, &cfg, &mut |_| {})
    })
    .unwrap();
    out.into_iter().next().unwrap().weights.unwrap()
}

fn generated(dir: &Path) -> PathBuf {
    let p = dir.join("ctr.libsvm");
    let cfg = CtrConfig { rows: 20_000, features: 20_000, nnz_per_row: 12, seed: 7, ..CtrConfig::default() };
    data::gen_ctr_file(&cfg, &p).unwrap();
    p
}

#[test]
fn heart_scale_matches_liblinear_embedded() {
    if !have_liblinear() || !Path::new(HEART).exists() {
        return;
    }
    let dir = tempdir("lr-heart");
    let d = data::read(&Source::File(HEART.into()), Shard::WHOLE, FeatureMode::Direct).unwrap();
    for (lambda, bias) in [(1.0, false), (0.5, true)] {
        let theirs = liblinear(Path::new(HEART), lambda, bias, &dir);
        let ours = embedded(Path::new(HEART), lambda, bias, 2);
        compare(&format!("heart_scale lambda {lambda} bias {bias}"), &d, &ours, &theirs, lambda, bias);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generated_sparse_data_matches_liblinear_embedded() {
    if !have_liblinear() {
        return;
    }
    let dir = tempdir("lr-gen");
    let p = generated(&dir);
    let d = data::read(&Source::File(p.clone()), Shard::WHOLE, FeatureMode::Direct).unwrap();
    let theirs = liblinear(&p, 1.0, false, &dir);
    let ours = embedded(&p, 1.0, false, 2);
    // liblinear's model covers the features it saw; ours may be one longer.
    compare("generated", &d, &ours[..theirs.len().min(ours.len())], &theirs, 1.0, false);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn multi_process_job_matches_liblinear() {
    if !have_liblinear() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let dir = tempdir("lr-mp");
    let generated_path = generated(&dir);
    for (name, path) in [("heart_scale", PathBuf::from(HEART)), ("generated", generated_path)] {
        if !path.exists() {
            continue;
        }
        let job = start_job("std", 2, 2, &format!("lr-{name}"), deadline);
        let (model, summary) = (job.dir.join("model.txt"), job.dir.join("summary.json"));
        let p = path.to_str().unwrap();
        let (m, s) = (model.to_str().unwrap(), summary.to_str().unwrap());
        let args = [
            "train",
            "lr",
            "--data",
            p,
            "--lambda",
            "1",
            "--iters",
            "400",
            "--tol",
            "1e-7",
            "--model",
            m,
            "--summary-json",
            s,
        ];
        let workers = vec![job.worker(0, 2, &args), job.worker(1, 2, &args)];
        let jdir = job.dir.clone();
        job.finish_keeping_dir(workers, deadline);
        let ours: Vec<f32> = std::fs::read_to_string(&model).unwrap().lines().map(|l| l.parse().unwrap()).collect();
        let sum: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
        for k in ["objective", "nnz", "seconds", "iterations", "bytes_pushed", "bytes_pulled"] {
            assert!(sum.get(k).is_some(), "summary lacks {k}: {sum}");
        }
        let theirs = liblinear(&path, 1.0, false, &dir);
        let d = data::read(&Source::File(path.clone()), Shard::WHOLE, FeatureMode::Direct).unwrap();
        compare(
            &format!("{name} in 2 server + 2 worker processes"),
            &d,
            &ours[..theirs.len().min(ours.len())],
            &theirs,
            1.0,
            false,
        );
        let reported = sum["objective"].as_f64().unwrap();
        let recomputed = lr::objective(rows(&d), &ours, 1.0, false);
        assert!((reported - recomputed).abs() <= 1e-3 * recomputed, "summary objective {reported} vs {recomputed}");
        let _ = std::fs::remove_dir_all(&jdir);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_data_files_are_reported_with_file_and_line() {
    let dir = tempdir("lr-bad");
    let p = dir.join("bad.libsvm");
    std::fs::write(&p, "+1 1:0.5 3:1\n-1 2:1 2:3\n").unwrap();
    let out = Command::new(BIN).args(["train", "lr", "--data"]).arg(&p).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.libsvm:2"), "the error should name the file and line: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}
