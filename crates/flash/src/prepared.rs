//! Backing files made ahead of the creates that will use them, under inode numbers reserved
//! for them.
//!
//! Why: without them a create renames a spare to its new inode's name on the request path,
//! and that rename cost ext4 about 6.5 µs of the 18 µs a CREATE took in the daemon. Here a
//! background thread reserves a block of inode numbers from the metadata store, moves a spare
//! (or a new empty file) to each number's name and opens it; a create takes the next one,
//! name and open file together, and does no flash I/O at all.
//!
//! A prepared file has no inode yet, so whatever reads the flash directory sees a stray
//! backing file. That is safe: recovery removes strays only before the mount serves, and
//! preparing starts after it; the daemon gives unused ones back as spares when it unmounts
//! ([`Prepared::release`]); after a crash the next mount's recovery removes them as strays.
//! Reserved numbers that end up unused are never handed out again by this run, and the next
//! run starts after the highest number a create used, as ever.

use crate::spare::Spares;
use crate::{Ino, create_backing, remove_backing};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// Hands out `n` consecutive inode numbers nobody else gets, returning the first.
pub type Reserve = Box<dyn Fn(u64) -> Ino + Send + Sync>;

pub(crate) struct Prepared {
    /// Prepared files, oldest first, with their inode numbers.
    ready: parking_lot::Mutex<VecDeque<(Ino, File)>>,
    /// How many to keep ready; 0 before [`Prepared::start`] and after
    /// [`Prepared::release`].
    want: AtomicUsize,
    reserve: OnceLock<Reserve>,
    /// Held while files are being prepared, so that [`Prepared::release`] returns only
    /// once no file is half made (one made after it began is given back by its maker).
    busy: parking_lot::Mutex<()>,
    /// Wakes the preparing thread; dropped with the last `Prepared`, which ends the thread.
    wake: OnceLock<SyncSender<()>>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("ready", &self.ready.lock().len())
            .field("want", &self.want)
            .finish()
    }
}

/// Where the preparing thread makes its files: the shard path of an inode, and the spares
/// it takes them from.
pub(crate) struct Maker {
    pub(crate) root: PathBuf,
    pub(crate) spares: Arc<Spares>,
}

impl Maker {
    fn path(&self, ino: Ino) -> PathBuf {
        crate::shard_path(&self.root, ino)
    }
}

/// After a failed top-up the thread rests this long, so a full flash filesystem does not
/// fail (and log) at every create; creates meanwhile make their own backing files.
const REST_AFTER_ERROR: Duration = Duration::from_secs(10);

impl Prepared {
    pub(crate) fn new() -> Prepared {
        Prepared {
            ready: parking_lot::Mutex::new(VecDeque::new()),
            want: AtomicUsize::new(0),
            reserve: OnceLock::new(),
            busy: parking_lot::Mutex::new(()),
            wake: OnceLock::new(),
        }
    }

    /// Keeps about `count` files ready from now on, under numbers from `reserve`. Only the
    /// first call takes effect.
    pub(crate) fn start(self: &Arc<Self>, count: usize, reserve: Reserve, maker: Maker) {
        if count == 0 || self.reserve.set(reserve).is_err() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("cfs-prepare".into())
            .spawn(move || run(&weak, &rx, &maker));
        if let Err(e) = spawned {
            tracing::warn!("cannot start preparing backing files: {e}; creates make their own");
            return;
        }
        let _ = self.wake.set(tx);
        self.want.store(count, Ordering::Relaxed);
        self.poke();
    }

    /// The next prepared file and its inode number, or `None` when none is ready.
    pub(crate) fn take(&self) -> Option<(Ino, File)> {
        let want = self.want.load(Ordering::Relaxed);
        if want == 0 {
            return None;
        }
        let (got, left) = {
            let mut ready = self.ready.lock();
            (ready.pop_front(), ready.len())
        };
        if left <= want / 4 {
            self.poke();
        }
        got
    }

    pub(crate) fn len(&self) -> usize {
        self.ready.lock().len()
    }

    /// Stops preparing and gives every unused prepared file back as a spare (or unlinks
    /// it). Returns how many there were.
    pub(crate) fn release(&self, maker: &Maker) -> io::Result<usize> {
        self.want.store(0, Ordering::Relaxed);
        drop(self.busy.lock());
        let unused: Vec<_> = self.ready.lock().drain(..).collect();
        let n = unused.len();
        for (ino, file) in unused {
            drop(file);
            remove_backing(&maker.spares, &maker.path(ino))?;
        }
        Ok(n)
    }

    fn poke(&self) {
        if let Some(tx) = self.wake.get() {
            // Full: a wake-up is already pending.
            let _ = tx.try_send(());
        }
    }

    /// Prepares files until `want` are ready. A file made after [`Prepared::release`]
    /// began is given back at once.
    fn top_up(&self, maker: &Maker) -> io::Result<usize> {
        let Some(reserve) = self.reserve.get() else {
            return Ok(0);
        };
        let _busy = self.busy.lock();
        let have = self.ready.lock().len();
        let want = self.want.load(Ordering::Relaxed);
        if have >= want {
            return Ok(0);
        }
        let n = (want - have) as u64;
        let first = reserve(n);
        let mut made = 0;
        for ino in first..first + n {
            let path = maker.path(ino);
            let file = create_backing(&maker.spares, &path)?;
            let mut ready = self.ready.lock();
            if self.want.load(Ordering::Relaxed) == 0 {
                drop(ready);
                drop(file);
                remove_backing(&maker.spares, &path)?;
                return Ok(made);
            }
            ready.push_back((ino, file));
            made += 1;
        }
        Ok(made)
    }
}

/// The preparing thread: tops the files up at each wake-up, and ends once the last
/// `Prepared` is dropped.
fn run(prepared: &Weak<Prepared>, wake: &Receiver<()>, maker: &Maker) {
    while wake.recv().is_ok() {
        let Some(strong) = prepared.upgrade() else {
            return;
        };
        let made = strong.top_up(maker);
        drop(strong);
        match made {
            Ok(made) => tracing::trace!("{made} backing files prepared for creates"),
            Err(e) => {
                tracing::warn!(
                    "preparing backing files: {e}; creates make their own, retrying in {} s",
                    REST_AFTER_ERROR.as_secs()
                );
                std::thread::sleep(REST_AFTER_ERROR);
            }
        }
    }
}
