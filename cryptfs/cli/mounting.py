"""``cryptfs mount`` and ``unmount``, the mount(8) helper form
(``cryptfs SRC DIR -o opts``, ``mount.cryptfs``) and ``install-helpers``."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import trio

from cryptfs.cli.common import check_writable, cipherdir_arg, environment_overrides, log, unlock
from cryptfs.cli.mountopts import parse_mount_options
from cryptfs.daemon import memtrace
from cryptfs.daemon.ctlsock import control_socket
from cryptfs.daemon.daemonize import detach
from cryptfs.daemon.lock import lock_cipherdir, wait_released
from cryptfs.daemon.mount import (
    build_stack,
    fuse_options,
    log_timing,
    mounted,
    read_requests_plainly,
    serve,
    warn_if_far_behind,
)
from cryptfs.daemon.mountpoint import (
    canonical,
    cryptfs_mount_at,
    prepare_mountpoint,
    unmount_cryptfs,
)
from cryptfs.errors import UsageError
from cryptfs.fs.ops import MountOptions
from cryptfs.keys.keyfile import (
    KeyFile,
)
from cryptfs.names.filenames import NameCipher
from cryptfs.tools.pathmap import forward_mapper

FUSE_CONF = Path("/etc/fuse.conf")  # where fusermount3 reads user_allow_other


def check_allow_other(euid: int, conf: Path = FUSE_CONF) -> None:
    """Refuse ``--allow-other`` for a user fusermount3 will refuse it to,
    before the password is asked for: one line saying what to add, instead
    of fusermount3's and libfuse's lines after it.  Read as fusermount3
    reads it: comments and blanks stripped, a last line without its
    newline ignored."""
    if euid == 0:
        return
    try:
        lines = conf.read_text(errors="replace").split("\n")[:-1]
    except OSError:
        lines = []
    if any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines):
        return
    raise UsageError(f"--allow-other needs the line 'user_allow_other' in {conf} "
                     "(add it as root), or mount as root")


def cmd_mount(args: argparse.Namespace) -> None:
    cipherdir, mountpoint = cipherdir_arg(args.cipherdir), Path(args.mountpoint)
    if args.allow_other:
        check_allow_other(os.geteuid())
    if args.shared and args.cache_timeout:
        raise UsageError("--cache-timeout: a --shared mount caches no names or attributes")
    KeyFile.load(cipherdir)  # a cipher directory, before a lock file goes into it
    if not args.ro:
        check_writable(cipherdir, hint=" (mount it with --ro)")
    # The lock is refused before the password is asked for; the daemon holds
    # it until it ends, however it ends.
    with lock_cipherdir(cipherdir, read_only=args.ro, shared=args.shared):
        prepare_mountpoint(mountpoint, nonempty=args.nonempty)
        _mount_and_serve(cipherdir, mountpoint, args)


def _mount_and_serve(cipherdir: Path, mountpoint: Path, args: argparse.Namespace) -> None:
    read_requests_plainly()  # before the stack starts its threads
    keyfile, keys = unlock(cipherdir, args)
    options = MountOptions(read_only=args.ro, allow_other=args.allow_other,
                           inline_max=args.inline_max, dir_fds=args.dir_fds,
                           xattrs=not args.no_xattr, readahead_kb=args.readahead,
                           shared=args.shared)
    if args.cache_timeout is not None:
        options = replace(options, entry_timeout=args.cache_timeout,
                          attr_timeout=args.cache_timeout)
    overrides = environment_overrides()
    stack = build_stack(cipherdir, keys, args.engine, options, keyfile.features,
                        overrides.engine)
    fsname = args.fsname or os.path.abspath(cipherdir)
    opts = fuse_options(options, fsname) | set(args.fuse_flags)
    where = canonical(mountpoint)  # before mounting: resolving a mount waits for it
    real = Path(os.path.realpath(cipherdir))  # before detaching, which changes directory
    with mounted(stack, mountpoint, opts, overrides.own_request_loop, overrides.spin):
        log.info("mounted %s on %s%s", cipherdir, mountpoint,
                 " (shared: others may mount it too)" if args.shared else "")
        warn_if_far_behind(stack.timing, args.engine)
        if not args.foreground:
            detach()
            keys.lock_memory()  # memory locks are not inherited across fork
        # For the log (syslog once detached), not the terminal: see select_engine.
        log.info("engine: %s", stack.engine.describe())
        log_timing(stack.timing, args.engine)
        if overrides.memdump:
            memtrace.start(overrides.memdump)
        mapper = forward_mapper(str(real), NameCipher.for_features(keys, keyfile.features))
        with control_socket(real, mapper) as control:  # made by the daemon, not its parent
            trio.run(serve, stack, args.idle, where, control)
    keys.wipe()


def cmd_unmount(args: argparse.Namespace) -> None:
    """Returns once the daemon has ended (its lock on the cipher directory is
    free), so that a mount right after it, or a backup, finds it finished."""
    mountpoint = Path(args.mountpoint)
    entry = cryptfs_mount_at(mountpoint)
    note = unmount_cryptfs(entry, lazy=args.lazy)
    if note:
        print(f"cryptfs: {mountpoint}: {note}", file=sys.stderr)
    if not args.lazy and not wait_released(Path(entry.source)):
        print(f"cryptfs: {mountpoint}: unmounted, but its daemon has not ended yet",
              file=sys.stderr)


def cmd_install_helpers(args: argparse.Namespace) -> None:
    """mount(8) finds helpers only in /sbin, and runs them with an empty PATH
    (so mount.fuse3 finds ``cryptfs`` only in the shell's default PATH)."""
    here = Path(sys.argv[0]).resolve().parent
    for target, link in ((here / "cryptfs", Path(args.bindir) / "cryptfs"),
                         (here / "mount.cryptfs", Path(args.sbindir) / "mount.cryptfs")):
        if not target.exists():
            raise UsageError(f"{target} not found (run this from the installed cryptfs)")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
        print(f"cryptfs: {link} -> {target}")


def mount_helper_args(argv: list[str]) -> list[str]:
    """``SRC DIR [-o opts] [-f|-n|-s|-v]`` (mount.fuse3 and mount(8) helpers)
    into ``mount`` subcommand arguments."""
    positional, options = [], []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options.append(next(it, ""))
        elif arg.startswith("-o"):
            options.append(arg[2:])
        elif arg in ("-n", "-s", "-v"):  # no mtab / sloppy / verbose: nothing to do
            continue
        elif arg == "-f":
            options.append("foreground")
        elif arg == "-t":
            next(it, None)
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("usage: cryptfs CIPHERDIR MOUNTPOINT [-o options]")
    parsed = parse_mount_options(",".join(options))
    out = ["mount", *positional]
    for key, value in parsed.values.items():
        out += [f"--{key.replace('_', '-')}", value]
    flag_map = {"ro": "--ro", "allow_other": "--allow-other", "recovery": "--recovery",
                "foreground": "--foreground", "no_xattr": "--no-xattr",
                "nonempty": "--nonempty", "shared": "--shared", "reverse": "--reverse"}
    out += [flag_map[f] for f in sorted(parsed.flags) if f in flag_map]
    return out + [f"--fuse-flag={flag}" for flag in sorted(parsed.fuse)]
