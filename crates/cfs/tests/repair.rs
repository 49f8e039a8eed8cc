//! `cfs repair --from-s3` end to end: a filesystem written through a real mount is rebuilt
//! from its object store alone (the data dir deleted), and the rebuilt one, mounted, is the
//! same tree byte for byte, with the same modes, sizes, link counts, inode numbers, times,
//! symlinks and xattrs. A repair killed midway resumes to the same result; a damaged
//! checkpoint is refused with a clear error; a data dir in use or holding a filesystem is
//! refused; `--lazy` gives the same tree, fetched on first read. The second test does the same
//! through an S3 server (s3s-fs on loopback), after the daemon was killed rather than
//! unmounted, with every change made after the one checkpoint: only the operation log
//! shipped since brings them back.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BLOB: u64 = 64 << 20;

/// Waits until `blobs` blobs are stored, nothing is queued, and a published checkpoint
/// covers every metadata change.
fn wait_checkpointed(m: &Mount, blobs: u64) -> serde_json::Value {
    wait_for(m, "checkpoint of the flushed tree", |s| {
        u(&s["tier"]["blobs_stored"]) == blobs
            && u(&s["tier"]["files_dirty"]) == 0
            && u(&s["tier"]["deletes_pending"]) == 0
            && u(&s["uploads"]["files_in_flight"]) == 0
            && u(&s["uploads"]["checkpoints_published"]) > 0
            && s["uploads"]["checkpoint_behind"] == false
    })
}

/// Waits until `cfs status --json` satisfies `ok`, and returns it.
fn wait_for(m: &Mount, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = status(m);
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no {what}: {s:#}\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Everything `ls -lR`, `sha256sum` and `readlink` can see of one entry. Atime and ctime
/// are left out: reading the tree moves the one, and a repair cannot set the other.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    ino: u64,
    mode: u32,
    nlink: u64,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    /// sha256 of a file, target of a symlink.
    content: String,
}

fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .expect("readdir")
            .map(|e| e.expect("entry").path())
            .collect();
        names.sort();
        for p in names {
            let md = std::fs::symlink_metadata(&p).expect("lstat");
            let content = if md.file_type().is_file() {
                sha256_file(&p)
            } else if md.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .expect("readlink")
                    .to_string_lossy()
                    .into_owned()
            } else {
                String::new()
            };
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            out.insert(
                rel,
                Entry {
                    ino: md.ino(),
                    mode: md.mode(),
                    nlink: md.nlink(),
                    uid: md.uid(),
                    gid: md.gid(),
                    size: md.len(),
                    mtime: (md.mtime(), md.mtime_nsec()),
                    content,
                },
            );
            if md.file_type().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Every xattr of every entry, as `getfattr` dumps them.
fn xattrs(root: &Path) -> String {
    let out = run(Command::new("getfattr")
        .args(["-R", "-d", "-h", "-m", "-", "."])
        .current_dir(root));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes the test tree: directories, files of several sizes (empty, small, a sparse one,
/// exactly one blob, one over two blobs rewritten in its middle blob, and one cut short by
/// path), a symlink, a dangling symlink, a hard link, a fifo, xattrs, changed modes and an
/// old mtime. Returns the number of blobs the store holds for it once flushed.
fn write_tree(m: &Mount, wait_between: impl Fn(u64)) -> u64 {
    let p = |rel: &str| m.path(rel);
    for d in ["a", "a/b", "a/b/c", "empty-dir"] {
        std::fs::create_dir(p(d)).expect("mkdir");
    }
    write_synced(&p("a/empty"), b"");
    write_synced(&p("a/small"), b"hello, repair\n");
    write_synced(&p("a/b/1mib"), &noise(1, 1 << 20));
    write_synced(&p("a/b/c/exact"), &noise(2, BLOB as usize));
    {
        let f = std::fs::File::create(p("a/sparse")).expect("create");
        f.set_len(10 << 20).expect("set_len");
        f.write_all_at(b"island", 5 << 20).expect("write");
        f.sync_all().expect("fsync");
    }
    {
        // Two blobs of hole, then one with data: the holes go up as zero markers.
        let f = std::fs::File::create(p("a/holes")).expect("create");
        f.set_len(2 * BLOB + (1 << 20)).expect("set_len");
        f.write_all_at(b"island", 2 * BLOB + 5).expect("write");
        f.sync_all().expect("fsync");
    }
    let big_len = 2 * BLOB as usize + 12_345;
    write_synced(&p("big"), &noise(3, big_len));
    write_synced(&p("a/cut"), &noise(4, 100_000));
    // blobs: small, 1mib, exact, sparse, holes x3, big x3, cut (the empty file has none).
    let blobs = 11;
    wait_between(blobs);
    // A new generation of big's middle blob: the old one must go, and repair must
    // bring back the new one.
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p("big"))
            .expect("open");
        f.write_all_at(b"second generation", BLOB + 1000)
            .expect("write");
        f.sync_all().expect("fsync");
    }
    std::os::unix::fs::symlink("a/b/1mib", p("link")).expect("symlink");
    std::os::unix::fs::symlink("nowhere/at/all", p("dangling")).expect("symlink");
    std::fs::hard_link(p("a/small"), p("a/b/hard")).expect("link");
    run(Command::new("mkfifo").arg(p("a/fifo")));
    setxattr(&p("a/small"), "user.color", "blue");
    setxattr(&p("a"), "user.note", "a directory's xattr");
    setxattr(&p("big"), "user.cfs.tier", "auto");
    for (rel, mode) in [("a/b/1mib", 0o600), ("a/b/c", 0o700), ("big", 0o4755)] {
        std::fs::set_permissions(p(rel), std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    run(Command::new("touch")
        .args(["-m", "-d", "2001-02-03 04:05:06.789"])
        .arg(p("a/small")));
    // truncate(2) by path, not through a handle: the kernel sends no new mtime with it, yet
    // the file's mtime moves (it changed size), and the store must record the time the
    // mount shows.
    run(Command::new("touch")
        .args(["-m", "-d", "2001-02-03 04:05:06.789"])
        .arg(p("a/cut")));
    nix::unistd::truncate(&p("a/cut"), 1000).expect("truncate by path");
    std::fs::File::open(&m.mountpoint)
        .expect("open root")
        .sync_all()
        .expect("fsync root");
    blobs
}

/// `a/sparse` (10 MiB with 6 bytes of data) and `a/holes` (two blobs of hole, then 1 MiB
/// with 6 bytes of data) must come back as sparse as they were written: the store holds
/// `a/sparse`'s holes as zeros, and writing those would take 10 MiB of flash.
fn assert_still_sparse(m: &Mount, when: &str) {
    for rel in ["a/sparse", "a/holes"] {
        let md = std::fs::metadata(m.path(rel)).expect("stat");
        let allocated = md.blocks() * 512;
        assert!(
            allocated <= 1 << 20,
            "{when}, {rel} takes {allocated} bytes of flash for 6 bytes of data"
        );
    }
}

fn repair_cmd(bucket_url: &str, data_dir: &Path) -> Command {
    let mut c = Command::new(cfs_bin());
    c.args(["repair", "--from-s3", bucket_url, "--data-dir"])
        .arg(data_dir);
    c
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The number in "downloading N blobs" of a repair's output.
fn blobs_downloaded(text: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.split_once("cfs: downloading ")
                .and_then(|(_, rest)| rest.split(' ').next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no download count in:\n{text}"))
}

fn assert_same_tree(m: &Mount, want: &BTreeMap<String, Entry>, want_xattrs: &str) {
    let got = snapshot(&m.mountpoint);
    for (path, entry) in want {
        assert_eq!(got.get(path), Some(entry), "{path} differs after repair");
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert_eq!(xattrs(&m.mountpoint), want_xattrs);
}

#[test]
fn repair_rebuilds_the_filesystem_from_the_bucket_alone() {
    let root = scratch("repair");
    let bucket = root.path().join("bucket");
    std::fs::create_dir_all(&bucket).expect("bucket");
    let url = format!("file://{}", bucket.display());
    let mountpoint = root.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).expect("mnt");
    set_mode(&mountpoint, 0o755);
    let data = root.path().join("data");
    let mut m = Mount::start_at(
        &mountpoint,
        &data,
        &["--object-store", &url, "--checkpoint-interval", "1"],
    );
    let blobs = write_tree(&m, |blobs| {
        wait_checkpointed(&m, blobs);
    });
    let s = wait_checkpointed(&m, blobs);
    assert_eq!(u(&s["uploads"]["checkpoint_errors"]), 0, "{s:#}");
    let want = snapshot(&m.mountpoint);
    let want_xattrs = xattrs(&m.mountpoint);
    assert!(want_xattrs.contains("user.color=\"blue\""), "{want_xattrs}");
    let big_ino = want["big"].ino;
    m.unmount();
    assert!(
        m.log_text().contains("object tier: last pass done"),
        "{}",
        m.log_text()
    );
    // The bucket: the new generation of big's blob 1, not the old one; HEAD and LATEST.
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bucket.join("meta/LATEST")).expect("LATEST"))
            .expect("json");
    let fs_id = latest["fs_id"].as_str().expect("fs_id").to_string();
    let fs_dir = bucket.join(&fs_id);
    assert!(fs_dir.join(format!("blobs/{big_ino}/1/2")).is_file());
    assert!(!fs_dir.join(format!("blobs/{big_ino}/1/1")).exists());
    // a/holes' two blobs of hole are short markers, not 64 MiB of zeros each.
    let holes_ino = want["a/holes"].ino;
    for k in 0..2 {
        let object =
            std::fs::read(fs_dir.join(format!("blobs/{holes_ino}/{k}/1"))).expect("marker");
        assert_eq!(
            String::from_utf8_lossy(&object),
            format!("cfs zero blob, {BLOB} bytes\n"),
            "blob {k} of a/holes"
        );
    }
    let head: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fs_dir.join("meta/HEAD")).expect("HEAD"))
            .expect("json");
    assert_eq!(u(&head["counts"]["blobs"]), blobs, "{head:#}");

    // The node is lost.
    std::fs::remove_dir_all(&data).expect("remove the data dir");

    let new = root.path().join("new");
    let out = repair_cmd(&url, &new).output().expect("run repair");
    let text = output_text(&out);
    assert!(out.status.success(), "repair failed:\n{text}");
    assert!(
        text.contains(&format!("repaired filesystem {fs_id}")),
        "{text}"
    );
    assert_eq!(blobs_downloaded(&text), blobs, "{text}");
    assert!(!new.join("repair.incomplete").exists());
    let tier: serde_json::Value =
        serde_json::from_slice(&std::fs::read(new.join("tier.json")).expect("tier.json"))
            .expect("json");
    assert_eq!(tier["url"], url.as_str());

    // A plain mount of the new data dir finds its store in tier.json.
    let mut m = Mount::start_at(&mountpoint, &new, &[]);
    assert_same_tree(&m, &want, &want_xattrs);
    assert_still_sparse(&m, "after a repair");
    let s = status(&m);
    assert_eq!(s["fs_id"], fs_id.as_str());
    assert_eq!(
        u(&s["blobs"]["evicted"]),
        0,
        "every blob is on flash: {s:#}"
    );
    // A data dir that is mounted is refused.
    let out = repair_cmd(&url, &new).output().expect("run repair");
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("is mounted at"),
        "{}",
        output_text(&out)
    );
    m.unmount();
    // So are a data dir holding this filesystem, or another one.
    let out = repair_cmd(&url, &new).output().expect("run repair");
    assert!(
        !out.status.success() && output_text(&out).contains("already holds filesystem"),
        "{}",
        output_text(&out)
    );
    let out = repair_cmd(&url, &new)
        .args(["--fs-id", "another-fs"])
        .output()
        .expect("run repair");
    assert!(
        !out.status.success() && output_text(&out).contains("holds a different filesystem"),
        "{}",
        output_text(&out)
    );

    // Killed midway, the same command resumes, fetching only what is missing.
    let again = root.path().join("again");
    let mut child = repair_cmd(&url, &again)
        .args(["--jobs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn repair");
    let first = kill_after_progress(&mut child);
    assert!(
        again.join("repair.incomplete").is_file(),
        "the repair finished before it could be killed:\n{first}"
    );
    let out = repair_cmd(&url, &again).output().expect("run repair");
    let second = output_text(&out);
    assert!(out.status.success(), "resumed repair failed:\n{second}");
    assert!(
        second.contains("resuming the interrupted repair"),
        "{second}"
    );
    assert!(
        blobs_downloaded(&second) < blobs_downloaded(&first),
        "the resumed repair fetched everything again:\n{first}\n---\n{second}"
    );

    // --lazy: metadata only; every blob comes from the store on first read.
    let lazy = root.path().join("lazy");
    let out = repair_cmd(&url, &lazy)
        .arg("--lazy")
        .output()
        .expect("run repair");
    assert!(
        out.status.success(),
        "lazy repair failed:\n{}",
        output_text(&out)
    );
    let mut m = Mount::start_at(&mountpoint, &lazy, &[]);
    let s = status(&m);
    assert_eq!(u(&s["blobs"]["evicted"]), blobs, "{s:#}");
    // A read in the middle of a blob stored as a marker, which a ranged GET cannot serve.
    let mut middle = vec![1u8; 4096];
    std::fs::File::open(m.path("a/holes"))
        .expect("open a/holes")
        .read_exact_at(&mut middle, BLOB + (3 << 20))
        .expect("read in a blob of hole");
    assert!(middle.iter().all(|&b| b == 0));
    assert_same_tree(&m, &want, &want_xattrs);
    assert_still_sparse(&m, "after a lazy repair and a read");
    m.unmount();

    let mut m = Mount::start_at(&mountpoint, &again, &[]);
    assert_same_tree(&m, &want, &want_xattrs);
    // The rebuilt filesystem is live: a new file goes to the store and the next checkpoint.
    write_synced(&m.path("after-repair"), b"new life");
    wait_checkpointed(&m, blobs + 1);
    m.unmount();

    // A damaged checkpoint part: a clear error, and no filesystem.
    let head: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fs_dir.join("meta/HEAD")).expect("HEAD"))
            .expect("json");
    let part = fs_dir.join(format!("meta/ckpt/{}/0", u(&head["seq"])));
    let mut bytes = std::fs::read(&part).expect("part");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&part, &bytes).expect("damage the part");
    let broken = root.path().join("broken");
    let out = repair_cmd(&url, &broken).output().expect("run repair");
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "a damaged checkpoint was accepted:\n{text}"
    );
    assert!(
        text.contains("is damaged") && text.contains("meta/ckpt/"),
        "unclear error:\n{text}"
    );
    assert!(!broken.join("meta.redb").exists());
}

/// Reads a repair's output until its first progress line, then kills it with SIGKILL.
/// Returns what it printed.
fn kill_after_progress(child: &mut Child) -> String {
    let stderr = child.stderr.take().expect("stderr");
    let mut text = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("read stderr");
        text.push_str(&line);
        text.push('\n');
        if line.contains("cfs: repair: ") {
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    text
}

const ACCESS_KEY: &str = "cfs-test-access";
const SECRET_KEY: &str = "cfs-test-secret-key";

/// s3s-fs on a loopback port, killed when dropped.
struct S3sFs {
    port: u16,
    child: Child,
}

impl S3sFs {
    fn start(root: &Path, bucket: &str) -> S3sFs {
        std::fs::create_dir_all(root.join(bucket)).expect("bucket dir");
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(root.with_extension("log")).expect("log");
        let child = Command::new(tool("s3s-fs"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start s3s-fs (run scripts/install-deps)");
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = (Ipv4Addr::LOCALHOST, port).into();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3sFs { port, child }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn repair_from_an_s3_server_after_a_crash() {
    let root = scratch("repair-s3");
    let server = S3sFs::start(&root.path().join("s3"), "bucket");
    let endpoint = server.endpoint();
    let url = "s3://bucket/cfs";
    // The daemon and repair read their credentials from a profile in an AWS shared
    // credentials file, as an operator's would be (the other S3 tests use the environment).
    let creds = root.path().join("aws-credentials");
    std::fs::write(
        &creds,
        format!(
            "# test keys\n[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n\
             [cfs-test]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY} ; s3s-fs\n"
        ),
    )
    .expect("credentials file");
    // SAFETY: set before this test starts any child; the other test of this binary uses a
    // file:// store and reads none of them.
    unsafe {
        std::env::remove_var("AWS_ACCESS_KEY_ID");
        std::env::remove_var("AWS_SECRET_ACCESS_KEY");
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", &creds);
        std::env::set_var("AWS_CONFIG_FILE", root.path().join("no-such-config"));
        std::env::set_var("AWS_PROFILE", "cfs-test");
    }
    let mountpoint: PathBuf = root.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).expect("mnt");
    set_mode(&mountpoint, 0o755);
    let mut m = Mount::start_at(
        &mountpoint,
        &root.path().join("data"),
        &[
            "--object-store",
            url,
            "--s3-endpoint",
            &endpoint,
            // The first pass publishes a checkpoint (of the empty filesystem); the next is
            // an hour away, so everything below reaches the bucket through the log alone.
            "--checkpoint-interval",
            "3600",
            // Not the default, so the uploads below also prove the signed mode, and repair
            // (with the default) reads what it wrote.
            "--s3-checksum",
            "signed",
        ],
    );
    let bound: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.path().join("data/tier.json")).expect("tier.json"),
    )
    .expect("tier.json is JSON");
    assert_eq!(bound["s3_checksum"], "signed", "{bound:#}");
    wait_for(&m, "the first checkpoint", |s| {
        u(&s["uploads"]["checkpoints_published"]) == 1
    });
    std::fs::create_dir(m.path("d")).expect("mkdir");
    std::fs::create_dir(m.path("gone")).expect("mkdir");
    write_synced(&m.path("d/small"), b"small");
    write_synced(&m.path("two-blobs"), &noise(7, BLOB as usize + 4321));
    {
        // A blob of hole, then data: the hole goes up as a zero marker, through S3.
        let f = std::fs::File::create(m.path("hole-first")).expect("create");
        f.set_len(BLOB + 10).expect("set_len");
        f.write_all_at(b"data", BLOB + 2).expect("write");
        f.sync_all().expect("fsync");
    }
    write_synced(&m.path("renamed-from"), b"moves");
    write_synced(&m.path("gone/deleted"), b"deleted");
    std::os::unix::fs::symlink("d/small", m.path("s")).expect("symlink");
    setxattr(&m.path("d"), "user.k", "v");
    std::fs::rename(m.path("renamed-from"), m.path("d/renamed-to")).expect("rename");
    std::fs::remove_file(m.path("gone/deleted")).expect("unlink");
    std::fs::remove_dir(m.path("gone")).expect("rmdir");
    std::fs::hard_link(m.path("d/small"), m.path("hard")).expect("link");
    std::fs::set_permissions(m.path("two-blobs"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    std::fs::File::open(&m.mountpoint)
        .expect("open root")
        .sync_all()
        .expect("fsync root");
    let s = wait_for(&m, "the flush and the log", |s| {
        u(&s["tier"]["blobs_stored"]) == 6
            && u(&s["tier"]["files_dirty"]) == 0
            && u(&s["uploads"]["files_in_flight"]) == 0
            && u(&s["uploads"]["log_backlog_ops"]) == 0
    });
    assert_eq!(u(&s["uploads"]["checkpoints_published"]), 1, "{s:#}");
    assert!(u(&s["uploads"]["log_ops_shipped"]) > 10, "{s:#}");
    assert_eq!(u(&s["uploads"]["zero_blobs"]), 1, "{s:#}");
    let want = snapshot(&m.mountpoint);
    let want_xattrs = xattrs(&m.mountpoint);
    // A crash: no final checkpoint.
    m.kill9();

    let new = root.path().join("new");
    let out = repair_cmd(url, &new)
        .args(["--s3-endpoint", &endpoint])
        .output()
        .expect("run repair");
    let text = output_text(&out);
    assert!(out.status.success(), "repair failed:\n{text}");
    let replayed: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("cfs: ")?
                .split_once(" operation(s) logged after")?
                .0
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no replay count in:\n{text}"));
    assert!(replayed > 10, "{text}");
    let mut m = Mount::start_at(&mountpoint, &new, &[]);
    assert_same_tree(&m, &want, &want_xattrs);
    m.unmount();
    drop(server);
}
