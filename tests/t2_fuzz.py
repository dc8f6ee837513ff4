"""Fuzzing the parsers: every input, however broken, must end either in a
value or in one of cryptfs' own typed errors, never in anything else."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptfs.content import tags
from cryptfs.content.format import FLAG_AUTHENTICATED, FileHeader, plaintext_size
from cryptfs.errors import CryptfsError
from cryptfs.keyfile import KdfParams, KeyFile
from cryptfs.keys import KeyRing
from cryptfs.metadata import MetadataCipher
from cryptfs.names import NameCipher
from cryptfs.recovery import decode_recovery_code

KEYS = KeyRing(bytes(range(32)))
NAMES = NameCipher(KEYS)
META = MetadataCipher(KEYS)
KEYFILE = KeyFile.create(b"pw", KdfParams.argon2id(memory_kib=64, iterations=1, lanes=1))[0]
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
    with contextlib.suppress(CryptfsError):
        fn(*args)


@EXAMPLES
@given(st.one_of(st.binary(max_size=2000), mutated(VALID_KEYFILE)))
def test_key_file_parser(data):
    def parse_and_unlock(raw):
        KeyFile.from_bytes(raw).unlock(b"pw")
    defined(parse_and_unlock, data)


@EXAMPLES
@given(st.one_of(st.binary(max_size=64).map(lambda b: b.ljust(4096, b"\0")),
                 mutated(VALID_HEADER)))
def test_file_header_parser(data):
    defined(FileHeader.decode, data, KEYS.header_key)
    defined(FileHeader.decode, data, KEYS.header_key, FLAG_AUTHENTICATED)


@EXAMPLES
@given(st.integers(0, 1 << 64))
def test_backing_sizes(size):
    defined(plaintext_size, size)
    defined(tags.plaintext_size, size)


@EXAMPLES
@given(st.one_of(st.text(max_size=400), st.binary(max_size=300).map(
    lambda b: b.decode("latin-1"))))
def test_encrypted_names(text):
    defined(NAMES.decode, bytes(16), text)


@EXAMPLES
@given(st.one_of(st.binary(max_size=600), mutated(LONG.sidecar.encode())))
def test_long_name_sidecars(sidecar):
    defined(NAMES.decode_longname, bytes(16), LONG.name, sidecar)


@EXAMPLES
@given(st.one_of(st.binary(max_size=400), mutated(META.encrypt_target(b"some/target"))))
def test_symlink_targets(stored):
    defined(META.decrypt_target, stored)


@EXAMPLES
@given(st.binary(max_size=300), st.one_of(
    st.binary(max_size=300), mutated(META.encrypt_xattr_value(b"user.x", b"value"))))
def test_xattr_names_and_values(name, value):
    defined(META.decrypt_xattr_name, name)
    defined(META.decrypt_xattr_value, b"user.x", value)


@EXAMPLES
@given(st.text(max_size=100))
def test_recovery_codes(text):
    defined(decode_recovery_code, text)


def test_fuzzers_can_fail():
    """The harness itself: an unexpected exception type is not swallowed."""
    with pytest.raises(ZeroDivisionError):
        defined(lambda: 1 / 0)
