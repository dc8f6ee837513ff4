"""Encrypted symlink targets and extended attributes.

All use AES-256-SIV under the metadata key (separate from the filename key),
with a purpose label in the associated data so a value of one kind can never
be accepted as another.  Two encodings exist (docs/format.md §6):

**Bound** (key file feature ``bound-metadata``, every new cipher directory):
each item is bound to the entry it belongs to, so it cannot be swapped or
copied between entries unnoticed, and plaintexts are PKCS#7 padded to 16
bytes so their exact lengths do not show.

* symlink target: random 16-byte nonce R; the backing target is
  ``base64url(R || SIV(pad(target), ["cryptfs v2 symlink", D, E, R]))`` with
  D the parent directory's IV and E the symlink's backing entry name.  A
  renamed symlink is re-sealed (``fs/tree.py``).
* xattrs (only regular files and directories carry user.* attributes on
  Linux) are bound to an *owner* that survives rename and hard links: the
  file ID of a regular file's header, or a directory's own IV.  The name is
  ``"user." + base64url(SIV(pad(name), ["cryptfs v2 xattr name", kind, id]))``,
  so equal names differ between files; the value is
  ``R || SIV(pad(value), ["cryptfs v2 xattr value", kind, id, stored name, R])``.

With ``convergent-dirivs`` a symlink's nonce R is not random but derived
from what it seals (``symlink_nonce``): the same symlink made at the same
place on two machines is stored byte for byte the same.  Xattr values keep
random nonces (docs/format.md §6.1 says why).

**Version 1** (no flag): the same shapes without the owner, the entry or the
padding: a target is ``["cryptfs v1 symlink", R]``, a name
``["cryptfs v1 xattr name"]`` (identical on every file), a value
``["cryptfs v1 xattr value", R, stored name]``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from cryptfs.errors import (
    InvalidNameError,
    NameDecodeError,
    NameTooLongError,
    XattrTooBigError,
)
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.keyfile import FEATURE_BOUND_METADATA, FEATURE_CONVERGENT_DIRIVS
from cryptfs.names.filenames import b64url, pad16, unb64url, unpad16

NONCE_LEN = 16
SIV_TAG_LEN = 16
PATH_MAX = 4096  # including the terminating NUL
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_PREFIX = b"user."
SYMLINK_AD = b"cryptfs v1 symlink"
XATTR_NAME_AD = b"cryptfs v1 xattr name"
XATTR_VALUE_AD = b"cryptfs v1 xattr value"
BOUND_SYMLINK_AD = b"cryptfs v2 symlink"
BOUND_XATTR_NAME_AD = b"cryptfs v2 xattr name"
BOUND_XATTR_VALUE_AD = b"cryptfs v2 xattr value"
SYMLINK_NONCE_LABEL = b"cryptfs v1 symlink nonce"  # HMAC input prefix (convergent)
OWNER_FILE = b"file"
OWNER_DIRECTORY = b"directory"


@dataclass(frozen=True, slots=True)
class XattrOwner:
    """What a bound attribute is sealed to: ``kind`` (file or directory)
    and its identity (a file ID or a directory IV; empty for a regular file
    that has no header yet and so can have no attributes)."""

    kind: bytes
    identity: bytes


@dataclass(frozen=True, slots=True)
class SymlinkPlace:
    """Where a bound symlink lives: its parent's IV and its backing entry name."""

    dir_iv: bytes
    entry: bytes


class MetadataCipher:
    """Seals and opens symlink targets and xattrs in either encoding.

    Version 1 ignores ``place`` and ``owner`` (an owner may be None there)."""

    def __init__(self, keys: KeyRing, bound: bool,
                 random: Callable[[int], bytes] = secrets.token_bytes,
                 convergent: bool = False) -> None:
        """``random`` supplies nonces (fixed only by scripts/metadata-example);
        ``convergent``: symlink nonces are derived (``symlink_nonce``)."""
        self._siv = AESSIV(keys.metadata_key)
        self.bound = bound
        self._random = random
        self._nonce_key = keys.symlink_nonce_key if convergent else None

    @classmethod
    def for_features(cls, keys: KeyRing, features: Collection[str]) -> MetadataCipher:
        return cls(keys, FEATURE_BOUND_METADATA in features,
                   convergent=FEATURE_CONVERGENT_DIRIVS in features)

    def _pad(self, data: bytes) -> bytes:
        return pad16(data) if self.bound else data

    def _unpad(self, data: bytes) -> bytes:
        if not self.bound:
            return data
        try:
            return unpad16(data)
        except ValueError as exc:
            raise NameDecodeError("bad padding inside an authenticated value") from exc

    # -- symlinks --

    def _target_ad(self, nonce: bytes, place: SymlinkPlace) -> list[bytes]:
        if self.bound:
            return [BOUND_SYMLINK_AD, place.dir_iv, place.entry, nonce]
        return [SYMLINK_AD, nonce]

    def encrypt_target(self, target: bytes, place: SymlinkPlace) -> bytes:
        if not target or b"\x00" in target:
            raise InvalidNameError("symlink target is empty or contains NUL")
        nonce = self._random(NONCE_LEN) if self._nonce_key is None else \
            symlink_nonce(self._nonce_key, target, place)
        sealed = self._siv.encrypt(self._pad(target), self._target_ad(nonce, place))
        stored = b64url(nonce + sealed).encode()
        if len(stored) >= PATH_MAX:
            raise NameTooLongError(f"symlink target of {len(target)} bytes is too long to encrypt")
        return stored

    def decrypt_target(self, stored: bytes, place: SymlinkPlace) -> bytes:
        try:
            raw = unb64url(stored.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise NameDecodeError("symlink target is not an encrypted target") from exc
        if len(raw) < NONCE_LEN + SIV_TAG_LEN + 1:
            raise NameDecodeError("encrypted symlink target is too short")
        nonce = raw[:NONCE_LEN]
        try:
            target = self._siv.decrypt(raw[NONCE_LEN:], self._target_ad(nonce, place))
        except InvalidTag as exc:
            raise NameDecodeError("symlink target does not decrypt (damaged, foreign, or "
                                  "moved from another entry)") from exc
        target = self._unpad(target)
        if not target or b"\x00" in target:
            raise NameDecodeError("symlink target decrypts to an invalid target")
        return target

    # -- extended attributes --

    def _name_ad(self, owner: XattrOwner | None) -> list[bytes]:
        if self.bound:
            assert owner is not None, "bound xattrs need their owner"
            return [BOUND_XATTR_NAME_AD, owner.kind, owner.identity]
        return [XATTR_NAME_AD]

    def _value_ad(self, stored_name: bytes, nonce: bytes,
                  owner: XattrOwner | None) -> list[bytes]:
        if self.bound:
            assert owner is not None, "bound xattrs need their owner"
            return [BOUND_XATTR_VALUE_AD, owner.kind, owner.identity, stored_name, nonce]
        return [XATTR_VALUE_AD, nonce, stored_name]

    def encrypt_xattr_name(self, name: bytes, owner: XattrOwner | None) -> bytes:
        if not name.startswith(XATTR_PREFIX) or len(name) == len(XATTR_PREFIX):
            raise InvalidNameError("only user.* extended attributes are supported")
        if b"\x00" in name:
            raise InvalidNameError("xattr name contains NUL")
        sealed = self._siv.encrypt(self._pad(name), self._name_ad(owner))
        stored = XATTR_PREFIX + b64url(sealed).encode()
        if len(stored) > XATTR_NAME_MAX:
            raise NameTooLongError(f"xattr name of {len(name)} bytes is too long to encrypt")
        return stored

    def decrypt_xattr_name(self, stored: bytes, owner: XattrOwner | None) -> bytes:
        if not stored.startswith(XATTR_PREFIX):
            raise NameDecodeError("xattr is not in the user namespace")
        try:
            sealed = unb64url(stored[len(XATTR_PREFIX):].decode("ascii"))
            name = self._siv.decrypt(sealed, self._name_ad(owner))
        except (UnicodeDecodeError, ValueError, InvalidTag) as exc:
            raise NameDecodeError("xattr name does not decrypt (foreign attribute, or "
                                  "copied from another entry)") from exc
        return self._unpad(name)

    def encrypt_xattr_value(self, stored_name: bytes, value: bytes,
                            owner: XattrOwner | None, nonce: bytes | None = None) -> bytes:
        """``nonce``: a derived one (reverse mode, ``keys/reverse.py``);
        None draws a random one."""
        padded = self._pad(value)
        if len(padded) + NONCE_LEN + SIV_TAG_LEN > XATTR_SIZE_MAX:
            raise XattrTooBigError(f"xattr value of {len(value)} bytes is too large to encrypt")
        if nonce is None:
            nonce = self._random(NONCE_LEN)
        elif len(nonce) != NONCE_LEN:
            raise ValueError(f"an xattr nonce is {NONCE_LEN} bytes")
        return nonce + self._siv.encrypt(padded, self._value_ad(stored_name, nonce, owner))

    def decrypt_xattr_value(self, stored_name: bytes, stored: bytes,
                            owner: XattrOwner | None) -> bytes:
        if len(stored) < NONCE_LEN + SIV_TAG_LEN:
            raise NameDecodeError("encrypted xattr value is too short")
        nonce = stored[:NONCE_LEN]
        try:
            value = self._siv.decrypt(stored[NONCE_LEN:],
                                      self._value_ad(stored_name, nonce, owner))
        except InvalidTag as exc:
            raise NameDecodeError("xattr value does not decrypt (damaged, or moved from "
                                  "another attribute or entry)") from exc
        return self._unpad(value)


def symlink_nonce(key: bytes, target: bytes, place: SymlinkPlace) -> bytes:
    """A convergent symlink's R: the first 16 bytes of HMAC-SHA256 under
    ``K_symlink`` of label, parent IV, entry name, a zero byte (no entry
    name holds one) and target (docs/format.md §6.1).  SIV stays safe with
    a repeated R: equal stored targets mean equal targets at equal places."""
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(SYMLINK_NONCE_LABEL + place.dir_iv + place.entry + b"\x00" + target)
    return mac.finalize()[:NONCE_LEN]
