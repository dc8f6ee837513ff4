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

With ``spin`` (``CRYPTFS_SPIN=1``; off by default: it paid only with client
and daemon on different CPUs, and cost when neither was pinned; see
docs/bench/2026-12-07e-wakeups), before the loop parks it spins a little
(``Spin``): waking a parked
process on another CPU can cost more than a whole request, so while requests arrive back to back the
loop polls for the next one (``sched_yield`` between polls, so a client on
the same CPU runs instead) for up to a budget that adapts: it grows when a
park ended soon (a longer spin would have caught the request), halves when
one lasted longer than ``SPIN_MAX_NS`` (the mount went quiet) and falls to
zero, so an idle mount does not spin at all.  It spins only when no other
task is ready to run and no worker's result is waiting: those would wait
for the spin.

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
import time

import pyfuse3
import trio

log = logging.getLogger(__name__)

# =1: keep pyfuse3's own wait (for comparisons); read in cli/common.py, which
# passes ``own_request_loop=False`` to ``mount.mounted``.
# =1: spin before parking (``Spin``); read there too, passed as ``spin``.
SPIN_ENV = "CRYPTFS_SPIN"
OFF_ENV = "CRYPTFS_PYFUSE3_LOOP"
VERIFIED = ("3.5.",)  # pyfuse3 releases whose _session_loop this matches
STREAK = 32  # requests read without yielding to other tasks
# Tasks serving requests: enough for every worker thread to be busy and a
# few requests to wait on file locks while others are served (each request
# goes to the next task in turn, so more only spreads them thinner).
MAX_TASKS = 8
# Longest spin before parking: the wake-up it saves, with room for the client
# to turn the reply into its next request.
SPIN_MAX_NS = 200_000
SPIN_START_NS = 20_000  # the first budget after a short park; less drops to zero
# poll's answers on which pyfuse3's read returns at once (see above)
_READ_RETURNS = select.POLLIN | select.POLLERR | select.POLLHUP


class Spin:
    """How long to poll for the next request before parking (the budget,
    in nanoseconds): adapted after each park to the time it took the
    request to come, counted from when the wait began."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.budget_ns = 0
        self.caught = 0  # requests a spin found (for the debug log)
        self.missed = 0  # spins that ran out

    def waited(self, ns: int) -> None:
        """A wait that found no request in its spin (if any) ended after
        ``ns``: a short one asks for a longer spin, a long one (idle) for a
        shorter one, down to none."""
        if ns <= SPIN_MAX_NS:
            self.budget_ns = min(SPIN_MAX_NS, max(2 * self.budget_ns, SPIN_START_NS,
                                                  ns + ns // 2))
        else:
            self.budget_ns //= 2
            if self.budget_ns < SPIN_START_NS:
                self.budget_ns = 0


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
        self.spin = Spin()
        # Tasks let out of ``turns`` that have not run yet: runnable, but only
        # to queue again or take the free turn, so a spin need not wait for them.
        self.woken = 0


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


def install(fd: int | None = None, spin: bool = False) -> bool:
    """Replace pyfuse3's wait (after ``pyfuse3.init``; ``fd``: /dev/fuse's
    descriptor if not the one found; ``spin``: spin before parking); False,
    leaving pyfuse3's own in place, on a pyfuse3 release not verified or if
    no /dev/fuse is open."""
    global _state
    if fd is None:
        fd = fuse_fd()
    if fd is None or _pyfuse3_wait is None or not pyfuse3.__version__.startswith(VERIFIED):
        log.debug("pyfuse3 %s: its own request loop is kept", pyfuse3.__version__)
        return False
    _state = _State(fd)
    _state.spin.enabled = spin
    pyfuse3._wait_fuse_readable = _wait_readable
    return True


def uninstall() -> None:
    """Put pyfuse3's own wait back (after ``pyfuse3.close``)."""
    global _state
    if _state is not None and _pyfuse3_wait is not None:
        pyfuse3._wait_fuse_readable = _pyfuse3_wait
        if _state.spin.enabled:
            log.debug("spins before parking: %d found a request, %d ran out",
                      _state.spin.caught, _state.spin.missed)
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
    # nothing queued (not a streak's end, which must yield): it may spin
    idle = state.streak < STREAK
    if idle and _read_returns(state):
        state.streak += 1
        return True
    state.streak = 0
    if state.closing:  # POLLNVAL
        return False
    while state.parked:  # (none parked: take the turn with no scheduler pass)
        await state.turns.park()
        state.woken -= 1
    state.parked = True
    try:
        began = time.perf_counter_ns() if state.spin.enabled else 0
        if began and idle and _spin(state, began):
            state.streak = 1
            return True
        while not state.closing:
            try:
                await trio.lowlevel.wait_readable(state.fd)
            except trio.ClosedResourceError:  # pyfuse3.terminate: the loop ends
                state.closing = True
                break
            if began:  # (the first wake-up: how long the request took to come)
                state.spin.waited(time.perf_counter_ns() - began)
                began = 0
            if _read_returns(state):  # not taken by another task meanwhile
                return True
        return False
    finally:
        state.parked = False
        if state.turns and not state.woken:  # (one on its way takes the turn)
            state.woken += len(state.turns.unpark())


def _spin(state: _State, began: int) -> bool:
    """Poll for a request until the spin budget from ``began`` is spent
    (True: one is readable), while no other task or worker result waits."""
    if not state.spin.budget_ns:
        return False
    stats = trio.lowlevel.current_statistics()
    if stats.tasks_runnable > state.woken:
        return False
    deadline = began + state.spin.budget_ns
    # (no task becomes runnable during the spin but through run_sync_soon)
    while not trio.lowlevel.current_statistics().run_sync_soon_queue_size:
        if _read_returns(state):
            state.spin.caught += 1
            return True
        if state.closing or time.perf_counter_ns() >= deadline:
            break
        os.sched_yield()
    state.spin.missed += 1
    return False


def _read_returns(state: _State) -> bool:
    """True if a read of the descriptor returns now (a request, or the
    error of a dead connection); on POLLNVAL, False and the loop ends."""
    for _, revents in state.poller.poll(0):
        if revents & select.POLLNVAL:
            state.closing = True
            return False
        return bool(revents & _READ_RETURNS)
    return False
