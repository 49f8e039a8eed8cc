//! The operation log: every operation that matters beyond this node, in the order it was
//! applied, kept until it is shipped to the object store.
//!
//! A checkpoint is a cut of the whole store, published once a minute or so; the log is what
//! happened since. `cfs repair --from-s3` imports the newest checkpoint and then replays the
//! log segments after it through the same state machine. Operations carry everything their
//! outcome depends on (see [`Op`]), so the replay reproduces the store.
//!
//! Sequence numbers are dense: each logged operation gets the previous one plus one, in the
//! write transaction that applies it, so the log of a store is gap-free by construction.
//! Operations about this node's flash alone ([`Op::Evict`], [`Op::Hydrated`]) are not
//! logged: a repaired node has no flash copy of anything.
//!
//! Only operations that are durable here are shipped ([`MetaStore::log_pending`] stops at
//! [`MetaStore::log_durable_seq`]). A crash can take back operations that were not yet
//! durable, and the numbers they had are then given to others; shipping them first would
//! leave a log in the bucket that this node's history contradicts.
//!
//! A segment, the unit shipped (all integers little-endian):
//!
//! ```text
//! magic "CFSOPLG\n" | u32 LOG_VERSION | u32 metadata FORMAT_VERSION | u64 first seq
//! | u64 count | count × (u32 length, postcard Op) | u32 crc32c of every byte before it
//! ```

use crate::apply::Tables;
use crate::op::{Op, Outcome};
use crate::store::MetaStore;
use crate::tables::*;
use crate::{MetaError, Result};
use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};
use std::sync::atomic::Ordering;

/// The segment encoding this build writes and reads.
pub const LOG_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"CFSOPLG\n";
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8;

impl Op {
    /// Whether the operation goes to the log: everything but this node's flash bookkeeping.
    pub fn is_logged(&self) -> bool {
        !matches!(self, Op::Evict { .. } | Op::Hydrated { .. })
    }
}

fn log_base(sup: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<u64> {
    Ok(sup
        .get(KEY_LOG_BASE)?
        .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes))
        .unwrap_or(0))
}

/// The newest logged operation: the log's last entry, or, when everything was shipped (or
/// the store was imported), the base the log was trimmed to. Entries always lie above the
/// base, so the base is read only when the log is empty.
fn last_seq(
    log: &impl ReadableTable<u64, &'static [u8]>,
    sup: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64> {
    match log.last()? {
        Some((k, _)) => Ok(k.value()),
        None => log_base(sup),
    }
}

/// The newest logged operation's sequence number, as a read transaction sees it.
pub(crate) fn last_seq_read(read: &ReadTransaction) -> Result<u64> {
    last_seq(&read.open_table(OPLOG)?, &read.open_table(SUPER)?)
}

/// What a checkpoint taken in `read` covers of the log: the last sequence number in it, and
/// the first one not yet shipped (where a replay after it starts reading segments).
pub(crate) fn checkpoint_cut(read: &ReadTransaction) -> Result<(u64, u64)> {
    let last = last_seq_read(read)?;
    let log = read.open_table(OPLOG)?;
    let next = log.first()?.map_or(last + 1, |(k, _)| k.value());
    Ok((last, next))
}

/// Logs `op` in `txn`, after the state machine applied it. `replay` is the number it had in
/// the log it is replayed from: it must follow the store's last one, and it is not logged
/// again. Returns the number, or `None` for an operation that is not logged.
pub(crate) fn record(tables: &mut Tables<'_>, op: &Op, replay: Option<u64>) -> Result<Option<u64>> {
    if replay.is_none() && !op.is_logged() {
        return Ok(None);
    }
    // The super table is read only when it is needed: for the base of an empty log, and
    // for a replay, which moves the base.
    let newest = tables.oplog()?.last()?.map(|(k, _)| k.value());
    let last = match newest {
        Some(last) => last,
        None => log_base(tables.sup()?)?,
    };
    let seq = last + 1;
    match replay {
        None => {
            let bytes = postcard::to_allocvec(op)
                .map_err(|e| MetaError::Store(format!("encoding an operation for the log: {e}")))?;
            tables.oplog()?.insert(seq, bytes.as_slice())?;
        }
        Some(s) if s == seq => {
            tables
                .sup()?
                .insert(KEY_LOG_BASE, seq.to_le_bytes().as_slice())?;
        }
        Some(s) => {
            return Err(MetaError::Store(format!(
                "operation {s} does not follow operation {last}, the last one applied"
            )));
        }
    }
    Ok(Some(seq))
}

/// One decoded log segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSegment {
    pub first: u64,
    pub ops: Vec<Op>,
}

impl LogSegment {
    /// The sequence number of the last operation (`first - 1` for an empty segment).
    pub fn last(&self) -> u64 {
        self.first + self.ops.len() as u64 - 1
    }
}

/// Encodes entries read by [`MetaStore::log_pending`] (consecutive numbers) as a segment.
pub fn encode_log_segment(entries: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let first = entries.first().map_or(0, |e| e.0);
    let len: usize = entries.iter().map(|e| 4 + e.1.len()).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + len + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&LOG_VERSION.to_le_bytes());
    out.extend_from_slice(&crate::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (_, op) in entries {
        out.extend_from_slice(&(op.len() as u32).to_le_bytes());
        out.extend_from_slice(op);
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn bad_segment(why: impl std::fmt::Display) -> MetaError {
    MetaError::Store(format!("the log segment is corrupt: {why}"))
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if rest.len() < n {
        return Err(bad_segment("it ends early"));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_u64(rest: &mut &[u8]) -> Result<u64> {
    let b = take(rest, 8)?;
    Ok(u64::from_le_bytes(b.try_into().map_err(bad_segment)?))
}

fn take_u32(rest: &mut &[u8]) -> Result<u32> {
    let b = take(rest, 4)?;
    Ok(u32::from_le_bytes(b.try_into().map_err(bad_segment)?))
}

/// Checks and decodes a segment. Nothing of a damaged one is returned.
pub fn decode_log_segment(bytes: &[u8]) -> Result<LogSegment> {
    if bytes.len() < HEADER_LEN + 4 {
        return Err(bad_segment(format_args!("only {} bytes", bytes.len())));
    }
    let (data, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(crc.try_into().map_err(bad_segment)?);
    if crc32c::crc32c(data) != stored {
        return Err(bad_segment("checksum mismatch"));
    }
    let mut rest = data;
    if take(&mut rest, 8)? != MAGIC {
        return Err(bad_segment("not a ClaudeFS log segment"));
    }
    let version = take_u32(&mut rest)?;
    if version != LOG_VERSION {
        return Err(bad_segment(format_args!(
            "encoding version {version} (this build reads {LOG_VERSION})"
        )));
    }
    let format = take_u32(&mut rest)?;
    if format != crate::FORMAT_VERSION {
        return Err(MetaError::Version {
            found: format,
            expected: crate::FORMAT_VERSION,
        });
    }
    let first = take_u64(&mut rest)?;
    let count = take_u64(&mut rest)?;
    if first == 0 || count == 0 {
        return Err(bad_segment("it holds no operations"));
    }
    let mut ops = Vec::with_capacity(count.min(1 << 16) as usize);
    for i in 0..count {
        let len = take_u32(&mut rest)? as usize;
        let body = take(&mut rest, len)?;
        let op = postcard::from_bytes(body)
            .map_err(|e| bad_segment(format_args!("operation {}: {e}", first + i)))?;
        ops.push(op);
    }
    if !rest.is_empty() {
        return Err(bad_segment(format_args!(
            "{} bytes after the last operation",
            rest.len()
        )));
    }
    Ok(LogSegment { first, ops })
}

impl MetaStore {
    /// The newest logged operation known durable on this node: what may be shipped.
    pub fn log_durable_seq(&self) -> u64 {
        self.durable_seq.load(Ordering::Acquire)
    }

    /// The newest logged operation.
    pub fn log_applied_seq(&self) -> u64 {
        self.applied_seq.load(Ordering::Acquire)
    }

    /// The oldest unshipped operations, encoded, up to number `upto` and at most `max_ops`
    /// of them or (past the first) `max_bytes` in all.
    pub fn log_pending(
        &self,
        upto: u64,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let read = self.read_txn()?;
        let log = read.open_table(OPLOG)?;
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut bytes = 0;
        for r in log.range(..=upto)? {
            let (k, v) = r?;
            let v = v.value();
            if out.len() >= max_ops || (!out.is_empty() && bytes + v.len() > max_bytes) {
                break;
            }
            bytes += v.len();
            out.push((k.value(), v.to_vec()));
        }
        Ok(out)
    }

    /// Operations not yet shipped.
    pub fn log_backlog(&self) -> Result<u64> {
        let read = self.read_txn()?;
        Ok(read.open_table(OPLOG)?.len()?)
    }

    /// Records that operations `first..=last` are in the object store, as the segment named
    /// by `first`, and drops them from the log. Not a change to the filesystem: it is not
    /// counted by [`MetaStore::change_count`]. It becomes durable with the next
    /// [`MetaStore::sync`]; a crash before that ships the same segment again, which is
    /// harmless. A checkpoint syncs before its HEAD is written, so no HEAD ever points past
    /// a trim that a crash could undo.
    pub fn log_shipped(&self, first: u64, last: u64) -> Result<()> {
        let _exclusive = self.exclusive()?;
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        {
            let mut log = txn.open_table(OPLOG)?;
            log.retain_in(..=last, |_, _| false)?;
            let mut sup = txn.open_table(SUPER)?;
            if log_base(&sup)? < last {
                sup.insert(KEY_LOG_BASE, last.to_le_bytes().as_slice())?;
            }
            txn.open_table(LOG_SEGMENTS)?.insert(first, last)?;
        }
        txn.commit()?;
        self.committed.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Shipped segments `(first, last)` that hold nothing at or after `next`: a checkpoint
    /// whose replay starts at `next` no longer needs them.
    pub fn log_segments_before(&self, next: u64) -> Result<Vec<(u64, u64)>> {
        let read = self.read_txn()?;
        let segs = read.open_table(LOG_SEGMENTS)?;
        let mut out = Vec::new();
        for r in segs.iter()? {
            let (first, last) = r?;
            if last.value() < next {
                out.push((first.value(), last.value()));
            }
        }
        Ok(out)
    }

    /// Forgets shipped segments (after they were DELETEd from the object store).
    pub fn forget_log_segments(&self, firsts: &[u64]) -> Result<()> {
        let _exclusive = self.exclusive()?;
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        {
            let mut segs = txn.open_table(LOG_SEGMENTS)?;
            for first in firsts {
                segs.remove(first)?;
            }
        }
        txn.commit()?;
        self.committed.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Applies operation `seq` of a shipped log (`cfs repair --from-s3`). It must follow the
    /// last operation this store holds, and it is not logged again.
    pub fn replay(&self, seq: u64, op: &Op) -> Result<Outcome> {
        self.apply_op(op, Some(seq))
    }
}
