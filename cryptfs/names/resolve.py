"""A backing directory's names read as a whole: what decodes under its IV,
and what a sync tool left that does not (docs/conflicts.md).

A name that does not decode under the directory's IV is not necessarily
foreign.  A sync tool may have kept a losing version beside the winner as a
*conflict copy* (``<encoded>.sync-conflict-...``), or kept one of two
``cryptfs.diriv`` files made on two machines for the same directory as a
copy (``cryptfs.sync-conflict-....diriv``), stranding every name sealed
under the losing IV.  ``resolve`` finds both and says how to show them:

* a conflict copy of an entry is shown when its original's backing name
  decodes in this directory (under the main IV or a copy's IV; a long
  name's copy with the original's sidecar, whose hash must match), under
  ``conflicts.display_name``;
* a name that decodes only under a ``cryptfs.diriv`` copy's IV is shown
  under its own plaintext name, or with that copy's conflict marker if the
  name is taken;
* copies of ``cryptfs.diriv`` and of sidecars are never entries: a sidecar
  copy stands in for a missing sidecar.

Shown names never shadow a real one (``taken`` sees every real name) and
are the same at every listing of an unchanged directory (each kind is
resolved in sorted order).  The mount (``fs/tree.py``) and ``cryptfs fsck``
both read directories through here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptfs.errors import FileNameError, NameDecodeError
from cryptfs.names.conflicts import ConflictCopy, Kind, candidates, display_name
from cryptfs.names.filenames import (
    DIRIV_LEN,
    DIRIV_NAME,
    RESERVED_PREFIX,
    SIDECAR_MAX,
    SIDECAR_SUFFIX,
    BackingName,
    NameCipher,
    is_longname,
    read_small,
)


@dataclass(frozen=True, slots=True)
class Shown:
    """An entry shown although its backing name does not decode under its
    directory's IV: a conflict copy, or a name stranded under a diriv copy."""

    backing: BackingName  # the entry; its sidecar only for a stranded long name (its own)
    plain: bytes  # what its name (or its original's) decodes to
    name: bytes  # the name shown in the mount
    iv: bytes  # the IV that name was sealed under
    sealed_as: bytes  # the backing name a bound symlink's target is sealed to
    copy: ConflictCopy | None  # the marker, for a conflict copy
    diriv: str | None  # the diriv copy whose IV decodes it; None: the main IV


@dataclass(slots=True)
class DirivCopy:
    """A sync tool's copy of ``cryptfs.diriv``."""

    name: str
    copy: ConflictCopy
    iv: bytes | None  # None: unreadable or not an IV (``error`` says why)
    error: str | None = None
    used: int = 0  # shown entries whose names decode under it


@dataclass(frozen=True, slots=True)
class SidecarCopy:
    """A sync tool's copy of a long name's sidecar."""

    name: str
    copy: ConflictCopy
    state: str  # "same" (as the sidecar), "in-place" (of a missing sidecar), "differs",
    #             "orphan" (no long name uses it)


@dataclass
class Directory:
    """Everything ``resolve`` found in one backing directory."""

    real: dict[str, bytes] = field(default_factory=dict)  # backing name -> plaintext
    shown: list[Shown] = field(default_factory=list)
    diriv_copies: list[DirivCopy] = field(default_factory=list)
    sidecar_copies: list[SidecarCopy] = field(default_factory=list)
    foreign: list[tuple[str, Exception]] = field(default_factory=list)
    used_sidecars: set[str] = field(default_factory=set)  # sidecars a shown copy decodes with

    @property
    def hidden(self) -> set[str]:
        """The sync tool's copies that are not entries."""
        return {c.name for c in self.diriv_copies} | {c.name for c in self.sidecar_copies}


class _Reader:
    """One directory's names while it is resolved: sidecars found by name,
    the IVs to try, the names taken."""

    def __init__(self, names: NameCipher, iv: bytes, dir_fd: int, present: set[str]) -> None:
        self.names, self.iv, self.dir_fd, self.present = names, iv, dir_fd, present
        self.sidecar_copies: dict[str, list[tuple[str, ConflictCopy]]] = {}
        self.ivs: list[tuple[bytes, DirivCopy | None]] = [(iv, None)]
        self.taken: set[bytes] = set()

    def sidecars(self, longname: str) -> list[str]:
        """The files that may hold ``longname``'s encoded name: its sidecar,
        then a sync tool's copies of it (used when the sidecar is missing or
        does not match: the hash check decides)."""
        own = longname + SIDECAR_SUFFIX
        found = [own] + [n for n, _ in self.sidecar_copies.get(own, [])]
        return [name for name in found if name in self.present]

    def decode(self, backing: str, iv: bytes) -> tuple[bytes, str | None, str | None]:
        """``(plaintext, encoded, sidecar file)`` of an encoded or long
        ``backing`` name under ``iv``; the encoded name only for a long one."""
        if not is_longname(backing):
            return self.names.decode(iv, backing), None, None
        error: Exception = NameDecodeError(f"{backing} has no sidecar")
        for sidecar in self.sidecars(backing):
            try:
                data = read_small(self.dir_fd, sidecar, SIDECAR_MAX)
                plain = self.names.decode_longname(iv, backing, data)
            except (FileNameError, OSError) as exc:
                error = exc
                continue
            return plain, data.decode("ascii").strip(), sidecar
        raise error

    def decode_any(self, backing: str, main: bool = True
                   ) -> tuple[bytes, bytes, DirivCopy | None, str | None, str | None]:
        """The first IV ``backing`` decodes under (``main``: the main IV
        too): ``(plaintext, iv, its diriv copy, encoded, sidecar file)``."""
        error: Exception = NameDecodeError(f"{backing[:40]!r} does not decode here")
        for iv, diriv in self.ivs if main else self.ivs[1:]:
            try:
                plain, encoded, sidecar = self.decode(backing, iv)
            except (FileNameError, OSError, UnicodeDecodeError) as exc:
                error = exc
                continue
            return plain, iv, diriv, encoded, sidecar
        raise error

    def is_taken(self, name: bytes) -> bool:
        return name in self.taken


def is_sidecar(name: str) -> bool:
    return name.endswith(SIDECAR_SUFFIX) and is_longname(name[:-len(SIDECAR_SUFFIX)])


def resolve(names: NameCipher, iv: bytes, dir_fd: int, entries: Iterable[str]) -> Directory:
    """Read every name of the backing directory ``dir_fd`` (its IV ``iv``,
    its entry names ``entries``).  Our own files (the IV, sidecars, the key
    file, the lock) are in no list; anything unexplained is ``foreign``."""
    result = Directory()
    reader = _Reader(names, iv, dir_fd, set(entries))
    failed: list[str] = []
    copies: list[tuple[str, ConflictCopy]] = []
    for name in reader.present:  # the usual case first and fast: a name that decodes
        reserved = name.startswith(RESERVED_PREFIX)
        if reserved and (name == DIRIV_NAME or is_sidecar(name)):
            continue
        if not reserved or is_longname(name):
            try:
                plain = names.decode(iv, name) if not reserved else reader.decode(name, iv)[0]
            except (FileNameError, OSError, UnicodeDecodeError):
                pass
            else:
                result.real[name] = plain
                reader.taken.add(plain)
                continue
        found = next(candidates(os.fsencode(name), foreign=True), None)
        if found is not None and found.kind in (Kind.DIRIV, Kind.SIDECAR):
            copies.append((name, found))
        elif found is not None or not name.startswith(RESERVED_PREFIX) or is_longname(name):
            failed.append(name)
        # else one of our other files (key file, lock, temporaries): no entry
    # Sorted: an unchanged directory shows the same names at every listing.
    copies.sort()
    _own_copies(reader, result, copies)
    failed = _retry_longnames(reader, result, sorted(failed)) if failed else failed
    stranded, rest = _stranded(reader, result, failed)
    result.shown += stranded
    for name in rest:
        _conflict_copy(reader, result, name)
    return result


def _own_copies(reader: _Reader, result: Directory,
                copies: list[tuple[str, ConflictCopy]]) -> None:
    """Copies of ``cryptfs.diriv`` (their IVs tried after the main one) and
    of sidecars (used in place of a missing one)."""
    for name, copy in copies:
        if copy.kind is Kind.DIRIV:
            result.diriv_copies.append(_diriv_copy(reader, name, copy))
        elif copy.kind is Kind.SIDECAR:
            reader.sidecar_copies.setdefault(copy.original.decode("ascii"), []).append(
                (name, copy))
    for diriv in result.diriv_copies:
        if diriv.iv is not None and diriv.iv != reader.iv \
                and all(diriv.iv != iv for iv, _ in reader.ivs):
            reader.ivs.append((diriv.iv, diriv))
    copied = {c.original for name in reader.present if name.startswith(RESERVED_PREFIX)
              for c in candidates(os.fsencode(name), foreign=True) if c.kind is Kind.LONGNAME}
    for original, found in reader.sidecar_copies.items():
        longname = original[:-len(SIDECAR_SUFFIX)]
        own = read_small(reader.dir_fd, original, SIDECAR_MAX) \
            if original in reader.present else None
        for name, copy in found:
            if own is not None:
                state = "same" if read_small(reader.dir_fd, name, SIDECAR_MAX) == own \
                    else "differs"
            elif longname in reader.present or longname.encode() in copied:
                state = "in-place"
            else:
                state = "orphan"
            result.sidecar_copies.append(SidecarCopy(name, copy, state))


def _retry_longnames(reader: _Reader, result: Directory, failed: list[str]) -> list[str]:
    """Long names whose sidecar is missing or damaged, decoded with a sync
    tool's copy of it; the names still failing."""
    if not reader.sidecar_copies:
        return failed
    rest = []
    for name in failed:
        try:
            plain, _, sidecar = reader.decode(name, reader.iv) if is_longname(name) else \
                (None, None, None)
        except (FileNameError, OSError, UnicodeDecodeError):
            plain = None
        if plain is None:
            rest.append(name)
            continue
        result.real[name] = plain
        reader.taken.add(plain)
        if sidecar is not None:
            result.used_sidecars.add(sidecar)
    return rest


def _diriv_copy(reader: _Reader, name: str, copy: ConflictCopy) -> DirivCopy:
    try:
        data = read_small(reader.dir_fd, name, DIRIV_LEN + 1)
    except OSError as exc:
        return DirivCopy(name, copy, None, str(exc))
    if len(data) != DIRIV_LEN:
        return DirivCopy(name, copy, None, f"{len(data)} bytes, not {DIRIV_LEN}")
    return DirivCopy(name, copy, data)


def _stranded(reader: _Reader, result: Directory,
              failed: list[str]) -> tuple[list[Shown], list[str]]:
    """Names that decode under a diriv copy's IV, shown under their own
    plaintext name unless a real name has it; and the names left."""
    shown: list[Shown] = []
    rest: list[str] = []
    for name in failed:
        try:
            plain, iv, diriv, encoded, _ = reader.decode_any(name, main=False)
        except (FileNameError, OSError, UnicodeDecodeError):
            rest.append(name)
            continue
        assert diriv is not None
        try:
            label = plain if not reader.is_taken(plain) else \
                display_name(plain, diriv.copy, reader.is_taken)
        except ValueError as exc:
            result.foreign.append((name, exc))
            continue
        reader.taken.add(label)
        diriv.used += 1
        shown.append(Shown(BackingName(name, encoded), plain, label, iv, os.fsencode(name),
                           None, diriv.name))
    return shown, rest


def _conflict_copy(reader: _Reader, result: Directory, name: str) -> None:
    """Show ``name`` if it is a conflict copy of an entry whose original
    decodes here; else it is foreign."""
    error: Exception = NameDecodeError(f"{name[:40]!r} does not decrypt in this directory "
                                       "and is no conflict copy of a name that does")
    for copy in candidates(os.fsencode(name), foreign=True):
        if copy.kind not in (Kind.ENCODED, Kind.LONGNAME):
            continue
        original = copy.original.decode("ascii")
        try:
            plain, iv, diriv, _, sidecar = reader.decode_any(original)
            label = display_name(plain, copy, reader.is_taken)
        except (FileNameError, OSError, UnicodeDecodeError, ValueError) as exc:
            error = exc
            continue
        if diriv is not None:
            diriv.used += 1
        if sidecar is not None:
            result.used_sidecars.add(sidecar)
        reader.taken.add(label)
        result.shown.append(Shown(BackingName(name), plain, label, iv, copy.original, copy,
                                  None if diriv is None else diriv.name))
        return
    result.foreign.append((name, error))
