"""A FUSE filesystem of another type (``fuse.othertest``) serving one empty
root: t4_lifecycle kills it to get a dead mount that cryptfs must leave alone."""

from __future__ import annotations

import stat
import sys

import pyfuse3
import trio


class EmptyRoot(pyfuse3.Operations):
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = stat.S_IFDIR | 0o755
        attr.st_nlink = 2
        return attr


if __name__ == "__main__":
    pyfuse3.init(EmptyRoot(), sys.argv[1], {"fsname=othertest", "subtype=othertest"})
    trio.run(pyfuse3.main)
