"""Encrypted file names: plaintext name <-> backing name.

Each backing directory holds a random 16-byte *directory IV* in the file
``cryptfs.diriv``.  A name is padded (PKCS#7 to a multiple of 16, hiding its
exact length), sealed with AES-256-SIV under the filename key with the
associated data ``["cryptfs v1 name", diriv]``, and encoded as unpadded
base64url.  SIV is deterministic, so a lookup needs no directory listing;
the directory IV makes the same name differ between directories; and since
SIV is a PRF over the whole name, names sharing a prefix share nothing.

Encoded names longer than 255 bytes are stored as
``cryptfs.longname.<base64url(SHA-256(encoded))>`` with the full encoded name
in a sidecar file of that name plus ``.name``.  Encoded names only use
``[A-Za-z0-9_-]``, so they can never collide with cryptfs' own files, which
all start with ``cryptfs.``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from cryptfs.errors import InvalidNameError, NameDecodeError, NameTooLongError
from cryptfs.keys.hierarchy import KeyRing

NAME_MAX = 255  # bytes, for plaintext and backing names alike
DIRIV_NAME = "cryptfs.diriv"
DIRIV_LEN = 16
LONGNAME_PREFIX = "cryptfs.longname."
SIDECAR_SUFFIX = ".name"
RESERVED_PREFIX = "cryptfs."
NAME_AD = b"cryptfs v1 name"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_LONGNAME = re.compile(re.escape(LONGNAME_PREFIX) + r"[A-Za-z0-9_-]{43}")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Strict inverse of ``b64url``; raises ``ValueError`` on anything else."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(data) != text:  # non-canonical trailing bits
        raise ValueError("non-canonical base64url")
    return data


def pad16(data: bytes) -> bytes:
    """PKCS#7 padding to a multiple of 16 (always adds 1..16 bytes)."""
    n = 16 - len(data) % 16
    return data + bytes([n]) * n


def unpad16(data: bytes) -> bytes:
    if not data or len(data) % 16:
        raise ValueError("bad padded length")
    n = data[-1]
    if not 1 <= n <= 16 or data[-n:] != bytes([n]) * n:
        raise ValueError("bad padding")
    return data[:-n]


def check_name(name: bytes) -> None:
    """Reject what no POSIX directory entry may be called."""
    if name in (b"", b".", b"..") or b"/" in name or b"\x00" in name:
        raise InvalidNameError(f"invalid file name {name!r}")
    if len(name) > NAME_MAX:
        raise NameTooLongError(f"file name of {len(name)} bytes exceeds {NAME_MAX}")


def is_reserved(backing_name: str) -> bool:
    """cryptfs' own files: the key file, directory IVs, long names, sidecars."""
    return backing_name.startswith(RESERVED_PREFIX)


def is_longname(backing_name: str) -> bool:
    return _LONGNAME.fullmatch(backing_name) is not None


def sidecar_name(longname: str) -> str:
    return longname + SIDECAR_SUFFIX


@dataclass(frozen=True, slots=True)
class BackingName:
    """Where a plaintext name lives in the backing directory."""

    name: str  # the directory entry
    sidecar: str | None = None  # for long names: the full encoded name to store

    @property
    def sidecar_name(self) -> str | None:
        return sidecar_name(self.name) if self.sidecar is not None else None


NAME_CACHE_SIZE = 16384  # names per direction: a few MiB at most


class _LRU:
    """A bounded least-recently-used map, safe to share between threads."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            if len(self._items) > self._size:
                self._items.popitem(last=False)


class NameCipher:
    """Encrypts and decrypts names under the filename key.

    AES-SIV is deterministic, so results are cached (bounded LRU, each
    direction, errors not cached), and encrypting a name also records its
    decryption: listing what was just created, a lookup after a listing, or
    ``rm -rf`` listing a directory three times cost no cipher work."""

    def __init__(self, keys: KeyRing) -> None:
        self._siv = AESSIV(keys.name_key)
        self._backing = _LRU(NAME_CACHE_SIZE)  # (dir IV, name) -> BackingName
        self._plain = _LRU(NAME_CACHE_SIZE)  # (dir IV, full encoded name) -> name

    def to_backing(self, dir_iv: bytes, name: bytes) -> BackingName:
        entry = self._backing.get((dir_iv, name))
        if entry is None:
            entry = self._to_backing(dir_iv, name)
            self._backing.put((dir_iv, name), entry)
            encoded = entry.sidecar if entry.sidecar is not None else entry.name
            self._plain.put((dir_iv, encoded), name)
        return entry

    def decode(self, dir_iv: bytes, encoded: str) -> bytes:
        """Plaintext of an encoded name, or ``NameDecodeError``."""
        name = self._plain.get((dir_iv, encoded))
        if name is None:
            name = self._decode(dir_iv, encoded)
            self._plain.put((dir_iv, encoded), name)
        return name

    def encode(self, dir_iv: bytes, name: bytes) -> str:
        """The full encoded (possibly > 255 bytes) form of ``name``."""
        check_name(name)
        return b64url(self._siv.encrypt(pad16(name), [NAME_AD, dir_iv]))

    def _to_backing(self, dir_iv: bytes, name: bytes) -> BackingName:
        encoded = self.encode(dir_iv, name)
        if len(encoded) <= NAME_MAX:
            return BackingName(encoded)
        digest = b64url(hashlib.sha256(encoded.encode("ascii")).digest())
        return BackingName(LONGNAME_PREFIX + digest, encoded)

    def _decode(self, dir_iv: bytes, encoded: str) -> bytes:
        try:
            sealed = unb64url(encoded)
        except ValueError as exc:
            raise NameDecodeError(f"{encoded[:40]!r} is not an encrypted name") from exc
        if len(sealed) < 32 or len(sealed) % 16:
            raise NameDecodeError(f"{encoded[:40]!r} has an impossible length")
        try:
            name = unpad16(self._siv.decrypt(sealed, [NAME_AD, dir_iv]))
        except (InvalidTag, ValueError) as exc:
            raise NameDecodeError(
                f"{encoded[:40]!r} does not decrypt in this directory (foreign or moved)"
            ) from exc
        try:
            check_name(name)
        except (InvalidNameError, NameTooLongError) as exc:
            raise NameDecodeError(f"{encoded[:40]!r} decrypts to an invalid name") from exc
        return name

    def decode_longname(self, dir_iv: bytes, longname: str, sidecar: bytes) -> bytes:
        """Plaintext of a long name, given its sidecar's contents."""
        try:
            encoded = sidecar.decode("ascii").strip()
        except UnicodeDecodeError as exc:
            raise NameDecodeError(f"sidecar of {longname} is not ASCII") from exc
        digest = b64url(hashlib.sha256(encoded.encode("ascii")).digest())
        if not is_longname(longname) or longname != LONGNAME_PREFIX + digest:
            raise NameDecodeError(f"sidecar of {longname} does not match its hash")
        return self.decode(dir_iv, encoded)


# --- directory IVs ---------------------------------------------------------------


def create_diriv(dir_fd: int, sync: bool = True) -> bytes:
    """Write a fresh directory IV into the (new, empty) backing directory;
    ``sync=False``: the caller fsyncs it (the mount does, off its event loop)."""
    dir_iv = secrets.token_bytes(DIRIV_LEN)
    fd = os.open(DIRIV_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o440,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o440)  # whatever the daemon's umask
        os.write(fd, dir_iv)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return dir_iv


def read_diriv(dir_fd: int) -> bytes:
    """The directory IV of a backing directory; ``NameDecodeError`` if it is
    missing or damaged (the directory's names cannot be decrypted)."""
    try:
        fd = os.open(DIRIV_NAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise NameDecodeError(f"directory has no {DIRIV_NAME}") from exc
    try:
        data = os.read(fd, DIRIV_LEN + 1)
    finally:
        os.close(fd)
    if len(data) != DIRIV_LEN:
        raise NameDecodeError(f"{DIRIV_NAME} is {len(data)} bytes, not {DIRIV_LEN}")
    return data


