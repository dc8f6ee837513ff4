"""The backing tree: every backing operation, through directory descriptors.

Each operation reaches its entry as *(parent directory descriptor, backing
name)* and uses the ``*at`` system calls, never following a symlink in the
last component (``O_NOFOLLOW``, ``follow_symlinks=False``), so no operation
depends on the length of the full backing path and none can be led out of
the cipher directory by a symlink put in place of a directory.  Directory
descriptors come from ``DirCache`` and are reopened, when evicted, relative
to the parent's, checking that the entry is still the same backing
directory.  Calls that take no ``dir_fd`` (chmod, xattrs, access) go
through ``/proc/self/fd/N`` of an ``O_PATH | O_NOFOLLOW`` descriptor of the
entry: that reaches the entry itself, a symlink included, never its target.

Here also live the protocols that keep the backing tree consistent:
long-name sidecars around creation, renaming and removal; directory IVs
(created with a new directory, saved and restored around removing one).
The inode table's links are updated here, after the backing change.

A long name is only as durable as its sidecar: the sidecars this mount wrote
are remembered (``UnsyncedSidecars``) until the file or directory they name,
something below it, or their directory is fsync'd, which then syncs them and
their directory too (``name_sync``).  Only then: syncing every sidecar as it
is written would cost one disk flush per long name created.

In a cipher directory with bound metadata (docs/format.md §6) a symlink's
target is sealed to its parent's IV and its backing name, so renaming a
symlink re-seals it: the new symlink is made under a temporary reserved
name in the destination directory, renamed over the destination, and only
then is the old one unlinked.  A crash leaves the symlink at its old name,
or at both names (both valid), never lost; a stray temporary
(``cryptfs.symlink-tmp-*``) is skipped and reported by fsck.  A hard link
to a symlink is stored as such a re-sealed copy (the target is the same;
the copy's link count is 1).  Xattrs are sealed to their owner: a regular
file's ID (from its header) or a directory's IV.

With convergent directory IVs (docs/format.md §5.1) a directory whose
``cryptfs.diriv`` is missing (a sync tool recreated it: another machine
renamed it while this one added a file under the old name) gets its IV
derived again from its parent's IV and its name.  It is used if one of its
entries decodes under it, and then written back (read-write mounts), so the
directory heals wherever the sync tool carries it.  A directory with no
encrypted entry to confirm it gets the derived IV too, but only for the
moment (not cached) and written only before an entry is made in it: a sync
tool may be about to deliver the real IV of a directory renamed on another
machine, which no entry of it can yet contradict.  A directory renamed
since it was made got its IV from its old name: it cannot be derived, its
names stay unreadable (EIO), logged once; ``cryptfs fsck`` lists it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptfs.content.codec import ContentCodec, EncryptedFile
from cryptfs.content.format import HEADER_SIZE, FileHeader
from cryptfs.errors import DirIvMissingError, NameDecodeError, StaleInodeError
from cryptfs.fs.dircache import DirCache, ShownNames
from cryptfs.fs.identity import read_identity, same_file
from cryptfs.fs.inodes import ROOT_INODE, ClosedFileId, Inode, InodeTable
from cryptfs.lowlevel.linux import (
    DIR_READ,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    proc_path,
    renameat2,
    syncfs,
)
from cryptfs.lowlevel.log import Once
from cryptfs.names.conflicts import backing_kind, candidates
from cryptfs.names.filenames import (
    DIRIV_LEN,
    DIRIV_NAME,
    RESERVED_PREFIX,
    BackingName,
    NameCipher,
    create_diriv,
    decode_entry,
    derive_missing_diriv,
    is_longname,
    read_diriv,
    sidecar_name,
    write_derived_diriv,
)
from cryptfs.names.metadata import (
    OWNER_DIRECTORY,
    OWNER_FILE,
    MetadataCipher,
    SymlinkPlace,
    XattrOwner,
)
from cryptfs.names.resolve import Directory, Shown, resolve
from cryptfs.names.synctools import sync_tool_file

log = logging.getLogger(__name__)

_RESERVED = RESERVED_PREFIX.encode()
_DIRIV = DIRIV_NAME.encode()
MAX_UNSYNCED = 10000  # sidecars remembered as not yet synced; past it, sync them all
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ENTRY_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
T = TypeVar("T")
Owner = tuple[int, int] | None  # (uid, gid) for a new entry, None: the daemon's
SYMLINK_TMP_PREFIX = RESERVED_PREFIX + "symlink-tmp-"  # + 16 hex digits
DevIno = tuple[int, int]  # a backing directory's (st_dev, st_ino): stable across renames


@dataclass(frozen=True, slots=True)
class Listed:
    name: bytes  # plaintext
    backing: bytes  # backing entry name
    stat: os.stat_result


class UnsyncedSidecars:
    """Sidecars written by this mount that may not be on the disk yet, by
    their directory.  Bounded: past ``limit`` no more are remembered and
    ``overflowed`` is set, which means any sidecar may be unsynced."""

    def __init__(self, limit: int = MAX_UNSYNCED) -> None:
        self._by_dir: dict[DevIno, set[str]] = {}
        self._count = 0
        self._limit = limit
        self.overflowed = False

    def __bool__(self) -> bool:
        return bool(self._count or self.overflowed)

    def add(self, directory: DevIno, sidecar: str) -> None:
        names = self._by_dir.setdefault(directory, set())
        if sidecar in names:
            return
        if self._count >= self._limit:
            self.overflowed = True
            if not names:
                del self._by_dir[directory]
            return
        names.add(sidecar)
        self._count += 1

    def take(self, directory: DevIno, sidecar: str) -> bool:
        """Forget one (synced, or removed); whether it was remembered."""
        names = self._by_dir.get(directory)
        if names is None or sidecar not in names:
            return False
        names.remove(sidecar)
        self._count -= 1
        if not names:
            del self._by_dir[directory]
        return True

    def take_dir(self, directory: DevIno) -> set[str]:
        names = self._by_dir.pop(directory, set())
        self._count -= len(names)
        return names

    def take_all(self) -> None:
        """Forget everything: the whole filesystem is about to be synced."""
        self._by_dir.clear()
        self._count = 0
        self.overflowed = False


@dataclass
class NameSync:
    """What makes some names durable, found on the event loop and run on a
    worker thread: sidecars to fsync, then their directories (descriptors
    opened for it), or the whole backing filesystem.  ``close`` (always)
    closes the descriptors; ``keys`` are put back if the sync fails."""

    dirs: list[tuple[int, list[str]]]  # (directory descriptor, sidecar names)
    keys: list[tuple[DevIno, str]]
    whole_fs: int | None = None  # a descriptor on the backing filesystem: syncfs it

    def run(self) -> None:
        if self.whole_fs is not None:
            syncfs(self.whole_fs)
            return
        for dir_fd, sidecars in self.dirs:
            for sidecar in sidecars:
                try:
                    fd = os.open(sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=dir_fd)
                except FileNotFoundError:
                    continue  # removed since: nothing to keep
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.fsync(dir_fd)  # the sidecars' and the long names' entries

    def close(self) -> None:
        for fd, _ in self.dirs:
            os.close(fd)
        if self.whole_fs is not None:
            os.close(self.whole_fs)
        self.dirs, self.whole_fs = [], None


def read_xattr_owner(dir_fd: int, name: str, st: os.stat_result,
                     codec: ContentCodec) -> XattrOwner:
    """The owner a bound xattr of entry ``name`` (attributes ``st``) is
    sealed to, read from the backing entry: a directory's IV or a regular
    file's ID (empty if the file has no header).  Linux allows user.*
    attributes on nothing else (EPERM)."""
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, DIR_READ, dir_fd=dir_fd)
        try:
            return XattrOwner(OWNER_DIRECTORY, read_diriv(fd))
        finally:
            os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EPERM, "user.* attributes exist only on files and directories")
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        data = os.pread(fd, HEADER_SIZE, 0)
    finally:
        os.close(fd)
    return XattrOwner(OWNER_FILE, codec.decode_header(data).file_id if data else b"")


def ensure_header(codec: ContentCodec, path: str, dir_fd: int | None = None,
                  file: EncryptedFile | None = None) -> FileHeader:
    """A regular file's header, written first if it has none, through a
    descriptor opened read-write for it (the file may be open read-only: a
    first xattr gives it a header).  ``path``: a name in ``dir_fd`` (not
    followed if a symlink), or without ``dir_fd`` a ``/proc/self/fd`` path.
    ``file``: the open file at ``path``, which then holds the header (its
    only copy); otherwise the header is read or made through a wrapper of
    its own."""
    nofollow = os.O_NOFOLLOW if dir_fd is not None else 0
    fd = os.open(path, os.O_RDWR | nofollow | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return (file if file is not None else codec.open(fd)).ensure_header(via=fd)
    finally:
        os.close(fd)


class BackingTree:
    def __init__(self, root_fd: int, inodes: InodeTable, names: NameCipher,
                 dirs: DirCache, metadata: MetadataCipher, codec: ContentCodec,
                 read_only: bool = False, shared: bool = False) -> None:
        """``root_fd``: an ``O_PATH`` descriptor of the cipher directory (the
        tree owns it); ``dirs`` is the cache the inode table's ``on_gone``
        clears; ``metadata`` seals symlink targets (and, if bound, tells
        what xattrs are sealed to, read with ``codec``); ``read_only``: a
        derived directory IV is not written back; ``shared``: others
        change the backing tree too (``--shared``): entries found are
        checked to be the file their inode number stood for."""
        self._shared = shared
        self._root_fd = root_fd
        self._inodes = inodes
        self._names = names
        self.dirs = dirs
        self.metadata = metadata
        self._codec = codec
        self._unsynced = UnsyncedSidecars()
        self._undecryptable = Once()  # directories whose undecryptable entries were logged
        self._read_only = read_only
        self._derived_notes = Once()  # directories whose missing IV was logged

    def close(self) -> None:
        self.dirs.close()
        os.close(self._root_fd)

    # -- directory descriptors --

    def _dir_fd(self, ino: int) -> int:
        """The cached descriptor of directory ``ino``, reopening it (and any
        evicted ancestors) relative to the nearest cached one.  It stays
        valid until the next ``_dir_fd`` call (which may evict it) or a
        change to the inode table's links: an operation that needs two
        descriptors holds them with ``_pinned``."""
        if ino == ROOT_INODE:
            return self._root_fd
        fd = self.dirs.fd(ino)
        if fd is not None:
            return fd
        chain = []  # (child, parent, name), deepest first
        while fd is None:
            parent, name = self._inodes.link(ino)
            chain.append((ino, parent, name))
            ino = parent
            fd = self._root_fd if ino == ROOT_INODE else self.dirs.fd(ino)
        for child, parent, name in reversed(chain):
            self.dirs.pin(parent)
            try:
                child_fd = os.open(name, _DIR_PATH, dir_fd=fd)
            finally:
                self.dirs.unpin(parent)
            st = os.fstat(child_fd)
            if (st.st_dev, st.st_ino) != self._inodes.get(child).dev_ino:
                os.close(child_fd)
                raise StaleInodeError(f"backing directory {name!r} was replaced")
            self.dirs.put(child, child_fd)
            fd = child_fd
        return fd

    @contextlib.contextmanager
    def _pinned(self, *inos: int) -> Iterator[list[int]]:
        """Descriptors of directories ``inos``, valid for the block."""
        fds: list[int] = []
        try:
            for ino in inos:
                fds.append(self._dir_fd(ino))
                self.dirs.pin(ino)
            yield fds
        finally:
            for ino in inos[:len(fds)]:
                self.dirs.unpin(ino)

    def _locate(self, ino: int) -> tuple[int, str]:
        """``(directory descriptor, name)`` of inode ``ino``'s entry."""
        if ino == ROOT_INODE:
            return self._root_fd, "."
        parent, name = self._inodes.link(ino)
        return self._dir_fd(parent), os.fsdecode(name)

    @contextlib.contextmanager
    def _entry(self, ino: int) -> Iterator[str]:
        """A ``/proc/self/fd`` path of inode ``ino``'s own backing entry
        (never a symlink's target), checked to be the inode we know."""
        dir_fd, name = self._locate(ino)
        fd = os.open(name, _ENTRY_PATH, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._inodes.get(ino).dev_ino:
                raise StaleInodeError(f"backing entry of inode {ino} was replaced")
            yield proc_path(fd)
        finally:
            os.close(fd)

    def open_dir(self, ino: int) -> int:
        """A new readable descriptor of directory ``ino`` (the caller closes it)."""
        return os.open(".", DIR_READ, dir_fd=self._dir_fd(ino))

    # -- directory IVs and names --

    def open_diriv(self, ino: int) -> int:
        """A new descriptor of directory ``ino``'s IV file, to fsync it (the
        caller closes it)."""
        return os.open(DIRIV_NAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._dir_fd(ino))

    def diriv(self, dir_ino: int) -> bytes:
        iv = self.dirs.iv(dir_ino)
        if iv is None:
            try:
                iv = read_diriv(self._dir_fd(dir_ino))
            except DirIvMissingError:
                if dir_ino == ROOT_INODE or not self._names.convergent:
                    raise
                iv, confirmed = self._recover_diriv(dir_ino)
                if not confirmed:
                    return iv  # not cached: the real one may yet arrive (module docstring)
            self.dirs.set_iv(dir_ino, iv)
        return iv

    def _recover_diriv(self, dir_ino: int) -> tuple[bytes, bool]:
        """The derived IV of directory ``dir_ino``, whose IV file is missing,
        and whether an entry confirmed it (then it is written back unless the
        mount is read-only); ``OSError(EIO)`` if it cannot be derived."""
        parent, backing = self._inodes.link(dir_ino)
        parent_iv = self.diriv(parent)
        with self._pinned(parent) as (parent_fd,):
            try:
                name = decode_entry(self._names, parent_iv, parent_fd, os.fsdecode(backing))
            except (NameDecodeError, OSError):  # a long name whose sidecar is gone too
                name = None
        where = os.fsdecode(self._inodes.path(dir_ino))
        fd = self.open_dir(dir_ino)
        try:
            derived = None if name is None else \
                derive_missing_diriv(fd, self._names, parent_iv, name)
            if derived is None:
                if self._derived_notes.first(self._inodes.get(dir_ino).dev_ino):
                    log.warning("directory %r has no %s and its IV cannot be derived from "
                                "its name (renamed since it was made?): its entries stay "
                                "unreadable; cryptfs fsck lists them", where, DIRIV_NAME)
                raise OSError(errno.EIO, f"directory {where!r} has no {DIRIV_NAME}")
            if derived.confirmed and not self._read_only:
                return self._write_back(dir_ino, fd, derived.iv, where), True
        finally:
            os.close(fd)
        return derived.iv, derived.confirmed

    def _write_back(self, dir_ino: int, fd: int, iv: bytes, where: str) -> bytes:
        """Store a derived IV in directory ``fd`` (once per directory: fsync'd
        here, on the event loop, as it happens once per healed directory);
        the IV to use: the one found there if another writer was first, ours
        if the write fails (logged: the directory works for this mount)."""
        try:
            if not write_derived_diriv(fd, iv):
                return read_diriv(fd)
        except OSError as exc:
            log.warning("directory %r had no %s: derived it from its name, but could not "
                        "write it back: %s", where, DIRIV_NAME, exc)
            return iv
        if self._derived_notes.first(self._inodes.get(dir_ino).dev_ino):
            log.warning("directory %r had no %s (a sync tool recreated it?): derived it "
                        "from its name and wrote it back", where, DIRIV_NAME)
        return iv

    def _settle_diriv(self, dir_ino: int) -> None:
        """Before something is made in ``dir_ino`` that depends on its IV: a
        derived IV that no entry confirmed yet is written now, so the new
        entry's name survives a rename of the directory."""
        if dir_ino == ROOT_INODE or self.dirs.iv(dir_ino) is not None:
            return
        iv = self.diriv(dir_ino)
        if self.dirs.iv(dir_ino) is not None or self._read_only:
            return  # read from its file (or confirmed) after all
        fd = self.open_dir(dir_ino)
        try:
            iv = self._write_back(dir_ino, fd, iv, os.fsdecode(self._inodes.path(dir_ino)))
        finally:
            os.close(fd)
        self.dirs.set_iv(dir_ino, iv)

    def entry(self, parent: int, name: bytes) -> BackingName:
        """Where ``name`` lives in directory ``parent``: a conflict copy (or
        a name stranded under a diriv copy) shown under ``name`` by the last
        scan, else its encrypted name (a conflict copy of a long name has no
        sidecar of its own: removing or renaming it leaves the original's)."""
        state = self.dirs.shown(parent)
        if state is not None:
            shown = state.by_name.get(name)
            if shown is not None:
                return shown.backing
        return self._names.to_backing(self.diriv(parent), name)

    def _add_sidecar(self, parent: int, dir_fd: int, entry: BackingName) -> bool:
        """Store a long name's full encoding (before creating the entry),
        remembered as unsynced.  True if the sidecar is new; False if it was
        there (it belongs to an existing entry of that name, so a failed
        creation must not remove it)."""
        if entry.sidecar is None:
            return False
        data = entry.sidecar.encode("ascii")
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(entry.sidecar_name, flags | os.O_EXCL, 0o600, dir_fd=dir_fd)
            created = True
        except FileExistsError:  # the same name's
            if _holds(dir_fd, entry.sidecar_name, data):
                return False  # left as it is: truncating it would risk the name it keeps
            fd = os.open(entry.sidecar_name, flags | os.O_TRUNC, 0o600, dir_fd=dir_fd)
            created = False  # damaged: rewritten
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self._unsynced.add(self._inodes.get(parent).dev_ino, entry.sidecar_name)
        return created

    def _remove_sidecar(self, parent: int, dir_fd: int, entry: BackingName) -> None:
        if entry.sidecar is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.sidecar_name, dir_fd=dir_fd)
            self._unsynced.take(self._inodes.get(parent).dev_ino, entry.sidecar_name)

    # -- durability of names --

    def name_sync(self, ino: int, directory: bool = False) -> NameSync | None:
        """What must be synced, besides ``ino`` itself, for it to keep its
        name after a crash once it is fsync'd: the unsynced sidecars of its
        own long name and of its ancestors' (each with its directory), and
        with ``directory`` those of the entries in directory ``ino``.  None
        if nothing is.  The caller runs it (``NameSync.run``), closes it,
        and gives it back to ``unsynced_again`` if running it failed."""
        if not self._unsynced:
            return None
        if self._unsynced.overflowed:
            self._unsynced.take_all()
            return NameSync([], [], os.open(".", DIR_READ, dir_fd=self._root_fd))
        found: list[tuple[int, DevIno, str]] = []  # (directory inode, its id, sidecar)
        if directory:
            dev_ino = self._inodes.get(ino).dev_ino
            found += [(ino, dev_ino, name) for name in sorted(self._unsynced.take_dir(dev_ino))]
        found += self._unsynced_above(ino)
        if not found:
            return None
        sync = NameSync([], [(dev_ino, name) for _, dev_ino, name in found])
        try:
            for dir_ino in dict.fromkeys(dir_ino for dir_ino, _, _ in found):
                names = [name for d, _, name in found if d == dir_ino]
                # a directory gone since has nothing left to keep
                with contextlib.suppress(FileNotFoundError, StaleInodeError):
                    sync.dirs.append((self.open_dir(dir_ino), names))
        except BaseException:
            sync.close()
            self.unsynced_again(sync)
            raise
        return sync

    def _unsynced_above(self, ino: int) -> list[tuple[int, DevIno, str]]:
        """Taken from the unsynced: the sidecars of ``ino``'s name and its ancestors'."""
        found = []
        while ino != ROOT_INODE:
            try:
                parent, name = self._inodes.link(ino)
                dev_ino = self._inodes.get(parent).dev_ino
            except (FileNotFoundError, StaleInodeError):
                break  # no name left: nothing to keep
            decoded = os.fsdecode(name)
            if is_longname(decoded) and self._unsynced.take(dev_ino, sidecar_name(decoded)):
                found.append((parent, dev_ino, sidecar_name(decoded)))
            ino = parent
        return found

    def unsynced_again(self, sync: NameSync) -> None:
        """A ``NameSync`` failed: what it was to sync may still be unsynced."""
        if sync.whole_fs is not None:
            self._unsynced.overflowed = True
        for dev_ino, name in sync.keys:
            self._unsynced.add(dev_ino, name)

    # -- reading entries --

    def lookup(self, parent: int, name: bytes) -> tuple[Inode, os.stat_result] | None:
        """The inode and attributes of ``name`` in ``parent``, None if absent
        (one more kernel lookup on the inode)."""
        entry = self.entry(parent, name)
        dir_fd = self._dir_fd(parent)
        try:
            st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            shown = self._rescan_for(parent, name)
            if shown is None:
                return None
            entry = shown.backing
            dir_fd = self._dir_fd(parent)
            try:
                st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
        return self._remember(parent, dir_fd, entry.name, st), st

    def remember_listed(self, parent: int, backing: bytes, st: os.stat_result) -> Inode:
        """The inode of a listed entry (no kernel lookup counted yet)."""
        if not self._shared:
            return self._inodes.remember(parent, backing, st, lookup=False)
        return self._remember(parent, self._dir_fd(parent), os.fsdecode(backing), st,
                              lookup=False)

    def _remember(self, parent: int, dir_fd: int, backing: str, st: os.stat_result,
                  lookup: bool = True) -> Inode:
        """``InodeTable.remember`` for an entry found in ``dir_fd`` (which
        may not be used after this).  In a shared mount, a new inode if the
        backing inode number now stands for another file (deleted and
        re-created by another mounter): the kernel and open handles must not
        take one for the other; and its old names are checked."""
        name = os.fsencode(backing)
        if not self._shared:
            return self._inodes.remember(parent, name, st, lookup)
        known = self._inodes.known((st.st_dev, st.st_ino))
        if known is not None and known.identity is not None \
                and known.identity.ctime_ns == st.st_ctime_ns:
            return self._inodes.remember(parent, name, st, lookup)
        seen = read_identity(dir_fd, backing, st)
        replaced = known is not None and known.ino != ROOT_INODE \
            and known.identity is not None and not same_file(known.identity, seen)
        if replaced:
            log.debug("backing inode %d of %r is another file now: a new inode",
                      st.st_ino, backing)
        inode = self._inodes.remember(parent, name, st, lookup, fresh=replaced)
        inode.identity = seen
        if len(inode.links) > 1:
            self._prune_links(inode, (parent, name))
        return inode

    def _prune_links(self, inode: Inode, found: tuple[int, bytes]) -> None:
        """Shared: forget the names of ``inode`` other than ``found`` that no
        longer lead to it (another mounter renamed or removed them): an
        operation on the inode must not reach it through a stale name.
        Hard links that still do are kept."""
        for parent, name in sorted(inode.links - {found}):
            try:
                st = os.stat(name, dir_fd=self._dir_fd(parent), follow_symlinks=False)
                if (st.st_dev, st.st_ino) == inode.dev_ino:
                    continue
            except (FileNotFoundError, NotADirectoryError, StaleInodeError):
                pass
            self._inodes.forget_link(inode, (parent, name))

    def stale(self) -> None:
        """A cached directory descriptor went stale (ESTALE): drop them all;
        the next use reopens each from the root by name."""
        self.dirs.drop_fds()

    def stat(self, ino: int) -> os.stat_result:
        fd, name = self._locate(ino)
        return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def readlink(self, ino: int) -> bytes:
        """The plaintext target of symlink ``ino``."""
        parent, name = self._inodes.link(ino)
        place = self._place(parent, os.fsdecode(name))
        stored = os.fsencode(os.readlink(name, dir_fd=self._dir_fd(parent)))
        return self.metadata.decrypt_target(stored, place)

    def open_file(self, ino: int, flags: int) -> int:
        """A descriptor of regular file ``ino`` (never through a symlink)."""
        fd, name = self._locate(ino)
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self._root_fd)

    def access(self, ino: int, mode: int) -> bool:
        with self._entry(ino) as path:
            return os.access(path, mode)

    # -- attributes --

    def set_attributes(self, ino: int, mode: int | None, uid: int, gid: int,
                       times: tuple[int | None, int | None]) -> os.stat_result:
        """Change mode (not on symlinks: Linux has none), owner (-1: keep) and
        times (None: keep) of ``ino``'s entry; its attributes afterwards."""
        if mode is None:  # the *at calls act on the entry itself, a symlink included
            fd, name = self._locate(ino)
            return apply_attributes(name, None, uid, gid, times, dir_fd=fd,
                                    follow_symlinks=False)
        with self._entry(ino) as path:  # chmod has no nofollow form that works on Linux
            return apply_attributes(path, mode, uid, gid, times)

    def xattr_owner(self, ino: int, create: bool = False) -> XattrOwner | None:
        """The owner ``ino``'s bound xattrs are sealed to; with ``create``, a
        regular file without a header gets one (its ID is the owner).  None
        for an entry that can have none (Linux allows user.* attributes only
        on regular files and directories).

        A file's ID, once it has one, never changes (truncating keeps the
        header), so the inode keeps it rather than reading the header each
        time: trusted while the backing entry is the same inode with the same
        ctime (anything rewritten behind our back changes it).  ``create``
        (an xattr is about to be sealed) always reads the header.  Only for a
        file no handle has open: an open file's owner is its
        ``EncryptedFile.header`` (``Operations._xattr_owner``)."""
        dir_fd, name = self._locate(ino)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        inode = self._inodes.get(ino)
        if (st.st_dev, st.st_ino) != inode.dev_ino:
            raise StaleInodeError(f"backing entry of inode {ino} was replaced")
        if stat.S_ISDIR(st.st_mode):
            if create:
                self._settle_diriv(ino)
            return XattrOwner(OWNER_DIRECTORY, self.diriv(ino))
        if not stat.S_ISREG(st.st_mode):
            return None
        cached = inode.closed_file_id
        if not create and cached is not None and cached.ctime_ns == st.st_ctime_ns:
            return XattrOwner(OWNER_FILE, cached.file_id)
        owner = read_xattr_owner(dir_fd, name, st, self._codec)
        if create and not owner.identity:
            owner = XattrOwner(OWNER_FILE, ensure_header(self._codec, name, dir_fd).file_id)
        if owner.identity:  # a headerless file has no ID yet: its first write makes one
            inode.closed_file_id = ClosedFileId(st.st_ctime_ns, owner.identity)
        return owner

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        with self._entry(ino) as path:
            os.setxattr(path, name, value)

    def get_xattr(self, ino: int, name: bytes) -> bytes:
        with self._entry(ino) as path:
            return os.getxattr(path, name)

    def list_xattrs(self, ino: int) -> list[str]:
        with self._entry(ino) as path:
            return os.listxattr(path)

    def remove_xattr(self, ino: int, name: bytes) -> None:
        with self._entry(ino) as path:
            os.removexattr(path, name)

    # -- creating entries --

    def create_entry(self, parent: int, name: bytes, make: Callable[[int, str], T],
                     owner: Owner = None,
                     mode: int | None = None) -> tuple[T, Inode, os.stat_result]:
        """Create ``name`` in ``parent`` with ``make(dir_fd, backing_name)``
        (mknod, symlink, open with O_CREAT), its long-name sidecar first;
        on failure neither is left behind.  ``mode``: its permission bits
        exactly (None: a symlink's, which has none)."""
        self._settle_diriv(parent)
        entry = self.entry(parent, name)
        return self._make(parent, self._dir_fd(parent), entry, make, owner, fresh=True,
                          mode=mode)

    def create_file(self, parent: int, name: bytes, mode: int,
                    owner: Owner = None) -> tuple[int, Inode, os.stat_result]:
        """A new regular file, opened read-write (the caller owns the fd)."""
        opened: list[int] = []

        def make(dir_fd: int, backing: str) -> int:
            opened.append(os.open(backing, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, mode, dir_fd=dir_fd))
            return opened[0]

        try:
            return self.create_entry(parent, name, make, owner, mode)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise

    def symlink(self, parent: int, name: bytes, target: bytes,
                owner: Owner = None) -> tuple[Inode, os.stat_result]:
        """A new symlink, its target sealed (to its place, if bound)."""
        def make(dir_fd: int, backing: str) -> None:
            sealed = self.metadata.encrypt_target(target, self._place(parent, backing))
            os.symlink(sealed, backing, dir_fd=dir_fd)

        _, inode, st = self.create_entry(parent, name, make, owner)
        return inode, st

    def _place(self, parent: int, backing: str) -> SymlinkPlace:
        """What a bound symlink at ``backing`` is sealed to: its directory's
        IV and its name, or for a conflict copy its original's name (and for
        a name stranded under a diriv copy, that copy's IV)."""
        state = self.dirs.shown(parent)
        if state is None and _may_be_shown(backing):  # (a listing or lookup found it)
            state = self._shown_state(parent)
        shown = None if state is None else state.by_backing.get(os.fsencode(backing))
        if shown is not None:
            return SymlinkPlace(shown.iv, shown.sealed_as)
        return SymlinkPlace(self.diriv(parent), os.fsencode(backing))

    def _reseals(self, st: os.stat_result) -> bool:
        """Whether this entry's stored form depends on its name (a bound symlink)."""
        return self.metadata.bound and stat.S_ISLNK(st.st_mode)

    def link(self, ino: int, parent: int, name: bytes) -> tuple[Inode, os.stat_result]:
        """A new hard link of ``ino`` at ``parent/name``; for a bound
        symlink, a copy re-sealed for its name (a new backing inode)."""
        source_parent, source = self._inodes.link(ino)
        self._settle_diriv(parent)
        entry = self.entry(parent, name)
        place = self._place(parent, entry.name)
        with self._pinned(source_parent, parent) as (source_fd, fd):
            st = os.stat(source, dir_fd=source_fd, follow_symlinks=False)
            copy = self._reseals(st)
            sealed = self.metadata.encrypt_target(self.readlink(ino), place) if copy else b""

            def make(dir_fd: int, backing: str) -> None:
                if copy:
                    _new_symlink(dir_fd, backing, sealed, st)
                else:
                    os.link(source, backing, src_dir_fd=source_fd, dst_dir_fd=dir_fd,
                            follow_symlinks=False)

            _, inode, new_st = self._make(parent, fd, entry, make, None, fresh=copy)
        return inode, new_st

    def _make(self, parent: int, dir_fd: int, entry: BackingName,
              make: Callable[[int, str], T], owner: Owner, fresh: bool,
              mode: int | None = None) -> tuple[T, Inode, os.stat_result]:
        """Create ``entry`` with ``make``, then give it ``owner`` and, after
        that (chown clears setuid and setgid), exactly the permission bits
        ``mode``: the daemon's umask (or a default ACL on the backing
        directory) must not change what the caller asked for, and the
        kernel has applied the caller's umask already."""
        new_sidecar = self._add_sidecar(parent, dir_fd, entry)
        try:
            result = make(dir_fd, entry.name)
            try:
                if owner is not None:
                    _chown_new(dir_fd, entry.name, owner)
                st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
                if mode is not None:
                    st = _set_new_mode(dir_fd, entry.name, st, mode)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(entry.name, dir_fd=dir_fd)
                raise
        except BaseException:
            if new_sidecar:
                self._remove_sidecar(parent, dir_fd, entry)
            raise
        return result, self._inodes.remember(parent, entry.name.encode(), st, fresh=fresh), st

    def mkdir(self, parent: int, name: bytes, mode: int,
              owner: Owner = None) -> tuple[Inode, os.stat_result]:
        """A new directory with its IV (derived from the parent's and
        ``name`` with convergent IVs); on failure nothing is left behind."""
        self._settle_diriv(parent)
        entry = self.entry(parent, name)
        new_iv = self._names.new_diriv(self.diriv(parent), name)
        made: list[bytes] = []  # the new directory's IV, once it is complete

        def make(dir_fd: int, backing: str) -> None:
            # Owner-writable until its IV is in; _make then sets ``mode``.
            os.mkdir(backing, 0o700, dir_fd=dir_fd)
            try:
                fd = os.open(backing, DIR_READ, dir_fd=dir_fd)
                try:  # (a failed create_diriv leaves no IV file: rmdir below works)
                    iv = create_diriv(fd, sync=False, dir_iv=new_iv)  # fsync: _sync_diriv
                finally:
                    os.close(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rmdir(backing, dir_fd=dir_fd)
                raise
            made.append(iv)

        dir_fd = self._dir_fd(parent)
        try:
            _, inode, st = self._make(parent, dir_fd, entry, make, owner, fresh=True,
                                      mode=mode)
        except BaseException:
            if made:  # chown or stat failed after it was made: _make unlinks no directory
                with contextlib.suppress(OSError):
                    self._remove_dir(dir_fd, entry.name)
            raise
        self.dirs.set_iv(inode.ino, made[0])
        return inode, st

    # -- removing entries --

    def unlink(self, parent: int, name: bytes) -> None:
        entry = self.entry(parent, name)
        fd = self._dir_fd(parent)
        os.unlink(entry.name, dir_fd=fd)
        self._remove_sidecar(parent, fd, entry)
        self._inodes.unlink(parent, entry.name.encode())
        self._drop_shown(parent, name)

    def rmdir(self, parent: int, name: bytes) -> None:
        entry = self.entry(parent, name)
        fd = self._dir_fd(parent)
        self._remove_dir(fd, entry.name)
        self._remove_sidecar(parent, fd, entry)
        self._inodes.unlink(parent, entry.name.encode())
        self._drop_shown(parent, name)

    def _remove_dir(self, dir_fd: int, backing: str) -> None:
        """Remove an empty backing directory and its IV (restored if the
        removal fails, so the directory's names stay readable)."""
        fd = os.open(backing, DIR_READ, dir_fd=dir_fd)
        try:
            saved = self._take_diriv(fd)
            try:
                os.rmdir(backing, dir_fd=dir_fd)
            except BaseException:
                _restore_diriv(fd, saved)
                raise
        finally:
            os.close(fd)

    @staticmethod
    def _take_diriv(fd: int) -> bytes | None:
        """Check that directory ``fd`` holds nothing but its IV; remove the
        IV and return its contents (None: it had none, as a directory a
        sync tool recreated)."""
        with os.scandir(fd) as entries:
            if any(entry.name != DIRIV_NAME for entry in entries):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
        try:
            iv = os.open(DIRIV_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            return None
        try:
            saved = os.read(iv, DIRIV_LEN + 1)
        finally:
            os.close(iv)
        os.unlink(DIRIV_NAME, dir_fd=fd)
        return saved

    # -- renaming --

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int) -> None:
        """rename(2) with ``RENAME_NOREPLACE``/``RENAME_EXCHANGE``: sidecars
        follow long names, and an empty directory replaced by another one
        loses its IV first (restored if the rename fails)."""
        self._settle_diriv(new_parent)
        old = self.entry(old_parent, old_name)
        new = self.entry(new_parent, new_name)
        old_link = (old_parent, old.name.encode())
        new_link = (new_parent, new.name.encode())
        with self._pinned(old_parent, new_parent) as (old_fd, new_fd):
            old_st = os.stat(old.name, dir_fd=old_fd, follow_symlinks=False)
            try:
                new_st = os.stat(new.name, dir_fd=new_fd, follow_symlinks=False)
            except FileNotFoundError:
                new_st = None
            if flags & RENAME_EXCHANGE:
                if new_st is None:
                    raise OSError(errno.ENOENT, "exchange target missing")
                if self._reseals(old_st) or self._reseals(new_st):
                    raise OSError(errno.EINVAL, "cannot exchange a symlink (docs/format.md §6)")
                renameat2(old_fd, old.name.encode(), new_fd, new.name.encode(),
                          RENAME_EXCHANGE)
                self._inodes.exchange(old_link, new_link)
                return
            if new_st is not None:
                if flags & RENAME_NOREPLACE:
                    raise OSError(errno.EEXIST, "target exists")
                if (new_st.st_dev, new_st.st_ino) == (old_st.st_dev, old_st.st_ino):
                    return  # two links of one file: rename(2) does nothing
            replaces_dir = new_st is not None and stat.S_ISDIR(new_st.st_mode) \
                and stat.S_ISDIR(old_st.st_mode)
            moved: os.stat_result | None = None  # a re-sealed symlink's new entry
            new_sidecar = self._add_sidecar(new_parent, new_fd, new)
            try:
                if self._reseals(old_st):
                    moved = self._move_symlink(
                        old_fd, old.name, self._place(old_parent, old.name),
                        new_fd, new.name, self._place(new_parent, new.name),
                        old_st, flags & RENAME_NOREPLACE)
                elif replaces_dir:
                    self._rename_over_dir(old_fd, old.name, new_fd, new.name)
                elif flags & RENAME_NOREPLACE:
                    renameat2(old_fd, old.name.encode(), new_fd, new.name.encode(),
                              RENAME_NOREPLACE)
                else:
                    os.rename(old.name, new.name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
            except BaseException:
                if new_sidecar:
                    self._remove_sidecar(new_parent, new_fd, new)
                raise
            if old.sidecar is not None and old_link != new_link:
                self._remove_sidecar(old_parent, old_fd, old)
        self._inodes.move(old_link, new_link)
        if moved is not None:
            self._inodes.rebacked(new_link, moved)
        if old_link != new_link:
            self._drop_shown(old_parent, old_name)

    def _move_symlink(self, old_fd: int, old: str, old_place: SymlinkPlace,
                      new_fd: int, new: str, new_place: SymlinkPlace,
                      st: os.stat_result, flags: int) -> os.stat_result:
        """Rename a bound symlink to ``new`` (replacing what is there unless
        ``flags`` is RENAME_NOREPLACE), re-sealed for its new place: made
        under a temporary name, renamed over the destination, then the old
        entry is unlinked (see the module docstring for crashes).  Returns
        the new entry's attributes."""
        target = self.metadata.decrypt_target(os.fsencode(os.readlink(old, dir_fd=old_fd)),
                                              old_place)
        sealed = self.metadata.encrypt_target(target, new_place)
        tmp = SYMLINK_TMP_PREFIX + secrets.token_hex(8)
        _new_symlink(new_fd, tmp, sealed, st)
        try:
            if flags:
                renameat2(new_fd, os.fsencode(tmp), new_fd, os.fsencode(new), flags)
            else:
                os.rename(tmp, new, src_dir_fd=new_fd, dst_dir_fd=new_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=new_fd)
            raise
        os.unlink(old, dir_fd=old_fd)
        return os.stat(new, dir_fd=new_fd, follow_symlinks=False)

    def _rename_over_dir(self, old_fd: int, old: str, new_fd: int, new: str) -> None:
        """The backing target holds its IV; it must be empty to be replaced."""
        target = os.open(new, DIR_READ, dir_fd=new_fd)
        try:
            saved = self._take_diriv(target)
            try:
                os.rename(old, new, src_dir_fd=old_fd, dst_dir_fd=new_fd)
            except BaseException:
                _restore_diriv(target, saved)
                raise
        finally:
            os.close(target)

    # -- listing --

    def listdir(self, dir_ino: int) -> list[Listed]:
        """Decrypted entries of a directory, with sync-tool conflict copies
        and names stranded under a ``cryptfs.diriv`` copy under the names
        ``names/resolve.py`` gives them (remembered for lookups).  Entries
        that still do not decrypt (foreign files, damage, a replaced
        directory IV) are skipped, logged once per directory."""
        iv = self.diriv(dir_ino)
        listed = []
        fd = self.open_dir(dir_ino)
        try:
            iv = self._current_iv(dir_ino, fd, iv)
            with os.scandir(fd) as entries:
                found = {entry.name: entry for entry in entries}
            names = resolve(self._names, iv, fd, found)
            skipped = [(os.fsencode(name), exc) for name, exc in names.foreign
                       if sync_tool_file(name) is None]  # a sync tool's: not worth a warning
            shown = [(s.backing.name, s.name) for s in names.shown]
            for backing, plain in [*names.real.items(), *shown]:
                try:  # (through ``fd``: it must still be open)
                    st = found[backing].stat(follow_symlinks=False)
                except OSError as exc:  # gone since: as if listed a moment earlier
                    skipped.append((os.fsencode(backing), exc))
                    continue
                listed.append(Listed(plain, os.fsencode(backing), st))
        finally:
            os.close(fd)
        self._remember_shown(dir_ino, names)
        if skipped:
            self._report_skipped(dir_ino, skipped, bool(listed))
        return listed

    def _current_iv(self, dir_ino: int, fd: int, cached: bytes) -> bytes:
        """The directory's IV as its file holds it now: a sync tool may have
        replaced it since it was cached (keeping ours as a copy, whose names
        are then shown as stranded).  A missing or damaged file leaves what
        ``diriv`` decided."""
        try:
            iv = read_diriv(fd)
        except NameDecodeError:
            return cached
        if iv != cached:
            self.dirs.set_iv(dir_ino, iv)
        return iv

    def _remember_shown(self, dir_ino: int, names: Directory) -> None:
        state = ShownNames(diriv_copies=bool(names.diriv_copies))
        for shown in names.shown:
            state.by_name[shown.name] = shown
            state.by_backing[os.fsencode(shown.backing.name)] = shown
        self.dirs.set_shown(dir_ino, state)

    def _shown_state(self, dir_ino: int) -> ShownNames:
        """The directory's shown entries, scanning it first if it was not:
        cheaply (no decryption) when no name in it could be shown."""
        state = self.dirs.shown(dir_ino)
        if state is not None:
            return state
        fd = self.open_dir(dir_ino)
        try:
            with os.scandir(fd) as entries:
                unusual = any(_may_be_shown(entry.name) for entry in entries)
        finally:
            os.close(fd)
        if unusual:
            self.listdir(dir_ino)
            state = self.dirs.shown(dir_ino)
        if state is None:
            state = ShownNames()
            self.dirs.set_shown(dir_ino, state)
        return state

    def _rescan_for(self, parent: int, name: bytes) -> Shown | None:
        """After a lookup of ``name`` missed: the entry shown under it, if a
        scan finds one.  Scans once per lookup, only if the directory was
        never scanned, or ``name`` reads as a shown conflict name, or the
        directory has diriv copies (any name may be a stranded one)."""
        state = self.dirs.shown(parent)
        if state is None:
            state = self._shown_state(parent)
        elif b" (conflict" in name or state.diriv_copies:
            self.listdir(parent)
            state = self._shown_state(parent)
        return state.by_name.get(name)

    def _drop_shown(self, parent: int, name: bytes) -> None:
        state = self.dirs.shown(parent)
        if state is not None:
            state.drop(name)

    def _report_skipped(self, dir_ino: int, skipped: list[tuple[bytes, Exception]],
                        any_listed: bool) -> None:
        """One line per directory and mount (the first listing that skips
        anything); fsck names every entry."""
        if not self._undecryptable.first(self._inodes.get(dir_ino).dev_ino):
            return
        name, exc = skipped[0]
        hint = "" if any_listed else " (none of its entries does: was its IV replaced?)"
        log.warning("skipping %d entries that do not decrypt in %r%s, first %r: %s; "
                    "cryptfs fsck lists them", len(skipped),
                    os.fsdecode(self._inodes.path(dir_ino)), hint, os.fsdecode(name), exc)


def _may_be_shown(name: str) -> bool:
    """Whether a backing name may be a conflict copy (or a diriv copy,
    which strands names): not a backing form, and not our own file."""
    if backing_kind(os.fsencode(name)) is not None:
        return False
    return not name.startswith(RESERVED_PREFIX) or \
        next(candidates(os.fsencode(name), foreign=True), None) is not None


def apply_attributes(target: int | str, mode: int | None, uid: int, gid: int,
                     times: tuple[int | None, int | None], **at: Any) -> os.stat_result:
    """Set attributes on a descriptor, a ``/proc/self/fd`` path (both name
    one inode, so checking for a symlink first is race-free) or, with ``at``
    (``dir_fd``, ``follow_symlinks=False``) and no ``mode``, a name."""
    atime, mtime = times
    keep_time = (atime is None) != (mtime is None)
    st = os.stat(target, **at) if mode is not None or keep_time else None
    if mode is not None and st is not None and not stat.S_ISLNK(st.st_mode):
        os.chmod(target, mode)
    if uid != -1 or gid != -1:
        os.chown(target, uid, gid, **at)
    if atime is not None or mtime is not None:
        if keep_time and st is not None:
            atime = st.st_atime_ns if atime is None else atime
            mtime = st.st_mtime_ns if mtime is None else mtime
        os.utime(target, ns=(atime, mtime), **at)
    return os.stat(target, **at)


def _chown_new(dir_fd: int, name: str, owner: tuple[int, int]) -> None:
    """Give a new entry to ``owner``, except its group in a setgid
    directory: there the backing filesystem gave it the directory's."""
    uid, gid = owner
    if os.fstat(dir_fd).st_mode & stat.S_ISGID:
        gid = -1
    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def _set_new_mode(dir_fd: int, name: str, st: os.stat_result, mode: int) -> os.stat_result:
    """Give the new entry ``name`` (attributes ``st``) the permission bits
    ``mode``, plus the setgid bit a directory inherited from a setgid
    parent; its attributes afterwards."""
    if stat.S_ISDIR(st.st_mode):
        mode |= st.st_mode & stat.S_ISGID
    if stat.S_IMODE(st.st_mode) == mode:
        return st
    fd = os.open(name, _ENTRY_PATH, dir_fd=dir_fd)
    try:  # through the descriptor: the entry we made, never a symlink's target
        made = os.fstat(fd)
        if (made.st_dev, made.st_ino) != (st.st_dev, st.st_ino):
            raise OSError(errno.EIO, f"new backing entry {name!r} was replaced")
        os.chmod(proc_path(fd), mode)
        return os.fstat(fd)
    finally:
        os.close(fd)


def _holds(dir_fd: int, name: str, data: bytes) -> bool:
    """Whether file ``name`` in ``dir_fd`` holds exactly ``data``."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, len(data) + 1) == data
    finally:
        os.close(fd)


def _restore_diriv(dir_fd: int, saved: bytes | None) -> None:
    if saved is None:
        return
    fd = os.open(DIRIV_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o440,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o440)  # whatever the daemon's umask
        os.write(fd, saved)
    finally:
        os.close(fd)


def _new_symlink(dir_fd: int, name: str, sealed: bytes, like: os.stat_result) -> None:
    """A symlink ``name`` in ``dir_fd`` with the owner and times of ``like``;
    nothing is left behind if that fails."""
    os.symlink(sealed, name, dir_fd=dir_fd)
    try:
        made = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (made.st_uid, made.st_gid) != (like.st_uid, like.st_gid):
            with contextlib.suppress(PermissionError):  # only root may give it away
                os.chown(name, like.st_uid, like.st_gid, dir_fd=dir_fd, follow_symlinks=False)
        os.utime(name, ns=(like.st_atime_ns, like.st_mtime_ns), dir_fd=dir_fd,
                 follow_symlinks=False)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
