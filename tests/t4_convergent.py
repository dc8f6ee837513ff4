"""Convergent directory IVs (key file feature ``convergent-dirivs``,
docs/format.md §5.1) on real mounts: two copies of one cipher directory,
each mounted on its own, that make the same paths write byte-identical
``cryptfs.diriv`` files, long-name sidecars and symlinks, so what one side
writes decodes on the other; a directory a sync tool recreated without its
IV (renamed on one machine while the other added a file under the old name,
the changes carried across here by hand with real file moves) is derived
again, shown and healed; one renamed before its IV was lost stays hidden
and is reported.  Directories without the flag keep random IVs."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cryptfs.keys.keyfile import FEATURE_BOUND_METADATA, FEATURE_CONVERGENT_DIRIVS, KeyFile
from cryptfs.names.filenames import DIRIV_NAME, SIDECAR_SUFFIX
from tests.conftest import PASSWORD, Mount, cryptfs_cmd, fsck_problems, init_cipherdir, mounted

pytestmark = pytest.mark.fuse
ENGINE = "openssl"
HEALED = "had no cryptfs.diriv"  # the mount's log line when it writes a derived IV back
UNDERIVABLE = "cannot be derived"
LONG = "L" * 200  # a long name: stored as cryptfs.longname.* with a sidecar


def two_copies(tmp_path: Path, features: list[str] | None = None) -> tuple[Path, Path, Path]:
    """One cipher directory (``features``: its key file's flags, None: what
    init writes) and a ``cp -a`` copy of it: same keys, same root IV."""
    a, b, passfile = tmp_path / "A", tmp_path / "B", tmp_path / "password"
    init_cipherdir(a, passfile)
    if features is not None:
        keyfile = KeyFile.load(a)
        keys = keyfile.unlock(PASSWORD.encode())
        keyfile.features = features
        keyfile.change_password(keys, keyfile.slots[0].slot_id, PASSWORD.encode())
        keyfile.save(a)
        keys.wipe()
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    return a, b, passfile



def backing_files(cipher: Path) -> dict[str, bytes]:
    """Every regular file and symlink below ``cipher`` by relative path:
    contents, or ``b"-> " + target``."""
    found = {}
    for path in cipher.rglob("*"):
        rel = str(path.relative_to(cipher))
        if path.is_symlink():
            found[rel] = b"-> " + os.fsencode(os.readlink(path))
        elif path.is_file():
            found[rel] = path.read_bytes()
    return found


def ivs(cipher: Path) -> dict[str, bytes]:
    return {k: v for k, v in backing_files(cipher).items() if k.endswith(DIRIV_NAME)}


def derived_iv(cipher: Path, parent: Path, name: bytes) -> bytes:
    """What format.md §5.1 says directory ``name`` in backing directory
    ``parent`` gets: computed here with plain ``hmac``."""
    keys = KeyFile.load(cipher).unlock(PASSWORD.encode())
    try:
        key = keys.diriv_key
    finally:
        keys.wipe()
    label = b"cryptfs v1 directory iv"
    return hmac.new(key, label + (parent / DIRIV_NAME).read_bytes() + name,
                    hashlib.sha256).digest()[:16]


def only_entry(directory: Path) -> Path:
    (entry,) = [p for p in directory.iterdir() if p.name != DIRIV_NAME]
    return entry


def test_the_same_paths_made_on_two_copies_are_byte_identical(tmp_path):
    a, b, passfile = two_copies(tmp_path)
    for side, data in ((a, b"written through A\n"), (b, b"written through B\n")):
        with mounted(side, passfile) as plain:
            subprocess.run(["mkdir", "-p", "a/b/c", f"a/{LONG}/d"], cwd=plain, check=True)
            os.symlink("b/c", plain / "a" / "link")
            (plain / "a" / "b" / "c" / f"{side.name}.txt").write_bytes(data)
            (plain / "a" / LONG / "d" / f"{side.name}.txt").write_bytes(data)
    assert len(ivs(a)) == 6  # root, a, a/b, a/b/c, a/LONG, a/LONG/d
    assert ivs(a) == ivs(b)
    files_a, files_b = backing_files(a), backing_files(b)
    sidecars = [k for k in files_a if k.endswith(SIDECAR_SUFFIX)]
    symlinks = [k for k in files_a if files_a[k].startswith(b"-> ")]
    assert len(sidecars) == 1 and len(symlinks) == 1
    for rel in sidecars + symlinks:
        assert files_a[rel] == files_b[rel], rel
    # Each side's files, carried to the other as a sync tool would, decode there.
    for src, dst in ((a, b), (b, a)):
        for rel in backing_files(src):
            if not os.path.lexists(dst / rel):
                shutil.copy2(src / rel, dst / rel)
    for side in (a, b):
        with mounted(side, passfile) as plain:
            for sub in ("a/b/c", f"a/{LONG}/d"):
                assert sorted(os.listdir(plain / sub)) == ["A.txt", "B.txt"]
                assert (plain / sub / "A.txt").read_bytes() == b"written through A\n"
                assert (plain / sub / "B.txt").read_bytes() == b"written through B\n"
            assert os.readlink(plain / "a" / "link") == "b/c"
    assert fsck_problems(Mount(a, tmp_path / "x", passfile, ENGINE)) == []


def test_a_name_made_again_gets_its_iv_again_and_a_rename_keeps_it(tmp_path):
    """The documented leak (format.md §5.1): rmdir and mkdir of one name in
    one parent give the same IV, and so the same names inside; a renamed
    directory keeps its IV, so its name made again gives a second directory
    with the same IV."""
    a, _, passfile = two_copies(tmp_path)
    with mounted(a, passfile) as plain:
        (plain / "d").mkdir()
        backing = {"d": only_entry_dir(a)}
        (plain / "e").mkdir()
        backing["e"] = next(p for p in a.iterdir() if p.is_dir() and p != backing["d"])
        first = (backing["d"] / DIRIV_NAME).read_bytes()
        assert first == derived_iv(a, a, b"d")
        assert (backing["e"] / DIRIV_NAME).read_bytes() != first
        (plain / "d" / "f").write_text("x")
        inner = only_entry(backing["d"]).name
        (plain / "d" / "f").unlink()
        (plain / "d").rmdir()
        (plain / "d").mkdir()
        assert (backing["d"] / DIRIV_NAME).read_bytes() == first
        (plain / "d" / "f").write_text("y")
        assert only_entry(backing["d"]).name == inner  # the same name inside, too
        (plain / "d").rename(plain / "e" / "moved")
        moved = only_entry(backing["e"])
        assert (moved / DIRIV_NAME).read_bytes() == first
        (plain / "d").mkdir()
        assert (backing["d"] / DIRIV_NAME).read_bytes() == first  # two live directories
        assert (plain / "e" / "moved" / "f").read_text() == "y"


def test_without_the_flag_ivs_stay_random(tmp_path):
    a, b, passfile = two_copies(tmp_path, features=[FEATURE_BOUND_METADATA])
    for side in (a, b):
        with mounted(side, passfile) as plain:
            (plain / "same").mkdir()
    (dir_a,) = [p for p in a.iterdir() if p.is_dir()]
    (dir_b,) = [p for p in b.iterdir() if p.is_dir()]
    assert dir_a.name == dir_b.name
    assert (dir_a / DIRIV_NAME).read_bytes() != (dir_b / DIRIV_NAME).read_bytes()
    # A lost IV is not derived there: the directory reads EIO, as before.
    (dir_a / DIRIV_NAME).unlink()
    with mounted(a, passfile, expected=("no cryptfs.diriv",)) as plain:
        with pytest.raises(OSError) as info:
            os.listdir(plain / "same")
        assert info.value.errno == errno.EIO
    assert not (dir_a / DIRIV_NAME).exists()
    assert fsck_problems(Mount(a, tmp_path / "x", passfile, ENGINE)) == [("diriv", "/same")]


def _renamed_while_the_other_side_adds(tmp_path: Path, made_as: str) -> tuple[Path, Path, Path]:
    """Machine A has directory X (made as ``made_as``, renamed to X if that
    differs) holding f; B is a copy.  A renames X to Y while B adds X/g.
    B then gets A's changes as a sync tool carries them: X/f and
    X/cryptfs.diriv deleted, Y added; X survives because of B's new g.
    A gets B's g: X made again without an IV.  Returns A, B and the
    password file."""
    a, b, passfile = two_copies(tmp_path)
    with mounted(a, passfile) as plain:
        (plain / made_as).mkdir()
        (plain / made_as / "f").write_bytes(b"from A\n")
        if made_as != "X":
            (plain / made_as).rename(plain / "X")
    shutil.rmtree(b)
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    x_backing = only_entry_dir(a)
    with mounted(a, passfile) as plain:
        (plain / "X").rename(plain / "Y")
    with mounted(b, passfile) as plain:
        (plain / "X" / "g").write_bytes(b"from B\n")
    y_backing = only_entry_dir(a)
    g_backing = next(p for p in (b / x_backing.name).iterdir()
                     if p.name not in os.listdir(a / y_backing.name))
    # onto B: A's deletions and its new Y
    for entry in os.listdir(a / y_backing.name):
        os.unlink(b / x_backing.name / entry)
    shutil.copytree(a / y_backing.name, b / y_backing.name, copy_function=shutil.copy2)
    # onto A: B's new file, in X made again
    (a / x_backing.name).mkdir()
    shutil.copy2(g_backing, a / x_backing.name / g_backing.name)
    return a, b, passfile


def only_entry_dir(cipher: Path) -> Path:
    (entry,) = [p for p in cipher.iterdir() if p.is_dir()]
    return entry


def test_a_directory_recreated_without_its_iv_is_derived_shown_and_healed(tmp_path):
    a, b, passfile = _renamed_while_the_other_side_adds(tmp_path, made_as="X")
    for side in (a, b):
        (x,) = [p for p in side.iterdir() if p.is_dir() and not (p / DIRIV_NAME).exists()]
        assert fsck_problems(Mount(side, tmp_path / "x", passfile, ENGINE)) == [
            ("diriv-missing", "/X")]  # and B's file decodes: no "name" problem
        assert not (x / DIRIV_NAME).exists()  # fsck only reads
        with mounted(side, passfile, expected=(HEALED,)) as plain:
            assert sorted(os.listdir(plain)) == ["X", "Y"]
            assert os.listdir(plain / "X") == ["g"]
            assert (plain / "X" / "g").read_bytes() == b"from B\n"
            assert (plain / "Y" / "f").read_bytes() == b"from A\n"
        iv_file = x / DIRIV_NAME
        assert iv_file.read_bytes() == derived_iv(side, side, b"X")
        assert stat.S_IMODE(iv_file.stat().st_mode) == 0o440
        assert fsck_problems(Mount(side, tmp_path / "x", passfile, ENGINE)) == []
        assert HEALED in (side.parent / f"{side.name}-plain.log").read_text()
    assert ivs(a) == ivs(b)


def test_a_directory_renamed_before_its_iv_was_lost_stays_hidden(tmp_path):
    """X was made as W: its IV came from the name W, which nothing records.
    Its entries stay unreadable (EIO), the mount goes on, logs it once and
    writes nothing; fsck reports it."""
    _, b, passfile = _renamed_while_the_other_side_adds(tmp_path, made_as="W")
    (x,) = [p for p in b.iterdir() if p.is_dir() and not (p / DIRIV_NAME).exists()]
    with mounted(b, passfile, expected=(UNDERIVABLE,)) as plain:
        for _ in range(3):
            with pytest.raises(OSError) as info:
                os.listdir(plain / "X")
            assert info.value.errno == errno.EIO
        assert sorted(os.listdir(plain)) == ["X", "Y"]
        assert (plain / "Y" / "f").read_bytes() == b"from A\n"
        (plain / "Y" / "new").write_bytes(b"the mount goes on\n")
    log = (b.parent / "B-plain.log").read_text()
    assert log.count(UNDERIVABLE) == 1
    assert not (x / DIRIV_NAME).exists()
    problems = fsck_problems(Mount(b, tmp_path / "x", passfile, ENGINE))
    assert problems == [("diriv", "/X")]


def test_an_empty_directory_without_its_iv(tmp_path):
    """Nothing in it can confirm the derived IV: it is used but not written
    (the real one may be on its way) until something is made in it; an
    empty one can also be removed."""
    a, _, passfile = two_copies(tmp_path)
    with mounted(a, passfile) as plain:
        (plain / "e").mkdir()
        (plain / "r").mkdir()
    for path in [p for p in a.iterdir() if p.is_dir()]:
        assert (path / DIRIV_NAME).read_bytes() in (derived_iv(a, a, b"e"), derived_iv(a, a, b"r"))
        (path / DIRIV_NAME).unlink()
    with mounted(a, passfile, expected=(HEALED,)) as plain:
        assert os.listdir(plain / "e") == []
        assert sum(not (p / DIRIV_NAME).exists() for p in a.iterdir() if p.is_dir()) == 2
        (plain / "r").rmdir()
        (plain / "e" / "f").write_text("kept")
        (plain / "e").rename(plain / "renamed")  # its IV is on disk by now
    with mounted(a, passfile) as plain:
        assert sorted(os.listdir(plain)) == ["renamed"]
        assert (plain / "renamed" / "f").read_text() == "kept"


def test_a_read_only_mount_derives_but_writes_nothing(tmp_path):
    a, b, passfile = _renamed_while_the_other_side_adds(tmp_path, made_as="X")
    with mounted(b, passfile, extra=("--ro",)) as plain:
        assert (plain / "X" / "g").read_bytes() == b"from B\n"
    assert sum(not (p / DIRIV_NAME).exists() for p in b.iterdir() if p.is_dir()) == 1


def test_new_directories_carry_the_flag(tmp_path):
    a, _, _ = two_copies(tmp_path)
    assert FEATURE_CONVERGENT_DIRIVS in KeyFile.load(a).features


def test_fsck_repair_writes_the_derived_iv_back(tmp_path):
    """``cryptfs fsck --repair`` puts the derived IV back, as the mount would."""
    _, b, passfile = _renamed_while_the_other_side_adds(tmp_path, made_as="X")
    (x,) = [p for p in b.iterdir() if p.is_dir() and not (p / DIRIV_NAME).exists()]
    proc = subprocess.run(cryptfs_cmd("fsck", str(b), "--passfile", str(passfile), "--repair",
                                      "--json"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # repaired, then checked clean
    report = json.loads(proc.stdout)
    assert [(r["kind"], r["plaintext"]) for r in report["repaired"]] == \
        [("diriv-restored", "/X")]
    assert report["problems"] == []
    assert (x / DIRIV_NAME).read_bytes() == derived_iv(b, b, b"X")
    assert stat.S_IMODE((x / DIRIV_NAME).stat().st_mode) == 0o440
    assert fsck_problems(Mount(b, tmp_path / "x", passfile, ENGINE)) == []
