"""Load and interference: many concurrent clients, concurrent O_APPEND,
backing files changed behind the mount, and a soak loop whose memory and
descriptor use must not keep growing."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

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


def test_backing_changed_behind_the_mount(cryptfs_mount, mnt):
    cryptfs_mount.expected_log.append("final page")  # the truncated file is logged
    cipher = cryptfs_mount.cipherdir
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


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()


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
