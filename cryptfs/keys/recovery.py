"""Recovery codes: the master key, written for humans.

``init`` prints it once.  It is the master key (32 bytes) plus a 2-byte
SHA-256 check, in RFC 4648 base32 (no padding), in dash-separated groups of
five: 55 characters, easy to copy and hard to mistype unnoticed.  It unlocks
the cipher directory even if every password is lost (``mount --recovery``);
anyone holding it can read everything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptfs.errors import RecoveryCodeError
from cryptfs.keys.hierarchy import MASTER_KEY_LEN


def encode_recovery_code(master_key: bytes) -> str:
    raw = master_key + hashlib.sha256(master_key).digest()[:2]
    text = base64.b32encode(raw).decode().rstrip("=")
    return "-".join(text[i:i + 5] for i in range(0, len(text), 5))


def decode_recovery_code(code: str) -> bytes:
    text = "".join(code.split()).replace("-", "").upper()
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError) as exc:
        raise RecoveryCodeError("this is not a cryptfs recovery code") from exc
    key, check = raw[:MASTER_KEY_LEN], raw[MASTER_KEY_LEN:]
    canonical = base64.b32encode(raw).decode().rstrip("=") == text  # unused low bits are 0
    if (len(raw) != MASTER_KEY_LEN + 2 or not canonical
            or hashlib.sha256(key).digest()[:2] != check):
        raise RecoveryCodeError("the recovery code is mistyped (its check digits do not match)")
    return key
