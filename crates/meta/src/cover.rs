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
//! whose flush holds every other metadata operation off.
//!
//! Two more changes ride in records, because a database in its default rollback-journal mode
//! makes them in every transaction: it creates its journal, sets the journal's owner to the
//! database's (`fchown`), syncs it, and unlinks it at the commit, and the next transaction
//! creates a journal of the same name. So:
//! - an attribute change (`chown`, `chmod`, `truncate`) of a file whose create is pending goes
//!   into that file's record after its create, and recovery applies both;
//! - the unlink of a file's last link is pending only until a file of the same name in the
//!   same directory is covered: recovery keeps, of the records naming one entry, the newest
//!   (by log number), since a name is only free again once its previous file left it; and
//!   where the store holds the unlinked file (its create was committed, as the periodic
//!   commit does to whichever journal exists at that moment), the record lists it, and
//!   recovery unlinks it before the create.
//!
//! Anything else pending (a rename, a link, a mkdir, an xattr, or an unlink no newer record
//! of its name answers) takes the commit, so a recovered
//! create always lands in a namespace whose other changes are as durable as when its fsync
//! returned. A record whose create is already in the durable store (its log number is not
//! above the store's) is stale: its file was deleted since, and recovery drops it.

use std::collections::HashMap;

use crate::Ino;
use crate::op::{Op, Outcome};
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

/// A regular file created since the last durable commit.
struct Created {
    parent: Ino,
    name: Vec<u8>,
    /// The log number of its create.
    seq: u64,
    /// Its create, then the attribute changes made to it since.
    ops: Vec<Op>,
    /// Whether a record of all of `ops` is durable in its backing file.
    covered: bool,
    /// Whether a record was handed out for it: one may be in its backing file.
    recorded: bool,
}

/// Namespace changes since the last durable commit.
#[derive(Default)]
pub(crate) struct Covers {
    /// Bumped by each durable commit, so a cover reported late is not taken for a newer one.
    epoch: u64,
    /// Regular files created since.
    creates: HashMap<Ino, Created>,
    /// Files unlinked since that a record may name or the store holds.
    unlinked: Vec<Unlinked>,
    /// Other namespace changes since.
    other: u64,
}

/// The unlink of a file's last link, pending.
struct Unlinked {
    /// Its directory and name.
    parent: Ino,
    name: Vec<u8>,
    /// The file, if the store holds it: every later record of the entry lists it, and
    /// recovery unlinks it again before its create.
    held: Option<Ino>,
    /// Whether a newer record of the entry is durable, which answers for the unlink.
    answered: bool,
}

impl Unlinked {
    fn of(&self, parent: Ino, name: &[u8]) -> bool {
        self.parent == parent && self.name == name
    }
}

/// The longest record used; a longer one (a long name with a large group list, or many
/// attribute changes) takes the commit instead.
const MAX_RECORD: usize = 768;

/// Most unlinks waiting for a record of their name; past it, the commit.
const MAX_UNLINKED: usize = 64;

/// The first byte of a record in this encoding. A record of the first encoding, a bare
/// postcard [`Op::Create`], starts with that variant's index, 0.
const RECORD_TAG: u8 = 0xC2;

/// What a record holds: the create's log number, the files its entry held that were
/// unlinked before it, and the operations that make the file.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record<'a> {
    seq: u64,
    replaces: std::borrow::Cow<'a, [Ino]>,
    ops: std::borrow::Cow<'a, [Op]>,
}

/// A decoded origin record: how recovery makes its file again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The create's log number; `None` in a record of the first encoding, which carried
    /// none (always taken as not stale).
    pub seq: Option<u64>,
    /// Files that the create's entry held in the store and that were unlinked before it:
    /// recovery unlinks each first if the entry still holds it.
    pub replaces: Vec<Ino>,
    /// [`Op::Create`] first, then attribute changes of the same file.
    pub ops: Vec<Op>,
}

impl Origin {
    /// The directory and name its create gives the file.
    pub fn entry(&self) -> (Ino, &[u8]) {
        match self.ops.first() {
            Some(Op::Create { parent, name, .. }) => (*parent, name),
            _ => (0, &[]),
        }
    }
}

impl Covers {
    /// Notes an applied operation, with what it did and its log number.
    pub(crate) fn note(&mut self, op: &Op, outcome: &Outcome, seq: Option<u64>) {
        // Once something takes the commit, every fsync does until it is made, and it makes
        // all of this durable: nothing more to track (`rm -rf` of committed files would
        // otherwise list every name).
        if op.is_bookkeeping() || self.other > 0 {
            return;
        }
        match (op, outcome, seq) {
            (
                Op::Create {
                    ino,
                    kind: FileKind::File,
                    parent,
                    name,
                    ..
                },
                _,
                Some(seq),
            ) => {
                self.creates.insert(
                    *ino,
                    Created {
                        parent: *parent,
                        name: name.clone(),
                        seq,
                        ops: vec![op.clone()],
                        covered: false,
                        recorded: false,
                    },
                );
            }
            (Op::SetAttr { ino, .. }, _, _) => match self.creates.get_mut(ino) {
                Some(c) => {
                    c.ops.push(op.clone());
                    c.covered = false;
                }
                None => self.other += 1,
            },
            (
                Op::Unlink { parent, name, .. },
                Outcome::Removed {
                    orphaned: Some(ino),
                },
                _,
            ) => {
                let held = match self.creates.remove(ino) {
                    // A record of it may exist only if one was handed out.
                    Some(c) if !c.recorded => return,
                    Some(_) => None,
                    // Created before the last durable commit: the store holds it.
                    None => Some(*ino),
                };
                self.unlinked.push(Unlinked {
                    parent: *parent,
                    name: name.clone(),
                    held,
                    answered: false,
                });
                if self.unlinked.len() > MAX_UNLINKED {
                    self.other += 1;
                }
            }
            _ => self.other += 1,
        }
    }

    /// Whether every namespace change is durable, in the store or through records: what a
    /// directory's `fsync` needs.
    pub(crate) fn namespace_durable(&self) -> bool {
        self.other == 0 && self.unlinks_answered() && self.creates.values().all(|c| c.covered)
    }

    /// Whether a newer durable record answers every pending unlink.
    fn unlinks_answered(&self) -> bool {
        self.unlinked.iter().all(|u| u.answered)
    }

    /// Everything applied so far is durable in the store.
    pub(crate) fn durable(&mut self) {
        self.epoch += 1;
        self.creates.clear();
        self.unlinked.clear();
        self.other = 0;
    }

    pub(crate) fn plan(&mut self, ino: Ino) -> FsyncPlan {
        if self.other > 0 {
            return FsyncPlan::Commit;
        }
        let Some(c) = self.creates.get_mut(&ino).filter(|c| !c.covered) else {
            return if self.unlinks_answered() {
                FsyncPlan::DataOnly
            } else {
                FsyncPlan::Commit
            };
        };
        // Only unlinks of this file's own entry: its record answers them.
        if self
            .unlinked
            .iter()
            .any(|u| !u.answered && !u.of(c.parent, &c.name))
        {
            return FsyncPlan::Commit;
        }
        let replaces: Vec<Ino> = self
            .unlinked
            .iter()
            .filter(|u| u.of(c.parent, &c.name))
            .filter_map(|u| u.held)
            .collect();
        let Some(record) = encode(c.seq, &replaces, &c.ops).filter(|r| r.len() <= MAX_RECORD)
        else {
            return FsyncPlan::Commit;
        };
        c.recorded = true;
        FsyncPlan::Cover {
            record,
            epoch: self.epoch,
        }
    }

    pub(crate) fn covered(&mut self, ino: Ino, epoch: u64) {
        if epoch != self.epoch {
            return;
        }
        if let Some(c) = self.creates.get_mut(&ino) {
            c.covered = true;
            // Answered; one the store holds stays, for the later records of the entry.
            self.unlinked.retain_mut(|u| {
                if !u.of(c.parent, &c.name) {
                    return true;
                }
                u.answered = true;
                u.held.is_some()
            });
        }
    }
}

fn encode(seq: u64, replaces: &[Ino], ops: &[Op]) -> Option<Vec<u8>> {
    let record = Record {
        seq,
        replaces: std::borrow::Cow::Borrowed(replaces),
        ops: std::borrow::Cow::Borrowed(ops),
    };
    let out = vec![RECORD_TAG];
    postcard::to_extend(&record, out).ok()
}

/// The record of a regular file numbered `ino`, if `record` is one (a backing file reused
/// from a deleted file keeps that file's record, under another number).
pub fn decode_origin(ino: Ino, record: &[u8]) -> Option<Origin> {
    let origin = match record.split_first() {
        Some((&RECORD_TAG, rest)) => {
            let r: Record<'_> = postcard::from_bytes(rest).ok()?;
            Origin {
                seq: Some(r.seq),
                replaces: r.replaces.into_owned(),
                ops: r.ops.into_owned(),
            }
        }
        _ => Origin {
            seq: None,
            replaces: Vec::new(),
            ops: vec![postcard::from_bytes::<Op>(record).ok()?],
        },
    };
    let mut ops = origin.ops.iter();
    let is_file = matches!(
        ops.next(),
        Some(Op::Create { ino: i, kind: FileKind::File, .. }) if *i == ino
    );
    let same_file = ops.all(|op| matches!(op, Op::SetAttr { ino: i, .. } if *i == ino));
    (is_file && same_file).then_some(origin)
}

/// Of the records `(ino, record)` found in backing files that no inode of the store owns,
/// the files to create again, in the order their creates were applied, and the inodes whose
/// records are to be dropped: stale ones (their create is in the store, which holds
/// operations up to `durable_seq`, so the file was deleted since) and older records of an
/// entry a newer record names.
pub fn recoverable(
    records: Vec<(Ino, Origin)>,
    durable_seq: u64,
) -> (Vec<(Ino, Origin)>, Vec<Ino>) {
    let mut dropped = Vec::new();
    let mut newest: HashMap<(Ino, Vec<u8>), (Ino, Origin)> = HashMap::new();
    for (ino, origin) in records {
        if origin.seq.is_some_and(|s| s <= durable_seq) {
            dropped.push(ino);
            continue;
        }
        let (parent, name) = origin.entry();
        let key = (parent, name.to_vec());
        match newest.remove(&key) {
            Some(old) if old.1.seq >= origin.seq => {
                dropped.push(ino);
                newest.insert(key, old);
            }
            Some(old) => {
                dropped.push(old.0);
                newest.insert(key, (ino, origin));
            }
            None => {
                newest.insert(key, (ino, origin));
            }
        }
    }
    let mut keep: Vec<(Ino, Origin)> = newest.into_values().collect();
    keep.sort_by_key(|(ino, o)| (o.seq, *ino));
    dropped.sort_unstable();
    (keep, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Caller;
    use crate::types::Timestamp;

    fn create(ino: Ino, kind: FileKind) -> Op {
        create_named(ino, kind, &format!("f{ino}"))
    }

    fn create_named(ino: Ino, kind: FileKind, name: &str) -> Op {
        Op::Create {
            parent: 1,
            name: name.as_bytes().to_vec(),
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

    fn chown(ino: Ino) -> Op {
        Op::SetAttr {
            ino,
            attr: crate::SetAttr {
                uid: Some(0),
                gid: Some(0),
                ..Default::default()
            },
            now: Timestamp::now(),
        }
    }

    fn unlink(name: &str) -> Op {
        Op::Unlink {
            parent: 1,
            name: name.as_bytes().to_vec(),
            now: Timestamp::now(),
        }
    }

    fn gone(ino: Ino) -> Outcome {
        Outcome::Removed {
            orphaned: Some(ino),
        }
    }

    /// Notes `op` as applied with log number `seq` and outcome `Done`.
    fn note(c: &mut Covers, op: &Op, seq: u64) {
        c.note(op, &Outcome::Done, Some(seq));
    }

    fn cover(c: &mut Covers, ino: Ino) -> Vec<u8> {
        match c.plan(ino) {
            FsyncPlan::Cover { record, epoch } => {
                c.covered(ino, epoch);
                record
            }
            other => panic!("expected a cover of {ino}, got {other:?}"),
        }
    }

    #[test]
    fn only_other_namespace_changes_make_an_fsync_commit() {
        let mut c = Covers::default();
        assert_eq!(c.plan(5), FsyncPlan::DataOnly, "nothing pending");
        note(&mut c, &create(5, FileKind::File), 1);
        let FsyncPlan::Cover { record, epoch } = c.plan(5) else {
            panic!("the file's own create is covered by its record");
        };
        let origin = decode_origin(5, &record).expect("decodes");
        assert_eq!((origin.seq, origin.ops.len()), (Some(1), 1));
        note(&mut c, &create(6, FileKind::File), 2);
        assert!(
            matches!(c.plan(5), FsyncPlan::Cover { .. }),
            "another file's create, not synced, is not owed"
        );
        assert!(!c.namespace_durable(), "5 is not covered yet");
        c.covered(5, epoch);
        assert_eq!(c.plan(5), FsyncPlan::DataOnly, "5 is covered");
        assert!(matches!(c.plan(6), FsyncPlan::Cover { .. }));
        assert_eq!(c.plan(7), FsyncPlan::DataOnly, "not created since");
        assert!(!c.namespace_durable(), "6 is not covered");
        c.covered(6, epoch);
        assert!(c.namespace_durable(), "every create is covered");
        note(&mut c, &create(8, FileKind::Dir), 3);
        assert_eq!(c.plan(5), FsyncPlan::Commit, "a mkdir takes the commit");
        assert!(!c.namespace_durable());
        c.durable();
        assert_eq!(c.plan(5), FsyncPlan::DataOnly);
        assert!(c.namespace_durable());
        note(&mut c, &create(9, FileKind::File), 4);
        assert!(!c.namespace_durable(), "a create is in no commit yet");
        c.covered(9, epoch);
        assert!(
            matches!(c.plan(9), FsyncPlan::Cover { .. }),
            "a cover from before a durable commit counts for nothing after it"
        );
        c.note(&Op::MarkDirty { ino: 9 }, &Outcome::Done, Some(5));
        assert!(
            matches!(c.plan(9), FsyncPlan::Cover { .. }),
            "bookkeeping is not namespace"
        );
    }

    /// A database's rollback journal: create, `fchown`, fsync, unlink at the commit, and the
    /// next transaction's journal of the same name.
    #[test]
    fn a_journal_made_and_unlinked_in_every_transaction_never_takes_the_commit() {
        let mut c = Covers::default();
        let mut seq = 0;
        let mut next = || {
            seq += 1;
            seq
        };
        for ino in 10..20 {
            note(
                &mut c,
                &create_named(ino, FileKind::File, "db-journal"),
                next(),
            );
            note(&mut c, &chown(ino), next());
            let record = cover(&mut c, ino);
            let origin = decode_origin(ino, &record).expect("decodes");
            assert_eq!(origin.ops.len(), 2, "the chown rides in the record");
            assert_eq!(origin.entry(), (1, &b"db-journal"[..]));
            assert!(c.namespace_durable(), "a directory fsync owes nothing");
            assert_eq!(c.plan(ino), FsyncPlan::DataOnly, "a second fsync");
            c.note(&unlink("db-journal"), &gone(ino), Some(next()));
            assert!(
                !c.namespace_durable(),
                "the unlink waits for a newer record"
            );
            assert_eq!(c.plan(99), FsyncPlan::Commit, "an fsync of another file");
        }
        assert_eq!(c.other, 0);
    }

    /// The periodic commit makes whichever journal exists at that moment durable in the
    /// store; its unlink then rides in the records of the journals after it.
    #[test]
    fn a_journal_the_store_holds_is_replaced_through_the_records_after_it() {
        let mut c = Covers::default();
        note(&mut c, &create_named(10, FileKind::File, "db-journal"), 1);
        cover(&mut c, 10);
        c.durable();
        c.note(&unlink("db-journal"), &gone(10), Some(2));
        assert!(!c.namespace_durable(), "the store still holds 10");
        assert_eq!(
            c.plan(99),
            FsyncPlan::Commit,
            "no record answers for it yet"
        );
        note(&mut c, &create_named(11, FileKind::File, "db-journal"), 3);
        let record = cover(&mut c, 11);
        let origin = decode_origin(11, &record).expect("decodes");
        assert_eq!(origin.replaces, vec![10], "11's record unlinks 10 again");
        assert!(c.namespace_durable());
        c.note(&unlink("db-journal"), &gone(11), Some(4));
        note(&mut c, &create_named(12, FileKind::File, "db-journal"), 5);
        let record = cover(&mut c, 12);
        let origin = decode_origin(12, &record).expect("decodes");
        assert_eq!(
            origin.replaces,
            vec![10],
            "the newest record carries every unlink the store has not seen"
        );
        assert_eq!(c.other, 0);
    }

    #[test]
    fn changes_no_record_answers_take_the_commit() {
        // The unlink of a file whose record was never handed out needs no answer.
        let mut c = Covers::default();
        note(&mut c, &create(5, FileKind::File), 1);
        c.note(&unlink("f5"), &gone(5), Some(2));
        assert!(c.namespace_durable(), "no record of 5 can exist");
        assert_eq!(c.plan(6), FsyncPlan::DataOnly);

        // A recorded file unlinked: a new file of another name does not answer for it.
        note(&mut c, &create(7, FileKind::File), 3);
        cover(&mut c, 7);
        c.note(&unlink("f7"), &gone(7), Some(4));
        note(&mut c, &create(8, FileKind::File), 5);
        assert_eq!(c.plan(8), FsyncPlan::Commit);
        c.durable();
        assert!(c.namespace_durable());

        // The unlink of a file created before the last durable commit waits for a record
        // of its entry too.
        c.note(&unlink("f8"), &gone(8), Some(6));
        assert_eq!(c.plan(9), FsyncPlan::Commit);
        assert!(!c.namespace_durable());
        c.durable();

        // A last link going while another stays is a link count change: commit.
        note(&mut c, &create(9, FileKind::File), 7);
        c.note(&unlink("f9"), &Outcome::Removed { orphaned: None }, Some(8));
        assert_eq!(c.plan(9), FsyncPlan::Commit);
        c.durable();

        // Attribute changes past the record's room.
        note(&mut c, &create(10, FileKind::File), 9);
        for _ in 0..40 {
            note(&mut c, &chown(10), 10);
        }
        assert_eq!(
            c.plan(10),
            FsyncPlan::Commit,
            "the record would be too long"
        );

        // Unlinks past the list's room: files of one name, each unlinked while its fsync
        // (which handed out its record) has not reported the record durable.
        let mut c = Covers::default();
        for ino in 100..=100 + MAX_UNLINKED as u64 {
            note(&mut c, &create_named(ino, FileKind::File, "j"), ino);
            assert!(matches!(c.plan(ino), FsyncPlan::Cover { .. }), "{ino}");
            c.note(&unlink("j"), &gone(ino), Some(ino));
        }
        assert_eq!(c.plan(200), FsyncPlan::Commit);
        assert!(c.other > 0);
    }

    #[test]
    fn a_record_names_one_regular_file() {
        let first = postcard::to_allocvec(&create(5, FileKind::File)).expect("encode");
        let old = decode_origin(5, &first).expect("the first encoding still decodes");
        assert_eq!(old.seq, None);
        let record = encode(7, &[3], &[create(5, FileKind::File), chown(5)]).expect("encode");
        let origin = decode_origin(5, &record).expect("decodes");
        assert_eq!((origin.seq, origin.replaces), (Some(7), vec![3]));
        assert!(
            decode_origin(6, &record).is_none(),
            "a reused backing file's old record"
        );
        let dir = encode(7, &[], &[create(5, FileKind::Dir)]).expect("encode");
        assert!(decode_origin(5, &dir).is_none());
        let other = encode(7, &[], &[create(5, FileKind::File), chown(6)]).expect("encode");
        assert!(decode_origin(5, &other).is_none(), "another file's change");
        assert!(decode_origin(5, b"junk").is_none());
        assert!(decode_origin(5, &[RECORD_TAG, 1, 2]).is_none());
    }

    #[test]
    fn recovery_keeps_the_newest_record_of_an_entry_and_drops_stale_ones() {
        let origin = |ino: Ino, name: &str, seq: Option<u64>| {
            (
                ino,
                Origin {
                    seq,
                    replaces: Vec::new(),
                    ops: vec![create_named(ino, FileKind::File, name)],
                },
            )
        };
        let (keep, dropped) = recoverable(
            vec![
                origin(12, "db-journal", Some(30)),
                origin(10, "db-journal", Some(10)),
                origin(11, "db-journal", Some(20)),
                origin(3, "old", Some(5)),
                origin(4, "first-encoding", None),
                origin(13, "mail", Some(25)),
            ],
            6,
        );
        let kept: Vec<Ino> = keep.iter().map(|(ino, _)| *ino).collect();
        assert_eq!(kept, vec![4, 13, 12], "in the order of their creates");
        assert_eq!(
            dropped,
            vec![3, 10, 11],
            "stale (its create is durable), and replaced"
        );
    }
}
