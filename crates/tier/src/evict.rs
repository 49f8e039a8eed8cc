//! Eviction: keeping flash between its watermarks by dropping clean blobs.
//!
//! Only a blob the object store holds at the generation metadata records, of a file that is
//! not on the upload queue and not open, may leave flash. `Evict` marks it in metadata, the
//! mark is made durable, and only then is the hole punched, so a crash can never leave a
//! blob that reads as zeros while metadata thinks it is present. New opens of a file are held
//! off while its blobs are being evicted (see [`OpenFiles::while_closed`]).
//!
//! Order: files pinned with `user.cfs.tier=flash` never; files with `s3` as soon as they are
//! clean; the rest only above the high watermark, coldest file first (never opened in this
//! mount, then least recently opened), until usage is back under the low watermark.

use crate::key::BLOB_SIZE;
use cfs_flash::{FlashDir, FlashUsage};
use cfs_meta::{EvictCandidate, Ino, MetaStore, Op, Outcome, TIER_XATTR};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the evictor needs to know about open files, from the FUSE layer.
pub trait OpenFiles: Send + Sync {
    /// Runs `f` if no handle of `ino` is open, keeping new opens of it waiting meanwhile.
    /// Returns false (without running `f`) if the file is open.
    fn while_closed(&self, ino: Ino, f: &mut dyn FnMut()) -> bool;
    /// When `ino` was last opened or closed in this mount, if it was.
    fn last_used(&self, ino: Ino) -> Option<Instant>;
    /// Whether a handle of `ino` is open (or a truncation of it is running).
    fn is_open(&self, ino: Ino) -> bool;
    /// Blobs of `ino` were punched out of flash: its block count changed behind the kernel,
    /// which caches attributes for the attribute TTL.
    fn blocks_changed(&self, _ino: Ino) {}
}

/// The flash budget.
#[derive(Debug, Clone, Copy)]
pub struct EvictConfig {
    /// Cap on the bytes backing files may hold; `None` means the whole filesystem the flash
    /// directory is on (then usage is that filesystem's, whoever uses it).
    pub capacity: Option<u64>,
    pub high_pct: u8,
    pub low_pct: u8,
}

/// Flash usage and eviction counters, for `cfs status`.
#[derive(Debug, Default)]
pub struct EvictStats {
    pub flash_used: AtomicU64,
    pub flash_capacity: AtomicU64,
    pub blobs_evicted: AtomicU64,
    pub bytes_evicted: AtomicU64,
    pub errors: AtomicU64,
}

pub struct Evictor {
    meta: Arc<MetaStore>,
    flash: FlashDir,
    cfg: EvictConfig,
    open: Arc<dyn OpenFiles>,
    /// Files that just became clean or whose policy changed: checked for `s3` first.
    nominated: parking_lot::Mutex<Vec<Ino>>,
    wake: tokio::sync::Notify,
    /// Set while usage is above the high watermark: the uploader then flushes everything.
    pressure: Arc<AtomicBool>,
    stats: Arc<EvictStats>,
    /// Bytes the backing files hold, with a capped capacity (shared with `cfs status`).
    usage: Arc<FlashUsage>,
}

/// How often usage is measured when nothing wakes the evictor.
const IDLE_INTERVAL: Duration = Duration::from_secs(1);
/// How often every clean file is checked for an `s3` policy set after it was uploaded.
const POLICY_SWEEP: Duration = Duration::from_secs(30);

impl Evictor {
    pub fn new(
        meta: Arc<MetaStore>,
        flash: FlashDir,
        cfg: EvictConfig,
        open: Arc<dyn OpenFiles>,
    ) -> Arc<Evictor> {
        Arc::new(Evictor {
            meta,
            usage: Arc::new(FlashUsage::new(flash.clone())),
            flash,
            cfg,
            open,
            nominated: Default::default(),
            wake: tokio::sync::Notify::new(),
            pressure: Arc::default(),
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> Arc<EvictStats> {
        Arc::clone(&self.stats)
    }

    /// Set while flash is past its high watermark.
    pub fn pressure(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.pressure)
    }

    /// Asks for `ino` to be looked at soon: it became clean, or its policy changed.
    pub fn nominate(&self, ino: Ino) {
        self.nominated.lock().push(ino);
        self.wake.notify_one();
    }

    /// Wakes the evictor to measure usage now (a writer found flash full).
    pub fn kick(&self) {
        self.usage.rescan();
        self.wake.notify_one();
    }

    /// The gauge of the bytes the backing files hold, for `cfs status` to share: one scan
    /// serves both.
    pub fn flash_usage(&self) -> Arc<FlashUsage> {
        Arc::clone(&self.usage)
    }

    /// Bytes used and the capacity they count against. With a capped capacity that is the
    /// sum of the backing files' allocated bytes, from a scan no older than its spacing
    /// allows (see [`FlashUsage`]).
    pub fn usage(&self) -> std::io::Result<(u64, u64)> {
        match self.cfg.capacity {
            Some(cap) => Ok((self.usage.used()?, cap)),
            None => {
                let c = self.flash.capacity()?;
                let total = c.blocks * c.block_size;
                Ok((total - c.blocks_free.min(c.blocks) * c.block_size, total))
            }
        }
    }

    /// Runs until the process ends, on a blocking thread (it scans and punches files).
    pub fn run(self: Arc<Self>, runtime: tokio::runtime::Handle) {
        let mut last_sweep = Instant::now();
        loop {
            let sweep = last_sweep.elapsed() >= POLICY_SWEEP;
            if sweep {
                last_sweep = Instant::now();
            }
            self.pass(sweep);
            let this = Arc::clone(&self);
            runtime.block_on(async move {
                tokio::select! {
                    _ = this.wake.notified() => {}
                    _ = tokio::time::sleep(IDLE_INTERVAL) => {}
                }
            });
        }
    }

    /// One round: nominated files, then the watermarks. `sweep` also checks every clean file
    /// for an `s3` policy.
    pub fn pass(&self, sweep: bool) {
        let mut nominated: Vec<Ino> = std::mem::take(&mut *self.nominated.lock());
        nominated.sort_unstable();
        nominated.dedup();
        // Only files pinned to the store leave flash as soon as they are clean; the rest
        // wait for pressure. Every file that finishes uploading is nominated, so checking
        // the policy first keeps a stream of small uploads from costing a pass each.
        nominated.retain(|&ino| self.policy(ino) == Policy::S3);
        let (used, cap) = match self.usage() {
            Ok(u) => u,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot measure flash usage");
                return;
            }
        };
        // Before anything this pass punches: a scan begun later may already miss those bytes.
        let read_at = Instant::now();
        self.stats.flash_used.store(used, Ordering::Relaxed);
        self.stats.flash_capacity.store(cap, Ordering::Relaxed);
        let high = cap / 100 * u64::from(self.cfg.high_pct);
        let low = cap / 100 * u64::from(self.cfg.low_pct);
        let over = used > high;
        self.pressure.store(over, Ordering::Relaxed);
        if !over && !sweep && nominated.is_empty() {
            return;
        }
        // A whole scan of the blob map only under pressure or for the periodic sweep.
        let listed = if over || sweep {
            self.meta.evict_candidates()
        } else {
            self.meta.evict_candidates_of(&nominated)
        };
        let candidates = match listed {
            Ok(c) => c,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot list eviction candidates");
                return;
            }
        };
        let mut by_file: BTreeMap<Ino, Vec<EvictCandidate>> = BTreeMap::new();
        for c in candidates {
            by_file.entry(c.ino).or_default().push(c);
        }
        // Pushed out by policy, whatever the usage.
        let mut freed = 0u64;
        let pushed: Vec<Ino> = by_file
            .keys()
            .copied()
            .filter(|ino| (sweep || nominated.contains(ino)) && self.policy(*ino) == Policy::S3)
            .collect();
        for ino in pushed {
            if let Some(blobs) = by_file.remove(&ino) {
                freed += self.evict_file(ino, &blobs);
            }
        }
        if !over {
            self.usage.freed(freed, read_at);
            return;
        }
        // Coldest first: never used in this mount, then least recently used.
        let mut order: Vec<(Option<Instant>, Ino)> = by_file
            .keys()
            .map(|&ino| (self.open.last_used(ino), ino))
            .collect();
        order.sort();
        let mut used_now = used.saturating_sub(freed);
        for (_, ino) in order {
            if used_now <= low {
                break;
            }
            if self.policy(ino) == Policy::Flash {
                continue;
            }
            if let Some(blobs) = by_file.get(&ino) {
                used_now = used_now.saturating_sub(self.evict_file(ino, blobs));
            }
        }
        // Off the last scan's figure, so the next pass does not count them until it rescans.
        self.usage.freed(used.saturating_sub(used_now), read_at);
        if used_now > high {
            tracing::debug!(
                used = used_now,
                capacity = cap,
                "flash still past the high watermark: the rest is dirty, open or pinned"
            );
        }
    }

    fn policy(&self, ino: Ino) -> Policy {
        match self.meta.xattr(ino, TIER_XATTR) {
            Ok(v) if v == b"flash" => Policy::Flash,
            Ok(v) if v == b"s3" => Policy::S3,
            _ => Policy::Auto,
        }
    }

    /// Evicts `blobs` of `ino` if it is not open; returns the bytes freed on flash.
    fn evict_file(&self, ino: Ino, blobs: &[EvictCandidate]) -> u64 {
        let mut freed = 0u64;
        let mut evicted = 0u64;
        let mut failed = None;
        let ran = self.open.while_closed(ino, &mut || {
            let op = Op::Evict {
                ino,
                blobs: blobs.iter().map(|b| (b.k, b.generation)).collect(),
            };
            let marked = match self.meta.execute(&op) {
                Ok(Outcome::Evicted(ks)) => ks,
                Ok(_) => Vec::new(),
                Err(e) => {
                    failed = Some(e.to_string());
                    return;
                }
            };
            if marked.is_empty() {
                return;
            }
            // The mark must be on disk before the data leaves flash.
            if let Err(e) = self.meta.sync() {
                failed = Some(e.to_string());
                return;
            }
            for k in marked {
                let len = blobs.iter().find(|b| b.k == k).map_or(0, |b| b.len);
                let start = k * BLOB_SIZE;
                match self.flash.punch(ino, start..start + len) {
                    Ok(n) => {
                        freed += n;
                        evicted += 1;
                    }
                    // Marked but still on flash: a later read re-fetches it, no harm.
                    Err(e) => failed = Some(e.to_string()),
                }
            }
        });
        if let Some(e) = failed {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(ino, error = %e, "eviction failed");
        }
        if ran && evicted > 0 {
            self.open.blocks_changed(ino);
            self.stats
                .blobs_evicted
                .fetch_add(evicted, Ordering::Relaxed);
            self.stats.bytes_evicted.fetch_add(freed, Ordering::Relaxed);
            tracing::debug!(ino, blobs = evicted, bytes = freed, "evicted");
        }
        freed
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Flash,
    S3,
    Auto,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoneOpen;

    impl OpenFiles for NoneOpen {
        fn while_closed(&self, _ino: Ino, f: &mut dyn FnMut()) -> bool {
            f();
            true
        }
        fn last_used(&self, _ino: Ino) -> Option<Instant> {
            None
        }
        fn is_open(&self, _ino: Ino) -> bool {
            false
        }
    }

    /// Usage comes from a scan that is reused until its spacing has passed, and a writer
    /// that finds flash full (`kick`) forces a fresh one.
    #[test]
    fn usage_scans_are_spaced_and_a_kick_forces_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (meta, _) = MetaStore::open(
            &dir.path().join("meta.redb"),
            cfs_meta::Timestamp::now(),
            0,
            0,
        )
        .expect("meta");
        let flash = FlashDir::open(&dir.path().join("flash")).expect("flash");
        let cfg = EvictConfig {
            capacity: Some(1 << 30),
            high_pct: 80,
            low_pct: 60,
        };
        let evictor = Evictor::new(Arc::new(meta), flash.clone(), cfg, Arc::new(NoneOpen));
        let (before, cap) = evictor.usage().expect("usage");
        assert_eq!((before, cap), (0, 1 << 30));
        let f = flash.create(7).expect("backing file");
        std::io::Write::write_all(&mut &f, &[1u8; 1 << 20]).expect("write");
        f.sync_all().expect("sync");
        assert_eq!(
            evictor.usage().expect("usage").0,
            0,
            "the last scan is reused"
        );
        evictor.kick();
        let (after, _) = evictor.usage().expect("usage");
        assert!(after >= 1 << 20, "a kick rescans");
        assert_eq!(
            evictor.flash_usage().used().expect("usage"),
            after,
            "cfs status is handed the evictor's own figure"
        );
    }
}
