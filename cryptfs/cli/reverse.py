"""``cryptfs init --reverse`` and ``cryptfs mount --reverse``: an encrypted,
read-only view of a plaintext directory, for backups (README "Backups
(reverse mode)")."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import trio

from cryptfs.cli.cipherdir import print_recovery_code
from cryptfs.cli.common import environment_overrides, kdf_params, log, unlock_keyfile
from cryptfs.cli.mounting import check_allow_other
from cryptfs.daemon.ctlsock import control_socket
from cryptfs.daemon.daemonize import detach
from cryptfs.daemon.mount import fuse_options, mounted, read_requests_plainly, serve
from cryptfs.daemon.mountpoint import canonical, prepare_mountpoint
from cryptfs.daemon.reverse import build_reverse_stack
from cryptfs.errors import CipherDirError, UsageError
from cryptfs.fs.ops import MountOptions
from cryptfs.keys.hierarchy import protect_process
from cryptfs.keys.keyfile import (
    FEATURE_AUTHENTICATED,
    NEW_FEATURES,
    KeyFile,
    write_atomic,
)
from cryptfs.keys.password import get_password
from cryptfs.keys.reverse import REVERSE_KEYFILE_NAME
from cryptfs.reverse.exclude import read_patterns
from cryptfs.tools.pathmap import reverse_mapper

# Seconds the kernel may cache the view's names and attributes.  Not the
# forward mount's long default: the plaintext tree changes behind the view
# (it is the user's live data), and a backup run right after a change must
# see it.
REVERSE_CACHE_TIMEOUT = 1.0


def plaindir_arg(path: str) -> Path:
    plaindir = Path(path)
    if not plaindir.is_dir():
        raise CipherDirError(f"plaintext directory {plaindir} does not exist")
    return plaindir


def reverse_keyfile(plaindir: Path, config: str | None) -> Path:
    """Where the key file of a reverse view of ``plaindir`` is."""
    return Path(config) if config else plaindir / REVERSE_KEYFILE_NAME


def cmd_init_reverse(args: argparse.Namespace) -> None:
    plaindir = plaindir_arg(args.cipherdir)
    path = reverse_keyfile(plaindir, args.config)
    if path.exists():
        raise CipherDirError(f"{path} exists already: {plaindir} has a reverse configuration")
    password = get_password(args.passfile, args.extpass, confirm=True)
    protect_process()
    features = (*NEW_FEATURES, FEATURE_AUTHENTICATED) if args.authenticated else NEW_FEATURES
    keyfile, keys = KeyFile.create(password, kdf_params(args), features)
    try:
        write_atomic(path, keyfile.to_bytes(), 0o600)
    except OSError as exc:
        raise CipherDirError(f"cannot write {path}: {exc.strerror}") from exc
    mode = " (authenticated)" if keyfile.authenticated else ""
    print(f"cryptfs: reverse configuration for {plaindir} in {path}{mode}")
    if not args.no_recovery_code:
        print_recovery_code(keys)
    keys.wipe()


def load_reverse_keyfile(path: Path) -> KeyFile:
    return KeyFile.read(path, missing=f"no reverse configuration at {path}; run "
                                      "'cryptfs init --reverse' first")


def check_outside(mountpoint: Path, plaindir: Path) -> None:
    """A view mounted inside the tree it shows would show itself, and a
    lookup of its own mount point would wait for itself."""
    where, tree = os.path.realpath(mountpoint), os.path.realpath(plaindir)
    if where == tree or where.startswith(tree.rstrip("/") + "/"):
        raise UsageError(f"the mount point {mountpoint} is inside {plaindir}: "
                         "mount the view elsewhere")


def cmd_mount_reverse(args: argparse.Namespace) -> None:
    plaindir, mountpoint = plaindir_arg(args.cipherdir), Path(args.mountpoint)
    path = reverse_keyfile(plaindir, args.config)
    keyfile = load_reverse_keyfile(path)
    patterns = read_patterns(args.exclude, args.exclude_from)
    check_outside(mountpoint, plaindir)
    prepare_mountpoint(mountpoint, nonempty=args.nonempty)
    if args.allow_other:
        check_allow_other(os.geteuid())
    keys = unlock_keyfile(keyfile, args)
    timeout = REVERSE_CACHE_TIMEOUT if args.cache_timeout is None else args.cache_timeout
    options = MountOptions(read_only=True, allow_other=args.allow_other,
                           xattrs=not args.no_xattr, readahead_kb=args.readahead,
                           entry_timeout=timeout, attr_timeout=timeout)
    overrides = environment_overrides()
    read_requests_plainly()  # before the stack starts its threads
    stack = build_reverse_stack(plaindir, path, keys, args.engine, options, keyfile.features,
                                patterns, overrides.engine)
    fsname = args.fsname or os.path.abspath(plaindir)
    opts = fuse_options(options, fsname) | set(args.fuse_flags)
    where = canonical(mountpoint)
    real = Path(os.path.realpath(plaindir))  # before detaching, which changes directory
    with mounted(stack, mountpoint, opts, overrides.own_request_loop, overrides.spin):
        log.info("mounted the encrypted view of %s on %s", plaindir, mountpoint)
        if not args.foreground:
            detach()
            keys.lock_memory()
        log.info("engine: %s", stack.engine.describe())
        mapper = reverse_mapper(str(real), keys, stack.excluder.excluded)
        with control_socket(real, mapper) as control:  # made by the daemon, not its parent
            trio.run(serve, stack, args.idle, where, control)
    keys.wipe()
