//! The object tier's flush path on real mounts, with a `file://` object store whose objects
//! the test inspects directly: changed blobs are uploaded under new generations, old
//! generations and deleted files' objects are DELETEd, and the objects present match the
//! metadata exactly, also across a `kill -9` in the middle of uploads.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BLOB: u64 = 64 << 20;

/// Waits until nothing is waiting for upload or deletion.
fn wait_flushed(m: &Mount) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(m);
        if s["tier"]["files_dirty"] == 0
            && s["tier"]["deletes_pending"] == 0
            && s["uploads"]["files_in_flight"] == 0
        {
            return s;
        }
        assert!(Instant::now() < deadline, "tier did not drain: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every object in the store, as `ino/k/generation`.
fn objects(store: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
    }
    let mut files = Vec::new();
    walk(store, &mut files);
    files
        .iter()
        // `file://` stores stage a PUT in `<key>#<n>` and rename it into place; a daemon
        // killed mid-PUT leaves the stage behind. It is no object: no GET can reach it.
        .filter(|p| {
            !p.to_string_lossy()
                .rsplit('/')
                .next()
                .is_some_and(|n| n.contains('#'))
        })
        .map(|p| {
            p.strip_prefix(store)
                .expect("under store")
                .to_string_lossy()
                .into_owned()
        })
        // Metadata checkpoints: `meta/LATEST` and `<fs-id>/meta/...` (tests/repair.rs).
        .filter(|rel| !rel.starts_with("meta/") && rel.split('/').nth(1) != Some("meta"))
        .map(|rel| {
            // <fs-id>/blobs/<ino>/<k>/<gen>
            let parts: Vec<&str> = rel.split('/').collect();
            assert_eq!(parts.len(), 5, "unexpected object {rel}");
            assert_eq!(parts[1], "blobs", "unexpected object {rel}");
            parts[2..].join("/")
        })
        .collect()
}

/// Waits until the store holds exactly `want` (the kernel sends RELEASE, which queues the
/// upload, only after `close` returned, so the tier may start a moment later), then returns
/// the settled status.
fn wait_for_objects(m: &Mount, store: &Path, want: &BTreeSet<String>) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = wait_flushed(m);
        let have = objects(store);
        if &have == want {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "store holds {have:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn ino(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).expect("stat"))
}

/// A mount with a `file://` object store under a new scratch dir, checkpointing every
/// second (old generations go once a checkpoint without them is published), with `extra`
/// options: the scratch dir (kept alive by the caller), the store's directory, the mount.
fn tiered_mount(name: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf, Mount) {
    let root = scratch(name);
    let store = root.path().join("objects");
    let url = format!("file://{}", store.display());
    let mut args = vec!["--object-store", &url, "--checkpoint-interval", "1"];
    args.extend_from_slice(extra);
    let m = Mount::start(root.path(), &args);
    (root, store, m)
}

#[test]
fn flush_overwrite_and_delete_keep_the_bucket_equal_to_metadata() {
    let (_root, store, m) = tiered_mount("tier", &[]);

    // Two blobs and a bit: three objects for `big`, one for `small`.
    let big_len = (2 * BLOB + 4096) as usize;
    std::fs::write(m.path("big"), pattern(1, big_len)).expect("write big");
    std::fs::write(m.path("small"), b"small file").expect("write small");
    let (big, small) = (ino(&m.path("big")), ino(&m.path("small")));
    let want: BTreeSet<String> = [
        format!("{big}/0/1"),
        format!("{big}/1/1"),
        format!("{big}/2/1"),
        format!("{small}/0/1"),
    ]
    .into();
    let s = wait_for_objects(&m, &store, &want);
    assert_eq!(s["tier"]["blobs_stored"], 4);
    // Each object holds exactly its blob's bytes.
    let data = std::fs::read(m.path("big")).expect("read big");
    for k in 0..3u64 {
        let obj = std::fs::read(blob_object(&store, &format!("{big}/{k}/1"))).expect("object");
        let range = (k * BLOB) as usize..((k + 1) * BLOB).min(big_len as u64) as usize;
        assert!(
            obj == data[range],
            "object {big}/{k}/1 differs from the file"
        );
    }

    // Rewrite a few bytes in blob 1 only: one new generation, the old one deleted.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.path("big"))
            .expect("open");
        f.write_all_at(b"changed", BLOB + 10).expect("write");
    }
    let want: BTreeSet<String> = [
        format!("{big}/0/1"),
        format!("{big}/1/2"),
        format!("{big}/2/1"),
        format!("{small}/0/1"),
    ]
    .into();
    wait_for_objects(&m, &store, &want);

    // Truncate to one blob, delete the other file: their objects go.
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("big"))
        .expect("open")
        .set_len(1000)
        .expect("truncate");
    std::fs::remove_file(m.path("small")).expect("unlink");
    let s = wait_for_objects(&m, &store, &[format!("{big}/0/2")].into());
    assert_eq!(s["tier"]["blobs_stored"], 1);
    assert_eq!(s["uploads"]["errors"], 0);
}

#[test]
fn kill9_during_uploads_resumes_with_no_lost_blob_and_no_dangling_key() {
    let (_root, store, mut m) = tiered_mount("tier-crash", &["--upload-concurrency", "2"]);
    let mut expected = Vec::new();
    for i in 0..6u8 {
        let len = (BLOB / 2 + u64::from(i) * 7_000_000) as usize;
        // fsynced, so the crash may not lose them (an unsynced file may rightly vanish).
        let mut f = std::fs::File::create(m.path(&format!("f{i}"))).expect("create");
        std::io::Write::write_all(&mut f, &pattern(i, len)).expect("write");
        f.sync_all().expect("fsync");
        expected.push((format!("f{i}"), len));
    }
    std::fs::File::open(&m.mountpoint)
        .expect("open dir")
        .sync_all()
        .expect("fsync dir");
    // Let some uploads start, then crash the daemon.
    std::thread::sleep(Duration::from_millis(300));
    m.kill9();
    m.remount();
    let mut want = BTreeSet::new();
    for (name, len) in &expected {
        let i = ino(&m.path(name));
        for k in 0..(*len as u64).div_ceil(BLOB) {
            want.insert(format!("{i}/{k}/1"));
        }
        let data = std::fs::read(m.path(name)).expect("read");
        assert_eq!(data.len(), *len);
    }
    // Every blob uploaded once, at generation 1: no lost blob, no dangling generation.
    let s = wait_for_objects(&m, &store, &want);
    assert_eq!(s["tier"]["blobs_stored"], want.len());
}

/// A rewrite in place that keeps the size, whose mtime is then set back before the close,
/// changed the data all the same: it must be uploaded again. Passthrough writes bypass the
/// daemon, which sees them only by their effect on the backing file's size and mtime, and the
/// `utimes` undoes the mtime's.
#[test]
fn same_size_rewrite_with_times_put_back_is_uploaded_again() {
    let (_root, store, m) = tiered_mount("tier-times", &[]);
    let path = m.path("kept");
    std::fs::write(&path, pattern(1, 4096)).expect("write");
    let i = ino(&path);
    wait_for_objects(&m, &store, &[format!("{i}/0/1")].into());
    let before = std::fs::metadata(&path).expect("stat");
    let mtime = before.modified().expect("mtime");
    // Past the clock's granularity, so that the rewrite moves the backing file's mtime.
    std::thread::sleep(Duration::from_millis(20));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.write_all_at(&pattern(2, 4096), 0).expect("rewrite");
        f.set_times(std::fs::FileTimes::new().set_modified(mtime))
            .expect("utimes");
    }
    assert_eq!(
        std::fs::metadata(&path)
            .expect("stat")
            .modified()
            .expect("mtime"),
        mtime
    );
    wait_for_objects(&m, &store, &[format!("{i}/0/2")].into());
    let obj = std::fs::read(blob_object(&store, &format!("{i}/0/2"))).expect("object");
    assert!(obj == pattern(2, 4096), "the object holds the old bytes");
}
