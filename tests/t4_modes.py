"""Modes of new entries, and setuid/setgid clearing, compared with ext4
(the oracle).  A loop-mounted ext4 image holds the oracle directory and the
cipher directory of a cryptfs mount made with --allow-other; the same
script runs in both, as root and as other users, under several umasks, and
the results must be identical.  Needs root (loop mount, other users)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptfs.daemon.lock import LOCK_NAME
from cryptfs.keys.keyfile import KEYFILE_NAME
from cryptfs.names.filenames import DIRIV_NAME, SIDECAR_SUFFIX
from tests.conftest import Mount, init_cipherdir

pytestmark = pytest.mark.fuse

NOBODY = 65534
STRANGER = 65533  # in neither root's group nor nobody's
UMASKS = (0o000, 0o002, 0o022, 0o077)
MODES = (0o620, 0o642, 0o777, 0o4777, 0o2777, 0o6777, 0o2767, 0o1777)
PYTHON = sys.executable  # the ext4 fixture picks one that every user may run
LONG = "L" * 200  # encrypted, longer than a backing name may be: a sidecar

# Run as ``python -c CREATE params root``: creates entries in every way, and
# prints {name: [st_mode, uid, gid]} of everything it made.
CREATE = r"""
import json, os, socket, stat, sys
P, root = json.loads(sys.argv[1]), sys.argv[2]
os.mkdir(root, 0o777)
for mode in P["modes"]:
    os.close(os.open(f"{root}/f{mode:o}", os.O_CREAT | os.O_WRONLY, mode))
    os.close(os.open(f"{root}/{P['long']}{mode:o}", os.O_CREAT | os.O_WRONLY, mode))
    os.mkdir(f"{root}/d{mode:o}", mode)
    os.mkdir(f"{root}/{P['long']}d{mode:o}", mode)
    os.mkfifo(f"{root}/p{mode:o}", mode)
    os.mknod(f"{root}/{P['long']}p{mode:o}", stat.S_IFIFO | mode)
    os.mknod(f"{root}/n{mode:o}", stat.S_IFREG | mode)
os.symlink("target", f"{root}/l")
os.symlink("target", f"{root}/{P['long']}l")
with socket.socket(socket.AF_UNIX) as s:
    s.bind(f"{root}/s")
out = {}
for name in os.listdir(root):
    st = os.lstat(f"{root}/{name}")
    out[name] = [oct(st.st_mode), st.st_uid, st.st_gid]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ext4() -> Iterator[Path]:
    """A fresh ext4 filesystem on a loop device, in a directory every user
    may enter (pytest's own temporary directories are private)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a loop mount, and acting as other users")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("no mkfs.ext4")
    global PYTHON
    PYTHON = child_python()
    outside = Path(tempfile.mkdtemp(prefix="cryptfs-modes-", dir="/tmp"))
    try:
        image, root = outside / "ext4.img", outside / "ext4"
        root.mkdir()
        image.write_bytes(b"")
        os.truncate(image, 64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(root)], check=True)
        try:
            outside.chmod(0o755)
            root.chmod(0o755)
            yield root
        finally:
            if subprocess.run(["umount", str(root)]).returncode != 0:
                subprocess.run(["umount", "-l", str(root)])
    finally:
        shutil.rmtree(outside)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module", params=[0o022, 0o077], ids=["daemon022", "daemon077"])
def daemon_umask(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def setup(ext4, daemon_umask) -> Iterator[tuple[Path, Mount]]:
    """(oracle directory, cryptfs mount), both on the ext4 image, both
    writable by everyone; cryptfs init and mount run under ``daemon_umask``
    (which must change nothing the caller sees).  One engine: modes never
    reach the crypto."""
    engine = "openssl"
    base = ext4 / f"{engine}-{daemon_umask:o}"
    base.mkdir(0o755)
    oracle = base / "oracle"
    oracle.mkdir()
    oracle.chmod(0o777)
    with umask(daemon_umask):
        init_cipherdir(base / "cipher", base / "password")
        mount = Mount(base / "cipher", base / "plain", base / "password", engine,
                      ("--allow-other",)).start()
    try:
        mount.mountpoint.chmod(0o777)
        yield oracle, mount
    finally:
        mount.stop()
    mount.check_log(allowed=("password file",))


def child_python() -> str:
    """A Python every user may run (the venv may be in root's home); the
    scripts need only its standard library."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        with contextlib.suppress(OSError):
            subprocess.run([candidate, "-c", ""], user=NOBODY, group=NOBODY, check=True)
            return candidate
    pytest.skip("no Python that other users may run")


def run(code: str, *args: str, user: int = 0, mask: int = 0o022) -> str:
    """``code`` in a new Python as ``user`` (its own group, no others);
    its arguments: the constants it needs (JSON), then ``args``."""
    ids = {} if user == 0 else {"user": user, "group": user, "extra_groups": []}
    params = json.dumps({"modes": MODES, "long": LONG, "kill_modes": KILL_MODES,
                         "nobody": NOBODY})
    proc = subprocess.run([PYTHON, "-c", code, params, *args], capture_output=True,
                          text=True, umask=mask, check=False, **ids)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("user", [0, NOBODY])
@pytest.mark.parametrize("mask", UMASKS, ids=[f"umask{m:03o}" for m in UMASKS])
def test_new_entries_get_the_modes_ext4_gives(setup, user, mask):
    """open(O_CREAT), mkdir, mknod, mkfifo, symlink, bind, short and long
    names: the caller's umask applies, the daemon's does not."""
    oracle, mount = setup
    name = f"new-{user}-{mask:o}"
    expected = json.loads(run(CREATE, str(oracle / name), user=user, mask=mask))
    got = json.loads(run(CREATE, str(mount.mountpoint / name), user=user, mask=mask))
    assert sorted(got) == sorted(expected)
    wrong = {n: (got[n], expected[n]) for n in expected if got[n] != expected[n]}
    assert not wrong, f"(cryptfs, ext4) where they differ: {wrong}"


def default_acl(user: int, group: int, other: int) -> bytes:
    """A ``system.posix_acl_default`` value with only the three base
    entries (the kernel's xattr form: version 2, then tag, perm, id)."""
    entries = ((0x01, user), (0x04, group), (0x20, other))  # USER_OBJ, GROUP_OBJ, OTHER
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                           for tag, perm in entries)


def test_default_acls_around_the_mount_change_nothing(ext4):
    """A default ACL (u::rwx,g::-,o::-) on the directory holding the cipher
    directory and the mount point: it is inherited by every backing entry
    (where it replaces the daemon's umask) but must not change the modes
    callers get, and the key file and IVs keep theirs."""
    base = ext4 / "acl"
    base.mkdir(0o755)
    os.setxattr(base, "system.posix_acl_default", default_acl(7, 0, 0))
    oracle = ext4 / "acl-oracle"
    oracle.mkdir()
    oracle.chmod(0o777)
    init_cipherdir(base / "cipher", base / "password")
    mount = Mount(base / "cipher", base / "plain", base / "password", "openssl",
                  ("--allow-other",)).start()
    try:
        mount.mountpoint.chmod(0o777)
        for mask in (0o000, 0o022):
            name = f"acl-{mask:o}"
            expected = json.loads(run(CREATE, str(oracle / name), mask=mask))
            got = json.loads(run(CREATE, str(mount.mountpoint / name), mask=mask))
            wrong = {n: (got[n], expected[n]) for n in expected if got.get(n) != expected[n]}
            assert not wrong, f"(cryptfs, ext4) where they differ: {wrong}"
        ivs = [p for p in mount.cipherdir.rglob(DIRIV_NAME)]
        assert ivs and all(stat.S_IMODE(p.stat().st_mode) == 0o440 for p in ivs)
    finally:
        mount.stop()
    mount.check_log(allowed=("password file",))


def test_backing_files_keep_their_fixed_modes(setup, daemon_umask):
    """Directory IVs, long-name sidecars, key file and lock file have fixed
    modes whatever the daemon's umask."""
    _, mount = setup
    run(CREATE, str(mount.mountpoint / "internal"), mask=0)
    fixed = {DIRIV_NAME: 0o440, KEYFILE_NAME: 0o600, LOCK_NAME: 0o600}
    seen = {name: 0 for name in (*fixed, SIDECAR_SUFFIX)}
    for path in mount.cipherdir.rglob("*"):
        suffix = SIDECAR_SUFFIX if path.name.endswith(SIDECAR_SUFFIX) else None
        want = 0o600 if suffix else fixed.get(path.name)
        if want is None:
            continue
        seen[suffix or path.name] += 1
        assert oct(stat.S_IMODE(path.lstat().st_mode)) == oct(want), path
    assert all(seen.values()), seen


# -- setuid and setgid --

KILL_MODES = (0o4777, 0o2777, 0o6777, 0o2767, 0o4767, 0o6767, 0o777)

# ``python -c PREPARE params root``, as root: one file per (action, mode), owned
# by root, or by nobody for the owner's actions, or in nobody's group for the
# member's (chown first: it clears setuid), then given its mode.
PREPARE = r"""
import json, os, sys
P, root = json.loads(sys.argv[1]), sys.argv[2]
os.mkdir(root)
os.chmod(root, 0o777)
for action in ("write", "truncate", "ftruncate", "otrunc", "opentrunc", "chown",
               "member-write", "member-truncate", "member-opentrunc", "owner-write",
               "owner-chown", "owner-opentrunc", "root-chown", "root-chgrp", "root-write",
               "root-opentrunc"):
    for mode in P["kill_modes"]:
        path = f"{root}/{action}-{mode:o}"
        with open(path, "wb") as f:
            f.write(b"data")
        if action.startswith("owner"):
            os.chown(path, P["nobody"], P["nobody"])
        elif action.startswith("member"):  # nobody is in the file's group
            os.chown(path, 0, P["nobody"])
        os.chmod(path, mode)
"""

# ``python -c ACT params root prefix``: each action of ``prefix`` on its files;
# prints {file: [outcome, st_mode after]}.
ACT = r"""
import json, os, sys
P, root, prefix = json.loads(sys.argv[1]), *sys.argv[2:]
def act(action, path):
    if action.endswith("write"):
        with open(path, "ab") as f:
            f.write(b"more")
    elif action.endswith("ftruncate"):
        with open(path, "r+b") as f:
            os.ftruncate(f.fileno(), 1)
    elif action.endswith("truncate"):
        os.truncate(path, 2)
    elif action.endswith("opentrunc"):  # open(2) truncates, nothing written
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    elif action == "otrunc":
        with open(path, "wb") as f:
            f.write(b"new")
    elif action == "root-chgrp":
        os.chown(path, -1, P["nobody"])
    else:
        os.chown(path, P["nobody"], P["nobody"])
out = {}
for name in sorted(os.listdir(root)):
    if not name.startswith(prefix):
        continue
    path = f"{root}/{name}"
    try:
        act(name.rsplit("-", 1)[0], path)
        outcome = "ok"
    except OSError as exc:
        outcome = exc.strerror
    out[name] = [outcome, oct(os.stat(path).st_mode)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("user, prefix", [
    (NOBODY, "write-"), (NOBODY, "truncate-"), (NOBODY, "ftruncate-"), (NOBODY, "otrunc-"),
    (NOBODY, "opentrunc-"), (NOBODY, "chown-"), (NOBODY, "member-"),
    (NOBODY, "owner-"), (0, "root-")])
def test_setuid_and_setgid_are_cleared_as_on_ext4(setup, user, prefix):
    """A write, truncate (also by open(2) alone) or chown by someone
    without CAP_FSETID clears setuid, and setgid where group-exec is set or
    the writer is outside the file's group; root's write keeps them, root's
    chown clears them."""
    oracle, mount = setup
    results = []
    for root in (oracle, mount.mountpoint):
        where = str(root / f"kill-{user}-{prefix}")
        run(PREPARE, where)
        results.append(json.loads(run(ACT, where, prefix, user=user)))
    expected, got = results
    assert got == expected
    assert any(mode.endswith("777") for _, mode in expected.values())  # something cleared


# ``python -c INHERIT params root``: entries made in a setgid directory of group
# nobody; prints {name: [st_mode, gid]}.
INHERIT = r"""
import json, os, sys
root = sys.argv[2]
out = {}
for name in sorted(os.listdir(root)):
    st = os.lstat(f"{root}/{name}")
    out[name] = [oct(st.st_mode), st.st_gid]
print(json.dumps(out))
"""
MAKE_IN = r"""
import os, sys
root, who = sys.argv[2:]
os.mkdir(f"{root}/dir-{who}", 0o777)
for mode in (0o2777, 0o2767, 0o777):
    os.close(os.open(f"{root}/file-{who}-{mode:o}", os.O_CREAT | os.O_WRONLY, mode))
"""


def test_setgid_directory_passes_on_its_group(setup):
    """New entries get a setgid directory's group; new directories its
    setgid bit; a file's setgid is dropped for a creator outside the group."""
    oracle, mount = setup
    results = []
    for root in (oracle, mount.mountpoint):
        where = root / "sgid"
        where.mkdir()
        os.chown(where, 0, NOBODY)
        where.chmod(0o2777)
        for user in (0, NOBODY, STRANGER):
            run(MAKE_IN, str(where), str(user), user=user, mask=0)
        results.append(json.loads(run(INHERIT, str(where))))
    expected, got = results
    assert got == expected
