"""Byte-range locks over a real NFS export (in the kernel VM: tests/helpers/nfs.py):
two mounters, each through its own NFS client, write their own halves of
every page of one file; the OFD locks reach the server (one client sees the
other's), and both halves of every page survive, as read on the server."""

from __future__ import annotations

import fcntl
import os
import secrets

import pytest

from cryptfs.keys.hierarchy import KeyRing
from cryptfs.lowlevel import rangelock
from tests.helpers import two_writers
from tests.helpers.nfs import nfs_two_clients

pytestmark = pytest.mark.kernel


def test_two_writers_through_two_nfs_clients_keep_both_halves(tmp_path):
    with nfs_two_clients(tmp_path) as (export, client1, client2):
        (export / "probe").write_bytes(bytes(100))
        fd1 = os.open(client1 / "probe", os.O_RDWR)
        fd2 = os.open(client2 / "probe", os.O_RDWR)
        try:
            with rangelock.exclusive(fd1, [(10, 20)]):
                assert rangelock.holder(fd2, 0, 15) == fcntl.F_WRLCK
                assert rangelock.holder(fd2, 20, None) == fcntl.F_UNLCK
            assert rangelock.holder(fd2, 0, None) == fcntl.F_UNLCK
        finally:
            os.close(fd1)
            os.close(fd2)
        keys = KeyRing(secrets.token_bytes(32))
        for authenticated in (False, True):
            problems = two_writers.run(export / "shared", keys, authenticated, True, rounds=3,
                                       pages=(1, 6), seed=int(authenticated),
                                       via=(client1 / "shared", client2 / "shared"))
            assert problems == [], f"authenticated={authenticated}: {problems[:5]}"
