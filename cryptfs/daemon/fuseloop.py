"""A cheaper wait for the next FUSE request than pyfuse3's own.

pyfuse3's session loop awaits ``_wait_fuse_readable()`` before it reads each
request: a ``trio.Lock`` and ``trio.lowlevel.wait_readable`` on /dev/fuse,
so two trips through trio's scheduler and epoll_ctl/epoll_wait calls even
when the kernel already has the next request queued (the writeback cache's
writes, releases and other asynchronous requests: about one request in six
during an untar).  ``install`` replaces that function (pyfuse3 looks it up as a
module global on every call) with one that first asks ``poll(2)`` with a
zero timeout: when a request is waiting, the loop reads it without yielding.
After ``STREAK`` such requests in a row it yields once, so that other tasks
and the results of worker threads are not held up.

Why it is safe: pyfuse3 reads the request with a blocking read right after
this returns True, so True must mean "readable now".  Every True here
follows a ``poll`` that said so, with no yield in between (a task woken by
trio re-checks: another task may have taken the request meanwhile), and
only one task at a time parks on the descriptor (the others wait for their
turn in a parking lot, handed on by the parked task when it leaves).
pyfuse3's own wait also checks the session's exit flag after taking its
lock, which Python cannot read: ``terminate`` (use it instead of
``pyfuse3.terminate``) sets ours.

What "readable" means: ``poll`` reports POLLIN (a request is waiting), or
POLLERR or POLLHUP (the connection is gone: the kernel answers every read
of /dev/fuse with ENODEV after an unmount or an abort, on which libfuse
ends the session, and pyfuse3's loop with it).  Both make the read return
at once, so both are True: pyfuse3's read reports a dead connection.  A
wait that answered False to them would only be woken again at once by the
same condition, never ending.  POLLNVAL (the descriptor is not open)
cannot be read at all: the wait ends with False, and so does the loop.

pyfuse3 counts tasks waiting for requests only inside its own wait, so with
this one it starts a new task for every request until it has
``max_tasks``: pass a small bound to ``pyfuse3.main`` (``MAX_TASKS``).

This leans on how pyfuse3's loop uses the function, so it is installed
only on the pyfuse3 releases whose loop was read (``VERIFIED``, the only
ones pyproject.toml admits); any other, if forced in, keeps pyfuse3's own
wait (and ``tests/t3_fuseloop.py`` fails, asking for
the new release's loop to be read).
"""

from __future__ import annotations

import logging
import os
import select

import pyfuse3
import trio

log = logging.getLogger(__name__)

# =1: keep pyfuse3's own wait (for comparisons); read in cli/common.py, which
# passes ``own_request_loop=False`` to ``mount.mounted``.
OFF_ENV = "CRYPTFS_PYFUSE3_LOOP"
VERIFIED = ("3.5.",)  # pyfuse3 releases whose _session_loop this matches
STREAK = 32  # requests read without yielding to other tasks
# Tasks serving requests: enough for every worker thread to be busy and a
# few requests to wait on file locks while others are served (each request
# goes to the next task in turn, so more only spreads them thinner).
MAX_TASKS = 8
# poll's answers on which pyfuse3's read returns at once (see above)
_READ_RETURNS = select.POLLIN | select.POLLERR | select.POLLHUP


class _State:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        # One task at a time waits on the descriptor (``parked``); others
        # queue in ``turns``.  Not a trio.Lock: without its bookkeeping
        # (owner checks, breaker registration, a parking-lot call per
        # release) an untar took ~7 % less daemon CPU and ~5 % less time
        # (medians of per-round ratios, 14 rounds in ABBA order).
        self.parked = False
        self.turns = trio.lowlevel.ParkingLot()
        self.streak = 0
        self.closing = False


_state: _State | None = None
_pyfuse3_wait = getattr(pyfuse3, "_wait_fuse_readable", None)


def fuse_fd() -> int | None:
    """The descriptor of /dev/fuse that ``pyfuse3.init`` opened (this
    process opens no other), or None."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:  # closed since listed (the listing's own descriptor)
            continue
    return None


def install(fd: int | None = None) -> bool:
    """Replace pyfuse3's wait (after ``pyfuse3.init``; ``fd``: /dev/fuse's
    descriptor if not the one found); False, leaving pyfuse3's own in place,
    on a pyfuse3 release not verified or if no /dev/fuse is open."""
    global _state
    if fd is None:
        fd = fuse_fd()
    if fd is None or _pyfuse3_wait is None or not pyfuse3.__version__.startswith(VERIFIED):
        log.debug("pyfuse3 %s: its own request loop is kept", pyfuse3.__version__)
        return False
    _state = _State(fd)
    pyfuse3._wait_fuse_readable = _wait_readable
    return True


def uninstall() -> None:
    """Put pyfuse3's own wait back (after ``pyfuse3.close``)."""
    global _state
    if _state is not None and _pyfuse3_wait is not None:
        pyfuse3._wait_fuse_readable = _pyfuse3_wait
    _state = None


def stop() -> None:
    """Every wait from now on returns False: the session loop ends."""
    if _state is not None:
        _state.closing = True


def terminate() -> None:
    """End the session loop: ``pyfuse3.terminate`` and ``stop``."""
    stop()
    pyfuse3.terminate()


async def _wait_readable() -> bool:
    state = _state
    assert state is not None
    if state.closing:
        return False
    if state.streak < STREAK and _read_returns(state):
        state.streak += 1
        return True
    state.streak = 0
    if state.closing:  # POLLNVAL
        return False
    while state.parked:  # (none parked: take the turn with no scheduler pass)
        await state.turns.park()
    state.parked = True
    try:
        while not state.closing:
            try:
                await trio.lowlevel.wait_readable(state.fd)
            except trio.ClosedResourceError:  # pyfuse3.terminate: the loop ends
                state.closing = True
                break
            if _read_returns(state):  # not taken by another task meanwhile
                return True
        return False
    finally:
        state.parked = False
        if state.turns:
            state.turns.unpark()


def _read_returns(state: _State) -> bool:
    """True if a read of the descriptor returns now (a request, or the
    error of a dead connection); on POLLNVAL, False and the loop ends."""
    for _, revents in state.poller.poll(0):
        if revents & select.POLLNVAL:
            state.closing = True
            return False
        return bool(revents & _READ_RETURNS)
    return False
