//! Applications built on the public API only: L1-regularized logistic
//! regression (`lr`) and Reconstruction ICA (`rica`). They are how users
//! judge the framework; nothing in the core depends on them.

pub mod lr;
pub mod plot;
pub mod rica;

/// The applications split their data over the job's workers when it
/// starts: a worker that joined later in a free seat has no share.
fn needs_a_share(w: &crate::Worker, app: &str) -> crate::Result<()> {
    if w.rank() >= w.num_workers() {
        return Err(crate::Error::Config(format!(
            "{app} splits its data over the job's {} workers at the start; worker rank {} joined in a free seat \
             and has no share (start a worker with the PSERVER_RANK of a lost one to replace it)",
            w.num_workers(),
            w.rank()
        )));
    }
    Ok(())
}

/// Rows of a sparse dataset in CSR form: row `i` has features
/// `features[offsets[i]..offsets[i+1]]` (sorted) with their values, and a
/// label of +1 or -1.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub labels: &'a [f32],
    pub offsets: &'a [u64],
    pub features: &'a [u64],
    pub values: &'a [f32],
}

impl Rows<'_> {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Features and values of row `i`.
    pub fn row(&self, i: usize) -> (&[u64], &[f32]) {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        (&self.features[a..b], &self.values[a..b])
    }
}
