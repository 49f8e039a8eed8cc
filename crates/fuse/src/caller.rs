//! Who is asking: the request's credentials, plus supplementary groups when a rule needs them.

use cfs_meta::Caller;
use fuser::Request;

pub fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        groups: Vec::new(),
    }
}

/// The caller with its supplementary groups, read from `/proc/<pid>/status`. Only the set-gid
/// rules need them, so only those requests pay for the read. If the process is gone, the
/// primary group is all we know.
pub fn caller_with_groups(req: &Request) -> Caller {
    let mut c = caller(req);
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", req.pid()))
        && let Some(line) = status.lines().find(|l| l.starts_with("Groups:"))
    {
        c.groups = line["Groups:".len()..]
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect();
    }
    c
}
