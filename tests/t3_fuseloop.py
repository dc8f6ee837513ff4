"""The request loop's wait (cryptfs/daemon/fuseloop.py) on a pipe standing in for
/dev/fuse: True only when a request is there to read, without yielding when
one already is; one parked task per descriptor; every waiter ends on stop."""

from __future__ import annotations

import os
import time
import tomllib
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing
from packaging.requirements import Requirement

from cryptfs.cli.common import environment_overrides
from cryptfs.daemon import fuseloop
from tests.conftest import Mount, init_cipherdir, require_fuse


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


def test_the_spin_budget_grows_after_short_waits_and_falls_to_zero_when_idle():
    spin = fuseloop.Spin()
    assert spin.budget_ns == 0  # a new mount does not spin
    spin.waited(10_000)  # a request came soon after the wait began
    assert spin.budget_ns == fuseloop.SPIN_START_NS
    spin.waited(60_000)  # a spin this long would have caught it
    assert spin.budget_ns >= 60_000
    for _ in range(10):
        spin.waited(fuseloop.SPIN_MAX_NS)
    assert spin.budget_ns == fuseloop.SPIN_MAX_NS  # bounded
    spin.waited(10 * fuseloop.SPIN_MAX_NS)  # quiet: shorter
    assert spin.budget_ns == fuseloop.SPIN_MAX_NS // 2
    for _ in range(10):
        spin.waited(10**9)
    assert spin.budget_ns == 0  # idle: no spin at all


@pytest.fixture
def spinning(channel, monkeypatch):
    """The channel with the largest spin budget; ``yields`` counts the
    spin's sched_yield calls, and the first one runs ``on_yield`` (a
    request arriving while the loop spins)."""
    r, w = channel
    fuseloop._state.spin.enabled = True
    fuseloop._state.spin.budget_ns = fuseloop.SPIN_MAX_NS
    calls: dict = {"yields": 0, "on_yield": lambda: None}

    def sched_yield() -> None:
        calls["yields"] += 1
        if calls["yields"] == 1:
            calls["on_yield"]()

    monkeypatch.setattr(fuseloop.os, "sched_yield", sched_yield)
    return r, w, calls


async def test_a_request_arriving_during_the_spin_is_taken_without_parking(spinning):
    r, w, calls = spinning
    calls["on_yield"] = lambda: os.write(w, b"x")
    with trio.testing.assert_no_checkpoints():
        assert await pyfuse3._wait_fuse_readable()
    assert os.read(r, 1) == b"x"
    assert fuseloop._state.spin.caught == 1


async def test_no_spin_while_a_worker_result_waits(spinning):
    """A result queued by a worker thread (run_sync_soon; here it brings
    the request) would wait for the spin: the loop parks at once."""
    r, w, calls = spinning
    trio.lowlevel.current_trio_token().run_sync_soon(os.write, w, b"x")
    with trio.fail_after(30):
        assert await pyfuse3._wait_fuse_readable()
    assert os.read(r, 1) == b"x"
    assert calls["yields"] == 0


async def test_no_spin_while_another_task_is_ready(spinning):
    r, w, calls = spinning

    async def request() -> None:  # ready to run when the wait begins
        os.write(w, b"x")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            assert await pyfuse3._wait_fuse_readable()
    assert os.read(r, 1) == b"x"
    assert calls["yields"] == 0


def daemon_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_mount_does_not_spin(tmp_path, monkeypatch):
    """After a burst of back-to-back requests (the spin's budget up) the
    mount goes quiet: over ten idle seconds its daemon uses next to no CPU
    (a spin that kept polling would use seconds)."""
    require_fuse()
    monkeypatch.setenv(fuseloop.SPIN_ENV, "1")
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile)
    mount = Mount(tmp_path / "cipher", tmp_path / "plain", passfile, "openssl").start()
    try:
        path = mount.mountpoint / "f"
        path.write_bytes(b"x")
        for _ in range(2000):  # each a round trip (the kernel caches no xattrs)
            with pytest.raises(OSError):
                os.getxattr(path, "user.absent")
        before = daemon_cpu_seconds(mount.proc.pid)
        time.sleep(10)
        assert daemon_cpu_seconds(mount.proc.pid) - before < 0.5
    finally:
        mount.stop()
    mount.check_log()


async def test_no_spin_unless_asked(spinning):
    r, w, calls = spinning
    fuseloop._state.spin.enabled = False  # (install's default)
    trio.lowlevel.current_trio_token().run_sync_soon(os.write, w, b"x")
    with trio.fail_after(30):
        assert await pyfuse3._wait_fuse_readable()
    assert os.read(r, 1) == b"x"
    assert calls["yields"] == 0
    assert fuseloop._state.spin.budget_ns == fuseloop.SPIN_MAX_NS  # not adapted either


def test_the_environment_asks_for_the_spin():
    assert environment_overrides({fuseloop.SPIN_ENV: "1"}).spin
    assert not environment_overrides({}).spin
