"""Confidentiality of what reaches the backing directory, and damaged,
foreign or full backing storage: errors stay with the affected file."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    Mount,
    init_cipherdir,
    require_fuse,
    small_tmpfs,
)

MARKER = "ZEBRA-MARKER-7731"


def backing_files(cipherdir: Path) -> list[Path]:
    return [p for p in cipherdir.rglob("*")
            if p.is_file() and not p.name.startswith("cryptfs.")]


def test_no_plaintext_reaches_the_backing_directory(fresh):
    fresh.start()
    plain = fresh.mountpoint
    (plain / f"dir-{MARKER}").mkdir()
    (plain / f"dir-{MARKER}" / f"file-{MARKER}.txt").write_text((MARKER + "\n") * 1000)
    (plain / f"{MARKER}-{'x' * 200}").write_text(MARKER)  # a long name
    os.symlink(f"../{MARKER}/target", plain / f"link-{MARKER}")
    os.setxattr(plain / f"dir-{MARKER}", f"user.{MARKER}", MARKER.encode())
    (plain / "small").write_text(MARKER[:10])
    fresh.stop()
    fresh.check_log()
    marker = MARKER.encode()
    seen = 0
    for path in fresh.cipherdir.rglob("*"):
        assert marker not in os.fsencode(path.name)
        if path.is_symlink():
            assert marker not in os.fsencode(os.readlink(path))
        elif path.is_file():
            assert marker not in path.read_bytes() and MARKER[:10].encode() not in path.read_bytes()
        for name in os.listxattr(path, follow_symlinks=False):
            assert marker not in name.encode()
            assert marker not in os.getxattr(path, name, follow_symlinks=False)
        seen += 1
    assert seen >= 8


def test_broken_header_is_eio_for_that_file_only(fresh):
    fresh.start()
    (fresh.mountpoint / "victim").write_bytes(b"v" * 10000)
    fresh.stop()
    (victim,) = backing_files(fresh.cipherdir)
    fresh.start()
    (fresh.mountpoint / "healthy").write_bytes(b"h" * 10000)
    fresh.stop()
    with open(victim, "r+b") as f:
        f.seek(40)
        f.write(b"\xff")  # inside the header MAC
    fresh.start()
    with pytest.raises(OSError) as info:
        (fresh.mountpoint / "victim").read_bytes()
    assert info.value.errno == errno.EIO
    assert (fresh.mountpoint / "healthy").read_bytes() == b"h" * 10000
    assert sorted(os.listdir(fresh.mountpoint)) == ["healthy", "victim"]
    (fresh.mountpoint / "after").write_bytes(b"still works")
    assert (fresh.mountpoint / "after").read_bytes() == b"still works"
    fresh.stop()
    fresh.check_log(allowed=("header MAC mismatch",))
    assert victim.name in fresh.log()


def test_damaged_file_is_logged_once(tmp_path):
    """Errors on different pages of one file, or on its header, met again and
    again by reads and xattr calls: one line per file."""
    require_fuse()
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile, "--authenticated")
    mount = Mount(tmp_path / "cipher", tmp_path / "plain", passfile, "openssl").start()
    try:
        (mount.mountpoint / "pages").write_bytes(os.urandom(5 * 4096 - 100))
        (mount.mountpoint / "header").write_bytes(b"h" * 100)
    finally:
        mount.stop()
    backing = {p.stat().st_size > 8192 and "pages" or "header": p
               for p in backing_files(mount.cipherdir)}
    with open(backing["pages"], "r+b") as f:
        for page in (0, 3):  # data page i is backing page 1 + i (docs/format.md 4.6)
            f.seek(4096 * (1 + page) + 10)
            f.write(b"\xff" * 4)
    with open(backing["header"], "r+b") as f:
        f.seek(40)
        f.write(b"\xff")  # inside the header MAC
    mount.start()
    try:
        for _ in range(2):
            for offset in (0, 3 * 4096):
                with open(mount.mountpoint / "pages", "rb") as f, \
                        pytest.raises(OSError) as info:
                    f.seek(offset)
                    f.read(4096)
                assert info.value.errno == errno.EIO
            for call in (lambda p: p.read_bytes(), lambda p: os.getxattr(p, "user.x")):
                with pytest.raises(OSError) as info:
                    call(mount.mountpoint / "header")
                assert info.value.errno == errno.EIO
    finally:
        mount.stop()
    mount.check_log(allowed=tuple(p.name for p in backing.values()))
    lines = mount.log().splitlines()
    for damage, path in (("tag check", backing["pages"]), ("header MAC", backing["header"])):
        assert len([line for line in lines if damage in line]) == 1, lines
        assert path.name in next(line for line in lines if damage in line)


def test_invalid_backing_size_is_eio(fresh):
    fresh.start()
    (fresh.mountpoint / "victim").write_bytes(b"v" * 10000)
    fresh.stop()
    (victim,) = backing_files(fresh.cipherdir)
    os.truncate(victim, 4100)  # no plaintext size encodes to this
    fresh.start()
    assert os.listdir(fresh.mountpoint) == ["victim"]
    with pytest.raises(OSError) as info:
        (fresh.mountpoint / "victim").read_bytes()
    assert info.value.errno == errno.EIO
    fresh.stop()
    fresh.check_log(allowed=("backing size 4100",))
    assert victim.name in fresh.log()


def test_truncated_backing_file_is_eio_not_garbage(fresh):
    fresh.start()
    (fresh.mountpoint / "victim").write_bytes(os.urandom(3 * 4096 + 500))
    fresh.stop()
    (victim,) = backing_files(fresh.cipherdir)
    os.truncate(victim, victim.stat().st_size - 7)
    fresh.start()
    with pytest.raises(OSError) as info:
        (fresh.mountpoint / "victim").read_bytes()
    assert info.value.errno == errno.EIO
    fresh.stop()
    fresh.check_log(allowed=("final page",))


def test_foreign_files_do_not_break_listings(fresh):
    fresh.start()
    for i in range(5):
        (fresh.mountpoint / f"mine{i}").write_text(str(i))
    (fresh.mountpoint / "sub").mkdir()
    fresh.stop()
    (fresh.cipherdir / "notes.txt").write_text("dropped in by hand")
    (fresh.cipherdir / "report (conflicted copy 2026-11-21).txt").write_text("sync tool")
    (fresh.cipherdir / "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB").mkdir()  # valid base64, wrong key
    fresh.start()
    for _ in range(3):
        assert sorted(os.listdir(fresh.mountpoint)) == [f"mine{i}" for i in range(5)] + ["sub"]
    assert (fresh.mountpoint / "mine3").read_text() == "3"
    fresh.stop()
    fresh.check_log(allowed=("skipping",))
    (line,) = [line for line in fresh.log().splitlines() if "skipping" in line]
    assert "skipping 3 entries" in line and "fsck" in line  # one line for the directory


def test_directories_with_swapped_ivs_are_reported_once_each(fresh):
    fresh.start()
    for d in ("a", "b"):
        (fresh.mountpoint / d).mkdir()
        for i in range(4):
            (fresh.mountpoint / d / f"{d}{i}").write_text(d)
    fresh.stop()
    ivs = [p / "cryptfs.diriv" for p in fresh.cipherdir.iterdir() if p.is_dir()]
    contents = [iv.read_bytes() for iv in ivs]
    for iv, other in zip(ivs, reversed(contents), strict=True):
        iv.chmod(0o600)
        iv.write_bytes(other)
    fresh.start()
    for _ in range(3):
        assert os.listdir(fresh.mountpoint / "a") == os.listdir(fresh.mountpoint / "b") == []
    fresh.stop()
    fresh.check_log(allowed=("skipping",))
    lines = [line for line in fresh.log().splitlines() if "skipping" in line]
    assert len(lines) == 2, lines  # one per directory, however often listed
    assert all("skipping 4 entries" in line and "IV replaced" in line for line in lines)


def test_backing_disk_full(fresh, tmp_path):
    with small_tmpfs(tmp_path / "small", "3m") as small:
        passfile = tmp_path / "password"
        init_cipherdir(small / "cipher", passfile)
        mount = Mount(small / "cipher", tmp_path / "plain-small", passfile, fresh.engine)
        mount.start()
        try:
            keep = os.urandom(1 << 20)
            (mount.mountpoint / "keep").write_bytes(keep)
            with pytest.raises(OSError) as info, open(mount.mountpoint / "fill", "wb") as f:
                for _ in range(8):
                    f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
            assert info.value.errno == errno.ENOSPC
            assert (mount.mountpoint / "keep").read_bytes() == keep
            os.unlink(mount.mountpoint / "fill")
            (mount.mountpoint / "again").write_bytes(b"space again")
            assert (mount.mountpoint / "again").read_bytes() == b"space again"
        finally:
            mount.stop()
        mount.restart()
        try:
            assert (mount.mountpoint / "keep").read_bytes() == keep
        finally:
            mount.stop()


def test_files_shuffled_between_directories(fresh):
    fresh.start()
    for d in ("a", "b"):
        (fresh.mountpoint / d).mkdir()
        (fresh.mountpoint / d / f"in-{d}").write_text(d)
    fresh.stop()
    dirs = [p for p in fresh.cipherdir.iterdir() if p.is_dir()]
    moved = next(p for p in dirs[0].iterdir() if p.name != "cryptfs.diriv")
    moved.rename(dirs[1] / moved.name)  # same encrypted name, other directory IV
    fresh.start()
    listings = {d: sorted(os.listdir(fresh.mountpoint / d)) for d in ("a", "b")}
    assert sorted(listings.values()) == [[], ["in-a"]] or \
        sorted(listings.values()) == [[], ["in-b"]]
    fresh.stop()
    fresh.check_log(allowed=("skipping",))
    proc = subprocess.run([sys.executable, "-m", "cryptfs.cli", "fsck", str(fresh.cipherdir),
                           "--passfile", str(fresh.passfile), "--json"],
                          capture_output=True, text=True)
    kinds = [p["kind"] for p in json.loads(proc.stdout)["problems"]]
    assert kinds == ["name"]
