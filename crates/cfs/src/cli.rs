//! The command line. Flag names are part of the interface: scripts and later features rely on
//! them, so they change only with a deprecation.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "cfs",
    version,
    about = "ClaudeFS: a POSIX filesystem with a local flash tier and an object store behind it",
    long_about = "ClaudeFS: a POSIX filesystem with a local flash tier and an object store behind it.\n\n\
                  Quick start (as root):\n  cfs mount /mnt/cfs            # mount on the embedded defaults, in the foreground\n  \
                  cfs mount /mnt/cfs --background\n  cfs status /mnt/cfs\n  cfs umount /mnt/cfs"
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace). RUST_LOG, if set, takes precedence.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a filesystem, creating it in the data dir on first use.
    Mount(MountArgs),
    /// Unmount a ClaudeFS mount; its daemon then exits cleanly.
    Umount(UmountArgs),
    /// Show files, bytes, flash usage and whether passthrough is active.
    Status(StatusArgs),
    /// Check every metadata invariant of an unmounted data dir, and optionally repair.
    Fsck(FsckArgs),
    /// Rebuild a filesystem into a new data dir from its object store alone: the newest
    /// metadata checkpoint, then the operation log after it, replayed.
    Repair(RepairArgs),
    /// Measure metadata and small-file rates in a directory (native or a mount). The full
    /// comparison with fio and other filesystems is scripts/bench.
    Bench(BenchCliArgs),
}

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// Where to mount. Must be an existing, empty-or-not directory that is not already a mount.
    pub mountpoint: PathBuf,

    /// Where the filesystem lives: the metadata database and flash/, the backing files.
    /// Defaults to /var/lib/cfs/<name> as root, else $XDG_DATA_HOME/cfs/<name>.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// The filesystem's name, used for the default data dir.
    #[arg(long, default_value = "default")]
    pub name: String,

    /// Return once the mount is ready, leaving the daemon running. Logs go to DIR/cfs.log.
    #[arg(long)]
    pub background: bool,

    /// Serve reads and writes through the daemon instead of FUSE passthrough.
    #[arg(long)]
    pub no_passthrough: bool,

    /// Mount read-only.
    #[arg(long)]
    pub read_only: bool,

    /// Let users other than the mounting one use the mount (FUSE allow_other).
    #[arg(long)]
    pub allow_other: bool,

    /// How long the kernel may cache attributes, in seconds. On one node every change goes
    /// through this kernel, which keeps its cache coherent, and the daemon invalidates what
    /// it changes on its own (blocks evicted or brought back, set-id bits cleared), so a long
    /// TTL is safe and saves a round trip per stat of anything not touched for a while.
    #[arg(long, value_name = "SECS", default_value_t = 3600.0)]
    pub attr_ttl: f64,

    /// How long the kernel may cache directory entries (and misses), in seconds. Each expiry
    /// costs a LOOKUP round trip per path component on the next access.
    #[arg(long, value_name = "SECS", default_value_t = 3600.0)]
    pub entry_ttl: f64,

    /// FUSE worker threads. Default: one per CPU, at least 2 and at most 8. Requests that may
    /// wait long (fsync, reads of evicted data, writes while flash is full) are answered by
    /// a pool of their own, so these threads only serve quick ones, and a few that stay busy
    /// answer a caller's next request sooner than many taking turns (see
    /// docs/operations.md).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Microseconds a daemon thread keeps a CPU busy after each FUSE request, while one
    /// caller sends them. The thread runs at nice 19, so it only takes CPU time nothing else
    /// wants; it sleeps once requests stop, and while several threads or processes send them
    /// (a parallel job wants every idle CPU). On a virtual machine whose idle vCPUs halt at
    /// once, it lets a single-threaded chain of metadata operations (tar, a checkout, rm -r)
    /// run without a hypervisor wake-up per request. `auto`: 100000 (100 ms) on such a
    /// machine (the guest haltpoll cpuidle driver with guest_halt_poll_ns 0), off elsewhere.
    /// `off` (or 0): never. See docs/operations.md.
    #[arg(long, value_name = "auto|off|MICROS", default_value = "auto")]
    pub busy_poll: BusyPoll,

    /// The kernel's fuse module parameter wake_here, found on some kernels (not mainline
    /// Linux), which changes how the wake-ups of each FUSE round trip are scheduled; on the
    /// 2-vCPU test machine it made creates about 1.5x and unlinks 2x as fast. `on`: turn it
    /// on while this mount runs; the last ClaudeFS mount to end gives the machine back its
    /// own value. It applies to every FUSE filesystem of the machine meanwhile. `host`:
    /// leave the machine's setting as it is. See docs/operations.md.
    #[arg(long, value_enum, value_name = "on|host", default_value_t = WakeHere::On)]
    pub wake_here: WakeHere,

    /// Object store behind the flash tier: s3://bucket/prefix, file:///abs/path or memory://.
    /// Changed files are uploaded to it as 64 MiB blobs. The default is the local directory
    /// DIR/objects. The first mount records the choice in DIR/tier.json; later mounts use it
    /// and refuse a different one.
    #[arg(long, value_name = "URL")]
    pub object_store: Option<String>,

    #[command(flatten)]
    pub s3: S3Args,

    /// Files uploaded concurrently.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub upload_concurrency: usize,

    /// Cap on the flash tier, e.g. 20G or 512M (K, M, G, T are powers of 1024). Default: the
    /// size of the filesystem the data dir is on.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub flash_capacity: Option<u64>,

    /// Flash usage, in percent of the capacity, above which clean blobs are evicted.
    #[arg(long, value_name = "PCT", default_value_t = 80)]
    pub high_watermark: u8,

    /// Flash usage, in percent, down to which eviction goes once it started.
    #[arg(long, value_name = "PCT", default_value_t = 60)]
    pub low_watermark: u8,

    /// `cache`: every changed blob is flushed to the object store at once, so flash is a
    /// cache of the store. `tiered`: a blob is flushed once it is --flush-age old, or earlier
    /// when flash fills past the high watermark.
    #[arg(long, value_enum, default_value_t = TierMode::Cache)]
    pub tier_mode: TierMode,

    /// In tiered mode, how long a changed file stays on flash only, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub flush_age: u64,

    /// How often the metadata checkpoint is written to the object store (at
    /// <fs-id>/meta/HEAD), in seconds, when metadata changed. Also written at a clean unmount.
    /// Between checkpoints the operation log goes to the store every second, so a repair
    /// loses about a second of metadata, whatever this interval.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub checkpoint_interval: u64,
}

/// The `--wake-here` setting.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeHere {
    On,
    Host,
}

impl WakeHere {
    pub fn as_str(self) -> &'static str {
        match self {
            WakeHere::On => "on",
            WakeHere::Host => "host",
        }
    }
}

/// When changed data goes to the object store.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierMode {
    Cache,
    Tiered,
}

impl TierMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TierMode::Cache => "cache",
            TierMode::Tiered => "tiered",
        }
    }
}

/// The `--busy-poll` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusyPoll {
    /// Decided from the machine at mount time.
    Auto,
    /// This many microseconds; 0 is off.
    Micros(u64),
}

/// The longest `--busy-poll` window taken: beyond a second it is a spinning thread, not a
/// bridge between requests.
const BUSY_POLL_MAX_US: u64 = 1_000_000;

impl std::str::FromStr for BusyPoll {
    type Err = String;

    fn from_str(s: &str) -> Result<BusyPoll, String> {
        match s.trim() {
            "auto" => Ok(BusyPoll::Auto),
            "off" => Ok(BusyPoll::Micros(0)),
            n => match n.parse::<u64>() {
                Ok(us) if us <= BUSY_POLL_MAX_US => Ok(BusyPoll::Micros(us)),
                Ok(_) => Err(format!("at most {BUSY_POLL_MAX_US} microseconds")),
                Err(_) => Err("expected auto, off or a number of microseconds".into()),
            },
        }
    }
}

impl std::fmt::Display for BusyPoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusyPoll::Auto => f.write_str("auto"),
            BusyPoll::Micros(us) => write!(f, "{us}"),
        }
    }
}

/// Parses a size such as `4096`, `512M` or `1.5G` (binary multiples), for --flash-capacity.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 1073741824, 512M, 20G)"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("size {s:?} must be positive"));
    }
    let bytes = value * mult as f64;
    if bytes > u64::MAX as f64 {
        return Err(format!("size {s:?} is too large"));
    }
    Ok(bytes as u64)
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A data dir or the mountpoint of a running mount.
    pub target: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FsckArgs {
    /// The data dir to check. It must not be mounted.
    pub data_dir: PathBuf,
    /// Fix what is safe to fix: link counts, listings, sizes, orphans.
    #[arg(long)]
    pub repair: bool,
}

#[derive(Args, Debug)]
#[command(
    long_about = "Rebuild a filesystem into a new data dir from its object store alone, after the \
                  node that held it is lost.\n\n\
                  A mount publishes a metadata checkpoint to the store every --checkpoint-interval \
                  seconds when metadata changed, and at every clean unmount. Repair downloads the \
                  newest one (<fs-id>/meta/HEAD), verifies it, builds NEWDIR from it, then \
                  downloads every blob into the backing files, checking each against its crc32c. \
                  NEWDIR is then bound to URL (NEWDIR/tier.json): mount it with \
                  `cfs mount MNT --data-dir NEWDIR`.\n\n\
                  Changes made after the newest checkpoint, and data not yet uploaded when it was \
                  taken, are not in the store and cannot come back. Never mount the repaired \
                  filesystem while the original still runs against the same store: both would \
                  write the same keys.\n\n\
                  Interrupted (Ctrl-C, kill, crash), the same command resumes where it stopped: \
                  NEWDIR/repair.incomplete marks a repair in progress, and blobs already \
                  downloaded are not fetched again.\n\n\
                  Example:\n  cfs repair --from-s3 s3://bucket/prefix --data-dir /var/lib/cfs/restored \\\n      \
                  --s3-endpoint http://10.0.0.5:9000\n  cfs mount /mnt/cfs --data-dir /var/lib/cfs/restored"
)]
pub struct RepairArgs {
    /// The object store to rebuild from: s3://bucket/prefix or file:///abs/path, as the
    /// filesystem was mounted with.
    #[arg(long = "from-s3", value_name = "URL")]
    pub from_s3: String,

    /// The data dir to build. It must be missing or empty, or hold an interrupted repair of
    /// the same filesystem, which is then resumed.
    #[arg(long, value_name = "NEWDIR")]
    pub data_dir: PathBuf,

    /// The filesystem to rebuild, when several share the store's prefix. Default: the one
    /// that published a checkpoint there last (named by the object meta/LATEST).
    #[arg(long, value_name = "ID")]
    pub fs_id: Option<String>,

    #[command(flatten)]
    pub s3: S3Args,

    /// Rebuild the metadata only. Every file is then fetched from the store when it is
    /// first read, so the filesystem is usable at once, but reads need the store.
    #[arg(long)]
    pub lazy: bool,

    /// Blobs downloaded at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub jobs: usize,
}

/// How to reach an S3-compatible server for s3:// URLs: the same flags for `cfs mount` and
/// `cfs repair`, kept with the store's URL in DIR/tier.json.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct S3Args {
    /// Endpoint of an S3-compatible server for s3:// URLs, e.g. http://127.0.0.1:9000.
    /// Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or else from the
    /// AWS shared files (~/.aws/credentials and ~/.aws/config, profile AWS_PROFILE).
    #[arg(long = "s3-endpoint", value_name = "URL")]
    #[serde(
        rename = "s3_endpoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint: Option<String>,

    /// Region for s3:// URLs (default: AWS_REGION, else us-east-1).
    #[arg(long = "s3-region", value_name = "REGION")]
    #[serde(rename = "s3_region", default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,

    /// How upload bodies are checked on their way to an s3:// server. `crc64nvme`: an
    /// x-amz-checksum-crc64nvme header the server checks, the body left out of the
    /// signature, as the AWS SDKs do (cheap). `signed`: SigV4 signs the body's SHA-256 (any
    /// server; costs CPU on every upload). `none`: for a server that rejects the checksum
    /// header. Default: crc64nvme, or what AWS_UNSIGNED_PAYLOAD / AWS_CHECKSUM_ALGORITHM say.
    /// Recorded in DIR/tier.json like the endpoint.
    #[arg(long = "s3-checksum", value_name = "crc64nvme|signed|none")]
    #[serde(
        rename = "s3_checksum",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub checksum: Option<cfs_tier::S3Checksum>,
}

impl S3Args {
    /// These flags where they were given, else `bound`'s: a server may move to a new
    /// address, and what the command line leaves out stays as recorded.
    pub fn or(self, bound: S3Args) -> S3Args {
        S3Args {
            endpoint: self.endpoint.or(bound.endpoint),
            region: self.region.or(bound.region),
            checksum: self.checksum.or(bound.checksum),
        }
    }

    /// The flags that give these settings, for a command line that passes them on.
    pub fn to_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        for (flag, value) in [
            ("--s3-endpoint", self.endpoint.clone()),
            ("--s3-region", self.region.clone()),
            ("--s3-checksum", self.checksum.map(|c| c.to_string())),
        ] {
            if let Some(v) = value {
                flags.extend([flag.to_string(), v]);
            }
        }
        flags
    }
}

#[derive(Args, Debug)]
pub struct BenchCliArgs {
    /// The directory to work in; a scratch subdirectory is created and removed.
    pub dir: PathBuf,
    /// Files (and directories) per workload, spread over the threads.
    #[arg(long, default_value_t = 10_000)]
    pub files: u64,
    /// Threads issuing operations concurrently.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::{BusyPoll, Cli, Command, S3Args};
    use clap::Parser;

    #[test]
    fn busy_poll_takes_auto_off_or_microseconds_up_to_a_second() {
        assert_eq!("auto".parse(), Ok(BusyPoll::Auto));
        assert_eq!("off".parse(), Ok(BusyPoll::Micros(0)));
        assert_eq!("0".parse(), Ok(BusyPoll::Micros(0)));
        assert_eq!("1000".parse(), Ok(BusyPoll::Micros(1000)));
        assert_eq!("1000000".parse(), Ok(BusyPoll::Micros(1_000_000)));
        assert!("1000001".parse::<BusyPoll>().is_err());
        assert!("fast".parse::<BusyPoll>().is_err());
        assert!("-5".parse::<BusyPoll>().is_err());
        // What `cfs mount --background` hands its child must parse back the same.
        for v in [BusyPoll::Auto, BusyPoll::Micros(0), BusyPoll::Micros(250)] {
            assert_eq!(v.to_string().parse(), Ok(v));
        }
    }

    fn mount_s3(args: &[&str]) -> S3Args {
        let argv = ["cfs", "mount", "/mnt"].iter().chain(args);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Mount(m) => m.s3,
            other => panic!("not a mount: {other:?}"),
        }
    }

    /// What `cfs mount --background` passes its child parses back the same, and flags
    /// left out keep what tier.json recorded.
    #[test]
    fn s3_flags_pass_on_and_fall_back_to_the_recorded_ones() {
        let given = mount_s3(&[
            "--s3-endpoint",
            "http://10.0.0.5:9000",
            "--s3-checksum",
            "signed",
        ]);
        assert_eq!(given.checksum, Some(cfs_tier::S3Checksum::Signed));
        let flags = given.to_flags();
        let passed: Vec<&str> = flags.iter().map(String::as_str).collect();
        assert_eq!(mount_s3(&passed), given);
        assert_eq!(mount_s3(&[]).to_flags(), Vec::<String>::new());
        let recorded = S3Args {
            endpoint: Some("http://old:9000".into()),
            region: Some("eu-west-1".into()),
            checksum: None,
        };
        let merged = given.clone().or(recorded);
        assert_eq!(merged.endpoint, given.endpoint);
        assert_eq!(merged.region.as_deref(), Some("eu-west-1"));
        assert_eq!(merged.checksum, given.checksum);
    }
}
