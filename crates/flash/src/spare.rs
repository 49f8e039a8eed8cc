//! Spare backing files: the emptied backing files of deleted inodes, kept in one directory and
//! renamed into place by the next creates.
//!
//! Why: on ext4 without a journal, allocating an inode skips every free inode of the group
//! that was freed in the last minute (six while its inode-table block is dirty). Under churn,
//! such as `tar` after `rm -rf` or a build's temporary files, every create scanned thousands of
//! them: 400 to 700 µs per create against 18 µs on a quiet filesystem. A rename allocates no
//! inode. Spares are empty before they are listed, so a crash leaves at worst a spare with
//! data in it, which the next load empties.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::refill::Refill;

/// The spares' directory, beside the 256 shards.
pub(crate) const DIR: &str = "spare";

/// At most this many spares are kept; beyond, deleted backing files are unlinked. Empty files
/// cost only an inode each, and a spare's name is 8 bytes in memory.
///
/// Why so many: every backing file unlinked frees an inode that the flash filesystem's next
/// allocations (the filler's included) skip and scan past for a minute. With 16k spares, a
/// run that deleted 100k files and then created 1M ran at 2,465 creates/s against 4,400 on a
/// quiet filesystem, with the filler spending half the daemon's CPU in that scan.
const MAX: usize = 1 << 20;

/// Spares never take more than this fraction of the flash filesystem's free inodes (counted
/// when the spares are loaded), so that a small or inode-starved filesystem keeps its inodes
/// for files.
const MAX_FREE_INODE_SHARE: u64 = 16;

#[derive(Debug)]
pub(crate) struct Spares {
    dir: PathBuf,
    /// The spares' names (see [`Spares::path`]). Loaded on first use, so a process that only
    /// reads the flash directory (`cfs status`) never lists or touches the spares.
    free: Mutex<Option<Vec<u64>>>,
    /// How many spares may be kept: [`MAX`], or less on a filesystem short of inodes. Set
    /// when the spares are loaded.
    max: AtomicUsize,
    next_name: AtomicU64,
    /// Set once making a spare as an unnamed file failed for want of support (see
    /// [`Spares::make`]).
    no_tmpfile: AtomicBool,
    /// How many spares the filler keeps ready; 0 (the default) means no filler.
    ready: AtomicUsize,
    /// Spares renamed into place by creates so far.
    taken: AtomicU64,
    /// The filler thread, started by [`Spares::keep_ready`]; it ends with the last `Spares`.
    filler: Refill,
}

impl Spares {
    pub(crate) fn new(dir: PathBuf) -> Spares {
        Spares {
            dir,
            free: Mutex::new(None),
            max: AtomicUsize::new(MAX),
            next_name: AtomicU64::new(0),
            no_tmpfile: AtomicBool::new(false),
            ready: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            filler: Refill::new("cfs-spares"),
        }
    }

    /// Makes an empty spare named `name`. The file is made unnamed (`O_TMPFILE`) and then
    /// linked in, so the slow part, the flash filesystem allocating an inode, happens without
    /// the spares' directory lock. A plain create holds that lock throughout, and every
    /// create on the mount renames a spare out of this directory: on a fresh data directory,
    /// where ext4 allocation is slowest, those renames averaged 48 µs (some 16 ms) waiting for
    /// the filler, against 8 µs once it no longer held the lock. Where the flash filesystem
    /// or the kernel cannot (no `O_TMPFILE`, or `linkat` of an open file refused), spares are
    /// created in place from then on.
    fn make(&self, name: u64) -> io::Result<()> {
        let dest = self.path(name);
        if !self.no_tmpfile.load(Ordering::Relaxed) {
            match link_new_tmpfile(&self.dir, &dest) {
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    tracing::debug!("spares: unnamed files not available ({e}); creating in place");
                    self.no_tmpfile.store(true, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        crate::FlashDir::create_new(&dest).map(drop)
    }

    /// Keeps about `count` spares ready from now on: whenever a create leaves fewer than a
    /// quarter of them, a background thread creates new empty ones up to `count`. Creates then
    /// rename a spare into place even when nothing was deleted before (a fresh mount, `tar`,
    /// a build), and the inode allocation of the flash filesystem happens off the request
    /// path.
    /// The filler starts at once, so a fresh mount has them before its first create.
    pub(crate) fn keep_ready(self: &Arc<Self>, count: usize) {
        self.ready.store(count.min(MAX), Ordering::Relaxed);
        if count > 0 {
            self.wake_filler();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.with_free(|free| Ok(free.len())).unwrap_or(0)
    }

    /// How many spares creates have taken so far.
    pub(crate) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Renames a spare to `dest` (which must not exist). False if there is no spare.
    pub(crate) fn take_into(self: &Arc<Self>, dest: &Path) -> io::Result<bool> {
        loop {
            let (spare, left) = self.with_free(|free| Ok((free.pop(), free.len())))?;
            let ready = self.ready.load(Ordering::Relaxed);
            if left < ready / 4 + 1 && ready > 0 {
                self.wake_filler();
            }
            let Some(name) = spare else {
                return Ok(false);
            };
            let spare = self.path(name);
            match nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &spare,
                nix::fcntl::AT_FDCWD,
                dest,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => {
                    self.taken.fetch_add(1, Ordering::Relaxed);
                    return Ok(true);
                }
                // Someone else (fsck, an operator) removed it: try the next one.
                Err(nix::errno::Errno::ENOENT) if fs::symlink_metadata(&spare).is_err() => {}
                Err(e) => {
                    self.with_free(|free| {
                        free.push(name);
                        Ok(())
                    })?;
                    return Err(e.into());
                }
            }
        }
    }

    /// Makes `path` an empty spare. False if there are spares enough (the caller unlinks it);
    /// true also when `path` is already gone.
    pub(crate) fn keep(&self, path: &Path) -> io::Result<bool> {
        if self.with_free(|free| Ok(free.len() >= self.max.load(Ordering::Relaxed)))? {
            return Ok(false);
        }
        let name = self.next_name.fetch_add(1, Ordering::Relaxed);
        let spare = self.path(name);
        match fs::rename(path, &spare) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(e),
        }
        // Emptied outside the lock: freeing a large file's blocks takes a while.
        if let Err(e) = empty(&spare) {
            let _ = fs::remove_file(&spare);
            return Err(e);
        }
        self.with_free(|free| {
            free.push(name);
            Ok(())
        })?;
        Ok(true)
    }

    fn path(&self, name: u64) -> PathBuf {
        self.dir.join(format!("{name:016x}"))
    }

    /// Asks the filler thread (started on first use) to top the spares up.
    fn wake_filler(self: &Arc<Self>) {
        self.filler.poke(self, Spares::top_up);
    }

    /// Creates empty spares until `ready` are listed. Each one is empty before it is listed,
    /// as [`Spares::keep`] promises.
    fn top_up(&self) -> io::Result<usize> {
        let mut made = 0;
        while self.with_free(|free| Ok(free.len()))? < self.ready.load(Ordering::Relaxed) {
            let name = self.next_name.fetch_add(1, Ordering::Relaxed);
            match self.make(name) {
                Ok(()) => {}
                // Left by an operator, or a name this run already used: take the next one.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
            self.with_free(|free| {
                free.push(name);
                Ok(())
            })?;
            made += 1;
        }
        Ok(made)
    }

    fn with_free<T>(&self, f: impl FnOnce(&mut Vec<u64>) -> io::Result<T>) -> io::Result<T> {
        let mut guard = self
            .free
            .lock()
            .map_err(|_| io::Error::other("spare list lock poisoned"))?;
        if guard.is_none() {
            *guard = Some(self.load()?);
        }
        match guard.as_mut() {
            Some(free) => f(free),
            None => Err(io::Error::other("spare list not loaded")),
        }
    }

    /// Lists the spares left by earlier runs, emptying any a crash left with data, and names
    /// new ones after the highest found. Also sets how many may be kept.
    fn load(&self) -> io::Result<Vec<u64>> {
        if let Ok(st) = nix::sys::statvfs::statvfs(&self.dir) {
            let share = st.files_free() / MAX_FREE_INODE_SHARE;
            self.max.store(
                usize::try_from(share).unwrap_or(MAX).min(MAX),
                Ordering::Relaxed,
            );
        }
        let mut free = Vec::new();
        let mut highest = None;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(n) = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) else {
                continue;
            };
            if !entry.file_type()?.is_file() {
                continue;
            }
            if entry.metadata()?.len() > 0 {
                empty(&entry.path())?;
            }
            highest = highest.max(Some(n));
            free.push(n);
        }
        self.next_name
            .store(highest.map_or(0, |n| n + 1), Ordering::Relaxed);
        Ok(free)
    }
}

/// Creates an empty unnamed file (0600) on `dir`'s filesystem and links it at `dest`, which
/// must not exist. `dir` is not locked while the inode is allocated. An error of kind
/// [`io::ErrorKind::Unsupported`] means this cannot work here at all.
fn link_new_tmpfile(dir: &Path, dest: &Path) -> io::Result<()> {
    let unsupported = |e: io::Error, what: &str| {
        io::Error::new(io::ErrorKind::Unsupported, format!("{what}: {e}"))
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            // No O_TMPFILE in the filesystem, or a kernel that reads it as O_DIRECTORY.
            Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL) => unsupported(e, "O_TMPFILE"),
            _ => e,
        })?;
    nix::unistd::linkat(
        &file,
        "",
        nix::fcntl::AT_FDCWD,
        dest,
        nix::fcntl::AtFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| match e {
        // linkat of an open file refused: before Linux 6.10 it needs CAP_DAC_READ_SEARCH.
        nix::errno::Errno::EPERM | nix::errno::Errno::ENOENT => {
            unsupported(e.into(), "linkat(AT_EMPTY_PATH)")
        }
        e => e.into(),
    })
}

/// Empties a spare, and drops the origin record of the file it backed: renamed into place
/// for another file, it must not carry a create that is not that file's.
fn empty(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(0)?;
    crate::origin::clear(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_spares_are_empty_private_and_never_replace_a_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let spares = Spares::new(dir.path().join(DIR));
        fs::create_dir(dir.path().join(DIR)).expect("spare dir");
        spares.make(7).expect("make");
        let meta = fs::metadata(spares.path(7)).expect("made");
        assert_eq!(meta.len(), 0);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        fs::write(spares.path(8), b"kept").expect("write");
        let e = spares.make(8).expect_err("the name is taken");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(spares.path(8)).expect("read"), b"kept");
        // Unnamed files are the point; where the filesystem lacks them the fallback above
        // must have been taken, and nothing else may fail.
        match link_new_tmpfile(&spares.dir, &dir.path().join(DIR).join("direct")) {
            Ok(()) => assert!(!spares.no_tmpfile.load(Ordering::Relaxed)),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}"),
        }
    }

    #[test]
    fn keeps_spares_up_to_its_cap_then_lets_files_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spares = Arc::new(Spares::new(dir.path().join(DIR)));
        fs::create_dir(dir.path().join(DIR)).expect("spare dir");
        assert_eq!(spares.len(), 0);
        let max = spares.max.load(Ordering::Relaxed);
        assert!(
            max > 0 && max <= MAX,
            "the cap is set when the spares load: {max}"
        );
        spares.max.store(2, Ordering::Relaxed);
        let file = |i: u32| {
            let p = dir.path().join(format!("f{i}"));
            fs::write(&p, b"data").expect("write");
            p
        };
        assert!(spares.keep(&file(0)).expect("keep"));
        assert!(spares.keep(&file(1)).expect("keep"));
        let third = file(2);
        assert!(!spares.keep(&third).expect("keep"), "over the cap");
        assert!(third.exists(), "the caller unlinks what is not kept");
        assert_eq!(spares.len(), 2);
        let dest = dir.path().join("taken");
        assert!(spares.take_into(&dest).expect("take"));
        assert_eq!(
            fs::metadata(&dest).expect("taken").len(),
            0,
            "spares are empty"
        );
        assert_eq!(spares.len(), 1);
    }
}
