//! Training data for the applications: the row store (`Dataset`, a CSR
//! layout), how workers split the input between them (`Source`, `Shard`),
//! the LIBSVM text reader (`libsvm`), a binary cache of parsed shards
//! (`cache`), and a synthetic click-through data generator (`ctr`).
//!
//! Input files come from users, so bad input is an error that names the file
//! and the 1-based line, never a panic.

pub mod cache;
pub mod ctr;
pub mod libsvm;

use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

pub use cache::{CacheStatus, load_or_build};
pub use ctr::{CtrConfig, CtrSummary, LabelModel, gen_ctr, gen_ctr_file, gen_ctr_split};

/// Rows of (label, sparse features) stored column-compressed: row `i` owns
/// `features[offsets[i]..offsets[i + 1]]` and the same range of `values`.
///
/// Invariants (checked by every constructor): labels are +1 or -1, offsets
/// start at 0 and never decrease, features within a row are strictly
/// increasing, values are finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    labels: Vec<f32>,
    offsets: Vec<u64>,
    features: Vec<u64>,
    values: Vec<f32>,
    max_feature: Option<u64>,
}

/// One row of a `Dataset`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Row<'a> {
    /// +1 or -1.
    pub label: f32,
    /// Strictly increasing 0-based feature ids.
    pub features: &'a [u64],
    /// One value per feature.
    pub values: &'a [f32],
}

impl Default for Dataset {
    fn default() -> Self {
        Dataset::new()
    }
}

impl Dataset {
    pub fn new() -> Self {
        Dataset { labels: Vec::new(), offsets: vec![0], features: Vec::new(), values: Vec::new(), max_feature: None }
    }

    /// Builds a dataset from its arrays, checking every invariant.
    pub fn from_parts(labels: Vec<f32>, offsets: Vec<u64>, features: Vec<u64>, values: Vec<f32>) -> Result<Self> {
        let bad = |detail: String| bad_data("dataset", detail);
        if offsets.len() != labels.len() + 1 {
            return Err(bad(format!(
                "{} labels need {} offsets, got {}",
                labels.len(),
                labels.len() + 1,
                offsets.len()
            )));
        }
        if features.len() != values.len() {
            return Err(bad(format!("{} features but {} values", features.len(), values.len())));
        }
        if offsets[0] != 0 || offsets[offsets.len() - 1] != features.len() as u64 {
            return Err(bad(format!("offsets must run from 0 to {} (the number of features)", features.len())));
        }
        if let Some(i) = labels.iter().position(|&l| l != 1.0 && l != -1.0) {
            return Err(bad(format!("row {i}: label {} is not +1 or -1", labels[i])));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("value {i} is {}, not a finite number", values[i])));
        }
        let mut max_feature = None;
        for (i, w) in offsets.windows(2).enumerate() {
            if w[0] > w[1] || w[1] > features.len() as u64 {
                return Err(bad(format!("row {i}: offsets {} to {} are not a range of the features", w[0], w[1])));
            }
            let row = &features[w[0] as usize..w[1] as usize];
            if let Some(j) = row.windows(2).position(|p| p[0] >= p[1]) {
                return Err(bad(format!(
                    "row {i}: feature {} follows {}: not strictly increasing",
                    row[j + 1],
                    row[j]
                )));
            }
            max_feature = max_feature.max(row.last().copied());
        }
        Ok(Dataset { labels, offsets, features, values, max_feature })
    }

    /// Appends a row, checking it like `from_parts` does.
    pub fn push_row(&mut self, label: f32, features: &[u64], values: &[f32]) -> Result<()> {
        let bad = |detail: String| bad_data(format!("dataset row {}", self.rows()), detail);
        if label != 1.0 && label != -1.0 {
            return Err(bad(format!("label {label} is not +1 or -1")));
        }
        if features.len() != values.len() {
            return Err(bad(format!("{} features but {} values", features.len(), values.len())));
        }
        if let Some(j) = features.windows(2).position(|p| p[0] >= p[1]) {
            let (a, b) = (features[j], features[j + 1]);
            return Err(bad(format!("feature {b} follows {a}: not strictly increasing")));
        }
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(bad(format!("value {v} is not a finite number")));
        }
        self.features.extend_from_slice(features);
        self.values.extend_from_slice(values);
        self.end_row(label);
        Ok(())
    }

    /// Closes the row whose features were appended since the last one
    /// (callers have checked them).
    fn end_row(&mut self, label: f32) {
        let start = self.offsets[self.offsets.len() - 1] as usize;
        self.max_feature = self.max_feature.max(self.features[start..].last().copied());
        self.labels.push(label);
        self.offsets.push(self.features.len() as u64);
    }

    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// Stored (feature, value) pairs over all rows.
    pub fn nnz(&self) -> usize {
        self.features.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The largest feature id of any row (`None` when there are no features).
    pub fn max_feature(&self) -> Option<u64> {
        self.max_feature
    }

    pub fn labels(&self) -> &[f32] {
        &self.labels
    }

    /// `rows() + 1` offsets into `features()` and `values()`.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    pub fn features(&self) -> &[u64] {
        &self.features
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Row `i`. Panics if `i >= rows()`, like slice indexing.
    pub fn row(&self, i: usize) -> Row<'_> {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        Row { label: self.labels[i], features: &self.features[a..b], values: &self.values[a..b] }
    }

    pub fn iter(&self) -> Rows<'_> {
        Rows { data: self, next: 0..self.rows() }
    }

    /// Sorted distinct feature ids that occur in some row: the keys a worker
    /// holding this data will pull and push.
    pub fn unique_features(&self) -> Vec<u64> {
        let mut keys = self.features.clone();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

/// Iterator over a dataset's rows, in order.
#[derive(Clone, Debug)]
pub struct Rows<'a> {
    data: &'a Dataset,
    next: Range<usize>,
}

impl<'a> Iterator for Rows<'a> {
    type Item = Row<'a>;

    fn next(&mut self) -> Option<Row<'a>> {
        self.next.next().map(|i| self.data.row(i))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.next.size_hint()
    }
}

impl ExactSizeIterator for Rows<'_> {}

impl<'a> IntoIterator for &'a Dataset {
    type Item = Row<'a>;
    type IntoIter = Rows<'a>;

    fn into_iter(self) -> Rows<'a> {
        self.iter()
    }
}

/// How LIBSVM indices become feature ids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FeatureMode {
    /// Feature id = index - 1.
    #[default]
    Direct,
    /// Feature id = hash(index) mod 2^bits, for inputs whose index space is
    /// too sparse or too large for a table; features of a row that collide
    /// are merged by summing their values.
    Hashed { bits: u32 },
}

impl FeatureMode {
    /// Hashing into `bits` bits (1..=64).
    pub fn hashed(bits: u32) -> Result<Self> {
        let mode = FeatureMode::Hashed { bits };
        mode.validate()?;
        Ok(mode)
    }

    pub(crate) fn validate(self) -> Result<()> {
        match self {
            FeatureMode::Hashed { bits } if !(1..=64).contains(&bits) => {
                Err(Error::Config(format!("feature hashing needs 1..=64 bits, got {bits}")))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for FeatureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeatureMode::Direct => write!(f, "direct"),
            FeatureMode::Hashed { bits } => write!(f, "hashed{bits}"),
        }
    }
}

/// Where a job's training data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// One file that workers split by byte ranges.
    File(PathBuf),
    /// Many files that workers take turns over (worker r reads files r, r+W, ...).
    Files(Vec<PathBuf>),
}

/// Worker `rank` of `workers`: which share of a `Source` it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    pub rank: u32,
    pub workers: u32,
}

impl Shard {
    /// Everything, for a single reader.
    pub const WHOLE: Shard = Shard { rank: 0, workers: 1 };

    pub fn new(rank: u32, workers: u32) -> Result<Self> {
        let shard = Shard { rank, workers };
        shard.validate()?;
        Ok(shard)
    }

    pub(crate) fn validate(self) -> Result<()> {
        if self.rank >= self.workers {
            return Err(Error::Config(format!(
                "shard {}/{}: rank must be below the worker count",
                self.rank, self.workers
            )));
        }
        Ok(())
    }

    /// This shard's bytes of a `size`-byte file: it reads the lines that
    /// start in this range.
    pub fn byte_range(self, size: u64) -> Range<u64> {
        let at = |r: u64| (u128::from(size) * u128::from(r) / u128::from(self.workers.max(1))) as u64;
        at(self.rank.into())..at(u64::from(self.rank) + 1)
    }

    /// This shard's files of a list: files rank, rank + workers, ...
    pub fn files(self, files: &[PathBuf]) -> impl Iterator<Item = &PathBuf> {
        files.iter().skip(self.rank as usize).step_by(self.workers.max(1) as usize)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.rank, self.workers)
    }
}

/// Parses this shard's part of `source`.
pub fn read(source: &Source, shard: Shard, mode: FeatureMode) -> Result<Dataset> {
    shard.validate()?;
    mode.validate()?;
    let mut data = Dataset::new();
    match source {
        Source::File(path) => {
            let size = std::fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?.len();
            libsvm::read_range(path, shard.byte_range(size), mode, &mut data)?;
        }
        Source::Files(files) => {
            for path in shard.files(files) {
                libsvm::read_range(path, 0..u64::MAX, mode, &mut data)?;
            }
        }
    }
    Ok(data)
}

/// The error for bad data at `at` (a `file:line`, a cache file, ...). One
/// constructor, so that the variant it maps to can change in one place.
pub(crate) fn bad_data(at: impl fmt::Display, detail: impl Into<String>) -> Error {
    Error::io(at.to_string(), io::Error::new(io::ErrorKind::InvalidData, detail.into()))
}

/// Writes `path` through a temporary file in the same directory and renames
/// it into place, so readers see the old file or the complete new one.
pub(crate) fn write_atomically<T>(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<T>) -> Result<T> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let tmp = PathBuf::from(tmp);
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| Error::io(ctx("creating"), e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let value = write(&mut out)?;
        let file = out.into_inner().map_err(|e| Error::io(ctx("writing"), e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(ctx("syncing"), e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::io(format!("renaming {} to {}", tmp.display(), path.display()), e))?;
        Ok(value)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp); // best effort: the error above is the one to report
    }
    result
}
