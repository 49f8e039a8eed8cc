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

use crate::refill::Refill;
use crate::spare::Spares;
use crate::{Ino, create_backing, remove_backing};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

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
    /// The flash directory the files are made in, and the spares they are taken from.
    root: PathBuf,
    spares: Arc<Spares>,
    refill: Refill,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("ready", &self.ready.lock().len())
            .field("want", &self.want)
            .finish()
    }
}

impl Prepared {
    pub(crate) fn new(root: PathBuf, spares: Arc<Spares>) -> Prepared {
        Prepared {
            ready: parking_lot::Mutex::new(VecDeque::new()),
            want: AtomicUsize::new(0),
            reserve: OnceLock::new(),
            busy: parking_lot::Mutex::new(()),
            root,
            spares,
            refill: Refill::new("cfs-prepare"),
        }
    }

    /// Keeps about `count` files ready from now on, under numbers from `reserve`. Only the
    /// first call takes effect.
    pub(crate) fn start(self: &Arc<Self>, count: usize, reserve: Reserve) {
        if count == 0 || self.reserve.set(reserve).is_err() {
            return;
        }
        self.want.store(count, Ordering::Relaxed);
        self.refill.poke(self, Prepared::top_up);
    }

    /// The next prepared file and its inode number, or `None` when none is ready.
    pub(crate) fn take(self: &Arc<Self>) -> Option<(Ino, File)> {
        let want = self.want.load(Ordering::Relaxed);
        if want == 0 {
            return None;
        }
        let (got, left) = {
            let mut ready = self.ready.lock();
            (ready.pop_front(), ready.len())
        };
        if left <= want / 4 {
            self.refill.poke(self, Prepared::top_up);
        }
        got
    }

    pub(crate) fn len(&self) -> usize {
        self.ready.lock().len()
    }

    /// Stops preparing and gives every unused prepared file back as a spare (or unlinks
    /// it). Returns how many there were.
    pub(crate) fn release(&self) -> io::Result<usize> {
        self.want.store(0, Ordering::Relaxed);
        drop(self.busy.lock());
        let unused: Vec<_> = self.ready.lock().drain(..).collect();
        let n = unused.len();
        for (ino, file) in unused {
            drop(file);
            remove_backing(&self.spares, &crate::shard_path(&self.root, ino))?;
        }
        Ok(n)
    }

    /// Prepares files until `want` are ready. A file made after [`Prepared::release`]
    /// began is given back at once.
    fn top_up(&self) -> io::Result<usize> {
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
            let path = crate::shard_path(&self.root, ino);
            let file = create_backing(&self.spares, &path)?;
            let mut ready = self.ready.lock();
            if self.want.load(Ordering::Relaxed) == 0 {
                drop(ready);
                drop(file);
                remove_backing(&self.spares, &path)?;
                return Ok(made);
            }
            ready.push_back((ino, file));
            made += 1;
        }
        Ok(made)
    }
}
