"""Sync-tool conflict copies seen through a real mount (docs/conflicts.md):
each tool's copy of a real entry is shown beside it under a name with
``conflict`` in it and works as any entry; names stranded under a copy of a
directory IV are shown, and ``fsck --repair`` re-encrypts them.

Copies are made as the tools make them: the backing entry copied under the
name ``tests/helpers/sync_tools.make_conflict`` gives, holding other bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cryptfs.errors import ExitCode
from cryptfs.names.conflicts import Tool
from cryptfs.names.filenames import DIRIV_NAME
from tests.conftest import (
    MOUNT_TIMEOUT,
    Mount,
    backing_entry_of,
    cryptfs_cmd,
)
from tests.helpers.sync_tools import make_conflict

DEVICE = {Tool.SYNCTHING: b"ABCDEFG"}  # a short device ID; the others take a host name
LONG = "L" * 200 + ".txt"  # a long backing name (cryptfs.longname.* and a sidecar)


def conflict_name(tool: Tool, backing: str) -> str:
    return os.fsdecode(make_conflict(tool, os.fsencode(backing),
                                     device=DEVICE.get(tool, b"laptop")))


def backing_dir(mount: Mount, plain: Path) -> Path:
    """Make directory ``plain`` in the mount; its backing directory."""
    return backing_entry_of(mount, plain.mkdir)


def edited(mount: Mount, path: Path, loser: bytes, winner: bytes) -> tuple[Path, Path]:
    """Write ``loser`` to ``path``, keep a copy of its backing file (the
    version a sync tool moves aside), then write ``winner``: the backing
    file and the copy's bytes, as after a conflict."""
    entry = backing_entry_of(mount, lambda: path.write_bytes(loser))
    copy = entry.parent / f"{entry.name}.copy-for-test"
    shutil.copy2(entry, copy)
    path.write_bytes(winner)
    return entry, copy


def plant(copy: Path, name: str) -> Path:
    return copy.rename(copy.parent / name)


def listing(path: Path) -> dict[str, bytes | str]:
    """Names and contents (files), targets (symlinks) or listings (dirs)."""
    seen: dict[str, bytes | str] = {}
    for child in sorted(path.iterdir()):
        if child.is_symlink():
            seen[child.name] = os.readlink(child)
        elif child.is_dir():
            seen[child.name] = ",".join(sorted(os.listdir(child)))
        else:
            seen[child.name] = child.read_bytes()
    return seen


def fsck(mount: Mount, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run(cryptfs_cmd("fsck", str(mount.cipherdir), "--passfile",
                                      str(mount.passfile), "--json", *extra),
                          capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def kinds(report: dict) -> list[tuple[str, str | None]]:
    return sorted((p["kind"], p["plaintext"]) for p in report["problems"])



# --- every tool's copy of a file --------------------------------------------------------


@pytest.mark.parametrize("tool", list(Tool), ids=lambda t: t.value)
def test_each_tools_copy_is_shown_beside_the_original(cryptfs_mount, mnt, tool):
    backing_dir(cryptfs_mount, mnt / "sub")
    entry, copy = edited(cryptfs_mount, mnt / "sub" / "report.txt",
                         b"the losing version " + tool.value.encode(), b"the winner")
    plant(copy, conflict_name(tool, entry.name))
    seen = listing(mnt / "sub")
    assert seen.pop("report.txt") == b"the winner"
    ((shown, data),) = seen.items()
    assert "conflict" in shown and shown.startswith("report (") and shown.endswith(".txt")
    assert data == b"the losing version " + tool.value.encode()
    assert os.stat(mnt / "sub" / shown).st_size == len(data)


def test_copy_can_be_written_renamed_and_deleted(cryptfs_mount, mnt):
    bdir = backing_dir(cryptfs_mount, mnt / "d")
    entry, copy = edited(cryptfs_mount, mnt / "d" / "notes.md", b"mine", b"theirs")
    planted = plant(copy, conflict_name(Tool.SYNCTHING, entry.name))
    (shown,) = [n for n in os.listdir(mnt / "d") if n != "notes.md"]
    assert shown == "notes (conflict 2026-12-07 ABCDEFG).md"
    with open(mnt / "d" / shown, "r+b") as f:
        f.seek(4)
        f.write(b", merged")
    assert (mnt / "d" / shown).read_bytes() == b"mine, merged"
    os.link(mnt / "d" / shown, mnt / "d" / "hardlink.md")
    assert (mnt / "d" / "hardlink.md").read_bytes() == b"mine, merged"
    os.rename(mnt / "d" / shown, mnt / "d" / "kept.md")
    assert not planted.exists()  # now an ordinary entry with its own encrypted name
    assert listing(mnt / "d") == {"notes.md": b"theirs", "kept.md": b"mine, merged",
                                  "hardlink.md": b"mine, merged"}
    assert entry.read_bytes() and len(os.listdir(bdir)) == 4  # + cryptfs.diriv
    os.unlink(mnt / "d" / "kept.md")
    os.unlink(mnt / "d" / "hardlink.md")
    assert listing(mnt / "d") == {"notes.md": b"theirs"}


def test_copy_deleted_directly_leaves_the_original(cryptfs_mount, mnt):
    backing_dir(cryptfs_mount, mnt / "d")
    entry, copy = edited(cryptfs_mount, mnt / "d" / "a.txt", b"old", b"new")
    planted = plant(copy, conflict_name(Tool.DROPBOX, entry.name))
    shown = mnt / "d" / "a (conflict 2026-12-07 laptop).txt"
    assert shown.read_bytes() == b"old"
    shown.unlink()
    assert not planted.exists() and entry.exists()
    assert listing(mnt / "d") == {"a.txt": b"new"}


def test_copy_is_found_by_lookup_without_a_listing(fresh_mount):
    mnt = fresh_mount.mountpoint
    entry, copy = edited(fresh_mount, mnt / "doc.txt", b"one", b"two")
    plant(copy, conflict_name(Tool.NEXTCLOUD, entry.name))
    fresh_mount.restart()  # nothing cached: the first request is the lookup
    assert (mnt / "doc (conflict 2026-12-07 laptop).txt").read_bytes() == b"one"


# --- long names ------------------------------------------------------------------------


@pytest.mark.parametrize("tool", [Tool.SYNCTHING, Tool.NEXTCLOUD, Tool.RCLONE_BISYNC],
                         ids=lambda t: t.value)
def test_long_name_copy_and_its_sidecar_copy(cryptfs_mount, mnt, tool):
    bdir = backing_dir(cryptfs_mount, mnt / "d")
    entry, copy = edited(cryptfs_mount, mnt / "d" / LONG, b"long loser", b"long winner")
    assert entry.name.startswith("cryptfs.longname.")
    sidecar = entry.parent / (entry.name + ".name")
    plant(copy, conflict_name(tool, entry.name))
    shutil.copy2(sidecar, bdir / conflict_name(tool, sidecar.name))  # the same bytes
    seen = listing(mnt / "d")
    assert seen.pop(LONG) == b"long winner"
    ((shown, data),) = seen.items()
    assert data == b"long loser"
    assert "conflict" in shown and shown.endswith(".txt") and shown.startswith("LLLL")
    assert len(os.fsencode(shown)) <= 255
    os.unlink(mnt / "d" / shown)  # the original's sidecar stays
    assert sidecar.exists() and listing(mnt / "d") == {LONG: b"long winner"}


def test_renamed_long_copy_gets_its_own_sidecar(cryptfs_mount, mnt):
    bdir = backing_dir(cryptfs_mount, mnt / "d")
    entry, copy = edited(cryptfs_mount, mnt / "d" / LONG, b"loser", b"winner")
    plant(copy, conflict_name(Tool.SYNCTHING, entry.name))
    (shown,) = [n for n in os.listdir(mnt / "d") if n != LONG]
    other = "M" * 200 + ".txt"
    os.rename(mnt / "d" / shown, mnt / "d" / other)
    assert listing(mnt / "d") == {LONG: b"winner", other: b"loser"}
    assert len([n for n in os.listdir(bdir) if n.endswith(".name")]) == 2


def test_missing_sidecar_is_replaced_by_its_copy(fresh_mount):
    mnt = fresh_mount.mountpoint
    entry = backing_entry_of(fresh_mount, lambda: (mnt / LONG).write_bytes(b"kept"))
    sidecar = entry.parent / (entry.name + ".name")
    sidecar.rename(entry.parent / conflict_name(Tool.SYNCTHING, sidecar.name))
    fresh_mount.restart()
    assert listing(mnt) == {LONG: b"kept"}
    fresh_mount.stop()
    code, report = fsck(fresh_mount)
    assert code == 20 and kinds(report) == [("conflict-sidecar", "/")]
    code, report = fsck(fresh_mount, "--repair")
    assert code == 0 and report["problems"] == []
    assert [r["kind"] for r in report["repaired"]] == ["sidecar-restored"]
    assert sidecar.exists()


# --- symlinks and directories ----------------------------------------------------------------


def test_symlink_copy_is_unsealed_with_its_originals_name(cryptfs_mount, mnt):
    bdir = backing_dir(cryptfs_mount, mnt / "d")
    entry = backing_entry_of(cryptfs_mount,
                             lambda: os.symlink("old/target", mnt / "d" / "link"))
    sealed = os.readlink(entry)
    (mnt / "d" / "link").unlink()
    os.symlink("new/target", mnt / "d" / "link")
    os.symlink(sealed, bdir / conflict_name(Tool.SYNCTHING, entry.name))
    shown = mnt / "d" / "link (conflict 2026-12-07 ABCDEFG)"
    assert os.readlink(shown) == "old/target"
    assert os.lstat(shown).st_size == len("old/target")
    os.rename(shown, mnt / "d" / "restored")  # re-sealed for its own name
    assert listing(mnt / "d") == {"link": "new/target", "restored": "old/target"}


def test_directory_copy(cryptfs_mount, mnt):
    bdir = backing_dir(cryptfs_mount, mnt / "d")
    entry = backing_dir(cryptfs_mount, mnt / "d" / "photos")
    (mnt / "d" / "photos" / "a.jpg").write_bytes(b"jpeg")
    shutil.copytree(entry, bdir / conflict_name(Tool.SEAFILE, entry.name), symlinks=True)
    (mnt / "d" / "photos" / "a.jpg").write_bytes(b"jpeg, edited")
    seen = listing(mnt / "d")
    (shown,) = [n for n in seen if n != "photos"]
    assert shown.startswith("photos (conflict 2026-12-07") and seen[shown] == "a.jpg"
    assert (mnt / "d" / shown / "a.jpg").read_bytes() == b"jpeg"
    (mnt / "d" / shown / "b.jpg").write_bytes(b"new in the copy")
    os.rename(mnt / "d" / shown, mnt / "d" / "photos-theirs")
    assert listing(mnt / "d" / "photos-theirs") == {"a.jpg": b"jpeg", "b.jpg": b"new in the copy"}
    shutil.rmtree(mnt / "d" / "photos-theirs")
    assert listing(mnt / "d") == {"photos": "a.jpg"}


# --- names never collide; junk stays hidden ------------------------------------------------


def test_shown_name_never_shadows_a_real_one(cryptfs_mount, mnt):
    backing_dir(cryptfs_mount, mnt / "d")
    squatter = mnt / "d" / "report (conflict 2026-12-07 laptop).txt"
    squatter.write_bytes(b"a real file with that name")
    entry, copy = edited(cryptfs_mount, mnt / "d" / "report.txt", b"loser", b"winner")
    plant(copy, conflict_name(Tool.NEXTCLOUD, entry.name))
    assert listing(mnt / "d") == {
        "report.txt": b"winner",
        "report (conflict 2026-12-07 laptop).txt": b"a real file with that name",
        "report (conflict 2026-12-07 laptop 2).txt": b"loser",
    }


def test_foreign_junk_stays_hidden(cryptfs_mount, mnt):
    bdir = backing_dir(cryptfs_mount, mnt / "d")
    entry, copy = edited(cryptfs_mount, mnt / "d" / "real.txt", b"a", b"b")
    copy.unlink()
    (bdir / ".DS_Store").write_bytes(b"junk")
    (bdir / "notes.txt.sync-conflict-20261207-101500-ABCDEFG").write_bytes(b"junk")
    # the shape of a copy, but its "original" is no name of this directory
    other = entry.name[:-4] + ("AAAA" if not entry.name.endswith("AAAA") else "BBBB")
    (bdir / conflict_name(Tool.SYNCTHING, other)).write_bytes(b"junk")
    cryptfs_mount.expected_log.append("skipping 3 entries that do not decrypt")
    assert listing(mnt / "d") == {"real.txt": b"b"}
    assert not (mnt / "d" / "real (conflict 2026-12-07 ABCDEFG).txt").exists()


def test_sync_tool_files_are_skipped_quietly_and_temporaries_reported(fresh_mount):
    """A sync tool's housekeeping (folder markers, journals) and transfer
    temporaries are not cryptfs data and not damage: no listing, no warning
    in the mount's log; fsck reports only the temporaries, as such."""
    (fresh_mount.mountpoint / "d").mkdir()
    (fresh_mount.mountpoint / "d" / "real.txt").write_bytes(b"data")
    (bdir,) = [p for p in fresh_mount.cipherdir.iterdir() if p.is_dir()]
    real = next(p.name for p in bdir.iterdir() if not p.name.startswith("cryptfs."))
    for where, name in [(fresh_mount.cipherdir, ".stfolder"), (bdir, ".stversions"),
                        (fresh_mount.cipherdir, ".dropbox.cache"),
                        (fresh_mount.cipherdir, ".sync")]:
        (where / name).mkdir()
    for name in [".stignore", "._sync_0123abcd.db", "._sync_0123abcd.db-wal",
                 ".nextcloudsync.log", ".dropbox"]:
        (fresh_mount.cipherdir / name).write_bytes(b"state")
    temporaries = [f".syncthing.{real}.tmp", f"~syncthing~{real}.tmp", f"{real}.!sync",
                   f"{real}.a1b2c3d4.partial"]
    for name in temporaries:
        (bdir / name).write_bytes(b"half a transfer")
    assert sorted(os.listdir(fresh_mount.mountpoint)) == ["d"]
    assert sorted(os.listdir(fresh_mount.mountpoint / "d")) == ["real.txt"]
    assert "skipping" not in fresh_mount.log()
    fresh_mount.stop()
    code, report = fsck(fresh_mount)
    assert code == 20
    assert sorted((p["kind"], p["backing"]) for p in report["problems"]) == sorted(
        ("sync-temporary", f"{bdir.name}/{name}") for name in temporaries)


# --- a directory made on two machines: names stranded under a diriv copy ---------------------


def two_machines(mount: Mount) -> tuple[Path, Path]:
    """``shared`` made on this machine (a.txt, same.txt) and on another one
    (b.txt, same.txt, a symlink, a long name, a directory): the other's
    entries merged in beside its IV kept as a Syncthing copy, as Syncthing
    leaves them.  Returns the backing directory and the plaintext one."""
    mnt = mount.mountpoint
    here = backing_dir(mount, mnt / "shared")
    (mnt / "shared" / "a.txt").write_bytes(b"made here")
    (mnt / "shared" / "same.txt").write_bytes(b"same name, made here")
    there = backing_dir(mount, mnt / "other")
    (mnt / "other" / "b.txt").write_bytes(b"made there")
    (mnt / "other" / "same.txt").write_bytes(b"same name, made there")
    os.symlink("../a.txt", mnt / "other" / "link")
    (mnt / "other" / LONG).write_bytes(b"long, made there")
    (mnt / "other" / "sub").mkdir()
    (mnt / "other" / "sub" / "deep.txt").write_bytes(b"deep")
    os.setxattr(mnt / "other" / "sub", "user.tag", b"kept")
    mount.stop()
    for name in os.listdir(there):
        target = DIRIV_NAME.replace(".", ".sync-conflict-20261207-101500-ABCDEFG.") \
            if name == DIRIV_NAME else name
        os.rename(there / name, here / target)
    there.rmdir()
    mount.start()
    return here, mnt / "shared"


STRANDED = {
    "a.txt": b"made here",
    "same.txt": b"same name, made here",
    "same (conflict 2026-12-07 ABCDEFG).txt": b"same name, made there",
    "b.txt": b"made there",
    "link": "../a.txt",
    LONG: b"long, made there",
    "sub": "deep.txt",
}


def test_names_stranded_under_a_diriv_copy_are_shown(fresh_mount):
    _, shared = two_machines(fresh_mount)
    assert listing(shared) == STRANDED
    assert (shared / "sub" / "deep.txt").read_bytes() == b"deep"
    assert os.getxattr(shared / "sub", "user.tag") == b"kept"
    fresh_mount.restart()  # looked up without a listing
    assert (shared / "b.txt").read_bytes() == b"made there"
    assert os.readlink(shared / "link") == "../a.txt"


def test_fsck_lists_and_repair_moves_stranded_names(fresh_mount):
    here, shared = two_machines(fresh_mount)
    (shared / "b.txt").rename(shared / "b-renamed.txt")  # stranded, renamed in the mount
    expected = {**STRANDED, "b-renamed.txt": STRANDED["b.txt"]}
    del expected["b.txt"]
    fresh_mount.stop()
    code, report = fsck(fresh_mount)
    assert code == 20
    assert kinds(report) == sorted([
        ("conflict-diriv", "/shared"),
        ("stranded", f"/shared/{LONG}"), ("stranded", "/shared/link"),
        ("stranded", "/shared/same (conflict 2026-12-07 ABCDEFG).txt"),
        ("stranded", "/shared/sub")])
    code, report = fsck(fresh_mount, "--repair")
    assert code == 0 and report["problems"] == [], report
    assert sorted(r["kind"] for r in report["repaired"]) == ["diriv-removed"] + [
        "restranded"] * 4
    assert not [n for n in os.listdir(here) if "sync-conflict" in n]
    fresh_mount.start()
    assert listing(shared) == expected
    assert os.getxattr(shared / "sub", "user.tag") == b"kept"
    assert (shared / "sub" / "deep.txt").read_bytes() == b"deep"


def test_fsck_lists_every_conflict_copy(fresh_mount):
    mnt = fresh_mount.mountpoint
    entry, copy = edited(fresh_mount, mnt / "report.txt", b"loser", b"winner")
    plant(copy, conflict_name(Tool.SYNCTHING, entry.name))
    fresh_mount.stop()
    code, report = fsck(fresh_mount, "--repair")  # never touches a copy of a file
    assert code == 20 and report["repaired"] == []
    ((problem),) = report["problems"]
    assert problem["kind"] == "conflict"
    assert problem["plaintext"] == "/report (conflict 2026-12-07 ABCDEFG).txt"
    assert problem["details"] == {"tool": "syncthing", "date": "2026-12-07", "time": "10:15:00",
                                  "device": "ABCDEFG", "original": "/report.txt",
                                  "shown": "report (conflict 2026-12-07 ABCDEFG).txt"}
    fresh_mount.start()
    assert listing(mnt) == {"report.txt": b"winner",
                            "report (conflict 2026-12-07 ABCDEFG).txt": b"loser"}


def test_repair_refuses_a_mounted_directory(fresh_mount):
    run = [*cryptfs_cmd("fsck", str(fresh_mount.cipherdir), "--passfile",
                        str(fresh_mount.passfile), "--repair")]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    assert proc.returncode == ExitCode.MOUNTED, proc.stderr
    proc = subprocess.run([*run, "--force"], capture_output=True, text=True,
                          timeout=MOUNT_TIMEOUT)
    assert proc.returncode == ExitCode.USAGE, proc.stderr


def test_sidecar_copy_with_other_bytes_is_listed_and_kept(fresh_mount):
    mnt = fresh_mount.mountpoint
    entry = backing_entry_of(fresh_mount, lambda: (mnt / LONG).write_bytes(b"kept"))
    odd = entry.parent / conflict_name(Tool.DROPBOX, entry.name + ".name")
    odd.write_bytes(b"not the encoded name")
    assert listing(mnt) == {LONG: b"kept"}
    fresh_mount.stop()
    code, report = fsck(fresh_mount, "--repair")
    assert code == 20 and kinds(report) == [("conflict-sidecar", "/")]
    assert "different bytes" in report["problems"][0]["message"]
    assert report["repaired"] == [] and odd.exists()
    fresh_mount.start()


def test_copy_in_an_authenticated_directory(authenticated_mount):
    mnt = authenticated_mount.mountpoint / "auth"
    backing_dir(authenticated_mount, mnt)
    entry, copy = edited(authenticated_mount, mnt / "ledger.csv", b"1,2,3\n" * 1000, b"4\n")
    plant(copy, conflict_name(Tool.ONEDRIVE_LINUX, entry.name))
    assert listing(mnt) == {"ledger.csv": b"4\n",
                            "ledger (conflict laptop).csv": b"1,2,3\n" * 1000}


def test_repair_interrupted_after_a_symlink_was_made_runs_again(fresh_mount):
    """A crash between making the re-sealed symlink and unlinking the old
    one (and before the diriv copy went) leaves both: a second run keeps one."""
    here, shared = two_machines(fresh_mount)
    fresh_mount.stop()
    before = {p.name: p for p in here.iterdir()}
    saved = {name: (os.readlink(p) if p.is_symlink() else p.read_bytes())
             for name, p in before.items() if p.is_symlink() or "sync-conflict" in name}
    code, report = fsck(fresh_mount, "--repair")
    assert code == 0, report
    for name, value in saved.items():  # put back the old symlink and the diriv copy
        if isinstance(value, str):
            if not (here / name).is_symlink():
                os.symlink(value, here / name)
        elif not (here / name).exists():
            (here / name).write_bytes(value)
    assert sum(p.is_symlink() for p in here.iterdir()) == 2
    code, report = fsck(fresh_mount, "--repair")
    assert code == 0 and report["problems"] == [], report
    assert sum(p.is_symlink() for p in here.iterdir()) == 1
    fresh_mount.start()
    assert listing(shared) == STRANDED
