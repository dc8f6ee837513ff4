"""Requests and syscalls cryptfs saves, and that nothing is lost by it, on
real mounts with real programs: FLUSH answered ENOSYS (the kernel stops
sending it; what close(2) guarantees), the ``--no-xattr`` mount option,
new files that get their header only when first written, and the mount's
1 MiB read-ahead (fewer, larger read requests)."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Mount, cryptfs_cmd, init_cipherdir, require_fuse, require_kernel
from tests.helpers.checks import raises_errno

P = 4096


def read_o_direct(path: Path, size: int) -> bytes:
    """The file's first ``size`` bytes read with O_DIRECT (page-aligned buffer)."""
    buf = mmap.mmap(-1, (size + P - 1) // P * P or P)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    return bytes(buf[:got])


def child_cat(path: Path) -> bytes:
    return subprocess.run(["cat", str(path)], check=True, capture_output=True).stdout


# -- flush: data written before close is where every reader looks --------------------


def test_close_then_read_in_another_process(mnt):
    for size in (1, P - 1, P + 17, 300_000):
        data = os.urandom(size)
        path = mnt / f"f{size}"
        with open(path, "wb") as f:  # small writes the writeback cache keeps dirty
            for at in range(0, size, 1000):
                f.write(data[at:at + 1000])
        assert child_cat(path) == data
        assert read_o_direct(path, size) == data


def test_close_of_a_shared_descriptor_in_a_child(mnt):
    """A child writes through a descriptor it shares with us and exits; the
    data is visible to a third process while we still hold our copy."""
    path = mnt / "shared"
    data = os.urandom(50_000)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        code = f"import os, sys; os.write({fd}, sys.stdin.buffer.read()); os.close({fd})"
        subprocess.run([sys.executable, "-c", code], input=data, check=True, pass_fds=(fd,))
        assert child_cat(path) == data
        assert read_o_direct(path, len(data)) == data
    finally:
        os.close(fd)
    assert child_cat(path) == data


def test_close_then_remount(fresh_mount):
    data = os.urandom(123_457)
    (fresh_mount.mountpoint / "f").write_bytes(data)  # closed, never fsync'ed
    fresh_mount.restart()
    assert (fresh_mount.mountpoint / "f").read_bytes() == data


# -- new files: the header comes with the first write -----------------------------------


def backing_sizes(cipherdir: Path) -> list[int]:
    return sorted(p.stat().st_size for p in cipherdir.rglob("*")
                  if p.is_file() and not p.name.startswith("cryptfs."))


def test_new_files_get_their_header_when_first_written(fresh_mount):
    plain = fresh_mount.mountpoint
    (plain / "empty").touch()
    (plain / "grown").touch()
    (plain / "written").touch()
    assert backing_sizes(fresh_mount.cipherdir) == [0, 0, 0]  # docs/format.md 4.2: no header
    assert (plain / "empty").read_bytes() == b""
    os.truncate(plain / "grown", 10_000)
    with open(plain / "written", "ab") as f:
        f.write(b"abc")
    fresh_mount.restart()
    assert (plain / "empty").read_bytes() == b""
    assert (plain / "grown").read_bytes() == bytes(10_000)
    assert (plain / "written").read_bytes() == b"abc"
    assert backing_sizes(fresh_mount.cipherdir) == [0, 4096 + 3 + 16, 4096 + 10_000 + 16]
    fresh_mount.stop()
    check = subprocess.run(cryptfs_cmd("fsck", str(fresh_mount.cipherdir), "--passfile",
                                       str(fresh_mount.passfile)), capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# -- --no-xattr ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_xattr_mount(tmp_path_factory):
    """The engine plays no part in xattr handling: the userspace one only."""
    require_fuse()
    base = tmp_path_factory.mktemp("noxattr")
    passfile = base / "password"
    init_cipherdir(base / "cipher", passfile)
    mount = Mount(base / "cipher", base / "plain", passfile, "openssl",
                  extra=("--no-xattr",)).start()
    try:
        yield mount
    finally:
        mount.stop()
    mount.check_log()


def test_no_xattr_refuses_every_xattr_and_files_work(no_xattr_mount):
    top = no_xattr_mount.mountpoint
    path = top / "file"
    data = os.urandom(10_000)
    path.write_bytes(data)
    for target in (path, top):
        for _ in range(2):  # the first answer (ENOSYS) and the kernel's own after it
            raises_errno(errno.EOPNOTSUPP, os.setxattr, target, "user.tag", b"v")
            raises_errno(errno.EOPNOTSUPP, os.getxattr, target, "user.tag")
            raises_errno(errno.EOPNOTSUPP, os.listxattr, target)
            raises_errno(errno.EOPNOTSUPP, os.removexattr, target, "user.tag")
    with open(path, "r+b") as f:
        f.seek(5000)
        f.write(b"patched")
    expected = data[:5000] + b"patched" + data[5007:]
    assert path.read_bytes() == expected
    assert child_cat(path) == expected


def test_no_xattr_cp_a_and_rsync_a_still_copy(no_xattr_mount, tmp_path):
    """cp -a keeps going without the xattrs (only --preserve=xattr insists);
    rsync -a does not copy xattrs at all, and rsync -aX says it cannot."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"tagged")
    os.setxattr(src / "a", "user.tag", b"value")
    (src / "b").write_bytes(os.urandom(9000))
    os.chmod(src / "b", 0o640)
    dest = no_xattr_mount.mountpoint / "copies"
    dest.mkdir()
    subprocess.run(["cp", "-a", str(src), str(dest / "cp")], check=True, capture_output=True)
    strict = subprocess.run(["cp", "-a", "--preserve=xattr", str(src), str(dest / "strict")],
                            capture_output=True, text=True)
    subprocess.run(["rsync", "-a", f"{src}/", f"{dest / 'rsync'}/"], check=True,
                   capture_output=True)
    rsync_x = subprocess.run(["rsync", "-aX", f"{src}/", f"{dest / 'rsync-x'}/"],
                             capture_output=True, text=True)
    for copy in ("cp", "rsync"):
        assert (dest / copy / "a").read_bytes() == b"tagged"
        assert (dest / copy / "b").read_bytes() == (src / "b").read_bytes()
        assert os.stat(dest / copy / "b").st_mode & 0o777 == 0o640
    assert strict.returncode != 0 and "Operation not supported" in strict.stderr
    assert rsync_x.returncode != 0 and "Operation not supported" in rsync_x.stderr
    # and back out of the mount
    subprocess.run(["cp", "-a", str(dest / "cp"), str(tmp_path / "back")], check=True,
                   capture_output=True)
    assert (tmp_path / "back" / "a").read_bytes() == b"tagged"


# -- read-ahead --------------------------------------------------------------------------


def bdi_readahead(mountpoint: Path) -> int:
    """The kernel's read-ahead (KiB) on a mount, from its bdi in sysfs."""
    dev = os.stat(mountpoint).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text())


@pytest.mark.parametrize(("extra", "expected"), [((), 1024), (("--readahead", "0"), 128),
                                                 (("--readahead", "512"), 512)])
def test_readahead_is_set_on_the_mount(tmp_path, extra, expected):
    """As root the mount's bdi reads ahead 1 MiB (or as asked; 0 leaves the
    kernel's 128 KiB); a file read cold, in 1 MiB requests, is intact."""
    require_fuse()
    if os.geteuid() != 0:
        pytest.skip("only root may set a bdi's read-ahead")
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile)
    mount = Mount(tmp_path / "cipher", tmp_path / "plain", passfile, "openssl",
                  extra=extra).start()
    try:
        deadline = time.monotonic() + 10  # the daemon sets it once serving
        while bdi_readahead(mount.mountpoint) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bdi_readahead(mount.mountpoint) == expected
        data = os.urandom(5 * (1 << 20) + 1234)
        path = mount.mountpoint / "big"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read it from the daemon
            assert b"".join(iter(lambda: os.read(fd, 1 << 20), b"")) == data
        finally:
            os.close(fd)
    finally:
        mount.stop()
    mount.check_log()


# -- long kernel caches without --shared ---------------------------------------------


@pytest.mark.parametrize(("extra", "cached"), [((), True), (("--cache-timeout", "0"), False)])
def test_attributes_are_cached_past_a_second(tmp_path, extra, cached):
    """Every change comes through an exclusive mount, so the kernel keeps
    names and attributes for a minute: a change made behind the mount's back
    (here a chmod of the backing file) shows only when that runs out;
    ``--cache-timeout 0`` shows it at once (as ``--shared`` does)."""
    require_fuse()
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile)
    mount = Mount(tmp_path / "cipher", tmp_path / "plain", passfile, "openssl",
                  extra=extra).start()
    try:
        path = mount.mountpoint / "f"
        path.write_bytes(b"x")
        os.chmod(path, 0o600)
        assert os.stat(path).st_mode & 0o777 == 0o600
        (backing,) = [p for p in mount.cipherdir.iterdir() if not p.name.startswith("cryptfs.")]
        os.chmod(backing, 0o644)
        time.sleep(1.5)  # past the kernel's caching before (1 s)
        assert os.stat(path).st_mode & 0o777 == (0o600 if cached else 0o644)
    finally:
        mount.stop()
    mount.check_log()


# -- no splice receive: the daemon drops CAP_SYS_RESOURCE ----------------------------

CAP_SYS_ADMIN, CAP_SYS_RESOURCE = 21, 24


def capabilities(status: Path) -> dict[str, int]:
    """CapEff, CapPrm, ... of a /proc status file."""
    return {key: int(value, 16) for key, value in
            (line.split(":\t") for line in status.read_text().splitlines())
            if key.startswith("Cap")}


@pytest.mark.kernel
def test_daemon_drops_cap_sys_resource(tmp_path):
    """With CAP_SYS_RESOURCE libfuse receives each request by splice(2) and
    a read(2) of its pipe: every thread of the daemon runs without it (and
    keeps the rest, CAP_SYS_ADMIN here).  Only a process that has it sees a
    difference: root in the kernel VM."""
    mine = capabilities(Path("/proc/self/status"))["CapEff"]
    require_kernel(None if mine & 1 << CAP_SYS_RESOURCE and mine & 1 << CAP_SYS_ADMIN
                   else "this process lacks CAP_SYS_RESOURCE or CAP_SYS_ADMIN")
    require_fuse()
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile)
    mount = Mount(tmp_path / "cipher", tmp_path / "plain", passfile, "openssl").start()
    try:
        (mount.mountpoint / "f").write_bytes(b"x" * 300_000)  # the worker threads run
        assert (mount.mountpoint / "f").read_bytes() == b"x" * 300_000
        tasks = list(Path(f"/proc/{mount.proc.pid}/task").iterdir())
        assert tasks
        for task in tasks:
            caps = capabilities(task / "status")
            for key in ("CapEff", "CapPrm"):
                assert not caps[key] & 1 << CAP_SYS_RESOURCE, (task.name, key, hex(caps[key]))
                assert caps[key] & 1 << CAP_SYS_ADMIN, (task.name, key, hex(caps[key]))
    finally:
        mount.stop()

