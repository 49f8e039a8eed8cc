//! Deleting inodes the kernel has forgotten, off the request path and many to a commit.
//!
//! A file's last unlink leaves its inode orphaned until the kernel forgets it (open files
//! keep using it). Purging it then took a metadata commit and a backing-file removal on the
//! FUSE thread that got the FORGET, and on two cores that thread competed with the next
//! request: `rm` of many files spent a third of its time there. Nobody waits for a purge, so
//! a background thread takes every forgotten inode queued so far and purges them in one
//! transaction. If the daemon dies first, the orphans are still recorded and the next mount
//! purges them (`recover`).
//!
//! A purged file's backing file goes only once the purge is durable in the store (the
//! periodic commit makes it so within about a second). Removed at once, a crash before that
//! commit left the store holding the file, linked again (its unlink was not durable either),
//! with its bytes gone: a deleted file back from the dead, empty.

use cfs_flash::FlashDir;
use cfs_meta::{FileKind, MetaStore, Op, Outcome};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

/// Most purges in one transaction, so that one commit stays short.
const BATCH_MAX: usize = 256;

/// How long the thread lets forgotten inodes gather after the first one before it purges
/// them. Purging each FORGET as it came woke the thread once per file and took the store's
/// lock as often, which on two cores made `rm` of many files wait for it: a futex wake and
/// a contended lock are each a vCPU wake-up on a virtual machine. Nobody waits for a purge.
const GATHER: std::time::Duration = std::time::Duration::from_millis(5);

/// How often the thread looks whether purges it made became durable (or creates want their
/// files), while some did not.
const DURABLE_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// Past this many backing files waiting while creates are taking spares, the thread makes
/// the purges durable itself rather than wait for the periodic commit: emptied, those files
/// are the spares the creates rename into place. `cfs bench` creates a tree right after
/// deleting 5,000 files: waiting for the periodic commit, it ran at 8,950-11,390/s against
/// 13,290-13,790/s with the old immediate removal; with this, at 11,260-15,420/s against
/// 13,600-17,120/s in the same run. Not while only deletes run: each such commit holds every
/// metadata operation off while it flushes, and deleting a tree while syncing every 256
/// purges ran at 15,240-22,580/s against 25,900-28,160/s.
const SYNC_AT: usize = 256;

#[derive(Default)]
struct Queue {
    inos: Vec<u64>,
    stopping: bool,
}

/// Backing files of purged files, each with the log number its purge must be durable to.
struct Doomed {
    files: Vec<(u64, u64)>,
    /// Deletions still to reach flash ([`Purger::new`]'s `pending`): drops as they go.
    pending: Arc<AtomicU64>,
}

impl Doomed {
    fn new(pending: &Arc<AtomicU64>) -> Doomed {
        Doomed {
            files: Vec::new(),
            pending: Arc::clone(pending),
        }
    }

    /// Removes the backing files whose purge is durable, first making the purges durable if
    /// enough wait while creates have taken spares since the last call (`taken`).
    fn settle(&mut self, meta: &MetaStore, flash: &FlashDir, taken: &mut u64) {
        let now = flash.spares_taken();
        if now != *taken
            && self.files.len() >= SYNC_AT
            && let Err(e) = meta.sync()
        {
            tracing::warn!(error = %e, "sync after purges failed; the periodic commit will do");
        }
        *taken = now;
        self.remove_durable(meta, flash);
    }

    /// Makes every purge durable, then removes all the backing files: for when nothing
    /// else will come to do it.
    fn sync_and_remove(&mut self, meta: &MetaStore, flash: &FlashDir) {
        if self.files.is_empty() {
            return;
        }
        match meta.sync() {
            Ok(()) => self.remove_durable(meta, flash),
            Err(e) => tracing::error!(
                error = %e,
                "sync before removing purged files' backing files failed; the next mount purges them"
            ),
        }
    }

    /// Removes the backing files whose purge is durable.
    fn remove_durable(&mut self, meta: &MetaStore, flash: &FlashDir) {
        let durable = meta.log_durable_seq();
        let before = self.files.len();
        self.files.retain(|&(ino, seq)| {
            if seq > durable {
                return true;
            }
            if let Err(e) = flash.remove(ino) {
                tracing::warn!(ino, error = %e, "could not remove backing file of purged inode");
            }
            false
        });
        self.pending
            .fetch_sub((before - self.files.len()) as u64, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

pub(crate) struct Purger {
    shared: Arc<Shared>,
    meta: Arc<MetaStore>,
    flash: FlashDir,
    /// Deleted files whose backing files are still on flash: queued here, or purged and
    /// waiting for the purge to be durable. What `cfs status` shows, so that a benchmark
    /// can let the flash filesystem free their space before it measures the next step, as
    /// a native `unlink` does before it returns.
    pending: Arc<AtomicU64>,
    /// Started at the first purge, so a filesystem object that never purges has no thread.
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Purger {
    pub(crate) fn new(meta: Arc<MetaStore>, flash: FlashDir, pending: Arc<AtomicU64>) -> Purger {
        Purger {
            shared: Arc::default(),
            meta,
            flash,
            pending,
            thread: Mutex::new(None),
        }
    }

    /// Queues `ino` for purging. Falls back to purging it here if no thread can be started.
    pub(crate) fn purge(&self, ino: u64) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        if !self.running() {
            let mut doomed = Doomed::new(&self.pending);
            purge_batch(&self.meta, &[ino], &mut doomed);
            doomed.sync_and_remove(&self.meta, &self.flash);
            return;
        }
        let was_empty = {
            let mut q = self.shared.queue.lock();
            q.inos.push(ino);
            q.inos.len() == 1
        };
        // The thread waits on an empty queue only; while anything is queued it is purging
        // or gathering, and looks again without being told.
        if was_empty {
            self.shared.wake.notify_one();
        }
    }

    fn running(&self) -> bool {
        let mut thread = self.thread.lock();
        if thread.is_some() {
            return true;
        }
        let (shared, meta, flash) = (
            Arc::clone(&self.shared),
            Arc::clone(&self.meta),
            self.flash.clone(),
        );
        let doomed = Doomed::new(&self.pending);
        match std::thread::Builder::new()
            .name("cfs-purge".into())
            .spawn(move || run(&shared, &meta, &flash, doomed))
        {
            Ok(handle) => {
                *thread = Some(handle);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the purge thread; purging inline");
                false
            }
        }
    }

    /// Purges everything queued and stops the thread: at unmount, before the final sync.
    pub(crate) fn finish(&self) {
        let Some(handle) = self.thread.lock().take() else {
            return;
        };
        self.shared.queue.lock().stopping = true;
        self.shared.wake.notify_one();
        if handle.join().is_err() {
            tracing::error!("the purge thread panicked; the next mount purges what it left");
        }
    }
}

impl Drop for Purger {
    fn drop(&mut self) {
        self.finish();
    }
}

fn run(shared: &Shared, meta: &MetaStore, flash: &FlashDir, mut doomed: Doomed) {
    let mut taken = flash.spares_taken();
    loop {
        let batch = {
            let mut q = shared.queue.lock();
            while q.inos.is_empty() && !q.stopping {
                if doomed.files.is_empty() {
                    shared.wake.wait(&mut q);
                } else {
                    shared.wake.wait_for(&mut q, DURABLE_CHECK);
                    drop(q);
                    doomed.settle(meta, flash, &mut taken);
                    q = shared.queue.lock();
                }
            }
            if q.inos.is_empty() {
                break;
            }
            if !q.stopping && q.inos.len() < BATCH_MAX {
                // Woken early only by `finish`.
                shared.wake.wait_for(&mut q, GATHER);
            }
            let n = q.inos.len().min(BATCH_MAX);
            q.inos.drain(..n).collect::<Vec<_>>()
        };
        purge_batch(meta, &batch, &mut doomed);
        doomed.settle(meta, flash, &mut taken);
    }
    // Stopping: the unmount's final sync would come next; made here, it lets the last
    // backing files go.
    doomed.sync_and_remove(meta, flash);
}

/// Purges `inos` in one transaction, or one by one if that fails (so that one bad inode
/// holds up no other), and hands the backing files of the regular files among them to
/// `doomed`, to go once the purges are durable; the others leave its pending count.
fn purge_batch(meta: &MetaStore, inos: &[u64], doomed: &mut Doomed) {
    let ops: Vec<Op> = inos.iter().map(|&ino| Op::Purge { ino }).collect();
    let outcomes: Vec<(u64, Result<Outcome, cfs_meta::MetaError>)> = match meta.execute_batch(&ops)
    {
        Ok(outcomes) => inos
            .iter()
            .copied()
            .zip(outcomes.into_iter().map(Ok))
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, n = inos.len(), "batched purge failed; one by one");
            inos.iter()
                .zip(&ops)
                .map(|(&ino, op)| (ino, meta.execute(op)))
                .collect()
        }
    };
    // Past every purge just applied.
    let seq = meta.log_applied_seq();
    let mut done = 0;
    for (ino, outcome) in outcomes {
        match outcome {
            Ok(Outcome::Purged(Some(inode))) if inode.kind == FileKind::File => {
                doomed.files.push((ino, seq));
            }
            Ok(_) => done += 1,
            // Done with here too: recovery retries it, not this run.
            Err(e) => {
                done += 1;
                tracing::warn!(ino, error = %e, "purge failed; recovery will retry");
            }
        }
    }
    doomed.pending.fetch_sub(done, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfs_meta::{Caller, Timestamp};

    /// A deletion counts as pending from its FORGET until its backing file has left the
    /// shards, so that whoever waits for the count to reach 0 (`scripts/bench`) finds the
    /// space freed; a directory's purge, with no backing file, counts until it is applied.
    #[test]
    fn deletions_are_pending_until_their_backing_files_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (meta, _) =
            MetaStore::open(&dir.path().join("meta.redb"), Timestamp::now(), 0, 0).expect("meta");
        let meta = Arc::new(meta);
        let flash = FlashDir::open(&dir.path().join("flash")).expect("flash");
        let orphan = |name: &str, kind: FileKind| {
            let ino = meta.alloc_ino();
            if kind == FileKind::File {
                let f = flash.create(ino).expect("backing file");
                std::io::Write::write_all(&mut &f, b"data").expect("write");
            }
            let caller = Caller {
                uid: 0,
                gid: 0,
                groups: Vec::new(),
            };
            let (parent, name, now) = (1, name.as_bytes().to_vec(), Timestamp::now());
            let create = Op::Create {
                parent,
                name: name.clone(),
                ino,
                kind,
                perm: 0o755,
                umask: 0,
                rdev: 0,
                target: Vec::new(),
                caller,
                now,
            };
            meta.execute(&create).expect("create");
            let remove = match kind {
                FileKind::Dir => Op::Rmdir { parent, name, now },
                _ => Op::Unlink { parent, name, now },
            };
            meta.execute(&remove).expect("remove");
            ino
        };
        let (file, subdir) = (orphan("f", FileKind::File), orphan("d", FileKind::Dir));
        let pending = Arc::new(AtomicU64::new(0));
        let purger = Purger::new(Arc::clone(&meta), flash.clone(), Arc::clone(&pending));
        purger.purge(file);
        purger.purge(subdir);
        let wait_for = |want: u64| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                // The count first: a backing file seen after a count of 0 must be gone.
                let n = pending.load(Ordering::Relaxed);
                let present = flash.metadata(file).is_ok();
                assert!(n <= 2, "never more than were deleted: {n}");
                if n == want {
                    return present;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{n} deletions pending"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        // The directory's purge is done once applied; the file's backing file stays until
        // its purge is durable, which the mount's periodic commit makes it.
        assert!(wait_for(1), "the backing file waits for a durable purge");
        std::thread::sleep(DURABLE_CHECK * 4);
        assert_eq!(pending.load(Ordering::Relaxed), 1);
        meta.sync().expect("sync");
        assert!(
            !wait_for(0),
            "nothing pending while the backing file is still there"
        );
        purger.finish();
        assert_eq!(pending.load(Ordering::Relaxed), 0);
    }
}
