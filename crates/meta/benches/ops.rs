//! What one metadata operation costs in the store, without FUSE: creates, lookups, stats
//! (inode reads) and unlinks of empty files in one directory, applied one at a time the way
//! the daemon applies them (one non-durable redb transaction each), with a durable sync at
//! the end of each phase.
//!
//! cargo bench -p cfs-meta --bench ops -- [--files N] [--dir PATH]
//!
//! Prints microseconds per operation for each phase. Compare against the FUSE request
//! latencies of the same operations to see how much of a create or unlink is the store.

use cfs_meta::{Caller, FileKind, MetaStore, Op, Timestamp};
use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut files = 20_000usize;
    let mut batch = 1usize;
    let mut dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--files" => files = args.next().ok_or("--files needs N")?.parse()?,
            "--batch" => batch = args.next().ok_or("--batch needs N")?.parse()?,
            "--dir" => dir = Some(args.next().ok_or("--dir needs PATH")?.into()),
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let tmp = match &dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let (store, _) = MetaStore::open(&tmp.path().join("meta.redb"), Timestamp::now(), 0, 0)?;
    let root = 1;
    let names: Vec<Vec<u8>> = (0..files)
        .map(|i| format!("f{i:08}").into_bytes())
        .collect();

    let phase = |what: &str, f: &mut dyn FnMut(usize) -> Result<(), Box<dyn std::error::Error>>| {
        let started = Instant::now();
        for i in 0..files {
            f(i)?;
        }
        store.sync()?;
        let us = started.elapsed().as_secs_f64() * 1e6 / files as f64;
        println!("{what:<8} {us:>8.2} µs/op  ({files} files)");
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    let create_op = |name: Vec<u8>, ino| Op::Create {
        parent: root,
        name,
        ino,
        kind: FileKind::File,
        perm: 0o644,
        umask: 0o022,
        rdev: 0,
        target: Vec::new(),
        caller: Caller::default(),
        now: Timestamp::now(),
    };
    let mut inos = vec![0u64; files];
    phase("create", &mut |i| {
        let ino = store.alloc_ino();
        inos[i] = ino;
        store.execute(&create_op(names[i].clone(), ino))?;
        Ok(())
    })?;
    if batch > 1 {
        let started = Instant::now();
        let mut ops = Vec::new();
        for i in 0..files {
            ops.push(create_op(
                format!("b{i:08}").into_bytes(),
                store.alloc_ino(),
            ));
            if ops.len() == batch {
                store.execute_batch(&ops)?;
                ops.clear();
            }
        }
        store.execute_batch(&ops)?;
        store.sync()?;
        let us = started.elapsed().as_secs_f64() * 1e6 / files as f64;
        println!("create/{batch} {us:>8.2} µs/op  ({files} files)");
    }
    {
        // A create right after a durable commit, as in a loop of create, write, fsync: the
        // commit is not timed, the create that follows it is.
        let n = files.min(2000);
        let mut spent = std::time::Duration::ZERO;
        for i in 0..n {
            store.sync()?;
            let started = Instant::now();
            store.execute(&create_op(
                format!("s{i:08}").into_bytes(),
                store.alloc_ino(),
            ))?;
            spent += started.elapsed();
        }
        store.sync()?;
        let us = spent.as_secs_f64() * 1e6 / n as f64;
        println!("create after sync {us:>8.2} µs/op  ({n} files)");
    }
    phase("lookup", &mut |i| {
        store.lookup(root, &names[i])?;
        Ok(())
    })?;
    phase("stat", &mut |i| {
        store.inode(inos[i])?;
        Ok(())
    })?;
    phase("unlink", &mut |i| {
        store.execute(&Op::Unlink {
            parent: root,
            name: names[i].clone(),
            now: Timestamp::now(),
        })?;
        Ok(())
    })?;
    Ok(())
}
