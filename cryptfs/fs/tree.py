"""The backing tree, directory by directory: plaintext names to backing
entries (with directory IVs and long-name sidecars) and listings back."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from cryptfs.errors import NameDecodeError
from cryptfs.fs.inodes import InodeTable
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


@dataclass(frozen=True, slots=True)
class Listed:
    name: bytes  # plaintext
    backing: bytes  # backing entry name
    stat: os.stat_result


class BackingTree:
    def __init__(self, inodes: InodeTable, names: NameCipher) -> None:
        self._inodes = inodes
        self._names = names
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
