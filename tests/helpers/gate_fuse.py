"""A FUSE filesystem (``fuse.gatetest``) with one file, ``f``, whose first
read waits until the test lets it go: a backing file on a disk that does
not answer, held as long as the test needs.

Talks over stdin and stdout, one line each: it prints ``mounted`` once
mounted and ``read`` when the first READ arrives, then waits for ``go`` on
stdin, answers the read and prints ``go``.  If no ``go`` comes within
``FAILSAFE`` seconds it answers anyway and prints ``timeout``, so a test
whose other thread could not run fails instead of hanging.  Later reads
are answered at once.  Every read is direct (no page cache, no read-ahead).

Run: python gate_fuse.py MOUNTPOINT (unmount with fusermount3 -u)."""

from __future__ import annotations

import errno
import select
import stat
import sys

import pyfuse3
import trio

CONTENT = bytes(range(256)) * 32  # f's bytes
FILE_INODE = pyfuse3.ROOT_INODE + 1
FAILSAFE = 10  # seconds


def wait_for_go() -> str:
    readable, _, _ = select.select([sys.stdin], [], [], FAILSAFE)
    if readable and sys.stdin.readline() == "go\n":
        return "go"
    return "timeout"


class GatedFile(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.gated = False

    async def getattr(self, inode, ctx=None):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        elif inode == FILE_INODE:
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_nlink = 1
            attr.st_size = len(CONTENT)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        if not self.gated:
            self.gated = True
            print("read", flush=True)
            print(await trio.to_thread.run_sync(wait_for_go), flush=True)
        return CONTENT[off:off + size]

    async def release(self, fh):
        pass


if __name__ == "__main__":
    pyfuse3.init(GatedFile(), sys.argv[1], {"fsname=gatetest", "subtype=gatetest"})
    print("mounted", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
