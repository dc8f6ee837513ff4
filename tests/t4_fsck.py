"""cryptfs fsck: a clean directory passes; every kind of damage is reported,
with the plaintext path where it can be known, and exit code 20."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cryptfs.errors import ExitCode
from tests.conftest import MOUNT_TIMEOUT, Mount, cryptfs_cmd, init_cipherdir, require_fuse


def fsck(cipher: Path, passfile: Path) -> tuple[int, dict]:
    proc = subprocess.run(cryptfs_cmd("fsck", str(cipher), "--passfile", str(passfile), "--json"),
                          capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture
def populated(tmp_path):
    """A cipher directory with one of everything, and a map from plaintext
    names to their backing paths."""
    require_fuse()
    passfile = tmp_path / "pw"
    cipher = tmp_path / "cipher"
    init_cipherdir(cipher, passfile)
    mount = Mount(cipher, tmp_path / "plain", passfile, "openssl").start()
    plain = mount.mountpoint
    backing = {}

    def make(name, action):
        before = set(cipher.rglob("*"))
        action(plain / name)
        (entry,) = [p for p in set(cipher.rglob("*")) - before
                    if p.name != "cryptfs.diriv" and not p.name.endswith(".name")]
        backing[name] = entry

    try:
        make("dir", lambda p: p.mkdir())
        for name in ("dir/header", "dir/size", "dir/trailer", "dir/xattr", "healthy",
                     "dir/magic", "dir/version"):
            make(name, lambda p: p.write_bytes(os.urandom(10000)))
        make("dir/link", lambda p: os.symlink("target", p))
        make("L" * 200, lambda p: p.write_text("long name"))
        os.setxattr(plain / "dir/xattr", "user.note", b"value")
    finally:
        mount.stop()
    return cipher, passfile, backing


def test_clean_directory_passes(populated):
    cipher, passfile, _ = populated
    code, report = fsck(cipher, passfile)
    assert code == 0 and report["problems"] == [] and report["files"] >= 8


def test_every_kind_of_damage_is_reported(populated):
    cipher, passfile, backing = populated
    with open(backing["dir/header"], "r+b") as f:
        f.seek(40)
        f.write(b"\xff")
    os.truncate(backing["dir/size"], 4100)
    with open(backing["dir/magic"], "r+b") as f:
        f.write(b"GOCRYPTF")
    with open(backing["dir/version"], "r+b") as f:
        f.seek(9)
        f.write(b"\x07")
    os.truncate(backing["dir/trailer"], backing["dir/trailer"].stat().st_size - 3)
    stored = next(n for n in os.listxattr(backing["dir/xattr"]) if n.startswith("user."))
    os.setxattr(backing["dir/xattr"], stored, b"\0" * 40)
    link = backing["dir/link"]
    os.unlink(link)
    os.symlink("bm90IGVuY3J5cHRlZA", link)
    (cipher / "foreign.txt").write_text("dropped in")
    long_entry = backing["L" * 200]
    Path(str(long_entry) + ".name").unlink()  # the sidecar of a long name
    (cipher / ("cryptfs.longname." + "A" * 43 + ".name")).write_text("orphan")

    code, report = fsck(cipher, passfile)
    assert code == ExitCode.FSCK_PROBLEMS
    found = {(p["kind"], p["plaintext"]) for p in report["problems"]}
    expected = {
        ("header-mac", "/dir/header"),
        ("header", "/dir/magic"),
        ("version", "/dir/version"),
        ("size", "/dir/size"),
        ("final-page", "/dir/trailer"),
        ("xattr", "/dir/xattr"),
        ("symlink", "/dir/link"),
        ("name", None),  # foreign.txt
        ("sidecar", None),  # long name without sidecar, and the orphan sidecar
    }
    assert expected <= found, report["problems"]
    assert len([p for p in report["problems"] if p["kind"] == "sidecar"]) == 2
    assert not any(p["plaintext"] == "/healthy" for p in report["problems"])


def test_missing_directory_iv(populated):
    cipher, passfile, backing = populated
    (backing["dir"] / "cryptfs.diriv").unlink()
    code, report = fsck(cipher, passfile)
    assert code == ExitCode.FSCK_PROBLEMS
    # derivable (convergent IVs): reported as such, and what is inside is
    # checked with the derived IV (random IVs: tests/t4_convergent.py)
    assert [(p["kind"], p["plaintext"]) for p in report["problems"]] == [
        ("diriv-missing", "/dir")]


def test_deep_tree_passes(tmp_path):
    """Backing paths longer than PATH_MAX (100-byte names, ~3,900 bytes of
    plaintext path): fsck walks by descriptors and checks everything."""
    passfile, cipher = tmp_path / "pw", tmp_path / "cipher"
    init_cipherdir(cipher, passfile)
    mount = Mount(cipher, tmp_path / "plain", passfile, "openssl").start()
    try:
        deep = str(mount.mountpoint)
        while len(deep) + 202 <= 3900:
            deep += "/" + "d" * 100
        os.makedirs(deep)
        Path(deep, "f" * 100).write_bytes(os.urandom(10000))
    finally:
        mount.stop()
    code, report = fsck(cipher, passfile)
    assert code == 0 and report["problems"] == [] and report["files"] == 1


def test_unreadable_directory_is_reported_and_the_walk_goes_on(populated):
    cipher, passfile, backing = populated
    os.truncate(backing["healthy"], 4100)  # damage after the unreadable directory
    os.chmod(backing["dir"], 0)
    cmd = cryptfs_cmd("fsck", str(cipher), "--passfile", str(passfile), "--json")
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that allow it
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to run fsck as root without DAC override")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    finally:
        os.chmod(backing["dir"], 0o755)
    assert proc.returncode == ExitCode.FSCK_PROBLEMS, proc.stderr
    found = {(p["kind"], p["plaintext"]) for p in json.loads(proc.stdout)["problems"]}
    assert found == {("io", "/dir"), ("size", "/healthy")}


def test_human_report_and_wrong_password(populated, tmp_path):
    cipher, passfile, backing = populated
    os.truncate(backing["dir/size"], 4100)
    proc = subprocess.run(cryptfs_cmd("fsck", str(cipher), "--passfile", str(passfile)),
                          capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    assert proc.returncode == ExitCode.FSCK_PROBLEMS
    assert "/dir/size" in proc.stdout and "1 problems" in proc.stdout
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    proc = subprocess.run(cryptfs_cmd("fsck", str(cipher), "--passfile", str(wrong)),
                          capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    assert proc.returncode == ExitCode.PASSWORD


def test_progress_line(capsys):
    from cryptfs.tools.fsck import Progress

    progress = Progress(total_files=10, total_bytes=10 << 20, enabled=True)
    progress._last = 0  # force an update now
    progress.add(files=3, nbytes=4 << 20)
    progress.done()
    err = capsys.readouterr().err
    assert "3/10 files" in err and "4/10 MiB" in err and "MB/s" in err and "ETA" in err


def test_stale_key_file_copies_are_reported(populated):
    """A key file backup an older cryptfs left, or the temporary file of an
    interrupted write, still opens with old passwords: fsck names them."""
    cipher, passfile, _ = populated
    (cipher / "cryptfs.conf.bak").write_bytes((cipher / "cryptfs.conf").read_bytes())
    (cipher / "cryptfs.conf.tmp-0badf00d").write_bytes(b"{}")
    code, report = fsck(cipher, passfile)
    assert code == ExitCode.FSCK_PROBLEMS
    assert sorted((p["kind"], p["backing"]) for p in report["problems"]) == [
        ("stale-keyfile", "cryptfs.conf.bak"), ("stale-keyfile", "cryptfs.conf.tmp-0badf00d")]
