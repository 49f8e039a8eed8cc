//! Metadata checkpoints in the object store: what makes `cfs repair --from-s3` possible.
//!
//! Under the store's prefix:
//!
//! ```text
//! <fs-id>/meta/HEAD               JSON [`Head`]: the newest checkpoint, its parts and checksums
//! <fs-id>/meta/ckpt/<seq>/<part>  the checkpoint bytes, cut into parts of at most 64 MiB
//! <fs-id>/meta/log/<first>         a segment of the operation log (see `oplog`)
//! meta/LATEST                     JSON [`Latest`]: the filesystem that published here last
//! ```
//!
//! HEAD also says where the operation log after its checkpoint starts ([`Head::log_next`]):
//! a repair imports the checkpoint, then replays the log segments from there on.
//!
//! The order of a publish keeps the bucket recoverable at every instant: the parts first,
//! then HEAD (a single PUT, which every S3 makes visible atomically), and only then are the
//! previous checkpoint's parts DELETEd. A crash before the HEAD PUT leaves parts under a seq
//! no HEAD names; the next publish reuses that seq (HEAD still names the one before) and
//! overwrites them. A crash after it leaves the previous parts behind; HEAD records them as
//! [`Head::previous`], and the next publisher to start DELETEs them. Nothing needs LIST.
//!
//! The uploader DELETEs a blob's old generation only once a published checkpoint no longer
//! references it (see `uploader`), so every blob the newest HEAD names is in the bucket.

use crate::key::{BLOB_SIZE, FsId, ObjectKey};
use crate::{BlobStore, Result, TierError};
use bytes::Bytes;
use cfs_meta::CheckpointCounts;
use serde::{Deserialize, Serialize};

/// The HEAD and LATEST encoding this build writes and reads.
pub const HEAD_FORMAT: u32 = 1;

/// `<fs-id>/meta/HEAD`: names the newest complete checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub format: u32,
    pub fs_id: String,
    /// Grows by one with every publish; names the parts' keys.
    pub seq: u64,
    /// When it was published, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The encoding of the checkpoint bytes (`cfs_meta::CHECKPOINT_VERSION`).
    pub checkpoint_version: u32,
    /// Length and crc32c of the whole checkpoint, the parts concatenated.
    pub len: u64,
    pub crc32c: u32,
    /// Part `i` is `<fs-id>/meta/ckpt/<seq>/<i>`, with this length and crc32c.
    pub parts: Vec<PartRef>,
    /// What the checkpoint holds, so an operator can see it without downloading it.
    pub counts: CheckpointCounts,
    /// The first operation not yet shipped when the checkpoint was taken: the log segment
    /// named by it (and each one after, named by its predecessor's last operation plus one)
    /// holds what happened after the checkpoint. `None`: published by a build without the
    /// operation log.
    #[serde(default)]
    pub log_next: Option<u64>,
    /// The last logged operation the checkpoint holds; a replay skips operations up to it.
    #[serde(default)]
    pub op_seq: u64,
    /// The checkpoint this one replaced, whose parts are DELETEd once this HEAD is written.
    #[serde(default)]
    pub previous: Option<PreviousCheckpoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    pub len: u64,
    pub crc32c: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousCheckpoint {
    pub seq: u64,
    pub parts: u64,
}

/// Where a checkpoint cuts the operation log (see [`cfs_meta::Checkpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogCut {
    pub op_seq: u64,
    pub next: u64,
}

/// `meta/LATEST`: the filesystem that most recently started publishing under this prefix.
/// Several filesystems may share a prefix; then `repair --fs-id` picks one explicitly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest {
    pub format: u32,
    pub fs_id: String,
}

impl Head {
    /// The key of part `i` of this checkpoint.
    pub fn part_key(&self, fs: &FsId, i: u64) -> ObjectKey {
        ObjectKey::checkpoint_part(fs, self.seq, i)
    }
}

fn not_valid(key: &ObjectKey, why: impl Into<crate::BoxError>) -> TierError {
    TierError::Other {
        context: format!("{key} is not a valid ClaudeFS checkpoint record"),
        source: why.into(),
    }
}

/// GETs and parses a small JSON record; `None` if there is no object under `key`.
async fn get_json<T: for<'de> Deserialize<'de>>(
    store: &BlobStore,
    key: &ObjectKey,
) -> Result<Option<T>> {
    let body = match store.get(key).await {
        Ok(b) => b,
        Err(TierError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| not_valid(key, e))
}

/// The filesystem that published under this store's prefix last, if any did.
pub async fn read_latest(store: &BlobStore) -> Result<Option<Latest>> {
    let key = ObjectKey::meta_latest();
    let latest: Option<Latest> = get_json(store, &key).await?;
    if let Some(l) = &latest
        && l.format != HEAD_FORMAT
    {
        return Err(not_valid(
            &key,
            format!("format {} (this build reads {HEAD_FORMAT})", l.format),
        ));
    }
    Ok(latest)
}

/// The HEAD of filesystem `fs`, if it ever published a checkpoint.
pub async fn read_head(store: &BlobStore, fs: &FsId) -> Result<Option<Head>> {
    let key = ObjectKey::meta_head(fs);
    let head: Option<Head> = get_json(store, &key).await?;
    if let Some(h) = &head {
        if h.format != HEAD_FORMAT {
            return Err(not_valid(
                &key,
                format!("format {} (this build reads {HEAD_FORMAT})", h.format),
            ));
        }
        if h.fs_id != fs.as_str() {
            return Err(not_valid(&key, format!("it names filesystem {}", h.fs_id)));
        }
        if h.parts.iter().map(|p| p.len).sum::<u64>() != h.len {
            return Err(not_valid(&key, "its parts do not add up to its length"));
        }
    }
    Ok(head)
}

/// Downloads the checkpoint `head` names, checking every part's length and crc32c, and the
/// whole. `progress` is called with the bytes of each part as it arrives.
pub async fn fetch_checkpoint(
    store: &BlobStore,
    fs: &FsId,
    head: &Head,
    mut progress: impl FnMut(u64),
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(head.len.min(1 << 30) as usize);
    for (i, part) in head.parts.iter().enumerate() {
        let key = head.part_key(fs, i as u64);
        let body = store.get_verified(&key, part.len, part.crc32c).await?;
        out.extend_from_slice(&body);
        progress(part.len);
    }
    let crc = crc32c::crc32c(&out);
    if out.len() as u64 != head.len || crc != head.crc32c {
        return Err(TierError::Corrupt {
            key: format!("{} (checkpoint {})", ObjectKey::meta_head(fs), head.seq),
            expected: crate::Fingerprint {
                len: head.len,
                crc32c: Some(head.crc32c),
            },
            found: crate::Fingerprint {
                len: out.len() as u64,
                crc32c: Some(crc),
            },
        });
    }
    Ok(out)
}

/// Publishes checkpoints of one filesystem, one after the other.
pub struct Publisher {
    store: BlobStore,
    fs: FsId,
    /// What HEAD holds, once read: `Some(None)` when there is none yet. No checkpoint is
    /// written before HEAD was read, so that a seq a HEAD names is never overwritten.
    head: Option<Option<Head>>,
    latest_written: bool,
}

impl Publisher {
    pub fn new(store: BlobStore, fs: FsId) -> Publisher {
        Publisher {
            store,
            fs,
            head: None,
            latest_written: false,
        }
    }

    /// The HEAD this publisher wrote last, or found when it started.
    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref().and_then(|h| h.as_ref())
    }

    /// Reads HEAD once, and DELETEs what a publish cut short after its HEAD PUT left.
    async fn load(&mut self) -> Result<Option<Head>> {
        if let Some(h) = &self.head {
            return Ok(h.clone());
        }
        let head = match read_head(&self.store, &self.fs).await {
            Ok(h) => h,
            // Unusable anyway: start a fresh sequence, which replaces it.
            Err(e @ TierError::Other { .. }) => {
                tracing::warn!(error = %e, "ignoring an unreadable checkpoint HEAD; the next checkpoint replaces it");
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(prev) = head.as_ref().and_then(|h| h.previous) {
            self.delete_parts(prev.seq, prev.parts).await;
        }
        self.head = Some(head.clone());
        Ok(head)
    }

    /// DELETEs the parts of checkpoint `seq`. Failures are only logged: the parts are
    /// garbage, no reader needs them, and the next start retries.
    async fn delete_parts(&self, seq: u64, parts: u64) {
        for i in 0..parts {
            let key = ObjectKey::checkpoint_part(&self.fs, seq, i);
            if let Err(e) = self.store.delete(&key).await {
                tracing::warn!(key = %key, error = %e, "cannot delete an old checkpoint part");
            }
        }
    }

    /// Writes `bytes` (a `cfs_meta` checkpoint) as the next checkpoint: parts, HEAD, then
    /// the previous checkpoint's parts go. Returns the HEAD written. On error nothing that a
    /// reader of HEAD depends on has changed, and the same call may simply be made again.
    pub async fn publish(
        &mut self,
        bytes: Bytes,
        counts: CheckpointCounts,
        log: Option<LogCut>,
    ) -> Result<Head> {
        let prev = self.load().await?;
        let seq = prev.as_ref().map_or(1, |h| h.seq + 1);
        let mut parts = Vec::new();
        let mut at = 0usize;
        while at < bytes.len() || parts.is_empty() {
            let end = (at + BLOB_SIZE as usize).min(bytes.len());
            let part = bytes.slice(at..end);
            let key = ObjectKey::checkpoint_part(&self.fs, seq, parts.len() as u64);
            parts.push(PartRef {
                len: part.len() as u64,
                crc32c: crc32c::crc32c(&part),
            });
            self.store.put(&key, part).await?;
            at = end;
        }
        let head = Head {
            format: HEAD_FORMAT,
            fs_id: self.fs.to_string(),
            seq,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            checkpoint_version: cfs_meta::CHECKPOINT_VERSION,
            len: bytes.len() as u64,
            crc32c: crc32c::crc32c(&bytes),
            parts,
            counts,
            log_next: log.map(|l| l.next),
            op_seq: log.map_or(0, |l| l.op_seq),
            previous: prev.as_ref().map(|h| PreviousCheckpoint {
                seq: h.seq,
                parts: h.parts.len() as u64,
            }),
        };
        let body = serde_json::to_vec_pretty(&head).map_err(|e| TierError::Other {
            context: "encoding the checkpoint HEAD".into(),
            source: Box::new(e),
        })?;
        self.store
            .put(&ObjectKey::meta_head(&self.fs), Bytes::from(body))
            .await?;
        self.head = Some(Some(head.clone()));
        if let Some(p) = &prev {
            self.delete_parts(p.seq, p.parts.len() as u64).await;
        }
        if !self.latest_written {
            let latest = Latest {
                format: HEAD_FORMAT,
                fs_id: self.fs.to_string(),
            };
            let body = serde_json::to_vec_pretty(&latest).map_err(|e| TierError::Other {
                context: "encoding meta/LATEST".into(),
                source: Box::new(e),
            })?;
            // The checkpoint is published either way; a failed pointer is retried next time.
            match self
                .store
                .put(&ObjectKey::meta_latest(), Bytes::from(body))
                .await
            {
                Ok(()) => self.latest_written = true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write meta/LATEST; retrying at the next checkpoint")
                }
            }
        }
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::BlobKey;
    use std::sync::Arc;

    fn store() -> BlobStore {
        BlobStore::new(Arc::new(object_store::memory::InMemory::new()), "pre")
            .expect("store")
            .with_retry(crate::RetryPolicy {
                max_attempts: 2,
                base_delay: std::time::Duration::from_millis(1),
                max_delay: std::time::Duration::from_millis(1),
            })
    }

    fn counts() -> CheckpointCounts {
        CheckpointCounts {
            inodes: 3,
            ..CheckpointCounts::default()
        }
    }

    #[tokio::test]
    async fn publish_replaces_the_previous_checkpoint_and_reads_back() {
        let s = store();
        let fs = FsId::new("fs-1").expect("fs");
        assert_eq!(read_head(&s, &fs).await.expect("head"), None);
        assert_eq!(read_latest(&s).await.expect("latest"), None);

        let mut p = Publisher::new(s.clone(), fs.clone());
        let one = p
            .publish(Bytes::from_static(b"first checkpoint"), counts(), None)
            .await
            .expect("publish");
        assert_eq!((one.seq, one.parts.len(), one.previous), (1, 1, None));
        assert_eq!(read_head(&s, &fs).await.expect("head"), Some(one.clone()));
        let latest = read_latest(&s).await.expect("latest").expect("written");
        assert_eq!(latest.fs_id, "fs-1");

        // A new publisher (a new mount) continues the sequence and removes seq 1's part.
        let mut p = Publisher::new(s.clone(), fs.clone());
        let two = p
            .publish(Bytes::from_static(b"second"), counts(), None)
            .await
            .expect("publish");
        assert_eq!(two.seq, 2);
        assert_eq!(two.previous, Some(PreviousCheckpoint { seq: 1, parts: 1 }));
        let gone = s.get(&ObjectKey::checkpoint_part(&fs, 1, 0)).await;
        assert!(matches!(gone, Err(TierError::NotFound { .. })), "{gone:?}");
        let head = read_head(&s, &fs).await.expect("head").expect("some");
        let bytes = fetch_checkpoint(&s, &fs, &head, |_| {})
            .await
            .expect("fetch");
        assert_eq!(bytes, b"second");
    }

    #[tokio::test]
    async fn a_checkpoint_larger_than_a_blob_is_cut_into_parts() {
        let s = store();
        let fs = FsId::new("fs-2").expect("fs");
        let big: Vec<u8> = (0..BLOB_SIZE + 1000).map(|i| (i % 251) as u8).collect();
        let mut p = Publisher::new(s.clone(), fs.clone());
        let head = p
            .publish(Bytes::from(big.clone()), counts(), None)
            .await
            .expect("publish");
        assert_eq!(head.parts.len(), 2);
        assert_eq!(head.parts[0].len, BLOB_SIZE);
        assert_eq!(head.parts[1].len, 1000);
        let mut seen = 0;
        let back = fetch_checkpoint(&s, &fs, &head, |n| seen += n)
            .await
            .expect("fetch");
        assert!(back == big);
        assert_eq!(seen, big.len() as u64);

        // An empty checkpoint still has one (empty) part, so HEAD always names one.
        let head = p
            .publish(Bytes::new(), counts(), None)
            .await
            .expect("publish");
        assert_eq!(head.parts, vec![PartRef { len: 0, crc32c: 0 }]);
        for i in 0..2 {
            let old = s.get(&ObjectKey::checkpoint_part(&fs, 1, i)).await;
            assert!(matches!(old, Err(TierError::NotFound { .. })));
        }
    }

    #[tokio::test]
    async fn a_damaged_part_is_reported_as_corrupt() {
        let s = store();
        let fs = FsId::new("fs-3").expect("fs");
        let mut p = Publisher::new(s.clone(), fs.clone());
        let head = p
            .publish(Bytes::from_static(b"the real bytes"), counts(), None)
            .await
            .expect("publish");
        s.put(
            &ObjectKey::checkpoint_part(&fs, 1, 0),
            Bytes::from_static(b"the fake bytes"),
        )
        .await
        .expect("put");
        let err = fetch_checkpoint(&s, &fs, &head, |_| {})
            .await
            .expect_err("corrupt part accepted");
        assert!(matches!(err, TierError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("meta/ckpt/1/0"), "{err}");

        // A HEAD of another filesystem, or garbage, is refused with the key named.
        s.put(&ObjectKey::meta_head(&fs), Bytes::from_static(b"{not json"))
            .await
            .expect("put");
        let err = read_head(&s, &fs).await.expect_err("garbage HEAD accepted");
        assert!(err.to_string().contains("fs-3/meta/HEAD"), "{err}");
        // A publisher meeting a garbage HEAD starts over rather than never publishing.
        let mut p = Publisher::new(s.clone(), fs.clone());
        let head = p
            .publish(Bytes::from_static(b"again"), counts(), None)
            .await
            .expect("publish");
        assert_eq!(head.seq, 1);
    }

    /// The uploader publishes a checkpoint on its first pass, DELETEs an old generation
    /// only once a published checkpoint no longer names it, and its last pass publishes
    /// whatever changed since, whatever the interval.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploader_gates_deletes_on_published_checkpoints() {
        use crate::uploader::Uploader;
        use cfs_meta::{BlobRecord, MetaStore, Op};
        use std::os::unix::fs::FileExt;
        use std::time::{Duration, Instant};

        let dir = tempfile::tempdir().expect("tempdir");
        let (meta, flash, ino, file) = crate::tests::one_queued_file(dir.path(), b"version one");
        let s = store();
        let fs = FsId::new(meta.fs_id()).expect("fs id");

        let up = Uploader::new(Arc::clone(&meta), flash.clone(), s.clone(), 2)
            .expect("uploader")
            .with_checkpoints(Duration::from_secs(3600));
        let stats = up.stats();
        up.pass().await.expect("pass");
        let head = read_head(&s, &fs).await.expect("head").expect("published");
        assert_eq!((head.seq, head.counts.blobs), (1, 1));
        let gen1 = BlobKey::new(fs.clone(), ino, 0, 1).object_key();
        assert!(s.get(&gen1).await.is_ok());

        // A new generation: the old one stays until a checkpoint without it is published,
        // which the hour-long interval holds back.
        file.write_all_at(b"version two", 0).expect("write");
        meta.execute(&Op::MarkDirty { ino }).expect("dirty");
        up.pass().await.expect("pass");
        assert_eq!(
            meta.pending_deletes(10).expect("deletes"),
            vec![(ino, 0, 1)]
        );
        assert!(
            s.get(&gen1).await.is_ok(),
            "deleted before a checkpoint dropped it"
        );
        assert_eq!(
            read_head(&s, &fs).await.expect("head").expect("head").seq,
            1
        );

        // The last pass publishes at once (seq 2), deletes, and publishes again (seq 3) so
        // that the final HEAD lists no object that is gone.
        let report = up.finish(Instant::now() + Duration::from_secs(30)).await;
        assert_eq!(report.checkpoint_seq, Some(3), "{report:?}");
        assert!(report.checkpoint_current, "{report:?}");
        assert_eq!((report.objects_deleted, report.files_left), (1, 0));
        assert!(matches!(
            s.get(&gen1).await,
            Err(TierError::NotFound { .. })
        ));
        assert!(meta.pending_deletes(10).expect("deletes").is_empty());
        assert_eq!(
            stats
                .checkpoints_published
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );

        // The bucket alone gives back the metadata: blob 0 at generation 2.
        let head = read_head(&s, &fs).await.expect("head").expect("head");
        assert_eq!(head.counts.deletes, 0, "{head:?}");
        let bytes = fetch_checkpoint(&s, &fs, &head, |_| {})
            .await
            .expect("fetch");
        let (copy, _) =
            MetaStore::import_checkpoint(&dir.path().join("copy.redb"), &bytes).expect("import");
        let blobs: Vec<BlobRecord> = copy.blobs_of(ino).expect("blobs");
        assert_eq!(blobs.len(), 1);
        assert_eq!((blobs[0].generation, blobs[0].len), (2, 11));
        assert_eq!(blobs[0].crc32c, crc32c::crc32c(b"version two"));
    }
}
