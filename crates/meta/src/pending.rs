//! The write transaction that operations are applied into between commits.
//!
//! A redb commit costs far more than the changes it commits: `benches/ops.rs` measured a
//! create at 46-58 µs applied and committed alone, and 13 µs each when 16 share a commit.
//! Commits at `Durability::None`, which is all the request path makes, promise nothing a
//! later commit does not: a crash loses them either way, until the next durable commit
//! ([`crate::MetaStore::sync`]). So operations are applied into one open transaction, and it
//! is committed when someone needs it committed: a reader that needs a snapshot, a durable
//! sync, another kind of write, or [`MAX_OPS`] operations. The reads on the request path
//! (inodes, entries, xattrs) read through the open transaction instead.
//!
//! redb cannot roll back part of a transaction, and an operation can fail half-way (a
//! rename that finds its target directory not empty after removing the source entry, say).
//! So the batches applied are kept, and after a failure the transaction is thrown away and
//! they are applied again into a fresh one: operations carry everything their outcome
//! depends on, so they apply the same way again.
//!
//! The tables each operation uses stay open in the transaction until it commits (see
//! [`Tables`]): the transaction and its open tables live together in one [`Open`].

use crate::apply::{Tables, Tx};
use crate::op::{Op, Outcome};
use crate::{MetaError, Result};
use redb::{Database, Durability, WriteTransaction};

self_cell::self_cell!(
    /// A write transaction and the tables opened in it so far, which borrow it.
    pub(crate) struct Open {
        owner: WriteTransaction,
        #[not_covariant]
        dependent: Tables,
    }
);

/// Operations applied before the open transaction is committed anyway, which bounds the
/// memory it holds and the work to apply again after a failure.
pub(crate) const MAX_OPS: usize = 256;

/// An open transaction and what was applied into it.
pub(crate) struct Pending {
    open: Open,
    /// Each batch applied, with the log number a replayed operation had.
    applied: Vec<(Vec<Op>, Option<u64>)>,
    ops: usize,
}

/// What applying a batch gave: the outcomes, and the log number of each operation (`None`
/// for one not logged).
pub(crate) type Applied = (Vec<Outcome>, Vec<Option<u64>>);

impl Pending {
    pub(crate) fn begin(db: &Database) -> Result<Pending> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::None)?;
        Ok(Pending {
            open: Open::new(txn, |txn| Tables::new(txn)),
            applied: Vec::new(),
            ops: 0,
        })
    }

    pub(crate) fn ops(&self) -> usize {
        self.ops
    }

    /// Applies and logs `ops` as one batch. On an error the transaction holds part of the
    /// batch: call [`Pending::start_over`].
    pub(crate) fn apply(&mut self, ops: &[Op], replay: Option<u64>) -> Result<Applied> {
        let applied = self
            .open
            .with_dependent_mut(|_, tables| apply_into(tables, ops, replay))?;
        self.applied.push((ops.to_vec(), replay));
        self.ops += ops.len();
        Ok(applied)
    }

    /// Throws the transaction away, with part of a failed batch in it, and applies the
    /// batches that had succeeded into a fresh one. An error here means those are lost, and
    /// says so.
    pub(crate) fn start_over(self, db: &Database) -> Result<Pending> {
        let Pending { open, applied, ops } = self;
        open.into_owner().abort()?;
        let mut fresh = Pending::begin(db)?;
        for (batch, replay) in &applied {
            let again = fresh
                .open
                .with_dependent_mut(|_, tables| apply_into(tables, batch, *replay));
            again.map_err(|e| {
                tracing::error!(error = %e, "an operation applied before does not apply again");
                MetaError::Store(format!(
                    "operations applied before a failed one do not apply again: {e}"
                ))
            })?;
        }
        Ok(Pending {
            open: fresh.open,
            applied,
            ops,
        })
    }

    /// Commits everything applied, at `durability`. The tables are closed first, which
    /// writes their roots back into the transaction.
    pub(crate) fn commit(self, durability: Durability) -> Result<()> {
        let mut txn = self.open.into_owner();
        txn.set_durability(durability)?;
        txn.commit()?;
        Ok(())
    }

    /// Runs `read` on the transaction's tables: how the request path reads what was
    /// applied but not committed yet. Tables stay open, so a table opened here is not
    /// opened again by the next operation.
    pub(crate) fn read<R>(&mut self, read: impl FnOnce(&mut Tables<'_>) -> R) -> R {
        self.open.with_dependent_mut(|_, tables| read(tables))
    }
}

/// Applies and logs `ops` into the open transaction, in one state-machine transaction.
fn apply_into(tables: &mut Tables<'_>, ops: &[Op], replay: Option<u64>) -> Result<Applied> {
    let mut tx = Tx::open(tables);
    let outcomes = ops
        .iter()
        .map(|op| tx.apply(op))
        .collect::<Result<Vec<_>>>()?;
    tx.finish()?;
    let seqs = ops
        .iter()
        .map(|op| crate::oplog::record(tables, op, replay))
        .collect::<Result<Vec<_>>>()?;
    Ok((outcomes, seqs))
}
