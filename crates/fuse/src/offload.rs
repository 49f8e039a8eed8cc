//! Threads that answer the requests that may block for long: an `fsync` (a flash flush), a
//! read or write of a cold file (waits for the object store), a create or open while flash
//! is full (waits for eviction).
//!
//! The FUSE threads hand such a request here and go back to the kernel's queue at once, so
//! a slow request never holds one of them. That lets the mount run few FUSE threads: on a
//! small machine a caller's next request then wakes a thread that ran a moment ago (unlinks
//! went up to twice as fast with 2 threads as with 8, creates and small reads 10–30%; see
//! docs/operations.md). Without this pool, as many fsyncs or cold reads in flight as there
//! are FUSE threads stall every other request behind them.
//!
//! Workers are started when a job finds none idle, up to [`MAX_WORKERS`], and leave after
//! [`IDLE_EXIT`] without work, so a mount that never fsyncs keeps no thread for it.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

/// Jobs in flight at once, at most. More wait in the queue: each holds a caller (or one of
/// the kernel's background requests, which it bounds), so the queue stays short, and a
/// hundred threads blocked on one object store would not make it answer faster.
const MAX_WORKERS: usize = 64;

/// How long an idle worker waits for a job before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce() + Send>;

/// The pool. Dropping it lets the queued jobs finish, without waiting for them; see
/// [`Offload::finish`] for that.
pub(crate) struct Offload {
    tx: Mutex<Option<Sender<Job>>>,
    shared: Arc<Shared>,
}

struct Shared {
    rx: Mutex<Receiver<Job>>,
    /// Jobs sent and not yet taken by a worker.
    queued: AtomicUsize,
    /// Workers waiting for a job (or for the receiver's lock, to wait for one).
    idle: AtomicUsize,
    /// Workers alive.
    workers: AtomicUsize,
    /// Join handles of the workers started, for `finish`.
    handles: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Offload {
    pub(crate) fn new() -> Offload {
        let (tx, rx) = channel();
        Offload {
            tx: Mutex::new(Some(tx)),
            shared: Arc::new(Shared {
                rx: Mutex::new(rx),
                queued: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                workers: AtomicUsize::new(0),
                handles: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Runs `job` on a worker. If the pool is finished, or no worker can be started, runs
    /// it on the calling thread: slower for the other requests, but the job is done.
    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        let sent = {
            let tx = self.tx.lock();
            match tx.as_ref() {
                Some(tx) => {
                    self.shared.queued.fetch_add(1, Ordering::SeqCst);
                    tx.send(job).map_err(|e| {
                        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                        e.0
                    })
                }
                None => Err(job),
            }
        };
        let job = match sent {
            Ok(()) => {
                if self.shared.queued.load(Ordering::SeqCst)
                    > self.shared.idle.load(Ordering::SeqCst)
                {
                    self.start_worker();
                }
                return;
            }
            Err(job) => job,
        };
        job();
    }

    /// Starts one more worker if there are fewer than [`MAX_WORKERS`]. A failed start is
    /// logged and left: the queued job waits for a worker that is running.
    fn start_worker(&self) {
        let shared = &self.shared;
        let n = shared.workers.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_WORKERS {
            shared.workers.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let for_worker = Arc::clone(shared);
        match std::thread::Builder::new()
            .name("cfs-slow".into())
            .spawn(move || work(&for_worker))
        {
            Ok(handle) => {
                let mut handles = shared.handles.lock();
                handles.retain(|h| !h.is_finished());
                handles.push(handle);
            }
            Err(e) => {
                shared.workers.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(error = %e, "cannot start a thread for slow requests");
                if n == 0 {
                    // No worker at all would leave the job queued for good: take it back
                    // and run it here.
                    self.drain_here();
                }
            }
        }
    }

    /// Runs the queued jobs on the calling thread.
    fn drain_here(&self) {
        loop {
            let job = self.shared.rx.lock().try_recv();
            match job {
                Ok(job) => {
                    self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                    job();
                }
                Err(_) => return,
            }
        }
    }

    /// Stops taking jobs (later ones run on the caller) and waits for the queued and
    /// running ones to finish, so that what they did is there for the unmount's last sync.
    pub(crate) fn finish(&self) {
        self.tx.lock().take();
        let handles = std::mem::take(&mut *self.shared.handles.lock());
        for h in handles {
            let _ = h.join();
        }
    }

    /// Workers alive now.
    #[cfg(test)]
    fn workers(&self) -> usize {
        self.shared.workers.load(Ordering::SeqCst)
    }
}

/// A worker's loop: take jobs until none came for [`IDLE_EXIT`] or the pool is finished.
fn work(shared: &Shared) {
    loop {
        shared.idle.fetch_add(1, Ordering::SeqCst);
        let next = shared.rx.lock().recv_timeout(IDLE_EXIT);
        shared.idle.fetch_sub(1, Ordering::SeqCst);
        match next {
            Ok(job) => {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                job();
            }
            // A job sent just as the wait ran out may have seen this worker as idle and
            // started no other: it is served before leaving.
            Err(RecvTimeoutError::Timeout) if shared.queued.load(Ordering::SeqCst) > 0 => {}
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    shared.workers.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn jobs_that_block_run_side_by_side() {
        let pool = Offload::new();
        // Four jobs that each wait for all four: they finish only if each got its own worker.
        let barrier = Arc::new(Barrier::new(5));
        for _ in 0..4 {
            let b = Arc::clone(&barrier);
            pool.run(move || {
                b.wait();
            });
        }
        barrier.wait();
        pool.finish();
        assert!(pool.workers() == 0, "finish waits for every worker");
    }

    #[test]
    fn finish_waits_for_queued_jobs_and_later_jobs_run_on_the_caller() {
        let pool = Offload::new();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let d = Arc::clone(&done);
            pool.run(move || {
                std::thread::sleep(Duration::from_micros(100));
                d.fetch_add(1, Ordering::SeqCst);
            });
        }
        pool.finish();
        assert_eq!(done.load(Ordering::SeqCst), 100);
        let caller = std::thread::current().id();
        let ran_on = Arc::new(Mutex::new(None));
        let r = Arc::clone(&ran_on);
        pool.run(move || *r.lock() = Some(std::thread::current().id()));
        assert_eq!(*ran_on.lock(), Some(caller));
    }

    #[test]
    fn workers_are_capped() {
        let pool = Offload::new();
        let gate = Arc::new((Mutex::new(false), parking_lot::Condvar::new()));
        for _ in 0..MAX_WORKERS + 10 {
            let g = Arc::clone(&gate);
            pool.run(move || {
                let mut open = g.0.lock();
                while !*open {
                    g.1.wait(&mut open);
                }
            });
        }
        assert!(pool.workers() <= MAX_WORKERS, "{} workers", pool.workers());
        *gate.0.lock() = true;
        gate.1.notify_all();
        pool.finish();
    }
}
