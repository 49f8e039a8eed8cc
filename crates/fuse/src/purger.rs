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
#[derive(Default)]
struct Doomed(Vec<(u64, u64)>);

impl Doomed {
    /// Removes the backing files whose purge is durable, first making the purges durable if
    /// enough wait while creates have taken spares since the last call (`taken`).
    fn settle(&mut self, meta: &MetaStore, flash: &FlashDir, taken: &mut u64) {
        let now = flash.spares_taken();
        if now != *taken
            && self.0.len() >= SYNC_AT
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
        if self.0.is_empty() {
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
        self.0.retain(|&(ino, seq)| {
            if seq > durable {
                return true;
            }
            if let Err(e) = flash.remove(ino) {
                tracing::warn!(ino, error = %e, "could not remove backing file of purged inode");
            }
            false
        });
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
    /// Started at the first purge, so a filesystem object that never purges has no thread.
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Purger {
    pub(crate) fn new(meta: Arc<MetaStore>, flash: FlashDir) -> Purger {
        Purger {
            shared: Arc::default(),
            meta,
            flash,
            thread: Mutex::new(None),
        }
    }

    /// Queues `ino` for purging. Falls back to purging it here if no thread can be started.
    pub(crate) fn purge(&self, ino: u64) {
        if !self.running() {
            let mut doomed = Doomed::default();
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
        match std::thread::Builder::new()
            .name("cfs-purge".into())
            .spawn(move || run(&shared, &meta, &flash))
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

fn run(shared: &Shared, meta: &MetaStore, flash: &FlashDir) {
    let mut doomed = Doomed::default();
    let mut taken = flash.spares_taken();
    loop {
        let batch = {
            let mut q = shared.queue.lock();
            while q.inos.is_empty() && !q.stopping {
                if doomed.0.is_empty() {
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
/// `doomed`, to go once the purges are durable.
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
    for (ino, outcome) in outcomes {
        match outcome {
            Ok(Outcome::Purged(Some(inode))) if inode.kind == FileKind::File => {
                doomed.0.push((ino, seq));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(ino, error = %e, "purge failed; recovery will retry"),
        }
    }
}
