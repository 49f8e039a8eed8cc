//! POSIX features beyond what pjdfstest covers, checked through the kernel on a real mount:
//! sparse files (SEEK_HOLE/SEEK_DATA, punch-hole, keep-size), server-side copy, ACL
//! enforcement, locks between processes, readdir stability, statfs, timestamps.

mod common;
use common::*;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::Command;

fn seek(f: &std::fs::File, off: i64, whence: nix::unistd::Whence) -> i64 {
    nix::unistd::lseek(f, off, whence).expect("lseek")
}

#[test]
fn sparse_files_holes_and_fallocate() {
    let root = scratch("sparse");
    for (i, mode) in MODES.iter().enumerate() {
        let m = Mount::start(&root.path().join(format!("m{i}")), mode);
        let path = m.path("sparse");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("create");
        let mib = 1 << 20;
        f.write_all_at(b"head", 0).expect("write");
        f.write_all_at(b"tail", 8 * mib).expect("write");
        f.sync_all().expect("fsync");
        use nix::unistd::Whence::{SeekData, SeekHole};
        assert_eq!(seek(&f, 0, SeekData), 0);
        let hole = seek(&f, 0, SeekHole);
        assert!(hole > 0 && hole < 8 * mib as i64, "first hole at {hole}");
        assert_eq!(seek(&f, hole, SeekData) & !4095, (8 * mib) as i64 & !4095);
        let md = std::fs::metadata(&path).expect("stat");
        assert_eq!(md.len(), 8 * mib + 4);
        assert!(
            md.blocks() * 512 < 1024 * 1024,
            "sparse file allocates {} bytes",
            md.blocks() * 512
        );

        // Keep-size preallocation does not change the size; punching a hole zeroes the range.
        nix::fcntl::fallocate(
            &f,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            8 * mib as i64,
            4 * mib as i64,
        )
        .expect("fallocate keep-size");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 8 * mib + 4);
        nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, 12 * mib as i64)
            .expect("fallocate");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 12 * mib);
        nix::fcntl::fallocate(
            &f,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
        .expect("punch hole");
        let mut buf = [1u8; 4];
        f.read_exact_at(&mut buf, 0).expect("read");
        assert_eq!(buf, [0; 4], "punched range reads as zeros");
        f.read_exact_at(&mut buf, 8 * mib).expect("read");
        assert_eq!(&buf, b"tail");
    }
}

#[test]
fn copy_file_range_copies_server_side() {
    let root = scratch("cfr");
    for (i, mode) in MODES.iter().enumerate() {
        let m = Mount::start(&root.path().join(format!("m{i}")), mode);
        let data: Vec<u8> = (0..3_000_000u32).map(|x| (x % 251) as u8).collect();
        std::fs::write(m.path("src"), &data).expect("write");
        let src = std::fs::File::open(m.path("src")).expect("open");
        let dst = std::fs::File::create(m.path("dst")).expect("create");
        let mut copied = 0usize;
        while copied < data.len() {
            let (mut a, mut b) = (copied as i64, copied as i64);
            let n = nix::fcntl::copy_file_range(
                &src,
                Some(&mut a),
                &dst,
                Some(&mut b),
                data.len() - copied,
            )
            .expect("copy_file_range");
            assert!(n > 0);
            copied += n;
        }
        drop(dst);
        assert_eq!(std::fs::read(m.path("dst")).expect("read"), data);
        // `cp --reflink=auto` takes the same path.
        run(Command::new("cp")
            .arg("--reflink=auto")
            .arg(m.path("src"))
            .arg(m.path("dst2")));
        assert_eq!(sha256_file(&m.path("dst2")), sha256_file(&m.path("src")));
    }
}

/// Runs a shell command as user `nobody`.
fn as_nobody(cmd: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            cmd,
        ])
        .output()
        .expect("setpriv")
}

#[test]
fn acls_are_enforced() {
    let root = scratch("acl");
    let m = Mount::start(root.path(), &[]);
    let f = m.path("secret");
    std::fs::write(&f, b"s3cret").expect("write");
    set_mode(&f, 0o644);
    let read = format!("cat {}", f.display());
    assert!(as_nobody(&read).status.success(), "0644 is world-readable");
    run(Command::new("setfacl").args(["-m", "u:nobody:---"]).arg(&f));
    assert!(
        !as_nobody(&read).status.success(),
        "a named-user ACL entry must deny nobody"
    );
    let mode = std::fs::metadata(&f).expect("stat").mode() & 0o777;
    assert_eq!(mode, 0o644, "the mask keeps the group bits");
    run(Command::new("setfacl").args(["-x", "u:nobody"]).arg(&f));
    assert!(as_nobody(&read).status.success());

    // Default ACLs are inherited and grant access the mode alone would not.
    let d = m.path("shared");
    std::fs::create_dir(&d).expect("mkdir");
    set_mode(&d, 0o700);
    run(Command::new("setfacl")
        .args(["-m", "u:nobody:rwx", "-d", "-m", "u:nobody:rwx"])
        .arg(&d));
    let out = as_nobody(&format!(
        "echo hi > {0}/by-nobody && cat {0}/by-nobody",
        d.display()
    ));
    assert!(
        out.status.success(),
        "nobody writes via ACL: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acl = run(Command::new("getfacl").arg("-c").arg(d.join("by-nobody")));
    assert!(
        String::from_utf8_lossy(&acl.stdout).contains("user:nobody:rw"),
        "inherited ACL: {}",
        String::from_utf8_lossy(&acl.stdout)
    );
}

/// A write, a truncation or a change of owner clears set-user-ID and set-group-ID, and a
/// change of owner clears file capabilities: the mount leaves this to the daemon
/// (FUSE_HANDLE_KILLPRIV_V2), in exchange for writes that no longer ask it for
/// `security.capability` first. Root's writes keep the bits, and set-group-ID without group
/// execute (mandatory locking) stays, as on Linux.
#[test]
fn set_id_bits_are_cleared_by_writes_truncation_and_chown() {
    let root = scratch("setid");
    for (i, mode) in MODES.iter().enumerate() {
        let m = Mount::start(&root.path().join(format!("m{i}")), mode);
        let dir = m.path("d");
        std::fs::create_dir(&dir).expect("mkdir");
        set_mode(&dir, 0o777);
        let mode_of = |name: &str| std::fs::metadata(dir.join(name)).expect("stat").mode() & 0o7777;
        let by_nobody = |script: &str| {
            let out = as_nobody(&format!("cd {} && {script}", dir.display()));
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        by_nobody("echo a > w && chmod 6755 w && echo b >> w");
        assert_eq!(mode_of("w"), 0o755, "{mode:?}: a write by the owner");
        by_nobody("echo a > t && chmod 4755 t && truncate -s 1 t");
        assert_eq!(mode_of("t"), 0o755, "{mode:?}: a truncation");
        by_nobody("echo a > o && chmod 4755 o && : > o");
        assert_eq!(mode_of("o"), 0o755, "{mode:?}: an open with O_TRUNC");
        // Created set-id, then written through the handle the create returned.
        by_nobody(
            "python3 -c \"import os; fd = os.open('c', os.O_CREAT | os.O_WRONLY, 0o6755); \
             os.write(fd, b'x'); os.close(fd)\"",
        );
        assert_eq!(
            mode_of("c"),
            0o755,
            "{mode:?}: a write through the create's handle"
        );
        // Opened for writing while already open for reading: with passthrough, the reader's
        // handle and the writer's (served by the daemon, which must see the write) meet in
        // one inode, which the kernel serves in one io mode only. A third open reads the
        // written byte, as the first does.
        by_nobody(
            "echo a > s && chmod 4755 s && python3 -c \"import os; \
             r = os.open('s', os.O_RDONLY); w = os.open('s', os.O_WRONLY); \
             os.pwrite(w, b'z', 0); r2 = os.open('s', os.O_RDONLY); \
             assert os.pread(r, 1, 0) == b'z' and os.pread(r2, 1, 0) == b'z'; \
             [os.close(fd) for fd in (r, w, r2)]\"",
        );
        assert_eq!(
            mode_of("s"),
            0o755,
            "{mode:?}: a write to a file open for reading"
        );
        by_nobody("echo a > l && chmod 2745 l && echo b >> l");
        assert_eq!(
            mode_of("l"),
            0o2745,
            "{mode:?}: set-group-ID without group execute"
        );

        let r = dir.join("r");
        std::fs::write(&r, b"a").expect("write");
        set_mode(&r, 0o6755);
        // Also beside a handle open for reading (passthrough, with passthrough).
        let reader = std::fs::File::open(&r).expect("open");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&r)
            .expect("open")
            .write_all_at(b"b", 1)
            .expect("write");
        assert_eq!(mode_of("r"), 0o6755, "{mode:?}: root keeps them");
        let mut both = [0; 2];
        reader.read_exact_at(&mut both, 0).expect("read");
        assert_eq!(&both, b"ab", "{mode:?}: the reader sees root's write");
        drop(reader);
        run(Command::new("chown").arg("65534").arg(&r));
        assert_eq!(mode_of("r"), 0o755, "{mode:?}: a change of owner");

        let c = dir.join("c");
        std::fs::write(&c, b"c").expect("write");
        run(Command::new("setcap").arg("cap_net_raw+ep").arg(&c));
        assert!(getxattr(&c, "security.capability").is_some());
        run(Command::new("chown").arg("65534").arg(&c));
        assert_eq!(getxattr(&c, "security.capability"), None, "{mode:?}");
    }
}

#[test]
fn locks_between_processes() {
    let root = scratch("locks");
    for (i, mode) in MODES.iter().enumerate() {
        let m = Mount::start(&root.path().join(format!("m{i}")), mode);
        let lockfile = m.path("lock");
        std::fs::write(&lockfile, b"").expect("create");
        // flock: a holder in another process makes a non-blocking attempt fail.
        let mut holder = Command::new("flock")
            .arg(&lockfile)
            .args(["sleep", "3"])
            .spawn()
            .expect("flock holder");
        std::thread::sleep(std::time::Duration::from_millis(500));
        let out = Command::new("flock")
            .args(["-n"])
            .arg(&lockfile)
            .arg("true")
            .output()
            .expect("flock -n");
        assert!(
            !out.status.success(),
            "flock must conflict across processes"
        );
        holder.wait().expect("holder");
        assert!(
            Command::new("flock")
                .args(["-n"])
                .arg(&lockfile)
                .arg("true")
                .status()
                .expect("flock")
                .success()
        );

        // POSIX record locks: a write lock held here blocks another process's F_SETLK.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&lockfile)
            .expect("open");
        let lock = libc::flock {
            l_type: libc::F_WRLCK as i16,
            l_whence: libc::SEEK_SET as i16,
            l_start: 0,
            l_len: 100,
            l_pid: 0,
        };
        nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETLK(&lock)).expect("F_SETLK");
        let script = format!(
            "import fcntl,sys\nf=open('{}','r+')\ntry:\n fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB, 10, 0)\n sys.exit(0)\nexcept OSError:\n sys.exit(3)\n",
            lockfile.display()
        );
        let status = Command::new("python3")
            .arg("-c")
            .arg(&script)
            .status()
            .expect("python3");
        assert_eq!(
            status.code(),
            Some(3),
            "record lock must conflict across processes"
        );
        let _ = f.as_raw_fd();
    }
}

#[test]
fn readdir_stays_stable_while_the_directory_changes() {
    let root = scratch("readdir");
    let m = Mount::start(root.path(), &[]);
    let d = m.path("d");
    std::fs::create_dir(&d).expect("mkdir");
    for k in 0..3000 {
        std::fs::write(d.join(format!("keep{k:05}")), b"").expect("create");
    }
    let mut seen = std::collections::HashSet::new();
    let mut step = 0;
    for entry in std::fs::read_dir(&d).expect("read_dir") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        assert!(seen.insert(name.clone()), "{name} listed twice");
        step += 1;
        // Churn while the listing is in progress: add and remove other entries.
        if step % 10 == 0 {
            std::fs::write(d.join(format!("churn{step}")), b"").expect("create");
            let _ = std::fs::remove_file(d.join(format!("churn{}", step - 10)));
        }
    }
    for k in 0..3000 {
        assert!(
            seen.contains(&format!("keep{k:05}")),
            "keep{k:05} was skipped"
        );
    }
}

#[test]
fn statfs_timestamps_and_inode_numbers() {
    let root = scratch("statfs");
    let m = Mount::start(root.path(), &[]);
    let fs = nix::sys::statvfs::statvfs(&m.mountpoint).expect("statvfs mount");
    let under = nix::sys::statvfs::statvfs(&m.data_dir).expect("statvfs data dir");
    assert_eq!(
        fs.blocks() * fs.fragment_size(),
        under.blocks() * under.fragment_size(),
        "statfs reports the flash capacity"
    );
    assert_eq!(fs.name_max(), 255);
    // The daemon's data path reads ahead one whole FUSE read (the kernel's default is 128 KiB).
    let dev = std::fs::metadata(&m.mountpoint).expect("stat mount").dev();
    let sysfs = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(&sysfs)
        .expect("read_ahead_kb")
        .trim()
        != "1024"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "readahead of the mount not raised to 1024 KiB"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let f = m.path("t");
    std::fs::write(&f, b"x").expect("write");
    run(Command::new("touch")
        .args(["-d", "2001-02-03 04:05:06.123456789"])
        .arg(&f));
    let md = std::fs::metadata(&f).expect("stat");
    assert_eq!(md.mtime_nsec(), 123_456_789, "nanosecond mtime");
    assert_eq!(md.atime_nsec(), 123_456_789, "nanosecond atime");

    let ino = md.ino();
    std::fs::rename(&f, m.path("t2")).expect("rename");
    std::fs::hard_link(m.path("t2"), m.path("t3")).expect("link");
    assert_eq!(
        std::fs::metadata(m.path("t3")).expect("stat").ino(),
        ino,
        "inode numbers are stable"
    );

    // Writes through passthrough show up in stat at once.
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(m.path("t2"))
        .expect("open");
    let before = std::fs::metadata(m.path("t2")).expect("stat");
    std::thread::sleep(std::time::Duration::from_millis(10));
    file.write_all_at(&[7u8; 5000], 1).expect("write");
    let after = std::fs::metadata(m.path("t2")).expect("stat");
    assert_eq!(after.len(), 5001);
    assert!(
        after.mtime() * 1_000_000_000 + after.mtime_nsec()
            > before.mtime() * 1_000_000_000 + before.mtime_nsec(),
        "mtime moves on write"
    );
}

/// A create's answer carries the new file's attributes, which the kernel keeps for the attribute
/// TTL (an hour by default) without asking again, and the daemon builds them from the inode
/// without a stat of the backing file. They must be what the daemon reports once it is asked:
/// after a remount, from a cold kernel cache. Enough creates to take both backing files
/// prepared ahead and newly made ones.
#[test]
fn a_new_files_attributes_are_what_a_later_stat_shows() {
    let root = scratch("created-attrs");
    let mut m = Mount::start(root.path(), &[]);
    let fields = |md: &std::fs::Metadata| {
        (
            (md.size(), md.blocks(), md.mode(), md.nlink(), md.uid()),
            (md.atime(), md.atime_nsec()),
            (md.mtime(), md.mtime_nsec()),
            (md.ctime(), md.ctime_nsec()),
        )
    };
    let mut created = Vec::new();
    for i in 0..300 {
        let name = format!("f{i}");
        let file = std::fs::File::create_new(m.path(&name)).expect("create");
        created.push((name, fields(&file.metadata().expect("fstat"))));
    }
    m.unmount();
    m.remount();
    for (name, at_create) in created {
        let later = fields(&std::fs::metadata(m.path(&name)).expect("stat"));
        assert_eq!(
            later, at_create,
            "{name}: the create's attributes against a later stat"
        );
    }
}

/// Opens of one file that need different io modes, racing: a reader's gets passthrough, and
/// a writer's of a set-id file is served by the daemon unless a passthrough handle is open.
/// The kernel fails with EIO an open whose mode clashes with a handle it holds, so the
/// daemon must decide one open of a file at a time: two that look at once can each miss the
/// other and clash (before it did, this saw dozens of EIOs in a few seconds).
#[test]
fn racing_opens_of_one_file_in_different_io_modes_all_succeed() {
    let root = scratch("race");
    let m = Mount::start(root.path(), &[]);
    let f = m.path("s");
    std::fs::write(&f, vec![b'a'; 4096]).expect("write");
    set_mode(&f, 0o4755);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let opens = |write: bool| {
        let f = &f;
        move || {
            // Opens and reads or writes that worked, that failed, and the first error.
            let (mut ok, mut failed, mut first) = (0u64, 0u64, None);
            while std::time::Instant::now() < until {
                let r = std::fs::OpenOptions::new()
                    .read(!write)
                    .write(write)
                    .open(f)
                    .and_then(|file| {
                        let mut b = [0; 1];
                        if write {
                            file.write_all_at(b"b", 0)
                        } else {
                            file.read_exact_at(&mut b, 0)
                        }
                    });
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        first.get_or_insert(e.to_string());
                    }
                }
            }
            (ok, failed, first)
        }
    };
    let ((reads, read_errors, read_error), (writes, write_errors, write_error)) =
        std::thread::scope(|s| {
            let r = s.spawn(opens(false));
            let w = s.spawn(opens(true));
            (
                r.join().expect("reader thread"),
                w.join().expect("writer thread"),
            )
        });
    assert!(reads > 0 && writes > 0, "{reads} reads, {writes} writes");
    assert!(
        read_errors == 0 && write_errors == 0,
        "of {reads} reads and {writes} writes, {read_errors} and {write_errors} failed: \
         {read_error:?} {write_error:?}"
    );
    // Root's writes keep the bits.
    assert_eq!(std::fs::metadata(&f).expect("stat").mode() & 0o7777, 0o4755);
}

/// Pages the kernel cached for a file read through the daemon (`--no-passthrough`) stay
/// cached across opens (`FOPEN_KEEP_CACHE`), so a file read again is not read from the daemon
/// again; and once a passthrough handle has written the file behind the kernel's cache, the
/// next daemon-served open drops them, so no reader sees the old bytes.
#[test]
fn the_page_cache_is_kept_across_opens_until_passthrough_writes_go_around_it() {
    let root = scratch("keep-cache");
    let cached_pages = |path: &std::path::Path| -> u64 {
        let out = run(Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "PAGES"])
            .arg(path));
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("fincore said {text:?}: {e}"))
    };
    let m = Mount::start(&root.path().join("daemon"), &["--no-passthrough"]);
    let f = m.path("f");
    let data = noise(7, 1 << 20);
    std::fs::write(&f, &data).expect("write");
    assert_eq!(std::fs::read(&f).expect("read"), data);
    // fincore opens the file again: an open that drops the cache leaves it no pages.
    assert_eq!(
        cached_pages(&f),
        256,
        "pages cached after a read and a new open"
    );
    drop(m);

    let m = Mount::start(&root.path().join("passthrough"), &[]);
    let s = m.path("s");
    std::fs::write(&s, vec![b'a'; 4096]).expect("write");
    // A writable open of a set-id file is served by the daemon (it must clear the bits on a
    // write by others), so its reads fill the kernel's cache.
    let read_served_by_daemon = |path: &std::path::Path| {
        set_mode(path, 0o4755);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open");
        let mut buf = vec![0; 4096];
        file.read_exact_at(&mut buf, 0).expect("read");
        set_mode(path, 0o755);
        buf
    };
    assert_eq!(read_served_by_daemon(&s), vec![b'a'; 4096]);
    // Same size, so the kernel has no size change to drop its pages for.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s)
        .expect("open")
        .write_all_at(&[b'b'; 4096], 0)
        .expect("passthrough write");
    assert_eq!(
        read_served_by_daemon(&s),
        vec![b'b'; 4096],
        "a daemon-served read after a passthrough write"
    );
}

/// Deleted files are purged by a background thread after the kernel forgets them, and their
/// backing files become spares that new files reuse. An unmount purges everything queued, so
/// the flash directory then holds exactly the live files' backing files.
#[test]
fn deleted_files_are_purged_by_unmount_and_their_backing_files_reused() {
    use std::os::unix::fs::MetadataExt;
    let root = scratch("purge");
    let mut m = Mount::start(root.path(), &[]);
    std::fs::create_dir(m.path("d")).expect("mkdir");
    for i in 0..300 {
        std::fs::write(m.path(&format!("d/f{i}")), vec![i as u8; 3000]).expect("write");
    }
    std::fs::write(m.path("keep"), b"kept").expect("write");
    let flash = m.data_dir.join("flash");
    let ino_of = |p: &std::path::PathBuf| std::fs::metadata(p).expect("stat").ino();
    // Beside the files' own, the shards hold the empty backing files prepared for the next
    // creates; an unmount gives those back as spares too.
    let backing_before: std::collections::HashSet<u64> = walk(&flash)
        .iter()
        .filter(|p| std::fs::metadata(p).expect("stat").len() > 0)
        .map(ino_of)
        .collect();
    assert_eq!(backing_before.len(), 301);
    std::fs::remove_dir_all(m.path("d")).expect("rm -r");
    m.unmount();
    let left = walk(&flash);
    assert_eq!(left.len(), 1, "only the kept file's backing file is left");
    // The spare directory also holds the empty files the daemon makes in advance.
    let spares: Vec<_> = std::fs::read_dir(flash.join("spare"))
        .expect("spares")
        .map(|e| e.expect("entry").path())
        .collect();
    let spare_inos: std::collections::HashSet<u64> = spares.iter().map(ino_of).collect();
    let purged: Vec<u64> = backing_before
        .iter()
        .copied()
        .filter(|ino| *ino != ino_of(&left[0]))
        .collect();
    assert_eq!(purged.len(), 300);
    assert!(
        purged.iter().all(|ino| spare_inos.contains(ino)),
        "every purged backing file is a spare"
    );
    assert!(
        spares
            .iter()
            .all(|p| std::fs::metadata(p).expect("stat").len() == 0),
        "spares are empty"
    );
    let data = m.data_dir.to_str().expect("utf8").to_string();
    let out = cfs(&["fsck", &data]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    m.remount();
    // The mount's filler may top the spares up, and the mount moves some spares into place
    // as backing files prepared for the next creates (empty, and owned by no file yet): take
    // both once they have settled, so that the file the next create takes is among them.
    let mut spare_inos = settled_spares(&flash.join("spare"));
    spare_inos.extend(
        walk(&flash)
            .iter()
            .filter(|p| std::fs::metadata(p).expect("stat").len() == 0)
            .map(ino_of),
    );
    assert!(
        purged.iter().all(|ino| spare_inos.contains(ino)),
        "the purged backing files are still spares (or prepared for creates) after a remount"
    );
    std::fs::write(m.path("new"), b"fresh").expect("write");
    assert_eq!(std::fs::read(m.path("new")).expect("read"), b"fresh");
    assert_eq!(std::fs::read(m.path("keep")).expect("read"), b"kept");
    m.unmount();
    let reused = walk(&flash)
        .iter()
        .filter(|p| spare_inos.contains(&std::fs::metadata(p).expect("stat").ino()))
        .count();
    assert_eq!(reused, 1, "the new file's backing file is a former spare");
}

/// The inode numbers of the spares in `dir` once their count has stayed the same for 300 ms
/// (at most 10 s): the mount's filler makes new ones in the background.
fn settled_spares(dir: &std::path::Path) -> std::collections::HashSet<u64> {
    // The directory entry's own inode number, not a stat: the mount may move a spare into
    // place between the listing and a stat of it.
    use std::os::unix::fs::DirEntryExt;
    let list = || -> std::collections::HashSet<u64> {
        std::fs::read_dir(dir)
            .expect("spares")
            .map(|e| e.expect("entry").ino())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = list();
    let mut still = 0;
    while still < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = list();
        still = if now.len() == last.len() {
            still + 1
        } else {
            0
        };
        last = now;
    }
    last
}

#[test]
fn fsck_finds_and_repairs_damage() {
    let root = scratch("fsck");
    let mut m = Mount::start(root.path(), &[]);
    std::fs::write(m.path("a"), vec![1u8; 10_000]).expect("write");
    std::fs::write(m.path("b"), vec![2u8; 20_000]).expect("write");
    m.unmount();
    let data = m.data_dir.to_str().expect("utf8").to_string();
    assert!(cfs(&["fsck", &data]).status.success());

    // Damage: a stray backing file, and a file whose backing file is gone.
    let flash = m.data_dir.join("flash");
    std::fs::write(flash.join("ff/00000000000000ff"), b"stray").expect("stray");
    let mut backing: Vec<_> = walk(&flash);
    backing.retain(|p| !p.ends_with("00000000000000ff"));
    assert_eq!(backing.len(), 2);
    std::fs::remove_file(&backing[0]).expect("remove backing file");

    let out = cfs(&["fsck", &data]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("belongs to no regular file"), "{text}");
    assert!(text.contains("has no backing file"), "{text}");
    let out = cfs(&["fsck", "--repair", &data]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(cfs(&["fsck", &data]).status.success(), "clean after repair");
    m.remount();
    assert_eq!(std::fs::read_dir(&m.mountpoint).expect("ls").count(), 2);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(dir).expect("read flash") {
        let shard = shard.expect("shard");
        if shard.file_name() == "spare" {
            continue;
        }
        for f in std::fs::read_dir(shard.path()).expect("read shard") {
            out.push(f.expect("entry").path());
        }
    }
    out
}
