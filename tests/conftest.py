"""Shared fixtures.  Tests are layered by file name: t1 (primitives), t2
(content, names), t3+ (filesystem).  ``engine`` runs a test on every crypto
engine; the AF_ALG side runs wherever the kernel has AF_ALG (the kernel VM in
scripts/test), and with CRYPTFS_REQUIRE_AFALG=1 a missing AF_ALG is a failure,
never a skip."""

from __future__ import annotations

import os
import secrets

import pytest

from cryptfs.content.codec import ContentCodec
from cryptfs.content.sessions import SessionCache
from cryptfs.engines.afalg import AfalgEngine
from cryptfs.engines.base import XtsEngine
from cryptfs.engines.userspace import OpenSSLEngine
from cryptfs.errors import EngineUnavailableError
from cryptfs.keys import KeyRing

REQUIRE_AFALG = os.environ.get("CRYPTFS_REQUIRE_AFALG") == "1"


def afalg_engine() -> AfalgEngine:
    """The kernel engine, or skip (fail when AF_ALG is required)."""
    try:
        return AfalgEngine.probe()
    except EngineUnavailableError as exc:
        if REQUIRE_AFALG:
            pytest.fail(f"AF_ALG is required here but unavailable: {exc}")
        pytest.skip(f"no AF_ALG on this kernel ({exc}); scripts/test runs this in the kernel VM")


@pytest.fixture(params=["openssl", pytest.param("afalg", marks=pytest.mark.afalg)])
def engine(request) -> XtsEngine:
    return OpenSSLEngine() if request.param == "openssl" else afalg_engine()


@pytest.fixture
def keys() -> KeyRing:
    return KeyRing(secrets.token_bytes(32))


@pytest.fixture
def codec(engine: XtsEngine, keys: KeyRing):
    sessions = SessionCache(engine, keys)
    yield ContentCodec(keys, sessions)
    sessions.close()
