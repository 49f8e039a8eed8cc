//! The filesystem object shared by all FUSE worker threads, and its non-FUSE entry points.

use crate::attr::{DataAttr, to_file_attr};
use crate::errno::FsResult;
use crate::handles::Handles;
use cfs_flash::FlashDir;
use cfs_meta::{FileKind, Inode, MetaStore, Op, Outcome};
use fuser::FileAttr;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

pub use cfs_meta::BLOB_SIZE;

/// Mount-time choices that change how requests are served.
#[derive(Clone)]
pub struct FsOptions {
    /// Hand the kernel backing fds, if it supports passthrough.
    pub passthrough: bool,
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    /// The object tier behind flash, if there is one.
    pub tier: Option<Arc<dyn TierHooks>>,
    /// How long a thread keeps a CPU busy after each request (see [`crate::busy_poll`]);
    /// `None`: no such thread.
    pub busy_poll: Option<Duration>,
}

/// What the FUSE layer asks of the object tier.
pub trait TierHooks: Send + Sync {
    /// A file's data changed on flash and is on the persistent upload queue.
    fn data_changed(&self, ino: u64);
    /// Brings blob `k` of `ino` back on flash if it is evicted; blocks until it is there.
    fn hydrate(&self, ino: u64, k: u64) -> std::io::Result<()>;
    /// Starts bringing blob `k` of `ino` back in the background, if it is evicted.
    fn prefetch(&self, ino: u64, k: u64);
    /// Bytes `offset..offset + len` of `ino` straight from the object store, without
    /// bringing their blob back, when they lie in one evicted blob that can be read in part:
    /// a random read then waits for one small ranged GET, not for 64 MiB. `None`: bring the
    /// blob back instead ([`TierHooks::hydrate`]).
    fn read_evicted(&self, ino: u64, offset: u64, len: u64) -> std::io::Result<Option<Vec<u8>>>;
    /// Blob `k` of `ino` as fetched from the object store and verified against its recorded
    /// checksum, for a sequential reader: its bytes are served from memory as soon as they
    /// are verified, without waiting for (or reading back) their write to flash. `None`:
    /// the blob is on flash; read it there.
    fn read_blob(&self, ino: u64, k: u64) -> std::io::Result<Option<FetchedBlob>>;
    /// The data of `ino` changed through the daemon, or a cold handle of it was released:
    /// blob bytes kept for [`TierHooks::read_blob`] may be older than the file now.
    fn forget_fetched(&self, ino: u64);
    /// The `user.cfs.tier` policy of `ino` changed.
    fn policy_changed(&self, ino: u64);
    /// Called before new data may land on flash (a create, an open for writing): waits
    /// while flash is full and the tier is making room, and fails with `ENOSPC` only if it
    /// cannot (the object store is down, or everything on flash is dirty or pinned).
    fn admit_write(&self) -> std::io::Result<()>;
    /// Whether [`TierHooks::admit_write`] would wait now: a cheap look, no waiting.
    fn flash_full(&self) -> bool;
}

/// The bytes of one fetched blob, shared with the tier's cache of recent blobs (no copy).
pub type FetchedBlob = Box<dyn AsRef<[u8]> + Send>;

impl std::fmt::Debug for FsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsOptions")
            .field("passthrough", &self.passthrough)
            .field("attr_ttl", &self.attr_ttl)
            .field("entry_ttl", &self.entry_ttl)
            .field("object_tier", &self.tier.is_some())
            .field("busy_poll", &self.busy_poll)
            .finish()
    }
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            passthrough: true,
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            tier: None,
            busy_poll: None,
        }
    }
}

/// What a running mount reports to `cfs status`.
#[derive(Debug, Clone, Serialize)]
pub struct FsStatus {
    pub passthrough_active: bool,
    /// The busy-poll window in microseconds; 0: no busy-poll thread.
    pub busy_poll_us: u64,
    pub open_handles: usize,
    pub passthrough_opens: u64,
    pub daemon_opens: u64,
    /// Deleted files whose backing files are still on flash: queued for the purge thread,
    /// or purged and waiting for the purge to be durable (see `purger`).
    pub deletions_pending: u64,
}

/// The state of a running mount that others (the control socket) may read while the FUSE
/// session owns the filesystem.
#[derive(Default)]
pub struct Live {
    /// Decided at `init`, and turned off for good if the kernel refuses a backing fd.
    pub(crate) passthrough: AtomicBool,
    /// Set at `init` when the kernel offers zero-message opendir (see `opendir`).
    pub(crate) no_opendir: AtomicBool,
    /// Set at `init` when the kernel lets direct-I/O files be mmapped (see `open`).
    pub(crate) direct_io_mmap: AtomicBool,
    /// Set for good when the flash filesystem refuses an origin record (no `user.`
    /// xattrs): fsyncs of new files then commit the metadata store instead.
    pub(crate) no_origin: AtomicBool,
    /// The busy-poll thread's window in microseconds, set when it starts; 0: none.
    pub(crate) busy_poll_us: AtomicU64,
    pub(crate) handles: Handles,
    pub(crate) passthrough_opens: AtomicU64,
    pub(crate) daemon_opens: AtomicU64,
    /// Kept by the purge thread: [`FsStatus::deletions_pending`].
    pub(crate) deletions_pending: Arc<AtomicU64>,
    /// Tells the kernel of changes it did not make itself; set once the session exists.
    notifier: std::sync::OnceLock<fuser::Notifier>,
    /// Drops cached pages behind sequential readers of cold files; set with the notifier.
    drop_behind: std::sync::OnceLock<crate::drop_behind::DropBehind>,
}

impl Live {
    /// Runs `f` if no handle of `ino` is open (and no truncation of it is running), keeping
    /// new opens of it waiting meanwhile; false if it is in use.
    pub fn while_closed(&self, ino: u64, f: &mut dyn FnMut()) -> bool {
        self.handles.while_unused(ino, f)
    }

    /// Whether a handle of `ino` is open (or a truncation of it is running).
    pub fn is_open(&self, ino: u64) -> bool {
        self.handles.in_use(ino)
    }

    /// When `ino` was last opened or closed in this mount.
    pub fn last_used(&self, ino: u64) -> Option<std::time::Instant> {
        self.handles.last_used(ino)
    }

    /// Hands over the session's notifier, for changes the daemon makes on its own.
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        if let Some(d) = crate::drop_behind::DropBehind::start(notifier.clone()) {
            let _ = self.drop_behind.set(d);
        }
        let _ = self.notifier.set(notifier);
    }

    /// Lets the kernel drop its cached pages of `ino` in `start..end` (bytes), in the
    /// background (see [`crate::drop_behind`]); false if that was not asked for.
    pub(crate) fn drop_cached(&self, ino: u64, start: u64, end: u64) -> bool {
        self.drop_behind
            .get()
            .is_some_and(|d| d.drop_range(ino, start, end))
    }

    /// Drops the kernel's cached attributes of `ino`, after the daemon changed them on its
    /// own or in a request whose reply carries none (a write that cleared set-id bits, a
    /// blob evicted or brought back, which changes the block count). The attribute TTL is
    /// long, so every such change must come through here.
    pub fn invalidate_attrs(&self, ino: u64) {
        if let Some(n) = self.notifier.get()
            // A negative offset: the attributes only, no page cache.
            && let Err(e) = n.inval_inode(fuser::INodeNo(ino), -1, 0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(ino, error = %e, "cannot invalidate the kernel's attributes");
        }
    }

    pub fn status(&self) -> FsStatus {
        FsStatus {
            passthrough_active: self.passthrough.load(Ordering::Relaxed),
            busy_poll_us: self.busy_poll_us.load(Ordering::SeqCst),
            open_handles: self.handles.count(),
            passthrough_opens: self.passthrough_opens.load(Ordering::Relaxed),
            daemon_opens: self.daemon_opens.load(Ordering::Relaxed),
            deletions_pending: self.deletions_pending.load(Ordering::Relaxed),
        }
    }
}

pub struct ClaudeFs {
    /// What requests work on; shared with the requests answered from [`ClaudeFs::slow`].
    pub(crate) core: Arc<Core>,
    /// Started at `init` when [`FsOptions::busy_poll`] asks for it.
    pub(crate) busy: Option<crate::busy_poll::BusyPoll>,
    /// Answers the requests that may block for long (see [`crate::offload`]).
    pub(crate) slow: crate::offload::Offload,
}

/// The filesystem's state and the logic on it, apart from the FUSE session's own parts: a
/// request handed to another thread takes it along.
pub struct Core {
    pub(crate) meta: Arc<MetaStore>,
    pub(crate) flash: FlashDir,
    pub(crate) opts: FsOptions,
    pub(crate) live: Arc<Live>,
    pub(crate) purger: crate::purger::Purger,
}

impl std::ops::Deref for ClaudeFs {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

impl ClaudeFs {
    pub fn new(meta: Arc<MetaStore>, flash: FlashDir, opts: FsOptions) -> ClaudeFs {
        let live = Arc::new(Live::default());
        let pending = Arc::clone(&live.deletions_pending);
        ClaudeFs {
            core: Arc::new(Core {
                purger: crate::purger::Purger::new(Arc::clone(&meta), flash.clone(), pending),
                meta,
                flash,
                opts,
                live,
            }),
            busy: None,
            slow: crate::offload::Offload::new(),
        }
    }

    /// Notes a request that moves no data for the busy-poll thread, if there is one.
    pub(crate) fn busy_touch(&self, req: &fuser::Request) {
        self.busy_touch_io(req, 0);
    }

    /// Notes a READ or WRITE of `bytes` for the busy-poll thread, if there is one (see
    /// [`BusyPoll::touch_io`](crate::busy_poll::BusyPoll::touch_io)).
    pub(crate) fn busy_touch_io(&self, req: &fuser::Request, bytes: usize) {
        if let Some(b) = &self.busy {
            b.touch_io(req.pid(), bytes);
        }
    }

    /// A handle on the live state that stays valid after the session takes the filesystem.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live)
    }

    /// Runs `job` with the filesystem's state on a thread of the slow pool.
    pub(crate) fn offload(&self, job: impl FnOnce(&Core) + Send + 'static) {
        let core = Arc::clone(&self.core);
        self.slow.run(move || job(&core));
    }
}

impl Core {
    pub(crate) fn attr_of(&self, inode: &Inode) -> FileAttr {
        let data = if inode.kind == FileKind::File {
            DataAttr::read(&self.flash, inode.ino)
        } else {
            None
        };
        to_file_attr(inode, data)
    }

    pub(crate) fn inode_outcome(outcome: Outcome) -> FsResult<Inode> {
        match outcome {
            Outcome::Inode(inode) => Ok(inode),
            _ => Err(crate::FsError::Errno(fuser::Errno::EIO)),
        }
    }

    /// Brings the inode's recorded size and times up to the backing file's, and queues the
    /// file for upload if its data changed. Writes that bypassed the daemon (passthrough) are
    /// seen by their effect on size or mtime; `written` says the daemon itself wrote through
    /// the handle, which must queue the file even when size and mtime match (a same-size
    /// rewrite within the clock's granularity, or one whose times a SETATTR put back).
    /// Closing a file that was opened for writing but not written costs no metadata commit.
    /// Returns the backing file's size as read here (`None`: it has none).
    pub(crate) fn sync_data_attr(&self, ino: u64, written: bool) -> FsResult<Option<u64>> {
        let Some(DataSync { size, ops }) = self.data_sync(ino) else {
            return Ok(None);
        };
        if ops.is_empty() {
            if written {
                self.data_changed(ino)?;
            }
            return Ok(Some(size));
        }
        match self.meta.execute_batch(&ops) {
            Ok(_) => self.queued(&ops),
            Err(cfs_meta::MetaError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Some(size))
    }

    /// What [`Core::sync_data_attr`] commits for `ino`, without committing it, so that a
    /// caller can put it in the same commit as its own operation. `None`: no backing file.
    pub(crate) fn data_sync(&self, ino: u64) -> Option<DataSync> {
        let d = DataAttr::read(&self.flash, ino)?;
        let mut ops = Vec::new();
        if !self
            .meta
            .inode(ino)
            .is_ok_and(|inode| inode.size == d.size && inode.mtime == d.mtime)
        {
            ops.push(Op::SyncData {
                ino,
                size: d.size,
                atime: d.atime,
                mtime: d.mtime,
                ctime: d.ctime,
            });
            // With a tier the upload mark goes in the same commit: one commit per file
            // written and closed, not two.
            if self.opts.tier.is_some() {
                ops.push(Op::MarkDirty { ino });
            }
        }
        Some(DataSync { size: d.size, ops })
    }

    /// Tells the tier of each file whose upload mark `committed` (operations just applied)
    /// set.
    pub(crate) fn queued(&self, committed: &[Op]) {
        if let Some(tier) = &self.opts.tier {
            for op in committed {
                if let Op::MarkDirty { ino } = op {
                    tier.data_changed(*ino);
                }
            }
        }
    }

    /// Clears set-user-ID, set-group-ID and the `security.capability` xattr of `ino` after a
    /// change of its data or owner, as POSIX and Linux do. The mount negotiates
    /// FUSE_HANDLE_KILLPRIV_V2 (see `init`), which leaves this to the filesystem; in exchange
    /// the kernel stops asking for `security.capability` before every write.
    pub(crate) fn kill_privileges(&self, ino: u64) -> FsResult<()> {
        let inode = self.meta.inode(ino)?;
        let mut ops = Vec::new();
        if let Some(perm) = without_set_id(&inode) {
            ops.push(Op::SetAttr {
                ino,
                attr: cfs_meta::SetAttr {
                    perm: Some(perm),
                    ..Default::default()
                },
                now: cfs_meta::Timestamp::now(),
            });
        }
        if inode.kind != FileKind::Dir && self.meta.xattr(ino, CAPABILITY_XATTR).is_ok() {
            ops.push(Op::RemoveXattr {
                ino,
                name: CAPABILITY_XATTR.to_vec(),
                now: cfs_meta::Timestamp::now(),
            });
        }
        if !ops.is_empty() {
            tracing::debug!(
                ino,
                "clearing set-id bits or file capabilities after a change"
            );
            self.meta.execute_batch(&ops)?;
            self.live.invalidate_attrs(ino);
        }
        Ok(())
    }

    /// Writes `record` as the origin of the backing file `file` (see `cfs_flash::origin`);
    /// false if it cannot, and the fsync must commit the metadata store instead.
    pub(crate) fn covers_by_origin(&self, file: &std::fs::File, record: &[u8]) -> bool {
        if self.live.no_origin.load(Ordering::Relaxed) {
            return false;
        }
        match cfs_flash::origin::set(file, record) {
            Ok(()) => true,
            Err(e) => {
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    self.live.no_origin.store(true, Ordering::Relaxed);
                    tracing::info!(
                        "the flash filesystem has no user xattrs: an fsync of a new file commits the metadata store"
                    );
                } else {
                    tracing::warn!(error = %e, "cannot write a backing file's origin record; committing the metadata store instead");
                }
                false
            }
        }
    }

    /// Queues the file for upload, if there is an object tier.
    pub(crate) fn data_changed(&self, ino: u64) -> FsResult<()> {
        if let Some(tier) = &self.opts.tier {
            match self.meta.execute(&Op::MarkDirty { ino }) {
                Ok(_) | Err(cfs_meta::MetaError::NotFound) => tier.data_changed(ino),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Makes sure every blob of `ino` that `range` touches is on flash, fetching the evicted
    /// ones. Bytes past the end of the backing file are not data and need nothing.
    pub(crate) fn ensure_present(&self, ino: u64, range: std::ops::Range<u64>) -> FsResult<()> {
        let Some(tier) = &self.opts.tier else {
            return Ok(());
        };
        if range.start >= range.end {
            return Ok(());
        }
        let evicted = self.meta.evicted_of(ino)?;
        if evicted.is_empty() {
            return Ok(());
        }
        // A blob that starts at or past the end holds no data (a truncation dropped its mark);
        // any other blob the range touches is fetched, also for a write past the end into a
        // blob that holds data before the end.
        let size = DataAttr::read(&self.flash, ino).map_or(0, |d| d.size);
        let first = range.start / BLOB_SIZE;
        let last = (range.end - 1) / BLOB_SIZE;
        let mut hydrated = false;
        let mut result = Ok(());
        for (k, _) in evicted {
            if (first..=last).contains(&k) && k * BLOB_SIZE < size {
                if let Err(e) = tier.hydrate(ino, k) {
                    tracing::warn!(ino, k, error = %e, "cannot bring a blob back from the object store");
                    result = Err(crate::FsError::Errno(fuser::Errno::EIO));
                    break;
                }
                hydrated = true;
            }
        }
        if hydrated {
            self.live.invalidate_attrs(ino);
        }
        result
    }

    /// Waits for room on flash before new data is written (see [`TierHooks::admit_write`]).
    pub(crate) fn admit_write(&self) -> FsResult<()> {
        match &self.opts.tier {
            Some(tier) => tier.admit_write().map_err(|e| {
                tracing::warn!(error = %e, "flash is full and the object tier cannot make room");
                crate::FsError::Errno(fuser::Errno::ENOSPC)
            }),
            None => Ok(()),
        }
    }

    /// Whether new data would have to wait for room on flash (see [`Core::admit_write`]):
    /// such a request is answered off the FUSE threads.
    pub(crate) fn must_wait_for_room(&self) -> bool {
        self.opts.tier.as_ref().is_some_and(|t| t.flash_full())
    }

    /// Tells the tier that the data of `ino` may have changed (see
    /// [`TierHooks::forget_fetched`]).
    pub(crate) fn forget_fetched(&self, ino: u64) {
        if let Some(tier) = &self.opts.tier {
            tier.forget_fetched(ino);
        }
    }

    /// True if some blob of `ino` is off flash.
    pub(crate) fn is_cold(&self, ino: u64) -> FsResult<bool> {
        Ok(self.opts.tier.is_some() && self.meta.has_evicted(ino)?)
    }

    /// The inode of `ino` and [`Self::is_cold`], with a tier in one metadata read.
    pub(crate) fn inode_and_cold(&self, ino: u64) -> FsResult<(cfs_meta::Inode, bool)> {
        if self.opts.tier.is_some() {
            Ok(self.meta.inode_and_evicted(ino)?)
        } else {
            Ok((self.meta.inode(ino)?, false))
        }
    }

    /// Deletes an inode whose last link is gone, once nothing references it: queued for the
    /// purge thread (see `purger`).
    pub(crate) fn purge(&self, ino: u64) {
        self.live.handles.forget(ino);
        self.purger.purge(ino);
    }
}

/// The xattr that holds a file's capabilities, cleared with the set-id bits.
const CAPABILITY_XATTR: &[u8] = b"security.capability";

/// Whether a write or chown of `inode` must clear set-id bits (see [`without_set_id`] and
/// [`ClaudeFs::kill_privileges`]).
pub(crate) fn has_set_id(inode: &cfs_meta::Inode) -> bool {
    without_set_id(inode).is_some()
}

/// The permission bits a file keeps once a change clears its set-id bits, or `None` if it
/// has none to clear. Set-group-ID without group execute marks mandatory locking, not a
/// privilege, and stays, as on Linux. Directories keep theirs: there set-group-ID is
/// inheritance.
fn without_set_id(inode: &cfs_meta::Inode) -> Option<u32> {
    const S_ISUID: u32 = 0o4000;
    const S_ISGID: u32 = 0o2000;
    const S_IXGRP: u32 = 0o0010;
    if inode.kind == FileKind::Dir {
        return None;
    }
    let mut perm = inode.perm;
    perm &= !S_ISUID;
    if perm & (S_ISGID | S_IXGRP) == (S_ISGID | S_IXGRP) {
        perm &= !S_ISGID;
    }
    (perm != inode.perm).then_some(perm)
}

/// A backing file's size as read, and the operations that record it and its times in the
/// file's inode (none when the inode already holds them).
pub(crate) struct DataSync {
    pub size: u64,
    pub ops: Vec<Op>,
}
