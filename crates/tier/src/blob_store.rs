//! The blob store: the only door from ClaudeFS to the object store.
//!
//! It speaks nothing but GET (whole or ranged), PUT and DELETE, each a single request:
//! no LIST (metadata knows every key), no multipart upload (a blob is at most 64 MiB, far
//! under S3's 5 GiB single-PUT limit), no HEAD (a GET answers the same question). Cheap,
//! S3-compatible servers all implement these three, and so this is all we may depend on.
//!
//! Every operation is retried under the store's [`RetryPolicy`]. Every body is checked
//! against the length the server announced, so a cut-off body is an error, never short data.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, PutOptions, PutPayload};

use crate::error::{Fingerprint, Result, TierError};
use crate::key::{ObjectKey, validate_path};
use crate::pooled::Assembly;
use crate::retry::{RetryPolicy, retry, retry_while};
use crate::zero_blob;

/// GET, PUT and DELETE of whole objects under one key prefix of one object store.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// Prepended to every key; empty for none. Lets one bucket hold several deployments.
    prefix: String,
    retry: RetryPolicy,
    /// Verified GETs that last gave up on a wrong body, and when (see [`SUSPECT_FOR`]): by
    /// key and the fingerprint asked for, since a body is only wrong against one.
    suspects: Arc<parking_lot::Mutex<HashMap<String, Instant>>>,
}

/// For this long after a verified GET of a key gave up on a wrong body, a wrong body from
/// that key is not retried. The retries are for a bad transfer; a body that came back wrong
/// on every attempt is a damaged object, and each read of it (the kernel retries a failed
/// read page by page, and readahead asks again) would otherwise wait through the whole
/// backoff before its `EIO`: minutes for one `cat`. One attempt still finds an object that
/// was repaired meanwhile.
const SUSPECT_FOR: Duration = Duration::from_secs(60);

/// Names the inner store by its `Display`: some stores' `Debug` (InMemory's) dumps
/// every object they hold.
impl fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStore")
            .field("store", &format_args!("{}", self.store))
            .field("prefix", &self.prefix)
            .field("retry", &self.retry)
            .finish()
    }
}

impl fmt::Display for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} under {:?}", self.store, self.prefix)
    }
}

impl BlobStore {
    /// A store over `store`, with keys under `prefix` (`""` for the root), retrying under
    /// [`RetryPolicy::default`].
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Result<BlobStore> {
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            validate_path(prefix, "key prefix")?;
        }
        Ok(BlobStore {
            store,
            prefix: prefix.to_string(),
            retry: RetryPolicy::default(),
            suspects: Arc::default(),
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> BlobStore {
        self.retry = retry;
        self
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn path(&self, key: &ObjectKey) -> Path {
        // Both parts are validated to the portable character set, so object_store's
        // percent-encoding leaves them untouched.
        if self.prefix.is_empty() {
            Path::from(key.as_str())
        } else {
            Path::from(format!("{}/{}", self.prefix, key))
        }
    }

    /// Stores `body` under `key`, replacing any object there, in one PUT.
    pub async fn put(&self, key: &ObjectKey, body: Bytes) -> Result<()> {
        let path = self.path(key);
        retry(&self.retry, || async {
            self.store
                .put_opts(
                    &path,
                    PutPayload::from_bytes(body.clone()),
                    PutOptions::default(),
                )
                .await
                .map(drop)
                .map_err(|e| TierError::from_store("put", key.as_str(), e))
        })
        .await?;
        // New bytes under the key: whatever was found wrong with the old ones is moot.
        let mine = format!("{key} ");
        self.suspects.lock().retain(|id, _| !id.starts_with(&mine));
        Ok(())
    }

    /// The whole object under `key`. Checked only for length: use [`Self::get_verified`]
    /// wherever the checksum is known, which for blobs is always.
    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes> {
        let path = self.path(key);
        retry(&self.retry, || async {
            let res = self.get_opts(&path, key, GetOptions::default()).await?;
            let len = res.range.end.saturating_sub(res.range.start);
            let expected = Fingerprint { len, crc32c: None };
            read_body(key, res, expected).await.map(|(body, _)| body)
        })
        .await
    }

    /// Bytes `range` of the object under `key`, in one ranged GET.
    ///
    /// The range must be non-empty and lie within the object. A range that runs past the
    /// end is `Invalid`, not short data: the caller asked for bytes that metadata says exist.
    pub async fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<Bytes> {
        if range.start >= range.end {
            return Err(TierError::Invalid(format!(
                "empty or reversed range {range:?} for {key}"
            )));
        }
        let path = self.path(key);
        retry(&self.retry, || async {
            let opts = GetOptions::new().with_range(Some(range.clone()));
            let res = self.get_opts(&path, key, opts).await?;
            if res.range != range {
                return Err(TierError::Invalid(format!(
                    "range {range:?} runs past the end of {key} ({} bytes)",
                    res.meta.size
                )));
            }
            let expected = Fingerprint {
                len: range.end - range.start,
                crc32c: None,
            };
            read_body(key, res, expected).await.map(|(body, _)| body)
        })
        .await
    }

    /// The object under `key`, only if it is exactly `len` bytes with checksum `crc32c`;
    /// otherwise `Corrupt` (retried first, since a bad body may be a bad transfer).
    ///
    /// This is how blobs are read: the length and checksum recorded in metadata when the
    /// blob was uploaded are checked on every GET, so wrong bytes never reach a reader. A
    /// blob of zeros stored as its marker (see [`crate::zero_blob`]) comes back as its zeros.
    pub async fn get_verified(&self, key: &ObjectKey, len: u64, crc32c: u32) -> Result<Bytes> {
        let path = self.path(key);
        let expected = Fingerprint {
            len,
            crc32c: Some(crc32c),
        };
        let suspect = format!("{key} {len} {crc32c:08x}");
        let r = retry_while(&self.retry, self.retryable_for(&suspect), || async {
            let res = self.get_opts(&path, key, GetOptions::default()).await?;
            if res.meta.size < len && zero_blob::may_be_marker(len, crc32c) {
                // Short, as a blob of zeros stored as its marker is: the body is a line.
                let found = Fingerprint {
                    len: res.meta.size,
                    crc32c: None,
                };
                let (body, _) = read_body(key, res, found).await?;
                if zero_blob::is_marker(&body, len, crc32c) {
                    return Ok(zero_blob::zeros(len));
                }
                return Err(TierError::Corrupt {
                    key: key.to_string(),
                    expected,
                    found,
                });
            }
            if res.meta.size != len {
                // The wrong object entirely: don't download it to find out.
                return Err(TierError::Corrupt {
                    key: key.to_string(),
                    expected,
                    found: Fingerprint {
                        len: res.meta.size,
                        crc32c: None,
                    },
                });
            }
            let (body, crc) = read_body(key, res, expected).await?;
            if crc != crc32c {
                return Err(TierError::Corrupt {
                    key: key.to_string(),
                    expected,
                    found: Fingerprint {
                        len,
                        crc32c: Some(crc),
                    },
                });
            }
            Ok(body)
        })
        .await;
        self.note_verified(suspect, &r);
        r
    }

    /// Bytes `range` of the object under `key`, in one ranged GET, only if each piece checks
    /// out: `range` starts at a multiple of `piece`, and its `i`th piece of `piece` bytes (the
    /// last one may be shorter) must have crc32c `crcs[i]`. Otherwise `Corrupt`, after the
    /// retries a bad transfer deserves. This is how part of a blob is read: the piece
    /// checksums recorded at upload are checked, so wrong bytes never reach a reader.
    pub async fn get_range_verified(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
        piece: u64,
        crcs: &[u32],
    ) -> Result<Bytes> {
        let len = range.end.saturating_sub(range.start);
        if len == 0
            || piece == 0
            || !range.start.is_multiple_of(piece)
            || len.div_ceil(piece) != crcs.len() as u64
        {
            return Err(TierError::Invalid(format!(
                "range {range:?} of {key} is not {} whole pieces of {piece} bytes",
                crcs.len()
            )));
        }
        let path = self.path(key);
        let suspect = format!("{key} {range:?} {crcs:08x?}");
        let r = retry_while(&self.retry, self.retryable_for(&suspect), || async {
            let opts = GetOptions::new().with_range(Some(range.clone()));
            let res = self.get_opts(&path, key, opts).await?;
            // A short or long body is `Corrupt` already (read_body checks the length).
            let (body, _) = read_body(key, res, Fingerprint { len, crc32c: None }).await?;
            for (i, (bytes, &want)) in body.chunks(piece as usize).zip(crcs).enumerate() {
                let got = crc32c::crc32c(bytes);
                if got != want {
                    let at = range.start + i as u64 * piece;
                    tracing::debug!(key = %key, at, "a piece of a ranged GET fails its checksum");
                    return Err(TierError::Corrupt {
                        key: key.to_string(),
                        expected: Fingerprint {
                            len: bytes.len() as u64,
                            crc32c: Some(want),
                        },
                        found: Fingerprint {
                            len: bytes.len() as u64,
                            crc32c: Some(got),
                        },
                    });
                }
            }
            Ok(body)
        })
        .await;
        self.note_verified(suspect, &r);
        r
    }

    /// Which errors of a verified GET (`suspect`: its key and fingerprint) are worth another
    /// attempt: while it is a suspect, a wrong body is not (an unreachable store still is).
    fn retryable_for(&self, suspect: &str) -> impl Fn(&TierError) -> bool + use<> {
        let suspect = self
            .suspects
            .lock()
            .get(suspect)
            .is_some_and(|at| at.elapsed() < SUSPECT_FOR);
        move |e| !(suspect && matches!(e, TierError::Corrupt { .. }))
    }

    /// Makes a verified GET a suspect once it found a wrong body, and clears it once it
    /// succeeded.
    fn note_verified<T>(&self, suspect: String, r: &Result<T>) {
        let mut suspects = self.suspects.lock();
        match r {
            Ok(_) => {
                suspects.remove(&suspect);
            }
            Err(TierError::Corrupt { .. }) => {
                suspects.retain(|_, at| at.elapsed() < SUSPECT_FOR);
                suspects.insert(suspect, Instant::now());
            }
            Err(_) => {}
        }
    }

    /// Deletes the object under `key`; a missing object is already deleted, so Ok. That
    /// makes DELETE idempotent, which is what lets a lost response be retried safely.
    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        let path = self.path(key);
        retry(&self.retry, || async {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(TierError::from_store("delete", key.as_str(), e)),
            }
        })
        .await
    }

    async fn get_opts(
        &self,
        path: &Path,
        key: &ObjectKey,
        opts: GetOptions,
    ) -> Result<object_store::GetResult> {
        self.store
            .get_opts(path, opts)
            .await
            .map_err(|e| TierError::from_store("get", key.as_str(), e))
    }
}

/// Reads a GET body of exactly `expected.len` bytes, computing its crc32c on the way.
///
/// A body that ends early or runs long is `Corrupt`; reading stops as soon as it is too
/// long, so a wrong object cannot make us buffer more than one chunk past `expected.len`.
async fn read_body(
    key: &ObjectKey,
    res: object_store::GetResult,
    expected: Fingerprint,
) -> Result<(Bytes, u32)> {
    let want = expected.len;
    if matches!(res.payload, object_store::GetResultPayload::File(..)) {
        // A local file: one read of the whole range beats the stream's small chunks, each
        // a trip to the blocking pool, by an order of magnitude for a 64 MiB blob.
        let len = res.range.end.saturating_sub(res.range.start);
        if len != want {
            return Err(TierError::Corrupt {
                key: key.to_string(),
                expected,
                found: Fingerprint { len, crc32c: None },
            });
        }
        let body = res
            .bytes()
            .await
            .map_err(|e| TierError::from_store("get", key.as_str(), e))?;
        let crc = crc32c::crc32c(&body);
        if body.len() as u64 != want {
            return Err(TierError::Corrupt {
                key: key.to_string(),
                expected,
                found: Fingerprint {
                    len: body.len() as u64,
                    crc32c: Some(crc),
                },
            });
        }
        return Ok((body, crc));
    }
    let mut stream = res.into_stream();
    let mut body = Assembly::new(want);
    let mut got: u64 = 0;
    let mut crc = 0u32;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| TierError::from_store("get", key.as_str(), e))?;
        got += chunk.len() as u64;
        if got > want {
            return Err(TierError::Corrupt {
                key: key.to_string(),
                expected,
                found: Fingerprint {
                    len: got,
                    crc32c: None,
                },
            });
        }
        crc = crc32c::crc32c_append(crc, &chunk);
        body.push(chunk);
    }
    if got != want {
        return Err(TierError::Corrupt {
            key: key.to_string(),
            expected,
            found: Fingerprint {
                len: got,
                crc32c: Some(crc),
            },
        });
    }
    Ok((body.finish(), crc))
}
