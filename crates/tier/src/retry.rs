//! Retries with exponential backoff and full jitter.
//!
//! Full jitter (sleep a uniform time in `[0, min(max_delay, base·2^n)]`) rather than a fixed
//! exponential schedule: when an object store stumbles, every uploader of every node sees
//! it at once, and spreading the retries is what lets the store recover (see AWS's
//! "Exponential Backoff And Jitter").
//!
//! This is the whole-operation retry. object_store's S3 client also retries each HTTP
//! request a few times; this layer adds what it cannot see, such as a body that came back
//! with the wrong checksum.

use std::future::Future;
use std::time::Duration;

use crate::TierError;
use crate::rng::SplitMix64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; 1 means no retry. 0 is treated as 1.
    pub max_attempts: u32,
    /// Upper bound of the first backoff; doubled for each further retry.
    pub base_delay: Duration,
    /// No single backoff exceeds this.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// Five attempts over at most ~6 s of sleeping: long enough to ride out a throttle or a
    /// restarting endpoint, short enough that a real outage reaches the caller (which then
    /// keeps the data on flash and tries again later).
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        }
    }

    /// The largest backoff before retry number `retry` (0 for the first retry):
    /// `min(max_delay, base_delay · 2^retry)`, without overflow.
    pub fn backoff_cap(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.min(31);
        self.base_delay
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max_delay)
    }

    /// A full-jitter backoff before retry number `retry`: uniform in `[0, backoff_cap]`.
    pub fn backoff(&self, retry: u32, rng: &mut SplitMix64) -> Duration {
        let cap = self.backoff_cap(retry).as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(rng.up_to(cap))
    }
}

/// Retries made by this process, over all stores (for `cfs status`).
pub static RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs `op` until it succeeds, fails with an error that is not
/// [retryable](TierError::is_retryable), or has been tried `policy.max_attempts` times.
///
/// On giving up it returns the last error, except that a `Corrupt` seen on any attempt
/// outranks a later `Unavailable`: a wrong body is evidence about the object (the caller
/// should repair it from elsewhere), while `Unavailable` is only about the path to it.
///
/// `op` is called afresh for every attempt, so it must be safe to repeat: our PUTs write a
/// whole immutable object and DELETE of a missing key is Ok, so both are.
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, op: F) -> Result<T, TierError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, TierError>>,
{
    retry_while(policy, TierError::is_retryable, op).await
}

/// [`retry`], with the caller deciding which errors are worth another attempt (a subset
/// of the retryable ones: see `BlobStore`'s suspects).
pub async fn retry_while<T, F, Fut>(
    policy: &RetryPolicy,
    retryable: impl Fn(&TierError) -> bool,
    mut op: F,
) -> Result<T, TierError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, TierError>>,
{
    let mut rng = None;
    let mut corrupt = None;
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && retryable(&e) && attempt < policy.max_attempts => {
                RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let rng = rng.get_or_insert_with(SplitMix64::from_entropy);
                let delay = policy.backoff(attempt - 1, rng);
                tracing::warn!(
                    attempt,
                    max_attempts = policy.max_attempts,
                    ?delay,
                    error = %e,
                    "object store operation failed; retrying"
                );
                if matches!(e, TierError::Corrupt { .. }) {
                    corrupt = Some(e);
                }
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e @ TierError::Unavailable { .. }) => return Err(corrupt.unwrap_or(e)),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn unavailable() -> TierError {
        TierError::Unavailable {
            op: "get",
            key: "k".into(),
            source: object_store::Error::Generic {
                store: "test",
                source: "flaky".into(),
            },
        }
    }

    #[test]
    fn backoff_caps_double_then_saturate() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        };
        let ms = |r| p.backoff_cap(r).as_millis();
        assert_eq!(
            (0..8).map(ms).collect::<Vec<_>>(),
            [100, 200, 400, 800, 1600, 3200, 5000, 5000]
        );
        // Absurd retry counts neither overflow nor exceed the cap.
        assert_eq!(p.backoff_cap(31), Duration::from_secs(5));
        assert_eq!(p.backoff_cap(u32::MAX), Duration::from_secs(5));
        let huge = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::MAX,
            max_delay: Duration::MAX,
        };
        assert_eq!(huge.backoff_cap(40), Duration::MAX);
        let _ = huge.backoff(40, &mut SplitMix64::new(1));
        assert_eq!(RetryPolicy::none().backoff_cap(3), Duration::ZERO);
    }

    #[test]
    fn jitter_is_full_and_bounded() {
        let p = RetryPolicy::default();
        let mut rng = SplitMix64::new(0xfeed);
        for retry in 0..10 {
            let cap = p.backoff_cap(retry);
            let samples: Vec<Duration> = (0..2_000).map(|_| p.backoff(retry, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d <= cap), "retry {retry}");
            // Full jitter: spread over the whole of [0, cap], mean near cap/2.
            let min = samples.iter().min().copied().unwrap_or_default();
            let max = samples.iter().max().copied().unwrap_or_default();
            assert!(min < cap / 20, "retry {retry}: min {min:?} of {cap:?}");
            assert!(max > cap * 19 / 20, "retry {retry}: max {max:?} of {cap:?}");
            let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
            assert!(
                mean > cap * 2 / 5 && mean < cap * 3 / 5,
                "retry {retry}: mean {mean:?} of {cap:?}"
            );
        }
    }

    fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn retries_retryable_until_success() {
        let calls = Cell::new(0);
        let r = retry(&fast(5), || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { if n < 3 { Err(unavailable()) } else { Ok(n) } }
        })
        .await;
        assert_eq!(r.expect("third attempt succeeds"), 3);
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts() {
        let calls = Cell::new(0);
        let r: Result<(), _> = retry(&fast(4), || {
            calls.set(calls.get() + 1);
            async { Err(unavailable()) }
        })
        .await;
        assert!(matches!(r, Err(TierError::Unavailable { .. })));
        assert_eq!(calls.get(), 4);

        calls.set(0);
        let r: Result<(), _> = retry(&RetryPolicy::none(), || {
            calls.set(calls.get() + 1);
            async { Err(unavailable()) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test]
    async fn corrupt_outranks_a_later_unavailable() {
        let calls = Cell::new(0);
        let r: Result<(), _> = retry(&fast(3), || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n == 1 {
                    Err(TierError::Corrupt {
                        key: "k".into(),
                        expected: crate::Fingerprint {
                            len: 1,
                            crc32c: None,
                        },
                        found: crate::Fingerprint {
                            len: 0,
                            crc32c: None,
                        },
                    })
                } else {
                    Err(unavailable())
                }
            }
        })
        .await;
        assert!(matches!(r, Err(TierError::Corrupt { .. })), "{r:?}");
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test]
    async fn never_retries_permanent_errors() {
        for err in [
            || TierError::NotFound { key: "k".into() },
            || TierError::Invalid("bad".into()),
        ] {
            let calls = Cell::new(0);
            let r: Result<(), _> = retry(&fast(5), || {
                calls.set(calls.get() + 1);
                async move { Err(err()) }
            })
            .await;
            assert!(r.is_err());
            assert_eq!(calls.get(), 1);
        }
    }
}
