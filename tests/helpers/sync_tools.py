"""Conflict-copy names as each sync tool makes them (see docs/conflicts.md).

A model of each tool's renaming, written from its source where it is open
(Syncthing, Nextcloud/ownCloud, Seafile, rclone) and from its documentation
or reports otherwise.  Where a closed tool's choice of dot is not known,
``before_dot`` picks between "before the last dot" and "at the end".  Used by
the conflict tests here and by the mount tests that plant conflict copies.
"""

from __future__ import annotations

import datetime

from cryptfs.names.conflicts import Tool

WHEN = datetime.datetime(2026, 12, 7, 10, 15, 0)


def split_last_dot(name: bytes) -> tuple[bytes, bytes]:
    """``(base, ".ext")`` at the last dot, as Go's filepath.Ext, Qt's
    lastIndexOf('.') (dot at 0 not counted) and rclone's path.Ext do for
    names without a leading dot; ``(name, b"")`` without a dot."""
    dot = name.rfind(b".")
    if dot <= 0:
        return name, b""
    return name[:dot], name[dot:]


def make_conflict(tool: Tool, name: bytes, *, device: bytes = b"laptop",
                  number: int = 1, when: datetime.datetime = WHEN,
                  before_dot: bool = True) -> bytes:
    """The name ``tool`` gives its conflict copy of the backing name ``name``."""
    base, ext = split_last_dot(name) if before_dot else (name, b"")
    marker = _marker(tool, device, number, when)
    if tool is Tool.RCLONE_BISYNC_LEGACY:  # always appended
        return name + marker
    return base + marker + ext


def _marker(tool: Tool, device: bytes, number: int, when: datetime.datetime) -> bytes:
    def stamp(layout: str) -> bytes:
        return when.strftime(layout).encode("ascii")

    match tool:
        case Tool.SYNCTHING:  # device: a 7-character short ID
            return b".sync-conflict-" + stamp("%Y%m%d-%H%M%S-") + device
        case Tool.NEXTCLOUD:
            who = device.replace(b"(", b"_").replace(b")", b"_") + b" " if device else b""
            return b" (conflicted copy " + who + stamp("%Y-%m-%d %H%M%S") + b")"
        case Tool.OWNCLOUD_LEGACY:
            who = b"_" + device if device else b""
            return b"_conflict" + who + b"-" + stamp("%Y%m%d-%H%M%S")
        case Tool.DROPBOX:
            same_day = b" %d" % number if number > 1 else b""
            return b" (" + device + b"'s conflicted copy " + stamp("%Y-%m-%d") + same_day + b")"
        case Tool.ONEDRIVE:
            return b"-" + device + (b"-%d" % number if number > 1 else b"")
        case Tool.ONEDRIVE_LINUX:
            return b"-" + device + b"-safeBackup-%04d" % number
        case Tool.GOOGLE_DRIVE:
            return b" (%d)" % number
        case Tool.SEAFILE:
            who = device + b" " if device else b""
            return b" (SFConflict " + who + stamp("%Y-%m-%d-%H-%M-%S") + b")"
        case Tool.RESILIO:
            return b".Conflict" + (b"%d" % number if number > 1 else b"")
        case Tool.RCLONE_BISYNC:
            return b".conflict%d" % number
        case Tool.RCLONE_BISYNC_LEGACY:
            return b"..path%d" % (1 if number % 2 else 2)
    raise AssertionError(tool)
