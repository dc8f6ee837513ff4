"""Open files and directories.

Files: one backing descriptor and lock per inode, shared by handles.

All handles of an inode share one ``OpenFile``: one backing descriptor (so
size changes are seen by every handle at once), one ``EncryptedFile`` (its
header read and authenticated once), and one ``FileLock``: writes and
truncates hold it alone (they read-modify-write the edge and final pages,
so they must not interleave with each other or with reads), reads share
it.  Other files proceed in parallel.

An ``OpenFile`` is counted: each handle holds a reference, and so does each
request that uses it across an await (``held``), such as a
truncate by path or a first xattr of an open file.  Its descriptor closes
only when the count reaches zero: a RELEASE while such a request waits
would otherwise close a descriptor the request is about to use, whose
number the next open may already have reused for another file, and a new
open of the inode would get a second lock.

Directories: a handle remembers its inode and the listing snapshot that
``readdir`` continues from.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cryptfs.content.codec import ContentCodec, EncryptedFile
from cryptfs.errors import StaleHandleError
from cryptfs.fs.filelock import FileLock

Opener = Callable[[int], int]  # open flags -> backing descriptor


@dataclass
class OpenFile:
    ino: int
    fd: int
    file: EncryptedFile
    writable: bool
    refs: int = 0  # open handles plus requests using it now (closed at zero)
    lock: FileLock = field(default_factory=FileLock)


def closed_state(st: os.stat_result) -> int:
    """A file's backing mtime and size as one int, exactly (the size takes
    the low 64 bits): kept for every file closed while the kernel holds its
    inode, which can be every file of a large tree, and one int costs a
    third of a tuple of two."""
    return st.st_mtime_ns << 64 | st.st_size


class HandleTable:
    def __init__(self, codec: ContentCodec, read_only: bool = False,
                 shared: bool = False) -> None:
        """``shared``: others write the backing files too (``--shared``)."""
        self._codec = codec
        self._read_only = read_only
        self._shared = shared
        self._by_ino: dict[int, OpenFile] = {}
        self._by_fh: dict[int, OpenFile] = {}
        self._next_fh = 1
        # Backing mtime and size (``closed_state``) when each inode's last
        # handle closed: if unchanged at the next open, the kernel may keep
        # its page cache.
        self._closed_state: dict[int, int] = {}
        # Shared: (backing mtime, size, ctime) at each inode's last open.
        self._opened_state: dict[int, tuple[int, int, int]] = {}

    def open(self, ino: int, opener: Opener, write: bool) -> tuple[int, OpenFile, bool]:
        """A new handle on ``ino`` (``opener`` opens its backing file if it is
        not open yet); returns (fh, open file, keep_cache)."""
        current = self._by_ino.get(ino)
        if current is not None and write and not current.writable:
            raise OSError(errno.EACCES, "backing file is not writable")
        if current is None:
            fd = self._open_backing(opener, write)
            try:
                current = self.adopt(ino, fd)
            except BaseException:
                os.close(fd)
                raise
            st = os.fstat(current.fd)
            keep_cache = self._closed_state.pop(ino, None) == closed_state(st)
        else:
            keep_cache = True  # open already: the kernel's cache is current
        if self._shared:
            keep_cache = self._unchanged_since_open(current)
        current.refs += 1
        return self._new_fh(current), current, keep_cache

    def _unchanged_since_open(self, opened: OpenFile) -> bool:
        """Shared: whether the backing file is as it was at this inode's
        last open here (mtime, size and ctime: a rewrite that restores the
        size and mtime still changes the ctime).  Checked even while it is
        open: another mounter may have written it meanwhile.  Taken at
        open, not at close, so a change made elsewhere just before our
        close is not mistaken for ours; our own writes then cost the cache
        at the next open."""
        st = os.fstat(opened.fd)
        state = (st.st_mtime_ns, st.st_size, st.st_ctime_ns)
        previous = self._opened_state.get(opened.ino)
        self._opened_state[opened.ino] = state
        return previous == state

    def _open_backing(self, opener: Opener, write: bool) -> int:
        if self._read_only:
            return opener(os.O_RDONLY)
        try:  # writers need reads too (read-modify-write of partial pages)
            return opener(os.O_RDWR)
        except PermissionError:
            if write:
                raise
            return opener(os.O_RDONLY)

    def adopt(self, ino: int, fd: int) -> OpenFile:
        """Wrap a backing descriptor, reading its header (the caller still
        owns ``fd`` if this raises)."""
        file = self._codec.open(fd)
        accmode = os.O_RDONLY if self._read_only else _accmode(fd)
        opened = OpenFile(ino, fd, file, writable=accmode != os.O_RDONLY)
        self._by_ino[ino] = opened
        return opened

    def create_handle(self, opened: OpenFile) -> int:
        opened.refs += 1
        return self._new_fh(opened)

    @contextlib.contextmanager
    def held(self, opened: OpenFile) -> Iterator[OpenFile]:
        """Keep ``opened`` (its descriptor, its lock) for the block, a
        request that uses it across an await, even if its last handle is
        released meanwhile."""
        opened.refs += 1
        try:
            yield opened
        finally:
            self._drop(opened)

    def _drop(self, opened: OpenFile) -> None:
        """End a handle or a hold: the last one closes the descriptor."""
        opened.refs -= 1
        if opened.refs == 0:
            self._close(opened)

    def _new_fh(self, opened: OpenFile) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._by_fh[fh] = opened
        return fh

    def __len__(self) -> int:
        """Open handles (the filesystem is not idle while any exist)."""
        return len(self._by_fh)

    def get(self, fh: int) -> OpenFile:
        opened = self._by_fh.get(fh)
        if opened is None:
            raise StaleHandleError(f"file handle {fh} is not open")
        return opened

    def by_ino(self, ino: int) -> OpenFile | None:
        return self._by_ino.get(ino)

    def release(self, fh: int) -> None:
        opened = self.get(fh)
        del self._by_fh[fh]
        self._drop(opened)

    def _close(self, opened: OpenFile) -> None:
        del self._by_ino[opened.ino]
        try:
            st = os.fstat(opened.fd)
            self._closed_state[opened.ino] = closed_state(st)
        finally:
            os.close(opened.fd)

    def forget(self, ino: int) -> None:
        self._closed_state.pop(ino, None)
        self._opened_state.pop(ino, None)

    def close_all(self) -> None:
        for opened in self._by_ino.values():
            os.close(opened.fd)
        self._by_ino.clear()
        self._by_fh.clear()


def _accmode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


T = TypeVar("T")


class DirHandleTable(Generic[T]):
    """Open directories: each handle's inode and listing snapshot."""

    def __init__(self) -> None:
        self._ino: dict[int, int] = {}
        self._listing: dict[int, list[T]] = {}
        self._next_fh = 1

    def open(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._ino[fh] = ino
        return fh

    def ino(self, fh: int) -> int:
        ino = self._ino.get(fh)
        if ino is None:
            raise StaleHandleError(f"directory handle {fh} is not open")
        return ino

    def listing(self, fh: int, start_id: int, read: Callable[[int], list[T]]) -> list[T]:
        """The entries ``readdir`` serves from: read afresh (``read(ino)``)
        at the start of a listing, then the same snapshot as it continues."""
        ino = self.ino(fh)
        if start_id == 0 or fh not in self._listing:
            self._listing[fh] = read(ino)
        return self._listing[fh]

    def release(self, fh: int) -> None:
        self.ino(fh)
        del self._ino[fh]
        self._listing.pop(fh, None)

    def __len__(self) -> int:
        return len(self._ino)
