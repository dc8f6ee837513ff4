"""``cryptfs path`` on a reverse configuration (tools/pathmap.py
ReversePathMap): the map between a plaintext directory and the paths of
its reverse view.

The expected view is built here, independently of the map: every
directory and name of the plaintext tree, under the names and IVs the
derivations give (keys/reverse.py root IV, names/filenames derive_diriv),
written out as a names-only cipher directory (empty files, IV files,
sidecars, the key file).  A real forward mount of that directory must
show the plaintext tree, which proves the expected view is the cipher
directory a forward mount reads; then every plaintext entry must encrypt
to the view entry the mount shows it through (same inode), and every view
entry and sidecar decrypt back to its plaintext path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cryptfs.cli.paths import load_reverse_keyfile
from cryptfs.daemon.ctlsock import socket_path
from cryptfs.errors import ExitCode, PathNotFoundError
from cryptfs.keys.keyfile import KEYFILE_NAME, KeyFile
from cryptfs.keys.reverse import REVERSE_KEYFILE_NAME, ReverseDerivation
from cryptfs.names.filenames import (
    DIRIV_NAME,
    NameCipher,
    derive_diriv,
    is_longname,
    sidecar_name,
)
from cryptfs.tools.pathmap import ReversePathMap
from tests.conftest import PASSWORD, cryptfs_cmd, init_cipherdir, mounted, require_fuse
from tests.helpers.cli import FAST_KDF, cryptfs

# Names of every length class: short, at the block boundaries of the
# padded name, both sides of the long-name threshold, the longest.
LENGTHS = [1, 2, 15, 16, 17, 31, 32, 100, 143, 144, 159, 160, 161, 175, 176, 200, 254, 255]
DEPTH = 12


def build_plain(root: Path) -> list[bytes]:
    """A plaintext tree; returns every entry's path (bytes, leading /)."""
    root.mkdir()
    rb = os.fsencode(root)
    for n in LENGTHS:
        (root / ("f" * (n - 1) + "x")).write_bytes(b"x" * n)
    long_dir = root / ("D" * 200)
    long_dir.mkdir()
    for n in (1, 160, 255):
        (long_dir / ("g" * n)).write_bytes(b"")
        (long_dir / ("s" * (n - 1) + "d")).mkdir()
    deep = root.joinpath(*[f"level{i}" for i in range(DEPTH)])
    deep.mkdir(parents=True)
    (deep / ("deep" + "e" * 230)).write_bytes(b"deep")
    (root / "日本語 ünïcödé ☃").mkdir()
    os.mknod(os.path.join(rb, "日本語 ünïcödé ☃".encode(), b"raw \xff\xfe bytes"))
    (root / "link").symlink_to("level0")
    (root / "level0" / REVERSE_KEYFILE_NAME).write_bytes(b"shown: only the root's is hidden")
    found = []
    for dirpath, dirs, files in os.walk(rb):
        for name in dirs + files:
            found.append(b"/" + os.path.relpath(os.path.join(dirpath, name), rb))
    return sorted(p for p in found if p != b"/" + os.fsencode(REVERSE_KEYFILE_NAME))


def reverse_config(tmp_path: Path, plain: Path) -> KeyFile:
    """A reverse configuration: a normal key file as PLAINDIR/.cryptfs.reverse.conf."""
    init_cipherdir(tmp_path / "keysource", tmp_path / "password")
    shutil.copy(tmp_path / "keysource" / KEYFILE_NAME, plain / REVERSE_KEYFILE_NAME)
    (tmp_path / "password").chmod(0o600)
    return KeyFile.load(tmp_path / "keysource")


def expected_view(plain: Path, view: Path, keys) -> dict[bytes, str]:
    """Write the names of the view of ``plain`` to ``view``; returns each
    plaintext path's view path."""
    names = NameCipher(keys)
    reverse = ReverseDerivation(keys)
    view.mkdir()
    shutil.copy(plain / REVERSE_KEYFILE_NAME, view / KEYFILE_NAME)
    expected: dict[bytes, str] = {}

    def fill(pdir: bytes, vdir: Path, rel: str, iv: bytes, plain_rel: bytes) -> None:
        (vdir / DIRIV_NAME).write_bytes(iv)
        for name in sorted(os.listdir(pdir)):
            if not plain_rel and name == os.fsencode(REVERSE_KEYFILE_NAME):
                continue
            entry = names.to_backing(iv, name)
            child = os.path.join(pdir, name)
            expected[plain_rel + b"/" + name] = os.path.join(rel, entry.name)
            if entry.sidecar is not None:
                (vdir / sidecar_name(entry.name)).write_text(entry.sidecar)
            if os.path.isdir(child) and not os.path.islink(child):
                (vdir / entry.name).mkdir()
                fill(child, vdir / entry.name, os.path.join(rel, entry.name),
                     derive_diriv(keys.diriv_key, iv, name), plain_rel + b"/" + name)
            else:
                (vdir / entry.name).write_bytes(b"")

    fill(os.fsencode(plain), view, "", reverse.root_iv, b"")
    return expected


@pytest.fixture
def reverse_tree(tmp_path):
    plain = tmp_path / "plain"
    entries = build_plain(plain)
    keyfile = reverse_config(tmp_path, plain)
    keys = keyfile.unlock(PASSWORD.encode())
    expected = expected_view(plain, tmp_path / "view", keys)
    assert sorted(expected) == entries
    return plain, tmp_path / "view", keys, expected


def test_expected_view_is_a_cipher_directory_of_the_tree(reverse_tree):
    """The check of the check: a forward mount of the expected view's names
    lists exactly the plaintext tree."""
    plain, view, _keys, expected = reverse_tree
    with mounted(view, view.parent / "password") as shown:
        rb = os.fsencode(shown)
        listed = sorted(b"/" + os.path.relpath(os.path.join(d, n), rb)
                        for d, dirs, files in os.walk(rb) for n in dirs + files)
        assert listed == sorted(expected)
        for path, rel in expected.items():
            assert os.lstat(rb + path).st_ino == os.lstat(view / rel).st_ino


def test_every_entry_maps_both_ways(reverse_tree):
    plain, view, keys, expected = reverse_tree
    pathmap = ReversePathMap(str(plain), keys)
    sidecars = set()
    for path, rel in expected.items():
        steps = pathmap.encrypt(os.fsdecode(path))
        assert steps[-1].backing == rel, path
        assert steps[-1].plaintext == os.fsdecode(path)
        assert pathmap.decrypt(rel)[-1].plaintext == os.fsdecode(path)
        assert pathmap.decrypt("/" + rel)[-1].plaintext == os.fsdecode(path)  # view root
        for step in steps:
            assert (step.sidecar is not None) == is_longname(os.path.basename(step.backing))
            if step.sidecar is not None:
                assert (view / step.sidecar).is_file()
                assert pathmap.decrypt(step.sidecar)[-1].plaintext == step.plaintext
                sidecars.add(step.sidecar)
    assert sidecars == {os.path.relpath(p, view) for p in view.rglob("*.name")}
    assert len(sidecars) > 10
    # every entry of the view, sidecars included, is one of the map's
    for dirpath, dirs, files in os.walk(view):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(dirpath, name), view)
            if name in (DIRIV_NAME, KEYFILE_NAME):
                continue
            entry = rel[:-len(".name")] if name.endswith(".name") else rel
            assert pathmap.decrypt(rel)[-1].backing == entry


def test_missing_and_own_files(reverse_tree):
    plain, view, keys, expected = reverse_tree
    pathmap = ReversePathMap(str(plain), keys)
    with pytest.raises(PathNotFoundError, match="^/level0/nope: no such"):
        pathmap.encrypt("/level0/nope/deeper")
    with pytest.raises(PathNotFoundError, match="no such"):
        pathmap.encrypt(REVERSE_KEYFILE_NAME)  # the key file: never in the view
    assert pathmap.encrypt(f"/level0/{REVERSE_KEYFILE_NAME}")  # only the root's is hidden
    (plain / f"{REVERSE_KEYFILE_NAME}.tmp-1234").write_bytes(b"")  # init writing it
    with pytest.raises(PathNotFoundError, match="no such"):
        pathmap.encrypt(f"{REVERSE_KEYFILE_NAME}.tmp-1234")
    with pytest.raises(PathNotFoundError, match="a symlink"):
        pathmap.encrypt("/link/level1")
    for own in (KEYFILE_NAME, DIRIV_NAME):
        with pytest.raises(PathNotFoundError, match="cryptfs's own files"):
            pathmap.decrypt(own)
    level0 = expected[b"/level0"]
    (plain / "level0" / "level1").rename(plain / "level0" / "moved")
    with pytest.raises(PathNotFoundError, match="no such file"):
        pathmap.decrypt(expected[b"/level0/level1"])  # the view follows the tree
    long_file = expected[b"/" + b"D" * 200 + b"/" + b"g" * 255]
    os.unlink(plain / ("D" * 200) / ("g" * 255))
    with pytest.raises(PathNotFoundError, match="no such file"):
        pathmap.decrypt(long_file)
    with pytest.raises(PathNotFoundError, match="no such file"):
        pathmap.decrypt(f"{level0}/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    hidden = ReversePathMap(str(plain), keys, hidden=lambda p, st: p.startswith(b"level0/"))
    with pytest.raises(PathNotFoundError, match="no such"):
        hidden.encrypt("/level0/moved")
    assert hidden.encrypt("/level0")[-1].backing == level0


def test_command_line(reverse_tree, tmp_path):
    plain, view, keys, expected = reverse_tree
    pw = ("--passfile", str(tmp_path / "password"))
    deep = b"/" + b"/".join(b"level%d" % i for i in range(DEPTH)) + b"/deep" + b"e" * 230
    out = cryptfs("path", "encrypt", str(plain), os.fsdecode(deep), *pw).stdout.splitlines()
    assert out[0] == expected[deep] and len(out) == 2  # the entry, its sidecar
    raw = b"/" + "日本語 ünïcödé ☃".encode() + b"/raw \xff\xfe bytes"
    report = json.loads(cryptfs("path", "encrypt", str(plain), os.fsdecode(raw), "--json",
                                *pw).stdout)
    assert report["backing"] == expected[raw]
    proc = subprocess.run(cryptfs_cmd("path", "decrypt", str(plain), expected[raw], *pw),
                          capture_output=True, stdin=subprocess.DEVNULL, check=True)
    assert proc.stdout == raw + b"\n"
    # the key file elsewhere: --reverse --config
    config = tmp_path / "reverse.conf"
    (plain / REVERSE_KEYFILE_NAME).rename(config)
    proc = cryptfs("path", "decrypt", str(plain), expected[deep], *pw, check=False)
    assert proc.returncode == ExitCode.CIPHERDIR  # a plain directory, no key file
    out = cryptfs("path", "decrypt", str(plain), expected[deep], "--reverse", "--config",
                  str(config), *pw).stdout
    assert out == os.fsdecode(deep) + "\n"
    inside = plain / "level0" / "key.conf"  # --config inside the tree: hidden too
    config.rename(inside)
    proc = cryptfs("path", "encrypt", str(plain), "/level0/key.conf", "--reverse", "--config",
                   str(inside), *pw, check=False)
    assert proc.returncode == ExitCode.CIPHERDIR and "/level0/key.conf: no such" in proc.stderr
    out = cryptfs("path", "encrypt", str(plain), "/level0/level1", "--reverse", "--config",
                  str(inside), *pw).stdout
    assert out == expected[b"/level0/level1"] + "\n"
    inside.rename(config)
    proc = cryptfs("path", "decrypt", str(plain), expected[deep], "--config", str(config),
                   *pw, check=False)
    assert proc.returncode == ExitCode.USAGE and "--config" in proc.stderr \
        and "with --reverse" in proc.stderr
    proc = cryptfs("path", "decrypt", str(plain), expected[deep], "--reverse", *pw,
                   check=False)
    assert proc.returncode == ExitCode.CIPHERDIR and "init --reverse" in proc.stderr


def test_wrong_password(reverse_tree, tmp_path):
    plain = reverse_tree[0]
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    proc = cryptfs("path", "encrypt", str(plain), "level0", "--passfile", str(wrong),
                   check=False)
    assert proc.returncode == ExitCode.PASSWORD and not proc.stdout


def test_real_view_agrees(tmp_path):
    """Every entry of a real view of the tree, sidecars included, maps
    back, and every plaintext entry maps to an entry of it, offline and
    through the running view's control socket."""
    require_fuse()
    plain, view = tmp_path / "plain", tmp_path / "view"
    entries = build_plain(plain)
    passfile = tmp_path / "password"
    passfile.write_text(PASSWORD + "\n")
    passfile.chmod(0o600)
    cryptfs("init", "--reverse", str(plain), "--passfile", str(passfile), *FAST_KDF)
    keys = load_reverse_keyfile(plain / REVERSE_KEYFILE_NAME).unlock(PASSWORD.encode())
    pathmap = ReversePathMap(str(plain), keys)
    view.mkdir()
    cryptfs("mount", "--reverse", str(plain), str(view), "--passfile", str(passfile))
    try:
        for path in entries:
            steps = pathmap.encrypt(os.fsdecode(path))
            assert os.path.lexists(view / steps[-1].backing), path
            assert all((view / s.sidecar).is_file() for s in steps if s.sidecar), path
        mapped = 0
        for dirpath, dirs, files in os.walk(view):
            for name in dirs + files:
                rel = os.path.relpath(os.path.join(dirpath, name), view)
                if name in (DIRIV_NAME, KEYFILE_NAME):
                    continue
                step = pathmap.decrypt(rel)[-1]
                assert step.backing == (rel[:-len(".name")] if name.endswith(".name") else rel)
                assert os.fsencode(step.plaintext) in entries
                mapped += 1
        assert mapped == len(entries) + len(list(view.rglob("*.name")))
        assert socket_path(plain, os.geteuid()).exists()  # the view answers too
        deep = next(p for p in entries if p.count(b"/") > DEPTH)
        out = cryptfs("path", "encrypt", str(plain), os.fsdecode(deep), "--via-mount")
        assert out.stdout.splitlines()[0] == pathmap.encrypt(os.fsdecode(deep))[-1].backing
    finally:
        cryptfs("unmount", str(view))
