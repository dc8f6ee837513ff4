"""The per-file lock: reads share it, a write holds it alone, a waiting
write is not starved by later reads, and a cancelled wait leaves it usable."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from cryptfs.fs.filelock import FileLock


async def hold(lock: FileLock, exclusive: bool, log: list, name: str,
               release: trio.Event) -> None:
    async with lock.exclusive() if exclusive else lock.shared():
        log.append(("in", name))
        await release.wait()
        log.append(("out", name))


async def test_readers_share_and_a_writer_waits_for_them():
    lock, log = FileLock(), []
    first, second, writer = trio.Event(), trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, lock, False, log, "r1", first)
        nursery.start_soon(hold, lock, False, log, "r2", second)
        await trio.testing.wait_all_tasks_blocked()
        # both inside at once (trio starts tasks in a random order)
        assert sorted(log) == [("in", "r1"), ("in", "r2")]
        assert lock.free(exclusive=False) and not lock.free(exclusive=True)
        nursery.start_soon(hold, lock, True, log, "w", writer)
        await trio.testing.wait_all_tasks_blocked()
        assert ("in", "w") not in log
        first.set()
        await trio.testing.wait_all_tasks_blocked()
        assert ("in", "w") not in log  # r2 is still reading
        second.set()
        await trio.testing.wait_all_tasks_blocked()
        assert log[-1] == ("in", "w")
        assert not lock.free(exclusive=False)
        writer.set()
    assert lock.free(exclusive=True)  # nobody inside, nobody waiting


async def test_a_waiting_writer_goes_before_later_readers():
    lock, log = FileLock(), []
    reading, writing, later = trio.Event(), trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, lock, False, log, "r1", reading)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, lock, True, log, "w", writing)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, lock, False, log, "r2", later)
        await trio.testing.wait_all_tasks_blocked()
        assert ("in", "r2") not in log  # queued behind the writer
        assert not lock.free(exclusive=False)
        reading.set()
        writing.set()
        later.set()
    assert log == [("in", "r1"), ("out", "r1"), ("in", "w"), ("out", "w"),
                   ("in", "r2"), ("out", "r2")]


async def test_a_cancelled_writer_leaves_the_lock_usable():
    lock, log = FileLock(), []
    reading = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, lock, False, log, "r", reading)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.01) as scope:
            async with lock.exclusive():
                pytest.fail("entered while a reader held the lock")
        assert scope.cancelled_caught
        assert lock.free(exclusive=False)  # readers are not blocked by the gone writer
        reading.set()
    async with lock.exclusive():
        assert not lock.free(exclusive=False)
    assert lock.free(exclusive=True)
