"""``cryptfs mount --shared``: two shared mounts of one cipher directory on
this host, each the "other machine" of the other.  What one does the other
sees at once (no kernel caching of names, attributes or negative lookups);
the lock lets shared mounts in together and keeps exclusive mounts and fsck
out; a backing inode number that comes to stand for another file gives a
new inode.  The same over real NFS: tests/t5_nfs.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cryptfs.errors import ExitCode
from tests.conftest import MOUNT_ENGINES, Mount, init_cipherdir
from tests.helpers.cli import cryptfs, is_mounted

pytestmark = pytest.mark.fuse

ENGINE = MOUNT_ENGINES[0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Mount, Mount]:
    """Two ``--shared`` mounts (A, B) of one cipher directory, for the module."""
    base = tmp_path_factory.mktemp("shared")
    passfile = base / "password"
    init_cipherdir(base / "cipher", passfile)
    a = Mount(base / "cipher", base / "a", passfile, ENGINE, ("--shared",)).start()
    try:
        b = Mount(base / "cipher", base / "b", passfile, ENGINE, ("--shared",)).start()
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()
    for mount in (a, b):
        mount.check_log()


@pytest.fixture
def dirs(pair, request) -> tuple[Path, Path]:
    """One test's directory, as seen through A and through B."""
    a, b = pair
    name = request.node.name
    (a.mountpoint / name).mkdir()
    return a.mountpoint / name, b.mountpoint / name


def backing_of(cipher: Path, before: set[Path]) -> Path:
    """The one backing file that is new since ``before``."""
    (new,) = [p for p in set(cipher.rglob("*")) - before if p.is_file()
              and p.name != "cryptfs.diriv" and not p.name.endswith(".name")]
    return new


def test_changes_through_one_mount_are_seen_at_once_through_the_other(dirs):
    a, b = dirs
    assert not (a / "f").exists()  # a negative lookup the kernel would cache
    (b / "f").write_bytes(b"from B")  # written and closed
    assert (a / "f").read_bytes() == b"from B"
    (a / "f").write_bytes(b"from A, same length?")
    assert (b / "f").read_bytes() == b"from A, same length?"
    (b / "f").write_bytes(b"B again, same length")  # A's page cache must not serve it
    assert (a / "f").read_bytes() == b"B again, same length"
    (b / "sub").mkdir()
    (a / "f").rename(a / "sub" / "g")
    assert sorted(os.listdir(b)) == ["sub"]
    assert (b / "sub" / "g").read_bytes() == b"B again, same length"
    assert os.stat(b / "sub" / "g").st_size == len(b"B again, same length")
    (b / "sub" / "g").unlink()
    assert os.listdir(a / "sub") == []
    assert not (a / "sub" / "g").exists()
    (a / "h1").write_bytes(b"linked")
    os.link(a / "h1", a / "h2")  # hard links keep working
    assert os.stat(b / "h2").st_nlink == 2 and (b / "h2").read_bytes() == b"linked"
    assert os.stat(b / "h1").st_ino == os.stat(b / "h2").st_ino


def test_a_rewrite_that_keeps_size_and_mtime_is_read_by_an_open_file(dirs):
    """A has the file open and cached; B rewrites it with the same size and
    puts the modification time back, so the kernel's own check (size,
    mtime) sees nothing: A's next open must still drop its cached pages."""
    a, b = dirs
    (a / "f").write_bytes(b"first version")
    with open(a / "f", "rb") as held:
        assert held.read() == b"first version"
        assert (a / "f").read_bytes() == b"first version"  # cached now
        st = os.stat(b / "f")
        (b / "f").write_bytes(b"other version")
        os.utime(b / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(a / "f").st_mtime_ns == st.st_mtime_ns
        assert (a / "f").read_bytes() == b"other version"


def test_a_renamed_symlink_keeps_its_inode(dirs):
    """Renaming a symlink re-seals it into a new backing inode (bound
    metadata): still the same file, not one re-created by another mounter."""
    a, b = dirs
    os.symlink("target", a / "link")
    before = os.lstat(a / "link").st_ino
    os.rename(a / "link", a / "moved")
    assert os.lstat(a / "moved").st_ino == before
    assert os.readlink(a / "moved") == "target" == os.readlink(b / "moved")


def test_a_file_replaced_in_its_backing_inode_reads_as_the_new_file(pair, dirs):
    """Another mounter's delete and re-create that reuses the backing inode
    number, forced: B's second file's bytes put into the first file's
    backing inode, with its size and modification time kept.  A has the
    first file open (its header in memory) and cached; opening it again
    must give the new file (a new inode), not the old file's key on the new
    bytes nor its cached pages."""
    a_mount, _ = pair
    a, b = dirs
    cipher = a_mount.cipherdir
    before = set(cipher.rglob("*"))
    (b / "x").write_bytes(b"the old file's text")
    x_backing = backing_of(cipher, before)
    before = set(cipher.rglob("*"))
    (b / "y").write_bytes(b"the new file's text")
    y_backing = backing_of(cipher, before)
    with open(a / "x", "rb") as held:
        assert held.read() == b"the old file's text"
        old_ino = os.fstat(held.fileno()).st_ino
        st = os.stat(x_backing)
        with open(x_backing, "r+b") as f:  # the same backing inode, rewritten
            f.write(y_backing.read_bytes())
        os.utime(x_backing, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(x_backing).st_ino == st.st_ino
        assert os.stat(x_backing).st_size == st.st_size
        assert (a / "x").read_bytes() == b"the new file's text"
        assert os.stat(a / "x").st_ino != old_ino


def test_a_directory_replaced_in_its_backing_inode_lists_its_new_names(pair, dirs):
    """The same for a directory: its backing inode given another directory's
    IV and entries (as a delete and re-create reusing the number would).
    A listed it (its IV cached): it must list the new names, not skip them
    as undecryptable under the old IV."""
    a_mount, _ = pair
    a, b = dirs
    cipher = a_mount.cipherdir
    before = set(cipher.rglob("*"))
    (b / "d").mkdir()
    (d_backing,) = [p for p in set(cipher.rglob("*")) - before if p.is_dir()]
    (b / "d" / "old.txt").write_text("old")
    assert os.listdir(a / "d") == ["old.txt"]
    before = set(cipher.rglob("*"))
    (b / "e").mkdir()
    (e_backing,) = [p for p in set(cipher.rglob("*")) - before if p.is_dir()]
    (b / "e" / "new.txt").write_text("new")
    for entry in list(d_backing.iterdir()):
        entry.unlink()
    for entry in list(e_backing.iterdir()):
        os.rename(entry, d_backing / entry.name)
    os.rmdir(e_backing)
    assert os.listdir(a / "d") == ["new.txt"]
    assert (a / "d" / "new.txt").read_text() == "new"


def test_a_delete_and_create_through_the_other_mount_reads_as_the_new_file(pair, dirs):
    """Unforced: ext4 often gives the new file the freed inode number."""
    a, b = dirs
    (a / "z").write_bytes(b"first z")
    with open(a / "z", "rb") as held:
        assert held.read() == b"first z"
        (b / "z").unlink()
        (b / "z").write_bytes(b"other z")
        assert (a / "z").read_bytes() == b"other z"
        held.seek(0)
        assert held.read() == b"first z"  # the open file stays the old one


def test_exclusive_mounts_and_fsck_are_refused_while_shared_mounts_run(pair, tmp_path):
    a, _ = pair
    plain = tmp_path / "plain"
    plain.mkdir()
    for args in (("mount", str(a.cipherdir), str(plain), "--passfile", str(a.passfile)),
                 ("fsck", str(a.cipherdir), "--passfile", str(a.passfile))):
        proc = cryptfs(*args, check=False)
        assert proc.returncode == ExitCode.MOUNTED, proc.stderr
        assert f"is already mounted with --shared on {a.mountpoint}" in proc.stderr
        assert "Traceback" not in proc.stderr
        if args[0] == "mount":
            assert "mount it with --shared as well" in proc.stderr
    assert not is_mounted(plain)


def test_a_shared_mount_is_refused_while_an_exclusive_one_runs(tmp_path):
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile)
    exclusive = Mount(tmp_path / "cipher", tmp_path / "plain", passfile, ENGINE).start()
    try:
        (tmp_path / "other").mkdir()
        proc = cryptfs("mount", str(tmp_path / "cipher"), str(tmp_path / "other"),
                       "--passfile", str(passfile), "--shared", check=False)
        assert proc.returncode == ExitCode.MOUNTED, proc.stderr
        assert f"is already mounted on {exclusive.mountpoint}" in proc.stderr
        assert "without --shared" in proc.stderr
        assert not is_mounted(tmp_path / "other")
    finally:
        exclusive.stop()
    exclusive.check_log()


def test_shared_through_the_mount_helper_form(tmp_path):
    """``mount -t fuse.cryptfs SRC DIR -o shared``, as mount.fuse3 runs it:
    two such mounts run at once."""
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile)
    mounts = [tmp_path / "p1", tmp_path / "p2"]
    try:
        for mountpoint in mounts:
            mountpoint.mkdir()
            cryptfs(str(tmp_path / "cipher"), str(mountpoint), "-o",
                    f"shared,passfile={passfile}")
            assert is_mounted(mountpoint)
        (mounts[0] / "f").write_text("one")
        assert (mounts[1] / "f").read_text() == "one"
    finally:
        for mountpoint in mounts:
            if is_mounted(mountpoint):
                cryptfs("unmount", str(mountpoint))
    assert not any(is_mounted(m) for m in mounts)


def test_a_shared_mount_refuses_a_cache_timeout(tmp_path):
    """A shared mount caches no names or attributes: ``--cache-timeout``
    with it is a usage error, not silently dropped (0 is what it is)."""
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile)
    (tmp_path / "plain").mkdir()
    proc = cryptfs("mount", str(tmp_path / "cipher"), str(tmp_path / "plain"), "--passfile",
                   str(passfile), "--shared", "--cache-timeout", "5", check=False)
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert "--cache-timeout" in proc.stderr
    assert not is_mounted(tmp_path / "plain")
