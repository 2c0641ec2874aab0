"""Processes as Linux's /proc shows them: alive, command line, children. Standard library only.

Shared by ``refit stack`` (stopping a service and everything it started) and
``refit.orphans`` (a guard process that must start in milliseconds).
"""

from __future__ import annotations

import os
from pathlib import Path


def cmdline(pid: int) -> str:
    """The process's command line, words joined by spaces; empty if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie is dead for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first: some sit in a session of their own, out of a group's reach."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _start_ticks(pid: int) -> str | None:
    """When the process started, in clock ticks since boot (field 22 of /proc/PID/stat): tells a recycled pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def identity(pid: int | None = None) -> str:
    """``host:pid:start`` of this (or that) process: recorded on a run so a later one can tell if it still lives."""
    import socket

    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or '?'}"


def gone(process: str) -> bool | None:
    """Whether the process that ``identity`` named has ended: None when it ran on another host (not ours to judge)."""
    import socket

    try:
        host, pid, start = process.rsplit(":", 2)
        pid_number = int(pid)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    return not alive(pid_number) or _start_ticks(pid_number) != start


def available_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 quota (``cpu.max``) if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def side_by_side(fn, items: list, workers: int | None = None) -> list:
    """``[fn(item) for item in items]``, up to ``workers`` (default: ``available_cpus``) at once in threads.

    For calls that leave Python's lock while they work (an ONNX Runtime
    ``run`` on one intra-op thread): a pass per core, with no threads
    splitting one small batch. One worker, or one item, runs them in order here.
    """
    workers = min(workers or available_cpus(), len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="refit-side-by-side") as pool:
        return list(pool.map(fn, items))
