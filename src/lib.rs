//! pserver: a parameter server for distributed machine learning.
//!
//! Layout (see DESIGN.md): `store` holds versioned shards; `transport` moves
//! frames and reads remote memory; `server` owns shards and applies pushes;
//! `worker` is the key-value client; `scheduler` is the control plane; `job`
//! wires them into an embedded job.
//!
//! ```
//! use pserver::{job, JobConfig, TableSpec, UpdaterSpec};
//!
//! job::run(JobConfig::default().servers(2).workers(4), |w| {
//!     // Every worker declares the tables it uses (idempotent).
//!     w.create_table(TableSpec::dense(1, 1_000_000, 1).updater(UpdaterSpec::Sgd { lr: 0.1 }))?;
//!     let keys: Vec<u64> = (0..1000).map(|k| k * 7).collect(); // sorted, unique
//!     let ts = w.push(1, &keys, &vec![0.5; keys.len()])?; // returns at once
//!     let weights = w.pull(1, &keys)?.wait()?; // sees the push above
//!     assert!(weights.iter().all(|&x| x <= 0.0));
//!     w.wait(ts)?;
//!     w.clock()?; // end of an iteration
//!     w.barrier()?;
//!     Ok(())
//! })?;
//! # Ok::<(), pserver::Error>(())
//! ```

pub mod apps;
pub mod bench;
pub mod check;
pub mod data;
pub mod error;
pub mod job;
pub mod metrics;
pub mod proto;
pub mod scheduler;
pub mod server;
pub mod status;
pub mod store;
pub mod table;
pub mod transport;
pub mod updater;
pub mod worker;

pub use error::{Error, Result};

pub use job::JobConfig;
pub use table::{Consistency, Init, Key, Storage, TableId, TableSpec, UpdaterSpec};
pub use worker::{KeyList, Pull, Scoped, Timestamp, Traffic, Values, Worker};
