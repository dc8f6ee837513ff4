"""The backing tree without a kernel: its protocols (long-name sidecars,
directory IVs around mkdir/rmdir/rename), the bounded directory-descriptor
cache, and what happens when the backing tree changes behind its back."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from cryptfs.daemon.mount import Stack, assemble
from cryptfs.engines.userspace import OpenSSLEngine
from cryptfs.errors import StaleHandleError, StaleInodeError
from cryptfs.fs.handles import DirHandleTable, closed_state
from cryptfs.fs.inodes import ROOT_INODE
from cryptfs.fs.ops import MountOptions
from cryptfs.fs.tree import UnsyncedSidecars
from cryptfs.keys.keyfile import NEW_FEATURES
from cryptfs.lowlevel.linux import RENAME_EXCHANGE
from cryptfs.names.filenames import DIRIV_NAME
from tests.helpers.ops import new_cipherdir

LONG = b"L" * 255  # encodes to more than 255 bytes: a long name with a sidecar


@pytest.fixture
def stack(tmp_path, keys):
    stack = assemble(new_cipherdir(tmp_path / "cipher"), keys, OpenSSLEngine(),
                     MountOptions(dir_fds=4), NEW_FEATURES)
    yield stack
    stack.close()


def backing(stack: Stack, ino: int = ROOT_INODE) -> set[str]:
    """The backing directory's entries (not the IV)."""
    fd = stack.tree.open_dir(ino)
    try:
        return set(os.listdir(fd)) - {DIRIV_NAME}
    finally:
        os.close(fd)


def plain(stack: Stack, ino: int = ROOT_INODE) -> set[bytes]:
    return {item.name for item in stack.tree.listdir(ino)}


def touch(stack: Stack, parent: int, name: bytes) -> int:
    fd, inode, _ = stack.tree.create_file(parent, name, 0o600)
    os.close(fd)
    return inode.ino


def test_long_name_sidecar_lives_and_dies_with_its_entry(stack):
    touch(stack, ROOT_INODE, LONG)
    (entry,) = [n for n in backing(stack) if not n.endswith(".name")]
    assert backing(stack) == {entry, entry + ".name"}
    assert plain(stack) == {LONG}
    stack.tree.unlink(ROOT_INODE, LONG)
    assert backing(stack) == set()


def test_every_long_name_has_its_own_plain_sidecar(stack):
    """docs/format.md §1, §5.3: each entry is a backing node of its own type;
    every kind of entry with a long name, and every hard-link name, has a
    sidecar of mode 0600 holding the encoded name, no trailing newline."""
    tree = stack.tree
    sub = tree.mkdir(ROOT_INODE, b"sub", 0o755)[0].ino
    made = {b"F": touch(stack, ROOT_INODE, LONG)}
    made[b"D"] = tree.mkdir(ROOT_INODE, LONG[:-1], 0o755)[0].ino
    made[b"S"] = tree.symlink(ROOT_INODE, LONG[:-2], b"target")[0].ino
    made[b"P"] = tree.create_entry(ROOT_INODE, LONG[:-3], lambda fd, name: os.mknod(
        name, stat.S_IFIFO | 0o644, dir_fd=fd))[1].ino
    tree.link(made[b"F"], sub, LONG)  # a second name of the same file
    for parent, name, kind in ((ROOT_INODE, LONG, stat.S_IFREG), (sub, LONG, stat.S_IFREG),
                               (ROOT_INODE, LONG[:-1], stat.S_IFDIR),
                               (ROOT_INODE, LONG[:-2], stat.S_IFLNK),
                               (ROOT_INODE, LONG[:-3], stat.S_IFIFO)):
        entry = tree.entry(parent, name)
        fd = tree.open_dir(parent)
        try:
            assert stat.S_IFMT(os.stat(entry.name, dir_fd=fd, follow_symlinks=False).st_mode) \
                == kind
            st = os.stat(entry.sidecar_name, dir_fd=fd)
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            with open(os.open(entry.sidecar_name, os.O_RDONLY, dir_fd=fd), "rb") as f:
                assert f.read() == entry.sidecar.encode("ascii")  # no newline
        finally:
            os.close(fd)
    assert len([n for n in backing(stack, sub) if n.endswith(".name")]) == 1


def test_failed_create_keeps_the_existing_entry_and_its_sidecar(stack):
    touch(stack, ROOT_INODE, LONG)
    before = backing(stack)
    with pytest.raises(FileExistsError):
        touch(stack, ROOT_INODE, LONG)
    with pytest.raises(FileExistsError):
        stack.tree.mkdir(ROOT_INODE, LONG, 0o755)
    assert backing(stack) == before and plain(stack) == {LONG}


def test_mkdir_leaves_nothing_when_its_iv_cannot_be_written(stack, monkeypatch):
    def disk_full(fd, sync=True, dir_iv=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cryptfs.fs.tree.create_diriv", disk_full)
    with pytest.raises(OSError) as info:
        stack.tree.mkdir(ROOT_INODE, LONG, 0o755)
    assert info.value.errno == errno.ENOSPC
    assert backing(stack) == set()


def test_mkdir_rmdir_with_the_iv(stack):
    d, _ = stack.tree.mkdir(ROOT_INODE, b"d", 0o750)
    assert stat.S_IMODE(stack.tree.stat(d.ino).st_mode) == 0o750
    touch(stack, d.ino, b"f")
    with pytest.raises(OSError) as info:
        stack.tree.rmdir(ROOT_INODE, b"d")
    assert info.value.errno == errno.ENOTEMPTY
    assert plain(stack, d.ino) == {b"f"}  # its IV is still there
    stack.tree.unlink(d.ino, b"f")
    stack.tree.rmdir(ROOT_INODE, b"d")
    assert backing(stack) == set()
    assert stack.tree.dirs.fd(d.ino) is None and stack.tree.dirs.iv(d.ino) is None


def test_rename_moves_long_name_sidecars_across_directories(stack):
    a, _ = stack.tree.mkdir(ROOT_INODE, b"a", 0o755)
    b, _ = stack.tree.mkdir(ROOT_INODE, b"b", 0o755)
    touch(stack, a.ino, LONG)
    stack.tree.rename(a.ino, LONG, b.ino, LONG[:-1] + b"M", 0)
    assert backing(stack, a.ino) == set()
    assert len(backing(stack, b.ino)) == 2 and plain(stack, b.ino) == {LONG[:-1] + b"M"}
    stack.tree.rename(b.ino, LONG[:-1] + b"M", a.ino, b"short", 0)
    assert backing(stack, b.ino) == set() and plain(stack, a.ino) == {b"short"}


def test_rename_over_an_empty_directory_and_iv_restored_on_failure(stack):
    src, _ = stack.tree.mkdir(ROOT_INODE, b"src", 0o755)
    touch(stack, src.ino, b"inside")
    sub, _ = stack.tree.mkdir(src.ino, b"sub", 0o755)
    # rename(2) refuses to move a directory into itself (EINVAL) after the
    # target's IV was taken: the IV must come back.
    with pytest.raises(OSError) as info:
        stack.tree.rename(ROOT_INODE, b"src", src.ino, b"sub", 0)
    assert info.value.errno == errno.EINVAL
    touch(stack, sub.ino, b"still named")
    assert plain(stack, sub.ino) == {b"still named"}
    stack.tree.unlink(sub.ino, b"still named")
    dst, _ = stack.tree.mkdir(ROOT_INODE, b"dst", 0o755)
    stack.tree.rename(ROOT_INODE, b"src", ROOT_INODE, b"dst", 0)
    assert plain(stack) == {b"dst"}
    assert plain(stack, src.ino) == {b"inside", b"sub"}  # the moved directory keeps its IV


def test_descriptor_cache_is_bounded_and_reopens_through_parents(stack):
    """A chain deeper than the cache and a directory wider than it: every
    operation works, at most ``limit`` descriptors stay open, and the
    backing path (far beyond PATH_MAX) is never used."""
    fds_before = len(os.listdir("/proc/self/fd"))
    chain = [ROOT_INODE]
    for _ in range(40):  # 40 long names: a backing path of about 3 x PATH_MAX
        inode, _ = stack.tree.mkdir(chain[-1], LONG, 0o755)
        chain.append(inode.ino)
    wide = [stack.tree.mkdir(ROOT_INODE, b"w%d" % i, 0o755)[0].ino for i in range(50)]
    for ino in chain[1:] + wide:
        touch(stack, ino, b"file")
    for ino in reversed(chain[1:] + wide):
        assert plain(stack, ino) == ({b"file", LONG} if ino in chain[1:-1] else {b"file"})
        assert len(stack.tree.dirs) <= stack.tree.dirs.limit
    assert len(os.listdir("/proc/self/fd")) <= fds_before + stack.tree.dirs.limit
    stack.tree.rename(chain[-1], b"file", wide[0], b"moved", 0)  # two far-apart directories
    assert plain(stack, wide[0]) == {b"file", b"moved"}


def test_renamed_directory_keeps_its_descriptor(stack):
    a, _ = stack.tree.mkdir(ROOT_INODE, b"a", 0o755)
    touch(stack, a.ino, b"f")
    fd = stack.tree.dirs.fd(a.ino)
    assert fd is not None
    stack.tree.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 0)
    assert stack.tree.dirs.fd(a.ino) == fd and plain(stack, a.ino) == {b"f"}


def test_directory_replaced_behind_our_back_is_never_followed(stack, tmp_path):
    """A backing directory swapped for a symlink to somewhere outside the
    cipher directory: once its descriptor has to be reopened, operations
    fail instead of following the symlink; the outside stays untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / DIRIV_NAME).write_bytes(bytes(16))
    d, _ = stack.tree.mkdir(ROOT_INODE, b"d", 0o755)
    touch(stack, d.ino, b"f")
    (name,) = backing(stack)
    cipher = tmp_path / "cipher"
    os.rename(cipher / name, tmp_path / "moved-away")
    os.symlink(outside, cipher / name)
    stack.tree.dirs.forget(d.ino)  # as if evicted
    for op in (lambda: touch(stack, d.ino, b"new"), lambda: plain(stack, d.ino),
               lambda: stack.tree.mkdir(d.ino, b"sub", 0o755),
               lambda: stack.tree.unlink(d.ino, b"f")):
        with pytest.raises(OSError) as info:
            op()
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert os.listdir(outside) == [DIRIV_NAME]
    # another directory put in its place is not taken for it either
    os.unlink(cipher / name)
    new_cipherdir(cipher / name)
    with pytest.raises(StaleInodeError):
        plain(stack, d.ino)


def test_directory_handles():
    table: DirHandleTable[int] = DirHandleTable()
    fh = table.open(7)
    reads = []

    def read(ino):
        reads.append(ino)
        return [1, 2, 3]

    assert table.listing(fh, 0, read) == [1, 2, 3]
    assert table.listing(fh, 2, read) == [1, 2, 3] and reads == [7]  # a continuation
    table.listing(fh, 0, read)
    assert reads == [7, 7]  # a new listing (rewinddir)
    table.release(fh)
    with pytest.raises(StaleHandleError):
        table.ino(fh)
    with pytest.raises(StaleHandleError):
        table.release(fh)


def test_bound_symlinks_are_resealed_through_descriptors(stack):
    """Bound metadata deeper than PATH_MAX and the descriptor cache: a
    symlink renamed to a far directory is re-sealed there (same inode of
    ours, new backing inode, no temporary left), a hard link to it is a
    re-sealed copy, and exchanging it is refused."""
    chain = [ROOT_INODE]
    for _ in range(20):  # a backing path of about 1.5 x PATH_MAX
        chain.append(stack.tree.mkdir(chain[-1], LONG, 0o755)[0].ino)
    far, _ = stack.tree.mkdir(ROOT_INODE, b"far", 0o755)
    link, st = stack.tree.symlink(chain[-1], b"s", b"../some/target")
    stack.tree.rename(chain[-1], b"s", far.ino, LONG, 0)
    moved = stack.tree.lookup(far.ino, LONG)
    assert moved is not None and moved[0].ino == link.ino
    assert moved[1].st_ino != st.st_ino and stack.tree.readlink(link.ino) == b"../some/target"
    assert plain(stack, chain[-1]) == set() and len(backing(stack, far.ino)) == 2  # + sidecar
    copy, _ = stack.tree.link(link.ino, chain[1], b"h")
    assert copy.ino != link.ino and stack.tree.readlink(copy.ino) == b"../some/target"
    touch(stack, far.ino, b"f")
    with pytest.raises(OSError) as info:
        stack.tree.rename(far.ino, LONG, far.ino, b"f", RENAME_EXCHANGE)
    assert info.value.errno == errno.EINVAL


def test_xattr_owner_of_a_headerless_file_is_made_on_demand(stack):
    """A new file has no header until written; its first xattr gives it one,
    whose ID then owns its attributes (a directory's owner is its IV)."""
    ino = touch(stack, ROOT_INODE, b"empty")
    assert stack.tree.xattr_owner(ino).identity == b""
    owner = stack.tree.xattr_owner(ino, create=True)
    assert owner.identity and stack.tree.xattr_owner(ino) == owner
    assert stack.tree.stat(ino).st_size > 0
    d, _ = stack.tree.mkdir(ROOT_INODE, b"d", 0o755)
    assert stack.tree.xattr_owner(d.ino).identity == stack.tree.diriv(d.ino)


def synced(stack: Stack, ino: int, directory: bool = False) -> set[tuple[int, str]] | None:
    """Run what fsync of ``ino`` (fsyncdir, with ``directory``) adds to keep
    names: the sidecars it synced, as (directory inode, sidecar name);
    None if it added nothing."""
    sync = stack.tree.name_sync(ino, directory)
    if sync is None:
        return None
    try:
        sync.run()
        return {(_dir_ino(stack, fd), name) for fd, names in sync.dirs for name in names}
    finally:
        sync.close()


def _dir_ino(stack: Stack, fd: int) -> int:
    """The inode of the directory open at ``fd`` (the root, or the number
    derived from its backing inode)."""
    st = os.fstat(fd)
    inodes = stack.operations.inodes
    dev_ino = (st.st_dev, st.st_ino)
    if inodes.get(ROOT_INODE).dev_ino == dev_ino:
        return ROOT_INODE
    ino = inodes.number_for(dev_ino)
    assert ino is not None and inodes.get(ino).dev_ino == dev_ino
    return ino


def sidecar_of(stack: Stack, parent: int, name: bytes) -> str:
    return stack.tree.entry(parent, name).sidecar_name


def test_fsync_syncs_the_sidecars_its_long_names_need(stack):
    d, _ = stack.tree.mkdir(ROOT_INODE, LONG, 0o755)
    f = touch(stack, d.ino, LONG)
    short = touch(stack, ROOT_INODE, b"short")
    assert synced(stack, short) is None  # short names: the backing filesystem's fsync
    assert synced(stack, f) == {(d.ino, sidecar_of(stack, d.ino, LONG)),
                                (ROOT_INODE, sidecar_of(stack, ROOT_INODE, LONG))}
    assert synced(stack, f) is None and synced(stack, d.ino, directory=True) is None
    stack.tree.rename(d.ino, LONG, d.ino, LONG[:-1] + b"R", 0)
    assert synced(stack, f) == {(d.ino, sidecar_of(stack, d.ino, LONG[:-1] + b"R"))}
    touch(stack, ROOT_INODE, LONG[:-1] + b"2")
    touch(stack, ROOT_INODE, LONG[:-1] + b"3")
    stack.tree.unlink(ROOT_INODE, LONG[:-1] + b"3")  # removed: nothing to sync
    assert synced(stack, ROOT_INODE, directory=True) == {
        (ROOT_INODE, sidecar_of(stack, ROOT_INODE, LONG[:-1] + b"2"))}
    assert synced(stack, ROOT_INODE, directory=True) is None


def test_past_the_limit_of_unsynced_sidecars_the_filesystem_is_synced(stack):
    stack.tree._unsynced = UnsyncedSidecars(limit=1)
    for last in b"ab":
        touch(stack, ROOT_INODE, LONG[:-1] + bytes([last]))
    sync = stack.tree.name_sync(ROOT_INODE, directory=True)
    assert sync is not None and sync.whole_fs is not None
    stack.tree.unsynced_again(sync)  # as if it failed: still to do
    sync.close()
    sync = stack.tree.name_sync(ROOT_INODE)
    assert sync is not None and sync.whole_fs is not None
    sync.run()
    sync.close()
    assert stack.tree.name_sync(ROOT_INODE, directory=True) is None


def test_rename_over_a_long_name_leaves_its_sidecar_alone(stack):
    """Its sidecar keeps the name of the file being replaced until the
    rename: rewriting it (truncated first) would risk that name in a crash."""
    touch(stack, ROOT_INODE, LONG)
    sidecar = sidecar_of(stack, ROOT_INODE, LONG)
    fd = stack.tree.open_dir(ROOT_INODE)
    try:
        os.utime(sidecar, ns=(10**9, 10**9), dir_fd=fd)
        touch(stack, ROOT_INODE, b"tmp")
        stack.tree.rename(ROOT_INODE, b"tmp", ROOT_INODE, LONG, 0)
        assert os.stat(sidecar, dir_fd=fd).st_mtime_ns == 10**9
        with open(os.open(sidecar, os.O_WRONLY | os.O_TRUNC, dir_fd=fd), "w") as f:
            f.write("damaged")
    finally:
        os.close(fd)
    touch(stack, ROOT_INODE, b"tmp")
    stack.tree.rename(ROOT_INODE, b"tmp", ROOT_INODE, LONG, 0)  # a damaged one is rewritten
    assert plain(stack) == {LONG}


def _lose_iv(stack: Stack, ino: int) -> None:
    """Delete directory ``ino``'s backing IV file and the mount's cached copy."""
    fd = stack.tree.open_dir(ino)
    try:
        os.unlink(DIRIV_NAME, dir_fd=fd)
    finally:
        os.close(fd)
    stack.tree.dirs.forget(ino)


def _iv_file(stack: Stack, ino: int) -> bytes | None:
    fd = stack.tree.open_dir(ino)
    try:
        iv = os.open(DIRIV_NAME, os.O_RDONLY, dir_fd=fd)
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)
    try:
        return os.read(iv, 17)
    finally:
        os.close(iv)


def test_a_lost_iv_under_a_long_name_is_derived_and_written_back(stack):
    """The directory's name is read through its sidecar to derive the IV."""
    d, _ = stack.tree.mkdir(ROOT_INODE, LONG, 0o755)
    iv = stack.tree.diriv(d.ino)
    touch(stack, d.ino, b"f")
    _lose_iv(stack, d.ino)
    assert plain(stack, d.ino) == {b"f"}
    assert _iv_file(stack, d.ino) == iv


def test_a_failed_write_back_leaves_no_partial_iv(stack, monkeypatch, caplog):
    """A half-written IV file would read as damaged, where a missing one can
    still be derived: none is left, and the mount goes on with the IV."""
    d, _ = stack.tree.mkdir(ROOT_INODE, b"d", 0o755)
    touch(stack, d.ino, b"f")
    _lose_iv(stack, d.ino)

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("cryptfs.names.filenames.os.fsync", failing_fsync)
    assert plain(stack, d.ino) == {b"f"}
    assert _iv_file(stack, d.ino) is None
    assert "could not write it back" in caplog.text


def test_a_long_named_directory_without_iv_or_sidecar_reads_eio(stack, caplog):
    """Its name cannot be read, so its IV cannot be derived: EIO for what
    is inside, logged once, and the rest of the tree works."""
    d, _ = stack.tree.mkdir(ROOT_INODE, LONG, 0o755)
    touch(stack, d.ino, b"f")
    (sidecar,) = [n for n in backing(stack) if n.endswith(".name")]
    fd = stack.tree.open_dir(ROOT_INODE)
    try:
        os.unlink(sidecar, dir_fd=fd)
    finally:
        os.close(fd)
    _lose_iv(stack, d.ino)
    for _ in range(2):
        with pytest.raises(OSError) as info:
            plain(stack, d.ino)
        assert info.value.errno == errno.EIO
    assert caplog.text.count("cannot be derived") == 1
    touch(stack, ROOT_INODE, b"other")
    assert _iv_file(stack, d.ino) is None


def test_closed_state_tells_every_mtime_and_size_apart():
    """The state a closed file's next open compares (keep the kernel's page
    cache only if unchanged) is exact: any change of mtime or size, either
    side of 1970 and up to the largest sizes, gives another value."""
    def state(mtime_ns: int, size: int) -> int:
        fields = [0] * 16
        fields[6], fields[14] = size, mtime_ns  # st_size, st_mtime_ns
        return closed_state(os.stat_result(fields))

    pairs = [(m, s) for m in (-(10**18), -1, 0, 1, 10**18) for s in (0, 1, 4096, 2**63 - 1)]
    assert len({state(m, s) for m, s in pairs}) == len(pairs)
