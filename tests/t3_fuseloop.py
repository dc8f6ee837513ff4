"""The request loop's wait (cryptfs/daemon/fuseloop.py) on a pipe standing in for
/dev/fuse: True only when a request is there to read, without yielding when
one already is; one parked task per descriptor; every waiter ends on stop."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from packaging.requirements import Requirement

from cryptfs.daemon import fuseloop


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


async def test_a_dead_connection_is_readable_so_the_read_reports_it(channel):
    """A hung-up descriptor (after an unmount /dev/fuse answers POLLERR;
    a pipe whose writer is gone, POLLHUP) is "readable": the read returns at
    once with the error (here: end of file) instead of the wait spinning on
    a condition that never clears.  With a request there, it is read first."""
    r, w = channel
    os.write(w, b"last")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, w)  # the pipe's writer is gone (w, now /dev/null, stays open)
    os.close(null)
    assert await pyfuse3._wait_fuse_readable()
    assert os.read(r, 10) == b"last"
    with trio.fail_after(30):  # a wait that ignored POLLHUP would spin, not return
        for _ in range(fuseloop.STREAK + 1):  # the fast path, then the parked one
            assert await pyfuse3._wait_fuse_readable()
            assert os.read(r, 1) == b""


async def test_a_closed_descriptor_ends_the_wait():
    """POLLNVAL (the descriptor is not open): no read can succeed, so the
    wait answers False (pyfuse3's loop then ends) and keeps doing so."""
    r, w = os.pipe()
    assert fuseloop.install(r)
    try:
        os.close(r)
        assert not await pyfuse3._wait_fuse_readable()
        assert not await pyfuse3._wait_fuse_readable()
    finally:
        fuseloop.uninstall()
        os.close(w)


def test_pyproject_admits_only_the_verified_pyfuse3_releases():
    """The request loop is verified on the releases in fuseloop.VERIFIED:
    pyproject.toml admits those and no others, and they are what runs."""
    with open(Path(__file__).parent.parent / "pyproject.toml", "rb") as f:
        dependencies = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    (pyfuse3_dep,) = [d for d in dependencies if d.name == "pyfuse3"]
    for version in ("3.2.0", "3.3.0", "3.4.0", "3.4.9", "3.5.0", "3.5.7", "3.6.0", "4.0.0"):
        assert pyfuse3_dep.specifier.contains(version) == version.startswith(fuseloop.VERIFIED), (
            f"pyproject.toml's {pyfuse3_dep} and fuseloop.VERIFIED {fuseloop.VERIFIED} "
            f"disagree on pyfuse3 {version}")
    assert pyfuse3.__version__.startswith(fuseloop.VERIFIED)
