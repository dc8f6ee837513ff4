"""One mount per cipher directory on this machine: an ``flock`` on
``CIPHERDIR/cryptfs.lock`` held by the mounting process for its whole life.

The kernel drops an flock when the last descriptor of its open file closes,
however the daemon ends (unmount, signal, SIGKILL, a crash): nothing stale
is left to clean up.  The descriptor is taken before daemonizing and shared
by both sides of the fork, so the parent's exit does not release it; it is
close-on-exec, so no program started later (fusermount3) can keep it alive.
The file stays empty (the mount point would be plaintext in a directory that
may be synced to others: the refusal finds it in mountinfo instead) and is
never deleted (a process that opened the old file before the delete would
lock a different inode from one that creates the new file).  flock is local
to one machine: two machines sharing a cipher directory over a network
filesystem are not detected.  ``cryptfs fsck`` takes the lock shared for
its run: it refuses a mounted directory, and no mount starts under it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

from cryptfs.daemon.mountpoint import cryptfs_mounts
from cryptfs.errors import AlreadyMountedError, CipherDirError

log = logging.getLogger(__name__)

LOCK_NAME = "cryptfs.lock"
EXIT_GRACE = 5.0  # seconds a mount waits for a daemon that is ending after its unmount
DAEMON_EXIT_TIMEOUT = 30.0  # seconds ``cryptfs unmount`` waits for the daemon to end
_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW



class MountLock:
    """The held lock (or none, for a read-only mount of a cipher directory
    where the lock file cannot be created); ``close()`` releases it."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> MountLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock_cipherdir(cipherdir: Path, read_only: bool) -> MountLock:
    """Lock ``cipherdir`` for one mount, or raise ``AlreadyMountedError``
    naming where it is mounted."""
    path = os.path.join(cipherdir, LOCK_NAME)
    fd = _open(path, read_only)
    if fd is None:
        log.info("%s is not writable: mounting read-only without the lock against a "
                 "second mount", cipherdir)
        return MountLock(None)
    return _take(cipherdir, path, fd, fcntl.LOCK_EX)


def lock_for_check(cipherdir: Path) -> MountLock:
    """A shared lock on ``cipherdir`` while ``cryptfs fsck`` reads it (a
    mount's exclusive lock cannot be taken meanwhile), or raise
    ``AlreadyMountedError`` naming where it is mounted.  Nothing is created:
    without a lock file the directory has never been mounted read-write.
    Another user's lock file may be unreadable: then nothing can be told."""
    path = os.path.join(cipherdir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | _FLAGS)
    except FileNotFoundError:
        return MountLock(None)
    except PermissionError as exc:
        log.warning("cannot open %s (%s): not known whether %s is mounted", path,
                    exc.strerror, cipherdir)
        return MountLock(None)
    except OSError as exc:
        raise CipherDirError(f"cannot open {path}: {exc.strerror}") from exc
    return _take(cipherdir, path, fd, fcntl.LOCK_SH)


def _take(cipherdir: Path, path: str, fd: int, operation: int) -> MountLock:
    """flock ``fd`` (``LOCK_EX`` or ``LOCK_SH``) without blocking; closes
    it if the lock is refused."""
    deadline = time.monotonic() + EXIT_GRACE
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return MountLock(fd)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise CipherDirError(f"cannot lock {path}: {exc.strerror}") from exc
        # Not visibly mounted: perhaps a daemon still ending after an unmount.
        if cryptfs_mounts(cipherdir) or time.monotonic() > deadline:
            os.close(fd)
            raise AlreadyMountedError(_already_mounted(cipherdir))
        time.sleep(0.05)


def wait_released(cipherdir: Path, timeout: float = DAEMON_EXIT_TIMEOUT) -> bool:
    """Wait until no process holds ``cipherdir``'s lock (its daemon has
    ended); False on timeout.  True at once where there is no lock file
    (a source that is not a cipher directory: a custom ``--fsname``)."""
    if not cipherdir.is_absolute():
        return True
    try:
        fd = os.open(os.path.join(cipherdir, LOCK_NAME), os.O_RDONLY | _FLAGS)
    except OSError:
        return True
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return True  # cannot tell: do not wait
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    finally:
        os.close(fd)  # releases our shared lock at once


def _open(path: str, read_only: bool) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | _FLAGS, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CipherDirError(f"cannot open {path}: {exc.strerror}") from exc
        error = exc
    try:
        return os.open(path, os.O_RDONLY | _FLAGS)  # flock needs no write access
    except OSError:
        if read_only:
            return None  # nothing will be written: a second mount cannot corrupt anything
    raise CipherDirError(f"cannot create {path}: {error.strerror} (mount a read-only "
                         "cipher directory with --ro)")


def _already_mounted(cipherdir: Path) -> str:
    where = cryptfs_mounts(cipherdir)
    if where:
        return (f"{cipherdir} is already mounted on {', '.join(where)} (unmount it first: "
                f"cryptfs unmount {where[-1]})")
    return (f"{cipherdir} is already mounted by another cryptfs process on this machine "
            "(mounted with --fsname, in another mount namespace, or detached with --lazy "
            "and still in use; or being checked by cryptfs fsck: cryptfs mounts here: "
            f"{', '.join(cryptfs_mounts()) or 'none'})")
