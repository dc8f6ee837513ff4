"""Logging setup: one line per message on stderr (syslog once detached)."""

from __future__ import annotations

import logging
import sys


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
