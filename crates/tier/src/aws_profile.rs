//! S3 settings from the AWS shared files, the way the AWS CLI finds them.
//!
//! Operators already keep their keys in `~/.aws/credentials` and their region or endpoint
//! in `~/.aws/config`; making them copy those into `AWS_*` variables before every mount is
//! friction and puts secrets in shell history. So, for `s3://` only, each setting is taken
//! from the first of these that gives it:
//!
//! 1. [`S3Options`] (the command-line flags);
//! 2. the `AWS_*` environment variables;
//! 3. the profile named by `AWS_PROFILE` (default `default`): first from the credentials
//!    file (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`, sections `[NAME]`),
//!    then from the config file (`AWS_CONFIG_FILE`, default `~/.aws/config`, sections
//!    `[profile NAME]`, and `[default]`), as the AWS SDKs merge them.
//!
//! The key id, secret and session token travel as one unit from one source: a key id from
//! one place signed with a secret from another is never what anyone meant, and the failure
//! it causes (a signature mismatch at the first request) names neither.
//!
//! The parser is ours (about a hundred lines) because the shared files are not quite INI:
//! an indented line continues the property above it (that is how `s3 =` sub-sections are
//! written), `#`/`;` start a comment at the start of a line or after whitespace, and
//! section names are case-sensitive while keys are not. The general INI crates get one or
//! another of those wrong, and a wrong parse here turns into a confusing signing error.
//!
//! Everything below takes the environment as a lookup function, so tests run against
//! temporary files and never see the real home directory.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Result, TierError};
use crate::store_url::S3Options;

/// Looks up an environment variable. Tests pass a map; [`process_env`] is the real one.
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, with `HOME` falling back to the password database so that a
/// service started without `HOME` (a systemd unit without `User=`) still finds
/// `~/.aws`, as the AWS CLI's `expanduser` would.
pub(crate) fn process_env(name: &str) -> Option<String> {
    let value = std::env::var(name).ok().filter(|v| !v.is_empty());
    if value.is_none() && name == "HOME" {
        return nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .and_then(|u| u.dir.to_str().map(str::to_string))
            .filter(|d| !d.is_empty());
    }
    value
}

/// A variable's value; empty counts as unset, as it does for the AWS CLI, so that
/// `AWS_PROFILE=` in a script means "no profile" rather than a profile named "".
fn var(env: Env<'_>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.is_empty())
}

/// An access key pair and its session token, which only make sense together.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub key_id: String,
    pub secret: String,
    pub token: Option<String>,
}

/// Hand-written so that neither the secret nor the token ever lands in a log line.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("key_id", &self.key_id)
            .field("secret", &"<redacted>")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Where the credentials came from, for log lines and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CredentialSource {
    Options,
    Environment,
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`: object_store fetches the keys
    /// itself. The AWS CLI ranks this above the shared files, and so do we, so that a pod
    /// with a role keeps using it even if some `~/.aws` is mounted into it.
    WebIdentity,
    SharedFile {
        profile: String,
        path: PathBuf,
    },
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::Options => write!(f, "S3 options"),
            CredentialSource::Environment => {
                write!(f, "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
            }
            CredentialSource::WebIdentity => {
                write!(
                    f,
                    "web identity (AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN)"
                )
            }
            CredentialSource::SharedFile { profile, path } => {
                write!(f, "profile {profile:?} in {}", path.display())
            }
        }
    }
}

/// The S3 settings after precedence has been applied. `None` everywhere means "leave it
/// to object_store": AWS's default endpoint, `us-east-1`, and for credentials its own
/// chain (container credentials, then the EC2 instance metadata service).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials: Option<Credentials>,
    pub source: Option<CredentialSource>,
    pub allow_http: Option<bool>,
}

/// Applies flags > environment > shared files to every setting. The shared files are read
/// only if flags and environment leave something unset, so a fully specified mount never
/// depends on (or trips over) whatever is in `~/.aws`.
pub(crate) fn resolve(opts: &S3Options, env: Env<'_>) -> Result<S3Settings> {
    let mut s = S3Settings {
        endpoint: opts.endpoint.clone().or_else(|| {
            // object_store's order: the S3-specific variable outranks the general ones.
            ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                .iter()
                .find_map(|n| var(env, n))
        }),
        region: opts
            .region
            .clone()
            .or_else(|| var(env, "AWS_REGION"))
            .or_else(|| var(env, "AWS_DEFAULT_REGION")),
        ..S3Settings::default()
    };

    match (&opts.access_key_id, &opts.secret_access_key) {
        (Some(key_id), Some(secret)) => {
            // No token: S3Options has none, and an environment token belongs to the
            // environment's keys, not to these.
            s.credentials = Some(Credentials {
                key_id: key_id.clone(),
                secret: secret.clone(),
                token: None,
            });
            s.source = Some(CredentialSource::Options);
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(TierError::Invalid(
                "S3 options give only one of access_key_id and secret_access_key; give both \
                 or neither"
                    .into(),
            ));
        }
        (None, None) => {
            match (
                var(env, "AWS_ACCESS_KEY_ID"),
                var(env, "AWS_SECRET_ACCESS_KEY"),
            ) {
                (Some(key_id), Some(secret)) => {
                    s.credentials = Some(Credentials {
                        key_id,
                        secret,
                        // object_store accepts either name.
                        token: var(env, "AWS_SESSION_TOKEN").or_else(|| var(env, "AWS_TOKEN")),
                    });
                    s.source = Some(CredentialSource::Environment);
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(TierError::Invalid(
                        "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set; set \
                         both or neither (credentials are never combined from different \
                         sources)"
                            .into(),
                    ));
                }
                (None, None) => {
                    if var(env, "AWS_WEB_IDENTITY_TOKEN_FILE").is_some()
                        && var(env, "AWS_ROLE_ARN").is_some()
                    {
                        s.source = Some(CredentialSource::WebIdentity);
                    }
                }
            }
        }
    }

    if s.source.is_none() || s.region.is_none() || s.endpoint.is_none() {
        let profile = load_profile(env)?;
        if s.source.is_none()
            && let Some((creds, source)) = profile.credentials
        {
            s.credentials = Some(creds);
            s.source = Some(source);
        }
        s.region = s.region.or(profile.region);
        s.endpoint = s.endpoint.or(profile.endpoint_url);
    }

    s.allow_http = match opts.allow_http {
        Some(allow) => Some(allow),
        // object_store reads AWS_ALLOW_HTTP itself; an explicit setting is not overridden.
        None if var(env, "AWS_ALLOW_HTTP").is_some() => None,
        // Whoever wrote an http:// endpoint, in a flag, a variable or ~/.aws/config, has
        // already chosen plain HTTP (a local MinIO, say); refusing it would only make them
        // say so twice.
        None if s
            .endpoint
            .as_deref()
            .is_some_and(|e| e.to_ascii_lowercase().starts_with("http://")) =>
        {
            Some(true)
        }
        None => None,
    };
    Ok(s)
}

/// What one profile in the shared files gives.
#[derive(Debug, Default)]
pub(crate) struct ProfileSettings {
    pub credentials: Option<(Credentials, CredentialSource)>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// Reads the profile named by `AWS_PROFILE` (or `default`) from the two shared files.
/// Missing files are not an error, and neither is a missing `default` profile; a profile
/// that was asked for by name and is nowhere to be found is, since carrying on would
/// silently use other credentials than the operator chose.
pub(crate) fn load_profile(env: Env<'_>) -> Result<ProfileSettings> {
    let named = var(env, "AWS_PROFILE");
    let name = named.as_deref().unwrap_or("default");
    let home = var(env, "HOME");
    let paths = [
        (
            shared_file_path(env, "AWS_SHARED_CREDENTIALS_FILE", "credentials", &home),
            FileKind::Credentials,
        ),
        (
            shared_file_path(env, "AWS_CONFIG_FILE", "config", &home),
            FileKind::Config,
        ),
    ];
    let mut files = Vec::new();
    for (path, kind) in &paths {
        if let Some(path) = path
            && let Some(file) = read_shared_file(path, *kind)?
        {
            files.push(file);
        }
    }
    // Credentials file first: it wins wherever both files set a key, as in the AWS SDKs.
    let sections: Vec<(&SharedFile, &Section)> = files
        .iter()
        .filter_map(|f| f.profiles.get(name).map(|s| (f, s)))
        .collect();

    if sections.is_empty() {
        if named.is_some() {
            let looked_at: Vec<String> = paths
                .iter()
                .map(|(p, kind)| match p {
                    Some(p) if p.exists() => format!("{}", p.display()),
                    Some(p) => format!("{} (absent)", p.display()),
                    None => format!("the {} file (no HOME to find it in)", kind.word()),
                })
                .collect();
            return Err(TierError::Invalid(format!(
                "AWS_PROFILE names profile {name:?}, which is in neither {}",
                looked_at.join(" nor ")
            )));
        }
        return Ok(ProfileSettings::default());
    }

    let mut out = ProfileSettings::default();
    // The pair and its token come from the first file that mentions either key, never
    // half from each.
    for (file, section) in &sections {
        let key_id = get(file, section, "aws_access_key_id")?;
        let secret = get(file, section, "aws_secret_access_key")?;
        let (key_id, secret) = match (key_id, secret) {
            (None, None) => continue,
            (Some(k), Some(s)) if !k.is_empty() && !s.is_empty() => (k, s),
            _ => {
                let line = section
                    .get("aws_access_key_id")
                    .or_else(|| section.get("aws_secret_access_key"))
                    .map_or(0, |e| e.line);
                return Err(file.error(
                    line,
                    format!(
                        "profile {name:?} needs both aws_access_key_id and \
                         aws_secret_access_key, non-empty, in the same file"
                    ),
                ));
            }
        };
        out.credentials = Some((
            Credentials {
                key_id: key_id.to_string(),
                secret: secret.to_string(),
                token: get(file, section, "aws_session_token")?
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            },
            CredentialSource::SharedFile {
                profile: name.to_string(),
                path: file.path.clone(),
            },
        ));
        break;
    }
    for (file, section) in &sections {
        if out.region.is_none() {
            out.region = get(file, section, "region")?
                .filter(|v| !v.is_empty())
                .map(str::to_string);
        }
        if out.endpoint_url.is_none() {
            out.endpoint_url = get(file, section, "endpoint_url")?
                .filter(|v| !v.is_empty())
                .map(str::to_string);
        }
    }
    Ok(out)
}

/// `$VAR` if set (with a leading `~` expanded, as the CLI does), else `~/.aws/NAME`.
fn shared_file_path(
    env: Env<'_>,
    var_name: &str,
    file_name: &str,
    home: &Option<String>,
) -> Option<PathBuf> {
    match var(env, var_name) {
        Some(p) => match (p.strip_prefix('~'), home) {
            (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with('/') => {
                Some(PathBuf::from(format!("{home}{rest}")))
            }
            _ => Some(PathBuf::from(p)),
        },
        None => home
            .as_ref()
            .map(|h| Path::new(h).join(".aws").join(file_name)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    /// Sections are profile names as they stand: `[default]`, `[work]`.
    Credentials,
    /// Profiles are `[profile NAME]` and `[default]`; other sections (`[sso-session x]`,
    /// `[services x]`) are not profiles and are skipped.
    Config,
}

impl FileKind {
    fn word(self) -> &'static str {
        match self {
            FileKind::Credentials => "credentials",
            FileKind::Config => "config",
        }
    }
}

/// One `key = value` line. The line number is kept so that an error about a value can
/// point at it.
#[derive(Debug)]
struct Entry {
    value: String,
    line: usize,
    /// Indented lines followed it: a multi-line value or an `s3 =` style sub-section.
    continued: bool,
}

type Section = HashMap<String, Entry>;

#[derive(Debug)]
struct SharedFile {
    path: PathBuf,
    profiles: HashMap<String, Section>,
}

impl SharedFile {
    fn error(&self, line: usize, why: impl fmt::Display) -> TierError {
        file_error(&self.path, line, why)
    }
}

fn file_error(path: &Path, line: usize, why: impl fmt::Display) -> TierError {
    TierError::Invalid(format!("{}:{line}: {why}", path.display()))
}

/// A key's value, refusing one that continues on indented lines: ClaudeFS reads only
/// one-line values, and silently taking the first line of a multi-line secret would sign
/// with the wrong key.
fn get<'a>(file: &SharedFile, section: &'a Section, key: &str) -> Result<Option<&'a str>> {
    match section.get(key) {
        Some(e) if e.continued => Err(file.error(
            e.line,
            format!("{key} continues on indented lines; only one-line values are supported"),
        )),
        Some(e) => Ok(Some(e.value.as_str())),
        None => Ok(None),
    }
}

/// `Ok(None)` if the file does not exist; any other failure to read it is an error, since
/// an unreadable credentials file is something the operator needs to hear about.
fn read_shared_file(path: &Path, kind: FileKind) -> Result<Option<SharedFile>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(TierError::Invalid(format!(
                "cannot read AWS {} file {}: {e}",
                kind.word(),
                path.display()
            )));
        }
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        file_error(path, line, "not valid UTF-8")
    })?;
    parse_shared_file(&text, path, kind).map(Some)
}

/// Parses a shared credentials or config file into profiles. Follows Python's
/// `configparser` as the AWS CLI uses it, with the AWS SDKs' inline comments:
///
/// - blank lines, and lines whose first non-blank character is `#` or `;`, are comments;
/// - a line indented deeper than the property above it continues that property;
/// - `[name]` starts a section; a comment may follow the `]`;
/// - `key = value` (or `key: value`) sets a property; keys are case-insensitive, section
///   names are not; ` #` or ` ;` starts a trailing comment;
/// - a repeated section or key merges into the earlier one, the later value winning.
fn parse_shared_file(text: &str, path: &Path, kind: FileKind) -> Result<SharedFile> {
    let mut profiles: HashMap<String, Section> = HashMap::new();
    // None: before the first section. Some(None): a section that is not a profile.
    let mut section: Option<Option<String>> = None;
    // The current property's indentation and key, for continuation lines.
    let mut property: Option<(usize, String)> = None;

    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let body = raw.trim_start_matches([' ', '\t']);
        let indent = raw.len() - body.len();
        let body = body.trim_end();
        if body.is_empty() || body.starts_with(['#', ';']) {
            continue;
        }
        if let Some((prop_indent, key)) = &property
            && indent > *prop_indent
        {
            if let Some(Some(name)) = &section
                && let Some(entry) = profiles.get_mut(name).and_then(|s| s.get_mut(key))
            {
                entry.continued = true;
            }
            continue;
        }
        if let Some(header) = body.strip_prefix('[') {
            let Some((name, rest)) = header.split_once(']') else {
                return Err(file_error(
                    path,
                    line_no,
                    "section header has no closing ']'",
                ));
            };
            let rest = rest.trim_start();
            if !(rest.is_empty() || rest.starts_with(['#', ';'])) {
                return Err(file_error(
                    path,
                    line_no,
                    format!("unexpected {rest:?} after section header"),
                ));
            }
            let name = name.trim();
            if name.is_empty() {
                return Err(file_error(path, line_no, "empty section name"));
            }
            let profile = profile_name(name, kind);
            if let Some(p) = &profile {
                profiles.entry(p.clone()).or_default();
            }
            section = Some(profile);
            property = None;
            continue;
        }
        let Some(current) = &section else {
            return Err(file_error(
                path,
                line_no,
                "property before any [section] header",
            ));
        };
        let body = strip_trailing_comment(body);
        let Some(at) = body.find(['=', ':']) else {
            return Err(file_error(
                path,
                line_no,
                "expected `key = value`, a [section] header or a comment",
            ));
        };
        let key = body[..at].trim().to_ascii_lowercase();
        if key.is_empty() {
            return Err(file_error(path, line_no, "missing key before '='"));
        }
        let value = body[at + 1..].trim().to_string();
        if let Some(name) = current
            && let Some(props) = profiles.get_mut(name)
        {
            props.insert(
                key.clone(),
                Entry {
                    value,
                    line: line_no,
                    continued: false,
                },
            );
        }
        property = Some((indent, key));
    }
    Ok(SharedFile {
        path: path.to_path_buf(),
        profiles,
    })
}

/// The profile a section header names, if it names one.
fn profile_name(section: &str, kind: FileKind) -> Option<String> {
    match kind {
        FileKind::Credentials => Some(section.to_string()),
        FileKind::Config if section == "default" => Some(section.to_string()),
        FileKind::Config => {
            let rest = section.strip_prefix("profile")?;
            // `[profile x]`, not `[profilex]`.
            if !rest.starts_with([' ', '\t']) {
                return None;
            }
            Some(rest.trim().to_string()).filter(|n| !n.is_empty())
        }
    }
}

/// Cuts a ` #` or ` ;` comment off a property line. A `#` with no blank before it is part
/// of the value, so `endpoint_url = http://host/#x` survives, as in the AWS SDKs.
fn strip_trailing_comment(line: &str) -> &str {
    let mut prev_blank = false;
    for (i, c) in line.char_indices() {
        if prev_blank && (c == '#' || c == ';') {
            return line[..i].trim_end();
        }
        prev_blank = c == ' ' || c == '\t';
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary home with `.aws/credentials` and `.aws/config` as given (None: absent),
    /// and an environment lookup over `vars` plus `HOME`.
    struct Home {
        dir: tempfile::TempDir,
        vars: HashMap<String, String>,
    }

    impl Home {
        fn new(credentials: Option<&str>, config: Option<&str>) -> Home {
            let dir = tempfile::tempdir().expect("tempdir");
            let aws = dir.path().join(".aws");
            std::fs::create_dir(&aws).expect("mkdir .aws");
            if let Some(text) = credentials {
                std::fs::write(aws.join("credentials"), text).expect("write credentials");
            }
            if let Some(text) = config {
                std::fs::write(aws.join("config"), text).expect("write config");
            }
            let mut vars = HashMap::new();
            vars.insert(
                "HOME".to_string(),
                dir.path().to_str().expect("utf-8 tempdir").to_string(),
            );
            Home { dir, vars }
        }

        fn set(mut self, name: &str, value: &str) -> Home {
            self.vars.insert(name.to_string(), value.to_string());
            self
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(".aws").join(name)
        }

        fn resolve(&self, opts: &S3Options) -> Result<S3Settings> {
            let env = |name: &str| self.vars.get(name).cloned();
            resolve(opts, &env)
        }

        fn settings(&self) -> S3Settings {
            self.resolve(&S3Options::default()).expect("resolve")
        }

        fn error(&self) -> String {
            match self.resolve(&S3Options::default()) {
                Ok(s) => panic!("expected an error, got {s:?}"),
                Err(e) => {
                    assert!(matches!(e, TierError::Invalid(_)), "{e}");
                    e.to_string()
                }
            }
        }
    }

    fn creds(key_id: &str, secret: &str, token: Option<&str>) -> Option<Credentials> {
        Some(Credentials {
            key_id: key_id.into(),
            secret: secret.into(),
            token: token.map(str::to_string),
        })
    }

    #[test]
    fn default_profile_from_credentials_file() {
        let home = Home::new(
            Some(
                "[other]\naws_access_key_id = NO\naws_secret_access_key = NO\n\
                 [default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = s3cr3t\n",
            ),
            None,
        );
        let s = home.settings();
        assert_eq!(s.credentials, creds("AKDEFAULT", "s3cr3t", None));
        assert_eq!(
            s.source,
            Some(CredentialSource::SharedFile {
                profile: "default".into(),
                path: home.path("credentials"),
            })
        );
        assert_eq!(s.region, None);
        assert_eq!(s.endpoint, None);
    }

    #[test]
    fn named_profile_from_config_file() {
        let home = Home::new(
            Some("[default]\naws_access_key_id = AKDEF\naws_secret_access_key = DEF\n"),
            Some(
                "[default]\nregion = us-east-1\n\
                 [profile work]\naws_access_key_id = AKWORK\naws_secret_access_key = WORK\n\
                 region = eu-west-3\n\
                 [work]\nregion = not-a-profile-in-config\n",
            ),
        )
        .set("AWS_PROFILE", "work");
        let s = home.settings();
        assert_eq!(s.credentials, creds("AKWORK", "WORK", None));
        assert_eq!(s.region.as_deref(), Some("eu-west-3"));
        assert_eq!(
            s.source,
            Some(CredentialSource::SharedFile {
                profile: "work".into(),
                path: home.path("config"),
            })
        );
    }

    #[test]
    fn credentials_file_outranks_config_file_for_the_same_profile() {
        let home = Home::new(
            Some("[default]\naws_access_key_id = FROMCREDS\naws_secret_access_key = C\n"),
            Some(
                "[default]\naws_access_key_id = FROMCONFIG\naws_secret_access_key = X\n\
                 aws_session_token = CONFIGTOKEN\nregion = ap-south-1\n",
            ),
        );
        let s = home.settings();
        // The whole pair, and no token from the other file.
        assert_eq!(s.credentials, creds("FROMCREDS", "C", None));
        assert_eq!(s.region.as_deref(), Some("ap-south-1"));
    }

    #[test]
    fn region_and_endpoint_from_config() {
        let home = Home::new(
            None,
            Some(
                "[profile minio]\nregion = local-1\nendpoint_url = http://127.0.0.1:9000\n\
                 aws_access_key_id = minio\naws_secret_access_key = minio123\n",
            ),
        )
        .set("AWS_PROFILE", "minio");
        let s = home.settings();
        assert_eq!(s.region.as_deref(), Some("local-1"));
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        // An http:// endpoint from the file permits plain HTTP, as one from a flag does.
        assert_eq!(s.allow_http, Some(true));
        assert_eq!(s.credentials, creds("minio", "minio123", None));

        // Also accepted in the credentials file, where they outrank the config file.
        let home = Home::new(
            Some("[default]\nregion = from-creds\n"),
            Some("[default]\nregion = from-config\nendpoint_url = https://s3.example\n"),
        );
        let s = home.settings();
        assert_eq!(s.region.as_deref(), Some("from-creds"));
        assert_eq!(s.endpoint.as_deref(), Some("https://s3.example"));
        assert_eq!(s.allow_http, None);
        assert_eq!(s.credentials, None);
    }

    #[test]
    fn session_token_passed_through() {
        let home = Home::new(
            Some(
                "[default]\naws_access_key_id = ASIATEMP\naws_secret_access_key = S\n\
                 aws_session_token = FwoGZXIvYXdzEB0aDO+/==\n",
            ),
            None,
        );
        assert_eq!(
            home.settings().credentials,
            creds("ASIATEMP", "S", Some("FwoGZXIvYXdzEB0aDO+/=="))
        );

        // And from the environment, with the environment's keys.
        let home = Home::new(None, None)
            .set("AWS_ACCESS_KEY_ID", "ENVKEY")
            .set("AWS_SECRET_ACCESS_KEY", "ENVSECRET")
            .set("AWS_SESSION_TOKEN", "ENVTOKEN");
        assert_eq!(
            home.settings().credentials,
            creds("ENVKEY", "ENVSECRET", Some("ENVTOKEN"))
        );
    }

    #[test]
    fn env_wins_over_file() {
        let home = Home::new(
            Some(
                "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = FILESECRET\n\
                 aws_session_token = FILETOKEN\n",
            ),
            Some("[default]\nregion = file-region\nendpoint_url = https://file.example\n"),
        )
        .set("AWS_ACCESS_KEY_ID", "ENVKEY")
        .set("AWS_SECRET_ACCESS_KEY", "ENVSECRET")
        .set("AWS_DEFAULT_REGION", "env-region")
        .set("AWS_ENDPOINT_URL", "https://env.example");
        let s = home.settings();
        // The file's token stays with the file's keys.
        assert_eq!(s.credentials, creds("ENVKEY", "ENVSECRET", None));
        assert_eq!(s.source, Some(CredentialSource::Environment));
        assert_eq!(s.region.as_deref(), Some("env-region"));
        assert_eq!(s.endpoint.as_deref(), Some("https://env.example"));

        // Per setting: the env gives only the region, the file the rest.
        let home = Home::new(
            Some("[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = FILESECRET\n"),
            Some("[default]\nregion = file-region\n"),
        )
        .set("AWS_REGION", "env-region");
        let s = home.settings();
        assert_eq!(s.credentials, creds("FILEKEY", "FILESECRET", None));
        assert_eq!(s.region.as_deref(), Some("env-region"));
    }

    #[test]
    fn half_env_credentials_never_mix_with_the_file() {
        let home = Home::new(
            Some("[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = FILESECRET\n"),
            None,
        )
        .set("AWS_ACCESS_KEY_ID", "ENVKEY");
        let e = home.error();
        assert!(e.contains("AWS_SECRET_ACCESS_KEY"), "{e}");

        // Half a pair in the file is an error there too, naming the file and line.
        let home = Home::new(
            Some("# keys\n[default]\n\naws_access_key_id = ONLYKEY\n"),
            Some("[default]\naws_secret_access_key = SECRET_ELSEWHERE\n"),
        );
        let e = home.error();
        assert!(
            e.contains(&format!("{}:4:", home.path("credentials").display())),
            "{e}"
        );
    }

    #[test]
    fn web_identity_in_env_outranks_the_files() {
        let home = Home::new(
            Some("[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = S\n"),
            Some("[default]\nregion = file-region\n"),
        )
        .set("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token")
        .set("AWS_ROLE_ARN", "arn:aws:iam::1:role/r");
        let s = home.settings();
        assert_eq!(s.credentials, None);
        assert_eq!(s.source, Some(CredentialSource::WebIdentity));
        assert_eq!(s.region.as_deref(), Some("file-region"));
    }

    #[test]
    fn flags_win_over_env() {
        let home = Home::new(
            Some("[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = FILESECRET\n"),
            Some("[default]\nregion = file-region\nendpoint_url = https://file.example\n"),
        )
        .set("AWS_ACCESS_KEY_ID", "ENVKEY")
        .set("AWS_SECRET_ACCESS_KEY", "ENVSECRET")
        .set("AWS_SESSION_TOKEN", "ENVTOKEN")
        .set("AWS_REGION", "env-region")
        .set("AWS_ENDPOINT_URL_S3", "http://env.example");
        let opts = S3Options {
            endpoint: Some("https://flag.example".into()),
            region: Some("flag-region".into()),
            access_key_id: Some("FLAGKEY".into()),
            secret_access_key: Some("FLAGSECRET".into()),
            allow_http: None,
            checksum: None,
        };
        let s = home.resolve(&opts).expect("resolve");
        // No token: the environment's token belongs to the environment's keys.
        assert_eq!(s.credentials, creds("FLAGKEY", "FLAGSECRET", None));
        assert_eq!(s.source, Some(CredentialSource::Options));
        assert_eq!(s.region.as_deref(), Some("flag-region"));
        assert_eq!(s.endpoint.as_deref(), Some("https://flag.example"));
        assert_eq!(s.allow_http, None);

        // Half a pair in the flags is refused, not completed from the environment.
        let half = S3Options {
            secret_access_key: None,
            ..opts
        };
        let e = home.resolve(&half).expect_err("half flags");
        assert!(e.to_string().contains("both or neither"), "{e}");
    }

    #[test]
    fn fully_specified_flags_never_read_the_files() {
        let home = Home::new(Some("this is not an ini file\n"), None).set("AWS_PROFILE", "nope");
        let opts = S3Options {
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: Some("r".into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            allow_http: Some(false),
            checksum: None,
        };
        let s = home.resolve(&opts).expect("files untouched");
        assert_eq!(s.allow_http, Some(false));
    }

    #[test]
    fn missing_named_profile_is_an_error() {
        let home = Home::new(
            Some("[default]\naws_access_key_id = K\naws_secret_access_key = S\n"),
            None,
        )
        .set("AWS_PROFILE", "prod");
        let e = home.error();
        assert!(e.contains("\"prod\""), "{e}");
        assert!(
            e.contains(&home.path("credentials").display().to_string()),
            "{e}"
        );
        assert!(
            e.contains(&format!("{} (absent)", home.path("config").display())),
            "{e}"
        );

        // `[prod]` in the config file is not `[profile prod]`.
        let home = Home::new(None, Some("[prod]\nregion = x\n")).set("AWS_PROFILE", "prod");
        assert!(home.error().contains("\"prod\""));

        // Without AWS_PROFILE, missing files or a missing [default] are fine.
        let home = Home::new(None, None);
        assert_eq!(home.settings(), S3Settings::default());
        let home = Home::new(Some("[other]\nregion = x\n"), None);
        assert_eq!(home.settings(), S3Settings::default());
    }

    #[test]
    fn comments_and_whitespace() {
        let credentials = "\u{feff}# leading comment\r\n\
            ; another\r\n\
            \r\n\
            \t[ default ]   # section comment\r\n\
            \tAWS_Access_Key_Id=AKSPACES   ; trailing comment\r\n\
            \t  # indented comment\r\n\
            aws_secret_access_key   :   sec#ret/+=   # a '#' inside a value stays\r\n";
        let config = "[default]\n\
            region = eu-north-1 # comment\n\
            s3 =\n  endpoint_url = http://nested-is-ignored\n  addressing_style = path\n\
            [Default]\nregion = wrong-case-section\n\
            [profilex]\nregion = not-a-profile\n\
            [sso-session corp]\nregion = not-a-profile\n";
        let home = Home::new(Some(credentials), Some(config));
        let s = home.settings();
        assert_eq!(s.credentials, creds("AKSPACES", "sec#ret/+=", None));
        assert_eq!(s.region.as_deref(), Some("eu-north-1"));
        assert_eq!(s.endpoint, None);

        // Section names are case-sensitive: `[Default]` is not `[default]`.
        let home = Home::new(Some("[Default]\nregion = x\n"), None);
        assert_eq!(home.settings().region, None);

        // Extra blanks inside `[profile  name ]` are fine.
        let home = Home::new(None, Some("[profile   spaced ]\nregion = ok\n"))
            .set("AWS_PROFILE", "spaced");
        assert_eq!(home.settings().region.as_deref(), Some("ok"));
    }

    #[test]
    fn malformed_files_name_the_file_and_line() {
        for (text, line, what) in [
            ("[default\nregion = x\n", 1, "closing ']'"),
            ("region = x\n[default]\n", 1, "before any [section]"),
            ("[default]\n\nregion x\n", 3, "key = value"),
            ("[default]\n = x\n", 2, "missing key"),
            ("[default] junk\n", 1, "after section header"),
            ("[]\n", 1, "empty section name"),
            (
                "[default]\naws_access_key_id =\n  AKID\naws_secret_access_key = s\n",
                2,
                "one-line values",
            ),
        ] {
            let home = Home::new(Some(text), None);
            let e = home.error();
            let at = format!("{}:{line}:", home.path("credentials").display());
            assert!(e.contains(&at) && e.contains(what), "{text:?}: {e}");
        }

        // Not UTF-8: the line is still named.
        let home = Home::new(None, None);
        std::fs::write(home.path("config"), b"[default]\nregion = \xff\n").expect("write");
        let e = home.error();
        assert!(
            e.contains(&format!("{}:2:", home.path("config").display())),
            "{e}"
        );

        // Unreadable: a directory where the file should be.
        let home = Home::new(None, None);
        std::fs::create_dir(home.path("credentials")).expect("mkdir");
        let e = home.error();
        assert!(
            e.contains("cannot read AWS credentials file")
                && e.contains(&home.path("credentials").display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn file_locations_follow_the_env() {
        let home = Home::new(None, None);
        let elsewhere = home.dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        std::fs::write(
            elsewhere.join("creds"),
            "[ci]\naws_access_key_id = CI\naws_secret_access_key = CISECRET\n",
        )
        .expect("write");
        std::fs::write(elsewhere.join("conf"), "[profile ci]\nregion = ci-region\n")
            .expect("write");
        let home = home
            .set("AWS_SHARED_CREDENTIALS_FILE", "~/elsewhere/creds")
            .set(
                "AWS_CONFIG_FILE",
                elsewhere.join("conf").to_str().expect("utf-8"),
            )
            .set("AWS_PROFILE", "ci");
        let s = home.settings();
        assert_eq!(s.credentials, creds("CI", "CISECRET", None));
        assert_eq!(s.region.as_deref(), Some("ci-region"));

        // No HOME and no overrides: no files, and a named profile says why it failed.
        let env = |name: &str| (name == "AWS_PROFILE").then(|| "p".to_string());
        let e = resolve(&S3Options::default(), &env).expect_err("no home");
        assert!(e.to_string().contains("no HOME"), "{e}");
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = Credentials {
            key_id: "AKID".into(),
            secret: "the-secret".into(),
            token: Some("the-token".into()),
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("AKID"));
        assert!(!shown.contains("the-secret") && !shown.contains("the-token"));
    }
}
