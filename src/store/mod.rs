//! The versioned parameter store (DESIGN section 2): regions of memory, the
//! versioned slot with its one validation rule, and shards of slots.
//!
//! The store knows nothing about networks or workers' requests; servers own
//! shards and transports expose their regions.

pub mod index;
pub mod region;
pub mod shard;
pub mod slot;

pub use region::Region;
pub use shard::{Delta, KeyRange, KeyRun, Shard, ShardConfig};
pub use slot::{SlotLayout, Torn, Version};
