"""Authenticated mode (docs/format.md §4.6), on both engines: where tags and
pages live, the size arithmetic, the codec against a model, and every kind
of tampering refused with its kind before any plaintext is returned."""

from __future__ import annotations

import errno
import os
import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cryptfs.content import tags
from cryptfs.content.codec import ContentCodec
from cryptfs.content.format import HEADER_SIZE
from cryptfs.content.sessions import SessionCache
from cryptfs.engines.base import PAGE_SIZE
from cryptfs.errors import BackingSizeError, HeaderCorruptError, PageTagError
from tests.conftest import small_tmpfs
from tests.helpers.content_model import MODEL_SETTINGS, check_against_model, dense_copy_reads

P = PAGE_SIZE
G = 252  # pages whose tags are in the header page


@pytest.fixture
def auth(engine, keys):
    sessions = SessionCache(engine, keys)
    yield ContentCodec(keys, sessions, authenticated=True)
    sessions.close()


# --- pure layout --------------------------------------------------------------------


@pytest.mark.parametrize(("size", "stored"), [
    (0, HEADER_SIZE), (1, 4113), (5000, 9112), (G * P, G * P + 4112),
    (G * P + 1, G * P + 1 + 4112 + P), (508 * P, 508 * P + 4112 + P),
    (508 * P + 1, 508 * P + 1 + 4112 + 2 * P), (5 << 30, (5 << 30) + 4112 + 5120 * P),
])
def test_size_table(size, stored):
    assert tags.backing_size(size) == stored
    assert tags.plaintext_size(stored) == size


def test_every_backing_size_decodes_or_is_refused():
    """Sizes round trip, and exactly those that would end inside a tag page
    (or before the first unit) are refused."""
    for stored in range(1, 1100 * P, 13):
        inside_tag_page = any((k * 257 - 5) * P < stored - 4112 <= (k * 257 - 4) * P
                              for k in (1, 2, 3, 4))
        if stored < 4113 and stored != HEADER_SIZE or inside_tag_page:
            with pytest.raises(BackingSizeError):
                tags.plaintext_size(stored)
        else:
            assert tags.backing_size(tags.plaintext_size(stored)) == stored


@pytest.mark.parametrize(("page", "unit", "tag"), [
    (0, P, 64), (1, 2 * P, 80), (251, 252 * P, 4080), (252, 254 * P, 253 * P),
    (507, 509 * P, 253 * P + 4080), (508, 511 * P, 510 * P), (764, 768 * P, 767 * P),
])
def test_offsets(page, unit, tag):
    assert tags.unit_offset(page) == unit and tags.tag_offset(page) == tag


def test_segments_follow_tag_pages():
    assert list(tags.segments(250, 510)) == [(250, 251), (252, 507), (508, 510)]
    assert list(tags.segments(3, 3)) == [(3, 3)]


# --- the codec -----------------------------------------------------------------------

EDGE_SIZES = [1, 15, 16, 17, P, P + 1, G * P - 1, G * P, G * P + 1, G * P + 16,
              (G + 1) * P, 508 * P, 508 * P + 17]


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_write_read_every_edge_size(auth, backing, size):
    data = secrets.token_bytes(size)
    f = auth.open(backing)
    f.write(0, data)
    assert os.fstat(backing).st_size == tags.backing_size(size) and f.size() == size
    reopened = auth.open(backing)
    assert reopened.read(0, size + 10) == data
    for offset in {0, size // 2, max(size - 1, 0), G * P - 1, G * P, G * P + 1}:
        assert reopened.read(offset, 3 * P) == data[offset:offset + 3 * P]
    assert reopened.bad_pages(size) == []


big_offsets = st.one_of(st.integers(0, 260 * P), st.sampled_from(
    [0, P - 1, P, (G - 1) * P, G * P - 16, G * P - 1, G * P, G * P + 1, 253 * P]))
big_ops = st.lists(st.one_of(
    st.tuples(st.just("write"), big_offsets, st.integers(1, 3 * P)),
    st.tuples(st.just("truncate"), big_offsets, st.just(0)),
), min_size=1, max_size=10)


@MODEL_SETTINGS
@given(ops=big_ops, seed=st.integers(0, 255))
def test_random_operations_match_a_model(auth, tmp_path, ops, seed):
    check_against_model(auth, tmp_path, ops, seed)


def test_holes_are_tagged_and_survive_a_dense_copy(auth, backing, tmp_path):
    f = auth.open(backing)
    f.write(0, b"x" * 100)
    f.write(300 * P + 3, b"y" * 100)  # holes in the header's group and in the next
    f.truncate(320 * P)  # and a hole as the new final page
    expected = b"x" * 100 + bytes(300 * P - 97) + b"y" * 100 + bytes(20 * P - 103)
    assert f.read(0, 400 * P) == expected
    assert os.fstat(backing).st_blocks * 512 < 64 * P  # the data pages stay sparse
    assert dense_copy_reads(auth, backing, tmp_path, 400 * P) == expected


def test_shrinking_clears_the_removed_pages_tags(auth, backing):
    f = auth.open(backing)
    f.write(0, secrets.token_bytes(10 * P))
    f.truncate(3 * P + 5)
    assert os.pread(backing, 7 * 16, tags.tag_offset(4)) == bytes(7 * 16)
    f.truncate(0)
    assert os.pread(backing, P, 0)[64:] == bytes(P - 64)


def test_modes_refuse_each_others_files(engine, keys, backing):
    sessions = SessionCache(engine, keys)
    try:
        ContentCodec(keys, sessions).open(backing).write(0, b"default mode")
        with pytest.raises(HeaderCorruptError, match="mode"):
            ContentCodec(keys, sessions, authenticated=True).open(backing)
        os.ftruncate(backing, 0)
        ContentCodec(keys, sessions, authenticated=True).open(backing).write(0, b"tagged")
        with pytest.raises(HeaderCorruptError, match="mode"):
            ContentCodec(keys, sessions).open(backing)
    finally:
        sessions.close()


# --- tampering: every kind is refused, and fsck's classification ------------------------


def written(auth, fd, data: bytes):
    auth.open(fd).write(0, data)
    return data


def refused(auth, fd, kind: str | None = None, offset: int = 0, length: int = 1 << 30):
    """Reading fails with PageTagError (of ``kind``); fsck's scan agrees."""
    f = auth.open(fd)
    with pytest.raises(PageTagError) as info:
        f.read(offset, length)
    if kind is not None:
        assert info.value.kind == kind
    return {bad.page: bad.kind for bad in f.bad_pages(f.size())}


def test_appended_zeros(auth, backing):
    data = written(auth, backing, secrets.token_bytes(5000))
    os.pwrite(backing, bytes(P), os.fstat(backing).st_size)  # a 5000-byte file grows
    assert refused(auth, backing) == {1: "page-tag", 2: "final-page"}
    assert auth.open(backing).read(0, P) == data[:P]  # untouched pages still read


def test_extension_into_a_new_tag_page(auth, backing):
    written(auth, backing, secrets.token_bytes(G * P))
    os.ftruncate(backing, os.fstat(backing).st_size + 2 * P)  # past the next tag page
    assert refused(auth, backing) == {G - 1: "page-tag", G: "final-page"}


def test_truncation_into_a_hole(auth, backing):
    f = auth.open(backing)
    f.write(0, b"a" * 100)
    f.write(10 * P, b"b" * 100)
    os.ftruncate(backing, tags.backing_size(5 * P + 7))  # now ends inside the hole
    assert refused(auth, backing, "final-page") == {5: "final-page"}


@pytest.mark.parametrize("cut", [16, 32, P])
def test_truncation_at_a_16_byte_boundary(auth, backing, cut):
    """The trailer check of the default mode misses this when the lost
    plaintext was zero; the final page's tag binds the size."""
    written(auth, backing, secrets.token_bytes(3 * P) + bytes(P + 64))
    os.ftruncate(backing, os.fstat(backing).st_size - cut)
    assert refused(auth, backing, "final-page") == {auth.open(backing).size() // P:
                                                    "final-page"}


@pytest.mark.parametrize("size", [1, P, G * P + 1])
def test_truncation_to_the_header(auth, backing, size):
    """A backing file cut to its header page has no final page whose tag
    could show it, but its header still holds the tags of the lost pages
    (page 0's at least): refused when opened.  Cut to 0 bytes, nothing is
    left to show it: an empty file that was never written (format.md §4.6)."""
    written(auth, backing, secrets.token_bytes(size))
    os.ftruncate(backing, HEADER_SIZE)
    with pytest.raises(PageTagError, match="cut to its header") as info:
        auth.open(backing)
    assert info.value.kind == "truncated"
    os.ftruncate(backing, 0)
    assert auth.open(backing).read(0, P) == b""


@pytest.mark.parametrize("size", [1, P, G * P + 1])
def test_emptied_files_are_not_taken_for_truncated_ones(auth, backing, size):
    """Emptying a file through cryptfs clears its tag slots: it opens, reads
    as empty, and grows again; so does a header written for an attribute."""
    f = auth.open(backing)
    f.ensure_header()
    assert auth.open(backing).size() == 0
    f.write(0, secrets.token_bytes(size))
    f.truncate(0)
    assert os.fstat(backing).st_size == HEADER_SIZE
    g = auth.open(backing)
    assert g.read(0, P) == b"" and g.bad_pages(0) == []
    g.write(5, b"again")
    assert auth.open(backing).read(0, P) == bytes(5) + b"again"


def test_emptying_interrupted_after_clearing_the_tags(auth, backing):
    """Emptying clears the tags before it cuts the file: a crash in between
    leaves pages without tags, which fail to read but still open, so that
    emptying the file again repairs it."""
    written(auth, backing, secrets.token_bytes(3 * P))
    os.pwrite(backing, bytes(P - 64), 64)  # the first step alone reached the disk
    assert refused(auth, backing, "tag-missing") == {0: "tag-missing", 1: "tag-missing",
                                                     2: "final-page"}
    auth.open(backing).truncate(0)
    assert auth.open(backing).read(0, P) == b""


def test_zeroed_final_page(auth, backing):
    written(auth, backing, secrets.token_bytes(2 * P + 500))
    os.pwrite(backing, bytes(516), tags.unit_offset(2))
    assert refused(auth, backing, "final-page") == {2: "final-page"}


def test_zeroed_middle_page_and_zeroed_tag(auth, backing):
    written(auth, backing, secrets.token_bytes(300 * P))
    os.pwrite(backing, bytes(P), tags.unit_offset(7))
    os.pwrite(backing, bytes(16), tags.tag_offset(260))
    assert refused(auth, backing, "page-zeroed") == {7: "page-zeroed", 260: "tag-missing"}
    assert len(auth.open(backing).read(8 * P, 100 * P)) == 100 * P


@pytest.mark.parametrize(("a", "b"), [(1, 2), (3, 300)])
def test_pages_swapped_within_a_file(auth, backing, a, b):
    written(auth, backing, secrets.token_bytes(400 * P))
    first = os.pread(backing, P, tags.unit_offset(a))
    second = os.pread(backing, P, tags.unit_offset(b))
    os.pwrite(backing, second, tags.unit_offset(a))
    os.pwrite(backing, first, tags.unit_offset(b))
    assert refused(auth, backing, "page-tag") == {a: "page-tag", b: "page-tag"}


def test_pages_and_tags_swapped_between_files(auth, tmp_path):
    fds = [os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600) for name in ("a", "b")]
    try:
        for fd in fds:
            written(auth, fd, secrets.token_bytes(4 * P))
        for where, size in ((tags.unit_offset(1), P), (tags.tag_offset(1), 16)):
            mine, theirs = (os.pread(fd, size, where) for fd in fds)
            os.pwrite(fds[0], theirs, where)  # the page and its tag, together
            os.pwrite(fds[1], mine, where)
        for fd in fds:
            assert refused(auth, fd, "page-tag") == {1: "page-tag"}
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("restore", ["data", "tag"])
def test_torn_write_after_a_crash(auth, backing, restore):
    """A crash can leave the new data with the old tag or the reverse: the
    page fails, it is never returned as plaintext (old or new)."""
    written(auth, backing, secrets.token_bytes(3 * P))
    where, size = {"data": (tags.unit_offset(1), P), "tag": (tags.tag_offset(1), 16)}[restore]
    before = os.pread(backing, size, where)
    auth.open(backing).write(P + 10, b"new bytes")
    os.pwrite(backing, before, where)  # only half of the write reached the disk
    assert refused(auth, backing, "page-tag", P, 100) == {1: "page-tag"}


def test_full_disk_fails_before_any_page_or_tag_changes(auth, tmp_path):
    """Data and tag slots are reserved before either is written: with room
    for a new data page but not for the tag page it needs, the write fails
    with ENOSPC and the file still reads as before."""
    with small_tmpfs(tmp_path / "small", "2m") as small:
        fd = os.open(small / "f", os.O_RDWR | os.O_CREAT, 0o600)
        filler = os.open(small / "filler", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            data = secrets.token_bytes(G * P - 100)  # all tags in the header page
            f = auth.open(fd)
            f.write(0, data)
            os.posix_fallocate(filler, 0, (os.statvfs(small).f_bavail - 1) * P)
            with pytest.raises(OSError) as info:
                f.write(G * P, b"needs a tag page")  # one data page fits, its tag page not
            assert info.value.errno == errno.ENOSPC
            assert f.bad_pages(f.size()) == [] and auth.open(fd).read(0, G * P) == data
        finally:
            os.close(fd)
            os.close(filler)
