//! Keeps a file's times steady while its data moves between flash and the object store.
//!
//! Punching an evicted blob out of a backing file, or writing a fetched one back, sets the
//! backing file's mtime to "now", and the mover then puts the old times back. Users must
//! never see the time in between: the kernel caches whatever a GETATTR returns for the
//! attribute timeout, so one stat in that window would show a file as changed (and make
//! `make` or `rsync` act on it) when nothing changed. Two movers of one file must not record
//! each other's transient time as "before" either.
//!
//! So a move registers the file's times first, in [`Moves`]. Readers of a backing file's
//! attributes take the registered times while a move runs, and retry a stat that a move may
//! have overlapped (a sequence number moves when any move starts or ends). A change a user
//! makes meanwhile (a write through the daemon, `utimes`) updates the registered times, so
//! the mover puts back the user's, not the old ones.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

use nix::sys::time::TimeSpec;
use parking_lot::Mutex;

use crate::Ino;

/// The user-visible times a move must not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileTimes {
    /// Seconds and nanoseconds.
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
}

impl FileTimes {
    pub fn of(md: &Metadata) -> FileTimes {
        FileTimes {
            atime: (md.atime(), md.atime_nsec()),
            mtime: (md.mtime(), md.mtime_nsec()),
        }
    }

    fn apply(&self, file: &File) -> io::Result<()> {
        let spec = |(s, ns): (i64, i64)| TimeSpec::new(s, ns);
        nix::sys::stat::futimens(file, &spec(self.atime), &spec(self.mtime))?;
        Ok(())
    }
}

/// The attributes of a backing file, with the times users must see.
#[derive(Debug, Clone)]
pub struct Stat {
    pub metadata: Metadata,
    /// The file's times, or the ones a running move will put back.
    pub times: FileTimes,
}

/// What a user's change of a file's data or times sets, for [`Moves::changed`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Change {
    pub atime: Option<(i64, i64)>,
    pub mtime: Option<(i64, i64)>,
}

impl Change {
    /// A change of the data: the mtime becomes now.
    pub fn data() -> Change {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
            .map(|t| (t.tv_sec(), t.tv_nsec()))
            .unwrap_or_default();
        Change {
            atime: None,
            mtime: Some(now),
        }
    }
}

struct Held {
    movers: usize,
    times: FileTimes,
}

#[derive(Default)]
pub(crate) struct Moves {
    /// Bumped when a move starts (after registering) and when it ends (before leaving).
    seq: AtomicU64,
    /// Moves running, so that readers skip the lock when there are none.
    active: AtomicUsize,
    held: Mutex<HashMap<Ino, Held>>,
}

impl std::fmt::Debug for Moves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moves")
            .field("active", &self.active.load(SeqCst))
            .finish()
    }
}

/// How many times a reader re-stats a file that moves keep overlapping before it settles
/// for what it saw.
const STAT_RETRIES: usize = 8;

impl Moves {
    /// Runs `op`, which changes `file`'s data without changing the file for users, and puts
    /// its times back afterwards, even if `op` fails.
    pub fn keep_times<R>(
        &self,
        ino: Ino,
        file: &File,
        op: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        {
            let mut held = self.held.lock();
            match held.get_mut(&ino) {
                // Another move is running: its record holds the times from before both.
                Some(h) => h.movers += 1,
                None => {
                    let times = FileTimes::of(&file.metadata()?);
                    held.insert(ino, Held { movers: 1, times });
                }
            }
            self.active.fetch_add(1, SeqCst);
        }
        self.seq.fetch_add(1, SeqCst);
        let result = op();
        let restored = {
            let mut held = self.held.lock();
            let restored = match held.get_mut(&ino) {
                Some(h) => {
                    // Under the lock, so that a user's change recorded meanwhile is the one
                    // put back.
                    let r = h.times.apply(file);
                    h.movers -= 1;
                    if h.movers == 0 {
                        held.remove(&ino);
                    }
                    r
                }
                None => Ok(()),
            };
            // Before the record is gone to readers that take the lock, bumped while it is
            // held: a reader that finds no record has seen this bump.
            self.seq.fetch_add(1, SeqCst);
            self.active.fetch_sub(1, SeqCst);
            restored
        };
        let value = result?;
        restored?;
        Ok(value)
    }

    /// Stats a backing file with `stat`, giving the times a running move will put back.
    pub fn stat(&self, ino: Ino, stat: impl Fn() -> io::Result<Metadata>) -> io::Result<Stat> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let before = self.seq.load(SeqCst);
            let metadata = stat()?;
            if self.active.load(SeqCst) > 0
                && let Some(h) = self.held.lock().get(&ino)
            {
                return Ok(Stat {
                    times: h.times,
                    metadata,
                });
            }
            // A move that started or ended during the stat may have shown its transient
            // times: stat again, unless moves keep coming.
            if self.seq.load(SeqCst) == before || attempt == STAT_RETRIES {
                let times = FileTimes::of(&metadata);
                return Ok(Stat { metadata, times });
            }
        }
    }

    /// The sequence number to pass to [`Moves::changed`], taken before a user's change.
    pub fn change_begins(&self) -> u64 {
        self.seq.load(SeqCst)
    }

    /// Records a user's change of `file` made since `since`: a move running or that ran
    /// meanwhile would otherwise put back the times from before the change.
    pub fn changed(&self, ino: Ino, file: &File, since: u64, change: Change) -> io::Result<()> {
        if self.active.load(SeqCst) == 0 && self.seq.load(SeqCst) == since {
            return Ok(());
        }
        let mut held = self.held.lock();
        let now = FileTimes::of(&file.metadata()?);
        let times = match held.get_mut(&ino) {
            Some(h) => {
                h.times.atime = change.atime.unwrap_or(h.times.atime);
                h.times.mtime = change.mtime.unwrap_or(h.times.mtime);
                h.times
            }
            None => FileTimes {
                atime: change.atime.unwrap_or(now.atime),
                mtime: change.mtime.unwrap_or(now.mtime),
            },
        };
        times.apply(file)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Change, FileTimes, FlashDir};
    use std::os::unix::fs::FileExt;

    const OLD: FileTimes = FileTimes {
        atime: (1_000, 1),
        mtime: (2_000, 2),
    };

    fn file_with_old_times() -> (tempfile::TempDir, FlashDir, std::fs::File) {
        let dir = tempfile::tempdir().expect("tempdir");
        let flash = FlashDir::open(dir.path()).expect("open");
        let file = flash.create(9).expect("create");
        file.write_all_at(&[7u8; 8192], 0).expect("write");
        OLD.apply(&file).expect("set times");
        (dir, flash, file)
    }

    fn times(flash: &FlashDir) -> FileTimes {
        FileTimes::of(&flash.metadata(9).expect("metadata"))
    }

    /// A stat in the middle of a move sees the times from before it, though the backing
    /// file's own mtime is the move's; afterwards the file has them back.
    #[test]
    fn a_stat_during_a_move_sees_the_times_from_before() {
        let (_dir, flash, file) = file_with_old_times();
        flash
            .keep_times(9, &file, || {
                file.write_all_at(b"moved", 0)?;
                assert_ne!(times(&flash), OLD, "the write moved the raw mtime");
                assert_eq!(flash.stat(9)?.times, OLD);
                Ok(())
            })
            .expect("move");
        assert_eq!(times(&flash), OLD);
        assert_eq!(flash.stat(9).expect("stat").times, OLD);
    }

    /// Two moves of one file that overlap both put back the times from before the first,
    /// not the transient time the second would have seen.
    #[test]
    fn overlapping_moves_put_back_the_first_times() {
        let (_dir, flash, file) = file_with_old_times();
        flash
            .keep_times(9, &file, || {
                file.write_all_at(b"first", 0)?;
                flash.keep_times(9, &file, || file.write_all_at(b"second", 4096))?;
                assert_eq!(flash.stat(9)?.times, OLD);
                Ok(())
            })
            .expect("moves");
        assert_eq!(times(&flash), OLD);
    }

    /// A user's write while a blob moves keeps its new mtime: the move puts back the
    /// user's times, not the old ones. So does a write that a whole move overlapped.
    #[test]
    fn a_users_change_during_a_move_is_kept() {
        let (_dir, flash, file) = file_with_old_times();
        flash
            .keep_times(9, &file, || {
                let since = flash.moves.change_begins();
                file.write_all_at(b"user", 100)?;
                flash.moves.changed(9, &file, since, Change::data())?;
                Ok(())
            })
            .expect("move");
        let after = times(&flash);
        assert_eq!(after.atime, OLD.atime);
        assert!(after.mtime > OLD.mtime, "{after:?}");

        let (_dir, flash, file) = file_with_old_times();
        let since = flash.moves.change_begins();
        flash
            .keep_times(9, &file, || file.write_all_at(b"user", 100))
            .expect("move");
        assert_eq!(times(&flash), OLD, "the move alone puts the old times back");
        flash
            .moves
            .changed(9, &file, since, Change::data())
            .expect("changed");
        assert!(times(&flash).mtime > OLD.mtime);
    }

    /// Explicit times a user sets during a move are the ones the file ends with.
    #[test]
    fn times_set_during_a_move_are_kept() {
        let (_dir, flash, file) = file_with_old_times();
        let set = FileTimes {
            atime: (5_000, 5),
            mtime: (6_000, 6),
        };
        flash
            .keep_times(9, &file, || {
                let since = flash.moves.change_begins();
                set.apply(&file)?;
                let change = Change {
                    atime: Some(set.atime),
                    mtime: Some(set.mtime),
                };
                flash.moves.changed(9, &file, since, change)?;
                assert_eq!(flash.stat(9)?.times, set);
                file.write_all_at(b"moved", 0)
            })
            .expect("move");
        assert_eq!(times(&flash), set);
    }

    /// With no move running, a user's change costs no extra system call and the file's own
    /// times stand.
    #[test]
    fn without_moves_stat_is_the_file_own() {
        let (_dir, flash, file) = file_with_old_times();
        let since = flash.moves.change_begins();
        file.write_all_at(b"user", 0).expect("write");
        let raw = times(&flash);
        flash
            .moves
            .changed(9, &file, since, Change::default())
            .expect("changed");
        assert_eq!(times(&flash), raw);
        assert_eq!(flash.stat(9).expect("stat").times, raw);
    }
}
