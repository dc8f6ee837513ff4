"""The worked example of reverse mode (docs/format.md §8.5,
scripts/reverse-example, tests/golden/reverse.json): reproduced by the
code, and derived again from the document alone (HKDF, HMAC-SHA256,
AES-SIV)."""

from __future__ import annotations

import base64
import hmac
import json
import runpy
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from tests.helpers.keys import reference_hkdf

ROOT = Path(__file__).resolve().parent.parent
REVERSE = json.loads((ROOT / "tests/golden/reverse.json").read_text())


def test_reverse_example_is_reproduced():
    example = runpy.run_path(str(ROOT / "scripts/reverse-example"))["example"]
    assert example() == REVERSE


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _unpad(data: bytes) -> bytes:
    return data[:-data[-1]]


def test_reverse_independent_derivation():
    ex = REVERSE
    master = bytes.fromhex(ex["master_key"])

    def hkdf(info: bytes, n: int) -> bytes:
        return reference_hkdf("sha512", master, b"", info, n)

    def mac(key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, "sha256").digest()[:16]

    names = AESSIV(hkdf(b"cryptfs v1 filename key", 64))
    meta = AESSIV(hkdf(b"cryptfs v1 metadata key", 64))
    k_diriv = hkdf(b"cryptfs v1 directory iv key", 32)

    def decode(parent: bytes, entry: str) -> str:
        return _unpad(names.decrypt(_unb64url(entry), [b"cryptfs v1 name", parent])).decode()

    root = hkdf(b"cryptfs v1 reverse root directory iv", 16)
    docs = mac(k_diriv, b"cryptfs v1 directory iv" + root + b"docs")
    year = mac(k_diriv, b"cryptfs v1 directory iv" + docs + b"2026")
    assert (root.hex(), docs.hex(), year.hex()) == (ex["root_iv"], ex["docs_iv"], ex["year_iv"])
    assert decode(root, ex["docs_entry"]) == "docs"
    assert decode(docs, ex["year_entry"]) == "2026"
    assert decode(docs, ex["file_entry"]) == "hello.txt"
    assert decode(year, ex["symlink_entry"]) == "link"

    file_id = mac(hkdf(b"cryptfs v1 reverse file id key", 32),
                  b"cryptfs v1 reverse file id" + docs + b"hello.txt")
    assert file_id.hex() == ex["file_id"]
    fixed = b"CRYPTFS\x00" + b"\x00\x01" + b"\x00\x00" + file_id
    header = fixed + hmac.new(hkdf(b"cryptfs v1 header mac key", 32), fixed, "sha256").digest()
    assert header.hex() == ex["file_header"]

    entry = ex["symlink_entry"].encode()
    raw = _unb64url(ex["stored_target"])
    nonce = mac(hkdf(b"cryptfs v1 symlink nonce key", 32),
                b"cryptfs v1 symlink nonce" + year + entry + b"\x00" + b"../hello.txt")
    assert raw[:16] == nonce
    assert _unpad(meta.decrypt(raw[16:], [b"cryptfs v2 symlink", year, entry, nonce])) \
        == b"../hello.txt"

    stored_name = ex["stored_xattr_name"].encode()
    sealed_name = _unb64url(ex["stored_xattr_name"][len("user."):])
    assert _unpad(meta.decrypt(sealed_name, [b"cryptfs v2 xattr name", b"file", file_id])) \
        == b"user.note"
    owner = b"file" + file_id
    value_nonce = mac(hkdf(b"cryptfs v1 reverse xattr nonce key", 32),
                      b"cryptfs v1 reverse xattr nonce" + len(owner).to_bytes(4, "big")
                      + owner + stored_name + b"\x00" + b"worked example")
    stored = bytes.fromhex(ex["stored_xattr_value"])
    assert stored[:16] == value_nonce and value_nonce.hex() == ex["xattr_nonce"]
    ad = [b"cryptfs v2 xattr value", b"file", file_id, stored_name, value_nonce]
    assert _unpad(meta.decrypt(stored[16:], ad)) == b"worked example"
