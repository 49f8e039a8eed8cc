//! The control socket of a running mount: `cfs status MOUNTPOINT` asks it for the live state.
//!
//! Protocol: the client sends one line (`status`), the daemon answers one line of JSON.

use crate::status::Status;
use anyhow::{Context, Result};
use cfs_fuse::Live;
use cfs_meta::MetaStore;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Serves status requests until the process exits.
pub fn serve(
    path: &Path,
    live: Arc<Live>,
    tier: Option<crate::tier::TierStats>,
    meta: Arc<MetaStore>,
    data_dir: std::path::PathBuf,
    mountpoint: std::path::PathBuf,
) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::thread::Builder::new()
        .name("cfs-control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let mut reader = BufReader::new(&stream);
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let reply = match line.trim() {
                    "status" => {
                        match Status::collect(
                            &meta,
                            &cfs_flash_dir(&data_dir),
                            Some((&live.status(), &mountpoint)),
                            tier.as_ref(),
                        ) {
                            Ok(s) => serde_json::to_string(&s)
                                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
                            Err(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
                        }
                    }
                    other => serde_json::json!({ "error": format!("unknown request {other:?}") })
                        .to_string(),
                };
                let mut w = &stream;
                let _ = writeln!(w, "{reply}");
            }
        })?;
    Ok(())
}

fn cfs_flash_dir(data_dir: &Path) -> std::path::PathBuf {
    crate::datadir::DataDir::new(data_dir).flash_path()
}

/// Asks the mount behind `path` for its status.
pub fn request_status(path: &Path) -> Result<Status> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("cannot reach the mount's control socket {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    writeln!(stream, "status")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let value: serde_json::Value =
        serde_json::from_str(&line).context("bad reply from the mount")?;
    if let Some(err) = value.get("error") {
        anyhow::bail!("the mount reported: {err}");
    }
    Ok(serde_json::from_value(value)?)
}
