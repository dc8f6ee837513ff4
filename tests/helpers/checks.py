"""Assertions shared by the mount tests: a call fails with one errno; a
tree's names and bytes, to compare two trees."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest


def raises_errno(code: int, fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` raises OSError with exactly ``code``."""
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value}"


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of a file, ``link:`` + target of a symlink,
    or ``dir``: equal digests mean equal trees, and a difference names the
    path."""
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            digest[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[rel] = "dir"
    return digest
