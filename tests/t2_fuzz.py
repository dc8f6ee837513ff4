"""Fuzzing the parsers: every input, however broken, must end either in a
value or in one of cryptfs' own typed errors, never in anything else; and
where the format is authenticated, a mutated input that is accepted must
give exactly the original value."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptfs.content import tags
from cryptfs.content.format import FLAG_AUTHENTICATED, FileHeader, backing_size, plaintext_size
from cryptfs.errors import CryptfsError
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.keyfile import KdfParams, KeyFile
from cryptfs.keys.recovery import decode_recovery_code
from cryptfs.names.filenames import NameCipher
from cryptfs.names.metadata import OWNER_FILE, MetadataCipher, SymlinkPlace, XattrOwner

KEYS = KeyRing(bytes(range(32)))
NAMES = NameCipher(KEYS)
PLACE = SymlinkPlace(bytes(16), b"entry")
OWNER = XattrOwner(OWNER_FILE, bytes(16))
METAS = [MetadataCipher(KEYS, bound=False), MetadataCipher(KEYS, bound=True)]
KEYFILE, KEYFILE_KEYS = KeyFile.create(b"pw", KdfParams.argon2id(memory_kib=64, iterations=1,
                                                                   lanes=1))
VALID_KEYFILE = KEYFILE.to_bytes()
VALID_HEADER = FileHeader(bytes(16)).encode(KEYS.header_key)
LONG = NAMES.to_backing(bytes(16), b"x" * 255)
EXAMPLES = settings(max_examples=int(os.environ.get("CRYPTFS_FUZZ_EXAMPLES", "300")),
                    deadline=None)


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """Valid bytes with random flips, cuts and insertions."""
    def apply(edits):
        data = bytearray(valid)
        for kind, pos, value in edits:
            if not data:
                break
            pos %= len(data)
            if kind == 0:
                data[pos] ^= value or 1
            elif kind == 1:
                del data[pos:]
            else:
                data[pos:pos] = bytes([value])
        return bytes(data)
    edit = st.tuples(st.integers(0, 2), st.integers(0, 1 << 20), st.integers(0, 255))
    return st.lists(edit, min_size=1, max_size=4).map(apply)


def defined(fn, *args):
    """``fn(*args)``, or None for one of cryptfs' own errors."""
    with contextlib.suppress(CryptfsError):
        return fn(*args)
    return None


@EXAMPLES
@given(st.one_of(st.binary(max_size=2000), mutated(VALID_KEYFILE)))
def test_key_file_parser(data):
    def parse_and_unlock(raw):
        return KeyFile.from_bytes(raw).unlock(b"pw")
    keys = defined(parse_and_unlock, data)
    assert keys is None or keys.master_key == KEYFILE_KEYS.master_key


@EXAMPLES
@given(st.one_of(st.binary(max_size=64).map(lambda b: b.ljust(4096, b"\0")),
                 mutated(VALID_HEADER)))
def test_file_header_parser(data):
    header = defined(FileHeader.decode, data, KEYS.header_key)
    assert header is None or header == FileHeader(bytes(16))
    header = defined(FileHeader.decode, data, KEYS.header_key, FLAG_AUTHENTICATED)
    assert header is None or header == FileHeader(bytes(16))


@EXAMPLES
@given(st.integers(0, 1 << 64))
def test_backing_sizes(size):
    plain = defined(plaintext_size, size)
    # an empty file is stored with or without its header page
    assert plain is None or backing_size(plain) == size or (plain, size) == (0, 0)
    plain = defined(tags.plaintext_size, size)
    assert plain is None or tags.backing_size(plain) == size or (plain, size) == (0, 0)


@EXAMPLES
@given(st.one_of(st.text(max_size=400), st.binary(max_size=300).map(
    lambda b: b.decode("latin-1"))))
def test_encrypted_names(text):
    name = defined(NAMES.decode, bytes(16), text)
    assert name is None or NAMES.encode(bytes(16), name) == text


@EXAMPLES
@given(st.one_of(st.binary(max_size=600), mutated(LONG.sidecar.encode())))
def test_long_name_sidecars(sidecar):
    name = defined(NAMES.decode_longname, bytes(16), LONG.name, sidecar)
    assert name is None or name == b"x" * 255


@pytest.mark.parametrize("meta", METAS, ids=["v1", "bound"])
def test_symlink_targets(meta):
    @EXAMPLES
    @given(st.one_of(st.binary(max_size=400),
                     mutated(meta.encrypt_target(b"some/target", PLACE))))
    def check(stored):
        target = defined(meta.decrypt_target, stored, PLACE)
        assert target is None or target == b"some/target"

    check()


@pytest.mark.parametrize("meta", METAS, ids=["v1", "bound"])
def test_xattr_names_and_values(meta):
    @EXAMPLES
    @given(st.binary(max_size=300), st.one_of(
        st.binary(max_size=300), mutated(meta.encrypt_xattr_value(b"user.x", b"value", OWNER))))
    def check(name, value):
        plain_name = defined(meta.decrypt_xattr_name, name, OWNER)
        assert plain_name is None or meta.encrypt_xattr_name(plain_name, OWNER) == name
        plain_value = defined(meta.decrypt_xattr_value, b"user.x", value, OWNER)
        assert plain_value is None or plain_value == b"value"

    check()


@EXAMPLES
@given(st.text(max_size=100))
def test_recovery_codes(text):
    defined(decode_recovery_code, text)


def test_fuzzers_can_fail():
    """The harness itself: an unexpected exception type is not swallowed."""
    with pytest.raises(ZeroDivisionError):
        defined(lambda: 1 / 0)
