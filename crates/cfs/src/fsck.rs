//! `cfs fsck`: checks every metadata invariant of an unmounted data dir.
//!
//! Invariants:
//! 1. every entry names an existing inode of the kind it records, and has its listing row;
//! 2. every listing row has its entry;
//! 3. a file's link count is its number of entries; a directory has exactly one entry (the
//!    root none), its `parent` is that entry's directory, and its link count is 2 + subdirs;
//! 4. an inode with no entries is an orphan, legal only if it has no links left (pending purge);
//! 5. every regular file has a backing file, and every backing file a regular file;
//! 6. a file's recorded size is its backing file's size.
//!
//! Exit codes follow fsck(8): 0 clean, 1 errors corrected, 4 errors left, 8 operational error.

use crate::datadir::DataDir;
use anyhow::{Result, bail};
use cfs_meta::{FileKind, Ino, Inode, MetaError, ROOT_INO};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Carries fsck's exit code through `main`.
#[derive(Debug)]
pub struct FsckFailed {
    pub exit_code: i32,
}

impl std::fmt::Display for FsckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.exit_code {
            1 => write!(f, "problems found and repaired"),
            _ => write!(
                f,
                "problems found; run `cfs fsck --repair` to fix what is safe to fix"
            ),
        }
    }
}

impl std::error::Error for FsckFailed {}

/// One broken invariant, and how to fix it if it is safe.
#[derive(Debug)]
enum Problem {
    DanglingEntry {
        parent: Ino,
        name: Vec<u8>,
        cookie: u64,
        ino: Ino,
    },
    WrongKind {
        parent: Ino,
        name: Vec<u8>,
        ino: Ino,
    },
    MissingListing {
        parent: Ino,
        name: Vec<u8>,
        cookie: u64,
        ino: Ino,
        kind: FileKind,
    },
    StrayListing {
        parent: Ino,
        cookie: u64,
    },
    LinkCount {
        ino: Ino,
        recorded: u32,
        actual: u32,
    },
    DirParent {
        ino: Ino,
        recorded: Ino,
        actual: Ino,
    },
    DirMultiplyLinked {
        ino: Ino,
        entries: usize,
    },
    Orphan {
        ino: Ino,
    },
    MissingBacking {
        ino: Ino,
    },
    StrayBacking {
        ino: Ino,
    },
    /// A stray backing file with an origin record: a new file whose fsync made its create
    /// durable through that record, and whose create the store lost in a crash.
    Recreatable {
        ino: Ino,
        origin: cfs_meta::Origin,
    },
    UnknownFlashFile {
        path: std::path::PathBuf,
    },
    Size {
        ino: Ino,
        recorded: u64,
        actual: u64,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |b: &Vec<u8>| String::from_utf8_lossy(b).into_owned();
        match self {
            Problem::DanglingEntry {
                parent, name, ino, ..
            } => write!(
                f,
                "entry {:?} in dir {parent} points to missing inode {ino}",
                n(name)
            ),
            Problem::WrongKind { parent, name, ino } => write!(
                f,
                "entry {:?} in dir {parent} records the wrong kind for inode {ino}",
                n(name)
            ),
            Problem::MissingListing { parent, name, .. } => write!(
                f,
                "entry {:?} in dir {parent} is missing from the listing",
                n(name)
            ),
            Problem::StrayListing { parent, cookie } => {
                write!(f, "listing row {cookie} of dir {parent} has no entry")
            }
            Problem::LinkCount {
                ino,
                recorded,
                actual,
            } => write!(f, "inode {ino} records {recorded} links, has {actual}"),
            Problem::DirParent {
                ino,
                recorded,
                actual,
            } => write!(
                f,
                "directory {ino} records parent {recorded}, is in {actual}"
            ),
            Problem::DirMultiplyLinked { ino, entries } => {
                write!(f, "directory {ino} has {entries} entries (must have one)")
            }
            Problem::Orphan { ino } => write!(f, "inode {ino} has links but no entry (orphan)"),
            Problem::MissingBacking { ino } => write!(f, "regular file {ino} has no backing file"),
            Problem::StrayBacking { ino } => {
                write!(f, "backing file {ino:016x} belongs to no regular file")
            }
            Problem::Recreatable { ino, .. } => write!(
                f,
                "backing file {ino:016x} belongs to no regular file yet: its origin record \
                 holds a create an fsync made durable (the next mount, or --repair, creates \
                 the file again)"
            ),
            Problem::UnknownFlashFile { path } => {
                write!(f, "unknown file in flash dir: {}", path.display())
            }
            Problem::Size {
                ino,
                recorded,
                actual,
            } => write!(
                f,
                "file {ino} records size {recorded}, backing file has {actual}"
            ),
        }
    }
}

pub fn run(data_dir: &Path, repair: bool) -> Result<()> {
    let dir = DataDir::new(data_dir);
    if !dir.exists() {
        bail!(
            "{} is not a ClaudeFS data dir (no meta.redb)",
            data_dir.display()
        );
    }
    if crate::datadir::is_locked(&dir.meta_path()) {
        bail!(
            "{} is in use by a running mount; unmount it first",
            data_dir.display()
        );
    }
    let (meta, flash, _) = dir.open()?;

    let mut inodes: HashMap<Ino, Inode> = HashMap::new();
    meta.for_each_inode(|i| {
        inodes.insert(i.ino, i);
        Ok(())
    })?;
    let mut problems = Vec::new();
    let mut entries_of: HashMap<Ino, Vec<Ino>> = HashMap::new();
    let mut subdirs: HashMap<Ino, u32> = HashMap::new();
    let mut dentry_cookies: HashSet<(Ino, u64)> = HashSet::new();
    let mut dentries = Vec::new();
    meta.for_each_dentry(|parent, name, ino, cookie, kind| {
        dentries.push((parent, name.to_vec(), ino, cookie, kind));
        Ok(())
    })?;
    let mut listing: HashMap<(Ino, u64), Ino> = HashMap::new();
    meta.for_each_listing(|dir, cookie, ino, _| {
        listing.insert((dir, cookie), ino);
        Ok(())
    })?;
    for (parent, name, ino, cookie, kind) in dentries {
        dentry_cookies.insert((parent, cookie));
        let Some(inode) = inodes.get(&ino) else {
            problems.push(Problem::DanglingEntry {
                parent,
                name,
                cookie,
                ino,
            });
            continue;
        };
        if kind != Some(inode.kind) {
            problems.push(Problem::WrongKind {
                parent,
                name: name.clone(),
                ino,
            });
        }
        if listing.get(&(parent, cookie)) != Some(&ino) {
            problems.push(Problem::MissingListing {
                parent,
                name,
                cookie,
                ino,
                kind: inode.kind,
            });
        }
        entries_of.entry(ino).or_default().push(parent);
        if inode.kind == FileKind::Dir {
            *subdirs.entry(parent).or_default() += 1;
        }
    }
    for &(parent, cookie) in listing.keys() {
        if !dentry_cookies.contains(&(parent, cookie)) {
            problems.push(Problem::StrayListing { parent, cookie });
        }
    }
    let orphans: HashSet<Ino> = meta.orphans()?.into_iter().collect();
    for inode in inodes.values() {
        let parents = entries_of.get(&inode.ino).map(Vec::as_slice).unwrap_or(&[]);
        if inode.ino == ROOT_INO {
            let actual = 2 + subdirs.get(&ROOT_INO).copied().unwrap_or(0);
            if inode.nlink != actual {
                problems.push(Problem::LinkCount {
                    ino: inode.ino,
                    recorded: inode.nlink,
                    actual,
                });
            }
            continue;
        }
        if parents.is_empty() {
            if inode.nlink > 0 || !orphans.contains(&inode.ino) {
                problems.push(Problem::Orphan { ino: inode.ino });
            }
            continue;
        }
        if inode.kind == FileKind::Dir {
            if parents.len() != 1 {
                problems.push(Problem::DirMultiplyLinked {
                    ino: inode.ino,
                    entries: parents.len(),
                });
            }
            if inode.parent != parents[0] {
                problems.push(Problem::DirParent {
                    ino: inode.ino,
                    recorded: inode.parent,
                    actual: parents[0],
                });
            }
            let actual = 2 + subdirs.get(&inode.ino).copied().unwrap_or(0);
            if inode.nlink != actual {
                problems.push(Problem::LinkCount {
                    ino: inode.ino,
                    recorded: inode.nlink,
                    actual,
                });
            }
        } else if inode.nlink != parents.len() as u32 {
            problems.push(Problem::LinkCount {
                ino: inode.ino,
                recorded: inode.nlink,
                actual: parents.len() as u32,
            });
        }
    }
    let mut backing: HashMap<Ino, u64> = HashMap::new();
    for entry in flash.scan()? {
        match entry {
            Ok(b) => {
                backing.insert(b.ino, b.size);
            }
            Err(path) => problems.push(Problem::UnknownFlashFile { path }),
        }
    }
    for inode in inodes.values().filter(|i| i.kind == FileKind::File) {
        match backing.get(&inode.ino) {
            None if inode.size > 0 => problems.push(Problem::MissingBacking { ino: inode.ino }),
            None => {}
            Some(&actual) if actual != inode.size => problems.push(Problem::Size {
                ino: inode.ino,
                recorded: inode.size,
                actual,
            }),
            Some(_) => {}
        }
    }
    let mut records = Vec::new();
    for &ino in backing.keys() {
        if inodes.get(&ino).is_none_or(|i| i.kind != FileKind::File) {
            let origin = if inodes.contains_key(&ino) {
                None
            } else {
                crate::datadir::origin(&flash, ino)
            };
            match origin {
                Some(origin) => records.push((ino, origin)),
                None => problems.push(Problem::StrayBacking { ino }),
            }
        }
    }
    // As a mount's recovery decides: stale records, and older records of an entry that a
    // newer one names, leave strays.
    let (keep, dropped) = cfs_meta::recoverable(records, meta.log_durable_seq());
    problems.extend(dropped.into_iter().map(|ino| Problem::StrayBacking { ino }));
    problems.extend(
        keep.into_iter()
            .map(|(ino, origin)| Problem::Recreatable { ino, origin }),
    );

    println!(
        "checked {} inodes, {} entries, {} backing files in {}",
        inodes.len(),
        dentry_cookies.len(),
        backing.len(),
        data_dir.display()
    );
    if problems.is_empty() {
        println!("clean");
        return Ok(());
    }
    for p in &problems {
        println!("problem: {p}");
    }
    if !repair {
        println!("{} problems", problems.len());
        return Err(FsckFailed { exit_code: 4 }.into());
    }
    let mut fixed = 0;
    meta.repair(|r| {
        for p in &problems {
            match p {
                Problem::DanglingEntry {
                    parent,
                    name,
                    cookie,
                    ..
                } => r.remove_dentry(*parent, name, *cookie)?,
                Problem::MissingListing {
                    parent,
                    name,
                    cookie,
                    ino,
                    kind,
                } => r.put_listing(*parent, *cookie, *ino, *kind, name)?,
                Problem::StrayListing { parent, cookie } => r.remove_listing(*parent, *cookie)?,
                Problem::LinkCount { ino, actual, .. } => {
                    let Some(mut inode) = inodes.get(ino).cloned() else {
                        continue;
                    };
                    inode.nlink = *actual;
                    r.put_inode(&inode)?;
                }
                Problem::DirParent { ino, actual, .. } => {
                    let Some(mut inode) = inodes.get(ino).cloned() else {
                        continue;
                    };
                    inode.parent = *actual;
                    r.put_inode(&inode)?;
                }
                Problem::Size { ino, actual, .. } => {
                    let Some(mut inode) = inodes.get(ino).cloned() else {
                        continue;
                    };
                    inode.size = *actual;
                    r.put_inode(&inode)?;
                }
                Problem::Orphan { ino } => {
                    // No entry can reach it: mark it for purge at the next mount.
                    let Some(mut inode) = inodes.get(ino).cloned() else {
                        continue;
                    };
                    inode.nlink = 0;
                    r.put_inode(&inode)?;
                    r.mark_orphan(*ino)?;
                }
                _ => continue,
            }
            fixed += 1;
        }
        Ok::<(), MetaError>(())
    })?;
    let (mut recreated, mut removed) = (Vec::new(), false);
    for p in &problems {
        match p {
            Problem::StrayBacking { ino } => {
                flash.remove(*ino)?;
                removed = true;
                fixed += 1;
            }
            Problem::Recreatable { ino, origin } => {
                // As a mount's recovery does; a record that no longer fits (its directory
                // is gone) leaves a stray.
                match crate::datadir::recreate_from(&meta, &flash, *ino, origin, true)? {
                    Some(name) => {
                        println!(
                            "note: file {ino} created again from its origin record, as {}",
                            String::from_utf8_lossy(&name)
                        );
                        recreated.push(*ino);
                    }
                    None => {
                        flash.remove(*ino)?;
                        removed = true;
                    }
                }
                fixed += 1;
            }
            Problem::MissingBacking { ino } => {
                println!(
                    "note: file {ino} lost its data; it is kept with its recorded size as a hole"
                );
                let f = flash.open_or_create(*ino)?;
                f.set_len(inodes.get(ino).map(|i| i.size).unwrap_or(0))?;
                fixed += 1;
            }
            _ => {}
        }
    }
    meta.sync()?;
    crate::datadir::settle_records(&flash, &recreated, removed)?;
    let left = problems.len() - fixed;
    println!("{fixed} problems repaired, {left} left");
    Err(FsckFailed {
        exit_code: if left == 0 { 1 } else { 4 },
    }
    .into())
}
