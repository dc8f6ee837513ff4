"""The kernel engine: AES-256-XTS through the Linux AF_ALG ``skcipher`` API.

One *session* per file: a tfm socket bound to ``xts(aes)`` and keyed with
that file's key.  Operation sockets accepted from it run one request each at
a time, so every thread that uses the session borrows its own *channel*
(an operation socket plus a pipe) from a small pool.

Each data unit is exactly one request (XTS units must not be split):
``sendmsg(op, IV, MSG_MORE)`` → data → ``recv_into`` of exactly the unit's
length.  The data arrives one of three ways:

* **vmsplice** (encrypting, and decrypting buffers): the page-aligned
  plaintext is ``vmsplice``d into the channel's pipe, at most 16 pages per
  call, then each unit is ``splice``d from the pipe into the socket.  The
  kernel reads our pages directly.
* **sendmsg** (small runs, unaligned buffers, where seccomp forbids
  vmsplice, and decrypting from a backing file): the data is copied in with
  the request.  A backing file's run is read with one ``pread`` and the
  hole rule applied in memory: splicing the file into the pipe cost, per
  unit, a splice, two ``lseek`` and a 16-byte read more, for the saving of
  a 4 KiB copy (docs/design.md has the measurement).

See ../shared notes in docs/design.md for the kernel facts behind this.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import threading

from cryptfs.engines.base import (
    PAGE_SIZE,
    XTS_KEY_LEN,
    Buffer,
    aligned_buffer,
    fill_zeros,
    group_units,
    is_zero,
    read_plaintext,
    read_run,
    tweak,
    units,
)
from cryptfs.engines.parallel import ParallelRuns
from cryptfs.errors import EngineError, EngineUnavailableError
from cryptfs.lowlevel.linux import vmsplice_all

log = logging.getLogger(__name__)

ALGORITHM = "xts(aes)"
SEGMENT_PAGES = 16  # at most 16 pages per vmsplice/splice (the default pipe size)
SEGMENT_BYTES = SEGMENT_PAGES * PAGE_SIZE
# Below this many bytes a run goes through sendmsg: fewer syscalls beat the
# saved copy (libkcapi uses the same cut-off; see docs/design.md).
ZERO_COPY_MIN = 2 * PAGE_SIZE
# Idle channels kept per session: one per worker thread is enough.
MAX_IDLE_CHANNELS = 2
SPLICE_F_MORE = 4


def _buffer_address(buf: Buffer) -> int | None:
    """The address of a writable buffer, or None if it is read-only."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


class _Channel:
    """An operation socket and the pipe that feeds it: one request at a time."""

    def __init__(self, tfm: socket.socket) -> None:
        self.op, _ = tfm.accept()
        self.pipe_r, self.pipe_w = os.pipe2(os.O_CLOEXEC)

    def close(self) -> None:
        self.op.close()
        for fd in (self.pipe_r, self.pipe_w):
            os.close(fd)

    def _request(self, opcode: int, index: int, size: int, dst: memoryview,
                 data: memoryview | None) -> None:
        """One XTS unit: start the request, feed it (from ``data``, or from
        what is already in the pipe), read exactly ``size`` bytes back."""
        if data is not None:
            self.op.sendmsg_afalg([data], op=opcode, iv=tweak(index))
        else:
            self.op.sendmsg_afalg(op=opcode, iv=tweak(index), flags=socket.MSG_MORE)
            moved = os.splice(self.pipe_r, self.op.fileno(), size)
            if moved != size:
                raise EngineError(f"AF_ALG accepted {moved} of {size} bytes from the pipe")
        got = self.op.recv_into(dst, size)
        if got != size:
            raise EngineError(f"AF_ALG returned {got} of {size} bytes")

    def run_copy(self, opcode: int, first: int, src: memoryview, dst: memoryview) -> None:
        for k, start, size in units(len(src)):
            end = start + size
            self._request(opcode, first + k, size, dst[start:end], src[start:end])

    def run_vmsplice(self, opcode: int, first: int, address: int, length: int,
                     dst: memoryview) -> None:
        for seg_start, seg_end in _segments(length):
            vmsplice_all(self.pipe_w, address + seg_start, seg_end - seg_start)
            self._drain(opcode, first, seg_start, seg_end, dst)

    def _drain(self, opcode: int, first: int, seg_start: int, seg_end: int,
               dst: memoryview) -> None:
        """Send the units of one segment (already in the pipe) through the cipher."""
        seg_first = first + seg_start // PAGE_SIZE
        for k, start, size in units(seg_end - seg_start):
            at = seg_start + start
            self._request(opcode, seg_first + k, size, dst[at:at + size], None)


def _segments(length: int) -> list[tuple[int, int]]:
    """Cut a run into segments of whole units, each at most 16 pages, so one
    vmsplice or file splice fills the pipe once.  A final unit longer than a
    page (page + trailer) that would overflow a segment gets its own."""
    segments, start = [], 0
    for _k, ustart, size in units(length):
        if ustart + size - start > SEGMENT_BYTES:
            segments.append((start, ustart))
            start = ustart
    segments.append((start, length))
    return segments


class AfalgSession:
    """One file's key in the kernel, with a pool of channels for threads."""

    def __init__(self, engine: AfalgEngine, key: bytes) -> None:
        if len(key) != XTS_KEY_LEN:
            raise ValueError("AES-256-XTS needs a 64-byte key")
        self._engine = engine
        self._tfm = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC, 0)
        try:
            self._tfm.bind(("skcipher", ALGORITHM))
            self._tfm.setsockopt(socket.SOL_ALG, socket.ALG_SET_KEY, key)
        except OSError:
            self._tfm.close()
            raise
        self._lock = threading.Lock()
        self._idle: list[_Channel] = []
        self._closed = False

    def _acquire(self) -> _Channel:
        with self._lock:
            if self._closed:
                raise EngineError("AF_ALG session used after close")
            if self._idle:
                return self._idle.pop()
            return _Channel(self._tfm)

    def _release(self, channel: _Channel) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE_CHANNELS:
                self._idle.append(channel)
                return
        channel.close()

    def _with_channel(self, work) -> None:
        channel = self._acquire()
        try:
            work(channel)
        except BaseException:
            channel.close()  # its request state is unknown: never reuse it
            raise
        self._release(channel)

    def _crypt(self, opcode: int, first: int, src: Buffer, dst: memoryview) -> None:
        length = len(src)
        if self._engine.parallel.parts(length) > 1:  # each part on its own channel
            view, out = memoryview(src), memoryview(dst)
            self._engine.parallel.run(length, lambda start, end: self._crypt_serial(
                opcode, first + start // PAGE_SIZE, view[start:end], out[start:end]))
        else:
            self._crypt_serial(opcode, first, src, dst)

    def _crypt_serial(self, opcode: int, first: int, src: Buffer, dst: memoryview) -> None:
        length = len(src)
        address = None
        if self._engine.zero_copy and length >= ZERO_COPY_MIN:
            address = _buffer_address(src)
            if address is not None and address % PAGE_SIZE:
                address = None
        if address is not None:
            self._with_channel(lambda ch: ch.run_vmsplice(opcode, first, address, length, dst))
        else:
            view = memoryview(src)
            self._with_channel(lambda ch: ch.run_copy(opcode, first, view, dst))

    def encrypt(self, first: int, src: Buffer, dst: memoryview) -> None:
        self._crypt(socket.ALG_OP_ENCRYPT, first, src, dst)

    def decrypt(self, first: int, src: Buffer, dst: memoryview) -> None:
        self._crypt(socket.ALG_OP_DECRYPT, first, src, dst)

    def decrypt_file(self, first: int, fd: int, offset: int, length: int,
                     dst: memoryview) -> None:
        out = memoryview(dst)
        self._engine.parallel.run(length, lambda start, end: self._decrypt_file_serial(
            first + start // PAGE_SIZE, fd, offset + start, end - start, out[start:end]))

    def read_plaintext(self, first: int, fd: int, offset: int, length: int,
                       start: int, end: int, zero_tail: int) -> bytes | None:
        return read_plaintext(self, first, fd, offset, length, start, end, zero_tail)

    def _decrypt_file_serial(self, first: int, fd: int, offset: int, length: int,
                             dst: memoryview) -> None:
        """One ``pread`` of the run (this thread's scratch buffer), the hole
        rule on the bytes read, and each span of data units through
        sendmsg."""
        data = read_run(fd, offset, length)
        spans = group_units(length, lambda k, start, size: is_zero(data[start:start + size]))
        for hole, start, end in spans:
            if hole:
                fill_zeros(dst[start:end])
            else:
                self._with_channel(lambda ch, s=start, e=end: ch.run_copy(
                    socket.ALG_OP_DECRYPT, first + s // PAGE_SIZE, data[s:e], dst[s:e]))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
        for channel in idle:
            channel.close()
        self._tfm.close()


class AfalgEngine:
    """Factory of AF_ALG sessions.  Construct through ``probe()``."""

    name = "afalg"
    # The kernel ciphers with the GIL released, so worker threads run in
    # parallel: only requests smaller than a worker hop stay inline.
    inline_max = 2 * PAGE_SIZE

    def __init__(self, zero_copy: bool, helpers: int | None = None) -> None:
        self.zero_copy = zero_copy
        self.parallel = ParallelRuns(helpers)  # large runs: one part per thread and channel

    @classmethod
    def probe(cls, helpers: int | None = None) -> AfalgEngine:
        """Check that AF_ALG ``xts(aes)`` works here and whether vmsplice is
        allowed; raise ``EngineUnavailableError`` with the reason if not."""
        try:
            probe = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC, 0)
        except (OSError, AttributeError) as exc:
            raise EngineUnavailableError(
                f"the kernel has no AF_ALG sockets ({_reason(exc)})"
            ) from exc
        with probe:
            try:
                probe.bind(("skcipher", ALGORITHM))
            except OSError as exc:
                raise EngineUnavailableError(
                    f"the kernel cannot provide skcipher {ALGORITHM} ({_reason(exc)}; "
                    "is the algif_skcipher module loadable?)"
                ) from exc
        return cls(zero_copy=_vmsplice_allowed(), helpers=helpers)

    def open_session(self, key: bytes) -> AfalgSession:
        return AfalgSession(self, key)

    def describe(self) -> str:
        path = ("vmsplice zero-copy encrypting, pread+sendmsg decrypting files" if self.zero_copy
                else "sendmsg copies (no vmsplice)")
        threads = self.parallel.helpers + 1
        return (f"afalg (kernel AF_ALG {ALGORITHM}, {path}, "
                f"large runs split over {threads} thread(s))")

    def close(self) -> None:
        self.parallel.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return str(exc)


def _vmsplice_allowed() -> bool:
    """vmsplice can be forbidden by seccomp (EPERM) in containers."""
    buf = aligned_buffer(PAGE_SIZE)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        address = _buffer_address(buf)
        assert address is not None
        vmsplice_all(w, address, PAGE_SIZE)
        return True
    except OSError as exc:
        log.info("vmsplice unavailable (%s): AF_ALG will copy with sendmsg", _reason(exc))
        return False
    finally:
        os.close(r)
        os.close(w)
        buf.close()



