"""What the default (AES-XTS) content mode does with each kind of tampering
of a backing file, exactly as docs/format.md §4.4 and §7 say: none of these
is detected (no EIO, no fsck report); the plaintext they read back is pinned
here so the documentation cannot drift from the code.  (Symlink targets and
xattrs, which are authenticated, are in t5_bound_metadata.py.)"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.conftest import Mount, backing_entry_of, fsck_problems

PAGE = 4096
# On the userspace engine only: what these pin down is the content format
# (trailer check, hole rule), which both engines share; the kernel engine's
# own part (the hole rule while it splices ciphertext) is checked against
# the userspace engine in t2_content, and each mount here costs minutes
# under the kernel VM's emulation.
pytestmark = pytest.mark.parametrize("fresh", ["openssl"], indirect=True)


def write_files(mount: Mount, files: dict[str, bytes]) -> dict[str, Path]:
    """Write ``files`` through a mount; return their backing paths."""
    mount.start()
    try:
        backing = {name: backing_entry_of(mount, lambda n=name, d=data:
                                          (mount.mountpoint / n).write_bytes(d))
                   for name, data in files.items()}
    finally:
        mount.stop()
    return backing


def read_back(mount: Mount, name: str) -> bytes:
    """Read a file through a fresh mount: no error, nothing logged, and
    fsck finds nothing either."""
    mount.start()
    try:
        data = (mount.mountpoint / name).read_bytes()
    finally:
        mount.stop()
    mount.check_log()
    assert fsck_problems(mount) == []
    return data


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_appended_zeros_grow_the_file(fresh):
    """4 KiB of zeros appended to a 5,000-byte file: it reads as 9,096 bytes.
    The old final page decrypts as a full page: right except the two AES
    blocks ciphertext stealing joined (its last 8 bytes), garbage to the
    page end, then the new pages are a hole (zeros).  An old final unit of
    a multiple of 16 bytes (5,008 + 16) reads back whole, trailer and all."""
    data, aligned = os.urandom(5000), os.urandom(5008)
    backing = write_files(fresh, {"f": data, "g": aligned})
    for path in backing.values():
        with open(path, "ab") as f:
            f.write(bytes(PAGE))
    out = read_back(fresh, "f")
    assert len(out) == 9096 == 5000 + PAGE
    assert out[:PAGE + 896] == data[:PAGE + 896]
    assert out[PAGE + 896:5000] != data[PAGE + 896:] and any(out[5000:2 * PAGE])
    assert out[2 * PAGE:] == bytes(9096 - 2 * PAGE)
    out = read_back(fresh, "g")
    assert out[:5008 + 16] == aligned + bytes(16) and any(out[5008 + 16:2 * PAGE])
    assert out[2 * PAGE:] == bytes(len(out) - 2 * PAGE)


def test_appended_zeros_after_a_full_final_page(fresh):
    """An old final unit of exactly 4096 + 16 bytes spilled its trailer into
    the next page.  Zeros appended past that page: the page holding the
    spilled 16 bytes is a full page now and decrypts to garbage (no check);
    the page itself reads back whole."""
    data = os.urandom(PAGE)
    backing = write_files(fresh, {"f": data})["f"]
    with open(backing, "ab") as f:
        f.write(bytes(2 * PAGE))
    out = read_back(fresh, "f")
    assert len(out) == 3 * PAGE and out[:PAGE] == data
    assert any(out[PAGE:PAGE + 16]) and any(out[PAGE + 16:2 * PAGE])  # not its trailer
    assert out[2 * PAGE:] == bytes(PAGE)


@pytest.mark.parametrize("cut", [PAGE, 0])
def test_truncation_to_the_header_or_to_nothing(fresh, cut):
    """A backing file cut to its header page or to 0 bytes is an empty file
    (§4.2), with nothing left to check."""
    backing = write_files(fresh, {"f": os.urandom(5000)})["f"]
    os.truncate(backing, cut)
    assert read_back(fresh, "f") == b""


def test_few_appended_zeros_fail_the_trailer_check(fresh):
    """Zeros that leave the final page where it was land in its unit: EIO."""
    backing = write_files(fresh, {"f": os.urandom(5000)})["f"]
    with open(backing, "ab") as f:
        f.write(bytes(3192))
    fresh.start()
    try:
        with pytest.raises(OSError) as info:
            (fresh.mountpoint / "f").read_bytes()
        assert info.value.errno == errno.EIO
    finally:
        fresh.stop()
    fresh.check_log(allowed=("final page 1 failed its check",))
    assert fsck_problems(fresh) == [("final-page", "/f")]


def test_truncation_into_a_hole(fresh):
    """A sparse file cut inside a hole: the cut lands in zeros, and a final
    unit of zeros is a hole, so the shorter file reads as zeros past its
    first byte."""
    backing = write_files(fresh, {"f": b"a"})["f"]
    fresh.start()
    try:
        with open(fresh.mountpoint / "f", "r+b") as f:
            f.seek(5 * PAGE)
            f.write(b"b")  # pages 1..4 are holes
    finally:
        fresh.stop()
    os.truncate(backing, PAGE + 3 * PAGE + 100)
    assert read_back(fresh, "f") == b"a" + bytes(3 * PAGE + 100 - 16 - 1)


def test_truncation_at_a_16_byte_boundary_over_zero_plaintext(fresh):
    """XTS decrypts a 16-byte-aligned prefix of a unit to the same blocks, so
    a cut where 16 plaintext bytes are zero passes the trailer check."""
    data = os.urandom(PAGE) + bytes(32) + os.urandom(4000)
    backing = write_files(fresh, {"f": data})["f"]
    os.truncate(backing, PAGE + PAGE + 32)
    assert read_back(fresh, "f") == data[:PAGE + 16]


def test_zeroed_final_unit_reads_as_zeros(fresh):
    """The hole rule wins over the trailer check: a final unit overwritten
    with zeros (as a crash can leave it) reads as zeros."""
    data = os.urandom(5000)
    backing = write_files(fresh, {"f": data})["f"]
    patch(backing, 2 * PAGE, bytes(904 + 16))
    assert read_back(fresh, "f") == data[:PAGE] + bytes(904)


def test_zeroed_middle_page_reads_as_zeros(fresh):
    data = os.urandom(3 * PAGE + 10)
    backing = write_files(fresh, {"f": data})["f"]
    patch(backing, 2 * PAGE, bytes(PAGE))  # plaintext page 1
    assert read_back(fresh, "f") == data[:PAGE] + bytes(PAGE) + data[2 * PAGE:]


def test_pages_swapped_within_a_file_read_as_garbage(fresh):
    data = os.urandom(3 * PAGE + 10)
    backing = write_files(fresh, {"f": data})["f"]
    raw = backing.read_bytes()
    patch(backing, PAGE, raw[2 * PAGE:3 * PAGE] + raw[PAGE:2 * PAGE])  # pages 0 and 1
    out = read_back(fresh, "f")
    assert len(out) == len(data) and out[2 * PAGE:] == data[2 * PAGE:]
    for page in (0, 1):  # the tweak is the page index: neither page reads as the other
        got = out[page * PAGE:(page + 1) * PAGE]
        assert got not in (data[:PAGE], data[PAGE:2 * PAGE], bytes(PAGE))


def test_pages_swapped_between_files_read_as_garbage(fresh):
    one, two = os.urandom(2 * PAGE + 10), os.urandom(2 * PAGE + 10)
    backing = write_files(fresh, {"one": one, "two": two})
    page_one = backing["one"].read_bytes()[PAGE:2 * PAGE]
    patch(backing["one"], PAGE, backing["two"].read_bytes()[PAGE:2 * PAGE])
    patch(backing["two"], PAGE, page_one)
    out = read_back(fresh, "one")
    assert out[PAGE:] == one[PAGE:]
    assert out[:PAGE] not in (one[:PAGE], two[:PAGE])  # each file has its own key


def test_rolled_back_page_reads_as_the_old_version(fresh):
    old = os.urandom(2 * PAGE + 10)
    backing = write_files(fresh, {"f": old})["f"]
    saved = backing.read_bytes()[PAGE:2 * PAGE]
    new = os.urandom(len(old))
    fresh.start()
    try:
        (fresh.mountpoint / "f").write_bytes(new)
    finally:
        fresh.stop()
    patch(backing, PAGE, saved)
    assert read_back(fresh, "f") == old[:PAGE] + new[PAGE:]
