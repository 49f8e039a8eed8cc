//! Blob-sized buffers that are reused rather than allocated per blob, and the assembly of a
//! GET body into one buffer as its chunks arrive.
//!
//! A fresh 64 MiB allocation is a new mapping whose every page the kernel faults in and
//! zeroes: for a blob that costs as much CPU as receiving its bytes. So blob buffers come
//! from a small pool, and a GET body is copied into one chunk by chunk as it arrives, so its
//! chunks are not all held until the end.
//!
//! A sequential cold read keeps up to four GETs in flight and six fetched blobs for its
//! reader: GETs finish in bursts, each dropping an old blob, and start in bursts. With two
//! idle buffers kept, 13 of a 2 GiB read's 32 GETs had to map and zero a fresh buffer
//! (counted with bpftrace on mmap); page faults and zeroing were 14% of the daemon's CPU. So
//! a burst's worth is kept while buffers are in use, and the extra ones go once they have
//! been idle a few seconds: an idle mount pins no more than before.
//!
//! Tried and left out, with `scripts/bench --only tier`: Huge pages (`MADV_HUGEPAGE`) under GET buffers halved
//! it in some runs, but nearly tripled it in a run with the bench's other targets mounted
//! (1,135 ticks for a 4 GiB cold read, against 461 without), and slowed uploads.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::key::BLOB_SIZE;

/// Where a blob's bytes start in memory, so that hydration can write them to flash with
/// `O_DIRECT` (which wants buffer, offset and length aligned to the device's blocks).
pub const DIRECT_ALIGN: usize = 4096;

/// Most idle buffers kept while buffers are in use: a burst of GETs ending (each dropping an
/// old blob) followed by a burst starting.
const IDLE_MAX: usize = 8;

/// Idle buffers kept however long they stay idle: what they pin (64 MiB each) stays resident
/// while the mount idles.
const IDLE_KEEP: usize = 2;

/// How long the buffers beyond [`IDLE_KEEP`] stay idle before they are freed.
const IDLE_LINGER: Duration = Duration::from_secs(5);

/// Bytes a pooled buffer holds: a blob, and room to start it at an aligned address.
const BUFFER_CAPACITY: usize = BLOB_SIZE as usize + DIRECT_ALIGN;

/// Idle blob-sized buffers, their pages already mapped, each with when it went idle (the
/// most recent last).
struct Pool {
    idle: parking_lot::Mutex<Vec<(Vec<u8>, Instant)>>,
}

/// Frees the idle buffers beyond the few kept for good once they have lingered; called
/// periodically, so that an idle mount gives back what a burst of reads left.
pub(crate) fn trim_idle() {
    POOL.trim(Instant::now());
}

/// The daemon's one pool, shared by GETs and by the uploader's reads of blobs off flash.
static POOL: Pool = Pool::new();

impl Pool {
    const fn new() -> Pool {
        Pool {
            idle: parking_lot::const_mutex(Vec::new()),
        }
    }

    fn take(&'static self) -> PooledBuffer {
        let idle = self.idle.lock().pop().map(|(buf, _)| buf);
        let mut buf = idle.unwrap_or_else(|| Vec::with_capacity(BUFFER_CAPACITY));
        // Within the capacity, so the buffer never moves and `start` stays aligned. A buffer
        // from the pool has its padding already.
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        buf.resize(start, 0);
        PooledBuffer {
            buf,
            start,
            pool: self,
        }
    }

    /// Keeps `buf` for the next [`Pool::take`], unless the pool is full. Its first `start`
    /// bytes, the padding, stay: the next taker need not write them again.
    fn give_back(&self, mut buf: Vec<u8>, start: usize) {
        if buf.capacity() < BUFFER_CAPACITY {
            return;
        }
        buf.truncate(start);
        let mut idle = self.idle.lock();
        if idle.len() < IDLE_MAX {
            idle.push((buf, Instant::now()));
        }
    }

    /// Drops the buffers beyond [`IDLE_KEEP`] that went idle more than [`IDLE_LINGER`]
    /// before `now`: the oldest, at the front. Freed outside the lock.
    fn trim(&self, now: Instant) {
        let freed: Vec<_> = {
            let mut idle = self.idle.lock();
            let stale = idle
                .iter()
                .take(idle.len().saturating_sub(IDLE_KEEP))
                .take_while(|(_, at)| now.saturating_duration_since(*at) > IDLE_LINGER)
                .count();
            idle.drain(..stale).collect()
        };
        drop(freed);
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().len()
    }
}

/// A blob-sized buffer whose bytes start at `start`, the first [`DIRECT_ALIGN`] boundary in
/// it (the bytes before are padding); it returns to its pool when the last `Bytes` of it is
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

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.pool
            .give_back(std::mem::take(&mut self.buf), self.start);
    }
}

/// A pooled buffer of `len` bytes (at most a blob), filled by `fill`, which returns how many
/// it filled; the result holds just those.
pub(crate) fn read_into_pooled(
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
) -> std::io::Result<Bytes> {
    let mut b = POOL.take();
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
            State::Pooled(POOL.take())
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
    fn a_blob_sized_body_lands_in_an_aligned_buffer() {
        let chunk = 4 << 20;
        let chunks = vec![chunk; (BLOB_SIZE as usize) / chunk];
        let (got, expected) = assembled(BLOB_SIZE, &chunks);
        assert_eq!(got.len(), expected.len());
        assert!(got[..] == expected[..]);
        assert_eq!(got.as_ptr().align_offset(DIRECT_ALIGN), 0);
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
    fn idle_buffers_are_reused_up_to_the_maximum() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let first = pool.take();
        let at = first.buf.as_ptr();
        drop(first);
        assert_eq!(pool.idle(), 1);
        let again = pool.take();
        assert_eq!(again.buf.as_ptr(), at, "the idle buffer is taken again");
        assert_eq!(pool.idle(), 0);
        let held: Vec<PooledBuffer> = (0..IDLE_MAX + 2).map(|_| pool.take()).collect();
        drop(held);
        assert_eq!(pool.idle(), IDLE_MAX, "the pool keeps at most its maximum");
        drop(again);
    }

    #[test]
    fn lingering_idle_buffers_are_freed_down_to_the_few_kept() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let held: Vec<PooledBuffer> = (0..IDLE_MAX).map(|_| pool.take()).collect();
        drop(held);
        assert_eq!(pool.idle(), IDLE_MAX);
        pool.trim(Instant::now());
        assert_eq!(
            pool.idle(),
            IDLE_MAX,
            "buffers idle for less than the linger stay"
        );
        pool.trim(Instant::now() + IDLE_LINGER + Duration::from_secs(1));
        assert_eq!(pool.idle(), IDLE_KEEP, "the rest go once they lingered");
        pool.trim(Instant::now() + 100 * IDLE_LINGER);
        assert_eq!(pool.idle(), IDLE_KEEP, "the few kept stay however long");
    }

    #[test]
    fn a_single_chunk_is_not_copied() {
        let chunk = Bytes::from(vec![9u8; 1000]);
        let mut body = Assembly::new(1000);
        body.push(chunk.clone());
        assert_eq!(body.finish().as_ptr(), chunk.as_ptr());
    }
}
