"""Byte-range locks (``ContentCodec(byte_range_locks=True)``, shared
mounts): two mounters writing one backing file, each its own half of every
page, lose nothing and never see a torn page; the locks themselves (ranges,
order, read locks shared by threads) on real files with real fcntl locks."""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import threading

import pytest

from cryptfs.engines.base import PAGE_SIZE
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.lowlevel import rangelock
from cryptfs.lowlevel.rangelock import SharedReads, covers, merged
from tests.helpers import two_writers

P = PAGE_SIZE
ROUNDS, MAX_PAGES = 12, 10


@pytest.fixture
def path(tmp_path):
    return tmp_path / "backing"


def test_merged_and_covers():
    assert merged([(50, 60), (0, 10), (10, 20), (55, None), (30, 30)]) == [(0, 20), (50, None)]
    assert covers([(0, 20), (50, None)], [(5, 15), (60, 70), (1 << 62, None)])
    assert not covers([(0, 20), (50, None)], [(15, 25)])
    assert not covers([(0, 20)], [(10, None)])


def _locked(path, start, end, kind=fcntl.F_WRLCK) -> int:
    """The conflicting lock type another open file description sees."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return rangelock.holder(fd, start, end, kind)
    finally:
        os.close(fd)


def test_ofd_locks_exclude_another_descriptor_of_the_same_process(path):
    path.write_bytes(bytes(3 * P))
    fd = os.open(path, os.O_RDWR)
    try:
        with rangelock.exclusive(fd, [(2 * P, None), (0, 100)]):
            assert _locked(path, 0, 50) == fcntl.F_WRLCK
            assert _locked(path, 100, 2 * P) == fcntl.F_UNLCK
            assert _locked(path, 1 << 40, None) == fcntl.F_WRLCK  # to EOF and beyond
        assert _locked(path, 0, None) == fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_a_failed_lock_leaves_nothing_locked(path):
    """A lock refused half-way (here: a negative range) releases the ranges
    already taken, and says so as a RangeLockError."""
    path.write_bytes(bytes(P))
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(rangelock.RangeLockError):
            rangelock.acquire(fd, [(0, 10), (-5, None)])
        assert _locked(path, 0, None) == fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_shared_reads_keep_an_overlap_another_thread_still_reads(path):
    """Locks of one open file description merge: a reader finishing must
    not unlock the bytes another thread is still reading."""
    path.write_bytes(bytes(P))
    fd = os.open(path, os.O_RDWR)
    reads = SharedReads(fd)
    try:
        with reads.hold([(100, 300)]):
            with reads.hold([(0, 200)]):
                assert _locked(path, 0, 300) == fcntl.F_RDLCK
            assert _locked(path, 0, 100) == fcntl.F_UNLCK
            assert _locked(path, 100, 300) == fcntl.F_RDLCK
            assert _locked(path, 100, 300, fcntl.F_RDLCK) == fcntl.F_UNLCK  # readers share
        assert _locked(path, 0, None) == fcntl.F_UNLCK
    finally:
        os.close(fd)


@pytest.mark.parametrize("authenticated", [False, True], ids=["default", "authenticated"])
def test_a_writer_waits_for_a_reader_of_its_page(path, authenticated):
    """A write of a page another descriptor is reading waits for the read
    to end (the read lock is held across the read)."""
    keys = KeyRing(secrets.token_bytes(32))
    path.write_bytes(b"")
    fds = [os.open(path, os.O_RDWR) for _ in range(2)]
    try:
        with two_writers.codec(keys, authenticated, True) as c0, \
                two_writers.codec(keys, authenticated, True) as c1:
            writer, reader = c0.open(fds[0]), c1.open(fds[1])
            writer.write(0, b"a" * (3 * P))
            done = threading.Event()
            with reader._reads.hold(reader._read_ranges(P, 10)):
                t = threading.Thread(target=lambda: (writer.write(P + 5, b"b"), done.set()))
                t.start()
                assert not done.wait(0.2)  # blocked while the read lock is held
            t.join()
            assert reader.read(P, 10) == b"aaaaab" + b"a" * 4
    finally:
        for fd in fds:
            os.close(fd)


MODES = pytest.mark.parametrize("authenticated", [False, True], ids=["default", "authenticated"])
RACES = {  # name: (rounds, pages per round (from, to), header written before the race)
    "pages": (12, (1, 10), True),
    "first-header": (1, (0, 2), False),
    "small": (12, (0, 3), False),  # partial first pages, shrinks within them
    "tag-pages": (3, (250, 262), True),  # authenticated: tags past the header page
}


def _damaged_without_locks(path, keys, authenticated, rounds, pages, header_first) -> bool:
    """Whether the same race without locks damages the file within a few
    tries (it does in nearly every try: the test would be vacuous if not)."""
    return any(two_writers.run(path, keys, authenticated, False, rounds, pages, seed,
                               header_first)
               for seed in range(100, 110))


@MODES
@pytest.mark.parametrize("race", RACES)
def test_two_writers_keep_both_halves_of_every_page(path, authenticated, race):
    """Both halves of every page survive (and every page decrypts, tags
    valid); the first header is written once.  Without the locks the same
    race loses bytes, tears pages or writes two headers."""
    rounds, pages, header_first = RACES[race]
    keys = KeyRing(secrets.token_bytes(32))
    for seed in range(3):
        problems = two_writers.run(path, keys, authenticated, True, rounds, pages, seed,
                                   header_first)
        assert problems == [], f"seed {seed}: {problems[:5]}"
    assert _damaged_without_locks(path, keys, authenticated, rounds, pages, header_first)


@MODES
def test_a_refused_lock_fails_the_write_and_changes_nothing(path, authenticated, caplog):
    """A lock the kernel refuses (here: a write lock through a read-only
    descriptor, EBADF; ENOLCK from a lock service goes the same way) fails
    the write with that errno and a logged error; nothing is written
    unlocked and nothing stays locked."""
    keys = KeyRing(secrets.token_bytes(32))
    path.write_bytes(b"")
    rw = os.open(path, os.O_RDWR)
    ro = os.open(path, os.O_RDONLY)
    try:
        with two_writers.codec(keys, authenticated, True) as c:
            c.open(rw).write(0, b"x" * (P + 10))
            before = path.read_bytes()
            f = c.open(ro)
            with pytest.raises(rangelock.RangeLockError) as refused:
                f.write(5, b"y")
            assert refused.value.errno == errno.EBADF
            with pytest.raises(rangelock.RangeLockError):
                f.truncate(3)
            assert path.read_bytes() == before
            assert "refused rather than done without the lock" in caplog.text
            assert _locked(path, 0, None) == fcntl.F_UNLCK
            assert c.open(rw).read(0, 2 * P) == b"x" * (P + 10)
    finally:
        os.close(rw)
        os.close(ro)


def test_stat_waits_for_a_size_change_in_progress(path):
    """``EncryptedFile.stat`` never returns a size another mounter is
    changing: every size change holds its range to EOF."""
    keys = KeyRing(secrets.token_bytes(32))
    path.write_bytes(b"")
    fds = [os.open(path, os.O_RDWR) for _ in range(2)]
    try:
        with two_writers.codec(keys, False, True) as c:
            f = c.open(fds[0])
            f.write(0, b"z" * 10)
            seen: list[int] = []
            with rangelock.exclusive(fds[1], [(P, None)]):  # as a growing write holds
                t = threading.Thread(target=lambda: seen.append(f.stat().st_size))
                t.start()
                os.ftruncate(fds[1], 5 * P + 1)  # the size in mid-change
                t.join(0.2)
                assert seen == []  # still waiting
                os.ftruncate(fds[1], 5 * P + 16)
            t.join()
            assert seen == [5 * P + 16]
    finally:
        for fd in fds:
            os.close(fd)
