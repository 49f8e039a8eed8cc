//! The POSIX suites on real mounts, in both data-path modes: pjdfstest (the whole suite) and
//! fsx (random reads, writes, mmap, truncate, fallocate, punch-hole, copy_file_range).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn known_failures() -> Vec<String> {
    std::fs::read_to_string(repo_file("tests/pjdfstest-known-failures.txt"))
        .expect("read known failures")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

struct Summary {
    failed: u32,
    skipped: u32,
    passed: u32,
    total: u32,
}

/// Reads `Summary: 0 failed, 14 skipped, 384 passed, 0 expected failures, 398 total`.
fn parse_summary(out: &str) -> Summary {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("Summary:"))
        .unwrap_or_else(|| panic!("pjdfstest printed no summary:\n{out}"));
    let counts: Vec<(u32, &str)> = line
        .split(',')
        .filter_map(|part| {
            let (n, label) = part.trim().split_once(' ')?;
            Some((n.parse().ok()?, label))
        })
        .collect();
    let field = |label: &str| {
        counts
            .iter()
            .find(|(_, l)| *l == label)
            .map(|(n, _)| *n)
            .unwrap_or_else(|| panic!("no {label:?} count in {line:?}"))
    };
    Summary {
        failed: field("failed"),
        skipped: field("skipped"),
        passed: field("passed"),
        total: field("total"),
    }
}

/// Flags and setup for the runs with eviction: a small flash tier, and every file pushed
/// out to the object store as soon as it is uploaded and closed (the `s3` policy on the
/// root, inherited by everything created under it).
const EVICTING: &[&str] = &[
    "--flash-capacity",
    "16M",
    "--high-watermark",
    "50",
    "--low-watermark",
    "20",
];

fn push_everything_out(m: &Mount) {
    let out = run(Command::new("setfattr")
        .args(["-n", "user.cfs.tier", "-v", "s3"])
        .arg(&m.mountpoint));
    assert!(out.status.success(), "setfattr on the root");
}

/// Keeps eviction and re-hydration busy while a suite runs: writes 4 MiB files (pushed out by
/// the inherited `s3` policy) and reads earlier ones back, checking every byte. The suites'
/// own files are mostly empty or held open, so this is what makes blobs leave and come back
/// during the run. Returns (files written, files read back) when `stop` is set.
fn churn(
    dir: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        use std::sync::atomic::Ordering;
        std::fs::create_dir_all(&dir).expect("churn dir");
        let (mut written, mut read) = (0u64, 0u64);
        let content = |i: u64| -> Vec<u8> {
            (0..4u64 << 20)
                .map(|b| (b.wrapping_mul(2654435761).wrapping_add(i) >> 7) as u8)
                .collect()
        };
        while !stop.load(Ordering::Relaxed) {
            let i = written;
            let p = dir.join(format!("c{}", i % 16));
            std::fs::write(&p, content(i)).expect("churn write");
            written += 1;
            std::thread::sleep(std::time::Duration::from_millis(300));
            if written > 8 {
                // A file written 8 rounds ago: uploaded and evicted by now, most likely.
                let j = written - 8;
                let q = dir.join(format!("c{}", j % 16));
                if j % 16 != i % 16 {
                    let got = std::fs::read(&q).expect("churn read");
                    assert!(got == content(j), "churn file {} differs", q.display());
                    read += 1;
                }
            }
        }
        (written, read)
    })
}

fn tier_counter(m: &Mount, name: &str) -> u64 {
    let out = cfs(&["status", m.mountpoint.to_str().expect("utf8"), "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    s["flash_tier"][name].as_u64().unwrap_or(0)
}

fn pjdfstest(mode: &[&str], name: &str) {
    let bin = tool("pjdfstest");
    let root = scratch(name);
    let m = Mount::start(root.path(), mode);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churner = (mode == EVICTING).then(|| {
        push_everything_out(&m);
        churn(m.path("churn"), stop.clone())
    });
    let work = m.path("pjd");
    std::fs::create_dir(&work).expect("mkdir");
    set_mode(&work, 0o755);
    let secondary = root.path().join("secondary");
    std::fs::create_dir(&secondary).expect("mkdir");
    set_mode(&secondary, 0o755);
    let out = Command::new(bin)
        .current_dir(&work)
        .env_remove("RUST_BACKTRACE")
        .arg("-c")
        .arg(repo_file("tests/pjdfstest.toml"))
        .arg("-p")
        .arg(".")
        .arg("-s")
        .arg(&secondary)
        .output()
        .expect("run pjdfstest");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let s = parse_summary(&stdout);
    eprintln!(
        "pjdfstest {mode:?}: {} passed, {} failed, {} skipped, {} total",
        s.passed, s.failed, s.skipped, s.total
    );
    assert!(s.total > 300, "pjdfstest ran only {} tests", s.total);
    let failed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_end().ends_with("FAILED"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        failed.len() as u32,
        s.failed,
        "could not read every failure:\n{stdout}"
    );
    let known = known_failures();
    let unexpected: Vec<&&str> = failed
        .iter()
        .filter(|f| !known.iter().any(|k| k == *f))
        .collect();
    assert!(
        unexpected.is_empty(),
        "pjdfstest failures not in tests/pjdfstest-known-failures.txt: {unexpected:?}\n{stdout}"
    );
    if let Some(churner) = churner {
        check_evictions("pjdfstest", &m, &stop, churner);
    }
}

/// Stops the churn and checks that blobs left flash and came back during the run.
fn check_evictions(
    suite: &str,
    m: &Mount,
    stop: &std::sync::atomic::AtomicBool,
    churner: std::thread::JoinHandle<(u64, u64)>,
) {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (written, read) = churner.join().expect("churn thread");
    let (evicted, hydrated, streamed) = (
        tier_counter(m, "blobs_evicted"),
        tier_counter(m, "blobs_hydrated"),
        tier_counter(m, "blobs_streamed"),
    );
    eprintln!(
        "{suite} with eviction: {evicted} blobs evicted, {hydrated} re-hydrated, {streamed} streamed to readers; churn wrote {written} files and read back {read}"
    );
    assert!(
        evicted > 0 && hydrated + streamed > 0,
        "blobs must leave flash and be read back from the store during the run ({evicted} evicted, {hydrated} hydrated, {streamed} streamed)"
    );
}

#[test]
fn pjdfstest_passthrough() {
    pjdfstest(&[], "pjd-pt");
}

#[test]
fn pjdfstest_no_passthrough() {
    pjdfstest(&["--no-passthrough"], "pjd-nopt");
}

#[test]
fn pjdfstest_with_eviction() {
    pjdfstest(EVICTING, "pjd-evict");
}

/// Operations per fsx run; `CFS_FSX_OPS` raises it for soak runs.
fn fsx_ops() -> String {
    std::env::var("CFS_FSX_OPS").unwrap_or_else(|_| "100000".into())
}

fn fsx(mode: &[&str], name: &str, seed: u64) {
    let bin = tool("fsx");
    let root = scratch(name);
    let m = Mount::start(root.path(), mode);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churner = (mode == EVICTING).then(|| {
        push_everything_out(&m);
        churn(m.path("churn"), stop.clone())
    });
    let ops = fsx_ops();
    eprintln!("fsx {mode:?}: {ops} operations, seed {seed} (replay with -S {seed})");
    let out = Command::new(bin)
        .env_remove("RUST_BACKTRACE")
        .args(["-N", &ops, "-S", &seed.to_string(), "-f"])
        .arg(repo_file("tests/fsx.toml"))
        .arg("-P")
        .arg(root.path())
        .arg(m.path("fsxfile"))
        .output()
        .expect("run fsx");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("All operations completed A-OK!"),
        "fsx failed ({}), seed {seed}:\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(churner) = churner {
        check_evictions("fsx", &m, &stop, churner);
    }
}

#[test]
fn fsx_with_eviction() {
    fsx(EVICTING, "fsx-evict", 7);
}

#[test]
fn fsx_passthrough() {
    fsx(&[], "fsx-pt", 20261124);
}

#[test]
fn fsx_no_passthrough() {
    fsx(&["--no-passthrough"], "fsx-nopt", 42);
}
