"""The command line as users run it: real processes, real mounts, mount(8)
and fstab, exit codes and messages, password changes and key slots."""

from __future__ import annotations

import errno
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cryptfs.cli.mounting import check_allow_other
from cryptfs.errors import CryptfsError, ExitCode
from tests.conftest import (
    MOUNT_TIMEOUT,
    PASSWORD,
    Mount,
    afalg_engine,
    cryptfs_cmd,
)
from tests.helpers.cli import FAST_KDF, cryptfs, is_mounted
from tests.helpers.keys import files_opening_with

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.ismount(mountpoint)


def wait_unmounted(mountpoint: Path, timeout: float = MOUNT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while is_mounted(mountpoint):
        assert time.monotonic() < deadline, f"{mountpoint} is still mounted"
        time.sleep(0.1)


@pytest.fixture
def setup(tmp_path):
    cipher, plain, passfile = tmp_path / "cipher", tmp_path / "plain", tmp_path / "pw"
    cipher.mkdir()
    plain.mkdir()
    passfile.write_text(PASSWORD + "\n")
    passfile.chmod(0o600)
    init = cryptfs("init", str(cipher), "--passfile", str(passfile), *FAST_KDF)
    code = re.search(r"([A-Z2-7]{5}-){10}[A-Z2-7]{5}", init.stdout).group(0)
    yield cipher, plain, passfile, code
    if os.path.ismount(plain):
        subprocess.run(["fusermount3", "-u", "-z", str(plain)], capture_output=True)


@pytest.fixture
def helpers():
    """cryptfs where mount.fuse3 finds it and mount.cryptfs where mount(8)
    finds it (as `cryptfs install-helpers` does), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mount(8) tests need root")
    links = [(Path("/usr/local/bin/cryptfs"), VENV_BIN / "cryptfs"),
             (Path("/sbin/mount.cryptfs"), VENV_BIN / "mount.cryptfs")]
    created = []
    for link, target in links:
        if link.is_symlink() or link.exists():
            if link.resolve() != target.resolve():
                pytest.skip(f"{link} belongs to another cryptfs installation")
            continue
        link.symlink_to(target)
        created.append(link)
    yield
    for link in created:
        link.unlink()


@pytest.mark.fuse
def test_init_mount_write_unmount_remount_read(setup):
    cipher, plain, passfile, _ = setup
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    (plain / "hello").write_text("written right after mount returned")  # ready at once
    # Large writes and fsync run on worker threads, which must exist in the
    # detached daemon (threads do not survive its fork).
    subprocess.run(["dd", "if=/dev/urandom", f"of={plain}/big", "bs=1M", "count=3",
                    "conv=fsync"], check=True, capture_output=True, timeout=120)
    big = (plain / "big").read_bytes()
    unmount(plain)
    assert not (plain / "hello").exists()
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    assert (plain / "hello").read_text() == "written right after mount returned"
    assert (plain / "big").read_bytes() == big and len(big) == 3 << 20
    cryptfs("unmount", str(plain))
    wait_unmounted(plain)


@pytest.mark.fuse
def test_success_is_quiet_and_verbose_names_the_engine(setup):
    """A mount or fsck that works says one short line at most (as mount(8)
    and gocryptfs); which engine and why is for -v and ``cryptfs info``."""
    cipher, plain, passfile, _ = setup
    mount = cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    assert mount.stdout == ""
    assert mount.stderr.splitlines() == [f"cryptfs: mounted {cipher} on {plain}"]
    unmount(plain)
    wait_unmounted(plain)
    fsck = cryptfs("fsck", str(cipher), "--passfile", str(passfile))
    assert fsck.stderr == "" and len(fsck.stdout.splitlines()) == 1, fsck
    for verbose in (["fsck", "-v"], ["-v", "fsck"]):
        loud = cryptfs(*verbose, str(cipher), "--passfile", str(passfile))
        assert "engine" in loud.stderr and len(loud.stderr.splitlines()) == 1, loud
    info = cryptfs("info", str(cipher))
    assert info.stderr == "" and "engine here:" in info.stdout


@pytest.mark.fuse
def test_mount_t_fuse_cryptfs_and_umount(setup, helpers):
    cipher, plain, passfile, _ = setup
    subprocess.run(["mount", "-t", "fuse.cryptfs", str(cipher), str(plain),
                    "-o", f"passfile={passfile},nodev,nosuid"], check=True, env={"PATH": ""},
                   executable="/usr/bin/mount", timeout=MOUNT_TIMEOUT)
    (plain / "f").write_text("via mount -t fuse.cryptfs")
    assert "nodev" in [line for line in Path("/proc/mounts").read_text().splitlines()
                       if str(plain) in line][0]
    subprocess.run(["umount", str(plain)], check=True)
    wait_unmounted(plain)
    subprocess.run(["mount", "-t", "cryptfs", str(cipher), str(plain),
                    "-o", f"passfile={passfile}"], check=True, timeout=MOUNT_TIMEOUT)
    assert (plain / "f").read_text() == "via mount -t fuse.cryptfs"
    subprocess.run(["umount", str(plain)], check=True)


@pytest.mark.fuse
@pytest.mark.parametrize("fstype", ["fuse.cryptfs", "cryptfs"])
def test_fstab_line(setup, helpers, tmp_path, fstype):
    cipher, plain, passfile, _ = setup
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{cipher} {plain} {fstype} "
                     f"noauto,nofail,x-systemd.automount,passfile={passfile} 0 0\n")
    subprocess.run(["mount", "-T", str(fstab), str(plain)], check=True, timeout=MOUNT_TIMEOUT)
    (plain / "via-fstab").write_text("ok")
    subprocess.run(["umount", str(plain)], check=True)
    wait_unmounted(plain)
    subprocess.run(["mount", "-T", str(fstab), str(plain)], check=True, timeout=MOUNT_TIMEOUT)
    assert (plain / "via-fstab").read_text() == "ok"
    subprocess.run(["umount", str(plain)], check=True)


def test_mount_failures_have_reasons_and_exit_codes(setup, tmp_path):
    cipher, plain, passfile, _ = setup
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    cases = [
        (("mount", str(cipher), str(plain), "--passfile", str(wrong)), ExitCode.PASSWORD,
         "wrong password"),
        (("mount", str(cipher), str(tmp_path / "nope"), "--passfile", str(passfile)),
         ExitCode.USAGE, "does not exist"),
        (("mount", str(tmp_path), str(plain), "--passfile", str(passfile)), ExitCode.CIPHERDIR,
         "cryptfs init"),
        (("mount", str(tmp_path / "missing"), str(plain), "--passfile", str(passfile)),
         ExitCode.CIPHERDIR, "does not exist"),
        ((str(cipher), str(plain), "-o", "bogus"), ExitCode.USAGE, "unknown mount option"),
        (("init", str(cipher), "--passfile", str(passfile)), ExitCode.CIPHERDIR, "already"),
    ]
    for args, code, message in cases:
        proc = cryptfs(*args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
        assert not os.path.ismount(plain)


def test_init_refuses_non_empty_directory(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "stuff").write_text("x")
    (tmp_path / "pw").write_text("pw\n")
    proc = cryptfs("init", str(tmp_path / "c"), "--passfile", str(tmp_path / "pw"), check=False)
    assert proc.returncode == ExitCode.CIPHERDIR and "not empty" in proc.stderr


@pytest.mark.fuse
def test_sigterm_unmounts_cleanly_with_data(setup):
    cipher, plain, passfile, _ = setup
    mount = Mount(cipher, plain, passfile, "auto").start()
    data = os.urandom(3 << 20)
    with open(plain / "big", "wb") as f:
        f.write(data)
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(MOUNT_TIMEOUT) == 0
    wait_unmounted(plain)
    mount.proc = None
    mount.start()
    assert (plain / "big").read_bytes() == data
    mount.stop()
    mount.check_log()


@pytest.mark.fuse
def test_passwd_key_slots_and_recovery(setup, tmp_path):
    cipher, plain, passfile, code = setup
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    (plain / "data").write_text("survives key changes")
    unmount(plain)
    new = tmp_path / "new"
    new.write_text("brand new password\n")
    new.chmod(0o600)
    (cipher / "cryptfs.conf.bak").write_bytes((cipher / "cryptfs.conf").read_bytes())  # old cryptfs
    out = cryptfs("passwd", str(cipher), "--passfile", str(passfile), "--new-passfile",
                  str(new)).stdout
    assert "deleted cryptfs.conf.bak" in out
    assert "still open this cipher directory with the old password" in out
    assert "rekey) is not offered yet" in out
    assert files_opening_with(cipher, PASSWORD.encode()) == []
    assert sorted(p.name for p in cipher.iterdir() if p.name.startswith("cryptfs.conf")) == \
        ["cryptfs.conf"]
    proc = cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile), check=False)
    assert proc.returncode == ExitCode.PASSWORD
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(new))
    assert (plain / "data").read_text() == "survives key changes"
    unmount(plain)
    # a second password in its own slot
    second = tmp_path / "second"
    second.write_text("second password\n")
    second.chmod(0o600)
    cryptfs("key", "add", str(cipher), "--passfile", str(new), "--new-passfile", str(second),
            "--label", "laptop", *FAST_KDF)
    listing = cryptfs("key", "list", str(cipher)).stdout
    assert "slot 0" in listing and "slot 1" in listing and "laptop" in listing
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(second))
    assert (plain / "data").read_text() == "survives key changes"
    unmount(plain)
    out = cryptfs("key", "remove", str(cipher), "0", "--passfile", str(second)).stdout
    assert "still open this cipher directory with the old password" in out
    assert files_opening_with(cipher, b"brand new password") == []
    assert cryptfs("mount", str(cipher), str(plain), "--passfile", str(new),
                   check=False).returncode == ExitCode.PASSWORD
    assert cryptfs("key", "remove", str(cipher), "1", "--passfile", str(second),
                   check=False).returncode == ExitCode.USAGE  # never the last slot
    # the recovery code unlocks even though slot 0 is gone
    recovery = tmp_path / "recovery"
    recovery.write_text(code.lower() + "\n")
    recovery.chmod(0o600)
    cryptfs("mount", str(cipher), str(plain), "--recovery", "--passfile", str(recovery))
    assert (plain / "data").read_text() == "survives key changes"
    unmount(plain)
    for position in (3, len(code) - 1):  # any mistyped character is caught
        typo = "A" if code[position] != "A" else "B"
        recovery.write_text(code[:position] + typo + code[position + 1:] + "\n")
        proc = cryptfs("mount", str(cipher), str(plain), "--recovery", "--passfile",
                       str(recovery), check=False)
        assert proc.returncode == ExitCode.PASSWORD and "mistyped" in proc.stderr


@pytest.mark.fuse
def test_mount_deletes_an_old_key_file_backup(setup):
    """A backup left by cryptfs before issue 12 still opens with old
    passwords: a read-write mount deletes it (and says so), --ro leaves it."""
    cipher, plain, passfile, _ = setup
    backup = cipher / "cryptfs.conf.bak"
    backup.write_bytes((cipher / "cryptfs.conf").read_bytes())
    mount = Mount(cipher, plain, passfile, "openssl", extra=("--ro",)).start()
    mount.stop()
    assert backup.exists()
    mount = Mount(cipher, plain, passfile, "openssl").start()
    mount.stop()
    assert not backup.exists()
    mount.check_log(allowed=("deleted cryptfs.conf.bak",))
    assert "deleted cryptfs.conf.bak" in mount.log()


@pytest.mark.fuse
def test_extpass_and_passfile_warning(setup):
    cipher, plain, passfile, _ = setup
    cryptfs("mount", str(cipher), str(plain), "--extpass", f"cat {passfile}")
    unmount(plain)
    passfile.chmod(0o644)
    proc = cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    assert "accessible by other users" in proc.stderr
    unmount(plain)


@pytest.mark.fuse
def test_read_only(setup):
    cipher, plain, passfile, _ = setup
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile))
    (plain / "f").write_text("x")
    unmount(plain)
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile), "--ro")
    assert (plain / "f").read_text() == "x"
    for action in (lambda: (plain / "g").write_text("y"), lambda: (plain / "d").mkdir(),
                   lambda: os.unlink(plain / "f"), lambda: os.open(plain / "f", os.O_WRONLY)):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EROFS
    unmount(plain)


@pytest.mark.fuse
def test_idle_unmount(setup):
    cipher, plain, passfile, _ = setup
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile), "--idle", "2")
    (plain / "f").write_text("x")
    wait_unmounted(plain, timeout=60)


def test_info_shows_no_key_material(setup):
    cipher, _, passfile, code = setup
    out = cryptfs("info", str(cipher))
    text = out.stdout + out.stderr
    assert "format version:   1" in text and "slot 0: password" in text and "engine" in text
    # the kernel engine timed against userspace where it is used, else why not
    assert "engine timing:    kernel engine vs openssl" in text \
        or "engine timing:    none: the kernel engine is not used here" in text
    assert code not in text and code.replace("-", "") not in text


def test_speed_measures_every_engine_here(tmp_path):
    """`cryptfs speed` times each engine, or says why one is unavailable."""
    proc = cryptfs("speed", "--seconds", "0.02", "--dir", str(tmp_path), "--json")
    results = {r["label"]: r for r in json.loads(proc.stdout)}
    openssl = results["openssl (native EVP helper)"]["mb_per_s"]
    assert set(openssl) == {"encrypt 4 KiB", "decrypt 4 KiB", "encrypt 64 KiB", "decrypt 64 KiB"}
    assert all(v > 0 for v in openssl.values())
    assert any(label.startswith("afalg") for label in results)  # a figure or a reason
    text = cryptfs("speed", "--seconds", "0.02", "--dir", str(tmp_path)).stdout
    assert "openssl (cryptography)" in text and "MB/s" in text and "Fastest here" in text
    # the kernel engine's ratio to userspace, or that there is none
    assert "Kernel engine: not usable here" in text or "afalg (vmsplice) / openssl" in text \
        or "afalg (sendmsg copies) / openssl" in text
    assert not list(tmp_path.iterdir())  # the test backing file is gone


@pytest.mark.afalg
def test_speed_times_the_kernel_engine(tmp_path):
    afalg_engine()  # skip here, fail in the VM, if AF_ALG is missing
    proc = cryptfs("speed", "--seconds", "0.02", "--dir", str(tmp_path), "--json")
    kernel = [r for r in json.loads(proc.stdout) if r["label"].startswith("afalg (")]
    assert any(r["unavailable"] is None and len(r["mb_per_s"]) == 4 for r in kernel), kernel


def test_help_everywhere():
    for args in ([], ["init"], ["mount"], ["passwd"], ["key"], ["key", "add"], ["info"],
                 ["unmount"], ["install-helpers"], ["fsck"], ["speed"]):
        proc = cryptfs(*args, "--help")
        assert "usage:" in proc.stdout


def test_readme_exit_codes_are_the_enum():
    """README.md's table is exactly what scripts/exit-codes renders from
    ``ExitCode``: a missing, extra, renumbered or reworded code fails."""
    script = runpy.run_path(str(REPO / "scripts/exit-codes"))
    source = (REPO / "cryptfs/errors.py").read_text()
    rows = script["exit_codes"](source)
    assert [(value, name) for value, name, _ in rows] == [(c.value, c.name) for c in ExitCode]
    readme = (REPO / "README.md").read_text()
    assert script["readme_copy"](readme) == script["table"](source), \
        "README.md's exit codes differ from ExitCode: run scripts/exit-codes --write"


@pytest.mark.fuse
def test_systemd_notify(setup, tmp_path):
    import socket

    cipher, plain, passfile, _ = setup
    address = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(MOUNT_TIMEOUT)
    try:
        env = {**os.environ, "NOTIFY_SOCKET": address}
        cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile), env=env)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()
        unmount(plain)


def test_readme_fstab_example_is_valid():
    from cryptfs.cli.mountopts import parse_mount_options

    readme = (REPO / "README.md").read_text()
    lines = [line for line in readme.splitlines()
             if line.startswith("/") and " fuse.cryptfs " in line]
    assert lines
    for line in lines:
        source, target, fstype, options, *_ = line.split()
        assert fstype == "fuse.cryptfs"
        assert parse_mount_options(options).values["passfile"]


def test_forced_afalg_where_unavailable(setup):
    from cryptfs.engines.afalg import AfalgEngine
    from cryptfs.errors import EngineUnavailableError

    try:
        AfalgEngine.probe()
        pytest.skip("this kernel has AF_ALG")
    except EngineUnavailableError:
        pass
    cipher, plain, passfile, _ = setup
    proc = cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile),
                   "--engine", "afalg", check=False)
    assert proc.returncode == ExitCode.ENGINE and "AF_ALG" in proc.stderr
    assert not is_mounted(plain)


@pytest.mark.fuse
def test_demo_script(tmp_path):
    demo = tmp_path / "demo"
    proc = subprocess.run([str(REPO / "scripts/demo"), str(demo)], capture_output=True,
                          text=True, timeout=600)
    try:
        assert proc.returncode == 0, proc.stderr
        assert "Hello from cryptfs" in proc.stdout
        assert (demo / "plain" / "hello.txt").read_text().startswith("Hello from cryptfs")
        assert not any("hello" in p.name for p in (demo / "cipher").rglob("*"))
    finally:
        unmount(demo / "plain")


@pytest.mark.fuse
def test_logs_never_contain_key_material(setup):
    import base64

    from cryptfs.keys.hierarchy import KeyRing
    from cryptfs.keys.recovery import decode_recovery_code

    cipher, plain, passfile, code = setup
    master = decode_recovery_code(code)
    mount = Mount(cipher, plain, passfile, "auto", extra=("--debug",)).start()
    (plain / "f").write_bytes(os.urandom(10000))
    (plain / "f").read_bytes()
    os.symlink("target", plain / "s")
    os.setxattr(plain / "f", "user.k", b"v")
    limits = Path(f"/proc/{mount.proc.pid}/limits").read_text()
    assert re.search(r"Max core file size\s+0\s+0", limits)  # no core dumps of keys
    status = Path(f"/proc/{mount.proc.pid}/status").read_text()
    locked = int(re.search(r"VmLck:\s+(\d+)", status).group(1))
    assert locked > 0  # the master key's page is locked in memory
    mount.stop()
    text = mount.log()
    assert "DEBUG" in text  # the debug log really was on
    ring = KeyRing(master)
    secrets_ = [master, ring.header_key, ring.name_key, ring.metadata_key, ring.keyfile_mac_key]
    forms = [f(k) for k in secrets_ for f in (bytes.hex, lambda k: base64.b64encode(k).decode())]
    for form in (*forms, code, PASSWORD):
        assert form not in text


@pytest.mark.fuse
def test_allow_other_keeps_permission_checks(setup):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    import tempfile

    cipher, _, passfile, _ = setup
    outside = Path(tempfile.mkdtemp(prefix="cryptfs-allow-other-", dir="/tmp"))
    outside.chmod(0o755)  # pytest's own tmp dirs are 0700: other users cannot enter
    plain = outside / "plain"
    plain.mkdir()
    cryptfs("mount", str(cipher), str(plain), "--passfile", str(passfile), "--allow-other")
    try:
        (plain / "private").write_text("root only")
        (plain / "private").chmod(0o600)
        (plain / "public").write_text("everyone")
        (plain / "public").chmod(0o644)
        os.chmod(plain, 0o755)

        def as_nobody(path: Path) -> int:
            return subprocess.run(["cat", str(path)], capture_output=True,
                                  user=65534, group=65534).returncode

        assert as_nobody(plain / "public") == 0
        assert as_nobody(plain / "private") != 0
    finally:
        unmount(plain)
        shutil.rmtree(outside)


@pytest.mark.parametrize("text, allowed", [
    ("user_allow_other\n", True),
    ("# comment\n  user_allow_other   # allowed\n", True),
    ("#user_allow_other\nmount_max = 1000\n", False),
    ("user_allow_other", False),  # fusermount3 ignores a last line without its newline
    ("user_allow_other_x\n", False),
    (None, False),  # no file
])
def test_allow_other_check_reads_fuse_conf_as_fusermount3_does(tmp_path, text, allowed):
    conf = tmp_path / "fuse.conf"
    if text is not None:
        conf.write_text(text)
    check_allow_other(0, conf)  # root may always
    if allowed:
        check_allow_other(1000, conf)
    else:
        with pytest.raises(CryptfsError) as info:
            check_allow_other(1000, conf)
        assert info.value.exit_code == ExitCode.USAGE and "user_allow_other" in str(info.value)


@pytest.mark.fuse
@pytest.mark.parametrize("conf", ["#user_allow_other\nmount_max = 1000\n", "user_allow_other\n"],
                         ids=["without", "with"])
def test_allow_other_as_a_user_follows_fuse_conf(conf):
    """An ordinary user mounting with --allow-other: without user_allow_other
    in /etc/fuse.conf, one line saying what to add and USAGE, before the
    password is read; with it, a working mount.  Real fusermount3 and
    /etc/fuse.conf, the latter a private copy bind-mounted in a private
    mount namespace (the machine's files are never touched)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs root, unshare and setpriv to act as another user")
    import tempfile

    outside = Path(tempfile.mkdtemp(prefix="cryptfs-user-", dir="/tmp"))
    try:
        outside.chmod(0o755)  # pytest's own tmp dirs are 0700: nobody cannot enter
        (outside / "fuse.conf").write_text(conf)
        for name in ("cipher", "plain"):
            (outside / name).mkdir()
        (outside / "pw").write_text(PASSWORD + "\n")
        (outside / "pw").chmod(0o600)
        for path in (outside / "cipher", outside / "plain", outside / "pw"):
            os.chown(path, 65534, 65534)
        # setpriv runs each step itself: a shell running as nobody may not
        # exec this Python (the venv's interpreter can sit in root's home).
        nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups"
        cli = f"{nobody} {' '.join(cryptfs_cmd())}"
        # /dev/fuse as distributions ship it (0666: any user may mount
        # through fusermount3), also in the namespace only.
        dev, rdev = outside / "dev", os.stat("/dev/fuse").st_rdev
        dev.mkdir()
        script = (f"mount --bind {outside}/fuse.conf /etc/fuse.conf && "
                  f"mount -t tmpfs -o size=1m cryptfs-test-dev {dev} && "
                  f"mknod -m 666 {dev}/fuse c {os.major(rdev)} {os.minor(rdev)} && "
                  f"mount --bind {dev}/fuse /dev/fuse && "
                  f"cd / && "
                  f"{{ {cli} init {outside}/cipher --passfile {outside}/pw "
                  f"--no-recovery-code {' '.join(FAST_KDF)} >/dev/null || exit 99; }} && "
                  f"{cli} mount {outside}/cipher {outside}/plain --passfile {outside}/pw "
                  f"--allow-other && "
                  f"{nobody} sh -c 'echo hello > {outside}/plain/f' && "
                  f"{nobody} cat {outside}/plain/f && "
                  f"cat {outside}/plain/f && "  # root, another user, gets in
                  f"{cli} unmount {outside}/plain")
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script], capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    finally:
        shutil.rmtree(outside)
    if conf.startswith("#"):
        assert proc.returncode == ExitCode.USAGE, proc.stderr
        assert proc.stderr.splitlines() == [
            "cryptfs: --allow-other needs the line 'user_allow_other' in /etc/fuse.conf "
            "(add it as root), or mount as root"], proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "hello\nhello\n"
