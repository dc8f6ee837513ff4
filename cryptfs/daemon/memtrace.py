"""A memory report of the running daemon, for finding what holds its RSS.

``CRYPTFS_MEMDUMP=FILE`` (read by the command line) makes every ``SIGUSR2``
append to FILE the daemon's RSS figures from /proc and the Python object
types holding the most objects; with ``PYTHONTRACEMALLOC=N`` set as well
(Python then traces allocations from the start, at a cost in speed) also
the largest allocation sites.  Only sizes, counts and source lines: never
data or keys.
"""

from __future__ import annotations

import collections
import gc
import signal
import sys
import time
import tracemalloc
from pathlib import Path

ENV = "CRYPTFS_MEMDUMP"
TOP = 25
_STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads")


def start(path: str) -> None:
    """Dump to ``path`` on every SIGUSR2 (call in the main thread)."""
    signal.signal(signal.SIGUSR2, lambda signum, frame: dump(Path(path)))


def dump(path: Path) -> None:
    """Append the process's RSS figures, object counts and (when tracing)
    top allocation sites to ``path``."""
    lines = [f"== {time.strftime('%H:%M:%S')} " + status_line()]
    lines += type_counts()
    if tracemalloc.is_tracing():
        lines += allocation_sites()
    with path.open("a") as out:
        out.write("\n".join(lines) + "\n")


def type_counts() -> list[str]:
    """The object types with the most live objects that the collector
    tracks (str, bytes and int are not tracked: their holders are)."""
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    return [f"{sizes[name] / 2**20:8.2f} MiB {count:8d} {name}"
            for name, count in counts.most_common(TOP)]


def allocation_sites() -> list[str]:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__),))
    traced, peak = tracemalloc.get_traced_memory()
    lines = [f"traced {traced / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB"]
    for stat in snapshot.statistics("traceback")[:TOP]:
        lines.append(f"{stat.size / 2**20:8.2f} MiB {stat.count:8d} blocks")
        lines += [f"    {line}" for line in stat.traceback.format()]
    return lines


def status_line() -> str:
    """The RSS figures of /proc/self/status, in MiB (threads as a count)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            fields[key] = int(value.split()[0])
    return ", ".join(f"{k} {v}" if k == "Threads" else f"{k} {v / 1024:.1f} MiB"
                     for k, v in fields.items())
