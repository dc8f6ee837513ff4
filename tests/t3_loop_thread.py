"""What the handlers must not do on the event loop's thread, in process as
in t3_ops.py: raise out of a handler that has no reply (FORGET: it would
end pyfuse3's main loop), or wait for a disk (fsync)."""

from __future__ import annotations

import errno
import logging
import os
import threading

import pyfuse3
import pytest

from cryptfs.fs.inodes import ROOT_INODE
from cryptfs.names.filenames import DIRIV_NAME
from tests.helpers.ops import CTX, create, lookup


async def test_a_bug_in_forget_is_logged_not_raised(fs, monkeypatch, caplog):
    ino = await create(fs, ROOT_INODE, b"f")

    def bug(ino):
        return {}[ino]

    monkeypatch.setattr(fs.handles, "forget", bug)  # runs when the inode is dropped
    with caplog.at_level(logging.ERROR):
        await fs.forget([(ino, 1)])
    assert "internal error in forget" in caplog.text and "KeyError" in caplog.text
    monkeypatch.undo()
    assert await lookup(fs, ROOT_INODE, b"f") != 0  # the mount goes on


def record_fsyncs(monkeypatch) -> list[bool]:
    """Record, for every os.fsync from now on, whether it ran on this
    (the event loop's) thread; each still syncs."""
    loop_thread, on_loop = threading.get_ident(), []
    real = os.fsync

    def fsync(fd):
        on_loop.append(threading.get_ident() == loop_thread)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return on_loop


async def test_mkdir_syncs_the_new_iv_off_the_event_loop(fs, monkeypatch, tmp_path):
    on_loop = record_fsyncs(monkeypatch)
    d = (await fs.mkdir(ROOT_INODE, b"d", 0o755, CTX)).st_ino
    assert on_loop and not any(on_loop)
    await create(fs, d, b"inside")  # the IV is in place: names in it work
    assert await lookup(fs, d, b"inside") != 0


async def test_mkdir_whose_iv_cannot_be_synced_leaves_nothing(fs, monkeypatch, tmp_path):
    def failing(fd):
        raise OSError(errno.EIO, "fsync failed")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.mkdir(ROOT_INODE, b"d", 0o755, CTX)
    assert info.value.errno == errno.EIO
    monkeypatch.undo()
    cipher = tmp_path / "cipher"
    assert not [p for p in cipher.iterdir() if p.is_dir()]
    attr = await fs.lookup(ROOT_INODE, b"d", CTX)
    assert attr.st_ino == 0
    assert DIRIV_NAME in os.listdir(cipher)  # the root's own IV is untouched
