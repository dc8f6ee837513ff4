"""A quick comparison of the kernel engine with the userspace one, at mount.

``auto`` takes the kernel engine whenever it passes its self-test (the
design's engine), whatever its speed.  How it compares depends on the
machine (CPU, kernel, virtualisation), so the mount times both engines
briefly and logs the figures; where the kernel engine is far behind, the
user is told which ``--engine`` choice is faster.  The figures never change
the choice.

Each engine encrypts one 4 KiB and one 64 KiB run (a page, and what one
splice into the kernel carries) again and again for ``CELL_SECONDS``; the
best call of each counts: the one least disturbed by other load, so a few
calls give a stable figure.  Random key and data, never logged.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from cryptfs.engines.base import PAGE_SIZE, XtsEngine, aligned_buffer

SIZES = (PAGE_SIZE, 16 * PAGE_SIZE)
CELL_SECONDS = 0.0005  # per engine and size: four cells, a few ms in all
MIN_CALLS = 3
# Kernel/userspace ratio below which the kernel engine counts as far behind.
FAR_BEHIND = 0.5


@dataclass(frozen=True)
class EngineTiming:
    """MB/s of plaintext per run size, for the kernel and the userspace engine."""

    kernel: dict[int, float]
    userspace: dict[int, float]
    userspace_label: str

    def ratios(self) -> dict[int, float]:
        """Kernel MB/s / userspace MB/s per run size (above 1: the kernel is faster)."""
        return {size: self.kernel[size] / self.userspace[size] for size in self.kernel}

    def far_behind(self) -> bool:
        return min(self.ratios().values()) < FAR_BEHIND

    def summary(self) -> str:
        """One line for the log and ``cryptfs info``."""
        cells = [f"{size // 1024} KiB {self.kernel[size]:.0f} vs {self.userspace[size]:.0f} "
                 f"MB/s ({ratio:.2f})" for size, ratio in self.ratios().items()]
        return f"kernel engine vs {self.userspace_label}: " + ", ".join(cells)

    def advice(self) -> str | None:
        """What to tell the user where the kernel engine is far behind, else None."""
        if not self.far_behind():
            return None
        return (f"the kernel engine (AF_ALG) reaches only {min(self.ratios().values()):.2f} "
                f"of the userspace engine's speed here; --engine openssl is faster "
                f"on this machine ({self.summary()})")


def best_rate(engine: XtsEngine, size: int, seconds: float = CELL_SECONDS) -> float:
    """MB/s of the fastest of at least ``MIN_CALLS`` encryptions of a
    ``size``-byte page-aligned run, calling for about ``seconds``."""
    session = engine.open_session(secrets.token_bytes(64))
    src = aligned_buffer(size)
    try:
        src[:] = secrets.token_bytes(size)
        dst = memoryview(bytearray(size))
        first = secrets.randbelow(1 << 32)
        best, calls, deadline = float("inf"), 0, time.perf_counter() + seconds
        while calls < MIN_CALLS or time.perf_counter() < deadline:
            start = time.perf_counter()
            session.encrypt(first, src, dst)
            best = min(best, time.perf_counter() - start)
            calls += 1
        return size / max(best, 1e-9) / 1e6
    finally:
        session.close()
        src.close()


def time_engines(kernel: XtsEngine, userspace: XtsEngine, userspace_label: str,
                 seconds: float = CELL_SECONDS) -> EngineTiming:
    """Both engines on every size in ``SIZES``, alternating so that a burst
    of other load hits both."""
    figures: tuple[dict[int, float], dict[int, float]] = ({}, {})
    for size in SIZES:
        for engine, out in zip((kernel, userspace), figures, strict=True):
            out[size] = best_rate(engine, size, seconds)
    return EngineTiming(figures[0], figures[1], userspace_label)
