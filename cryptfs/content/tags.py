"""Authenticated mode: where page tags live and how they are computed (pure).

Every page carries a 16-byte tag, HMAC-SHA256 truncated to 128 bits over
(stored unit, file ID, page index, size if final).  Tags sit in 256-slot tag
pages interleaved with the data pages; the header page is tag page 0 (its
first four slots are the header fields), so files of up to 252 pages have
the size of the default layout.  docs/format.md §4.6 is the specification.
"""

from __future__ import annotations

import hmac as std_hmac
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from cryptfs.content.format import HEADER_SIZE, TRAILER_SIZE, final_page
from cryptfs.engines.base import PAGE_SIZE, is_zero, units
from cryptfs.errors import BackingSizeError, PageTagError

TAG_SIZE = 16
SLOTS = PAGE_SIZE // TAG_SIZE  # 256 tags per tag page
HEADER_SLOTS = 4  # slots of the header page taken by the header fields (64 bytes)
STRIDE = SLOTS + 1  # a tag page and its 256 data pages
_CONTEXT = struct.Struct(">16sQQ")  # file ID, page index, final size (0 if not final)


def tag_pages_before(page: int) -> int:
    """Tag pages (not counting the header) stored before data page ``page``."""
    return (page + HEADER_SLOTS) // SLOTS


def unit_offset(page: int) -> int:
    return PAGE_SIZE * (1 + page + tag_pages_before(page))


def tag_offset(page: int) -> int:
    k = tag_pages_before(page)
    tag_page = STRIDE * k - HEADER_SLOTS if k else 0
    return PAGE_SIZE * tag_page + TAG_SIZE * ((page + HEADER_SLOTS) % SLOTS)


def backing_size(size: int) -> int:
    if size == 0:
        return HEADER_SIZE
    return HEADER_SIZE + size + TRAILER_SIZE + PAGE_SIZE * tag_pages_before(final_page(size))


def plaintext_size(backing: int) -> int:
    if backing in (0, HEADER_SIZE):
        return 0
    data = backing - HEADER_SIZE - TRAILER_SIZE
    last = (data - 1) // PAGE_SIZE
    if data < 1 or (last + HEADER_SLOTS) % STRIDE == SLOTS:
        raise BackingSizeError(
            f"backing size {backing} cannot encode any plaintext size "
            "(the file ends inside a tag page, or before its first unit)"
        )
    return data - PAGE_SIZE * ((last + HEADER_SLOTS) // STRIDE)


def segments(first: int, last: int) -> Iterator[tuple[int, int]]:
    """Split pages ``first..last`` into maximal runs ``(a, b)`` that share a
    tag page: each is contiguous in the backing file, and so are its tags."""
    a = first
    while a <= last:
        b = min(last, a + SLOTS - 1 - (a + HEADER_SLOTS) % SLOTS)
        yield a, b
        a = b + 1


@dataclass(frozen=True)
class BadPage:
    """A page whose tag does not match; ``kind`` is fsck's problem kind."""

    page: int
    kind: str  # final-page, tag-missing, page-zeroed, page-tag
    unit: bytes
    stored: bytes
    final_size: int

    def message(self) -> str:
        return {
            "final-page": f"final page {self.page} does not match the file size "
                          "(truncated, extended, or torn by a crash)",
            "tag-missing": f"page {self.page} has no tag (the file was extended, or its "
                           "tags were lost)",
            "page-zeroed": f"page {self.page} was overwritten with zeros",
            "page-tag": f"page {self.page} failed its tag check (modified, moved from "
                        "another place, or torn by a crash)",
        }[self.kind]


class PageTagger:
    """Computes and checks the tags of one cipher directory (thread-safe)."""

    def __init__(self, key: bytes) -> None:
        # Keyed HMAC states to copy: the key schedule once (a third of a
        # tag's cost), and the state after a whole zero unit (holes are cheap).
        self._keyed = HMAC(key, hashes.SHA256())
        self._zero_page = self._keyed.copy()
        self._zero_page.update(bytes(PAGE_SIZE))

    def tag(self, file_id: bytes, page: int, final_size: int, unit: bytes | memoryview,
            zero: bool | None = None) -> bytes:
        """The tag of ``unit`` stored as ``page``; ``zero``: whether the unit
        is all zeros, if the caller knows."""
        if zero is None:
            zero = is_zero(unit)
        if zero and len(unit) == PAGE_SIZE:
            mac = self._zero_page.copy()
        else:
            mac = self._keyed.copy()
            mac.update(unit)
        mac.update(_CONTEXT.pack(file_id, page, final_size))
        return mac.finalize()[:TAG_SIZE]

    def tags(self, file_id: bytes, first: int, size: int, run: memoryview) -> bytes:
        """The tags of the consecutive units in ``run`` (first page ``first``)."""
        final = final_page(size)
        return b"".join(
            self.tag(file_id, first + k, size if first + k == final else 0,
                     run[start:start + length])
            for k, start, length in units(len(run))
        )

    def hole_tags(self, file_id: bytes, first: int, last: int, size: int) -> bytes:
        """The tags of pages ``first..last`` stored as holes (zero units)."""
        final = final_page(size)
        return b"".join(
            self.tag(file_id, page, size if page == final else 0,
                     bytes(size - PAGE_SIZE * page + TRAILER_SIZE) if page == final
                     else _ZERO_PAGE, zero=True)
            for page in range(first, last + 1)
        )

    def check(self, file_id: bytes, first: int, size: int, run: memoryview,
              stored: bytes, holes: list[int] | None = None) -> Iterator[BadPage]:
        """Every page of ``run`` whose stored tag does not match; the units
        (counted from 0) that are holes are appended to ``holes``."""
        final = final_page(size)
        for k, start, length in units(len(run)):
            page, unit = first + k, run[start:start + length]
            final_size = size if page == final else 0
            want = stored[TAG_SIZE * k:TAG_SIZE * (k + 1)]
            zero = is_zero(unit)
            if std_hmac.compare_digest(self.tag(file_id, page, final_size, unit, zero), want):
                if zero and holes is not None:
                    holes.append(k)
                continue
            yield BadPage(page, _classify(page == final, unit, want), bytes(unit), want,
                          final_size)

    def verify(self, file_id: bytes, first: int, size: int, run: memoryview,
               stored: bytes) -> list[int]:
        """Raise ``PageTagError`` for the first page of ``run`` that fails;
        return the units that are (checked) holes."""
        holes: list[int] = []
        for bad in self.check(file_id, first, size, run, stored, holes):
            raise PageTagError(bad.message(), bad.kind)
        return holes


_ZERO_PAGE = bytes(PAGE_SIZE)


def _classify(final: bool, unit: memoryview, stored: bytes) -> str:
    if final:
        return "final-page"
    if is_zero(stored):
        return "tag-missing"
    if is_zero(unit):
        return "page-zeroed"
    return "page-tag"
