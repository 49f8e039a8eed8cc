//! Dropping the kernel's cached pages behind a sequential reader of a cold file.
//!
//! A cold file opened read-only is direct I/O and cached by no one (see `ClaudeFs::open`);
//! this is for a cold handle that may also write, which the kernel caches.
//!
//! A file read from the object store goes through the daemon, so the kernel keeps every page
//! of it in its page cache until memory runs short. Streaming a cold file larger than memory
//! would then push out every other file's cached pages, and the cache would grow by the
//! whole file even when nobody reads it again (the kernel drops a file's cached pages at its
//! next open anyway: the daemon does not ask it to keep them). So, as a sequential reader
//! moves on, the daemon tells the kernel to drop the pages more than a blob behind it, a
//! whole blob at a time, the way a reader would with `POSIX_FADV_DONTNEED`: the cache holds
//! one to two blobs of the file, and the pages freed behind the reader are the ones the
//! kernel's readahead takes next.
//!
//! Taking fresh pages instead is slow where freed memory goes back to a hypervisor (free
//! page reporting): on such machines a cold read of 1 GiB ran at 270–400 MB/s while the
//! page cache grew, and at 700 MB/s when the reader dropped behind itself (`dd
//! iflag=nocache`).
//!
//! The pages are the file's, not the handle's: two readers of one cold file far apart each
//! fetch what they read, where the one behind could otherwise have found the first one's
//! pages still cached.
//!
//! The kernel takes the notification synchronously, locking each page it drops, so it is
//! sent from a thread of its own, never from the thread that must answer a read: a page
//! still locked for a read in flight would otherwise wait for its own reply.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

/// Requests waiting for the thread. An optimisation only: when the thread lags this far
/// behind, a request is refused, and the reader's next one asks for its range again.
const QUEUE: usize = 64;

/// Pages of `ino` in `start..end` (bytes) that the kernel may drop.
struct Range {
    ino: u64,
    start: u64,
    end: u64,
}

/// The sending side, kept by the mount's [`crate::Live`].
pub(crate) struct DropBehind {
    tx: SyncSender<Range>,
}

impl DropBehind {
    /// Starts the thread that sends the notifications through `notifier`; `None` (with a log
    /// line) if no thread can be started, and cold reads then leave the cache to the kernel.
    pub(crate) fn start(notifier: fuser::Notifier) -> Option<DropBehind> {
        let (tx, rx) = sync_channel(QUEUE);
        match std::thread::Builder::new()
            .name("cfs-dropbehind".into())
            .spawn(move || run(&notifier, &rx))
        {
            Ok(_) => Some(DropBehind { tx }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the drop-behind thread; cold reads keep every page cached");
                None
            }
        }
    }

    /// Asks for the cached pages of `ino` in `start..end` to be dropped, without waiting;
    /// false if the request was refused (the thread is that far behind, or gone).
    pub(crate) fn drop_range(&self, ino: u64, start: u64, end: u64) -> bool {
        if end <= start {
            return true;
        }
        match self.tx.try_send(Range { ino, start, end }) {
            Ok(()) => true,
            Err(TrySendError::Disconnected(_)) => false,
            Err(TrySendError::Full(_)) => {
                tracing::debug!(
                    ino,
                    start,
                    end,
                    "drop-behind queue full; pages left cached for now"
                );
                false
            }
        }
    }
}

/// Sends each range to the kernel until the mount's [`DropBehind`] goes away.
fn run(notifier: &fuser::Notifier, rx: &Receiver<Range>) {
    while let Ok(r) = rx.recv() {
        let (Ok(offset), Ok(len)) = (i64::try_from(r.start), i64::try_from(r.end - r.start)) else {
            continue;
        };
        // NotFound: the kernel has forgotten the inode, and its pages with it.
        if let Err(e) = notifier.inval_inode(fuser::INodeNo(r.ino), offset, len)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(ino = r.ino, error = %e, "cannot drop cached pages behind a reader");
        }
    }
}
