//! The flash tier in front of an object store, end to end on real mounts: a tree larger than
//! `--flash-capacity` is evicted and read back byte for byte, a corrupt object gives `EIO`
//! (never wrong bytes) and is reported, and an S3 server (s3s-fs on loopback) that is stopped
//! under a write load loses nothing: writes go on, and the backlog drains when it is back.

mod common;
use common::*;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// Polls the mount's status until `done` holds, or panics with the last status after `secs`.
fn wait_status(m: &Mount, secs: u64, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = status(m);
        if done(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:#}\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").expect("drop caches (needs root)");
}

fn set_policy(path: &Path, policy: &str) {
    setxattr(path, "user.cfs.tier", policy);
}

/// The tier policy a file has, or `None` if it has none.
fn policy_of(path: &Path) -> Option<String> {
    getxattr(path, "user.cfs.tier").map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// A directory object store under `root` (`file://`), and its URL.
fn file_store(root: &Path) -> (PathBuf, String) {
    let store = root.join("store");
    std::fs::create_dir_all(&store).expect("store");
    let url = format!("file://{}", store.display());
    (store, url)
}

/// A mount of `root` over a fresh directory object store, and that store's directory.
fn mount_with_file_store(root: &Path) -> (Mount, PathBuf) {
    let (store, url) = file_store(root);
    (Mount::start(root, &["--object-store", &url]), store)
}

/// A mount over a fresh directory object store with `capacity` of flash, evicting from 80%
/// down to 50% of it.
fn mount_with_small_flash(root: &Path, capacity: &str) -> Mount {
    let (_store, url) = file_store(root);
    Mount::start(
        root,
        &[
            "--object-store",
            &url,
            "--flash-capacity",
            capacity,
            "--high-watermark",
            "80",
            "--low-watermark",
            "50",
        ],
    )
}

#[test]
fn tree_larger_than_flash_capacity_is_evicted_and_read_back() {
    let root = scratch("evict-tree");
    // 420 MiB of data through 192 MiB of flash.
    let mut m = mount_with_small_flash(root.path(), "192M");
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    std::fs::create_dir(m.path("tree")).expect("mkdir");
    for i in 0..8u64 {
        let data = noise(i + 1, 40 * MIB + i as usize * 4099);
        let p = m.path(&format!("tree/f{i}"));
        write_synced(&p, &data);
        files.push((p, sha256(&data)));
    }
    let big = noise(99, 100 * MIB + 12345);
    let p = m.path("tree/big");
    write_synced(&p, &big);
    files.push((p, sha256(&big)));
    drop(big);

    let capacity = 192 * MIB as u64;
    wait_status(
        &m,
        180,
        "flush and eviction under the high watermark",
        |s| {
            u(&s["tier"]["files_dirty"]) == 0
                && u(&s["blobs"]["evicted"]) > 0
                && u(&s["flash_tier"]["used_bytes"]) <= capacity * 80 / 100
        },
    );

    drop_caches();
    for (p, want) in &files {
        let data = std::fs::read(p).expect("read back");
        assert_eq!(
            &sha256(&data),
            want,
            "{} differs after eviction",
            p.display()
        );
    }
    let s = status(&m);
    assert!(u(&s["flash_tier"]["blobs_hydrated"]) > 0, "{s:#}");
    assert_eq!(u(&s["flash_tier"]["corrupt_objects"]), 0, "{s:#}");

    // The blob states survive a remount.
    m.unmount();
    m.remount();
    drop_caches();
    for (p, want) in &files {
        let data = std::fs::read(p).expect("read back after remount");
        assert_eq!(
            &sha256(&data),
            want,
            "{} differs after remount",
            p.display()
        );
    }
    m.unmount();
}

/// The kernel keeps attributes for the attribute TTL (an hour by default), so the daemon must
/// tell it when eviction changes a file's block count: `du` of a file pushed out of flash
/// shows it gone at once, with no cache dropped.
#[test]
fn eviction_shows_in_the_block_count_the_kernel_caches() {
    use std::os::unix::fs::MetadataExt;
    let root = scratch("evict-blocks");
    let mut m = mount_with_small_flash(root.path(), "160M");
    let cold = m.path("cold");
    write_synced(&cold, &noise(11, 64 * MIB));
    wait_status(&m, 120, "the first file uploaded", |s| {
        u(&s["tier"]["files_dirty"]) == 0
    });
    // Fetched now, and cached by the kernel from here on.
    let before = std::fs::metadata(&cold).expect("stat").blocks() * 512;
    assert!(before >= 64 * MIB as u64, "{before} bytes allocated");
    // A second file takes flash over the high watermark: the first, colder one leaves it.
    write_synced(&m.path("hot"), &noise(12, 72 * MIB));
    wait_status(&m, 120, "a blob evicted", |s| {
        u(&s["blobs"]["evicted"]) >= 1
    });
    // Metadata marks a blob evicted just before its hole is punched. Without the daemon's
    // invalidation the kernel went on showing the old count for 24 s here, and could for up
    // to the TTL.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = std::fs::metadata(&cold).expect("stat").blocks() * 512;
        if now < MIB as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stat still shows {now} bytes allocated after eviction: {:#}\n{}",
            status(&m),
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    m.unmount();
}

#[test]
fn evicted_file_reads_writes_and_truncates_like_any_other() {
    let root = scratch("evict-rw");
    let (mut m, _store) = mount_with_file_store(root.path());
    let mut want = noise(7, 150 * MIB + 77);
    let p = m.path("f");
    write_synced(&p, &want);
    // The kernel may still cache attributes from before the last passthrough write: drop
    // its caches so that both reads below come from the daemon.
    drop_caches();
    let before = std::fs::metadata(&p).expect("stat");
    set_policy(&p, "s3");
    drop_caches();
    // setxattr changes ctime; eviction (before or after this read) must not.
    let before_ctime = std::fs::metadata(&p).expect("stat");
    wait_status(&m, 120, "the file evicted", |s| {
        u(&s["tier"]["files_dirty"]) == 0 && u(&s["blobs"]["evicted"]) == 3
    });
    // Eviction is not a change: size and times stay.
    drop_caches();
    let after = std::fs::metadata(&p).expect("stat");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (after.len(), after.mtime(), after.mtime_nsec()),
        (before.len(), before.mtime(), before.mtime_nsec())
    );
    // The kernel may show its own ctime for the setxattr (taken after the daemon's), so the
    // check is that eviction did not move ctime forward.
    assert!(
        (after.ctime(), after.ctime_nsec()) <= (before_ctime.ctime(), before_ctime.ctime_nsec()),
        "eviction moved ctime"
    );
    assert!((after.ctime(), after.ctime_nsec()) >= (before.mtime(), before.mtime_nsec()));

    // A 4 KiB read in the middle costs one ranged GET of the 1 MiB piece it falls in, not
    // a blob, let alone the file.
    let read_at = |at: usize, len: usize| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&p).expect("open");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, at as u64).expect("read");
        assert!(buf[..] == want[at..at + len], "bytes at {at} differ");
    };
    drop_caches();
    read_at(100 * MIB + 12_345, 4096);
    let s = status(&m);
    assert_eq!(u(&s["flash_tier"]["ranged_reads"]), 1, "{s:#}");
    assert_eq!(u(&s["flash_tier"]["ranged_bytes"]), MIB as u64, "{s:#}");
    assert_eq!(u(&s["flash_tier"]["blobs_hydrated"]), 0, "{s:#}");
    // Read in part a second time, the blob comes back whole, in the background; the file's
    // other blobs stay in the store.
    drop_caches();
    read_at(80 * MIB + 999, 8192);
    wait_status(&m, 60, "the twice-read blob back on flash", |s| {
        u(&s["flash_tier"]["blobs_hydrated"]) == 1 && u(&s["blobs"]["evicted"]) == 2
    });
    let s = status(&m);
    assert_eq!(u(&s["flash_tier"]["ranged_reads"]), 2, "{s:#}");
    drop_caches();
    read_at(64 * MIB, 3 * MIB);

    // Overwrite in an evicted blob, then cut the file inside another evicted blob.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open for write");
        f.write_all_at(b"overwritten", 10 * MIB as u64)
            .expect("write");
        f.sync_all().expect("fsync");
    }
    want[10 * MIB..10 * MIB + 11].copy_from_slice(b"overwritten");
    let cut = 130 * MIB + 5;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("open")
        .set_len(cut as u64)
        .expect("truncate");
    want.truncate(cut);
    wait_status(&m, 120, "evicted again", |s| {
        u(&s["tier"]["files_dirty"]) == 0 && u(&s["blobs"]["evicted"]) == 3
    });
    drop_caches();
    let before = status(&m);
    let data = std::fs::read(&p).expect("read");
    assert_eq!(data.len(), want.len());
    assert!(data == want, "content differs after write and truncate");
    // Pinned to the store, the file is read from it without coming back onto flash.
    let s = status(&m);
    let counter = |s: &serde_json::Value, name: &str| u(&s["flash_tier"][name]);
    assert!(
        counter(&s, "blobs_streamed") >= counter(&before, "blobs_streamed") + 3,
        "{s:#}"
    );
    assert_eq!(
        counter(&s, "blobs_hydrated"),
        counter(&before, "blobs_hydrated"),
        "{s:#}"
    );
    assert_eq!(u(&s["blobs"]["evicted"]), 3, "{s:#}");

    // Holes are not reported where evicted data is (cp, tar --sparse rely on SEEK_DATA).
    wait_status(&m, 120, "evicted again", |s| u(&s["blobs"]["evicted"]) == 3);
    let copy = root.path().join("copy");
    let out = run(Command::new("cp").arg("--sparse=always").arg(&p).arg(&copy));
    assert!(out.status.success());
    assert!(std::fs::read(&copy).expect("copy") == want, "cp lost data");

    // A policy set on a directory is inherited by what is created in it; bad values are
    // refused.
    std::fs::create_dir(m.path("pinned")).expect("mkdir");
    set_policy(&m.path("pinned"), "flash");
    let q = m.path("pinned/file");
    write_synced(&q, &noise(8, 3 * MIB));
    assert_eq!(policy_of(&q).as_deref(), Some("flash"));
    let out = Command::new("setfattr")
        .args(["-n", "user.cfs.tier", "-v", "tape"])
        .arg(&q)
        .output()
        .expect("setfattr");
    assert!(!out.status.success(), "an unknown policy is refused");
    m.unmount();
}

#[test]
fn corrupt_object_gives_eio_and_is_reported() {
    let root = scratch("evict-corrupt");
    let (mut m, store) = mount_with_file_store(root.path());
    let data = noise(3, 3 * MIB);
    let p = m.path("f");
    write_synced(&p, &data);
    set_policy(&p, "s3");
    wait_status(&m, 120, "the file evicted", |s| {
        u(&s["blobs"]["evicted"]) == 1
    });
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).expect("stat"));
    let object = blob_object(&store, &format!("{ino}/0/1"));
    let good = std::fs::read(&object).expect("object");
    assert_eq!(good, data, "the object holds the blob");

    // One flipped bit.
    let mut bad = good.clone();
    bad[MIB + 3] ^= 0x10;
    std::fs::write(&object, &bad).expect("corrupt");
    drop_caches();
    // A random read of the damaged piece fails; one of a sound piece of the same object is
    // served, checked against that piece's own checksum.
    let pread = |at: u64| {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 4096];
        std::fs::File::open(&p)
            .expect("open")
            .read_exact_at(&mut buf, at)
            .map(|()| buf)
    };
    let err = pread(MIB as u64 + 100).expect_err("a damaged piece must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let at = 2 * MIB + 5;
    assert!(pread(at as u64).expect("a sound piece") == data[at..at + 4096]);
    drop_caches();
    let err = std::fs::read(&p).expect_err("a corrupt object must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // A short object.
    std::fs::write(&object, &good[..MIB]).expect("truncate object");
    let err = std::fs::read(&p).expect_err("a short object must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let s = status(&m);
    assert!(u(&s["flash_tier"]["corrupt_objects"]) >= 3, "{s:#}");
    assert!(
        m.log_text().contains("corrupt object"),
        "the log names the corrupt object"
    );

    // Once the object is good again, the file reads correctly.
    std::fs::write(&object, &good).expect("restore");
    assert!(std::fs::read(&p).expect("read") == data);
    m.unmount();
}

const ACCESS_KEY: &str = "cfs-test-access";
const SECRET_KEY: &str = "cfs-test-secret-key";

/// An s3s-fs server on a fixed loopback port and directory, so it can be stopped and started
/// again as the same store.
struct S3sFs {
    port: u16,
    root: PathBuf,
    child: Option<Child>,
}

impl S3sFs {
    fn new(root: PathBuf, bucket: &str) -> S3sFs {
        std::fs::create_dir_all(root.join(bucket)).expect("bucket dir");
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("free port");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        let mut s = S3sFs {
            port,
            root,
            child: None,
        };
        s.start();
        s
    }

    fn start(&mut self) {
        let bin = tool("s3s-fs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.with_extension("log"))
            .expect("log");
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start s3s-fs (run scripts/install-deps)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = (Ipv4Addr::LOCALHOST, self.port).into();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops (`SIGSTOP`) or continues (`SIGCONT`) the server: while stopped it still takes
    /// connections, in the kernel's backlog, but answers nothing, like a store that hangs.
    fn signal(&self, sig: libc::c_int) {
        let child = self.child.as_ref().expect("server running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid, which `wait` has not reaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {sig}");
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn directory_policy_reaches_the_files_already_under_it() {
    let root = scratch("evict-dir-policy");
    let (mut m, _store) = mount_with_file_store(root.path());
    std::fs::create_dir_all(m.path("archive/sub")).expect("mkdir");
    let mut files = Vec::new();
    for (i, name) in ["archive/a", "archive/sub/b", "archive/sub/c"]
        .iter()
        .enumerate()
    {
        let data = noise(40 + i as u64, MIB + i * 777);
        write_synced(&m.path(name), &data);
        files.push((m.path(name), sha256(&data)));
    }
    std::os::unix::fs::symlink("a", m.path("archive/link")).expect("symlink");
    wait_status(&m, 120, "the files uploaded", |s| {
        u(&s["tier"]["files_dirty"]) == 0 && u(&s["blobs"]["evicted"]) == 0
    });

    // Pushing the directory out pushes out what it already holds, subdirectories included.
    set_policy(&m.path("archive"), "s3");
    wait_status(&m, 120, "the files under the directory evicted", |s| {
        u(&s["blobs"]["evicted"]) == 3
    });
    assert_eq!(policy_of(&m.path("archive/sub")).as_deref(), Some("s3"));
    assert_eq!(policy_of(&m.path("archive/sub/c")).as_deref(), Some("s3"));
    drop_caches();
    for (p, want) in &files {
        let data = std::fs::read(p).expect("read back");
        assert_eq!(&sha256(&data), want, "{} differs", p.display());
    }

    // A user's walk reaches only what that user owns.
    std::fs::create_dir(m.path("shared")).expect("mkdir");
    write_synced(&m.path("shared/theirs"), b"root's");
    write_synced(&m.path("shared/mine"), b"user's");
    for p in ["shared", "shared/mine"] {
        std::os::unix::fs::chown(m.path(p), Some(1000), Some(1000)).expect("chown");
    }
    let out = run(Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "setfattr"])
        .args(["-n", "user.cfs.tier", "-v", "flash"])
        .arg(m.path("shared")));
    assert!(
        out.status.success(),
        "setfattr as the owner: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(policy_of(&m.path("shared/mine")).as_deref(), Some("flash"));
    assert_eq!(policy_of(&m.path("shared/theirs")), None);
    m.unmount();
}

/// Mounts a filesystem in `root` whose object store is `server`'s bucket.
fn mount_on(server: &S3sFs, root: &Path, extra: &[&str]) -> Mount {
    let mountpoint = root.join("mnt");
    std::fs::create_dir_all(&mountpoint).expect("mnt");
    // The daemon reads its credentials from the environment it is started with.
    // SAFETY: set before this test starts its daemon; every test of this binary that reads
    // them wants these same values.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    }
    let endpoint = server.endpoint();
    let mut args = vec![
        "--object-store",
        "s3://bucket/cfs",
        "--s3-endpoint",
        endpoint.as_str(),
        "--s3-region",
        "us-east-1",
    ];
    args.extend_from_slice(extra);
    Mount::start_at(&mountpoint, &root.join("data"), &args)
}

#[test]
fn s3_outage_under_write_load_loses_nothing() {
    let root = scratch("evict-outage");
    let mut server = S3sFs::new(root.path().join("s3"), "bucket");
    let mut m = mount_on(&server, root.path(), &[]);
    let mut files = Vec::new();
    let mut write = |i: u64| {
        let data = noise(1000 + i, 4 * MIB + i as usize * 517);
        let p = m.path(&format!("f{i}"));
        write_synced(&p, &data);
        files.push((p, sha256(&data)));
    };
    for i in 0..5 {
        write(i);
    }
    wait_status(&m, 120, "the first files flushed", |s| {
        u(&s["tier"]["files_dirty"]) == 0
    });

    server.stop();
    let started = Instant::now();
    for i in 5..25 {
        write(i);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "writes waited for the store: {took:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let s = status(&m);
    assert!(
        u(&s["tier"]["files_dirty"]) > 0,
        "a backlog while the store is down: {s:#}"
    );
    assert!(u(&s["blobs"]["backlog_bytes"]) > 0, "{s:#}");

    server.start();
    wait_status(&m, 240, "the backlog drained", |s| {
        u(&s["tier"]["files_dirty"]) == 0 && u(&s["uploads"]["files_in_flight"]) == 0
    });
    // Everything comes back from the server itself.
    for (p, _) in &files {
        set_policy(p, "s3");
    }
    wait_status(&m, 120, "every file evicted", |s| {
        u(&s["blobs"]["evicted"]) == 25 && u(&s["blobs"]["clean"]) == 0
    });
    drop_caches();
    for (p, want) in &files {
        let data = std::fs::read(p).expect("read back");
        assert_eq!(&sha256(&data), want, "{} differs", p.display());
    }
    m.unmount();
}

#[test]
fn full_flash_with_the_store_down_gives_enospc_and_recovers() {
    let root = scratch("evict-enospc");
    let mut server = S3sFs::new(root.path().join("s3"), "bucket");
    let mut m = mount_on(&server, root.path(), &["--flash-capacity", "24M"]);
    let mut files = Vec::new();
    let first = noise(1, 8 * MIB);
    write_synced(&m.path("f0"), &first);
    files.push((m.path("f0"), sha256(&first)));
    wait_status(&m, 120, "the first file flushed", |s| {
        u(&s["tier"]["files_dirty"]) == 0
    });

    server.stop();
    let mut enospc = false;
    for i in 1..12u64 {
        // Usage is measured about once a second; the cap may be passed by that much.
        std::thread::sleep(Duration::from_millis(1500));
        let data = noise(i + 1, 8 * MIB);
        let p = m.path(&format!("f{i}"));
        match std::fs::File::create(&p) {
            Ok(mut f) => {
                f.write_all(&data).expect("write after an admitted create");
                f.sync_all().expect("fsync");
                files.push((p, sha256(&data)));
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                enospc = true;
                break;
            }
        }
    }
    assert!(enospc, "flash full with the store down must give ENOSPC");

    // With the store back, the backlog drains, clean blobs go, and writes are admitted.
    server.start();
    let deadline = Instant::now() + Duration::from_secs(180);
    let data = noise(77, MIB);
    loop {
        match std::fs::File::create(m.path("after")) {
            Ok(mut f) => {
                f.write_all(&data).expect("write");
                f.sync_all().expect("fsync");
                break;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                assert!(
                    Instant::now() < deadline,
                    "still ENOSPC with the store back"
                );
            }
        }
    }
    files.push((m.path("after"), sha256(&data)));
    drop_caches();
    for (p, want) in &files {
        let got = std::fs::read(p).expect("read back");
        assert_eq!(&sha256(&got), want, "{} differs", p.display());
    }
    m.unmount();
}

/// Without passthrough every write reaches the daemon, so the cap holds for a handle opened
/// while there was room: its writes wait for room like a create and, with the store down,
/// fail with `ENOSPC`. Nothing written before is lost.
#[test]
fn full_flash_stops_writes_through_an_open_handle_without_passthrough() {
    let root = scratch("evict-enospc-open");
    let mut server = S3sFs::new(root.path().join("s3"), "bucket");
    let mut m = mount_on(
        &server,
        root.path(),
        &["--no-passthrough", "--flash-capacity", "24M"],
    );
    let p = m.path("f");
    let mut f = std::fs::File::create(&p).expect("create with room");
    server.stop();
    let mut written = Vec::new();
    let err = loop {
        let chunk = noise(written.len() as u64 + 1, MIB);
        match f.write_all(&chunk).and_then(|()| f.sync_data()) {
            Ok(()) => written.extend_from_slice(&chunk),
            Err(e) => break e,
        }
        assert!(
            written.len() <= 64 * MIB,
            "64 MiB written through 24 MiB of flash with the store down"
        );
        // Usage is measured about once a second.
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);
    server.start();
    let got = std::fs::read(&p).expect("read back");
    assert!(
        got.len() >= written.len() && got[..written.len()] == written[..],
        "what was written before ENOSPC is intact"
    );
    m.unmount();
}

/// A seeded xorshift, for the random operations below; the seed is printed for replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn random_operations_across_evictions_match_a_model() {
    use std::os::unix::fs::FileExt;
    let seed: u64 = std::env::var("CFS_EVICT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x05ee_dcf5);
    eprintln!(
        "random operations across evictions: seed {seed} (replay with CFS_EVICT_SEED={seed})"
    );
    let mut rng = Rng(seed | 1);
    let root = scratch("evict-model");
    let (mut m, _store) = mount_with_file_store(root.path());
    set_policy(&m.mountpoint, "s3");
    let p = m.path("f");
    let max = 150 * MIB as u64;
    let mut model = noise(seed, 100 * MIB);
    write_synced(&p, &model);
    for cycle in 0..6 {
        wait_status(&m, 180, "everything flushed and evicted", |s| {
            u(&s["tier"]["files_dirty"]) == 0
                && u(&s["uploads"]["files_in_flight"]) == 0
                && u(&s["blobs"]["clean"]) == 0
        });
        drop_caches();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .expect("open cold");
        for step in 0..30 {
            let what = rng.below(10);
            let ctx = format!("cycle {cycle} step {step} op {what} (seed {seed})");
            match what {
                0..=3 => {
                    let off = rng.below(max);
                    let len = 1 + rng.below(256 << 10) as usize;
                    let data = noise(rng.next(), len);
                    f.write_all_at(&data, off).expect(&ctx);
                    let end = off as usize + len;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].copy_from_slice(&data);
                }
                4..=6 => {
                    let off = rng.below(model.len() as u64 + 4096) as usize;
                    let len = 1 + rng.below(512 << 10) as usize;
                    let mut buf = vec![0u8; len];
                    let n = f.read_at(&mut buf, off as u64).expect(&ctx);
                    let want_end = (off + len).min(model.len()).max(off);
                    assert_eq!(n, want_end - off, "{ctx}: short read");
                    assert!(buf[..n] == model[off..want_end], "{ctx}: read differs");
                }
                7 => {
                    let size = rng.below(max) as usize;
                    f.set_len(size as u64).expect(&ctx);
                    model.resize(size, 0);
                }
                _ => {
                    let off = rng.below(model.len() as u64 + 1);
                    let len = 1 + rng.below(8 << 20);
                    // SAFETY: a plain syscall on an fd this test owns; no memory is passed.
                    let r = unsafe {
                        libc::fallocate(
                            std::os::fd::AsRawFd::as_raw_fd(&f),
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            off as i64,
                            len as i64,
                        )
                    };
                    assert_eq!(
                        r,
                        0,
                        "{ctx}: punch hole: {}",
                        std::io::Error::last_os_error()
                    );
                    let start = (off as usize).min(model.len());
                    let end = ((off + len) as usize).min(model.len());
                    model[start..end].fill(0);
                }
            }
        }
        f.sync_all().expect("fsync");
        drop(f);
    }
    drop_caches();
    let got = std::fs::read(&p).expect("read all");
    assert_eq!(got.len(), model.len(), "size (seed {seed})");
    assert!(got == model, "content differs at the end (seed {seed})");
    let s = status(&m);
    assert!(u(&s["flash_tier"]["blobs_hydrated"]) > 0, "{s:#}");
    m.unmount();
}

/// `std::fs::write` over an evicted file (open with O_TRUNC, then the same number of bytes):
/// the new bytes must reach the store, in both data-path modes.
#[test]
fn same_size_rewrite_of_an_evicted_file_is_uploaded() {
    for (name, mode) in [("pt", &[][..]), ("nopt", &["--no-passthrough"][..])] {
        let root = scratch(&format!("evict-rewrite-{name}"));
        let (_store, url) = file_store(root.path());
        let mut args = vec!["--object-store", url.as_str()];
        args.extend_from_slice(mode);
        let mut m = Mount::start(root.path(), &args);
        set_policy(&m.mountpoint, "s3");
        let p = m.path("f");
        let evicted = |m: &Mount| {
            wait_status(m, 120, "flushed and evicted", |s| {
                u(&s["tier"]["files_dirty"]) == 0
                    && u(&s["uploads"]["files_in_flight"]) == 0
                    && u(&s["blobs"]["clean"]) == 0
                    && u(&s["blobs"]["evicted"]) == 1
            })
        };
        std::fs::write(&p, noise(1, 4 * MIB)).expect("write a");
        evicted(&m);
        let b = noise(2, 4 * MIB);
        std::fs::write(&p, &b).expect("write b");
        std::thread::sleep(Duration::from_millis(500));
        evicted(&m);
        drop_caches();
        assert!(
            std::fs::read(&p).expect("read") == b,
            "{name}: the rewrite was lost"
        );
        m.unmount();
    }
}

/// Reads `len` bytes of `f` from offset 0 in order, 1 MiB at a time, so that the daemon
/// sees a sequential reader and serves it from the blobs it fetched.
fn read_sequentially(f: &std::fs::File, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; len];
    for (i, chunk) in out.chunks_mut(MIB).enumerate() {
        f.read_exact_at(chunk, (i * MIB) as u64)?;
    }
    Ok(out)
}

/// Writes `want` to `p`, pins it to the store and waits until every blob of it is evicted;
/// then, with the caches dropped, opens it and reads it sequentially, checking the bytes.
/// Returns that cold handle.
fn cold_reader(m: &Mount, p: &Path, want: &[u8]) -> std::fs::File {
    cold_reader_with(m, p, want, std::fs::OpenOptions::new().read(true))
}

/// [`cold_reader`], with the reader opened with `opts`.
fn cold_reader_with(
    m: &Mount,
    p: &Path,
    want: &[u8],
    opts: &std::fs::OpenOptions,
) -> std::fs::File {
    write_synced(p, want);
    set_policy(p, "s3");
    let blobs = want.len().div_ceil(64 * MIB) as u64;
    wait_status(m, 120, "the file evicted", |s| {
        u(&s["tier"]["files_dirty"]) == 0 && u(&s["blobs"]["evicted"]) == blobs
    });
    drop_caches();
    let reader = opts.open(p).expect("open for reading");
    let first = read_sequentially(&reader, want.len()).expect("cold sequential read");
    assert!(first == want, "the cold sequential read differs");
    reader
}

/// A sequential reader of an evicted file is served from the verified GET bodies the daemon
/// keeps in memory. Those must never outlive a change to the file: with a reader's handle
/// still open (so the kept blobs stay), a write into the same region through another
/// handle, and a cut-and-regrow of the file, must both show in the next sequential read.
#[test]
fn sequential_reads_from_fetched_blobs_see_later_writes() {
    let root = scratch("evict-fetched");
    let (mut m, _store) = mount_with_file_store(root.path());
    let mut want = noise(11, 2 * 64 * MIB + 3 * MIB);
    let p = m.path("f");
    let reader = cold_reader(&m, &p, &want);

    // The same region, rewritten through a second handle while the reader's stays open.
    {
        use std::os::unix::fs::FileExt;
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open for write");
        for at in [MIB, 64 * MIB + 5, 2 * 64 * MIB + 7] {
            w.write_all_at(b"written after the fetch", at as u64)
                .expect("write");
            want[at..at + 23].copy_from_slice(b"written after the fetch");
        }
        w.sync_all().expect("fsync");
    }
    drop_caches();
    let second = read_sequentially(&reader, want.len()).expect("read after write");
    assert!(
        second == want,
        "a read after the write returned stale bytes"
    );

    // Cut inside the first blob and grown back: the cut-off bytes read as zeros.
    let cut = 10 * MIB + 3;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("open")
        .set_len(cut as u64)
        .expect("truncate");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .expect("open")
        .set_len(want.len() as u64)
        .expect("extend");
    want[cut..].fill(0);
    drop_caches();
    let third = read_sequentially(&reader, want.len()).expect("read after truncate");
    assert!(
        third == want,
        "a read after cut and regrow returned stale bytes"
    );
    drop(reader);
    m.unmount();
}

/// Bytes of the first `len` of `f` that are in the kernel's page cache, page by page from
/// mincore(2) over a read-only shared mapping, which looks without faulting anything in.
fn cached_bytes(f: &std::fs::File, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: a fresh read-only mapping of `len` bytes of an open file, which nothing else
    // in this process refers to; it is unmapped below, and `vec` has a byte per page.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert!(
            addr != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let r = libc::mincore(addr, len, vec.as_mut_ptr());
        let err = std::io::Error::last_os_error();
        libc::munmap(addr, len);
        assert!(r == 0, "mincore: {err}");
    }
    vec.iter().filter(|&&b| b & 1 == 1).count() * page
}

/// A sequential reader of a cold file does not leave the whole file in the kernel's page
/// cache, so streaming a file larger than memory keeps other files' pages. A read-only
/// reader is given direct I/O and caches nothing; a reader that may also write is cached,
/// and the daemon lets the kernel drop the pages more than a blob behind it. The bytes read
/// are right, and so is a second read, which finds the dropped pages gone.
#[test]
fn sequential_read_of_a_cold_file_drops_pages_behind_the_reader() {
    let root = scratch("evict-drop-behind");
    let (mut m, _store) = mount_with_file_store(root.path());
    let blob = 64 * MIB;
    let want = noise(21, 4 * blob + 5 * MIB);
    for (name, writable, bound) in [("ro", false, 0), ("rw", true, 2 * blob)] {
        let p = m.path(name);
        let opts = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .clone();
        let reader = cold_reader_with(&m, &p, &want, &opts);
        // `cat` and `cp` read by st_blksize: with direct I/O each `read()` is one request.
        let blksize = std::os::unix::fs::MetadataExt::blksize(&reader.metadata().expect("fstat"));
        assert_eq!(
            blksize, MIB as u64,
            "{name}: st_blksize should be the 1 MiB of the largest request"
        );
        // The pages go in the background: wait for them, up to a bound.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut cached = cached_bytes(&reader, want.len());
        while cached > bound && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            cached = cached_bytes(&reader, want.len());
        }
        assert!(
            cached <= bound,
            "{name}: {} KiB of the {} MiB read are still cached; at most {} MiB should be\n{}",
            cached / 1024,
            want.len() / MIB,
            bound / MIB,
            m.log_text()
        );
        let second = read_sequentially(&reader, want.len()).expect("second read");
        assert!(
            second == want,
            "{name}: a read after the pages were dropped differs"
        );
        // Gone, so that the next file's eviction is counted alone.
        drop(reader);
        std::fs::remove_file(&p).expect("remove");
    }
    m.unmount();
}

/// A sequential read of a whole-blob object that fails its checksum gives `EIO`, also now
/// that sequential reads are served from the fetched bytes, and nothing of it is kept.
#[test]
fn sequential_read_of_corrupt_blob_gives_eio() {
    let root = scratch("evict-fetched-corrupt");
    let (mut m, store) = mount_with_file_store(root.path());
    let data = noise(12, 64 * MIB + 2 * MIB);
    let p = m.path("f");
    write_synced(&p, &data);
    set_policy(&p, "s3");
    wait_status(&m, 120, "the file evicted", |s| {
        u(&s["tier"]["files_dirty"]) == 0 && u(&s["blobs"]["evicted"]) == 2
    });
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&p).expect("stat"));
    let object = blob_object(&store, &format!("{ino}/0/1"));
    let good = std::fs::read(&object).expect("object");
    let mut bad = good.clone();
    bad[40 * MIB + 9] ^= 0x01;
    std::fs::write(&object, &bad).expect("corrupt");
    drop_caches();
    let f = std::fs::File::open(&p).expect("open");
    let err = read_sequentially(&f, data.len()).expect_err("a corrupt blob must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(f);
    let s = status(&m);
    assert!(u(&s["flash_tier"]["corrupt_objects"]) >= 1, "{s:#}");

    // Repaired, the object is fetched again and read in full.
    std::fs::write(&object, &good).expect("restore");
    drop_caches();
    let f = std::fs::File::open(&p).expect("open");
    assert!(read_sequentially(&f, data.len()).expect("read") == data);
    drop(f);
    m.unmount();
}

/// Reads that wait for the object store are answered off the daemon's FUSE threads: with the
/// store hanging and more cold readers waiting on it than the mount has FUSE threads, other
/// requests (a mkdir, a create and write, a stat, a listing) are still answered, and the
/// readers get their bytes once the store answers again.
#[test]
fn requests_are_answered_while_cold_reads_wait_for_a_hanging_store() {
    let root = scratch("evict-hanging");
    let server = S3sFs::new(root.path().join("s3"), "bucket");
    let mut m = mount_on(&server, root.path(), &["--threads", "2"]);
    let files: Vec<(PathBuf, Vec<u8>)> = (0..4u64)
        .map(|i| (m.path(&format!("cold{i}")), noise(300 + i, MIB)))
        .collect();
    for (p, data) in &files {
        write_synced(p, data);
        set_policy(p, "s3");
    }
    wait_status(&m, 120, "the files evicted", |s| {
        u(&s["tier"]["files_dirty"]) == 0 && u(&s["blobs"]["evicted"]) == 4
    });
    drop_caches();

    server.signal(libc::SIGSTOP);
    let readers: Vec<_> = files
        .iter()
        .map(|(p, _)| {
            let p = p.clone();
            std::thread::spawn(move || std::fs::read(p))
        })
        .collect();
    // Long enough for each reader's READ to reach the daemon and wait on the store.
    std::thread::sleep(Duration::from_secs(3));

    std::fs::create_dir(m.path("dir")).expect("mkdir while reads wait");
    std::fs::write(m.path("dir/new"), b"written while reads wait").expect("create and write");
    let meta = std::fs::metadata(m.path("dir/new")).expect("stat");
    assert_eq!(meta.len(), 24);
    let names: Vec<_> = std::fs::read_dir(m.path("dir"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["new"]);
    let waiting = readers.iter().filter(|r| !r.is_finished()).count();
    assert_eq!(
        waiting,
        readers.len(),
        "the other requests were answered only after cold reads gave up on the store"
    );

    server.signal(libc::SIGCONT);
    for ((p, want), r) in files.iter().zip(readers) {
        let got = r.join().expect("reader thread").expect("cold read");
        assert!(&got == want, "{} differs", p.display());
    }
    m.unmount();
}
