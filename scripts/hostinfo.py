"""Facts about this machine that the benchmark and the profile record next to their figures."""


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def cpu_idle():
    """The cpuidle driver, with the haltpoll driver's polling time: on a virtual machine whose
    idle vCPUs halt at once, every FUSE round trip pays hypervisor wake-ups (see
    docs/operations.md), so metadata figures depend on it."""
    driver = read("/sys/devices/system/cpu/cpuidle/current_driver") or "unknown"
    if driver == "haltpoll":
        poll = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") or "?"
        return f"{driver}, guest_halt_poll_ns {poll}"
    return driver
