//! Where the object tier lives, written as a URL:
//!
//! - `s3://bucket/optional/prefix`: any S3-compatible server, configured from the usual
//!   `AWS_*` environment variables and then from [`S3Options`];
//! - `file:///absolute/dir`: a local directory standing in for S3 (the zero-setup default);
//! - `memory://` or `memory:///prefix`: a fresh in-process store, for tests.
//!
//! The parser is ours, not a general URL parser, so that every mistake gets a message that
//! names it (a relative file path, a missing bucket) instead of being normalised away.

use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

use crate::BlobStore;
use crate::error::{Result, TierError};
use crate::key::validate_path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    S3 { bucket: String, prefix: String },
    File { path: PathBuf },
    Memory { prefix: String },
}

/// Explicit S3 settings. Each one that is set wins over its `AWS_*` environment variable
/// (`AWS_ENDPOINT`/`AWS_ENDPOINT_URL`/`AWS_ENDPOINT_URL_S3`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`); the rest of the `AWS_*`
/// family (session token, web identity, container credentials) is read as object_store
/// documents. With no credentials anywhere, object_store asks the EC2 instance metadata
/// service, which is right on EC2 and a slow failure elsewhere.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// For example `http://127.0.0.1:9000`; unset means AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Permit plain HTTP. When unset, an explicit `http://` endpoint permits it: whoever
    /// typed that address has already chosen plain HTTP.
    pub allow_http: Option<bool>,
}

/// Hand-written so the secret key never lands in a log line.
impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

fn invalid(url: &str, why: impl fmt::Display) -> TierError {
    TierError::Invalid(format!("store URL {url:?}: {why}"))
}

/// Checks an optional key prefix taken from a URL path.
fn parse_prefix(url: &str, raw: &str) -> Result<String> {
    let prefix = raw.trim_matches('/');
    if !prefix.is_empty() {
        validate_path(prefix, "key prefix").map_err(|e| invalid(url, e))?;
    }
    Ok(prefix.to_string())
}

impl FromStr for StoreUrl {
    type Err = TierError;

    fn from_str(url: &str) -> Result<StoreUrl> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid(
                url,
                "no scheme; expected s3://bucket/prefix, file:///abs/path or memory://",
            ));
        };
        if rest.contains(['?', '#']) {
            return Err(invalid(
                url,
                "query strings and fragments are not supported; pass S3 settings as options",
            ));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(invalid(url, "missing bucket; expected s3://bucket/prefix"));
                }
                // S3's bucket naming rules, minus the rarely-relevant ones.
                let ok_chars = bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'
                });
                if !(3..=63).contains(&bucket.len()) || !ok_chars {
                    return Err(invalid(
                        url,
                        format!("bad bucket name {bucket:?}: 3 to 63 characters of a-z 0-9 . -"),
                    ));
                }
                Ok(StoreUrl::S3 {
                    bucket: bucket.to_string(),
                    prefix: parse_prefix(url, prefix)?,
                })
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(invalid(
                        url,
                        "relative path; a file URL needs an absolute path, as in file:///abs/path",
                    ));
                }
                let path = FsPath::new(rest);
                if path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    return Err(invalid(url, "path must not contain '..'"));
                }
                Ok(StoreUrl::File {
                    path: path.to_path_buf(),
                })
            }
            "memory" => Ok(StoreUrl::Memory {
                prefix: parse_prefix(url, rest)?,
            }),
            other => Err(invalid(
                url,
                format!("unknown scheme {other:?}; expected s3, file or memory"),
            )),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::File { path } => write!(f, "file://{}", path.display()),
            StoreUrl::Memory { prefix } if prefix.is_empty() => write!(f, "memory://"),
            StoreUrl::Memory { prefix } => write!(f, "memory:///{prefix}"),
        }
    }
}

impl StoreUrl {
    /// The key prefix that [`StoreUrl::open`] puts in front of every key.
    pub fn prefix(&self) -> &str {
        match self {
            StoreUrl::S3 { prefix, .. } | StoreUrl::Memory { prefix } => prefix,
            // The directory is the root; there is nothing to prefix.
            StoreUrl::File { .. } => "",
        }
    }

    /// Builds the object store this URL names. For `file://` the directory is created;
    /// for `s3://` nothing is contacted yet (the first request finds out whether the
    /// endpoint and credentials work). Each `memory://` open is a new, empty store.
    pub fn object_store(&self, opts: &S3Options) -> Result<Arc<dyn ObjectStore>> {
        match self {
            StoreUrl::S3 { bucket, .. } => Ok(Arc::new(open_s3(bucket, opts)?)),
            StoreUrl::File { path } => {
                std::fs::create_dir_all(path).map_err(|e| TierError::Other {
                    context: format!("creating object directory {}", path.display()),
                    source: Box::new(e),
                })?;
                let fs = LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| TierError::Other {
                        context: format!("opening object directory {}", path.display()),
                        source: Box::new(e),
                    })?
                    // A PUT to S3 is durable when it returns, and eviction trusts that: so
                    // must a PUT here be.
                    .with_fsync(true)
                    // Blob directories empty out as generations are deleted; don't keep them.
                    .with_automatic_cleanup(true);
                Ok(Arc::new(fs))
            }
            StoreUrl::Memory { .. } => Ok(Arc::new(InMemory::new())),
        }
    }

    /// [`StoreUrl::object_store`] wrapped in a [`BlobStore`] with this URL's prefix.
    pub fn open(&self, opts: &S3Options) -> Result<BlobStore> {
        BlobStore::new(self.object_store(opts)?, self.prefix())
    }
}

fn open_s3(bucket: &str, opts: &S3Options) -> Result<object_store::aws::AmazonS3> {
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        // Bulk delete is a POST of an XML list, which some S3-compatible servers lack, and
        // which DESIGN.md rules out: we use single-object DELETE only.
        .with_disable_bulk_delete(true)
        // object_store retries each HTTP request; keep that short, because the BlobStore's
        // RetryPolicy owns the overall budget and would otherwise multiply it.
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        });
    if let Some(endpoint) = &opts.endpoint {
        // AWS_ENDPOINT_URL_S3 outranks the plain endpoint inside object_store; set both so
        // that the explicit option wins over any environment variable.
        b = b
            .with_endpoint(endpoint)
            .with_config(AmazonS3ConfigKey::S3Endpoint, endpoint);
    }
    if let Some(region) = &opts.region {
        b = b.with_region(region);
    }
    if let Some(key) = &opts.access_key_id {
        b = b.with_access_key_id(key);
    }
    if let Some(secret) = &opts.secret_access_key {
        b = b.with_secret_access_key(secret);
    }
    let plain_http_endpoint = opts
        .endpoint
        .as_deref()
        .is_some_and(|e| e.to_ascii_lowercase().starts_with("http://"));
    match opts.allow_http {
        Some(allow) => b = b.with_allow_http(allow),
        None if plain_http_endpoint => b = b.with_allow_http(true),
        None => {}
    }
    b.build()
        .map_err(|e| TierError::Invalid(format!("S3 configuration for bucket {bucket:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> StoreUrl {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        match s.parse::<StoreUrl>() {
            Ok(u) => panic!("{s} parsed as {u:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_the_three_schemes() {
        assert_eq!(
            parse("s3://my-bucket/cfs/prod"),
            StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "cfs/prod".into()
            }
        );
        assert_eq!(
            parse("s3://my-bucket"),
            StoreUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "".into()
            }
        );
        assert_eq!(parse("s3://my-bucket/").prefix(), "");
        assert_eq!(parse("S3://my-bucket/p/").prefix(), "p");
        assert_eq!(
            parse("file:///var/lib/cfs/objects"),
            StoreUrl::File {
                path: "/var/lib/cfs/objects".into()
            }
        );
        assert_eq!(parse("memory://"), StoreUrl::Memory { prefix: "".into() });
        assert_eq!(parse("memory:///a/b").prefix(), "a/b");
        for s in [
            "s3://b.b-b/x/y",
            "s3://bbb",
            "file:///tmp/x",
            "memory://",
            "memory:///p",
        ] {
            assert_eq!(parse(s).to_string(), s);
        }
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        assert!(err("ftp://x/y").contains("unknown scheme \"ftp\""));
        assert!(err("bucket/prefix").contains("no scheme"));
        assert!(err("s3://").contains("missing bucket"));
        assert!(err("s3:///prefix").contains("missing bucket"));
        assert!(err("s3://Bad_Bucket/x").contains("bad bucket name"));
        assert!(err("s3://ab").contains("bad bucket name"));
        assert!(err("s3://bucket/a//b").contains("bad segment"));
        assert!(err("s3://bucket/a/../b").contains("bad segment"));
        assert!(err("s3://bucket/x?region=y").contains("query strings"));
        assert!(err("file://relative/path").contains("relative path"));
        assert!(err("file://").contains("relative path"));
        assert!(err("file:///a/../b").contains(".."));
        assert!(err("memory:///a b").contains("bad segment"));
    }

    #[tokio::test]
    async fn opens_memory_and_file() {
        let mem = parse("memory:///pre")
            .open(&S3Options::default())
            .expect("memory");
        assert_eq!(mem.prefix(), "pre");

        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("not/yet/there");
        let url = parse(&format!("file://{}", root.display()));
        let store = url.open(&S3Options::default()).expect("file");
        assert!(root.is_dir(), "file:// open creates the directory");
        let key = crate::ObjectKey::new("fs/meta/HEAD").expect("key");
        store
            .put(&key, bytes::Bytes::from_static(b"x"))
            .await
            .expect("put");
        assert!(root.join("fs/meta/HEAD").is_file());
    }

    #[test]
    fn opens_s3_without_contacting_it() {
        let opts = S3Options {
            endpoint: Some("http://127.0.0.1:1".into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("ak".into()),
            secret_access_key: Some("very-secret".into()),
            allow_http: None,
        };
        let store = parse("s3://bucket/pre")
            .open(&opts)
            .expect("s3 builds offline");
        assert_eq!(store.prefix(), "pre");
        assert!(!format!("{opts:?}").contains("very-secret"));

        // An access key without its secret is a configuration error, reported as such.
        let half = S3Options {
            secret_access_key: None,
            ..opts
        };
        let e = parse("s3://bucket")
            .open(&half)
            .expect_err("half credentials");
        assert!(matches!(e, TierError::Invalid(_)), "{e}");
    }
}
