"""``cryptfs fsck --repair``: undo what a sync tool did to a cipher
directory that cryptfs can undo without choosing between versions.

Each backing directory is visited once, top down, by every step of
``STEPS`` in order; a step gets the directory (``Place``) and records what
it changed.  Steps today:

* ``rederive_diriv``: a directory of a ``convergent-dirivs`` cipher
  directory whose ``cryptfs.diriv`` is missing (a sync tool brought it back
  without it) gets the IV mkdir derived for it, written back once one of
  its entries decodes under it (docs/format.md §5.1).
* ``restrand``: names sealed under a losing ``cryptfs.diriv`` copy's IV
  (docs/conflicts.md) are re-encrypted under the directory's IV, under the
  name the mount shows them by (so nothing changes in the mount): renamed
  (with a sidecar first for a long name), a bound symlink re-sealed for
  its new name.  Xattrs need nothing: a directory's are sealed to its own
  IV, a file's to its ID.
* ``drop_diriv_copies``: then removes each diriv copy nothing decodes under.
* ``sidecar_copies``: a copy of a sidecar with the same bytes is removed; one
  that stands in for a missing sidecar becomes the sidecar.

Conflict copies of entries are never touched: they are visible in the
mount and the user decides.  Every step is crash-safe in the same way: the
new name exists (and is synced) before the old one goes, so an interrupted
repair leaves every entry readable and can simply be run again.

To add a repair, write a function ``step(repair, place)`` and put it in
``STEPS`` where it must run (one that sets ``place.iv`` goes first);
``place.iv`` is None while the directory has no usable IV, and the walk
descends only once some step gave it one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cryptfs.errors import FileNameError
from cryptfs.lowlevel.linux import DIR_READ, RENAME_NOREPLACE, renameat2
from cryptfs.names.filenames import (
    DIRIV_NAME,
    SIDECAR_MAX,
    SIDECAR_SUFFIX,
    BackingName,
    NameCipher,
    derive_missing_diriv,
    read_diriv,
    read_small,
    write_derived_diriv,
)
from cryptfs.names.metadata import MetadataCipher, SymlinkPlace
from cryptfs.names.resolve import Directory, Shown, resolve


@dataclass(frozen=True)
class Repaired:
    """One change made (``--json``: kinds are stable)."""

    # diriv-restored, restranded, diriv-removed, sidecar-removed, sidecar-restored, failed
    kind: str
    backing: str  # relative to the cipher directory
    plaintext: str | None
    message: str


@dataclass
class Place:
    """One backing directory as the walk meets it."""

    fd: int
    rel: str  # backing path relative to the cipher directory ("" for the root)
    plain: str  # plaintext path ("/" for the root)
    iv: bytes | None  # None: no usable IV (yet)
    # The parent's IV and this directory's plaintext name as it was made
    # (None for the root): what a convergent IV is derived from.
    origin: tuple[bytes, bytes] | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.rel, name)


Step = Callable[["Repair", Place], None]


class Repair:
    """Runs ``STEPS`` on every directory of a cipher directory that is not
    mounted (the caller holds the mount lock)."""

    def __init__(self, cipherdir: str, names: NameCipher, metadata: MetadataCipher,
                 steps: tuple[Step, ...] | None = None) -> None:
        self.root = os.path.abspath(cipherdir)
        self.names, self.metadata = names, metadata
        self.steps = STEPS if steps is None else steps
        self.done: list[Repaired] = []

    def record(self, kind: str, place: Place, name: str, plaintext: str | None,
               message: str) -> None:
        self.done.append(Repaired(kind, place.path(name) or ".", plaintext, message))

    def resolve(self, place: Place) -> Directory:
        assert place.iv is not None
        return resolve(self.names, place.iv, place.fd, os.listdir(place.fd))

    def run(self) -> list[Repaired]:
        fd = os.open(self.root, DIR_READ)
        try:
            self._visit(Place(fd, "", "/", _iv(fd)))
        finally:
            os.close(fd)
        return self.done

    def _visit(self, place: Place) -> None:
        for step in self.steps:
            try:
                step(self, place)
            except (OSError, FileNameError) as exc:  # this directory's step: report, go on
                self.record("failed", place, "", place.plain, f"{step.__name__}: {exc}")
        if place.iv is None:
            return
        names = self.resolve(place)
        children = [*((backing, plain, (place.iv, plain)) for backing, plain in names.real.items()),
                    *((s.backing.name, s.name, (s.iv, s.plain)) for s in names.shown)]
        for backing, plain, origin in sorted(children):
            try:
                fd = os.open(backing, DIR_READ, dir_fd=place.fd)
            except OSError:  # not a directory (or gone): nothing below it
                continue
            try:
                self._visit(Place(fd, place.path(backing),
                                  os.path.join(place.plain, os.fsdecode(plain)), _iv(fd),
                                  origin))
            finally:
                os.close(fd)


def _iv(fd: int) -> bytes | None:
    try:
        return read_diriv(fd)
    except (OSError, FileNameError):
        return None


# --- steps ---------------------------------------------------------------------------


def rederive_diriv(repair: Repair, place: Place) -> None:
    """A missing IV file (not a damaged one) derived again and written
    back, as the mount does; only where an entry confirms the derived IV
    (an empty directory's real IV may still be on its way)."""
    if place.iv is not None or place.origin is None or not repair.names.convergent:
        return
    try:
        os.stat(DIRIV_NAME, dir_fd=place.fd, follow_symlinks=False)
        return  # there but unusable: not ours to replace
    except FileNotFoundError:
        pass
    derived = derive_missing_diriv(place.fd, repair.names, *place.origin)
    if derived is None or not derived.confirmed:
        return
    if write_derived_diriv(place.fd, derived.iv):
        repair.record("diriv-restored", place, DIRIV_NAME, place.plain,
                      "missing directory IV derived from the directory's name and "
                      "written back")
    place.iv = _iv(place.fd)


def restrand(repair: Repair, place: Place) -> None:
    """Re-encrypt every name that decodes only under a diriv copy's IV (and
    every conflict copy of such a name) under the directory's IV, keeping
    the name the mount shows."""
    if place.iv is None:
        return
    names = repair.resolve(place)
    moved_sidecars = []
    for shown in names.shown:
        if shown.diriv is None:
            continue  # a conflict copy under the main IV: the user's to decide
        new = _move(repair, place, shown)
        repair.record("restranded", place, shown.backing.name,
                      os.path.join(place.plain, os.fsdecode(shown.name)),
                      f"re-encrypted under the directory's IV as {new.name} "
                      f"(was sealed under {shown.diriv})")
        if shown.backing.sidecar is not None:
            moved_sidecars.append(shown.backing.sidecar_name)
    if not moved_sidecars:
        return
    os.fsync(place.fd)  # the new names are durable before an old sidecar goes
    still = repair.resolve(place)
    for sidecar in moved_sidecars:
        assert sidecar is not None
        longname = sidecar[:-len(SIDECAR_SUFFIX)]
        if longname not in still.real and sidecar not in still.used_sidecars and \
                all(s.backing.name != longname for s in still.shown):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sidecar, dir_fd=place.fd)


def _move(repair: Repair, place: Place, shown: Shown) -> BackingName:
    """Give ``shown`` the backing name of its shown name under the main IV."""
    assert place.iv is not None
    old = shown.backing.name
    new = repair.names.to_backing(place.iv, shown.name)
    st = os.stat(old, dir_fd=place.fd, follow_symlinks=False)
    if new.sidecar is not None:
        _write_sidecar(place.fd, new)
    if repair.metadata.bound and stat.S_ISLNK(st.st_mode):
        done = _moved_before(repair, place, shown)
        if done is not None:
            return done
        _move_symlink(repair, place, shown, new, st)
    else:
        renameat2(place.fd, os.fsencode(old), place.fd, os.fsencode(new.name),
                  RENAME_NOREPLACE)
    return new


def _write_sidecar(dir_fd: int, entry: BackingName) -> None:
    """The new long name's sidecar, synced (before the entry is renamed to it)."""
    assert entry.sidecar is not None and entry.sidecar_name is not None
    data = entry.sidecar.encode("ascii")
    try:
        fd = os.open(entry.sidecar_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        if read_small(dir_fd, entry.sidecar_name, SIDECAR_MAX) != data:
            raise OSError(errno.EEXIST, f"{entry.sidecar_name} exists with other contents") \
                from None
        return  # left by an interrupted repair
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _moved_before(repair: Repair, place: Place, shown: Shown) -> BackingName | None:
    """A run interrupted in ``_move_symlink`` left the re-sealed symlink
    under the stranded one's own name (which now takes it, so the stranded
    one is shown with a marker): if it holds the same target, only the old
    one has to go.  Its new name, or None."""
    assert place.iv is not None
    if shown.copy is not None or shown.name == shown.plain:
        return None
    made = repair.names.to_backing(place.iv, shown.plain)
    try:
        existing = os.fsencode(os.readlink(made.name, dir_fd=place.fd))
        same = repair.metadata.decrypt_target(
            existing, SymlinkPlace(place.iv, os.fsencode(made.name))) == _target(repair, place,
                                                                                 shown)
    except (OSError, FileNameError):
        return None
    if not same:
        return None
    os.unlink(shown.backing.name, dir_fd=place.fd)
    return made


def _target(repair: Repair, place: Place, shown: Shown) -> bytes:
    stored = os.fsencode(os.readlink(shown.backing.name, dir_fd=place.fd))
    return repair.metadata.decrypt_target(stored, SymlinkPlace(shown.iv, shown.sealed_as))


def _move_symlink(repair: Repair, place: Place, shown: Shown, new: BackingName,
                  st: os.stat_result) -> None:
    """A bound symlink's target is sealed to its name: the new symlink is
    made (re-sealed) before the old one is unlinked.  After a crash between
    the two, the next run finds the new one holding the same target
    (``_moved_before``; here, if the stranded name was shown with a marker
    and so moved to that name)."""
    assert place.iv is not None
    old = shown.backing.name
    target = _target(repair, place, shown)
    new_place = SymlinkPlace(place.iv, os.fsencode(new.name))
    try:
        os.symlink(repair.metadata.encrypt_target(target, new_place), new.name,
                   dir_fd=place.fd)
    except FileExistsError:
        existing = os.fsencode(os.readlink(new.name, dir_fd=place.fd))
        if repair.metadata.decrypt_target(existing, new_place) != target:
            raise
    with contextlib.suppress(OSError):  # only root may give it away; times are cosmetic
        os.chown(new.name, st.st_uid, st.st_gid, dir_fd=place.fd, follow_symlinks=False)
        os.utime(new.name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=place.fd,
                 follow_symlinks=False)
    os.fsync(place.fd)
    os.unlink(old, dir_fd=place.fd)


def drop_diriv_copies(repair: Repair, place: Place) -> None:
    """Remove each ``cryptfs.diriv`` copy no name decodes under any more
    (after ``restrand``: the moves are synced first)."""
    if place.iv is None:
        return
    os.fsync(place.fd)
    for diriv in repair.resolve(place).diriv_copies:
        if diriv.used:
            continue  # a name still needs it (its move failed): kept, fsck lists it
        os.unlink(diriv.name, dir_fd=place.fd)
        repair.record("diriv-removed", place, diriv.name, place.plain,
                      "a sync tool's copy of the directory IV that no name needs")


def sidecar_copies(repair: Repair, place: Place) -> None:
    """A sidecar copy with the sidecar's bytes is removed; one standing in
    for a missing sidecar (it decodes its long name: the hash matched)
    becomes the sidecar."""
    if place.iv is None:
        return
    names = repair.resolve(place)
    for copy in names.sidecar_copies:
        original = copy.copy.original.decode("ascii")
        if copy.state == "same":
            os.unlink(copy.name, dir_fd=place.fd)
            repair.record("sidecar-removed", place, copy.name, place.plain,
                          f"the same bytes as {original}")
        elif copy.state == "in-place" and copy.name in names.used_sidecars:
            renameat2(place.fd, os.fsencode(copy.name), place.fd, os.fsencode(original),
                      RENAME_NOREPLACE)
            repair.record("sidecar-restored", place, copy.name, place.plain,
                          f"put back as the missing {original}")
    os.fsync(place.fd)


STEPS: tuple[Step, ...] = (rederive_diriv, restrand, drop_diriv_copies, sidecar_copies)


def print_repairs(done: list[Repaired], out: Callable[[str], None] = print) -> None:
    for r in done:
        where = f"{r.plaintext} (backing {r.backing})" if r.plaintext else f"backing {r.backing}"
        out(f"repaired {r.kind}: {where}: {r.message}")


def as_json(done: list[Repaired]) -> list[dict]:
    return [asdict(r) for r in done]
