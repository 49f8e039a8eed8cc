//! Which files an `fsync` may make durable without a commit of this store.
//!
//! An `fsync` of a file promises its name too, so while the file's creation is not durable
//! here the daemon would commit the store beside flushing the data: two device flushes where a
//! local filesystem needs one. When the namespace changes not yet durable are all creations of
//! regular files, the daemon instead writes the create of the file being synced into its
//! backing file's origin record (`cfs_flash::origin`), which the file's own flush makes
//! durable, and recovery after a crash creates the file again from it
//! ([`crate::MetaStore::recover_create`]).
//!
//! Other creates of regular files not yet synced do not stand in the way: each is independent
//! of the synced one (its own name, its own inode), and POSIX promises nothing for a file
//! until it is synced, so after a crash the synced file may come back without them, as on
//! btrfs. Requiring them made every `fsync` of writers working side by side take the commit,
//! whose flush holds every other metadata operation off. Anything else pending (a rename, an
//! unlink, a mkdir, a chmod) takes the commit, so a recovered create always lands in a
//! namespace whose other changes are as durable as when its fsync returned.

use std::collections::HashMap;

use crate::Ino;
use crate::op::Op;
use crate::types::FileKind;

/// What an `fsync` of a file needs beyond flushing its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsyncPlan {
    /// Nothing: every namespace change is durable, here or through origin records.
    DataOnly,
    /// Write `record` as the backing file's origin, flush the file (a full fsync: the record
    /// is inode metadata), then report it with [`crate::MetaStore::covered`].
    Cover { record: Vec<u8>, epoch: u64 },
    /// Commit the store durably beside the data's flush.
    Commit,
}

/// Namespace changes since the last durable commit.
#[derive(Default)]
pub(crate) struct Covers {
    /// Bumped by each durable commit, so a cover reported late is not taken for a newer one.
    epoch: u64,
    /// Regular files created since, each with its create (postcard) and whether an origin
    /// record made it durable.
    creates: HashMap<Ino, (Vec<u8>, bool)>,
    /// Other namespace changes since.
    other: u64,
}

/// The longest create record used; a longer one (a long symlink target cannot occur for a
/// regular file, but a long name with a large group list can) takes the commit instead.
const MAX_RECORD: usize = 768;

impl Covers {
    /// Notes an applied operation.
    pub(crate) fn note(&mut self, op: &Op) {
        if op.is_bookkeeping() {
            return;
        }
        if let Op::Create {
            ino,
            kind: FileKind::File,
            ..
        } = op
            && let Ok(record) = postcard::to_allocvec(op)
            && record.len() <= MAX_RECORD
        {
            self.creates.insert(*ino, (record, false));
            return;
        }
        self.other += 1;
    }

    /// Whether a namespace change is not durable in the store (covered creates included).
    pub(crate) fn pending(&self) -> bool {
        self.other > 0 || !self.creates.is_empty()
    }

    /// Everything applied so far is durable in the store.
    pub(crate) fn durable(&mut self) {
        self.epoch += 1;
        self.creates.clear();
        self.other = 0;
    }

    pub(crate) fn plan(&self, ino: Ino) -> FsyncPlan {
        if self.other > 0 {
            return FsyncPlan::Commit;
        }
        match self.creates.get(&ino) {
            Some((record, false)) => FsyncPlan::Cover {
                record: record.clone(),
                epoch: self.epoch,
            },
            _ => FsyncPlan::DataOnly,
        }
    }

    pub(crate) fn covered(&mut self, ino: Ino, epoch: u64) {
        if epoch == self.epoch
            && let Some((_, covered)) = self.creates.get_mut(&ino)
        {
            *covered = true;
        }
    }
}

/// The create in an origin record, if it is one for a regular file numbered `ino` (a backing
/// file reused from a deleted file keeps that file's record, under another number).
pub(crate) fn decode(ino: Ino, record: &[u8]) -> Option<Op> {
    match postcard::from_bytes::<Op>(record) {
        Ok(op @ Op::Create { .. }) if matches!(op, Op::Create { ino: i, kind: FileKind::File, .. } if i == ino) => {
            Some(op)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Caller;
    use crate::types::Timestamp;

    fn create(ino: Ino, kind: FileKind) -> Op {
        Op::Create {
            parent: 1,
            name: format!("f{ino}").into_bytes(),
            ino,
            kind,
            perm: 0o644,
            umask: 0o022,
            rdev: 0,
            target: Vec::new(),
            caller: Caller::default(),
            now: Timestamp::now(),
        }
    }

    #[test]
    fn only_other_namespace_changes_make_an_fsync_commit() {
        let mut c = Covers::default();
        assert_eq!(c.plan(5), FsyncPlan::DataOnly, "nothing pending");
        c.note(&create(5, FileKind::File));
        let FsyncPlan::Cover { record, epoch } = c.plan(5) else {
            panic!("the file's own create is covered by its record");
        };
        assert_eq!(decode(5, &record), Some(create_like(&record)));
        c.note(&create(6, FileKind::File));
        assert!(
            matches!(c.plan(5), FsyncPlan::Cover { .. }),
            "another file's create, not synced, is not owed"
        );
        c.covered(5, epoch);
        assert_eq!(c.plan(5), FsyncPlan::DataOnly, "5 is covered");
        assert!(matches!(c.plan(6), FsyncPlan::Cover { .. }));
        assert_eq!(c.plan(7), FsyncPlan::DataOnly, "not created since");
        c.note(&create(8, FileKind::Dir));
        assert_eq!(c.plan(5), FsyncPlan::Commit, "a mkdir takes the commit");
        c.durable();
        assert_eq!(c.plan(5), FsyncPlan::DataOnly);
        assert!(!c.pending());
        c.note(&create(9, FileKind::File));
        assert!(c.pending(), "a create, even covered, is in no commit yet");
        c.covered(9, epoch);
        assert!(
            matches!(c.plan(9), FsyncPlan::Cover { .. }),
            "a cover from before a durable commit counts for nothing after it"
        );
        c.note(&Op::MarkDirty { ino: 9 });
        assert!(
            matches!(c.plan(9), FsyncPlan::Cover { .. }),
            "bookkeeping is not namespace"
        );
    }

    fn create_like(record: &[u8]) -> Op {
        postcard::from_bytes(record).expect("a record decodes")
    }

    #[test]
    fn a_record_names_one_regular_file() {
        let record = postcard::to_allocvec(&create(5, FileKind::File)).expect("encode");
        assert!(decode(5, &record).is_some());
        assert!(
            decode(6, &record).is_none(),
            "a reused backing file's old record"
        );
        let dir = postcard::to_allocvec(&create(5, FileKind::Dir)).expect("encode");
        assert!(decode(5, &dir).is_none());
        assert!(decode(5, b"junk").is_none());
    }
}
