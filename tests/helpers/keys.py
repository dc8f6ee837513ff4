"""Key checks shared by the key and CLI tests: an independent HKDF, and which
key slots a password opens."""

from __future__ import annotations

import hashlib
import hmac

from cryptfs.errors import (
    CryptfsError,
)
from cryptfs.keys.keyfile import KeyFile


def reference_hkdf(hash_name: str, ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with the standard library, as an independent check."""
    digest_size = hashlib.new(hash_name).digest_size
    prk = hmac.new(salt or bytes(digest_size), ikm, hash_name).digest()
    okm, block = b"", b""
    for counter in range(1, -(-length // digest_size) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hash_name).digest()
        okm += block
    return okm[:length]


def files_opening_with(cipherdir, password: bytes) -> list:
    """Every file anywhere under ``cipherdir`` that unlocks as a key file
    with ``password``, whatever its name."""
    found = []
    for path in sorted(cipherdir.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            KeyFile.from_bytes(path.read_bytes()).unlock(password)
        except CryptfsError:
            continue
        found.append(path)
    return found
