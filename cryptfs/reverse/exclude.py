"""What the view leaves out: ``--exclude`` patterns in gitignore syntax
(matched by ``pathspec``, the library git-like tools use), and the
reverse key file itself, which must never reach a backup beside the data
it protects in readable form (it is shown as ``cryptfs.conf`` instead)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pathspec

from cryptfs.errors import UsageError
from cryptfs.keys.reverse import REVERSE_KEYFILE_NAME


class Excluder:
    def __init__(self, patterns: Sequence[str] = (),
                 hidden: Iterable[tuple[int, int]] = ()) -> None:
        """``hidden``: (device, inode) of files never shown (a ``--config``
        key file inside PLAINDIR, under any name)."""
        self._spec = pathspec.GitIgnoreSpec.from_lines(patterns) if patterns else None
        self._hidden = frozenset(hidden)

    def excluded(self, path: bytes, st: os.stat_result) -> bool:
        """Whether the entry at relative ``path`` (its ``lstat``) is left out."""
        if (st.st_dev, st.st_ino) in self._hidden:
            return True
        if b"/" not in path and is_reverse_keyfile(path):
            return True
        if self._spec is None:
            return False
        text = os.fsdecode(path) + ("/" if _is_dir(st) else "")
        return self._spec.match_file(text)


def _is_dir(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o040000


def is_reverse_keyfile(name: bytes) -> bool:
    """The reverse key file, or a temporary copy of it being written."""
    own = REVERSE_KEYFILE_NAME.encode()
    return name == own or name.startswith(own + b".tmp-")


def read_patterns(patterns: Sequence[str], files: Sequence[str]) -> list[str]:
    """``--exclude`` patterns followed by the lines of each ``--exclude-from`` file."""
    out = list(patterns)
    for name in files:
        try:
            out += Path(name).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the exclude file {name}: {exc}") from exc
    try:
        pathspec.GitIgnoreSpec.from_lines(out)
    except Exception as exc:  # pathspec raises several types for a bad pattern
        raise UsageError(f"bad exclude pattern: {exc}") from exc
    return out
