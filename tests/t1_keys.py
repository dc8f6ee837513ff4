"""HKDF (RFC 5869 vectors) and the key hierarchy's labels."""

from __future__ import annotations

import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cryptfs.keys.hierarchy import (
    INFO_CONTENT,
    INFO_HEADER,
    INFO_KEYFILE_MAC,
    INFO_METADATA,
    INFO_NAMES,
    KeyRing,
    hkdf_sha512,
)
from tests.helpers.keys import reference_hkdf

RFC5869_SHA256 = [
    # (IKM, salt, info, L, OKM) - RFC 5869 appendix A, test cases 1 and 3.
    (bytes.fromhex("0b" * 22), bytes.fromhex("000102030405060708090a0b0c"),
     bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
     "34007208d5b887185865"),
    (bytes.fromhex("0b" * 22), b"", b"", 42,
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
     "9d201395faa4b61a96c8"),
]


def test_rfc5869_vectors_library_and_reference():
    for ikm, salt, info, length, okm in RFC5869_SHA256:
        lib = HKDF(hashes.SHA256(), length, salt or None, info).derive(ikm)
        assert lib.hex() == okm
        assert reference_hkdf("sha256", ikm, salt, info, length).hex() == okm


def test_hkdf_sha512_matches_reference():
    ikm = bytes(range(32))
    for info, length in [(b"", 64), (b"label", 32), (INFO_CONTENT + bytes(16), 64)]:
        assert hkdf_sha512(ikm, info, length) == reference_hkdf("sha512", ikm, b"", info, length)


def test_labels_are_distinct_and_subkeys_differ():
    labels = [INFO_CONTENT, INFO_HEADER, INFO_NAMES, INFO_METADATA, INFO_KEYFILE_MAC]
    assert len(set(labels)) == len(labels)
    ring = KeyRing(bytes(range(32)))
    subkeys = [ring.header_key, ring.name_key[:32], ring.metadata_key[:32],
               ring.keyfile_mac_key, ring.content_key(bytes(16))[:32]]
    assert len(set(subkeys)) == len(subkeys)
    assert ring.content_key(bytes(16)) != ring.content_key(b"\x01" + bytes(15))


def test_content_key_known_answer():
    """Pins the derivation: a change here silently breaks every cipher directory."""
    ring = KeyRing(bytes(range(32)))
    file_id = bytes(range(16))
    expected = reference_hkdf("sha512", bytes(range(32)), b"", INFO_CONTENT + file_id, 64)
    assert ring.content_key(file_id) == expected
    key = ring.content_key(file_id)
    assert key[:32] != key[32:]  # XTS key halves must differ
    for _ in range(20):  # the Extract-once shortcut is the full HKDF, for any ID
        master, file_id = secrets.token_bytes(32), secrets.token_bytes(16)
        assert KeyRing(master).content_key(file_id) == hkdf_sha512(
            master, INFO_CONTENT + file_id, 64)


def test_keyring_hides_keys_and_wipes():
    ring = KeyRing(b"\xaa" * 32)
    assert "aa" not in repr(ring).lower()
    ring.wipe()
    assert ring.master_key == bytes(32)


def test_recovery_code_round_trip_and_typos():
    import pytest

    from cryptfs.errors import RecoveryCodeError
    from cryptfs.keys.recovery import decode_recovery_code, encode_recovery_code

    key = bytes(range(32))
    code = encode_recovery_code(key)
    assert len(code) == 65 and code.count("-") == 10
    assert decode_recovery_code(code) == key
    assert decode_recovery_code(code.lower().replace("-", " ")) == key
    for i, ch in enumerate(code):
        if ch == "-":
            continue
        typo = code[:i] + ("A" if ch != "A" else "B") + code[i + 1:]
        with pytest.raises(RecoveryCodeError):
            decode_recovery_code(typo)
    with pytest.raises(RecoveryCodeError):
        decode_recovery_code("not a code")
