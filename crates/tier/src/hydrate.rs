//! Re-hydration: bringing an evicted blob back from the object store onto flash.
//!
//! A read (or write) that touches an evicted blob waits for exactly that blob: one GET of its
//! object, checked against the length and crc32c recorded in metadata, written at its true
//! offset in the backing file and synced, then recorded with `Hydrated`. The order matters:
//! were `Hydrated` durable before the bytes, a crash could leave a blob marked present that
//! reads as zeros; the other way round, a crash only costs a second download.
//!
//! A corrupt or short object is never written: the caller gets an error (`EIO` to the
//! application), the log says which key, and the `corrupt` counter goes up.

use crate::key::{BLOB_SIZE, BlobKey, FsId};
use crate::{BlobStore, Result, TierError};
use cfs_flash::FlashDir;
use cfs_meta::{Ino, MetaStore, Op};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counters of re-hydration since the mount started, for `cfs status`.
#[derive(Debug, Default)]
pub struct HydrateStats {
    pub blobs_hydrated: AtomicU64,
    pub bytes_hydrated: AtomicU64,
    pub prefetches: AtomicU64,
    /// GETs whose body did not match the recorded length or checksum.
    pub corrupt: AtomicU64,
    pub errors: AtomicU64,
}

/// Per blob being fetched, the lock its concurrent readers wait on.
type InFlight = parking_lot::Mutex<HashMap<(Ino, u64), Arc<tokio::sync::Mutex<()>>>>;

pub struct Hydrator {
    meta: Arc<MetaStore>,
    flash: FlashDir,
    store: BlobStore,
    fs: FsId,
    runtime: tokio::runtime::Handle,
    /// One lock per blob being fetched, so that concurrent readers of one blob share a GET.
    inflight: InFlight,
    stats: Arc<HydrateStats>,
}

impl Hydrator {
    pub fn new(
        meta: Arc<MetaStore>,
        flash: FlashDir,
        store: BlobStore,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<Hydrator>> {
        let fs = FsId::new(meta.fs_id())?;
        Ok(Arc::new(Hydrator {
            meta,
            flash,
            store,
            fs,
            runtime,
            inflight: Default::default(),
            stats: Arc::default(),
        }))
    }

    pub fn stats(&self) -> Arc<HydrateStats> {
        Arc::clone(&self.stats)
    }

    /// Brings blob `k` of `ino` back on flash, blocking the calling (non-async) thread until
    /// it is there. Returns at once if the blob is present.
    pub fn hydrate_blocking(self: &Arc<Self>, ino: Ino, k: u64) -> Result<()> {
        let this = Arc::clone(self);
        self.runtime
            .block_on(async move { this.hydrate(ino, k).await })
    }

    /// Starts bringing blob `k` back in the background, if it is evicted; for sequential
    /// readers, so that the next blob is on flash by the time they reach it.
    pub fn prefetch(self: &Arc<Self>, ino: Ino, k: u64) {
        let evicted = matches!(self.meta.evicted_of(ino), Ok(v) if v.iter().any(|&(e, _)| e == k));
        if !evicted {
            return;
        }
        self.stats.prefetches.fetch_add(1, Ordering::Relaxed);
        let this = Arc::clone(self);
        self.runtime.spawn(async move {
            if let Err(e) = this.hydrate(ino, k).await {
                tracing::debug!(ino, k, error = %e, "prefetch failed; the read will retry");
            }
        });
    }

    pub async fn hydrate(self: Arc<Self>, ino: Ino, k: u64) -> Result<()> {
        let lock = {
            let mut map = self.inflight.lock();
            Arc::clone(map.entry((ino, k)).or_default())
        };
        let result = {
            let _held = lock.lock().await;
            self.hydrate_locked(ino, k).await
        };
        {
            let mut map = self.inflight.lock();
            if map
                .get(&(ino, k))
                .is_some_and(|l| Arc::strong_count(l) <= 2)
            {
                map.remove(&(ino, k));
            }
        }
        if result.is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn hydrate_locked(&self, ino: Ino, k: u64) -> Result<()> {
        let Some(generation) = self
            .meta
            .evicted_of(ino)
            .map_err(meta_err)?
            .into_iter()
            .find_map(|(e, g)| (e == k).then_some(g))
        else {
            return Ok(());
        };
        let record = self
            .meta
            .blobs_of(ino)
            .map_err(meta_err)?
            .into_iter()
            .find(|b| b.k == k && b.generation == generation)
            .ok_or_else(|| {
                TierError::Invalid(format!(
                    "blob {k} of inode {ino} is marked evicted at generation {generation}, \
                     which metadata does not record"
                ))
            })?;
        let key = BlobKey::new(self.fs.clone(), ino, k, generation).object_key();
        let started = Instant::now();
        let data = match self
            .store
            .get_verified(&key, record.len, record.crc32c)
            .await
        {
            Ok(d) => d,
            Err(e @ TierError::Corrupt { .. }) => {
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::error!(ino, k, key = %key, error = %e, "corrupt object in the store: the read fails with EIO");
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let flash = self.flash.clone();
        let offset = k * BLOB_SIZE;
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            // Never grow the file: a truncation may have cut this blob after it was evicted.
            let size = flash.metadata(ino)?.len();
            let n = (data.len() as u64).min(size.saturating_sub(offset));
            if n > 0 {
                flash.fill(ino, offset, &data[..n as usize])?;
            }
            Ok(n)
        })
        .await
        .map_err(|e| TierError::Other {
            context: "hydration task".into(),
            source: Box::new(e),
        })?
        .map_err(|e| TierError::Other {
            context: format!("writing blob {k} of inode {ino} to flash"),
            source: Box::new(e),
        })?;
        self.meta
            .execute(&Op::Hydrated { ino, k, generation })
            .map_err(meta_err)?;
        self.stats.blobs_hydrated.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_hydrated
            .fetch_add(written, Ordering::Relaxed);
        tracing::debug!(ino, k, bytes = written, elapsed = ?started.elapsed(), "blob hydrated");
        Ok(())
    }
}

fn meta_err(e: cfs_meta::MetaError) -> TierError {
    TierError::Other {
        context: "metadata".into(),
        source: Box::new(e),
    }
}
