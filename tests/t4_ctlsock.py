"""The control socket (daemon/ctlsock.py): ``cryptfs path`` without the
password, answered by the running mount; who may ask; its files; what a
killed daemon leaves; requests that must not harm the mount."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from cryptfs.daemon.ctlsock import MAX_REQUEST, ControlSocketError, private_dir, socket_path
from cryptfs.errors import ExitCode
from tests.conftest import Mount, init_cipherdir, require_fuse
from tests.helpers.cli import cryptfs
from tests.t4_pathmap import LONG_DIR, LONG_FILE, build_tree, ino, path_map, plain_entries

NOBODY = 65534
# A client in the system's Python (any user can run it): connect, send one
# request, print the reply or the error.
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect:", exc.errno)
    sys.exit(0)
try:
    s.sendall(b'{"op": "encrypt", "path": "/a"}\\n')
except BrokenPipeError:  # refused: the reply is there before the close
    pass
print(s.makefile("rb").readline().decode().strip())
"""


def sock_of(mount: Mount) -> Path:
    return socket_path(mount.cipherdir, os.geteuid())


def ask(path: Path, *lines: bytes) -> list[dict]:
    """Send raw request lines on one connection; the replies."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))  # blocking: waits while the backlog is full
        s.settimeout(30)
        s.sendall(b"".join(lines))
        s.shutdown(socket.SHUT_WR)
        return [json.loads(line) for line in s.makefile("rb")]


def test_every_entry_maps_through_the_mount(fresh_mount):
    """No password: every entry's backing path and back, as the offline
    map gives them, from the command line and the raw protocol."""
    plain, cipher = fresh_mount.mountpoint, fresh_mount.cipherdir
    build_tree(plain)
    for n in (1, 16, 159, 160, 161, 200, 255):
        (plain / LONG_DIR / ("n" * n)).write_bytes(b"")
    offline = path_map(fresh_mount)
    entries = plain_entries(plain)
    assert len(entries) == 23
    for path in entries:
        steps = offline.encrypt(path)
        (answer,) = ask(sock_of(fresh_mount), json.dumps({"op": "encrypt", "path": path})
                        .encode() + b"\n")
        assert answer["ok"] and answer["backing"] == steps[-1].backing, path
        assert answer["sidecars"] == [s.sidecar for s in steps if s.sidecar is not None]
        assert ino(cipher / answer["backing"]) == ino(plain / path.lstrip("/"))
        for rel in (answer["backing"], *[s.sidecar for s in steps[-1:] if s.sidecar]):
            (back,) = ask(sock_of(fresh_mount), json.dumps({"op": "decrypt", "path": rel})
                          .encode() + b"\n")
            assert back["ok"] and back["plaintext"] == path
    target = f"/{LONG_DIR}/{LONG_FILE}"
    lines = cryptfs("path", "encrypt", str(cipher), target).stdout.splitlines()
    assert lines == [offline.encrypt(target)[-1].backing,
                     *[s.sidecar for s in offline.encrypt(target) if s.sidecar]]
    out = cryptfs("path", "decrypt", str(cipher), lines[0], "--via-mount", "--json").stdout
    assert json.loads(out)["plaintext"] == target
    unicode = f"/{LONG_DIR}/inner/ünïcödé ☃.txt"
    backing = cryptfs("path", "encrypt", str(cipher), unicode).stdout.splitlines()[0]
    assert cryptfs("path", "decrypt", str(cipher), backing).stdout == unicode + "\n"
    proc = cryptfs("path", "encrypt", str(cipher), "/a/nope", check=False)
    assert proc.returncode == ExitCode.CIPHERDIR and "/a/nope: no such" in proc.stderr
    fresh_mount.stop()
    proc = cryptfs("path", "encrypt", str(cipher), "/a", check=False)
    assert proc.returncode == ExitCode.MOUNT and "no running mount" in proc.stderr
    assert "--passfile" in proc.stderr


def test_socket_files_are_private_and_removed(fresh_mount):
    path = sock_of(fresh_mount)
    st, dst = os.lstat(path), os.lstat(path.parent)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_ISDIR(dst.st_mode) and stat.S_IMODE(dst.st_mode) == 0o700
    assert st.st_uid == dst.st_uid == os.geteuid()
    assert path.name.endswith(".sock") and str(fresh_mount.cipherdir) not in str(path)
    assert socket_path(Path(str(fresh_mount.cipherdir) + "/."), os.geteuid()) == path
    assert [n for n in os.listdir(path.parent) if n.startswith(".")] == []  # no temp left
    fresh_mount.stop()
    assert not path.exists()


def _as_nobody(path: Path, *caps: str) -> str:
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if caps:
        cmd += [f"--inh-caps=+{','.join(caps)}", f"--ambient-caps=+{','.join(caps)}"]
    proc = subprocess.run([*cmd, "/usr/bin/python3", "-c", CLIENT, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_another_user_is_refused(fresh_mount):
    """The directory keeps other users out; a process of another uid that
    passes it anyway (here by CAP_DAC_OVERRIDE) is refused by its uid."""
    if os.geteuid() != 0:
        pytest.skip("running a client as another user needs root")
    (fresh_mount.mountpoint / "a").mkdir()
    path = sock_of(fresh_mount)
    assert _as_nobody(path) == "connect: 13"  # EACCES
    reply = json.loads(_as_nobody(path, "dac_override"))
    assert reply == {"ok": False, "exit": ExitCode.USAGE,
                     "error": f"uid {NOBODY} may not use this mount's control socket "
                              f"(only uid {os.geteuid()} and root)"}
    (answer,) = ask(path, b'{"op": "encrypt", "path": "/a"}\n')  # the owner still is
    assert answer["ok"]
    fresh_mount.expected_log.append("refused")


def test_bad_requests_do_not_harm_the_mount(fresh_mount):
    plain = fresh_mount.mountpoint
    (plain / "a").mkdir()
    path = sock_of(fresh_mount)
    replies = ask(path, b"not json\n", b'{"op": "delete", "path": "/a"}\n', b"[1]\n",
                  b'{"op": "encrypt"}\n', b'{"op": "decrypt", "path": "../../etc"}\n',
                  b'{"op": "decrypt", "path": "a\\u0000b"}\n',
                  b'{"op": "decrypt", "path": "' + b"x" * 256 + b'"}\n',
                  b'{"op": "encrypt", "path": "/a"}\n', b"\xff\xfe\n")
    assert [r["ok"] for r in replies] == [False] * 7 + [True, False]
    assert all(r["exit"] == ExitCode.USAGE for r in replies if not r["ok"])
    (too_long,) = ask(path, b"x" * (MAX_REQUEST + 10))  # no newline: never a request
    assert not too_long["ok"] and "longer than" in too_long["error"]
    with socket.socket(socket.AF_UNIX) as s:  # a client that asks and goes away
        s.connect(str(path))
        s.sendall(b'{"op": "encrypt", "path": "/a"}\n')
    clients = [socket.socket(socket.AF_UNIX) for _ in range(20)]  # more than served at once
    for c in clients:
        c.connect(str(path))
    for c in clients:
        c.close()
    (answer,) = ask(path, b'{"op": "encrypt", "path": "/a"}\n')
    assert answer["ok"]
    (plain / "a" / "f").write_bytes(b"still mounted")
    assert (plain / "a" / "f").read_bytes() == b"still mounted"


def test_killed_daemon_leaves_no_obstacle(fresh_mount):
    """SIGKILL leaves the socket file; the next mount replaces it."""
    (fresh_mount.mountpoint / "a").mkdir()
    path = sock_of(fresh_mount)
    proc = fresh_mount.proc
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fresh_mount.proc = None
    subprocess.run(["fusermount3", "-u", "-z", str(fresh_mount.mountpoint)], check=False)
    deadline = time.monotonic() + 30
    while os.path.ismount(fresh_mount.mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # stale: nobody listens
    proc = cryptfs("path", "encrypt", str(fresh_mount.cipherdir), "/a", check=False)
    assert proc.returncode == ExitCode.MOUNT and "no running mount" in proc.stderr
    fresh_mount.start()
    out = cryptfs("path", "encrypt", str(fresh_mount.cipherdir), "/a").stdout
    assert out == path_map(fresh_mount).encrypt("/a")[-1].backing + "\n"
    assert "control socket" not in fresh_mount.log()  # no warning: replaced quietly


def test_socket_directory_not_ours_is_refused(tmp_path):
    """A directory others can open, or a symlink to one, is never used."""
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(ControlSocketError, match="not a private directory"):
        private_dir(open_dir)
    (tmp_path / "link").symlink_to(tmp_path / "private")
    (tmp_path / "private").mkdir(mode=0o700)
    with pytest.raises(ControlSocketError, match="not a private directory"):
        private_dir(tmp_path / "link")
    private_dir(tmp_path / "new")
    assert stat.S_IMODE(os.lstat(tmp_path / "new").st_mode) == 0o700


def test_detached_mount_of_a_relative_path(tmp_path):
    """The daemon detaches (and changes directory): the socket is still
    that of the directory given, relative or not."""
    require_fuse()
    init_cipherdir(tmp_path / "cipher", tmp_path / "password")
    (tmp_path / "password").chmod(0o600)
    (tmp_path / "plain").mkdir()
    cryptfs("mount", "cipher", "plain", "--passfile", "password", cwd=tmp_path)
    try:
        (tmp_path / "plain" / "a").mkdir()
        out = cryptfs("path", "encrypt", "cipher", "/a", "--via-mount", cwd=tmp_path).stdout
        assert (tmp_path / "cipher" / out.strip()).is_dir()
        assert os.lstat(tmp_path / "cipher" / out.strip()).st_ino == \
            os.lstat(tmp_path / "plain" / "a").st_ino
    finally:
        cryptfs("unmount", str(tmp_path / "plain"))
    assert not socket_path(tmp_path / "cipher", os.geteuid()).exists()


def test_stale_sockets_of_other_directories_are_swept(fresh, tmp_path):
    """Killed daemons of directories never mounted again leave sockets: a
    mount removes those nobody listens on, and no live one."""
    directory = socket_path(fresh.cipherdir, os.geteuid()).parent
    private_dir(directory)
    stale, live, other = (directory / f"{'0' * 31}{n}.sock" for n in "123")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # closed, the file stays: as after SIGKILL
    held = socket.socket(socket.AF_UNIX)
    try:
        held.bind(str(live))
        held.listen(1)
        other.write_bytes(b"")  # not a socket: not ours to remove
        fresh.start()
        assert not stale.exists() and live.exists() and other.exists()
        assert ask(sock_of(fresh), b'{"op": "encrypt", "path": "/"}\n')[0]["ok"]
    finally:
        held.close()
        for path in (stale, live, other):
            path.unlink(missing_ok=True)
