//! Flushing a backing file while the caller does something else: `fsync` makes the file's data
//! and the metadata commit that describes it durable side by side, so the caller waits for one
//! device flush, not two in a row.
//!
//! The data flush is an `IORING_OP_FSYNC` on a ring kept per FUSE worker thread: the kernel
//! runs it on its own worker pool, so no thread is spawned or woken by us per call. Where
//! io_uring cannot be set up (disabled by `kernel.io_uring_disabled`, or a seccomp policy), the
//! flush runs on a scoped thread instead, with the same result.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, types};

/// Entries in each thread's ring: it never holds more than one request.
const RING_ENTRIES: u32 = 2;

thread_local! {
    /// This thread's ring: `None` until first use, `Some(None)` once setting one up failed.
    static RING: RefCell<Option<Option<IoUring>>> = const { RefCell::new(None) };
}

/// Flushes `file` (`fdatasync` when `datasync`, else `fsync`) while running `beside`, and
/// returns both results once both are done.
pub(crate) fn sync_beside<T>(
    file: &File,
    datasync: bool,
    beside: impl FnOnce() -> T,
) -> (io::Result<()>, T) {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ring = slot.get_or_insert_with(|| match IoUring::new(RING_ENTRIES) {
            Ok(ring) => Some(ring),
            Err(e) => {
                tracing::info!("fsync: no io_uring ({e}); flushing data on a helper thread");
                None
            }
        });
        let Some(ring) = ring else {
            return on_thread(file, datasync, beside);
        };
        let (data, other, healthy) = on_ring(ring, file, datasync, beside);
        if !healthy {
            // A failed submit or wait leaves the ring in an unknown state: the next call on
            // this thread sets up a new one.
            *slot = None;
        }
        (data, other)
    })
}

/// `fdatasync` when `datasync`, else `fsync`.
pub(crate) fn flush(file: &File, datasync: bool) -> io::Result<()> {
    if datasync {
        file.sync_data()
    } else {
        file.sync_all()
    }
}

fn on_thread<T>(file: &File, datasync: bool, beside: impl FnOnce() -> T) -> (io::Result<()>, T) {
    std::thread::scope(|s| {
        let data = s.spawn(|| flush(file, datasync));
        let other = beside();
        let data = data
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the data flush panicked")));
        (data, other)
    })
}

/// The flush on `ring`; the `bool` is false when the ring failed and must not be reused.
fn on_ring<T>(
    ring: &mut IoUring,
    file: &File,
    datasync: bool,
    beside: impl FnOnce() -> T,
) -> (io::Result<()>, T, bool) {
    let flags = if datasync {
        types::FsyncFlags::DATASYNC
    } else {
        types::FsyncFlags::empty()
    };
    let sqe = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
        .flags(flags)
        .build();
    // SAFETY: an fsync SQE holds no buffer, only the fd of `file`, which is borrowed for this
    // whole call; `InFlight` reaps the completion before the call returns, unwinding included.
    if unsafe { ring.submission().push(&sqe) }.is_err() {
        // The ring is empty between calls, so this cannot happen; flush the plain way if it does.
        return (flush(file, datasync), beside(), false);
    }
    if let Err(e) = ring.submit() {
        tracing::warn!("fsync: io_uring submit failed ({e}); flushing the plain way");
        return (flush(file, datasync), beside(), false);
    }
    let mut in_flight = InFlight { ring: Some(ring) };
    let other = beside();
    match in_flight.wait() {
        Ok(res) => (res, other, true),
        Err(e) => {
            tracing::warn!("fsync: io_uring wait failed ({e}); flushing the plain way");
            (flush(file, datasync), other, false)
        }
    }
}

/// The submitted flush: waited for by [`InFlight::wait`], or on drop if `beside` panicked, so
/// that the kernel never works on an fd after its file is closed.
struct InFlight<'a> {
    ring: Option<&'a mut IoUring>,
}

impl InFlight<'_> {
    /// The flush's own result, or `Err` when the ring itself failed before it completed.
    fn wait(&mut self) -> io::Result<io::Result<()>> {
        let Some(ring) = self.ring.take() else {
            return Ok(Ok(()));
        };
        loop {
            if let Some(cqe) = ring.completion().next() {
                let res = cqe.result();
                return Ok(if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(())
                });
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let _ = self.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn flushes_a_file_and_runs_the_other_work() {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(b"data").expect("write");
        for datasync in [true, false] {
            let (data, other) = sync_beside(&f, datasync, || 42);
            data.expect("flush");
            assert_eq!(other, 42);
        }
    }

    /// fsync(2) of a pipe is EINVAL: the error of the flush reaches the caller, on the ring
    /// and on the fallback thread alike, and the ring is usable again afterwards.
    #[test]
    fn the_flush_error_reaches_the_caller() {
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let pipe = File::from(r);
        let errno = |res: io::Result<()>| res.err().and_then(|e| e.raw_os_error());
        let (data, other) = sync_beside(&pipe, false, || "beside");
        assert_eq!(errno(data), Some(libc::EINVAL));
        assert_eq!(other, "beside");
        assert_eq!(errno(on_thread(&pipe, true, || ()).0), Some(libc::EINVAL));
        assert_eq!(errno(sync_beside(&pipe, true, || ()).0), Some(libc::EINVAL));
    }
}
