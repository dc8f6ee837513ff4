"""The FUSE edge: ``Operations`` turns kernel requests into backing-tree and
codec calls, and typed errors into errno values.

Everything it needs is injected (``mount.py`` builds the pieces; tests can
build them on a temporary directory).  Bulk data (read, write, truncate,
fsync) runs in worker threads, off the trio thread, under the file's lock;
metadata operations are single syscalls and run inline.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import stat
import time
from dataclasses import dataclass

import pyfuse3

from cryptfs.content.codec import ContentCodec
from cryptfs.errors import (
    ContentError,
    FileNameError,
    InvalidNameError,
    NameDecodeError,
    NameTooLongError,
)
from cryptfs.fs.handles import HandleTable, OpenFile
from cryptfs.fs.inodes import ROOT_INODE, InodeTable
from cryptfs.fs.tree import BackingTree
from cryptfs.fs.workers import WorkerPool
from cryptfs.metadata import XATTR_PREFIX, MetadataCipher
from cryptfs.names import DIRIV_NAME, BackingName

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class MountOptions:
    read_only: bool = False
    allow_other: bool = False  # other users may enter; the kernel checks permissions
    entry_timeout: float = 1.0  # seconds the kernel may cache names and attributes
    attr_timeout: float = 1.0
    writeback_cache: bool = True
    worker_threads: int = 4
    # Reads and writes up to this size whose backing pages are in memory run
    # on the event loop's thread: a hop to a worker thread costs more than
    # they do.  None: the engine's ``inline_max``.
    inline_max: int | None = None


def _renameat2(old: bytes, new: bytes, flags: int) -> None:
    at_fdcwd = -100
    if _libc.renameat2(at_fdcwd, old, at_fdcwd, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fuse_op(method):
    """Map what a handler raises to a FUSE errno; never let an exception
    escape into pyfuse3 (that would take down the whole mount)."""

    @functools.wraps(method)
    async def wrapper(self, *args):
        self.last_activity = time.monotonic()
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except NameTooLongError as exc:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG) from exc
        except InvalidNameError as exc:
            raise pyfuse3.FUSEError(errno.EINVAL) from exc
        except (ContentError, NameDecodeError, FileNameError) as exc:
            log.warning("%s: %s", method.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        except KeyError as exc:  # an inode or handle the kernel no longer has
            raise pyfuse3.FUSEError(errno.ENOENT) from exc
        except Exception as exc:
            log.exception("internal error in %s", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, inodes: InodeTable, tree: BackingTree, handles: HandleTable,
                 codec: ContentCodec, metadata: MetadataCipher, workers: WorkerPool,
                 options: MountOptions) -> None:
        super().__init__()
        self.inodes = inodes
        self.tree = tree
        self.handles = handles
        self.codec = codec
        self.metadata = metadata
        self.options = options
        self.enable_writeback_cache = options.writeback_cache
        self.workers = workers
        self._inline_max = (codec.sessions.engine.inline_max if options.inline_max is None
                            else options.inline_max)
        self._dirs: dict[int, list] = {}  # directory handle -> listing snapshot
        self._dir_ino: dict[int, int] = {}
        self._next_dir_fh = 1
        self._as_root = os.geteuid() == 0
        self._reported: set[tuple[str, str]] = set()  # damaged files already logged
        self.last_activity = time.monotonic()  # for --idle

    # -- helpers --

    async def _in_thread(self, fn, *args):
        return await self.workers.run(fn, *args)

    def _attrs(self, ino: int, st: os.stat_result, path: bytes | None = None):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.generation = 0
        attr.entry_timeout = self.options.entry_timeout
        attr.attr_timeout = self.options.attr_timeout
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = self._plain_size(st, path)
        attr.st_blksize = 4096
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _plain_size(self, st: os.stat_result, path: bytes | None) -> int:
        if stat.S_ISREG(st.st_mode):
            try:
                return self.codec.plaintext_size(st.st_size)
            except ContentError:
                return 0  # reading it gives EIO (and the log line names it)
        if stat.S_ISLNK(st.st_mode) and path is not None:
            try:
                return len(self.metadata.decrypt_target(os.readlink(path)))
            except (OSError, NameDecodeError):
                return st.st_size
        return st.st_size

    def _stat(self, ino: int) -> tuple[os.stat_result, bytes | None]:
        opened = self.handles.by_ino(ino)
        if opened is not None:  # works even if every name was unlinked
            return os.fstat(opened.fd), None
        path = self.inodes.path(ino)
        return os.lstat(path), path

    def _chown_new(self, path: bytes, ctx) -> None:
        """Files created by root's daemon for another user belong to that user."""
        if self._as_root and (ctx.uid, ctx.gid) != (0, 0):
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)

    def _new_entry(self, parent: int, entry: BackingName, path: bytes, fresh: bool = True):
        """The attributes of an entry just made at ``path`` (a new backing
        inode unless ``fresh`` is False, as for a hard link)."""
        st = os.lstat(path)
        inode = self.inodes.remember(parent, entry.name.encode(), st, fresh=fresh)
        return self._attrs(inode.ino, st, path)

    def _check_writable(self) -> None:
        if self.options.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    # -- names and attributes --

    @fuse_op
    async def lookup(self, parent_inode, name, ctx):
        entry = self.tree.entry(parent_inode, name)
        path = self.tree.path(parent_inode, entry)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.options.entry_timeout
            return negative
        inode = self.inodes.remember(parent_inode, entry.name.encode(), st)
        return self._attrs(inode.ino, st, path)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            self.inodes.forget(ino, count)
            if ino not in self.inodes:
                self.tree.forget_dir(ino)
                self.handles.forget(ino)

    @fuse_op
    async def getattr(self, inode, ctx):
        st, path = self._stat(inode)
        return self._attrs(inode, st, path)

    @fuse_op
    async def setattr(self, inode, attr, fields, fh, ctx):
        self._check_writable()
        if fields.update_size:
            await self._truncate(inode, attr.st_size)
        opened = self.handles.by_ino(inode)
        # An open file is changed through its descriptor: no path walk, and
        # it works after the last name is gone.  Otherwise by path, never
        # following a symlink.
        target: int | bytes = opened.fd if opened is not None else self.inodes.path(inode)
        nofollow = {} if opened is not None else {"follow_symlinks": False}
        st = os.stat(target, **nofollow)
        if fields.update_mode and not stat.S_ISLNK(st.st_mode):
            os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(target, uid, gid, **nofollow)
        if fields.update_atime or fields.update_mtime:
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(target, ns=(atime, mtime), **nofollow)
        st = os.stat(target, **nofollow)
        return self._attrs(inode, st, None if opened is not None else target)

    async def _truncate(self, ino: int, size: int) -> None:
        opened = self.handles.by_ino(ino)
        if opened is not None:
            await self._file_io(opened, opened.file.truncate, size)
            return
        try:
            fh, opened, _ = self.handles.open(ino, self.inodes.path(ino), write=True)
        except ContentError as exc:
            raise self._content_error(ino, exc) from exc
        try:
            await self._file_io(opened, opened.file.truncate, size)
        finally:
            self.handles.release(fh)

    @fuse_op
    async def readlink(self, inode, ctx):
        return self.metadata.decrypt_target(os.readlink(self.inodes.path(inode)))

    # -- creating and removing --

    @fuse_op
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._check_writable()
        if stat.S_ISREG(mode):
            fi, attr = await self.create(parent_inode, name, mode, os.O_WRONLY, ctx)
            await self.release(fi.fh)
            return attr
        with self.tree.creating(parent_inode, name) as (entry, path):
            os.mknod(path, mode & ~ctx.umask, rdev)
        self._chown_new(path, ctx)
        return self._new_entry(parent_inode, entry, path)

    @fuse_op
    async def mkdir(self, parent_inode, name, mode, ctx):
        self._check_writable()
        with self.tree.creating(parent_inode, name) as (entry, path):
            os.mkdir(path, 0o700)  # owner-writable until its IV is in place
            try:
                self.tree.init_dir(path)
                os.chmod(path, stat.S_IMODE(mode & ~ctx.umask))
                self._chown_new(path, ctx)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(path + b"/" + DIRIV_NAME.encode())
                    os.rmdir(path)
                raise
        return self._new_entry(parent_inode, entry, path)

    @fuse_op
    async def symlink(self, parent_inode, name, target, ctx):
        self._check_writable()
        sealed = self.metadata.encrypt_target(target)
        with self.tree.creating(parent_inode, name) as (entry, path):
            os.symlink(sealed, path)
        self._chown_new(path, ctx)
        return self._new_entry(parent_inode, entry, path)

    @fuse_op
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._check_writable()
        with self.tree.creating(new_parent_inode, new_name) as (entry, path):
            os.link(self.inodes.path(inode), path, follow_symlinks=False)
        return self._new_entry(new_parent_inode, entry, path, fresh=False)

    @fuse_op
    async def unlink(self, parent_inode, name, ctx):
        self._check_writable()
        entry = self.tree.entry(parent_inode, name)
        os.unlink(self.tree.path(parent_inode, entry))
        self.tree.remove_sidecar(parent_inode, entry)
        self.inodes.unlink(parent_inode, entry.name.encode())

    @fuse_op
    async def rmdir(self, parent_inode, name, ctx):
        self._check_writable()
        entry = self.tree.entry(parent_inode, name)
        path = self.tree.path(parent_inode, entry)
        self._remove_empty_dir(path)
        self.tree.remove_sidecar(parent_inode, entry)
        child = self.inodes.find(parent_inode, entry.name.encode())
        if child is not None:
            self.tree.forget_dir(child.ino)
        self.inodes.unlink(parent_inode, entry.name.encode())

    def _remove_empty_dir(self, path: bytes) -> None:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        if not self.tree.is_empty(path):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        diriv = path + b"/" + DIRIV_NAME.encode()
        with open(diriv, "rb") as f:
            saved = f.read()
        os.unlink(diriv)
        try:
            os.rmdir(path)
        except BaseException:
            self._restore_diriv(diriv, saved)
            raise

    @staticmethod
    def _restore_diriv(diriv: bytes, saved: bytes) -> None:
        fd = os.open(diriv, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o440)
        try:
            os.write(fd, saved)
        finally:
            os.close(fd)

    @fuse_op
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._check_writable()
        old = self.tree.entry(parent_inode_old, name_old)
        new = self.tree.entry(parent_inode_new, name_new)
        old_path = self.tree.path(parent_inode_old, old)
        new_path = self.tree.path(parent_inode_new, new)
        old_link = (parent_inode_old, old.name.encode())
        new_link = (parent_inode_new, new.name.encode())
        old_st = os.lstat(old_path)
        try:
            new_st = os.lstat(new_path)
        except FileNotFoundError:
            new_st = None
        if flags & RENAME_EXCHANGE:
            if new_st is None:
                raise OSError(errno.ENOENT, "exchange target missing")
            _renameat2(old_path, new_path, RENAME_EXCHANGE)
            self.inodes.exchange(old_link, new_link)
            return
        if new_st is not None:
            if flags & RENAME_NOREPLACE:
                raise OSError(errno.EEXIST, "target exists")
            if (new_st.st_dev, new_st.st_ino) == (old_st.st_dev, old_st.st_ino):
                return  # two links of one file: rename(2) does nothing
        self.tree.add_sidecar(parent_inode_new, new)
        saved_diriv = None
        try:
            if new_st is not None and stat.S_ISDIR(new_st.st_mode) and \
                    stat.S_ISDIR(old_st.st_mode):
                # The backing target holds its IV; it must be empty to be replaced.
                if not self.tree.is_empty(new_path):
                    raise OSError(errno.ENOTEMPTY, "directory not empty")
                diriv = new_path + b"/" + DIRIV_NAME.encode()
                with open(diriv, "rb") as f:
                    saved_diriv = f.read()
                os.unlink(diriv)
            if flags & RENAME_NOREPLACE:
                _renameat2(old_path, new_path, RENAME_NOREPLACE)
            else:
                os.rename(old_path, new_path)
        except BaseException:
            if saved_diriv is not None:
                self._restore_diriv(new_path + b"/" + DIRIV_NAME.encode(), saved_diriv)
            if new_st is None:
                self.tree.remove_sidecar(parent_inode_new, new)
            raise
        if old.sidecar is not None and old_link != new_link:
            self.tree.remove_sidecar(parent_inode_old, old)
        replaced = self.inodes.find(*new_link)
        if replaced is not None:
            self.tree.forget_dir(replaced.ino)
        self.inodes.move(old_link, new_link)

    # -- files --

    @fuse_op
    async def create(self, parent_inode, name, mode, flags, ctx):
        self._check_writable()
        with self.tree.creating(parent_inode, name) as (entry, path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         stat.S_IMODE(mode & ~ctx.umask))
            opened = None
            try:
                self._chown_new(path, ctx)
                inode = self.inodes.remember(parent_inode, entry.name.encode(), os.fstat(fd),
                                             fresh=True)
                opened = self.handles.adopt(inode.ino, fd)
                opened.file.ensure_header()  # one page into the page cache: not worth a hop
            except BaseException:
                if opened is not None:
                    self.handles.discard(opened)
                else:
                    os.close(fd)
                self.inodes.unlink(parent_inode, entry.name.encode())
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
        fh = self.handles.create_handle(opened)
        return pyfuse3.FileInfo(fh=fh), self._attrs(inode.ino, os.fstat(fd))

    @fuse_op
    async def open(self, inode, flags, ctx):
        write = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if write:
            self._check_writable()
        try:
            fh, opened, keep_cache = self.handles.open(inode, self.inodes.path(inode), write)
        except ContentError as exc:
            raise self._content_error(inode, exc) from exc
        if flags & os.O_TRUNC:
            try:
                await self._file_io(opened, opened.file.truncate, 0)
            except BaseException:
                self.handles.release(fh)
                raise
            keep_cache = False
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    def _content_error(self, ino: int, exc: ContentError) -> pyfuse3.FUSEError:
        """Log a damaged file once, naming its backing path; EIO for the caller."""
        try:
            where = os.fsdecode(self.inodes.path(ino))
        except (OSError, KeyError):
            where = "(unlinked)"
        key = (where, str(exc))
        if key not in self._reported and len(self._reported) < 10000:
            self._reported.add(key)
            log.warning("inode %d, backing file %s: %s", ino, where, exc)
        return pyfuse3.FUSEError(errno.EIO)

    async def _file_io(self, opened: OpenFile, fn, *args, inline: bool = False):
        """Run a codec call under the file's lock: on a worker thread, or
        right here if ``inline`` (small and not waiting for a disk)."""
        try:
            if inline and not opened.lock.locked():
                # Runs to completion without yielding: exclusive already,
                # and skipping the lock's checkpoint saves a scheduler pass.
                return fn(*args)
            async with opened.lock:
                if inline:
                    return fn(*args)
                return await self._in_thread(fn, *args)
        except ContentError as exc:
            raise self._content_error(opened.ino, exc) from exc

    def _inline(self, opened: OpenFile, off: int, size: int) -> bool:
        return size <= self._inline_max and opened.file.cached(off, size)

    @fuse_op
    async def read(self, fh, off, size):
        opened = self.handles.get(fh)
        return await self._file_io(opened, opened.file.read, off, size,
                                   inline=self._inline(opened, off, size))

    @fuse_op
    async def write(self, fh, off, buf):
        self._check_writable()
        opened = self.handles.get(fh)
        return await self._file_io(opened, opened.file.write, off, buf,
                                   inline=self._inline(opened, off, len(buf)))

    @fuse_op
    async def flush(self, fh):
        return None

    @fuse_op
    async def release(self, fh):
        self.handles.release(fh)

    @fuse_op
    async def fsync(self, fh, datasync):
        opened = self.handles.get(fh)
        await self._in_thread(os.fdatasync if datasync else os.fsync, opened.fd)

    # -- directories --

    @fuse_op
    async def opendir(self, inode, ctx):
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dir_ino[fh] = inode
        return fh

    @fuse_op
    async def readdir(self, fh, start_id, token):
        ino = self._dir_ino[fh]
        if start_id == 0 or fh not in self._dirs:
            self._dirs[fh] = self.tree.listdir(ino)
        listing = self._dirs[fh]
        for index in range(start_id, len(listing)):
            item = listing[index]
            inode = self.inodes.remember(ino, item.backing, item.stat, lookup=False)
            path = self.inodes.child_path(ino, item.backing) if stat.S_ISLNK(
                item.stat.st_mode) else None
            attr = self._attrs(inode.ino, item.stat, path)
            if not pyfuse3.readdir_reply(token, item.name, attr, index + 1):
                self.inodes.forget(inode.ino, 0)
                break
            inode.lookups += 1

    @fuse_op
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)
        self._dir_ino.pop(fh, None)

    @fuse_op
    async def fsyncdir(self, fh, datasync):
        fd = os.open(self.inodes.path(self._dir_ino[fh]), os.O_RDONLY | os.O_DIRECTORY)
        try:
            await self._in_thread(os.fsync, fd)
        finally:
            os.close(fd)

    @fuse_op
    async def statfs(self, ctx):
        st = os.statvfs(self.inodes.path(ROOT_INODE))
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail"):
            setattr(out, field, getattr(st, field))
        out.f_namemax = 255
        return out

    # -- extended attributes --

    @fuse_op
    async def setxattr(self, inode, name, value, ctx):
        self._check_writable()
        sealed_name = self._xattr_name(name)
        sealed = self.metadata.encrypt_xattr_value(sealed_name, value)
        os.setxattr(self.inodes.path(inode), sealed_name, sealed, follow_symlinks=False)

    @fuse_op
    async def getxattr(self, inode, name, ctx):
        if not name.startswith(XATTR_PREFIX):
            # The kernel asks for security.capability before every write(2)
            # (pyfuse3 cannot negotiate HANDLE_KILLPRIV_V2): answer at once.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        sealed_name = self._xattr_name(name)
        sealed = os.getxattr(self.inodes.path(inode), sealed_name, follow_symlinks=False)
        return self.metadata.decrypt_xattr_value(sealed_name, sealed)

    @fuse_op
    async def listxattr(self, inode, ctx):
        names = []
        for stored in os.listxattr(self.inodes.path(inode), follow_symlinks=False):
            if not stored.startswith("user."):
                continue
            try:
                names.append(self.metadata.decrypt_xattr_name(os.fsencode(stored)))
            except NameDecodeError:
                continue  # a foreign attribute: not ours to show
        return names

    @fuse_op
    async def removexattr(self, inode, name, ctx):
        self._check_writable()
        os.removexattr(self.inodes.path(inode), self._xattr_name(name), follow_symlinks=False)

    def _xattr_name(self, name: bytes) -> bytes:
        try:
            return self.metadata.encrypt_xattr_name(name)
        except InvalidNameError as exc:  # not user.*: not supported here
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP) from exc
        except NameTooLongError as exc:
            raise pyfuse3.FUSEError(errno.ERANGE) from exc

    @fuse_op
    async def access(self, inode, mode, ctx):
        if self.options.allow_other:
            # default_permissions: the kernel has checked the modes already;
            # only confirm that the entry still exists.
            self._stat(inode)
            return True
        # Only the daemon's user gets here: ask the backing file for it.
        opened = self.handles.by_ino(inode)
        if opened is not None:  # also open files whose last name is gone
            return os.access(f"/proc/self/fd/{opened.fd}", mode)
        return os.access(self.inodes.path(inode), mode, follow_symlinks=False)
