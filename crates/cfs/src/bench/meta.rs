//! Metadata workloads in the style of mdtest: create, stat and unlink of empty files (in one
//! directory and spread over a tree), mkdir and rmdir, and small files written with fsync then
//! read back.

use super::{Rate, timed};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where file `i` of thread `t` lives: one shared directory, or a tree of 100-entry leaves.
fn file_path(root: &Path, tree: bool, t: usize, i: u64) -> PathBuf {
    if tree {
        root.join(format!("t{t}"))
            .join(format!("d{}", i / 100))
            .join(format!("f{i}"))
    } else {
        root.join(format!("t{t}-f{i}"))
    }
}

fn progress(label: &str, total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("  {msg:<28} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(label.to_string());
    pb
}

pub fn run_all(root: &Path, files: u64, threads: usize) -> Result<Vec<Rate>> {
    let per_thread = files.div_ceil(threads as u64);
    let total = per_thread * threads as u64;
    let mut rates = Vec::new();
    for tree in [false, true] {
        let base = root.join(if tree { "tree" } else { "flat" });
        std::fs::create_dir(&base)?;
        if tree {
            for t in 0..threads {
                for d in 0..per_thread.div_ceil(100) {
                    std::fs::create_dir_all(base.join(format!("t{t}")).join(format!("d{d}")))?;
                }
            }
        }
        let shape = if tree { "tree" } else { "one dir" };
        for (name, op) in [("create", 0), ("stat", 1), ("unlink", 2)] {
            let label = format!("{name} ({shape})");
            let pb = progress(&label, total);
            let elapsed = timed(threads, |t| {
                for i in 0..per_thread {
                    let p = file_path(&base, tree, t, i);
                    match op {
                        0 => drop(
                            std::fs::File::create(&p)
                                .with_context(|| format!("create {}", p.display()))?,
                        ),
                        1 => {
                            std::fs::symlink_metadata(&p)
                                .with_context(|| format!("stat {}", p.display()))?;
                        }
                        _ => std::fs::remove_file(&p)
                            .with_context(|| format!("unlink {}", p.display()))?,
                    }
                    pb.inc(1);
                }
                Ok(())
            })?;
            pb.finish_and_clear();
            rates.push(Rate::new(&label, total, elapsed));
        }
    }
    let dirs = root.join("dirs");
    std::fs::create_dir(&dirs)?;
    for (name, make) in [("mkdir", true), ("rmdir", false)] {
        let pb = progress(name, total);
        let elapsed = timed(threads, |t| {
            for i in 0..per_thread {
                let p = dirs.join(format!("t{t}-d{i}"));
                if make {
                    std::fs::create_dir(&p)?;
                } else {
                    std::fs::remove_dir(&p)?;
                }
                pb.inc(1);
            }
            Ok(())
        })?;
        pb.finish_and_clear();
        rates.push(Rate::new(name, total, elapsed));
    }
    let small = root.join("small");
    std::fs::create_dir(&small)?;
    let block = vec![0x5au8; 4096];
    let pb = progress("small: 4k write+fsync", total);
    let elapsed = timed(threads, |t| {
        for i in 0..per_thread {
            let mut f = std::fs::File::create(small.join(format!("t{t}-{i}")))?;
            f.write_all(&block)?;
            f.sync_all()?;
            pb.inc(1);
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    rates.push(Rate::new("small: 4k write+fsync", total, elapsed));
    let pb = progress("small: 4k read", total);
    let elapsed = timed(threads, |t| {
        let mut buf = Vec::with_capacity(4096);
        for i in 0..per_thread {
            buf.clear();
            std::fs::File::open(small.join(format!("t{t}-{i}")))?.read_to_end(&mut buf)?;
            anyhow::ensure!(buf.len() == 4096, "short read");
            pb.inc(1);
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    rates.push(Rate::new("small: 4k read", total, elapsed));
    Ok(rates)
}
