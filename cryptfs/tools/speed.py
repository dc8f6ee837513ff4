"""``cryptfs speed``: how fast each crypto engine is on this machine.

Like ``gocryptfs -speed``.  Every engine the machine offers (userspace
OpenSSL through the native helper and through ``cryptography``; the
kernel's AF_ALG as ``auto`` would use it; AF_ALG without vmsplice) does
the two things the filesystem does, on one thread: encrypt a request held
in memory, and decrypt a request from a page-cached backing file, for 4 KiB
and 64 KiB requests.  Figures are MB/s of plaintext.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptfs.engines import DEFAULTS, cross_check
from cryptfs.engines.afalg import AfalgEngine
from cryptfs.engines.base import PAGE_SIZE, EngineOptions, XtsEngine, aligned_buffer
from cryptfs.engines.parallel import default_helpers
from cryptfs.engines.timing import FAR_BEHIND
from cryptfs.engines.userspace import LABELS, OpenSSLEngine
from cryptfs.errors import EngineError, EngineUnavailableError

REQUEST_SIZES = (PAGE_SIZE, 16 * PAGE_SIZE)
OPERATIONS = ("encrypt", "decrypt")


@dataclass
class EngineSpeed:
    label: str
    mb_per_s: dict[str, float] = field(default_factory=dict)  # "encrypt 4 KiB" -> MB/s
    unavailable: str | None = None

    def score(self) -> float:
        """Geometric mean over all cells (0 if unavailable)."""
        if self.unavailable or not self.mb_per_s:
            return 0.0
        product = 1.0
        for value in self.mb_per_s.values():
            product *= value
        return product ** (1 / len(self.mb_per_s))


def cell(operation: str, size: int) -> str:
    return f"{operation} {size // 1024} KiB"


Factory = Callable[[], XtsEngine]


def candidates(options: EngineOptions = DEFAULTS) -> list[tuple[str, Factory | str]]:
    """(label, engine factory) per engine, or (label, why unavailable)."""
    found: list[tuple[str, Factory | str]] = []
    helpers = options.helpers

    def native() -> OpenSSLEngine:
        return OpenSSLEngine("native", helpers=helpers, native_helper=options.native)

    try:
        found.append((native().label, native))
    except EngineUnavailableError as exc:
        found.append((LABELS["native"], str(exc)))
    found.append((OpenSSLEngine("direct").label, lambda: OpenSSLEngine("direct", helpers=helpers)))
    try:
        kernel = AfalgEngine.probe(helpers)
        cross_check(kernel, OpenSSLEngine("direct"))
    except (EngineUnavailableError, EngineError, OSError) as exc:
        return [*found, ("afalg", str(exc))]
    if kernel.zero_copy:
        found.append(("afalg (vmsplice)",
                      lambda: AfalgEngine(zero_copy=True, helpers=helpers)))
    else:
        found.append(("afalg (vmsplice)", "vmsplice is not allowed here (seccomp?)"))
    found.append(("afalg (sendmsg copies)", lambda: AfalgEngine(zero_copy=False, helpers=helpers)))
    return found


def _rate(run: Callable[[], None], size: int, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while True:
        run()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count * size / elapsed / 1e6


def measure(engine: XtsEngine, seconds: float, workdir: str) -> dict[str, float]:
    """MB/s of one engine for every operation and request size."""
    figures = {}
    session = engine.open_session(secrets.token_bytes(64))
    try:
        for size in REQUEST_SIZES:
            plain = aligned_buffer(size)
            plain[:] = secrets.token_bytes(size)
            out = memoryview(bytearray(size))
            first = secrets.randbelow(1 << 32)
            figures[cell("encrypt", size)] = _rate(
                lambda p=plain, o=out, f=first: session.encrypt(f, p, o), size, seconds)
            # decrypt what a backing file holds: ciphertext after a header page
            with tempfile.TemporaryFile(dir=workdir) as backing:
                backing.write(bytes(PAGE_SIZE) + bytes(out))
                backing.flush()
                fd = backing.fileno()
                figures[cell("decrypt", size)] = _rate(
                    lambda fd=fd, s=size, o=out, f=first: session.decrypt_file(
                        f, fd, PAGE_SIZE, s, o), size, seconds)
            plain.close()
    finally:
        session.close()
    return figures


def run(seconds: float = 0.5, workdir: str | None = None,
        options: EngineOptions = DEFAULTS) -> list[EngineSpeed]:
    workdir = workdir or tempfile.gettempdir()
    results = []
    for label, factory in candidates(options):
        if isinstance(factory, str):
            results.append(EngineSpeed(label, unavailable=factory))
        else:
            engine = factory()
            try:
                results.append(EngineSpeed(label, measure(engine, seconds, workdir)))
            finally:
                engine.close()
    return results


def kernel_ratios(results: list[EngineSpeed]) -> tuple[str, str, dict[str, float]] | None:
    """The kernel engine as ``auto`` would use it (zero copy where allowed)
    against the userspace engine ``--engine openssl`` would use (the first
    available): their labels and MB/s ratio per cell; None if either is
    unavailable."""
    usable = [r for r in results if not r.unavailable]
    kernel = next((r for r in usable if r.label.startswith("afalg")), None)
    user = next((r for r in usable if r.label.startswith("openssl")), None)
    if kernel is None or user is None:
        return None
    return kernel.label, user.label, {c: kernel.mb_per_s[c] / user.mb_per_s[c]
                                      for c in kernel.mb_per_s}


def kernel_ratio_lines(results: list[EngineSpeed]) -> list[str]:
    """What the mount logs as its engine timing, from these longer runs."""
    found = kernel_ratios(results)
    if found is None:
        return ["Kernel engine: not usable here, nothing to compare."]
    kernel, user, ratios = found
    lines = [f"{kernel} / {user}: " + ", ".join(f"{c} {r:.2f}" for c, r in ratios.items())]
    if min(ratios.values()) < FAR_BEHIND:
        lines.append("The kernel engine is far behind here: mount with --engine openssl "
                     "(auto takes the kernel engine whenever it passes its self-test).")
    return lines


def report(results: list[EngineSpeed], options: EngineOptions = DEFAULTS) -> str:
    columns = [cell(op, size) for size in REQUEST_SIZES for op in OPERATIONS]
    width = max(len(r.label) for r in results) + 2
    lines = ["engine".ljust(width) + "".join(c.rjust(16) for c in columns)]
    for r in results:
        if r.unavailable:
            lines.append(r.label.ljust(width) + f"unavailable: {r.unavailable}")
        else:
            lines.append(r.label.ljust(width) + "".join(
                f"{r.mb_per_s[c]:11.0f} MB/s" for c in columns))
    helpers = default_helpers() if options.helpers is None else options.helpers
    best = max(results, key=EngineSpeed.score)
    engine = "openssl" if best.label.startswith("openssl") else "afalg"
    lines += [
        "",
        *kernel_ratio_lines(results),
        f"Fastest here on one thread: {best.label} (mount with --engine {engine}).",
        *(["(The afalg engine uses vmsplice for runs of 2+ pages where allowed; on a",
           "machine where copies win, that cut-off should move: please report it.)"]
          if best.label.startswith("afalg (sendmsg") else []),
        f"--engine openssl uses {OpenSSLEngine(native_helper=options.native).label} here.",
        "The kernel engine and the native helper run with Python's GIL released, so",
        f"under parallel load they also scale with cores ({os.cpu_count()} here); runs of",
        "64+ pages are " + (f"split over {helpers + 1} threads" if helpers
                            else "not split here (needs 3+ CPUs)") + " (CRYPTFS_RUN_THREADS).",
        "--engine auto uses the kernel engine whenever it passes its self-test.",
    ]
    return "\n".join(lines)
