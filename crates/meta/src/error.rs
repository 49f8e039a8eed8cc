//! The metadata layer's error type.
//!
//! Variants name the POSIX condition, not the errno: the single mapping to an errno lives at
//! the kernel boundary (`cfs-fuse`), so that the NFS export can map the same variants too.

use crate::Ino;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no such entry")]
    NotFound,
    #[error("entry already exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("name too long")]
    NameTooLong,
    #[error("too many links")]
    TooManyLinks,
    #[error("no such extended attribute")]
    NoXattr,
    #[error("extended attribute value too large")]
    XattrRange,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("metadata for inode {0} is corrupt: {1}")]
    Corrupt(Ino, String),
    #[error("data dir was created by format version {found}, this build reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("metadata store: {0}")]
    Store(String),
}

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

macro_rules! store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for MetaError {
            fn from(e: $t) -> Self {
                MetaError::Store(e.to_string())
            }
        }
    )*};
}

store_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);
