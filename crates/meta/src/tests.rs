//! State-machine tests against a real redb file in a temporary directory.

use crate::*;

fn store() -> (tempfile::TempDir, MetaStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, created) =
        MetaStore::open(&dir.path().join("meta.redb"), Timestamp::now(), 0, 0).expect("open");
    assert!(created);
    (dir, store)
}

fn create(s: &MetaStore, parent: Ino, name: &str, kind: FileKind) -> Result<Inode> {
    let ino = s.alloc_ino();
    match s.execute(&Op::Create {
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
    })? {
        Outcome::Inode(i) => Ok(i),
        other => panic!("unexpected outcome {other:?}"),
    }
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
