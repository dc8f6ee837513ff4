"""A bounded LRU of per-file cipher sessions.

A kernel session costs a tfm socket plus up to two channels (a socket and a
pipe each), so thousands of open files must not each keep one.  Sessions are
created on first use (deriving the file's key from its ID), shared by every
handle of that file, and closed when they fall out of the LRU and no thread
is using them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from cryptfs.engines.base import XtsEngine, XtsSession
from cryptfs.keys.hierarchy import KeyRing

DEFAULT_CAPACITY = 128


@dataclass
class _Entry:
    session: XtsSession
    users: int = 0


class _Borrowed:
    """``with cache.session(file_id) as session``: a plain class, not a
    generator context manager, which would cost more than a 4 KiB read."""

    __slots__ = ("_cache", "_file_id", "_entry")

    def __init__(self, cache: SessionCache, file_id: bytes) -> None:
        self._cache, self._file_id = cache, file_id

    def __enter__(self) -> XtsSession:
        self._entry = self._cache._checkout(self._file_id)
        return self._entry.session

    def __exit__(self, *exc_info: object) -> None:
        self._cache._checkin(self._entry)


class SessionCache:
    def __init__(self, engine: XtsEngine, keys: KeyRing,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self._engine = engine  # its owner (daemon/mount.py Stack) closes it, not this
        self._keys = keys
        self._capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._retired: list[_Entry] = []  # evicted while in use

    def session(self, file_id: bytes) -> _Borrowed:
        """Borrow the session of ``file_id`` for the duration of a ``with`` block."""
        return _Borrowed(self, file_id)

    def _checkout(self, file_id: bytes) -> _Entry:
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is not None:
                self._entries.move_to_end(file_id)
                entry.users += 1
                return entry
        # Key derivation and socket setup happen outside the lock.
        fresh = _Entry(self._engine.open_session(self._keys.content_key(file_id)))
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is None:
                entry = self._entries[file_id] = fresh
                fresh = None
            entry.users += 1
            victims = self._evict()
        if fresh is not None:  # another thread won the race
            fresh.session.close()
        for victim in victims:
            victim.session.close()
        return entry

    def _checkin(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            close = entry.users == 0 and entry in self._retired
            if close:
                self._retired.remove(entry)
        if close:
            entry.session.close()

    def _evict(self) -> list[_Entry]:
        """Drop least recently used sessions beyond capacity (lock held)."""
        victims = []
        while len(self._entries) > self._capacity:
            _, entry = self._entries.popitem(last=False)
            if entry.users:
                self._retired.append(entry)
            else:
                victims.append(entry)
        return victims

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            entries = list(self._entries.values()) + self._retired
            self._entries.clear()
            self._retired.clear()
        for entry in entries:
            entry.session.close()
