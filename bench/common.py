"""Helpers the benchmark scripts share."""
import os
import time
import urllib.error
import urllib.request


def wait_http(url, timeout=20, poll=0.1):
    """Returns once `url` answers at all (any HTTP status); exits after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=max(1, poll * 10))
            return
        except urllib.error.HTTPError:
            return
        except Exception:
            time.sleep(poll)
    raise SystemExit(f"not reachable: {url}")


def pinned(cpus):
    """A preexec_fn that pins the child (and what it forks) to `cpus`; None for no pinning."""
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def cpu_ticks(pids):
    """utime + stime of the processes `pids`, in clock ticks (os.sysconf("SC_CLK_TCK") a
    second); a process that has gone counts nothing."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except FileNotFoundError:
            pass
    return total
