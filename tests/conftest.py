"""Shared fixtures.  Tests are layered by file name: t1 (primitives), t2
(content, names), t3+ (filesystem).  ``engine`` runs a test on every crypto
engine; the AF_ALG side runs wherever the kernel has AF_ALG (the kernel VM in
scripts/test), and with CRYPTFS_REQUIRE_AFALG=1 a missing AF_ALG is a failure,
never a skip."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptfs.cli.common import environment_overrides
from cryptfs.content.codec import ContentCodec
from cryptfs.content.sessions import SessionCache
from cryptfs.daemon.mount import assemble
from cryptfs.engines.afalg import AfalgEngine
from cryptfs.engines.base import XtsEngine
from cryptfs.engines.userspace import OpenSSLEngine
from cryptfs.errors import EngineUnavailableError
from cryptfs.fs.ops import MountOptions
from cryptfs.keys.hierarchy import KeyRing
from cryptfs.keys.keyfile import NEW_FEATURES, KeyFile
from tests.helpers.ops import new_cipherdir

REQUIRE_AFALG = os.environ.get("CRYPTFS_REQUIRE_AFALG") == "1"


def afalg_engine() -> AfalgEngine:
    """The kernel engine, or skip (fail when AF_ALG is required)."""
    try:
        return AfalgEngine.probe()
    except EngineUnavailableError as exc:
        if REQUIRE_AFALG:
            pytest.fail(f"AF_ALG is required here but unavailable: {exc}")
        pytest.skip(f"no AF_ALG on this kernel ({exc}); scripts/test runs this in the kernel VM")


def native_engine(helpers: int | None = 0) -> OpenSSLEngine:
    """The userspace engine on its native helper (serial unless ``helpers``),
    or skip where CRYPTFS_NO_NATIVE=1 turns the helper off on purpose."""
    try:
        return OpenSSLEngine("native", helpers=helpers,
                             native_helper=environment_overrides().engine.native)
    except EngineUnavailableError as exc:
        if os.environ.get("CRYPTFS_NO_NATIVE") == "1":
            pytest.skip(str(exc))
        raise


@pytest.fixture(params=["openssl", "openssl-cryptography",
                        pytest.param("afalg", marks=pytest.mark.afalg)])
def engine(request) -> Iterator[XtsEngine]:
    """Every engine, and the userspace engine's ``cryptography`` fallback
    (``openssl`` is its native helper wherever that is built)."""
    if request.param == "afalg":
        chosen: XtsEngine = afalg_engine()
    else:
        chosen = OpenSSLEngine("direct" if request.param == "openssl-cryptography" else None,
                               native_helper=environment_overrides().engine.native)
    yield chosen
    chosen.close()


@pytest.fixture
def keys() -> KeyRing:
    return KeyRing(secrets.token_bytes(32))


@pytest.fixture
def backing(tmp_path):
    """A descriptor of an empty backing file."""
    fd = os.open(tmp_path / "backing", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


@pytest.fixture
def codec(engine: XtsEngine, keys: KeyRing):
    sessions = SessionCache(engine, keys)
    yield ContentCodec(keys, sessions)
    sessions.close()


@pytest.fixture(scope="session", autouse=True)
def no_mounts_left_behind(tmp_path_factory):
    """Every test unmounts what it mounted: fail the session otherwise."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    with open("/proc/mounts") as f:
        left = [line.split()[1] for line in f if line.split()[1].startswith(base)]
    for path in left:
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    assert not left, f"mounts left behind: {left}"


# --- real mounts --------------------------------------------------------------

PASSWORD = "test password"
MOUNT_TIMEOUT = 120  # seconds: the kernel VM emulates every instruction


def fuse_usable() -> bool:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return shutil.which("fusermount3") is not None


# Where AF_ALG is required (the kernel VM of scripts/test), and on CI, every
# mount test must run too: a missing /dev/fuse would silently skip half the
# suite and leave it green.
REQUIRE_FUSE = (REQUIRE_AFALG or os.environ.get("CRYPTFS_REQUIRE_FUSE") == "1"
                or os.environ.get("CI") == "true")


def require_fuse() -> None:
    """For tests that mount: skip where /dev/fuse is unusable (fail where
    FUSE is required).  Tests that need no mount must not call this."""
    if fuse_usable():
        return
    if REQUIRE_FUSE:
        pytest.fail("FUSE is required here but /dev/fuse or fusermount3 is unusable")
    pytest.skip("/dev/fuse is not usable here")


# In the kernel VM (scripts/kernel-vm sets CRYPTFS_IN_VM=1), and wherever
# AF_ALG is required, a ``kernel`` test whose feature is missing fails: the VM
# is where those tests run, and a skip there would leave them untested.
REQUIRE_KERNEL = REQUIRE_AFALG or os.environ.get("CRYPTFS_IN_VM") == "1"


def require_kernel(missing: str | None) -> None:
    """For ``kernel`` tests: ``missing`` says what the kernel or the machine
    lacks (None: nothing).  Skip then (fail where kernel features are required)."""
    if missing is None:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"required here but unavailable: {missing}")
    pytest.skip(f"{missing}; scripts/kernel-vm runs this in the kernel VM")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.fuse``: the test mounts (see ``require_fuse``)."""
    if item.get_closest_marker("fuse"):
        require_fuse()


def cryptfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cryptfs.cli", *args]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created) for the block;
    skips the test where mounting needs root we lack."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def init_cipherdir(cipherdir: Path, passfile: Path, *extra: str) -> None:
    """``cryptfs init`` with a cheap KDF; ``extra``: more init options."""
    cipherdir.mkdir(parents=True, exist_ok=True)
    passfile.write_text(PASSWORD + "\n")
    subprocess.run(cryptfs_cmd("init", str(cipherdir), "--passfile", str(passfile),
                               "--argon2-memory", "8", "--argon2-passes", "1", *extra),
                   check=True, capture_output=True)


def init_v1_cipherdir(cipherdir: Path, passfile: Path) -> None:
    """A cipher directory as cryptfs wrote it before bound metadata: ``init``,
    then the key file without feature flags (its slot re-wrapped, since the
    flags are part of every slot's associated data)."""
    init_cipherdir(cipherdir, passfile)
    keyfile = KeyFile.load(cipherdir)
    keys = keyfile.unlock(PASSWORD.encode())
    keyfile.features = []
    keyfile.change_password(keys, keyfile.slots[0].slot_id, PASSWORD.encode())
    keyfile.save(cipherdir)
    keys.wipe()


class Mount:
    """A ``cryptfs mount --foreground`` process that is always unmounted."""

    def __init__(self, cipherdir: Path, mountpoint: Path, passfile: Path, engine: str,
                 extra: tuple[str, ...] = ()) -> None:
        self.cipherdir, self.mountpoint = cipherdir, mountpoint
        self.passfile, self.engine, self.extra = passfile, engine, extra
        self.proc: subprocess.Popen | None = None
        self.expected_log: list[str] = []  # log lines a test caused on purpose
        self.log_path = mountpoint.parent / f"{mountpoint.name}.log"

    def start(self) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cryptfs_cmd("mount", str(self.cipherdir), str(self.mountpoint), "--passfile",
                            str(self.passfile), "--foreground", "--engine", self.engine,
                            *self.extra),
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                pytest.fail(f"cryptfs mount exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"cryptfs mount did not come up:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Unmount: fusermount3 -u, then lazy, then signals; always reaps."""
        if self.proc is None:
            return
        for cmd in (["fusermount3", "-u", str(self.mountpoint)],
                    ["fusermount3", "-u", "-z", str(self.mountpoint)]):
            if not os.path.ismount(self.mountpoint):
                break
            subprocess.run(cmd, capture_output=True)
            time.sleep(0.1)
        try:
            self.proc.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        assert code == 0, f"cryptfs mount exited with {code}:\n{self.log()}"

    def restart(self) -> None:
        self.stop()
        self.start()

    def check_log(self, allowed: tuple[str, ...] = ()) -> None:
        """No tracebacks, and no warnings except the expected ones."""
        text = self.log()
        assert "Traceback" not in text and "internal error" not in text, text
        allowed = (*allowed, *self.expected_log)
        for line in text.splitlines():
            if "WARNING" in line or "skipping" in line or "backing file" in line:
                assert any(a in line for a in allowed), f"unexpected log line: {line}"


@contextlib.contextmanager
def mounted(cipher: Path, passfile: Path, expected: tuple[str, ...] = (),
            extra: tuple[str, ...] = (), engine: str = "openssl") -> Iterator[Path]:
    """``cipher`` mounted at ``<cipher>-plain`` for the block; its log
    checked afterwards (``expected``: warnings the test causes)."""
    mount = Mount(cipher, cipher.parent / f"{cipher.name}-plain", passfile, engine, extra)
    mount.start()
    try:
        yield mount.mountpoint
    finally:
        mount.stop()
    mount.check_log(expected)


def backing_entry_of(mount: Mount, action) -> Path:
    """Run ``action`` on the mount; return the one backing entry it created."""
    before = set(mount.cipherdir.rglob("*"))
    action()
    (entry,) = [p for p in set(mount.cipherdir.rglob("*")) - before
                if p.name != "cryptfs.diriv" and not p.name.endswith(".name")]
    return entry


def fsck_problems(mount: Mount) -> list[tuple[str, str | None]]:
    """(kind, plaintext path) of every problem ``cryptfs fsck`` reports,
    sorted; its exit code must agree (20 with problems, else 0)."""
    proc = subprocess.run(cryptfs_cmd("fsck", str(mount.cipherdir), "--passfile",
                                      str(mount.passfile), "--json"),
                          capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    problems = json.loads(proc.stdout)["problems"]
    assert proc.returncode == (20 if problems else 0), proc.stderr
    return sorted((p["kind"], p["plaintext"]) for p in problems)


def mount_engine_param(request) -> str:
    return usable_engine(request.param)


def usable_engine(name: str) -> str:
    if name == "afalg":
        afalg_engine()  # skip, or fail where AF_ALG is required
    return name


# Every engine, for the mount tests that exercise the kernel engine's own
# path: real programs in both modes, golden directories, the inline/worker
# split, the daemon's descriptors.
ENGINE_PARAMS = ["openssl", pytest.param("afalg", marks=pytest.mark.afalg)]
# Every other mount test runs on the userspace engine alone: the two engines
# write identical bytes (t1_engines and t2_* check that on every size, in the
# kernel VM), and running each mount test again under the VM's emulation
# bought nothing but CI time.
MOUNT_ENGINES = ["openssl"]


@pytest.fixture(params=MOUNT_ENGINES)
def fresh(request, tmp_path):
    """A cipher directory and an unmounted Mount for it (tests damage the
    backing files between mounts)."""
    require_fuse()
    engine = mount_engine_param(request)
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile)
    mount = Mount(tmp_path / "cipher", tmp_path / "plain", passfile, engine)
    try:
        yield mount
    finally:
        mount.stop()


@pytest.fixture
def fresh_mount(tmp_path) -> Iterator[Mount]:
    """A new cipher directory, mounted (userspace engine) for one test and
    checked for log problems after it."""
    require_fuse()
    passfile = tmp_path / "password"
    init_cipherdir(tmp_path / "cipher", passfile)
    mount = Mount(tmp_path / "cipher", tmp_path / "plain", passfile, "openssl").start()
    try:
        yield mount
    finally:
        mount.stop()
    mount.check_log()


@pytest.fixture
def fs(tmp_path, engine, keys):
    """The whole stack in process (no kernel), on ``engine``: its
    ``Operations``, called as pyfuse3 would (tests/helpers/ops.py)."""
    stack = assemble(new_cipherdir(tmp_path / "cipher"), keys, engine, MountOptions(),
                     NEW_FEATURES)
    yield stack.operations
    stack.close()


def module_mount(engine: str, tmp_path_factory, *init_extra: str) -> Iterator[Mount]:
    """A mount of a fresh cipher directory (``init_extra``: init options)
    on ``engine``, checked for log problems at the end."""
    require_fuse()
    engine = usable_engine(engine)
    base = tmp_path_factory.mktemp(f"mount-{engine}")
    passfile = base / "password"
    init_cipherdir(base / "cipher", passfile, *init_extra)
    mount = Mount(base / "cipher", base / "plain", passfile, engine).start()
    try:
        yield mount
    finally:
        mount.stop()
    mount.check_log()


@pytest.fixture(scope="module", params=MOUNT_ENGINES)
def cryptfs_mount(request, tmp_path_factory):
    """One mount per test module and engine; tests use their own subdirectory."""
    yield from module_mount(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=MOUNT_ENGINES)
def authenticated_mount(request, tmp_path_factory):
    """The same for a cipher directory made with ``init --authenticated``."""
    yield from module_mount(request.param, tmp_path_factory, "--authenticated")


@pytest.fixture
def mnt(cryptfs_mount, request) -> Path:
    """A fresh directory inside the module's mount for one test."""
    path = cryptfs_mount.mountpoint / request.node.name.replace("[", "-").replace("]", "")
    path.mkdir()
    return path
