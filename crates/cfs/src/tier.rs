//! Wiring the object tier into a mount. The uploader, the evictor and re-hydration share one
//! small tokio runtime; the FUSE side reaches them through [`cfs_fuse::TierHooks`].

use crate::cli::{MountArgs, TierMode};
use crate::datadir::{DataDir, TierConfig};
use anyhow::{Context, Result};
use cfs_flash::FlashDir;
use cfs_meta::MetaStore;
use cfs_tier::evict::{EvictConfig, EvictStats, Evictor, OpenFiles};
use cfs_tier::hydrate::{HydrateStats, Hydrator};
use cfs_tier::oplog::{LogShipper, LogStats};
use cfs_tier::uploader::{FinishHandle, FlushPolicy, UploadKick, UploadStats, Uploader};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A running object tier.
pub struct Tier {
    kick: UploadKick,
    stats: Arc<UploadStats>,
    log: Arc<LogStats>,
    hydrator: Arc<Hydrator>,
    evictor: Arc<Evictor>,
    /// The mount's open files, known once the filesystem object exists.
    live: Arc<LiveFiles>,
    high_pct: u8,
    low_pct: u8,
    /// Asks the uploader for its last pass at unmount.
    finish: FinishHandle,
}

/// How long a clean unmount waits for the tier's last pass (uploads, the final metadata
/// checkpoint, the deletes it allows). Bounded so that a dead object store cannot hold up a
/// shutdown; what is left stays queued on flash for the next mount.
const FINISH_BUDGET: Duration = Duration::from_secs(30);

/// The evictor's view of open files; until the mount is up, every file counts as open.
#[derive(Default)]
struct LiveFiles(OnceLock<Arc<cfs_fuse::Live>>);

impl OpenFiles for LiveFiles {
    fn while_closed(&self, ino: u64, f: &mut dyn FnMut()) -> bool {
        match self.0.get() {
            Some(live) => live.while_closed(ino, f),
            None => false,
        }
    }
    fn last_used(&self, ino: u64) -> Option<Instant> {
        self.0.get().and_then(|live| live.last_used(ino))
    }
    fn is_open(&self, ino: u64) -> bool {
        self.0.get().is_some_and(|live| live.is_open(ino))
    }
    fn blocks_changed(&self, ino: u64) {
        if let Some(live) = self.0.get() {
            live.invalidate_attrs(ino);
        }
    }
}

/// What the FUSE layer calls.
struct Hooks {
    kick: UploadKick,
    hydrator: Arc<Hydrator>,
    evictor: Arc<Evictor>,
}

impl cfs_fuse::TierHooks for Hooks {
    fn data_changed(&self, _ino: u64) {
        self.kick.changed();
    }
    fn hydrate(&self, ino: u64, k: u64) -> std::io::Result<()> {
        self.hydrator
            .hydrate_blocking(ino, k)
            .map_err(std::io::Error::other)
    }
    fn prefetch(&self, ino: u64, k: u64) {
        self.hydrator.prefetch(ino, k);
    }
    fn read_evicted(&self, ino: u64, offset: u64, len: u64) -> std::io::Result<Option<Vec<u8>>> {
        self.hydrator
            .read_range(ino, offset, len)
            .map(|b| b.map(|b| b.to_vec()))
            .map_err(std::io::Error::other)
    }
    fn read_blob(&self, ino: u64, k: u64) -> std::io::Result<Option<cfs_fuse::FetchedBlob>> {
        self.hydrator
            .read_blob(ino, k)
            .map(|b| b.map(|b| Box::new(b) as cfs_fuse::FetchedBlob))
            .map_err(std::io::Error::other)
    }
    fn forget_fetched(&self, ino: u64) {
        self.hydrator.forget_recent(ino);
    }
    fn policy_changed(&self, ino: u64) {
        // `s3` may now let a clean file go, or, in tiered mode, a dirty one be flushed.
        self.evictor.nominate(ino);
        self.kick.kick();
    }
    fn admit_write(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = self.evictor.stats();
        let full = || self.flash_full();
        if !full() {
            return Ok(());
        }
        // Full: wait while uploads and eviction make room. Only if they cannot (the store
        // is down, or what is on flash is dirty, open or pinned) does the write fail.
        let deadline = Instant::now() + ADMIT_WAIT;
        while Instant::now() < deadline {
            self.kick.kick();
            self.evictor.kick();
            std::thread::sleep(Duration::from_millis(200));
            if !full() {
                return Ok(());
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!(
                "flash holds {} of {} bytes and nothing could be evicted within {ADMIT_WAIT:?}",
                stats.flash_used.load(Relaxed),
                stats.flash_capacity.load(Relaxed)
            ),
        ))
    }
    fn flash_full(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = self.evictor.stats();
        let cap = stats.flash_capacity.load(Relaxed);
        cap > 0 && stats.flash_used.load(Relaxed) >= cap
    }
}

/// How long a create or an open for writing waits for room on a full flash tier before it
/// fails with ENOSPC.
const ADMIT_WAIT: Duration = Duration::from_secs(20);

impl Tier {
    /// The tier's part of a clean unmount: a last upload pass, a metadata checkpoint to the
    /// object store if anything changed since the last one, and the DELETEs it makes safe,
    /// within [`FINISH_BUDGET`]. Logs what it did; never fails the unmount.
    pub fn finish(&self) {
        let started = Instant::now();
        match self.finish.finish(started + FINISH_BUDGET) {
            Some(r) if r.checkpoint_error.is_none() && !r.timed_out => tracing::info!(
                files_left = r.files_left,
                checkpoint = ?r.checkpoint_seq,
                checkpoint_current = r.checkpoint_current,
                objects_deleted = r.objects_deleted,
                elapsed = ?started.elapsed(),
                "object tier: last pass done"
            ),
            Some(r) => tracing::warn!(
                files_left = r.files_left,
                checkpoint = ?r.checkpoint_seq,
                checkpoint_current = r.checkpoint_current,
                error = r.checkpoint_error.as_deref().unwrap_or(""),
                timed_out = r.timed_out,
                "object tier: last pass incomplete; the next mount catches up"
            ),
            None => tracing::warn!(
                budget = ?FINISH_BUDGET,
                "object tier: the uploader did not make its last pass in time; the next mount catches up"
            ),
        }
    }

    pub fn hooks(&self) -> Arc<dyn cfs_fuse::TierHooks> {
        Arc::new(Hooks {
            kick: self.kick.clone(),
            hydrator: Arc::clone(&self.hydrator),
            evictor: Arc::clone(&self.evictor),
        })
    }

    /// Lets eviction start: from now on it can tell which files are open.
    pub fn attach(&self, live: Arc<cfs_fuse::Live>) {
        let _ = self.live.0.set(live);
    }

    /// The live counters `cfs status` reports.
    pub fn live_stats(&self) -> TierStats {
        TierStats {
            uploads: Arc::clone(&self.stats),
            log: Arc::clone(&self.log),
            evict: self.evictor.stats(),
            flash_usage: self.evictor.flash_usage(),
            hydrate: self.hydrator.stats(),
            watermarks: (self.high_pct, self.low_pct),
        }
    }
}

/// Handles on the tier's counters, for the control socket.
#[derive(Clone)]
pub struct TierStats {
    pub uploads: Arc<UploadStats>,
    pub log: Arc<LogStats>,
    pub evict: Arc<EvictStats>,
    /// The evictor's gauge of the bytes backing files hold: status reuses its last scan.
    pub flash_usage: Arc<cfs_flash::FlashUsage>,
    pub hydrate: Arc<HydrateStats>,
    pub watermarks: (u8, u8),
}

/// Opens the object store `cfg` names and starts the uploader.
pub fn start(
    cfg: &TierConfig,
    args: &MountArgs,
    _dir: &DataDir,
    meta: &Arc<MetaStore>,
    flash: &FlashDir,
) -> Result<Tier> {
    let url = cfg.url.as_str();
    let store = cfg.open_store()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cfs-tier")
        .enable_all()
        .build()
        .context("cannot start the tier runtime")?;
    let live = Arc::new(LiveFiles::default());
    let evictor = Evictor::new(
        Arc::clone(meta),
        flash.clone(),
        EvictConfig {
            capacity: args.flash_capacity,
            high_pct: args.high_watermark,
            low_pct: args.low_watermark,
        },
        Arc::clone(&live) as Arc<dyn OpenFiles>,
    );
    let hydrator = Hydrator::new(
        Arc::clone(meta),
        flash.clone(),
        store.clone(),
        runtime.handle().clone(),
    )?;
    // Blobs written back to flash are synced before the metadata that records them is durable.
    meta.set_data_barrier(Arc::clone(&hydrator) as Arc<dyn cfs_meta::DataBarrier>);
    let nominate = Arc::clone(&evictor);
    let fs = cfs_tier::FsId::new(meta.fs_id())?;
    let shipper = LogShipper::new(Arc::clone(meta), store.clone(), fs);
    let uploader = Uploader::new(
        Arc::clone(meta),
        flash.clone(),
        store,
        args.upload_concurrency,
    )?
    .with_policy(FlushPolicy {
        tiered: args.tier_mode == TierMode::Tiered,
        flush_age: Duration::from_secs(args.flush_age),
        pressure: evictor.pressure(),
    })
    .on_clean(Arc::new(move |ino| nominate.nominate(ino)))
    .with_open_files(Arc::clone(&live) as Arc<dyn OpenFiles>)
    .with_checkpoints(Duration::from_secs(args.checkpoint_interval));
    let tier = Tier {
        kick: uploader.kick_handle(),
        stats: uploader.stats(),
        log: shipper.stats(),
        hydrator,
        evictor: Arc::clone(&evictor),
        live,
        high_pct: args.high_watermark,
        low_pct: args.low_watermark,
        finish: uploader.finish_handle(),
    };
    let handle = runtime.handle().clone();
    // Between checkpoints, the operation log keeps the bucket within about a second of
    // this node's durable metadata.
    runtime.spawn(shipper.run(Duration::from_secs(1)));
    std::thread::Builder::new()
        .name("cfs-evictor".into())
        .spawn(move || evictor.run(handle))?;
    std::thread::Builder::new()
        .name("cfs-uploader".into())
        .spawn(move || {
            runtime.block_on(async {
                uploader.run(Duration::from_secs(1)).await;
                // The last pass is done (unmount). Keep the runtime, which the evictor and
                // hydration share, alive until the process exits.
                std::future::pending::<()>().await
            })
        })?;
    tracing::info!(
        object_store = url,
        mode = args.tier_mode.as_str(),
        flash_capacity = ?args.flash_capacity,
        high_watermark = args.high_watermark,
        low_watermark = args.low_watermark,
        "object tier on: changed files are uploaded as 64 MiB blobs"
    );
    Ok(tier)
}
