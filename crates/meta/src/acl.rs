//! POSIX ACLs in the kernel's xattr encoding (`system.posix_acl_access` / `_default`).
//!
//! With `FUSE_POSIX_ACL` the kernel enforces ACLs itself, from the xattrs we store. What it
//! leaves to the filesystem is keeping the ACL and the mode bits in step: `chmod` rewrites the
//! owner, mask (or group) and other entries; setting an access ACL rewrites the mode; and a new
//! inode inherits its parent's default ACL instead of having the umask applied.

use crate::{MetaError, Result};

pub const ACCESS_XATTR: &[u8] = b"system.posix_acl_access";
pub const DEFAULT_XATTR: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
pub(crate) const USER_OBJ: u16 = 0x01;
pub(crate) const USER: u16 = 0x02;
pub(crate) const GROUP_OBJ: u16 = 0x04;
pub(crate) const GROUP: u16 = 0x08;
pub(crate) const MASK: u16 = 0x10;
pub(crate) const OTHER: u16 = 0x20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A parsed, validated ACL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    pub fn parse(bytes: &[u8]) -> Result<Acl> {
        let invalid = MetaError::Invalid("malformed POSIX ACL");
        if bytes.len() < 4 || !(bytes.len() - 4).is_multiple_of(8) {
            return Err(invalid);
        }
        let version = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if version != VERSION {
            return Err(invalid);
        }
        let entries: Vec<Entry> = bytes[4..]
            .chunks_exact(8)
            .map(|c| Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        let count = |tag| entries.iter().filter(|e| e.tag == tag).count();
        let named = count(USER) + count(GROUP);
        let valid_tags = entries
            .iter()
            .all(|e| matches!(e.tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER))
            && entries.iter().all(|e| e.perm & !7 == 0);
        if !valid_tags
            || count(USER_OBJ) != 1
            || count(GROUP_OBJ) != 1
            || count(OTHER) != 1
            || count(MASK) > 1
            || (named > 0 && count(MASK) != 1)
        {
            return Err(invalid);
        }
        Ok(Acl { entries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.entries.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    fn perm_of(&self, tag: u16) -> Option<u32> {
        self.entries
            .iter()
            .find(|e| e.tag == tag)
            .map(|e| u32::from(e.perm))
    }

    fn set_perm(&mut self, tag: u16, perm: u32) {
        for e in self.entries.iter_mut().filter(|e| e.tag == tag) {
            e.perm = (perm & 7) as u16;
        }
    }

    /// The permission bits (`0o777`) this ACL implies.
    pub fn mode_bits(&self) -> u32 {
        let owner = self.perm_of(USER_OBJ).unwrap_or(0);
        let group = self
            .perm_of(MASK)
            .or_else(|| self.perm_of(GROUP_OBJ))
            .unwrap_or(0);
        let other = self.perm_of(OTHER).unwrap_or(0);
        (owner << 6) | (group << 3) | other
    }

    /// True when the ACL says no more than the mode bits do, so it need not be stored.
    pub fn is_minimal(&self) -> bool {
        self.entries.len() == 3
    }

    /// Rewrites the entries that mirror the mode, as `chmod` must.
    pub fn chmod(&mut self, perm: u32) {
        self.set_perm(USER_OBJ, perm >> 6);
        if self.perm_of(MASK).is_some() {
            self.set_perm(MASK, perm >> 3);
        } else {
            self.set_perm(GROUP_OBJ, perm >> 3);
        }
        self.set_perm(OTHER, perm);
    }

    /// Derives a new inode's access ACL from its parent's default ACL and the requested
    /// permission bits (POSIX `posix_acl_create`): each mirrored entry is limited by the
    /// corresponding mode bits. Returns the ACL and the resulting permission bits.
    pub fn inherit(&self, requested: u32) -> (Acl, u32) {
        let mut acl = self.clone();
        let mut mode = requested & 0o777;
        let owner = acl.perm_of(USER_OBJ).unwrap_or(0) & (mode >> 6);
        acl.set_perm(USER_OBJ, owner);
        let other = acl.perm_of(OTHER).unwrap_or(0) & mode;
        acl.set_perm(OTHER, other);
        let group = if acl.perm_of(MASK).is_some() {
            let m = acl.perm_of(MASK).unwrap_or(0) & (mode >> 3);
            acl.set_perm(MASK, m);
            m
        } else {
            let g = acl.perm_of(GROUP_OBJ).unwrap_or(0) & (mode >> 3);
            acl.set_perm(GROUP_OBJ, g);
            g
        };
        mode = (requested & !0o777) | (owner << 6) | (group << 3) | other;
        (acl, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        Acl {
            entries: entries
                .iter()
                .map(|&(tag, perm, id)| Entry { tag, perm, id })
                .collect(),
        }
        .encode()
    }

    #[test]
    fn minimal_acl_round_trips_and_gives_mode() {
        let bytes = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (GROUP_OBJ, 5, u32::MAX),
            (OTHER, 4, u32::MAX),
        ]);
        let parsed = Acl::parse(&bytes).expect("valid");
        assert_eq!(parsed.encode(), bytes);
        assert_eq!(parsed.mode_bits(), 0o754);
        assert!(parsed.is_minimal());
    }

    #[test]
    fn named_entry_requires_mask() {
        let bytes = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, u32::MAX),
            (OTHER, 4, u32::MAX),
        ]);
        assert!(Acl::parse(&bytes).is_err());
    }

    #[test]
    fn chmod_rewrites_mask_not_group() {
        let bytes = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, u32::MAX),
            (MASK, 7, u32::MAX),
            (OTHER, 4, u32::MAX),
        ]);
        let mut parsed = Acl::parse(&bytes).expect("valid");
        parsed.chmod(0o640);
        assert_eq!(parsed.mode_bits(), 0o640);
        assert_eq!(parsed.perm_of(GROUP_OBJ), Some(5));
    }

    #[test]
    fn inherit_limits_by_requested_mode() {
        let bytes = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 7, 1000),
            (GROUP_OBJ, 7, u32::MAX),
            (MASK, 7, u32::MAX),
            (OTHER, 7, u32::MAX),
        ]);
        let parsed = Acl::parse(&bytes).expect("valid");
        let (child, mode) = parsed.inherit(0o640);
        assert_eq!(mode, 0o640);
        assert_eq!(child.mode_bits(), 0o640);
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(Acl::parse(b"").is_err());
        assert!(Acl::parse(&[1, 0, 0, 0]).is_err());
        assert!(Acl::parse(&[2, 0, 0, 0, 1]).is_err());
    }
}
