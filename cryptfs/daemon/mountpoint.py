"""The mount point's life cycle as the kernel sees it: /proc/self/mountinfo,
dead mounts left by a killed daemon, non-empty directories, and unmounting
(busy, lazy).

A daemon that dies without unmounting (SIGKILL, the OOM killer, a crash)
leaves its mount in place: every access then fails with ENOTCONN until it is
detached with a lazy unmount.  The kernel, not a pid file, says whether the
daemon is gone: ENOTCONN is what FUSE answers once nobody holds the
connection's /dev/fuse descriptor.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptfs.errors import BusyError, MountPointError

log = logging.getLogger(__name__)

FSTYPE = "fuse.cryptfs"  # what the kernel records for our mounts (subtype=cryptfs)
MOUNTINFO = "/proc/self/mountinfo"




@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str = ""  # "major:minor", also the name of its bdi in /sys/class/bdi
    options: str = ""  # the superblock's options ("rw,vers=4.2,...,local_lock=none")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Entries of proc(5)'s mountinfo format, in mount order (later entries
    are mounted over earlier ones at the same point)."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        options = fields[sep + 3] if len(fields) > sep + 3 else ""
        entries.append(MountEntry(_unescape(fields[4]), _unescape(fields[sep + 1]),
                                  _unescape(fields[sep + 2]), fields[2], options))
    return entries


def _mounts(mountinfo: str = MOUNTINFO) -> list[MountEntry]:
    with open(mountinfo) as f:
        return parse_mountinfo(f.read())


def mount_at(path: str) -> MountEntry | None:
    """The top-most mount at ``path`` (absolute, symlinks resolved)."""
    found = [e for e in _mounts() if e.mountpoint == path]
    return found[-1] if found else None


def cryptfs_mounts(cipherdir: Path | None = None) -> list[str]:
    """Mount points of cryptfs mounts in this mount namespace; with
    ``cipherdir``, only those whose source (the default ``--fsname``) is it."""
    wanted = None if cipherdir is None else os.path.realpath(cipherdir)
    return [e.mountpoint for e in _mounts() if e.fstype == FSTYPE
            and (wanted is None or os.path.realpath(e.source) == wanted)]


NETWORK_FSTYPES = ("nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "afs", "9p",
                   "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "lustre", "gpfs", "ocfs2", "gfs2")


def _holding(path: Path, mountinfo: str = MOUNTINFO) -> MountEntry | None:
    """The mount ``path`` is on: the deepest mount point holding it; among
    equals the last mounted (on top)."""
    real = os.path.realpath(path)
    holding = [e for e in _mounts(mountinfo) if real == e.mountpoint
               or real.startswith(e.mountpoint.rstrip("/") + "/")]
    return max(reversed(holding), key=lambda e: len(e.mountpoint)) if holding else None


def network_filesystem(path: Path) -> str | None:
    """The type of the filesystem ``path`` is on if other machines may
    share it (NFS, SMB, ...), else None: a lock refused there may be held
    by another machine, which mountinfo here cannot name."""
    entry = _holding(path)
    return entry.fstype if entry is not None and entry.fstype in NETWORK_FSTYPES else None


def local_locks(path: Path, mountinfo: str = MOUNTINFO) -> str | None:
    """Why locks taken on ``path`` would not reach other machines although
    its filesystem is shared (an NFS mount with ``nolock`` or ``local_lock=``
    other than ``none``), else None."""
    entry = _holding(path, mountinfo)
    if entry is None or entry.fstype not in ("nfs", "nfs4"):
        return None
    for option in entry.options.split(","):
        if option == "nolock" or (option.startswith("local_lock=")
                                  and option != "local_lock=none"):
            return f"its NFS mount {entry.mountpoint} has {option}"
    return None


def canonical(mountpoint: Path) -> str:
    """The path the kernel records (realpath survives a dead mount: it only
    lstat()s, and goes on past errors)."""
    return os.path.realpath(mountpoint)


def set_readahead(mountpoint: str, kib: int, fstype: str = FSTYPE) -> str | None:
    """Let the kernel read ahead ``kib`` KiB on the mount at ``mountpoint``
    (canonical: resolved *before* mounting) through its FUSE connection's
    bdi: sequential reads then arrive as fewer, larger requests (up to
    1 MiB), each costing the daemon its fixed per-request work once.  Found
    through mountinfo: any stat of the mount point, realpath's included,
    is a request to the daemon, which runs this on the very thread that
    would have to answer it.  Needs root; returns why not, else None."""
    entry = mount_at(mountpoint)
    if entry is None or entry.fstype != fstype or not entry.device:
        return "mount not found in /proc/self/mountinfo"
    try:
        with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w") as f:
            f.write(f"{kib}\n")
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _is_dead(path: str) -> bool:
    """statfs always reaches the daemon (stat may be answered from the
    kernel's attribute cache even after the daemon died)."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _fusermount(path: str, lazy: bool) -> subprocess.CompletedProcess[str]:
    """fusermount3 -u (-z): it unmounts FUSE mounts for their owner without
    root; its messages in English, so that a busy mount can be told apart."""
    return subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), path],
                          capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})


def _detach(path: str) -> None:
    proc = _fusermount(path, lazy=True)
    if proc.returncode != 0:
        raise MountPointError(f"cannot detach the dead mount on {path}: "
                              f"{proc.stderr.strip() or 'fusermount3 failed'}")


def prepare_mountpoint(mountpoint: Path, nonempty: bool) -> None:
    """Make ``mountpoint`` ready to mount on, or raise saying why not.  A
    dead cryptfs mount there (its daemon was killed) is detached, with a
    line saying so."""
    if detach_if_dead(mountpoint):
        log.info("%s: the previous cryptfs daemon there had died; detached its dead mount",
                 mountpoint)
    check_mountpoint(mountpoint, nonempty)


def detach_if_dead(mountpoint: Path) -> bool:
    """Detach a cryptfs mount whose daemon is gone; True if there was one.
    A dead mount of another filesystem is left alone, with the fix named."""
    path = canonical(mountpoint)
    entry = mount_at(path)
    if entry is None or not _is_dead(path):
        return False
    if entry.fstype != FSTYPE:
        raise MountPointError(f"{path} is a dead {entry.fstype} mount; detach it with "
                              f"'fusermount3 -uz {path}'")
    _detach(path)
    return True


def check_mountpoint(mountpoint: Path, nonempty: bool) -> None:
    """A directory, not mounted on, and empty unless ``nonempty`` (mounting
    would hide its files)."""
    path = canonical(mountpoint)
    try:
        os.stat(path)
    except OSError as error:
        reason = ("does not exist" if error.errno == errno.ENOENT
                  else f"cannot be used: {error.strerror}")
        raise MountPointError(f"mount point {mountpoint} {reason}") from error
    if not os.path.isdir(path):
        raise MountPointError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(path):
        raise MountPointError(f"{mountpoint} is already a mount point")
    if not nonempty:
        try:
            with os.scandir(path) as entries:
                occupied = any(True for _ in entries)
        except OSError as exc:
            raise MountPointError(f"cannot list mount point {mountpoint}: "
                                  f"{exc.strerror}") from exc
        if occupied:
            raise MountPointError(f"mount point {mountpoint} is not empty (mounting would "
                                  "hide its files; --nonempty mounts over them anyway)")


def cryptfs_mount_at(mountpoint: Path) -> MountEntry:
    """The cryptfs mount at ``mountpoint``, or raise saying what is there."""
    entry = mount_at(canonical(mountpoint))
    if entry is None:
        raise MountPointError(f"{mountpoint} is not mounted")
    if entry.fstype != FSTYPE:
        raise MountPointError(f"{mountpoint} is not a cryptfs mount (it is {entry.fstype})")
    return entry


def unmount_cryptfs(entry: MountEntry, lazy: bool) -> str | None:
    """Unmount; returns a note if it did more than that (detached a dead
    mount, or a busy one with ``lazy``).  A busy mount raises ``BusyError``
    naming the choices."""
    path = entry.mountpoint
    if _is_dead(path):
        _detach(path)
        return "its daemon had died; detached the dead mount"
    proc = _fusermount(path, lazy)
    if proc.returncode == 0:
        return "detached; its daemon ends once the last file there is closed" if lazy else None
    if "busy" in proc.stderr:
        raise BusyError(f"{path} is busy (a process has a file open or its working "
                        f"directory there): find it with 'fuser -m {path}', or detach now "
                        f"with 'cryptfs unmount --lazy {path}'")
    raise MountPointError(proc.stderr.strip() or f"cannot unmount {path}")
