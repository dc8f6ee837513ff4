"""The userspace engine: AES-256-XTS from OpenSSL (engine name ``openssl``).

Three paths give the same bytes: ``native`` (the C helper of
``native.py``, used whenever it is built), and the pure ``cryptography``
paths ``direct`` (its context constructors, called without the public API's
per-call checks) and ``public`` (the public ``Cipher`` API).  The
``cryptography`` path is the fallback and the reference the kernel engine
and the helper are checked against, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cryptfs.engines import native
from cryptfs.engines.base import (
    XTS_KEY_LEN,
    Buffer,
    XtsSession,
    is_zero,
    read_plaintext,
    read_run,
    tweak,
    units,
)
from cryptfs.engines.parallel import ParallelRuns
from cryptfs.errors import EngineUnavailableError

try:  # cryptography >= 42 exposes the OpenSSL version through the backend
    from cryptography.hazmat.backends.openssl.backend import backend as _backend

    _OPENSSL = _backend.openssl_version_text()
except Exception:  # pragma: no cover - informational only
    _OPENSSL = "OpenSSL"


ContextFactory = Callable[[algorithms.AES, modes.XTS], Any]


def _public_factories() -> tuple[ContextFactory, ContextFactory]:
    return (lambda aes, mode: Cipher(aes, mode).encryptor(),
            lambda aes, mode: Cipher(aes, mode).decryptor())


def _direct_factories() -> tuple[ContextFactory, ContextFactory] | None:
    """The functions ``Cipher.encryptor``/``decryptor`` end in, called
    directly.  XTS needs a new context per 4 KiB unit (the tweak cannot be
    reset), and ``Cipher()``'s argument checks cost as much as the AES work
    itself; the checks are done once per session instead (see
    ``OpenSSLSession``).  Absent from some ``cryptography`` versions: then
    the public API is used, with the same bytes."""
    try:
        from cryptography.hazmat.bindings._rust import openssl as rust_openssl

        ciphers = rust_openssl.ciphers
        return ciphers.create_encryption_ctx, ciphers.create_decryption_ctx
    except (ImportError, AttributeError):  # pragma: no cover - older cryptography
        return None


FACTORIES = {"public": _public_factories(), "direct": _direct_factories()}


class OpenSSLSession:
    """One file's key.  ``cryptography`` contexts are per call, so this is
    thread-safe; creating one context per unit is the main cost."""

    def __init__(self, key: bytes, factories: str = "direct") -> None:
        if len(key) != XTS_KEY_LEN:
            raise ValueError("AES-256-XTS needs a 64-byte key")
        aes = algorithms.AES(key)
        Cipher(aes, modes.XTS(tweak(0)))  # the public API's checks, once
        self._aes: algorithms.AES | None = aes
        self._encryptor, self._decryptor = FACTORIES[factories] or FACTORIES["public"]

    def _crypt(self, encrypt: bool, first: int, src: Buffer, dst: memoryview,
               holes: bool = False) -> None:
        """Cipher each unit of ``src`` into ``dst``; with ``holes``, units
        stored as all zeros are copied as zeros (the hole rule)."""
        aes = self._aes
        if aes is None:
            raise ValueError("session is closed")
        make, xts = self._encryptor if encrypt else self._decryptor, modes.XTS
        view = memoryview(src)
        for k, start, size in units(len(view)):
            end = start + size
            if holes and is_zero(view[start:end]):
                dst[start:end] = view[start:end]
            else:
                make(aes, xts(tweak(first + k))).update_into(view[start:end], dst[start:end])

    def encrypt(self, first: int, src: Buffer, dst: memoryview) -> None:
        self._crypt(True, first, src, dst)

    def decrypt(self, first: int, src: Buffer, dst: memoryview) -> None:
        self._crypt(False, first, src, dst)

    def decrypt_file(self, first: int, fd: int, offset: int, length: int,
                     dst: memoryview) -> None:
        if self._aes is None:
            raise ValueError("session is closed")
        self._crypt(False, first, read_run(fd, offset, length), dst, holes=True)

    def read_plaintext(self, first: int, fd: int, offset: int, length: int,
                       start: int, end: int, zero_tail: int) -> bytes | None:
        return read_plaintext(self, first, fd, offset, length, start, end, zero_tail)

    def close(self) -> None:
        self._aes = None


PATHS = ("native", "direct", "public")
LABELS = {"native": "openssl (native EVP helper)", "direct": "openssl (cryptography)",
          "public": "openssl (cryptography)"}


class OpenSSLEngine:
    name = "openssl"
    # Largest request run on the event loop's thread (when its pages are in
    # memory): every request the kernel sends (1 MiB).  On the cryptography
    # path the cipher holds the GIL, so a worker only overlaps the backing
    # file's syscalls; on the native path the hop costs more than it buys
    # too: the loop thread sits idle while the worker ciphers, and the hop
    # and wake-up add latency to each of the kernel's few reads in flight
    # (1 MiB requests inline, scripts/bench same run, 1 GiB: cold reads
    # 1.55-1.69x, sequential writes 1.25x).  Large runs are split over the
    # engine's own threads instead.
    inline_max = 1024 * 1024

    def __init__(self, path: str | None = None, helpers: int | None = None,
                 native_helper: bool = True) -> None:
        """``path``: one of ``PATHS``; by default ``native`` when the helper is
        available, else ``direct``.  ``helpers``: threads that large runs are
        split over on the native path (default: one per further CPU).
        ``native_helper``: False makes the helper unavailable."""
        self._helper, self._why_not_native = native.load(native_helper)
        if path is None:
            path = "native" if self._helper else "direct"
        if path not in PATHS:
            raise ValueError(f"unknown openssl path {path!r}")
        if path == "native" and self._helper is None:
            raise EngineUnavailableError(
                f"the native helper is unavailable: {self._why_not_native}")
        self.path = path
        self._parallel = ParallelRuns(helpers)

    @property
    def label(self) -> str:
        """Which implementation this is, for ``cryptfs speed``."""
        return LABELS[self.path]

    def open_session(self, key: bytes) -> XtsSession:
        if self._helper is not None and self.path == "native":
            return native.NativeSession(self._helper, key, self._parallel)
        return OpenSSLSession(key, self.path)

    def describe(self) -> str:
        if self._helper is not None and self.path == "native":
            threads = self._parallel.helpers + 1
            return (f"{self.label}: AES-256-XTS in C over {self._helper.OPENSSL_VERSION}, "
                    f"GIL released, large runs split over {threads} thread(s)")
        why = f"; native helper not used: {self._why_not_native}" if self._why_not_native else ""
        return f"{self.label}: userspace AES-256-XTS via {_OPENSSL}{why}"

    def close(self) -> None:
        self._parallel.close()
