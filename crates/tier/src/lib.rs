//! The bottom layer of ClaudeFS's S3 tier.
//!
//! Data leaves a node as 64 MiB blobs, each one S3 object under an immutable key
//! ([`BlobKey`]), and comes back checked against the length and crc32c recorded in
//! metadata ([`BlobStore::get_verified`]). The object store is named by a URL
//! ([`StoreUrl`]: `s3://`, `file://`, `memory://`) and reached through the `object_store`
//! crate, so this crate holds no S3 signing or HTTP code of its own.
//!
//! [`BlobStore`] deliberately uses only GET, PUT and DELETE. [`RetryPolicy`] retries what
//! is worth retrying, [`FaultyStore`] makes any store slow, failing or corrupting on a
//! replayable seed, and [`conformance`](conformance::conformance) is the one suite that
//! every backend, fake or real, has to pass.
//!
//! The upload/download queues that decide *when* blobs move live in the layer above.

mod aws_profile;
pub mod blob_io;
mod blob_store;
pub mod checkpoint;
mod error;
pub mod evict;
mod faulty;
pub mod hydrate;
mod key;
pub mod oplog;
mod pooled;
mod retry;
mod rng;
mod store_url;
pub mod uploader;
pub mod zero_blob;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use blob_io::{BlobIo, BlobIoChoice};
pub use blob_store::BlobStore;
pub use error::{BoxError, Fingerprint, Result, TierError};
pub use faulty::{FaultStats, Faults, FaultyStore};
pub use key::{BLOB_SIZE, BlobKey, FsId, Ino, ObjectKey, blob_count, blob_index, blob_range};
pub use retry::{RETRIES, RetryPolicy, retry};
pub use rng::SplitMix64;
pub use store_url::{S3Checksum, S3Options, StoreUrl};

#[cfg(test)]
mod tests;
