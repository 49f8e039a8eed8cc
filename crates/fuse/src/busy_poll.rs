//! Keeping a CPU busy while FUSE requests flow, so that a chain of requests (an untar, a
//! checkout, `rm -r`) runs on CPUs that are awake. `cfs mount --busy-poll` sets the window;
//! by default it is on where idle vCPUs halt at once, and off elsewhere.
//!
//! Every request is two wake-ups: the kernel wakes a daemon thread, whose reply wakes the
//! caller. On a virtual machine whose idle vCPUs halt at once (the guest `haltpoll` cpuidle
//! driver with `guest_halt_poll_ns` 0), a wake-up sent to a halted vCPU is an exit to the
//! hypervisor, and the scheduler spreads the caller and the daemon's threads over the vCPUs,
//! so nearly every wake-up pays it. While another vCPU runs something, the scheduler keeps the
//! caller and the daemon's thread together on one, where each hands the CPU straight to the
//! other and nothing halts. On the 2-vCPU test machine a bare round trip (getxattr of an
//! absent xattr) took 15 µs, and 6 µs beside a busy loop at nice 19 on the other vCPU. A loop
//! at `SCHED_IDLE` did not help (the scheduler counts its CPU as idle and wakes threads
//! there), and two loops, one per vCPU, made it 36 µs.
//!
//! So this thread, at nice 19 (it gets a CPU only when nothing else wants it), spins for a
//! window after each request and sleeps once requests stop: an idle mount costs nothing. Once
//! a millisecond it looks up the CPU the latest caller runs on and keeps off it, so that it
//! holds the other one. It spins on the clock, without `pause`, which a hypervisor may take
//! for a vCPU waiting on a lock and deschedule.
//!
//! While several threads or processes send requests (a parallel build), the thread sleeps:
//! a CPU kept busy is one the scheduler no longer finds idle when it places their work. In a
//! `scripts/bench` run on the test machine without that rule (3 rounds, a 1 ms window against
//! none), `tar -xf` of /usr/include took 1.84 s against 2.70 s, but `make -j2` took 11%
//! longer and `git clone` 7%; with it, neither was slower. Standing aside instead while
//! `/proc/loadavg` showed every CPU busy lost the gains as well as the losses.
//!
//! It also stands aside for a while once other threads took most of its CPU's time: such a
//! CPU does not halt anyway. During a cold read from the object store, which kept both vCPUs
//! busy (the S3 server alone took half of all CPU samples), the thread still took 3% of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// The running poller, kept by the mount; dropping it ends the thread.
pub(crate) struct BusyPoll {
    shared: Arc<Shared>,
    thread: Thread,
}

struct Shared {
    /// The clock's origin, so that times fit an atomic.
    epoch: Instant,
    /// Nanoseconds since `epoch` of the latest request.
    last: AtomicU64,
    /// How long after a request the thread spins, in nanoseconds.
    window: u64,
    /// The thread is parked, or about to: the next request must unpark it.
    parked: AtomicBool,
    stop: AtomicBool,
    /// Times the thread went to sleep: what tests watch.
    sleeps: AtomicU64,
    /// The thread that sent the latest request (0: none yet).
    caller: AtomicU32,
    /// Until when (nanoseconds since `epoch`) requests count as coming from several
    /// callers, and the thread stays asleep (see [`MIXED_HOLD_NS`]).
    mixed_until: AtomicU64,
}

impl Shared {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn recent(&self) -> bool {
        self.now().saturating_sub(self.last.load(Ordering::SeqCst)) < self.window
    }
}

impl BusyPoll {
    /// Starts the thread, spinning `window` after each request; `None` (with a log line) when
    /// no thread can be started, and requests then wake halted CPUs as they would without it.
    pub(crate) fn start(window: Duration) -> Option<BusyPoll> {
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            window: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleeps: AtomicU64::new(0),
            caller: AtomicU32::new(0),
            mixed_until: AtomicU64::new(0),
        });
        let theirs = Arc::clone(&shared);
        match std::thread::Builder::new()
            .name("cfs-busypoll".into())
            .spawn(move || run(&theirs))
        {
            Ok(handle) => Some(BusyPoll {
                shared,
                thread: handle.thread().clone(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the busy-poll thread; running without it");
                None
            }
        }
    }

    /// Notes a request from thread `caller` (as the kernel names it in the request): the
    /// thread spins for another window, and is woken if it slept.
    fn touch(&self, caller: u32) {
        let s = &self.shared;
        let now = s.now();
        // 0: a request the kernel sends on its own behalf.
        if caller != 0 {
            let before = s.caller.swap(caller, Ordering::Relaxed);
            if before != 0 && before != caller {
                s.mixed_until
                    .store(now.saturating_add(MIXED_HOLD_NS), Ordering::Relaxed);
            }
        }
        if now < s.mixed_until.load(Ordering::Relaxed) {
            // Several callers at once: a parallel job, which wants every CPU it can find
            // idle. The thread sleeps, and is not woken for it.
            return;
        }
        s.last.store(now, Ordering::SeqCst);
        // Pairs with the thread's store of `parked` before its last look at `last`: one of
        // the two sees the other's store, so a request never leaves the thread asleep.
        if s.parked.load(Ordering::SeqCst) && s.parked.swap(false, Ordering::SeqCst) {
            self.thread.unpark();
        }
    }

    /// Notes a READ or WRITE of `bytes` from `caller`, unless it is a bulk transfer (from
    /// [`BULK_IO`]): copying its data, not the wake-ups this thread saves, takes the time.
    /// During a sequential `--no-passthrough` write of 1 MiB requests the thread took 35% of
    /// the daemon's samples (`perf`), and 7.5% once bulk requests stopped counting; the
    /// daemon's CPU time for a 512 MiB `fio` write fell from a median 1.15 s to 0.64 s over
    /// 5 interleaved runs, its throughput unchanged within the noise of the test machine.
    pub(crate) fn touch_io(&self, caller: u32, bytes: usize) {
        if bytes < BULK_IO {
            self.touch(caller);
        }
    }

    #[cfg(test)]
    fn sleeps(&self) -> u64 {
        self.shared.sleeps.load(Ordering::SeqCst)
    }
}

impl Drop for BusyPoll {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

fn run(s: &Shared) {
    lower_priority();
    let mut away = Away::new();
    let mut looked = Instant::now();
    let mut turn = Instant::now();
    let mut stolen = Duration::ZERO;
    while !s.stop.load(Ordering::Relaxed) {
        if s.recent() {
            let now = Instant::now();
            // A long gap between two turns of this loop is time the scheduler gave to other
            // work on this CPU.
            let gap = now.duration_since(turn);
            turn = now;
            if gap >= PREEMPTED {
                stolen += gap;
            }
            let period = now.duration_since(looked);
            if period >= LOOK_EVERY {
                looked = now;
                if stolen * 2 >= period {
                    // Other threads wanted this CPU for most of the period (the object
                    // store's server during a cold read, a compiler): the CPU does not halt
                    // anyway, and spinning only takes turns from them.
                    stolen = Duration::ZERO;
                    std::thread::sleep(BACK_OFF);
                    turn = Instant::now();
                    looked = turn;
                    continue;
                }
                stolen = Duration::ZERO;
                if let Some(cpu) = cpu_of(s.caller.load(Ordering::Relaxed)) {
                    away.keep_off(cpu);
                }
            }
            continue;
        }
        s.parked.store(true, Ordering::SeqCst);
        if s.recent() {
            s.parked.store(false, Ordering::SeqCst);
            continue;
        }
        s.sleeps.fetch_add(1, Ordering::SeqCst);
        // Until a request unparks it; a spurious return only costs one more look.
        std::thread::park();
        s.parked.store(false, Ordering::SeqCst);
        // The caller may have moved while this thread slept: look now, not a period later.
        turn = Instant::now();
        stolen = Duration::ZERO;
        looked = turn.checked_sub(LOOK_EVERY).unwrap_or(turn);
    }
}

/// The size from which a READ or WRITE is a bulk transfer, which does not keep the thread
/// spinning: above the 4-32 KiB requests of small files and random I/O, whose wake-ups it
/// saves, below the 128 KiB-1 MiB requests of sequential I/O.
const BULK_IO: usize = 64 << 10;

/// How long after a request from a second caller the thread stays asleep: while several
/// threads or processes send requests (a parallel build, a multi-threaded job), a busy CPU
/// is one the scheduler no longer finds idle for their work. In one `scripts/bench` run
/// without this rule, `make -j2` took 11% longer and `git clone` 7%.
const MIXED_HOLD_NS: u64 = 50_000_000;

/// A gap between two turns of the spinning loop at least this long means the thread was
/// preempted (a turn takes well under a microsecond).
const PREEMPTED: Duration = Duration::from_micros(20);

/// How long the thread stands aside once other threads took most of its CPU's time.
const BACK_OFF: Duration = Duration::from_millis(10);

/// How often the spinning thread looks up where the latest caller runs, and how much of its
/// CPU's time other threads took.
const LOOK_EVERY: Duration = Duration::from_millis(1);

/// The CPU thread `tid` last ran on (field 39 of `/proc/<tid>/stat`), if it still exists.
fn cpu_of(tid: u32) -> Option<usize> {
    if tid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let after = stat.get(stat.rfind(')')? + 1..)?;
    after.split_whitespace().nth(36)?.parse().ok()
}

/// Keeps the thread off the CPU the caller runs on: the kernel then runs the daemon's thread
/// on that same CPU, handing it from one to the other, and this thread keeps another CPU
/// busy, so that the scheduler does not wake either of them there.
struct Away {
    /// The CPUs the thread may run on at start.
    allowed: Option<libc::cpu_set_t>,
    /// The CPU it is kept off now.
    off: Option<usize>,
}

impl Away {
    fn new() -> Away {
        // SAFETY: an all-zero cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
        let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } == 0;
        Away {
            allowed: ok.then_some(set),
            off: None,
        }
    }

    fn keep_off(&mut self, idx: usize) {
        let Some(allowed) = self.allowed else {
            return;
        };
        if self.off == Some(idx) || idx >= libc::CPU_SETSIZE as usize {
            return;
        }
        let mut set = allowed;
        // SAFETY: `idx` is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_CLR(idx, &mut set) };
        // SAFETY: as above.
        if unsafe { libc::CPU_COUNT(&set) } == 0 {
            return;
        }
        // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
        if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } == 0 {
            self.off = Some(idx);
        }
    }
}

/// Nice 19 for this thread alone (on Linux a thread's nice value is its own), so that it gets
/// a CPU only when nothing else wants it.
fn lower_priority() {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    let Ok(tid) = libc::id_t::try_from(tid) else {
        return;
    };
    // SAFETY: setpriority reads only its integer arguments.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "busy-poll thread keeps its priority");
    }
}

#[cfg(test)]
mod tests {
    use super::BusyPoll;
    use std::time::{Duration, Instant};

    /// Waits up to 5 s for `cond`.
    fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn sleeps_when_requests_stop_and_wakes_for_the_next() {
        let poll = BusyPoll::start(Duration::from_millis(20)).expect("thread");
        assert!(
            eventually(|| poll.sleeps() >= 1),
            "never slept with no requests"
        );
        for round in 0..3 {
            let before = poll.sleeps();
            poll.touch(0);
            assert!(
                eventually(|| poll.sleeps() > before),
                "round {round}: did not sleep again after a request"
            );
        }
    }

    #[test]
    fn stays_asleep_while_several_callers_send_requests() {
        let poll = BusyPoll::start(Duration::from_millis(20)).expect("thread");
        assert!(eventually(|| poll.sleeps() >= 1));
        poll.touch(7);
        assert!(
            eventually(|| poll.sleeps() >= 2),
            "slept again after one caller"
        );
        let before = poll.sleeps();
        // Two callers taking turns for 30 ms: the thread must not wake for them.
        for i in 0..30 {
            poll.touch(if i % 2 == 0 { 8 } else { 7 });
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(poll.sleeps(), before, "woke for requests from two callers");
    }

    #[test]
    fn bulk_transfers_do_not_wake_the_thread() {
        let poll = BusyPoll::start(Duration::from_millis(20)).expect("thread");
        assert!(eventually(|| poll.sleeps() >= 1));
        let before = poll.sleeps();
        for _ in 0..30 {
            poll.touch_io(7, super::BULK_IO);
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(poll.sleeps(), before, "woke for bulk transfers");
        poll.touch_io(7, 4096);
        assert!(
            eventually(|| poll.sleeps() > before),
            "a 4 KiB request did not wake it (it sleeps again after the window)"
        );
    }

    #[test]
    fn spins_while_requests_keep_coming() {
        let poll = BusyPoll::start(Duration::from_millis(200)).expect("thread");
        assert!(eventually(|| poll.sleeps() >= 1));
        poll.touch(0);
        let before = poll.sleeps();
        // Requests every 10 ms, inside the window: the thread must stay awake throughout.
        for _ in 0..20 {
            poll.touch(0);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            poll.sleeps() <= before + 1,
            "slept {} times between requests 10 ms apart with a 200 ms window",
            poll.sleeps() - before
        );
    }
}
