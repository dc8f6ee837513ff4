"""``cryptfs path encrypt|decrypt`` (tools/pathmap.py) against a tree made
through a real mount: every entry's backing path is the entry the mount
shows (the mount passes backing inode numbers through), every backing entry
decrypts to the path that shows it, while the directory is mounted (the
command takes no lock) and without writing to it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cryptfs.daemon.lock import LOCK_NAME
from cryptfs.errors import ExitCode, PathNotFoundError
from cryptfs.keys.keyfile import KEYFILE_NAME, KeyFile
from cryptfs.names.conflicts import Tool
from cryptfs.names.filenames import DIRIV_NAME, NameCipher, is_longname
from cryptfs.names.resolve import is_sidecar
from cryptfs.tools.pathmap import PathMap
from tests.conftest import PASSWORD, Mount
from tests.helpers.cli import cryptfs
from tests.helpers.sync_tools import make_conflict

LONG_DIR = "D" * 170
LONG_FILE = "F" * 200 + ".txt"
GOLDEN_V1 = Path(__file__).resolve().parent / "golden" / "v1"


def build_tree(root: Path) -> None:
    """Short and long names, deep directories, symlinks, unicode names."""
    deep = root / "a" / "b" / "c" / "d" / "e" / "f"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_bytes(b"deep")
    (root / LONG_DIR / "inner").mkdir(parents=True)
    (root / LONG_DIR / LONG_FILE).write_bytes(b"long")
    (root / LONG_DIR / "inner" / "ünïcödé ☃.txt").write_bytes(b"u")
    (root / "日本語").mkdir()
    (root / "日本語" / "empty").write_bytes(b"")
    (root / "link").symlink_to("a/b")
    (root / LONG_DIR / ("S" * 180)).symlink_to("/nowhere")
    (root / "a" / "empty-dir").mkdir()


def plain_entries(root: Path) -> list[str]:
    """Every path under the mount, as ``/a/b`` (symlinks not followed)."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            found.append("/" + os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def backing_entries(cipher: Path) -> list[str]:
    """Every backing entry but cryptfs's own files, relative to ``cipher``."""
    found = []
    for dirpath, dirs, files in os.walk(cipher):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(dirpath, name), cipher)
            if name == DIRIV_NAME or is_sidecar(name) or rel in (KEYFILE_NAME, LOCK_NAME):
                continue
            found.append(rel)
    return sorted(found)


def path_map(mount: Mount) -> PathMap:
    keyfile = KeyFile.load(mount.cipherdir)
    keys = keyfile.unlock(PASSWORD.encode())
    return PathMap(str(mount.cipherdir), NameCipher.for_features(keys, keyfile.features))


def ino(path: Path) -> int:
    return os.lstat(path).st_ino


def snapshot(cipher: Path) -> dict[str, tuple[int, int]]:
    """Each backing entry's mtime and ctime: the command must change none."""
    seen = {}
    for dirpath, dirs, files in os.walk(cipher):
        for name in [".", *dirs, *files]:
            st = os.lstat(os.path.join(dirpath, name))
            seen[os.path.join(dirpath, name)] = (st.st_mtime_ns, st.st_ctime_ns)
    return seen


def test_every_entry_maps_both_ways(fresh_mount):
    plain, cipher = fresh_mount.mountpoint, fresh_mount.cipherdir
    build_tree(plain)
    before = snapshot(cipher)
    pathmap = path_map(fresh_mount)
    entries = plain_entries(plain)
    assert len(entries) == 16
    for path in entries:
        steps = pathmap.encrypt(path)
        backing = cipher / steps[-1].backing
        assert ino(backing) == ino(plain / path.lstrip("/")), path
        assert pathmap.encrypt(path.lstrip("/")) == steps  # a leading / or not
        for step in steps:
            long_name = len(os.fsencode(os.path.basename(step.plaintext))) > 160
            assert (step.sidecar is not None) == long_name, step
            if step.sidecar is not None:
                assert (cipher / step.sidecar).is_file()
                assert pathmap.decrypt(step.sidecar)[-1].plaintext == step.plaintext
    backing = backing_entries(cipher)
    assert len(backing) == len(entries)
    decrypted = []
    for rel in backing:
        path = pathmap.decrypt(rel)[-1].plaintext
        assert ino(plain / path.lstrip("/")) == ino(cipher / rel), rel
        assert pathmap.encrypt(path)[-1].backing == rel
        assert pathmap.decrypt(str(cipher / rel))[-1].plaintext == path  # absolute
        decrypted.append(path)
    assert sorted(decrypted) == entries
    assert snapshot(cipher) == before


def test_command_line(fresh_mount):
    plain, cipher = fresh_mount.mountpoint, fresh_mount.cipherdir
    build_tree(plain)
    pw = ("--passfile", str(fresh_mount.passfile))
    target = f"/{LONG_DIR}/{LONG_FILE}"
    lines = cryptfs("path", "encrypt", str(cipher), target, *pw).stdout.splitlines()
    backing, *sidecars = lines
    assert ino(cipher / backing) == ino(plain / LONG_DIR / LONG_FILE)
    assert len(sidecars) == 2 and all(is_sidecar(os.path.basename(s)) for s in sidecars)
    assert [os.path.dirname(s) for s in sidecars] == ["", os.path.dirname(backing)]
    assert all((cipher / s).is_file() for s in sidecars)
    report = json.loads(cryptfs("path", "encrypt", str(cipher), target, "--json", *pw).stdout)
    assert report["backing"] == backing and report["sidecars"] == sidecars
    assert [c["plaintext"] for c in report["components"]] == [f"/{LONG_DIR}", target]
    for arg in (backing, str(cipher / backing), sidecars[1]):
        assert cryptfs("path", "decrypt", str(cipher), arg, *pw).stdout == target + "\n"
    out = cryptfs("path", "decrypt", str(cipher), sidecars[0], "--json", *pw).stdout
    assert json.loads(out)["plaintext"] == f"/{LONG_DIR}"
    unicode = f"/{LONG_DIR}/inner/ünïcödé ☃.txt"
    backing = cryptfs("path", "encrypt", str(cipher), unicode, *pw).stdout.splitlines()[0]
    assert cryptfs("path", "decrypt", str(cipher), backing, *pw).stdout == unicode + "\n"


def test_missing_component_is_named(fresh_mount):
    plain, cipher = fresh_mount.mountpoint, fresh_mount.cipherdir
    build_tree(plain)
    pw = ("--passfile", str(fresh_mount.passfile))
    proc = cryptfs("path", "encrypt", str(cipher), "/a/b/nope/deeper/x", *pw, check=False)
    assert proc.returncode == ExitCode.CIPHERDIR
    assert "/a/b/nope:" in proc.stderr and "deeper" not in proc.stderr
    proc = cryptfs("path", "encrypt", str(cipher), "link/c", *pw, check=False)  # not followed
    assert proc.returncode == ExitCode.CIPHERDIR and "/link: a symlink" in proc.stderr
    a = os.path.basename(path_map(fresh_mount).encrypt("/a")[0].backing)
    proc = cryptfs("path", "decrypt", str(cipher), f"{a}/nope", *pw, check=False)
    assert proc.returncode == ExitCode.CIPHERDIR and f"{a}/nope: no such" in proc.stderr
    proc = cryptfs("path", "decrypt", str(cipher), "/elsewhere/x", *pw, check=False)
    assert proc.returncode == ExitCode.USAGE and "not inside" in proc.stderr
    proc = cryptfs("path", "decrypt", str(cipher), f"{a}/{DIRIV_NAME}", *pw, check=False)
    assert proc.returncode == ExitCode.CIPHERDIR and "cryptfs's own files" in proc.stderr


def test_wrong_password(fresh_mount, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    (fresh_mount.mountpoint / "x").write_bytes(b"")
    proc = cryptfs("path", "encrypt", str(fresh_mount.cipherdir), "x", "--passfile", str(wrong),
                   check=False)
    assert proc.returncode == ExitCode.PASSWORD and not proc.stdout


def test_conflict_copy_maps_to_the_name_the_mount_shows(fresh_mount):
    plain, cipher = fresh_mount.mountpoint, fresh_mount.cipherdir
    (plain / "d").mkdir()
    (plain / "d" / "notes.txt").write_bytes(b"winner")
    pathmap = path_map(fresh_mount)
    entry = cipher / pathmap.encrypt("/d/notes.txt")[-1].backing
    copy = entry.parent / os.fsdecode(make_conflict(Tool.SYNCTHING, os.fsencode(entry.name),
                                                    device=b"ABCDEFG"))
    shutil.copy2(entry, copy)
    (shown,) = [n for n in os.listdir(plain / "d") if n != "notes.txt"]
    path = pathmap.decrypt(str(copy.relative_to(cipher)))[-1].plaintext
    assert path == f"/d/{shown}"
    assert pathmap.encrypt(path)[-1].backing == str(copy.relative_to(cipher))
    assert ino(plain / "d" / shown) == ino(copy)


def test_names_stranded_under_a_diriv_copy(fresh_mount):
    """Entries of one directory made on two machines, merged by a sync tool
    that kept the second machine's IV file as a copy (as in t4_conflicts)."""
    plain, cipher = fresh_mount.mountpoint, fresh_mount.cipherdir
    for side in ("here", "there"):
        (plain / side / "sub").mkdir(parents=True)
        (plain / side / "same.txt").write_bytes(side.encode())
    (plain / "there" / LONG_FILE).write_bytes(b"long")
    (plain / "there" / "sub" / "deep.txt").write_bytes(b"deep")
    pathmap = path_map(fresh_mount)
    here, there = (cipher / pathmap.encrypt(f"/{side}")[0].backing for side in ("here", "there"))
    fresh_mount.stop()
    for name in os.listdir(there):
        if name == DIRIV_NAME:
            target = DIRIV_NAME.replace(".", ".sync-conflict-20261207-101500-ABCDEFG.")
        elif name in os.listdir(here):  # the subdirectory made on both: keep both
            target = name + ".sync-conflict-20261207-101500-ABCDEFG"
        else:
            target = name
        os.rename(there / name, here / target)
    there.rmdir()
    fresh_mount.start()
    shown = sorted(os.listdir(plain / "here"))
    assert len(shown) == 5 and LONG_FILE in shown  # sub, same.txt and a copy of each
    backing = [b for b in backing_entries(cipher) if b.startswith(here.name + "/")]
    (diriv_copy,) = [b for b in backing if b.endswith(".diriv")]  # no entry: not mapped
    with pytest.raises(PathNotFoundError, match="cryptfs's own files"):
        pathmap.decrypt(diriv_copy)
    backing.remove(diriv_copy)
    mapped = {pathmap.decrypt(b)[-1].plaintext: b for b in backing}
    assert sorted(mapped) == sorted(f"/here/{n}" for n in shown) + [
        f"/here/{n}/deep.txt" for n in shown if n.startswith("sub") and n != "sub"]
    for path, rel in mapped.items():
        assert ino(plain / path.lstrip("/")) == ino(cipher / rel), path
        assert pathmap.encrypt(path)[-1].backing == rel
    sidecar = pathmap.encrypt(f"/here/{LONG_FILE}")[-1].sidecar
    assert sidecar is not None and pathmap.decrypt(sidecar)[-1].plaintext == f"/here/{LONG_FILE}"


def test_name_too_long_is_a_usage_error(fresh_mount):
    proc = cryptfs("path", "encrypt", str(fresh_mount.cipherdir), "x" * 256, "--passfile",
                   str(fresh_mount.passfile), check=False)
    assert proc.returncode == ExitCode.USAGE and "255" in proc.stderr


def test_missing_convergent_diriv_is_derived_not_written(fresh_mount):
    plain, cipher = fresh_mount.mountpoint, fresh_mount.cipherdir
    build_tree(plain)
    pathmap = path_map(fresh_mount)
    b = cipher / pathmap.encrypt("/a/b")[-1].backing
    (b / DIRIV_NAME).unlink()
    steps = pathmap.encrypt("/a/b/c/d/e/f/deep.txt")
    assert ino(cipher / steps[-1].backing) == ino(plain / "a/b/c/d/e/f/deep.txt")
    assert pathmap.decrypt(steps[-1].backing)[-1].plaintext == "/a/b/c/d/e/f/deep.txt"
    assert not (b / DIRIV_NAME).exists()


def test_directory_without_convergent_ivs(tmp_path):
    """tests/golden/v1: made before convergent IVs (random IVs, no flags)."""
    cipher = tmp_path / "cipher"
    shutil.copytree(GOLDEN_V1 / "cipher", cipher, symlinks=True)
    passfile = tmp_path / "password"
    passfile.write_text((GOLDEN_V1 / "password").read_text())
    passfile.chmod(0o600)
    assert KeyFile.load(cipher).features == []
    tree = json.loads((GOLDEN_V1 / "expected.json").read_text())["tree"]
    backing = backing_entries(cipher)
    keyfile = KeyFile.load(cipher)
    names = NameCipher.for_features(keyfile.unlock((GOLDEN_V1 / "password").read_text()
                                                   .splitlines()[0].encode()), keyfile.features)
    pathmap = PathMap(str(cipher), names)
    decrypted = {pathmap.decrypt(b)[-1].plaintext: b for b in backing}
    assert sorted(decrypted) == sorted(tree)
    for path, rel in decrypted.items():
        assert pathmap.encrypt(path)[-1].backing == rel
    long_one = next(p for p in tree if len(os.path.basename(p)) > 160)
    out = cryptfs("path", "encrypt", str(cipher), long_one, "--passfile", str(passfile))
    entry = out.stdout.splitlines()[0]
    assert is_longname(os.path.basename(entry)) and entry == decrypted[long_one]

