//! The metadata store: one redb database per node.
//!
//! Writes are group-committed. Each operation commits with `Durability::None`, which makes it
//! visible at once but durable only at the next durable commit. [`MetaStore::sync`] makes
//! everything applied so far durable with one fsync, however many callers wait on it; a
//! background flusher does the same every second, as a journalling filesystem does.

use crate::op::{Op, Outcome};
use crate::pending::Pending;
use crate::tables::*;
use crate::{DirEntry, FileKind, Ino, Inode, MetaError, ROOT_INO, Result, Timestamp};
use parking_lot::Mutex;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The on-disk format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

pub struct MetaStore {
    pub(crate) db: Database,
    fs_id: String,
    next_ino: AtomicU64,
    /// Number of commits so far; `durable` is the value it had at the last durable commit.
    pub(crate) committed: AtomicU64,
    /// Number of those that changed the filesystem (not the log's own bookkeeping).
    pub(crate) changes: AtomicU64,
    durable: AtomicU64,
    /// The newest logged operation's sequence number, and the newest one known durable (the
    /// operation log ships only durable operations; see `oplog`).
    pub(crate) applied_seq: AtomicU64,
    pub(crate) durable_seq: AtomicU64,
    /// Serialises durable commits, so that concurrent `sync` calls share one.
    sync_lock: Mutex<()>,
    /// Operations applied but not committed yet (see `pending`), and whether there are any,
    /// so that readers take the lock only then.
    pending: Mutex<Option<Pending>>,
    has_pending: AtomicBool,
    /// Data outside the store that commits describe, made durable before each durable
    /// commit (see [`MetaStore::set_data_barrier`]).
    barrier: parking_lot::RwLock<Option<std::sync::Arc<dyn DataBarrier>>>,
    /// Held shared while such data is written and described, exclusively by `sync`.
    gate: parking_lot::RwLock<()>,
    /// Namespace changes since the last durable commit, for `fsync_plan` and
    /// `sync_namespace`; locked inside `pending` where both are.
    covers: parking_lot::Mutex<crate::cover::Covers>,
    /// When each file was last queued for upload (see `marks`); locked inside `pending`.
    marks: parking_lot::Mutex<crate::marks::Marks>,
}

/// Data that metadata describes but that lives outside the store (blobs written back to
/// flash), which must be durable before the metadata saying so is.
pub trait DataBarrier: Send + Sync {
    /// Makes durable every such write made so far.
    fn sync_data(&self) -> std::io::Result<()>;
}

/// The object tier's bookkeeping, for `cfs status`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TierCounts {
    pub blobs_stored: u64,
    /// The file bytes the stored blobs hold: more than the bucket takes, where blobs of
    /// zeros are stored as short markers.
    pub bytes_stored: u64,
    pub files_dirty: u64,
    /// Bytes of the files on the upload queue (an upper bound on the flush backlog).
    pub bytes_dirty: u64,
    /// Blobs of the files on the upload queue (each such file counts all its blobs).
    #[serde(default)]
    pub blobs_dirty: u64,
    pub deletes_pending: u64,
    pub blobs_evicted: u64,
    pub bytes_evicted: u64,
}

/// A blob that may be evicted: committed in the store, present on flash, its file clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvictCandidate {
    pub ino: Ino,
    pub k: u64,
    pub generation: u64,
    pub len: u64,
}

/// Counts shown by `cfs status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MetaCounts {
    pub inodes: u64,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub orphans: u64,
}

/// Adds `inode` to running totals of regular files, directories and file bytes: the same
/// totals for `cfs status` ([`MetaCounts`]) and for a checkpoint's record of what it holds.
pub(crate) fn tally(inode: &Inode, files: &mut u64, dirs: &mut u64, bytes: &mut u64) {
    match inode.kind {
        FileKind::File => {
            *files += 1;
            *bytes += inode.size;
        }
        FileKind::Dir => *dirs += 1,
        _ => {}
    }
}

impl MetaStore {
    /// Opens the store at `path`, creating and formatting it if it does not exist.
    /// Returns the store and whether it was created.
    pub fn open(
        path: &Path,
        now: Timestamp,
        root_uid: u32,
        root_gid: u32,
    ) -> Result<(MetaStore, bool)> {
        let existed = path.exists();
        let db = Database::builder().create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => MetaError::Store(
                "the metadata database is in use by another process (is it mounted?)".into(),
            ),
            other => MetaError::from(other),
        })?;
        let mut created = false;
        {
            let txn = db.begin_write()?;
            {
                let mut sup = txn.open_table(SUPER)?;
                let version = sup
                    .get(KEY_VERSION)?
                    .and_then(|v| v.value().try_into().ok().map(u32::from_le_bytes));
                match version {
                    Some(FORMAT_VERSION) => {}
                    Some(found) => {
                        return Err(MetaError::Version {
                            found,
                            expected: FORMAT_VERSION,
                        });
                    }
                    None if existed && sup.len()? > 0 => {
                        return Err(MetaError::Store(
                            "metadata database has no format version".into(),
                        ));
                    }
                    None => {
                        sup.insert(KEY_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())?;
                        let id = uuid::Uuid::new_v4().to_string();
                        sup.insert(KEY_FS_ID, id.as_bytes())?;
                        sup.insert(KEY_NEXT_INO, (ROOT_INO + 1).to_le_bytes().as_slice())?;
                        created = true;
                    }
                }
            }
            if created {
                let root = Inode {
                    ino: ROOT_INO,
                    kind: FileKind::Dir,
                    perm: 0o755,
                    nlink: 2,
                    uid: root_uid,
                    gid: root_gid,
                    rdev: 0,
                    size: 0,
                    atime: now,
                    mtime: now,
                    ctime: now,
                    crtime: now,
                    parent: ROOT_INO,
                    next_cookie: crate::FIRST_COOKIE,
                    target: Vec::new(),
                };
                txn.open_table(INODES)?
                    .insert(ROOT_INO, encode_inode(&root)?.as_slice())?;
            }
            // Create every table so that readers never meet a missing one.
            txn.open_table(DENTRIES)?;
            txn.open_table(LISTING)?;
            txn.open_table(XATTRS)?;
            txn.open_table(ORPHANS)?;
            txn.open_table(BLOBS)?;
            txn.open_table(CHUNKS)?;
            txn.open_table(DIRTY)?;
            txn.open_table(DELETES)?;
            txn.open_table(EVICTED)?;
            txn.open_table(OPLOG)?;
            txn.open_table(LOG_SEGMENTS)?;
            txn.commit()?;
        }
        let read = db.begin_read()?;
        let sup = read.open_table(SUPER)?;
        let fs_id = sup
            .get(KEY_FS_ID)?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned())
            .unwrap_or_default();
        let next_ino = sup
            .get(KEY_NEXT_INO)?
            .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(ROOT_INO + 1);
        drop(sup);
        let seq = crate::oplog::last_seq_read(&read)?;
        drop(read);
        Ok((
            MetaStore {
                db,
                fs_id,
                next_ino: AtomicU64::new(next_ino),
                committed: AtomicU64::new(0),
                changes: AtomicU64::new(0),
                durable: AtomicU64::new(0),
                applied_seq: AtomicU64::new(seq),
                durable_seq: AtomicU64::new(seq),
                sync_lock: Mutex::new(()),
                covers: Default::default(),
                marks: Default::default(),
                pending: Mutex::new(None),
                has_pending: AtomicBool::new(false),
                barrier: Default::default(),
                gate: Default::default(),
            },
            created,
        ))
    }

    /// The filesystem's unique id, fixed when it was created.
    pub fn fs_id(&self) -> &str {
        &self.fs_id
    }

    /// Hands out a fresh inode number. Numbers are never reused: the high-water mark is
    /// stored with every create, and recovery deletes any backing file above it.
    pub fn alloc_ino(&self) -> Ino {
        self.next_ino.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands out `n` consecutive fresh inode numbers at once, returning the first: for
    /// backing files prepared ahead of the creates that will use them. Numbers left unused
    /// are never handed out again in this run; the next run starts after the highest one a
    /// create used, which is safe because unused numbers own nothing once the daemon stops.
    pub fn reserve_inos(&self, n: u64) -> Ino {
        self.next_ino.fetch_add(n, Ordering::Relaxed)
    }

    /// Applies one operation and commits it (not yet durably; see [`MetaStore::sync`]).
    /// Operations that matter beyond this node go to the operation log in the same
    /// transaction (see `oplog`).
    pub fn execute(&self, op: &Op) -> Result<Outcome> {
        self.apply_op(op, None)
    }

    /// Applies `ops` in order in one transaction, each logged under its own number: one
    /// commit for many operations that nobody waits on (inodes purged after the kernel forgot
    /// them). All or none: on an error nothing is applied, and the caller may retry them one
    /// by one to find the one at fault.
    pub fn execute_batch(&self, ops: &[Op]) -> Result<Vec<Outcome>> {
        self.commit_ops(ops, None)
    }

    /// The number of the latest upload mark (`MarkDirty`) applied by this process: taken
    /// when an upload of a file begins, for [`MetaStore::marked_since`] when it commits.
    pub fn mark_seq(&self) -> u64 {
        self.marks.lock().last()
    }

    /// Whether `ino` was queued for upload again after `since` (a [`MetaStore::mark_seq`]).
    pub fn marked_since(&self, ino: Ino, since: u64) -> bool {
        self.marks.lock().since(ino, since)
    }

    /// Forgets what [`MetaStore::marked_since`] holds of `ino`, once an upload that began
    /// at `upto` left it clean.
    pub fn settle_mark(&self, ino: Ino, upto: u64) {
        self.marks.lock().settle(ino, upto);
    }

    /// Applies `op`; `replay` is the sequence number a replayed operation had in the log
    /// it comes from (it is then not logged again).
    pub(crate) fn apply_op(&self, op: &Op, replay: Option<u64>) -> Result<Outcome> {
        let outcome = self
            .commit_ops(std::slice::from_ref(op), replay)?
            .pop()
            .ok_or_else(|| MetaError::Store("an operation gave no outcome".into()))?;
        if let (Some(_), Op::Create { ino, .. }) = (replay, op) {
            // Numbers handed out later must follow the replayed ones.
            self.next_ino.fetch_max(ino + 1, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    /// Applies and logs `ops` as one batch into the open transaction (see `pending`), or
    /// nothing on an error. `replay` (one op only) is the log number a replayed op already
    /// has.
    fn commit_ops(&self, ops: &[Op], replay: Option<u64>) -> Result<Vec<Outcome>> {
        let mut guard = self.pending.lock();
        let pending = match guard.as_mut() {
            Some(p) => p,
            None => {
                let p = guard.insert(Pending::begin(&self.db)?);
                self.has_pending.store(true, Ordering::SeqCst);
                p
            }
        };
        let (outcomes, seqs) = match pending.apply(ops, replay) {
            Ok(applied) => applied,
            Err(e) => {
                if let Some(failed) = guard.take() {
                    self.has_pending.store(false, Ordering::SeqCst);
                    *guard = Some(failed.start_over(&self.db)?);
                    self.has_pending.store(true, Ordering::SeqCst);
                }
                return Err(e);
            }
        };
        self.committed.fetch_add(1, Ordering::Release);
        {
            let mut covers = self.covers.lock();
            for ((op, outcome), seq) in ops.iter().zip(&outcomes).zip(&seqs) {
                covers.note(op, outcome, *seq);
            }
        }
        if ops
            .iter()
            .any(|op| matches!(op, Op::MarkDirty { .. } | Op::Purge { .. }))
        {
            let mut marks = self.marks.lock();
            for op in ops {
                match op {
                    Op::MarkDirty { ino } => marks.mark(*ino),
                    Op::Purge { ino } => marks.forget(*ino),
                    _ => {}
                }
            }
        }
        self.changes.fetch_add(ops.len() as u64, Ordering::Release);
        if let Some(seq) = seqs.iter().flatten().last().copied() {
            self.applied_seq.fetch_max(seq, Ordering::Release);
        }
        if guard
            .as_ref()
            .is_some_and(|p| p.ops() >= crate::pending::MAX_OPS)
        {
            self.commit_pending(&mut guard, Durability::None)?;
        }
        Ok(outcomes)
    }

    /// Commits the open transaction, if any, at `durability`.
    fn commit_pending(&self, guard: &mut Option<Pending>, durability: Durability) -> Result<()> {
        if let Some(p) = guard.take() {
            let committed = p.commit(durability);
            self.has_pending.store(false, Ordering::SeqCst);
            committed?;
        }
        Ok(())
    }

    /// Commits the open transaction, so that a read transaction begun next sees every
    /// operation applied so far.
    fn flush(&self) -> Result<()> {
        if self.has_pending.load(Ordering::SeqCst) {
            self.commit_pending(&mut self.pending.lock(), Durability::None)?;
        }
        Ok(())
    }

    /// A read transaction that sees every operation applied before the call.
    pub(crate) fn read_txn(&self) -> Result<redb::ReadTransaction> {
        self.flush()?;
        Ok(self.db.begin_read()?)
    }

    /// Commits the open transaction and keeps others from opening until the guard is
    /// dropped: for writes that are not operations, which begin their own transaction.
    pub(crate) fn exclusive(&self) -> Result<parking_lot::MutexGuard<'_, Option<Pending>>> {
        let mut guard = self.pending.lock();
        self.commit_pending(&mut guard, Durability::None)?;
        Ok(guard)
    }

    /// The open transaction, locked, if there is one: reads on the request path read
    /// through it rather than commit it.
    fn open_txn(&self) -> Option<parking_lot::MappedMutexGuard<'_, Pending>> {
        if !self.has_pending.load(Ordering::SeqCst) {
            return None;
        }
        parking_lot::MutexGuard::try_map(self.pending.lock(), |p| p.as_mut()).ok()
    }

    /// Makes every operation applied before this call durable. Concurrent callers share one
    /// durable commit (group commit).
    pub fn sync(&self) -> Result<()> {
        let target = self.committed.load(Ordering::Acquire);
        if self.durable.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _guard = self.sync_lock.lock();
        if self.durable.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        // Sync the data first without holding writers of it off (the bulk of it), then again
        // under the gate for what was written meanwhile: no data write may be described
        // between the last data sync and the commit.
        let barrier = self.barrier.read().clone();
        let sync_data = |b: &std::sync::Arc<dyn DataBarrier>| {
            b.sync_data()
                .map_err(|e| MetaError::Store(format!("syncing data before a commit: {e}")))
        };
        if let Some(b) = &barrier {
            sync_data(b)?;
        }
        let _gate = self.gate.write();
        if let Some(b) = &barrier {
            sync_data(b)?;
        }
        // Under the lock that operations are applied under: every operation counted by
        // then is in this commit.
        let mut pending = self.pending.lock();
        let covered = self.committed.load(Ordering::Acquire);
        let covered_seq = self.applied_seq.load(Ordering::Acquire);
        if pending.is_some() {
            self.commit_pending(&mut pending, Durability::Immediate)?;
        } else {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            txn.commit()?;
        }
        self.covers.lock().durable();
        drop(pending);
        self.durable.fetch_max(covered, Ordering::Release);
        self.durable_seq.fetch_max(covered_seq, Ordering::Release);
        Ok(())
    }

    /// Makes durable every operation applied before this call that is not bookkeeping (see
    /// [`Op::is_bookkeeping`]): what an `fsync` owes beyond the file's data, which the
    /// caller syncs itself. When only bookkeeping is pending, as between the `fsync`s of a
    /// database rewriting its own files, or when origin records cover every namespace change
    /// (see [`crate::FsyncPlan::Cover`]), this costs nothing, where [`MetaStore::sync`] would
    /// cost a second device flush beside the data's.
    pub fn sync_namespace(&self) -> Result<()> {
        if self.covers.lock().namespace_durable() {
            return Ok(());
        }
        self.sync()
    }

    /// What an `fsync` of regular file `ino` needs beyond its data's flush (see
    /// [`crate::FsyncPlan`]).
    pub fn fsync_plan(&self, ino: Ino) -> crate::FsyncPlan {
        self.covers.lock().plan(ino)
    }

    /// The origin record that [`MetaStore::fsync_plan`] handed out for `ino` is durable.
    pub fn covered(&self, ino: Ino, epoch: u64) {
        self.covers.lock().covered(ino, epoch);
    }

    /// Creates file `ino` again from the origin record of its backing file, after a crash
    /// lost its create from the store (an `fsync` made it durable through that record; see
    /// [`crate::FsyncPlan::Cover`]), with the attribute changes the record carries after the
    /// create. Returns the name it got: its own, or, should a file of that name exist (which
    /// the rules of `fsync_plan` rule out, but nothing is thrown away on a guess),
    /// `NAME.cfs-recovered-INO`. `None`: the record does not describe this file, or its
    /// directory is gone; the caller treats the backing file as a stray. Which records to
    /// recover at all: [`crate::recoverable`].
    pub fn recover_create(&self, ino: Ino, origin: &crate::Origin) -> Result<Option<Vec<u8>>> {
        let mut ops = origin.ops.clone();
        let Some(Op::Create {
            parent,
            name,
            ino: created,
            ..
        }) = ops.first_mut()
        else {
            return Ok(None);
        };
        if *created != ino {
            return Ok(None);
        }
        match self.inode(*parent) {
            Ok(dir) if dir.kind == crate::FileKind::Dir => {}
            Ok(_) | Err(MetaError::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        }
        // The files the entry held before (unlinked before this create, but not durably):
        // unlinked again, if the entry still holds one. They are then orphans, for the
        // caller to purge.
        for &old in &origin.replaces {
            match self.lookup(*parent, name) {
                Ok(held) if held.ino == old => {
                    let (parent, name) = (*parent, name.clone());
                    let now = crate::Timestamp::now();
                    self.execute(&Op::Unlink { parent, name, now })?;
                }
                Ok(_) | Err(MetaError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        match self.lookup(*parent, name) {
            Err(MetaError::NotFound) => {}
            Err(e) => return Err(e),
            Ok(_) => {
                let suffix = format!(".cfs-recovered-{ino}").into_bytes();
                name.truncate(crate::NAME_MAX.saturating_sub(suffix.len()));
                name.extend_from_slice(&suffix);
            }
        }
        let chosen = name.clone();
        self.execute_batch(&ops)?;
        self.next_ino.fetch_max(ino + 1, Ordering::Relaxed);
        Ok(Some(chosen))
    }

    /// Registers the data that durable commits must wait for (see [`DataBarrier`]).
    pub fn set_data_barrier(&self, barrier: std::sync::Arc<dyn DataBarrier>) {
        *self.barrier.write() = Some(barrier);
    }

    /// Hold this while writing data outside the store and committing the operation that
    /// describes it; a durable commit then either includes both the data sync and the
    /// operation, or neither.
    pub fn data_guard(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.gate.read()
    }

    /// True if some commit is not yet durable.
    pub fn has_unsynced(&self) -> bool {
        self.durable.load(Ordering::Acquire) < self.committed.load(Ordering::Acquire)
    }

    /// True if a change to the filesystem (a logged operation) is not yet durable. This
    /// node's own bookkeeping (blobs fetched back, log trims) is left out: losing it in a
    /// crash costs a second download or a second PUT, never data, so a periodic sync need
    /// not pay for it, and in particular need not fdatasync blobs being fetched back (see
    /// [`DataBarrier`]) while a large cold read streams in.
    pub fn has_unsynced_changes(&self) -> bool {
        self.durable_seq.load(Ordering::Acquire) < self.applied_seq.load(Ordering::Acquire)
    }

    pub fn inode(&self, ino: Ino) -> Result<Inode> {
        if let Some(mut p) = self.open_txn() {
            return p.read(|t| inode_in(t.inodes()?, ino));
        }
        let read = self.db.begin_read()?;
        inode_in(&read.open_table(INODES)?, ino)
    }

    /// Resolves `name` in `parent` to its inode.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Inode> {
        if name.len() > crate::NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        if let Some(mut p) = self.open_txn() {
            return p.read(|t| {
                let (dentries, inodes) = t.dentries_and_inodes()?;
                lookup_in(dentries, inodes, parent, name)
            });
        }
        let read = self.db.begin_read()?;
        let dentries = read.open_table(DENTRIES)?;
        lookup_in(&dentries, &read.open_table(INODES)?, parent, name)
    }

    /// Up to `limit` entries of `dir` with cookies greater than `after`, in cookie order.
    /// With `with_inodes`, each entry comes with its inode (for readdirplus).
    pub fn readdir(
        &self,
        dir: Ino,
        after: u64,
        limit: usize,
        with_inodes: bool,
    ) -> Result<Vec<(DirEntry, Option<Inode>)>> {
        let read = self.read_txn()?;
        let listing = read.open_table(LISTING)?;
        let inodes = read.open_table(INODES)?;
        let mut out = Vec::new();
        for item in listing.range((dir, after.saturating_add(1))..=(dir, u64::MAX))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let (ino, kind, name) = decode_listing(dir, v.value())?;
            let inode = if with_inodes {
                match inodes.get(ino)? {
                    Some(b) => Some(decode_inode(ino, b.value())?),
                    None => None,
                }
            } else {
                None
            };
            out.push((
                DirEntry {
                    cookie: k.value().1,
                    ino,
                    kind,
                    name: name.to_vec(),
                },
                inode,
            ));
        }
        Ok(out)
    }

    pub fn xattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        if let Some(mut p) = self.open_txn() {
            return p.read(|t| {
                let (xattrs, inodes) = t.xattrs_and_inodes()?;
                xattr_in(xattrs, inodes, ino, name)
            });
        }
        let read = self.db.begin_read()?;
        let xattrs = read.open_table(XATTRS)?;
        xattr_in(&xattrs, &read.open_table(INODES)?, ino, name)
    }

    pub fn xattr_names(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let read = self.read_txn()?;
        let table = read.open_table(XATTRS)?;
        let mut out = Vec::new();
        for item in table.range((ino, &[][..])..)? {
            let (k, _) = item?;
            let (owner, name) = k.value();
            if owner != ino {
                break;
            }
            out.push(name.to_vec());
        }
        Ok(out)
    }

    /// Inodes that have no links left but were still referenced when last seen.
    pub fn orphans(&self) -> Result<Vec<Ino>> {
        let read = self.read_txn()?;
        let table = read.open_table(ORPHANS)?;
        table
            .iter()?
            .map(|r| r.map(|(k, _)| k.value()).map_err(MetaError::from))
            .collect()
    }

    /// Calls `f` on every inode, in inode order.
    pub fn for_each_inode(&self, mut f: impl FnMut(Inode) -> Result<()>) -> Result<()> {
        let read = self.read_txn()?;
        let table = read.open_table(INODES)?;
        for item in table.iter()? {
            let (k, v) = item?;
            f(decode_inode(k.value(), v.value())?)?;
        }
        Ok(())
    }

    /// Calls `f(parent, name, ino, cookie, kind)` on every directory entry.
    pub fn for_each_dentry(
        &self,
        mut f: impl FnMut(Ino, &[u8], Ino, u64, Option<FileKind>) -> Result<()>,
    ) -> Result<()> {
        let read = self.read_txn()?;
        let table = read.open_table(DENTRIES)?;
        for item in table.iter()? {
            let (k, v) = item?;
            let (parent, name) = k.value();
            let (ino, cookie, kind) = v.value();
            f(parent, name, ino, cookie, FileKind::from_u8(kind))?;
        }
        Ok(())
    }

    /// Calls `f(dir, cookie, ino, name)` on every listing entry.
    pub fn for_each_listing(
        &self,
        mut f: impl FnMut(Ino, u64, Ino, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let read = self.read_txn()?;
        let table = read.open_table(LISTING)?;
        for item in table.iter()? {
            let (k, v) = item?;
            let (dir, cookie) = k.value();
            let (ino, _, name) = decode_listing(dir, v.value())?;
            f(dir, cookie, ino, name)?;
        }
        Ok(())
    }

    pub fn counts(&self) -> Result<MetaCounts> {
        let mut c = MetaCounts::default();
        self.for_each_inode(|inode| {
            c.inodes += 1;
            tally(&inode, &mut c.files, &mut c.dirs, &mut c.bytes);
            Ok(())
        })?;
        c.orphans = self.orphans()?.len() as u64;
        Ok(c)
    }

    /// Files waiting for upload (the persistent upload queue), at most `limit`.
    pub fn dirty_files(&self, limit: usize) -> Result<Vec<Ino>> {
        let read = self.read_txn()?;
        let table = read.open_table(DIRTY)?;
        table
            .iter()?
            .take(limit)
            .map(|r| r.map(|(k, _)| k.value()).map_err(MetaError::from))
            .collect()
    }

    /// The blobs of `ino` the object store holds, in index order.
    pub fn blobs_of(&self, ino: Ino) -> Result<Vec<crate::BlobRecord>> {
        let read = self.read_txn()?;
        let table = read.open_table(BLOBS)?;
        let chunks = read.open_table(CHUNKS)?;
        let mut sums: std::collections::HashMap<u64, Vec<u32>> = chunks
            .range((ino, 0)..=(ino, u64::MAX))?
            .map(|r| r.map(|(k, v)| (k.value().1, decode_chunks(v.value()))))
            .collect::<std::result::Result<_, _>>()?;
        table
            .range((ino, 0)..=(ino, u64::MAX))?
            .map(|r| {
                r.map(|(k, v)| {
                    let (generation, len, crc32c) = v.value();
                    let k = k.value().1;
                    crate::BlobRecord {
                        k,
                        generation,
                        len,
                        crc32c,
                        chunks: sums.remove(&k).unwrap_or_default(),
                    }
                })
                .map_err(MetaError::from)
            })
            .collect()
    }

    /// Objects waiting to be DELETEd, as (ino, blob index, generation), at most `limit`.
    pub fn pending_deletes(&self, limit: usize) -> Result<Vec<(Ino, u64, u64)>> {
        let read = self.read_txn()?;
        let table = read.open_table(DELETES)?;
        table
            .iter()?
            .take(limit)
            .map(|r| r.map(|(k, _)| k.value()).map_err(MetaError::from))
            .collect()
    }

    /// What the tier holds and owes, for `cfs status`.
    pub fn tier_counts(&self) -> Result<TierCounts> {
        let read = self.read_txn()?;
        let mut c = TierCounts::default();
        for r in read.open_table(BLOBS)?.iter()? {
            let (_, v) = r?;
            c.blobs_stored += 1;
            c.bytes_stored += v.value().1;
        }
        let inodes = read.open_table(INODES)?;
        for r in read.open_table(DIRTY)?.iter()? {
            let ino = r?.0.value();
            c.files_dirty += 1;
            if let Some(bytes) = inodes.get(ino)? {
                let size = decode_inode(ino, bytes.value())?.size;
                c.bytes_dirty += size;
                c.blobs_dirty += size.div_ceil(crate::BLOB_SIZE);
            }
        }
        c.deletes_pending = read.open_table(DELETES)?.len()?;
        let blobs = read.open_table(BLOBS)?;
        for r in read.open_table(EVICTED)?.iter()? {
            let (key, _) = r?;
            c.blobs_evicted += 1;
            if let Some(v) = blobs.get(key.value())? {
                c.bytes_evicted += v.value().1;
            }
        }
        Ok(c)
    }

    /// The blobs of `ino` that are not on flash, as (k, generation), in index order.
    pub fn evicted_of(&self, ino: Ino) -> Result<Vec<(u64, u64)>> {
        if let Some(mut p) = self.open_txn() {
            return p.read(|t| evicted_in(t.evicted()?, ino, usize::MAX));
        }
        evicted_in(&self.db.begin_read()?.open_table(EVICTED)?, ino, usize::MAX)
    }

    /// The record of blob `k` of `ino` if that blob is evicted (off flash), by point lookups:
    /// what a read of one blob needs, without the file's whole blob map. `None` if it is on
    /// flash. An evicted generation that the blob map does not hold is corruption.
    pub fn evicted_blob(&self, ino: Ino, k: u64) -> Result<Option<crate::BlobRecord>> {
        let read = self.read_txn()?;
        let Some(generation) = read.open_table(EVICTED)?.get((ino, k))?.map(|v| v.value()) else {
            return Ok(None);
        };
        let found = read.open_table(BLOBS)?.get((ino, k))?.map(|v| v.value());
        let Some((committed, len, crc32c)) = found.filter(|v| v.0 == generation) else {
            return Err(MetaError::Corrupt(
                ino,
                format!(
                    "blob {k} is marked evicted at generation {generation}, which the blob \
                     map does not record"
                ),
            ));
        };
        let chunks = read
            .open_table(CHUNKS)?
            .get((ino, k))?
            .map_or_else(Vec::new, |v| decode_chunks(v.value()));
        Ok(Some(crate::BlobRecord {
            k,
            generation: committed,
            len,
            crc32c,
            chunks,
        }))
    }

    /// Whether any blob of `ino` is off flash (then its opens go through the daemon).
    pub fn has_evicted(&self, ino: Ino) -> Result<bool> {
        // On every open: read through the open transaction rather than commit it.
        if let Some(mut p) = self.open_txn() {
            return p.read(|t| any_evicted_in(t.evicted()?, ino));
        }
        let read = self.db.begin_read()?;
        any_evicted_in(&read.open_table(EVICTED)?, ino)
    }

    /// An inode, and whether any of its blobs is off flash, in one read: what a writable open
    /// of an existing file needs (its set-id bits, and whether the daemon must serve it).
    pub fn inode_and_evicted(&self, ino: Ino) -> Result<(Inode, bool)> {
        if let Some(mut p) = self.open_txn() {
            return p.read(|t| {
                let inode = inode_in(t.inodes()?, ino)?;
                Ok((inode, any_evicted_in(t.evicted()?, ino)?))
            });
        }
        let read = self.db.begin_read()?;
        let inode = inode_in(&read.open_table(INODES)?, ino)?;
        Ok((inode, any_evicted_in(&read.open_table(EVICTED)?, ino)?))
    }

    /// Every blob that could leave flash now: committed, present, of a clean file.
    pub fn evict_candidates(&self) -> Result<Vec<EvictCandidate>> {
        self.candidates_in(..)
    }

    /// The blobs of `inos` that could leave flash now: what eviction of a few named files
    /// needs, without reading every blob of the filesystem.
    pub fn evict_candidates_of(&self, inos: &[Ino]) -> Result<Vec<EvictCandidate>> {
        let mut out = Vec::new();
        for &ino in inos {
            out.extend(self.candidates_in((ino, 0)..=(ino, u64::MAX))?);
        }
        Ok(out)
    }

    fn candidates_in(
        &self,
        range: impl std::ops::RangeBounds<(u64, u64)>,
    ) -> Result<Vec<EvictCandidate>> {
        let read = self.read_txn()?;
        let dirty = read.open_table(DIRTY)?;
        let evicted = read.open_table(EVICTED)?;
        let mut out = Vec::new();
        for r in read.open_table(BLOBS)?.range(range)? {
            let (key, v) = r?;
            let (ino, k) = key.value();
            let (generation, len, _) = v.value();
            if dirty.get(ino)?.is_some() || evicted.get((ino, k))?.is_some() {
                continue;
            }
            out.push(EvictCandidate {
                ino,
                k,
                generation,
                len,
            });
        }
        Ok(out)
    }

    /// The low-level repair tool for `fsck --repair`: applies raw fixes in one durable
    /// transaction. Not for the request path.
    pub fn repair(&self, fix: impl FnOnce(&mut crate::Repair<'_>) -> Result<()>) -> Result<()> {
        let _exclusive = self.exclusive()?;
        let txn = self.db.begin_write()?;
        {
            let mut r = crate::Repair::open(&txn)?;
            fix(&mut r)?;
        }
        txn.commit()?;
        Ok(())
    }
}

fn inode_in(inodes: &impl ReadableTable<u64, &'static [u8]>, ino: Ino) -> Result<Inode> {
    match inodes.get(ino)? {
        Some(v) => decode_inode(ino, v.value()),
        None => Err(MetaError::NotFound),
    }
}

fn lookup_in(
    dentries: &impl ReadableTable<(u64, &'static [u8]), (u64, u64, u8)>,
    inodes: &impl ReadableTable<u64, &'static [u8]>,
    parent: Ino,
    name: &[u8],
) -> Result<Inode> {
    let ino = match dentries.get((parent, name))? {
        Some(v) => v.value().0,
        None => return Err(MetaError::NotFound),
    };
    match inodes.get(ino)? {
        Some(v) => decode_inode(ino, v.value()),
        None => Err(MetaError::Corrupt(
            parent,
            format!("dentry to missing inode {ino}"),
        )),
    }
}

fn xattr_in(
    xattrs: &impl ReadableTable<(u64, &'static [u8]), &'static [u8]>,
    inodes: &impl ReadableTable<u64, &'static [u8]>,
    ino: Ino,
    name: &[u8],
) -> Result<Vec<u8>> {
    match xattrs.get((ino, name))? {
        Some(v) => Ok(v.value().to_vec()),
        None => {
            if inodes.get(ino)?.is_none() {
                return Err(MetaError::NotFound);
            }
            Err(MetaError::NoXattr)
        }
    }
}

/// Up to `limit` evicted blobs of `ino`, as (blob, generation).
fn evicted_in(
    evicted: &impl ReadableTable<(u64, u64), u64>,
    ino: Ino,
    limit: usize,
) -> Result<Vec<(u64, u64)>> {
    evicted
        .range((ino, 0)..=(ino, u64::MAX))?
        .take(limit)
        .map(|r| {
            r.map(|(k, v)| (k.value().1, v.value()))
                .map_err(MetaError::from)
        })
        .collect()
}

/// Whether any blob of `ino` is off flash.
fn any_evicted_in(evicted: &impl ReadableTable<(u64, u64), u64>, ino: Ino) -> Result<bool> {
    Ok(!evicted_in(evicted, ino, 1)?.is_empty())
}

impl Drop for MetaStore {
    /// Commits what was applied, as a commit per operation did before (not durably: only
    /// [`MetaStore::sync`] makes anything durable).
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "cannot commit the last operations at close");
        }
    }
}
