"""Per-directory state of the backing tree, by inode: open directory
descriptors (a bounded LRU), directory IVs, and the entries shown under a
name their backing name does not decrypt to (sync-tool conflict copies,
``ShownNames``).

Descriptors are ``O_PATH`` and follow their inode, so renaming a directory
(even behind the mount's back) keeps them valid; an evicted one is reopened
by the backing tree relative to its parent's.  A descriptor in use by an
operation is *pinned* and never evicted (the cache may then hold more than
its bound until the operation ends).  The root's descriptor is not cached
here: it stays open for the life of the mount.

The inode table's ``on_gone`` callback calls ``forget`` when an inode is
dropped or its directory removed, so no operation has to.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

from cryptfs.names.resolve import Shown

DEFAULT_LIMIT = 512  # cached directory descriptors (the process has ~1024 by default)


@dataclass
class ShownNames:
    """A directory's entries shown under another name (docs/conflicts.md),
    as its last scan found them."""

    by_name: dict[bytes, Shown] = field(default_factory=dict)  # shown name ->
    by_backing: dict[bytes, Shown] = field(default_factory=dict)  # backing name ->
    diriv_copies: bool = False  # it had diriv copies: any name may be a stranded one

    def drop(self, name: bytes) -> None:
        """The shown entry ``name`` is gone (removed or renamed away)."""
        shown = self.by_name.pop(name, None)
        if shown is not None:
            self.by_backing.pop(os.fsencode(shown.backing.name), None)


class DirCache:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError("the directory descriptor cache needs room for one")
        self.limit = limit
        self._fds: OrderedDict[int, int] = OrderedDict()  # ino -> fd, least recent first
        self._pins: dict[int, int] = {}
        self._orphans: dict[int, list[int]] = {}  # forgotten while pinned: closed at unpin
        self._ivs: dict[int, bytes] = {}
        self._shown: dict[int, ShownNames] = {}

    def __len__(self) -> int:
        """Cached descriptors."""
        return len(self._fds)

    # -- descriptors --

    def fd(self, ino: int) -> int | None:
        fd = self._fds.get(ino)
        if fd is not None:
            self._fds.move_to_end(ino)
        return fd

    def put(self, ino: int, fd: int) -> None:
        """Cache a freshly opened ``fd`` (the cache owns it from now on)."""
        old = self._fds.pop(ino, None)
        if old is not None:
            self._retire(ino, old)
        self._fds[ino] = fd
        if len(self._fds) > self.limit:
            self._evict(keep=ino)

    def _evict(self, keep: int) -> None:
        for ino in list(self._fds):
            if len(self._fds) <= self.limit:
                return
            if ino != keep and ino not in self._pins:
                os.close(self._fds.pop(ino))

    def pin(self, ino: int) -> None:
        self._pins[ino] = self._pins.get(ino, 0) + 1

    def unpin(self, ino: int) -> None:
        count = self._pins[ino] - 1
        if count:
            self._pins[ino] = count
            return
        del self._pins[ino]
        for fd in self._orphans.pop(ino, ()):
            os.close(fd)
        if len(self._fds) > self.limit:
            self._evict(keep=-1)

    def drop_fds(self) -> None:
        """Close every cached descriptor (they are reopened from the root by
        name): one went stale (ESTALE: another NFS client removed or
        replaced its directory), and which ones is not known."""
        for ino, fd in list(self._fds.items()):
            del self._fds[ino]
            self._retire(ino, fd)

    def _retire(self, ino: int, fd: int) -> None:
        if ino in self._pins:
            self._orphans.setdefault(ino, []).append(fd)
        else:
            os.close(fd)

    # -- directory IVs --

    def iv(self, ino: int) -> bytes | None:
        return self._ivs.get(ino)

    def set_iv(self, ino: int, iv: bytes) -> None:
        self._ivs[ino] = iv

    # -- names shown for conflict copies --

    def shown(self, ino: int) -> ShownNames | None:
        """None: the directory was not scanned since it was last forgotten."""
        return self._shown.get(ino)

    def set_shown(self, ino: int, shown: ShownNames) -> None:
        self._shown[ino] = shown

    # -- life cycle --

    def forget(self, ino: int) -> None:
        """The directory is gone (or its inode forgotten): drop its state."""
        self._ivs.pop(ino, None)
        self._shown.pop(ino, None)
        fd = self._fds.pop(ino, None)
        if fd is not None:
            self._retire(ino, fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        for fds in self._orphans.values():
            for fd in fds:
                os.close(fd)
        self._fds.clear()
        self._orphans.clear()
        self._ivs.clear()
        self._shown.clear()
