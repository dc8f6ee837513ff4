"""Encrypted symlink targets and extended attributes.

All use AES-256-SIV under the metadata key (separate from the filename key),
with a purpose label in the associated data so a value of one kind can never
be accepted as another:

* symlink target: random 16-byte nonce N; backing target is
  ``base64url(N || SIV(target, ["cryptfs v1 symlink", N]))``.
* xattr name: deterministic (getxattr must find it):
  ``"user." + base64url(SIV(name, ["cryptfs v1 xattr name"]))``.  Only the
  ``user.`` namespace is exposed; the plaintext name is encrypted whole.
* xattr value: ``N || SIV(value, ["cryptfs v1 xattr value", N, backing name])``,
  raw bytes, so a value cannot be moved to another attribute name unnoticed.
"""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from cryptfs.errors import (
    InvalidNameError,
    NameDecodeError,
    NameTooLongError,
    XattrTooBigError,
)
from cryptfs.keys import KeyRing
from cryptfs.names import b64url, unb64url

NONCE_LEN = 16
SIV_TAG_LEN = 16
PATH_MAX = 4096  # including the terminating NUL
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_PREFIX = b"user."
SYMLINK_AD = b"cryptfs v1 symlink"
XATTR_NAME_AD = b"cryptfs v1 xattr name"
XATTR_VALUE_AD = b"cryptfs v1 xattr value"


class MetadataCipher:
    def __init__(self, keys: KeyRing) -> None:
        self._siv = AESSIV(keys.metadata_key)

    # -- symlinks --

    def encrypt_target(self, target: bytes) -> bytes:
        if not target or b"\x00" in target:
            raise InvalidNameError("symlink target is empty or contains NUL")
        nonce = secrets.token_bytes(NONCE_LEN)
        sealed = b64url(nonce + self._siv.encrypt(target, [SYMLINK_AD, nonce])).encode()
        if len(sealed) >= PATH_MAX:
            raise NameTooLongError(f"symlink target of {len(target)} bytes is too long to encrypt")
        return sealed

    def decrypt_target(self, stored: bytes) -> bytes:
        try:
            raw = unb64url(stored.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise NameDecodeError("symlink target is not an encrypted target") from exc
        if len(raw) < NONCE_LEN + SIV_TAG_LEN + 1:
            raise NameDecodeError("encrypted symlink target is too short")
        nonce = raw[:NONCE_LEN]
        try:
            return self._siv.decrypt(raw[NONCE_LEN:], [SYMLINK_AD, nonce])
        except InvalidTag as exc:
            raise NameDecodeError("symlink target does not decrypt (damaged or foreign)") from exc

    # -- extended attributes --

    def encrypt_xattr_name(self, name: bytes) -> bytes:
        if not name.startswith(XATTR_PREFIX) or len(name) == len(XATTR_PREFIX):
            raise InvalidNameError("only user.* extended attributes are supported")
        if b"\x00" in name:
            raise InvalidNameError("xattr name contains NUL")
        stored = XATTR_PREFIX + b64url(self._siv.encrypt(name, [XATTR_NAME_AD])).encode()
        if len(stored) > XATTR_NAME_MAX:
            raise NameTooLongError(f"xattr name of {len(name)} bytes is too long to encrypt")
        return stored

    def decrypt_xattr_name(self, stored: bytes) -> bytes:
        if not stored.startswith(XATTR_PREFIX):
            raise NameDecodeError("xattr is not in the user namespace")
        try:
            sealed = unb64url(stored[len(XATTR_PREFIX):].decode("ascii"))
            return self._siv.decrypt(sealed, [XATTR_NAME_AD])
        except (UnicodeDecodeError, ValueError, InvalidTag) as exc:
            raise NameDecodeError("xattr name does not decrypt (foreign attribute)") from exc

    def encrypt_xattr_value(self, stored_name: bytes, value: bytes) -> bytes:
        if len(value) + NONCE_LEN + SIV_TAG_LEN > XATTR_SIZE_MAX:
            raise XattrTooBigError(f"xattr value of {len(value)} bytes is too large to encrypt")
        nonce = secrets.token_bytes(NONCE_LEN)
        return nonce + self._siv.encrypt(value, [XATTR_VALUE_AD, nonce, stored_name])

    def decrypt_xattr_value(self, stored_name: bytes, stored: bytes) -> bytes:
        if len(stored) < NONCE_LEN + SIV_TAG_LEN:
            raise NameDecodeError("encrypted xattr value is too short")
        nonce = stored[:NONCE_LEN]
        try:
            return self._siv.decrypt(stored[NONCE_LEN:], [XATTR_VALUE_AD, nonce, stored_name])
        except InvalidTag as exc:
            raise NameDecodeError("xattr value does not decrypt (damaged or moved)") from exc
