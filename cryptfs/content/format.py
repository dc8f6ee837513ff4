"""The content format: header page, page layout and size arithmetic (pure).

A non-empty backing file is a 4096-byte header followed by the plaintext's
pages, each encrypted as one AES-256-XTS data unit at a page-aligned offset
(plaintext page ``i`` lives at backing offset ``4096 * (i + 1)``).  The final
page of ``r`` bytes (1..4096) is encrypted together with 16 zero bytes as a
single ``r + 16``-byte unit, so::

    backing_size = 0                  for an empty file that was never written
    backing_size = 4096               for an empty file with a header
    backing_size = 4096 + size + 16   otherwise

and the plaintext size follows from the backing size alone.  docs/format.md
is the full specification.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptfs.engines.base import PAGE_SIZE
from cryptfs.errors import (
    BackingSizeError,
    HeaderAuthError,
    HeaderCorruptError,
    HeaderVersionError,
)
from cryptfs.keys.hierarchy import FILE_ID_LEN

HEADER_SIZE = PAGE_SIZE
TRAILER_SIZE = 16
MAGIC = b"CRYPTFS\x00"
CONTENT_VERSION = 1
# magic (8) | version u16 BE | flags u16 BE (0) | file ID (16) | HMAC-SHA256 (32)
_FIXED = struct.Struct(">8sHH16s")
MAC_OFFSET = _FIXED.size  # 28
MAC_SIZE = 32
HEADER_USED = MAC_OFFSET + MAC_SIZE  # 60; the rest of the page is zero
# Header flags: authenticated mode (the rest of the page then holds tags, §4.6).
FLAG_AUTHENTICATED = 0x0001
HEADER_FIELDS = 64  # bytes 60..63 are zero in both modes


@dataclass(frozen=True)
class FileHeader:
    file_id: bytes

    def encode(self, header_key: bytes, flags: int = 0) -> bytes:
        fixed = _FIXED.pack(MAGIC, CONTENT_VERSION, flags, self.file_id)
        mac = hmac.digest(header_key, fixed, "sha256")  # one-shot: 1 us, not 8
        return (fixed + mac).ljust(HEADER_SIZE, b"\x00")

    @classmethod
    def decode(cls, data: bytes, header_key: bytes, flags: int = 0) -> FileHeader:
        """Parse and authenticate a header page whose flags must be ``flags``
        (the directory's mode); every failure is typed."""
        if len(data) != HEADER_SIZE:
            raise HeaderCorruptError(f"header is {len(data)} bytes, not {HEADER_SIZE}")
        magic, version, stored_flags, file_id = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise HeaderCorruptError("header lacks the cryptfs magic (not a cryptfs file)")
        if version != CONTENT_VERSION:
            raise HeaderVersionError(f"content format version {version} is not supported")
        if stored_flags != flags:
            raise HeaderCorruptError(
                f"header flags {stored_flags:#06x} do not match this directory's mode "
                f"({flags:#06x}: {'authenticated' if flags else 'default'})"
            )
        padding = data[HEADER_USED:HEADER_FIELDS if flags & FLAG_AUTHENTICATED else None]
        if any(padding):
            raise HeaderCorruptError("header has non-zero reserved bytes")
        expected = hmac.digest(header_key, data[:MAC_OFFSET], "sha256")
        if not hmac.compare_digest(expected, data[MAC_OFFSET:HEADER_USED]):
            raise HeaderAuthError(
                "header MAC mismatch: damaged, or a file from another cipher directory"
            )
        assert len(file_id) == FILE_ID_LEN
        return cls(file_id)


def plaintext_size(backing_size: int) -> int:
    """The plaintext size encoded by a backing size (no read needed)."""
    if backing_size in (0, HEADER_SIZE):
        return 0
    if backing_size < HEADER_SIZE + 1 + TRAILER_SIZE:
        raise BackingSizeError(
            f"backing size {backing_size} cannot encode any plaintext size "
            f"(valid: 0, {HEADER_SIZE}, or at least {HEADER_SIZE + 1 + TRAILER_SIZE})"
        )
    return backing_size - HEADER_SIZE - TRAILER_SIZE


def backing_size(size: int) -> int:
    """The backing size of a plaintext of ``size`` bytes (with a header)."""
    return HEADER_SIZE if size == 0 else HEADER_SIZE + size + TRAILER_SIZE


def unit_offset(page: int) -> int:
    """Backing offset of plaintext page ``page``."""
    return HEADER_SIZE + page * PAGE_SIZE


def final_page(size: int) -> int:
    """Index of the last page of a non-empty plaintext."""
    return (size - 1) // PAGE_SIZE


def page_bytes(page: int, size: int) -> int:
    """Plaintext bytes of ``page`` in a file of ``size`` bytes (0..4096)."""
    return max(0, min(PAGE_SIZE, size - page * PAGE_SIZE))


def stored_length(page: int, size: int) -> int:
    """Length of the unit that stores ``page``: a full page, or the final
    page's bytes plus the 16-byte trailer."""
    return page_bytes(page, size) + TRAILER_SIZE if page == final_page(size) else PAGE_SIZE


@dataclass(frozen=True)
class PageRun:
    """Consecutive pages ``first..last`` of a file of ``size`` bytes, as stored."""

    first: int
    last: int
    size: int

    @property
    def offset(self) -> int:
        return unit_offset(self.first)

    @property
    def length(self) -> int:
        """Stored bytes of the run (its final unit may carry the trailer)."""
        return (self.last - self.first) * PAGE_SIZE + stored_length(self.last, self.size)

    @property
    def has_trailer(self) -> bool:
        return self.last == final_page(self.size)

    def plaintext_slice(self, offset: int, end: int) -> slice:
        """Where plaintext bytes ``offset..end`` sit inside the run's buffer."""
        base = self.first * PAGE_SIZE
        return slice(offset - base, end - base)


def pages_for(offset: int, end: int, size: int) -> PageRun:
    """The run of pages holding plaintext bytes ``offset..end`` (end > offset)."""
    return PageRun(offset // PAGE_SIZE, (end - 1) // PAGE_SIZE, size)
