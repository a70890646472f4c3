//! Library errors: values with enough context (table, key, peer, file) to act on.

use std::io;
use std::sync::Arc;

use thiserror::Error;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the library reports. Bad input from callers or peers is an
/// error value, never a panic.
#[derive(Clone, Debug, Error)]
pub enum Error {
    #[error("keys must be sorted and unique: key[{index}] = {key} follows {prev}")]
    KeysNotSorted { index: usize, prev: u64, key: u64 },

    #[error("table {table}: key {key} is outside the table's key space [0, {len})")]
    KeyOutOfRange { table: u32, key: u64, len: u64 },

    #[error("table {table}: key {key} is not held here (shard range {range})")]
    NotOwned { table: u32, key: u64, range: String },

    #[error("table {table}: {keys} keys x dim {dim} needs {expected} values, got {got}")]
    LengthMismatch { table: u32, keys: usize, dim: u32, expected: usize, got: usize },

    #[error("table {0} does not exist (create it first)")]
    UnknownTable(u32),

    #[error("table {table} already exists with a different spec: {detail}")]
    TableMismatch { table: u32, detail: String },

    #[error("invalid table spec: {0}")]
    InvalidSpec(String),

    #[error("unknown updater {0:?}: the server has no custom rule registered under that name")]
    UnknownUpdater(String),

    #[error("timestamp {0} was never issued by this worker")]
    UnknownTimestamp(u64),

    #[error("peer {peer}: {message}")]
    Remote { peer: String, message: String },

    #[error("protocol error from {peer}: {detail}")]
    Protocol { peer: String, detail: String },

    #[error("peer {0} disconnected")]
    Disconnected(String),

    #[error("cannot reach {addr}: {detail}")]
    Unreachable { addr: String, detail: String },

    #[error("authentication with {peer} failed: {detail}")]
    Unauthenticated { peer: String, detail: String },

    #[error("limit exceeded: {0}")]
    LimitExceeded(String),

    #[error("out of memory budget: {0}")]
    OutOfMemory(String),

    #[error("configuration: {0}")]
    Config(String),

    #[error("the job is shutting down")]
    ShuttingDown,

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<io::Error>,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done when it happened.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source: Arc::new(source) }
    }

    pub(crate) fn protocol(peer: impl ToString, detail: impl Into<String>) -> Self {
        Error::Protocol { peer: peer.to_string(), detail: detail.into() }
    }
}
