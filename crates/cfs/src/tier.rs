//! Wiring the object tier into a mount: the uploader runs on its own small tokio runtime, and
//! the FUSE side wakes it when a file's data changes.

use crate::cli::MountArgs;
use crate::datadir::{DataDir, TierConfig};
use anyhow::{Context, Result};
use cfs_flash::FlashDir;
use cfs_meta::MetaStore;
use cfs_tier::uploader::{UploadKick, UploadStats, Uploader};
use cfs_tier::{S3Options, StoreUrl};
use std::sync::Arc;
use std::time::Duration;

/// A running object tier.
pub struct Tier {
    kick: UploadKick,
    stats: Arc<UploadStats>,
}

impl Tier {
    pub fn hook(&self) -> cfs_fuse::DataChangeHook {
        let kick = self.kick.clone();
        Arc::new(move || kick.kick())
    }

    pub fn stats(&self) -> Arc<UploadStats> {
        Arc::clone(&self.stats)
    }
}

/// Opens the object store `cfg` names and starts the uploader.
pub fn start(
    cfg: &TierConfig,
    args: &MountArgs,
    _dir: &DataDir,
    meta: &Arc<MetaStore>,
    flash: &FlashDir,
) -> Result<Tier> {
    let url = cfg.url.as_str();
    let parsed: StoreUrl = url
        .parse()
        .with_context(|| format!("bad --object-store {url:?}"))?;
    if matches!(parsed, StoreUrl::S3 { .. })
        && (std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
            || std::env::var_os("AWS_SECRET_ACCESS_KEY").is_none())
    {
        // Without explicit credentials the S3 client would go looking for instance
        // credentials on the network; refuse instead.
        anyhow::bail!("s3:// needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment");
    }
    let opts = S3Options {
        endpoint: cfg.s3_endpoint.clone(),
        region: cfg.s3_region.clone(),
        allow_http: cfg.s3_endpoint.as_deref().map(|e| e.starts_with("http://")),
        ..S3Options::default()
    };
    let store = parsed
        .open(&opts)
        .with_context(|| format!("cannot open object store {url}"))?;
    let uploader = Uploader::new(
        Arc::clone(meta),
        flash.clone(),
        store,
        args.upload_concurrency,
    )?;
    let tier = Tier {
        kick: uploader.kick_handle(),
        stats: uploader.stats(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cfs-tier")
        .enable_all()
        .build()
        .context("cannot start the tier runtime")?;
    std::thread::Builder::new()
        .name("cfs-uploader".into())
        .spawn(move || runtime.block_on(uploader.run(Duration::from_secs(1))))?;
    tracing::info!(
        object_store = url,
        "object tier on: changed files are uploaded as 64 MiB blobs"
    );
    Ok(tier)
}
