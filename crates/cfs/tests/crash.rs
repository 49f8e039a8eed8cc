//! `kill -9` of the daemon in the middle of a write workload loses nothing that was fsynced,
//! and leaves metadata that `cfs fsck` finds clean after a remount.

mod common;
use common::*;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `cfs fsck` of the (unmounted) mount's data dir finds it clean.
fn assert_fsck_clean(m: &Mount) {
    let out = cfs(&["fsck", m.data_dir.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "fsck after crash and remount:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes files until told to stop or until the mount dies. Records a file's checksum only
/// after both its fsync and its directory's fsync returned.
fn writer(
    root: std::path::PathBuf,
    id: u64,
    stop: Arc<AtomicBool>,
    synced: Arc<Mutex<Vec<(std::path::PathBuf, String)>>>,
) {
    let dir = root.join(format!("w{id}"));
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    for i in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let seed = id * 1_000_000 + i;
        let len = ((seed * 7919) % (2 << 20)) as usize;
        let data = content(seed, len);
        let path = dir.join(format!("f{i}"));
        let result = (|| -> std::io::Result<()> {
            if i % 4 == 3 {
                // Atomic replace: write a temporary, fsync, rename over, fsync the directory.
                let tmp = dir.join(format!(".tmp{i}"));
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
            } else {
                let mut f = std::fs::File::create(&path)?;
                f.write_all(&data)?;
                if i % 4 == 2 {
                    // Written but never fsynced: allowed to be lost.
                    return Err(std::io::Error::other("unsynced"));
                }
                f.sync_all()?;
            }
            std::fs::File::open(&dir)?.sync_all()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                let hash = {
                    use sha2::Digest;
                    format!("{:x}", sha2::Sha256::digest(&data))
                };
                synced.lock().expect("lock").push((path, hash));
            }
            Err(e) if e.to_string() == "unsynced" => {}
            Err(_) => return,
        }
    }
}

#[test]
fn kill9_during_writes_loses_nothing_fsynced() {
    for mode in MODES {
        let root = scratch("crash");
        let mut m = Mount::start(root.path(), mode);
        let stop = Arc::new(AtomicBool::new(false));
        let synced = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..3)
            .map(|id| {
                let (r, s, y) = (m.mountpoint.clone(), Arc::clone(&stop), Arc::clone(&synced));
                std::thread::spawn(move || writer(r, id, s, y))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while synced.lock().expect("lock").len() < 60 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        m.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("writer thread");
        }
        let synced = synced.lock().expect("lock").clone();
        assert!(
            synced.len() >= 60,
            "workload too slow: only {} files fsynced",
            synced.len()
        );

        m.remount();
        for (path, hash) in &synced {
            assert!(path.exists(), "fsynced file {} lost", path.display());
            assert_eq!(
                &sha256_file(path),
                hash,
                "fsynced file {} changed",
                path.display()
            );
        }
        // The filesystem keeps working after recovery. The killed daemon left the backing
        // files it had prepared for creates, owned by no inode: recovery removed them, and
        // the new daemon's own prepared ones go back to the spares at unmount (fsck below).
        std::fs::write(m.path("after"), b"ok").expect("write after recovery");
        m.unmount();
        assert_fsck_clean(&m);
    }
}

/// A rewrite in place followed by `fdatasync` (a database's journal header) makes no
/// metadata commit when the handle already made that size durable: after `kill -9` the new
/// bytes must still be there, at the right size, and fsck must find metadata and flash in step.
#[test]
fn kill9_after_fdatasync_of_a_rewrite_in_place_keeps_it() {
    use std::io::{Seek, SeekFrom, Write};
    for mode in MODES {
        let root = scratch("datasync");
        let mut m = Mount::start(root.path(), mode);
        let path = m.path("journal");
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(&content(1, 64 * 1024)).expect("write");
        f.sync_data().expect("first fdatasync");
        let mut want = content(1, 64 * 1024);
        for round in 0..5u8 {
            f.seek(SeekFrom::Start(512)).expect("seek");
            let patch = [round + 1; 4096];
            f.write_all(&patch).expect("rewrite");
            want[512..512 + 4096].copy_from_slice(&patch);
            f.sync_data().expect("fdatasync of the rewrite");
        }
        // Growing the file needs the new size recorded: the next fdatasync commits it.
        f.seek(SeekFrom::End(0)).expect("seek end");
        f.write_all(b"tail").expect("append");
        want.extend_from_slice(b"tail");
        f.sync_data().expect("fdatasync after growth");
        m.kill9();
        drop(f);
        m.remount();
        assert_eq!(
            std::fs::read(&path).expect("read after crash"),
            want,
            "{mode:?}"
        );
        m.unmount();
        assert_fsck_clean(&m);
    }
}

/// A loop of create, write, fsync (no directory fsync), as a mail spool or a build's output
/// does: each fsync makes the file's create durable through its backing file's origin record
/// rather than a metadata commit. After `kill -9`, recovery must create every such file again,
/// with its name, mode and bytes, and leave metadata fsck finds clean; a file created and
/// chmod-ed before its fsync takes the metadata commit instead and is kept too. A file created
/// in between and never synced does not stop the later fsyncs from going by their records
/// (it may be lost, as POSIX allows, but never comes back torn).
#[test]
fn kill9_after_fsyncs_of_new_files_keeps_them() {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    for mode in MODES {
        let root = scratch("newfiles");
        let mut m = Mount::start(root.path(), mode);
        std::fs::create_dir(m.path("spool")).expect("mkdir");
        std::fs::File::open(m.path("spool"))
            .and_then(|d| d.sync_all())
            .expect("fsync the directory");
        let mut want = Vec::new();
        for i in 0..40u64 {
            let path = m.path(&format!("spool/msg{i}"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(&path)
                .expect("create");
            let data = content(i, 1000 + 37 * i as usize);
            f.write_all(&data).expect("write");
            if i == 20 {
                f.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .expect("chmod");
            }
            if i == 10 {
                std::fs::write(m.path("spool/loose"), content(99, 3000)).expect("write");
            }
            f.sync_all().expect("fsync");
            want.push((path, data, if i == 20 { 0o600 } else { 0o640 }));
        }
        std::fs::write(m.path("spool/unsynced"), b"may be lost").expect("write");
        m.kill9();
        // fsck of the crashed data dir tells such files from strays, and its repair, run in
        // the second mode, creates them again as a mount's recovery does.
        let data_dir = m.data_dir.to_str().expect("utf8").to_string();
        let check = cfs(&["fsck", &data_dir]);
        let report = String::from_utf8_lossy(&check.stdout).into_owned();
        assert!(
            report.contains("its origin record holds a create an fsync made durable"),
            "{mode:?}: fsck after the crash:\n{report}"
        );
        let repaired = !mode.is_empty();
        if repaired {
            let out = cfs(&["fsck", "--repair", &data_dir]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                text.contains("created again from its origin record"),
                "fsck --repair:\n{text}"
            );
        }
        let log_before = m.log_text().len();
        m.remount();
        for (path, data, perm) in &want {
            assert_eq!(
                std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
                *data,
                "{mode:?} {}",
                path.display()
            );
            let md = std::fs::metadata(path).expect("stat");
            assert_eq!(
                md.permissions().mode() & 0o7777,
                *perm,
                "{}",
                path.display()
            );
        }
        match std::fs::read(m.path("spool/loose")) {
            Ok(bytes) => assert_eq!(bytes, content(99, 3000), "{mode:?}: the unsynced file"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
        }
        let log = m.log_text();
        assert_eq!(
            log[log_before..].contains("file created again from its backing file's origin record"),
            !repaired,
            "{mode:?}: files come back at the mount unless fsck --repair brought them back"
        );
        std::fs::write(m.path("spool/after"), b"ok").expect("write after recovery");
        m.unmount();
        assert_fsck_clean(&m);
    }
}

/// A database's rollback journal, as sqlite3 keeps it by default: each transaction creates
/// `db-journal`, sets its owner, writes and syncs it, fsyncs the directory, and unlinks it at
/// its commit. Those fsyncs go by origin records rather than metadata commits (see
/// `cfs_meta`'s `cover`), so at a crash the store may know none of these journals. Here the
/// unlinked journals stay open, so their backing files and records are all still there at
/// the `kill -9`: recovery must bring back the newest journal alone, under its own name.
#[test]
fn kill9_after_journal_cycles_brings_back_only_the_newest_journal() {
    use std::os::unix::fs::OpenOptionsExt;
    for mode in MODES {
        let root = scratch("journal");
        let mut m = Mount::start(root.path(), mode);
        let dir = m.path("db");
        std::fs::create_dir(&dir).expect("mkdir");
        let sync_dir = || {
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .expect("fsync the directory")
        };
        sync_dir();
        let journal = m.path("db/db-journal");
        let last = 12u64;
        let mut held = Vec::new();
        for i in 0..=last {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&journal)
                .unwrap_or_else(|e| panic!("{mode:?}: create journal {i}: {e}"));
            std::os::unix::fs::fchown(&f, Some(0), Some(0)).expect("fchown");
            f.write_all(&content(i, 5000 + i as usize)).expect("write");
            f.sync_data().expect("fdatasync");
            sync_dir();
            if i < last {
                std::fs::remove_file(&journal).expect("unlink");
            }
            held.push(f);
        }
        m.kill9();
        drop(held);
        m.remount();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["db-journal"], "{mode:?}");
        assert_eq!(
            std::fs::read(&journal).expect("read"),
            content(last, 5000 + last as usize),
            "{mode:?}: the newest journal's bytes"
        );
        m.unmount();
        assert_fsck_clean(&m);
    }
}

/// sqlite3 in its default rollback-journal mode, one row per transaction, then `kill -9` of
/// the daemon as soon as sqlite3 exits: the database must be intact after the remount, with
/// every transaction, or all but the last (whose commit, the journal's unlink, sqlite3 does
/// not sync in this mode), and never a journal of one transaction rolled back over another.
#[test]
fn kill9_after_sqlite3_commits_leaves_the_database_intact() {
    for mode in MODES {
        let root = scratch("sqlite-crash");
        let mut m = Mount::start(root.path(), mode);
        let db = m.path("t.db");
        let rows = 150u64;
        let mut script = String::from("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER);");
        for i in 1..=rows {
            script.push_str(&format!("INSERT INTO t(v) VALUES ({i});"));
            if i % 25 == 0 {
                // Transactions that rewrite many pages, so journals differ in length.
                script.push_str("UPDATE t SET v = v + 0;");
            }
        }
        run(std::process::Command::new("sqlite3").arg(&db).arg(&script));
        m.kill9();
        m.remount();
        let out = run(std::process::Command::new("sqlite3").arg(&db).arg(
            "PRAGMA integrity_check; SELECT count(*), sum(v) = count(*) * (count(*) + 1) / 2 FROM t;",
        ));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("ok"), "{mode:?}: {text}");
        let (count, consistent) = lines
            .next()
            .and_then(|l| l.split_once('|'))
            .unwrap_or_else(|| panic!("{mode:?}: {text}"));
        let count: u64 = count.parse().expect("a count");
        assert!(
            count == rows || count == rows - 1,
            "{mode:?}: {count} of {rows} transactions"
        );
        assert_eq!(consistent, "1", "{mode:?}: rows of a transaction torn");
        let names: Vec<String> = std::fs::read_dir(m.path(""))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("cfs-recovered"))
            .collect();
        assert!(names.is_empty(), "{mode:?}: {names:?}");
        m.unmount();
        assert_fsck_clean(&m);
    }
}

/// `kill -9` right after an unlink, before the periodic commit makes it durable: the file
/// may come back (its unlink was not durable), but whole, never as its size with its bytes
/// gone (the backing file removed by a purge the store then lost).
#[test]
fn kill9_soon_after_an_unlink_leaves_the_file_whole_or_gone() {
    let root = scratch("unlinked");
    let mut m = Mount::start(root.path(), &[]);
    let (mut back, mut gone) = (0, 0);
    for round in 0..4u64 {
        let path = m.path(&format!("f{round}"));
        let data = content(round, 10_000);
        write_synced(&path, &data);
        std::fs::File::open(m.path(""))
            .and_then(|d| d.sync_all())
            .expect("fsync the directory");
        // Past the periodic commit, so that the unlink below is the only change pending.
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::remove_file(&path).expect("unlink");
        // Long enough for the kernel's FORGET and the purge it queues.
        std::thread::sleep(Duration::from_millis(50));
        m.kill9();
        m.remount();
        match std::fs::read(&path) {
            Ok(bytes) => {
                assert_eq!(bytes.len(), data.len(), "round {round}: size");
                assert!(
                    bytes == data,
                    "round {round}: the file came back without its bytes"
                );
                std::fs::remove_file(&path).expect("unlink again");
                back += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => gone += 1,
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    eprintln!("files back {back}, gone {gone}");
    m.unmount();
    assert_fsck_clean(&m);
}

#[test]
fn metadata_survives_clean_remount() {
    let root = scratch("remount");
    let mut m = Mount::start(root.path(), &[]);
    std::fs::create_dir_all(m.path("a/b/c")).expect("mkdir");
    std::fs::write(m.path("a/b/c/f"), b"payload").expect("write");
    std::os::unix::fs::symlink("c/f", m.path("a/b/l")).expect("symlink");
    std::fs::hard_link(m.path("a/b/c/f"), m.path("a/h")).expect("link");
    setxattr(&m.path("a/h"), "user.k", "v");
    let ino_before = std::fs::metadata(m.path("a/b/c/f"))
        .map(|md| std::os::unix::fs::MetadataExt::ino(&md))
        .expect("stat");
    m.unmount();
    m.remount();
    assert_eq!(
        std::fs::read(m.path("a/b/l")).expect("read through symlink"),
        b"payload"
    );
    let md = std::fs::metadata(m.path("a/h")).expect("stat");
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&md), 2);
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&md),
        ino_before,
        "inode numbers are stable"
    );
    assert_eq!(
        getxattr(&m.path("a/h"), "user.k").as_deref(),
        Some(&b"v"[..])
    );
}
