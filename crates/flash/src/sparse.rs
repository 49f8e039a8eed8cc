//! Writing bytes fetched from the object store back onto flash without filling holes.
//!
//! A blob of a sparse file (a `truncate -s 100G` image, a checkpoint file written at
//! scattered offsets) that holds some data comes back from the store with its holes as
//! zeros (a blob of nothing but zeros comes back as zeros from its marker object). Written
//! as they are, those zeros take real space on flash: a repaired 100 MiB file holding 4 KiB
//! of data took 100 MiB, and a blob read back after eviction took all of its 64 MiB. Zero
//! runs are punched out instead, so they read as zeros and take nothing, as they did before.

use std::fs::File;
use std::io;

/// The unit of the zero test: a run of zeros is punched out only where it covers whole
/// aligned pieces of this size, so that a file of mixed data and small zero runs costs a few
/// large writes, not one syscall per filesystem block.
pub const HOLE_GRAIN: u64 = 64 << 10;

/// Writes `data` at `offset` of `file` through `write`, except every aligned
/// [`HOLE_GRAIN`] piece that is all zeros: runs of those are punched out of the file
/// instead (`FALLOC_FL_PUNCH_HOLE`, size kept). Either way the range reads back as `data`,
/// whatever the file held there before. `write` gets each run of data with its file offset;
/// a caller passes its own, e.g. one that uses `O_DIRECT`. Where the filesystem cannot punch,
/// the zeros are written.
pub fn write_keeping_holes(
    file: &File,
    data: &[u8],
    offset: u64,
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    // Consecutive pieces of the same kind, as (range in data, is a hole).
    let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let file_at = offset + at as u64;
        let piece_end = (file_at / HOLE_GRAIN + 1) * HOLE_GRAIN - offset;
        let end = usize::try_from(piece_end).map_or(data.len(), |e| e.min(data.len()));
        // Only whole pieces become holes: a partial one shares its block with bytes that
        // are not ours to drop.
        let hole = (end - at) as u64 == HOLE_GRAIN && all_zero(&data[at..end]);
        match runs.last_mut() {
            Some((run, was_hole)) if *was_hole == hole => run.end = end,
            _ => runs.push((at..end, hole)),
        }
        at = end;
    }
    for (run, hole) in runs {
        let at = offset + run.start as u64;
        put(file, &data[run], at, hole, &mut write)?;
    }
    Ok(())
}

/// One run: punched if it is a hole (written if the filesystem cannot punch), else written.
fn put(
    file: &File,
    run: &[u8],
    at: u64,
    hole: bool,
    write: &mut impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    if hole {
        match punch(file, at, run.len() as u64) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            other => return other,
        }
    }
    write(run, at)
}

/// Makes `zeros.len()` bytes at `offset` of `file` read as zeros, given bytes known to be
/// all zero (nobody scans them): the range is punched out, edges included (a punch zeroes
/// the part of a block it covers and leaves the rest), or, where the filesystem cannot
/// punch, `zeros` goes through `write`.
pub fn write_known_zeros(
    file: &File,
    zeros: &[u8],
    offset: u64,
    mut write: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    if zeros.is_empty() {
        return Ok(());
    }
    put(file, zeros, offset, true, &mut write)
}

/// Punches `len` bytes at `at` out of `file`, keeping its size.
pub(crate) fn punch(file: &File, at: u64, len: u64) -> io::Result<()> {
    let int = |v: u64| i64::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    nix::fcntl::fallocate(
        file,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        int(at)?,
        int(len)?,
    )?;
    Ok(())
}

/// True if every byte is zero. An OR over the whole piece, which the compiler vectorizes;
/// pieces are small enough that stopping at the first non-zero byte would save little.
fn all_zero(piece: &[u8]) -> bool {
    piece.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// True if every byte of `data` is zero. Tested 4 KiB at a time, so that data (which is
/// rarely zero for long) is told apart after its first few bytes, not after the whole buffer.
pub fn is_all_zero(data: &[u8]) -> bool {
    data.chunks(4096).all(all_zero)
}

/// True if `range` of `file` may hold data; false only if it is all hole, as `SEEK_DATA`
/// finds no data in it. A filesystem without hole tracking reports data everywhere, so the
/// answer is then always true.
pub fn has_data(file: &File, range: std::ops::Range<u64>) -> io::Result<bool> {
    let start =
        i64::try_from(range.start).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match nix::unistd::lseek(file, start, nix::unistd::Whence::SeekData) {
        Ok(at) => Ok((at as u64) < range.end),
        // No data at or after `start`: the rest of the file is a hole.
        Err(nix::errno::Errno::ENXIO) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    const G: usize = HOLE_GRAIN as usize;

    /// A file of `len` bytes of 0xEE: whatever was there before must not show through.
    fn stale_file(dir: &tempfile::TempDir, len: usize) -> File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .expect("create");
        f.write_all_at(&vec![0xEE; len], 0).expect("fill");
        f
    }

    fn read_all(f: &File, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        f.read_exact_at(&mut buf, 0).expect("read");
        buf
    }

    #[test]
    fn zero_pieces_become_holes_and_everything_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 64 * G;
        let f = stale_file(&dir, len);
        let mut data = vec![0u8; len];
        data[..100].fill(1); // piece 0: data
        data[10 * G + 5] = 2; // piece 10: one byte of data among zeros
        data[63 * G..].fill(3); // the last piece: data
        let mut writes = Vec::new();
        write_keeping_holes(&f, &data, 0, |run, at| {
            writes.push((at, run.len()));
            f.write_all_at(run, at)
        })
        .expect("write");
        assert_eq!(read_all(&f, len), data);
        assert_eq!(
            writes,
            vec![(0, G), (10 * G as u64, G), (63 * G as u64, G)],
            "only the pieces with data are written"
        );
        let allocated = f.metadata().expect("stat").blocks() * 512;
        assert!(
            allocated <= 4 * HOLE_GRAIN,
            "{allocated} bytes allocated for three pieces of data"
        );
    }

    #[test]
    fn unaligned_ends_are_written_not_punched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 8 * G;
        let f = stale_file(&dir, len);
        // From the middle of piece 0 to the middle of piece 6, all zeros: pieces 1 to 5
        // are whole and become holes; the partial ends are written.
        let (offset, data) = (G as u64 / 2, vec![0u8; 6 * G]);
        let mut writes = Vec::new();
        write_keeping_holes(&f, &data, offset, |run, at| {
            writes.push((at, run.len()));
            f.write_all_at(run, at)
        })
        .expect("write");
        let mut want = vec![0xEE; len];
        want[G / 2..G / 2 + 6 * G].fill(0);
        assert_eq!(read_all(&f, len), want);
        assert_eq!(writes, vec![(offset, G / 2), (6 * G as u64, G / 2)]);
    }

    #[test]
    fn data_without_zero_pieces_is_one_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = stale_file(&dir, 4 * G);
        let data: Vec<u8> = (0..4 * G).map(|i| (i % 251) as u8 + 1).collect();
        let mut writes = 0;
        write_keeping_holes(&f, &data, 0, |run, at| {
            writes += 1;
            f.write_all_at(run, at)
        })
        .expect("write");
        assert_eq!(writes, 1);
        assert_eq!(read_all(&f, 4 * G), data);
    }

    #[test]
    fn has_data_tells_holes_from_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = File::create(dir.path().join("h")).expect("create");
        let g = HOLE_GRAIN;
        f.set_len(8 * g).expect("set_len");
        f.write_all_at(b"x", 4 * g + 5).expect("write");
        // Not synced: data still in the page cache counts too.
        assert!(
            !has_data(&f, 0..4 * g).expect("seek"),
            "a hole before the data"
        );
        assert!(
            has_data(&f, 4 * g..5 * g).expect("seek"),
            "the data's own piece"
        );
        assert!(has_data(&f, 0..8 * g).expect("seek"), "the whole file");
        assert!(
            !has_data(&f, 5 * g..8 * g).expect("seek"),
            "the hole after the data"
        );
        assert!(!has_data(&f, 9 * g..10 * g).expect("seek"), "past the end");
    }

    #[test]
    fn is_all_zero_finds_one_byte_anywhere() {
        let mut data = vec![0u8; 3 * 4096 + 7];
        assert!(is_all_zero(&data));
        assert!(is_all_zero(&[]));
        for at in [0, 4095, 4096, 3 * 4096 + 6] {
            data[at] = 1;
            assert!(!is_all_zero(&data), "a byte at {at}");
            data[at] = 0;
        }
    }
}
