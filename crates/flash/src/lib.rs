//! The flash layer: each regular file a node holds has one backing file here, with the file's
//! bytes at their true offsets, sparse where absent. FUSE passthrough hands the kernel an fd
//! of this file, so reads, writes and mmap never reach the daemon.
//!
//! Backing files are named by inode number and spread over 256 subdirectories so that no one
//! directory grows huge. They are owned by the daemon and mode 0600: all access control is on
//! the ClaudeFS inode, never on the backing file.
//!
//! The backing file of a deleted file is emptied and kept as a spare (see [`spare`]), and the
//! next create renames a spare into place instead of allocating an inode on the flash
//! filesystem: ext4 without a journal skips every inode freed in the last minutes when it
//! allocates one, which made each create under churn cost hundreds of microseconds.

mod moves;
pub mod origin;
mod prepared;
mod refill;
mod spare;
mod sparse;
mod usage;

pub use moves::{Change, FileTimes, Stat};
pub use prepared::Reserve;
pub use sparse::{has_data, is_all_zero, write_keeping_holes, write_known_zeros};
pub use usage::FlashUsage;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Inode numbers, as the metadata layer hands them out.
pub type Ino = u64;

/// The backing-file directory of one node.
#[derive(Debug, Clone)]
pub struct FlashDir {
    root: PathBuf,
    spares: std::sync::Arc<spare::Spares>,
    moves: std::sync::Arc<moves::Moves>,
    prepared: std::sync::Arc<prepared::Prepared>,
}

/// One backing file found by [`FlashDir::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackingFile {
    pub ino: Ino,
    /// Apparent size in bytes.
    pub size: u64,
    /// Bytes allocated on disk (less than `size` for sparse files).
    pub allocated: u64,
}

/// A scan result: a backing file, or the path of a file that is not one of ours.
pub type ScanEntry = Result<BackingFile, PathBuf>;

/// Capacity of the filesystem the flash directory lives on, as `statvfs` reports it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Capacity {
    pub block_size: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
    pub files: u64,
    pub files_free: u64,
}

impl FlashDir {
    /// Opens (creating if needed) the flash directory `root`.
    pub fn open(root: &Path) -> io::Result<FlashDir> {
        fs::create_dir_all(root)?;
        // The spare directory is made here with the shards, never later: a spare filler must
        // not recreate a data dir that was moved or removed under a running mount.
        let shards = (0..256u32).map(|shard| format!("{shard:02x}"));
        for name in shards.chain([spare::DIR.to_string()]) {
            let dir = root.join(name);
            if !dir.exists() {
                fs::create_dir(&dir)?;
            }
        }
        Ok(FlashDir::at(root))
    }

    /// The flash directory `root` as it is, creating nothing: for reports on a data dir no
    /// mount is using (`cfs status`), which must leave it as they found it. A shard that is
    /// missing holds no backing file to [`FlashDir::scan`].
    pub fn existing(root: &Path) -> io::Result<FlashDir> {
        if !fs::metadata(root)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(FlashDir::at(root))
    }

    fn at(root: &Path) -> FlashDir {
        let spares = std::sync::Arc::new(spare::Spares::new(root.join(spare::DIR)));
        FlashDir {
            root: root.to_path_buf(),
            prepared: std::sync::Arc::new(prepared::Prepared::new(
                root.to_path_buf(),
                std::sync::Arc::clone(&spares),
            )),
            spares,
            moves: std::sync::Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, ino: Ino) -> PathBuf {
        shard_path(&self.root, ino)
    }

    /// Makes every change to the flash filesystem durable, names included (`syncfs`): for
    /// recovery, so that the backing files it removed or cleared cannot come back after a
    /// second crash and be taken for files to create again.
    pub fn sync_everything(&self) -> io::Result<()> {
        let root = File::open(&self.root)?;
        rustix::fs::syncfs(&root)?;
        Ok(())
    }

    /// Creates the backing file of a new inode, empty, from a spare if there is one. Fails if
    /// it already exists.
    pub fn create(&self, ino: Ino) -> io::Result<File> {
        create_backing(&self.spares, &self.path(ino))
    }

    /// Keeps about `count` empty backing files ready for creates from now on, each under an
    /// inode number from `reserve`, made and opened by a background thread (see
    /// [`prepared`]). For the serving daemon, after recovery; [`FlashDir::release_prepared`]
    /// gives the unused ones back when it stops.
    pub fn prepare_for_creates(&self, count: usize, reserve: Reserve) {
        self.prepared.start(count, reserve);
    }

    /// The backing file of a new regular file and its inode number: one prepared in advance
    /// when one is ready, so no flash I/O; otherwise a number from `alloc` and a new file
    /// (see [`FlashDir::create`]). Empty, open for reading and writing.
    pub fn create_next(&self, alloc: impl FnOnce() -> Ino) -> io::Result<(Ino, File)> {
        if let Some(prepared) = self.take_prepared() {
            return Ok(prepared);
        }
        let ino = alloc();
        Ok((ino, self.create(ino)?))
    }

    /// A backing file made ready for a create, with the inode number it was made for, or
    /// `None` when none is ready.
    fn take_prepared(&self) -> Option<(Ino, File)> {
        self.prepared.take()
    }

    /// How many prepared backing files wait for creates.
    pub fn prepared_count(&self) -> usize {
        self.prepared.len()
    }

    /// Stops preparing backing files and gives the unused ones back as spares. Returns how
    /// many there were.
    pub fn release_prepared(&self) -> io::Result<usize> {
        self.prepared.release()
    }

    /// A new, empty backing file at `path` (spares included): owned by the daemon, 0600.
    pub(crate) fn create_new(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
    }

    /// Opens an existing backing file for reading and writing. The daemon always opens both
    /// ways: the kernel has already checked the caller's access mode on the ClaudeFS file, and
    /// the movers (upload, hydration, repair) need both.
    pub fn open_rw(&self, ino: Ino) -> io::Result<File> {
        open_backing(&self.path(ino))
    }

    /// Opens the backing file, creating it empty if it is missing. For an inode whose
    /// metadata is committed, a missing backing file means it was never written.
    pub fn open_or_create(&self, ino: Ino) -> io::Result<File> {
        match self.open_rw(ino) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.create(ino) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => self.open_rw(ino),
                other => other,
            },
            other => other,
        }
    }

    /// Removes the backing file of a deleted inode: it becomes an empty spare for a later
    /// create, or is unlinked when there are spares enough. Missing is fine.
    pub fn remove(&self, ino: Ino) -> io::Result<()> {
        remove_backing(&self.spares, &self.path(ino))
    }

    /// Keeps about `count` empty spares ready from now on, made by a background thread, so
    /// that creates rename one into place instead of allocating an inode of the flash
    /// filesystem on the request path (see [`spare`]). For the serving daemon; the default is
    /// none.
    pub fn keep_spares_ready(&self, count: usize) {
        self.spares.keep_ready(count);
    }

    /// How many emptied backing files wait to be reused.
    pub fn spare_count(&self) -> usize {
        self.spares.len()
    }

    /// How many spares creates have renamed into place since this process started: whether
    /// creates are using them up right now.
    pub fn spares_taken(&self) -> u64 {
        self.spares.taken()
    }

    pub fn metadata(&self, ino: Ino) -> io::Result<fs::Metadata> {
        fs::metadata(self.path(ino))
    }

    /// The backing file's attributes with the times users see: while a blob moves in or out
    /// (see [`FlashDir::keep_times`]), the times from before the move.
    pub fn stat(&self, ino: Ino) -> io::Result<Stat> {
        let path = self.path(ino);
        self.moves.stat(ino, || fs::metadata(&path))
    }

    /// Runs `op`, which moves data of `ino` in or out of `file` (its backing file), without
    /// users seeing the file's atime or mtime change, then or meanwhile: bringing a blob back
    /// or evicting it is not a change of the file.
    pub fn keep_times<R>(
        &self,
        ino: Ino,
        file: &File,
        op: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        self.moves.keep_times(ino, file, op)
    }

    /// Runs `op`, a change a user makes to `ino`'s data or times through `file` (a write
    /// the daemon serves, `utimes`, a truncation), so that a blob moving in or out meanwhile
    /// does not put back the times from before it.
    pub fn user_change<R>(
        &self,
        ino: Ino,
        file: &File,
        change: Change,
        op: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        let since = self.moves.change_begins();
        let result = op();
        // Also after a failed change, which may have landed in part.
        let recorded = self.moves.changed(ino, file, since, change);
        let value = result?;
        recorded?;
        Ok(value)
    }

    /// Every backing file present, with its size and allocated bytes. Files whose names are
    /// not ours are returned as `Err(path)` so fsck can report them.
    ///
    /// A live mount scans while files come and go (`cfs status`, the evictor), so a file
    /// removed between the listing and its `stat` is left out rather than failing the scan.
    pub fn scan(&self) -> io::Result<Vec<ScanEntry>> {
        let mut out = Vec::new();
        for shard in fs::read_dir(&self.root)? {
            let shard = shard?;
            if shard.file_name() == spare::DIR {
                continue;
            }
            if !shard.file_type()?.is_dir() {
                out.push(Err(shard.path()));
                continue;
            }
            for entry in fs::read_dir(shard.path())? {
                if let Some(found) = scan_entry(&entry?)? {
                    out.push(found);
                }
            }
        }
        Ok(out)
    }

    /// Bytes all backing files occupy on disk, summed by a [`FlashDir::scan`] now. A running
    /// mount asks its [`FlashUsage`] instead, which reuses a recent scan.
    pub fn allocated(&self) -> io::Result<u64> {
        Ok(self
            .scan()?
            .into_iter()
            .filter_map(|e| e.ok())
            .map(|b| b.allocated)
            .sum())
    }

    /// Drops `range` of the backing file from flash by punching a hole (the size stays), and
    /// puts back the file's atime and mtime: users see those times, and eviction is not a
    /// change of the file's data. Returns the bytes freed.
    pub fn punch(&self, ino: Ino, range: std::ops::Range<u64>) -> io::Result<u64> {
        let file = self.open_rw(ino)?;
        let before = file.metadata()?.blocks();
        let len = range.end.saturating_sub(range.start);
        self.keep_times(ino, &file, || sparse::punch(&file, range.start, len))?;
        let after = file.metadata()?.blocks();
        Ok(before.saturating_sub(after) * 512)
    }

    /// The capacity of the filesystem under the flash directory.
    pub fn capacity(&self) -> io::Result<Capacity> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(io::Error::from)?;
        Ok(Capacity {
            block_size: st.fragment_size() as u64,
            blocks: st.blocks() as u64,
            blocks_free: st.blocks_free() as u64,
            blocks_avail: st.blocks_available() as u64,
            files: st.files() as u64,
            files_free: st.files_free() as u64,
        })
    }
}

/// Where the backing file of `ino` lives under `root`.
fn shard_path(root: &Path, ino: Ino) -> PathBuf {
    root.join(format!("{:02x}", ino & 0xff))
        .join(format!("{ino:016x}"))
}

/// A new, empty backing file at `path`, from a spare if there is one, open for reading and
/// writing. Fails if `path` exists.
fn create_backing(spares: &std::sync::Arc<spare::Spares>, path: &Path) -> io::Result<File> {
    if spares.take_into(path)? {
        return open_backing(path);
    }
    FlashDir::create_new(path)
}

/// Opens the existing backing file at `path` for reading and writing.
fn open_backing(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// Removes the backing file at `path`: it becomes an empty spare, or is unlinked when there
/// are spares enough. Missing is fine.
fn remove_backing(spares: &spare::Spares, path: &Path) -> io::Result<()> {
    if spares.keep(path)? {
        return Ok(());
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// True if `name` is the canonical spelling of `ino`, so stray files are never mistaken
/// for backing files.
fn n_ok(name: &std::ffi::OsStr, ino: Ino) -> bool {
    name.to_str() == Some(format!("{ino:016x}").as_str())
}

/// One entry of a shard directory as [`FlashDir::scan`] reports it; `None` when the file was
/// removed after the directory was listed.
fn scan_entry(entry: &fs::DirEntry) -> io::Result<Option<ScanEntry>> {
    let name = entry.file_name();
    match name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) {
        Some(ino) if n_ok(&name, ino) => match entry.metadata() {
            Ok(md) => Ok(Some(Ok(BackingFile {
                ino,
                size: md.len(),
                allocated: md.blocks() * 512,
            }))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        },
        _ => Ok(Some(Err(entry.path()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_scan_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flash = FlashDir::open(dir.path()).expect("open");
        let f = flash.create(42).expect("create");
        f.set_len(10).expect("set_len");
        assert!(flash.create(42).is_err(), "create must be exclusive");
        fs::write(flash.root().join("00").join("junk"), b"x").expect("junk");
        let scan = flash.scan().expect("scan");
        assert!(scan.contains(&Ok(BackingFile {
            ino: 42,
            size: 10,
            allocated: 0
        })));
        assert_eq!(scan.iter().filter(|r| r.is_err()).count(), 1);
        flash.remove(42).expect("remove");
        flash.remove(42).expect("remove twice is fine");
        assert!(flash.open_rw(42).is_err());
        assert!(flash.open_or_create(42).is_ok());
    }

    #[test]
    fn a_file_removed_while_its_shard_is_listed_is_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flash = FlashDir::open(dir.path()).expect("open");
        // Inodes 0x100, 0x200, ... share shard "00".
        for k in 1..=8u64 {
            flash.create(k << 8).expect("create");
        }
        let shard = flash.root().join("00");
        let mut listing = fs::read_dir(&shard).expect("read_dir");
        // The first entry makes the listing read the whole (small) directory at once; the
        // files removed now are still in it.
        let first = listing.next().expect("an entry").expect("entry");
        for k in 1..=8u64 {
            let path = shard.join(format!("{:016x}", k << 8));
            if path != first.path() {
                fs::remove_file(path).expect("remove");
            }
        }
        let rest: Vec<fs::DirEntry> = listing.map(|e| e.expect("entry")).collect();
        assert_eq!(rest.len(), 7, "the removed files are still listed");
        for entry in &rest {
            assert_eq!(
                scan_entry(entry).expect("no error for a vanished file"),
                None
            );
        }
        assert!(matches!(scan_entry(&first), Ok(Some(Ok(_)))));
        assert_eq!(flash.scan().expect("scan").len(), 1);
    }

    #[test]
    fn deleted_backing_files_are_reused_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flash = FlashDir::open(dir.path()).expect("open");
        let f = flash.create(5).expect("create");
        f.set_len(4096).expect("set_len");
        let first = f.metadata().expect("md").ino();
        drop(f);
        flash.remove(5).expect("remove");
        assert_eq!(flash.spare_count(), 1);
        assert!(flash.open_rw(5).is_err(), "a removed backing file is gone");
        let again = flash.create(6).expect("create from a spare");
        let md = again.metadata().expect("md");
        assert_eq!((md.ino(), md.len()), (first, 0), "the spare, emptied");
        assert_eq!(flash.spare_count(), 0);
        assert!(flash.create(6).is_err(), "create stays exclusive");
        assert_eq!(
            flash.scan().expect("scan").len(),
            1,
            "spares are not backing files"
        );

        // A spare a crash left with data is emptied when the next run loads the spares.
        flash.remove(6).expect("remove");
        let spare = dir.path().join("spare").join(format!("{:016x}", 1));
        fs::write(&spare, b"left over").expect("write");
        let reopened = FlashDir::open(dir.path()).expect("open");
        assert_eq!(reopened.spare_count(), 1);
        let f = reopened.create(9).expect("create");
        assert_eq!(f.metadata().expect("md").len(), 0);
        assert!(!spare.exists());
        reopened.remove(9).expect("remove");
        assert!(
            dir.path()
                .join("spare")
                .join(format!("{:016x}", 2))
                .exists(),
            "new spares are named after the highest found"
        );
    }

    #[test]
    fn creates_take_spares_the_filler_made_in_advance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flash = FlashDir::open(dir.path()).expect("open");
        let wait_for = |want: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while flash.spare_count() < want {
                assert!(std::time::Instant::now() < deadline, "spares not made");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        // Nothing was ever deleted: the spares come from the filler, which starts at once.
        flash.keep_spares_ready(8);
        wait_for(8);
        let spare_inos: Vec<u64> = fs::read_dir(dir.path().join("spare"))
            .expect("spare dir")
            .map(|e| e.expect("entry").metadata().expect("md").ino())
            .collect();
        assert_eq!(spare_inos.len(), 8);
        // Creates use them, emptied and exclusive as ever, until a quarter is left; then the
        // filler tops them up again.
        for ino in 1..7 {
            let f = flash.create(ino).expect("create");
            let md = f.metadata().expect("md");
            assert!(spare_inos.contains(&md.ino()), "create {ino} took a spare");
            assert_eq!(md.len(), 0);
        }
        wait_for(8);
        assert!(flash.create(2).is_err(), "create stays exclusive");
        assert_eq!(
            flash.scan().expect("scan").len(),
            6,
            "spares are not backing files"
        );
    }

    #[test]
    fn creates_take_files_prepared_under_reserved_numbers_and_unused_ones_return() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let flash = FlashDir::open(dir.path()).expect("open");
        assert!(
            flash.take_prepared().is_none(),
            "nothing before preparing starts"
        );
        let next = std::sync::Arc::new(AtomicU64::new(100));
        let counter = std::sync::Arc::clone(&next);
        flash.prepare_for_creates(
            8,
            Box::new(move |n| counter.fetch_add(n, Ordering::Relaxed)),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while flash.prepared_count() < 8 {
            assert!(std::time::Instant::now() < deadline, "files not prepared");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (ino, file) = flash.take_prepared().expect("one is ready");
        assert!(
            (100..next.load(Ordering::Relaxed)).contains(&ino),
            "a reserved number: {ino}"
        );
        assert_eq!(file.metadata().expect("md").len(), 0);
        assert_eq!(
            file.metadata().expect("md").ino(),
            flash.metadata(ino).expect("at its name").ino(),
            "the open file is the one under the inode's name"
        );
        let taken: Vec<_> = (0..7)
            .map(|_| flash.take_prepared().expect("ready"))
            .collect();
        let mut inos: Vec<u64> = taken.iter().map(|t| t.0).chain([ino]).collect();
        inos.sort_unstable();
        inos.dedup();
        assert_eq!(inos.len(), 8, "every prepared file has its own number");
        // Taking the last quarter woke the thread: wait for more, then stop.
        while flash.prepared_count() == 0 {
            assert!(std::time::Instant::now() < deadline, "not topped up");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let spares = flash.spare_count();
        let unused = flash.release_prepared().expect("release");
        assert!(unused > 0);
        assert_eq!(flash.prepared_count(), 0);
        assert!(flash.take_prepared().is_none(), "nothing after release");
        assert_eq!(
            flash.spare_count(),
            spares + unused,
            "unused ones became spares"
        );
        let backing: Vec<u64> = flash
            .scan()
            .expect("scan")
            .into_iter()
            .map(|e| e.expect("ours").ino)
            .collect();
        assert_eq!(backing.len(), 8, "only the taken files stay: {backing:?}");
    }

    #[test]
    fn punch_keeps_size_times_and_data_around() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flash = FlashDir::open(dir.path()).expect("open");
        let f = flash.create(7).expect("create");
        use std::os::unix::fs::FileExt;
        let data: Vec<u8> = (0..3 * 65536u32).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&data, 0).expect("write");
        f.sync_all().expect("sync");
        let old = nix::sys::time::TimeSpec::new(1_000_000, 5);
        nix::sys::stat::futimens(&f, &old, &old).expect("utimes");
        let freed = flash.punch(7, 65536..131072).expect("punch");
        assert!(freed > 0, "punching written data frees blocks");
        let md = flash.metadata(7).expect("md");
        assert_eq!(
            (md.len(), md.mtime(), md.mtime_nsec()),
            (data.len() as u64, 1_000_000, 5)
        );
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 0).expect("read");
        assert_eq!(&back[..65536], &data[..65536]);
        assert!(back[65536..131072].iter().all(|&b| b == 0));
        assert_eq!(&back[131072..], &data[131072..]);
    }
}
