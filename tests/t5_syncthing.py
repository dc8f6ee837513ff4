"""Cipher directories kept in sync by a real Syncthing (two instances on
loopback: tests/helpers/syncthing.py).  Today's cryptfs has no ``--shared``
mode: these check the harness (changes travel, divergent edits end as one
winner and one ``sync-conflict`` copy with the loser's exact bytes) and what a
synced cipher directory holds after a conflict."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from cryptfs.daemon.lock import LOCK_NAME
from cryptfs.keys.keyfile import KEYFILE_NAME
from cryptfs.names.filenames import DIRIV_NAME
from tests.conftest import MOUNT_ENGINES, Mount, backing_entry_of, init_cipherdir
from tests.helpers.syncthing import SyncthingPair, conflict_copies, syncthing_pair

ENGINE = MOUNT_ENGINES[0]
# NAME.sync-conflict-<date>-<time>-<first 7 characters of the winning device's ID>.EXT:
# the date and time are when the losing side moved its version aside (local time).
CONFLICT = r"\.sync-conflict-\d{8}-\d{6}-([A-Z2-7]{7})"


@pytest.fixture(scope="module")
def plain_pair(tmp_path_factory) -> SyncthingPair:
    """Two plain directories A and B in sync, for the module (tests use their own names)."""
    base = tmp_path_factory.mktemp("syncthing")
    with syncthing_pair(base, base / "A", base / "B") as pair:
        yield pair


def test_changes_on_one_side_reach_the_other(plain_pair):
    a, b = plain_pair.a.folder, plain_pair.b.folder
    data = os.urandom(100_000)
    (a / "dir").mkdir()
    (a / "dir" / "file.bin").write_bytes(data)
    (a / "gone").write_bytes(b"deleted later")
    plain_pair.sync()
    assert (b / "dir" / "file.bin").read_bytes() == data
    (b / "dir" / "file.bin").rename(b / "moved.bin")
    (b / "gone").unlink()
    plain_pair.sync()
    assert not (a / "dir" / "file.bin").exists() and not (a / "gone").exists()
    assert (a / "moved.bin").read_bytes() == data


def _conflict_name(name: str, directory: Path) -> tuple[Path, str]:
    """The one conflict copy of ``name`` in ``directory`` and the device
    prefix its name carries."""
    (copy,) = conflict_copies(directory, name)
    stem, dot, ext = name.rpartition(".") if "." in name else (name, "", "")
    match = re.fullmatch(re.escape(stem) + CONFLICT + re.escape(dot + ext), copy.name)
    assert match, copy.name
    return copy, match.group(1)


def test_divergent_edits_end_as_the_newer_and_a_conflict_copy(plain_pair):
    a, b = plain_pair.a.folder, plain_pair.b.folder
    (a / "doc.txt").write_bytes(b"common ancestor\n")
    plain_pair.sync()
    with plain_pair.apart():
        (a / "doc.txt").write_bytes(b"edited on A\n")
        (b / "doc.txt").write_bytes(b"edited on B, later\n")  # the newer mtime wins
    plain_pair.sync()
    for side in (a, b):
        assert (side / "doc.txt").read_bytes() == b"edited on B, later\n"
        copy, device = _conflict_name("doc.txt", side)
        assert copy.read_bytes() == b"edited on A\n"
        assert device == plain_pair.b.device_id[:7]
    assert _conflict_name("doc.txt", a)[0].name == _conflict_name("doc.txt", b)[0].name


def _edit(cipherdir: Path, passfile: Path, content: bytes) -> None:
    """Mount ``cipherdir`` alone, write doc.txt, unmount."""
    mount = Mount(cipherdir, cipherdir.parent / f"{cipherdir.name}-plain", passfile,
                  ENGINE).start()
    try:
        (mount.mountpoint / "doc.txt").write_bytes(content)
    finally:
        mount.stop()
    mount.check_log()


def _read(cipherdir: Path, passfile: Path) -> dict[str, bytes]:
    mount = Mount(cipherdir, cipherdir.parent / f"{cipherdir.name}-plain", passfile,
                  ENGINE).start()
    try:
        seen = {p.name: p.read_bytes() for p in mount.mountpoint.iterdir()}
    finally:
        mount.stop()
    mount.check_log()
    return seen


@pytest.mark.fuse
def test_divergent_edits_through_two_copies_of_a_cipher_directory(tmp_path):
    a, b, passfile = tmp_path / "A", tmp_path / "B", tmp_path / "password"
    init_cipherdir(a, passfile)
    shutil.copytree(a, b)  # one cipher directory, two copies (same keys, same root IV)
    # The key file is the folder marker: Syncthing adds nothing to the cipher root.
    with syncthing_pair(tmp_path / "st", a, b, marker=KEYFILE_NAME) as pair:
        first = Mount(a, tmp_path / "A-plain", passfile, ENGINE).start()
        try:
            encoded = backing_entry_of(
                first, lambda: (first.mountpoint / "doc.txt").write_bytes(b"common\n")).name
        finally:
            first.stop()
        first.check_log()
        pair.sync()
        assert (b / encoded).read_bytes() == (a / encoded).read_bytes()

        with pair.apart():
            _edit(a, passfile, b"edited through A\n")
            _edit(b, passfile, b"edited through B, later: the winner\n")
            loser, winner = (a / encoded).read_bytes(), (b / encoded).read_bytes()
        pair.sync()

        for side in (a, b):
            copy, device = _conflict_name(encoded, side)
            assert device == pair.b.device_id[:7]
            assert copy.read_bytes() == loser  # the loser's exact cipher bytes
            assert (side / encoded).read_bytes() == winner
            assert sorted(p.name for p in side.iterdir()) == sorted(
                [KEYFILE_NAME, DIRIV_NAME, LOCK_NAME, encoded, copy.name])
    for side in (a, b):
        seen = _read(side, passfile)
        assert seen["doc.txt"] == b"edited through B, later: the winner\n"
        # The conflict copy is shown beside the winner (tests/t5_sync_conflicts.py).
        (copy,) = [name for name in seen if name != "doc.txt"]
        assert copy.startswith("doc (conflict ") and seen[copy] == b"edited through A\n"
