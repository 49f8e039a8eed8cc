//! How a mount makes FUSE round trips cheaper. `cfs mount --busy-poll`: a daemon thread that
//! keeps a CPU busy while requests flow, and costs nothing while the mount idles. The mounts
//! here ask for it (or against it) by value, so the tests do not depend on what `auto` finds
//! on the machine. `--wake-here on`: the kernel's fuse `wake_here` held on while mounted.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// The `/proc` directory of the daemon's thread named `name`, if it has one.
fn thread_named(pid: u32, name: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list the daemon's threads")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == name))
}

/// CPU time (user + system, in clock ticks) the thread at `task` has used.
fn cpu_ticks(task: &Path) -> u64 {
    let stat = std::fs::read_to_string(task.join("stat")).expect("read the thread's stat");
    let after = &stat[stat.rfind(')').expect("stat has a command name") + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let tick = |i: usize| fields[i - 3].parse::<u64>().expect("a number of ticks");
    tick(14) + tick(15)
}

#[test]
fn busy_poll_spins_while_requests_flow_and_sleeps_when_they_stop() {
    let root = scratch("busy-poll");
    let mut m = Mount::start(root.path(), &["--busy-poll", "1000"]);
    let pid = m.pid().expect("daemon running");
    // A new thread names itself once it first runs, which on a loaded machine can be a
    // while after the daemon started it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let task = loop {
        if let Some(task) = thread_named(pid, "cfs-busypoll") {
            break task;
        }
        assert!(
            Instant::now() < deadline,
            "the mount has no cfs-busypoll thread"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        status(&m)["busy_poll_us"],
        1000,
        "cfs status shows the window"
    );

    // Work through it: the filesystem answers as it would without.
    let dir = m.path("d");
    std::fs::create_dir(&dir).expect("mkdir");
    for i in 0..200 {
        std::fs::write(dir.join(format!("f{i}")), format!("{i}")).expect("write");
    }
    for i in 0..200 {
        let got = std::fs::read_to_string(dir.join(format!("f{i}"))).expect("read");
        assert_eq!(got, format!("{i}"));
    }

    // Idle: the thread sleeps, so its CPU time stands still.
    std::thread::sleep(Duration::from_millis(300));
    let idle_from = cpu_ticks(&task);
    std::thread::sleep(Duration::from_secs(1));
    let idle_used = cpu_ticks(&task) - idle_from;
    assert!(
        idle_used <= 1,
        "the busy-poll thread used {idle_used} ticks of CPU in 1 s with no requests"
    );

    // Requests without a pause: the thread runs between them (when a CPU is free for it,
    // which at nice 19 may take a moment on a loaded machine).
    let probe = m.path("d/f0");
    let busy_from = cpu_ticks(&task);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cpu_ticks(&task) == busy_from {
        assert!(
            Instant::now() < deadline,
            "the busy-poll thread never ran during 10 s of requests"
        );
        // Each open is an OPEN request, each close a RELEASE.
        for _ in 0..500 {
            std::fs::read(&probe).expect("read the probe");
        }
    }
    m.unmount();
}

#[test]
fn busy_poll_off_starts_no_thread() {
    let root = scratch("busy-poll-off");
    let mut m = Mount::start(root.path(), &["--busy-poll", "off"]);
    std::fs::write(m.path("f"), b"x").expect("write");
    let pid = m.pid().expect("daemon running");
    assert!(
        thread_named(pid, "cfs-busypoll").is_none(),
        "--busy-poll off must start no busy-poll thread"
    );
    assert_eq!(status(&m)["busy_poll_us"], 0, "cfs status shows it off");
    m.unmount();
}

#[test]
fn a_mount_holds_the_kernels_wake_here_on() {
    let param = Path::new("/sys/module/fuse/parameters/wake_here");
    let root = scratch("wake-here");
    let mut m = Mount::start(root.path(), &[]);
    std::fs::write(m.path("f"), b"x").expect("write");
    if !param.exists() {
        eprintln!("this kernel has no fuse wake_here parameter: nothing to hold");
        m.unmount();
        return;
    }
    // Other tests' mounts may hold it too, but none turns it off while this one runs.
    let value = std::fs::read_to_string(param).expect("read wake_here");
    assert_eq!(value.trim(), "Y", "the mount holds wake_here on");
    assert!(
        m.log_text().contains("fuse wake_here"),
        "the mount's log says what it did with wake_here"
    );
    assert_eq!(
        status(&m)["fuse_wake_here"],
        "Y",
        "cfs status shows the parameter"
    );
    let held = std::fs::read_to_string("/run/cfs/wake_here.holders").expect("the holders file");
    assert!(
        matches!(held.trim(), "Y" | "N"),
        "the holders file records the machine's own value, not {held:?}"
    );
    m.unmount();
}
