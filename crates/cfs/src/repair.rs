//! `cfs repair --from-s3`: rebuilds a filesystem into a new data dir from its object store
//! alone.
//!
//! 1. Find the filesystem: `--fs-id`, else the pointer object `meta/LATEST`; then its HEAD,
//!    `<fs-id>/meta/HEAD`, which names the newest checkpoint.
//! 2. Download the checkpoint's parts, each checked against its crc32c, and import it into
//!    `NEWDIR/meta.redb` with every blob marked evicted and the upload queue empty: nothing is
//!    on flash yet, and uploading empty backing files would overwrite good objects. The
//!    import goes to a temporary file renamed into place, so `meta.redb` exists only whole.
//! 3. Create each regular file's sparse backing file at its size, with its times.
//! 4. Bind the data dir to the store (`NEWDIR/tier.json`).
//! 5. Unless `--lazy`: download every blob (verified against the length and crc32c in the
//!    metadata), write it at its offset (zero runs punched, so sparse files stay sparse),
//!    fdatasync, and record it hydrated. The backing file's times are put back after each
//!    write: ClaudeFS shows them to users.
//!
//! `NEWDIR/repair.incomplete` exists from step 1 until the end. Run again after an
//! interruption, the same command resumes: a finished import is kept, and a blob recorded
//! hydrated is no longer evicted, so it is not fetched again.

use crate::cli::RepairArgs;
use crate::datadir::{DataDir, TierConfig};
use anyhow::{Context, Result, bail};
use cfs_flash::FlashDir;
use cfs_meta::{FileKind, Inode, MetaStore, Op};
use cfs_tier::checkpoint::{fetch_checkpoint, read_head, read_latest};
use cfs_tier::hydrate::write_fetched;
use cfs_tier::{BLOB_SIZE, BlobKey, BlobStore, FsId, ObjectKey, TierError};
use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What `NEWDIR/repair.incomplete` records: which repair is in progress there.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Marker {
    url: String,
    fs_id: String,
    /// The checkpoint being restored.
    seq: u64,
}

fn marker_path(dir: &DataDir) -> PathBuf {
    dir.root.join("repair.incomplete")
}

pub fn run(args: RepairArgs) -> Result<()> {
    if args.jobs == 0 || args.jobs > 64 {
        bail!("--jobs must be between 1 and 64");
    }
    let root = std::path::absolute(&args.data_dir)?;
    let dir = DataDir::new(&root);
    let cfg = TierConfig {
        url: args.from_s3.clone(),
        s3: args.s3.clone(),
    };
    let url: cfs_tier::StoreUrl = cfg
        .url
        .parse()
        .with_context(|| format!("bad --from-s3 {:?}", cfg.url))?;
    match &url {
        cfs_tier::StoreUrl::Memory { .. } => {
            bail!("memory:// is a store inside one process: there is nothing to repair from")
        }
        // Opening a file:// store creates its directory: a mistyped path would then read as
        // "no checkpoint" rather than the mistake it is.
        cfs_tier::StoreUrl::File { path } if !path.is_dir() => {
            bail!("object store directory {} does not exist", path.display())
        }
        _ => {}
    }
    check_not_in_use(&dir)?;
    let store = cfg.open_store()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cfs-repair")
        .enable_all()
        .build()
        .context("cannot start the repair runtime")?;
    runtime.block_on(repair(&args, &dir, &cfg, &store))
}

/// Refuses a data dir that a mount is using.
fn check_not_in_use(dir: &DataDir) -> Result<()> {
    let mounted = crate::mounts::mounts()
        .into_iter()
        .find(|m| m.is_cfs() && Path::new(&m.source) == dir.root);
    if let Some(m) = mounted {
        bail!(
            "{} is mounted at {}: unmount it first",
            dir.root.display(),
            m.mountpoint.display()
        );
    }
    if crate::datadir::is_locked(&dir.meta_path()) {
        bail!(
            "{} is in use by another process (a running mount or repair)",
            dir.root.display()
        );
    }
    Ok(())
}

/// Turns a store error into one that says what it means for the repair.
fn store_error(e: TierError, url: &str, what: &str) -> anyhow::Error {
    match e {
        TierError::Unavailable { .. } => {
            anyhow::Error::new(e).context(format!("cannot reach the object store {url} ({what})"))
        }
        TierError::Corrupt { .. } => anyhow::Error::new(e).context(format!(
            "{what}: the object in the store is damaged (its length or crc32c is not what the \
             metadata recorded)"
        )),
        e => anyhow::Error::new(e).context(format!("{what} in {url}")),
    }
}

async fn repair(
    args: &RepairArgs,
    dir: &DataDir,
    cfg: &TierConfig,
    store: &BlobStore,
) -> Result<()> {
    let started = Instant::now();
    let marker = read_marker(dir)?;
    let (meta, flash, seq) = match (&marker, dir.meta_path().exists()) {
        (Some(m), imported) => {
            if m.url != cfg.url {
                bail!(
                    "{} holds an interrupted repair from {}, not {}: finish it with that URL, \
                     or use another data dir",
                    dir.root.display(),
                    m.url,
                    cfg.url
                );
            }
            if let Some(id) = &args.fs_id
                && *id != m.fs_id
            {
                bail!(
                    "{} holds an interrupted repair of filesystem {}, not {id}",
                    dir.root.display(),
                    m.fs_id
                );
            }
            if imported {
                eprintln!(
                    "cfs: resuming the interrupted repair of filesystem {} (checkpoint #{})",
                    m.fs_id, m.seq
                );
                let (meta, flash, created) = dir.open()?;
                if created || meta.fs_id() != m.fs_id {
                    bail!(
                        "{} holds filesystem {}, not {}, the one its repair marker names",
                        dir.root.display(),
                        meta.fs_id(),
                        m.fs_id
                    );
                }
                (meta, flash, m.seq)
            } else {
                eprintln!(
                    "cfs: restarting the interrupted repair of filesystem {}",
                    m.fs_id
                );
                let fs = FsId::new(m.fs_id.clone())?;
                import(dir, cfg, store, &fs).await?
            }
        }
        (None, true) => {
            // A filesystem lives here: never touch it.
            let (meta, _, _) = dir.open()?;
            let target = args.fs_id.as_deref();
            if target.is_some_and(|id| id != meta.fs_id()) {
                bail!(
                    "{} holds a different filesystem ({}); repair builds a new data dir",
                    dir.root.display(),
                    meta.fs_id()
                );
            }
            bail!(
                "{} already holds filesystem {} (a finished repair, or a data dir in use); \
                 repair builds a new data dir",
                dir.root.display(),
                meta.fs_id()
            );
        }
        (None, false) => {
            check_empty(dir)?;
            let fs = match &args.fs_id {
                Some(id) => FsId::new(id.clone()).context("bad --fs-id")?,
                None => {
                    let latest = read_latest(store)
                        .await
                        .map_err(|e| store_error(e, &cfg.url, "reading meta/LATEST"))?;
                    let Some(latest) = latest else {
                        bail!(
                            "no ClaudeFS metadata checkpoint in {}: {} is missing (nothing was \
                             ever published under this prefix; if the filesystem's keys are \
                             there, pass --fs-id)",
                            cfg.url,
                            ObjectKey::meta_latest()
                        );
                    };
                    FsId::new(latest.fs_id).context("meta/LATEST names a bad filesystem id")?
                }
            };
            import(dir, cfg, store, &fs).await?
        }
    };

    // From here on the data dir holds the whole metadata; every step is idempotent.
    cfg.save(dir)?;
    let files = backing_files(&meta, &flash)?;
    let downloaded = if args.lazy {
        0
    } else {
        hydrate(&meta, &flash, store, &files, args.jobs, &cfg.url).await?
    };
    meta.sync()?;
    dir.mark_clean()?;
    std::fs::remove_file(marker_path(dir)).context("cannot remove the repair marker")?;
    sync_dir(&dir.root)?;
    let counts = meta.counts()?;
    println!(
        "repaired filesystem {} from checkpoint #{seq} into {}: {} files, {} directories, {} \
         bytes{} in {:.1?}",
        meta.fs_id(),
        dir.root.display(),
        counts.files,
        counts.dirs,
        counts.bytes,
        if args.lazy {
            "; data is fetched from the store on first read (--lazy)".to_string()
        } else {
            format!(", {downloaded} bytes downloaded")
        },
        started.elapsed()
    );
    println!(
        "mount it with: cfs mount MOUNTPOINT --data-dir {}",
        dir.root.display()
    );
    Ok(())
}

fn read_marker(dir: &DataDir) -> Result<Option<Marker>> {
    let path = marker_path(dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| {
                format!(
                    "{} is damaged; remove the data dir and start over",
                    path.display()
                )
            })
            .map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes a small file durably: temp file, fsync, rename, fsync of the directory.
fn write_durably(dir: &Path, name: &str, body: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))
        .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// A new repair needs a data dir with nothing in it (or no data dir at all).
fn check_empty(dir: &DataDir) -> Result<()> {
    match std::fs::read_dir(&dir.root) {
        Ok(mut entries) => {
            if let Some(entry) = entries.next() {
                bail!(
                    "{} is not empty (it holds {:?}): repair builds a new data dir",
                    dir.root.display(),
                    entry?.file_name()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.root.display())),
    }
}

/// Steps 1 and 2: reads HEAD, downloads and verifies the checkpoint, and imports it.
async fn import(
    dir: &DataDir,
    cfg: &TierConfig,
    store: &BlobStore,
    fs: &FsId,
) -> Result<(Arc<MetaStore>, FlashDir, u64)> {
    // A publisher may replace HEAD (and delete the parts it named) while we read them; then
    // the newer HEAD is read and the download starts over.
    let mut attempts = 0;
    let (head, bytes) = loop {
        attempts += 1;
        let head = read_head(store, fs)
            .await
            .map_err(|e| store_error(e, &cfg.url, "reading the checkpoint HEAD"))?;
        let Some(head) = head else {
            bail!(
                "no metadata checkpoint for filesystem {fs} in {}: {} is missing",
                cfg.url,
                ObjectKey::meta_head(fs)
            );
        };
        if head.checkpoint_version != cfs_meta::CHECKPOINT_VERSION {
            bail!(
                "checkpoint #{} has encoding version {}; this build reads version {}",
                head.seq,
                head.checkpoint_version,
                cfs_meta::CHECKPOINT_VERSION
            );
        }
        if attempts == 1 {
            dir.prepare()?;
            let marker = Marker {
                url: cfg.url.clone(),
                fs_id: fs.to_string(),
                seq: head.seq,
            };
            write_durably(
                &dir.root,
                "repair.incomplete",
                &serde_json::to_vec_pretty(&marker)?,
            )?;
        }
        eprintln!(
            "cfs: filesystem {fs}: downloading metadata checkpoint #{} ({} bytes in {} part{}, \
             {} files, {} directories, {} bytes of data)",
            head.seq,
            head.len,
            head.parts.len(),
            if head.parts.len() == 1 { "" } else { "s" },
            head.counts.files,
            head.counts.dirs,
            head.counts.bytes
        );
        match fetch_checkpoint(store, fs, &head, |_| {}).await {
            Ok(bytes) => break (head, bytes),
            Err(TierError::NotFound { .. }) if attempts < 3 => {
                eprintln!(
                    "cfs: the checkpoint was replaced while downloading; reading the new one"
                );
                continue;
            }
            Err(e) => {
                return Err(store_error(
                    e,
                    &cfg.url,
                    &format!("downloading checkpoint #{}", head.seq),
                ));
            }
        }
    };
    // The operations logged after the checkpoint, read before anything is written.
    let log = match head.log_next {
        Some(next) => {
            let ops = cfs_tier::oplog::fetch_log(store, fs, next, head.op_seq, |_| {})
                .await
                .map_err(|e| store_error(e, &cfg.url, "reading the operation log"))?;
            eprintln!(
                "cfs: {} operation(s) logged after checkpoint #{} to replay",
                ops.len(),
                head.seq
            );
            ops
        }
        None => Vec::new(),
    };
    // Import beside meta.redb and rename: meta.redb exists only complete, which is how a
    // resumed repair knows the import is done.
    let tmp = dir.root.join("meta.redb.importing");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", tmp.display())),
    }
    let (imported, _) = MetaStore::import_checkpoint(&tmp, &bytes)
        .with_context(|| format!("cannot import checkpoint #{}", head.seq))?;
    if imported.fs_id() != fs.as_str() {
        bail!(
            "checkpoint #{} holds filesystem {}, not {fs}",
            head.seq,
            imported.fs_id()
        );
    }
    replay(&imported, &log);
    let dropped = imported
        .prepare_repaired()
        .context("cannot prepare the imported metadata")?;
    if dropped > 0 {
        eprintln!(
            "cfs: warning: {dropped} file(s) had changes that never reached the object store; \
             they come back as last uploaded"
        );
    }
    imported
        .sync()
        .context("cannot sync the imported metadata")?;
    drop(imported);
    std::fs::rename(&tmp, dir.meta_path()).with_context(|| {
        format!(
            "cannot move the metadata into {}",
            dir.meta_path().display()
        )
    })?;
    sync_dir(&dir.root)?;
    let (meta, flash, _) = dir.open()?;
    Ok((meta, flash, head.seq))
}

/// Applies the logged operations in order. Each is atomic, so if one cannot be applied
/// (which would mean a damaged log, the segments' checksums notwithstanding) the store is
/// left as of the one before it, and the rest is reported rather than half-applied.
fn replay(meta: &MetaStore, log: &[(u64, Op)]) {
    for (i, (seq, op)) in log.iter().enumerate() {
        if let Err(e) = meta.replay(*seq, op) {
            eprintln!(
                "cfs: warning: cannot replay logged operation {seq} ({e}); the filesystem is \
                 restored up to the operation before it, and {} operation(s) from it on are lost",
                log.len() - i
            );
            return;
        }
    }
}

/// Step 3: every linked regular file gets its backing file, sparse at its size, with its
/// times. Returns the files, for step 5.
fn backing_files(meta: &MetaStore, flash: &FlashDir) -> Result<Vec<Inode>> {
    let mut files = Vec::new();
    meta.for_each_inode(|inode| {
        // Orphans (unlinked while open) are purged by the first mount; they need no data.
        if inode.kind == FileKind::File && inode.nlink > 0 {
            files.push(inode);
        }
        Ok(())
    })?;
    for inode in &files {
        let f = flash
            .open_or_create(inode.ino)
            .with_context(|| format!("cannot create the backing file of inode {}", inode.ino))?;
        if f.metadata()?.len() != inode.size {
            f.set_len(inode.size)?;
        }
        restore_times(&f, inode)?;
    }
    Ok(files)
}

/// Puts the inode's atime and mtime back on its backing file, where users see them.
fn restore_times(f: &std::fs::File, inode: &Inode) -> Result<()> {
    let ts = |t: cfs_meta::Timestamp| nix::sys::time::TimeSpec::new(t.secs, i64::from(t.nanos));
    nix::sys::stat::futimens(f.as_fd(), &ts(inode.atime), &ts(inode.mtime))
        .with_context(|| format!("cannot set the times of inode {}'s backing file", inode.ino))
}

/// One blob to download.
struct Todo {
    inode: Arc<Inode>,
    k: u64,
    generation: u64,
    len: u64,
    crc32c: u32,
}

/// Step 5: downloads every evicted blob of `files`. Returns the bytes downloaded.
async fn hydrate(
    meta: &Arc<MetaStore>,
    flash: &FlashDir,
    store: &BlobStore,
    files: &[Inode],
    jobs: usize,
    url: &str,
) -> Result<u64> {
    let mut todo = Vec::new();
    for inode in files {
        let evicted = meta.evicted_of(inode.ino)?;
        if evicted.is_empty() {
            continue;
        }
        let inode = Arc::new(inode.clone());
        let blobs = meta.blobs_of(inode.ino)?;
        for (k, generation) in evicted {
            if let Some(b) = blobs
                .iter()
                .find(|b| b.k == k && b.generation == generation)
            {
                todo.push(Todo {
                    inode: Arc::clone(&inode),
                    k,
                    generation,
                    len: b.len,
                    crc32c: b.crc32c,
                });
            }
        }
    }
    let total: u64 = todo.iter().map(|t| t.len).sum();
    let progress = Progress::new(total, todo.len() as u64);
    let fs = FsId::new(meta.fs_id())?;
    futures::stream::iter(todo.into_iter().map(Ok::<_, anyhow::Error>))
        .try_for_each_concurrent(jobs, |t| {
            let (meta, flash, fs, progress) =
                (Arc::clone(meta), flash.clone(), fs.clone(), &progress);
            async move {
                let key = BlobKey::new(fs, t.inode.ino, t.k, t.generation).object_key();
                let data = store
                    .get_verified(&key, t.len, t.crc32c)
                    .await
                    .map_err(|e| store_error(e, url, &format!("downloading {key}")))?;
                let inode = Arc::clone(&t.inode);
                let (k, generation) = (t.k, t.generation);
                tokio::task::spawn_blocking(move || -> Result<()> {
                    let f = flash.open_rw(inode.ino)?;
                    // Never past the file's size: a blob uploaded before the file shrank
                    // (and the shrink not uploaded yet) must not grow it back. Holes stay
                    // holes, as the hydrator leaves them.
                    write_fetched(&f, &data, k * BLOB_SIZE, inode.size)?;
                    f.sync_data()?;
                    restore_times(&f, &inode)?;
                    meta.execute(&Op::Hydrated {
                        ino: inode.ino,
                        k,
                        generation,
                    })?;
                    meta.sync()?;
                    Ok(())
                })
                .await
                .context("blob write task")?
                .with_context(|| format!("cannot write blob {k} of inode {}", t.inode.ino))?;
                progress.blob_done(t.len);
                Ok(())
            }
        })
        .await?;
    progress.finish();
    Ok(total)
}

/// Progress of the download: a bar on a terminal, else a log line at most every second.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    blobs: u64,
    done: AtomicU64,
    blobs_done: AtomicU64,
    started: Instant,
    last_line: std::sync::Mutex<Option<Instant>>,
}

impl Progress {
    fn new(total: u64, blobs: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message("downloading blobs");
            bar
        });
        eprintln!("cfs: downloading {blobs} blobs, {total} bytes");
        Progress {
            bar,
            total,
            blobs,
            done: AtomicU64::new(0),
            blobs_done: AtomicU64::new(0),
            started: Instant::now(),
            last_line: std::sync::Mutex::new(None),
        }
    }

    fn blob_done(&self, len: u64) {
        let done = self.done.fetch_add(len, Ordering::Relaxed) + len;
        let blobs = self.blobs_done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) && blobs < self.blobs {
            return;
        }
        *last = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        // A rate from the first second says little; leave the ETA out until there is one.
        let eta = if secs >= 1.0 && rate > 0.0 {
            format!("{:.0} s", (self.total - done) as f64 / rate)
        } else {
            "?".to_string()
        };
        let mib = |b: f64| b / f64::from(1 << 20);
        let pct = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        eprintln!(
            "cfs: repair: {blobs}/{} blobs, {:.1} of {:.1} MiB ({pct:.0}%), {:.1} MiB/s, ETA {eta}",
            self.blobs,
            mib(done as f64),
            mib(self.total as f64),
            mib(rate),
        );
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_with_message("downloaded");
        }
    }
}
