"""The session LRU: bounded, shared, and never closes a session in use."""

from __future__ import annotations

import os
import secrets

from cryptfs.content.sessions import SessionCache


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thousands_of_files_stay_bounded(engine, keys):
    cache = SessionCache(engine, keys, capacity=16)
    before = open_fds()
    try:
        for _ in range(2000):
            with cache.session(secrets.token_bytes(16)) as session:
                out = bytearray(4096)
                session.encrypt(0, bytes(4096), memoryview(out))
            assert len(cache) <= 16
        # 16 sessions, each a tfm socket plus at most a couple of channels
        assert open_fds() - before <= 16 * 7
    finally:
        cache.close()
    assert open_fds() <= before + 1


def test_shared_and_evicted_only_when_idle(engine, keys):
    cache = SessionCache(engine, keys, capacity=1)
    a, b = secrets.token_bytes(16), secrets.token_bytes(16)
    try:
        with cache.session(a) as first, cache.session(a) as again:
            assert first is again
            with cache.session(b):  # evicts a from the LRU while a is in use
                pass
            out = bytearray(4096)
            first.encrypt(0, bytes(4096), memoryview(out))  # still usable
        with cache.session(a) as fresh:
            assert fresh is not first
    finally:
        cache.close()
