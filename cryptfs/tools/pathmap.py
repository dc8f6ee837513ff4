"""``cryptfs path``: the map between plaintext and backing paths, offline.

To restore one file from a backup or a sync tool's history of the cipher
directory, one needs the backing path that holds it (and, for a long name,
its sidecar); to read a backup tool's report of a changed backing file, the
plaintext path.  Both walk from the root one component at a time, as the
mount does: each directory's IV read from its backing directory (or derived
again where a ``convergent-dirivs`` directory lost it), names sealed and
opened with the key file's name cipher, and names the mount shows although
they do not decode (sync tools' conflict copies, names stranded under a
copy of a directory IV) found through ``names/resolve.py``, so the map
agrees with what the mount shows.

It only reads, takes no lock (a mounted directory or a read-only copy
works) and never leaves the cipher directory: directories are opened by
descriptor with ``O_NOFOLLOW``, so a symlink (whose backing target is
ciphertext anyway) is never followed, as in ``tools/fsck.py``.

``ReversePathMap`` maps the paths of a reverse view the same way, one walk
with another source of names and IVs: the plaintext tree and the key
(docs/format.md §9).  ``forward_mapper`` and ``reverse_mapper`` give a
mount's control socket (daemon/ctlsock.py) these maps' answers.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from cryptfs.daemon.ctlsock import Mapper
from cryptfs.errors import DirIvMissingError, FileNameError, PathNotFoundError, UsageError
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.reverse import REVERSE_KEYFILE_NAME, ReverseDerivation
from cryptfs.lowlevel.linux import DIR_READ
from cryptfs.names.conflicts import Kind
from cryptfs.names.filenames import (
    DIRIV_NAME,
    NAME_MAX,
    RESERVED_PREFIX,
    SIDECAR_SUFFIX,
    NameCipher,
    check_name,
    decode_entry,
    derive_missing_diriv,
    is_longname,
    read_diriv,
    sidecar_name,
)
from cryptfs.names.resolve import Directory, Shown, is_sidecar, resolve


@dataclass(frozen=True)
class Component:
    """One step of a mapped path; paths relative to the cipher directory
    (backing) or its root (plaintext, with a leading ``/``)."""

    plaintext: str
    backing: str
    sidecar: str | None  # a long name's sidecar file (the entry is useless without it)


def plain_parts(path: str) -> list[bytes]:
    """The components of a plaintext path, with or without a leading ``/``."""
    parts = [p for p in os.fsencode(path).split(b"/") if p not in (b"", b".")]
    for part in parts:
        if part == b"..":
            raise UsageError(f"{path!r}: '..' is not allowed in a plaintext path")
        try:
            check_name(part)
        except FileNameError as exc:  # no file can have that name: a bad argument
            raise UsageError(f"{path!r}: {exc}") from exc
    return parts


def backing_parts(cipherdir: str, path: str) -> list[str]:
    """The components of a backing path, relative to ``cipherdir`` or
    absolute inside it (checked lexically: nothing is resolved)."""
    if os.path.isabs(path):
        path = os.path.normpath(path)
        for root in dict.fromkeys((os.path.abspath(cipherdir), os.path.realpath(cipherdir))):
            if path == root or path.startswith(root.rstrip("/") + "/"):
                path = os.path.relpath(path, root)
                break
        else:
            raise UsageError(f"{path} is not inside the cipher directory {cipherdir}")
    return _checked_parts(path, "a backing path")


def _checked_parts(path: str, what: str) -> list[str]:
    """The components of ``path``, each one a name a directory can hold."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == ".." or "\x00" in part or len(os.fsencode(part)) > NAME_MAX:
            raise UsageError(f"{path[:300]!r}: {part[:80]!r} cannot be a component of {what}")
    return parts


def backing_of(steps: list[Component]) -> str:
    return steps[-1].backing if steps else "."


def plaintext_of(steps: list[Component]) -> str:
    return steps[-1].plaintext if steps else "/"


def as_json(steps: list[Component]) -> dict:
    """The answer of ``cryptfs path --json`` and of the control socket."""
    return {"plaintext": plaintext_of(steps), "backing": backing_of(steps),
            "sidecars": [s.sidecar for s in steps if s.sidecar is not None],
            "components": [{"plaintext": s.plaintext, "backing": s.backing,
                            "sidecar": s.sidecar} for s in steps]}


class PathMap:
    """Maps paths of one cipher directory, given its name cipher."""

    def __init__(self, cipherdir: str, names: NameCipher) -> None:
        self.root = os.path.abspath(cipherdir)
        self.names = names

    def encrypt(self, plain_path: str) -> list[Component]:
        """The backing entry of every component of ``plain_path``;
        ``PathNotFoundError`` naming the first one that does not exist."""
        parts = plain_parts(plain_path)
        steps: list[Component] = []
        with self._walk() as walker:
            for i, name in enumerate(parts):
                plain = "/" + os.fsdecode(b"/".join(parts[:i + 1]))
                backing, sidecar, origin = walker.find(name, plain)
                steps.append(walker.component(plain, backing, sidecar))
                if i + 1 < len(parts):
                    walker.enter(backing, plain, origin)
        return steps

    def decrypt(self, backing_path: str) -> list[Component]:
        """The plaintext name of every component of ``backing_path``; a
        sidecar as the last component maps to its entry."""
        parts = self._parts(backing_path)
        steps: list[Component] = []
        with self._walk() as walker:
            for i, backing in enumerate(parts):
                last = i + 1 == len(parts)
                if last:
                    backing = walker.entry_of_sidecar(backing)
                name, sidecar, origin = walker.name_of(backing)
                plain = (steps[-1].plaintext if steps else "") + "/" + os.fsdecode(name)
                steps.append(walker.component(plain, backing, sidecar))
                if not last:
                    walker.enter(backing, plain, origin)
        return steps

    def _parts(self, backing_path: str) -> list[str]:
        return backing_parts(self.root, backing_path)

    def _start(self, fd: int) -> _Walk:
        """The walk at the root, whose descriptor is ``fd``."""
        walker = _Walker(self.names, fd)
        walker.iv = _diriv(fd, "/")
        return walker

    @contextmanager
    def _walk(self) -> Iterator[_Walk]:
        fd = _open_root(self.root)
        try:
            walker = self._start(fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            yield walker
        finally:
            os.close(walker.fd)


Origin = tuple[bytes, bytes]  # (parent IV, plaintext name) a directory's IV derives from


def _open_root(root: str) -> int:
    try:
        return os.open(root, DIR_READ)
    except OSError as exc:
        raise PathNotFoundError(f"cannot open {root}: {exc.strerror}") from exc


class _Walk:
    """The directory a walk is in: its descriptor, IV and backing path.
    ``PathMap`` drives the walk; a subclass says where names and IVs come
    from (the backing directory forward, the plaintext tree in reverse)."""

    def __init__(self, names: NameCipher, fd: int) -> None:
        self.names, self.fd = names, fd
        self.iv = b""
        self.rel = ""  # backing path of this directory, relative to the cipher directory

    def component(self, plain: str, backing: str, sidecar: str | None) -> Component:
        join = os.path.join
        return Component(plain, join(self.rel, backing),
                         None if sidecar is None else join(self.rel, sidecar))

    def find(self, name: bytes, plain: str) -> tuple[str, str | None, Origin]:
        raise NotImplementedError

    def name_of(self, backing: str) -> tuple[bytes, str | None, Origin]:
        raise NotImplementedError

    def entry_of_sidecar(self, backing: str) -> str:
        raise NotImplementedError

    def enter(self, backing: str, plain: str, origin: Origin) -> None:
        raise NotImplementedError

    def _step_into(self, name: str | bytes, backing: str, plain: str) -> None:
        """Replace the walk's descriptor with that of subdirectory ``name``
        (never through a symlink)."""
        try:
            fd = os.open(name, DIR_READ, dir_fd=self.fd)
        except OSError as exc:
            what = "a symlink or not a directory" if exc.errno in (
                errno.ELOOP, errno.ENOTDIR) else exc.strerror
            raise PathNotFoundError(f"{plain}: {what}") from exc
        os.close(self.fd)
        self.fd = fd
        self.rel = os.path.join(self.rel, backing)


class _Walker(_Walk):
    """A walk through a cipher directory (forward)."""

    def find(self, name: bytes, plain: str) -> tuple[str, str | None, Origin]:
        """The backing entry (and sidecar) of plaintext ``name`` here: its
        sealed name, else a name the mount shows for a sync tool's copy."""
        entry = self.names.to_backing(self.iv, name)
        if self._exists(entry.name):
            return entry.name, entry.sidecar_name, (self.iv, name)
        for shown in self._resolve().shown:
            if shown.name == name:
                return shown.backing.name, _shown_sidecar(shown), (shown.iv, shown.plain)
        raise PathNotFoundError(f"{plain}: no such file or directory in the cipher directory "
                                f"(its backing name would be {os.path.join(self.rel, entry.name)})")

    def name_of(self, backing: str) -> tuple[bytes, str | None, Origin]:
        """The name the mount shows for backing entry ``backing`` here."""
        where = os.path.join(self.rel, backing)
        if not self._exists(backing):
            raise PathNotFoundError(f"{where}: no such file or directory")
        try:
            plain = decode_entry(self.names, self.iv, self.fd, backing)
        except (FileNameError, OSError, UnicodeDecodeError):
            pass
        else:
            return plain, _own_sidecar(backing), (self.iv, plain)
        directory = self._resolve()
        if backing in directory.real:  # a long name decoded with a sidecar's copy
            plain = directory.real[backing]
            return plain, _own_sidecar(backing), (self.iv, plain)
        for shown in directory.shown:
            if shown.backing.name == backing:
                return shown.name, _shown_sidecar(shown), (shown.iv, shown.plain)
        if backing.startswith(RESERVED_PREFIX) and not is_longname(backing):
            raise PathNotFoundError(f"{where} is one of cryptfs's own files, not an entry")
        raise PathNotFoundError(f"{where} is not shown in the mount: it does not decrypt in "
                                "its directory (foreign, or moved there from elsewhere)")

    def entry_of_sidecar(self, backing: str) -> str:
        """The long name whose sidecar (or a sync tool's copy of it)
        ``backing`` is; else ``backing`` itself."""
        if is_sidecar(backing):
            return backing[:-len(SIDECAR_SUFFIX)]
        if backing.startswith(RESERVED_PREFIX) and backing != DIRIV_NAME \
                and not is_longname(backing) and self._exists(backing):
            for copy in self._resolve().sidecar_copies:
                if copy.name == backing:
                    return copy.copy.original.decode("ascii")[:-len(SIDECAR_SUFFIX)]
        return backing

    def enter(self, backing: str, plain: str, origin: Origin) -> None:
        """Step into directory ``backing``; its IV read, or derived again."""
        self._step_into(backing, backing, plain)
        self.iv = _diriv(self.fd, plain, self.names, origin)

    def _exists(self, backing: str) -> bool:
        try:
            os.stat(backing, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _resolve(self) -> Directory:
        """The directory as the mount lists it (only read when a name is not
        simply sealed: conflict copies and stranded names need the listing)."""
        return resolve(self.names, self.iv, self.fd, os.listdir(self.fd))


def _own_sidecar(backing: str) -> str | None:
    return sidecar_name(backing) if is_longname(backing) else None


def _shown_sidecar(shown: Shown) -> str | None:
    """A shown long name's sidecar: its own (stranded), or its original's
    (a conflict copy shares the sidecar of the name it copies)."""
    if is_longname(shown.backing.name):
        return sidecar_name(shown.backing.name)
    if shown.copy is not None and shown.copy.kind is Kind.LONGNAME:
        return sidecar_name(shown.copy.original.decode("ascii"))
    return None


def _diriv(fd: int, plain: str, names: NameCipher | None = None,
           origin: Origin | None = None) -> bytes:
    """A directory's IV, derived again if its file is missing and the
    directory is convergent (never written back: this command only reads)."""
    try:
        return read_diriv(fd)
    except DirIvMissingError as exc:
        derived = None if names is None or origin is None else \
            derive_missing_diriv(fd, names, *origin)
        if derived is None:
            raise PathNotFoundError(f"{plain}: directory IV unusable, its names cannot be "
                                    f"decrypted ({exc}; cryptfs fsck says more)") from exc
        return derived.iv
    except (FileNameError, OSError) as exc:
        raise PathNotFoundError(f"{plain}: directory IV unusable, its names cannot be "
                                f"decrypted ({exc}; cryptfs fsck says more)") from exc



# --- reverse mode -------------------------------------------------------------------


class ReversePathMap(PathMap):
    """Maps paths of the reverse view of a plaintext directory (the cipher
    directory a forward mount would have written, docs/format.md "Reverse
    mode") to that directory's paths and back.  Nothing of the view is
    read: its root IV, subdirectory IVs and names follow from the key and
    the plaintext names alone, so the plaintext tree is all that is walked
    (to check that an entry exists, and to find a long name's entry).

    ``hidden(path, st)``: whether the view leaves out the entry at
    ``path`` (relative to PLAINDIR, bytes) whose ``lstat`` is ``st`` (the
    reverse mount's exclusions); by default the view's own rule without
    exclusions: the reverse key file in PLAINDIR's root (and its temporary
    copies), and the key file given as ``config`` wherever in the tree."""

    def __init__(self, plaindir: str, keys: KeyRing, hidden: Hidden | None = None,
                 config: str | None = None) -> None:
        super().__init__(plaindir, NameCipher(keys, convergent=True))
        self.root_iv = ReverseDerivation(keys).root_iv
        self.hidden = hidden or _own_keyfile(config)

    def _parts(self, backing_path: str) -> list[str]:
        """A view path, relative to the view's root (a leading ``/`` is
        the view's root too: the view is mounted anywhere, or copied)."""
        return _checked_parts(backing_path, "a view path")

    def _start(self, fd: int) -> _Walk:
        walker = _ReverseWalker(self.names, fd, self.hidden)
        walker.iv = self.root_iv
        return walker


Hidden = Callable[[bytes, os.stat_result], bool]


def _own_keyfile(config: str | None) -> Hidden:
    """What a reverse view hides when nothing is excluded: its key file."""
    own = os.fsencode(REVERSE_KEYFILE_NAME)
    inode = None
    if config is not None:
        with suppress(OSError):
            st = os.stat(config)
            inode = (st.st_dev, st.st_ino)

    def hidden(path: bytes, st: os.stat_result) -> bool:
        if b"/" not in path and (path == own or path.startswith(own + b".tmp-")):
            return True
        return inode is not None and (st.st_dev, st.st_ino) == inode
    return hidden


class _ReverseWalker(_Walk):
    """A walk through the plaintext tree behind a reverse view: ``fd`` is
    the plaintext directory, ``rel`` the view path of its view directory."""

    def __init__(self, names: NameCipher, fd: int, hidden: Hidden) -> None:
        super().__init__(names, fd)
        self.hidden = hidden
        self.plain = b""  # this directory's path relative to PLAINDIR ("" at the root)

    def find(self, name: bytes, plain: str) -> tuple[str, str | None, Origin]:
        """The view entry (and sidecar) of plaintext ``name``, which must be
        shown in the view."""
        if not self._shown(name):
            raise PathNotFoundError(f"{plain}: no such file or directory in the view")
        entry = self.names.to_backing(self.iv, name)
        return entry.name, entry.sidecar_name, (self.iv, name)

    def name_of(self, backing: str) -> tuple[bytes, str | None, Origin]:
        """The plaintext name of view entry ``backing``: a short name opened
        with the directory's IV; a long name matched against this
        directory's plaintext names (its sidecar is the sealed name of one)."""
        where = os.path.join(self.rel, backing)
        if is_longname(backing):
            name = self._longname(backing)
        elif backing.startswith(RESERVED_PREFIX):
            raise PathNotFoundError(f"{where} is one of cryptfs's own files, not an entry")
        else:
            try:
                name = self.names.decode(self.iv, backing)
            except FileNameError:
                name = None
        if name is None or not self._shown(name):
            raise PathNotFoundError(f"{where}: no such file or directory in the view")
        return name, _own_sidecar(backing), (self.iv, name)

    def entry_of_sidecar(self, backing: str) -> str:
        return backing[:-len(SIDECAR_SUFFIX)] if is_sidecar(backing) else backing

    def enter(self, backing: str, plain: str, origin: Origin) -> None:
        """Step into plaintext directory ``name``; its view IV derived."""
        parent_iv, name = origin
        self._step_into(name, backing, plain)
        self.plain = self._relative(name)
        self.iv = self.names.derived_diriv(parent_iv, name)

    def _relative(self, name: bytes) -> bytes:
        return self.plain + b"/" + name if self.plain else name

    def _shown(self, name: bytes) -> bool:
        """Whether plaintext ``name`` here exists and the view shows it."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return not self.hidden(self._relative(name), st)

    def _longname(self, backing: str) -> bytes | None:
        """The plaintext name here whose long view name is ``backing``."""
        for name in os.listdir(self.fd):
            raw = os.fsencode(name)
            if self.names.to_backing(self.iv, raw).name == backing:
                return raw
        return None


# --- the running mount's answers (daemon/ctlsock.py) ---------------------------------


def mapper_of(pathmap: PathMap) -> Mapper:
    """The control socket's mapper: the offline map, answering in JSON."""
    def answer(op: str, path: str) -> dict:
        steps = pathmap.encrypt(path) if op == "encrypt" else pathmap.decrypt(path)
        return as_json(steps)
    return answer


def forward_mapper(cipherdir: str, names: NameCipher) -> Mapper:
    """A forward mount's mapper; ``names``: a name cipher of its own (the
    mapper runs in a thread of its own, the mount's is the mount's)."""
    return mapper_of(PathMap(cipherdir, names))


def reverse_mapper(plaindir: str, keys: KeyRing, hidden: Hidden) -> Mapper:
    """A reverse mount's mapper; ``hidden``: what its view leaves out, as
    ``cryptfs/reverse/exclude.py Excluder.excluded`` answers it (key file
    included), so the mount's answers follow its exclusions."""
    return mapper_of(ReversePathMap(plaindir, keys, hidden))
