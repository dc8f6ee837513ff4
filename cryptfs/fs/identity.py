"""Which file a backing inode number stands for, for ``--shared`` mounts.

The inode table keys inodes by backing ``(st_dev, st_ino)``.  Another mounter
may delete a file and create another that the backing filesystem gives the
same inode number (ext4 reuses freed numbers at once; an NFS server passes its
own filesystem's on).  Within one mount ``BackingTree`` sees every create and
says so (``fresh``); a shared mount sees only the result, so it compares what
makes a backing entry this file and no other:

- a regular file: the start of its header (magic, flags, file ID: written once
  per file, never changed; a file without one yet has none);
- a directory: its ``cryptfs.diriv``;
- a symlink: its stored target (a symlink's target never changes).

Reading that costs a read per entry, so it is read again only when the
entry's ctime changed (any of those changes sets it).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from cryptfs.names.filenames import DIRIV_LEN, DIRIV_NAME

# The header's fixed fields (magic, version, flags, file ID) and the start of
# its MAC: all fixed when the header is written.
HEADER_ID_BYTES = 64
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True, slots=True)
class Identity:
    ctime_ns: int  # the backing entry's ctime when ``token`` was read
    kind: int  # stat.S_IFMT
    token: bytes | None  # None: it could not be read (no permission, raced away)


def read_identity(dir_fd: int, name: str, st: os.stat_result) -> Identity:
    """The identity of entry ``name`` in ``dir_fd`` (attributes ``st``)."""
    kind = stat.S_IFMT(st.st_mode)
    try:
        token = _token(dir_fd, name, kind)
    except OSError:
        token = None
    return Identity(st.st_ctime_ns, kind, token)


def _token(dir_fd: int, name: str, kind: int) -> bytes:
    if kind == stat.S_IFLNK:
        return os.fsencode(os.readlink(name, dir_fd=dir_fd))
    if kind == stat.S_IFREG:
        fd = os.open(name, _READ, dir_fd=dir_fd)
        try:
            return os.pread(fd, HEADER_ID_BYTES, 0)
        finally:
            os.close(fd)
    if kind == stat.S_IFDIR:
        fd = os.open(name, _READ | os.O_DIRECTORY, dir_fd=dir_fd)
        try:
            iv = os.open(DIRIV_NAME, _READ, dir_fd=fd)
        finally:
            os.close(fd)
        try:
            return os.read(iv, DIRIV_LEN)
        finally:
            os.close(iv)
    return b""


def same_file(old: Identity, new: Identity) -> bool:
    """Whether ``new`` is the file ``old`` was read from.  Unknown tokens
    count as the same (nothing says otherwise); so does a regular file that
    had no header and has one now (its first write since)."""
    if old.kind != new.kind:
        return False
    if old.token is None or new.token is None or old.token == new.token:
        return True
    return old.kind == stat.S_IFREG and old.token == b""
