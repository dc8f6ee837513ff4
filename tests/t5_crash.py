"""The daemon killed with SIGKILL in the middle of heavy writes: everything
that was fsync'd before the kill reads back exactly after a remount."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import MOUNT_ENGINES, Mount, init_cipherdir, mount_engine_param, require_fuse

WRITER = r"""
import hashlib, os, sys
plain, journal = sys.argv[1], sys.argv[2]
def content(i):
    return hashlib.sha256(str(i).encode()).digest() * (100 + 397 * (i % 23))
i = 0
with open(journal, "a") as log:
    try:
        while True:
            path = os.path.join(plain, f"d{i % 7}", f"f{i}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content(i))
                f.flush()
                os.fsync(f.fileno())
            # an un-synced rewrite of an older file, in flight at the kill
            if i > 3:
                with open(os.path.join(plain, f"scratch{i % 3}"), "wb") as f:
                    f.write(os.urandom(300000))
            log.write(f"{i}\n")
            log.flush()
            os.fsync(log.fileno())
            i += 1
    except OSError:
        pass  # the daemon is gone
"""


@pytest.fixture(params=MOUNT_ENGINES)
def engine(request):
    require_fuse()
    return mount_engine_param(request)


def test_sigkill_keeps_everything_fsynced(engine, tmp_path):
    passfile = tmp_path / "pw"
    init_cipherdir(tmp_path / "cipher", passfile)
    mount = Mount(tmp_path / "cipher", tmp_path / "plain", passfile, engine).start()
    journal = tmp_path / "journal"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mount.mountpoint),
                               str(journal)])
    deadline = time.monotonic() + 120
    while (not journal.exists() or len(journal.read_text().split()) < 20) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    mount.proc.send_signal(signal.SIGKILL)
    mount.proc.wait()
    mount.proc = None
    writer.wait(60)
    subprocess.run(["fusermount3", "-u", "-z", str(mount.mountpoint)], check=True)
    done = [int(n) for n in journal.read_text().split()]
    assert len(done) >= 20

    mount.start()
    try:
        for i in done:
            path = mount.mountpoint / f"d{i % 7}" / f"f{i}"
            expected = hashlib.sha256(str(i).encode()).digest() * (100 + 397 * (i % 23))
            assert path.read_bytes() == expected, f"fsync'd file f{i} changed"
        (mount.mountpoint / "after").write_text("the mount works")
        assert (mount.mountpoint / "after").read_text() == "the mount works"
    finally:
        mount.stop()
    # fsck may only complain about files that were in flight at the kill
    proc = subprocess.run([sys.executable, "-m", "cryptfs.cli", "fsck", str(mount.cipherdir),
                           "--passfile", str(passfile), "--json"], capture_output=True, text=True)
    problems = json.loads(proc.stdout)["problems"]
    synced = {f"/d{i % 7}/f{i}" for i in done}
    assert not [p for p in problems if p["plaintext"] in synced], problems
