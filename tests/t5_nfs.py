"""cryptfs on a real NFS export seen by two independent clients (in the kernel
VM: tests/helpers/nfs.py).  These check that the harness is sound (what one
client writes the other reads; the mount lock reaches the server), that an
ordinary mount through one client leaves a directory the other client checks
clean and reads back, and that ``--shared`` mounts through both clients at
once see each other's changes."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
from pathlib import Path

import pytest

from cryptfs.daemon.lock import LOCK_NAME
from cryptfs.errors import ExitCode
from tests.conftest import (
    MOUNT_ENGINES,
    MOUNT_TIMEOUT,
    Mount,
    cryptfs_cmd,
    fsck_problems,
    init_cipherdir,
)
from tests.helpers.mount_writers import lost_halves, write_halves
from tests.helpers.nfs import nfs_two_clients

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

ENGINE = MOUNT_ENGINES[0]
FILES = {  # plaintext path: content (a partial page, several pages, empty)
    "small.txt": b"written through client 1\n",
    "dir/pages.bin": bytes(range(256)) * 50,
    "dir/sub/empty": b"",
}


@pytest.fixture(scope="module")
def nfs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One NFS server and two client mounts for the module (export, client1, client2)."""
    with nfs_two_clients(tmp_path_factory.mktemp("nfs")) as dirs:
        yield dirs


def test_a_file_closed_on_one_client_is_read_on_the_other(nfs, request):
    export, client1, client2 = nfs
    name = request.node.name
    data = os.urandom(10000)
    (client1 / name).write_bytes(data)  # close-to-open: the close flushes to the server
    assert (export / name).read_bytes() == data
    assert (client2 / name).read_bytes() == data
    # Client 1 has the old bytes cached: its next open must revalidate them.
    rewritten = os.urandom(len(data))
    (client2 / name).write_bytes(rewritten)
    assert (client1 / name).read_bytes() == rewritten
    (client2 / name).rename(client2 / f"{name}.moved")
    assert sorted(p.name for p in client1.iterdir() if p.name.startswith(name)) == \
        [f"{name}.moved"]
    (client1 / f"{name}.moved").unlink()
    assert not any(p.name.startswith(name) for p in client2.iterdir())


def _refused_via(cipherdir: Path, mountpoint: Path, passfile: Path) -> None:
    """The lock held through the other client refuses a mount through this
    one: the flock (an NFSv4 lock on the server), then ``cryptfs mount``."""
    fd = os.open(cipherdir / LOCK_NAME, os.O_RDWR)
    try:
        with pytest.raises(OSError) as refused:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert refused.value.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    finally:
        os.close(fd)
    mountpoint.mkdir()
    proc = subprocess.run(
        cryptfs_cmd("mount", str(cipherdir), str(mountpoint), "--passfile", str(passfile),
                    "--foreground", "--engine", ENGINE),
        capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    assert proc.returncode == ExitCode.MOUNTED, proc.stderr
    assert "already mounted" in proc.stderr
    assert not os.path.ismount(mountpoint)


def test_a_mount_via_one_client_locks_out_the_other_and_reads_back_there(nfs, tmp_path):
    """One story, as every cryptfs process start costs much under the VM's
    emulation: init and mount through client 1, write; a mount through client
    2 is refused meanwhile; after the unmount, fsck through client 2 is clean
    and a mount through client 2 (the lock released) reads the same bytes."""
    _, client1, client2 = nfs
    passfile = tmp_path / "password"
    init_cipherdir(client1 / "cipher", passfile)
    first = Mount(client1 / "cipher", tmp_path / "plain1", passfile, ENGINE).start()
    try:
        for path, content in FILES.items():
            (first.mountpoint / path).parent.mkdir(parents=True, exist_ok=True)
            (first.mountpoint / path).write_bytes(content)
        (first.mountpoint / "small.txt").rename(first.mountpoint / "dir" / "renamed.txt")
        _refused_via(client2 / "cipher", tmp_path / "plain2", passfile)
    finally:
        first.stop()
    first.check_log()
    expected = {("dir/renamed.txt" if p == "small.txt" else p): c for p, c in FILES.items()}

    second = Mount(client2 / "cipher", tmp_path / "plain2", passfile, ENGINE)
    assert fsck_problems(second) == []
    second.start()
    try:
        seen = {str(p.relative_to(second.mountpoint)): p.read_bytes()
                for p in second.mountpoint.rglob("*") if p.is_file()}
    finally:
        second.stop()
    second.check_log()
    assert seen == expected


def _shared_story(a: Path, b: Path) -> None:
    """What one shared mount does, the other sees at its next access."""
    (a / "f").write_bytes(b"written through client 1")  # closed: on the server
    assert (b / "f").read_bytes() == b"written through client 1"
    (b / "f").write_bytes(b"rewritten via client two")  # same size: A's cache must go
    assert (a / "f").read_bytes() == b"rewritten via client two"
    (a / "d").mkdir()
    (b / "f").rename(b / "d" / "g")
    assert os.listdir(a) == ["d"] and (a / "d" / "g").read_bytes() == b"rewritten via client two"
    (a / "d" / "g").unlink()
    assert os.listdir(b / "d") == []
    # A directory A has a descriptor of, removed and re-created through B:
    # A's cached descriptors go stale (ESTALE), the path is looked up again.
    (a / "e").mkdir()
    (a / "e" / "old").write_text("old")
    held = os.open(a / "e", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(held) == ["old"]
        (b / "e" / "old").unlink()
        (b / "e").rmdir()
        (b / "e").mkdir()
        (b / "e" / "new").write_text("new")
        try:  # the removed directory: an error or nothing, never a crash
            listed = os.listdir(held)
        except OSError as exc:
            assert exc.errno in (errno.ENOENT, errno.ESTALE)
        else:
            assert listed == []  # as a removed directory lists on a local filesystem
    finally:
        os.close(held)
    assert os.listdir(a / "e") == ["new"] and (a / "e" / "new").read_text() == "new"
    (a / "e" / "more").write_text("more")
    assert sorted(os.listdir(b / "e")) == ["more", "new"]


def test_shared_mounts_through_both_clients_see_each_other(nfs, tmp_path):
    """One story (every cryptfs process start costs much under emulation): a
    ``--shared`` mount through each client; changes seen across; with only
    client 2's shared mount left, an exclusive mount through client 1 is
    refused (the shared lock is on the server); fsck clean after."""
    _, client1, client2 = nfs
    passfile = tmp_path / "password"
    init_cipherdir(client1 / "shared", passfile)
    a = Mount(client1 / "shared", tmp_path / "a", passfile, ENGINE, ("--shared",)).start()
    try:
        b = Mount(client2 / "shared", tmp_path / "b", passfile, ENGINE, ("--shared",)).start()
        try:
            _shared_story(a.mountpoint, b.mountpoint)
            # Two writers on one file, one per client, each on its own half
            # of every page: the byte-range locks reach the server.
            one, two = a.mountpoint / "halves.bin", b.mountpoint / "halves.bin"
            size = write_halves(one, two, pages=16, rounds=2)
            assert lost_halves(one, 16, size, 2) == []
            assert lost_halves(two, 16, size, 2) == []
            a.stop()
            (tmp_path / "c").mkdir()
            proc = subprocess.run(
                cryptfs_cmd("mount", str(client1 / "shared"), str(tmp_path / "c"),
                            "--passfile", str(passfile), "--foreground", "--engine", ENGINE),
                capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
            assert proc.returncode == ExitCode.MOUNTED, proc.stderr
            assert "already mounted with --shared" in proc.stderr
            assert not os.path.ismount(tmp_path / "c")
        finally:
            b.stop()
    finally:
        a.stop()
    for mount in (a, b):
        mount.check_log()
    assert fsck_problems(a) == []
