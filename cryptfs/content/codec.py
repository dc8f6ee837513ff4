"""Encrypted reads, writes and truncation of one backing file.

``ContentCodec`` holds what all files share (keys, session cache);
``EncryptedFile`` wraps one open backing file descriptor.  Every change is a
read-modify-write of whole pages: partial first/last pages are decrypted,
patched and re-encrypted; a page that stops being the final one loses its
trailer; a page that becomes final gains one.

In authenticated mode (docs/format.md §4.6) every page also has a tag:
reads check the tags of the pages they return on the very bytes they
decrypt, writes write the data units and then their tags, and pages that
become holes get the tags of holes.

Callers serialise writes and truncates of the same file (the filesystem
layer holds a per-inode lock); reads may run concurrently with each other.

With ``byte_range_locks`` (``cryptfs mount --shared``: other mounters
change the same backing files) every operation also holds OFD byte-range
locks on the backing bytes it reads and rewrites, and re-reads the backing
size and header under them: docs/design.md "Byte-range locks".
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cryptfs.content import format as plain_layout
from cryptfs.content import tags as tagged_layout
from cryptfs.content.format import (
    FLAG_AUTHENTICATED,
    HEADER_FIELDS,
    HEADER_SIZE,
    HEADER_USED,
    TRAILER_SIZE,
    FileHeader,
    PageRun,
    final_page,
    page_bytes,
    pages_for,
)
from cryptfs.content.sessions import SessionCache
from cryptfs.content.tags import SLOTS, TAG_SIZE, BadPage, PageTagger, segments, tag_offset
from cryptfs.engines.base import (
    PAGE_SIZE,
    Scratch,
    fill_zeros,
    group_units,
    pread_into,
    unit_count,
)
from cryptfs.errors import BackingSizeError, HeaderCorruptError, PageTagError, TrailerError
from cryptfs.keys.hierarchy import FILE_ID_LEN, KeyRing
from cryptfs.lowlevel import rangelock
from cryptfs.lowlevel.linux import FALLOC_FL_KEEP_SIZE, fallocate, filesystem_type, page_cached
from cryptfs.lowlevel.rangelock import Range, SharedReads, covers, merged


@dataclass(frozen=True)
class Layout:
    """Where a mode puts the pages of a file, and the size arithmetic."""

    plaintext_size: Callable[[int], int]
    backing_size: Callable[[int], int]
    unit_offset: Callable[[int], int]
    header_flags: int


DEFAULT = Layout(plain_layout.plaintext_size, plain_layout.backing_size,
                 plain_layout.unit_offset, 0)
AUTHENTICATED = Layout(tagged_layout.plaintext_size, tagged_layout.backing_size,
                       tagged_layout.unit_offset, FLAG_AUTHENTICATED)


class ContentCodec:
    def __init__(self, keys: KeyRing, sessions: SessionCache,
                 authenticated: bool = False, byte_range_locks: bool = False) -> None:
        """``byte_range_locks``: other writers may change the backing files
        meanwhile (a shared mount); off, the mount is the only writer and
        pays nothing for them."""
        self._header_key = keys.header_key
        self.byte_range_locks = byte_range_locks
        self.sessions = sessions
        self.layout = AUTHENTICATED if authenticated else DEFAULT
        self.tagger = PageTagger(keys.page_tag_key) if authenticated else None
        self._memory_devs: dict[int, bool] = {}

    def plaintext_size(self, backing: int) -> int:
        """The plaintext size a backing size encodes in this directory's mode."""
        return self.layout.plaintext_size(backing)

    def new_header(self) -> FileHeader:
        """A header with a fresh random file ID, not yet written anywhere:
        only ``EncryptedFile`` calls this, and writes it with ``_write_header``."""
        return FileHeader(secrets.token_bytes(FILE_ID_LEN))

    def encode_header(self, header: FileHeader) -> bytes:
        return header.encode(self._header_key, self.layout.header_flags)

    def decode_header(self, data: bytes) -> FileHeader:
        return FileHeader.decode(data, self._header_key, self.layout.header_flags)

    def in_memory(self, dev: int, fd: int) -> bool:
        """Whether backing device ``dev`` (of ``fd``) is tmpfs or ramfs (cached)."""
        known = self._memory_devs.get(dev)
        if known is None:
            known = self._memory_devs[dev] = in_memory_filesystem(fd)
        return known

    def open(self, fd: int) -> EncryptedFile:
        """Wrap ``fd``; its header is read (and authenticated) now if present."""
        return EncryptedFile(self, fd)


def refuse_stale_tags(header: bytes) -> None:
    """Authenticated mode: a header-only backing file is an empty file only
    if its tag slots are zero (cryptfs clears them when it empties a file).
    A tag left in them belongs to a page past the end: the backing file was
    cut to its header outside cryptfs, which no final page's tag can show."""
    if any(memoryview(header)[HEADER_FIELDS:]):
        raise PageTagError("the file was cut to its header: its tags describe pages "
                           "that are gone (truncated outside cryptfs, or a power loss "
                           "while it was being emptied); delete it or restore it",
                           "truncated")


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


def pwritev_all(fd: int, parts: list[bytes | bytearray | memoryview], offset: int) -> None:
    """``parts`` written one after another from ``offset`` (one syscall
    unless the kernel writes less)."""
    done = os.pwritev(fd, parts, offset)
    for part in parts:
        if done < len(part):
            pwrite_all(fd, memoryview(part)[done:], offset + done)
            done = 0
        else:
            done -= len(part)
        offset += len(part)


# Every change of a backing file's size is made under a write lock reaching
# to the end of the file and beyond (``rangelock`` ranges ending in None), so
# a read lock on this byte, far past any real file, keeps the size still: a
# growing write changes the size in steps (page by page) that a reader must
# not see, even one whose pages the writer does not touch.
SIZE_BYTE: Range = (1 << 62, (1 << 62) + 1)


# Per-thread buffers, reused by every file: plaintext being decrypted out of
# or encrypted into a run, the run's ciphertext on its way to the disk, and
# (authenticated mode) ciphertext read for checking and decrypting.  One per
# role because a view is valid only until the thread's next ``get`` on the
# same one (engines/base.py ``Scratch``): ``write`` reads (``_decrypted``,
# ``_stored``) before ``_write_run`` fills ``_plaintext`` and ``_ciphertext``,
# and every reply to FUSE is copied out to ``bytes``.
_decrypted, _plaintext, _ciphertext, _stored = Scratch(), Scratch(), Scratch(), Scratch()


class EncryptedFile:
    def __init__(self, codec: ContentCodec, fd: int) -> None:
        self._codec = codec
        self._layout = codec.layout
        self._tagger = codec.tagger
        self.fd = fd
        self.header: FileHeader | None = None
        self._header_raw = b""  # its first HEADER_USED bytes as stored
        self._dev = os.fstat(fd).st_dev
        self._reads = SharedReads(fd) if codec.byte_range_locks else None
        if self._reads is None:
            self._load_header(fd)
        else:  # not while another mounter is writing the first header
            with self._reads.hold([(0, HEADER_SIZE), SIZE_BYTE]):
                self._load_header(fd)

    def _load_header(self, fd: int) -> None:
        """Read the header of the backing file (none if it is empty)."""
        stored = os.fstat(fd).st_size
        self._layout.plaintext_size(stored)  # impossible sizes are refused now, not read as empty
        if not stored:
            self.header = None
            return
        data = os.pread(fd, HEADER_SIZE, 0)
        if len(data) < HEADER_SIZE:
            raise HeaderCorruptError(f"backing file is only {len(data)} bytes")
        header = self._codec.decode_header(data)
        if stored == HEADER_SIZE and self._tagger is not None:
            refuse_stale_tags(data)
        self.header, self._header_raw = header, data[:HEADER_USED]

    # -- byte-range locks (shared mounts) --

    def _refresh_header(self, fd: int) -> None:
        """Under a lock: the header as stored now.  A header never changes
        once written, so a stored one equal to the known one is kept; any
        other (first written by another mounter, or the file rewritten
        behind cryptfs's back) is read again."""
        if self.header is not None and os.pread(fd, HEADER_USED, 0) == self._header_raw:
            return
        self._load_header(fd)

    def _known_size(self) -> int | None:
        """The plaintext size, or None while the file has no header."""
        return None if self.header is None else self.size()

    def _tag_ranges(self, first: int, last: int) -> list[Range]:
        """Authenticated mode: the tag slots of pages ``first..last``."""
        if self._tagger is None:
            return []
        return [(tag_offset(a), tag_offset(a) + TAG_SIZE * (b - a + 1))
                for a, b in segments(first, last)]

    def _write_ranges(self, first: int, last: int, old: int | None) -> list[Range]:
        """What a write of pages ``first..last`` rewrites in a file of
        ``old`` bytes: those pages (and their tags); from the old final
        page to the end if it touches or passes it (retired, holes, new
        size); everything from the header on if the file is empty."""
        if not old:
            return [(0, None)]
        final = final_page(old)
        if last < final:
            return [(self._layout.unit_offset(first), self._layout.unit_offset(last + 1)),
                    *self._tag_ranges(first, last)]
        low = min(first, final)
        return [(self._layout.unit_offset(low), None), *self._tag_ranges(low, last)]

    def _truncate_ranges(self, size: int, old: int | None) -> list[Range]:
        """What a truncate from ``old`` to ``size`` bytes rewrites: from the
        lower of the old and new final pages to the end, their tags and the
        rest of that tag page (cleared when shrinking)."""
        if not old or not size:
            return [(0, None)]
        low, high = sorted((final_page(size), final_page(old)))
        _, tag_page_end = next(segments(low, low + SLOTS))
        return [(self._layout.unit_offset(low), None),
                *self._tag_ranges(low, max(high, tag_page_end))]

    def _read_ranges(self, offset: int, length: int) -> list[Range]:
        """What a read may look at: its pages (a final one's trailer may
        spill into the next), their tags, the header if not known yet, and
        ``SIZE_BYTE``, so that the size it reads is not changing."""
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        ranges = [(self._layout.unit_offset(first),
                   self._layout.unit_offset(last) + PAGE_SIZE + TRAILER_SIZE),
                  *self._tag_ranges(first, last)]
        if self.header is None:
            ranges.append((0, HEADER_SIZE))
        return [*ranges, SIZE_BYTE]

    @contextmanager
    def _exclusive(self, ranges_for: Callable[[int | None], list[Range]]) -> Iterator[None]:
        """Hold write locks on what ``ranges_for(size)`` says an operation
        rewrites, for the size found under the lock: locked for the size
        seen before, then widened (everything released and taken again in
        order, never waiting while holding a higher range) until the size
        under the lock needs nothing more."""
        try:
            held = merged(ranges_for(self._known_size()))
        except BackingSizeError:  # seen unlocked, maybe mid-change: lock it all
            held = [(0, None)]
        while True:
            rangelock.acquire(self.fd, held)
            try:
                self._refresh_header(self.fd)
                wanted = ranges_for(self._known_size())
            except BaseException:
                rangelock.unlock(self.fd, held)
                raise
            if covers(held, wanted):
                break
            rangelock.unlock(self.fd, held)
            held = merged([*held, *wanted])
        try:
            yield
        finally:  # one call: the per-file lock keeps this file's readers out meanwhile
            rangelock.unlock(self.fd, [(held[0][0], None)])

    # -- scheduling --

    def cached(self, offset: int, length: int) -> bool:
        """True if the backing pages that an I/O of ``length`` plaintext
        bytes at ``offset`` may read (its first and last page) are in memory,
        so the call will not wait for a disk.  Never with byte-range locks:
        taking one may wait for another mounter."""
        if self._reads is not None:
            return False
        if self._codec.in_memory(self._dev, self.fd):
            return True
        last = offset + max(length, 1) - 1
        pages = {offset // PAGE_SIZE, last // PAGE_SIZE}
        where = {self._layout.unit_offset(page) for page in pages}
        if self._tagger is not None:  # and the tags that reads check
            where |= {tag_offset(page) for page in pages}
        return all(page_cached(self.fd, at) is True for at in where)

    # -- sizes --

    def size(self) -> int:
        return self._layout.plaintext_size(os.fstat(self.fd).st_size)

    def stat(self) -> os.stat_result:
        """``fstat`` of the backing file.  With byte-range locks, under a
        read lock on ``SIZE_BYTE``: never a size in the middle of another
        mounter's change, and on NFS fresh from the server (taking a lock
        drops the client's cached attributes, docs/design.md)."""
        if self._reads is None:
            return os.fstat(self.fd)
        with self._reads.hold([SIZE_BYTE]):
            return os.fstat(self.fd)

    def ensure_header(self, via: int | None = None) -> FileHeader:
        """The file's header, written first if it has none.  ``via``: a
        read-write descriptor of the same backing file, for a file whose own
        descriptor is read-only (a first bound xattr gives it a header)."""
        if self._reads is None or self.header is not None:
            return self._ensure_header(via)
        fd = self.fd if via is None else via
        with rangelock.exclusive(fd, [(0, HEADER_SIZE)]):
            self._refresh_header(fd)  # another mounter may have written it
            return self._ensure_header(via)

    def _ensure_header(self, via: int | None = None) -> FileHeader:
        if self.header is None:
            self._write_header(self._codec.new_header(), via=via)
        assert self.header is not None
        return self.header

    # -- the cipher --

    @staticmethod
    def _stored_segments(first: int, length: int) -> list[tuple[int, int, int, int]]:
        """The pages of a run of ``length`` stored bytes from page ``first``,
        cut where a tag page interrupts them: ``(a, b, start, end)`` for
        pages ``a..b`` at bytes ``start..end`` of the run."""
        last = first + unit_count(length) - 1
        return [(a, b, (a - first) * PAGE_SIZE,
                 (b + 1 - first) * PAGE_SIZE if b < last else length)
                for a, b in segments(first, last)]

    def _read_tagged(self, first: int, length: int,
                     check: Callable[[int, memoryview, bytes], None]) -> memoryview:
        """Read the stored units of a run (``length`` bytes from page
        ``first``) and their tags, segment by segment, and hand each to
        ``check(first page, units, tags)``; returns the units read."""
        stored = _stored.get(length)
        for a, b, start, end in self._stored_segments(first, length):
            pread_into(self.fd, stored[start:end], self._layout.unit_offset(a))
            want = TAG_SIZE * (b - a + 1)
            check(a, stored[start:end], os.pread(self.fd, want, tag_offset(a)).ljust(want, b"\0"))
        return stored

    def _decrypt_tagged(self, run: PageRun, dst: memoryview) -> None:
        """Authenticated mode: check every page's tag on the bytes read, then
        decrypt those same bytes (holes, once checked, are zeros)."""
        assert self.header is not None and self._tagger is not None
        file_id, holes = self.header.file_id, set()

        def check(a: int, units: memoryview, tags: bytes) -> None:
            offset = a - run.first
            holes.update(offset + k for k in self._tagger.verify(file_id, a, run.size, units, tags))

        stored = self._read_tagged(run.first, run.length, check)
        with self._codec.sessions.session(file_id) as session:
            if not holes:  # one engine call for the whole run
                session.decrypt(run.first, stored, dst)
                return
            for hole, start, end in group_units(run.length, lambda k, _s, _n: k in holes):
                if hole:
                    fill_zeros(dst[start:end])
                else:
                    session.decrypt(run.first + start // PAGE_SIZE, stored[start:end],
                                    dst[start:end])

    def bad_pages(self, size: int, chunk_pages: int = 256) -> list[BadPage]:
        """Authenticated mode, for fsck: every page of the file whose tag
        does not match (read in chunks; nothing is decrypted)."""
        assert self._tagger is not None
        if not size or self.header is None:
            return []
        file_id, found = self.header.file_id, []

        def check(a: int, units: memoryview, tags: bytes) -> None:
            found.extend(self._tagger.check(file_id, a, size, units, tags))

        last = final_page(size)
        for first in range(0, last + 1, chunk_pages):
            run = PageRun(first, min(last, first + chunk_pages - 1), size)
            self._read_tagged(first, run.length, check)
        return found

    def _write_run(self, first: int, length: int,
                   pieces: list[tuple[int, bytes | bytearray | memoryview]],
                   size: int) -> None:
        """Encrypt the run of ``length`` stored bytes starting at page
        ``first`` and write it in place (then its tags, in authenticated
        mode; ``size`` is the file's size once written).  Its plaintext is
        zero except for ``pieces``: (offset in the run, bytes)."""
        # A new file's first pages go out in one write with its header.
        with_header = self._tagger is None and self.header is None and first == 0
        header = self._codec.new_header() if with_header else self._ensure_header()
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
        if self._tagger is None:
            where = self._layout.unit_offset(first)
            reserve(self.fd, where, length)
            if with_header:
                self._write_header(header, out)
            else:
                pwrite_all(self.fd, out, where)
            return
        parts = self._stored_segments(first, length)
        for a, b, start, end in parts:  # a full disk fails here, before any byte changes
            reserve(self.fd, self._layout.unit_offset(a), end - start)
            self._reserve_tags(a, b)
        for a, _b, start, end in parts:  # all data first: the file never ends in a tag page
            pwrite_all(self.fd, out[start:end], self._layout.unit_offset(a))
        for a, _b, start, end in parts:
            pwrite_all(self.fd, self._tagger.tags(header.file_id, a, size, out[start:end]),
                       tag_offset(a))

    def _write_header(self, header: FileHeader, units: memoryview | None = None,
                      via: int | None = None) -> None:
        """Write a new (empty) file's header, and its first ``units`` with it
        (one call, saving a syscall per new file); the one place a header
        reaches the disk and ``self.header`` is set.  A failed write of the
        header with units leaves the file empty."""
        fd = self.fd if via is None else via
        encoded = self._codec.encode_header(header)
        if units is None:
            pwrite_all(fd, encoded, 0)
        else:
            try:
                pwritev_all(fd, [encoded, units], 0)
            except OSError:
                os.ftruncate(fd, 0)
                raise
        self.header, self._header_raw = header, encoded[:HEADER_USED]

    def _reserve_tags(self, first: int, last: int) -> None:
        """Allocate the tag slots of pages ``first..last`` (see ``reserve``)."""
        for a, b in segments(first, last):
            reserve(self.fd, tag_offset(a), TAG_SIZE * (b - a + 1))

    def _write_hole_tags(self, first: int, last: int, size: int) -> None:
        """Authenticated mode: pages ``first..last`` are holes; give them the
        tags of holes (zero units), so that they read as zeros."""
        assert self.header is not None
        if self._tagger is None or last < first:
            return
        for a, b in segments(first, last):
            pwrite_all(self.fd, self._tagger.hole_tags(self.header.file_id, a, b, size),
                       tag_offset(a))

    def _clear_tags_after(self, page: int) -> None:
        """Authenticated mode, after shrinking to final page ``page``: zero
        the tag slots of the removed pages in that page's tag page."""
        if self._tagger is None:
            return
        _, last = next(segments(page, page + SLOTS))
        if last > page:
            pwrite_all(self.fd, bytes(TAG_SIZE * (last - page)), tag_offset(page + 1))

    def _page(self, page: int, size: int) -> bytes:
        """The plaintext bytes of one existing page (0..4096 of them)."""
        count = page_bytes(page, size)
        return self._read(page * PAGE_SIZE, count, size) if count else b""

    # -- the operations --

    def read(self, offset: int, length: int, size: int | None = None) -> bytes:
        """Up to ``length`` plaintext bytes at ``offset`` (short at EOF).
        With byte-range locks, under read locks on what it reads: a page
        being rewritten by another mounter is never returned torn."""
        if self._reads is None or length <= 0:
            return self._read(offset, length, size)
        with self._reads.hold(self._read_ranges(offset, length)):
            self._refresh_header(self.fd)
            return self._read(offset, length, size)

    def _read(self, offset: int, length: int, size: int | None = None) -> bytes:
        if size is None:
            size = self.size()
        end = min(size, offset + length)
        if end <= offset:
            return b""
        run = pages_for(offset, end, size)
        if self._tagger is not None:
            buf = _decrypted.get(run.length)
            self._decrypt_tagged(run, buf)
            return bytes(buf[run.plaintext_slice(offset, end)])  # one copy
        assert self.header is not None
        base = run.first * PAGE_SIZE
        with self._codec.sessions.session(self.header.file_id) as session:
            data = session.read_plaintext(run.first, self.fd, run.offset, run.length,
                                          offset - base, end - base,
                                          TRAILER_SIZE if run.has_trailer else 0)
        if data is None:
            raise TrailerError(
                f"final page {run.last} failed its check (damaged, truncated or moved)")
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset``, extending the file (with a hole) if needed."""
        length = len(data)
        if self._reads is None or not length:
            return self._write(offset, data)
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        with self._exclusive(lambda old: self._write_ranges(first, last, old)):
            return self._write(offset, data)

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
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
        head = self._read(page_start, offset - page_start, old)
        tail = self._read(end, page_end - end, old)
        stale = final_page(old) if old and final_page(old) < run.first else None
        stale_plain = self._page(stale, old) if stale is not None else b""
        holes_from = stale + 1 if stale is not None else 0 if not old else run.first
        if self._tagger is not None:
            self._reserve_tags(holes_from, run.first - 1)

        self._write_run(run.first, run.length,
                        [(0, head), (offset - page_start, data), (end - page_start, tail)], new)
        if stale is not None:
            self._retire_final(stale, stale_plain, old, new, clear_spill=run.first > stale + 1)
        self._write_hole_tags(holes_from, run.first - 1, new)
        return length

    def _retire_final(self, page: int, plain: bytes, old_size: int, size: int,
                      clear_spill: bool) -> None:
        """Re-encrypt an old final page as an ordinary full page (zero padded)
        of a file now ``size`` bytes long.  If its trailer spilled into the
        next page and that page is now a hole, zero the spilled bytes so the
        hole reads as zeros (in authenticated mode the next page may be a tag
        page: its first slot is then rewritten by the caller)."""
        self._write_run(page, PAGE_SIZE, [(0, plain)], size)
        spill = page_bytes(page, old_size) + TRAILER_SIZE - PAGE_SIZE
        if clear_spill and spill > 0:
            pwrite_all(self.fd, bytes(spill), self._layout.unit_offset(page) + PAGE_SIZE)

    def truncate(self, size: int) -> None:
        """Set the plaintext size, growing with a hole or shrinking."""
        if self._reads is None:
            self._truncate(size)
            return
        with self._exclusive(lambda old: self._truncate_ranges(size, old)):
            self._truncate(size)

    def _truncate(self, size: int) -> None:
        old = self.size()
        if size == old:
            return
        if size == 0:
            # Tags first: if the daemon dies in between, pages are left
            # without tags (their reads fail, emptying again repairs the
            # file), not a header-only file with tags, which is refused as
            # cut short behind cryptfs's back (refuse_stale_tags).
            if self._tagger is not None and self.header is not None:
                pwrite_all(self.fd, bytes(HEADER_SIZE - HEADER_FIELDS), HEADER_FIELDS)
            os.ftruncate(self.fd, HEADER_SIZE if self.header is not None else 0)
            return
        if size < old or final_page(size) == final_page(old):
            # The new final page is an existing page: re-encrypt it with a trailer.
            page = final_page(size)
            plain = self._page(page, old)[:page_bytes(page, size)]
            self._write_run(page, page_bytes(page, size) + TRAILER_SIZE, [(0, plain)], size)
            os.ftruncate(self.fd, self._layout.backing_size(size))
            if final_page(size) < final_page(old):
                self._clear_tags_after(page)
            return
        # Growing past the old final page: that page becomes a full page and
        # the new final unit is a hole (all zeros), which reads as zeros.
        self._ensure_header()
        stale = final_page(old) if old else None
        plain = self._page(stale, old) if stale is not None else b""
        holes_from = stale + 1 if stale is not None else 0
        if self._tagger is not None:
            self._reserve_tags(holes_from, final_page(size))
        os.ftruncate(self.fd, self._layout.backing_size(size))
        if stale is not None:
            self._retire_final(stale, plain, old, size, clear_spill=True)
        self._write_hole_tags(holes_from, final_page(size), size)
