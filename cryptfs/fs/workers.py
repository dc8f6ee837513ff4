"""Worker threads for the calls that may block: disk waits, fsync, large
requests on the kernel engine.

``trio.to_thread.run_sync`` costs about 77 µs per call here (thread cache,
limiter, context copy, extra scheduler passes); this pool costs about half:
a fixed set of threads fed by a queue, each result handed back with
``TrioToken.run_sync_soon`` and ``reschedule``.  As with ``to_thread``'s
default, a call cannot be abandoned: a cancelled caller still waits for its
thread, so no codec call outlives the file lock its caller holds.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable
from typing import Any

import outcome
import trio

from cryptfs.lowlevel.threads import LazyThreads


class WorkerPool:
    def __init__(self, threads: int) -> None:
        self._threads = LazyThreads("cryptfs-worker", threads, self._work)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a worker thread; its result or exception."""
        await trio.lowlevel.checkpoint_if_cancelled()
        # Nothing yields between queuing the job and parking, so the
        # reschedule (run by the event loop) always finds the task parked.
        self._threads.queue().put((fn, args, trio.lowlevel.current_trio_token(),
                                   trio.lowlevel.current_task()))
        return await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED)

    @staticmethod
    def _work(jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not None:
            fn, args, token, task = job
            result = outcome.capture(fn, *args)
            with contextlib.suppress(trio.RunFinishedError):  # loop gone: nobody waits
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    def close(self) -> None:
        """Stop the threads after the queued calls (idempotent)."""
        self._threads.close()
