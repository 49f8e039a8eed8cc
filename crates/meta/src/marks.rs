//! When each file was last queued for upload, in this process, so that the uploader can
//! tell whether a file was queued again while it was being uploaded.
//!
//! Why: the uploader's commit clears a file's upload mark. A `MarkDirty` applied between the
//! uploader's start and that commit stands for a change the upload may not hold (a rewrite
//! through the daemon may keep size and mtime, so the file itself cannot tell), and must
//! survive it. Numbers come from one counter, so "marked since" is one comparison; they
//! are not persisted, since only uploads running in this process ask.

use crate::Ino;
use std::collections::HashMap;

#[derive(Debug, Default)]
pub(crate) struct Marks {
    /// The number of the latest mark handed out.
    last: u64,
    /// The latest mark of each file marked since its last clean upload.
    of: HashMap<Ino, u64>,
}

impl Marks {
    pub(crate) fn mark(&mut self, ino: Ino) {
        self.last += 1;
        self.of.insert(ino, self.last);
    }

    pub(crate) fn last(&self) -> u64 {
        self.last
    }

    pub(crate) fn since(&self, ino: Ino, since: u64) -> bool {
        self.of.get(&ino).is_some_and(|&m| m > since)
    }

    /// Forgets `ino`'s mark if it is not newer than `upto`: an upload that started after it
    /// left the file clean.
    pub(crate) fn settle(&mut self, ino: Ino, upto: u64) {
        if self.of.get(&ino).is_some_and(|&m| m <= upto) {
            self.of.remove(&ino);
        }
    }

    pub(crate) fn forget(&mut self, ino: Ino) {
        self.of.remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::Marks;

    #[test]
    fn a_mark_after_the_start_is_seen_and_survives_settling() {
        let mut m = Marks::default();
        m.mark(7);
        let start = m.last();
        assert!(!m.since(7, start), "marked before the upload began");
        m.mark(7);
        assert!(m.since(7, start));
        assert!(!m.since(8, start), "another file");
        m.settle(7, start);
        assert!(m.since(7, start), "a newer mark is kept");
        m.settle(7, m.last());
        assert!(!m.since(7, 0), "settled");
        m.mark(9);
        m.forget(9);
        assert!(!m.since(9, 0));
    }
}
