"""Which set-user-ID and set-group-ID bits a caller's write or truncation
drops, as the VFS decides it on a local filesystem
(``setattr_should_drop_suidgid``): setuid always, setgid where group-exec
is set or the caller is outside the file's group, and nothing for a caller
with CAP_FSETID.  The kernel's FUSE code decides this for us on write,
truncate and chown, but not on a truncating open(2) that the filesystem
performs itself (ATOMIC_O_TRUNC), and not at all once HANDLE_KILLPRIV_V2
is negotiated (docs/design.md)."""

from __future__ import annotations

import stat
from collections.abc import Callable

CAP_FSETID = 4  # linux/capability.h
SETID = stat.S_ISUID | stat.S_ISGID


def may_keep_setid(pid: int, uid: int) -> bool:
    """Whether the process ``pid`` keeps set-id bits on what it writes
    (CAP_FSETID in its effective set); where it can no longer be read,
    whether ``uid`` is root."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << CAP_FSETID))
    except (OSError, ValueError, IndexError):
        pass
    return uid == 0


def without_setid(mode: int, gid: int, groups: Callable[[], set[int]]) -> int:
    """``mode`` (of a regular file of group ``gid``) without the bits a
    caller lacking CAP_FSETID drops; ``groups``: the caller's groups, asked
    only for a setgid bit without group-exec."""
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or gid not in groups()):
        mode &= ~stat.S_ISGID
    return mode & ~stat.S_ISUID
