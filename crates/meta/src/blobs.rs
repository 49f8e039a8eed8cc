//! Blob bookkeeping for the object tier: which generation of each 64 MiB blob the object
//! store holds, which files await upload, and which objects await deletion.
//!
//! Invariant: an object key is queued for deletion only in the same transaction that commits
//! the generation replacing it (or purges its file), so the store never loses the newest
//! committed copy of a blob.

use crate::apply::Tx;
use crate::op::{BlobRecord, Outcome};
use crate::{Ino, Result};
use redb::ReadableTable;

impl Tx<'_, '_> {
    /// Queues for deletion every blob of `ino` with index `from` or above.
    pub(crate) fn retire_blobs(&mut self, ino: Ino, from: u64) -> Result<()> {
        let doomed: Vec<(u64, u64)> = self
            .blobs()?
            .range((ino, from)..=(ino, u64::MAX))?
            .map(|r| r.map(|(k, v)| (k.value().1, v.value().0)))
            .collect::<Result<_, _>>()?;
        for (k, generation) in doomed {
            self.blobs()?.remove((ino, k))?;
            self.chunks()?.remove((ino, k))?;
            self.evicted()?.remove((ino, k))?;
            self.deletes()?.insert((ino, k, generation), ())?;
        }
        Ok(())
    }

    pub(crate) fn commit_blobs(
        &mut self,
        ino: Ino,
        blobs: &[BlobRecord],
        blob_count: u64,
        clean: bool,
    ) -> Result<Outcome> {
        if self.inode(ino).is_err() {
            // Purged while uploading: the new objects are orphans; queue them for deletion.
            for b in blobs {
                self.deletes()?.insert((ino, b.k, b.generation), ())?;
            }
            return Ok(Outcome::Done);
        }
        for b in blobs {
            let old = self
                .blobs()?
                .insert((ino, b.k), (b.generation, b.len, b.crc32c))?
                .map(|v| v.value().0);
            if let Some(old_gen) = old
                && old_gen != b.generation
            {
                self.deletes()?.insert((ino, b.k, old_gen), ())?;
            }
            if b.chunks.is_empty() {
                self.chunks()?.remove((ino, b.k))?;
            } else {
                self.chunks()?.insert(
                    (ino, b.k),
                    crate::tables::encode_chunks(&b.chunks).as_slice(),
                )?;
            }
            // A new generation was read off flash, so it is present.
            self.evicted()?.remove((ino, b.k))?;
            // The key may be live again: a blob retired by a truncation and grown back gets
            // generation 1 anew. A key in `blobs` must never be on the delete queue.
            self.deletes()?.remove((ino, b.k, b.generation))?;
        }
        self.retire_blobs(ino, blob_count)?;
        if clean {
            self.dirty()?.remove(ino)?;
        }
        Ok(Outcome::Done)
    }

    /// Marks the blobs that may leave flash: committed at the given generation, of a clean
    /// file. A dirty file's flash copy may differ from what the store holds.
    pub(crate) fn evict(&mut self, ino: Ino, blobs: &[(u64, u64)]) -> Result<Outcome> {
        if self.dirty()?.get(ino)?.is_some() {
            return Ok(Outcome::Evicted(Vec::new()));
        }
        let mut marked = Vec::new();
        for &(k, generation) in blobs {
            let committed = self.blobs()?.get((ino, k))?.map(|v| v.value().0);
            if committed == Some(generation) {
                self.evicted()?.insert((ino, k), generation)?;
                marked.push(k);
            }
        }
        Ok(Outcome::Evicted(marked))
    }

    /// After the file became `size` bytes long: blobs that start at or past the end hold no
    /// data any more, so they are no longer "evicted". Left marked, a later write into that
    /// range would land on flash while the mark says the blob is in the store only, and the
    /// uploader (which skips evicted blobs) would never send it. Their records stay until the
    /// next upload retires them.
    pub(crate) fn forget_evicted_past(&mut self, ino: Ino, size: u64) -> Result<()> {
        let first_gone = size.div_ceil(crate::BLOB_SIZE);
        let gone: Vec<u64> = self
            .evicted()?
            .range((ino, first_gone)..=(ino, u64::MAX))?
            .map(|r| r.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()?;
        for k in gone {
            self.evicted()?.remove((ino, k))?;
        }
        Ok(())
    }
}
