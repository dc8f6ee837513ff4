"""Inode numbers of the view: one per place, given on first sight and
kept for the whole mount, so a number never changes meaning while
mounted (the kernel's FORGET is not needed to free anything but memory:
a few hundred bytes per place seen, dropped at unmount).  Used from the
event loop only."""

from __future__ import annotations

import pyfuse3

from cryptfs.reverse.view import ROOT, Place


class NodeTable:
    def __init__(self) -> None:
        self._places: dict[int, Place] = {pyfuse3.ROOT_INODE: ROOT}
        self._numbers: dict[Place, int] = {ROOT: pyfuse3.ROOT_INODE}
        self._parents: dict[int, int] = {pyfuse3.ROOT_INODE: pyfuse3.ROOT_INODE}
        self._next = pyfuse3.ROOT_INODE + 1

    def place(self, ino: int) -> Place:
        """``KeyError`` for a number never given (a bug or a stale handle)."""
        return self._places[ino]

    def number(self, place: Place, parent: int) -> int:
        ino = self._numbers.get(place)
        if ino is None:
            ino = self._numbers[place] = self._next
            self._places[ino] = place
            self._next += 1
        self._parents[ino] = parent
        return ino

    def parent(self, ino: int) -> int:
        return self._parents.get(ino, ino)

    def __len__(self) -> int:
        return len(self._places)
