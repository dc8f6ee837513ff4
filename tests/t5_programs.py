"""Real programs on a real mount: git, tar, sqlite3, rsync, cp -a, mmap,
a sparse file beyond 4 GiB, and the daemon's descriptors after them.

This is the one module that mounts on every engine in both modes (default
and ``--authenticated``): in the kernel VM it is the kernel engine's
end-to-end check, with real programs as the workload."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import module_mount
from tests.helpers.checks import tree_digest

# A real tree of thousands of files: this interpreter's standard library.
STDLIB = Path(sysconfig.get_paths()["stdlib"])


AFALG = pytest.mark.afalg
MOUNT_KINDS = [
    pytest.param(("openssl", ()), id="openssl"),
    pytest.param(("openssl", ("--authenticated",)), id="openssl-authenticated"),
    pytest.param(("afalg", ()), id="afalg", marks=AFALG),
    pytest.param(("afalg", ("--authenticated",)), id="afalg-authenticated", marks=AFALG),
]


@pytest.fixture(scope="module", params=MOUNT_KINDS)
def program_mount(request, tmp_path_factory):
    """This module's mount: every engine, in both modes."""
    engine, init_extra = request.param
    yield from module_mount(engine, tmp_path_factory, *init_extra)


@pytest.fixture
def mnt(program_mount, request) -> Path:
    path = program_mount.mountpoint / request.node.name.replace("[", "-").replace("]", "")
    path.mkdir()
    return path


def run(*cmd: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def need(program: str) -> str:
    path = shutil.which(program)
    assert path, f"{program} is installed by scripts/test"
    return path


def test_git(mnt):
    need("git")
    env_args = ("-c", "user.email=t@example.org", "-c", "user.name=t")
    run("git", "init", "-q", "repo", cwd=mnt)
    repo = mnt / "repo"
    for i in range(30):
        (repo / f"file{i}.txt").write_text(f"content {i}\n" * (i * 50 + 1))
    run("git", "add", ".", cwd=repo)
    run("git", *env_args, "commit", "-q", "-m", "first", cwd=repo)
    (repo / "file3.txt").write_text("changed\n")
    run("git", *env_args, "commit", "-q", "-am", "second", cwd=repo)
    run("git", "gc", "-q", cwd=repo)
    run("git", "clone", "-q", "repo", "clone", cwd=mnt)  # local clone: hard links
    run("git", "fsck", "--strict", cwd=mnt / "clone")
    assert run("git", "log", "--format=%s", cwd=mnt / "clone").split() == ["second", "first"]
    assert (mnt / "clone" / "file3.txt").read_text() == "changed\n"


# Under the kernel VM's emulation every request is ~100x slower: the same
# programs there, on smaller inputs (the kernel engine's path is the same).
EMULATED = os.environ.get("CRYPTFS_IN_VM") == "1"
TREE = ("email", "json", "xml") if EMULATED else (
    "email", "json", "xml", "unittest", "asyncio", "encodings", "idlelib", "lib2to3", "ctypes")
MIN_TREE_ENTRIES = 100 if EMULATED else 2000
ROWS = 2000 if EMULATED else 20000  # sqlite
FILES = 100 if EMULATED else 300  # the descriptor check's files per round


def test_tar_round_trip_of_a_real_tree(mnt, tmp_path):
    need("tar")
    source = STDLIB / "email"
    archive = tmp_path / "tree.tar"
    run("tar", "cf", str(archive), "-C", str(STDLIB), *TREE)
    run("tar", "xf", str(archive), "-C", str(mnt))
    assert len(list(mnt.rglob("*"))) > MIN_TREE_ENTRIES
    for name in TREE:
        assert tree_digest(mnt / name) == tree_digest(STDLIB / name)
    # and back out again
    out = tmp_path / "again"
    out.mkdir()
    run("tar", "cf", str(tmp_path / "again.tar"), "-C", str(mnt), "email")
    run("tar", "xf", str(tmp_path / "again.tar"), "-C", str(out))
    assert tree_digest(out / "email") == tree_digest(source)


def test_sqlite(mnt):
    need("sqlite3")
    db = mnt / "test.db"
    script = f"""
    PRAGMA journal_mode=DELETE;
    CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
    BEGIN;
    WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < {ROWS})
    INSERT INTO t(v) SELECT hex(randomblob(50)) FROM c;
    COMMIT;
    BEGIN; DELETE FROM t WHERE id % 3 = 0; ROLLBACK;
    BEGIN; UPDATE t SET v = 'x' WHERE id % 7 = 0; COMMIT;
    PRAGMA journal_mode=WAL;
    INSERT INTO t(v) VALUES ('wal');
    PRAGMA integrity_check;
    SELECT count(*) FROM t;
    """
    out = run("sqlite3", str(db), script)
    assert "ok" in out.split() and str(ROWS + 1) in out.split()
    assert run("sqlite3", str(db), "PRAGMA integrity_check;").strip() == "ok"


def test_rsync_round_trip(mnt, tmp_path):
    need("rsync")
    run("rsync", "-a", f"{STDLIB / 'json'}/", f"{mnt / 'json'}/")
    assert tree_digest(mnt / "json") == tree_digest(STDLIB / "json")
    run("rsync", "-a", f"{mnt / 'json'}/", f"{tmp_path / 'back'}/")
    assert tree_digest(tmp_path / "back") == tree_digest(STDLIB / "json")


def test_cp_a_preserves_links_modes_times_xattrs(mnt, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hard linked")
    os.link(src / "a", src / "b")
    os.symlink("a", src / "s")
    (src / "x").write_bytes(b"exec")
    os.chmod(src / "x", 0o751)
    os.utime(src / "x", ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
    os.setxattr(src / "a", "user.tag", b"value")
    run("cp", "-a", str(src), str(mnt / "copy"))
    copy = mnt / "copy"
    assert os.stat(copy / "a").st_ino == os.stat(copy / "b").st_ino
    assert os.stat(copy / "a").st_nlink == 2
    assert os.readlink(copy / "s") == "a"
    assert os.stat(copy / "x").st_mode & 0o777 == 0o751
    assert os.stat(copy / "x").st_mtime_ns == 1_600_000_000_000_000_000
    assert os.getxattr(copy / "a", "user.tag") == b"value"
    run("cp", "-a", str(copy), str(tmp_path / "back"))
    assert os.getxattr(tmp_path / "back" / "b", "user.tag") == b"value"


def test_mmap_from_another_process(mnt):
    path = mnt / "mapped"
    path.write_bytes(b"\0" * 20000)
    code = f"""
import mmap
with open({str(path)!r}, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
    m[4090:4100] = b"0123456789"
    m[19990:20000] = b"abcdefghij"
    m.flush()
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    data = path.read_bytes()
    assert data[4090:4100] == b"0123456789" and data[19990:] == b"abcdefghij"


def test_sparse_file_beyond_4_gib(mnt):
    path = mnt / "big"
    far = (5 << 30) + 4095
    with open(path, "wb") as f:
        f.seek(far)
        f.write(b"far end")
        f.seek(1 << 32)
        f.write(b"at 4 GiB")
    assert os.stat(path).st_size == far + 7
    with open(path, "rb") as f:
        f.seek(far - 5)
        assert f.read() == bytes(5) + b"far end"
        f.seek((1 << 32) - 2)
        assert f.read(12) == b"\0\0at 4 GiB\0\0"
        f.seek(3 << 30)
        assert f.read(4096) == bytes(4096)
    with open(path, "r+b") as f:
        f.seek(far + 2)
        f.write(b"FAR")
    with open(path, "rb") as f:
        f.seek(far)
        assert f.read() == b"faFARnd"


@pytest.mark.parametrize("size", [1 << 20] if EMULATED else [1 << 20, 10 << 20])
def test_large_sequential_copy(mnt, tmp_path, size):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    shutil.copyfile(src, mnt / "copy")
    assert hashlib.sha256((mnt / "copy").read_bytes()).digest() == \
        hashlib.sha256(src.read_bytes()).digest()


def test_daemon_does_not_leak_descriptors(program_mount, mnt):
    def daemon_fds() -> int:
        return len(os.listdir(f"/proc/{program_mount.proc.pid}/fd"))

    for i in range(20):  # warm up: sessions and channels reach their steady state
        (mnt / f"w{i}").write_bytes(b"x" * 5000)
    before = daemon_fds()
    for i in range(FILES):
        path, data = mnt / f"f{i}", os.urandom(5000)
        path.write_bytes(data)
        assert path.read_bytes() == data
        os.unlink(path)
    from cryptfs.content.sessions import DEFAULT_CAPACITY
    from cryptfs.engines.afalg import MAX_IDLE_CHANNELS

    # Only the session LRU holds descriptors (kernel engine: a tfm socket and
    # up to two channels of three each per session); nothing per file.
    per_session = 1 + 3 * MAX_IDLE_CHANNELS if program_mount.engine == "afalg" else 0
    bound = before + DEFAULT_CAPACITY * per_session + 8
    assert daemon_fds() <= bound
    for i in range(FILES):
        (mnt / f"again{i}").write_bytes(b"y")
    assert daemon_fds() <= bound
