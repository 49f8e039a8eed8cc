//! Shared harness for the integration tests: real `cfs` processes mounting real FUSE
//! filesystems through the kernel. Every mount is torn down by `Drop`, even when a test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The two ways a mount serves file data: FUSE passthrough (the default), and through the
/// daemon. Tests of behaviour that must not depend on it run in both.
pub const MODES: [&[&str]; 2] = [&[], &["--no-passthrough"]];

pub fn cfs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cfs"))
}

/// A scratch directory under /var/tmp whose ancestors are world-traversable, as tests that
/// switch to unprivileged users need.
pub fn scratch(name: &str) -> tempfile::TempDir {
    let base = Path::new("/var/tmp/cfs-tests");
    std::fs::create_dir_all(base).expect("create /var/tmp/cfs-tests");
    set_mode(base, 0o755);
    let dir = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(base)
        .expect("tempdir");
    set_mode(dir.path(), 0o755);
    dir
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

pub fn is_mounted(mountpoint: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mountpoint.to_string_lossy().replace(' ', "\\040");
    text.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A running `cfs mount` in the foreground of a child process.
pub struct Mount {
    pub mountpoint: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
}

impl Mount {
    /// Mounts a filesystem whose data dir and mountpoint live in `root`.
    pub fn start(root: &Path, extra: &[&str]) -> Mount {
        let mountpoint = root.join("mnt");
        let data_dir = root.join("data");
        std::fs::create_dir_all(&mountpoint).expect("mkdir mnt");
        set_mode(&mountpoint, 0o755);
        Mount::start_at(&mountpoint, &data_dir, extra)
    }

    pub fn start_at(mountpoint: &Path, data_dir: &Path, extra: &[&str]) -> Mount {
        let mut m = Mount {
            mountpoint: mountpoint.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            log: data_dir.with_extension("log"),
            child: None,
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let child = Command::new(cfs_bin())
            .arg("mount")
            .arg(&self.mountpoint)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--allow-other")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn cfs mount");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mountpoint) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("cfs mount exited early ({status}): {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "mount did not appear: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The mount shows in /proc/mounts before the daemon has answered the kernel's INIT,
        // which is where it starts its per-mount threads (busy poll). A request waits for
        // INIT, so once this stat returns the mount is serving. (The readahead raise comes
        // just after the INIT reply; a test of it polls.)
        if let Err(e) = std::fs::metadata(&self.mountpoint) {
            panic!("stat of the new mount failed ({e}): {}", self.log_text());
        }
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// Unmounts and waits for the daemon to exit cleanly; panics if it does not.
    pub fn unmount(&mut self) {
        let out = Command::new(cfs_bin())
            .arg("umount")
            .arg(&self.mountpoint)
            .output()
            .expect("run cfs umount");
        assert!(
            out.status.success(),
            "cfs umount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(mut child) = self.child.take() {
            let status = wait_timeout(&mut child, Duration::from_secs(30))
                .expect("daemon did not exit after umount");
            assert!(
                status.success(),
                "daemon exited with {status}: {}",
                self.log_text()
            );
        }
    }

    /// Kills the daemon with SIGKILL, as a crash would, and detaches the dead mount.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        detach(&self.mountpoint);
    }

    /// Sends `signal` to the daemon and waits for it to exit; returns its exit status.
    pub fn signal_and_wait(
        &mut self,
        signal: nix::sys::signal::Signal,
    ) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal daemon");
        wait_timeout(&mut child, Duration::from_secs(30)).expect("daemon did not exit on signal")
    }

    /// Mounts the same data dir again, with the same options.
    pub fn remount(&mut self) {
        assert!(self.child.is_none(), "remount of a live mount");
        self.spawn();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.is_some() {
            detach(&self.mountpoint);
            if let Some(mut child) = self.child.take()
                && wait_timeout(&mut child, Duration::from_secs(10)).is_none()
            {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

pub fn detach(mountpoint: &Path) {
    if is_mounted(mountpoint) {
        let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Sets extended attribute `name` of `path` (not following a symlink) with `setfattr`,
/// panicking if it fails.
pub fn setxattr(path: &Path, name: &str, value: &str) {
    run(Command::new("setfattr")
        .args(["-h", "-n", name, "-v", value])
        .arg(path));
}

/// Extended attribute `name` of `path`, read with `getfattr`; `None` if it has none.
pub fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", name])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run getfattr: {e}"));
    out.status.success().then_some(out.stdout)
}

/// Finds a tool the test suite needs, with a pointer to the installer if it is missing.
pub fn tool(name: &str) -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin").join(name));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed; run scripts/install-deps"))
}

pub fn cfs(args: &[&str]) -> Output {
    Command::new(cfs_bin())
        .args(args)
        .output()
        .expect("run cfs")
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    format!("{:x}", sha2::Sha256::digest(&data))
}

/// `cfs status --json` of a running mount.
pub fn status(m: &Mount) -> serde_json::Value {
    let out = cfs(&["status", m.mountpoint.to_str().expect("utf8"), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// A status counter, 0 if absent.
pub fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Pseudo-random bytes (xorshift), so that no layer can compress or deduplicate them.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` to a new file at `path` and fsyncs it.
pub fn write_synced(path: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

/// The object `key` (`<ino>/<k>/<generation>`) of blob data in a directory object store that
/// holds one filesystem (`meta/` beside it holds the checkpoint pointer).
pub fn blob_object(store: &Path, key: &str) -> PathBuf {
    let fs_dir = std::fs::read_dir(store)
        .expect("store")
        .flatten()
        .find(|e| e.file_name() != "meta")
        .expect("fs dir")
        .path();
    fs_dir.join("blobs").join(key)
}
