"""The inode table, without a kernel: hard links share an inode; a reused
backing inode number of a freshly created file does not."""

from __future__ import annotations

import os

from cryptfs.fs.inodes import ROOT_INODE, InodeTable


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
