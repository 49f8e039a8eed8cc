//! The tier's one error type. Each variant says what the caller should do:
//!
//! | variant       | meaning                                         | caller                      |
//! |---------------|-------------------------------------------------|-----------------------------|
//! | `NotFound`    | no object under the key                         | metadata/store disagree: fsck |
//! | `Corrupt`     | body of the wrong length or checksum            | retry, then treat as lost   |
//! | `Unavailable` | transport or server trouble                     | retry with backoff          |
//! | `Invalid`     | bad URL, key, range or configuration            | fix the input; never retry  |
//! | `Other`       | store refused (auth, permission, unsupported...)| report; never retry         |

use std::fmt;

/// What a body was expected to be, or was found to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub len: u64,
    /// `None` where no checksum was expected or none could be computed (the body was
    /// abandoned once it was known to be the wrong length).
    pub crc32c: Option<u32>,
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.len)?;
        if let Some(crc) = self.crc32c {
            write!(f, ", crc32c {crc:#010x}")?;
        }
        Ok(())
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("object {key} not found")]
    NotFound { key: String },

    /// The bytes that came back are not the bytes that were stored. Never returned as data.
    #[error("object {key} is corrupt: expected {expected}, found {found}")]
    Corrupt {
        key: String,
        expected: Fingerprint,
        found: Fingerprint,
    },

    /// Transient: the request may well succeed if made again.
    #[error("object store unavailable ({op} {key}): {source}")]
    Unavailable {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },

    #[error("invalid: {0}")]
    Invalid(String),

    #[error("{context}: {source}")]
    Other {
        context: String,
        #[source]
        source: BoxError,
    },
}

impl TierError {
    /// True for errors a second identical request may not repeat: transport trouble, and a
    /// corrupt body (a bit flip or cut-off in transit is gone on the next GET; corruption at
    /// rest is not, which is why retries are bounded).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            TierError::Unavailable { .. } | TierError::Corrupt { .. }
        )
    }

    /// Maps an object_store error from operation `op` on `key` into our kinds.
    ///
    /// object_store already turns the HTTP statuses it understands into typed variants
    /// (404, 401, 403, 409, 412); what is left as `Generic` is 5xx, throttling, timeouts and
    /// connection errors that outlived its own per-request retries, all worth retrying.
    pub(crate) fn from_store(op: &'static str, key: &str, e: object_store::Error) -> TierError {
        use object_store::Error as E;
        match e {
            E::NotFound { .. } => TierError::NotFound {
                key: key.to_string(),
            },
            E::Generic { .. } | E::JoinError { .. } => TierError::Unavailable {
                op,
                key: key.to_string(),
                source: e,
            },
            E::InvalidPath { .. } => TierError::Invalid(format!("{op} {key}: {e}")),
            other => TierError::Other {
                context: format!("{op} {key}"),
                source: Box::new(other),
            },
        }
    }
}

pub type Result<T, E = TierError> = std::result::Result<T, E>;

/// A metadata store error, as the tier reports it.
pub(crate) fn meta_err(e: cfs_meta::MetaError) -> TierError {
    TierError::Other {
        context: "metadata".into(),
        source: Box::new(e),
    }
}

/// Runs a blocking metadata call (a redb transaction, a sync) off the async threads.
pub(crate) async fn blocking_meta<T: Send + 'static>(
    f: impl FnOnce() -> cfs_meta::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TierError::Other {
            context: "metadata task".into(),
            source: Box::new(e),
        })?
        .map_err(meta_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic() -> object_store::Error {
        object_store::Error::Generic {
            store: "test",
            source: "boom".into(),
        }
    }

    #[test]
    fn classification() {
        let nf = object_store::Error::NotFound {
            path: "p".into(),
            source: "gone".into(),
        };
        let e = TierError::from_store("get", "k", nf);
        assert!(matches!(e, TierError::NotFound { ref key } if key == "k"));
        assert!(!e.is_retryable());

        let e = TierError::from_store("get", "k", generic());
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("get k"), "{e}");

        let denied = object_store::Error::PermissionDenied {
            path: "p".into(),
            source: "no".into(),
        };
        let e = TierError::from_store("put", "k", denied);
        assert!(matches!(e, TierError::Other { .. }));
        assert!(!e.is_retryable());

        let corrupt = TierError::Corrupt {
            key: "k".into(),
            expected: Fingerprint {
                len: 4,
                crc32c: Some(0xdead_beef),
            },
            found: Fingerprint {
                len: 3,
                crc32c: None,
            },
        };
        assert!(corrupt.is_retryable());
        assert_eq!(
            corrupt.to_string(),
            "object k is corrupt: expected 4 bytes, crc32c 0xdeadbeef, found 3 bytes"
        );
        assert!(!TierError::Invalid("x".into()).is_retryable());
    }
}
