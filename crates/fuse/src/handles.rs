//! Open file handles and the passthrough backing ids they share.
//!
//! The kernel requires every passthrough open of one inode to use the same backing id, so ids
//! are kept per inode (weakly) and each handle holds a strong reference until `release`.

use dashmap::DashMap;
use fuser::BackingId;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

pub struct Handle {
    pub ino: u64,
    pub file: File,
    pub writable: bool,
    /// Set once the daemon path wrote through this handle.
    pub written: AtomicBool,
    /// Keeps the kernel's backing id alive while the handle is open.
    pub backing: Option<Arc<BackingId>>,
}

#[derive(Default)]
pub struct Handles {
    next: AtomicU64,
    open: DashMap<u64, Arc<Handle>>,
    backing: DashMap<u64, Weak<BackingId>>,
}

impl Handles {
    pub fn insert(&self, handle: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.open.insert(fh, Arc::new(handle));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<Handle>> {
        self.open.get(&fh).map(|h| Arc::clone(&h))
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        let handle = self.open.remove(&fh).map(|(_, h)| h);
        if let Some(h) = &handle {
            // Drop the map's weak entry once no handle keeps the id alive.
            self.backing.remove_if(&h.ino, |_, w| {
                w.strong_count() <= usize::from(h.backing.is_some())
            });
        }
        handle
    }

    pub fn count(&self) -> usize {
        self.open.len()
    }

    /// Returns the inode's live backing id, or registers one with `register`. The map shard
    /// stays locked meanwhile, so two opens of one inode cannot register two ids.
    pub fn backing_id(
        &self,
        ino: u64,
        register: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> std::io::Result<Arc<BackingId>> {
        let mut entry = self.backing.entry(ino).or_default();
        if let Some(id) = entry.upgrade() {
            return Ok(id);
        }
        let id = Arc::new(register()?);
        *entry = Arc::downgrade(&id);
        Ok(id)
    }
}
