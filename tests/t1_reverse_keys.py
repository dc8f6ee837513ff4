"""Reverse mode's derivations (keys/reverse.py): known answers from an
independent HKDF and HMAC, and the properties the format relies on."""

from __future__ import annotations

import hmac

import pytest

from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.reverse import (
    INFO_REVERSE_FILE_ID,
    INFO_REVERSE_ROOT_IV,
    INFO_REVERSE_XATTR_NONCE,
    ReverseDerivation,
)
from tests.helpers.keys import reference_hkdf

MASTER = bytes(range(32))
IV = bytes(range(16, 32))

# Pinned outputs: a change here silently changes every reverse view, so every
# backup made from one would be transferred again in full.
ROOT_IV = "04ef249f9c55631c4a35a139eb1d0b7f"
FILE_ID = "fdb5d881e52d6c472f3ba102301232d1"
NONCE = "9446886b7b39b3e21d0710e5b43553d8"


def _reference(label_key: bytes, msg: bytes) -> bytes:
    key = reference_hkdf("sha512", MASTER, b"", label_key, 32)
    return hmac.new(key, msg, "sha256").digest()[:16]


def test_known_answers_match_an_independent_derivation():
    rev = ReverseDerivation(KeyRing(MASTER))
    assert rev.root_iv == reference_hkdf("sha512", MASTER, b"", INFO_REVERSE_ROOT_IV, 16)
    assert rev.file_id(IV, b"notes.txt") == _reference(
        INFO_REVERSE_FILE_ID, b"cryptfs v1 reverse file id" + IV + b"notes.txt")
    owner = b"file" + bytes(16)
    assert rev.xattr_nonce(owner, b"user.x", b"v") == _reference(
        INFO_REVERSE_XATTR_NONCE, b"cryptfs v1 reverse xattr nonce"
        + len(owner).to_bytes(4, "big") + owner + b"user.x\x00v")
    assert rev.root_iv.hex() == ROOT_IV
    assert rev.file_id(IV, b"notes.txt").hex() == FILE_ID
    assert rev.xattr_nonce(owner, b"user.x", b"v").hex() == NONCE


def test_one_id_per_place():
    rev = ReverseDerivation(KeyRing(MASTER))
    ids = {rev.file_id(iv, name) for iv in (IV, bytes(16)) for name in (b"a", b"b", b"ab")}
    assert len(ids) == 6
    assert ReverseDerivation(KeyRing(bytes(32))).file_id(IV, b"a") != rev.file_id(IV, b"a")
    # the owner's length prefix keeps (owner, name) splits apart
    assert rev.xattr_nonce(b"ab", b"c", b"") != rev.xattr_nonce(b"a", b"bc", b"")


@pytest.mark.parametrize("bad", [b"", b"a/b", b"a\x00"])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError):
        ReverseDerivation(KeyRing(MASTER)).file_id(IV, bad)
    with pytest.raises(ValueError):
        ReverseDerivation(KeyRing(MASTER)).file_id(IV[:8], b"a")
