//! Metadata checkpoints: the whole store as one self-checking byte string.
//!
//! A checkpoint is what `cfs repair --from-s3` rebuilds a filesystem from, so it holds every
//! table (the tier's bookkeeping too: which generation of each blob the bucket holds, and
//! which objects are queued for deletion), read in ONE read transaction: redb's MVCC
//! snapshot makes it a consistent cut, taken without stopping writers.
//!
//! Encoding (all integers little-endian):
//!
//! ```text
//! magic "CFSCKPT\n" | u32 checkpoint version | u32 metadata FORMAT_VERSION
//! | sections, in the order of SECTIONS: postcard u64 row count, then that many
//!   postcard-encoded (key, value) rows, exactly as the table stores them
//! | u32 crc32c of every byte before it
//! ```
//!
//! Rows are written as the tables hold them (inodes stay postcard blobs, listing entries stay
//! packed), so an import reproduces the store bit for bit and needs no knowledge of the
//! value formats beyond the metadata format version, which must match. The trailing crc32c
//! is checked before anything is written, so a damaged checkpoint never produces a store.

use crate::store::MetaStore;
use crate::tables::*;
use crate::{Ino, MetaError, ROOT_INO, Result, Timestamp};
use redb::{Database, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::Ordering;

/// The checkpoint encoding this build writes and reads.
pub const CHECKPOINT_VERSION: u32 = 2;

const MAGIC: &[u8; 8] = b"CFSCKPT\n";
/// Magic, checkpoint version, metadata format version.
const HEADER_LEN: usize = 16;
const CRC_LEN: usize = 4;

/// A consistent image of every table of a [`MetaStore`].
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The encoded image (see the module doc). Self-checking: it carries its own crc32c.
    pub bytes: Vec<u8>,
    pub fs_id: String,
    /// [`MetaStore::change_count`] read before the snapshot was taken: every change counted
    /// up to this value is in the image, so a publisher that remembers it knows whether a
    /// newer checkpoint is needed.
    pub change_count: u64,
    pub counts: CheckpointCounts,
    /// The last logged operation the image holds (see `oplog`): a replay of the shipped
    /// log after it applies only later ones.
    pub op_seq: u64,
    /// The first operation not yet shipped when the image was taken: the shipped segment
    /// holding the operation after `op_seq` starts here or later, so a replay reads
    /// segments from here on.
    pub log_next: u64,
    /// The image's delete queue. These objects are referenced by no blob of the image, so
    /// once the image is published as the newest checkpoint they may be DELETEd: a repair
    /// from it will never ask for them.
    pub deletes: Vec<(Ino, u64, u64)>,
}

/// What a checkpoint holds, for logs, `cfs status` and the bucket's HEAD object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointCounts {
    pub inodes: u64,
    pub files: u64,
    pub dirs: u64,
    /// Sum of regular file sizes.
    pub bytes: u64,
    pub dentries: u64,
    pub xattrs: u64,
    pub orphans: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Files whose latest data was not yet uploaded when the image was taken.
    pub dirty: u64,
    pub deletes: u64,
    pub evicted: u64,
}

fn corrupt(why: impl std::fmt::Display) -> MetaError {
    MetaError::Store(format!("the checkpoint is corrupt: {why}"))
}

/// Appends one postcard-encoded value.
fn put<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<()> {
    *out = postcard::to_extend(value, std::mem::take(out))
        .map_err(|e| MetaError::Store(format!("encoding a checkpoint: {e}")))?;
    Ok(())
}

/// Writes one section: `table`'s row count, then its rows exactly as the table holds them,
/// each handed to `each` first (for the counts). Rows are `(key, value)` pairs; a key-only
/// table's value is `()`, which postcard encodes as nothing, so its rows are the keys alone.
fn put_section<K, V>(
    out: &mut Vec<u8>,
    table: &redb::ReadOnlyTable<K, V>,
    mut each: impl FnMut(&K::SelfType<'_>, &V::SelfType<'_>) -> Result<()>,
) -> Result<u64>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
    for<'a> (K::SelfType<'a>, V::SelfType<'a>): Serialize,
{
    let rows = table.len()?;
    put(out, &rows)?;
    for r in table.iter()? {
        let (k, v) = r?;
        let row = (k.value(), v.value());
        each(&row.0, &row.1)?;
        put(out, &row)?;
    }
    Ok(rows)
}

/// Reads postcard values off the front of a checkpoint body.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take<T: Deserialize<'a>>(&mut self, what: &str) -> Result<T> {
        let (v, rest) = postcard::take_from_bytes(self.rest)
            .map_err(|e| corrupt(format_args!("cannot decode {what}: {e}")))?;
        self.rest = rest;
        Ok(v)
    }

    /// A row count, bounded by the bytes left (every row takes at least one byte), so a
    /// damaged count cannot make the reader loop for a long time.
    fn count(&mut self, section: &str) -> Result<u64> {
        let n: u64 = self.take(section)?;
        if n > self.rest.len() as u64 {
            return Err(corrupt(format_args!(
                "section {section} claims {n} rows in {} bytes",
                self.rest.len()
            )));
        }
        Ok(n)
    }
}

/// Checks magic, versions and crc32c; returns the sections.
fn verify(bytes: &[u8]) -> Result<&[u8]> {
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(corrupt(format_args!("only {} bytes", bytes.len())));
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt("not a ClaudeFS metadata checkpoint (bad magic)"));
    }
    let (data, tail) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let computed = crc32c::crc32c(data);
    if stored != computed {
        return Err(corrupt(format_args!(
            "crc32c is {computed:#010x}, the checkpoint says {stored:#010x}"
        )));
    }
    let word = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    let version = word(8);
    if version != CHECKPOINT_VERSION {
        return Err(MetaError::Store(format!(
            "checkpoint version {version} is not supported: this build reads version \
             {CHECKPOINT_VERSION}"
        )));
    }
    let format = word(12);
    if format != crate::FORMAT_VERSION {
        return Err(MetaError::Version {
            found: format,
            expected: crate::FORMAT_VERSION,
        });
    }
    Ok(&data[HEADER_LEN..])
}

impl MetaStore {
    /// How many operations this store has applied since it was opened. Cheap; a checkpoint
    /// publisher compares it with [`Checkpoint::change_count`] to skip unchanged intervals.
    pub fn change_count(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Serialises every table from one read transaction. Writers are not blocked.
    pub fn export_checkpoint(&self) -> Result<Checkpoint> {
        // Read the counter before the snapshot: a change counted by then is in it.
        let change_count = self.change_count();
        let read = self.read_txn()?;
        let mut out = Vec::with_capacity(1 << 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
        out.extend_from_slice(&crate::FORMAT_VERSION.to_le_bytes());
        let mut c = CheckpointCounts::default();

        // The image covers the log up to op_seq: an import starts its own numbering there.
        let (op_seq, log_next) = crate::oplog::checkpoint_cut(&read)?;
        let sup = read.open_table(SUPER)?;
        let has_base = sup.get(KEY_LOG_BASE)?.is_some();
        put(&mut out, &(sup.len()? + u64::from(!has_base)))?;
        for r in sup.iter()? {
            let (k, v) = r?;
            if k.value() != KEY_LOG_BASE {
                put(&mut out, &(k.value(), v.value()))?;
            }
        }
        put(&mut out, &(KEY_LOG_BASE, op_seq.to_le_bytes().as_slice()))?;
        c.inodes = put_section(&mut out, &read.open_table(INODES)?, |&ino, bytes| {
            let inode = decode_inode(ino, bytes)?;
            crate::store::tally(&inode, &mut c.files, &mut c.dirs, &mut c.bytes);
            Ok(())
        })?;
        c.dentries = put_section(&mut out, &read.open_table(DENTRIES)?, |_, _| Ok(()))?;
        put_section(&mut out, &read.open_table(LISTING)?, |_, _| Ok(()))?;
        c.xattrs = put_section(&mut out, &read.open_table(XATTRS)?, |_, _| Ok(()))?;
        c.orphans = put_section(&mut out, &read.open_table(ORPHANS)?, |_, _| Ok(()))?;
        c.blobs = put_section(&mut out, &read.open_table(BLOBS)?, |_, &(_, len, _)| {
            c.blob_bytes += len;
            Ok(())
        })?;
        put_section(&mut out, &read.open_table(CHUNKS)?, |_, _| Ok(()))?;
        c.dirty = put_section(&mut out, &read.open_table(DIRTY)?, |_, _| Ok(()))?;
        let mut deletes = Vec::new();
        c.deletes = put_section(&mut out, &read.open_table(DELETES)?, |&key, _| {
            deletes.push(key);
            Ok(())
        })?;
        c.evicted = put_section(&mut out, &read.open_table(EVICTED)?, |_, _| Ok(()))?;

        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(Checkpoint {
            bytes: out,
            fs_id: self.fs_id().to_string(),
            change_count,
            counts: c,
            op_seq,
            log_next,
            deletes,
        })
    }

    /// Creates a new store at `path` holding exactly the checkpoint `bytes`, and opens it.
    ///
    /// The checkpoint is verified before anything is written, and it is imported in one
    /// durable transaction: a crash leaves either no filesystem or the whole one. A target
    /// that already holds any metadata is refused; an empty database file (left by an import
    /// that was interrupted before its commit) is reused. Returns the store and what the
    /// checkpoint held (before `opts` were applied).
    pub fn import_checkpoint(path: &Path, bytes: &[u8]) -> Result<(MetaStore, CheckpointCounts)> {
        let body = verify(bytes)?;
        let existed = path.exists();
        let counts = match import_into(path, body) {
            Ok(c) => c,
            Err(e) => {
                // Damage the crc cannot see (a well-checksummed image of a broken store) is
                // found while importing: leave no half-made database behind.
                if !existed {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        };
        let (store, created) = MetaStore::open(path, Timestamp::now(), 0, 0)?;
        if created {
            // Unreachable after the checks in import_into; never hand back a fresh, empty
            // filesystem in place of the imported one.
            return Err(MetaError::Store(
                "the imported checkpoint did not produce a filesystem".into(),
            ));
        }
        Ok((store, counts))
    }
}

impl MetaStore {
    /// Readies an imported (and replayed) store for a node that has no data on flash yet,
    /// which is what `cfs repair --from-s3` builds: every committed blob is marked evicted
    /// (so reads fetch it and the eviction bookkeeping is right), and the upload queue is
    /// emptied: its files' flash copies are gone, and uploading the empty backing files would
    /// overwrite good objects. Returns how many files were on the upload queue: their last
    /// changes never reached the object store, and they come back as last uploaded.
    pub fn prepare_repaired(&self) -> Result<u64> {
        let _exclusive = self.exclusive()?;
        let txn = self.db.begin_write()?;
        let dropped;
        {
            let blobs = txn.open_table(BLOBS)?;
            let mut evicted = txn.open_table(EVICTED)?;
            for r in blobs.iter()? {
                let (k, v) = r?;
                evicted.insert(k.value(), v.value().0)?;
            }
            let mut dirty = txn.open_table(DIRTY)?;
            dropped = dirty.len()?;
            dirty.retain(|_, _| false)?;
        }
        txn.commit()?;
        self.committed.fetch_add(1, Ordering::Release);
        self.changes.fetch_add(1, Ordering::Release);
        Ok(dropped)
    }
}

/// Writes the verified sections `body` into a new database at `path` in one transaction.
fn import_into(path: &Path, body: &[u8]) -> Result<CheckpointCounts> {
    let db = Database::builder().create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => MetaError::Store(
            "the metadata database is in use by another process (is it mounted?)".into(),
        ),
        other => MetaError::from(other),
    })?;
    let txn = db.begin_write()?;
    let mut c = CheckpointCounts::default();
    {
        let mut sup = txn.open_table(SUPER)?;
        let mut inodes = txn.open_table(INODES)?;
        if sup.len()? > 0 || inodes.len()? > 0 {
            return Err(MetaError::Store(format!(
                "{} already holds a filesystem; a checkpoint is imported only into a new \
                     database",
                path.display()
            )));
        }
        let mut dentries = txn.open_table(DENTRIES)?;
        let mut listing = txn.open_table(LISTING)?;
        let mut xattrs = txn.open_table(XATTRS)?;
        let mut orphans = txn.open_table(ORPHANS)?;
        let mut blobs = txn.open_table(BLOBS)?;
        let mut chunks = txn.open_table(CHUNKS)?;
        let mut dirty = txn.open_table(DIRTY)?;
        let mut deletes = txn.open_table(DELETES)?;
        let mut evicted = txn.open_table(EVICTED)?;
        let mut r = Reader { rest: body };

        for _ in 0..r.count("super")? {
            let (k, v): (String, Vec<u8>) = r.take("a super row")?;
            sup.insert(k.as_str(), v.as_slice())?;
        }
        c.inodes = r.count("inodes")?;
        for _ in 0..c.inodes {
            let (k, v): (u64, Vec<u8>) = r.take("an inode")?;
            let inode = decode_inode(k, &v)?;
            if inode.ino != k {
                return Err(corrupt(format_args!(
                    "inode {} stored under {k}",
                    inode.ino
                )));
            }
            crate::store::tally(&inode, &mut c.files, &mut c.dirs, &mut c.bytes);
            inodes.insert(k, v.as_slice())?;
        }
        c.dentries = r.count("dentries")?;
        for _ in 0..c.dentries {
            let ((parent, name), v): ((u64, Vec<u8>), (u64, u64, u8)) =
                r.take("a directory entry")?;
            dentries.insert((parent, name.as_slice()), v)?;
        }
        for _ in 0..r.count("listing")? {
            let (k, v): ((u64, u64), Vec<u8>) = r.take("a listing entry")?;
            listing.insert(k, v.as_slice())?;
        }
        c.xattrs = r.count("xattrs")?;
        for _ in 0..c.xattrs {
            let ((ino, name), v): ((u64, Vec<u8>), Vec<u8>) = r.take("an xattr")?;
            xattrs.insert((ino, name.as_slice()), v.as_slice())?;
        }
        c.orphans = r.count("orphans")?;
        for _ in 0..c.orphans {
            let ino: u64 = r.take("an orphan")?;
            orphans.insert(ino, ())?;
        }
        c.blobs = r.count("blobs")?;
        for _ in 0..c.blobs {
            let (k, v): ((u64, u64), (u64, u64, u32)) = r.take("a blob")?;
            c.blob_bytes += v.1;
            blobs.insert(k, v)?;
        }
        for _ in 0..r.count("blob checksums")? {
            let (k, v): ((u64, u64), Vec<u8>) = r.take("a blob's piece checksums")?;
            chunks.insert(k, v.as_slice())?;
        }
        c.dirty = r.count("dirty")?;
        for _ in 0..c.dirty {
            let ino: u64 = r.take("a dirty file")?;
            dirty.insert(ino, ())?;
        }
        c.deletes = r.count("deletes")?;
        for _ in 0..c.deletes {
            let key: (u64, u64, u64) = r.take("a delete")?;
            deletes.insert(key, ())?;
        }
        c.evicted = r.count("evicted")?;
        for _ in 0..c.evicted {
            let (k, generation): ((u64, u64), u64) = r.take("an evicted blob")?;
            evicted.insert(k, generation)?;
        }
        if !r.rest.is_empty() {
            return Err(corrupt(format_args!(
                "{} bytes after the last section",
                r.rest.len()
            )));
        }
        for key in [KEY_VERSION, KEY_FS_ID, KEY_NEXT_INO] {
            if sup.get(key)?.is_none() {
                return Err(corrupt(format_args!("no {key} record")));
            }
        }
        if inodes.get(ROOT_INO)?.is_none() {
            return Err(corrupt("no root directory"));
        }
    }
    txn.commit()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlobRecord, Caller, FileKind, Inode, Op, Outcome, XattrMode};

    fn store(dir: &Path, name: &str) -> MetaStore {
        MetaStore::open(&dir.join(name), Timestamp::now(), 0, 0)
            .expect("open")
            .0
    }

    fn create(s: &MetaStore, parent: Ino, name: &str, kind: FileKind, target: &[u8]) -> Inode {
        let ino = s.alloc_ino();
        match s
            .execute(&Op::Create {
                parent,
                name: name.as_bytes().to_vec(),
                ino,
                kind,
                perm: 0o640,
                umask: 0o022,
                rdev: 0,
                target: target.to_vec(),
                caller: Caller {
                    uid: 1000,
                    gid: 1000,
                    groups: Vec::new(),
                },
                now: Timestamp::now(),
            })
            .expect("create")
        {
            Outcome::Inode(i) => i,
            other => panic!("unexpected {other:?}"),
        }
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

    /// A store with every table non-empty: a tree, a symlink, a hard link, xattrs, an
    /// orphan, committed blobs, a queued upload, queued deletes and an evicted blob.
    fn populated(dir: &Path) -> MetaStore {
        let s = store(dir, "src.redb");
        let a = create(&s, ROOT_INO, "a", FileKind::Dir, b"");
        let b = create(&s, a.ino, "b", FileKind::Dir, b"");
        let f = create(&s, b.ino, "f", FileKind::File, b"");
        let g = create(&s, ROOT_INO, "g", FileKind::File, b"");
        create(&s, ROOT_INO, "link", FileKind::Symlink, b"a/b/f");
        create(&s, a.ino, "fifo", FileKind::Fifo, b"");
        s.execute(&Op::Link {
            ino: f.ino,
            parent: ROOT_INO,
            name: b"hard".to_vec(),
            now: Timestamp::now(),
        })
        .expect("link");
        for (ino, name, value) in [
            (f.ino, &b"user.k"[..], &b"v"[..]),
            (f.ino, b"user.empty", b""),
            (a.ino, b"user.cfs.tier", b"flash"),
        ] {
            s.execute(&Op::SetXattr {
                ino,
                name: name.to_vec(),
                value: value.to_vec(),
                mode: XattrMode::Upsert,
                caller: Caller::default(),
                now: Timestamp::now(),
            })
            .expect("setxattr");
        }
        s.execute(&Op::SyncData {
            ino: f.ino,
            size: (64 << 20) + 5,
            atime: Timestamp { secs: 5, nanos: 6 },
            mtime: Timestamp { secs: 7, nanos: 8 },
            ctime: Timestamp::now(),
        })
        .expect("syncdata");
        s.execute(&Op::CommitBlobs {
            ino: f.ino,
            blobs: vec![blob(0, 1, 64 << 20), blob(1, 1, 5)],
            blob_count: 2,
            clean: true,
        })
        .expect("commit");
        // A second generation of blob 1: generation 1 goes to the delete queue.
        s.execute(&Op::CommitBlobs {
            ino: f.ino,
            blobs: vec![blob(1, 2, 5)],
            blob_count: 2,
            clean: true,
        })
        .expect("commit");
        s.execute(&Op::Evict {
            ino: f.ino,
            blobs: vec![(0, 1)],
        })
        .expect("evict");
        s.execute(&Op::MarkDirty { ino: g.ino }).expect("dirty");
        // An orphan: unlinked while (notionally) still open.
        let o = create(&s, ROOT_INO, "open-unlinked", FileKind::File, b"");
        s.execute(&Op::CommitBlobs {
            ino: o.ino,
            blobs: vec![blob(0, 1, 10)],
            blob_count: 1,
            clean: true,
        })
        .expect("commit");
        s.execute(&Op::Unlink {
            parent: ROOT_INO,
            name: b"open-unlinked".to_vec(),
            now: Timestamp::now(),
        })
        .expect("unlink");
        s
    }

    /// Everything a reader of the store can see, in one comparable value.
    fn view(s: &MetaStore) -> String {
        let mut out = format!("fs {}\n", s.fs_id());
        let mut dirs = Vec::new();
        s.for_each_inode(|inode| {
            out += &format!("{inode:?}\n");
            if inode.kind == FileKind::Dir {
                dirs.push(inode.ino);
            }
            let ino = inode.ino;
            for name in s.xattr_names(ino)? {
                out += &format!("  xattr {name:?} = {:?}\n", s.xattr(ino, &name)?);
            }
            out += &format!("  blobs {:?}\n", s.blobs_of(ino)?);
            out += &format!("  evicted {:?}\n", s.evicted_of(ino)?);
            Ok(())
        })
        .expect("inodes");
        for dir in dirs {
            out += &format!(
                "dir {dir}: {:?}\n",
                s.readdir(dir, 0, usize::MAX, true).expect("readdir")
            );
        }
        out += &format!("orphans {:?}\n", s.orphans().expect("orphans"));
        out += &format!("dirty {:?}\n", s.dirty_files(usize::MAX).expect("dirty"));
        out += &format!(
            "deletes {:?}\n",
            s.pending_deletes(usize::MAX).expect("deletes")
        );
        out += &format!("tier {:?}\n", s.tier_counts().expect("tier"));
        out
    }

    #[test]
    fn round_trip_reproduces_every_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = populated(dir.path());
        let ckpt = src.export_checkpoint().expect("export");
        assert_eq!(ckpt.fs_id, src.fs_id());
        assert_eq!(ckpt.change_count, src.change_count());
        let c = &ckpt.counts;
        assert_eq!((c.files, c.dirs, c.orphans, c.dirty), (3, 3, 1, 1));
        assert_eq!((c.blobs, c.deletes, c.evicted, c.xattrs), (3, 1, 1, 3));
        assert_eq!(ckpt.deletes.len(), 1);

        let dst_path = dir.path().join("dst.redb");
        let (dst, counts) = MetaStore::import_checkpoint(&dst_path, &ckpt.bytes).expect("import");
        assert_eq!(&counts, c);
        assert_eq!(view(&dst), view(&src));
        // Bit for bit: the imported store exports the same checkpoint.
        assert_eq!(dst.export_checkpoint().expect("export").bytes, ckpt.bytes);
        // Inode numbers continue where the source left off.
        assert_eq!(dst.alloc_ino(), src.alloc_ino());
        // And the new store works.
        create(&dst, ROOT_INO, "new", FileKind::File, b"");
        drop(dst);
        let reopened = store(dir.path(), "dst.redb");
        assert!(reopened.lookup(ROOT_INO, b"new").is_ok());
    }

    #[test]
    fn a_repaired_store_has_every_blob_evicted_and_no_upload_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = populated(dir.path());
        let ckpt = src.export_checkpoint().expect("export");
        let (dst, counts) = MetaStore::import_checkpoint(&dir.path().join("dst.redb"), &ckpt.bytes)
            .expect("import");
        assert_eq!(counts.dirty, 1);
        assert_eq!(
            dst.prepare_repaired().expect("prepare"),
            1,
            "reported, though dropped"
        );
        assert!(dst.dirty_files(10).expect("dirty").is_empty());
        let t = dst.tier_counts().expect("tier");
        assert_eq!(
            (t.blobs_evicted, t.bytes_evicted),
            (t.blobs_stored, t.bytes_stored)
        );
        assert_eq!(t.blobs_stored, 3);
        let f = dst.lookup(ROOT_INO, b"hard").expect("lookup");
        assert_eq!(
            dst.evicted_of(f.ino).expect("evicted"),
            vec![(0, 1), (1, 2)]
        );
        assert_eq!(dst.pending_deletes(10).expect("deletes"), ckpt.deletes);
        assert!(dst.evict_candidates().expect("candidates").is_empty());
    }

    /// Ships everything durable in `s`'s log, `per_segment` operations a segment, as the
    /// tier's shipper does, and returns the segments.
    fn ship_all(s: &MetaStore, per_segment: usize) -> Vec<Vec<u8>> {
        s.sync().expect("sync");
        let mut out = Vec::new();
        loop {
            let batch = s
                .log_pending(s.log_durable_seq(), per_segment, usize::MAX)
                .expect("pending");
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
                return out;
            };
            out.push(crate::encode_log_segment(&batch));
            s.log_shipped(first.0, last.0).expect("shipped");
        }
    }

    /// Replays shipped `segments` into `dst` the way repair does: from the segment that
    /// starts at `next`, skipping what the checkpoint (up to `op_seq`) already holds.
    fn replay(dst: &MetaStore, segments: &[Vec<u8>], mut next: u64, op_seq: u64) -> u64 {
        let decoded: Vec<_> = segments
            .iter()
            .map(|b| crate::decode_log_segment(b).expect("decode"))
            .collect();
        let mut replayed = 0;
        while let Some(seg) = decoded.iter().find(|s| s.first == next) {
            for (i, op) in seg.ops.iter().enumerate() {
                let seq = seg.first + i as u64;
                if seq > op_seq {
                    dst.replay(seq, op).expect("replay");
                    replayed += 1;
                }
            }
            next = seg.last() + 1;
        }
        replayed
    }

    #[test]
    fn a_checkpoint_and_the_log_after_it_reproduce_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = populated(dir.path());
        let early = ship_all(&src, 3);
        assert!(early.len() > 2, "the populated store logged operations");
        // Logged but not yet shipped when the checkpoint is taken.
        let kept = create(&src, ROOT_INO, "before", FileKind::File, b"");
        let ckpt = src.export_checkpoint().expect("export");
        assert_eq!(ckpt.log_next, ckpt.op_seq, "one operation was not shipped");
        // After the checkpoint: the log alone carries these.
        src.execute(&Op::SetAttr {
            ino: kept.ino,
            attr: crate::SetAttr {
                perm: Some(0o600),
                ..Default::default()
            },
            now: Timestamp::now(),
        })
        .expect("chmod");
        let d = create(&src, ROOT_INO, "later", FileKind::Dir, b"");
        let n = create(&src, d.ino, "n", FileKind::File, b"");
        src.execute(&Op::SyncData {
            ino: n.ino,
            size: 70 << 20,
            atime: Timestamp { secs: 1, nanos: 2 },
            mtime: Timestamp { secs: 3, nanos: 4 },
            ctime: Timestamp::now(),
        })
        .expect("syncdata");
        src.execute(&Op::MarkDirty { ino: n.ino }).expect("dirty");
        src.execute(&Op::CommitBlobs {
            ino: n.ino,
            blobs: vec![blob(0, 1, 64 << 20), blob(1, 1, 6 << 20)],
            blob_count: 2,
            clean: true,
        })
        .expect("commit");
        src.execute(&Op::Rename {
            parent: ROOT_INO,
            name: b"g".to_vec(),
            new_parent: d.ino,
            new_name: b"g2".to_vec(),
            mode: crate::RenameMode::Replace,
            now: Timestamp::now(),
        })
        .expect("rename");
        src.execute(&Op::Unlink {
            parent: ROOT_INO,
            name: b"link".to_vec(),
            now: Timestamp::now(),
        })
        .expect("unlink");
        src.execute(&Op::SetXattr {
            ino: d.ino,
            name: b"user.later".to_vec(),
            value: b"x".to_vec(),
            mode: XattrMode::Upsert,
            caller: Caller::default(),
            now: Timestamp::now(),
        })
        .expect("setxattr");
        // Flash bookkeeping is not logged.
        let before = src.log_applied_seq();
        src.execute(&Op::Evict {
            ino: n.ino,
            blobs: vec![(0, 1)],
        })
        .expect("evict");
        src.execute(&Op::Hydrated {
            ino: n.ino,
            k: 0,
            generation: 1,
        })
        .expect("hydrated");
        assert_eq!(src.log_applied_seq(), before);
        // Not shipped until durable.
        assert!(src.log_durable_seq() < src.log_applied_seq());
        let later = ship_all(&src, 2);
        assert_eq!(src.log_durable_seq(), src.log_applied_seq());
        assert_eq!(src.log_backlog().expect("backlog"), 0);
        // The early segments end before the checkpoint's replay starts; the later ones do not.
        let old = src.log_segments_before(ckpt.log_next).expect("segments");
        assert_eq!(old.len(), early.len());
        assert!(old.iter().all(|&(_, last)| last < ckpt.log_next));

        let (dst, _) = MetaStore::import_checkpoint(&dir.path().join("dst.redb"), &ckpt.bytes)
            .expect("import");
        let all: Vec<Vec<u8>> = early.iter().chain(&later).cloned().collect();
        let replayed = replay(&dst, &all, ckpt.log_next, ckpt.op_seq);
        assert_eq!(replayed, src.log_applied_seq() - ckpt.op_seq);
        assert_eq!(view(&dst), view(&src));
        // Out of order is refused, and the numbering goes on after the replayed operations.
        let last = dst.log_applied_seq();
        assert_eq!(last, src.log_applied_seq());
        let op = Op::MarkDirty { ino: n.ino };
        assert!(dst.replay(last + 2, &op).is_err());
        assert!(dst.replay(last, &op).is_err());
        create(&dst, ROOT_INO, "after-repair", FileKind::File, b"");
        dst.sync().expect("sync");
        let pending = dst.log_pending(u64::MAX, 10, usize::MAX).expect("pending");
        assert_eq!(pending.first().map(|e| e.0), Some(last + 1));
        src.forget_log_segments(&old.iter().map(|s| s.0).collect::<Vec<_>>())
            .expect("forget");
        assert!(
            src.log_segments_before(ckpt.log_next)
                .expect("segments")
                .is_empty()
        );
    }

    /// Purges applied in one batch do what they do one by one, each logged under its own
    /// number, so that a checkpoint plus the log replayed reproduces the store; a batch with
    /// a failing operation applies nothing.
    #[test]
    fn a_batch_applies_and_logs_each_operation_or_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = populated(dir.path());
        let mut victims = Vec::new();
        for i in 0..5 {
            let name = format!("victim{i}");
            victims.push(create(&src, ROOT_INO, &name, FileKind::File, b"").ino);
            src.execute(&Op::Unlink {
                parent: ROOT_INO,
                name: name.into_bytes(),
                now: Timestamp::now(),
            })
            .expect("unlink");
        }
        let early = ship_all(&src, 4);
        let ckpt = src.export_checkpoint().expect("export");
        let orphans_before = src.orphans().expect("orphans").len();
        let before = src.log_applied_seq();
        let purges: Vec<Op> = victims.iter().map(|&ino| Op::Purge { ino }).collect();
        let outcomes = src.execute_batch(&purges).expect("batch");
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Purged(Some(_))))
        );
        assert_eq!(src.log_applied_seq(), before + purges.len() as u64);
        for &ino in &victims {
            assert!(matches!(src.inode(ino), Err(MetaError::NotFound)));
        }
        assert_eq!(
            src.orphans().expect("orphans").len(),
            orphans_before - victims.len()
        );

        let later = ship_all(&src, 2);
        let (dst, _) = MetaStore::import_checkpoint(&dir.path().join("dst.redb"), &ckpt.bytes)
            .expect("import");
        let all: Vec<Vec<u8>> = early.iter().chain(&later).cloned().collect();
        assert_eq!(
            replay(&dst, &all, ckpt.log_next, ckpt.op_seq),
            purges.len() as u64
        );
        assert_eq!(view(&dst), view(&src));

        // All or none: an unlink of a missing name fails the batch, and the purge before it
        // is not applied.
        let g = create(&src, ROOT_INO, "gone", FileKind::File, b"");
        src.execute(&Op::Unlink {
            parent: ROOT_INO,
            name: b"gone".to_vec(),
            now: Timestamp::now(),
        })
        .expect("unlink");
        let seq = src.log_applied_seq();
        let bad = [
            Op::Purge { ino: g.ino },
            Op::Unlink {
                parent: ROOT_INO,
                name: b"absent".to_vec(),
                now: Timestamp::now(),
            },
        ];
        assert!(src.execute_batch(&bad).is_err());
        assert_eq!(src.log_applied_seq(), seq);
        assert_eq!(src.inode(g.ino).expect("still there").nlink, 0);
    }

    #[test]
    fn a_damaged_log_segment_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = populated(dir.path());
        let seg = ship_all(&src, 1000).pop().expect("a segment");
        let good = crate::decode_log_segment(&seg).expect("decode");
        assert_eq!(good.first, 1);
        assert!(good.ops.len() > 5);
        let mut flipped = seg.clone();
        flipped[40] ^= 1;
        for bad in [&flipped[..], &seg[..seg.len() - 1], &seg[..10], &[][..]] {
            assert!(crate::decode_log_segment(bad).is_err());
        }
    }

    #[test]
    fn a_damaged_checkpoint_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = populated(dir.path());
        let good = src.export_checkpoint().expect("export").bytes;
        let target = dir.path().join("dst.redb");
        let refuse = |bytes: &[u8], want: &str| {
            let err = MetaStore::import_checkpoint(&target, bytes)
                .err()
                .unwrap_or_else(|| panic!("accepted a checkpoint that should say {want:?}"));
            let msg = err.to_string();
            assert!(msg.contains(want), "{msg:?} does not say {want:?}");
            assert!(
                !target.exists(),
                "a refused checkpoint created {}",
                target.display()
            );
        };
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 0x40;
        refuse(&flipped, "checkpoint is corrupt: crc32c");
        refuse(&good[..good.len() - 1], "checkpoint is corrupt");
        refuse(&good[..10], "only 10 bytes");
        refuse(b"", "only 0 bytes");
        let mut magic = good.clone();
        magic[0] = b'X';
        refuse(&magic, "bad magic");

        // A future encoding, correctly checksummed, is refused by version, not as damage.
        let mut future = good[..good.len() - 4].to_vec();
        future[8..12].copy_from_slice(&(CHECKPOINT_VERSION + 1).to_le_bytes());
        let crc = crc32c::crc32c(&future);
        future.extend_from_slice(&crc.to_le_bytes());
        refuse(
            &future,
            &format!(
                "checkpoint version {} is not supported",
                CHECKPOINT_VERSION + 1
            ),
        );

        // Consistent checksum around broken content: a row count past the end.
        let mut lying = good[..HEADER_LEN].to_vec();
        put(&mut lying, &u64::MAX).expect("put");
        let crc = crc32c::crc32c(&lying);
        lying.extend_from_slice(&crc.to_le_bytes());
        refuse(&lying, "section super claims");
    }

    #[test]
    fn import_refuses_a_database_that_holds_a_filesystem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = populated(dir.path());
        let ckpt = src.export_checkpoint().expect("export");
        drop(store(dir.path(), "other.redb"));
        let err = MetaStore::import_checkpoint(&dir.path().join("other.redb"), &ckpt.bytes)
            .err()
            .expect("import into a formatted store must fail");
        assert!(
            err.to_string().contains("already holds a filesystem"),
            "{err}"
        );
        // The existing filesystem is untouched.
        let other = store(dir.path(), "other.redb");
        assert_ne!(other.fs_id(), src.fs_id());
        // An empty database file, as an interrupted import leaves, is reused.
        let empty = dir.path().join("empty.redb");
        drop(redb::Database::create(&empty).expect("create"));
        let (dst, _) = MetaStore::import_checkpoint(&empty, &ckpt.bytes)
            .expect("import into an empty database");
        assert_eq!(dst.fs_id(), src.fs_id());
    }

    /// Checkpoint-gated deletes wait a while, during which a truncated file may grow back
    /// and upload the same key (generation 1 of the same blob) again: committing it must
    /// take it off the delete queue, or the live object would be DELETEd.
    #[test]
    fn a_blob_key_committed_again_leaves_the_delete_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path(), "m.redb");
        let f = create(&s, ROOT_INO, "f", FileKind::File, b"");
        let commit = |blobs: Vec<BlobRecord>, blob_count| {
            s.execute(&Op::CommitBlobs {
                ino: f.ino,
                blobs,
                blob_count,
                clean: true,
            })
            .expect("commit")
        };
        commit(vec![blob(0, 1, 64 << 20), blob(1, 1, 9)], 2);
        commit(vec![], 1);
        assert_eq!(s.pending_deletes(10).expect("deletes"), vec![(f.ino, 1, 1)]);
        commit(vec![blob(1, 1, 7)], 2);
        assert!(s.pending_deletes(10).expect("deletes").is_empty());
        assert_eq!(s.blobs_of(f.ino).expect("blobs")[1], blob(1, 1, 7));
    }
}
