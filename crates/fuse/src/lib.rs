//! ClaudeFS's kernel interface. Each FUSE method is a thin translation from the kernel's
//! request to a metadata operation or a backing-file call, and back to a reply; the logic
//! lives in `cfs-meta` and `cfs-flash`, where it is tested without a mount.

mod attr;
mod busy_poll;
mod caller;
mod drop_behind;
mod errno;
mod fs;
mod handles;
mod offload;
mod ops;
mod purger;
mod sync_beside;
mod tier_tree;

pub use attr::DataAttr;
pub use errno::{FsError, FsResult, from_io, from_meta};
pub use fs::{BLOB_SIZE, ClaudeFs, FetchedBlob, FsOptions, FsStatus, Live, TierHooks};
