"""Authenticated mode through a real mount, on both engines: every kind of
tampering with a backing file (or a write torn by a crash) reads as EIO for
that file only, and ``cryptfs fsck`` reports each with its kind."""

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
}
LOGGED = ("does not match the file size", "failed its tag check", "overwritten with zeros",
          "has no tag")


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

    def make(name: str, data: bytes, at: int = 0) -> None:
        before = set(cipher.iterdir())
        with open(mount.mountpoint / name, "wb") as f:
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


def test_other_files_and_writes_unaffected(tampered):
    mount, _ = tampered
    assert len((mount.mountpoint / "healthy").read_bytes()) == 300 * P
    data = os.urandom(600 * P + 5)
    (mount.mountpoint / "new").write_bytes(data)
    assert (mount.mountpoint / "new").read_bytes() == data
    assert sorted(os.listdir(mount.mountpoint)) == sorted([*EXPECTED, "healthy", "new"])


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
