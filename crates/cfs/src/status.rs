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
    pub open_handles: Option<usize>,
    /// Object tier: what the store holds and what is still owed to it.
    pub tier: cfs_meta::TierCounts,
    /// Uploader counters since the mount started (mounted with an object store only).
    pub uploads: Option<UploadCounters>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UploadCounters {
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub objects_deleted: u64,
    pub errors: u64,
    pub files_in_flight: u64,
}

impl Status {
    pub fn collect(
        meta: &MetaStore,
        flash_root: &Path,
        live: Option<(&FsStatus, &Path)>,
        uploads: Option<&cfs_tier::uploader::UploadStats>,
    ) -> Result<Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let counts = meta.counts()?;
        let flash = FlashDir::open(flash_root)?;
        let used = flash
            .scan()?
            .into_iter()
            .filter_map(|r| r.ok())
            .map(|b| b.allocated)
            .sum();
        let cap = flash.capacity()?;
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
            open_handles: live.map(|(s, _)| s.open_handles),
            tier: meta.tier_counts()?,
            uploads: uploads.map(|u| UploadCounters {
                blobs_uploaded: u.blobs_uploaded.load(Relaxed),
                bytes_uploaded: u.bytes_uploaded.load(Relaxed),
                objects_deleted: u.objects_deleted.load(Relaxed),
                errors: u.errors.load(Relaxed),
                files_in_flight: u.files_in_flight.load(Relaxed),
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
        if let Some(n) = self.open_handles {
            println!("open files   {n}");
        }
        let t = &self.tier;
        println!(
            "object tier  {} blobs ({:.2} GiB) stored, {} files waiting for upload, {} objects waiting for delete",
            t.blobs_stored,
            gib(t.bytes_stored),
            t.files_dirty,
            t.deletes_pending
        );
        if let Some(u) = &self.uploads {
            println!(
                "uploads      {} blobs ({:.2} GiB) since mount, {} deleted, {} errors, {} files in flight",
                u.blobs_uploaded,
                gib(u.bytes_uploaded),
                u.objects_deleted,
                u.errors,
                u.files_in_flight
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
        match dir.open() {
            Ok((meta, _, _)) => Status::collect(&meta, &dir.flash_path(), None, None)?,
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
