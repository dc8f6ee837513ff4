"""The FUSE edge of a reverse mount: kernel requests answered from
``ReverseView``.

Read-only twice over: the mount is made ``ro`` (the kernel refuses most
writes itself) and every handler that would change anything answers
EROFS.  Lookups and attributes are a few syscalls and run on the event
loop's thread; listings (a name encrypted per entry) and reads (pages
encrypted) run on worker threads.  The node table is touched only on the
event loop's thread.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from itertools import count

import pyfuse3
import trio

from cryptfs.errors import ContentError, FileNameError, NameDecodeError
from cryptfs.fs.ops import MountOptions
from cryptfs.fs.workers import WorkerPool
from cryptfs.reverse.content import EncryptingReader
from cryptfs.reverse.nodes import NodeTable
from cryptfs.reverse.view import Attrs, BytesReader, Kind, Place, Reader, ReverseView

log = logging.getLogger(__name__)


def reverse_op(method):
    """Map what a handler raises to a FUSE errno; nothing escapes into
    pyfuse3 (that would end the mount)."""

    @functools.wraps(method)
    async def wrapper(self, *args):
        self.last_activity = time.monotonic()
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except KeyError as exc:  # an inode or handle number we never gave
            raise pyfuse3.FUSEError(errno.ENOENT if method.__name__ != "read"
                                    else errno.EBADF) from exc
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        except (ContentError, NameDecodeError, FileNameError) as exc:
            log.warning("%s: %s", method.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except Exception as exc:
            log.exception("internal error in %s", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return wrapper


def read_only(method):
    """A handler that would change the view: always EROFS."""

    @functools.wraps(method)
    async def wrapper(self, *args):
        raise pyfuse3.FUSEError(errno.EROFS)

    return wrapper


class ReverseOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, view: ReverseView, workers: WorkerPool, options: MountOptions) -> None:
        super().__init__()
        self.view = view
        self.nodes = NodeTable()
        self.workers = workers
        self.options = options
        self.handles: dict[int, Reader] = {}
        self._opened: dict[int, Reader] = {}  # inode -> its last opened reader
        self._inode_of: dict[int, int] = {}  # file handle -> inode
        self._dirs: dict[int, tuple[int, list[tuple[str, Place, Attrs]]]] = {}
        self._numbers = count(1)
        if options.inline_max is None:
            raise ValueError("MountOptions.inline_max: resolve it from the engine first")
        self._inline_max = options.inline_max
        self.last_activity = time.monotonic()
        self.after_init: Callable[[], None] | None = None

    def init(self) -> None:
        if self.after_init is not None:
            try:
                trio.lowlevel.current_trio_token().run_sync_soon(self.after_init)
            except RuntimeError:
                log.exception("after_init not scheduled")

    def _entry(self, ino: int, attrs: Attrs) -> pyfuse3.EntryAttributes:
        out = pyfuse3.EntryAttributes()
        out.st_ino = ino
        out.generation = 0
        out.entry_timeout = self.options.entry_timeout
        out.attr_timeout = self.options.attr_timeout
        out.st_mode = attrs.mode
        out.st_nlink = attrs.nlink
        out.st_uid = attrs.uid
        out.st_gid = attrs.gid
        out.st_rdev = attrs.rdev
        out.st_size = attrs.size
        out.st_blksize = 4096
        out.st_blocks = -(-attrs.size // 512)
        out.st_atime_ns = attrs.atime_ns
        out.st_mtime_ns = attrs.mtime_ns
        out.st_ctime_ns = attrs.ctime_ns
        return out

    def _directory(self, ino: int) -> Place:
        place = self.nodes.place(ino)
        if place.kind is not Kind.ENTRY:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return place

    # -- names and attributes --

    @reverse_op
    async def lookup(self, parent_inode, name, ctx):
        parent = self._directory(parent_inode)
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            text = None  # no view name has a byte outside ASCII
        found = None if text is None else self.view.lookup(parent.path, text)
        if found is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.options.entry_timeout
            return negative
        place, attrs = found
        return self._entry(self.nodes.number(place, parent_inode), attrs)

    async def forget(self, inode_list):
        return  # numbers are kept for the whole mount (nodes.py)

    @reverse_op
    async def getattr(self, inode, ctx):
        attrs = self.view.attrs(self.nodes.place(inode))
        opened = self._opened.get(inode)
        if isinstance(opened, EncryptingReader) and opened.total != attrs.size:
            # What its reads return: the size the file had when opened.
            attrs = replace(attrs, size=opened.total)
        return self._entry(inode, attrs)

    @reverse_op
    async def readlink(self, inode, ctx):
        place = self.nodes.place(inode)
        if place.kind is not Kind.ENTRY:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self.view.readlink(place)

    @reverse_op
    async def access(self, inode, mode, ctx):
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        place = self.nodes.place(inode)
        if place.kind is not Kind.ENTRY:
            return not mode & os.X_OK
        return self.view.plain.access(place.path, mode)

    @reverse_op
    async def statfs(self, ctx):
        st = self.view.plain.statvfs()
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_files"):
            setattr(out, field, getattr(st, field))
        out.f_bfree = out.f_bavail = out.f_ffree = out.f_favail = 0
        out.f_namemax = 255
        return out

    # -- directories --

    @reverse_op
    async def opendir(self, inode, ctx):
        place = self._directory(inode)
        listing = await self.workers.run(self.view.listing, place.path)
        fh = next(self._numbers)
        self._dirs[fh] = (inode, listing)
        return fh

    @reverse_op
    async def readdir(self, fh, start_id, token):
        """``.`` and ``..`` at offsets 1 and 2, then entry ``i`` at ``i + 3``."""
        ino, listing = self._dirs[fh]
        dots = ((b".", ino), (b"..", self.nodes.parent(ino)))
        for index in range(start_id, len(dots)):
            name, dot = dots[index]
            attr = pyfuse3.EntryAttributes()
            attr.st_ino, attr.st_mode = dot, stat.S_IFDIR
            if not pyfuse3.readdir_reply(token, name, attr, index + 1):
                return
        for index in range(max(start_id - len(dots), 0), len(listing)):
            name, place, attrs = listing[index]
            entry = self._entry(self.nodes.number(place, ino), attrs)
            if not pyfuse3.readdir_reply(token, name.encode("ascii"), entry,
                                         index + len(dots) + 1):
                return

    @reverse_op
    async def releasedir(self, fh):
        del self._dirs[fh]

    # -- files --

    @reverse_op
    async def open(self, inode, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        place = self.nodes.place(inode)
        reader = await self.workers.run(self.view.open, place)
        fh = next(self._numbers)
        self.handles[fh] = reader
        self._opened[inode] = reader
        if isinstance(reader, EncryptingReader):
            # The kernel may hold a size from before the file changed: have
            # it ask again (getattr answers the size this reader encrypts
            # for), so that it neither cuts the final page nor reads past it.
            pyfuse3.invalidate_inode(inode, attr_only=True)
        self._inode_of[fh] = inode
        return pyfuse3.FileInfo(fh=fh)

    @reverse_op
    async def read(self, fh, off, size):
        reader = self.handles[fh]
        if isinstance(reader, BytesReader) or (
                size <= self._inline_max and reader.cached(off, size)):
            # A hop to a worker costs more than this read (docs/design.md,
            # Threading model)
            return reader.read(off, size)
        return await self.workers.run(reader.read, off, size)

    @reverse_op
    async def flush(self, fh):
        return

    @reverse_op
    async def fsync(self, fh, datasync):
        return

    @reverse_op
    async def release(self, fh):
        reader = self.handles.pop(fh)
        inode = self._inode_of.pop(fh)
        if self._opened.get(inode) is reader:
            del self._opened[inode]
        reader.close()

    # -- extended attributes --

    @reverse_op
    async def getxattr(self, inode, name, ctx):
        if not self.options.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENODATA)
        sealed = await self.workers.run(self.view.xattrs, self.nodes.place(inode))
        try:
            return sealed[name]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENODATA) from None

    @reverse_op
    async def listxattr(self, inode, ctx):
        if not self.options.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        sealed = await self.workers.run(self.view.xattrs, self.nodes.place(inode))
        return list(sealed)

    # -- everything that writes --

    @read_only
    async def setattr(self, inode, attr, fields, fh, ctx): ...

    @read_only
    async def mknod(self, parent_inode, name, mode, rdev, ctx): ...

    @read_only
    async def mkdir(self, parent_inode, name, mode, ctx): ...

    @read_only
    async def symlink(self, parent_inode, name, target, ctx): ...

    @read_only
    async def link(self, inode, new_parent_inode, new_name, ctx): ...

    @read_only
    async def unlink(self, parent_inode, name, ctx): ...

    @read_only
    async def rmdir(self, parent_inode, name, ctx): ...

    @read_only
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags,
                     ctx): ...

    @read_only
    async def create(self, parent_inode, name, mode, flags, ctx): ...

    @read_only
    async def write(self, fh, off, buf): ...

    @read_only
    async def setxattr(self, inode, name, value, ctx): ...

    @read_only
    async def removexattr(self, inode, name, ctx): ...

    def close(self) -> None:
        """Close the files still open (at unmount)."""
        for reader in self.handles.values():
            reader.close()
        self.handles.clear()
        self._opened.clear()
        self._inode_of.clear()
        self._dirs.clear()
