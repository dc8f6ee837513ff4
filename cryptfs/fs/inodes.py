"""The inode table: FUSE inode numbers <-> backing directory entries.

FUSE inode numbers are ours (1 is the root); each stands for one backing
inode, identified by ``(st_dev, st_ino)``, so every hard link of a file has
the same inode number, as POSIX requires.  For each inode we remember the
directory entries we know it by, as ``(parent inode, backing name)`` pairs,
and build backing paths by walking up to the root.  Renaming a directory
therefore changes one pair, and the paths of everything below it follow.

An inode lives while the kernel holds lookups on it (``forget`` drops them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyfuse3

ROOT_INODE = pyfuse3.ROOT_INODE

Link = tuple[int, bytes]  # (parent inode, backing name)


@dataclass(slots=True)
class Inode:
    ino: int
    dev_ino: tuple[int, int]
    links: set[Link] = field(default_factory=set)
    lookups: int = 0


class InodeTable:
    def __init__(self, root: bytes, root_dev_ino: tuple[int, int]) -> None:
        self._root = root
        self._by_ino: dict[int, Inode] = {}
        self._by_dev_ino: dict[tuple[int, int], Inode] = {}
        self._by_link: dict[Link, Inode] = {}
        self._next = ROOT_INODE + 1
        root_inode = Inode(ROOT_INODE, root_dev_ino, lookups=1)
        self._by_ino[ROOT_INODE] = root_inode
        self._by_dev_ino[root_dev_ino] = root_inode

    def __contains__(self, ino: int) -> bool:
        return ino in self._by_ino

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode:
        """The inode, or ``KeyError`` if the kernel asked for a forgotten one."""
        return self._by_ino[ino]

    def path(self, ino: int) -> bytes:
        """A backing path of ``ino`` (any of its links).  Raises
        ``FileNotFoundError`` for an inode with no known name left (all its
        links were unlinked while it stayed open)."""
        parts: list[bytes] = []
        while ino != ROOT_INODE:
            ino, name = self.link_of(ino)
            parts.append(name)
        parts.append(self._root)
        return b"/".join(reversed(parts))

    def link_of(self, ino: int) -> Link:
        """The entry ``path`` uses: a deterministic choice among hard links."""
        inode = self._by_ino.get(ino)
        if inode is None or not inode.links:
            raise FileNotFoundError(2, "inode has no name left")
        return min(inode.links)

    def child_path(self, parent: int, backing_name: bytes) -> bytes:
        return self.path(parent) + b"/" + backing_name

    def remember(self, parent: int, backing_name: bytes, st: os.stat_result,
                 lookup: bool = True, fresh: bool = False) -> Inode:
        """Record that ``parent/backing_name`` is the backing inode ``st``;
        return our inode for it (one more kernel lookup if ``lookup``).

        ``fresh`` says the backing inode was just created: if its number is
        still mapped, that mapping belongs to a deleted file whose number the
        backing filesystem reused (the kernel may not have forgotten the old
        inode yet), so the new file gets a new inode of ours."""
        link = (parent, backing_name)
        dev_ino = (st.st_dev, st.st_ino)
        if fresh:
            self._by_dev_ino.pop(dev_ino, None)
        inode = self._by_dev_ino.get(dev_ino)
        if inode is None:
            inode = Inode(self._next, dev_ino)
            self._next += 1
            self._by_ino[inode.ino] = inode
            self._by_dev_ino[dev_ino] = inode
        stale = self._by_link.get(link)
        if stale is not None and stale is not inode:  # replaced behind our back
            stale.links.discard(link)
        inode.links.add(link)
        self._by_link[link] = inode
        if lookup:
            inode.lookups += 1
        return inode

    def find(self, parent: int, backing_name: bytes) -> Inode | None:
        """The known inode linked at ``parent/backing_name``, if any."""
        return self._by_link.get((parent, backing_name))

    def unlink(self, parent: int, backing_name: bytes) -> None:
        inode = self._by_link.pop((parent, backing_name), None)
        if inode is not None:
            inode.links.discard((parent, backing_name))

    def move(self, old: Link, new: Link) -> None:
        """``old`` was renamed over ``new`` (whatever was at ``new`` is gone)."""
        self.unlink(*new)
        inode = self._by_link.pop(old, None)
        if inode is not None:
            inode.links.discard(old)
            inode.links.add(new)
            self._by_link[new] = inode

    def rebacked(self, link: Link, st: os.stat_result) -> None:
        """The entry at ``link`` is now another backing inode standing for the
        same file (a symlink re-sealed for its new name): keep our inode."""
        inode = self._by_link.get(link)
        if inode is None:
            return
        if self._by_dev_ino.get(inode.dev_ino) is inode:
            del self._by_dev_ino[inode.dev_ino]
        inode.dev_ino = (st.st_dev, st.st_ino)
        self._by_dev_ino[inode.dev_ino] = inode

    def exchange(self, a: Link, b: Link) -> None:
        first, second = self._by_link.pop(a, None), self._by_link.pop(b, None)
        for inode, old, new in ((first, a, b), (second, b, a)):
            if inode is not None:
                inode.links.discard(old)
                inode.links.add(new)
                self._by_link[new] = inode

    def forget(self, ino: int, count: int) -> None:
        inode = self._by_ino.get(ino)
        if inode is None or ino == ROOT_INODE:
            return
        inode.lookups -= count
        if inode.lookups <= 0:
            del self._by_ino[ino]
            if self._by_dev_ino.get(inode.dev_ino) is inode:
                del self._by_dev_ino[inode.dev_ino]
            for link in inode.links:
                if self._by_link.get(link) is inode:
                    del self._by_link[link]
