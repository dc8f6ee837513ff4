"""One place of the view, what it is and what it holds.

A *place* is a plaintext entry (shown under its encrypted name), the key
file (``cryptfs.conf`` at the root), a directory's ``cryptfs.diriv``, or a
long name's sidecar.  ``ReverseView`` computes a place's attributes,
a directory's listing, a lookup by view name, and what a read returns,
from the plaintext tree and the key alone: nothing is stored.  Called
from the event loop and from worker threads; it keeps no state but caches
of pure functions.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptfs.content.codec import ContentCodec
from cryptfs.errors import FileNameError, NameTooLongError
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.reverse import ReverseDerivation
from cryptfs.names.filenames import DIRIV_NAME, NameCipher, derive_diriv
from cryptfs.names.metadata import (
    OWNER_DIRECTORY,
    OWNER_FILE,
    MetadataCipher,
    SymlinkPlace,
    XattrOwner,
)
from cryptfs.reverse.content import EncryptingReader
from cryptfs.reverse.exclude import Excluder
from cryptfs.reverse.names import ViewName, resolve, sidecar_bytes, view_names
from cryptfs.reverse.plain import PlainTree, join, split
from cryptfs.reverse.xattrs import ViewXattrs

log = logging.getLogger(__name__)

KEYFILE_VIEW_NAME = "cryptfs.conf"
FIXED_MTIME_NS = 0  # IV files and sidecars: their bytes never change at their path
_IV_CACHE_MAX = 1 << 16


class Kind(enum.Enum):
    ENTRY = "entry"  # a plaintext entry; path: the entry
    KEYFILE = "keyfile"  # cryptfs.conf; path: b""
    DIRIV = "diriv"  # path: its directory
    SIDECAR = "sidecar"  # path: the long-named entry


@dataclass(frozen=True, slots=True)
class Place:
    kind: Kind
    path: bytes


ROOT = Place(Kind.ENTRY, b"")


@dataclass(frozen=True, slots=True)
class Attrs:
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class BytesReader:
    """A small file whose bytes are known when it is opened."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset:offset + length]

    def close(self) -> None:
        pass


Reader = BytesReader | EncryptingReader


class ReverseView:
    def __init__(self, plain: PlainTree, keyfile: Path, keys: KeyRing,
                 metadata: MetadataCipher, codec: ContentCodec, excluder: Excluder) -> None:
        self.plain = plain
        self._keyfile = keyfile
        self._names = NameCipher(keys, convergent=True)
        self._diriv_key = keys.diriv_key
        self._derivation = ReverseDerivation(keys)
        self._metadata = metadata
        self._codec = codec
        self._excluder = excluder
        self._xattrs = ViewXattrs(metadata, self._derivation)
        self._ivs: dict[bytes, bytes] = {b"": self._derivation.root_iv}

    # -- directory IVs and file IDs (pure functions of the path) --

    def dir_iv(self, path: bytes) -> bytes:
        iv = self._ivs.get(path)
        if iv is None:
            parent, name = split(path)
            iv = derive_diriv(self._diriv_key, self.dir_iv(parent), name)
            if len(self._ivs) >= _IV_CACHE_MAX:
                self._ivs = {b"": self._derivation.root_iv}
            self._ivs[path] = iv
        return iv

    def file_id(self, path: bytes) -> bytes:
        parent, name = split(path)
        return self._derivation.file_id(self.dir_iv(parent), name)

    def entry_name(self, path: bytes) -> str:
        parent, name = split(path)
        return self._names.to_backing(self.dir_iv(parent), name).name

    # -- attributes --

    def attrs(self, place: Place, st: os.stat_result | None = None) -> Attrs:
        """``FileNotFoundError`` if the place is gone (or now excluded)."""
        if place.kind is Kind.KEYFILE:
            st = os.stat(self._keyfile)
            return _attrs(st, st.st_size, nlink=1)
        if place.kind is Kind.DIRIV:
            return _fixed(self.plain.lstat(place.path), 0o440, 16)
        if place.kind is Kind.SIDECAR:
            parent = self.plain.lstat(split(place.path)[0])
            return _fixed(parent, 0o440, len(self._sidecar(place.path)))
        if st is None:
            st = self._entry_stat(place.path)
        if stat.S_ISREG(st.st_mode):  # one file per path: hard links are not shared
            return _attrs(st, self._codec.layout.backing_size(st.st_size), nlink=1)
        if stat.S_ISLNK(st.st_mode):
            return _attrs(st, len(self.readlink(place)))
        return _attrs(st, st.st_size)

    def _entry_stat(self, path: bytes) -> os.stat_result:
        st = self.plain.lstat(path)
        if path and self._excluder.excluded(path, st):
            raise FileNotFoundError(os.fsdecode(path))
        return st

    def _sidecar(self, path: bytes) -> bytes:
        parent, name = split(path)
        return sidecar_bytes(self._names, self.dir_iv(parent), name)

    # -- directories --

    def listing(self, path: bytes) -> list[tuple[str, Place, Attrs]]:
        """The view entries of directory ``path``: its IV file, the key
        file at the root, then every plaintext entry not excluded (a long
        name followed by its sidecar)."""
        st = self._entry_stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(os.fsdecode(path))
        out = [(DIRIV_NAME, Place(Kind.DIRIV, path), _fixed(st, 0o440, 16))]
        if not path:
            out.append((KEYFILE_VIEW_NAME, Place(Kind.KEYFILE, b""),
                        self.attrs(Place(Kind.KEYFILE, b""))))
        iv = self.dir_iv(path)
        for name, child_st in self.plain.listdir(path):
            child = join(path, name)
            if self._excluder.excluded(child, child_st):
                continue
            try:
                names = view_names(self._names, iv, name)
                entry = Place(Kind.ENTRY, child)
                out.append((names[0].name, entry, self.attrs(entry, child_st)))
            except (OSError, FileNameError) as exc:  # gone meanwhile, say
                log.debug("%s left out of the listing: %s", os.fsdecode(child), exc)
                continue
            for extra in names[1:]:
                out.append((extra.name, Place(Kind.SIDECAR, child),
                            _fixed(st, 0o440, len(self._sidecar(child)))))
        return out

    def lookup(self, path: bytes, name: str) -> tuple[Place, Attrs] | None:
        """The place named ``name`` in view directory ``path``, or None."""
        if name == DIRIV_NAME:
            place = Place(Kind.DIRIV, path)
            return place, self.attrs(place)
        if not path and name == KEYFILE_VIEW_NAME:
            place = Place(Kind.KEYFILE, b"")
            return place, self.attrs(place)
        found: ViewName | None = resolve(
            self._names, self.dir_iv(path), name,
            lambda: [plain for plain, _ in self.plain.listdir(path)])
        if found is None:
            return None
        child = join(path, found.plain)
        try:
            st = self._entry_stat(child)
        except (FileNotFoundError, NotADirectoryError):
            return None
        place = Place(Kind.SIDECAR if found.sidecar else Kind.ENTRY, child)
        return place, self.attrs(place, None if found.sidecar else st)

    # -- contents --

    def readlink(self, place: Place) -> bytes:
        target = self.plain.readlink(place.path)
        parent, _ = split(place.path)
        where = SymlinkPlace(self.dir_iv(parent), self.entry_name(place.path).encode())
        try:
            return self._metadata.encrypt_target(target, where)
        except NameTooLongError as exc:
            raise OSError(errno.ENAMETOOLONG, str(exc)) from exc

    def open(self, place: Place) -> Reader:
        if place.kind is Kind.KEYFILE:
            return BytesReader(self._keyfile.read_bytes())
        if place.kind is Kind.DIRIV:
            return BytesReader(self.dir_iv(place.path))
        if place.kind is Kind.SIDECAR:
            return BytesReader(self._sidecar(place.path))
        fd = self.plain.open_file(place.path)
        try:
            return EncryptingReader(self._codec, fd, self.file_id(place.path))
        except BaseException:
            os.close(fd)
            raise

    def xattrs(self, place: Place) -> dict[bytes, bytes]:
        """Stored name -> stored value, as a forward mount keeps them."""
        if place.kind is not Kind.ENTRY:
            return {}
        st = self._entry_stat(place.path)
        if stat.S_ISDIR(st.st_mode):
            owner = XattrOwner(OWNER_DIRECTORY, self.dir_iv(place.path))
        elif stat.S_ISREG(st.st_mode):
            owner = XattrOwner(OWNER_FILE, self.file_id(place.path))
        else:
            return {}
        plain = self.plain.user_xattrs(place.path)
        return self._xattrs.seal(owner, plain, os.fsdecode(place.path)) if plain else {}


def _attrs(st: os.stat_result, size: int, nlink: int | None = None) -> Attrs:
    return Attrs(st.st_mode, st.st_nlink if nlink is None else nlink, st.st_uid, st.st_gid,
                 st.st_rdev, size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)


def _fixed(owner: os.stat_result, mode: int, size: int) -> Attrs:
    """A file of cryptfs' own whose bytes depend only on its path: owned
    like its directory, with a fixed time so that backup tools that compare
    times never copy it again."""
    return Attrs(stat.S_IFREG | mode, 1, owner.st_uid, owner.st_gid, 0, size,
                 FIXED_MTIME_NS, FIXED_MTIME_NS, FIXED_MTIME_NS)
