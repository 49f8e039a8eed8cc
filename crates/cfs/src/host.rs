//! Settings of the machine, outside ClaudeFS, that change how fast a mount is, reported once
//! at mount time so that an operator who sees slow metadata knows where to look.

use std::path::Path;

/// Why the mount's metadata operations may be slower than they need be on this machine, if
/// `sys` (normally `/sys`) shows a reason.
///
/// Every FUSE request wakes a daemon thread and then the caller. On a virtual machine whose
/// idle vCPUs halt at once (the guest `haltpoll` cpuidle driver with its polling switched
/// off), each of those wake-ups is an exit to the hypervisor: in one run on the 2-vCPU
/// test machine, creates ran 40% and unlinks 60% faster with `guest_halt_poll_ns` at 200000
/// than at 0.
pub fn slow_wakeups(sys: &Path) -> Option<String> {
    let read = |rel: &str| std::fs::read_to_string(sys.join(rel)).ok();
    let driver = read("devices/system/cpu/cpuidle/current_driver")?;
    let poll_ns = read("module/haltpoll/parameters/guest_halt_poll_ns")?;
    (driver.trim() == "haltpoll" && poll_ns.trim() == "0").then(|| {
        "idle vCPUs halt without polling (haltpoll guest_halt_poll_ns=0): each FUSE round trip \
         pays two hypervisor wake-ups; raising /sys/module/haltpoll/parameters/guest_halt_poll_ns \
         (e.g. to 200000) speeds up metadata operations at the cost of idle CPU time \
         (see docs/operations.md)"
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::slow_wakeups;
    use std::path::Path;

    fn sys(driver: Option<&str>, poll_ns: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let put = |rel: &str, v: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap_or(Path::new("/"))).expect("mkdir");
            std::fs::write(p, v).expect("write");
        };
        if let Some(d) = driver {
            put("devices/system/cpu/cpuidle/current_driver", d);
        }
        if let Some(n) = poll_ns {
            put("module/haltpoll/parameters/guest_halt_poll_ns", n);
        }
        dir
    }

    #[test]
    fn only_haltpoll_with_polling_off_is_reported() {
        let hint = |d, n| slow_wakeups(sys(d, n).path());
        assert!(hint(Some("haltpoll\n"), Some("0\n")).is_some());
        assert!(hint(Some("haltpoll\n"), Some("200000\n")).is_none());
        assert!(hint(Some("intel_idle\n"), Some("0\n")).is_none());
        assert!(hint(None, Some("0\n")).is_none());
        assert!(hint(Some("haltpoll\n"), None).is_none());
    }
}
