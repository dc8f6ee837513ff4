"""Convergent directory IVs under a real sync tool: two copies of one cipher
directory kept in sync by two Syncthing instances on loopback
(tests/helpers/syncthing.py), each mounted by cryptfs on its own.

While the machines are apart both create the same new directories with
different files in them, and different files elsewhere.  With random IVs
(cryptfs before ``convergent-dirivs``) each side writes its own
``cryptfs.diriv`` for the new directory; Syncthing keeps one and moves the
other aside as a conflict copy, and every name encrypted under the loser
vanishes from the mount.  With derived IVs both sides write the same bytes:
after the sync every entry decodes on both sides and both list the union."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cryptfs.keys.keyfile import KEYFILE_NAME
from cryptfs.names.filenames import DIRIV_NAME
from tests.conftest import MOUNT_ENGINES, Mount, fsck_problems, init_cipherdir, mounted
from tests.helpers.syncthing import syncthing_pair

pytestmark = pytest.mark.fuse
ENGINE = MOUNT_ENGINES[0]
HEALED = "had no cryptfs.diriv"  # the mount's line when it writes a derived IV back
LONG = "L" * 200  # stored as cryptfs.longname.* with a sidecar



def tree(plain: Path) -> dict[str, bytes | None]:
    """Every entry below ``plain``: file contents, ``b"-> " + target`` for
    a symlink, None for a directory."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(plain):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, plain)
            if os.path.islink(path):
                found[rel] = b"-> " + os.fsencode(os.readlink(path))
            elif name in dirnames:
                found[rel] = None
            else:
                with open(path, "rb") as f:
                    found[rel] = f.read()
    return found


def conflict_copies(cipher: Path) -> list[str]:
    return sorted(str(p.relative_to(cipher)) for p in cipher.rglob("*sync-conflict*"))


A_FILES = {"project/src/main.c": b"int main(void) { return 0; }\n",
           "project/README": b"written on A\n",
           "only-on-A.txt": os.urandom(10_000)}
B_FILES = {"project/src/util.c": b"int util(void) { return 1; }\n",
           "project/docs/guide.txt": b"written on B\n",
           "notes/only-on-B.bin": os.urandom(70_000)}


def _write(plain: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (plain / rel).parent.mkdir(parents=True, exist_ok=True)
        (plain / rel).write_bytes(data)


def test_the_same_new_directories_made_apart_merge_cleanly(tmp_path):
    """Also everything else two machines write for the same operation
    (format.md §6.1): the lock file (each side's first mount creates it)
    and long-name sidecars come out byte-identical, so Syncthing makes no
    conflict copy of them; the symlink too (Syncthing 1.19 makes no
    conflict copy of a symlink even when the two differ, as with random
    nonces: it keeps one, and either would open; tests/t4_convergent.py
    checks the bytes)."""
    a, b, passfile = tmp_path / "A", tmp_path / "B", tmp_path / "password"
    init_cipherdir(a, passfile)
    shutil.copytree(a, b)  # one cipher directory, two copies (same keys, same root IV)
    # Each side's first mount makes its own cryptfs.lock, before the two
    # Syncthing instances first meet (as machines that were apart).
    with mounted(a, passfile) as plain:
        _write(plain, {"shared/common.txt": b"before the split\n"})
    with mounted(b, passfile):
        pass
    with syncthing_pair(tmp_path / "st", a, b, marker=KEYFILE_NAME) as pair:
        pair.sync()
        with pair.apart():
            for side, files in ((a, A_FILES), (b, B_FILES)):
                with mounted(side, passfile) as plain:
                    _write(plain, files)
                    (plain / LONG / "sub").mkdir(parents=True)
                    os.symlink(f"{LONG}/sub", plain / "link")
                    (plain / LONG / "sub" / f"{side.name}.txt").write_bytes(side.name.encode())
                    if side == b:
                        (plain / "shared/from-B.txt").write_bytes(b"B, in an old directory\n")
        pair.sync()
        for side in (a, b):
            assert conflict_copies(side) == []
    expected = {"shared": None, "shared/common.txt": b"before the split\n",
                "shared/from-B.txt": b"B, in an old directory\n",
                "project": None, "project/src": None, "project/docs": None, "notes": None,
                LONG: None, f"{LONG}/sub": None, f"{LONG}/sub/A.txt": b"A",
                f"{LONG}/sub/B.txt": b"B", "link": f"-> {LONG}/sub".encode(),
                **A_FILES, **B_FILES}
    for side in (a, b):
        with mounted(side, passfile) as plain:
            assert tree(plain) == expected
        assert fsck_problems(Mount(side, tmp_path / "x", passfile, ENGINE)) == []


def test_a_directory_renamed_on_one_side_while_the_other_adds_to_it(tmp_path):
    """The case format.md §5.1 recovers: A renames X to Y while B adds X/g.
    Syncthing deletes what A deleted but keeps X for B's new file, without
    its ``cryptfs.diriv``, on both sides; fsck finds the IV derivable; A's
    mount derives it from X's name, shows B's file and writes the IV back,
    and the healed IV travels to B like any file."""
    a, b, passfile = tmp_path / "A", tmp_path / "B", tmp_path / "password"
    init_cipherdir(a, passfile)
    shutil.copytree(a, b)
    with syncthing_pair(tmp_path / "st", a, b, marker=KEYFILE_NAME) as pair:
        with mounted(a, passfile) as plain:
            _write(plain, {"X/f": b"from A\n"})
        pair.sync()
        with pair.apart():
            with mounted(a, passfile) as plain:
                (plain / "X").rename(plain / "Y")
            with mounted(b, passfile) as plain:
                (plain / "X" / "g").write_bytes(b"from B\n")
        pair.sync()
        lost = [[p for p in side.iterdir() if p.is_dir() and not (p / DIRIV_NAME).exists()]
                for side in (a, b)]
        assert [len(x) for x in lost] == [1, 1]  # as the issue says: X again, without its IV
        assert lost[0][0].name == lost[1][0].name
        for side in (a, b):
            assert fsck_problems(Mount(side, tmp_path / "x", passfile, ENGINE)) == [
                ("diriv-missing", "/X")]
        with mounted(a, passfile, expected=(HEALED,)) as plain:
            assert tree(plain) == {"X": None, "X/g": b"from B\n", "Y": None, "Y/f": b"from A\n"}
        pair.sync()  # the healed IV travels
        with mounted(b, passfile) as plain:
            assert tree(plain) == {"X": None, "X/g": b"from B\n", "Y": None, "Y/f": b"from A\n"}
        for side in (a, b):
            assert conflict_copies(side) == []
            assert (side / lost[0][0].name / DIRIV_NAME).read_bytes() == \
                (a / lost[0][0].name / DIRIV_NAME).read_bytes()
            assert fsck_problems(Mount(side, tmp_path / "x", passfile, ENGINE)) == []

