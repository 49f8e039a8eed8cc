//! State-machine tests against a real redb file in a temporary directory.

use crate::types::libc_consts::{S_IFDIR, S_IFLNK, S_IFREG, S_ISGID};
use crate::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

fn store() -> (tempfile::TempDir, MetaStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, created) =
        MetaStore::open(&dir.path().join("meta.redb"), Timestamp::now(), 0, 0).expect("open");
    assert!(created);
    (dir, store)
}

/// The operation that creates `name` in `parent` as inode `ino`, mode 0755 less umask 022.
fn create_op(parent: Ino, name: &str, ino: Ino, kind: FileKind) -> Op {
    Op::Create {
        parent,
        name: name.as_bytes().to_vec(),
        ino,
        kind,
        perm: 0o755,
        umask: 0o022,
        rdev: 0,
        target: Vec::new(),
        caller: Caller::default(),
        now: Timestamp::now(),
    }
}

fn create(s: &MetaStore, parent: Ino, name: &str, kind: FileKind) -> Result<Inode> {
    let ino = s.alloc_ino();
    match s.execute(&create_op(parent, name, ino, kind))? {
        Outcome::Inode(i) => Ok(i),
        other => panic!("unexpected outcome {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn ts(secs: i64) -> Timestamp {
    Timestamp { secs, nanos: 0 }
}

fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
    Caller {
        uid,
        gid,
        groups: groups.to_vec(),
    }
}

fn inode_of(outcome: Outcome) -> Inode {
    match outcome {
        Outcome::Inode(i) => i,
        other => panic!("expected Outcome::Inode, got {other:?}"),
    }
}

/// Creates with full control over permission bits, umask and caller.
fn mk(
    s: &MetaStore,
    parent: Ino,
    name: &str,
    kind: FileKind,
    perm: u32,
    umask: u32,
    caller: &Caller,
) -> Result<Inode> {
    let ino = s.alloc_ino();
    s.execute(&Op::Create {
        parent,
        name: name.as_bytes().to_vec(),
        ino,
        kind,
        perm,
        umask,
        rdev: 0,
        target: Vec::new(),
        caller: caller.clone(),
        now: Timestamp::now(),
    })
    .map(inode_of)
}

fn create_raw(s: &MetaStore, parent: Ino, name: &[u8], kind: FileKind) -> Result<Inode> {
    let ino = s.alloc_ino();
    s.execute(&Op::Create {
        parent,
        name: name.to_vec(),
        ino,
        kind,
        perm: 0o644,
        umask: 0,
        rdev: 0,
        target: Vec::new(),
        caller: Caller::default(),
        now: Timestamp::now(),
    })
    .map(inode_of)
}

fn symlink(s: &MetaStore, parent: Ino, name: &str, target: &[u8]) -> Result<Inode> {
    let ino = s.alloc_ino();
    s.execute(&Op::Create {
        parent,
        name: name.as_bytes().to_vec(),
        ino,
        kind: FileKind::Symlink,
        perm: 0o600,
        umask: 0o077,
        rdev: 0,
        target: target.to_vec(),
        caller: Caller::default(),
        now: Timestamp::now(),
    })
    .map(inode_of)
}

fn link(s: &MetaStore, ino: Ino, parent: Ino, name: &str) -> Result<Inode> {
    s.execute(&Op::Link {
        ino,
        parent,
        name: name.as_bytes().to_vec(),
        now: Timestamp::now(),
    })
    .map(inode_of)
}

fn removed(outcome: Outcome) -> Option<Ino> {
    match outcome {
        Outcome::Removed { orphaned } => orphaned,
        other => panic!("expected Outcome::Removed, got {other:?}"),
    }
}

fn unlink(s: &MetaStore, parent: Ino, name: &str) -> Result<Option<Ino>> {
    s.execute(&Op::Unlink {
        parent,
        name: name.as_bytes().to_vec(),
        now: Timestamp::now(),
    })
    .map(removed)
}

fn rmdir(s: &MetaStore, parent: Ino, name: &str) -> Result<Option<Ino>> {
    s.execute(&Op::Rmdir {
        parent,
        name: name.as_bytes().to_vec(),
        now: Timestamp::now(),
    })
    .map(removed)
}

fn rename(
    s: &MetaStore,
    parent: Ino,
    name: &str,
    new_parent: Ino,
    new_name: &str,
    mode: RenameMode,
) -> Result<Option<Ino>> {
    s.execute(&Op::Rename {
        parent,
        name: name.as_bytes().to_vec(),
        new_parent,
        new_name: new_name.as_bytes().to_vec(),
        mode,
        now: Timestamp::now(),
    })
    .map(removed)
}

fn purge(s: &MetaStore, ino: Ino) -> Option<Inode> {
    match s.execute(&Op::Purge { ino }).expect("purge") {
        Outcome::Purged(p) => p,
        other => panic!("expected Outcome::Purged, got {other:?}"),
    }
}

fn setxattr(s: &MetaStore, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<Inode> {
    s.execute(&Op::SetXattr {
        ino,
        name: name.to_vec(),
        value: value.to_vec(),
        mode,
        caller: Caller::default(),
        now: Timestamp::now(),
    })
    .map(inode_of)
}

fn removexattr(s: &MetaStore, ino: Ino, name: &[u8]) -> Result<Inode> {
    s.execute(&Op::RemoveXattr {
        ino,
        name: name.to_vec(),
        now: Timestamp::now(),
    })
    .map(inode_of)
}

fn chmod(s: &MetaStore, ino: Ino, perm: u32) -> Inode {
    inode_of(
        s.execute(&Op::SetAttr {
            ino,
            attr: SetAttr {
                perm: Some(perm),
                ..SetAttr::default()
            },
            now: Timestamp::now(),
        })
        .expect("chmod"),
    )
}

fn get(s: &MetaStore, ino: Ino) -> Inode {
    s.inode(ino).expect("inode")
}

fn lookup(s: &MetaStore, parent: Ino, name: &str) -> Inode {
    s.lookup(parent, name.as_bytes()).expect("lookup")
}

fn missing(s: &MetaStore, parent: Ino, name: &str) -> bool {
    matches!(s.lookup(parent, name.as_bytes()), Err(MetaError::NotFound))
}

/// Every entry of `dir`, read in pages of `page`.
fn list(s: &MetaStore, dir: Ino, page: usize) -> Vec<DirEntry> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let batch = s.readdir(dir, after, page, false).expect("readdir");
        if batch.is_empty() {
            return out;
        }
        assert!(batch.len() <= page, "readdir returned more than the limit");
        for (e, i) in batch {
            assert!(i.is_none(), "inode returned without with_inodes");
            assert!(
                e.cookie > after,
                "readdir after {after} returned cookie {}",
                e.cookie
            );
            after = e.cookie;
            out.push(e);
        }
    }
}

fn names(s: &MetaStore, dir: Ino) -> Vec<String> {
    list(s, dir, 1000)
        .into_iter()
        .map(|e| String::from_utf8(e.name).expect("utf8"))
        .collect()
}

fn sorted_names(s: &MetaStore, dir: Ino) -> Vec<String> {
    let mut v = names(s, dir);
    v.sort();
    v
}

fn orphans(s: &MetaStore) -> BTreeSet<Ino> {
    s.orphans().expect("orphans").into_iter().collect()
}

macro_rules! assert_err {
    ($e:expr, $pat:pat) => {
        match $e {
            Err($pat) => {}
            other => panic!(
                "{}: expected {}, got {:?}",
                stringify!($e),
                stringify!($pat),
                other
            ),
        }
    };
}

/// Checks every structural invariant the state machine must keep: dentries and listing
/// agree, link counts match the entries, directories form a tree whose `parent` fields match
/// their entries, cookies are below their directory's `next_cookie`, and the orphan table
/// holds exactly the inodes with no links.
fn check_invariants(s: &MetaStore) {
    let mut inodes = BTreeMap::new();
    s.for_each_inode(|i| {
        inodes.insert(i.ino, i);
        Ok(())
    })
    .expect("inodes");
    let mut dentries = Vec::new();
    s.for_each_dentry(|parent, name, ino, cookie, kind| {
        dentries.push((parent, name.to_vec(), ino, cookie, kind));
        Ok(())
    })
    .expect("dentries");
    let mut listing = BTreeMap::new();
    s.for_each_listing(|dir, cookie, ino, name| {
        listing.insert((dir, cookie), (ino, name.to_vec()));
        Ok(())
    })
    .expect("listing");

    assert_eq!(
        dentries.len(),
        listing.len(),
        "dentries and listing differ in size"
    );
    let mut links: HashMap<Ino, u32> = HashMap::new();
    let mut subdirs: HashMap<Ino, u32> = HashMap::new();
    let mut dir_entry_parent: HashMap<Ino, Ino> = HashMap::new();
    let mut cookies_seen = BTreeSet::new();
    for (parent, name, ino, cookie, kind) in &dentries {
        let p = inodes.get(parent).expect("dentry in a missing directory");
        assert_eq!(p.kind, FileKind::Dir, "dentry in a non-directory");
        assert!(p.nlink > 0, "dentry in a removed directory");
        let target = inodes
            .get(ino)
            .unwrap_or_else(|| panic!("dentry {name:?} to missing inode {ino}"));
        assert_eq!(Some(target.kind), *kind, "dentry kind mismatch for {ino}");
        assert!(*cookie >= FIRST_COOKIE, "cookie below FIRST_COOKIE");
        assert!(*cookie < p.next_cookie, "cookie not below next_cookie");
        assert!(cookies_seen.insert((*parent, *cookie)), "duplicate cookie");
        assert_eq!(
            listing.get(&(*parent, *cookie)),
            Some(&(*ino, name.clone())),
            "listing does not match dentry {name:?}"
        );
        *links.entry(*ino).or_default() += 1;
        if target.kind == FileKind::Dir {
            *subdirs.entry(*parent).or_default() += 1;
            assert!(
                dir_entry_parent.insert(*ino, *parent).is_none(),
                "directory {ino} has two entries"
            );
        }
    }
    let orphan_set = orphans(s);
    for (ino, inode) in &inodes {
        assert_eq!(*ino, inode.ino, "inode stored under the wrong key");
        if inode.kind == FileKind::Dir {
            if *ino == ROOT_INO {
                assert_eq!(inode.parent, ROOT_INO);
                assert!(!links.contains_key(ino), "root has an entry");
            } else if inode.nlink > 0 {
                assert_eq!(
                    dir_entry_parent.get(ino),
                    Some(&inode.parent),
                    "parent field of dir {ino} does not match its entry"
                );
            } else {
                assert!(!links.contains_key(ino), "removed dir still linked");
            }
            if inode.nlink > 0 {
                assert_eq!(
                    inode.nlink,
                    2 + subdirs.get(ino).copied().unwrap_or(0),
                    "nlink of dir {ino}"
                );
                // The parent chain reaches the root.
                let mut d = *ino;
                let mut steps = 0;
                while d != ROOT_INO {
                    d = inodes.get(&d).expect("parent exists").parent;
                    steps += 1;
                    assert!(steps < 10_000, "parent loop at {ino}");
                }
            }
        } else {
            assert_eq!(
                inode.nlink,
                links.get(ino).copied().unwrap_or(0),
                "nlink of {ino}"
            );
        }
        assert_eq!(
            inode.nlink == 0,
            orphan_set.contains(ino),
            "orphan table disagrees about {ino}"
        );
    }
    for o in &orphan_set {
        assert!(inodes.contains_key(o), "orphan {o} has no inode");
    }
}

// ---------------------------------------------------------------------------------------------
// POSIX ACL encoding for tests
// ---------------------------------------------------------------------------------------------

use crate::acl::{GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ};
const NO_ID: u32 = u32::MAX;

fn acl_bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

fn acl_entries(bytes: &[u8]) -> Vec<(u16, u16, u32)> {
    assert_eq!(
        u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")),
        2,
        "ACL version"
    );
    assert_eq!((bytes.len() - 4) % 8, 0, "ACL length");
    bytes[4..]
        .chunks_exact(8)
        .map(|c| {
            (
                u16::from_le_bytes([c[0], c[1]]),
                u16::from_le_bytes([c[2], c[3]]),
                u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect()
}

fn perm_of(entries: &[(u16, u16, u32)], tag: u16) -> u16 {
    entries
        .iter()
        .find(|e| e.0 == tag)
        .unwrap_or_else(|| panic!("no entry with tag {tag:#x}"))
        .1
}

// ---------------------------------------------------------------------------------------------
// Open / root
// ---------------------------------------------------------------------------------------------

#[test]
fn fresh_store_has_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, created) = MetaStore::open(&dir.path().join("m.redb"), ts(1000), 42, 43).expect("open");
    assert!(created);
    let root = get(&s, ROOT_INO);
    assert_eq!(root.kind, FileKind::Dir);
    assert_eq!(root.nlink, 2);
    assert_eq!(root.parent, ROOT_INO);
    assert_eq!((root.uid, root.gid), (42, 43));
    assert_eq!(root.mode(), S_IFDIR | 0o755);
    assert_eq!(root.crtime, ts(1000));
    assert_eq!(root.next_cookie, FIRST_COOKIE);
    assert!(
        s.readdir(ROOT_INO, 0, 100, true)
            .expect("readdir")
            .is_empty()
    );
    assert!(s.orphans().expect("orphans").is_empty());
    assert!(!s.fs_id().is_empty());
    let first = s.alloc_ino();
    assert!(first > ROOT_INO);
    assert_eq!(s.alloc_ino(), first + 1);
    check_invariants(&s);
}

#[test]
fn create_lookup_and_duplicate() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "a", FileKind::File).expect("create");
    assert_eq!(s.lookup(ROOT_INO, b"a").expect("lookup").ino, f.ino);
    assert!(matches!(
        create(&s, ROOT_INO, "a", FileKind::File),
        Err(MetaError::Exists)
    ));
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("mkdir");
    assert_eq!(d.nlink, 2);
    assert_eq!(s.inode(ROOT_INO).expect("root").nlink, 3);
}

// ---------------------------------------------------------------------------------------------
// Create
// ---------------------------------------------------------------------------------------------

#[test]
fn create_each_kind() {
    let (_d, s) = store();
    let now = ts(5000);
    let cases = [
        (FileKind::File, 0),
        (FileKind::Dir, 0),
        (FileKind::Fifo, 0),
        (FileKind::Socket, 0),
        (FileKind::CharDev, 0x0501),
        (FileKind::BlockDev, 0x0803),
    ];
    for (i, (kind, rdev)) in cases.into_iter().enumerate() {
        let ino = s.alloc_ino();
        let name = format!("n{i}");
        let c = caller(1000 + i as u32, 2000 + i as u32, &[]);
        let inode = inode_of(
            s.execute(&Op::Create {
                parent: ROOT_INO,
                name: name.as_bytes().to_vec(),
                ino,
                kind,
                perm: 0o640,
                umask: 0o022,
                rdev,
                target: Vec::new(),
                caller: c,
                now,
            })
            .expect("create"),
        );
        assert_eq!(inode.ino, ino);
        assert_eq!(inode.kind, kind);
        assert_eq!(inode.rdev, rdev);
        assert_eq!(inode.perm, 0o640);
        assert_eq!(inode.mode(), kind.mode_bits() | 0o640);
        assert_eq!(FileKind::from_mode(inode.mode()), Some(kind));
        assert_eq!((inode.uid, inode.gid), (1000 + i as u32, 2000 + i as u32));
        assert_eq!(inode.size, 0);
        assert_eq!(inode.parent, ROOT_INO);
        assert_eq!(inode.next_cookie, FIRST_COOKIE);
        assert_eq!(
            (inode.atime, inode.mtime, inode.ctime, inode.crtime),
            (now, now, now, now)
        );
        assert_eq!(inode.nlink, if kind == FileKind::Dir { 2 } else { 1 });
        // What the store has equals what the outcome said.
        assert_eq!(get(&s, ino), inode);
        assert_eq!(lookup(&s, ROOT_INO, &name), inode);
    }
    let root = get(&s, ROOT_INO);
    assert_eq!(root.nlink, 3, "only the one subdirectory counts");
    assert_eq!((root.mtime, root.ctime), (now, now));
    assert_eq!(
        sorted_names(&s, ROOT_INO),
        ["n0", "n1", "n2", "n3", "n4", "n5"]
    );
    let c = s.counts().expect("counts");
    assert_eq!((c.inodes, c.files, c.dirs, c.orphans), (7, 1, 2, 0));
    check_invariants(&s);
}

#[test]
fn create_symlink_target_and_size() {
    let (_d, s) = store();
    let target = b"../some/where/else";
    let l = symlink(&s, ROOT_INO, "l", target).expect("symlink");
    assert_eq!(l.kind, FileKind::Symlink);
    assert_eq!(l.target, target);
    assert_eq!(l.size, target.len() as u64);
    // Symlinks are always 0777, whatever perm and umask say.
    assert_eq!(l.perm, 0o777);
    assert_eq!(l.mode(), S_IFLNK | 0o777);
    assert_eq!(l.nlink, 1);
    let again = lookup(&s, ROOT_INO, "l");
    assert_eq!(again.target, target);
    assert_eq!(again.size, target.len() as u64);
    check_invariants(&s);
}

#[test]
fn create_name_validation() {
    let (_d, s) = store();
    let max = "x".repeat(NAME_MAX);
    let f = create(&s, ROOT_INO, &max, FileKind::File).expect("NAME_MAX is fine");
    assert_eq!(lookup(&s, ROOT_INO, &max).ino, f.ino);
    let long = "x".repeat(NAME_MAX + 1);
    assert_err!(
        create(&s, ROOT_INO, &long, FileKind::File),
        MetaError::NameTooLong
    );
    assert_err!(
        create(&s, ROOT_INO, &long, FileKind::Dir),
        MetaError::NameTooLong
    );
    assert_err!(
        create(&s, ROOT_INO, "", FileKind::File),
        MetaError::Invalid(_)
    );
    assert_err!(
        create(&s, ROOT_INO, "a/b", FileKind::File),
        MetaError::Invalid(_)
    );
    assert_err!(
        create(&s, ROOT_INO, "/", FileKind::Dir),
        MetaError::Invalid(_)
    );
    assert_err!(
        create_raw(&s, ROOT_INO, b"a\0b", FileKind::File),
        MetaError::Invalid(_)
    );
    // Arbitrary non-UTF-8 bytes are fine.
    create_raw(&s, ROOT_INO, &[0xff, 0xfe, b'x'], FileKind::File).expect("binary name");
    assert_eq!(list(&s, ROOT_INO, 10).len(), 2);
    check_invariants(&s);
}

#[test]
fn dot_names_cannot_be_created_or_linked() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    for name in [".", ".."] {
        for kind in [FileKind::File, FileKind::Dir, FileKind::Symlink] {
            assert_err!(create(&s, d.ino, name, kind), MetaError::Exists);
        }
        assert_err!(link(&s, f.ino, d.ino, name), MetaError::Exists);
        assert_err!(
            rename(&s, ROOT_INO, "f", d.ino, name, RenameMode::Replace),
            MetaError::Invalid(_)
        );
    }
    // Names that merely start with dots are ordinary.
    for name in ["...", "..a", ".a", ".x."] {
        create(&s, d.ino, name, FileKind::File).expect("dotted name");
    }
    assert_eq!(sorted_names(&s, d.ino), ["...", "..a", ".a", ".x."]);
    for name in ["...", "..a", ".a", ".x."] {
        unlink(&s, d.ino, name).expect("unlink dotted name");
    }
    // So the directory can still be removed.
    assert_eq!(rmdir(&s, ROOT_INO, "d").expect("rmdir"), Some(d.ino));
    assert_eq!(get(&s, ROOT_INO).nlink, 2);
    check_invariants(&s);
}

#[test]
fn create_in_non_dir_or_missing_or_removed_dir() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("create");
    assert_err!(create(&s, f.ino, "x", FileKind::File), MetaError::NotDir);
    assert_err!(create(&s, f.ino, "x", FileKind::Dir), MetaError::NotDir);
    assert_err!(create(&s, 9999, "x", FileKind::File), MetaError::NotFound);
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("mkdir");
    assert_eq!(rmdir(&s, ROOT_INO, "d").expect("rmdir"), Some(d.ino));
    // A removed directory someone still has open: nothing may appear in it.
    assert_err!(create(&s, d.ino, "x", FileKind::File), MetaError::NotFound);
    check_invariants(&s);
}

#[test]
fn create_with_used_inode_number_fails_and_changes_nothing() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("create");
    let root_before = get(&s, ROOT_INO);
    let r = s.execute(&Op::Create {
        parent: ROOT_INO,
        name: b"g".to_vec(),
        ino: f.ino,
        kind: FileKind::File,
        perm: 0o644,
        umask: 0,
        rdev: 0,
        target: Vec::new(),
        caller: Caller::default(),
        now: ts(99_999),
    });
    assert_err!(r, MetaError::Invalid(_));
    assert!(missing(&s, ROOT_INO, "g"));
    assert_eq!(get(&s, ROOT_INO), root_before, "failed op left a trace");
    assert_eq!(get(&s, f.ino), f);
    check_invariants(&s);
}

#[test]
fn create_applies_umask() {
    let (_d, s) = store();
    let root = Caller::default();
    let f = mk(&s, ROOT_INO, "f", FileKind::File, 0o666, 0o022, &root).expect("f");
    assert_eq!(f.perm, 0o644);
    assert_eq!(f.mode(), S_IFREG | 0o644);
    let g = mk(&s, ROOT_INO, "g", FileKind::File, 0o777, 0o027, &root).expect("g");
    assert_eq!(g.perm, 0o750);
    let d = mk(&s, ROOT_INO, "d", FileKind::Dir, 0o777, 0o077, &root).expect("d");
    assert_eq!(d.perm, 0o700);
    // The umask touches only the permission bits; sticky survives.
    let t = mk(&s, ROOT_INO, "t", FileKind::Dir, 0o1777, 0o022, &root).expect("t");
    assert_eq!(t.perm, 0o1755);
    // Type bits in the requested mode are ignored.
    let h = mk(&s, ROOT_INO, "h", FileKind::File, S_IFREG | 0o600, 0, &root).expect("h");
    assert_eq!(h.perm, 0o600);
    assert_eq!(h.mode(), S_IFREG | 0o600);
}

#[test]
fn setgid_directory_inheritance() {
    let (_d, s) = store();
    let owner = caller(500, 50, &[]);
    let sg = mk(&s, ROOT_INO, "sg", FileKind::Dir, 0o2775, 0o022, &owner).expect("sg");
    assert_eq!(sg.gid, 50);
    assert_eq!(sg.perm, 0o2755);

    let other = caller(1000, 1000, &[]);
    // Files and subdirectories take the directory's group, not the caller's.
    let f = mk(&s, sg.ino, "f", FileKind::File, 0o644, 0o022, &other).expect("f");
    assert_eq!((f.uid, f.gid), (1000, 50));
    assert_eq!(f.perm, 0o644);
    let sub = mk(&s, sg.ino, "sub", FileKind::Dir, 0o755, 0o022, &other).expect("sub");
    assert_eq!(sub.gid, 50);
    assert_eq!(sub.perm, 0o2755, "subdirectories inherit S_ISGID");
    // ... and so on down the tree.
    let subsub = mk(&s, sub.ino, "x", FileKind::Dir, 0o700, 0, &other).expect("subsub");
    assert_eq!(subsub.gid, 50);
    assert_eq!(subsub.perm, S_ISGID | 0o700);
    let sym = symlink(&s, sg.ino, "l", b"t").expect("symlink");
    assert_eq!(sym.gid, 50);
    assert_eq!(sym.perm, 0o777);

    // A set-gid, group-executable file created by someone outside the group loses S_ISGID.
    let x = mk(&s, sg.ino, "x", FileKind::File, 0o2775, 0, &other).expect("x");
    assert_eq!(x.perm, 0o775);
    // Someone in the group through supplementary groups keeps it.
    let member = caller(1001, 1001, &[7, 50]);
    let y = mk(&s, sg.ino, "y", FileKind::File, 0o2775, 0, &member).expect("y");
    assert_eq!(y.perm, 0o2775);
    // So does root.
    let z = mk(
        &s,
        sg.ino,
        "z",
        FileKind::File,
        0o2775,
        0,
        &Caller::default(),
    )
    .expect("z");
    assert_eq!(z.perm, 0o2775);
    // Without group execute (mandatory-locking mark) S_ISGID stays.
    let w = mk(&s, sg.ino, "w", FileKind::File, 0o2764, 0, &other).expect("w");
    assert_eq!(w.perm, 0o2764);

    // Outside a set-gid directory the caller's gid is used and S_ISGID is not added.
    let plain = mk(&s, ROOT_INO, "plain", FileKind::Dir, 0o755, 0, &owner).expect("plain");
    let in_plain = mk(&s, plain.ino, "d", FileKind::Dir, 0o755, 0, &other).expect("d");
    assert_eq!(in_plain.gid, 1000);
    assert_eq!(in_plain.perm, 0o755);
    check_invariants(&s);
}

// ---------------------------------------------------------------------------------------------
// Link
// ---------------------------------------------------------------------------------------------

#[test]
fn link_increments_nlink() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    let root_nlink = get(&s, ROOT_INO).nlink;
    let t = Timestamp {
        secs: 77_777,
        nanos: 5,
    };
    let l = inode_of(
        s.execute(&Op::Link {
            ino: f.ino,
            parent: d.ino,
            name: b"g".to_vec(),
            now: t,
        })
        .expect("link"),
    );
    assert_eq!(l.ino, f.ino);
    assert_eq!(l.nlink, 2);
    assert_eq!(l.ctime, t);
    assert_eq!(get(&s, f.ino).nlink, 2);
    assert_eq!(lookup(&s, d.ino, "g").ino, f.ino);
    assert_eq!(lookup(&s, ROOT_INO, "f").ino, f.ino);
    let dd = get(&s, d.ino);
    assert_eq!((dd.mtime, dd.ctime), (t, t));
    assert_eq!(
        dd.nlink, 2,
        "linking a file does not change the dir's nlink"
    );
    assert_eq!(get(&s, ROOT_INO).nlink, root_nlink);
    link(&s, f.ino, ROOT_INO, "h").expect("link 3");
    assert_eq!(get(&s, f.ino).nlink, 3);
    // Symlinks and special files can be linked too.
    let sym = symlink(&s, ROOT_INO, "sym", b"f").expect("symlink");
    assert_eq!(
        link(&s, sym.ino, d.ino, "sym2")
            .expect("link symlink")
            .nlink,
        2
    );
    check_invariants(&s);
}

#[test]
fn link_errors() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    let g = create(&s, ROOT_INO, "g", FileKind::File).expect("g");
    assert_err!(link(&s, d.ino, ROOT_INO, "d2"), MetaError::NotPermitted);
    assert_err!(link(&s, ROOT_INO, d.ino, "root"), MetaError::NotPermitted);
    assert_err!(link(&s, f.ino, ROOT_INO, "g"), MetaError::Exists);
    assert_err!(link(&s, f.ino, ROOT_INO, "f"), MetaError::Exists);
    assert_err!(link(&s, f.ino, g.ino, "x"), MetaError::NotDir);
    assert_err!(link(&s, 12345, ROOT_INO, "x"), MetaError::NotFound);
    assert_err!(link(&s, f.ino, 12345, "x"), MetaError::NotFound);
    assert_err!(
        link(&s, f.ino, ROOT_INO, &"y".repeat(NAME_MAX + 1)),
        MetaError::NameTooLong
    );
    assert_err!(link(&s, f.ino, ROOT_INO, "a/b"), MetaError::Invalid(_));
    assert_err!(link(&s, f.ino, ROOT_INO, ""), MetaError::Invalid(_));
    assert_eq!(get(&s, f.ino).nlink, 1, "failed links changed nlink");
    assert_eq!(get(&s, d.ino).nlink, 2);

    // An unlinked (orphaned) inode cannot be brought back by link.
    assert_eq!(unlink(&s, ROOT_INO, "g").expect("unlink"), Some(g.ino));
    assert_err!(link(&s, g.ino, ROOT_INO, "g2"), MetaError::NotFound);
    assert!(orphans(&s).contains(&g.ino));

    // LINK_MAX.
    s.repair(|r| {
        let mut i = get(&s, f.ino);
        i.nlink = LINK_MAX;
        r.put_inode(&i)
    })
    .expect("repair");
    assert_err!(link(&s, f.ino, ROOT_INO, "z"), MetaError::TooManyLinks);
    assert!(missing(&s, ROOT_INO, "z"));
}

// ---------------------------------------------------------------------------------------------
// Unlink, rmdir, orphans and purge
// ---------------------------------------------------------------------------------------------

#[test]
fn unlink_and_rmdir_type_errors() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    create(&s, d.ino, "inner", FileKind::File).expect("inner");
    assert_err!(unlink(&s, ROOT_INO, "d"), MetaError::IsDir);
    assert_err!(rmdir(&s, ROOT_INO, "f"), MetaError::NotDir);
    assert_err!(rmdir(&s, ROOT_INO, "d"), MetaError::NotEmpty);
    assert_err!(unlink(&s, ROOT_INO, "nope"), MetaError::NotFound);
    assert_err!(rmdir(&s, ROOT_INO, "nope"), MetaError::NotFound);
    assert_err!(unlink(&s, 4242, "f"), MetaError::NotFound);
    let f = lookup(&s, ROOT_INO, "f");
    assert_err!(unlink(&s, f.ino, "x"), MetaError::NotDir);
    assert_err!(rmdir(&s, ROOT_INO, "."), MetaError::Invalid(_));
    assert_err!(rmdir(&s, ROOT_INO, ".."), MetaError::NotEmpty);
    assert_err!(unlink(&s, ROOT_INO, "."), MetaError::Invalid(_));
    // Nothing changed.
    assert_eq!(get(&s, ROOT_INO).nlink, 3);
    assert_eq!(get(&s, d.ino).nlink, 2);
    assert_eq!(sorted_names(&s, ROOT_INO), ["d", "f"]);
    assert!(orphans(&s).is_empty());
    check_invariants(&s);
}

#[test]
fn unlink_hard_links_then_last_link_orphans() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    link(&s, f.ino, d.ino, "f2").expect("link");
    let t = ts(424_242);
    let r = s
        .execute(&Op::Unlink {
            parent: ROOT_INO,
            name: b"f".to_vec(),
            now: t,
        })
        .expect("unlink");
    assert_eq!(r, Outcome::Removed { orphaned: None });
    let after = get(&s, f.ino);
    assert_eq!(after.nlink, 1);
    assert_eq!(after.ctime, t);
    let root = get(&s, ROOT_INO);
    assert_eq!((root.mtime, root.ctime), (t, t));
    assert_eq!(
        root.nlink, 3,
        "unlinking a file leaves the parent's nlink alone"
    );
    assert!(missing(&s, ROOT_INO, "f"));
    assert!(orphans(&s).is_empty());

    assert_eq!(unlink(&s, d.ino, "f2").expect("unlink last"), Some(f.ino));
    // The inode stays, with no links, until purged.
    assert_eq!(get(&s, f.ino).nlink, 0);
    assert_eq!(orphans(&s), BTreeSet::from([f.ino]));
    assert_eq!(s.counts().expect("counts").orphans, 1);
    assert!(names(&s, d.ino).is_empty());
    check_invariants(&s);
}

#[test]
fn rmdir_updates_nlinks_and_orphans_dir() {
    let (_d, s) = store();
    let a = create(&s, ROOT_INO, "a", FileKind::Dir).expect("a");
    let b = create(&s, a.ino, "b", FileKind::Dir).expect("b");
    assert_eq!(get(&s, a.ino).nlink, 3);
    assert_eq!(get(&s, ROOT_INO).nlink, 3);
    assert_eq!(rmdir(&s, a.ino, "b").expect("rmdir b"), Some(b.ino));
    assert_eq!(get(&s, a.ino).nlink, 2);
    assert_eq!(get(&s, b.ino).nlink, 0);
    assert_eq!(orphans(&s), BTreeSet::from([b.ino]));
    assert_eq!(rmdir(&s, ROOT_INO, "a").expect("rmdir a"), Some(a.ino));
    assert_eq!(get(&s, ROOT_INO).nlink, 2);
    assert_eq!(orphans(&s), BTreeSet::from([a.ino, b.ino]));
    check_invariants(&s);
    assert_eq!(purge(&s, b.ino).map(|i| i.ino), Some(b.ino));
    assert_eq!(purge(&s, a.ino).map(|i| i.ino), Some(a.ino));
    assert_err!(s.inode(a.ino), MetaError::NotFound);
    assert!(orphans(&s).is_empty());
    check_invariants(&s);
}

#[test]
fn purge_removes_inode_and_xattrs() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    let neighbour = create(&s, ROOT_INO, "n", FileKind::File).expect("n");
    // An inode numbered just below, to make sure purge stays within its own xattrs.
    let below = s.execute(&Op::Create {
        parent: ROOT_INO,
        name: b"below".to_vec(),
        ino: 10_000,
        kind: FileKind::File,
        perm: 0o644,
        umask: 0,
        rdev: 0,
        target: Vec::new(),
        caller: Caller::default(),
        now: Timestamp::now(),
    });
    let below = inode_of(below.expect("create below"));
    let victim = inode_of(
        s.execute(&Op::Create {
            parent: ROOT_INO,
            name: b"victim".to_vec(),
            ino: 10_001,
            kind: FileKind::File,
            perm: 0o644,
            umask: 0,
            rdev: 0,
            target: Vec::new(),
            caller: Caller::default(),
            now: Timestamp::now(),
        })
        .expect("create victim"),
    );
    for ino in [f.ino, neighbour.ino, below.ino, victim.ino] {
        setxattr(&s, ino, b"user.a", b"1", XattrMode::Upsert).expect("xattr");
        setxattr(&s, ino, b"user.b", b"2", XattrMode::Upsert).expect("xattr");
    }
    assert_eq!(
        unlink(&s, ROOT_INO, "victim").expect("unlink"),
        Some(victim.ino)
    );
    // The xattrs of an orphan are still readable (an open file).
    assert_eq!(s.xattr(victim.ino, b"user.a").expect("xattr"), b"1");

    // Purging a linked inode is a no-op.
    let before = get(&s, f.ino);
    assert_eq!(purge(&s, f.ino), None);
    assert_eq!(get(&s, f.ino), before);
    assert_eq!(s.xattr_names(f.ino).expect("names").len(), 2);
    // And so is purging something that does not exist (twice-forgotten).
    assert_eq!(purge(&s, 987_654), None);

    let purged = purge(&s, victim.ino).expect("purged");
    assert_eq!(purged.ino, victim.ino);
    assert_eq!(purged.nlink, 0);
    assert_err!(s.inode(victim.ino), MetaError::NotFound);
    assert!(s.xattr_names(victim.ino).expect("names").is_empty());
    assert_err!(s.xattr(victim.ino, b"user.a"), MetaError::NotFound);
    assert!(orphans(&s).is_empty());
    // Neighbours keep theirs.
    for ino in [f.ino, neighbour.ino, below.ino] {
        assert_eq!(
            s.xattr_names(ino).expect("names"),
            [b"user.a".to_vec(), b"user.b".to_vec()]
        );
    }
    // A second purge finds nothing.
    assert_eq!(purge(&s, victim.ino), None);
    check_invariants(&s);
}

// ---------------------------------------------------------------------------------------------
// Rename
// ---------------------------------------------------------------------------------------------

#[test]
fn rename_within_dir() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "a", FileKind::File).expect("a");
    create(&s, ROOT_INO, "other", FileKind::File).expect("other");
    let t = ts(31_337);
    let r = s
        .execute(&Op::Rename {
            parent: ROOT_INO,
            name: b"a".to_vec(),
            new_parent: ROOT_INO,
            new_name: b"b".to_vec(),
            mode: RenameMode::Replace,
            now: t,
        })
        .expect("rename");
    assert_eq!(r, Outcome::Removed { orphaned: None });
    assert!(missing(&s, ROOT_INO, "a"));
    assert_eq!(lookup(&s, ROOT_INO, "b").ino, f.ino);
    let moved = get(&s, f.ino);
    assert_eq!(moved.nlink, 1);
    assert_eq!(moved.ctime, t);
    let root = get(&s, ROOT_INO);
    assert_eq!((root.mtime, root.ctime), (t, t));
    assert_eq!(sorted_names(&s, ROOT_INO), ["b", "other"]);
    // Renaming a directory in place keeps the nlink of its parent.
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    rename(&s, ROOT_INO, "d", ROOT_INO, "e", RenameMode::Replace).expect("rename dir");
    assert_eq!(get(&s, ROOT_INO).nlink, 3);
    assert_eq!(get(&s, d.ino).parent, ROOT_INO);
    assert_eq!(lookup(&s, ROOT_INO, "e").ino, d.ino);
    // Renaming a name to itself changes nothing.
    rename(&s, ROOT_INO, "e", ROOT_INO, "e", RenameMode::Replace).expect("self rename");
    assert_eq!(lookup(&s, ROOT_INO, "e").ino, d.ino);
    check_invariants(&s);
}

#[test]
fn rename_dir_across_dirs_moves_nlink_and_parent() {
    let (_d, s) = store();
    let a = create(&s, ROOT_INO, "a", FileKind::Dir).expect("a");
    let b = create(&s, ROOT_INO, "b", FileKind::Dir).expect("b");
    let c = create(&s, a.ino, "c", FileKind::Dir).expect("c");
    create(&s, c.ino, "file", FileKind::File).expect("file");
    assert_eq!(get(&s, a.ino).nlink, 3);
    assert_eq!(get(&s, b.ino).nlink, 2);
    rename(&s, a.ino, "c", b.ino, "c2", RenameMode::Replace).expect("rename");
    assert_eq!(get(&s, a.ino).nlink, 2);
    assert_eq!(get(&s, b.ino).nlink, 3);
    assert_eq!(get(&s, c.ino).parent, b.ino);
    assert_eq!(get(&s, c.ino).nlink, 2);
    assert_eq!(lookup(&s, b.ino, "c2").ino, c.ino);
    assert!(missing(&s, a.ino, "c"));
    // The contents came along.
    assert_eq!(names(&s, c.ino), ["file"]);
    assert_eq!(get(&s, ROOT_INO).nlink, 4);

    // A file across directories leaves both directories' nlink alone.
    let f = create(&s, a.ino, "f", FileKind::File).expect("f");
    rename(&s, a.ino, "f", b.ino, "f", RenameMode::Replace).expect("rename file");
    assert_eq!(get(&s, a.ino).nlink, 2);
    assert_eq!(get(&s, b.ino).nlink, 3);
    assert_eq!(lookup(&s, b.ino, "f").ino, f.ino);
    // And moving a directory up to the root.
    rename(&s, b.ino, "c2", ROOT_INO, "top", RenameMode::Replace).expect("rename up");
    assert_eq!(get(&s, c.ino).parent, ROOT_INO);
    assert_eq!(get(&s, ROOT_INO).nlink, 5);
    assert_eq!(get(&s, b.ino).nlink, 2);
    check_invariants(&s);
}

#[test]
fn rename_replaces_file_and_orphans_old_target() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let src = create(&s, ROOT_INO, "src", FileKind::File).expect("src");
    let dst = create(&s, d.ino, "dst", FileKind::File).expect("dst");
    let orphaned = rename(&s, ROOT_INO, "src", d.ino, "dst", RenameMode::Replace).expect("mv");
    assert_eq!(orphaned, Some(dst.ino));
    assert_eq!(lookup(&s, d.ino, "dst").ino, src.ino);
    assert!(missing(&s, ROOT_INO, "src"));
    assert_eq!(get(&s, dst.ino).nlink, 0);
    assert_eq!(get(&s, src.ino).nlink, 1);
    assert_eq!(orphans(&s), BTreeSet::from([dst.ino]));
    assert_eq!(names(&s, d.ino), ["dst"]);
    check_invariants(&s);

    // A target that has another link is not orphaned, only loses one link.
    let x = create(&s, ROOT_INO, "x", FileKind::File).expect("x");
    let y = create(&s, ROOT_INO, "y", FileKind::File).expect("y");
    link(&s, y.ino, d.ino, "y2").expect("link");
    let orphaned = rename(&s, ROOT_INO, "x", ROOT_INO, "y", RenameMode::Replace).expect("mv");
    assert_eq!(orphaned, None);
    assert_eq!(get(&s, y.ino).nlink, 1);
    assert_eq!(lookup(&s, ROOT_INO, "y").ino, x.ino);
    check_invariants(&s);
}

#[test]
fn rename_replace_empty_dir() {
    let (_d, s) = store();
    let a = create(&s, ROOT_INO, "a", FileKind::Dir).expect("a");
    let b = create(&s, ROOT_INO, "b", FileKind::Dir).expect("b");
    let src = create(&s, a.ino, "src", FileKind::Dir).expect("src");
    let dst = create(&s, b.ino, "dst", FileKind::Dir).expect("dst");
    let orphaned = rename(&s, a.ino, "src", b.ino, "dst", RenameMode::Replace).expect("mv");
    assert_eq!(orphaned, Some(dst.ino));
    assert_eq!(get(&s, dst.ino).nlink, 0);
    assert_eq!(get(&s, a.ino).nlink, 2);
    assert_eq!(get(&s, b.ino).nlink, 3);
    assert_eq!(get(&s, src.ino).parent, b.ino);
    assert_eq!(lookup(&s, b.ino, "dst").ino, src.ino);
    check_invariants(&s);
    // Same thing within one directory.
    let p = create(&s, ROOT_INO, "p", FileKind::Dir).expect("p");
    let q = create(&s, ROOT_INO, "q", FileKind::Dir).expect("q");
    let root_nlink = get(&s, ROOT_INO).nlink;
    let orphaned = rename(&s, ROOT_INO, "p", ROOT_INO, "q", RenameMode::Replace).expect("mv");
    assert_eq!(orphaned, Some(q.ino));
    assert_eq!(get(&s, ROOT_INO).nlink, root_nlink - 1);
    assert_eq!(lookup(&s, ROOT_INO, "q").ino, p.ino);
    check_invariants(&s);
}

#[test]
fn rename_type_and_emptiness_errors() {
    let (_d, s) = store();
    let a = create(&s, ROOT_INO, "a", FileKind::Dir).expect("a");
    let full = create(&s, ROOT_INO, "full", FileKind::Dir).expect("full");
    create(&s, full.ino, "x", FileKind::File).expect("x");
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    let snapshot = |s: &MetaStore| {
        (
            get(s, ROOT_INO),
            get(s, a.ino),
            get(s, full.ino),
            get(s, f.ino),
            names(s, ROOT_INO),
        )
    };
    let before = snapshot(&s);
    assert_err!(
        rename(&s, ROOT_INO, "a", ROOT_INO, "full", RenameMode::Replace),
        MetaError::NotEmpty
    );
    assert_err!(
        rename(&s, ROOT_INO, "f", ROOT_INO, "a", RenameMode::Replace),
        MetaError::IsDir
    );
    assert_err!(
        rename(&s, ROOT_INO, "a", ROOT_INO, "f", RenameMode::Replace),
        MetaError::NotDir
    );
    assert_err!(
        rename(&s, ROOT_INO, "f", ROOT_INO, "a", RenameMode::NoReplace),
        MetaError::Exists
    );
    assert_err!(
        rename(&s, ROOT_INO, "a", ROOT_INO, "full", RenameMode::NoReplace),
        MetaError::Exists
    );
    assert_err!(
        rename(&s, ROOT_INO, "nope", ROOT_INO, "z", RenameMode::Replace),
        MetaError::NotFound
    );
    assert_err!(
        rename(&s, ROOT_INO, "f", ROOT_INO, "nope", RenameMode::Exchange),
        MetaError::NotFound
    );
    assert_err!(
        rename(&s, ROOT_INO, "f", f.ino, "z", RenameMode::Replace),
        MetaError::NotDir
    );
    assert_err!(
        rename(&s, ROOT_INO, "f", ROOT_INO, "a/b", RenameMode::Replace),
        MetaError::Invalid(_)
    );
    assert_err!(
        rename(&s, ROOT_INO, "f", ROOT_INO, "", RenameMode::Replace),
        MetaError::Invalid(_)
    );
    assert_err!(
        rename(
            &s,
            ROOT_INO,
            "f",
            ROOT_INO,
            &"n".repeat(NAME_MAX + 1),
            RenameMode::Replace
        ),
        MetaError::NameTooLong
    );
    assert_err!(
        rename(&s, ROOT_INO, ".", ROOT_INO, "z", RenameMode::Replace),
        MetaError::Invalid(_)
    );
    assert_err!(
        rename(&s, ROOT_INO, "f", ROOT_INO, "..", RenameMode::Replace),
        MetaError::Invalid(_)
    );
    assert_eq!(snapshot(&s), before, "a failed rename changed something");
    assert!(orphans(&s).is_empty());

    // NoReplace to a free name works like a plain rename.
    rename(&s, ROOT_INO, "f", a.ino, "g", RenameMode::NoReplace).expect("noreplace");
    assert_eq!(lookup(&s, a.ino, "g").ino, f.ino);
    check_invariants(&s);
}

#[test]
fn rename_dir_into_own_subtree_is_invalid() {
    let (_d, s) = store();
    let a = create(&s, ROOT_INO, "a", FileKind::Dir).expect("a");
    let b = create(&s, a.ino, "b", FileKind::Dir).expect("b");
    let c = create(&s, b.ino, "c", FileKind::Dir).expect("c");
    for mode in [
        RenameMode::Replace,
        RenameMode::NoReplace,
        RenameMode::Exchange,
    ] {
        assert_err!(
            rename(&s, ROOT_INO, "a", a.ino, "x", mode),
            MetaError::Invalid(_) | MetaError::NotFound
        );
        assert_err!(
            rename(&s, ROOT_INO, "a", c.ino, "x", mode),
            MetaError::Invalid(_) | MetaError::NotFound
        );
    }
    // Exchange with an existing entry deep inside: invalid whichever side is the ancestor.
    create(&s, c.ino, "leaf", FileKind::File).expect("leaf");
    assert_err!(
        rename(&s, ROOT_INO, "a", c.ino, "leaf", RenameMode::Exchange),
        MetaError::Invalid(_)
    );
    assert_err!(
        rename(&s, c.ino, "leaf", ROOT_INO, "a", RenameMode::Exchange),
        MetaError::Invalid(_)
    );
    assert_err!(
        rename(&s, ROOT_INO, "a", c.ino, "leaf", RenameMode::Replace),
        MetaError::Invalid(_)
    );
    // Moving a directory over its own ancestor: the ancestor is not empty.
    assert_err!(
        rename(&s, b.ino, "c", ROOT_INO, "a", RenameMode::Replace),
        MetaError::NotEmpty
    );
    assert_eq!(get(&s, a.ino).parent, ROOT_INO);
    assert_eq!(get(&s, b.ino).parent, a.ino);
    assert_eq!(get(&s, c.ino).parent, b.ino);
    // Moving a subdirectory up and out is fine.
    rename(&s, b.ino, "c", ROOT_INO, "c", RenameMode::Replace).expect("move up");
    assert_eq!(get(&s, c.ino).parent, ROOT_INO);
    check_invariants(&s);
}

#[test]
fn rename_onto_hard_link_of_same_inode_is_noop() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let f = create(&s, ROOT_INO, "a", FileKind::File).expect("a");
    link(&s, f.ino, ROOT_INO, "b").expect("link b");
    link(&s, f.ino, d.ino, "c").expect("link c");
    let before = (get(&s, f.ino), list(&s, ROOT_INO, 10), list(&s, d.ino, 10));
    assert_eq!(
        rename(&s, ROOT_INO, "a", ROOT_INO, "b", RenameMode::Replace).expect("rename"),
        None
    );
    assert_eq!(
        rename(&s, ROOT_INO, "a", d.ino, "c", RenameMode::Replace).expect("rename"),
        None
    );
    let after = (get(&s, f.ino), list(&s, ROOT_INO, 10), list(&s, d.ino, 10));
    assert_eq!(after, before);
    assert_eq!(after.0.nlink, 3);
    assert!(orphans(&s).is_empty());
    check_invariants(&s);
}

#[test]
fn rename_exchange_file_and_dir_across_dirs() {
    let (_d, s) = store();
    let p = create(&s, ROOT_INO, "p", FileKind::Dir).expect("p");
    let q = create(&s, ROOT_INO, "q", FileKind::Dir).expect("q");
    let f = create(&s, p.ino, "f", FileKind::File).expect("f");
    let d = create(&s, q.ino, "d", FileKind::Dir).expect("d");
    create(&s, d.ino, "inside", FileKind::File).expect("inside");
    assert_eq!(get(&s, p.ino).nlink, 2);
    assert_eq!(get(&s, q.ino).nlink, 3);
    let cookie_p = list(&s, p.ino, 10)[0].cookie;
    let cookie_q = list(&s, q.ino, 10)[0].cookie;

    let t = ts(8_888);
    let r = s
        .execute(&Op::Rename {
            parent: p.ino,
            name: b"f".to_vec(),
            new_parent: q.ino,
            new_name: b"d".to_vec(),
            mode: RenameMode::Exchange,
            now: t,
        })
        .expect("exchange");
    assert_eq!(r, Outcome::Removed { orphaned: None });
    // p/f now names the directory, q/d the file.
    assert_eq!(lookup(&s, p.ino, "f").ino, d.ino);
    assert_eq!(lookup(&s, q.ino, "d").ino, f.ino);
    assert_eq!(get(&s, p.ino).nlink, 3, "p gained a subdirectory");
    assert_eq!(get(&s, q.ino).nlink, 2, "q lost its subdirectory");
    assert_eq!(get(&s, d.ino).parent, p.ino);
    assert_eq!(get(&s, d.ino).nlink, 2);
    assert_eq!(get(&s, f.ino).nlink, 1);
    assert_eq!(get(&s, f.ino).ctime, t);
    assert_eq!(get(&s, d.ino).ctime, t);
    for dir in [p.ino, q.ino] {
        let i = get(&s, dir);
        assert_eq!((i.mtime, i.ctime), (t, t));
    }
    // Each entry keeps its place in its directory's listing; the kind follows the inode.
    let lp = list(&s, p.ino, 10);
    assert_eq!(lp.len(), 1);
    assert_eq!(
        (lp[0].cookie, lp[0].ino, lp[0].kind),
        (cookie_p, d.ino, FileKind::Dir)
    );
    let lq = list(&s, q.ino, 10);
    assert_eq!(
        (lq[0].cookie, lq[0].ino, lq[0].kind),
        (cookie_q, f.ino, FileKind::File)
    );
    assert_eq!(names(&s, d.ino), ["inside"]);
    assert!(orphans(&s).is_empty());
    check_invariants(&s);

    // And back again, with the roles of source and destination reversed.
    rename(&s, p.ino, "f", q.ino, "d", RenameMode::Exchange).expect("exchange back");
    assert_eq!(get(&s, p.ino).nlink, 2);
    assert_eq!(get(&s, q.ino).nlink, 3);
    assert_eq!(get(&s, d.ino).parent, q.ino);
    assert_eq!(lookup(&s, p.ino, "f").ino, f.ino);
    check_invariants(&s);
}

#[test]
fn rename_exchange_dirs_and_same_dir() {
    let (_d, s) = store();
    let p = create(&s, ROOT_INO, "p", FileKind::Dir).expect("p");
    let q = create(&s, ROOT_INO, "q", FileKind::Dir).expect("q");
    let x = create(&s, p.ino, "x", FileKind::Dir).expect("x");
    let y = create(&s, q.ino, "y", FileKind::Dir).expect("y");
    rename(&s, p.ino, "x", q.ino, "y", RenameMode::Exchange).expect("exchange dirs");
    assert_eq!(get(&s, x.ino).parent, q.ino);
    assert_eq!(get(&s, y.ino).parent, p.ino);
    assert_eq!(get(&s, p.ino).nlink, 3);
    assert_eq!(get(&s, q.ino).nlink, 3);
    assert_eq!(lookup(&s, q.ino, "y").ino, x.ino);
    assert_eq!(lookup(&s, p.ino, "x").ino, y.ino);
    check_invariants(&s);
    // Within one directory: dir and file swap names, nothing else changes.
    let f = create(&s, p.ino, "f", FileKind::File).expect("f");
    rename(&s, p.ino, "f", p.ino, "x", RenameMode::Exchange).expect("exchange in dir");
    assert_eq!(lookup(&s, p.ino, "f").ino, y.ino);
    assert_eq!(lookup(&s, p.ino, "x").ino, f.ino);
    assert_eq!(get(&s, p.ino).nlink, 3);
    assert_eq!(get(&s, y.ino).parent, p.ino);
    check_invariants(&s);
}

#[test]
fn rename_exchange_with_itself_and_with_hard_link() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    link(&s, f.ino, d.ino, "f2").expect("link");
    let before = (
        list(&s, ROOT_INO, 10),
        list(&s, d.ino, 10),
        get(&s, f.ino).nlink,
    );
    rename(&s, ROOT_INO, "d", ROOT_INO, "d", RenameMode::Exchange).expect("self exchange");
    rename(&s, ROOT_INO, "f", d.ino, "f2", RenameMode::Exchange).expect("link exchange");
    let after = (
        list(&s, ROOT_INO, 10),
        list(&s, d.ino, 10),
        get(&s, f.ino).nlink,
    );
    assert_eq!(after, before);
    assert_eq!(get(&s, d.ino).parent, ROOT_INO);
    assert_eq!(get(&s, ROOT_INO).nlink, 3);
    check_invariants(&s);
}

#[test]
fn rename_into_removed_dir_fails() {
    let (_d, s) = store();
    let gone = create(&s, ROOT_INO, "gone", FileKind::Dir).expect("gone");
    create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    rmdir(&s, ROOT_INO, "gone").expect("rmdir");
    assert_err!(
        rename(&s, ROOT_INO, "f", gone.ino, "f", RenameMode::Replace),
        MetaError::NotFound
    );
    check_invariants(&s);
}

// ---------------------------------------------------------------------------------------------
// Readdir
// ---------------------------------------------------------------------------------------------

#[test]
fn readdir_cookies_increase_and_paging_resumes() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let mut expected = Vec::new();
    for i in 0..25 {
        let name = format!("e{i:02}");
        let kind = if i % 5 == 0 {
            FileKind::Dir
        } else {
            FileKind::File
        };
        let inode = create(&s, d.ino, &name, kind).expect("create");
        expected.push((name, inode.ino, kind));
    }
    let all = s.readdir(d.ino, 0, usize::MAX, false).expect("readdir");
    assert_eq!(all.len(), 25);
    assert!(
        all[0].0.cookie >= FIRST_COOKIE,
        "cookies 1 and 2 are . and .."
    );
    for w in all.windows(2) {
        assert!(w[0].0.cookie < w[1].0.cookie, "cookies must increase");
    }
    // Creation order, with the right inode and kind.
    for ((e, i), (name, ino, kind)) in all.iter().zip(&expected) {
        assert!(i.is_none());
        assert_eq!(e.name, name.as_bytes());
        assert_eq!((e.ino, e.kind), (*ino, *kind));
    }
    // Resuming after any cookie gives exactly the rest.
    for k in 0..all.len() {
        let rest = s
            .readdir(d.ino, all[k].0.cookie, usize::MAX, false)
            .expect("readdir");
        assert_eq!(rest, all[k + 1..].to_vec());
    }
    // Paging with every page size gives the same listing.
    let full: Vec<DirEntry> = all.iter().map(|(e, _)| e.clone()).collect();
    for page in [1, 2, 3, 7, 24, 25, 26] {
        assert_eq!(list(&s, d.ino, page), full, "page size {page}");
    }
    // Limit zero returns nothing; after the last cookie returns nothing.
    assert!(s.readdir(d.ino, 0, 0, false).expect("readdir").is_empty());
    let last = full.last().expect("last").cookie;
    assert!(
        s.readdir(d.ino, last, 10, false)
            .expect("readdir")
            .is_empty()
    );
    assert!(
        s.readdir(d.ino, u64::MAX, 10, false)
            .expect("readdir")
            .is_empty()
    );
    // Offsets 1 and 2 (. and ..) resume at the first real entry.
    assert_eq!(
        s.readdir(d.ino, 2, 1, false).expect("readdir")[0].0,
        full[0]
    );
    // Entries of other directories never leak in.
    assert_eq!(names(&s, ROOT_INO), ["d"]);
}

#[test]
fn readdir_stable_while_directory_changes() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let other = create(&s, ROOT_INO, "other", FileKind::Dir).expect("other");
    for i in 0..20 {
        create(&s, d.ino, &format!("f{i:02}"), FileKind::File).expect("create");
    }
    let mut seen: Vec<String> = Vec::new();
    let mut after = 0;
    let mut round = 0;
    let mut removed_unseen = BTreeSet::new();
    let mut touched = BTreeSet::new();
    loop {
        let batch = s.readdir(d.ino, after, 3, false).expect("readdir");
        if batch.is_empty() {
            break;
        }
        for (e, _) in &batch {
            assert!(e.cookie > after, "cookie went backwards");
            after = e.cookie;
            seen.push(String::from_utf8(e.name.clone()).expect("utf8"));
        }
        // Between the first pages, churn the directory.
        if round == 8 {
            continue;
        }
        round += 1;
        let seen_set: BTreeSet<&String> = seen.iter().collect();
        let current = sorted_names(&s, d.ino);
        let unseen: Vec<&String> = current
            .iter()
            .filter(|n| n.starts_with('f') && !seen_set.contains(n) && !touched.contains(*n))
            .collect();
        // Remove one already listed entry and one not yet listed.
        if let Some(n) = seen
            .iter()
            .find(|n| current.contains(n) && n.starts_with('f'))
        {
            touched.insert(n.clone());
            unlink(&s, d.ino, n).expect("unlink seen");
        }
        if let Some(n) = unseen.last() {
            let n = (*n).clone();
            touched.insert(n.clone());
            removed_unseen.insert(n.clone());
            unlink(&s, d.ino, &n).expect("unlink unseen");
        }
        // Add new ones, and move one in from another directory.
        create(&s, d.ino, &format!("new{round}"), FileKind::File).expect("create new");
        create(&s, other.ino, &format!("mv{round}"), FileKind::File).expect("create mv");
        rename(
            &s,
            other.ino,
            &format!("mv{round}"),
            d.ino,
            &format!("mv{round}"),
            RenameMode::Replace,
        )
        .expect("rename in");
        assert!(seen.len() < 1000, "listing never ends: {seen:?}");
    }
    // No name twice.
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an entry was repeated: {seen:?}");
    // Every original entry was listed unless it was removed before the listing reached it.
    for i in 0..20 {
        let n = format!("f{i:02}");
        if !removed_unseen.contains(&n) {
            assert!(seen.contains(&n), "{n} was skipped");
        }
    }
    // Everything added during the listing has a larger cookie, so it was listed too.
    for r in 1..=round {
        assert!(seen.contains(&format!("new{r}")), "new{r} missing");
        assert!(seen.contains(&format!("mv{r}")), "mv{r} missing");
    }
    // Entries removed before being reached were not listed.
    for n in &removed_unseen {
        assert!(!seen.contains(n), "{n} listed after removal");
    }
    assert!(
        !removed_unseen.is_empty(),
        "the test removed nothing unseen"
    );
    check_invariants(&s);
}

#[test]
fn readdir_with_inodes() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let l = symlink(&s, ROOT_INO, "l", b"target").expect("l");
    link(&s, f.ino, ROOT_INO, "f2").expect("link");
    let entries = s.readdir(ROOT_INO, 0, 10, true).expect("readdirplus");
    assert_eq!(entries.len(), 4);
    let expect = [
        ("f", f.ino, FileKind::File),
        ("d", d.ino, FileKind::Dir),
        ("l", l.ino, FileKind::Symlink),
        ("f2", f.ino, FileKind::File),
    ];
    for ((e, i), (name, ino, kind)) in entries.iter().zip(expect) {
        assert_eq!(e.name, name.as_bytes());
        assert_eq!((e.ino, e.kind), (ino, kind));
        let i = i.as_ref().expect("inode present");
        assert_eq!(*i, get(&s, ino));
    }
    assert_eq!(entries[0].1.as_ref().expect("inode").nlink, 2);
    assert_eq!(entries[2].1.as_ref().expect("inode").target, b"target");
    // The plain listing carries no inodes.
    assert!(
        s.readdir(ROOT_INO, 0, 10, false)
            .expect("readdir")
            .iter()
            .all(|(_, i)| i.is_none())
    );
}

#[test]
fn readdir_renamed_entry_moves_to_end() {
    let (_d, s) = store();
    for n in ["a", "b", "c"] {
        create(&s, ROOT_INO, n, FileKind::File).expect("create");
    }
    let before = list(&s, ROOT_INO, 10);
    rename(&s, ROOT_INO, "a", ROOT_INO, "z", RenameMode::Replace).expect("rename");
    let after = list(&s, ROOT_INO, 10);
    assert_eq!(names(&s, ROOT_INO), ["b", "c", "z"]);
    assert!(
        after[2].cookie > before[2].cookie,
        "new name gets a new cookie"
    );
    assert_eq!(after[0], before[1]);
    assert_eq!(after[1], before[2]);
    // Cookies are never reused, even after removals.
    unlink(&s, ROOT_INO, "z").expect("unlink");
    let n = create(&s, ROOT_INO, "n", FileKind::File).expect("n");
    let last = list(&s, ROOT_INO, 10).pop().expect("entry");
    assert_eq!(last.ino, n.ino);
    assert!(last.cookie > after[2].cookie);
}

// ---------------------------------------------------------------------------------------------
// Xattrs
// ---------------------------------------------------------------------------------------------

#[test]
fn xattr_modes_and_errors() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    let g = create(&s, ROOT_INO, "g", FileKind::File).expect("g");
    assert_err!(s.xattr(f.ino, b"user.x"), MetaError::NoXattr);
    assert_err!(s.xattr(777_777, b"user.x"), MetaError::NotFound);
    assert!(s.xattr_names(f.ino).expect("names").is_empty());

    // Replace needs an existing attribute.
    assert_err!(
        setxattr(&s, f.ino, b"user.x", b"1", XattrMode::Replace),
        MetaError::NoXattr
    );
    let t = ts(123_456);
    let after = inode_of(
        s.execute(&Op::SetXattr {
            ino: f.ino,
            name: b"user.x".to_vec(),
            value: b"one".to_vec(),
            mode: XattrMode::Create,
            caller: Caller::default(),
            now: t,
        })
        .expect("create xattr"),
    );
    assert_eq!(after.ctime, t);
    assert_eq!(s.xattr(f.ino, b"user.x").expect("get"), b"one");
    // Create fails if it exists, and leaves the value alone.
    assert_err!(
        setxattr(&s, f.ino, b"user.x", b"two", XattrMode::Create),
        MetaError::Exists
    );
    assert_eq!(s.xattr(f.ino, b"user.x").expect("get"), b"one");
    setxattr(&s, f.ino, b"user.x", b"two", XattrMode::Replace).expect("replace");
    assert_eq!(s.xattr(f.ino, b"user.x").expect("get"), b"two");
    setxattr(&s, f.ino, b"user.x", b"three", XattrMode::Upsert).expect("upsert");
    assert_eq!(s.xattr(f.ino, b"user.x").expect("get"), b"three");
    setxattr(&s, f.ino, b"user.y", b"", XattrMode::Upsert).expect("empty value");
    assert_eq!(s.xattr(f.ino, b"user.y").expect("get"), b"");

    // Size limit.
    let big = vec![7u8; XATTR_SIZE_MAX];
    setxattr(&s, f.ino, b"user.big", &big, XattrMode::Upsert).expect("max size");
    assert_eq!(s.xattr(f.ino, b"user.big").expect("get"), big);
    let too_big = vec![7u8; XATTR_SIZE_MAX + 1];
    assert_err!(
        setxattr(&s, f.ino, b"user.huge", &too_big, XattrMode::Upsert),
        MetaError::XattrRange
    );
    assert_err!(s.xattr(f.ino, b"user.huge"), MetaError::NoXattr);
    assert_err!(
        setxattr(&s, f.ino, b"", b"v", XattrMode::Upsert),
        MetaError::Invalid(_)
    );
    assert_err!(
        setxattr(&s, 777_777, b"user.x", b"v", XattrMode::Upsert),
        MetaError::NotFound
    );

    // Names are per inode, sorted.
    setxattr(&s, g.ino, b"user.g", b"g", XattrMode::Upsert).expect("g xattr");
    assert_eq!(
        s.xattr_names(f.ino).expect("names"),
        [b"user.big".to_vec(), b"user.x".to_vec(), b"user.y".to_vec()]
    );
    assert_eq!(s.xattr_names(g.ino).expect("names"), [b"user.g".to_vec()]);
    assert_err!(s.xattr(g.ino, b"user.x"), MetaError::NoXattr);

    // Removal.
    let t2 = ts(654_321);
    let after = inode_of(
        s.execute(&Op::RemoveXattr {
            ino: f.ino,
            name: b"user.x".to_vec(),
            now: t2,
        })
        .expect("remove"),
    );
    assert_eq!(after.ctime, t2);
    assert_err!(s.xattr(f.ino, b"user.x"), MetaError::NoXattr);
    assert_err!(removexattr(&s, f.ino, b"user.x"), MetaError::NoXattr);
    assert_err!(removexattr(&s, f.ino, b"user.never"), MetaError::NoXattr);
    assert_eq!(
        s.xattr_names(f.ino).expect("names"),
        [b"user.big".to_vec(), b"user.y".to_vec()]
    );
    assert_eq!(s.xattr_names(g.ino).expect("names"), [b"user.g".to_vec()]);
    // Xattrs on a directory and a symlink.
    setxattr(&s, ROOT_INO, b"trusted.t", b"r", XattrMode::Create).expect("dir xattr");
    assert_eq!(s.xattr(ROOT_INO, b"trusted.t").expect("get"), b"r");
}

// ---------------------------------------------------------------------------------------------
// POSIX ACLs
// ---------------------------------------------------------------------------------------------

fn full_acl() -> Vec<u8> {
    acl_bytes(&[
        (USER_OBJ, 6, NO_ID),
        (USER, 7, 1000),
        (GROUP_OBJ, 4, NO_ID),
        (GROUP, 2, 2000),
        (MASK, 5, NO_ID),
        (OTHER, 0, NO_ID),
    ])
}

#[test]
fn access_acl_sets_perm_and_is_stored() {
    let (_d, s) = store();
    let f = mk(
        &s,
        ROOT_INO,
        "f",
        FileKind::File,
        0o4644,
        0,
        &Caller::default(),
    )
    .expect("f");
    assert_eq!(f.perm, 0o4644);
    let acl = full_acl();
    let after = setxattr(&s, f.ino, acl::ACCESS_XATTR, &acl, XattrMode::Upsert).expect("acl");
    // Owner from USER_OBJ, group from MASK, other from OTHER; set-uid kept.
    assert_eq!(after.perm, 0o4650);
    assert_eq!(get(&s, f.ino).perm, 0o4650);
    assert_eq!(s.xattr(f.ino, acl::ACCESS_XATTR).expect("stored"), acl);
    assert_eq!(
        s.xattr_names(f.ino).expect("names"),
        [acl::ACCESS_XATTR.to_vec()]
    );

    // A minimal ACL only sets the mode, and removes the stored one.
    let minimal = acl_bytes(&[
        (USER_OBJ, 7, NO_ID),
        (GROUP_OBJ, 5, NO_ID),
        (OTHER, 1, NO_ID),
    ]);
    let after =
        setxattr(&s, f.ino, acl::ACCESS_XATTR, &minimal, XattrMode::Upsert).expect("minimal");
    assert_eq!(after.perm, 0o4751);
    assert_err!(s.xattr(f.ino, acl::ACCESS_XATTR), MetaError::NoXattr);
    assert!(s.xattr_names(f.ino).expect("names").is_empty());

    // Minimal on a file that never had one: not stored either.
    let g = create(&s, ROOT_INO, "g", FileKind::File).expect("g");
    let minimal2 = acl_bytes(&[
        (USER_OBJ, 4, NO_ID),
        (GROUP_OBJ, 0, NO_ID),
        (OTHER, 0, NO_ID),
    ]);
    let after =
        setxattr(&s, g.ino, acl::ACCESS_XATTR, &minimal2, XattrMode::Upsert).expect("minimal");
    assert_eq!(after.perm, 0o400);
    assert_err!(s.xattr(g.ino, acl::ACCESS_XATTR), MetaError::NoXattr);

    // With a mask but no named entries the ACL is still not minimal, and the mask gives the
    // group bits.
    let h = create(&s, ROOT_INO, "h", FileKind::File).expect("h");
    let with_mask_only = acl_bytes(&[
        (USER_OBJ, 7, NO_ID),
        (GROUP_OBJ, 7, NO_ID),
        (MASK, 1, NO_ID),
        (OTHER, 0, NO_ID),
    ]);
    let after = setxattr(
        &s,
        h.ino,
        acl::ACCESS_XATTR,
        &with_mask_only,
        XattrMode::Upsert,
    )
    .expect("mask only");
    assert_eq!(after.perm, 0o710);
    check_invariants(&s);
}

#[test]
fn access_acl_clears_setgid_for_non_members() {
    let (_d, s) = store();
    let owner = caller(1000, 1000, &[]);
    let f = mk(&s, ROOT_INO, "f", FileKind::File, 0o2775, 0, &owner).expect("f");
    assert_eq!((f.gid, f.perm), (1000, 0o2775));
    let minimal = acl_bytes(&[
        (USER_OBJ, 7, NO_ID),
        (GROUP_OBJ, 7, NO_ID),
        (OTHER, 5, NO_ID),
    ]);
    // The owning group's member keeps S_ISGID.
    let kept = inode_of(
        s.execute(&Op::SetXattr {
            ino: f.ino,
            name: acl::ACCESS_XATTR.to_vec(),
            value: minimal.clone(),
            mode: XattrMode::Upsert,
            caller: owner.clone(),
            now: Timestamp::now(),
        })
        .expect("setfacl"),
    );
    assert_eq!(kept.perm, 0o2775);
    // Someone not in the group (the owner after chgrp, say) loses it.
    let outsider = caller(1000, 3000, &[]);
    let cleared = inode_of(
        s.execute(&Op::SetXattr {
            ino: f.ino,
            name: acl::ACCESS_XATTR.to_vec(),
            value: minimal,
            mode: XattrMode::Upsert,
            caller: outsider,
            now: Timestamp::now(),
        })
        .expect("setfacl"),
    );
    assert_eq!(cleared.perm, 0o775);
}

#[test]
fn malformed_acls_are_rejected() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let bad = [
        Vec::new(),
        vec![2, 0, 0, 0, 1],
        // Wrong version.
        {
            let mut v = full_acl();
            v[0] = 1;
            v
        },
        // Named user without a mask.
        acl_bytes(&[
            (USER_OBJ, 7, NO_ID),
            (USER, 7, 5),
            (GROUP_OBJ, 5, NO_ID),
            (OTHER, 0, NO_ID),
        ]),
        // Missing OTHER.
        acl_bytes(&[(USER_OBJ, 7, NO_ID), (GROUP_OBJ, 5, NO_ID)]),
        // Two USER_OBJ.
        acl_bytes(&[
            (USER_OBJ, 7, NO_ID),
            (USER_OBJ, 7, NO_ID),
            (GROUP_OBJ, 5, NO_ID),
            (OTHER, 0, NO_ID),
        ]),
        // Unknown tag.
        acl_bytes(&[
            (USER_OBJ, 7, NO_ID),
            (GROUP_OBJ, 5, NO_ID),
            (0x40, 1, NO_ID),
            (OTHER, 0, NO_ID),
        ]),
        // Permission bits beyond rwx.
        acl_bytes(&[
            (USER_OBJ, 8, NO_ID),
            (GROUP_OBJ, 5, NO_ID),
            (OTHER, 0, NO_ID),
        ]),
    ];
    for b in &bad {
        assert_err!(
            setxattr(&s, f.ino, acl::ACCESS_XATTR, b, XattrMode::Upsert),
            MetaError::Invalid(_)
        );
        assert_err!(
            setxattr(&s, d.ino, acl::DEFAULT_XATTR, b, XattrMode::Upsert),
            MetaError::Invalid(_)
        );
    }
    assert_eq!(get(&s, f.ino).perm, f.perm);
    assert!(s.xattr_names(f.ino).expect("names").is_empty());
    assert!(s.xattr_names(d.ino).expect("names").is_empty());
    // A default ACL only makes sense on a directory.
    assert_err!(
        setxattr(
            &s,
            f.ino,
            acl::DEFAULT_XATTR,
            &full_acl(),
            XattrMode::Upsert
        ),
        MetaError::NotPermitted
    );
    assert!(s.xattr_names(f.ino).expect("names").is_empty());
}

#[test]
fn chmod_rewrites_acl_mask() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    setxattr(&s, f.ino, acl::ACCESS_XATTR, &full_acl(), XattrMode::Upsert).expect("acl");
    let after = chmod(&s, f.ino, 0o2751);
    assert_eq!(after.perm, 0o2751);
    let e = acl_entries(&s.xattr(f.ino, acl::ACCESS_XATTR).expect("acl"));
    assert_eq!(e.len(), 6, "chmod keeps every entry");
    assert_eq!(perm_of(&e, USER_OBJ), 7);
    assert_eq!(perm_of(&e, MASK), 5);
    assert_eq!(perm_of(&e, OTHER), 1);
    // The group-owner and named entries are not mode bits and stay.
    assert_eq!(perm_of(&e, GROUP_OBJ), 4);
    assert_eq!(perm_of(&e, USER), 7);
    assert_eq!(perm_of(&e, GROUP), 2);
    assert!(e.contains(&(USER, 7, 1000)));
    assert!(e.contains(&(GROUP, 2, 2000)));

    // chmod 000 empties the mask but keeps the ACL.
    chmod(&s, f.ino, 0);
    let e = acl_entries(&s.xattr(f.ino, acl::ACCESS_XATTR).expect("acl"));
    assert_eq!(perm_of(&e, USER_OBJ), 0);
    assert_eq!(perm_of(&e, MASK), 0);
    assert_eq!(perm_of(&e, OTHER), 0);
    assert_eq!(perm_of(&e, GROUP_OBJ), 4);

    // chmod of a file without an ACL stores none.
    let g = create(&s, ROOT_INO, "g", FileKind::File).expect("g");
    assert_eq!(chmod(&s, g.ino, 0o600).perm, 0o600);
    assert_err!(s.xattr(g.ino, acl::ACCESS_XATTR), MetaError::NoXattr);
}

#[test]
fn default_acl_inherited_by_files_and_subdirs() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let def = acl_bytes(&[
        (USER_OBJ, 7, NO_ID),
        (USER, 7, 1000),
        (GROUP_OBJ, 5, NO_ID),
        (MASK, 7, NO_ID),
        (OTHER, 5, NO_ID),
    ]);
    let after = setxattr(&s, d.ino, acl::DEFAULT_XATTR, &def, XattrMode::Create).expect("def");
    assert_eq!(after.perm, d.perm, "a default ACL does not change the mode");
    assert_eq!(s.xattr(d.ino, acl::DEFAULT_XATTR).expect("stored"), def);

    let root = Caller::default();
    // A file: the umask is ignored, the mode is limited by the requested mode.
    let f = mk(&s, d.ino, "f", FileKind::File, 0o666, 0o077, &root).expect("f");
    assert_eq!(f.perm, 0o664, "mode = requested & default ACL, no umask");
    let e = acl_entries(&s.xattr(f.ino, acl::ACCESS_XATTR).expect("access acl"));
    assert_eq!(
        e,
        vec![
            (USER_OBJ, 6, NO_ID),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, NO_ID),
            (MASK, 6, NO_ID),
            (OTHER, 4, NO_ID),
        ]
    );
    assert_err!(s.xattr(f.ino, acl::DEFAULT_XATTR), MetaError::NoXattr);

    let g = mk(&s, d.ino, "g", FileKind::File, 0o640, 0o022, &root).expect("g");
    assert_eq!(g.perm, 0o640);
    let e = acl_entries(&s.xattr(g.ino, acl::ACCESS_XATTR).expect("access acl"));
    assert_eq!(perm_of(&e, USER_OBJ), 6);
    assert_eq!(perm_of(&e, MASK), 4);
    assert_eq!(perm_of(&e, OTHER), 0);

    // A subdirectory gets both the access ACL and the default ACL.
    let sub = mk(&s, d.ino, "sub", FileKind::Dir, 0o777, 0o077, &root).expect("sub");
    assert_eq!(sub.perm, 0o775);
    assert_eq!(s.xattr(sub.ino, acl::DEFAULT_XATTR).expect("default"), def);
    let e = acl_entries(&s.xattr(sub.ino, acl::ACCESS_XATTR).expect("access"));
    assert_eq!(
        e,
        vec![
            (USER_OBJ, 7, NO_ID),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, NO_ID),
            (MASK, 7, NO_ID),
            (OTHER, 5, NO_ID),
        ]
    );
    // ... and passes it on.
    let deep = mk(&s, sub.ino, "deep", FileKind::File, 0o600, 0o022, &root).expect("deep");
    assert_eq!(deep.perm, 0o600);
    let e = acl_entries(&s.xattr(deep.ino, acl::ACCESS_XATTR).expect("access"));
    assert_eq!(perm_of(&e, MASK), 0);

    // Special files inherit; symlinks do not.
    let fifo = mk(&s, d.ino, "fifo", FileKind::Fifo, 0o666, 0o077, &root).expect("fifo");
    assert_eq!(fifo.perm, 0o664);
    assert!(s.xattr(fifo.ino, acl::ACCESS_XATTR).is_ok());
    let l = symlink(&s, d.ino, "l", b"f").expect("symlink");
    assert_eq!(l.perm, 0o777);
    assert!(s.xattr_names(l.ino).expect("names").is_empty());

    // Removing the default ACL brings the umask back.
    removexattr(&s, d.ino, acl::DEFAULT_XATTR).expect("remove default");
    let plain = mk(&s, d.ino, "plain", FileKind::File, 0o666, 0o077, &root).expect("plain");
    assert_eq!(plain.perm, 0o600);
    assert!(s.xattr_names(plain.ino).expect("names").is_empty());
    check_invariants(&s);
}

#[test]
fn minimal_default_acl_replaces_umask_without_access_acl() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let def = acl_bytes(&[
        (USER_OBJ, 7, NO_ID),
        (GROUP_OBJ, 5, NO_ID),
        (OTHER, 0, NO_ID),
    ]);
    setxattr(&s, d.ino, acl::DEFAULT_XATTR, &def, XattrMode::Upsert).expect("def");
    // Stored even though minimal: a default ACL is not expressed by the mode.
    assert_eq!(s.xattr(d.ino, acl::DEFAULT_XATTR).expect("stored"), def);
    let root = Caller::default();
    let f = mk(&s, d.ino, "f", FileKind::File, 0o666, 0o022, &root).expect("f");
    // With the umask it would be 0o644; with the default ACL it is 0o640.
    assert_eq!(f.perm, 0o640);
    assert_err!(s.xattr(f.ino, acl::ACCESS_XATTR), MetaError::NoXattr);
    let sub = mk(&s, d.ino, "sub", FileKind::Dir, 0o777, 0o000, &root).expect("sub");
    assert_eq!(sub.perm, 0o750);
    assert_eq!(
        s.xattr_names(sub.ino).expect("names"),
        [acl::DEFAULT_XATTR.to_vec()]
    );
}

#[test]
fn default_acl_with_setgid_dir() {
    let (_d, s) = store();
    let owner = caller(10, 50, &[]);
    let d = mk(&s, ROOT_INO, "d", FileKind::Dir, 0o2777, 0, &owner).expect("d");
    let def = acl_bytes(&[
        (USER_OBJ, 7, NO_ID),
        (GROUP_OBJ, 7, NO_ID),
        (GROUP, 7, 60),
        (MASK, 7, NO_ID),
        (OTHER, 0, NO_ID),
    ]);
    setxattr(&s, d.ino, acl::DEFAULT_XATTR, &def, XattrMode::Upsert).expect("def");
    let sub = mk(
        &s,
        d.ino,
        "sub",
        FileKind::Dir,
        0o755,
        0o077,
        &caller(20, 20, &[]),
    )
    .expect("s");
    assert_eq!(sub.gid, 50);
    assert_eq!(sub.perm, S_ISGID | 0o750);
}

// ---------------------------------------------------------------------------------------------
// SetAttr, SyncData
// ---------------------------------------------------------------------------------------------

#[test]
fn setattr_fields() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    let t = ts(1_000_000);
    let after = inode_of(
        s.execute(&Op::SetAttr {
            ino: f.ino,
            attr: SetAttr {
                perm: Some(S_IFREG | 0o4711),
                uid: Some(7),
                gid: Some(8),
                size: Some(4096),
                atime: Some(ts(1)),
                mtime: Some(ts(2)),
            },
            now: t,
        })
        .expect("setattr"),
    );
    assert_eq!(after.perm, 0o4711);
    assert_eq!((after.uid, after.gid, after.size), (7, 8, 4096));
    assert_eq!((after.atime, after.mtime, after.ctime), (ts(1), ts(2), t));
    assert_eq!(get(&s, f.ino), after);
    // Nothing given: only ctime moves.
    let t2 = ts(2_000_000);
    let again = inode_of(
        s.execute(&Op::SetAttr {
            ino: f.ino,
            attr: SetAttr::default(),
            now: t2,
        })
        .expect("setattr"),
    );
    assert_eq!(
        again,
        Inode {
            ctime: t2,
            ..after.clone()
        }
    );

    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let l = symlink(&s, ROOT_INO, "l", b"xyz").expect("l");
    let truncate = |ino| {
        s.execute(&Op::SetAttr {
            ino,
            attr: SetAttr {
                size: Some(0),
                ..SetAttr::default()
            },
            now: Timestamp::now(),
        })
    };
    assert_err!(truncate(d.ino), MetaError::IsDir);
    assert_err!(truncate(l.ino), MetaError::Invalid(_));
    assert_err!(truncate(999_999), MetaError::NotFound);
    assert_eq!(get(&s, l.ino).size, 3);
}

#[test]
fn sync_data_updates_size_and_times() {
    let (_d, s) = store();
    let f = mk(
        &s,
        ROOT_INO,
        "f",
        FileKind::File,
        0o644,
        0,
        &Caller::default(),
    )
    .expect("f");
    let base = f.ctime;
    let older = Timestamp {
        secs: base.secs - 100,
        nanos: 0,
    };
    let newer = Timestamp {
        secs: base.secs + 100,
        nanos: 0,
    };
    let after = inode_of(
        s.execute(&Op::SyncData {
            ino: f.ino,
            size: 12345,
            atime: ts(10),
            mtime: ts(20),
            ctime: older,
        })
        .expect("sync data"),
    );
    assert_eq!(after.size, 12345);
    assert_eq!((after.atime, after.mtime), (ts(10), ts(20)));
    assert_eq!(after.ctime, base, "ctime never goes backwards");
    let after = inode_of(
        s.execute(&Op::SyncData {
            ino: f.ino,
            size: 1,
            atime: ts(10),
            mtime: ts(20),
            ctime: newer,
        })
        .expect("sync data"),
    );
    assert_eq!(after.ctime, newer);
    assert_eq!(get(&s, f.ino).size, 1);
    assert_eq!(s.counts().expect("counts").bytes, 1);
    assert_err!(
        s.execute(&Op::SyncData {
            ino: 424_242,
            size: 1,
            atime: ts(1),
            mtime: ts(1),
            ctime: ts(1),
        }),
        MetaError::NotFound
    );
}

// ---------------------------------------------------------------------------------------------
// Durability and format
// ---------------------------------------------------------------------------------------------

fn open_existing(path: &Path) -> MetaStore {
    let (s, created) = MetaStore::open(path, Timestamp::now(), 0, 0).expect("reopen");
    assert!(!created, "reopen must not format again");
    s
}

#[test]
fn everything_survives_sync_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.redb");
    let (s, created) = MetaStore::open(&path, ts(1), 3, 4).expect("open");
    assert!(created);
    let fs_id = s.fs_id().to_string();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let f = create(&s, d.ino, "f", FileKind::File).expect("f");
    link(&s, f.ino, ROOT_INO, "f2").expect("link");
    let l = symlink(&s, d.ino, "l", b"../f2").expect("l");
    let gone = create(&s, ROOT_INO, "gone", FileKind::File).expect("gone");
    unlink(&s, ROOT_INO, "gone").expect("unlink");
    setxattr(&s, f.ino, b"user.k", b"v", XattrMode::Create).expect("xattr");
    setxattr(&s, f.ino, acl::ACCESS_XATTR, &full_acl(), XattrMode::Upsert).expect("acl");
    rename(&s, d.ino, "l", ROOT_INO, "l2", RenameMode::Replace).expect("rename");
    // An inode number far above what alloc_ino handed out so far.
    let high = inode_of(
        s.execute(&Op::Create {
            parent: ROOT_INO,
            name: b"high".to_vec(),
            ino: 5_000,
            kind: FileKind::File,
            perm: 0o600,
            umask: 0,
            rdev: 0,
            target: Vec::new(),
            caller: Caller::default(),
            now: Timestamp::now(),
        })
        .expect("high"),
    );
    let listing_root = list(&s, ROOT_INO, 100);
    let listing_d = list(&s, d.ino, 100);
    let mut all = Vec::new();
    s.for_each_inode(|i| {
        all.push(i);
        Ok(())
    })
    .expect("inodes");
    assert!(s.has_unsynced());
    assert!(s.has_unsynced_changes());
    s.sync().expect("sync");
    assert!(!s.has_unsynced());
    assert!(!s.has_unsynced_changes());
    s.sync().expect("sync again is a no-op");
    // This node's flash bookkeeping is a commit, but not a change a periodic sync waits for.
    s.execute(&Op::Hydrated {
        ino: d.ino,
        k: 0,
        generation: 1,
    })
    .expect("hydrated");
    assert!(s.has_unsynced());
    assert!(!s.has_unsynced_changes());
    s.sync().expect("sync");
    drop(s);

    let s = open_existing(&path);
    assert_eq!(s.fs_id(), fs_id);
    let mut all_after = Vec::new();
    s.for_each_inode(|i| {
        all_after.push(i);
        Ok(())
    })
    .expect("inodes");
    assert_eq!(all_after, all);
    assert_eq!(get(&s, ROOT_INO).uid, 3);
    assert_eq!(list(&s, ROOT_INO, 100), listing_root);
    assert_eq!(list(&s, d.ino, 100), listing_d);
    assert_eq!(lookup(&s, ROOT_INO, "l2").target, l.target);
    assert_eq!(lookup(&s, ROOT_INO, "f2").nlink, 2);
    assert_eq!(s.xattr(f.ino, b"user.k").expect("xattr"), b"v");
    assert_eq!(s.xattr(f.ino, acl::ACCESS_XATTR).expect("acl"), full_acl());
    assert_eq!(orphans(&s), BTreeSet::from([gone.ino]));
    check_invariants(&s);

    // Inode numbers are never handed out twice, even across a restart.
    let used: BTreeSet<Ino> = all.iter().map(|i| i.ino).collect();
    let next = s.alloc_ino();
    assert!(next > high.ino, "alloc_ino returned {next} <= {}", high.ino);
    assert!(!used.contains(&next));
    // And a purge followed by a restart does not free its number either.
    purge(&s, gone.ino).expect("purge");
    let n = create(&s, ROOT_INO, "n", FileKind::File).expect("n");
    s.sync().expect("sync");
    drop(s);
    let s = open_existing(&path);
    let after_restart = s.alloc_ino();
    assert!(after_restart > n.ino);
    assert!(!used.contains(&after_restart));
    assert_err!(s.inode(gone.ino), MetaError::NotFound);
    assert!(orphans(&s).is_empty());
    check_invariants(&s);
}

/// Copies the database file while the store is still open, as a crash would leave it: no
/// clean shutdown, nothing flushed by dropping the store.
fn crash_copy(from: &Path, to: &Path) -> MetaStore {
    std::fs::copy(from, to).expect("copy");
    let (s, created) = MetaStore::open(to, Timestamp::now(), 0, 0).expect("open crash copy");
    assert!(!created);
    s
}

#[test]
fn sync_is_durable_without_clean_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.redb");
    let (s, _) = MetaStore::open(&path, Timestamp::now(), 0, 0).expect("open");
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let f = create(&s, d.ino, "f", FileKind::File).expect("f");
    setxattr(&s, f.ino, b"user.k", b"v", XattrMode::Upsert).expect("xattr");
    rename(&s, d.ino, "f", ROOT_INO, "g", RenameMode::Replace).expect("rename");
    s.sync().expect("sync");
    let synced = crash_copy(&path, &dir.path().join("synced.redb"));
    assert_eq!(lookup(&synced, ROOT_INO, "g").ino, f.ino);
    assert_eq!(synced.xattr(f.ino, b"user.k").expect("xattr"), b"v");
    assert!(names(&synced, d.ino).is_empty());
    assert_eq!(get(&synced, ROOT_INO).nlink, 3);
    assert!(synced.alloc_ino() > f.ino);
    check_invariants(&synced);
    drop(synced);

    // Work after the sync may or may not survive a crash, but what survives is consistent.
    let e = create(&s, d.ino, "e", FileKind::Dir).expect("e");
    unlink(&s, ROOT_INO, "g").expect("unlink");
    rename(&s, d.ino, "e", ROOT_INO, "e", RenameMode::Replace).expect("rename");
    assert!(s.has_unsynced());
    let unsynced = crash_copy(&path, &dir.path().join("unsynced.redb"));
    check_invariants(&unsynced);
    if let Ok(again) = unsynced.lookup(ROOT_INO, b"e") {
        assert_eq!(again.ino, e.ino);
    }
    assert!(unsynced.alloc_ino() > f.ino);
    drop(unsynced);
    s.sync().expect("sync");
    let last = crash_copy(&path, &dir.path().join("last.redb"));
    assert_eq!(lookup(&last, ROOT_INO, "e").ino, e.ino);
    assert_eq!(orphans(&last), BTreeSet::from([f.ino]));
    check_invariants(&last);
}

#[test]
fn alloc_ino_after_reopen_skips_numbers_of_created_inodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.redb");
    let mut used = BTreeSet::from([ROOT_INO]);
    for round in 0..3 {
        let (s, created) = MetaStore::open(&path, Timestamp::now(), 0, 0).expect("open");
        assert_eq!(created, round == 0);
        for i in 0..5 {
            let ino = s.alloc_ino();
            assert!(used.insert(ino), "inode number {ino} handed out twice");
            let name = format!("r{round}i{i}");
            create_with_ino(&s, &name, ino).expect("create");
        }
        // Numbers allocated but never used may be reused; used ones may not.
        let _wasted = s.alloc_ino();
        s.sync().expect("sync");
    }
    let s = open_existing(&path);
    assert_eq!(s.counts().expect("counts").inodes, 16);
}

fn create_with_ino(s: &MetaStore, name: &str, ino: Ino) -> Result<Inode> {
    s.execute(&Op::Create {
        parent: ROOT_INO,
        name: name.as_bytes().to_vec(),
        ino,
        kind: FileKind::File,
        perm: 0o644,
        umask: 0,
        rdev: 0,
        target: Vec::new(),
        caller: Caller::default(),
        now: Timestamp::now(),
    })
    .map(inode_of)
}

#[test]
fn reopen_checks_format_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.redb");
    let (s, _) = MetaStore::open(&path, Timestamp::now(), 0, 0).expect("open");
    create(&s, ROOT_INO, "f", FileKind::File).expect("f");
    s.sync().expect("sync");
    drop(s);
    // Same version: fine, and nothing is reformatted.
    let s = open_existing(&path);
    assert_eq!(names(&s, ROOT_INO), ["f"]);
    drop(s);

    // Another version: refused.
    {
        let db = redb::Database::create(&path).expect("redb open");
        let txn = db.begin_write().expect("begin");
        {
            let mut sup = txn.open_table(crate::tables::SUPER).expect("super");
            sup.insert(
                crate::tables::KEY_VERSION,
                (FORMAT_VERSION + 1).to_le_bytes().as_slice(),
            )
            .expect("insert");
        }
        txn.commit().expect("commit");
    }
    match MetaStore::open(&path, Timestamp::now(), 0, 0) {
        Err(MetaError::Version { found, expected }) => {
            assert_eq!(found, FORMAT_VERSION + 1);
            assert_eq!(expected, FORMAT_VERSION);
        }
        other => panic!(
            "expected a version error, got {:?}",
            other.map(|(s, c)| (s.fs_id().to_string(), c))
        ),
    }

    // No version at all in a database that has other super keys: refused too.
    {
        let db = redb::Database::create(&path).expect("redb open");
        let txn = db.begin_write().expect("begin");
        {
            let mut sup = txn.open_table(crate::tables::SUPER).expect("super");
            sup.remove(crate::tables::KEY_VERSION).expect("remove");
        }
        txn.commit().expect("commit");
    }
    assert_err!(
        MetaStore::open(&path, Timestamp::now(), 0, 0).map(|(_, created)| created),
        MetaError::Store(_)
    );
}

#[test]
fn second_open_of_same_database_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.redb");
    let (_s, _) = MetaStore::open(&path, Timestamp::now(), 0, 0).expect("open");
    assert_err!(
        MetaStore::open(&path, Timestamp::now(), 0, 0).map(|(_, created)| created),
        MetaError::Store(_)
    );
}

// ---------------------------------------------------------------------------------------------
// Randomised sequence of operations: invariants hold after every one
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[test]
fn random_operations_keep_invariants() {
    let (_d, s) = store();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let names = ["a", "b", "c", "d", "e"];
    let modes = [
        RenameMode::Replace,
        RenameMode::NoReplace,
        RenameMode::Exchange,
    ];
    let mut ok = 0;
    for step in 0..600 {
        // Live directories and non-directory inodes.
        let mut dirs = Vec::new();
        let mut files = Vec::new();
        s.for_each_inode(|i| {
            if i.kind == FileKind::Dir && i.nlink > 0 {
                dirs.push(i.ino);
            } else if i.kind != FileKind::Dir && i.nlink > 0 {
                files.push(i.ino);
            }
            Ok(())
        })
        .expect("inodes");
        let dir = dirs[rng.below(dirs.len())];
        let dir2 = dirs[rng.below(dirs.len())];
        let name = names[rng.below(names.len())];
        let name2 = names[rng.below(names.len())];
        let result: Result<()> = match rng.below(10) {
            0 | 1 => create(&s, dir, name, FileKind::File).map(drop),
            2 | 3 => create(&s, dir, name, FileKind::Dir).map(drop),
            4 if !files.is_empty() => link(&s, files[rng.below(files.len())], dir, name).map(drop),
            5 => unlink(&s, dir, name).map(drop),
            6 => rmdir(&s, dir, name).map(drop),
            7 | 8 => rename(&s, dir, name, dir2, name2, modes[rng.below(3)]).map(drop),
            _ => {
                for o in s.orphans().expect("orphans") {
                    purge(&s, o);
                }
                Ok(())
            }
        };
        match result {
            Ok(()) => ok += 1,
            Err(MetaError::Store(e)) | Err(MetaError::Corrupt(_, e)) => {
                panic!("step {step}: store failure {e}")
            }
            Err(_) => {}
        }
        check_invariants(&s);
    }
    assert!(ok > 200, "too few operations succeeded ({ok})");
}

fn blob(k: u64, generation: u64, len: u64) -> BlobRecord {
    BlobRecord {
        k,
        generation,
        len,
        crc32c: (k * 31 + generation) as u32,
        chunks: (0..len.div_ceil(crate::BLOB_CHUNK))
            .map(|i| (i * 7 + generation) as u32)
            .collect(),
    }
}

#[test]
fn blob_piece_checksums_follow_their_generation() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("create");
    let commit = |blobs: Vec<BlobRecord>, count| {
        s.execute(&Op::CommitBlobs {
            ino: f.ino,
            blobs,
            blob_count: count,
            clean: true,
        })
        .expect("commit");
    };
    commit(vec![blob(0, 1, 64 << 20), blob(1, 1, 3 << 20)], 2);
    let got = s.blobs_of(f.ino).expect("blobs");
    assert_eq!(got, vec![blob(0, 1, 64 << 20), blob(1, 1, 3 << 20)]);
    assert_eq!(got[0].chunks.len(), 64);
    assert_eq!(got[1].chunks.len(), 3);
    // A new generation replaces them; one recorded without pieces has none.
    let mut bare = blob(1, 2, 5);
    bare.chunks.clear();
    commit(vec![bare.clone()], 2);
    assert_eq!(s.blobs_of(f.ino).expect("blobs")[1], bare);
    // Retired with the blob: a regrown blob 1 does not inherit them.
    commit(Vec::new(), 1);
    let mut regrown = blob(1, 1, 10);
    regrown.chunks.clear();
    commit(vec![regrown.clone()], 2);
    assert_eq!(s.blobs_of(f.ino).expect("blobs")[1], regrown);
}

#[test]
fn blob_generations_queue_old_objects_for_deletion() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("create");
    s.execute(&Op::MarkDirty { ino: f.ino }).expect("dirty");
    assert_eq!(s.dirty_files(10).expect("dirty"), vec![f.ino]);
    s.execute(&Op::CommitBlobs {
        ino: f.ino,
        blobs: vec![blob(0, 1, 100), blob(1, 1, 50)],
        blob_count: 2,
        clean: true,
    })
    .expect("commit");
    assert!(s.dirty_files(10).expect("dirty").is_empty());
    assert!(
        s.pending_deletes(10).expect("deletes").is_empty(),
        "first generation replaces nothing"
    );
    assert_eq!(
        s.blobs_of(f.ino).expect("blobs"),
        vec![blob(0, 1, 100), blob(1, 1, 50)]
    );

    // Rewriting blob 0 and shrinking to one blob retires generation 1 of both.
    s.execute(&Op::CommitBlobs {
        ino: f.ino,
        blobs: vec![blob(0, 2, 80)],
        blob_count: 1,
        clean: false,
    })
    .expect("commit");
    assert_eq!(s.blobs_of(f.ino).expect("blobs"), vec![blob(0, 2, 80)]);
    let mut pending = s.pending_deletes(10).expect("deletes");
    pending.sort();
    assert_eq!(pending, vec![(f.ino, 0, 1), (f.ino, 1, 1)]);
    assert_eq!(
        s.dirty_files(10).expect("dirty"),
        Vec::<Ino>::new(),
        "not clean, but was already off the queue"
    );
    s.execute(&Op::BlobsDeleted { blobs: pending })
        .expect("deleted");
    assert!(s.pending_deletes(10).expect("deletes").is_empty());
    let c = s.tier_counts().expect("counts");
    assert_eq!(
        (c.blobs_stored, c.bytes_stored, c.deletes_pending),
        (1, 80, 0)
    );
}

#[test]
fn purge_retires_every_blob_and_the_upload() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("create");
    s.execute(&Op::CommitBlobs {
        ino: f.ino,
        blobs: vec![blob(0, 3, 10), blob(1, 4, 10)],
        blob_count: 2,
        clean: true,
    })
    .expect("commit");
    s.execute(&Op::MarkDirty { ino: f.ino }).expect("dirty");
    s.execute(&Op::Unlink {
        parent: ROOT_INO,
        name: b"f".to_vec(),
        now: Timestamp::now(),
    })
    .expect("unlink");
    s.execute(&Op::Purge { ino: f.ino }).expect("purge");
    let mut pending = s.pending_deletes(10).expect("deletes");
    pending.sort();
    assert_eq!(pending, vec![(f.ino, 0, 3), (f.ino, 1, 4)]);
    assert!(s.dirty_files(10).expect("dirty").is_empty());
    assert!(s.blobs_of(f.ino).expect("blobs").is_empty());
    // An upload that finishes after the purge only adds its objects to the delete queue.
    s.execute(&Op::CommitBlobs {
        ino: f.ino,
        blobs: vec![blob(0, 5, 10)],
        blob_count: 1,
        clean: true,
    })
    .expect("late commit");
    assert_eq!(s.pending_deletes(10).expect("deletes").len(), 3);
}

/// Whether `ino` has a blob off flash, as both reads that answer it see it.
fn evicted(s: &MetaStore, ino: Ino) -> bool {
    let alone = s.has_evicted(ino).expect("has");
    let (inode, with_inode) = s.inode_and_evicted(ino).expect("inode and evicted");
    assert_eq!(inode, s.inode(ino).expect("inode"));
    assert_eq!(alone, with_inode, "the two reads disagree on {ino}");
    alone
}

#[test]
fn eviction_marks_only_committed_blobs_of_clean_files() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("create");
    s.execute(&Op::CommitBlobs {
        ino: f.ino,
        blobs: vec![blob(0, 1, 100), blob(1, 1, 50)],
        blob_count: 2,
        clean: true,
    })
    .expect("commit");
    assert_eq!(s.evict_candidates().expect("candidates").len(), 2);
    // A stale generation is refused; the current one is marked.
    let out = s
        .execute(&Op::Evict {
            ino: f.ino,
            blobs: vec![(0, 1), (1, 7)],
        })
        .expect("evict");
    assert_eq!(out, Outcome::Evicted(vec![0]));
    assert_eq!(s.evicted_of(f.ino).expect("evicted"), vec![(0, 1)]);
    assert!(evicted(&s, f.ino));
    let c = s.tier_counts().expect("counts");
    assert_eq!((c.blobs_evicted, c.bytes_evicted), (1, 100));
    assert_eq!(
        s.evict_candidates().expect("candidates"),
        vec![crate::EvictCandidate {
            ino: f.ino,
            k: 1,
            generation: 1,
            len: 50
        }]
    );

    // A dirty file's flash copy may differ from the store: nothing is marked.
    s.execute(&Op::MarkDirty { ino: f.ino }).expect("dirty");
    let out = s
        .execute(&Op::Evict {
            ino: f.ino,
            blobs: vec![(1, 1)],
        })
        .expect("evict");
    assert_eq!(out, Outcome::Evicted(vec![]));
    assert!(s.evict_candidates().expect("candidates").is_empty());

    // Hydration of another generation changes nothing; of the right one, the blob is back.
    s.execute(&Op::Hydrated {
        ino: f.ino,
        k: 0,
        generation: 2,
    })
    .expect("hydrated");
    assert!(evicted(&s, f.ino));
    s.execute(&Op::Hydrated {
        ino: f.ino,
        k: 0,
        generation: 1,
    })
    .expect("hydrated");
    assert!(!evicted(&s, f.ino));
}

#[test]
fn retiring_or_replacing_a_blob_forgets_its_eviction() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("create");
    s.execute(&Op::CommitBlobs {
        ino: f.ino,
        blobs: vec![blob(0, 1, 100), blob(1, 1, 50)],
        blob_count: 2,
        clean: true,
    })
    .expect("commit");
    s.execute(&Op::Evict {
        ino: f.ino,
        blobs: vec![(0, 1), (1, 1)],
    })
    .expect("evict");
    s.execute(&Op::CommitBlobs {
        ino: f.ino,
        blobs: vec![blob(0, 2, 100)],
        blob_count: 1,
        clean: true,
    })
    .expect("commit");
    assert!(s.evicted_of(f.ino).expect("evicted").is_empty());
    assert_eq!(s.tier_counts().expect("counts").blobs_evicted, 0);
}

#[test]
fn tier_policy_is_inherited_by_new_files_and_directories() {
    let (_d, s) = store();
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("mkdir");
    setxattr(&s, d.ino, crate::TIER_XATTR, b"s3", XattrMode::Upsert).expect("setxattr");
    let sub = create(&s, d.ino, "sub", FileKind::Dir).expect("mkdir");
    let f = create(&s, sub.ino, "f", FileKind::File).expect("create");
    assert_eq!(s.xattr(f.ino, crate::TIER_XATTR).expect("xattr"), b"s3");
    let l = symlink(&s, d.ino, "l", b"f").expect("symlink");
    assert!(s.xattr(l.ino, crate::TIER_XATTR).is_err());
}

#[test]
fn shrinking_a_file_forgets_evictions_past_the_end() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "f", FileKind::File).expect("create");
    let blob_size = crate::BLOB_SIZE;
    s.execute(&Op::CommitBlobs {
        ino: f.ino,
        blobs: vec![blob(0, 1, blob_size), blob(1, 1, blob_size), blob(2, 1, 10)],
        blob_count: 3,
        clean: true,
    })
    .expect("commit");
    s.execute(&Op::Evict {
        ino: f.ino,
        blobs: vec![(0, 1), (1, 1), (2, 1)],
    })
    .expect("evict");
    // Cut inside blob 1: blob 2 holds no data any more; blobs 0 and 1 stay evicted.
    s.execute(&Op::SetAttr {
        ino: f.ino,
        attr: SetAttr {
            size: Some(blob_size + 5),
            ..SetAttr::default()
        },
        now: ts(10),
    })
    .expect("truncate");
    assert_eq!(s.evicted_of(f.ino).expect("evicted"), vec![(0, 1), (1, 1)]);
    // To zero: nothing is evicted, so writes past the end land on flash as new data.
    s.execute(&Op::SyncData {
        ino: f.ino,
        size: 0,
        atime: ts(11),
        mtime: ts(11),
        ctime: ts(11),
    })
    .expect("sync");
    assert!(s.evicted_of(f.ino).expect("evicted").is_empty());
    assert_eq!(
        s.blobs_of(f.ino).expect("blobs").len(),
        3,
        "records stay until the upload"
    );
}

/// Operations are applied into one open transaction, committed only when something needs
/// it (see `pending`). Every kind of read sees them, a batch that fails leaves those before
/// it applied and nothing of itself, more than one transaction's worth is committed on the
/// way, and a sync makes them all durable.
#[test]
fn operations_between_commits_are_seen_and_survive_a_failed_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.redb");
    let (s, _) = MetaStore::open(&path, Timestamp::now(), 0, 0).expect("open");
    let d = create(&s, ROOT_INO, "d", FileKind::Dir).expect("d");
    let f = create(&s, d.ino, "f", FileKind::File).expect("f");
    // Reads on the request path read through the open transaction, others commit it.
    assert_eq!(s.lookup(d.ino, b"f").expect("lookup").ino, f.ino);
    assert_eq!(s.inode(f.ino).expect("inode").kind, FileKind::File);
    assert_eq!(names(&s, d.ino), ["f"]);

    // A batch whose second operation fails: the first is not applied either, and what
    // came before the batch still is.
    let g = s.alloc_ino();
    let batch = [
        create_op(d.ino, "g", g, FileKind::File),
        Op::Unlink {
            parent: d.ino,
            name: b"missing".to_vec(),
            now: Timestamp::now(),
        },
    ];
    assert_err!(s.execute_batch(&batch), MetaError::NotFound);
    assert_err!(s.lookup(d.ino, b"g"), MetaError::NotFound);
    assert_err!(s.inode(g), MetaError::NotFound);
    assert_eq!(s.lookup(d.ino, b"f").expect("f after").ino, f.ino);
    // A failing operation alone, after more were applied without a commit between.
    create(&s, d.ino, "h", FileKind::File).expect("h");
    assert_err!(create(&s, d.ino, "h", FileKind::File), MetaError::Exists);
    assert_eq!(sorted_names(&s, d.ino), ["f", "h"]);

    // More operations than one open transaction takes.
    for i in 0..600 {
        create(&s, ROOT_INO, &format!("n{i}"), FileKind::File).expect("create");
    }
    assert_eq!(names(&s, ROOT_INO).len(), 601);
    s.sync().expect("sync");
    drop(s);
    let s = open_existing(&path);
    assert_eq!(names(&s, ROOT_INO).len(), 601);
    assert_eq!(sorted_names(&s, d.ino), ["f", "h"]);
}

#[test]
fn sync_namespace_waits_for_the_namespace_and_not_for_bookkeeping() {
    let (_d, s) = store();
    let f = create(&s, ROOT_INO, "db", FileKind::File).expect("create");
    // The create is namespace: it must be made durable.
    assert!(s.has_unsynced());
    s.sync_namespace().expect("sync");
    assert!(!s.has_unsynced());
    // What a backing file already holds is not: it stays pending.
    s.execute(&Op::SyncData {
        ino: f.ino,
        size: 4096,
        atime: ts(5),
        mtime: ts(5),
        ctime: ts(5),
    })
    .expect("sync data");
    s.execute(&Op::MarkDirty { ino: f.ino })
        .expect("mark dirty");
    s.sync_namespace().expect("sync");
    assert!(s.has_unsynced(), "bookkeeping alone was made durable");
    // A chmod is namespace again, and takes the pending bookkeeping with it.
    chmod(&s, f.ino, 0o600);
    s.sync_namespace().expect("sync");
    assert!(!s.has_unsynced());
    // Bookkeeping in one batch with a namespace operation counts as namespace.
    s.execute_batch(&[
        Op::MarkDirty { ino: f.ino },
        create_op(ROOT_INO, "journal", s.alloc_ino(), FileKind::File),
    ])
    .expect("batch");
    s.sync_namespace().expect("sync");
    assert!(!s.has_unsynced());
}

// ---------------------------------------------------------------------------------------------
// Creates made durable by an origin record (an fsync of a new file without a commit)
// ---------------------------------------------------------------------------------------------

/// The record an fsync of the just-created file `ino` writes into its backing file, as
/// recovery reads it back.
fn origin_record(s: &MetaStore, ino: Ino) -> crate::Origin {
    match s.fsync_plan(ino) {
        FsyncPlan::Cover { record, .. } => crate::decode_origin(ino, &record).expect("decodes"),
        other => panic!("expected a cover for {ino}, got {other:?}"),
    }
}

#[test]
fn a_create_comes_back_from_its_origin_record_into_a_store_that_lost_it() {
    let (_d, before) = store();
    let f = create(&before, ROOT_INO, "kept", FileKind::File).expect("create");
    let record = origin_record(&before, f.ino);
    let dir = create(&before, ROOT_INO, "sub", FileKind::Dir).expect("mkdir");
    assert_eq!(
        before.fsync_plan(f.ino),
        FsyncPlan::Commit,
        "a mkdir is pending too"
    );

    // Another store stands for this one after a crash that lost both creates.
    let (_d2, after) = store();
    assert_eq!(
        after.recover_create(f.ino + 1, &record).expect("recover"),
        None,
        "not this file's record"
    );
    let name = after.recover_create(f.ino, &record).expect("recover");
    assert_eq!(name.as_deref(), Some(&b"kept"[..]));
    let back = lookup(&after, ROOT_INO, "kept");
    assert_eq!(
        (back.ino, back.kind, back.perm),
        (f.ino, FileKind::File, f.perm)
    );
    assert_eq!((back.uid, back.gid, back.mtime), (f.uid, f.gid, f.mtime));
    assert!(
        after.alloc_ino() > f.ino,
        "numbers are not handed out again"
    );

    // A name taken meanwhile (not possible under the fsync rules, but nothing is dropped).
    before.sync().expect("sync");
    assert_eq!(
        before.fsync_plan(f.ino),
        FsyncPlan::DataOnly,
        "everything is durable"
    );
    let g = create(&before, dir.ino, "x", FileKind::File).expect("create");
    let in_sub = origin_record(&before, g.ino);
    assert_eq!(
        after.recover_create(g.ino, &in_sub).expect("recover"),
        None,
        "its directory is gone"
    );
    let h = create(&before, ROOT_INO, "kept", FileKind::File);
    assert!(h.is_err(), "the name is taken in the first store");
    let (_d3, third) = store();
    third
        .execute(&create_op(ROOT_INO, "kept", 1000, FileKind::File))
        .expect("create");
    let renamed = third.recover_create(f.ino, &record).expect("recover");
    let want = format!("kept.cfs-recovered-{}", f.ino).into_bytes();
    assert_eq!(renamed, Some(want.clone()));
    assert_eq!(third.lookup(ROOT_INO, &want).expect("lookup").ino, f.ino);
}
