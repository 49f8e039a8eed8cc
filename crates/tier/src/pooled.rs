//! Blob-sized buffers that are reused rather than allocated per blob, and the assembly of a
//! GET body into one buffer as its chunks arrive.
//!
//! A fresh 64 MiB allocation is a new mapping whose every page the kernel faults in and
//! zeroes: for a blob that costs as much CPU as receiving its bytes. On a small machine that
//! also runs the object store, every cycle the daemon spends per byte is one the server
//! cannot spend sending it, so blob buffers come from small pools, a GET body's are backed
//! by huge pages where the kernel allows it, and a GET body is copied into one while each
//! chunk is still in the CPU's cache.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::key::BLOB_SIZE;

/// Where a blob's bytes start in memory, so that hydration can write them to flash with
/// `O_DIRECT` (which wants buffer, offset and length aligned to the device's blocks).
pub const DIRECT_ALIGN: usize = 4096;

/// Where a pooled buffer's bytes start: a (2 MiB) huge page boundary, so the whole blob can
/// be backed by huge pages. Fewer pages make the faults that map a new buffer, and the
/// kernel's pinning of its pages when a FUSE reply is copied out of it, cheaper. A multiple
/// of [`DIRECT_ALIGN`].
const HUGE_PAGE: usize = 2 << 20;

/// Most idle GET buffers kept: enough for a sequential reader of a cold file to start its
/// next file without a single new one. That reader holds the blobs it was served lately and
/// the ones fetched ahead of it, eleven at most. A pool of two made a 2 GiB cold read cost
/// the daemon 2.9 to 4.1 CPU seconds instead of 1.2 to 1.4: buffers returned in a burst
/// were freed, and then mapped and zeroed again one by one.
const GET_IDLE_MAX: usize = 12;

/// Most idle buffers kept for reads of blobs off flash: the uploader's, one per upload at a
/// time (four by default).
const READ_IDLE_MAX: usize = 4;

/// How long an idle buffer is kept: what the pools pin (up to 1 GiB) is given back to
/// the system this long after the tier's work stopped.
const IDLE_FOR: Duration = Duration::from_secs(30);

/// Bytes a pooled buffer holds: a blob, and room to start it at an aligned address.
const BUFFER_CAPACITY: usize = BLOB_SIZE as usize + HUGE_PAGE;

/// Idle blob-sized buffers, their pages already mapped, each with when it was returned.
/// The most recently returned is taken first, so the others age out.
struct Pool {
    idle: parking_lot::Mutex<Vec<(Vec<u8>, Instant)>>,
    max_idle: usize,
    /// Whether its buffers are backed by huge pages (see [`advise_huge_pages`]).
    huge: bool,
}

/// Buffers for GET bodies. Served to FUSE readers, whose replies the kernel copies out page
/// by page: with huge pages under them, a 2 GiB cold read cost the daemon 1.3 CPU seconds
/// rather than 2.9 to 4.7.
static GET_POOL: Pool = Pool::new(GET_IDLE_MAX, true);

/// Buffers for blobs read off flash (with `O_DIRECT`) for upload. Small pages: with huge
/// pages the flush of 2 GiB ran about a tenth slower (100 MB/s against 114, four runs each).
static READ_POOL: Pool = Pool::new(READ_IDLE_MAX, false);

impl Pool {
    const fn new(max_idle: usize, huge: bool) -> Pool {
        Pool {
            idle: parking_lot::const_mutex(Vec::new()),
            max_idle,
            huge,
        }
    }

    fn take(&'static self) -> PooledBuffer {
        let idle = self.idle.lock().pop().map(|(buf, _)| buf);
        let mut buf = idle.unwrap_or_else(|| {
            let buf = Vec::with_capacity(BUFFER_CAPACITY);
            if self.huge {
                advise_huge_pages(&buf);
            }
            buf
        });
        // Within the capacity, so the buffer never moves and `start` stays aligned. A buffer
        // from the pool has its padding already.
        let start = buf.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        buf.resize(start, 0);
        PooledBuffer {
            buf,
            start,
            pool: self,
        }
    }

    /// Keeps `buf` for the next [`Pool::take`], unless the pool is full. Its first `start`
    /// bytes, the padding, stay: the next taker need not write them again.
    fn give_back(&self, mut buf: Vec<u8>, start: usize, now: Instant) {
        if buf.capacity() < BUFFER_CAPACITY {
            return;
        }
        buf.truncate(start);
        let mut idle = self.idle.lock();
        Self::trim_locked(&mut idle, now);
        if idle.len() < self.max_idle {
            idle.push((buf, now));
        }
    }

    fn trim(&self, now: Instant) {
        Self::trim_locked(&mut self.idle.lock(), now);
    }

    fn trim_locked(idle: &mut Vec<(Vec<u8>, Instant)>, now: Instant) {
        idle.retain(|(_, at)| now.saturating_duration_since(*at) < IDLE_FOR);
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().len()
    }
}

/// Frees the buffers idle for longer than [`IDLE_FOR`]. Called on every return to the pool
/// and periodically by the evictor, so an idle mount gives the memory back.
pub fn trim_idle() {
    GET_POOL.trim(Instant::now());
    READ_POOL.trim(Instant::now());
}

/// A blob-sized buffer whose bytes start at `start`, the first [`HUGE_PAGE`] boundary in it
/// (the bytes before are padding); it returns to its pool when the last `Bytes` of it is
/// dropped.
struct PooledBuffer {
    buf: Vec<u8>,
    start: usize,
    pool: &'static Pool,
}

impl PooledBuffer {
    fn len(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Asks the kernel to back the capacity of `buf` with huge pages (with transparent huge
/// pages in `madvise` mode, as distributions set them, it does not otherwise). Only advice:
/// where it is refused, the buffer works the same with small pages.
fn advise_huge_pages(buf: &Vec<u8>) {
    let page = DIRECT_ALIGN;
    let begin = (buf.as_ptr() as usize).next_multiple_of(page);
    let end = (buf.as_ptr() as usize + buf.capacity()) / page * page;
    if end <= begin {
        return;
    }
    // SAFETY: [begin, end) lies within the allocation `buf` owns, page-aligned as madvise
    // requires. MADV_HUGEPAGE changes only how the kernel may back those pages, never their
    // contents or whether they are mapped, so no Rust reference is affected.
    let rc = unsafe { libc::madvise(begin as *mut libc::c_void, end - begin, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "madvise(MADV_HUGEPAGE) of a blob buffer refused");
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.pool
            .give_back(std::mem::take(&mut self.buf), self.start, Instant::now());
    }
}

/// A pooled buffer of `len` bytes (at most a blob), filled by `fill`, which returns how many
/// it filled; the result holds just those.
pub(crate) fn read_into_pooled(
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
) -> std::io::Result<Bytes> {
    let mut b = READ_POOL.take();
    let start = b.start;
    // Zeroing pages already mapped is a memset; a fresh allocation faulted every page in.
    b.buf.resize(start + len.min(BLOB_SIZE as usize), 0);
    let filled = fill(&mut b.buf[start..])?;
    b.buf.truncate(start + filled);
    Ok(Bytes::from_owner(b))
}

/// A GET body of (at most) `want` bytes being put together from the chunks the HTTP client
/// hands over. Each chunk is copied as it arrives, while it is still in cache, and then
/// dropped, so the client reuses its receive buffers instead of the whole body's chunks
/// piling up and being copied from memory at the end. A body that arrives as one chunk is
/// not copied at all.
pub(crate) struct Assembly {
    want: u64,
    state: State,
}

enum State {
    Empty,
    One(Bytes),
    Pooled(PooledBuffer),
    Plain(BytesMut),
}

impl Assembly {
    pub(crate) fn new(want: u64) -> Assembly {
        Assembly {
            want,
            state: State::Empty,
        }
    }

    /// Appends `chunk`. The caller keeps the total within `want`.
    pub(crate) fn push(&mut self, chunk: Bytes) {
        match &mut self.state {
            State::Empty => self.state = State::One(chunk),
            State::One(first) => {
                let first = std::mem::take(first);
                self.state = self.joined();
                self.append(&first);
                self.append(&chunk);
            }
            _ => self.append(&chunk),
        }
    }

    /// The buffer a body of more than one chunk goes into: a pooled one for a blob-sized
    /// body, else one reserved for `want` (what the server announced or metadata recorded,
    /// capped anyway).
    fn joined(&self) -> State {
        if self.want > BLOB_SIZE / 2 && self.want <= BLOB_SIZE {
            State::Pooled(GET_POOL.take())
        } else {
            State::Plain(BytesMut::with_capacity(
                self.want.min(2 * BLOB_SIZE) as usize
            ))
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        match &mut self.state {
            // A body longer than announced does not fit its pooled buffer without moving
            // it (and losing its alignment): it goes on in a plain one.
            State::Pooled(b) if b.len() + bytes.len() > BLOB_SIZE as usize => {
                let mut plain = BytesMut::with_capacity(b.len() + bytes.len());
                plain.extend_from_slice(b.as_ref());
                plain.extend_from_slice(bytes);
                self.state = State::Plain(plain);
            }
            State::Pooled(b) => b.buf.extend_from_slice(bytes),
            State::Plain(b) => b.extend_from_slice(bytes),
            State::Empty | State::One(_) => {
                let mut plain = BytesMut::with_capacity(bytes.len());
                plain.extend_from_slice(bytes);
                self.state = State::Plain(plain);
            }
        }
    }

    /// The whole body.
    pub(crate) fn finish(self) -> Bytes {
        match self.state {
            State::Empty => Bytes::new(),
            State::One(b) => b,
            State::Pooled(b) => Bytes::from_owner(b),
            State::Plain(b) => b.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assembled(want: u64, chunks: &[usize]) -> (Bytes, Vec<u8>) {
        let mut body = Assembly::new(want);
        let mut expected = Vec::new();
        for (i, &n) in chunks.iter().enumerate() {
            let chunk: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
            expected.extend_from_slice(&chunk);
            body.push(Bytes::from(chunk));
        }
        (body.finish(), expected)
    }

    #[test]
    fn a_body_is_its_chunks_in_order() {
        for chunks in [&[][..], &[7], &[3, 5, 1 << 16], &[1 << 20, 1 << 20, 12345]] {
            let want = chunks.iter().sum::<usize>() as u64;
            let (got, expected) = assembled(want, chunks);
            assert_eq!(&got[..], &expected[..], "chunks {chunks:?}");
        }
    }

    #[test]
    fn a_blob_sized_body_lands_in_a_huge_page_aligned_buffer() {
        let chunk = 4 << 20;
        let chunks = vec![chunk; (BLOB_SIZE as usize) / chunk];
        let (got, expected) = assembled(BLOB_SIZE, &chunks);
        assert_eq!(got.len(), expected.len());
        assert!(got[..] == expected[..]);
        assert_eq!(got.as_ptr().align_offset(HUGE_PAGE), 0);
    }

    #[test]
    fn a_body_longer_than_its_blob_buffer_is_kept_whole() {
        // The caller checks the length against `want`; the assembly must not lose bytes
        // even when a server's body runs past a blob.
        let chunks = [BLOB_SIZE as usize - 10, 20];
        let (got, expected) = assembled(BLOB_SIZE, &chunks);
        assert_eq!(got.len(), expected.len());
        assert!(got[..] == expected[..]);
    }

    #[test]
    fn idle_buffers_are_reused_then_given_back_to_the_system() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(GET_IDLE_MAX, true)));
        let first = pool.take();
        let at = first.buf.as_ptr();
        drop(first);
        assert_eq!(pool.idle(), 1);
        let again = pool.take();
        assert_eq!(again.buf.as_ptr(), at, "the idle buffer is taken again");
        assert_eq!(pool.idle(), 0);
        let held: Vec<PooledBuffer> = (0..GET_IDLE_MAX + 2).map(|_| pool.take()).collect();
        drop(held);
        assert_eq!(
            pool.idle(),
            GET_IDLE_MAX,
            "the pool keeps at most its maximum"
        );
        pool.trim(Instant::now() + IDLE_FOR / 2);
        assert_eq!(pool.idle(), GET_IDLE_MAX);
        pool.trim(Instant::now() + IDLE_FOR);
        assert_eq!(pool.idle(), 0, "buffers idle for IDLE_FOR are freed");
        drop(again);
    }

    #[test]
    fn a_single_chunk_is_not_copied() {
        let chunk = Bytes::from(vec![9u8; 1000]);
        let mut body = Assembly::new(1000);
        body.push(chunk.clone());
        assert_eq!(body.finish().as_ptr(), chunk.as_ptr());
    }
}
