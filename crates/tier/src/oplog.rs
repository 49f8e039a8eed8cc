//! The operation log in the object store: shipped every second, read back by repair.
//!
//! A checkpoint is published at most once per `--checkpoint-interval`; between two of them
//! the log is what keeps the bucket current. [`LogShipper`] PUTs the operations this node
//! made durable, in segments named by their first operation (`<fs-id>/meta/log/<first>`),
//! so that a reader follows the chain from the HEAD's `log_next` with GETs alone. Segments
//! that a published checkpoint covers are DELETEd ([`drop_segments_before`]).
//!
//! The segment encoding and the ordering rules (dense numbers, only durable operations) are
//! `cfs_meta`'s; see its `oplog` module.

use crate::error::blocking_meta;
use crate::key::{FsId, ObjectKey};
use crate::{BlobStore, Result, TierError};
use bytes::Bytes;
use cfs_meta::{MetaStore, Op};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// At most this many operations, or this many bytes, in one segment.
const SEGMENT_OPS: usize = 16_384;
const SEGMENT_BYTES: usize = 4 << 20;

/// What the shipper did, for `cfs status`.
#[derive(Debug, Default)]
pub struct LogStats {
    pub segments_shipped: AtomicU64,
    pub ops_shipped: AtomicU64,
    pub segments_deleted: AtomicU64,
    pub errors: AtomicU64,
    /// Unix seconds of the last pass that left nothing durable unshipped (0: none yet).
    pub caught_up_unix: AtomicU64,
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Ships one filesystem's operation log.
pub struct LogShipper {
    meta: Arc<MetaStore>,
    store: BlobStore,
    fs: FsId,
    stats: Arc<LogStats>,
    /// The last pass failed: log the next failure quietly and the recovery loudly.
    failing: AtomicBool,
}

impl LogShipper {
    pub fn new(meta: Arc<MetaStore>, store: BlobStore, fs: FsId) -> LogShipper {
        LogShipper {
            meta,
            store,
            fs,
            stats: Arc::default(),
            failing: AtomicBool::new(false),
        }
    }

    pub fn stats(&self) -> Arc<LogStats> {
        Arc::clone(&self.stats)
    }

    /// Makes what was applied durable, then PUTs every durable operation not yet shipped.
    /// Returns how many operations went up. On error the unshipped rest stays in the log
    /// and the next call starts again from it.
    pub async fn ship(&self) -> Result<u64> {
        if self.meta.has_unsynced_changes() {
            let meta = Arc::clone(&self.meta);
            blocking_meta(move || meta.sync()).await?;
        }
        let upto = self.meta.log_durable_seq();
        let mut shipped = 0;
        loop {
            let meta = Arc::clone(&self.meta);
            let batch =
                blocking_meta(move || meta.log_pending(upto, SEGMENT_OPS, SEGMENT_BYTES)).await?;
            let (Some(&(first, _)), Some(&(last, _))) = (batch.first(), batch.last()) else {
                break;
            };
            let body = cfs_meta::encode_log_segment(&batch);
            let key = ObjectKey::log_segment(&self.fs, first);
            self.store.put(&key, Bytes::from(body)).await?;
            let meta = Arc::clone(&self.meta);
            blocking_meta(move || meta.log_shipped(first, last)).await?;
            let n = last - first + 1;
            shipped += n;
            self.stats.segments_shipped.fetch_add(1, Ordering::Relaxed);
            self.stats.ops_shipped.fetch_add(n, Ordering::Relaxed);
            tracing::trace!(key = %key, ops = n, "operation log segment shipped");
        }
        self.stats
            .caught_up_unix
            .store(unix_secs(), Ordering::Relaxed);
        Ok(shipped)
    }

    /// Ships every `interval` until the process ends.
    pub async fn run(self, interval: Duration) {
        loop {
            match self.ship().await {
                Ok(_) => {
                    if self.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("operation log shipping resumed");
                    }
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "cannot ship the operation log; it stays queued and is retried every {interval:?}");
                    } else {
                        tracing::debug!(error = %e, "operation log shipping still failing");
                    }
                }
            }
            tokio::time::sleep(interval).await;
        }
    }
}

/// DELETEs the shipped segments that end before operation `next`, where the replay of a
/// newly published checkpoint starts. Failures are logged and retried after the next
/// checkpoint. Returns how many went.
pub async fn drop_segments_before(
    store: &BlobStore,
    fs: &FsId,
    meta: &Arc<MetaStore>,
    next: u64,
) -> u64 {
    let m = Arc::clone(meta);
    let old = match blocking_meta(move || m.log_segments_before(next)).await {
        Ok(old) => old,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the shipped log segments");
            return 0;
        }
    };
    let mut gone = Vec::new();
    for (first, _) in old {
        let key = ObjectKey::log_segment(fs, first);
        match store.delete(&key).await {
            Ok(()) => gone.push(first),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "cannot delete an old log segment");
                break;
            }
        }
    }
    let n = gone.len() as u64;
    if n > 0 {
        let m = Arc::clone(meta);
        if let Err(e) = blocking_meta(move || m.forget_log_segments(&gone)).await {
            tracing::warn!(error = %e, "cannot record the deleted log segments");
        }
    }
    n
}

/// The operations after a checkpoint that holds everything up to `op_seq`, read from the
/// segment that starts at `next` and each one it leads to, until one is missing (the log's
/// end). `progress` gets the operations of each segment as it arrives. A damaged segment
/// is an error: the filesystem it describes is not knowable past it.
pub async fn fetch_log(
    store: &BlobStore,
    fs: &FsId,
    mut next: u64,
    op_seq: u64,
    mut progress: impl FnMut(u64),
) -> Result<Vec<(u64, Op)>> {
    let mut out: Vec<(u64, Op)> = Vec::new();
    loop {
        let key = ObjectKey::log_segment(fs, next);
        let body = match store.get(&key).await {
            Ok(b) => b,
            Err(TierError::NotFound { .. }) => return Ok(out),
            Err(e) => return Err(e),
        };
        let seg = cfs_meta::decode_log_segment(&body).map_err(|e| TierError::Other {
            context: format!("{key} is not a valid operation log segment"),
            source: Box::new(e),
        })?;
        if seg.first != next {
            return Err(TierError::Other {
                context: format!("{key} starts at operation {}", seg.first),
                source: "a segment must start at the operation its key names".into(),
            });
        }
        progress(seg.ops.len() as u64);
        next = seg.last() + 1;
        let first = seg.first;
        out.extend(
            seg.ops
                .into_iter()
                .enumerate()
                .map(|(i, op)| (first + i as u64, op))
                .filter(|(seq, _)| *seq > op_seq),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfs_meta::{Caller, FileKind, Timestamp};

    fn mkdir(meta: &MetaStore, name: &str) {
        meta.execute(&Op::Create {
            parent: cfs_meta::ROOT_INO,
            name: name.as_bytes().to_vec(),
            ino: meta.alloc_ino(),
            kind: FileKind::Dir,
            perm: 0o755,
            umask: 0,
            rdev: 0,
            target: Vec::new(),
            caller: Caller::default(),
            now: Timestamp::now(),
        })
        .expect("mkdir");
    }

    /// Shipped segments chain from the first operation on; a checkpoint lets the ones
    /// before its cut go, and the log read from its `log_next` is exactly what followed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shipped_log_reads_back_and_old_segments_go_after_a_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (meta, _) =
            MetaStore::open(&dir.path().join("meta.redb"), Timestamp::now(), 0, 0).expect("meta");
        let meta = Arc::new(meta);
        let mem = Arc::new(object_store::memory::InMemory::new());
        let store = BlobStore::new(mem, "pre").expect("store");
        let fs = FsId::new(meta.fs_id()).expect("fs id");
        let shipper = LogShipper::new(Arc::clone(&meta), store.clone(), fs.clone());

        for i in 0..5 {
            mkdir(&meta, &format!("early-{i}"));
        }
        assert_eq!(shipper.ship().await.expect("ship"), 5);
        assert_eq!(shipper.ship().await.expect("ship again"), 0);
        let all = fetch_log(&store, &fs, 1, 0, |_| {}).await.expect("fetch");
        assert_eq!(
            all.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );

        let ckpt = meta.export_checkpoint().expect("export");
        assert_eq!((ckpt.op_seq, ckpt.log_next), (5, 6));
        for i in 0..3 {
            mkdir(&meta, &format!("late-{i}"));
        }
        assert_eq!(shipper.ship().await.expect("ship"), 3);
        assert_eq!(
            drop_segments_before(&store, &fs, &meta, ckpt.log_next).await,
            1,
            "the first segment is covered by the checkpoint"
        );
        assert!(
            fetch_log(&store, &fs, 1, 0, |_| {})
                .await
                .expect("fetch")
                .is_empty()
        );
        let mut seen = 0;
        let after = fetch_log(&store, &fs, ckpt.log_next, ckpt.op_seq, |n| seen += n)
            .await
            .expect("fetch after");
        assert_eq!(after.iter().map(|e| e.0).collect::<Vec<_>>(), vec![6, 7, 8]);
        assert_eq!(seen, 3);
        let s = shipper.stats();
        assert_eq!(s.ops_shipped.load(Ordering::Relaxed), 8);
        assert_eq!(s.segments_shipped.load(Ordering::Relaxed), 2);

        // A damaged segment is an error, not a shorter log.
        let key = ObjectKey::log_segment(&fs, 6);
        let mut body = store.get(&key).await.expect("get").to_vec();
        body[30] ^= 0xff;
        store.put(&key, Bytes::from(body)).await.expect("put");
        let err = fetch_log(&store, &fs, 6, 5, |_| {})
            .await
            .expect_err("damage accepted");
        assert!(err.to_string().contains("meta/log/"), "{err}");
    }
}
