"""Facts about this machine that the benchmark and the profile record next to their figures,
the one way both put its caches in a known state, and the one way both tell that a ClaudeFS
mount's tier has no upload left to run under the next step."""

import contextlib
import mmap
import os


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def write(path, text):
    """Writes `text` and a newline to a kernel setting file."""
    with open(path, "w") as f:
        f.write(text + "\n")


def cpu_idle():
    """The cpuidle driver, with the haltpoll driver's polling time: on a virtual machine whose
    idle vCPUs halt at once, every FUSE round trip pays hypervisor wake-ups (see
    docs/operations.md), so metadata figures depend on it."""
    driver = read("/sys/devices/system/cpu/cpuidle/current_driver") or "unknown"
    if driver == "haltpoll":
        poll = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") or "?"
        return f"{driver}, guest_halt_poll_ns {poll}"
    return driver


def busy_poll(status):
    """What a mounted ClaudeFS daemon chose for `--busy-poll`, from its `cfs status --json`
    (`status`, parsed): "on, N µs window" or "off"; None if it does not say. With the default,
    `auto`, it depends on the machine (see `cpu_idle`), and it changes metadata figures there."""
    us = (status or {}).get("busy_poll_us")
    if us is None:
        return None
    return f"on, {us} µs window" if us else "off"


def _on_off(v):
    """The kernel's "Y"/"N" as "on"/"off"; None for an absent value."""
    return {"Y": "on", "N": "off"}.get(v, v) if v else None


def fuse_wake_here():
    """The machine's fuse `wake_here` parameter now ("on" or "off"); None on a kernel
    without it. Other FUSE filesystems run with it once no ClaudeFS mount holds it on. It
    changes metadata figures (see docs/operations.md)."""
    return _on_off(read("/sys/module/fuse/parameters/wake_here") or None)


def mount_wake_here(status):
    """The fuse `wake_here` value while a ClaudeFS mount ran, from its parsed `cfs status
    --json`, which `cfs mount` holds on by default (`--wake-here`); None if it does not
    say."""
    return _on_off(status.get("fuse_wake_here"))


def page_reporting():
    """Whether freed memory is handed back to the hypervisor (free page reporting, shown by
    a kernel that counts what it reported), as "on, N GiB so far"; None if this kernel does
    not say. Where it is on, the first touch of a page that went back costs a host fault: a
    fresh 1 GiB buffer was written at 1.7 GB/s one time and at 0.08 GB/s another on the
    2-vCPU test machine. Anything that grows the page cache (every cold read) then varies
    from run to run with which pages the kernel hands out."""
    kib = read("/sys/module/page_reporting/parameters/reported_kib")
    if kib.isdigit() and int(kib) > 0:
        return f"on, {int(kib) / (1 << 20):.0f} GiB so far"
    return None


REPORTING = "/sys/module/page_reporting/parameters/"


def _page_orders():
    """How many page orders the buddy allocator has (the columns of /proc/buddyinfo): an
    order this high is one no free block reaches, so reporting at it reports nothing."""
    line = read("/proc/buddyinfo").splitlines()[:1]
    return len(line[0].split()) - 4 if line else 0


@contextlib.contextmanager
def held_memory(log, margin=1 << 30):
    """Pauses free page reporting for the `with` block and first touches the free memory, so
    that every page the block fills is already backed by the host. On the 2-vCPU test
    machine, five alternated pairs of a 512 MiB cold `fio` read, native and ClaudeFS, ran from
    589 to 2,386 MB/s with reporting on, and right after, paused and touched, from 2,209 to
    2,451 MB/s, ClaudeFS at 0.96-0.99x native in every pair. With reporting on, the slow reads
    did the same block I/O as the fast ones (request count and size), but fio spent 68-83% of
    its time in the kernel against 48-56%, most of it copying out of the page cache: the new
    pages were slow, not the disk. (Two full runs, paused, still had passthrough's cold reads
    at either about 2.2-2.5 GB/s or 1.1-1.6 GB/s while native's stayed steady; runs of the
    sequential steps alone did not. Cause not found.) Yields what it did, for the record (None
    where reporting is off or this kernel does not say); puts the order back on the way out.
    Touching costs host faults once: 60 s for 21 GiB there. It leaves `margin` bytes untouched,
    and holds all it touched until done (a GiB let go would be the next GiB's pages)."""
    old = read(REPORTING + "page_reporting_order")
    orders = _page_orders()
    if not page_reporting() or not old.isdigit() or not orders:
        yield None
        return
    try:
        write(REPORTING + "page_reporting_order", str(orders))
    except OSError as e:
        yield f"on (could not pause it: {e.strerror})"
        return
    try:
        free = int(read_meminfo().get("MemFree", "0 kB").split()[0]) * 1024 - margin
        held, total = [], max(free, 0) >> 30
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        try:
            for i in range(total):
                log(f"\rtouching free memory so the host backs it: {i + 1}/{total} GiB", end="")
                held.append(mmap.mmap(-1, 1 << 30, flags=flags))
        except OSError as e:   # less free than MemFree said: what was touched still counts
            log(f" stopped: {e.strerror}", end="")
        finally:
            for m in held:
                m.close()
        log("")
        yield (f"paused for the run (reporting order {old} set to {orders}, above the largest "
               f"free block) after touching {len(held)} GiB of free memory; {old} put back "
               "after")
    finally:
        try:
            write(REPORTING + "page_reporting_order", old)
        except OSError as e:
            log(f"could not put page_reporting_order back to {old}: {e.strerror}")


def read_meminfo():
    """/proc/meminfo as {field: "value unit"}."""
    out = {}
    for line in read("/proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def journal(device, fstype):
    """For ext4: whether the filesystem on `device` has a journal (jbd2 lists each journal it
    runs). Without one, ext4 skips recently freed inodes at every allocation, which makes
    create-heavy figures depend on what was deleted just before (see scripts/bench, settle).
    None for other filesystems."""
    if fstype != "ext4":
        return None
    # jbd2 names the kernel's device (dm-0-8), not a /dev/mapper alias of it.
    name = os.path.basename(os.path.realpath(device))
    try:
        return any(j.startswith(name + "-") for j in os.listdir("/proc/fs/jbd2"))
    except OSError:
        return False


def drop_caches():
    """Writes back dirty data, then drops the clean page cache, dentries and inodes: for cold
    reads, and so that ext4's skipping of recently freed inodes (see `journal`) does not
    carry from one measured step into the next."""
    os.sync()
    write("/proc/sys/vm/drop_caches", "3")


def background_idle(status, missing=1):
    """True when a mount's `cfs status --json` shows no file dirty, no upload in flight and
    no deleted file whose backing file is still on flash. The daemon removes those once the
    deletion is durable, about a second later, and the flash filesystem then frees their
    blocks: after `rm` of a 512 MiB file that landed inside the next step's timed `fio`
    write, which native had paid inside the untimed unlink. `missing` stands for a tier
    count the status does not carry."""
    tier, up = status.get("tier") or {}, status.get("uploads") or {}
    return (tier.get("files_dirty", missing) == 0 and up.get("files_in_flight", missing) == 0
            and status.get("deletions_pending", 0) == 0)
