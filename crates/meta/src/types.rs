//! The records the metadata store keeps.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An inode number. Stable for the life of a file and never reused, which NFS file handles need.
pub type Ino = u64;

/// The root directory's inode number, fixed by the FUSE protocol.
pub const ROOT_INO: Ino = 1;

/// Longest file name accepted, as on ext4.
pub const NAME_MAX: usize = 255;

/// Most hard links one inode may have.
pub const LINK_MAX: u32 = 65_000;

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc_consts::S_IFREG,
            FileKind::Dir => libc_consts::S_IFDIR,
            FileKind::Symlink => libc_consts::S_IFLNK,
            FileKind::Fifo => libc_consts::S_IFIFO,
            FileKind::Socket => libc_consts::S_IFSOCK,
            FileKind::CharDev => libc_consts::S_IFCHR,
            FileKind::BlockDev => libc_consts::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of a mode, if any.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc_consts::S_IFMT {
            libc_consts::S_IFREG | 0 => FileKind::File,
            libc_consts::S_IFDIR => FileKind::Dir,
            libc_consts::S_IFLNK => FileKind::Symlink,
            libc_consts::S_IFIFO => FileKind::Fifo,
            libc_consts::S_IFSOCK => FileKind::Socket,
            libc_consts::S_IFCHR => FileKind::CharDev,
            libc_consts::S_IFBLK => FileKind::BlockDev,
            _ => return None,
        })
    }

    pub fn to_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Option<FileKind> {
        [
            FileKind::File,
            FileKind::Dir,
            FileKind::Symlink,
            FileKind::Fifo,
            FileKind::Socket,
            FileKind::CharDev,
            FileKind::BlockDev,
        ]
        .get(v as usize)
        .copied()
    }
}

/// The mode constants, kept here so the metadata layer does not depend on libc.
pub mod libc_consts {
    pub const S_IFMT: u32 = 0o170000;
    pub const S_IFSOCK: u32 = 0o140000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFBLK: u32 = 0o060000;
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFIFO: u32 = 0o010000;
    pub const S_ISUID: u32 = 0o4000;
    pub const S_ISGID: u32 = 0o2000;
    pub const S_ISVTX: u32 = 0o1000;
    pub const S_IXGRP: u32 = 0o0010;
}

/// A point in time with nanosecond precision, as POSIX timestamps are kept.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nanos)
        } else {
            // Times before 1970 are legal (utimes accepts them); subtract whole seconds,
            // then add back the fraction.
            UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs())
                + Duration::from_nanos(u64::from(self.nanos))
        }
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Timestamp {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nanos = 0;
                if d.subsec_nanos() > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - d.subsec_nanos();
                }
                Timestamp { secs, nanos }
            }
        }
    }
}

/// One inode. For regular files, the backing file on flash is authoritative for the data and
/// for size, atime and mtime while the file is open; `size` here is brought up to date when
/// the file is synced or released, and after a crash by recovery.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct Inode {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits plus set-uid, set-gid and sticky (`mode & 0o7777`).
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// For directories: the parent directory (the root is its own parent).
    pub parent: Ino,
    /// For directories: the next readdir cookie to hand out. Cookies only grow, so a listing
    /// in progress never sees an entry twice or skips one that stayed put.
    pub next_cookie: u64,
    /// For symlinks: the target.
    pub target: Vec<u8>,
}

impl Inode {
    /// The full `st_mode`.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | (self.perm & 0o7777)
    }
}

/// First cookie handed to a real entry; 1 and 2 stand for "." and "..".
pub const FIRST_COOKIE: u64 = 3;

/// One directory entry as readdir returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub cookie: u64,
    pub ino: Ino,
    pub kind: FileKind,
    pub name: Vec<u8>,
}
