"""The userspace engine: AES-256-XTS from ``cryptography`` (OpenSSL).

Available everywhere and fast on CPUs with AES instructions; it is the
reference the kernel engine is checked against, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cryptfs.engines.base import (
    XTS_KEY_LEN,
    Buffer,
    Scratch,
    is_zero,
    pread_into,
    tweak,
    units,
)

try:  # cryptography >= 42 exposes the OpenSSL version through the backend
    from cryptography.hazmat.backends.openssl.backend import backend as _backend

    _OPENSSL = _backend.openssl_version_text()
except Exception:  # pragma: no cover - informational only
    _OPENSSL = "OpenSSL"


_ciphertext = Scratch()  # per-thread buffer for ciphertext read from backing files

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
        data = _ciphertext.get(length)
        pread_into(fd, data, offset)
        self._crypt(False, first, data, dst, holes=True)

    def close(self) -> None:
        self._aes = None


class OpenSSLEngine:
    name = "openssl"
    # The cipher holds the GIL, so a worker thread only overlaps the backing
    # file's syscalls, which is worth less than the hop to it (measured with
    # scripts/bench).
    inline_max = 128 * 1024

    def __init__(self, factories: str = "direct") -> None:
        self._factories = factories

    def open_session(self, key: bytes) -> OpenSSLSession:
        return OpenSSLSession(key, self._factories)

    def describe(self) -> str:
        return f"openssl (userspace AES-256-XTS via cryptography, {_OPENSSL})"

