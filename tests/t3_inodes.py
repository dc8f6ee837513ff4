"""The inode table, without a kernel: hard links share an inode; a reused
backing inode number of a freshly created file does not; inode numbers are
derived from backing ones, the same after a forget and in another mount."""

from __future__ import annotations

import itertools
import os

from cryptfs.fs.inodes import (
    INO_BITS,
    INO_LIMIT,
    NAMESPACES,
    ROOT_INODE,
    SPILL_START,
    InodeTable,
    device_namespace,
)


def fake_stat(dev: int, ino: int) -> os.stat_result:
    return os.stat_result((0o100644, ino, dev, 1, 0, 0, 0, 0, 0, 0))


def test_hard_links_share_one_inode_and_paths_follow_renames():
    table = InodeTable((1, 2))
    d = table.remember(ROOT_INODE, b"dir", fake_stat(1, 10))
    a = table.remember(d.ino, b"a", fake_stat(1, 100))
    b = table.remember(ROOT_INODE, b"b", fake_stat(1, 100))
    assert a is b and len(a.links) == 2
    table.move((ROOT_INODE, b"dir"), (ROOT_INODE, b"renamed"))
    table.unlink(ROOT_INODE, b"b")
    assert table.path(a.ino) == b"renamed/a"


def test_links_through_adding_and_removing_hard_links():
    """An inode's names as hard links come and go: the same name twice is
    one link, the last name's removal (and only that) reports the inode
    gone, and renames and exchanges carry every name along."""
    gone: list[int] = []
    table = InodeTable((1, 2), on_gone=gone.append)
    a = table.remember(ROOT_INODE, b"a", fake_stat(1, 100))
    assert table.remember(ROOT_INODE, b"a", fake_stat(1, 100)) is a
    assert a.links == {(ROOT_INODE, b"a")}
    table.remember(ROOT_INODE, b"b", fake_stat(1, 100))
    table.remember(ROOT_INODE, b"c", fake_stat(1, 100))
    assert a.links == {(ROOT_INODE, b"a"), (ROOT_INODE, b"b"), (ROOT_INODE, b"c")}
    assert table.link(a.ino) == (ROOT_INODE, b"a")  # the smallest, every time
    table.unlink(ROOT_INODE, b"a")
    table.move((ROOT_INODE, b"c"), (ROOT_INODE, b"d"))
    assert a.links == {(ROOT_INODE, b"b"), (ROOT_INODE, b"d")}
    assert table.link(a.ino) == (ROOT_INODE, b"b")
    other = table.remember(ROOT_INODE, b"e", fake_stat(1, 200))
    table.exchange((ROOT_INODE, b"b"), (ROOT_INODE, b"e"))
    assert a.links == {(ROOT_INODE, b"d"), (ROOT_INODE, b"e")}
    assert other.links == {(ROOT_INODE, b"b")}
    table.unlink(ROOT_INODE, b"d")
    assert gone == [] and table.path(a.ino) == b"e"
    table.unlink(ROOT_INODE, b"e")
    assert gone == [a.ino] and a.links == frozenset()
    try:
        table.link(a.ino)
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("an inode with no name left has a link")
    assert table.find(ROOT_INODE, b"b") is other


def test_reused_backing_inode_number_gets_a_new_inode():
    table = InodeTable((1, 2))
    old = table.remember(ROOT_INODE, b"deleted", fake_stat(1, 100))
    table.unlink(ROOT_INODE, b"deleted")  # gone from the backing fs; the kernel still holds it
    new = table.remember(ROOT_INODE, b"new", fake_stat(1, 100), fresh=True)
    assert new.ino != old.ino
    assert table.path(new.ino) == b"new"
    table.forget(old.ino, 1)  # the late FORGET of the old one must not hurt the new one
    assert table.path(new.ino) == b"new"
    assert table.remember(ROOT_INODE, b"new", fake_stat(1, 100)) is new


# -- numbers: derived from the backing inode, the same after a forget and a remount --

ROOT_DEV = 1


def test_numbers_are_backing_numbers_after_forgets_and_in_a_new_table():
    table = InodeTable((ROOT_DEV, 2))
    first = table.remember(ROOT_INODE, b"f", fake_stat(ROOT_DEV, 16024))
    assert first.ino == 16024
    table.forget(first.ino, 1)
    assert first.ino not in table
    assert table.remember(ROOT_INODE, b"f", fake_stat(ROOT_DEV, 16024)).ino == 16024
    remounted = InodeTable((ROOT_DEV, 2))
    assert remounted.remember(ROOT_INODE, b"f", fake_stat(ROOT_DEV, 16024)).ino == 16024


def colliding_devices() -> tuple[int, int]:
    """Two device numbers with the same namespace (found by search: the
    hash is fixed, so this is the same pair every time)."""
    seen: dict[int, int] = {}
    for dev in itertools.count(2):
        other = seen.setdefault(device_namespace(dev), dev)
        if other != dev:
            return other, dev
    raise AssertionError


def test_other_devices_get_a_namespace_from_their_device_number():
    table = InodeTable((ROOT_DEV, 2))
    here = table.remember(ROOT_INODE, b"a", fake_stat(ROOT_DEV, 5))
    there = table.remember(ROOT_INODE, b"b", fake_stat(77, 5))
    assert here.ino == 5
    assert there.ino == device_namespace(77) << INO_BITS | 5
    assert {device_namespace(dev) for dev in range(1 << 20)} == set(range(1, NAMESPACES))
    assert (NAMESPACES - 1) << INO_BITS | (INO_LIMIT - 1) < SPILL_START  # no overlap
    # Another mount meets the devices in the other order: the same numbers.
    remounted = InodeTable((ROOT_DEV, 2))
    assert remounted.remember(ROOT_INODE, b"b", fake_stat(77, 5)).ino == there.ino
    assert remounted.remember(ROOT_INODE, b"a", fake_stat(ROOT_DEV, 5)).ino == 5


def test_a_namespace_collision_spills_the_second_device():
    first_dev, second_dev = colliding_devices()
    table = InodeTable((ROOT_DEV, 2))
    first = table.remember(ROOT_INODE, b"a", fake_stat(first_dev, 5))
    second = table.remember(ROOT_INODE, b"b", fake_stat(second_dev, 5))
    assert first.ino == device_namespace(first_dev) << INO_BITS | 5
    assert second.ino >= SPILL_START and second.ino != first.ino


def test_numbers_that_cannot_be_derived_spill_and_never_repeat():
    table = InodeTable((ROOT_DEV, 2))
    odd = [table.remember(ROOT_INODE, b"%d" % ino, fake_stat(ROOT_DEV, ino))
           for ino in (0, 1, INO_LIMIT, 1 << 63)]
    numbers = [inode.ino for inode in odd]
    assert all(n >= SPILL_START for n in numbers) and len(set(numbers)) == len(numbers)
    for inode in odd:
        table.forget(inode.ino, 1)
    again = table.remember(ROOT_INODE, b"0", fake_stat(ROOT_DEV, 0))
    assert again.ino >= SPILL_START and again.ino not in numbers


def test_a_reused_number_held_by_the_kernel_spills_and_changes_generation():
    table = InodeTable((ROOT_DEV, 2))
    old = table.remember(ROOT_INODE, b"deleted", fake_stat(ROOT_DEV, 100))
    table.unlink(ROOT_INODE, b"deleted")
    new = table.remember(ROOT_INODE, b"new", fake_stat(ROOT_DEV, 100), fresh=True)
    assert old.ino == 100 and new.ino >= SPILL_START  # never two live inodes on one number
    table.forget(old.ino, 1)
    table.forget(new.ino, 1)
    # Both forgotten: the new file gets its own number; a file handle made
    # for the deleted one must not resolve to it.
    again = table.remember(ROOT_INODE, b"new", fake_stat(ROOT_DEV, 100))
    assert again.ino == 100 and again.generation != old.generation


def test_a_rebacked_symlink_keeps_its_number_while_held():
    table = InodeTable((ROOT_DEV, 2))
    link = table.remember(ROOT_INODE, b"s", fake_stat(ROOT_DEV, 300))
    table.rebacked((ROOT_INODE, b"s"), fake_stat(ROOT_DEV, 301))
    reused = table.remember(ROOT_INODE, b"t", fake_stat(ROOT_DEV, 300), fresh=True)
    assert link.ino == 300 and reused.ino >= SPILL_START
    assert table.remember(ROOT_INODE, b"s", fake_stat(ROOT_DEV, 301)) is link
    table.forget(link.ino, 2)
    assert table.remember(ROOT_INODE, b"s", fake_stat(ROOT_DEV, 301)).ino == 301
