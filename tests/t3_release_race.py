"""A RELEASE that arrives while another request still uses the open file
(a truncate by path in its worker, a first xattr waiting for the file's
lock), in process as in t3_ops.py.  The worker call is gated: it waits in
its thread until the test lets it go, as a call on a slow disk would.

What must not happen: the descriptor closed under the waiting request, its
number reused by the next open, and the request then truncating, or
stamping a header on, that other file; nor a new open of the same inode
getting a second lock."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from cryptfs.fs.inodes import ROOT_INODE
from cryptfs.fs.ops import Operations
from cryptfs.fs.workers import WorkerPool
from tests.helpers.ops import CTX, changes, create, read_all

WAIT = 30  # seconds: a gate never reached fails the test instead of hanging it


class GatedWorkers:
    """The mount's worker pool, except that the next call of a function
    named ``gated`` waits in its worker thread until ``go`` is set."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        self.gated = ""
        self.arrived = threading.Event()
        self.go = threading.Event()

    async def run(self, fn, *args):
        if self.gated and getattr(fn, "__name__", "") == self.gated:
            self.gated = ""
            return await self._pool.run(self._wait_then, fn, *args)
        return await self._pool.run(fn, *args)

    def _wait_then(self, fn, *args):
        self.arrived.set()
        if not self.go.wait(WAIT):
            raise TimeoutError("the test never opened the gate")
        return fn(*args)

    async def wait_arrived(self) -> None:
        assert await trio.to_thread.run_sync(self.arrived.wait, WAIT), "gated call never came"

    @contextlib.contextmanager
    def opened_at_exit(self) -> Iterator[None]:
        """Open the gate when the block ends, even by a failed assertion
        (the nursery around it waits for the gated call)."""
        try:
            yield
        finally:
            self.go.set()

    def close(self) -> None:
        self._pool.close()


@pytest.fixture
def gate(fs: Operations, monkeypatch) -> GatedWorkers:
    gated = GatedWorkers(fs.workers)
    monkeypatch.setattr(fs, "workers", gated)
    return gated


async def contents(fs: Operations, ino: int) -> bytes | str:
    """The file's contents, or the errno its read failed with."""
    try:
        return await read_all(fs, ino)
    except pyfuse3.FUSEError as exc:
        return errno.errorcode[exc.errno]


def backing(fs: Operations, cipher: Path, ino: int) -> Path:
    return cipher / os.fsdecode(fs.inodes.link(ino)[1])


async def test_truncate_by_path_keeps_its_descriptor_past_the_last_release(fs, gate):
    """truncate(path) waits in its worker; the only handle is released and a
    new file is opened: the truncate still truncates its own file."""
    data_x, data_y = os.urandom(10000), os.urandom(10000)
    x = await create(fs, ROOT_INODE, b"x", data_x)
    fi = await fs.open(x, os.O_RDWR, CTX)
    x_fd = fs.handles.get(fi.fh).fd
    async with trio.open_nursery() as nursery:
        with gate.opened_at_exit():
            gate.gated = "truncate"
            nursery.start_soon(fs.setattr, x, *changes(st_size=5), None, CTX)
            await gate.wait_arrived()
            await fs.release(fi.fh)
            yfi, yattr = await fs.create(ROOT_INODE, b"y", 0o644, os.O_RDWR, CTX)
            y_fd = fs.handles.get(yfi.fh).fd
            assert await fs.write(yfi.fh, 0, data_y) == len(data_y)
    await fs.release(yfi.fh)
    reused = f"y's descriptor {y_fd}, x's {x_fd}"
    assert await contents(fs, yattr.st_ino) == data_y, reused
    assert await contents(fs, x) == data_x[:5], reused
    assert len(fs.handles) == 0 and fs.handles.by_ino(x) is None


async def test_an_open_during_a_truncate_shares_its_lock(fs, gate):
    """The inode opened again while truncate(path) still runs (its first
    handle released meanwhile) gets the same open file, hence the same lock:
    its write waits for the truncate."""
    x = await create(fs, ROOT_INODE, b"x", b"0123456789")
    fi = await fs.open(x, os.O_RDWR, CTX)
    first = fs.handles.get(fi.fh)
    async with trio.open_nursery() as nursery:
        with gate.opened_at_exit():
            gate.gated = "truncate"
            nursery.start_soon(fs.setattr, x, *changes(st_size=4), None, CTX)
            await gate.wait_arrived()
            await fs.release(fi.fh)
            again = await fs.open(x, os.O_RDWR, CTX)
            assert fs.handles.get(again.fh) is first
            assert not first.lock.free(exclusive=True)  # the truncate holds it
    assert await fs.write(again.fh, 4, b"ab") == 2
    await fs.release(again.fh)
    assert await read_all(fs, x) == b"0123ab"


async def test_first_xattr_waiting_for_the_lock_outlasts_the_release(fs, gate, tmp_path):
    """A first xattr of an open, empty file waits for its lock (a truncate
    holds it); the only handle is released and a new empty file opened:
    the header goes on the first file, not on the new one."""
    x = await create(fs, ROOT_INODE, b"x")  # empty: no header yet
    fi = await fs.open(x, os.O_RDWR, CTX)
    x_fd = fs.handles.get(fi.fh).fd
    async with trio.open_nursery() as nursery:
        with gate.opened_at_exit():
            gate.gated = "truncate"
            nursery.start_soon(fs.setattr, x, *changes(st_size=0), None, CTX)
            await gate.wait_arrived()
            nursery.start_soon(fs.setxattr, x, b"user.k", b"x's", CTX)
            await trio.testing.wait_all_tasks_blocked()  # it waits for the lock
            await fs.release(fi.fh)
            yfi, yattr = await fs.create(ROOT_INODE, b"y", 0o644, os.O_RDWR, CTX)
            y_fd = fs.handles.get(yfi.fh).fd
    await fs.release(yfi.fh)
    reused = f"y's descriptor {y_fd}, x's {x_fd}"
    cipher = tmp_path / "cipher"
    assert backing(fs, cipher, yattr.st_ino).stat().st_size == 0, reused
    assert await fs.getxattr(x, b"user.k", CTX) == b"x's", reused
    assert len(fs.handles) == 0
