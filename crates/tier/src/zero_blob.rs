//! Blobs of zeros, stored as a short marker object instead of their bytes.
//!
//! A sparse file (a `truncate -s 100G` image, an output file preallocated and then filled in
//! places) is mostly holes, and each of its blobs without data would otherwise go up as
//! 64 MiB of zeros: a 4 GiB file holding 10 bytes took 4 GiB of objects and 9 s to upload to
//! a local `file://` store. Such a blob, and one written full of zeros, is recorded as any
//! other (its length, and the crc32c of its zeros and of each piece of them), but its object
//! is [`marker`]: one short line naming its length.
//!
//! Metadata does not say which blobs are markers, so its format is unchanged and a store
//! written before markers existed reads as before. A verified GET
//! ([`crate::BlobStore::get_verified`]) takes an object for a marker only if three things
//! hold at once: the object is shorter than the recorded length (a blob's own object is
//! always exactly that long), the recorded crc32c is that of as many zeros, and the object's
//! bytes are exactly the marker for that length. A damaged object fails that test and is
//! `Corrupt`, as before. A ranged GET cannot be served from a marker, so a reader fetches a
//! blob whose recorded checksum is that of zeros whole ([`may_be_marker`]): a blob of real
//! data with that checksum (about one in 2^32) costs a whole GET, and is never read wrong.

use crate::key::BLOB_SIZE;
use bytes::Bytes;
use std::sync::OnceLock;

/// The marker object for a blob of `len` zeros: one line, readable in a bucket listing.
pub fn marker(len: u64) -> Bytes {
    Bytes::from(format!("cfs zero blob, {len} bytes\n"))
}

/// True if a blob of `len` zeros goes up as [`marker`]: whenever the marker is shorter.
/// A tiny blob of zeros goes up as its bytes, so that an object shorter than its blob is
/// always a marker, never a blob cut short.
pub fn stored_as_marker(len: u64) -> bool {
    (marker(len).len() as u64) < len
}

/// The crc32c of `len` zero bytes, without reading any: the crc32c register starts at all
/// ones, and `len` zero bytes only shift it, which is what `crc32c_combine` computes (a
/// combine with an empty second crc) in O(log len) steps, tens of µs for 64 MiB. A reader
/// asks on every ranged read of a cold blob, so the lengths of a whole blob and of a whole
/// piece, nearly every one asked for, are worked out once.
pub fn zeros_crc(len: u64) -> u32 {
    static BLOB: OnceLock<u32> = OnceLock::new();
    static PIECE: OnceLock<u32> = OnceLock::new();
    let shift = |len: u64| {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        !crc32c::crc32c_combine(!0, 0, len)
    };
    match len {
        BLOB_SIZE => *BLOB.get_or_init(|| shift(len)),
        cfs_meta::BLOB_CHUNK => *PIECE.get_or_init(|| shift(len)),
        _ => shift(len),
    }
}

/// The checksums the uploader records for a blob of `len` zeros: the crc32c of the whole,
/// and of each [`cfs_meta::BLOB_CHUNK`] (the last one may be shorter).
pub fn zero_checksums(len: u64) -> (u32, Vec<u32>) {
    let piece = cfs_meta::BLOB_CHUNK;
    let chunks = (0..len.div_ceil(piece))
        .map(|i| zeros_crc(piece.min(len - i * piece)))
        .collect();
    (zeros_crc(len), chunks)
}

/// True if the object of a blob recorded with `len` and `crc32c` may be a marker: its
/// checksum is that of zeros and it is long enough to be stored as one.
pub fn may_be_marker(len: u64, crc32c: u32) -> bool {
    stored_as_marker(len) && crc32c == zeros_crc(len)
}

/// True if `body`, the object of a blob recorded with `len` and `crc32c`, is its marker.
pub fn is_marker(body: &[u8], len: u64, crc32c: u32) -> bool {
    may_be_marker(len, crc32c) && body == marker(len)
}

/// One blob of zeros for every reader of every zero blob: in the zero-initialised data
/// section, so it takes no memory of its own (its pages map the kernel's zero page once
/// read). A fresh zeroed 64 MiB per blob cost 28 ms of page faults and its scan for zero
/// runs as much again, for each blob of a sparse file read back from its markers.
static ZEROS: [u8; BLOB_SIZE as usize] = [0; BLOB_SIZE as usize];

/// `len` zero bytes: a slice of the shared blob of zeros (see [`is_shared_zeros`]) when it
/// is long enough, as it is for every blob.
pub fn zeros(len: u64) -> Bytes {
    let n = usize::try_from(len).unwrap_or(usize::MAX);
    if n <= ZEROS.len() {
        Bytes::from_static(&ZEROS[..n])
    } else {
        Bytes::from(vec![0u8; n])
    }
}

/// True if `data` lies in the shared blob of zeros that [`zeros`] hands out, so that it is
/// known to be zeros without reading it: a writer punches its range out of the backing file
/// instead of scanning it for zero runs.
pub fn is_shared_zeros(data: &[u8]) -> bool {
    let shared = ZEROS.as_ptr_range();
    let range = data.as_ptr_range();
    !data.is_empty() && shared.start <= range.start && range.end <= shared.end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_crc_matches_reading_zeros() {
        let piece = cfs_meta::BLOB_CHUNK;
        for len in [
            0,
            1,
            2,
            3,
            7,
            4096,
            65_537,
            piece - 1,
            piece,
            3 * piece + 5,
            BLOB_SIZE,
        ] {
            let want = crc32c::crc32c(&vec![0u8; len as usize]);
            assert_eq!(zeros_crc(len), want, "{len} zeros");
        }
    }

    #[test]
    fn zero_checksums_are_those_of_the_zeros() {
        let piece = cfs_meta::BLOB_CHUNK;
        for len in [1, piece, piece + 1, 5 * piece / 2] {
            let data = vec![0u8; len as usize];
            let pieces: Vec<u32> = data.chunks(piece as usize).map(crc32c::crc32c).collect();
            assert_eq!(
                zero_checksums(len),
                (crc32c::crc32c(&data), pieces),
                "{len}"
            );
        }
    }

    #[test]
    fn only_the_exact_marker_of_a_zero_blob_is_one() {
        let len = 64 << 20;
        let crc = zeros_crc(len);
        assert!(is_marker(&marker(len), len, crc));
        assert!(
            !is_marker(&marker(len - 1), len, crc),
            "another length's marker"
        );
        assert!(!is_marker(&marker(len), len, crc ^ 1), "a blob of data");
        let mut cut = marker(len).to_vec();
        cut.pop();
        assert!(!is_marker(&cut, len, crc), "a marker cut short");
        assert!(!is_marker(b"", len, crc), "an empty object");
    }

    #[test]
    fn tiny_zero_blobs_go_up_as_their_bytes() {
        let short = marker(10).len() as u64;
        assert!(!stored_as_marker(short));
        assert!(!may_be_marker(short, zeros_crc(short)));
        assert!(stored_as_marker(1 << 20));
        assert!(zeros(5).iter().all(|&b| b == 0) && zeros(5).len() == 5);
    }

    #[test]
    fn zero_blobs_are_the_shared_zeros_and_only_they_are() {
        for len in [1, 4096, BLOB_SIZE - 1, BLOB_SIZE] {
            let z = zeros(len);
            assert_eq!(z.len() as u64, len);
            assert!(is_shared_zeros(&z), "{len}");
            assert!(
                is_shared_zeros(&z[1.min(z.len() - 1)..]),
                "a slice of it, {len}"
            );
        }
        assert!(zeros(BLOB_SIZE).iter().all(|&b| b == 0));
        assert!(
            !is_shared_zeros(&vec![0u8; 4096]),
            "zeros of another buffer"
        );
        assert!(!is_shared_zeros(&[]), "nothing");
        let longer = zeros(BLOB_SIZE + 1);
        assert_eq!(longer.len() as u64, BLOB_SIZE + 1);
        assert!(
            !is_shared_zeros(&longer),
            "longer than a blob: a buffer of its own"
        );
    }
}
