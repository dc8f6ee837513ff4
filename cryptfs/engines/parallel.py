"""Splitting large runs across threads, for engines that cipher with the GIL
released (the native OpenSSL helper, AF_ALG).

A run of at least ``SPLIT_MIN_UNITS`` units (256 KiB: the kernel's 1 MiB
writeback writes gain from a second thread, its 128 KiB readahead reads
lose, measured on 2 cores; gocryptfs splits from 32 blocks) is cut at page
boundaries into parts of at least ``PART_MIN_UNITS`` units. The calling
thread ciphers the first part and queues the others for a few helper
threads; when done it takes back any queued part no helper has started yet,
so a run never waits for busy helpers. Every part writes its own slice of
the output, so the bytes are those of one serial call. The caller returns
only when every part is done, and re-raises the first part's exception, if
any.

The helpers are started on first use in the process that uses them (the
mount daemon forks after building its engine; see ``fs/workers.py``) and
stopped by ``close()``.  ``CRYPTFS_RUN_THREADS`` (read by the command line
into ``EngineOptions.run_threads``) sets how many threads a run may use (1
turns splitting off): where waking another CPU costs more than it saves
(busy or virtual machines), ``scripts/bench`` decides.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from cryptfs.engines.base import PAGE_SIZE, unit_count
from cryptfs.errors import EngineUnavailableError
from cryptfs.lowlevel.threads import LazyThreads

SPLIT_MIN_UNITS = 64
PART_MIN_UNITS = 16
MAX_THREADS = 4  # the caller plus up to three helpers
THREADS_ENV = "CRYPTFS_RUN_THREADS"  # read in cli/common.py

# work(start, end) ciphers bytes [start, end) of the run; start is a multiple
# of PAGE_SIZE, so unit start // PAGE_SIZE of the run is the part's first unit.
Work = Callable[[int, int], None]


def default_helpers() -> int:
    """One helper per CPU beyond two, at most three: one CPU runs the event
    loop receiving requests and one the program making them (on 2 CPUs a
    split measured no faster for 1 MiB writes and slower for 128 KiB reads:
    the other CPU is never idle)."""
    return max(0, min(len(os.sched_getaffinity(0)) - 1, MAX_THREADS) - 1)


def run_threads(wanted: str) -> int:
    """The value of ``CRYPTFS_RUN_THREADS`` as a thread count (checked)."""
    if not wanted.isdigit() or not 1 <= int(wanted) <= MAX_THREADS:
        raise EngineUnavailableError(
            f"{THREADS_ENV} must be a whole number from 1 to {MAX_THREADS}, not {wanted!r}")
    return int(wanted)


def split(length: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` spans ``(start, end)`` of a run, cut between whole units (the
    last span keeps the final, possibly longer, unit)."""
    count = unit_count(length)
    cuts = [count * i // parts * PAGE_SIZE for i in range(parts)]
    return list(zip(cuts, [*cuts[1:], length], strict=True))


class _Part:
    __slots__ = ("work", "start", "end", "claim", "done", "error")

    def __init__(self, work: Work, start: int, end: int) -> None:
        self.work, self.start, self.end = work, start, end
        self.claim = threading.Lock()  # whoever acquires it runs the part
        self.done = threading.Lock()  # held until the part has run
        self.done.acquire()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.work(self.start, self.end)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.release()


class ParallelRuns:
    def __init__(self, helpers: int | None = None) -> None:
        self.helpers = default_helpers() if helpers is None else helpers
        self._threads = LazyThreads("cryptfs-split", self.helpers, self._serve)

    def parts(self, length: int) -> int:
        """How many parts a run of ``length`` bytes is split into."""
        count = unit_count(length)
        if count < SPLIT_MIN_UNITS:
            return 1
        return max(1, min(self.helpers + 1, count // PART_MIN_UNITS))

    def run(self, length: int, work: Work) -> None:
        """``work`` over the whole run, in parts on several threads if it is large."""
        parts = self.parts(length)
        if parts == 1:
            work(0, length)
            return
        jobs = [_Part(work, start, end) for start, end in split(length, parts)]
        helpers = self._threads.queue()
        for job in jobs[1:]:
            helpers.put(job)
        error = None
        for job in jobs:  # ours first, then any part no helper has taken yet
            if job.claim.acquire(blocking=False):
                job.run()
        for job in jobs:
            job.done.acquire()
            error = error or job.error
        if error is not None:
            raise error

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[_Part | None]) -> None:
        while (job := jobs.get()) is not None:
            if job.claim.acquire(blocking=False):
                job.run()

    def close(self) -> None:
        """Stop the helpers (idempotent; a later run starts them again)."""
        self._threads.close()
