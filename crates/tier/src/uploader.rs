//! The Uploader: moves changed blobs from flash to the object store, asynchronously.
//!
//! A file lands on the persistent upload queue (`MarkDirty`) when its data changed on flash.
//! Each pass reads the queued files blob by blob, checksums each 64 MiB blob, and PUTs only
//! the blobs whose checksum differs from the generation the store holds, under a new
//! generation's key. `CommitBlobs` then records the new generations in one transaction that
//! also queues the replaced generations for deletion; only after that commit are old objects
//! DELETEd. A crash at any point leaves either the old generation committed (the new object
//! is an unreferenced orphan under a key no one will reuse) or the new one.
//!
//! A writer may still have the file open while it is read: if the backing file's size or
//! mtime moved during the pass, the blobs read are committed (they were real data) but the
//! file stays on the queue for another pass.

use crate::key::{BLOB_SIZE, BlobKey, FsId, blob_count, blob_range};
use crate::{BlobStore, Result, TierError};
use bytes::Bytes;
use cfs_flash::FlashDir;
use cfs_meta::{BlobRecord, Ino, MetaStore, Op};
use futures::StreamExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Counters of the uploader's work since the mount started, for `cfs status`.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub blobs_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub objects_deleted: AtomicU64,
    pub errors: AtomicU64,
    pub files_in_flight: AtomicU64,
    /// Unix seconds of the last pass that found nothing left to do (0: never).
    pub last_idle: AtomicU64,
    /// Unix seconds at which the oldest file still on the upload queue was first seen there
    /// by this mount (0: queue empty).
    pub oldest_dirty_since: AtomicU64,
    /// Files the tiered mode left on flash in the last pass because they are younger than
    /// the flush age.
    pub files_held: AtomicU64,
}

/// When queued files are uploaded.
#[derive(Clone, Debug, Default)]
pub struct FlushPolicy {
    /// Tiered mode: hold a file on flash until it has been queued for `flush_age`, unless
    /// `pressure` is set (flash is past its high watermark) or its policy says `s3`.
    pub tiered: bool,
    pub flush_age: Duration,
    pub pressure: Arc<std::sync::atomic::AtomicBool>,
}

/// Called with each file whose upload left it clean (all of it in the store).
pub type CleanHook = Arc<dyn Fn(Ino) + Send + Sync>;

/// Wakes the uploader; cheap to clone and call from the FUSE threads.
#[derive(Clone, Debug, Default)]
pub struct UploadKick(Arc<Notify>);

impl UploadKick {
    pub fn kick(&self) {
        self.0.notify_one();
    }
}

pub struct Uploader {
    meta: Arc<MetaStore>,
    flash: FlashDir,
    store: BlobStore,
    fs: FsId,
    concurrency: usize,
    kick: UploadKick,
    stats: Arc<UploadStats>,
    policy: FlushPolicy,
    on_clean: Option<CleanHook>,
    /// When this mount first saw each queued file, for the flush age and `cfs status`.
    first_seen: parking_lot::Mutex<std::collections::HashMap<Ino, (Instant, u64)>>,
}

/// Identity of a backing file's contents at one moment: if it is the same before and after
/// reading, no write happened in between.
fn data_version(md: &std::fs::Metadata) -> (u64, i64, i64) {
    (md.len(), md.mtime(), md.mtime_nsec())
}

impl Uploader {
    pub fn new(
        meta: Arc<MetaStore>,
        flash: FlashDir,
        store: BlobStore,
        concurrency: usize,
    ) -> Result<Uploader> {
        let fs = FsId::new(meta.fs_id())?;
        Ok(Uploader {
            meta,
            flash,
            store,
            fs,
            concurrency: concurrency.max(1),
            kick: UploadKick::default(),
            stats: Arc::new(UploadStats::default()),
            policy: FlushPolicy::default(),
            on_clean: None,
            first_seen: Default::default(),
        })
    }

    pub fn with_policy(mut self, policy: FlushPolicy) -> Uploader {
        self.policy = policy;
        self
    }

    /// Registers `hook`, called with each file an upload left clean (the evictor's cue).
    pub fn on_clean(mut self, hook: CleanHook) -> Uploader {
        self.on_clean = Some(hook);
        self
    }

    /// Of the queued files, those to upload now: all of them in cache mode; in tiered mode
    /// the ones queued for longer than the flush age, pinned to `s3`, or all under pressure.
    fn select(&self, dirty: Vec<Ino>) -> Vec<Ino> {
        let now = Instant::now();
        let unix_now = unix_secs();
        let mut seen = self.first_seen.lock();
        seen.retain(|ino, _| dirty.contains(ino));
        for &ino in &dirty {
            seen.entry(ino).or_insert((now, unix_now));
        }
        let oldest = seen.values().map(|&(_, u)| u).min().unwrap_or(0);
        self.stats
            .oldest_dirty_since
            .store(oldest, Ordering::Relaxed);
        if !self.policy.tiered || self.policy.pressure.load(Ordering::Relaxed) {
            self.stats.files_held.store(0, Ordering::Relaxed);
            return dirty;
        }
        let (now_due, held): (Vec<Ino>, Vec<Ino>) = dirty.into_iter().partition(|ino| {
            let aged = seen
                .get(ino)
                .is_some_and(|(t, _)| now.duration_since(*t) >= self.policy.flush_age);
            aged || self.tier_policy(*ino).as_deref() == Some("s3")
        });
        self.stats
            .files_held
            .store(held.len() as u64, Ordering::Relaxed);
        now_due
    }

    fn tier_policy(&self, ino: Ino) -> Option<String> {
        self.meta
            .xattr(ino, cfs_meta::TIER_XATTR)
            .ok()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    pub fn kick_handle(&self) -> UploadKick {
        self.kick.clone()
    }

    pub fn stats(&self) -> Arc<UploadStats> {
        Arc::clone(&self.stats)
    }

    /// Runs passes until the process ends: at once when kicked, else every `interval`.
    pub async fn run(self, interval: Duration) {
        loop {
            if let Err(e) = self.pass().await {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "upload pass failed; retrying later");
            }
            tokio::select! {
                _ = self.kick.0.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One pass: uploads every queued file, then deletes every retired object. Returns true
    /// when nothing was left to do at the end.
    pub async fn pass(&self) -> Result<bool> {
        let dirty = self.select(self.meta.dirty_files(1024).map_err(meta_err)?);
        let results: Vec<Result<()>> = futures::stream::iter(dirty.iter().copied())
            .map(|ino| self.flush_file(ino))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        for r in results {
            if let Err(e) = r {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "upload failed; the file stays queued");
            }
        }
        self.drain_deletes().await?;
        let idle = self.meta.dirty_files(1).map_err(meta_err)?.is_empty()
            && self.meta.pending_deletes(1).map_err(meta_err)?.is_empty();
        if idle {
            self.stats.last_idle.store(unix_secs(), Ordering::Relaxed);
        }
        Ok(idle)
    }

    async fn flush_file(&self, ino: Ino) -> Result<()> {
        self.stats.files_in_flight.fetch_add(1, Ordering::Relaxed);
        let r = self.flush_file_inner(ino).await;
        self.stats.files_in_flight.fetch_sub(1, Ordering::Relaxed);
        r
    }

    async fn flush_file_inner(&self, ino: Ino) -> Result<()> {
        let started = Instant::now();
        let file = match self.flash.open_rw(ino) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Purged meanwhile: commit nothing; Purge already took it off the queue.
                return Ok(());
            }
            Err(e) => return Err(io_err(e)),
        };
        let before = data_version(&file.metadata().map_err(io_err)?);
        let size = before.0;
        let recorded = self.meta.blobs_of(ino).map_err(meta_err)?;
        // Evicted blobs are not on flash, and did not change: a write to one hydrates it
        // first, which takes it off this list.
        let evicted = self.meta.evicted_of(ino).map_err(meta_err)?;
        let mut uploaded = Vec::new();
        for k in 0..blob_count(size) {
            if evicted.iter().any(|&(e, _)| e == k) {
                continue;
            }
            let range = blob_range(k, size);
            let data = read_blob(Arc::clone(&file), range.clone()).await?;
            let crc = crc32c::crc32c(&data);
            let current = recorded.iter().find(|b| b.k == k);
            if current.is_some_and(|b| b.len == data.len() as u64 && b.crc32c == crc) {
                continue;
            }
            let generation = current.map_or(1, |b| b.generation + 1);
            let key = BlobKey::new(self.fs.clone(), ino, k, generation).object_key();
            let len = data.len() as u64;
            self.store.put(&key, data).await?;
            self.stats.blobs_uploaded.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes_uploaded.fetch_add(len, Ordering::Relaxed);
            uploaded.push(BlobRecord {
                k,
                generation,
                len,
                crc32c: crc,
            });
        }
        let after = data_version(&file.metadata().map_err(io_err)?);
        let clean = before == after;
        self.meta
            .execute(&Op::CommitBlobs {
                ino,
                blobs: uploaded.clone(),
                blob_count: blob_count(size),
                clean,
            })
            .map_err(meta_err)?;
        tracing::debug!(ino, blobs = uploaded.len(), clean, elapsed = ?started.elapsed(), "file flushed");
        if clean {
            self.first_seen.lock().remove(&ino);
            if let Some(hook) = &self.on_clean {
                hook(ino);
            }
        }
        Ok(())
    }

    /// DELETEs retired generations, then drops them from the queue. Deleting a missing key
    /// succeeds, so a DELETE redone after a crash is harmless.
    async fn drain_deletes(&self) -> Result<()> {
        loop {
            let batch = self.meta.pending_deletes(256).map_err(meta_err)?;
            if batch.is_empty() {
                return Ok(());
            }
            let results: Vec<(Ino, u64, u64, Result<()>)> =
                futures::stream::iter(batch.iter().copied())
                    .map(|(ino, k, generation)| async move {
                        let key = BlobKey::new(self.fs.clone(), ino, k, generation).object_key();
                        (ino, k, generation, self.store.delete(&key).await)
                    })
                    .buffer_unordered(self.concurrency * 4)
                    .collect()
                    .await;
            let mut done = Vec::new();
            let mut first_error = None;
            for (ino, k, generation, r) in results {
                match r {
                    Ok(()) => done.push((ino, k, generation)),
                    Err(e) => first_error = first_error.or(Some(e)),
                }
            }
            self.stats
                .objects_deleted
                .fetch_add(done.len() as u64, Ordering::Relaxed);
            self.meta
                .execute(&Op::BlobsDeleted { blobs: done })
                .map_err(meta_err)?;
            if let Some(e) = first_error {
                return Err(e);
            }
        }
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads one blob's bytes off flash on a blocking thread.
async fn read_blob(file: Arc<std::fs::File>, range: std::ops::Range<u64>) -> Result<Bytes> {
    debug_assert!(range.end - range.start <= BLOB_SIZE);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read_at(&mut buf[filled..], range.start + filled as u64)?;
            if n == 0 {
                // The file shrank while we read: upload what is there; the size check after
                // the pass keeps the file queued.
                buf.truncate(filled);
                break;
            }
            filled += n;
        }
        Ok::<_, std::io::Error>(Bytes::from(buf))
    })
    .await
    .map_err(|e| TierError::Other {
        context: "blob read task".into(),
        source: Box::new(e),
    })?
    .map_err(io_err)
}

fn meta_err(e: cfs_meta::MetaError) -> TierError {
    TierError::Other {
        context: "metadata".into(),
        source: Box::new(e),
    }
}

fn io_err(e: std::io::Error) -> TierError {
    TierError::Other {
        context: "flash".into(),
        source: Box::new(e),
    }
}
