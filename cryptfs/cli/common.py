"""What every command group shares: the log, KDF parameters from the
command line, the cipher directory argument, unlocking."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptfs.daemon.fuseloop import OFF_ENV, SPIN_ENV
from cryptfs.daemon.memtrace import ENV as MEMDUMP_ENV
from cryptfs.engines.base import EngineOptions
from cryptfs.engines.native import NO_NATIVE_ENV
from cryptfs.engines.parallel import THREADS_ENV, run_threads
from cryptfs.errors import CipherDirError
from cryptfs.keys.hierarchy import KeyRing, protect_process
from cryptfs.keys.keyfile import (
    KdfParams,
    KeyFile,
)
from cryptfs.keys.password import get_password
from cryptfs.keys.recovery import decode_recovery_code

log = logging.getLogger("cryptfs")


@dataclass(frozen=True)
class EnvironmentOverrides:
    """What the environment overrides, for comparisons and tests
    (``scripts/bench``, the test suite); passed down as parameters."""

    engine: EngineOptions
    own_request_loop: bool  # False: pyfuse3's request loop (fuseloop.py)
    spin: bool = False  # the request loop spins before it parks (fuseloop.py)
    memdump: str | None = None  # a file for memory reports (daemon/memtrace.py)


def environment_overrides(environ: Mapping[str, str] = os.environ) -> EnvironmentOverrides:
    """The one place cryptfs reads its environment variables:
    ``CRYPTFS_NO_NATIVE=1`` (the userspace engine without its native
    helper), ``CRYPTFS_RUN_THREADS=N`` (threads a large run is split over,
    1-4), ``CRYPTFS_PYFUSE3_LOOP=1`` (pyfuse3's own request loop),
    ``CRYPTFS_SPIN=1`` (our loop spins before it parks) and
    ``CRYPTFS_MEMDUMP=FILE`` (memory reports on SIGUSR2)."""
    threads = environ.get(THREADS_ENV)
    return EnvironmentOverrides(
        EngineOptions(native=environ.get(NO_NATIVE_ENV) != "1",
                      run_threads=None if threads is None else run_threads(threads)),
        own_request_loop=environ.get(OFF_ENV) != "1", spin=environ.get(SPIN_ENV) == "1",
        memdump=environ.get(MEMDUMP_ENV) or None)


def kdf_params(args: argparse.Namespace) -> KdfParams:
    return KdfParams.argon2id(memory_kib=args.argon2_memory * 1024,
                              iterations=args.argon2_passes)


def cipherdir_arg(path: str) -> Path:
    cipherdir = Path(path)
    if not cipherdir.is_dir():
        raise CipherDirError(f"cipher directory {cipherdir} does not exist")
    return cipherdir


def check_writable(cipherdir: Path, hint: str = "") -> None:
    """Before any password is asked for: a key file change writes a new file
    and renames it in the cipher directory, a mount its lock file."""
    if os.access(cipherdir, os.W_OK):
        return
    read_only = os.statvfs(cipherdir).f_flag & os.ST_RDONLY
    raise CipherDirError(f"cannot write to {cipherdir}: "
                         + ("it is on a read-only filesystem" if read_only
                            else "permission denied") + hint)


def unlock(cipherdir: Path, args: argparse.Namespace) -> tuple[KeyFile, KeyRing]:
    keyfile = KeyFile.load(cipherdir)
    return keyfile, unlock_keyfile(keyfile, args)


def unlock_keyfile(keyfile: KeyFile, args: argparse.Namespace) -> KeyRing:
    """The keys of ``keyfile`` (wherever it was read from), with the
    password or recovery code the arguments say how to get."""
    protect_process()  # before any key is in memory
    if getattr(args, "recovery", False):
        code = get_password(args.passfile, args.extpass, prompt="Recovery code: ")
        return keyfile.verify(decode_recovery_code(code.decode("ascii", "replace")))
    return keyfile.unlock(get_password(args.passfile, args.extpass))
