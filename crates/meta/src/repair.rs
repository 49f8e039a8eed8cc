//! Raw edits for `cfs fsck --repair`. Each one restores a single invariant; the checker
//! decides which are safe.

use crate::tables::*;
use crate::{FileKind, Ino, Inode, Result};
use redb::{Table, WriteTransaction};

pub struct Repair<'t> {
    inodes: Table<'t, u64, &'static [u8]>,
    dentries: Table<'t, (u64, &'static [u8]), (u64, u64, u8)>,
    listing: Table<'t, (u64, u64), &'static [u8]>,
    orphans: Table<'t, u64, ()>,
}

impl<'t> Repair<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> Result<Repair<'t>> {
        Ok(Repair {
            inodes: txn.open_table(INODES)?,
            dentries: txn.open_table(DENTRIES)?,
            listing: txn.open_table(LISTING)?,
            orphans: txn.open_table(ORPHANS)?,
        })
    }

    pub fn put_inode(&mut self, inode: &Inode) -> Result<()> {
        self.inodes
            .insert(inode.ino, encode_inode(inode)?.as_slice())?;
        Ok(())
    }

    pub fn remove_inode(&mut self, ino: Ino) -> Result<()> {
        self.inodes.remove(ino)?;
        self.orphans.remove(ino)?;
        Ok(())
    }

    pub fn mark_orphan(&mut self, ino: Ino) -> Result<()> {
        self.orphans.insert(ino, ())?;
        Ok(())
    }

    pub fn remove_dentry(&mut self, parent: Ino, name: &[u8], cookie: u64) -> Result<()> {
        self.dentries.remove((parent, name))?;
        self.listing.remove((parent, cookie))?;
        Ok(())
    }

    /// Re-creates the listing entry of an existing dentry.
    pub fn put_listing(
        &mut self,
        parent: Ino,
        cookie: u64,
        ino: Ino,
        kind: FileKind,
        name: &[u8],
    ) -> Result<()> {
        self.listing
            .insert((parent, cookie), encode_listing(ino, kind, name).as_slice())?;
        Ok(())
    }

    pub fn remove_listing(&mut self, parent: Ino, cookie: u64) -> Result<()> {
        self.listing.remove((parent, cookie))?;
        Ok(())
    }
}
