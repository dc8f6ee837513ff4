"""Load and interference: many concurrent clients, concurrent O_APPEND,
backing files changed behind the mount, and a soak loop whose memory and
descriptor use must not keep growing."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.conftest import ENGINE_PARAMS, Mount, afalg_engine, init_cipherdir, require_fuse
from tests.helpers.checks import tree_digest

P = 4096
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# The soak loop runs for this long (and at least 4 rounds).
SOAK_SECONDS = float(os.environ.get("CRYPTFS_SOAK_SECONDS", "120"))

CLIENT = r"""
import hashlib, os, sys
root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(root)
def content(i):
    seed = hashlib.sha256(f"{root}/{i}".encode()).digest()
    return seed * ((i * 7919) % 3000 + 1)  # 32 bytes .. 96 KB
for i in range(n):
    with open(os.path.join(root, f"f{i}"), "wb") as f:
        f.write(content(i))
for i in range(n):
    with open(os.path.join(root, f"f{i}"), "rb") as f:
        if f.read() != content(i):
            sys.exit(f"{root}/f{i} differs")
"""

APPENDER = r"""
import os, sys
path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(n):
    record = f"{tag}:{i:06d}:".encode() + b"x" * (50 + i % 200) + b"\n"
    os.write(fd, record)
os.close(fd)
"""


def daemon_status(mount) -> dict[str, int]:
    status = Path(f"/proc/{mount.proc.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "hwm_kb": int(fields["VmHWM"].split()[0]),
            "fds": len(os.listdir(f"/proc/{mount.proc.pid}/fd"))}


def test_many_concurrent_clients(cryptfs_mount, mnt):
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, str(mnt / f"client{c}"), "200"])
               for c in range(8)]
    appenders = [subprocess.Popen([sys.executable, "-c", APPENDER, str(mnt / "log"), tag, "2000"])
                 for tag in ("A", "B")]
    for proc in clients + appenders:
        assert proc.wait(600) == 0
    lines = (mnt / "log").read_bytes().split(b"\n")[:-1]
    assert len(lines) == 4000
    for tag in (b"A", b"B"):
        numbers = [int(line.split(b":")[1]) for line in lines if line.startswith(tag + b":")]
        assert numbers == list(range(2000))  # none lost, none torn, in order
    for line in lines:
        tag, i, rest = line.split(b":")
        assert rest == b"x" * (50 + int(i) % 200)
    status = daemon_status(cryptfs_mount)
    print(f"daemon after 8x200 files + 2x2000 appends: peak RSS {status['hwm_kb'] // 1024} MiB,"
          f" {status['fds']} descriptors")
    assert status["hwm_kb"] < 1024 * 1024  # bounded: well under 1 GiB


def drop_caches() -> None:
    if os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(1.2)  # past the 1 s attribute timeout


def find_backing(cipher: Path, marker_size: int) -> Path:
    (path,) = [p for p in cipher.rglob("*") if p.is_file() and p.stat().st_size == marker_size]
    return path


@pytest.mark.parametrize("engine_name", ENGINE_PARAMS)
def test_backing_changed_behind_the_mount(engine_name, tmp_path):
    """Backing files truncated, deleted and garbled behind a mount with
    --cache-timeout 1 (what the README says a sync tool writing under a
    plain mount needs): each shows as itself a second later, the rest of
    the mount unaffected."""
    require_fuse()
    if engine_name == "afalg":
        afalg_engine()
    passfile = tmp_path / "password"
    cipher = tmp_path / "cipher"
    init_cipherdir(cipher, passfile)
    mount = Mount(cipher, tmp_path / "plain", passfile, engine_name,
                  extra=("--cache-timeout", "1")).start()
    mount.expected_log.append("final page")  # the truncated file is logged
    try:
        _change_behind(cipher, mount.mountpoint)
    finally:
        mount.stop()
    mount.check_log()


def _change_behind(cipher: Path, mnt: Path) -> None:
    sizes = {"truncated": 30001, "deleted": 30002, "edited": 30003, "intact": 30004}
    for name, size in sizes.items():
        (mnt / name).write_bytes(bytes([len(name)]) * size)
    backing = {name: find_backing(cipher, size + 4112) for name, size in sizes.items()}
    with open(mnt / "deleted", "rb") as still_open:
        os.truncate(backing["truncated"], backing["truncated"].stat().st_size - 5)
        os.unlink(backing["deleted"])
        with open(backing["edited"], "r+b") as f:  # garble the middle of page 1
            f.seek(2 * P + 100)
            f.write(os.urandom(32))
        drop_caches()
        with pytest.raises(OSError) as info:
            (mnt / "truncated").read_bytes()
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            (mnt / "deleted").read_bytes()
        assert info.value.errno == errno.ENOENT
        assert len(still_open.read()) == 30002  # an open handle keeps its file
        edited = (mnt / "edited").read_bytes()  # XTS: garbled, not detected
        assert len(edited) == 30003 and edited != bytes([6]) * 30003
        assert (mnt / "intact").read_bytes() == bytes([6]) * 30004
    assert sorted(os.listdir(mnt)) == ["edited", "intact", "truncated"]
    (mnt / "new").write_text("the mount still works")
    assert (mnt / "new").read_text() == "the mount still works"


def test_soak_untar_check_delete(cryptfs_mount, mnt, tmp_path):
    archive = tmp_path / "tree.tar"
    subprocess.run(["tar", "cf", str(archive), "-C", str(STDLIB), "email", "json", "asyncio",
                    "unittest"], check=True)
    reference = tmp_path / "ref"
    reference.mkdir()
    subprocess.run(["tar", "xf", str(archive), "-C", str(reference)], check=True)
    expected = tree_digest(reference)
    rounds = []
    start = time.monotonic()
    while len(rounds) < 4 or time.monotonic() - start < SOAK_SECONDS:
        subprocess.run(["tar", "xf", str(archive), "-C", str(mnt)], check=True)
        assert tree_digest(mnt) == expected
        subprocess.run(["rm", "-rf", *[str(p) for p in mnt.iterdir()]], check=True)
        assert list(mnt.iterdir()) == []
        rounds.append(daemon_status(cryptfs_mount))
    print("soak rounds (RSS KiB, descriptors):", [(r["rss_kb"], r["fds"]) for r in rounds])
    settled = rounds[len(rounds) // 2:]
    # after warming up, neither memory nor descriptors keep growing
    assert max(r["fds"] for r in settled) <= rounds[0]["fds"] + 8
    assert settled[-1]["rss_kb"] <= settled[0]["rss_kb"] * 1.2 + 8 * 1024


RANDOM_IO = """
import os, random, sys
path, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
model = bytearray(size)
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, size)
direct = os.open(path, os.O_RDONLY | os.O_DIRECT)  # reads reach the daemon, not the page cache
for _ in range(300):
    off = rnd.randrange(size)
    n = rnd.choice([1, 100, 4095, 4096, 4097, 40000, 200000])
    if rnd.random() < 0.6:
        data = rnd.randbytes(n)
        os.pwrite(fd, data, off)
        model[off:off + n] = data
    else:
        got = os.pread(direct, n, off)
        assert got == bytes(model[off:off + n]), (off, n)
os.fsync(fd)
os.close(fd)
os.close(direct)
with open(path, "rb") as f:
    assert f.read() == bytes(model)
"""


@pytest.mark.parametrize("engine_name", ENGINE_PARAMS)
@pytest.mark.parametrize("inline_max", ["0", str(1 << 21)], ids=["workers", "inline"])
def test_inline_and_worker_paths_agree(engine_name, inline_max, tmp_path):
    """Every codec call on worker threads, or every one on the event loop:
    concurrent random reads and writes of unaligned sizes read back exactly."""
    require_fuse()
    if engine_name == "afalg":
        afalg_engine()
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile)
    mount = Mount(tmp_path / "cipher", tmp_path / "plain", passfile, engine_name,
                  extra=("--inline-max", inline_max)).start()
    try:
        procs = [subprocess.Popen([sys.executable, "-c", RANDOM_IO,
                                   str(mount.mountpoint / f"f{i % 2}-{i}"), str(i), "300000"])
                 for i in range(4)]
        assert [p.wait(600) for p in procs] == [0] * 4
    finally:
        mount.stop()
    mount.check_log()


def scratch_dir(tmp_path: Path) -> Path:
    """A directory on tmpfs if there is one (directory IVs are fsynced: on a
    disk, 20,000 directories take minutes), else on ``tmp_path``."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        import tempfile

        return Path(tempfile.mkdtemp(dir=shm, prefix="cryptfs-test-"))
    return tmp_path / "scratch"


WIDE_TREE = r"""
import os, sys
root, top, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(top):
    for j in range(per):
        d = os.path.join(root, str(i), str(j))
        os.makedirs(d)
        os.close(os.open(os.path.join(d, "f"), os.O_CREAT | os.O_WRONLY))  # uses d's descriptor
for i in range(top):
    for j in range(per):  # every directory again: evicted descriptors are reopened
        d = os.path.join(root, str(i), str(j))
        assert os.listdir(d) == ["f"], d
"""


@pytest.mark.fuse
def test_descriptor_bound_with_20000_directories(tmp_path):
    """The kernel holds all 20,000 directories (their dentries stay cached),
    yet the daemon keeps at most its bound of directory descriptors open."""
    from cryptfs.fs.dircache import DEFAULT_LIMIT

    base = scratch_dir(tmp_path)
    try:
        passfile = tmp_path / "password"
        init_cipherdir(base / "cipher", passfile)
        mount = Mount(base / "cipher", tmp_path / "plain", passfile, "openssl").start()
        try:
            before = daemon_status(mount)["fds"]
            subprocess.run([sys.executable, "-c", WIDE_TREE, str(mount.mountpoint / "t"),
                            "100", "200"], check=True, timeout=1800)
            after = daemon_status(mount)["fds"]
        finally:
            mount.stop()
        mount.check_log()
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)
    print(f"daemon descriptors: {before} before, {after} after 20,000 directories")
    assert after <= before + DEFAULT_LIMIT + 8


@pytest.mark.fuse
def test_directory_replaced_by_a_symlink_is_not_followed(tmp_path):
    """Behind the mount's back, a backing directory is swapped for a symlink
    to a copy of another encrypted directory outside the cipher directory.
    No operation through the mount reads or changes that copy: each fails
    or acts on the directory the mount knew.  ``--dir-fds 1`` makes the
    daemon reopen the directory (relative to its parent) on every use."""
    passfile = tmp_path / "password"
    cipher = tmp_path / "cipher"
    init_cipherdir(cipher, passfile)
    mount = Mount(cipher, tmp_path / "plain", passfile, "openssl",
                  extra=("--dir-fds", "1")).start()
    plain = mount.mountpoint
    try:
        (plain / "secret").mkdir()
        (plain / "secret" / "secret.txt").write_text("outside")
        (plain / "d").mkdir()
        (plain / "d" / "f").write_text("inside")
        (plain / "other").mkdir()
        before = {p for p in cipher.iterdir()}
        outside = tmp_path / "outside"
        secret_backing = [p for p in before if p.is_dir() and any(
            c.is_file() and c.name != "cryptfs.diriv" for c in p.iterdir())]
        assert len(secret_backing) == 2  # "secret" and "d" (each holds one file)
        os.stat(plain / "d" / "f")  # the kernel knows d's inode now
        d_backing = next(p for p in secret_backing
                         if any(c.stat().st_size == 4096 + 16 + 6 for c in p.iterdir()
                                if c.name != "cryptfs.diriv"))
        source = next(p for p in secret_backing if p != d_backing)
        subprocess.run(["cp", "-a", str(source), str(outside)], check=True)
        snapshot = {p.name: p.read_bytes() for p in outside.iterdir()}
        os.rename(d_backing, tmp_path / "moved-away")
        os.symlink(outside, d_backing)
        (plain / "other" / "x").write_text("evicts d's descriptor")
        attempts = [
            lambda: os.listdir(plain / "d"),
            lambda: (plain / "d" / "secret.txt").read_text(),
            lambda: (plain / "d" / "new").write_text("x"),
            lambda: os.mkdir(plain / "d" / "sub"),
            lambda: os.unlink(plain / "d" / "secret.txt"),
            lambda: os.rename(plain / "d" / "secret.txt", plain / "d" / "y"),
            lambda: os.setxattr(plain / "d" / "secret.txt", "user.x", b"1"),
            lambda: os.chmod(plain / "d" / "secret.txt", 0o777),
            lambda: os.stat(plain / "d" / "secret.txt"),
        ]
        for attempt in attempts:
            try:
                result = attempt()
            except OSError:
                continue
            assert result is None or "secret.txt" not in result and result != "outside"
        time.sleep(1.2)  # past the kernel's entry timeout: d is looked up afresh
        for attempt in attempts:
            with pytest.raises(OSError):
                attempt()
        assert {p.name: p.read_bytes() for p in outside.iterdir()} == snapshot
    finally:
        mount.stop()
    mount.expected_log += ["symlink target", "does not decrypt"]
    mount.check_log(allowed=("readlink", "getattr", "lookup"))
