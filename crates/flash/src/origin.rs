//! The origin of a backing file: the record of the create that made its file, kept in an
//! extended attribute of the backing file itself.
//!
//! An `fsync` of a new file must make its name durable too, which normally costs a commit of
//! the metadata store and a second device flush beside the data's. When the file's creation is
//! the only change to the namespace not yet durable, the daemon instead writes the create into
//! this attribute and fsyncs the backing file alone: the attribute rides in the inode write
//! that the new file's fsync does anyway, so the caller waits for one flush, as on a local
//! filesystem. After a crash, recovery finds backing files that no inode owns and creates
//! their files again from this record (see the data dir's recovery).

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::XattrFlags;

/// The attribute's name on the flash filesystem (which must support `user.` attributes).
pub const ORIGIN_XATTR: &str = "user.cfs.origin";

/// Most bytes a record may have: a create with a 255-byte name, with room to spare.
const MAX_RECORD: usize = 1024;

/// Writes `record` as the origin of the backing file `file`. It is durable once `file` is
/// fsynced (an fsync, not an fdatasync: it is inode metadata).
pub fn set(file: &File, record: &[u8]) -> io::Result<()> {
    if record.len() > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "origin record too long",
        ));
    }
    rustix::fs::fsetxattr(file, ORIGIN_XATTR, record, XattrFlags::empty())?;
    Ok(())
}

/// Drops the origin record of `file`, if it has one.
pub fn clear(file: &File) -> io::Result<()> {
    match rustix::fs::fremovexattr(file, ORIGIN_XATTR) {
        Ok(()) | Err(rustix::io::Errno::NODATA) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The origin record of the backing file at `path`; `None` if it has none (a file whose
/// create became durable in the metadata store, or one that was never fsynced).
pub fn get(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_RECORD];
    match rustix::fs::getxattr(path, ORIGIN_XATTR, &mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Ok(Some(buf))
        }
        Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_set_is_read_back_and_a_file_without_one_has_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = File::create(&path).expect("create");
        assert_eq!(get(&path).expect("get"), None);
        match set(&file, b"the create") {
            Ok(()) => {
                assert_eq!(get(&path).expect("get"), Some(b"the create".to_vec()));
                clear(&file).expect("clear");
                assert_eq!(get(&path).expect("get"), None);
                clear(&file).expect("clearing twice is no error");
            }
            // A scratch filesystem without user xattrs (tmpfs before 6.6): the daemon then
            // never takes this path (it falls back to a metadata commit).
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => panic!("set: {e}"),
        }
        assert!(set(&file, &vec![0u8; MAX_RECORD + 1]).is_err());
    }
}
