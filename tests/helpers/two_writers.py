"""Two mounters writing one backing file at once, each its own half of every
page: two ``ContentCodec``s (same keys, own sessions and engine) on two
descriptors of the file, driven from two threads.  Used on a local file
(tests/t2_rangelock.py) and through two NFS clients (tests/t5_nfs_rangelock.py).

Each round has two phases, both threads joining a barrier after each, where
the file is checked through a third, fresh descriptor:

1. writer 0 shrinks the file (the new final page re-encrypted with its
   trailer) while writer 1 rewrites its halves of the pages that stay;
2. both write their halves of every page of a new size, in a random order
   (extending writes, holes, the old final page retired, a partial final
   page), writer ``round % 2`` also truncating to the new size (growing) at
   a random point; after each write a writer reads the page back and
   checks its own half (a torn page fails there: garbage, or EIO from a
   tag in authenticated mode).

The first round starts from an empty file: both first writes race to write
the header, which must end with one file ID.  ``run`` returns the problems
seen (empty when both halves of every page survived), stopping at the first
exception.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptfs.cli.common import environment_overrides
from cryptfs.content.codec import ContentCodec, EncryptedFile
from cryptfs.content.sessions import SessionCache
from cryptfs.engines.base import PAGE_SIZE
from cryptfs.engines.userspace import OpenSSLEngine
from cryptfs.keys.hierarchy import KeyRing

P = PAGE_SIZE
HALF = P // 2


@contextmanager
def codec(keys: KeyRing, authenticated: bool, locks: bool) -> Iterator[ContentCodec]:
    """One mounter's codec, with an engine and sessions of its own."""
    engine = OpenSSLEngine(None, native_helper=environment_overrides().engine.native)
    sessions = SessionCache(engine, keys)
    try:
        yield ContentCodec(keys, sessions, authenticated, byte_range_locks=locks)
    finally:
        sessions.close()
        engine.close()


@contextmanager
def racing_switches() -> Iterator[None]:
    """Switch threads as often as Python allows, so that the two writers'
    system calls interleave finely."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def data(writer: int, rnd: int, phase: int, page: int, length: int) -> bytes:
    """What ``writer`` writes into its half of ``page`` (distinct every time)."""
    return random.Random(f"{writer}/{rnd}/{phase}/{page}").randbytes(length)


def half(writer: int, page: int, size: int) -> tuple[int, int]:
    """Writer's half of ``page`` in a file of ``size`` bytes: (start, end)."""
    start = page * P + writer * HALF
    return start, max(start, min(start + HALF, size))


@dataclass
class Plan:
    """Sizes of every round: shrink to ``shrink[r]`` (round 0: none), then
    write up to ``size[r]``."""

    shrink: list[int]
    size: list[int]

    @classmethod
    def random(cls, rounds: int, pages: tuple[int, int], rng: random.Random) -> Plan:
        sizes = [rng.randrange(pages[0] * P + 1, pages[1] * P) for _ in range(rounds)]
        shrink = [0] + [rng.randrange(min(P // 4, sizes[r - 1] - 1), sizes[r - 1])
                        for r in range(1, rounds)]
        return cls(shrink, sizes)


@dataclass
class Race:
    path: Path
    plan: Plan
    files: list[EncryptedFile]
    check: ContentCodec
    seed: int
    problems: list[str] = field(default_factory=list)
    # the contents the file must have at each barrier: (round, phase)
    _stage: tuple[int, int] = (0, 2)

    def expected(self, rnd: int, phase: int) -> bytes:
        size = self.plan.shrink[rnd] if phase == 1 else self.plan.size[rnd]
        out = bytearray(size)
        for page in range((size + P - 1) // P):
            for writer in (0, 1):
                start, end = half(writer, page, size)
                if phase == 1 and writer == 0:  # last round's, cut
                    stamp = data(0, rnd - 1, 2, page, HALF)
                else:
                    stamp = data(writer, rnd, phase, page, HALF)
                out[start:end] = stamp[:end - start]
        return bytes(out)

    def verify(self) -> None:
        """At a barrier: the file as a fresh mounter reads it."""
        rnd, phase = self._stage
        self._stage = (rnd, 2) if phase == 1 else (rnd + 1, 1)
        try:
            self._compare(rnd, phase)
        except Exception as exc:  # noqa: BLE001 (a damaged file raises anything)
            self.problems.append(f"round {rnd} phase {phase}: {type(exc).__name__}: {exc}")

    def _compare(self, rnd: int, phase: int) -> None:
        want = self.expected(rnd, phase)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fresh = self.check.open(fd)
            got = fresh.read(0, len(want) + P)
            if self.check.tagger is not None and fresh.bad_pages(fresh.size()):
                self.problems.append(f"round {rnd} phase {phase}: pages fail their tags")
        finally:
            os.close(fd)
        # (a mounter that has written nothing yet may know no header)
        ids = {f.header.file_id for f in self.files if f.header is not None}
        if fresh.header is None or ids - {fresh.header.file_id}:
            self.problems.append(f"round {rnd}: the mounters hold different file IDs")
        if got != want:
            lost = [p for p in range(0, max(len(want), len(got)), HALF)
                    if got[p:p + HALF] != want[p:p + HALF]]
            self.problems.append(f"round {rnd} phase {phase}: size {len(got)} (want "
                                 f"{len(want)}), {len(lost)} half pages wrong")


def _write_half(race: Race, writer: int, f: EncryptedFile, rnd: int, phase: int, page: int,
                size: int) -> None:
    start, end = half(writer, page, size)
    if end == start:
        return
    stamp = data(writer, rnd, phase, page, HALF)[:end - start]
    f.write(start, stamp)
    seen = f.read(start, end - start)
    if seen != stamp:
        race.problems.append(f"round {rnd}: writer {writer} read page {page} back wrong")


def _writer(race: Race, writer: int, barrier: threading.Barrier) -> None:
    f, plan = race.files[writer], race.plan
    rng = random.Random(race.seed * 2 + writer)
    for rnd in range(len(plan.size)):
        if rnd:  # phase 1: shrink against rewrites of the pages that stay
            shrink = plan.shrink[rnd]
            if writer == 0:
                f.truncate(shrink)
            else:
                pages = list(range((shrink + P - 1) // P))
                rng.shuffle(pages)
                for page in pages:
                    _write_half(race, 1, f, rnd, 1, page, shrink)
            barrier.wait()
        size = plan.size[rnd]
        pages = list(range((size + P - 1) // P))
        rng.shuffle(pages)
        grow_at = rng.randrange(len(pages) + 1) if rnd % 2 == writer else -1
        for k, page in enumerate(pages):
            if k == grow_at:
                f.truncate(size)
            _write_half(race, writer, f, rnd, 2, page, size)
        if grow_at == len(pages):
            f.truncate(size)
        barrier.wait()


def run(path: Path, keys: KeyRing, authenticated: bool, locks: bool, rounds: int,
        pages: tuple[int, int], seed: int, header_first: bool = False,
        via: tuple[Path, Path] | None = None) -> list[str]:
    """Race two writers on the file ``path``, made empty first, ``rounds``
    rounds of sizes of ``pages[0]`` to ``pages[1]`` pages; the problems.
    ``header_first``: the file gets its header before the writers open it
    (so that only the pages race).  ``via``: the paths by which each writer
    reaches the file (two NFS clients), ``path`` then being the checker's."""
    path.write_bytes(b"")
    plan = Plan.random(rounds, pages, random.Random(seed))
    fds = [os.open(p, os.O_RDWR) for p in via or (path, path)]
    try:
        with codec(keys, authenticated, locks) as c0, codec(keys, authenticated, locks) as c1, \
                codec(keys, authenticated, True) as check:
            if header_first:
                check.open(fds[0]).ensure_header()
            race = Race(path, plan, [c0.open(fds[0]), c1.open(fds[1])], check, seed)
            barrier = threading.Barrier(2, action=race.verify)
            errors: list[str] = []

            def body(writer: int) -> None:
                try:
                    _writer(race, writer, barrier)
                except threading.BrokenBarrierError:
                    pass
                except Exception as exc:  # noqa: BLE001 (a torn page raises anything)
                    errors.append(f"writer {writer}: {type(exc).__name__}: {exc}")
                    barrier.abort()

            with racing_switches():
                threads = [threading.Thread(target=body, args=(w,)) for w in (0, 1)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            return race.problems + errors
    finally:
        for fd in fds:
            os.close(fd)
