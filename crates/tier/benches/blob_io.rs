//! Portable versus io_uring blob I/O, measured the way the tier uses it: 64 MiB reads of
//! cold backing files with the uploader's concurrency, and 64 MiB hydration writes (into
//! punched holes) each followed by fdatasync.
//!
//! cargo bench -p cfs-tier --bench blob_io -- --dir /var/tmp [--blobs 16] [--rounds 5]
//!     [--concurrency 4] [--uring CHUNK_KIB:DEPTH:wq|tw]... [--drop-caches]
//!
//! Each `--uring` adds an io_uring backend with those options (`wq`: SQEs go to the
//! kernel's io-wq workers, `tw`: completed in task_work on the ring thread); without one,
//! the default options are measured. Every round runs every backend, starting each round
//! with the next one (portable, io_uring, then io_uring, portable, ...), so that drift in
//! the machine's load lands on all; the median MB/s of each, the median of the per-round
//! ratios to portable, and the median CPU seconds per GB (whole process) are printed.
//! Before each read pass the blobs are dropped from the page cache with
//! posix_fadvise(DONTNEED), which needs no root and leaves everyone else's cache alone;
//! `--drop-caches` also writes /proc/sys/vm/drop_caches (root).

use bytes::Bytes;
use cfs_tier::BLOB_SIZE;
use cfs_tier::blob_io::{BlobIo, Uring, UringOptions};
use futures::StreamExt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

struct Args {
    dir: PathBuf,
    blobs: usize,
    rounds: usize,
    concurrency: usize,
    urings: Vec<UringOptions>,
    drop_caches: bool,
}

/// `CHUNK_KIB:DEPTH:wq|tw`.
fn uring_spec(v: &str) -> Result<UringOptions, String> {
    let bad = || format!("{v}: expected CHUNK_KIB:DEPTH:wq|tw");
    let mut parts = v.split(':');
    let mut num = || {
        parts
            .next()
            .and_then(|p| p.parse::<usize>().ok())
            .ok_or_else(bad)
    };
    let (chunk, depth) = (num()? * 1024, num()?);
    let io_wq = match parts.next() {
        Some("wq") => true,
        Some("tw") => false,
        _ => return Err(bad()),
    };
    Ok(UringOptions {
        chunk,
        depth,
        io_wq,
    })
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        dir: std::env::temp_dir(),
        blobs: 16,
        rounds: 5,
        concurrency: 4,
        urings: Vec::new(),
        drop_caches: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{v}: {e}"));
        match flag.as_str() {
            "--dir" => a.dir = PathBuf::from(value()?),
            "--blobs" => a.blobs = num(value()?)?,
            "--rounds" => a.rounds = num(value()?)?,
            "--concurrency" => a.concurrency = num(value()?)?,
            "--uring" => a.urings.push(uring_spec(&value()?)?),
            "--drop-caches" => a.drop_caches = true,
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.blobs == 0 || a.rounds == 0 || a.concurrency == 0 {
        return Err("--blobs, --rounds and --concurrency must be at least 1".into());
    }
    if a.urings.is_empty() {
        a.urings.push(UringOptions::default());
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("blob_io bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("blob_io bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut backends = vec![("portable".to_string(), BlobIo::Portable)];
    for o in &args.urings {
        let name = format!(
            "io_uring {}K*{} {}",
            o.chunk / 1024,
            o.depth,
            if o.io_wq { "wq" } else { "tw" }
        );
        backends.push((name, BlobIo::Uring(Uring::new(*o)?)));
    }
    let scratch = args
        .dir
        .join(format!("cfs-blob-io-bench-{}", std::process::id()));
    std::fs::create_dir(&scratch)?;
    let result = rt.block_on(measure(args, &backends, &scratch));
    let _ = std::fs::remove_dir_all(&scratch);
    let rounds = result?;

    let total_mb = (args.blobs as u64 * BLOB_SIZE) as f64 / 1e6;
    println!(
        "\n{} x 64 MiB blobs in {}, concurrency {}, {} rounds; median MB/s, and the median over \
         rounds of each round's ratio to portable (paired, so drift in load cancels)",
        args.blobs,
        args.dir.display(),
        args.concurrency,
        args.rounds
    );
    println!(
        "{:<24} {:>16} {:>8} {:>18} {:>8}",
        "backend", "cold read", "CPU s/GB", "write + fdatasync", "CPU s/GB"
    );
    let med = |w: usize, b: usize| median(rounds.iter().map(|r| total_mb / r[b][w].0).collect());
    let ratio = |w: usize, b: usize| median(rounds.iter().map(|r| r[0][w].0 / r[b][w].0).collect());
    let cpu = |w: usize, b: usize| {
        median(
            rounds
                .iter()
                .map(|r| r[b][w].1 / (total_mb / 1e3))
                .collect(),
        )
    };
    for (b, (name, _)) in backends.iter().enumerate() {
        let cell = |w: usize| format!("{:.0} ({:.2})", med(w, b), ratio(w, b));
        println!(
            "{name:<24} {:>16} {:>8.2} {:>18} {:>8.2}",
            cell(0),
            cpu(0, b),
            cell(1),
            cpu(1, b)
        );
    }
    Ok(())
}

/// Per round, per backend, per workload (read, write): wall seconds, CPU seconds.
type Rounds = Vec<Vec<[(f64, f64); 2]>>;

async fn measure(
    args: &Args,
    backends: &[(String, BlobIo)],
    scratch: &Path,
) -> std::io::Result<Rounds> {
    let blob = Bytes::from(pattern(BLOB_SIZE as usize));
    let mut sources = Vec::new();
    let mut targets = Vec::new();
    for i in 0..args.blobs {
        let path = scratch.join(format!("src-{i}"));
        let mut f = File::create(&path)?;
        f.write_all(&blob)?;
        f.sync_all()?;
        sources.push(Arc::new(File::open(&path)?));
        let t = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(scratch.join(format!("dst-{i}")))?;
        t.set_len(BLOB_SIZE)?;
        targets.push(Arc::new(t));
    }
    let mb = (args.blobs as u64 * BLOB_SIZE) as f64 / 1e6;
    let mut rounds = Rounds::new();
    for round in 0..args.rounds {
        let mut r = vec![[(0.0, 0.0); 2]; backends.len()];
        for i in 0..backends.len() {
            let b = (round + i) % backends.len();
            let io = &backends[b].1;
            uncache(&sources, args.drop_caches)?;
            let (t, c) = (Instant::now(), cpu_secs()?);
            let reads = futures::stream::iter(sources.iter().cloned())
                .map(|f| io.read_at(f, 0, BLOB_SIZE as usize))
                .buffer_unordered(args.concurrency)
                .collect::<Vec<_>>()
                .await;
            r[b][0] = (t.elapsed().as_secs_f64(), cpu_secs()? - c);
            for got in reads {
                if got?.len() as u64 != BLOB_SIZE {
                    return Err(std::io::Error::other("short read of a blob"));
                }
            }

            // Hydration: the target blobs are holes again, as after eviction.
            for t in &targets {
                nix::fcntl::fallocate(
                    t.as_ref(),
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    0,
                    BLOB_SIZE as i64,
                )?;
            }
            uncache(&targets, false)?;
            let (t, c) = (Instant::now(), cpu_secs()?);
            let writes = futures::stream::iter(targets.iter().cloned())
                .map(|f| io.write_at_sync(f, 0, blob.clone()))
                .buffer_unordered(args.concurrency)
                .collect::<Vec<_>>()
                .await;
            r[b][1] = (t.elapsed().as_secs_f64(), cpu_secs()? - c);
            for w in writes {
                w?;
            }
        }
        let line: Vec<String> = backends
            .iter()
            .zip(&r)
            .map(|((name, _), t)| {
                format!("{name}: read {:.0}, write {:.0}", mb / t[0].0, mb / t[1].0)
            })
            .collect();
        println!("round {round} MB/s: {}", line.join("; "));
        rounds.push(r);
    }
    Ok(rounds)
}

/// Drops `files` from the page cache (they are clean: written and synced).
fn uncache(files: &[Arc<File>], global: bool) -> std::io::Result<()> {
    for f in files {
        nix::fcntl::posix_fadvise(
            f.as_ref(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )?;
    }
    if global {
        std::fs::write("/proc/sys/vm/drop_caches", "1")?;
    }
    Ok(())
}

/// User + system CPU seconds of this process so far, all threads (io-wq workers included:
/// they belong to the process), from /proc/self/stat in USER_HZ (100 on Linux).
fn cpu_secs() -> std::io::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok((tick(11) + tick(12)) as f64 / 100.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Incompressible bytes, so no layer below can cheat.
fn pattern(len: usize) -> Vec<u8> {
    let mut rng = cfs_tier::SplitMix64::new(0xb10b);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}
