"""A real sync tool's conflicts seen through the mounts on both sides: two
copies of one cipher directory kept in sync by two real Syncthing instances
(tests/helpers/syncthing.py), each copy mounted the whole time.  While the
machines are apart, one file is edited on both sides and one new directory
is made on both with a different file in it; after syncing, both mounts
show the winner with the conflict copy beside it, and both files of the
directory, each with its exact bytes; fsck lists the copy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cryptfs.keys.keyfile import KEYFILE_NAME
from tests.conftest import (
    MOUNT_ENGINES,
    MOUNT_TIMEOUT,
    Mount,
    backing_entry_of,
    cryptfs_cmd,
    init_cipherdir,
    require_fuse,
)
from tests.helpers.syncthing import conflict_copies, syncthing_pair

ENGINE = MOUNT_ENGINES[0]
LOSER = b"edited through A\n"
WINNER = b"edited through B, later: the winner\n"


def fsck(cipherdir: Path, passfile: Path, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run(cryptfs_cmd("fsck", str(cipherdir), "--passfile", str(passfile),
                                      "--json", *extra),
                          capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    return proc.returncode, json.loads(proc.stdout)


def seen(mountpoint: Path) -> dict[str, bytes]:
    """Every file in the mount by relative path, with its contents."""
    return {str(p.relative_to(mountpoint)): p.read_bytes()
            for p in sorted(mountpoint.rglob("*")) if p.is_file()}


@pytest.mark.fuse
def test_conflicts_from_a_real_syncthing_are_visible_on_both_mounts(tmp_path):
    require_fuse()
    a, b, passfile = tmp_path / "A", tmp_path / "B", tmp_path / "password"
    init_cipherdir(a, passfile)
    shutil.copytree(a, b)  # one cipher directory, two copies (same keys, same root IV)
    mounts = {side: Mount(side, tmp_path / f"{side.name}-plain", passfile, ENGINE)
              for side in (a, b)}
    for mount in mounts.values():
        # Syncthing's temporary files (.syncthing.NAME.tmp) are foreign:
        # skipped, logged once, if a listing meets one.
        mount.expected_log.append("first '.syncthing.")
    with syncthing_pair(tmp_path / "st", a, b, marker=KEYFILE_NAME) as pair:
        try:
            for mount in mounts.values():
                mount.start()
            plain_a, plain_b = (mounts[side].mountpoint for side in (a, b))
            encoded = backing_entry_of(
                mounts[a], lambda: (plain_a / "doc.txt").write_bytes(b"common\n")).name
            pair.sync()
            assert (plain_b / "doc.txt").read_bytes() == b"common\n"

            with pair.apart():
                (plain_a / "doc.txt").write_bytes(LOSER)
                (plain_a / "new").mkdir()
                (plain_a / "new" / "from-a.txt").write_bytes(b"made on A\n")
                (plain_b / "new").mkdir()
                (plain_b / "new" / "from-b.txt").write_bytes(b"made on B\n")
                (plain_b / "doc.txt").write_bytes(WINNER)  # the newer mtime wins
            pair.sync()

            (copy,) = conflict_copies(a, encoded)
            date, device = re.fullmatch(
                re.escape(encoded) + r"\.sync-conflict-(\d{8})-\d{6}-([A-Z2-7]{7})",
                copy.name).groups()
            shown = f"doc (conflict {date[:4]}-{date[4:6]}-{date[6:]} {device}).txt"
            expected = {"doc.txt": WINNER, shown: LOSER,
                        "new/from-a.txt": b"made on A\n", "new/from-b.txt": b"made on B\n"}
            for side in (a, b):
                assert seen(mounts[side].mountpoint) == expected, side.name
        finally:
            for mount in mounts.values():
                mount.stop()
    for mount in mounts.values():
        mount.check_log()

    for side in (a, b):
        code, report = fsck(side, passfile)
        assert code == 20
        conflicts = [p for p in report["problems"] if p["kind"] == "conflict"]
        assert [(p["plaintext"], p["details"]["original"], p["details"]["tool"])
                for p in conflicts] == [(f"/{shown}", "/doc.txt", "syncthing")]
    # The directory made on both sides: whatever fsck found there, --repair
    # leaves only the conflict copy of the file for the user to decide on.
    code, report = fsck(a, passfile, "--repair")
    assert code == 20 and [p["kind"] for p in report["problems"]] == ["conflict"]
    mount = mounts[a].start()
    try:
        assert seen(mount.mountpoint) == expected
    finally:
        mount.stop()
    mount.check_log()
