"""Splitting large runs across threads (engines/parallel.py): where runs are
cut, that every engine gives the bytes of a serial call, that errors reach
the caller after every part has finished, that ``close`` stops the threads,
and that a forked child starts its own."""

from __future__ import annotations

import os
import secrets
import threading

import pytest

from cryptfs.cli.common import environment_overrides
from cryptfs.engines.afalg import AfalgEngine
from cryptfs.engines.base import PAGE_SIZE, XtsEngine, units
from cryptfs.engines.parallel import (
    SPLIT_MIN_UNITS,
    THREADS_ENV,
    ParallelRuns,
    default_helpers,
    split,
)
from cryptfs.engines.userspace import OpenSSLEngine
from cryptfs.errors import EngineUnavailableError
from tests.conftest import afalg_engine, native_engine
from tests.helpers.xts_vectors import aligned


def split_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cryptfs-split")]


@pytest.mark.parametrize("length", [32 * PAGE_SIZE, 32 * PAGE_SIZE + 16, 33 * PAGE_SIZE + 4111,
                                    100 * PAGE_SIZE + 17, 256 * PAGE_SIZE])
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_split_cuts_between_whole_units(length, parts):
    spans = split(length, parts)
    assert len(spans) == parts and spans[0][0] == 0 and spans[-1][1] == length
    unit_starts = {start for _k, start, _size in units(length)}
    for (start, end), (next_start, _) in zip(spans, spans[1:], strict=False):
        assert end == next_start and start % PAGE_SIZE == 0 and start in unit_starts
    # the final unit (maybe page + trailer) stays whole in the last span
    assert spans[-1][0] <= list(units(length))[-1][1]


def test_only_large_runs_are_split():
    runs = ParallelRuns(helpers=3)
    assert SPLIT_MIN_UNITS == 64  # 256 KiB: a 128 KiB read is cheaper on one thread
    assert runs.parts((SPLIT_MIN_UNITS - 2) * PAGE_SIZE + 4112) == 1  # 63 units
    assert runs.parts((SPLIT_MIN_UNITS - 1) * PAGE_SIZE + 4112) == 4  # 64 units, 16 each
    assert ParallelRuns(helpers=1).parts(SPLIT_MIN_UNITS * PAGE_SIZE) == 2
    assert runs.parts(256 * PAGE_SIZE) == 4
    assert ParallelRuns(helpers=0).parts(256 * PAGE_SIZE) == 1


def test_parts_run_on_helpers_and_cover_the_run_once():
    before = set(split_threads())
    runs = ParallelRuns(helpers=3)
    seen: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def work(start: int, end: int) -> None:
        with lock:
            seen.append((start, end, threading.current_thread().name))

    length = 256 * PAGE_SIZE + 100
    runs.run(length, work)
    assert sorted((s, e) for s, e, _ in seen) == split(length, 4)
    assert len(set(split_threads()) - before) == 3
    runs.close()
    assert set(split_threads()) <= before  # close joins every helper
    runs.close()  # idempotent


def test_an_error_in_a_part_reaches_the_caller_after_every_part():
    runs = ParallelRuns(helpers=2)
    finished = []

    def work(start: int, end: int) -> None:
        if start == 0:
            raise ValueError("first part failed")
        finished.append(start)

    with pytest.raises(ValueError, match="first part failed"):
        runs.run(96 * PAGE_SIZE, work)
    assert sorted(finished) == [32 * PAGE_SIZE, 64 * PAGE_SIZE]  # the others still ran
    with pytest.raises(ZeroDivisionError):
        runs.run(96 * PAGE_SIZE, lambda start, end: 1 // start)  # the first part is fine
    runs.close()


# Python 3.12+ warns about fork() in a process with threads; that is the point here.
@pytest.mark.filterwarnings("ignore:This process .* fork:DeprecationWarning")
def test_forked_child_starts_its_own_helpers():
    """The daemon forks after building the engine: the child must not wait
    for threads that only exist in the parent."""
    engine = native_engine(helpers=1)
    key, plain = secrets.token_bytes(64), secrets.token_bytes(64 * PAGE_SIZE)
    expected = bytearray(len(plain))
    engine.open_session(key).encrypt(5, plain, memoryview(expected))  # starts helpers here
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            out = bytearray(len(plain))
            engine.open_session(key).encrypt(5, plain, memoryview(out))
            code = 0 if out == expected and split_threads() else 2
            engine.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    engine.close()


def make_engine(kind: str, helpers: int) -> XtsEngine:
    if kind == "afalg":
        return AfalgEngine(afalg_engine().zero_copy, helpers=helpers)
    return native_engine(helpers)


@pytest.mark.parametrize("kind", ["native", pytest.param("afalg", marks=pytest.mark.afalg)])
@pytest.mark.parametrize("length", [32 * PAGE_SIZE, 40 * PAGE_SIZE + 16, 64 * PAGE_SIZE + 4112,
                                    150 * PAGE_SIZE + 1000])
def test_split_runs_give_serial_bytes(kind, length, tmp_path):
    """Every split (1-4 threads) gives the cryptography path's bytes, in
    both directions and from a file with holes across part boundaries."""
    before = set(split_threads())
    key, first = secrets.token_bytes(64), secrets.randbelow(1 << 40)
    plain = secrets.token_bytes(length)
    ref = OpenSSLEngine("direct").open_session(key)
    expected = bytearray(length)
    ref.encrypt(first, plain, memoryview(expected))
    stored = bytearray(expected)
    for hole in (0, 15, 16, 31, 32):  # units around the cuts of every split
        stored[hole * PAGE_SIZE:(hole + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    wanted = bytearray(length)
    path = tmp_path / "f"
    path.write_bytes(bytes(PAGE_SIZE) + stored)
    fd = os.open(path, os.O_RDONLY)
    try:
        ref.decrypt_file(first, fd, PAGE_SIZE, length, memoryview(wanted))
        for helpers in (0, 1, 2, 3):
            engine = make_engine(kind, helpers)
            session = engine.open_session(key)
            try:
                for src in (plain, aligned(plain)):
                    out = bytearray(length)
                    session.encrypt(first, src, memoryview(out))
                    assert out == expected
                back = bytearray(length)
                session.decrypt(first, aligned(bytes(expected)), memoryview(back))
                assert back == plain
                got = bytearray(length)
                session.decrypt_file(first, fd, PAGE_SIZE, length, memoryview(got))
                assert got == wanted
            finally:
                session.close()
                engine.close()
    finally:
        os.close(fd)
    assert set(split_threads()) <= before


def test_default_helpers_leave_two_cpus(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    for cpus, helpers in [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3), (64, 3)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert default_helpers() == helpers, cpus


def test_run_threads_from_the_environment(monkeypatch):
    """Read once by the command line (``environment_overrides``), passed down."""
    def runs() -> ParallelRuns:
        return ParallelRuns(environment_overrides().engine.helpers)

    monkeypatch.setenv(THREADS_ENV, "1")
    assert runs().helpers == 0 and runs().parts(256 * PAGE_SIZE) == 1
    monkeypatch.setenv(THREADS_ENV, "3")
    assert runs().helpers == 2
    assert OpenSSLEngine(helpers=environment_overrides().engine.helpers)._parallel.helpers == 2
    for bad in ("0", "5", "two", ""):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(EngineUnavailableError, match=THREADS_ENV):
            environment_overrides()
