"""The userspace engine: AES-256-XTS from ``cryptography`` (OpenSSL).

Available everywhere and fast on CPUs with AES instructions; it is the
reference the kernel engine is checked against, byte for byte.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cryptfs.engines.base import (
    PAGE_SIZE,
    XTS_KEY_LEN,
    Buffer,
    group_units,
    is_zero,
    pread_exact,
    tweak,
    units,
)

try:  # cryptography >= 42 exposes the OpenSSL version through the backend
    from cryptography.hazmat.backends.openssl.backend import backend as _backend

    _OPENSSL = _backend.openssl_version_text()
except Exception:  # pragma: no cover - informational only
    _OPENSSL = "OpenSSL"


class OpenSSLSession:
    """One file's key.  ``cryptography`` contexts are per call, so this is
    thread-safe; the per-unit context creation is the main cost."""

    def __init__(self, key: bytes) -> None:
        if len(key) != XTS_KEY_LEN:
            raise ValueError("AES-256-XTS needs a 64-byte key")
        self._aes: algorithms.AES | None = algorithms.AES(key)

    def _crypt(self, encrypt: bool, first: int, src: Buffer, dst: memoryview) -> None:
        aes = self._aes
        if aes is None:
            raise ValueError("session is closed")
        view = memoryview(src)
        for k, start, size in units(len(view)):
            cipher = Cipher(aes, modes.XTS(tweak(first + k)))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            dst[start:start + size] = ctx.update(view[start:start + size])
            ctx.finalize()

    def encrypt(self, first: int, src: Buffer, dst: memoryview) -> None:
        self._crypt(True, first, src, dst)

    def decrypt(self, first: int, src: Buffer, dst: memoryview) -> None:
        self._crypt(False, first, src, dst)

    def decrypt_file(self, first: int, fd: int, offset: int, length: int,
                     dst: memoryview) -> None:
        data = memoryview(pread_exact(fd, length, offset))
        spans = group_units(length, lambda k, start, size: is_zero(data[start:start + size]))
        for hole, start, end in spans:
            if hole:
                dst[start:end] = bytes(end - start)
            else:
                self.decrypt(first + start // PAGE_SIZE, data[start:end], dst[start:end])

    def close(self) -> None:
        self._aes = None


class OpenSSLEngine:
    name = "openssl"

    def open_session(self, key: bytes) -> OpenSSLSession:
        return OpenSSLSession(key)

    def describe(self) -> str:
        return f"openssl (userspace AES-256-XTS via cryptography, {_OPENSSL})"

