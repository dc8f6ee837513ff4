"""POSIX behaviour of a real mount, operation by operation, errors included."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading

import pytest

from tests.helpers.checks import raises_errno

P = 4096


def test_create_read_write_every_edge(mnt):
    for size in (0, 1, 15, 16, 17, P - 1, P, P + 1, 2 * P + 16, 300_000):
        data = os.urandom(size)
        (mnt / f"f{size}").write_bytes(data)
        assert (mnt / f"f{size}").read_bytes() == data
        assert os.stat(mnt / f"f{size}").st_size == size


def test_write_at_offsets_and_past_eof(mnt):
    path = mnt / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"abc", 10)
        os.pwrite(fd, b"XY", P - 1)
        os.pwrite(fd, b"end", 3 * P + 5)
        expected = bytearray(3 * P + 8)
        expected[10:13] = b"abc"
        expected[P - 1:P + 1] = b"XY"
        expected[3 * P + 5:] = b"end"
        assert os.pread(fd, 10 * P, 0) == bytes(expected)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(expected)


def test_write_only_open_keeps_partial_pages(mnt):
    path = mnt / "f"
    path.write_bytes(b"a" * 10000)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"B", 5000)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"a" * 5000 + b"B" + b"a" * 4999


def test_open_flags(mnt):
    path = mnt / "f"
    path.write_bytes(b"hello world")
    with open(path, "ab") as f:
        f.write(b"!")
    assert path.read_bytes() == b"hello world!"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert path.read_bytes() == b""
    raises_errno(errno.EEXIST, os.open, path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    raises_errno(errno.ENOENT, os.open, mnt / "missing", os.O_RDONLY)
    raises_errno(errno.EISDIR, os.open, mnt, os.O_WRONLY)
    raises_errno(errno.ENOTDIR, os.open, path / "x", os.O_RDONLY)


def test_truncate_up_down_across_pages(mnt):
    path = mnt / "f"
    data = os.urandom(3 * P + 100)
    path.write_bytes(data)
    for size in (3 * P + 200, 5 * P, 2 * P + 1, P, P - 1, 17, 0, 7 * P + 3):
        os.truncate(path, size)
        data = data[:size] + bytes(max(0, size - len(data)))
        assert os.stat(path).st_size == size
        assert path.read_bytes() == data
    with open(path, "r+b") as f:
        f.truncate(100)
    assert path.read_bytes() == data[:100]


def test_chmod_chown_utimens(mnt):
    path = mnt / "f"
    path.write_bytes(b"x")
    os.chmod(path, 0o640)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    os.utime(path, ns=(1_000_000_000, 2_000_000_123))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_123)
    if os.geteuid() == 0:
        os.chown(path, 1234, 5678)
        assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1234, 5678)


def test_mkdir_rmdir_readdir(mnt):
    (mnt / "d").mkdir()
    raises_errno(errno.EEXIST, os.mkdir, mnt / "d")
    names = {f"file{i}" for i in range(50)}
    for name in names:
        (mnt / "d" / name).write_bytes(name.encode())
    (mnt / "d" / "sub").mkdir()
    assert set(os.listdir(mnt / "d")) == names | {"sub"}
    with os.scandir(mnt / "d") as entries:
        sizes = {e.name: e.stat().st_size for e in entries if e.is_file()}
    assert sizes == {name: len(name) for name in names}
    raises_errno(errno.ENOTEMPTY, os.rmdir, mnt / "d")
    raises_errno(errno.ENOTDIR, os.rmdir, mnt / "d" / "file1")
    raises_errno(errno.ENOENT, os.rmdir, mnt / "nope")
    for name in names:
        os.unlink(mnt / "d" / name)
    os.rmdir(mnt / "d" / "sub")
    os.rmdir(mnt / "d")
    assert not (mnt / "d").exists()


def test_unlink(mnt):
    (mnt / "f").write_bytes(b"x")
    os.unlink(mnt / "f")
    raises_errno(errno.ENOENT, os.unlink, mnt / "f")
    (mnt / "d").mkdir()
    raises_errno(errno.EISDIR, os.unlink, mnt / "d")


def test_unlinked_open_file_keeps_working(mnt):
    path = mnt / "f"
    path.write_bytes(b"data")
    with open(path, "r+b") as f:
        os.unlink(path)
        f.seek(0, 2)
        f.write(b" more")
        f.flush()
        f.seek(0)
        assert f.read() == b"data more"
        assert os.fstat(f.fileno()).st_size == 9


def test_attributes_after_unlink(mnt):
    """The SETATTR of the times the kernel sends after each unlink (writeback
    cache) leaves right attributes: an unlinked file open read-only, the
    other name of a hard-linked file, a file written after another one's
    unlink (its mapping carries no error)."""
    (mnt / "r").write_bytes(b"read only")
    os.chmod(mnt / "r", 0o640)
    fd = os.open(mnt / "r", os.O_RDONLY)
    try:
        os.unlink(mnt / "r")
        st = os.fstat(fd)
        assert (st.st_size, st.st_nlink, stat.S_IMODE(st.st_mode)) == (9, 0, 0o640)
        assert os.pread(fd, 100, 0) == b"read only"
    finally:
        os.close(fd)
    (mnt / "a").write_bytes(b"linked")
    os.link(mnt / "a", mnt / "b")
    os.unlink(mnt / "a")
    st = os.stat(mnt / "b")
    assert (st.st_size, st.st_nlink) == (6, 1)
    with open(mnt / "c", "wb") as f:
        f.write(b"c")
        os.unlink(mnt / "b")
        f.write(b"d")
        f.flush()
        os.fsync(f.fileno())
    assert (mnt / "c").read_bytes() == b"cd"


def test_unlinking_the_only_known_name_of_a_hard_link(fresh_mount):
    """After a remount the mount knows a hard-linked file by the name looked
    up only; unlinking it leaves the kernel's inode cached (one link left)
    and sends the SETATTR of the times for it: that must not fail, or the
    kernel keeps the error on the inode and a close of the other name,
    looked up later, fails with EIO."""
    plain = fresh_mount.mountpoint
    (plain / "a").write_bytes(b"linked")
    os.link(plain / "a", plain / "b")
    fresh_mount.restart()
    assert os.stat(plain / "a").st_nlink == 2
    os.unlink(plain / "a")
    with open(plain / "b", "ab") as f:
        f.write(b" and more")
    assert (plain / "b").read_bytes() == b"linked and more"
    assert os.stat(plain / "b").st_nlink == 1


def test_security_xattrs_refused(mnt):
    """security.* (the kernel's security.capability before each write(2))
    and trusted.* are not stored: EOPNOTSUPP, and writes go on."""
    path = mnt / "f"
    path.write_bytes(b"x")
    for name in ("security.capability", "security.selinux", "trusted.x"):
        raises_errno(errno.EOPNOTSUPP, os.getxattr, path, name)
    with open(path, "ab") as f:
        f.write(b"y")
    assert path.read_bytes() == b"xy"


def test_rename_everything(mnt):
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    (mnt / "d1").mkdir()
    (mnt / "d2").mkdir()
    os.rename(mnt / "a", mnt / "d1" / "a2")  # across directories
    assert (mnt / "d1" / "a2").read_bytes() == b"A"
    os.rename(mnt / "b", mnt / "d1" / "a2")  # over an existing file
    assert (mnt / "d1" / "a2").read_bytes() == b"B"
    assert not (mnt / "b").exists()
    (mnt / "d1" / "inner").mkdir()
    (mnt / "d1" / "inner" / "deep").write_bytes(b"deep")
    os.rename(mnt / "d1", mnt / "d2")  # over an empty directory
    assert (mnt / "d2" / "inner" / "deep").read_bytes() == b"deep"
    (mnt / "d3").mkdir()
    (mnt / "d3" / "x").write_bytes(b"x")
    raises_errno(errno.ENOTEMPTY, os.rename, mnt / "d2", mnt / "d3")
    raises_errno(errno.EISDIR, os.rename, mnt / "d3" / "x", mnt / "d2")
    raises_errno(errno.ENOTDIR, os.rename, mnt / "d2", mnt / "d3" / "x")
    raises_errno(errno.ENOENT, os.rename, mnt / "missing", mnt / "y")
    # renaming a directory keeps its children reachable (names are per-directory)
    os.rename(mnt / "d2" / "inner", mnt / "d3" / "moved")
    assert (mnt / "d3" / "moved" / "deep").read_bytes() == b"deep"


def _renameat2(old, new, flags):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_rename_noreplace_and_exchange(mnt):
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    raises_errno(errno.EEXIST, _renameat2, mnt / "a", mnt / "b", 1)
    _renameat2(mnt / "a", mnt / "c", 1)
    assert (mnt / "c").read_bytes() == b"A"
    (mnt / "dir").mkdir()
    _renameat2(mnt / "c", mnt / "dir", 2)
    assert (mnt / "c").is_dir() and (mnt / "dir").read_bytes() == b"A"


def test_hard_links_share_inode_and_data(mnt):
    (mnt / "a").write_bytes(b"one")
    os.link(mnt / "a", mnt / "b")
    sa, sb = os.stat(mnt / "a"), os.stat(mnt / "b")
    assert sa.st_ino == sb.st_ino and sa.st_nlink == sb.st_nlink == 2
    with open(mnt / "b", "ab") as f:
        f.write(b" two")
    assert (mnt / "a").read_bytes() == b"one two"
    os.unlink(mnt / "a")
    assert os.stat(mnt / "b").st_nlink == 1
    (mnt / "d").mkdir()
    os.link(mnt / "b", mnt / "d" / "c")  # across directories
    assert (mnt / "d" / "c").read_bytes() == b"one two"
    raises_errno(errno.EEXIST, os.link, mnt / "b", mnt / "d" / "c")


def test_symlinks(mnt):
    os.symlink("target/file", mnt / "s")
    assert os.readlink(mnt / "s") == "target/file"
    assert os.lstat(mnt / "s").st_size == len("target/file")
    (mnt / "real").write_bytes(b"real")
    os.symlink("real", mnt / "s2")
    assert (mnt / "s2").read_bytes() == b"real"
    long_target = "x/" * 1000
    os.symlink(long_target, mnt / "s3")
    assert os.readlink(mnt / "s3") == long_target
    raises_errno(errno.EEXIST, os.symlink, "t", mnt / "s")


def test_fifo_and_socket(mnt):
    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO(os.stat(mnt / "fifo").st_mode)
    result = []

    def reader():
        with open(mnt / "fifo", "rb") as f:
            result.append(f.read())

    thread = threading.Thread(target=reader)
    thread.start()
    with open(mnt / "fifo", "wb") as f:
        f.write(b"through the pipe")
    thread.join(30)
    assert result == [b"through the pipe"]
    server = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(mnt)  # sun_path holds only 108 bytes: bind a relative name
    try:
        server.bind("sock")
        assert stat.S_ISSOCK(os.stat(mnt / "sock").st_mode)
    finally:
        os.chdir(cwd)
        server.close()


def test_long_names(mnt):
    for length in (100, 159, 160, 200, 255):
        name = "n" * (length - 3) + f"{length:03d}"
        (mnt / name).write_bytes(name.encode())
        assert (mnt / name).read_bytes() == name.encode()
    (mnt / ("d" * 255)).mkdir()
    (mnt / ("d" * 255) / ("e" * 255)).write_bytes(b"nested")
    os.rename(mnt / ("n" * 252 + "255"), mnt / ("m" * 255))
    os.symlink("t", mnt / ("s" * 200))
    os.link(mnt / ("m" * 255), mnt / ("h" * 255))
    names = set(os.listdir(mnt))
    assert "m" * 255 in names and "n" * 252 + "255" not in names and "h" * 255 in names
    os.unlink(mnt / ("m" * 255))
    raises_errno(errno.ENAMETOOLONG, open, mnt / ("x" * 256), "wb")
    raises_errno(errno.ENAMETOOLONG, os.mkdir, mnt / ("x" * 256))


def long_name(first: str, length: int) -> str:
    return first + "x" * (length - 1)


@pytest.mark.parametrize("length", [100, 255])
def test_every_operation_at_a_deep_path(mnt, length):
    """A chain of directories reaching a plaintext path of about 3,900 bytes
    (under PATH_MAX; encrypted names are longer, so the backing path is
    not): every operation works there, as on any filesystem."""
    deep = str(mnt)
    while len(deep) + 2 * (length + 1) <= 3900:
        deep += "/" + long_name("d", length)
    os.makedirs(deep)
    other = os.path.join(os.path.dirname(deep), long_name("e", length))
    os.mkdir(other)
    f = os.path.join(deep, long_name("f", length))
    assert 3900 - length - 1 < len(f) <= 3900
    data = os.urandom(10000)
    with open(f, "wb") as out:
        out.write(data)
    with open(f, "rb") as src:
        assert src.read() == data
    os.chmod(f, 0o640)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    if os.geteuid() == 0:
        os.chown(f, 1234, 5678)
        assert (os.stat(f).st_uid, os.stat(f).st_gid) == (1234, 5678)
    os.truncate(f, 5)
    assert os.stat(f).st_size == 5
    g, h = os.path.join(deep, long_name("g", length)), os.path.join(deep, long_name("h", length))
    os.link(f, g)
    assert os.stat(f).st_nlink == 2
    s = os.path.join(deep, long_name("s", length))
    os.symlink("../target", s)
    assert os.readlink(s) == "../target"
    os.rename(g, h)  # within the directory
    moved = os.path.join(other, long_name("h", length))
    os.rename(h, moved)  # across directories
    with open(moved, "rb") as src:
        assert src.read() == data[:5]
    fifo = os.path.join(deep, long_name("p", length))
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    os.setxattr(f, "user.deep", b"value")
    assert os.getxattr(f, "user.deep") == b"value"
    assert sorted(os.listdir(deep)) == sorted(os.path.basename(p) for p in (f, s, fifo))
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(f).st_mtime_ns == 2_000_000_000
    sub = os.path.join(deep, long_name("m", length))
    os.mkdir(sub)
    os.rmdir(sub)
    for path in (f, s, fifo, moved):
        os.unlink(path)
    os.rmdir(other)
    while deep != str(mnt):
        os.rmdir(deep)
        deep = os.path.dirname(deep)
    assert os.listdir(mnt) == []


def test_statfs(mnt):
    st = os.statvfs(mnt)
    assert st.f_namemax == 255 and st.f_blocks > 0


def test_xattrs(mnt):
    path = mnt / "f"
    path.write_bytes(b"x")
    os.setxattr(path, "user.comment", b"hello")
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.comment") == b"hello"
    assert os.getxattr(path, "user.empty") == b""
    assert sorted(os.listxattr(path)) == ["user.comment", "user.empty"]
    os.removexattr(path, "user.comment")
    assert os.listxattr(path) == ["user.empty"]
    raises_errno(errno.ENODATA, os.getxattr, path, "user.comment")
    raises_errno(errno.EOPNOTSUPP, os.setxattr, path, "trusted.x", b"v")
    raises_errno(errno.E2BIG, os.setxattr, path, "user.big", b"v" * 65530)  # too big sealed
    (mnt / "d").mkdir()
    os.setxattr(mnt / "d", "user.dir", b"on a directory")
    assert os.getxattr(mnt / "d", "user.dir") == b"on a directory"


def test_access(mnt):
    path = mnt / "f"
    path.write_bytes(b"x")
    assert os.access(path, os.R_OK | os.W_OK)
    assert not os.access(mnt / "missing", os.F_OK)


def test_fsync_and_fdatasync(mnt):
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert (mnt / "f").read_bytes() == b"durable"
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def test_concurrent_writers_on_one_file(mnt):
    """Several threads writing disjoint ranges of one file at once."""
    path = mnt / "f"
    path.write_bytes(b"")
    chunk = 10_000

    def writer(i):
        fd = os.open(path, os.O_WRONLY)
        try:
            for _ in range(5):
                os.pwrite(fd, bytes([65 + i]) * chunk, i * chunk)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert path.read_bytes() == b"".join(bytes([65 + i]) * chunk for i in range(6))


def test_mmap_shared_and_private(mnt):
    import mmap

    path = mnt / "f"
    path.write_bytes(b"a" * 3 * P)
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as m:
            m[P - 2:P + 2] = b"WXYZ"
            m.flush()
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as m:
            m[0:4] = b"PRIV"
            assert m[P - 2:P + 2] == b"WXYZ"
    data = path.read_bytes()
    assert data[P - 2:P + 2] == b"WXYZ" and data[:4] == b"aaaa"
