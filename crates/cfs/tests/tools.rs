//! Everyday tools run unmodified on a mount: git, tar, rsync, sqlite3 and a C build.
//! Each runs once with passthrough and once with the daemon data path.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// A git repository with a few hundred objects, made on the spot so the test needs no network.
fn make_repo(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir repo");
    let git = |args: &[&str]| {
        run(Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t"));
    };
    git(&["init", "-q", "-b", "main"]);
    for c in 0..20 {
        for f in 0..10 {
            let p = dir.join(format!("src/m{f}"));
            std::fs::create_dir_all(&p).expect("mkdir");
            std::fs::write(
                p.join(format!("f{c}.txt")),
                format!("commit {c} file {f}\n").repeat(50 + c * f),
            )
            .expect("write");
        }
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", &format!("commit {c}")]);
    }
}

#[test]
fn git_clone_and_fsck() {
    let root = scratch("git");
    let origin = root.path().join("origin");
    make_repo(&origin);
    for (i, mode) in MODES.iter().enumerate() {
        let m = Mount::start(&root.path().join(format!("m{i}")), mode);
        let clone = m.path("clone");
        run(Command::new("git")
            .args(["clone", "-q", "--no-local"])
            .arg(&origin)
            .arg(&clone));
        run(Command::new("git")
            .current_dir(&clone)
            .args(["fsck", "--full", "--strict"]));
        run(Command::new("git")
            .current_dir(&clone)
            .args(["gc", "-q", "--aggressive"]));
        run(Command::new("git")
            .current_dir(&clone)
            .args(["fsck", "--full"]));
        let out = run(Command::new("git")
            .current_dir(&clone)
            .args(["status", "--porcelain"]));
        assert!(
            out.stdout.is_empty(),
            "clone is dirty: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A tree of a few thousand small files with varied sizes, modes, symlinks and hard links.
fn make_tree(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for d in 0..40 {
        let sub = dir.join(format!("d{d:02}/e{}", d % 7));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..60 {
            let p = sub.join(format!("f{f:03}.dat"));
            std::fs::write(&p, vec![(d * 31 + f) as u8; (d * 997 + f * 131) % 20_000])
                .expect("write");
            std::fs::set_permissions(
                &p,
                std::fs::Permissions::from_mode(0o600 + (f as u32 % 3) * 0o44),
            )
            .expect("chmod");
        }
        std::os::unix::fs::symlink(
            format!("e{}/f000.dat", d % 7),
            dir.join(format!("d{d:02}/link")),
        )
        .expect("symlink");
        std::fs::hard_link(sub.join("f001.dat"), sub.join("hard.dat")).expect("link");
    }
}

#[test]
fn tar_extract_and_diff() {
    let root = scratch("tar");
    let src = root.path().join("src");
    make_tree(&src);
    let tarball = root.path().join("t.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(&tarball)
        .arg("."));
    for (i, mode) in MODES.iter().enumerate() {
        let m = Mount::start(&root.path().join(format!("m{i}")), mode);
        let dst = m.path("x");
        std::fs::create_dir(&dst).expect("mkdir");
        run(Command::new("tar")
            .arg("-C")
            .arg(&dst)
            .arg("-xpf")
            .arg(&tarball));
        run(Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&src)
            .arg(&dst));
        // Re-create the archive from the mount: it must list the same members.
        let again = root.path().join(format!("again{i}.tar"));
        run(Command::new("tar")
            .arg("-C")
            .arg(&dst)
            .arg("-cf")
            .arg(&again)
            .arg("."));
        let list = |t: &Path| {
            let mut v: Vec<String> =
                String::from_utf8_lossy(&run(Command::new("tar").arg("-tf").arg(t)).stdout)
                    .lines()
                    .map(String::from)
                    .collect();
            v.sort();
            v
        };
        assert_eq!(list(&tarball), list(&again));
    }
}

#[test]
fn rsync_round_trip() {
    let root = scratch("rsync");
    let src = root.path().join("src");
    make_tree(&src);
    for (i, mode) in MODES.iter().enumerate() {
        let m = Mount::start(&root.path().join(format!("m{i}")), mode);
        run(Command::new("rsync")
            .args(["-aHX"])
            .arg(format!("{}/", src.display()))
            .arg(m.path("in")));
        let back = root.path().join(format!("back{i}"));
        run(Command::new("rsync")
            .args(["-aHX"])
            .arg(format!("{}/", m.path("in").display()))
            .arg(&back));
        run(Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&src)
            .arg(&back));
        // A second run has nothing to transfer.
        let out = run(Command::new("rsync")
            .args(["-aHXi"])
            .arg(format!("{}/", src.display()))
            .arg(m.path("in")));
        assert!(
            out.stdout.is_empty(),
            "rsync found differences: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn sqlite_integrity() {
    let root = scratch("sqlite");
    for (i, mode) in MODES.iter().enumerate() {
        let m = Mount::start(&root.path().join(format!("m{i}")), mode);
        let db = m.path("t.db");
        let script = "PRAGMA journal_mode=WAL;\
            CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);\
            WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<20000) INSERT INTO t(v) SELECT hex(randomblob(100)) FROM c;\
            CREATE INDEX iv ON t(v);\
            DELETE FROM t WHERE id % 3 = 0;\
            VACUUM;\
            PRAGMA journal_mode=DELETE;\
            UPDATE t SET v = v || 'x' WHERE id % 5 = 0;";
        run(Command::new("sqlite3").arg(&db).arg(script));
        let out = run(Command::new("sqlite3")
            .arg(&db)
            .arg("PRAGMA integrity_check; SELECT count(*) FROM t;"));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok\n13334");
    }
}

#[test]
fn c_project_builds_and_runs() {
    let root = scratch("build");
    for (i, mode) in MODES.iter().enumerate() {
        let m = Mount::start(&root.path().join(format!("m{i}")), mode);
        let p = m.path("proj");
        std::fs::create_dir_all(&p).expect("mkdir");
        let mut objs = Vec::new();
        let mut main = String::from("#include <stdio.h>\n");
        for k in 0..30 {
            std::fs::write(
                p.join(format!("u{k}.c")),
                format!("int u{k}(int x) {{ return x * {k} + 1; }}\n"),
            )
            .expect("write");
            main.push_str(&format!("int u{k}(int);\n"));
            objs.push(format!("u{k}.o"));
        }
        main.push_str("int main(void) { long s = 0;\n");
        for k in 0..30 {
            main.push_str(&format!("s += u{k}({k});\n"));
        }
        main.push_str("printf(\"%ld\\n\", s); return 0; }\n");
        std::fs::write(p.join("main.c"), main).expect("write");
        std::fs::write(
            p.join("Makefile"),
            format!(
                "prog: main.o {objs}\n\tcc -o $@ $^\n%.o: %.c\n\tcc -O1 -c -o $@ $<\n",
                objs = objs.join(" ")
            ),
        )
        .expect("write");
        run(Command::new("make").arg("-s").arg("-j4").current_dir(&p));
        let out = run(&mut Command::new(p.join("prog")));
        let expected: i64 = (0..30).map(|k: i64| k * k + 1).sum();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected.to_string()
        );
        // An incremental build after touching one file rebuilds and still runs.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(p.join("u3.c"), "int u3(int x) { return x * 3 + 2; }\n").expect("write");
        run(Command::new("make").arg("-s").current_dir(&p));
        let out = run(&mut Command::new(p.join("prog")));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            (expected + 1).to_string()
        );
    }
}

#[test]
fn read_only_mount_refuses_writes() {
    let root = scratch("ro");
    let mut m = Mount::start(root.path(), &[]);
    std::fs::write(m.path("f"), b"data").expect("write");
    m.unmount();
    let m = Mount::start(root.path(), &["--read-only"]);
    assert_eq!(std::fs::read(m.path("f")).expect("read"), b"data");
    let err = std::fs::write(m.path("g"), b"x").expect_err("write on a read-only mount");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}
