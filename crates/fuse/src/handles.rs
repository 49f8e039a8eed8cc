//! Open file handles and the passthrough backing ids they share.
//!
//! The kernel requires every passthrough open of one inode to use the same backing id, so ids
//! are kept per inode (weakly) and each handle holds a strong reference until `release`.

use dashmap::DashMap;
use fuser::BackingId;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

pub struct Handle {
    pub ino: u64,
    pub file: File,
    pub writable: bool,
    /// Set once the daemon path wrote through this handle.
    pub written: AtomicBool,
    /// Keeps the kernel's backing id alive while the handle is open.
    pub backing: Option<Arc<BackingId>>,
    /// Opened while some of the file's blobs were off flash: served by the daemon, which
    /// fetches each blob before the first access to it.
    pub cold: bool,
    /// Opened for direct I/O (a cold file opened read-only; see `ClaudeFs::open`): the
    /// kernel caches none of its reads, so there are no pages to drop behind its reader.
    pub direct_io: bool,
    /// Where the next read starts if the reader is sequential (for prefetch).
    pub next_read: AtomicU64,
    /// The last blob index prefetched for this handle, plus one (0: none).
    pub prefetched: AtomicU64,
    /// How far (bytes) the kernel was told it may drop this file's cached pages behind a
    /// sequential reader of this handle.
    pub dropped: AtomicU64,
    /// The file size that this handle's last `fsync` made durable in metadata
    /// ([`NO_DURABLE_SIZE`] before one): a later `fdatasync` at that same size needs no
    /// metadata commit, since only the size is needed to read the data back.
    pub durable_size: AtomicU64,
    /// For a handle opened by a create: the size and mtime that metadata recorded for the new
    /// file, which its backing file was given. A release that finds the backing file still so
    /// has nothing to record and skips the metadata read (see `ClaudeFs::record_release`).
    pub created: Option<Recorded>,
}

/// A file's size and mtime as metadata recorded them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub size: u64,
    pub mtime: (i64, i64),
}

impl Recorded {
    /// What metadata recorded for `inode`.
    pub fn of(inode: &cfs_meta::Inode) -> Recorded {
        Recorded {
            size: inode.size,
            mtime: (inode.mtime.secs, i64::from(inode.mtime.nanos)),
        }
    }

    /// True if the open backing file `file` still has this size and mtime.
    pub fn unchanged(&self, file: &File) -> bool {
        file.metadata().is_ok_and(|md| {
            md.len() == self.size && cfs_flash::FileTimes::of(&md).mtime == self.mtime
        })
    }
}

/// [`Handle::durable_size`] before the handle's first `fsync`.
pub const NO_DURABLE_SIZE: u64 = u64::MAX;

#[derive(Default)]
pub struct Handles {
    next: AtomicU64,
    open: DashMap<u64, Arc<Handle>>,
    backing: DashMap<u64, Weak<BackingId>>,
    /// Per inode: who uses it. Eviction takes the inode's entry, so it never races an open.
    users: DashMap<u64, Users>,
    /// Opens of one inode decide their io mode one at a time (see [`Handles::deciding`]);
    /// inodes share these locks by number.
    deciding: [parking_lot::Mutex<()>; DECIDING_LOCKS],
}

/// How many locks the opens of all inodes share: enough that opens of different files
/// rarely wait for each other with a few FUSE threads.
const DECIDING_LOCKS: usize = 32;

/// The users of one inode.
#[derive(Clone, Copy)]
struct Users {
    /// Opens (and truncations) in progress or not yet released.
    count: u32,
    /// Of those, handles served by the daemon (the kernel's cached io mode).
    cached: u32,
    /// The kernel's page cache of the file can only hold what is in the backing file:
    /// a daemon-served open made the kernel drop or keep it while no passthrough handle
    /// was open, and no passthrough handle opened for writing since. See
    /// [`Handles::insert`].
    cache_current: bool,
    last: Instant,
}

impl Default for Users {
    fn default() -> Self {
        Users {
            count: 0,
            cached: 0,
            cache_current: false,
            last: Instant::now(),
        }
    }
}

/// A handle just opened: its number, and whether the kernel may keep the file's cached pages.
pub struct Inserted {
    pub fh: u64,
    /// Reply `FOPEN_KEEP_CACHE`: the kernel's pages of the file are still what the backing
    /// file holds.
    pub keep_cache: bool,
}

impl Handles {
    /// Registers an open handle. A daemon-served open without `FOPEN_KEEP_CACHE` makes the
    /// kernel drop the file's cached pages, so a file read again through the daemon path
    /// would be read from the daemon every time. Every change to a file's bytes through a
    /// daemon-served handle, a truncation, a fallocate or a copy goes through this kernel,
    /// which keeps its cache in step; only passthrough writes go around it, to the backing
    /// file. So the cache is kept unless a passthrough handle was opened for writing since
    /// the kernel last dropped it, or one may still be open.
    pub fn insert(&self, handle: Handle) -> Inserted {
        let mut keep_cache = false;
        {
            let mut e = self.users.entry(handle.ino).or_default();
            if handle.backing.is_some() {
                if handle.writable {
                    e.cache_current = false;
                }
            } else {
                e.cached += 1;
                // A direct-I/O handle neither fills nor drops the cache. Nor may an open
                // made while a passthrough id is alive mark it current: the kernel refuses
                // such an open if the handle is still open there (one io mode per inode; it
                // happens if passthrough was turned off with handles left), and the handle
                // may write meanwhile.
                if !handle.direct_io {
                    let passthrough_open = self.passthrough_open(handle.ino);
                    keep_cache = e.cache_current && !passthrough_open;
                    e.cache_current = !passthrough_open;
                }
            }
        }
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.open.insert(fh, Arc::new(handle));
        Inserted { fh, keep_cache }
    }

    pub fn get(&self, fh: u64) -> Option<Arc<Handle>> {
        self.open.get(&fh).map(|h| Arc::clone(&h))
    }

    /// Removes and returns every handle still open. At the end of a session these are the
    /// handles whose RELEASE the kernel dropped: it discards queued requests at unmount.
    pub fn drain(&self) -> Vec<Arc<Handle>> {
        let fhs: Vec<u64> = self.open.iter().map(|e| *e.key()).collect();
        fhs.into_iter().filter_map(|fh| self.remove(fh)).collect()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        let handle = self.open.remove(&fh).map(|(_, h)| h);
        if let Some(h) = &handle {
            // Drop the map's weak entry once no handle keeps the id alive.
            self.backing.remove_if(&h.ino, |_, w| {
                w.strong_count() <= usize::from(h.backing.is_some())
            });
        }
        handle
    }

    /// Counts a user of `ino` (an open about to happen, or a truncation); pair with
    /// [`Handles::done_with`].
    pub fn using(&self, ino: u64) {
        let mut e = self.users.entry(ino).or_default();
        e.count += 1;
        e.last = Instant::now();
    }

    /// Ends a use of `ino`. For a released handle this must come after the RELEASE reply:
    /// only then has the kernel left the handle's io mode (see [`Handles::cached_users`]).
    pub fn done_with(&self, ino: u64, cached: bool) {
        if let Some(mut e) = self.users.get_mut(&ino) {
            e.count = e.count.saturating_sub(1);
            if cached {
                e.cached = e.cached.saturating_sub(1);
            }
            e.last = Instant::now();
        }
    }

    /// Handles of `ino` served by the daemon that the kernel may still hold. The kernel
    /// refuses (EIO) a passthrough open of an inode it has open in cached mode, and leaves
    /// that mode only when the RELEASE reply arrives, which another worker thread may not
    /// have sent yet: while this is non-zero, new opens of `ino` go through the daemon too.
    pub fn cached_users(&self, ino: u64) -> u32 {
        self.users.get(&ino).map_or(0, |e| e.cached)
    }

    /// Runs `f` if nothing uses `ino`, holding new users off meanwhile.
    pub fn while_unused(&self, ino: u64, f: &mut dyn FnMut()) -> bool {
        match self.users.entry(ino) {
            dashmap::Entry::Occupied(e) if e.get().count > 0 => false,
            entry => {
                f();
                drop(entry);
                true
            }
        }
    }

    pub fn in_use(&self, ino: u64) -> bool {
        self.users.get(&ino).is_some_and(|e| e.count > 0)
    }

    pub fn last_used(&self, ino: u64) -> Option<Instant> {
        self.users.get(&ino).map(|e| e.last)
    }

    /// Forgets an inode that no longer exists.
    pub fn forget(&self, ino: u64) {
        self.users.remove_if(&ino, |_, e| e.count == 0);
    }

    pub fn count(&self) -> usize {
        self.open.len()
    }

    /// Whether a passthrough handle of `ino` may still be open: its backing id is alive.
    pub fn passthrough_open(&self, ino: u64) -> bool {
        self.backing.get(&ino).is_some_and(|w| w.strong_count() > 0)
    }

    /// Held by an open from its first look at the inode's state (blobs off flash, handles
    /// open, set-id bits) until its handle is inserted. The kernel fails (EIO) an open whose
    /// io mode clashes with that of a handle it holds: passthrough beside a daemon-served
    /// handle in cached mode, or the other way round. Two opens of one file that looked at
    /// the same time could each see the other's mode missing and pick clashing ones (a
    /// reader and a writer of a set-id file opening it in a loop did, a few times in
    /// 100,000 opens).
    pub fn deciding(&self, ino: u64) -> parking_lot::MutexGuard<'_, ()> {
        self.deciding[(ino % DECIDING_LOCKS as u64) as usize].lock()
    }

    /// Returns the inode's live backing id, or registers one with `register`. The map shard
    /// stays locked meanwhile, so two opens of one inode cannot register two ids.
    pub fn backing_id(
        &self,
        ino: u64,
        register: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> std::io::Result<Arc<BackingId>> {
        let mut entry = self.backing.entry(ino).or_default();
        if let Some(id) = entry.upgrade() {
            return Ok(id);
        }
        let id = Arc::new(register()?);
        *entry = Arc::downgrade(&id);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::Recorded;
    use std::os::unix::fs::FileExt;

    fn recorded(file: &std::fs::File) -> Recorded {
        let md = file.metadata().expect("fstat");
        Recorded {
            size: md.len(),
            mtime: cfs_flash::FileTimes::of(&md).mtime,
        }
    }

    #[test]
    fn a_created_file_is_unchanged_until_written_or_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = std::fs::File::create_new(dir.path().join("f")).expect("create");
        let r = recorded(&file);
        assert!(r.unchanged(&file));
        // A write moves the mtime even when it does not move the size.
        file.write_all_at(b"x", 0).expect("write");
        assert!(!r.unchanged(&file));
        let r = recorded(&file);
        file.set_len(0).expect("truncate");
        assert!(!r.unchanged(&file));
    }

    #[test]
    fn another_mtime_at_the_same_size_is_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = std::fs::File::create_new(dir.path().join("f")).expect("create");
        let mut r = recorded(&file);
        assert!(r.unchanged(&file));
        r.mtime.1 = (r.mtime.1 + 1) % 1_000_000_000;
        assert!(!r.unchanged(&file));
    }
}
