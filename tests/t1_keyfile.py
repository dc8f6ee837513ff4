"""The key file: round trip, and one distinct error per kind of bad input."""

from __future__ import annotations

import json
import os
import re
import stat
import unicodedata

import pytest

from cryptfs.errors import (
    ExitCode,
    KeyFileCorruptError,
    KeyFileMissingError,
    KeyFileTamperedError,
    UnsupportedFeatureError,
    UnsupportedKdfError,
    UnsupportedVersionError,
    WrongPasswordError,
)
from cryptfs.keys.keyfile import KEYFILE_NAME, KdfParams, KeyFile, canonical_json, write_atomic
from cryptfs.keys.password import from_file
from tests.helpers.keys import files_opening_with


def fast() -> KdfParams:
    return KdfParams.argon2id(memory_kib=1024, iterations=1, lanes=1)


def reseal(data: bytes, edit) -> bytes:
    """Apply ``edit`` to the JSON and recompute the plain checksum, as an
    attacker (or a careless tool) could; only the MAC and AEAD stop it."""
    import hashlib

    obj = json.loads(data)
    obj.pop("checksum")
    edit(obj)
    obj["checksum"] = hashlib.sha256(canonical_json(obj)).hexdigest()
    return json.dumps(obj).encode()


@pytest.fixture
def created(tmp_path):
    keyfile, keys = KeyFile.create(b"correct horse", fast())
    keyfile.save(tmp_path)
    return tmp_path, keys


def test_round_trip_and_permissions(created):
    cipherdir, keys = created
    path = cipherdir / KEYFILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in cipherdir.iterdir()] == [KEYFILE_NAME]  # no temp file left
    unlocked = KeyFile.load(cipherdir).unlock(b"correct horse")
    assert unlocked.master_key == keys.master_key
    assert keys.master_key.hex() not in path.read_text()


def test_mode_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        KeyFile.create(b"pw", fast())[0].save(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / KEYFILE_NAME).stat().st_mode) == 0o600


def test_wrong_password(created):
    with pytest.raises(WrongPasswordError) as info:
        KeyFile.load(created[0]).unlock(b"wrong")
    assert info.value.exit_code == ExitCode.PASSWORD


def test_missing(tmp_path):
    with pytest.raises(KeyFileMissingError, match="cryptfs init"):
        KeyFile.load(tmp_path)


@pytest.mark.parametrize("cut", [0, 1, 100, -50, -2])
def test_truncated(created, cut):
    path = created[0] / KEYFILE_NAME
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:len(data) + cut] if cut else b"")
    with pytest.raises(KeyFileCorruptError):
        KeyFile.load(created[0])


def test_bit_flip_is_corruption_not_wrong_password(created):
    path = created[0] / KEYFILE_NAME
    data = bytearray(path.read_bytes())
    pos = data.index(b'"wrapped_key": "') + 20
    data[pos] = ord("A") if data[pos] != ord("A") else ord("B")
    path.write_bytes(bytes(data))
    with pytest.raises(KeyFileCorruptError, match="checksum"):
        KeyFile.load(created[0])


def test_newer_version(created):
    path = created[0] / KEYFILE_NAME
    path.write_bytes(reseal(path.read_bytes(), lambda o: o.update(version=2)))
    with pytest.raises(UnsupportedVersionError, match="version 2"):
        KeyFile.load(created[0])


def test_unknown_kdf(created):
    path = created[0] / KEYFILE_NAME
    edit = lambda o: o["slots"][0]["kdf"].update(name="pbkdf2")  # noqa: E731
    path.write_bytes(reseal(path.read_bytes(), edit))
    with pytest.raises(UnsupportedKdfError, match="pbkdf2"):
        KeyFile.load(created[0])


def test_absurd_kdf_cost_refused(created):
    path = created[0] / KEYFILE_NAME
    edit = lambda o: o["slots"][0]["kdf"].update(memory_kib=1 << 40)  # noqa: E731
    path.write_bytes(reseal(path.read_bytes(), edit))
    with pytest.raises(UnsupportedKdfError, match="out of range"):
        KeyFile.load(created[0])


def test_unknown_feature_flag(created):
    path = created[0] / KEYFILE_NAME
    path.write_bytes(reseal(path.read_bytes(), lambda o: o.update(features=["hctr2"])))
    with pytest.raises(UnsupportedFeatureError, match="hctr2"):
        KeyFile.load(created[0])


@pytest.mark.parametrize(("where", "edit"), [
    ("the file", lambda o: o.update(comment="x")),
    ("a slot", lambda o: o["slots"][0].update(hint="x")),
    ("the argon2id parameters", lambda o: o["slots"][0]["kdf"].update(r=8)),
])
def test_unknown_fields_are_refused(created, where, edit):
    """Neither the MAC nor a slot's associated data covers a field this
    version does not know (the checksum does, but anyone can recompute
    it): refused rather than ignored, so that no later version can be fed
    one unauthenticated.  What cryptfs writes has no other fields."""
    path = created[0] / KEYFILE_NAME
    assert KeyFile.load(created[0]).unlock(b"correct horse")
    path.write_bytes(reseal(path.read_bytes(), edit))
    with pytest.raises(UnsupportedFeatureError, match=f"{where} has fields .*: (comment|hint|r) "):
        KeyFile.load(created[0])


def test_binary_fields_are_standard_base64_with_padding(created):
    """docs/format.md §2: salt, nonce, wrapped key and MAC are RFC 4648 §4
    base64 (``+`` and ``/``, ``=`` padding); other characters are refused."""
    path = created[0] / KEYFILE_NAME
    obj = json.loads(path.read_bytes())
    slot = obj["slots"][0]
    for text in (obj["mac"], slot["nonce"], slot["wrapped_key"], slot["kdf"]["salt"]):
        assert re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", text) and len(text) % 4 == 0
    assert obj["mac"].endswith("=")  # 32 bytes: padded
    data = path.read_bytes()
    for bad in ("-" + obj["mac"][1:], "_" + obj["mac"][1:], obj["mac"].rstrip("=")):
        path.write_bytes(reseal(data, lambda o, bad=bad: o.update(mac=bad)))
        with pytest.raises(KeyFileCorruptError, match="base64"):
            KeyFile.load(created[0])


def test_password_bytes_from_a_file(tmp_path):
    """docs/format.md §2.1: the first line without its trailing CR/LF bytes,
    spaces kept, no Unicode normalisation (an NFD password stays NFD)."""
    nfd = unicodedata.normalize("NFD", "café").encode()
    for text, password in ((b" pass word \r\n2nd line\n", b" pass word "),
                           (b"pw\r\r\n", b"pw"), (nfd + b"\n", nfd)):
        (tmp_path / "pw").write_bytes(text)
        (tmp_path / "pw").chmod(0o600)
        assert from_file(str(tmp_path / "pw")) == password
    assert nfd != unicodedata.normalize("NFC", "café").encode()


def test_new_key_files_require_bound_metadata(created, monkeypatch):
    """New directories carry the flag; a cryptfs that does not know it
    refuses them, and stripping it (a downgrade to the unbound version-1
    metadata encoding) breaks every slot."""
    cipherdir, _ = created
    path = cipherdir / KEYFILE_NAME
    assert json.loads(path.read_bytes())["features"] == ["bound-metadata", "convergent-dirivs"]
    monkeypatch.setattr("cryptfs.keys.keyfile.KNOWN_FEATURES", frozenset())
    with pytest.raises(UnsupportedFeatureError, match="bound-metadata, convergent-dirivs"):
        KeyFile.load(cipherdir)
    monkeypatch.undo()
    assert KeyFile.create(b"pw", fast(), features=())[0].features == []  # version-1 metadata
    path.write_bytes(reseal(path.read_bytes(), lambda o: o.update(features=[])))
    with pytest.raises(WrongPasswordError):
        KeyFile.load(cipherdir).unlock(b"correct horse")


def test_lowered_kdf_cost_breaks_the_slot(created):
    """Slot parameters are AEAD associated data: weakening them cannot unlock."""
    path = created[0] / KEYFILE_NAME
    edit = lambda o: o["slots"][0]["kdf"].update(memory_kib=512)  # noqa: E731
    path.write_bytes(reseal(path.read_bytes(), edit))
    with pytest.raises(WrongPasswordError):
        KeyFile.load(created[0]).unlock(b"correct horse")


def test_foreign_slot_is_tampering(created, tmp_path_factory):
    """A slot copied in from another key file (whose password the attacker
    knows) unwraps a different master key, which fails the file MAC."""
    other_dir = tmp_path_factory.mktemp("other")
    KeyFile.create(b"attacker", fast())[0].save(other_dir)
    foreign = json.loads((other_dir / KEYFILE_NAME).read_bytes())["slots"][0]
    path = created[0] / KEYFILE_NAME
    path.write_bytes(reseal(path.read_bytes(), lambda o: o.update(slots=[foreign])))
    with pytest.raises(KeyFileTamperedError):
        KeyFile.load(created[0]).unlock(b"attacker")


def test_removed_slot_is_tampering(created):
    cipherdir, keys = created
    keyfile = KeyFile.load(cipherdir)
    keyfile.add_password(keys, b"second", fast())
    keyfile.save(cipherdir)
    path = cipherdir / KEYFILE_NAME
    path.write_bytes(reseal(path.read_bytes(), lambda o: o["slots"].pop(0)))
    with pytest.raises(KeyFileTamperedError):
        KeyFile.load(cipherdir).unlock(b"second")


def test_several_slots_and_removal(created):
    cipherdir, keys = created
    keyfile = KeyFile.load(cipherdir)
    slot = keyfile.add_password(keys, b"second", KdfParams.scrypt(log2_n=10))
    keyfile.save(cipherdir)
    for pw in (b"correct horse", b"second"):
        assert KeyFile.load(cipherdir).unlock(pw).master_key == keys.master_key
    keyfile = KeyFile.load(cipherdir)
    keyfile.remove_slot(keys, 0)
    keyfile.save(cipherdir)
    with pytest.raises(WrongPasswordError):
        KeyFile.load(cipherdir).unlock(b"correct horse")
    assert KeyFile.load(cipherdir).unlock(b"second").master_key == keys.master_key
    with pytest.raises(ValueError, match="last"):
        keyfile.remove_slot(keys, slot.slot_id)


def test_master_key_verifies_directly(created):
    """The recovery path: the master key itself is checked by the file MAC."""
    cipherdir, keys = created
    assert KeyFile.load(cipherdir).verify(keys.master_key).master_key == keys.master_key
    with pytest.raises(KeyFileTamperedError):
        KeyFile.load(cipherdir).verify(bytes(32))


@pytest.mark.parametrize("junk", [b"\xff\xfe", b"[]", b'{"format": "gocryptfs"}', b"{" * 100000])
def test_garbage(tmp_path, junk):
    (tmp_path / KEYFILE_NAME).write_bytes(junk)
    with pytest.raises(KeyFileCorruptError):
        KeyFile.load(tmp_path)


def test_default_kdf_cost():
    """The default must stay expensive for an attacker (documented in README)."""
    params = KdfParams.argon2id()
    assert (params.name, params.memory_kib, params.iterations) == ("argon2id", 262144, 3)


@pytest.mark.parametrize("change", ["passwd", "remove"])
def test_no_key_file_left_opens_with_an_old_password(created, change):
    """Neither a backup of an older cryptfs nor the temporary file of an
    interrupted write survives a key change: no file in the cipher directory
    opens with the changed or removed password afterwards."""
    cipherdir, keys = created
    keyfile = KeyFile.load(cipherdir)
    keyfile.add_password(keys, b"second", fast())
    assert keyfile.save(cipherdir) == []
    old = (cipherdir / KEYFILE_NAME).read_bytes()
    (cipherdir / "cryptfs.conf.bak").write_bytes(old)  # as cryptfs before issue 12 left it
    write_atomic(cipherdir / "cryptfs.conf.tmp-0badf00d", old)  # a crash before the rename
    (cipherdir / "sub").mkdir()
    (cipherdir / "sub" / "unrelated").write_bytes(b"not a key file")
    assert len(files_opening_with(cipherdir, b"correct horse")) == 3
    keyfile = KeyFile.load(cipherdir)
    if change == "passwd":
        keyfile.change_password(keys, 0, b"new password", fast())
    else:
        keyfile.remove_slot(keys, 0)
    removed = keyfile.save(cipherdir)
    assert removed == ["cryptfs.conf.bak", "cryptfs.conf.tmp-0badf00d"]
    assert files_opening_with(cipherdir, b"correct horse") == []
    assert sorted(p.name for p in cipherdir.iterdir()) == [KEYFILE_NAME, "sub"]
    assert KeyFile.load(cipherdir).unlock(b"second").master_key == keys.master_key


def test_authenticated_flag_is_bound_to_the_slots(tmp_path, monkeypatch):
    """The mode is a feature flag in the authenticated parameters: it round
    trips, cannot be stripped or added by editing the file, and a cryptfs
    that does not know it refuses the directory instead of misreading it."""
    keyfile, _ = KeyFile.create(b"pw", fast(), features=("authenticated",))
    keyfile.save(tmp_path)
    loaded = KeyFile.load(tmp_path)
    assert loaded.authenticated and loaded.features == ["authenticated"]
    loaded.unlock(b"pw")
    assert not KeyFile.create(b"pw", fast())[0].authenticated
    path = tmp_path / KEYFILE_NAME
    original = path.read_bytes()
    path.write_bytes(reseal(original, lambda o: o.update(features=[])))  # a downgrade
    with pytest.raises(WrongPasswordError):
        KeyFile.load(tmp_path).unlock(b"pw")
    path.write_bytes(original)
    monkeypatch.setattr("cryptfs.keys.keyfile.KNOWN_FEATURES", frozenset())  # an older cryptfs
    with pytest.raises(UnsupportedFeatureError, match="authenticated"):
        KeyFile.load(tmp_path)
