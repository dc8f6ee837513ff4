"""Format stability: both engines reproduce the committed worked example
byte for byte, and an independent decoder written from docs/format.md (only
``cryptography`` primitives, no cryptfs code) reads it back."""

from __future__ import annotations

import hmac
import json
import runpy
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from tests.helpers.keys import reference_hkdf

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((ROOT / "tests/golden/format-v1.json").read_text())


def test_engines_reproduce_the_golden_example(engine):
    example = runpy.run_path(str(ROOT / "scripts/format-example"))["example"]
    assert example(engine) == GOLDEN


def test_independent_decoder():
    master = bytes.fromhex(GOLDEN["master_key"])
    backing = bytes.fromhex(GOLDEN["backing"])
    # size from the backing size alone
    size = len(backing) - 4096 - 16
    # header: magic, version, flags, file ID, HMAC-SHA256 under the header key
    magic, version, flags, file_id = struct.unpack_from(">8sHH16s", backing)
    assert (magic, version, flags) == (b"CRYPTFS\x00", 1, 0)
    header_key = reference_hkdf("sha512", master, b"", b"cryptfs v1 header mac key", 32)
    assert hmac.compare_digest(hmac.new(header_key, backing[:28], "sha256").digest(),
                               backing[28:60])
    content_key = reference_hkdf("sha512", master, b"", b"cryptfs v1 content key\x00" + file_id, 64)
    plain = b""
    for page in range(-(-size // 4096)):
        start = 4096 + page * 4096
        count = min(4096, size - page * 4096)
        final = page == (size - 1) // 4096
        unit = backing[start:start + count + (16 if final else 0)]
        tweak = page.to_bytes(16, "little")
        dec = Cipher(algorithms.AES(content_key), modes.XTS(tweak)).decryptor()
        out = dec.update(unit) + dec.finalize()
        if final:
            assert out[count:] == bytes(16)  # the trailer
        plain += out[:count]
    assert plain.hex() == GOLDEN["plaintext"]
    # the name: base64url(AES-SIV(pad16(name), ["cryptfs v1 name", diriv]))
    import base64

    name_key = reference_hkdf("sha512", master, b"", b"cryptfs v1 filename key", 64)
    sealed = base64.urlsafe_b64decode(GOLDEN["backing_name"] + "==")
    padded = AESSIV(name_key).decrypt(sealed, [b"cryptfs v1 name", bytes.fromhex(GOLDEN["dir_iv"])])
    assert padded[:-padded[-1]].decode() == GOLDEN["name"]


METADATA = json.loads((ROOT / "tests/golden/metadata-bound.json").read_text())


def test_bound_metadata_example_is_reproduced():
    example = runpy.run_path(str(ROOT / "scripts/metadata-example"))["example"]
    assert example() == METADATA


def test_bound_metadata_independent_decoder():
    """Decode the bound metadata example from docs/format.md §6 alone."""
    import base64

    def unb64url(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    def unpad(data: bytes) -> bytes:
        assert 1 <= data[-1] <= 16 and data.endswith(bytes([data[-1]]) * data[-1])
        return data[:-data[-1]]

    ex = METADATA
    master = bytes.fromhex(ex["master_key"])
    siv = AESSIV(reference_hkdf("sha512", master, b"", b"cryptfs v1 metadata key", 64))
    dir_iv, file_id = bytes.fromhex(ex["dir_iv"]), bytes.fromhex(ex["file_id"])
    name_key = reference_hkdf("sha512", master, b"", b"cryptfs v1 filename key", 64)
    padded = AESSIV(name_key).decrypt(unb64url(ex["symlink_entry"]), [b"cryptfs v1 name", dir_iv])
    assert unpad(padded).decode() == ex["symlink_name"]
    # symlink: base64url(R || SIV(pad(T), ["cryptfs v2 symlink", D, E, R]))
    raw = unb64url(ex["stored_target"])
    nonce, sealed = raw[:16], raw[16:]
    assert nonce.hex() == ex["symlink_nonce"] and len(sealed) == 16 + 16  # 9 bytes pad to 16
    ad = [b"cryptfs v2 symlink", dir_iv, ex["symlink_entry"].encode(), nonce]
    assert unpad(siv.decrypt(sealed, ad)).decode() == ex["symlink_target"]
    # xattr name: "user." || base64url(SIV(pad(N), ["cryptfs v2 xattr name", "file", ID]))
    stored_name = ex["stored_xattr_name"]
    assert stored_name.startswith("user.")
    name = siv.decrypt(unb64url(stored_name[5:]), [b"cryptfs v2 xattr name", b"file", file_id])
    assert unpad(name).decode() == ex["xattr_name"]
    # xattr value: R || SIV(pad(V), ["cryptfs v2 xattr value", "file", ID, X, R])
    value = bytes.fromhex(ex["stored_xattr_value"])
    nonce = value[:16]
    ad = [b"cryptfs v2 xattr value", b"file", file_id, stored_name.encode(), nonce]
    assert unpad(siv.decrypt(value[16:], ad)).decode() == ex["xattr_value"]


CONVERGENT = json.loads((ROOT / "tests/golden/convergent.json").read_text())


def test_convergent_example_is_reproduced():
    example = runpy.run_path(str(ROOT / "scripts/convergent-example"))["example"]
    assert example() == CONVERGENT


def test_convergent_independent_derivation():
    """Derive the example's IVs and symlink nonce from docs/format.md §5.1
    and §6.1 alone (HKDF, HMAC-SHA256, AES-SIV), and decode its names."""
    import base64

    def unb64url(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    def unpad(data: bytes) -> bytes:
        return data[:-data[-1]]

    ex = CONVERGENT
    master = bytes.fromhex(ex["master_key"])
    k_diriv = reference_hkdf("sha512", master, b"", b"cryptfs v1 directory iv key", 32)
    k_nonce = reference_hkdf("sha512", master, b"", b"cryptfs v1 symlink nonce key", 32)
    names = AESSIV(reference_hkdf("sha512", master, b"", b"cryptfs v1 filename key", 64))
    meta = AESSIV(reference_hkdf("sha512", master, b"", b"cryptfs v1 metadata key", 64))

    def derive(parent: bytes, name: str) -> bytes:
        return hmac.new(k_diriv, b"cryptfs v1 directory iv" + parent + name.encode(),
                        "sha256").digest()[:16]

    def decode(parent: bytes, entry: str) -> str:
        return unpad(names.decrypt(unb64url(entry), [b"cryptfs v1 name", parent])).decode()

    root = bytes.fromhex(ex["root_iv"])
    docs = derive(root, ex["docs_name"])
    year = derive(docs, ex["year_name"])
    assert (docs.hex(), year.hex()) == (ex["docs_iv"], ex["year_iv"])
    assert decode(root, ex["docs_entry"]) == ex["docs_name"]
    assert decode(docs, ex["year_entry"]) == ex["year_name"]
    assert decode(docs, ex["file_entry"]) == ex["file_name"]
    assert decode(year, ex["symlink_entry"]) == ex["symlink_name"]
    entry = ex["symlink_entry"].encode()
    raw = unb64url(ex["stored_target"])
    nonce = hmac.new(k_nonce, b"cryptfs v1 symlink nonce" + year + entry + b"\x00"
                     + ex["symlink_target"].encode(), "sha256").digest()[:16]
    assert raw[:16] == nonce
    target = meta.decrypt(raw[16:], [b"cryptfs v2 symlink", year, entry, nonce])
    assert unpad(target).decode() == ex["symlink_target"]


AUTH = json.loads((ROOT / "tests/golden/format-v1-authenticated.json").read_text())


def test_engines_reproduce_the_authenticated_example(engine):
    example = runpy.run_path(str(ROOT / "scripts/format-example"))["authenticated_example"]
    assert example(engine) == AUTH


def test_independent_decoder_authenticated():
    """format.md §4.6 alone: sizes, offsets, every tag (holes included), and
    the plaintext; then a moved page is caught the same way."""
    master = bytes.fromhex(AUTH["master_key"])
    stored = AUTH["backing_size"]
    backing = bytearray(stored)
    for page, data in AUTH["backing_pages"].items():
        backing[int(page) * 4096:int(page) * 4096 + len(bytes.fromhex(data))] = bytes.fromhex(data)
    # size from the backing size alone
    d = stored - 4112
    p = (d - 1) // 4096
    assert (p + 4) % 257 != 256
    size = d - 4096 * ((p + 4) // 257)
    assert size == AUTH["size"]
    magic, version, flags, file_id = struct.unpack_from(">8sHH16s", backing)
    assert (magic, version, flags) == (b"CRYPTFS\x00", 1, 1) and backing[60:64] == bytes(4)
    header_key = reference_hkdf("sha512", master, b"", b"cryptfs v1 header mac key", 32)
    assert hmac.compare_digest(hmac.new(header_key, backing[:28], "sha256").digest(),
                               backing[28:60])
    content_key = reference_hkdf("sha512", master, b"", b"cryptfs v1 content key\x00" + file_id, 64)
    tag_key = reference_hkdf("sha512", master, b"", b"cryptfs v1 page tag key", 32)
    assert tag_key.hex() == AUTH["tag_key"]

    def t(i):
        return (i + 4) // 256

    def tag_at(i):
        return 4096 * (257 * t(i) - 4 if t(i) else 0) + 16 * ((i + 4) % 256)

    def tag(unit, i, final_size):
        msg = unit + file_id + struct.pack(">QQ", i, final_size)
        return hmac.new(tag_key, msg, "sha256").digest()[:16]

    final = (size - 1) // 4096
    plain = bytearray()
    for i in range(final + 1):
        at = 4096 * (1 + i + t(i))
        count = min(4096, size - 4096 * i)
        unit = bytes(backing[at:at + (count + 16 if i == final else 4096)])
        assert hmac.compare_digest(tag(unit, i, size if i == final else 0),
                                   bytes(backing[tag_at(i):tag_at(i) + 16])), i
        if unit == bytes(len(unit)):  # a tagged hole
            plain += bytes(count)
            continue
        dec = Cipher(algorithms.AES(content_key), modes.XTS(i.to_bytes(16, "little"))).decryptor()
        out = dec.update(unit) + dec.finalize()
        if i == final:
            assert out[count:] == bytes(16)
        plain += out[:count]
    expected = bytearray(size)
    for offset, data in AUTH["plaintext"].items():
        expected[int(offset):int(offset) + len(bytes.fromhex(data))] = bytes.fromhex(data)
    assert plain == expected
    # the slots after the final page's tag are zero
    assert backing[tag_at(final) + 16:tag_at(final) + 64] == bytes(48)
    # page 1's unit put in page 0's place fails page 0's tag
    assert tag(bytes(backing[8192:12288]), 0, 0) != bytes(backing[64:80])
