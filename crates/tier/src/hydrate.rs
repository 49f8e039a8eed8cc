//! Re-hydration: bringing an evicted blob back from the object store onto flash.
//!
//! A read (or write) that touches an evicted blob waits for exactly that blob: one GET of its
//! object, checked against the length and crc32c recorded in metadata, written at its true
//! offset in the backing file (its zero runs left holes) and synced, then recorded with
//! `Hydrated`. The order matters: were `Hydrated` durable before the bytes, a crash could
//! leave a blob marked present that reads as zeros; the other way round, a crash only costs a
//! second download.
//!
//! A read that is not sequential need not wait for a whole blob: [`Hydrator::read_range`]
//! serves it with one ranged GET of the 1 MiB pieces it touches, each checked against the
//! piece checksums recorded at upload, and leaves the blob evicted. A blob read that way a
//! second time is fetched whole in the background, so a working set settles on flash.
//!
//! A sequential reader of a file pinned to the object store (`user.cfs.tier=s3`) is served
//! from the fetched bytes alone: they are not written back to flash, where the policy would
//! only evict them again, so reading a cold file larger than flash neither fills flash nor
//! makes eviction run behind the reader (nor fills the kernel's page cache: the FUSE layer
//! drops a sequential reader's pages behind it, see `cfs_fuse`'s `drop_behind`). Writes, and
//! random reads that keep coming back to one blob, still bring it back on flash.
//!
//! A corrupt or short object is never written: the caller gets an error (`EIO` to the
//! application), the log says which key, and the `corrupt` counter goes up.

use crate::error::meta_err;
use crate::key::{BLOB_SIZE, BlobKey, FsId};
use crate::{BlobStore, Result, TierError, zero_blob};
use bytes::Bytes;
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
    /// Blobs fetched for readers of files pinned to the store, and not kept on flash.
    pub blobs_streamed: AtomicU64,
    pub bytes_streamed: AtomicU64,
    /// Reads served by a ranged GET of part of an evicted blob, and their bytes.
    pub ranged_reads: AtomicU64,
    pub ranged_bytes: AtomicU64,
    /// GETs whose body did not match the recorded length or checksum.
    pub corrupt: AtomicU64,
    pub errors: AtomicU64,
}

/// Backing files written by hydration since the last durable metadata commit.
type Unsynced = parking_lot::Mutex<std::collections::HashSet<Ino>>;

/// Per blob being fetched, the flight its concurrent readers share.
type InFlight = parking_lot::Mutex<HashMap<(Ino, u64), Arc<Flight>>>;

/// One blob being fetched and written to flash.
#[derive(Default)]
struct Flight {
    /// Held from the GET until the blob is on flash and recorded, so that concurrent
    /// hydrations of one blob share a GET and a writer never overtakes the flash write.
    lock: tokio::sync::Mutex<()>,
    /// Set when the file's data changed through the daemon (or its last cold handle went)
    /// while this flight was under way: its bytes may then be older than the file, so they
    /// are not kept in [`Recent`] for readers.
    stale: std::sync::atomic::AtomicBool,
}

/// Blobs fetched and verified lately, newest last, each as a whole: a sequential reader of a
/// cold file is served from these bytes, not from their copy on flash, and does not wait
/// for the flash write. Bounded by [`RECENT_BLOBS`]; emptied for a file whenever its data
/// may change (see [`Hydrator::forget_recent`]), so they never disagree with the file.
type Recent = parking_lot::Mutex<std::collections::VecDeque<RecentBlob>>;

struct RecentBlob {
    ino: Ino,
    k: u64,
    generation: u64,
    data: Bytes,
}

/// Why a blob is fetched: for a reader, who needs its bytes only, or to have it on flash
/// again (a write, a truncation, a blob that random reads keep coming back to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Read,
    Restore,
}

/// Fetched blobs kept for readers: the blob being read plus the four a sequential reader
/// prefetches, with one to spare. At 64 MiB each, the memory this pins is bounded.
const RECENT_BLOBS: usize = 6;

pub struct Hydrator {
    meta: Arc<MetaStore>,
    flash: FlashDir,
    store: BlobStore,
    fs: FsId,
    runtime: tokio::runtime::Handle,
    /// One lock per blob being fetched, so that concurrent readers of one blob share a GET.
    inflight: InFlight,
    unsynced: Arc<Unsynced>,
    stats: Arc<HydrateStats>,
    /// Evicted blobs read in part, and how often: the second time, the whole blob comes.
    touched: parking_lot::Mutex<HashMap<(Ino, u64), u32>>,
    recent: Recent,
    /// Woken whenever a blob joins `recent`, for readers waiting on someone else's GET.
    published: tokio::sync::Notify,
}

/// Ranged reads of an evicted blob after which it is fetched whole.
const TOUCHES_BEFORE_FETCH: u32 = 2;
/// Bound on the blobs whose ranged reads are counted.
const TOUCHED_MAX: usize = 1 << 16;

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
            unsynced: Arc::default(),
            stats: Arc::default(),
            touched: Default::default(),
            recent: Default::default(),
            published: tokio::sync::Notify::new(),
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
        self.fetch_in_background(ino, k, Purpose::Read);
    }

    fn fetch_in_background(self: &Arc<Self>, ino: Ino, k: u64, purpose: Purpose) {
        let Ok(Some(record)) = self.meta.evicted_blob(ino, k) else {
            return;
        };
        // A reader's blob that is fetched already, or being fetched.
        if purpose == Purpose::Read
            && (self.recent_blob(ino, k, Some(record.generation)).is_some()
                || self.inflight.lock().contains_key(&(ino, k)))
        {
            return;
        }
        self.stats.prefetches.fetch_add(1, Ordering::Relaxed);
        // Joined now, not when the task first runs: a `forget_recent` from here on must
        // find this flight to mark it stale.
        let flight = self.flight(ino, k);
        let this = Arc::clone(self);
        self.runtime.spawn(async move {
            if let Err(e) = this.fly(ino, k, flight, purpose).await {
                tracing::debug!(ino, k, error = %e, "prefetch failed; the read will retry");
            }
        });
    }

    /// Bytes `offset..offset + len` of `ino`, if they lie in one evicted blob whose piece
    /// checksums are recorded and that no one is fetching already: then from one ranged GET
    /// of the pieces they touch, verified, without waiting for the rest of the blob.
    /// `Ok(None)` means "fetch the blob instead" (present, being fetched or fetched lately,
    /// spanning two blobs, or recorded without piece checksums). Blocks the calling
    /// (non-async) thread.
    pub fn read_range(self: &Arc<Self>, ino: Ino, offset: u64, len: u64) -> Result<Option<Bytes>> {
        let this = Arc::clone(self);
        self.runtime
            .block_on(async move { this.read_range_async(ino, offset, len).await })
    }

    async fn read_range_async(
        self: &Arc<Self>,
        ino: Ino,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>> {
        let k = offset / BLOB_SIZE;
        if len == 0
            || (offset + len - 1) / BLOB_SIZE != k
            || self.inflight.lock().contains_key(&(ino, k))
        {
            return Ok(None);
        }
        let Some(record) = self.meta.evicted_blob(ino, k).map_err(meta_err)? else {
            return Ok(None);
        };
        let generation = record.generation;
        let piece = cfs_meta::BLOB_CHUNK;
        let at = offset - k * BLOB_SIZE;
        let end = at + len;
        // Fetched whole lately: the caller serves it from those bytes (a sequential
        // reader's readahead can arrive out of order).
        if self.recent_blob(ino, k, Some(generation)).is_some() {
            return Ok(None);
        }
        if record.chunks.len() as u64 != record.len.div_ceil(piece) || end > record.len {
            return Ok(None);
        }
        // Its object may be a marker, which has no bytes to range over; fetching it whole
        // is then one short GET, and leaves a hole on flash.
        if zero_blob::may_be_marker(record.len, record.crc32c) {
            return Ok(None);
        }
        let (first, last) = (at / piece, (end - 1) / piece);
        let start = first * piece;
        let stop = ((last + 1) * piece).min(record.len);
        let key = BlobKey::new(self.fs.clone(), ino, k, generation).object_key();
        let crcs = &record.chunks[first as usize..=last as usize];
        let body = match self
            .store
            .get_range_verified(&key, start..stop, piece, crcs)
            .await
        {
            Ok(b) => b,
            Err(e @ TierError::Corrupt { .. }) => {
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(ino, k, key = %key, bytes = ?(start..stop), error = %e, "corrupt object in the store: the read fails with EIO");
                return Err(e);
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.stats.ranged_reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .ranged_bytes
            .fetch_add(stop - start, Ordering::Relaxed);
        let again = {
            let mut touched = self.touched.lock();
            if touched.len() >= TOUCHED_MAX {
                touched.clear();
            }
            let n = touched.entry((ino, k)).or_default();
            *n += 1;
            let again = *n >= TOUCHES_BEFORE_FETCH;
            if again {
                touched.remove(&(ino, k));
            }
            again
        };
        if again {
            self.fetch_in_background(ino, k, Purpose::Restore);
        }
        Ok(Some(
            body.slice((at - start) as usize..(end - start) as usize),
        ))
    }

    /// Blob `k` of `ino` as fetched and verified from the object store, for a sequential
    /// reader: from the recent blobs, or else by fetching it (or joining the fetch under
    /// way) and returning as soon as its bytes are verified, while the flash write goes on
    /// in the background. `Ok(None)`: the blob is on flash (or its bytes could not be kept
    /// because the file changed meanwhile); read it there. Blocks the calling thread.
    pub fn read_blob(self: &Arc<Self>, ino: Ino, k: u64) -> Result<Option<Bytes>> {
        let evicted = self.meta.evicted_blob(ino, k).map_err(meta_err)?;
        let generation = evicted.as_ref().map(|r| r.generation);
        if let Some(data) = self.recent_blob(ino, k, generation) {
            return Ok(Some(data));
        }
        if evicted.is_none() {
            return Ok(None);
        }
        let flight = self.flight(ino, k);
        let this = Arc::clone(self);
        let task = self
            .runtime
            .spawn(async move { this.fly(ino, k, flight, Purpose::Read).await });
        let this = Arc::clone(self);
        self.runtime
            .block_on(async move { this.await_blob(ino, k, task).await })
    }

    /// Waits until blob `k` of `ino` is among the recent blobs or `task` (its hydration)
    /// is done, whichever comes first.
    async fn await_blob(
        &self,
        ino: Ino,
        k: u64,
        mut task: tokio::task::JoinHandle<Result<()>>,
    ) -> Result<Option<Bytes>> {
        loop {
            let published = self.published.notified();
            tokio::pin!(published);
            // Registered before looking, so a publication in between is not missed.
            published.as_mut().enable();
            if let Some(data) = self.recent_blob(ino, k, None) {
                return Ok(Some(data));
            }
            tokio::select! {
                _ = &mut published => {}
                done = &mut task => {
                    done.map_err(|e| TierError::Other {
                        context: format!("fetching blob {k} of inode {ino}"),
                        source: Box::new(e),
                    })??;
                    return Ok(self.recent_blob(ino, k, None));
                }
            }
        }
    }

    /// The recent blob `k` of `ino`, if it is kept, and of `generation` if that is given
    /// (the blob is still evicted, so metadata names the object its bytes must come from).
    fn recent_blob(&self, ino: Ino, k: u64, generation: Option<u64>) -> Option<Bytes> {
        self.recent
            .lock()
            .iter()
            .rev()
            .find(|b| b.ino == ino && b.k == k && generation.is_none_or(|g| g == b.generation))
            .map(|b| b.data.clone())
    }

    /// Keeps the verified bytes of blob `k` of `ino` for readers, unless the file changed
    /// since `flight` began, and wakes the readers waiting for them.
    fn publish(&self, flight: &Flight, ino: Ino, k: u64, generation: u64, data: &Bytes) {
        {
            let mut recent = self.recent.lock();
            // Checked under the lock `forget_recent` takes, so no stale bytes slip in.
            if flight.stale.load(Ordering::Relaxed) {
                return;
            }
            recent.retain(|b| !(b.ino == ino && b.k == k));
            if recent.len() >= RECENT_BLOBS {
                recent.pop_front();
            }
            recent.push_back(RecentBlob {
                ino,
                k,
                generation,
                data: data.clone(),
            });
        }
        self.published.notify_waiters();
    }

    /// Drops the recent blobs of `ino` and keeps those being fetched from joining them:
    /// called after its data changed through the daemon (a write, a truncation, an
    /// fallocate, a copy into it) and when a cold handle of it is released (after which a
    /// passthrough open could change it unseen). Readers then read flash, the truth.
    pub fn forget_recent(&self, ino: Ino) {
        let mut recent = self.recent.lock();
        recent.retain(|b| b.ino != ino);
        for (_, flight) in self.inflight.lock().iter().filter(|((i, _), _)| *i == ino) {
            flight.stale.store(true, Ordering::Relaxed);
        }
    }

    /// The flight of blob `k` of `ino`, joined or begun.
    fn flight(&self, ino: Ino, k: u64) -> Arc<Flight> {
        Arc::clone(self.inflight.lock().entry((ino, k)).or_default())
    }

    pub async fn hydrate(self: Arc<Self>, ino: Ino, k: u64) -> Result<()> {
        let flight = self.flight(ino, k);
        self.fly(ino, k, flight, Purpose::Restore).await
    }

    /// Hydrates blob `k` of `ino` as part of `flight`, then leaves it.
    async fn fly(
        self: Arc<Self>,
        ino: Ino,
        k: u64,
        flight: Arc<Flight>,
        purpose: Purpose,
    ) -> Result<()> {
        let result = {
            let _held = flight.lock.lock().await;
            self.hydrate_locked(ino, k, &flight, purpose).await
        };
        // `flight` is still held here: the map's entry and ours make two.
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

    /// True if `ino`'s data is pinned to the object store (`user.cfs.tier=s3`).
    fn pinned_to_store(&self, ino: Ino) -> bool {
        matches!(self.meta.xattr(ino, cfs_meta::TIER_XATTR), Ok(v) if v == b"s3")
    }

    async fn hydrate_locked(
        &self,
        ino: Ino,
        k: u64,
        flight: &Flight,
        purpose: Purpose,
    ) -> Result<()> {
        let Some(record) = self.meta.evicted_blob(ino, k).map_err(meta_err)? else {
            return Ok(());
        };
        let generation = record.generation;
        let stream = purpose == Purpose::Read && self.pinned_to_store(ino);
        // A reader's fetch that an earlier flight of this blob already served.
        if stream && self.recent_blob(ino, k, Some(generation)).is_some() {
            return Ok(());
        }
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
        self.publish(flight, ino, k, generation, &data);
        if stream {
            self.stats.blobs_streamed.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes_streamed
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            tracing::debug!(ino, k, elapsed = ?started.elapsed(), "blob fetched for a reader, not kept on flash (pinned to the store)");
            return Ok(());
        }
        let offset = k * BLOB_SIZE;
        // On a task of its own, so that the write runs to the end (times restored, the
        // blob recorded) even if whoever awaits this stops waiting.
        let meta = Arc::clone(&self.meta);
        let flash = self.flash.clone();
        let unsynced = Arc::clone(&self.unsynced);
        let write = tokio::task::spawn_blocking(move || {
            write_blob(&meta, &flash, &unsynced, ino, k, generation, offset, &data)
        });
        let written = write
            .await
            .map_err(|e| std::io::Error::other(format!("hydration task: {e}")))
            .and_then(|r| r)
            .map_err(|e| TierError::Other {
                context: format!("writing blob {k} of inode {ino} to flash"),
                source: Box::new(e),
            })?;
        self.stats.blobs_hydrated.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_hydrated
            .fetch_add(written, Ordering::Relaxed);
        tracing::debug!(ino, k, bytes = written, elapsed = ?started.elapsed(), "blob hydrated");
        Ok(())
    }
}

/// Writes a fetched blob at `offset` of the backing file, keeping the file's atime and mtime
/// and its holes (zero runs are punched, not written: see [`cfs_flash::write_keeping_holes`]),
/// and records it present. The write is not synced here: the file joins `unsynced`, and
/// the data barrier syncs it before any durable metadata commit, which is the only order
/// that matters (a blob recorded present must read back as data after a crash). Fetching
/// many blobs then costs one fdatasync per file per commit, not one per blob.
#[allow(clippy::too_many_arguments)]
fn write_blob(
    meta: &MetaStore,
    flash: &FlashDir,
    unsynced: &Unsynced,
    ino: Ino,
    k: u64,
    generation: u64,
    offset: u64,
    data: &[u8],
) -> std::io::Result<u64> {
    let _described_with_data = meta.data_guard();
    let file = flash.open_rw(ino)?;
    // Never grow the file: a truncation may have cut this blob after it was evicted.
    let size = file.metadata()?.len();
    // Times are held and put back only around a write (it costs a stat and a futimens).
    let n = if offset < size {
        flash.keep_times(ino, &file, || write_fetched(&file, data, offset, size))?
    } else {
        0
    };
    if n > 0 {
        unsynced.lock().insert(ino);
    }
    meta.execute(&Op::Hydrated { ino, k, generation })
        .map_err(std::io::Error::other)?;
    Ok(n)
}

/// Writes the fetched bytes `data` of a blob at `offset` of its backing file `file`, as far
/// as `size` and no further (a truncation may have cut the blob since it was uploaded): runs
/// of zeros are left holes ([`cfs_flash::write_keeping_holes`]) and the rest goes through
/// [`write_maybe_direct`]. A blob of zeros read from its marker is punched out whole,
/// unread ([`zero_blob::is_shared_zeros`]). Returns how many bytes of `data` now stand in
/// the file. Not synced: the hydrator leaves that to the data barrier, and `cfs repair`
/// syncs each blob.
pub fn write_fetched(
    file: &std::fs::File,
    data: &[u8],
    offset: u64,
    size: u64,
) -> std::io::Result<u64> {
    let n = (data.len() as u64).min(size.saturating_sub(offset));
    let data = &data[..n as usize];
    let write = |run: &[u8], at: u64| write_maybe_direct(file, run, at);
    if zero_blob::is_shared_zeros(data) {
        cfs_flash::write_known_zeros(file, data, offset, write)?;
    } else if n > 0 {
        cfs_flash::write_keeping_holes(file, data, offset, write)?;
    }
    Ok(n)
}

/// Writes `data` at `offset` of `file`, its block-aligned bulk with `O_DIRECT` when the
/// bytes and the offset are aligned (a blob fetched whole is: see
/// [`crate::pooled::DIRECT_ALIGN`]) and the filesystem takes it. A buffered write of a
/// blob copies 64 MiB into freshly allocated page-cache pages, which costs more CPU than
/// receiving it, and nothing needs those pages: readers are served from the fetched bytes.
/// The tail, and anything `O_DIRECT` refuses, is written buffered.
fn write_maybe_direct(file: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use crate::pooled::DIRECT_ALIGN;
    use std::os::unix::fs::FileExt;
    let aligned =
        data.as_ptr().align_offset(DIRECT_ALIGN) == 0 && offset.is_multiple_of(DIRECT_ALIGN as u64);
    let bulk = if aligned {
        data.len() / DIRECT_ALIGN * DIRECT_ALIGN
    } else {
        0
    };
    let mut done = 0;
    if bulk > 0 && set_direct(file, true).is_ok() {
        let written = file.write_all_at(&data[..bulk], offset);
        set_direct(file, false)?;
        match written {
            Ok(()) => done = bulk,
            // Not for this file or device after all: all of it buffered.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    file.write_all_at(&data[done..], offset + done as u64)
}

/// Turns `O_DIRECT` on or off for `file`'s open file description.
fn set_direct(file: &std::fs::File, on: bool) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    let flags = if on {
        flags | OFlag::O_DIRECT
    } else {
        flags - OFlag::O_DIRECT
    };
    fcntl(file, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

impl cfs_meta::DataBarrier for Hydrator {
    fn sync_data(&self) -> std::io::Result<()> {
        let files: Vec<Ino> = self.unsynced.lock().drain().collect();
        for (i, &ino) in files.iter().enumerate() {
            let r = match self.flash.open_rw(ino) {
                Ok(f) => f.sync_data(),
                // Deleted meanwhile: nothing of it needs to survive.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                // Still owed: the next durable commit tries again.
                self.unsynced.lock().extend(&files[i..]);
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlobIo;
    use crate::blob_io::{Uring, UringOptions};
    use crate::uploader::Uploader;
    use std::os::unix::fs::{FileExt, MetadataExt};

    /// `path` created empty (or emptied), open for reading and writing.
    fn empty_backing(path: &std::path::Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .expect("backing file")
    }

    /// A blob of zeros read from its marker replaces what the backing file held in its
    /// range (a stale write, data from before a truncation) with a hole, up to the file's
    /// size, leaving the bytes around it alone; zeros of another buffer take the scanning
    /// path and end the same.
    #[test]
    fn zero_blobs_from_markers_are_punched_over_whatever_was_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backing");
        let blob = BLOB_SIZE as usize;
        let (before, len, size) = (4096usize, 3 * blob / 4, 4096 + 3 * blob / 4 - 100);
        for shared in [true, false] {
            let file = empty_backing(&path);
            file.write_all_at(&vec![0xEE; before + len], 0)
                .expect("stale");
            file.set_len(size as u64).expect("size");
            file.sync_all().expect("sync");
            let zeros = if shared {
                zero_blob::zeros(len as u64)
            } else {
                Bytes::from(vec![0u8; len])
            };
            assert_eq!(zero_blob::is_shared_zeros(&zeros), shared);
            let n = write_fetched(&file, &zeros, before as u64, size as u64).expect("write");
            assert_eq!(n as usize, size - before, "only up to the file's size");
            let back = std::fs::read(&path).expect("read back");
            assert_eq!(back.len(), size, "the size is kept");
            assert!(
                back[..before].iter().all(|&b| b == 0xEE),
                "bytes before kept"
            );
            assert!(
                back[before..].iter().all(|&b| b == 0),
                "the blob reads as zeros"
            );
            file.sync_all().expect("sync");
            let allocated = file.metadata().expect("stat").blocks() * 512;
            assert!(
                allocated < (1 << 20),
                "the zeros take no space (shared: {shared}): {allocated} bytes allocated"
            );
        }
    }

    /// A fetched blob's bytes land on flash exactly, whether they start at an aligned address
    /// (then the aligned bulk goes with `O_DIRECT` where the filesystem takes it) or not, with
    /// a tail that is not a whole block, and leave the bytes around them alone.
    #[test]
    fn blob_writes_land_exactly_aligned_or_not() {
        use crate::pooled::DIRECT_ALIGN;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backing");
        let mut rng = crate::SplitMix64::new(5);
        let len = 5 * DIRECT_ALIGN + 123;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        // Room to place the copy at an aligned address, or one byte past it.
        let mut room = vec![0u8; len + 2 * DIRECT_ALIGN];
        let start = room.as_ptr().align_offset(DIRECT_ALIGN);
        for skew in [0, 1] {
            let at = start + skew;
            room[at..at + len].copy_from_slice(&data);
            let file = empty_backing(&path);
            let offset = 2 * DIRECT_ALIGN as u64;
            file.set_len(offset + len as u64 + 7).expect("size");
            write_maybe_direct(&file, &room[at..at + len], offset).expect("write");
            let back = std::fs::read(&path).expect("read back");
            assert!(
                back[..offset as usize].iter().all(|&b| b == 0),
                "skew {skew}"
            );
            assert!(back[offset as usize..][..len] == data[..], "skew {skew}");
            assert_eq!(&back[offset as usize + len..], &[0u8; 7], "skew {skew}");
        }
    }

    /// Uploaded with either blob I/O backend, evicted and hydrated, a blob comes back byte for
    /// byte at its offset with the file's size and times as they were, and the data barrier
    /// syncs it before the next durable commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upload_evict_hydrate_round_trip_with_both_backends() {
        let uring = Uring::new(UringOptions::default()).expect("io_uring ring");
        for io in [BlobIo::Portable, BlobIo::Uring(uring)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = BlobStore::new(Arc::new(object_store::memory::InMemory::new()), "pre")
                .expect("store");
            let mut rng = crate::SplitMix64::new(9);
            let data: Vec<u8> = (0..BLOB_SIZE + (1 << 20) + 7)
                .map(|_| rng.next_u64() as u8)
                .collect();
            let (meta, flash, ino, file) = crate::tests::one_queued_file(dir.path(), &data);
            Uploader::new(Arc::clone(&meta), flash.clone(), store.clone(), 2)
                .expect("uploader")
                .with_blob_io(io.clone())
                .pass()
                .await
                .expect("upload");
            let blobs = meta.blobs_of(ino).expect("blobs");
            assert_eq!(blobs.len(), 2, "{}", io.name());

            meta.execute(&Op::Evict {
                ino,
                blobs: blobs.iter().map(|b| (b.k, b.generation)).collect(),
            })
            .expect("evict");
            flash.punch(ino, 0..data.len() as u64).expect("punch");
            let old = nix::sys::time::TimeSpec::new(1_000_000, 5);
            nix::sys::stat::futimens(&file, &old, &old).expect("utimes");

            let h = Hydrator::new(
                Arc::clone(&meta),
                flash.clone(),
                store,
                tokio::runtime::Handle::current(),
            )
            .expect("hydrator");
            meta.set_data_barrier(Arc::clone(&h) as Arc<dyn cfs_meta::DataBarrier>);
            for k in [1, 0] {
                Arc::clone(&h).hydrate(ino, k).await.expect("hydrate");
            }
            assert!(h.unsynced.lock().contains(&ino), "written, not yet synced");
            meta.sync().expect("durable commit");
            assert!(
                h.unsynced.lock().is_empty(),
                "the commit synced the data first"
            );
            assert!(meta.evicted_of(ino).expect("evicted").is_empty());
            // Times first: our own read below may move the atime (relatime).
            let md = file.metadata().expect("md");
            assert_eq!(
                (md.len(), md.mtime(), md.mtime_nsec(), md.atime()),
                (data.len() as u64, 1_000_000, 5, 1_000_000),
                "{}",
                io.name()
            );
            let mut back = vec![0u8; data.len()];
            file.read_exact_at(&mut back, 0).expect("read");
            assert!(back == data, "{}: data differs after hydration", io.name());
            assert_eq!(
                h.stats().bytes_hydrated.load(Ordering::Relaxed),
                data.len() as u64
            );
        }
    }
}
