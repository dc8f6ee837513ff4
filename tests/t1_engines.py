"""Both engines: IEEE 1619 vectors, cross-engine equality at every boundary
size, hole handling, and engine selection."""

from __future__ import annotations

import os
import secrets
import threading

import pytest

from cryptfs.engines import cross_check, select_engine
from cryptfs.engines.afalg import AfalgEngine
from cryptfs.engines.base import PAGE_SIZE, Scratch, units
from cryptfs.engines.timing import SIZES as timing_sizes
from cryptfs.engines.timing import EngineTiming, time_engines
from cryptfs.engines.userspace import FACTORIES, OpenSSLEngine
from cryptfs.errors import BackingSizeError, EngineUnavailableError
from tests.conftest import REQUIRE_AFALG, afalg_engine
from tests.helpers.xts_vectors import BOUNDARY_LENGTHS, PATTERN, V10_CT, V10_KEY, aligned


@pytest.mark.parametrize("aligned_input", [True, False])
def test_ieee1619_vector10(engine, aligned_input):
    session = engine.open_session(V10_KEY)
    try:
        src = aligned(PATTERN) if aligned_input else PATTERN
        out = bytearray(len(PATTERN))
        session.encrypt(0xFF, src, memoryview(out))
        assert bytes(out) == V10_CT
        back = bytearray(len(PATTERN))
        session.decrypt(0xFF, aligned(V10_CT) if aligned_input else V10_CT, memoryview(back))
        assert bytes(back) == PATTERN
    finally:
        session.close()


@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
def test_openssl_context_paths_agree(length):
    """The direct context factories (the fast path) and the public
    ``Cipher`` API give the same bytes; the fast path is really in use."""
    assert FACTORIES["direct"] is not None, "cryptography moved its cipher contexts"
    key, first = secrets.token_bytes(64), secrets.randbelow(1 << 40)
    plain = secrets.token_bytes(length)
    outs = []
    for factories in ("direct", "public"):
        session = OpenSSLEngine(factories).open_session(key)
        out, back = bytearray(length), bytearray(length)
        session.encrypt(first, plain, memoryview(out))
        session.decrypt(first, out, memoryview(back))
        assert bytes(back) == plain
        outs.append(bytes(out))
    assert outs[0] == outs[1]
    public = OpenSSLEngine("public").open_session(V10_KEY)
    out = bytearray(len(PATTERN))
    public.encrypt(0xFF, PATTERN, memoryview(out))
    assert bytes(out) == V10_CT


def test_units_split():
    assert list(units(16)) == [(0, 0, 16)]
    assert list(units(4112)) == [(0, 0, 4112)]
    assert list(units(8192)) == [(0, 0, 4096), (1, 4096, 4096)]
    assert list(units(8193)) == [(0, 0, 4096), (1, 4096, 4097)]
    with pytest.raises(ValueError):
        list(units(15))


@pytest.mark.afalg
@pytest.mark.parametrize("length", BOUNDARY_LENGTHS)
def test_cross_engine_equality(length, tmp_path):
    """Kernel and OpenSSL give identical bytes; each decrypts the other's."""
    kernel, user = afalg_engine(), OpenSSLEngine()
    key = secrets.token_bytes(64)
    first = secrets.randbelow(1 << 40)
    plain = secrets.token_bytes(length)
    ks, us = kernel.open_session(key), user.open_session(key)
    try:
        outs = []
        for session, src in [(ks, aligned(plain)), (ks, plain), (us, plain)]:
            out = bytearray(length)
            session.encrypt(first, src, memoryview(out))
            outs.append(bytes(out))
        assert outs[0] == outs[1] == outs[2]
        for session, other in [(ks, us), (us, ks)]:
            ct = bytearray(length)
            other.encrypt(first, plain, memoryview(ct))
            back = bytearray(length)
            session.decrypt(first, aligned(bytes(ct)), memoryview(back))
            assert bytes(back) == plain
            # and straight from a file, at a page-aligned offset
            path = tmp_path / "f"
            path.write_bytes(bytes(PAGE_SIZE) + bytes(ct))
            fd = os.open(path, os.O_RDONLY)
            try:
                back = bytearray(length)
                session.decrypt_file(first, fd, PAGE_SIZE, length, memoryview(back))
            finally:
                os.close(fd)
            assert bytes(back) == plain
    finally:
        ks.close()
        us.close()


def test_decrypt_file_hole_rule(engine, tmp_path):
    """Units stored as zeros (a real hole, or written zeros) read as zeros."""
    key = secrets.token_bytes(64)
    session = engine.open_session(key)
    pages = [secrets.token_bytes(PAGE_SIZE) for _ in range(5)]
    last = secrets.token_bytes(100)
    cts = []
    for i, page in enumerate(pages + [last]):
        out = bytearray(len(page))
        session.encrypt(i, page, memoryview(out))
        cts.append(bytes(out))
    cts[1] = bytes(PAGE_SIZE)  # written zeros
    path = tmp_path / "f"
    with open(path, "wb") as f:
        for i, ct in enumerate(cts):
            if i == 3:  # a real filesystem hole
                f.seek(PAGE_SIZE, os.SEEK_CUR)
            else:
                f.write(ct)
    expected = [pages[0], bytes(PAGE_SIZE), pages[2], bytes(PAGE_SIZE), pages[4], last]
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray(5 * PAGE_SIZE + 100)
        session.decrypt_file(0, fd, 0, len(out), memoryview(out))
        assert bytes(out) == b"".join(expected)
        with pytest.raises(BackingSizeError):  # the file is shorter than asked
            longer = bytearray(len(out) + PAGE_SIZE)
            session.decrypt_file(0, fd, 0, len(longer), memoryview(longer))
    finally:
        os.close(fd)
        session.close()


@pytest.mark.parametrize("pages", [1, 3, 70])  # 70: split over threads where that applies
def test_read_plaintext_slices_tail_and_holes(engine, tmp_path, pages):
    """The one-call read path: any slice of a decrypted run (holes as zeros),
    None when the run's tail is not zero, BackingSizeError past the end."""
    session = engine.open_session(secrets.token_bytes(64))
    length = pages * PAGE_SIZE + 16  # the final page carries a 16-byte tail of zeros
    plain = bytearray(secrets.token_bytes(length - 16) + bytes(16))
    ct = bytearray(length)
    session.encrypt(5, aligned(bytes(plain)), memoryview(ct))
    if pages > 1:
        ct[:PAGE_SIZE] = bytes(PAGE_SIZE)  # a hole reads as zeros
        plain[:PAGE_SIZE] = bytes(PAGE_SIZE)
    path = tmp_path / "f"
    path.write_bytes(bytes(PAGE_SIZE) + bytes(ct))
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in [(0, length - 16), (1, 4097), (4095, length - 16), (0, length),
                           (length - 17, length - 16), (7, 7)]:
            got = session.read_plaintext(5, fd, PAGE_SIZE, length, start, end, 16)
            assert got == bytes(plain[start:end]), (start, end)
        other = session.read_plaintext(6, fd, PAGE_SIZE, length, 0, 100, 16)  # wrong tweaks
        assert other is None
        assert session.read_plaintext(6, fd, PAGE_SIZE, length, 0, 100, 0) is not None
        with pytest.raises(BackingSizeError):
            session.read_plaintext(5, fd, 2 * PAGE_SIZE, length, 0, 100, 16)
    finally:
        os.close(fd)
        session.close()


def test_sessions_are_thread_safe(engine):
    """Several threads share one session (each borrows its own channel)."""
    from concurrent.futures import ThreadPoolExecutor

    key = secrets.token_bytes(64)
    session = engine.open_session(key)
    ref = OpenSSLEngine().open_session(key)
    data = [secrets.token_bytes(3 * PAGE_SIZE + 50) for _ in range(16)]

    def work(i):
        out = bytearray(len(data[i]))
        session.encrypt(i, aligned(data[i]), memoryview(out))
        expected = bytearray(len(data[i]))
        ref.encrypt(i, data[i], memoryview(expected))
        return out == expected

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(16)))
    session.close()
    session.close()  # idempotent


def test_selection_openssl_requested():
    choice = select_engine("openssl")
    assert choice.engine.name == "openssl"
    with pytest.raises(ValueError):
        select_engine("bogus")


def kernel_has_afalg() -> bool:
    """Whether AF_ALG works here; where it is required (the kernel VM) it
    must, or the tests below would pass through their fallback branch."""
    try:
        AfalgEngine.probe()
    except EngineUnavailableError as exc:
        assert not REQUIRE_AFALG, f"AF_ALG is required here but unavailable: {exc}"
        return False
    return True


# These two run on the host (no AF_ALG: the fallback) and in the kernel VM
# (AF_ALG present: the kernel engine), hence the afalg mark.
@pytest.mark.afalg
def test_selection_auto_matches_the_kernel(caplog):
    caplog.set_level("DEBUG", logger="cryptfs")
    choice = select_engine("auto")
    if kernel_has_afalg():
        assert choice.engine.name == "afalg"
        assert "self-test" in choice.reason
    else:
        assert choice.engine.name == "openssl"
        assert "AF_ALG not usable" in choice.reason
    assert f"using the {choice.engine.name}" in caplog.text


@pytest.mark.afalg
def test_forced_afalg():
    if kernel_has_afalg():
        assert select_engine("afalg").engine.name == "afalg"
    else:
        with pytest.raises(EngineUnavailableError, match="AF_ALG"):
            select_engine("afalg")


@pytest.mark.afalg
def test_cross_check_passes_on_the_kernel():
    cross_check(afalg_engine(), OpenSSLEngine())


@pytest.mark.afalg
def test_afalg_without_vmsplice_uses_sendmsg():
    """The sendmsg fallback (seccomp forbids vmsplice) gives the same bytes."""
    afalg_engine()
    engine = AfalgEngine(zero_copy=False)
    cross_check(engine, OpenSSLEngine())


def test_scratch_view_is_unusable_after_the_next_get():
    """The aliasing rule (engines/base.py ``Scratch``): the next ``get`` on
    the same thread hands out the same memory, so the view before it must
    fail loudly rather than show the new contents."""
    scratch = Scratch()
    first = scratch.get(PAGE_SIZE)
    first[:3] = b"old"
    second = scratch.get(PAGE_SIZE)
    second[:3] = b"new"
    with pytest.raises(ValueError, match="released"):
        bytes(first[:3])
    assert bytes(second[:3]) == b"new"
    bigger = scratch.get(128 * PAGE_SIZE)  # grown: a new buffer, same rule
    with pytest.raises(ValueError, match="released"):
        second[0]
    assert len(bigger) == 128 * PAGE_SIZE


def test_scratch_buffers_are_per_thread():
    scratch = Scratch()
    mine = scratch.get(PAGE_SIZE)
    mine[:4] = b"main"
    other: list[bytes] = []

    def fill() -> None:
        view = scratch.get(PAGE_SIZE)
        view[:4] = b"them"
        other.append(bytes(view[:4]))

    thread = threading.Thread(target=fill)
    thread.start()
    thread.join()
    assert other == [b"them"] and bytes(mine[:4]) == b"main"  # not released, not shared


# -- timing the kernel engine against userspace (engines/timing.py) --


def test_timing_figures_for_every_size_and_the_far_behind_advice():
    """Two real engines timed on each size: positive figures, a summary
    naming both sizes, and advice only where the first is far behind."""
    fast, slow = OpenSSLEngine(), OpenSSLEngine("public")
    try:
        timing = time_engines(fast, slow, "openssl (cryptography)")
    finally:
        fast.close()
        slow.close()
    assert set(timing.kernel) == set(timing.userspace) == set(timing_sizes)
    assert all(v > 0 for v in (*timing.kernel.values(), *timing.userspace.values()))
    assert "4 KiB" in timing.summary() and "64 KiB" in timing.summary()
    behind = EngineTiming({4096: 100.0, 65536: 900.0}, {4096: 1000.0, 65536: 1000.0}, "x")
    assert behind.far_behind() and behind.ratios()[4096] == pytest.approx(0.1)
    assert "--engine openssl" in (behind.advice() or "")
    level = EngineTiming({4096: 600.0, 65536: 900.0}, {4096: 1000.0, 65536: 1000.0}, "x")
    assert not level.far_behind() and level.advice() is None


def test_no_timing_where_the_kernel_engine_is_unavailable():
    """The host side: ``auto`` falls back to userspace and times nothing
    (there is no kernel engine to compare); the choice is unchanged."""
    if kernel_has_afalg():
        pytest.skip("the kernel has AF_ALG here: see test_timing_on_the_kernel")
    choice = select_engine("auto", compare=True)
    assert choice.engine.name == "openssl" and choice.timing is None
    choice.engine.close()


@pytest.mark.afalg
def test_timing_on_the_kernel_leaves_the_choice_alone(caplog):
    """In the kernel VM: ``auto`` with timing still takes the kernel
    engine, whatever the figures say, and both engines have figures."""
    afalg_engine()
    choice = select_engine("auto", compare=True)
    try:
        assert choice.engine.name == "afalg"
        assert choice.timing is not None
        assert set(choice.timing.kernel) == set(timing_sizes)
        assert all(v > 0 for v in choice.timing.ratios().values())
    finally:
        choice.engine.close()
