//! `user.cfs.tier` set on a directory reaches what is already under it.
//!
//! New entries inherit the policy from their parent when they are created (the state machine
//! copies it). That alone would leave the files already in a directory untouched, and
//! `setfattr -n user.cfs.tier -v s3 /mnt/archive` is meant to push the archive out. So the
//! daemon walks the subtree and sets the same value on every directory and regular file in it
//! that the caller owns (all of them for root), as `chmod -R` would: ownership stands in for
//! the write permission the kernel checked on the top directory only. Symbolic links and
//! special files carry no user xattrs and are skipped.
//!
//! Each entry is its own logged `SetXattr` operation, so a repair from the operation log
//! replays the walk exactly; they are committed in batches, as one transaction each.

use cfs_meta::{Caller, FileKind, Ino, MetaStore, Op, Result, Timestamp, XattrMode};

/// Operations per transaction.
const BATCH: usize = 256;
/// Directory entries read per listing call.
const PAGE: usize = 1024;

/// Sets `value` as the tier policy of everything under `dir` that `caller` owns. Returns the
/// regular files it changed, which the tier must look at again (an `s3` file may now go).
pub fn apply_below(
    meta: &MetaStore,
    dir: Ino,
    value: &[u8],
    caller: &Caller,
    now: Timestamp,
) -> Result<Vec<Ino>> {
    let mut files = Vec::new();
    let mut ops = Vec::with_capacity(BATCH);
    let mut pending = vec![dir];
    while let Some(d) = pending.pop() {
        let mut after = 0;
        loop {
            let page = meta.readdir(d, after, PAGE, true)?;
            let Some((last, _)) = page.last() else { break };
            after = last.cookie;
            for (entry, inode) in page {
                let Some(inode) = inode else { continue };
                if caller.uid != 0 && caller.uid != inode.uid {
                    continue;
                }
                match inode.kind {
                    FileKind::Dir => pending.push(entry.ino),
                    FileKind::File => files.push(entry.ino),
                    _ => continue,
                }
                ops.push(Op::SetXattr {
                    ino: entry.ino,
                    name: cfs_meta::TIER_XATTR.to_vec(),
                    value: value.to_vec(),
                    mode: XattrMode::Upsert,
                    caller: caller.clone(),
                    now,
                });
                if ops.len() == BATCH {
                    meta.execute_batch(&ops)?;
                    ops.clear();
                }
            }
        }
    }
    if !ops.is_empty() {
        meta.execute_batch(&ops)?;
    }
    Ok(files)
}
