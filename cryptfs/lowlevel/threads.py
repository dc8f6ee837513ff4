"""Threads that serve one queue, started lazily in the process that uses them.

The mount daemon builds its stack, then forks to detach; threads do not
survive a fork, so every pool starts its threads on first use in the
current process (and, after a fork, starts fresh ones with a fresh queue:
the parent's queue may be mid-use).  ``None`` on the queue stops one thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Serve = Callable[[queue.SimpleQueue], None]
# Seconds ``close`` waits for its threads in all: one stuck on a backing
# filesystem that does not answer must not hang the unmount.
CLOSE_TIMEOUT = 10.0


class LazyThreads:
    def __init__(self, name: str, count: int, serve: Serve) -> None:
        self._name = name
        self._count = count
        self._serve = serve
        self._lock = threading.Lock()
        self._pid = 0  # the process the threads run in
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def queue(self) -> queue.SimpleQueue[Any]:
        """The queue the threads serve, starting them in this process if needed."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._jobs = queue.SimpleQueue()
                    self._threads = [
                        threading.Thread(target=self._serve, args=(self._jobs,),
                                         name=f"{self._name}-{i}", daemon=True)
                        for i in range(self._count)]
                    for thread in self._threads:
                        thread.start()
                    self._pid = os.getpid()
        return self._jobs

    def close(self) -> None:
        """Stop the threads after the queued jobs (idempotent; a later
        ``queue()`` starts them again), waiting at most ``CLOSE_TIMEOUT``
        seconds: threads still busy then are logged and left behind (they
        are daemon threads, so they do not keep the process alive)."""
        with self._lock:
            if self._pid != os.getpid():
                return  # none started in this process
            for _ in self._threads:
                self._jobs.put(None)
            deadline = time.monotonic() + CLOSE_TIMEOUT
            for thread in self._threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            left = [thread.name for thread in self._threads if thread.is_alive()]
            if left:
                log.warning("%d thread(s) still busy after %g s, left behind (a backing "
                            "filesystem not answering?): %s", len(left), CLOSE_TIMEOUT,
                            ", ".join(left))
            self._threads = []
            self._pid = 0
