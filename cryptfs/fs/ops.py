"""The FUSE edge: ``Operations`` turns kernel requests into backing-tree and
codec calls, and typed errors into errno values.

Everything it needs is injected (``mount.assemble`` builds the pieces, for
the mount and for the in-process tests alike).  Backing entries are only
touched through ``BackingTree``; bulk data (read, write, truncate, fsync)
runs under the file's lock, inline when small and cached, else on a worker
thread; metadata operations are a few syscalls and run inline.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyfuse3
import trio

from cryptfs.content.codec import ContentCodec
from cryptfs.errors import (
    ContentError,
    FileNameError,
    InvalidNameError,
    NameDecodeError,
    NameTooLongError,
    StaleHandleError,
    StaleInodeError,
    XattrTooBigError,
)
from cryptfs.fs.dircache import DEFAULT_LIMIT
from cryptfs.fs.handles import DirHandleTable, HandleTable, OpenFile
from cryptfs.fs.inodes import ROOT_INODE, InodeTable
from cryptfs.fs.setid import SETID, may_keep_setid, without_setid
from cryptfs.fs.tree import BackingTree, Listed, NameSync, Owner, apply_attributes, ensure_header
from cryptfs.fs.workers import WorkerPool
from cryptfs.lowlevel.linux import proc_path
from cryptfs.lowlevel.log import Once
from cryptfs.names.metadata import OWNER_FILE, XATTR_PREFIX, MetadataCipher, XattrOwner

log = logging.getLogger(__name__)

# --cache-timeout's default (see MountOptions.entry_timeout).
CACHE_TIMEOUT = 60.0


@dataclass(frozen=True)
class MountOptions:
    read_only: bool = False
    allow_other: bool = False  # other users may enter; the kernel checks permissions
    # Seconds the kernel may cache names (negative lookups included) and
    # attributes.  Without --shared every change comes through this mount
    # (the mount lock keeps other mounts and fsck out) and the kernel updates
    # or drops what it caches on each (link counts and ctimes of the other
    # names after link, unlink and rename over a name; directory attributes
    # after any change in them; i_blocks at close), so the cache can be long:
    # only changes made behind the mount's back (a sync tool writing into the
    # cipher directory) show this late.
    entry_timeout: float = CACHE_TIMEOUT
    attr_timeout: float = CACHE_TIMEOUT
    writeback_cache: bool = True
    worker_threads: int = 4
    # Reads and writes up to this size whose backing pages are in memory run
    # on the event loop's thread: a hop to a worker thread costs more than
    # they do.  None: the engine's ``inline_max`` (``mount.assemble`` fills
    # it in before building ``Operations``, which needs a number).
    inline_max: int | None = None
    dir_fds: int = DEFAULT_LIMIT  # backing directory descriptors kept open
    # False (--no-xattr): every xattr request is answered ENOSYS, after which
    # the kernel stops sending them, including the getxattr(security.capability)
    # it asks before every write(2).
    xattrs: bool = True
    # KiB the kernel reads ahead on this mount (root only; 0: its default,
    # 128).  1 MiB: sequential reads come as 1 MiB requests, not 128 KiB.
    readahead_kb: int = 1024
    # --shared: others change the cipher directory while it is mounted
    # (other --shared mounts, here or on other machines): see for_sharing().
    shared: bool = False

    def for_sharing(self) -> MountOptions:
        """What ``shared`` means for the kernel: no caching of names (a
        negative lookup included) or attributes, whose changes elsewhere we
        are not told of, and no writeback cache (a write held in this
        kernel is not in the backing file the others read).  The page
        cache is kept only while the backing file is unchanged
        (``HandleTable``)."""
        if not self.shared:
            return self
        return replace(self, entry_timeout=0.0, attr_timeout=0.0, writeback_cache=False)


def fuse_op(method):
    """Map what a handler raises to a FUSE errno; never let an exception
    escape into pyfuse3 (that would take down the whole mount).  Anything
    unexpected (a ``KeyError`` included) is a bug: logged with its
    traceback, EIO for the caller."""

    @functools.wraps(method)
    async def wrapper(self, *args):
        self.last_activity = time.monotonic()
        try:
            return await _again_if_stale(self, method, args)
        except pyfuse3.FUSEError:
            raise
        except StaleInodeError as exc:  # forgotten, or replaced behind our back
            raise pyfuse3.FUSEError(errno.ENOENT) from exc
        except StaleHandleError as exc:
            raise pyfuse3.FUSEError(errno.EBADF) from exc
        except NameTooLongError as exc:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG) from exc
        except InvalidNameError as exc:
            raise pyfuse3.FUSEError(errno.EINVAL) from exc
        except XattrTooBigError as exc:
            raise pyfuse3.FUSEError(errno.E2BIG) from exc
        except (ContentError, NameDecodeError, FileNameError) as exc:
            log.warning("%s: %s", method.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        except Exception as exc:
            log.exception("internal error in %s", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return wrapper


# Requests on an open file's descriptor: ESTALE there means the file itself
# is gone (another NFS client removed it), and no path lookup brings it back.
_ON_OPEN_FILE = frozenset({"read", "write", "fsync", "release"})


async def _again_if_stale(self, method, args):
    """Run a handler; if it fails with ESTALE (NFS: another client removed
    or replaced a directory we hold a descriptor of), drop the cached
    directory descriptors and run it once more: they are reopened from the
    root by name.  Safe to repeat: ESTALE comes from resolving a descriptor,
    before the change the handler makes."""
    try:
        return await method(self, *args)
    except OSError as exc:
        if exc.errno != errno.ESTALE or method.__name__ in _ON_OPEN_FILE:
            raise
    log.debug("%s: stale descriptor (ESTALE): looking the path up again", method.__name__)
    self.tree.stale()
    return await method(self, *args)


def no_reply_op(method):
    """For handlers the kernel expects no reply from (FORGET): nothing may
    escape, not even ``FUSEError`` (there is no reply to carry it, and an
    exception ends pyfuse3's main loop): a bug is logged and the loop goes on."""

    @functools.wraps(method)
    async def wrapper(self, *args):
        try:
            await method(self, *args)
        except Exception:
            log.exception("internal error in %s", method.__name__)

    return wrapper


def _groups(ctx) -> set[int]:
    """The groups of a request's caller: its gid, and its supplementary
    groups while its process can still be read."""
    groups = {ctx.gid}
    try:
        with open(f"/proc/{ctx.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except (OSError, ValueError):
        pass
    return groups


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, inodes: InodeTable, tree: BackingTree, handles: HandleTable,
                 codec: ContentCodec, metadata: MetadataCipher, workers: WorkerPool,
                 options: MountOptions) -> None:
        super().__init__()
        options = options.for_sharing()
        self.inodes = inodes
        self.tree = tree
        self.handles = handles
        self.codec = codec
        self.metadata = metadata
        self.options = options
        self.enable_writeback_cache = options.writeback_cache
        self.workers = workers
        if options.inline_max is None:
            raise ValueError("MountOptions.inline_max: resolve it from the engine first "
                             "(daemon/mount.py assemble)")
        self._inline_max = options.inline_max
        self.dir_handles: DirHandleTable[Listed] = DirHandleTable()
        self._as_root = os.geteuid() == 0
        self._damaged = Once()  # inodes whose damage was logged
        self.last_activity = time.monotonic()  # for --idle
        # Run once the kernel has the INIT reply (mount.serve sets it).
        self.after_init: Callable[[], None] | None = None

    def init(self) -> None:
        """pyfuse3 calls this while it answers the kernel's INIT, whose reply
        is written before this loop runs anything else: ``after_init`` runs
        then.  Must not raise."""
        if self.after_init is not None:
            try:
                trio.lowlevel.current_trio_token().run_sync_soon(self.after_init)
            except RuntimeError:  # not inside trio (in-process tests)
                log.exception("after_init not scheduled")

    # -- helpers --

    async def _in_thread(self, fn, *args):
        return await self.workers.run(fn, *args)

    def _attrs(self, ino: int, st: os.stat_result):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.generation = self.inodes.generation(ino)
        attr.entry_timeout = self.options.entry_timeout
        attr.attr_timeout = self.options.attr_timeout
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = self._plain_size(ino, st)
        attr.st_blksize = 4096
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _plain_size(self, ino: int, st: os.stat_result) -> int:
        if stat.S_ISREG(st.st_mode):
            try:
                return self.codec.plaintext_size(st.st_size)
            except ContentError:
                return 0  # reading it gives EIO (and the log line names it)
        if stat.S_ISLNK(st.st_mode):
            try:
                return len(self.tree.readlink(ino))
            except (OSError, NameDecodeError):
                return st.st_size
        return st.st_size

    def _stat(self, ino: int) -> os.stat_result:
        opened = self.handles.by_ino(ino)
        if opened is not None:  # works even if every name was unlinked
            # Shared mounts: under a read lock on the size, so never a size
            # in mid-change and, on NFS, fresh from the server.
            return opened.file.stat()
        return self.tree.stat(ino)

    def _owner(self, ctx) -> Owner:
        """Files created by root's daemon for another user belong to that user."""
        if self._as_root and (ctx.uid, ctx.gid) != (0, 0):
            return ctx.uid, ctx.gid
        return None

    def _check_writable(self) -> None:
        if self.options.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    def _check_xattrs(self) -> None:
        if not self.options.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel then answers EOPNOTSUPP itself

    # -- names and attributes --

    @fuse_op
    async def lookup(self, parent_inode, name, ctx):
        found = self.tree.lookup(parent_inode, name)
        if found is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = self.options.entry_timeout
            return negative
        inode, st = found
        return self._attrs(inode.ino, st)

    @no_reply_op
    async def forget(self, inode_list):
        for ino, count in inode_list:
            self.inodes.forget(ino, count)  # its on_gone clears the per-inode caches

    @fuse_op
    async def getattr(self, inode, ctx):
        return self._attrs(inode, self._stat(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        """The SETATTR of the times the kernel sends after every unlink of a
        regular file (writeback cache: fuse_update_ctime) is answered before
        the general path when the inode has no name left and is not open:
        there is no backing file to change (the general path would fail with
        ENOENT, an error the kernel would keep on the inode)."""
        if fields.update_ctime and fields.update_mtime and self._just_times(fields) \
                and self.handles.by_ino(inode) is None and self._nameless(inode):
            self.last_activity = time.monotonic()
            return self._times_of_unlinked(inode, attr, fields)
        return await self._setattr(inode, attr, fields, fh, ctx)

    @staticmethod
    def _just_times(fields) -> bool:
        return not (fields.update_size or fields.update_mode or fields.update_uid
                    or fields.update_gid)

    def _nameless(self, ino: int) -> bool:
        """An inode the kernel still holds whose every name is gone."""
        return ino != ROOT_INODE and ino in self.inodes and not self.inodes.get(ino).links

    def _times_of_unlinked(self, ino: int, attr, fields) -> pyfuse3.EntryAttributes:
        """The reply for an unlinked file's new times.  The kernel drops the
        reply to the request that follows an unlink (fuse_flush_times); a
        caller's utimensat on the file through an O_PATH descriptor is the
        only other way here (ctime with mtime: a regular file), and there
        only the file type and times are known without a syscall: nothing
        is cached (timeouts 0), so a later stat asks again, as before."""
        out = pyfuse3.EntryAttributes()
        out.st_ino = ino
        out.generation = self.inodes.generation(ino)
        out.entry_timeout = out.attr_timeout = 0
        out.st_mode = stat.S_IFREG
        out.st_blksize = 4096
        if fields.update_atime:
            out.st_atime_ns = attr.st_atime_ns
        out.st_mtime_ns = attr.st_mtime_ns
        out.st_ctime_ns = attr.st_ctime_ns
        return out

    @fuse_op
    async def _setattr(self, inode, attr, fields, fh, ctx):
        self._check_writable()
        if fields.update_size:
            await self._truncate(inode, attr.st_size)
        mode = stat.S_IMODE(attr.st_mode) if fields.update_mode else None
        mode = self._without_setgid(inode, mode, fields, ctx)
        uid = attr.st_uid if fields.update_uid else -1
        gid = attr.st_gid if fields.update_gid else -1
        times = (attr.st_atime_ns if fields.update_atime else None,
                 attr.st_mtime_ns if fields.update_mtime else None)
        opened = self.handles.by_ino(inode)
        if opened is not None:
            # An open file is changed through its descriptor: it works after
            # the last name is gone.
            st = apply_attributes(opened.fd, mode, uid, gid, times)
        else:
            st = self.tree.set_attributes(inode, mode, uid, gid, times)
        return self._attrs(inode, st)

    def _without_setgid(self, inode: int, mode: int | None, fields, ctx) -> int | None:
        """``mode`` (None: unchanged) without a setgid bit that has no
        group-exec, if the request comes from a write or truncate by a
        caller outside the file's group and not root: the VFS drops that bit
        on ext4.  The kernel's FUSE code drops setuid, and setgid with
        group-exec, itself (a mode without ctime, which chmod(2) always
        sets), but keeps this one; a write with nothing else to drop comes
        as a request with no field at all."""
        if ctx.uid == 0:
            return mode
        other = (fields.update_uid, fields.update_gid, fields.update_atime,
                 fields.update_mtime, fields.update_ctime)
        if not fields.update_size and any(other):
            return mode  # a chmod, chown or utimes (never without ctime)
        st = self._stat(inode)
        current = stat.S_IMODE(st.st_mode) if mode is None else mode
        if not stat.S_ISREG(st.st_mode) or current & (stat.S_ISGID | stat.S_IXGRP) \
                != stat.S_ISGID or st.st_gid in _groups(ctx):
            return mode
        return current & ~stat.S_ISGID

    async def _truncate(self, ino: int, size: int) -> None:
        opened = self.handles.by_ino(ino)
        if opened is not None:
            await self._file_io(opened, opened.file.truncate, size)
            return
        try:
            fh, opened, _ = self.handles.open(ino, functools.partial(self.tree.open_file, ino),
                                              write=True)
        except ContentError as exc:
            raise self._content_error(ino, exc) from exc
        try:
            await self._file_io(opened, opened.file.truncate, size)
        finally:
            self.handles.release(fh)

    @fuse_op
    async def readlink(self, inode, ctx):
        return self.tree.readlink(inode)

    # -- creating and removing --

    @fuse_op
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._check_writable()
        if stat.S_ISREG(mode):
            fi, attr = await self.create(parent_inode, name, mode, os.O_WRONLY, ctx)
            await self.release(fi.fh)
            return attr
        _, inode, st = self.tree.create_entry(
            parent_inode, name,
            lambda dir_fd, backing: os.mknod(backing, mode & ~ctx.umask, rdev, dir_fd=dir_fd),
            self._owner(ctx), stat.S_IMODE(mode & ~ctx.umask))
        return self._attrs(inode.ino, st)

    @fuse_op
    async def mkdir(self, parent_inode, name, mode, ctx):
        self._check_writable()
        inode, st = self.tree.mkdir(parent_inode, name, stat.S_IMODE(mode & ~ctx.umask),
                                    self._owner(ctx))
        await self._sync_diriv(parent_inode, name, inode.ino)
        return self._attrs(inode.ino, st)

    async def _sync_diriv(self, parent: int, name: bytes, ino: int) -> None:
        """A new directory's IV is on disk before mkdir returns (no name in it
        could be read without it), fsynced on a worker (it waits for the
        disk); if that fails the directory is removed again."""
        try:
            fd = self.tree.open_diriv(ino)
            try:
                await self._in_thread(os.fsync, fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(Exception):  # the fsync's error is the one to report
                self.tree.rmdir(parent, name)
            raise

    @fuse_op
    async def symlink(self, parent_inode, name, target, ctx):
        self._check_writable()
        inode, st = self.tree.symlink(parent_inode, name, target, self._owner(ctx))
        return self._attrs(inode.ino, st)

    @fuse_op
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._check_writable()
        linked, st = self.tree.link(inode, new_parent_inode, new_name)
        return self._attrs(linked.ino, st)

    @fuse_op
    async def unlink(self, parent_inode, name, ctx):
        self._check_writable()
        self.tree.unlink(parent_inode, name)

    @fuse_op
    async def rmdir(self, parent_inode, name, ctx):
        self._check_writable()
        self.tree.rmdir(parent_inode, name)

    @fuse_op
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._check_writable()
        self.tree.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- files --

    @fuse_op
    async def create(self, parent_inode, name, mode, flags, ctx):
        self._check_writable()
        try:
            fd, inode, st = self.tree.create_file(parent_inode, name,
                                                  stat.S_IMODE(mode & ~ctx.umask),
                                                  self._owner(ctx))
        except FileExistsError:
            # The kernel saw no such name a moment ago: another writer of
            # the backing tree (a shared mount, a sync tool) made it since.
            # Without O_EXCL, open(2) opens what is there.
            if flags & os.O_EXCL:
                raise
            return await self._open_existing(parent_inode, name, flags, ctx)
        # No header yet: the first write or growing truncate adds it (an
        # empty backing file is an empty file, docs/format.md 4.2), so a file
        # that stays empty costs no page and no MAC.
        try:
            opened = self.handles.adopt(inode.ino, fd)
        except BaseException:  # adopt leaves fd to us when it fails
            os.close(fd)
            self.tree.unlink(parent_inode, name)
            raise
        fh = self.handles.create_handle(opened)
        return pyfuse3.FileInfo(fh=fh), self._attrs(inode.ino, st)

    async def _open_existing(self, parent_inode, name, flags, ctx):
        """``create`` of a name that appeared meanwhile: looked up and opened
        as ``open`` would (its permission checked here: the kernel checked
        none for a name it did not know)."""
        found = self.tree.lookup(parent_inode, name)
        if found is None:  # gone again: the caller may retry
            raise pyfuse3.FUSEError(errno.ENOENT)
        inode, st = found
        try:
            if stat.S_ISDIR(st.st_mode):
                raise pyfuse3.FUSEError(errno.EISDIR)
            if not stat.S_ISREG(st.st_mode):
                raise pyfuse3.FUSEError(errno.EEXIST)  # a fifo, socket or symlink: not ours to open
            if not _may_open(st, flags, ctx):
                raise pyfuse3.FUSEError(errno.EACCES)
            info = await self.open(inode.ino, flags, ctx)
        except BaseException:
            self.inodes.forget(inode.ino, 1)  # the lookup counted above is not the kernel's
            raise
        return info, self._attrs(inode.ino, st)

    @fuse_op
    async def open(self, inode, flags, ctx):
        write = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if write:
            self._check_writable()
        try:
            fh, opened, keep_cache = self.handles.open(
                inode, functools.partial(self.tree.open_file, inode), write)
        except ContentError as exc:
            raise self._content_error(inode, exc) from exc
        if flags & os.O_TRUNC:
            try:
                await self._file_io(opened, opened.file.truncate, 0)
                self._drop_setid(opened, ctx)
            except BaseException:
                self.handles.release(fh)
                raise
            keep_cache = False
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    def _drop_setid(self, opened: OpenFile, ctx) -> None:
        """Clear the set-id bits a truncation by the caller drops on a local
        filesystem.  For an open(2) with O_TRUNC the kernel computes that
        mode change but never sends it: the open already truncated
        (ATOMIC_O_TRUNC), so fuse_do_setattr skips the SETATTR it was in."""
        st = os.fstat(opened.fd)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & SETID \
                or may_keep_setid(ctx.pid, ctx.uid):
            return
        mode = without_setid(stat.S_IMODE(st.st_mode), st.st_gid, lambda: _groups(ctx))
        if mode != stat.S_IMODE(st.st_mode):
            apply_attributes(opened.fd, mode, -1, -1, (None, None))

    def _content_error(self, ino: int, exc: ContentError) -> pyfuse3.FUSEError:
        """Log a damaged file once per mount (its first error, naming its
        backing path; fsck lists every damaged page); EIO for the caller."""
        if self._damaged.first(ino):
            log.warning("inode %d, backing file %s: %s", ino,
                        os.fsdecode(self.inodes.path(ino)), exc)
        return pyfuse3.FUSEError(errno.EIO)

    async def _file_io(self, opened: OpenFile, fn, *args, inline: bool = False,
                       exclusive: bool = True):
        """Run a codec call under the file's lock (shared for reads): on a
        worker thread, or right here if ``inline`` (small and not waiting
        for a disk).  Across its awaits it holds ``opened``: a RELEASE
        meanwhile leaves the descriptor open until it is done."""
        try:
            if inline and opened.lock.free(exclusive):
                # Runs to completion without yielding: holds the lock in
                # effect, and skipping it saves a scheduler pass.
                return fn(*args)
            with self.handles.held(opened):
                async with opened.lock.exclusive() if exclusive else opened.lock.shared():
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
                                   inline=self._inline(opened, off, size), exclusive=False)

    @fuse_op
    async def write(self, fh, off, buf):
        self._check_writable()
        opened = self.handles.get(fh)
        return await self._file_io(opened, opened.file.write, off, buf,
                                   inline=self._inline(opened, off, len(buf)))

    async def flush(self, fh):
        # Nothing to do at close(2): before it would send FLUSH the kernel
        # has already written the file's dirty pages to us (write_inode_now
        # in fuse_flush; fuse_release does it again with the writeback
        # cache), and FLUSH carries no data.  ENOSYS makes it stop sending
        # FLUSH for the whole mount: one request less per close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_op
    async def release(self, fh):
        self.handles.release(fh)

    @fuse_op
    async def fsync(self, fh, datasync):
        opened = self.handles.get(fh)
        with self.handles.held(opened):
            await self._in_thread(os.fdatasync if datasync else os.fsync, opened.fd)
        await self._sync_name(self.tree.name_sync(opened.ino))

    async def _sync_name(self, sync: NameSync | None) -> None:
        """Run what keeps an fsync'd entry's long name (and its
        ancestors') after a crash: see ``BackingTree.name_sync``."""
        if sync is None:
            return
        try:
            await self._in_thread(sync.run)
        except BaseException:
            self.tree.unsynced_again(sync)
            raise
        finally:
            sync.close()

    # -- directories --

    @fuse_op
    async def opendir(self, inode, ctx):
        self.inodes.get(inode)
        return self.dir_handles.open(inode)

    @fuse_op
    async def readdir(self, fh, start_id, token):
        """``.`` and ``..`` first (offsets 1 and 2), then the listing: entry
        ``i`` of the snapshot has offset ``i + 3``."""
        ino = self.dir_handles.ino(fh)
        listing = self.dir_handles.listing(fh, start_id, self.tree.listdir)
        dots = ((b".", ino), (b"..", self._parent(ino)))
        for index in range(start_id, len(dots)):
            name, dot_ino = dots[index]
            if not pyfuse3.readdir_reply(token, name, self._dot_attrs(dot_ino), index + 1):
                return
        for index in range(max(start_id - len(dots), 0), len(listing)):
            item = listing[index]
            inode = self.tree.remember_listed(ino, item.backing, item.stat)
            attr = self._attrs(inode.ino, item.stat)
            if not pyfuse3.readdir_reply(token, item.name, attr, index + len(dots) + 1):
                self.inodes.drop_unused(inode)
                break
            self.inodes.count_lookup(inode)

    def _parent(self, ino: int) -> int:
        """The inode of directory ``ino``'s ``..``: the mount root's is itself
        (as on ext4); a removed directory's, itself too."""
        if ino == ROOT_INODE:
            return ino
        try:
            return self.inodes.link(ino)[0]
        except FileNotFoundError:
            return ino

    @staticmethod
    def _dot_attrs(ino: int) -> pyfuse3.EntryAttributes:
        """A ``.``/``..`` entry: the kernel takes only its inode number and
        type from it, and no lookup (fuse_direntplus_link returns before it
        counts one), so the inode table must not count one either."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_mode = stat.S_IFDIR
        return attr

    @fuse_op
    async def releasedir(self, fh):
        self.dir_handles.release(fh)

    @fuse_op
    async def fsyncdir(self, fh, datasync):
        ino = self.dir_handles.ino(fh)
        fd = self.tree.open_dir(ino)
        try:
            await self._in_thread(os.fsync, fd)
        finally:
            os.close(fd)
        await self._sync_name(self.tree.name_sync(ino, directory=True))

    @fuse_op
    async def statfs(self, ctx):
        st = self.tree.statvfs()
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail"):
            setattr(out, field, getattr(st, field))
        out.f_namemax = 255
        return out

    # -- extended attributes --

    @fuse_op
    async def setxattr(self, inode, name, value, ctx):
        self._check_xattrs()
        self._check_writable()
        owner = await self._xattr_owner(inode, create=True, refused=errno.EPERM)
        sealed_name = self._xattr_name(name, owner)
        sealed = self.metadata.encrypt_xattr_value(sealed_name, value, owner)
        self.tree.set_xattr(inode, sealed_name, sealed)

    async def getxattr(self, inode, name, ctx):
        """Not under ``fuse_op``: the kernel asks for security.capability
        before every write(2) and chown (pyfuse3 cannot negotiate
        HANDLE_KILLPRIV_V2), so a name we never store is refused here, before
        the wrapper's and the handler's work; nothing on this path can
        raise anything but ``FUSEError``."""
        self.last_activity = time.monotonic()
        if not self.options.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel then answers EOPNOTSUPP itself
        if not name.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        return await self._getxattr(inode, name)

    @fuse_op
    async def _getxattr(self, inode, name):
        owner = await self._xattr_owner(inode)
        sealed_name = self._xattr_name(name, owner)
        sealed = self.tree.get_xattr(inode, sealed_name)
        return self.metadata.decrypt_xattr_value(sealed_name, sealed, owner)

    @fuse_op
    async def listxattr(self, inode, ctx):
        self._check_xattrs()
        names = []
        # A symlink's list is empty (Linux stores no user.* attributes
        # there), so its owner is never asked for.
        stored_names = [n for n in self.tree.list_xattrs(inode) if n.startswith("user.")]
        owner = await self._xattr_owner(inode) if stored_names else None
        for stored in stored_names:
            try:
                names.append(self.metadata.decrypt_xattr_name(os.fsencode(stored), owner))
            except NameDecodeError:
                continue  # a foreign attribute: not ours to show
        return names

    @fuse_op
    async def removexattr(self, inode, name, ctx):
        self._check_xattrs()
        self._check_writable()
        owner = await self._xattr_owner(inode, refused=errno.EPERM)
        self.tree.remove_xattr(inode, self._xattr_name(name, owner))

    async def _xattr_owner(self, inode: int, create: bool = False,
                           refused: int = errno.ENODATA) -> XattrOwner | None:
        """What the inode's xattrs are sealed to (None: not bound, version 1).
        An open file's header is in memory, the only owner consulted while it
        is open; a new header is made under its lock.  A closed file's comes
        from ``BackingTree.xattr_owner`` (read from disk, cached per inode).
        An entry that can have no user.* attributes (a symlink, a device)
        raises ``refused``: Linux finds none there (ENODATA) and refuses to
        set or remove one (EPERM), as a version-1 directory's backing
        filesystem answers."""
        if not self.metadata.bound:
            return None
        opened = self.handles.by_ino(inode)
        if opened is None:
            try:
                owner = self.tree.xattr_owner(inode, create)
            except ContentError as exc:  # a damaged header: logged once, like a read
                raise self._content_error(inode, exc) from exc
            if owner is None:
                raise pyfuse3.FUSEError(refused)
            return owner
        if create and opened.file.header is None:
            with self.handles.held(opened):  # its descriptor stays open while we wait
                async with opened.lock.exclusive():
                    if opened.file.header is None:
                        # Through a descriptor of its own: the open one may be
                        # read-only (the backing file was read-only when opened).
                        ensure_header(self.codec, proc_path(opened.fd), file=opened.file)
        header = opened.file.header
        return XattrOwner(OWNER_FILE, header.file_id if header is not None else b"")

    def _xattr_name(self, name: bytes, owner: XattrOwner | None) -> bytes:
        try:
            return self.metadata.encrypt_xattr_name(name, owner)
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
            return os.access(proc_path(opened.fd), mode)
        return self.tree.access(inode, mode)


def _may_open(st: os.stat_result, flags: int, ctx) -> bool:
    """Whether the caller may open a file with these attributes for
    ``flags``, by its mode bits (what the kernel would check; the caller's
    supplementary groups are not known here, so a file open to one of them
    alone is refused: the safe side)."""
    if ctx.uid == 0:
        return True
    want = {os.O_RDONLY: 4, os.O_WRONLY: 2, os.O_RDWR: 6}.get(flags & os.O_ACCMODE, 6)
    if flags & os.O_TRUNC:
        want |= 2
    shift = 6 if st.st_uid == ctx.uid else 3 if st.st_gid == ctx.gid else 0
    return (st.st_mode >> shift) & want == want

