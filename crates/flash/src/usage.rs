//! The bytes the backing files hold, as one figure shared by the evictor and `cfs status`.
//!
//! Only a scan of the flash directory knows it: writes through passthrough never reach the
//! daemon, so no counter could follow them. A scan stats every backing file, which takes
//! seconds with a million files, so its figure is reused for `SCAN_SPACING` times the scan's
//! own duration, within [`MIN_AGE`] and [`MAX_AGE`]. Measuring usage then costs about 5% of
//! a core however many files there are, and however often `cfs status` is asked.

use crate::FlashDir;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How many times its own duration a scan's figure is reused.
const SCAN_SPACING: u32 = 20;
/// A figure younger than this is always reused: a small tree scans in microseconds, and
/// nothing needs usage more often than every second.
const MIN_AGE: Duration = Duration::from_secs(1);
/// The longest a figure is reused, however long its scan took; [`FlashUsage::rescan`] forces
/// a new one sooner.
const MAX_AGE: Duration = Duration::from_secs(30);

/// One measurement of the bytes the backing files hold.
#[derive(Debug, Clone, Copy)]
struct Scan {
    started: Instant,
    took: Duration,
    used: u64,
}

/// Allocated bytes of all backing files, from a scan reused while it is fresh enough.
#[derive(Debug)]
pub struct FlashUsage {
    flash: FlashDir,
    /// The last scan. Held while scanning, so two callers at once share one scan.
    last: parking_lot::Mutex<Option<Scan>>,
    /// Set by [`FlashUsage::rescan`]: the next call scans afresh.
    stale: AtomicBool,
}

impl FlashUsage {
    pub fn new(flash: FlashDir) -> FlashUsage {
        FlashUsage {
            flash,
            last: parking_lot::Mutex::new(None),
            stale: AtomicBool::new(false),
        }
    }

    /// The flash directory this gauge scans: a running mount's, already open.
    pub fn flash(&self) -> &FlashDir {
        &self.flash
    }

    /// Bytes the backing files hold, from a scan no older than its spacing allows.
    pub fn used(&self) -> io::Result<u64> {
        let mut last = self.last.lock();
        let forced = self.stale.swap(false, Ordering::Relaxed);
        if let Some(scan) = *last
            && !forced
            && (scan.started + scan.took).elapsed()
                < (scan.took * SCAN_SPACING).clamp(MIN_AGE, MAX_AGE)
        {
            return Ok(scan.used);
        }
        let started = Instant::now();
        let used = self.flash.allocated()?;
        *last = Some(Scan {
            started,
            took: started.elapsed(),
            used,
        });
        Ok(used)
    }

    /// The next [`FlashUsage::used`] scans afresh (a writer found flash full).
    pub fn rescan(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    /// Takes `bytes`, punched out of flash after `since`, off the last figure, so that
    /// callers do not count them until the next scan. A scan that began after `since` (one
    /// `cfs status` asked for meanwhile) may have seen them gone already, so its figure is
    /// left as it is: counting punched bytes a while longer only evicts a little more,
    /// while taking them off twice could let writes past the capacity.
    pub fn freed(&self, bytes: u64, since: Instant) {
        if let Some(scan) = self.last.lock().as_mut()
            && scan.started <= since
        {
            scan.used = scan.used.saturating_sub(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_mib(flash: &FlashDir, ino: u64) {
        let f = flash.create(ino).expect("backing file");
        std::io::Write::write_all(&mut &f, &[1u8; 1 << 20]).expect("write");
        f.sync_all().expect("sync");
    }

    /// The figure is reused until its spacing has passed, `rescan` forces a new one, and
    /// `freed` lowers the kept figure, unless that scan began after the bytes were read.
    #[test]
    fn a_scan_is_reused_until_forced_and_freed_lowers_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flash = FlashDir::open(dir.path()).expect("flash");
        let usage = FlashUsage::new(flash.clone());
        assert_eq!(usage.used().expect("usage"), 0);
        write_mib(&flash, 7);
        assert_eq!(usage.used().expect("usage"), 0, "the last scan is reused");
        assert!(
            flash.allocated().expect("scan") >= 1 << 20,
            "a scan sees it"
        );
        usage.rescan();
        let seen = usage.used().expect("usage");
        assert!(seen >= 1 << 20, "a rescan sees the new file: {seen}");
        let read = Instant::now();
        usage.freed(1 << 20, read);
        assert_eq!(usage.used().expect("usage"), seen - (1 << 20));
        // Bytes punched before the kept scan began are not taken off again.
        usage.rescan();
        let rescanned = usage.used().expect("usage");
        usage.freed(1 << 20, read);
        assert_eq!(usage.used().expect("usage"), rescanned);
    }
}
