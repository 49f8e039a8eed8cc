//! Where the object tier lives, written as a URL:
//!
//! - `s3://bucket/optional/prefix`: any S3-compatible server, configured from
//!   [`S3Options`], then the usual `AWS_*` environment variables, then the AWS shared
//!   files (`~/.aws/credentials`, `~/.aws/config`; see `aws_profile.rs`);
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

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, Checksum};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

use crate::BlobStore;
use crate::aws_profile::{self, S3Settings};
use crate::error::{Result, TierError};
use crate::key::validate_path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    S3 { bucket: String, prefix: String },
    File { path: PathBuf },
    Memory { prefix: String },
}

/// Explicit S3 settings. Each one that is set wins over its `AWS_*` environment variable
/// (`AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`/`AWS_ENDPOINT`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`), and each variable wins
/// over the AWS shared files (`region`, `endpoint_url` and the keys of the `AWS_PROFILE`
/// profile). The access key id, secret and session token are taken as one unit from the
/// first source that has any of them: giving only one of the two keys here is an error, and
/// keys given here are used without any `AWS_SESSION_TOKEN`. The rest of the `AWS_*` family
/// (web identity, container credentials) is read as object_store documents. With no
/// credentials anywhere, object_store asks the EC2 instance metadata service, which is
/// right on EC2 and a slow failure elsewhere.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// For example `http://127.0.0.1:9000`; unset means AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Permit plain HTTP. When unset (and `AWS_ALLOW_HTTP` is too), an `http://` endpoint,
    /// from whichever source, permits it: whoever wrote that address has already chosen
    /// plain HTTP.
    pub allow_http: Option<bool>,
    /// How upload bodies are checked. When unset, `AWS_UNSIGNED_PAYLOAD` and
    /// `AWS_CHECKSUM_ALGORITHM` apply as object_store reads them, over the default
    /// [`S3Checksum::Crc64nvme`].
    pub checksum: Option<S3Checksum>,
}

/// How the body of an upload is protected on its way to the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum S3Checksum {
    /// The signature covers the request but not the body (`UNSIGNED-PAYLOAD`); an
    /// `x-amz-checksum-crc64nvme` header carries the body's CRC, which the server checks
    /// before it stores the object (AWS S3, MinIO and s3s do). This is what the AWS SDKs
    /// send. A CRC costs a small part of a SHA-256: with a signed body, hashing took half
    /// the daemon's CPU during a flush on 2 cores, and the flush ran a third slower.
    #[default]
    Crc64nvme,
    /// SigV4 signs the SHA-256 of the whole body. Every S3 server checks that.
    Signed,
    /// Neither, for a server that rejects the checksum header. A body damaged on the way
    /// is then caught only when the blob is read back (its crc32c is checked on every read).
    None,
}

impl S3Checksum {
    pub const NAMES: [&'static str; 3] = ["crc64nvme", "signed", "none"];

    fn name(self) -> &'static str {
        match self {
            S3Checksum::Crc64nvme => Self::NAMES[0],
            S3Checksum::Signed => Self::NAMES[1],
            S3Checksum::None => Self::NAMES[2],
        }
    }

    /// Sets what this choice needs on a builder that has no payload settings yet.
    fn apply(self, b: AmazonS3Builder) -> AmazonS3Builder {
        match self {
            S3Checksum::Crc64nvme => b
                .with_unsigned_payload(true)
                .with_checksum_algorithm(Checksum::CRC64NVME),
            S3Checksum::Signed => b.with_unsigned_payload(false),
            S3Checksum::None => b.with_unsigned_payload(true),
        }
    }
}

impl fmt::Display for S3Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for S3Checksum {
    type Err = TierError;

    fn from_str(s: &str) -> Result<S3Checksum> {
        [S3Checksum::Crc64nvme, S3Checksum::Signed, S3Checksum::None]
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                TierError::Invalid(format!(
                    "S3 checksum {s:?}: expected one of {}",
                    Self::NAMES.join(", ")
                ))
            })
    }
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
            .field("checksum", &self.checksum)
            .finish()
    }
}

impl S3Options {
    /// Where an `s3://` store opened with these options would take its credentials from,
    /// for a log line or for refusing to start: `Ok(None)` means nowhere, so object_store
    /// would fall back to container or EC2 instance-metadata credentials. Errors are the
    /// ones [`StoreUrl::open`] would report (half a key pair, a named profile that does not
    /// exist, an unreadable or malformed shared file).
    pub fn credential_source(&self) -> Result<Option<String>> {
        let settings = aws_profile::resolve(self, &aws_profile::process_env)?;
        Ok(settings.source.map(|s| s.to_string()))
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

/// The settings that `aws_profile::resolve` decides, with their precedence and the rule
/// that a key pair never comes half from one source; the builder must not also pick them
/// up from the environment behind its back.
fn resolved_by_us(key: &AmazonS3ConfigKey) -> bool {
    matches!(
        key,
        AmazonS3ConfigKey::AccessKeyId
            | AmazonS3ConfigKey::SecretAccessKey
            | AmazonS3ConfigKey::Token
            | AmazonS3ConfigKey::Region
            | AmazonS3ConfigKey::DefaultRegion
            | AmazonS3ConfigKey::Endpoint
            | AmazonS3ConfigKey::S3Endpoint
    )
}

/// `AmazonS3Builder::from_env()`, less the keys in [`resolved_by_us`], over our payload
/// default. An explicit `checksum` replaces both the default and the environment's
/// payload settings.
fn builder_from_env(checksum: Option<S3Checksum>) -> AmazonS3Builder {
    let vars = std::env::vars_os()
        .filter_map(|(n, v)| Some((n.into_string().ok()?, v.into_string().ok()?)));
    builder_from(vars, checksum)
}

/// [`builder_from_env`] over the given variables.
fn builder_from(
    vars: impl IntoIterator<Item = (String, String)>,
    checksum: Option<S3Checksum>,
) -> AmazonS3Builder {
    let mut b = checksum.unwrap_or_default().apply(AmazonS3Builder::new());
    let payload_key = |key: &AmazonS3ConfigKey| {
        matches!(
            key,
            AmazonS3ConfigKey::UnsignedPayload | AmazonS3ConfigKey::Checksum
        )
    };
    for (name, value) in vars {
        if name.starts_with("AWS_")
            && let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>()
            && !resolved_by_us(&key)
            && !(checksum.is_some() && payload_key(&key))
        {
            b = b.with_config(key, value);
        }
    }
    b
}

fn open_s3(bucket: &str, opts: &S3Options) -> Result<object_store::aws::AmazonS3> {
    let settings = aws_profile::resolve(opts, &aws_profile::process_env)?;
    if let Some(source) = &settings.source {
        tracing::debug!(bucket, credentials = %source, "S3 credentials");
    }
    build_s3(bucket, settings, opts.checksum)
}

fn build_s3(
    bucket: &str,
    settings: S3Settings,
    checksum: Option<S3Checksum>,
) -> Result<object_store::aws::AmazonS3> {
    let mut b = builder_from_env(checksum)
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
    if let Some(endpoint) = &settings.endpoint {
        b = b.with_endpoint(endpoint);
    }
    if let Some(region) = &settings.region {
        b = b.with_region(region);
    }
    if let Some(creds) = &settings.credentials {
        b = b
            .with_access_key_id(&creds.key_id)
            .with_secret_access_key(&creds.secret);
        if let Some(token) = &creds.token {
            b = b.with_token(token);
        }
    }
    if let Some(allow) = settings.allow_http {
        b = b.with_allow_http(allow);
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
            checksum: None,
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

    #[test]
    fn builds_s3_from_resolved_settings_with_a_session_token() {
        let settings = S3Settings {
            endpoint: Some("http://127.0.0.1:1".into()),
            region: Some("eu-west-1".into()),
            credentials: Some(aws_profile::Credentials {
                key_id: "ASIATEMP".into(),
                secret: "secret".into(),
                token: Some("token".into()),
            }),
            source: None,
            allow_http: Some(true),
        };
        build_s3("bucket", settings, None).expect("s3 builds offline");
    }

    #[test]
    fn upload_checksum_defaults_to_crc64nvme_and_the_environment_or_a_flag_changes_it() {
        let payload = |vars: &[(&str, &str)], checksum| {
            let vars = vars.iter().map(|(n, v)| (n.to_string(), v.to_string()));
            let b = builder_from(vars, checksum);
            (
                b.get_config_value(&AmazonS3ConfigKey::UnsignedPayload),
                b.get_config_value(&AmazonS3ConfigKey::Checksum),
            )
        };
        let (unsigned, crc) = (Some("true".to_string()), Some("crc64nvme".to_string()));
        assert_eq!(payload(&[], None), (unsigned.clone(), crc.clone()));
        // The environment wins over the default...
        assert_eq!(
            payload(&[("AWS_UNSIGNED_PAYLOAD", "false")], None),
            (Some("false".into()), crc.clone())
        );
        assert_eq!(
            payload(&[("AWS_CHECKSUM_ALGORITHM", "sha256")], None).1,
            Some("sha256".into())
        );
        // ...and an explicit choice over both.
        let env = [
            ("AWS_UNSIGNED_PAYLOAD", "false"),
            ("AWS_CHECKSUM_ALGORITHM", "sha256"),
        ];
        assert_eq!(payload(&env, Some(S3Checksum::None)), (unsigned, None));
        assert_eq!(
            payload(&env, Some(S3Checksum::Signed)),
            (Some("false".into()), None)
        );
        assert_eq!(payload(&[], Some(S3Checksum::Crc64nvme)).1, crc);
    }

    #[test]
    fn s3_checksum_names_round_trip_and_a_bad_one_lists_the_choices() {
        for name in S3Checksum::NAMES {
            let c: S3Checksum = name.parse().expect("known name");
            assert_eq!(c.to_string(), name);
            let json = serde_json::to_string(&c).expect("json");
            assert_eq!(json, format!("{name:?}"));
        }
        let e = "md5".parse::<S3Checksum>().expect_err("unknown");
        assert!(e.to_string().contains("crc64nvme, signed, none"), "{e}");
    }
}
