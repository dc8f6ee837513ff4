"""Encrypted file names: plaintext name <-> backing name.

Each backing directory holds a 16-byte *directory IV* in the file
``cryptfs.diriv``: random, or with the key file feature ``convergent-dirivs``
(every new cipher directory) derived at mkdir from the parent's IV and the
new directory's name, so two machines that make the same path write the same
IV and a sync tool sees no conflict; a lost IV can then be derived again
(``derive_missing_diriv``) unless the directory was renamed since it was
made.  A name is padded (PKCS#7 to a multiple of 16, hiding its exact
length), sealed with AES-256-SIV under the filename key with the associated
data ``["cryptfs v1 name", diriv]``, and encoded as unpadded base64url.  SIV
is deterministic, so a lookup needs no directory listing; the directory IV
makes the same name differ between directories; and since SIV is a PRF
over the whole name, names sharing a prefix share nothing.

Encoded names longer than 255 bytes are stored as
``cryptfs.longname.<base64url(SHA-256(encoded))>`` with the full encoded name
in a sidecar file of that name plus ``.name``.  Encoded names only use
``[A-Za-z0-9_-]``, so they can never collide with cryptfs' own files, which
all start with ``cryptfs.``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from cryptfs.errors import DirIvMissingError, InvalidNameError, NameDecodeError, NameTooLongError
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.keyfile import FEATURE_CONVERGENT_DIRIVS

NAME_MAX = 255  # bytes, for plaintext and backing names alike
DIRIV_NAME = "cryptfs.diriv"
DIRIV_LEN = 16
LONGNAME_PREFIX = "cryptfs.longname."
SIDECAR_SUFFIX = ".name"
SIDECAR_MAX = 4096  # bytes read from a sidecar (an encoded name is at most ~4 KiB)
RESERVED_PREFIX = "cryptfs."
NAME_AD = b"cryptfs v1 name"
DIRIV_LABEL = b"cryptfs v1 directory iv"  # HMAC input prefix of a derived IV
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


def _shortest_long_name() -> int:
    """The shortest plaintext name whose encoded form (padded, sealed with
    the 16-byte SIV tag, base64url) exceeds NAME_MAX, so gets a long entry."""
    for length in range(1, NAME_MAX + 1):
        if len(b64url(bytes(len(pad16(bytes(length))) + 16))) > NAME_MAX:
            return length
    return NAME_MAX


LONG_NAME_MIN = _shortest_long_name()


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

    def __init__(self, keys: KeyRing, convergent: bool = False) -> None:
        """``convergent``: new directories get derived IVs (``new_diriv``)."""
        self._siv = AESSIV(keys.name_key)
        self._backing = _LRU(NAME_CACHE_SIZE)  # (dir IV, name) -> BackingName
        self._plain = _LRU(NAME_CACHE_SIZE)  # (dir IV, full encoded name) -> name
        self._diriv_key = keys.diriv_key if convergent else None

    @classmethod
    def for_features(cls, keys: KeyRing, features: Collection[str]) -> NameCipher:
        return cls(keys, FEATURE_CONVERGENT_DIRIVS in features)

    @property
    def convergent(self) -> bool:
        return self._diriv_key is not None

    def new_diriv(self, parent_iv: bytes, name: bytes) -> bytes:
        """The IV of a new directory ``name`` in the directory with IV ``parent_iv``."""
        if self._diriv_key is None:
            return secrets.token_bytes(DIRIV_LEN)
        return derive_diriv(self._diriv_key, parent_iv, name)

    def derived_diriv(self, parent_iv: bytes, name: bytes) -> bytes | None:
        """The IV ``name`` got if it was made in its parent under that name;
        None where IVs are random."""
        if self._diriv_key is None:
            return None
        return derive_diriv(self._diriv_key, parent_iv, name)

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


def derive_diriv(key: bytes, parent_iv: bytes, name: bytes) -> bytes:
    """A convergent directory IV: the first 16 bytes of HMAC-SHA256 under
    ``K_diriv`` of label, parent IV and plaintext name (docs/format.md §5.1).
    The label and the IV have fixed lengths, so the input is unambiguous."""
    if len(parent_iv) != DIRIV_LEN:
        raise ValueError(f"directory IV must be {DIRIV_LEN} bytes")
    check_name(name)
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(DIRIV_LABEL + parent_iv + name)
    return mac.finalize()[:DIRIV_LEN]


def create_diriv(dir_fd: int, sync: bool = True, dir_iv: bytes | None = None) -> bytes:
    """Write a directory IV (``dir_iv``, or fresh random bytes) into the
    (new, empty) backing directory; ``sync=False``: the caller fsyncs it
    (the mount does, off its event loop)."""
    if dir_iv is None:
        dir_iv = secrets.token_bytes(DIRIV_LEN)
    if len(dir_iv) != DIRIV_LEN:
        raise ValueError(f"directory IV must be {DIRIV_LEN} bytes")
    fd = os.open(DIRIV_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o440,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, 0o440)  # whatever the daemon's umask
        if os.write(fd, dir_iv) != DIRIV_LEN:
            raise OSError(errno.EIO, f"short write to {DIRIV_NAME}")
        if sync:
            os.fsync(fd)
    except BaseException:
        # A partial IV file reads as damaged, where a missing one may still
        # be derived: leave none (ours: O_EXCL made it).
        with contextlib.suppress(OSError):
            os.unlink(DIRIV_NAME, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)
    return dir_iv


def read_diriv(dir_fd: int) -> bytes:
    """The directory IV of a backing directory; ``NameDecodeError`` if it is
    missing or damaged (the directory's names cannot be decrypted)."""
    try:
        fd = os.open(DIRIV_NAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise DirIvMissingError(f"directory has no {DIRIV_NAME}") from exc
    try:
        data = os.read(fd, DIRIV_LEN + 1)
    finally:
        os.close(fd)
    if len(data) != DIRIV_LEN:
        raise NameDecodeError(f"{DIRIV_NAME} is {len(data)} bytes, not {DIRIV_LEN}")
    return data




@dataclass(frozen=True, slots=True)
class DerivedIv:
    """A missing directory IV derived again.  ``confirmed``: an entry of the
    directory decodes under it; otherwise no entry needed an IV (nothing
    could contradict it)."""

    iv: bytes
    confirmed: bool


def derive_missing_diriv(dir_fd: int, names: NameCipher, parent_iv: bytes,
                         name: bytes) -> DerivedIv | None:
    """The IV that directory ``dir_fd`` (named ``name`` in the directory with
    IV ``parent_iv``) got at mkdir, if it can be trusted: a directory renamed
    since it was made got its IV from its old name, which is not known, so
    the derived IV is used only when one of its encrypted entries decodes
    under it or it has none.  None: not derivable (random IVs, or no entry
    decodes)."""
    iv = names.derived_diriv(parent_iv, name)
    if iv is None:
        return None
    needing = 0
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if not _needs_iv(entry.name):
                continue
            needing += 1
            if _decodes(dir_fd, names, iv, entry.name):
                return DerivedIv(iv, confirmed=True)
    return DerivedIv(iv, confirmed=False) if needing == 0 else None


def _needs_iv(backing: str) -> bool:
    """Whether a backing entry is an encrypted name (foreign files, sync
    tools' temporaries and conflict copies, and our own files are not)."""
    if backing.startswith(RESERVED_PREFIX):
        return is_longname(backing)
    try:
        sealed = unb64url(backing)
    except ValueError:
        return False
    return len(sealed) >= 32 and len(sealed) % 16 == 0


def _decodes(dir_fd: int, names: NameCipher, iv: bytes, backing: str) -> bool:
    try:
        decode_entry(names, iv, dir_fd, backing)
    except (NameDecodeError, OSError):
        return False
    return True


def decode_entry(names: NameCipher, iv: bytes, dir_fd: int, backing: str) -> bytes:
    """The plaintext name of backing entry ``backing`` (encoded, or long
    through its sidecar) in directory ``dir_fd`` whose IV is ``iv``."""
    if not is_longname(backing):
        return names.decode(iv, backing)
    sidecar = read_small(dir_fd, sidecar_name(backing), SIDECAR_MAX)
    return names.decode_longname(iv, backing, sidecar)


def read_small(dir_fd: int, name: str, limit: int) -> bytes:
    """Up to ``limit`` bytes of file ``name`` (never through a symlink)."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def write_derived_diriv(dir_fd: int, dir_iv: bytes) -> bool:
    """Put a derived IV back into directory ``dir_fd`` as mkdir would have
    (``O_EXCL``, mode 0440, fsync'd, then the directory fsync'd), so the
    directory heals wherever a sync tool carries it.  False if an IV file
    is there already (left as it is).  For the mount and for fsck's repair."""
    try:
        create_diriv(dir_fd, sync=True, dir_iv=dir_iv)
    except FileExistsError:
        return False
    os.fsync(dir_fd)
    return True
