"""A per-file lock for the event loop: reads share it, writes and
truncates hold it alone.

Reads of one file may overlap (``EncryptedFile`` allows it and every engine
session is thread-safe), and the kernel does send overlapping reads: its
read-ahead asks for the next window while the program still consumes the
current one.  Sharing the lock lets the two decrypt on two worker threads.

Fair: a waiting writer holds the inner lock, so readers that arrive after it
queue behind it instead of starving it.
"""

from __future__ import annotations

import trio


class FileLock:
    __slots__ = ("_order", "_readers", "_drained")

    def __init__(self) -> None:
        self._order = trio.Lock()  # held by a writer, and by a reader only while it enters
        self._readers = 0
        self._drained: trio.Event | None = None  # a writer waits on it for readers to leave

    def free(self, exclusive: bool) -> bool:
        """True if taking the lock now would not wait: the caller may then
        run without yielding, as if it held it."""
        return not self._order.locked() and (not exclusive or self._readers == 0)

    def shared(self) -> _Shared:
        return _Shared(self)

    def exclusive(self) -> _Exclusive:
        return _Exclusive(self)


class _Shared:
    __slots__ = ("_lock",)

    def __init__(self, lock: FileLock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        lock = self._lock
        async with lock._order:
            lock._readers += 1

    async def __aexit__(self, *exc_info: object) -> None:
        lock = self._lock
        lock._readers -= 1
        if lock._readers == 0 and lock._drained is not None:
            lock._drained.set()


class _Exclusive:
    __slots__ = ("_lock",)

    def __init__(self, lock: FileLock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        lock = self._lock
        await lock._order.acquire()
        try:
            while lock._readers:
                lock._drained = trio.Event()
                await lock._drained.wait()
        except BaseException:
            lock._order.release()
            raise
        finally:
            lock._drained = None

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock._order.release()
