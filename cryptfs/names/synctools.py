"""Files a sync tool keeps in the folders it syncs: its housekeeping (folder
markers, ignore lists, journals) and the temporaries of transfers in
progress.  None of them is cryptfs data and none is damage, so the mount
skips them without a warning, and fsck names them for what they are (a
temporary says a transfer is under way, or was cut off) instead of calling
them names that do not decrypt.  A conflict copy is not one of these: it is
data (names/conflicts.py).

Only names no cryptfs entry can have are listed: encoded names are base64url
with no dot, and cryptfs's own files start with ``cryptfs.``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SyncToolFile:
    tool: str
    temporary: bool  # a transfer's partial file, not housekeeping


_HOUSEKEEPING: dict[str, str] = {
    ".stfolder": "Syncthing",  # the folder marker (a directory)
    ".stignore": "Syncthing",
    ".stversions": "Syncthing",  # versioned copies (a directory)
    ".dropbox": "Dropbox",
    ".dropbox.attr": "Dropbox",
    ".dropbox.cache": "Dropbox",
    ".owncloudsync.log": "ownCloud",
    ".nextcloudsync.log": "Nextcloud",
    ".sync": "Resilio",  # its per-folder state (a directory)
    ".tmp.drivedownload": "Google Drive",
    ".tmp.driveupload": "Google Drive",
}

_PATTERNS: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    # the client's sync journal (SQLite, with its -wal and -shm files)
    (re.compile(r"\._?sync_[0-9a-f]+\.db(?:-wal|-shm)?"), "Nextcloud/ownCloud", False),
    (re.compile(r"\.syncthing\..+\.tmp"), "Syncthing", True),  # Linux, macOS
    (re.compile(r"~syncthing~.+\.tmp"), "Syncthing", True),  # Windows
    (re.compile(r".+\.!sync"), "Resilio", True),
    (re.compile(r".+\.partial"), "rclone", True),
)


def sync_tool_file(name: str) -> SyncToolFile | None:
    """What ``name`` is, if a sync tool put it there (None otherwise)."""
    tool = _HOUSEKEEPING.get(name)
    if tool is not None:
        return SyncToolFile(tool, temporary=False)
    for pattern, tool, temporary in _PATTERNS:
        if pattern.fullmatch(name):
            return SyncToolFile(tool, temporary)
    return None
