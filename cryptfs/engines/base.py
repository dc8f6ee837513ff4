"""What every crypto engine provides: AES-256-XTS over runs of data units.

A *run* is a contiguous byte range made of consecutive data units.  Every
unit is one 4096-byte page except the last, which takes whatever remains
(16 to 4112 bytes: a final page of r bytes plus cryptfs' 16-byte trailer is
encrypted as one unit with ciphertext stealing).  Unit ``k`` of a run that
starts at unit index ``first`` uses the tweak ``first + k`` as a 128-bit
little-endian number.

Engines also own reading ciphertext from a backing file (so the kernel
engine can splice it straight into the cipher) and therefore apply the hole
rule there: a unit whose stored bytes are all zero decrypts to zeros.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from cryptfs.errors import BackingSizeError

PAGE_SIZE = 4096
XTS_KEY_LEN = 64  # AES-256-XTS: 32-byte data key, then 32-byte tweak key
MIN_UNIT = 16  # XTS needs at least one AES block

Buffer = bytes | bytearray | memoryview | mmap.mmap


def tweak(index: int) -> bytes:
    """The XTS tweak (IV) of data unit ``index``: 128-bit little-endian."""
    return index.to_bytes(16, "little")


def unit_count(length: int) -> int:
    """How many data units a run of ``length`` bytes has."""
    if length < MIN_UNIT:
        raise ValueError(f"a run must be at least {MIN_UNIT} bytes, not {length}")
    return -(-(length - MIN_UNIT) // PAGE_SIZE) or 1  # ceil((length - 16) / 4096)


def units(length: int) -> Iterator[tuple[int, int, int]]:
    """Split a run of ``length`` bytes into ``(k, start, size)`` per unit."""
    count = unit_count(length)
    for k in range(count - 1):
        yield k, k * PAGE_SIZE, PAGE_SIZE
    start = (count - 1) * PAGE_SIZE
    yield count - 1, start, length - start


def group_units(
    length: int, is_hole: Callable[[int, int, int], bool], max_units: int = 1 << 30
) -> Iterator[tuple[bool, int, int]]:
    """Group the units of a run into maximal spans ``(hole, start, end)`` of
    holes or of data (data spans at most ``max_units`` units long), so each
    data span is one call into the cipher."""
    span_hole, span_start, span_units = None, 0, 0
    for k, start, size in units(length):
        hole = is_hole(k, start, size)
        if hole != span_hole or (not hole and span_units == max_units):
            if span_hole is not None:
                yield span_hole, span_start, start
            span_hole, span_start, span_units = hole, start, 0
        span_units += 1
    yield bool(span_hole), span_start, length


def aligned_buffer(size: int) -> mmap.mmap:
    """A zero-filled, page-aligned, writable buffer (the kernel engine can
    vmsplice these without copying)."""
    return mmap.mmap(-1, max(size, 1))


_ZEROS = bytes(PAGE_SIZE + PAGE_SIZE)  # covers a whole unit, the largest we check


def is_zero(data: Buffer) -> bool:
    """True if every byte is zero (a memcmp against a zero buffer, no copy)."""
    if len(data) <= len(_ZEROS):
        return _ZEROS.startswith(data)
    return bytes(data) == bytes(len(data))


def fill_zeros(dst: memoryview) -> None:
    """Zero ``dst`` in place (without allocating for the common sizes)."""
    size = len(dst)
    dst[:] = memoryview(_ZEROS)[:size] if size <= len(_ZEROS) else bytes(size)


@dataclass(frozen=True)
class EngineOptions:
    """How engines are built.  Engines never read the environment: the
    command line reads its overrides once (``cli/common.py``
    ``environment_overrides``) and passes this down."""

    native: bool = True  # False: the userspace engine keeps to ``cryptography``
    run_threads: int | None = None  # threads a large run may use; None: by CPUs

    @property
    def helpers(self) -> int | None:
        """Threads besides the caller's (``ParallelRuns``), None for the default."""
        return None if self.run_threads is None else self.run_threads - 1


class Scratch:
    """A page-aligned buffer per thread, grown on demand and reused: a fresh
    buffer per request would cost a page fault per 4 KiB.

    The aliasing rule: a view from ``get`` is valid until the same thread
    calls ``get`` on the same ``Scratch`` again (the next call hands out the
    same memory).  So each role (plaintext, ciphertext, stored units, ...)
    has a ``Scratch`` of its own, no function holds a view across a call
    that may ``get`` the same one, views never reach another thread except
    as slices the caller waits for (``ParallelRuns``), and what leaves the
    call (FUSE's reply) is copied to ``bytes``.  Enforced where cheap: the
    next ``get`` releases the view handed out before, so using that view
    object afterwards raises ``ValueError`` instead of reading other data
    (slices taken from it are not covered)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, size: int) -> memoryview:
        local = self._local
        last = getattr(local, "view", None)
        if last is not None:
            # BufferError: exported to C right now; cannot be checked, not an error.
            with contextlib.suppress(BufferError):
                last.release()
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < size:
            buf = local.buf = aligned_buffer(max(size, 64 * PAGE_SIZE))
        view = local.view = memoryview(buf)[:size]
        return view


def pread_into(fd: int, dst: memoryview, offset: int) -> None:
    """Fill ``dst`` from ``fd`` at ``offset`` or raise ``BackingSizeError``."""
    done = 0
    while done < len(dst):
        n = os.preadv(fd, [dst[done:]], offset + done)
        if not n:
            raise BackingSizeError(
                f"backing file ended at {offset + done} while reading {len(dst)} "
                f"bytes at {offset} (changed behind the mount?)"
            )
        done += n


_ciphertext = Scratch()  # per-thread buffer for ciphertext read from backing files


def read_run(fd: int, offset: int, length: int) -> memoryview:
    """The ``length`` bytes at ``offset`` in ``fd``, in this thread's scratch
    buffer (valid until the thread's next ``read_run``)."""
    data = _ciphertext.get(length)
    pread_into(fd, data, offset)
    return data


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Read exactly ``size`` bytes or raise ``BackingSizeError`` (the backing
    file was truncated behind our back)."""
    data = os.pread(fd, size, offset)
    if len(data) < size:
        rest = bytearray(size - len(data))
        pread_into(fd, memoryview(rest), offset + len(data))
        data += rest
    return data


_plaintext = Scratch()  # per-thread buffer for runs decrypted by read_plaintext


def read_plaintext(session: XtsSession, first: int, fd: int, offset: int, length: int,
                   start: int, end: int, zero_tail: int) -> bytes | None:
    """``XtsSession.read_plaintext`` through ``session.decrypt_file`` (for
    engines without a one-call read path): decrypt into a scratch buffer,
    then copy the slice out."""
    buf = _plaintext.get(length)
    session.decrypt_file(first, fd, offset, length, buf)
    if zero_tail and not is_zero(buf[length - zero_tail:]):
        return None
    return bytes(buf[start:end])


class XtsSession(Protocol):
    """AES-256-XTS under one file's key.  Safe to call from several threads."""

    def encrypt(self, first: int, src: Buffer, dst: memoryview) -> None:
        """Encrypt the run ``src`` (first unit index ``first``) into ``dst``."""

    def decrypt(self, first: int, src: Buffer, dst: memoryview) -> None:
        """Decrypt the run ``src`` into ``dst``."""

    def decrypt_file(self, first: int, fd: int, offset: int, length: int,
                     dst: memoryview) -> None:
        """Decrypt the run stored at ``offset`` in ``fd`` into ``dst``; units
        stored as all zeros (holes) come out as zeros."""

    def read_plaintext(self, first: int, fd: int, offset: int, length: int,
                       start: int, end: int, zero_tail: int) -> bytes | None:
        """The read path in one call: decrypt the run stored at ``offset``
        (as ``decrypt_file``) and return its plaintext bytes ``start..end``;
        None if its last ``zero_tail`` plaintext bytes are not all zero."""

    def close(self) -> None:
        """Release kernel resources.  Idempotent."""


class XtsEngine(Protocol):
    """A factory of per-file sessions (and of the threads large runs are
    split over, stopped by ``close()``)."""

    name: str
    # Largest request worth running on the event loop's thread instead of a
    # worker (see ``MountOptions.inline_max``).
    inline_max: int

    def open_session(self, key: bytes) -> XtsSession: ...

    def describe(self) -> str:
        """One line for logs and ``cryptfs info`` (never key material)."""
        ...

    def close(self) -> None:
        """Stop the engine's helper threads, if any (idempotent)."""
        ...
