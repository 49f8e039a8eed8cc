//! `cfs mount`: check everything that can be checked before touching anything, then mount and
//! serve until unmounted or signalled.

use crate::cli::{BusyPoll, MountArgs, WakeHere};
use crate::datadir::{DataDir, TierConfig};
use anyhow::{Context, Result, bail};
use cfs_fuse::{ClaudeFs, FsOptions};
use fuser::{Config, MountOption, SessionACL};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Environment variable through which `--background` hands the daemon its readiness pipe.
const READY_FD_ENV: &str = "CFS_READY_FD";

/// Refuses a mountpoint that cannot work, before anything is created.
fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf> {
    let md = std::fs::metadata(mountpoint).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            anyhow::anyhow!("mountpoint {} does not exist", mountpoint.display())
        }
        _ => anyhow::anyhow!("cannot use mountpoint {}: {e}", mountpoint.display()),
    })?;
    if !md.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    let canonical = std::fs::canonicalize(mountpoint)?;
    if let Some(m) = crate::mounts::mount_at(&canonical) {
        bail!(
            "{} is already mounted ({} from {})",
            canonical.display(),
            m.fstype,
            m.source
        );
    }
    Ok(canonical)
}

fn check_dev_fuse() -> Result<()> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "/dev/fuse is missing: load the fuse module (modprobe fuse) or run with --device /dev/fuse"
            )
        }
        Err(e) => bail!("cannot open /dev/fuse: {e}"),
    }
}

/// True if this process may register passthrough backing files (CAP_SYS_ADMIN).
fn may_passthrough() -> bool {
    nix::unistd::geteuid().is_root()
}

fn resolve_data_dir(args: &MountArgs) -> Result<PathBuf> {
    let dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => DataDir::default_for(&args.name)?,
    };
    Ok(std::path::absolute(&dir)?)
}

/// FUSE threads when `--threads` is not given: one per CPU, from 2 (so that one request
/// that takes a while, such as a large directory listing, does not stall the rest) to 8. On
/// the 2-CPU test machine 2 threads made unlinks up to twice as fast as 8, and creates and
/// small-file reads 10–30% faster (docs/operations.md); more than 8 was never measured.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

pub fn run(args: MountArgs) -> Result<()> {
    let mountpoint = check_mountpoint(&args.mountpoint)?;
    check_dev_fuse()?;
    if !(args.attr_ttl.is_finite()
        && args.attr_ttl >= 0.0
        && args.entry_ttl.is_finite()
        && args.entry_ttl >= 0.0)
    {
        bail!("--attr-ttl and --entry-ttl must be non-negative numbers of seconds");
    }
    if args.threads.is_some_and(|n| n == 0 || n > 256) {
        bail!("--threads must be between 1 and 256");
    }
    if args.upload_concurrency == 0 || args.upload_concurrency > 256 {
        bail!("--upload-concurrency must be between 1 and 256");
    }
    if let Some(url) = &args.object_store {
        url.parse::<cfs_tier::StoreUrl>()
            .with_context(|| format!("bad --object-store {url:?}"))?;
    }
    if !(1..=100).contains(&args.high_watermark) || args.low_watermark >= args.high_watermark {
        bail!("watermarks must satisfy 0 <= --low-watermark < --high-watermark <= 100");
    }
    if args.checkpoint_interval == 0 {
        bail!("--checkpoint-interval must be at least 1 second");
    }
    let data_dir = resolve_data_dir(&args)?;
    if args.background {
        return spawn_background(&args, &data_dir, &mountpoint);
    }
    serve(&args, &data_dir, &mountpoint)
}

/// Empty backing files kept ready for creates (see `docs/architecture.md`, "Flash: backing files"):
/// enough for a burst of a few thousand creates (`tar`, a build) to find one waiting while the
/// background filler catches up; each costs one inode of the flash filesystem.
const SPARES_READY: usize = 1024;

/// Backing files kept made and open under reserved inode numbers, so that a create does no
/// flash I/O (see `cfs_flash`'s `prepared`): a burst of creates takes them while the thread
/// that prepares them renames the next ones from the spares. Each holds an open fd.
const PREPARED_READY: usize = 64;

/// The busy-poll window of `--busy-poll auto` on a machine whose idle vCPUs halt at once:
/// long enough to bridge a caller's own pauses between requests, so that the thread stays
/// put on the vCPU it keeps busy (each time it sleeps and wakes again, the scheduler places
/// it anew, often beside the caller, and the round trips pay wake-ups until it moves off).
/// In a loop of bare round trips on the 2-vCPU test machine, 1 ms settled at 6 µs a round
/// trip within a second, where 200 µs (the haltpoll driver's own polling time) never
/// settled (12–19 µs). In `cfs bench --files 5000` (medians of 4 alternated runs), 4 KiB
/// reads ran at 23.5k/s with 1 ms and 38.3k/s with 100 ms (15.9k/s without the thread), and
/// creates in a tree at 10.2k/s and 17.3k/s; 10 ms and 30 ms fell between (docs/operations.md).
const BUSY_POLL_AUTO: Duration = Duration::from_millis(100);

/// The busy-poll window `setting` asks for (see `cfs_fuse`'s `busy_poll`); `halting`: idle
/// vCPUs halt at once on this machine.
fn busy_poll_window(setting: BusyPoll, halting: bool) -> Option<Duration> {
    match setting {
        BusyPoll::Auto => halting.then_some(BUSY_POLL_AUTO),
        BusyPoll::Micros(0) => None,
        BusyPoll::Micros(us) => Some(Duration::from_micros(us)),
    }
}

/// Turns the kernel's fuse `wake_here` on for as long as the returned hold lives (see
/// [`crate::wake_here`]); a failure costs speed only, so it is logged and the mount goes on.
fn hold_wake_here() -> Option<crate::wake_here::Held> {
    match crate::wake_here::hold(Path::new("/sys"), Path::new(crate::wake_here::RUN_DIR)) {
        Ok(Some(held)) => {
            if held.own == "Y" {
                tracing::info!("the kernel's fuse wake_here is on already; held on while mounted");
            } else {
                tracing::info!(
                    was = %held.was,
                    machine_value = %held.own,
                    "the kernel's fuse wake_here is held on while ClaudeFS mounts run, and \
                     given back its machine value after the last (--wake-here host leaves it alone)"
                );
            }
            Some(held)
        }
        Ok(None) => {
            tracing::debug!("this kernel has no fuse wake_here parameter");
            None
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::info!(error = %e, "only root may turn the kernel's fuse wake_here on");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot turn the kernel's fuse wake_here on; FUSE round trips may be slower");
            None
        }
    }
}

/// Runs the mount in this process until it is unmounted or signalled.
fn serve(args: &MountArgs, data_dir: &Path, mountpoint: &Path) -> Result<()> {
    let dir = DataDir::new(data_dir);
    dir.prepare()?;
    let (meta, flash, created) = dir.open()?;
    if created {
        tracing::info!(data_dir = %data_dir.display(), fs_id = meta.fs_id(), "created a new filesystem");
    }
    let tier_cfg = resolve_tier(args, &dir, &meta)?;
    dir.recover(&meta, &flash, true)?;
    flash.keep_spares_ready(SPARES_READY);
    // After recovery, which removes backing files that no inode owns, as prepared ones are.
    let reserver = Arc::clone(&meta);
    flash.prepare_for_creates(PREPARED_READY, Box::new(move |n| reserver.reserve_inos(n)));
    let prepared = flash.clone();

    let mut passthrough = !args.no_passthrough;
    if passthrough && !may_passthrough() {
        tracing::warn!("passthrough needs root (CAP_SYS_ADMIN); serving I/O through the daemon");
        passthrough = false;
    }
    let tier = Some(crate::tier::start(&tier_cfg, args, &dir, &meta, &flash)?);
    let slow_wakeups = crate::host::slow_wakeups(Path::new("/sys"));
    let opts = FsOptions {
        passthrough,
        attr_ttl: Duration::from_secs_f64(args.attr_ttl),
        entry_ttl: Duration::from_secs_f64(args.entry_ttl),
        tier: tier.as_ref().map(|t| t.hooks()),
        busy_poll: busy_poll_window(args.busy_poll, slow_wakeups.is_some()),
    };
    let fs = ClaudeFs::new(Arc::clone(&meta), flash, opts);
    if let Some(t) = &tier {
        t.attach(fs.live());
    }
    let ready_fd = take_ready_fd();

    let mut options = vec![
        MountOption::FSName(data_dir.display().to_string()),
        MountOption::Subtype("cfs".into()),
        MountOption::DefaultPermissions,
        MountOption::Suid,
        MountOption::Dev,
    ];
    if args.read_only {
        options.push(MountOption::RO);
    } else {
        options.push(MountOption::RW);
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if args.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(args.threads.unwrap_or_else(default_threads));
    config.clone_fd = true;

    let live = fs.live();
    // The control socket is up before the mount: `cfs mount --background` returns once the
    // kernel handshake is done (inside `Session::new`), and `cfs status` must answer then.
    crate::control::serve(
        &dir.socket_path(),
        Arc::clone(&live),
        tier.as_ref().map(|t| t.live_stats()),
        Arc::clone(&meta),
        data_dir.to_path_buf(),
        mountpoint.to_path_buf(),
    )?;
    let mut session = match fuser::Session::new(fs, mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(dir.socket_path());
            return Err(e).with_context(|| format!("cannot mount {}", mountpoint.display()));
        }
    };
    live.set_notifier(session.notifier());
    // `Session::new` has sent the INIT reply, whose max_readahead the kernel applied: only
    // now does a raise of the readahead stay.
    raise_readahead(mountpoint);
    let _wake_here = match args.wake_here {
        WakeHere::On => hold_wake_here(),
        WakeHere::Host => None,
    };
    if let Some(fd) = ready_fd {
        let mut f = std::fs::File::from(fd);
        let _ = writeln!(f, "ready passthrough={}", live.status().passthrough_active);
    }
    tracing::info!(mountpoint = %mountpoint.display(), data_dir = %data_dir.display(), "mounted");
    if let Some(hint) = slow_wakeups {
        match args.busy_poll {
            BusyPoll::Auto => tracing::info!(
                "{hint}; --busy-poll auto keeps a vCPU awake while a single caller sends requests"
            ),
            BusyPoll::Micros(0) => tracing::info!("{hint}; --busy-poll is off"),
            BusyPoll::Micros(_) => {}
        }
    }

    spawn_flusher(Arc::clone(&meta));
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let sig_mountpoint = mountpoint.to_path_buf();
    std::thread::Builder::new().name("cfs-signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, mountpoint = %sig_mountpoint.display(), "unmounting on signal");
            unmount_on_signal(&mut unmounter, &sig_mountpoint);
        }
    })?;

    let result = session.run();
    // Unmounted: upload what is due, publish the final metadata checkpoint, then delete.
    if let Some(t) = &tier {
        t.finish();
    }
    let _ = std::fs::remove_file(dir.socket_path());
    meta.sync().context("final metadata sync")?;
    if let Err(e) = result {
        bail!("FUSE session ended with an error: {e}");
    }
    // Backing files prepared for creates that never came: spares again. Should that fail,
    // the stop is not marked clean, and the next mount's recovery removes them.
    match prepared.release_prepared() {
        Ok(n) => tracing::debug!("{n} unused prepared backing files back among the spares"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot give back unused prepared backing files; the next mount recovers");
            return Ok(());
        }
    }
    dir.mark_clean()?;
    tracing::info!(mountpoint = %mountpoint.display(), "unmounted cleanly");
    Ok(())
}

/// How long a signalled daemon retries an unmount that finds the mount busy.
const BUSY_UNMOUNT_RETRY: Duration = Duration::from_secs(5);

/// Unmounts after SIGTERM/SIGINT. A file open on the mount (or held for a moment by a forking
/// process) makes the unmount fail with EBUSY; the daemon retries for a while and then
/// detaches the mount (`umount -l`), which ends the session once the last file is closed. A
/// signal must not leave the daemon serving with nobody left to stop it.
fn unmount_on_signal(unmounter: &mut fuser::SessionUnmounter, mountpoint: &Path) {
    use nix::mount::{MntFlags, umount2};
    // fuser's unmounter gives up its handle on the first attempt, failed or not, so the
    // retries call umount2 directly.
    let mut result = unmounter.unmount();
    let busy =
        |r: &std::io::Result<()>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EBUSY));
    let deadline = std::time::Instant::now() + BUSY_UNMOUNT_RETRY;
    while busy(&result) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        result = umount2(mountpoint, MntFlags::empty()).map_err(std::io::Error::from);
    }
    if let Err(e) = result {
        tracing::warn!(error = %e, "unmount failed; detaching the mount instead, it goes away when its last open file is closed");
        if let Err(e) = umount2(mountpoint, MntFlags::MNT_DETACH) {
            tracing::error!(error = %e, "detaching the mount failed");
        }
    }
}

/// Readahead, in KiB, for reads the daemon serves: the 1 MiB of one FUSE read (max_readahead).
const READAHEAD_KB: u32 = 1024;

/// Lets the kernel read ahead a whole FUSE read (1 MiB) on the daemon's data path
/// (`--no-passthrough`, and cold files opened for writing; read-only ones are direct I/O).
/// FUSE caps readahead at the device default of 128 KiB whatever the daemon asks for (the
/// INIT reply may not offer more than the kernel did), so a sequential reader would cost
/// eight requests per MiB; the cap is the mount's `read_ahead_kb` in sysfs, which root may
/// raise. The kernel lowers it to our INIT reply's max_readahead when it handles that reply,
/// so this must run after the reply is sent: run before, the raise is undone. The device is
/// found in the mount table, not by a stat of the mountpoint: a stat would hold the mount
/// busy while it waits for our own GETATTR reply, and an unmount right after the mount
/// would then fail. Given up with a log line if sysfs refuses (not root).
fn raise_readahead(mountpoint: &Path) {
    let Some(m) = crate::mounts::top_mount_at(mountpoint) else {
        tracing::debug!("readahead left at the default: the mount is not in the table");
        return;
    };
    let path = format!("/sys/class/bdi/{}/read_ahead_kb", m.dev);
    match std::fs::write(&path, format!("{READAHEAD_KB}\n")) {
        Ok(()) => tracing::debug!(path, kb = READAHEAD_KB, "readahead raised"),
        Err(e) => tracing::debug!(path, error = %e, "readahead left at the kernel's default"),
    }
}

/// Decides which object store this mount uses: the one the data dir is bound to, else the
/// one given, else the embedded default DIR/objects. Binding a store to a filesystem that
/// already holds files queues them all for upload.
fn resolve_tier(args: &MountArgs, dir: &DataDir, meta: &cfs_meta::MetaStore) -> Result<TierConfig> {
    let asked = args.object_store.as_ref().map(|url| TierConfig {
        url: url.clone(),
        s3: args.s3.clone(),
    });
    if let Some(bound) = TierConfig::load(dir)? {
        if let Some(asked) = &asked
            && asked.url != bound.url
        {
            bail!(
                "data dir {} keeps its blobs in {}, not {}: mount it without --object-store, \
                 or use another data dir",
                dir.root.display(),
                bound.url,
                asked.url
            );
        }
        // Endpoint, region and checksum may change (a server on a new address); the bucket
        // may not.
        let mut cfg = bound;
        if let Some(asked) = asked {
            cfg.s3 = asked.s3.or(cfg.s3);
        }
        return Ok(cfg);
    }
    let cfg = match asked {
        Some(cfg) => cfg,
        None => {
            let objects = dir.default_objects_path();
            std::fs::create_dir_all(&objects)
                .with_context(|| format!("cannot create {}", objects.display()))?;
            TierConfig {
                url: format!("file://{}", objects.display()),
                s3: Default::default(),
            }
        }
    };
    let mut queued = 0u64;
    meta.for_each_inode(|inode| {
        if inode.kind == cfs_meta::FileKind::File {
            meta.execute(&cfs_meta::Op::MarkDirty { ino: inode.ino })?;
            queued += 1;
        }
        Ok(())
    })?;
    meta.sync()?;
    cfg.save(dir)?;
    tracing::info!(object_store = %cfg.url, files_queued = queued, "object store bound to this filesystem");
    Ok(cfg)
}

/// Makes metadata durable at least once a second, bounding what a crash can lose to about
/// one second of changes that nobody fsynced, as a journalling filesystem does. Only
/// changes to the filesystem count ([`cfs_meta::MetaStore::has_unsynced_changes`]).
fn spawn_flusher(meta: Arc<cfs_meta::MetaStore>) {
    let spawned = std::thread::Builder::new()
        .name("cfs-flusher".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                if meta.has_unsynced_changes()
                    && let Err(e) = meta.sync()
                {
                    tracing::error!(error = %e, "periodic metadata sync failed");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no periodic metadata sync: cannot start its thread");
    }
}

fn take_ready_fd() -> Option<OwnedFd> {
    let raw: i32 = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: the launcher opened this fd for us and passed its number in READY_FD_ENV; no
    // other code in this process knows or closes it, and the variable is removed so that it
    // is adopted only once.
    unsafe { std::env::remove_var(READY_FD_ENV) };
    // SAFETY: as above, the fd is open and owned by nobody else in this process.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Re-runs `cfs mount` as a detached daemon and waits until its mount is ready.
fn spawn_background(args: &MountArgs, data_dir: &Path, mountpoint: &Path) -> Result<()> {
    let dir = DataDir::new(data_dir);
    dir.prepare()?;
    let log_path = dir.log_path();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open log {}", log_path.display()))?;
    let (read_end, write_end) = nix::unistd::pipe().context("pipe")?;
    // The read end must not leak into the daemon; the write end must.
    nix::fcntl::fcntl(
        &read_end,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    nix::fcntl::fcntl(
        &write_end,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    for _ in 0..args_verbosity() {
        cmd.arg("-v");
    }
    cmd.arg("mount")
        .arg(mountpoint)
        .arg("--data-dir")
        .arg(data_dir);
    cmd.arg("--attr-ttl").arg(args.attr_ttl.to_string());
    cmd.arg("--entry-ttl").arg(args.entry_ttl.to_string());
    if let Some(n) = args.threads {
        cmd.arg("--threads").arg(n.to_string());
    }
    cmd.arg("--busy-poll").arg(args.busy_poll.to_string());
    cmd.arg("--wake-here").arg(args.wake_here.as_str());
    cmd.arg("--upload-concurrency")
        .arg(args.upload_concurrency.to_string());
    cmd.arg("--high-watermark")
        .arg(args.high_watermark.to_string());
    cmd.arg("--low-watermark")
        .arg(args.low_watermark.to_string());
    cmd.arg("--tier-mode").arg(args.tier_mode.as_str());
    cmd.arg("--flush-age").arg(args.flush_age.to_string());
    cmd.arg("--checkpoint-interval")
        .arg(args.checkpoint_interval.to_string());
    if let Some(cap) = args.flash_capacity {
        cmd.arg("--flash-capacity").arg(cap.to_string());
    }
    if let Some(url) = &args.object_store {
        cmd.arg("--object-store").arg(url);
    }
    cmd.args(args.s3.to_flags());
    for (flag, on) in [
        ("--no-passthrough", args.no_passthrough),
        ("--read-only", args.read_only),
        ("--allow-other", args.allow_other),
    ] {
        if on {
            cmd.arg(flag);
        }
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    cmd.env(READY_FD_ENV, write_end.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let mut child = cmd.spawn().context("cannot start the mount daemon")?;
    drop(write_end);
    let mut answer = String::new();
    let _ = std::fs::File::from(read_end).read_to_string(&mut answer);
    if answer.starts_with("ready") {
        println!(
            "mounted {} (data dir {}, pid {}, {}, log {})",
            mountpoint.display(),
            data_dir.display(),
            child.id(),
            answer.trim().replace("ready ", ""),
            log_path.display()
        );
        return Ok(());
    }
    let status = child.wait()?;
    let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
    let last_error = tail
        .lines()
        .rev()
        .find(|l| l.contains("error"))
        .unwrap_or("")
        .to_string();
    bail!("the mount daemon exited ({status}) before the mount was ready. {last_error}");
}

static VERBOSITY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

pub fn set_verbosity(v: u8) {
    VERBOSITY.store(v, std::sync::atomic::Ordering::Relaxed);
}

fn args_verbosity() -> u8 {
    VERBOSITY.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod busy_poll_tests {
    use super::{BUSY_POLL_AUTO, busy_poll_window};
    use crate::cli::BusyPoll;
    use std::time::Duration;

    #[test]
    fn auto_spins_only_where_idle_vcpus_halt_and_a_value_always_wins() {
        assert_eq!(busy_poll_window(BusyPoll::Auto, true), Some(BUSY_POLL_AUTO));
        assert_eq!(busy_poll_window(BusyPoll::Auto, false), None);
        assert_eq!(busy_poll_window(BusyPoll::Micros(0), true), None);
        for halting in [true, false] {
            assert_eq!(
                busy_poll_window(BusyPoll::Micros(300), halting),
                Some(Duration::from_micros(300))
            );
        }
    }
}
