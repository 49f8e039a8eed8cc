//! The data dir: where one filesystem lives on a node.
//!
//! ```text
//! DIR/meta.redb     metadata (inodes, entries, xattrs)
//! DIR/flash/        backing files, one per regular file
//! DIR/control.sock  status socket of the running mount
//! DIR/cfs.log       daemon log when mounted with --background
//! DIR/clean         present only after a clean unmount
//! DIR/tier.json     the object store this filesystem's blobs live in (see TierConfig)
//! DIR/objects/      the embedded default object store, a local directory
//! ```

use anyhow::{Context, Result, bail};
use cfs_flash::FlashDir;
use cfs_meta::{FileKind, MetaStore, Op, Timestamp};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    /// The default data dir for filesystem `name`.
    pub fn default_for(name: &str) -> Result<PathBuf> {
        if nix::unistd::geteuid().is_root() {
            return Ok(PathBuf::from("/var/lib/cfs").join(name));
        }
        let base = match std::env::var_os("XDG_DATA_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".local/share"),
                None => bail!("neither XDG_DATA_HOME nor HOME is set; pass --data-dir"),
            },
        };
        Ok(base.join("cfs").join(name))
    }

    pub fn new(root: &Path) -> DataDir {
        DataDir {
            root: root.to_path_buf(),
        }
    }

    pub fn meta_path(&self) -> PathBuf {
        self.root.join("meta.redb")
    }
    pub fn flash_path(&self) -> PathBuf {
        self.root.join("flash")
    }
    pub fn socket_path(&self) -> PathBuf {
        self.root.join("control.sock")
    }
    pub fn log_path(&self) -> PathBuf {
        self.root.join("cfs.log")
    }
    pub fn tier_config_path(&self) -> PathBuf {
        self.root.join("tier.json")
    }
    /// The embedded default object store: a local directory standing in for S3.
    pub fn default_objects_path(&self) -> PathBuf {
        self.root.join("objects")
    }
    fn clean_marker(&self) -> PathBuf {
        self.root.join("clean")
    }

    /// True if a filesystem was ever created here.
    pub fn exists(&self) -> bool {
        self.meta_path().is_file()
    }

    /// Checks that the data dir can hold a filesystem, creating it if missing.
    pub fn prepare(&self) -> Result<()> {
        if self.root.exists() && !self.root.is_dir() {
            bail!(
                "data dir {} exists and is not a directory",
                self.root.display()
            );
        }
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create data dir {}", self.root.display()))?;
        let probe = self.root.join(".cfs-write-test");
        std::fs::write(&probe, b"")
            .with_context(|| format!("data dir {} is not writable", self.root.display()))?;
        let _ = std::fs::remove_file(probe);
        Ok(())
    }

    /// Opens (creating on first use) the metadata store and the flash dir.
    pub fn open(&self) -> Result<(Arc<MetaStore>, FlashDir, bool)> {
        let (meta, created) = self.open_meta()?;
        let flash = FlashDir::open(&self.flash_path())
            .with_context(|| format!("cannot open flash dir {}", self.flash_path().display()))?;
        Ok((Arc::new(meta), flash, created))
    }

    /// Opens (creating on first use) the metadata store alone, and says whether it was
    /// created.
    pub fn open_meta(&self) -> Result<(MetaStore, bool)> {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        MetaStore::open(&self.meta_path(), Timestamp::now(), uid, gid)
            .with_context(|| format!("cannot open metadata in {}", self.root.display()))
    }

    /// Brings metadata and flash back in step before serving: purges inodes that were
    /// unlinked while open, and after an unclean stop also removes backing files that no
    /// committed inode owns and re-reads file sizes from the backing files.
    pub fn recover(&self, meta: &MetaStore, flash: &FlashDir, tier: bool) -> Result<()> {
        let clean = self.clean_marker().exists();
        let _ = std::fs::remove_file(self.clean_marker());
        // Before this recovery logs anything: the operations the store held at the crash.
        let durable_seq = meta.log_durable_seq();
        let mut purged = purge_orphans(meta, flash)?;
        let (mut stray, mut resized, mut recreated) = (0, 0, Vec::new());
        if !clean {
            let mut files = std::collections::HashMap::new();
            meta.for_each_inode(|inode| {
                if inode.kind == FileKind::File {
                    files.insert(inode.ino, (inode.size, inode.mtime));
                }
                Ok(())
            })?;
            let mut records = Vec::new();
            for entry in flash.scan()? {
                match entry {
                    Ok(cfs_flash::BackingFile { ino, size, .. }) => match files.get(&ino) {
                        None => match origin(flash, ino) {
                            Some(origin) => records.push((ino, origin)),
                            None => {
                                flash.remove(ino)?;
                                stray += 1;
                            }
                        },
                        Some(&(size_then, mtime_then)) => {
                            let md = flash.metadata(ino)?;
                            let d = cfs_fuse::DataAttr::from_metadata(&md);
                            if size_then == size && mtime_then == d.mtime {
                                continue;
                            }
                            // Written after its metadata was last recorded (passthrough
                            // writes before the crash).
                            record_backing_file(meta, ino, &d, tier)?;
                            resized += 1;
                        }
                    },
                    Err(path) => {
                        tracing::warn!(path = %path.display(), "unknown file in flash dir left alone")
                    }
                }
            }
            let (keep, dropped) = cfs_meta::recoverable(records, durable_seq);
            for ino in dropped {
                tracing::info!(
                    ino,
                    "backing file with an origin record dropped: its file was deleted, or a newer file of its name replaced it"
                );
                flash.remove(ino)?;
                stray += 1;
            }
            for (ino, origin) in keep {
                if let Some(name) = recreate_from(meta, flash, ino, &origin, tier)? {
                    tracing::info!(
                        ino,
                        name = %String::from_utf8_lossy(&name),
                        "file created again from its backing file's origin record: its fsync returned before the crash, its create in the metadata store was not yet durable"
                    );
                    recreated.push(ino);
                } else {
                    flash.remove(ino)?;
                    stray += 1;
                }
            }
            // Files that records unlinked again.
            purged += purge_orphans(meta, flash)?;
        }
        meta.sync()?;
        settle_records(flash, &recreated, stray + purged > 0)?;
        if purged + stray + resized + recreated.len() > 0 || !clean {
            tracing::info!(
                clean,
                purged,
                files_recreated = recreated.len(),
                stray_backing_files = stray,
                files_changed = resized,
                "recovery done"
            );
        }
        Ok(())
    }

    /// Records a clean stop, so the next mount can skip the full scan.
    pub fn mark_clean(&self) -> Result<()> {
        std::fs::write(self.clean_marker(), b"")?;
        Ok(())
    }
}

/// Purges the inodes left unlinked while open (and their backing files); how many.
fn purge_orphans(meta: &MetaStore, flash: &FlashDir) -> Result<usize> {
    let mut purged = 0;
    for ino in meta.orphans()? {
        if let cfs_meta::Outcome::Purged(Some(_)) = meta.execute(&Op::Purge { ino })? {
            flash.remove(ino)?;
            purged += 1;
        }
    }
    Ok(purged)
}

/// Once the store holds the files created again from records (`recreated`), clears their
/// records and makes that, and the removal of backing files (`removed`), durable: a record
/// left behind would outlive the store's knowledge of its file, and after a later delete and
/// a second crash bring the file back.
pub(crate) fn settle_records(flash: &FlashDir, recreated: &[u64], removed: bool) -> Result<()> {
    for &ino in recreated {
        let file = flash.open_rw(ino)?;
        cfs_flash::origin::clear(&file)?;
    }
    if removed || !recreated.is_empty() {
        flash.sync_everything()?;
    }
    Ok(())
}

/// The origin record of `ino`'s backing file, decoded, if it has one that describes that
/// file (a read error is logged and taken as none: the file is then a stray).
pub(crate) fn origin(flash: &FlashDir, ino: u64) -> Option<cfs_meta::Origin> {
    let record = match cfs_flash::origin::get(&flash.path(ino)) {
        Ok(record) => record?,
        Err(e) => {
            tracing::warn!(ino, error = %e, "cannot read a backing file's origin record");
            return None;
        }
    };
    // `None` too for a record left by the file this backing file once belonged to.
    cfs_meta::decode_origin(ino, &record)
}

/// Creates file `ino` again from its origin record, if it still fits the namespace, with the
/// size and times of the backing file, queued for upload with a tier. The name it got, or
/// `None`: a stray.
pub(crate) fn recreate_from(
    meta: &MetaStore,
    flash: &FlashDir,
    ino: u64,
    origin: &cfs_meta::Origin,
    tier: bool,
) -> Result<Option<Vec<u8>>> {
    let Some(name) = meta.recover_create(ino, origin)? else {
        return Ok(None);
    };
    let d = cfs_fuse::DataAttr::from_metadata(&flash.metadata(ino)?);
    record_backing_file(meta, ino, &d, tier)?;
    Ok(Some(name))
}

/// Records the size and times of `ino`'s backing file as its own and, with an object tier,
/// queues it for upload: what recovery does for data the store has not recorded yet.
fn record_backing_file(
    meta: &MetaStore,
    ino: u64,
    d: &cfs_fuse::DataAttr,
    tier: bool,
) -> Result<()> {
    meta.execute(&Op::SyncData {
        ino,
        size: d.size,
        atime: d.atime,
        mtime: d.mtime,
        ctime: d.ctime,
    })?;
    if tier {
        meta.execute(&Op::MarkDirty { ino })?;
    }
    Ok(())
}

/// Which object store holds this filesystem's blobs. Written at the first mount (or by
/// `cfs repair --from-s3`) and read by every later mount, so that a data dir is never mounted
/// against a store that does not hold its blobs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TierConfig {
    /// `s3://bucket/prefix`, `file:///abs/path` or `memory://`.
    pub url: String,
    /// Endpoint, region and checksum, as `cfs mount` or `cfs repair` was given them.
    #[serde(flatten)]
    pub s3: crate::cli::S3Args,
}

impl TierConfig {
    /// Reads `DIR/tier.json`; `None` if the data dir has none yet.
    pub fn load(dir: &DataDir) -> Result<Option<TierConfig>> {
        let path = dir.tier_config_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not valid", path.display()))
                .map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Opens the object store this config names. `s3://` needs credentials from the
    /// environment or the AWS shared files: without any, the S3 client would go looking for
    /// instance credentials on the network, a slow failure anywhere but EC2, so that is
    /// refused up front.
    pub fn open_store(&self) -> Result<cfs_tier::BlobStore> {
        let url = self.url.as_str();
        let parsed: cfs_tier::StoreUrl = url
            .parse()
            .with_context(|| format!("bad object store URL {url:?}"))?;
        let opts = cfs_tier::S3Options {
            endpoint: self.s3.endpoint.clone(),
            region: self.s3.region.clone(),
            checksum: self.s3.checksum,
            ..cfs_tier::S3Options::default()
        };
        if matches!(parsed, cfs_tier::StoreUrl::S3 { .. }) {
            match opts
                .credential_source()
                .with_context(|| format!("cannot open object store {url}"))?
            {
                Some(source) => {
                    tracing::info!(object_store = url, credentials = %source, "S3 credentials")
                }
                None => bail!(
                    "s3:// needs credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in \
                     the environment, or a profile in ~/.aws/credentials (AWS_PROFILE picks one)"
                ),
            }
        }
        parsed
            .open(&opts)
            .with_context(|| format!("cannot open object store {url}"))
    }

    /// Writes `DIR/tier.json` atomically (temp file, fsync, rename).
    pub fn save(&self, dir: &DataDir) -> Result<()> {
        let path = dir.tier_config_path();
        let tmp = dir.root.join(".tier.json.tmp");
        let body = serde_json::to_vec_pretty(self)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

/// True if a process holds the metadata database open (redb takes an exclusive `flock`).
pub fn is_locked(db: &Path) -> bool {
    let Ok(file) = std::fs::File::open(db) else {
        return false;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(_unlocked_on_drop) => false,
        Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
    }
}
