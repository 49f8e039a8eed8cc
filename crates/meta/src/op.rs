//! Metadata operations: the only way metadata changes.
//!
//! An operation carries everything its result depends on (the new inode number, the time, the
//! caller), so applying the same sequence of operations to the same state always gives the
//! same state. That is what lets one log of operations drive a single node directly, a Raft
//! group, and cross-site replication alike.

use crate::{FileKind, Ino, Timestamp};
use serde::{Deserialize, Serialize};

/// Who asked for an operation, as far as the result depends on it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups; filled in only when the outcome depends on them (set-gid rules).
    pub groups: Vec<u32>,
}

impl Caller {
    pub fn in_group(&self, gid: u32) -> bool {
        self.uid == 0 || self.gid == gid || self.groups.contains(&gid)
    }
}

/// What `rename` does when the destination exists.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    /// Replace the destination atomically (plain `rename(2)`).
    Replace,
    /// Fail with `Exists` (`RENAME_NOREPLACE`).
    NoReplace,
    /// Swap the two entries (`RENAME_EXCHANGE`).
    Exchange,
}

/// How `setxattr` treats an existing attribute.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    Upsert,
    /// `XATTR_CREATE`: fail if it exists.
    Create,
    /// `XATTR_REPLACE`: fail if it does not.
    Replace,
}

/// A change of attributes. `None` leaves a field as it is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create a file, directory, symlink or special file named `name` in `parent`.
    Create {
        parent: Ino,
        name: Vec<u8>,
        ino: Ino,
        kind: FileKind,
        /// Requested permission bits, before the umask or the parent's default ACL.
        perm: u32,
        umask: u32,
        rdev: u32,
        target: Vec<u8>,
        caller: Caller,
        now: Timestamp,
    },
    Link {
        ino: Ino,
        parent: Ino,
        name: Vec<u8>,
        now: Timestamp,
    },
    Unlink {
        parent: Ino,
        name: Vec<u8>,
        now: Timestamp,
    },
    Rmdir {
        parent: Ino,
        name: Vec<u8>,
        now: Timestamp,
    },
    Rename {
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        mode: RenameMode,
        now: Timestamp,
    },
    SetAttr {
        ino: Ino,
        attr: SetAttr,
        now: Timestamp,
    },
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        mode: XattrMode,
        caller: Caller,
        now: Timestamp,
    },
    RemoveXattr {
        ino: Ino,
        name: Vec<u8>,
        now: Timestamp,
    },
    /// Record the size and times the backing file holds, after writes that bypassed the daemon.
    SyncData {
        ino: Ino,
        size: u64,
        atime: Timestamp,
        mtime: Timestamp,
        ctime: Timestamp,
    },
    /// Delete an inode that has no links left and that the kernel has forgotten.
    Purge { ino: Ino },
    /// The file's data changed on flash and must be uploaded (the persistent upload queue).
    MarkDirty { ino: Ino },
    /// Record blobs uploaded for `ino`: each gets its new generation, and the generation it
    /// replaces goes to the delete queue. Blobs at index `blob_count` and beyond (the file
    /// shrank) are retired too. `clean` takes the file off the upload queue; it is false when
    /// the file changed while it was being uploaded.
    CommitBlobs {
        ino: Ino,
        blobs: Vec<BlobRecord>,
        blob_count: u64,
        clean: bool,
    },
    /// These objects were DELETEd from the object store: drop them from the delete queue.
    BlobsDeleted { blobs: Vec<(Ino, u64, u64)> },
    /// Record that blobs `(k, generation)` of `ino` are about to leave flash. Only blobs whose
    /// committed generation matches, of a file not on the upload queue, are marked: the
    /// outcome lists them, and only those may then be punched out of the backing file.
    Evict { ino: Ino, blobs: Vec<(u64, u64)> },
    /// Blob `k` at `generation` is back on flash (written and synced to the backing file).
    Hydrated { ino: Ino, k: u64, generation: u64 },
}

impl Op {
    /// True for an operation that only records what flash or the object store already hold:
    /// a backing file's size and times, the upload queue, uploaded, deleted, evicted or
    /// fetched blobs, an orphan purged. A crash that loses one is repaired without loss:
    /// recovery re-reads sizes and times from the backing files and queues changed files
    /// for upload, and orphans are purged at the next mount. An `fsync` therefore need not
    /// wait for these to be durable (see [`crate::MetaStore::sync_namespace`]).
    pub fn is_bookkeeping(&self) -> bool {
        matches!(
            self,
            Op::SyncData { .. }
                | Op::MarkDirty { .. }
                | Op::CommitBlobs { .. }
                | Op::BlobsDeleted { .. }
                | Op::Evict { .. }
                | Op::Hydrated { .. }
                | Op::Purge { .. }
        )
    }
}

/// One uploaded blob: index `k` of the file, at `generation`, with its length and checksum.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlobRecord {
    pub k: u64,
    pub generation: u64,
    pub len: u64,
    pub crc32c: u32,
    /// The crc32c of each [`crate::BLOB_CHUNK`] of the blob (the last one may be shorter),
    /// so that a ranged GET of whole pieces can be verified. Empty for a blob recorded
    /// without them: it is then only ever fetched whole.
    pub chunks: Vec<u32>,
}

/// What applying an operation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The inode created, linked or changed.
    Inode(crate::Inode),
    /// An entry went away. `orphaned` names an inode whose last link it was: it stays until
    /// the kernel forgets it, then it is purged.
    Removed {
        orphaned: Option<Ino>,
    },
    /// `Purge` removed this inode (if it was still there).
    Purged(Option<crate::Inode>),
    /// `Evict` marked these blob indices as evicted.
    Evicted(Vec<u64>),
    Done,
}
