//! The redb tables and the encoding of their values.
//!
//! | table      | key                  | value                           |
//! |------------|----------------------|---------------------------------|
//! | `inodes`   | ino                  | postcard-encoded [`Inode`]      |
//! | `dentries` | (parent, name)       | (ino, cookie, kind)             |
//! | `listing`  | (parent, cookie)     | ino, kind, name (see below)     |
//! | `xattrs`   | (ino, name)          | value                           |
//! | `orphans`  | ino                  | () — unlinked, still referenced |
//! | `super`    | key                  | bytes                           |
//! | `blobs`    | (ino, k)             | (generation, len, crc32c)       |
//! | `dirty`    | ino                  | () — written since last upload  |
//! | `deletes`  | (ino, k, generation) | () — object to DELETE           |
//! | `evicted`  | (ino, k)             | generation — not on flash       |
//! | `blob_chunks` | (ino, k)          | crc32c of each `BLOB_CHUNK`, u32 LE |
//! | `oplog`    | seq                  | postcard [`crate::Op`], not yet shipped |
//! | `log_segments` | first seq        | last seq — a shipped log segment |
//!
//! `listing` is the readdir order: cookies only grow, so a listing in progress is stable while
//! the directory changes.

use crate::{FileKind, Ino, Inode, MetaError, Result};
use redb::TableDefinition;

pub(crate) const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
pub(crate) const DENTRIES: TableDefinition<(u64, &[u8]), (u64, u64, u8)> =
    TableDefinition::new("dentries");
pub(crate) const LISTING: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("listing");
pub(crate) const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
pub(crate) const ORPHANS: TableDefinition<u64, ()> = TableDefinition::new("orphans");
pub(crate) const BLOBS: TableDefinition<(u64, u64), (u64, u64, u32)> =
    TableDefinition::new("blobs");
pub(crate) const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("blob_chunks");
pub(crate) const DIRTY: TableDefinition<u64, ()> = TableDefinition::new("dirty");
pub(crate) const DELETES: TableDefinition<(u64, u64, u64), ()> = TableDefinition::new("deletes");
pub(crate) const EVICTED: TableDefinition<(u64, u64), u64> = TableDefinition::new("evicted");
pub(crate) const OPLOG: TableDefinition<u64, &[u8]> = TableDefinition::new("oplog");
pub(crate) const LOG_SEGMENTS: TableDefinition<u64, u64> = TableDefinition::new("log_segments");
pub(crate) const SUPER: TableDefinition<&str, &[u8]> = TableDefinition::new("super");

pub(crate) const KEY_VERSION: &str = "format_version";
pub(crate) const KEY_FS_ID: &str = "fs_id";
pub(crate) const KEY_NEXT_INO: &str = "next_ino";
/// Every logged operation up to this sequence number has left the `oplog` table: shipped to
/// the object store, or covered by the checkpoint the store was imported from.
pub(crate) const KEY_LOG_BASE: &str = "log_base";

/// The xattr that pins a file's data on flash (`flash`), pushes it out (`s3`) or leaves it to
/// the watermarks (`auto`). New entries inherit their parent directory's value.
pub const TIER_XATTR: &[u8] = b"user.cfs.tier";

pub(crate) fn encode_inode(inode: &Inode) -> Result<Vec<u8>> {
    postcard::to_allocvec(inode).map_err(|e| MetaError::Corrupt(inode.ino, e.to_string()))
}

pub(crate) fn decode_inode(ino: Ino, bytes: &[u8]) -> Result<Inode> {
    postcard::from_bytes(bytes).map_err(|e| MetaError::Corrupt(ino, e.to_string()))
}

pub(crate) fn encode_chunks(crcs: &[u32]) -> Vec<u8> {
    crcs.iter().flat_map(|c| c.to_le_bytes()).collect()
}

pub(crate) fn decode_chunks(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub(crate) fn encode_listing(ino: Ino, kind: FileKind, name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + name.len());
    v.extend_from_slice(&ino.to_le_bytes());
    v.push(kind.to_u8());
    v.extend_from_slice(name);
    v
}

pub(crate) fn decode_listing(dir: Ino, bytes: &[u8]) -> Result<(Ino, FileKind, &[u8])> {
    let corrupt = || MetaError::Corrupt(dir, "bad listing entry".into());
    let ino_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(corrupt)?;
    let kind = bytes
        .get(8)
        .and_then(|k| FileKind::from_u8(*k))
        .ok_or_else(corrupt)?;
    Ok((u64::from_le_bytes(ino_bytes), kind, &bytes[9..]))
}
