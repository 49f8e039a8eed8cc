//! `fuser::Filesystem` for ClaudeFS: each method turns the kernel's request into a call on the
//! layers below and the result into a reply.

use crate::caller::{caller, caller_with_groups};
use crate::errno::{FsError, FsResult};
use crate::fs::{ClaudeFs, Core};
use crate::sync_beside::{flush as flush_file, sync_beside};
use cfs_flash::Change;
use cfs_meta::{
    FileKind, FsyncPlan, Inode, Op, Outcome, RenameMode, SetAttr, Timestamp, XattrMode, acl,
};
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

fn now() -> Timestamp {
    Timestamp::now()
}

fn timespec(t: Timestamp) -> nix::sys::time::TimeSpec {
    nix::sys::time::TimeSpec::new(t.secs, i64::from(t.nanos))
}

/// A time a SETATTR sets; "now" is the request's one reading of the clock, `now`, which is
/// also its ctime.
fn time_or_now(t: TimeOrNow, now: Timestamp) -> Timestamp {
    match t {
        TimeOrNow::SpecificTime(t) => Timestamp::from(t),
        TimeOrNow::Now => now,
    }
}

/// The creator of a new node: with its supplementary groups when the set-group-ID rules
/// need them.
fn creator(req: &Request, mode: u32) -> cfs_meta::Caller {
    if mode & 0o2000 != 0 {
        caller_with_groups(req)
    } else {
        caller(req)
    }
}

/// Sends `r` as an error reply, logging it if it is not a routine one.
fn fail(op: &str, e: FsError) -> Errno {
    if e.is_unexpected() {
        tracing::warn!(op, error = ?e, "request failed");
    } else {
        tracing::trace!(op, error = ?e, "request failed");
    }
    e.errno()
}

/// Blobs fetched ahead of a sequential reader of a cold file: as many as the uploader's
/// default concurrency, which is what an object store is known to sustain.
const PREFETCH_BLOBS: u64 = 4;

/// The bytes a read replies with.
enum ReadData {
    /// Read from flash, or by a ranged GET.
    Owned(Vec<u8>),
    /// A range of a blob fetched from the object store, replied without a copy.
    Blob(crate::FetchedBlob, std::ops::Range<usize>),
}

impl ReadData {
    fn bytes(&self) -> &[u8] {
        match self {
            ReadData::Owned(v) => v,
            ReadData::Blob(blob, range) => &(**blob).as_ref()[range.clone()],
        }
    }
}

/// What `mknod`, `mkdir`, `symlink` and `create` ask for.
struct NewNode<'a> {
    kind: FileKind,
    mode: u32,
    umask: u32,
    rdev: u32,
    target: &'a [u8],
}

/// A handle just opened: its number, the kernel's backing id when the kernel does the
/// handle's I/O itself (passthrough), and the flags the open's reply carries.
struct Opened {
    fh: u64,
    backing: Option<std::sync::Arc<fuser::BackingId>>,
    flags: FopenFlags,
}

impl Core {
    fn entry(&self, reply: ReplyEntry, op: &str, r: FsResult<Inode>) {
        match r {
            Ok(inode) => reply.entry(&self.opts.entry_ttl, &self.attr_of(&inode), Generation(0)),
            Err(e) => reply.error(fail(op, e)),
        }
    }

    fn empty(reply: ReplyEmpty, op: &str, r: FsResult<()>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail(op, e)),
        }
    }

    fn create_node(
        &self,
        caller: cfs_meta::Caller,
        parent: INodeNo,
        name: &OsStr,
        node: NewNode<'_>,
    ) -> FsResult<(Inode, Option<std::fs::File>)> {
        let NewNode {
            kind,
            mode,
            umask,
            rdev,
            target,
        } = node;
        let (ino, file) = match kind {
            FileKind::File => {
                let (ino, file) = self.flash.create_next(|| self.meta.alloc_ino())?;
                (ino, Some(file))
            }
            _ => (self.meta.alloc_ino(), None),
        };
        let op = Op::Create {
            parent: parent.0,
            name: name.as_bytes().to_vec(),
            ino,
            kind,
            perm: mode & 0o7777,
            umask,
            rdev,
            target: target.to_vec(),
            caller,
            now: now(),
        };
        match self.meta.execute(&op) {
            Ok(outcome) => {
                let inode = Self::inode_outcome(outcome)?;
                if let Some(f) = &file {
                    // Give the backing file the inode's times, so that closing a file that
                    // was created but never written finds nothing to record.
                    nix::sys::stat::futimens(f, &timespec(inode.atime), &timespec(inode.mtime))?;
                }
                Ok((inode, file))
            }
            Err(e) => {
                if file.is_some() {
                    let _ = self.flash.remove(ino);
                }
                Err(e.into())
            }
        }
    }

    /// What closing a handle records: for a writable one, what its writes (passthrough ones
    /// included, which the daemon never saw) did to the file's size, times and upload mark.
    /// At RELEASE, and at unmount for handles whose RELEASE the kernel dropped.
    fn record_release(&self, h: &crate::handles::Handle) -> FsResult<()> {
        if !h.writable {
            return Ok(());
        }
        let written = h.written.load(Ordering::Relaxed);
        // A file created and closed untouched (`touch`, `tar` of an empty member, a lock
        // file): one fstat instead of a metadata read, which on two cores contended with the
        // next create for the store's lock. Any write, truncation or utimes since the create
        // changed the size or the mtime, and takes the full path.
        if !written && h.created.is_some_and(|r| r.unchanged(&h.file)) {
            return Ok(());
        }
        self.sync_data_attr(h.ino, written)?;
        Ok(())
    }

    fn removed(&self, outcome: Outcome) {
        // The inode itself stays until the kernel forgets it (open files keep using it).
        if let Outcome::Removed {
            orphaned: Some(ino),
        } = outcome
        {
            tracing::trace!(ino, "last link removed");
        }
    }

    /// Opens a handle on `ino`: on `created`, the inode a create just made and its new
    /// backing file; otherwise the backing file is opened here.
    fn open_file(
        &self,
        caller_uid: u32,
        ino: u64,
        flags: i32,
        created: Option<(&Inode, std::fs::File)>,
        register: impl FnOnce(&std::fs::File) -> std::io::Result<fuser::BackingId>,
    ) -> FsResult<Opened> {
        // Counted as a user before looking at the blobs' state: eviction either ran before
        // (and this open sees the evicted blobs) or waits for the release.
        self.live.handles.using(ino);
        let r = self.open_counted(caller_uid, ino, flags, created, register);
        if r.is_err() {
            self.live.handles.done_with(ino, false);
        }
        r
    }

    fn open_counted(
        &self,
        caller_uid: u32,
        ino: u64,
        flags: i32,
        created: Option<(&Inode, std::fs::File)>,
        register: impl FnOnce(&std::fs::File) -> std::io::Result<fuser::BackingId>,
    ) -> FsResult<Opened> {
        let (file, new_inode) = match created {
            Some((inode, f)) => (f, Some(inode)),
            None => (self.flash.open_or_create(ino)?, None),
        };
        // A file created just now is known to no other open until this one is answered.
        let _deciding = new_inode.is_none().then(|| self.live.handles.deciding(ino));
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        // A file with blobs off flash is served by the daemon, which fetches them on first
        // access; its next open after they are all back gets passthrough again. A file
        // created just now has no blobs anywhere: no metadata read on the create path.
        // A write must clear set-user-ID and set-group-ID, which the kernel leaves to the
        // daemon (FUSE_HANDLE_KILLPRIV_V2): the daemon must see writes to such files. A new
        // file's mode is at hand; an existing one's comes in the same read as its blobs.
        let (cold, set_id) = match new_inode {
            Some(inode) => (false, writable && crate::fs::has_set_id(inode)),
            None if writable => {
                let (inode, cold) = self.inode_and_cold(ino)?;
                (cold, crate::fs::has_set_id(&inode))
            }
            None => (self.is_cold(ino)?, false),
        };
        // The kernel wants every open of an inode that has a passthrough handle open to be
        // passthrough too (it fails any other with EIO), so a write beside one cannot reach
        // the daemon. Then the bits are cleared now, for a caller that could not keep them
        // on a write (FUSE does not pass on CAP_FSETID: root stands for it): an open for
        // writing clears them even if no write follows, rather than letting a changed
        // file keep them.
        let set_id = set_id && {
            let beside_passthrough = self.live.handles.passthrough_open(ino);
            if beside_passthrough && caller_uid != 0 {
                self.kill_privileges(ino)?;
            }
            !beside_passthrough
        };
        // One io mode per inode in the kernel: while a daemon-served handle may still be
        // open there, this one is served by the daemon as well.
        let cached_live = self.live.handles.cached_users(ino) > 0;
        let created = new_inode.map(crate::handles::Recorded::of);
        let mut backing = None;
        if !cold && !cached_live && !set_id && self.live.passthrough.load(Ordering::Relaxed) {
            match self.live.handles.backing_id(ino, || register(&file)) {
                Ok(id) => backing = Some(id),
                Err(e) => {
                    if self.live.passthrough.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "kernel refused a passthrough backing file; serving I/O through the daemon from now on");
                    }
                }
            }
        }
        if backing.is_some() {
            self.live.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        } else {
            self.live.daemon_opens.fetch_add(1, Ordering::Relaxed);
        }
        // A reader of a cold file gets direct I/O: its reads go from the daemon's blob
        // buffers straight into the reader's buffer, not through pages of the kernel's cache.
        // Filling fresh cache pages (each a host fault where freed memory goes back to the
        // hypervisor) took most of the daemon's time in a cold read, and saves nothing later:
        // the file's next open is passthrough, with the backing file's cache. A random reader
        // that comes back to a blob has it fetched to flash after its second ranged read
        // (see the tier's hydrator), so re-reads cost a round trip, not a GET. Only where the
        // kernel still lets such a file be mmapped.
        let direct_io = cold
            && !writable
            && backing.is_none()
            && self.live.direct_io_mmap.load(Ordering::Relaxed);
        tracing::trace!(
            ino,
            cold,
            passthrough = backing.is_some(),
            writable,
            direct_io,
            "open"
        );
        let crate::handles::Inserted { fh, keep_cache } =
            self.live.handles.insert(crate::handles::Handle {
                ino,
                file,
                writable,
                written: Default::default(),
                backing: backing.clone(),
                cold,
                direct_io,
                next_read: Default::default(),
                prefetched: Default::default(),
                dropped: Default::default(),
                durable_size: AtomicU64::new(crate::handles::NO_DURABLE_SIZE),
                created,
            });
        let flags = if direct_io {
            FopenFlags::FOPEN_DIRECT_IO
        } else if keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        Ok(Opened { fh, backing, flags })
    }

    /// A read on a handle opened cold. Any read but a sequential one that falls in an
    /// evicted blob is served from the object store by one ranged GET when it can be (the
    /// bytes are returned): its first byte waits for a small GET, not for a whole blob.
    /// Otherwise the read is served from its blob's fetched bytes, or the blobs it touches
    /// are brought back (`None`: read flash); for a sequential reader, the next
    /// [`PREFETCH_BLOBS`] blobs are started first, so that GETs overlap each other and the
    /// reader.
    fn cold_read(
        &self,
        h: &crate::handles::Handle,
        offset: u64,
        size: u32,
    ) -> FsResult<Option<ReadData>> {
        let file_len = h.file.metadata()?.len();
        if offset >= file_len {
            return Ok(None);
        }
        let end = (offset + u64::from(size)).min(file_len);
        let sequential = h.next_read.swap(end, Ordering::Relaxed) == offset;
        if !sequential && let Some(tier) = &self.opts.tier {
            match tier.read_evicted(h.ino, offset, end - offset) {
                Ok(Some(data)) => return Ok(Some(ReadData::Owned(data))),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(ino = h.ino, offset, error = %e, "cannot read from the object store");
                    return Err(FsError::Errno(Errno::EIO));
                }
            }
        }
        // The next blobs are asked for before this read waits for its own, so that the
        // first read of a file already has the pipeline filling behind it.
        let next = end.div_ceil(crate::BLOB_SIZE);
        if sequential
            && h.prefetched.swap(next + 1, Ordering::Relaxed) != next + 1
            && let Some(tier) = &self.opts.tier
        {
            for k in next..next + PREFETCH_BLOBS {
                tier.prefetch(h.ino, k);
            }
        }
        if sequential && !h.direct_io {
            self.drop_behind(h, offset);
        }
        // Also for a read that is not sequential but that no ranged GET could serve (its
        // blob is being fetched whole, say, for a sequential reader whose readahead arrived
        // out of order): the fetched bytes are as good as flash.
        if let Some(data) = self.fetched_read(h.ino, offset, end)? {
            return Ok(Some(data));
        }
        self.ensure_present(h.ino, offset..end)?;
        Ok(None)
    }

    /// Lets the kernel drop the cached pages of a sequential reader's file that lie more
    /// than a blob behind `offset`, whole blobs at a time (see [`crate::drop_behind`]).
    fn drop_behind(&self, h: &crate::handles::Handle, offset: u64) {
        let behind = offset.saturating_sub(crate::BLOB_SIZE) / crate::BLOB_SIZE * crate::BLOB_SIZE;
        let done = h.dropped.load(Ordering::Relaxed);
        // Claimed first, so that two reads of the handle do not ask for one range twice;
        // given back if the request was refused, so that the next read asks again.
        if behind > done
            && h.dropped
                .compare_exchange(done, behind, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            && !self.live.drop_cached(h.ino, done, behind)
        {
            let _ = h
                .dropped
                .compare_exchange(behind, done, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Bytes `offset..end` of `ino` from its fetched blob, when they lie in one blob that is
    /// evicted or was fetched lately: served from the verified GET body, so a sequential
    /// reader waits neither for the blob's write to flash nor for reading it back.
    fn fetched_read(&self, ino: u64, offset: u64, end: u64) -> FsResult<Option<ReadData>> {
        if end <= offset {
            return Ok(None);
        }
        let k = offset / crate::BLOB_SIZE;
        let boundary = (k + 1) * crate::BLOB_SIZE;
        if end <= boundary {
            return self.fetched_slice(ino, offset, end);
        }
        // A read across two blobs (readahead windows need not stop at a blob's end): both
        // halves from fetched bytes, or neither.
        if (end - 1) / crate::BLOB_SIZE != k + 1 {
            return Ok(None);
        }
        let (Some(head), Some(tail)) = (
            self.fetched_slice(ino, offset, boundary)?,
            self.fetched_slice(ino, boundary, end)?,
        ) else {
            return Ok(None);
        };
        let mut joined = Vec::with_capacity((end - offset) as usize);
        joined.extend_from_slice(head.bytes());
        joined.extend_from_slice(tail.bytes());
        Ok(Some(ReadData::Owned(joined)))
    }

    /// Bytes `offset..end`, within one blob, from that blob's fetched bytes.
    fn fetched_slice(&self, ino: u64, offset: u64, end: u64) -> FsResult<Option<ReadData>> {
        let Some(tier) = &self.opts.tier else {
            return Ok(None);
        };
        let k = offset / crate::BLOB_SIZE;
        let blob = match tier.read_blob(ino, k) {
            Ok(Some(blob)) => blob,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(ino, k, error = %e, "cannot bring a blob back from the object store");
                return Err(FsError::Errno(Errno::EIO));
            }
        };
        let base = k * crate::BLOB_SIZE;
        let range = (offset - base) as usize..(end - base) as usize;
        // Past the blob's recorded bytes (the file grew since): flash holds the rest.
        if range.end > (*blob).as_ref().len() {
            return Ok(None);
        }
        Ok(Some(ReadData::Blob(blob, range)))
    }

    fn handle(&self, fh: FileHandle) -> FsResult<std::sync::Arc<crate::handles::Handle>> {
        self.live
            .handles
            .get(fh.0)
            .ok_or(FsError::Errno(Errno::EBADF))
    }

    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        caller_uid: u32,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> FsResult<Inode> {
        // A truncation is a user of the file like an open: no eviction meanwhile.
        if size.is_some() {
            self.live.handles.using(ino.0);
        }
        // A change of owner clears the set-id bits, and so does a truncation by a caller
        // that may not keep them; the kernel leaves both to the filesystem (see
        // `kill_privileges`). FUSE does not pass on whether the caller has CAP_FSETID, so
        // root stands for it.
        let kill = mode.is_none()
            && (uid.is_some() || gid.is_some() || (size.is_some() && caller_uid != 0));
        let r = if kill {
            self.kill_privileges(ino.0)
        } else {
            Ok(())
        }
        .and_then(|()| self.apply_setattr(ino, mode, uid, gid, size, atime, mtime, fh));
        if size.is_some() {
            self.forget_fetched(ino.0);
            self.live.handles.done_with(ino.0, false);
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> FsResult<Inode> {
        if let Some(new_size) = size
            && new_size > 0
        {
            // What stays of a blob cut in two must be on flash before the cut.
            self.ensure_present(ino.0, new_size - 1..new_size)?;
        }
        let now = now();
        let mut attr = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(|t| time_or_now(t, now)),
            mtime: mtime.map(|t| time_or_now(t, now)),
        };
        // A truncation moves the mtime, to the same size too, as ext4 does, and as it does to
        // the backing file. ftruncate brings "now", truncate(2) by path brings no mtime: it
        // is recorded here and put on the backing file below, or else the metadata the store
        // keeps holds the old mtime while the mount shows the backing file's new one, and a
        // repair brings the old one back.
        if attr.size.is_some() && attr.mtime.is_none() {
            attr.mtime = Some(now);
        }
        // New times hide what passthrough writes did to the backing file's mtime, by which
        // alone the daemon sees them (see `sync_data_attr`): record those writes, and queue
        // the file for upload, in the same commit as the times. A same-size rewrite in place
        // whose mtime is then set back is otherwise never uploaded: the `utimes` may come
        // before the close, or right after it and still before the kernel's RELEASE.
        let mut ops = if attr.atime.is_some() || attr.mtime.is_some() {
            self.data_sync(ino.0).map_or_else(Vec::new, |sync| sync.ops)
        } else {
            Vec::new()
        };
        ops.push(Op::SetAttr {
            ino: ino.0,
            attr: attr.clone(),
            now,
        });
        let mut outcomes = self.meta.execute_batch(&ops)?;
        self.queued(&ops);
        let inode = Self::inode_outcome(outcomes.pop().ok_or(FsError::Errno(Errno::EIO))?)?;
        if inode.kind == FileKind::File
            && (attr.size.is_some() || attr.atime.is_some() || attr.mtime.is_some())
        {
            let handle = fh.and_then(|fh| self.live.handles.get(fh.0));
            let owned;
            let file = match &handle {
                Some(h) => &h.file,
                None => {
                    owned = self.flash.open_or_create(ino.0)?;
                    &owned
                }
            };
            if let Some(size) = attr.size {
                self.flash
                    .user_change(ino.0, file, Change::data(), || file.set_len(size))?;
                self.data_changed(ino.0)?;
            }
            if attr.atime.is_some() || attr.mtime.is_some() {
                let spec =
                    |t: Option<Timestamp>| t.map_or(nix::sys::time::TimeSpec::UTIME_OMIT, timespec);
                let pair = |t: Option<Timestamp>| t.map(|t| (t.secs, i64::from(t.nanos)));
                let change = Change {
                    atime: pair(attr.atime),
                    mtime: pair(attr.mtime),
                };
                self.flash.user_change(ino.0, file, change, || {
                    Ok(nix::sys::stat::futimens(
                        file,
                        &spec(attr.atime),
                        &spec(attr.mtime),
                    )?)
                })?;
            }
        }
        Ok(inode)
    }

    /// FSYNC: makes the file's data, and what of the namespace it needs, durable.
    fn do_fsync(&self, ino: INodeNo, fh: FileHandle, datasync: bool) -> FsResult<()> {
        let h = self.handle(fh)?;
        let read = self.sync_data_attr(ino.0, h.written.swap(false, Ordering::Relaxed))?;
        // fdatasync owes the size, not the times: when this handle already made the
        // current size durable, the data sync is all (a rewrite in place, such as a
        // database's journal header). A crash then loses at most the new mtime, which
        // recovery re-reads from the backing file, with the upload mark that goes with it.
        let size = match read {
            Some(size) => size,
            None => h.file.metadata()?.len(),
        };
        if datasync && h.durable_size.load(Ordering::Relaxed) == size {
            h.file.sync_data()?;
            return Ok(());
        }
        // The size and times just recorded need not be durable: after a crash recovery
        // takes them from the backing files. Only the namespace must be (the file's
        // creation, a chmod, an xattr), and when none of it is pending, a database's
        // fsyncs of its own files cost the data's flush alone.
        match self.meta.fsync_plan(ino.0) {
            FsyncPlan::DataOnly => flush_file(&h.file, datasync)?,
            FsyncPlan::Cover { record, epoch } if self.covers_by_origin(&h.file, &record) => {
                // The file's creation is all that is pending: its record rides in the
                // inode write of the file's own flush (see `cfs_flash::origin`).
                h.file.sync_all()?;
                self.meta.covered(ino.0, epoch);
            }
            FsyncPlan::Cover { .. } | FsyncPlan::Commit => {
                // The data and the metadata that records it are made durable side by
                // side, so the caller waits for one flush time, not two in a row. Their
                // order does not matter: until this returns nothing is promised.
                let (data, meta) = sync_beside(&h.file, datasync, || self.meta.sync_namespace());
                data?;
                meta?;
            }
        }
        h.durable_size.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// CREATE: `file`, a new regular file, opened with `flags`.
    fn create_file(
        &self,
        caller: cfs_meta::Caller,
        parent: INodeNo,
        name: &OsStr,
        file: NewNode<'_>,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let caller_uid = caller.uid;
        let r = self.admit_write().and_then(|()| {
            self.create_node(caller, parent, name, file)
                .and_then(|(inode, file)| {
                    let created = file.map(|f| (&inode, f));
                    let opened = self.open_file(caller_uid, inode.ino, flags, created, |f| {
                        reply.open_backing(f)
                    })?;
                    Ok((inode, opened))
                })
        });
        let (inode, Opened { fh, backing, flags }) = match r {
            Ok(created) => created,
            Err(e) => return reply.error(fail("create", e)),
        };
        // The new backing file is empty and was just given the inode's times (`create_node`),
        // so its attributes are the inode's: the create path need not stat it.
        let attr = crate::attr::to_file_attr(&inode, None);
        let (ttl, fh) = (&self.opts.entry_ttl, FileHandle(fh));
        match backing {
            Some(id) => reply.created_passthrough(ttl, &attr, Generation(0), fh, flags, &id),
            None => reply.created(ttl, &attr, Generation(0), fh, flags),
        }
    }

    /// OPEN: a handle on an existing file.
    fn open_handle(&self, caller_uid: u32, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY
            && let Err(e) = self.admit_write()
        {
            reply.error(fail("open", e));
            return;
        }
        let r = self.open_file(caller_uid, ino.0, flags.0, None, |f| reply.open_backing(f));
        match r {
            Ok(Opened {
                fh,
                backing: Some(id),
                flags,
            }) => reply.opened_passthrough(FileHandle(fh), flags, &id),
            Ok(Opened {
                fh,
                backing: None,
                flags,
            }) => reply.opened(FileHandle(fh), flags),
            Err(e) => reply.error(fail("open", e)),
        }
    }

    /// READ on an open handle.
    fn read_handle(&self, h: &crate::handles::Handle, offset: u64, size: u32, reply: ReplyData) {
        let r = (|| {
            if h.cold
                && let Some(data) = self.cold_read(h, offset, size)?
            {
                return Ok(data);
            }
            let mut buf = vec![0u8; size as usize];
            let mut filled = 0;
            while filled < buf.len() {
                let n = std::os::unix::fs::FileExt::read_at(
                    &h.file,
                    &mut buf[filled..],
                    offset + filled as u64,
                )?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            Ok(ReadData::Owned(buf))
        })();
        match r {
            Ok(data) => reply.data(data.bytes()),
            Err(e) => reply.error(fail("read", e)),
        }
    }

    /// WRITE on an open handle (one the daemon serves).
    fn write_handle(
        &self,
        h: &crate::handles::Handle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        reply: ReplyWrite,
    ) {
        let r = (|| {
            // Writes the daemon sees (no passthrough, or a cold file) wait for room like a
            // create does, so a handle opened before flash filled cannot overrun it.
            self.admit_write()?;
            if h.cold {
                self.ensure_present(h.ino, offset..offset + data.len() as u64)?;
            }
            let written = self.flash.user_change(h.ino, &h.file, Change::data(), || {
                std::os::unix::fs::FileExt::write_all_at(&h.file, data, offset)
            });
            // Even after a failed write, which may have landed in part.
            self.forget_fetched(h.ino);
            written?;
            h.written.store(true, Ordering::Relaxed);
            // The kernel asks for this when the writer may not keep the set-id bits
            // (it lacks CAP_FSETID).
            if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                self.kill_privileges(h.ino)?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(fail("write", e)),
        }
    }

    /// FALLOCATE on an open handle.
    fn fallocate_handle(
        &self,
        h: &crate::handles::Handle,
        caller_uid: u32,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> FsResult<()> {
        if h.cold {
            self.ensure_present(h.ino, offset..offset.saturating_add(length))?;
        }
        let done = self.flash.user_change(h.ino, &h.file, Change::data(), || {
            Ok(nix::fcntl::fallocate(
                &h.file,
                nix::fcntl::FallocateFlags::from_bits_retain(mode),
                offset as i64,
                length as i64,
            )?)
        });
        self.forget_fetched(h.ino);
        done?;
        h.written.store(true, Ordering::Relaxed);
        // The kernel leaves clearing set-id bits to the daemon here too; root stands
        // for CAP_FSETID, which FUSE does not pass on.
        if caller_uid != 0 {
            self.kill_privileges(h.ino)?;
        }
        Ok(())
    }

    /// COPY_FILE_RANGE between two open handles: the kernel copies (or clones) between
    /// the backing files, and the bytes never pass through the daemon.
    fn copy_range(
        &self,
        src: &crate::handles::Handle,
        offset_in: u64,
        dst: &crate::handles::Handle,
        offset_out: u64,
        len: u64,
        caller_uid: u32,
    ) -> FsResult<usize> {
        let mut off_in = offset_in as i64;
        let mut off_out = offset_out as i64;
        let len = len.min(u64::from(u32::MAX) & !0xfff) as usize;
        if src.cold {
            self.ensure_present(src.ino, offset_in..offset_in + len as u64)?;
        }
        if dst.cold {
            self.ensure_present(dst.ino, offset_out..offset_out + len as u64)?;
        }
        let n = self
            .flash
            .user_change(dst.ino, &dst.file, Change::data(), || {
                Ok(nix::fcntl::copy_file_range(
                    &src.file,
                    Some(&mut off_in),
                    &dst.file,
                    Some(&mut off_out),
                    len,
                )?)
            });
        self.forget_fetched(dst.ino);
        let n = n?;
        dst.written.store(true, Ordering::Relaxed);
        if caller_uid != 0 {
            self.kill_privileges(dst.ino)?;
        }
        Ok(n)
    }

    fn do_readdir(
        &self,
        ino: INodeNo,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileKind, &[u8], Option<&Inode>) -> bool,
        plus: bool,
    ) -> FsResult<()> {
        let dir = self.meta.inode(ino.0)?;
        if dir.kind != FileKind::Dir {
            return Err(FsError::Errno(Errno::ENOTDIR));
        }
        if offset < 1 && add(dir.ino, 1, FileKind::Dir, b".", plus.then_some(&dir)) {
            return Ok(());
        }
        if offset < 2 {
            let parent = if plus {
                Some(self.meta.inode(dir.parent)?)
            } else {
                None
            };
            if add(dir.parent, 2, FileKind::Dir, b"..", parent.as_ref()) {
                return Ok(());
            }
        }
        let mut after = offset.max(2);
        loop {
            let batch = self.meta.readdir(ino.0, after, 128, plus)?;
            if batch.is_empty() {
                return Ok(());
            }
            for (entry, inode) in &batch {
                // An entry whose inode vanished between the two reads is skipped, not retried.
                let skip = plus && inode.is_none();
                if !skip
                    && add(
                        entry.ino,
                        entry.cookie,
                        entry.kind,
                        &entry.name,
                        inode.as_ref(),
                    )
                {
                    return Ok(());
                }
                after = entry.cookie;
            }
        }
    }
}

impl Filesystem for ClaudeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let mut passthrough = false;
        if self.opts.passthrough {
            if config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH) {
                passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                    && config.set_max_stack_depth(2).is_ok();
            }
            if !passthrough {
                tracing::warn!(
                    "the kernel does not offer FUSE passthrough; serving I/O through the daemon"
                );
            }
        }
        // Everything below is an optimisation or a feature the kernel may lack; a refusal
        // only means doing without.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP
            // The filesystem clears set-user-ID and set-group-ID itself (see
            // `ClaudeFs::kill_privileges`), so the kernel sets SB_NOSEC: without it, every
            // write (passthrough ones included) first asks the daemon for the file's
            // `security.capability`, one round trip per write.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        // No FUSE_WRITEBACK_CACHE, even on the daemon path: with it the kernel drops the cached
        // block count at every close, so each later stat is a GETATTR round trip (stat ran at
        // 0.06x native against 1.4x without), and it made sequential writes and `tar` slower,
        // not faster (0.23x against 0.58x, 10.2 s against 7.2 s on the bench).
        let _ = config.add_capabilities(wanted & config.capabilities());
        self.live.no_opendir.store(
            config
                .capabilities()
                .contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT),
            Ordering::Relaxed,
        );
        self.live.direct_io_mmap.store(
            config
                .capabilities()
                .contains(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP),
            Ordering::Relaxed,
        );
        let _ = config.set_max_write(crate::attr::IO_BLOCK);
        let _ = config.set_max_readahead(crate::attr::IO_BLOCK);
        let _ = config.set_time_granularity(std::time::Duration::from_nanos(1));
        self.live.passthrough.store(passthrough, Ordering::Relaxed);
        if let Some(window) = self.opts.busy_poll {
            // Shown before the thread exists, so that whoever sees the thread (a test
            // reading /proc) also sees the window in `cfs status`; taken back if it fails.
            let us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
            self.live.busy_poll_us.store(us, Ordering::SeqCst);
            self.busy = crate::busy_poll::BusyPoll::start(window);
            if self.busy.is_none() {
                self.live.busy_poll_us.store(0, Ordering::SeqCst);
            }
        }
        tracing::info!(
            passthrough,
            busy_poll_us = self
                .busy
                .as_ref()
                .and(self.opts.busy_poll)
                .map(|w| w.as_micros()),
            "kernel handshake done"
        );
        Ok(())
    }

    fn destroy(&mut self) {
        // Requests still running on the slow pool finish first: what they record is part of
        // what the last sync below makes durable.
        self.slow.finish();
        // A file closed just before the unmount may have its RELEASE still queued, and the
        // kernel drops it with the connection. Release is where the daemon records what
        // passthrough writes did (size, times, the upload mark), so do it here instead.
        for h in self.live.handles.drain() {
            if let Err(e) = self.record_release(&h) {
                tracing::error!(ino = h.ino, error = ?e, "recording a file's last writes at unmount failed");
            }
        }
        self.purger.finish();
        self.busy = None;
        if let Err(e) = self.meta.sync() {
            tracing::error!(error = %e, "final metadata sync failed");
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.busy_touch(req);
        match self.meta.lookup(parent.0, name.as_bytes()) {
            // A negative entry (inode 0) lets the kernel cache the miss for the entry TTL, so
            // compilers and git probing absent paths cost one request, not one per probe.
            // Every create goes through this kernel, which drops the cached miss.
            Err(cfs_meta::MetaError::NotFound) if !self.opts.entry_ttl.is_zero() => reply.entry(
                &self.opts.entry_ttl,
                &crate::attr::negative_entry(),
                Generation(0),
            ),
            r => self.entry(reply, "lookup", r.map_err(Into::into)),
        }
    }

    fn forget(&self, req: &Request, ino: INodeNo, _nlookup: u64) {
        self.busy_touch(req);
        // The kernel forgets an inode only when it drops it, so an unlinked inode is now
        // unreferenced; a linked one is left alone by `Purge`.
        if let Ok(inode) = self.meta.inode(ino.0)
            && inode.nlink == 0
        {
            self.purge(ino.0);
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.busy_touch(req);
        match self.meta.inode(ino.0) {
            Ok(inode) => reply.attr(&self.opts.attr_ttl, &self.attr_of(&inode)),
            Err(e) => reply.error(fail("getattr", e.into())),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.busy_touch(req);
        let caller_uid = req.uid();
        let answer = move |core: &Core| match core
            .do_setattr(caller_uid, ino, mode, uid, gid, size, atime, mtime, fh)
        {
            Ok(inode) => reply.attr(&core.opts.attr_ttl, &core.attr_of(&inode)),
            Err(e) => reply.error(fail("setattr", e)),
        };
        // A truncation of a cold file first brings back the blob it cuts.
        if size.is_some() && self.is_cold(ino.0).unwrap_or(false) {
            self.offload(answer);
        } else {
            answer(self);
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.busy_touch(req);
        match self.meta.inode(ino.0) {
            Ok(inode) if inode.kind == FileKind::Symlink => reply.data(&inode.target),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(fail("readlink", e.into())),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.busy_touch(req);
        let Some(kind) =
            FileKind::from_mode(mode).filter(|k| *k != FileKind::Dir && *k != FileKind::Symlink)
        else {
            return reply.error(Errno::EINVAL);
        };
        let r = self
            .create_node(
                creator(req, mode),
                parent,
                name,
                NewNode {
                    kind,
                    mode,
                    umask,
                    rdev,
                    target: b"",
                },
            )
            .map(|(inode, _)| inode);
        self.entry(reply, "mknod", r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.busy_touch(req);
        let r = self
            .create_node(
                creator(req, mode),
                parent,
                name,
                NewNode {
                    kind: FileKind::Dir,
                    mode,
                    umask,
                    rdev: 0,
                    target: b"",
                },
            )
            .map(|(inode, _)| inode);
        self.entry(reply, "mkdir", r);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.busy_touch(req);
        let r = self.meta.execute(&Op::Unlink {
            parent: parent.0,
            name: name.as_bytes().to_vec(),
            now: now(),
        });
        Core::empty(
            reply,
            "unlink",
            r.map(|o| self.removed(o)).map_err(Into::into),
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.busy_touch(req);
        let r = self.meta.execute(&Op::Rmdir {
            parent: parent.0,
            name: name.as_bytes().to_vec(),
            now: now(),
        });
        Core::empty(
            reply,
            "rmdir",
            r.map(|o| self.removed(o)).map_err(Into::into),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.busy_touch(req);
        let r = self
            .create_node(
                creator(req, 0o777),
                parent,
                link_name,
                NewNode {
                    kind: FileKind::Symlink,
                    mode: 0o777,
                    umask: 0,
                    rdev: 0,
                    target: target.as_os_str().as_bytes(),
                },
            )
            .map(|(inode, _)| inode);
        self.entry(reply, "symlink", r);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.busy_touch(req);
        let mode = if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        } else if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else {
            RenameMode::Replace
        };
        let r = self.meta.execute(&Op::Rename {
            parent: parent.0,
            name: name.as_bytes().to_vec(),
            new_parent: newparent.0,
            new_name: newname.as_bytes().to_vec(),
            mode,
            now: now(),
        });
        Core::empty(
            reply,
            "rename",
            r.map(|o| self.removed(o)).map_err(Into::into),
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.busy_touch(req);
        let r = self
            .meta
            .execute(&Op::Link {
                ino: ino.0,
                parent: newparent.0,
                name: newname.as_bytes().to_vec(),
                now: now(),
            })
            .map_err(Into::into)
            .and_then(Core::inode_outcome);
        self.entry(reply, "link", r);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.busy_touch(req);
        let caller_uid = req.uid();
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY && self.must_wait_for_room() {
            self.offload(move |core| core.open_handle(caller_uid, ino, flags, reply));
        } else {
            self.open_handle(caller_uid, ino, flags, reply);
        }
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.busy_touch_io(req, size as usize);
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(fail("read", e)),
        };
        if h.cold {
            // May wait for the object store.
            self.offload(move |core| core.read_handle(&h, offset, size, reply));
        } else {
            self.read_handle(&h, offset, size, reply);
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.busy_touch_io(req, data.len());
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(fail("write", e)),
        };
        if h.cold || self.must_wait_for_room() {
            // May wait for the object store, or for room on flash.
            let data = data.to_vec();
            self.offload(move |core| core.write_handle(&h, offset, &data, write_flags, reply));
        } else {
            self.write_handle(&h, offset, data, write_flags, reply);
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.busy_touch(req);
        // Nothing to do at close: data is already on the backing file (the kernel writes back
        // its cache before sending FLUSH), and locks are the kernel's. ENOSYS tells the kernel
        // to stop sending FLUSH at all, saving a round trip on every close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.busy_touch(req);
        let handle = self.live.handles.remove(fh.0);
        let r = handle.as_ref().map_or(Ok(()), |h| self.record_release(h));
        Core::empty(reply, "release", r);
        // After the reply: the kernel has left this handle's io mode only now.
        if let Some(h) = handle {
            // Before the count drops: once no daemon-served handle is left, a passthrough
            // open may change the file where the daemon cannot see it.
            if h.cold {
                self.forget_fetched(h.ino);
                // Blobs prefetched for this reader came back to flash in the background.
                self.live.invalidate_attrs(h.ino);
            }
            self.live.handles.done_with(h.ino, h.backing.is_none());
        }
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.busy_touch(req);
        // A flush of the backing file, and maybe of the metadata store: milliseconds.
        self.offload(move |core| Core::empty(reply, "fsync", core.do_fsync(ino, fh, datasync)));
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.busy_touch(req);
        // A directory handle carries nothing here (readdir reads by inode and offset). A
        // kernel that offers zero-message opendir stops sending OPENDIR and RELEASEDIR for
        // good after one ENOSYS: two round trips less per directory opened (`ls`, `find`,
        // `git status`, a database's directory fsync).
        if self.live.no_opendir.load(Ordering::Relaxed) {
            reply.error(Errno::ENOSYS);
            return;
        }
        match self.meta.inode(ino.0) {
            Ok(inode) if inode.kind == FileKind::Dir => {
                reply.opened(FileHandle(0), FopenFlags::empty())
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(fail("opendir", e.into())),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.busy_touch(req);
        let r = self.do_readdir(
            ino,
            offset,
            |ino, cookie, kind, name, _| {
                reply.add(
                    INodeNo(ino),
                    cookie,
                    crate::attr::file_type(kind),
                    OsStr::from_bytes(name),
                )
            },
            false,
        );
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("readdir", e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.busy_touch(req);
        let ttl = self.opts.entry_ttl;
        let r = self.do_readdir(
            ino,
            offset,
            |ino, cookie, _kind, name, inode| match inode {
                Some(inode) => reply.add(
                    INodeNo(ino),
                    cookie,
                    OsStr::from_bytes(name),
                    &ttl,
                    &self.attr_of(inode),
                    Generation(0),
                ),
                None => false,
            },
            true,
        );
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("readdirplus", e)),
        }
    }

    fn fsyncdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.busy_touch(req);
        // A directory's entries are namespace; what else is pending is bookkeeping that
        // recovery rebuilds (see `Op::is_bookkeeping`). A commit with an fsync: off the
        // FUSE threads.
        self.offload(move |core| {
            Core::empty(
                reply,
                "fsyncdir",
                core.meta.sync_namespace().map_err(Into::into),
            );
        });
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.busy_touch(req);
        match self.flash.capacity() {
            Ok(c) => reply.statfs(
                c.blocks,
                c.blocks_free,
                c.blocks_avail,
                c.files,
                c.files_free,
                c.block_size as u32,
                cfs_meta::NAME_MAX as u32,
                c.block_size as u32,
            ),
            Err(e) => reply.error(fail("statfs", e.into())),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.busy_touch(req);
        let mode = if flags & libc::XATTR_CREATE != 0 {
            XattrMode::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrMode::Replace
        } else {
            XattrMode::Upsert
        };
        let caller = if name.as_bytes() == acl::ACCESS_XATTR {
            caller_with_groups(req)
        } else {
            caller(req)
        };
        let is_policy = name.as_bytes() == cfs_meta::TIER_XATTR;
        if is_policy && !matches!(value, b"flash" | b"s3" | b"auto") {
            reply.error(Errno::EINVAL);
            return;
        }
        let at = now();
        let mut r = self.meta.execute(&Op::SetXattr {
            ino: ino.0,
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
            mode,
            caller: caller.clone(),
            now: at,
        });
        if r.is_ok() && is_policy {
            let mut changed = vec![ino.0];
            // A directory's policy also reaches what is already under it (see tier_tree).
            if matches!(self.meta.inode(ino.0), Ok(i) if i.kind == FileKind::Dir) {
                match crate::tier_tree::apply_below(&self.meta, ino.0, value, &caller, at) {
                    Ok(files) => {
                        tracing::info!(dir = ino.0, files = files.len(), policy = %String::from_utf8_lossy(value), "tier policy set on a directory and the files under it");
                        changed.extend(files);
                    }
                    Err(e) => r = Err(e),
                }
            }
            if let Some(tier) = &self.opts.tier {
                for f in changed {
                    tier.policy_changed(f);
                }
            }
        }
        Core::empty(reply, "setxattr", r.map(|_| ()).map_err(Into::into));
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.busy_touch(req);
        match self.meta.xattr(ino.0, name.as_bytes()) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(fail("getxattr", e.into())),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.busy_touch(req);
        match self.meta.xattr_names(ino.0) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32)
                } else if buf.len() > size as usize {
                    reply.error(Errno::ERANGE)
                } else {
                    reply.data(&buf)
                }
            }
            Err(e) => reply.error(fail("listxattr", e.into())),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.busy_touch(req);
        let r = self.meta.execute(&Op::RemoveXattr {
            ino: ino.0,
            name: name.as_bytes().to_vec(),
            now: now(),
        });
        Core::empty(reply, "removexattr", r.map(|_| ()).map_err(Into::into));
    }

    fn access(&self, req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.busy_touch(req);
        // With default_permissions the kernel has already checked; this only confirms the
        // inode still exists.
        Core::empty(
            reply,
            "access",
            self.meta.inode(ino.0).map(|_| ()).map_err(Into::into),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.busy_touch(req);
        let caller = creator(req, mode);
        let file = NewNode {
            kind: FileKind::File,
            mode,
            umask,
            rdev: 0,
            target: b"",
        };
        if self.must_wait_for_room() {
            let name = name.to_owned();
            self.offload(move |core| core.create_file(caller, parent, &name, file, flags, reply));
        } else {
            self.create_file(caller, parent, name, file, flags, reply);
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.busy_touch(req);
        let caller_uid = req.uid();
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(fail("fallocate", e)),
        };
        let cold = h.cold;
        let answer = move |core: &Core| {
            let r = core.fallocate_handle(&h, caller_uid, offset, length, mode);
            Core::empty(reply, "fallocate", r);
        };
        if cold {
            // May bring blobs back from the object store first.
            self.offload(answer);
        } else {
            answer(self);
        }
    }

    fn lseek(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.busy_touch(req);
        let r = self.handle(fh).and_then(|h| {
            let whence = match whence {
                libc::SEEK_DATA => nix::unistd::Whence::SeekData,
                libc::SEEK_HOLE => nix::unistd::Whence::SeekHole,
                libc::SEEK_SET => nix::unistd::Whence::SeekSet,
                libc::SEEK_END => nix::unistd::Whence::SeekEnd,
                _ => return Err(FsError::Errno(Errno::EINVAL)),
            };
            let data_hole = matches!(
                whence,
                nix::unistd::Whence::SeekData | nix::unistd::Whence::SeekHole
            );
            if data_hole && h.cold && self.is_cold(h.ino)? {
                // Evicted blobs are holes on flash but data in the file: report the file as
                // all data rather than let a copy skip them.
                let size = h.file.metadata()?.len() as i64;
                if offset < 0 || offset >= size {
                    return Err(FsError::Errno(Errno::ENXIO));
                }
                return Ok(if matches!(whence, nix::unistd::Whence::SeekData) {
                    offset
                } else {
                    size
                });
            }
            Ok(nix::unistd::lseek(&h.file, offset, whence)?)
        });
        match r {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(fail("lseek", e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.busy_touch(req);
        let (src, dst) = match self
            .handle(fh_in)
            .and_then(|s| Ok((s, self.handle(fh_out)?)))
        {
            Ok(pair) => pair,
            Err(e) => return reply.error(fail("copy_file_range", e)),
        };
        let cold = src.cold || dst.cold;
        let caller_uid = req.uid();
        let answer = move |core: &Core| match core
            .copy_range(&src, offset_in, &dst, offset_out, len, caller_uid)
        {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(fail("copy_file_range", e)),
        };
        if cold {
            // May bring blobs back from the object store first.
            self.offload(answer);
        } else {
            answer(self);
        }
    }
}
