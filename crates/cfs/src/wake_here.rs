//! The kernel's `fuse` module parameter `wake_here`, turned on while ClaudeFS mounts run, and
//! given back as it was once the last of them ends.
//!
//! Some kernels, the 6.18 build of the test machines among them, have
//! `/sys/module/fuse/parameters/wake_here` (mainline Linux does not). We found no description
//! of it; it changes how the wake-ups of a FUSE round trip are scheduled (the daemon's thread
//! that a request wakes, and the caller that the reply wakes), and nothing that any test or
//! pjdfstest checks. On the 2-vCPU test machine, with `--busy-poll auto`, turning it on took
//! 5,000 creates in one directory from 9.3k–10.3k/s to 14.1k–15.7k/s, unlinks from 13.0k–13.7k/s
//! to 28.9k–29.1k/s, mkdir from 13.3k–13.9k/s to 24.2k–24.4k/s, and `tar -xf` of
//! /usr/include from 2.15–2.24 s to 1.55–1.58 s (two alternated runs of each; see
//! docs/operations.md).
//!
//! It is a setting of the whole machine, for every FUSE filesystem, so it is held rather than
//! just set: each mount daemon keeps a shared `flock` on [`HOLDERS`] while it runs, and the
//! value the machine had before the first of them is recorded in that file. The daemon that
//! ends last (its exclusive lock then succeeds) writes that value back. A daemon that dies
//! leaves its lock behind with its process, and the record stays until the next last one
//! ends, so a crash never makes ClaudeFS's value pass for the machine's own.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The parameter, under the sysfs root.
const PARAM: &str = "module/fuse/parameters/wake_here";

/// Where the holders' lock and the machine's own value live: under /run, which starts
/// empty at boot, as the parameter does.
pub const RUN_DIR: &str = "/run/cfs";

/// The file every holder keeps a shared lock on; it holds the machine's own value.
const HOLDERS: &str = "wake_here.holders";

/// Serialises taking and giving back, which each read and write [`HOLDERS`] and the
/// parameter: a holder's lock cannot be changed from shared to exclusive atomically.
const MUTEX: &str = "wake_here.lock";

/// The parameter's value under `sys`, if the kernel has it.
pub fn current(sys: &Path) -> Option<String> {
    std::fs::read_to_string(sys.join(PARAM))
        .ok()
        .map(|v| v.trim().to_string())
}

/// A mount's hold on the parameter; dropping it gives the value back if no other mount holds
/// it.
pub struct Held {
    holders: File,
    param: PathBuf,
    run_dir: PathBuf,
    /// The value before this mount took it, for the log.
    pub was: String,
    /// The machine's own value, which the last holder gives back: `was`, unless other mounts
    /// hold it or the last holder died holding it.
    pub own: String,
}

/// Turns the parameter on and holds it, if the kernel under `sys` (normally `/sys`) has it;
/// `run_dir` is normally [`RUN_DIR`]. `Ok(None)`: this kernel has no such parameter.
pub fn hold(sys: &Path, run_dir: &Path) -> std::io::Result<Option<Held>> {
    let param = sys.join(PARAM);
    let Some(current) = current(sys) else {
        return Ok(None);
    };
    std::fs::create_dir_all(run_dir)?;
    let mutex = lock_mutex(run_dir)?;
    let mut holders = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(run_dir.join(HOLDERS))?;
    let alone = try_exclusive(&holders)?;
    // A record found while no one holds the file is from a last holder that died: that
    // value, not the one it left set, is the machine's own.
    let own = match read_record(&mut holders)? {
        Some(own) => own,
        None => {
            if alone {
                holders.set_len(0)?;
                holders.seek(SeekFrom::Start(0))?;
                holders.write_all(current.as_bytes())?;
                holders.sync_all()?;
            }
            current.clone()
        }
    };
    if current != "Y" {
        std::fs::write(&param, "Y")?;
    }
    // From exclusive to shared while the mutex keeps every other taker and giver out.
    holders.lock_shared()?;
    drop(mutex);
    Ok(Some(Held {
        holders,
        param,
        run_dir: run_dir.to_path_buf(),
        was: current,
        own,
    }))
}

impl Held {
    /// Gives the machine's own value back if this is the last holder. `Ok(Some(v))`: it
    /// wrote `v` back.
    fn give_back(&mut self) -> std::io::Result<Option<String>> {
        let _mutex = lock_mutex(&self.run_dir)?;
        if !try_exclusive(&self.holders)? {
            return Ok(None);
        }
        let Some(own) = read_record(&mut self.holders)? else {
            return Ok(None);
        };
        std::fs::write(&self.param, &own)?;
        self.holders.set_len(0)?;
        Ok(Some(own))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        match self.give_back() {
            Ok(Some(v)) => {
                tracing::info!(value = %v, "gave the kernel's fuse wake_here back its own value")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                error = %e,
                param = %self.param.display(),
                "cannot give the kernel's fuse wake_here back its own value"
            ),
        }
    }
}

/// Takes (or converts to) an exclusive lock on `holders` without waiting: true if no other
/// holder has it locked.
fn try_exclusive(holders: &File) -> std::io::Result<bool> {
    match holders.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

fn lock_mutex(run_dir: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(run_dir.join(MUTEX))?;
    f.lock()?;
    Ok(f)
}

/// The machine's own value recorded in `holders`, if any.
fn read_record(holders: &mut File) -> std::io::Result<Option<String>> {
    holders.seek(SeekFrom::Start(0))?;
    let mut s = String::new();
    holders.read_to_string(&mut s)?;
    let s = s.trim();
    Ok((!s.is_empty()).then(|| s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::{HOLDERS, PARAM, hold};
    use std::path::Path;

    struct Machine {
        sys: tempfile::TempDir,
        run: tempfile::TempDir,
    }

    impl Machine {
        fn with(value: Option<&str>) -> Machine {
            let m = Machine {
                sys: tempfile::tempdir().expect("tempdir"),
                run: tempfile::tempdir().expect("tempdir"),
            };
            if let Some(v) = value {
                let p = m.sys.path().join(PARAM);
                std::fs::create_dir_all(p.parent().unwrap_or(Path::new("/"))).expect("mkdir");
                std::fs::write(p, format!("{v}\n")).expect("write");
            }
            m
        }

        fn value(&self) -> String {
            std::fs::read_to_string(self.sys.path().join(PARAM))
                .expect("read")
                .trim()
                .to_string()
        }

        fn hold(&self) -> super::Held {
            hold(self.sys.path(), self.run.path())
                .expect("hold")
                .expect("the parameter exists")
        }
    }

    #[test]
    fn a_kernel_without_it_is_left_alone() {
        let m = Machine::with(None);
        assert!(hold(m.sys.path(), m.run.path()).expect("hold").is_none());
        assert!(!m.run.path().join(HOLDERS).exists());
    }

    #[test]
    fn the_last_holder_gives_the_machines_value_back() {
        let m = Machine::with(Some("N"));
        let a = m.hold();
        assert_eq!((a.was.as_str(), a.own.as_str()), ("N", "N"));
        assert_eq!(m.value(), "Y");
        let b = m.hold();
        assert_eq!((b.was.as_str(), b.own.as_str()), ("Y", "N"));
        drop(a);
        assert_eq!(m.value(), "Y", "another mount still holds it");
        drop(b);
        assert_eq!(m.value(), "N");
        // Held again from scratch: the machine's value is read anew.
        let c = m.hold();
        assert_eq!(c.was, "N");
        drop(c);
        assert_eq!(m.value(), "N");
    }

    #[test]
    fn a_machine_that_had_it_on_keeps_it_on() {
        let m = Machine::with(Some("Y"));
        drop(m.hold());
        assert_eq!(m.value(), "Y");
    }

    #[test]
    fn a_holder_that_died_does_not_make_its_value_the_machines() {
        // What a daemon killed with SIGKILL leaves: the parameter on, the machine's value
        // recorded, and no lock (the kernel drops a dead process's locks).
        let m = Machine::with(Some("Y"));
        std::fs::write(m.run.path().join(HOLDERS), "N").expect("write");
        let a = m.hold();
        assert_eq!(
            (a.was.as_str(), a.own.as_str()),
            ("Y", "N"),
            "on, left by the dead holder; the machine's own is off"
        );
        drop(a);
        assert_eq!(m.value(), "N");
    }
}
