"""Who may use a cipher directory at once: an ``flock`` on
``CIPHERDIR/cryptfs.lock`` held by the mounting process for its whole life.

A mount takes it exclusive (``LOCK_EX``): one mount at a time.  A ``--shared``
mount takes it shared (``LOCK_SH``): any number of shared mounts at once, none
beside an exclusive mount.  ``cryptfs fsck`` takes it exclusive for its run:
no mount of either kind meanwhile, nor a second fsck.  Over NFSv4 the kernel
sends flock to the server as a whole-file byte-range lock, so every client
sees it (it then needs the file open for writing to lock it exclusive, for
reading to lock it shared); over NFSv3 with ``nolock``, or ``local_lock=flock``,
it stays on one client and other machines are not detected.

The kernel drops an flock when the last descriptor of its open file closes,
however the daemon ends (unmount, signal, SIGKILL, a crash): nothing stale
is left to clean up.  The descriptor is taken before daemonizing and shared
by both sides of the fork, so the parent's exit does not release it; it is
close-on-exec, so no program started later (fusermount3) can keep it alive.
The file stays empty (the mount point would be plaintext in a directory that
may be synced to others: the refusal finds it in mountinfo instead) and is
never deleted (a process that opened the old file before the delete would
lock a different inode from one that creates the new file).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

from cryptfs.daemon.mountpoint import cryptfs_mounts, local_locks, network_filesystem
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


def lock_cipherdir(cipherdir: Path, read_only: bool, shared: bool = False) -> MountLock:
    """Lock ``cipherdir`` for one mount (``shared``: a ``--shared`` one, which
    other shared mounts may join), or raise ``AlreadyMountedError`` naming
    where it is mounted.  A shared mount is refused where locks stay on this
    machine although others share the directory (NFS ``nolock``): neither
    this lock nor the content's byte-range locks would keep them apart."""
    if shared and (why := local_locks(cipherdir)) is not None:
        raise CipherDirError(f"{cipherdir}: --shared needs locks that reach the NFS server, "
                             f"but {why}: remount it with local_lock=none (NFSv4 default), "
                             "or mount without --shared on one machine at a time")
    path = os.path.join(cipherdir, LOCK_NAME)
    fd = _open(path, read_only)
    if fd is None:
        log.info("%s is not writable: mounting read-only without the lock against a "
                 "second mount", cipherdir)
        return MountLock(None)
    return _take(cipherdir, path, fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)


def lock_for_check(cipherdir: Path) -> MountLock:
    """An exclusive lock on ``cipherdir`` while ``cryptfs fsck`` reads it (no
    mount, shared or not, starts meanwhile), or raise ``AlreadyMountedError``
    naming where it is mounted.  Nothing is created: without a lock file the
    directory has never been mounted read-write.  Another user's lock file
    may be unopenable: then nothing can be told."""
    path = os.path.join(cipherdir, LOCK_NAME)
    try:
        fd = _open_existing(path)
    except FileNotFoundError:
        return MountLock(None)
    except PermissionError as exc:
        log.warning("cannot open %s (%s): not known whether %s is mounted", path,
                    exc.strerror, cipherdir)
        return MountLock(None)
    except OSError as exc:
        raise CipherDirError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        return _take(cipherdir, path, fd, fcntl.LOCK_EX)
    except _NotLockable:
        # Read-only on NFS: only a shared lock can be had; it keeps exclusive
        # mounts out, not shared ones.
        log.warning("%s can only be locked shared (not writable here): a --shared mount "
                    "elsewhere would not be noticed", path)
        return _take(cipherdir, path, _open_existing(path), fcntl.LOCK_SH)


def _open_existing(path: str) -> int:
    """The lock file, for writing if it can be (NFS grants an exclusive lock
    only on a file open for writing), else for reading."""
    try:
        return os.open(path, os.O_RDWR | _FLAGS)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return os.open(path, os.O_RDONLY | _FLAGS)


class _NotLockable(CipherDirError):
    """flock refused for the open mode (NFS: exclusive on a read-only descriptor)."""


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
                error = _NotLockable if exc.errno == errno.EBADF else CipherDirError
                raise error(f"cannot lock {path}: {exc.strerror}") from exc
        # Not visibly mounted: perhaps a daemon still ending after an unmount.
        if cryptfs_mounts(cipherdir) or time.monotonic() > deadline:
            holders = _holders(path, operation)
            os.close(fd)
            raise AlreadyMountedError(_already_mounted(cipherdir, operation, holders))
        time.sleep(0.05)


def _holders(path: str, wanted: int) -> str:
    """Who holds the lock we were refused: ``shared`` (only ``--shared``
    mounts: a shared lock is still granted) or ``exclusive``.  Asked
    through a descriptor of its own, released at once."""
    if wanted == fcntl.LOCK_SH:
        return "exclusive"
    try:
        fd = os.open(path, os.O_RDONLY | _FLAGS)
    except OSError:
        return "exclusive"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return "shared"
    except OSError:
        return "exclusive"
    finally:
        os.close(fd)


def wait_released(cipherdir: Path, timeout: float = DAEMON_EXIT_TIMEOUT) -> bool:
    """Wait until no process holds ``cipherdir``'s lock exclusive (its
    daemon has ended); False on timeout.  True at once where there is no
    lock file (a source that is not a cipher directory: a custom
    ``--fsname``).  A ``--shared`` mount's daemon holds it shared, which
    this does not wait for (other shared mounts may hold it for as long as
    they run): a mount or fsck right after gets its grace period instead."""
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


def _already_mounted(cipherdir: Path, wanted: int, holders: str) -> str:
    """The refusal: where it is mounted here (mountinfo), else who else can
    hold the lock; and whether ``--shared`` would help."""
    where = cryptfs_mounts(cipherdir)
    mode = " with --shared" if holders == "shared" else ""
    if holders == "shared" and wanted == fcntl.LOCK_EX:
        hint = "; mount it with --shared as well, or unmount those"
    elif wanted == fcntl.LOCK_SH:
        hint = "; it is mounted without --shared (or being checked): --shared mounts " \
               "cannot join it"
    else:
        hint = ""
    if where:
        return (f"{cipherdir} is already mounted{mode} on {', '.join(where)} (unmount it "
                f"first: cryptfs unmount {where[-1]}{hint})")
    remote = network_filesystem(cipherdir)
    elsewhere = (f"by a cryptfs process on another machine (it is on {remote}) or "
                 "another cryptfs process on this one" if remote else
                 "by another cryptfs process on this machine")
    return (f"{cipherdir} is already mounted{mode} {elsewhere} "
            "(mounted with --fsname, in another mount namespace, or detached with --lazy "
            "and still in use; or being checked by cryptfs fsck: cryptfs mounts here: "
            f"{', '.join(cryptfs_mounts()) or 'none'}{hint})")
