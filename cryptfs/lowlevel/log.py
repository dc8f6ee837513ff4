"""Logging setup: one line per message on stderr (syslog once detached),
and ``Once``, which keeps a recurring problem to one log line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Hashable

ONCE_LIMIT = 10000  # keys a ``Once`` remembers


def setup_logging(debug: bool = False, verbose: bool = False) -> None:
    """``verbose`` (-v) adds the details a working command keeps to itself
    (which crypto engine, and why), without ``debug``'s per-request lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cryptfs: %(levelname)s: %(message)s"
                                           if debug else "cryptfs: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # pyfuse3 logs every FUSEError it passes on at debug level
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("cryptfs.engines").setLevel(
        logging.DEBUG if debug or verbose else logging.NOTSET)


class Once:
    """Which problems were already logged, by key (a file, a directory), so
    each is logged once however often it is met.  Bounded: past ``limit``
    keys the least recently met is forgotten (logged again if met again),
    so a mount meeting endless damage neither grows nor goes quiet."""

    def __init__(self, limit: int = ONCE_LIMIT) -> None:
        self._seen: dict[Hashable, None] = {}  # oldest first
        self._limit = limit

    def first(self, key: Hashable) -> bool:
        """True the first time ``key`` is met (log it then), else False."""
        if key in self._seen:
            del self._seen[key]  # met again: now the most recent
            self._seen[key] = None
            return False
        if len(self._seen) >= self._limit:
            del self._seen[next(iter(self._seen))]
        self._seen[key] = None
        return True
