"""``cryptfs fsck``: check a whole cipher directory, offline.

Walks every backing directory and checks its IV, every name (including
long-name sidecars and orphans), every regular file's size, header and pages
(the final page's trailer is the check XTS allows; in an authenticated
directory every page's tag, each failing page reported, and pages that turn
up in another place are named), every symlink target and every user.*
extended attribute.  Each problem is reported with the backing
path and, where it could be decrypted, the plaintext path.  Sync-tool
conflict copies and names stranded under a copy of a directory IV are read
as the mount reads them (``names/resolve.py``) and listed with their
plaintext names.  It only reads (``tools/repair.py`` is ``--repair``).

A directory whose IV file is missing but derivable (``convergent-dirivs``,
docs/format.md §5.1) is reported as ``diriv-missing`` and checked with the
derived IV (``--repair`` writes it back: ``tools/repair.py``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from cryptfs.content.codec import ContentCodec
from cryptfs.content.tags import BadPage
from cryptfs.daemon.lock import LOCK_NAME
from cryptfs.engines.base import PAGE_SIZE
from cryptfs.errors import (
    BackingSizeError,
    CryptfsError,
    DirIvMissingError,
    FileNameError,
    HeaderAuthError,
    HeaderCorruptError,
    HeaderVersionError,
    PageTagError,
    TrailerError,
)
from cryptfs.fs.tree import SYMLINK_TMP_PREFIX, read_xattr_owner
from cryptfs.keys.keyfile import KEYFILE_NAME, is_stale_copy
from cryptfs.lowlevel.linux import DIR_READ, proc_path
from cryptfs.names.conflicts import ConflictCopy
from cryptfs.names.filenames import (
    DIRIV_NAME,
    SIDECAR_SUFFIX,
    NameCipher,
    decode_entry,
    derive_missing_diriv,
    is_longname,
    read_diriv,
)
from cryptfs.names.metadata import MetadataCipher, SymlinkPlace, XattrOwner
from cryptfs.names.resolve import Directory, Shown, resolve
from cryptfs.names.synctools import sync_tool_file

# Problem kinds are part of the --json output: keep them stable.
CONTENT_KINDS = {HeaderAuthError: "header-mac", HeaderCorruptError: "header",
                 HeaderVersionError: "version", TrailerError: "final-page",
                 BackingSizeError: "size", PageTagError: "page-tag"}
CHUNK = 256 * PAGE_SIZE  # 1 MiB per read while checking contents
OWN_FILES = {KEYFILE_NAME, LOCK_NAME}
PAGES_PER_FILE = 16  # failing pages reported one by one per file; the rest counted
MOVED_CANDIDATES = 256  # failing pages kept to look for pages moved elsewhere


@dataclass(frozen=True)
class Problem:
    kind: str  # diriv, diriv-missing, name, sidecar, symlink, xattr, size, header, header-mac,
    #            version, final-page, io, stale-keyfile, leftover; authenticated
    #            directories also tag-missing, page-zeroed, page-moved, page-tag,
    #            truncated; sync tools' copies: conflict, stranded, conflict-diriv,
    #            conflict-sidecar
    #            (stable: scripts read --json)
    backing: str
    plaintext: str | None
    message: str
    # conflict copies: tool, date, time, device, original (plaintext path), shown
    details: dict[str, str | None] = field(default_factory=dict)


class Progress:
    """Files, bytes, rate and ETA on stderr, at most a few times a second."""

    def __init__(self, total_files: int, total_bytes: int, enabled: bool) -> None:
        self.total_files, self.total_bytes = total_files, total_bytes
        self.files = self.bytes = 0
        self.enabled = enabled
        self._start = self._last = time.monotonic()

    def add(self, files: int = 0, nbytes: int = 0) -> None:
        self.files += files
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.25:
            self._last = now
            self._show(now)

    def _show(self, now: float, end: str = "\r") -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.bytes / elapsed
        left = (self.total_bytes - self.bytes) / rate if rate else 0
        sys.stderr.write(f"fsck: {self.files}/{self.total_files} files, "
                         f"{self.bytes >> 20}/{self.total_bytes >> 20} MiB, "
                         f"{rate / 1e6:.0f} MB/s, ETA {left:.0f} s   {end}")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            self._show(time.monotonic(), end="\n")




class Checker:
    """Walks the backing tree through directory descriptors (one open per
    level of depth), so no check depends on the length of a backing path;
    an unreadable directory or file is reported and the walk goes on."""

    def __init__(self, cipherdir: str, codec: ContentCodec, names: NameCipher,
                 metadata: MetadataCipher, progress: bool = False) -> None:
        self.root = os.path.abspath(cipherdir)
        self.codec, self.names, self.metadata = codec, names, metadata
        self.problems: list[Problem] = []
        # Authenticated mode: failing pages, to recognise one that was moved
        # (it matches the tag of the place it came from): (file ID, page, problem).
        self._failed: list[tuple[bytes, BadPage, Problem]] = []
        files, size = 0, 0
        for _dirpath, _dirs, filenames, dir_fd in os.fwalk(self.root):
            for name in filenames:
                files += 1
                with contextlib.suppress(OSError):
                    size += os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size
        self.progress = Progress(files, size, progress)

    def report(self, kind: str, backing: str, plaintext: str | None, message: str,
               details: dict[str, str | None] | None = None) -> None:
        """``backing``: the path relative to the cipher directory."""
        self.problems.append(Problem(kind, backing or ".", plaintext, message, details or {}))

    def run(self) -> list[Problem]:
        try:
            fd = os.open(self.root, DIR_READ)
        except OSError as exc:
            self.report("io", "", "/", f"cipher directory unreadable: {exc}")
        else:
            try:
                self._check_dir(fd, "", "/")
            finally:
                os.close(fd)
        self._find_moved_pages()
        self.progress.done()
        return self.problems

    def _find_moved_pages(self) -> None:
        """A failing page whose bytes carry a valid tag for another failing
        place (another page of this file or of another file: its tag there,
        or the tag that came along with it) was moved or swapped: say so
        instead of a bare tag failure."""
        tagger = self.codec.tagger
        if tagger is None:
            return
        for file_id, bad, problem in self._failed:
            for other_id, other, other_problem in self._failed:
                if (other_id, other.page) == (file_id, bad.page):
                    continue
                tag = tagger.tag(other_id, other.page, other.final_size, bad.unit)
                if tag in (other.stored, bad.stored):
                    where = "this file" if other_id == file_id else \
                        other_problem.plaintext or other_problem.backing
                    self.problems[self.problems.index(problem)] = Problem(
                        "page-moved", problem.backing, problem.plaintext,
                        f"page {bad.page} holds page {other.page} of {where} "
                        "(pages swapped or moved)")
                    break

    def _check_dir(self, fd: int, rel: str, plain: str,
                   origin: tuple[bytes, bytes] | None = None) -> None:
        """``origin``: the parent's IV and this directory's plaintext name
        (None for the root, or a name that does not decrypt)."""
        try:
            dir_iv = read_diriv(fd)
        except (OSError, FileNameError) as exc:
            derived = self._derive_diriv(fd, rel, plain, origin, exc)
            if derived is None:
                return
            dir_iv = derived
        try:
            entries = sorted(os.listdir(fd))
        except OSError as exc:
            self.report("io", rel, plain, f"directory unreadable: {exc}")
            return
        present = set(entries)
        names = self._sync_copies(fd, rel, plain, dir_iv, entries)
        shown = {s.backing.name: s for s in names.shown}
        for name in entries:
            child = os.path.join(rel, name)
            if name == DIRIV_NAME or (rel == "" and name in OWN_FILES) or name in names.hidden:
                continue
            if name not in shown and name not in names.real and self._sync_tool_file(child, name):
                continue
            if name.startswith(SYMLINK_TMP_PREFIX):
                self.report("leftover", child, None, "temporary symlink of an interrupted "
                            "rename (the symlink is still at its old or new name): delete it")
                continue
            if rel == "" and is_stale_copy(name):
                self.report("stale-keyfile", child, None, "an old copy of the key file: it "
                            "opens with passwords changed or removed since (mounting "
                            "read-write or any key command deletes it)")
                continue
            if name.endswith(SIDECAR_SUFFIX) and is_longname(name[:-len(SIDECAR_SUFFIX)]):
                if name[:-len(SIDECAR_SUFFIX)] not in present and name not in names.used_sidecars:
                    self.report("sidecar", child, None, "long-name sidecar without its entry")
                self.progress.add(files=1, nbytes=self._size(fd, name))
                continue
            place = SymlinkPlace(dir_iv, os.fsencode(name))
            if name in shown:
                plain_name: bytes | None = shown[name].name
                place = SymlinkPlace(shown[name].iv, shown[name].sealed_as)
            else:
                plain_name = names.real.get(name) or self._decode(fd, child, name, dir_iv, present)
            child_plain = None if plain_name is None else \
                os.path.join(plain, os.fsdecode(plain_name))
            try:
                self._check_entry(fd, name, child, child_plain, place)
            except OSError as exc:  # vanished or unreadable: report, go on
                self.report("io", child, child_plain, str(exc))

    def _sync_tool_file(self, child: str, name: str) -> bool:
        """A sync tool's own file: housekeeping is not reported, a temporary
        is (a transfer under way or cut off: check again once it is done)."""
        found = sync_tool_file(name)
        if found is not None and found.temporary:
            self.report("sync-temporary", child, None,
                        f"a temporary file of {found.tool} (a transfer in progress, or cut "
                        "off): not cryptfs data; check again once the sync is done")
        return found is not None

    def _sync_copies(self, fd: int, rel: str, plain: str, dir_iv: bytes,
                     entries: list[str]) -> Directory:
        """Read the directory as the mount does; list every sync-tool copy
        and every name stranded under a diriv copy."""
        names = resolve(self.names, dir_iv, fd, entries)
        for shown in names.shown:
            self._report_shown(rel, plain, shown)
        for diriv in names.diriv_copies:
            state = (f"unusable ({diriv.error}): --repair removes it" if diriv.iv is None
                     else f"{diriv.used} names decode only under it: --repair re-encrypts "
                     "them under the directory's IV, then removes it" if diriv.used
                     else "no name decodes under it: --repair removes it")
            self.report("conflict-diriv", os.path.join(rel, diriv.name), plain,
                        f"a sync tool's copy of the directory IV ({diriv.copy.tool.value}); "
                        f"{state}", _marker(diriv.copy))
        for sidecar in names.sidecar_copies:
            self.report("conflict-sidecar", os.path.join(rel, sidecar.name), plain,
                        f"a sync tool's copy of a long name's sidecar: {_SIDECAR[sidecar.state]}",
                        _marker(sidecar.copy))
        return names

    def _report_shown(self, rel: str, plain: str, shown: Shown) -> None:
        child = os.path.join(rel, shown.backing.name)
        path = os.path.join(plain, os.fsdecode(shown.name))
        original = os.path.join(plain, os.fsdecode(shown.plain))
        under = "" if shown.diriv is None else f", its name sealed under {shown.diriv}"
        if shown.copy is None:
            self.report("stranded", child, path,
                        f"name sealed under {shown.diriv}, a sync tool's copy of the "
                        "directory IV (shown in the mount): --repair re-encrypts it",
                        {"shown": os.fsdecode(shown.name), "original": original})
            return
        copy = shown.copy
        when = " ".join(x for x in (copy.date, copy.time) if x)
        device = f" from {os.fsdecode(copy.device)}" if copy.device else ""
        self.report("conflict", child, path,
                    f"{copy.tool.value} conflict copy of {original}{device}"
                    f"{' (' + when + ')' if when else ''}{under}: shown beside it in the "
                    "mount; keep, rename or delete it there",
                    {**_marker(copy), "original": original, "shown": os.fsdecode(shown.name)})

    def _derive_diriv(self, fd: int, rel: str, plain: str,
                      origin: tuple[bytes, bytes] | None, exc: Exception) -> bytes | None:
        """The IV to check a directory without a usable IV file with: its
        derived IV, reported as ``diriv-missing``; None (reported as
        ``diriv``) where there is none."""
        derived = None
        if isinstance(exc, DirIvMissingError) and origin is not None:
            try:
                derived = derive_missing_diriv(fd, self.names, *origin)
            except OSError as err:
                self.report("io", rel, plain, f"directory unreadable: {err}")
                return None
        if derived is None:
            hint = " (convergent IVs: it cannot be derived from its name, so it was " \
                "renamed since it was made)" if self.names.convergent and origin else ""
            self.report("diriv", rel, plain, f"directory IV unusable, names lost: {exc}{hint}")
            return None
        self.report("diriv-missing", rel, plain,
                    f"{DIRIV_NAME} is missing but derivable from the directory's name "
                    "(convergent IVs); its entries were checked with the derived IV, which "
                    "--repair, or a read-write mount using the directory, writes back")
        return derived.iv

    @staticmethod
    def _size(dir_fd: int, name: str) -> int:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size

    def _decode(self, dir_fd: int, child: str, name: str, dir_iv: bytes,
                present: set[str]) -> bytes | None:
        if is_longname(name) and name + SIDECAR_SUFFIX not in present:
            self.report("sidecar", child, None, "long name without its sidecar")
            return None
        try:
            return decode_entry(self.names, dir_iv, dir_fd, name)
        except (FileNameError, OSError) as exc:
            self.report("name", child, None, f"name does not decrypt: {exc}")
            return None

    def _check_entry(self, dir_fd: int, name: str, child: str, plain: str | None,
                     place: SymlinkPlace) -> None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            self._check_xattrs(dir_fd, name, child, plain, st)
            try:
                fd = os.open(name, DIR_READ, dir_fd=dir_fd)
            except OSError as exc:
                self.report("io", child, plain, f"directory unreadable: {exc}")
                return
            origin = None if plain is None else \
                (place.dir_iv, os.fsencode(os.path.basename(plain)))
            try:
                self._check_dir(fd, child, plain or "?", origin)
            finally:
                os.close(fd)
            return
        self.progress.add(files=1)
        if stat.S_ISLNK(st.st_mode):
            try:
                self.metadata.decrypt_target(os.fsencode(os.readlink(name, dir_fd=dir_fd)),
                                             place)
            except FileNameError as exc:
                self.report("symlink", child, plain, str(exc))
            return
        self._check_xattrs(dir_fd, name, child, plain, st)
        if stat.S_ISREG(st.st_mode):
            self._check_file(dir_fd, name, child, plain, st.st_size)

    def _check_xattrs(self, dir_fd: int, name: str, child: str, plain: str | None,
                      st: os.stat_result) -> None:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return
        try:
            path = proc_path(fd)
            try:
                stored_names = [n for n in os.listxattr(path) if n.startswith("user.")]
            except OSError:
                return
            owner: XattrOwner | None = None
            if stored_names and self.metadata.bound:
                try:
                    owner = read_xattr_owner(dir_fd, name, st, self.codec)
                except (CryptfsError, OSError) as exc:
                    self.report("xattr", child, plain, f"attributes cannot be checked: {exc}")
                    return
            for stored in stored_names:
                try:
                    self.metadata.decrypt_xattr_name(os.fsencode(stored), owner)
                    value = os.getxattr(path, stored)
                    self.metadata.decrypt_xattr_value(os.fsencode(stored), value, owner)
                except (FileNameError, OSError) as exc:
                    self.report("xattr", child, plain, f"{stored}: {exc}")
        finally:
            os.close(fd)

    def _check_file(self, dir_fd: int, name: str, child: str, plain: str | None,
                    stored: int) -> None:
        try:
            size = self.codec.plaintext_size(stored)
        except CryptfsError as exc:
            self.report("size", child, plain, str(exc))
            return
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            self.report("io", child, plain, str(exc))
            return
        try:
            file = self.codec.open(fd)
            if self.codec.tagger is not None:
                if file.header is not None:
                    self._check_tags(file.bad_pages(size), file.header.file_id, child, plain)
                self.progress.add(nbytes=size)
                return
            for offset in range(0, size, CHUNK):
                file.read(offset, CHUNK, size)
                self.progress.add(nbytes=min(CHUNK, size - offset))
        except CryptfsError as exc:
            kind = exc.kind if isinstance(exc, PageTagError) else \
                CONTENT_KINDS.get(type(exc), "content")
            self.report(kind, child, plain, str(exc))
        except OSError as exc:
            self.report("io", child, plain, str(exc))
        finally:
            os.close(fd)

    def _check_tags(self, bad: list[BadPage], file_id: bytes, child: str,
                    plain: str | None) -> None:
        for page in bad[:PAGES_PER_FILE]:
            self.report(page.kind, child, plain, page.message())
            if len(self._failed) < MOVED_CANDIDATES:
                self._failed.append((file_id, page, self.problems[-1]))
        if len(bad) > PAGES_PER_FILE:
            self.report("page-tag", child, plain,
                        f"and {len(bad) - PAGES_PER_FILE} more pages fail their tag check")


_SIDECAR = {
    "same": "the same bytes as the sidecar (redundant: --repair removes it)",
    "in-place": "its sidecar is missing: it stands in for it (--repair puts it back)",
    "differs": "different bytes from the sidecar it copies (unused)",
    "orphan": "no long name uses it",
}


def _marker(copy: ConflictCopy) -> dict[str, str | None]:
    return {"tool": copy.tool.value, "date": copy.date, "time": copy.time,
            "device": None if copy.device is None else os.fsdecode(copy.device)}


def print_report(problems: list[Problem], out: Callable[[str], None] = print) -> None:
    for p in problems:
        where = f"{p.plaintext} (backing {p.backing})" if p.plaintext else f"backing {p.backing}"
        out(f"{p.kind}: {where}: {p.message}")


def as_json(problems: list[Problem]) -> list[dict]:
    return [asdict(p) for p in problems]



