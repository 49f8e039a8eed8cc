//! `cfs`: the one ClaudeFS binary. The subcommand picks the role.

mod bench;
mod cli;
mod control;
mod datadir;
mod fsck;
mod host;
mod mount;
mod mounts;
mod repair;
mod status;
mod tier;
mod wake_here;

use clap::Parser;
use cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn umount(mountpoint: &std::path::Path) -> anyhow::Result<()> {
    let Some(m) = mounts::mount_at(mountpoint) else {
        anyhow::bail!("{} is not mounted", mountpoint.display());
    };
    if !m.is_cfs() {
        if m.fstype.starts_with("fuse") {
            // Also what a ClaudeFS mount looks like once its data dir was deleted under it.
            anyhow::bail!(
                "{} is a FUSE mount of {}, which holds no ClaudeFS metadata (meta.redb); if \
                 it is a ClaudeFS mount whose data dir was removed, `umount -l {}` detaches it",
                mountpoint.display(),
                m.source,
                mountpoint.display()
            );
        }
        anyhow::bail!(
            "{} is a {} mount, not ClaudeFS",
            mountpoint.display(),
            m.fstype
        );
    }
    nix::mount::umount(&m.mountpoint).map_err(|e| match e {
        nix::errno::Errno::EBUSY => anyhow::anyhow!(
            "{} is busy: close the files and shells using it, then retry",
            mountpoint.display()
        ),
        e => anyhow::anyhow!("cannot unmount {}: {e}", mountpoint.display()),
    })?;
    // The daemon notices the unmount and exits after its final sync; wait briefly for it so
    // that a following command sees the data dir free.
    let db = datadir::DataDir::new(std::path::Path::new(&m.source)).meta_path();
    for _ in 0..200 {
        if !datadir::is_locked(&db) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    mount::set_verbosity(cli.verbose);
    let is_fsck = matches!(cli.command, Command::Fsck(_));
    let result = match cli.command {
        Command::Mount(args) => mount::run(args),
        Command::Umount(args) => umount(&args.mountpoint),
        Command::Status(args) => status::run(&args.target, args.json),
        Command::Fsck(args) => fsck::run(&args.data_dir, args.repair),
        Command::Repair(args) => repair::run(args),
        Command::Bench(args) => bench::run(&bench::BenchArgs {
            dir: args.dir,
            files: args.files,
            threads: args.threads,
            json: args.json,
        }),
    };
    match result {
        Ok(()) => {}
        Err(e) => {
            // One line: the error and its causes.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("cfs: error: {msg}");
            // fsck(8) convention: 8 means the check itself could not run.
            let fallback = if is_fsck { 8 } else { 1 };
            let code = e
                .downcast_ref::<fsck::FsckFailed>()
                .map(|f| f.exit_code)
                .unwrap_or(fallback);
            std::process::exit(code);
        }
    }
}
