"""The inode table: FUSE inode numbers <-> backing directory entries.

Each FUSE inode stands for one backing inode, identified by ``(st_dev,
st_ino)``, so every hard link of a file has the same inode number, as POSIX
requires.  pyfuse3 reports the FUSE node ID as ``st_ino``, so the node ID
itself is derived from the backing inode number (``number_for``): a file
keeps its number when the kernel forgets its inode and across remounts,
which git's index, incremental backups and ``find -inum`` rely on.  1 is
the cipher directory.  A number that cannot be derived, or that a
different inode the kernel still holds has, comes from a spill range: such
a number lasts while the kernel holds the inode.

For each inode we remember the directory entries we know it by, as
``(parent inode, backing name)`` pairs; the backing tree reaches an entry
through its parent's directory descriptor, so renaming a directory changes
one pair and nothing below it.

An inode lives while the kernel holds lookups on it (``forget`` drops them).
This table is the only place that counts lookups and edits links.  When an
inode is dropped, or loses its last known name (a directory removed or
replaced), the ``on_gone`` callback given at construction is told, so
per-inode caches elsewhere (directory IVs and descriptors, handle state)
drop their entries in one place.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import pyfuse3

from cryptfs.errors import StaleInodeError
from cryptfs.fs.identity import Identity

ROOT_INODE = pyfuse3.ROOT_INODE

Link = tuple[int, bytes]  # (parent inode, backing name)


class ClosedFileId(NamedTuple):
    """A regular file's ID as read from its backing header while no handle
    had it open, and the backing ctime it was read at: a copy, trusted only
    while that ctime is unchanged.  Not the same fact as an open file's
    ``EncryptedFile.header``, which is the file's header itself (made and
    held under the file's lock) and the only one consulted while the file is
    open; both agree because cryptfs never changes an ID once written."""

    ctime_ns: int
    file_id: bytes

# Node IDs, as gocryptfs's inomap lays them out: bit 63 clear, a 15-bit
# namespace, a 48-bit backing inode number; or bit 63 set, a spill number.
# Namespace 0 is the cipher directory's device (node ID = backing st_ino),
# 1..0x7FFF other devices below it (bind mounts, btrfs subvolumes), chosen
# by a hash of st_dev (gocryptfs: in the order devices are met) so a device
# has the same namespace in every mount.  Derived numbers stay below 2^63,
# so programs that keep inode numbers signed see them positive.
INO_BITS = 48
INO_LIMIT = 1 << INO_BITS
NAMESPACES = 1 << 15
SPILL_START = 1 << 63


def device_namespace(dev: int) -> int:
    """The namespace (1..0x7FFF) of a device other than the cipher
    directory's: a fixed mix of ``st_dev`` (splitmix64's finalizer), the same
    in every mount."""
    x = dev & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return 1 + x % (NAMESPACES - 1)


@dataclass(slots=True)
class Inode:
    ino: int
    dev_ino: tuple[int, int]
    # The directory entries it is known by: None, one Link (nearly every
    # inode), or a set of them (hard links).  Not always a set: an empty
    # set object takes more memory than the rest of the inode, and the
    # kernel can hold every inode of a large tree (``links`` reads them).
    _links: Link | set[Link] | None = None
    lookups: int = 0
    # Differs between any two inodes that had the same number in this mount
    # (a number is reused once the kernel forgot its inode): the kernel
    # checks it when it resolves a file handle (open_by_handle_at, NFS).
    generation: int = 0
    # The owner of a closed regular file's bound xattrs, kept by
    # ``BackingTree.xattr_owner`` (an open file's is its EncryptedFile.header).
    closed_file_id: ClosedFileId | None = None
    # --shared: what this backing inode was when last seen (``BackingTree``
    # compares it to tell a re-created file that reuses the number).
    identity: Identity | None = None

    @property
    def links(self) -> frozenset[Link]:
        """Every known ``(parent, backing name)`` of this inode (a copy)."""
        links = self._links
        if links is None:
            return frozenset()
        return frozenset(links) if isinstance(links, set) else frozenset((links,))

    def has_links(self) -> bool:
        return self._links is not None

    def first_link(self) -> Link:
        """The smallest link (the same one each time among hard links); the
        inode must have one."""
        links = self._links
        assert links is not None
        return min(links) if isinstance(links, set) else links

    def add_link(self, link: Link) -> None:
        links = self._links
        if links is None or links == link:
            self._links = link
        elif isinstance(links, set):
            links.add(link)
        else:
            self._links = {links, link}

    def discard_link(self, link: Link) -> None:
        links = self._links
        if isinstance(links, set):
            links.discard(link)
            if len(links) == 1:
                self._links = next(iter(links))
        elif links == link:
            self._links = None

    def has_link(self, link: Link) -> bool:
        links = self._links
        return link in links if isinstance(links, set) else links == link


def _ignore(ino: int) -> None:
    return None


class InodeTable:
    def __init__(self, root_dev_ino: tuple[int, int],
                 on_gone: Callable[[int], None] = _ignore) -> None:
        self._on_gone = on_gone
        self._by_ino: dict[int, Inode] = {}
        self._by_dev_ino: dict[tuple[int, int], Inode] = {}
        self._by_link: dict[Link, Inode] = {}
        self._root_dev = root_dev_ino[0]
        self._namespaces: dict[int, int] = {}  # namespace -> the device that has it
        self._spill = itertools.count(SPILL_START)
        self._generations = itertools.count(1)
        root_inode = Inode(ROOT_INODE, root_dev_ino, lookups=1)
        self._by_ino[ROOT_INODE] = root_inode
        self._by_dev_ino[root_dev_ino] = root_inode

    def __contains__(self, ino: int) -> bool:
        return ino in self._by_ino

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode:
        """The inode; ``StaleInodeError`` if the kernel asked for a forgotten one."""
        inode = self._by_ino.get(ino)
        if inode is None:
            raise StaleInodeError(f"inode {ino} is not known (forgotten)")
        return inode

    def link(self, ino: int) -> Link:
        """One ``(parent, backing name)`` of ``ino`` (the same one each time
        among hard links).  ``FileNotFoundError`` for an inode with no known
        name left (all its links were unlinked while it stayed open)."""
        inode = self.get(ino)
        if not inode.has_links():
            raise FileNotFoundError(2, "inode has no name left")
        return inode.first_link()

    def path(self, ino: int) -> bytes:
        """The backing path of ``ino`` relative to the cipher directory, for
        messages only: backing access never uses paths."""
        parts: list[bytes] = []
        while ino != ROOT_INODE:
            inode = self._by_ino.get(ino)
            if inode is None or not inode.has_links():
                parts.append(b"(unlinked)")
                break
            ino, name = inode.first_link()
            parts.append(name)
        return b"/".join(reversed(parts)) or b"."

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
            inode = Inode(self._number(dev_ino), dev_ino, generation=next(self._generations))
            self._by_ino[inode.ino] = inode
            self._by_dev_ino[dev_ino] = inode
        stale = self._by_link.get(link)
        if stale is not None and stale is not inode:  # replaced behind our back
            self._drop_link(stale, link)
        inode.add_link(link)
        self._by_link[link] = inode
        if lookup:
            inode.lookups += 1
        return inode

    def known(self, dev_ino: tuple[int, int]) -> Inode | None:
        """The inode that backing inode ``dev_ino`` is mapped to, if any."""
        return self._by_dev_ino.get(dev_ino)

    def number_for(self, dev_ino: tuple[int, int]) -> int | None:
        """The node ID derived from a backing inode, the same in every mount;
        None if it has none: inode number 0 or 1 on the cipher directory's
        device (0 is no node, 1 the root), a number of 48 bits or more, or
        a device whose namespace another device took first in this mount."""
        dev, ino = dev_ino
        if ino >= INO_LIMIT:
            return None
        if dev == self._root_dev:
            return ino if ino > ROOT_INODE else None
        namespace = device_namespace(dev)
        if self._namespaces.setdefault(namespace, dev) != dev:
            return None
        return namespace << INO_BITS | ino

    def _number(self, dev_ino: tuple[int, int]) -> int:
        """The node ID for a new inode: derived, unless there is none or a
        different inode the kernel still holds has it (the backing inode
        number was reused after a delete, or a re-sealed symlink kept its
        old number); else the next spill number (never reused in a mount)."""
        number = self.number_for(dev_ino)
        if number is None or number in self._by_ino:
            return next(self._spill)
        return number

    def generation(self, ino: int) -> int:
        inode = self._by_ino.get(ino)
        return 0 if inode is None else inode.generation

    # -- readdir: entries are remembered first, counted once the kernel took them --

    def count_lookup(self, inode: Inode) -> None:
        """The kernel received ``inode`` (in a READDIRPLUS reply)."""
        inode.lookups += 1

    def drop_unused(self, inode: Inode) -> None:
        """Forget ``inode`` again if the kernel holds no lookup on it (a
        listing entry that did not fit in the reply)."""
        self.forget(inode.ino, 0)

    # -- changes to names --

    def find(self, parent: int, backing_name: bytes) -> Inode | None:
        """The known inode linked at ``parent/backing_name``, if any."""
        return self._by_link.get((parent, backing_name))

    def unlink(self, parent: int, backing_name: bytes) -> None:
        inode = self._by_link.pop((parent, backing_name), None)
        if inode is not None:
            self._drop_link(inode, (parent, backing_name))

    def forget_link(self, inode: Inode, link: Link) -> None:
        """``inode`` is no longer at ``link`` (changed behind our back);
        whatever another inode has there is kept."""
        if self._by_link.get(link) is inode:
            del self._by_link[link]
        if inode.has_link(link):
            self._drop_link(inode, link)

    def _drop_link(self, inode: Inode, link: Link) -> None:
        inode.discard_link(link)
        if not inode.has_links():
            self._on_gone(inode.ino)

    def move(self, old: Link, new: Link) -> None:
        """``old`` was renamed over ``new`` (whatever was at ``new`` is gone)."""
        self.unlink(*new)
        inode = self._by_link.pop(old, None)
        if inode is not None:
            inode.discard_link(old)
            inode.add_link(new)
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
        inode.closed_file_id = None  # (a symlink has none; nothing read from the old entry stays)
        inode.identity = None  # the re-sealed target is this file's too: read afresh
        self._by_dev_ino[inode.dev_ino] = inode

    def exchange(self, a: Link, b: Link) -> None:
        first, second = self._by_link.pop(a, None), self._by_link.pop(b, None)
        for inode, old, new in ((first, a, b), (second, b, a)):
            if inode is not None:
                inode.discard_link(old)
                inode.add_link(new)
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
            self._on_gone(ino)
