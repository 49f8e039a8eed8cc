//! A fault-injecting object store: wraps any [`ObjectStore`] and, per call, adds latency,
//! fails requests, drops responses, and cuts or corrupts GET bodies.
//!
//! Everything is decided by a seeded generator, and every call draws the same number of
//! values whatever happens, so a sequential test given the same seed sees the same faults
//! on the same calls. Tests print the seed; rerunning with it replays the failure.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    RenameOptions, Result,
};

use crate::rng::SplitMix64;

/// Per-call probabilities, each in `[0, 1]`. The default injects nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// Chance of a delay, uniform in `[0, max_latency]`, before the call runs.
    pub latency: f64,
    pub max_latency: Duration,
    /// Chance the call fails before reaching the store (a 5xx, say): nothing happened.
    pub error: f64,
    /// Chance the connection resets after the store did the work: the caller sees an
    /// error although a PUT or DELETE took effect. This is what makes idempotence matter.
    pub reset: f64,
    /// Chance a GET body is cut short (at a random point, possibly to nothing).
    pub truncate: f64,
    /// Chance one bit of a GET body is flipped.
    pub corrupt: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults::none()
    }
}

impl Faults {
    pub fn none() -> Faults {
        Faults {
            latency: 0.0,
            max_latency: Duration::ZERO,
            error: 0.0,
            reset: 0.0,
            truncate: 0.0,
            corrupt: 0.0,
        }
    }
}

/// How many faults of each kind were injected so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub calls: u64,
    pub delays: u64,
    pub errors: u64,
    pub resets: u64,
    pub truncations: u64,
    pub corruptions: u64,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    delays: AtomicU64,
    errors: AtomicU64,
    resets: AtomicU64,
    truncations: AtomicU64,
    corruptions: AtomicU64,
}

/// What one call will suffer, drawn up front.
#[derive(Debug, Clone, Copy)]
struct Plan {
    call: u64,
    delay: Option<Duration>,
    error: bool,
    reset: bool,
    /// GET only: cut the body to `draw % len` bytes.
    truncate: Option<u64>,
    /// GET only: flip bit `draw % (8·len)`.
    corrupt: Option<u64>,
}

struct Shared {
    inner: Arc<dyn ObjectStore>,
    faults: Faults,
    seed: u64,
    rng: Mutex<SplitMix64>,
    counters: Counters,
}

/// See the module documentation.
#[derive(Clone)]
pub struct FaultyStore {
    shared: Arc<Shared>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, seed: u64, faults: Faults) -> FaultyStore {
        FaultyStore {
            shared: Arc::new(Shared {
                inner,
                faults,
                seed,
                rng: Mutex::new(SplitMix64::new(seed)),
                counters: Counters::default(),
            }),
        }
    }

    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    pub fn stats(&self) -> FaultStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultStats {
            calls: get(&c.calls),
            delays: get(&c.delays),
            errors: get(&c.errors),
            resets: get(&c.resets),
            truncations: get(&c.truncations),
            corruptions: get(&c.corruptions),
        }
    }
}

impl Shared {
    fn plan(&self) -> Plan {
        let f = &self.faults;
        let call = self.counters.calls.fetch_add(1, Ordering::Relaxed);
        // A panic elsewhere cannot leave a generator half-updated; keep going.
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        // Exactly nine draws per call, used or not, to keep calls aligned across runs.
        let delay_hit = rng.chance(f.latency);
        let delay_ns = rng.up_to(f.max_latency.as_nanos().min(u64::MAX as u128) as u64);
        let error = rng.chance(f.error);
        let reset = rng.chance(f.reset);
        let truncate_hit = rng.chance(f.truncate);
        let truncate_at = rng.next_u64();
        let corrupt_hit = rng.chance(f.corrupt);
        let corrupt_at = rng.next_u64();
        let _spare = rng.next_u64();
        Plan {
            call,
            delay: delay_hit.then(|| Duration::from_nanos(delay_ns)),
            error,
            reset,
            truncate: truncate_hit.then_some(truncate_at),
            corrupt: corrupt_hit.then_some(corrupt_at),
        }
    }

    fn injected(&self, plan: &Plan, what: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "FaultyStore",
            source: format!("injected {what} (seed {}, call {})", self.seed, plan.call).into(),
        }
    }

    /// Delay and maybe fail before the inner call.
    async fn before(&self, plan: &Plan) -> Result<()> {
        if let Some(d) = plan.delay {
            self.counters.delays.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(d).await;
        }
        if plan.error {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return Err(self.injected(plan, "error: 503 Service Unavailable"));
        }
        Ok(())
    }

    /// Maybe lose the response after the inner call did its work.
    fn after<T>(&self, plan: &Plan, result: Result<T>) -> Result<T> {
        if plan.reset && result.is_ok() {
            self.counters.resets.fetch_add(1, Ordering::Relaxed);
            return Err(object_store::Error::Generic {
                store: "FaultyStore",
                source: Box::new(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!(
                        "injected connection reset by peer (seed {}, call {})",
                        self.seed, plan.call
                    ),
                )),
            });
        }
        result
    }

    async fn delete_one(&self, location: Path) -> Result<Path> {
        let plan = self.plan();
        self.before(&plan).await?;
        let r = self.inner.delete(&location).await.map(|()| location);
        self.after(&plan, r)
    }

    /// Applies the plan's body faults to a GET result. The announced range and metadata
    /// stay as the store sent them, as they would when a body is damaged in transit.
    async fn damage_body(&self, plan: &Plan, res: GetResult) -> Result<GetResult> {
        if plan.truncate.is_none() && plan.corrupt.is_none() {
            return Ok(res);
        }
        let meta = res.meta.clone();
        let range = res.range.clone();
        let attributes = res.attributes.clone();
        let extensions = res.extensions.clone();
        let body = res.bytes().await?;
        let mut body = BytesMut::from(body);
        if let (Some(flip), false) = (plan.corrupt, body.is_empty()) {
            self.counters.corruptions.fetch_add(1, Ordering::Relaxed);
            let bit = flip % (body.len() as u64 * 8);
            body[(bit / 8) as usize] ^= 1 << (bit % 8);
        }
        if let (Some(cut), false) = (plan.truncate, body.is_empty()) {
            self.counters.truncations.fetch_add(1, Ordering::Relaxed);
            body.truncate((cut % body.len() as u64) as usize);
        }
        let body: Bytes = body.freeze();
        Ok(GetResult {
            payload: GetResultPayload::Stream(futures::stream::once(async { Ok(body) }).boxed()),
            meta,
            range,
            attributes,
            extensions,
        })
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore")
            .field("seed", &self.shared.seed)
            .field("faults", &self.shared.faults)
            // Display, not Debug: InMemory's Debug dumps every object.
            .field("inner", &format_args!("{}", self.shared.inner))
            .finish()
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FaultyStore(seed={}, {})",
            self.shared.seed, self.shared.inner
        )
    }
}

/// Every method delegates to the inner store. Latency, errors and resets apply to every
/// call; body damage to GETs that return a body.
#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let s = &self.shared;
        let plan = s.plan();
        s.before(&plan).await?;
        let r = s.inner.put_opts(location, payload, opts).await;
        s.after(&plan, r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        let s = &self.shared;
        let plan = s.plan();
        s.before(&plan).await?;
        let r = s.inner.put_multipart_opts(location, opts).await;
        s.after(&plan, r)
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let s = &self.shared;
        let plan = s.plan();
        s.before(&plan).await?;
        let head = options.head;
        let r = s.inner.get_opts(location, options).await;
        let r = s.after(&plan, r)?;
        if head {
            return Ok(r);
        }
        s.damage_body(&plan, r).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let shared = Arc::clone(&self.shared);
        locations
            .then(move |location| {
                let shared = Arc::clone(&shared);
                async move { shared.delete_one(location?).await }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        // Listing is not in ClaudeFS's vocabulary (see BlobStore); pass it through untouched.
        self.shared.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let s = &self.shared;
        let plan = s.plan();
        s.before(&plan).await?;
        let r = s.inner.list_with_delimiter(prefix).await;
        s.after(&plan, r)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let s = &self.shared;
        let plan = s.plan();
        s.before(&plan).await?;
        let r = s.inner.copy_opts(from, to, options).await;
        s.after(&plan, r)
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        let s = &self.shared;
        let plan = s.plan();
        s.before(&plan).await?;
        let r = s.inner.rename_opts(from, to, options).await;
        s.after(&plan, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn always(f: impl FnOnce(&mut Faults)) -> Faults {
        let mut faults = Faults::none();
        f(&mut faults);
        faults
    }

    async fn store_with(faults: Faults) -> (FaultyStore, Path) {
        let inner = Arc::new(InMemory::new());
        let p = Path::from("k");
        inner
            .put(&p, PutPayload::from_static(b"hello world"))
            .await
            .expect("seed object");
        (FaultyStore::new(inner, 1, faults), p)
    }

    #[tokio::test]
    async fn no_faults_is_transparent() {
        let (s, p) = store_with(Faults::none()).await;
        let body = s.get(&p).await.expect("get").bytes().await.expect("body");
        assert_eq!(&body[..], b"hello world");
        s.delete(&p).await.expect("delete");
        assert!(matches!(
            s.get(&p).await,
            Err(object_store::Error::NotFound { .. })
        ));
        assert_eq!(s.stats().calls, 3);
        assert_eq!(
            s.stats(),
            FaultStats {
                calls: 3,
                ..FaultStats::default()
            }
        );
    }

    #[tokio::test]
    async fn each_fault_kind_fires() {
        let (s, p) = store_with(always(|f| f.error = 1.0)).await;
        let e = s.get(&p).await.expect_err("error");
        assert!(e.to_string().contains("injected error"), "{e}");
        assert_eq!(s.stats().errors, 1);

        // A reset after a PUT: the caller sees an error, the object is there anyway.
        let (s, p) = store_with(always(|f| f.reset = 1.0)).await;
        let e = s
            .put(&p, PutPayload::from_static(b"new"))
            .await
            .expect_err("reset");
        assert!(e.to_string().contains("connection reset"), "{e}");
        let inner = Arc::clone(&s.shared.inner);
        let body = inner
            .get(&p)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body");
        assert_eq!(&body[..], b"new");

        let (s, p) = store_with(always(|f| f.truncate = 1.0)).await;
        let r = s.get(&p).await.expect("get");
        assert_eq!(r.range, 0..11, "announced range is untouched");
        let body = r.bytes().await.expect("body");
        assert!(body.len() < 11 && b"hello world".starts_with(&body));
        assert_eq!(s.stats().truncations, 1);

        let (s, p) = store_with(always(|f| f.corrupt = 1.0)).await;
        let body = s.get(&p).await.expect("get").bytes().await.expect("body");
        assert_eq!(body.len(), 11);
        let flipped: u32 = body
            .iter()
            .zip(b"hello world")
            .map(|(a, b)| (a ^ b).count_ones())
            .sum();
        assert_eq!(flipped, 1);

        let (s, p) = store_with(always(|f| {
            f.latency = 1.0;
            f.max_latency = Duration::from_millis(2);
        }))
        .await;
        s.get(&p).await.expect("slow get");
        assert_eq!(s.stats().delays, 1);
    }

    #[tokio::test]
    async fn same_seed_same_faults() {
        let faults = Faults {
            error: 0.3,
            reset: 0.2,
            truncate: 0.2,
            corrupt: 0.2,
            ..Faults::none()
        };
        let mut runs = Vec::new();
        for _ in 0..2 {
            let inner = Arc::new(InMemory::new());
            let s = FaultyStore::new(inner, 0xabcdef, faults.clone());
            let p = Path::from("k");
            let mut outcomes = Vec::new();
            for i in 0..50u32 {
                let put = s.put(&p, PutPayload::from(i.to_le_bytes().to_vec())).await;
                outcomes.push(format!("{put:?}"));
                let get = match s.get(&p).await {
                    Ok(r) => format!("{:?}", r.bytes().await),
                    Err(e) => e.to_string(),
                };
                outcomes.push(get);
            }
            runs.push((outcomes, s.stats()));
        }
        assert_eq!(runs[0], runs[1]);
        let stats = runs[0].1;
        assert!(stats.errors > 0 && stats.resets > 0 && stats.truncations > 0);
        assert!(stats.corruptions > 0);
    }
}
