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
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio


class WorkerPool:
    def __init__(self, threads: int) -> None:
        self._count = threads
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pid = 0  # the process the threads run in

    def _start(self) -> None:
        """Start the threads in this process: on first use, so that the
        daemon, which forks after building its stack, has them."""
        self._pid = os.getpid()
        self._jobs = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"cryptfs-worker-{i}",
                                          daemon=True) for i in range(self._count)]
        for thread in self._threads:
            thread.start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a worker thread; its result or exception."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._pid != os.getpid():
            self._start()
        # Nothing yields between queuing the job and parking, so the
        # reschedule (run by the event loop) always finds the task parked.
        self._jobs.put((fn, args, trio.lowlevel.current_trio_token(),
                        trio.lowlevel.current_task()))
        return await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, token, task = job
            result = outcome.capture(fn, *args)
            with contextlib.suppress(trio.RunFinishedError):  # loop gone: nobody waits
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    def close(self) -> None:
        """Stop the threads after the queued calls (idempotent)."""
        if self._pid != os.getpid():
            return  # none started in this process
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._pid = 0
