"""The plaintext tree, reached only through descriptors.

Every path is walked from the descriptor of PLAINDIR one component at a
time with ``O_NOFOLLOW``: a symlink in the tree is shown as a symlink and
never followed, so nothing outside PLAINDIR is read, even when the tree
changes while mounted.  Paths are relative, as bytes, ``b""`` the root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cryptfs.lowlevel.linux import proc_path

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_XATTR_PREFIX = b"user."


def split(path: bytes) -> tuple[bytes, bytes]:
    """(parent, name) of a non-root relative path."""
    parent, _, name = path.rpartition(b"/")
    return parent, name


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class PlainTree:
    """Read-only access to the entries below one directory."""

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, _DIR & ~os.O_NOFOLLOW)
        self.dev = os.fstat(self.root_fd).st_dev

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    @contextlib.contextmanager
    def directory(self, path: bytes) -> Iterator[int]:
        """An ``O_PATH`` descriptor of directory ``path``, for the block."""
        fd = os.dup(self.root_fd)
        try:
            for part in filter(None, path.split(b"/")):
                nxt = os.open(part, _DIR, dir_fd=fd)
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def lstat(self, path: bytes) -> os.stat_result:
        if not path:
            return os.fstat(self.root_fd)
        parent, name = split(path)
        with self.directory(parent) as fd:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def listdir(self, path: bytes) -> list[tuple[bytes, os.stat_result]]:
        """Every entry of directory ``path`` with its ``lstat``; entries
        gone while listed are left out."""
        with self.directory(path) as pfd:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        out = []
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):
                        out.append((os.fsencode(entry.name), entry.stat(follow_symlinks=False)))
        finally:
            os.close(fd)
        return out

    def readlink(self, path: bytes) -> bytes:
        parent, name = split(path)
        with self.directory(parent) as fd:
            return os.fsencode(os.readlink(name, dir_fd=fd))

    def open_file(self, path: bytes) -> int:
        """A read-only descriptor of regular file ``path`` (``O_NONBLOCK``:
        an entry replaced by a fifo since must not block the open)."""
        parent, name = split(path)
        with self.directory(parent) as pfd:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=pfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileNotFoundError(f"{os.fsdecode(path)} is no longer a regular file")
        return fd

    def access(self, path: bytes, mode: int) -> bool:
        if not path:
            return os.access(proc_path(self.root_fd), mode)
        parent, name = split(path)
        with self.directory(parent) as fd:
            return os.access(name, mode, dir_fd=fd, follow_symlinks=False)

    def user_xattrs(self, path: bytes) -> dict[bytes, bytes]:
        """The user.* attributes of a regular file or directory (others have none)."""
        if path:
            parent, name = split(path)
            with self.directory(parent) as pfd:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        else:
            fd = os.dup(self.root_fd)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                return {}
            where = proc_path(fd)
            out = {}
            for name in os.listxattr(where):
                raw = os.fsencode(name)
                if raw.startswith(_XATTR_PREFIX):
                    with contextlib.suppress(OSError):  # removed meanwhile
                        out[raw] = os.getxattr(where, name)
            return out
        except OSError as exc:
            if exc.errno == errno.ENOTSUP:  # a filesystem without xattrs
                return {}
            raise
        finally:
            os.close(fd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(proc_path(self.root_fd))
