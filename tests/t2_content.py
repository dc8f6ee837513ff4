"""The content format and codec, on both engines: sizes, read-modify-write
at every boundary, holes and sparse files, and damaged backing files."""

from __future__ import annotations

import errno
import os
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cryptfs.content.codec import ContentCodec, in_memory_filesystem, page_cached
from cryptfs.content.format import (
    HEADER_SIZE,
    TRAILER_SIZE,
    FileHeader,
    backing_size,
    plaintext_size,
)
from cryptfs.content.sessions import SessionCache
from cryptfs.engines.base import PAGE_SIZE
from cryptfs.errors import (
    BackingSizeError,
    HeaderAuthError,
    HeaderCorruptError,
    HeaderVersionError,
    TrailerError,
)
from cryptfs.keys.hierarchy import KeyRing
from tests.conftest import small_tmpfs
from tests.helpers.content_model import MODEL_SETTINGS, check_against_model, dense_copy_reads

P = PAGE_SIZE
EDGE_SIZES = [0, 1, 15, 16, 17, P - 17, P - 16, P - 1, P, P + 1, P + 15, P + 16,
              2 * P - 1, 2 * P, 2 * P + 1, 16 * P, 16 * P + 1, 17 * P + 4090]


# --- pure format ----------------------------------------------------------------


@pytest.mark.parametrize(("size", "stored"), [
    (0, HEADER_SIZE), (1, HEADER_SIZE + 17), (15, HEADER_SIZE + 31), (P, 2 * P + 16),
    (P + 1, 2 * P + 17), (5000, HEADER_SIZE + 5016), (5 << 30, HEADER_SIZE + (5 << 30) + 16),
])
def test_size_table(size, stored):
    assert backing_size(size) == stored
    assert plaintext_size(stored) == size


@pytest.mark.parametrize("bad", [1, 100, HEADER_SIZE - 1, HEADER_SIZE + 1, HEADER_SIZE + 16])
def test_impossible_backing_sizes(bad):
    with pytest.raises(BackingSizeError):
        plaintext_size(bad)


def test_header_round_trip_and_damage(keys):
    header = FileHeader(secrets.token_bytes(16))
    raw = header.encode(keys.header_key)
    assert len(raw) == HEADER_SIZE and FileHeader.decode(raw, keys.header_key) == header
    cases = {
        HeaderCorruptError: [raw[:100], b"X" + raw[1:], raw[:-1] + b"\x01",
                             raw[:11] + b"\x01" + raw[12:]],
        HeaderVersionError: [raw[:9] + b"\x02" + raw[10:]],
        HeaderAuthError: [raw[:20] + bytes([raw[20] ^ 1]) + raw[21:],
                          raw[:40] + bytes([raw[40] ^ 1]) + raw[41:]],
    }
    for error, variants in cases.items():
        for variant in variants:
            with pytest.raises(error):
                FileHeader.decode(variant, keys.header_key)
    with pytest.raises(HeaderAuthError, match="another cipher directory"):
        FileHeader.decode(raw, KeyRing(secrets.token_bytes(32)).header_key)


# --- the codec on every engine ---------------------------------------------------------


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_write_read_every_edge_size(codec, backing, size):
    data = secrets.token_bytes(size)
    f = codec.open(backing)
    f.write(0, data)
    assert os.fstat(backing).st_size == (backing_size(size) if size else 0)
    assert f.size() == size
    reopened = codec.open(backing)
    assert reopened.read(0, size + 10) == data
    for offset in {0, 1, size // 2, max(size - 1, 0), P - 1, P, P + 1}:
        assert reopened.read(offset, 5000) == data[offset:offset + 5000]


def test_empty_file_with_and_without_header(codec, backing):
    f = codec.open(backing)
    assert f.size() == 0 and f.read(0, 100) == b""
    f.write(0, b"x")
    f.truncate(0)
    assert os.fstat(backing).st_size == HEADER_SIZE
    assert codec.open(backing).read(0, 10) == b""


def test_truncate_grows_with_holes_and_shrinks(codec, backing):
    f = codec.open(backing)
    f.write(0, b"a" * (P + 5))
    f.truncate(3 * P + 7)  # old final page retired, new final unit is a hole
    assert f.read(0, 10 * P) == b"a" * (P + 5) + bytes(2 * P + 2)
    f.truncate(P + 2)
    assert f.read(0, 10 * P) == b"a" * (P + 2)
    f.truncate(P)  # a full final page still carries the trailer
    assert os.fstat(backing).st_size == backing_size(P)
    assert codec.open(backing).read(0, 10 * P) == b"a" * P


def test_final_page_trailer_spill_is_cleared(codec, backing):
    """A full final page's trailer spills 16 bytes into the next page; when
    the file grows past it with a hole, that page must still read as zeros."""
    f = codec.open(backing)
    f.write(0, b"b" * P)
    f.write(3 * P, b"c")
    assert f.read(0, 4 * P) == b"b" * P + bytes(2 * P) + b"c"
    g = codec.open(backing)
    g.truncate(P)
    g.truncate(2 * P + 3)
    assert g.read(0, 4 * P) == b"b" * P + bytes(P + 3)


@pytest.mark.parametrize(("size", "offset"), [
    (0, 0),  # a new file: header and pages in one write
    (0, 3 * P),  # a new file written past a hole
    (2 * P, 2 * P),  # page-aligned append: the old trailer spilled into the next unit
    (P + 100, 4 * P),  # past a hole after a partial final page
])
def test_full_disk_append_leaves_the_file_as_it_was(codec, tmp_path, size, offset):
    """A full disk fails an appending write (a new file's first, whose
    header goes out with its pages; past a hole; page-aligned, over the old
    trailer's spill) before the file changes: it reads as before, and takes
    the write once there is room."""
    with small_tmpfs(tmp_path / "small", "1m") as small:
        fd = os.open(small / "f", os.O_RDWR | os.O_CREAT, 0o600)
        filler = os.open(small / "filler", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            data = secrets.token_bytes(size)
            f = codec.open(fd)
            f.write(0, data)
            os.posix_fallocate(filler, 0, (os.statvfs(small).f_bavail - 3) * P)
            with pytest.raises(OSError) as info:
                f.write(offset, secrets.token_bytes(8 * P))  # 3 pages fit, not 8
            assert info.value.errno == errno.ENOSPC
            assert f.size() == size
            assert f.read(0, 16 * P) == codec.open(fd).read(0, 16 * P) == data
            os.ftruncate(filler, 0)
            more = secrets.token_bytes(8 * P)
            f.write(offset, more)
            expected = data.ljust(offset, b"\0") + more
            assert f.read(0, 16 * P) == codec.open(fd).read(0, 16 * P) == expected
        finally:
            os.close(fd)
            os.close(filler)


def test_new_file_whose_header_finds_no_room_stays_empty(codec, tmp_path):
    """A new file's header goes out with its first pages, after only the
    pages were reserved: with room for exactly those, the write fails with
    ENOSPC and leaves the file empty (not a file without its header)."""
    with small_tmpfs(tmp_path / "small", "1m") as small:
        fd = os.open(small / "f", os.O_RDWR | os.O_CREAT, 0o600)
        filler = os.open(small / "filler", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            f = codec.open(fd)
            data = secrets.token_bytes(8 * P)  # 8 pages and a trailer: 9 units
            os.posix_fallocate(filler, 0, (os.statvfs(small).f_bavail - 9) * P)
            with pytest.raises(OSError) as info:
                f.write(0, data)
            assert info.value.errno == errno.ENOSPC
            assert os.fstat(fd).st_size == 0 and f.size() == 0 and f.header is None
            os.ftruncate(filler, 0)
            f.write(0, data)
            assert f.read(0, 9 * P) == codec.open(fd).read(0, 9 * P) == data
        finally:
            os.close(fd)
            os.close(filler)


def test_sparse_file_beyond_4_gib(codec, backing):
    far = (5 << 30) + 12345
    f = codec.open(backing)
    f.write(far, b"end of a big file")
    f.write(10, b"start")
    assert f.size() == far + 17
    st = os.fstat(backing)
    assert st.st_size == backing_size(far + 17)
    assert st.st_blocks * 512 < 1 << 20  # still sparse
    assert f.read(far - 3, 100) == bytes(3) + b"end of a big file"
    assert f.read(0, 20) == bytes(10) + b"start" + bytes(5)
    assert f.read(1 << 32, 8) == bytes(8)  # a hole in the middle


def test_non_sparse_copy_reads_the_same(codec, backing, tmp_path):
    """A copy tool that writes holes out as zeros (rsync without -S) must not
    change what the file reads as: zero units are holes on every engine."""
    f = codec.open(backing)
    f.write(0, b"x" * 100)
    f.write(5 * P + 3, b"y" * 100)
    assert dense_copy_reads(codec, backing, tmp_path, 10 * P) == f.read(0, 10 * P)


# --- damaged backing files ---------------------------------------------------------------


def test_truncated_or_damaged_final_page(codec, backing):
    f = codec.open(backing)
    f.write(0, secrets.token_bytes(3 * P + 100))
    size = os.fstat(backing).st_size
    os.ftruncate(backing, size - 1)  # one byte lost at the end
    with pytest.raises(TrailerError):
        codec.open(backing).read(3 * P, 200)
    assert len(codec.open(backing).read(0, 3 * P)) == 3 * P  # earlier pages still read
    f.write(0, secrets.token_bytes(3 * P + 100))
    # XTS works per AES block: only damage to the final two blocks (those
    # entangled with the trailer by ciphertext stealing) is detectable.
    os.pwrite(backing, b"\x00\x01", size - 20)
    with pytest.raises(TrailerError):
        codec.open(backing).read(0, 4 * P)
    with pytest.raises(TrailerError):  # a write that must re-read it refuses too
        codec.open(backing).write(3 * P + 5, b"z")


@pytest.mark.parametrize("r", [1, 8, 15, 16, 17, 904, 4080, 4095, 4096])
def test_which_bytes_of_a_final_unit_are_checked(engine, backing, r):
    """docs/format.md §4.4: damage to a final unit of ``r + 16`` bytes is
    caught only in its last ``16 + r mod 16`` bytes: the trailer block, and
    with ciphertext stealing (``r`` not a multiple of 16) the stolen partial
    block too; every other byte decrypts on its own, garbled, unnoticed.
    (Fixed keys, file ID and plaintext: a flip in the partial block misses
    the check with probability 2^-8(16 - r mod 16); pinned, not left to
    chance.)"""
    keys = KeyRing(bytes(range(32)))
    sessions = SessionCache(engine, keys)
    try:
        codec = ContentCodec(keys, sessions)
        codec.new_header = lambda: FileHeader(bytes(range(16, 32)))
        codec.open(backing).write(0, (bytes(range(256)) * 33)[:P + r])
        unit = 2 * P  # page 1, the final page: r + 16 bytes
        detected = set()
        for at in range(r + TRAILER_SIZE):
            (byte,) = os.pread(backing, 1, unit + at)
            os.pwrite(backing, bytes([byte ^ 0x80]), unit + at)
            try:
                codec.open(backing).read(P, r)
            except TrailerError:
                detected.add(at)
            os.pwrite(backing, bytes([byte]), unit + at)
        checked = TRAILER_SIZE + r % 16
        assert detected == set(range(r + TRAILER_SIZE - checked, r + TRAILER_SIZE))
    finally:
        sessions.close()


@pytest.mark.parametrize("stored", [1, HEADER_SIZE - 1, HEADER_SIZE + 10])
def test_impossible_size_is_an_error(codec, backing, stored):
    codec.open(backing).write(0, b"x" * 100)
    os.ftruncate(backing, stored)
    with pytest.raises((BackingSizeError, HeaderCorruptError)):
        codec.open(backing).read(0, 100)


def test_foreign_file_is_refused(engine, backing, tmp_path):
    from cryptfs.content.codec import ContentCodec
    from cryptfs.content.sessions import SessionCache

    mine, theirs = KeyRing(secrets.token_bytes(32)), KeyRing(secrets.token_bytes(32))
    my_sessions, their_sessions = SessionCache(engine, mine), SessionCache(engine, theirs)
    try:
        ContentCodec(theirs, their_sessions).open(backing).write(0, b"secret")
        with pytest.raises(HeaderAuthError):
            ContentCodec(mine, my_sessions).open(backing)
        os.pwrite(backing, b"garbage!", 0)
        with pytest.raises(HeaderCorruptError):
            ContentCodec(theirs, their_sessions).open(backing)
    finally:
        my_sessions.close()
        their_sessions.close()


# --- model-based: random writes and truncates against a bytearray ----------------------------

offsets = st.one_of(st.integers(0, 6 * P), st.sampled_from([0, P - 1, P, P + 1, 2 * P - 16]))
ops = st.lists(st.one_of(
    st.tuples(st.just("write"), offsets, st.integers(1, 3 * P)),
    st.tuples(st.just("truncate"), offsets, st.just(0)),
), min_size=1, max_size=12)


@MODEL_SETTINGS
@given(ops=ops, seed=st.integers(0, 255))
def test_random_operations_match_a_model(codec, tmp_path, ops, seed):
    check_against_model(codec, tmp_path, ops, seed)


def test_page_cached_tells_memory_from_disk(tmp_path):
    """The probe that decides whether a request may run on the event loop:
    a page evicted from the page cache would wait for the disk; tmpfs never does."""
    path = tmp_path / "f"
    path.write_bytes(secrets.token_bytes(8 * PAGE_SIZE))
    fd = os.open(path, os.O_RDONLY)
    try:
        memory = in_memory_filesystem(fd)
        state = page_cached(fd, 4 * PAGE_SIZE)
        if memory:  # tmpfs here: RWF_NOWAIT unsupported or always cached
            assert state in (None, True)
            return
        assert state is True  # just written: in the page cache
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert page_cached(fd, 4 * PAGE_SIZE) is False
        os.pread(fd, PAGE_SIZE, 4 * PAGE_SIZE)
        assert page_cached(fd, 4 * PAGE_SIZE) is True
        assert page_cached(fd, 100 * PAGE_SIZE) is True  # past the end: nothing to wait for
    finally:
        os.close(fd)


def test_tmpfs_counts_as_memory(tmp_path):
    with small_tmpfs(tmp_path / "tmpfs", "1m") as mnt:
        fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            assert in_memory_filesystem(fd)
        finally:
            os.close(fd)
