//! The conformance suite against every in-process backend, and the fault-injection runs.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::conformance::{conformance, test_body};
use crate::*;

/// Fast enough for unit tests, patient enough to outlast the injected fault rates: with
/// about a 1-in-4 chance of a fault per attempt, 12 attempts all failing is ~1e-7.
fn test_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 12,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(10),
    }
}

/// The seed for a fault run: `CFS_FAULT_SEED` to replay one, else fresh. Printed either way.
fn fault_seed(test: &str) -> u64 {
    let seed = match std::env::var("CFS_FAULT_SEED") {
        Ok(s) => s
            .trim()
            .trim_start_matches("0x")
            .parse::<u64>()
            .or_else(|_| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16))
            .unwrap_or_else(|_| panic!("CFS_FAULT_SEED={s:?} is not a u64")),
        Err(_) => SplitMix64::from_entropy().next_u64(),
    };
    eprintln!("{test}: fault seed {seed} (replay with CFS_FAULT_SEED={seed})");
    seed
}

fn memory_store() -> BlobStore {
    BlobStore::new(Arc::new(InMemory::new()), "")
        .expect("store")
        .with_retry(test_retry())
}

#[tokio::test]
async fn conformance_memory() {
    let url: StoreUrl = "memory:///some/prefix".parse().expect("url");
    let store = url
        .open(&S3Options::default())
        .expect("open")
        .with_retry(test_retry());
    conformance(&store).await;
}

#[tokio::test]
async fn conformance_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url: StoreUrl = format!("file://{}/objects", dir.path().display())
        .parse()
        .expect("url");
    let store = url
        .open(&S3Options::default())
        .expect("open")
        .with_retry(test_retry());
    conformance(&store).await;
    // Everything was deleted, and automatic cleanup removed the emptied directories.
    let left: Vec<_> = walk(&dir.path().join("objects"));
    assert!(left.is_empty(), "files left behind: {left:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Every retryable fault except bit flips (which only a checksum can catch, see
/// `corrupt_bodies_are_never_returned`): the suite must pass unchanged through them.
#[tokio::test]
async fn conformance_through_faults_with_retries() {
    let seed = fault_seed("conformance_through_faults_with_retries");
    let faults = Faults {
        latency: 0.2,
        max_latency: Duration::from_millis(2),
        error: 0.1,
        reset: 0.1,
        truncate: 0.1,
        corrupt: 0.0,
    };
    let faulty = FaultyStore::new(Arc::new(InMemory::new()), seed, faults);
    let store = BlobStore::new(Arc::new(faulty.clone()), "p")
        .expect("store")
        .with_retry(test_retry());
    conformance(&store).await;
    let stats = faulty.stats();
    eprintln!("injected: {stats:?}");
    assert!(
        stats.errors + stats.resets + stats.truncations > 10,
        "too few faults were injected to mean anything: {stats:?}"
    );
}

#[tokio::test]
async fn corrupt_bodies_are_never_returned() {
    let seed = fault_seed("corrupt_bodies_are_never_returned");
    let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let faults = Faults {
        error: 0.1,
        truncate: 0.2,
        corrupt: 0.3,
        ..Faults::none()
    };
    let faulty = FaultyStore::new(Arc::clone(&inner), seed, faults);
    let retrying = BlobStore::new(Arc::new(faulty.clone()), "")
        .expect("store")
        .with_retry(RetryPolicy {
            max_attempts: 3,
            ..test_retry()
        });
    let once = retrying.clone().with_retry(RetryPolicy::none());
    let clean = BlobStore::new(inner, "").expect("store");

    let fs = FsId::new("corrupt-test").expect("fs id");
    let mut ok = 0;
    let mut refused = 0;
    for ino in 0..40u64 {
        let key = BlobKey::new(fs.clone(), ino, 0, 1).object_key();
        let body = test_body(ino, 1 + (ino as usize * 997) % 20_000);
        let crc = crc32c::crc32c(&body);
        clean.put(&key, body.clone()).await.expect("put");
        for store in [&retrying, &once] {
            match store.get_verified(&key, body.len() as u64, crc).await {
                Ok(got) => {
                    assert_eq!(got, body, "wrong bytes returned for {key} (seed {seed})");
                    ok += 1;
                }
                Err(TierError::Corrupt { .. } | TierError::Unavailable { .. }) => refused += 1,
                Err(e) => panic!("unexpected error for {key}: {e} (seed {seed})"),
            }
        }
    }
    let stats = faulty.stats();
    eprintln!("ok {ok}, refused {refused}, injected {stats:?}");
    assert!(stats.corruptions > 0 && stats.truncations > 0, "{stats:?}");
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");

    // With every body damaged, nothing is ever returned, retries or not.
    let always = Faults {
        corrupt: 1.0,
        ..Faults::none()
    };
    let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let broken = BlobStore::new(
        Arc::new(FaultyStore::new(Arc::clone(&inner), seed, always)),
        "",
    )
    .expect("store")
    .with_retry(RetryPolicy {
        max_attempts: 3,
        ..test_retry()
    });
    let key = ObjectKey::new("k").expect("key");
    let body = test_body(1, 4096);
    broken.put(&key, body.clone()).await.expect("put");
    let r = broken.get_verified(&key, 4096, crc32c::crc32c(&body)).await;
    assert!(matches!(r, Err(TierError::Corrupt { .. })), "{r:?}");
}

#[tokio::test]
async fn corrupt_reports_exact_fingerprints() {
    let store = memory_store();
    let key = ObjectKey::new("fs/blobs/1/0/1").expect("key");
    let body = test_body(3, 1000);
    let crc = crc32c::crc32c(&body);
    store.put(&key, body).await.expect("put");
    match store.get_verified(&key, 1000, !crc).await {
        Err(TierError::Corrupt {
            key: k,
            expected,
            found,
        }) => {
            assert_eq!(k, "fs/blobs/1/0/1");
            assert_eq!(
                expected,
                Fingerprint {
                    len: 1000,
                    crc32c: Some(!crc)
                }
            );
            assert_eq!(
                found,
                Fingerprint {
                    len: 1000,
                    crc32c: Some(crc)
                }
            );
        }
        other => panic!("{other:?}"),
    }
    match store.get_verified(&key, 999, crc).await {
        Err(TierError::Corrupt { found, .. }) => {
            assert_eq!(
                found,
                Fingerprint {
                    len: 1000,
                    crc32c: None
                }
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn prefix_is_prepended() {
    let inner = Arc::new(InMemory::new());
    let store = BlobStore::new(inner.clone(), "/tenant/a/").expect("store");
    assert_eq!(store.prefix(), "tenant/a");
    let key = ObjectKey::new("fs/meta/HEAD").expect("key");
    store.put(&key, "x".into()).await.expect("put");
    let r = inner.get(&Path::from("tenant/a/fs/meta/HEAD")).await;
    assert_eq!(&r.expect("get").bytes().await.expect("body")[..], b"x");
    assert!(BlobStore::new(inner, "a/../b").is_err());
}

/// A store that serves only GET (no HEAD), PUT and single DELETE, and fails the test on
/// anything else. Running the suite through it proves BlobStore needs nothing more.
#[derive(Debug)]
struct OnlyGetPutDelete(InMemory);

impl std::fmt::Display for OnlyGetPutDelete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OnlyGetPutDelete")
    }
}

fn forbidden(op: &str) -> ! {
    panic!("BlobStore used {op}; it may only GET, PUT and DELETE")
}

#[async_trait]
impl ObjectStore for OnlyGetPutDelete {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        assert_eq!(
            opts.mode,
            object_store::PutMode::Overwrite,
            "conditional PUT"
        );
        self.0.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        _: &Path,
        _: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        forbidden("multipart upload")
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.head {
            forbidden("HEAD")
        }
        self.0.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.0.delete_stream(locations)
    }
    fn list(&self, _: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        forbidden("LIST")
    }
    async fn list_with_delimiter(&self, _: Option<&Path>) -> object_store::Result<ListResult> {
        forbidden("LIST")
    }
    async fn copy_opts(&self, _: &Path, _: &Path, _: CopyOptions) -> object_store::Result<()> {
        forbidden("COPY")
    }
}

#[tokio::test]
async fn conformance_uses_only_get_put_delete() {
    let store = BlobStore::new(Arc::new(OnlyGetPutDelete(InMemory::new())), "")
        .expect("store")
        .with_retry(test_retry());
    conformance(&store).await;
}

/// A metadata store and a flash directory under `dir`, holding one regular file `f` with
/// `data`, queued for upload: what the uploader's tests start from. Returns the backing
/// file too, for writing it again.
pub(crate) fn one_queued_file(
    dir: &std::path::Path,
    data: &[u8],
) -> (
    Arc<cfs_meta::MetaStore>,
    cfs_flash::FlashDir,
    Ino,
    std::fs::File,
) {
    use cfs_meta::{Caller, FileKind, MetaStore, Op, Timestamp};
    use std::os::unix::fs::FileExt;

    let (meta, _) = MetaStore::open(&dir.join("meta.redb"), Timestamp::now(), 0, 0).expect("meta");
    let meta = Arc::new(meta);
    let flash = cfs_flash::FlashDir::open(&dir.join("flash")).expect("flash");
    let ino = meta.alloc_ino();
    meta.execute(&Op::Create {
        parent: cfs_meta::ROOT_INO,
        name: b"f".to_vec(),
        ino,
        kind: FileKind::File,
        perm: 0o644,
        umask: 0,
        rdev: 0,
        target: Vec::new(),
        caller: Caller::default(),
        now: Timestamp::now(),
    })
    .expect("create");
    let file = flash.create(ino).expect("backing file");
    file.write_all_at(data, 0).expect("write");
    meta.execute(&Op::MarkDirty { ino }).expect("dirty");
    (meta, flash, ino, file)
}

/// What the uploader sees of open files, set by the test.
#[derive(Default)]
struct FakeOpenFiles {
    open: std::sync::atomic::AtomicBool,
    last_used: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl crate::evict::OpenFiles for FakeOpenFiles {
    fn while_closed(&self, _ino: Ino, f: &mut dyn FnMut()) -> bool {
        f();
        true
    }
    fn last_used(&self, _ino: Ino) -> Option<std::time::Instant> {
        *self.last_used.lock()
    }
    fn is_open(&self, _ino: Ino) -> bool {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A queued file that is still open, or was closed a moment ago, is most likely still being
/// written: it waits, and goes up once it has been closed for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_and_just_closed_files_wait_for_the_uploader() {
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    let dir = tempfile::tempdir().expect("tempdir");
    let (meta, flash, ino, _) = one_queued_file(dir.path(), b"being written");

    let open = Arc::new(FakeOpenFiles::default());
    let up = crate::uploader::Uploader::new(Arc::clone(&meta), flash, memory_store(), 2)
        .expect("uploader")
        .with_open_files(Arc::clone(&open) as Arc<dyn crate::evict::OpenFiles>);
    let uploaded = || up.stats().blobs_uploaded.load(Ordering::Relaxed);

    open.open.store(true, Ordering::Relaxed);
    up.pass().await.expect("pass");
    assert_eq!(
        (uploaded(), meta.dirty_files(10).expect("dirty")),
        (0, vec![ino])
    );

    open.open.store(false, Ordering::Relaxed);
    *open.last_used.lock() = Some(Instant::now());
    up.pass().await.expect("pass");
    assert_eq!(uploaded(), 0, "uploaded right after its close");

    *open.last_used.lock() = Instant::now().checked_sub(Duration::from_secs(5));
    up.pass().await.expect("pass");
    assert_eq!(uploaded(), 1);
    assert!(meta.dirty_files(10).expect("dirty").is_empty());
}

/// A verified GET that gave up on a damaged object retries a wrong body no more for a
/// while, so repeated reads of it fail at once; writing the key again lifts that.
#[tokio::test]
async fn a_damaged_object_is_not_retried_again_until_it_is_written_again() {
    let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let counting = FaultyStore::new(inner, 1, Faults::none());
    let store = BlobStore::new(Arc::new(counting.clone()), "")
        .expect("store")
        .with_retry(RetryPolicy {
            max_attempts: 3,
            ..test_retry()
        });
    let key = ObjectKey::new("k").expect("key");
    let body = test_body(7, 4096);
    let crc = crc32c::crc32c(&body);
    store.put(&key, body.clone()).await.expect("put");
    let calls = || counting.stats().calls;
    // A wrong expected checksum stands for a damaged object.
    let whole = || store.get_verified(&key, 4096, crc ^ 1);
    let wrong = [crc ^ 1];
    let piece = || store.get_range_verified(&key, 0..4096, 4096, &wrong);
    for (what, first, again) in [("whole", 3, 1), ("piece", 3, 1)] {
        for (n, want) in [(1, first), (2, again)] {
            let before = calls();
            let r = if what == "whole" {
                whole().await
            } else {
                piece().await.map(|_| bytes::Bytes::new())
            };
            assert!(
                matches!(r, Err(TierError::Corrupt { .. })),
                "{what} {n}: {r:?}"
            );
            assert_eq!(
                calls() - before,
                want,
                "GETs of the {what} object, time {n}"
            );
        }
    }
    // The right fingerprint still reads, in one GET.
    let before = calls();
    assert_eq!(
        store.get_verified(&key, 4096, crc).await.expect("good"),
        body
    );
    assert_eq!(calls() - before, 1);
    // Written again (a repair): the next wrong body is retried in full.
    store.put(&key, body.clone()).await.expect("put");
    let before = calls();
    let r = whole().await;
    assert!(matches!(r, Err(TierError::Corrupt { .. })), "{r:?}");
    assert_eq!(calls() - before, 3, "retried in full again");
}

/// An uploader of [`one_queued_file`] holding `data`, whose commit first runs `change` on
/// the backing file and then queues the file again, as a close after a change does.
fn uploader_queueing_during_commit(
    dir: &std::path::Path,
    data: &[u8],
    change: impl Fn(&std::fs::File) + Send + Sync + 'static,
) -> (Arc<cfs_meta::MetaStore>, Ino, crate::uploader::Uploader) {
    let (meta, flash, ino, file) = one_queued_file(dir, data);
    let mut up = crate::uploader::Uploader::new(Arc::clone(&meta), flash, memory_store(), 2)
        .expect("uploader");
    let hook_meta = Arc::clone(&meta);
    up.before_commit = Some(Box::new(move |ino| {
        change(&file);
        hook_meta
            .execute(&cfs_meta::Op::MarkDirty { ino })
            .expect("queue again");
    }));
    (meta, ino, up)
}

/// A write whose close queues the file again while the uploader is committing the older
/// bytes must stay queued: otherwise it never goes up, and eviction may drop it from flash.
#[tokio::test]
async fn a_write_queued_during_the_commit_stays_queued() {
    use std::os::unix::fs::FileExt;

    let dir = tempfile::tempdir().expect("tempdir");
    // What a close after a passthrough write does: the new bytes are on flash, and the file
    // is queued again.
    let (meta, ino, mut up) =
        uploader_queueing_during_commit(dir.path(), b"first version", |file| {
            file.write_all_at(b"second version", 0).expect("write");
        });
    let uploaded = |up: &crate::uploader::Uploader| {
        up.stats()
            .blobs_uploaded
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    up.pass().await.expect("pass");
    assert_eq!(uploaded(&up), 1);
    assert_eq!(meta.dirty_files(10).expect("dirty"), vec![ino]);

    up.before_commit = None;
    up.pass().await.expect("pass");
    assert!(meta.dirty_files(10).expect("dirty").is_empty());
    assert_eq!(uploaded(&up), 2);
}

/// The same when the change left the file's size and mtime as they were (a rewrite
/// through the daemon within the clock's granularity): the queue entry alone tells.
#[tokio::test]
async fn a_file_queued_during_its_upload_stays_queued_though_it_looks_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (meta, ino, mut up) = uploader_queueing_during_commit(dir.path(), b"same bytes", |_| {});
    up.pass().await.expect("pass");
    assert_eq!(meta.dirty_files(10).expect("dirty"), vec![ino]);

    up.before_commit = None;
    up.pass().await.expect("pass");
    assert!(
        meta.dirty_files(10).expect("dirty").is_empty(),
        "clean once an upload saw no new mark"
    );
}

/// A blob of zeros stored as its marker comes back from a verified GET as its zeros; a
/// marker does not pass for a blob of data, nor a damaged one for zeros, and a blob of
/// zeros stored as its bytes (as before markers) still reads.
#[tokio::test]
async fn zero_blob_markers_read_back_as_zeros_and_nothing_else() {
    use crate::zero_blob::{marker, zeros_crc};
    let store = memory_store();
    let len = 3 << 20;
    let zero_crc = zeros_crc(len);
    let key = ObjectKey::new("zeros").expect("key");
    store.put(&key, marker(len)).await.expect("put");
    let got = store.get_verified(&key, len, zero_crc).await.expect("get");
    assert_eq!(got.len() as u64, len);
    assert!(got.iter().all(|&b| b == 0));

    let corrupt = |r: Result<bytes::Bytes>| matches!(r, Err(TierError::Corrupt { .. }));
    assert!(
        corrupt(store.get_verified(&key, len, zero_crc ^ 1).await),
        "a marker read as a blob of data"
    );
    assert!(
        corrupt(store.get_verified(&key, len + 1, zeros_crc(len + 1)).await),
        "a marker read as zeros of another length"
    );
    let mut damaged = marker(len).to_vec();
    damaged[0] ^= 0x20;
    store.put(&key, damaged.into()).await.expect("put");
    assert!(
        corrupt(store.get_verified(&key, len, zero_crc).await),
        "a damaged marker"
    );

    store
        .put(&key, bytes::Bytes::from(vec![0u8; len as usize]))
        .await
        .expect("put");
    let got = store
        .get_verified(&key, len, zero_crc)
        .await
        .expect("zeros as bytes");
    assert_eq!(got.len() as u64, len);
}

/// The uploader sends a blob that is all hole, and one written full of zeros, as markers,
/// recorded with the checksums of their zeros; blobs of data go up as their bytes, and every
/// blob reads back as the file held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_of_zeros_go_up_as_markers() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().expect("tempdir");
    let (meta, flash, ino, file) = one_queued_file(dir.path(), b"data in blob 0");
    // Blob 1 stays a hole, blob 2 is written full of zeros, blob 3 ends the file with data.
    file.write_all_at(&vec![0u8; BLOB_SIZE as usize], 2 * BLOB_SIZE)
        .expect("zeros");
    file.write_all_at(b"the end", 3 * BLOB_SIZE + 100)
        .expect("end");
    let size = 3 * BLOB_SIZE + 107;
    let store = memory_store();
    let up = crate::uploader::Uploader::new(Arc::clone(&meta), flash, store.clone(), 2)
        .expect("uploader");
    up.pass().await.expect("pass");
    assert_eq!(up.stats().blobs_uploaded.load(Ordering::Relaxed), 4);
    assert_eq!(up.stats().zero_blobs.load(Ordering::Relaxed), 2);

    let records = meta.blobs_of(ino).expect("blobs");
    assert_eq!(records.len(), 4);
    for r in &records {
        let fs = FsId::new(meta.fs_id()).expect("fs id");
        let key = BlobKey::new(fs, ino, r.k, r.generation).object_key();
        let raw = store.get(&key).await.expect("raw get");
        let zero = r.k == 1 || r.k == 2;
        assert_eq!(
            raw == crate::zero_blob::marker(r.len),
            zero,
            "blob {}: a {}-byte object",
            r.k,
            raw.len()
        );
        assert_eq!(
            (r.crc32c, r.chunks.clone()),
            if zero {
                crate::zero_blob::zero_checksums(r.len)
            } else {
                (crc32c::crc32c(&raw), r.chunks.clone())
            },
            "blob {}'s checksums",
            r.k
        );
        let got = store
            .get_verified(&key, r.len, r.crc32c)
            .await
            .expect("verified get");
        let mut want = vec![0u8; r.len as usize];
        file.read_exact_at(&mut want, r.k * BLOB_SIZE)
            .expect("read");
        assert!(got == want, "blob {} reads back as the file", r.k);
        assert_eq!(
            r.len,
            blob_range(r.k, size).end - blob_range(r.k, size).start
        );
    }
}
