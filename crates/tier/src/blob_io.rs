//! Large-blob file I/O: the uploader's 64 MiB reads off flash and the hydrator's 64 MiB
//! writes back onto it.
//!
//! Two backends give identical results:
//!
//! - [`BlobIo::Portable`]: `pread`/`pwrite` + `fdatasync` on tokio's blocking pool, one
//!   syscall stream per blob. Works on every kernel.
//! - [`BlobIo::Uring`]: one dedicated thread owns an io_uring. Callers hand it requests over a
//!   channel (and poke an eventfd the ring is polling, so a new request never waits for an
//!   unrelated completion); the thread splits each blob into chunks, keeps up to a fixed
//!   number of chunks in flight across all requests (round-robin, so a small hydration is
//!   not stuck behind a 64 MiB upload read), and answers each request through a tokio
//!   oneshot once its last chunk (and, for writes, its `fdatasync`) completed. The hope
//!   was that several chunks in flight keep the device busier than one `pread` per blob
//!   and save the blocking pool's threads; the files are buffered, though, so the kernel
//!   still copies every byte through the page cache, and by default the SQEs go to its io-wq
//!   workers ([`UringOptions::io_wq`]), which do what the blocking pool does.
//!
//! `docs/architecture.md` ("Blob I/O") has the measured numbers of both and the command that
//! reproduces them (`cargo bench -p cfs-tier --bench blob_io`); [`BlobIo::auto`] picks the
//! faster one there ([`URING_BY_DEFAULT`]).

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock, mpsc};

/// Whether auto picks io_uring where the kernel has it. It does not: on the machine measured
/// (docs/architecture.md, "Blob I/O") io_uring was no faster than pread/pwrite on the blocking
/// pool for these buffered 64 MiB transfers, and slower for cold reads, so the simpler path
/// stays the default and io_uring is there to opt into (`CFS_BLOB_IO=uring`) and re-measure.
pub const URING_BY_DEFAULT: bool = false;

/// How the io_uring backend splits and issues work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringOptions {
    /// Bytes per read or write SQE. Large enough that per-SQE overhead is noise, small
    /// enough that one blob is several requests the device can serve in parallel.
    pub chunk: usize,
    /// Chunks in flight at once over all requests.
    pub depth: usize,
    /// Issue every SQE with IOSQE_ASYNC, so that the kernel's io-wq workers do the
    /// (blocking, copying) page-cache work in parallel, instead of the ring thread doing
    /// all the copies in task_work as pages arrive.
    pub io_wq: bool,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            chunk: 4 << 20,
            depth: 16,
            io_wq: true,
        }
    }
}

/// Which backend `cfs mount --blob-io` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlobIoChoice {
    /// The default: portable unless [`URING_BY_DEFAULT`] (then io_uring where the kernel has
    /// it).
    #[default]
    Auto,
    /// io_uring, or an error if the kernel does not have it.
    Uring,
    Portable,
}

impl std::str::FromStr for BlobIoChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BlobIoChoice::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(BlobIoChoice::Uring),
            "portable" => Ok(BlobIoChoice::Portable),
            _ => Err(format!(
                "unknown blob I/O backend {s:?}: auto, uring or portable"
            )),
        }
    }
}

/// How blob-sized file I/O is done; cheap to clone (all clones share one ring thread).
#[derive(Clone, Debug)]
pub enum BlobIo {
    Portable,
    Uring(Uring),
}

impl BlobIo {
    /// io_uring if a ring with the needed operations can be set up here, else portable;
    /// logs which, and why. Each call that picks io_uring starts its own ring thread.
    pub fn detect() -> BlobIo {
        match Uring::new(UringOptions::default()) {
            Ok(u) => {
                tracing::info!("blob I/O: io_uring");
                BlobIo::Uring(u)
            }
            Err(e) => {
                tracing::info!(reason = %e, "blob I/O: portable (pread/pwrite), io_uring is not available");
                BlobIo::Portable
            }
        }
    }

    /// The process-wide default, chosen once and then shared (one ring thread per process):
    /// `CFS_BLOB_IO=auto|uring|portable` if set, else auto, which is portable unless
    /// [`URING_BY_DEFAULT`]. An asked-for io_uring the kernel lacks falls back to portable.
    pub fn auto() -> BlobIo {
        static AUTO: OnceLock<BlobIo> = OnceLock::new();
        AUTO.get_or_init(|| {
            let choice = match std::env::var("CFS_BLOB_IO") {
                Ok(v) => v.parse().unwrap_or_else(|e: String| {
                    tracing::warn!(error = %e, "ignoring CFS_BLOB_IO");
                    BlobIoChoice::Auto
                }),
                Err(_) => BlobIoChoice::Auto,
            };
            match choice {
                BlobIoChoice::Uring => BlobIo::detect(),
                BlobIoChoice::Auto if URING_BY_DEFAULT => BlobIo::detect(),
                BlobIoChoice::Auto | BlobIoChoice::Portable => {
                    tracing::info!("blob I/O: portable (pread/pwrite)");
                    BlobIo::Portable
                }
            }
        })
        .clone()
    }

    /// The backend `choice` names; only an explicit `Uring` fails without io_uring.
    pub fn choose(choice: BlobIoChoice) -> io::Result<BlobIo> {
        match choice {
            BlobIoChoice::Auto => Ok(BlobIo::auto()),
            BlobIoChoice::Portable => Ok(BlobIo::Portable),
            BlobIoChoice::Uring => Ok(BlobIo::Uring(Uring::new(UringOptions::default())?)),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            BlobIo::Portable => "portable",
            BlobIo::Uring(_) => "io_uring",
        }
    }

    /// Reads `len` bytes at `offset`; fewer only if the file ends first.
    pub async fn read_at(&self, file: Arc<File>, offset: u64, len: usize) -> io::Result<Bytes> {
        match self {
            BlobIo::Portable => {
                blocking(move || {
                    // A whole blob at an aligned offset into an aligned buffer is read past
                    // the page cache, so the CPU copies nothing (the kernel first writes
                    // back any dirty pages of the range, so the bytes are the same).
                    if len == crate::BLOB_SIZE as usize
                        && offset.is_multiple_of(crate::pooled::DIRECT_ALIGN as u64)
                        && let Some(direct) = reopen_direct(&file)
                        && let Ok(bytes) = crate::pooled::read_into_pooled(len, |buf| {
                            read_full(&direct, buf, offset)
                        })
                    {
                        return Ok(bytes);
                    }
                    if len <= crate::BLOB_SIZE as usize {
                        return crate::pooled::read_into_pooled(len, |buf| {
                            read_full(&file, buf, offset)
                        });
                    }
                    let mut buf = vec![0u8; len];
                    let filled = read_full(&file, &mut buf, offset)?;
                    buf.truncate(filled);
                    Ok(Bytes::from(buf))
                })
                .await
            }
            BlobIo::Uring(u) => u.read_at(file, offset, len).await,
        }
    }

    /// Writes all of `data` at `offset` and makes it durable (`fdatasync`).
    pub async fn write_at_sync(&self, file: Arc<File>, offset: u64, data: Bytes) -> io::Result<()> {
        match self {
            BlobIo::Portable => {
                blocking(move || {
                    file.write_all_at(&data, offset)?;
                    file.sync_data()
                })
                .await
            }
            BlobIo::Uring(u) => u.write_at_sync(file, offset, data).await,
        }
    }
}

/// Fills `buf` from `file` at `offset`; fewer bytes only where the file ends.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A second open of `file` with `O_DIRECT`, through `/proc/self/fd`, or `None` where the
/// filesystem has no direct I/O (tmpfs) or `/proc` is missing: the caller reads buffered.
fn reopen_direct(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blob I/O task: {e}")))?
}

/// The io_uring backend: a handle on one ring thread.
#[derive(Clone)]
pub struct Uring {
    inner: Arc<UringInner>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").finish_non_exhaustive()
    }
}

struct UringInner {
    /// `None` only while dropping: the ring thread ends once this is gone and its work done.
    tx: Option<mpsc::Sender<Request>>,
    wake: Arc<nix::sys::eventfd::EventFd>,
}

impl Drop for UringInner {
    fn drop(&mut self) {
        drop(self.tx.take());
        // Wakes the ring thread to see the channel closed.
        let _ = self.wake.write(1);
    }
}

struct Request {
    file: Arc<File>,
    offset: u64,
    kind: Kind,
}

enum Kind {
    Read {
        len: usize,
        reply: tokio::sync::oneshot::Sender<io::Result<Bytes>>,
    },
    WriteSync {
        data: Bytes,
        reply: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
}

impl Uring {
    /// Sets up a ring (failing if this kernel lacks io_uring or any operation used here) and
    /// starts its thread.
    pub fn new(options: UringOptions) -> io::Result<Uring> {
        let UringOptions { chunk, depth, .. } = options;
        if chunk == 0 || chunk > u32::MAX as usize || depth == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "blob I/O chunk and depth must be positive",
            ));
        }
        // One slot more than the depth for the eventfd poll.
        let entries = u32::try_from(depth + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "blob I/O depth too large"))?
            .next_power_of_two();
        let ring = io_uring::IoUring::new(entries)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (io_uring::opcode::Read::CODE, "READ"),
            (io_uring::opcode::Write::CODE, "WRITE"),
            (io_uring::opcode::Fsync::CODE, "FSYNC"),
            (io_uring::opcode::PollAdd::CODE, "POLL_ADD"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring has no {name}"),
                ));
            }
        }
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let wake = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(io::Error::from)?,
        );
        let (tx, rx) = mpsc::channel();
        let thread_wake = Arc::clone(&wake);
        std::thread::Builder::new()
            .name("cfs-blob-io".into())
            .spawn(move || {
                let mut ring_thread = RingThread {
                    ring,
                    rx,
                    wake: thread_wake,
                    options,
                    jobs: HashMap::new(),
                    ready: VecDeque::new(),
                    ops: HashMap::new(),
                    next_id: 0,
                    wake_armed: false,
                };
                if let Err(e) = ring_thread.run() {
                    // Every request still open gets this error through its dropped reply.
                    tracing::error!(error = %e, "the blob I/O ring failed");
                }
            })?;
        Ok(Uring {
            inner: Arc::new(UringInner { tx: Some(tx), wake }),
        })
    }

    fn send(&self, req: Request) -> io::Result<()> {
        let gone = || io::Error::other("the blob I/O ring thread has stopped");
        self.inner
            .tx
            .as_ref()
            .ok_or_else(gone)?
            .send(req)
            .map_err(|_| gone())?;
        self.inner.wake.write(1).map_err(io::Error::from)?;
        Ok(())
    }

    pub async fn read_at(&self, file: Arc<File>, offset: u64, len: usize) -> io::Result<Bytes> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Request {
            file,
            offset,
            kind: Kind::Read { len, reply },
        })?;
        rx.await
            .map_err(|_| io::Error::other("the blob I/O ring dropped a read"))?
    }

    pub async fn write_at_sync(&self, file: Arc<File>, offset: u64, data: Bytes) -> io::Result<()> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Request {
            file,
            offset,
            kind: Kind::WriteSync { data, reply },
        })?;
        rx.await
            .map_err(|_| io::Error::other("the blob I/O ring dropped a write"))?
    }
}

/// `user_data` of the eventfd poll; op ids count up from 0 and never reach it.
const WAKE: u64 = u64::MAX;

/// One request on the ring thread. It owns the buffer (and the file) until no SQE that
/// points into it is in flight, whether or not the caller still waits for the answer.
struct Job {
    file: Arc<File>,
    offset: u64,
    buf: JobBuf,
    /// Pieces (offsets relative to `offset`) still to submit: short transfers come back
    /// here; `next..end` is the part never submitted.
    retry: Vec<Range<usize>>,
    next: usize,
    end: usize,
    inflight: usize,
    error: Option<io::Error>,
    /// Set once the `fdatasync` of a write was submitted.
    syncing: bool,
}

enum JobBuf {
    Read {
        buf: Vec<u8>,
        reply: tokio::sync::oneshot::Sender<io::Result<Bytes>>,
    },
    Write {
        data: Bytes,
        reply: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
}

impl Job {
    fn has_pieces(&self) -> bool {
        self.error.is_none() && (!self.retry.is_empty() || self.next < self.end)
    }

    fn take_piece(&mut self, chunk: usize) -> Option<Range<usize>> {
        if self.error.is_some() {
            return None;
        }
        if let Some(r) = self.retry.pop() {
            return Some(r);
        }
        if self.next < self.end {
            let r = self.next..(self.next + chunk).min(self.end);
            self.next = r.end;
            return Some(r);
        }
        None
    }
}

#[derive(Clone)]
enum OpKind {
    Rw(Range<usize>),
    Fsync,
}

struct RingThread {
    ring: io_uring::IoUring,
    rx: mpsc::Receiver<Request>,
    wake: Arc<nix::sys::eventfd::EventFd>,
    options: UringOptions,
    jobs: HashMap<u64, Job>,
    /// Jobs with pieces to submit, served round-robin.
    ready: VecDeque<u64>,
    /// SQEs in flight: op id → (job id, what it does).
    ops: HashMap<u64, (u64, OpKind)>,
    next_id: u64,
    wake_armed: bool,
}

impl RingThread {
    fn run(&mut self) -> io::Result<()> {
        loop {
            let mut closed = false;
            loop {
                match self.rx.try_recv() {
                    Ok(req) => self.accept(req),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed && self.jobs.is_empty() {
                return Ok(());
            }
            self.submit_pieces()?;
            if !self.wake_armed {
                let poll = io_uring::opcode::PollAdd::new(
                    io_uring::types::Fd(self.wake.as_raw_fd()),
                    libc::POLLIN as u32,
                )
                .build()
                .user_data(WAKE);
                // SAFETY: a poll SQE holds no buffer; the eventfd it names lives as long as
                // this thread (we own an Arc of it), which outlives the ring.
                self.push(&poll)?;
                self.wake_armed = true;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EBUSY: the completion queue is full; reaping below makes room.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (id, res) in done {
                if id == WAKE {
                    self.wake_armed = false;
                    // Resets the counter; EAGAIN (already zero) is fine.
                    let _ = self.wake.read();
                } else {
                    self.complete(id, res)?;
                }
            }
        }
    }

    fn accept(&mut self, req: Request) {
        let id = self.next_id;
        self.next_id += 1;
        let (buf, end) = match req.kind {
            Kind::Read { len, reply } => (
                JobBuf::Read {
                    // Large zeroed vectors come straight from mmap: no memset.
                    buf: vec![0u8; len],
                    reply,
                },
                len,
            ),
            Kind::WriteSync { data, reply } => {
                let len = data.len();
                (JobBuf::Write { data, reply }, len)
            }
        };
        let mut job = Job {
            file: req.file,
            offset: req.offset,
            buf,
            retry: Vec::new(),
            next: 0,
            end,
            inflight: 0,
            error: None,
            syncing: false,
        };
        if u64::try_from(end)
            .ok()
            .and_then(|e| job.offset.checked_add(e))
            .is_none_or(|e| e > i64::MAX as u64)
        {
            job.error = Some(io::Error::new(
                io::ErrorKind::InvalidInput,
                "blob I/O range past the largest file offset",
            ));
        }
        self.jobs.insert(id, job);
        self.ready.push_back(id);
        // An empty or invalid request has nothing to submit: finish it now.
        if let Err(e) = self.maybe_finish(id) {
            tracing::error!(error = %e, "blob I/O: finishing a request");
        }
    }

    /// Submits pieces round-robin over the ready jobs until `depth` are in flight.
    fn submit_pieces(&mut self) -> io::Result<()> {
        while self.ops.len() < self.options.depth {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            let Some(piece) = job.take_piece(self.options.chunk) else {
                continue;
            };
            let fd = io_uring::types::Fd(job.file.as_raw_fd());
            let at = job.offset + piece.start as u64;
            let len = (piece.end - piece.start) as u32;
            let sqe = match &mut job.buf {
                JobBuf::Read { buf, .. } => {
                    io_uring::opcode::Read::new(fd, buf[piece.clone()].as_mut_ptr(), len)
                        .offset(at)
                        .build()
                }
                JobBuf::Write { data, .. } => {
                    io_uring::opcode::Write::new(fd, data[piece.clone()].as_ptr(), len)
                        .offset(at)
                        .build()
                }
            };
            let sqe = if self.options.io_wq {
                sqe.flags(io_uring::squeue::Flags::ASYNC)
            } else {
                sqe
            };
            job.inflight += 1;
            if job.has_pieces() {
                self.ready.push_back(id);
            }
            let op = self.next_id;
            self.next_id += 1;
            self.ops.insert(op, (id, OpKind::Rw(piece)));
            // SAFETY: the SQE points at `len` bytes of this job's buffer (a Vec never resized
            // while SQEs are in flight, or an immutable Bytes) and names its file's fd; the
            // job, which owns both, stays in `self.jobs` until its last completion arrives.
            self.push(&sqe.user_data(op))?;
        }
        Ok(())
    }

    /// Pushes one SQE, submitting first if the queue is full.
    ///
    /// Callers guarantee that every buffer and fd the SQE names stays valid until its
    /// completion is reaped.
    fn push(&mut self, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller keeps the SQE's buffer and fd valid until it completes.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn complete(&mut self, op: u64, res: i32) -> io::Result<()> {
        let Some((id, kind)) = self.ops.remove(&op) else {
            return Ok(());
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return Ok(());
        };
        job.inflight -= 1;
        match kind {
            OpKind::Fsync => {
                if res < 0 {
                    job.error = Some(io::Error::from_raw_os_error(-res));
                }
            }
            OpKind::Rw(piece) => {
                let had_pieces = job.has_pieces();
                let asked = piece.end - piece.start;
                if res < 0 {
                    let err = -res;
                    if err == libc::EINTR || err == libc::EAGAIN {
                        job.retry.push(piece);
                    } else if job.error.is_none() {
                        job.error = Some(io::Error::from_raw_os_error(err));
                    }
                } else {
                    let n = (res as usize).min(asked);
                    match &job.buf {
                        JobBuf::Read { .. } if n == 0 => {
                            // End of file here: nothing at or past it is read (or kept),
                            // as with pread, which stops at its first 0.
                            job.end = job.end.min(piece.start);
                            job.next = job.next.min(job.end);
                            let end = job.end;
                            job.retry.retain(|r| r.start < end);
                        }
                        JobBuf::Write { .. } if n == 0 => {
                            job.error = Some(io::Error::from(io::ErrorKind::WriteZero));
                        }
                        _ if n < asked => job.retry.push(piece.start + n..piece.end),
                        _ => {}
                    }
                }
                if !had_pieces && job.has_pieces() {
                    self.ready.push_back(id);
                }
            }
        }
        self.maybe_finish(id)
    }

    /// Answers a job with nothing left in flight or to submit (after its fdatasync, for a
    /// write), and forgets it.
    fn maybe_finish(&mut self, id: u64) -> io::Result<()> {
        let Some(job) = self.jobs.get_mut(&id) else {
            return Ok(());
        };
        if job.inflight > 0 || job.has_pieces() {
            return Ok(());
        }
        if job.error.is_none() && !job.syncing && matches!(job.buf, JobBuf::Write { .. }) {
            job.syncing = true;
            job.inflight += 1;
            let sqe = io_uring::opcode::Fsync::new(io_uring::types::Fd(job.file.as_raw_fd()))
                .flags(io_uring::types::FsyncFlags::DATASYNC)
                .build();
            let op = self.next_id;
            self.next_id += 1;
            self.ops.insert(op, (id, OpKind::Fsync));
            // SAFETY: an fsync SQE holds no buffer; the job keeps its file open until it
            // completes.
            return self.push(&sqe.user_data(op));
        }
        let Some(job) = self.jobs.remove(&id) else {
            return Ok(());
        };
        // A caller that stopped waiting dropped its receiver: nothing to tell it.
        match job.buf {
            JobBuf::Read { mut buf, reply } => {
                let _ = reply.send(match job.error {
                    Some(e) => Err(e),
                    None => {
                        buf.truncate(job.end);
                        Ok(Bytes::from(buf))
                    }
                });
            }
            JobBuf::Write { reply, .. } => {
                let _ = reply.send(job.error.map_or(Ok(()), Err));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A piece size to build test sizes around (the default chunk is larger).
    const CHUNK: usize = 1 << 20;

    fn backends() -> Vec<BlobIo> {
        vec![
            BlobIo::Portable,
            BlobIo::Uring(Uring::new(UringOptions::default()).expect("io_uring ring")),
            // Completions in task_work rather than io-wq; odd chunk and depth: pieces that
            // do not divide the blob, and a queue that is mostly full.
            BlobIo::Uring(
                Uring::new(UringOptions {
                    chunk: 100_003,
                    depth: 3,
                    io_wq: false,
                })
                .expect("io_uring ring"),
            ),
        ]
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = crate::SplitMix64::new(seed);
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    fn file_with(data: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
        let mut t = tempfile::NamedTempFile::new().expect("tempfile");
        t.write_all(data).expect("write");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(t.path())
            .expect("open");
        (t, Arc::new(f))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_match_across_backends() {
        let data = pattern(5 * CHUNK + 12345, 1);
        let (_t, f) = file_with(&data);
        let cases: [(u64, usize); 7] = [
            (0, 0),
            (0, 1),
            (0, data.len()),
            (777, 3 * CHUNK),
            // Partial at EOF, then wholly past it.
            (data.len() as u64 - 10, CHUNK),
            (data.len() as u64 - 1_500_000, 4 * CHUNK),
            (data.len() as u64 + 5, 100),
        ];
        for io in backends() {
            for &(off, len) in &cases {
                let got = io.read_at(Arc::clone(&f), off, len).await.expect("read");
                let start = (off as usize).min(data.len());
                let end = (start + len).min(data.len());
                assert_eq!(
                    &got[..],
                    &data[start..end],
                    "{} read of {len} at {off}",
                    io.name()
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whole_blob_reads_see_unsynced_writes() {
        // Whole blobs at aligned offsets are read with O_DIRECT where the filesystem has it;
        // bytes still only in the page cache (written, never synced) must be what comes back,
        // and so must a short last blob.
        let blob = crate::BLOB_SIZE as usize;
        let mut data = pattern(blob + 5000, 3);
        let (_t, f) = file_with(&data);
        let patch = pattern(70_000, 4);
        f.write_all_at(&patch, 12_345).expect("overwrite");
        data[12_345..12_345 + patch.len()].copy_from_slice(&patch);
        for io in backends() {
            let first = io.read_at(Arc::clone(&f), 0, blob).await.expect("read");
            assert!(first[..] == data[..blob], "{}: first blob", io.name());
            let last = io
                .read_at(Arc::clone(&f), blob as u64, blob)
                .await
                .expect("read");
            assert!(last[..] == data[blob..], "{}: short last blob", io.name());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_blobs_and_concurrent_requests() {
        // Past one 64 MiB blob, read and written from several tasks at once.
        let len = crate::BLOB_SIZE as usize + 3 * CHUNK + 17;
        let data = Bytes::from(pattern(len, 2));
        for io in backends() {
            let (_t, f) = file_with(&[]);
            let quarter = len / 4;
            let writes = (0..4).map(|i| {
                let end = if i == 3 { len } else { (i + 1) * quarter };
                io.write_at_sync(
                    Arc::clone(&f),
                    (i * quarter) as u64,
                    data.slice(i * quarter..end),
                )
            });
            for r in futures::future::join_all(writes).await {
                r.expect("write");
            }
            assert_eq!(f.metadata().expect("md").len(), len as u64);
            let reads = (0..4).map(|i| io.read_at(Arc::clone(&f), (i * quarter) as u64, len));
            for (i, r) in futures::future::join_all(reads)
                .await
                .into_iter()
                .enumerate()
            {
                assert!(r.expect("read")[..] == data[i * quarter..], "{}", io.name());
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_into_holes_and_past_the_end() {
        let base = pattern(3 * CHUNK, 3);
        let patch = Bytes::from(pattern(CHUNK + 99, 4));
        for io in backends() {
            let (_t, f) = file_with(&base);
            io.write_at_sync(Arc::clone(&f), 1000, patch.clone())
                .await
                .expect("write");
            io.write_at_sync(Arc::clone(&f), 5 * CHUNK as u64, patch.clone())
                .await
                .expect("write past the end");
            io.write_at_sync(Arc::clone(&f), 7, Bytes::new())
                .await
                .expect("empty write");
            let mut want = base.clone();
            want[1000..1000 + patch.len()].copy_from_slice(&patch);
            want.resize(5 * CHUNK, 0);
            want.extend_from_slice(&patch);
            let got = io
                .read_at(Arc::clone(&f), 0, want.len() + 1)
                .await
                .expect("read");
            assert!(got[..] == want[..], "{}", io.name());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_fds_fail_cleanly_and_the_ring_goes_on() {
        let data = pattern(2 * CHUNK, 5);
        let (t, good) = file_with(&data);
        let read_only = Arc::new(File::open(t.path()).expect("open ro"));
        let write_only = Arc::new(
            std::fs::OpenOptions::new()
                .write(true)
                .open(t.path())
                .expect("open wo"),
        );
        let dir = Arc::new(File::open(t.path().parent().expect("parent")).expect("open dir"));
        for io in backends() {
            let e = io
                .write_at_sync(Arc::clone(&read_only), 0, Bytes::from_static(b"x"))
                .await
                .expect_err("write to a read-only fd");
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{}: {e}", io.name());
            let e = io
                .read_at(Arc::clone(&write_only), 0, 3 * CHUNK)
                .await
                .expect_err("read of a write-only fd");
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{}: {e}", io.name());
            let e = io
                .read_at(Arc::clone(&dir), 0, 10)
                .await
                .expect_err("read of a directory");
            assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "{}: {e}", io.name());
            let e = io
                .read_at(Arc::clone(&good), u64::MAX - 5, 10)
                .await
                .expect_err("offset past the largest");
            assert!(
                matches!(e.raw_os_error(), Some(libc::EINVAL))
                    || e.kind() == io::ErrorKind::InvalidInput,
                "{}: {e}",
                io.name()
            );
            let got = io
                .read_at(Arc::clone(&good), 0, data.len())
                .await
                .expect("read");
            assert!(got[..] == data[..], "{}", io.name());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_request_does_not_disturb_others() {
        let data = pattern(8 * CHUNK, 6);
        let (_t, f) = file_with(&data);
        let u = Uring::new(UringOptions {
            chunk: CHUNK,
            depth: 2,
            io_wq: false,
        })
        .expect("ring");
        // Dropped after its first poll: the ring still owns (and later frees) the buffer.
        let abandoned = u.read_at(Arc::clone(&f), 0, data.len());
        let _ = tokio::time::timeout(std::time::Duration::from_micros(1), abandoned).await;
        let got = u
            .read_at(Arc::clone(&f), 0, data.len())
            .await
            .expect("read");
        assert!(got[..] == data[..]);
        drop(u);
    }

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse(), Ok(BlobIoChoice::Auto));
        assert_eq!("uring".parse(), Ok(BlobIoChoice::Uring));
        assert_eq!("portable".parse(), Ok(BlobIoChoice::Portable));
        assert!("fast".parse::<BlobIoChoice>().is_err());
    }
}
