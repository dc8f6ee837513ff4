"""The userspace engine's fast path: the native helper ``_xts`` (C over
OpenSSL's EVP interface, built from ``_xts.c`` at install time).

The helper keys the cipher once per file key, ciphers a whole run in C
(re-setting only the tweak per unit) and releases the GIL while it does, so
large runs are also split over threads (``parallel.py``).  It gives the
same bytes as the ``cryptography`` path, which stays the fallback when the
helper is not built or the caller turns it off (``CRYPTFS_NO_NATIVE=1``,
read by the command line).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from cryptfs.engines.base import PAGE_SIZE, XTS_KEY_LEN, Buffer, read_plaintext, read_run
from cryptfs.engines.parallel import ParallelRuns
from cryptfs.errors import BackingSizeError

NO_NATIVE_ENV = "CRYPTFS_NO_NATIVE"  # =1 turns the helper off (read in cli/common.py)


def load(enabled: bool = True) -> tuple[ModuleType | None, str]:
    """The helper module, or None and why it is not used (``enabled``:
    False when ``CRYPTFS_NO_NATIVE=1`` turned it off)."""
    if not enabled:
        return None, f"{NO_NATIVE_ENV}=1 is set"
    try:
        from cryptfs.engines import _xts
    except ImportError as exc:
        return None, f"not built or not loadable ({exc}); see README: Install"
    return _xts, ""


class NativeSession:
    """One file's key inside the helper; thread-safe (the helper hands each
    call its own OpenSSL context)."""

    def __init__(self, helper: ModuleType, key: bytes, parallel: ParallelRuns) -> None:
        if len(key) != XTS_KEY_LEN:
            raise ValueError("AES-256-XTS needs a 64-byte key")
        self._xts = helper.Xts(key)
        self._parallel = parallel

    def _run(self, fn: Callable[..., None], first: int, src: Buffer, dst: memoryview,
             holes: bool = False) -> None:
        length = len(src)
        if self._parallel.parts(length) == 1:
            fn(first, src, dst, holes)
            return
        view, out = memoryview(src), memoryview(dst)
        self._parallel.run(length, lambda start, end: fn(
            first + start // PAGE_SIZE, view[start:end], out[start:end], holes))

    def encrypt(self, first: int, src: Buffer, dst: memoryview) -> None:
        self._run(self._xts.encrypt, first, src, dst)

    def decrypt(self, first: int, src: Buffer, dst: memoryview) -> None:
        self._run(self._xts.decrypt, first, src, dst)

    def decrypt_file(self, first: int, fd: int, offset: int, length: int,
                     dst: memoryview) -> None:
        self._run(self._xts.decrypt, first, read_run(fd, offset, length), dst, holes=True)

    def read_plaintext(self, first: int, fd: int, offset: int, length: int,
                       start: int, end: int, zero_tail: int) -> bytes | None:
        if self._parallel.parts(length) > 1:
            return read_plaintext(self, first, fd, offset, length, start, end, zero_tail)
        try:  # pread, decrypt in place and slice, all in C: the 4 KiB read's path
            return self._xts.read(first, fd, offset, length, start, end, zero_tail)
        except EOFError as exc:
            raise BackingSizeError(f"{exc} (changed behind the mount?)") from exc

    def close(self) -> None:
        self._xts.close()
