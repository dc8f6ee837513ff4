"""Sync-tool conflict copies of backing names.

When a file in a synced cipher directory is changed on two machines, the sync
tool keeps the losing version under a new name: the backing name with a
*marker* inserted, e.g. ``<encoded>.sync-conflict-20261207-101500-ABCDEFG``.
That name does not decrypt, so cryptfs would skip it as foreign and the other
version would be invisible.  This module recognises such names and says which
backing name they are a copy of; it does no I/O and no cryptography.

``candidates()`` is purely syntactic: it proposes the names a conflict copy
may be a copy of, and the caller must still decrypt the proposed original (a
name of the right shape that does not decrypt in the directory stays foreign).
It is strict all the same:

* A name that is itself a valid backing form (an encoded name, a long name, a
  sidecar, ``cryptfs.diriv``) never parses, so a real entry is never taken
  for a copy: encoded names only use ``[A-Za-z0-9_-]`` and a canonical length,
  and a marker either adds a character outside that alphabet or (ownCloud's
  ``_conflict-``, OneDrive's ``-HOST``) makes the length impossible.
* The original must be one of those forms exactly, and the marker must sit
  where the tools put it: at the end, or just before a dot of the original
  (tools insert it before the "extension"; which dot depends on the tool).
* Each marker's own syntax is checked (digits, valid dates, device IDs).

``docs/conflicts.md`` gives each tool's pattern with its source.
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptfs.names.filenames import (
    DIRIV_NAME,
    NAME_MAX,
    SIDECAR_SUFFIX,
    is_longname,
    unb64url,
)


class Tool(enum.Enum):
    """The sync tool whose naming a conflict copy follows."""

    SYNCTHING = "syncthing"
    NEXTCLOUD = "nextcloud"  # Nextcloud and ownCloud desktop clients >= 2.5
    OWNCLOUD_LEGACY = "owncloud-legacy"  # ownCloud client < 2.5: _conflict-
    DROPBOX = "dropbox"
    ONEDRIVE = "onedrive"  # Windows/macOS client: -COMPUTERNAME
    ONEDRIVE_LINUX = "onedrive-linux"  # abraunegg/onedrive: -host-safeBackup-NNNN
    GOOGLE_DRIVE = "google-drive"  # " (N)": also any tool's numbered duplicate
    SEAFILE = "seafile"
    RESILIO = "resilio"
    RCLONE_BISYNC = "rclone-bisync"  # v1.66+: .conflictN (or .pathN)
    RCLONE_BISYNC_LEGACY = "rclone-bisync-legacy"  # before v1.66: ..path1/..path2


class Kind(enum.Enum):
    """Which backing form the conflict copy is a copy of."""

    ENCODED = "encoded"  # a short encoded name: a file, directory or symlink
    LONGNAME = "longname"  # cryptfs.longname.<hash>
    SIDECAR = "sidecar"  # cryptfs.longname.<hash>.name
    DIRIV = "diriv"  # cryptfs.diriv


@dataclass(frozen=True, slots=True)
class ConflictCopy:
    """A backing name recognised as a sync tool's copy of another one."""

    name: bytes  # the conflict copy's own backing name
    original: bytes  # the backing name it is a copy of
    kind: Kind
    tool: Tool
    marker: bytes  # the marker as found in ``name``
    date: str | None = None  # "YYYY-MM-DD", when the marker has one
    time: str | None = None  # "HH:MM:SS", when the marker has one
    device: bytes | None = None  # device, host or user name, when present
    counter: int | None = None  # the tool's own number, when present


# --- markers -----------------------------------------------------------------
#
# Each pattern matches one marker exactly, starting where the tool inserts it.
# Named groups: ``date`` and ``time`` (in the tool's layout, normalised by
# ``_DATE_LAYOUTS``), ``device`` and ``counter``.  A marker must be followed by
# a dot or the end of the name (``_END``).

_END = rb"(?=\.|\Z)"
_NUM = rb"(?P<counter>[1-9][0-9]{0,8})"
_SMALL = rb"(?P<counter>[1-9][0-9]{0,2})"  # Dropbox's same-day number
_WHO = rb"[^()/\x00]{1,64}?"  # a free-form user or device name
# Lazy, so that "-PC-2" reads as device "PC", copy 2.
_HOST = rb"(?P<device>[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}?[A-Za-z0-9])??)"

_PATTERNS: tuple[tuple[Tool, re.Pattern[bytes]], ...] = tuple(
    (tool, re.compile(pattern + _END)) for tool, pattern in (
        # lib/model/folder_sendrecv.go conflictName: the 7-character short
        # device ID (base32) of the device that made the losing change.
        (Tool.SYNCTHING,
         rb"\.sync-conflict-(?P<date>[0-9]{8})-(?P<time>[0-9]{6})-(?P<device>[A-Z2-7]{7})"),
        # src/common/utility.cpp makeConflictFileName (the user name has its
        # parentheses replaced, so the marker's end is unambiguous).
        (Tool.NEXTCLOUD,
         rb" \(conflicted copy (?:(?P<device>" + _WHO + rb") )?"
         rb"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2}) (?P<time>[0-9]{6})\)"),
        # makeCaseClashConflictFileName: two names differing only in case
        # (encoded names can) on a case-insensitive client.
        (Tool.NEXTCLOUD,
         rb" \(case clash from (?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2}) (?P<time>[0-9]{6})\)"),
        (Tool.OWNCLOUD_LEGACY,
         rb"_conflict(?:_(?P<device>" + _WHO + rb"))?-(?P<date>[0-9]{8})-(?P<time>[0-9]{6})"),
        (Tool.DROPBOX,
         rb" \((?:(?P<device>" + _WHO + rb")'s )?conflicted copy "
         rb"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})(?: " + _SMALL + rb")?\)"),
        (Tool.DROPBOX, rb" \((?i:case conflict|selective sync conflict)(?: " + _SMALL + rb")?\)"),
        (Tool.GOOGLE_DRIVE, rb" \(" + _NUM + rb"\)"),
        # common/vc-common.c gen_conflict_path: modifier (an e-mail) optional.
        (Tool.SEAFILE,
         rb" \(SFConflict (?:(?P<device>[^()/\x00 ]{1,64}) )?"
         rb"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})-(?P<time>[0-9]{2}-[0-9]{2}-[0-9]{2})\)"),
        (Tool.RESILIO, rb"\.Conflict(?: ?" + _NUM + rb")?"),
        # cmd/bisync/resolve.go: "." + --conflict-suffix + number; the default
        # suffix is "conflict"; "path" is the suffix users pick for .path1/2.
        (Tool.RCLONE_BISYNC, rb"\.(?:conflict|path)" + _NUM),
        (Tool.RCLONE_BISYNC_LEGACY, rb"\.\.path(?P<counter>[12])"),
        # Last: the loosest markers, made of characters encoded names use.
        # The Linux client's first, as the generic one would also match it.
        # src/util.d safeBackup: the host name may be fully qualified.
        (Tool.ONEDRIVE_LINUX,
         rb"-(?P<device>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}?[A-Za-z0-9])??)"
         rb"-safeBackup-(?P<counter>[0-9]{4})"),
        (Tool.ONEDRIVE, rb"-" + _HOST + rb"(?:-" + _NUM + rb")?"),
    )
)


def _lead(pattern: re.Pattern[bytes]) -> bytes:
    """The literal byte every match of a marker pattern starts with, so that
    only the positions holding it are tried."""
    text = pattern.pattern.removeprefix(b"\\")
    assert text[:1] in (b".", b" ", b"_", b"-"), pattern
    return text[:1]


_LEADS: dict[re.Pattern[bytes], bytes] = {p: _lead(p) for _tool, p in _PATTERNS}

# strptime layouts of the ``date`` and ``time`` groups, per tool.
_DATE_LAYOUTS: dict[Tool, tuple[str, str]] = {
    Tool.SYNCTHING: ("%Y%m%d", "%H%M%S"),
    Tool.NEXTCLOUD: ("%Y-%m-%d", "%H%M%S"),
    Tool.OWNCLOUD_LEGACY: ("%Y%m%d", "%H%M%S"),
    Tool.DROPBOX: ("%Y-%m-%d", ""),
    Tool.SEAFILE: ("%Y-%m-%d", "%H-%M-%S"),
}


# --- the original's shape ------------------------------------------------------


def backing_kind(name: bytes) -> Kind | None:
    """Which cryptfs backing form ``name`` has, if any (shape only, no key).

    A short encoded name is canonical unpadded base64url of 32 or more bytes,
    a multiple of 16: what ``NameCipher`` produces and ``decode`` accepts."""
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        return None
    if text == DIRIV_NAME:
        return Kind.DIRIV
    if is_longname(text):
        return Kind.LONGNAME
    if text.endswith(SIDECAR_SUFFIX) and is_longname(text[: -len(SIDECAR_SUFFIX)]):
        return Kind.SIDECAR
    if len(name) > NAME_MAX:
        return None
    try:
        sealed = unb64url(text)
    except ValueError:
        return None
    if len(sealed) >= 32 and len(sealed) % 16 == 0:
        return Kind.ENCODED
    return None


# --- parsing -------------------------------------------------------------------


def candidates(name: bytes, *, foreign: bool = False) -> Iterator[ConflictCopy]:
    """Every reading of ``name`` as a conflict copy, the likeliest first.

    Usually there is one.  More than one can only arise from the markers
    made of base64url characters (OneDrive's ``-HOST``, ownCloud's
    ``_conflict_USER-...``), which encoded names also use: the caller tries
    each original in turn and keeps the one that decrypts.

    Those markers can also give a copy the shape of a backing name, which
    may be a real entry: such a name is only read as a copy when the caller
    says it is ``foreign`` (it did not decrypt in its directory)."""
    if not name or len(name) > NAME_MAX:
        return
    if not foreign and backing_kind(name) is not None:
        return
    # Tools with the most specific markers first (OneDrive's is the loosest);
    # then right to left: the shortest marker, hence the longest original.
    for tool, pattern in _PATTERNS:
        lead = _LEADS[pattern]
        start = name.rfind(lead, 1)
        while start > 0:
            match = pattern.match(name, start)
            if match is not None:
                copy = _reading(name, tool, match)
                if copy is not None:
                    yield copy
            start = name.rfind(lead, 1, start)


def parse(backing_name: bytes, *, foreign: bool = False) -> ConflictCopy | None:
    """The most likely reading of ``backing_name`` as a conflict copy of an
    encoded name, a long name, a sidecar or ``cryptfs.diriv``; ``None`` for
    anything else (a valid backing name, a foreign file, a near miss).
    ``foreign``: as for ``candidates``."""
    return next(candidates(backing_name, foreign=foreign), None)


def _reading(name: bytes, tool: Tool, match: re.Match[bytes]) -> ConflictCopy | None:
    original = name[: match.start()] + name[match.end():]
    kind = backing_kind(original)
    if kind is None:
        return None
    groups = match.groupdict()
    stamp = _timestamp(tool, groups.get("date"), groups.get("time"))
    if stamp is None:
        return None
    date, time = stamp
    counter = groups.get("counter")
    return ConflictCopy(
        name=name,
        original=original,
        kind=kind,
        tool=tool,
        marker=match.group(0),
        date=date,
        time=time,
        device=groups.get("device"),
        counter=int(counter) if counter is not None else None,
    )


def _timestamp(tool: Tool, date: bytes | None,
               time: bytes | None) -> tuple[str | None, str | None] | None:
    """The marker's date and time normalised, ``(None, None)`` if it has
    none, or ``None`` if they are not a real date and time (a near miss)."""
    if date is None:
        return None, None
    date_layout, time_layout = _DATE_LAYOUTS[tool]
    try:
        day = datetime.datetime.strptime(date.decode("ascii"), date_layout).date()
        clock = (datetime.datetime.strptime(time.decode("ascii"), time_layout).time()
                 if time is not None else None)
    except ValueError:
        return None
    return day.isoformat(), clock.isoformat() if clock is not None else None


# --- the name shown in the mount -------------------------------------------------

_MAX_EXT = 16  # bytes after the dot; anything longer is not an extension
_MAX_DEVICE = 64  # bytes of device name kept in the shown marker
_MAX_NUMBER = 100_000  # numbered attempts before giving up on uniqueness


def display_name(plain_name: bytes, copy: ConflictCopy,
                 taken: Callable[[bytes], bool]) -> bytes:
    """The name to show for a conflict copy of the file named ``plain_name``.

    ``<stem> (conflict <date> <device>)<ext>``: the extension stays last so
    the copy opens with the same program, the word ``conflict`` says what it
    is, and the name fits NAME_MAX by shortening the stem, never the marker.
    ``taken(name)`` tells whether a name is already used in the directory;
    the marker is then numbered (``... laptop 2)``) until a free name is
    found.  ``ValueError`` if none is (the caller keeps the entry hidden)."""
    stem, ext = _split_extension(plain_name)
    words = [b"conflict"]
    if copy.date is not None:
        words.append(copy.date.encode("ascii"))
    if copy.device:
        words.append(_clean_device(copy.device))
    for number in range(1, _MAX_NUMBER):
        extra = [str(number).encode("ascii")] if number > 1 else []
        marker = b" (" + b" ".join(words + extra) + b")"
        room = NAME_MAX - len(marker) - len(ext)
        candidate = _truncate(stem, room) + marker + ext
        if not taken(candidate):
            return candidate
    raise ValueError(f"no free name for a conflict copy of {len(plain_name)}-byte name")


def _split_extension(name: bytes) -> tuple[bytes, bytes]:
    """``(stem, ".ext")``; no extension for dot files or long dotted tails."""
    dot = name.rfind(b".")
    if dot <= 0 or dot == len(name) - 1:
        return name, b""
    ext = name[dot:]
    if len(ext) - 1 > _MAX_EXT or b" " in ext:
        return name, b""
    return name[:dot], ext


def _clean_device(device: bytes) -> bytes:
    """A device name safe inside the shown marker: no separators, bounded."""
    cleaned = device.replace(b"/", b"_").replace(b"\x00", b"_").strip()
    return _truncate(cleaned, _MAX_DEVICE) or b"_"


def _truncate(data: bytes, size: int) -> bytes:
    """``data`` cut to ``size`` bytes without splitting a UTF-8 character."""
    if len(data) <= size:
        return data
    cut = max(size, 0)
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # a continuation byte
        cut -= 1
    return data[:cut]
