"""Authenticated mode through a real mount, on both engines: every kind of
tampering with a backing file (or a write torn by a crash) reads as EIO for
that file only, and ``cryptfs fsck`` reports each with its kind; files
emptied or shortened through the mount are not taken for tampered ones, and
a backing file cut to 0 bytes (undetectable) reads as empty."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from cryptfs.content.tags import backing_size, tag_offset, unit_offset
from cryptfs.errors import ExitCode
from tests.conftest import (
    MOUNT_ENGINES,
    MOUNT_TIMEOUT,
    Mount,
    cryptfs_cmd,
    init_cipherdir,
    mount_engine_param,
    require_fuse,
)

P = 4096
# What fsck must report for each damaged file (kind, how many pages).
EXPECTED = {
    "appended": {"page-tag": 1, "final-page": 1},  # 4 KiB of zeros appended
    "extended": {"page-tag": 1, "final-page": 1},  # grown past the next tag page
    "cut-into-hole": {"final-page": 1},
    "cut-16": {"final-page": 1},  # the lost 16 bytes were zero plaintext
    "zeroed-final": {"final-page": 1},
    "zeroed-middle": {"page-zeroed": 1},
    "zeroed-tag": {"tag-missing": 1},
    "swapped-within": {"page-moved": 2},
    "swapped-a": {"page-moved": 1},
    "swapped-b": {"page-moved": 1},
    "torn": {"page-tag": 1},
    "cut-to-header": {"truncated": 1},  # backing file cut to its 4096-byte header
}
# Files that must read back without an error and that fsck must not report:
# emptied or shortened through the mount in every way, never written, and
# the one cut that nothing in the file can show (to 0 bytes: an empty file
# that was never written, docs/format.md §4.6).
INTACT = {"emptied-truncate": b"", "emptied-ftruncate": b"", "emptied-otrunc": b"",
          "emptied-regrown": b"x", "one-page": None, "never-written": b"",
          "cut-to-zero": b""}
LOGGED = ("does not match the file size", "failed its tag check", "overwritten with zeros",
          "has no tag", "cut to its header")


def swap(a: Path, a_at: int, b: Path, b_at: int, size: int) -> None:
    with open(a, "r+b") as fa, open(b, "r+b") as fb:
        first, second = os.pread(fa.fileno(), size, a_at), os.pread(fb.fileno(), size, b_at)
        os.pwrite(fa.fileno(), second, a_at)
        os.pwrite(fb.fileno(), first, b_at)


def zero(path: Path, at: int, size: int) -> None:
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), bytes(size), at)


@pytest.fixture(scope="module", params=MOUNT_ENGINES)
def tampered(request, tmp_path_factory):
    """An authenticated cipher directory with one file per kind of damage
    (and a healthy one), damaged while unmounted, then mounted again."""
    require_fuse()
    engine = mount_engine_param(request)
    base = tmp_path_factory.mktemp(f"tamper-{engine}")
    passfile, cipher = base / "password", base / "cipher"
    init_cipherdir(cipher, passfile, "--authenticated")
    mount = Mount(cipher, base / "plain", passfile, engine).start()
    backing: dict[str, Path] = {}

    def make(name: str, data: bytes | None, at: int = 0) -> None:
        before = set(cipher.iterdir())
        with open(mount.mountpoint / name, "wb") as f:
            if data is not None:
                f.write(b"a" * 100)
                f.seek(at)
                f.write(data)
        (backing[name],) = set(cipher.iterdir()) - before

    try:
        make("healthy", os.urandom(300 * P))
        make("appended", os.urandom(5000))
        make("extended", os.urandom(252 * P))
        make("cut-into-hole", b"b" * 100, at=10 * P)
        make("cut-16", os.urandom(3 * P) + bytes(P + 64))
        make("zeroed-final", os.urandom(2 * P + 500))
        for name in ("zeroed-middle", "zeroed-tag", "swapped-within", "swapped-a", "swapped-b",
                     "torn"):
            make(name, os.urandom(300 * P))
        make("cut-to-header", os.urandom(5000))
        make("cut-to-zero", os.urandom(5000))
        make("never-written", None)
        emptied = mount.mountpoint / "emptied-truncate"
        make("emptied-truncate", os.urandom(300 * P))
        os.truncate(emptied, 0)  # by path: no handle open
        make("emptied-ftruncate", None)
        with open(mount.mountpoint / "emptied-ftruncate", "r+b") as f:
            f.write(os.urandom(2 * P))
            f.flush()
            os.fsync(f.fileno())  # on the backing file: not only in the kernel's cache
            os.ftruncate(f.fileno(), 0)  # through the open handle
        make("emptied-otrunc", os.urandom(5000))
        open(mount.mountpoint / "emptied-otrunc", "wb").close()  # O_TRUNC
        make("emptied-regrown", os.urandom(5000))
        with open(mount.mountpoint / "emptied-regrown", "r+b") as f:
            f.truncate(0)
            f.write(b"x")
        make("one-page", os.urandom(300 * P))
        INTACT["one-page"] = (mount.mountpoint / "one-page").read_bytes()[:P]
        os.truncate(mount.mountpoint / "one-page", P)
        torn_before = backing["torn"].read_bytes()
        with open(mount.mountpoint / "torn", "r+b") as f:  # the write a crash tears
            f.seek(P + 10)
            f.write(b"new bytes")
            f.flush()
            os.fsync(f.fileno())
    finally:
        mount.stop()

    with open(backing["appended"], "ab") as f:
        f.write(bytes(P))
    os.truncate(backing["extended"], backing["extended"].stat().st_size + 2 * P)
    os.truncate(backing["cut-into-hole"], backing_size(5 * P + 7))
    os.truncate(backing["cut-16"], backing["cut-16"].stat().st_size - 16)
    zero(backing["zeroed-final"], unit_offset(2), 516)
    zero(backing["zeroed-middle"], unit_offset(7), P)
    zero(backing["zeroed-tag"], tag_offset(260), 16)
    swap(backing["swapped-within"], unit_offset(1), backing["swapped-within"], unit_offset(2), P)
    for at, size in ((unit_offset(260), P), (tag_offset(260), 16)):  # page and tag together
        swap(backing["swapped-a"], at, backing["swapped-b"], at, size)
    with open(backing["torn"], "r+b") as f:  # new tag reached the disk, new data did not
        os.pwrite(f.fileno(), torn_before[unit_offset(1):unit_offset(2)], unit_offset(1))
    os.truncate(backing["cut-to-header"], P)
    os.truncate(backing["cut-to-zero"], 0)

    mount.start()
    try:
        yield mount, backing
    finally:
        mount.stop()
    mount.check_log(allowed=LOGGED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_damaged_file_reads_eio(tampered, name):
    mount, _ = tampered
    with pytest.raises(OSError) as info:
        (mount.mountpoint / name).read_bytes()
    assert info.value.errno == errno.EIO


def test_cut_to_header_is_logged_with_its_backing_path(tampered):
    mount, backing = tampered
    with pytest.raises(OSError) as info:
        open(mount.mountpoint / "cut-to-header", "rb").close()
    assert info.value.errno == errno.EIO
    (line,) = [line for line in mount.log().splitlines() if "cut to its header" in line]
    assert backing["cut-to-header"].name in line


@pytest.mark.parametrize("name", sorted(INTACT))
def test_emptied_and_shortened_files_read_back(tampered, name):
    mount, backing = tampered
    assert (mount.mountpoint / name).read_bytes() == INTACT[name]
    assert backing[name].stat().st_size == (backing_size(len(INTACT[name]))
                                            if name not in ("never-written", "cut-to-zero")
                                            else 0)


def test_other_files_and_writes_unaffected(tampered):
    mount, _ = tampered
    assert len((mount.mountpoint / "healthy").read_bytes()) == 300 * P
    data = os.urandom(600 * P + 5)
    (mount.mountpoint / "new").write_bytes(data)
    assert (mount.mountpoint / "new").read_bytes() == data
    assert sorted(os.listdir(mount.mountpoint)) == sorted([*EXPECTED, *INTACT, "healthy",
                                                           "new"])


def test_fsck_reports_each_kind(tampered):
    mount, _ = tampered
    mount.stop()  # fsck refuses a mounted directory
    try:
        proc = subprocess.run(cryptfs_cmd("fsck", str(mount.cipherdir), "--passfile",
                                          str(mount.passfile), "--json"),
                              capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    finally:
        mount.start()
    assert proc.returncode == ExitCode.FSCK_PROBLEMS, proc.stderr
    found: dict[str, dict[str, int]] = {}
    for problem in json.loads(proc.stdout)["problems"]:
        kinds = found.setdefault(problem["plaintext"].lstrip("/"), {})
        kinds[problem["kind"]] = kinds.get(problem["kind"], 0) + 1
    assert found == EXPECTED


def test_info_names_the_mode(tampered):
    mount, _ = tampered
    out = subprocess.run(cryptfs_cmd("info", str(mount.cipherdir)), capture_output=True,
                         text=True, check=True).stdout
    assert "feature flags:    authenticated" in out and "tag per page" in out
