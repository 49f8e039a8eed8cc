//! The one place where internal errors become errnos.

use cfs_meta::MetaError;
use fuser::Errno;
use std::io;

pub fn from_meta(e: &MetaError) -> Errno {
    match e {
        MetaError::NotFound => Errno::ENOENT,
        MetaError::Exists => Errno::EEXIST,
        MetaError::NotDir => Errno::ENOTDIR,
        MetaError::IsDir => Errno::EISDIR,
        MetaError::NotEmpty => Errno::ENOTEMPTY,
        MetaError::Invalid(_) => Errno::EINVAL,
        MetaError::NameTooLong => Errno::ENAMETOOLONG,
        MetaError::TooManyLinks => Errno::EMLINK,
        MetaError::NoXattr => Errno::NO_XATTR,
        MetaError::XattrRange => Errno::E2BIG,
        MetaError::NotPermitted => Errno::EPERM,
        MetaError::ReadOnly => Errno::EROFS,
        MetaError::Corrupt(..) | MetaError::Version { .. } | MetaError::Store(_) => Errno::EIO,
    }
}

pub fn from_io(e: &io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO)
}

/// An error on its way back to the kernel. Carrying the source lets the request log say what
/// went wrong, not just the errno.
#[derive(Debug)]
pub enum FsError {
    Meta(MetaError),
    Io(io::Error),
    Errno(Errno),
}

impl FsError {
    pub fn errno(&self) -> Errno {
        match self {
            FsError::Meta(e) => from_meta(e),
            FsError::Io(e) => from_io(e),
            FsError::Errno(e) => *e,
        }
    }

    /// Errors that are part of normal operation (ENOENT on lookup, EEXIST on create) are not
    /// worth a log line; store and I/O failures are.
    pub fn is_unexpected(&self) -> bool {
        matches!(
            self,
            FsError::Meta(MetaError::Corrupt(..) | MetaError::Store(_) | MetaError::Version { .. })
        ) || matches!(self, FsError::Io(e) if e.raw_os_error().is_none_or(|c| c == libc::EIO))
    }
}

impl From<MetaError> for FsError {
    fn from(e: MetaError) -> Self {
        FsError::Meta(e)
    }
}

impl From<io::Error> for FsError {
    fn from(e: io::Error) -> Self {
        FsError::Io(e)
    }
}

impl From<nix::Error> for FsError {
    fn from(e: nix::Error) -> Self {
        FsError::Io(io::Error::from(e))
    }
}

impl From<Errno> for FsError {
    fn from(e: Errno) -> Self {
        FsError::Errno(e)
    }
}

pub type FsResult<T> = Result<T, FsError>;
