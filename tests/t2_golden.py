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

from tests.t1_keys import reference_hkdf

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
