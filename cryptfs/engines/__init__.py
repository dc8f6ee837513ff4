"""Choosing the crypto engine: ``auto``, ``afalg`` (kernel) or ``openssl``.

``auto`` uses the kernel engine only after a known-answer check: a random
key and data are encrypted by both engines, through both of the kernel
engine's input paths, and the bytes must match.  Otherwise it falls back to
the userspace engine and says why.  The userspace engine's native helper is
checked the same way against its ``cryptography`` path.  Both produce the
same bytes, so the choice never affects what is on disk.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from cryptfs.engines.afalg import AfalgEngine
from cryptfs.engines.base import PAGE_SIZE, EngineOptions, XtsEngine, aligned_buffer
from cryptfs.engines.timing import EngineTiming, time_engines
from cryptfs.engines.userspace import OpenSSLEngine
from cryptfs.errors import EngineError, EngineUnavailableError

log = logging.getLogger(__name__)

ENGINE_NAMES = ("auto", "afalg", "openssl")
DEFAULTS = EngineOptions()


@dataclass(frozen=True)
class EngineChoice:
    engine: XtsEngine
    reason: str  # why this engine, for logs and ``cryptfs info``
    timing: EngineTiming | None = None  # the kernel engine against userspace, if timed


def cross_check(candidate: XtsEngine, reference: XtsEngine) -> None:
    """Raise ``EngineError`` unless both engines agree on random data, for a
    multi-page run with a trailer-sized final unit (both input paths)."""
    key = secrets.token_bytes(64)
    length = 3 * PAGE_SIZE + 100
    plain = aligned_buffer(length)
    plain[:] = secrets.token_bytes(length)
    first = secrets.randbelow(1 << 32)
    expected = bytearray(length)
    ref = reference.open_session(key)
    cand = candidate.open_session(key)
    try:
        ref.encrypt(first, plain, memoryview(expected))
        for src in (plain, bytes(plain)):  # aligned buffer (zero copy), then bytes (copy)
            got = bytearray(length)
            cand.encrypt(first, src, memoryview(got))
            if got != expected:
                raise EngineError(f"{candidate.name} and {reference.name} disagree on encryption")
        back = bytearray(length)
        cand.decrypt(first, bytes(expected), memoryview(back))
        if back != plain[:]:
            raise EngineError(f"{candidate.name} does not decrypt what it encrypted")
    finally:
        cand.close()
        ref.close()
        plain.close()


def userspace_engine(options: EngineOptions = DEFAULTS) -> OpenSSLEngine:
    """The userspace engine: its native helper if built and it gives the
    ``cryptography`` path's bytes (checked like the kernel engine), else
    the ``cryptography`` path."""
    engine = OpenSSLEngine(helpers=options.helpers, native_helper=options.native)
    if engine.path == "native":
        try:
            cross_check(engine, OpenSSLEngine("direct"))
        except EngineError as exc:
            engine.close()
            log.warning("the native AES-XTS helper failed its self-test (%s); "
                        "using cryptography instead", exc)
            return OpenSSLEngine("direct", helpers=options.helpers)
    return engine


def select_engine(name: str = "auto", options: EngineOptions = DEFAULTS,
                  compare: bool = False) -> EngineChoice:
    """Return the engine ``name`` asks for, built with ``options``; see the
    module docstring (``compare``: time a chosen kernel engine against the
    userspace one)."""
    if name == "openssl":
        return _chosen(userspace_engine(options), "requested")
    if name not in ("auto", "afalg"):
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    try:
        kernel = AfalgEngine.probe(options.helpers)
        cross_check(kernel, OpenSSLEngine("direct"))
    except (EngineUnavailableError, EngineError, OSError) as exc:
        if name == "afalg":
            if isinstance(exc, EngineUnavailableError):
                raise
            raise EngineUnavailableError(f"AF_ALG engine failed its self-test: {exc}") from exc
        return _chosen(userspace_engine(options), f"AF_ALG not usable: {exc}")
    choice = _chosen(kernel, "requested" if name == "afalg" else "AF_ALG passed its self-test")
    if compare:
        choice = EngineChoice(kernel, choice.reason, compare_with_userspace(kernel, options))
    return choice


def compare_with_userspace(kernel: XtsEngine, options: EngineOptions = DEFAULTS
                           ) -> EngineTiming | None:
    """``kernel`` timed against the userspace engine ``--engine openssl``
    would use; None (and a debug line) if the timing failed: it is only
    information, and the engine passed its self-test."""
    userspace = OpenSSLEngine(helpers=options.helpers, native_helper=options.native)
    try:
        return time_engines(kernel, userspace, userspace.label)
    except (EngineError, OSError) as exc:
        log.debug("could not time the engines: %s", exc)
        return None
    finally:
        userspace.close()


def _chosen(engine: XtsEngine, reason: str) -> EngineChoice:
    # Debug level: a command that works says at most one short line; this
    # detail is for ``-v``, ``cryptfs info`` and the daemon's log.
    log.debug("using the %s engine, %s: %s", engine.name, engine.describe(), reason)
    return EngineChoice(engine, reason)
