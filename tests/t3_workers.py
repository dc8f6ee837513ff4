"""The worker pool: results, exceptions, its thread limit, and no abandoned calls."""

from __future__ import annotations

import logging
import threading

import pytest
import trio

from cryptfs.fs.workers import WorkerPool
from cryptfs.lowlevel import threads


@pytest.fixture
def pool():
    workers = WorkerPool(3)
    yield workers
    workers.close()


async def test_results_and_exceptions_come_back(pool):
    assert await pool.run(lambda a, b: a + b, 2, 3) == 5
    assert await pool.run(threading.get_ident) != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 / 0)


async def test_at_most_its_threads_at_once(pool):
    lock, running, peak = threading.Lock(), [0], [0]
    gate = threading.Event()

    def job():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(10)
        with lock:
            running[0] -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(pool.run, job)
        try:  # wait until the pool is full (or fail), then open the gate
            with trio.fail_after(30):
                while True:
                    with lock:
                        if running[0] == 3:
                            break
                    await trio.sleep(0.01)
        finally:
            gate.set()
    assert peak[0] == 3


async def test_a_cancelled_caller_waits_for_its_call(pool):
    started, release, done, seen = threading.Event(), threading.Event(), [], []

    def job():
        started.set()
        release.wait(10)
        done.append(True)

    async def caller():
        with trio.move_on_after(0.01):
            await pool.run(job)
        seen.append(len(done))  # control returns only once the call has finished

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.to_thread.run_sync(started.wait, 10)
        await trio.sleep(0.05)  # the caller's deadline has passed
        assert seen == []
        release.set()
    assert seen == [1]


def test_close_after_the_loop_is_gone():
    pool = WorkerPool(2)
    results = []

    async def main():
        results.append(await pool.run(sum, [1, 2]))

    trio.run(main)
    pool.close()
    pool.close()  # idempotent
    assert results == [3]


def test_close_leaves_a_stuck_thread_behind_and_says_so(monkeypatch, caplog):
    """A worker stuck on something that does not answer (here an event
    this test holds) does not hang close(), which unmount waits for: the
    thread is named in a warning and left to finish on its own."""
    monkeypatch.setattr(threads, "CLOSE_TIMEOUT", 0.1, raising=False)
    pool = WorkerPool(2)
    stuck, started = threading.Event(), threading.Event()

    def job():
        started.set()
        stuck.wait(60)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run, job)
            try:
                await trio.to_thread.run_sync(started.wait, 10)
                # close from another thread: the stuck call's caller waits for it
                closer = threading.Thread(target=pool.close)
                with caplog.at_level(logging.WARNING, logger="cryptfs.lowlevel.threads"):
                    closer.start()
                    await trio.to_thread.run_sync(closer.join, 30)
                assert not closer.is_alive(), "close() waited for the stuck thread"
            finally:
                stuck.set()

    trio.run(main)
    assert "still busy" in caplog.text and "cryptfs-worker-" in caplog.text
