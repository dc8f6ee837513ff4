"""The Linux system calls Python's standard library lacks, each bound once.

Everything else uses ``os`` (which has ``dir_fd=``/``follow_symlinks=``
for the ``*at`` family).  Calls through ``ctypes.CDLL`` release the GIL.
Failures raise ``OSError`` with the C library's errno, like ``os`` does.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _bind(name: str, argtypes: list, restype=ctypes.c_int):
    """libc's ``name``, or None if this C library lacks it."""
    fn = getattr(_libc, name, None)
    if fn is not None:
        fn.argtypes = argtypes
        fn.restype = restype
    return fn


# A directory opened to list it or to reach its entries (``*at`` calls),
# never through a symlink put in its place.
DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def proc_path(fd: int) -> str:
    """A path that reaches exactly the file ``fd`` refers to, for calls that
    take no descriptor: the kernel jumps to the file (an ``O_PATH`` symlink
    included, never its target) without walking any directory."""
    return f"/proc/self/fd/{fd}"


# --- renameat2(2) ----------------------------------------------------------

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_renameat2 = _bind("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.c_uint])


def renameat2(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes, flags: int) -> None:
    """rename(2) between two directory descriptors with ``RENAME_*`` flags."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    _check(_renameat2(old_dir_fd, old, new_dir_fd, new, flags))


# --- fallocate(2) ----------------------------------------------------------

FALLOC_FL_KEEP_SIZE = 1
_fallocate = _bind("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (``os.posix_fallocate`` has none)."""
    _check(_fallocate(fd, mode, offset, length))


# --- syncfs(2) --------------------------------------------------------------

_syncfs = _bind("syncfs", [ctypes.c_int])


def syncfs(fd: int) -> None:
    """Write everything of the filesystem ``fd`` lives on to its disk."""
    if _syncfs is None:
        os.sync()  # every filesystem: more than needed, never less
        return
    _check(_syncfs(fd))


# --- fstatfs(2) ------------------------------------------------------------

_fstatfs = _bind("fstatfs", [ctypes.c_int, ctypes.c_char_p])


def filesystem_type(fd: int) -> int | None:
    """``f_type`` of the filesystem ``fd`` lives on (``os.fstatvfs`` omits
    it), or None if it cannot be asked."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field
    if _fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value


# --- preadv2(RWF_NOWAIT) -----------------------------------------------------

_probe = bytearray(1)


def page_cached(fd: int, offset: int) -> bool | None:
    """Whether a read at ``offset`` would be served from memory without
    waiting for the disk (a one-byte ``RWF_NOWAIT`` read); None if the
    filesystem cannot tell."""
    try:
        os.preadv(fd, [_probe], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no RWF_NOWAIT here
            return None
        raise
    return True


# --- vmsplice(2) -----------------------------------------------------------


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_vmsplice = _bind("vmsplice", [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_size_t,
                               ctypes.c_uint], ctypes.c_ssize_t)


def vmsplice_all(pipe_w: int, address: int, length: int) -> None:
    """Map ``length`` bytes at ``address`` into a pipe (no copy)."""
    if _vmsplice is None:
        raise OSError(errno.ENOSYS, "vmsplice is not available")
    done = 0
    while done < length:
        iov = _IoVec(address + done, length - done)
        done += _check(_vmsplice(pipe_w, ctypes.byref(iov), 1, 0))


# --- memory locking and process protection -----------------------------------

_mlock = _bind("mlock", [ctypes.c_void_p, ctypes.c_size_t])
_prctl = _bind("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                         ctypes.c_ulong])
PR_SET_DUMPABLE = 4


def mlock(buf: bytearray) -> bool:
    """Lock ``buf``'s pages in memory (never swapped); False if refused."""
    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    return _mlock(ctypes.addressof(view), len(buf)) == 0


def set_undumpable() -> None:
    """PR_SET_DUMPABLE 0: no core file, no ptrace by other users."""
    _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


# --- capabilities (capget/capset) ------------------------------------------

CAP_SYS_RESOURCE = 24
_CAP_VERSION_3 = 0x20080522  # two 32-bit words per set


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_capget = _bind("capget", [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)])
_capset = _bind("capset", [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)])


def drop_capability(cap: int) -> bool:
    """Clear ``cap`` from the calling thread's effective and permitted sets
    (for good: threads started afterwards and children inherit that; the
    inheritable set is left alone, the ambient one follows the permitted).
    True if it was there to drop."""
    if _capget is None or _capset is None:
        raise OSError(errno.ENOSYS, "capget/capset are not available")
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_capget(ctypes.byref(header), data))
    word, bit = divmod(cap, 32)
    mask = 1 << bit
    if not (data[word].effective | data[word].permitted) & mask:
        return False
    data[word].effective &= ~mask
    data[word].permitted &= ~mask
    _check(_capset(ctypes.byref(header), data))
    return True


# --- mallopt(3) ------------------------------------------------------------

M_ARENA_MAX = -8  # glibc's malloc.h
_mallopt = _bind("mallopt", [ctypes.c_int, ctypes.c_int])


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would; call before
    threads start).  glibc gives each thread that allocates an arena of
    its own, and memory freed in one is kept there; the daemon's threads
    allocate under the GIL anyway, so more arenas buy no parallelism.
    False where the C library has no ``mallopt`` (not glibc) or refuses."""
    return _mallopt is not None and _mallopt(M_ARENA_MAX, arenas) == 1
