"""Inode numbers and directory listings on real mounts: a file keeps its
inode number when the kernel forgets its inode and across remounts (so
``git status`` after a remount reads no file), on the cipher directory's
device and on another one mounted below it; a file handle of a deleted
file does not open the file that got its number; ``ls -a`` shows ``.`` and
``..`` with the right numbers."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptfs.fs.inodes import INO_BITS, device_namespace
from tests.conftest import Mount, backing_entry_of, init_cipherdir, require_fuse

pytestmark = pytest.mark.fuse


def drop_caches() -> None:
    """Make the kernel forget every unused inode (FORGET to the daemon)."""
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        pytest.skip("dropping the kernel's caches needs root")
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def inode_numbers(paths: list[Path]) -> dict[Path, int]:
    """``st_ino`` of each path, looked up in reverse order (a table that
    hands out numbers in lookup order would give different ones)."""
    return {p: os.lstat(p).st_ino for p in reversed(paths)}


def test_inode_numbers_survive_forget_and_remount(fresh_mount):
    plain = fresh_mount.mountpoint
    backing = backing_entry_of(fresh_mount, lambda: (plain / "f").write_bytes(b"data"))
    (plain / "d").mkdir()
    (plain / "d" / "g").write_bytes(b"more")
    os.link(plain / "f", plain / "d" / "hard")
    os.symlink("f", plain / "s")
    os.mkfifo(plain / "d" / "fifo")
    paths = [plain / "f", plain / "d", plain / "d" / "g", plain / "d" / "hard",
             plain / "s", plain / "d" / "fifo"]
    before = inode_numbers(paths)
    assert before[plain / "f"] == before[plain / "d" / "hard"] == os.lstat(backing).st_ino
    assert len(set(before.values())) == len(paths) - 1  # one hard link pair
    drop_caches()
    assert inode_numbers(paths) == before
    fresh_mount.restart()
    assert inode_numbers(paths) == before
    found = subprocess.run(["find", str(plain), "-inum", str(before[plain / "f"])],
                           check=True, capture_output=True, text=True).stdout.split()
    assert sorted(found) == sorted([str(plain / "f"), str(plain / "d" / "hard")])


def git(repo: Path, *args: str, strace_log: Path | None = None) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    if strace_log is not None:
        cmd = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(strace_log), *cmd]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout


def opened_files(strace_log: Path) -> set[str]:
    """Paths given to open(2)/openat(2) in an strace log, whatever the
    result (a call another thread interrupts has its result on a later
    line)."""
    pattern = re.compile(r'open(?:at)?\((?:[^,"]+, )?"([^"]*)"')
    return {m.group(1) for m in map(pattern.search, strace_log.read_text().splitlines()) if m}


def test_git_status_after_a_remount_reads_no_file(fresh_mount, tmp_path):
    """git's index keeps each file's inode number: if it changed, git
    status re-reads and re-hashes every file (and finds them unchanged)."""
    if shutil.which("git") is None or shutil.which("strace") is None:
        pytest.skip("needs git and strace")
    repo = fresh_mount.mountpoint / "repo"
    (repo / "src").mkdir(parents=True)
    tracked = [f"src/file{i}.txt" for i in range(20)] + ["README"]
    past = time.time() - 3600  # older than the index: no racily-clean re-reads
    for name in tracked:
        (repo / name).write_text(name * 100)
        os.utime(repo / name, (past, past))
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "files")
    assert git(repo, "status", "--porcelain") == ""
    fresh_mount.restart()
    log = tmp_path / "strace.log"
    assert git(repo, "status", "--porcelain", strace_log=log) == ""
    read = {p for p in opened_files(log) if p.removeprefix(str(repo) + "/") in tracked}
    assert not read, f"git status re-read {sorted(read)}"


def test_tar_incremental_after_a_remount_archives_no_file(fresh_mount, tmp_path):
    """GNU tar's incremental mode (``-g``) takes a directory whose inode
    number changed for a new one and archives all of its files again.
    ``--no-check-device``: a FUSE mount's device number may change between
    mounts (as an NFS mount's)."""
    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar")
    data = fresh_mount.mountpoint / "data"
    for sub in ("a", "b", "c"):
        (data / sub).mkdir(parents=True)
        for i in range(5):
            (data / sub / f"f{i}").write_bytes(b"x" * i)
    snapshot = tmp_path / "snapshot"

    def tar(archive: str) -> list[str]:
        return subprocess.run(
            ["tar", "-C", str(fresh_mount.mountpoint), "-c", "-v", "-f", str(tmp_path / archive),
             "-g", str(snapshot), "--no-check-device", "data"],
            check=True, capture_output=True, text=True).stdout.split()

    assert len(tar("full.tar")) == 1 + 3 + 15
    fresh_mount.restart()
    assert sorted(tar("incremental.tar")) == ["data/", "data/a/", "data/b/", "data/c/"]


def test_a_device_below_the_cipher_directory_gets_its_namespace(tmp_path):
    """A file system mounted below the cipher directory (here a tmpfs on a
    cryptfs directory's backing directory): its inodes are numbered in the
    namespace of its device, stable across a forget and a remount."""
    require_fuse()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    passfile = tmp_path / "password"
    cipher = tmp_path / "cipher"
    init_cipherdir(cipher, passfile)
    mount = Mount(cipher, tmp_path / "plain", passfile, "openssl").start()
    try:
        sub = backing_entry_of(mount, lambda: (mount.mountpoint / "sub").mkdir())
        mount.stop()
        saved = tmp_path / "saved"
        shutil.copytree(sub, saved)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(sub)], check=True)
        try:
            shutil.copytree(saved, sub, dirs_exist_ok=True)  # its directory IV
            mount.start()
            plain = mount.mountpoint
            (plain / "top").write_bytes(b"1")
            backing = backing_entry_of(mount, lambda: (plain / "sub" / "f").write_bytes(b"2"))
            st = os.lstat(backing)
            expected = device_namespace(st.st_dev) << INO_BITS | st.st_ino
            paths = [plain / "sub" / "f", plain / "sub", plain / "top"]
            before = inode_numbers(paths)
            assert before[plain / "sub" / "f"] == expected
            assert before[plain / "top"] < 1 << INO_BITS
            drop_caches()
            assert inode_numbers(paths) == before
            mount.restart()
            assert inode_numbers(paths) == before
        finally:
            mount.stop()
            subprocess.run(["umount", "-l", str(sub)], check=False)
    finally:
        mount.stop()
    mount.check_log()


# -- ls -a: "." and ".." -----------------------------------------------------------------


class Dirent64(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


def raw_listing(path: Path) -> list[tuple[str, int]]:
    """(name, d_ino) of every entry readdir(3) returns, ``.`` and ``..``
    included (os.scandir hides them)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir64.restype = ctypes.POINTER(Dirent64)
    libc.readdir64.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    handle = libc.opendir(os.fsencode(path))
    assert handle, os.strerror(ctypes.get_errno())
    entries = []
    try:
        while True:
            entry = libc.readdir64(handle)
            if not entry:
                break
            entries.append((os.fsdecode(entry.contents.d_name), entry.contents.d_ino))
    finally:
        libc.closedir(handle)
    return entries


def test_ls_a_shows_dot_entries_with_their_numbers(fresh_mount):
    plain = fresh_mount.mountpoint
    names = {f"{i:03d}" + "n" * 150 for i in range(300)}  # many replies of one page each
    (plain / "d").mkdir()
    for name in names:
        (plain / "d" / name).touch()
    listed = raw_listing(plain / "d")
    assert listed[:2] == [(".", os.stat(plain / "d").st_ino), ("..", os.stat(plain).st_ino)]
    assert sorted(name for name, _ in listed[2:]) == sorted(names)  # each once
    assert {name: ino for name, ino in listed[2:]} == {
        name: os.lstat(plain / "d" / name).st_ino for name in names}
    (plain / "d2" / "e").mkdir(parents=True)
    assert raw_listing(plain / "d2" / "e") == [(".", os.stat(plain / "d2" / "e").st_ino),
                                               ("..", os.stat(plain / "d2").st_ino)]
    os.rmdir(plain / "d2" / "e")
    os.rmdir(plain / "d2")
    # The mount root's ".." is the root itself, as on ext4.
    assert raw_listing(plain)[:2] == [(".", os.stat(plain).st_ino), ("..", os.stat(plain).st_ino)]
    ls = subprocess.run(["ls", "-a", str(plain)], check=True, capture_output=True, text=True)
    assert ls.stdout.split() == [".", "..", "d"]
    # The kernel takes no lookup for "." and "..": listing again and again,
    # then forgetting, leaves the directory and its entries working.
    number = os.stat(plain / "d").st_ino
    for _ in range(20):
        raw_listing(plain / "d")
    drop_caches()
    assert os.stat(plain / "d").st_ino == number
    assert raw_listing(plain / "d")[:2] == [(".", number), ("..", os.stat(plain).st_ino)]
    assert sorted(os.listdir(plain / "d")) == sorted(names)  # Python hides them
    with os.scandir(plain) as entries:
        assert [e.name for e in entries] == ["d"]


# -- file handles: a reused inode number does not open another file ---------------------


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]


def name_to_handle(path: Path) -> FileHandle:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    handle = FileHandle(handle_bytes=128)
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, os.fsencode(path), ctypes.byref(handle),
                              ctypes.byref(mount_id), 0) != 0:  # -100: AT_FDCWD
        pytest.skip(f"name_to_handle_at: {os.strerror(ctypes.get_errno())}")
    return handle


def open_by_handle(mount_fd: int, handle: FileHandle) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_RDONLY)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


@contextlib.contextmanager
def ext4_image(path: Path) -> Iterator[Path]:
    """A small ext4 file system of our own mounted at ``path`` (other
    processes' files do not take the inode numbers this test frees)."""
    image = path.with_suffix(".img")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    path.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
        image.unlink()


def test_a_file_handle_of_a_deleted_file_does_not_open_its_successor(tmp_path):
    """The backing file system reuses a deleted file's inode number, and so
    does cryptfs once the kernel forgot the inode: the generation tells the
    kernel's file handle check (fuse_get_dentry) the two files apart."""
    require_fuse()
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root (loop mount, open_by_handle_at) and mkfs.ext4")
    with ext4_image(tmp_path / "ext4") as base:
        init_cipherdir(base / "cipher", tmp_path / "password")
        mount = Mount(base / "cipher", tmp_path / "plain", tmp_path / "password",
                      "openssl").start()
        try:
            check_handles_of_reused_numbers(mount.mountpoint)
        finally:
            mount.stop()
        mount.check_log()


def check_handles_of_reused_numbers(plain: Path) -> None:
    """Files made and deleted, then new ones that get their numbers: a
    handle of a deleted file is stale even while its successor is cached."""
    handles = {}
    for i in range(50):
        (plain / f"old{i}").write_bytes(b"old")
        handles[os.stat(plain / f"old{i}").st_ino] = name_to_handle(plain / f"old{i}")
        os.unlink(plain / f"old{i}")
    drop_caches()
    reused = []
    for i in range(50):
        (plain / f"new{i}").write_bytes(b"new")
        if os.stat(plain / f"new{i}").st_ino in handles:
            reused.append(plain / f"new{i}")
    assert reused, "ext4 reused no freed inode number: the test checks nothing"
    mount_fd = os.open(plain, os.O_RDONLY | os.O_DIRECTORY)
    new_fd = os.open(reused[0], os.O_RDONLY)  # keeps its inode in the kernel's cache
    handle = handles[os.fstat(new_fd).st_ino]
    try:
        with pytest.raises(OSError) as info:
            os.close(open_by_handle(mount_fd, handle))
        assert info.value.errno == errno.ESTALE
    finally:
        os.close(new_fd)
        os.close(mount_fd)
