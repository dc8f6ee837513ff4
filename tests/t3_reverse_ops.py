"""The reverse view's FUSE handlers in process: the mount is read-only
for the kernel, and each handler that would write refuses on its own too
(a kernel that sent a write anyway finds nothing changed)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyfuse3
import pytest

from cryptfs.daemon.reverse import assemble_reverse
from cryptfs.engines.userspace import OpenSSLEngine
from cryptfs.fs.ops import MountOptions
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.keyfile import NEW_FEATURES


@pytest.fixture
def reverse_ops(tmp_path: Path, keys: KeyRing):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "f").write_bytes(b"data")
    keyfile = tmp_path / "key.conf"
    keyfile.write_bytes(b"{}")
    stack = assemble_reverse(plain, keyfile, keys, OpenSSLEngine(), MountOptions(read_only=True),
                             NEW_FEATURES)
    yield stack.operations, plain
    stack.close()


class Ctx:
    uid, gid, pid, umask = os.getuid(), os.getgid(), os.getpid(), 0o022


async def test_every_write_handler_answers_erofs(reverse_ops):
    ops, plain = reverse_ops
    before = {p.name: p.read_bytes() for p in plain.iterdir()}
    root, ctx = pyfuse3.ROOT_INODE, Ctx()
    listing = ops.view.listing(b"")
    name = next(n for n, place, _ in listing if place.path == b"f")
    entry = await ops.lookup(root, name.encode(), ctx)
    ino = entry.st_ino
    calls = {
        "setattr": (ino, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, ctx),
        "mknod": (root, b"x", 0o10644, 0, ctx),
        "mkdir": (root, b"x", 0o755, ctx),
        "symlink": (root, b"x", b"t", ctx),
        "link": (ino, root, b"x", ctx),
        "unlink": (root, name.encode(), ctx),
        "rmdir": (root, b"x", ctx),
        "rename": (root, name.encode(), root, b"x", 0, ctx),
        "create": (root, b"x", 0o644, os.O_WRONLY | os.O_CREAT, ctx),
        "write": (1, 0, b"x"),
        "setxattr": (ino, b"user.x", b"1", ctx),
        "removexattr": (ino, b"user.x", ctx),
    }
    for method, args in calls.items():
        with pytest.raises(pyfuse3.FUSEError) as info:
            await getattr(ops, method)(*args)
        assert info.value.errno == errno.EROFS, method
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.open(ino, flags, ctx)
        assert info.value.errno == errno.EROFS
    assert {p.name: p.read_bytes() for p in plain.iterdir()} == before
