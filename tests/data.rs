//! The data side of training: LIBSVM parsing, sharding, the binary cache and
//! the CTR generator, as a worker uses them.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use proptest::prelude::*;

use pserver::Error;
use pserver::data::ctr::{self, CtrConfig, LabelModel};
use pserver::data::{self, CacheStatus, Dataset, FeatureMode, Shard, Source, libsvm};

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pserver-data-{tag}-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn parse(text: &str) -> Result<Dataset, Error> {
    libsvm::parse("data.txt", text.as_bytes(), FeatureMode::Direct)
}

fn rows(data: &Dataset) -> Vec<(f32, Vec<(u64, f32)>)> {
    data.iter().map(|r| (r.label, r.features.iter().copied().zip(r.values.iter().copied()).collect())).collect()
}

#[test]
fn parses_labels_features_comments_crlf_and_blank_lines() {
    let text = "+1 1:0.5 3:2 # a comment\r\n\n   \n# only a comment\n-1 2:1\t7:-3.25  \r\n0 1:1\n1.0\n-1.0 4:1e-3";
    let data = parse(text).unwrap();
    assert_eq!(
        rows(&data),
        vec![
            (1.0, vec![(0, 0.5), (2, 2.0)]),
            (-1.0, vec![(1, 1.0), (6, -3.25)]),
            (-1.0, vec![(0, 1.0)]),
            (1.0, vec![]),
            (-1.0, vec![(3, 1e-3)]),
        ]
    );
    assert_eq!((data.rows(), data.nnz(), data.max_feature()), (5, 6, Some(6)));
    assert_eq!(data.labels(), [1.0, -1.0, -1.0, 1.0, -1.0]);
    assert_eq!(data.offsets(), [0, 2, 4, 5, 5, 6]);
    assert_eq!(data.unique_features(), [0, 1, 2, 3, 6]);
    assert_eq!(data.iter().len(), 5);
}

#[test]
fn indices_reach_the_top_of_u64() {
    let data = parse("1 1:1 18446744073709551615:2\n").unwrap();
    assert_eq!(data.features(), [0, u64::MAX - 1]);
    assert_eq!(data.max_feature(), Some(u64::MAX - 1));
}

#[test]
fn bad_line_reports_file_and_line() {
    let dir = TempDir::new("bad-line");
    let cases = [
        ("2 1:1", "label \"2\" is not +1, -1, 1 or 0"),
        ("yes 1:1", "label \"yes\""),
        ("1:1 2:1", "label \"1:1\""),
        ("1 0:1", "feature index 0 is not 1-based"),
        ("1 3:1 2:1", "feature index 2 follows 3: indices must be strictly increasing"),
        ("1 3:1 3:1", "feature index 3 follows 3"),
        ("1 3", "feature \"3\" is not index:value"),
        ("1 x:1", "feature index \"x\" is not an integer"),
        ("1 -4:1", "feature index \"-4\" is not an integer"),
        ("1 18446744073709551616:1", "feature index \"18446744073709551616\" is not an integer"),
        ("1 4:", "feature 4 has value \"\", not a finite number"),
        ("1 4:nan", "feature 4 has value \"nan\""),
        ("1 4:1e99", "feature 4 has value \"1e99\""),
        ("1 4:1:2", "feature 4 has value \"1:2\""),
        ("1 4:\u{e9}", "feature 4 has value \"\u{e9}\""),
    ];
    for (line, expected) in cases {
        // Line 4: after a good row, a blank line and a comment, all counted.
        let path = dir.file("data.txt", format!("+1 1:1\n\n# comment\n{line}\n-1 2:1\n"));
        let err = libsvm::read_file(&path, FeatureMode::Direct).unwrap_err().to_string();
        let at = format!("{}:4: ", path.display());
        assert!(err.starts_with(&at) && err.contains(expected), "{line:?}: got {err:?}, want {at}...{expected}");
        let in_memory = parse(&format!("+1 1:1\n\n# comment\n{line}\n")).unwrap_err().to_string();
        assert!(in_memory.starts_with("data.txt:4: ") && in_memory.contains(expected), "{in_memory}");
    }
    // Not UTF-8 at all.
    let path = dir.file("bytes.txt", b"1 1:1\n1 2:\xff\xfe\n");
    let err = libsvm::read_file(&path, FeatureMode::Direct).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:2: feature 2 has value", path.display())), "{err}");
}

#[test]
fn errors_in_a_later_shard_name_the_line_in_the_whole_file() {
    let dir = TempDir::new("shard-line");
    let mut text: String = (0..1000).map(|i| format!("+1 {}:1\n", i + 1)).collect();
    text.replace_range(text.find("\n+1 901:1\n").unwrap() + 1..text.find("\n+1 902:1\n").unwrap(), "+1 0:1");
    let path = dir.file("data.txt", &text);
    let source = Source::File(path.clone());
    let mut failures = 0;
    for rank in 0..4 {
        match data::read(&source, Shard::new(rank, 4).unwrap(), FeatureMode::Direct) {
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                assert_eq!(
                    e.to_string(),
                    format!("{}:901: feature index 0 is not 1-based", path.display()) + " (LIBSVM indices start at 1)"
                );
            }
        }
    }
    assert_eq!(failures, 1, "exactly one worker reads the bad line");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let err = libsvm::read_file("/nonexistent/data.txt", FeatureMode::Direct).unwrap_err();
    assert!(matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/data.txt"), "{err}");
}

#[test]
fn hashing_maps_indices_into_the_bit_range_and_merges_collisions() {
    let text: String =
        (0..200).map(|i| format!("{} {}:1 {}:2 {}:0.5\n", i % 2, i + 1, i + 1000, 3 * i + 5000)).collect();
    let direct = parse(&text).unwrap();
    let hashed = libsvm::parse("data.txt", text.as_bytes(), FeatureMode::hashed(20).unwrap()).unwrap();
    assert_eq!((hashed.rows(), hashed.labels()), (direct.rows(), direct.labels()));
    assert!(hashed.features().iter().all(|&f| f < 1 << 20));
    for (h, d) in hashed.iter().zip(direct.iter()) {
        assert!(h.features.windows(2).all(|w| w[0] < w[1]), "sorted and merged");
        assert_eq!(h.values.iter().sum::<f32>(), d.values.iter().sum::<f32>());
    }
    // The same index maps to the same id in every row.
    let a = libsvm::parse("a", "1 77:1\n-1 5:1 77:1\n".as_bytes(), FeatureMode::hashed(24).unwrap()).unwrap();
    assert!(a.row(1).features.contains(&a.row(0).features[0]));
    // Two bits: 300 indices collide into at most 4 ids, values summed.
    let wide: String = std::iter::once("1".to_string()).chain((1..=300).map(|i| format!(" {i}:1"))).collect();
    let narrow = libsvm::parse("w", wide.as_bytes(), FeatureMode::hashed(2).unwrap()).unwrap();
    assert!(narrow.nnz() <= 4);
    assert_eq!(narrow.values().iter().sum::<f32>(), 300.0);
    // Hashing does not hide bad input.
    let err = libsvm::parse("h.txt", "1 5:1 4:1\n".as_bytes(), FeatureMode::hashed(20).unwrap()).unwrap_err();
    assert!(err.to_string().starts_with("h.txt:1: feature index 4 follows 5"), "{err}");
    for bits in [0, 65] {
        assert!(FeatureMode::hashed(bits).is_err());
        assert!(libsvm::parse("x", "1 1:1".as_bytes(), FeatureMode::Hashed { bits }).is_err());
    }
}

/// Reads every shard of `path` and checks that, in rank order, they hold the
/// same rows as the whole file.
fn assert_shards_cover_once(path: &Path, workers: u32) {
    let whole = libsvm::read_file(path, FeatureMode::Direct).unwrap();
    let mut joined = Vec::new();
    for rank in 0..workers {
        let shard = data::read(&Source::File(path.into()), Shard::new(rank, workers).unwrap(), FeatureMode::Direct);
        joined.extend(rows(&shard.unwrap()));
    }
    assert_eq!(joined, rows(&whole), "{} with {workers} workers", path.display());
}

/// Line i is `label i:1`, so every row is distinct.
fn numbered_lines(n: usize, eol: &str, trailing: bool, pad: usize) -> String {
    let mut text: String = (0..n)
        .map(|i| format!("{} {}:1{}{eol}", if i % 3 == 0 { "+1" } else { "-1" }, i + 1, " ".repeat(i * pad % 17)))
        .collect();
    if !trailing {
        text.truncate(text.len() - eol.len());
    }
    text
}

#[test]
fn sharding_by_bytes_reads_every_line_exactly_once() {
    let dir = TempDir::new("bytes");
    let mut files = vec![
        dir.file("empty.txt", ""),
        dir.file("one.txt", "+1 1:1"),
        dir.file("one-nl.txt", "+1 1:1\n"),
        dir.file("blank-lines.txt", "\n\n+1 1:1\n\n\n-1 2:1\n\n"),
        dir.file(
            "long-line.txt",
            format!("-1 1:1\n+1{}\n-1 2:1\n", (1..3000).map(|i| format!(" {i}:1")).collect::<String>()),
        ),
    ];
    for (n, pad) in [(2, 0), (3, 1), (10, 3), (101, 5), (997, 7)] {
        for (eol, eol_name) in [("\n", "lf"), ("\r\n", "crlf")] {
            for trailing in [true, false] {
                let name = format!("{n}-{pad}-{eol_name}-{trailing}.txt");
                files.push(dir.file(&name, numbered_lines(n, eol, trailing, pad)));
            }
        }
    }
    for path in &files {
        for workers in (1..=16).chain([31, 64, 100, 1000]) {
            assert_shards_cover_once(path, workers);
        }
    }
}

#[test]
fn sharding_by_files_takes_turns() {
    let dir = TempDir::new("files");
    let files: Vec<PathBuf> =
        (0..7).map(|i| dir.file(&format!("part-{i}"), format!("+1 {}:1\n-1 {}:1\n", i + 1, i + 100))).collect();
    let source = Source::Files(files.clone());
    let shard = Shard::new(1, 3).unwrap();
    assert_eq!(shard.files(&files).collect::<Vec<_>>(), [&files[1], &files[4]]);
    let mine = data::read(&source, shard, FeatureMode::Direct).unwrap();
    assert_eq!(mine.features(), [1, 100, 4, 103]);
    let mut all: Vec<u64> = (0..3)
        .flat_map(|r| data::read(&source, Shard::new(r, 3).unwrap(), FeatureMode::Direct).unwrap().features().to_vec())
        .collect();
    all.sort_unstable();
    let mut want: Vec<u64> = (0..7).flat_map(|i| [i, i + 99]).collect();
    want.sort_unstable();
    assert_eq!(all, want);
    // More workers than files: the extra workers get nothing.
    assert_eq!(data::read(&source, Shard::new(9, 10).unwrap(), FeatureMode::Direct).unwrap().rows(), 0);
}

#[test]
fn shards_must_name_a_worker_of_the_job() {
    assert!(Shard::new(3, 3).is_err());
    assert!(Shard::new(0, 0).is_err());
    let err = data::read(&Source::Files(vec![]), Shard { rank: 5, workers: 2 }, FeatureMode::Direct).unwrap_err();
    assert!(err.to_string().contains("5/2"), "{err}");
    assert_eq!(Shard::new(1, 4).unwrap().byte_range(100), 25..50);
    assert_eq!(Shard::new(3, 4).unwrap().byte_range(u64::MAX), 13_835_058_055_282_163_711..u64::MAX);
}

fn sample_data() -> Dataset {
    let mut data = Dataset::new();
    data.push_row(1.0, &[0, 5, u64::MAX - 1], &[1.0, -2.5, 0.125]).unwrap();
    data.push_row(-1.0, &[], &[]).unwrap();
    data.push_row(-1.0, &[3], &[7.0]).unwrap();
    data
}

#[test]
fn rows_are_checked_on_the_way_in() {
    let mut data = Dataset::new();
    assert!(data.push_row(0.0, &[1], &[1.0]).is_err());
    assert!(data.push_row(1.0, &[2, 1], &[1.0, 1.0]).is_err());
    assert!(data.push_row(1.0, &[1, 2], &[1.0]).is_err());
    assert!(data.push_row(1.0, &[1], &[f32::NAN]).is_err());
    assert!(data.is_empty());
    let d = sample_data();
    let parts = (d.labels().to_vec(), d.offsets().to_vec(), d.features().to_vec(), d.values().to_vec());
    assert_eq!(Dataset::from_parts(parts.0.clone(), parts.1.clone(), parts.2.clone(), parts.3.clone()).unwrap(), d);
    assert!(Dataset::from_parts(parts.0.clone(), vec![0, 3, 2, 4], parts.2.clone(), parts.3.clone()).is_err());
    assert!(Dataset::from_parts(parts.0.clone(), vec![0, 3, 3, 5], parts.2.clone(), parts.3.clone()).is_err());
    assert!(Dataset::from_parts(parts.0.clone(), vec![0, 100, 4, 4], parts.2.clone(), parts.3.clone()).is_err());
    assert!(Dataset::from_parts(vec![1.0, 1.0, 2.0], parts.1, parts.2, parts.3).is_err());
}

#[test]
fn cache_round_trips() {
    let dir = TempDir::new("cache");
    for data in [Dataset::new(), sample_data(), parse(&numbered_lines(500, "\n", true, 1)).unwrap()] {
        let path = dir.0.join("data.psdata");
        data.save_cache(&path).unwrap();
        assert_eq!(Dataset::load_cache(&path).unwrap(), data);
    }
    let leftovers: Vec<_> = fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, ["data.psdata"], "no temporary files left behind");
}

#[test]
fn corrupt_or_truncated_cache_is_detected() {
    let dir = TempDir::new("corrupt");
    let good = dir.0.join("good.psdata");
    sample_data().save_cache(&good).unwrap();
    let bytes = fs::read(&good).unwrap();
    let bad = dir.0.join("bad.psdata");
    for at in 0..bytes.len() {
        for bit in [0x01, 0x80] {
            let mut flipped = bytes.clone();
            flipped[at] ^= bit;
            fs::write(&bad, &flipped).unwrap();
            let err = Dataset::load_cache(&bad).unwrap_err().to_string();
            assert!(err.starts_with(&bad.display().to_string()), "byte {at}: {err}");
        }
    }
    for len in 0..bytes.len() {
        fs::write(&bad, &bytes[..len]).unwrap();
        let err = Dataset::load_cache(&bad).unwrap_err().to_string();
        assert!(err.contains("truncated"), "length {len}: {err}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    fs::write(&bad, &longer).unwrap();
    assert!(Dataset::load_cache(&bad).is_err());
    // What the messages say.
    let mut flipped = bytes.clone();
    let at = bytes.len() - 10;
    flipped[at] ^= 1;
    fs::write(&bad, &flipped).unwrap();
    let err = Dataset::load_cache(&bad).unwrap_err().to_string();
    assert!(err.contains("corrupt data cache: checksum mismatch"), "{err}");
    fs::write(&bad, b"+1 1:1\n-1 2:1\n+1 3:1\n-1 4:1\n+1 5:1\n").unwrap();
    let err = Dataset::load_cache(&bad).unwrap_err().to_string();
    assert!(err.contains("not a pserver data cache"), "{err}");
}

#[test]
fn load_or_build_reuses_the_cache_until_the_input_changes() {
    let dir = TempDir::new("load-or-build");
    let cache = dir.0.join("cache");
    let path = dir.file("data.txt", numbered_lines(300, "\n", true, 0));
    let source = Source::File(path.clone());
    let shard = Shard::new(1, 3).unwrap();
    let (built, status) = data::load_or_build(&source, shard, FeatureMode::Direct, &cache).unwrap();
    assert_eq!(status, CacheStatus::Built);
    assert_eq!(built, data::read(&source, shard, FeatureMode::Direct).unwrap());
    let (loaded, status) = data::load_or_build(&source, shard, FeatureMode::Direct, &cache).unwrap();
    assert_eq!((status, &loaded), (CacheStatus::Hit, &built));
    // Another shard or feature mode is another cache entry.
    let (_, status) = data::load_or_build(&source, Shard::new(0, 3).unwrap(), FeatureMode::Direct, &cache).unwrap();
    assert_eq!(status, CacheStatus::Built);
    let (_, status) = data::load_or_build(&source, shard, FeatureMode::hashed(20).unwrap(), &cache).unwrap();
    assert_eq!(status, CacheStatus::Built);
    // A changed input is parsed again.
    fs::write(&path, numbered_lines(200, "\n", true, 0)).unwrap();
    let (changed, status) = data::load_or_build(&source, shard, FeatureMode::Direct, &cache).unwrap();
    assert_eq!(status, CacheStatus::Built);
    assert_eq!(changed, data::read(&source, shard, FeatureMode::Direct).unwrap());
    // A damaged cache is rebuilt, with the reason.
    for entry in fs::read_dir(&cache).unwrap() {
        let p = entry.unwrap().path();
        let mut bytes = fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        fs::write(&p, bytes).unwrap();
    }
    let (rebuilt, status) = data::load_or_build(&source, shard, FeatureMode::Direct, &cache).unwrap();
    assert!(matches!(&status, CacheStatus::Rebuilt(why) if why.contains("checksum")), "{status:?}");
    assert_eq!(rebuilt, changed);
    assert_eq!(data::load_or_build(&source, shard, FeatureMode::Direct, &cache).unwrap().1, CacheStatus::Hit);
    // A cache directory that cannot be written only costs the caching.
    let blocked = dir.file("not-a-dir", "");
    let (data, status) = data::load_or_build(&source, shard, FeatureMode::Direct, blocked.join("cache")).unwrap();
    assert_eq!((status, data), (CacheStatus::Built, changed));
}

fn small_ctr(seed: u64) -> CtrConfig {
    CtrConfig { rows: 5_000, features: 100_000, nnz_per_row: 20, seed, ..CtrConfig::default() }
}

fn generate(cfg: &CtrConfig) -> (Vec<u8>, ctr::CtrSummary) {
    let mut out = Vec::new();
    let summary = ctr::gen_ctr(cfg, &mut out).unwrap();
    (out, summary)
}

#[test]
fn gen_ctr_is_deterministic_by_seed() {
    let (a, _) = generate(&small_ctr(7));
    let (b, _) = generate(&small_ctr(7));
    let (c, _) = generate(&small_ctr(8));
    assert!(a == b, "same seed, same bytes");
    assert!(a != c, "different seed, different data");
}

#[test]
fn gen_ctr_output_has_the_requested_shape() {
    let cfg = small_ctr(1);
    let (text, summary) = generate(&cfg);
    let data = libsvm::parse("ctr.txt", &text[..], FeatureMode::Direct).unwrap();
    assert_eq!((data.rows() as u64, summary.rows), (cfg.rows, cfg.rows));
    assert!(data.iter().all(|r| r.features.len() == cfg.nnz_per_row as usize && r.values.iter().all(|&v| v == 1.0)));
    assert_eq!(summary.nnz, data.nnz() as u64);
    assert_eq!(summary.bytes, text.len() as u64);
    assert!(data.max_feature().unwrap() < cfg.features);
    let unique = data.unique_features();
    assert_eq!(summary.distinct_features, Some(unique.len() as u64));
    let positives = data.labels().iter().filter(|&&l| l > 0.0).count() as u64;
    assert_eq!(summary.positives, positives);
    let rate = summary.positive_rate();
    assert!((0.1..=0.9).contains(&rate), "positive rate {rate}");
    // Power law: the most frequent feature is in a large share of rows, the
    // median used feature in a handful.
    let mut counts = std::collections::HashMap::new();
    for &f in data.features() {
        *counts.entry(f).or_insert(0u64) += 1;
    }
    let mut counts: Vec<u64> = counts.into_values().collect();
    counts.sort_unstable();
    let (top, median) = (counts[counts.len() - 1], counts[counts.len() / 2]);
    assert!(top > 100 * median && top > cfg.rows / 10, "top {top}, median {median}");
    // Hot features are spread over the id space, not packed at the bottom.
    let hot: Vec<u64> = data.features().iter().copied().filter(|&f| f < cfg.features / 2).take(1000).collect();
    assert!(hot.len() < 1000 || data.features().iter().any(|&f| f >= cfg.features / 2));
    println!("{summary}");
}

#[test]
fn gen_ctr_labels_follow_the_planted_weights() {
    let cfg = CtrConfig { labels: LabelModel::Threshold { flip: 0.05 }, ..small_ctr(3) };
    let (text, _) = generate(&cfg);
    let data = libsvm::parse("ctr.txt", &text[..], FeatureMode::Direct).unwrap();
    let mut planted = Vec::new();
    let nonzero = ctr::write_planted(&cfg, &mut planted).unwrap();
    let weights: std::collections::HashMap<u64, f64> = String::from_utf8(planted)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (id, w) = l.split_once(' ').unwrap();
            (id.parse().unwrap(), w.parse().unwrap())
        })
        .collect();
    assert_eq!(weights.len() as u64, nonzero);
    let fraction = nonzero as f64 / cfg.features as f64;
    assert!((0.5 * cfg.signal..=1.5 * cfg.signal).contains(&fraction), "{fraction}");
    let agree = data
        .iter()
        .filter(|r| {
            let margin = cfg.bias
                + r.features
                    .iter()
                    .zip(r.values)
                    .map(|(f, &v)| weights.get(f).unwrap_or(&0.0) * f64::from(v))
                    .sum::<f64>();
            (margin > 0.0) == (r.label > 0.0)
        })
        .count();
    let accuracy = agree as f64 / data.rows() as f64;
    assert!(accuracy > 0.9, "w* explains the labels up to the 5% noise: {accuracy}");
    assert_eq!(ctr::planted_weights(&cfg).unwrap().len() as u64, nonzero);
}

#[test]
fn gen_ctr_options_real_values_and_logistic_labels() {
    let cfg = CtrConfig { real_valued: 0.3, labels: LabelModel::Logistic, ..small_ctr(5) };
    let (text, summary) = generate(&cfg);
    let data = libsvm::parse("ctr.txt", &text[..], FeatureMode::Direct).unwrap();
    assert!(data.values().iter().all(|&v| v > 0.0 && v <= 2.0));
    assert!(data.values().iter().any(|&v| v != 1.0));
    assert!((0.1..=0.9).contains(&summary.positive_rate()), "{summary}");
    for bad in [
        CtrConfig { features: 0, ..small_ctr(1) },
        CtrConfig { nnz_per_row: 11, features: 10, ..small_ctr(1) },
        CtrConfig { alpha: 0.0, ..small_ctr(1) },
        CtrConfig { signal: 1.5, ..small_ctr(1) },
        CtrConfig { labels: LabelModel::Threshold { flip: -0.1 }, ..small_ctr(1) },
        CtrConfig { bias: f64::NAN, ..small_ctr(1) },
    ] {
        assert!(ctr::gen_ctr(&bad, &mut Vec::new()).is_err(), "{bad:?}");
    }
}

#[test]
fn gen_ctr_file_matches_the_stream() {
    let dir = TempDir::new("gen-file");
    let cfg = CtrConfig { rows: 1000, ..small_ctr(9) };
    let path = dir.0.join("ctr.txt");
    let summary = ctr::gen_ctr_file(&cfg, &path).unwrap();
    assert_eq!(fs::read(&path).unwrap(), generate(&cfg).0);
    assert_eq!(summary.bytes, fs::metadata(&path).unwrap().len());
}

const HEART_SCALE: &str = "/usr/share/doc/liblinear-tools/examples/heart_scale";

#[test]
fn reads_heart_scale_from_liblinear() {
    if !Path::new(HEART_SCALE).exists() {
        println!("SKIPPED: heart_scale not installed (apt-get install liblinear-tools)");
        return;
    }
    let data = libsvm::read_file(HEART_SCALE, FeatureMode::Direct).unwrap();
    assert_eq!(data.rows(), 270);
    assert_eq!(data.unique_features().len(), 13);
    assert_eq!(data.max_feature(), Some(12));
    assert_eq!(data.labels().iter().filter(|&&l| l > 0.0).count(), 120);
    assert!(data.values().iter().all(|v| (-1.0..=1.0).contains(v)));
    let joined: usize = (0..4)
        .map(|r| {
            data::read(&Source::File(HEART_SCALE.into()), Shard::new(r, 4).unwrap(), FeatureMode::Direct)
                .unwrap()
                .rows()
        })
        .sum();
    assert_eq!(joined, 270);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), bits in 0u32..70) {
        let _ = libsvm::parse("fuzz", &bytes[..], FeatureMode::Direct);
        let _ = libsvm::parse("fuzz", &bytes[..], FeatureMode::Hashed { bits });
    }

    #[test]
    fn near_valid_lines_never_panic(lines in proptest::collection::vec(
        proptest::collection::vec(prop_oneof![
            Just("+1".to_string()), Just("-1".to_string()), Just("0".to_string()), Just("1.0".to_string()),
            Just(":".to_string()), Just("#".to_string()), Just(" ".to_string()), Just("\t".to_string()),
            Just("\r".to_string()), Just("18446744073709551615:1".to_string()), Just("3.4e38".to_string()),
            (0u64..20, -3.0f32..3.0).prop_map(|(i, v)| format!("{i}:{v}")),
            any::<u64>().prop_map(|i| format!("{i}:1")),
            "[0-9a-z.:+-]{0,8}",
        ], 0..12).prop_map(|t| t.join(" ")),
        0..20,
    )) {
        let text = lines.join("\n");
        let direct = libsvm::parse("fuzz", text.as_bytes(), FeatureMode::Direct);
        let hashed = libsvm::parse("fuzz", text.as_bytes(), FeatureMode::Hashed { bits: 3 });
        if let (Ok(d), Ok(h)) = (&direct, &hashed) {
            prop_assert_eq!(d.rows(), h.rows());
        }
        if let Err(e) = direct {
            prop_assert!(e.to_string().starts_with("fuzz:"), "{}", e);
        }
    }

    #[test]
    fn any_arrays_make_a_dataset_or_an_error(
        labels in proptest::collection::vec(prop_oneof![Just(1.0f32), Just(-1.0), any::<f32>()], 0..5),
        offsets in proptest::collection::vec(0u64..12, 0..7),
        features in proptest::collection::vec(0u64..8, 0..10),
        values in proptest::collection::vec(prop_oneof![Just(1.0f32), any::<f32>()], 0..10),
    ) {
        if let Ok(data) = Dataset::from_parts(labels, offsets, features, values) {
            prop_assert_eq!(data.iter().map(|r| r.features.len()).sum::<usize>(), data.nnz());
        }
    }

    #[test]
    fn written_rows_parse_back(rows in proptest::collection::vec(
        (any::<bool>(), proptest::collection::btree_map(0u64..u64::MAX, -1e6f32..1e6, 0..8)),
        0..30,
    ), crlf in any::<bool>()) {
        let eol = if crlf { "\r\n" } else { "\n" };
        let text: String = rows
            .iter()
            .map(|(pos, feats)| {
                let feats: String = feats.iter().map(|(f, v)| format!(" {}:{v}", f + 1)).collect();
                format!("{}{feats}{eol}", if *pos { "+1" } else { "-1" })
            })
            .collect();
        let data = libsvm::parse("rows", text.as_bytes(), FeatureMode::Direct).unwrap();
        let want: Vec<(f32, Vec<(u64, f32)>)> =
            rows.iter().map(|(pos, f)| (if *pos { 1.0 } else { -1.0 }, f.iter().map(|(&k, &v)| (k, v)).collect())).collect();
        prop_assert_eq!(self::rows(&data), want);
    }

    #[test]
    fn any_split_of_any_file_reads_each_line_once(
        lines in proptest::collection::vec((0usize..6, any::<bool>()), 0..40),
        crlf in any::<bool>(),
        trailing in any::<bool>(),
        workers in 1u32..40,
    ) {
        let dir = TempDir::new("prop-split");
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text: String = lines
            .iter()
            .enumerate()
            .map(|(i, &(width, blank))| if blank { eol.to_string() } else { format!("+1 {}:1{}{eol}", i + 1, " ".repeat(width)) })
            .collect();
        if !trailing && !text.is_empty() {
            text.truncate(text.len() - eol.len());
        }
        assert_shards_cover_once(&dir.file("data.txt", text), workers);
    }
}

/// Seconds of the fastest of three runs (the machine is shared), and the
/// last result.
fn best_of_3<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut last = None;
    for _ in 0..3 {
        let t = Instant::now();
        last = Some(f());
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, last.unwrap())
}

/// Speed of generating, parsing and cache loading on ~100 MB. Run with
/// `cargo test --release --test data -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_gen_parse_and_cache_speed() {
    let dir = TempDir::new("speed");
    let cfg = CtrConfig { rows: 250_000, features: 10_000_000, nnz_per_row: 40, ..CtrConfig::default() };
    for (name, cfg) in [("one-hot", cfg.clone()), ("real-valued", CtrConfig { real_valued: 1.0, ..cfg })] {
        let text = dir.0.join(format!("{name}.txt"));
        let (gen_s, summary) = best_of_3(|| ctr::gen_ctr_file(&cfg, &text).unwrap());
        let mb = summary.bytes as f64 / 1e6;
        println!("{name}: {summary}");
        println!("  gen    {gen_s:.2} s, {:.0} MB/s", mb / gen_s);
        let (parse_s, data) = best_of_3(|| libsvm::read_file(&text, FeatureMode::Direct).unwrap());
        println!("  parse  {parse_s:.2} s, {:.0} MB/s of text", mb / parse_s);
        let (hashed_s, _) = best_of_3(|| libsvm::read_file(&text, FeatureMode::hashed(24).unwrap()).unwrap());
        println!("  parse, hashing to 24 bits  {hashed_s:.2} s, {:.0} MB/s of text", mb / hashed_s);
        let cache = dir.0.join(format!("{name}.psdata"));
        let (save_s, ()) = best_of_3(|| data.save_cache(&cache).unwrap());
        let cache_mb = fs::metadata(&cache).unwrap().len() as f64 / 1e6;
        let (load_s, loaded) = best_of_3(|| Dataset::load_cache(&cache).unwrap());
        assert_eq!(loaded, data);
        println!(
            "  cache  {cache_mb:.0} MB, save {save_s:.2} s, load {load_s:.3} s: {:.0} MB/s of cache, {:.0} MB/s of text, {:.1}x parse",
            cache_mb / load_s,
            mb / load_s,
            parse_s / load_s
        );
        let (unique_s, unique) = best_of_3(|| data.unique_features().len());
        println!("  unique_features  {unique} in {unique_s:.2} s");
    }
}
