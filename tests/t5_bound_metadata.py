"""Symlink targets and xattrs bound to their entry (key file feature
``bound-metadata``): swapping or copying them between entries is detected
on a real mount (EIO) and by fsck; renames, hard links and crashes keep
them readable; version-1 directories keep working read-write in their own
encoding.  Only AES-SIV from ``cryptography`` is involved: one engine."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cryptfs.fs.tree import SYMLINK_TMP_PREFIX
from cryptfs.keys.keyfile import FEATURE_BOUND_METADATA, FEATURE_CONVERGENT_DIRIVS, KeyFile
from cryptfs.lowlevel.linux import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from tests.conftest import (
    Mount,
    backing_entry_of,
    fsck_problems,
    init_cipherdir,
    init_v1_cipherdir,
    small_tmpfs,
)
from tests.helpers.checks import raises_errno

pytestmark = pytest.mark.fuse


def unmounted(tmp_path: Path, bound: bool) -> Iterator[Mount]:
    passfile, cipher = tmp_path / "pw", tmp_path / "cipher"
    (init_cipherdir if bound else init_v1_cipherdir)(cipher, passfile)
    mount = Mount(cipher, tmp_path / "plain", passfile, "openssl")
    try:
        yield mount
    finally:
        mount.stop()


@pytest.fixture(params=["bound", "v1"])
def fmt(request, tmp_path):
    """An unmounted cipher directory of either format (tests damage the
    backing files between mounts)."""
    yield from unmounted(tmp_path, request.param == "bound")


@pytest.fixture
def bound(tmp_path):
    yield from unmounted(tmp_path, True)


def user_xattrs(path: Path) -> list[str]:
    return [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")]


def stop_clean(mount: Mount) -> None:
    """Unmount; the log is clean and fsck finds nothing."""
    mount.stop()
    mount.check_log()
    assert fsck_problems(mount) == []


def rename2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2) on two paths."""
    at_fdcwd = -100
    renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags)


def test_init_writes_the_flag(fmt, request):
    features = KeyFile.load(fmt.cipherdir).features
    assert features == ([FEATURE_BOUND_METADATA, FEATURE_CONVERGENT_DIRIVS]
                        if "bound" in request.node.name else [])


def test_swapped_symlink_targets(fmt):
    """Bound: both symlinks read EIO and fsck reports both.  Version 1: the
    swap goes unnoticed (the documented weakness)."""
    fmt.start()
    plain = fmt.mountpoint
    a = backing_entry_of(fmt, lambda: os.symlink("target-a", plain / "a"))
    b = backing_entry_of(fmt, lambda: os.symlink("target-b", plain / "b"))
    fmt.stop()
    stored_a, stored_b = os.readlink(a), os.readlink(b)
    os.unlink(a)
    os.unlink(b)
    os.symlink(stored_b, a)
    os.symlink(stored_a, b)
    fmt.start()
    if KeyFile.load(fmt.cipherdir).features:
        raises_errno(errno.EIO, os.readlink, plain / "a")
        raises_errno(errno.EIO, os.readlink, plain / "b")
        fmt.stop()
        fmt.check_log(allowed=("symlink target does not decrypt",))
        assert fsck_problems(fmt) == [("symlink", "/a"), ("symlink", "/b")]
    else:
        assert os.readlink(plain / "a") == "target-b"
        fmt.stop()
        assert fsck_problems(fmt) == []


def test_xattr_value_copied_to_another_file(fmt):
    fmt.start()
    plain = fmt.mountpoint
    one = backing_entry_of(fmt, lambda: (plain / "one").write_text("1"))
    two = backing_entry_of(fmt, lambda: (plain / "two").write_text("2"))
    os.setxattr(plain / "one", "user.note", b"secret of one")
    os.setxattr(plain / "two", "user.note", b"two")
    fmt.stop()
    (name_one,), (name_two,) = user_xattrs(one), user_xattrs(two)
    os.setxattr(two, name_two, os.getxattr(one, name_one))
    fmt.start()
    if KeyFile.load(fmt.cipherdir).features:
        assert name_one != name_two  # equal names no longer show across files
        raises_errno(errno.EIO, os.getxattr, plain / "two", "user.note")
        assert os.getxattr(plain / "one", "user.note") == b"secret of one"
        fmt.stop()
        fmt.check_log(allowed=("xattr value does not decrypt",))
        assert fsck_problems(fmt) == [("xattr", "/two")]
    else:
        assert name_one == name_two  # the version-1 leak
        assert os.getxattr(plain / "two", "user.note") == b"secret of one"
        fmt.stop()
        assert fsck_problems(fmt) == []


def test_xattr_copied_whole_to_another_entry(bound):
    """Name and value copied together from a file onto a directory: the name
    does not decrypt there, so the mount does not show it (as for foreign
    attributes such as rsync --fake-super's) and fsck reports it."""
    bound.start()
    plain = bound.mountpoint
    one = backing_entry_of(bound, lambda: (plain / "one").write_text("1"))
    sub = backing_entry_of(bound, lambda: (plain / "sub").mkdir())
    os.setxattr(plain / "one", "user.note", b"secret of one")
    bound.stop()
    (name,) = user_xattrs(one)
    os.setxattr(sub, name, os.getxattr(one, name))
    bound.start()
    assert os.listxattr(plain / "sub") == []
    raises_errno(errno.ENODATA, os.getxattr, plain / "sub", "user.note")
    bound.stop()
    assert fsck_problems(bound) == [("xattr", "/sub")]


def test_renamed_symlinks_are_resealed(bound):
    """Rename within and across directories, over a file, with
    RENAME_NOREPLACE, with a long name; a directory's rename needs no
    re-sealing.  Nothing is left behind and fsck is clean."""
    bound.start()
    plain = bound.mountpoint
    (plain / "d").mkdir()
    os.symlink("somewhere/else", plain / "s")
    os.lchown(plain / "s", os.getuid(), os.getgid())
    os.utime(plain / "s", ns=(1_000_000_000, 2_000_000_000), follow_symlinks=False)
    ino = os.lstat(plain / "s").st_ino
    os.rename(plain / "s", plain / "s2")
    os.rename(plain / "s2", plain / "d" / "s3")
    st = os.lstat(plain / "d" / "s3")
    assert (st.st_ino, st.st_mtime_ns) == (ino, 2_000_000_000)  # same file to the user
    (plain / "file").write_text("replaced")
    os.rename(plain / "d" / "s3", plain / "file")
    os.symlink("x", plain / "taken")
    raises_errno(errno.EEXIST, rename2, plain / "file", plain / "taken", RENAME_NOREPLACE)
    rename2(plain / "file", plain / "free", RENAME_NOREPLACE)
    os.rename(plain / "free", plain / ("L" * 200))
    os.rename(plain / "d", plain / "e")
    os.symlink("in e", plain / "e" / "inner")
    os.rename(plain / "e", plain / "f")
    assert os.readlink(plain / ("L" * 200)) == "somewhere/else"
    assert os.readlink(plain / "f" / "inner") == "in e"
    assert sorted(os.listdir(plain)) == ["L" * 200, "f", "taken"]
    raises_errno(errno.EINVAL, rename2, plain / "taken", plain / "f", RENAME_EXCHANGE)
    bound.stop()
    assert not [p for p in bound.cipherdir.rglob(SYMLINK_TMP_PREFIX + "*")]
    bound.start()  # a fresh mount (no caches) reads them all
    assert os.readlink(plain / ("L" * 200)) == "somewhere/else"
    assert os.lstat(plain / ("L" * 200)).st_size == len("somewhere/else")
    stop_clean(bound)


def test_hard_link_to_a_symlink_is_a_resealed_copy(fmt):
    fmt.start()
    plain = fmt.mountpoint
    (plain / "d").mkdir()
    os.symlink("the target", plain / "s")
    os.link(plain / "s", plain / "d" / "h", follow_symlinks=False)
    assert os.readlink(plain / "d" / "h") == os.readlink(plain / "s") == "the target"
    same = os.lstat(plain / "s").st_ino == os.lstat(plain / "d" / "h").st_ino
    assert same == (not KeyFile.load(fmt.cipherdir).features)  # v1: a real hard link
    os.unlink(plain / "s")
    assert os.readlink(plain / "d" / "h") == "the target"
    stop_clean(fmt)


def test_xattrs_follow_files_through_rename_and_hard_links(fmt):
    fmt.start()
    plain = fmt.mountpoint
    (plain / "f").write_text("data")
    (plain / "d").mkdir()
    os.setxattr(plain / "f", "user.a", b"file attribute")
    os.setxattr(plain / "d", "user.a", b"dir attribute")
    os.link(plain / "f", plain / "d" / "link")
    os.rename(plain / "f", plain / "d" / "moved")
    os.rename(plain / "d", plain / "e")
    assert os.getxattr(plain / "e" / "link", "user.a") == b"file attribute"
    assert os.getxattr(plain / "e" / "moved", "user.a") == b"file attribute"
    assert os.getxattr(plain / "e", "user.a") == b"dir attribute"
    with open(plain / "e" / "moved", "r+b") as f:  # an open file: its header is in memory
        os.setxattr(plain / "e" / "moved", "user.b", b"set while open")
        f.write(b"more")
        assert sorted(os.listxattr(plain / "e" / "link")) == ["user.a", "user.b"]
    os.removexattr(plain / "e" / "link", "user.a")
    assert os.listxattr(plain / "e" / "moved") == ["user.b"]
    raises_errno(errno.ENODATA, os.getxattr, plain / "e" / "moved", "user.a")
    stop_clean(fmt)


def outcome(call: Callable[[], object]) -> object:
    """What a call returns, or the errno it fails with."""
    try:
        return call()
    except OSError as exc:
        return errno.errorcode[exc.errno]


def user_xattr_answers(path: Path) -> list[object]:
    """Every user.* xattr call on ``path`` itself (never a symlink's target)."""
    return [outcome(lambda: os.getxattr(path, "user.x", follow_symlinks=False)),
            outcome(lambda: os.listxattr(path, follow_symlinks=False)),
            outcome(lambda: os.setxattr(path, "user.x", b"v", follow_symlinks=False)),
            outcome(lambda: os.removexattr(path, "user.x", follow_symlinks=False)),
            subprocess.run(["getfattr", "-h", "-d", "-m", "-", path],
                           capture_output=True).returncode]


def test_symlinks_and_fifos_answer_xattr_calls_as_linux_does(fmt, tmp_path):
    """Linux keeps no user.* attributes on symlinks or fifos: reading finds
    none (ENODATA, an empty list), setting or removing one is EPERM.  Both
    formats answer as a plain tmpfs does.  (The kernel answers all but
    listxattr itself before asking the daemon; t3_ops checks the daemon's
    own answers.)"""
    fmt.start()
    with small_tmpfs(tmp_path / "tmpfs", "1M") as plain:
        expected = {}
        for where in (plain, fmt.mountpoint):
            os.symlink("target", where / "s")
            os.mkfifo(where / "p")
            (where / "target").write_text("t")
            os.setxattr(where / "target", "user.x", b"on the target")
            answers = {name: user_xattr_answers(where / name) for name in ("s", "p")}
            expected = expected or answers
            assert answers == expected, where
    assert expected["s"] == ["ENODATA", [], "EPERM", "EPERM", 0]
    assert os.getxattr(fmt.mountpoint / "s", "user.x") == b"on the target"  # followed
    stop_clean(fmt)


def test_xattr_on_a_file_without_header(bound):
    """A regular file that was never written has no header and so no ID:
    setting an attribute gives it a header first."""
    bound.start()
    plain = bound.mountpoint
    backing = backing_entry_of(bound, lambda: (plain / "empty").write_bytes(b""))
    bound.stop()
    os.truncate(backing, 0)  # as a crash right after creating it leaves it
    bound.start()
    assert os.listxattr(plain / "empty") == []
    raises_errno(errno.ENODATA, os.getxattr, plain / "empty", "user.x")
    os.setxattr(plain / "empty", "user.x", b"now it has an ID")
    assert os.getxattr(plain / "empty", "user.x") == b"now it has an ID"
    assert (plain / "empty").read_bytes() == b""
    bound.stop()
    assert backing.stat().st_size == 4096
    bound.check_log()
    assert fsck_problems(bound) == []


def test_first_xattr_of_an_empty_file_open_read_only(bound):
    """The header that a never-written file's first xattr needs is written
    while the file is open (read-only here) elsewhere; nothing else changes."""
    bound.start()
    plain = bound.mountpoint
    (plain / "empty").touch()
    fd = os.open(plain / "empty", os.O_RDONLY)
    try:
        os.setxattr(plain / "empty", "user.x", b"set while open")
        assert os.getxattr(plain / "empty", "user.x") == b"set while open"
        assert os.read(fd, 100) == b"" and os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    stop_clean(bound)
    bound.start()
    assert os.getxattr(plain / "empty", "user.x") == b"set while open"
    assert (plain / "empty").read_bytes() == b""
    stop_clean(bound)


def test_interrupted_symlink_rename_leaves_a_reported_temporary(bound):
    """A crash after the re-sealed symlink was made but before it was
    renamed leaves a reserved temporary: listings skip it, fsck reports it."""
    bound.start()
    plain = bound.mountpoint
    os.symlink("t", plain / "s")
    bound.stop()
    stray = bound.cipherdir / (SYMLINK_TMP_PREFIX + "0123456789abcdef")
    os.symlink("AAAA", stray)
    bound.start()
    assert os.listdir(plain) == ["s"]
    bound.stop()
    bound.check_log()
    assert fsck_problems(bound) == [("leftover", None)]


def test_version_1_directory_reads_and_writes(tmp_path):
    """A directory without the flag keeps the version-1 encoding for what
    it already holds and for everything written to it now."""
    passfile, cipher = tmp_path / "pw", tmp_path / "cipher"
    init_v1_cipherdir(cipher, passfile)
    mount = Mount(cipher, tmp_path / "plain", passfile, "openssl").start()
    plain = mount.mountpoint
    try:
        os.symlink("old target", plain / "s")
        (plain / "f").write_text("x")
        (plain / "g").write_text("y")
        os.setxattr(plain / "f", "user.same", b"v")
        os.setxattr(plain / "g", "user.same", b"w")
        os.rename(plain / "s", plain / "s2")
    finally:
        mount.stop()
    names = {n for p in cipher.iterdir() for n in user_xattrs(p)}
    assert len(names) == 1  # the version-1 name encoding: equal on every file
    mount.start()
    try:
        assert os.readlink(plain / "s2") == "old target"
        assert os.getxattr(plain / "g", "user.same") == b"w"
    finally:
        mount.stop()
    mount.check_log()
    assert KeyFile.load(cipher).features == []


def test_authenticated_directories_bind_metadata_too(tmp_path):
    """``init --authenticated`` writes both flags; the bound encoding works
    beside page tags (a renamed symlink is re-sealed, an xattr has an owner,
    an empty file given a header for its first xattr stays empty)."""
    passfile, cipher = tmp_path / "pw", tmp_path / "cipher"
    init_cipherdir(cipher, passfile, "--authenticated")
    assert KeyFile.load(cipher).features == ["authenticated", FEATURE_BOUND_METADATA,
                                             FEATURE_CONVERGENT_DIRIVS]
    mount = Mount(cipher, tmp_path / "plain", passfile, "openssl")
    try:
        mount.start()
        plain = mount.mountpoint
        (plain / "f").write_text("tagged")
        os.setxattr(plain / "f", "user.a", b"bound")
        os.symlink("f", plain / "s")
        (plain / "d").mkdir()
        os.rename(plain / "s", plain / "d" / "s")
        assert os.readlink(plain / "d" / "s") == "f"
        assert os.getxattr(plain / "f", "user.a") == b"bound"
        (plain / "empty").touch()  # no header yet: the xattr gives it one
        os.setxattr(plain / "empty", "user.a", b"on an empty file")
        assert (plain / "empty").read_bytes() == b"" and (plain / "empty").stat().st_size == 0
        assert os.getxattr(plain / "empty", "user.a") == b"on an empty file"
        stop_clean(mount)
    finally:
        mount.stop()
