"""Building the filesystem stack and serving it: key → engine → codec →
names → operations → FUSE.  Errors up to ``pyfuse3.init`` are raised to the
caller (and reach the terminal); after that the mount runs until unmounted
or signalled."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyfuse3
import trio

from cryptfs.content.codec import ContentCodec
from cryptfs.content.sessions import SessionCache
from cryptfs.daemon import fuseloop
from cryptfs.daemon.ctlsock import ControlSocket
from cryptfs.daemon.mountpoint import FSTYPE, set_readahead
from cryptfs.engines import DEFAULTS, select_engine
from cryptfs.engines.base import EngineOptions, XtsEngine
from cryptfs.engines.timing import EngineTiming
from cryptfs.errors import CipherDirError, MountError, NameDecodeError
from cryptfs.fs.dircache import DirCache
from cryptfs.fs.handles import HandleTable
from cryptfs.fs.inodes import InodeTable
from cryptfs.fs.ops import MountOptions, Operations
from cryptfs.fs.tree import BackingTree
from cryptfs.fs.workers import WorkerPool
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.keyfile import FEATURE_AUTHENTICATED, remove_stale_copies
from cryptfs.lowlevel.linux import CAP_SYS_RESOURCE, drop_capability, limit_malloc_arenas
from cryptfs.names.filenames import NameCipher
from cryptfs.names.metadata import MetadataCipher

log = logging.getLogger(__name__)

# glibc malloc arenas for the daemon's threads (``limit_malloc_arenas``);
# the user's MALLOC_ARENA_MAX, if set, is left to glibc.
MALLOC_ARENAS = 2


def read_requests_plainly() -> None:
    """Keep libfuse receiving each request with one read(2) of /dev/fuse.

    pyfuse3 registers ``write_buf``, so libfuse 3 asks for splice receive
    (FUSE_CAP_SPLICE_READ) and uses it wherever it can grow its pipe to its
    buffer size (1 MiB + 4 KiB), beyond the 1 MiB pipe-max-size: with
    CAP_SYS_RESOURCE, which every root process has.  Each request then costs
    a splice into the pipe and a read from it, and pyfuse3 copies a write's
    data out of the pipe anyway.  Dropping the capability (before any thread
    starts: capabilities are per thread) keeps the plain read; nothing the
    daemon does needs it, and without it root's daemon no longer writes past
    quotas or into the blocks a filesystem reserves for root."""
    try:
        dropped = drop_capability(CAP_SYS_RESOURCE)
    except OSError as exc:  # no capset here: nothing to drop either
        log.debug("CAP_SYS_RESOURCE not dropped: %s", exc)
        return
    if dropped:
        log.debug("CAP_SYS_RESOURCE dropped: libfuse reads requests without splice")


@dataclass
class Stack:
    """The built filesystem and what must be closed after unmounting."""

    operations: Operations
    engine: XtsEngine  # passed here, not reached through the codec's sessions
    sessions: SessionCache
    handles: HandleTable
    tree: BackingTree
    workers: WorkerPool
    # The kernel engine timed against the userspace one (build_stack, when
    # the kernel engine was chosen), for the log.
    timing: EngineTiming | None = None

    def close(self) -> None:
        self.workers.close()
        self.handles.close_all()
        self.tree.close()
        self.sessions.close()
        self.engine.close()  # its threads for splitting large runs


def build_stack(cipherdir: Path, keys: KeyRing, engine_name: str,
                options: MountOptions, features: Collection[str],
                engine_options: EngineOptions = DEFAULTS) -> Stack:
    """``features``: the key file's feature flags (they select encodings)."""
    if "MALLOC_ARENA_MAX" not in os.environ:  # before any thread starts
        limit_malloc_arenas(MALLOC_ARENAS)
    choice = select_engine(engine_name, engine_options, compare=True)
    stack = assemble(cipherdir, keys, choice.engine, options, features)
    stack.timing = choice.timing
    return stack


def warn_if_far_behind(timing: EngineTiming | None, engine_name: str) -> None:
    """Where ``auto`` chose a kernel engine far behind the userspace one,
    warn, naming the faster choice (before detaching: the user should see
    it).  A user who asked for ``--engine afalg`` gets it at info level
    (``log_timing``)."""
    advice = None if timing is None else timing.advice()
    if advice is not None and engine_name == "auto":
        log.warning("%s", advice)


def log_timing(timing: EngineTiming | None, engine_name: str) -> None:
    """The engine figures at info level (for the daemon's log)."""
    if timing is None:
        return
    log.info("engine timing: %s", timing.summary())
    advice = timing.advice()
    if advice is not None and engine_name != "auto":
        log.info("%s", advice)


def assemble(cipherdir: Path, keys: KeyRing, engine: XtsEngine,
             options: MountOptions, features: Collection[str]) -> Stack:
    """Build the filesystem on ``cipherdir``: the one way, for the mount and
    for the in-process tests (``tests/t3_ops.py``).  The cipher directory is
    opened once; everything below it is reached through descriptors.
    ``features``: the key file's feature flags (page tags, the metadata
    encoding)."""
    root_fd = os.open(cipherdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    st = os.fstat(root_fd)
    sessions = SessionCache(engine, keys)
    codec = ContentCodec(keys, sessions, FEATURE_AUTHENTICATED in features,
                         byte_range_locks=options.shared)
    handles = HandleTable(codec, read_only=options.read_only, shared=options.shared)
    dirs = DirCache(options.dir_fds)

    def gone(ino: int) -> None:  # the inode table dropped ino, or its last name
        dirs.forget(ino)
        handles.forget(ino)

    inodes = InodeTable((st.st_dev, st.st_ino), on_gone=gone)
    metadata = MetadataCipher.for_features(keys, features)
    tree = BackingTree(root_fd, inodes, NameCipher.for_features(keys, features), dirs,
                       metadata, codec, read_only=options.read_only, shared=options.shared)
    try:
        tree.diriv(pyfuse3.ROOT_INODE)
    except NameDecodeError as exc:
        tree.close()
        sessions.close()
        raise CipherDirError(f"{cipherdir}: {exc} (damaged cipher directory?)") from exc
    if not options.read_only:
        _remove_stale_keyfiles(cipherdir)
    workers = WorkerPool(options.worker_threads)
    if options.inline_max is None:  # what the engine needs, given to the FUSE edge
        options = replace(options, inline_max=engine.inline_max)
    ops = Operations(inodes, tree, handles, codec, metadata, workers, options)
    return Stack(ops, engine, sessions, handles, tree, workers)


def _remove_stale_keyfiles(cipherdir: Path) -> None:
    """Old key file copies in the cipher directory open with passwords that
    were changed or removed since: delete them (a notice, not a failure)."""
    try:
        removed = remove_stale_copies(Path(cipherdir))
    except OSError as exc:
        log.warning("could not delete old key file copies in %s: %s", cipherdir, exc)
        return
    for name in removed:
        log.warning("deleted %s: an old copy of the key file that still opened with "
                    "passwords changed or removed since", name)


def fuse_options(options: MountOptions, fsname: str) -> set[str]:
    opts = {f"fsname={fsname}", "subtype=cryptfs"}
    if options.read_only:
        opts.add("ro")
    if options.allow_other:
        # Other users: the kernel checks modes and owners.  Without it only
        # the daemon's own user reaches the mount, and the backing files'
        # permissions (which the daemon is subject to) decide, as in
        # gocryptfs; that spares a GETATTR of the directory per create/unlink.
        opts |= {"allow_other", "default_permissions"}
    return opts


@contextlib.contextmanager
def mounted(stack: Stack, mountpoint: Path, opts: set[str],
            own_request_loop: bool = True, spin: bool = False) -> Iterator[None]:
    """``own_request_loop``: False keeps pyfuse3's request loop
    (``CRYPTFS_PYFUSE3_LOOP=1``, for comparisons); ``spin``: ours spins
    before it parks (``CRYPTFS_SPIN=1``)."""
    try:
        pyfuse3.init(stack.operations, os.fspath(mountpoint), opts)
    except RuntimeError as exc:
        stack.close()
        raise MountError(f"cannot mount on {mountpoint}: {exc}") from exc
    if own_request_loop:
        fuseloop.install(spin=spin)
    else:
        log.debug("%s=1: pyfuse3's own request loop is kept", fuseloop.OFF_ENV)
    try:
        yield
    finally:
        pyfuse3.close(unmount=True)
        fuseloop.uninstall()
        stack.close()


async def serve(stack: Stack, idle: float | None = None, where: str | None = None,
                control: ControlSocket | None = None) -> None:
    """Run the FUSE loop until unmount; SIGINT/SIGTERM unmount cleanly;
    with ``idle``, unmount after that many seconds without any request and
    with no file open; ``where``: the canonical mount point (for the
    read-ahead setting); ``control``: the control socket to answer on."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals)
        if control is not None:
            nursery.start_soon(control.serve)
        if idle:
            nursery.start_soon(_stop_when_idle, stack, idle)
        readahead = stack.operations.options.readahead_kb
        if where is not None and readahead:
            stack.operations.after_init = functools.partial(apply_readahead, where, readahead)
        notify_ready()
        await pyfuse3.main(max_tasks=fuseloop.MAX_TASKS)
        nursery.cancel_scope.cancel()


def apply_readahead(where: str, kib: int, fstype: str = FSTYPE) -> None:
    """Set the mount's read-ahead; called once the kernel has our INIT reply
    (which caps it at the 128 KiB the kernel offered: set before, it would
    be lost).  Nothing here touches the mount, so nothing waits for us.  A
    trio callback: it must not raise."""
    try:
        why = set_readahead(where, kib, fstype)
    except Exception as exc:  # e.g. mountinfo unreadable: the mount works regardless
        why = str(exc)
    if why is not None:  # not root, say: the kernel's default stays
        log.debug("read-ahead left at the kernel's default: %s", why)


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            fuseloop.terminate()
            return


async def _stop_when_idle(stack: Stack, idle: float) -> None:
    ops = stack.operations
    while True:
        await trio.sleep(max(0.5, min(idle / 4, 30.0)))
        if len(stack.handles) == 0 and time.monotonic() - ops.last_activity >= idle:
            log.info("idle for %g s: unmounting", idle)
            fuseloop.terminate()
            return


def notify_ready() -> None:
    """Tell systemd the filesystem is ready (``Type=notify`` units)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(b"READY=1")
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", address, exc)
