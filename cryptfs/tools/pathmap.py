"""``cryptfs path``: the map between plaintext and backing paths, offline.

To restore one file from a backup or a sync tool's history of the cipher
directory, one needs the backing path that holds it (and, for a long name,
its sidecar); to read a backup tool's report of a changed backing file, the
plaintext path.  Both walk from the root one component at a time, as the
mount does: each directory's IV read from its backing directory (or derived
again where a ``convergent-dirivs`` directory lost it), names sealed and
opened with the key file's name cipher, and names the mount shows although
they do not decode (sync tools' conflict copies, names stranded under a
copy of a directory IV) found through ``names/resolve.py``, so the map
agrees with what the mount shows.

It only reads, takes no lock (a mounted directory or a read-only copy
works) and never leaves the cipher directory: directories are opened by
descriptor with ``O_NOFOLLOW``, so a symlink (whose backing target is
ciphertext anyway) is never followed, as in ``tools/fsck.py``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cryptfs.errors import DirIvMissingError, FileNameError, PathNotFoundError, UsageError
from cryptfs.lowlevel.linux import DIR_READ
from cryptfs.names.conflicts import Kind
from cryptfs.names.filenames import (
    DIRIV_NAME,
    RESERVED_PREFIX,
    SIDECAR_SUFFIX,
    NameCipher,
    check_name,
    decode_entry,
    derive_missing_diriv,
    is_longname,
    read_diriv,
    sidecar_name,
)
from cryptfs.names.resolve import Directory, Shown, is_sidecar, resolve


@dataclass(frozen=True)
class Component:
    """One step of a mapped path; paths relative to the cipher directory
    (backing) or its root (plaintext, with a leading ``/``)."""

    plaintext: str
    backing: str
    sidecar: str | None  # a long name's sidecar file (the entry is useless without it)


def plain_parts(path: str) -> list[bytes]:
    """The components of a plaintext path, with or without a leading ``/``."""
    parts = [p for p in os.fsencode(path).split(b"/") if p not in (b"", b".")]
    for part in parts:
        if part == b"..":
            raise UsageError(f"{path!r}: '..' is not allowed in a plaintext path")
        try:
            check_name(part)
        except FileNameError as exc:  # no file can have that name: a bad argument
            raise UsageError(f"{path!r}: {exc}") from exc
    return parts


def backing_parts(cipherdir: str, path: str) -> list[str]:
    """The components of a backing path, relative to ``cipherdir`` or
    absolute inside it (checked lexically: nothing is resolved)."""
    if os.path.isabs(path):
        path = os.path.normpath(path)
        for root in dict.fromkeys((os.path.abspath(cipherdir), os.path.realpath(cipherdir))):
            if path == root or path.startswith(root.rstrip("/") + "/"):
                path = os.path.relpath(path, root)
                break
        else:
            raise UsageError(f"{path} is not inside the cipher directory {cipherdir}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"{path!r}: '..' is not allowed in a backing path")
    return parts


class PathMap:
    """Maps paths of one cipher directory, given its name cipher."""

    def __init__(self, cipherdir: str, names: NameCipher) -> None:
        self.root = os.path.abspath(cipherdir)
        self.names = names

    def encrypt(self, plain_path: str) -> list[Component]:
        """The backing entry of every component of ``plain_path``;
        ``PathNotFoundError`` naming the first one that does not exist."""
        parts = plain_parts(plain_path)
        steps: list[Component] = []
        with self._walk() as walker:
            for i, name in enumerate(parts):
                plain = "/" + os.fsdecode(b"/".join(parts[:i + 1]))
                backing, sidecar, origin = walker.find(name, plain)
                steps.append(walker.component(plain, backing, sidecar))
                if i + 1 < len(parts):
                    walker.enter(backing, plain, origin)
        return steps

    def decrypt(self, backing_path: str) -> list[Component]:
        """The plaintext name of every component of ``backing_path``; a
        sidecar as the last component maps to its entry."""
        parts = backing_parts(self.root, backing_path)
        steps: list[Component] = []
        with self._walk() as walker:
            for i, backing in enumerate(parts):
                last = i + 1 == len(parts)
                if last:
                    backing = walker.entry_of_sidecar(backing)
                name, sidecar, origin = walker.name_of(backing)
                plain = (steps[-1].plaintext if steps else "") + "/" + os.fsdecode(name)
                steps.append(walker.component(plain, backing, sidecar))
                if not last:
                    walker.enter(backing, plain, origin)
        return steps

    @contextmanager
    def _walk(self) -> Iterator[_Walker]:
        try:
            fd = os.open(self.root, DIR_READ)
        except OSError as exc:
            raise PathNotFoundError(f"cannot open {self.root}: {exc.strerror}") from exc
        walker = _Walker(self.names, fd)
        try:
            walker.iv = _diriv(fd, "/")
            yield walker
        finally:
            os.close(walker.fd)


Origin = tuple[bytes, bytes]  # (parent IV, plaintext name) a directory's IV derives from


class _Walker:
    """The directory the walk is in: its descriptor, IV and backing path."""

    def __init__(self, names: NameCipher, fd: int) -> None:
        self.names, self.fd = names, fd
        self.iv = b""
        self.rel = ""  # backing path of this directory, relative to the cipher directory

    def component(self, plain: str, backing: str, sidecar: str | None) -> Component:
        join = os.path.join
        return Component(plain, join(self.rel, backing),
                         None if sidecar is None else join(self.rel, sidecar))

    def find(self, name: bytes, plain: str) -> tuple[str, str | None, Origin]:
        """The backing entry (and sidecar) of plaintext ``name`` here: its
        sealed name, else a name the mount shows for a sync tool's copy."""
        entry = self.names.to_backing(self.iv, name)
        if self._exists(entry.name):
            return entry.name, entry.sidecar_name, (self.iv, name)
        for shown in self._resolve().shown:
            if shown.name == name:
                return shown.backing.name, _shown_sidecar(shown), (shown.iv, shown.plain)
        raise PathNotFoundError(f"{plain}: no such file or directory in the cipher directory "
                                f"(its backing name would be {os.path.join(self.rel, entry.name)})")

    def name_of(self, backing: str) -> tuple[bytes, str | None, Origin]:
        """The name the mount shows for backing entry ``backing`` here."""
        where = os.path.join(self.rel, backing)
        if not self._exists(backing):
            raise PathNotFoundError(f"{where}: no such file or directory")
        try:
            plain = decode_entry(self.names, self.iv, self.fd, backing)
        except (FileNameError, OSError, UnicodeDecodeError):
            pass
        else:
            return plain, _own_sidecar(backing), (self.iv, plain)
        directory = self._resolve()
        if backing in directory.real:  # a long name decoded with a sidecar's copy
            plain = directory.real[backing]
            return plain, _own_sidecar(backing), (self.iv, plain)
        for shown in directory.shown:
            if shown.backing.name == backing:
                return shown.name, _shown_sidecar(shown), (shown.iv, shown.plain)
        if backing.startswith(RESERVED_PREFIX) and not is_longname(backing):
            raise PathNotFoundError(f"{where} is one of cryptfs's own files, not an entry")
        raise PathNotFoundError(f"{where} is not shown in the mount: it does not decrypt in "
                                "its directory (foreign, or moved there from elsewhere)")

    def entry_of_sidecar(self, backing: str) -> str:
        """The long name whose sidecar (or a sync tool's copy of it)
        ``backing`` is; else ``backing`` itself."""
        if is_sidecar(backing):
            return backing[:-len(SIDECAR_SUFFIX)]
        if backing.startswith(RESERVED_PREFIX) and backing != DIRIV_NAME \
                and not is_longname(backing) and self._exists(backing):
            for copy in self._resolve().sidecar_copies:
                if copy.name == backing:
                    return copy.copy.original.decode("ascii")[:-len(SIDECAR_SUFFIX)]
        return backing

    def enter(self, backing: str, plain: str, origin: Origin) -> None:
        """Step into directory ``backing``; its IV read, or derived again."""
        try:
            fd = os.open(backing, DIR_READ, dir_fd=self.fd)
        except OSError as exc:
            what = "a symlink or not a directory" if exc.errno in (
                errno.ELOOP, errno.ENOTDIR) else exc.strerror
            raise PathNotFoundError(f"{plain}: {what}") from exc
        os.close(self.fd)
        self.fd = fd
        self.rel = os.path.join(self.rel, backing)
        self.iv = _diriv(fd, plain, self.names, origin)

    def _exists(self, backing: str) -> bool:
        try:
            os.stat(backing, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _resolve(self) -> Directory:
        """The directory as the mount lists it (only read when a name is not
        simply sealed: conflict copies and stranded names need the listing)."""
        return resolve(self.names, self.iv, self.fd, os.listdir(self.fd))


def _own_sidecar(backing: str) -> str | None:
    return sidecar_name(backing) if is_longname(backing) else None


def _shown_sidecar(shown: Shown) -> str | None:
    """A shown long name's sidecar: its own (stranded), or its original's
    (a conflict copy shares the sidecar of the name it copies)."""
    if is_longname(shown.backing.name):
        return sidecar_name(shown.backing.name)
    if shown.copy is not None and shown.copy.kind is Kind.LONGNAME:
        return sidecar_name(shown.copy.original.decode("ascii"))
    return None


def _diriv(fd: int, plain: str, names: NameCipher | None = None,
           origin: Origin | None = None) -> bytes:
    """A directory's IV, derived again if its file is missing and the
    directory is convergent (never written back: this command only reads)."""
    try:
        return read_diriv(fd)
    except DirIvMissingError as exc:
        derived = None if names is None or origin is None else \
            derive_missing_diriv(fd, names, *origin)
        if derived is None:
            raise PathNotFoundError(f"{plain}: directory IV unusable, its names cannot be "
                                    f"decrypted ({exc}; cryptfs fsck says more)") from exc
        return derived.iv
    except (FileNameError, OSError) as exc:
        raise PathNotFoundError(f"{plain}: directory IV unusable, its names cannot be "
                                f"decrypted ({exc}; cryptfs fsck says more)") from exc

