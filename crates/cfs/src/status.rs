//! `cfs status`: what a filesystem holds and how its mount is serving it.

use anyhow::{Context, Result, bail};
use cfs_flash::FlashDir;
use cfs_fuse::FsStatus;
use cfs_meta::MetaStore;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub fs_id: String,
    pub mounted_at: Option<String>,
    pub files: u64,
    pub directories: u64,
    pub inodes: u64,
    /// Sum of regular file sizes.
    pub bytes: u64,
    /// Bytes the backing files occupy on flash.
    pub flash_used_bytes: u64,
    pub flash_capacity_bytes: u64,
    pub flash_free_bytes: u64,
    pub passthrough_active: Option<bool>,
    /// The mount's busy-poll window in microseconds, 0 when it has none (a running mount
    /// only; see `cfs mount --busy-poll`).
    pub busy_poll_us: Option<u64>,
    /// The kernel's fuse `wake_here` parameter, "Y" or "N", for a running mount on a kernel
    /// that has it (see `cfs mount --wake-here`).
    #[serde(default)]
    pub fuse_wake_here: Option<String>,
    pub open_handles: Option<usize>,
    /// Deleted files whose backing files are still on flash (a running mount only): the
    /// daemon removes them once the deletion is durable, within about a second.
    #[serde(default)]
    pub deletions_pending: Option<u64>,
    /// Object tier: what the store holds and what is still owed to it.
    pub tier: cfs_meta::TierCounts,
    /// Where each blob is: dirty (changed on flash, not yet in the store), clean (in the
    /// store and on flash), evicted (in the store only).
    pub blobs: BlobStates,
    /// Uploader counters since the mount started (a running mount only).
    pub uploads: Option<UploadCounters>,
    /// Eviction, re-hydration and error counters (a running mount only).
    pub flash_tier: Option<FlashTier>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BlobStates {
    /// Blobs of the files on the upload queue (each such file counts all its blobs).
    pub dirty: u64,
    /// Files being uploaded right now.
    pub uploading_files: u64,
    pub clean: u64,
    pub evicted: u64,
    /// Bytes of the files on the upload queue: the flush backlog.
    pub backlog_bytes: u64,
    /// Seconds since the oldest file still on the upload queue was queued (0: none).
    pub oldest_unflushed_secs: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UploadCounters {
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Of the blobs uploaded, those of zeros (holes) stored as a short marker object.
    #[serde(default)]
    pub zero_blobs: u64,
    pub objects_deleted: u64,
    pub errors: u64,
    pub files_in_flight: u64,
    /// Files held back on flash for now: younger than the tiered mode's flush age, or small
    /// files waiting for a quiet moment while data keeps changing.
    pub files_held: u64,
    /// Metadata checkpoints published to the object store since the mount started (what
    /// `cfs repair --from-s3` rebuilds from), and failed attempts.
    pub checkpoints_published: u64,
    pub checkpoint_errors: u64,
    /// Seq of the newest checkpoint this mount published (0: none yet), and its age.
    pub checkpoint_seq: u64,
    pub checkpoint_age_secs: Option<u64>,
    /// Metadata changed since that checkpoint: the next one is due within the interval.
    pub checkpoint_behind: bool,
    /// The operation log shipped to the object store since the mount started, what is
    /// still to go, and failed attempts: with the newest checkpoint, what repair replays.
    #[serde(default)]
    pub log_ops_shipped: u64,
    #[serde(default)]
    pub log_segments_shipped: u64,
    #[serde(default)]
    pub log_backlog_ops: u64,
    #[serde(default)]
    pub log_errors: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FlashTier {
    /// Usage as eviction counts it (backing files against --flash-capacity, or the whole
    /// flash filesystem), and the capacity it counts against.
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub high_watermark_pct: u8,
    pub low_watermark_pct: u8,
    pub blobs_evicted: u64,
    pub bytes_evicted: u64,
    pub blobs_hydrated: u64,
    pub bytes_hydrated: u64,
    pub prefetches: u64,
    /// Blobs fetched for sequential readers of files pinned to the store (`s3`), served
    /// from memory and not written back to flash, and their bytes.
    #[serde(default)]
    pub blobs_streamed: u64,
    #[serde(default)]
    pub bytes_streamed: u64,
    /// Reads of evicted blobs served by a ranged GET of the 1 MiB pieces they touch, and
    /// the bytes those GETs fetched.
    #[serde(default)]
    pub ranged_reads: u64,
    #[serde(default)]
    pub ranged_bytes: u64,
    /// Objects that failed their checksum or length check on GET.
    pub corrupt_objects: u64,
    pub hydrate_errors: u64,
    pub evict_errors: u64,
    /// Object-store operations retried, over all kinds.
    pub retries: u64,
}

impl Status {
    pub fn collect(
        meta: &MetaStore,
        flash_root: &Path,
        live: Option<(&FsStatus, &Path)>,
        tier: Option<&crate::tier::TierStats>,
    ) -> Result<Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let counts = meta.counts()?;
        let opened;
        let (flash, used) = match tier {
            // The mount's own flash directory, not opened again. Its figure may be up to
            // 30 s old (see `FlashUsage`): a fresh scan on every call would stat every
            // backing file, seconds with a million.
            Some(t) => (t.flash_usage.flash(), t.flash_usage.used()?),
            None => {
                // As it is: a report must not make the shards that are missing.
                opened = FlashDir::existing(flash_root)
                    .with_context(|| format!("cannot read flash dir {}", flash_root.display()))?;
                (&opened, opened.allocated()?)
            }
        };
        let cap = flash.capacity()?;
        let counts_t = meta.tier_counts()?;
        let oldest = tier.map_or(0, |t| t.uploads.oldest_dirty_since.load(Relaxed));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let blobs = BlobStates {
            dirty: counts_t.blobs_dirty,
            uploading_files: tier.map_or(0, |t| t.uploads.files_in_flight.load(Relaxed)),
            clean: counts_t.blobs_stored.saturating_sub(counts_t.blobs_evicted),
            evicted: counts_t.blobs_evicted,
            backlog_bytes: counts_t.bytes_dirty,
            oldest_unflushed_secs: if oldest == 0 || counts_t.files_dirty == 0 {
                0
            } else {
                now.saturating_sub(oldest)
            },
        };
        Ok(Status {
            fs_id: meta.fs_id().to_string(),
            mounted_at: live.map(|(_, m)| m.display().to_string()),
            files: counts.files,
            directories: counts.dirs,
            inodes: counts.inodes,
            bytes: counts.bytes,
            flash_used_bytes: used,
            flash_capacity_bytes: cap.blocks * cap.block_size,
            flash_free_bytes: cap.blocks_avail * cap.block_size,
            passthrough_active: live.map(|(s, _)| s.passthrough_active),
            busy_poll_us: live.map(|(s, _)| s.busy_poll_us),
            fuse_wake_here: live.and_then(|_| crate::wake_here::current(Path::new("/sys"))),
            open_handles: live.map(|(s, _)| s.open_handles),
            deletions_pending: live.map(|(s, _)| s.deletions_pending),
            tier: counts_t,
            blobs,
            uploads: tier.map(|t| UploadCounters {
                blobs_uploaded: t.uploads.blobs_uploaded.load(Relaxed),
                bytes_uploaded: t.uploads.bytes_uploaded.load(Relaxed),
                zero_blobs: t.uploads.zero_blobs.load(Relaxed),
                objects_deleted: t.uploads.objects_deleted.load(Relaxed),
                errors: t.uploads.errors.load(Relaxed),
                files_in_flight: t.uploads.files_in_flight.load(Relaxed),
                files_held: t.uploads.files_held.load(Relaxed),
                checkpoints_published: t.uploads.checkpoints_published.load(Relaxed),
                checkpoint_errors: t.uploads.checkpoint_errors.load(Relaxed),
                checkpoint_seq: t.uploads.checkpoint_seq.load(Relaxed),
                checkpoint_age_secs: match t.uploads.checkpoint_unix.load(Relaxed) {
                    0 => None,
                    at => Some(now.saturating_sub(at)),
                },
                checkpoint_behind: t.uploads.checkpoints_published.load(Relaxed) == 0
                    || meta.change_count() > t.uploads.checkpoint_changes.load(Relaxed),
                log_ops_shipped: t.log.ops_shipped.load(Relaxed),
                log_segments_shipped: t.log.segments_shipped.load(Relaxed),
                log_backlog_ops: meta.log_backlog().unwrap_or(0),
                log_errors: t.log.errors.load(Relaxed),
            }),
            flash_tier: tier.map(|t| FlashTier {
                used_bytes: t.evict.flash_used.load(Relaxed),
                capacity_bytes: t.evict.flash_capacity.load(Relaxed),
                high_watermark_pct: t.watermarks.0,
                low_watermark_pct: t.watermarks.1,
                blobs_evicted: t.evict.blobs_evicted.load(Relaxed),
                bytes_evicted: t.evict.bytes_evicted.load(Relaxed),
                blobs_hydrated: t.hydrate.blobs_hydrated.load(Relaxed),
                bytes_hydrated: t.hydrate.bytes_hydrated.load(Relaxed),
                prefetches: t.hydrate.prefetches.load(Relaxed),
                blobs_streamed: t.hydrate.blobs_streamed.load(Relaxed),
                bytes_streamed: t.hydrate.bytes_streamed.load(Relaxed),
                ranged_reads: t.hydrate.ranged_reads.load(Relaxed),
                ranged_bytes: t.hydrate.ranged_bytes.load(Relaxed),
                corrupt_objects: t.hydrate.corrupt.load(Relaxed),
                hydrate_errors: t.hydrate.errors.load(Relaxed),
                evict_errors: t.evict.errors.load(Relaxed),
                retries: cfs_tier::RETRIES.load(Relaxed),
            }),
        })
    }

    pub fn print(&self) {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        println!("filesystem   {}", self.fs_id);
        match &self.mounted_at {
            Some(m) => println!("mounted at   {m}"),
            None => println!("mounted at   (not mounted)"),
        }
        println!(
            "files        {} ({} directories, {} inodes)",
            self.files, self.directories, self.inodes
        );
        println!("bytes        {} ({:.2} GiB)", self.bytes, gib(self.bytes));
        println!(
            "flash        {:.2} GiB used by backing files, {:.2} GiB free of {:.2} GiB",
            gib(self.flash_used_bytes),
            gib(self.flash_free_bytes),
            gib(self.flash_capacity_bytes)
        );
        match self.passthrough_active {
            Some(true) => println!("passthrough  active"),
            Some(false) => println!("passthrough  off (I/O served by the daemon)"),
            None => {}
        }
        match self.busy_poll_us {
            Some(0) => println!("busy-poll    off"),
            Some(us) => println!("busy-poll    on, {us} µs after each request"),
            None => {}
        }
        match self.fuse_wake_here.as_deref() {
            Some("Y") => println!("wake_here    on (the kernel's fuse parameter)"),
            Some(v) => println!("wake_here    {v} (the kernel's fuse parameter)"),
            None => {}
        }
        if let Some(n) = self.open_handles {
            println!("open files   {n}");
        }
        if let Some(n) = self.deletions_pending {
            println!("deleting     {n} files whose flash space is not yet freed");
        }
        let t = &self.tier;
        println!(
            "object tier  {} blobs stored ({:.2} GiB of file data), {} files waiting for upload, {} objects waiting for delete",
            t.blobs_stored,
            gib(t.bytes_stored),
            t.files_dirty,
            t.deletes_pending
        );
        let b = &self.blobs;
        println!(
            "blobs        {} dirty, {} clean, {} evicted; {} files uploading; backlog {:.2} GiB, oldest unflushed {} s",
            b.dirty,
            b.clean,
            b.evicted,
            b.uploading_files,
            gib(b.backlog_bytes),
            b.oldest_unflushed_secs
        );
        if let Some(f) = &self.flash_tier {
            println!(
                "flash tier   {:.2} of {:.2} GiB ({:.0}%), watermarks {}%/{}%; {} blobs evicted, {} hydrated ({} prefetched), {} streamed to readers, {} reads by ranged GET",
                gib(f.used_bytes),
                gib(f.capacity_bytes),
                if f.capacity_bytes > 0 {
                    f.used_bytes as f64 * 100.0 / f.capacity_bytes as f64
                } else {
                    0.0
                },
                f.high_watermark_pct,
                f.low_watermark_pct,
                f.blobs_evicted,
                f.blobs_hydrated,
                f.prefetches,
                f.blobs_streamed,
                f.ranged_reads
            );
            println!(
                "errors       {} corrupt objects, {} hydration errors, {} eviction errors, {} retries",
                f.corrupt_objects, f.hydrate_errors, f.evict_errors, f.retries
            );
        }
        if let Some(u) = &self.uploads {
            println!(
                "uploads      {} blobs ({:.2} GiB; {} of zeros, sent as markers) since mount, {} deleted, {} errors, {} files in flight",
                u.blobs_uploaded,
                gib(u.bytes_uploaded),
                u.zero_blobs,
                u.objects_deleted,
                u.errors,
                u.files_in_flight
            );
            match u.checkpoint_age_secs {
                Some(age) => println!(
                    "checkpoint   #{} in the object store, {age} s ago{}; {} published since mount, {} failed",
                    u.checkpoint_seq,
                    if u.checkpoint_behind {
                        ", newer changes pending"
                    } else {
                        ", current"
                    },
                    u.checkpoints_published,
                    u.checkpoint_errors
                ),
                None => println!(
                    "checkpoint   none published by this mount yet, {} failed",
                    u.checkpoint_errors
                ),
            }
            println!(
                "op log       {} operations in {} segments shipped since mount, {} waiting, {} errors",
                u.log_ops_shipped, u.log_segments_shipped, u.log_backlog_ops, u.log_errors
            );
        }
    }
}

/// Status of a data dir or of a mountpoint.
pub fn run(target: &Path, json: bool) -> Result<()> {
    let status = if let Some(m) = crate::mounts::mount_at(target) {
        if !m.is_cfs() {
            bail!("{} is a {} mount, not ClaudeFS", target.display(), m.fstype);
        }
        crate::control::request_status(
            &crate::datadir::DataDir::new(Path::new(&m.source)).socket_path(),
        )?
    } else {
        let dir = crate::datadir::DataDir::new(target);
        if !dir.exists() {
            bail!(
                "{} is neither a ClaudeFS mountpoint nor a data dir",
                target.display()
            );
        }
        match dir.open_meta() {
            // The metadata alone: opening the flash dir would make any shard that is missing.
            Ok((meta, _)) => Status::collect(&meta, &dir.flash_path(), None, None)?,
            // The database is locked by a running mount: ask it instead.
            Err(_) if dir.socket_path().exists() => {
                crate::control::request_status(&dir.socket_path())
                    .context("the data dir is in use, and its mount did not answer")?
            }
            Err(e) => return Err(e),
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        status.print();
    }
    Ok(())
}
