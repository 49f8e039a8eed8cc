//! Object naming: which bytes of which file live under which S3 key.
//!
//! A regular file is cut into 64 MiB blobs; blob `k` covers bytes `[k·64Mi, (k+1)·64Mi)`.
//! A blob's key is immutable: a changed blob gets a new generation and so a new key,
//! `<fs-id>/blobs/<ino>/<k>/<gen>`. Metadata records every live key, so nothing ever needs
//! LIST, and the old key may be DELETEd only once the new one is committed in metadata.
//!
//! Keys are restricted to `[A-Za-z0-9._-]` segments joined by `/`. That set means the same
//! thing to every backend: object_store percent-encodes other characters, S3 and the local
//! filesystem disagree on some of them, and a key must name the same object everywhere.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::TierError;

pub use cfs_meta::BLOB_SIZE;

/// Inode numbers, as the metadata layer hands them out.
pub type Ino = u64;

/// Index of the blob that holds byte `offset` of a file.
pub fn blob_index(offset: u64) -> u64 {
    offset / BLOB_SIZE
}

/// The bytes of a `file_size`-byte file that blob `k` holds.
///
/// The last blob of a file is short; a blob wholly past the end is the empty range at its
/// start, so callers can test `is_empty()` rather than special-case EOF.
pub fn blob_range(k: u64, file_size: u64) -> Range<u64> {
    let start = k.saturating_mul(BLOB_SIZE);
    let end = start.saturating_add(BLOB_SIZE).min(file_size).max(start);
    start..end
}

/// Number of blobs a `file_size`-byte file is cut into (0 for an empty file).
pub fn blob_count(file_size: u64) -> u64 {
    file_size.div_ceil(BLOB_SIZE)
}

/// One path segment is valid if it is non-empty, not `.`/`..`, and only `[A-Za-z0-9._-]`.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a `/`-separated key or prefix; `what` names it in the error.
pub(crate) fn validate_path(s: &str, what: &str) -> Result<(), TierError> {
    if s.len() > 1024 {
        return Err(TierError::Invalid(format!(
            "{what} is {} bytes; S3 keys are at most 1024",
            s.len()
        )));
    }
    match s.split('/').find(|seg| !valid_segment(seg)) {
        None => Ok(()),
        Some(seg) => Err(TierError::Invalid(format!(
            "{what} {s:?} has a bad segment {seg:?}: segments must be non-empty, not . or .., \
             and use only A-Z a-z 0-9 . _ -"
        ))),
    }
}

/// The id of one ClaudeFS filesystem: the first segment of all its keys, so several
/// filesystems can share a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FsId(String);

impl FsId {
    pub fn new(id: impl Into<String>) -> Result<FsId, TierError> {
        let id = id.into();
        if id.contains('/') {
            return Err(TierError::Invalid(format!(
                "filesystem id {id:?} must not contain '/'"
            )));
        }
        validate_path(&id, "filesystem id")?;
        Ok(FsId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key inside a [`BlobStore`](crate::BlobStore), relative to the store's prefix.
///
/// Built from a [`BlobKey`], by [`ObjectKey::meta_head`], or checked by [`ObjectKey::new`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Checks `key` against the portable key rules (see the module doc).
    pub fn new(key: impl Into<String>) -> Result<ObjectKey, TierError> {
        let key = key.into();
        validate_path(&key, "object key")?;
        Ok(ObjectKey(key))
    }

    /// `<fs-id>/meta/HEAD`: the one well-known key, pointing at the newest metadata
    /// checkpoint, from which `cfs repair --from-s3` starts without any LIST.
    pub fn meta_head(fs: &FsId) -> ObjectKey {
        ObjectKey(format!("{fs}/meta/HEAD"))
    }

    /// `<fs-id>/meta/ckpt/<seq>/<part>`: part `part` (at most [`BLOB_SIZE`] bytes) of
    /// checkpoint `seq`. A sequence number is never reused for different contents once a
    /// HEAD names it, so these keys are as immutable as blob keys.
    pub fn checkpoint_part(fs: &FsId, seq: u64, part: u64) -> ObjectKey {
        ObjectKey(format!("{fs}/meta/ckpt/{seq}/{part}"))
    }

    /// `<fs-id>/meta/log/<first>`: the operation log segment that starts with operation
    /// `first` (zero-padded, so that a listing sorts). The next segment is named by this
    /// one's last operation plus one, so a reader follows the chain without LIST. A segment
    /// is rewritten only with the same operations (and possibly more after them).
    pub fn log_segment(fs: &FsId, first: u64) -> ObjectKey {
        ObjectKey(format!("{fs}/meta/log/{first:020}"))
    }

    /// `meta/LATEST`, directly under the store's prefix: names the filesystem that published
    /// a checkpoint there most recently, so that `cfs repair --from-s3 URL` finds its HEAD
    /// without LIST and without being told the filesystem id.
    pub fn meta_latest() -> ObjectKey {
        ObjectKey("meta/LATEST".to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&BlobKey> for ObjectKey {
    fn from(b: &BlobKey) -> ObjectKey {
        // Valid by construction: FsId is a valid segment and the rest are decimal numbers.
        ObjectKey(b.to_string())
    }
}

impl From<BlobKey> for ObjectKey {
    fn from(b: BlobKey) -> ObjectKey {
        ObjectKey::from(&b)
    }
}

/// Names one generation of one blob: `<fs-id>/blobs/<ino>/<k>/<gen>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey {
    pub fs: FsId,
    pub ino: Ino,
    /// Blob index `k`: the blob covers `blob_range(k, size)` of the file.
    pub index: u64,
    /// Bumped each time the blob's content changes, so a key never names two contents.
    pub generation: u64,
}

impl BlobKey {
    pub fn new(fs: FsId, ino: Ino, index: u64, generation: u64) -> BlobKey {
        BlobKey {
            fs,
            ino,
            index,
            generation,
        }
    }

    pub fn object_key(&self) -> ObjectKey {
        ObjectKey::from(self)
    }
}

impl fmt::Display for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/blobs/{}/{}/{}",
            self.fs, self.ino, self.index, self.generation
        )
    }
}

/// Parses `<fs-id>/blobs/<ino>/<k>/<gen>` back, for fsck and repair tools that read keys
/// out of metadata or logs.
impl FromStr for BlobKey {
    type Err = TierError;

    fn from_str(s: &str) -> Result<BlobKey, TierError> {
        let bad = |why: &str| TierError::Invalid(format!("blob key {s:?}: {why}"));
        let parts: Vec<&str> = s.split('/').collect();
        let [fs, blobs, ino, index, generation] = parts.as_slice() else {
            return Err(bad("expected <fs-id>/blobs/<ino>/<k>/<gen>"));
        };
        if *blobs != "blobs" {
            return Err(bad("second segment must be \"blobs\""));
        }
        // Only canonical decimal, so that parse(display(k)) == k and no two strings name
        // the same blob ("007" vs "7").
        let num = |what: &str, v: &str| -> Result<u64, TierError> {
            let n: u64 = v
                .parse()
                .map_err(|_| bad(&format!("{what} {v:?} is not a decimal u64")))?;
            if n.to_string() != *v {
                return Err(bad(&format!("{what} {v:?} is not canonical decimal")));
            }
            Ok(n)
        };
        Ok(BlobKey {
            fs: FsId::new(*fs)?,
            ino: num("inode", ino)?,
            index: num("blob index", index)?,
            generation: num("generation", generation)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_index_and_range() {
        assert_eq!(BLOB_SIZE, 67_108_864);
        assert_eq!(blob_index(0), 0);
        assert_eq!(blob_index(BLOB_SIZE - 1), 0);
        assert_eq!(blob_index(BLOB_SIZE), 1);
        assert_eq!(blob_index(u64::MAX), u64::MAX / BLOB_SIZE);

        assert_eq!(blob_range(0, 0), 0..0);
        assert_eq!(blob_range(0, 10), 0..10);
        assert_eq!(blob_range(0, BLOB_SIZE), 0..BLOB_SIZE);
        assert_eq!(blob_range(1, BLOB_SIZE), BLOB_SIZE..BLOB_SIZE);
        assert!(blob_range(1, BLOB_SIZE).is_empty());
        assert_eq!(blob_range(1, BLOB_SIZE + 5), BLOB_SIZE..BLOB_SIZE + 5);
        assert_eq!(blob_range(1, 3 * BLOB_SIZE), BLOB_SIZE..2 * BLOB_SIZE);
        assert_eq!(blob_range(5, 10), 5 * BLOB_SIZE..5 * BLOB_SIZE);
        // No overflow at the far end of the u64 range.
        let r = blob_range(u64::MAX, u64::MAX);
        assert!(r.is_empty());

        assert_eq!(blob_count(0), 0);
        assert_eq!(blob_count(1), 1);
        assert_eq!(blob_count(BLOB_SIZE), 1);
        assert_eq!(blob_count(BLOB_SIZE + 1), 2);
        for size in [1, BLOB_SIZE - 1, BLOB_SIZE, 3 * BLOB_SIZE + 7] {
            // Every byte of the file is in exactly one blob, in order.
            let mut next = 0;
            for k in 0..blob_count(size) {
                let r = blob_range(k, size);
                assert_eq!(r.start, next);
                assert!(!r.is_empty());
                assert_eq!(blob_index(r.start), k);
                assert_eq!(blob_index(r.end - 1), k);
                next = r.end;
            }
            assert_eq!(next, size);
        }
    }

    #[test]
    fn blob_key_shape_and_round_trip() {
        let fs = FsId::new("3f2a-cafe").expect("fs id");
        let key = BlobKey::new(fs.clone(), 42, 3, 7);
        assert_eq!(key.to_string(), "3f2a-cafe/blobs/42/3/7");
        assert_eq!(key.object_key().as_str(), "3f2a-cafe/blobs/42/3/7");
        assert_eq!(ObjectKey::meta_head(&fs).as_str(), "3f2a-cafe/meta/HEAD");
        let part = ObjectKey::checkpoint_part(&fs, 12, 0);
        assert_eq!(part.as_str(), "3f2a-cafe/meta/ckpt/12/0");
        assert!(ObjectKey::new(part.as_str()).is_ok());
        assert!(ObjectKey::new(ObjectKey::meta_latest().as_str()).is_ok());
        let back: BlobKey = key.to_string().parse().expect("parse");
        assert_eq!(back, key);
        let max = BlobKey::new(fs, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(max.to_string().parse::<BlobKey>().expect("parse"), max);
    }

    #[test]
    fn bad_keys_are_rejected() {
        for bad in [
            "fs/blobs/1/2",
            "fs/blobs/1/2/3/4",
            "fs/blob/1/2/3",
            "fs/blobs/x/2/3",
            "fs/blobs/01/2/3",
            "fs/blobs/-1/2/3",
            "/blobs/1/2/3",
            "f s/blobs/1/2/3",
        ] {
            assert!(bad.parse::<BlobKey>().is_err(), "{bad} accepted");
        }
        for bad in ["", "a//b", "/a", "a/", "a/../b", ".", "a b", "a?b", "é"] {
            let err = ObjectKey::new(bad).expect_err(bad);
            assert!(matches!(err, TierError::Invalid(_)), "{err}");
        }
        assert!(FsId::new("a/b").is_err());
        assert!(FsId::new("").is_err());
        assert!(ObjectKey::new("x".repeat(1025)).is_err());
        assert!(ObjectKey::new("fs/meta/HEAD").is_ok());
    }
}
