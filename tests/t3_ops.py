"""The FUSE handlers in process (as s3ql's t3_fs_api.py): ``Operations``
built by ``mount.assemble`` on a temporary directory, called directly with a
fake request context under pytest-trio.  No kernel, no root.

Only ``pyfuse3.readdir_reply`` is replaced (it writes into the kernel's
reply buffer, which does not exist here): it collects the entries."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import replace
from types import SimpleNamespace

import pyfuse3
import pytest

from cryptfs.content.format import HEADER_SIZE
from cryptfs.daemon.mount import assemble
from cryptfs.fs.inodes import ROOT_INODE
from cryptfs.fs.ops import MountOptions, Operations
from cryptfs.keys.keyfile import NEW_FEATURES
from cryptfs.lowlevel.linux import RENAME_EXCHANGE, RENAME_NOREPLACE
from cryptfs.names.filenames import NameCipher
from cryptfs.names.metadata import XATTR_SIZE_MAX
from cryptfs.tools.fsck import Checker
from tests.helpers.ops import CTX, changes, create, lookup, read_all

NOBODY = 65534


def fuse_errno(exc_info) -> int:
    return exc_info.value.errno


async def listdir(fs: Operations, ino: int, monkeypatch, per_reply: int = 1000,
                  dots: bool = False) -> list:
    """Every entry (``.`` and ``..`` only with ``dots``), fetched
    ``per_reply`` at a time as the kernel would."""
    fh = await fs.opendir(ino, CTX)
    entries: list = []
    batch: list = []

    def reply(token, name, attr, next_id):
        if len(batch) == per_reply:
            return False
        batch.append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    start = 0
    while True:
        batch.clear()
        await fs.readdir(fh, start, None)
        if not batch:
            break
        entries += batch
        start = batch[-1][2]
    await fs.releasedir(fh)
    return entries if dots else [e for e in entries if e[0] not in (b".", b"..")]


async def expect_errno(code: int, call, *args) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call(*args)
    assert fuse_errno(info) == code


async def append(fs: Operations, ino: int, data: bytes) -> None:
    fi = await fs.open(ino, os.O_WRONLY, CTX)
    await fs.write(fi.fh, (await fs.getattr(ino, CTX)).st_size, data)
    await fs.release(fi.fh)


@contextlib.contextmanager
def acting_as(uid: int):
    """Root's process with another user's file access rights for the block."""
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


async def test_create_write_read_lookup(fs):
    data = os.urandom(10000)
    ino = await create(fs, ROOT_INODE, b"f", data)
    assert await lookup(fs, ROOT_INODE, b"f") == ino
    assert (await fs.getattr(ino, CTX)).st_size == 10000
    assert await read_all(fs, ino) == data
    negative = await fs.lookup(ROOT_INODE, b"missing", CTX)
    assert negative.st_ino == 0


async def test_readdir_in_batches_counts_lookups(fs, monkeypatch):
    names = {b"f%03d" % i for i in range(25)}
    for name in names:
        ino = await create(fs, ROOT_INODE, name)
        await fs.forget([(ino, 1)])  # the kernel let go of it after create
    entries = await listdir(fs, ROOT_INODE, monkeypatch, per_reply=7)
    assert {name for name, _, _ in entries} == names
    for _, ino, _ in entries:  # each entry the kernel took is one lookup
        assert fs.inodes.get(ino).lookups == 1
        await fs.forget([(ino, 1)])
        assert ino not in fs.inodes


async def test_readdir_dot_entries_count_no_lookups(fs, monkeypatch):
    """``.`` and ``..`` come first with the directory's and its parent's
    numbers (the root's ``..`` is the root), across partial replies; the
    kernel takes no lookup for them (fs/fuse/readdir.c), so listing a
    directory again and again leaves it forgettable."""
    d = (await fs.mkdir(ROOT_INODE, b"d", 0o755, CTX)).st_ino
    f = await create(fs, d, b"f")
    await fs.forget([(f, 1)])
    for per_reply in (1, 2, 1000):
        entries = await listdir(fs, d, monkeypatch, per_reply=per_reply, dots=True)
        assert [(name, ino) for name, ino, _ in entries] == [(b".", d), (b"..", ROOT_INODE),
                                                              (b"f", f)]
        assert [next_id for _, _, next_id in entries] == [1, 2, 3]
        await fs.forget([(f, 1)])  # the kernel let go of the entry it took
    root = await listdir(fs, ROOT_INODE, monkeypatch, per_reply=1, dots=True)
    assert [(name, ino) for name, ino, _ in root[:2]] == [(b".", ROOT_INODE), (b"..", ROOT_INODE)]
    assert fs.inodes.get(d).lookups == 2  # mkdir's and the root listing's
    await fs.forget([(d, 2)])
    assert d not in fs.inodes and f not in fs.inodes


async def test_create_of_a_name_made_meanwhile_opens_it_without_o_excl(fs):
    """The kernel sends CREATE after a lookup found nothing; another writer
    of the backing tree (a shared mount, a sync tool) may have made the name
    since: open(2) without O_EXCL must open that file, not fail EEXIST."""
    ino = await create(fs, ROOT_INODE, b"raced", b"made elsewhere")
    fi, attr = await fs.create(ROOT_INODE, b"raced", 0o644, os.O_RDWR, CTX)
    try:
        assert attr.st_ino == ino
        assert await fs.read(fi.fh, 0, 100) == b"made elsewhere"
    finally:
        await fs.release(fi.fh)
    fi, attr = await fs.create(ROOT_INODE, b"raced", 0o644, os.O_WRONLY | os.O_TRUNC, CTX)
    await fs.release(fi.fh)
    assert attr.st_ino == ino and await read_all(fs, ino) == b""
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.create(ROOT_INODE, b"raced", 0o644, os.O_RDWR | os.O_EXCL, CTX)
    assert fuse_errno(info) == errno.EEXIST
    await fs.setattr(ino, *changes(st_mode=stat.S_IFREG | 0o600), None, CTX)
    with pytest.raises(pyfuse3.FUSEError) as info:  # its modes are checked for the caller
        await fs.create(ROOT_INODE, b"raced", 0o644, os.O_RDONLY,
                        SimpleNamespace(uid=NOBODY, gid=NOBODY, pid=1, umask=0o022))
    assert fuse_errno(info) == errno.EACCES
    await fs.mkdir(ROOT_INODE, b"dir", 0o755, CTX)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.create(ROOT_INODE, b"dir", 0o644, os.O_RDWR, CTX)
    assert fuse_errno(info) == errno.EISDIR


async def test_rename_within_and_across_directories(fs, monkeypatch):
    d1 = (await fs.mkdir(ROOT_INODE, b"d1", 0o755, CTX)).st_ino
    d2 = (await fs.mkdir(ROOT_INODE, b"d2", 0o755, CTX)).st_ino
    ino = await create(fs, d1, b"a", b"A")
    await fs.rename(d1, b"a", d1, b"b", 0, CTX)
    await fs.rename(d1, b"b", d2, b"c", 0, CTX)
    assert await lookup(fs, d2, b"c") == ino and await read_all(fs, ino) == b"A"
    other = await create(fs, d1, b"x", b"X")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.rename(d1, b"x", d2, b"c", RENAME_NOREPLACE, CTX)
    assert fuse_errno(info) == errno.EEXIST
    await fs.rename(d1, b"x", d2, b"c", RENAME_EXCHANGE, CTX)
    assert await lookup(fs, d2, b"c") == other and await lookup(fs, d1, b"x") == ino
    await fs.rename(ROOT_INODE, b"d1", ROOT_INODE, b"d3", 0, CTX)  # children follow
    assert await read_all(fs, await lookup(fs, d1, b"x")) == b"A"
    assert {name for name, _, _ in await listdir(fs, ROOT_INODE, monkeypatch)} == {b"d2", b"d3"}


async def test_xattrs(fs):
    ino = await create(fs, ROOT_INODE, b"f")
    await fs.setxattr(ino, b"user.note", b"value", CTX)
    assert await fs.getxattr(ino, b"user.note", CTX) == b"value"
    assert await fs.listxattr(ino, CTX) == [b"user.note"]
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.setxattr(ino, b"user.big", b"x" * XATTR_SIZE_MAX, CTX)
    assert fuse_errno(info) == errno.E2BIG
    await fs.removexattr(ino, b"user.note", CTX)
    assert await fs.listxattr(ino, CTX) == []
    d = (await fs.mkdir(ROOT_INODE, b"d", 0o755, CTX)).st_ino
    await fs.setxattr(d, b"user.dir", b"on a directory", CTX)
    assert await fs.getxattr(d, b"user.dir", CTX) == b"on a directory"
    assert await fs.listxattr(ino, CTX) == []


async def test_xattr_owner_through_first_write_rename_and_replacement(fs):
    """A closed file's ID (what its bound xattrs are sealed to) is kept by
    its inode: after its first write gave it one while open, after more
    writes, a truncation to 0 and a rename; a file renamed over it has its
    own."""
    ino = await create(fs, ROOT_INODE, b"f")  # headerless: no ID, no attributes
    await expect_errno(errno.ENODATA, fs.getxattr, ino, b"user.a", CTX)
    fi = await fs.open(ino, os.O_RDWR, CTX)
    await fs.write(fi.fh, 0, b"first write")
    await fs.setxattr(ino, b"user.a", b"f's", CTX)  # sealed to the open file's new ID
    await fs.release(fi.fh)
    assert await fs.getxattr(ino, b"user.a", CTX) == b"f's"
    await append(fs, ino, b", second write")
    assert await fs.getxattr(ino, b"user.a", CTX) == b"f's"
    await fs.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", 0, CTX)
    assert await lookup(fs, ROOT_INODE, b"g") == ino
    assert await fs.getxattr(ino, b"user.a", CTX) == b"f's"
    other = await create(fs, ROOT_INODE, b"h")
    await fs.setxattr(other, b"user.a", b"h's", CTX)  # its first xattr makes its ID
    assert await fs.getxattr(other, b"user.a", CTX) == b"h's"
    await fs.rename(ROOT_INODE, b"h", ROOT_INODE, b"g", 0, CTX)
    assert await lookup(fs, ROOT_INODE, b"g") == other
    assert await fs.getxattr(other, b"user.a", CTX) == b"h's"
    assert await fs.listxattr(other, CTX) == [b"user.a"]
    await expect_errno(errno.ENOENT, fs.getxattr, ino, b"user.a", CTX)  # no name left
    await append(fs, other, b"data")
    await fs.setattr(other, *changes(st_size=0), None, CTX)  # truncating keeps the header
    assert await fs.getxattr(other, b"user.a", CTX) == b"h's"


async def test_xattr_owner_of_a_file_rewritten_behind_the_mount(fs, tmp_path, engine, keys):
    """A backing file rewritten in place (the same inode) as a copy of
    another file, attributes included: the ID the inode kept is not used,
    and an attribute set now is sealed to the ID the file has now."""
    x = await create(fs, ROOT_INODE, b"x", b"X")
    y = await create(fs, ROOT_INODE, b"y", b"Y")
    await fs.setxattr(x, b"user.k", b"x's", CTX)
    await fs.setxattr(y, b"user.k", b"y's", CTX)
    assert await fs.getxattr(x, b"user.k", CTX) == b"x's"
    cipher = tmp_path / "cipher"
    x_backing, y_backing = (cipher / os.fsdecode(fs.inodes.link(ino)[1]) for ino in (x, y))
    with open(x_backing, "r+b") as f:
        f.truncate(0)
        f.write(y_backing.read_bytes())
    for name in os.listxattr(x_backing):
        os.removexattr(x_backing, name)
    for name in os.listxattr(y_backing):
        os.setxattr(x_backing, name, os.getxattr(y_backing, name))
    assert await fs.getxattr(x, b"user.k", CTX) == b"y's"
    await fs.setxattr(x, b"user.new", b"set now", CTX)
    assert await fs.getxattr(x, b"user.new", CTX) == b"set now"
    again = assemble(cipher, keys, engine, MountOptions(), NEW_FEATURES)
    try:
        ops = again.operations
        ino = await lookup(ops, ROOT_INODE, b"x")
        assert await ops.getxattr(ino, b"user.new", CTX) == b"set now"
        assert await read_all(ops, ino) == b"Y"
        assert Checker(str(cipher), ops.codec, NameCipher(keys), ops.metadata).run() == []
    finally:
        again.close()


async def test_no_user_xattrs_on_symlinks_and_fifos(fs):
    """On a symlink itself (never its target) or a fifo, Linux has no user.*
    attributes: none to read (ENODATA), none may be set or removed (EPERM)."""
    await create(fs, ROOT_INODE, b"f")
    await fs.setxattr(await lookup(fs, ROOT_INODE, b"f"), b"user.note", b"target's", CTX)
    link = (await fs.symlink(ROOT_INODE, b"s", b"f", CTX)).st_ino
    fifo = (await fs.mknod(ROOT_INODE, b"p", stat.S_IFIFO | 0o644, 0, CTX)).st_ino
    for ino in (link, fifo):
        await expect_errno(errno.ENODATA, fs.getxattr, ino, b"user.note", CTX)
        await expect_errno(errno.EPERM, fs.setxattr, ino, b"user.note", b"v", CTX)
        await expect_errno(errno.EPERM, fs.removexattr, ino, b"user.note", CTX)
        assert await fs.listxattr(ino, CTX) == []


async def test_first_xattr_of_a_file_open_read_only(fs, tmp_path, engine, keys):
    """An unprivileged daemon opens a read-only file's backing file
    read-only.  Made writable while open, the still empty (headerless) file
    takes its first xattr: the header goes through a descriptor of its own
    (through the read-only one it failed with EBADF).  The attribute and
    the empty contents outlast the open file and the mount; fsck is clean."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    cipher = tmp_path / "cipher"
    os.chown(cipher, NOBODY, NOBODY)
    with acting_as(NOBODY):
        ino = await create(fs, ROOT_INODE, b"f")
        await fs.setattr(ino, *changes(st_mode=0o444), None, CTX)
        fi = await fs.open(ino, os.O_RDONLY, CTX)
        assert not fs.handles.by_ino(ino).writable  # the case in question
        # Read-only: refused, as Linux answers.
        await expect_errno(errno.EACCES, fs.setxattr, ino, b"user.x", b"refused", CTX)
        await fs.setattr(ino, *changes(st_mode=0o644), None, CTX)
        await fs.setxattr(ino, b"user.x", b"first", CTX)
        assert await fs.getxattr(ino, b"user.x", CTX) == b"first"
        assert await fs.read(fi.fh, 0, 100) == b""
        await fs.release(fi.fh)
    (backing,) = [p for p in cipher.iterdir() if not p.name.startswith("cryptfs.")]
    assert backing.stat().st_size == HEADER_SIZE  # a header, no page
    again = assemble(cipher, keys, engine, MountOptions(), NEW_FEATURES)
    try:
        ops = again.operations
        ino = await lookup(ops, ROOT_INODE, b"f")
        assert await ops.getxattr(ino, b"user.x", CTX) == b"first"
        assert await read_all(ops, ino) == b"" and (await ops.getattr(ino, CTX)).st_size == 0
        assert Checker(str(cipher), ops.codec, NameCipher(keys), ops.metadata).run() == []
    finally:
        again.close()


async def test_setattr_symlink_mknod(fs):
    ino = await create(fs, ROOT_INODE, b"f", b"0123456789")
    attr = pyfuse3.EntryAttributes()
    attr.st_mode, attr.st_size, attr.st_mtime_ns = 0o600, 4, 123_000_000_000
    fields = SimpleNamespace(update_size=True, update_mode=True, update_uid=False,
                             update_gid=False, update_atime=False, update_mtime=True,
                             update_ctime=True)
    out = await fs.setattr(ino, attr, fields, None, CTX)
    assert (stat.S_IMODE(out.st_mode), out.st_size, out.st_mtime_ns) == \
        (0o600, 4, 123_000_000_000)
    assert await read_all(fs, ino) == b"0123"
    link = await fs.symlink(ROOT_INODE, b"s", b"f", CTX)
    assert await fs.readlink(link.st_ino, CTX) == b"f" and link.st_size == 1
    fifo = await fs.mknod(ROOT_INODE, b"p", stat.S_IFIFO | 0o644, 0, CTX)
    assert stat.S_ISFIFO(fifo.st_mode)
    hard = await fs.link(ino, ROOT_INODE, b"g", CTX)
    assert hard.st_ino == ino and hard.st_nlink == 2


async def test_unlink_rmdir(fs):
    d = (await fs.mkdir(ROOT_INODE, b"d", 0o755, CTX)).st_ino
    await create(fs, d, b"f")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.rmdir(ROOT_INODE, b"d", CTX)
    assert fuse_errno(info) == errno.ENOTEMPTY
    await fs.unlink(d, b"f", CTX)
    await fs.rmdir(ROOT_INODE, b"d", CTX)
    assert (await fs.lookup(ROOT_INODE, b"d", CTX)).st_ino == 0


async def test_open_file_survives_unlink(fs):
    ino = await create(fs, ROOT_INODE, b"f", b"data")
    fi = await fs.open(ino, os.O_RDWR, CTX)
    await fs.unlink(ROOT_INODE, b"f", CTX)
    await fs.write(fi.fh, 4, b" more")
    assert await fs.read(fi.fh, 0, 100) == b"data more"
    assert (await fs.getattr(ino, CTX)).st_size == 9
    await fs.release(fi.fh)


async def test_times_after_the_last_unlink(fs):
    """With the writeback cache the kernel sends SETATTR(mtime, ctime) of a
    regular file after every unlink; for a file with no name left and not
    open it gets an answer (a regular file's type and the new times, cached
    nowhere), not ENOENT, which the kernel would keep on the inode."""
    ino = await create(fs, ROOT_INODE, b"f", b"data")
    await fs.unlink(ROOT_INODE, b"f", CTX)
    attr, fields = changes(st_mtime_ns=1_000_000_007)
    attr.st_ctime_ns = 2_000_000_011
    after = await fs.setattr(ino, attr, fields, None, CTX)
    assert (after.st_ino, stat.S_IFMT(after.st_mode), after.attr_timeout) == \
        (ino, stat.S_IFREG, 0)
    assert (after.st_mtime_ns, after.st_ctime_ns) == (1_000_000_007, 2_000_000_011)
    # any other change still takes the general path: the file is gone
    await expect_errno(errno.ENOENT, fs.setattr, ino, *changes(st_mode=0o600), None, CTX)
    await expect_errno(errno.ENOENT, fs.getattr, ino, CTX)


async def test_times_after_unlinking_one_of_two_links(fs):
    """A file with a name left, or open, is changed in its backing file as
    before (its other name shows the new times)."""
    ino = await create(fs, ROOT_INODE, b"f", b"data")
    await fs.link(ino, ROOT_INODE, b"g", CTX)
    await fs.unlink(ROOT_INODE, b"f", CTX)
    after = await fs.setattr(ino, *changes(st_mtime_ns=3_000_000_000), None, CTX)
    assert (after.st_nlink, after.st_mtime_ns) == (1, 3_000_000_000)
    fi = await fs.open(ino, os.O_RDWR, CTX)
    await fs.unlink(ROOT_INODE, b"g", CTX)
    after = await fs.setattr(ino, *changes(st_mtime_ns=4_000_000_000), fi.fh, CTX)
    assert (after.st_nlink, after.st_size, after.st_mtime_ns) == (0, 4, 4_000_000_000)
    assert (await fs.getattr(ino, CTX)).st_mtime_ns == 4_000_000_000
    await fs.release(fi.fh)


async def test_security_xattrs(fs):
    """Names we never store (security.capability, asked before every
    write(2)) are refused at once, on any inode; with xattrs off every
    name gets ENOSYS."""
    ino = await create(fs, ROOT_INODE, b"f", b"data")
    for name in (b"security.capability", b"security.selinux", b"trusted.x", b"system.x"):
        await expect_errno(errno.EOPNOTSUPP, fs.getxattr, ino, name, CTX)
        await expect_errno(errno.EOPNOTSUPP, fs.getxattr, 9999, name, CTX)
    await expect_errno(errno.ENODATA, fs.getxattr, ino, b"user.none", CTX)
    await expect_errno(errno.ENOENT, fs.getxattr, 9999, b"user.none", CTX)
    monkey = fs.options
    fs.options = replace(monkey, xattrs=False)
    try:
        for name in (b"security.capability", b"user.none"):
            await expect_errno(errno.ENOSYS, fs.getxattr, ino, name, CTX)
    finally:
        fs.options = monkey


async def test_deep_backing_paths(fs):
    """Backing paths far beyond PATH_MAX (no kernel limits the plaintext
    path here): every operation still works."""
    parent = ROOT_INODE
    for _ in range(30):
        parent = (await fs.mkdir(parent, b"D" * 255, 0o755, CTX)).st_ino
    ino = await create(fs, parent, b"F" * 255, b"deep")
    await fs.rename(parent, b"F" * 255, parent, b"G" * 255, 0, CTX)
    await fs.setxattr(ino, b"user.x", b"1", CTX)
    assert await read_all(fs, await lookup(fs, parent, b"G" * 255)) == b"deep"
    await fs.unlink(parent, b"G" * 255, CTX)


async def test_error_edge(fs, monkeypatch, caplog):
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.getattr(9999, CTX)  # an inode the kernel never had (or forgot)
    assert fuse_errno(info) == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.read(9999, 0, 10)
    assert fuse_errno(info) == errno.EBADF
    with pytest.raises(pyfuse3.FUSEError) as info:
        await fs.readdir(9999, 0, None)
    assert fuse_errno(info) == errno.EBADF

    def bug(ino):
        return {}[ino]  # a KeyError from a bug must not pass for "no such file"

    monkeypatch.setattr(fs.tree, "stat", bug)
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as info:
        await fs.getattr(ROOT_INODE, CTX)
    assert fuse_errno(info) == errno.EIO
    assert "internal error in getattr" in caplog.text and "KeyError" in caplog.text
