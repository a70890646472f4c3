//! pserver: a parameter server for distributed machine learning.
//!
//! Layout (see DESIGN.md): `store` holds versioned shards; `transport` moves
//! frames and reads remote memory; `server` owns shards and applies pushes;
//! `worker` is the key-value client; `scheduler` is the control plane; `job`
//! wires them into an embedded job.

pub mod error;
pub mod job;
pub mod proto;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod table;
pub mod transport;
pub mod updater;
pub mod worker;

pub use error::{Error, Result};

pub use job::JobConfig;
pub use table::{Consistency, Init, Key, Storage, TableId, TableSpec, UpdaterSpec};
pub use worker::{KeyList, Pull, Timestamp, Worker};
