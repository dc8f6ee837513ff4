"""The request loop's wait (cryptfs/fuseloop.py) on a pipe standing in for
/dev/fuse: True only when a request is there to read, without yielding when
one already is; one parked task per descriptor; every waiter ends on stop."""

from __future__ import annotations

import os

import pyfuse3
import pytest
import trio
import trio.testing

from cryptfs import fuseloop


@pytest.fixture
def channel():
    """(read end installed as the FUSE descriptor, write end)."""
    r, w = os.pipe()
    os.set_blocking(r, False)  # a wait that lied fails the read, not hangs it
    assert fuseloop.install(r), (
        f"pyfuse3 {pyfuse3.__version__} is not in fuseloop.VERIFIED: read its "
        "_session_loop and _wait_fuse_readable, then add it")
    yield r, w
    fuseloop.uninstall()
    os.close(r)
    os.close(w)


async def serve(r: int, got: list, name: str) -> None:
    """pyfuse3's session loop in small: wait, then read without yielding."""
    while await pyfuse3._wait_fuse_readable():
        got.append((name, os.read(r, 1)))  # BlockingIOError if the wait lied


def test_install_replaces_pyfuse3s_wait_and_uninstall_restores_it(channel):
    assert pyfuse3._wait_fuse_readable is fuseloop._wait_readable


def test_uninstalled_after_the_fixture():
    assert pyfuse3._wait_fuse_readable is not fuseloop._wait_readable


async def test_a_waiting_request_is_taken_without_yielding(channel):
    r, w = channel
    os.write(w, b"ab")
    with trio.testing.assert_no_checkpoints():
        assert await pyfuse3._wait_fuse_readable()
        assert os.read(r, 1) == b"a"
        assert await pyfuse3._wait_fuse_readable()


async def test_it_yields_after_a_streak(channel):
    r, w = channel
    os.write(w, bytes(fuseloop.STREAK + 1))
    with trio.testing.assert_no_checkpoints():
        for _ in range(fuseloop.STREAK):
            assert await pyfuse3._wait_fuse_readable()
            os.read(r, 1)
    with trio.testing.assert_checkpoints():
        assert await pyfuse3._wait_fuse_readable()


async def test_each_request_goes_to_one_task_and_stop_ends_all(channel):
    r, w = channel
    got: list = []
    with trio.fail_after(30):  # a waiter left behind fails, not hangs
        async with trio.open_nursery() as nursery:
            for name in "abc":  # one parks on the pipe, two wait for their turn
                nursery.start_soon(serve, r, got, name)
            await trio.testing.wait_all_tasks_blocked()
            for k in range(5):
                os.write(w, bytes([k]))
                with trio.fail_after(10):
                    while len(got) <= k:
                        await trio.sleep(0.001)
                await trio.testing.wait_all_tasks_blocked()
            assert sorted(data for _, data in got) == [bytes([k]) for k in range(5)]
            fuseloop.stop()
            trio.lowlevel.notify_closing(r)  # what pyfuse3.terminate does
    assert len(got) == 5


async def test_a_cancelled_waiter_hands_its_turn_on(channel):
    r, w = channel
    got: list = []
    scopes: dict = {}

    async def cancellable(name: str) -> None:
        with trio.CancelScope() as scopes[name]:
            await serve(r, got, name)

    with trio.fail_after(30):  # a waiter left behind fails, not hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancellable, "a")  # parks on the pipe
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(cancellable, "b")  # waits for its turn
            await trio.testing.wait_all_tasks_blocked()
            scopes["a"].cancel()
            await trio.testing.wait_all_tasks_blocked()
            os.write(w, b"x")
            with trio.fail_after(10):
                while not got:
                    await trio.sleep(0.001)
            assert got == [("b", b"x")]
            fuseloop.stop()
            trio.lowlevel.notify_closing(r)
