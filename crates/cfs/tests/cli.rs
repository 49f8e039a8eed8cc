//! Bad input to the CLI gets one clear line, a non-zero exit, and changes nothing.

mod common;
use common::*;
use std::path::Path;

fn stderr_line(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("cfs: error:"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one error line, got:\n{text}"
    );
    lines[0].to_string()
}

fn mount_fails(args: &[&str]) -> String {
    let out = cfs(args);
    assert!(!out.status.success(), "cfs {args:?} should fail");
    stderr_line(&out)
}

#[test]
fn missing_mountpoint_is_refused_and_creates_nothing() {
    let root = scratch("cli-missing");
    let data = root.path().join("data");
    let mnt = root.path().join("nope");
    let line = mount_fails(&[
        "mount",
        mnt.to_str().expect("utf8"),
        "--data-dir",
        data.to_str().expect("utf8"),
    ]);
    assert!(line.contains("does not exist"), "{line}");
    assert!(
        !data.exists(),
        "a failed mount must not create the data dir"
    );
}

#[test]
fn mountpoint_that_is_a_file_is_refused() {
    let root = scratch("cli-file");
    let file = root.path().join("f");
    std::fs::write(&file, b"x").expect("write");
    let data = root.path().join("data");
    let line = mount_fails(&[
        "mount",
        file.to_str().expect("utf8"),
        "--data-dir",
        data.to_str().expect("utf8"),
    ]);
    assert!(line.contains("not a directory"), "{line}");
    assert!(!data.exists());
}

#[test]
fn data_dir_that_is_a_file_is_refused() {
    let root = scratch("cli-datafile");
    let mnt = root.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let data = root.path().join("data");
    std::fs::write(&data, b"x").expect("write");
    let line = mount_fails(&[
        "mount",
        mnt.to_str().expect("utf8"),
        "--data-dir",
        data.to_str().expect("utf8"),
    ]);
    assert!(line.contains("data dir"), "{line}");
    assert!(!is_mounted(&mnt));
    assert_eq!(std::fs::read(&data).expect("read"), b"x");
}

#[test]
fn data_dir_from_another_format_is_refused() {
    let root = scratch("cli-format");
    let mnt = root.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let data = root.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("meta.redb"), vec![0x5a; 8192]).expect("write junk db");
    let line = mount_fails(&[
        "mount",
        mnt.to_str().expect("utf8"),
        "--data-dir",
        data.to_str().expect("utf8"),
    ]);
    assert!(line.contains("metadata"), "{line}");
    assert!(!is_mounted(&mnt));
    assert_eq!(
        std::fs::read(data.join("meta.redb")).expect("read"),
        vec![0x5a; 8192],
        "the data dir must be left as it was"
    );
}

#[test]
fn already_mounted_is_refused() {
    let root = scratch("cli-twice");
    let m = Mount::start(root.path(), &[]);
    let other = root.path().join("data2");
    let line = mount_fails(&[
        "mount",
        m.mountpoint.to_str().expect("utf8"),
        "--data-dir",
        other.to_str().expect("utf8"),
    ]);
    assert!(line.contains("already mounted"), "{line}");
    assert!(!other.exists());
}

#[test]
fn fsck_and_status_refuse_what_is_not_a_filesystem() {
    let root = scratch("cli-fsck");
    let line = mount_fails(&["fsck", root.path().to_str().expect("utf8")]);
    assert!(line.contains("not a ClaudeFS data dir"), "{line}");
    let line = mount_fails(&["status", root.path().to_str().expect("utf8")]);
    assert!(line.contains("neither"), "{line}");
    let line = mount_fails(&["umount", root.path().to_str().expect("utf8")]);
    assert!(line.contains("not mounted"), "{line}");
}

/// A mount whose data dir went away under it no longer looks like ClaudeFS; `cfs umount` says
/// how to detach it instead of only refusing. The metadata file is moved aside here (the
/// daemon keeps it open), not the whole data dir, which the running daemon writes into.
#[test]
fn umount_of_a_mount_whose_data_dir_is_gone_says_how_to_detach_it() {
    let root = scratch("cli-umount-gone");
    let mut m = Mount::start(root.path(), &[]);
    let meta = m.data_dir.join("meta.redb");
    let moved = root.path().join("meta.redb.moved");
    std::fs::rename(&meta, &moved).expect("move the metadata aside");
    let line = mount_fails(&["umount", m.mountpoint.to_str().expect("utf8")]);
    assert!(line.contains("umount -l"), "{line}");
    assert!(is_mounted(&m.mountpoint), "refused, so still mounted");
    std::fs::rename(&moved, &meta).expect("move the metadata back");
    m.unmount();
}

#[test]
fn fsck_refuses_a_mounted_data_dir() {
    let root = scratch("cli-fsck-mounted");
    let m = Mount::start(root.path(), &[]);
    let line = mount_fails(&["fsck", m.data_dir.to_str().expect("utf8")]);
    assert!(line.contains("in use"), "{line}");
}

#[test]
fn bad_option_values_are_refused() {
    let root = scratch("cli-opts");
    let mnt = root.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let data = root.path().join("data");
    let m = mnt.to_str().expect("utf8");
    let d = data.to_str().expect("utf8");
    mount_fails(&["mount", m, "--data-dir", d, "--threads", "0"]);
    mount_fails(&["mount", m, "--data-dir", d, "--attr-ttl=-1"]);
    let out = cfs(&["mount", m, "--data-dir", d, "--bogus"]);
    assert!(!out.status.success());
    assert!(!data.exists());
}

#[test]
fn background_mount_status_and_umount() {
    let root = scratch("cli-bg");
    let mnt = root.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let data = root.path().join("data");
    let (m, d) = (mnt.to_str().expect("utf8"), data.to_str().expect("utf8"));
    let out = cfs(&["mount", m, "--data-dir", d, "--background"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let guard = scopeguard(&mnt);
    assert!(is_mounted(&mnt));
    std::fs::write(mnt.join("f"), b"hello").expect("write");
    // The size is recorded when the kernel's RELEASE arrives, just after close returned.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let v = loop {
        let out = cfs(&["status", m, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        // Flash usage comes from a scan the mount reuses for a second or more.
        let scanned = v["flash_used_bytes"].as_u64().unwrap_or(0) >= 4096;
        if (v["bytes"] == 5 && scanned) || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(v["files"], 1);
    assert_eq!(v["bytes"], 5);
    assert_eq!(v["passthrough_active"], true);
    assert_eq!(v["deletions_pending"], 0, "nothing was deleted: {v:#}");
    assert!(
        v["flash_used_bytes"].as_u64().unwrap_or(0) >= 4096,
        "the backing file's block shows in flash usage: {v:#}"
    );
    let out = cfs(&["umount", m]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&mnt));
    drop(guard);
    let out = cfs(&["fsck", d]);
    assert!(
        out.status.success(),
        "fsck after clean umount: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = cfs(&["status", d]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not mounted"));
    let out = cfs(&["status", d, "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        v["flash_used_bytes"].as_u64().unwrap_or(0) >= 4096,
        "an unmounted data dir is scanned: {v:#}"
    );
    // A report changes nothing: a shard that is missing stays missing.
    let shard = data.join("flash").join("ab");
    std::fs::remove_dir(&shard).expect("remove an empty shard");
    let out = cfs(&["status", d, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!shard.exists(), "cfs status made a shard");
}

/// Detaches a mount made outside the `Mount` harness if the test fails midway.
struct Detach<'a>(&'a Path);
impl Drop for Detach<'_> {
    fn drop(&mut self) {
        detach(self.0);
    }
}
fn scopeguard(p: &Path) -> Detach<'_> {
    Detach(p)
}

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let root = scratch("cli-signal");
        let mut m = Mount::start(root.path(), &[]);
        std::fs::write(m.path("f"), b"kept").expect("write");
        let status = m.signal_and_wait(signal);
        assert!(
            status.success(),
            "daemon exit on {signal}: {status}\n{}",
            m.log_text()
        );
        assert!(!is_mounted(&m.mountpoint), "still mounted after {signal}");
        assert!(
            m.data_dir.join("clean").exists(),
            "clean marker after {signal}"
        );
        let out = cfs(&["fsck", m.data_dir.to_str().expect("utf8")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        m.remount();
        assert_eq!(std::fs::read(m.path("f")).expect("read"), b"kept");
    }
}
