"""The mount life cycle as users meet it, with real mounts: a daemon killed
with SIGKILL, non-empty mount points, a second mount of one cipher
directory, busy and lazy unmounts, and key changes on a cipher directory
that cannot be written."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cryptfs.daemon.lock import LOCK_NAME, lock_for_check
from cryptfs.errors import ExitCode
from tests.conftest import (
    MOUNT_TIMEOUT,
    Mount,
    cryptfs_cmd,
    init_cipherdir,
    small_tmpfs,
)
from tests.helpers.cli import FAST_KDF, cryptfs, is_mounted

HELPERS = Path(__file__).resolve().parent / "helpers"
VENV_BIN = Path(sys.executable).parent


def one_line(proc: subprocess.CompletedProcess) -> str:
    """An expected error: one line on stderr, never a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def lock_is_free(cipher: Path) -> bool:
    with open(cipher / LOCK_NAME, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def wait_lock_free(cipher: Path) -> None:
    """The daemon has ended (and released its lock)."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not lock_is_free(cipher):
        assert time.monotonic() < deadline, "the daemon still holds the lock"
        time.sleep(0.05)


def lock_holders(cipher: Path) -> list[int]:
    """Processes with the lock file open, and their descriptor's flags."""
    target = os.path.realpath(cipher / LOCK_NAME)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.append((int(pid), int(fd)))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return found


def listing_errno(path: Path) -> int:
    try:
        os.listdir(path)
    except OSError as exc:
        return exc.errno
    return 0


@pytest.fixture
def dirs(tmp_path):
    """A cipher directory, a password file, and mount points; whatever a
    test leaves mounted (dead or alive) is detached afterwards."""
    cipher, passfile = tmp_path / "cipher", tmp_path / "pw"
    init_cipherdir(cipher, passfile)
    passfile.chmod(0o600)
    (tmp_path / "plain").mkdir()
    (tmp_path / "other").mkdir()
    yield cipher, tmp_path / "plain", tmp_path / "other", passfile
    for mountpoint in (tmp_path / "plain", tmp_path / "other"):
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    for pid, _ in lock_holders(cipher):
        os.kill(pid, signal.SIGKILL)


def kill_daemon(mount: Mount) -> None:
    mount.proc.kill()
    assert mount.proc.wait(MOUNT_TIMEOUT) == -signal.SIGKILL
    mount.proc = None
    assert listing_errno(mount.mountpoint) == errno.ENOTCONN  # the dead mount users meet


@pytest.mark.fuse
def test_mount_again_after_sigkill(dirs):
    cipher, plain, _, passfile = dirs
    mount = Mount(cipher, plain, passfile, "openssl").start()
    data = os.urandom(100_000)
    with open(plain / "kept", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    kill_daemon(mount)
    proc = cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "died" in line] == [
        f"cryptfs: {plain}: the previous cryptfs daemon there had died; detached its dead mount"]
    assert (plain / "kept").read_bytes() == data
    cryptfs("unmount", str(plain))
    assert not is_mounted(plain)
    assert lock_is_free(cipher)  # cryptfs unmount returns once the daemon has ended
    mount.check_log()


@pytest.mark.fuse
def test_unmount_of_a_dead_mount(dirs):
    cipher, plain, _, passfile = dirs
    kill_daemon(Mount(cipher, plain, passfile, "openssl").start())
    proc = cryptfs("unmount", str(plain))
    assert "its daemon had died; detached the dead mount" in one_line(proc)
    assert not is_mounted(plain) and listing_errno(plain) == 0


@pytest.mark.fuse
def test_dead_mount_of_another_filesystem_is_left_alone(dirs):
    cipher, plain, _, passfile = dirs
    other = subprocess.Popen([sys.executable, str(HELPERS / "other_fuse.py"), str(plain)])
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(plain):
        assert other.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    other.kill()
    other.wait()
    assert listing_errno(plain) == errno.ENOTCONN
    proc = cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile), check=False)
    assert proc.returncode == ExitCode.USAGE
    assert f"dead fuse.othertest mount; detach it with 'fusermount3 -uz {plain}'" in \
        one_line(proc)
    proc = cryptfs("unmount", str(plain), check=False)
    assert proc.returncode == ExitCode.USAGE and "not a cryptfs mount" in one_line(proc)
    assert is_mounted(plain)  # not ours: untouched (the fixture detaches it)


@pytest.mark.fuse
def test_non_empty_mount_point(dirs):
    cipher, plain, _, passfile = dirs
    (plain / "underneath").write_text("hidden by a mount")
    proc = cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile), check=False)
    assert proc.returncode == ExitCode.USAGE
    assert "is not empty" in one_line(proc) and "--nonempty" in proc.stderr
    assert not is_mounted(plain)
    forms = [cryptfs_cmd("mount", str(cipher), str(plain), "--passfile", str(passfile),
                         "--nonempty"),
             cryptfs_cmd(str(cipher), str(plain), "-o", f"nonempty,passfile={passfile}")]
    helper = shutil.which("mount.fuse3", path=f"{os.environ['PATH']}:/sbin:/usr/sbin")
    if helper:  # what mount -t fuse.cryptfs runs; it finds cryptfs on PATH
        forms.append([helper, str(cipher), str(plain), "-t", "fuse.cryptfs", "-o",
                      f"nonempty,passfile={passfile}"])
    for argv in forms:
        subprocess.run(argv, check=True, capture_output=True, timeout=MOUNT_TIMEOUT,
                       env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
        assert not (plain / "underneath").exists()
        (plain / "inside").write_text("encrypted")
        cryptfs("unmount", str(plain))
        assert (plain / "underneath").read_text() == "hidden by a mount"
        assert lock_is_free(cipher)


@pytest.mark.fuse
def test_second_mount_refused_until_the_first_is_killed(dirs):
    cipher, plain, other, passfile = dirs
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))  # daemonized
    (plain / "f").write_text("first mount")
    # The detached daemon holds the lock (the parent that took it has exited),
    # and its descriptor is close-on-exec: no program it starts inherits it.
    ((daemon, fd),) = lock_holders(cipher)
    flags = Path(f"/proc/{daemon}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
    assert int(flags, 8) & os.O_CLOEXEC
    # refused before any password is asked for (no --passfile, no terminal)
    proc = cryptfs("mount", str(cipher), str(other), check=False)
    assert proc.returncode == ExitCode.MOUNTED
    assert f"is already mounted on {plain}" in one_line(proc)
    assert not is_mounted(other)
    proc = cryptfs(str(cipher), str(other), "-o", f"passfile={passfile}", check=False)
    assert proc.returncode == ExitCode.MOUNTED  # also through mount(8)'s form
    os.kill(daemon, signal.SIGKILL)
    wait_lock_free(cipher)
    cryptfs("mount", str(cipher), str(other), "--passfile", str(passfile))
    assert (other / "f").read_text() == "first mount"
    cryptfs("unmount", str(other))
    assert lock_is_free(cipher)
    assert "had died" in cryptfs("unmount", str(plain)).stderr  # the first, dead


def raw_fsck_problems(cipher: Path, passfile: Path, *extra: str) -> list:
    """fsck's JSON problem list as it is (unlike conftest's ``fsck_problems``:
    any options, unsorted, the exit code left to ``cryptfs``)."""
    proc = cryptfs("fsck", str(cipher), "--passfile", str(passfile), "--json", *extra)
    return json.loads(proc.stdout)["problems"]


@pytest.mark.fuse
def test_fsck_refuses_a_mounted_directory(dirs):
    """A mounted directory changes under fsck's walk: fsck refuses it in
    one line naming the mount point (before any password is asked for),
    unless --force.  A never-mounted directory gets no lock file from it."""
    cipher, plain, _, passfile = dirs
    assert raw_fsck_problems(cipher, passfile) == []
    assert not (cipher / LOCK_NAME).exists()
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    (plain / "f").write_text("mounted")
    proc = cryptfs("fsck", str(cipher), check=False)  # no --passfile, no terminal
    assert proc.returncode == ExitCode.MOUNTED
    line = one_line(proc)
    assert f"is already mounted on {plain}" in line and "fsck --force" in line
    proc = cryptfs("fsck", str(cipher), "--passfile", str(passfile), "--force")
    assert f"is already mounted on {plain}" in proc.stderr and "--force" in proc.stderr
    assert "no problems" in proc.stdout
    cryptfs("unmount", str(plain))
    assert raw_fsck_problems(cipher, passfile) == []


@pytest.mark.fuse
def test_no_mount_while_fsck_runs(dirs):
    """fsck holds the lock exclusive for its run: a mount is refused (after
    its grace period for an ending daemon), a --shared mount and another
    fsck too (fsck --repair changes the directory)."""
    cipher, plain, _, passfile = dirs
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    cryptfs("unmount", str(plain))  # leaves the lock file
    with lock_for_check(cipher):
        proc = cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile),
                       check=False)
        assert proc.returncode == ExitCode.MOUNTED
        assert "being checked by cryptfs fsck" in one_line(proc)
        assert not is_mounted(plain)
        proc = cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile),
                       "--shared", check=False)
        assert proc.returncode == ExitCode.MOUNTED
        assert "being checked by cryptfs fsck" in one_line(proc)
        assert not is_mounted(plain)
        proc = cryptfs("fsck", str(cipher), "--passfile", str(passfile), check=False)
        assert proc.returncode == ExitCode.MOUNTED
        assert "being checked by cryptfs fsck" in one_line(proc)
    assert raw_fsck_problems(cipher, passfile) == []
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    cryptfs("unmount", str(plain))


def test_fsck_with_a_lock_file_it_cannot_open(caplog):
    """Another user's lock file (mode 0600) in a directory it can read:
    fsck's lock cannot tell whether the directory is mounted, says so, and
    lets the check go on."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    with tempfile.TemporaryDirectory() as where:  # pytest's tmp_path is root's alone
        cipher = Path(where)
        cipher.chmod(0o755)
        (cipher / LOCK_NAME).touch(mode=0o600)
        os.seteuid(65534)
        try:
            with lock_for_check(cipher):
                pass
        finally:
            os.seteuid(0)
    assert "not known whether" in caplog.text and "Permission denied" in caplog.text


@pytest.mark.fuse
def test_busy_unmount_then_lazy(dirs):
    cipher, plain, _, passfile = dirs
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    with open(plain / "open", "wb") as f:
        f.write(b"before ")
        proc = cryptfs("unmount", str(plain), check=False)
        assert proc.returncode == ExitCode.BUSY
        line = one_line(proc)
        assert "busy" in line and f"fuser -m {plain}" in line
        assert f"cryptfs unmount --lazy {plain}" in line
        assert is_mounted(plain)
        proc = cryptfs("unmount", "--lazy", str(plain))
        assert "detached" in one_line(proc)
        assert not is_mounted(plain)
        f.write(b"after the lazy unmount")  # the open file still works
        assert not lock_is_free(cipher)  # and its daemon still serves it
    wait_lock_free(cipher)  # last file closed: the daemon ended
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    assert (plain / "open").read_bytes() == b"before after the lazy unmount"
    cryptfs("unmount", str(plain))
    assert lock_is_free(cipher)


def test_unmount_of_what_is_not_mounted(dirs):
    _, plain, _, _ = dirs
    proc = cryptfs("unmount", str(plain), check=False)
    assert proc.returncode == ExitCode.USAGE and "is not mounted" in one_line(proc)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


@pytest.mark.fuse
def test_read_only_cipher_directory(tmp_path):
    """Key changes and read-write mounts say so in one line (before any
    password is asked for); --ro mounts, locked where a lock file exists."""
    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        cipher, never, fresh, passfile = fs / "cipher", fs / "never", fs / "fresh", tmp_path / "pw"
        plain, other = tmp_path / "plain", tmp_path / "other"
        plain.mkdir()
        other.mkdir()
        for path in (cipher, never):
            init_cipherdir(path, passfile)
        passfile.chmod(0o600)
        cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
        (plain / "f").write_text("written before the remount")
        cryptfs("unmount", str(plain))  # leaves cryptfs.lock behind; `never` has none
        fresh.mkdir()
        remount_read_only(fs)
        new = tmp_path / "new"
        new.write_text("new password\n")
        new.chmod(0o600)
        for args in (("passwd", str(cipher), "--new-passfile", str(new)),
                     ("key", "add", str(cipher), "--new-passfile", str(new), *FAST_KDF),
                     ("key", "remove", str(cipher), "0"),
                     ("init", str(fresh), *FAST_KDF),
                     ("mount", str(cipher), str(plain))):
            proc = cryptfs(*args, "--passfile", str(passfile), check=False)
            assert proc.returncode == ExitCode.CIPHERDIR, (args, proc.stderr)
            assert "read-only filesystem" in one_line(proc)
        assert "(mount it with --ro)" in proc.stderr
        assert "slot 0" in cryptfs("key", "list", str(cipher)).stdout
        mount = Mount(cipher, plain, passfile, "openssl", extra=("--ro",)).start()
        assert (plain / "f").read_text() == "written before the remount"
        proc = cryptfs("mount", "--ro", str(cipher), str(other), check=False)
        assert proc.returncode == ExitCode.MOUNTED  # the existing lock file still locks
        mount.stop()
        mount.check_log()
        mount = Mount(never, plain, passfile, "openssl", extra=("--ro",)).start()
        assert os.listdir(plain) == []
        mount.stop()
        mount.check_log()


def test_key_change_on_a_full_disk(tmp_path):
    with small_tmpfs(tmp_path / "fs", "1m") as fs:
        cipher, passfile = fs / "cipher", tmp_path / "pw"
        init_cipherdir(cipher, passfile)
        passfile.chmod(0o600)
        before = (cipher / "cryptfs.conf").read_bytes()
        with open(fs / "filler", "wb", buffering=0) as f, pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 65536)
        assert full.value.errno == errno.ENOSPC
        new = tmp_path / "new"
        new.write_text("new password\n")
        new.chmod(0o600)
        proc = cryptfs("passwd", str(cipher), "--passfile", str(passfile), "--new-passfile",
                       str(new), check=False)
        assert proc.returncode == ExitCode.CIPHERDIR
        assert "cannot write the key file" in one_line(proc) and "No space left" in proc.stderr
        assert (cipher / "cryptfs.conf").read_bytes() == before
