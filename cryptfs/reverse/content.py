"""File contents of the view: a plaintext file encrypted as it is read.

Sizes come from the plaintext size alone (``content/format.py`` and
``content/tags.py`` arithmetic), so listings and stats read no contents.
A read encrypts the pages it covers through the engine session the
forward mount uses (the native helper or the kernel engine, large runs
split over threads), with the page index as tweak, exactly the units a
forward mount would have written; holes are read as zeros and encrypted
like any page (the copy then holds no holes, as a forward write of zeros
would not).

The plaintext size is taken once, when the file is opened: every read of
that open file encrypts against it (a file that shrank meanwhile reads as
zeros past its end), so the final page and its trailer stay where the
reported size puts them.  The key and tweaks depend only on the path, so a
file changing while it is read gives its new bytes under the same key,
never bytes under another.  In authenticated mode each tag page and the up
to 256 pages it covers are encrypted together and kept for the open file,
so tags and pages are computed from the same plaintext.
"""

from __future__ import annotations

import os
import threading

from cryptfs.content.codec import ContentCodec, in_memory_filesystem
from cryptfs.content.format import HEADER_SIZE, FileHeader, final_page, stored_length
from cryptfs.content.tags import HEADER_SLOTS, SLOTS, STRIDE, tag_offset
from cryptfs.engines.base import PAGE_SIZE, Scratch, fill_zeros
from cryptfs.lowlevel.linux import page_cached

# Per-thread buffers: plaintext read from the file, and its ciphertext.
_plain, _cipher = Scratch(), Scratch()


def read_available(fd: int, dst: memoryview, offset: int) -> int:
    """Fill ``dst`` from ``fd`` at ``offset`` until full or end of file;
    returns the bytes read."""
    done = 0
    while done < len(dst):
        n = os.preadv(fd, [dst[done:]], offset + done)
        if not n:
            break
        done += n
    return done


class EncryptingReader:
    """Reads of the view of one open plaintext file.  Thread-safe."""

    def __init__(self, codec: ContentCodec, fd: int, file_id: bytes) -> None:
        self._codec = codec
        self.fd = fd
        self._file_id = file_id
        self.size = os.fstat(fd).st_size
        self.total = codec.layout.backing_size(self.size)
        self._header = codec.encode_header(FileHeader(file_id))
        self._final = final_page(self.size) if self.size else -1
        self._lock = threading.Lock()
        self._segment: tuple[int, int, bytes] | None = None  # (index, start, bytes)
        self._in_memory: bool | None = None

    def cached(self, offset: int, length: int) -> bool:
        """Whether the plaintext pages a read of the view at ``offset``
        needs are in memory (its first and last are probed; in
        authenticated mode the tag pages shift them by under 0.4 %, close
        enough for a guess), so the read will not wait for a disk."""
        if self._in_memory is None:
            self._in_memory = in_memory_filesystem(self.fd)
        if self._in_memory or not self.size:
            return True
        ends = {min(max(at - HEADER_SIZE, 0), self.size - 1)
                for at in (offset, offset + max(length, 1) - 1)}
        return all(page_cached(self.fd, at) is True for at in ends)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.total, offset + length)
        if end <= offset:
            return b""
        if self._codec.tagger is not None:
            return self._read_tagged(offset, end)
        parts: list[bytes | memoryview] = []
        if offset < HEADER_SIZE:
            parts.append(self._header[offset:min(end, HEADER_SIZE)])
        if end > HEADER_SIZE:
            low = max(offset, HEADER_SIZE)
            first = (low - HEADER_SIZE) // PAGE_SIZE
            last = min((end - 1 - HEADER_SIZE) // PAGE_SIZE, self._final)
            base = HEADER_SIZE + first * PAGE_SIZE
            parts.append(self._encrypt(first, last)[low - base:end - base])
        return b"".join(parts)

    def _encrypt(self, first: int, last: int) -> memoryview:
        """Ciphertext of pages ``first..last`` as stored (the final page
        with its trailer), in this thread's scratch buffer."""
        length = (last - first) * PAGE_SIZE + stored_length(last, self.size)
        src = _plain.get(length)
        wanted = min(self.size, (last + 1) * PAGE_SIZE) - first * PAGE_SIZE
        got = read_available(self.fd, src[:wanted], first * PAGE_SIZE)
        fill_zeros(src[got:])  # the trailer, and a file that shrank since it was opened
        dst = _cipher.get(length)
        with self._codec.sessions.session(self._file_id) as session:
            session.encrypt(first, src, dst)
        return dst

    # -- authenticated mode --

    def _read_tagged(self, offset: int, end: int) -> bytes:
        parts = []
        pos = offset
        while pos < end:
            index = (pos // PAGE_SIZE + HEADER_SLOTS) // STRIDE
            start, data = self._tagged_segment(index)
            stop = min(end, start + len(data))
            parts.append(data[pos - start:stop - start])
            pos = stop
        return b"".join(parts)

    def _tagged_segment(self, index: int) -> tuple[int, bytes]:
        """Tag page ``index`` followed by the pages whose tags it holds
        (page 0 is the header page), as one byte string, cached."""
        with self._lock:
            cached = self._segment
        if cached is not None and cached[0] == index:
            return cached[1], cached[2]
        first = 0 if index == 0 else SLOTS * index - HEADER_SLOTS
        last = min(SLOTS * (index + 1) - HEADER_SLOTS - 1, self._final)
        start = 0 if index == 0 else PAGE_SIZE * (STRIDE * index - HEADER_SLOTS)
        tag_page = bytearray(self._header if index == 0 else PAGE_SIZE)
        if last < first:
            data = bytes(tag_page)
        else:
            ciphertext = self._encrypt(first, last)
            tagger = self._codec.tagger
            assert tagger is not None
            tags = tagger.tags(self._file_id, first, self.size, ciphertext)
            at = tag_offset(first) - start
            tag_page[at:at + len(tags)] = tags
            data = bytes(tag_page) + bytes(ciphertext)
        with self._lock:
            self._segment = (index, start, data)
        return start, data
