"""The backing tree, directory by directory: plaintext names to backing
entries (with directory IVs and long-name sidecars) and listings back, and
the symlink targets and xattrs sealed to those entries.

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
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from cryptfs.content.codec import ContentCodec
from cryptfs.content.format import HEADER_SIZE
from cryptfs.errors import NameDecodeError
from cryptfs.fs.inodes import InodeTable, Link
from cryptfs.metadata import (
    OWNER_DIRECTORY,
    OWNER_FILE,
    MetadataCipher,
    SymlinkPlace,
    XattrOwner,
)
from cryptfs.names import (
    DIRIV_NAME,
    RESERVED_PREFIX,
    BackingName,
    NameCipher,
    create_diriv,
    is_longname,
    read_diriv,
    sidecar_name,
)

log = logging.getLogger(__name__)

_RESERVED = RESERVED_PREFIX.encode()
_DIRIV = DIRIV_NAME.encode()
MAX_REPORTED = 10000  # undecryptable names remembered so each is logged once
SYMLINK_TMP_PREFIX = RESERVED_PREFIX + "symlink-tmp-"  # + 16 hex digits
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    """rename(2) with ``flags`` (RENAME_NOREPLACE, RENAME_EXCHANGE); 0 is a plain rename."""
    if not flags:
        os.rename(old, new)
        return
    at_fdcwd = -100
    if _libc.renameat2(at_fdcwd, old, at_fdcwd, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True, slots=True)
class Listed:
    name: bytes  # plaintext
    backing: bytes  # backing entry name
    stat: os.stat_result


def xattr_owner(path: bytes, st: os.stat_result, codec: ContentCodec) -> XattrOwner:
    """The owner a bound xattr of ``path`` is sealed to, read from the backing
    entry: a directory's IV or a regular file's ID (empty if the file has no
    header).  Linux allows user.* attributes on nothing else (EPERM)."""
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return XattrOwner(OWNER_DIRECTORY, read_diriv(fd))
        finally:
            os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EPERM, "user.* attributes exist only on files and directories")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = os.pread(fd, HEADER_SIZE, 0)
    finally:
        os.close(fd)
    identity = codec.decode_header(data).file_id if data else b""
    return XattrOwner(OWNER_FILE, identity)


class BackingTree:
    def __init__(self, inodes: InodeTable, names: NameCipher, metadata: MetadataCipher,
                 codec: ContentCodec) -> None:
        self._inodes = inodes
        self._names = names
        self.metadata = metadata
        self._codec = codec
        self._dirivs: dict[int, bytes] = {}
        self._reported: set[tuple[bytes, bytes]] = set()

    # -- directory IVs --

    def diriv(self, dir_ino: int) -> bytes:
        iv = self._dirivs.get(dir_ino)
        if iv is None:
            fd = os.open(self._inodes.path(dir_ino), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                iv = read_diriv(fd)
            finally:
                os.close(fd)
            self._dirivs[dir_ino] = iv
        return iv

    def forget_dir(self, dir_ino: int) -> None:
        self._dirivs.pop(dir_ino, None)

    def init_dir(self, path: bytes) -> None:
        """Give a new backing directory its IV."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            create_diriv(fd)
        finally:
            os.close(fd)

    def is_empty(self, path: bytes) -> bool:
        """True if the backing directory holds nothing but its IV."""
        with os.scandir(path) as entries:
            return all(entry.name == _DIRIV for entry in entries)

    # -- names --

    def entry(self, parent: int, name: bytes) -> BackingName:
        return self._names.to_backing(self.diriv(parent), name)

    def path(self, parent: int, entry: BackingName) -> bytes:
        return self._inodes.child_path(parent, entry.name.encode())

    def add_sidecar(self, parent: int, entry: BackingName) -> None:
        """Store a long name's full encoding (before creating the entry)."""
        if entry.sidecar is None:
            return
        path = self._inodes.child_path(parent, sidecar_name(entry.name).encode())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, entry.sidecar.encode("ascii"))
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def creating(self, parent: int, name: bytes) -> Iterator[tuple[BackingName, bytes]]:
        """Yield the backing entry and path for a new ``name``; its long-name
        sidecar exists inside the block and is removed again if it fails."""
        entry = self.entry(parent, name)
        self.add_sidecar(parent, entry)
        try:
            yield entry, self.path(parent, entry)
        except BaseException:
            self.remove_sidecar(parent, entry)
            raise

    def remove_sidecar(self, parent: int, entry: BackingName) -> None:
        if entry.sidecar is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._inodes.child_path(parent, sidecar_name(entry.name).encode()))

    # -- symlink targets --

    def place(self, parent: int, backing_name: bytes) -> SymlinkPlace:
        return SymlinkPlace(self.diriv(parent), backing_name)

    def seal_target(self, parent: int, entry: BackingName, target: bytes) -> bytes:
        return self.metadata.encrypt_target(target, self.place(parent, entry.name.encode()))

    def read_target(self, link: Link) -> bytes:
        """The plaintext target of the symlink at ``link`` (parent, backing name)."""
        stored = os.readlink(self._inodes.child_path(*link))
        return self.metadata.decrypt_target(stored, self.place(*link))

    def readlink(self, ino: int) -> bytes:
        return self.read_target(self._inodes.link_of(ino))

    def reseals(self, st: os.stat_result) -> bool:
        """Whether this entry's stored form depends on its name (a bound symlink)."""
        return self.metadata.bound and stat.S_ISLNK(st.st_mode)

    def link(self, ino: int, parent: int, entry: BackingName, path: bytes) -> bool:
        """Make ``path`` another name of ``ino``: a hard link, or, for a bound
        symlink, a copy re-sealed for its name.  True if ``path`` is a new
        backing inode."""
        source = self._inodes.path(ino)
        st = os.lstat(source)
        if not self.reseals(st):
            os.link(source, path, follow_symlinks=False)
            return False
        target = self.readlink(ino)
        self._new_symlink(path, self.seal_target(parent, entry, target), st)
        return True

    def move_symlink(self, old: Link, new_parent: int, new: BackingName, flags: int) -> None:
        """Rename a bound symlink to ``new`` (replacing what is there unless
        ``flags`` has RENAME_NOREPLACE), re-sealed for its new place: made
        under a temporary name, renamed over the destination, then the old
        entry is unlinked (see the module docstring for crashes)."""
        old_path = self._inodes.child_path(*old)
        st = os.lstat(old_path)
        sealed = self.seal_target(new_parent, new, self.read_target(old))
        tmp = self._inodes.child_path(new_parent, (SYMLINK_TMP_PREFIX +
                                                   secrets.token_hex(8)).encode())
        self._new_symlink(tmp, sealed, st)
        try:
            renameat2(tmp, self.path(new_parent, new), flags)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.unlink(old_path)
        self._inodes.rebacked(old, os.lstat(self.path(new_parent, new)))

    @staticmethod
    def _new_symlink(path: bytes, sealed: bytes, like: os.stat_result) -> None:
        """A symlink at ``path`` with the owner and times of ``like``."""
        os.symlink(sealed, path)
        try:
            made = os.lstat(path)
            if (made.st_uid, made.st_gid) != (like.st_uid, like.st_gid):
                with contextlib.suppress(PermissionError):  # only root may give it away
                    os.chown(path, like.st_uid, like.st_gid, follow_symlinks=False)
            os.utime(path, ns=(like.st_atime_ns, like.st_mtime_ns), follow_symlinks=False)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    # -- extended attributes --

    def xattr_owner(self, ino: int, create: bool = False) -> XattrOwner:
        """The owner ``ino``'s bound xattrs are sealed to; with ``create``, a
        regular file without a header gets one (its ID is the owner)."""
        path = self._inodes.path(ino)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            return XattrOwner(OWNER_DIRECTORY, self.diriv(ino))
        owner = xattr_owner(path, st, self._codec)
        if create and not owner.identity:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                owner = XattrOwner(OWNER_FILE, self._codec.open(fd).ensure_header().file_id)
            finally:
                os.close(fd)
        return owner

    def listdir(self, dir_ino: int) -> list[Listed]:
        """Decrypted entries of a directory.  Entries that do not decrypt
        (foreign files, conflict copies, damage) are skipped, each logged once."""
        path = self._inodes.path(dir_ino)
        iv = self.diriv(dir_ino)
        listed = []
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                try:
                    if name.startswith(_RESERVED):
                        if not is_longname(name.decode("ascii", "replace")):
                            continue  # our own files: IVs, sidecars, key file
                        with open(entry.path + b".name", "rb") as f:
                            sidecar = f.read(4096)
                        plain = self._names.decode_longname(iv, name.decode("ascii"), sidecar)
                    else:
                        plain = self._names.decode(iv, name.decode("ascii", "replace"))
                    listed.append(Listed(plain, name, entry.stat(follow_symlinks=False)))
                except (NameDecodeError, OSError) as exc:
                    self._report(path, name, exc)
        return listed

    def _report(self, dir_path: bytes, name: bytes, exc: Exception) -> None:
        key = (dir_path, name)
        if key in self._reported or len(self._reported) >= MAX_REPORTED:
            return
        self._reported.add(key)
        log.warning("skipping %r in %r: %s", os.fsdecode(name), os.fsdecode(dir_path), exc)
