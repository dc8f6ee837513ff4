"""Cipher directories written by earlier cryptfs versions still open.

Each ``tests/golden/v<N>/`` is a committed cipher directory written by the
cryptfs of its day (``scripts/golden-fixture``).  Today's code must read every
name, content byte, symlink target and xattr of it, through the library and
through a real mount, on both engines, and fsck must find nothing: a change
to the key file, name, metadata or content encoding that would orphan
existing cipher directories fails here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from cryptfs.content.codec import ContentCodec
from cryptfs.content.format import plaintext_size
from cryptfs.content.sessions import SessionCache
from cryptfs.engines.base import XtsEngine
from cryptfs.errors import ExitCode
from cryptfs.fs.tree import read_xattr_owner
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.keyfile import FEATURE_CONVERGENT_DIRIVS, KEYFILE_NAME, KeyFile
from cryptfs.keys.recovery import decode_recovery_code
from cryptfs.names.filenames import (
    DIRIV_NAME,
    NameCipher,
    is_longname,
    is_reserved,
    read_diriv,
    sidecar_name,
)
from cryptfs.names.metadata import MetadataCipher, SymlinkPlace, XattrOwner
from tests.conftest import ENGINE_PARAMS, MOUNT_TIMEOUT, Mount, cryptfs_cmd, mount_engine_param

GOLDEN = Path(__file__).resolve().parent / "golden"
VERSIONS = sorted(p.name for p in GOLDEN.glob("v*") if p.is_dir())

Tree = dict[str, list]  # plaintext path -> ["dir"] | ["file", size, sha256] | ["symlink", target]
Xattrs = dict[str, dict[str, str]]  # plaintext path -> {name: value hex}


@dataclass(frozen=True)
class Golden:
    cipher: Path
    passfile: Path
    password: bytes
    recovery_code: str
    tree: Tree
    xattrs: Xattrs



def owner_of(directory: Path, entry: str, st: os.stat_result, codec: ContentCodec) -> XattrOwner:
    """What ``directory/entry``'s bound xattrs are sealed to."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return read_xattr_owner(fd, entry, st, codec)
    finally:
        os.close(fd)

@pytest.fixture(params=VERSIONS)
def golden(request, tmp_path) -> Golden:
    """A working copy of one golden directory, with the backing xattrs that
    git cannot store put back, and the key file at its usual mode."""
    source = GOLDEN / request.param
    cipher = tmp_path / "cipher"
    shutil.copytree(source / "cipher", cipher, symlinks=True)
    for rel, attrs in json.loads((source / "backing-xattrs.json").read_text()).items():
        for name, value in attrs.items():
            os.setxattr(cipher / rel, name, bytes.fromhex(value), follow_symlinks=False)
    (cipher / KEYFILE_NAME).chmod(0o600)
    password = (source / "password").read_text().splitlines()[0]
    passfile = tmp_path / "password"
    passfile.write_text(password + "\n")
    passfile.chmod(0o600)
    expected = json.loads((source / "expected.json").read_text())
    return Golden(cipher, passfile, password.encode(),
                  (source / "recovery-code").read_text().strip(),
                  expected["tree"], expected["xattrs"])


def file_entry(data: bytes) -> list:
    return ["file", len(data), hashlib.sha256(data).hexdigest()]


def library_tree(cipher: Path, keys: KeyRing, engine: XtsEngine) -> tuple[Tree, Xattrs]:
    """Decode the whole backing directory with the library alone (no mount)."""
    names = NameCipher(keys)
    meta = MetadataCipher.for_features(keys, KeyFile.load(cipher).features)
    sessions = SessionCache(engine, keys)
    codec = ContentCodec(keys, sessions)
    tree: Tree = {}
    xattrs: Xattrs = {}

    def walk(backing: Path, plain: str) -> None:
        fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY)
        try:
            dir_iv = read_diriv(fd)
        finally:
            os.close(fd)
        for entry in sorted(os.listdir(backing)):
            if is_reserved(entry) and not is_longname(entry):
                continue  # the key file, directory IVs, long-name sidecars
            path = backing / entry
            if is_longname(entry):
                sidecar = (backing / sidecar_name(entry)).read_bytes()
                name = names.decode_longname(dir_iv, entry, sidecar)
            else:
                name = names.decode(dir_iv, entry)
            child = f"{plain}/{os.fsdecode(name)}"
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                place = SymlinkPlace(dir_iv, os.fsencode(entry))
                target = meta.decrypt_target(os.fsencode(os.readlink(path)), place)
                tree[child] = ["symlink", os.fsdecode(target)]
                continue
            stored = [os.fsencode(a) for a in os.listxattr(path) if a.startswith("user.")]
            owner = owner_of(backing, entry, st, codec) if stored else None
            attrs = {os.fsdecode(meta.decrypt_xattr_name(a, owner)):
                     meta.decrypt_xattr_value(a, os.getxattr(path, a), owner).hex()
                     for a in stored}
            if attrs:
                xattrs[child] = attrs
            if stat.S_ISDIR(st.st_mode):
                tree[child] = ["dir"]
                walk(path, child)
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                tree[child] = file_entry(codec.open(fd).read(0, plaintext_size(st.st_size)))
            finally:
                os.close(fd)

    try:
        walk(cipher, "")
    finally:
        sessions.close()
    return tree, xattrs


def mounted_tree(root: Path) -> tuple[Tree, Xattrs]:
    """The same view, read through the mount with ordinary system calls."""
    tree: Tree = {}
    xattrs: Xattrs = {}
    for path in sorted(root.rglob("*")):
        plain = "/" + str(path.relative_to(root))
        if path.is_symlink():
            tree[plain] = ["symlink", os.readlink(path)]
            continue
        attrs = {a: os.getxattr(path, a).hex() for a in os.listxattr(path)}
        if attrs:
            xattrs[plain] = attrs
        tree[plain] = ["dir"] if path.is_dir() else file_entry(path.read_bytes())
    return tree, xattrs


def test_library_reads_every_byte(golden, engine):
    keys = KeyFile.load(golden.cipher).unlock(golden.password)
    recovered = KeyFile.load(golden.cipher).verify(decode_recovery_code(golden.recovery_code))
    assert recovered.master_key == keys.master_key
    tree, xattrs = library_tree(golden.cipher, keys, engine)
    assert tree == golden.tree
    assert xattrs == golden.xattrs


@pytest.fixture(params=ENGINE_PARAMS)
def mount_engine(request) -> str:
    return mount_engine_param(request)


@pytest.mark.fuse
def test_mount_reads_every_byte(golden, mount_engine, tmp_path):
    mount = Mount(golden.cipher, tmp_path / "plain", golden.passfile, mount_engine).start()
    try:
        tree, xattrs = mounted_tree(mount.mountpoint)
        assert tree == golden.tree
        assert xattrs == golden.xattrs
        (mount.mountpoint / "dir" / "new").write_bytes(b"written by today's cryptfs")
        assert (mount.mountpoint / "dir" / "new").read_bytes() == b"written by today's cryptfs"
    finally:
        mount.stop()
    mount.check_log()


def test_fsck_finds_nothing(golden):
    proc = subprocess.run(cryptfs_cmd("fsck", str(golden.cipher), "--passfile",
                                      str(golden.passfile), "--json"),
                          capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    assert proc.returncode == ExitCode.OK, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["problems"] == []


def test_convergent_ivs_are_the_derived_ones(golden):
    """In a ``convergent-dirivs`` directory every IV but the root's is the
    one derived from its parent's IV and its name (no directory in the
    fixtures was renamed): a change to the derivation would make machines
    of two cryptfs versions write different IVs for one path again."""
    keyfile = KeyFile.load(golden.cipher)
    if FEATURE_CONVERGENT_DIRIVS not in keyfile.features:
        pytest.skip("random directory IVs")
    keys = keyfile.unlock(golden.password)
    names = NameCipher.for_features(keys, keyfile.features)
    checked = 0
    for dirpath, dirnames, _ in os.walk(golden.cipher):
        parent_iv = (Path(dirpath) / DIRIV_NAME).read_bytes()
        for entry in dirnames:
            if is_longname(entry):
                name = names.decode_longname(
                    parent_iv, entry, (Path(dirpath) / sidecar_name(entry)).read_bytes())
            else:
                name = names.decode(parent_iv, entry)
            iv = (Path(dirpath) / entry / DIRIV_NAME).read_bytes()
            assert iv == names.derived_diriv(parent_iv, name), (dirpath, name)
            checked += 1
    assert checked >= 2
