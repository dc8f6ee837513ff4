"""A real NFS server and two independent NFSv4.2 clients of one export, inside
the kernel VM (scripts/kernel-vm), for tests of cryptfs on shared storage.

The guest serves a tmpfs to itself (knfsd cannot export the guest's 9p root)
as the NFSv4 pseudo-root (``fsid=0``) and mounts it twice with
``nosharecache``, so each client has its own caches and its own state on the
server, as two machines would: what one client writes reaches the other only
through the server, and an ``flock`` taken through one is seen through the
other (NFSv4 sends locks to the server).  The tools come from the host's root,
which the guest sees: scripts/setup installs nfs-kernel-server there.

Only inside the VM (CRYPTFS_IN_VM=1): serving NFS needs root and nfsd, and the
host must not serve NFS.  On the host the tests skip; in the VM, where
CRYPTFS_REQUIRE_AFALG=1, anything missing is a failure, never a skip.
Teardown undoes every step that was done, in reverse, even after a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_AFALG

IN_VM = os.environ.get("CRYPTFS_IN_VM") == "1"
TOOLS = ("rpcbind", "rpcinfo", "rpc.mountd", "rpc.nfsd", "exportfs", "mount.nfs4")
EXPORT_SIZE = "256m"
STEP_TIMEOUT = 60  # seconds for one setup command: qemu emulates every instruction
# rpcbind and rpc.mountd keep their state here; the guest's root is the host's, read-only.
STATE_DIRS = ("/run/rpcbind", "/var/lib/nfs")
PIPEFS = "/var/lib/nfs/rpc_pipefs"
NFSD_FS = "/proc/fs/nfsd"
LEASES = "/proc/sys/fs/leases-enable"
LEASE_SECONDS = 10  # the kernel's minimum lease and grace time


def require_nfs() -> None:
    """Skip outside the kernel VM; inside it, fail (where the kernel is
    required) or skip when the server's tools are missing."""
    if not IN_VM:
        pytest.skip("NFS tests serve NFS as root: they run in the kernel VM (scripts/test)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        message = f"NFS tools missing: {', '.join(missing)} (scripts/setup installs " \
                  "nfs-kernel-server)"
        if REQUIRE_AFALG:
            pytest.fail(message)
        pytest.skip(message)


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")


def _quiet(*cmd: str) -> bool:
    """Run a teardown command; True when it worked."""
    try:
        return subprocess.run(cmd, capture_output=True, timeout=STEP_TIMEOUT).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def _mount(stack: contextlib.ExitStack, target: str, *args: str) -> None:
    """``mount ARGS TARGET``, undone at exit (forced, then lazily: a client
    whose server is already gone would otherwise hang the umount)."""
    _run("mount", *args, target)
    stack.callback(lambda: _quiet("umount", target) or _quiet("umount", "-f", target)
                   or _quiet("umount", "-l", target))


def _writable_state(stack: contextlib.ExitStack) -> None:
    """A private tmpfs over each state directory the guest cannot write."""
    for path in STATE_DIRS:
        with contextlib.suppress(OSError):
            os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):  # EROFS even for root
            _mount(stack, path, "-t", "tmpfs", "tmpfs")
    for path in (PIPEFS, "/var/lib/nfs/v4recovery"):
        os.makedirs(path, exist_ok=True)


def _registered(program: str) -> bool:
    """Whether rpcbind answers and lists ``program`` (itself: "portmapper")."""
    try:
        proc = subprocess.run(["rpcinfo", "-p", "127.0.0.1"], capture_output=True, text=True,
                              timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and program in proc.stdout


def _daemon(stack: contextlib.ExitStack, log: Path, program: str, *cmd: str) -> None:
    """Start a daemon in the foreground (so we hold its pid), wait until it
    is registered with rpcbind as ``program`` (the next step talks to it:
    rpc.nfsd fails with ECONNREFUSED before rpcbind listens); stop it at exit."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stack.callback(stop)
    deadline = time.monotonic() + STEP_TIMEOUT
    while not _registered(program):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd[0]} did not come up (exit status {proc.poll()}): "
                               f"{log.read_text(errors='replace').strip()}")
        time.sleep(0.1)


def _no_delegations(stack: contextlib.ExitStack) -> None:
    """No delegations (nfsd grants them as VFS leases): both mounts are one
    NFS client to the server (same client ID), and nfsd does not recall a
    client's delegation for that same client's own conflicting open, so a
    mount holding one could read its cache, stale after the other's write.
    A precaution: no such stale read was seen (nor a delegation granted)."""
    with open(LEASES) as f:
        before = f.read()
    with open(LEASES, "w") as f:
        f.write("0\n")

    def restore() -> None:
        with open(LEASES, "w") as f:
            f.write(before)
    stack.callback(restore)


def _server(stack: contextlib.ExitStack, export: Path, log: Path, delegations: bool) -> None:
    """knfsd serving ``export`` as the NFSv4 pseudo-root on 127.0.0.1; the
    daemons' output goes to ``log``."""
    _run("modprobe", "-a", "nfsd", "nfsv4")
    _writable_state(stack)
    if not _mounted(NFSD_FS):
        _mount(stack, NFSD_FS, "-t", "nfsd", "nfsd")
    if not _mounted(PIPEFS):
        _mount(stack, PIPEFS, "-t", "rpc_pipefs", "sunrpc")
    # A fresh server refuses locks and non-reclaim opens for its grace period
    # (90 s by default): the shortest the kernel takes keeps setup quick.
    for knob in ("nfsv4leasetime", "nfsv4gracetime"):
        with open(f"{NFSD_FS}/{knob}", "w") as f:
            f.write(f"{LEASE_SECONDS}\n")
    _daemon(stack, log, "portmapper", "rpcbind", "-f", "-w")
    _run("exportfs", "-o", "rw,sync,no_subtree_check,no_root_squash,fsid=0",
         f"127.0.0.1:{export}")
    stack.callback(_quiet, "exportfs", "-ua")
    _daemon(stack, log, "mountd", "rpc.mountd", "-F")
    if not delegations:
        _no_delegations(stack)
    _run("rpc.nfsd", "4")
    stack.callback(_quiet, "rpc.nfsd", "0")


@contextlib.contextmanager
def nfs_two_clients(base: Path, delegations: bool = False
                    ) -> Iterator[tuple[Path, Path, Path]]:
    """Serve a fresh tmpfs under ``base`` over NFS and mount it twice:
    yields (export, client1, client2).  The caller unmounts whatever it
    mounted on top (cryptfs) before the block ends.  ``delegations``: let
    nfsd grant them (see ``_no_delegations`` for why they are off)."""
    require_nfs()
    export, client1, client2 = base / "export", base / "client1", base / "client2"
    for path in (export, client1, client2):
        path.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        try:
            _mount(stack, str(export), "-t", "tmpfs", "-o", f"size={EXPORT_SIZE}", "tmpfs")
            _server(stack, export, base / "daemons.log", delegations)
            for client in (client1, client2):
                _mount(stack, str(client), "-t", "nfs4", "-o", "vers=4.2,nosharecache",
                       "127.0.0.1:/")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            pytest.fail(f"cannot set up NFS in the VM: {exc}")
        yield export, client1, client2
