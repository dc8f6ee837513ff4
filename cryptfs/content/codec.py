"""Encrypted reads, writes and truncation of one backing file.

``ContentCodec`` holds what all files share (keys, session cache);
``EncryptedFile`` wraps one open backing file descriptor.  Every change is a
read-modify-write of whole pages: partial first/last pages are decrypted,
patched and re-encrypted; a page that stops being the final one loses its
trailer; a page that becomes final gains one.

Callers serialise writes and truncates of the same file (the filesystem
layer holds a per-inode lock); reads may run concurrently with each other.
"""

from __future__ import annotations

import errno
import os
import secrets

from cryptfs.content.format import (
    HEADER_SIZE,
    TRAILER_SIZE,
    FileHeader,
    PageRun,
    backing_size,
    final_page,
    page_bytes,
    pages_for,
    plaintext_size,
    unit_offset,
)
from cryptfs.content.sessions import SessionCache
from cryptfs.engines.base import PAGE_SIZE, Scratch, fill_zeros, is_zero
from cryptfs.errors import HeaderCorruptError, TrailerError
from cryptfs.keys import FILE_ID_LEN, KeyRing
from cryptfs.linux import FALLOC_FL_KEEP_SIZE, fallocate, filesystem_type, page_cached


class ContentCodec:
    def __init__(self, keys: KeyRing, sessions: SessionCache) -> None:
        self._header_key = keys.header_key
        self.sessions = sessions
        self._memory_devs: dict[int, bool] = {}

    def new_header(self) -> FileHeader:
        return FileHeader(secrets.token_bytes(FILE_ID_LEN))

    def encode_header(self, header: FileHeader) -> bytes:
        return header.encode(self._header_key)

    def decode_header(self, data: bytes) -> FileHeader:
        return FileHeader.decode(data, self._header_key)

    def in_memory(self, dev: int, fd: int) -> bool:
        """Whether backing device ``dev`` (of ``fd``) is tmpfs or ramfs (cached)."""
        known = self._memory_devs.get(dev)
        if known is None:
            known = self._memory_devs[dev] = in_memory_filesystem(fd)
        return known

    def open(self, fd: int) -> EncryptedFile:
        """Wrap ``fd``; its header is read (and authenticated) now if present."""
        return EncryptedFile(self, fd)


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate backing blocks before overwriting pages in place, so that a
    full disk fails the write cleanly (ENOSPC) instead of half-way through a
    page.  Filesystems without fallocate are left to the write itself."""
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


_MEMORY_FILESYSTEMS = {0x01021994, 0x858458F6}  # tmpfs, ramfs: f_type from statfs(2)


def in_memory_filesystem(fd: int) -> bool:
    """True if ``fd`` lives on tmpfs or ramfs, whose reads never wait for a disk."""
    return filesystem_type(fd) in _MEMORY_FILESYSTEMS


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# Per-thread buffers, reused by every file: plaintext being decrypted out of
# or encrypted into a run, and the run's ciphertext on its way to the disk.
_decrypted, _plaintext, _ciphertext = Scratch(), Scratch(), Scratch()


class EncryptedFile:
    def __init__(self, codec: ContentCodec, fd: int) -> None:
        self._codec = codec
        self.fd = fd
        self.header: FileHeader | None = None
        st = os.fstat(fd)
        self._dev, stored = st.st_dev, st.st_size
        plaintext_size(stored)  # an impossible size is refused at open, not read as empty
        if stored:
            data = os.pread(fd, HEADER_SIZE, 0)
            if len(data) < HEADER_SIZE:
                raise HeaderCorruptError(f"backing file is only {len(data)} bytes")
            self.header = codec.decode_header(data)

    # -- scheduling --

    def cached(self, offset: int, length: int) -> bool:
        """True if the backing pages that an I/O of ``length`` plaintext
        bytes at ``offset`` may read (its first and last page) are in memory,
        so the call will not wait for a disk."""
        if self._codec.in_memory(self._dev, self.fd):
            return True
        last = offset + max(length, 1) - 1
        return all(page_cached(self.fd, unit_offset(page)) is True
                   for page in {offset // PAGE_SIZE, last // PAGE_SIZE})

    # -- sizes --

    def size(self) -> int:
        return plaintext_size(os.fstat(self.fd).st_size)

    def ensure_header(self) -> FileHeader:
        if self.header is None:
            header = self._codec.new_header()
            pwrite_all(self.fd, self._codec.encode_header(header), 0)
            self.header = header
        return self.header

    # -- the cipher --

    def _decrypt_run(self, run: PageRun) -> memoryview:
        """The run's plaintext, in this thread's scratch buffer: valid until
        the thread's next ``_decrypt_run``."""
        assert self.header is not None
        buf = _decrypted.get(run.length)
        with self._codec.sessions.session(self.header.file_id) as session:
            session.decrypt_file(run.first, self.fd, run.offset, run.length, buf)
        if run.has_trailer and not is_zero(buf[-TRAILER_SIZE:]):
            raise TrailerError(
                f"final page {run.last} failed its check (damaged, truncated or moved)"
            )
        return buf

    def _write_run(self, first: int, length: int,
                   pieces: list[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Encrypt the run of ``length`` stored bytes starting at page
        ``first`` and write it in place.  Its plaintext is zero except for
        ``pieces``: (offset in the run, bytes)."""
        header = self.ensure_header()
        plain = _plaintext.get(length)  # page-aligned: the kernel engine vmsplices it
        filled = 0
        for at, piece in pieces:  # in order, not overlapping; zeros in the gaps
            fill_zeros(plain[filled:at])
            plain[at:at + len(piece)] = piece
            filled = at + len(piece)
        fill_zeros(plain[filled:])
        out = _ciphertext.get(length)
        with self._codec.sessions.session(header.file_id) as session:
            session.encrypt(first, plain, out)
        reserve(self.fd, unit_offset(first), length)
        pwrite_all(self.fd, out, unit_offset(first))

    def _page(self, page: int, size: int) -> bytes:
        """The plaintext bytes of one existing page (0..4096 of them)."""
        count = page_bytes(page, size)
        return self.read(page * PAGE_SIZE, count, size) if count else b""

    # -- the operations --

    def read(self, offset: int, length: int, size: int | None = None) -> bytes:
        """Up to ``length`` plaintext bytes at ``offset`` (short at EOF)."""
        if size is None:
            size = self.size()
        end = min(size, offset + length)
        if end <= offset:
            return b""
        run = pages_for(offset, end, size)
        return bytes(self._decrypt_run(run)[run.plaintext_slice(offset, end)])  # one copy

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset``, extending the file (with a hole) if needed."""
        length = len(data)
        if not length:
            return 0
        old = self.size()
        end = offset + length
        new = max(old, end)
        run = pages_for(offset, end, new)
        # Old plaintext that the run's edge pages keep.  Read everything
        # before writing anything: the write may overwrite the old trailer.
        page_start, page_end = run.first * PAGE_SIZE, (run.last + 1) * PAGE_SIZE
        head = self.read(page_start, offset - page_start, old)
        tail = self.read(end, page_end - end, old)
        stale = final_page(old) if old and final_page(old) < run.first else None
        stale_plain = self._page(stale, old) if stale is not None else b""

        self._write_run(run.first, run.length,
                        [(0, head), (offset - page_start, data), (end - page_start, tail)])
        if stale is not None:
            self._retire_final(stale, stale_plain, old, clear_spill=run.first > stale + 1)
        return length

    def _retire_final(self, page: int, plain: bytes, old_size: int, clear_spill: bool) -> None:
        """Re-encrypt an old final page as an ordinary full page (zero padded).
        If its trailer spilled into the next page and that page is now a hole,
        zero the spilled bytes so the hole reads as zeros."""
        self._write_run(page, PAGE_SIZE, [(0, plain)])
        spill = page_bytes(page, old_size) + TRAILER_SIZE - PAGE_SIZE
        if clear_spill and spill > 0:
            pwrite_all(self.fd, bytes(spill), unit_offset(page + 1))

    def truncate(self, size: int) -> None:
        """Set the plaintext size, growing with a hole or shrinking."""
        old = self.size()
        if size == old:
            return
        if size == 0:
            os.ftruncate(self.fd, HEADER_SIZE if self.header is not None else 0)
            return
        if size < old or final_page(size) == final_page(old):
            # The new final page is an existing page: re-encrypt it with a trailer.
            page = final_page(size)
            plain = self._page(page, old)[:page_bytes(page, size)]
            self._write_run(page, page_bytes(page, size) + TRAILER_SIZE, [(0, plain)])
            os.ftruncate(self.fd, backing_size(size))
            return
        # Growing past the old final page: that page becomes a full page and
        # the new final unit is a hole (all zeros), which reads as zeros.
        self.ensure_header()
        stale = final_page(old) if old else None
        plain = self._page(stale, old) if stale is not None else b""
        os.ftruncate(self.fd, backing_size(size))
        if stale is not None:
            self._retire_final(stale, plain, old, clear_spill=True)
