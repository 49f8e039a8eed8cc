//! Which files an `fsync` may make durable without a commit of this store.
//!
//! An `fsync` of a file promises its name too, so while the file's creation is not durable
//! here the daemon would commit the store beside flushing the data: two device flushes where a
//! local filesystem needs one. When the only namespace changes not yet durable are creations
//! of regular files, each either already covered or the one being synced, the daemon instead
//! writes the create into the backing file's origin record (`cfs_flash::origin`), which the
//! file's own flush makes durable, and recovery after a crash creates the file again from it
//! ([`crate::MetaStore::recover_create`]). Anything else pending (a rename, an unlink, a
//! mkdir, a chmod, a second create not yet synced) takes the commit, so a recovered create
//! always lands in a namespace that is otherwise as durable as when its fsync returned.

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
    /// How many of `creates` are not covered yet: a loop of create and fsync covers
    /// thousands between two durable commits, and each fsync asks.
    uncovered: usize,
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
            match self.creates.insert(*ino, (record, false)) {
                Some((_, false)) => {}
                _ => self.uncovered += 1,
            }
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
        self.uncovered = 0;
        self.other = 0;
    }

    pub(crate) fn plan(&self, ino: Ino) -> FsyncPlan {
        let own = match self.creates.get(&ino) {
            Some((record, false)) => Some(record),
            _ => None,
        };
        if self.other > 0 || self.uncovered > usize::from(own.is_some()) {
            return FsyncPlan::Commit;
        }
        match own {
            Some(record) => FsyncPlan::Cover {
                record: record.clone(),
                epoch: self.epoch,
            },
            None => FsyncPlan::DataOnly,
        }
    }

    pub(crate) fn covered(&mut self, ino: Ino, epoch: u64) {
        if epoch == self.epoch
            && let Some((_, covered)) = self.creates.get_mut(&ino)
            && !*covered
        {
            *covered = true;
            self.uncovered -= 1;
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
    fn only_covered_creates_let_an_fsync_skip_the_commit() {
        let mut c = Covers::default();
        assert_eq!(c.plan(5), FsyncPlan::DataOnly, "nothing pending");
        c.note(&create(5, FileKind::File));
        let FsyncPlan::Cover { record, epoch } = c.plan(5) else {
            panic!("the file's own create is covered by its record");
        };
        assert_eq!(decode(5, &record), Some(create_like(&record)));
        c.note(&create(6, FileKind::File));
        assert_eq!(
            c.plan(5),
            FsyncPlan::Commit,
            "another create not yet covered"
        );
        c.covered(5, epoch);
        assert!(matches!(c.plan(6), FsyncPlan::Cover { .. }));
        assert_eq!(c.plan(7), FsyncPlan::Commit, "6 is not covered yet");
        c.covered(6, epoch);
        c.covered(6, epoch);
        assert_eq!(
            c.plan(5),
            FsyncPlan::DataOnly,
            "all creates covered (once counts)"
        );
        c.note(&create(8, FileKind::Dir));
        assert_eq!(c.plan(5), FsyncPlan::Commit, "a mkdir takes the commit");
        c.durable();
        assert_eq!(c.plan(5), FsyncPlan::DataOnly);
        c.note(&create(9, FileKind::File));
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
