"""Two writers on one file through two mounts (plain file calls, through
FUSE), each on its own half of every page: the check that shared mounts
never lose each other's bytes.

Writer A owns bytes 0..2047 of every 4 KiB page, writer B bytes 2048..4095
(and the tail of a short last page).  Both run at once in threads, page by
page, for several rounds; the first round grows the file from nothing (both
writers race to create the header and to extend the final page), later ones
rewrite it.  Each write is a partial page, so the daemon behind each mount
must read, modify and re-encrypt the page: without byte-range locks the two
read-modify-writes of one page overwrite each other's half.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.two_writers import data, half

PAGE = 4096


def _halves(writer: int, pages: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(page, offset, length) of each non-empty half ``writer`` owns (the
    split and the bytes are those of the codec-level race, two_writers.py)."""
    for page in range(pages):
        start, end = half(writer, page, size)
        if end > start:
            yield page, start, end - start


def _write(path: Path, writer: int, pages: int, size: int, rounds: int,
           errors: list[BaseException], start: threading.Barrier) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            start.wait()
            for round_ in range(rounds):
                for page, offset, length in _halves(writer, pages, size):
                    assert os.pwrite(fd, data(writer, round_, 0, page, length), offset) == length
        finally:
            os.close(fd)
    except BaseException as exc:  # reported by the caller, not lost in the thread
        errors.append(exc)
        start.abort()  # the other writer must not wait for this one


def write_halves(path_a: Path, path_b: Path, pages: int = 32, rounds: int = 3,
                 short_tail: int = 1000) -> int:
    """Run both writers (A through ``path_a``, B through ``path_b``, the same
    file seen through two mounts); return the file's size."""
    size = pages * PAGE - short_tail
    errors: list[BaseException] = []
    start = threading.Barrier(2)
    threads = [threading.Thread(target=_write, args=(path, writer, pages, size, rounds,
                                                     errors, start))
               for writer, path in enumerate((path_a, path_b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return size


def lost_halves(path: Path, pages: int, size: int, rounds: int) -> list[str]:
    """Every half of every page that does not hold its writer's last round,
    read through ``path`` (empty: both writers' bytes all survived)."""
    seen = path.read_bytes()
    lost = [f"size {len(seen)} != {size}"] if len(seen) != size else []
    for writer in (0, 1):
        for page, offset, length in _halves(writer, pages, size):
            if seen[offset:offset + length] != data(writer, rounds - 1, 0, page, length):
                lost.append(f"page {page} half {writer}")
    return lost
