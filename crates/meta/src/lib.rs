//! ClaudeFS metadata: inodes, directory entries and xattrs, changed only by applying
//! [`Op`]s through a deterministic state machine, stored in redb.
//!
//! On one node the store applies operations directly with group commit; in a cluster the same
//! operations are ordered by Raft first. Reads go straight to redb's MVCC snapshots and never
//! wait for writers.

pub mod acl;
mod apply;
mod blobs;
mod checkpoint;
mod cover;
mod error;
mod marks;
mod op;
mod oplog;
mod pending;
mod repair;
mod store;
mod tables;
mod types;

pub use apply::XATTR_SIZE_MAX;
pub use checkpoint::{CHECKPOINT_VERSION, Checkpoint, CheckpointCounts};
pub use cover::{FsyncPlan, Origin, decode_origin, recoverable};
pub use error::{MetaError, Result};
pub use op::{BlobRecord, Caller, Op, Outcome, RenameMode, SetAttr, XattrMode};
pub use oplog::{LOG_VERSION, LogSegment, decode_log_segment, encode_log_segment};
pub use repair::Repair;
pub use store::{DataBarrier, EvictCandidate, FORMAT_VERSION, MetaCounts, MetaStore, TierCounts};
pub use tables::TIER_XATTR;
pub use types::*;

/// The unit of the object tier: a regular file is cut into blobs of 64 MiB, blob `k` covering
/// bytes `[k * BLOB_SIZE, (k + 1) * BLOB_SIZE)`. Metadata records blobs by index, so every
/// layer must agree on this one value.
pub const BLOB_SIZE: u64 = 64 << 20;

/// Blobs are checksummed in pieces of this size too (see [`BlobRecord::chunks`]), so that a
/// ranged GET of a piece of a blob can be verified on its own: a small random read of a cold
/// file then costs one small GET, not a 64 MiB one.
pub const BLOB_CHUNK: u64 = 1 << 20;

#[cfg(test)]
mod tests;
