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
//!
//! With checkpoints on ([`Uploader::with_checkpoints`]), each pass also publishes a metadata
//! checkpoint when metadata changed (at most once per interval), and an old generation is
//! DELETEd only once a published checkpoint no longer references it: the objects DELETEd are
//! exactly the delete queue of the checkpoint just published, whose blobs all name newer
//! generations. So the bucket always holds every blob its newest HEAD names, and
//! `cfs repair --from-s3` can rebuild the filesystem from it alone.

use crate::checkpoint::Publisher;
use crate::error::{blocking_meta, meta_err};
use crate::key::{BLOB_SIZE, BlobKey, FsId, blob_count, blob_range};
use crate::{BlobIo, BlobStore, Result, TierError, zero_blob};
use bytes::Bytes;
use cfs_flash::FlashDir;
use cfs_meta::{BlobRecord, Ino, MetaStore, Op};
use futures::StreamExt;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Counters of the uploader's work since the mount started, for `cfs status`.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub blobs_uploaded: AtomicU64,
    /// Bytes sent: a blob of zeros counts the few bytes of its marker.
    pub bytes_uploaded: AtomicU64,
    /// Of the blobs uploaded, those of zeros (holes, mostly) stored as a marker.
    pub zero_blobs: AtomicU64,
    pub objects_deleted: AtomicU64,
    pub errors: AtomicU64,
    pub files_in_flight: AtomicU64,
    /// Unix seconds of the last pass that found nothing left to do (0: never).
    pub last_idle: AtomicU64,
    /// Unix seconds at which the oldest file still on the upload queue was first seen there
    /// by this mount (0: queue empty).
    pub oldest_dirty_since: AtomicU64,
    /// Files the last pass left queued on purpose: younger than the tiered mode's flush age,
    /// or small files held while the filesystem is busy.
    pub files_held: AtomicU64,
    /// Metadata checkpoints published since the mount started, and failed attempts.
    pub checkpoints_published: AtomicU64,
    pub checkpoint_errors: AtomicU64,
    /// Seq of the newest checkpoint this mount published (0: none yet), and its Unix seconds.
    pub checkpoint_seq: AtomicU64,
    pub checkpoint_unix: AtomicU64,
    /// The `MetaStore::change_count` that checkpoint covers: metadata changed since it was
    /// taken when the store's count is higher.
    pub checkpoint_changes: AtomicU64,
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
pub struct UploadKick(Arc<KickState>);

#[derive(Debug, Default)]
struct KickState {
    notify: Notify,
    /// When data last changed, in [`mono_ms`]; 0: never.
    last_change_ms: AtomicU64,
}

/// Milliseconds on a monotonic clock that starts at 1 the first time it is read.
fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl UploadKick {
    /// Wakes the uploader.
    pub fn kick(&self) {
        self.0.notify.notify_one();
    }

    /// Data changed on flash: wakes the uploader, and notes that the filesystem is busy
    /// (small files then wait for a quiet moment; see [`Uploader`]'s `select`).
    pub fn changed(&self) {
        self.0.last_change_ms.store(mono_ms(), Ordering::Relaxed);
        self.kick();
    }

    /// Whether data changed within the last `quiet`.
    fn busy(&self, quiet: Duration) -> bool {
        let last = self.0.last_change_ms.load(Ordering::Relaxed);
        last != 0 && mono_ms().saturating_sub(last) < quiet.as_millis() as u64
    }
}

/// While data keeps changing (a `tar`, a build, a `git checkout`), files smaller than a blob
/// wait until it has been quiet this long, so that their uploads (reads, checksums, a PUT
/// and a metadata commit each) do not compete with the work that writes them...
const BUSY_QUIET: Duration = Duration::from_secs(1);
/// ...but never longer than this after they were queued, so the store stays close behind.
/// Files of a blob or more, and everything under flash pressure, go at once.
const BUSY_MAX_DEFER: Duration = Duration::from_secs(10);
/// How long a held file's size (a blob or more goes at once) is taken as known.
const LARGE_RECHECK: Duration = Duration::from_secs(2);
/// The least time between two passes while files are held back.
const HELD_PASS_GAP: Duration = Duration::from_millis(250);

pub struct Uploader {
    meta: Arc<MetaStore>,
    flash: FlashDir,
    store: BlobStore,
    fs: FsId,
    concurrency: usize,
    /// Blob uploads in flight over all files, each holding one blob in memory.
    blob_slots: Arc<tokio::sync::Semaphore>,
    kick: UploadKick,
    stats: Arc<UploadStats>,
    policy: FlushPolicy,
    on_clean: Option<CleanHook>,
    /// The mount's open files: a file still open waits for its last close (see `select`).
    open: Option<Arc<dyn crate::evict::OpenFiles>>,
    /// How blobs are read off flash (io_uring or pread; see `blob_io`).
    blob_io: BlobIo,
    /// When this mount first saw each queued file, for the flush age and `cfs status`.
    first_seen: parking_lot::Mutex<std::collections::HashMap<Ino, (Instant, u64)>>,
    /// Whether a held file was a blob or more, and when that was looked up.
    large: parking_lot::Mutex<std::collections::HashMap<Ino, (Instant, bool)>>,
    /// Checkpoint publishing and the deletes it makes safe; see [`Uploader::with_checkpoints`].
    checkpoints: tokio::sync::Mutex<Checkpoints>,
    finish_tx: tokio::sync::mpsc::Sender<FinishRequest>,
    finish_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<FinishRequest>>>,
    /// Runs between a file's last version check and its commit: where tests land a write.
    #[cfg(test)]
    pub(crate) before_commit: Option<Box<dyn Fn(Ino) + Send + Sync>>,
}

/// The checkpoint state that passes share.
struct Checkpoints {
    /// `None`: checkpoints off, and retired objects are DELETEd as soon as they are retired.
    publisher: Option<Publisher>,
    interval: Duration,
    /// When a publish was last attempted, successful or not.
    last_attempt: Option<Instant>,
    /// The `MetaStore::change_count` the newest published checkpoint covers.
    covered: Option<u64>,
    /// The newest published checkpoint's delete queue, less what was DELETEd since.
    safe_deletes: HashSet<(Ino, u64, u64)>,
}

/// A request for the last pass; see [`FinishHandle`].
struct FinishRequest {
    deadline: Instant,
    reply: std::sync::mpsc::Sender<FinishReport>,
}

/// Asks a running uploader ([`Uploader::run`]) for one last pass, then to stop.
#[derive(Clone, Debug)]
pub struct FinishHandle(tokio::sync::mpsc::Sender<FinishRequest>);

/// What the last pass did, for the unmount log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinishReport {
    /// Files still waiting for upload afterwards (kept on flash; the next mount sends them).
    pub files_left: u64,
    /// The checkpoint the last pass published, if metadata had changed and it succeeded.
    pub checkpoint_seq: Option<u64>,
    /// A published checkpoint covers every metadata change this mount made.
    pub checkpoint_current: bool,
    pub checkpoint_error: Option<String>,
    pub objects_deleted: u64,
    /// The deadline cut the pass short.
    pub timed_out: bool,
}

impl FinishHandle {
    /// Blocks (call it outside the tier runtime) until the uploader has made its last pass:
    /// uploads, a checkpoint if metadata changed since the last one, and the deletes that
    /// checkpoint makes safe, all by `deadline`. `None` if the uploader did not answer by
    /// then (a long pass was still running, or it is not running at all).
    pub fn finish(&self, deadline: Instant) -> Option<FinishReport> {
        let (reply, rx) = std::sync::mpsc::channel();
        self.0.try_send(FinishRequest { deadline, reply }).ok()?;
        // A little grace past the deadline for the answer itself.
        let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(2);
        rx.recv_timeout(wait).ok()
    }
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
        let (finish_tx, finish_rx) = tokio::sync::mpsc::channel(1);
        Ok(Uploader {
            meta,
            flash,
            store,
            fs,
            concurrency: concurrency.max(1),
            blob_slots: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            kick: UploadKick::default(),
            stats: Arc::new(UploadStats::default()),
            policy: FlushPolicy::default(),
            on_clean: None,
            open: None,
            blob_io: BlobIo::auto(),
            first_seen: Default::default(),
            large: Default::default(),
            checkpoints: tokio::sync::Mutex::new(Checkpoints {
                publisher: None,
                interval: Duration::ZERO,
                last_attempt: None,
                covered: None,
                safe_deletes: HashSet::new(),
            }),
            finish_tx,
            finish_rx: parking_lot::Mutex::new(Some(finish_rx)),
            #[cfg(test)]
            before_commit: None,
        })
    }

    /// Publishes a metadata checkpoint to `<fs-id>/meta/HEAD` when metadata changed, at
    /// most once per `interval` (the first pass always publishes one), and DELETEs retired
    /// objects only once a published checkpoint no longer names them (see the module doc).
    pub fn with_checkpoints(mut self, interval: Duration) -> Uploader {
        let c = self.checkpoints.get_mut();
        c.publisher = Some(Publisher::new(self.store.clone(), self.fs.clone()));
        c.interval = interval;
        self
    }

    /// The handle that asks for the last pass at unmount.
    pub fn finish_handle(&self) -> FinishHandle {
        FinishHandle(self.finish_tx.clone())
    }

    /// Lets passes hold back files that are still open; see [`Uploader::select`].
    pub fn with_open_files(mut self, open: Arc<dyn crate::evict::OpenFiles>) -> Uploader {
        self.open = Some(open);
        self
    }

    pub fn with_policy(mut self, policy: FlushPolicy) -> Uploader {
        self.policy = policy;
        self
    }

    /// Reads blobs with `io` instead of the process default ([`BlobIo::auto`]).
    pub fn with_blob_io(mut self, io: BlobIo) -> Uploader {
        self.blob_io = io;
        self
    }

    /// Registers `hook`, called with each file an upload left clean (the evictor's cue).
    pub fn on_clean(mut self, hook: CleanHook) -> Uploader {
        self.on_clean = Some(hook);
        self
    }

    /// Of the queued files, those to upload now. Under flash pressure, all of them.
    /// Otherwise, in tiered mode, those queued for longer than the flush age or pinned to
    /// `s3`; in cache mode, all; and of those, files open or closed less than
    /// [`BUSY_QUIET`] ago only once held for [`BUSY_MAX_DEFER`], and while data keeps
    /// changing, only files of a blob or more and files held for [`BUSY_MAX_DEFER`] already.
    ///
    /// An open file is most likely still being written (`fio` and databases `fallocate`
    /// first, which queues the file before its data is there, and `fio` closes and reopens
    /// it between laying it out and writing): uploading it then reads it while it changes,
    /// uploads it again afterwards, and takes disk bandwidth from the writer. It goes a
    /// little after its last close, or after [`BUSY_MAX_DEFER`] for files that stay open.
    fn select(&self, dirty: Vec<Ino>) -> Vec<Ino> {
        let now = Instant::now();
        let unix_now = unix_secs();
        let mut seen = self.first_seen.lock();
        let queued: HashSet<Ino> = dirty.iter().copied().collect();
        seen.retain(|ino, _| queued.contains(ino));
        for &ino in &dirty {
            seen.entry(ino).or_insert((now, unix_now));
        }
        let oldest = seen.values().map(|&(_, u)| u).min().unwrap_or(0);
        self.stats
            .oldest_dirty_since
            .store(oldest, Ordering::Relaxed);
        if self.policy.pressure.load(Ordering::Relaxed) {
            self.stats.files_held.store(0, Ordering::Relaxed);
            return dirty;
        }
        let busy = self.kick.busy(BUSY_QUIET);
        let age = |ino: &Ino| {
            seen.get(ino)
                .map_or(Duration::ZERO, |(t, _)| now.duration_since(*t))
        };
        let mut large = self.large.lock();
        large.retain(|ino, _| queued.contains(ino));
        let (now_due, held): (Vec<Ino>, Vec<Ino>) = dirty.into_iter().partition(|ino| {
            let age = age(ino);
            if self.policy.tiered
                && age < self.policy.flush_age
                && self.tier_policy(*ino).as_deref() != Some("s3")
            {
                return false;
            }
            if age >= BUSY_MAX_DEFER {
                return true;
            }
            if self.open.as_ref().is_some_and(|o| {
                o.is_open(*ino)
                    || o.last_used(*ino)
                        .is_some_and(|t| now.saturating_duration_since(t) < BUSY_QUIET)
            }) {
                return false;
            }
            if !busy {
                return true;
            }
            // Sizes of held files are looked up again only every LARGE_RECHECK: a burst of
            // small files holds thousands, and passes run four times a second.
            match large.get(ino) {
                Some(&(at, is_large)) if now.duration_since(at) < LARGE_RECHECK => is_large,
                _ => {
                    let is_large = self.meta.inode(*ino).is_ok_and(|i| i.size >= BLOB_SIZE);
                    large.insert(*ino, (now, is_large));
                    is_large
                }
            }
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

    /// Runs passes until the process ends or a [`FinishHandle`] asks for the last one: at
    /// once when kicked, else every `interval`.
    pub async fn run(self, interval: Duration) {
        let Some(mut finish_rx) = self.finish_rx.lock().take() else {
            tracing::error!("the uploader is already running");
            return;
        };
        loop {
            if let Err(e) = self.pass().await {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "upload pass failed; retrying later");
            }
            // The passes are this daemon's heartbeat: buffers a burst of reads left idle go.
            crate::pooled::trim_idle();
            if self.stats.files_held.load(Ordering::Relaxed) > 0 {
                // Files are held back; the kicks of a busy filesystem must not turn into a
                // pass per change that only finds them held again.
                tokio::time::sleep(HELD_PASS_GAP).await;
            }
            tokio::select! {
                _ = self.kick.0.notify.notified() => {}
                _ = tokio::time::sleep(interval) => {}
                Some(req) = finish_rx.recv() => {
                    let report = self.finish(req.deadline).await;
                    let _ = req.reply.send(report);
                    return;
                }
            }
        }
    }

    /// The last pass: a normal pass, then a checkpoint even if the interval is not up (when
    /// metadata changed since the last one), then the deletes it makes safe. Whatever is
    /// not done by `deadline` stays queued for the next mount.
    pub async fn finish(&self, deadline: Instant) -> FinishReport {
        let mut report = FinishReport::default();
        // A third of the time is kept for the checkpoint, which matters more than any file.
        let left = deadline.saturating_duration_since(Instant::now());
        let flush_until = Instant::now() + left * 2 / 3;
        match tokio::time::timeout_at(flush_until.into(), self.pass()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "last upload pass failed");
            }
            Err(_) => report.timed_out = true,
        }
        let seq_before = self.stats.checkpoint_seq.load(Ordering::Relaxed);
        let deleted_before = self.stats.objects_deleted.load(Ordering::Relaxed);
        // Twice at most: recording the deletes the first checkpoint allowed changes metadata,
        // and the final HEAD should not list objects that are gone.
        for _ in 0..2 {
            match tokio::time::timeout_at(deadline.into(), self.checkpoint_and_delete(true)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => report.checkpoint_error = Some(e.to_string()),
                Err(_) => {
                    report.timed_out = true;
                    report.checkpoint_error = Some("out of time".into());
                }
            }
            if report.checkpoint_error.is_some()
                || self.checkpoints.lock().await.covered == Some(self.meta.change_count())
            {
                break;
            }
        }
        let seq = self.stats.checkpoint_seq.load(Ordering::Relaxed);
        report.checkpoint_seq = (seq != seq_before).then_some(seq);
        report.checkpoint_current =
            self.checkpoints.lock().await.covered == Some(self.meta.change_count());
        report.objects_deleted =
            self.stats.objects_deleted.load(Ordering::Relaxed) - deleted_before;
        report.files_left = self
            .meta
            .dirty_files(usize::MAX)
            .map_or(0, |d| d.len() as u64);
        report
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
        self.checkpoint_and_delete(false).await?;
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
        // Before anything is read: a file queued again after this was changed after it.
        let marks = self.meta.mark_seq();
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
        // The blobs of one file go up concurrently too (a single large file is the common
        // case), but never more at once, over all files, than `concurrency`: each holds
        // 64 MiB in memory.
        let results: Vec<Result<Option<BlobRecord>>> = futures::stream::iter(
            (0..blob_count(size)).filter(|k| !evicted.iter().any(|&(e, _)| e == *k)),
        )
        .map(|k| {
            let file = Arc::clone(&file);
            let recorded = &recorded;
            async move {
                let _slot = self
                    .blob_slots
                    .acquire()
                    .await
                    .map_err(|e| TierError::Other {
                        context: "upload slots".into(),
                        source: Box::new(e),
                    })?;
                // Written to since the pass began: the file stays queued, and the rest of
                // it goes up on a later pass rather than being read while it changes.
                if data_version(&file.metadata().map_err(io_err)?) != before {
                    return Ok(None);
                }
                let range = blob_range(k, size);
                // A blob that is all hole is not read: it is zeros, and goes up as a marker.
                // A blob read is as long as what was read (shorter if the file was cut
                // meanwhile, and then queued again), so its record matches its object.
                let (data, len, zero) =
                    if cfs_flash::has_data(&file, range.clone()).map_err(io_err)? {
                        let data = read_blob(&self.blob_io, Arc::clone(&file), range).await?;
                        let zero = cfs_flash::is_all_zero(&data);
                        let len = data.len() as u64;
                        (data, len, zero)
                    } else {
                        (Bytes::new(), range.end - range.start, true)
                    };
                let (crc, chunks) = if zero {
                    zero_blob::zero_checksums(len)
                } else {
                    checksums(&data)
                };
                let current = recorded.iter().find(|b| b.k == k);
                if let Some(b) = current
                    && b.len == len
                    && b.crc32c == crc
                {
                    // Unchanged. A blob recorded before piece checksums existed gets them
                    // now, without a new upload: the object is these very bytes.
                    return Ok(b.chunks.is_empty().then(|| BlobRecord {
                        chunks,
                        ..b.clone()
                    }));
                }
                let generation = current.map_or(1, |b| b.generation + 1);
                let key = BlobKey::new(self.fs.clone(), ino, k, generation).object_key();
                let marker = zero && zero_blob::stored_as_marker(len);
                let body = if marker {
                    zero_blob::marker(len)
                } else if data.len() as u64 != len {
                    // A hole too short for a marker, not read.
                    zero_blob::zeros(len)
                } else {
                    data
                };
                let sent = body.len() as u64;
                self.store.put(&key, body).await?;
                if marker {
                    self.stats.zero_blobs.fetch_add(1, Ordering::Relaxed);
                }
                self.stats.blobs_uploaded.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_uploaded.fetch_add(sent, Ordering::Relaxed);
                Ok(Some(BlobRecord {
                    k,
                    generation,
                    len,
                    crc32c: crc,
                    chunks,
                }))
            }
        })
        .buffer_unordered(self.concurrency)
        .collect()
        .await;
        let mut uploaded = Vec::new();
        for r in results {
            if let Some(record) = r? {
                uploaded.push(record);
            }
        }
        uploaded.sort_by_key(|b| b.k);
        let after = data_version(&file.metadata().map_err(io_err)?);
        let clean = before == after;
        #[cfg(test)]
        if let Some(hook) = &self.before_commit {
            hook(ino);
        }
        self.meta
            .execute(&Op::CommitBlobs {
                ino,
                blobs: uploaded.clone(),
                blob_count: blob_count(size),
                clean,
            })
            .map_err(meta_err)?;
        // Every change queues its file with a `MarkDirty`. One applied since this upload
        // began (a write closed after the check above, or a rewrite through the daemon that
        // kept size and mtime) just had its mark cleared with older bytes uploaded: put the
        // mark back, or the change would never go up and eviction could drop it.
        let requeued = clean && self.meta.marked_since(ino, marks);
        if requeued {
            match self.meta.execute(&Op::MarkDirty { ino }) {
                Ok(_) | Err(cfs_meta::MetaError::NotFound) => {}
                Err(e) => return Err(meta_err(e)),
            }
        } else if clean {
            self.meta.settle_mark(ino, marks);
        }
        let clean = clean && !requeued;
        tracing::debug!(ino, blobs = uploaded.len(), clean, elapsed = ?started.elapsed(), "file flushed");
        if clean {
            self.first_seen.lock().remove(&ino);
            if let Some(hook) = &self.on_clean {
                hook(ino);
            }
        }
        Ok(())
    }

    /// With checkpoints on: publishes one if metadata changed and the interval is up (or
    /// `force`), then DELETEs what the newest published checkpoint makes safe. A failed
    /// publish is counted and retried after the interval; only a forced one returns it.
    /// With checkpoints off: DELETEs every retired object.
    async fn checkpoint_and_delete(&self, force: bool) -> Result<()> {
        let mut guard = self.checkpoints.lock().await;
        let c = &mut *guard;
        let Some(publisher) = c.publisher.as_mut() else {
            drop(guard);
            return self.drain_deletes().await;
        };
        let changed = c.covered != Some(self.meta.change_count());
        let due = force || c.last_attempt.is_none_or(|t| t.elapsed() >= c.interval);
        if changed && due {
            c.last_attempt = Some(Instant::now());
            match self.publish(publisher).await {
                Ok((seq, covered, deletes)) => {
                    c.covered = Some(covered);
                    c.safe_deletes = deletes.into_iter().collect();
                    let s = &self.stats;
                    s.checkpoints_published.fetch_add(1, Ordering::Relaxed);
                    s.checkpoint_seq.store(seq, Ordering::Relaxed);
                    s.checkpoint_unix.store(unix_secs(), Ordering::Relaxed);
                    s.checkpoint_changes.store(covered, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.checkpoint_errors.fetch_add(1, Ordering::Relaxed);
                    if force {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "cannot publish a metadata checkpoint; retrying in {:?}", c.interval);
                }
            }
        }
        if c.safe_deletes.is_empty() {
            return Ok(());
        }
        // Only what is still queued: a key can come back to life (see CommitBlobs) and
        // leaves the queue then; passes are serialised, so nothing commits meanwhile.
        let pending: HashSet<_> = self
            .meta
            .pending_deletes(usize::MAX)
            .map_err(meta_err)?
            .into_iter()
            .collect();
        c.safe_deletes.retain(|key| pending.contains(key));
        let todo: Vec<_> = c.safe_deletes.iter().copied().collect();
        for batch in todo.chunks(256) {
            let (done, error) = self.delete_batch(batch).await?;
            for key in &done {
                c.safe_deletes.remove(key);
            }
            if let Some(e) = error {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Exports a checkpoint and publishes it. Returns its seq, the change count it covers
    /// and its delete queue.
    async fn publish(&self, publisher: &mut Publisher) -> Result<(u64, u64, Vec<(Ino, u64, u64)>)> {
        let started = Instant::now();
        let meta = Arc::clone(&self.meta);
        let ckpt = blocking_meta(move || meta.export_checkpoint()).await?;
        let cfs_meta::Checkpoint {
            bytes,
            change_count,
            counts,
            deletes,
            op_seq,
            log_next,
            ..
        } = ckpt;
        // Everything the image holds must be durable here before a HEAD names it: a crash
        // could otherwise take back operations (and log trims) the bucket already shows,
        // and the log this node ships next would contradict the checkpoint.
        let meta = Arc::clone(&self.meta);
        blocking_meta(move || meta.sync()).await?;
        let len = bytes.len();
        let cut = crate::checkpoint::LogCut {
            op_seq,
            next: log_next,
        };
        let head = publisher
            .publish(Bytes::from(bytes), counts, Some(cut))
            .await?;
        crate::oplog::drop_segments_before(&self.store, &self.fs, &self.meta, log_next).await;
        tracing::debug!(seq = head.seq, bytes = len, inodes = head.counts.inodes, elapsed = ?started.elapsed(), "metadata checkpoint published");
        Ok((head.seq, change_count, deletes))
    }

    /// DELETEs every retired generation, then drops them from the queue. Deleting a missing
    /// key succeeds, so a DELETE redone after a crash is harmless. Only for stores without
    /// checkpoints: with them, [`Self::checkpoint_and_delete`] decides what may go.
    async fn drain_deletes(&self) -> Result<()> {
        loop {
            let batch = self.meta.pending_deletes(256).map_err(meta_err)?;
            if batch.is_empty() {
                return Ok(());
            }
            if let (_, Some(e)) = self.delete_batch(&batch).await? {
                return Err(e);
            }
        }
    }

    /// DELETEs `batch` and drops what went from the queue. Returns what went, and the first
    /// DELETE error, if any.
    async fn delete_batch(
        &self,
        batch: &[(Ino, u64, u64)],
    ) -> Result<(Vec<(Ino, u64, u64)>, Option<TierError>)> {
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
        if !done.is_empty() {
            self.meta
                .execute(&Op::BlobsDeleted {
                    blobs: done.clone(),
                })
                .map_err(meta_err)?;
        }
        Ok((done, first_error))
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads one blob's bytes off flash. If the file shrank while we read, this uploads what is
/// there; the size check after the pass keeps the file queued.
async fn read_blob(
    io: &BlobIo,
    file: Arc<std::fs::File>,
    range: std::ops::Range<u64>,
) -> Result<Bytes> {
    debug_assert!(range.end - range.start <= BLOB_SIZE);
    io.read_at(file, range.start, (range.end - range.start) as usize)
        .await
        .map_err(io_err)
}

fn io_err(e: std::io::Error) -> TierError {
    TierError::Other {
        context: "flash".into(),
        source: Box::new(e),
    }
}
/// The crc32c of a blob, and of each [`cfs_meta::BLOB_CHUNK`] of it, in one pass: the
/// whole is combined from the pieces rather than read a second time.
fn checksums(data: &[u8]) -> (u32, Vec<u32>) {
    let mut whole = 0;
    let chunks = data
        .chunks(cfs_meta::BLOB_CHUNK as usize)
        .map(|piece| {
            let crc = crc32c::crc32c(piece);
            whole = crc32c::crc32c_combine(whole, crc, piece.len());
            crc
        })
        .collect();
    (whole, chunks)
}

#[cfg(test)]
mod tests {
    use super::checksums;

    #[test]
    fn piece_checksums_combine_to_the_whole() {
        let piece = cfs_meta::BLOB_CHUNK as usize;
        for len in [0, 1, piece - 1, piece, piece + 1, 5 * piece / 2] {
            let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
            let (whole, pieces) = checksums(&data);
            assert_eq!(whole, crc32c::crc32c(&data), "{len} bytes");
            assert_eq!(pieces.len(), len.div_ceil(piece));
            for (i, crc) in pieces.iter().enumerate() {
                let end = ((i + 1) * piece).min(len);
                assert_eq!(*crc, crc32c::crc32c(&data[i * piece..end]));
            }
        }
    }
}
