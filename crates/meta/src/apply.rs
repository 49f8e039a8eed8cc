//! The state machine: applies one [`Op`] inside one write transaction.
//!
//! Permission checks belong to the kernel (`default_permissions`); what is checked here is
//! what keeps the namespace a tree with correct link counts, whoever submits the operation.

use crate::acl::{self, Acl};
use crate::op::{Op, Outcome, RenameMode, SetAttr, XattrMode};
use crate::tables::*;
use crate::types::libc_consts::{S_ISGID, S_IXGRP};
use crate::{Caller, Timestamp};
use crate::{FIRST_COOKIE, FileKind, Ino, Inode, LINK_MAX, MetaError, NAME_MAX, ROOT_INO, Result};
use redb::{ReadableTable, Table, WriteTransaction};
use std::collections::HashMap;

/// Largest xattr value accepted, the kernel's own limit.
pub const XATTR_SIZE_MAX: usize = 65_536;

/// Declares [`Tables`] with one lazily opened table per line, and `fn name(&mut self) ->
/// Result<&mut Table>` for each, on [`Tables`] and on [`Tx`]: the table, opened on first use.
macro_rules! lazy_tables {
    ($($name:ident: $def:expr => $k:ty, $v:ty;)*) => {
        /// The tables of one write transaction, each opened on first use and then kept open
        /// until the transaction commits. Opening a table and closing it again (which writes
        /// its root back) cost about as much as changing it: 40% of an operation's time in
        /// `benches/ops.rs` when every operation opened its own. Most operations touch two or
        /// three of these; the open transaction takes up to [`crate::pending::MAX_OPS`].
        pub(crate) struct Tables<'t> {
            txn: &'t WriteTransaction,
            $($name: Option<Table<'t, $k, $v>>,)*
        }

        impl<'t> Tables<'t> {
            pub(crate) fn new(txn: &'t WriteTransaction) -> Tables<'t> {
                Tables {
                    txn,
                    $($name: None,)*
                }
            }

            $(
                pub(crate) fn $name(&mut self) -> Result<&mut Table<'t, $k, $v>> {
                    match &mut self.$name {
                        Some(t) => Ok(t),
                        slot @ None => Ok(slot.insert(self.txn.open_table($def)?)),
                    }
                }
            )*
        }

        // Not every table is changed by operations (the log's is written by `oplog`).
        #[allow(dead_code)]
        impl<'t> Tx<'_, 't> {
            $(
                pub(crate) fn $name(&mut self) -> Result<&mut Table<'t, $k, $v>> {
                    self.tables.$name()
                }
            )*
        }
    };
}

/// One batch of operations being applied: the transaction's tables, plus the inodes the
/// batch has touched. Inodes are read once and written back once at the end, so an
/// operation that touches the same directory twice (a rename within one directory) cannot
/// lose one of the two updates.
pub(crate) struct Tx<'a, 't> {
    tables: &'a mut Tables<'t>,
    touched: HashMap<Ino, Inode>,
    deleted: Vec<Ino>,
}

impl<'a, 't> Tx<'a, 't> {
    pub(crate) fn open(tables: &'a mut Tables<'t>) -> Tx<'a, 't> {
        Tx {
            tables,
            touched: HashMap::new(),
            deleted: Vec::new(),
        }
    }
}

lazy_tables! {
    inodes: INODES => u64, &'static [u8];
    dentries: DENTRIES => (u64, &'static [u8]), (u64, u64, u8);
    listing: LISTING => (u64, u64), &'static [u8];
    xattrs: XATTRS => (u64, &'static [u8]), &'static [u8];
    orphans: ORPHANS => u64, ();
    sup: SUPER => &'static str, &'static [u8];
    blobs: BLOBS => (u64, u64), (u64, u64, u32);
    chunks: CHUNKS => (u64, u64), &'static [u8];
    dirty: DIRTY => u64, ();
    deletes: DELETES => (u64, u64, u64), ();
    evicted: EVICTED => (u64, u64), u64;
    oplog: OPLOG => u64, &'static [u8];
}

impl<'t> Tables<'t> {
    /// The entries and inodes tables together, for a read that needs both.
    #[allow(clippy::type_complexity)]
    pub(crate) fn dentries_and_inodes(
        &mut self,
    ) -> Result<(
        &Table<'t, (u64, &'static [u8]), (u64, u64, u8)>,
        &Table<'t, u64, &'static [u8]>,
    )> {
        self.dentries()?;
        self.inodes()?;
        match (&self.dentries, &self.inodes) {
            (Some(d), Some(i)) => Ok((d, i)),
            _ => Err(MetaError::Store("a table did not stay open".into())),
        }
    }

    /// The xattrs and inodes tables together, for a read that needs both.
    #[allow(clippy::type_complexity)]
    pub(crate) fn xattrs_and_inodes(
        &mut self,
    ) -> Result<(
        &Table<'t, (u64, &'static [u8]), &'static [u8]>,
        &Table<'t, u64, &'static [u8]>,
    )> {
        self.xattrs()?;
        self.inodes()?;
        match (&self.xattrs, &self.inodes) {
            (Some(x), Some(i)) => Ok((x, i)),
            _ => Err(MetaError::Store("a table did not stay open".into())),
        }
    }
}

impl<'t> Tx<'_, 't> {
    /// Writes back every touched inode. Must be called before the transaction commits.
    pub(crate) fn finish(mut self) -> Result<()> {
        for (ino, inode) in std::mem::take(&mut self.touched) {
            if !self.deleted.contains(&ino) {
                self.inodes()?
                    .insert(ino, encode_inode(&inode)?.as_slice())?;
            }
        }
        Ok(())
    }

    pub(crate) fn inode(&mut self, ino: Ino) -> Result<&mut Inode> {
        if !self.touched.contains_key(&ino) {
            let inode = match self.inodes()?.get(ino)? {
                Some(bytes) => decode_inode(ino, bytes.value())?,
                None => return Err(MetaError::NotFound),
            };
            self.touched.insert(ino, inode);
        }
        self.touched.get_mut(&ino).ok_or(MetaError::NotFound)
    }

    fn dir(&mut self, ino: Ino) -> Result<&mut Inode> {
        let dir = self.inode(ino)?;
        if dir.kind != FileKind::Dir {
            return Err(MetaError::NotDir);
        }
        if dir.nlink == 0 {
            // A removed directory that someone still has as cwd: nothing may be created in it.
            return Err(MetaError::NotFound);
        }
        Ok(dir)
    }

    fn entry(&mut self, parent: Ino, name: &[u8]) -> Result<Option<(Ino, u64, FileKind)>> {
        Ok(match self.dentries()?.get((parent, name))? {
            Some(v) => {
                let (ino, cookie, kind) = v.value();
                let kind = FileKind::from_u8(kind)
                    .ok_or_else(|| MetaError::Corrupt(parent, "bad dentry kind".into()))?;
                Some((ino, cookie, kind))
            }
            None => None,
        })
    }

    fn add_entry(&mut self, parent: Ino, name: &[u8], ino: Ino, kind: FileKind) -> Result<u64> {
        let dir = self.inode(parent)?;
        let cookie = dir.next_cookie;
        dir.next_cookie += 1;
        self.dentries()?
            .insert((parent, name), (ino, cookie, kind.to_u8()))?;
        self.listing()?
            .insert((parent, cookie), encode_listing(ino, kind, name).as_slice())?;
        Ok(cookie)
    }

    fn remove_entry(&mut self, parent: Ino, name: &[u8], cookie: u64) -> Result<()> {
        self.dentries()?.remove((parent, name))?;
        self.listing()?.remove((parent, cookie))?;
        Ok(())
    }

    fn is_empty_dir(&mut self, ino: Ino) -> Result<bool> {
        Ok(self
            .listing()?
            .range((ino, 0)..=(ino, u64::MAX))?
            .next()
            .is_none())
    }

    fn xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.xattrs()?.get((ino, name))?.map(|v| v.value().to_vec()))
    }

    fn touch_dir(&mut self, ino: Ino, now: Timestamp) -> Result<()> {
        let dir = self.inode(ino)?;
        dir.mtime = now;
        dir.ctime = now;
        Ok(())
    }

    /// Drops one link; an inode left with none becomes an orphan until the kernel forgets it.
    fn drop_link(&mut self, ino: Ino, now: Timestamp) -> Result<Option<Ino>> {
        let inode = self.inode(ino)?;
        inode.nlink = if inode.kind == FileKind::Dir {
            0
        } else {
            inode.nlink.saturating_sub(1)
        };
        inode.ctime = now;
        if inode.nlink == 0 {
            self.orphans()?.insert(ino, ())?;
            return Ok(Some(ino));
        }
        Ok(None)
    }

    /// True if `ancestor` is `dir` or one of its ancestors.
    fn is_ancestor(&mut self, ancestor: Ino, mut dir: Ino) -> Result<bool> {
        // Bounded by the tree's depth; the guard stops a corrupt parent loop.
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            dir = self.inode(dir)?.parent;
        }
        Err(MetaError::Corrupt(dir, "directory parent loop".into()))
    }

    pub(crate) fn apply(&mut self, op: &Op) -> Result<Outcome> {
        match op {
            Op::Create {
                parent,
                name,
                ino,
                kind,
                perm,
                umask,
                rdev,
                target,
                caller,
                now,
            } => self.create(
                *parent, name, *ino, *kind, *perm, *umask, *rdev, target, caller, *now,
            ),
            Op::Link {
                ino,
                parent,
                name,
                now,
            } => self.link(*ino, *parent, name, *now),
            Op::Unlink { parent, name, now } => self.unlink(*parent, name, *now, false),
            Op::Rmdir { parent, name, now } => self.unlink(*parent, name, *now, true),
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                mode,
                now,
            } => self.rename(*parent, name, *new_parent, new_name, *mode, *now),
            Op::SetAttr { ino, attr, now } => self.setattr(*ino, attr, *now),
            Op::SetXattr {
                ino,
                name,
                value,
                mode,
                caller,
                now,
            } => self.setxattr(*ino, name, value, *mode, caller, *now),
            Op::RemoveXattr { ino, name, now } => {
                if self.xattrs()?.remove((*ino, name.as_slice()))?.is_none() {
                    return Err(MetaError::NoXattr);
                }
                let inode = self.inode(*ino)?;
                inode.ctime = *now;
                Ok(Outcome::Inode(inode.clone()))
            }
            Op::SyncData {
                ino,
                size,
                atime,
                mtime,
                ctime,
            } => {
                let inode = self.inode(*ino)?;
                inode.size = *size;
                inode.atime = *atime;
                inode.mtime = *mtime;
                inode.ctime = inode.ctime.max(*ctime);
                let inode = inode.clone();
                self.forget_evicted_past(*ino, *size)?;
                Ok(Outcome::Inode(inode))
            }
            Op::Purge { ino } => self.purge(*ino),
            Op::MarkDirty { ino } => {
                self.inode(*ino)?;
                self.dirty()?.insert(*ino, ())?;
                Ok(Outcome::Done)
            }
            Op::CommitBlobs {
                ino,
                blobs,
                blob_count,
                clean,
            } => self.commit_blobs(*ino, blobs, *blob_count, *clean),
            Op::BlobsDeleted { blobs } => {
                for b in blobs {
                    self.deletes()?.remove(*b)?;
                }
                Ok(Outcome::Done)
            }
            Op::Evict { ino, blobs } => self.evict(*ino, blobs),
            Op::Hydrated { ino, k, generation } => {
                let current = self.evicted()?.get((*ino, *k))?.map(|g| g.value());
                if current == Some(*generation) {
                    self.evicted()?.remove((*ino, *k))?;
                }
                Ok(Outcome::Done)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        parent: Ino,
        name: &[u8],
        ino: Ino,
        kind: FileKind,
        perm: u32,
        umask: u32,
        rdev: u32,
        target: &[u8],
        caller: &Caller,
        now: Timestamp,
    ) -> Result<Outcome> {
        check_name(name)?;
        let dir = self.dir(parent)?;
        let (dir_perm, dir_gid) = (dir.perm, dir.gid);
        if self.entry(parent, name)?.is_some() {
            return Err(MetaError::Exists);
        }
        if self.inodes()?.get(ino)?.is_some() {
            return Err(MetaError::Invalid("inode number already in use"));
        }
        let setgid_dir = dir_perm & S_ISGID != 0;
        let gid = if setgid_dir { dir_gid } else { caller.gid };
        let mut perm = perm & 0o7777;
        if kind == FileKind::Symlink {
            perm = 0o777;
        }
        if kind == FileKind::Dir && setgid_dir {
            perm |= S_ISGID;
        }
        let default_acl = match self.xattr(parent, acl::DEFAULT_XATTR)? {
            Some(bytes) if kind != FileKind::Symlink => Some(Acl::parse(&bytes)?),
            _ => None,
        };
        let mut access_acl = None;
        match &default_acl {
            Some(def) => {
                let (inherited, new_perm) = def.inherit(perm);
                perm = new_perm;
                if !inherited.is_minimal() {
                    access_acl = Some(inherited.encode());
                }
            }
            None if kind != FileKind::Symlink => perm &= !(umask & 0o777),
            None => {}
        }
        // A file may not keep set-gid in a group its creator is not in (inode_init_owner).
        if kind != FileKind::Dir
            && setgid_dir
            && perm & (S_ISGID | S_IXGRP) == (S_ISGID | S_IXGRP)
            && !caller.in_group(gid)
        {
            perm &= !S_ISGID;
        }
        let inode = Inode {
            ino,
            kind,
            perm,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            uid: caller.uid,
            gid,
            rdev,
            size: if kind == FileKind::Symlink {
                target.len() as u64
            } else {
                0
            },
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent,
            next_cookie: FIRST_COOKIE,
            target: target.to_vec(),
        };
        if let Some(acl) = access_acl {
            self.xattrs()?
                .insert((ino, acl::ACCESS_XATTR), acl.as_slice())?;
        }
        if matches!(kind, FileKind::File | FileKind::Dir)
            && let Some(policy) = self.xattr(parent, TIER_XATTR)?
        {
            self.xattrs()?
                .insert((ino, TIER_XATTR), policy.as_slice())?;
        }
        if kind == FileKind::Dir {
            if let Some(def) = &default_acl {
                self.xattrs()?
                    .insert((ino, acl::DEFAULT_XATTR), def.encode().as_slice())?;
            }
            self.inode(parent)?.nlink += 1;
        }
        self.touched.insert(ino, inode.clone());
        self.add_entry(parent, name, ino, kind)?;
        self.touch_dir(parent, now)?;
        let next = self
            .sup()?
            .get(KEY_NEXT_INO)?
            .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(ROOT_INO + 1);
        if ino >= next {
            self.sup()?
                .insert(KEY_NEXT_INO, (ino + 1).to_le_bytes().as_slice())?;
        }
        Ok(Outcome::Inode(inode))
    }

    fn link(&mut self, ino: Ino, parent: Ino, name: &[u8], now: Timestamp) -> Result<Outcome> {
        check_name(name)?;
        self.dir(parent)?;
        let inode = self.inode(ino)?;
        if inode.kind == FileKind::Dir {
            return Err(MetaError::NotPermitted);
        }
        if inode.nlink == 0 {
            return Err(MetaError::NotFound);
        }
        if inode.nlink >= LINK_MAX {
            return Err(MetaError::TooManyLinks);
        }
        let kind = inode.kind;
        if self.entry(parent, name)?.is_some() {
            return Err(MetaError::Exists);
        }
        let inode = self.inode(ino)?;
        inode.nlink += 1;
        inode.ctime = now;
        self.add_entry(parent, name, ino, kind)?;
        self.touch_dir(parent, now)?;
        self.orphans()?.remove(ino)?;
        Ok(Outcome::Inode(self.inode(ino)?.clone()))
    }

    fn unlink(&mut self, parent: Ino, name: &[u8], now: Timestamp, dir: bool) -> Result<Outcome> {
        if name == b"." {
            return Err(MetaError::Invalid("cannot remove '.'"));
        }
        if name == b".." {
            return Err(MetaError::NotEmpty);
        }
        self.dir(parent)?;
        let (ino, cookie, kind) = self.entry(parent, name)?.ok_or(MetaError::NotFound)?;
        match (dir, kind == FileKind::Dir) {
            (false, true) => return Err(MetaError::IsDir),
            (true, false) => return Err(MetaError::NotDir),
            (true, true) if !self.is_empty_dir(ino)? => return Err(MetaError::NotEmpty),
            _ => {}
        }
        self.remove_entry(parent, name, cookie)?;
        if dir {
            let p = self.inode(parent)?;
            p.nlink = p.nlink.saturating_sub(1);
        }
        self.touch_dir(parent, now)?;
        let orphaned = self.drop_link(ino, now)?;
        Ok(Outcome::Removed { orphaned })
    }

    fn rename(
        &mut self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        mode: RenameMode,
        now: Timestamp,
    ) -> Result<Outcome> {
        for n in [name, new_name] {
            if n == b"." || n == b".." {
                return Err(MetaError::Invalid("cannot rename '.' or '..'"));
            }
        }
        check_name(new_name)?;
        self.dir(parent)?;
        self.dir(new_parent)?;
        let (src, src_cookie, src_kind) = self.entry(parent, name)?.ok_or(MetaError::NotFound)?;
        let dst = self.entry(new_parent, new_name)?;
        if src_kind == FileKind::Dir && parent != new_parent && self.is_ancestor(src, new_parent)? {
            return Err(MetaError::Invalid("cannot move a directory into itself"));
        }
        let mut orphaned = None;
        match (mode, dst) {
            (RenameMode::Exchange, None) => return Err(MetaError::NotFound),
            (RenameMode::Exchange, Some((dst_ino, dst_cookie, dst_kind))) => {
                if dst_kind == FileKind::Dir
                    && parent != new_parent
                    && self.is_ancestor(dst_ino, parent)?
                {
                    return Err(MetaError::Invalid("cannot move a directory into itself"));
                }
                // Each entry keeps its place in its directory's listing; only what it names
                // changes.
                self.dentries()?
                    .insert((parent, name), (dst_ino, src_cookie, dst_kind.to_u8()))?;
                self.listing()?.insert(
                    (parent, src_cookie),
                    encode_listing(dst_ino, dst_kind, name).as_slice(),
                )?;
                self.dentries()?
                    .insert((new_parent, new_name), (src, dst_cookie, src_kind.to_u8()))?;
                self.listing()?.insert(
                    (new_parent, dst_cookie),
                    encode_listing(src, src_kind, new_name).as_slice(),
                )?;
                if parent != new_parent {
                    let src_dir = src_kind == FileKind::Dir;
                    let dst_dir = dst_kind == FileKind::Dir;
                    if src_dir != dst_dir {
                        let (from, to) = if src_dir {
                            (parent, new_parent)
                        } else {
                            (new_parent, parent)
                        };
                        self.inode(from)?.nlink -= 1;
                        self.inode(to)?.nlink += 1;
                    }
                    if src_dir {
                        self.inode(src)?.parent = new_parent;
                    }
                    if dst_dir {
                        self.inode(dst_ino)?.parent = parent;
                    }
                }
                self.inode(src)?.ctime = now;
                self.inode(dst_ino)?.ctime = now;
                self.touch_dir(parent, now)?;
                self.touch_dir(new_parent, now)?;
                return Ok(Outcome::Removed { orphaned: None });
            }
            (RenameMode::NoReplace, Some(_)) => return Err(MetaError::Exists),
            (RenameMode::Replace, Some((dst_ino, dst_cookie, dst_kind))) => {
                if dst_ino == src {
                    return Ok(Outcome::Removed { orphaned: None });
                }
                match (src_kind == FileKind::Dir, dst_kind == FileKind::Dir) {
                    (true, false) => return Err(MetaError::NotDir),
                    (false, true) => return Err(MetaError::IsDir),
                    (true, true) if !self.is_empty_dir(dst_ino)? => {
                        return Err(MetaError::NotEmpty);
                    }
                    _ => {}
                }
                self.remove_entry(new_parent, new_name, dst_cookie)?;
                if dst_kind == FileKind::Dir {
                    self.inode(new_parent)?.nlink -= 1;
                }
                orphaned = self.drop_link(dst_ino, now)?;
            }
            (_, None) => {}
        }
        self.remove_entry(parent, name, src_cookie)?;
        self.add_entry(new_parent, new_name, src, src_kind)?;
        if src_kind == FileKind::Dir && parent != new_parent {
            self.inode(parent)?.nlink -= 1;
            self.inode(new_parent)?.nlink += 1;
            self.inode(src)?.parent = new_parent;
        }
        self.inode(src)?.ctime = now;
        self.touch_dir(parent, now)?;
        self.touch_dir(new_parent, now)?;
        Ok(Outcome::Removed { orphaned })
    }

    fn setattr(&mut self, ino: Ino, attr: &SetAttr, now: Timestamp) -> Result<Outcome> {
        let inode = self.inode(ino)?;
        if attr.size.is_some() && inode.kind != FileKind::File {
            return Err(if inode.kind == FileKind::Dir {
                MetaError::IsDir
            } else {
                MetaError::Invalid("truncate of a special file")
            });
        }
        if let Some(uid) = attr.uid {
            inode.uid = uid;
        }
        if let Some(gid) = attr.gid {
            inode.gid = gid;
        }
        if let Some(size) = attr.size {
            inode.size = size;
        }
        if let Some(t) = attr.atime {
            inode.atime = t;
        }
        if let Some(t) = attr.mtime {
            inode.mtime = t;
        }
        inode.ctime = now;
        if let Some(perm) = attr.perm {
            inode.perm = perm & 0o7777;
            if let Some(bytes) = self.xattr(ino, acl::ACCESS_XATTR)? {
                let mut acl = Acl::parse(&bytes)?;
                acl.chmod(perm);
                self.xattrs()?
                    .insert((ino, acl::ACCESS_XATTR), acl.encode().as_slice())?;
            }
        }
        if let Some(size) = attr.size {
            self.forget_evicted_past(ino, size)?;
        }
        Ok(Outcome::Inode(self.inode(ino)?.clone()))
    }

    fn setxattr(
        &mut self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
        caller: &Caller,
        now: Timestamp,
    ) -> Result<Outcome> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(MetaError::Invalid("bad xattr name"));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(MetaError::XattrRange);
        }
        self.inode(ino)?;
        let exists = self.xattrs()?.get((ino, name))?.is_some();
        match (mode, exists) {
            (XattrMode::Create, true) => return Err(MetaError::Exists),
            (XattrMode::Replace, false) => return Err(MetaError::NoXattr),
            _ => {}
        }
        let mut store = true;
        if name == acl::ACCESS_XATTR {
            let parsed = Acl::parse(value)?;
            let inode = self.inode(ino)?;
            inode.perm = (inode.perm & !0o777) | parsed.mode_bits();
            if !caller.in_group(inode.gid) {
                inode.perm &= !S_ISGID;
            }
            if parsed.is_minimal() {
                store = false;
                self.xattrs()?.remove((ino, name))?;
            }
        } else if name == acl::DEFAULT_XATTR {
            if self.inode(ino)?.kind != FileKind::Dir {
                return Err(MetaError::NotPermitted);
            }
            Acl::parse(value)?;
        }
        if store {
            self.xattrs()?.insert((ino, name), value)?;
        }
        let inode = self.inode(ino)?;
        inode.ctime = now;
        Ok(Outcome::Inode(inode.clone()))
    }

    fn purge(&mut self, ino: Ino) -> Result<Outcome> {
        let inode = match self.inode(ino) {
            Ok(inode) if inode.nlink == 0 => inode.clone(),
            Ok(_) | Err(MetaError::NotFound) => return Ok(Outcome::Purged(None)),
            Err(e) => return Err(e),
        };
        self.inodes()?.remove(ino)?;
        self.orphans()?.remove(ino)?;
        let names: Vec<Vec<u8>> = self
            .xattrs()?
            .range((ino, &[][..])..)?
            .map_while(|r| match r {
                Ok((k, _)) if k.value().0 == ino => Some(Ok(k.value().1.to_vec())),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()?;
        for name in names {
            self.xattrs()?.remove((ino, name.as_slice()))?;
        }
        // Its objects go to the delete queue; the uploader DELETEs them.
        self.retire_blobs(ino, 0)?;
        self.dirty()?.remove(ino)?;
        self.touched.remove(&ino);
        self.deleted.push(ino);
        Ok(Outcome::Purged(Some(inode)))
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(MetaError::Invalid("bad file name"));
    }
    // Every directory has "." and ".." already; a real entry by that name could never be
    // removed (unlink and rmdir refuse those names), nor its directory.
    if name == b"." || name == b".." {
        return Err(MetaError::Exists);
    }
    Ok(())
}
