"""Encrypted names, long names, directory IVs, symlink targets and xattrs."""

from __future__ import annotations

import contextlib
import os
import secrets

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given
from hypothesis import strategies as st

from cryptfs.errors import (
    InvalidNameError,
    NameDecodeError,
    NameTooLongError,
    XattrTooBigError,
)
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.names.filenames import (
    DIRIV_NAME,
    NAME_AD,
    NAME_MAX,
    NameCipher,
    b64url,
    create_diriv,
    is_longname,
    is_reserved,
    pad16,
    read_diriv,
    unb64url,
)
from cryptfs.names.metadata import (
    NONCE_LEN,
    OWNER_DIRECTORY,
    OWNER_FILE,
    SYMLINK_AD,
    MetadataCipher,
    SymlinkPlace,
    XattrOwner,
)

KEYS = KeyRing(bytes(range(32)))
NAMES = NameCipher(KEYS)
V1 = MetadataCipher(KEYS, bound=False)
BOUND = MetadataCipher(KEYS, bound=True)
IV = bytes(16)

names = st.binary(min_size=1, max_size=NAME_MAX).filter(
    lambda n: n not in (b".", b"..") and b"/" not in n and b"\x00" not in n
)


@given(name=names, dir_iv=st.binary(min_size=16, max_size=16))
def test_round_trip_any_valid_name(name, dir_iv):
    backing = NAMES.to_backing(dir_iv, name)
    assert len(backing.name) <= NAME_MAX
    assert not is_reserved(backing.name) or is_longname(backing.name)
    if backing.sidecar is None:
        assert NAMES.decode(dir_iv, backing.name) == name
    else:
        assert NAMES.decode_longname(dir_iv, backing.name, backing.sidecar.encode()) == name


def test_deterministic_per_directory_and_unlinkable_across():
    a, b = secrets.token_bytes(16), secrets.token_bytes(16)
    assert NAMES.to_backing(a, b"report.txt") == NAMES.to_backing(a, b"report.txt")
    assert NAMES.to_backing(a, b"report.txt") != NAMES.to_backing(b, b"report.txt")
    with pytest.raises(NameDecodeError, match="this directory"):
        NAMES.decode(b, NAMES.to_backing(a, b"report.txt").name)


def test_common_prefixes_do_not_leak():
    x = NAMES.to_backing(IV, b"holiday-2025-photo-0001.jpg").name
    y = NAMES.to_backing(IV, b"holiday-2025-photo-0002.jpg").name
    assert x[:4] != y[:4]


def test_length_padding_hides_exact_length():
    assert len(NAMES.to_backing(IV, b"a").name) == len(NAMES.to_backing(IV, b"a" * 15).name)


def test_padding_adds_1_to_16_bytes():
    """docs/format.md §5.2, §7: lengths 1..15 look alike, then 16..31 (a
    16-byte name is padded to 32 bytes), 32..47, ..."""
    sizes = {n: len(unb64url(NAMES.to_backing(IV, b"n" * n).name)) for n in range(1, 64)}
    assert all(sizes[n] == 16 * (n // 16 + 1) + 16 for n in sizes)  # + the 16-byte SIV
    assert sizes[15] < sizes[16] == sizes[31] < sizes[32]


def test_long_names_up_to_255_bytes():
    for length in (159, 160, 200, 255):
        backing = NAMES.to_backing(IV, b"n" * length)
        assert len(backing.name) <= NAME_MAX
        assert (backing.sidecar is None) == (length <= 159)
    long = NAMES.to_backing(IV, b"n" * 255)
    assert is_longname(long.name) and long.sidecar_name == long.name + ".name"
    with pytest.raises(NameDecodeError, match="hash"):
        NAMES.decode_longname(IV, long.name, long.sidecar.encode()[:-1] + b"A")


@pytest.mark.parametrize("bad", [b"", b".", b"..", b"a/b", b"a\x00b"])
def test_invalid_names(bad):
    with pytest.raises(InvalidNameError):
        NAMES.to_backing(IV, bad)


def test_too_long():
    with pytest.raises(NameTooLongError):
        NAMES.to_backing(IV, b"x" * 256)


@pytest.mark.parametrize("foreign", [
    "cryptfs.conf", "notes.txt", "AAAA", "x" * 43, "!!!!", "report (conflicted copy).txt",
    "A" * 255,
])
def test_foreign_backing_names_are_decode_errors(foreign):
    with pytest.raises(NameDecodeError):
        NAMES.decode(IV, foreign)


@given(st.text(max_size=300))
def test_decode_never_raises_anything_else(text):
    with contextlib.suppress(NameDecodeError):  # and what decodes is canonical
        assert NAMES.encode(IV, NAMES.decode(IV, text)) == text


def test_base64url_is_strict():
    for bad in ["ab=", "a", "ab+/", "abc$", "ab c"]:
        with pytest.raises(ValueError):
            unb64url(bad)


def test_diriv_files(tmp_path):
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(NameDecodeError):
            read_diriv(dir_fd)
        iv = create_diriv(dir_fd)
        assert read_diriv(dir_fd) == iv and len(iv) == 16
        (tmp_path / DIRIV_NAME).chmod(0o600)
        (tmp_path / DIRIV_NAME).write_bytes(b"short")
        with pytest.raises(NameDecodeError):
            read_diriv(dir_fd)
    finally:
        os.close(dir_fd)


PLACE = SymlinkPlace(IV, b"entry")
FILE = XattrOwner(OWNER_FILE, bytes(range(16)))


@pytest.mark.parametrize("meta", [V1, BOUND], ids=["v1", "bound"])
def test_symlink_targets(meta):
    target = b"../some/where/file"
    sealed = meta.encrypt_target(target, PLACE)
    assert sealed != meta.encrypt_target(target, PLACE)  # randomised
    assert b"some" not in sealed and meta.decrypt_target(sealed, PLACE) == target
    assert meta.decrypt_target(meta.encrypt_target(b"x" * 3000, PLACE), PLACE) == b"x" * 3000
    with pytest.raises(NameTooLongError):
        meta.encrypt_target(b"x" * 4000, PLACE)
    for bad in [b"/etc/passwd", b"", sealed[:-2], b"A" * 60]:
        with pytest.raises(NameDecodeError):
            meta.decrypt_target(bad, PLACE)


@pytest.mark.parametrize("meta", [V1, BOUND], ids=["v1", "bound"])
def test_xattrs(meta):
    name = meta.encrypt_xattr_name(b"user.comment", FILE)
    assert name.startswith(b"user.") and b"comment" not in name
    assert name == meta.encrypt_xattr_name(b"user.comment", FILE)  # deterministic
    assert meta.decrypt_xattr_name(name, FILE) == b"user.comment"
    value = meta.encrypt_xattr_value(name, b"hello", FILE)
    assert meta.decrypt_xattr_value(name, value, FILE) == b"hello"
    assert meta.decrypt_xattr_value(name, meta.encrypt_xattr_value(name, b"", FILE), FILE) == b""
    other = meta.encrypt_xattr_name(b"user.other", FILE)
    with pytest.raises(NameDecodeError, match="moved"):
        meta.decrypt_xattr_value(other, value, FILE)
    for bad in [b"security.selinux", b"user.", b"trusted.x"]:
        with pytest.raises(InvalidNameError):
            meta.encrypt_xattr_name(bad, FILE)
    for bad in [b"user.plain", b"security.x", b"user.!!"]:
        with pytest.raises(NameDecodeError):
            meta.decrypt_xattr_name(bad, FILE)
    with pytest.raises(NameTooLongError):
        meta.encrypt_xattr_name(b"user." + b"x" * 250, FILE)


def test_bound_symlink_targets_belong_to_their_entry():
    """A bound target opens only at the entry (directory IV and backing
    name) it was sealed for; version 1 opens anywhere."""
    sealed = BOUND.encrypt_target(b"t", PLACE)
    for elsewhere in (SymlinkPlace(IV, b"other"), SymlinkPlace(bytes([1] * 16), b"entry")):
        with pytest.raises(NameDecodeError, match="moved"):
            BOUND.decrypt_target(sealed, elsewhere)
        assert V1.decrypt_target(V1.encrypt_target(b"t", PLACE), elsewhere) == b"t"


def test_bound_xattrs_belong_to_their_owner():
    """Bound names differ between owners (no equal names across the tree)
    and neither a name nor a value opens on another owner, nor on a
    directory whose IV equals a file ID."""
    others = [XattrOwner(OWNER_FILE, bytes(16)), XattrOwner(OWNER_DIRECTORY, FILE.identity)]
    name = BOUND.encrypt_xattr_name(b"user.comment", FILE)
    value = BOUND.encrypt_xattr_value(name, b"hello", FILE)
    for other in others:
        assert BOUND.encrypt_xattr_name(b"user.comment", other) != name
        with pytest.raises(NameDecodeError, match="copied"):
            BOUND.decrypt_xattr_name(name, other)
        with pytest.raises(NameDecodeError, match="moved"):
            BOUND.decrypt_xattr_value(name, value, other)
    assert V1.encrypt_xattr_name(b"user.comment", others[0]) == \
        V1.encrypt_xattr_name(b"user.comment", FILE)  # the leak the bound encoding fixes


@pytest.mark.parametrize(("meta", "target", "name", "value"),
                         [(V1, 3039, 171, 65504), (BOUND, 3023, 159, 65503)], ids=["v1", "bound"])
def test_documented_limits(meta, target, name, value):
    """The largest target, xattr name and value each encoding stores
    (docs/format.md §6); one byte more is refused."""
    meta.encrypt_target(b"t" * target, PLACE)
    stored = meta.encrypt_xattr_name(b"user." + b"n" * (name - 5), FILE)
    meta.encrypt_xattr_value(stored, b"v" * value, FILE)
    with pytest.raises(NameTooLongError):
        meta.encrypt_target(b"t" * (target + 1), PLACE)
    with pytest.raises(NameTooLongError):
        meta.encrypt_xattr_name(b"user." + b"n" * (name - 4), FILE)
    with pytest.raises(XattrTooBigError):
        meta.encrypt_xattr_value(stored, b"v" * (value + 1), FILE)


def test_bound_encoding_pads_to_16_bytes():
    """Lengths show only rounded up: targets, names and values of 1 and 15
    bytes store alike, 16 bytes take the next step."""
    def lengths(meta, n):
        target = len(unb64url(meta.encrypt_target(b"t" * n, PLACE).decode()))
        name = meta.encrypt_xattr_name(b"user." + b"n" * n, FILE)
        return target, len(name), len(meta.encrypt_xattr_value(name, b"v" * n, FILE))

    assert lengths(BOUND, 1) == lengths(BOUND, 10) == (48, 48, 48)
    assert lengths(BOUND, 16) == (64, 69, 64)  # "user." + 16 bytes pads to 32: 48 raw
    assert lengths(V1, 1) != lengths(V1, 10)


def test_name_key_separation():
    """Names and metadata use different keys: a value sealed in one format
    under the other key (same plaintext, same associated data, so only the
    key differs) is refused, while the same construction under the right key
    is accepted."""
    assert KEYS.name_key != KEYS.metadata_key

    def as_name(key: bytes, name: bytes) -> str:
        return b64url(AESSIV(key).encrypt(pad16(name), [NAME_AD, IV]))

    def as_target(key: bytes, target: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_LEN)
        return b64url(nonce + AESSIV(key).encrypt(target, [SYMLINK_AD, nonce])).encode()

    assert NAMES.decode(IV, as_name(KEYS.name_key, b"file")) == b"file"
    with pytest.raises(NameDecodeError):
        NAMES.decode(IV, as_name(KEYS.metadata_key, b"file"))
    assert V1.decrypt_target(as_target(KEYS.metadata_key, b"file"), PLACE) == b"file"
    with pytest.raises(NameDecodeError):
        V1.decrypt_target(as_target(KEYS.name_key, b"file"), PLACE)


def test_name_caches_agree_with_the_cipher():
    """Encrypting a name also records its decryption; a fresh cipher (empty
    caches) decodes every cached result to the same name, and a damaged
    name is still refused after its neighbours were cached."""
    cached, fresh = NameCipher(KEYS), NameCipher(KEYS)
    names = [b"a", b"x" * 159, b"y" * 200, "ünïcode".encode()]
    for name in names:
        entry = cached.to_backing(IV, name)
        encoded = entry.sidecar if entry.sidecar is not None else entry.name
        assert cached.to_backing(IV, name) is entry  # served from the cache
        assert cached.decode(IV, encoded) == name == fresh.decode(IV, encoded)
        assert fresh.to_backing(IV, name) == entry
        damaged = encoded[:-2] + ("A" if encoded[-2] != "A" else "B") + encoded[-1]
        with pytest.raises(NameDecodeError):
            cached.decode(IV, damaged)
    other_iv = secrets.token_bytes(16)
    entry = cached.to_backing(IV, b"moved")
    with pytest.raises(NameDecodeError):  # same name, another directory: no cache hit
        cached.decode(other_iv, entry.name)


# --- convergent directory IVs and symlink nonces (docs/format.md §5.1, §6.1) ---

CONVERGENT = NameCipher(KEYS, convergent=True)


def _independent_subkey(info: bytes) -> bytes:
    """HKDF-SHA512 of the master key (empty salt), computed here from
    ``cryptography`` alone, as format.md §3 specifies."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(algorithm=hashes.SHA512(), length=32, salt=None, info=info).derive(
        bytes(range(32)))


def test_convergent_diriv_known_answer():
    """The derivation recomputed with plain ``hmac`` against fixed bytes
    (the worked example of format.md §5.1)."""
    import hashlib
    import hmac
    k_diriv = _independent_subkey(b"cryptfs v1 directory iv key")
    parent = bytes(16)
    expected = hmac.new(k_diriv, b"cryptfs v1 directory iv" + parent + b"docs",
                        hashlib.sha256).digest()[:16]
    assert CONVERGENT.new_diriv(parent, b"docs") == expected
    assert CONVERGENT.derived_diriv(parent, b"docs") == expected
    assert expected.hex() == "50cf040b1b3d7b7047ec16d0a3e0ea5b"
    child = CONVERGENT.new_diriv(expected, b"2026")
    assert child == hmac.new(k_diriv, b"cryptfs v1 directory iv" + expected + b"2026",
                             hashlib.sha256).digest()[:16]


def test_convergent_ivs_depend_on_parent_and_name_only():
    a, b = os.urandom(16), os.urandom(16)
    assert CONVERGENT.new_diriv(a, b"x") == CONVERGENT.new_diriv(a, b"x")
    assert CONVERGENT.new_diriv(a, b"x") != CONVERGENT.new_diriv(b, b"x")
    assert CONVERGENT.new_diriv(a, b"x") != CONVERGENT.new_diriv(a, b"y")
    other = NameCipher(KeyRing(bytes(range(1, 33))), convergent=True)
    assert other.new_diriv(a, b"x") != CONVERGENT.new_diriv(a, b"x")  # keyed
    with pytest.raises(InvalidNameError):
        CONVERGENT.new_diriv(a, b"a/b")


def test_random_ivs_without_the_flag():
    assert not NAMES.convergent and NAMES.derived_diriv(IV, b"x") is None
    assert NAMES.new_diriv(IV, b"x") != NAMES.new_diriv(IV, b"x")


def test_convergent_symlink_nonce_known_answer():
    """Same symlink at the same place: byte-identical; it still opens with
    the ordinary reader; its R is the documented HMAC."""
    import hashlib
    import hmac
    meta = MetadataCipher(KEYS, bound=True, convergent=True)
    entry = NAMES.to_backing(IV, b"link").name.encode()
    place = SymlinkPlace(IV, entry)
    stored = meta.encrypt_target(b"hello.txt", place)
    assert stored == meta.encrypt_target(b"hello.txt", place)
    assert BOUND.decrypt_target(stored, place) == b"hello.txt"
    key = _independent_subkey(b"cryptfs v1 symlink nonce key")
    nonce = hmac.new(key, b"cryptfs v1 symlink nonce" + IV + entry + b"\x00" + b"hello.txt",
                     hashlib.sha256).digest()[:16]
    assert unb64url(stored.decode())[:NONCE_LEN] == nonce
    other = SymlinkPlace(IV, NAMES.to_backing(IV, b"link2").name.encode())
    assert meta.encrypt_target(b"hello.txt", other) != stored
    assert meta.encrypt_target(b"hello.txt2", place) != stored
