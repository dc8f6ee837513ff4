"""Open file description (OFD) byte-range locks (``F_OFD_SETLKW``).

An OFD lock belongs to the open file description, not to the process: two
descriptors opened separately in one process exclude each other just as two
machines do, and the lock goes away when the description is closed.  Over
NFSv4 the client sends them to the server (and each lock and unlock is a
cache coherency point: docs/design.md "Byte-range locks").

A range is ``(start, end)`` in bytes, ``end`` None meaning "to the end of
the file and beyond" (``l_len`` 0).  ``exclusive`` takes the ranges in
ascending order, one call per merged range, so that holders of ordered sets
can never wait for each other in a cycle (OFD locks have no deadlock
detection in the kernel).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

Range = tuple[int, int | None]

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
# struct flock: l_type, l_whence (short), l_start, l_len (off_t), l_pid (int),
# padded to the alignment of off_t (32 bytes on LP64).
_FLOCK = struct.Struct("hhqqi0q")
EDEADLK_TRIES = 20  # an NFS server's deadlock detector can be wrong for OFD owners


class RangeLockError(OSError):
    """A byte-range lock could not be taken (ENOLCK, ...): the operation that
    needed it is refused rather than done unlocked."""


def merged(ranges: Iterable[Range]) -> list[Range]:
    """``ranges`` sorted by start, overlapping or touching ones joined."""
    out: list[list] = []
    for start, end in sorted(ranges, key=lambda r: r[0]):
        if end is not None and end <= start:
            continue
        if out and (out[-1][1] is None or start <= out[-1][1]):
            last = out[-1]
            last[1] = None if end is None or last[1] is None else max(last[1], end)
        else:
            out.append([start, end])
    return [(start, end) for start, end in out]


def covers(held: list[Range], wanted: Iterable[Range]) -> bool:
    """Whether merged ``held`` ranges contain every one of ``wanted``."""
    for start, end in merged(wanted):
        if not any(a <= start and (b is None or (end is not None and end <= b))
                   for a, b in held):
            return False
    return True


def _fcntl(fd: int, cmd: int, kind: int, start: int, end: int | None) -> bytes:
    arg = _FLOCK.pack(kind, os.SEEK_SET, start, 0 if end is None else end - start, 0)
    while True:
        try:
            return fcntl.fcntl(fd, cmd, arg)
        except InterruptedError:  # a signal while waiting: wait again
            continue


def _lock(fd: int, kind: int, start: int, end: int | None) -> None:
    try:
        _fcntl(fd, F_OFD_SETLKW, kind, start, end)
    except OSError as exc:
        if exc.errno == errno.EDEADLK:
            raise
        where = f"bytes {start}..{'EOF' if end is None else end}"
        log.error("cannot lock %s of a backing file (descriptor %d): %s; the operation "
                  "is refused rather than done without the lock", where, fd,
                  os.strerror(exc.errno or errno.ENOLCK))
        raise RangeLockError(exc.errno or errno.ENOLCK,
                             f"byte-range lock on {where} refused: "
                             f"{os.strerror(exc.errno or errno.ENOLCK)}") from exc


def unlock(fd: int, ranges: Iterable[Range]) -> None:
    """Release ``ranges``; every one is tried before a failure is raised."""
    failed: OSError | None = None
    for start, end in ranges:
        try:
            _fcntl(fd, F_OFD_SETLKW, fcntl.F_UNLCK, start, end)
        except OSError as exc:
            log.error("cannot unlock bytes %d..%s of a backing file (descriptor %d): %s",
                      start, end, fd, exc)
            failed = exc
    if failed is not None:
        raise failed


def acquire(fd: int, ranges: list[Range], kind: int = fcntl.F_WRLCK) -> None:
    """Lock merged ``ranges`` in ascending order, waiting for each; on any
    failure nothing stays locked.  EDEADLK (only an NFS server reports it for
    OFD locks; the order makes a true cycle impossible) releases everything
    and tries again after a short random pause."""
    for attempt in range(EDEADLK_TRIES):
        held: list[Range] = []
        try:
            for start, end in ranges:
                _lock(fd, kind, start, end)
                held.append((start, end))
            return
        except OSError as exc:
            unlock(fd, held)
            if exc.errno != errno.EDEADLK or attempt == EDEADLK_TRIES - 1:
                raise
        time.sleep(random.uniform(0.001, 0.01 * (attempt + 1)))


@contextmanager
def exclusive(fd: int, ranges: Iterable[Range]) -> Iterator[None]:
    """Hold write locks on ``ranges`` for the ``with`` block (no other lock
    of this open file description may be taken meanwhile: all are
    released at the end, in one call)."""
    held = merged(ranges)
    acquire(fd, held)
    try:
        yield
    finally:
        unlock(fd, [(held[0][0], None)] if held else [])


def holder(fd: int, start: int, end: int | None, kind: int = fcntl.F_WRLCK) -> int:
    """``F_OFD_GETLK``: the type of a lock (held through another open file
    description) that would conflict with ``kind`` on the range, or
    ``F_UNLCK`` if there is none."""
    reply = _fcntl(fd, F_OFD_GETLK, kind, start, end)
    return _FLOCK.unpack(reply)[0]


class SharedReads:
    """Read locks on one descriptor for threads that read concurrently.

    Locks of one open file description merge: a thread unlocking its range
    would also drop the overlap another thread still reads.  So each range
    is registered before it is locked, and an unlock releases only what no
    registered range covers (the unlock runs under the mutex; the lock,
    which may wait, outside it).  Writes must not run concurrently with
    reads on the same descriptor (the caller's per-file lock sees to that):
    a write lock converts the read locks it overlaps.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._mutex = threading.Lock()
        self._active: list[Range] = []

    @contextmanager
    def hold(self, ranges: Iterable[Range]) -> Iterator[None]:
        wanted = merged(ranges)
        with self._mutex:
            self._active.extend(wanted)
        try:
            acquire(self._fd, wanted, fcntl.F_RDLCK)
        except BaseException:
            self._release(wanted)
            raise
        try:
            yield
        finally:
            self._release(wanted)

    def _release(self, ranges: list[Range]) -> None:
        with self._mutex:
            for r in ranges:
                self._active.remove(r)
            if self._active:
                unlock(self._fd, _subtract(ranges, merged(self._active)))
            else:  # the last reader: nothing else of this description is locked
                unlock(self._fd, [(0, None)])


def _subtract(ranges: list[Range], others: list[Range]) -> list[Range]:
    """The parts of merged ``ranges`` that no merged ``others`` range covers."""
    out: list[Range] = []
    for start, end in ranges:
        pieces: list[Range] = [(start, end)]
        for a, b in others:
            cut: list[Range] = []
            for s, e in pieces:
                if (e is not None and e <= a) or (b is not None and b <= s):
                    cut.append((s, e))  # no overlap
                    continue
                if s < a:
                    cut.append((s, a))
                if b is not None and (e is None or b < e):
                    cut.append((b, e))
            pieces = cut
        out.extend(pieces)
    return out
