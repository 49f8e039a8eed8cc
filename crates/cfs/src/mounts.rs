//! Reading the kernel's mount table, to refuse double mounts and to find a mount's data dir.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The mounted filesystem's device number as `major:minor`, the name of its backing
    /// device info in `/sys/class/bdi`.
    pub dev: String,
}

impl MountEntry {
    /// True for a ClaudeFS mount. Mounted with mount(2) directly, FUSE mounts show type
    /// `fuse` (with fusermount, `fuse.cfs`); ours carry the data dir as their source.
    pub fn is_cfs(&self) -> bool {
        (self.fstype == "fuse" || self.fstype == "fuse.cfs")
            && Path::new(&self.source).join("meta.redb").is_file()
    }
}

/// Undoes the octal escapes (`\040` for a space) the kernel uses in mountinfo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn mounts() -> Vec<MountEntry> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    parse(&text)
}

/// Parses the lines of a mountinfo file; lines that do not have its shape are skipped.
fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split(' ');
            let dev = l.nth(2)?;
            let mountpoint = l.nth(1)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: fstype.to_string(),
                source: unescape(source),
                dev: dev.to_string(),
            })
        })
        .collect()
}

/// The mount whose mountpoint is exactly `path` (after resolving symlinks), if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    top_mount_at(&path)
}

/// The topmost mount on the already canonical `path`. Resolves nothing, so it never walks
/// into the mount itself: a daemon looking up its own mount must not hold a reference to
/// it, or an unmount racing with the lookup fails with EBUSY.
pub fn top_mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mountpoint == path)
}

#[cfg(test)]
mod tests {
    use super::{parse, unescape};

    #[test]
    fn unescapes_spaces() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn reads_device_mountpoint_type_and_source() {
        let text = "36 35 0:61 / /mnt/a\\040b rw,nosuid - fuse /var/lib/cfs rw,user_id=0\n\
                    garbage\n\
                    22 1 259:2 / / rw shared:1 - ext4 /dev/nvme0n1p2 rw\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].dev, "0:61");
        assert_eq!(m[0].mountpoint.to_str(), Some("/mnt/a b"));
        assert_eq!(
            (m[0].fstype.as_str(), m[0].source.as_str()),
            ("fuse", "/var/lib/cfs")
        );
        assert_eq!((m[1].dev.as_str(), m[1].fstype.as_str()), ("259:2", "ext4"));
    }
}
