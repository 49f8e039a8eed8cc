//! `cfs bench`: workloads that run on any directory, so the same code measures the native
//! filesystem and a ClaudeFS mount in one run. Timings are printed and written as JSON; they
//! are never asserted anywhere.

mod meta;

use anyhow::{Result, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One measured rate.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub workload: String,
    pub ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
}

impl Rate {
    fn new(workload: &str, ops: u64, elapsed: Duration) -> Rate {
        let seconds = elapsed.as_secs_f64();
        Rate {
            workload: workload.to_string(),
            ops,
            seconds,
            ops_per_sec: if seconds > 0.0 {
                ops as f64 / seconds
            } else {
                0.0
            },
        }
    }
}

/// Runs `f` on `threads` threads, each given its index, and times the whole.
fn timed(threads: usize, f: impl Fn(usize) -> Result<()> + Sync) -> Result<Duration> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || f(t))
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(r) => r?,
                Err(_) => bail!("benchmark thread panicked"),
            }
        }
        Ok(())
    })?;
    Ok(start.elapsed())
}

pub struct BenchArgs {
    pub dir: PathBuf,
    pub files: u64,
    pub threads: usize,
    pub json: Option<PathBuf>,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if !args.dir.is_dir() {
        bail!("{} is not a directory", args.dir.display());
    }
    if args.threads == 0 || args.files == 0 {
        bail!("--threads and --files must be at least 1");
    }
    let work = scratch_dir(&args.dir)?;
    let result = meta::run_all(&work, args.files, args.threads);
    let _ = std::fs::remove_dir_all(&work);
    let rates = result?;
    println!("{:<34} {:>10} {:>12}", "workload", "ops", "ops/s");
    for r in &rates {
        println!("{:<34} {:>10} {:>12.0}", r.workload, r.ops, r.ops_per_sec);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rates)?)?;
    }
    Ok(())
}

fn scratch_dir(parent: &Path) -> Result<PathBuf> {
    let dir = parent.join(format!("cfs-bench-{}", std::process::id()));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}
