//! The one conformance suite every object-store backend must pass: the in-memory store,
//! a local directory, the fault-injecting wrapper (with retries), and real S3 servers.
//!
//! It checks the contract the rest of ClaudeFS builds on: what was PUT comes back byte for
//! byte (or not at all), a missing key is `NotFound` and nothing else, DELETE is idempotent,
//! and a body that does not match its recorded length and checksum is never returned.
//!
//! Each run works under a fresh random filesystem id, so it can share a bucket with other
//! runs; it deletes what it wrote, except when it panics.

use bytes::Bytes;
use futures::future::try_join_all;

use crate::rng::SplitMix64;
use crate::{BLOB_SIZE, BlobKey, BlobStore, FsId, ObjectKey, TierError};

const MIB: usize = 1 << 20;

/// Deterministic pseudo-random bytes: incompressible, and different for each `seed`, so a
/// mixed-up object is caught by comparison.
pub fn test_body(seed: u64, len: usize) -> Bytes {
    let mut rng = SplitMix64::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

fn crc(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

/// Compares without printing megabytes on failure.
#[track_caller]
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes (crc32c {:#010x}), want {} bytes (crc32c {:#010x}); \
             first difference at {first:?}",
            got.len(),
            crc(got),
            want.len(),
            crc(want)
        );
    }
}

#[track_caller]
fn assert_not_found<T: std::fmt::Debug>(what: &str, r: Result<T, TierError>) {
    match r {
        Err(TierError::NotFound { .. }) => {}
        other => panic!("{what}: want NotFound, got {other:?}"),
    }
}

#[track_caller]
fn assert_corrupt<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, TierError>,
    key: &ObjectKey,
) -> (crate::Fingerprint, crate::Fingerprint) {
    match r {
        Err(TierError::Corrupt {
            key: k,
            expected,
            found,
        }) => {
            assert_eq!(k, key.as_str(), "{what}: Corrupt names the key");
            (expected, found)
        }
        other => panic!("{what}: want Corrupt, got {other:?}"),
    }
}

/// Runs the whole suite against `store`, panicking at the first violation.
pub async fn conformance(store: &BlobStore) {
    let fs = FsId::new(format!(
        "conf-{:016x}",
        SplitMix64::from_entropy().next_u64()
    ))
    .expect("generated fs id is valid");
    eprintln!(
        "conformance: {store} ({:?}), fs id {fs}",
        store.retry_policy()
    );
    let blob = |ino, k, generation| BlobKey::new(fs.clone(), ino, k, generation).object_key();

    round_trips(store, &blob(1, 0, 1), &blob(1, 1, 1)).await;
    ranged_gets(store, &blob(2, 0, 1)).await;
    missing_keys(store, &blob(3, 0, 1)).await;
    delete_semantics(store, &blob(4, 0, 1)).await;
    overwrite(store, &ObjectKey::meta_head(&fs)).await;
    key_shapes(store, &fs).await;
    verified_gets_detect_corruption(store, &blob(6, 0, 1)).await;
    concurrent_blobs(store, &fs).await;
    eprintln!("conformance: {store} passed");
}

async fn round_trips(store: &BlobStore, key: &ObjectKey, full_blob_key: &ObjectKey) {
    for (i, len) in [0, 1, 13, 4096, MIB + 7, 5 * MIB].into_iter().enumerate() {
        let body = test_body(100 + i as u64, len);
        store.put(key, body.clone()).await.expect("put");
        let got = store.get(key).await.expect("get");
        assert_same(&format!("get of {len}-byte object"), &got, &body);
        let got = store
            .get_verified(key, len as u64, crc(&body))
            .await
            .expect("get_verified");
        assert_same(&format!("get_verified of {len}-byte object"), &got, &body);
    }
    store.delete(key).await.expect("delete");

    // One full-size blob, the largest object ClaudeFS ever writes, in one PUT and one GET.
    let body = test_body(7, BLOB_SIZE as usize);
    store
        .put(full_blob_key, body.clone())
        .await
        .expect("put 64 MiB");
    let got = store
        .get_verified(full_blob_key, BLOB_SIZE, crc(&body))
        .await
        .expect("get_verified 64 MiB");
    assert_same("64 MiB blob", &got, &body);
    drop(got);
    store.delete(full_blob_key).await.expect("delete 64 MiB");
}

async fn ranged_gets(store: &BlobStore, key: &ObjectKey) {
    let len = 3 * MIB + 5;
    let body = test_body(200, len);
    store.put(key, body.clone()).await.expect("put");
    let l = len as u64;
    let ranges = [
        0..1,
        0..100,
        MIB as u64 - 10..MIB as u64 + 10, // across a MiB boundary
        l / 2..l / 2 + 4096,              // middle
        l - 100..l,                       // end
        l - 1..l,
        0..l, // the whole object, ranged
    ];
    for r in ranges {
        let got = store.get_range(key, r.clone()).await.expect("get_range");
        let want = &body[r.start as usize..r.end as usize];
        assert_same(&format!("range {r:?}"), &got, want);
    }
    // Ranged GETs of whole 1 MiB pieces, each checked against its own crc32c.
    let pieces: Vec<u32> = body.chunks(MIB).map(crc).collect();
    for (first, n) in [(0, 1), (1, 2), (3, 1), (0, 4)] {
        let start = (first * MIB) as u64;
        let end = ((first + n) * MIB).min(len) as u64;
        let got = store
            .get_range_verified(key, start..end, MIB as u64, &pieces[first..first + n])
            .await
            .expect("get_range_verified");
        assert_same(
            &format!("verified pieces {first}+{n}"),
            &got,
            &body[start as usize..end as usize],
        );
    }
    let mut wrong = pieces.clone();
    wrong[1] ^= 1;
    assert_corrupt(
        "a piece with the wrong checksum",
        store
            .get_range_verified(key, 0..2 * MIB as u64, MIB as u64, &wrong[..2])
            .await,
        key,
    );
    assert_corrupt(
        "pieces past the end of the object",
        store
            .get_range_verified(
                key,
                3 * MIB as u64..4 * MIB as u64,
                MIB as u64,
                &pieces[3..4],
            )
            .await,
        key,
    );
    let e = store
        .get_range_verified(key, 10..20, MIB as u64, &pieces[..1])
        .await
        .expect_err("a range off the piece boundaries");
    assert!(matches!(e, TierError::Invalid(_)), "misaligned: {e:?}");
    let e = store.get_range(key, 10..10).await.expect_err("empty range");
    assert!(matches!(e, TierError::Invalid(_)), "empty range: {e:?}");
    let e = store
        .get_range(key, l - 10..l + 10)
        .await
        .expect_err("range past the end");
    assert!(matches!(e, TierError::Invalid(_)), "range past end: {e:?}");
    store.delete(key).await.expect("delete");
}

async fn missing_keys(store: &BlobStore, key: &ObjectKey) {
    assert_not_found("get of a missing key", store.get(key).await);
    assert_not_found(
        "get_range of a missing key",
        store.get_range(key, 0..1).await,
    );
    assert_not_found(
        "get_verified of a missing key",
        store.get_verified(key, 0, crc(b"")).await,
    );
}

async fn delete_semantics(store: &BlobStore, key: &ObjectKey) {
    store
        .delete(key)
        .await
        .expect("delete of a never-written key");
    store.put(key, test_body(400, 1000)).await.expect("put");
    store.get(key).await.expect("get before delete");
    store.delete(key).await.expect("delete");
    assert_not_found("get after delete", store.get(key).await);
    assert_not_found("get_range after delete", store.get_range(key, 0..1).await);
    store.delete(key).await.expect("second delete is Ok");
}

async fn overwrite(store: &BlobStore, key: &ObjectKey) {
    let first = test_body(500, 3000);
    let second = test_body(501, 1234);
    store.put(key, first.clone()).await.expect("put first");
    store.put(key, second.clone()).await.expect("put second");
    assert_same(
        "get after overwrite",
        &store.get(key).await.expect("get"),
        &second,
    );
    // The old fingerprint no longer matches: a reader holding stale metadata gets an error,
    // not the new bytes under the old checksum.
    assert_corrupt(
        "get_verified with the overwritten fingerprint",
        store.get_verified(key, 3000, crc(&first)).await,
        key,
    );
    store.delete(key).await.expect("delete");
}

async fn key_shapes(store: &BlobStore, fs: &FsId) {
    // Generations of one blob are independent objects: deleting the old one after the new
    // one is committed must leave the new one intact.
    let g1 = BlobKey::new(fs.clone(), 5, 2, 1).object_key();
    let g2 = BlobKey::new(fs.clone(), 5, 2, 2).object_key();
    let (b1, b2) = (test_body(601, 100), test_body(602, 200));
    store.put(&g1, b1.clone()).await.expect("put gen 1");
    store.put(&g2, b2.clone()).await.expect("put gen 2");
    assert_same("gen 1", &store.get(&g1).await.expect("get gen 1"), &b1);
    store.delete(&g1).await.expect("delete gen 1");
    assert_not_found("deleted gen 1", store.get(&g1).await);
    assert_same(
        "gen 2 after gen 1 deleted",
        &store.get(&g2).await.expect("get"),
        &b2,
    );
    store.delete(&g2).await.expect("delete gen 2");

    // Extreme numbers in every position; a key that is a prefix of another key's path.
    let big = BlobKey::new(fs.clone(), u64::MAX, u64::MAX / BLOB_SIZE, u64::MAX).object_key();
    let short = BlobKey::new(fs.clone(), 1, 0, 1).object_key();
    let longer = BlobKey::new(fs.clone(), 1, 0, 10).object_key();
    for (i, key) in [&big, &short, &longer].into_iter().enumerate() {
        let body = test_body(610 + i as u64, 10 + i);
        store.put(key, body.clone()).await.expect("put");
        assert_same(key.as_str(), &store.get(key).await.expect("get"), &body);
    }
    for key in [&big, &short, &longer] {
        store.delete(key).await.expect("delete");
        assert_not_found(key.as_str(), store.get(key).await);
    }
}

async fn verified_gets_detect_corruption(store: &BlobStore, key: &ObjectKey) {
    let body = test_body(700, 64 * 1024);
    let (len, good) = (body.len() as u64, crc(&body));
    store.put(key, body.clone()).await.expect("put");

    // `found` is what the last corrupt attempt saw; through a faulty transport that may
    // be a damaged copy rather than the stored object, so only check that it differs.
    let (expected, found) = assert_corrupt(
        "wrong checksum",
        store.get_verified(key, len, good ^ 1).await,
        key,
    );
    assert_eq!((expected.len, expected.crc32c), (len, Some(good ^ 1)));
    assert_ne!(found, expected);

    for wrong_len in [0, len - 1, len + 1] {
        let (expected, found) = assert_corrupt(
            &format!("wrong length {wrong_len}"),
            store.get_verified(key, wrong_len, good).await,
            key,
        );
        assert_eq!((expected.len, expected.crc32c), (wrong_len, Some(good)));
        assert_ne!(found, expected);
    }
    assert_same(
        "the right fingerprint still reads",
        &store
            .get_verified(key, len, good)
            .await
            .expect("get_verified"),
        &body,
    );
    store.delete(key).await.expect("delete");
}

async fn concurrent_blobs(store: &BlobStore, fs: &FsId) {
    let blobs: Vec<(ObjectKey, Bytes)> = (0..8u64)
        .map(|k| {
            let key = BlobKey::new(fs.clone(), 8, k, 1).object_key();
            (key, test_body(800 + k, 100_000 + k as usize))
        })
        .collect();
    try_join_all(blobs.iter().map(|(k, b)| store.put(k, b.clone())))
        .await
        .expect("concurrent puts");
    let got = try_join_all(
        blobs
            .iter()
            .map(|(k, b)| store.get_verified(k, b.len() as u64, crc(b))),
    )
    .await
    .expect("concurrent gets");
    for ((k, b), g) in blobs.iter().zip(&got) {
        assert_same(k.as_str(), g, b);
    }
    try_join_all(blobs.iter().map(|(k, _)| store.delete(k)))
        .await
        .expect("concurrent deletes");
}
