"""The native AES-XTS helper (cryptfs/engines/_xts.c) against the
``cryptography`` path: IEEE 1619 vector 10, every boundary length, both
directions, the hole rule, unaligned buffers, argument errors; and that
this test run really uses it (scripts/setup always builds it)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cryptfs.cli.common import environment_overrides
from cryptfs.engines import native, select_engine
from cryptfs.engines.base import PAGE_SIZE, aligned_buffer, units
from cryptfs.engines.userspace import OpenSSLEngine
from cryptfs.errors import EngineUnavailableError
from tests.conftest import native_engine
from tests.helpers import gate_fuse
from tests.helpers.xts_vectors import BOUNDARY_LENGTHS, PATTERN, V10_CT, V10_KEY, aligned

HELPERS = Path(__file__).parent / "helpers"
TAILS = (16, 17, 31, 4095, 4096, 4097, 4111, 4112)
# single units of every edge size, and runs of 1, 2, 65 and 72 pages ending
# in each tail size (64+ pages are split over threads)
LENGTHS = sorted({*BOUNDARY_LENGTHS,
                  *(n * PAGE_SIZE + t for n in (0, 1, 2, 65, 72) for t in TAILS)})


def test_this_run_uses_the_native_helper():
    """CI must test the fast path: the helper is built and chosen by default
    (unless CRYPTFS_NO_NATIVE=1 asks for the fallback on purpose)."""
    from cryptfs.engines import _xts  # fails if scripts/setup did not build it

    assert _xts.OPENSSL_VERSION.startswith("OpenSSL")
    engine = OpenSSLEngine(native_helper=environment_overrides().engine.native)
    if os.environ.get(native.NO_NATIVE_ENV) == "1":
        assert engine.path == "direct"
    else:
        assert engine.path == "native"
        assert "native EVP helper" in engine.describe()
        assert type(engine.open_session(V10_KEY)).__name__ == "NativeSession"


def test_no_native_env_forces_the_fallback(monkeypatch):
    """Read once by the command line (``environment_overrides``), passed down."""
    monkeypatch.setenv(native.NO_NATIVE_ENV, "1")
    options = environment_overrides().engine
    engine = OpenSSLEngine(native_helper=options.native)
    assert engine.path == "direct"
    assert engine.describe().startswith("openssl (cryptography)")
    assert "CRYPTFS_NO_NATIVE=1" in engine.describe()
    with pytest.raises(EngineUnavailableError, match="native helper"):
        OpenSSLEngine("native", native_helper=options.native)
    assert select_engine("openssl", options).engine.path == "direct"


def unaligned(data: bytes) -> memoryview:
    """``data`` at an odd address (one byte into a page-aligned buffer)."""
    buf = aligned_buffer(len(data) + 1)
    view = memoryview(buf)[1:]
    view[:] = data
    return view


@pytest.mark.parametrize("place", [bytes, aligned, unaligned])
def test_ieee1619_vector10(place):
    session = native_engine().open_session(V10_KEY)
    src = place(PATTERN)
    out = unaligned(bytes(len(PATTERN)))
    session.encrypt(0xFF, src, out)
    assert bytes(out) == V10_CT
    back = bytearray(len(PATTERN))
    session.decrypt(0xFF, unaligned(V10_CT), memoryview(back))
    assert bytes(back) == PATTERN
    session.close()


@pytest.mark.parametrize("helpers", [0, 1, 3])
@pytest.mark.parametrize("length", LENGTHS)
def test_same_bytes_as_cryptography(length, helpers, tmp_path):
    """Both directions and decryption from a file with the hole rule, serial
    and split over threads, from unaligned buffers."""
    key, first = secrets.token_bytes(64), secrets.randbelow(1 << 48)
    plain = secrets.token_bytes(length)
    fast = native_engine(helpers)
    mine, ref = fast.open_session(key), OpenSSLEngine("direct").open_session(key)
    try:
        expected = bytearray(length)
        ref.encrypt(first, plain, memoryview(expected))
        got = unaligned(bytes(length))
        mine.encrypt(first, unaligned(plain), got)
        assert bytes(got) == bytes(expected)
        back = unaligned(bytes(length))
        mine.decrypt(first, unaligned(bytes(expected)), back)
        assert bytes(back) == plain
        # stored units: the first and the last zeroed (holes), the rest ciphertext
        head, last = min(PAGE_SIZE, length), list(units(length))[-1][1]
        stored = bytearray(expected)
        stored[:head] = bytes(head)
        stored[last:] = bytes(length - last)
        path = tmp_path / "f"
        path.write_bytes(bytes(PAGE_SIZE) + stored)
        fd = os.open(path, os.O_RDONLY)
        try:
            outs = []
            for session in (mine, ref):
                out = bytearray(length)
                session.decrypt_file(first, fd, PAGE_SIZE, length, memoryview(out))
                outs.append(bytes(out))
        finally:
            os.close(fd)
        assert outs[0] == outs[1]
        assert outs[0][:head] == bytes(head)
        assert outs[0][last:] == bytes(length - last)
        assert outs[0][head:last] == plain[head:last]  # units in between are data
    finally:
        mine.close()
        ref.close()
        fast.close()


@pytest.mark.parametrize("holes", [False, True])
def test_hole_rule_only_when_asked(holes):
    """Zero units decrypt to zeros with the hole rule, and to whatever XTS
    gives without it (what ``decrypt`` of a buffer does)."""
    from cryptfs.engines import _xts

    key = secrets.token_bytes(64)
    xts = _xts.Xts(key)
    zeros, out = bytes(3 * PAGE_SIZE), bytearray(3 * PAGE_SIZE)
    xts.decrypt(7, zeros, out, holes)
    ref = bytearray(len(zeros))
    OpenSSLEngine("direct").open_session(key).decrypt(7, zeros, memoryview(ref))
    assert bytes(out) == (zeros if holes else bytes(ref))
    assert ref != zeros
    xts.close()


def test_tweak_carries_into_the_high_half():
    """Unit indexes are 128-bit tweaks: a run crossing 2**64 carries."""
    key, plain = secrets.token_bytes(64), secrets.token_bytes(4 * PAGE_SIZE)
    first = (1 << 64) - 2
    outs = []
    for engine in (native_engine(), OpenSSLEngine("direct")):
        out = bytearray(len(plain))
        engine.open_session(key).encrypt(first, plain, memoryview(out))
        outs.append(out)
    assert outs[0] == outs[1]


def test_bad_arguments_are_clear_errors(tmp_path):
    from cryptfs.engines import _xts

    with pytest.raises(ValueError, match="64-byte key"):
        _xts.Xts(bytes(32))
    xts = _xts.Xts(secrets.token_bytes(64))
    with pytest.raises(ValueError, match="at least 16 bytes"):
        xts.encrypt(0, bytes(15), bytearray(15))
    with pytest.raises(ValueError, match="output buffer"):
        xts.encrypt(0, bytes(32), bytearray(31))
    with pytest.raises(TypeError):
        xts.encrypt(0, bytes(32), bytes(32))  # read-only output
    with pytest.raises(OverflowError):
        xts.encrypt(-1, bytes(32), bytearray(32))
    path = tmp_path / "f"
    path.write_bytes(bytes(2 * PAGE_SIZE))
    fd = os.open(path, os.O_RDONLY)
    try:
        for args in [(4096, 10, 5, 0), (4096, 0, 4097, 0), (15, 0, 15, 0), (4096, 0, 10, 4097)]:
            with pytest.raises(ValueError, match="bad run"):
                xts.read(0, fd, 0, *args)
        with pytest.raises(OSError):
            xts.read(0, -1, 0, 4096, 0, 4096, 0)
        with pytest.raises(EOFError):
            xts.read(0, fd, PAGE_SIZE, 2 * PAGE_SIZE, 0, 10, 0)
        assert xts.read(0, fd, 0, PAGE_SIZE, 0, PAGE_SIZE, 16) == bytes(PAGE_SIZE)  # holes
        xts.close()
        xts.close()  # idempotent
        with pytest.raises(ValueError, match="closed"):
            xts.decrypt(0, bytes(32), bytearray(32))
        with pytest.raises(ValueError, match="closed"):
            xts.read(0, fd, 0, PAGE_SIZE, 0, PAGE_SIZE, 0)
    finally:
        os.close(fd)


def test_sessions_are_thread_safe_while_splitting():
    """Many threads on one session, each run split over helpers too."""
    from concurrent.futures import ThreadPoolExecutor

    key = secrets.token_bytes(64)
    engine = native_engine(helpers=2)
    session, ref = engine.open_session(key), OpenSSLEngine("direct").open_session(key)
    data = [secrets.token_bytes((i % 5) * 20 * PAGE_SIZE + 100 + i) for i in range(24)]

    def work(i: int) -> bool:
        out, expected = bytearray(len(data[i])), bytearray(len(data[i]))
        session.encrypt(i << 20, data[i], memoryview(out))
        ref.encrypt(i << 20, data[i], memoryview(expected))
        back = bytearray(len(out))
        session.decrypt(i << 20, out, memoryview(back))
        return out == expected and back == data[i]

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(len(data))))
    session.close()
    engine.close()


def test_mounts_use_the_checked_helper(caplog):
    """``select_engine`` uses the helper after checking it against the
    ``cryptography`` path, and falls back if its bytes differ."""
    if os.environ.get(native.NO_NATIVE_ENV) != "1":
        choice = select_engine("openssl")
        assert choice.engine.path == "native"
        choice.engine.close()
    real = native.NativeSession.encrypt

    def broken(self, first, src, dst):
        real(self, first, src, dst)
        dst[0] ^= 1

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native.NativeSession, "encrypt", broken)
        choice = select_engine("openssl")
    assert choice.engine.path == "direct"
    if os.environ.get(native.NO_NATIVE_ENV) != "1":
        assert "native AES-XTS helper failed its self-test" in caplog.text


@pytest.mark.fuse
def test_a_small_read_waits_for_its_backing_file_without_the_gil(tmp_path):
    """A 4 KiB read (the size that keeps the GIL for its deciphering) whose
    backing file does not answer: while its pread waits, another Python
    thread runs.  The backing file is on a FUSE filesystem that holds the
    read until this thread, which needs the GIL to get there, says go (a
    reader that held the GIL would leave it waiting until its failsafe)."""
    mnt = tmp_path / "gate"
    mnt.mkdir()
    server = subprocess.Popen([sys.executable, str(HELPERS / "gate_fuse.py"), str(mnt)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    fd = -1
    try:
        assert server.stdout.readline() == "mounted\n"
        engine = native_engine()
        session = engine.open_session(secrets.token_bytes(64))
        fd = os.open(mnt / "f", os.O_RDONLY)
        got: list[bytes | None] = []
        reader = threading.Thread(target=lambda: got.append(
            session.read_plaintext(0, fd, 0, PAGE_SIZE, 0, PAGE_SIZE, 0)))
        reader.start()
        assert server.stdout.readline() == "read\n"  # its pread waits in the server
        server.stdin.write("go\n")  # this thread got the GIL while it waits
        server.stdin.flush()
        assert server.stdout.readline() == "go\n", "the read was only let go by the failsafe"
        reader.join(gate_fuse.FAILSAFE * 3)
        expected = bytearray(PAGE_SIZE)
        session.decrypt(0, gate_fuse.CONTENT[:PAGE_SIZE], memoryview(expected))
        assert got == [bytes(expected)]
        session.close()
        engine.close()
    finally:
        if fd >= 0:
            os.close(fd)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        server.stdin.close()
        server.wait(60)
        server.stdout.close()
