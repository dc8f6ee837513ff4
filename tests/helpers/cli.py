"""Running the ``cryptfs`` command in the tests: a fast KDF, the command with
its exit status checked, whether a mount point is mounted."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import (
    MOUNT_TIMEOUT,
    cryptfs_cmd,
)

FAST_KDF = ("--argon2-memory", "8", "--argon2-passes", "1")


def cryptfs(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cryptfs_cmd(*args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=MOUNT_TIMEOUT, **kwargs)
    if check:
        assert proc.returncode == 0, f"cryptfs {args} -> {proc.returncode}:\n{proc.stderr}"
    return proc


def is_mounted(mountpoint: Path) -> bool:
    """From /proc/mounts: unlike stat(), this does not touch the filesystem
    (which would count as activity for --idle)."""
    return any(line.split()[1] == str(mountpoint)
               for line in Path("/proc/mounts").read_text().splitlines())
